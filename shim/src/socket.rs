//! The shim's logic: which fds are ours, turning a UDP socket into a fabric socket, and the send and
//! receive paths. Every entry point starts with "is this fd ours? if not, call the real function".
//!
//! Life of a socket:
//! 1. `socket(AF_INET, SOCK_DGRAM)`: a real UDP socket, marked CANDIDATE. Costs nothing more.
//! 2. When it binds to FTSS_ADDR or 0.0.0.0, or connects/sends to a fabric address, it becomes
//!    FABRIC: the real socket moves to a side fd (still used for non-fabric traffic), and the app's
//!    fd number is atomically replaced (dup3) by one end of an AF_UNIX datagram socketpair. The
//!    receive thread writes arriving datagrams into the other end, so readiness is the kernel's.
//! 3. `close`: the side fd and the shim's end are closed with it.

use std::collections::{HashMap, VecDeque};
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Once};
use std::time::Instant;

use fsbridge::format::PAYLOAD_BYTES_MAX;
use fsbridge::{NodeConfig, Packet, PacketId, Volume};
use libc::{c_int, c_void, iovec, msghdr, sockaddr, sockaddr_in, socklen_t, ssize_t};

use crate::config::{AckMode, Config};
use crate::log;
use crate::outbox::Outbox;
use crate::real::real;

/// fds at or above this are never ours (passed through); bounds the table.
pub const FD_TABLE_MAX: usize = 65_536;
/// Bytes of the header the receive thread puts before each datagram it injects.
pub const INJECT_HEADER_BYTES: usize = 24;
const INJECT_MAGIC: u32 = 0x4654_5349; // "FTSI"
/// Send buffer of the shim's end of each socketpair: the bound on datagrams queued for the app.
const INJECT_BUFFER_BYTES: c_int = 4 * 1024 * 1024;
/// Most iovecs accepted in one recvmsg/sendmsg (the kernel's UIO_MAXIOV is 1024).
const IOV_MAX: usize = 1024;

const KIND_NONE: u8 = 0;
const KIND_CANDIDATE: u8 = 1;
const KIND_FABRIC: u8 = 2;

static KIND: [AtomicU8; FD_TABLE_MAX] = [const { AtomicU8::new(KIND_NONE) }; FD_TABLE_MAX];

/// What kind of fd this is, in one atomic load (the pass-through fast path).
pub fn kind(fd: c_int) -> u8 {
    if fd < 0 || fd as usize >= FD_TABLE_MAX {
        return KIND_NONE;
    }
    KIND[fd as usize].load(Ordering::Acquire)
}

fn set_kind(fd: c_int, kind: u8) {
    if fd >= 0 && (fd as usize) < FD_TABLE_MAX {
        KIND[fd as usize].store(kind, Ordering::Release);
    }
}

fn set_errno(errno: c_int) {
    // SAFETY: __errno_location returns this thread's errno.
    unsafe { *libc::__errno_location() = errno };
}

fn errno() -> c_int {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO)
}

/// Fails the current call with `errno`.
fn fail(errno: c_int) -> ssize_t {
    set_errno(errno);
    -1
}

/// Mutable state of a fabric socket.
#[derive(Default)]
pub struct SockState {
    /// The fabric address this socket sends from and receives on.
    pub local: Option<SocketAddrV4>,
    /// The connected peer, if any.
    pub peer: Option<SocketAddrV4>,
    /// The side socket is bound on the real network (so the receive thread relays its traffic).
    pub side_bound: bool,
}

/// A fabric socket.
pub struct Sock {
    /// The shim's end of the socketpair: the receive thread writes datagrams here.
    pub shim_end: c_int,
    /// The original UDP socket, for non-fabric traffic.
    pub side: c_int,
    pub state: Mutex<SockState>,
    /// Injected datagrams the app has not read yet: token → packet id (for the receipt).
    pub tokens: Mutex<HashMap<u64, PacketId>>,
    /// Datagrams read from the inbox but not yet injected (the app's buffer was full).
    pub held: Mutex<VecDeque<Vec<u8>>>,
}

