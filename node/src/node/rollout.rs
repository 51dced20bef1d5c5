//! Rollouts on a node: signed commands checked by one freshness rule (the
//! site's clock), followed across restarts (`STATE/rollout.json`), caught
//! up from peers by a node that was away, waves evaluated from what every
//! node reports, and every decision recorded in the audit log by a writer
//! thread of its own.

use super::*;

/// An accepted rollout (or rollback) command and where it stands.
pub(super) struct Rollout {
    pub(super) command: Command,
    pub(super) signed: SignedCommand,
    /// The abort that stopped it, offered with it to nodes that catch up.
    pub(super) abort: Option<SignedCommand>,
    pub(super) version: String,
    /// A rollback: every node returns to `version` at once.
    pub(super) back: bool,
    pub(super) waves: Vec<Vec<String>>,
    /// Set once: the node that failed (or the admin that aborted) and why.
    pub(super) halted: Option<(String, String)>,
    pub(super) done: bool,
}

/// `STATE/rollout.json`: the rollout a node follows, so a restarted node
/// goes on with it (its signatures are checked again when it is read).
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct SavedRollout {
    /// The rollout or rollback, then its abort if any.
    pub(super) commands: Vec<SignedCommand>,
    pub(super) halted: Option<(String, String)>,
    pub(super) done: bool,
}

pub(super) const ROLLOUT_FILE: &str = "rollout.json";

/// How long a refused command stays refused without another log line.
pub(super) const REFUSAL_QUIET: Duration = Duration::from_secs(600);
/// Refusals remembered at most: past them, a refusal is counted, not
/// logged, and the count is logged once a minute.
const MAX_REFUSALS: usize = 1024;

/// A refused command, as [`Refusals`] counts it.
#[derive(Clone, Copy)]
pub(super) enum Refused<'a> {
    /// Signed by a trusted admin (the id, when its text parses) and
    /// refused for `reason`.
    Genuine {
        id: Option<&'a str>,
        reason: &'a str,
    },
    /// Not proven to be an admin's: what is wrong with it.
    Forged(&'static str),
}

/// The rollout commands refused lately, so that each is logged and
/// audited once however often it comes. A command a trusted admin signed
/// (refused for its time, its site, or as a replay) counts by its id and
/// reason; anything else (a forgery, a key no one trusts, malformed text:
/// what a stranger can make up without end) by the peer that sent it and
/// what is wrong with it.
#[derive(Default)]
pub(super) struct Refusals {
    logged: HashMap<(Option<String>, String), Instant>,
    /// Refusals not logged since the last count went out.
    unlogged: u64,
}

impl Refusals {
    /// Whether this refusal is to be logged and audited (it was not
    /// lately, and there is room to remember it).
    pub(super) fn first(&mut self, from: &str, refused: Refused<'_>) -> bool {
        let key = match refused {
            Refused::Genuine { id, reason } => (id.map(str::to_owned), reason.to_owned()),
            Refused::Forged(what) => (None, format!("{from}: {what}")),
        };
        let quiet = self
            .logged
            .get(&key)
            .is_some_and(|at| at.elapsed() < REFUSAL_QUIET);
        if quiet || self.logged.len() >= MAX_REFUSALS {
            self.unlogged += 1;
            return false;
        }
        self.logged.insert(key, Instant::now());
        true
    }

    /// Forgets refusals past their quiet time; the count of refusals not
    /// logged since the last call, if any.
    pub(super) fn prune(&mut self) -> Option<u64> {
        self.logged.retain(|_, at| at.elapsed() < REFUSAL_QUIET);
        Some(std::mem::take(&mut self.unlogged)).filter(|&n| n > 0)
    }
}

/// How long before a command a peer names, and that could not be had, is
/// asked for again.
pub(super) const CATCH_UP_RETRY: Duration = Duration::from_secs(10);

