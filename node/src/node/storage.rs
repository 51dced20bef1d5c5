//! A node's disk: the disk guard before a release is fetched, the check of
//! the chunk store at start, chunks found damaged fetched again, a disk that
//! refuses writes pausing transfers, and the store kept to what the site
//! may still need.

use super::*;

impl Node {
    /// Keeps the store bounded: once a release is staged, chunks and staged
    /// folders of other releases go, except the installed release's staged
    /// folder and manifest: with them the site can roll back to it.
    pub(super) fn collect_garbage(&self) {
        let Some(t) = self.transfer.target().filter(|t| t.staged) else {
            return;
        };
        let keep: HashSet<Hash> = unique_chunks(&t.manifest.files).into_keys().collect();
        let store = self.store.clone();
        let staging = self.config.state.join("staging");
        let releases = self.config.state.join("releases");
        let current = t.manifest.release_folder();
        let installed = self
            .installed_name()
            .map(|n| lanup_protocol::manifest::release_folder(&n));
        let keep_dir = move |name: Option<&str>| {
            name.is_some_and(|n| n == current || installed.as_deref() == Some(n))
        };
        tokio::task::spawn_blocking(move || {
            match store.retain(&keep) {
                Ok((0, _)) => {}
                Ok((chunks, bytes)) => {
                    info!(chunks, bytes, "removed chunks no staged release needs")
                }
                Err(e) => warn!(error = %e, "cannot clean the chunk store"),
            }
            if let Ok(entries) = std::fs::read_dir(&releases) {
                for entry in entries.flatten() {
                    if !keep_dir(entry.file_name().to_str()) {
                        let _ = std::fs::remove_dir_all(entry.path());
                    }
                }
            }
            let Ok(entries) = std::fs::read_dir(&staging) else {
                return;
            };
            for entry in entries.flatten() {
                if !keep_dir(entry.file_name().to_str()) {
                    let path = entry.path();
                    match std::fs::remove_dir_all(&path) {
                        Ok(()) => info!(dir = %path.display(), "removed an older staged release"),
                        Err(e) => {
                            warn!(dir = %path.display(), error = %e, "cannot remove an older staged release")
                        }
                    }
                }
            }
        });
    }

    /// Checks every chunk of the release this node holds against its hash,
    /// in the background (one core reading and hashing at disk speed: about
    /// 8 s for 10 GiB here), so that chunks that rotted while the node was
    /// down are neither offered to peers nor used. Damaged ones go to
    /// `damaged`, as chunks found damaged while serving do.
    pub(super) fn check_store(&self, damaged: mpsc::Sender<Hash>) {
        let Some(t) = self.transfer.target() else {
            return;
        };
        let hashes: Vec<Hash> = t.held.iter().copied().collect();
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let mut bad = 0;
            for hash in &hashes {
                if store.get_verified(hash).is_err() {
                    bad += 1;
                    let _ = damaged.blocking_send(*hash);
                }
            }
            info!(
                chunks = hashes.len(),
                damaged = bad,
                took_ms = started.elapsed().as_millis() as u64,
                "checked the chunk store"
            );
        });
    }

    /// The disk guard: whether the release being fetched fits on this
    /// node's disks (new chunks and the staged copy under the state
    /// directory, the apply's copy beside the install directory). While it
    /// does not, nothing is fetched; it is looked at again every
    /// [`STAGE_RETRY`].
    pub(super) fn check_room(&mut self) {
        let Some(t) = self.transfer.target_mut().filter(|t| !t.staged) else {
            return;
        };
        if t.no_room
            .as_ref()
            .is_some_and(|(_, at)| Instant::now() < *at)
        {
            return;
        }
        let release = t.manifest.release_name();
        let staged_size: u64 = t.manifest.files.iter().filter_map(|f| f.size).sum();
        let mut needs = vec![
            crate::disk::Need {
                path: self.config.state.join("chunks"),
                bytes: t.transfer.missing_bytes(),
                what: "new chunks",
            },
            crate::disk::Need {
                path: self.config.state.join("staging"),
                bytes: staged_size,
                what: "staged copy",
            },
        ];
        if let Some(app) = &self.config.app {
            needs.push(crate::disk::Need {
                path: app.install_dir.clone(),
                bytes: staged_size,
                what: "copy beside the installed application while applying",
            });
        }
        match crate::disk::check_room(&release, &needs) {
            Ok(()) => {
                if t.no_room.take().is_some() {
                    info!(release, "there is room for the release now; fetching it");
                }
            }
            Err(reason) => {
                if t.no_room.is_none() {
                    warn!(release, error = %reason, "release refused for now: it does not fit on this node's disk");
                }
                t.no_room = Some((reason, Instant::now() + STAGE_RETRY));
            }
        }
    }

    /// A chunk this node held was found damaged on its disk (and removed):
    /// it is no longer offered as held here, and is fetched again, from a
    /// peer or else the origin.
    pub(super) fn chunk_lost(&mut self, hash: Hash) {
        if self.transfer.lost(hash) {
            warn!(chunk = %hash, "a chunk was damaged on this node's disk; removed, and fetched again");
        }
    }
}
