//! The node's side of site reports: the site's fetcher posts a signed
//! report of the site to headquarters (`report_to`) when what it says
//! changes, and at least hourly.
//!
//! Reports go out from their own task with their own HTTP client, so a
//! report that hangs or fails never holds up the node or a transfer. Each
//! is sent a few seconds after the change it tells of (spread per node, so
//! the sites of a fleet that change together do not post in one second), is
//! signed afresh at each attempt, and a failed one is tried again with a
//! growing pause; only the newest report is ever kept, so nothing queues
//! while headquarters is away.

use std::time::Duration;

use lanup_protocol::report::{self, Report};
use lanup_protocol::sign::SecretKey;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// Longest pause between a change and its report.
const CHANGE_DELAY: Duration = Duration::from_secs(5);
/// How long one attempt may take: a minute, plus the time its bytes take
/// at 64 bit/s (a 64 kbit/s uplink a thousand times slower), so a report
/// gets through a crawling link rather than timing out every time.
fn attempt_timeout(bytes: u64) -> Duration {
    Duration::from_secs(60 + bytes / 8)
}
/// Pauses after failures: 10 s, doubling, at most 15 minutes.
const RETRY_FIRST: Duration = Duration::from_secs(10);
const RETRY_MAX: Duration = Duration::from_secs(15 * 60);

/// The node's handle: what the site would report now, or nothing when it
/// is not this node's job (it is not the site's fetcher).
pub struct Reporter {
    tx: watch::Sender<Option<Report>>,
    said: watch::Receiver<Said>,
}

/// How the last attempt went, for `lanup status`.
#[derive(Debug, Clone, Default)]
pub struct Said {
    pub sent_ms: Option<u64>,
    pub reports_sent: u64,
    pub bytes_sent: u64,
    pub last_error: Option<String>,
}

impl Reporter {
    /// Hands over what the site would report now. The send time is the
    /// reporter's to set.
    pub fn update(&self, report: Option<Report>) {
        self.tx.send_if_modified(|current| {
            let changed = match (&*current, &report) {
                (Some(a), Some(b)) => !a.same_news(b),
                (None, None) => false,
                _ => true,
            };
            if changed {
                *current = report;
            }
            changed
        });
    }

    /// How sending has gone so far.
    pub fn said(&self) -> Said {
        self.said.borrow().clone()
    }
}

/// The report path under a base URL, unless the URL names it already.
pub fn report_url(base: &str) -> String {
    if base
        .trim_end_matches('/')
        .ends_with(lanup_protocol::report::REPORT_PATH)
    {
        return base.to_owned();
    }
    format!(
        "{}/{}",
        base.trim_end_matches('/'),
        lanup_protocol::report::REPORT_PATH.trim_start_matches('/')
    )
}

/// A reporter posting to `url` at least every `refresh`, signing with
/// `key`, and its task.
pub fn start(
    url: String,
    refresh: Duration,
    key: SecretKey,
    membership: Option<lanup_protocol::membership::Certificate>,
) -> (Reporter, impl std::future::Future<Output = ()>) {
    let (tx, rx) = watch::channel(None);
    let (said_tx, said) = watch::channel(Said::default());
    (
        Reporter { tx, said },
        run(url, refresh, (key, membership), rx, said_tx),
    )
}

/// A pause in `0..max`, spread by the node's key and `n`: different
/// nodes (sites) pick different pauses, one node different ones each time.
fn spread(key: &SecretKey, n: u64, max: Duration) -> Duration {
    let mut h = blake3::Hasher::new();
    h.update(&key.public().to_bytes());
    h.update(&n.to_le_bytes());
    let bytes = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&bytes.as_bytes()[..8]);
    let max_ms = max.as_millis().max(1) as u64;
    Duration::from_millis(u64::from_le_bytes(first) % max_ms)
}