impl Rollout {
    /// Follows an accepted command (a rollout or a rollback).
    pub(super) fn new(command: Command, signed: SignedCommand) -> Option<Rollout> {
        let (version, back) = match &command.action {
            Action::Rollout { version } => (version.clone(), false),
            Action::Rollback { version } => (version.clone(), true),
            Action::Abort | Action::Reject { .. } => return None,
        };
        // A rollback is one wave: every node returns at once.
        let sizes = if back {
            vec![lanup_protocol::rollout::WaveSize::Percent(100)]
        } else {
            command.waves.clone()
        };
        // Within a redundancy group, no member is in an earlier wave than
        // one that goes before it (standbys first).
        let waves = lanup_protocol::group::order_waves(
            &assign_waves(&command.id, &command.nodes, &sizes),
            &command.groups,
        );
        Some(Rollout {
            version,
            back,
            waves,
            halted: None,
            done: false,
            abort: None,
            command,
            signed,
        })
    }

    /// The id peers are told about: the abort's once there is one.
    pub(super) fn newest_id(&self) -> String {
        self.abort
            .as_ref()
            .and_then(|a| serde_json::from_str::<Command>(&a.command).ok())
            .map_or_else(|| self.command.id.clone(), |a| a.id)
    }

    pub(super) fn commands(&self) -> Vec<SignedCommand> {
        std::iter::once(self.signed.clone())
            .chain(self.abort.clone())
            .collect()
    }

    /// Reads `STATE/rollout.json`, checking each command's signature again
    /// (the trusted keys may have changed); not its age.
    pub(super) fn load(
        state: &std::path::Path,
        trusted: &[lanup_protocol::sign::PublicKey],
        site: &str,
    ) -> Option<Rollout> {
        let path = state.join(ROLLOUT_FILE);
        let bytes = std::fs::read(&path).ok()?;
        let saved: SavedRollout = match serde_json::from_slice(&bytes) {
            Ok(s) => s,
            Err(e) => {
                warn!(file = %path.display(), error = %e, "cannot read the saved rollout; not following it");
                return None;
            }
        };
        let mut commands = saved.commands.into_iter();
        let signed = commands.next()?;
        let checked = lanup_protocol::rollout::authenticate(&signed, trusted, site);
        let mut rollout = match checked.map(|c| Rollout::new(c, signed)) {
            Ok(Some(r)) => r,
            Ok(None) => return None,
            Err(e) => {
                warn!(file = %path.display(), reason = %e, "the saved rollout no longer checks; not following it");
                return None;
            }
        };
        rollout.abort = commands
            .next()
            .filter(|a| lanup_protocol::rollout::authenticate(a, trusted, site).is_ok());
        rollout.halted = saved.halted;
        rollout.done = saved.done;
        Some(rollout)
    }
}

/// Audit entries waiting for the writer at most: a disk that stalls (or
/// a flood of refused commands) costs entries, counted in a warning, not
/// the node's memory or its loop.
const AUDIT_QUEUE: usize = 1024;

/// Starts the thread that appends audit entries; it ends when the node's
/// sender is dropped.
pub(super) fn audit_writer(
    audit: Audit,
) -> Result<(
    std::sync::mpsc::SyncSender<Entry>,
    std::thread::JoinHandle<()>,
)> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<Entry>(AUDIT_QUEUE);
    let writer = std::thread::Builder::new()
        .name("lanup-audit".into())
        .spawn(move || {
            for entry in rx {
                if let Err(e) = audit.append(&entry) {
                    warn!(error = %format!("{e:#}"), "cannot write the audit log");
                }
            }
        })
        .context("cannot start the audit log's writer")?;
    Ok((tx, writer))
}

/// The audit fields a command fills in.
pub(super) fn command_fields(command: Option<&Command>) -> Entry {
    let mut entry = Entry::default_at(now_unix_ms());
    if let Some(c) = command {
        let (action, version) = super::approvals::action_version(&c.action);
        entry.action = Some(action.into());
        entry.version = version;
        entry.id = Some(c.id.clone());
        entry.issued_at_ms = Some(c.issued_at_ms);
        entry.forget_at_ms = c.fleet.is_some().then(|| c.remember_until_ms());
    }
    entry
}

impl Node {
    pub(super) fn audit_entry(&self, entry: Entry) {
        match self.audit.try_send(entry) {
            Ok(()) => {}
            Err(std::sync::mpsc::TrySendError::Full(_)) => {
                warn!(
                    waiting = AUDIT_QUEUE,
                    "the audit log's writer is behind (a slow disk?); an entry was not recorded"
                )
            }
            Err(std::sync::mpsc::TrySendError::Disconnected(_)) => {
                warn!("the audit log's writer has stopped; an entry was not recorded")
            }
        }
    }

