//! Announcements on a node: a release a peer (or the origin) announces
//! is checked before it is forwarded (its manifest fetched from the
//! announcer and authenticated as `lanup inspect --trust` does), refused
//! with a reason when it is not trusted, not newer or expired, and adopted
//! as the release to fetch when it is.

use super::*;

impl Node {
    /// Warns once per peer and manifest about a refused announcement.
    pub(super) fn refuse(&mut self, from: PeerId, hash: Hash, release: &str, reason: &str) {
        if self.refused.insert((from, hash)) {
            warn!(peer = %from, release, reason, "refused announcement");
        }
    }

    /// Notes once per peer and manifest an announcement of a release older
    /// than this node's: peers that have not moved on yet announce theirs
    /// for a while after every new release, which is expected traffic.
    pub(super) fn pass_over(&mut self, from: PeerId, hash: Hash, release: &str, reason: &str) {
        if self.refused.insert((from, hash)) {
            debug!(peer = %from, release, reason, "passed over an announcement");
        }
    }

    /// Checks an announcement before it is forwarded. A new release's
    /// manifest is fetched from the announcer and checked first; the
    /// verdict then comes later (`None` now).
    pub(super) fn on_announce(
        &mut self,
        from: PeerId,
        id: MessageId,
        data: &[u8],
    ) -> Option<MessageAcceptance> {
        let announce = match serde_json::from_slice::<Announce>(data) {
            Ok(a) => a,
            Err(e) => {
                warn!(peer = %from, error = %e, "refused announcement: not readable");
                return Some(MessageAcceptance::Reject);
            }
        };
        let hash = announce.manifest_hash;
        if self.target.as_ref().is_some_and(|t| t.hash == hash) {
            return Some(MessageAcceptance::Accept);
        }
        let signature = match Signature::from_text(&announce.signature) {
            Ok(s) => s,
            Err(e) => {
                self.refuse(from, hash, &announce.release, &format!("{e:#}"));
                return Some(MessageAcceptance::Reject);
            }
        };
        if !self.config.trust_publisher.contains(&signature.key) {
            let reason = format!(
                "signed by {}, a key this node does not trust",
                signature.key
            );
            self.refuse(from, hash, &announce.release, &reason);
            return Some(MessageAcceptance::Reject);
        }
        // Versions are compared within one application only (an older
        // node does not say which: then as the release this node has).
        let same_app = |m: &Manifest| announce.app.is_none() || announce.app == m.restart.app_name;
        if let (Some(t), Ok(announced)) = (&self.target, announce.release.parse::<Version>()) {
            if same_app(&t.manifest)
                && t.manifest
                    .version
                    .as_ref()
                    .is_some_and(|have| announced <= *have)
            {
                let reason = format!(
                    "not newer than {}, which this node has",
                    t.manifest.release_name()
                );
                self.pass_over(from, hash, &announce.release, &reason);
                // An honest peer that lags behind: not forwarded, not held
                // against it.
                return Some(MessageAcceptance::Ignore);
            }
        }
        if let (Some(installed), Ok(announced)) =
            (&self.installed, announce.release.parse::<Version>())
        {
            if same_app(installed)
                && installed
                    .version
                    .as_ref()
                    .is_some_and(|have| announced < *have)
            {
                let reason = format!(
                    "older than {}, which is installed here",
                    installed.release_name()
                );
                self.pass_over(from, hash, &announce.release, &reason);
                return Some(MessageAcceptance::Ignore);
            }
        }
        if self.refused.contains(&(from, hash)) {
            return Some(MessageAcceptance::Reject);
        }
        if let Some(waiting) = self.validating.get_mut(&hash) {
            waiting.push((id, from));
            return None;
        }
        self.validating.insert(hash, vec![(id, from)]);
        let net = self.net.clone();
        let tx = self.done_tx.clone();
        tokio::spawn(async move {
            let result = match net
                .request(
                    from,
                    Request::Manifest {
                        manifest_hash: hash,
                    },
                )
                .await
            {
                Ok(Response::Manifest { xml, signature }) => Ok((xml, signature)),
                Ok(_) => Err(anyhow::anyhow!("peer does not have the manifest")),
                Err(e) => Err(e),
            };
            let _ = tx.send(Done::Manifest(from, hash, result)).await;
        });
        None
    }

