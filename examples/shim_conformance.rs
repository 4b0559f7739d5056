//! `shim_conformance <ip>`: runs each socket call and flag the shim handles and prints one line per
//! observation (return values, errno, addresses, flags, truncation), with this run's addresses and
//! ports replaced by labels so that two runs can be compared line by line.
//!
//! Run it twice: with `<ip>` = 127.0.0.1 and no shim (the kernel's behaviour), and with `<ip>` =
//! the node's fabric address under the shim with ftss-server running. tests/shim_conformance.rs
//! does both and requires identical output. Every socket sends to sockets of the same process, so
//! on the fabric every datagram crosses the volume and the server.

use std::fmt::Write as _;
use std::mem::{size_of, zeroed};
use std::net::Ipv4Addr;

use libc::{c_int, c_void, iovec, msghdr, sockaddr, sockaddr_in, sockaddr_in6, sockaddr_storage, socklen_t};

/// How long a case waits for a datagram that must arrive (the fabric polls the volume).
const ARRIVAL_TIMEOUT_MS: c_int = 30_000;

unsafe extern "C" {
    fn __recv_chk(fd: c_int, buf: *mut c_void, len: usize, buf_len: usize, flags: c_int) -> isize;
    fn __recvfrom_chk(
        fd: c_int,
        buf: *mut c_void,
        len: usize,
        buf_len: usize,
        flags: c_int,
        addr: *mut sockaddr,
        addr_len: *mut socklen_t,
    ) -> isize;
    fn __read_chk(fd: c_int, buf: *mut c_void, len: usize, buf_len: usize) -> isize;
}

struct Run {
    ip: Ipv4Addr,
    /// (port, label) of every socket bound so far.
    labels: Vec<(u16, String)>,
    lines: Vec<String>,
    case: &'static str,
}