    pub(super) fn refuse_command(
        &mut self,
        from: &str,
        command: Option<&SignedCommand>,
        reason: &str,
        forgery: Option<&'static str>,
    ) {
        let parsed = command.and_then(|c| serde_json::from_str::<Command>(&c.command).ok());
        let refused = match forgery {
            Some(what) => Refused::Forged(what),
            None => Refused::Genuine {
                id: parsed.as_ref().map(|c| c.id.as_str()),
                reason,
            },
        };
        if !self.refusals.first(from, refused) {
            return;
        }
        warn!(source = from, reason, "refused rollout command");
        self.audit_entry(Entry {
            event: "refused".into(),
            key: command.map(|c| c.key.clone()),
            from: Some(from.to_owned()),
            reason: Some(reason.to_owned()),
            ..command_fields(parsed.as_ref())
        });
    }

    /// Checks a rollout command (signature, trusted admin key, this site,
    /// freshness, never seen), records the verdict, and follows it. One a
    /// peer offered for catch-up may be older ([`CATCH_UP_MAX_AGE_MS`]).
    pub(super) fn on_command(
        &mut self,
        from: &str,
        signed: SignedCommand,
        catch_up: bool,
    ) -> Result<(), String> {
        // A change that needs more than one admin waits for approvals.
        let (trusted, site) = (&self.config.trust_admin, &self.config.site);
        if let Ok(command) = lanup_protocol::rollout::authenticate(&signed, trusted, site) {
            let needed = self.threshold(&command.action);
            if needed > 1 {
                return self.on_request(from, command, signed, needed);
            }
        }
        // One freshness rule for every path, by the site's clock.
        let offset = self.site_offset_ms();
        let site_now = now_unix_ms().saturating_add_signed(offset);
        let started = self.boot_ms.saturating_add_signed(offset);
        let (trusted, site) = (&self.config.trust_admin, &self.config.site);
        let checked = self
            .guard
            .check_arrival(&signed, trusted, site, site_now, started);
        let command = match checked {
            Ok(c) => c,
            Err(refusal) => {
                let mut reason = refusal.to_string();
                if offset.unsigned_abs() > 60_000 {
                    reason.push_str(&format!(
                        " (by the site's clock; this node's own clock is {} s {} it)",
                        offset.unsigned_abs() / 1000,
                        if offset < 0 { "ahead of" } else { "behind" }
                    ));
                }
                self.refuse_command(from, Some(&signed), &reason, refusal.forgery());
                // A genuine command (a trusted key signed it) refused for its
                // time: the rollout it starts cannot finish here, and the
                // site is told why. Not for forgeries or replays.
                let timing = matches!(
                    refusal,
                    lanup_protocol::rollout::Refusal::Stale(..)
                        | lanup_protocol::rollout::Refusal::Future(..)
                );
                let parsed = serde_json::from_str::<Command>(&signed.command).ok();
                if let Some(c) = parsed.filter(|c| timing && c.action != Action::Abort) {
                    self.refused_command = Some((c.id, reason.clone()));
                }
                return Err(reason);
            }
        };
        let catch_up = catch_up && command.issued_at_ms < started;
        info!(source = from, key = %signed.key, action = ?command.action, catch_up, "accepted rollout command");
        self.audit_entry(Entry {
            event: "accepted".into(),
            key: Some(signed.key.clone()),
            from: Some(from.to_owned()),
            reason: catch_up.then(|| "caught up: issued while this node was away".to_owned()),
            ..command_fields(Some(&command))
        });
        self.follow_command(command, signed);
        Ok(())
    }

    /// Acts on an accepted (and, where the site needs it, approved)
    /// command.
    pub(super) fn follow_command(&mut self, command: Command, signed: SignedCommand) {
        match &command.action {
            Action::Reject { request } => {
                let request = request.clone();
                self.reject(&command, &signed, &request);
                return;
            }
            Action::Abort => {
                let issued = command.issued_at_ms;
                if let Some(r) = self
                    .rollout
                    .as_mut()
                    .filter(|r| r.command.issued_at_ms <= issued && r.abort.is_none())
                {
                    r.abort = Some(signed.clone());
                    if r.halted.is_none() && !r.done {
                        r.halted = Some((format!("admin {}", signed.key), "aborted".into()));
                    }
                }
            }
            Action::Rollout { version } => {
                // An admin asking again is a retry: a release that rolled
                // back here may be tried once more.
                self.failed_releases.remove(version);
                self.rollout = Rollout::new(command.clone(), signed);
            }
            Action::Rollback { .. } => self.rollout = Rollout::new(command.clone(), signed),
        }
        self.save_rollout();
        self.rollout_duties();
    }

