//! What a node says about itself and the site: the clock skew it
//! measures, the answers of its control socket (`lanup status`, `peers`,
//! `check`, `apply`, `rollout`), its site report, and the per-peer memory
//! it keeps bounded.

use super::rollout::CATCH_UP_RETRY;
use super::*;
use lanup_protocol::report::{self, NodeState, Report, RolloutState};

impl Node {
    /// Keeps what the node remembers per peer bounded: authors not heard
    /// for ten minutes, catch-up questions past their retry, and refusals
    /// past their quiet time are forgotten.
    pub(super) fn prune(&mut self) {
        const FORGET: Duration = Duration::from_secs(600);
        // Once a minute, the application's output log is kept bounded.
        if self.ticks.is_multiple_of(60) {
            if let Some(applier) = self.applier.clone() {
                tokio::task::spawn_blocking(move || {
                    if let Err(e) = applier.rotate_app_log() {
                        warn!(error = %e, "cannot rotate the application's log");
                    }
                });
            }
        }
        self.heard.retain(|_, h| h.at.elapsed() < FORGET);
        self.unanswered.retain(|_, at| at.elapsed() < FORGET);
        self.asked.retain(|_, at| at.elapsed() < CATCH_UP_RETRY);
        // Once a minute: how many refusals went unlogged.
        let unlogged = self.ticks.is_multiple_of(60).then(|| self.refusals.prune());
        if let Some(unlogged) = unlogged.flatten() {
            warn!(unlogged, "refused more rollout commands than are logged one by one (one line per command, or per sender of forgeries, every ten minutes)");
        }
        self.suspects.retain(|_, at| at.elapsed() < FAILING_FOR);
        if self.refused.len() > 1024 {
            self.refused.clear();
        }
    }

