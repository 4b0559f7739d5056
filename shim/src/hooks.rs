//! The exported symbols. Each is one decision: if the fd is not ours, the real function; otherwise
//! the shim's logic in `socket`. Defined with redhook's `hook!`, which also catches a panic and falls
//! back to the real function, so the host app never unwinds into C.
//!
//! redhook resolves its own pointer to each real function; `crate::real` keeps a second table
//! because the logic in `socket` and `pump` calls real functions outside these hook bodies.

use libc::{c_int, c_void, iovec, msghdr, size_t, sockaddr, socklen_t, ssize_t};
use redhook::hook;

use crate::real::real;
use crate::socket::{self as logic, kind};

fn is_ours(fd: c_int) -> bool {
    kind(fd) != 0
}

fn is_fabric(fd: c_int) -> bool {
    kind(fd) == 2
}

fn fail(errno: c_int) -> ssize_t {
    // SAFETY: __errno_location returns this thread's errno.
    unsafe { *libc::__errno_location() = errno };
    -1
}

/// Builds a slice from an app's (pointer, length), tolerating a null pointer for zero length.
///
/// # Safety
/// `pointer` valid for `len` bytes when `len > 0`.
unsafe fn bytes<'a>(pointer: *const c_void, len: size_t) -> &'a [u8] {
    if len == 0 || pointer.is_null() { &[] } else { unsafe { std::slice::from_raw_parts(pointer.cast(), len) } }
}

/// sendto and friends: parse the destination, then route.
///
/// # Safety
/// Arguments as for sendto(2).
unsafe fn send_to(
    fd: c_int,
    buf: *const c_void,
    len: size_t,
    flags: c_int,
    addr: *const sockaddr,
    addr_len: socklen_t,
) -> ssize_t {
    match unsafe { logic::destination(addr, addr_len) } {
        Ok(dest) => logic::send(fd, unsafe { bytes(buf, len) }, flags, dest, (addr, addr_len)),
        // Not IPv4: never fabric traffic; the kernel (or the side socket) answers.
        Err(_) => {
            let target = if is_fabric(fd) {
                crate::shim().and_then(|shim| shim.sock(fd)).map_or(fd, |sock| sock.side)
            } else {
                fd
            };
            unsafe { (real().sendto)(target, buf, len, flags, addr, addr_len) }
        }
    }
}

/// recvfrom and friends on a fabric fd.
///
/// # Safety
/// Arguments as for recvfrom(2).
unsafe fn receive_into(
    fd: c_int,
    buf: *mut c_void,
    len: size_t,
    flags: c_int,
    addr: *mut sockaddr,
    addr_len: *mut socklen_t,
) -> ssize_t {
    let vector = iovec { iov_base: buf, iov_len: len };
    logic::receive(fd, std::slice::from_ref(&vector), flags, addr, addr_len, None)
}

hook! {
    unsafe fn socket(domain: c_int, socket_type: c_int, protocol: c_int) -> c_int => ftss_socket {
        let fd = unsafe { (real().socket)(domain, socket_type, protocol) };
        if fd >= 0 {
            logic::on_socket(fd, domain, socket_type);
        }
        fd
    }
}

