//! The shim's process-wide state: the `Shim` (configuration, outbox, fabric link, the table of
//! fabric sockets, what was received and must be receipted) and each fabric socket's `Sock`. It
//! sits below the logic that uses it (`doorbell`, `pump`, `socket`, `privsep`, `fork`, `hooks`) and
//! imports none of them.
//!
//! Lock order (the fork handlers take them all in this order): `start_lock`, `table`, each socket's
//! `state`, `held`, then `once` (the map of once-ledgers; a port ledger's own locks are taken with
//! nothing else held, and a forked child drops them), `dedupe`, `receipts`, `ingress_peers` (a leaf:
//! nothing is taken while it is held), the log. The outbox has its own locks and is
//! replaced, not locked, in a forked child.

use std::collections::{HashMap, VecDeque};
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use fsbridge::log::LogWriter;
use fsbridge::{PacketId, Volume};
use libc::c_int;

use crate::addr::{self, Family, INJECT_HEADER_BYTES};
use crate::config::{AckMode, Config, Transport};
use crate::fabric::Link;
use crate::fds;
use crate::log;
use crate::once::PortLedger;
use crate::outbox::Outbox;
use crate::real::real;
use crate::sys::{errno, lock};
use fsbridge::dedupe::{Dedupe, Seen};

/// The shim's process-wide state; `None` inside means pass-through (FTSS_VOLUME unset or invalid).
pub(crate) static SHIM: OnceLock<Option<Shim>> = OnceLock::new();

/// The shim, once initialized; `None` while initializing, when disabled, or before the constructor.
pub(crate) fn shim() -> Option<&'static Shim> {
    SHIM.get().and_then(Option::as_ref)
}

/// Mutable state of a fabric socket.
#[derive(Default)]
pub struct SockState {
    /// The fabric address this socket sends from and receives on.
    pub local: Option<SocketAddrV4>,
    /// Bound to the wildcard address (or autobound): getsockname reports the wildcard.
    pub wildcard: bool,
    /// The connected peer, if any (IPv4-mapped addresses normalized to IPv4).
    pub peer: Option<SocketAddr>,
    /// The side socket is bound on the real network (so the receive thread relays its traffic).
    pub side_bound: bool,
    /// SO_SNDTIMEO as the app set it: how long a send may wait for room in the ring.
    pub send_timeout: Option<Duration>,
    /// `FTSS_RECV=once` and bound to this explicit port: every datagram is recorded in the port's
    /// once-ledger before recv returns it (see `once`).
    pub once_port: Option<u16>,
}

/// A fabric socket; shared by every app fd dup'ed from it.
pub struct Sock {
    /// Unique in the process: what [`Dedupe`] remembers as the socket holding a datagram.
    pub id: u64,
    /// The shim's end of the socketpair: the receive thread writes datagrams here.
    pub shim_end: c_int,
    /// The original UDP socket, for non-fabric traffic.
    pub side: c_int,
    pub family: Family,
    pub state: Mutex<SockState>,
    /// Datagrams read from the inbox but not yet injected (the app's buffer was full).
    pub held: Mutex<VecDeque<Vec<u8>>>,
}

impl Sock {
    pub fn lock(&self) -> MutexGuard<'_, SockState> {
        lock(&self.state)
    }

    /// Does a datagram from `source` reach the app? A connected UDP socket only receives from its
    /// peer; the kernel drops the rest.
    pub fn accepts(&self, source: SocketAddr) -> bool {
        self.lock().peer.is_none_or(|peer| peer == addr::normalize(source))
    }
}