fn errno() -> c_int {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn errno_name(code: c_int) -> String {
    let name = match code {
        libc::EAGAIN => "EAGAIN",
        libc::EINTR => "EINTR",
        libc::EBADF => "EBADF",
        libc::EINVAL => "EINVAL",
        libc::EMSGSIZE => "EMSGSIZE",
        libc::ENOTCONN => "ENOTCONN",
        libc::EDESTADDRREQ => "EDESTADDRREQ",
        libc::EAFNOSUPPORT => "EAFNOSUPPORT",
        libc::EADDRINUSE => "EADDRINUSE",
        libc::ECONNREFUSED => "ECONNREFUSED",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::ENOTSOCK => "ENOTSOCK",
        other => return format!("errno{other}"),
    };
    name.to_owned()
}

/// A return value as text: the value, or the errno's name.
fn result(value: isize) -> String {
    if value < 0 { errno_name(errno()) } else { value.to_string() }
}

fn v4(ip: Ipv4Addr, port: u16) -> sockaddr_in {
    // SAFETY: zeroed sockaddr_in is valid.
    let mut raw: sockaddr_in = unsafe { zeroed() };
    raw.sin_family = libc::AF_INET as libc::sa_family_t;
    raw.sin_port = port.to_be();
    raw.sin_addr.s_addr = u32::from(ip).to_be();
    raw
}

fn v6_mapped(ip: Ipv4Addr, port: u16) -> sockaddr_in6 {
    // SAFETY: zeroed sockaddr_in6 is valid.
    let mut raw: sockaddr_in6 = unsafe { zeroed() };
    raw.sin6_family = libc::AF_INET6 as libc::sa_family_t;
    raw.sin6_port = port.to_be();
    raw.sin6_addr.s6_addr = ip.to_ipv6_mapped().octets();
    raw
}

fn pointer<T>(value: &T) -> *const sockaddr {
    (value as *const T).cast()
}

fn udp(domain: c_int, flags: c_int) -> c_int {
    // SAFETY: plain syscall.
    let fd = unsafe { libc::socket(domain, libc::SOCK_DGRAM | flags, 0) };
    assert!(fd >= 0, "socket: {}", errno_name(errno()));
    fd
}

fn close(fd: c_int) {
    // SAFETY: closing our own fd.
    unsafe { libc::close(fd) };
}

impl Run {
    fn line(&mut self, text: String) {
        self.lines.push(format!("{}: {text}", self.case));
    }

    /// Labels a port ("P0", "P1"... in order of appearance within a case) so that runs with
    /// different ephemeral ports compare equal.
    fn label_port(&mut self, port: u16) -> String {
        if port == 0 {
            return "0".into();
        }
        if let Some((_, label)) = self.labels.iter().find(|(known, _)| *known == port) {
            return label.clone();
        }
        let label = format!("P{}", self.labels.len());
        self.labels.push((port, label.clone()));
        label
    }

    fn label_ip(&self, ip: Ipv4Addr) -> String {
        if ip == self.ip {
            "SELF".into()
        } else if ip.is_unspecified() {
            "ANY".into()
        } else {
            ip.to_string()
        }
    }

    /// An address the kernel (or the shim) wrote, with its length, as text.
    fn address(&mut self, storage: &sockaddr_storage, len: socklen_t) -> String {
        match c_int::from(storage.ss_family) {
            libc::AF_INET => {
                // SAFETY: an AF_INET address is a sockaddr_in.
                let raw = unsafe { &*(storage as *const sockaddr_storage).cast::<sockaddr_in>() };
                let ip = Ipv4Addr::from(u32::from_be(raw.sin_addr.s_addr));
                let port = self.label_port(u16::from_be(raw.sin_port));
                format!("inet:{}:{port}/{len}", self.label_ip(ip))
            }
            libc::AF_INET6 => {
                // SAFETY: an AF_INET6 address is a sockaddr_in6.
                let raw = unsafe { &*(storage as *const sockaddr_storage).cast::<sockaddr_in6>() };
                let ip = std::net::Ipv6Addr::from(raw.sin6_addr.s6_addr);
                let port = self.label_port(u16::from_be(raw.sin6_port));
                let host = match ip.to_ipv4_mapped() {
                    Some(mapped) => format!("mapped-{}", self.label_ip(mapped)),
                    None if ip.is_unspecified() => "ANY6".into(),
                    None => ip.to_string(),
                };
                format!("inet6:{host}:{port}/{len}")
            }
            family => format!("family{family}/{len}"),
        }
    }

    fn sockname(&mut self, fd: c_int) -> String {
        self.name_of(fd, libc::getsockname)
    }

    fn peername(&mut self, fd: c_int) -> String {
        self.name_of(fd, libc::getpeername)
    }

    /// getsockname or getpeername as text.
    fn name_of(
        &mut self,
        fd: c_int,
        function: unsafe extern "C" fn(c_int, *mut sockaddr, *mut socklen_t) -> c_int,
    ) -> String {
        // SAFETY: zeroed storage is valid; the length matches it.
        let mut storage: sockaddr_storage = unsafe { zeroed() };
        let mut len = size_of::<sockaddr_storage>() as socklen_t;
        let got = unsafe { function(fd, (&mut storage as *mut sockaddr_storage).cast(), &mut len) };
        if got != 0 {
            return errno_name(errno());
        }
        self.address(&storage, len)
    }

    /// A new IPv4 UDP socket bound to this run's address with an ephemeral port.
    fn bound(&mut self, flags: c_int) -> (c_int, u16) {
        let fd = udp(libc::AF_INET, flags);
        let addr = v4(self.ip, 0);
        // SAFETY: addr is a valid sockaddr_in.
        let got = unsafe { libc::bind(fd, pointer(&addr), size_of::<sockaddr_in>() as socklen_t) };
        assert_eq!(got, 0, "bind: {}", errno_name(errno()));
        let port = port_of(fd);
        self.label_port(port);
        (fd, port)
    }

    fn send_to(&mut self, fd: c_int, payload: &[u8], port: u16) -> String {
        let addr = v4(self.ip, port);
        // SAFETY: payload and addr are valid.
        let sent = unsafe {
            libc::sendto(
                fd,
                payload.as_ptr().cast(),
                payload.len(),
                0,
                pointer(&addr),
                size_of::<sockaddr_in>() as socklen_t,
            )
        };
        result(sent)
    }

    /// recvfrom with a buffer of `room` bytes: "length from address payload-prefix".
    fn receive(&mut self, fd: c_int, room: usize, flags: c_int) -> String {
        let mut buffer = vec![0u8; room];
        // SAFETY: buffers valid; lengths match.
        let mut storage: sockaddr_storage = unsafe { zeroed() };
        let mut len = size_of::<sockaddr_storage>() as socklen_t;
        let got = unsafe {
            libc::recvfrom(
                fd,
                buffer.as_mut_ptr().cast(),
                room,
                flags,
                (&mut storage as *mut sockaddr_storage).cast(),
                &mut len,
            )
        };
        if got < 0 {
            return errno_name(errno());
        }
        let shown = (got as usize).min(room).min(16);
        format!("{got} from {} {:?}", self.address(&storage, len), String::from_utf8_lossy(&buffer[..shown]))
    }
}

fn port_of(fd: c_int) -> u16 {
    // SAFETY: zeroed storage is valid.
    let mut storage: sockaddr_storage = unsafe { zeroed() };
    let mut len = size_of::<sockaddr_storage>() as socklen_t;
    unsafe { libc::getsockname(fd, (&mut storage as *mut sockaddr_storage).cast(), &mut len) };
    // Both sockaddr_in and sockaddr_in6 keep the port at bytes 2..4.
    let raw = unsafe { &*(&storage as *const sockaddr_storage).cast::<sockaddr_in>() };
    u16::from_be(raw.sin_port)
}

/// Waits until `fd` is readable; the poll result as text.
fn readable(fd: c_int) -> String {
    let mut poll = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd.
    let ready = unsafe { libc::poll(&mut poll, 1, ARRIVAL_TIMEOUT_MS) };
    format!("poll={ready}/{:#x}", poll.revents)
}

fn int_option(fd: c_int, level: c_int, name: c_int) -> String {
    let mut value: c_int = 0;
    let mut len = size_of::<c_int>() as socklen_t;
    // SAFETY: value and len are valid.
    let got = unsafe { libc::getsockopt(fd, level, name, (&mut value as *mut c_int).cast(), &mut len) };
    if got != 0 { errno_name(errno()) } else { format!("{value}/{len}") }
}

fn set_int_option(fd: c_int, level: c_int, name: c_int, value: c_int) -> String {
    // SAFETY: value is valid.
    let got =
        unsafe { libc::setsockopt(fd, level, name, (&value as *const c_int).cast(), size_of::<c_int>() as socklen_t) };
    result(got as isize)
}

fn fionread(fd: c_int) -> String {
    let mut bytes: c_int = -1;
    // SAFETY: FIONREAD writes one int.
    let got = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut bytes) };
    if got != 0 { errno_name(errno()) } else { bytes.to_string() }
}

