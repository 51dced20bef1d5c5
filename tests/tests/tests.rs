//! Workspace-level tests: the `lanup` binary run as separate processes
//! against real files and a real HTTP origin.

mod announce;
mod apply;
mod bad_input;
mod change;
mod common;
mod crash;
mod deltas;
mod demo;
mod diskfull;
mod faults;
mod fleet;
mod lan;
mod launchers;
mod membership;
mod metrics;
mod origin;
mod package;
mod parts;
mod publish;
mod rollout;
mod service;
mod setup;
mod small_files;
mod swarm;
mod testbed;
mod tls;
mod unattended;
mod upgrade;
mod windows;