impl Sock {
    /// The app closed its last fd of this socket: give the port back now, as the kernel does on
    /// close, although the receive thread may still hold the socket for a moment. The side fd is
    /// pointed at an unbound socket (its number stays valid until the socket is dropped).
    fn release_port(&self) {
        // No I/O: the app's closes wait these few calls out (its close loop must not take the
        // inert socket's number, nor put a file of its own there, before the dup3).
        let _making = crate::sys::shim_making();
        // SAFETY: plain fd syscalls on the shim's own fds.
        unsafe {
            let inert = (real().socket)(self.family.domain(), libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
            if inert < 0 {
                return;
            }
            if (real().dup3)(inert, self.side, libc::O_CLOEXEC) < 0 {
                log!("cannot release the port of fd {}: errno {}", self.side, errno());
            }
            (real().close)(inert);
        }
    }
}

impl Drop for Sock {
    fn drop(&mut self) {
        for fd in [self.shim_end, self.side] {
            // The shim owns these fds and nothing else refers to them any more.
            crate::sys::close_internal(fd);
        }
    }
}

/// Outside peers heard through the gateway's ingress, as NAT keeps its way back: a reply to one
/// is carried through ftss (the server sends it from the ingress socket the peer talks to), not
/// sent from this node's own network. At most `INGRESS_PEERS_MAX`, each for `INGRESS_PEER_TTL`
/// after it was last heard.
#[derive(Default)]
pub struct IngressPeers {
    pub(crate) heard: HashMap<SocketAddrV4, Instant>,
}

pub const INGRESS_PEERS_MAX: usize = 4096;
pub const INGRESS_PEER_TTL: Duration = Duration::from_secs(300);

impl IngressPeers {
    pub fn heard(&mut self, peer: SocketAddrV4) {
        let now = Instant::now();
        if self.heard.len() >= INGRESS_PEERS_MAX && !self.heard.contains_key(&peer) {
            self.heard.retain(|_, at| now.duration_since(*at) < INGRESS_PEER_TTL);
            if self.heard.len() >= INGRESS_PEERS_MAX
                && let Some(oldest) = self.heard.iter().min_by_key(|(_, at)| **at).map(|(peer, _)| *peer)
            {
                self.heard.remove(&oldest);
            }
        }
        self.heard.insert(peer, now);
    }

    pub fn contains(&self, peer: &SocketAddrV4) -> bool {
        self.heard.get(peer).is_some_and(|at| at.elapsed() < INGRESS_PEER_TTL)
    }
}

/// The shim's process-wide state.
pub struct Shim {
    pub config: Config,
    pub volume: Volume,
    /// This process's packet-id epoch; a forked child draws a new one.
    pub(crate) epoch: AtomicU64,
    /// This process's outbox (leaked; a forked child gets a new one and never touches the parent's).
    pub(crate) outbox: AtomicPtr<Outbox>,
    /// This process's fabric link (null with the volume transport; leaked and replaced like the
    /// outbox).
    pub(crate) link: AtomicPtr<Link>,
    /// The process this state belongs to; another pid means a vfork child sharing our memory.
    pub(crate) pid: AtomicU32,
    /// The flusher and receive threads run in this process (threads do not survive fork).
    pub(crate) running: AtomicBool,
    /// node.toml is written.
    pub(crate) registered: AtomicBool,
    pub(crate) start_lock: Mutex<()>,
    pub(crate) table: Mutex<HashMap<c_int, Arc<Sock>>>,
    /// Packets the app received, waiting to be written as a receipt batch.
    pub receipts: Mutex<Vec<PacketId>>,
    pub receipt_seq: AtomicU64,
    pub dedupe: Mutex<Dedupe>,
    /// Inbox files claimed with packets the app has not read yet (see `claims`).
    pub claims: Mutex<crate::claims::Claims>,
    /// Once-ledgers open in this process (`FTSS_RECV=once`), by port.
    pub once: Mutex<crate::once::Ledgers>,
    /// Outside peers whose datagrams came in through the gateway's ingress.
    pub ingress_peers: Mutex<IngressPeers>,
    pub(crate) next_sock_id: AtomicU64,
    /// A candidate was dup'ed: converting one must look for its twins.
    pub(crate) candidate_dups: AtomicBool,
}

fn new_outbox(volume: &Volume, config: &Config, epoch: u64) -> *mut Outbox {
    let wants_acks = config.ack == AckMode::Guaranteed;
    let spool = volume.outbox(&config.node);
    let log = config.outbox_log.then(|| LogWriter::new(spool.dir(), epoch));
    let outbox = Outbox::new(spool, log, config.node.clone(), epoch, wants_acks);
    let outbox = match config.transport {
        Transport::Fabric { .. } => outbox.with_targeted_wakeups(),
        Transport::Volume => outbox,
    };
    Box::into_raw(Box::new(outbox))
}

fn new_link(config: &Config, epoch: u64) -> *mut Link {
    match &config.transport {
        Transport::Volume => std::ptr::null_mut(),
        Transport::Fabric { endpoint, key } => {
            Box::into_raw(Box::new(Link::new(endpoint.clone(), key.clone(), config.node.clone(), config.addr, epoch)))
        }
    }
}

impl Shim {
    /// This process's once-ledger of `port` (`FTSS_RECV=once`), opened on first use.
    pub fn once_ledger(&self, port: u16) -> Result<Arc<PortLedger>, c_int> {
        crate::once::prepare(&self.once, &self.dedupe, &self.volume.node_dir(&self.config.node), port)
    }

