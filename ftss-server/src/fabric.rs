//! The fabric listener: nodes that reach the array over its storage network connect here (unix or
//! TCP), prove their name with an HMAC challenge, and exchange the same batches as on the volume.
//!
//! A thread per connecting peer does the handshake; once the node is admitted, the main loop
//! reads the connection itself: it polls the connections' sockets with its other fds, reads what
//! arrived without waiting, checks and decodes whole frames into the connection's bounded inbound
//! queue, and the server's cycle decides what each means (store, ack, deliver, receipt). One
//! thread less on every round trip: a frame wakes the main loop directly, not a reader thread
//! that then wakes it. A connection whose inbound queue is full is not read (TCP pushes back on
//! the node) until the cycle takes from it. Frames for the node are written by the main loop
//! when the socket takes them at once, else by the connection's writer thread from a bounded
//! outbound queue; a peer that does not drain it past its hard bound is disconnected. Handshake
//! and writer threads wake the main loop through an eventfd that it polls as well.

use std::collections::{BTreeMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::sys::eventfd::{EfdFlags, EventFd};

use fsbridge::fabric::{self, Endpoint, FABRIC_VERSION, Frame, FrameError, FrameOpener, FrameSealer, Role};
use fsbridge::format::decode_batch;
use fsbridge::{BatchKind, NodeName, Packet, PacketId, Record};
use serde::Serialize;

/// Most connections at once; more are refused (each costs a writer thread and a socket).
pub const CONNECTIONS_MAX: usize = 1024;
/// Connections of one node at once (each process of a node has its own).
pub const CONNECTIONS_PER_NODE_MAX: usize = 256;
/// Decoded packets' bytes waiting for the main loop, per connection; the reader stops beyond it.
/// (64 KiB in unit tests, so that one can fill it.)
const INBOUND_BYTES_MAX: usize = if cfg!(test) { 64 * 1024 } else { 32 * 1024 * 1024 };
/// The same over all connections together.
const INBOUND_TOTAL_BYTES_MAX: usize = 256 * 1024 * 1024;
/// Receipts waiting for the main loop, per connection; more are dropped (the server delivers those
/// packets again and the node receipts them again).
const RECEIPTS_WAITING_MAX: usize = 1 << 18;
/// Largest frame accepted before the node is authenticated (a hello is about 110 bytes).
const HANDSHAKE_FRAME_BYTES_MAX: usize = 1024;
/// Bytes taken from one connection's socket at once, and at most 4 times that in one look (so
/// that one busy node does not hold the main loop from the others).
const READ_BUFFER_BYTES: usize = 64 * 1024;
/// Frames queued for a node are written together up to about this many bytes.
const WRITE_BATCH_BYTES: usize = 256 * 1024;
/// TCP keepalive: a peer that vanished (power loss) is noticed after about idle + interval × count.
const KEEPALIVE_IDLE_SECONDS: u32 = 10;
const KEEPALIVE_INTERVAL_SECONDS: u32 = 5;
const KEEPALIVE_PROBES: u32 = 3;
/// Encoded frames waiting for the writer, per connection, beyond which no deliveries are queued.
pub const OUTBOUND_DELIVERY_BYTES_MAX: usize = 8 * 1024 * 1024;
/// Hard bound of a connection's outbound queue: a peer that does not read is disconnected.
const OUTBOUND_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Time a connecting peer has to complete the handshake, and a writer to make progress.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);
/// Pause after a failed accept (out of fds, say) before the next.
const ACCEPT_RETRY_PAUSE: Duration = Duration::from_millis(100);

/// Counters for status.
#[derive(Clone, Debug, Default, Serialize)]
pub struct FabricCounters {
    pub accepted: u64,
    pub authenticated: u64,
    pub refused: u64,
    pub bad_frames: u64,
    pub packets_received: u64,
    pub packets_delivered: u64,
    pub receipts_received: u64,
    pub slow_peers_closed: u64,
}

/// A live connection as status shows it.
#[derive(Clone, Debug, Serialize)]
pub struct ConnectionStatus {
    pub node: String,
    pub addr: String,
    pub peer: String,
    pub epoch: String,
    pub ports: Vec<u16>,
}

/// What the reader decoded for the main loop: one frame's packets. (Receipts and port lists are
/// kept apart, so that they never wait behind packets held back by a full destination.)
pub type Inbound = Vec<Packet>;

/// Whether the main loop let an authenticated node in.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Admission {
    Pending,
    Admitted,
    Refused(String),
}

struct ConnState {
    admission: Admission,
    inbound: VecDeque<(Inbound, usize)>,
    inbound_bytes: usize,
    /// Sealed frames (or the rest of one) waiting for the writer thread.
    outbound: VecDeque<Vec<u8>>,
    outbound_bytes: usize,
    /// Seals frames in the order they go out (set once the session is established).
    sealer: Option<FrameSealer>,
    /// The writer thread is writing frames it took from `outbound` (so nothing may be written
    /// directly meanwhile: it would overtake them).
    writing: bool,
    /// The front of `outbound` is the rest of a frame partly written directly (a farewell must
    /// finish it, or the node could not read the refusal).
    partial_front: bool,
    /// The latest port list the node sent and the main loop has not taken yet.
    ports_announced: Option<Vec<u16>>,
    /// The ports the main loop routes to this connection.
    ports: Vec<u16>,
    /// Receipts read and not yet taken by the main loop.
    receipts: Vec<PacketId>,
    closed: Option<String>,
    /// Why the connection is being ended, for the writer to tell the node before it closes it.
    farewell: Option<String>,
}

/// One authenticated connection.
pub struct Conn {
    pub id: u64,
    pub node: NodeName,
    pub addr: Ipv4Addr,
    pub epoch: u64,
    pub peer: String,
    state: Mutex<ConnState>,
    changed: Condvar,
    stream: Stream,
    shared: Arc<Shared>,
    /// What the main loop reads with; installed after the handshake, dropped when the connection
    /// ends.
    reader: Mutex<Option<ReadSide>>,
}

