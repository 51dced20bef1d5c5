//! Scenario files (TOML, under `simulations/scenarios/`) and the units they
//! are written in. Every key is optional; command-line flags override them.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::{Ns, SiteEvent, SiteModel};

/// A scenario as written.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScenarioFile {
    /// What the scenario shows, for the report.
    pub about: Option<String>,
    pub sites: Option<usize>,
    pub nodes_per_site: Option<usize>,
    pub size: Option<String>,
    pub uplink: Option<String>,
    /// Each node's LAN upload and download (`1gbit`, `inf`).
    pub lan: Option<String>,
    /// Upload or download alone, when they differ (they override `lan`).
    pub lan_up: Option<String>,
    pub lan_down: Option<String>,
    pub lan_jitter: Option<f64>,
    pub latency: Option<String>,
    pub wan_rtt: Option<String>,
    pub have_interval: Option<String>,
    pub stage_rate: Option<String>,
    pub shared: Option<f64>,
    /// Uplink bytes per byte of lacking chunks (patches, packed chunks).
    pub wire: Option<f64>,
    pub mdns: Option<bool>,
    pub seed: Option<u64>,
    #[serde(default)]
    pub events: Vec<EventFile>,
}

/// One `[[events]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventFile {
    /// `fetcher-dies`, `join` or `bad-peers`.
    pub kind: String,
    pub at: Option<String>,
    pub nodes: Option<usize>,
}

/// A whole run: how many sites of which kind.
#[derive(Debug, Clone)]
pub struct Fleet {
    pub about: Option<String>,
    pub sites: usize,
    pub site: SiteModel,
    pub seed: u64,
}

impl ScenarioFile {
    pub fn read(path: &Path) -> Result<ScenarioFile> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read scenario {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("scenario {}", path.display()))
    }

    /// `over`'s keys replace this file's.
    pub fn merge(self, over: ScenarioFile) -> ScenarioFile {
        ScenarioFile {
            about: over.about.or(self.about),
            sites: over.sites.or(self.sites),
            nodes_per_site: over.nodes_per_site.or(self.nodes_per_site),
            size: over.size.or(self.size),
            uplink: over.uplink.or(self.uplink),
            lan: over.lan.or(self.lan),
            lan_up: over.lan_up.or(self.lan_up),
            lan_down: over.lan_down.or(self.lan_down),
            lan_jitter: over.lan_jitter.or(self.lan_jitter),
            latency: over.latency.or(self.latency),
            wan_rtt: over.wan_rtt.or(self.wan_rtt),
            have_interval: over.have_interval.or(self.have_interval),
            stage_rate: over.stage_rate.or(self.stage_rate),
            shared: over.shared.or(self.shared),
            wire: over.wire.or(self.wire),
            mdns: over.mdns.or(self.mdns),
            seed: over.seed.or(self.seed),
            events: if over.events.is_empty() {
                self.events
            } else {
                over.events
            },
        }
    }

    /// Checks every value and builds the model.
    pub fn resolve(self) -> Result<Fleet> {
        let d = SiteModel::default();
        let nodes = self.nodes_per_site.unwrap_or(d.nodes);
        if nodes == 0 {
            bail!("nodes_per_site: at least 1");
        }
        let shared = self.shared.unwrap_or(0.0);
        if !(0.0..=1.0).contains(&shared) {
            bail!("shared {shared}: a fraction between 0 and 1");
        }
        let wire = self.wire.unwrap_or(1.0);
        if !(wire > 0.0 && wire <= 1.0) {
            bail!("wire {wire}: uplink bytes per chunk byte, more than 0 and at most 1");
        }
        let jitter = self.lan_jitter.unwrap_or(0.0);
        if !(0.0..1.0).contains(&jitter) {
            bail!("lan_jitter {jitter}: a fraction between 0 and 1 (exclusive)");
        }
        let lan = rate("lan", self.lan.as_deref(), d.lan_up)?;
        let lan_up = rate("lan_up", self.lan_up.as_deref(), lan)?;
        let lan_down = rate("lan_down", self.lan_down.as_deref(), lan)?;
        let mut events = Vec::new();
        for (i, e) in self.events.iter().enumerate() {
            let at = |what: &str| -> Result<Ns> {
                duration(&format!("events[{i}].at"), e.at.as_deref(), None)
                    .with_context(|| format!("events[{i}] ({what}) needs at = \"…\""))
            };
            events.push(match e.kind.as_str() {
                "fetcher-dies" => SiteEvent::FetcherDies {
                    at: at("fetcher-dies")?,
                },
                "join" => SiteEvent::Join {
                    at: at("join")?,
                    nodes: e.nodes.unwrap_or(1),
                },
                "bad-peers" => SiteEvent::BadPeers {
                    nodes: e.nodes.unwrap_or(1).min(nodes.saturating_sub(1)),
                },
                other => {
                    bail!("events[{i}].kind {other:?}: expected fetcher-dies, join or bad-peers")
                }
            });
        }
        let size = match &self.size {
            Some(s) => {
                lanup_protocol::units::parse_size(s).with_context(|| format!("size {s:?}"))?
            }
            None => d.size,
        };
        if size == 0 {
            bail!("size: at least 1 byte");
        }
        Ok(Fleet {
            about: self.about,
            sites: self.sites.unwrap_or(1).max(1),
            seed: self.seed.unwrap_or(1),
            site: SiteModel {
                nodes,
                size,
                uplink: rate("uplink", self.uplink.as_deref(), d.uplink)?,
                lan_up,
                lan_down,
                lan_jitter: jitter,
                latency: duration("latency", self.latency.as_deref(), Some(d.latency))?,
                wan_rtt: duration("wan_rtt", self.wan_rtt.as_deref(), Some(d.wan_rtt))?,
                have_interval: duration(
                    "have_interval",
                    self.have_interval.as_deref(),
                    Some(d.have_interval),
                )?,
                stage_rate: rate("stage_rate", self.stage_rate.as_deref(), d.stage_rate)?,
                shared,
                wire,
                mdns: self.mdns.unwrap_or(d.mdns),
                events,
            },
        })
    }
}

/// `16mbit`, `2MiB` (per second), or `inf` for no limit.
pub fn rate(key: &str, value: Option<&str>, default: f64) -> Result<f64> {
    match value {
        None => Ok(default),
        Some("inf" | "unlimited") => Ok(f64::INFINITY),
        Some(v) => {
            let r: lanup_protocol::units::Rate = v
                .parse()
                .with_context(|| format!("{key} {v:?}: a rate like 16mbit, 2MiB or inf"))?;
            if r.bytes_per_sec() == 0 {
                bail!("{key} {v:?}: must be more than 0");
            }
            Ok(r.bytes_per_sec() as f64)
        }
    }
}

/// `250ms`, `10s`, `0` (nanoseconds out).
pub fn duration(key: &str, value: Option<&str>, default: Option<Ns>) -> Result<Ns> {
    match value {
        None => default.with_context(|| format!("{key}: required")),
        Some("0") => Ok(0),
        Some(v) => {
            let d = humantime::parse_duration(v)
                .with_context(|| format!("{key} {v:?}: a duration like 250ms or 10s"))?;
            Ok(d.as_nanos() as Ns)
        }
    }
}
