//! Byte sizes and transfer rates as operators write them: `64MiB`, `2MiB`
//! (bytes per second), `16mbit` (bits per second).

use std::fmt;

/// Why a size or rate could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{input:?}: {reason}")]
pub struct UnitParseError {
    input: String,
    reason: &'static str,
}

/// Parses a byte count: a number with an optional unit, `B`, `k`/`KB`
/// (1000), `KiB` (1024), `M`/`MB`, `MiB`, `G`/`GB`, `GiB`, `T`/`TB`, `TiB`.
/// Units are case-insensitive.
pub fn parse_size(input: &str) -> Result<u64, UnitParseError> {
    let (value, unit) = split_number(input)?;
    let mult: f64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "kib" => 1024.0,
        "m" | "mb" => 1e6,
        "mib" => 1024.0 * 1024.0,
        "g" | "gb" => 1e9,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "t" | "tb" => 1e12,
        "tib" => 1024f64.powi(4),
        _ => {
            return Err(err(
                input,
                "unknown unit (use B, KiB, MiB, GiB, KB, MB, GB)",
            ))
        }
    };
    to_u64(input, value * mult)
}

/// A transfer rate in bytes per second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    bytes_per_sec: u64,
}

impl Rate {
    /// A rate of `bytes_per_sec` bytes per second.
    pub fn from_bytes_per_sec(bytes_per_sec: u64) -> Self {
        Rate { bytes_per_sec }
    }

    /// Bytes per second.
    pub fn bytes_per_sec(self) -> u64 {
        self.bytes_per_sec
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.bytes_per_sec as f64;
        write!(
            f,
            "{:.2} MiB/s ({:.1} Mbit/s)",
            b / 1048576.0,
            b * 8.0 / 1e6
        )
    }
}

impl std::str::FromStr for Rate {
    type Err = UnitParseError;

    /// Parses `2MiB`, `500KB`, `1000000` (bytes per second; `/s` may follow)
    /// or `16mbit`, `512kbit`, `1gbit`, `8bit` (bits per second, decimal).
    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let trimmed = input.trim();
        let trimmed = trimmed.strip_suffix("/s").unwrap_or(trimmed);
        // `16mbps` is megabits per second.
        let bits_per_sec;
        let trimmed = match trimmed.to_ascii_lowercase().strip_suffix("bps") {
            Some(prefix) => {
                bits_per_sec = format!("{prefix}bit");
                bits_per_sec.as_str()
            }
            None => trimmed,
        };
        let (value, unit) = split_number(trimmed).map_err(|e| UnitParseError {
            input: input.to_owned(),
            reason: e.reason,
        })?;
        let lower = unit.to_ascii_lowercase();
        let bytes = if let Some(prefix) = lower.strip_suffix("bit") {
            let mult = match prefix {
                "" => 1.0,
                "k" => 1e3,
                "m" => 1e6,
                "g" => 1e9,
                "ki" => 1024.0,
                "mi" => 1048576.0,
                "gi" => 1073741824.0,
                _ => return Err(err(input, "unknown bit unit (use bit, kbit, mbit, gbit)")),
            };
            value * mult / 8.0
        } else {
            parse_size(trimmed)
                .map_err(|e| UnitParseError {
                    input: input.to_owned(),
                    reason: e.reason,
                })
                .map(|b| b as f64)?
        };
        let bytes_per_sec = to_u64(input, bytes)?;
        if bytes_per_sec == 0 {
            return Err(err(input, "a rate must be above zero"));
        }
        Ok(Rate { bytes_per_sec })
    }
}

fn split_number(input: &str) -> Result<(f64, &str), UnitParseError> {
    let s = input.trim();
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(end);
    if num.is_empty() {
        return Err(err(input, "expected a number, such as 16mbit or 2MiB"));
    }
    let value: f64 = num
        .parse()
        .map_err(|_| err(input, "expected a number, such as 16mbit or 2MiB"))?;
    Ok((value, unit.trim()))
}

fn to_u64(input: &str, value: f64) -> Result<u64, UnitParseError> {
    if !value.is_finite() || value < 0.0 || value > u64::MAX as f64 {
        return Err(err(input, "out of range"));
    }
    Ok(value.round() as u64)
}

fn err(input: &str, reason: &'static str) -> UnitParseError {
    UnitParseError {
        input: input.to_owned(),
        reason,
    }
}

/// A byte count for people: `52.4 MiB`.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(s: &str) -> u64 {
        s.parse::<Rate>().expect("valid rate").bytes_per_sec()
    }

    #[test]
    fn rates_in_bytes_and_bits() {
        assert_eq!(rate("2MiB"), 2 * 1024 * 1024);
        assert_eq!(rate("2MiB/s"), 2 * 1024 * 1024);
        assert_eq!(rate("16mbit"), 2_000_000);
        assert_eq!(rate("16Mbit"), 2_000_000);
        assert_eq!(rate("16mbps"), 2_000_000);
        assert_eq!(rate("512kbit"), 64_000);
        assert_eq!(rate("1000"), 1000);
        assert_eq!(rate("1.5MB"), 1_500_000);
    }

    #[test]
    fn bad_rates_name_the_input() {
        let e = "fast".parse::<Rate>().expect_err("not a rate").to_string();
        assert!(e.contains("\"fast\""), "{e}");
        assert!("16furlongs".parse::<Rate>().is_err());
        assert!("0".parse::<Rate>().is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("10kb"), Ok(10_000));
        assert_eq!(parse_size("17"), Ok(17));
        assert!(parse_size("MiB").is_err());
    }
}
