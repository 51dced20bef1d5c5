//! How a node starts and runs: it resolves what a stop left half done,
//! starts its parts (swarm, chunk server, metrics, control socket,
//! fetcher, reporter) as children of its task, reads what it holds, and
//! runs its loop over their channels and its timers.

use super::*;

/// What a running node holds beside the node itself: the channels that
/// feed its loop, its parts' tasks, and what must outlive its loop.
pub(super) struct Wiring {
    events: mpsc::Receiver<NetworkEvent>,
    done: mpsc::Receiver<Done>,
    found: mpsc::Receiver<FetcherEvent>,
    control: mpsc::Receiver<crate::control::Incoming>,
    damaged: mpsc::Receiver<Hash>,
    /// The node's parts run as children of its task: stopped together by
    /// `cancel`, and a part that ends by itself ends the node (with an
    /// error the service manager sees) rather than leaving it half alive.
    pub(super) children: tokio::task::JoinSet<()>,
    pub(super) cancel: tokio_util::sync::CancellationToken,
    pub(super) audit_thread: std::thread::JoinHandle<()>,
    /// Held until the node stops: the second of two nodes started together
    /// on one state directory stops at it, before recovery or the channel.
    _lock: crate::control::StateLock,
}

/// What a starting node finds on its disk, once an interrupted apply or
/// update of lanup is resolved.
struct Recovered {
    lock: crate::control::StateLock,
    key: SecretKey,
    own_certificate: Option<lanup_protocol::membership::Certificate>,
    gate: crate::membership::Gate,
    applier: Option<Applier>,
    installed: Option<std::sync::Arc<Manifest>>,
    bases: crate::fetch_deltas::Bases,
    last_apply: Option<Outcome>,
    /// Releases not tried again: each try of one that did not install
    /// stops the application (a lanup release, the node).
    failed_releases: HashSet<String>,
}

/// Takes the state directory (one node at a time) and resolves what a
/// stop left half done.
async fn recover(config: &NodeConfig) -> Result<Recovered> {
    // Where this lanup is installed, before anything can rename it.
    let _ = crate::upgrade::binary();
    std::fs::create_dir_all(&config.state)
        .with_context(|| format!("cannot create state directory {}", config.state.display()))?;
    let lock = crate::control::lock_state(&config.state)?;
    // An update of lanup itself cut short is resolved first (a trial node
    // leaves it to the node that started it).
    if !crate::upgrade::on_trial() {
        crate::upgrade::recover(&config.state)?;
    }
    crate::stage::rename_old_folders(&config.state);
    let key = crate::membership::identity(&config.state)?;
    let own_certificate = own_certificate(config, &key)?;
    let mut gate = crate::membership::Gate::new(
        &config.site,
        &key.public(),
        &config.trust_admin,
        config.members_only_from,
        now_unix_ms() / 1000,
    );
    gate.load_revocations(&config.state, now_unix_ms() / 1000);
    // An interrupted apply is resolved before anything else.
    let applier = config
        .app
        .clone()
        .map(|app| Applier::new(&config.state, app));
    if let Some(applier) = applier.clone() {
        let recovered = tokio::task::spawn_blocking(move || applier.recover(&mut |_| {}))
            .await
            .context("recovery task")??;
        if let Some(outcome) = recovered {
            info!(release = %outcome.version, ending = ?outcome.ending, "resolved an interrupted apply");
        }
    }
    let installed = crate::apply::read_installed(&config.state)?.map(|i| i.manifest);
    let bases = crate::fetch_deltas::Bases::of_node(&config.state, installed.as_deref().as_slice());
    // The newer of the application's last apply and lanup's own update.
    let lanup_last = crate::upgrade::last(&config.state);
    let last_apply = applier
        .as_ref()
        .and_then(Applier::last)
        .into_iter()
        .chain(lanup_last.clone())
        .max_by_key(|o| o.finished_at);
    let failed_releases = last_apply
        .iter()
        .filter(|o| o.ending == Ending::RolledBack)
        .chain(lanup_last.iter().filter(|o| o.ending != Ending::Committed))
        .map(|o| o.version.clone())
        .collect();
    Ok(Recovered {
        lock,
        key,
        own_certificate,
        gate,
        applier,
        installed,
        bases,
        last_apply,
        failed_releases,
    })
}

