//! Getting a kube-apiserver binary: `KUBE_APISERVER_BIN`, else the cached build, else a build
//! from Debian's `kubernetes` source package into the cache (minutes, once per machine).
//!
//! The source comes through apt with a private configuration (its own source list, package
//! lists and cache under the build directory), so the machine's apt setup is never changed: the
//! mirror and keyring are those of the machine's own entry for its release's `main` component,
//! used for a `deb-src` line.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// The Kubernetes release the harness runs (Debian 12's `kubernetes` source package).
pub const KUBE_VERSION: &str = "1.20.2";

/// Packages the build needs: the Go toolchain, `rsync` (the upstream build scripts),
/// `dpkg-dev` (`dpkg-source`, which `apt-get source` unpacks with) and Debian's reflect2 1.0.2
/// (see [`REFLECT2`]).
const BUILD_PACKAGES: &[&str] = &[
    "golang-go",
    "rsync",
    "dpkg-dev",
    "golang-github-modern-go-reflect2-dev",
];

/// Kubernetes 1.20 vendors github.com/modern-go/reflect2 1.0.1, which calls the Go runtime's
/// map iterator with its pre-1.18 signature: built with Debian 12's Go 1.19, kube-apiserver
/// crashes (SIGSEGV in `mapiterinit`) the first time it JSON-encodes a map, e.g. when it reads
/// back a custom resource. reflect2 1.0.2 (same API) fixed that; Debian packages it here, and
/// the build swaps it into the vendor tree.
const REFLECT2: &str = "/usr/share/gocode/src/github.com/modern-go/reflect2";

/// The OpenAPI type validator of Kubernetes 1.20 (two vendored copies) takes a value for JSON
/// `null` when `reflect.DeepEqual(reflect.Zero(t), reflect.ValueOf(v))` holds. Before Go 1.19
/// that never held for a non-nil value; since Go 1.19 both sides point at the runtime's shared
/// zero buffer for an empty string, so a custom resource with `""` in a `type: string` field
/// (a Gateway API `parentRefs[].group: ""`, for instance) is refused as `null`. The build
/// restores the old meaning: only `nil` is null.
const NULL_CHECK: (&str, &str) = (
    "\tif data == nil || reflect.DeepEqual(reflect.Zero(reflect.TypeOf(data)), reflect.ValueOf(data)) {",
    "\tif data == nil {",
);
const NULL_CHECK_FILES: &[&str] = &[
    "vendor/k8s.io/kube-openapi/pkg/validation/validate/type.go",
    "vendor/github.com/go-openapi/validate/type.go",
];

/// Where the built binary is kept: `$XDG_CACHE_HOME/ztunnel-tests/kube-apiserver-<version>/`
/// (`~/.cache/...` when `XDG_CACHE_HOME` is unset).
pub fn apiserver_cache_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/root/.cache"));
    base.join("ztunnel-tests")
        .join(format!("kube-apiserver-{KUBE_VERSION}"))
}

/// The kube-apiserver binary to run: `KUBE_APISERVER_BIN` when set (it must exist), else
/// `<cache dir>/kube-apiserver`, built first when missing (7 to 9 minutes and 2 GB of disk
/// during the build; only the binary is kept). Progress goes to stderr directly, so a user
/// sees why a first run takes minutes even under the test harness's output capture.
pub fn ensure_apiserver() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("KUBE_APISERVER_BIN").filter(|v| !v.is_empty()) {
        let p = PathBuf::from(p);
        if !p.is_file() {
            bail!("KUBE_APISERVER_BIN={} does not exist", p.display());
        }
        return Ok(p);
    }
    let dir = apiserver_cache_dir();
    let bin = dir.join("kube-apiserver");
    if bin.is_file() {
        return Ok(bin);
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    // One build at a time, across threads and processes; whoever waited finds the binary.
    let lock_path = dir.join(".lock");
    let lock =
        File::create(&lock_path).with_context(|| format!("creating {}", lock_path.display()))?;
    if lock.try_lock().is_err() {
        progress(&format!(
            "waiting for another process building kube-apiserver in {}",
            dir.display()
        ));
        lock.lock()
            .with_context(|| format!("locking {}", lock_path.display()))?;
    }
    if bin.is_file() {
        return Ok(bin);
    }
    let started = Instant::now();
    build(&dir, &bin).with_context(|| {
        format!(
            "building kube-apiserver {KUBE_VERSION} from Debian's source package in {} \
             (or set KUBE_APISERVER_BIN to an existing binary)",
            dir.display()
        )
    })?;
    progress(&format!(
        "kube-apiserver {KUBE_VERSION} built in {}, cached at {}",
        minutes(started.elapsed()),
        bin.display()
    ));
    Ok(bin)
}