/// The reading end of an admitted connection (used by the main loop only).
struct ReadSide {
    opener: FrameOpener,
    /// Bytes read and not yet decoded are `buffered[start..end]` (at most one frame and a read's
    /// worth); the rest of `buffered` is room for the next read.
    buffered: Vec<u8>,
    start: usize,
    end: usize,
    /// A decoded frame that did not fit the inbound bounds; it goes first once there is room,
    /// and nothing more is read meanwhile.
    held: Option<(Inbound, usize)>,
}

struct Shared {
    conns: Mutex<BTreeMap<u64, Arc<Conn>>>,
    /// Bytes waiting in all connections' inbound queues.
    inbound_total: AtomicUsize,
    /// Connections not yet authenticated or admitted, counted against [`CONNECTIONS_MAX`].
    connecting: AtomicU64,
    next_id: AtomicU64,
    wake: EventFd,
    keys_dir: PathBuf,
    counters: Mutex<FabricCounters>,
}

/// The listeners and their connections.
pub struct Hub {
    shared: Arc<Shared>,
    listening: Vec<String>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A connected stream of either kind.
enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(stream) => Stream::Unix(stream.try_clone()?),
            Stream::Tcp(stream) => Stream::Tcp(stream.try_clone()?),
        })
    }

    /// Writes what the socket takes now without waiting (never raising SIGPIPE); how much.
    fn send_now(&self, bytes: &[u8]) -> io::Result<usize> {
        use nix::sys::socket::{MsgFlags, send};
        use std::os::fd::AsRawFd;
        let fd = match self {
            Stream::Unix(stream) => stream.as_raw_fd(),
            Stream::Tcp(stream) => stream.as_raw_fd(),
        };
        loop {
            match send(fd, bytes, MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL) {
                Ok(sent) => return Ok(sent),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(nix::errno::Errno::EAGAIN) => return Ok(0),
                Err(errno) => return Err(io::Error::from(errno)),
            }
        }
    }

    fn shutdown(&self) {
        let _ = match self {
            Stream::Unix(stream) => stream.shutdown(Shutdown::Both),
            Stream::Tcp(stream) => stream.shutdown(Shutdown::Both),
        };
    }

    fn set_timeouts(&self, read: Option<Duration>, write: Option<Duration>) {
        let _ = match self {
            Stream::Unix(stream) => stream.set_read_timeout(read).and(stream.set_write_timeout(write)),
            Stream::Tcp(stream) => stream.set_read_timeout(read).and(stream.set_write_timeout(write)),
        };
    }
}

impl Read for Stream {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(stream) => stream.read(buffer),
            Stream::Tcp(stream) => stream.read(buffer),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buffer: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(stream) => stream.write(buffer),
            Stream::Tcp(stream) => stream.write(buffer),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Shared {
    fn wake(&self) {
        // Fails only when the counter would overflow: the main loop is woken already.
        let _ = self.wake.write(1);
    }

    fn count(&self, update: impl FnOnce(&mut FabricCounters)) {
        update(&mut lock(&self.counters));
    }
}

impl Hub {
    /// Binds every endpoint (a stale unix socket file left by a killed server is replaced) and
    /// starts accepting. Keys are read from `keys_dir/<node>.key` at each handshake.
    pub fn open(endpoints: &[Endpoint], keys_dir: PathBuf) -> io::Result<Hub> {
        let wake = EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)?;
        let shared = Arc::new(Shared {
            conns: Mutex::new(BTreeMap::new()),
            inbound_total: AtomicUsize::new(0),
            connecting: AtomicU64::new(0),
            next_id: AtomicU64::new(1),
            wake,
            keys_dir,
            counters: Mutex::new(FabricCounters::default()),
        });
        let mut listening = Vec::new();
        for endpoint in endpoints {
            let listener =
                bind(endpoint).map_err(|error| io::Error::new(error.kind(), format!("{endpoint}: {error}")))?;
            let shared = shared.clone();
            std::thread::Builder::new().name("fabric-accept".into()).spawn(move || accept_loop(listener, shared))?;
            listening.push(endpoint.to_string());
        }
        Ok(Hub { shared, listening })
    }