fn case_socket_flags(run: &mut Run) {
    let (fd, _) = run.bound(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC);
    // SAFETY: fcntl on our fd.
    let status = unsafe { libc::fcntl(fd, libc::F_GETFL) } & libc::O_NONBLOCK != 0;
    let cloexec = unsafe { libc::fcntl(fd, libc::F_GETFD) } & libc::FD_CLOEXEC != 0;
    let name = run.sockname(fd);
    let empty = run.receive(fd, 64, 0);
    run.line(format!("nonblock={status} cloexec={cloexec} name={name} empty-recv={empty}"));
    // SAFETY: as above.
    let cleared = unsafe { libc::fcntl(fd, libc::F_SETFL, 0) };
    let status = unsafe { libc::fcntl(fd, libc::F_GETFL) } & libc::O_NONBLOCK != 0;
    let empty = run.receive(fd, 64, libc::MSG_DONTWAIT);
    run.line(format!("setfl={cleared} nonblock={status} dontwait-recv={empty}"));
    let mut on: c_int = 1;
    let fionbio = unsafe { libc::ioctl(fd, libc::FIONBIO, &mut on) };
    let status = unsafe { libc::fcntl(fd, libc::F_GETFL) } & libc::O_NONBLOCK != 0;
    let empty = run.receive(fd, 64, 0);
    run.line(format!("fionbio={fionbio} nonblock={status} recv={empty}"));
    close(fd);
}

fn case_bind(run: &mut Run) {
    let (fd, port) = run.bound(0);
    let again = v4(run.ip, 0);
    // SAFETY: valid address.
    let rebind = unsafe { libc::bind(fd, pointer(&again), size_of::<sockaddr_in>() as socklen_t) };
    let rebind = result(rebind as isize);
    let other = udp(libc::AF_INET, 0);
    let taken = v4(run.ip, port);
    let in_use = unsafe { libc::bind(other, pointer(&taken), size_of::<sockaddr_in>() as socklen_t) };
    let in_use = result(in_use as isize);
    let name = run.sockname(fd);
    let peer = run.peername(fd);
    run.line(format!("name={name} peer={peer} rebind={rebind} same-port={in_use}"));
    let wildcard = udp(libc::AF_INET, 0);
    let any = v4(Ipv4Addr::UNSPECIFIED, 0);
    let bound = result(unsafe { libc::bind(wildcard, pointer(&any), size_of::<sockaddr_in>() as socklen_t) } as isize);
    let name = run.sockname(wildcard);
    run.line(format!("wildcard bind={bound} name={name}"));
    let short = unsafe { libc::bind(other, pointer(&any), 8) };
    run.line(format!("short-address bind={}", result(short as isize)));
    for fd in [fd, other, wildcard] {
        close(fd);
    }
}

