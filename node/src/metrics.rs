//! The node's Prometheus endpoint (opt-in: `metrics_listen`): what it moved
//! and from where, what it served, whom it banned, how its applies ended,
//! its rollout, its releases and its peers, at `/metrics` in Prometheus'
//! text format.
//!
//! Counters are bumped where the thing happens (a chunk served, a chunk
//! from a peer, a ban, an apply ending); the gauges and the origin's byte
//! count are set from the node's state at each heartbeat.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tracing::info;

type Labels = Vec<(String, String)>;

/// Every metric of a node. Cheap to clone (each is shared).
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    /// Release bytes received from the origin.
    pub origin_bytes: Counter,
    origin_seen: Arc<AtomicU64>,
    /// Release bytes received from peers.
    pub peer_bytes: Counter,
    /// Chunks sent to peers, and their bytes.
    pub chunks_served: Counter,
    pub bytes_served: Counter,
    /// Peers banned for lying or misbehaving.
    pub bans: Counter,
    /// Applies by how they ended.
    pub applies: Family<Labels, Counter>,
    pub peers: Gauge,
    rollout: Family<Labels, Gauge>,
    releases: Family<Labels, Gauge>,
    pub reports_sent: Counter,
    reports_seen: Arc<AtomicU64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut r = Registry::with_prefix("lanup");
        let m = Metrics {
            registry: Arc::default(),
            origin_bytes: Counter::default(),
            origin_seen: Arc::default(),
            peer_bytes: Counter::default(),
            chunks_served: Counter::default(),
            bytes_served: Counter::default(),
            bans: Counter::default(),
            applies: Family::default(),
            peers: Gauge::default(),
            rollout: Family::default(),
            releases: Family::default(),
            reports_sent: Counter::default(),
            reports_seen: Arc::default(),
        };
        r.register(
            "origin_received_bytes",
            "Release bytes (chunks) received from the origin, manifests not counted",
            m.origin_bytes.clone(),
        );
        r.register(
            "peer_received_bytes",
            "Release bytes received from peers",
            m.peer_bytes.clone(),
        );
        r.register(
            "chunks_served",
            "Chunks sent to peers",
            m.chunks_served.clone(),
        );
        r.register(
            "served_bytes",
            "Chunk bytes sent to peers",
            m.bytes_served.clone(),
        );
        r.register(
            "peer_bans",
            "Peers banned for sending bad data or misbehaving",
            m.bans.clone(),
        );
        r.register(
            "applies",
            "Applies of a release by how they ended (committed, rolled-back, failed)",
            m.applies.clone(),
        );
        r.register("peers", "Peers connected now", m.peers.clone());
        r.register(
            "rollout_stage",
            "The site rollout this node follows: 1 for its stage (wave, done, halted), with its version",
            m.rollout.clone(),
        );
        r.register(
            "release",
            "Releases on this node: 1 for the installed and the staged one, with their versions",
            m.releases.clone(),
        );
        r.register(
            "reports_sent",
            "Site reports headquarters took from this node",
            m.reports_sent.clone(),
        );
        Metrics {
            registry: Arc::new(r),
            ..m
        }
    }

    /// Brings the origin byte counter up to `total` (the fetcher's count).
    pub fn origin_total(&self, total: u64) {
        catch_up(&self.origin_bytes, &self.origin_seen, total);
    }

    /// Brings the sent reports counter up to `total` (the reporter's).
    pub fn reports_total(&self, total: u64) {
        catch_up(&self.reports_sent, &self.reports_seen, total);
    }

    /// An apply ended: `ending` is committed, rolled-back or failed.
    pub fn applied(&self, ending: &str) {
        self.applies
            .get_or_create(&vec![("outcome".to_owned(), ending.to_owned())])
            .inc();
    }

    /// The rollout followed now, if any: its stage and version.
    pub fn set_rollout(&self, rollout: Option<(&str, &str)>) {
        self.rollout.clear();
        if let Some((stage, version)) = rollout {
            let stage = if stage.starts_with("wave") {
                "wave"
            } else {
                stage
            };
            self.rollout
                .get_or_create(&vec![
                    ("stage".to_owned(), stage.to_owned()),
                    ("version".to_owned(), version.to_owned()),
                ])
                .set(1);
        }
    }

    /// The installed and staged releases now.
    pub fn set_releases(&self, installed: Option<&str>, staged: Option<&str>) {
        self.releases.clear();
        for (kind, version) in [("installed", installed), ("staged", staged)] {
            if let Some(v) = version {
                self.releases
                    .get_or_create(&vec![
                        ("kind".to_owned(), kind.to_owned()),
                        ("version".to_owned(), v.to_owned()),
                    ])
                    .set(1);
            }
        }
    }

    /// The text Prometheus scrapes.
    pub fn text(&self) -> String {
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry);
        out
    }

    /// Serves `/metrics` on `listen` until the task is dropped.
    pub async fn serve(self, listen: String) -> Result<()> {
        let listener = TcpListener::bind(&listen)
            .await
            .with_context(|| format!("metrics_listen {listen}: cannot listen"))?;
        info!(addr = %listener.local_addr()?, "metrics at /metrics");
        let app = Router::new().route(
            "/metrics",
            get(move || {
                let m = self.clone();
                async move {
                    (
                        [(
                            header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        m.text(),
                    )
                        .into_response()
                }
            }),
        );
        axum::serve(listener, app)
            .await
            .context("metrics server failed")
    }
}

/// Raises `counter` by what `total` grew since `seen`. A count that dips
/// (the fetcher corrects its count when a download ends) is not counted
/// twice.
fn catch_up(counter: &Counter, seen: &AtomicU64, total: u64) {
    let before = seen.fetch_max(total, Ordering::Relaxed);
    if total > before {
        counter.inc_by(total - before);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_follow_prometheus_naming() {
        let m = Metrics::new();
        m.origin_total(1000);
        m.origin_total(1500);
        m.applied("committed");
        m.set_rollout(Some(("wave 2 of 3", "2.0")));
        m.set_releases(Some("1.0"), Some("2.0"));
        let text = m.text();
        assert!(
            text.contains("lanup_origin_received_bytes_total 1500"),
            "{text}"
        );
        assert!(
            text.contains("lanup_applies_total{outcome=\"committed\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("lanup_rollout_stage{stage=\"wave\",version=\"2.0\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("lanup_release{kind=\"staged\",version=\"2.0\"} 1"),
            "{text}"
        );
        assert!(text.trim_end().ends_with("# EOF"), "{text}");
    }
}
