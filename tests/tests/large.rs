//! The large-site tests, in a test binary of their own: cargo runs test
//! binaries one after another, so a site of 48 nodes never shares the
//! machine with another site test (its idle CPU is measured, and a machine
//! starved by other tests would make every node late).

#[allow(dead_code)]
mod common;
mod large_site;