impl Sock {
    pub fn lock(&self) -> MutexGuard<'_, SockState> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Receive-side duplicate filter: a redelivered packet id is not handed to the app twice.
pub struct Dedupe {
    /// Key → has the app received it (true) or is it still queued in a socket (false).
    seen: HashMap<u128, bool>,
    order: VecDeque<u128>,
}

/// Packet ids remembered by [`Dedupe`]; redelivery happens within seconds, far inside this window.
pub const DEDUPE_IDS_MAX: usize = 1 << 18;

impl Dedupe {
    pub fn key(id: &PacketId) -> u128 {
        // FNV-1a of origin and epoch; the seq is kept exact.
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in id.origin.as_str().bytes().chain(id.epoch.to_le_bytes()) {
            hash = (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3);
        }
        (u128::from(hash) << 64) | u128::from(id.seq)
    }

    /// None if new (now recorded as queued); Some(received) if seen before.
    pub fn check(&mut self, id: &PacketId) -> Option<bool> {
        let key = Dedupe::key(id);
        if let Some(received) = self.seen.get(&key) {
            return Some(*received);
        }
        if self.order.len() >= DEDUPE_IDS_MAX
            && let Some(oldest) = self.order.pop_front()
        {
            self.seen.remove(&oldest);
        }
        self.seen.insert(key, false);
        self.order.push_back(key);
        None
    }

    pub fn mark_received(&mut self, id: &PacketId) {
        if let Some(received) = self.seen.get_mut(&Dedupe::key(id)) {
            *received = true;
        }
    }
}

/// The shim's process-wide state.
pub struct Shim {
    pub config: Config,
    pub volume: Volume,
    pub epoch: u64,
    pub outbox: Outbox,
    started: Once,
    table: Mutex<HashMap<c_int, Arc<Sock>>>,
    /// Packets the app received, waiting to be written as a receipt batch.
    pub receipts: Mutex<Vec<PacketId>>,
    pub dedupe: Mutex<Dedupe>,
    next_token: AtomicU64,
}

impl Shim {
    pub fn start(config: Config) -> Result<Shim, String> {
        let volume = Volume::new(&config.volume);
        if !config.volume.is_dir() {
            return Err(format!("FTSS_VOLUME {} is not a directory", config.volume.display()));
        }
        let epoch = fsbridge::random_u64();
        let outbox = Outbox::new(volume.outbox(&config.node), config.node.clone(), epoch);
        log!(
            "node {} addr {} volume {} ack {:?} epoch {epoch:016x}",
            config.node,
            config.addr,
            config.volume.display(),
            config.ack
        );
        Ok(Shim {
            config,
            volume,
            epoch,
            outbox,
            started: Once::new(),
            table: Mutex::new(HashMap::new()),
            receipts: Mutex::new(Vec::new()),
            dedupe: Mutex::new(Dedupe { seen: HashMap::new(), order: VecDeque::new() }),
            next_token: AtomicU64::new(1),
        })
    }

    /// Registers the node and starts the flusher and receive threads, on first fabric use, so that
    /// processes that never touch the fabric pay nothing.
    fn ensure_started(&'static self) {
        self.started.call_once(|| {
            let config = NodeConfig { addr: self.config.addr };
            if let Err(error) = self.volume.register_node(&self.config.node, &config) {
                log!("cannot register node {} on the volume: {error}", self.config.node);
            }
            let spawned =
                std::thread::Builder::new().name("ftss-flusher".into()).spawn(move || self.outbox.run_flusher());
            if let Err(error) = spawned {
                log!("cannot start the flusher thread: {error}");
            }
            let spawned = std::thread::Builder::new().name("ftss-receive".into()).spawn(move || crate::pump::run(self));
            if let Err(error) = spawned {
                log!("cannot start the receive thread: {error}");
            }
        });
    }