    pub fn start(config: Config) -> Result<Shim, String> {
        let volume = Volume::new(&config.volume);
        let epoch = fsbridge::random_u64();
        match &config.transport {
            Transport::Volume => {
                if !config.volume.is_dir() {
                    return Err(format!("FTSS_VOLUME {} is not a directory", config.volume.display()));
                }
                // Not the volume (an unmounted mountpoint), or mounted so that acked writes can be
                // lost: refuse before anything is written there.
                fsbridge::mounts::check_volume(&config.volume).map_err(|problems| problems.join("; "))?;
                // A read-only mount (or one this user cannot write) would fail every send: say why
                // once, at start.
                nix::unistd::access(&config.volume, nix::unistd::AccessFlags::W_OK)
                    .map_err(|error| format!("FTSS_VOLUME {} is not writable: {error}", config.volume.display()))?;
                log!(
                    "node {} addr {} volume {} ack {:?} epoch {epoch:016x}",
                    config.node,
                    config.addr,
                    config.volume.display(),
                    config.ack
                );
            }
            Transport::Fabric { endpoint, .. } => {
                log!(
                    "node {} addr {} fabric {endpoint} ack {:?} epoch {epoch:016x}",
                    config.node,
                    config.addr,
                    config.ack
                )
            }
        }
        Ok(Shim {
            outbox: AtomicPtr::new(new_outbox(&volume, &config, epoch)),
            link: AtomicPtr::new(new_link(&config, epoch)),
            config,
            volume,
            epoch: AtomicU64::new(epoch),
            pid: AtomicU32::new(std::process::id()),
            running: AtomicBool::new(false),
            registered: AtomicBool::new(false),
            start_lock: Mutex::new(()),
            table: Mutex::new(HashMap::new()),
            receipts: Mutex::new(Vec::new()),
            receipt_seq: AtomicU64::new(0),
            dedupe: Mutex::new(Dedupe::new()),
            claims: Mutex::new(crate::claims::Claims::default()),
            once: Mutex::new(crate::once::Ledgers::default()),
            ingress_peers: Mutex::new(IngressPeers::default()),
            next_sock_id: AtomicU64::new(1),
            candidate_dups: AtomicBool::new(false),
        })
    }

    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// The fabric link, with the fabric transport.
    pub fn link(&self) -> Option<&'static Link> {
        // SAFETY: the pointer is null or comes from Box::into_raw and is never freed.
        unsafe { self.link.load(Ordering::Acquire).as_ref() }
    }