async fn run(
    url: String,
    refresh: Duration,
    (key, membership): (SecretKey, Option<lanup_protocol::membership::Certificate>),
    mut rx: watch::Receiver<Option<Report>>,
    said: watch::Sender<Said>,
) {
    let client = match crate::http::builder()
        .and_then(|b| Ok(b.connect_timeout(Duration::from_secs(30)).build()?))
    {
        Ok(c) => c,
        Err(e) => {
            warn!(error = %e, "site reports are off: no HTTP client");
            return std::future::pending().await;
        }
    };
    let mut plan = Plan::default();
    loop {
        let current = rx.borrow_and_update().clone();
        plan.look(current.as_ref(), &key);
        let wait = plan.due;
        let sleep = async move {
            match wait {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            changed = rx.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            () = sleep => {
                let Some(mut r) = current else { continue };
                r.sent_at_ms = crate::node::now_unix_ms();
                let mut signed = report::sign(&r, &key);
                // The node's membership goes with it: headquarters that
                // trusts admin keys counts only members' reports.
                signed.membership = membership.clone();
                let Ok(body) = serde_json::to_vec(&signed) else { continue };
                let size = body.len() as u64;
                let outcome = post(&client, &url, body).await;
                plan.n += 1;
                match outcome {
                    Ok(()) => {
                        plan.sent(&url, r.clone(), size, &key, refresh);
                        said.send_modify(|s| {
                            s.sent_ms = Some(r.sent_at_ms);
                            s.reports_sent += 1;
                            s.bytes_sent += size;
                            s.last_error = None;
                        });
                    }
                    Err(e) => {
                        plan.failed(&e, &key);
                        said.send_modify(|s| s.last_error = Some(e));
                    }
                }
            }
        }
    }
}

/// When the reporter sends next.
#[derive(Default)]
struct Plan {
    /// The report last taken by headquarters, and when the next is due
    /// without news.
    sent: Option<(Report, Instant)>,
    /// When the next attempt is due.
    due: Option<Instant>,
    /// Whether it is for news (a change, or a retry) rather than the
    /// periodic refresh.
    for_news: bool,
    failures: u32,
    /// Attempts so far: each spreads its wait differently.
    n: u64,
}

impl Plan {
    /// Looks at the node's report as it is now: news is sent soon.
    fn look(&mut self, current: Option<&Report>, key: &SecretKey) {
        let Some(r) = current else {
            self.due = None;
            self.for_news = false;
            return;
        };
        let news = self.sent.as_ref().is_none_or(|(s, _)| !s.same_news(r));
        if news && !self.for_news {
            // Sooner than the refresh that may be due.
            self.n += 1;
            let at = Instant::now() + spread(key, self.n, CHANGE_DELAY);
            self.due = Some(self.due.map_or(at, |d| d.min(at)));
            self.for_news = true;
        } else if !news && self.for_news && self.failures == 0 {
            // The change was undone before it was told.
            self.for_news = false;
            self.due = None;
        }
        if self.due.is_none() {
            self.due = self.sent.as_ref().map(|(_, refresh_at)| *refresh_at);
        }
    }

    /// Headquarters took `r`: the next is due at the refresh.
    fn sent(&mut self, url: &str, r: Report, size: u64, key: &SecretKey, refresh: Duration) {
        if self.failures > 0 {
            info!(%url, after = self.failures, "site report sent again after failures");
        } else {
            debug!(%url, bytes = size, "site report sent");
        }
        self.failures = 0;
        let next = refresh - spread(key, self.n, refresh / 10);
        self.sent = Some((r, Instant::now() + next));
        self.due = None;
        self.for_news = false;
    }

    /// Sending failed: tried again after a pause that doubles.
    fn failed(&mut self, e: &str, key: &SecretKey) {
        self.failures += 1;
        let pause = RETRY_FIRST
            .saturating_mul(1 << (self.failures - 1).min(10))
            .min(RETRY_MAX);
        let pause = pause + spread(key, self.n, pause / 4);
        if self.failures == 1 {
            warn!(error = %e, retry_in = ?pause, "cannot send the site report; trying again");
        } else {
            debug!(error = %e, failures = self.failures, retry_in = ?pause, "site report still not sent");
        }
        self.due = Some(Instant::now() + pause);
        self.for_news = true;
    }
}

/// POSTs a signed report to headquarters; why it was not taken.
async fn post(client: &reqwest::Client, url: &str, body: Vec<u8>) -> Result<(), String> {
    let size = body.len() as u64;
    let sent = client
        .post(url)
        .timeout(attempt_timeout(size))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await;
    match sent {
        Ok(resp) if resp.status().is_success() => Ok(()),
        Ok(resp) => {
            let status = resp.status();
            let text = resp.text().await.unwrap_or_default();
            Err(format!("{url} answered {status}: {}", text.trim()))
        }
        Err(e) => Err(match crate::http::explain(&e) {
            Some(why) => format!("{url}: {why} ({e})"),
            None => format!("{url}: {e}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lanup_protocol::report::NodeState;
    use std::sync::{Arc, Mutex};

    fn site(state: &str) -> Report {
        Report {
            site: "s".into(),
            sender: "x".into(),
            sent_at_ms: 0,
            nodes: vec![NodeState {
                id: "x".into(),
                lanup: None,
                installed: None,
                staged: None,
                state: state.into(),
                error: None,
                failed: None,
            }],
            rollout: None,
        }
    }

    /// Every change is told within the change delay, whether or not the
    /// hourly refresh is already scheduled; an unchanged site is not told
    /// again before the refresh.
    #[tokio::test]
    async fn each_change_is_reported_within_seconds_and_nothing_else() -> anyhow::Result<()> {
        let posts: Arc<Mutex<Vec<Report>>> = Arc::default();
        let kept = posts.clone();
        let app = axum::Router::new().route(
            lanup_protocol::report::REPORT_PATH,
            axum::routing::post(move |body: axum::body::Bytes| {
                let kept = kept.clone();
                async move {
                    if let Ok(signed) = serde_json::from_slice::<report::SignedReport>(&body) {
                        if let Ok(r) = serde_json::from_str::<Report>(&signed.report) {
                            kept.lock().expect("lock").push(r);
                        }
                    }
                    "taken"
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = report_url(&format!("http://{}/", listener.local_addr()?));
        tokio::spawn(async move { axum::serve(listener, app).await });
        let (reporter, task) = start(url, Duration::from_secs(3600), SecretKey::generate(), None);
        tokio::spawn(task);
        let told = |n: usize| {
            let posts = posts.clone();
            async move {
                let deadline = Instant::now() + CHANGE_DELAY + Duration::from_secs(3);
                while posts.lock().expect("lock").len() < n && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                posts.lock().expect("lock").clone()
            }
        };
        reporter.update(Some(site("fetching")));
        assert_eq!(told(1).await.len(), 1);
        reporter.update(Some(site("staged")));
        let got = told(2).await;
        assert_eq!(got.len(), 2, "the change was not told: {got:?}");
        assert_eq!(got[1].nodes[0].state, "staged");
        reporter.update(Some(site("staged")));
        tokio::time::sleep(CHANGE_DELAY + Duration::from_secs(1)).await;
        assert_eq!(posts.lock().expect("lock").len(), 2, "told twice");
        Ok(())
    }

    #[test]
    fn an_attempt_lasts_as_long_as_a_crawling_link_needs() {
        assert_eq!(attempt_timeout(0), Duration::from_secs(60));
        // A 2.5 KB report at 64 bit/s.
        assert_eq!(attempt_timeout(2_560), Duration::from_secs(60 + 320));
    }

    #[test]
    fn report_urls_and_spread() {
        assert_eq!(
            report_url("http://hq:8080/"),
            "http://hq:8080/_lanup/report"
        );
        assert_eq!(
            report_url("http://hq:8080/_lanup/report"),
            "http://hq:8080/_lanup/report"
        );
        let a = SecretKey::generate();
        let b = SecretKey::generate();
        let max = Duration::from_secs(5);
        let pauses: Vec<Duration> = (0..50).map(|n| spread(&a, n, max)).collect();
        assert!(pauses.iter().all(|p| *p < max));
        assert!(pauses.windows(2).any(|w| w[0] != w[1]));
        assert_ne!(spread(&a, 1, max), spread(&b, 1, max));
    }
}
