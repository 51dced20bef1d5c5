//! Discrete-event simulation of lanup sites at fleet scale. It will drive the
//! transfer scheduler and fetcher election from `lanup-protocol` in simulated
//! time; until those state machines exist this crate holds nothing.