fn read_psk(config: &NodeConfig) -> Result<Option<libp2p::pnet::PreSharedKey>> {
    let Some(path) = &config.psk else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read psk {}", path.display()))?;
    text.parse::<libp2p::pnet::PreSharedKey>()
        .map(Some)
        .map_err(|e| anyhow::anyhow!("psk {}: {e}", path.display()))
}

/// The handles a starting node gets from its parts, once they run.
struct Parts {
    recovered: Recovered,
    net: NetworkClient,
    store: ChunkStore,
    metrics: crate::metrics::Metrics,
    fetcher: FetcherHandle,
    reporter: Option<crate::report::Reporter>,
    done_tx: mpsc::Sender<Done>,
    audit: std::sync::mpsc::SyncSender<Entry>,
    guard: ReplayGuard,
}

impl Node {
    /// Resolves what a stop left half done, starts the node's parts
    /// (swarm, chunk server, metrics, control socket, fetcher, reporter)
    /// and reads what the node holds.
    pub(super) async fn start(config: NodeConfig) -> Result<(Node, Wiring)> {
        let recovered = recover(&config).await?;
        let (network, net, events) = Network::new(
            recovered.key.to_libp2p(),
            NetworkConfig {
                listen: config.listen.clone(),
                peers: config.peers.clone(),
                psk: read_psk(&config)?,
                mdns: config.mdns,
                state: Some(config.state.clone()),
            },
        )?;
        info!(peer = %net.local_peer_id(), site = %config.site, origin = ?config.origin, "node starting");
        let cancel = tokio_util::sync::CancellationToken::new();
        let mut children = tokio::task::JoinSet::new();
        children.spawn(until(cancel.clone(), network.run()));
        let store = ChunkStore::open(&config.state.join("chunks"))?;
        let (damaged_tx, damaged) = mpsc::channel::<Hash>(64);
        let metrics = crate::metrics::Metrics::new();
        let serving = Serving {
            net: &net,
            store: &store,
            metrics: &metrics,
            damaged: &damaged_tx,
            gate: &recovered.gate,
        };
        serving.start(&config, &mut children, &cancel)?;
        let (audit, audit_thread, guard) = open_audit(&config)?;
        let (done_tx, done) = mpsc::channel(1024);
        let (control_tx, control) = mpsc::channel::<crate::control::Incoming>(16);
        children.spawn(until(
            cancel.clone(),
            crate::control::listen(&config.state, control_tx)?,
        ));
        let (fetcher, found) = start_fetcher(&config, &store, &mut children, &cancel)?;
        let reporter = config.report_to.clone().map(|url| {
            let (reporter, task) = crate::report::start(
                url,
                config.report_interval,
                recovered.key.clone(),
                recovered.own_certificate.clone(),
            );
            children.spawn(until(cancel.clone(), task));
            reporter
        });
        let parts = Parts {
            recovered,
            net,
            store,
            metrics,
            fetcher,
            reporter,
            done_tx,
            audit,
            guard,
        };
        let (mut node, lock) = Node::new(config, parts).await?;
        node.load(damaged_tx);
        let wiring = Wiring {
            events,
            done,
            found,
            control,
            damaged,
            children,
            cancel,
            audit_thread,
            _lock: lock,
        };
        Ok((node, wiring))
    }

    /// What the node holds at start: its rollout, its staged release (the
    /// fetcher is told of it), and a look through its chunk store.
    fn load(&mut self, damaged: mpsc::Sender<Hash>) {
        if let Some(r) = &self.rollout {
            info!(release = %r.version, id = %r.command.id, "following the rollout saved before the node stopped");
        }
        if let Some(m) = &self.installed {
            info!(release = %m.release_name(), "installed release");
        }
        self.load_staged();
        if let Some(t) = self.transfer.target() {
            self.fetcher.holds(crate::release::Known {
                signature: t.signature.clone().into_bytes(),
                text: Some(t.text.clone()),
            });
        }
        self.check_store(damaged);
    }