/// Writes a progress line to the process's stderr (not through `eprintln!`, which the test
/// harness captures).
fn progress(msg: &str) {
    let _ = writeln!(std::io::stderr(), "mesh-tests: {msg}");
}

fn minutes(d: Duration) -> String {
    let s = d.as_secs();
    format!("{}m{:02}s", s / 60, s % 60)
}

fn build(dir: &Path, bin: &Path) -> Result<()> {
    progress(&format!(
        "kube-apiserver {KUBE_VERSION} is not cached; building it from Debian's `kubernetes` \
         source package (once per machine: 7 to 9 minutes on 2 cores, 2 GB of disk while \
         building; log in {}/build.log)",
        dir.display()
    ));
    crate::require_root()?;
    apt_install(BUILD_PACKAGES)?;

    let work = dir.join("build");
    if work.exists() {
        std::fs::remove_dir_all(&work)
            .with_context(|| format!("removing an earlier attempt's {}", work.display()))?;
    }
    let apt = AptSource::new(&work.join("apt"))?;
    progress("fetching the source package (apt-get source kubernetes)");
    apt.run(&["update"])?;
    let mut source = apt.command(&["source", "kubernetes"]);
    run_quiet(source.current_dir(&work))?;
    let tree = source_tree(&work)?;
    replace_reflect2(&tree)?;
    for file in NULL_CHECK_FILES {
        patch_line(&tree.join(file), NULL_CHECK)?;
    }

    let log_path = dir.join("build.log");
    progress(&format!(
        "compiling {} (make WHAT=cmd/kube-apiserver)",
        tree.display()
    ));
    make_apiserver(&tree, &work, &log_path)?;

    let built = ["_output/local/bin/linux/amd64", "_output/bin"]
        .iter()
        .map(|d| tree.join(d).join("kube-apiserver"))
        .find(|p| p.is_file())
        .with_context(|| {
            format!(
                "the build finished but left no kube-apiserver under {}/_output",
                tree.display()
            )
        })?;
    let version = Command::new(&built)
        .arg("--version")
        .output()
        .with_context(|| format!("running {} --version", built.display()))?;
    let version = String::from_utf8_lossy(&version.stdout);
    if !version.contains(&format!("v{KUBE_VERSION}")) {
        bail!(
            "{} reports {:?}, expected v{KUBE_VERSION}",
            built.display(),
            version.trim()
        );
    }
    let tmp = dir.join("kube-apiserver.tmp");
    std::fs::copy(&built, &tmp).with_context(|| format!("copying {}", built.display()))?;
    std::fs::rename(&tmp, bin).with_context(|| format!("installing {}", bin.display()))?;
    if std::env::var("KUBE_APISERVER_KEEP_BUILD").is_ok_and(|v| v == "1") {
        progress(&format!("kept the build tree {}", work.display()));
    } else if let Err(e) = std::fs::remove_dir_all(&work) {
        progress(&format!("could not remove {}: {e}", work.display()));
    }
    Ok(())
}

/// The unpacked source tree `kubernetes-<version>` in `work`, checked to be of
/// [`KUBE_VERSION`] (Debian's version reads `1.20.5+really1.20.2`).
fn source_tree(work: &Path) -> Result<PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(work).with_context(|| format!("listing {}", work.display()))? {
        let path = entry?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if path.is_dir() && name.starts_with("kubernetes-") {
            if name.ends_with(KUBE_VERSION) {
                return Ok(path);
            }
            found.push(name);
        }
    }
    bail!(
        "apt-get source unpacked no kubernetes-*{KUBE_VERSION} tree in {} (found: {:?}); \
         this release's Debian source package carries another Kubernetes version",
        work.display(),
        found
    )
}

