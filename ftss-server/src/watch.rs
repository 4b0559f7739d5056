//! Wakeups from the volume: inotify watches on the directories nodes write into (each owned
//! node's directory, its outbox with its files and log, its receipts), as a hint that a cycle has
//! something to read.
//!
//! The server runs on the array, where the NFS and SMB servers (kernel nfsd, nfs-ganesha, smbd)
//! write through the local file system, so their clients' writes raise inotify events there as
//! a local write does. The hint is never relied on: the server still reads the volume at every
//! poll interval, which covers a watch that could not be added, events lost when the kernel's
//! queue overflowed, and a server that is itself a network client of the volume (where inotify
//! sees only its own writes).

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};

/// Most directories watched; past it the poll covers the rest.
pub const WATCHES_MAX: usize = 1 << 16;
/// Most event reads per call of [`Watcher::take`] (each reads up to a few KiB of events).
const READS_PER_TAKE_MAX: usize = 64;

/// What a batch of events said.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Woken {
    /// Something was written, created or renamed in a watched directory (or events were lost).
    pub news: bool,
    /// A node directory appeared or was renamed in, or a registration was written in one (the
    /// registry should be read again).
    pub nodes: bool,
    /// A directory appeared in a watched one (one still to watch may exist now).
    pub dirs: bool,
}

/// The volume's watches.
pub struct Watcher {
    inotify: Inotify,
    /// The directory holding the node directories (its events mean a node came or went).
    nodes_dir: PathBuf,
    nodes_wd: Option<WatchDescriptor>,
    watched: HashMap<WatchDescriptor, PathBuf>,
    paths: HashSet<PathBuf>,
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
            self.nodes_wd = self.add(&nodes_dir);
        }
    }

    /// Watches each of `dirs` not watched yet. One that does not exist yet (a node's log
    /// directory before its first send) is tried again at the next call.
    pub fn watch(&mut self, dirs: impl IntoIterator<Item = PathBuf>) {
        self.watch_nodes_dir();
        for dir in dirs {
            if !self.paths.contains(&dir) {
                self.add(&dir);
            }
        }
    }

    fn add(&mut self, dir: &Path) -> Option<WatchDescriptor> {
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
            | AddWatchFlags::IN_ONLYDIR
            | AddWatchFlags::IN_DONT_FOLLOW;
        match self.inotify.add_watch(dir, mask) {
            Ok(wd) => {
                self.watched.insert(wd, dir.to_path_buf());
                self.paths.insert(dir.to_path_buf());
                Some(wd)
            }
            // Not there yet, or not a directory: tried again later; nothing to report.
            Err(Errno::ENOENT | Errno::ENOTDIR) => None,
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
            && self.watched.get(&event.wd).and_then(|dir| dir.parent()) == Some(self.nodes_dir.as_path())
    }

    /// Reads the waiting events (without blocking) and says what they mean.
    pub fn take(&mut self) -> Woken {
        let mut woken = Woken::default();
        for _ in 0..READS_PER_TAKE_MAX {
            let events = match self.inotify.read_events() {
                Ok(events) if !events.is_empty() => events,
                // EAGAIN: none left. Anything else: the next poll reads the volume anyway.
                _ => break,
            };
            for event in events {
                if event.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                    woken = Woken { news: true, nodes: true, dirs: true };
                    continue;
                }
                if event.mask.contains(AddWatchFlags::IN_IGNORED) {
                    // The directory went (or was unmounted): forget it, so that it is watched
                    // again if it comes back.
                    if let Some(path) = self.watched.remove(&event.wd) {
                        self.paths.remove(&path);
                    }
                    if self.nodes_wd == Some(event.wd) {
                        self.nodes_wd = None;
                    }
                    continue;
                }
                woken.news = true;
                if event.mask.contains(AddWatchFlags::IN_ISDIR) {
                    woken.dirs = true;
                }
                if self.nodes_wd == Some(event.wd) || self.is_registration(&event) {
                    woken.nodes = true;
                }
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

    #[test]
    fn writes_creations_and_renames_in_watched_directories_wake_and_others_do_not() {
        let root = temp_dir("events");
        let nodes = root.join("nodes");
        std::fs::create_dir_all(nodes.join("a/out/new")).unwrap();
        std::fs::create_dir_all(root.join("elsewhere")).unwrap();
        let mut watcher = Watcher::new(nodes.clone()).unwrap();
        watcher.watch([nodes.join("a/out/new"), nodes.join("a/out/log")]);
        assert_eq!(watcher.watched(), 2, "the nodes directory and the outbox; the log does not exist yet");
        assert_eq!(watcher.take(), Woken::default());

        std::fs::write(root.join("elsewhere/x"), b"x").unwrap();
        assert_eq!(watcher.take(), Woken::default(), "an unwatched directory woke the server");

        std::fs::write(root.join("elsewhere/f"), b"f").unwrap();
        std::fs::rename(root.join("elsewhere/f"), nodes.join("a/out/new/f")).unwrap();
        assert_eq!(watcher.take(), Woken { news: true, nodes: false, dirs: false });

        // The log directory appears (in the outbox, which is watched too): watched at the next
        // call, and an append to a file in it wakes.
        watcher.watch([nodes.join("a/out")]);
        watcher.take();
        std::fs::create_dir_all(nodes.join("a/out/log")).unwrap();
        assert_eq!(watcher.take(), Woken { news: true, nodes: false, dirs: true });
        std::fs::write(nodes.join("a/out/log/seg"), b"").unwrap();
        watcher.watch([nodes.join("a/out/new"), nodes.join("a/out/log")]);
        assert_eq!(watcher.watched(), 4);
        watcher.take();
        let mut segment = std::fs::OpenOptions::new().append(true).open(nodes.join("a/out/log/seg")).unwrap();
        std::io::Write::write_all(&mut segment, b"frame").unwrap();
        assert_eq!(watcher.take(), Woken { news: true, nodes: false, dirs: false });

        // A new node directory.
        std::fs::create_dir_all(nodes.join("b")).unwrap();
        assert_eq!(watcher.take(), Woken { news: true, nodes: true, dirs: true });
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
        watcher.watch([nodes.join("b"), nodes.join("b/out/new")]);
        std::fs::write(nodes.join("b/out/new/f"), b"f").unwrap();
        assert_eq!(
            watcher.take(),
            Woken { news: true, nodes: false, dirs: false },
            "an outbox file is no registration"
        );
        std::fs::write(nodes.join("b/.node.toml.tmp"), b"addr = \"10.77.0.2\"\n").unwrap();
        watcher.take();
        std::fs::rename(nodes.join("b/.node.toml.tmp"), nodes.join("b/node.toml")).unwrap();
        assert_eq!(watcher.take(), Woken { news: true, nodes: true, dirs: false });
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
        watcher.watch([nodes.join("a/out/new")]);
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
        watcher.watch([nodes.join("a/rcpt/new")]);
        assert_eq!(watcher.watched(), 2);
        std::fs::remove_dir_all(nodes.join("a")).unwrap();
        watcher.take();
        assert_eq!(watcher.watched(), 1, "the removed directory's watch was not forgotten");
        std::fs::create_dir_all(nodes.join("a/rcpt/new")).unwrap();
        watcher.take();
        watcher.watch([nodes.join("a/rcpt/new")]);
        assert_eq!(watcher.watched(), 2);
        std::fs::write(nodes.join("a/rcpt/new/r"), b"r").unwrap();
        assert!(watcher.take().news);
        std::fs::remove_dir_all(root).unwrap();
    }
}
