//! Parsers for the value syntaxes: durations, rates, addresses.
//!
//! Each returns the whole one-line explanation on failure (without the file
//! and key, which the caller adds), so that the same words appear whether
//! the value had the wrong TOML type or the wrong text.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::time::Duration;

/// What a duration looks like, for error messages.
pub(crate) const DURATION: &str = "a duration like \"10s\" or \"500ms\"";
/// What a rate looks like, for error messages.
pub(crate) const RATE: &str = "a rate like \"100MiB\" or \"250K\"";
/// What a replication address looks like, for error messages.
pub(crate) const HOST_PORT: &str = "HOST:PORT (e.g. \"10.0.0.1:7789\" or \"[::1]:7789\")";
/// What an NBD listen address looks like, for error messages.
pub(crate) const NBD: &str = "HOST:PORT (e.g. \"127.0.0.1:10809\") or \"unix:/ABSOLUTE/PATH\"";

/// The longest duration accepted: a timer set beyond a week is a typo, and
/// the limit keeps every value far from `Duration` and `Instant` overflow.
const MAX_DURATION_MS: u64 = 7 * 24 * 3_600_000;

/// `"10s"`, `"500ms"`, `"2m"`, `"1h"`: a positive whole number and a unit
/// (`ms`, `s`, `m` or `min`, `h`), at most a week.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let expected = || format!("expected {DURATION}, found {s:?}");
    let (n, unit) = number_and_unit(s).ok_or_else(expected)?;
    let ms_per = match unit {
        "ms" => 1,
        "s" => 1000,
        "m" | "min" => 60_000,
        "h" => 3_600_000,
        _ => return Err(expected()),
    };
    let too_long = || format!("must be at most a week (\"168h\"), found {s:?}");
    match n {
        Some(0) => Err(format!("must be longer than zero, found {s:?}")),
        Some(n) => n
            .checked_mul(ms_per)
            .filter(|ms| *ms <= MAX_DURATION_MS)
            .map(Duration::from_millis)
            .ok_or_else(too_long),
        None => Err(too_long()),
    }
}

/// A rate in bytes per second: `"100MiB"`, `"250K"`, `"1G"` (binary units,
/// K = KiB as in DRBD), or a plain number of bytes (`"4096"`).
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let expected = || format!("expected {RATE}, found {s:?}");
    let (n, unit) = number_and_unit(s).ok_or_else(expected)?;
    let shift = match unit {
        "" | "B" => 0,
        "K" | "k" | "KiB" => 10,
        "M" | "MiB" => 20,
        "G" | "GiB" => 30,
        "T" | "TiB" => 40,
        _ => return Err(expected()),
    };
    let too_large = || format!("must be less than 16 EiB per second, found {s:?}");
    match n {
        Some(0) => Err(format!("must be more than zero, found {s:?}")),
        Some(n) => n.checked_mul(1 << shift).ok_or_else(too_large),
        None => Err(too_large()),
    }
}

/// Split `" 10 ms "` into `(Some(10), "ms")`: ASCII digits, then the unit,
/// with blanks allowed around both. `None` without digits; `(None, unit)`
/// for a number beyond u64.
fn number_and_unit(s: &str) -> Option<(Option<u64>, &str)> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return None;
    }
    // Digits only, so the parse fails only on overflow.
    Some((num.parse().ok(), unit.trim_start()))
}

/// A TCP endpoint, normalised so that two spellings of one address compare
/// equal (`"[::1]:7789"` and `"[0:0::1]:7789"`, `"Node-A:1"` and `"node-a:1"`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct HostPort {
    /// An IP address in canonical form, or a lower-case host name.
    pub host: String,
    /// 1 to 65535.
    pub port: u16,
}

/// `host:port` or `[v6]:port`, port 1..=65535. A host name is dot-separated
/// labels of letters, digits, `-` and `_`; an all-numeric name must be a
/// valid IPv4 address (so `"999.0.0.1"` is caught here, not at connect).
pub(crate) fn parse_host_port(s: &str) -> Result<HostPort, String> {
    let expected = || format!("expected {HOST_PORT}, found {s:?}");
    let (host, port) = s.rsplit_once(':').ok_or_else(expected)?;
    let port = match port.parse::<u16>() {
        Ok(p) if p > 0 && port.bytes().all(|b| b.is_ascii_digit()) => p,
        _ => return Err(expected()),
    };
    let host = if let Some(inner) = host.strip_prefix('[') {
        let v6: Ipv6Addr = inner
            .strip_suffix(']')
            .and_then(|h| h.parse().ok())
            .ok_or_else(expected)?;
        IpAddr::V6(v6).to_string()
    } else if let Ok(v4) = host.parse::<Ipv4Addr>() {
        IpAddr::V4(v4).to_string()
    } else {
        let labels_ok = host.split('.').all(|l| {
            !l.is_empty()
                && !l.starts_with('-')
                && l.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
        });
        let numeric = host.chars().all(|c| c.is_ascii_digit() || c == '.');
        if host.is_empty() || !labels_ok || numeric {
            return Err(expected());
        }
        host.to_ascii_lowercase()
    };
    Ok(HostPort { host, port })
}

/// The longest Unix socket path: `sun_path` is 108 bytes with the NUL.
const MAX_UNIX_PATH: usize = 107;

/// An NBD listen address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Listen {
    /// TCP.
    Tcp(HostPort),
    /// A Unix socket.
    Unix(PathBuf),
}

/// `host:port` or `unix:/absolute/path` (the syntax of
/// `tandem_nbd::ListenAddr::parse`, stricter: port 0 and relative socket
/// paths are refused because they make no sense in a shared file).
pub(crate) fn parse_listen(s: &str) -> Result<Listen, String> {
    match s.strip_prefix("unix:") {
        Some(p) if !p.starts_with('/') => Err(format!("expected {NBD}, found {s:?}")),
        Some(p) if p.len() > MAX_UNIX_PATH => Err(format!(
            "a Unix socket path has at most {MAX_UNIX_PATH} bytes, found {} in {s:?}",
            p.len()
        )),
        Some(p) => Ok(Listen::Unix(PathBuf::from(p))),
        None => parse_host_port(s)
            .map(Listen::Tcp)
            .map_err(|_| format!("expected {NBD}, found {s:?}")),
    }
}
