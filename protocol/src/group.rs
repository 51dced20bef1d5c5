//! Redundancy groups: machines that run in pairs (a hot standby next to
//! the active one) are never down together during a rollout.
//!
//! A node may name its group and role (`group = "line-3"`,
//! `role = "standby"` or `"active"`, or a priority: lower goes first).
//! Within a group, members go one at a time in their order (standbys, then
//! actives, each by priority, then by name): a member applies only when no
//! other member of its group is applying and every member before it runs
//! the new release. Waves are rearranged so that a member never sits in an
//! earlier wave than a member that goes before it. This module decides; the
//! node acts.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A node's place in its group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub group: String,
    /// `standby`, `active`, or none (priority alone).
    #[serde(default)]
    pub role: Option<String>,
    /// Lower goes first (after the role: standbys before actives).
    #[serde(default)]
    pub priority: i32,
}

impl Member {
    fn rank(&self, node: &str) -> (u8, i32, String) {
        let role = match self.role.as_deref() {
            Some("standby") => 0,
            Some("active") => 2,
            _ => 1,
        };
        (role, self.priority, node.to_owned())
    }
}

/// What a node's peers say of it for the gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemberState {
    /// Applying the release now.
    pub applying: bool,
    /// Runs the release (committed, healthy).
    pub installed: bool,
}

/// Whether `node` may apply now, given its group's members and their
/// states; `Err` says what it waits for.
pub fn gate(
    node: &str,
    members: &BTreeMap<String, Member>,
    states: &BTreeMap<String, MemberState>,
) -> Result<(), String> {
    let Some(me) = members.get(node) else {
        return Ok(());
    };
    let mine = me.rank(node);
    for (other, m) in members {
        if other == node || m.group != me.group {
            continue;
        }
        let s = states.get(other).copied().unwrap_or_default();
        if s.applying {
            return Err(format!(
                "{other} of group {} is applying; one member at a time",
                me.group
            ));
        }
        if m.rank(other) < mine && !s.installed {
            return Err(format!(
                "waiting for {other} ({}) of group {} to run the new release first",
                m.role.as_deref().unwrap_or("earlier"),
                me.group
            ));
        }
    }
    Ok(())
}

/// Rearranges `waves` so that, within every group, a member is never in an
/// earlier wave than a member that goes before it: the group's members keep
/// the wave places they were drawn, handed out in the group's order. Wave
/// sizes do not change.
pub fn order_waves(waves: &[Vec<String>], members: &BTreeMap<String, Member>) -> Vec<Vec<String>> {
    let mut out = waves.to_vec();
    let mut groups: BTreeMap<&str, Vec<&String>> = BTreeMap::new();
    for (node, m) in members {
        groups.entry(m.group.as_str()).or_default().push(node);
    }
    for (_, mut nodes) in groups {
        nodes.sort_by_key(|n| members[n.as_str()].rank(n));
        // The places (wave, index) the group's members hold, earliest first.
        let mut places: Vec<(usize, usize)> = out
            .iter()
            .enumerate()
            .flat_map(|(w, wave)| {
                wave.iter()
                    .enumerate()
                    .filter(|(_, n)| nodes.contains(n))
                    .map(move |(i, _)| (w, i))
            })
            .collect();
        places.sort_unstable();
        // Members not in any wave (not named by the command) stay out.
        let placed: Vec<String> = nodes
            .iter()
            .filter(|n| out.iter().flatten().any(|m| m == **n))
            .map(|n| (*n).clone())
            .collect();
        for ((w, i), node) in places.into_iter().zip(placed) {
            out[w][i] = node;
        }
    }
    out
}

/// The earliest wave `node` must apply in: its own, or an earlier one
/// where a member of its group that goes after it sits. Waves drawn
/// without knowing the groups (the issuing node had not heard a member)
/// could put an active in wave 1 and its standby in wave 2; the active
/// would wait for the standby and the standby for wave 1. Pulling the
/// standby forward to its successor's wave undoes that.
pub fn due_wave(
    node: &str,
    own_wave: usize,
    waves: &[Vec<String>],
    members: &BTreeMap<String, Member>,
) -> usize {
    let Some(me) = members.get(node) else {
        return own_wave;
    };
    let mine = me.rank(node);
    waves
        .iter()
        .enumerate()
        .filter(|(_, wave)| {
            wave.iter().any(|other| {
                members
                    .get(other)
                    .is_some_and(|m| m.group == me.group && m.rank(other) > mine)
            })
        })
        .map(|(w, _)| w)
        .chain(std::iter::once(own_wave))
        .min()
        .unwrap_or(own_wave)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_standby_drawn_after_its_active_is_due_with_it() {
        let members = line3();
        let waves = vec![
            vec!["a1".to_owned()],
            vec!["s1".to_owned(), "s2".to_owned(), "a2".to_owned()],
        ];
        // s1 sits in wave 2 but its active a1 in wave 1: s1 is due in wave 1.
        assert_eq!(due_wave("s1", 1, &waves, &members), 0);
        // a1 keeps its own; s2 and a2 are in order already.
        assert_eq!(due_wave("a1", 0, &waves, &members), 0);
        assert_eq!(due_wave("s2", 1, &waves, &members), 1);
        assert_eq!(due_wave("lone", 1, &waves, &members), 1);
    }

    fn member(group: &str, role: &str) -> Member {
        Member {
            group: group.into(),
            role: Some(role.into()),
            priority: 0,
        }
    }

    fn line3() -> BTreeMap<String, Member> {
        [
            ("a1".to_owned(), member("line-3", "active")),
            ("s1".to_owned(), member("line-3", "standby")),
            ("a2".to_owned(), member("line-4", "active")),
            ("s2".to_owned(), member("line-4", "standby")),
        ]
        .into()
    }

    #[test]
    fn the_standby_goes_first_and_one_member_at_a_time() {
        let members = line3();
        let mut states = BTreeMap::new();
        // The active waits for its standby to run the new release.
        let why = gate("a1", &members, &states).expect_err("active waits");
        assert!(why.contains("s1") && why.contains("standby"), "{why}");
        assert!(gate("s1", &members, &states).is_ok());
        // The standby applying: its active still waits.
        states.insert(
            "s1".to_owned(),
            MemberState {
                applying: true,
                installed: false,
            },
        );
        let why = gate("a1", &members, &states).expect_err("one at a time");
        assert!(why.contains("applying"), "{why}");
        // The standby healthy on the new release: the active may go.
        states.insert(
            "s1".to_owned(),
            MemberState {
                applying: false,
                installed: true,
            },
        );
        assert!(gate("a1", &members, &states).is_ok());
        // Other groups and lone nodes are not held.
        assert!(gate("s2", &members, &states).is_ok());
        assert!(gate("lone", &members, &states).is_ok());
    }

    #[test]
    fn waves_put_standbys_no_later_than_their_actives() {
        let members = line3();
        // Drawn with the actives first.
        let waves = vec![
            vec!["a1".to_owned(), "x".to_owned()],
            vec!["s1".to_owned(), "a2".to_owned()],
            vec!["s2".to_owned()],
        ];
        let w = order_waves(&waves, &members);
        assert_eq!(
            w,
            vec![
                vec!["s1".to_owned(), "x".to_owned()],
                vec!["a1".to_owned(), "s2".to_owned()],
                vec!["a2".to_owned()],
            ]
        );
        assert_eq!(
            w.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![2, 2, 1],
            "wave sizes kept"
        );
    }
}
