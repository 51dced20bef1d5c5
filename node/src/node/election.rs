//! The fetcher election as this node sees it (who is live, who is
//! failing, whom the site suspects), the duty it hands its own fetcher
//! actor ([`crate::fetcher`]), a fetcher elsewhere that makes no progress
//! passed over, and a node that was frozen listening again before it asks
//! the origin anything.

use super::*;

impl Node {
    pub(super) fn election(&self) -> Election {
        if self.config.mdns {
            Election::MDNS
        } else {
            Election::STATIC_PEERS
        }
    }

    /// Whether this node has heard enough of the site for an election now
    /// to see all of it: discovery answered (or the grace ran out) and every
    /// peer it is connected to sent a heartbeat. Once settled it stays so:
    /// a peer that joins later is heard in the election when its heartbeat
    /// comes, and until then the fetcher carries on (a running download
    /// paused for every newcomer would idle the uplink and lose the chunks
    /// in flight).
    pub(super) fn settled(&self) -> bool {
        if self.has_settled.get() {
            return true;
        }
        let ms = |d: Duration| d.as_millis() as u64;
        let election = self.election();
        let found = self.net.discovered();
        let discovery = Discovery {
            pending: found.static_dialling
                + found
                    .connected
                    .iter()
                    .filter(|peer| !self.peers.contains_key(peer))
                    .count()
                + found
                    .found
                    .iter()
                    .filter(|(peer, _)| !self.peers.contains_key(peer))
                    .count(),
            quiet_ms: ms(found
                .last_found
                .map_or(self.started.elapsed(), |at| at.elapsed())),
        };
        let settled = election.settled(
            ms(self.started.elapsed()),
            discovery,
            self.peers.values().map(|p| {
                (
                    p.heartbeat.as_ref().map(|(at, _)| ms(at.elapsed())),
                    ms(p.connected_at.elapsed()),
                )
            }),
        );
        self.has_settled.set(settled);
        settled
    }

    /// Whether this node acts as the site's fetcher with its download from
    /// the origin under way: it then keeps the role.
    pub(super) fn downloading(&self) -> bool {
        self.was_fetcher
            && self.fetcher.status().job == Some(lanup_protocol::fetcher::Job::Download)
    }

    /// Tells the fetcher whether this node is the site's fetcher and what
    /// the site lacks; it polls the origin when a poll is due and downloads
    /// what no node at the site holds. A node that stops being the fetcher
    /// (a lower PeerId appeared) stops its download, and the chunks it got
    /// stay at the site.
    pub(super) fn fetcher_duties(&mut self) {
        let woke = self
            .woke_at
            .is_some_and(|at| at.elapsed().as_millis() < u128::from(self.election().grace_ms));
        let fetcher = self.is_fetcher() && self.settled() && !woke;
        if fetcher != self.was_fetcher {
            self.was_fetcher = fetcher;
            if fetcher {
                info!("this node is now the site's fetcher");
            } else {
                info!("another node is the site's fetcher now");
            }
        }
        self.assign_duty();
        self.pass_on_check();
    }

    /// Sends the fetcher its duty as of now (it never waits for it). Only
    /// an acting fetcher needs to know what the site lacks: that looks at
    /// every chunk, so others send less.
    pub(super) fn assign_duty(&mut self) {
        let now = self.now_ms();
        let acting = self.was_fetcher;
        let lacking = self.transfer.target().filter(|_| acting).map(|t| {
            let now_lacking = if t.transfer.is_done() {
                Default::default()
            } else {
                t.transfer.unavailable(now)
            };
            // The same lack is handed over as the same set: the fetcher
            // tells by it that a download already ended with it (and
            // does not start the same one again).
            match &self.lacking {
                Some((hash, set)) if *hash == t.hash && **set == now_lacking => set.clone(),
                _ => std::sync::Arc::new(now_lacking),
            }
        });
        self.lacking = self
            .transfer
            .target()
            .zip(lacking.clone())
            .map(|(t, l)| (t.hash, l));
        let release = self
            .transfer
            .target()
            .zip(lacking)
            .map(|(t, lacking)| Wanted {
                hash: t.hash,
                manifest: t.manifest.clone(),
                lacking,
                heard_all: self
                    .peers
                    .iter()
                    .all(|(p, info)| info.silent || t.peer_since.contains_key(p)),
                adopted_at: t.adopted_at,
                blocked: t.no_room.is_some(),
                bases: self.bases.clone(),
            });
        self.fetcher.assign(Duty {
            acting,
            confirmed: Some(Instant::now()),
            release,
            serial: 0,
        });
    }

