//! Spool directories (`tmp/` + `new/`): atomic publish, polling, reading and removal that hold up on
//! NFS and SMB.
//!
//! Network file system facts this code is built around:
//! - Only `rename` is atomic; a file is visible in `new/` only once fully written and synced.
//! - NFS reports write errors at `close`, so close is checked.
//! - A retransmitted RENAME/REMOVE can report ENOENT/EEXIST although the first try worked: removal
//!   treats ENOENT as done; publish confirms with `stat`.
//! - ESTALE means the file went away under a cached handle: treated as gone.
//! - smbnetfs can report EBUSY for a moment when unlinking a file just read: retried.
//! - Other clients' writes are invisible to inotify: readers poll.

use std::collections::BinaryHeap;
use std::ffi::OsString;

use crate::fsops::{self as fs, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::Duration;

use thiserror::Error;

use crate::format::BATCH_BYTES_MAX;

/// How many times a transient error (EBUSY, EINTR, EAGAIN) is retried before it is reported.
const TRANSIENT_RETRIES_MAX: u32 = 50;
/// Pause between retries of a transient error.
const TRANSIENT_RETRY_PAUSE: Duration = Duration::from_millis(10);

/// What went wrong in a spool operation; every variant names the path.
#[derive(Debug, Error)]
pub enum SpoolError {
    /// Creating, writing or syncing the temporary file failed.
    #[error("writing {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    /// `close` reported an error (NFS reports deferred write errors here).
    #[error("closing {path}: {source}")]
    Close { path: PathBuf, source: io::Error },
    /// The rename from `tmp/` into `new/` failed.
    #[error("publishing {path}: {source}")]
    Rename { path: PathBuf, source: io::Error },
    /// Syncing a directory failed.
    #[error("syncing directory {path}: {source}")]
    SyncDirectory { path: PathBuf, source: io::Error },
    /// Listing, reading, moving or removing failed.
    #[error("{operation} {path}: {source}")]
    Io { operation: &'static str, path: PathBuf, source: io::Error },
    /// The file is not a regular file (directory, symlink, device...).
    #[error("{path} is not a regular file")]
    NotRegular { path: PathBuf },
    /// The file is larger than any batch may be.
    #[error("{path} is {bytes} bytes, over the batch limit")]
    TooLarge { path: PathBuf, bytes: u64 },
}

impl SpoolError {
    /// The underlying OS error number, if any.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            SpoolError::Write { source, .. }
            | SpoolError::Close { source, .. }
            | SpoolError::Rename { source, .. }
            | SpoolError::SyncDirectory { source, .. }
            | SpoolError::Io { source, .. } => source.raw_os_error(),
            SpoolError::NotRegular { .. } => Some(libc::EINVAL),
            SpoolError::TooLarge { .. } => Some(libc::EFBIG),
        }
    }
}

impl From<SpoolError> for io::Error {
    fn from(error: SpoolError) -> io::Error {
        let kind = match error.raw_os_error() {
            Some(code) => io::Error::from_raw_os_error(code).kind(),
            None => io::ErrorKind::Other,
        };
        io::Error::new(kind, error)
    }
}

/// One spool: a directory with `tmp/` and `new/`.
#[derive(Clone, Debug)]
pub struct Spool {
    dir: PathBuf,
}

/// Is this error "the file is gone" (possibly under a stale NFS handle)?
pub fn is_gone(error: &io::Error) -> bool {
    matches!(error.raw_os_error(), Some(libc::ENOENT) | Some(libc::ESTALE))
}

fn is_transient(error: &io::Error) -> bool {
    matches!(error.raw_os_error(), Some(libc::EBUSY) | Some(libc::EINTR) | Some(libc::EAGAIN))
}

/// Runs `operation`, retrying transient errors a bounded number of times.
fn retry_transient<T>(mut operation: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    let mut attempt = 0;
    loop {
        match operation() {
            Err(error) if is_transient(&error) && attempt < TRANSIENT_RETRIES_MAX => {
                attempt += 1;
                thread::sleep(TRANSIENT_RETRY_PAUSE);
            }
            result => return result,
        }
    }
}

/// fsyncs a directory so that a create, rename or unlink in it is durable.
pub fn sync_directory(path: &Path) -> Result<(), SpoolError> {
    match fs::sync_dir(path) {
        // Some FUSE and SMB file systems do not implement fsync on directories; their renames are
        // synchronous on the server, so there is nothing more to do.
        Err(error) if matches!(error.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::EBADF)) => {
            Ok(())
        }
        result => result.map_err(|source| SpoolError::SyncDirectory { path: path.into(), source }),
    }
}