fn case_send_receive(run: &mut Run) {
    let (a, _) = run.bound(0);
    let (b, b_port) = run.bound(0);
    let sent = run.send_to(a, b"hello", b_port);
    let ready = readable(b);
    let bytes = fionread(b);
    let got = run.receive(b, 64, 0);
    let after = fionread(b);
    run.line(format!("sent={sent} {ready} fionread={bytes} got={got} fionread-after={after}"));
    let sent = run.send_to(a, b"", b_port);
    let ready = readable(b);
    let got = run.receive(b, 64, 0);
    run.line(format!("empty datagram sent={sent} {ready} got={got}"));
    // Zero-length writes, reads and receives, each observed on its own.
    let connected = v4(run.ip, b_port);
    // SAFETY: valid address and buffers.
    unsafe { libc::connect(a, pointer(&connected), size_of::<sockaddr_in>() as socklen_t) };
    let empty_vectors = [iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; 2];
    let writev_zero = result(unsafe { libc::writev(a, empty_vectors.as_ptr(), 2) });
    let after_writev = run.receive(b, 16, libc::MSG_DONTWAIT);
    let write_zero = result(unsafe { libc::write(a, b"".as_ptr().cast(), 0) });
    let ready = readable(b);
    let after_write = run.receive(b, 16, 0);
    run.line(format!("writev0={writev_zero} then={after_writev} write0={write_zero} {ready} then={after_write}"));
    let sent = result(unsafe { libc::send(a, b"zero-read".as_ptr().cast(), 9, 0) });
    let ready = readable(b);
    let mut buffer = [0u8; 16];
    let read_zero = result(unsafe { libc::read(b, buffer.as_mut_ptr().cast(), 0) });
    let after_read = fionread(b);
    let readv_zero = result(unsafe { libc::readv(b, empty_vectors.as_ptr(), 2) });
    let after_readv = fionread(b);
    let recv_zero = result(unsafe { libc::recv(b, buffer.as_mut_ptr().cast(), 0, 0) });
    let after_recv = run.receive(b, 16, libc::MSG_DONTWAIT);
    run.line(format!(
        "send={sent} {ready} read0={read_zero} left={after_read} readv0={readv_zero} left={after_readv} recv0={recv_zero} then={after_recv}"
    ));
    let big = vec![b'x'; 65_507];
    let sent = run.send_to(a, &big, b_port);
    let ready = readable(b);
    let got = run.receive(b, 70_000, 0);
    let too_big = run.send_to(a, &vec![b'y'; 65_508], b_port);
    run.line(format!("largest sent={sent} {ready} got={} too-big={too_big}", &got[..got.len().min(5)]));
    // Port 0 is no UDP destination (and on the fabric names a whole IP packet).
    let to_port_zero = run.send_to(a, b"zero", 0);
    run.line(format!("to port 0: {to_port_zero}"));
    close(a);
    close(b);
}

fn case_truncation(run: &mut Run) {
    let (a, _) = run.bound(0);
    let (b, b_port) = run.bound(libc::SOCK_NONBLOCK);
    let payload: Vec<u8> = (0..100u8).map(|index| b'a' + index % 26).collect();
    for flags in [0, libc::MSG_TRUNC, libc::MSG_PEEK, libc::MSG_PEEK | libc::MSG_TRUNC] {
        run.send_to(a, &payload, b_port);
        let ready = readable(b);
        let first = run.receive(b, 10, flags);
        let second = run.receive(b, 200, 0);
        let third = run.receive(b, 200, 0);
        run.line(format!("flags={flags:#x} {ready} first={first} second={second} third={third}"));
    }
    // recvmsg reports the truncation in msg_flags, and scatters over iovecs.
    run.send_to(a, &payload, b_port);
    readable(b);
    let mut first = [0u8; 4];
    let mut second = [0u8; 6];
    let mut vectors = [
        iovec { iov_base: first.as_mut_ptr().cast(), iov_len: first.len() },
        iovec { iov_base: second.as_mut_ptr().cast(), iov_len: second.len() },
    ];
    // SAFETY: zeroed msghdr is valid; buffers live.
    let mut storage: sockaddr_storage = unsafe { zeroed() };
    let mut message: msghdr = unsafe { zeroed() };
    message.msg_iov = vectors.as_mut_ptr();
    message.msg_iovlen = vectors.len();
    message.msg_name = (&mut storage as *mut sockaddr_storage).cast();
    message.msg_namelen = size_of::<sockaddr_storage>() as socklen_t;
    let got = unsafe { libc::recvmsg(b, &mut message, 0) };
    let from = run.address(&storage, message.msg_namelen);
    run.line(format!(
        "recvmsg={} truncated={} from={from} parts={:?}/{:?}",
        result(got),
        message.msg_flags & libc::MSG_TRUNC != 0,
        String::from_utf8_lossy(&first),
        String::from_utf8_lossy(&second)
    ));
    // A short address buffer: the kernel copies what fits and reports the full length.
    run.send_to(a, b"short", b_port);
    readable(b);
    let mut tiny = [0u8; 4];
    let mut len: socklen_t = tiny.len() as socklen_t;
    let mut buffer = [0u8; 16];
    let got =
        unsafe { libc::recvfrom(b, buffer.as_mut_ptr().cast(), buffer.len(), 0, tiny.as_mut_ptr().cast(), &mut len) };
    run.line(format!("short-address recvfrom={} len={len} family-bytes={:?}", result(got), &tiny[..2]));
    close(a);
    close(b);
}