    /// The fd the main loop polls to learn that a connection has something for it.
    pub fn wake_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.shared.wake.as_fd()
    }

    /// Packets read from every admitted connection and not yet taken by the main loop.
    pub fn queued_packets(&self) -> usize {
        self.connections().iter().map(|conn| conn.queued_packets()).sum()
    }

    /// Signals the wake fd again (a wait that took a wakeup it did not act on gives it back).
    pub fn wake_again(&self) {
        self.shared.wake();
    }

    /// Clears the wake fd (call before looking at the connections).
    pub fn clear_wake(&self) {
        // EAGAIN when nothing was signalled: nothing to clear.
        let _ = self.shared.wake.read();
    }

    /// The connections whose sockets the main loop polls, and whether a frame waits for inbound
    /// room somewhere (the loop must then look again soon without being woken).
    pub fn polled(&self) -> (Vec<Arc<Conn>>, bool) {
        let mut polled = Vec::new();
        let mut held = false;
        for conn in self.connections() {
            match conn.wants_poll() {
                Some(true) => polled.push(conn),
                Some(false) => held = true,
                None => {}
            }
        }
        (polled, held)
    }

    /// Polls the connections' sockets (and `also`) for up to `timeout`, reads every connection
    /// that has something, and queues held frames that fit now. Returns whether `also` polled
    /// ready; `None` if nothing was ready within the timeout.
    pub fn poll_read(&self, also: Option<std::os::fd::BorrowedFd<'_>>, timeout: Duration) -> Option<bool> {
        use nix::poll::{PollFd, PollFlags, ppoll};
        use nix::sys::time::TimeSpec;
        let (polled, held) = self.polled();
        let mut fds: Vec<PollFd> = also
            .into_iter()
            .chain(polled.iter().map(|conn| conn.fd()))
            .map(|fd| PollFd::new(fd, PollFlags::POLLIN))
            .collect();
        // An error (EINTR at a stop signal) counts as nothing ready: the caller looks again.
        let ready = ppoll(&mut fds, Some(TimeSpec::from_duration(timeout)), None).unwrap_or_default();
        let is_ready = |fd: &PollFd| fd.revents().is_some_and(|events| !events.is_empty());
        let also_ready = also.is_some() && is_ready(&fds[0]);
        let skip = usize::from(also.is_some());
        let readable: Vec<bool> = fds[skip..].iter().map(is_ready).collect();
        drop(fds);
        // Connections that stopped at a look's byte bound are read again in turns, until each
        // has given what it holds or met its inbound bound (as a reader thread would have).
        let mut more: Vec<&Arc<Conn>> =
            polled.iter().zip(readable).filter(|(_, readable)| *readable).map(|(conn, _)| conn).collect();
        while !more.is_empty() {
            more.retain(|conn| conn.read_available());
        }
        if held {
            for conn in self.connections() {
                if conn.wants_poll() == Some(false) {
                    conn.read_available();
                }
            }
        }
        (ready > 0).then_some(also_ready)
    }

    /// Authenticated connections waiting for the main loop to admit or refuse them.
    pub fn pending(&self) -> Vec<Arc<Conn>> {
        let conns = lock(&self.shared.conns);
        conns.values().filter(|conn| lock(&conn.state).admission == Admission::Pending).cloned().collect()
    }

    /// Admitted connections (including ones that closed and still have inbound frames).
    pub fn connections(&self) -> Vec<Arc<Conn>> {
        let conns = lock(&self.shared.conns);
        conns.values().filter(|conn| lock(&conn.state).admission == Admission::Admitted).cloned().collect()
    }

    /// Removes closed connections with nothing left for the main loop; returns them.
    pub fn reap(&self) -> Vec<(Arc<Conn>, String)> {
        let mut conns = lock(&self.shared.conns);
        let mut gone = Vec::new();
        conns.retain(|_, conn| {
            let state = lock(&conn.state);
            match &state.closed {
                Some(reason) if state.inbound.is_empty() && state.receipts.is_empty() => {
                    gone.push((conn.clone(), reason.clone()));
                    false
                }
                _ => true,
            }
        });
        gone
    }

    pub fn counters(&self) -> FabricCounters {
        lock(&self.shared.counters).clone()
    }

    pub fn count(&self, update: impl FnOnce(&mut FabricCounters)) {
        self.shared.count(update);
    }

    pub fn listening(&self) -> &[String] {
        &self.listening
    }

    pub fn status(&self) -> Vec<ConnectionStatus> {
        self.connections()
            .iter()
            .filter(|conn| !conn.is_closed())
            .map(|conn| ConnectionStatus {
                node: conn.node.to_string(),
                addr: conn.addr.to_string(),
                peer: conn.peer.clone(),
                epoch: format!("{:016x}", conn.epoch),
                ports: lock(&conn.state).ports.clone(),
            })
            .collect()
    }
}

impl Conn {
    pub fn admit(&self) {
        lock(&self.state).admission = Admission::Admitted;
        self.changed.notify_all();
    }

    pub fn refuse(&self, reason: String) {
        lock(&self.state).admission = Admission::Refused(reason);
        self.changed.notify_all();
    }

    pub fn is_closed(&self) -> bool {
        let state = lock(&self.state);
        state.closed.is_some() || state.farewell.is_some()
    }

    /// The next inbound item, if any (the caller may put it back with [`Conn::unpop`]).
    pub fn pop(&self) -> Option<Inbound> {
        let mut state = lock(&self.state);
        let (item, bytes) = state.inbound.pop_front()?;
        state.inbound_bytes -= bytes;
        self.shared.inbound_total.fetch_sub(bytes, Ordering::AcqRel);
        Some(item)
    }

    /// Packets read from this connection and not yet taken by the main loop.
    pub fn queued_packets(&self) -> usize {
        lock(&self.state).inbound.iter().map(|(packets, _)| packets.len()).sum()
    }

    /// Puts an item taken by [`Conn::pop`] back in front (it could not be taken this cycle).
    pub fn unpop(&self, item: Inbound) {
        let bytes = inbound_bytes(&item);
        let mut state = lock(&self.state);
        state.inbound_bytes += bytes;
        self.shared.inbound_total.fetch_add(bytes, Ordering::AcqRel);
        state.inbound.push_front((item, bytes));
    }

    /// The receipts read since the last call.
    pub fn take_receipts(&self) -> Vec<PacketId> {
        std::mem::take(&mut lock(&self.state).receipts)
    }

    /// A port list the node announced since the last call.
    pub fn take_announcement(&self) -> Option<Vec<u16>> {
        lock(&self.state).ports_announced.take()
    }

    pub fn set_ports(&self, ports: Vec<u16>) {
        lock(&self.state).ports = ports;
    }

    pub fn has_port(&self, port: u16) -> bool {
        lock(&self.state).ports.contains(&port)
    }

    /// Is there room for deliveries on this connection now?
    pub fn has_delivery_room(&self) -> bool {
        let state = lock(&self.state);
        state.closed.is_none() && state.farewell.is_none() && state.outbound_bytes < OUTBOUND_DELIVERY_BYTES_MAX
    }

