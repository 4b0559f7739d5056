//! The shim's small system helpers, below everything else: errno, failing a call, locking
//! without poisoning, and keeping the shim's own fds out of the app's way.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
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

/// Taken for writing while the shim makes one of its own fds and marks it (or unmarks and closes
/// it), and for reading while the app's `close` or `close_range` closes fds. Without it, an app
/// closing a range could close an fd of the shim's between its creation (at the lowest free
/// number) and its mark: the free number would stay marked as the shim's, the app's next fd would
/// get it, and the shim would ignore the app's close of that fd, and poll and write it as its own.
/// Nothing is taken while it is held, except the log.
static FD_CHANGES: RwLock<()> = RwLock::new(());

thread_local! {
    /// Does this thread hold [`FD_CHANGES`] for writing? Then its closes (the shim's own, of fds
    /// it just made, through std and so through the hooks) neither wait for the lock nor take it
    /// again.
    static MAKING_HERE: Cell<bool> = const { Cell::new(false) };
    /// Does this thread hold it for reading? Then a close from a signal handler that interrupted
    /// the first does not ask again: with a writer waiting, that second read would wait for the
    /// writer, and the writer for the first.
    static CLOSING_HERE: Cell<bool> = const { Cell::new(false) };
}

/// [`FD_CHANGES`] held for reading (or nothing, if this thread holds it already either way).
pub(crate) struct Closing(Option<RwLockReadGuard<'static, ()>>);

impl Drop for Closing {
    fn drop(&mut self) {
        if self.0.is_some() {
            CLOSING_HERE.set(false);
        }
    }
}

/// Held by the app's closes (many at once).
pub(crate) fn app_closing() -> Closing {
    if MAKING_HERE.get() || CLOSING_HERE.get() {
        return Closing(None);
    }
    let guard = FD_CHANGES.read().unwrap_or_else(|poisoned| poisoned.into_inner());
    CLOSING_HERE.set(true);
    Closing(Some(guard))
}

/// [`FD_CHANGES`] held for writing (or nothing, if this thread holds it already).
pub(crate) struct Making(Option<RwLockWriteGuard<'static, ()>>);

impl Drop for Making {
    fn drop(&mut self) {
        if self.0.is_some() {
            MAKING_HERE.set(false);
        }
    }
}

/// Held while the shim makes, marks, unmarks or closes fds of its own.
pub(crate) fn shim_making() -> Making {
    if MAKING_HERE.get() {
        return Making(None);
    }
    // (A thread inside an app's close never gets here: the close hooks make no fds and drop no
    // sockets while they hold the read lock.)
    let guard = FD_CHANGES.write().unwrap_or_else(|poisoned| poisoned.into_inner());
    MAKING_HERE.set(true);
    Making(Some(guard))
}

/// Makes one fd of the shim's with `create` (the fd, or -1 with errno set) and takes it for the
/// shim ([`make_internal`]), with no moment in which the app's closes can take it.
pub(crate) fn new_internal(create: impl FnOnce() -> c_int) -> c_int {
    let _making = shim_making();
    let fd = create();
    if fd < 0 {
        return fd;
    }
    pause_for_tests();
    make_internal(fd)
}

/// Unmarks and closes one of the shim's fds; the close's result (0, or -1 with errno set).
pub(crate) fn close_internal(fd: c_int) -> c_int {
    let _making = shim_making();
    fds::clear(fd);
    // SAFETY: the shim's own fd, closed once.
    unsafe { (real().close)(fd) }
}

/// The files the shim opens through fsbridge (the outbox log, inbox files, bells, ledgers) are
/// the shim's fds too: made with [`new_internal`], closed with [`close_internal`].
struct Keeper;

impl fsbridge::disk::FdKeeper for Keeper {
    fn keep(&self, open: &mut dyn FnMut() -> c_int) -> c_int {
        new_internal(open)
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
