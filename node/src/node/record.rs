//! One record per change (`lanup history --change ID`): this node's audit
//! entries about the change and those of every peer it is connected to,
//! asked over the chunk protocol, put together by node; a node it only
//! hears through others, or that does not answer, is listed with what its
//! heartbeat last said.

use super::*;
use lanup_protocol::wire::MAX_AUDIT_ENTRIES;

/// How long a peer has to send its entries.
const ASK_TIMEOUT: Duration = Duration::from_secs(5);

/// Peers' questions about changes answered at once; more are told
/// "unknown", so a peer asking again and again reads the audit log no
/// more than this often in parallel.
pub(super) const AUDIT_ANSWERS: usize = 2;

/// Reads this node's entries about `id` (blocking: a thread of the pool).
fn own_entries(state: &std::path::Path, id: &str) -> Vec<Entry> {
    crate::audit::about(&state.join(crate::audit::AUDIT_FILE), id, MAX_AUDIT_ENTRIES)
        .unwrap_or_else(|e| {
            warn!(error = %format!("{e:#}"), "cannot read the audit log");
            Vec::new()
        })
}

impl Node {
    /// A peer asks for this node's entries about a change.
    pub(super) fn answer_audit(
        &mut self,
        id: String,
        channel: libp2p::request_response::ResponseChannel<Response>,
    ) {
        let (net, state) = (self.net.clone(), self.config.state.clone());
        let Ok(permit) = self.audit_answers.clone().try_acquire_owned() else {
            self.tasks.spawn(async move {
                let _ = net.respond(channel, Response::Unknown).await;
            });
            return;
        };
        self.tasks.spawn(async move {
            let _permit = permit;
            let entries = tokio::task::spawn_blocking(move || own_entries(&state, &id))
                .await
                .unwrap_or_default();
            let entries = entries
                .iter()
                .filter_map(|e| serde_json::to_string(e).ok())
                .collect();
            let _ = net.respond(channel, Response::Audit { entries }).await;
        });
    }

    /// `lanup history --change ID`: gathers the site's entries and answers
    /// once every connected peer answered or [`ASK_TIMEOUT`] passed.
    pub(super) fn change_record(&mut self, id: String, reply: mpsc::Sender<serde_json::Value>) {
        let (net, state, local) = (self.net.clone(), self.config.state.clone(), self.local);
        let peers: Vec<PeerId> = self.peers.keys().copied().collect();
        // Nodes heard of only through others cannot be asked: their last
        // heartbeat stands in for them.
        let mut heard: BTreeMap<String, serde_json::Value> = self
            .heard_only()
            .map(|(author, h)| (author.to_string(), heard_summary(&h.heartbeat)))
            .collect();
        for (peer, info) in &self.peers {
            if let Some((_, hb)) = &info.heartbeat {
                heard.insert(peer.to_string(), heard_summary(hb));
            }
        }
        let pending = self.pending.get(&id).map(|p| p.signed.clone());
        self.tasks.spawn(async move {
            let own_id = id.clone();
            let mut nodes = BTreeMap::new();
            let own = tokio::task::spawn_blocking(move || own_entries(&state, &own_id))
                .await
                .unwrap_or_default();
            nodes.insert(local.to_string(), own);
            let asks = peers.into_iter().map(|peer| {
                let net = net.clone();
                let request = Request::Audit { id: id.clone() };
                async move {
                    let answer =
                        tokio::time::timeout(ASK_TIMEOUT, net.request(peer, request)).await;
                    (peer, answer)
                }
            });
            let mut silent = Vec::new();
            for (peer, answer) in futures_util::future::join_all(asks).await {
                match answer {
                    Ok(Ok(Response::Audit { entries })) => {
                        let parsed: Vec<Entry> = entries
                            .iter()
                            .take(MAX_AUDIT_ENTRIES)
                            .filter_map(|e| serde_json::from_str(e).ok())
                            .collect();
                        nodes.insert(peer.to_string(), parsed);
                    }
                    _ => silent.push(peer.to_string()),
                }
            }
            let mut entries: Vec<Entry> = nodes
                .into_iter()
                .flat_map(|(node, entries)| {
                    entries.into_iter().map(move |mut e| {
                        e.node = Some(node.clone());
                        e
                    })
                })
                .collect();
            entries.sort_by_key(|e| e.at_ms);
            let unasked: BTreeMap<&String, &serde_json::Value> = heard
                .iter()
                .filter(|(node, _)| {
                    silent.contains(node) || !entries.iter().any(|e| e.node.as_ref() == Some(*node))
                })
                .collect();
            let _ = reply
                .send(serde_json::json!({
                    "id": id,
                    "entries": entries,
                    "not_answered": silent,
                    "heard": unasked,
                    "waiting": pending,
                }))
                .await;
        });
    }
}

/// What a node's heartbeat last said, for a record it could not give.
fn heard_summary(hb: &Heartbeat) -> serde_json::Value {
    serde_json::json!({
        "installed_version": hb.installed_version,
        "apply": hb.apply,
        "last_error": hb.last_error,
        "failed_version": hb.failed_version,
    })
}