    fn table(&self) -> MutexGuard<'_, HashMap<c_int, Arc<Sock>>> {
        self.table.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn sock(&self, fd: c_int) -> Option<Arc<Sock>> {
        self.table().get(&fd).cloned()
    }

    pub fn socks(&self) -> Vec<Arc<Sock>> {
        self.table().values().cloned().collect()
    }

    pub fn next_token(&self) -> u64 {
        self.next_token.fetch_add(1, Ordering::Relaxed)
    }

    /// Replaces the app's UDP socket `fd` by a socketpair end; the UDP socket becomes the side fd.
    fn convert(&'static self, fd: c_int) -> Result<Arc<Sock>, c_int> {
        self.ensure_started();
        let mut table = self.table();
        if let Some(sock) = table.get(&fd) {
            return Ok(sock.clone());
        }
        let sock = Arc::new(convert_fd(fd)?);
        table.insert(fd, sock.clone());
        set_kind(fd, KIND_FABRIC);
        log!("fd {fd} is now a fabric socket");
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
                let any = sockaddr_v4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));
                // SAFETY: any is a valid sockaddr_in.
                if unsafe {
                    (real().bind)(sock.side, (&any as *const sockaddr_in).cast(), size_of::<sockaddr_in>() as socklen_t)
                } != 0
                {
                    return Err(errno());
                }
                real_local_port(sock.side)?
            }
            port => port,
        };
        state.side_bound = true;
        let local = SocketAddrV4::new(self.config.addr, port);
        state.local = Some(local);
        Ok(local)
    }
}

fn real_local_port(fd: c_int) -> Result<u16, c_int> {
    // SAFETY: zeroed sockaddr_in is valid; the length matches it.
    let mut addr: sockaddr_in = unsafe { zeroed() };
    let mut len = size_of::<sockaddr_in>() as socklen_t;
    if unsafe { (real().getsockname)(fd, (&mut addr as *mut sockaddr_in).cast(), &mut len) } != 0 {
        return Err(errno());
    }
    Ok(u16::from_be(addr.sin_port))
}

/// The conversion itself (see the module docs). On failure nothing changes.
fn convert_fd(fd: c_int) -> Result<Sock, c_int> {
    // SAFETY: plain fd syscalls on fds we own or the app gave us.
    unsafe {
        let status_flags = libc::fcntl(fd, libc::F_GETFL);
        let fd_flags = libc::fcntl(fd, libc::F_GETFD);
        if status_flags < 0 || fd_flags < 0 {
            return Err(errno());
        }
        let side = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0);
        if side < 0 {
            return Err(errno());
        }
        let mut pair = [0 as c_int; 2];
        if libc::socketpair(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0, pair.as_mut_ptr()) != 0 {
            let error = errno();
            (real().close)(side);
            return Err(error);
        }
        let [app_end, shim_end] = pair;
        for option in [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO] {
            let mut value: libc::timeval = zeroed();
            let mut len = size_of::<libc::timeval>() as socklen_t;
            if (real().getsockopt)(side, libc::SOL_SOCKET, option, (&mut value as *mut libc::timeval).cast(), &mut len)
                == 0
            {
                (real().setsockopt)(app_end, libc::SOL_SOCKET, option, (&value as *const libc::timeval).cast(), len);
            }
        }
        let buffer = INJECT_BUFFER_BYTES;
        (real().setsockopt)(
            shim_end,
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&buffer as *const c_int).cast(),
            size_of::<c_int>() as socklen_t,
        );
        libc::fcntl(shim_end, libc::F_SETFL, libc::O_NONBLOCK);
        libc::fcntl(app_end, libc::F_SETFL, status_flags & libc::O_NONBLOCK);
        let cloexec = if fd_flags & libc::FD_CLOEXEC != 0 { libc::O_CLOEXEC } else { 0 };
        if libc::dup3(app_end, fd, cloexec) < 0 {
            let error = errno();
            for other in [side, app_end, shim_end] {
                (real().close)(other);
            }
            return Err(error);
        }
        (real().close)(app_end);
        Ok(Sock {
            shim_end,
            side,
            state: Mutex::new(SockState::default()),
            tokens: Mutex::new(HashMap::new()),
            held: Mutex::new(VecDeque::new()),
        })
    }
}

