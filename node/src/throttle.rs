//! A byte-rate cap shared by every transfer that draws on one link: the
//! origin's uplink (`lanup origin --rate`), a node's downloads from the origin
//! (`--wan-rate`, varied by time of day with `wan_schedule`) and its serving
//! of chunks to peers (`--lan-rate`).

use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use lanup_protocol::units::Rate;
use lanup_protocol::window::{WeekTime, Window};

/// An optional rate cap; cloning shares the budget. Without a rate it never
/// waits.
#[derive(Clone, Default)]
pub struct Throttle {
    limiter: Option<Arc<DefaultDirectRateLimiter>>,
    burst: u32,
    /// Other caps by time of day (local time): the first whose window
    /// holds applies; outside them all, this one.
    schedule: Option<Arc<Schedule>>,
}

struct Schedule {
    entries: Vec<(Window, Throttle)>,
    /// The entry chosen (index + 1; 0 for the base) and when, so the clock
    /// is read at most once a second.
    chosen: Mutex<Option<(Instant, usize)>>,
}

/// How often a scheduled throttle looks at the clock again.
const RECHOOSE: Duration = Duration::from_secs(1);

impl std::fmt::Debug for Throttle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Throttle")
            .field("capped", &self.limiter.is_some())
            .field("burst", &self.burst)
            .field(
                "scheduled",
                &self.schedule.as_ref().map_or(0, |s| s.entries.len()),
            )
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
            schedule: None,
        }
    }

    /// A cap at `base`, replaced by each `schedule` entry's rate while its
    /// window (local time) holds: `wan_schedule`.
    pub fn scheduled(base: Option<Rate>, schedule: &[(Window, Rate)]) -> Throttle {
        let mut throttle = Throttle::new(base);
        if !schedule.is_empty() {
            throttle.schedule = Some(Arc::new(Schedule {
                entries: schedule
                    .iter()
                    .map(|(w, r)| (w.clone(), Throttle::new(Some(*r))))
                    .collect(),
                chosen: Mutex::new(None),
            }));
        }
        throttle
    }

    /// Which cap holds at `at`: 0 for the base, else the schedule entry's
    /// index + 1.
    fn choose(&self, at: WeekTime) -> usize {
        self.schedule.as_ref().map_or(0, |s| {
            s.entries
                .iter()
                .position(|(w, _)| w.contains(at))
                .map_or(0, |i| i + 1)
        })
    }

    fn current(&self) -> &Throttle {
        let Some(s) = &self.schedule else { return self };
        let mut chosen = s.chosen.lock().unwrap_or_else(|e| e.into_inner());
        let index = match *chosen {
            Some((at, i)) if at.elapsed() < RECHOOSE => i,
            _ => {
                let now = crate::node::now_unix_ms();
                let i = self.choose(crate::policy::week_time(&crate::policy::zone(), now));
                *chosen = Some((Instant::now(), i));
                i
            }
        };
        match index {
            0 => self,
            i => &s.entries[i - 1].1,
        }
    }

    /// Waits until `bytes` may pass.
    pub async fn take(&self, bytes: usize) {
        let cap = self.current();
        let Some(limiter) = &cap.limiter else { return };
        let mut left = bytes;
        while left > 0 {
            let n = left.min(cap.burst as usize);
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

    #[test]
    fn a_schedule_picks_the_first_window_that_holds_else_the_base() {
        let day = Window::parse("Mon-Fri 08:00-18:00").expect("window");
        let lunch = Window::parse("daily 12:00-13:00").expect("window");
        let t = Throttle::scheduled(
            None,
            &[
                (day, "256kbit".parse().expect("rate")),
                (lunch, "1mbit".parse().expect("rate")),
            ],
        );
        let at = |weekday: u8, hour: u16| WeekTime {
            weekday,
            minute: hour * 60,
        };
        assert_eq!(t.choose(at(0, 9)), 1, "Monday 09:00: business hours");
        assert_eq!(t.choose(at(0, 12)), 1, "the first that holds wins");
        assert_eq!(t.choose(at(5, 12)), 2, "Saturday lunch");
        assert_eq!(t.choose(at(5, 20)), 0, "Saturday evening: wan_rate");
    }

    #[tokio::test]
    async fn a_scheduled_rate_that_holds_now_caps_the_download() {
        // A window that always holds: its 1 MiB/s caps an uncapped link.
        let always = Window::parse("daily 00:00-24:00").expect("window");
        let t = Throttle::scheduled(None, &[(always, "1MiB".parse().expect("rate"))]);
        let start = Instant::now();
        t.take(52_428 + 200 * 1024).await;
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(180),
            "250 KiB under a 1 MiB/s schedule took {took:?}"
        );
    }
}