    /// Adopts a manifest after checking it as `lanup inspect --trust` does,
    /// if it is newer than what this node has. Returns whether an
    /// announcement of it may be forwarded.
    pub(super) fn adopt(
        &mut self,
        from: &str,
        xml: Vec<u8>,
        signature: String,
    ) -> MessageAcceptance {
        let source = ManifestSource {
            location: from.to_owned(),
            bytes: xml,
            signature: Some(signature.clone().into_bytes()),
            signature_location: format!("{from} (signature)"),
        };
        let manifest =
            match source.authenticate(&self.config.trust_publisher, OffsetDateTime::now_utc()) {
                Ok(m) => m,
                Err(e) => {
                    warn!(source = from, error = %format!("{e:#}"), "refused release");
                    return MessageAcceptance::Reject;
                }
            };
        let hash = Hash::of(&source.bytes);
        if crate::upgrade::is_lanup(&manifest) {
            let running = crate::upgrade::version()
                .parse::<lanup_protocol::Version>()
                .ok();
            if manifest.version.is_some() && manifest.version < running {
                warn!(source = from, release = %manifest.release_name(), running = crate::upgrade::version(), "refused lanup release: older than the lanup this node runs");
                return MessageAcceptance::Ignore;
            }
        } else if let Some(installed) = &self.installed {
            if manifest.compare_release(installed) == std::cmp::Ordering::Less {
                warn!(source = from, release = %manifest.release_name(), installed = %installed.release_name(), "refused release: older than the installed one");
                return MessageAcceptance::Ignore;
            }
        }
        if let Some(t) = &self.target {
            if t.hash == hash {
                return MessageAcceptance::Accept;
            }
            if manifest.compare_succession(&t.manifest) != std::cmp::Ordering::Greater {
                warn!(source = from, release = %manifest.release_name(), have = %t.manifest.release_name(), "refused release: not newer than the one this node has");
                return MessageAcceptance::Ignore;
            }
        }
        let chunks = unique_chunks(&manifest.files);
        let bytes_total = chunks.values().sum();
        let held: HashSet<Hash> = chunks
            .keys()
            .filter(|h| self.store.has(h))
            .copied()
            .collect();
        let mut transfer = Transfer::new(
            chunks
                .iter()
                .filter(|(h, _)| !held.contains(*h))
                .map(|(h, s)| (*h, *s)),
            Limits::default(),
        )
        // Equally rare chunks in this node's own order, from its PeerId.
        .with_order(u64::from_le_bytes(
            Hash::of(&self.local.to_bytes()).0[..8]
                .try_into()
                .unwrap_or_default(),
        ));
        for peer in self.peers.keys() {
            transfer.peer_connected(*peer);
        }
        info!(release = %manifest.release_name(), source = from, bytes = bytes_total, "release announced; fetching it");
        self.target = Some(Target {
            manifest: std::sync::Arc::new(manifest),
            xml: source.bytes,
            signature,
            hash,
            transfer,
            held_order: held.iter().copied().collect(),
            held,
            peer_since: BTreeMap::new(),
            bytes_total,
            staged: false,
            staging: false,
            stager: None,
            stager_failed: false,
            stage_failed: None,
            no_room: None,
            adopted_at: Instant::now(),
        });
        // Peers hear of it now, not at the next heartbeat (up to a second
        // later): they start staging what they already hold meanwhile.
        self.announce_until = self.heartbeats_sent + 3;
        self.early_heartbeat = Some(Instant::now());
        self.check_room();
        self.ask_have();
        MessageAcceptance::Accept
    }
}