/// Writes `bytes` to a new file at `path` (which must not exist), fsyncs it and checks close.
pub fn write_file_durably(path: &Path, bytes: &[u8]) -> Result<(), SpoolError> {
    write_file(path, bytes, true)
}

/// Writes `bytes` to a new file at `path` (which must not exist), fsyncs it if `durable`, and
/// checks close (NFS reports deferred write errors there).
fn write_file(path: &Path, bytes: &[u8], durable: bool) -> Result<(), SpoolError> {
    let write_error = |source| SpoolError::Write { path: path.into(), source };
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(write_error)?;
    file.write_all(bytes).map_err(write_error)?;
    if durable {
        file.sync_all().map_err(write_error)?;
    }
    // Closed here, so that its error is seen (NFS reports deferred write errors there).
    file.close().map_err(|source| SpoolError::Close { path: path.into(), source })
}

impl Spool {
    pub fn new(dir: PathBuf) -> Spool {
        Spool { dir }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn new_dir(&self) -> PathBuf {
        self.dir.join("new")
    }

    pub fn tmp_dir(&self) -> PathBuf {
        self.dir.join("tmp")
    }

    /// Creates `tmp/` and `new/` if missing.
    pub fn create(&self) -> Result<(), SpoolError> {
        for dir in [self.tmp_dir(), self.new_dir()] {
            fs::create_dir_all(&dir).map_err(|source| SpoolError::Io { operation: "creating", path: dir, source })?;
        }
        Ok(())
    }

    /// Atomically publishes `bytes` as `new/<name>`: write under `tmp/`, fsync, check close, rename,
    /// fsync `new/`. `name` must be unique to this writer (see the module docs).
    pub fn publish(&self, name: &str, bytes: &[u8]) -> Result<PathBuf, SpoolError> {
        self.publish_as(name, bytes, true)
    }

    /// Like [`Spool::publish`] but without either fsync: the file appears whole and at once (the
    /// rename), but a crash of the writer's machine may lose it or leave it cut short (a reader
    /// quarantines that). Only for files whose loss costs a retry, never data: the server's inbox
    /// deliveries (the queue keeps every packet until it is receipted, and delivers it again) and
    /// the shims' receipts (a lost receipt means a redelivery the receiving shim drops).
    pub fn publish_volatile(&self, name: &str, bytes: &[u8]) -> Result<PathBuf, SpoolError> {
        self.publish_as(name, bytes, false)
    }

    fn publish_as(&self, name: &str, bytes: &[u8], durable: bool) -> Result<PathBuf, SpoolError> {
        assert!(is_plain_name(name), "publish name {name:?} must be a plain file name");
        let tmp = self.tmp_dir().join(name);
        let target = self.new_dir().join(name);
        if let Err(error) = write_file(&tmp, bytes, durable) {
            let missing =
                matches!(&error, SpoolError::Write { source, .. } if source.kind() == io::ErrorKind::NotFound);
            if !missing {
                let _ = fs::remove_file(&tmp);
                return Err(error);
            }
            // First publish into this spool: create it and try once more.
            self.create()?;
            write_file(&tmp, bytes, durable).inspect_err(|_| {
                let _ = fs::remove_file(&tmp);
            })?;
        }
        let rename = || {
            faults::after(
                faults::Op::Rename,
                faults::before(faults::Op::Rename).and_then(|()| fs::rename(&tmp, &target)),
            )
        };
        if let Err(source) = retry_transient(rename) {
            // A retransmitted RENAME can fail although the first one worked: trust what stat says.
            let landed = fs::metadata(&target).map(|meta| meta.len == bytes.len() as u64).unwrap_or(false);
            if !landed {
                let _ = fs::remove_file(&tmp);
                return Err(SpoolError::Rename { path: target, source });
            }
        }
        if durable {
            sync_directory(&self.new_dir())?;
        }
        Ok(target)
    }

    /// Names in `new/`, sorted, at most `limit` of them (the smallest names). Dot-files are skipped.
    pub fn list(&self, limit: usize) -> Result<Vec<String>, SpoolError> {
        list_names(&self.new_dir(), limit)
    }

    /// Reads `new/<name>`. `Ok(None)` if it is gone (taken by someone else, or a stale handle).
    pub fn read(&self, name: &str) -> Result<Option<Vec<u8>>, SpoolError> {
        read_regular_file(&self.new_dir().join(name))
    }

    /// Hidden files in `new/` that no ftss writer makes (see [`list_hidden`]).
    pub fn list_hidden(&self, limit: usize) -> Result<Vec<String>, SpoolError> {
        list_hidden(&self.new_dir(), limit)
    }

    /// One pass over `new/` (see [`scan`]).
    pub fn scan(&self, limit: usize, hidden_limit: usize) -> Result<Scan, SpoolError> {
        scan(&self.new_dir(), limit, hidden_limit)
    }

    /// Removes `new/<name>`; a file that is already gone counts as removed. Syncs `new/`.
    pub fn remove(&self, name: &str) -> Result<(), SpoolError> {
        self.remove_unsynced(name)?;
        sync_directory(&self.new_dir())
    }

    /// Removes `new/<name>` without syncing the directory; call [`Spool::sync`] after a group.
    pub fn remove_unsynced(&self, name: &str) -> Result<(), SpoolError> {
        remove_file_idempotent(&self.new_dir().join(name))
    }

    /// fsyncs `new/`.
    pub fn sync(&self) -> Result<(), SpoolError> {
        sync_directory(&self.new_dir())
    }

    /// Removes files in `tmp/` older than `age` (left by writers that died mid-publish).
    pub fn sweep_tmp(&self, age: Duration) -> Result<usize, SpoolError> {
        sweep_older_than(&self.tmp_dir(), age)
    }
}

/// A bounded set of file names, the oldest forgotten first: files a reader has read but could not
/// remove (EBUSY on SMB), so that it does not take them again.
pub struct RecentNames {
    names: std::collections::HashSet<String>,
    order: std::collections::VecDeque<String>,
    max: usize,
}

impl RecentNames {
    pub fn new(max: usize) -> RecentNames {
        RecentNames { names: Default::default(), order: Default::default(), max }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.names.contains(name)
    }

