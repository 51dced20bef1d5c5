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
//! 4. create the folders the new files need ([`Journal::dirs`]) and move
//!    every new file in;
//! 5. journal [`Phase::Swapped`], start the application, check its health;
//! 6. journal [`Phase::Committed`] and drop `old`.
//!
//! Any failure, and any crash before `Committed`, is undone by
//! [`rollback_plan`]; a crash after it needs only the clean-up. Every step
//! of either plan can be run again after a crash part-way through: a move
//! whose source is gone was already done, a folder that is there was
//! already made, and one that is gone was already removed.

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

impl Phase {
    /// The name operators see in logs and status.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Begin => "begin",
            Phase::Swapped => "swapped",
            Phase::Committed => "committed",
            Phase::RolledBack => "rolled-back",
        }
    }
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
    /// Folders the new files need that are not in the install directory
    /// yet; a rollback removes them again.
    #[serde(default)]
    pub dirs: BTreeSet<String>,
    /// Whether the application was running when the apply began: a
    /// rollback starts the old one again only then.
    #[serde(default)]
    pub was_running: bool,
    /// Whether the new release's application is started after the swap
    /// (the manifest's `RestartApp`).
    #[serde(default)]
    pub start_new: bool,
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

/// One step of a plan, on one relative name. A step whose source is
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
    /// Create the folder in the install directory, if it is not there.
    MakeDir { name: String },
    /// Remove the folder from the install directory, if it is there and
    /// empty.
    RemoveDir { name: String },
}

/// What a name in the install directory is now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Missing,
    File,
    Dir,
}

/// Why an apply cannot begin: the new release's layout clashes with what is
/// in the install directory. Nothing has been touched when this is returned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Conflict {
    #[error("{0}: the new release has a file where the install directory has a folder")]
    FolderInTheWay(String),
    #[error("{name}: the new release needs a folder here, but {file} is a file the old release does not list")]
    FileInTheWay { name: String, file: String },
}

/// What a node does with the journal it finds when it starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recovery {
    /// The apply was committed: only the clean-up may be left.
    CleanUp,
    /// The apply did not finish: put the old release back and start it.
    RollBack,
}

/// The folders above a relative file name, outermost first: `a/b/c` gives
/// `a`, `a/b`.
fn parents(name: &str) -> impl Iterator<Item = &str> {
    name.match_indices('/').map(move |(i, _)| &name[..i])
}

impl Journal {
    /// A journal for installing `to` (its files `new_files`) over `from`
    /// (its files `old_files`); `kind` says what each name is in the
    /// install directory now. Refuses layouts a rename cannot swap.
    pub fn begin(
        from: Option<String>,
        to: String,
        old_files: &BTreeSet<String>,
        new_files: BTreeSet<String>,
        kind: impl Fn(&str) -> Kind,
    ) -> Result<Journal, Conflict> {
        let mut aside = BTreeSet::new();
        for name in old_files.iter().chain(&new_files) {
            match kind(name) {
                Kind::File => {
                    aside.insert(name.clone());
                }
                Kind::Dir if new_files.contains(name) => {
                    return Err(Conflict::FolderInTheWay(name.clone()))
                }
                Kind::Dir | Kind::Missing => {}
            }
        }
        let mut dirs = BTreeSet::new();
        for name in &new_files {
            for dir in parents(name) {
                match kind(dir) {
                    Kind::Dir => {}
                    Kind::File if aside.contains(dir) && old_files.contains(dir) => {
                        dirs.insert(dir.to_owned());
                    }
                    Kind::File => {
                        return Err(Conflict::FileInTheWay {
                            name: name.clone(),
                            file: dir.to_owned(),
                        })
                    }
                    Kind::Missing => {
                        dirs.insert(dir.to_owned());
                    }
                }
            }
        }
        Ok(Journal {
            from,
            to,
            phase: Phase::Begin,
            new_files,
            aside,
            dirs,
            was_running: false,
            start_new: false,
            reason: None,
        })
    }

    /// What to do with this journal at start-up.
    pub fn recovery(&self) -> Recovery {
        match self.phase {
            Phase::Begin | Phase::Swapped => Recovery::RollBack,
            Phase::Committed | Phase::RolledBack => Recovery::CleanUp,
        }
    }

    /// Moves old files aside, makes the new folders (outermost first), then
    /// moves new files in.
    pub fn swap_plan(&self) -> Vec<Op> {
        let aside = self.aside.iter().map(|name| Op::Move {
            name: name.clone(),
            from: Place::Install,
            to: Place::Old,
        });
        // BTreeSet order puts `a` before `a/b`.
        let dirs = self
            .dirs
            .iter()
            .map(|name| Op::MakeDir { name: name.clone() });
        let new = self.new_files.iter().map(|name| Op::Move {
            name: name.clone(),
            from: Place::New,
            to: Place::Install,
        });
        aside.chain(dirs).chain(new).collect()
    }
}

