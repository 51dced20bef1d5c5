//! The origin fetcher: the one actor of a node that talks to the origin.
//!
//! It owns the HTTP client, the manifest's ETag, the fetcher's rules
//! (`lanup_protocol::fetcher::OriginPlan`: when to poll, when to download,
//! one job at a time, the backoff after failures) and the poll or download
//! under way. The node tells it through a watch channel, which it never
//! waits on, whether this node is the site's fetcher and which chunks the
//! site lacks; the fetcher tells the node what it found (a changed
//! manifest, chunks stored) over a channel the node drains, and shows how
//! it fares (job, last error, bytes) in a watch the node reads for its
//! heartbeats and status. Messages flow one way in each channel, so neither
//! loop ever waits for the other.

use std::collections::{BTreeSet, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lanup_protocol::fetcher::{Job, OriginPlan, ReleaseView, Step, View};
use lanup_protocol::manifest::unique_chunks;
use lanup_protocol::{Hash, Manifest};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::fetch::{FetchError, FetchReport, Origin};
use crate::fetch_deltas::{fetch_release, Bases, Fallbacks};
use crate::manifest_text::ManifestText;
use crate::release::{http_get_bounded, Got, Known, ManifestSource, Poll};
use crate::store::ChunkStore;
use crate::throttle::Throttle;
use lanup_protocol::fleet::FLEET_FILE;

/// How long a download may go on without the node confirming (every
/// heartbeat) that it is still the site's fetcher. A node frozen for
/// longer (a paused VM, a swap storm) wakes with its download stopped, and
/// learns what the site holds before it asks again.
pub const LEASE: Duration = Duration::from_secs(3);
/// Every this many polls, the manifest is asked for without its ETag: an
/// origin whose validator did not change when the manifest did (nginx's
/// is the modification second and the size) would answer 304 for ever.
pub const UNCONDITIONAL_EVERY: u32 = 8;

/// How long a node whose origin failed says so (and is passed over for
/// the fetcher role); then it may try again.
pub const FAILING_FOR: Duration = Duration::from_secs(600);

/// A fetcher that took up no duty for this long, while the node sent
/// them, is wedged: the node stops pinging the service manager's watchdog.
pub const ANSWER_WITHIN: Duration = Duration::from_secs(10);

/// What the node asks of its fetcher. Sent whenever it changes, and with
/// every heartbeat while this node is the site's fetcher: that renews the
/// download's lease.
#[derive(Debug, Clone, Default)]
pub struct Duty {
    /// This node is the site's fetcher (and has heard the site since it
    /// started or woke).
    pub acting: bool,
    /// When the node last said so.
    pub confirmed: Option<Instant>,
    /// Set by [`FetcherHandle::assign`]: which duty this is.
    pub serial: u64,
    /// The release the node moves towards, while it acts.
    pub release: Option<Wanted>,
}

/// The release as the fetcher needs to see it.
#[derive(Debug, Clone)]
pub struct Wanted {
    pub hash: Hash,
    pub manifest: Arc<Manifest>,
    /// Chunks neither this node nor any reachable peer holds: only these
    /// are asked of the origin.
    pub lacking: Arc<BTreeSet<Hash>>,
    /// Every peer has said which chunks it holds.
    pub heard_all: bool,
    pub adopted_at: Instant,
    /// The release does not fit on this node's disks.
    pub blocked: bool,
    /// The files this node holds that patches may apply to.
    pub bases: Arc<Bases>,
}

/// What the fetcher tells the node.
#[derive(Debug)]
pub enum FetcherEvent {
    /// The origin's manifest changed: its bytes, signature and location.
    Manifest {
        location: String,
        text: ManifestText,
        signature: String,
    },
    /// A chunk from the origin is in the store (best effort: a full
    /// channel drops the notice), downloaded for the release with this
    /// manifest hash.
    Chunk { release: Hash, chunk: Hash },
    /// A download ended or was stopped: the store is the truth about what
    /// it stored.
    Ended,
    /// The origin's fleet rollout file changed: its bytes (checked by the
    /// node, command by command).
    Fleet(Vec<u8>),
    /// The site's revocation list as the origin publishes it.
    Revocations(Vec<u8>),
}

/// How the fetcher fares, as the node shows it.
#[derive(Debug, Clone, Default)]
pub struct FetcherStatus {
    pub job: Option<Job>,
    /// Why the origin failed last, when it did, and when it is asked again.
    pub error: Option<String>,
    /// The last few patches or packed chunks that could not be used, and
    /// why (their chunks were taken plainly).
    pub fallbacks: Vec<String>,
    pub failed_at: Option<Instant>,
    pub retry_at: Option<Instant>,
}

impl FetcherStatus {
    /// The origin failed in the last [`FAILING_FOR`] and has not answered
    /// well since: the node gives the role to the next one.
    pub fn failing(&self) -> bool {
        self.error.is_some() && self.failed_at.is_some_and(|at| at.elapsed() < FAILING_FOR)
    }
}

/// The node's side of the fetcher: cheap to read, never waits.
pub struct FetcherHandle {
    duty: watch::Sender<Duty>,
    check: mpsc::Sender<()>,
    status: watch::Receiver<FetcherStatus>,
    /// Body bytes received from the origin, counted as they arrive.
    pub received: Arc<AtomicU64>,
    /// Bytes of chunks taken from the origin (exact once a download ends).
    pub origin_bytes: Arc<AtomicU64>,
    /// Duties sent, and the number of the last one the fetcher took up
    /// (with when that last changed): a fetcher that stops taking them
    /// up is wedged.
    sent: std::cell::Cell<u64>,
    taken: Arc<AtomicU64>,
    taken_seen: std::cell::Cell<(u64, Instant)>,
    held: Arc<std::sync::Mutex<Option<Known>>>,
}

impl FetcherHandle {
    /// Tells the fetcher of the manifest this node already holds (the
    /// release it took up at start), so that its first poll asks for the
    /// signature alone, or a delta from it, instead of the whole manifest.
    pub fn holds(&self, known: Known) {
        if let Ok(mut held) = self.held.lock() {
            *held = Some(known);
        }
    }

    /// Tells the fetcher what is asked of it now.
    pub fn assign(&self, duty: Duty) {
        self.sent.set(self.sent.get() + 1);
        self.duty.send_replace(Duty {
            serial: self.sent.get(),
            ..duty
        });
    }

    /// Whether the fetcher takes up its duties: it has taken up the last
    /// one, or another within [`ANSWER_WITHIN`].
    pub fn answers(&self) -> bool {
        let taken = self.taken.load(Ordering::Relaxed);
        let (seen, at) = self.taken_seen.get();
        if taken != seen {
            self.taken_seen.set((taken, Instant::now()));
            return true;
        }
        taken == self.sent.get() || at.elapsed() < ANSWER_WITHIN
    }

    /// Asks for a poll of the origin now (`lanup check`); true when one is
    /// asked for (now or already), false when the fetcher is gone.
    pub fn check_now(&self) -> bool {
        !matches!(
            self.check.try_send(()),
            Err(tokio::sync::mpsc::error::TrySendError::Closed(_))
        )
    }

    pub fn status(&self) -> FetcherStatus {
        self.status.borrow().clone()
    }

    pub fn busy(&self) -> Option<Job> {
        self.status.borrow().job
    }
}

/// The actor.
pub struct Fetcher {
    origin: Option<String>,
    http: reqwest::Client,
    wan: Throttle,
    stall: Duration,
    store: ChunkStore,
    plan: OriginPlan,
    etag: Option<String>,
    /// Polls since the last one without an ETag.
    conditional_polls: u32,
    /// The manifest bytes last told to the node, and whether their
    /// signature held over them: an unconditional poll that finds them
    /// again changes nothing.
    last_manifest: Option<(Hash, bool)>,
    /// What the node held at start, until the first poll takes it.
    held: Arc<std::sync::Mutex<Option<Known>>>,
    /// The signature last read, and the signed manifest last read: a poll
    /// asks for the signature alone first, and for the manifest (as a
    /// delta from this one, if the origin has it) only if it changed.
    known: Option<Known>,
    /// The fleet rollout file's ETag, as last read.
    fleet_etag: Option<String>,
    /// The site's published revocation list (its path beside the fleet
    /// file; none when the node trusts no admin key), and its ETag.
    revoked: Option<(String, Option<String>)>,
    duty: watch::Receiver<Duty>,
    check: mpsc::Receiver<()>,
    events: mpsc::Sender<FetcherEvent>,
    status: watch::Sender<FetcherStatus>,
    /// The poll or download under way (one at a time), with its epoch.
    jobs: JoinSet<(u64, Outcome)>,
    received: Arc<AtomicU64>,
    origin_bytes: Arc<AtomicU64>,
    /// Until when (ms since `started`) the download may go on.
    lease: Arc<AtomicU64>,
    /// The chunks the download may take, as the node last said.
    lacks: watch::Sender<Arc<BTreeSet<Hash>>>,
    started: Instant,
    /// The release being downloaded, and the bytes taken for it so far.
    downloading: Option<(Hash, u64)>,
    /// The received count at the last look, and when it last grew.
    progress: (u64, Instant),
    cancel: CancellationToken,
    /// The serial of the last duty taken up.
    taken: Arc<AtomicU64>,
    /// Patches and packed chunks that failed here: not tried again.
    fallbacks: Arc<std::sync::Mutex<Fallbacks>>,
    /// The site's lack a download finished with: the same duty does not
    /// start another one (the node sends a fresh one once it looked at
    /// the store).
    done_with: Option<Arc<BTreeSet<Hash>>>,
}

enum Outcome {
    /// The manifest's poll, the fleet rollout file's, and the site's
    /// revocation list's (when it is read).
    Poll(
        anyhow::Result<Poll>,
        anyhow::Result<Got>,
        Option<anyhow::Result<Got>>,
    ),
    Download {
        result: Result<FetchReport, FetchError>,
        /// Bytes of the chunks it stored, as counted while it ran.
        counted: u64,
        stored: HashSet<Hash>,
    },
}

impl Fetcher {
    /// A fetcher for `origin` (none: the node never talks to one) and the
    /// node's handle to it, with the channel its findings arrive on.
    pub fn new(
        origin: Option<String>,
        stall: Duration,
        wan: Throttle,
        store: ChunkStore,
        poll_interval: Duration,
    ) -> anyhow::Result<(Fetcher, FetcherHandle, mpsc::Receiver<FetcherEvent>)> {
        let (duty_tx, duty) = watch::channel(Duty::default());
        let (check_tx, check) = mpsc::channel(1);
        let (status_tx, status) = watch::channel(FetcherStatus::default());
        let (events_tx, events) = mpsc::channel(1024);
        let received = Arc::new(AtomicU64::new(0));
        let origin_bytes = Arc::new(AtomicU64::new(0));
        let taken = Arc::new(AtomicU64::new(0));
        let held = Arc::new(std::sync::Mutex::new(None));
        let fetcher = Fetcher {
            held: held.clone(),
            taken: taken.clone(),
            origin,
            http: Origin::client(stall)?,
            wan,
            stall,
            store,
            plan: OriginPlan::new(poll_interval.as_millis() as u64),
            etag: None,
            conditional_polls: 0,
            last_manifest: None,
            known: None,
            fleet_etag: None,
            revoked: None,
            duty,
            check,
            events: events_tx,
            status: status_tx,
            jobs: JoinSet::new(),
            received: received.clone(),
            origin_bytes: origin_bytes.clone(),
            lease: Arc::default(),
            lacks: watch::Sender::new(Arc::default()),
            started: Instant::now(),
            downloading: None,
            progress: (0, Instant::now()),
            cancel: CancellationToken::new(),
            done_with: None,
            fallbacks: Arc::default(),
        };
        let handle = FetcherHandle {
            duty: duty_tx,
            check: check_tx,
            status,
            received,
            origin_bytes,
            sent: std::cell::Cell::new(0),
            taken: taken.clone(),
            taken_seen: std::cell::Cell::new((0, Instant::now())),
            held,
        };
        Ok((fetcher, handle, events))
    }

    /// Reads the site's revocation list published at `path` (beside the
    /// fleet rollout file) at each poll too.
    pub fn with_revocations(mut self, path: String) -> Fetcher {
        self.revoked = Some((path, None));
        self
    }

    /// Runs until cancelled or the node drops its handle.
    pub async fn run(mut self, cancel: CancellationToken) {
        self.cancel = cancel.clone();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                changed = self.duty.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    self.on_duty();
                }
                Some(()) = self.check.recv() => self.plan.poll_now(self.now_ms()),
                Some(joined) = self.jobs.join_next() => {
                    if let Ok((epoch, outcome)) = joined {
                        self.finished(epoch, outcome).await;
                    }
                }
                _ = tick.tick(), if self.plan.running() == Some(Job::Download) => {
                    self.watch_progress().await;
                }
            }
            self.step().await;
        }
        self.jobs.shutdown().await;
    }

    /// Tells the node; a node that stopped taking events (it is stopping)
    /// does not keep the fetcher from stopping.
    async fn tell(&self, event: FetcherEvent) {
        tokio::select! {
            () = self.cancel.cancelled() => {}
            _ = self.events.send(event) => {}
        }
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// The node spoke: the lease is renewed (or ended), and a download
    /// under way learns what the site lacks now.
    fn on_duty(&mut self) {
        let duty = self.duty.borrow_and_update().clone();
        self.taken.store(duty.serial, Ordering::Relaxed);
        let lease = match duty.confirmed.filter(|_| duty.acting) {
            // A lease that ended before this actor started is over (0).
            Some(at) => (at + LEASE)
                .saturating_duration_since(self.started)
                .as_millis() as u64,
            None => 0,
        };
        self.lease.store(lease, Ordering::Relaxed);
        // The site holds the whole release: the download is over, whichever
        // of its jobs fetched the last chunk.
        if let (Some((hash, bytes)), Some(w)) = (self.downloading, &duty.release) {
            if hash == w.hash && w.lacking.is_empty() {
                info!(bytes, "download from the origin finished");
                self.downloading = None;
            }
        }
        if let Some(w) = duty
            .release
            .filter(|_| self.plan.running() == Some(Job::Download))
        {
            self.lacks.send_replace(w.lacking);
        }
    }

    /// Asks the rules what to do now and does it: poll, download what the
    /// site lacks, or stop the job under way.
    async fn step(&mut self) {
        let duty = self.duty.borrow().clone();
        let now = self.now_ms();
        let acting =
            duty.acting && self.origin.is_some() && now < self.lease.load(Ordering::Relaxed);
        let view = View {
            acting,
            release: duty.release.as_ref().map(|w| ReleaseView {
                lacking: !w.lacking.is_empty()
                    && !self
                        .done_with
                        .as_ref()
                        .is_some_and(|done| Arc::ptr_eq(done, &w.lacking)),
                heard_all: w.heard_all,
                adopted_ms_ago: w.adopted_at.elapsed().as_millis() as u64,
                blocked: w.blocked,
            }),
        };
        match self.plan.step(now, &view) {
            Step::Idle => {}
            Step::Stop(_) => {
                self.jobs.abort_all();
                if !acting {
                    info!("not the site's fetcher any more: stopped talking to the origin");
                }
                self.tell(FetcherEvent::Ended).await;
            }
            Step::Start(epoch, Job::Poll) => self.poll(epoch),
            Step::Start(epoch, Job::Download) => match duty.release {
                Some(w) => self.download(epoch, w),
                None => {
                    self.plan.finished(epoch, true, now, random());
                }
            },
        }
        self.publish();
    }

    fn publish(&self) {
        let now = self.now_ms();
        let retry_at = self
            .plan
            .retry_in_ms(now)
            .map(|ms| Instant::now() + Duration::from_millis(ms));
        let fallbacks = self.fallbacks.lock().map(|f| f.notes()).unwrap_or_default();
        self.status.send_modify(|s| {
            s.job = self.plan.running();
            s.retry_at = retry_at;
            s.fallbacks = fallbacks;
        });
    }

    fn poll(&mut self, epoch: u64) {
        let Some(origin) = self.origin.clone() else {
            return;
        };
        let http = self.http.clone();
        self.conditional_polls += 1;
        let etag = if self.conditional_polls >= UNCONDITIONAL_EVERY {
            self.conditional_polls = 0;
            None
        } else {
            self.etag.clone()
        };
        if self.known.is_none() {
            self.known = self.held.lock().ok().and_then(|mut h| h.take());
        }
        let known = self.known.clone();
        let fleet_etag = self.fleet_etag.clone();
        let revoked = self.revoked.clone();
        self.jobs.spawn(async move {
            let result =
                ManifestSource::poll(&http, &origin, etag.as_deref(), known.as_ref()).await;
            // Beside the manifest, on the same connection: a few hundred
            // bytes when they have not changed.
            let base = origin.rsplit_once('/').map_or(origin.as_str(), |(b, _)| b);
            let fleet = http_get_bounded(
                &http,
                &format!("{base}/{FLEET_FILE}"),
                fleet_etag.as_deref(),
                lanup_protocol::fleet::MAX_FLEET_BYTES as u64,
            )
            .await;
            let revoked = match revoked {
                Some((path, etag)) => Some(
                    http_get_bounded(
                        &http,
                        &format!("{base}/{path}"),
                        etag.as_deref(),
                        lanup_protocol::membership::MAX_REVOCATION_BYTES as u64,
                    )
                    .await,
                ),
                None => None,
            };
            (epoch, Outcome::Poll(result, fleet, revoked))
        });
    }

    /// Downloads what no node at the site holds (the rules decided it is
    /// time: job `epoch`).
    fn download(&mut self, epoch: u64, w: Wanted) {
        let Some(origin) = self.origin.clone() else {
            return;
        };
        if self.downloading.is_none_or(|(hash, _)| hash != w.hash) {
            let sizes = unique_chunks(&w.manifest.files);
            let missing: u64 = w.lacking.iter().filter_map(|h| sizes.get(h)).sum();
            let total: u64 = sizes.values().sum();
            info!(release = %w.manifest.release_name(), missing_bytes = missing, held_bytes = total - missing, "downloading release from the origin");
            self.downloading = Some((w.hash, 0));
        }
        self.lacks.send_replace(w.lacking.clone());
        let source = Origin {
            client: self.http.clone(),
            base: origin,
            wan: self.wan.clone(),
            stall: self.stall,
            received: self.received.clone(),
        };
        self.progress = (self.received.load(Ordering::Relaxed), Instant::now());
        let store = self.store.clone();
        let events = self.events.clone();
        let lacks = self.lacks.subscribe();
        let lease = self.lease.clone();
        let started = self.started;
        let origin_bytes = self.origin_bytes.clone();
        let release = w.hash;
        // Asked before every request and as bytes arrive: a chunk a peer
        // now holds, or a role that lapsed, stops the download of it.
        let wanted = move |h: &Hash| {
            let now = started.elapsed().as_millis() as u64;
            now < lease.load(Ordering::Relaxed) && lacks.borrow().contains(h)
        };
        let fallbacks = self.fallbacks.clone();
        self.jobs.spawn(async move {
            let mut counted = 0;
            let mut stored = HashSet::new();
            let result = fetch_release(
                &source,
                &w.manifest,
                &store,
                &w.bases,
                &fallbacks,
                wanted,
                |c| {
                    counted += c.size;
                    stored.insert(c.hash);
                    origin_bytes.fetch_add(c.size, Ordering::Relaxed);
                    let _ = events.try_send(FetcherEvent::Chunk {
                        release,
                        chunk: c.hash,
                    });
                },
            )
            .await;
            (
                epoch,
                Outcome::Download {
                    result,
                    counted,
                    stored,
                },
            )
        });
    }

    async fn finished(&mut self, epoch: u64, outcome: Outcome) {
        let now = self.now_ms();
        match outcome {
            Outcome::Poll(result, fleet, revoked) => {
                self.side_files(fleet, revoked).await;
                let ok = match &result {
                    Ok(Poll::Unchanged { .. }) => true,
                    Ok(Poll::Changed { source, .. }) => signature_of(source).is_some(),
                    Err(_) => false,
                };
                if self.plan.finished(epoch, ok, now, random()) {
                    self.polled(result).await;
                }
            }
            Outcome::Download {
                result,
                counted,
                stored,
            } => {
                if !self.plan.finished(epoch, result.is_ok(), now, random()) {
                    return;
                }
                self.tell(FetcherEvent::Ended).await;
                self.downloaded(result, counted, &stored);
            }
        }
    }

    /// What a poll read beside the manifest: the site's revocation list and
    /// the fleet rollout file, told to the node when they changed.
    async fn side_files(
        &mut self,
        fleet: anyhow::Result<Got>,
        revoked: Option<anyhow::Result<Got>>,
    ) {
        if let (Some(got), Some((_, etag))) = (revoked, self.revoked.as_mut()) {
            match got {
                Ok(Got::Body(bytes, new)) => {
                    *etag = new;
                    self.tell(FetcherEvent::Revocations(bytes)).await;
                }
                Ok(Got::NotFound) => *etag = None,
                Ok(Got::NotModified) => {}
                Err(e) => {
                    debug!(error = %format!("{e:#}"), "cannot read the site's published revocation list")
                }
            }
        }
        match fleet {
            Ok(Got::Body(bytes, etag)) => {
                self.fleet_etag = etag;
                self.tell(FetcherEvent::Fleet(bytes)).await;
            }
            Ok(Got::NotFound) => self.fleet_etag = None,
            Ok(Got::NotModified) => {}
            Err(e) => {
                debug!(error = %format!("{e:#}"), "cannot read the origin's fleet rollout file")
            }
        }
    }

    /// The manifest's poll counted: the node hears of a new release.
    async fn polled(&mut self, result: anyhow::Result<Poll>) {
        match result {
            Ok(Poll::Unchanged { etag }) => {
                if etag.is_some() {
                    self.etag = etag;
                }
                self.origin_ok()
            }
            Ok(Poll::Changed {
                source,
                etag,
                signed,
            }) => match signature_of(&source) {
                None => self.failed(
                    "the origin's release is not signed",
                    format!("{}: no readable signature file beside it", source.location),
                ),
                Some(signature) => {
                    // A manifest and signature that do not belong
                    // together (read during a publish, or a manifest
                    // edited without signing it again) are read
                    // again once the signature changes; the next
                    // polls ask for the signature alone, so an
                    // origin left that way is not read whole at
                    // every poll. The manifest held stays the one a
                    // delta may start from.
                    self.etag = etag;
                    let text = if signed {
                        Some(source.text.clone())
                    } else {
                        self.known.take().and_then(|k| k.text)
                    };
                    self.known = Some(Known {
                        signature: signature.clone().into_bytes(),
                        text,
                    });
                    self.origin_ok();
                    // The same bytes signed now, after a torn
                    // read of them, are told again.
                    let told = (source.text.hash(), signed);
                    if self.last_manifest.replace(told) == Some(told) {
                        return;
                    }
                    self.tell(FetcherEvent::Manifest {
                        location: source.location,
                        text: source.text,
                        signature,
                    })
                    .await;
                }
            },
            Err(e) => self.failed(
                "cannot read the origin's manifest",
                crate::http::describe(&e),
            ),
        }
    }

    /// A download's end counted: its bytes, and whether it left the site
    /// lacking anything.
    fn downloaded(
        &mut self,
        result: Result<FetchReport, FetchError>,
        counted: u64,
        stored: &HashSet<Hash>,
    ) {
        match result {
            Ok(report) => {
                // The exact count, including bytes that were not a
                // whole chunk.
                self.origin_bytes.fetch_add(report.bytes, Ordering::Relaxed);
                self.origin_bytes.fetch_sub(counted, Ordering::Relaxed);
                self.origin_ok();
                self.done_with = Some(self.lacks.borrow().clone());
                let lacking = self.lacks.borrow().iter().any(|h| !stored.contains(h));
                if let Some((_, total)) = &mut self.downloading {
                    *total += report.bytes;
                }
                if !lacking {
                    if let Some((_, bytes)) = self.downloading.take() {
                        info!(bytes, "download from the origin finished");
                    }
                }
            }
            Err(e) => {
                let what = match &e {
                    FetchError::LocalDisk(_) => "this node cannot store what the origin sends",
                    FetchError::Mismatch { .. } => {
                        "the origin's files differ from its signed manifest"
                    }
                    _ => "download from the origin failed",
                };
                let reason = match crate::http::explain(&e) {
                    Some(why) => format!("{why} ({e:#})"),
                    None => format!("{e:#}"),
                };
                self.failed(what, reason);
            }
        }
    }

    /// A download that receives nothing for twice the stall timeout (its
    /// route to the origin is gone) is an origin failure like any other:
    /// it stops, backs off and says so, so the role moves on and stays
    /// moved.
    async fn watch_progress(&mut self) {
        let received = self.received.load(Ordering::Relaxed);
        if received != self.progress.0 {
            self.progress = (received, Instant::now());
            return;
        }
        let quiet = self.progress.1.elapsed();
        if quiet < self.stall * 2 {
            return;
        }
        self.jobs.abort_all();
        self.plan.stop();
        self.plan.failed(self.now_ms(), random());
        self.tell(FetcherEvent::Ended).await;
        self.failed(
            "the download from the origin makes no progress",
            format!("no byte from the origin for {} s", quiet.as_secs()),
        );
    }

    /// The origin answered as it should.
    fn origin_ok(&mut self) {
        let was = self.status.send_if_modified(|s| s.error.take().is_some());
        if was {
            info!("the origin answers again");
        }
    }

    /// The origin (or this node's disk, holding what it sent) failed; the
    /// rules wait longer each time in a row (5 s doubling, with jitter, at
    /// most the poll interval or 5 minutes) before the origin is asked
    /// anything again. One WARN per wait; the reason is in the status.
    fn failed(&mut self, what: &str, reason: String) {
        let wait = self.plan.retry_in_ms(self.now_ms()).unwrap_or_default();
        warn!(error = %reason, retry_in = %humantime::format_duration(Duration::from_secs(wait / 1000)), "{what}; backing off");
        self.status.send_modify(|s| {
            s.error = Some(reason);
            s.failed_at = Some(Instant::now());
        });
    }
}

/// A random number for the fetcher's jitter.
pub(crate) fn random() -> u64 {
    use std::hash::BuildHasher;
    std::collections::hash_map::RandomState::new().hash_one(Instant::now())
}

/// A source's signature as text, if it has a readable one.
fn signature_of(source: &ManifestSource) -> Option<String> {
    source
        .signature
        .clone()
        .and_then(|s| String::from_utf8(s).ok())
}
