//! The fabric link (`FTSS_TRANSPORT=fabric`): one stream connection per process to ftss-server,
//! carrying the same batches as the volume would (fsbridge's fabric frames).
//!
//! The link thread connects (with backoff), proves the node's name with its key, and then reads:
//! acks release the outbox's unacknowledged packets (the outbox's flusher resends all of them
//! after every reconnect, and the server drops duplicates by packet id), and deliveries go to the
//! app's sockets exactly as inbox files would. The flusher writes packet frames; the receive thread
//! writes receipt and port frames. After the handshake every frame carries the session's MAC; a
//! frame is sealed and written whole under the connection's sealer lock.
//!
//! The connection's fd is the shim's own (numbered at 64 or above, close-on-exec, left alone by the
//! app's close loops) and is driven with the real libc functions, never through the hooks.

use std::io::{self, Read};
use std::net::{Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use fsbridge::fabric::{self, Endpoint, FABRIC_VERSION, Frame, FrameError, FrameOpener, FrameSealer, Hello, Role};
use fsbridge::format::decode_batch;
use fsbridge::{AckState, BatchEncoder, BatchHeader, BatchKind, NodeName, Packet, PacketId, Record};
use libc::c_int;

use crate::addr::{Family, Raw};
use crate::fds;
use crate::log;
use crate::real::real;
use crate::sys::{errno, lock};

/// Time the server has to answer each step of the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a frame write may block.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// First and longest pause between connection attempts.
const BACKOFF_FIRST: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Most bytes of a frame a sender writes itself (see [`Wire::direct_room`]), and what is kept
/// below half the send buffer for the buffers' own bookkeeping and the frame's header and tag.
const DIRECT_FRAME_BYTES_MAX: usize = 64 * 1024;
const DIRECT_FRAME_SLACK_BYTES: usize = 8 * 1024;
/// Bytes the link thread takes from the connection at once.
const READ_BUFFER_BYTES: usize = 64 * 1024;
/// Receipts per frame (a frame's bytes are bounded).
const RECEIPTS_PER_FRAME_MAX: usize = 16_384;
/// Receipts kept while disconnected; beyond this they are dropped (the server delivers those
/// packets again, and the receipt is written then).
pub const RECEIPTS_PENDING_MAX: usize = 65_536;

/// A connected stream socket owned by the shim, with the sealer of the session on it once the
/// handshake is done (whole frames are written under its lock).
pub struct Wire {
    fd: c_int,
    sealer: Mutex<Option<FrameSealer>>,
    /// Largest frame a sender may write on this connection itself when it polls writable, such
    /// that the write cannot wait (0: never; see [`Wire::direct_room`]).
    direct_bytes_max: usize,
}

impl Drop for Wire {
    fn drop(&mut self) {
        crate::sys::close_internal(self.fd);
    }
}

impl Wire {
    /// Connects to `endpoint`; the socket's fd is in `published` from its creation on (-1 again if
    /// the connect fails), so that a child forked meanwhile closes its copy.
    fn connect(endpoint: &Endpoint, published: &AtomicI32) -> io::Result<Wire> {
        match endpoint {
            Endpoint::Unix(path) => {
                // SAFETY: zeroed sockaddr_un is valid.
                let mut raw: libc::sockaddr_un = unsafe { std::mem::zeroed() };
                raw.sun_family = libc::AF_UNIX as libc::sa_family_t;
                let bytes = path.as_os_str().as_encoded_bytes();
                if bytes.len() >= raw.sun_path.len() {
                    return Err(io::Error::new(io::ErrorKind::InvalidInput, "unix socket path too long"));
                }
                for (slot, byte) in raw.sun_path.iter_mut().zip(bytes) {
                    *slot = *byte as libc::c_char;
                }
                let length = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
                let mut wire =
                    Wire::connect_raw(libc::AF_UNIX, (&raw as *const libc::sockaddr_un).cast(), length, published)?;
                // A unix stream socket polls writable while at most a quarter of its send buffer
                // is taken, and a write waits only for a full one: a frame of up to half of it
                // (less the bookkeeping of the buffers) never waits. Over TCP what a writable
                // socket takes is not bounded that way, so senders leave the writes to the
                // flusher there.
                wire.direct_bytes_max = (wire.int_option(libc::SOL_SOCKET, libc::SO_SNDBUF) / 2)
                    .saturating_sub(DIRECT_FRAME_SLACK_BYTES)
                    .min(DIRECT_FRAME_BYTES_MAX);
                Ok(wire)
            }
            Endpoint::Tcp(address) => {
                let target: SocketAddr = match address.parse() {
                    Ok(target) => target,
                    Err(_) => address
                        .to_socket_addrs()?
                        .next()
                        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address for the host"))?,
                };
                let (family, domain) =
                    if target.is_ipv4() { (Family::V4, libc::AF_INET) } else { (Family::V6, libc::AF_INET6) };
                let raw = Raw::new(target, family);
                let wire = Wire::connect_raw(domain, raw.as_ptr(), raw.len(), published)?;
                wire.set_int_option(libc::IPPROTO_TCP, libc::TCP_NODELAY, 1);
                // A server host that vanished is noticed in about half a minute, not two hours.
                wire.set_int_option(libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1);
                wire.set_int_option(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 10);
                wire.set_int_option(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 5);
                wire.set_int_option(libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 3);
                Ok(wire)
            }
        }
    }

    fn connect_raw(
        domain: c_int,
        addr: *const libc::sockaddr,
        length: libc::socklen_t,
        published: &AtomicI32,
    ) -> io::Result<Wire> {
        // SAFETY: plain socket calls on an fd we create.
        let fd =
            crate::sys::new_internal(|| unsafe { (real().socket)(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) });
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let wire = Wire { fd, sealer: Mutex::new(None), direct_bytes_max: 0 };
        published.store(wire.fd, Ordering::Release);
        loop {
            // SAFETY: addr/length describe a valid address.
            if unsafe { (real().connect)(wire.fd, addr, length) } == 0 {
                return Ok(wire);
            }
            if errno() != libc::EINTR {
                let error = io::Error::last_os_error();
                // Withdrawn before the wire (and its fd number) goes.
                published.store(-1, Ordering::Release);
                return Err(error);
            }
        }
    }

    fn set_int_option(&self, level: c_int, name: c_int, value: c_int) {
        // SAFETY: one int option on our fd.
        unsafe {
            (real().setsockopt)(
                self.fd,
                level,
                name,
                (&value as *const c_int).cast(),
                std::mem::size_of::<c_int>() as libc::socklen_t,
            )
        };
    }

    /// An int socket option (0 if it cannot be read).
    fn int_option(&self, level: c_int, name: c_int) -> usize {
        let mut value: c_int = 0;
        let mut length = std::mem::size_of::<c_int>() as libc::socklen_t;
        // SAFETY: one int option of our fd into a live int.
        let got = unsafe { (real().getsockopt)(self.fd, level, name, (&mut value as *mut c_int).cast(), &mut length) };
        if got == 0 { value.max(0) as usize } else { 0 }
    }

    fn set_read_timeout(&self, timeout: Option<Duration>) {
        self.set_timeout(libc::SO_RCVTIMEO, timeout);
    }

    fn set_timeout(&self, option: c_int, timeout: Option<Duration>) {
        let timeout = timeout.unwrap_or_default();
        let value =
            libc::timeval { tv_sec: timeout.as_secs() as libc::time_t, tv_usec: timeout.subsec_micros().into() };
        // SAFETY: a timeval option on our fd.
        unsafe {
            (real().setsockopt)(
                self.fd,
                libc::SOL_SOCKET,
                option,
                (&value as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
    }

    /// Writes all of `bytes` (never raising SIGPIPE in the app).
    fn write_all(&self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            // SAFETY: bytes is a live buffer.
            let sent = unsafe {
                (real().sendto)(self.fd, bytes.as_ptr().cast(), bytes.len(), libc::MSG_NOSIGNAL, std::ptr::null(), 0)
            };
            if sent < 0 {
                if errno() == libc::EINTR {
                    continue;
                }
                return Err(io::Error::last_os_error());
            }
            bytes = &bytes[sent as usize..];
        }
        Ok(())
    }

    /// How many bytes of frame a sender may write on this connection now without the write
    /// waiting: 0 over TCP, or while the socket does not poll writable.
    pub fn direct_room(&self) -> usize {
        if self.direct_bytes_max == 0 {
            return 0;
        }
        let mut poll = libc::pollfd { fd: self.fd, events: libc::POLLOUT, revents: 0 };
        // SAFETY: one pollfd on our fd, no wait.
        let ready = unsafe { (real().poll)(&mut poll, 1, 0) };
        let writable =
            ready == 1 && poll.revents & libc::POLLOUT != 0 && poll.revents & (libc::POLLERR | libc::POLLHUP) == 0;
        if writable { self.direct_bytes_max } else { 0 }
    }

    /// The session's sealer, unless another thread is writing a frame.
    pub fn try_sealer(&self) -> Option<MutexGuard<'_, Option<FrameSealer>>> {
        match self.sealer.try_lock() {
            Ok(sealer) => Some(sealer),
            Err(std::sync::TryLockError::Poisoned(poisoned)) => Some(poisoned.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }

    /// Wakes a reader blocked on this connection and fails later writes.
    fn shut(&self) {
        // SAFETY: shutdown on our fd.
        unsafe { (real().shutdown)(self.fd, libc::SHUT_RDWR) };
    }
}

impl Read for &Wire {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        loop {
            // SAFETY: buffer is live and writable.
            let read = unsafe { (real().read)(self.fd, buffer.as_mut_ptr().cast(), buffer.len()) };
            if read >= 0 {
                return Ok(read as usize);
            }
            if errno() != libc::EINTR {
                return Err(io::Error::last_os_error());
            }
        }
    }
}

/// The link thread's reader: it sleeps in `poll` for input, never in a blocking `read`. A thread
/// blocked in a unix socket's `read` is woken whenever the peer takes bytes this side wrote (the
/// socket's write space wakes every sleeper on it), which on a busy link is a wakeup for nothing
/// at every frame the server reads; a `poll` for input alone is not woken by that.
struct PolledReader<'a>(&'a Wire);

impl Read for PolledReader<'_> {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        loop {
            // SAFETY: buffer is live and writable.
            let read = unsafe {
                (real().recvfrom)(
                    self.0.fd,
                    buffer.as_mut_ptr().cast(),
                    buffer.len(),
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                )
            };
            if read >= 0 {
                return Ok(read as usize);
            }
            match errno() {
                libc::EINTR => {}
                libc::EAGAIN => {
                    let mut poll = libc::pollfd { fd: self.0.fd, events: libc::POLLIN, revents: 0 };
                    // SAFETY: one pollfd on our fd. A hangup or an error is read by the next recv.
                    if unsafe { (real().poll)(&mut poll, 1, -1) } < 0 && errno() != libc::EINTR {
                        return Err(io::Error::last_os_error());
                    }
                }
                _ => return Err(io::Error::last_os_error()),
            }
        }
    }
}