fn case_connect(run: &mut Run) {
    let (a, _) = run.bound(0);
    let (b, b_port) = run.bound(0);
    let (c, _) = run.bound(0);
    let target = v4(run.ip, b_port);
    // SAFETY: valid address.
    let connected =
        result(unsafe { libc::connect(a, pointer(&target), size_of::<sockaddr_in>() as socklen_t) } as isize);
    let name = run.sockname(a);
    let peer = run.peername(a);
    run.line(format!("connect={connected} name={name} peer={peer}"));
    let sent = result(unsafe { libc::send(a, b"via-send".as_ptr().cast(), 8, 0) });
    let written = result(unsafe { libc::write(a, b"via-write".as_ptr().cast(), 9) });
    let got_send = {
        readable(b);
        run.receive(b, 64, 0)
    };
    let got_write = {
        readable(b);
        run.receive(b, 64, 0)
    };
    run.line(format!("send={sent} write={written} got={got_send} then={got_write}"));
    // A connected socket hears only its peer.
    let a_port = port_of(a);
    run.send_to(c, b"stranger", a_port);
    run.send_to(b, b"peer", a_port);
    let ready = readable(a);
    let got = run.receive(a, 64, 0);
    let next = run.receive(a, 64, libc::MSG_DONTWAIT);
    run.line(format!("{ready} got={got} next={next}"));
    // AF_UNSPEC disconnects.
    // SAFETY: zeroed sockaddr with AF_UNSPEC.
    let mut unspecified: sockaddr = unsafe { zeroed() };
    unspecified.sa_family = libc::AF_UNSPEC as libc::sa_family_t;
    let disconnected = result(unsafe { libc::connect(a, &unspecified, size_of::<sockaddr>() as socklen_t) } as isize);
    let peer = run.peername(a);
    let sent = result(unsafe { libc::send(a, b"x".as_ptr().cast(), 1, 0) });
    let shut = result(unsafe { libc::shutdown(a, libc::SHUT_RDWR) } as isize);
    run.line(format!("disconnect={disconnected} peer={peer} send={sent} shutdown={shut}"));
    let unconnected_write = unsafe { libc::write(c, b"x".as_ptr().cast(), 1) };
    run.line(format!("unconnected write={}", result(unconnected_write)));
    for fd in [a, b, c] {
        close(fd);
    }
}

