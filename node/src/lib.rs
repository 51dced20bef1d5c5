//! lanup's node as a library. Today it holds what every later part stands
//! on: reading and checking releases ([`release`]), publisher keys on disk
//! ([`keys`]), and the embedded HTTP origin ([`origin`]). The site swarm, the
//! chunk store and the applier build on these.

pub mod app;
pub mod apply;
pub mod audit;
pub mod chunks;
pub mod config;
pub mod control;
pub mod fetch;
pub mod keys;
pub mod network;
pub mod node;
pub mod origin;
pub mod release;
pub mod store;
pub mod throttle;