    /// The node, with its parts' handles; the state directory's lock,
    /// held until it stops.
    async fn new(config: NodeConfig, parts: Parts) -> Result<(Node, crate::control::StateLock)> {
        let topic = |name: &str| format!("lanup/{}/{name}", config.site);
        let (announce_topic, status_topic, rollout_topic) =
            (topic("announce"), topic("status"), topic("rollout"));
        for topic in [&announce_topic, &status_topic, &rollout_topic] {
            parts.net.subscribe(topic).await?;
        }
        let rollout = Rollout::load(&config.state, &config.trust_admin, &config.site);
        let (pending, rejected) =
            approvals::SavedRequests::load(&config.state, &config.trust_admin, &config.site);
        let r = parts.recovered;
        let node = Node {
            gate: r.gate,
            own_certificate: r.own_certificate,
            reporter: parts.reporter,
            metrics: parts.metrics,
            check: None,
            leaving: None,
            config,
            local: parts.net.local_peer_id(),
            net: parts.net,
            store: parts.store,
            peers: BTreeMap::new(),
            transfer: Transfers::default(),
            done_tx: parts.done_tx,
            suspects: HashMap::new(),
            choice: None,
            was_fetcher: false,
            last_tick: Instant::now(),
            woke_at: None,
            has_settled: Default::default(),
            early_heartbeat: None,
            started: Instant::now(),
            fetcher: parts.fetcher,
            announce_topic,
            status_topic,
            validating: HashMap::new(),
            refused: HashSet::new(),
            applier: r.applier,
            installed: r.installed,
            bases: std::sync::Arc::new(r.bases),
            applying: None,
            failed_releases: r.failed_releases,
            last_apply: r.last_apply,
            rollout_topic,
            heard: HashMap::new(),
            boot_ms: now_unix_ms(),
            heartbeats_sent: 0,
            last_sent: None,
            tasks: tokio::task::JoinSet::new(),
            lacking: None,
            unanswered: HashMap::new(),
            ticks: 0,
            announce_until: 0,
            rollout,
            pending,
            rejected,
            waiting: None,
            health_said: None,
            audit_answers: std::sync::Arc::new(tokio::sync::Semaphore::new(record::AUDIT_ANSWERS)),
            guard: parts.guard,
            audit: parts.audit,
            asked: HashMap::new(),
            refusals: Default::default(),
            refused_command: None,
        };
        Ok((node, r.lock))
    }

    /// The node's loop, until `shutdown`, a part that fails, or a hand-over
    /// to a new lanup: the error that ended it, if one did.
    pub(super) async fn run_loop(
        &mut self,
        wiring: &mut Wiring,
        notifier: &mut crate::platform::Notifier,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Option<anyhow::Error> {
        let mut ticks = Ticks::new();
        tokio::pin!(shutdown);
        // Something happened since the node last looked whether its
        // heartbeat changed: only then does it look (an idle node sleeps).
        let mut changed = true;
        while self.leaving.is_none() {
            tokio::select! {
                // Timers first: a flood from the network must not hold
                // back the watchdog, the heartbeat or the fetcher's duty
                // (each timer fires once per period, so it cannot starve
                // the rest).
                biased;
                _ = &mut shutdown => return None,
                _ = ticks.heartbeat.tick() => {
                    if let Some(e) = self.tick(notifier).await {
                        return Some(e);
                    }
                }
                _ = ticks.changes.tick(), if changed => {
                    changed = self.heartbeat(false).await;
                    continue;
                }
                _ = ticks.quick.tick(), if !self.has_settled.get() || self.early_heartbeat.is_some() => {
                    self.quick_tick().await;
                }
                // Ticks only while chunks move: an idle node sleeps.
                _ = ticks.schedule.tick(), if self.moving() => {
                    self.schedule();
                    if self.was_fetcher {
                        self.assign_duty();
                    }
                }
                _ = ticks.have.tick(), if self.moving() => self.ask_have(),
                Some(ended) = wiring.children.join_next() => {
                    return Some(match ended {
                        Ok(()) => anyhow::anyhow!("a part of the node stopped by itself"),
                        Err(e) => anyhow::anyhow!("a part of the node failed: {e}"),
                    });
                }
                // The node's own work (bounded by what it started) before
                // what the network brings, which a peer can make endless.
                Some((request, reply)) = wiring.control.recv() => self.control(request, reply),
                Some(d) = wiring.done.recv() => self.on_done(d).await,
                Some(found) = wiring.found.recv() => self.on_fetcher(found),
                Some(hash) = wiring.damaged.recv() => self.chunk_lost(hash),
                Some(event) = wiring.events.recv() => self.on_network(event).await,
            }
            changed = true;
            self.answer_have_waiting().await;
        }
        None
    }

    /// While the node settles (or owes a newcomer a heartbeat).
    async fn quick_tick(&mut self) {
        if self.early_heartbeat.is_some_and(|at| at <= Instant::now()) {
            self.early_heartbeat = None;
            self.heartbeat(true).await;
        }
        self.fetcher_duties();
    }
}

/// The node loop's timers.
struct Ticks {
    heartbeat: tokio::time::Interval,
    schedule: tokio::time::Interval,
    have: tokio::time::Interval,
    /// While the node settles (or owes a newcomer a heartbeat).
    quick: tokio::time::Interval,
    /// A change the site must hear of goes out within this.
    changes: tokio::time::Interval,
}

impl Ticks {
    fn new() -> Ticks {
        let every = |period| {
            let mut interval = tokio::time::interval(period);
            // After a freeze, one tick (that notices it), not a burst.
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            interval
        };
        Ticks {
            heartbeat: every(HEARTBEAT),
            schedule: every(Duration::from_millis(100)),
            have: every(HAVE_INTERVAL),
            quick: every(QUICK_TICK),
            changes: every(heartbeat::CHANGE_GAP),
        }
    }
}

/// What serves the site from this node: chunks to peers, metrics to a
/// scraper.
struct Serving<'a> {
    net: &'a NetworkClient,
    store: &'a ChunkStore,
    metrics: &'a crate::metrics::Metrics,
    damaged: &'a mpsc::Sender<Hash>,
    gate: &'a crate::membership::Gate,
}