    /// Queues a frame for the writer. False if the connection is closed (or just closed because its
    /// peer stopped reading).
    pub fn send(&self, frame: &Frame) -> bool {
        let mut bytes = frame.encode();
        let mut state = lock(&self.state);
        if state.closed.is_some() || state.farewell.is_some() {
            return false;
        }
        let Some(sealer) = state.sealer.as_mut() else { return false };
        let tag = sealer.seal(&bytes);
        bytes.extend_from_slice(&tag);
        // Straight onto the socket when nothing is queued before it and the socket takes it
        // now (the usual case: a cycle's acks or deliveries for one node), which saves waking
        // the writer thread; the rest, if any, goes to the writer.
        if state.outbound.is_empty() && !state.writing {
            match self.stream.send_now(&bytes) {
                Ok(sent) if sent == bytes.len() => return true,
                Ok(sent) => {
                    bytes.drain(..sent);
                    state.partial_front = sent > 0;
                }
                Err(error) => {
                    drop(state);
                    self.close(format!("write: {error}"));
                    return false;
                }
            }
        }
        if state.outbound_bytes + bytes.len() > OUTBOUND_BYTES_MAX {
            drop(state);
            self.shared.count(|counters| counters.slow_peers_closed += 1);
            self.close(format!("the node has not read {OUTBOUND_BYTES_MAX} bytes sent to it"));
            return false;
        }
        state.outbound_bytes += bytes.len();
        state.outbound.push_back(bytes);
        drop(state);
        self.changed.notify_all();
        true
    }

    /// Ends the connection, telling the node why: the writer drops what is still queued (packets go
    /// again over the next connection, acks are asked for again by sending again), sends a sealed
    /// refusal with the reason and closes.
    fn close_telling(&self, reason: String) {
        let mut state = lock(&self.state);
        if state.closed.is_none() && state.farewell.is_none() {
            state.farewell = Some(reason);
            // The rest of a frame already begun stays (the writer finishes it before the refusal).
            let begun = if state.partial_front { state.outbound.pop_front() } else { None };
            state.outbound.clear();
            state.outbound_bytes = begun.as_ref().map_or(0, Vec::len);
            state.outbound.extend(begun);
        }
        drop(state);
        self.changed.notify_all();
        self.shared.wake();
    }

    fn close(&self, reason: String) {
        let mut state = lock(&self.state);
        if state.closed.is_none() {
            state.closed = Some(reason);
        }
        drop(state);
        self.stream.shutdown();
        self.changed.notify_all();
        self.shared.wake();
    }
}

/// What a decoded frame costs in memory: the payload and, per packet, the struct with its origin
/// name (a heap string).
fn inbound_bytes(packets: &Inbound) -> usize {
    packets.iter().map(|packet| packet.payload.len() + 128 + packet.id.origin.as_str().len()).sum()
}

enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

fn bind(endpoint: &Endpoint) -> io::Result<Listener> {
    match endpoint {
        Endpoint::Unix(path) => {
            // A socket file left by a server that was killed refuses connections: replace it. A
            // live server still answers, and then this one must not steal its path.
            if path.exists() {
                match UnixStream::connect(path) {
                    Ok(_) => {
                        return Err(io::Error::new(io::ErrorKind::AddrInUse, "another server listens there"));
                    }
                    Err(_) => std::fs::remove_file(path)?,
                }
            }
            Ok(Listener::Unix(UnixListener::bind(path)?))
        }
        // std sets SO_REUSEADDR on Unix, so a restarted server rebinds at once.
        Endpoint::Tcp(address) => Ok(Listener::Tcp(TcpListener::bind(address.as_str())?)),
    }
}

fn accept_loop(listener: Listener, shared: Arc<Shared>) {
    loop {
        let accepted = match &listener {
            Listener::Unix(listener) => listener.accept().map(|(stream, _)| (Stream::Unix(stream), "unix".to_owned())),
            Listener::Tcp(listener) => listener.accept().map(|(stream, peer)| {
                let _ = stream.set_nodelay(true);
                set_keepalive(&stream);
                (Stream::Tcp(stream), peer.to_string())
            }),
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                eprintln!("ftss-server: fabric accept: {error}");
                std::thread::sleep(ACCEPT_RETRY_PAUSE);
                continue;
            }
        };
        shared.count(|counters| counters.accepted += 1);
        let open = lock(&shared.conns).len() + shared.connecting.load(Ordering::Relaxed) as usize;
        if open >= CONNECTIONS_MAX {
            refuse(stream, &shared, &peer, format!("the server has {CONNECTIONS_MAX} connections"));
            continue;
        }
        shared.connecting.fetch_add(1, Ordering::Relaxed);
        let shared_for_thread = shared.clone();
        let spawned = std::thread::Builder::new().name("fabric-hello".into()).spawn(move || {
            let shared = shared_for_thread;
            let session = handshake(stream, &shared, &peer);
            shared.connecting.fetch_sub(1, Ordering::Relaxed);
            if let Some((conn, opener)) = session {
                // From here on the main loop reads the connection.
                *lock(&conn.reader) = Some(ReadSide { opener, buffered: Vec::new(), start: 0, end: 0, held: None });
                shared.wake();
            }
        });
        if let Err(error) = spawned {
            shared.connecting.fetch_sub(1, Ordering::Relaxed);
            eprintln!("ftss-server: fabric: cannot start a connection thread: {error}");
        }
    }
}

/// Turns on TCP keepalive with short timers, so that a connection whose node lost power is closed
/// (and its threads and slot freed) within about half a minute.
fn set_keepalive(socket: &TcpStream) {
    use nix::sys::socket::{setsockopt, sockopt};
    let _ = setsockopt(socket, sockopt::KeepAlive, &true);
    let _ = setsockopt(socket, sockopt::TcpKeepIdle, &KEEPALIVE_IDLE_SECONDS);
    let _ = setsockopt(socket, sockopt::TcpKeepInterval, &KEEPALIVE_INTERVAL_SECONDS);
    let _ = setsockopt(socket, sockopt::TcpKeepCount, &KEEPALIVE_PROBES);
}

