//! The apply journal: what a node records, and syncs to disk, before each
//! step of replacing an installed release, so that after a crash, a kill or a
//! power cut it knows how to reach exactly the old or exactly the new
//! installation.
//!
//! An apply works in three places on the install directory's own filesystem
//! (so every move is a rename): the install directory itself, `new` (the
//! staged files, copied next to it before anything starts) and `old` (where
//! the replaced files are moved aside). The steps are:
//!
//! 1. journal [`Phase::Begin`] with both file lists;
//! 2. stop the application;
//! 3. move aside every file in [`Journal::aside`] (the old release's files,
//!    and any unlisted file a new name would overwrite);
//! 4. move every new file in;
//! 5. journal [`Phase::Swapped`], start the application, check its health;
//! 6. journal [`Phase::Committed`] and drop `old`.
//!
//! Any failure, and any crash before `Committed`, is undone by
//! [`rollback_plan`]; a crash after it needs only the clean-up. Every step
//! of either plan can be run again after a crash part-way through: a move
//! whose source is gone was already done.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

/// How far an apply got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Files may be part-way moved; the old install is recoverable.
    Begin,
    /// The new files are in place; the new application is being checked.
    Swapped,
    /// The new release is installed for good.
    Committed,
    /// The old release was put back.
    RolledBack,
}

/// The journal of one apply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Journal {
    /// The installed release being replaced, if any.
    pub from: Option<String>,
    /// The release being installed.
    pub to: String,
    pub phase: Phase,
    /// Names (relative to the install directory) of the new release's files.
    pub new_files: BTreeSet<String>,
    /// Names moved aside before the new files go in: the old release's
    /// files that exist, and existing files the new release would overwrite.
    pub aside: BTreeSet<String>,
    /// Why the apply was rolled back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// One of the three places an apply moves files between.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    Install,
    New,
    Old,
}

/// One step of a plan, on one relative file name. A step whose source is
/// missing has already been done and is skipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Rename the file from one place to another (replacing what is there).
    Move {
        name: String,
        from: Place,
        to: Place,
    },
    /// Remove the file from the install directory, if it is there.
    Remove { name: String },
}

/// What a node does with the journal it finds when it starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recovery {
    /// The apply was committed: only the clean-up may be left.
    CleanUp,
    /// The apply did not finish: put the old release back and start it.
    RollBack,
}

impl Journal {
    /// A journal for installing `to` (its files `new_files`) over `from`
    /// (its files `old_files`); `exists` says which names are in the install
    /// directory now.
    pub fn begin(
        from: Option<String>,
        to: String,
        old_files: &BTreeSet<String>,
        new_files: BTreeSet<String>,
        exists: impl Fn(&str) -> bool,
    ) -> Journal {
        let aside = old_files
            .iter()
            .chain(&new_files)
            .filter(|name| exists(name))
            .cloned()
            .collect();
        Journal {
            from,
            to,
            phase: Phase::Begin,
            new_files,
            aside,
            reason: None,
        }
    }

    /// What to do with this journal at start-up.
    pub fn recovery(&self) -> Recovery {
        match self.phase {
            Phase::Begin | Phase::Swapped => Recovery::RollBack,
            Phase::Committed | Phase::RolledBack => Recovery::CleanUp,
        }
    }

    /// Moves old files aside, then new files in.
    pub fn swap_plan(&self) -> Vec<Op> {
        let aside = self.aside.iter().map(|name| Op::Move {
            name: name.clone(),
            from: Place::Install,
            to: Place::Old,
        });
        let new = self.new_files.iter().map(|name| Op::Move {
            name: name.clone(),
            from: Place::New,
            to: Place::Install,
        });
        aside.chain(new).collect()
    }
}

