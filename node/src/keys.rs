//! Publisher and admin key files on disk.

use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context, Result};
use lanup_protocol::sign::{PublicKey, SecretKey};

/// Writes a new secret key to `path`, readable by its owner only (mode
/// 0600; on Windows a file only its owner, Administrators and SYSTEM may
/// open), and returns its public key. Refuses to overwrite an existing
/// file: a lost publisher key cannot be recovered.
pub fn generate(path: &Path) -> Result<PublicKey> {
    let key = SecretKey::generate();
    let mut file = crate::platform::create_private(path)
        .with_context(|| format!("cannot create key file {}", path.display()))?;
    file.write_all(key.to_text().as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write key file {}", path.display()))?;
    Ok(key.public())
}

/// Reads a secret key file. Refuses one that others can read, as ssh does.
pub fn load_secret(path: &Path) -> Result<SecretKey> {
    let exposed = crate::platform::exposed(path)
        .with_context(|| format!("cannot read key file {}", path.display()))?;
    if let Some(reason) = exposed {
        bail!("key file {}: {reason}", path.display());
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read key file {}", path.display()))?;
    SecretKey::from_text(&text).with_context(|| format!("key file {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn key_files_are_private_and_not_overwritten() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("publisher.key");
        let public = generate(&path)?;
        let mode = std::fs::metadata(&path)?.permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(load_secret(&path)?.public(), public);
        assert!(
            generate(&path).is_err(),
            "an existing key must not be replaced"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))?;
        let err = load_secret(&path).expect_err("world-readable key refused");
        assert!(err.to_string().contains("chmod 600"), "{err}");
        Ok(())
    }
}