/// Puts the install directory back as it was before `journal`'s apply:
/// every new file that replaced nothing is removed, the folders the apply
/// made are removed (innermost first), then every file moved aside is moved
/// back (over the new one, where there is one).
pub fn rollback_plan(journal: &Journal) -> Vec<Op> {
    let remove = journal
        .new_files
        .iter()
        .filter(|name| !journal.aside.contains(*name))
        .map(|name| Op::Remove { name: name.clone() });
    let dirs = journal
        .dirs
        .iter()
        .rev()
        .map(|name| Op::RemoveDir { name: name.clone() });
    let restore = journal.aside.iter().map(|name| Op::Move {
        name: name.clone(),
        from: Place::Old,
        to: Place::Install,
    });
    remove.chain(dirs).chain(restore).collect()
}

/// After a commit: the folders that held only files of the old release are
/// removed when they are empty now (innermost first), so the install
/// directory holds the new release's layout and nothing of the old one.
pub fn commit_plan(journal: &Journal) -> Vec<Op> {
    let needed: BTreeSet<&str> = journal.new_files.iter().flat_map(|n| parents(n)).collect();
    let emptied: BTreeSet<&str> = journal
        .aside
        .iter()
        .flat_map(|n| parents(n))
        .filter(|d| !needed.contains(d))
        .collect();
    emptied
        .into_iter()
        .rev()
        .map(|name| Op::RemoveDir {
            name: name.to_owned(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn names(list: &[&str]) -> BTreeSet<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    /// A model of the three places, strict where a filesystem is: a file
    /// moves into the install directory only under folders that exist, and
    /// never onto a folder. `None` is a folder.
    #[derive(Debug, Clone, PartialEq, Eq, Default)]
    struct Dirs {
        install: BTreeMap<String, Option<String>>,
        new: BTreeMap<String, String>,
        old: BTreeMap<String, String>,
    }

    impl Dirs {
        fn kind(&self, name: &str) -> Kind {
            match self.install.get(name) {
                None => Kind::Missing,
                Some(None) => Kind::Dir,
                Some(Some(_)) => Kind::File,
            }
        }

        fn file(&mut self, name: &str, content: &str) {
            for dir in parents(name) {
                self.install.insert(dir.to_owned(), None);
            }
            self.install
                .insert(name.to_owned(), Some(content.to_owned()));
        }

        fn put_in(&mut self, name: &str) -> Result<(), String> {
            if parents(name).any(|d| self.kind(d) != Kind::Dir) {
                return Err(format!("{name}: a folder above it is missing"));
            }
            if self.kind(name) == Kind::Dir {
                return Err(format!("{name}: a folder is in the way"));
            }
            Ok(())
        }

        /// Runs one op the way the node does: a missing source is skipped.
        fn run(&mut self, op: &Op) -> Result<(), String> {
            match op {
                Op::Move { name, from, to } => {
                    let content = match from {
                        Place::Install => match self.install.get(name) {
                            None => return Ok(()),
                            Some(None) => return Err(format!("{name}: moving a folder")),
                            Some(Some(_)) => self.install.remove(name).flatten(),
                        },
                        Place::New => self.new.remove(name),
                        Place::Old => self.old.remove(name),
                    };
                    let Some(content) = content else {
                        return Ok(());
                    };
                    match to {
                        Place::Install => {
                            self.put_in(name)?;
                            self.install.insert(name.clone(), Some(content));
                        }
                        Place::New => {
                            self.new.insert(name.clone(), content);
                        }
                        Place::Old => {
                            self.old.insert(name.clone(), content);
                        }
                    }
                }
                Op::Remove { name } => match self.kind(name) {
                    Kind::Dir => return Err(format!("{name}: removing a folder as a file")),
                    Kind::File => {
                        self.install.remove(name);
                    }
                    Kind::Missing => {}
                },
                Op::MakeDir { name } => match self.kind(name) {
                    Kind::File => return Err(format!("{name}: a file is in the way")),
                    Kind::Dir => {}
                    Kind::Missing => {
                        self.put_in(name)?;
                        self.install.insert(name.clone(), None);
                    }
                },
                Op::RemoveDir { name } => {
                    let prefix = format!("{name}/");
                    let empty = !self.install.keys().any(|k| k.starts_with(&prefix));
                    if self.kind(name) == Kind::Dir && empty {
                        self.install.remove(name);
                    }
                }
            }
            Ok(())
        }

        fn run_all(&mut self, ops: &[Op]) {
            for op in ops {
                if let Err(e) = self.run(op) {
                    panic!("{op:?} failed: {e}");
                }
            }
        }
    }

    /// v1 lists a, b, c, x and old/only; v2 lists b, c, d, e, x/y (a file
    /// becomes a folder) and n/m/k (new folders); `user.conf` and
    /// `keep/data` are nobody's, and `e` exists unlisted before the apply.
    fn setup() -> (Dirs, Journal) {
        let mut dirs = Dirs::default();
        for (n, c) in [
            ("a", "a1"),
            ("b", "b1"),
            ("c", "c1"),
            ("x", "x1"),
            ("old/only", "o1"),
            ("user.conf", "mine"),
            ("keep/data", "mine too"),
            ("e", "e-user"),
        ] {
            dirs.file(n, c);
        }
        for (n, c) in [
            ("b", "b2"),
            ("c", "c2"),
            ("d", "d2"),
            ("e", "e2"),
            ("x/y", "y2"),
            ("n/m/k", "k2"),
        ] {
            dirs.new.insert(n.into(), c.into());
        }
        let j = Journal::begin(
            Some("1".into()),
            "2".into(),
            &names(&["a", "b", "c", "x", "old/only"]),
            names(&["b", "c", "d", "e", "x/y", "n/m/k"]),
            |n| dirs.kind(n),
        )
        .expect("no conflict");
        (dirs, j)
    }

    #[test]
    fn a_swap_installs_exactly_the_new_files_and_keeps_unlisted_ones() {
        let (mut dirs, j) = setup();
        assert_eq!(j.aside, names(&["a", "b", "c", "e", "old/only", "x"]));
        assert_eq!(j.dirs, names(&["n", "n/m", "x"]));
        dirs.run_all(&j.swap_plan());
        dirs.run_all(&commit_plan(&j));
        let want: BTreeMap<String, Option<String>> = [
            ("b", Some("b2")),
            ("c", Some("c2")),
            ("d", Some("d2")),
            ("e", Some("e2")),
            ("x", None),
            ("x/y", Some("y2")),
            ("n", None),
            ("n/m", None),
            ("n/m/k", Some("k2")),
            ("user.conf", Some("mine")),
            ("keep", None),
            ("keep/data", Some("mine too")),
        ]
        .iter()
        .map(|(n, c)| (n.to_string(), c.map(str::to_owned)))
        .collect();
        assert_eq!(dirs.install, want);
    }

    #[test]
    fn a_crash_at_any_point_rolls_back_to_exactly_the_old_install() {
        let (start, j) = setup();
        let before = start.install.clone();
        let swap = j.swap_plan();
        let rollback = rollback_plan(&j);
        // Crash after `done` swap steps, then after `again` rollback steps,
        // then the rollback is run once more from the start (a second crash
        // and recovery).
        for done in 0..=swap.len() {
            for again in 0..=rollback.len() {
                let mut dirs = start.clone();
                dirs.run_all(&swap[..done]);
                dirs.run_all(&rollback[..again]);
                dirs.run_all(&rollback);
                assert_eq!(
                    dirs.install, before,
                    "crash after {done} swap steps and {again} rollback steps"
                );
            }
        }
    }

    #[test]
    fn a_crash_during_the_clean_up_of_a_commit_can_be_redone() {
        let (start, j) = setup();
        let mut once = start.clone();
        once.run_all(&j.swap_plan());
        let clean = commit_plan(&j);
        once.run_all(&clean);
        for k in 0..=clean.len() {
            let mut dirs = start.clone();
            dirs.run_all(&j.swap_plan());
            dirs.run_all(&clean[..k]);
            dirs.run_all(&clean);
            assert_eq!(
                dirs.install, once.install,
                "clean-up redone after {k} steps"
            );
        }
    }

    #[test]
    fn layouts_a_rename_cannot_swap_are_refused_before_anything_moves() {
        let mut dirs = Dirs::default();
        dirs.file("plugins/x", "mine");
        dirs.file("notes", "mine");
        let err = Journal::begin(None, "2".into(), &names(&[]), names(&["plugins"]), |n| {
            dirs.kind(n)
        });
        assert_eq!(err, Err(Conflict::FolderInTheWay("plugins".into())));
        let err = Journal::begin(None, "2".into(), &names(&[]), names(&["notes/a"]), |n| {
            dirs.kind(n)
        });
        assert_eq!(
            err,
            Err(Conflict::FileInTheWay {
                name: "notes/a".into(),
                file: "notes".into()
            })
        );
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