/// Reads from a stream with one deadline for everything read (a peer that sends a byte now and then
/// cannot hold a handshake open).
struct DeadlineReader<'a> {
    stream: &'a mut Stream,
    deadline: Instant,
}

impl Read for DeadlineReader<'_> {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "handshake took too long"));
        }
        self.stream.set_timeouts(Some(left), Some(HANDSHAKE_TIMEOUT));
        self.stream.read(buffer)
    }
}

/// Tells the peer why and closes. Bad input never gets more than a log line and a refusal.
fn refuse(mut stream: Stream, shared: &Shared, peer: &str, reason: String) {
    eprintln!("ftss-server: fabric: refused {peer}: {reason}");
    shared.count(|counters| counters.refused += 1);
    stream.set_timeouts(Some(HANDSHAKE_TIMEOUT), Some(HANDSHAKE_TIMEOUT));
    let _ = fabric::write_frame(&mut stream, &Frame::Refused { reason });
    stream.shutdown();
}

/// Challenge, verify the node's proof, let the main loop admit it, welcome it. Returns the
/// connection and the opener of its sealed frames; `None` if refused.
fn handshake(stream: Stream, shared: &Arc<Shared>, peer: &str) -> Option<(Arc<Conn>, FrameOpener)> {
    let server_nonce = fabric::nonce();
    let (mut stream, hello) = read_hello(stream, shared, peer, server_nonce)?;
    let who = format!("node {} at {peer}", hello.node);
    let key = match authenticate(shared, &hello, &server_nonce) {
        Ok(key) => key,
        Err(reason) => {
            refuse(stream, shared, &who, reason);
            return None;
        }
    };
    let conn = new_conn(shared, &hello, peer, stream.try_clone().ok()?);
    lock(&shared.conns).insert(conn.id, conn.clone());
    shared.wake();
    if let Some(reason) = await_admission(&conn) {
        lock(&shared.conns).remove(&conn.id);
        refuse(stream, shared, &who, reason);
        return None;
    }
    let proof = fabric::server_proof(&key, &server_nonce, &hello.nonce);
    if fabric::write_frame(&mut stream, &Frame::Welcome { proof }).is_err() {
        conn.close("the node left during the handshake".into());
        return None;
    }
    shared.count(|counters| counters.authenticated += 1);
    eprintln!("ftss-server: fabric: {who} connected (addr {}, epoch {:016x})", hello.addr, hello.epoch);
    stream.set_timeouts(None, Some(WRITE_TIMEOUT));
    let (sealer, opener) = fabric::session(&key, &server_nonce, &hello.nonce, Role::Server);
    lock(&conn.state).sealer = Some(sealer);
    let writer_conn = conn.clone();
    let spawned = std::thread::Builder::new().name("fabric-write".into()).spawn(move || write_loop(&writer_conn));
    if spawned.is_err() {
        conn.close("cannot start a writer thread".into());
        return None;
    }
    drop(stream);
    Some((conn, opener))
}

/// Sends the challenge and reads the node's hello (within the handshake's time); `None` if the
/// peer left or was refused for a bad frame.
fn read_hello(
    mut stream: Stream,
    shared: &Arc<Shared>,
    peer: &str,
    server_nonce: fabric::Nonce,
) -> Option<(Stream, fabric::Hello)> {
    stream.set_timeouts(Some(HANDSHAKE_TIMEOUT), Some(HANDSHAKE_TIMEOUT));
    if fabric::write_frame(&mut stream, &Frame::Challenge { version: FABRIC_VERSION, nonce: server_nonce }).is_err() {
        return None;
    }
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    let read =
        fabric::read_frame_limited(&mut DeadlineReader { stream: &mut stream, deadline }, HANDSHAKE_FRAME_BYTES_MAX);
    let reason = match read {
        Ok(Frame::Hello(hello)) => return Some((stream, hello)),
        Err(FrameError::Closed) => return None,
        Ok(other) => format!("expected a hello frame, got {}", frame_name(&other)),
        Err(error) => format!("bad hello: {error}"),
    };
    shared.count(|counters| counters.bad_frames += 1);
    refuse(stream, shared, peer, reason);
    None
}

/// Checks the hello: the protocol version, the node's key and its proof, and the node's number
/// of connections. Returns the node's key, or why it is refused.
fn authenticate(shared: &Shared, hello: &fabric::Hello, server_nonce: &fabric::Nonce) -> Result<Vec<u8>, String> {
    if hello.version != FABRIC_VERSION {
        return Err(format!("protocol version {} (this server speaks {FABRIC_VERSION})", hello.version));
    }
    let key = read_node_key(&shared.keys_dir, &hello.node)?;
    if !fabric::verify_client(&key, server_nonce, hello) {
        return Err("authentication failed: wrong key for this node".into());
    }
    let connected = lock(&shared.conns).values().filter(|conn| conn.node == hello.node).count();
    if connected >= CONNECTIONS_PER_NODE_MAX {
        return Err(format!("node {} has {CONNECTIONS_PER_NODE_MAX} connections", hello.node));
    }
    Ok(key)
}

/// A connection for an authenticated hello, waiting for admission.
fn new_conn(shared: &Arc<Shared>, hello: &fabric::Hello, peer: &str, write_stream: Stream) -> Arc<Conn> {
    Arc::new(Conn {
        id: shared.next_id.fetch_add(1, Ordering::Relaxed),
        node: hello.node.clone(),
        addr: hello.addr,
        epoch: hello.epoch,
        peer: peer.to_owned(),
        state: Mutex::new(ConnState {
            admission: Admission::Pending,
            inbound: VecDeque::new(),
            inbound_bytes: 0,
            outbound: VecDeque::new(),
            outbound_bytes: 0,
            sealer: None,
            writing: false,
            partial_front: false,
            ports_announced: None,
            ports: Vec::new(),
            receipts: Vec::new(),
            closed: None,
            farewell: None,
        }),
        changed: Condvar::new(),
        stream: write_stream,
        shared: shared.clone(),
        reader: Mutex::new(None),
    })
}

