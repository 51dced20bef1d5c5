//! A byte-rate cap shared by every transfer that draws on one link: the
//! origin's uplink (`lanup origin --rate`), a node's downloads from the origin
//! (`--wan-rate`) and its serving of chunks to peers (`--lan-rate`).

use std::num::NonZeroU32;
use std::sync::Arc;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use lanup_protocol::units::Rate;

/// An optional rate cap; cloning shares the budget. Without a rate it never
/// waits.
#[derive(Clone, Default)]
pub struct Throttle {
    limiter: Option<Arc<DefaultDirectRateLimiter>>,
    burst: u32,
}

impl std::fmt::Debug for Throttle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Throttle")
            .field("capped", &self.limiter.is_some())
            .field("burst", &self.burst)
            .finish()
    }
}

impl Throttle {
    /// A cap at `rate`, or none. The burst is 50 ms of traffic, at least
    /// 16 KiB, so a cap is smooth at the scale of a second.
    pub fn new(rate: Option<Rate>) -> Throttle {
        let Some(rate) = rate else {
            return Throttle::default();
        };
        let per_sec = u32::try_from(rate.bytes_per_sec()).unwrap_or(u32::MAX);
        let per_sec = NonZeroU32::new(per_sec).unwrap_or(NonZeroU32::MIN);
        let burst = (per_sec.get() / 20).max(16 * 1024);
        let quota = Quota::per_second(per_sec)
            .allow_burst(NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN));
        Throttle {
            limiter: Some(Arc::new(RateLimiter::direct(quota))),
            burst,
        }
    }

    /// Waits until `bytes` may pass.
    pub async fn take(&self, bytes: usize) {
        let Some(limiter) = &self.limiter else { return };
        let mut left = bytes;
        while left > 0 {
            let n = left.min(self.burst as usize);
            left -= n;
            if let Some(n) = NonZeroU32::new(n as u32) {
                // `n` never exceeds the burst, so this cannot fail.
                let _ = limiter.until_n_ready(n).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[tokio::test]
    async fn caps_the_rate_and_passes_freely_without_one() {
        let free = Throttle::new(None);
        let start = Instant::now();
        free.take(100 << 20).await;
        assert!(start.elapsed() < Duration::from_millis(50));

        // 1 MiB/s: the burst (50 ms) passes at once, the next 200 KiB take
        // about 0.2 s more.
        let capped = Throttle::new(Some("1MiB".parse().expect("rate")));
        let start = Instant::now();
        capped.take(52_428 + 200 * 1024).await;
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(180),
            "250 KiB at 1 MiB/s took {took:?}"
        );
    }
}