pub fn sockaddr_v4(addr: SocketAddrV4) -> sockaddr_in {
    // SAFETY: zeroed sockaddr_in is valid.
    let mut raw: sockaddr_in = unsafe { zeroed() };
    raw.sin_family = libc::AF_INET as libc::sa_family_t;
    raw.sin_port = addr.port().to_be();
    raw.sin_addr.s_addr = u32::from(*addr.ip()).to_be();
    raw
}

/// Reads an IPv4 socket address given by the app. `None` for other families.
///
/// # Safety
/// `addr` must be null or valid for `len` bytes.
unsafe fn read_v4(addr: *const sockaddr, len: socklen_t) -> Option<SocketAddrV4> {
    if addr.is_null() || (len as usize) < size_of::<sockaddr_in>() {
        return None;
    }
    // SAFETY: checked non-null and long enough; read_unaligned tolerates any alignment.
    let raw = unsafe { std::ptr::read_unaligned(addr.cast::<sockaddr_in>()) };
    if raw.sin_family as c_int != libc::AF_INET {
        return None;
    }
    Some(SocketAddrV4::new(Ipv4Addr::from(u32::from_be(raw.sin_addr.s_addr)), u16::from_be(raw.sin_port)))
}

/// Writes `addr` into an app's (sockaddr, socklen) pair, truncating like the kernel.
///
/// # Safety
/// `out` must be null or valid for `*len` bytes; `len` null or valid.
unsafe fn write_v4(addr: SocketAddrV4, out: *mut sockaddr, len: *mut socklen_t) {
    if out.is_null() || len.is_null() {
        return;
    }
    let raw = sockaddr_v4(addr);
    // SAFETY: the caller guarantees out has *len bytes; we copy at most that.
    unsafe {
        let room = (*len as usize).min(size_of::<sockaddr_in>());
        std::ptr::copy_nonoverlapping((&raw as *const sockaddr_in).cast::<u8>(), out.cast::<u8>(), room);
        *len = size_of::<sockaddr_in>() as socklen_t;
    }
}

/// Encodes the injection header.
pub fn inject_header(source: SocketAddrV4, token: u64) -> [u8; INJECT_HEADER_BYTES] {
    let mut header = [0u8; INJECT_HEADER_BYTES];
    header[0..4].copy_from_slice(&INJECT_MAGIC.to_le_bytes());
    header[4..8].copy_from_slice(&source.ip().octets());
    header[8..10].copy_from_slice(&source.port().to_le_bytes());
    header[12..20].copy_from_slice(&token.to_le_bytes());
    header
}

fn parse_header(header: &[u8; INJECT_HEADER_BYTES]) -> Option<(SocketAddrV4, u64)> {
    if header[0..4] != INJECT_MAGIC.to_le_bytes() {
        return None;
    }
    let ip = Ipv4Addr::new(header[4], header[5], header[6], header[7]);
    let port = u16::from_le_bytes([header[8], header[9]]);
    let token = u64::from_le_bytes(header[12..20].try_into().expect("8 bytes"));
    Some((SocketAddrV4::new(ip, port), token))
}

// ---- entry points, called by the hooks ----

/// After the real socket() succeeded.
pub fn on_socket(fd: c_int, domain: c_int, socket_type: c_int) {
    if crate::shim().is_some() && domain == libc::AF_INET && socket_type & 0xF == libc::SOCK_DGRAM {
        set_kind(fd, KIND_CANDIDATE);
    }
}