/// Waits (within the handshake's time) for the main loop to admit or refuse `conn`; returns why
/// it is refused, or `None` once admitted.
fn await_admission(conn: &Conn) -> Option<String> {
    let admission = {
        let state = lock(&conn.state);
        let (state, _) = conn
            .changed
            .wait_timeout_while(state, HANDSHAKE_TIMEOUT, |state| state.admission == Admission::Pending)
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        state.admission.clone()
    };
    match admission {
        Admission::Admitted => None,
        Admission::Refused(reason) => Some(reason),
        Admission::Pending => Some("the server did not admit the node in time".into()),
    }
}

/// Reads `keys_dir/<node>.key`.
pub fn read_node_key(keys_dir: &Path, node: &NodeName) -> Result<Vec<u8>, String> {
    let path = keys_dir.join(format!("{node}.key"));
    if !path.exists() {
        return Err(format!("no key for node {node} (expected {})", path.display()));
    }
    fabric::read_key_file(&path)
}

fn frame_name(frame: &Frame) -> &'static str {
    match frame {
        Frame::Challenge { .. } => "challenge",
        Frame::Hello(_) => "hello",
        Frame::Welcome { .. } => "welcome",
        Frame::Refused { .. } => "refused",
        Frame::Packets(_) => "packets",
        Frame::Acks(_) => "acks",
        Frame::Receipts(_) => "receipts",
        Frame::Ports(_) => "ports",
    }
}

impl ReadSide {
    /// Moves the bytes not yet decoded to the front and leaves room for a read of
    /// [`READ_BUFFER_BYTES`] after them (more memory only while a longer frame is put together;
    /// it is given back once that frame is decoded).
    fn make_room(&mut self) {
        self.buffered.copy_within(self.start..self.end, 0);
        self.end -= self.start;
        self.start = 0;
        let want = self.end + READ_BUFFER_BYTES;
        if self.buffered.len() < want {
            self.buffered.resize(want, 0);
        } else if self.buffered.len() > 2 * READ_BUFFER_BYTES && want < 2 * READ_BUFFER_BYTES {
            self.buffered.truncate(want);
            self.buffered.shrink_to_fit();
        }
    }
}

/// How reading a connection ended.
enum ReadEnd {
    /// The node left or the socket failed: the connection closes.
    Closed(String),
    /// The node broke the protocol: it is told why, then the connection closes.
    Bad(String),
}