/// Replaces the Go sources of the vendored reflect2 with Debian's 1.0.2 ([`REFLECT2`]).
fn replace_reflect2(tree: &Path) -> Result<()> {
    let vendored = tree.join("vendor/github.com/modern-go/reflect2");
    let is_source = |p: &Path| p.extension().is_some_and(|e| e == "go" || e == "s");
    let packaged = Path::new(REFLECT2);
    if !packaged.join("go_above_118.go").is_file() {
        bail!(
            "{REFLECT2} is not reflect2 1.0.2 or newer (golang-github-modern-go-reflect2-dev); \
             a kube-apiserver built with the vendored 1.0.1 crashes under Go 1.18+"
        );
    }
    for entry in
        std::fs::read_dir(&vendored).with_context(|| format!("listing {}", vendored.display()))?
    {
        let path = entry?.path();
        if is_source(&path) {
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
    }
    for entry in
        std::fs::read_dir(packaged).with_context(|| format!("listing {}", packaged.display()))?
    {
        let path = entry?.path();
        if let (true, Some(name)) = (is_source(&path), path.file_name()) {
            std::fs::copy(&path, vendored.join(name))
                .with_context(|| format!("copying {}", path.display()))?;
        }
    }
    Ok(())
}

/// Replaces the one line `from` of `path` with `to`; fails when `from` is not there (the source
/// is then not the one these fixes were made for).
fn patch_line(path: &Path, (from, to): (&str, &str)) -> Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    if text.lines().filter(|l| *l == from).count() != 1 {
        bail!(
            "{} does not contain exactly one line {from:?}",
            path.display()
        );
    }
    let patched: Vec<&str> = text
        .lines()
        .map(|l| if l == from { to } else { l })
        .collect();
    std::fs::write(path, patched.join("\n") + "\n")
        .with_context(|| format!("writing {}", path.display()))
}