pub fn bind(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int {
    let (Some(shim), KIND_CANDIDATE) = (crate::shim(), kind(fd)) else {
        // A fabric socket is already bound (fabric sockets get their address when converted).
        if kind(fd) == KIND_FABRIC {
            set_errno(libc::EINVAL);
            return -1;
        }
        // SAFETY: arguments passed through unchanged.
        return unsafe { (real().bind)(fd, addr, len) };
    };
    // SAFETY: the app promises addr is valid for len.
    let Some(requested) = (unsafe { read_v4(addr, len) }) else {
        return unsafe { (real().bind)(fd, addr, len) };
    };
    if *requested.ip() == shim.config.addr {
        let sock = match shim.convert(fd) {
            Ok(sock) => sock,
            Err(errno) => return fail(errno) as c_int,
        };
        if requested.port() == 0 {
            return shim.ensure_local(&sock).map(|_| 0).unwrap_or_else(|errno| fail(errno) as c_int);
        }
        sock.lock().local = Some(requested);
        return 0;
    }
    // SAFETY: as above.
    let result = unsafe { (real().bind)(fd, addr, len) };
    if result != 0 || !requested.ip().is_unspecified() {
        return result;
    }
    // Bound to every address: it receives from the real network and from the fabric.
    let port = match real_local_port(fd) {
        Ok(port) => port,
        Err(errno) => return fail(errno) as c_int,
    };
    match shim.convert(fd) {
        Ok(sock) => {
            let mut state = sock.lock();
            state.local = Some(SocketAddrV4::new(shim.config.addr, port));
            state.side_bound = true;
            0
        }
        Err(errno) => fail(errno) as c_int,
    }
}

pub fn connect(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int {
    let Some(shim) = crate::shim().filter(|_| kind(fd) != KIND_NONE) else {
        return unsafe { (real().connect)(fd, addr, len) };
    };
    // SAFETY: the app promises addr is valid for len.
    let target = unsafe { read_v4(addr, len) };
    let unspecified = !addr.is_null()
        && len as usize >= size_of::<libc::sa_family_t>()
        && unsafe { (*addr).sa_family } as c_int == libc::AF_UNSPEC;
    let sock = match (kind(fd), target) {
        (KIND_FABRIC, _) => shim.sock(fd).expect("fabric fd has an entry"),
        (_, Some(target)) if shim.config.is_fabric(*target.ip()) => match shim.convert(fd) {
            Ok(sock) => sock,
            Err(errno) => return fail(errno) as c_int,
        },
        _ => return unsafe { (real().connect)(fd, addr, len) },
    };
    if unspecified {
        sock.lock().peer = None;
        unsafe { (real().connect)(sock.side, addr, len) };
        return 0;
    }
    let Some(target) = target else {
        set_errno(libc::EAFNOSUPPORT);
        return -1;
    };
    if shim.config.is_fabric(*target.ip()) {
        if let Err(errno) = shim.ensure_local(&sock) {
            return fail(errno) as c_int;
        }
    } else if unsafe { (real().connect)(sock.side, addr, len) } != 0 {
        return -1;
    }
    sock.lock().peer = Some(target);
    0
}

/// sendto/send/write/sendmsg on an fd of ours. `dest` is the explicit destination, if any.
pub fn send(
    fd: c_int,
    payload: &[u8],
    flags: c_int,
    dest: Option<SocketAddrV4>,
    raw_dest: (*const sockaddr, socklen_t),
) -> ssize_t {
    let shim = crate::shim().expect("only called for our fds");
    let sock = match kind(fd) {
        KIND_FABRIC => shim.sock(fd).expect("fabric fd has an entry"),
        _ => match dest {
            Some(dest) if shim.config.is_fabric(*dest.ip()) => match shim.convert(fd) {
                Ok(sock) => sock,
                Err(errno) => return fail(errno),
            },
            _ => {
                return unsafe {
                    (real().sendto)(fd, payload.as_ptr().cast(), payload.len(), flags, raw_dest.0, raw_dest.1)
                };
            }
        },
    };
    let peer = sock.lock().peer;
    let Some(destination) = dest.or(peer) else {
        return fail(if raw_dest.0.is_null() { libc::ENOTCONN } else { libc::EAFNOSUPPORT });
    };
    if !shim.config.is_fabric(*destination.ip()) {
        let raw = sockaddr_v4(destination);
        return unsafe {
            (real().sendto)(
                sock.side,
                payload.as_ptr().cast(),
                payload.len(),
                flags,
                (&raw as *const sockaddr_in).cast(),
                size_of::<sockaddr_in>() as socklen_t,
            )
        };
    }
    if payload.len() > PAYLOAD_BYTES_MAX {
        return fail(libc::EMSGSIZE);
    }
    let source = match shim.ensure_local(&sock) {
        Ok(source) => source,
        Err(errno) => return fail(errno),
    };
    // SAFETY: fcntl on the app's fd.
    let nonblocking =
        flags & libc::MSG_DONTWAIT != 0 || unsafe { libc::fcntl(fd, libc::F_GETFL) } & libc::O_NONBLOCK != 0;
    let deadline = Instant::now() + shim.config.timeout;
    let node = &shim.config.node;
    let epoch = shim.epoch;
    let enqueued = shim.outbox.enqueue(payload.len(), nonblocking, deadline, |seq| Packet {
        id: PacketId { origin: node.clone(), epoch, seq },
        source,
        destination,
        sent_unix_us: fsbridge::unix_now_us(),
        payload: payload.to_vec(),
    });
    let outcome = enqueued.and_then(|seq| match shim.config.ack {
        AckMode::Async => Ok(()),
        AckMode::Volume => shim.outbox.wait_published(seq, deadline),
        AckMode::Guaranteed => {
            shim.outbox.wait_published(seq, deadline).and_then(|()| shim.outbox.wait_acked(seq, deadline))
        }
    });
    match outcome {
        Ok(()) => payload.len() as ssize_t,
        Err(error) => {
            log!("send of {} bytes to {destination} failed: {error:?}", payload.len());
            fail(error.errno())
        }
    }
}

/// recvmsg on a fabric fd: strips the injection header, reports the fabric source, records the
/// receipt. `iov` is the app's buffers.
pub fn receive(
    fd: c_int,
    iov: &[iovec],
    flags: c_int,
    name: *mut sockaddr,
    name_len: *mut socklen_t,
    msg_flags: Option<&mut c_int>,
) -> ssize_t {
    let shim = crate::shim().expect("only called for our fds");
    let Some(sock) = shim.sock(fd) else { return fail(libc::EBADF) };
    if iov.len() >= IOV_MAX {
        return fail(libc::EMSGSIZE);
    }
    let peek = flags & libc::MSG_PEEK != 0;
    let mut header = [0u8; INJECT_HEADER_BYTES];
    let mut vectors = Vec::with_capacity(iov.len() + 1);
    vectors.push(iovec { iov_base: header.as_mut_ptr().cast(), iov_len: header.len() });
    vectors.extend_from_slice(iov);
    loop {
        // SAFETY: zeroed msghdr is valid; vectors point at live buffers.
        let mut message: msghdr = unsafe { zeroed() };
        message.msg_iov = vectors.as_mut_ptr();
        message.msg_iovlen = vectors.len();
        let received = unsafe { (real().recvmsg)(fd, &mut message, flags) };
        if received < 0 {
            return received;
        }
        if (received as usize) < INJECT_HEADER_BYTES {
            // Only the shim writes into this socket; anything shorter is not ours to hand over.
            if peek {
                unsafe { (real().recvmsg)(fd, &mut message, flags & !libc::MSG_PEEK) };
            }
            continue;
        }
        let Some((source, token)) = parse_header(&header) else { continue };
        let peer = sock.lock().peer;
        if peer.is_some_and(|peer| peer != source) {
            // A connected UDP socket only receives from its peer; the kernel drops the rest.
            if peek {
                unsafe { (real().recvmsg)(fd, &mut message, flags & !libc::MSG_PEEK) };
            }
            consume_token(shim, &sock, token);
            continue;
        }
        if !peek {
            consume_token(shim, &sock, token);
        }
        unsafe { write_v4(source, name, name_len) };
        if let Some(out) = msg_flags {
            *out = message.msg_flags;
        }
        return received - INJECT_HEADER_BYTES as ssize_t;
    }
}

/// The app has the datagram: queue its receipt.
fn consume_token(shim: &Shim, sock: &Sock, token: u64) {
    if token == 0 {
        return;
    }
    let id = sock.tokens.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).remove(&token);
    if let Some(id) = id {
        shim.dedupe.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).mark_received(&id);
        shim.receipts.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).push(id);
    }
}