impl Conn {
    /// The socket the main loop polls for this connection.
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match &self.stream {
            Stream::Unix(stream) => stream.as_fd(),
            Stream::Tcp(stream) => stream.as_fd(),
        }
    }

    /// Should the main loop poll this connection's socket (read side installed, nothing held back
    /// by the inbound bounds)? `None` if it has nothing to read with; `Some(false)` if a frame
    /// waits for room.
    fn wants_poll(&self) -> Option<bool> {
        lock(&self.reader).as_ref().map(|side| side.held.is_none())
    }

    /// Reads what the socket holds now (never waiting), at most 4 reads' worth, and queues the
    /// whole frames in it. A frame beyond the inbound bounds is held, and reading stops until the
    /// main loop makes room. A closed or broken connection loses its read side. Returns whether
    /// the look stopped at its byte bound with more to read.
    fn read_available(&self) -> bool {
        let mut reader = lock(&self.reader);
        let Some(side) = reader.as_mut() else { return false };
        let end = match self.read_into(side) {
            Ok(more) => return more,
            Err(end) => end,
        };
        *reader = None;
        drop(reader);
        match end {
            ReadEnd::Closed(reason) => self.close(reason),
            ReadEnd::Bad(reason) => bad_frame(self, reason),
        }
        false
    }

    fn read_into(&self, side: &mut ReadSide) -> Result<bool, ReadEnd> {
        use std::os::fd::AsRawFd;
        if self.is_closed() {
            return Err(ReadEnd::Closed("closed".into()));
        }
        let mut read = 0;
        loop {
            if !self.queue_buffered(side)? {
                return Ok(false);
            }
            side.make_room();
            if read >= 4 * READ_BUFFER_BYTES {
                // The next look (the socket still polls readable) goes on.
                return Ok(true);
            }
            let room = side.buffered.len() - side.end;
            match recv_now(self.fd().as_raw_fd(), &mut side.buffered[side.end..]) {
                Ok(0) => return Err(ReadEnd::Closed("the node closed the connection".into())),
                Ok(count) => {
                    side.end += count;
                    read += count;
                    if count < room {
                        // A stream socket gave all it held (the next poll tells of more): no
                        // read that would only say so.
                        return self.queue_buffered(side).map(|_| false);
                    }
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(error) => return Err(ReadEnd::Closed(format!("read: {error}"))),
            }
        }
    }

    /// Queues the held frame, then the whole frames buffered, until one does not fit (it is held).
    /// Returns whether nothing is held.
    fn queue_buffered(&self, side: &mut ReadSide) -> Result<bool, ReadEnd> {
        if let Some((item, bytes)) = side.held.take()
            && let Some(back) = self.queue_inbound(item, bytes)
        {
            side.held = Some(back);
            return Ok(false);
        }
        while holds_whole_frame(&side.buffered[side.start..side.end]) {
            let mut rest = &side.buffered[side.start..side.end];
            let before = rest.len();
            let frame = side.opener.read(&mut rest, fabric::FRAME_BODY_BYTES_MAX);
            side.start += before - rest.len();
            if let Some((item, bytes)) = self.take_frame(frame)?
                && let Some(back) = self.queue_inbound(item, bytes)
            {
                side.held = Some(back);
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// What a frame read from the node means here: packets for the inbound queue (with their
    /// bytes against its bounds); receipts and port lists are kept for the cycle directly.
    fn take_frame(&self, frame: Result<Frame, FrameError>) -> Result<Option<(Inbound, usize)>, ReadEnd> {
        let frame = frame.map_err(|error| ReadEnd::Bad(error.to_string()))?;
        match frame {
            Frame::Packets(bytes) => {
                let packets = decode_packets(&bytes, self).map_err(ReadEnd::Bad)?;
                let bytes = inbound_bytes(&packets);
                Ok(Some((packets, bytes)))
            }
            Frame::Receipts(bytes) => {
                let ids = decode_receipts(&bytes).map_err(ReadEnd::Bad)?;
                let mut state = lock(&self.state);
                let room = RECEIPTS_WAITING_MAX.saturating_sub(state.receipts.len());
                state.receipts.extend(ids.into_iter().take(room));
                Ok(None)
            }
            Frame::Ports(ports) => {
                lock(&self.state).ports_announced = Some(ports);
                // Taken at the start of a cycle: read during a gather, it must not wait for the
                // next poll.
                self.shared.wake();
                Ok(None)
            }
            other => Err(ReadEnd::Bad(format!("a node may not send a {} frame now", frame_name(&other)))),
        }
    }

    /// Queues a decoded frame for the cycle unless it would pass this connection's or all
    /// connections' bound (a frame alone always fits an empty queue); gives it back if not.
    fn queue_inbound(&self, item: Inbound, bytes: usize) -> Option<(Inbound, usize)> {
        let total = &self.shared.inbound_total;
        let mut state = lock(&self.state);
        if state.closed.is_some() {
            return None;
        }
        let own_full = state.inbound_bytes > 0 && state.inbound_bytes + bytes > INBOUND_BYTES_MAX;
        let all = total.load(Ordering::Acquire);
        let all_full = all > 0 && all + bytes > INBOUND_TOTAL_BYTES_MAX;
        if own_full || all_full {
            return Some((item, bytes));
        }
        state.inbound_bytes += bytes;
        total.fetch_add(bytes, Ordering::AcqRel);
        state.inbound.push_back((item, bytes));
        None
    }
}

/// Receives what the socket holds now without waiting (`WouldBlock` if nothing).
fn recv_now(fd: std::os::fd::RawFd, buffer: &mut [u8]) -> io::Result<usize> {
    use nix::sys::socket::{MsgFlags, recv};
    loop {
        match recv(fd, buffer, MsgFlags::MSG_DONTWAIT) {
            Ok(count) => return Ok(count),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(errno) => return Err(io::Error::from(errno)),
        }
    }
}

/// Does `buffered` start with a whole sealed frame (length prefix, content, CRC, MAC), or with a
/// length no frame may have (decoding it reports the error at once, before more is buffered)?
fn holds_whole_frame(buffered: &[u8]) -> bool {
    let Some(prefix) = buffered.get(..4) else { return false };
    let length = u32::from_le_bytes(prefix.try_into().expect("4 bytes")) as usize;
    length == 0
        || length > fabric::FRAME_BODY_BYTES_MAX + 1
        || buffered.len() >= 4 + length + 4 + fabric::FRAME_MAC_BYTES
}

/// A bad frame after the handshake ends the connection; the reason is logged here and sent to the
/// node in a sealed refusal by the writer thread, after the rest of any frame already begun (no
/// frame is queued or written directly once the farewell is set).
fn bad_frame(conn: &Conn, reason: String) {
    conn.shared.count(|counters| counters.bad_frames += 1);
    eprintln!("ftss-server: fabric: closing node {} at {}: {reason}", conn.node, conn.peer);
    conn.close_telling(reason);
}

/// A packets frame from `conn`: the source node is the authenticated one and the source address its
/// own, whatever the batch says (as for outbox files).
fn decode_packets(bytes: &[u8], conn: &Conn) -> Result<Vec<Packet>, String> {
    let batch = decode_batch(bytes).map_err(|error| format!("bad packets batch: {error}"))?;
    if batch.header.kind != BatchKind::Packets {
        return Err(format!("a packets frame holds a {:?} batch", batch.header.kind));
    }
    let mut packets = Vec::with_capacity(batch.records.len());
    for record in batch.records {
        let Record::Packet(mut packet) = record else { unreachable!("decode checks tags against the kind") };
        packet.id.origin = conn.node.clone();
        packet.source.set_ip(conn.addr);
        packets.push(packet);
    }
    Ok(packets)
}

fn decode_receipts(bytes: &[u8]) -> Result<Vec<PacketId>, String> {
    let batch = decode_batch(bytes).map_err(|error| format!("bad receipts batch: {error}"))?;
    if batch.header.kind != BatchKind::Receipts {
        return Err(format!("a receipts frame holds a {:?} batch", batch.header.kind));
    }
    Ok(batch
        .records
        .into_iter()
        .filter_map(|record| match record {
            Record::Receipt(id) => Some(id),
            _ => None,
        })
        .collect())
}

/// Writes queued frames (sealed when queued) until the connection closes.
fn write_loop(conn: &Arc<Conn>) {
    let mut stream = match conn.stream.try_clone() {
        Ok(stream) => stream,
        Err(error) => return conn.close(format!("cannot write: {error}")),
    };
    loop {
        let mut state = lock(&conn.state);
        while state.outbound.is_empty() && state.closed.is_none() && state.farewell.is_none() {
            state = conn.changed.wait(state).unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        if state.closed.is_some() {
            return;
        }
        if let Some(reason) = state.farewell.clone() {
            // What is still queued is dropped, except the rest of a frame already begun.
            let mut sealed = match state.partial_front {
                true => state.outbound.pop_front().unwrap_or_default(),
                false => Vec::new(),
            };
            let mut refusal = Frame::Refused { reason: reason.clone() }.encode();
            if let Some(sealer) = state.sealer.as_mut() {
                let tag = sealer.seal(&refusal);
                refusal.extend_from_slice(&tag);
            }
            sealed.extend_from_slice(&refusal);
            drop(state);
            // Best effort (the stream's write timeout bounds it): the reason is logged anyway.
            let _ = stream.write_all(&sealed);
            return conn.close(reason);
        }
        // Everything queued goes in one write, up to a bound.
        let mut sealed = Vec::new();
        state.partial_front = false;
        while let Some(bytes) = state.outbound.pop_front() {
            sealed.extend_from_slice(&bytes);
            if sealed.len() >= WRITE_BATCH_BYTES {
                break;
            }
        }
        state.writing = true;
        drop(state);
        let written = stream.write_all(&sealed);
        let mut state = lock(&conn.state);
        state.writing = false;
        state.outbound_bytes -= sealed.len();
        drop(state);
        if let Err(error) = written {
            return conn.close(format!("write: {error}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fsbridge::{BatchEncoder, BatchHeader};

    /// A node's side of a session: connects, proves its key, waits for the welcome (the test admits
    /// it meanwhile), then writes `frames` sealed packets frames of one 16 KiB packet each and
    /// keeps the connection open until told.
    fn node(path: PathBuf, key: Vec<u8>, frames: u64, done: std::sync::mpsc::Receiver<()>) {
        let mut stream = UnixStream::connect(path).unwrap();
        let Ok(Frame::Challenge { nonce, .. }) = fabric::read_frame(&mut stream) else { panic!("no challenge") };
        let mut hello = fabric::Hello {
            version: FABRIC_VERSION,
            node: NodeName::new("n").unwrap(),
            addr: "10.77.0.5".parse().unwrap(),
            epoch: 3,
            nonce: fabric::nonce(),
            proof: [0; fabric::PROOF_BYTES],
        };
        hello.proof = fabric::client_proof(&key, &nonce, &hello);
        fabric::write_frame(&mut stream, &Frame::Hello(hello.clone())).unwrap();
        assert!(matches!(fabric::read_frame(&mut stream), Ok(Frame::Welcome { .. })));
        let (mut sealer, _) = fabric::session(&key, &nonce, &hello.nonce, Role::Node);
        for seq in 1..=frames {
            let header =
                BatchHeader { kind: BatchKind::Packets, node: hello.node.clone(), epoch: 3, batch_seq: seq, flags: 0 };
            let mut encoder = BatchEncoder::new(&header);
            encoder.push(&Record::Packet(Packet {
                id: PacketId { origin: hello.node.clone(), epoch: 3, seq },
                source: "10.77.0.5:1".parse().unwrap(),
                destination: "10.77.0.6:2".parse().unwrap(),
                sent_unix_us: 0,
                payload: vec![seq as u8; 16 * 1024],
            }));
            let mut bytes = Frame::Packets(encoder.finish()).encode();
            let tag = sealer.seal(&bytes);
            bytes.extend_from_slice(&tag);
            stream.write_all(&bytes).unwrap();
        }
        let _ = done.recv();
    }

    fn wait_for<T>(mut found: impl FnMut() -> Option<T>) -> T {
        for _ in 0..1000 {
            if let Some(value) = found() {
                return value;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("not within 5 s");
    }

    /// The main loop reads a connection only while its inbound queue has room: past the bound the
    /// next frame is held and the socket is left alone (TCP pushes back on the node), and what the
    /// cycle takes makes room for the held frame and the rest, in order.
    #[test]
    fn a_connection_past_its_inbound_bound_is_held_until_the_cycle_takes_from_it() {
        let dir = std::env::temp_dir().join(format!("ftss-hub-{}-{}", std::process::id(), fsbridge::random_u64()));
        std::fs::create_dir_all(dir.join("keys")).unwrap();
        let key_text = fabric::generate_key_text();
        std::fs::write(dir.join("keys").join("n.key"), &key_text).unwrap();
        let key = fabric::parse_key(key_text.trim()).unwrap();
        let path = dir.join("fabric.sock");
        let hub = Hub::open(&[Endpoint::Unix(path.clone())], dir.join("keys")).unwrap();
        let (done, wait) = std::sync::mpsc::channel();
        let frames = 12;
        let node = std::thread::spawn(move || node(path, key, frames, wait));
        let conn = wait_for(|| hub.pending().pop());
        conn.admit();
        wait_for(|| (conn.wants_poll() == Some(true)).then_some(()));

        let mut taken = Vec::new();
        let mut held_seen = 0;
        while taken.len() < frames as usize {
            hub.poll_read(None, Duration::from_millis(50));
            let inbound = lock(&conn.state).inbound_bytes;
            assert!(inbound <= INBOUND_BYTES_MAX, "{inbound} bytes queued past the bound");
            if conn.wants_poll() == Some(false) {
                held_seen += 1;
                assert!(!hub.polled().0.iter().any(|polled| polled.id == conn.id), "a held connection is polled");
            }
            // The cycle takes one frame a look, as a slow cycle would.
            if let Some(packets) = conn.pop() {
                taken.extend(packets.into_iter().map(|packet| packet.id.seq));
            }
        }
        assert!(held_seen > 0, "the bound never held a frame back");
        assert_eq!(taken, (1..=frames).collect::<Vec<u64>>(), "frames lost, repeated or reordered");
        assert_eq!(lock(&conn.state).inbound_bytes, 0);
        done.send(()).unwrap();
        node.join().unwrap();
        std::fs::remove_dir_all(dir).unwrap();
    }
}