struct LinkState {
    wire: Option<Arc<Wire>>,
    /// Counts successful connections: the flusher resends what is unacked when it changes.
    generation: u64,
    /// The port list last sent on this generation's connection.
    ports_sent: Option<Vec<u16>>,
    receipts_seq: u64,
}

/// One process's connection to ftss-server.
pub struct Link {
    endpoint: Endpoint,
    key: Vec<u8>,
    node: NodeName,
    addr: Ipv4Addr,
    epoch: u64,
    state: Mutex<LinkState>,
    connected: Condvar,
    /// The connection's fd (from connect on, through the handshake), readable without a lock: a
    /// forked child closes its copy.
    fd: AtomicI32,
}

/// What the link hands to the rest of the shim.
pub trait LinkEvents {
    /// Packet seqs of this process the server has stored (or accepted for the external network).
    fn acked(&self, seqs: Vec<u64>);
    /// A connection came up: unacked packets must be sent again.
    fn connected(&self);
    /// Packets delivered to this node.
    fn delivered(&self, packets: Vec<Packet>);
}

impl Link {
    pub fn new(endpoint: Endpoint, key: Vec<u8>, node: NodeName, addr: Ipv4Addr, epoch: u64) -> Link {
        Link {
            endpoint,
            key,
            node,
            addr,
            epoch,
            state: Mutex::new(LinkState { wire: None, generation: 0, ports_sent: None, receipts_seq: 0 }),
            connected: Condvar::new(),
            fd: AtomicI32::new(-1),
        }
    }