    pub fn insert(&mut self, name: String) {
        if self.names.insert(name.clone()) {
            self.order.push_back(name);
        }
        if self.order.len() > self.max
            && let Some(oldest) = self.order.pop_front()
        {
            self.names.remove(&oldest);
        }
    }
}

/// Is `name` one path component that is not hidden, `.` or `..`?
pub fn is_plain_name(name: &str) -> bool {
    !name.is_empty() && !name.starts_with('.') && !name.contains('/') && !name.contains('\0')
}

/// Sorted non-dot names in `dir`: the `limit` smallest. A missing directory lists as empty. Memory is
/// bounded by `limit`, not by the directory (a flooded spool may hold millions of files).
pub fn list_names(dir: &Path, limit: usize) -> Result<Vec<String>, SpoolError> {
    Ok(scan(dir, limit, 0)?.names)
}

/// What one pass over a spool directory found.
#[derive(Debug, Default)]
pub struct Scan {
    /// The smallest visible names, sorted.
    pub names: Vec<String>,
    /// Hidden names no ftss writer makes (see [`list_hidden`]), up to the limit asked for.
    pub hidden: Vec<String>,
    /// How many visible names the directory holds.
    pub visible_total: usize,
}

/// One pass over `dir`: the `limit` smallest visible names, up to `hidden_limit` hidden names, and
/// the count of visible names. Memory is bounded by the limits.
pub fn scan(dir: &Path, limit: usize, hidden_limit: usize) -> Result<Scan, SpoolError> {
    let mut smallest: BinaryHeap<String> = BinaryHeap::new();
    let mut result = Scan::default();
    visit_names(dir, |name| {
        if name.starts_with('.') {
            if !name.starts_with(".nfs") && result.hidden.len() < hidden_limit {
                result.hidden.push(name);
            }
            return;
        }
        result.visible_total += 1;
        if smallest.len() < limit {
            smallest.push(name);
        } else if smallest.peek().is_some_and(|largest| name < *largest) {
            smallest.pop();
            smallest.push(name);
        }
    })?;
    result.names = smallest.into_sorted_vec();
    Ok(result)
}

/// Hidden names in `dir` that no ftss writer makes: dot-files other than NFS silly-renames
/// (`.nfsXXXX`, which the client removes itself). At most `limit`.
pub fn list_hidden(dir: &Path, limit: usize) -> Result<Vec<String>, SpoolError> {
    Ok(scan(dir, 0, limit)?.hidden)
}

/// Calls `visit` with every name in `dir`; a missing directory has none.
pub fn visit_names(dir: &Path, mut visit: impl FnMut(String)) -> Result<(), SpoolError> {
    let names = match fs::read_dir_names(dir) {
        Ok(names) => names,
        Err(error) if is_gone(&error) => return Ok(()),
        Err(source) => return Err(SpoolError::Io { operation: "listing", path: dir.into(), source }),
    };
    // Names that are not UTF-8 cannot have been written by ftss; they are shown escaped so that
    // the server can quarantine them.
    names.into_iter().for_each(|name| visit(os_name(name)));
    Ok(())
}

fn os_name(name: OsString) -> String {
    name.into_string().unwrap_or_else(|raw| raw.to_string_lossy().into_owned())
}

/// Reads a regular file without following a final symlink. `Ok(None)` if it is gone.
pub fn read_regular_file(path: &Path) -> Result<Option<Vec<u8>>, SpoolError> {
    let io_error = |source| SpoolError::Io { operation: "reading", path: path.into(), source };
    let opened = retry_transient(|| {
        faults::before(faults::Op::Open)?;
        OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK).open(path)
    });
    let mut file = match opened {
        Ok(file) => file,
        Err(error) if is_gone(&error) => return Ok(None),
        // O_NOFOLLOW on a symlink gives ELOOP.
        Err(error) if error.raw_os_error() == Some(libc::ELOOP) => {
            return Err(SpoolError::NotRegular { path: path.into() });
        }
        Err(error) => return Err(io_error(error)),
    };
    let meta = match file.metadata() {
        Ok(meta) => meta,
        Err(error) if is_gone(&error) => return Ok(None),
        Err(error) => return Err(io_error(error)),
    };
    if !meta.is_file {
        return Err(SpoolError::NotRegular { path: path.into() });
    }
    if meta.len > BATCH_BYTES_MAX as u64 {
        return Err(SpoolError::TooLarge { path: path.into(), bytes: meta.len });
    }
    let mut bytes = Vec::with_capacity(meta.len as usize);
    // Read at most one byte past the limit, so a file that grows under us is still bounded.
    match (&mut file).take(BATCH_BYTES_MAX as u64 + 1).read_to_end(&mut bytes) {
        Ok(_) => Ok(Some(bytes)),
        Err(error) if is_gone(&error) => Ok(None),
        Err(error) => Err(io_error(error)),
    }
}