    /// Peers that stopped talking without disconnecting (a frozen machine)
    /// are no longer asked for chunks; what is in flight to them is asked
    /// elsewhere, and the fetcher treats their chunks as missing.
    pub(super) fn notice_silence(&mut self) {
        let silent: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(_, info)| !info.silent)
            .filter(|(peer, info)| match &info.heartbeat {
                Some((at, hb)) => !self.live(peer, *at, hb),
                None => info.connected_at.elapsed() >= PEER_SILENT,
            })
            .map(|(peer, _)| *peer)
            .collect();
        for peer in silent {
            if let Some(info) = self.peers.get_mut(&peer) {
                info.silent = true;
            }
            warn!(%peer, "peer connected but silent past its next heartbeat; not asking it for chunks");
            self.transfer.peer_silent(&peer);
        }
    }

    /// How far the site's clock is from this node's, in ms: the median of
    /// the skews measured to the live nodes it hears (and 0 for itself; the
    /// mean of the middle two for an even count). A node whose clock is off
    /// sees the others agree against it, so freshness is judged by the
    /// site's time, not by one machine's wrong clock.
    pub(super) fn site_offset_ms(&self) -> i64 {
        let mut skews: Vec<i64> = self
            .heard
            .iter()
            .filter(|(author, h)| **author != self.local && self.live(author, h.at, &h.heartbeat))
            .filter_map(|(_, h)| h.skew_ms)
            .chain([0])
            .collect();
        skews.sort_unstable();
        let n = skews.len();
        if n % 2 == 1 {
            skews[n / 2]
        } else {
            (skews[n / 2 - 1] + skews[n / 2]) / 2
        }
    }

    /// Answers the CLI: one line, or for an apply a line per step.
    pub(super) fn control(
        &mut self,
        request: ControlRequest,
        reply: mpsc::Sender<serde_json::Value>,
    ) {
        if let ControlRequest::Rollout { signed } = request {
            let id = serde_json::from_str::<Command>(&signed.command).map(|c| c.id);
            let answer = match self.on_cli_command(signed.clone()) {
                Ok(()) => {
                    let net = self.net.clone();
                    let topic = self.rollout_topic.clone();
                    // The site is sent the request with every approval that
                    // counted here, so a node that missed one catches up.
                    let id = id.unwrap_or_default();
                    let merged = self.merged(&id).unwrap_or(signed);
                    if let Ok(data) = serde_json::to_vec(&merged) {
                        self.tasks.spawn(async move {
                            let _ = net.publish(&topic, data).await;
                        });
                    }
                    let waiting = self.pending.contains_key(&id);
                    serde_json::json!({
                        "accepted": true,
                        "waiting": waiting,
                        "rollout": self.rollout_json(),
                        "requests": self.requests_json(),
                    })
                }
                Err(reason) => serde_json::json!({ "error": format!("refused: {reason}") }),
            };
            let _ = reply.try_send(answer);
            return;
        }
        if let ControlRequest::Check = request {
            self.check(reply);
            return;
        }
        if let ControlRequest::History { change } = request {
            self.change_record(change, reply);
            return;
        }
        if let ControlRequest::Revoke { signed } = request {
            let answer = match self.take_revocations(&signed, "this node's CLI") {
                Ok(taken) => serde_json::json!({
                    "taken": taken,
                    "revoked": self.gate.revoked_keys(),
                }),
                Err(reason) => serde_json::json!({ "error": format!("refused: {reason}") }),
            };
            let _ = reply.try_send(answer);
            return;
        }
        if let ControlRequest::Apply { version } = request {
            if let Err(e) = self.start_apply(&version, Some(reply.clone())) {
                let _ = reply.try_send(serde_json::json!({ "error": format!("{e:#}") }));
            }
            return;
        }
        let answer = self.answer(request);
        let _ = reply.try_send(answer);
    }

    pub(super) fn answer(&mut self, request: ControlRequest) -> serde_json::Value {
        match request {
            ControlRequest::Status => self.status_json(),
            ControlRequest::Peers => serde_json::json!({
                "peers": self.peers.keys().map(ToString::to_string).collect::<Vec<_>>()
            }),
            ControlRequest::Apply { .. }
            | ControlRequest::Revoke { .. }
            | ControlRequest::Rollout { .. }
            | ControlRequest::History { .. }
            | ControlRequest::Check => {
                serde_json::json!({ "error": "not here" })
            }
        }
    }

    /// `lanup status --json`: the site as this node sees it.
    fn status_json(&self) -> serde_json::Value {
        let now_s = now_unix_ms() / 1000;
        // Peers that are not members, once only members are admitted, are
        // no nodes of the site: named apart.
        let strangers: Vec<String> = self
            .peers
            .keys()
            .filter(|p| !self.gate.admits(p, now_s))
            .map(PeerId::to_string)
            .collect();
        let reports = self.reporter.as_ref().map(|r| {
            let said = r.said();
            serde_json::json!({
                "to": self.config.report_to,
                "sent_ms": said.sent_ms,
                "reports_sent": said.reports_sent,
                "bytes_sent": said.bytes_sent,
                "last_error": said.last_error,
            })
        });
        serde_json::json!({
            "site": self.config.site,
            "nodes": self.node_rows(now_s),
            "rollout": self.rollout_json(),
            "requests": self.requests_json(),
            "site_clock_offset_ms": self.site_offset_ms(),
            "reports": reports,
            "membership": {
                "enrolled": self.own_certificate.is_some(),
                "members_only": self.gate.enforcing(now_s),
                "strangers": strangers,
                "revoked": self.gate.revoked_keys(),
                "revoked_issued": self.gate.revocations_issued(),
            },
        })
    }

    /// A row of `lanup status` for every node of the site this node hears:
    /// itself first, its peers, then nodes heard only through them.
    fn node_rows(&self, now_s: u64) -> Vec<serde_json::Value> {
        let own = self.own_heartbeat();
        let fetcher = self.fetcher();
        let mut mine = status_row(&self.local, Some(&own), Some(0));
        // This node says it is the fetcher only once it has heard the site
        // (settled), as it acts.
        mine["fetcher"] = serde_json::json!(fetcher == Some(self.local) && self.was_fetcher);
        mine["self"] = serde_json::json!(true);
        mine["clock_skew_ms"] = serde_json::json!(0);
        let mut nodes = vec![mine];
        let skew = |peer: &PeerId| self.heard.get(peer).and_then(|h| h.skew_ms);
        for (peer, info) in self
            .peers
            .iter()
            .filter(|(p, _)| self.gate.admits(p, now_s))
        {
            let (hb, seen) = match &info.heartbeat {
                Some((at, hb)) => (Some(hb), Some(at.elapsed().as_millis() as u64)),
                None => (None, None),
            };
            let mut r = status_row(peer, hb, seen);
            r["fetcher"] = serde_json::json!(fetcher == Some(*peer));
            r["clock_skew_ms"] = serde_json::json!(skew(peer));
            nodes.push(r);
        }
        for (author, heard) in self.heard_only() {
            let seen = heard.at.elapsed().as_millis() as u64;
            let mut r = status_row(author, Some(&heard.heartbeat), Some(seen));
            r["fetcher"] = serde_json::json!(fetcher == Some(*author));
            r["via_gossip"] = serde_json::json!(true);
            r["clock_skew_ms"] = serde_json::json!(skew(author));
            nodes.push(r);
        }
        nodes
    }

    /// `lanup check` on this node: the origin is polled now by the site's
    /// fetcher, whichever node the administrator is on. The check waits
    /// until this node has heard the site; then this node polls if it is
    /// the fetcher, else it asks the fetcher. A fetcher that cannot be
    /// reached (it has just gone away and the site has not replaced it yet)
    /// is asked again, or its stand-in is, for up to [`CHECK_WAIT`].
    fn check(&mut self, reply: mpsc::Sender<serde_json::Value>) {
        let pending = self.check.get_or_insert_with(|| PendingCheck {
            replies: Vec::new(),
            until: Instant::now() + CHECK_WAIT,
            asking: false,
            next_at: Instant::now(),
            last_error: None,
            unreached: None,
        });
        if pending.replies.len() >= CHECKS_HELD {
            let _ = reply.try_send(serde_json::json!({
                "error": "too many checks are waiting already; try again in a few seconds"
            }));
            return;
        }
        pending.replies.push(reply);
        self.pass_on_check();
    }

    /// Moves a waiting check on: answered by this node when it is the
    /// fetcher, passed on to the fetcher when it is another node, answered
    /// with the last reason once [`CHECK_WAIT`] has passed.
    pub(super) fn pass_on_check(&mut self) {
        let Some(pending) = &self.check else { return };
        let now = Instant::now();
        if pending.asking || now < pending.next_at {
            return;
        }
        let past = now >= pending.until;
        if !self.settled() && !past {
            return;
        }
        let fetcher = self.fetcher();
        let this_one = fetcher == Some(self.local);
        match fetcher {
            _ if this_one || (fetcher.is_none() && self.config.origin.is_some()) => {
                let polling = self.poll_now();
                self.answer_check(serde_json::json!({ "fetcher": true, "polling": polling }));
            }
            None => self.answer_check(serde_json::json!({
                "error": "no node this one hears has an origin configured"
            })),
            Some(_) if past => {
                let error = pending
                    .last_error
                    .clone()
                    .unwrap_or_else(|| "the site's fetcher did not answer".into());
                self.answer_check(serde_json::json!({ "error": error }));
            }
            Some(fetcher) => {
                if let Some(p) = &mut self.check {
                    p.asking = true;
                }
                let (net, done) = (self.net.clone(), self.done_tx.clone());
                self.tasks.spawn(async move {
                    let answer = ask_to_check(&net, fetcher).await;
                    let _ = done.send(Done::Checked(fetcher, answer)).await;
                });
            }
        }
    }

    /// The fetcher's answer to a check this node passed on.
    pub(super) fn checked(&mut self, fetcher: PeerId, answer: Result<bool, CheckError>) {
        let Some(pending) = &mut self.check else {
            return;
        };
        pending.asking = false;
        match answer {
            Ok(polling) => {
                info!(%fetcher, "passed a lanup check on to the site's fetcher");
                self.answer_check(serde_json::json!({
                    "fetcher": false, "asked": fetcher.to_string(), "polling": polling,
                }));
            }
            Err(e) => {
                debug!(%fetcher, error = %e, "a lanup check did not reach the site's fetcher; asking again");
                let unreachable = matches!(e, CheckError::Unreached(_));
                if unreachable && self.peers.contains_key(&fetcher) {
                    // Connected and not answering: a frozen machine. It is
                    // not live until it speaks again.
                    self.unanswered.insert(fetcher, Instant::now());
                }
                let count = match pending.unreached {
                    Some((peer, n)) if peer == fetcher && unreachable => n + 1,
                    _ if unreachable => 1,
                    _ => 0,
                };
                pending.unreached = (count > 0).then_some((fetcher, count));
                pending.last_error = Some(e.to_string());
                pending.next_at = Instant::now() + CHECK_RETRY;
                if count >= UNREACHED_SUSPECT && fetcher != self.local {
                    warn!(peer = %fetcher, attempts = count, "the site's fetcher cannot be reached; the next node takes over");
                    self.suspects.insert(fetcher, Instant::now());
                    if let Some(p) = &mut self.check {
                        p.unreached = None;
                    }
                }
            }
        }
    }

    fn answer_check(&mut self, answer: serde_json::Value) {
        for reply in self.check.take().into_iter().flat_map(|p| p.replies) {
            let _ = reply.try_send(answer.clone());
        }
    }

    /// Has the origin polled now, backoff or not, or as soon as the job
    /// under way (a download) ends: false in that case. The fetcher polls
    /// at most once a second however often it is asked.
    pub(super) fn poll_now(&mut self) -> bool {
        self.fetcher.check_now();
        self.fetcher.busy() != Some(lanup_protocol::fetcher::Job::Download)
    }

    /// Hands the reporter what the site would report now, while this
    /// node is the site's fetcher (one report per site), else nothing.
    pub(super) fn report_duties(&mut self) {
        let m = &self.metrics;
        m.origin_total(
            self.fetcher
                .origin_bytes
                .load(std::sync::atomic::Ordering::Relaxed),
        );
        m.peers.set(self.peers.len() as i64);
        let staged = self
            .transfer
            .target()
            .filter(|t| t.staged)
            .map(|t| t.manifest.release_name());
        m.set_releases(self.installed_name().as_deref(), staged.as_deref());
        let rollout = self.rollout_json();
        m.set_rollout(rollout["stage"].as_str().zip(rollout["version"].as_str()));
        let Some(reporter) = &self.reporter else {
            return;
        };
        m.reports_total(reporter.said().reports_sent);
        let mine = self.was_fetcher && self.fetcher() == Some(self.local);
        let report = mine.then(|| self.site_report());
        if let Some(r) = &self.reporter {
            r.update(report);
        }
    }

    /// The site as this node hears it, in a report's terms (its send time
    /// is the reporter's to set).
    fn site_report(&mut self) -> Report {
        let status = self.answer(ControlRequest::Status);
        let text = |v: &serde_json::Value| v.as_str().map(str::to_owned);
        let mut nodes: Vec<NodeState> = status["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .take(report::MAX_NODES)
            .map(|n| NodeState {
                id: text(&n["peer_id"]).unwrap_or_default(),
                lanup: text(&n["lanup_version"]),
                installed: text(&n["installed_version"]),
                staged: text(&n["staged_version"]),
                state: text(&n["state"]).unwrap_or_else(|| "unknown".into()),
                error: text(&n["last_error"])
                    .map(|e| e.chars().take(report::MAX_ERROR_CHARS).collect()),
                failed: text(&n["failed_version"]),
            })
            .collect();
        nodes.sort_by(|a, b| a.id.cmp(&b.id));
        let r = &status["rollout"];
        let rollout = text(&r["id"]).map(|id| RolloutState {
            id,
            action: text(&r["action"]).unwrap_or_default(),
            version: text(&r["version"]).unwrap_or_default(),
            stage: text(&r["stage"]).unwrap_or_default(),
            reason: text(&r["reason"]),
        });
        Report {
            site: self.config.site.clone(),
            sender: self.local.to_string(),
            sent_at_ms: 0,
            nodes,
            rollout,
        }
    }
}

