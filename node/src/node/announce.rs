//! Announcements on a node: a release a peer (or the origin) announces
//! is checked before it is forwarded (its manifest fetched from the
//! announcer and authenticated as `lanup inspect --trust` does), refused
//! with a reason when it is not trusted, not newer or expired, and adopted
//! as the release to fetch when it is.

use super::*;
use anyhow::bail;

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
        if self.transfer.target().is_some_and(|t| t.hash == hash) {
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
        if let Some(reason) = self.not_newer(&announce) {
            self.pass_over(from, hash, &announce.release, &reason);
            // An honest peer that lags behind: not forwarded, not held
            // against it.
            return Some(MessageAcceptance::Ignore);
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
        self.tasks.spawn(async move {
            let result = fetch_manifest(&net, from, hash).await;
            let _ = tx.send(Done::Manifest(from, hash, result)).await;
        });
        None
    }

    /// Why an announced release is not newer than what this node has (the
    /// release it takes up, or the installed one), if it is not.
    fn not_newer(&self, announce: &Announce) -> Option<String> {
        // Versions are compared within one application only (an older
        // node does not say which: then as the release this node has).
        let same_app = |m: &Manifest| announce.app.is_none() || announce.app == m.restart.app_name;
        let announced = announce.release.parse::<Version>().ok()?;
        if let Some(t) = self.transfer.target() {
            if same_app(&t.manifest)
                && t.manifest
                    .version
                    .as_ref()
                    .is_some_and(|have| announced <= *have)
            {
                return Some(format!(
                    "not newer than {}, which this node has",
                    t.manifest.release_name()
                ));
            }
        }
        let installed = self.installed.as_ref()?;
        let older = same_app(installed)
            && installed
                .version
                .as_ref()
                .is_some_and(|have| announced < *have);
        older.then(|| {
            format!(
                "older than {}, which is installed here",
                installed.release_name()
            )
        })
    }

    /// Adopts a manifest after checking it as `lanup inspect --trust` does,
    /// if it is newer than what this node has. Returns whether an
    /// announcement of it may be forwarded.
    pub(super) fn adopt(
        &mut self,
        from: &str,
        text: ManifestText,
        signature: String,
    ) -> MessageAcceptance {
        let source = ManifestSource {
            location: from.to_owned(),
            text,
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
        let hash = source.text.hash();
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
        if let Some(t) = self.transfer.target() {
            if t.hash == hash {
                return MessageAcceptance::Accept;
            }
            if manifest.compare_succession(&t.manifest) != std::cmp::Ordering::Greater {
                warn!(source = from, release = %manifest.release_name(), have = %t.manifest.release_name(), "refused release: not newer than the one this node has");
                return MessageAcceptance::Ignore;
            }
        }
        let held: HashSet<Hash> = unique_chunks(&manifest.files)
            .into_keys()
            .filter(|h| self.store.has(h))
            .collect();
        let target = Target::new(
            manifest,
            source.text,
            signature,
            held,
            &self.local,
            self.peers.keys().copied(),
        );
        info!(release = %target.manifest.release_name(), source = from, bytes = target.bytes_total, "release announced; fetching it");
        self.transfer.take_up(target);
        // Peers hear of it now, not at the next heartbeat (up to a second
        // later): they start staging what they already hold meanwhile.
        self.announce_until = self.heartbeats_sent + 3;
        self.early_heartbeat = Some(Instant::now());
        self.check_room();
        self.ask_have();
        MessageAcceptance::Accept
    }
}

/// Takes the manifest `hash` from a peer: its compressed copy in parts
/// (a manifest of many files is more than one answer may carry), or, from
/// a peer that does not know parts, its text whole. The copy is decoded
/// (bounded) off the node's task; the caller checks its hash.
async fn fetch_manifest(
    net: &NetworkClient,
    from: PeerId,
    hash: Hash,
) -> Result<(ManifestText, String)> {
    use lanup_protocol::manifest::MAX_PACKED_MANIFEST_BYTES;
    let mut packed = Vec::new();
    let mut signature = String::new();
    loop {
        let asked = Request::ManifestPart {
            manifest_hash: hash,
            offset: packed.len() as u64,
        };
        match net.request(from, asked).await {
            Ok(Response::ManifestPart {
                packed: part,
                total,
                signature: sig,
            }) => {
                if total > MAX_PACKED_MANIFEST_BYTES {
                    bail!("peer's compressed manifest is {total} bytes, more than the {MAX_PACKED_MANIFEST_BYTES} lanup accepts");
                }
                if part.is_empty() && (packed.len() as u64) < total {
                    bail!("peer sent an empty part of its manifest");
                }
                if !packed.is_empty() && sig != signature {
                    bail!("peer's manifest changed its signature between parts");
                }
                signature = sig;
                packed.extend_from_slice(&part);
                if packed.len() as u64 > total {
                    bail!("peer sent more of its manifest than it said it has");
                }
                if packed.len() as u64 == total {
                    break;
                }
            }
            // A peer that does not know parts (an older lanup) cannot read
            // the request, and one that holds the text alone answers it
            // with `Unknown`: the whole text is asked for instead.
            Ok(Response::Unknown) | Err(_) if packed.is_empty() => {
                return fetch_manifest_text(net, from, hash).await
            }
            Ok(Response::Unknown) => bail!("peer no longer has the manifest"),
            Ok(_) => bail!("peer answered a manifest request with something else"),
            Err(e) => return Err(e),
        }
    }
    let text = tokio::task::spawn_blocking(move || ManifestText::from_packed(packed))
        .await
        .context("decoding the peer's manifest")??;
    Ok((text, signature))
}

/// Takes the manifest `hash` from a peer as text.
async fn fetch_manifest_text(
    net: &NetworkClient,
    from: PeerId,
    hash: Hash,
) -> Result<(ManifestText, String)> {
    match net
        .request(
            from,
            Request::Manifest {
                manifest_hash: hash,
            },
        )
        .await?
    {
        Response::Manifest { xml, signature } => {
            let text = tokio::task::spawn_blocking(move || ManifestText::from_plain(&xml))
                .await
                .context("reading the peer's manifest")??;
            Ok((text, signature))
        }
        Response::Unknown => bail!("peer does not have the manifest"),
        _ => bail!("peer answered a manifest request with something else"),
    }
}
