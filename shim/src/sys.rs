//! The shim's small system helpers, below everything else: errno, failing a call, locking
//! without poisoning, and keeping the shim's own fds out of the app's way.

use std::cell::Cell;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use libc::{c_int, ssize_t};

use crate::addr::Family;
use crate::fds;
use crate::real::real;

/// The shim's own fds are moved at or above this number, out of the way of apps that `dup2` onto
/// low numbers or reopen 0-2 when they daemonize.
pub const INTERNAL_FD_FLOOR: c_int = 64;

pub fn set_errno(errno: c_int) {
    // SAFETY: __errno_location returns this thread's errno.
    unsafe { *libc::__errno_location() = errno };
}

pub fn errno() -> c_int {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO)
}

/// Fails the current call with `errno`.
pub fn fail(errno: c_int) -> ssize_t {
    set_errno(errno);
    -1
}

/// Locks a mutex, ignoring poisoning (a panic in a hook is caught; the data stays consistent
/// because every critical section is a few plain assignments).
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Keeps the calling thread's signals blocked while alive; the thread's mask comes back on drop.
/// Held while an app thread does the shim's own work under the shim's locks (writing a fabric
/// frame): a signal handler that sends meanwhile would otherwise wait on a lock its own thread
/// holds. Signals that arrive are delivered at the drop.
pub struct SignalsHeld(libc::sigset_t);

impl SignalsHeld {
    pub fn hold() -> SignalsHeld {
        // SAFETY: sigset_t is plain data, filled by sigfillset; pthread_sigmask on this thread.
        unsafe {
            let mut all: libc::sigset_t = std::mem::zeroed();
            let mut before: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut before);
            SignalsHeld(before)
        }
    }
}

impl Drop for SignalsHeld {
    fn drop(&mut self) {
        // SAFETY: restores the mask saved by `hold` on the same thread (the guard is not Send).
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.0, std::ptr::null_mut()) };
    }
}

/// A lock taken for writing while the shim makes one of its own fds and marks it, and for reading
/// while the app's `close` or `close_range` closes fds. Without it, an app closing a range could
/// close an fd of the shim's between its creation (at the lowest free number) and its mark: the
/// free number would stay marked as the shim's, the app's next fd would get it, and the shim would
/// ignore the app's close of that fd, and poll and write it as its own. It is held for writing only
/// around system calls that do no I/O (a file is opened outside it: see [`keep_file`]), so an app's
/// close never waits for the volume. Nothing is taken while it is held, except the log.
///
/// Its own small lock rather than std's, for fork: a forked child has only the forking thread, and
/// a lock another thread held (an app thread in a long close, say) would stay held there forever;
/// the child simply starts this one afresh ([`reset_fd_lock_in_child`]). Bit 31: a writer holds
/// it; bit 30: a writer waits (new readers then wait too); the rest: how many readers hold it.
static FD_LOCK: AtomicU32 = AtomicU32::new(0);
const WRITER: u32 = 1 << 31;
const WRITER_WAITING: u32 = 1 << 30;
/// When a writer began to wait (microseconds of CLOCK_MONOTONIC_COARSE; 0: none waits).
static WAITING_SINCE_US: AtomicU64 = AtomicU64::new(0);
/// How long a waiting writer keeps new readers out.
const WRITER_PATIENCE_US: u64 = 20_000;

fn monotonic_us() -> u64 {
    // SAFETY: clock_gettime fills a timespec.
    let mut now: libc::timespec = unsafe { std::mem::zeroed() };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut now) };
    (now.tv_sec as u64 * 1_000_000 + now.tv_nsec as u64 / 1_000).max(1)
}

fn writer_waited_long() -> bool {
    let since = WAITING_SINCE_US.load(Ordering::Acquire);
    since != 0 && monotonic_us().saturating_sub(since) > WRITER_PATIENCE_US
}

/// Bumped in a forked child: guards from before the fork release nothing.
static FD_LOCK_GENERATION: AtomicU32 = AtomicU32::new(0);

