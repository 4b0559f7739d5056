//! The exported symbols. Each is one decision: if the fd is not ours, the real function; otherwise
//! the shim's logic in `socket`.
//!
//! Every hook is a plain `#[unsafe(no_mangle)] extern "C"` function made by [`hooks!`], which runs
//! the body under `catch_unwind`: a panic (a bug in the shim) fails that one call with EIO and is
//! logged, and never unwinds into C. redhook's `hook!` is not used: on a panic it calls the real
//! function, which is wrong for a fabric fd (the app's fd is then an AF_UNIX socket), and it
//! resolves that function lazily with `dlsym` inside the hook. redhook's resolver (`dlsym_next`)
//! does fill the table of real functions, eagerly, in `real`.
//!
//! `fcntl`, `fcntl64` and `ioctl` are variadic in C, and Rust can only define variadic functions on
//! nightly. On the Linux ABIs (x86-64 System V, AArch64 AAPCS64) a variadic integer or pointer
//! argument travels in the same register as a named one, so these hooks take the third argument
//! as a named `c_ulong`/pointer and hand it on to the real (variadic) function unchanged; commands
//! without an argument pass on whatever the register held, which libc ignores.

use std::panic::{AssertUnwindSafe, catch_unwind};

use libc::{c_int, c_uint, c_ulong, c_void, iovec, mmsghdr, msghdr, size_t, sockaddr, socklen_t, ssize_t, timespec};

use crate::fds::{self, is_fabric, is_ours};
use crate::log;
use crate::real::real;
use crate::socket::{self as logic, IOV_MAX, NameOut, Route};
use crate::sys::{fail, set_errno};

/// What a hook returns when its body panicked: -1 (errno EIO).
trait Failure {
    fn failure() -> Self;
}

impl Failure for c_int {
    fn failure() -> c_int {
        -1
    }
}

impl Failure for ssize_t {
    fn failure() -> ssize_t {
        -1
    }
}

impl Failure for () {
    fn failure() {}
}

fn guarded<R: Failure>(name: &str, body: impl FnOnce() -> R) -> R {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(result) => result,
        Err(_) => {
            log!("bug: {name} panicked; the call fails with EIO");
            set_errno(libc::EIO);
            R::failure()
        }
    }
}