    /// The origin's fleet rollout file, as the fetcher read it: this
    /// site's command in it, when there is one this node has not taken yet,
    /// is checked and followed as one given on this node's CLI, and
    /// gossiped to the site.
    pub(super) fn on_fleet(&mut self, bytes: &[u8]) {
        let file: lanup_protocol::fleet::FleetFile = match serde_json::from_slice(bytes) {
            Ok(f) => f,
            Err(e) => {
                warn!(error = %e, "the origin's fleet rollout file cannot be read; ignored");
                return;
            }
        };
        let Some(signed) = file.commands.get(&self.config.site).cloned() else {
            return;
        };
        // Taken already, or held waiting for approvals.
        let seen = serde_json::from_str::<Command>(&signed.command)
            .is_ok_and(|c| self.guard.seen(&c.id) || self.pending.contains_key(&c.id));
        if seen {
            return;
        }
        if self
            .on_command("headquarters (fleet rollout)", signed.clone(), false)
            .is_ok()
        {
            info!(fleet = %file.id, release = %file.version, "this site's wave of a fleet rollout opened");
            if let Ok(data) = serde_json::to_vec(&signed) {
                let (net, topic) = (self.net.clone(), self.rollout_topic.clone());
                self.tasks.spawn(async move {
                    let _ = net.publish(&topic, data).await;
                });
            }
        }
    }

    /// A command given on this node's CLI. A rollback is refused here,
    /// before it reaches the site, when this node no longer holds the
    /// release.
    pub(super) fn on_cli_command(&mut self, signed: SignedCommand) -> Result<(), String> {
        let parsed = serde_json::from_str::<Command>(&signed.command);
        if let Ok(Command {
            action: Action::Rollback { version },
            ..
        }) = &parsed
        {
            if let Err(e) = self.stored_release(version) {
                return Err(format!("{e:#}"));
            }
        }
        self.on_command("this node's CLI", signed, false)
    }

    /// Writes `STATE/rollout.json`.
    pub(super) fn save_rollout(&self) {
        let Some(r) = &self.rollout else { return };
        let saved = SavedRollout {
            commands: r.commands(),
            halted: r.halted.clone(),
            done: r.done,
        };
        let path = self.config.state.join(ROLLOUT_FILE);
        let written = serde_json::to_vec_pretty(&saved)
            .map_err(std::io::Error::other)
            .and_then(|bytes| crate::apply::write_synced(&path, &bytes));
        if let Err(e) = written {
            warn!(file = %path.display(), error = %e, "cannot save the rollout this node follows");
        }
    }

    /// Asks `peer` for the command its heartbeat names, unless this node
    /// follows it (or a newer one) or asked lately.
    pub(super) fn maybe_catch_up(&mut self, peer: PeerId, id: &str) {
        let known = self.guard.seen(id)
            || self.rollout.as_ref().is_some_and(|r| r.newest_id() == id)
            || self
                .refused_command
                .as_ref()
                .is_some_and(|(refused, _)| refused == id);
        let lately = self
            .asked
            .get(id)
            .is_some_and(|at| at.elapsed() < CATCH_UP_RETRY);
        if known || lately {
            return;
        }
        self.asked.insert(id.to_owned(), Instant::now());
        let net = self.net.clone();
        let tx = self.done_tx.clone();
        let request = Request::Commands { id: id.to_owned() };
        self.tasks.spawn(async move {
            if let Ok(Response::Commands { commands }) = net.request(peer, request).await {
                let _ = tx.send(Done::Commands(peer, commands)).await;
            }
        });
    }

