//! Changes that wait for approvals: where a site needs more than one admin
//! (`admin_threshold`, `abort_threshold`), a command is a request. It is
//! held (at most [`MAX_PENDING`], in `STATE/requests.json` across
//! restarts), shown in status, and starts on every node once distinct
//! trusted admin keys have signed its exact bytes, before it expires. Each
//! approval is checked as it comes; one that does not count is refused,
//! saying why, and recorded. A signed reject ends a request.

use super::*;
use lanup_protocol::approval::{self, NotCounted, REQUEST_TTL_MS};
use rollout::command_fields;

/// Requests held at once; a new one beyond this replaces the oldest.
pub(super) const MAX_PENDING: usize = 16;
/// Rejected requests remembered, so a late copy cannot start.
const MAX_REJECTED: usize = 64;
/// Refused approvals kept (and recorded) per request: a peer that sends
/// forged approvals again and again fills neither status nor the audit log.
const MAX_REFUSED: usize = 8;
/// Approvals looked at in one message: more than any site has admins.
const MAX_APPROVALS_PER_MESSAGE: usize = 32;
/// The longest request id asked for (ids are 32 hex digits).
const MAX_ID_LEN: usize = 64;
pub(super) const REQUESTS_FILE: &str = "requests.json";

/// A request waiting for approvals.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Pending {
    /// The request with the approvals that counted.
    pub(super) signed: SignedCommand,
    #[serde(skip)]
    pub(super) command: Option<Command>,
    /// Approvals that did not count, and why.
    #[serde(default)]
    pub(super) refused: Vec<String>,
}

/// A rejected request: who ended it and why.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Rejected {
    pub(super) id: String,
    pub(super) key: String,
    pub(super) reason: String,
    pub(super) at_ms: u64,
}

/// `STATE/requests.json`.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(super) struct SavedRequests {
    pub(super) pending: Vec<Pending>,
    pub(super) rejected: Vec<Rejected>,
}

impl SavedRequests {
    /// Reads what was saved, checking each request's signature again.
    pub(super) fn load(
        state: &std::path::Path,
        trusted: &[lanup_protocol::sign::PublicKey],
        site: &str,
    ) -> (BTreeMap<String, Pending>, Vec<Rejected>) {
        let path = state.join(REQUESTS_FILE);
        let saved: SavedRequests = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                warn!(file = %path.display(), error = %e, "cannot read the saved requests; starting without them");
                SavedRequests::default()
            }),
            Err(_) => SavedRequests::default(),
        };
        let pending = saved
            .pending
            .into_iter()
            .filter_map(|mut p| {
                let c = lanup_protocol::rollout::authenticate(&p.signed, trusted, site).ok()?;
                let id = c.id.clone();
                p.command = Some(c);
                Some((id, p))
            })
            .collect();
        (pending, saved.rejected)
    }
}

impl Node {
    /// How many distinct admin keys `action` needs here.
    pub(super) fn threshold(&self, action: &Action) -> usize {
        match action {
            Action::Abort => self.config.policy.abort_threshold,
            Action::Reject { .. } => 1,
            Action::Rollout { .. } | Action::Rollback { .. } => self.config.policy.admin_threshold,
        }
    }

    /// A command that needs more than one admin: held as a request until
    /// approved; approvals it carries are added one by one. `Err` when
    /// nothing it brought counts (a refused approval, an expired or
    /// rejected request).
    pub(super) fn on_request(
        &mut self,
        from: &str,
        command: Command,
        signed: SignedCommand,
        needed: usize,
    ) -> Result<(), String> {
        let id = command.id.clone();
        if self.guard.seen(&id) {
            // Approved and started here already.
            return Ok(());
        }
        if let Some(reason) = self.request_closed(&command) {
            self.refuse_command(from, Some(&signed), &reason, None);
            return Err(reason);
        }
        let mut changed = self.hold_request(from, &command, &signed, needed);
        let (counted_any, refused) = self.count_approvals(from, &command, &signed, needed);
        changed |= counted_any;
        let trusted = &self.config.trust_admin;
        let Some(keys) = self
            .pending
            .get(&id)
            .map(|p| counted(&p.signed, &command, trusted))
        else {
            return Ok(());
        };
        if keys.len() >= needed {
            let p = self.pending.remove(&id).map(|p| p.signed).unwrap_or(signed);
            self.save_requests();
            self.guard.remember_until(&id, command.remember_until_ms());
            let keys: Vec<String> = keys.iter().map(ToString::to_string).collect();
            info!(request = %id, approvals = keys.len(), "the change is approved; it starts");
            self.audit_entry(Entry {
                event: "accepted".into(),
                key: Some(p.key.clone()),
                from: Some(from.to_owned()),
                reason: Some(format!(
                    "approved by {} of {needed}: {}",
                    keys.len(),
                    keys.join(", ")
                )),
                ..command_fields(Some(&command))
            });
            self.follow_command(command, p);
            return Ok(());
        }
        if changed {
            self.save_requests();
        }
        match refused.into_iter().next() {
            Some(reason) if !changed => Err(reason),
            _ => Ok(()),
        }
    }

