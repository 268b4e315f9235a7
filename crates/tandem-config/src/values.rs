//! Parsers for the value syntaxes: durations, rates, addresses.

use std::time::Duration;

/// `"10s"`, `"500ms"`, `"2m"`, `"1h"`: a positive whole number and a unit.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let expected = || format!("expected a duration like \"10s\" or \"500ms\", found {s:?}");
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| expected())?;
    let ms_per = match unit.trim() {
        "ms" => 1,
        "s" => 1000,
        "m" | "min" => 60_000,
        "h" => 3_600_000,
        _ => return Err(expected()),
    };
    if n == 0 {
        return Err(format!("must be longer than zero, found {s:?}"));
    }
    let ms = n
        .checked_mul(ms_per)
        .filter(|ms| *ms <= 7 * 24 * 3_600_000)
        .ok_or_else(|| format!("{s:?} is longer than a week"))?;
    Ok(Duration::from_millis(ms))
}

/// A rate in bytes per second: `"100MiB"`, `"250K"`, `"1G"` (binary units;
/// K = KiB), or a plain number of bytes.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let expected = || format!("expected a rate like \"100MiB\" or \"250K\", found {s:?}");
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| expected())?;
    let shift = match unit.trim() {
        "" | "B" => 0,
        "K" | "KiB" | "k" => 10,
        "M" | "MiB" => 20,
        "G" | "GiB" => 30,
        "T" | "TiB" => 40,
        _ => return Err(expected()),
    };
    if n == 0 {
        return Err(format!("must be more than zero, found {s:?}"));
    }
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// `host:port` or `[v6]:port`, port 1..=65535.
pub fn check_host_port(s: &str) -> Result<(), String> {
    let expected =
        || format!("expected HOST:PORT (e.g. \"10.0.0.1:7789\" or \"[::1]:7789\"), found {s:?}");
    let (host, port) = s.rsplit_once(':').ok_or_else(expected)?;
    let host_ok = if let Some(inner) = host.strip_prefix('[') {
        inner
            .strip_suffix(']')
            .is_some_and(|h| h.parse::<std::net::Ipv6Addr>().is_ok())
    } else {
        !host.is_empty()
            && !host.contains(':')
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
    };
    match port.parse::<u16>() {
        Ok(p) if p > 0 && host_ok => Ok(()),
        _ => Err(expected()),
    }
}
