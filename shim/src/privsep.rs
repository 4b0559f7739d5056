//! Privilege separation for daemons that drop root.
//!
//! dnsmasq, named, chronyd, ntpd and rsyslogd (`$PrivDropToUser`) bind their sockets as root and
//! then become an unprivileged user. The volume, as root made it, may then be closed to them, and
//! the shim could no longer claim inbox files or start a log segment. So the first time the app
//! changes its credentials while it is root (`setuid`, `setgid`, `setgroups`, `initgroups` and
//! their `re`/`res`/`e` forms), the shim first forks a helper that stays root, as OpenSSH's
//! monitor does, and hands it every path operation inside the volume from then on
//! ([`fsbridge::fsops`]). The helper opens files and passes the descriptors back (`SCM_RIGHTS`);
//! reading, writing and syncing them happen in the app as before, so the data path is unchanged.
//!
//! The helper:
//! - is forked twice with the raw `clone` system call (no `atfork` handlers, no shim threads),
//!   so it is adopted by init and the app never sees it as a child; it starts its own session,
//!   so signals to the app's process group do not reach it;
//! - keeps only its end of a `SOCK_SEQPACKET` socketpair and a descriptor of the volume's root,
//!   and closes everything else the app had open;
//! - resolves every path beneath that root (`openat2` with `RESOLVE_BENEATH`, then `*at` calls on
//!   the parent with a single-component name), so a compromised app cannot reach outside the
//!   volume through it;
//! - allocates nothing and takes no lock (the app may have had other threads at the fork): stack
//!   buffers and plain system calls only;
//! - exits when every process holding the app's end (the app, its forked children) has gone.
//!
//! Each request carries a fresh socket for its answer, so threads and forked children of the app
//! can share the helper without mixing answers.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use fsbridge::fsops::{self, Request};
use libc::c_int;

use crate::log;
use crate::real::real;

/// Longest path (relative to the volume) a request carries.
const PATH_BYTES_MAX: usize = 4095;
/// op (1), padding (3), flags (4), mode (4), two path lengths (2 + 2).
const HEADER_BYTES: usize = 16;
const REQUEST_BYTES_MAX: usize = HEADER_BYTES + 2 * PATH_BYTES_MAX;

const OP_OPEN: u8 = 1;
const OP_MKDIR: u8 = 2;
const OP_RENAME: u8 = 3;
const OP_LINK: u8 = 4;
const OP_UNLINK: u8 = 5;
const OP_RMDIR: u8 = 6;
const OP_TOUCH: u8 = 7;

static STARTED: AtomicBool = AtomicBool::new(false);