/// Removes a file; ENOENT/ESTALE count as done, EBUSY is retried.
pub fn remove_file_idempotent(path: &Path) -> Result<(), SpoolError> {
    let remove =
        || faults::after(faults::Op::Remove, faults::before(faults::Op::Remove).and_then(|()| fs::remove_file(path)));
    match retry_transient(remove) {
        Ok(()) => Ok(()),
        Err(error) if is_gone(&error) => Ok(()),
        Err(source) => Err(SpoolError::Io { operation: "removing", path: path.into(), source }),
    }
}

/// Removes regular files in `dir` whose mtime is older than `age`; returns how many.
pub fn sweep_older_than(dir: &Path, age: Duration) -> Result<usize, SpoolError> {
    let names = match fs::read_dir_names(dir) {
        Ok(names) => names,
        Err(error) if is_gone(&error) => return Ok(0),
        Err(source) => return Err(SpoolError::Io { operation: "listing", path: dir.into(), source }),
    };
    let now = crate::disk::system_now();
    let mut removed = 0;
    for name in names {
        let path = dir.join(name);
        let Ok(meta) = fs::symlink_metadata(&path) else { continue };
        let old = now.duration_since(meta.modified).is_ok_and(|elapsed| elapsed > age);
        if old && !meta.is_dir && remove_file_idempotent(&path).is_ok() {
            removed += 1;
        }
    }
    Ok(removed)
}

/// Fault points for unit tests: NFS and SMB misbehaviours that a local disk never shows (a stale
/// handle, a retransmitted RENAME reporting failure after it worked, a busy file). In normal builds
/// every point is a no-op that the compiler removes.
mod faults {
    use std::io;

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Op {
        Open,
        Rename,
        Remove,
    }

    #[cfg(not(test))]
    pub fn before(_op: Op) -> io::Result<()> {
        Ok(())
    }

    #[cfg(not(test))]
    pub fn after<T>(_op: Op, result: io::Result<T>) -> io::Result<T> {
        result
    }

    #[cfg(test)]
    thread_local! {
        /// Planned faults: (operation, errno, whether the operation still happens first).
        pub static PLAN: std::cell::RefCell<Vec<(Op, i32, bool)>> = const { std::cell::RefCell::new(Vec::new()) };
    }

    #[cfg(test)]
    fn take(op: Op, done_first: bool) -> Option<i32> {
        PLAN.with(|plan| {
            let mut plan = plan.borrow_mut();
            let index = plan.iter().position(|(planned, _, first)| *planned == op && *first == done_first)?;
            Some(plan.remove(index).1)
        })
    }

    /// A fault that happens instead of the operation.
    #[cfg(test)]
    pub fn before(op: Op) -> io::Result<()> {
        take(op, false).map_or(Ok(()), |errno| Err(io::Error::from_raw_os_error(errno)))
    }

