//! The simulated disk: an in-memory file system that keeps what was synced apart from what was
//! only written, and fails, tears and crashes on a schedule drawn from one seed.
//!
//! - A file's data is durable once the file is synced; a name (create, rename, remove) once its
//!   directory is synced. A rename from one directory to another is atomic, as in a journaling
//!   file system: syncing either directory makes both sides durable. Directories themselves are durable when made (the queue's are set up
//!   before it runs).
//! - [`SimDisk::crash`] is a power loss: every name goes back to its last synced state, and every
//!   file keeps its synced bytes plus, as a real disk may, none, some or all of what was written
//!   after them, the last sector of that sometimes garbage (a torn write). Bytes overwritten in
//!   place and not synced come back old or new.
//! - Any call can fail with EIO, and writes with ENOSPC, at the rate the [`Faults`] say; renames
//!   and removes can fail after doing their work (an NFS reply lost and the retransmission
//!   refused). Writes past the capacity fail with ENOSPC.
//! - The process dies at the call numbered [`Faults::crash_at`]: that call unwinds with a
//!   [`Crash`] payload (no panic message), and the simulator catches it, crashes the disk and
//!   starts the code again.
//!
//! - [`SimDisk::break_path`] fails every call on one path (a bad block under one file).
//! - Listings lag, as an NFS client's cached directory does: under the root set with
//!   [`SimDisk::set_lagging_root`] (the volume), at the rate [`Faults::stale_listing_per_million`]
//!   says, a listing is the one this directory gave last time, missing names made since and still
//!   showing names removed since.
//! - The disk keeps the simulated clock ([`SimDisk::set_clock`]): the wall clock the code reads
//!   through [`crate::disk::unix_now_us`], a monotonic clock, and files' modification times.
//!
//! Not simulated: hard links (EPERM), symlinks, renaming directories, and permissions.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use super::{Meta, OpenOptions};

/// The unit a disk writes whole: a power loss keeps each sector old or new, never part of one.
const SECTOR_BYTES: usize = 512;

/// The payload a simulated crash unwinds with.
#[derive(Debug)]
pub struct Crash;

/// Fault rates and the crash point of one run.
#[derive(Debug, Clone, Copy, Default)]
pub struct Faults {
    /// Calls failing with EIO (or ENOSPC, for writes), per million.
    pub error_per_million: u32,
    /// Renames and removes that fail after doing their work, per million.
    pub late_error_per_million: u32,
    /// The call (counted from 1 over the disk's life) at which the process dies.
    pub crash_at: Option<u64>,
    /// Listings that return the directory's previous listing, per million (only under the root
    /// set by [`SimDisk::set_lagging_root`]: the network volume's, not a local disk's).
    pub stale_listing_per_million: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Entry {
    File(u64),
    Dir,
}

#[derive(Debug, Default)]
struct Inode {
    current: Vec<u8>,
    durable: Vec<u8>,
    /// The wall clock at the last change of the data, in microseconds.
    modified_us: u64,
}

#[derive(Debug)]
struct Open {
    path: PathBuf,
    inode: u64,
    position: u64,
    read: bool,
    write: bool,
    append: bool,
}

/// The kinds of call, for fault injection. Listing a directory, reading a file and its metadata
/// are reads; making, renaming and removing names are name calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    Read,
    Write,
    Sync,
    Name,
}

#[derive(Debug)]
struct State {
    rng: u64,
    inodes: HashMap<u64, Inode>,
    next_inode: u64,
    current: BTreeMap<PathBuf, Entry>,
    durable: BTreeMap<PathBuf, Entry>,
    open: HashMap<u64, Open>,
    next_handle: u64,
    capacity: u64,
    calls: u64,
    faults: Faults,
    errors_injected: u64,
    /// Bumped by every crash: handles from before it are dead.
    boot: u64,
    /// Paths whose every call fails with this errno (a bad block under one file, a directory
    /// that cannot be read), until [`SimDisk::repair`].
    broken: Vec<(PathBuf, Option<Call>, i32)>,
    /// The next call of a kind on a path fails with this errno, or kills the process (`None`),
    /// once.
    once: Vec<(PathBuf, Call, Option<i32>)>,
    /// Renames across directories not yet made durable: a journaling file system commits both
    /// sides at once, so syncing either directory makes the whole rename durable.
    moves: Vec<(PathBuf, PathBuf)>,
    /// Where listings may lag (a network mount); nowhere if `None`.
    lagging_root: Option<PathBuf>,
    /// The last listing each directory gave (what a lagging listing returns again).
    listings: HashMap<PathBuf, Vec<OsString>>,
    /// The simulated wall clock, in microseconds since the Unix epoch (may step back).
    unix_us: u64,
    /// The simulated monotonic clock, in microseconds.
    monotonic_us: u64,
}