    /// Why a request can no longer be approved (rejected, expired, or
    /// issued in the site's future), if it cannot.
    fn request_closed(&mut self, command: &Command) -> Option<String> {
        let id = &command.id;
        if let Some(r) = self.rejected.iter().find(|r| r.id == *id) {
            return Some(format!(
                "request {id} was rejected by {}: {}",
                r.key, r.reason
            ));
        }
        let site_now = now_unix_ms().saturating_add_signed(self.site_offset_ms());
        if !approval::open(command.issued_at_ms, REQUEST_TTL_MS, site_now) {
            self.pending.remove(id);
            return Some(format!(
                "request {id} expired: it waited for approvals for {} and can no longer be approved",
                humantime::format_duration(Duration::from_millis(REQUEST_TTL_MS))
            ));
        }
        if command.issued_at_ms > site_now + lanup_protocol::rollout::MAX_SKEW_MS {
            let ahead = (command.issued_at_ms - site_now) / 1000;
            return Some(lanup_protocol::rollout::Refusal::Future(ahead).to_string());
        }
        None
    }

    /// Holds a request this node did not hold (the oldest makes room
    /// beyond [`MAX_PENDING`]); whether it is new.
    fn hold_request(
        &mut self,
        from: &str,
        command: &Command,
        signed: &SignedCommand,
        needed: usize,
    ) -> bool {
        if self.pending.contains_key(&command.id) {
            return false;
        }
        if self.pending.len() >= MAX_PENDING {
            let oldest = self
                .pending
                .iter()
                .min_by_key(|(_, p)| p.command.as_ref().map_or(0, |c| c.issued_at_ms))
                .map(|(id, _)| id.clone());
            if let Some(old) = oldest {
                warn!(request = %old, "too many requests wait for approval; the oldest is dropped");
                self.pending.remove(&old);
            }
        }
        info!(source = from, key = %signed.key, action = ?command.action, needed, "a change was requested; it waits for approval");
        self.audit_entry(Entry {
            event: "requested".into(),
            key: Some(signed.key.clone()),
            from: Some(from.to_owned()),
            reason: command.reason.clone(),
            ..command_fields(Some(command))
        });
        let request = SignedCommand {
            approvals: Vec::new(),
            ..signed.clone()
        };
        self.pending.insert(
            command.id.clone(),
            Pending {
                signed: request,
                command: Some(command.clone()),
                refused: Vec::new(),
            },
        );
        true
    }

    /// Adds the approvals `signed` carries to its held request, one by
    /// one: whether any counted, and why the others did not.
    fn count_approvals(
        &mut self,
        from: &str,
        command: &Command,
        signed: &SignedCommand,
        needed: usize,
    ) -> (bool, Vec<String>) {
        let id = &command.id;
        let trusted = self.config.trust_admin.clone();
        let (mut changed, mut refused) = (false, Vec::new());
        for a in signed.approvals.iter().take(MAX_APPROVALS_PER_MESSAGE) {
            let Some(p) = self.pending.get_mut(id) else {
                break;
            };
            if p.signed.approvals.contains(a) {
                continue;
            }
            let counted = approval::tally(&p.signed, &p.signed.approvals, &trusted, needed).keys;
            let verdict = approval::counts(&p.signed, a, &trusted).and_then(|key| {
                if counted.contains(&key) {
                    Err(NotCounted::Again(key.to_string()))
                } else {
                    Ok(key)
                }
            });
            let entry = match verdict {
                Ok(key) => {
                    p.signed.approvals.push(a.clone());
                    changed = true;
                    info!(request = %id, key = %key, "approval counted");
                    Some(Entry {
                        event: "approved".into(),
                        key: Some(key.to_string()),
                        from: Some(from.to_owned()),
                        ..command_fields(Some(command))
                    })
                }
                Err(e) => {
                    let reason = e.to_string();
                    let new = p.refused.len() < MAX_REFUSED && !p.refused.contains(&reason);
                    refused.push(reason.clone());
                    new.then(|| {
                        p.refused.push(reason.clone());
                        warn!(request = %id, source = from, reason, "approval refused");
                        Entry {
                            event: "approval-refused".into(),
                            key: Some(a.key.clone()),
                            from: Some(from.to_owned()),
                            reason: Some(reason),
                            ..command_fields(Some(command))
                        }
                    })
                }
            };
            if let Some(entry) = entry {
                self.audit_entry(entry);
            }
        }
        (changed, refused)
    }

    /// Asks `peer` for the requests its heartbeat names that this node
    /// does not hold (it was away when they were made): at most
    /// [`MAX_PENDING`] of them, each no more often than a rollout's
    /// catch-up, ids of a sane length only.
    pub(super) fn catch_up_requests(&mut self, peer: PeerId, ids: &[String]) {
        for id in ids.iter().take(MAX_PENDING) {
            let known = self.pending.contains_key(id)
                || self.rejected.iter().any(|r| &r.id == id)
                || self.guard.seen(id);
            if !known && id.len() <= MAX_ID_LEN {
                self.maybe_catch_up(peer, id);
            }
        }
    }