/// Called by the credential hooks before the real call: starts the helper once, if the app is
/// root and the shim works on a volume.
pub fn before_credentials_change() {
    let Some(shim) = crate::state::shim() else { return };
    if shim.config.volume.as_os_str().is_empty() || fsops::helped() {
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || STARTED.swap(true, Ordering::AcqRel) {
        return;
    }
    let root = shim.volume.root().to_path_buf();
    match start(&root) {
        Ok((client, pid)) => {
            fsops::install(root, Box::new(client));
            log!("the app changes its credentials: helper {pid} keeps root for the volume's files");
        }
        Err(error) => log!(
            "the app changes its credentials, and no helper could be started to keep root for the volume ({error}): \
             files the app's new user may not open will fail"
        ),
    }
}

/// The app's side: sends requests to the helper.
struct Client {
    fd: c_int,
}

/// Forks the helper; returns the client and the helper's pid.
fn start(root: &Path) -> io::Result<(Client, i32)> {
    let path =
        std::ffi::CString::new(root.as_os_str().as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: a NUL-terminated path.
    let root_fd = unsafe { libc::open(path.as_ptr(), libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC) };
    if root_fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut pair = [0 as c_int; 2];
    // SAFETY: pair has room for two fds.
    if unsafe { (real().socketpair)(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0, pair.as_mut_ptr()) }
        != 0
    {
        let error = io::Error::last_os_error();
        // SAFETY: our fd.
        unsafe { (real().close)(root_fd) };
        return Err(error);
    }
    let (app_end, helper_end) = (pair[0], pair[1]);
    let (ready_read, ready_write) = {
        let mut pipe = [0 as c_int; 2];
        // SAFETY: pipe has room for two fds.
        if unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            let error = io::Error::last_os_error();
            // SAFETY: our fds.
            unsafe {
                (real().close)(root_fd);
                (real().close)(app_end);
                (real().close)(helper_end);
            }
            return Err(error);
        }
        (pipe[0], pipe[1])
    };
    // SAFETY: raw fork (no atfork handlers run, so no shim lock is taken and no shim thread is
    // started in the child); the child only makes system calls on its own stack.
    let child = unsafe { raw_fork() };
    if child == 0 {
        // SAFETY: in the first child: fork the helper and leave, so that init adopts it.
        unsafe {
            let helper = raw_fork();
            if helper == 0 {
                serve(helper_end, root_fd);
            }
            let pid = helper as i32;
            libc::write(ready_write, (&raw const pid).cast(), 4);
            libc::_exit(0);
        }
    }
    // SAFETY: our fds; waitpid on our own child.
    unsafe {
        (real().close)(helper_end);
        (real().close)(root_fd);
        (real().close)(ready_write);
    }
    if child < 0 {
        let error = io::Error::last_os_error();
        // SAFETY: our fds.
        unsafe {
            (real().close)(app_end);
            (real().close)(ready_read);
        }
        return Err(error);
    }
    let mut pid: i32 = -1;
    // SAFETY: reading 4 bytes into pid; then reaping the first child (it exits at once).
    unsafe {
        let got = libc::read(ready_read, (&raw mut pid).cast(), 4);
        (real().close)(ready_read);
        libc::waitpid(child as i32, std::ptr::null_mut(), 0);
        if got != 4 || pid <= 0 {
            (real().close)(app_end);
            return Err(io::Error::other("the helper could not be forked"));
        }
    }
    let fd = {
        let _making = crate::sys::shim_making();
        crate::sys::make_internal(app_end)
    };
    Ok((Client { fd }, pid))
}

/// fork(2) without glibc's wrapper: returns 0 in the child, the child's pid in the parent.
///
/// # Safety
/// The child of a multithreaded process may only make system calls (no allocation, no locks).
unsafe fn raw_fork() -> libc::c_long {
    // SAFETY: clone with only SIGCHLD is fork; the child continues on a copy of this stack.
    unsafe { libc::syscall(libc::SYS_clone, libc::SIGCHLD as libc::c_ulong, 0usize, 0usize, 0usize, 0usize) }
}

impl fsops::Helper for Client {
    fn make(&self, request: Request<'_>) -> io::Result<Option<OwnedFd>> {
        let (op, flags, mode, a, b): (u8, i32, u32, &Path, &Path) = match request {
            Request::Open { path, flags, mode } => (OP_OPEN, flags, mode, path, Path::new("")),
            Request::Mkdir { path, mode } => (OP_MKDIR, 0, mode, path, Path::new("")),
            Request::Rename { from, to } => (OP_RENAME, 0, 0, from, to),
            Request::Link { from, to } => (OP_LINK, 0, 0, from, to),
            Request::Unlink { path } => (OP_UNLINK, 0, 0, path, Path::new("")),
            Request::Rmdir { path } => (OP_RMDIR, 0, 0, path, Path::new("")),
            Request::Touch { path } => (OP_TOUCH, 0, 0, path, Path::new("")),
        };
        let message = encode(op, flags, mode, a.as_os_str().as_bytes(), b.as_os_str().as_bytes())?;
        let mut pair = [0 as c_int; 2];
        // The shim's own fds while they live (an app's close loop must not take them).
        let (mine, theirs) = {
            let _making = crate::sys::shim_making();
            // SAFETY: pair has room for two fds.
            if unsafe {
                (real().socketpair)(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0, pair.as_mut_ptr())
            } != 0
            {
                return Err(io::Error::last_os_error());
            }
            (
                crate::sys::InternalFd(crate::sys::make_internal(pair[0])),
                crate::sys::InternalFd(crate::sys::make_internal(pair[1])),
            )
        };
        // SAFETY: valid buffers for the duration of the calls.
        let sent = unsafe { send_with_fd(self.fd, &message, Some(theirs.0)) };
        drop(theirs);
        if sent < 0 {
            let error = io::Error::last_os_error();
            return Err(io::Error::other(format!("the volume's privilege helper is gone: {error}")));
        }
        let mut answer = [0u8; 4];
        let (got, fd) = loop {
            // SAFETY: valid buffer for the call.
            match unsafe { receive_with_fd(mine.0, &mut answer, libc::MSG_CMSG_CLOEXEC) } {
                (-1, _) if io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) => continue,
                other => break other,
            }
        };
        // SAFETY: an fd the helper passed us (ours now).
        let fd = (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) });
        if got != 4 {
            return Err(io::Error::other("the volume's privilege helper did not answer"));
        }
        match i32::from_le_bytes(answer) {
            0 => Ok(fd),
            errno => Err(io::Error::from_raw_os_error(errno)),
        }
    }
}