/// A simulated disk; clones share it.
#[derive(Debug, Clone)]
pub struct SimDisk(Arc<Mutex<State>>);

/// An open simulated file.
#[derive(Debug)]
pub struct Handle {
    id: u64,
    boot: u64,
    disk: SimDisk,
}

thread_local! {
    static CURRENT: RefCell<Option<SimDisk>> = const { RefCell::new(None) };
}

/// The disk installed on this thread, if any.
pub fn current() -> Option<SimDisk> {
    CURRENT.with(|current| current.borrow().clone())
}

/// While this lives, the thread's file calls in [`crate::disk`] go to the simulated disk.
pub struct Installed(());

impl Drop for Installed {
    fn drop(&mut self) {
        CURRENT.with(|current| current.borrow_mut().take());
    }
}

/// Sends this thread's [`crate::disk`] calls to `disk` until the guard is dropped.
pub fn install(disk: &SimDisk) -> Installed {
    CURRENT.with(|current| *current.borrow_mut() = Some(disk.clone()));
    Installed(())
}

fn errno(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

fn parent(path: &Path) -> PathBuf {
    path.parent().map_or_else(|| PathBuf::from("/"), Path::to_path_buf)
}

impl State {
    fn next_random(&mut self) -> u64 {
        // splitmix64
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn chance(&mut self, per_million: u32) -> bool {
        per_million > 0 && self.next_random() % 1_000_000 < u64::from(per_million)
    }

    fn used(&self) -> u64 {
        self.inodes.values().map(|inode| inode.current.len() as u64).sum()
    }

    fn is_dir(&self, path: &Path) -> bool {
        path == Path::new("/") || self.current.get(path) == Some(&Entry::Dir)
    }

    fn links(&self, inode: u64) -> u64 {
        self.current.values().filter(|entry| **entry == Entry::File(inode)).count() as u64
    }

    fn open_file(&mut self, id: u64, boot: u64) -> io::Result<&mut Open> {
        if boot != self.boot {
            return Err(errno(libc::EBADF));
        }
        self.open.get_mut(&id).ok_or_else(|| errno(libc::EBADF))
    }

    /// Grows `inode` to hold `end` bytes, within the capacity.
    fn make_room(&mut self, inode: u64, end: u64) -> io::Result<()> {
        let len = self.inodes[&inode].current.len() as u64;
        if end > len && self.used() + (end - len) > self.capacity {
            return Err(errno(libc::ENOSPC));
        }
        Ok(())
    }

    fn write_at(&mut self, inode: u64, bytes: &[u8], offset: u64) -> io::Result<()> {
        let end = offset + bytes.len() as u64;
        self.make_room(inode, end)?;
        let data = &mut self.inodes.get_mut(&inode).expect("open inode").current;
        if data.len() < end as usize {
            data.resize(end as usize, 0);
        }
        data[offset as usize..end as usize].copy_from_slice(bytes);
        self.touch(inode);
        Ok(())
    }

    fn touch(&mut self, inode: u64) {
        let now = self.unix_us;
        if let Some(inode) = self.inodes.get_mut(&inode) {
            inode.modified_us = now;
        }
    }

    fn meta(&self, inode: u64) -> Meta {
        let data = &self.inodes[&inode];
        Meta {
            len: data.current.len() as u64,
            nlink: self.links(inode),
            is_dir: false,
            is_file: true,
            is_symlink: false,
            ino: inode,
            uid: nix::unistd::geteuid().as_raw(),
            modified: std::time::UNIX_EPOCH + std::time::Duration::from_micros(data.modified_us),
        }
    }

    /// What a file holds after a power loss.
    fn survivor(&mut self, durable: &[u8], current: &[u8]) -> Vec<u8> {
        if current.len() > durable.len() && current.starts_with(durable) {
            let extra = current.len() - durable.len();
            let kept = match self.next_random() % 3 {
                0 => 0,
                1 => (self.next_random() % (extra as u64 + 1)) as usize,
                _ => extra,
            };
            let mut bytes = current[..durable.len() + kept].to_vec();
            if kept > 0 && self.next_random().is_multiple_of(8) {
                let torn = kept.min(1 + (self.next_random() % 16) as usize);
                let len = bytes.len();
                for byte in &mut bytes[len - torn..] {
                    *byte = self.next_random() as u8;
                }
            }
            bytes
        } else if current != durable {
            match self.next_random() % 3 {
                0 => current.to_vec(),
                1 => durable.to_vec(),
                // An overwrite (or a write past the end with one) lands sector by sector, in no
                // order: each sector is the new one or the old one, and one past the old end
                // that did not land reads as zeros.
                _ => {
                    let len = if self.next_random().is_multiple_of(2) { current.len() } else { durable.len() };
                    let mut bytes = vec![0u8; len];
                    for start in (0..len).step_by(SECTOR_BYTES) {
                        let end = (start + SECTOR_BYTES).min(len);
                        let source = if self.next_random().is_multiple_of(2) { current } else { durable };
                        for (at, byte) in bytes[start..end].iter_mut().enumerate() {
                            *byte = source.get(start + at).copied().unwrap_or(0);
                        }
                    }
                    bytes
                }
            }
        } else {
            durable.to_vec()
        }
    }
}

impl SimDisk {
    /// The disk's state (a crash unwinds only outside it, so the lock is never poisoned by one).
    fn state(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// An empty disk of `capacity` bytes whose randomness comes from `seed`.
    pub fn new(seed: u64, capacity: u64) -> SimDisk {
        SimDisk(Arc::new(Mutex::new(State {
            rng: seed,
            inodes: HashMap::new(),
            next_inode: 1,
            current: BTreeMap::new(),
            durable: BTreeMap::new(),
            open: HashMap::new(),
            next_handle: 1,
            capacity,
            calls: 0,
            faults: Faults::default(),
            errors_injected: 0,
            boot: 0,
            broken: Vec::new(),
            once: Vec::new(),
            listings: HashMap::new(),
            lagging_root: None,
            moves: Vec::new(),
            unix_us: 1_800_000_000_000_000,
            monotonic_us: 1_000_000,
        })))
    }

    /// Sets the simulated clocks: the wall clock (microseconds since the epoch) and the monotonic
    /// one (which the caller keeps from going back).
    pub fn set_clock(&self, unix_us: u64, monotonic_us: u64) {
        let mut state = self.state();
        state.unix_us = unix_us;
        state.monotonic_us = monotonic_us;
    }

    /// Listings of directories under `root` may lag (see [`Faults::stale_listing_per_million`]).
    pub fn set_lagging_root(&self, root: impl Into<PathBuf>) {
        self.state().lagging_root = Some(root.into());
    }

    pub fn unix_now_us(&self) -> u64 {
        self.state().unix_us
    }

    pub fn monotonic_us(&self) -> u64 {
        self.state().monotonic_us
    }

    pub fn set_faults(&self, faults: Faults) {
        self.state().faults = faults;
    }

    pub fn set_capacity(&self, capacity: u64) {
        self.state().capacity = capacity;
    }

    /// Calls made so far.
    pub fn calls(&self) -> u64 {
        self.state().calls
    }

    /// Errors injected so far.
    pub fn errors_injected(&self) -> u64 {
        self.state().errors_injected
    }

    /// A number from the disk's random stream.
    pub fn random(&self) -> u64 {
        self.state().next_random()
    }

    /// Every file with its length, and the durable length (for tracing a seed).
    pub fn describe(&self) -> String {
        let state = self.state();
        let mut text = String::new();
        for (path, entry) in &state.current {
            if let Entry::File(inode) = entry {
                let inode = &state.inodes[inode];
                let named = if state.durable.get(path) == Some(entry) { "" } else { " (name not synced)" };
                text.push_str(&format!("{} {}/{}{named}; ", path.display(), inode.current.len(), inode.durable.len()));
            }
        }
        text
    }

    /// The files directly in `dir` with their synced lengths, and what a file holds now: for the
    /// simulator's own checks (no fault, no call counted).
    pub fn files_in(&self, dir: &Path) -> Vec<(PathBuf, u64)> {
        let state = self.state();
        state
            .current
            .iter()
            .filter(|(path, _)| path.parent() == Some(dir))
            .filter_map(|(path, entry)| match entry {
                Entry::File(inode) => Some((path.clone(), state.inodes[inode].durable.len() as u64)),
                Entry::Dir => None,
            })
            .collect()
    }

    /// What the file at `path` holds now (no fault, no call counted).
    pub fn peek(&self, path: &Path) -> Option<Vec<u8>> {
        let state = self.state();
        match state.current.get(path) {
            Some(Entry::File(inode)) => Some(state.inodes[inode].current.clone()),
            _ => None,
        }
    }

    /// Bit rot under a file: flips the byte at `offset` in what was synced (and in what was
    /// written since, if it reaches that far). False if the file has no synced byte there.
    pub fn rot(&self, path: &Path, offset: u64) -> bool {
        let mut state = self.state();
        let Some(Entry::File(inode)) = state.current.get(path).copied() else { return false };
        let inode = state.inodes.get_mut(&inode).expect("named inode");
        let at = offset as usize;
        if at >= inode.durable.len() {
            return false;
        }
        inode.durable[at] ^= 0x5a;
        if let Some(byte) = inode.current.get_mut(at) {
            *byte ^= 0x5a;
        }
        true
    }

    /// Power loss: see the module notes. Open handles die.
    pub fn crash(&self) {
        let mut state = self.state();
        let state = &mut *state;
        state.current = state.durable.clone();
        state.open.clear();
        state.listings.clear();
        state.moves.clear();
        state.boot += 1;
        let live: std::collections::HashSet<u64> = state
            .current
            .values()
            .filter_map(|entry| match entry {
                Entry::File(inode) => Some(*inode),
                Entry::Dir => None,
            })
            .collect();
        state.inodes.retain(|inode, _| live.contains(inode));
        let mut inodes: Vec<u64> = state.inodes.keys().copied().collect();
        inodes.sort_unstable();
        for inode in inodes {
            let (durable, current) = {
                let entry = state.inodes.get_mut(&inode).expect("listed");
                (std::mem::take(&mut entry.durable), std::mem::take(&mut entry.current))
            };
            let bytes = state.survivor(&durable, &current);
            let entry = state.inodes.get_mut(&inode).expect("listed");
            entry.durable = bytes.clone();
            entry.current = bytes;
        }
    }

    /// Every call on `path` (by name or through a handle opened by that name) fails with `errno`
    /// from now on, until [`SimDisk::repair`].
    pub fn break_path(&self, path: impl Into<PathBuf>, errno: i32) {
        self.state().broken.push((path.into(), None, errno));
    }

    /// Calls of one kind on `path` fail with `errno`, until [`SimDisk::repair`].
    pub fn break_calls(&self, path: impl Into<PathBuf>, call: Call, errno: i32) {
        self.state().broken.push((path.into(), Some(call), errno));
    }

    /// The next call of kind `call` on `path` fails with `errno`; the ones after it work.
    pub fn fail_next(&self, path: impl Into<PathBuf>, call: Call, errno: i32) {
        self.state().once.push((path.into(), call, Some(errno)));
    }

    /// The process dies at the next call of kind `call` on `path` (before it does anything), as
    /// `Faults::crash_at` does at a call number.
    pub fn crash_at_next(&self, path: impl Into<PathBuf>, call: Call) {
        self.state().once.push((path.into(), call, None));
    }

    /// Calls on every broken path work again.
    pub fn repair(&self) {
        self.state().broken.clear();
    }

    /// Counts a call on `path` and decides its fate: go on, fail, or die here.
    fn enter(&self, call: Call, path: &Path) -> io::Result<()> {
        let verdict = {
            let mut state = self.state();
            state.calls += 1;
            let (calls, faults) = (state.calls, state.faults);
            let once = state.once.iter().position(|(once, kind, _)| once == path && *kind == call);
            let once = once.map(|at| state.once.remove(at).2);
            let broken = state
                .broken
                .iter()
                .find(|(broken, kind, _)| broken == path && kind.is_none_or(|kind| kind == call))
                .map(|(_, _, errno)| *errno);
            if faults.crash_at.is_some_and(|at| calls >= at) || once == Some(None) {
                None
            } else if let Some(Some(code)) = once {
                Some(Err(errno(code)))
            } else if let Some(code) = broken {
                Some(Err(errno(code)))
            } else if state.chance(faults.error_per_million) {
                state.errors_injected += 1;
                let no_space = call == Call::Write && state.next_random().is_multiple_of(2);
                Some(Err(errno(if no_space { libc::ENOSPC } else { libc::EIO })))
            } else {
                Some(Ok(()))
            }
        };
        // Unwound outside the borrow, so that handles dropped on the way can reach the disk.
        verdict.unwrap_or_else(|| std::panic::resume_unwind(Box::new(Crash)))
    }

    /// After a rename or remove did its work: perhaps report a failure anyway.
    fn late(&self) -> io::Result<()> {
        let mut state = self.state();
        let rate = state.faults.late_error_per_million;
        if state.chance(rate) {
            state.errors_injected += 1;
            return Err(errno(libc::EIO));
        }
        Ok(())
    }

    pub(crate) fn open(&self, path: &Path, options: OpenOptions) -> io::Result<Handle> {
        self.enter(if options.write || options.append { Call::Write } else { Call::Read }, path)?;
        let mut state = self.state();
        if !state.is_dir(&parent(path)) {
            return Err(errno(libc::ENOENT));
        }
        let inode = match state.current.get(path).copied() {
            Some(Entry::Dir) => return Err(errno(libc::EISDIR)),
            Some(Entry::File(_)) if options.create_new => return Err(errno(libc::EEXIST)),
            Some(Entry::File(inode)) => {
                if options.truncate {
                    state.inodes.get_mut(&inode).expect("named inode").current.clear();
                    state.touch(inode);
                }
                inode
            }
            None if options.create || options.create_new => {
                let inode = state.next_inode;
                state.next_inode += 1;
                let modified_us = state.unix_us;
                state.inodes.insert(inode, Inode { modified_us, ..Inode::default() });
                state.current.insert(path.to_path_buf(), Entry::File(inode));
                inode
            }
            None => return Err(errno(libc::ENOENT)),
        };
        let id = state.next_handle;
        state.next_handle += 1;
        let open = Open {
            path: path.to_path_buf(),
            inode,
            position: 0,
            read: options.read,
            write: options.write || options.append,
            append: options.append,
        };
        state.open.insert(id, open);
        Ok(Handle { id, boot: state.boot, disk: self.clone() })
    }

    pub(crate) fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        self.enter(Call::Sync, dir)?;
        let mut state = self.state();
        if !state.is_dir(dir) {
            return Err(errno(libc::ENOENT));
        }
        let state = &mut *state;
        let children = |map: &BTreeMap<PathBuf, Entry>| -> Vec<PathBuf> {
            map.keys().filter(|path| path.parent() == Some(dir)).cloned().collect()
        };
        for path in children(&state.durable) {
            if !state.current.contains_key(&path) {
                state.durable.remove(&path);
            }
        }
        for path in children(&state.current) {
            state.durable.insert(path.clone(), state.current[&path]);
        }
        // The other side of each rename into or out of this directory commits with it.
        let (moves, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut state.moves)
            .into_iter()
            .partition(|(from, to)| parent(from) == dir || parent(to) == dir);
        state.moves = kept;
        for (from, to) in moves {
            for path in [from, to] {
                match state.current.get(&path) {
                    Some(entry) => state.durable.insert(path, *entry),
                    None => state.durable.remove(&path),
                };
            }
        }
        Ok(())
    }

    pub(crate) fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.enter(Call::Name, from)?;
        {
            let mut state = self.state();
            let entry = state.current.get(from).copied().ok_or_else(|| errno(libc::ENOENT))?;
            if entry == Entry::Dir {
                return Err(errno(libc::EINVAL));
            }
            if !state.is_dir(&parent(to)) {
                return Err(errno(libc::ENOENT));
            }
            if state.current.get(to) == Some(&Entry::Dir) {
                return Err(errno(libc::EISDIR));
            }
            state.current.remove(from);
            state.current.insert(to.to_path_buf(), entry);
            if parent(from) != parent(to) {
                state.moves.push((from.to_path_buf(), to.to_path_buf()));
            }
        }
        self.late()
    }

    pub(crate) fn remove(&self, path: &Path, dir: bool) -> io::Result<()> {
        self.enter(Call::Name, path)?;
        {
            let mut state = self.state();
            match (state.current.get(path).copied(), dir) {
                (None, _) => return Err(errno(libc::ENOENT)),
                (Some(Entry::Dir), false) => return Err(errno(libc::EISDIR)),
                (Some(Entry::File(_)), true) => return Err(errno(libc::ENOTDIR)),
                (Some(Entry::Dir), true) => {
                    if state.current.keys().any(|child| child.parent() == Some(path)) {
                        return Err(errno(libc::ENOTEMPTY));
                    }
                    state.current.remove(path);
                    state.durable.remove(path);
                }
                (Some(Entry::File(_)), false) => {
                    state.current.remove(path);
                }
            }
        }
        self.late()
    }

    pub(crate) fn create_dir(&self, path: &Path, all: bool) -> io::Result<()> {
        self.enter(Call::Name, path)?;
        let mut state = self.state();
        if state.is_dir(path) {
            return if all { Ok(()) } else { Err(errno(libc::EEXIST)) };
        }
        if state.current.contains_key(path) {
            return Err(errno(libc::EEXIST));
        }
        let missing: Vec<PathBuf> =
            path.ancestors().skip(1).filter(|dir| !state.is_dir(dir)).map(PathBuf::from).collect();
        if !missing.is_empty() && !all {
            return Err(errno(libc::ENOENT));
        }
        for dir in missing.iter().rev().map(PathBuf::as_path).chain([path]) {
            if state.current.contains_key(dir) {
                return Err(errno(libc::ENOTDIR));
            }
            state.current.insert(dir.to_path_buf(), Entry::Dir);
            state.durable.insert(dir.to_path_buf(), Entry::Dir);
        }
        Ok(())
    }

    pub(crate) fn metadata(&self, path: &Path) -> io::Result<Meta> {
        self.enter(Call::Read, path)?;
        let state = self.state();
        if state.is_dir(path) {
            return Ok(Meta {
                len: 0,
                nlink: 1,
                is_dir: true,
                is_file: false,
                is_symlink: false,
                ino: 0,
                uid: nix::unistd::geteuid().as_raw(),
                modified: std::time::UNIX_EPOCH,
            });
        }
        match state.current.get(path) {
            Some(Entry::File(inode)) => Ok(state.meta(*inode)),
            _ => Err(errno(libc::ENOENT)),
        }
    }

    pub(crate) fn touch(&self, path: &Path) -> io::Result<()> {
        self.enter(Call::Write, path)?;
        let mut state = self.state();
        match state.current.get(path).copied() {
            Some(Entry::File(inode)) => {
                state.touch(inode);
                Ok(())
            }
            Some(Entry::Dir) => Ok(()),
            None => Err(errno(libc::ENOENT)),
        }
    }

    pub(crate) fn list(&self, dir: &Path) -> io::Result<Vec<OsString>> {
        self.enter(Call::Read, dir)?;
        let mut state = self.state();
        if !state.is_dir(dir) {
            return Err(errno(if state.current.contains_key(dir) { libc::ENOTDIR } else { libc::ENOENT }));
        }
        let lags = state.lagging_root.as_ref().is_some_and(|root| dir.starts_with(root));
        let rate = if lags { state.faults.stale_listing_per_million } else { 0 };
        if state.listings.contains_key(dir) && state.chance(rate) {
            return Ok(state.listings[dir].clone());
        }
        let names: Vec<OsString> = state
            .current
            .keys()
            .filter(|path| path.parent() == Some(dir))
            .filter_map(|path| path.file_name().map(OsString::from))
            .collect();
        if rate > 0 {
            state.listings.insert(dir.to_path_buf(), names.clone());
        }
        Ok(names)
    }

    pub(crate) fn space(&self) -> (u64, u64) {
        let state = self.state();
        (state.capacity, state.capacity.saturating_sub(state.used()))
    }
}

impl Handle {
    /// Runs `action` on this open file, after the call's fault check.
    fn with<T>(&self, call: Call, action: impl FnOnce(&mut State, u64) -> io::Result<T>) -> io::Result<T> {
        let path = {
            let state = self.disk.state();
            match state.open.get(&self.id).filter(|_| state.boot == self.boot) {
                Some(open) => open.path.clone(),
                None => return Err(errno(libc::EBADF)),
            }
        };
        self.disk.enter(call, &path)?;
        let mut state = self.disk.state();
        state.open_file(self.id, self.boot)?;
        action(&mut state, self.id)
    }

    pub(crate) fn sync(&self) -> io::Result<()> {
        self.with(Call::Sync, |state, id| {
            let inode = state.open[&id].inode;
            let entry = state.inodes.get_mut(&inode).expect("open inode");
            entry.durable = entry.current.clone();
            Ok(())
        })
    }

    pub(crate) fn set_len(&self, len: u64) -> io::Result<()> {
        self.with(Call::Write, |state, id| {
            let open = &state.open[&id];
            if !open.write {
                return Err(errno(libc::EINVAL));
            }
            let inode = open.inode;
            state.make_room(inode, len)?;
            state.inodes.get_mut(&inode).expect("open inode").current.resize(len as usize, 0);
            state.touch(inode);
            Ok(())
        })
    }

    pub(crate) fn metadata(&self) -> io::Result<Meta> {
        self.with(Call::Read, |state, id| {
            let inode = state.open[&id].inode;
            Ok(state.meta(inode))
        })
    }

    pub(crate) fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.with(Call::Read, |state, id| {
            let open = &state.open[&id];
            let (inode, position) = (open.inode, open.position);
            if !open.read {
                return Err(errno(libc::EBADF));
            }
            let data = &state.inodes[&inode].current;
            let start = (position as usize).min(data.len());
            let count = buf.len().min(data.len() - start);
            buf[..count].copy_from_slice(&data[start..start + count]);
            state.open.get_mut(&id).expect("open handle").position += count as u64;
            Ok(count)
        })
    }

    pub(crate) fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.with(Call::Read, |state, id| {
            let open = &state.open[&id];
            if !open.read {
                return Err(errno(libc::EBADF));
            }
            let data = &state.inodes[&open.inode].current;
            let start = (offset as usize).min(data.len());
            let count = buf.len().min(data.len() - start);
            buf[..count].copy_from_slice(&data[start..start + count]);
            Ok(count)
        })
    }

    pub(crate) fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.with(Call::Write, |state, id| {
            let open = &state.open[&id];
            if !open.write {
                return Err(errno(libc::EBADF));
            }
            let inode = open.inode;
            let offset = if open.append { state.inodes[&inode].current.len() as u64 } else { open.position };
            state.write_at(inode, buf, offset)?;
            state.open.get_mut(&id).expect("open handle").position = offset + buf.len() as u64;
            Ok(buf.len())
        })
    }

    pub(crate) fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        self.with(Call::Write, |state, id| {
            let open = &state.open[&id];
            if !open.write {
                return Err(errno(libc::EBADF));
            }
            // pwrite on an O_APPEND file appends on Linux.
            let inode = open.inode;
            let offset = if open.append { state.inodes[&inode].current.len() as u64 } else { offset };
            state.write_at(inode, buf, offset)?;
            Ok(buf.len())
        })
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        if let Ok(mut state) = self.disk.0.try_lock()
            && state.boot == self.boot
        {
            state.open.remove(&self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk;
    use std::io::Write;

    fn file_bytes(path: &str) -> Option<Vec<u8>> {
        disk::read(path).ok()
    }

    #[test]
    fn synced_data_and_names_survive_a_crash_and_the_rest_may_not() {
        for seed in 0..200 {
            let sim = SimDisk::new(seed, 1 << 20);
            let _installed = install(&sim);
            disk::create_dir_all("/q").unwrap();
            let mut file = disk::OpenOptions::new().append(true).create(true).open("/q/a").unwrap();
            file.write_all(b"synced").unwrap();
            file.sync_data().unwrap();
            disk::sync_dir("/q").unwrap();
            file.write_all(b"-unsynced").unwrap();
            disk::write_new_synced("/q/b", b"data synced, name not").unwrap();
            sim.crash();
            let a = file_bytes("/q/a").expect("a synced name survives");
            assert!(a.starts_with(b"synced") && a.len() <= b"synced-unsynced".len(), "seed {seed}: {a:?}");
            assert_eq!(file_bytes("/q/b"), None, "seed {seed}: a name whose directory was not synced");
            assert!(file.write_all(b"x").is_err(), "a handle from before the crash is dead");
        }
    }

    #[test]
    fn an_unsynced_rename_or_remove_is_undone_by_a_crash() {
        let sim = SimDisk::new(7, 1 << 20);
        let _installed = install(&sim);
        disk::create_dir_all("/q").unwrap();
        disk::write_new_synced("/q/old", b"x").unwrap();
        disk::write_new_synced("/q/gone", b"y").unwrap();
        disk::sync_dir("/q").unwrap();
        disk::rename("/q/old", "/q/new").unwrap();
        disk::remove_file("/q/gone").unwrap();
        let mut names = disk::read_dir_names("/q").unwrap();
        names.sort();
        assert_eq!(names, ["new"]);
        sim.crash();
        let mut names = disk::read_dir_names("/q").unwrap();
        names.sort();
        assert_eq!(names, ["gone", "old"]);
    }

    /// A rename across directories is atomic, as a journaling file system makes it: syncing
    /// either directory makes both sides durable (never the name in neither, nor in both).
    #[test]
    fn a_rename_across_directories_commits_with_either_directory() {
        for sync_source in [false, true] {
            let sim = SimDisk::new(3, 1 << 20);
            let _installed = install(&sim);
            disk::create_dir_all("/a").unwrap();
            disk::create_dir_all("/b").unwrap();
            disk::write_new_synced("/a/f", b"x").unwrap();
            disk::sync_dir("/a").unwrap();
            disk::rename("/a/f", "/b/f").unwrap();
            disk::sync_dir(if sync_source { "/a" } else { "/b" }).unwrap();
            sim.crash();
            assert!(file_bytes("/a/f").is_none(), "the old name came back");
            assert_eq!(file_bytes("/b/f").as_deref(), Some(&b"x"[..]), "the new name was lost");
        }
    }

    /// Under the lagging root a listing may be the previous one; elsewhere never.
    #[test]
    fn listings_lag_only_under_the_lagging_root() {
        let sim = SimDisk::new(5, 1 << 20);
        let _installed = install(&sim);
        sim.set_faults(Faults { stale_listing_per_million: 1_000_000, ..Faults::default() });
        sim.set_lagging_root("/nfs");
        for dir in ["/nfs", "/local"] {
            disk::create_dir_all(dir).unwrap();
            assert!(disk::read_dir_names(dir).unwrap().is_empty());
            disk::write(format!("{dir}/new"), b"").unwrap();
        }
        assert!(disk::read_dir_names("/nfs").unwrap().is_empty(), "a lagging listing shows the old state");
        assert_eq!(disk::read_dir_names("/local").unwrap(), ["new"]);
    }

    #[test]
    fn writes_past_the_capacity_fail_with_enospc() {
        let sim = SimDisk::new(1, 10);
        let _installed = install(&sim);
        disk::create_dir_all("/q").unwrap();
        let mut file = disk::File::create("/q/a").unwrap();
        file.write_all(b"0123456789").unwrap();
        assert_eq!(file.write_all(b"!").unwrap_err().raw_os_error(), Some(libc::ENOSPC));
        assert_eq!(disk::space("/q"), Some((10, 0)));
    }

    #[test]
    fn the_crash_point_unwinds_with_the_crash_payload() {
        let sim = SimDisk::new(1, 1 << 20);
        let _installed = install(&sim);
        disk::create_dir_all("/q").unwrap();
        sim.set_faults(Faults { crash_at: Some(sim.calls() + 2), ..Faults::default() });
        let result = std::panic::catch_unwind(|| {
            disk::write("/q/a", b"x").unwrap();
            unreachable!("the second call crashes");
        });
        assert!(result.unwrap_err().downcast::<Crash>().is_ok());
    }

    #[test]
    fn without_the_simulator_the_calls_are_the_real_ones() {
        let dir = std::env::temp_dir().join(format!("ftss-disk-{}", crate::random_u64()));
        disk::create_dir_all(&dir).unwrap();
        disk::write_new_synced(dir.join("a"), b"real").unwrap();
        assert_eq!(std::fs::read(dir.join("a")).unwrap(), b"real");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
