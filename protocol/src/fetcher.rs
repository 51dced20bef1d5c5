//! The fetcher's rules, as a pure state machine: when the site's fetcher
//! polls the origin, when it downloads, how long it backs off after a
//! failure, and which answers still count. The node drives it with its
//! clock and its view of the site; the simulator drives the same machine
//! with simulated time, so both follow one set of rules.
//!
//! * A poll is due at start and then every poll interval, with ±10% jitter
//!   so that a fleet of sites does not poll in step.
//! * A download starts when the node acts as the fetcher, a release is
//!   adopted, some of its chunks are held by no peer, and the node has
//!   heard every peer's chunk list (or waited [`HAVE_WAIT_MS`] for them):
//!   chunks already at the site are never fetched again.
//! * One job (a poll or a download) at a time, each with a number (its
//!   epoch): the answer of a job that was stopped is ignored, so two
//!   downloads of the same chunks never run side by side.
//! * After a failure (an error, bytes that do not match the manifest, a
//!   disk that refuses them, no progress) nothing is asked of the origin
//!   for a while: 5 s, doubling per failure in a row, at most the poll
//!   interval or 5 minutes, with jitter. A success starts again from 5 s.

use crate::plan::HAVE_WAIT_MS;

/// The first wait after a failure.
pub const BACKOFF_MIN_MS: u64 = 5_000;
/// The longest wait after failures (the poll interval caps it too).
pub const BACKOFF_MAX_MS: u64 = 300_000;
/// The least time between the start of a poll and one an operator's check
/// asks for.
pub const CHECK_GAP_MS: u64 = 1_000;

/// What the fetcher does with the origin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Job {
    /// Ask for the manifest (conditionally).
    Poll,
    /// Take the chunks no peer holds.
    Download,
}

/// What the node knows when it asks what to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct View {
    /// This node is the site's fetcher (elected, settled, not just woken).
    pub acting: bool,
    /// The release being fetched, if any, and how the site stands with it.
    pub release: Option<ReleaseView>,
}

/// The release being fetched, as the node sees the site.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReleaseView {
    /// Some of its chunks are held by no reachable peer (nor this node).
    pub lacking: bool,
    /// Every connected peer answered what chunks it holds.
    pub heard_all: bool,
    /// Milliseconds since the release was adopted (or since the node last
    /// had to learn the site afresh).
    pub adopted_ms_ago: u64,
    /// It may not be fetched now (it does not fit on the disk, say).
    pub blocked: bool,
}

/// What to do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Nothing new.
    Idle,
    /// Stop the job with this epoch: the node no longer acts as fetcher.
    Stop(u64),
    /// Start `job`; report its end with this epoch.
    Start(u64, Job),
}

/// The fetcher's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginPlan {
    poll_interval_ms: u64,
    epoch: u64,
    running: Option<Job>,
    next_poll_ms: u64,
    /// When the last poll started, and when an operator last asked for one.
    last_poll_ms: Option<u64>,
    asked_ms: Option<u64>,
    retry_at_ms: Option<u64>,
    failures: u32,
}

/// The wait after `failures` failures in a row (at least 1): 5 s doubling,
/// at most `cap_ms`, the upper half of it drawn from `random` ("equal
/// jitter": never less than half the step, so waits still grow).
pub fn backoff_ms(failures: u32, cap_ms: u64, random: u64) -> u64 {
    let cap = cap_ms.max(BACKOFF_MIN_MS);
    let step = BACKOFF_MIN_MS
        .saturating_mul(1u64 << failures.saturating_sub(1).min(20))
        .min(cap);
    step / 2 + random % (step / 2 + 1)
}

impl OriginPlan {
    /// A fetcher whose first poll is due at once.
    pub fn new(poll_interval_ms: u64) -> OriginPlan {
        OriginPlan {
            poll_interval_ms,
            epoch: 0,
            running: None,
            next_poll_ms: 0,
            last_poll_ms: None,
            asked_ms: None,
            retry_at_ms: None,
            failures: 0,
        }
    }

    /// The job running, if any.
    pub fn running(&self) -> Option<Job> {
        self.running
    }

    /// Whether the origin is being left alone after failures at `now_ms`.
    pub fn backing_off(&self, now_ms: u64) -> bool {
        self.retry_at_ms.is_some_and(|at| now_ms < at)
    }

    /// Milliseconds until the origin is asked again after failures.
    pub fn retry_in_ms(&self, now_ms: u64) -> Option<u64> {
        self.retry_at_ms.map(|at| at.saturating_sub(now_ms))
    }