    /// The link thread's body: connect, read until the connection breaks, repeat.
    pub fn run(&self, events: &dyn LinkEvents) {
        let mut backoff = BACKOFF_FIRST;
        let mut last_failure = String::new();
        loop {
            match self.handshake() {
                Ok((wire, opener)) => {
                    log!("fabric: connected to {} as node {} (epoch {:016x})", self.endpoint, self.node, self.epoch);
                    last_failure.clear();
                    backoff = BACKOFF_FIRST;
                    let wire = Arc::new(wire);
                    self.install(wire.clone());
                    events.connected();
                    let reason = self.read_loop(&wire, opener, events);
                    self.uninstall(&wire);
                    log!("fabric: connection to {} ended: {reason}; reconnecting", self.endpoint);
                }
                Err(reason) => {
                    if reason != last_failure {
                        log!("fabric: cannot connect to {}: {reason}; retrying", self.endpoint);
                        last_failure = reason;
                    }
                }
            }
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    fn handshake(&self) -> Result<(Wire, FrameOpener), String> {
        // The fd is published from the socket's creation on, so that a fork in the middle of the
        // connect or the handshake leaves the child a copy to close; withdrawn before the wire
        // (and its fd number) goes.
        let wire = Wire::connect(&self.endpoint, &self.fd).map_err(|error| error.to_string())?;
        match self.greet(&wire) {
            Ok(opener) => Ok((wire, opener)),
            Err(reason) => {
                // Shut first: a child forked before the close keeps no live connection.
                wire.shut();
                self.fd.store(-1, Ordering::Release);
                drop(wire);
                Err(reason)
            }
        }
    }

    /// The handshake on a fresh connection: challenge, hello, welcome; the session's keys.
    fn greet(&self, wire: &Wire) -> Result<FrameOpener, String> {
        wire.set_read_timeout(Some(HANDSHAKE_TIMEOUT));
        // A server that stops reading fails a write (and the connection) instead of blocking the
        // flusher, the receive thread and the app's exit forever.
        wire.set_timeout(libc::SO_SNDTIMEO, Some(WRITE_TIMEOUT));
        let server_nonce = match fabric::read_frame(&mut &*wire) {
            Ok(Frame::Challenge { version: FABRIC_VERSION, nonce }) => nonce,
            Ok(Frame::Challenge { version, .. }) => return Err(format!("the server speaks protocol {version}")),
            Ok(Frame::Refused { reason }) => return Err(format!("refused: {reason}")),
            Ok(_) => return Err("the server sent something other than a challenge".into()),
            Err(error) => return Err(format!("no challenge from the server: {error}")),
        };
        let mut hello = Hello {
            version: FABRIC_VERSION,
            node: self.node.clone(),
            addr: self.addr,
            epoch: self.epoch,
            nonce: fabric::nonce(),
            proof: [0; fabric::PROOF_BYTES],
        };
        hello.proof = fabric::client_proof(&self.key, &server_nonce, &hello);
        wire.write_all(&Frame::Hello(hello.clone()).encode()).map_err(|error| error.to_string())?;
        match fabric::read_frame(&mut &*wire) {
            Ok(Frame::Welcome { proof }) if fabric::verify_server(&self.key, &server_nonce, &hello.nonce, &proof) => {}
            Ok(Frame::Welcome { .. }) => return Err("the server could not prove it holds this node's key".into()),
            Ok(Frame::Refused { reason }) => return Err(format!("refused: {reason}")),
            Ok(_) => return Err("the server answered the hello with something else".into()),
            Err(error) => return Err(format!("no answer to the hello: {error}")),
        }
        wire.set_read_timeout(None);
        let (sealer, opener) = fabric::session(&self.key, &server_nonce, &hello.nonce, Role::Node);
        *lock(&wire.sealer) = Some(sealer);
        Ok(opener)
    }

    fn install(&self, wire: Arc<Wire>) {
        let mut state = lock(&self.state);
        self.fd.store(wire.fd, Ordering::Release);
        state.wire = Some(wire);
        state.generation += 1;
        state.ports_sent = None;
        drop(state);
        self.connected.notify_all();
    }

    fn uninstall(&self, wire: &Arc<Wire>) {
        wire.shut();
        let mut state = lock(&self.state);
        if state.wire.as_ref().is_some_and(|current| Arc::ptr_eq(current, wire)) {
            state.wire = None;
            self.fd.store(-1, Ordering::Release);
        }
    }

    /// Reads frames until the connection breaks; returns why it did.
    fn read_loop(&self, wire: &Wire, mut opener: FrameOpener, events: &dyn LinkEvents) -> String {
        // Buffered: one read takes the acks and deliveries that have arrived, instead of four
        // reads per frame.
        let mut reader = std::io::BufReader::with_capacity(READ_BUFFER_BYTES, PolledReader(wire));
        loop {
            let frame = match opener.read(&mut reader, fabric::FRAME_BODY_BYTES_MAX) {
                Ok(frame) => frame,
                Err(FrameError::Closed) => return "the server closed the connection".into(),
                Err(error) => return error.to_string(),
            };
            match frame {
                Frame::Acks(bytes) => match self.stored_seqs(&bytes) {
                    Ok(seqs) => events.acked(seqs),
                    Err(reason) => return reason,
                },
                Frame::Packets(bytes) => match decode_batch(&bytes) {
                    Ok(batch) if batch.header.kind == BatchKind::Packets => events.delivered(
                        batch
                            .records
                            .into_iter()
                            .filter_map(|record| match record {
                                Record::Packet(packet) => Some(packet),
                                _ => None,
                            })
                            .collect(),
                    ),
                    Ok(_) => return "a packets frame held another kind of batch".into(),
                    Err(error) => return format!("bad delivery batch: {error}"),
                },
                Frame::Refused { reason } => return format!("the server closed the session: {reason}"),
                _ => return "unexpected frame from the server".into(),
            }
        }
    }

    /// Seqs of this process's packets that an acks batch says are stored (or accepted).
    fn stored_seqs(&self, bytes: &[u8]) -> Result<Vec<u64>, String> {
        let batch = decode_batch(bytes).map_err(|error| format!("bad acks batch: {error}"))?;
        let mut seqs = Vec::new();
        for record in batch.records {
            let Record::Ack(ack) = record else { continue };
            if ack.id.epoch != self.epoch || ack.id.origin != self.node {
                continue;
            }
            match ack.state {
                AckState::Stored | AckState::AcceptedBestEffort => seqs.push(ack.id.seq),
                AckState::Rejected => log!("packet {} rejected by the server: {}", ack.id.seq, ack.reason),
                AckState::Delivered | AckState::Receipted => {}
            }
        }
        Ok(seqs)
    }

    /// The current connection and its generation, if connected.
    pub fn current(&self) -> Option<(Arc<Wire>, u64)> {
        let state = lock(&self.state);
        state.wire.clone().map(|wire| (wire, state.generation))
    }

    /// Writes one sealed frame on `wire`; a failed write ends the connection (the link thread
    /// reconnects).
    pub fn send(&self, wire: &Wire, frame: &Frame) -> bool {
        self.write_sealed(wire, &mut lock(&wire.sealer), frame)
    }

    /// Seals `frame` with `sealer` (the wire's, locked by the caller) and writes it; a failed write
    /// ends the connection.
    pub fn write_sealed(&self, wire: &Wire, sealer: &mut Option<FrameSealer>, frame: &Frame) -> bool {
        let mut bytes = frame.encode();
        let Some(sealer) = sealer.as_mut() else { return false };
        let tag = sealer.seal(&bytes);
        bytes.extend_from_slice(&tag);
        match wire.write_all(&bytes) {
            Ok(()) => true,
            Err(error) => {
                log!("fabric: write failed: {error}");
                wire.shut();
                false
            }
        }
    }

    /// Sends a packets batch (the flusher's).
    pub fn send_packets(&self, wire: &Wire, batch_seq: u64, packets: &[Packet]) -> bool {
        self.send(wire, &self.packets_frame(batch_seq, packets))
    }

    /// The frame of a packets batch.
    pub fn packets_frame(&self, batch_seq: u64, packets: &[Packet]) -> Frame {
        let header =
            BatchHeader { kind: BatchKind::Packets, node: self.node.clone(), epoch: self.epoch, batch_seq, flags: 0 };
        let mut encoder = BatchEncoder::new(&header);
        for packet in packets {
            encoder.push(&Record::Packet(packet.clone()));
        }
        Frame::Packets(encoder.finish())
    }

    /// Sends receipts; returns the ones that could not be sent (not connected, or the write failed).
    pub fn send_receipts(&self, ids: Vec<PacketId>) -> Vec<PacketId> {
        let Some((wire, _)) = self.current() else { return ids };
        for (index, chunk) in ids.chunks(RECEIPTS_PER_FRAME_MAX).enumerate() {
            let seq = {
                let mut state = lock(&self.state);
                state.receipts_seq += 1;
                state.receipts_seq
            };
            let header = BatchHeader {
                kind: BatchKind::Receipts,
                node: self.node.clone(),
                epoch: self.epoch,
                batch_seq: seq,
                flags: 0,
            };
            let mut encoder = BatchEncoder::new(&header);
            for id in chunk {
                encoder.push(&Record::Receipt(id.clone()));
            }
            if !self.send(&wire, &Frame::Receipts(encoder.finish())) {
                return ids[index * RECEIPTS_PER_FRAME_MAX..].to_vec();
            }
        }
        Vec::new()
    }

    /// Tells the server which ports this process has bound, when that changed (or after a
    /// reconnect).
    pub fn announce_ports(&self, mut ports: Vec<u16>) {
        ports.sort_unstable();
        ports.dedup();
        let Some((wire, generation)) = self.current() else { return };
        if lock(&self.state).ports_sent.as_ref() == Some(&ports) {
            return;
        }
        if self.send(&wire, &Frame::Ports(ports.clone())) {
            let mut state = lock(&self.state);
            if state.generation == generation {
                state.ports_sent = Some(ports);
            }
        }
    }

    /// In a forked child: close the inherited copy of the parent's connection (without shutting it
    /// down, which would end the parent's session too). No lock is taken: another thread of the
    /// parent may have held one at the fork.
    pub fn abandon_in_child(&self) {
        let fd = self.fd.swap(-1, Ordering::AcqRel);
        if fd >= 0 {
            fds::clear(fd);
            // SAFETY: the child's copy of the fd; the parent's stays open.
            unsafe { (real().close)(fd) };
        }
    }
}
