//! What a node says about itself and the site: the heartbeat it gossips,
//! the clock skew it measures, the answers of its control socket
//! (`lanup status`, `peers`, `check`, `apply`, `rollout`), and the per-peer
//! memory it keeps bounded.

use super::rollout::{CATCH_UP_RETRY, REFUSAL_QUIET};
use super::*;

impl Node {
    /// Keeps what the node remembers per peer bounded: authors not heard
    /// for ten minutes, catch-up questions past their retry, and (beyond a
    /// thousand) the refusals remembered to warn once are forgotten.
    pub(super) fn prune(&mut self) {
        const FORGET: Duration = Duration::from_secs(600);
        // Once a minute, the application's output log is kept bounded.
        if self.heartbeats_sent.is_multiple_of(60) {
            if let Some(applier) = self.applier.clone() {
                tokio::task::spawn_blocking(move || {
                    if let Err(e) = applier.rotate_app_log() {
                        warn!(error = %e, "cannot rotate the application's log");
                    }
                });
            }
        }
        self.heard.retain(|_, h| h.at.elapsed() < FORGET);
        self.asked.retain(|_, at| at.elapsed() < CATCH_UP_RETRY);
        self.refusals.retain(|_, at| at.elapsed() < REFUSAL_QUIET);
        self.suspects.retain(|_, at| at.elapsed() < FAILING_FOR);
        if self.refused.len() > 1024 {
            self.refused.clear();
        }
    }