    pub fn outbox(&self) -> &'static Outbox {
        // SAFETY: the pointer comes from Box::into_raw and is never freed.
        unsafe { &*self.outbox.load(Ordering::Acquire) }
    }

    /// Are we a vfork child running in the parent's memory? Then the shim's state is not ours to
    /// change: the fd calls such a child makes (dup2, close before exec) pass straight through.
    pub fn in_vfork_child(&self) -> bool {
        std::process::id() != self.pid.load(Ordering::Relaxed)
    }

    /// In a forked child (single-threaded, every lock just released by the fork handlers): a new
    /// epoch so packet ids stay unique, a new outbox (the parent publishes what it queued), and the
    /// threads to be started again (at once if the child inherited fabric sockets, so that an event
    /// loop waiting on them is fed even after the parent exits; else on first use).
    pub fn after_fork_in_child(&self) {
        let epoch = fsbridge::random_u64();
        self.epoch.store(epoch, Ordering::Release);
        self.outbox.store(new_outbox(&self.volume, &self.config, epoch), Ordering::Release);
        if let Some(link) = self.link() {
            link.abandon_in_child();
        }
        crate::notify::abandon_in_child();
        self.link.store(new_link(&self.config, epoch), Ordering::Release);
        self.pid.store(std::process::id(), Ordering::Relaxed);
        self.running.store(false, Ordering::Release);
        lock(&self.receipts).clear();
        // Datagrams read from an inbox but not yet injected are the parent's to inject (the
        // socketpair is shared): forget them here, so a redelivery may come to this process.
        let held: Vec<Vec<u8>> = self.socks().iter().flat_map(|sock| std::mem::take(&mut *lock(&sock.held))).collect();
        let mut dedupe = lock(&self.dedupe);
        for datagram in held {
            let header = datagram.first_chunk::<INJECT_HEADER_BYTES>().and_then(addr::parse_header);
            if let Some((_, Some(id))) = header {
                dedupe.forget(&id);
            }
        }
        drop(dedupe);
        lock(&self.claims).clear();
        // The ledger files are named for the parent: this process opens its own on first use.
        lock(&self.once).clear();
        log!("forked child: new epoch {epoch:016x}");
    }

    pub(crate) fn table(&self) -> MutexGuard<'_, HashMap<c_int, Arc<Sock>>> {
        lock(&self.table)
    }

    pub fn sock(&self, fd: c_int) -> Option<Arc<Sock>> {
        self.table().get(&fd).cloned()
    }

    pub fn socks(&self) -> Vec<Arc<Sock>> {
        let mut socks: Vec<Arc<Sock>> = self.table().values().cloned().collect();
        // dup'ed fds share one entry: visit each socket once.
        socks.sort_by_key(|sock| Arc::as_ptr(sock) as usize);
        socks.dedup_by_key(|sock| Arc::as_ptr(sock) as usize);
        socks
    }

    /// Is `addr` carried by ftss? Fabric routes and `FTSS_EGRESS`, and outside peers recently heard
    /// through the gateway's ingress (their replies go back the way they came).
    pub fn is_fabric(&self, addr: SocketAddr) -> bool {
        match addr::normalize(addr) {
            SocketAddr::V4(v4) => self.config.is_fabric(*v4.ip()) || lock(&self.ingress_peers).contains(&v4),
            SocketAddr::V6(_) => false,
        }
    }

    /// `dup`, `dup2`, `dup3`, `fcntl(F_DUPFD*)` made `new` refer to what `old` refers to. The kernel
    /// closed whatever `new` was before; forget it.
    pub fn on_dup(&self, old: c_int, new: c_int) {
        if self.in_vfork_child() || old == new {
            return;
        }
        self.forget(new);
        match fds::kind(old) {
            fds::Kind::Fabric => {
                if let Some(sock) = self.sock(old) {
                    self.table().insert(new, sock);
                    fds::copy(old, new);
                }
            }
            fds::Kind::Candidate => {
                fds::copy(old, new);
                self.candidate_dups.store(true, Ordering::Relaxed);
            }
            _ => {}
        }
    }

    /// The app closed `fd` (or is about to): drop it from the table. The socket's own fds close
    /// when its last app fd is gone.
    pub fn forget(&self, fd: c_int) {
        match fds::kind(fd) {
            fds::Kind::Fabric => {
                fds::clear(fd);
                let mut table = self.table();
                let Some(sock) = table.remove(&fd) else { return };
                if !table.values().any(|other| Arc::ptr_eq(other, &sock)) {
                    drop(table);
                    sock.release_port();
                }
            }
            fds::Kind::Candidate => fds::clear(fd),
            fds::Kind::Internal => log!("the app replaced the shim's fd {fd} (dup2/dup3 onto it)"),
            _ => {}
        }
    }
}

/// The app has the datagram (or the kernel's rules dropped it): queue its receipt.
pub fn mark_received(shim: &Shim, id: &PacketId) {
    lock(&shim.dedupe).set(id, Seen::Received);
    lock(&shim.claims).read(Dedupe::key(id));
    lock(&shim.receipts).push(id.clone());
}