/// One request's bytes: the header, then both paths.
fn encode(op: u8, flags: i32, mode: u32, a: &[u8], b: &[u8]) -> io::Result<Vec<u8>> {
    if a.len() > PATH_BYTES_MAX || b.len() > PATH_BYTES_MAX {
        return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    let mut message = Vec::with_capacity(HEADER_BYTES + a.len() + b.len());
    message.extend_from_slice(&[op, 0, 0, 0]);
    message.extend_from_slice(&flags.to_le_bytes());
    message.extend_from_slice(&mode.to_le_bytes());
    message.extend_from_slice(&(a.len() as u16).to_le_bytes());
    message.extend_from_slice(&(b.len() as u16).to_le_bytes());
    message.extend_from_slice(a);
    message.extend_from_slice(b);
    Ok(message)
}

/// Sends `bytes` on `fd` with `passed` attached (SCM_RIGHTS). Returns sendmsg's result.
///
/// # Safety
/// `fd` and `passed` are open descriptors.
unsafe fn send_with_fd(fd: c_int, bytes: &[u8], passed: Option<c_int>) -> isize {
    let mut control = [0u64; 4];
    let mut vector = libc::iovec { iov_base: bytes.as_ptr() as *mut libc::c_void, iov_len: bytes.len() };
    // SAFETY: a zeroed msghdr is valid; fields set below.
    let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
    message.msg_iov = &raw mut vector;
    message.msg_iovlen = 1;
    if let Some(passed) = passed {
        message.msg_control = control.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE is a pure computation.
        message.msg_controllen = unsafe { libc::CMSG_SPACE(4) } as usize;
        // SAFETY: the control buffer has room for one header and one fd (24 of 32 bytes).
        unsafe {
            let header = libc::CMSG_FIRSTHDR(&raw const message);
            (*header).cmsg_level = libc::SOL_SOCKET;
            (*header).cmsg_type = libc::SCM_RIGHTS;
            (*header).cmsg_len = libc::CMSG_LEN(4) as usize;
            std::ptr::write_unaligned(libc::CMSG_DATA(header).cast::<c_int>(), passed);
        }
    }
    // SAFETY: message points at live buffers.
    unsafe { (real().sendmsg)(fd, &raw const message, libc::MSG_NOSIGNAL) }
}

/// Receives one message into `bytes`; returns its length and the fd passed with it (-1 if none).
///
/// # Safety
/// `fd` is an open socket.
unsafe fn receive_with_fd(fd: c_int, bytes: &mut [u8], flags: c_int) -> (isize, c_int) {
    let mut control = [0u64; 4];
    let mut vector = libc::iovec { iov_base: bytes.as_mut_ptr().cast(), iov_len: bytes.len() };
    // SAFETY: a zeroed msghdr is valid; fields set below.
    let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
    message.msg_iov = &raw mut vector;
    message.msg_iovlen = 1;
    message.msg_control = control.as_mut_ptr().cast();
    message.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: message points at live buffers.
    let got = unsafe { (real().recvmsg)(fd, &raw mut message, flags) };
    let mut passed = -1;
    if got >= 0 {
        // SAFETY: walking the control messages the kernel wrote into our buffer.
        unsafe {
            let mut header = libc::CMSG_FIRSTHDR(&raw const message);
            while !header.is_null() {
                if (*header).cmsg_level == libc::SOL_SOCKET && (*header).cmsg_type == libc::SCM_RIGHTS {
                    let fd = std::ptr::read_unaligned(libc::CMSG_DATA(header).cast::<c_int>());
                    if passed < 0 {
                        passed = fd;
                    } else {
                        (real().close)(fd);
                    }
                }
                header = libc::CMSG_NXTHDR(&raw const message, header);
            }
        }
    }
    (got, passed)
}

/// The helper's loop. Never returns.
///
/// # Safety
/// Called in the freshly forked helper only.
unsafe fn serve(socket: c_int, root: c_int) -> ! {
    // SAFETY: system calls on our own descriptors and memory.
    unsafe {
        libc::setsid();
        let name = c"ftss-privsep";
        libc::prctl(libc::PR_SET_NAME, name.as_ptr());
        for signal in 1..32 {
            if signal != libc::SIGKILL && signal != libc::SIGSTOP {
                libc::signal(signal, libc::SIG_DFL);
            }
        }
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&raw mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &raw const none, std::ptr::null_mut());
        // Keep only the socket and the root: the app's other files (its sockets, its pipes to a
        // parent waiting for EOF) must not live on in the helper.
        let (low, high) = (socket.min(root), socket.max(root));
        close_range(0, low - 1);
        close_range(low + 1, high - 1);
        close_range(high + 1, c_int::MAX);
        let mut request = [0u8; REQUEST_BYTES_MAX];
        loop {
            let (got, reply) = receive_with_fd(socket, &mut request, libc::MSG_CMSG_CLOEXEC);
            if got == 0 {
                libc::_exit(0);
            }
            if got < 0 {
                if *libc::__errno_location() == libc::EINTR {
                    continue;
                }
                libc::_exit(1);
            }
            if reply < 0 {
                continue;
            }
            let (errno, fd) = perform(root, &request[..got as usize]);
            send_with_fd(reply, &errno.to_le_bytes(), (fd >= 0).then_some(fd));
            if fd >= 0 {
                (real().close)(fd);
            }
            (real().close)(reply);
        }
    }
}