    /// Notices that this node was frozen (no heartbeat tick for several
    /// seconds: a paused VM, SIGSTOP, a swap storm). What it knew of the
    /// site is old: its download stops, it asks every peer afresh what it
    /// holds, and it does not act as the fetcher until it has heard the
    /// site again, so it never fetches what a stand-in fetched meanwhile.
    pub(super) fn notice_freeze(&mut self) {
        let gap = self.last_tick.elapsed();
        self.last_tick = Instant::now();
        if gap < HEARTBEAT * 3 {
            return;
        }
        warn!(
            frozen_s = gap.as_secs(),
            "this node was frozen; it listens to the site again before it talks to the origin"
        );
        self.was_fetcher = false;
        self.woke_at = Some(Instant::now());
        self.transfer.read_lists_afresh();
        self.assign_duty();
    }

    /// Chunk notices from a download are best effort (a full queue drops
    /// them); the store is the truth. It is read off the node's loop, and
    /// what it holds arrives as [`Done::Held`]; the fetcher is told its
    /// duty then.
    pub(super) fn reconcile_store(&mut self) {
        let Some(t) = self.transfer.target() else {
            return;
        };
        let unknown: Vec<Hash> = unique_chunks(&t.manifest.files)
            .into_keys()
            .filter(|h| !t.held.contains(h))
            .collect();
        if unknown.is_empty() {
            self.assign_duty();
            return;
        }
        let (store, tx, hash) = (self.store.clone(), self.done_tx.clone(), t.hash);
        self.tasks.spawn(async move {
            let held = tokio::task::spawn_blocking(move || {
                unknown.into_iter().filter(|h| store.has(h)).collect()
            })
            .await
            .unwrap_or_default();
            let _ = tx.send(Done::Held(hash, held)).await;
        });
    }

    /// The site's fetcher as this node sees it: among live nodes with an
    /// origin, the one downloading, else the lowest PeerId. A node heard only through others (not
    /// connected to this one yet, as happens while mDNS is still finding the
    /// site) counts as much as a peer: two nodes that have not met must not
    /// both download. A peer this node banned for bad chunks does not
    /// count: a fetcher that serves garbage would otherwise stall the site
    /// (one only rested for serving slowly still does: it is not lying,
    /// and passing it over would take a second copy over the uplink).
    pub(super) fn fetcher(&self) -> Option<PeerId> {
        self.choose_fetcher(true)
    }

    /// The fetcher this node heard itself (itself, or a node whose own
    /// heartbeat it heard): what its heartbeat names, so that a node that
    /// hears only a few peers learns of a fetcher further away. Never from
    /// what others named: two nodes cannot keep a gone fetcher alive by
    /// naming it to each other.
    pub(super) fn fetcher_heard(&self) -> Option<PeerId> {
        self.choose_fetcher(false)
    }

    /// The site's fetcher among the live nodes this node heard and, `named`,
    /// the downloading fetchers live nodes name in their heartbeats (a node
    /// at a site whose nodes know only a bootstrap node or two hears the
    /// others late; one that starts must not fetch while another
    /// downloads).
    fn choose_fetcher(&self, named: bool) -> Option<PeerId> {
        let by_site = self.suspected_by_site();
        let suspect = |peer: &PeerId| self.suspected(peer, &by_site);
        // Whether each node is live is the node's to judge (a heartbeat's
        // cadence varies): the election sees a live one as just heard.
        let quiet = |peer: &PeerId, at: Instant, hb: &Heartbeat| {
            if self.live(peer, at, hb) {
                0
            } else {
                u64::MAX
            }
        };
        let peers = self.peers.iter().filter_map(|(peer, info)| {
            let (at, hb) = info.heartbeat.as_ref()?;
            Some(Candidate {
                id: *peer,
                has_origin: hb.has_origin,
                silent_ms: quiet(peer, *at, hb),
                failing: hb.origin_failing,
                suspected: suspect(peer),
                downloading: hb.downloading,
            })
        });
        let heard = self.heard.iter().map(|(author, h)| Candidate {
            id: *author,
            has_origin: h.has_origin,
            silent_ms: quiet(author, h.at, &h.heartbeat),
            failing: h.heartbeat.origin_failing,
            suspected: suspect(author),
            downloading: h.heartbeat.downloading,
        });
        let now = self.now_ms();
        let now_s = now_unix_ms() / 1000;
        // A peer that lied, and one the site no longer admits (revoked,
        // or its membership expired), are no candidates: what it said
        // before stays live for its keep-alive's span, seconds too long.
        let banned = |peer: &PeerId| {
            (*peer != self.local && !self.gate.admits(peer, now_s))
                || self
                    .transfer
                    .target()
                    .is_some_and(|t| t.transfer.is_distrusted(peer, now))
        };
        let me = Candidate {
            id: self.local,
            // A node the site revoked fetches nothing for it.
            has_origin: self.config.origin.is_some() && !self.revoked_here(),
            silent_ms: 0,
            failing: self.origin_failing(),
            suspected: by_site.contains(&self.local),
            downloading: self.downloading(),
        };
        let hearsay = if named {
            self.hearsay_candidates(&by_site)
        } else {
            Vec::new()
        };
        self.election().choose(
            std::iter::once(me).chain(peers.chain(heard).chain(hearsay).filter(|c| !banned(&c.id))),
        )
    }

