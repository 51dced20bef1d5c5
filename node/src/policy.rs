//! A site's change policy as one node holds it: how many admins must sign
//! a change, the node's redundancy group, when it may apply, and what the
//! uplink may carry at which hours. Read from the config; the rules
//! themselves are in `lanup_protocol::{approval, group, window}`.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use lanup_protocol::group::Member;
use lanup_protocol::units::Rate;
use lanup_protocol::window::{WeekTime, Window, Windows};
use serde::Deserialize;

/// One `wan_schedule` entry as written.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ScheduleFile {
    pub hours: String,
    pub rate: String,
}

/// What the config says about changes, as written.
#[derive(Debug, Clone, Default)]
pub struct PolicyFile {
    pub admin_threshold: Option<usize>,
    pub abort_threshold: Option<usize>,
    pub group: Option<String>,
    pub role: Option<String>,
    pub priority: Option<i32>,
    pub switchover_command: Option<Vec<String>>,
    pub switchover_timeout: Option<String>,
    pub apply_window: Option<Vec<String>>,
    pub wan_schedule: Option<Vec<ScheduleFile>>,
}

/// The change policy a node runs with.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Distinct trusted admin keys a rollout or rollback needs (1: the
    /// requester alone).
    pub admin_threshold: usize,
    /// The same for an abort: by default one key may always stop a
    /// rollout.
    pub abort_threshold: usize,
    /// This node's redundancy group, if it is in one.
    pub member: Option<Member>,
    /// Run before this node (an active member) stops its application, so
    /// the standby can take over; its failure halts the group.
    pub switchover_command: Option<Vec<String>>,
    pub switchover_timeout: Duration,
    /// When this node may apply (empty: always).
    pub apply_window: Windows,
    /// The uplink's rate by time of day; outside every entry, `wan_rate`.
    pub wan_schedule: Vec<(Window, Rate)>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            admin_threshold: 1,
            abort_threshold: 1,
            member: None,
            switchover_command: None,
            switchover_timeout: Duration::from_secs(60),
            apply_window: Windows::default(),
            wan_schedule: Vec::new(),
        }
    }
}

impl Policy {
    /// Checks the written policy against the number of trusted admin keys:
    /// a threshold no set of them can reach would stop every change.
    pub fn resolve(p: PolicyFile, admins: usize) -> Result<Policy> {
        let threshold = |key: &str, v: Option<usize>| -> Result<usize> {
            match v {
                None => Ok(1),
                Some(0) => bail!("{key} = 0: at least one admin must sign a change"),
                Some(n) if n > admins.max(1) => bail!(
                    "{key} = {n}: only {admins} trusted admin key(s) (trust_admin); no change could ever start"
                ),
                Some(n) => Ok(n),
            }
        };
        let admin_threshold = threshold("admin_threshold", p.admin_threshold)?;
        let abort_threshold = threshold("abort_threshold", p.abort_threshold)?;
        if let Some(role) = p.role.as_deref() {
            if !matches!(role, "standby" | "active") {
                bail!("role {role:?}: expected \"standby\" or \"active\"");
            }
        }
        let member = match p.group {
            Some(group) => {
                if group.is_empty()
                    || !group
                        .chars()
                        .all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch))
                {
                    bail!("group {group:?}: use letters, digits, '-', '_' or '.'");
                }
                Some(Member {
                    group,
                    role: p.role,
                    priority: p.priority.unwrap_or(0),
                })
            }
            None if p.role.is_some() || p.priority.is_some() => {
                bail!("role and priority place a node within its group: set group too")
            }
            None if p.switchover_command.is_some() => {
                bail!("switchover_command runs before a group's active member stops: set group too")
            }
            None => None,
        };
        if let Some(c) = &p.switchover_command {
            if c.first().is_none_or(|p| p.is_empty()) {
                bail!("switchover_command: expected a program and its arguments");
            }
        }
        let switchover_timeout = match p.switchover_timeout {
            None => Duration::from_secs(60),
            Some(v) => humantime::parse_duration(&v).with_context(|| {
                format!("switchover_timeout {v:?}: expected a duration like 30s")
            })?,
        };
        let apply_window = Windows::parse(&p.apply_window.unwrap_or_default())
            .map_err(|e| anyhow::anyhow!("apply_window: {e}"))?;
        let wan_schedule = p
            .wan_schedule
            .unwrap_or_default()
            .into_iter()
            .map(|s| {
                let window = Window::parse(&s.hours)
                    .map_err(|e| anyhow::anyhow!("wan_schedule hours: {e}"))?;
                let rate = s
                    .rate
                    .parse::<Rate>()
                    .with_context(|| format!("wan_schedule rate {:?}", s.rate))?;
                Ok((window, rate))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Policy {
            admin_threshold,
            abort_threshold,
            member,
            switchover_command: p.switchover_command,
            switchover_timeout,
            apply_window,
            wan_schedule,
        })
    }

    /// The uplink's rate at `at`: the first schedule entry that holds, else
    /// `base` (`wan_rate`).
    pub fn wan_rate_at(&self, at: WeekTime, base: Option<Rate>) -> Option<Rate> {
        self.wan_schedule
            .iter()
            .find(|(w, _)| w.contains(at))
            .map(|(_, r)| *r)
            .or(base)
    }
}