/// How many closes the app has begun (each counted under the read lock, before the close): a
/// file the shim opened while none began cannot have been closed under it.
static APP_CLOSES: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// Does this thread hold (or wait for) the lock for writing? Then its closes (the shim's own,
    /// through std and so through the hooks, or a signal handler's) neither wait for the lock nor
    /// take it again.
    static MAKING_HERE: Cell<bool> = const { Cell::new(false) };
    /// Does this thread hold (or wait for) it for reading? Then a close or a new fabric socket in
    /// a signal handler that interrupted the first does not ask again: with a writer waiting, that
    /// second request would wait for the writer, and the writer for the first.
    static CLOSING_HERE: Cell<bool> = const { Cell::new(false) };
}

/// A thread flag; false (and not set) while the thread's locals are being torn down, when a
/// destructor's close still comes through the hooks.
fn flag(key: &'static std::thread::LocalKey<Cell<bool>>) -> bool {
    key.try_with(Cell::get).unwrap_or(false)
}

fn set_flag(key: &'static std::thread::LocalKey<Cell<bool>>, value: bool) {
    let _ = key.try_with(|cell| cell.set(value));
}

/// Waits a moment: holders keep the lock for a few system calls.
fn lock_pause(round: u32) {
    if round < 64 {
        std::hint::spin_loop();
    } else if round < 128 {
        std::thread::yield_now();
    } else {
        std::thread::sleep(Duration::from_micros(20));
    }
}

/// In a forked child: nobody holds the lock.
pub(crate) fn reset_fd_lock_in_child() {
    FD_LOCK_GENERATION.fetch_add(1, Ordering::AcqRel);
    WAITING_SINCE_US.store(0, Ordering::Release);
    FD_LOCK.store(0, Ordering::Release);
}

/// The lock held for reading (or nothing, if this thread holds it already either way).
pub(crate) struct Closing(Option<(u32, bool)>);

impl Drop for Closing {
    fn drop(&mut self) {
        if let Some((generation, nested)) = self.0.take() {
            if FD_LOCK_GENERATION.load(Ordering::Acquire) == generation {
                FD_LOCK.fetch_sub(1, Ordering::AcqRel);
            }
            if !nested {
                set_flag(&CLOSING_HERE, false);
            }
        }
    }
}

/// Held by the app's closes (many at once); counts the close in [`APP_CLOSES`].
pub(crate) fn app_closing() -> Closing {
    if flag(&MAKING_HERE) {
        APP_CLOSES.fetch_add(1, Ordering::SeqCst);
        return Closing(None);
    }
    // A close nested in one that holds or waits for the lock (a signal handler's) waits for no
    // waiting writer (that writer waits for the outer close), only for one that holds the lock.
    let nested = flag(&CLOSING_HERE);
    set_flag(&CLOSING_HERE, true);
    let mut round = 0;
    let generation = loop {
        let generation = FD_LOCK_GENERATION.load(Ordering::Acquire);
        let state = FD_LOCK.load(Ordering::Acquire);
        // A writer waiting long (for an app close that waits for NFS, or lingers) does not hold
        // up every other close of the app: after WRITER_PATIENCE readers go in again.
        let writer_in_the_way =
            state & WRITER != 0 || (state & WRITER_WAITING != 0 && !nested && !writer_waited_long());
        if !writer_in_the_way
            && FD_LOCK.compare_exchange_weak(state, state + 1, Ordering::SeqCst, Ordering::Acquire).is_ok()
        {
            break generation;
        }
        lock_pause(round);
        round += 1;
    };
    APP_CLOSES.fetch_add(1, Ordering::SeqCst);
    Closing(Some((generation, nested)))
}

/// The lock held for writing (or nothing, if this thread holds it already).
pub(crate) struct Making(Option<u32>);

impl Drop for Making {
    fn drop(&mut self) {
        if let Some(generation) = self.0.take() {
            if FD_LOCK_GENERATION.load(Ordering::Acquire) == generation {
                FD_LOCK.fetch_and(!WRITER, Ordering::AcqRel);
            }
            set_flag(&MAKING_HERE, false);
        }
    }
}

