//! Wakeups for the receive thread: an inotify watch on this node's bell directory, and a nudge
//! (an eventfd) for news of the process's own.
//!
//! On a local file system (a volume on the array itself, a test's directory) the kernel reports
//! the server's bell writes at once, so an ack or an inbox file is found without waiting for the
//! next pass. An NFS or SMB client is never told of a change made on the server, so on any file
//! system not known to be local no watch is made (it would only take one of the user's inotify
//! instances, 128 by default): the pass every `FTSS_POLL_MS` finds news, as it does anyway. The
//! hint only ever starts a pass early; it never replaces one.
//!
//! The nudge is for a socket that became a fabric socket while the receive thread slept: a thread
//! that found no socket and no sender waiting for acks reads no bells and does not listen to
//! them, and would otherwise look again only at its next poll.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicI32, Ordering};

use libc::c_int;

use crate::real::real;

/// The process's inotify fd (-1 before the first watch). The shim's own: the app's `close` leaves
/// it alone, and a forked child closes its inherited copy ([`abandon_in_child`]).
static FD: AtomicI32 = AtomicI32::new(-1);

/// The receive thread's nudge eventfd (-1 before it first waits). Our own, as `FD` is.
static NUDGE: AtomicI32 = AtomicI32::new(-1);

/// The events that mean a bell was written or a new one appeared.
const EVENTS: u32 = libc::IN_MODIFY | libc::IN_CREATE | libc::IN_MOVED_TO;

/// `statfs` types of local file systems, where inotify sees every writer's changes: ext2/3/4, XFS,
/// Btrfs, tmpfs, ZFS, F2FS, overlayfs, bcachefs, JFS, ReiserFS.
const LOCAL_FILE_SYSTEMS: &[libc::__fsword_t] = &[
    0xEF53,
    0x5846_5342,
    0x9123_683E,
    0x0102_1994,
    0x2FC1_2FC1,
    0xF2F5_2010,
    0x794C_7630,
    0xCA45_1A4E,
    0x3153_464A,
    0x5265_4973,
];

/// Is `path` on a local file system? (No for NFS, SMB, FUSE and anything unknown.)
fn is_local(path: &CString) -> bool {
    // SAFETY: statfs is plain data; all zeroes is a valid value.
    let mut stats: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string and a struct of the right type for statfs to fill.
    if unsafe { libc::statfs(path.as_ptr(), &mut stats) } != 0 {
        return false;
    }
    LOCAL_FILE_SYSTEMS.contains(&stats.f_type)
}

/// Watches `dir` (once it exists, and only on a local file system); returns the fd to poll, or
/// None (not local, no inotify, no directory yet: the caller tries again at its next sweep and
/// polls meanwhile).
pub fn watch(dir: &Path) -> Option<c_int> {
    let path = CString::new(dir.as_os_str().as_bytes()).ok()?;
    if !is_local(&path) {
        return None;
    }
    let mut fd = FD.load(Ordering::Acquire);
    if fd < 0 {
        // SAFETY: inotify_init1 has no preconditions.
        fd = crate::sys::new_internal(|| unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) });
        if fd < 0 {
            return None;
        }
        FD.store(fd, Ordering::Release);
    }
    // SAFETY: fd is our inotify fd and path a valid C string.
    let added = unsafe { libc::inotify_add_watch(fd, path.as_ptr(), EVENTS) };
    (added >= 0).then_some(fd)
}

/// The nudge eventfd for the receive thread to poll (made on first use); None if none can be made.
pub fn nudge_fd() -> Option<c_int> {
    let fd = NUDGE.load(Ordering::Acquire);
    if fd >= 0 {
        return Some(fd);
    }
    // SAFETY: eventfd has no preconditions.
    let fd = crate::sys::new_internal(|| unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) });
    if fd < 0 {
        return None;
    }
    NUDGE.store(fd, Ordering::Release);
    Some(fd)
}

/// Wakes the receive thread's wait (a new fabric socket). Nothing before its first wait: its
/// first pass comes anyway.
pub fn nudge() {
    let fd = NUDGE.load(Ordering::Acquire);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a local into our eventfd; a full counter (EAGAIN) means a
        // wakeup is pending already.
        unsafe { (real().write)(fd, (&raw const one).cast(), 8) };
    }
}

/// Reads away the events that woke the poll (they only say "look now").
pub fn drain(fd: c_int) {
    let mut buffer = [0u8; 4096];
    // SAFETY: reading into a local buffer from our non-blocking fd; stops at EAGAIN.
    while unsafe { (real().read)(fd, buffer.as_mut_ptr().cast(), buffer.len()) } > 0 {}
}

/// In a forked child: closes the copies of the parent's inotify and nudge fds (the child's
/// receive thread makes its own).
pub fn abandon_in_child() {
    for slot in [&FD, &NUDGE] {
        let fd = slot.swap(-1, Ordering::AcqRel);
        if fd >= 0 {
            crate::sys::close_internal(fd);
        }
    }
}