    /// Failures in a row so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// What to do at `now_ms`, given `view`.
    pub fn step(&mut self, now_ms: u64, view: &View) -> Step {
        if !view.acting {
            return match self.running.take() {
                Some(_) => Step::Stop(self.bump()),
                None => Step::Idle,
            };
        }
        if self.running.is_some() || self.backing_off(now_ms) {
            return Step::Idle;
        }
        if now_ms >= self.next_poll_ms {
            self.last_poll_ms = Some(now_ms);
            return self.start(Job::Poll);
        }
        let Some(r) = view.release else {
            return Step::Idle;
        };
        let settled = r.heard_all || r.adopted_ms_ago >= HAVE_WAIT_MS;
        if r.lacking && settled && !r.blocked {
            return self.start(Job::Download);
        }
        Step::Idle
    }

    fn bump(&mut self) -> u64 {
        self.epoch += 1;
        self.epoch
    }

    fn start(&mut self, job: Job) -> Step {
        self.running = Some(job);
        Step::Start(self.bump(), job)
    }

    /// Stops the job running (the node froze, or must learn the site
    /// again); its answer will not count. Returns its epoch, if one ran.
    pub fn stop(&mut self) -> Option<u64> {
        self.running.take().map(|_| self.bump())
    }

    /// The job `epoch` ended at `now_ms`, well or not; `random` draws the
    /// jitter. Returns false for the answer of a job that was stopped.
    pub fn finished(&mut self, epoch: u64, ok: bool, now_ms: u64, random: u64) -> bool {
        if epoch != self.epoch || self.running.is_none() {
            return false;
        }
        let job = self.running.take();
        if ok {
            self.failures = 0;
            self.retry_at_ms = None;
            if job == Some(Job::Poll) {
                // ±10% of the interval.
                let spread = self.poll_interval_ms / 5;
                let jitter = random % (spread + 1);
                self.next_poll_ms = now_ms + self.poll_interval_ms - spread / 2 + jitter;
                // A check made while this poll ran may have come after what
                // it read: it gets a poll of its own.
                if self.asked_ms >= self.last_poll_ms {
                    self.next_poll_ms = self.next_poll_ms.min(self.checked_poll_ms(now_ms));
                }
            }
        } else {
            self.failed(now_ms, random);
            if job == Some(Job::Poll) {
                // Polled again once the wait is over.
                self.next_poll_ms = now_ms;
            }
        }
        true
    }

    /// A failure outside a job's answer (a download found stuck): the
    /// origin is left alone for the next wait.
    pub fn failed(&mut self, now_ms: u64, random: u64) {
        self.failures = self.failures.saturating_add(1);
        let cap = BACKOFF_MAX_MS.min(self.poll_interval_ms);
        self.retry_at_ms = Some(now_ms + backoff_ms(self.failures, cap, random));
    }

    /// An operator asks for a poll now (`lanup check`), from this node or
    /// another: due at once, backoff or not, or when the job under way
    /// ends; never sooner than [`CHECK_GAP_MS`] after the last poll
    /// started, so a peer that keeps asking costs the uplink at most a poll
    /// a second. A check always leads to a poll that starts after it.
    pub fn poll_now(&mut self, now_ms: u64) {
        self.asked_ms = Some(now_ms);
        self.next_poll_ms = self.checked_poll_ms(now_ms);
        self.retry_at_ms = None;
    }

