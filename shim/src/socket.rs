//! The socket logic: which fds are ours, turning a UDP socket into a fabric socket, and the send
//! and receive paths (the process state they work on is `state`). Every entry point starts with "is this fd ours?
//! if not, call the real function".
//!
//! Life of a socket:
//! 1. `socket(AF_INET or AF_INET6, SOCK_DGRAM)`: a real UDP socket, marked CANDIDATE. Costs nothing
//!    more.
//! 2. When it binds to FTSS_ADDR or the wildcard address, or connects/sends to a fabric address, it
//!    becomes FABRIC: the real socket moves to a side fd (still used for non-fabric traffic), and
//!    the app's fd number is atomically replaced (dup3) by one end of an AF_UNIX datagram
//!    socketpair. The receive thread writes arriving datagrams into the other end, so readiness is
//!    the kernel's.
//! 3. `dup`s share the entry; the side fd and the shim's end are closed when the last app fd that
//!    refers to the socket is closed (the entry is an `Arc`).
//!

use std::collections::VecDeque;
use std::mem::{size_of, zeroed};
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fsbridge::format::PAYLOAD_BYTES_MAX;
use fsbridge::{NodeConfig, Packet, PacketId};
use libc::{c_int, c_void, iovec, msghdr, sockaddr, socklen_t, ssize_t};

use crate::addr::{self, Family, INJECT_HEADER_BYTES, Raw};
use crate::config::AckMode;
use crate::fabric::LinkEvents;
use crate::fds;
use crate::log;
use crate::outbox::SendError;
use crate::real::real;
use crate::state::{Shim, Sock, SockState, mark_received};
use crate::sys::{errno, fail, lock, make_internal};

