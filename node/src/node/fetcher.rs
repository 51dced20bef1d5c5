//! The site's fetcher on a node: the election as this node sees it (who is
//! live, who is failing, whom the site suspects), the fetcher's rules from
//! `lanup_protocol::fetcher` driven with this node's clock, the poll and
//! the download tasks they start, a fetcher that makes no progress handing
//! the role on, and a node that was frozen listening again before it asks
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

    /// Whether this node has heard from every peer it is connected to, so
    /// an election now would see the whole site.
    pub(super) fn settled(&self) -> bool {
        let ms = |d: Duration| d.as_millis() as u64;
        self.election().settled(
            ms(self.started.elapsed()),
            self.peers.values().map(|p| {
                (
                    p.heartbeat.as_ref().map(|(at, _)| ms(at.elapsed())),
                    ms(p.connected_at.elapsed()),
                )
            }),
        )
    }

    /// The fetcher polls the origin when a poll is due and downloads what
    /// no node at the site holds; a node that stops being the fetcher (a
    /// lower PeerId appeared) stops its download, and the chunks it got stay
    /// at the site.
    pub(super) fn fetcher_duties(&mut self) {
        let woke = self
            .woke_at
            .is_some_and(|at| at.elapsed().as_millis() < u128::from(self.election().grace_ms));
        let fetcher = self.is_fetcher() && self.settled() && !woke;
        if fetcher != self.was_fetcher {
            self.was_fetcher = fetcher;
            if fetcher {
                info!("this node is now the site's fetcher");
            } else if self.stop_origin() {
                info!("another node is the site's fetcher now; stopped talking to the origin");
            }
        }
        let lease = if fetcher {
            self.now_ms() + ORIGIN_LEASE.as_millis() as u64
        } else {
            0
        };
        self.origin_lease
            .store(lease, std::sync::atomic::Ordering::Relaxed);
        self.origin_step();
    }

    /// Asks the fetcher's rules what to do now and does it: poll, download
    /// what the site lacks, or stop the job under way.
    pub(super) fn origin_step(&mut self) {
        // Only a fetcher with nothing running has anything to decide (the
        // view below looks at every chunk).
        let acting = self.was_fetcher && self.config.origin.is_some();
        let idle = self.plan.running().is_none();
        if acting != idle {
            return;
        }
        let now = self.now_ms();
        let view = View {
            acting,
            release: self.target.as_ref().map(|t| ReleaseView {
                lacking: !t.transfer.is_done() && !t.transfer.unavailable(now).is_empty(),
                heard_all: self
                    .peers
                    .iter()
                    .all(|(p, info)| info.silent || t.peer_since.contains_key(p)),
                adopted_ms_ago: t.adopted_at.elapsed().as_millis() as u64,
                blocked: t.no_room.is_some(),
            }),
        };
        match self.plan.step(now, &view) {
            Step::Idle => {}
            Step::Stop(_) => self.abort_origin_task(),
            Step::Start(epoch, Job::Poll) => self.poll_origin(epoch),
            Step::Start(epoch, Job::Download) => self.download(epoch),
        }
    }

    pub(super) fn origin_busy(&self) -> bool {
        self.plan.running().is_some()
    }

    pub(super) fn abort_origin_task(&mut self) {
        if let Some(task) = self.origin_task.take() {
            task.abort();
        }
        self.reconcile_store();
    }

    /// Stops the poll or download under way, if any; its late answers are
    /// ignored. Returns whether one was running.
    pub(super) fn stop_origin(&mut self) -> bool {
        let stopped = self.plan.stop().is_some();
        self.abort_origin_task();
        stopped
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
        self.origin_lease
            .store(0, std::sync::atomic::Ordering::Relaxed);
        self.stop_origin();
        self.was_fetcher = false;
        self.woke_at = Some(Instant::now());
        if let Some(t) = &mut self.target {
            t.peer_since.clear();
            t.adopted_at = Instant::now();
        }
    }

    /// The origin answered as it should.
    pub(super) fn origin_ok(&mut self) {
        if self.origin_error.take().is_some() {
            info!("the origin answers again");
        }
    }

    /// The origin (or this node's disk, holding what it sent) failed; the
    /// fetcher's rules wait longer each time in a row (5 s doubling, with
    /// jitter, at most the poll interval or 5 minutes) before the origin is
    /// asked anything again. One WARN per wait; the reason is in the
    /// status.
    pub(super) fn origin_failed(&mut self, what: &str, reason: String) {
        let wait = self.plan.retry_in_ms(self.now_ms()).unwrap_or_default();
        warn!(error = %reason, retry_in = %humantime::format_duration(Duration::from_secs(wait / 1000)), "{what}; backing off");
        self.origin_failed_at = Some(Instant::now());
        self.origin_error = Some(reason);
    }

    /// Chunk notices from a download are best effort (a full queue drops
    /// them); the store is the truth.
    pub(super) fn reconcile_store(&mut self) {
        let Some(t) = &mut self.target else { return };
        for hash in unique_chunks(&t.manifest.files).keys() {
            if !t.held.contains(hash) && self.store.has(hash) {
                t.transfer.obtained(hash);
                t.held.insert(*hash);
                t.held_order.push(*hash);
            }
        }
    }

    /// The site's fetcher as this node sees it: among live nodes with an
    /// origin, the lowest PeerId. A node heard only through others (not
    /// connected to this one yet, as happens while mDNS is still finding the
    /// site) counts as much as a peer: two nodes that have not met must not
    /// both download. A peer this node banned for bad chunks does not
    /// count: a fetcher that serves garbage would otherwise stall the site.
    pub(super) fn fetcher(&self) -> Option<PeerId> {
        let ms = |at: &Instant| at.elapsed().as_millis() as u64;
        let by_site = self.suspected_by_site();
        let suspect = |peer: &PeerId, hb: &Heartbeat| {
            hb.origin_failing
                || by_site.contains(peer)
                || self
                    .suspects
                    .get(peer)
                    .is_some_and(|at| at.elapsed() < FAILING_FOR)
        };
        let peers = self.peers.iter().filter_map(|(peer, info)| {
            let (at, hb) = info.heartbeat.as_ref()?;
            Some(Candidate {
                id: *peer,
                has_origin: hb.has_origin,
                silent_ms: ms(at),
                failing: suspect(peer, hb),
            })
        });
        let heard = self.heard.iter().map(|(author, h)| Candidate {
            id: *author,
            has_origin: h.has_origin,
            silent_ms: ms(&h.at),
            failing: suspect(author, &h.heartbeat),
        });
        let now = self.now_ms();
        let banned = |peer: &PeerId| {
            self.target
                .as_ref()
                .is_some_and(|t| t.transfer.is_banned(peer, now))
        };
        let me = Candidate {
            id: self.local,
            has_origin: self.config.origin.is_some(),
            silent_ms: 0,
            failing: self.origin_failing() || by_site.contains(&self.local),
        };
        self.election()
            .choose(std::iter::once(me).chain(peers.chain(heard).filter(|c| !banned(&c.id))))
    }

    /// Nodes that live nodes of the site say they saw make no progress as
    /// the fetcher.
    pub(super) fn suspected_by_site(&self) -> HashSet<PeerId> {
        self.heard
            .values()
            .filter(|h| h.at.elapsed() < PEER_SILENT)
            .flat_map(|h| h.heartbeat.suspects.iter())
            .filter_map(|id| id.parse().ok())
            .collect()
    }

    /// Whether this node's origin failed in the last [`FAILING_FOR`] (an
    /// error, or a download that received nothing for twice the stall
    /// timeout): it then gives the fetcher role to the next node.
    pub(super) fn origin_failing(&self) -> bool {
        self.origin_error.is_some()
            && self
                .origin_failed_at
                .is_some_and(|at| at.elapsed() < FAILING_FOR)
    }

    /// Watches the fetcher this node would follow: while the site lacks
    /// chunks only the origin has, a fetcher whose byte count from the
    /// origin does not grow for four stall timeouts (its route to the
    /// origin is down, it froze, or it lies about its role) is suspected
    /// for [`FAILING_FOR`], and the next node takes over. Heartbeats alone
    /// do not keep the role.
    pub(super) fn watch_fetcher(&mut self) {
        let own = self
            .origin_received
            .load(std::sync::atomic::Ordering::Relaxed);
        if own != self.progress_seen.0 {
            self.progress_seen = (own, Instant::now());
        }
        // This node's own download that receives nothing (its route to the
        // origin is gone) is an origin failure like any other: it stops,
        // backs off, and says so, so the role moves on and stays moved.
        let quiet = self.progress_seen.1.elapsed();
        if self.plan.running() == Some(Job::Download) && quiet >= self.config.origin_stall * 2 {
            self.stop_origin();
            self.plan.failed(self.now_ms(), random());
            self.origin_failed(
                "the download from the origin makes no progress",
                format!("no byte from the origin for {} s", quiet.as_secs()),
            );
        }
        let choice = self.fetcher();
        if self.choice.as_ref().map(|(p, _)| *p) != choice {
            self.choice = choice.map(|p| (p, Instant::now()));
        }
        let (Some((fetcher, since)), Some(t)) = (self.choice, &self.target) else {
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

    pub(super) fn poll_origin(&mut self, epoch: u64) {
        let Some(origin) = self.config.origin.clone() else {
            return;
        };
        let tx = self.done_tx.clone();
        let http = self.http.clone();
        let etag = self.etag.clone();
        let task = tokio::spawn(async move {
            let result = ManifestSource::poll(&http, &origin, etag.as_deref()).await;
            let _ = tx.send(Done::OriginPoll(epoch, result)).await;
        });
        self.origin_task = Some(task.abort_handle());
    }

    /// The fetcher downloads what no peer at the site holds (the rules
    /// decided it is time: job `epoch`).
    pub(super) fn download(&mut self, epoch: u64) {
        let (Some(origin), Some(t)) = (self.config.origin.clone(), &self.target) else {
            self.plan.finished(epoch, true, self.now_ms(), random());
            return;
        };
        let now = self.now_ms();
        let nobody_has = t.transfer.unavailable(now);
        if self.downloading.is_none_or(|(hash, _)| hash != t.hash) {
            let sizes = unique_chunks(&t.manifest.files);
            let missing: u64 = nobody_has.iter().filter_map(|h| sizes.get(h)).sum();
            info!(release = %t.manifest.release_name(), missing_bytes = missing, held_bytes = t.bytes_total - missing, "downloading release from the origin");
            self.downloading = Some((t.hash, 0));
        }
        self.site_lacks
            .send_replace(std::sync::Arc::new(nobody_has));
        let manifest = t.manifest.clone();
        let store = self.store.clone();
        let source = crate::fetch::Origin {
            client: self.http.clone(),
            base: origin,
            wan: self.wan.clone(),
            stall: self.config.origin_stall,
            received: self.origin_received.clone(),
        };
        self.progress_seen = (
            self.origin_received
                .load(std::sync::atomic::Ordering::Relaxed),
            Instant::now(),
        );
        let tx = self.done_tx.clone();
        self.origin_counted = 0;
        let lacks = self.site_lacks.subscribe();
        let lease = self.origin_lease.clone();
        let started = self.started;
        // Asked before every request and as bytes arrive: a chunk a peer
        // now holds, or a role that lapsed, stops the download of it.
        let wanted = move |h: &Hash| {
            let now = started.elapsed().as_millis() as u64;
            now < lease.load(std::sync::atomic::Ordering::Relaxed) && lacks.borrow().contains(h)
        };
        let task = tokio::spawn(async move {
            let chunk_tx = tx.clone();
            let result = fetch_missing(&source, &manifest, &store, wanted, |c: &Chunk| {
                let _ = chunk_tx.try_send(Done::OriginChunk(c.hash, c.size));
            })
            .await;
            let _ = tx.send(Done::OriginFinished(epoch, result)).await;
        });
        self.origin_task = Some(task.abort_handle());
    }
}
