//! lanup's node as a library: reading and checking releases ([`release`]),
//! keys on disk ([`keys`]), the embedded HTTP origin ([`origin`]), the site
//! swarm ([`network`]) and the node that drives it ([`node`]), the chunk
//! store ([`store`], [`chunks`], [`fetch`]), installing releases into the
//! running application ([`apply`], [`app`]), the audit log of rollout
//! commands ([`audit`]), the CLI's control socket ([`control`]), and
//! headquarters' side of site reports ([`hq`]) with the node's ([`report`]).

pub mod app;
pub mod apply;
pub mod audit;
pub mod chunks;
pub mod config;
pub mod control;
pub mod delta;
pub mod disk;
pub mod fetch;
pub mod fetch_deltas;
pub mod fetcher;
pub mod http;
pub mod keys;
pub mod logfile;
pub mod manifest_text;
pub mod membership;
pub mod metrics;
pub mod network;
pub mod node;
pub mod origin;
mod parallel;
pub mod platform;
pub mod policy;
pub mod release;
pub mod release_store;
pub mod remembered;
pub mod report;
pub mod stage;
pub mod store;
pub mod throttle;
pub mod upgrade;
