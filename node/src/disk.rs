//! The disk guard: before a node fetches a release it checks that the
//! filesystems involved have room for it (the new chunks and the staged
//! copy under the state directory, the apply's copy beside the install
//! directory), keeping a reserve free, so that a release never fills the
//! disk of a production machine. A release that cannot fit is refused with
//! both numbers, before anything is downloaded.

use std::path::{Path, PathBuf};

use lanup_protocol::units::format_bytes;

/// Space a release needs on the filesystem holding `path`.
#[derive(Debug, Clone)]
pub struct Need {
    pub path: PathBuf,
    pub bytes: u64,
    /// What the bytes are for, for the message ("new chunks").
    pub what: &'static str,
}

/// The free space a release may not use: 5% of the filesystem, at most
/// 1 GiB, so the machine's own programs keep room to work.
pub fn reserve(total: u64) -> u64 {
    (total / 20).min(1 << 30)
}

/// Free and total bytes of the filesystem holding `path` (or its nearest
/// existing parent), as an unprivileged process may use them.
fn space(path: &Path) -> std::io::Result<(u64, u64, u64)> {
    let mut at = path;
    while !at.exists() {
        at = at.parent().unwrap_or(Path::new("/"));
    }
    let space = crate::platform::space(at)?;
    Ok((space.filesystem, space.free, space.total))
}

/// Checks that every need fits (needs on one filesystem add up), keeping
/// [`reserve`] free. The error names the release, the filesystem, what the
/// bytes are for, and both numbers.
pub fn check_room(release: &str, needs: &[Need]) -> Result<(), String> {
    /// What one filesystem is asked for.
    struct Fs<'a> {
        dev: u64,
        path: &'a Path,
        bytes: u64,
        free: u64,
        total: u64,
        parts: Vec<String>,
    }
    let mut by_fs: Vec<Fs> = Vec::new();
    for need in needs.iter().filter(|n| n.bytes > 0) {
        let (dev, free, total) = space(&need.path)
            .map_err(|e| format!("cannot read the free space of {}: {e}", need.path.display()))?;
        let part = format!("{} {}", need.what, format_bytes(need.bytes));
        match by_fs.iter_mut().find(|f| f.dev == dev) {
            Some(fs) => {
                fs.bytes += need.bytes;
                fs.parts.push(part);
            }
            None => by_fs.push(Fs {
                dev,
                path: &need.path,
                bytes: need.bytes,
                free,
                total,
                parts: vec![part],
            }),
        }
    }
    for fs in by_fs {
        let keep = reserve(fs.total);
        if fs.bytes.saturating_add(keep) > fs.free {
            return Err(format!(
                "not enough disk space for {release}: it needs {} on the filesystem of {} ({}), which has {} free, {} of it kept in reserve; free some space (the release is fetched once there is room)",
                format_bytes(fs.bytes),
                fs.path.display(),
                fs.parts.join(", "),
                format_bytes(fs.free),
                format_bytes(keep),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_need_beyond_the_free_space_is_refused_with_both_numbers() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(check_room(
            "1.0.0",
            &[Need {
                path: dir.path().into(),
                bytes: 1,
                what: "new chunks"
            }]
        )
        .is_ok());
        let err = check_room(
            "2.0.0",
            &[
                Need {
                    path: dir.path().join("state"),
                    bytes: u64::MAX / 4,
                    what: "new chunks",
                },
                Need {
                    path: dir.path().into(),
                    bytes: u64::MAX / 4,
                    what: "staged copy",
                },
            ],
        )
        .expect_err("cannot fit");
        assert!(err.contains("not enough disk space for 2.0.0"), "{err}");
        assert!(
            err.contains("new chunks") && err.contains("staged copy"),
            "{err}"
        );
        assert!(err.contains("free"), "{err}");
    }
}