/// Runs the upstream build of kube-apiserver alone, its output to `log_path`, printing the
/// build's own progress lines and the elapsed time every minute.
fn make_apiserver(tree: &Path, work: &Path, log_path: &Path) -> Result<()> {
    let log = File::create(log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let log2 = log.try_clone()?;
    let started = Instant::now();
    let mut child = Command::new("nice")
        .args(["-n", "10", "make", "WHAT=cmd/kube-apiserver"])
        .current_dir(tree)
        .env("GOPATH", work.join("gopath"))
        .env("GOCACHE", work.join("gocache"))
        .env("GOFLAGS", "-mod=vendor")
        .env("CGO_ENABLED", "0")
        .env_remove("GOROOT")
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .spawn()
        .context("starting make (is `make` installed?)")?;
    let mut reader =
        File::open(log_path).with_context(|| format!("reading {}", log_path.display()))?;
    let mut offset = 0u64;
    let mut last_tick = Instant::now();
    let status = loop {
        let status = child.try_wait().context("waiting for make")?;
        // Echo the build's own progress lines ("Building go targets ...").
        let mut new = String::new();
        reader.seek(SeekFrom::Start(offset))?;
        reader.read_to_string(&mut new)?;
        if let Some(end) = new.rfind('\n') {
            for line in new[..end].lines().filter(|l| !l.trim().is_empty()) {
                progress(&format!("  build: {}", line.trim()));
            }
            offset += end as u64 + 1;
        }
        if let Some(status) = status {
            break status;
        }
        if last_tick.elapsed() >= Duration::from_secs(60) {
            last_tick = Instant::now();
            progress(&format!(
                "  still compiling kube-apiserver ({} elapsed)",
                minutes(started.elapsed())
            ));
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    if !status.success() {
        bail!(
            "make WHAT=cmd/kube-apiserver failed ({status}); last lines of {}:\n{}",
            log_path.display(),
            crate::tail_file(log_path, 30)
        );
    }
    Ok(())
}

/// A private apt configuration with one `deb-src` entry: the machine's own mirror for its
/// release's `main` component.
struct AptSource {
    options: Vec<String>,
}

impl AptSource {
    fn new(dir: &Path) -> Result<AptSource> {
        let codename = os_codename()?;
        let entry = find_release_entry(&codename)?;
        let parts = dir.join("sources.list.d");
        let lists = dir.join("lists");
        let cache = dir.join("cache");
        for d in [
            &parts,
            &lists.join("partial"),
            &cache.join("archives/partial"),
        ] {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        let mut sources = format!(
            "Types: deb-src\nURIs: {}\nSuites: {codename}\nComponents: main\n",
            entry.uri
        );
        if let Some(signed_by) = &entry.signed_by {
            sources.push_str(&format!("Signed-By: {signed_by}\n"));
        }
        let path = parts.join("kubernetes-source.sources");
        std::fs::write(&path, sources).with_context(|| format!("writing {}", path.display()))?;
        let options = [
            "Dir::Etc::SourceList=/dev/null".to_string(),
            format!("Dir::Etc::SourceParts={}", parts.display()),
            format!("Dir::State::Lists={}", lists.display()),
            format!("Dir::Cache={}", cache.display()),
            // The lists and the source land in root's cache directory, which apt's
            // unprivileged download user cannot write.
            "APT::Sandbox::User=root".to_string(),
            "APT::Get::Only-Source=true".to_string(),
        ];
        Ok(AptSource {
            options: options.to_vec(),
        })
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("apt-get");
        for o in &self.options {
            cmd.args(["-o", o]);
        }
        cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        cmd
    }

    fn run(&self, args: &[&str]) -> Result<()> {
        run_quiet(&mut self.command(args))
    }
}

/// Runs `cmd`, showing its output only when it fails.
fn run_quiet(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn os_codename() -> Result<String> {
    let text = std::fs::read_to_string("/etc/os-release").context("reading /etc/os-release")?;
    text.lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|v| v.trim().trim_matches('"').to_string())
        .filter(|v| !v.is_empty())
        .context("/etc/os-release has no VERSION_CODENAME (building needs Debian)")
}

/// One apt source entry: where the release's packages come from and the keyring they are
/// signed with (deb822 `Signed-By`, possibly several lines).
#[derive(Debug, PartialEq)]
struct Entry {
    uri: String,
    signed_by: Option<String>,
}

/// The first enabled entry of the machine's apt sources that serves `codename`'s `main`.
fn find_release_entry(codename: &str) -> Result<Entry> {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = dir.filter_map(|e| e.ok().map(|e| e.path())).collect();
        more.sort();
        files.extend(more);
    }
    for file in &files {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        let name = file.to_string_lossy();
        let found = if name.ends_with(".sources") {
            parse_deb822(&text, codename)
        } else if name.ends_with(".list") {
            parse_one_line(&text, codename)
        } else {
            None
        };
        if let Some(entry) = found {
            return Ok(entry);
        }
    }
    bail!(
        "no apt source for `{codename}` `main` in /etc/apt/sources.list or \
         /etc/apt/sources.list.d (needed for a deb-src entry to fetch the kubernetes source)"
    )
}

/// `deb [signed-by=...] URI SUITE COMPONENT...` lines.
fn parse_one_line(text: &str, codename: &str) -> Option<Entry> {
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let Some(rest) = line
            .strip_prefix("deb-src ")
            .or_else(|| line.strip_prefix("deb "))
        else {
            continue;
        };
        let rest = rest.trim_start();
        let (options, rest) = match rest.strip_prefix('[') {
            Some(r) => match r.split_once(']') {
                Some((o, r)) => (o, r),
                None => continue,
            },
            None => ("", rest),
        };
        let mut words = rest.split_whitespace();
        let (Some(uri), Some(suite)) = (words.next(), words.next()) else {
            continue;
        };
        if suite != codename || !words.any(|c| c == "main") {
            continue;
        }
        let signed_by = options
            .split_whitespace()
            .find_map(|o| o.strip_prefix("signed-by="))
            .map(str::to_string);
        return Some(Entry {
            uri: uri.to_string(),
            signed_by,
        });
    }
    None
}

/// deb822 stanzas (`Types:`, `URIs:`, `Suites:`, `Components:`, `Signed-By:`, `Enabled:`).
fn parse_deb822(text: &str, codename: &str) -> Option<Entry> {
    let mut stanza: Vec<(String, String)> = Vec::new();
    let mut stanzas = Vec::new();
    for line in text.lines().chain(std::iter::once("")) {
        if line.starts_with('#') {
            continue;
        }
        if line.trim().is_empty() {
            if !stanza.is_empty() {
                stanzas.push(std::mem::take(&mut stanza));
            }
            continue;
        }
        if line.starts_with([' ', '\t']) {
            // A continuation line (multi-line Signed-By with an embedded key).
            if let Some((_, value)) = stanza.last_mut() {
                value.push('\n');
                value.push_str(line);
            }
            continue;
        }
        if let Some((k, v)) = line.split_once(':') {
            stanza.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    for s in stanzas {
        let get = |k: &str| {
            s.iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
                .unwrap_or("")
        };
        let has = |k: &str, want: &str| get(k).split_whitespace().any(|w| w == want);
        if get("enabled").eq_ignore_ascii_case("no")
            || !(has("types", "deb") || has("types", "deb-src"))
            || !has("suites", codename)
            || !has("components", "main")
        {
            continue;
        }
        let Some(uri) = get("uris").split_whitespace().next() else {
            continue;
        };
        let signed_by = Some(get("signed-by"))
            .filter(|v| !v.is_empty())
            .map(str::to_string);
        return Some(Entry {
            uri: uri.to_string(),
            signed_by,
        });
    }
    None
}

/// Installs whichever of `packages` dpkg does not report as installed.
fn apt_install(packages: &[&str]) -> Result<()> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f", "${Package} ${Status}\\n"])
        .args(packages)
        .output()
        .context("running dpkg-query (building kube-apiserver needs Debian)")?;
    let listed = String::from_utf8_lossy(&out.stdout);
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            !listed.lines().any(|l| {
                l.split_whitespace().next() == Some(*p) && l.ends_with("install ok installed")
            })
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    progress(&format!("installing build packages: {}", missing.join(" ")));
    let install = || {
        run_quiet(
            Command::new("apt-get")
                .args(["-o", "DPkg::Lock::Timeout=300", "install", "-y"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
    };
    if install().is_err() {
        run_quiet(
            Command::new("apt-get")
                .args(["-o", "DPkg::Lock::Timeout=300", "update"])
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
        install()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_sources() {
        let text = "# comment\n\
                    deb http://mirror.example/debian bookworm-updates main\n\
                    deb [arch=amd64 signed-by=/k.gpg] http://mirror.example/debian bookworm main contrib\n";
        assert_eq!(
            parse_one_line(text, "bookworm"),
            Some(Entry {
                uri: "http://mirror.example/debian".into(),
                signed_by: Some("/k.gpg".into()),
            })
        );
        assert_eq!(parse_one_line(text, "trixie"), None);
    }

    #[test]
    fn deb822_sources() {
        let text = "Types: deb\n\
                    URIs: http://mirror.example/debian-security\n\
                    Suites: bookworm-security\n\
                    Components: main\n\
                    \n\
                    Types: deb\n\
                    # a comment inside a stanza\n\
                    URIs: http://mirror.example/debian\n\
                    Suites: bookworm bookworm-updates\n\
                    Components: main\n\
                    Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n";
        assert_eq!(
            parse_deb822(text, "bookworm"),
            Some(Entry {
                uri: "http://mirror.example/debian".into(),
                signed_by: Some("/usr/share/keyrings/debian-archive-keyring.gpg".into()),
            })
        );
        let disabled = text.replace("Types: deb\n#", "Enabled: no\nTypes: deb\n#");
        assert_eq!(parse_deb822(&disabled, "bookworm"), None);
    }
}