/// How long a `lanup check` may take to reach the site's fetcher (under
/// the control socket's patience): long enough for the site to replace a
/// fetcher that has just gone.
const CHECK_WAIT: Duration = Duration::from_secs(12);
/// How long one attempt waits for the fetcher's answer.
const CHECK_ASK: Duration = Duration::from_secs(4);
/// The pause between attempts.
const CHECK_RETRY: Duration = Duration::from_secs(1);
/// Checks waiting at once, from every administrator together.
const CHECKS_HELD: usize = 16;

/// `lanup check`s waiting for the site's fetcher; they share one answer.
pub(super) struct PendingCheck {
    replies: Vec<mpsc::Sender<serde_json::Value>>,
    /// Past this, the last reason is the answer.
    until: Instant,
    /// A request to the fetcher is under way.
    asking: bool,
    /// The next attempt, not before.
    next_at: Instant,
    last_error: Option<String>,
    /// The fetcher that could not be reached, and how many times in a row.
    unreached: Option<(PeerId, u32)>,
}

/// Attempts in a row that cannot reach the site's fetcher before this node
/// suspects it: a fetcher no one can reach (gone, or never reachable:
/// gossip passed on by others, no address that answers) is no fetcher,
/// and the site passes it over in seconds rather than waiting on it.
const UNREACHED_SUSPECT: u32 = 3;

