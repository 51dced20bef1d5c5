//! Chunks and hashes one file exactly as `lanup publish` does (FastCDC cut
//! points, BLAKE3 per chunk and for the whole file) without writing it
//! anywhere, and prints the throughput. Used by `tests/bench/chunk_hash.sh`.
//!
//! `cargo run --release -p lanup-protocol --example digest -- FILE`

use std::fs::File;
use std::time::Instant;

use lanup_protocol::chunk::digest_reader;

fn main() -> std::io::Result<()> {
    let path = std::env::args()
        .nth(1)
        .ok_or_else(|| std::io::Error::other("usage: digest FILE"))?;
    let started = Instant::now();
    let digest = digest_reader(File::open(&path)?, |_| Ok(()))?;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{} bytes, {} chunks, {:.3} s, {:.1} MB/s, blake3 {}",
        digest.size,
        digest.chunks.len(),
        secs,
        digest.size as f64 / secs / 1e6,
        digest.hash
    );
    Ok(())
}