/// Send buffer of the shim's end of each socketpair: the bound on datagram bytes queued for the app.
const INJECT_BUFFER_BYTES: c_int = 4 * 1024 * 1024;
/// Most iovecs accepted in one recvmsg/sendmsg (the kernel's UIO_MAXIOV).
pub const IOV_MAX: usize = 1024;
/// What the fabric link's reader hands to the outbox and the sockets.
struct Events(&'static Shim);

impl LinkEvents for Events {
    fn acked(&self, seqs: Vec<u64>) {
        self.0.outbox().fabric_acked(&seqs);
    }

    fn connected(&self) {
        self.0.outbox().nudge();
    }

    fn delivered(&self, packets: Vec<Packet>) {
        crate::pump::deliver_from_fabric(self.0, packets);
    }
}

impl Shim {
    /// Registers the node and starts the flusher and receive threads on first fabric use (again in
    /// a forked child), so that processes that never touch the fabric pay nothing.
    pub fn ensure_started(&'static self) {
        if self.running.load(Ordering::Acquire) {
            return;
        }
        let _start = lock(&self.start_lock);
        if self.running.load(Ordering::Acquire) {
            return;
        }
        // Once per process tree: a forked child inherits the parent's registration. Over the
        // fabric the server registers the node when it connects.
        if !self.config.is_fabric_transport() && !self.registered.swap(true, Ordering::AcqRel) {
            let config = NodeConfig { addr: self.config.addr };
            if let Err(error) = self.volume.register_node(&self.config.node, &config) {
                log!("cannot register node {} on the volume: {error}", self.config.node);
            }
        }
        let outbox = self.outbox();
        match self.link() {
            None => spawn_supervised("ftss-flusher", move || outbox.run_flusher()),
            Some(link) => {
                spawn_supervised("ftss-flusher", move || outbox.run_fabric_flusher(link));
                spawn_supervised("ftss-fabric", move || link.run(&Events(self)));
            }
        }
        spawn_supervised("ftss-receive", move || crate::pump::run(self));
        self.running.store(true, Ordering::Release);
    }

    /// Replaces the app's UDP socket `fd` (and any dup of it) by a socketpair end; the UDP socket
    /// becomes the side fd.
    fn convert(&'static self, fd: c_int) -> Result<Arc<Sock>, c_int> {
        self.ensure_started();
        // From the new fds' creation until the spare number is closed, the app's closes wait.
        // Taken before the table: a wait for an app's long close then holds up no other call.
        let making = crate::sys::shim_making();
        let mut table = self.table();
        if let Some(sock) = table.get(&fd) {
            return Ok(sock.clone());
        }
        let twins = if self.candidate_dups.load(Ordering::Relaxed) { candidate_twins(fd) } else { Vec::new() };
        let family = fds::family(fd);
        let (sock, app_end) = new_sock(fd, family, self.next_sock_id.fetch_add(1, Ordering::Relaxed))?;
        let sock = Arc::new(sock);
        if let Err(error) = point(app_end, fd) {
            unsafe { (real().close)(app_end) };
            return Err(error);
        }
        for target in std::iter::once(fd).chain(twins) {
            if target != fd && point(app_end, target).is_err() {
                continue;
            }
            table.insert(target, sock.clone());
            fds::set_side(target, sock.side);
            fds::set(target, fds::Kind::Fabric, family);
            log!("fd {target} is now a fabric socket");
        }
        // SAFETY: the app's fds now refer to this socketpair end; the spare number goes.
        unsafe { (real().close)(app_end) };
        drop(making);
        drop(table);
        // A receive thread that saw no socket at its last pass is not listening to the bells.
        crate::notify::nudge();
        Ok(sock)
    }

    /// Gives the socket a fabric address if it has none: the port comes from binding the side socket
    /// to an ephemeral real port, which the kernel keeps unique on this host.
    fn ensure_local(&self, sock: &Sock) -> Result<SocketAddrV4, c_int> {
        let mut state = sock.lock();
        if let Some(local) = state.local {
            return Ok(local);
        }
        let port = match real_local_port(sock.side)? {
            0 => {
                let any = Raw::new(sock.family.any(0), sock.family);
                // SAFETY: any is a valid socket address of the side socket's family.
                if unsafe { (real().bind)(sock.side, any.as_ptr(), any.len()) } != 0 {
                    return Err(errno());
                }
                real_local_port(sock.side)?
            }
            port => port,
        };
        state.side_bound = true;
        state.wildcard = true;
        let local = SocketAddrV4::new(self.config.addr, port);
        state.local = Some(local);
        Ok(local)
    }
}

/// Pause before a shim thread that panicked (a bug, logged) runs again.
const THREAD_RESTART_PAUSE: Duration = Duration::from_secs(1);

/// Starts one of the shim's threads; a panic in it is logged and the thread's loop starts over, so
/// one bug does not silently stop delivery for the rest of the process's life.
fn spawn_supervised(name: &'static str, body: impl Fn() + Send + 'static) {
    let supervised = move || {
        while std::panic::catch_unwind(std::panic::AssertUnwindSafe(&body)).is_err() {
            log!("bug: thread {name} panicked; restarting it");
            std::thread::sleep(THREAD_RESTART_PAUSE);
        }
    };
    if let Err(error) = std::thread::Builder::new().name(name.into()).spawn(supervised) {
        log!("cannot start thread {name}: {error}");
    }
}

/// Other candidate fds that are the same socket as `fd` (dup'ed before conversion): same inode.
fn candidate_twins(fd: c_int) -> Vec<c_int> {
    let inode = |fd: c_int| {
        // SAFETY: zeroed stat is valid; fstat fills it.
        let mut stat: libc::stat = unsafe { zeroed() };
        (unsafe { libc::fstat(fd, &mut stat) } == 0).then_some((stat.st_dev, stat.st_ino))
    };
    let Some(wanted) = inode(fd) else { return Vec::new() };
    fds::of_kind_in(0, c_int::MAX, fds::Kind::Candidate)
        .filter(|other| *other != fd && inode(*other) == Some(wanted))
        .collect()
}

/// Points the app's fd `target` at `app_end` (keeping `target`'s close-on-exec flag).
fn point(app_end: c_int, target: c_int) -> Result<(), c_int> {
    // SAFETY: plain fd syscalls on fds the app gave us and the shim's new socketpair end.
    unsafe {
        let fd_flags = (real().fcntl)(target, libc::F_GETFD);
        if fd_flags < 0 {
            return Err(errno());
        }
        let cloexec = if fd_flags & libc::FD_CLOEXEC != 0 { libc::O_CLOEXEC } else { 0 };
        if (real().dup3)(app_end, target, cloexec) < 0 {
            return Err(errno());
        }
    }
    Ok(())
}

type NameFunction = unsafe extern "C" fn(c_int, *mut sockaddr, *mut socklen_t) -> c_int;

/// The kernel's getsockname/getpeername of one of the shim's sockets.
fn kernel_address(fd: c_int, function: NameFunction) -> Result<Option<SocketAddr>, c_int> {
    // SAFETY: zeroed storage is valid; the length matches it.
    let mut storage: libc::sockaddr_storage = unsafe { zeroed() };
    let mut len = size_of::<libc::sockaddr_storage>() as socklen_t;
    if unsafe { function(fd, (&mut storage as *mut libc::sockaddr_storage).cast(), &mut len) } != 0 {
        return Err(errno());
    }
    Ok(addr::from_storage(&storage))
}

fn real_local_port(fd: c_int) -> Result<u16, c_int> {
    Ok(kernel_address(fd, real().getsockname)?.map_or(0, |addr| addr.port()))
}

fn real_peer(fd: c_int) -> Option<SocketAddr> {
    kernel_address(fd, real().getpeername).ok().flatten().map(addr::normalize)
}

/// The socket for converting the UDP socket `fd`: a side dup of it and a socketpair, the app's end
/// (returned beside) with `fd`'s O_NONBLOCK and timeouts. The caller points the app's fds at it.
fn new_sock(fd: c_int, family: Family, id: u64) -> Result<(Sock, c_int), c_int> {
    // SAFETY: plain fd syscalls on fds we own or the app gave us.
    unsafe {
        let status_flags = (real().fcntl)(fd, libc::F_GETFL);
        if status_flags < 0 {
            return Err(errno());
        }
        let side = (real().fcntl)(fd, libc::F_DUPFD_CLOEXEC, 0);
        if side < 0 {
            return Err(errno());
        }
        let mut pair = [0 as c_int; 2];
        if (real().socketpair)(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0, pair.as_mut_ptr()) != 0 {
            let error = errno();
            (real().close)(side);
            return Err(error);
        }
        let [app_end, shim_end] = pair;
        copy_timeouts(side, app_end);
        let buffer = INJECT_BUFFER_BYTES;
        (real().setsockopt)(
            shim_end,
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&buffer as *const c_int).cast(),
            size_of::<c_int>() as socklen_t,
        );
        (real().fcntl)(shim_end, libc::F_SETFL, libc::O_NONBLOCK);
        (real().fcntl)(app_end, libc::F_SETFL, status_flags & libc::O_NONBLOCK);
        let send_timeout = timeout_option(side, libc::SO_SNDTIMEO);
        // A socket connected to a real peer before it became fabric stays connected to it.
        let peer = real_peer(side);
        let sock = Sock {
            id,
            shim_end: make_internal(shim_end),
            side: make_internal(side),
            family,
            state: Mutex::new(SockState { send_timeout, peer, ..SockState::default() }),
            held: Mutex::new(VecDeque::new()),
        };
        Ok((sock, app_end))
    }
}