    /// Peers that stopped talking without disconnecting (a frozen machine)
    /// are no longer asked for chunks; what is in flight to them is asked
    /// elsewhere, and the fetcher treats their chunks as missing.
    pub(super) fn notice_silence(&mut self) {
        for (peer, info) in &mut self.peers {
            let last = info
                .heartbeat
                .as_ref()
                .map_or(info.connected_at, |(at, _)| *at);
            if !info.silent && last.elapsed() >= PEER_SILENT {
                info.silent = true;
                warn!(%peer, "peer connected but silent for 5 s; not asking it for chunks");
                if let Some(t) = &mut self.target {
                    t.transfer.peer_disconnected(peer);
                }
            }
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
            .filter(|(author, h)| **author != self.local && h.at.elapsed() < PEER_SILENT)
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

    pub(super) fn own_heartbeat(&self) -> Heartbeat {
        let t = self.target.as_ref();
        let installed = self.installed_name();
        let last = self.last_apply.as_ref();
        let target_failed = t.is_some_and(|t| {
            last.is_some_and(|o| {
                o.ending == Ending::RolledBack && o.version == t.manifest.release_name()
            })
        });
        Heartbeat {
            has_origin: self.config.origin.is_some(),
            state: match t {
                _ if self.applying.is_some() => "applying",
                Some(t) if self.runs(&t.manifest) => "installed",
                Some(_) if target_failed => "rolled-back",
                None if installed.is_some() => "installed",
                None => "idle",
                Some(t) if t.staged => "staged",
                Some(t) if t.staging => "staging",
                Some(_) => "fetching",
            }
            .into(),
            installed_version: installed,
            lanup_version: Some(crate::upgrade::version().to_owned()),
            apply: match &self.applying {
                Some(_) => Some("applying".into()),
                None => last.map(|o| {
                    match o.ending {
                        Ending::Committed => "committed",
                        Ending::RolledBack => "rolled-back",
                        Ending::Failed => "failed",
                    }
                    .to_owned()
                }),
            },
            apply_step: self.applying.as_ref().map(|(_, step)| step.clone()),
            // A release that did not install (rolled back, or refused
            // before anything changed) halts a rollout of it.
            failed_version: last
                .filter(|o| o.ending != Ending::Committed)
                .map(|o| o.version.clone()),
            boot_ms: self.boot_ms,
            seq: self.heartbeats_sent,
            command_id: self.rollout.as_ref().map(Rollout::newest_id),
            last_error: self
                .disk_error
                .as_ref()
                .map(|e| format!("this node's disk: {e}"))
                .or_else(|| t.and_then(|t| t.no_room.as_ref().map(|(r, _)| r.clone())))
                .or_else(|| {
                    t.and_then(|t| {
                        t.stage_failed.as_ref().map(|(reason, _)| {
                            format!("staging {} failed: {reason}", t.manifest.release_name())
                        })
                    })
                })
                .or_else(|| {
                    let fetcher = self.fetcher.status();
                    let retry = fetcher.retry_at.map_or(0, |at| {
                        at.saturating_duration_since(Instant::now()).as_secs()
                    });
                    fetcher
                        .error
                        .map(|e| format!("origin: {e} (next try in {retry} s)"))
                })
                .or_else(|| {
                    last.filter(|o| o.ending != Ending::Committed)
                        .and_then(|o| o.reason.as_ref())
                        .map(|r| format!("{}: {r}", last.map_or("", |o| o.version.as_str())))
                }),
            release: t.map(|t| t.manifest.release_name()),
            staged_version: t.filter(|t| t.staged).map(|t| t.manifest.release_name()),
            bytes_have: t.map_or(0, |t| t.bytes_total - t.transfer.missing_bytes()),
            bytes_total: t.map_or(0, |t| t.bytes_total),
            origin_bytes: self
                .fetcher
                .origin_bytes
                .load(std::sync::atomic::Ordering::Relaxed),
            origin_received: self
                .fetcher
                .received
                .load(std::sync::atomic::Ordering::Relaxed),
            origin_failing: self.origin_failing(),
            downloading: self.downloading(),
            clock_ms: now_unix_ms(),
            refused: self.refused_command.clone(),
            suspects: self
                .suspects
                .iter()
                .filter(|(_, at)| at.elapsed() < FAILING_FOR)
                .map(|(peer, _)| peer.to_string())
                .collect(),
        }
    }

    /// Answers the CLI: one line, or for an apply a line per step.
    pub(super) fn control(
        &mut self,
        request: ControlRequest,
        reply: mpsc::Sender<serde_json::Value>,
    ) {
        if let ControlRequest::Rollout { signed } = request {
            let answer = match self.on_cli_command(signed.clone()) {
                Ok(()) => {
                    let net = self.net.clone();
                    let topic = self.rollout_topic.clone();
                    if let Ok(data) = serde_json::to_vec(&signed) {
                        tokio::spawn(async move {
                            let _ = net.publish(&topic, data).await;
                        });
                    }
                    serde_json::json!({ "accepted": true, "rollout": self.rollout_json() })
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
        let row = |peer: &PeerId, hb: Option<&Heartbeat>, last_seen_ms: Option<u64>| {
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
            })
        };
        match request {
            ControlRequest::Status => {
                let own = self.own_heartbeat();
                let mut mine = row(&self.local, Some(&own), Some(0));
                let fetcher = self.fetcher();
                // This node says it is the fetcher only once it has heard
                // the site (settled), as it acts.
                mine["fetcher"] =
                    serde_json::json!(fetcher == Some(self.local) && self.was_fetcher);
                mine["self"] = serde_json::json!(true);
                let mut nodes = vec![mine];
                for (peer, info) in &self.peers {
                    let (hb, seen) = match &info.heartbeat {
                        Some((at, hb)) => (Some(hb), Some(at.elapsed().as_millis() as u64)),
                        None => (None, None),
                    };
                    let mut r = row(peer, hb, seen);
                    r["fetcher"] = serde_json::json!(fetcher == Some(*peer));
                    nodes.push(r);
                }
                for (author, heard) in self.heard_only() {
                    let seen = heard.at.elapsed().as_millis() as u64;
                    let mut r = row(author, Some(&heard.heartbeat), Some(seen));
                    r["fetcher"] = serde_json::json!(fetcher == Some(*author));
                    r["via_gossip"] = serde_json::json!(true);
                    nodes.push(r);
                }
                for row in &mut nodes {
                    let peer = row["peer_id"]
                        .as_str()
                        .and_then(|p| p.parse::<PeerId>().ok());
                    let skew = match peer {
                        Some(p) if p == self.local => Some(0),
                        Some(p) => self.heard.get(&p).and_then(|h| h.skew_ms),
                        None => None,
                    };
                    row["clock_skew_ms"] = serde_json::json!(skew);
                }
                serde_json::json!({
                    "site": self.config.site,
                    "nodes": nodes,
                    "rollout": self.rollout_json(),
                    "site_clock_offset_ms": self.site_offset_ms(),
                })
            }
            ControlRequest::Peers => serde_json::json!({
                "peers": self.peers.keys().map(ToString::to_string).collect::<Vec<_>>()
            }),
            ControlRequest::Apply { .. }
            | ControlRequest::Rollout { .. }
            | ControlRequest::Check => {
                serde_json::json!({ "error": "not here" })
            }
        }
    }

    /// `lanup check` on this node: the origin is polled now by the site's
    /// fetcher, whichever node the administrator is on. This node polls
    /// when it is the fetcher (as soon as it acts, if it has only just
    /// started), else it asks the fetcher, off the loop. A node that has
    /// not heard the site yet also passes the check on once it has, in
    /// case a fetcher it did not know of yet is the one.
    fn check(&mut self, reply: mpsc::Sender<serde_json::Value>) {
        if !self.settled() {
            self.check_pending = true;
        }
        let fetcher = self.fetcher();
        if fetcher == Some(self.local) || (fetcher.is_none() && self.config.origin.is_some()) {
            let polling = self.poll_now();
            let _ = reply.try_send(serde_json::json!({ "fetcher": true, "polling": polling }));
            return;
        }
        let Some(fetcher) = fetcher else {
            let _ = reply.try_send(serde_json::json!({
                "error": "no node this one hears has an origin configured"
            }));
            return;
        };
        let net = self.net.clone();
        tokio::spawn(async move {
            let answer = match ask_to_check(&net, fetcher).await {
                Ok(polling) => serde_json::json!({
                    "fetcher": false, "asked": fetcher.to_string(), "polling": polling,
                }),
                Err(e) => serde_json::json!({ "error": e }),
            };
            let _ = reply.send(answer).await;
        });
    }

    /// Passes on a check made before this node had heard the site, once it
    /// has, to the site's fetcher if that is another node.
    pub(super) fn pass_on_check(&mut self) {
        if !self.check_pending || !self.settled() {
            return;
        }
        self.check_pending = false;
        let Some(fetcher) = self.fetcher().filter(|f| *f != self.local) else {
            return;
        };
        let net = self.net.clone();
        tokio::spawn(async move {
            match ask_to_check(&net, fetcher).await {
                Ok(_) => info!(%fetcher, "passed an early lanup check on to the site's fetcher"),
                Err(e) => warn!(error = %e, "cannot pass an early lanup check on"),
            }
        });
    }

    /// Has the origin polled now, backoff or not, or as soon as the job
    /// under way (a download) ends: false in that case. The fetcher polls
    /// at most once a second however often it is asked.
    pub(super) fn poll_now(&mut self) -> bool {
        self.fetcher.check_now();
        self.fetcher.busy() != Some(lanup_protocol::fetcher::Job::Download)
    }

    pub(super) async fn heartbeat(&mut self) {
        self.heartbeats_sent += 1;
        let hb = self.own_heartbeat();
        if let Ok(data) = serde_json::to_vec(&hb) {
            let _ = self.net.publish(&self.status_topic, data).await;
        }
        let due = self.heartbeats_sent <= self.announce_until
            || self.heartbeats_sent.is_multiple_of(ANNOUNCE_EVERY);
        if let Some(t) = self.target.as_ref().filter(|_| due) {
            let announce = Announce {
                release: t.manifest.release_name(),
                manifest_hash: t.hash,
                signature: t.signature.clone(),
                app: t.manifest.restart.app_name.clone(),
            };
            if let Ok(data) = serde_json::to_vec(&announce) {
                let _ = self.net.publish(&self.announce_topic, data).await;
            }
        }
    }
}

/// Asks `fetcher` to poll the origin now; whether it polls at once, or why
/// it cannot.
async fn ask_to_check(net: &NetworkClient, fetcher: PeerId) -> Result<bool, String> {
    let asked = tokio::time::timeout(
        Duration::from_secs(10),
        net.request(fetcher, Request::Check),
    );
    match asked.await {
        Ok(Ok(Response::Check {
            fetcher: true,
            polling,
        })) => Ok(polling),
        Ok(Ok(Response::Check { fetcher: false, .. })) => Err(format!(
            "{fetcher} does not count itself the site's fetcher (the site is choosing one); try again in a few seconds"
        )),
        Ok(Ok(_)) => Err(format!(
            "the site's fetcher {fetcher} does not know this request (it runs an older lanup)"
        )),
        Ok(Err(e)) => Err(format!("cannot reach the site's fetcher {fetcher}: {e:#}")),
        Err(_) => Err(format!(
            "the site's fetcher {fetcher} did not answer within 10 s"
        )),
    }
}
