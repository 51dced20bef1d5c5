//! Weekly time windows: when a node may apply (`apply_window`) and when a
//! rate holds (`wan_schedule`), in the machine's local wall-clock time.
//!
//! A window is written `Sat 22:00-Sun 04:00` (from a day and time to a day
//! and time), `Mon-Fri 08:00-18:00` (on each of those days, from one time
//! to the other), `daily 12:00-13:00`, or `Sun 22:00-02:00` (an end before
//! the start is on the next day). Times are wall-clock times, so a window
//! follows daylight saving time: the node gives its local time (its zone's
//! rules applied) and nothing here knows of zones. This module has no
//! clock: the time is always passed in.

use std::fmt;

/// Minutes in a week.
const WEEK: u32 = 7 * 24 * 60;
const DAY: u32 = 24 * 60;
const DAYS: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];

/// A moment in the week, local wall-clock time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WeekTime {
    /// 0 for Monday … 6 for Sunday.
    pub weekday: u8,
    /// Minutes since local midnight.
    pub minute: u16,
}

impl WeekTime {
    fn of_week(self) -> u32 {
        u32::from(self.weekday) * DAY + u32::from(self.minute)
    }
}

/// One window, as a span of the week: it starts at `start` (minutes since
/// Monday 00:00) and lasts `len` minutes, wrapping past Sunday.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Span {
    start: u32,
    len: u32,
}

/// A window as written, and the spans of the week it covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    text: String,
    spans: Vec<Span>,
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

fn day(word: &str) -> Option<u32> {
    DAYS.iter()
        .position(|d| d.eq_ignore_ascii_case(word))
        .map(|i| i as u32)
}

fn time(word: &str) -> Option<u32> {
    let (h, m) = word.split_once(':')?;
    let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
    // 24:00 is the end of the day.
    (h < 24 && m < 60 || h == 24 && m == 0).then_some(h * 60 + m)
}

impl Window {
    /// Reads one window; an error names the text and says what is
    /// expected.
    pub fn parse(text: &str) -> Result<Window, String> {
        let bad = |why: &str| {
            format!(
                "window {text:?}: {why}; expected e.g. \"Sat 22:00-Sun 04:00\", \"Mon-Fri 08:00-18:00\" or \"daily 12:00-13:00\""
            )
        };
        let words: Vec<&str> = text.split_whitespace().collect();
        let (days_word, rest) = match words.as_slice() {
            [d, rest @ ..] if !rest.is_empty() => (*d, rest.join(" ")),
            _ => return Err(bad("a day and a time span are needed")),
        };
        let days: Vec<u32> = if days_word.eq_ignore_ascii_case("daily") {
            (0..7).collect()
        } else if let Some((a, b)) = days_word.split_once('-') {
            let (a, b) = (
                day(a).ok_or_else(|| bad("unknown day"))?,
                day(b).ok_or_else(|| bad("unknown day"))?,
            );
            // Fri-Mon wraps over the weekend.
            (0..7)
                .map(|i| (a + i) % 7)
                .take(((b + 7 - a) % 7 + 1) as usize)
                .collect()
        } else {
            vec![day(days_word).ok_or_else(|| bad("unknown day"))?]
        };
        let (from, to) = rest
            .split_once('-')
            .ok_or_else(|| bad("no '-' between the start and the end"))?;
        let start = time(from.trim()).ok_or_else(|| bad("the start is not HH:MM"))?;
        if start == DAY {
            return Err(bad("a window cannot start at 24:00"));
        }
        let to: Vec<&str> = to.split_whitespace().collect();
        let spans = match to.as_slice() {
            // To a named day: one window from each start day (a single
            // day, as the form implies).
            [end_day, end_time] => {
                if days.len() != 1 {
                    return Err(bad("a window to a named day starts on one day"));
                }
                let end_day = day(end_day).ok_or_else(|| bad("unknown end day"))?;
                let end = time(end_time).ok_or_else(|| bad("the end is not HH:MM"))?;
                let from = days[0] * DAY + start;
                let until = end_day * DAY + end;
                let len = (until + WEEK - from) % WEEK;
                vec![Span {
                    start: from,
                    len: if len == 0 { WEEK } else { len },
                }]
            }
            [end_time] => {
                let end = time(end_time).ok_or_else(|| bad("the end is not HH:MM"))?;
                let len = if end > start {
                    end - start
                } else {
                    end + DAY - start
                };
                days.iter()
                    .map(|d| Span {
                        start: d * DAY + start,
                        len,
                    })
                    .collect()
            }
            _ => return Err(bad("the end is not HH:MM or a day and HH:MM")),
        };
        Ok(Window {
            text: text.trim().to_owned(),
            spans,
        })
    }