/// close_range(2), or a loop where the kernel has none.
///
/// # Safety
/// Closes descriptors: only in the helper.
unsafe fn close_range(first: c_int, last: c_int) {
    if first > last || last < 0 {
        return;
    }
    let first = first.max(0);
    // SAFETY: a plain system call.
    if unsafe { libc::syscall(libc::SYS_close_range, first as libc::c_uint, last as libc::c_uint, 0) } != 0 {
        for fd in first..=last.min(4095) {
            // SAFETY: closing descriptors of the helper.
            unsafe { (real().close)(fd) };
        }
    }
}

/// Makes one request beneath `root`: (0 or errno, fd or -1).
fn perform(root: c_int, request: &[u8]) -> (i32, c_int) {
    if request.len() < HEADER_BYTES {
        return (libc::EINVAL, -1);
    }
    let op = request[0];
    let flags = i32::from_le_bytes([request[4], request[5], request[6], request[7]]);
    let mode = u32::from_le_bytes([request[8], request[9], request[10], request[11]]);
    let a_len = u16::from_le_bytes([request[12], request[13]]) as usize;
    let b_len = u16::from_le_bytes([request[14], request[15]]) as usize;
    if a_len > PATH_BYTES_MAX || b_len > PATH_BYTES_MAX || request.len() != HEADER_BYTES + a_len + b_len {
        return (libc::EINVAL, -1);
    }
    let mut a = [0u8; PATH_BYTES_MAX + 1];
    let mut b = [0u8; PATH_BYTES_MAX + 1];
    let Some(a) = c_path(&mut a, &request[HEADER_BYTES..HEADER_BYTES + a_len]) else { return (libc::EINVAL, -1) };
    let Some(b) = c_path(&mut b, &request[HEADER_BYTES + a_len..]) else { return (libc::EINVAL, -1) };
    // SAFETY: system calls with NUL-terminated paths resolved beneath root.
    unsafe {
        match op {
            OP_OPEN => {
                let fd = open_beneath(root, a, flags | libc::O_CLOEXEC, mode);
                if fd < 0 { (errno(), -1) } else { (0, fd) }
            }
            OP_MKDIR => at_parent(root, a, |parent, name| libc::mkdirat(parent, name, mode as libc::mode_t)),
            OP_UNLINK => at_parent(root, a, |parent, name| libc::unlinkat(parent, name, 0)),
            OP_RMDIR => at_parent(root, a, |parent, name| libc::unlinkat(parent, name, libc::AT_REMOVEDIR)),
            OP_TOUCH => at_parent(root, a, |parent, name| {
                libc::utimensat(parent, name, std::ptr::null(), libc::AT_SYMLINK_NOFOLLOW)
            }),
            OP_RENAME | OP_LINK => at_parent(root, a, |from_parent, from_name| {
                let (to_parent, to_name) = match split(b) {
                    Some(split) => split,
                    None => {
                        *libc::__errno_location() = libc::EINVAL;
                        return -1;
                    }
                };
                let to_dir = open_beneath(root, to_parent, libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC, 0);
                if to_dir < 0 {
                    return -1;
                }
                let result = if op == OP_RENAME {
                    libc::renameat(from_parent, from_name, to_dir, to_name.as_ptr().cast())
                } else {
                    libc::linkat(from_parent, from_name, to_dir, to_name.as_ptr().cast(), 0)
                };
                let saved = errno();
                (real().close)(to_dir);
                *libc::__errno_location() = saved;
                result
            }),
            _ => (libc::EINVAL, -1),
        }
    }
}

