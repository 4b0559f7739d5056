//! Wakeups from the volume: inotify watches on the directories nodes write into (each owned
//! node's directory, its outbox with its files and log, its receipts), as a hint that a cycle has
//! something to read, and where.
//!
//! The server runs on the array, where the NFS and SMB servers (kernel nfsd, nfs-ganesha, smbd)
//! write through the local file system, so their clients' writes raise inotify events there as
//! a local write does. The hint is never relied on alone: the server still reads the whole volume
//! at every poll interval, which covers a watch that could not be added, events lost when the
//! kernel's queue overflowed, and a server that is itself a network client of the volume (where
//! inotify sees only its own writes). Between those reads, an event says which of a node's spools
//! to read (see [`Spot`]), so a cycle reads only the spools that changed.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};

use fsbridge::NodeName;
use nix::errno::Errno;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};

/// Most directories watched; past it the poll covers the rest.
pub const WATCHES_MAX: usize = 1 << 16;
/// Most event reads per call of [`Watcher::take`] (each reads up to a few KiB of events).
const READS_PER_TAKE_MAX: usize = 64;

/// Which part of a node's directory a watched directory is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Area {
    /// The node's directory, `out` or `rcpt`: a change there may be a spool directory made,
    /// moved or replaced, so every spool of the node is read and its directories checked again.
    Tree,
    /// The outbox's files (`out/new`).
    Outbox,
    /// The outbox log's segments (`out/log`).
    Log,
    /// The receipt spool (`rcpt/new`).
    Receipts,
}

/// One spool of one node.
pub type Spot = (NodeName, Area);

/// What a watched directory is to the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Tag {
    /// Part of a node's directory.
    Node(Spot),
    /// This partition's spool of receipts forwarded by other partitions.
    Forwarded,
}

/// What a batch of events said.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Woken {
    /// Something was written, created or renamed in a watched directory (or events were lost).
    pub news: bool,
    /// A node directory appeared or was renamed in, or a registration was written in one (the
    /// registry should be read again).
    pub nodes: bool,
    /// A directory appeared in a watched one (one still to watch may exist now).
    pub dirs: bool,
    /// Events were lost (the kernel's queue overflowed): any spool may have changed.
    pub lost: bool,
    /// The spools written in, and those watched since the last call (they may have held files
    /// before their watch began). Each once, in no particular order.
    pub spots: Vec<Spot>,
    /// The forwarded receipts' spool was written in (or is newly watched).
    pub forwarded: bool,
}

impl Woken {
    fn mark(&mut self, tag: Option<&Tag>) {
        match tag {
            Some(Tag::Node(spot)) if !self.spots.contains(spot) => self.spots.push(spot.clone()),
            Some(Tag::Node(_)) => {}
            Some(Tag::Forwarded) => self.forwarded = true,
            None => {}
        }
    }
}

/// The volume's watches.
pub struct Watcher {
    inotify: Inotify,
    /// The directory holding the node directories (its events mean a node came or went).
    nodes_dir: PathBuf,
    nodes_wd: Option<WatchDescriptor>,
    watched: HashMap<WatchDescriptor, (PathBuf, Option<Tag>)>,
    paths: HashSet<PathBuf>,
    /// Directories not there (or not directories) at their last attempt: their parent's watch
    /// tells when one appears.
    missing: HashSet<PathBuf>,
    /// Watches added since the last [`Watcher::take`]: their directories may hold files written
    /// before the watch began, so they are reported as changed.
    fresh: Woken,
    /// Why the last watch could not be added (logged once per reason).
    failing: Option<String>,
}