    /// Whether `at` falls inside the window.
    pub fn contains(&self, at: WeekTime) -> bool {
        let m = at.of_week();
        self.spans
            .iter()
            .any(|s| (m + WEEK - s.start) % WEEK < s.len)
    }

    /// Minutes from `at` until the window next opens (0 when inside).
    pub fn opens_in(&self, at: WeekTime) -> u32 {
        if self.contains(at) {
            return 0;
        }
        let m = at.of_week();
        self.spans
            .iter()
            .map(|s| (s.start + WEEK - m) % WEEK)
            .min()
            .unwrap_or(WEEK)
    }
}

/// Several windows: inside when inside any. No windows at all means
/// always.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Windows(pub Vec<Window>);

impl Windows {
    /// Reads every window; the first bad one is the error.
    pub fn parse<S: AsRef<str>>(texts: &[S]) -> Result<Windows, String> {
        texts
            .iter()
            .map(|t| Window::parse(t.as_ref()))
            .collect::<Result<Vec<_>, _>>()
            .map(Windows)
    }

    /// Whether `at` is inside (always, with no windows).
    pub fn open(&self, at: WeekTime) -> bool {
        self.0.is_empty() || self.0.iter().any(|w| w.contains(at))
    }

    /// Minutes from `at` until a window opens (0 when one is open).
    pub fn opens_in(&self, at: WeekTime) -> u32 {
        self.0.iter().map(|w| w.opens_in(at)).min().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(weekday: u8, hh: u16, mm: u16) -> WeekTime {
        WeekTime {
            weekday,
            minute: hh * 60 + mm,
        }
    }
    const MON: u8 = 0;
    const FRI: u8 = 4;
    const SAT: u8 = 5;
    const SUN: u8 = 6;

    #[test]
    fn a_weekend_night_window() -> Result<(), String> {
        let w = Window::parse("Sat 22:00-Sun 04:00")?;
        assert!(!w.contains(at(SAT, 21, 59)));
        assert!(w.contains(at(SAT, 22, 0)));
        assert!(w.contains(at(SUN, 3, 59)));
        assert!(!w.contains(at(SUN, 4, 0)));
        assert_eq!(w.opens_in(at(SAT, 21, 0)), 60);
        assert_eq!(w.opens_in(at(SUN, 4, 0)), 7 * DAY - 6 * 60);
        assert_eq!(w.opens_in(at(SAT, 23, 0)), 0);
        Ok(())
    }

    #[test]
    fn day_ranges_wrap_over_midnight_and_the_week() -> Result<(), String> {
        let w = Window::parse("Mon-Fri 08:00-18:00")?;
        assert!(w.contains(at(FRI, 12, 0)));
        assert!(!w.contains(at(SAT, 12, 0)));
        assert_eq!(w.opens_in(at(SAT, 12, 0)), DAY + 20 * 60);
        // An end before the start is the next day: Sunday night runs into
        // Monday morning, past the end of the week.
        let w = Window::parse("Sun 22:00-02:00")?;
        assert!(w.contains(at(SUN, 23, 30)));
        assert!(w.contains(at(MON, 1, 59)));
        assert!(!w.contains(at(MON, 2, 0)));
        let w = Window::parse("Fri-Mon 00:00-24:00")?;
        assert!(w.contains(at(SUN, 12, 0)) && w.contains(at(MON, 23, 59)));
        assert!(!w.contains(at(2, 12, 0)));
        let w = Window::parse("daily 12:00-13:00")?;
        assert!((0..7).all(|d| w.contains(at(d, 12, 30))));
        Ok(())
    }

    #[test]
    fn several_windows_and_none() -> Result<(), String> {
        assert!(Windows::default().open(at(MON, 3, 0)), "no window: always");
        let ws = Windows::parse(&["Sat 22:00-Sun 04:00", "Wed 01:00-02:00"])?;
        assert!(ws.open(at(2, 1, 30)));
        assert_eq!(ws.opens_in(at(2, 0, 30)), 30);
        assert_eq!(ws.opens_in(at(2, 2, 0)), 3 * DAY + 20 * 60);
        Ok(())
    }

    #[test]
    fn bad_windows_say_what_is_wrong() {
        for (text, why) in [
            ("Sat", "a day and a time span"),
            ("Sat 22:00", "no '-'"),
            ("Sot 22:00-23:00", "unknown day"),
            ("Sat 25:00-23:00", "start is not HH:MM"),
            ("Sat 22:00-Sun 4", "end is not HH:MM"),
            ("Mon-Fri 22:00-Sat 04:00", "starts on one day"),
            ("Mon 24:00-01:00", "cannot start at 24:00"),
        ] {
            let err = Window::parse(text).expect_err(text);
            assert!(err.contains(why) && err.contains(text), "{text}: {err}");
        }
    }
}