fn errno() -> i32 {
    // SAFETY: this thread's errno.
    unsafe { *libc::__errno_location() }
}

/// Copies `bytes` into `buffer` with a NUL; `None` if they hold a NUL or an absolute path.
fn c_path<'a>(buffer: &'a mut [u8; PATH_BYTES_MAX + 1], bytes: &[u8]) -> Option<&'a [u8]> {
    if bytes.contains(&0) || bytes.first() == Some(&b'/') {
        return None;
    }
    // "" is the root itself.
    let bytes: &[u8] = if bytes.is_empty() { b"." } else { bytes };
    buffer[..bytes.len()].copy_from_slice(bytes);
    buffer[bytes.len()] = 0;
    Some(&buffer[..=bytes.len()])
}

/// Splits a NUL-terminated relative path into its parent (without a NUL: [`open_beneath`] copies
/// it) and its last component (with its NUL); `None` for a last component of "", "." or "..".
fn split(path: &[u8]) -> Option<(&[u8], &[u8])> {
    let bytes = &path[..path.len() - 1];
    let (parent, name) = match bytes.iter().rposition(|byte| *byte == b'/') {
        Some(slash) => (&bytes[..slash], &path[slash + 1..]),
        None => (&b"."[..], path),
    };
    let name_bytes = &name[..name.len() - 1];
    if name_bytes.is_empty() || name_bytes == b"." || name_bytes == b".." {
        return None;
    }
    Some((parent, name))
}

/// Opens `path` (NUL-terminated, or a parent slice without its NUL) beneath `root`.
///
/// # Safety
/// A plain system call.
unsafe fn open_beneath(root: c_int, path: &[u8], flags: c_int, mode: u32) -> c_int {
    let mut buffer = [0u8; PATH_BYTES_MAX + 1];
    let bytes = path.strip_suffix(&[0]).unwrap_or(path);
    let bytes: &[u8] = if bytes.is_empty() { b"." } else { bytes };
    buffer[..bytes.len()].copy_from_slice(bytes);
    buffer[bytes.len()] = 0;
    let how = OpenHow {
        flags: u64::from((flags | libc::O_LARGEFILE) as u32),
        mode: if flags & libc::O_CREAT != 0 || flags & libc::O_TMPFILE == libc::O_TMPFILE {
            u64::from(mode & 0o7777)
        } else {
            0
        },
        resolve: RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS,
    };
    // SAFETY: openat2 with a valid open_how of the size given.
    unsafe {
        libc::syscall(libc::SYS_openat2, root, buffer.as_ptr(), &raw const how, std::mem::size_of::<OpenHow>()) as c_int
    }
}

/// `struct open_how` of openat2(2).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

const RESOLVE_NO_MAGICLINKS: u64 = 0x02;
const RESOLVE_BENEATH: u64 = 0x08;