    /// Downloading fetchers that live nodes name, not heard here yet: a
    /// node at a site whose nodes know only a bootstrap node or two hears
    /// the others late, and must not start a second download meanwhile.
    fn hearsay_candidates(&self, by_site: &HashSet<PeerId>) -> Vec<Candidate<PeerId>> {
        self.heard
            .iter()
            .filter(|(author, h)| self.live(author, h.at, &h.heartbeat))
            .filter_map(|(_, h)| {
                // Only a download under way: a newcomer must not start a
                // second one; anything else the node hears for itself.
                let (id, downloading) = h.heartbeat.fetcher.as_ref().filter(|(_, d)| *d)?;
                let id: PeerId = id.parse().ok()?;
                let known = id == self.local || self.heard.contains_key(&id);
                (!known).then(|| Candidate {
                    id,
                    has_origin: true,
                    silent_ms: 0,
                    failing: false,
                    suspected: self.suspected(&id, by_site),
                    downloading: *downloading,
                })
            })
            .collect::<Vec<_>>()
    }

    /// Whether `peer` is suspected: by this node (it could not reach it, or
    /// saw it make no progress as the fetcher) or by live nodes of the site
    /// (`by_site`).
    fn suspected(&self, peer: &PeerId, by_site: &HashSet<PeerId>) -> bool {
        by_site.contains(peer)
            || self
                .suspects
                .get(peer)
                .is_some_and(|at| at.elapsed() < FAILING_FOR)
    }

    /// Nodes that live nodes of the site say they saw make no progress as
    /// the fetcher.
    pub(super) fn suspected_by_site(&self) -> HashSet<PeerId> {
        self.heard
            .iter()
            .filter(|(author, h)| self.live(author, h.at, &h.heartbeat))
            .map(|(_, h)| h)
            .flat_map(|h| h.heartbeat.suspects.iter())
            .filter_map(|id| id.parse().ok())
            .collect()
    }

    /// Whether this node's origin failed lately (an error, or a download
    /// that received nothing for twice the stall timeout): it then gives
    /// the fetcher role to the next node.
    pub(super) fn origin_failing(&self) -> bool {
        self.fetcher.status().failing()
    }

    /// Watches the fetcher this node would follow: while the site lacks
    /// chunks only the origin has, a fetcher whose byte count from the
    /// origin does not grow for four stall timeouts (its route to the
    /// origin is down, it froze, or it lies about its role) is suspected
    /// for [`FAILING_FOR`], and the next node takes over. Heartbeats alone
    /// do not keep the role.
    pub(super) fn watch_fetcher(&mut self) {
        let choice = self.fetcher();
        if self.choice.as_ref().map(|(p, _)| *p) != choice {
            self.choice = choice.map(|p| (p, Instant::now()));
        }
        let (Some((fetcher, since)), Some(t)) = (self.choice, self.transfer.target()) else {
            return;
        };
        if fetcher == self.local || t.transfer.is_done() {
            return;
        }
        let now = self.now_ms();
        if t.transfer.unavailable(now).is_empty() {
            return;
        }
        let Some(heard) = self.heard.get(&fetcher) else {
            return;
        };
        let patience = self.config.origin_stall * 4;
        let quiet = [heard.progress_at, t.adopted_at, since]
            .iter()
            .map(Instant::elapsed)
            .min()
            .unwrap_or_default();
        if quiet >= patience {
            warn!(peer = %fetcher, quiet_s = quiet.as_secs(), "the site's fetcher takes nothing from the origin while the site lacks chunks; the next node takes over");
            self.suspects.insert(fetcher, Instant::now());
        }
    }

    pub(super) fn is_fetcher(&self) -> bool {
        self.fetcher() == Some(self.local)
    }
}

impl Node {
    /// Whether the site's revocation list names this node.
    pub(super) fn revoked_here(&self) -> bool {
        self.gate.revokes_self()
    }
}
