//! Release versions as the classic manifest writes them (`1.0.0.2`),
//! compared numerically part by part.

use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;

/// A dotted numeric version. Missing trailing parts count as zero, so
/// `1.2` equals `1.2.0`, and `1.0.10.0` is newer than `1.0.9.9`.
#[derive(Clone)]
pub struct Version {
    parts: Vec<u64>,
    text: String,
}

impl Version {
    /// The numeric parts, most significant first.
    pub fn parts(&self) -> &[u64] {
        &self.parts
    }

    /// The version as it was written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The parts with trailing zeros removed: the value that orders and
    /// compares.
    fn significant(&self) -> &[u64] {
        let len = self
            .parts
            .iter()
            .rposition(|&p| p != 0)
            .map_or(0, |i| i + 1);
        &self.parts[..len]
    }
}

/// Why a string is not a version.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VersionParseError {
    #[error("empty version")]
    Empty,
    #[error("part {part:?} is not a whole number (versions look like 1.0.0.2)")]
    NotNumeric { part: String },
}

impl FromStr for Version {
    type Err = VersionParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let text = s.trim();
        if text.is_empty() {
            return Err(VersionParseError::Empty);
        }
        let parts = text
            .split('.')
            .map(|p| {
                if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(VersionParseError::NotNumeric { part: p.to_owned() });
                }
                p.parse::<u64>()
                    .map_err(|_| VersionParseError::NotNumeric { part: p.to_owned() })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Version {
            parts,
            text: text.to_owned(),
        })
    }
}

impl PartialEq for Version {
    fn eq(&self, other: &Self) -> bool {
        self.significant() == other.significant()
    }
}

impl Eq for Version {}

impl Ord for Version {
    fn cmp(&self, other: &Self) -> Ordering {
        self.significant().cmp(other.significant())
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Version({})", self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Version {
        s.parse().expect("valid version")
    }

    #[test]
    fn compares_numerically_part_by_part() {
        assert!(v("1.0.10.0") > v("1.0.9.9"));
        assert!(v("2") > v("1.99.99"));
        assert!(v("1.0.0.2") > v("1.0.0.1"));
        assert_eq!(v("1.2"), v("1.2.0.0"));
        assert!(v("1.2.0.1") > v("1.2"));
    }

    #[test]
    fn rejects_non_numeric_parts() {
        assert_eq!(
            "1.a".parse::<Version>().map_err(|e| e.to_string()),
            Err("part \"a\" is not a whole number (versions look like 1.0.0.2)".into())
        );
        assert!("1..2".parse::<Version>().is_err());
        assert!("".parse::<Version>().is_err());
        assert!("-1".parse::<Version>().is_err());
    }
}