fn case_vectors(run: &mut Run) {
    let (a, _) = run.bound(0);
    let (b, b_port) = run.bound(0);
    let target = v4(run.ip, b_port);
    // SAFETY: valid address; iovecs point at live buffers.
    unsafe { libc::connect(a, pointer(&target), size_of::<sockaddr_in>() as socklen_t) };
    let parts: [&[u8]; 3] = [b"one-", b"two-", b"three"];
    let vectors: Vec<iovec> =
        parts.iter().map(|part| iovec { iov_base: part.as_ptr() as *mut c_void, iov_len: part.len() }).collect();
    let written = unsafe { libc::writev(a, vectors.as_ptr(), 3) };
    let written_text = result(written);
    readable(b);
    let mut first = [0u8; 5];
    let mut second = [0u8; 20];
    let read_vectors = [
        iovec { iov_base: first.as_mut_ptr().cast(), iov_len: first.len() },
        iovec { iov_base: second.as_mut_ptr().cast(), iov_len: second.len() },
    ];
    let read = unsafe { libc::readv(b, read_vectors.as_ptr(), 2) };
    let read_text = result(read);
    run.line(format!(
        "writev={written_text} readv={read_text} parts={:?}/{:?}",
        String::from_utf8_lossy(&first),
        String::from_utf8_lossy(&second[..(read.max(5) as usize - 5).min(20)])
    ));
    // sendmmsg three datagrams; recvmmsg blocks until all three are there.
    let mut messages: Vec<libc::mmsghdr> = vectors
        .iter()
        .map(|vector| {
            // SAFETY: zeroed mmsghdr is valid.
            let mut message: libc::mmsghdr = unsafe { zeroed() };
            message.msg_hdr.msg_iov = (vector as *const iovec).cast_mut();
            message.msg_hdr.msg_iovlen = 1;
            message
        })
        .collect();
    let sent = unsafe { libc::sendmmsg(a, messages.as_mut_ptr(), 3, 0) };
    let lengths: Vec<u32> = messages.iter().map(|message| message.msg_len).collect();
    let mut buffers = [[0u8; 16]; 4];
    let mut receive_vectors: Vec<iovec> =
        buffers.iter_mut().map(|buffer| iovec { iov_base: buffer.as_mut_ptr().cast(), iov_len: 16 }).collect();
    let mut names: [sockaddr_storage; 4] = unsafe { zeroed() };
    let mut received: Vec<libc::mmsghdr> = (0..4)
        .map(|index| {
            let mut message: libc::mmsghdr = unsafe { zeroed() };
            message.msg_hdr.msg_iov = &mut receive_vectors[index];
            message.msg_hdr.msg_iovlen = 1;
            message.msg_hdr.msg_name = (&mut names[index] as *mut sockaddr_storage).cast();
            message.msg_hdr.msg_namelen = size_of::<sockaddr_storage>() as socklen_t;
            message
        })
        .collect();
    let got = unsafe { libc::recvmmsg(b, received.as_mut_ptr(), 3, 0, std::ptr::null_mut()) };
    let mut text = String::new();
    for index in 0..got.max(0) as usize {
        let from = run.address(&names[index], received[index].msg_hdr.msg_namelen);
        let length = received[index].msg_len as usize;
        let _ = write!(text, " [{length} {from} {:?}]", String::from_utf8_lossy(&buffers[index][..length.min(16)]));
    }
    let more = unsafe {
        libc::recvmmsg(b, received.as_mut_ptr(), 4, libc::MSG_DONTWAIT | libc::MSG_WAITFORONE, std::ptr::null_mut())
    };
    run.line(format!("sendmmsg={sent} lengths={lengths:?} recvmmsg={got}{text} again={}", result(more as isize)));
    let mut message: msghdr = unsafe { zeroed() };
    message.msg_iov = vectors.as_ptr() as *mut iovec;
    message.msg_iovlen = 3;
    let sent = result(unsafe { libc::sendmsg(a, &message, 0) });
    readable(b);
    let got = run.receive(b, 64, 0);
    run.line(format!("sendmsg={sent} got={got}"));
    close(a);
    close(b);
}

fn case_fortified(run: &mut Run) {
    let (a, _) = run.bound(0);
    let (b, b_port) = run.bound(0);
    let mut buffer = [0u8; 32];
    run.send_to(a, b"recv-chk", b_port);
    readable(b);
    // SAFETY: buffer has 32 bytes, as told.
    let got = unsafe { __recv_chk(b, buffer.as_mut_ptr().cast(), 32, 32, 0) };
    run.line(format!("__recv_chk={} {:?}", result(got), String::from_utf8_lossy(&buffer[..got.max(0) as usize])));
    run.send_to(a, b"recvfrom-chk", b_port);
    readable(b);
    let mut storage: sockaddr_storage = unsafe { zeroed() };
    let mut len = size_of::<sockaddr_storage>() as socklen_t;
    let got = unsafe {
        __recvfrom_chk(
            b,
            buffer.as_mut_ptr().cast(),
            32,
            32,
            0,
            (&mut storage as *mut sockaddr_storage).cast(),
            &mut len,
        )
    };
    let from = run.address(&storage, len);
    run.line(format!("__recvfrom_chk={} from={from}", result(got)));
    run.send_to(a, b"read-chk", b_port);
    readable(b);
    let got = result(unsafe { __read_chk(b, buffer.as_mut_ptr().cast(), 32, 32) });
    let plain = {
        run.send_to(a, b"read", b_port);
        readable(b);
        result(unsafe { libc::read(b, buffer.as_mut_ptr().cast(), 32) })
    };
    run.line(format!("__read_chk={got} read={plain} {:?}", String::from_utf8_lossy(&buffer[..4])));
    close(a);
    close(b);
}