/// Why a check passed on to the site's fetcher did not reach it.
#[derive(Debug)]
pub(super) enum CheckError {
    /// It could not be reached, or did not answer: counts toward
    /// suspecting it.
    Unreached(String),
    /// It answered, but not as the fetcher (the site is choosing one, or
    /// it runs an older lanup).
    Refused(String),
}

impl std::fmt::Display for CheckError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CheckError::Unreached(why) | CheckError::Refused(why) => f.write_str(why),
        }
    }
}

/// Asks `fetcher` to poll the origin now; whether it polls at once, or why
/// it cannot.
async fn ask_to_check(net: &NetworkClient, fetcher: PeerId) -> Result<bool, CheckError> {
    let asked = tokio::time::timeout(CHECK_ASK, net.request(fetcher, Request::Check));
    match asked.await {
        Ok(Ok(Response::Check {
            fetcher: true,
            polling,
        })) => Ok(polling),
        Ok(Ok(Response::Check { fetcher: false, .. })) => Err(CheckError::Refused(format!(
            "{fetcher} does not count itself the site's fetcher (the site is choosing one); try again in a few seconds"
        ))),
        Ok(Ok(_)) => Err(CheckError::Refused(format!(
            "the site's fetcher {fetcher} does not know this request (it runs an older lanup)"
        ))),
        Ok(Err(e)) => Err(CheckError::Unreached(format!(
            "cannot reach the site's fetcher {fetcher}: {e:#}"
        ))),
        Err(_) => Err(CheckError::Unreached(format!(
            "the site's fetcher {fetcher} did not answer within {} s",
            CHECK_ASK.as_secs()
        ))),
    }
}