/// SO_RCVTIMEO/SO_SNDTIMEO set on the UDP socket before conversion carry over to the app's new fd.
fn copy_timeouts(from: c_int, to: c_int) {
    for option in [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO] {
        // SAFETY: zeroed timeval is valid; lengths match.
        let mut value: libc::timeval = unsafe { zeroed() };
        let mut len = size_of::<libc::timeval>() as socklen_t;
        let pointer = (&mut value as *mut libc::timeval).cast();
        if unsafe { (real().getsockopt)(from, libc::SOL_SOCKET, option, pointer, &mut len) } == 0 {
            unsafe { (real().setsockopt)(to, libc::SOL_SOCKET, option, pointer, len) };
        }
    }
}

/// A socket timeout option as a duration; `None` for "no timeout".
fn timeout_option(fd: c_int, option: c_int) -> Option<Duration> {
    // SAFETY: zeroed timeval is valid; lengths match.
    let mut value: libc::timeval = unsafe { zeroed() };
    let mut len = size_of::<libc::timeval>() as socklen_t;
    let pointer = (&mut value as *mut libc::timeval).cast();
    if unsafe { (real().getsockopt)(fd, libc::SOL_SOCKET, option, pointer, &mut len) } != 0 {
        return None;
    }
    let duration = Duration::new(value.tv_sec.max(0) as u64, (value.tv_usec.max(0) as u32) * 1000);
    (!duration.is_zero()).then_some(duration)
}

// ---- entry points, called by the hooks ----

/// After the real socket() succeeded.
pub fn on_socket(fd: c_int, domain: c_int, socket_type: c_int, protocol: c_int) {
    match crate::state::shim() {
        // An fd closed behind the shim's back (e.g. fclose of an fdopen'ed socket) may be reused.
        Some(shim) => shim.forget(fd),
        // A refusing shim watches UDP sockets only to keep fabric datagrams off the real network.
        None if crate::refusal().is_some() => fds::clear(fd),
        None => return,
    }
    // UDP only: ICMP "ping" sockets and UDP-Lite are datagram sockets too, and not ours.
    if socket_type & 0xF != libc::SOCK_DGRAM || !matches!(protocol, 0 | libc::IPPROTO_UDP) {
        return;
    }
    match domain {
        libc::AF_INET => fds::set(fd, fds::Kind::Candidate, Family::V4),
        libc::AF_INET6 => fds::set(fd, fds::Kind::Candidate, Family::V6),
        _ => {}
    }
}

/// What a bind asks for, as far as the shim is concerned.
enum BindTarget {
    /// FTSS_ADDR (or its IPv4-mapped form) with this port.
    Fabric(u16),
    /// The wildcard address: the real network and the fabric.
    Wildcard,
    /// Anything else: the kernel's business.
    Other,
}

fn bind_target(shim: &Shim, fd: c_int, addr: *const sockaddr, len: socklen_t) -> BindTarget {
    let family = fds::family(fd);
    // SAFETY: the app promises addr is valid for len.
    let Some(requested) = (unsafe { addr::read(addr, len, family) }) else { return BindTarget::Other };
    // An IPv6 socket binds only IPv6 addresses; the kernel rejects the rest.
    if family == Family::V6 && requested.is_ipv4() {
        return BindTarget::Other;
    }
    let v6_only = family == Family::V6 && int_option(fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY) == Some(1);
    // The wildcard address with port 0 too: an event loop registers the socket with epoll right
    // after the bind, and a later takeover (a new file behind the fd number) would go unseen.
    match addr::normalize(requested) {
        SocketAddr::V4(v4) if *v4.ip() == shim.config.addr && !v6_only => BindTarget::Fabric(v4.port()),
        SocketAddr::V4(v4) if v4.ip().is_unspecified() && requested.is_ipv4() => BindTarget::Wildcard,
        SocketAddr::V6(v6) if v6.ip().is_unspecified() && !v6_only => BindTarget::Wildcard,
        _ => BindTarget::Other,
    }
}

/// The port the app asked bind for (0: any).
fn requested_port(fd: c_int, addr: *const sockaddr, len: socklen_t) -> u16 {
    // SAFETY: the app promises addr is valid for len (bind_target read it already).
    unsafe { addr::read(addr, len, fds::family(fd)) }.map_or(0, |requested| requested.port())
}

fn int_option(fd: c_int, level: c_int, name: c_int) -> Option<c_int> {
    let mut value: c_int = 0;
    let mut len = size_of::<c_int>() as socklen_t;
    // SAFETY: value and len are valid.
    let result = unsafe { (real().getsockopt)(fd, level, name, (&mut value as *mut c_int).cast(), &mut len) };
    (result == 0).then_some(value)
}