    /// When a poll an operator asked for at `now_ms` may start.
    fn checked_poll_ms(&self, now_ms: u64) -> u64 {
        self.last_poll_ms
            .map_or(now_ms, |at| now_ms.max(at + CHECK_GAP_MS))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_check_always_leads_to_a_poll_after_it_and_at_most_one_a_second() {
        let mut p = OriginPlan::new(3_600_000);
        let view = acting(None);
        let Step::Start(e, Job::Poll) = p.step(0, &view) else {
            panic!("first poll at once")
        };
        assert!(p.finished(e, true, 100, 0));
        assert_eq!(p.step(200, &view), Step::Idle, "next poll in an hour");
        // A check 0.3 s after the poll started: polled again, 1 s after it.
        p.poll_now(300);
        assert_eq!(p.step(900, &view), Step::Idle);
        let Step::Start(e, Job::Poll) = p.step(1_000, &view) else {
            panic!("the check's poll")
        };
        // A check while that poll runs is answered by one after it.
        p.poll_now(1_050);
        assert!(p.finished(e, true, 1_100, 0));
        assert!(matches!(p.step(2_000, &view), Step::Start(_, Job::Poll)));
    }

    fn acting(release: Option<ReleaseView>) -> View {
        View {
            acting: true,
            release,
        }
    }

    const LACKING: ReleaseView = ReleaseView {
        lacking: true,
        heard_all: true,
        adopted_ms_ago: 0,
        blocked: false,
    };

    #[test]
    fn polls_first_then_downloads_what_the_site_lacks_once_it_heard_the_peers() {
        let mut p = OriginPlan::new(300_000);
        assert_eq!(p.step(0, &View::default()), Step::Idle, "not the fetcher");
        let Step::Start(e, Job::Poll) = p.step(0, &acting(None)) else {
            panic!("polls first");
        };
        assert_eq!(
            p.step(10, &acting(Some(LACKING))),
            Step::Idle,
            "one job at a time"
        );
        assert!(p.finished(e, true, 100, 0));
        let unheard = ReleaseView {
            heard_all: false,
            adopted_ms_ago: 500,
            ..LACKING
        };
        assert_eq!(
            p.step(200, &acting(Some(unheard))),
            Step::Idle,
            "waits for the peers' lists"
        );
        let waited = ReleaseView {
            adopted_ms_ago: HAVE_WAIT_MS,
            ..unheard
        };
        assert!(matches!(
            p.step(2100, &acting(Some(waited))),
            Step::Start(_, Job::Download)
        ));
        let mut q = OriginPlan::new(300_000);
        let Step::Start(e, _) = q.step(0, &acting(None)) else {
            panic!()
        };
        q.finished(e, true, 0, 0);
        let held = ReleaseView {
            lacking: false,
            ..LACKING
        };
        assert_eq!(
            q.step(1, &acting(Some(held))),
            Step::Idle,
            "nothing only the origin has"
        );
        let blocked = ReleaseView {
            blocked: true,
            ..LACKING
        };
        assert_eq!(q.step(1, &acting(Some(blocked))), Step::Idle, "no room");
    }

    #[test]
    fn answers_of_stopped_jobs_do_not_count() {
        let mut p = OriginPlan::new(300_000);
        let Step::Start(first, _) = p.step(0, &acting(None)) else {
            panic!()
        };
        assert_eq!(p.step(1, &View::default()), Step::Stop(first + 1));
        assert!(!p.finished(first, true, 2, 0), "the stopped poll's answer");
        let Step::Start(second, Job::Poll) = p.step(3, &acting(None)) else {
            panic!()
        };
        assert!(second > first);
        assert_eq!(p.stop(), Some(second + 1));
        assert!(!p.finished(second, false, 4, 0));
        assert_eq!(p.failures(), 0);
    }

    #[test]
    fn failures_back_off_doubling_with_jitter_capped_by_the_poll_interval() {
        let mut p = OriginPlan::new(60_000);
        let mut now = 0;
        let mut waits = Vec::new();
        for _ in 0..6 {
            let Step::Start(e, _) = p.step(now, &acting(None)) else {
                panic!("a job once the wait is over");
            };
            assert!(p.finished(e, false, now, u64::MAX / 3));
            let wait = p.retry_in_ms(now).expect("backing off");
            assert_eq!(p.step(now + wait - 1, &acting(None)), Step::Idle);
            waits.push(wait);
            now += wait;
        }
        assert!(waits.windows(2).all(|w| w[1] >= w[0] / 2), "{waits:?}");
        assert!((2_500..=5_000).contains(&waits[0]), "{waits:?}");
        assert!(waits.iter().all(|w| *w <= 60_000), "{waits:?}");
        assert!(waits[5] >= 30_000, "{waits:?}");
        // A success starts over.
        let Step::Start(e, _) = p.step(now, &acting(None)) else {
            panic!()
        };
        p.finished(e, true, now, 0);
        assert_eq!(p.failures(), 0);
        assert!(!p.backing_off(now));
        // An operator's check polls at once.
        p.failed(now, 0);
        assert!(p.backing_off(now + 1));
        p.poll_now(now + 1);
        assert!(matches!(
            p.step(now + CHECK_GAP_MS, &acting(None)),
            Step::Start(_, Job::Poll)
        ));
    }

    #[test]
    fn polls_recur_with_jitter() {
        for random in [0, 1 << 40, u64::MAX] {
            let mut p = OriginPlan::new(300_000);
            let Step::Start(e, _) = p.step(0, &acting(None)) else {
                panic!()
            };
            p.finished(e, true, 0, random);
            assert_eq!(p.step(269_999, &acting(None)), Step::Idle);
            assert!(matches!(
                p.step(330_001, &acting(None)),
                Step::Start(_, Job::Poll)
            ));
        }
    }
}