impl Serving<'_> {
    fn start(
        &self,
        config: &NodeConfig,
        children: &mut tokio::task::JoinSet<()>,
        cancel: &tokio_util::sync::CancellationToken,
    ) -> Result<()> {
        if let Some(listen) = config.metrics_listen.clone() {
            // Bound before the node counts as started: a port in use is an
            // error the operator sees at once.
            let served = self.metrics.clone().serve(listen);
            children.spawn(until(cancel.clone(), async move {
                if let Err(e) = served.await {
                    error!(error = %format!("{e:#}"), "metrics endpoint stopped");
                }
            }));
        }
        let incoming = self.net.streams().accept(CHUNK_PROTOCOL)?;
        children.spawn(until(
            cancel.clone(),
            chunks::serve(
                incoming,
                self.store.clone(),
                Throttle::new(config.lan_rate),
                self.damaged.clone(),
                self.metrics.clone(),
                self.gate.admission(),
            ),
        ));
        Ok(())
    }
}

/// The audit log's writer, and the commands it says were accepted (a
/// replayed one is refused after a restart too).
fn open_audit(
    config: &NodeConfig,
) -> Result<(
    std::sync::mpsc::SyncSender<Entry>,
    std::thread::JoinHandle<()>,
    ReplayGuard,
)> {
    let audit = Audit::new(&config.state);
    let mut guard = ReplayGuard::default();
    for entry in audit.read()?.iter().filter(|e| e.event == "accepted") {
        match (&entry.id, entry.issued_at_ms, entry.forget_at_ms) {
            (Some(id), _, Some(forget_at)) => guard.remember_until(id, forget_at),
            (Some(id), Some(at), None) => guard.remember(id, at),
            _ => {}
        }
    }
    let (tx, thread) = audit_writer(audit)?;
    Ok((tx, thread, guard))
}

/// The fetcher, running; its handle and what it finds.
fn start_fetcher(
    config: &NodeConfig,
    store: &ChunkStore,
    children: &mut tokio::task::JoinSet<()>,
    cancel: &tokio_util::sync::CancellationToken,
) -> Result<(FetcherHandle, mpsc::Receiver<FetcherEvent>)> {
    let (fetcher, handle, found) = Fetcher::new(
        config.origin.clone(),
        config.origin_stall,
        Throttle::scheduled(config.wan_rate, &config.policy.wan_schedule),
        store.clone(),
        config.poll_interval,
    )?;
    // With trusted admin keys, the site's revocation list is read from the
    // origin too: an administrator revokes a node there without reaching
    // any node of the site.
    let fetcher = if config.trust_admin.is_empty() {
        fetcher
    } else {
        fetcher.with_revocations(lanup_protocol::membership::revoked_file(&config.site))
    };
    children.spawn(fetcher.run(cancel.clone()));
    Ok((handle, found))
}