    /// Takes up the commands a peer follows: a rollout issued while this
    /// node was away (or before it joined), and its abort.
    pub(super) fn catch_up(&mut self, peer: PeerId, commands: Vec<SignedCommand>) {
        for signed in commands {
            let parsed = serde_json::from_str::<Command>(&signed.command).ok();
            let Some(command) = parsed else {
                self.refuse_command(
                    &format!("peer {peer}"),
                    Some(&signed),
                    "malformed",
                    Some("malformed"),
                );
                continue;
            };
            // Already followed, or older than what this node follows.
            let older = self.rollout.as_ref().is_some_and(|r| {
                command.action != Action::Abort && r.command.issued_at_ms >= command.issued_at_ms
            });
            if self.guard.seen(&command.id) || older {
                continue;
            }
            let _ = self.on_command(&format!("peer {peer}"), signed, true);
        }
    }

    /// What every node of the site reports about `version`.
    pub(super) fn reports(&self, version: &str, id: &str) -> BTreeMap<String, NodeReport> {
        let lanup = self.is_lanup_release(version);
        let report = |hb: &Heartbeat| NodeReport {
            installed: if lanup {
                hb.lanup_version.clone()
            } else {
                hb.installed_version.clone()
            },
            failed: (hb.failed_version.as_deref() == Some(version))
                .then(|| {
                    hb.last_error
                        .clone()
                        .unwrap_or_else(|| "rolled back".into())
                })
                .or_else(|| {
                    hb.refused
                        .as_ref()
                        .filter(|(refused, _)| refused == id)
                        .map(|(_, why)| format!("refused the command: {why}"))
                }),
        };
        let mut reports = BTreeMap::new();
        reports.insert(self.local.to_string(), report(&self.own_heartbeat()));
        for (peer, info) in &self.peers {
            if let Some((_, hb)) = &info.heartbeat {
                reports.insert(peer.to_string(), report(hb));
            }
        }
        for (author, heard) in self.heard_only() {
            reports.insert(author.to_string(), report(&heard.heartbeat));
        }
        reports
    }

    /// Nodes heard lately only through others: not connected to this one.
    pub(super) fn heard_only(&self) -> impl Iterator<Item = (&PeerId, &Heard)> {
        self.heard.iter().filter(|(author, h)| {
            **author != self.local
                && !self.peers.contains_key(author)
                && self.live(author, h.at, &h.heartbeat)
        })
    }

    /// Follows the rollout: halts it when a node failed, and installs its
    /// release here when this node's wave has come. A node the command does
    /// not name (it joined later) is in the last wave.
    pub(super) fn rollout_duties(&mut self) {
        let Some(wave) = self.due_wave() else { return };
        let version = wave.version.clone();
        let installed = if self.is_lanup_release(&version) {
            crate::upgrade::version() == version
        } else {
            self.installed_name().as_deref() == Some(version.as_str())
        };
        // A new lanup on trial follows the site but installs nothing.
        if !wave.due
            || installed
            || crate::upgrade::on_trial()
            || self.applying.is_some()
            || self.failed_releases.contains(&version)
        {
            if self.applying.is_none() {
                self.set_waiting(None);
            }
            return;
        }
        // Its window and its redundancy group may hold it back.
        if let Some(why) = self.held_back(&version, Some(&wave.id), wave.now) {
            self.set_waiting(Some(why));
            return;
        }
        self.set_waiting(None);
        let release = if wave.back {
            self.stored_release(&version)
        } else {
            match self.staged_release(&version) {
                Ok(r) => Ok(r),
                // Still fetching: the wave waits for it.
                Err(_) => return,
            }
        };
        self.apply_wave(wave, release);
    }