fn case_options(run: &mut Run) {
    let (fd, _) = run.bound(0);
    let kinds = [
        ("type", libc::SO_TYPE),
        ("domain", libc::SO_DOMAIN),
        ("protocol", libc::SO_PROTOCOL),
        ("error", libc::SO_ERROR),
    ];
    let mut text = String::new();
    for (name, option) in kinds {
        let _ = write!(text, " {name}={}", int_option(fd, libc::SOL_SOCKET, option));
    }
    let reuse = set_int_option(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1);
    let _ = write!(text, " set-reuseaddr={reuse} reuseaddr={}", int_option(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR));
    let port = set_int_option(fd, libc::SOL_SOCKET, libc::SO_REUSEPORT, 1);
    let _ = write!(text, " set-reuseport={port} broadcast={}", int_option(fd, libc::SOL_SOCKET, libc::SO_BROADCAST));
    run.line(text.trim().to_owned());
    // Timeouts: SO_RCVTIMEO makes an empty blocking recv fail with EAGAIN.
    let timeout = libc::timeval { tv_sec: 0, tv_usec: 200_000 };
    let mut text = String::new();
    for option in [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO] {
        // SAFETY: timeval values and lengths match.
        let set = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                option,
                (&timeout as *const libc::timeval).cast(),
                size_of::<libc::timeval>() as socklen_t,
            )
        };
        let mut back = libc::timeval { tv_sec: 9, tv_usec: 9 };
        let mut len = size_of::<libc::timeval>() as socklen_t;
        let got = unsafe {
            libc::getsockopt(fd, libc::SOL_SOCKET, option, (&mut back as *mut libc::timeval).cast(), &mut len)
        };
        let _ = write!(text, " set={set} get={got} value={}.{:06}", back.tv_sec, back.tv_usec);
    }
    let empty = run.receive(fd, 16, 0);
    run.line(format!("timeouts{text} recv={empty}"));
    close(fd);
}

fn case_dups(run: &mut Run) {
    let (a, _) = run.bound(0);
    let (b, b_port) = run.bound(0);
    // SAFETY: fd calls on our own fds.
    let copies = unsafe {
        [
            libc::dup(b),
            libc::fcntl(b, libc::F_DUPFD, 0),
            libc::fcntl(b, libc::F_DUPFD_CLOEXEC, 0),
            libc::dup3(b, 200, libc::O_CLOEXEC),
            libc::dup2(b, 201),
        ]
    };
    let cloexec: Vec<bool> =
        copies.iter().map(|fd| unsafe { libc::fcntl(*fd, libc::F_GETFD) } & libc::FD_CLOEXEC != 0).collect();
    run.line(format!("dups-ok={} cloexec={cloexec:?}", copies.iter().all(|fd| *fd >= 0)));
    close(b);
    for (index, copy) in copies.iter().enumerate() {
        let name = run.sockname(*copy);
        run.send_to(a, format!("to-copy-{index}").as_bytes(), b_port);
        let ready = readable(*copy);
        let got = run.receive(*copy, 64, 0);
        run.line(format!("copy{index} name={name} {ready} got={got}"));
        close(*copy);
    }
    let gone = unsafe { libc::fcntl(copies[0], libc::F_GETFD) };
    run.line(format!("after-close fcntl={}", result(gone as isize)));
    // close_range to the end closes the sockets in the range; `a`, below it, keeps working.
    let (c, _) = run.bound(0);
    let (d, _) = run.bound(0);
    let low = c.min(d) as u32;
    // SAFETY: closes only fds this case opened (everything at or above `low`).
    let closed = unsafe { libc::close_range(low, u32::MAX, 0) };
    let gone = result(unsafe { libc::fcntl(c, libc::F_GETFD) } as isize);
    let gone2 = result(unsafe { libc::fcntl(d, libc::F_GETFD) } as isize);
    run.line(format!("close_range={closed} first={gone} second={gone2}"));
    // A fresh socket works after all that.
    let (e, e_port) = run.bound(0);
    run.send_to(a, b"after", e_port);
    let ready = readable(e);
    let got = run.receive(e, 64, 0);
    run.line(format!("fresh {ready} got={got}"));
    close(a);
    close(e);
}

fn case_readiness(run: &mut Run) {
    let (a, _) = run.bound(libc::SOCK_NONBLOCK);
    let (b, b_port) = run.bound(libc::SOCK_NONBLOCK);
    // SAFETY: epoll on our own fds.
    let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    let mut event = libc::epoll_event { events: libc::EPOLLIN as u32, u64: b as u64 };
    unsafe { libc::epoll_ctl(epoll, libc::EPOLL_CTL_ADD, b, &mut event) };
    let mut events = [libc::epoll_event { events: 0, u64: 0 }; 4];
    let idle = unsafe { libc::epoll_wait(epoll, events.as_mut_ptr(), 4, 0) };
    let mut writable = libc::pollfd { fd: a, events: libc::POLLOUT, revents: 0 };
    let out = unsafe { libc::poll(&mut writable, 1, 0) };
    run.send_to(a, b"ready", b_port);
    let ready = unsafe { libc::epoll_wait(epoll, events.as_mut_ptr(), 4, ARRIVAL_TIMEOUT_MS) };
    let which = events[0].u64 == b as u64 && events[0].events & libc::EPOLLIN as u32 != 0;
    // select sees it too.
    let mut set: libc::fd_set = unsafe { zeroed() };
    unsafe { libc::FD_SET(b, &mut set) };
    let mut zero = libc::timeval { tv_sec: 0, tv_usec: 0 };
    let selected = unsafe { libc::select(b + 1, &mut set, std::ptr::null_mut(), std::ptr::null_mut(), &mut zero) };
    let got = run.receive(b, 64, 0);
    let drained = unsafe { libc::epoll_wait(epoll, events.as_mut_ptr(), 4, 0) };
    run.line(format!(
        "idle={idle} pollout={out}/{:#x} epoll={ready} right-fd={which} select={selected} got={got} after={drained}",
        writable.revents
    ));
    close(epoll);
    close(a);
    close(b);
}