/// A node's row in `lanup status`, from its last heartbeat (None: it
/// connected and has not spoken yet).
fn status_row(
    peer: &PeerId,
    hb: Option<&Heartbeat>,
    last_seen_ms: Option<u64>,
) -> serde_json::Value {
    let member = hb.and_then(|h| h.member.as_ref());
    serde_json::json!({
        "peer_id": peer.to_string(),
        "installed_version": hb.and_then(|h| h.installed_version.clone()),
        "lanup_version": hb.and_then(|h| h.lanup_version.clone()),
        "apply": hb.and_then(|h| h.apply.clone()),
        "apply_step": hb.and_then(|h| h.apply_step.clone()),
        "last_error": hb.and_then(|h| h.last_error.clone()),
        "failed_version": hb.and_then(|h| h.failed_version.clone()),
        "state": hb.map_or("unknown", |h| h.state.as_str()),
        "release": hb.and_then(|h| h.release.clone()),
        "staged_version": hb.and_then(|h| h.staged_version.clone()),
        "bytes_have": hb.map_or(0, |h| h.bytes_have),
        "bytes_total": hb.map_or(0, |h| h.bytes_total),
        "origin_bytes": hb.map_or(0, |h| h.origin_bytes),
        "last_seen_ms": last_seen_ms,
        "fetcher": false,
        "group": member.map(|m| m.group.clone()),
        "role": member.and_then(|m| m.role.clone()),
        "priority": member.map(|m| m.priority),
        "waiting": hb.and_then(|h| h.waiting.clone()),
    })
}