    /// A fault reported after the operation took effect (a retransmitted request's reply).
    #[cfg(test)]
    pub fn after<T>(op: Op, result: io::Result<T>) -> io::Result<T> {
        match (take(op, true), result) {
            (Some(errno), Ok(_)) => Err(io::Error::from_raw_os_error(errno)),
            (_, result) => result,
        }
    }

    #[cfg(test)]
    pub fn plan(op: Op, errno: i32, done_first: bool) {
        PLAN.with(|plan| plan.borrow_mut().push((op, errno, done_first)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn nfs_and_smb_misbehaviour() {
        let root = temp_dir("spool-nfs");
        let spool = Spool::new(root.join("s"));
        // A retransmitted RENAME whose first attempt worked reports ENOENT (or EEXIST): publish
        // confirms with stat and succeeds.
        faults::plan(faults::Op::Rename, libc::ENOENT, true);
        spool.publish("0001.pkt", b"one").unwrap();
        assert_eq!(spool.read("0001.pkt").unwrap().unwrap(), b"one");
        // A rename that really failed is reported, and leaves nothing behind in tmp/ or new/.
        faults::plan(faults::Op::Rename, libc::EACCES, false);
        assert!(matches!(spool.publish("0003.pkt", b"three"), Err(SpoolError::Rename { .. })));
        assert_eq!(spool.read("0003.pkt").unwrap(), None);
        assert!(fs::read_dir(spool.tmp_dir()).unwrap().next().is_none(), "tmp/ left behind");
        // A stale handle on open means the file is gone (another reader took it).
        faults::plan(faults::Op::Open, libc::ESTALE, false);
        assert_eq!(spool.read("0001.pkt").unwrap(), None);
        // smbnetfs: EBUSY right after reading; removal retries and succeeds.
        faults::plan(faults::Op::Remove, libc::EBUSY, false);
        faults::plan(faults::Op::Remove, libc::EBUSY, false);
        spool.remove("0001.pkt").unwrap();
        assert!(!spool.new_dir().join("0001.pkt").exists());
        // A retransmitted REMOVE whose first attempt worked reports ENOENT: done.
        spool.publish("0002.pkt", b"two").unwrap();
        faults::plan(faults::Op::Remove, libc::ENOENT, true);
        spool.remove("0002.pkt").unwrap();
        assert_eq!(spool.read("0002.pkt").unwrap(), None);
        faults::PLAN.with(|plan| plan.borrow_mut().clear());
        fs::remove_dir_all(root).unwrap();
    }

    fn temp_dir(tag: &str) -> PathBuf {
        crate::test_dir(tag)
    }

    #[test]
    fn publish_list_read_remove() {
        let root = temp_dir("spool");
        let spool = Spool::new(root.join("s"));
        spool.publish("0002.pkt", b"two").unwrap();
        spool.publish("0001.pkt", b"one").unwrap();
        fs::write(spool.new_dir().join(".nfs0001"), b"silly").unwrap();
        assert_eq!(spool.list(10).unwrap(), vec!["0001.pkt", "0002.pkt"]);
        assert_eq!(spool.list(1).unwrap(), vec!["0001.pkt"]);
        fs::write(spool.new_dir().join("..sneaky"), b"x").unwrap();
        assert_eq!(spool.list_hidden(10).unwrap(), vec!["..sneaky"]);
        fs::remove_file(spool.new_dir().join("..sneaky")).unwrap();
        assert_eq!(spool.read("0001.pkt").unwrap().unwrap(), b"one");
        assert!(fs::read_dir(spool.tmp_dir()).unwrap().next().is_none(), "tmp/ left behind");
        spool.remove("0001.pkt").unwrap();
        spool.remove("0001.pkt").unwrap(); // idempotent, like a retransmitted REMOVE
        assert_eq!(spool.read("0001.pkt").unwrap(), None);
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn publish_never_overwrites_and_rejects_symlinks_and_directories() {
        let root = temp_dir("spool-odd");
        let spool = Spool::new(root.join("s"));
        spool.create().unwrap();
        std::os::unix::fs::symlink("/etc/passwd", spool.new_dir().join("link")).unwrap();
        assert!(matches!(spool.read("link"), Err(SpoolError::NotRegular { .. })));
        fs::create_dir(spool.new_dir().join("dir")).unwrap();
        assert!(matches!(spool.read("dir"), Err(SpoolError::NotRegular { .. })));
        fs::write(spool.tmp_dir().join("taken"), b"x").unwrap();
        assert!(spool.publish("taken", b"y").is_err(), "an existing tmp name must not be reused");
        fs::remove_dir_all(root).unwrap();
    }
}
