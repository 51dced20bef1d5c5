//! Installs on a node: the staged release an apply, a rollout wave or
//! `apply = "auto"` installs, the apply run on a blocking thread with each
//! step reported, and the release staged before the node last stopped
//! taken up again.

use super::*;
use lanup_protocol::manifest::release_folder;

impl Node {
    /// The staged release `version`, ready to install.
    pub(super) fn staged_release(&self, version: &str) -> Result<Release> {
        let t = self
            .transfer
            .target()
            .filter(|t| t.manifest.release_name() == version);
        match t {
            Some(t) if t.staged => Ok(Release {
                manifest: t.manifest.clone(),
                installed: self.installed.clone(),
                text: t.text.clone(),
                signature: t.signature.clone(),
                staged: self
                    .config
                    .state
                    .join("staging")
                    .join(release_folder(version)),
                rollback: false,
                switchover: None,
            }),
            Some(_) => anyhow::bail!("{version} is not staged yet (it is still being fetched)"),
            None => anyhow::bail!(
                "{version} is not staged on this node ({})",
                match self.transfer.target() {
                    Some(t) if t.staged => format!("staged: {}", t.manifest.release_name()),
                    Some(t) => format!("fetching: {}", t.manifest.release_name()),
                    None => "nothing staged".into(),
                }
            ),
        }
    }

    /// Starts installing the staged release `version` in the background;
    /// each step goes to the log, the status, and `reply` when a CLI asked.
    pub(super) fn start_apply(
        &mut self,
        version: &str,
        reply: Option<mpsc::Sender<serde_json::Value>>,
    ) -> Result<()> {
        let release = self.staged_release(version)?;
        self.start_apply_release(release, reply)
    }

    /// Starts installing `release` (see [`Node::start_apply`]).
    pub(super) fn start_apply_release(
        &mut self,
        release: Release,
        reply: Option<mpsc::Sender<serde_json::Value>>,
    ) -> Result<()> {
        if crate::upgrade::is_lanup(&release.manifest) {
            return self.hand_over(release, reply);
        }
        let Some(applier) = self.applier.clone() else {
            anyhow::bail!(
                "this node has no [app] in its configuration, so it stages releases but does not install them"
            );
        };
        if let Some((running, _)) = &self.applying {
            anyhow::bail!("an apply of {running} is under way");
        }
        let version = release.manifest.release_name();
        info!(release = %version, rollback = release.rollback, "installing the release");
        self.applying = Some((version, "verify".into()));
        let tx = self.done_tx.clone();
        tokio::task::spawn_blocking(move || {
            let outcome = applier.apply(&release, &mut |event| {
                if let Some(reply) = &reply {
                    let _ = reply.blocking_send(serde_json::json!({ "event": event }));
                }
                let _ = tx.blocking_send(Done::ApplyStep(event));
            });
            if let Some(reply) = &reply {
                let _ = reply.blocking_send(serde_json::json!({ "outcome": outcome }));
            }
            let _ = tx.blocking_send(Done::Applied(outcome));
        });
        Ok(())
    }

    /// Installs a lanup release: the node stops and the new lanup is tried
    /// in its place (see [`crate::upgrade`]).
    fn hand_over(
        &mut self,
        release: Release,
        reply: Option<mpsc::Sender<serde_json::Value>>,
    ) -> Result<()> {
        if let Some((running, _)) = &self.applying {
            anyhow::bail!("an apply of {running} is under way");
        }
        if crate::upgrade::on_trial() {
            anyhow::bail!("this node is a new lanup on trial; it installs nothing");
        }
        crate::upgrade::check_shape(&release)?;
        let version = release.manifest.release_name();
        let id = self
            .rollout
            .as_ref()
            .filter(|r| r.version == version)
            .map(|r| r.command.id.clone());
        info!(release = %version, "installing lanup {version}: this node stops and hands over to it");
        if let Some(reply) = reply {
            let _ = reply.try_send(serde_json::json!({ "event": crate::apply::Event {
                step: "hand-over".into(),
                message: format!("this node stops and tries lanup {version} in its place; `lanup status` tells how it went"),
                ms: 0,
            }}));
        }
        let had_peers = self
            .peers
            .values()
            .any(|p| p.heartbeat.is_some() && !p.silent);
        self.leaving = Some(crate::upgrade::Handover {
            release,
            id,
            had_peers,
            timeout: self.config.self_update_timeout,
        });
        Ok(())
    }

    /// With `apply = "auto"`, a staged release newer than the installed
    /// one is installed at once, when its RestartApp allows, unless it
    /// already rolled back here.
    pub(super) fn maybe_auto_apply(&mut self) {
        let auto = self
            .config
            .app
            .as_ref()
            .is_some_and(|a| a.apply == crate::config::ApplyPolicy::Auto);
        let Some(t) = self.transfer.target().filter(|t| t.staged) else {
            return;
        };
        let version = t.manifest.release_name();
        let newer = self
            .installed
            .as_ref()
            .is_none_or(|i| t.manifest.compare_release(i) == std::cmp::Ordering::Greater);
        // After a rollback the site stays on the older release until an
        // admin rolls a release out again.
        let held = self.rollout.as_ref().is_some_and(|r| r.back);
        // lanup itself is updated by a rollout only.
        if !auto
            || crate::upgrade::is_lanup(&t.manifest)
            || !newer
            || held
            || self.applying.is_some()
            || self.failed_releases.contains(&version)
        {
            return;
        }
        if let Some(why) = self.held_back(&version, None, false) {
            self.set_waiting(Some(why));
            return;
        }
        if !t.manifest.restart.allow {
            info!(release = %version, "staged; not installed automatically because its RestartApp says no (use lanup apply)");
            self.failed_releases.insert(version);
            return;
        }
        if let Err(e) = self.start_apply(&version, None) {
            warn!(error = %format!("{e:#}"), "cannot install the staged release");
        }
    }

    /// Takes up the release staged before the node last stopped, so it can
    /// be served and installed without fetching it again.
    pub(super) fn load_staged(&mut self) {
        let releases = self.config.state.join("releases");
        let Ok(entries) = std::fs::read_dir(&releases) else {
            return;
        };
        // The newest only is kept while looking: a manifest of many files
        // is tens of megabytes parsed.
        let mut found: Option<(Manifest, ManifestText, String)> = None;
        for entry in entries.flatten() {
            let dir = entry.path();
            match self.stored_manifest(&dir) {
                Ok(here) => {
                    if found.as_ref().is_none_or(|best| {
                        here.0.compare_succession(&best.0) == std::cmp::Ordering::Greater
                    }) {
                        found = Some(here);
                    }
                }
                Err(e) => {
                    warn!(dir = %dir.display(), error = %format!("{e:#}"), "not taking up a stored release")
                }
            }
        }
        let Some((manifest, text, sig)) = found else {
            return;
        };
        let location = releases.join(manifest.release_folder());
        if self.adopt(&location.display().to_string(), text, sig) != MessageAcceptance::Accept {
            return;
        }
        let staging = self
            .config
            .state
            .join("staging")
            .join(manifest.release_folder());
        let complete = manifest.files.iter().all(|f| {
            std::fs::metadata(staging.join(&f.name)).is_ok_and(|m| Some(m.len()) == f.size)
        });
        if let Some(t) = self
            .transfer
            .target_mut()
            .filter(|t| complete && t.transfer.is_done())
        {
            t.staged = true;
            info!(release = %manifest.release_name(), "release staged before the node stopped; taken up again");
            self.maybe_auto_apply();
        }
    }
}
