//! The value types of settings. Each parses from the form an operator writes (a flag, an
//! environment variable, a value in the config file: clap runs the same `FromStr` for all
//! three) and prints back in that form, which is how `--help` shows the defaults and how clap
//! hands a default back to the parser. `to_string` then `parse` gives the same value.
//!
//! A parse error says what was expected, not which setting or value it was: the caller adds
//! those (`invalid setting --X (env ZTUNNEL_X, config key `X`): `value`: …`).

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

/// A non-zero duration, written `<n>ms`, `<n>s`, `<n>m` or `<n>h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dur(pub Duration);

impl Dur {
    /// `n` milliseconds.
    pub const fn millis(n: u64) -> Dur {
        Dur(Duration::from_millis(n))
    }

    /// `n` seconds.
    pub const fn secs(n: u64) -> Dur {
        Dur(Duration::from_secs(n))
    }

    /// `n` hours.
    pub const fn hours(n: u64) -> Dur {
        Dur(Duration::from_secs(n * 3600))
    }
}

impl FromStr for Dur {
    type Err = String;

    fn from_str(v: &str) -> Result<Dur, String> {
        let parsed = || {
            let split = v.find(|c: char| !c.is_ascii_digit())?;
            let (num, unit) = v.split_at(split);
            let n: u64 = num.parse().ok()?;
            let d = match unit {
                "ms" => Duration::from_millis(n),
                "s" => Duration::from_secs(n),
                "m" => Duration::from_secs(n.checked_mul(60)?),
                "h" => Duration::from_secs(n.checked_mul(3600)?),
                _ => return None,
            };
            (!d.is_zero()).then_some(Dur(d))
        };
        parsed().ok_or_else(|| "expected a duration such as 500ms, 30s, 5m or 24h".into())
    }
}

/// The largest unit that divides the duration exactly: `500ms`, `30s`, `1m`, `24h`.
impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        for (unit, per) in [("h", 3_600_000), ("m", 60_000), ("s", 1000)] {
            if ms >= per && ms.is_multiple_of(per) {
                return write!(f, "{}{unit}", ms / per);
            }
        }
        write!(f, "{ms}ms")
    }
}

/// A size in bytes, written as a number of bytes or a whole number of KiB or MiB, up to 2^31 - 1
/// bytes (the most socket options and HTTP/2 windows take). In the config file it may also be a
/// plain YAML number (bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Size(pub u32);

const KIB: u32 = 1024;
const MIB: u32 = 1024 * 1024;

impl Size {
    /// `n` KiB.
    pub const fn kib(n: u32) -> Size {
        Size(n * KIB)
    }

    /// `n` MiB.
    pub const fn mib(n: u32) -> Size {
        Size(n * MIB)
    }
}

impl FromStr for Size {
    type Err = String;

    fn from_str(v: &str) -> Result<Size, String> {
        let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
        let (num, unit) = v.split_at(split);
        let scale: Option<u64> = match unit {
            "" => Some(1),
            "KiB" => Some(KIB.into()),
            "MiB" => Some(MIB.into()),
            _ => None,
        };
        match scale.and_then(|k| num.parse::<u64>().ok()?.checked_mul(k)) {
            Some(b) if b <= i32::MAX as u64 => Ok(Size(b as u32)),
            _ => {
                Err("expected a size up to 2047MiB, in bytes or with KiB or MiB (e.g. 4MiB)".into())
            }
        }
    }
}

/// `8MiB`, `128KiB`, or bytes when neither divides it.
impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            b if b != 0 && b.is_multiple_of(MIB) => write!(f, "{}MiB", b / MIB),
            b if b != 0 && b.is_multiple_of(KIB) => write!(f, "{}KiB", b / KIB),
            b => write!(f, "{b}"),
        }
    }
}

/// A non-zero packet or socket mark, hex (`0x539`) or decimal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mark(pub u32);

impl FromStr for Mark {
    type Err = String;

    fn from_str(v: &str) -> Result<Mark, String> {
        let parsed = match v.strip_prefix("0x") {
            Some(hex) => u32::from_str_radix(hex, 16),
            None => v.parse(),
        };
        match parsed {
            Ok(0) | Err(_) => Err("expected a non-zero mark such as 0x539".into()),
            Ok(m) => Ok(Mark(m)),
        }
    }
}

/// Hex: `0x539`.
impl fmt::Display for Mark {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// A TCP congestion control algorithm as the kernel names it (`TCP_CONGESTION`, at most 15
/// bytes), or `default`: the node's (`None`). Whether the kernel has it is checked before
/// binding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Congestion(pub Option<String>);

impl Congestion {
    /// The algorithm `name` (not checked here; a default that does not parse fails every start).
    pub fn named(name: &str) -> Congestion {
        Congestion(Some(name.into()))
    }
}

impl FromStr for Congestion {
    type Err = String;

    fn from_str(v: &str) -> Result<Congestion, String> {
        if v == "default" {
            return Ok(Congestion(None));
        }
        let valid = !v.is_empty()
            && v.len() < 16
            && v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !valid {
            return Err(
                "not a congestion control name (e.g. cubic, bbr, reno) or `default`".into(),
            );
        }
        Ok(Congestion::named(v))
    }
}

impl fmt::Display for Congestion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.as_deref().unwrap_or("default"))
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, the event's fields at the top level.
    Json,
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(v: &str) -> Result<LogFormat, String> {
        match v {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err("expected `text` or `json`".into()),
        }
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        })
    }
}

/// `--source`: which state source the daemon follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    /// Kubernetes YAML files (`--state`).
    File,
    /// The Kubernetes API server.
    Kube,
}

impl FromStr for SourceKind {
    type Err = String;

    fn from_str(v: &str) -> Result<SourceKind, String> {
        match v {
            "file" => Ok(SourceKind::File),
            "kube" => Ok(SourceKind::Kube),
            _ => Err("expected `file` or `kube`".into()),
        }
    }
}

impl fmt::Display for SourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SourceKind::File => "file",
            SourceKind::Kube => "kube",
        })
    }
}

/// An upstream DNS server: `ip` (port 53) or `ip:port`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Upstream(pub SocketAddr);

impl FromStr for Upstream {
    type Err = String;

    fn from_str(v: &str) -> Result<Upstream, String> {
        v.parse::<SocketAddr>()
            .or_else(|_| v.parse::<IpAddr>().map(|ip| (ip, 53).into()))
            .map(Upstream)
            .map_err(|_| "expected an IP address or ip:port".into())
    }
}

/// `ip` for port 53, else `ip:port`.
impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.port() {
            53 => write!(f, "{}", self.0.ip()),
            _ => write!(f, "{}", self.0),
        }
    }
}