hook! {
    unsafe fn bind(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int => ftss_bind {
        logic::bind(fd, addr, len)
    }
}

hook! {
    unsafe fn connect(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int => ftss_connect {
        logic::connect(fd, addr, len)
    }
}

hook! {
    unsafe fn sendto(fd: c_int, buf: *const c_void, len: size_t, flags: c_int, addr: *const sockaddr, addr_len: socklen_t) -> ssize_t => ftss_sendto {
        if !is_ours(fd) {
            return unsafe { (real().sendto)(fd, buf, len, flags, addr, addr_len) };
        }
        unsafe { send_to(fd, buf, len, flags, addr, addr_len) }
    }
}

hook! {
    unsafe fn send(fd: c_int, buf: *const c_void, len: size_t, flags: c_int) -> ssize_t => ftss_send {
        if !is_fabric(fd) {
            return unsafe { (real().sendto)(fd, buf, len, flags, std::ptr::null(), 0) };
        }
        unsafe { send_to(fd, buf, len, flags, std::ptr::null(), 0) }
    }
}

hook! {
    unsafe fn write(fd: c_int, buf: *const c_void, len: size_t) -> ssize_t => ftss_write {
        if !is_fabric(fd) {
            return unsafe { (real().write)(fd, buf, len) };
        }
        unsafe { send_to(fd, buf, len, 0, std::ptr::null(), 0) }
    }
}

hook! {
    unsafe fn sendmsg(fd: c_int, message: *const msghdr, flags: c_int) -> ssize_t => ftss_sendmsg {
        if !is_ours(fd) || message.is_null() {
            return unsafe { (real().sendmsg)(fd, message, flags) };
        }
        // A datagram is one payload: gather the iovecs. Control messages (TTL, TOS, pktinfo) have no
        // meaning on the fabric and are ignored there.
        let message = unsafe { &*message };
        let mut payload = Vec::new();
        for index in 0..message.msg_iovlen {
            let vector = unsafe { &*message.msg_iov.add(index) };
            payload.extend_from_slice(unsafe { bytes(vector.iov_base, vector.iov_len) });
        }
        let addr = message.msg_name as *const sockaddr;
        let dest = match unsafe { logic::destination(addr, message.msg_namelen) } {
            Ok(dest) => dest,
            Err(_) if !is_fabric(fd) => return unsafe { (real().sendmsg)(fd, message, flags) },
            Err(errno) => return fail(errno),
        };
        logic::send(fd, &payload, flags, dest, (addr, message.msg_namelen))
    }
}

hook! {
    unsafe fn recvfrom(fd: c_int, buf: *mut c_void, len: size_t, flags: c_int, addr: *mut sockaddr, addr_len: *mut socklen_t) -> ssize_t => ftss_recvfrom {
        if !is_fabric(fd) {
            return unsafe { (real().recvfrom)(fd, buf, len, flags, addr, addr_len) };
        }
        unsafe { receive_into(fd, buf, len, flags, addr, addr_len) }
    }
}

hook! {
    unsafe fn __recvfrom_chk(fd: c_int, buf: *mut c_void, len: size_t, buf_len: size_t, flags: c_int, addr: *mut sockaddr, addr_len: *mut socklen_t) -> ssize_t => ftss_recvfrom_chk {
        if len > buf_len {
            // What glibc's fortified check does: the program has a buffer overflow.
            unsafe { libc::abort() };
        }
        if !is_fabric(fd) {
            return unsafe { (real().recvfrom)(fd, buf, len, flags, addr, addr_len) };
        }
        unsafe { receive_into(fd, buf, len, flags, addr, addr_len) }
    }
}

hook! {
    unsafe fn recv(fd: c_int, buf: *mut c_void, len: size_t, flags: c_int) -> ssize_t => ftss_recv {
        if !is_fabric(fd) {
            return unsafe { (real().recvfrom)(fd, buf, len, flags, std::ptr::null_mut(), std::ptr::null_mut()) };
        }
        unsafe { receive_into(fd, buf, len, flags, std::ptr::null_mut(), std::ptr::null_mut()) }
    }
}

hook! {
    unsafe fn read(fd: c_int, buf: *mut c_void, len: size_t) -> ssize_t => ftss_read {
        if !is_fabric(fd) {
            return unsafe { (real().read)(fd, buf, len) };
        }
        unsafe { receive_into(fd, buf, len, 0, std::ptr::null_mut(), std::ptr::null_mut()) }
    }
}

hook! {
    unsafe fn __read_chk(fd: c_int, buf: *mut c_void, len: size_t, buf_len: size_t) -> ssize_t => ftss_read_chk {
        if len > buf_len {
            unsafe { libc::abort() };
        }
        if !is_fabric(fd) {
            return unsafe { (real().read)(fd, buf, len) };
        }
        unsafe { receive_into(fd, buf, len, 0, std::ptr::null_mut(), std::ptr::null_mut()) }
    }
}

hook! {
    unsafe fn recvmsg(fd: c_int, message: *mut msghdr, flags: c_int) -> ssize_t => ftss_recvmsg {
        if !is_fabric(fd) || message.is_null() {
            return unsafe { (real().recvmsg)(fd, message, flags) };
        }
        let message = unsafe { &mut *message };
        let vectors = if message.msg_iovlen == 0 || message.msg_iov.is_null() {
            &[][..]
        } else {
            unsafe { std::slice::from_raw_parts(message.msg_iov, message.msg_iovlen) }
        };
        // No control messages are produced for fabric datagrams.
        message.msg_controllen = 0;
        let mut name_len = message.msg_namelen;
        let name = message.msg_name as *mut sockaddr;
        let mut out_flags = 0;
        let received = logic::receive(fd, vectors, flags, name, &mut name_len, Some(&mut out_flags));
        if received >= 0 {
            message.msg_namelen = if name.is_null() { 0 } else { name_len };
            message.msg_flags = out_flags;
        }
        received
    }
}

hook! {
    unsafe fn close(fd: c_int) -> c_int => ftss_close {
        if !is_ours(fd) {
            return unsafe { (real().close)(fd) };
        }
        logic::close(fd)
    }
}

hook! {
    unsafe fn shutdown(fd: c_int, how: c_int) -> c_int => ftss_shutdown {
        if !is_fabric(fd) {
            return unsafe { (real().shutdown)(fd, how) };
        }
        // A UDP socket has no connection to shut down; the app's end of the socketpair must stay
        // open in both directions for the shim to keep delivering.
        0
    }
}

hook! {
    unsafe fn getsockname(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int => ftss_getsockname {
        logic::getsockname(fd, addr, len)
    }
}

hook! {
    unsafe fn getpeername(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int => ftss_getpeername {
        logic::getpeername(fd, addr, len)
    }
}

hook! {
    unsafe fn getsockopt(fd: c_int, level: c_int, name: c_int, value: *mut c_void, len: *mut socklen_t) -> c_int => ftss_getsockopt {
        logic::getsockopt(fd, level, name, value, len)
    }
}

hook! {
    unsafe fn setsockopt(fd: c_int, level: c_int, name: c_int, value: *const c_void, len: socklen_t) -> c_int => ftss_setsockopt {
        logic::setsockopt(fd, level, name, value, len)
    }
}