/// This machine's zone: `TZ`, else `/etc/localtime` (UTC when neither
/// can be read).
pub fn zone() -> jiff::tz::TimeZone {
    jiff::tz::TimeZone::system()
}

/// Wall-clock time in `tz` at `unix_ms`, its daylight saving rules
/// applied.
pub fn local(tz: &jiff::tz::TimeZone, unix_ms: u64) -> jiff::ZonedDateTime {
    let at = jiff::Timestamp::from_millisecond(i64::try_from(unix_ms).unwrap_or(i64::MAX))
        .unwrap_or(jiff::Timestamp::UNIX_EPOCH);
    at.to_zoned_datetime(tz.clone())
}

/// The moment in the local week at `unix_ms`.
pub fn week_time(tz: &jiff::tz::TimeZone, unix_ms: u64) -> WeekTime {
    let z = local(tz, unix_ms);
    WeekTime {
        weekday: z.weekday().to_monday_zero_offset() as u8,
        minute: z.hour() as u16 * 60 + z.minute() as u16,
    }
}

/// When `windows` next open, seen at `unix_ms` in zone `tz`: `None` when
/// one is open now, else the moment (Unix ms) and its local time as text
/// (`Sat 22:00 +01:00`). The wait is counted on the wall clock, then that
/// wall-clock time is placed in the zone, so a DST change on the way moves
/// the real moment by its hour (a time the change skips counts as the one
/// after it).
pub fn next_opening(
    windows: &Windows,
    tz: &jiff::tz::TimeZone,
    unix_ms: u64,
) -> Option<(u64, String)> {
    let minutes = windows.opens_in(week_time(tz, unix_ms));
    if minutes == 0 {
        return None;
    }
    let wall = local(tz, unix_ms).datetime();
    let minute = wall.with().second(0).subsec_nanosecond(0).build().ok()?;
    let opens = minute
        .checked_add(jiff::Span::new().minutes(i64::from(minutes)))
        .ok()?
        .to_zoned_datetime(tz.clone())
        .ok()?;
    let at = u64::try_from(opens.timestamp().as_millisecond()).ok()?;
    Some((at, opens.strftime("%a %H:%M %:z").to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_roles_and_windows_are_checked_and_named() {
        let bad = |p: PolicyFile, admins: usize, expect: &str| {
            let e = Policy::resolve(p, admins).expect_err(expect);
            assert!(format!("{e:#}").contains(expect), "{e:#}");
        };
        bad(
            PolicyFile {
                admin_threshold: Some(3),
                ..PolicyFile::default()
            },
            2,
            "admin_threshold = 3",
        );
        bad(
            PolicyFile {
                admin_threshold: Some(0),
                ..PolicyFile::default()
            },
            2,
            "at least one",
        );
        bad(
            PolicyFile {
                group: Some("l".into()),
                role: Some("primary".into()),
                ..PolicyFile::default()
            },
            1,
            "role \"primary\"",
        );
        bad(
            PolicyFile {
                role: Some("standby".into()),
                ..PolicyFile::default()
            },
            1,
            "set group",
        );
        bad(
            PolicyFile {
                apply_window: Some(vec!["Sat 25:00-Sun 04:00".into()]),
                ..PolicyFile::default()
            },
            1,
            "apply_window",
        );
        bad(
            PolicyFile {
                wan_schedule: Some(vec![ScheduleFile {
                    hours: "Mon-Fri 08:00-18:00".into(),
                    rate: "fast".into(),
                }]),
                ..PolicyFile::default()
            },
            1,
            "wan_schedule rate \"fast\"",
        );
    }

    #[test]
    fn a_valid_policy_names_its_thresholds_and_its_uplink_hours() {
        let p = Policy::resolve(
            PolicyFile {
                admin_threshold: Some(2),
                group: Some("line-3".into()),
                role: Some("standby".into()),
                wan_schedule: Some(vec![ScheduleFile {
                    hours: "Mon-Fri 08:00-18:00".into(),
                    rate: "256kbit".into(),
                }]),
                ..PolicyFile::default()
            },
            2,
        )
        .expect("resolves");
        assert_eq!((p.admin_threshold, p.abort_threshold), (2, 1));
        let monday_noon = WeekTime {
            weekday: 0,
            minute: 12 * 60,
        };
        let sunday = WeekTime {
            weekday: 6,
            minute: 12 * 60,
        };
        assert_eq!(
            p.wan_rate_at(monday_noon, None).map(Rate::bytes_per_sec),
            Some(32_000)
        );
        assert_eq!(p.wan_rate_at(sunday, None), None);
    }

    fn ms(text: &str) -> u64 {
        let t: jiff::Timestamp = text.parse().expect("a timestamp");
        t.as_millisecond() as u64
    }

    #[test]
    fn a_window_opens_at_its_wall_clock_time_across_daylight_saving() {
        let berlin = jiff::tz::TimeZone::get("Europe/Berlin").expect("tzdata");
        let windows = Windows::parse(&["Sun 03:30-05:00"]).expect("window");
        // Sat 28 March 2026, 12:00 CET; clocks go 02:00 -> 03:00 on Sunday
        // 29 March. The window opens at 03:30 CEST = 01:30 UTC: 15.5 h of
        // wall clock but 14.5 h of real time later.
        let (at, text) =
            next_opening(&windows, &berlin, ms("2026-03-28T11:00:00Z")).expect("closed");
        assert_eq!(at, ms("2026-03-29T01:30:00Z"));
        assert_eq!(text, "Sun 03:30 +02:00");
        assert!(windows.open(week_time(&berlin, at)));
        assert!(!windows.open(week_time(&berlin, at - 60_000)));
        // In October the hour comes back: 03:30 CET = 02:30 UTC.
        let (at, text) =
            next_opening(&windows, &berlin, ms("2026-10-24T10:00:00Z")).expect("closed");
        assert_eq!(at, ms("2026-10-25T02:30:00Z"));
        assert_eq!(text, "Sun 03:30 +01:00");
        // A window that opens in the hour the change skips opens when the
        // clocks have jumped: 02:30 does not exist on 29 March.
        let gap = Windows::parse(&["Sun 02:30-04:00"]).expect("window");
        let (at, text) = next_opening(&gap, &berlin, ms("2026-03-28T11:00:00Z")).expect("closed");
        assert_eq!(
            (at, text.as_str()),
            (ms("2026-03-29T01:30:00Z"), "Sun 03:30 +02:00")
        );
        // Inside: nothing to wait for.
        assert_eq!(
            next_opening(&windows, &berlin, ms("2026-10-25T03:00:00Z")),
            None
        );
    }
}