extern "C" fn on_alarm(_: c_int) {}

fn case_signals(run: &mut Run) {
    let (fd, _) = run.bound(0);
    // SAFETY: a handler that does nothing, installed without SA_RESTART; a one-shot timer.
    unsafe {
        let mut action: libc::sigaction = zeroed();
        action.sa_sigaction = on_alarm as extern "C" fn(c_int) as usize;
        action.sa_flags = 0;
        libc::sigaction(libc::SIGALRM, &action, std::ptr::null_mut());
        let timer = libc::itimerval {
            it_interval: libc::timeval { tv_sec: 0, tv_usec: 0 },
            it_value: libc::timeval { tv_sec: 0, tv_usec: 150_000 },
        };
        libc::setitimer(libc::ITIMER_REAL, &timer, std::ptr::null_mut());
    }
    let interrupted = run.receive(fd, 16, 0);
    // SAFETY: back to the default disposition.
    unsafe { libc::signal(libc::SIGALRM, libc::SIG_DFL) };
    run.line(format!("blocking recv under SIGALRM={interrupted}"));
    close(fd);
}

fn case_ipv6(run: &mut Run) {
    let (b, b_port) = run.bound(0);
    let six = udp(libc::AF_INET6, 0);
    let local = v6_mapped(run.ip, 0);
    // SAFETY: valid sockaddr_in6.
    let bound = result(unsafe { libc::bind(six, pointer(&local), size_of::<sockaddr_in6>() as socklen_t) } as isize);
    let six_port = port_of(six);
    run.label_port(six_port);
    let name = run.sockname(six);
    let domain = int_option(six, libc::SOL_SOCKET, libc::SO_DOMAIN);
    run.line(format!("bind={bound} name={name} domain={domain}"));
    let target = v6_mapped(run.ip, b_port);
    let sent = result(unsafe {
        libc::sendto(six, b"from-v6".as_ptr().cast(), 7, 0, pointer(&target), size_of::<sockaddr_in6>() as socklen_t)
    });
    readable(b);
    let got = run.receive(b, 64, 0);
    run.line(format!("v6-to-v4 sent={sent} got={got}"));
    run.send_to(b, b"from-v4", six_port);
    readable(six);
    let got = run.receive(six, 64, 0);
    run.line(format!("v4-to-v6 got={got}"));
    let connected =
        result(unsafe { libc::connect(six, pointer(&target), size_of::<sockaddr_in6>() as socklen_t) } as isize);
    let peer = run.peername(six);
    run.line(format!("connect={connected} peer={peer}"));
    // An IPv6 address on an IPv4 socket is the kernel's error.
    let wrong = unsafe {
        libc::sendto(b, b"x".as_ptr().cast(), 1, 0, pointer(&target), size_of::<sockaddr_in6>() as socklen_t)
    };
    run.line(format!("v6-address-on-v4-socket={}", result(wrong)));
    close(b);
    close(six);
}

/// One group of observations.
type Case = fn(&mut Run);

fn main() {
    let ip: Ipv4Addr =
        std::env::args().nth(1).and_then(|text| text.parse().ok()).expect("usage: shim_conformance <ipv4>");
    let mut run = Run { ip, labels: Vec::new(), lines: Vec::new(), case: "" };
    let cases: [(&'static str, Case); 12] = [
        ("socket-flags", case_socket_flags),
        ("bind", case_bind),
        ("send-receive", case_send_receive),
        ("truncation", case_truncation),
        ("connect", case_connect),
        ("vectors", case_vectors),
        ("fortified", case_fortified),
        ("options", case_options),
        ("dups", case_dups),
        ("readiness", case_readiness),
        ("signals", case_signals),
        ("ipv6", case_ipv6),
    ];
    for (name, case) in cases {
        run.case = name;
        // Labels start afresh in each case: the kernel may hand out an ephemeral port again once
        // its socket is closed, and a port reused across cases must not shift the later labels.
        run.labels.clear();
        case(&mut run);
    }
    for line in &run.lines {
        println!("{line}");
    }
}