    /// Drops requests that were not approved in time, recording each.
    pub(super) fn expire_requests(&mut self) {
        let site_now = now_unix_ms().saturating_add_signed(self.site_offset_ms());
        let expired: Vec<String> = self
            .pending
            .iter()
            .filter(|(_, p)| {
                p.command
                    .as_ref()
                    .is_some_and(|c| !approval::open(c.issued_at_ms, REQUEST_TTL_MS, site_now))
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in &expired {
            let Some(p) = self.pending.remove(id) else {
                continue;
            };
            info!(request = %id, "a request expired before enough admins approved it");
            self.audit_entry(Entry {
                event: "expired".into(),
                key: Some(p.signed.key.clone()),
                reason: Some("not approved within 24 h".into()),
                ..command_fields(p.command.as_ref())
            });
        }
        if !expired.is_empty() {
            self.save_requests();
        }
    }

    /// A signed reject (itself checked and fresh): the request it names
    /// can no longer start.
    pub(super) fn reject(&mut self, command: &Command, signed: &SignedCommand, request: &str) {
        let reason = command
            .reason
            .clone()
            .unwrap_or_else(|| "no reason given".into());
        let pending = self.pending.remove(request);
        if !self.rejected.iter().any(|r| r.id == request) {
            if self.rejected.len() >= MAX_REJECTED {
                self.rejected.remove(0);
            }
            self.rejected.push(Rejected {
                id: request.to_owned(),
                key: signed.key.clone(),
                reason: reason.clone(),
                at_ms: now_unix_ms(),
            });
        }
        info!(request, key = %signed.key, reason, "request rejected");
        let request_fields = command_fields(pending.as_ref().and_then(|p| p.command.as_ref()));
        self.audit_entry(Entry {
            event: "rejected".into(),
            key: Some(signed.key.clone()),
            reason: Some(reason),
            id: Some(request.to_owned()),
            ..request_fields
        });
        self.save_requests();
    }

    /// The request (with every approval that counted) or the started
    /// command `id` names, to pass on to the site.
    pub(super) fn merged(&self, id: &str) -> Option<SignedCommand> {
        self.pending.get(id).map(|p| p.signed.clone()).or_else(|| {
            self.rollout
                .as_ref()
                .filter(|r| r.command.id == id)
                .map(|r| r.signed.clone())
        })
    }

    /// Writes `STATE/requests.json`.
    pub(super) fn save_requests(&self) {
        let saved = SavedRequests {
            pending: self.pending.values().cloned().collect(),
            rejected: self.rejected.clone(),
        };
        let path = self.config.state.join(REQUESTS_FILE);
        let written = serde_json::to_vec_pretty(&saved)
            .map_err(std::io::Error::other)
            .and_then(|bytes| crate::apply::write_synced(&path, &bytes));
        if let Err(e) = written {
            warn!(file = %path.display(), error = %e, "cannot save the requests waiting for approval");
        }
    }

    /// The requests waiting here, for status.
    pub(super) fn requests_json(&self) -> serde_json::Value {
        let trusted = &self.config.trust_admin;
        let pending: Vec<serde_json::Value> = self
            .pending
            .values()
            .filter_map(|p| {
                let c = p.command.as_ref()?;
                let needed = self.threshold(&c.action);
                let keys = counted(&p.signed, c, trusted);
                let (action, version) = action_version(&c.action);
                Some(serde_json::json!({
                    "id": c.id,
                    "action": action,
                    "version": version,
                    "requested_by": p.signed.key,
                    "reason": c.reason,
                    "issued_at_ms": c.issued_at_ms,
                    "expires_at_ms": c.issued_at_ms + REQUEST_TTL_MS,
                    "approved_by": keys.iter().map(ToString::to_string).collect::<Vec<_>>(),
                    "needed": needed,
                    "refused": p.refused,
                    "now": c.now,
                    "signed": p.signed,
                }))
            })
            .collect();
        serde_json::json!({ "pending": pending, "rejected": self.rejected })
    }
}

/// The distinct trusted keys that count for `request`: its signer, the
/// approvals over its bytes, and for a site's part of a fleet rollout the
/// signers of the fleet plan it carries.
fn counted(
    request: &SignedCommand,
    command: &Command,
    trusted: &[lanup_protocol::sign::PublicKey],
) -> Vec<lanup_protocol::sign::PublicKey> {
    let mut keys = approval::tally(request, &request.approvals, trusted, 1).keys;
    for key in lanup_protocol::fleet::endorsers(request, command, trusted) {
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
    keys
}

/// A command's action and release as words.
pub(super) fn action_version(action: &Action) -> (&'static str, Option<String>) {
    match action {
        Action::Rollout { version } => ("rollout", Some(version.clone())),
        Action::Abort => ("abort", None),
        Action::Rollback { version } => ("rollback", Some(version.clone())),
        Action::Reject { request } => ("reject", Some(request.clone())),
    }
}
