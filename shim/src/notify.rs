//! A wakeup hint for the receive thread: an inotify watch on this node's bell directory.
//!
//! On a local file system (a volume on the array itself, a test's directory) the kernel reports
//! the server's bell writes at once, so an ack or an inbox file is found without waiting for the
//! next pass. An NFS or SMB client is never told of a change made on the server: there the watch
//! never fires and the pass every `FTSS_POLL_MS` finds news, as it does without it. The hint only
//! ever starts a pass early; it never replaces one.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicI32, Ordering};

use libc::c_int;

use crate::fds;
use crate::real::real;

/// The process's inotify fd (-1 before the first watch). The shim's own: the app's `close` leaves
/// it alone, and a forked child closes its inherited copy ([`abandon_in_child`]).
static FD: AtomicI32 = AtomicI32::new(-1);

/// The events that mean a bell was written or a new one appeared.
const EVENTS: u32 = libc::IN_MODIFY | libc::IN_CREATE | libc::IN_MOVED_TO;

/// Watches `dir` (once it exists); returns the fd to poll, or None (no inotify, no directory yet:
/// the caller tries again at its next sweep and polls meanwhile).
pub fn watch(dir: &Path) -> Option<c_int> {
    let mut fd = FD.load(Ordering::Acquire);
    if fd < 0 {
        // SAFETY: inotify_init1 has no preconditions.
        fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            return None;
        }
        fds::set(fd, fds::Kind::Internal, crate::addr::Family::V4);
        FD.store(fd, Ordering::Release);
    }
    let path = CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: fd is our inotify fd and path a valid C string.
    let added = unsafe { libc::inotify_add_watch(fd, path.as_ptr(), EVENTS) };
    (added >= 0).then_some(fd)
}

/// Reads away the events that woke the poll (they only say "look now").
pub fn drain(fd: c_int) {
    let mut buffer = [0u8; 4096];
    // SAFETY: reading into a local buffer from our non-blocking fd; stops at EAGAIN.
    while unsafe { (real().read)(fd, buffer.as_mut_ptr().cast(), buffer.len()) } > 0 {}
}

/// In a forked child: closes the copy of the parent's inotify fd (the child's receive thread
/// makes its own).
pub fn abandon_in_child() {
    let fd = FD.swap(-1, Ordering::AcqRel);
    if fd >= 0 {
        fds::clear(fd);
        // SAFETY: the child's copy of our fd.
        unsafe { (real().close)(fd) };
    }
}
