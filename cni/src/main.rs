//! `ztunnel-cni`: the chained CNI plugin (see the library's docs for what it does and why).

use std::io::{Read, Write};
use std::process::ExitCode;

use ztunnel_cni::plugin::{ask_daemon, run, Env};

fn main() -> ExitCode {
    let mut stdin = Vec::new();
    // An unreadable stdin is reported as a decode error by `run` (empty input).
    let _ = std::io::stdin().read_to_end(&mut stdin);
    let out = run(&Env::from_process(), &stdin, ask_daemon);
    // Nothing useful can be done when the runtime closed its pipes.
    let _ = std::io::stdout().write_all(out.stdout.as_bytes());
    let _ = std::io::stderr().write_all(out.stderr.as_bytes());
    ExitCode::from(u8::try_from(out.exit).unwrap_or(1))
}