/// Held while the shim makes and marks fds of its own.
pub(crate) fn shim_making() -> Making {
    if flag(&MAKING_HERE) || flag(&CLOSING_HERE) {
        return Making(None);
    }
    set_flag(&MAKING_HERE, true);
    let mut round = 0;
    let generation = loop {
        let generation = FD_LOCK_GENERATION.load(Ordering::Acquire);
        let state = FD_LOCK.load(Ordering::Acquire);
        if state & !WRITER_WAITING == 0 {
            if FD_LOCK.compare_exchange_weak(state, WRITER, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                break generation;
            }
        } else if state & WRITER_WAITING == 0 {
            let _ = WAITING_SINCE_US.compare_exchange(0, monotonic_us(), Ordering::AcqRel, Ordering::Acquire);
            FD_LOCK.fetch_or(WRITER_WAITING, Ordering::AcqRel);
        }
        lock_pause(round);
        round += 1;
    };
    WAITING_SINCE_US.store(0, Ordering::Release);
    Making(Some(generation))
}

/// Makes one fd of the shim's with `create` (the fd, or -1 with errno set; no I/O: a socket, an
/// eventfd) and takes it for the shim ([`make_internal`]), with no moment in which the app's
/// closes can take it.
pub(crate) fn new_internal(create: impl FnOnce() -> c_int) -> c_int {
    let _making = shim_making();
    let fd = create();
    if fd < 0 {
        return fd;
    }
    pause_for_tests();
    make_internal(fd)
}

/// Unmarks and closes one of the shim's fds; the close's result (0, or -1 with errno set). No lock:
/// the close may wait for the volume (NFS writes back at close). Meanwhile the number is marked
/// releasing: the kernel frees it at once, and an app close of it (the app's next fd may get the
/// number) waits until this close is over and the mark is gone.
pub(crate) fn close_internal(fd: c_int) -> c_int {
    fds::begin_release(fd);
    // SAFETY: the shim's own fd, closed once.
    let closed = unsafe { (real().close)(fd) };
    let error = errno();
    fds::end_release(fd);
    set_errno(error);
    closed
}

/// One of the shim's fds, closed with [`close_internal`] when dropped.
pub(crate) struct InternalFd(pub(crate) c_int);

impl Drop for InternalFd {
    fn drop(&mut self) {
        close_internal(self.0);
    }
}

/// Takes the file `open` opens (the fd, or -1 with errno set) for the shim. The open runs outside
/// the lock (on NFS it is a round trip, and the server may be away); then, under it, the fd is
/// moved up and marked. If the app began any close meanwhile, it may have closed the new fd and
/// even have opened a file of its own at that number: the copy must then be the file the open gave
/// (device and inode, read right after it), and the low number is closed only while `kcmp` says it
/// is still the same open file. If the app did close it, the open fails with EAGAIN (its callers
/// try again), and nothing of the app's is touched.
fn keep_file(open: &mut dyn FnMut() -> c_int) -> c_int {
    // In this order: a close that begins after the first load changes the count; one begun before
    // it and not yet over still holds the lock for reading at the second.
    let closes_before = APP_CLOSES.load(Ordering::SeqCst);
    let none_under_way = FD_LOCK.load(Ordering::SeqCst) & !(WRITER | WRITER_WAITING) == 0;
    let low = open();
    if low < 0 {
        return low;
    }
    let opened = identity_of_fd(low);
    pause_for_tests();
    let making = shim_making();
    if none_under_way && APP_CLOSES.load(Ordering::SeqCst) == closes_before {
        return make_internal(low);
    }
    // SAFETY: fcntl on a number that is ours or the app's; it copies, and closes nothing.
    let high = unsafe { (real().fcntl)(low, libc::F_DUPFD_CLOEXEC, INTERNAL_FD_FLOOR) };
    if high < 0 {
        if errno() != libc::EBADF && opened.is_some() && identity_of_fd(low) == opened {
            // No number that high for us (RLIMIT_NOFILE): ours where it is.
            fds::set(low, fds::Kind::Internal, Family::V4);
            return low;
        }
        // Closed under us: our file went with it.
        set_errno(libc::EAGAIN);
        return -1;
    }
    fds::set(high, fds::Kind::Internal, Family::V4);
    let ours = opened.is_some() && identity_of_fd(high) == opened;
    if ours && same_open_file(low, high) {
        // SAFETY: `low` still refers to our open file (checked under the lock the app's closes
        // wait for).
        unsafe { (real().close)(low) };
    }
    drop(making);
    if !ours {
        // The number held the app's file by the time it was copied; ours was closed by the app.
        close_internal(high);
        set_errno(libc::EAGAIN);
        return -1;
    }
    high
}

