//! What holds a node back from applying when its wave has come: its apply
//! window (local time; an admin's signed `--now` overrides it) and its
//! redundancy group (one member at a time, standbys first, an active only
//! once the standby runs the new release). Every node tells the site what
//! it waits for in its heartbeat, so status and `--wait` say it anywhere.

use super::*;
use lanup_protocol::group::{gate, Member, MemberState};

impl Node {
    /// Why this node may not apply now, if it may not: outside its apply
    /// window (unless `now`), or its group says wait. `version` and `id`
    /// are the release and the rollout it applies for (`None` for an
    /// automatic apply).
    pub(super) fn held_back(&self, version: &str, id: Option<&str>, now: bool) -> Option<String> {
        let policy = &self.config.policy;
        if !now {
            let zone = crate::policy::zone();
            if let Some((at, when)) =
                crate::policy::next_opening(&policy.apply_window, &zone, now_unix_ms())
            {
                let wait = Duration::from_secs(at.saturating_sub(now_unix_ms()) / 1000);
                let windows: Vec<String> = policy
                    .apply_window
                    .0
                    .iter()
                    .map(ToString::to_string)
                    .collect();
                return Some(format!(
                    "outside its apply window ({}): applies at {when}, in {}",
                    windows.join(", "),
                    humantime::format_duration(wait)
                ));
            }
        }
        policy.member.as_ref()?;
        let me = self.local.to_string();
        let members = self.members();
        let reports = id.map(|id| self.reports(version, id));
        let mut states: BTreeMap<String, MemberState> = BTreeMap::new();
        let mut add = |node: String, hb: &Heartbeat| {
            let applying = hb.apply.as_deref() == Some("applying");
            let installed = match &reports {
                Some(r) => r.get(&node).and_then(|r| r.installed.as_deref()) == Some(version),
                None => hb.installed_version.as_deref() == Some(version),
            };
            states.insert(
                node,
                MemberState {
                    applying,
                    installed: installed && !applying,
                },
            );
        };
        for (peer, info) in &self.peers {
            if let Some((_, hb)) = &info.heartbeat {
                add(peer.to_string(), hb);
            }
        }
        for (author, heard) in self.heard_only() {
            add(author.to_string(), &heard.heartbeat);
        }
        gate(&me, &members, &states).err().map(|why| {
            // Peers by their short names, as status shows them.
            let mut why = why;
            for node in members.keys().filter(|n| **n != me) {
                why = why.replace(node.as_str(), &lanup_protocol::short_peer(node));
            }
            why
        })
    }

    /// The members of redundancy groups this node knows of: itself and
    /// every node whose heartbeat names a group.
    pub(super) fn members(&self) -> BTreeMap<String, Member> {
        let mut members: BTreeMap<String, Member> = BTreeMap::new();
        for (peer, info) in &self.peers {
            if let Some(m) = info
                .heartbeat
                .as_ref()
                .and_then(|(_, hb)| hb.member.clone())
            {
                members.insert(peer.to_string(), m);
            }
        }
        for (author, heard) in self.heard_only() {
            if let Some(m) = heard.heartbeat.member.clone() {
                members.insert(author.to_string(), m);
            }
        }
        if let Some(m) = &self.config.policy.member {
            members.insert(self.local.to_string(), m.clone());
        }
        members
    }

    /// Records what this node waits for (logged when it changes).
    pub(super) fn set_waiting(&mut self, why: Option<String>) {
        if why != self.waiting {
            if let Some(why) = &why {
                info!(reason = %why, "this node's wave has come; it waits");
            }
            self.waiting = why;
        }
    }
}