/// Opens the parent of `path` beneath `root` and calls `call` with it and the last component.
///
/// # Safety
/// `call` makes a system call on the parent descriptor and a NUL-terminated name.
unsafe fn at_parent(root: c_int, path: &[u8], call: impl FnOnce(c_int, *const libc::c_char) -> c_int) -> (i32, c_int) {
    let Some((parent, name)) = split(path) else { return (libc::EINVAL, -1) };
    // SAFETY: as the function's contract.
    unsafe {
        let dir = open_beneath(root, parent, libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC, 0);
        if dir < 0 {
            return (errno(), -1);
        }
        let result = call(dir, name.as_ptr().cast());
        let saved = errno();
        (real().close)(dir);
        if result < 0 { (saved, -1) } else { (0, -1) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask(root: c_int, op: u8, flags: i32, a: &str, b: &str) -> i32 {
        let request = encode(op, flags, 0o644, a.as_bytes(), b.as_bytes()).unwrap();
        let (errno, fd) = perform(root, &request);
        if fd >= 0 {
            // SAFETY: an fd perform opened for us.
            unsafe { libc::close(fd) };
        }
        errno
    }

    /// The helper makes what is asked beneath the volume's root, and nothing outside it: not
    /// through "..", an absolute path, a symlink leading out, or a name that is "." or "..".
    #[test]
    fn the_helper_stays_beneath_the_volume() {
        let base = std::env::temp_dir().join(format!("ftss-privsep-{}", std::process::id()));
        let root_path = base.join("volume");
        std::fs::create_dir_all(root_path.join("dir")).unwrap();
        std::fs::write(base.join("secret"), b"outside").unwrap();
        std::os::unix::fs::symlink("/etc", root_path.join("etc")).unwrap();
        std::os::unix::fs::symlink("../secret", root_path.join("up")).unwrap();
        std::os::unix::fs::symlink("dir", root_path.join("inside")).unwrap();
        let name = std::ffi::CString::new(root_path.as_os_str().as_bytes()).unwrap();
        // SAFETY: a NUL-terminated path.
        let root = unsafe { libc::open(name.as_ptr(), libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC) };
        assert!(root >= 0);
        let create = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL;
        assert_eq!(ask(root, OP_OPEN, create, "dir/file", ""), 0);
        assert_eq!(ask(root, OP_OPEN, libc::O_RDONLY, "inside/file", ""), 0, "a symlink within is fine");
        assert_eq!(ask(root, OP_OPEN, libc::O_RDONLY | libc::O_DIRECTORY, "", ""), 0, "the root itself");
        assert_eq!(ask(root, OP_TOUCH, 0, "dir/file", ""), 0);
        assert_eq!(ask(root, OP_MKDIR, 0, "dir/sub", ""), 0);
        assert_eq!(ask(root, OP_RENAME, 0, "dir/file", "dir/sub/moved"), 0);
        assert_eq!(ask(root, OP_LINK, 0, "dir/sub/moved", "linked"), 0);
        assert_eq!(ask(root, OP_UNLINK, 0, "linked", ""), 0);
        assert!(root_path.join("dir/sub/moved").exists() && !root_path.join("linked").exists());
        assert_eq!(ask(root, OP_OPEN, libc::O_RDONLY, "../secret", ""), libc::EXDEV);
        assert_eq!(ask(root, OP_OPEN, libc::O_RDONLY, "up", ""), libc::EXDEV);
        assert_eq!(ask(root, OP_OPEN, libc::O_RDONLY, "etc/passwd", ""), libc::EXDEV);
        assert_eq!(ask(root, OP_OPEN, libc::O_RDONLY, "/etc/passwd", ""), libc::EINVAL);
        assert_eq!(ask(root, OP_UNLINK, 0, "../secret", ""), libc::EXDEV);
        assert_eq!(ask(root, OP_RENAME, 0, "dir/sub/moved", "../stolen"), libc::EXDEV);
        assert_eq!(ask(root, OP_LINK, 0, "up", "../copy"), libc::EXDEV);
        assert_eq!(ask(root, OP_RMDIR, 0, "dir/..", ""), libc::EINVAL);
        assert_eq!(ask(root, OP_MKDIR, 0, ".", ""), libc::EINVAL);
        assert_eq!(ask(root, OP_TOUCH, 0, "up", ""), 0, "the link itself, not what it names");
        assert_eq!(perform(root, &[OP_OPEN, 0, 0]).0, libc::EINVAL, "a short request");
        let mut bad = encode(OP_OPEN, 0, 0, b"dir", b"").unwrap();
        bad.push(b'x');
        assert_eq!(perform(root, &bad).0, libc::EINVAL, "lengths that do not add up");
        assert_eq!(std::fs::read(base.join("secret")).unwrap(), b"outside");
        // SAFETY: our fd.
        unsafe { libc::close(root) };
        std::fs::remove_dir_all(&base).unwrap();
    }
}