/// Puts the install directory back as it was before `journal`'s apply:
/// every new file that replaced nothing is removed, then every file moved
/// aside is moved back (over the new one, where there is one).
pub fn rollback_plan(journal: &Journal) -> Vec<Op> {
    let remove = journal
        .new_files
        .iter()
        .filter(|name| !journal.aside.contains(*name))
        .map(|name| Op::Remove { name: name.clone() });
    let restore = journal.aside.iter().map(|name| Op::Move {
        name: name.clone(),
        from: Place::Old,
        to: Place::Install,
    });
    remove.chain(restore).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn names(list: &[&str]) -> BTreeSet<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    /// A model of the three places: name -> content, per place.
    #[derive(Debug, Clone, PartialEq, Eq, Default)]
    struct Dirs(BTreeMap<(u8, String), String>);

    fn key(place: Place) -> u8 {
        match place {
            Place::Install => 0,
            Place::New => 1,
            Place::Old => 2,
        }
    }

    impl Dirs {
        fn get(&self, place: Place, name: &str) -> Option<&String> {
            self.0.get(&(key(place), name.to_string()))
        }
        fn put(&mut self, place: Place, name: &str, content: &str) {
            self.0
                .insert((key(place), name.to_string()), content.to_string());
        }
        /// Runs one op the way the node does: a missing source is skipped.
        fn run(&mut self, op: &Op) {
            match op {
                Op::Move { name, from, to } => {
                    if let Some(c) = self.0.remove(&(key(*from), name.clone())) {
                        self.0.insert((key(*to), name.clone()), c);
                    }
                }
                Op::Remove { name } => {
                    self.0.remove(&(key(Place::Install), name.clone()));
                }
            }
        }
        fn install(&self) -> BTreeMap<String, String> {
            self.0
                .iter()
                .filter(|((p, _), _)| *p == 0)
                .map(|((_, n), c)| (n.clone(), c.clone()))
                .collect()
        }
    }

    /// v1 lists a, b, c; v2 lists b, c, d, e; `user.conf` is nobody's, and
    /// `e` exists unlisted before the apply.
    fn setup() -> (Dirs, Journal) {
        let mut dirs = Dirs::default();
        for (n, c) in [
            ("a", "a1"),
            ("b", "b1"),
            ("c", "c1"),
            ("user.conf", "mine"),
            ("e", "e-user"),
        ] {
            dirs.put(Place::Install, n, c);
        }
        for (n, c) in [("b", "b2"), ("c", "c2"), ("d", "d2"), ("e", "e2")] {
            dirs.put(Place::New, n, c);
        }
        let j = Journal::begin(
            Some("1".into()),
            "2".into(),
            &names(&["a", "b", "c"]),
            names(&["b", "c", "d", "e"]),
            |n| dirs.get(Place::Install, n).is_some(),
        );
        (dirs, j)
    }

    #[test]
    fn a_swap_installs_exactly_the_new_files_and_keeps_unlisted_ones() {
        let (mut dirs, j) = setup();
        assert_eq!(j.aside, names(&["a", "b", "c", "e"]));
        for op in j.swap_plan() {
            dirs.run(&op);
        }
        let want: BTreeMap<String, String> = [
            ("b", "b2"),
            ("c", "c2"),
            ("d", "d2"),
            ("e", "e2"),
            ("user.conf", "mine"),
        ]
        .iter()
        .map(|(n, c)| (n.to_string(), c.to_string()))
        .collect();
        assert_eq!(dirs.install(), want);
    }

    #[test]
    fn a_crash_at_any_point_rolls_back_to_exactly_the_old_install() {
        let (start, j) = setup();
        let before = start.install();
        let swap = j.swap_plan();
        let rollback = rollback_plan(&j);
        // Crash after `done` swap steps, then after `again` rollback steps,
        // then the rollback is run once more from the start (a second crash
        // and recovery).
        for done in 0..=swap.len() {
            for again in 0..=rollback.len() {
                let mut dirs = start.clone();
                swap[..done].iter().for_each(|op| dirs.run(op));
                rollback[..again].iter().for_each(|op| dirs.run(op));
                rollback.iter().for_each(|op| dirs.run(op));
                assert_eq!(
                    dirs.install(),
                    before,
                    "crash after {done} swap steps and {again} rollback steps"
                );
            }
        }
    }

    #[test]
    fn only_a_committed_apply_survives_a_restart() {
        let (_, mut j) = setup();
        for (phase, want) in [
            (Phase::Begin, Recovery::RollBack),
            (Phase::Swapped, Recovery::RollBack),
            (Phase::Committed, Recovery::CleanUp),
            (Phase::RolledBack, Recovery::CleanUp),
        ] {
            j.phase = phase;
            assert_eq!(j.recovery(), want, "{phase:?}");
        }
        let text = serde_json::to_string(&j).expect("serialises");
        assert_eq!(serde_json::from_str::<Journal>(&text).ok(), Some(j));
    }
}