pub fn close(fd: c_int) -> c_int {
    match (crate::shim(), kind(fd)) {
        (Some(shim), KIND_FABRIC) => {
            set_kind(fd, KIND_NONE);
            if let Some(sock) = shim.table().remove(&fd) {
                unsafe {
                    (real().close)(sock.side);
                    (real().close)(sock.shim_end);
                }
            }
        }
        (_, KIND_CANDIDATE) => set_kind(fd, KIND_NONE),
        _ => {}
    }
    unsafe { (real().close)(fd) }
}

pub fn getsockname(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int {
    match crate::shim().filter(|_| kind(fd) == KIND_FABRIC).and_then(|shim| shim.sock(fd)) {
        Some(sock) => {
            let local = sock.lock().local.unwrap_or(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));
            unsafe { write_v4(local, addr, len) };
            0
        }
        None => unsafe { (real().getsockname)(fd, addr, len) },
    }
}

pub fn getpeername(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int {
    match crate::shim().filter(|_| kind(fd) == KIND_FABRIC).and_then(|shim| shim.sock(fd)) {
        Some(sock) => match sock.lock().peer {
            Some(peer) => {
                unsafe { write_v4(peer, addr, len) };
                0
            }
            None => fail(libc::ENOTCONN) as c_int,
        },
        None => unsafe { (real().getpeername)(fd, addr, len) },
    }
}

/// Options that belong to the app's fd itself (timeouts, buffers); the rest go to the UDP socket.
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
    let Some(sock) = crate::shim().filter(|_| kind(fd) == KIND_FABRIC).and_then(|shim| shim.sock(fd)) else {
        return unsafe { (real().getsockopt)(fd, level, name, value, len) };
    };
    let synthesized = match (level, name) {
        (libc::SOL_SOCKET, libc::SO_DOMAIN) => Some(libc::AF_INET),
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
    let Some(sock) = crate::shim().filter(|_| kind(fd) == KIND_FABRIC).and_then(|shim| shim.sock(fd)) else {
        return unsafe { (real().setsockopt)(fd, level, name, value, len) };
    };
    if is_fd_option(level, name) {
        let result = unsafe { (real().setsockopt)(fd, level, name, value, len) };
        unsafe { (real().setsockopt)(sock.side, level, name, value, len) };
        return result;
    }
    unsafe { (real().setsockopt)(sock.side, level, name, value, len) }
}

/// Parses an app's destination for sendto/sendmsg: `Err(errno)` for an unusable one.
///
/// # Safety
/// `addr` null or valid for `len` bytes.
pub unsafe fn destination(addr: *const sockaddr, len: socklen_t) -> Result<Option<SocketAddrV4>, c_int> {
    if addr.is_null() {
        return Ok(None);
    }
    match unsafe { read_v4(addr, len) } {
        Some(dest) => Ok(Some(dest)),
        None => Err(libc::EAFNOSUPPORT),
    }
}