/// (device, inode) of an open fd, from the cached attributes (no round trip).
fn identity_of_fd(fd: c_int) -> Option<(u64, u64)> {
    // SAFETY: statx is plain data; all zeroes is a valid value.
    let mut stats: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: an empty C string with AT_EMPTY_PATH, and a struct of the right type for statx.
    let done = unsafe {
        libc::statx(fd, c"".as_ptr(), libc::AT_EMPTY_PATH | libc::AT_STATX_DONT_SYNC, libc::STATX_INO, &mut stats)
    };
    (done == 0).then(|| (libc::makedev(stats.stx_dev_major, stats.stx_dev_minor), stats.stx_ino))
}

/// Do `a` and `b` refer to the same open file description (kcmp), or, where kcmp is not allowed,
/// to the same file?
fn same_open_file(a: c_int, b: c_int) -> bool {
    // SAFETY: kcmp compares two of this process's fds; it changes nothing.
    let pid = unsafe { libc::getpid() };
    let compared = unsafe {
        libc::syscall(libc::SYS_kcmp, pid, pid, 0 /* KCMP_FILE */, a, b)
    };
    match compared {
        0 => true,
        compared if compared > 0 => false,
        _ => identity_of_fd(a).is_some_and(|identity| Some(identity) == identity_of_fd(b)),
    }
}

/// The files the shim opens through fsbridge (the outbox log, inbox files, bells, ledgers) are
/// the shim's fds too: taken with [`keep_file`], closed with [`close_internal`].
struct Keeper;

impl fsbridge::disk::FdKeeper for Keeper {
    fn keep(&self, open: &mut dyn FnMut() -> c_int) -> c_int {
        keep_file(open)
    }

    fn close(&self, fd: c_int) -> std::io::Result<()> {
        match close_internal(fd) {
            0 => Ok(()),
            _ => Err(std::io::Error::last_os_error()),
        }
    }
}

/// Installs [`Keeper`] (once, before the shim opens any file on the volume).
pub(crate) fn keep_volume_fds() {
    fsbridge::disk::keep_fds(&Keeper);
}

/// Moves `fd` to a number at or above [`INTERNAL_FD_FLOOR`] (close-on-exec) and marks it the
/// shim's. Keeps the number it has if the process may not open that many. The caller holds
/// [`shim_making`] from the fd's creation on.
pub(crate) fn make_internal(fd: c_int) -> c_int {
    // SAFETY: fcntl/close on an fd the shim just created.
    let moved = unsafe { (real().fcntl)(fd, libc::F_DUPFD_CLOEXEC, INTERNAL_FD_FLOOR) };
    let fd = if moved >= 0 {
        unsafe { (real().close)(fd) };
        moved
    } else {
        fd
    };
    fds::set(fd, fds::Kind::Internal, Family::V4);
    fd
}

/// The test pause of `FTSS_TEST_NEW_FD_PAUSE_MS`, in milliseconds (0: none).
static NEW_FD_PAUSE_MS: AtomicU64 = AtomicU64::new(0);

pub(crate) fn set_new_fd_pause(pause: Duration) {
    NEW_FD_PAUSE_MS.store(pause.as_millis() as u64, Ordering::Relaxed);
}

/// Between creating one of the shim's fds and taking it for the shim: a test's pause, if any.
pub(crate) fn pause_for_tests() {
    let millis = NEW_FD_PAUSE_MS.load(Ordering::Relaxed);
    if millis > 0 {
        std::thread::sleep(Duration::from_millis(millis));
    }
}