macro_rules! hooks {
    ($(
        $(#[$meta:meta])*
        fn $name:ident($($arg:ident: $type:ty),* $(,)?) -> $ret:ty $body:block
    )*) => {$(
        $(#[$meta])*
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name($($arg: $type),*) -> $ret {
            guarded(stringify!($name), move || $body)
        }
    )*};
}

/// Builds a slice from an app's (pointer, length), tolerating a null pointer for zero length.
///
/// # Safety
/// `pointer` valid for `len` elements when `len > 0`.
unsafe fn slice<'a, T>(pointer: *const T, len: usize) -> &'a [T] {
    if len == 0 || pointer.is_null() { &[] } else { unsafe { std::slice::from_raw_parts(pointer, len) } }
}

/// One datagram's payload from the app's iovecs.
///
/// # Safety
/// Each iovec valid as the app promises.
unsafe fn gather(vectors: &[iovec]) -> Vec<u8> {
    let mut payload = Vec::with_capacity(vectors.iter().map(|vector| vector.iov_len).sum());
    for vector in vectors {
        payload.extend_from_slice(unsafe { slice(vector.iov_base.cast::<u8>(), vector.iov_len) });
    }
    payload
}

/// The app's iovec array, or EINVAL for a count the kernel would refuse.
///
/// # Safety
/// `vectors` valid for `count` iovecs.
unsafe fn vectors<'a>(vectors: *const iovec, count: usize) -> Result<&'a [iovec], c_int> {
    if count > IOV_MAX {
        return Err(libc::EMSGSIZE);
    }
    Ok(unsafe { slice(vectors, count) })
}

/// recvfrom and friends on a fabric fd.
fn receive_into(
    fd: c_int,
    buf: *mut c_void,
    len: size_t,
    flags: c_int,
    name: *mut sockaddr,
    name_len: *mut socklen_t,
) -> ssize_t {
    let vector = iovec { iov_base: buf, iov_len: len };
    match logic::receive(fd, std::slice::from_ref(&vector), flags, NameOut { name, len: name_len }) {
        Ok((received, _)) => received,
        Err(errno) => fail(errno),
    }
}

/// sendmsg on an fd of ours: one datagram, control messages ignored on the fabric (TTL, TOS and
/// pktinfo have no meaning there); everything the kernel carries keeps its control messages.
///
/// # Safety
/// `message` valid as for sendmsg(2).
unsafe fn send_message(fd: c_int, message: &msghdr, flags: c_int) -> ssize_t {
    let destination = (message.msg_name as *const sockaddr, message.msg_namelen);
    match logic::route(fd, destination) {
        Err(errno) => fail(errno),
        Ok(Route::Kernel(target)) => unsafe { (real().sendmsg)(target, message, flags) },
        Ok(Route::Fabric(sock, destination)) => {
            let vectors = match unsafe { vectors(message.msg_iov, message.msg_iovlen) } {
                Ok(vectors) => vectors,
                Err(errno) => return fail(errno),
            };
            let payload = unsafe { gather(vectors) };
            logic::send_fabric(fd, &sock, &payload, flags, destination)
        }
    }
}

/// recvmsg on a fabric fd. The error queue belongs to the real UDP socket.
///
/// # Safety
/// `message` valid as for recvmsg(2).
unsafe fn receive_message(fd: c_int, message: &mut msghdr, flags: c_int) -> ssize_t {
    if flags & libc::MSG_ERRQUEUE != 0 {
        let side = crate::state::shim().and_then(|shim| shim.sock(fd)).map_or(fd, |sock| sock.side);
        return unsafe { (real().recvmsg)(side, message, flags) };
    }
    let vectors = match unsafe { vectors(message.msg_iov, message.msg_iovlen) } {
        Ok(vectors) => vectors,
        Err(errno) => return fail(errno),
    };
    let mut name_len = message.msg_namelen;
    let name = message.msg_name as *mut sockaddr;
    match logic::receive(fd, vectors, flags, NameOut { name, len: &mut name_len }) {
        Ok((received, out_flags)) => {
            message.msg_namelen = if name.is_null() { 0 } else { name_len };
            // The one control message a fabric datagram has: IP_PKTINFO, when the app asked for
            // it (servers on the wildcard address learn which address a query came to from it,
            // and dnsmasq drops queries without it).
            let (length, truncated) = unsafe { logic::fabric_control(fd, message.msg_control, message.msg_controllen) };
            message.msg_controllen = length;
            message.msg_flags = out_flags | if truncated { libc::MSG_CTRUNC } else { 0 };
            received
        }
        Err(errno) => fail(errno),
    }
}

fn check_fortified(len: size_t, buf_len: size_t) {
    if len > buf_len {
        // What glibc's fortified variants do: the program has a buffer overflow.
        unsafe { (real().__chk_fail)() };
    }
}

/// After a successful dup of `old` into `new`: the new fd shares the entry.
fn duplicated(old: c_int, new: c_int) -> c_int {
    let involved = fds::kind(old) != fds::Kind::None || fds::kind(new) != fds::Kind::None;
    if new >= 0 && involved {
        match crate::state::shim() {
            Some(shim) => shim.on_dup(old, new),
            // A refusing shim only watches candidates: the copy is one too (or no longer one).
            None if crate::refusal().is_some() => fds::copy(old, new),
            None => {}
        }
    }
    new
}

/// fcntl and fcntl64: F_DUPFD/F_DUPFD_CLOEXEC make a new fd sharing the entry.
fn control(
    fd: c_int,
    command: c_int,
    argument: c_ulong,
    function: unsafe extern "C" fn(c_int, c_int, ...) -> c_int,
) -> c_int {
    let result = unsafe { function(fd, command, argument) };
    if result >= 0 && matches!(command, libc::F_DUPFD | libc::F_DUPFD_CLOEXEC) && is_ours(fd) {
        return duplicated(fd, result);
    }
    result
}

hooks! {
    fn socket(domain: c_int, socket_type: c_int, protocol: c_int) -> c_int {
        let fd = unsafe { (real().socket)(domain, socket_type, protocol) };
        if fd >= 0 {
            logic::on_socket(fd, domain, socket_type, protocol);
        }
        fd
    }

    fn bind(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int {
        logic::bind(fd, addr, len)
    }

    fn connect(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int {
        logic::connect(fd, addr, len)
    }

    fn sendto(fd: c_int, buf: *const c_void, len: size_t, flags: c_int, addr: *const sockaddr, addr_len: socklen_t) -> ssize_t {
        if !is_ours(fd) {
            return unsafe { (real().sendto)(fd, buf, len, flags, addr, addr_len) };
        }
        logic::send(fd, unsafe { slice(buf.cast::<u8>(), len) }, flags, (addr, addr_len))
    }

    fn send(fd: c_int, buf: *const c_void, len: size_t, flags: c_int) -> ssize_t {
        if !is_fabric(fd) {
            return unsafe { (real().sendto)(fd, buf, len, flags, std::ptr::null(), 0) };
        }
        logic::send(fd, unsafe { slice(buf.cast::<u8>(), len) }, flags, (std::ptr::null(), 0))
    }

    fn write(fd: c_int, buf: *const c_void, len: size_t) -> ssize_t {
        if !is_fabric(fd) {
            return unsafe { (real().write)(fd, buf, len) };
        }
        logic::send(fd, unsafe { slice(buf.cast::<u8>(), len) }, 0, (std::ptr::null(), 0))
    }

    /// As the kernel: a zero-length write() sends an empty datagram, a zero-length writev() sends
    /// nothing.
    fn writev(fd: c_int, iov: *const iovec, count: c_int) -> ssize_t {
        if !is_fabric(fd) {
            return unsafe { (real().writev)(fd, iov, count) };
        }
        let Ok(count) = usize::try_from(count) else { return fail(libc::EINVAL) };
        match unsafe { vectors(iov, count) } {
            Ok(vectors) if vectors.iter().all(|vector| vector.iov_len == 0) => 0,
            Ok(vectors) => logic::send(fd, &unsafe { gather(vectors) }, 0, (std::ptr::null(), 0)),
            Err(_) => fail(libc::EINVAL),
        }
    }

    fn sendmsg(fd: c_int, message: *const msghdr, flags: c_int) -> ssize_t {
        if !is_ours(fd) || message.is_null() {
            return unsafe { (real().sendmsg)(fd, message, flags) };
        }
        unsafe { send_message(fd, &*message, flags) }
    }

    fn sendmmsg(fd: c_int, messages: *mut mmsghdr, count: c_uint, flags: c_int) -> c_int {
        if !is_ours(fd) || messages.is_null() {
            return unsafe { (real().sendmmsg)(fd, messages, count, flags) };
        }
        // As the kernel: at most UIO_MAXIOV messages; an error after the first ends the batch and
        // the count so far is returned.
        let count = (count as usize).min(IOV_MAX);
        for index in 0..count {
            let entry = unsafe { &mut *messages.add(index) };
            let sent = unsafe { send_message(fd, &entry.msg_hdr, flags) };
            if sent < 0 {
                return if index == 0 { -1 } else { index as c_int };
            }
            entry.msg_len = sent as c_uint;
        }
        count as c_int
    }

    fn recvfrom(fd: c_int, buf: *mut c_void, len: size_t, flags: c_int, addr: *mut sockaddr, addr_len: *mut socklen_t) -> ssize_t {
        if !is_fabric(fd) {
            return unsafe { (real().recvfrom)(fd, buf, len, flags, addr, addr_len) };
        }
        receive_into(fd, buf, len, flags, addr, addr_len)
    }

    fn __recvfrom_chk(fd: c_int, buf: *mut c_void, len: size_t, buf_len: size_t, flags: c_int, addr: *mut sockaddr, addr_len: *mut socklen_t) -> ssize_t {
        check_fortified(len, buf_len);
        if !is_fabric(fd) {
            return unsafe { (real().recvfrom)(fd, buf, len, flags, addr, addr_len) };
        }
        receive_into(fd, buf, len, flags, addr, addr_len)
    }

    fn recv(fd: c_int, buf: *mut c_void, len: size_t, flags: c_int) -> ssize_t {
        if !is_fabric(fd) {
            return unsafe { (real().recvfrom)(fd, buf, len, flags, std::ptr::null_mut(), std::ptr::null_mut()) };
        }
        receive_into(fd, buf, len, flags, std::ptr::null_mut(), std::ptr::null_mut())
    }

    fn __recv_chk(fd: c_int, buf: *mut c_void, len: size_t, buf_len: size_t, flags: c_int) -> ssize_t {
        check_fortified(len, buf_len);
        if !is_fabric(fd) {
            return unsafe { (real().recvfrom)(fd, buf, len, flags, std::ptr::null_mut(), std::ptr::null_mut()) };
        }
        receive_into(fd, buf, len, flags, std::ptr::null_mut(), std::ptr::null_mut())
    }

    /// As the kernel: a zero-length read() or readv() returns 0 and leaves the datagram queued
    /// (recv() with a zero-length buffer takes it).
    fn read(fd: c_int, buf: *mut c_void, len: size_t) -> ssize_t {
        if !is_fabric(fd) || len == 0 {
            return unsafe { (real().read)(fd, buf, len) };
        }
        receive_into(fd, buf, len, 0, std::ptr::null_mut(), std::ptr::null_mut())
    }

    fn __read_chk(fd: c_int, buf: *mut c_void, len: size_t, buf_len: size_t) -> ssize_t {
        check_fortified(len, buf_len);
        if !is_fabric(fd) || len == 0 {
            return unsafe { (real().read)(fd, buf, len) };
        }
        receive_into(fd, buf, len, 0, std::ptr::null_mut(), std::ptr::null_mut())
    }

    fn readv(fd: c_int, iov: *const iovec, count: c_int) -> ssize_t {
        if !is_fabric(fd) {
            return unsafe { (real().readv)(fd, iov, count) };
        }
        let Ok(count) = usize::try_from(count) else { return fail(libc::EINVAL) };
        let vectors = match unsafe { vectors(iov, count) } {
            Ok(vectors) if vectors.iter().all(|vector| vector.iov_len == 0) => return 0,
            Ok(vectors) => vectors,
            Err(_) => return fail(libc::EINVAL),
        };
        let out = NameOut { name: std::ptr::null_mut(), len: std::ptr::null_mut() };
        match logic::receive(fd, vectors, 0, out) {
            Ok((received, _)) => received,
            Err(errno) => fail(errno),
        }
    }

    fn recvmsg(fd: c_int, message: *mut msghdr, flags: c_int) -> ssize_t {
        if !is_fabric(fd) || message.is_null() {
            return unsafe { (real().recvmsg)(fd, message, flags) };
        }
        unsafe { receive_message(fd, &mut *message, flags) }
    }

    fn recvmmsg(fd: c_int, messages: *mut mmsghdr, count: c_uint, flags: c_int, timeout: *mut timespec) -> c_int {
        if !is_fabric(fd) || messages.is_null() {
            return unsafe { (real().recvmmsg)(fd, messages, count, flags, timeout) };
        }
        let deadline = (!timeout.is_null()).then(|| {
            let timeout = unsafe { *timeout };
            std::time::Instant::now()
                + std::time::Duration::new(timeout.tv_sec.max(0) as u64, timeout.tv_nsec.clamp(0, 999_999_999) as u32)
        });
        let count = (count as usize).min(IOV_MAX);
        let mut received = 0;
        while received < count {
            // MSG_WAITFORONE: after the first datagram, take only what is already there.
            let mut each = flags & !libc::MSG_WAITFORONE;
            if received > 0 && flags & libc::MSG_WAITFORONE != 0 {
                each |= libc::MSG_DONTWAIT;
            }
            let entry = unsafe { &mut *messages.add(received) };
            let length = unsafe { receive_message(fd, &mut entry.msg_hdr, each) };
            if length < 0 {
                return if received == 0 { -1 } else { received as c_int };
            }
            entry.msg_len = length as c_uint;
            received += 1;
            // As the kernel: the timeout is checked after each datagram.
            if deadline.is_some_and(|deadline| std::time::Instant::now() >= deadline) {
                break;
            }
        }
        received as c_int
    }

    fn close(fd: c_int) -> c_int {
        if fds::kind(fd) == fds::Kind::None {
            // Not while the shim is making an fd of its own: it may have this number right now.
            let _closing = crate::sys::app_closing();
            if fds::kind(fd) == fds::Kind::None {
                return unsafe { (real().close)(fd) };
            }
        }
        logic::close(fd)
    }

    fn close_range(first: c_uint, last: c_uint, flags: c_int) -> c_int {
        logic::close_range(first, last, flags)
    }

    /// glibc's closefrom calls the close_range system call directly, past the hook above: every
    /// fd of the shim's at or above `low` would go.
    fn closefrom(low: c_int) -> () {
        logic::closefrom(low)
    }

    fn dup(fd: c_int) -> c_int {
        let new = unsafe { (real().dup)(fd) };
        if is_ours(fd) { duplicated(fd, new) } else { new }
    }

    fn dup2(old: c_int, new: c_int) -> c_int {
        let result = unsafe { (real().dup2)(old, new) };
        duplicated(old, result)
    }

    fn dup3(old: c_int, new: c_int, flags: c_int) -> c_int {
        let result = unsafe { (real().dup3)(old, new, flags) };
        duplicated(old, result)
    }

    /// Variadic in C; see the module docs for why the third argument is a named `c_ulong`.
    fn fcntl(fd: c_int, command: c_int, argument: c_ulong) -> c_int {
        control(fd, command, argument, real().fcntl)
    }

    /// glibc's 64-bit-offset name for fcntl (what libpython imports); as [`fcntl`].
    fn fcntl64(fd: c_int, command: c_int, argument: c_ulong) -> c_int {
        match real().fcntl64 {
            Some(function) => control(fd, command, argument, function),
            None => control(fd, command, argument, real().fcntl),
        }
    }

    /// Variadic in C; see the module docs. FIONREAD on a fabric fd reports the next datagram's
    /// payload without the shim's header; everything else (FIONBIO…) acts on the app's fd itself.
    fn ioctl(fd: c_int, request: c_ulong, argument: *mut c_void) -> c_int {
        if is_fabric(fd) && request == libc::FIONREAD && !argument.is_null() {
            return match logic::next_datagram_bytes(fd) {
                Ok(bytes) => {
                    unsafe { argument.cast::<c_int>().write_unaligned(bytes) };
                    0
                }
                Err(errno) => fail(errno) as c_int,
            };
        }
        unsafe { (real().ioctl)(fd, request, argument) }
    }

    fn shutdown(fd: c_int, how: c_int) -> c_int {
        if !is_fabric(fd) {
            return unsafe { (real().shutdown)(fd, how) };
        }
        logic::shutdown(fd, how)
    }

    fn getsockname(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int {
        logic::getsockname(fd, addr, len)
    }

    fn getpeername(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int {
        logic::getpeername(fd, addr, len)
    }

    fn getsockopt(fd: c_int, level: c_int, name: c_int, value: *mut c_void, len: *mut socklen_t) -> c_int {
        logic::getsockopt(fd, level, name, value, len)
    }

    fn setsockopt(fd: c_int, level: c_int, name: c_int, value: *const c_void, len: socklen_t) -> c_int {
        logic::setsockopt(fd, level, name, value, len)
    }
}

/// Credential hooks: before a root app becomes another user, a helper that keeps root for the
/// volume's files is started (see `privsep`). The call itself is the real one.
macro_rules! credential_hooks {
    ($($name:ident($($arg:ident: $type:ty),*);)*) => {
        hooks! {
            $(fn $name($($arg: $type),*) -> c_int {
                crate::privsep::before_credentials_change();
                unsafe { (real().$name)($($arg),*) }
            })*
        }
    };
}

credential_hooks! {
    setuid(uid: libc::uid_t);
    setgid(gid: libc::gid_t);
    seteuid(uid: libc::uid_t);
    setegid(gid: libc::gid_t);
    setreuid(real_uid: libc::uid_t, effective: libc::uid_t);
    setregid(real_gid: libc::gid_t, effective: libc::gid_t);
    setresuid(real_uid: libc::uid_t, effective: libc::uid_t, saved: libc::uid_t);
    setresgid(real_gid: libc::gid_t, effective: libc::gid_t, saved: libc::gid_t);
    setgroups(count: size_t, groups: *const libc::gid_t);
    initgroups(user: *const libc::c_char, group: libc::gid_t);
}