    /// Where the rollout this node follows stands: None once it halted
    /// (or there is none); whether this node's wave has come otherwise. A
    /// halt and the end are written to the audit log once.
    fn due_wave(&mut self) -> Option<DueWave> {
        let r = self.rollout.as_ref().filter(|r| r.halted.is_none())?;
        let version = r.version.clone();
        let stage = evaluate(&r.waves, &version, &self.reports(&version, &r.command.id));
        let me = self.local.to_string();
        let own_wave = r
            .waves
            .iter()
            .position(|w| w.contains(&me))
            .unwrap_or(r.waves.len().saturating_sub(1));
        // A standby drawn after its active goes with the active's wave.
        let wave = lanup_protocol::group::due_wave(&me, own_wave, &r.waves, &self.members());
        let mut due = DueWave {
            id: r.command.id.clone(),
            back: r.back,
            waves: r.waves.len(),
            now: r.command.now,
            version,
            wave,
            due: false,
        };
        let was_done = r.done;
        let action = due.action();
        let entry = |event: &str, from: Option<String>, reason: String| Entry {
            event: event.into(),
            action: Some(action.into()),
            version: Some(due.version.clone()),
            id: Some(due.id.clone()),
            from,
            reason: Some(reason),
            ..Entry::default_at(now_unix_ms())
        };
        match stage {
            Stage::Halted { node, reason } => {
                warn!(release = %due.version, %node, reason, "{action} halted: a node failed; no further wave applies");
                self.audit_entry(entry("halted", Some(node.clone()), reason.clone()));
                if let Some(r) = &mut self.rollout {
                    r.halted = Some((node, reason));
                }
                self.save_rollout();
                return None;
            }
            Stage::Done => {
                if !was_done {
                    info!(release = %due.version, "{action} done: every node runs it");
                    self.audit_entry(entry("done", None, "every node runs it".into()));
                    if let Some(r) = &mut self.rollout {
                        r.done = true;
                    }
                    self.save_rollout();
                }
                due.due = true;
            }
            Stage::Wave(current) => due.due = current >= wave,
        }
        Some(due)
    }

    /// This node's wave came: it applies `release` (the active member of a
    /// redundancy group hands over to its standby first), or says why it
    /// cannot.
    fn apply_wave(&mut self, wave: DueWave, release: Result<crate::apply::Release>) {
        let (version, action) = (wave.version.clone(), wave.action());
        info!(release = %version, wave = wave.wave + 1, "this node's {action} wave has come");
        let policy = &self.config.policy;
        let active = policy
            .member
            .as_ref()
            .is_some_and(|m| m.role.as_deref() == Some("active"));
        let switchover = policy
            .switchover_command
            .clone()
            .filter(|_| active && self.installed.is_some())
            .map(|c| (c, policy.switchover_timeout));
        let started = release.and_then(|mut release| {
            release.switchover = switchover;
            self.start_apply_release(release, None)
        });
        let (event, reason) = match started {
            Ok(()) => (
                "applying",
                format!("wave {} of {}", wave.wave + 1, wave.waves),
            ),
            Err(e) => {
                let reason = format!("{e:#}");
                warn!(error = %reason, "cannot install the {action}'s release");
                // Reported as an apply that failed before changing
                // anything, so the rollout halts and says why.
                self.failed_releases.insert(version.clone());
                self.metrics.applied(Ending::Failed.name());
                self.last_apply = Some(Outcome {
                    version: version.clone(),
                    from: self.installed_name(),
                    ending: Ending::Failed,
                    reason: Some(reason.clone()),
                    downtime_ms: None,
                    finished_at: now_unix_ms() / 1000,
                });
                ("apply-failed", reason)
            }
        };
        self.audit_entry(Entry {
            event: event.into(),
            action: Some(action.into()),
            version: Some(version),
            id: Some(wave.id),
            reason: Some(reason),
            ..Entry::default_at(now_unix_ms())
        });
    }

    pub(super) fn rollout_json(&self) -> serde_json::Value {
        let Some(r) = &self.rollout else {
            return serde_json::Value::Null;
        };
        let mut halted = r.halted.clone();
        let stage = match (&halted, r.done) {
            (Some(_), _) => "halted".to_owned(),
            (None, true) => "done".to_owned(),
            (None, false) => match evaluate(
                &r.waves,
                &r.version,
                &self.reports(&r.version, &r.command.id),
            ) {
                Stage::Wave(w) => format!("wave {} of {}", w + 1, r.waves.len()),
                Stage::Halted { node, reason } => {
                    halted = Some((node, reason));
                    "halted".to_owned()
                }
                Stage::Done => "done".to_owned(),
            },
        };
        serde_json::json!({
            "id": r.command.id,
            "action": if r.back { "rollback" } else { "rollout" },
            "version": r.version,
            // Its release is lanup itself: nodes run it as `lanup_version`.
            "lanup": self.is_lanup_release(&r.version),
            "key": r.signed.key,
            "issued_at_ms": r.command.issued_at_ms,
            "fleet": r.command.fleet,
            "waves": r.waves,
            "stage": stage,
            "halted_by": halted.as_ref().map(|(n, _)| n.clone()),
            "reason": halted.as_ref().map(|(_, why)| why.clone()),
        })
    }