impl Watcher {
    /// A watcher for the volume whose node directories are under `nodes_dir`, or `None` where
    /// there is no inotify (or on a thread running the simulator, whose disk raises no events).
    pub fn new(nodes_dir: PathBuf) -> Option<Watcher> {
        if fsbridge::disk::sim::current().is_some() {
            return None;
        }
        match Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC) {
            Ok(inotify) => {
                let mut watcher = Watcher {
                    inotify,
                    nodes_dir,
                    nodes_wd: None,
                    watched: HashMap::new(),
                    paths: HashSet::new(),
                    missing: HashSet::new(),
                    fresh: Woken::default(),
                    failing: None,
                };
                watcher.watch_nodes_dir();
                Some(watcher)
            }
            Err(error) => {
                eprintln!("ftss-server: no inotify ({error}): the volume is read at the poll interval only");
                None
            }
        }
    }

    /// The descriptor that is readable when events are waiting.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.inotify.as_fd()
    }

    /// How many directories are watched.
    pub fn watched(&self) -> usize {
        self.watched.len()
    }

    fn watch_nodes_dir(&mut self) {
        if self.nodes_wd.is_none() {
            let nodes_dir = self.nodes_dir.clone();
            self.nodes_wd = self.add(&nodes_dir, None);
        }
    }

    /// Watches each of `dirs` not watched yet, with what it is. One that does not exist yet (a
    /// node's log directory before its first send) is tried again at the next call.
    pub fn watch(&mut self, dirs: impl IntoIterator<Item = (PathBuf, Tag)>) {
        self.watch_nodes_dir();
        for (dir, tag) in dirs {
            if !self.paths.contains(&dir) {
                self.add(&dir, Some(tag));
            }
        }
    }

    /// Would a change in `dir` raise an event? Yes if it is watched, or if it was not there at
    /// its last attempt and its parent is watched (the parent's event says when it appears, and
    /// the new watch reports it).
    pub fn covers(&self, dir: &Path) -> bool {
        self.paths.contains(dir)
            || (self.missing.contains(dir) && dir.parent().is_some_and(|parent| self.paths.contains(parent)))
    }

    fn add(&mut self, dir: &Path, tag: Option<Tag>) -> Option<WatchDescriptor> {
        // Whatever happens below, it is not "missing" any more unless it says so again.
        self.missing.remove(dir);
        if self.watched.len() >= WATCHES_MAX {
            self.failed(format!("{WATCHES_MAX} directories watched already"));
            return None;
        }
        // A symlink planted where a directory belongs is not followed (the watch is only a hint,
        // but it should not report on some other directory).
        let mask = AddWatchFlags::IN_CREATE
            | AddWatchFlags::IN_MOVED_TO
            | AddWatchFlags::IN_MODIFY
            | AddWatchFlags::IN_CLOSE_WRITE
            | AddWatchFlags::IN_MOVE_SELF
            | AddWatchFlags::IN_ONLYDIR
            | AddWatchFlags::IN_DONT_FOLLOW;
        match self.inotify.add_watch(dir, mask) {
            // The same directory as a watch already held under another path (a symlink further
            // up the path, planted by a node to be told of another's writes): not taken, so
            // the first path's events still go to it; this one is read at the poll.
            Ok(wd) if self.watched.get(&wd).is_some_and(|(path, _)| path != dir) => {
                self.failed(format!("{} is a directory watched under another path", dir.display()));
                None
            }
            Ok(wd) => {
                self.fresh.mark(tag.as_ref());
                self.watched.insert(wd, (dir.to_path_buf(), tag));
                self.paths.insert(dir.to_path_buf());
                Some(wd)
            }
            // Not there yet: tried again later; nothing to report. (Not a directory, a symlink
            // say, is not "missing": its spool is read whenever the volume is, and the read
            // checks the node's directories.)
            Err(Errno::ENOENT) => {
                if self.missing.len() < WATCHES_MAX {
                    self.missing.insert(dir.to_path_buf());
                }
                None
            }
            Err(error) => {
                self.failed(format!("watching {}: {error}", dir.display()));
                None
            }
        }
    }

    fn failed(&mut self, reason: String) {
        if self.failing.as_deref() != Some(reason.as_str()) {
            eprintln!("ftss-server: {reason} (such directories are read at the poll interval)");
            self.failing = Some(reason);
        }
    }

    /// Whether `event` is a node's `node.toml` written or renamed into its directory (a node
    /// makes its directory before its registration, so the directory's own event may come too
    /// early for the registry).
    fn is_registration(&self, event: &nix::sys::inotify::InotifyEvent) -> bool {
        event.name.as_deref().is_some_and(|name| name == "node.toml")
            && self.watched.get(&event.wd).and_then(|(dir, _)| dir.parent()) == Some(self.nodes_dir.as_path())
    }

    /// Forgets watch `wd` (removing it from the kernel too if `moved`: a removed directory's
    /// watch is gone already) and the watches under its path, so that their paths are watched
    /// again. Each node they belong to is read again whole, its directories checked: a spool
    /// directory that went may have been replaced.
    fn forget(&mut self, wd: WatchDescriptor, moved: bool, woken: &mut Woken) {
        let Some((path, _)) = self.watched.get(&wd).cloned() else { return };
        let under: Vec<WatchDescriptor> =
            self.watched.iter().filter(|(_, (other, _))| other.starts_with(&path)).map(|(wd, _)| *wd).collect();
        for gone in under {
            if gone != wd || moved {
                let _ = self.inotify.rm_watch(gone);
            }
            if let Some((path, tag)) = self.watched.remove(&gone) {
                self.paths.remove(&path);
                match tag {
                    Some(Tag::Node((node, _))) => woken.mark(Some(&Tag::Node((node, Area::Tree)))),
                    other => woken.mark(other.as_ref()),
                }
            }
            if self.nodes_wd == Some(gone) {
                self.nodes_wd = None;
            }
        }
        woken.news = true;
        woken.dirs = true;
    }

    /// Reads the waiting events (without blocking) and says what they mean.
    pub fn take(&mut self) -> Woken {
        let mut woken = std::mem::take(&mut self.fresh);
        woken.news |= woken.forwarded || !woken.spots.is_empty();
        for _ in 0..READS_PER_TAKE_MAX {
            let events = match self.inotify.read_events() {
                Ok(events) if !events.is_empty() => events,
                // EAGAIN: none left. Anything else: the next poll reads the volume anyway.
                _ => break,
            };
            for event in events {
                if event.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                    woken.news = true;
                    woken.nodes = true;
                    woken.dirs = true;
                    woken.lost = true;
                    continue;
                }
                if event.mask.contains(AddWatchFlags::IN_IGNORED) {
                    // The directory went (or was unmounted): forgotten, so that it is watched
                    // again if it comes back.
                    self.forget(event.wd, false, &mut woken);
                    continue;
                }
                if event.mask.contains(AddWatchFlags::IN_MOVE_SELF) {
                    // The directory was moved away: its watch (and those of its subdirectories)
                    // would report on it wherever it went, and whatever takes its place would go
                    // unwatched. Dropped, so that the paths are watched again.
                    self.forget(event.wd, true, &mut woken);
                    continue;
                }
                woken.news = true;
                if event.mask.contains(AddWatchFlags::IN_ISDIR) {
                    woken.dirs = true;
                }
                if self.nodes_wd == Some(event.wd) || self.is_registration(&event) {
                    woken.nodes = true;
                }
                woken.mark(self.watched.get(&event.wd).and_then(|(_, tag)| tag.as_ref()));
            }
        }
        woken
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("ftss-watch-{tag}-{}-{}", std::process::id(), fsbridge::random_u64()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn spot(node: &str, area: Area) -> Spot {
        (NodeName::new(node).unwrap(), area)
    }

    /// The directory `rel` under `nodes`, tagged as `area` of `node`.
    fn dir(nodes: &Path, rel: &str, node: &str, area: Area) -> (PathBuf, Tag) {
        (nodes.join(rel), Tag::Node(spot(node, area)))
    }

    fn woke(spots: &[Spot]) -> Woken {
        Woken { news: true, spots: spots.to_vec(), ..Woken::default() }
    }

    #[test]
    fn writes_creations_and_renames_in_watched_directories_wake_and_others_do_not() {
        let root = temp_dir("events");
        let nodes = root.join("nodes");
        std::fs::create_dir_all(nodes.join("a/out/new")).unwrap();
        std::fs::create_dir_all(root.join("elsewhere")).unwrap();
        let mut watcher = Watcher::new(nodes.clone()).unwrap();
        watcher.watch([dir(&nodes, "a/out/new", "a", Area::Outbox), dir(&nodes, "a/out/log", "a", Area::Log)]);
        assert_eq!(watcher.watched(), 2, "the nodes directory and the outbox; the log does not exist yet");
        assert!(watcher.covers(&nodes.join("a/out/new")) && !watcher.covers(&nodes.join("a/out/log")));
        assert_eq!(watcher.take(), woke(&[spot("a", Area::Outbox)]), "a new watch is reported once");
        assert_eq!(watcher.take(), Woken::default());

        std::fs::write(root.join("elsewhere/x"), b"x").unwrap();
        assert_eq!(watcher.take(), Woken::default(), "an unwatched directory woke the server");

        std::fs::write(root.join("elsewhere/f"), b"f").unwrap();
        std::fs::rename(root.join("elsewhere/f"), nodes.join("a/out/new/f")).unwrap();
        assert_eq!(watcher.take(), woke(&[spot("a", Area::Outbox)]));

        // The log directory appears (in the outbox, which is watched too): watched at the next
        // call, and an append to a file in it wakes.
        watcher.watch([dir(&nodes, "a/out", "a", Area::Tree)]);
        assert_eq!(watcher.take(), woke(&[spot("a", Area::Tree)]));
        std::fs::create_dir_all(nodes.join("a/out/log")).unwrap();
        assert_eq!(watcher.take(), Woken { dirs: true, ..woke(&[spot("a", Area::Tree)]) });
        std::fs::write(nodes.join("a/out/log/seg"), b"").unwrap();
        watcher.watch([dir(&nodes, "a/out/new", "a", Area::Outbox), dir(&nodes, "a/out/log", "a", Area::Log)]);
        assert_eq!(watcher.watched(), 4);
        assert_eq!(watcher.take(), woke(&[spot("a", Area::Log)]), "the new watch; the file came before it");
        let mut segment = std::fs::OpenOptions::new().append(true).open(nodes.join("a/out/log/seg")).unwrap();
        std::io::Write::write_all(&mut segment, b"frame").unwrap();
        assert_eq!(watcher.take(), woke(&[spot("a", Area::Log)]), "an append names the log alone");

        // A new node directory.
        std::fs::create_dir_all(nodes.join("b")).unwrap();
        assert_eq!(watcher.take(), Woken { news: true, nodes: true, dirs: true, ..Woken::default() });
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn each_spool_written_is_named_once_and_the_forwarded_receipts_apart() {
        let root = temp_dir("spots");
        let nodes = root.join("nodes");
        for rel in ["a/out/new", "a/rcpt/new", "b/rcpt/new", "fwd/new"] {
            std::fs::create_dir_all(nodes.join(rel)).unwrap();
        }
        let mut watcher = Watcher::new(nodes.clone()).unwrap();
        watcher.watch([
            dir(&nodes, "a/out/new", "a", Area::Outbox),
            dir(&nodes, "a/rcpt/new", "a", Area::Receipts),
            dir(&nodes, "b/rcpt/new", "b", Area::Receipts),
            (nodes.join("fwd/new"), Tag::Forwarded),
        ]);
        watcher.take();
        for i in 0..3 {
            std::fs::write(nodes.join(format!("b/rcpt/new/r{i}")), b"r").unwrap();
        }
        std::fs::write(nodes.join("a/out/new/f"), b"f").unwrap();
        let mut woken = watcher.take();
        woken.spots.sort();
        assert_eq!(woken, woke(&[spot("a", Area::Outbox), spot("b", Area::Receipts)]));
        std::fs::write(nodes.join("fwd/new/x"), b"x").unwrap();
        assert_eq!(watcher.take(), Woken { news: true, forwarded: true, ..Woken::default() });
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn a_registration_written_into_a_watched_node_directory_says_nodes() {
        // A node makes its directory first and renames its node.toml in after: the registry read
        // at the directory's event finds no registration yet, so the rename must wake it again
        // (else a new node's first datagram waited for the once-a-second refresh).
        let root = temp_dir("registration");
        let nodes = root.join("nodes");
        std::fs::create_dir_all(&nodes).unwrap();
        let mut watcher = Watcher::new(nodes.clone()).unwrap();
        std::fs::create_dir_all(nodes.join("b/out/new")).unwrap();
        assert!(watcher.take().nodes);
        watcher.watch([dir(&nodes, "b", "b", Area::Tree), dir(&nodes, "b/out/new", "b", Area::Outbox)]);
        watcher.take();
        std::fs::write(nodes.join("b/out/new/f"), b"f").unwrap();
        assert_eq!(watcher.take(), woke(&[spot("b", Area::Outbox)]), "an outbox file is no registration");
        std::fs::write(nodes.join("b/.node.toml.tmp"), b"addr = \"10.77.0.2\"\n").unwrap();
        watcher.take();
        std::fs::rename(nodes.join("b/.node.toml.tmp"), nodes.join("b/node.toml")).unwrap();
        assert_eq!(watcher.take(), Woken { nodes: true, ..woke(&[spot("b", Area::Tree)]) });
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn a_symlink_where_a_directory_belongs_is_not_watched() {
        let root = temp_dir("symlink");
        let nodes = root.join("nodes");
        std::fs::create_dir_all(nodes.join("a/out")).unwrap();
        std::fs::create_dir_all(root.join("secret")).unwrap();
        std::os::unix::fs::symlink(root.join("secret"), nodes.join("a/out/new")).unwrap();
        let mut watcher = Watcher::new(nodes.clone()).unwrap();
        watcher.watch([dir(&nodes, "a/out/new", "a", Area::Outbox)]);
        assert_eq!(watcher.watched(), 1, "only the nodes directory");
        std::fs::write(root.join("secret/x"), b"x").unwrap();
        assert_eq!(watcher.take(), Woken::default());
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn a_directory_removed_and_made_again_is_watched_again() {
        let root = temp_dir("again");
        let nodes = root.join("nodes");
        std::fs::create_dir_all(nodes.join("a/rcpt/new")).unwrap();
        let mut watcher = Watcher::new(nodes.clone()).unwrap();
        watcher.watch([dir(&nodes, "a/rcpt/new", "a", Area::Receipts)]);
        assert_eq!(watcher.watched(), 2);
        watcher.take();
        std::fs::remove_dir_all(nodes.join("a")).unwrap();
        assert!(watcher.take().spots.contains(&spot("a", Area::Tree)), "a removed spool is read again");
        assert_eq!(watcher.watched(), 1, "the removed directory's watch was not forgotten");
        std::fs::create_dir_all(nodes.join("a/rcpt/new")).unwrap();
        watcher.take();
        watcher.watch([dir(&nodes, "a/rcpt/new", "a", Area::Receipts)]);
        assert_eq!(watcher.watched(), 2);
        watcher.take();
        std::fs::write(nodes.join("a/rcpt/new/r"), b"r").unwrap();
        assert_eq!(watcher.take(), woke(&[spot("a", Area::Receipts)]));
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn a_watched_directory_moved_away_is_forgotten_so_that_its_path_is_watched_again() {
        let root = temp_dir("moved");
        let nodes = root.join("nodes");
        std::fs::create_dir_all(nodes.join("a/out/new")).unwrap();
        let mut watcher = Watcher::new(nodes.clone()).unwrap();
        watcher.watch([dir(&nodes, "a/out", "a", Area::Tree), dir(&nodes, "a/out/new", "a", Area::Outbox)]);
        watcher.take();
        std::fs::rename(nodes.join("a/out/new"), nodes.join("a/out/old")).unwrap();
        assert_eq!(watcher.take(), Woken { dirs: true, ..woke(&[spot("a", Area::Tree)]) });
        assert!(!watcher.covers(&nodes.join("a/out/new")), "the moved directory's watch still stands for its path");
        std::fs::write(nodes.join("a/out/old/f"), b"f").unwrap();
        assert_eq!(watcher.take(), Woken::default(), "the moved directory still reports");
        std::fs::create_dir_all(nodes.join("a/out/new")).unwrap();
        watcher.take();
        watcher.watch([dir(&nodes, "a/out/new", "a", Area::Outbox)]);
        watcher.take();
        std::fs::write(nodes.join("a/out/new/g"), b"g").unwrap();
        assert_eq!(watcher.take(), woke(&[spot("a", Area::Outbox)]));
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn moving_a_directory_away_forgets_the_watches_under_it_too() {
        let root = temp_dir("moved-parent");
        let nodes = root.join("nodes");
        std::fs::create_dir_all(nodes.join("a/out/new")).unwrap();
        let mut watcher = Watcher::new(nodes.clone()).unwrap();
        watcher.watch([dir(&nodes, "a/out", "a", Area::Tree), dir(&nodes, "a/out/new", "a", Area::Outbox)]);
        watcher.take();
        std::fs::rename(nodes.join("a/out"), nodes.join("a/gone")).unwrap();
        std::fs::create_dir_all(nodes.join("a/out/new")).unwrap();
        assert!(watcher.take().dirs);
        assert!(!watcher.covers(&nodes.join("a/out/new")), "a watch under the moved directory stands for its path");
        std::fs::write(nodes.join("a/gone/new/f"), b"f").unwrap();
        assert!(watcher.take().spots.is_empty(), "a directory moved away still reports");
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn a_directory_reached_again_through_a_symlink_keeps_its_first_path() {
        let root = temp_dir("alias");
        let nodes = root.join("nodes");
        std::fs::create_dir_all(nodes.join("b/out/new")).unwrap();
        std::fs::create_dir_all(nodes.join("a")).unwrap();
        std::os::unix::fs::symlink(nodes.join("b/out"), nodes.join("a/out")).unwrap();
        let mut watcher = Watcher::new(nodes.clone()).unwrap();
        watcher.watch([dir(&nodes, "b/out/new", "b", Area::Outbox), dir(&nodes, "a/out/new", "a", Area::Outbox)]);
        watcher.take();
        assert!(!watcher.covers(&nodes.join("a/out/new")));
        std::fs::write(nodes.join("b/out/new/f"), b"f").unwrap();
        assert_eq!(watcher.take(), woke(&[spot("b", Area::Outbox)]), "b's writes were taken for a's");
        std::fs::remove_dir_all(root).unwrap();
    }
}
