//! Durations, sizes and rates as scenario files write them.

use super::file::SizeDef;

/// The longest duration a scenario may give: 100 years. Scenario times are added to each
/// other and to a calendar date; with this bound no sum can overflow.
pub const MAX_DURATION_MS: u64 = 100 * 365 * 86_400_000;

/// Parse `"250ms"`, `"10s"`, `"5m"`, `"2h"`, `"30d"` into milliseconds, at most
/// [`MAX_DURATION_MS`].
pub fn parse_duration(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a duration like 250ms, 10s, 5m, 2h or 30d"))?;
    let mult = match unit.trim() {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(format!("'{s}': unit must be ms, s, m, h or d")),
    };
    n.checked_mul(mult)
        .filter(|&ms| ms <= MAX_DURATION_MS)
        .ok_or_else(|| {
            format!("'{s}' is longer than 100 years (36500d), the most a scenario may give")
        })
}

/// Parse `4096`, `"256KiB"`, `"1MiB"`, `"64KB"` (KB = 1000) into bytes.
pub(super) fn parse_size(v: &SizeDef) -> Result<u64, String> {
    match v {
        SizeDef::Bytes(n) => Ok(*n),
        SizeDef::Text(s) => {
            let t = s.trim();
            let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
            let (num, unit) = t.split_at(split);
            let n: u64 = num
                .parse()
                .map_err(|_| format!("'{s}' is not a size like 4096, 256KiB or 1MiB"))?;
            let mult = match unit.trim() {
                "" | "B" => 1,
                "KiB" => 1024,
                "MiB" => 1024 * 1024,
                "KB" | "kB" => 1000,
                "MB" => 1_000_000,
                _ => return Err(format!("'{s}': unit must be B, KiB, MiB, KB or MB")),
            };
            n.checked_mul(mult)
                .ok_or_else(|| format!("'{s}' is too large"))
        }
    }
}

/// A rate such as `32768`, `"32 KiB/s"`, `"1.5 MB/s"` or `"800 B/s"`, in bytes per second.
pub fn parse_rate(v: &toml::Value) -> Result<u32, String> {
    let bad = || {
        format!("throttle = {v} is not a rate: give bytes per second (32768) or a string like \"32 KiB/s\", \"1 MB/s\"")
    };
    let bps = match v {
        toml::Value::Integer(n) => *n as f64,
        toml::Value::String(s) => {
            let s = s.trim();
            let s = s.strip_suffix("/s").ok_or_else(bad)?.trim_end();
            let split = s
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .unwrap_or(s.len());
            let (num, unit) = s.split_at(split);
            let n: f64 = num.parse().map_err(|_| bad())?;
            let mult = match unit.trim() {
                "B" | "" => 1.0,
                "kB" | "KB" => 1e3,
                "KiB" => 1024.0,
                "MB" => 1e6,
                "MiB" => 1024.0 * 1024.0,
                _ => return Err(bad()),
            };
            n * mult
        }
        _ => return Err(bad()),
    };
    if !(1.0..=u32::MAX as f64).contains(&bps) {
        return Err(format!("throttle = {v} must be between 1 B/s and 4 GB/s"));
    }
    Ok(bps as u32)
}