    /// The manifest kept in `dir` (under `STATE/releases/`), checked again
    /// as a node checks any: its bytes and signature text with it.
    pub(super) fn stored_manifest(
        &self,
        dir: &std::path::Path,
    ) -> Result<(Manifest, ManifestText, String)> {
        let source = ManifestSource::read_local(dir)?;
        let manifest =
            source.authenticate(&self.config.trust_publisher, OffsetDateTime::now_utc())?;
        let signature = String::from_utf8(source.signature.unwrap_or_default())
            .with_context(|| format!("{}: signature is not text", source.signature_location))?;
        Ok((manifest, source.text, signature))
    }

    /// A release this node still holds (`STATE/releases/` and
    /// `STATE/staging/`), older than the installed one, to roll back to. Its
    /// manifest is checked again; its files are checked as they are copied.
    pub(super) fn stored_release(&self, version: &str) -> Result<Release> {
        let folder = lanup_protocol::manifest::release_folder(version);
        let dir = self.config.state.join("releases").join(&folder);
        let staged = self.config.state.join("staging").join(&folder);
        let held = || {
            let mut names: Vec<String> = std::fs::read_dir(self.config.state.join("releases"))
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|e| e.file_name().to_str().map(str::to_owned))
                .collect();
            names.sort();
            if names.is_empty() {
                "none".to_owned()
            } else {
                names.join(", ")
            }
        };
        if !dir.is_dir() || !staged.is_dir() {
            anyhow::bail!(
                "{version} is no longer in this node's store (it holds: {})",
                held()
            );
        }
        let (manifest, text, signature) = self
            .stored_manifest(&dir)
            .with_context(|| format!("cannot roll back to {version}"))?;
        if let Some(installed) = &self.installed {
            if manifest.compare_release(installed) != std::cmp::Ordering::Less {
                anyhow::bail!(
                    "{version} is not older than the installed {}: a rollback returns to an older release",
                    installed.release_name()
                );
            }
        }
        Ok(Release {
            manifest: std::sync::Arc::new(manifest),
            installed: self.installed.clone(),
            text,
            signature,
            staged,
            rollback: true,
            switchover: None,
        })
    }
}

/// The rollout this node follows, as its wave stands.
struct DueWave {
    version: String,
    id: String,
    back: bool,
    /// This node's wave (from 0), and how many there are.
    wave: usize,
    waves: usize,
    /// Windows are passed over (`--now`).
    now: bool,
    /// This node's wave has come.
    due: bool,
}

impl DueWave {
    fn action(&self) -> &'static str {
        if self.back {
            "rollback"
        } else {
            "rollout"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Refusals, Refused};

    fn genuine<'a>(id: &'a str, reason: &'a str) -> Refused<'a> {
        Refused::Genuine {
            id: Some(id),
            reason,
        }
    }

    #[test]
    fn forgeries_are_logged_once_per_sender_and_fault_and_genuine_commands_once_per_id() {
        let mut refusals = Refusals::default();
        // A peer making up commands, each with its own id and signature.
        let logged = (0..10_000)
            .filter(|_| refusals.first("peer A", Refused::Forged("bad signature")))
            .count();
        assert_eq!(logged, 1);
        assert!(refusals.first("peer A", Refused::Forged("untrusted key")));
        assert!(refusals.first("peer B", Refused::Forged("bad signature")));
        // An admin's command refused for its time: once per id and reason.
        assert!(refusals.first("peer A", genuine("c1", "stale")));
        assert!(!refusals.first("peer B", genuine("c1", "stale")));
        assert!(refusals.first("peer A", genuine("c1", "replayed")));
        assert!(refusals.first("peer A", genuine("c2", "stale")));
        assert_eq!(refusals.prune(), Some(10_000));
        assert_eq!(refusals.prune(), None);
    }

    #[test]
    fn refusals_remembered_are_bounded_and_the_rest_counted() {
        let mut refusals = Refusals::default();
        let logged = (0..5_000)
            .filter(|i| refusals.first(&format!("peer {i}"), Refused::Forged("bad signature")))
            .count();
        assert_eq!(logged, super::MAX_REFUSALS);
        assert_eq!(refusals.logged.len(), super::MAX_REFUSALS);
        assert_eq!(refusals.prune(), Some(5_000 - super::MAX_REFUSALS as u64));
    }
}
