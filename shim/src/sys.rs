//! The shim's small system helpers, below everything else: errno, failing a call, locking
//! without poisoning, and keeping the shim's own fds out of the app's way.

use std::sync::{Mutex, MutexGuard};

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

/// Moves `fd` to a number at or above [`INTERNAL_FD_FLOOR`] (close-on-exec) and marks it the
/// shim's. Keeps the number it has if the process may not open that many.
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