pub fn bind(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int {
    let Some(shim) = crate::state::shim() else { return unsafe { (real().bind)(fd, addr, len) } };
    match fds::kind(fd) {
        // A fabric socket already has its address; a second bind fails as on any bound socket.
        fds::Kind::Fabric => return fail(libc::EINVAL) as c_int,
        fds::Kind::Candidate => {}
        _ => return unsafe { (real().bind)(fd, addr, len) },
    }
    let family = fds::family(fd);
    let wildcard = match bind_target(shim, fd, addr, len) {
        BindTarget::Other => return unsafe { (real().bind)(fd, addr, len) },
        BindTarget::Wildcard => {
            if unsafe { (real().bind)(fd, addr, len) } != 0 {
                return -1;
            }
            true
        }
        // The real socket takes the port on the wildcard address, which reserves it on this host
        // (EADDRINUSE, SO_REUSEADDR/SO_REUSEPORT and privileged ports as the kernel decides them).
        BindTarget::Fabric(port) => {
            let any = Raw::new(family.any(port), family);
            if unsafe { (real().bind)(fd, any.as_ptr(), any.len()) } != 0 {
                return -1;
            }
            false
        }
    };
    let bound_port = match real_local_port(fd) {
        Ok(port) => port,
        Err(errno) => return fail(errno) as c_int,
    };
    // FTSS_RECV=once on an explicit port: what earlier processes on the port were handed is known
    // before anything can be injected for it (the port is not ours until `local` is set).
    let once_port = shim.config.recv_once && requested_port(fd, addr, len) != 0;
    if once_port && let Err(errno) = shim.once_ledger(bound_port) {
        return fail(errno) as c_int;
    }
    match shim.convert(fd) {
        Ok(sock) => {
            let mut state = sock.lock();
            state.local = Some(SocketAddrV4::new(shim.config.addr, bound_port));
            state.wildcard = wildcard;
            state.side_bound = wildcard;
            state.once_port = once_port.then_some(bound_port);
            0
        }
        Err(errno) => fail(errno) as c_int,
    }
}

pub fn connect(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int {
    let Some(shim) = crate::state::shim().filter(|_| fds::is_ours(fd)) else {
        if fds::is_ours(fd)
            && let Some(refusal) = crate::refusal()
            && let Some(target) = unsafe { addr::read(addr, len, fds::family(fd)) }
            && refusal.covers(target)
        {
            return fail(refusal.refuse(target)) as c_int;
        }
        return unsafe { (real().connect)(fd, addr, len) };
    };
    // SAFETY: the app promises addr is valid for len.
    let target = unsafe { addr::read(addr, len, fds::family(fd)) };
    let sock = match (fds::kind(fd), target) {
        (fds::Kind::Fabric, _) => match shim.sock(fd) {
            Some(sock) => sock,
            None => return fail(libc::EBADF) as c_int,
        },
        (_, Some(target)) if shim.is_fabric(target) => match shim.convert(fd) {
            Ok(sock) => sock,
            Err(errno) => return fail(errno) as c_int,
        },
        _ => return unsafe { (real().connect)(fd, addr, len) },
    };
    if unsafe { addr::is_unspecified(addr, len) } {
        sock.lock().peer = None;
        unsafe { (real().connect)(sock.side, addr, len) };
        return 0;
    }
    match target {
        Some(target) if shim.is_fabric(target) => {
            if let Err(errno) = shim.ensure_local(&sock) {
                return fail(errno) as c_int;
            }
            // Forget a real peer the side socket may have had.
            let unspecified = libc::sockaddr { sa_family: libc::AF_UNSPEC as libc::sa_family_t, sa_data: [0; 14] };
            unsafe { (real().connect)(sock.side, &unspecified, size_of::<libc::sockaddr>() as socklen_t) };
            sock.lock().peer = Some(addr::normalize(target));
            0
        }
        _ => {
            if unsafe { (real().connect)(sock.side, addr, len) } != 0 {
                return -1;
            }
            sock.lock().peer = target.map(addr::normalize);
            0
        }
    }
}

/// Where a datagram on one of our fds goes.
pub enum Route {
    /// To the kernel socket `fd` with the app's own arguments.
    Kernel(c_int),
    /// Onto the fabric.
    Fabric(Arc<Sock>, SocketAddrV4),
}

/// Decides where a send on `fd` (candidate or fabric) to the app's destination (null: the
/// connected peer) goes, converting a candidate that sends to a fabric address.
pub fn route(fd: c_int, raw_dest: (*const sockaddr, socklen_t)) -> Result<Route, c_int> {
    let Some(shim) = crate::state::shim() else { return refused_route(fd, raw_dest) };
    // SAFETY: the app promises the address is valid for its length.
    let dest = unsafe { addr::read(raw_dest.0, raw_dest.1, fds::family(fd)) };
    let fabric_dest = dest.filter(|dest| shim.is_fabric(*dest));
    let kind = fds::kind(fd);
    if kind == fds::Kind::Fabric
        && !raw_dest.0.is_null()
        && fabric_dest.is_none()
        && let Some(side) = fds::side(fd)
    {
        // Not for the fabric: the kernel socket, found without the table's lock.
        return Ok(Route::Kernel(side));
    }
    let sock = match (kind, fabric_dest) {
        (fds::Kind::Fabric, _) => shim.sock(fd).ok_or(libc::EBADF)?,
        (_, Some(_)) => shim.convert(fd)?,
        _ => return Ok(Route::Kernel(fd)),
    };
    if !raw_dest.0.is_null() {
        return match fabric_dest.map(addr::normalize) {
            Some(SocketAddr::V4(dest)) => Ok(Route::Fabric(sock, dest)),
            _ => Ok(Route::Kernel(sock.side)),
        };
    }
    match sock.lock().peer {
        Some(SocketAddr::V4(peer)) if shim.is_fabric(SocketAddr::V4(peer)) => Ok(Route::Fabric(sock.clone(), peer)),
        Some(_) => Ok(Route::Kernel(sock.side)),
        None => Err(libc::EDESTADDRREQ),
    }
}

/// Where a send goes while the shim refuses to carry traffic: fabric destinations fail with
/// ENETUNREACH (never the real network), the rest go to the kernel. A socket watched by a
/// refusing shim was never connected to a fabric address (`connect` refused it).
fn refused_route(fd: c_int, raw_dest: (*const sockaddr, socklen_t)) -> Result<Route, c_int> {
    let refusal = crate::refusal().ok_or(libc::EBADF)?;
    // SAFETY: the app promises the address is valid for its length.
    match unsafe { addr::read(raw_dest.0, raw_dest.1, fds::family(fd)) } {
        Some(dest) if refusal.covers(dest) => Err(refusal.refuse(dest)),
        _ => Ok(Route::Kernel(fd)),
    }
}

/// sendto/send/write on an fd of ours.
pub fn send(fd: c_int, payload: &[u8], flags: c_int, raw_dest: (*const sockaddr, socklen_t)) -> ssize_t {
    match route(fd, raw_dest) {
        Err(errno) => fail(errno),
        Ok(Route::Kernel(target)) => unsafe {
            (real().sendto)(target, payload.as_ptr().cast(), payload.len(), flags, raw_dest.0, raw_dest.1)
        },
        Ok(Route::Fabric(sock, destination)) => send_fabric(fd, &sock, payload, flags, destination),
    }
}

/// Sends one datagram onto the fabric and waits as FTSS_ACK says.
pub fn send_fabric(fd: c_int, sock: &Sock, payload: &[u8], flags: c_int, destination: SocketAddrV4) -> ssize_t {
    let Some(shim) = crate::state::shim() else { return fail(libc::EBADF) };
    if flags & libc::MSG_OOB != 0 {
        return fail(libc::EOPNOTSUPP);
    }
    if payload.len() > PAYLOAD_BYTES_MAX {
        return fail(libc::EMSGSIZE);
    }
    if destination.port() == 0 {
        // The kernel refuses UDP to port 0; on the volume it would name a whole IP packet
        // (`fsbridge::ip`), which this datagram is not.
        return fail(libc::EINVAL);
    }
    // A forked child sending on an inherited socket starts its own threads here.
    shim.ensure_started();
    let source = match shim.ensure_local(sock) {
        Ok(source) => source,
        Err(errno) => return fail(errno),
    };
    // SAFETY: fcntl on the app's fd.
    let nonblocking =
        flags & libc::MSG_DONTWAIT != 0 || unsafe { (real().fcntl)(fd, libc::F_GETFL) } & libc::O_NONBLOCK != 0;
    let now = Instant::now();
    let deadline = now + shim.config.timeout;
    // SO_SNDTIMEO bounds the wait for room, as for a full socket buffer (EAGAIN when it expires).
    let room_deadline = sock.lock().send_timeout.map_or(deadline, |timeout| deadline.min(now + timeout));
    let outbox = shim.outbox();
    let epoch = shim.epoch();
    let node = &shim.config.node;
    let wants_ack = shim.config.ack == AckMode::Guaranteed;
    // Over the fabric, a blocking sender that waits for the server's ack writes its packet itself
    // (with what else is queued) if no one else is writing: the flusher's wakeup is off its round
    // trip. A non-blocking sender, or one with a send timeout, never waits on the connection.
    let direct =
        shim.link().filter(|_| shim.config.ack != AckMode::Async && !nonblocking && sock.lock().send_timeout.is_none());
    let enqueued =
        outbox.enqueue(payload.len(), nonblocking, room_deadline, wants_ack, direct.is_none(), |seq| Packet {
            id: PacketId { origin: node.clone(), epoch, seq },
            source,
            destination,
            sent_unix_us: fsbridge::unix_now_us(),
            payload: payload.to_vec(),
        });
    if let (Some(link), Ok(_)) = (direct, &enqueued)
        && !outbox.send_fabric_now(link)
    {
        outbox.wake_flusher();
    }
    let enqueued = enqueued.map_err(|error| match error {
        SendError::TimedOut if room_deadline < deadline => SendError::WouldBlock,
        other => other,
    });
    let outcome = enqueued.and_then(|seq| match shim.config.ack {
        AckMode::Async => Ok(()),
        AckMode::Volume => outbox.wait_published(seq, deadline),
        AckMode::Guaranteed => {
            let acked = outbox.wait_published(seq, deadline).and_then(|()| outbox.wait_acked(seq, deadline));
            outbox.stop_awaiting(seq);
            acked
        }
    });
    match outcome {
        Ok(()) => {
            crate::capture::record(SocketAddr::V4(source), SocketAddr::V4(destination), payload);
            payload.len() as ssize_t
        }
        Err(error) => {
            log!("send of {} bytes to {destination} failed with errno {}: {error}", payload.len(), error.errno());
            fail(error.errno())
        }
    }
}

/// Where a received datagram's source address goes.
pub struct NameOut {
    pub name: *mut sockaddr,
    pub len: *mut socklen_t,
}

/// recvmsg on a fabric fd: strips the injection header, reports the source, records the receipt.
/// `iov` is the app's buffers. Returns the payload length (the full length with MSG_TRUNC) and the
/// kernel's msg_flags (MSG_TRUNC when the datagram did not fit).
pub fn receive(fd: c_int, iov: &[iovec], flags: c_int, out: NameOut) -> Result<(ssize_t, c_int), c_int> {
    let shim = crate::state::shim().ok_or(libc::EBADF)?;
    let sock = shim.sock(fd).ok_or(libc::EBADF)?;
    // A forked child reading an inherited socket feeds it from here on.
    shim.ensure_started();
    if iov.len() >= IOV_MAX {
        return Err(libc::EMSGSIZE);
    }
    let peek = flags & libc::MSG_PEEK != 0;
    let once_port = if peek { None } else { sock.lock().once_port };
    let mut header = [0u8; INJECT_HEADER_BYTES];
    let mut vectors = Vec::with_capacity(iov.len() + 1);
    vectors.push(iovec { iov_base: header.as_mut_ptr().cast(), iov_len: header.len() });
    vectors.extend_from_slice(iov);
    loop {
        // FTSS_RECV=once: the next datagram is recorded as handed before it leaves the socket.
        let committed = match once_port {
            Some(port) => Some(commit_next(shim, fd, flags, port)?),
            None => None,
        };
        // SAFETY: zeroed msghdr is valid; vectors point at live buffers.
        let mut message: msghdr = unsafe { zeroed() };
        message.msg_iov = vectors.as_mut_ptr();
        message.msg_iovlen = vectors.len();
        let received = unsafe { (real().recvmsg)(fd, &mut message, flags) };
        if received < 0 {
            return Err(errno());
        }
        let parsed = if (received as usize) < INJECT_HEADER_BYTES { None } else { addr::parse_header(&header) };
        let accepted = parsed.as_ref().filter(|(source, _)| sock.accepts(*source));
        let Some((source, id)) = accepted else {
            // Not for the app (only the shim writes into this socket; a connected socket drops
            // datagrams from others): consume it if it was only peeked, and take the next.
            if peek {
                let mut discard: msghdr = unsafe { zeroed() };
                unsafe { (real().recvmsg)(fd, &mut discard, (flags & !libc::MSG_PEEK) | libc::MSG_DONTWAIT) };
            }
            if let Some((_, Some(id))) = &parsed {
                mark_received(shim, id);
            }
            continue;
        };
        if !peek && let Some(id) = id {
            if let Some(port) = once_port
                && committed.as_ref().and_then(Option::as_ref) != Some(id)
            {
                // Another reader of the socket took the datagram that was recorded (it records
                // it too): this one is recorded now. Until that is done it is the app's only
                // copy, so a failure cannot give it back to the socket; it is returned anyway,
                // and a restart may hand it again (at least once, as without FTSS_RECV=once).
                let recorded = shim.once_ledger(port).and_then(|ledger| ledger.commit(id));
                if recorded.is_err() {
                    log!("FTSS_RECV=once: a datagram was returned before the ledger recorded it");
                }
            }
            mark_received(shim, id);
        }
        unsafe { addr::write(*source, sock.family, out.name, out.len) };
        let length = received as usize - INJECT_HEADER_BYTES;
        if !peek && crate::capture::active() {
            let local = sock.lock().local.unwrap_or(SocketAddrV4::new(shim.config.addr, 0));
            crate::capture::record_received(*source, SocketAddr::V4(local), iov, length);
        }
        return Ok((length as ssize_t, message.msg_flags));
    }
}

/// FTSS_RECV=once: waits (as the app's recv would) for the next datagram on `fd`, reads its
/// header without taking it, and makes its id durable in the port's ledger. Returns the id (None:
/// not one of ours to record). While the ledger cannot be written the datagram stays in the
/// socket: a blocking call tries again every 100 ms, a non-blocking one says EAGAIN after a short
/// pause (so an event loop does not spin).
fn commit_next(shim: &Shim, fd: c_int, flags: c_int, port: u16) -> Result<Option<PacketId>, c_int> {
    let blocking =
        flags & libc::MSG_DONTWAIT == 0 && unsafe { (real().fcntl)(fd, libc::F_GETFL) } & libc::O_NONBLOCK == 0;
    loop {
        let mut header = [0u8; INJECT_HEADER_BYTES];
        let mut vector = iovec { iov_base: header.as_mut_ptr().cast(), iov_len: header.len() };
        // SAFETY: zeroed msghdr is valid; the vector points at a live buffer.
        let mut message: msghdr = unsafe { zeroed() };
        message.msg_iov = &mut vector;
        message.msg_iovlen = 1;
        let peek_flags = (flags & (libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC)) | libc::MSG_PEEK;
        let peeked = unsafe { (real().recvmsg)(fd, &mut message, peek_flags) };
        if peeked < 0 {
            return Err(errno());
        }
        let parsed = if (peeked as usize) < INJECT_HEADER_BYTES { None } else { addr::parse_header(&header) };
        let Some((_, Some(id))) = parsed else { return Ok(None) };
        let result = shim.once_ledger(port).and_then(|ledger| ledger.commit(&id));
        match result {
            Ok(()) => return Ok(Some(id)),
            Err(_) if blocking => std::thread::sleep(Duration::from_millis(100)),
            Err(_) => {
                std::thread::sleep(Duration::from_millis(20));
                return Err(libc::EAGAIN);
            }
        }
    }
}

/// Control messages for a datagram received on fabric fd `fd`, written into the app's buffer
/// (`control`, `room` bytes): IP_PKTINFO if the app turned it on (its destination is the socket's
/// fabric address, on the loopback interface's index: the fabric has no interface of its own).
/// Returns the length written and whether it did not fit (MSG_CTRUNC).
///
/// # Safety
/// `control` valid for `room` bytes (or null).
pub unsafe fn fabric_control(fd: c_int, control: *mut libc::c_void, room: usize) -> (usize, bool) {
    let Some(shim) = crate::state::shim() else { return (0, false) };
    let Some(sock) = shim.sock(fd) else { return (0, false) };
    if sock.family != Family::V4 || int_option(sock.side, libc::IPPROTO_IP, libc::IP_PKTINFO) != Some(1) {
        return (0, false);
    }
    // SAFETY: CMSG_SPACE/CMSG_LEN are arithmetic.
    let space = unsafe { libc::CMSG_SPACE(size_of::<libc::in_pktinfo>() as u32) } as usize;
    if control.is_null() || room < space {
        return (0, true);
    }
    let local = sock.lock().local.map_or(shim.config.addr, |local| *local.ip());
    let address = libc::in_addr { s_addr: u32::from(local).to_be() };
    // SAFETY: if_nametoindex reads a C string.
    let loopback = unsafe { libc::if_nametoindex(c"lo".as_ptr()) };
    let info = libc::in_pktinfo { ipi_ifindex: loopback as c_int, ipi_spec_dst: address, ipi_addr: address };
    // SAFETY: the buffer holds `space` bytes; a msghdr over it lets the CMSG macros find the first
    // header and its data.
    unsafe {
        std::ptr::write_bytes(control.cast::<u8>(), 0, space);
        let mut message: msghdr = zeroed();
        message.msg_control = control;
        message.msg_controllen = space;
        let header = libc::CMSG_FIRSTHDR(&message);
        (*header).cmsg_level = libc::IPPROTO_IP;
        (*header).cmsg_type = libc::IP_PKTINFO;
        (*header).cmsg_len = libc::CMSG_LEN(size_of::<libc::in_pktinfo>() as u32) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(header).cast::<libc::in_pktinfo>(), info);
    }
    (space, false)
}

/// Bytes of the next datagram waiting on a fabric fd, as FIONREAD reports it (0 if none).
pub fn next_datagram_bytes(fd: c_int) -> Result<c_int, c_int> {
    let mut waiting: c_int = 0;
    // SAFETY: FIONREAD writes one int.
    if unsafe { (real().ioctl)(fd, libc::FIONREAD, &mut waiting as *mut c_int) } != 0 {
        return Err(errno());
    }
    Ok((waiting - INJECT_HEADER_BYTES as c_int).max(0))
}

pub fn close(fd: c_int) -> c_int {
    // The shim is closing the fd that had this number; the number may be the app's now.
    fds::wait_released(fd);
    if let Some(shim) = crate::state::shim()
        && !shim.in_vfork_child()
    {
        if fds::kind(fd) == fds::Kind::Internal {
            // closefrom-style loops and careless closes must not take the shim's fds; the kernel
            // would have closed them at exec anyway (they are close-on-exec).
            log!("ignored the app's close of the shim's fd {fd}");
            return 0;
        }
        shim.forget(fd);
        loop {
            let closing = crate::sys::app_closing();
            match fds::kind(fd) {
                // The number was free, and the shim has just taken it.
                fds::Kind::Internal => return fail(libc::EBADF) as c_int,
                fds::Kind::Releasing => {
                    drop(closing);
                    fds::wait_released(fd);
                }
                _ => return unsafe { (real().close)(fd) },
            }
        }
    } else if crate::refusal().is_some() {
        // The number may come back as another kind of socket.
        fds::clear(fd);
    }
    unsafe { (real().close)(fd) }
}

/// close_range(first, last, flags): forgets the app's fds in the range and leaves the shim's own
/// fds open by closing around them.
pub fn close_range(first: libc::c_uint, last: libc::c_uint, flags: c_int) -> c_int {
    let Some(real_close_range) = real().close_range else { return fail(libc::ENOSYS) as c_int };
    let shim = crate::state::shim().filter(|shim| !shim.in_vfork_child());
    let Some(shim) = shim.filter(|_| flags & libc::CLOSE_RANGE_CLOEXEC as c_int == 0 && first <= last) else {
        if crate::refusal().is_some() && flags & libc::CLOSE_RANGE_CLOEXEC as c_int == 0 && first <= last {
            let low = first.min(c_int::MAX as libc::c_uint) as c_int;
            let high = last.min(c_int::MAX as libc::c_uint) as c_int;
            for fd in fds::of_kind_in(low, high, fds::Kind::Candidate).collect::<Vec<_>>() {
                fds::clear(fd);
            }
        }
        return unsafe { real_close_range(first, last, flags) };
    };
    let low = first.min(c_int::MAX as libc::c_uint) as c_int;
    let high = last.min(c_int::MAX as libc::c_uint) as c_int;
    for kind in [fds::Kind::Fabric, fds::Kind::Candidate] {
        for fd in fds::of_kind_in(low, high, kind).collect::<Vec<_>>() {
            shim.forget(fd);
        }
    }
    let _closing = crate::sys::app_closing();
    // One scan: a number the shim is closing (Releasing) is left to that close, like its own.
    let shims: Vec<c_int> = fds::of_kinds_in(low, high, &[fds::Kind::Internal, fds::Kind::Releasing]).collect();
    let mut start = first;
    for internal in shims {
        let internal = internal as libc::c_uint;
        if internal > start && unsafe { real_close_range(start, internal - 1, flags) } != 0 {
            return -1;
        }
        start = internal + 1;
    }
    if start > last || (start == 0 && first > 0) {
        return 0;
    }
    unsafe { real_close_range(start, last, flags) }
}

/// closefrom(low): close_range(low, ~0) with the shim's fds left open; where that fails (no
/// close_range in the kernel or libc), each fd the kernel reports open is closed on its own, as
/// glibc falls back to.
pub fn closefrom(low: c_int) {
    let low = low.max(0);
    if close_range(low as libc::c_uint, libc::c_uint::MAX, 0) == 0 {
        return;
    }
    let open: Vec<c_int> = std::fs::read_dir("/proc/self/fd")
        .map(|entries| entries.flatten().filter_map(|entry| entry.file_name().to_str()?.parse().ok()).collect())
        .unwrap_or_default();
    for fd in open.into_iter().filter(|fd| *fd >= low) {
        // The listing's own fd is among them, closed already: EBADF, as for any other closed one.
        if fds::kind(fd) != fds::Kind::Internal {
            close(fd);
        }
    }
}

/// shutdown on a fabric fd: ENOTCONN unless connected, as for UDP; otherwise nothing happens, because
/// the app's end of the socketpair must stay open in both directions for the shim to deliver.
pub fn shutdown(fd: c_int, how: c_int) -> c_int {
    let Some((_, sock)) = fabric_sock(fd) else { return fail(libc::EBADF) as c_int };
    if !matches!(how, libc::SHUT_RD | libc::SHUT_WR | libc::SHUT_RDWR) {
        return fail(libc::EINVAL) as c_int;
    }
    if sock.lock().peer.is_none() {
        return fail(libc::ENOTCONN) as c_int;
    }
    0
}

pub fn getsockname(fd: c_int, out: *mut sockaddr, len: *mut socklen_t) -> c_int {
    let Some((shim, sock)) = fabric_sock(fd) else { return unsafe { (real().getsockname)(fd, out, len) } };
    let state = sock.lock();
    let reported = match (state.peer, state.local) {
        // Connected to a real peer: the kernel knows the source address it chose.
        (Some(peer), _) if !shim.is_fabric(peer) => None,
        (None, Some(local)) if state.wildcard => Some(sock.family.any(local.port())),
        (_, Some(local)) => Some(SocketAddr::V4(local)),
        (_, None) => None,
    };
    drop(state);
    match reported {
        Some(addr) => {
            unsafe { addr::write(addr, sock.family, out, len) };
            0
        }
        None => unsafe { (real().getsockname)(sock.side, out, len) },
    }
}

pub fn getpeername(fd: c_int, out: *mut sockaddr, len: *mut socklen_t) -> c_int {
    let Some((_, sock)) = fabric_sock(fd) else { return unsafe { (real().getpeername)(fd, out, len) } };
    let peer = sock.lock().peer;
    match peer {
        Some(peer) => {
            unsafe { addr::write(peer, sock.family, out, len) };
            0
        }
        None => fail(libc::ENOTCONN) as c_int,
    }
}

fn fabric_sock(fd: c_int) -> Option<(&'static Shim, Arc<Sock>)> {
    let shim = crate::state::shim().filter(|_| fds::is_fabric(fd))?;
    Some((shim, shim.sock(fd)?))
}

/// Options that belong to the app's fd itself (timeouts, receive buffer, pending error); the rest
/// go to the UDP socket.
fn is_fd_option(level: c_int, name: c_int) -> bool {
    level == libc::SOL_SOCKET
        && matches!(
            name,
            libc::SO_RCVTIMEO
                | libc::SO_SNDTIMEO
                | libc::SO_RCVBUF
                | libc::SO_RCVLOWAT
                | libc::SO_ERROR
                | libc::SO_TYPE
        )
}

pub fn getsockopt(fd: c_int, level: c_int, name: c_int, value: *mut c_void, len: *mut socklen_t) -> c_int {
    let Some((_, sock)) = fabric_sock(fd) else { return unsafe { (real().getsockopt)(fd, level, name, value, len) } };
    let synthesized = match (level, name) {
        (libc::SOL_SOCKET, libc::SO_DOMAIN) => Some(sock.family.domain()),
        (libc::SOL_SOCKET, libc::SO_PROTOCOL) => Some(libc::IPPROTO_UDP),
        _ => None,
    };
    if let Some(answer) = synthesized {
        if value.is_null() || len.is_null() || unsafe { *len } < size_of::<c_int>() as socklen_t {
            return fail(libc::EINVAL) as c_int;
        }
        unsafe {
            value.cast::<c_int>().write_unaligned(answer);
            *len = size_of::<c_int>() as socklen_t;
        }
        return 0;
    }
    let target = if is_fd_option(level, name) { fd } else { sock.side };
    unsafe { (real().getsockopt)(target, level, name, value, len) }
}

pub fn setsockopt(fd: c_int, level: c_int, name: c_int, value: *const c_void, len: socklen_t) -> c_int {
    let Some((_, sock)) = fabric_sock(fd) else { return unsafe { (real().setsockopt)(fd, level, name, value, len) } };
    if !is_fd_option(level, name) {
        return unsafe { (real().setsockopt)(sock.side, level, name, value, len) };
    }
    let result = unsafe { (real().setsockopt)(fd, level, name, value, len) };
    if result == 0 {
        unsafe { (real().setsockopt)(sock.side, level, name, value, len) };
        if name == libc::SO_SNDTIMEO {
            sock.lock().send_timeout = timeout_option(fd, libc::SO_SNDTIMEO);
        }
    }
    result
}
