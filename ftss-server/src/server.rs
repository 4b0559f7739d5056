//! The routing agent: drain outboxes → store durably → ack the source → deliver to inboxes →
//! take receipts → delete or retain. One cycle does each step once with bounded work; `run` repeats
//! cycles until stopped. Operating errors (a full disk, a failed mirror, an unreachable volume) are
//! logged and retried; they never stop the server.
//!
//! Invariants:
//! - A packet is acked (`Stored`) only after `Queue::sync` returned Ok for the group that holds it.
//! - An outbox file is removed only after its packets are durable and acked.
//! - The source node of a packet is the outbox it was drained from, never the file's own claim.
//! - A packet leaves the queue only after its destination node receipted it (or it is
//!   dead-lettered); with `--retain` its bytes stay for that long after.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fsbridge::bell::{BellWriter, Ring, RingKind};
use fsbridge::format::BatchEncoder;
use fsbridge::layout::batch_file_name;
use fsbridge::{Ack, AckState, BatchHeader, BatchKind, NodeName, Packet, PacketId, Record, Volume};
use serde::Serialize;

use crate::core::Time;
use crate::core::admission::{Budget, Limits, Load};
use crate::core::book::{Book, Replayed};
use crate::core::index::{Entry, Index, Key};
use crate::fabric::{Conn, FabricCounters, Hub};
use crate::gateway::{Arrival, Cidr, Gateway, GatewayCounters, IngressRule, IngressStatus, Target};
use crate::metrics::{Histogram, Snapshot};
use crate::outlog::{Logs, SegmentKey, Step};
use crate::queue::{Location, MirrorStatus, Outcome, Queue, QueueError, QueueRecord, RecoveryReport};

/// Unclaimed inbox files of one port after which new packets for it wait for the receiver.
const INBOX_FILES_WAITING_MAX: usize = 4;
/// Most bytes read from one outbox log segment in one cycle.
const LOG_READ_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Most outbox files drained from one node in one cycle; keeps one busy node from starving others.
const DRAIN_FILES_PER_NODE_MAX: usize = 256;
/// Most packets drained in one cycle, across nodes; bounds the memory of one group commit.
const DRAIN_PACKETS_PER_CYCLE_MAX: usize = 65_536;
/// A drain group at least this large is followed by returning freed memory to the system.
const TRIM_AFTER_PACKETS: usize = 4096;
/// Most payload bytes drained in one cycle: with large datagrams the packet count alone would let a
/// cycle hold gigabytes (the decoded packets and the queue's write buffer).
const DRAIN_BYTES_PER_CYCLE_MAX: usize = 32 * 1024 * 1024;
/// Nodes whose bell the server keeps open (one fd each; well under the usual soft limit of 1,024
/// open files, which the queue and the spools also draw on).
const BELLS_OPEN_MAX: usize = 256;
/// Bell records kept for a node whose bell cannot be written now.
const RINGS_HELD_MAX: usize = 65_536;
/// Most packets written into one inbox batch file.
const DELIVER_PACKETS_PER_FILE_MAX: usize = 4096;
/// Most payload bytes written into one inbox batch file (bounds the receiving shim's memory).
const DELIVER_FILE_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Most packets delivered in one cycle; bounds the time one cycle spends writing inboxes.
const DELIVER_PACKETS_PER_CYCLE_MAX: usize = 65_536;
/// Outbox names listed at once per node: bounds memory when a node floods its outbox.
const OUTBOX_BACKLOG_MAX: usize = 16_384;
/// Hidden files quarantined per spool per housekeeping pass.
const HIDDEN_FILES_PER_PASS_MAX: usize = 64;
/// Most receipt files read from one node in one cycle.
const RECEIPT_FILES_PER_NODE_MAX: usize = 1024;
/// How often the node registry (`node.toml` files) is re-read.
const REGISTRY_REFRESH: Duration = Duration::from_secs(1);
/// How often status.json is rewritten.
const STATUS_INTERVAL: Duration = Duration::from_millis(250);
/// How often failed mirrors are checked for a return.
const RESYNC_INTERVAL: Duration = Duration::from_secs(1);
/// Ack files older than this are removed: acks are for processes waiting now, not a history.
const ACK_FILE_AGE_MAX: Duration = Duration::from_secs(300);
/// How often `housekeeping` sweeps.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(10);
/// Files in `tmp/` older than this were left by a writer that died mid-publish.
const TMP_FILE_AGE_MAX: Duration = Duration::from_secs(3600);
/// Dead letters remembered for status.
const DEAD_LETTERS_SHOWN_MAX: usize = 32;
/// Most packets dead-lettered in one cycle.
const DEAD_LETTERS_PER_CYCLE_MAX: usize = 65_536;
/// Most packets in flight (delivered, not receipted) per destination address: a receiver that stops
/// reading holds at most this many in its inbox; the rest wait in the queue.
const IN_FLIGHT_PER_DESTINATION_MAX: usize = 131_072;
/// Packets delivered to one port and not yet receipted: a port whose app stopped reading takes at
/// most this much of its node's room, so it takes eight such ports to hold up the node's others.
const IN_FLIGHT_PER_PORT_MAX: usize = 16_384;
/// How far into a port's line a receipt for a packet not in flight is looked for: what earlier
/// instances can have delivered before this one replayed (their in-flight limit), twice over.
const REQUEUED_WINDOW: usize = 2 * IN_FLIGHT_PER_PORT_MAX;
/// Sending processes remembered as waiting for acks (most recent first to go when full).
const ACK_EPOCHS_MAX: usize = 4096;
/// Most acks in one fabric frame (a frame's bytes are bounded).
const ACKS_PER_FRAME_MAX: usize = 16_384;
/// Inbox files a fabric node's newly bound port takes back from the volume in one go.
const RECLAIM_FILES_MAX: usize = 4096;
/// Window over which status computes rates.
const RATE_WINDOW: Duration = Duration::from_secs(10);

/// Settings of `ftss-server run`.
#[derive(Clone, Debug)]
pub struct Config {
    pub volume: PathBuf,
    pub queue_dirs: Vec<PathBuf>,
    pub poll: Duration,
    pub redeliver_after: Duration,
    /// Keep receipted packets this long (zero: delete on receipt).
    pub retain: Duration,
    /// Hold packets for unknown destinations this long, then dead-letter them.
    pub hold: Duration,
    /// The queue's bounds: packets and stored bytes, per destination and in all. Senders whose
    /// packets would go past them are pushed back.
    pub limits: Limits,
    /// Addresses of the fabric: unknown ones are held; addresses outside go out through the gateway.
    pub fabric: Vec<Cidr>,
    /// External UDP ports whose datagrams are delivered to a node's port.
    pub ingress: Vec<IngressRule>,
    /// Where fabric nodes connect (none: the fabric transport is off).
    pub fabric_listen: Vec<fsbridge::fabric::Endpoint>,
    /// Directory of the fabric nodes' keys (`NODE.key`).
    pub fabric_keys: PathBuf,
    /// Which share of the nodes this server serves (scale-out); one partition of one by default.
    pub partition: Partition,
    /// Remove an unsealed outbox log segment read to its end and unchanged this long.
    pub log_abandon_after: Duration,
}

/// A share of the nodes: those whose name hashes to `index` of `count` partitions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Partition {
    pub index: u32,
    pub count: u32,
}

impl Default for Partition {
    fn default() -> Partition {
        Partition { index: 0, count: 1 }
    }
}

/// The origin node name of packets that came in from the external network.
pub const GATEWAY_ORIGIN: &str = "ftss-gateway";

/// The origin of packets that come in through this partition's gateway: partition 0 (or a lone
/// server) uses the plain name, others add their index so that receipts find their way back.
fn gateway_origin(index: u32) -> NodeName {
    let name = if index == 0 { GATEWAY_ORIGIN.to_owned() } else { format!("{GATEWAY_ORIGIN}-p{index}") };
    NodeName::new(&name).expect("a valid node name")
}

/// Packets to deliver this cycle, per destination (node, port), in store order.
type Due = BTreeMap<(NodeName, u16), Vec<(Key, Entry)>>;

/// Errors that stop the server at start. Once running, errors are retried, never fatal.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("queue: {0}")]
    Queue(#[from] QueueError),
    #[error("volume: {0}")]
    Volume(#[from] fsbridge::SpoolError),
    #[error("gateway: {0}")]
    Gateway(#[from] std::io::Error),
    #[error("fabric: {0}")]
    Fabric(std::io::Error),
}

/// Counters, as shown by `ftss-server status`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Counters {
    pub drained_files: u64,
    pub drained_log_frames: u64,
    pub drained: u64,
    pub stored: u64,
    pub duplicates: u64,
    pub acked: u64,
    pub delivered: u64,
    pub redelivered: u64,
    pub receipted: u64,
    pub dead_lettered: u64,
    pub quarantined: u64,
    pub syncs: u64,
    pub read_repairs: u64,
    pub backpressure_events: u64,
    pub errors: u64,
}

/// A dead letter, for status.
#[derive(Clone, Debug, Serialize)]
pub struct DeadLetter {
    pub id: String,
    pub destination: String,
    pub reason: String,
    pub at_unix_ms: u64,
}

/// Why the server is not draining everything right now.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Backpressure {
    pub active: bool,
    pub reasons: Vec<String>,
}

/// The server's state and its I/O.
pub struct Server {
    config: Config,
    volume: Volume,
    queue: Queue,
    index: Index,
    /// Which segments hold something live, for reclaiming.
    book: Book,
    nodes: Vec<NodeName>,
    addr_to_node: HashMap<Ipv4Addr, NodeName>,
    node_to_addr: HashMap<NodeName, Ipv4Addr>,
    /// The steps failing for one node, with why (shown in status until they work again).
    node_errors: HashMap<NodeName, BTreeMap<NodeStep, String>>,
    /// Registered nodes refused for claiming another node's address: neither drained nor served.
    refused: HashSet<NodeName>,
    /// Asked after every group commit, before anything is acked or removed: may this instance still
    /// act? (With `--ha`: does it still hold the lease?) Once it says no, the server stops.
    gate: Option<Box<dyn FnMut() -> bool>>,
    deposed: bool,
    /// Outbox names listed but not yet drained, per node, in name order.
    outbox_backlog: HashMap<NodeName, VecDeque<String>>,
    /// Acks to write at the end of the cycle, per source node.
    pending_acks: BTreeMap<NodeName, Vec<Ack>>,
    /// Each node's doorbell, open for appending (at most `BELLS_OPEN_MAX`).
    bells: HashMap<NodeName, BellWriter>,
    /// Inbox and ack files published this cycle, announced in their node's bell at its end.
    pending_rings: BTreeMap<NodeName, Vec<Ring>>,
    /// Gateway arrivals of a cycle whose sync failed, staged again next cycle (no new arrivals are
    /// read meanwhile: they wait in the socket, so this holds at most one cycle's worth).
    arrivals_kept: Vec<Packet>,
    registry_loaded_at: Option<Instant>,
    status_written_at: Option<Instant>,
    resync_checked_at: Instant,
    housekept_at: Option<Instant>,
    counters: Counters,
    samples: VecDeque<(Instant, u64, u64, u64)>,
    dead_letters: VecDeque<DeadLetter>,
    backpressure: Backpressure,
    last_error: Option<String>,
    recovery: RecoveryReport,
    epoch: u64,
    batch_seq: u64,
    started_unix_ms: u64,
    gateway: Gateway,
    gateway_origin: NodeName,
    /// Every partition's gateway origin, and its partition: a receipt for a packet that came in
    /// through a gateway goes to the partition that holds it.
    gateway_partitions: HashMap<NodeName, u32>,
    sync_seconds: Histogram,
    metrics: Option<Snapshot>,
    /// Set when running as one of several instances (`--ha`).
    active: Option<Active>,
    /// Sequence of packets that came in through the gateway (ids: gateway origin, this epoch).
    gateway_seq: u64,
    /// The fabric listener, with `--fabric-listen`.
    fabric: Option<Hub>,
    /// Sending processes (node, epoch) that asked for acks, and the order they were seen in.
    ack_epochs: HashSet<(NodeName, u64)>,
    ack_epoch_order: VecDeque<(NodeName, u64)>,
    /// Which fabric connection is drained first this cycle (turns rotate).
    fabric_turn: usize,
    /// Nodes' outbox logs: committed read positions and open segments.
    logs: Logs,
    /// Inbox files written per (node, port), oldest first, until seen claimed.
    inbox_files: HashMap<(NodeName, u16), VecDeque<u64>>,
}

/// What a cycle's drain has taken so far, against its bounds.
/// What the server does per node, for errors that concern one node only.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum NodeStep {
    Register,
    Drain,
    Receipts,
}

impl NodeStep {
    fn describe(self) -> &'static str {
        match self {
            NodeStep::Register => "registering",
            NodeStep::Drain => "reading its outbox",
            NodeStep::Receipts => "reading its receipts",
        }
    }
}

/// One delivery batch: `taken` of the keys offered are dealt with (`good` are in `bytes`, the
/// rest were dead-lettered as damaged).
struct Encoded {
    bytes: Vec<u8>,
    taken: usize,
    file_seq: u64,
    good: Vec<(Key, Entry)>,
}

/// Packets staged in the queue by one cycle, waiting for its sync.
struct DrainGroup {
    arrived: Vec<Packet>,
    drained: Vec<Drained>,
    from_fabric: Vec<FabricDrained>,
    /// Per packet, in the order of [`DrainGroup::packets`]: where it was appended (`None`: a
    /// duplicate of a stored one).
    locations: Vec<Option<Location>>,
    stored_unix_us: u64,
}

impl DrainGroup {
    /// Every packet of the group: gateway arrivals, outbox files, fabric frames.
    fn packets(&self) -> impl Iterator<Item = &Packet> {
        self.arrived
            .iter()
            .chain(self.drained.iter().flat_map(|batch| &batch.packets))
            .chain(self.from_fabric.iter().flat_map(|taken| &taken.packets))
    }
}

/// Receipts staged in the queue by one cycle, waiting for its sync.
struct ReceiptGroup {
    /// Every file read, removed once its receipts are durable here or forwarded.
    files: Vec<(fsbridge::Spool, String)>,
    /// Packets of this partition receipted by their destination (a done record is appended).
    done: Vec<PacketId>,
    /// Receipts for packets other partitions hold.
    forward: BTreeMap<(u32, NodeName), Vec<PacketId>>,
    /// Of `done`, the packets that were not in flight (queued again by a replay), per destination.
    requeued: Vec<(Ipv4Addr, HashSet<Key>)>,
    fabric_frames: usize,
    at_unix_us: u64,
}

/// Packets taken from one fabric connection this cycle.
struct FabricDrained {
    conn: Arc<Conn>,
    packets: Vec<Packet>,
}

/// One outbox file, or one frame of an outbox log, that was read and decoded this cycle.
struct Drained {
    node: NodeName,
    source: Source,
    packets: Vec<Packet>,
    /// The sender waits for acks (the batch has `FLAG_WANTS_ACKS`).
    wants_acks: bool,
}

/// Where drained packets came from.
enum Source {
    /// A batch file in `out/new/`, removed once its packets are durable.
    File(String),
    /// Frames of an outbox log segment up to `end`; with `sealed` the segment ends there and is
    /// removed once they are durable.
    Log { name: String, end: u64, sealed: bool },
}

fn now_us() -> u64 {
    fsbridge::unix_now_us()
}

fn id_text(id: &PacketId) -> String {
    format!("{}/{:016x}/{}", id.origin, id.epoch, id.seq)
}

impl Server {
    /// Opens the queue (recovering it) and the volume.
    pub fn open(config: Config) -> Result<Server, ServerError> {
        let volume = Volume::new(&config.volume);
        volume.create()?;
        let (queue, recovered, recovery) = Queue::open(&config.queue_dirs)?;
        let gateway = Gateway::open(&config.ingress)?;
        let book = Book::new(config.retain);
        let config_partition = config.partition;
        let fabric = if config.fabric_listen.is_empty() {
            None
        } else {
            Some(Hub::open(&config.fabric_listen, config.fabric_keys.clone()).map_err(ServerError::Fabric)?)
        };
        let mut server = Server {
            config,
            volume,
            queue,
            index: Index::default(),
            book,
            nodes: Vec::new(),
            addr_to_node: HashMap::new(),
            node_to_addr: HashMap::new(),
            node_errors: HashMap::new(),
            refused: HashSet::new(),
            gate: None,
            deposed: false,
            outbox_backlog: HashMap::new(),
            pending_acks: BTreeMap::new(),
            bells: HashMap::new(),
            pending_rings: BTreeMap::new(),
            arrivals_kept: Vec::new(),
            registry_loaded_at: None,
            status_written_at: None,
            resync_checked_at: Instant::now(),
            housekept_at: None,
            counters: Counters::default(),
            samples: VecDeque::new(),
            dead_letters: VecDeque::new(),
            backpressure: Backpressure::default(),
            last_error: None,
            recovery,
            epoch: fsbridge::random_u64(),
            batch_seq: 0,
            started_unix_ms: now_us() / 1000,
            gateway,
            gateway_origin: gateway_origin(config_partition.index),
            gateway_partitions: (0..config_partition.count.max(1))
                .map(|index| (gateway_origin(index), index))
                .collect(),
            sync_seconds: Histogram::default(),
            metrics: None,
            active: None,
            gateway_seq: 0,
            fabric,
            fabric_turn: 0,
            ack_epochs: HashSet::new(),
            ack_epoch_order: VecDeque::new(),
            logs: Logs::default(),
            inbox_files: HashMap::new(),
        };
        server.replay(recovered);
        // Stretches of the queue recovery found damaged (now skipped) are kept for the operator.
        let queue_origin = NodeName::new("queue").expect("valid name");
        for damage in std::mem::take(&mut server.recovery.damaged) {
            eprintln!("ftss-server: {}", damage.reason);
            let name = format!("queue-{}-{}", damage.segment, damage.offset);
            server.quarantine_bytes(&queue_origin, &name, &damage.bytes, &damage.reason);
        }
        Ok(server)
    }

    /// Rebuilds the index from the recovered log: packets without a `done` record are queued;
    /// receipted or sent ones still inside `--retain` keep their segment alive.
    fn replay(&mut self, recovered: Vec<crate::queue::Recovered>) {
        let (index, logs) = (&mut self.index, &mut self.logs);
        self.book.replay(&recovered, now_us(), |replayed| match replayed {
            Replayed::Queued { packet, location, stored_unix_us } => {
                index.insert(&packet.id, entry(packet, location, stored_unix_us))
            }
            Replayed::Done { id } => {
                index.note_done(id);
                true
            }
            Replayed::Cursor { node, log, offset } => {
                logs.recover(node.clone(), log.to_string(), offset);
                true
            }
        });
    }

    pub fn recovery(&self) -> &RecoveryReport {
        &self.recovery
    }

    fn insert(&mut self, packet: &Packet, location: Location, stored_unix_us: u64) {
        if self.index.insert(&packet.id, entry(packet, location, stored_unix_us)) {
            self.book.stored(location.segment);
        }
    }

    /// The packet is receipted or dead-lettered: it leaves the queue (its bytes may be retained).
    /// `destination` finds packets that were never delivered (dead letters, egress).
    fn finish(&mut self, id: &PacketId, outcome: Outcome, at_unix_us: u64, destination: Option<SocketAddrV4>) {
        if let Some(entry) = self.index.remove(id, destination) {
            self.finished(entry, outcome, at_unix_us);
        }
    }

    /// A packet removed from the index: its bytes are retained or its segment released.
    fn finished(&mut self, entry: Entry, outcome: Outcome, at_unix_us: u64) {
        self.book.finished(entry.location.segment, outcome, at_unix_us);
    }

    /// Sets the gate asked after every group commit (see the field).
    pub fn set_gate(&mut self, gate: impl FnMut() -> bool + 'static) {
        self.gate = Some(Box::new(gate));
    }

    /// Did the gate say this instance may no longer act?
    pub fn deposed(&self) -> bool {
        self.deposed
    }

    /// Asks the gate; false (for good) once it said no.
    fn may_act(&mut self) -> bool {
        if !self.deposed
            && let Some(gate) = self.gate.as_mut()
            && !gate()
        {
            eprintln!("ftss-server: no longer the active instance: nothing more is acked or removed");
            self.deposed = true;
        }
        !self.deposed
    }

    /// Runs cycles until `stop` returns true or the gate deposes this instance.
    pub fn run(&mut self, stop: impl Fn() -> bool) {
        while !stop() && !self.deposed {
            let busy = self.cycle();
            if !busy {
                self.wait_for_work();
            }
        }
        self.write_status(true);
    }

    /// Called once when this instance won the lease: fences the queue at its epoch and records who
    /// is active for status.
    pub fn take_over(&mut self, instance: &str, epoch: u64) -> Result<(), QueueError> {
        self.queue.fence(epoch)?;
        self.active = Some(Active { instance: instance.to_owned(), lease_epoch: epoch });
        Ok(())
    }

    /// One group commit (if anything was appended since the last), counted and timed for the
    /// status and the metrics. Every sync of the queue goes through here.
    fn sync_queue(&mut self) -> Result<(), QueueError> {
        if !self.queue.has_pending() {
            return Ok(());
        }
        let started = Instant::now();
        let result = self.queue.sync();
        if result.is_ok() {
            self.counters.syncs += 1;
            self.sync_seconds.observe(started.elapsed().as_secs_f64());
        }
        result
    }

    /// Renders metrics into `snapshot` at every status interval from now on.
    pub fn export_metrics(&mut self, snapshot: Snapshot) {
        self.metrics = Some(snapshot);
    }

    /// Sleeps for the poll interval, or less if a datagram arrives at the gateway.
    fn wait_for_work(&self) {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        let fabric = self.fabric.as_ref().map(Hub::wake_fd);
        let mut fds: Vec<PollFd> =
            self.gateway.fds().into_iter().chain(fabric).map(|fd| PollFd::new(fd, PollFlags::POLLIN)).collect();
        let timeout = PollTimeout::try_from(self.config.poll.min(Duration::from_secs(60))).unwrap_or(PollTimeout::MAX);
        // EINTR (a stop signal) or anything else: the caller's loop looks again.
        let _ = poll(&mut fds, timeout);
    }

    /// Is this an address outside the fabric that no node registered (sent through the gateway)?
    fn is_external(&self, addr: &Ipv4Addr) -> bool {
        !self.addr_to_node.contains_key(addr) && !self.config.fabric.iter().any(|cidr| cidr.contains(addr))
    }

    /// Turns gateway arrivals into packets for their fabric destination.
    fn arrivals_to_packets(&mut self, arrivals: Vec<Arrival>) -> Vec<Packet> {
        let mut packets = Vec::new();
        for arrival in arrivals {
            let destination = match arrival.target {
                Target::Address(addr) => addr,
                Target::Node(node, port) => match self.node_to_addr.get(&node) {
                    Some(addr) => SocketAddrV4::new(*addr, port),
                    None => {
                        self.gateway.counters.ingress_unroutable += 1;
                        continue;
                    }
                },
            };
            self.gateway_seq += 1;
            let id = PacketId { origin: self.gateway_origin.clone(), epoch: self.epoch, seq: self.gateway_seq };
            packets.push(Packet {
                id,
                source: arrival.source,
                destination,
                sent_unix_us: now_us(),
                payload: arrival.payload,
            });
        }
        packets
    }

    /// Logs an operating error (once per distinct message in a row) and counts it.
    fn report(&mut self, step: &str, error: impl std::fmt::Display) {
        let message = format!("{step}: {error}");
        if self.last_error.as_deref() != Some(message.as_str()) {
            eprintln!("ftss-server: {message}");
        }
        self.counters.errors += 1;
        self.last_error = Some(message);
    }

    /// One pass over every step. Returns whether anything was done.
    pub fn cycle(&mut self) -> bool {
        if self.deposed {
            return false;
        }
        let mut work = 0;
        if let Err(error) = self.refresh_registry() {
            self.report("reading the node registry", error);
        }
        self.backpressure = Backpressure::default();
        if self.fabric.is_some() {
            work += self.tend_fabric();
        }
        work += self.store();
        // "stored" acks are announced before the cycle spends time delivering.
        self.ring_bells();
        match self.deliver() {
            Ok(count) => work += count,
            Err(error) => self.report("delivering", error),
        }
        self.dead_letter_expired();
        if !self.may_act() {
            return false;
        }
        self.flush_acks();
        self.ring_bells();
        self.reclaim();
        if self.resync_checked_at.elapsed() >= RESYNC_INTERVAL {
            self.resync_checked_at = Instant::now();
            if self.queue.degraded() {
                self.queue.resync_failed();
            }
        }
        if self.status_written_at.is_none_or(|at| at.elapsed() >= STATUS_INTERVAL) {
            self.housekeeping();
            self.write_status(false);
        }
        work > 0
    }

    /// Drains new packets and takes receipts with one group commit for both: every record of the
    /// cycle is appended, then one sync, and only then are packets acked and receipted ones
    /// released. Returns how much was done.
    fn store(&mut self) -> usize {
        let drain = self.stage_drain().unwrap_or_else(|error| {
            self.report("draining", error);
            None
        });
        let receipts = self.stage_receipts().unwrap_or_else(|error| {
            self.report("taking receipts", error);
            None
        });
        let appended = drain.is_some() || receipts.as_ref().is_some_and(|group| !group.done.is_empty());
        if appended {
            let synced = self.sync_queue();
            if let Err(error) = &synced {
                self.push_back(format!("queue: {error}"));
            }
            // A deposed instance (paused past its term, say) acks nothing and removes nothing:
            // what it appended after its successor fenced the queue is cut at the next recovery.
            if synced.is_err() || !self.may_act() {
                if let Some(group) = drain {
                    self.abort_drain(group);
                }
                return 0;
            }
        }
        let mut work = 0;
        if let Some(group) = receipts {
            match self.complete_receipts(group) {
                Ok(count) => work += count,
                Err(error) => self.report("taking receipts", error),
            }
        }
        if let Some(group) = drain {
            match self.complete_drain(group) {
                Ok(count) => work += count,
                Err(error) => self.report("draining", error),
            }
        }
        work
    }

    fn refresh_registry(&mut self) -> Result<(), fsbridge::SpoolError> {
        if self.registry_loaded_at.is_some_and(|at| at.elapsed() < REGISTRY_REFRESH) {
            return Ok(());
        }
        self.registry_loaded_at = Some(Instant::now());
        let (nodes, invalid) = self.volume.list_nodes()?;
        for name in invalid {
            let path = self.volume.nodes_dir().join(&name);
            self.quarantine_path(path, "volume", "node directory name is not a valid node name");
        }
        // Each address belongs to one node: the one that holds it keeps it, otherwise the earliest
        // registration (then the name) wins; a later claimant is refused until it changes address.
        let previous = std::mem::take(&mut self.addr_to_node);
        self.node_to_addr.clear();
        let mut claims = Vec::new();
        for node in &nodes {
            match self.volume.node_config(node) {
                Ok(Some(config)) => {
                    let holds = previous.get(&config.addr) == Some(node);
                    let registered = std::fs::metadata(self.volume.node_dir(node).join("node.toml"))
                        .and_then(|meta| meta.modified())
                        .unwrap_or(std::time::SystemTime::UNIX_EPOCH);
                    claims.push((!holds, registered, node.clone(), config.addr));
                }
                Ok(None) => {}
                Err(reason) => eprintln!("ftss-server: ignoring registration of {node}: {reason}"),
            }
        }
        claims.sort();
        self.refused.clear();
        for (_, _, node, addr) in claims {
            match self.addr_to_node.get(&addr).cloned() {
                Some(holder) => {
                    let reason = format!("its address {addr} is node {holder}'s: registration refused");
                    self.node_failed(&node, NodeStep::Register, reason);
                    self.refused.insert(node);
                }
                None => {
                    self.node_recovered(&node, NodeStep::Register);
                    self.addr_to_node.insert(addr, node.clone());
                    self.node_to_addr.insert(node, addr);
                }
            }
        }
        self.nodes = nodes;
        Ok(())
    }

    /// Moves `path` into quarantine with `reason`; returns whether it was moved.
    fn quarantine_path(&mut self, path: PathBuf, origin: &str, reason: &str) -> bool {
        match self.volume.quarantine(&path, origin, reason) {
            Ok(target) => {
                self.counters.quarantined += 1;
                eprintln!("ftss-server: quarantined {} as {}: {reason}", path.display(), target.display());
                true
            }
            Err(error) => {
                self.report("quarantining", format!("{}: {error} (reason was: {reason})", path.display()));
                false
            }
        }
    }

    /// Reads outbox files, fabric frames and gateway arrivals and appends their packets to the
    /// queue (not synced: the cycle syncs once for everything it staged). `None` if there was none.
    fn stage_drain(&mut self) -> Result<Option<DrainGroup>, fsbridge::SpoolError> {
        // A queue disk down to its reserve takes no new packets: the space left is for the done
        // records that let full segments go (else a disk filled by packets could never drain).
        // The reserve grows with the queue: every queued packet's done record must fit. Above
        // it, a cycle takes no more than the room left: at most half of it in payload, and
        // packets whose records and later done records fit in the other half.
        let done_records = self.index.len() as u64 * DONE_RECORD_BYTES;
        let room = self.queue.space().map(|(free, base)| free.saturating_sub(base + done_records));
        let (packets_max, bytes_max) = match room {
            Some(room) => (
                DRAIN_PACKETS_PER_CYCLE_MAX.min((room / 2 / PACKET_SPACE_BYTES) as usize),
                DRAIN_BYTES_PER_CYCLE_MAX.min((room / 2) as usize),
            ),
            None => (DRAIN_PACKETS_PER_CYCLE_MAX, DRAIN_BYTES_PER_CYCLE_MAX),
        };
        let mut budget = Budget::new(self.config.limits, packets_max, bytes_max);
        if packets_max == 0 {
            let reason = "queue disk nearly full: the space left is kept for receipts".to_string();
            self.push_back(reason.clone());
            budget.close(reason);
        }
        let drained = self.read_outboxes(&mut budget);
        let from_fabric = self.read_fabric(&mut budget);
        let arrived = match self.arrivals_kept.is_empty() {
            true => {
                let arrivals = self.gateway.receive();
                self.arrivals_to_packets(arrivals)
            }
            false => std::mem::take(&mut self.arrivals_kept),
        };
        // Datagrams from outside come best effort: past the queue's bounds they are dropped (and
        // counted), as an interface drops when its queue is full.
        let mut admitted = Vec::with_capacity(arrived.len());
        for packet in arrived {
            if budget.is_closed() {
                // The queue disk, not a limit: kept (one cycle's read at most) until there is room.
                self.arrivals_kept.push(packet);
                continue;
            }
            let batch = std::slice::from_ref(&packet);
            if self.refusal(batch, &budget).is_some() {
                self.gateway.counters.dropped_over_limit += 1;
                continue;
            }
            budget.take(batch);
            admitted.push(packet);
        }
        let arrived = admitted;
        if drained.is_empty() && arrived.is_empty() && from_fabric.is_empty() {
            return Ok(None);
        }
        let mut group = DrainGroup { arrived, drained, from_fabric, locations: Vec::new(), stored_unix_us: now_us() };
        let mut locations = Vec::new();
        for packet in group.packets() {
            if self.index.seen(&packet.id) {
                // Drained before a crash that came before the outbox file was removed, or sent
                // again over a fabric connection that broke before its ack.
                locations.push(None);
                continue;
            }
            let record = QueueRecord::Stored { stored_unix_us: group.stored_unix_us, packet: packet.clone() };
            locations.push(Some(self.queue.append(&record)));
        }
        group.locations = locations;
        // Log read positions commit with the packets read (frames are in order, so the last
        // drained frame of a segment has its furthest end).
        let mut cursors: BTreeMap<(&NodeName, &str), u64> = BTreeMap::new();
        for batch in &group.drained {
            if let Source::Log { name, end, .. } = &batch.source {
                cursors.insert((&batch.node, name), *end);
            }
        }
        for ((node, log), offset) in cursors {
            self.queue.append(&QueueRecord::Cursor { node: node.clone(), log: log.to_owned(), offset });
        }
        Ok(Some(group))
    }

    /// The cycle's sync failed: nothing of the group is durable. No ack; the outbox files stay and
    /// are listed again (in order) next cycle; fabric frames go back in front of their
    /// connections' queues, in order; gateway arrivals are kept for the next cycle.
    fn abort_drain(&mut self, group: DrainGroup) {
        self.outbox_backlog.clear();
        // In order: the group's arrivals, then any this cycle kept back.
        let kept = std::mem::replace(&mut self.arrivals_kept, group.arrived);
        self.arrivals_kept.extend(kept);
        for taken in group.from_fabric.into_iter().rev() {
            taken.conn.unpop(taken.packets);
        }
    }

    /// The group is durable: index its packets, ack them, remove the outbox files.
    fn complete_drain(&mut self, group: DrainGroup) -> Result<usize, fsbridge::SpoolError> {
        let total = group.packets().count();
        let fresh = group.locations.iter().flatten().count();
        self.counters.drained += (total - group.arrived.len()) as u64;
        self.counters.duplicates += (total - fresh) as u64;
        self.counters.stored += fresh as u64;
        let stored_unix_us = group.stored_unix_us;
        for (packet, location) in group.packets().zip(&group.locations) {
            if let Some(location) = location {
                self.insert(packet, *location, stored_unix_us);
            }
        }
        self.ack_fabric(&group.from_fabric);
        // Log cursors first: they are durable already, and an error removing outbox files below
        // must not leave the in-memory cursors behind the queue's.
        for batch in &group.drained {
            match &batch.source {
                Source::File(_) => self.counters.drained_files += 1,
                Source::Log { name, end, sealed } => {
                    self.counters.drained_log_frames += 1;
                    let key = (batch.node.clone(), name.clone());
                    if *sealed {
                        self.finish_log(&key);
                    } else {
                        self.logs.commit(key, *end);
                    }
                }
            }
        }
        self.ack_and_remove(&group.drained)?;
        let work = group.drained.len() + group.arrived.len() + group.from_fabric.len();
        if total >= TRIM_AFTER_PACKETS {
            // A big group leaves megabytes of freed buffers (decoded packets, the queue's write
            // buffer) that malloc keeps; give them back so the resident size is the index.
            drop(group);
            // SAFETY: malloc_trim has no preconditions.
            unsafe { libc::malloc_trim(0) };
        }
        Ok(work)
    }

    /// Takes packet frames from the fabric connections within what is left of this cycle's bounds
    /// after `drained`; a frame for a destination over its byte limit stays first in its
    /// connection's line (and the connection's reader stops when its queue is full). Receipts are
    /// queued apart and taken by `stage_receipts`, so they never wait behind such a frame.
    fn read_fabric(&mut self, budget: &mut Budget) -> Vec<FabricDrained> {
        let Some(hub) = &self.fabric else { return Vec::new() };
        let mut taken = Vec::new();
        let mut full_reasons = Vec::new();
        // A different connection goes first each cycle, so that none starves the others.
        let mut connections = hub.connections();
        if !connections.is_empty() {
            self.fabric_turn = (self.fabric_turn + 1) % connections.len();
            connections.rotate_left(self.fabric_turn);
        }
        for conn in connections {
            while !budget.cycle_full() {
                let Some(packets) = conn.pop() else { break };
                if let Some(reason) = self.refusal(&packets, budget) {
                    full_reasons.push(reason);
                    conn.unpop(packets);
                    break;
                }
                budget.take(&packets);
                taken.push(FabricDrained { conn: conn.clone(), packets });
            }
        }
        let received: usize = taken.iter().map(|taken| taken.packets.len()).sum();
        if let Some(hub) = &self.fabric {
            hub.count(|counters| counters.packets_received += received as u64);
        }
        for reason in full_reasons {
            self.push_back(reason);
        }
        taken
    }

    /// Acks packets taken from fabric connections (now durable) over the connection they came on.
    /// A connection that closed meanwhile gets nothing: its node sends them again and they are
    /// acked as duplicates.
    fn ack_fabric(&mut self, from_fabric: &[FabricDrained]) {
        for taken in from_fabric {
            let acks: Vec<Ack> = taken.packets.iter().map(|packet| self.stored_ack(packet)).collect();
            self.send_acks(&taken.conn, &acks);
        }
    }

    /// The ack for a packet now durable in the queue: stored, or accepted (best effort) for an
    /// address outside the fabric.
    fn stored_ack(&self, packet: &Packet) -> Ack {
        let state =
            if self.is_external(packet.destination.ip()) { AckState::AcceptedBestEffort } else { AckState::Stored };
        Ack { id: packet.id.clone(), state, reason: String::new() }
    }

    /// Sends acks over a fabric connection, in frames of bounded size.
    fn send_acks(&mut self, conn: &Conn, acks: &[Ack]) {
        for chunk in acks.chunks(ACKS_PER_FRAME_MAX) {
            let mut encoder = self.encoder(BatchKind::Acks);
            for ack in chunk {
                encoder.push(&Record::Ack(ack.clone()));
            }
            if !conn.send(&fsbridge::fabric::Frame::Acks(encoder.finish())) {
                return;
            }
            self.counters.acked += chunk.len() as u64;
        }
    }

    /// Fabric bookkeeping at the start of a cycle: admit authenticated nodes, take their port
    /// announcements (a newly bound port takes back what waits for it in the volume inbox), and
    /// forget closed connections. Returns how much was done.
    fn tend_fabric(&mut self) -> usize {
        let Some(hub) = &self.fabric else { return 0 };
        hub.clear_wake();
        let pending = hub.pending();
        let connections = hub.connections();
        let gone = hub.reap();
        let mut work = pending.len() + gone.len();
        for conn in pending {
            self.admit(&conn);
        }
        for conn in connections {
            let Some(ports) = conn.take_announcement() else { continue };
            let mut ports: Vec<u16> = ports;
            ports.sort_unstable();
            ports.dedup();
            let known: Vec<u16> = ports.iter().copied().filter(|port| conn.has_port(*port)).collect();
            conn.set_ports(ports.clone());
            for port in ports.into_iter().filter(|port| !known.contains(port)) {
                work += 1;
                self.reclaim_inbox(&conn.node, port);
            }
        }
        for (conn, reason) in gone {
            eprintln!("ftss-server: fabric: node {} at {} disconnected: {reason}", conn.node, conn.peer);
        }
        work
    }

    /// Lets an authenticated node in unless its address belongs to another node (or the node is
    /// connected with another address); registers it on the volume like a volume node's shim would.
    fn admit(&mut self, conn: &Conn) {
        if let Some(owner) = self.addr_to_node.get(&conn.addr)
            && *owner != conn.node
        {
            return conn.refuse(format!("address {} is registered to node {owner}", conn.addr));
        }
        let live_elsewhere = self.fabric.as_ref().is_some_and(|hub| {
            hub.connections()
                .iter()
                .any(|other| other.node == conn.node && other.addr != conn.addr && !other.is_closed())
        });
        if live_elsewhere {
            return conn.refuse(format!("node {} is connected with another address", conn.node));
        }
        let config = fsbridge::NodeConfig { addr: conn.addr };
        if let Err(error) = self.volume.register_node(&conn.node, &config) {
            self.report("registering a fabric node", &error);
            return conn.refuse(format!("the server cannot register the node: {error}"));
        }
        if let Some(old) = self.node_to_addr.insert(conn.node.clone(), conn.addr) {
            self.addr_to_node.remove(&old);
        }
        self.addr_to_node.insert(conn.addr, conn.node.clone());
        if !self.nodes.contains(&conn.node) {
            self.nodes.push(conn.node.clone());
            self.nodes.sort();
        }
        conn.admit();
    }

    /// A fabric process bound `port` of `node`: packets the server put in that port's volume inbox
    /// (while no connection had the port) are taken back, by the same claiming rename a receiving
    /// shim uses, and become due for delivery over the connection at once.
    fn reclaim_inbox(&mut self, node: &NodeName, port: u16) {
        let inbox = self.volume.inbox(node, port);
        let Ok(names) = inbox.list(RECLAIM_FILES_MAX) else { return };
        let now = monotonic_now();
        let mut keys = Vec::new();
        for name in names {
            let claimed = inbox.tmp_dir().join(format!("{name}.claimed-server-{}", std::process::id()));
            if std::fs::rename(inbox.new_dir().join(&name), &claimed).is_err() {
                continue; // a receiving shim took it first
            }
            let batch = fsbridge::spool::read_regular_file(&claimed)
                .map_err(|error| error.to_string())
                .and_then(|bytes| bytes.ok_or_else(|| "gone".to_owned()))
                .and_then(|bytes| fsbridge::format::decode_batch(&bytes).map_err(|error| error.to_string()));
            match batch {
                Ok(batch) => {
                    for record in batch.records {
                        if let Record::Packet(packet) = record
                            && let Some(key) = self.index.key(&packet.id)
                        {
                            keys.push(key);
                        }
                    }
                    if let Err(error) = fsbridge::spool::remove_file_idempotent(&claimed) {
                        self.report("reclaiming an inbox file", error);
                    }
                }
                Err(reason) => {
                    self.quarantine_path(claimed, node.as_str(), &reason);
                }
            }
        }
        // Each goes in front of the redelivery schedule: the last first, so they leave in order.
        for key in keys.into_iter().rev() {
            self.index.due_now(key, now, self.config.redeliver_after);
        }
    }

    /// The fabric connection packets for `node`'s `port` go over: the newest live one of that node
    /// with the port bound.
    fn fabric_route(&self, node: &NodeName, port: u16) -> Option<Arc<Conn>> {
        let hub = self.fabric.as_ref()?;
        hub.connections().into_iter().rev().find(|conn| conn.node == *node && !conn.is_closed() && conn.has_port(port))
    }

    fn push_back(&mut self, reason: String) {
        if !self.backpressure.reasons.contains(&reason) {
            if self.backpressure.reasons.is_empty() {
                self.counters.backpressure_events += 1;
            }
            self.backpressure.active = true;
            self.backpressure.reasons.push(reason);
        }
    }

    /// Reads and decodes up to the cycle's bound of outbox files and log frames, quarantining bad
    /// ones and leaving those whose destination is over its limit. A node whose spool cannot be
    /// read is reported and passed over: it holds up no other node.
    fn read_outboxes(&mut self, budget: &mut Budget) -> Vec<Drained> {
        let mut drained: Vec<Drained> = Vec::new();
        let owned: Vec<NodeName> = self.nodes.iter().filter(|node| self.owns(node)).cloned().collect();
        for node in owned {
            if !self.node_is_sound(&node) {
                continue;
            }
            let files = self.read_outbox_files(&node, &mut drained, budget);
            let logs = self.read_logs(&node, &mut drained, budget);
            match files.and(logs) {
                Ok(()) => self.node_recovered(&node, NodeStep::Drain),
                Err(error) => self.node_failed(&node, NodeStep::Drain, error),
            }
        }
        drained
    }

    /// Reads `node`'s outbox files, in name order, within the cycle's bounds.
    fn read_outbox_files(
        &mut self,
        node: &NodeName,
        drained: &mut Vec<Drained>,
        budget: &mut Budget,
    ) -> Result<(), fsbridge::SpoolError> {
        for attempt in 0..DRAIN_FILES_PER_NODE_MAX {
            if budget.cycle_full() {
                break;
            }
            // List the directory again only at the start of a cycle: files drained earlier in
            // this cycle are still there until the group is acked.
            let Some(name) = self.next_outbox_name(node, attempt == 0)? else { break };
            let Some((packets, wants_acks)) = self.read_outbox_file(node, &name) else {
                self.pop_outbox_name(node);
                continue;
            };
            if let Some(reason) = self.refusal(&packets, budget) {
                self.push_back(reason);
                // Files of one writer must stay in order: this one stays first in line.
                break;
            }
            self.pop_outbox_name(node);
            budget.take(&packets);
            drained.push(Drained { node: node.clone(), source: Source::File(name), packets, wants_acks });
        }
        Ok(())
    }

    /// A step failed for one node only (its spool cannot be listed or read): counted, shown in
    /// status, and logged once per new reason; other nodes go on.
    fn node_failed(&mut self, node: &NodeName, step: NodeStep, error: impl std::fmt::Display) {
        let message = format!("{}: {error}", step.describe());
        self.counters.errors += 1;
        let errors = self.node_errors.entry(node.clone()).or_default();
        if errors.get(&step) != Some(&message) {
            eprintln!("ftss-server: node {node}: {message}");
            errors.insert(step, message.clone());
        }
        self.last_error = Some(format!("node {node}: {message}"));
    }

    fn node_recovered(&mut self, node: &NodeName, step: NodeStep) {
        if let Some(errors) = self.node_errors.get_mut(node)
            && errors.remove(&step).is_some()
        {
            eprintln!("ftss-server: node {node}: {} works again", step.describe());
            if errors.is_empty() {
                self.node_errors.remove(node);
            }
        }
    }

    /// Reads frames of `node`'s outbox log segments within the cycle's bounds, in each writer's
    /// order, and deals with segment ends and damage.
    fn read_logs(
        &mut self,
        node: &NodeName,
        drained: &mut Vec<Drained>,
        budget: &mut Budget,
    ) -> Result<(), fsbridge::SpoolError> {
        let (segments, foreign) = self.logs.readable(&self.volume, node)?;
        let log_dir = self.volume.outbox(node).dir().join("log");
        for name in foreign {
            self.quarantine_path(log_dir.join(name), node.as_str(), "unexpected file name in an outbox log directory");
        }
        let node_addr = self.node_to_addr.get(node).copied();
        for (name, has_successor) in segments {
            if budget.cycle_full() {
                break;
            }
            let key = (node.clone(), name.clone());
            let room = budget.cycle_bytes_left().min(LOG_READ_BYTES_MAX);
            let step = match self.logs.step(&self.volume, &key, has_successor, room, self.config.log_abandon_after) {
                Ok(step) => step,
                Err(fsbridge::log::LogError::Invalid { path, reason }) => {
                    // Its cursor goes only with the file: if the move failed it is read again
                    // from where it stands.
                    if self.quarantine_path(path, node.as_str(), &reason) {
                        self.logs.forget(&key);
                    }
                    continue;
                }
                Err(fsbridge::log::LogError::Spool(error)) => {
                    self.report("reading an outbox log", error);
                    continue;
                }
            };
            match step {
                Step::Idle => {}
                Step::Finished => self.finish_log(&key),
                Step::Damaged { from, to, reason, bytes } => {
                    self.log_damaged(&key, from, to, &reason, &bytes, drained);
                }
                Step::Frames { frames, sealed } => self.log_frames(&key, node_addr, frames, sealed, drained, budget),
            }
        }
        Ok(())
    }

    /// Damage in log segment `key` from byte `from`: up to `to` (the next valid frame), its bytes
    /// are quarantined and reading goes on from there; to the end (`None`), the segment is moved
    /// aside whole.
    fn log_damaged(
        &mut self,
        key: &SegmentKey,
        from: u64,
        to: Option<u64>,
        reason: &str,
        bytes: &[u8],
        drained: &mut Vec<Drained>,
    ) {
        let (node, name) = key;
        let reason = format!("outbox log {name} at byte {from}: {reason}");
        match to {
            Some(to) => {
                self.quarantine_bytes(node, &format!("{name}-{from}"), bytes, &reason);
                drained.push(Drained {
                    node: node.clone(),
                    source: Source::Log { name: name.clone(), end: to, sealed: false },
                    packets: Vec::new(),
                    wants_acks: false,
                });
            }
            None => {
                let path = self.volume.outbox(node).dir().join("log").join(name);
                if self.quarantine_path(path, node.as_str(), &reason) {
                    self.logs.forget(key);
                }
            }
        }
    }

    /// Decodes the frames read from log segment `key` and takes their packets while the bounds
    /// allow (frames of one writer stay in order: the rest waits for room).
    fn log_frames(
        &mut self,
        key: &SegmentKey,
        node_addr: Option<Ipv4Addr>,
        frames: Vec<(u64, Vec<u8>)>,
        sealed: bool,
        drained: &mut Vec<Drained>,
        budget: &mut Budget,
    ) {
        let (node, name) = key;
        let count = frames.len();
        for (index, (end, batch)) in frames.into_iter().enumerate() {
            let (packets, wants_acks) = match decode_outbox_batch(&batch, node, node_addr) {
                Ok(decoded) => decoded,
                Err(reason) => {
                    let reason = format!("outbox log {name}, frame ending at byte {end}: {reason}");
                    self.quarantine_bytes(node, &format!("{name}-{end}"), &batch, &reason);
                    (Vec::new(), false)
                }
            };
            if let Some(reason) = self.refusal(&packets, budget) {
                self.push_back(reason);
                break;
            }
            budget.take(&packets);
            let sealed = sealed && index + 1 == count;
            drained.push(Drained {
                node: node.clone(),
                source: Source::Log { name: name.clone(), end, sealed },
                packets,
                wants_acks,
            });
        }
    }

    /// A log segment is read to its seal (or abandoned and read to its end): remove it.
    fn finish_log(&mut self, key: &(NodeName, String)) {
        let path = self.volume.outbox(&key.0).dir().join("log").join(&key.1);
        match fsbridge::spool::remove_file_idempotent(&path) {
            Ok(()) => self.logs.forget(key),
            Err(error) => self.report("removing a finished outbox log", error),
        }
    }

    /// Writes `bytes` (a damaged or undecodable part of an outbox log) into quarantine with a reason.
    fn quarantine_bytes(&mut self, node: &NodeName, name: &str, bytes: &[u8], reason: &str) {
        let dir = self.volume.quarantine_dir();
        let staged = dir.join(format!(".{name}.{}", fsbridge::random_u64()));
        let written = std::fs::create_dir_all(&dir)
            .map_err(|source| fsbridge::SpoolError::Io { operation: "creating", path: dir.clone(), source })
            .and_then(|()| fsbridge::spool::write_file_durably(&staged, bytes));
        match written {
            Ok(()) => {
                self.quarantine_path(staged, node.as_str(), reason);
            }
            Err(error) => self.report("quarantining", format!("{name}: {error} (reason was: {reason})")),
        }
    }

    /// Why `packets` may not be taken now (a destination, or the queue, at its bounds), if so.
    fn refusal(&self, packets: &[Packet], budget: &Budget) -> Option<String> {
        let queued = |ip: &Ipv4Addr| {
            let (packets, bytes) = self.index.queued(ip);
            Load::stored(packets, bytes)
        };
        budget.refuse(packets, queued, Load::stored(self.index.len() as u64, self.index.bytes()))
    }

    /// The next outbox file of `node` in name order. Names come from a bounded listing kept between
    /// cycles, so a flooded outbox costs one directory scan per `OUTBOX_BACKLOG_MAX` files.
    fn next_outbox_name(&mut self, node: &NodeName, may_list: bool) -> Result<Option<String>, fsbridge::SpoolError> {
        let empty = self.outbox_backlog.get(node).is_none_or(VecDeque::is_empty);
        if empty && may_list {
            let outbox = self.volume.outbox(node);
            let scan = outbox.scan(OUTBOX_BACKLOG_MAX, HIDDEN_FILES_PER_PASS_MAX)?;
            for name in scan.hidden {
                let path = outbox.new_dir().join(name);
                self.quarantine_path(path, node.as_str(), "hidden file in a spool (no ftss writer makes one)");
            }
            self.outbox_backlog.entry(node.clone()).or_default().extend(scan.names);
        }
        Ok(self.outbox_backlog.get(node).and_then(|backlog| backlog.front().cloned()))
    }

    fn pop_outbox_name(&mut self, node: &NodeName) {
        if let Some(backlog) = self.outbox_backlog.get_mut(node) {
            backlog.pop_front();
        }
    }

    /// Reads and decodes one outbox file; `None` if it is gone or was quarantined.
    fn read_outbox_file(&mut self, node: &NodeName, name: &str) -> Option<(Vec<Packet>, bool)> {
        let outbox = self.volume.outbox(node);
        let path = outbox.new_dir().join(name);
        if fsbridge::layout::parse_batch_file_name(name).is_none_or(|_| !name.ends_with(".pkt")) {
            self.quarantine_path(path, node.as_str(), "unexpected file name in an outbox (want <epoch>-<seq>.pkt)");
            return None;
        }
        let bytes = match outbox.read(name) {
            Ok(Some(bytes)) => bytes,
            Ok(None) => return None,
            Err(error) => {
                self.quarantine_path(path, node.as_str(), &error.to_string());
                return None;
            }
        };
        match decode_outbox_batch(&bytes, node, self.node_to_addr.get(node).copied()) {
            Ok(decoded) => Some(decoded),
            Err(reason) => {
                self.quarantine_path(path, node.as_str(), &reason);
                None
            }
        }
    }

    /// A node directory or one of its spools being a symlink would let one node's files be read as
    /// another's: such a node is skipped and the link quarantined.
    fn node_is_sound(&mut self, node: &NodeName) -> bool {
        let node_dir = self.volume.node_dir(node);
        let candidates = [
            node_dir.clone(),
            node_dir.join("out"),
            node_dir.join("out").join("log"),
            self.volume.outbox(node).new_dir(),
            node_dir.join("rcpt"),
            self.volume.receipts(node).new_dir(),
        ];
        for path in candidates {
            if path.symlink_metadata().is_ok_and(|meta| meta.file_type().is_symlink()) {
                self.quarantine_path(path, node.as_str(), "a symlink where a node directory belongs");
                return false;
            }
        }
        true
    }

    /// Writes the "stored" acks of each source node (a file per waiting process), then removes the outbox files.
    fn ack_and_remove(&mut self, drained: &[Drained]) -> Result<(), fsbridge::SpoolError> {
        let mut by_node: BTreeMap<&NodeName, Vec<&Drained>> = BTreeMap::new();
        for batch in drained {
            by_node.entry(&batch.node).or_default().push(batch);
        }
        for (node, batches) in by_node {
            // Only senders that wait for acks get ack files (a file per process and cycle).
            for batch in batches.iter().filter(|batch| batch.wants_acks) {
                if let Some(packet) = batch.packets.first() {
                    self.remember_ack_epoch(node, packet.id.epoch);
                }
            }
            let acks: Vec<Ack> = batches
                .iter()
                .filter(|batch| batch.wants_acks)
                .flat_map(|batch| &batch.packets)
                .map(|packet| self.stored_ack(packet))
                .collect();
            if !acks.is_empty() {
                self.publish_acks(node, &acks)?;
            }
            let outbox = self.volume.outbox(node);
            let files: Vec<&str> = batches
                .iter()
                .filter_map(|batch| match &batch.source {
                    Source::File(name) => Some(name.as_str()),
                    Source::Log { .. } => None,
                })
                .collect();
            for name in &files {
                outbox.remove_unsynced(name)?;
            }
            if !files.is_empty() {
                outbox.sync()?;
            }
        }
        Ok(())
    }

    /// Remembers that the process with this epoch on `node` waits for acks (later acks of its
    /// packets, delivered and receipted, are written for it too).
    fn remember_ack_epoch(&mut self, node: &NodeName, epoch: u64) {
        let key = (node.clone(), epoch);
        if self.ack_epochs.insert(key.clone()) {
            self.ack_epoch_order.push_back(key);
            if self.ack_epoch_order.len() > ACK_EPOCHS_MAX
                && let Some(oldest) = self.ack_epoch_order.pop_front()
            {
                self.ack_epochs.remove(&oldest);
            }
        }
    }

    /// Writes `acks` into the node's ack spool, one file per sending process: named after the
    /// process's epoch, so that the process lists only what is new and removes each file it has
    /// read (the directory stays as small as what is unread). Written without syncs: an ack only
    /// reports what the queue already holds durably; one lost in a crash of the array costs its
    /// sender a timeout, never the packet.
    fn publish_acks(&mut self, node: &NodeName, acks: &[Ack]) -> Result<(), fsbridge::SpoolError> {
        let mut by_epoch: BTreeMap<u64, Vec<&Ack>> = BTreeMap::new();
        for ack in acks {
            by_epoch.entry(ack.id.epoch).or_default().push(ack);
        }
        for (epoch, acks) in by_epoch {
            let mut encoder = self.encoder(BatchKind::Acks);
            for ack in &acks {
                encoder.push(&Record::Ack((*ack).clone()));
            }
            // The server's own epoch keeps names from a restarted (or another) server apart.
            let seq = self.epoch.wrapping_add(self.batch_seq);
            self.volume.acks(node).publish_volatile(&batch_file_name(epoch, seq, "ack"), &encoder.finish())?;
            self.pending_rings.entry(node.clone()).or_default().push(Ring {
                kind: RingKind::Acks,
                port: 0,
                epoch,
                seq,
            });
            self.counters.acked += acks.len() as u64;
        }
        Ok(())
    }

    /// Queues an ack for the source at the end of this cycle.
    fn ack_later(&mut self, id: &PacketId, state: AckState, reason: String) {
        if id.origin == self.gateway_origin {
            // Came from the external network: nobody there reads acks.
            return;
        }
        self.pending_acks.entry(id.origin.clone()).or_default().push(Ack { id: id.clone(), state, reason });
    }

    fn flush_acks(&mut self) {
        for (node, acks) in std::mem::take(&mut self.pending_acks) {
            let mut acks = self.ack_over_fabric(&node, acks);
            acks.retain(|ack| self.ack_epochs.contains(&(node.clone(), ack.id.epoch)));
            if acks.is_empty() {
                continue;
            }
            // Acks after "stored" are informational: a lost one costs nothing but the source's view.
            if let Err(error) = self.publish_acks(&node, &acks) {
                self.report("writing acks", error);
            }
        }
    }

    /// Sends the acks whose sending process is connected over the fabric to it; returns the rest
    /// (for the volume).
    fn ack_over_fabric(&mut self, node: &NodeName, acks: Vec<Ack>) -> Vec<Ack> {
        let Some(hub) = &self.fabric else { return acks };
        let conns: Vec<Arc<Conn>> =
            hub.connections().into_iter().filter(|conn| conn.node == *node && !conn.is_closed()).collect();
        if conns.is_empty() {
            return acks;
        }
        let mut by_conn: BTreeMap<u64, Vec<Ack>> = BTreeMap::new();
        let mut rest = Vec::new();
        for ack in acks {
            match conns.iter().position(|conn| conn.epoch == ack.id.epoch) {
                Some(index) => by_conn.entry(index as u64).or_default().push(ack),
                None => rest.push(ack),
            }
        }
        for (index, acks) in by_conn {
            self.send_acks(&conns[index as usize], &acks);
        }
        rest
    }

    fn encoder(&mut self, kind: BatchKind) -> BatchEncoder {
        self.batch_seq += 1;
        let node = NodeName::new("ftss-server").expect("valid name");
        BatchEncoder::new(&BatchHeader { kind, node, epoch: self.epoch, batch_seq: self.batch_seq, flags: 0 })
    }

    /// Announces the inbox and ack files published since the last call in their nodes' bells (one
    /// write a node), so that nodes on NFS find them without listing a directory. A bell that
    /// cannot be written costs only time: the nodes' periodic sweep finds the files.
    fn ring_bells(&mut self) {
        for (node, rings) in std::mem::take(&mut self.pending_rings) {
            if !self.bells.contains_key(&node) {
                if self.bells.len() >= BELLS_OPEN_MAX {
                    // Nodes beyond the bound reopen theirs on demand (an open and a read of the header).
                    self.bells.clear();
                }
                let path = self.volume.bell_path(&node, self.config.partition.index);
                match BellWriter::open(&path) {
                    Ok(writer) => {
                        self.bells.insert(node.clone(), writer);
                    }
                    Err(error) => {
                        self.report("ringing a bell", error);
                        self.ring_later(node, rings);
                        continue;
                    }
                }
            }
            let writer = self.bells.get_mut(&node).expect("opened above");
            if let Err(error) = writer.ring(&rings) {
                self.bells.remove(&node);
                self.report("ringing a bell", error);
                self.ring_later(node, rings);
            }
        }
    }

    /// Keeps records a bell could not take for the next cycle (in order, before newer ones), up
    /// to `RINGS_HELD_MAX` a node; past that the nodes' sweep finds the files.
    fn ring_later(&mut self, node: NodeName, mut rings: Vec<Ring>) {
        let pending = self.pending_rings.entry(node).or_default();
        rings.append(pending);
        rings.truncate(RINGS_HELD_MAX);
        *pending = rings;
    }

    /// Writes due packets into their destination inboxes, in store order, grouped per (node, port):
    /// redeliveries that came due, then packets not delivered yet.
    fn deliver(&mut self) -> Result<usize, QueueError> {
        let now = monotonic_now();
        let mut due = self.redeliveries_due(now);
        let mut count = due.values().map(Vec::len).sum();
        // An error stops delivering to its port (or external address) this cycle; packets already
        // taken off the redelivery schedule are put back on it, never dropped from it. Other ports
        // go on: one bad spot on the queue disk holds up no one else.
        let mut failure = self.first_deliveries_due(&mut due, &mut count);
        if let Some(error) = self.write_deliveries(due, now) {
            failure = Some(error);
        }
        match failure {
            Some(error) => Err(error),
            None => Ok(count),
        }
    }

    /// Packets whose redelivery came due, per (node, port), except those still waiting in an inbox
    /// or held claimed by a live receiver (postponed).
    fn redeliveries_due(&mut self, now: Time) -> Due {
        let mut due = Due::new();
        let mut still_in_inbox: HashMap<(NodeName, u16, u64), bool> = HashMap::new();
        // Per inbox, the files held claimed by a live receiving process (listed once a cycle).
        let mut claims: HashMap<(NodeName, u16), HashSet<String>> = HashMap::new();
        let mut over_fabric: HashMap<(NodeName, u16), bool> = HashMap::new();
        for key in self.index.due_again(now, self.config.redeliver_after, DELIVER_PACKETS_PER_CYCLE_MAX) {
            let (entry, file) = self.index.in_flight(key).expect("due packets are in flight");
            let port = entry.destination.port();
            let Some(node) = self.addr_to_node.get(entry.destination.ip()).cloned() else {
                self.index.postpone(key, now);
                continue;
            };
            // Not picked up yet (no receiver bound): another copy would only pile up. Unless a fabric
            // process has the port now: it never reads inbox files, so the packet goes to it.
            let routed =
                *over_fabric.entry((node.clone(), port)).or_insert_with(|| self.fabric_route(&node, port).is_some());
            // Also not while a receiving process holds the file claimed and fresh: it will hand
            // the packet over, and a copy could reach a sibling process on the same port.
            let waiting = !routed
                && *still_in_inbox.entry((node.clone(), port, file)).or_insert_with(|| {
                    let name = batch_file_name(self.epoch, file, "pkt");
                    let inbox = self.volume.inbox(&node, port);
                    inbox.new_dir().join(&name).exists()
                        || claims
                            .entry((node.clone(), port))
                            .or_insert_with(|| fresh_claims(&inbox.tmp_dir()))
                            .contains(&name)
                });
            if waiting {
                self.index.postpone(key, now);
                continue;
            }
            due.entry((node, port)).or_default().push((key, entry));
        }
        due
    }

    /// Adds packets not delivered yet (within the cycle's and the in-flight bounds) to `due`, and
    /// sends those for external addresses through the gateway. Returns the last error.
    fn first_deliveries_due(&mut self, due: &mut Due, count: &mut usize) -> Option<QueueError> {
        let mut failure = None;
        for destination in self.index.destinations() {
            if self.is_external(&destination) {
                match self.send_external(&destination) {
                    Ok(sent) => *count += sent,
                    Err(error) => failure = Some(error),
                }
                continue;
            }
            // Unknown destinations stay queued: the receiver may register later.
            let Some(node) = self.addr_to_node.get(&destination).cloned() else { continue };
            // While a port's receiver has not taken its last inbox files (a slow mount, or no
            // socket bound), its new packets wait in the queue and go out together in the next
            // file, instead of one small file per cycle that it would read one at a time. Each
            // port has its own line and in-flight room, so a port whose app stopped reading holds
            // back nothing but its own packets.
            let held: HashSet<u16> = self
                .index
                .waiting_ports(&destination)
                .into_iter()
                .filter(|port| self.fabric_route(&node, *port).is_none() && self.inbox_backlogged(&node, *port))
                .collect();
            let room = DELIVER_PACKETS_PER_CYCLE_MAX.saturating_sub(*count);
            let next = self.index.next_undelivered(
                &destination,
                room,
                IN_FLIGHT_PER_DESTINATION_MAX,
                IN_FLIGHT_PER_PORT_MAX,
                &held,
            );
            for (key, entry) in next {
                due.entry((node.clone(), entry.destination.port())).or_default().push((key, entry));
                *count += 1;
            }
        }
        failure
    }

    /// Writes `due` out, over the fabric or into inbox files. Returns the last error.
    fn write_deliveries(&mut self, due: Due, now: Time) -> Option<QueueError> {
        let mut failure = None;
        for ((node, port), keys) in due {
            let route = self.fabric_route(&node, port);
            let mut start = 0;
            while start < keys.len() {
                let delivered = match &route {
                    Some(conn) => self.deliver_over(conn, &keys[start..], now),
                    None => self.deliver_file(&node, port, &keys[start..], now),
                };
                match delivered {
                    Ok(taken) => start += taken,
                    Err(error) => {
                        self.skip_delivery(&keys[start..], now);
                        self.report("delivering", format!("to {node}:{port}: {error}"));
                        failure = Some(error);
                        break;
                    }
                }
            }
        }
        failure
    }

    /// Sends queued packets for an external address through the gateway (best effort) and marks
    /// them done. Returns how many were sent.
    fn send_external(&mut self, destination: &Ipv4Addr) -> Result<usize, QueueError> {
        let keys = self.index.next_undelivered(
            destination,
            DELIVER_PACKETS_PER_CYCLE_MAX,
            usize::MAX,
            usize::MAX,
            &HashSet::new(),
        );
        if keys.is_empty() {
            return Ok(0);
        }
        let at_unix_us = now_us();
        let mut sent = Vec::new();
        let mut failure = None;
        for (key, entry) in keys {
            let packet = match self.queue.read_stored(entry.location) {
                Ok((_, packet)) => packet,
                Err(QueueError::Damaged { reason, .. }) => {
                    self.dead_letter_damaged(key, entry, reason);
                    continue;
                }
                Err(error) => {
                    failure = Some(error);
                    break;
                }
            };
            self.gateway.send(Some(&packet.id.origin), packet.source, packet.destination, &packet.payload);
            let record =
                QueueRecord::Done { id: packet.id.clone(), outcome: Outcome::Sent, at_unix_us, reason: String::new() };
            self.queue.append(&record);
            sent.push((packet.id, entry.destination));
        }
        if let Err(error) = self.sync_queue() {
            // They were sent; not recording it means they may be sent again (best effort allows it).
            self.push_back(format!("queue: {error}"));
            return Ok(0);
        }
        for (id, address) in &sent {
            self.finish(id, Outcome::Sent, at_unix_us, Some(*address));
        }
        match failure {
            Some(error) => Err(error),
            None => Ok(sent.len()),
        }
    }

    /// Writes one inbox file with a prefix of `keys`; returns how many it took.
    fn deliver_file(
        &mut self,
        node: &NodeName,
        port: u16,
        keys: &[(Key, Entry)],
        now: Time,
    ) -> Result<usize, QueueError> {
        let Encoded { bytes, taken, file_seq, good } = self.encode_delivery(keys)?;
        if good.is_empty() {
            return Ok(taken);
        }
        let name = batch_file_name(self.epoch, file_seq, "pkt");
        // No syncs: the queue holds the packet until it is receipted, so a delivery lost in a crash
        // is only delivered again.
        if let Err(error) = self.volume.inbox(node, port).publish_volatile(&name, &bytes) {
            self.report("delivering", format!("inbox of {node}:{port}: {error}"));
            self.skip_delivery(keys, now);
            return Ok(keys.len());
        }
        let ring = Ring { kind: RingKind::Packets, port, epoch: self.epoch, seq: file_seq };
        self.pending_rings.entry(node.clone()).or_default().push(ring);
        let waiting = self.inbox_files.entry((node.clone(), port)).or_default();
        waiting.push_back(file_seq);
        if waiting.len() > INBOX_FILES_WAITING_MAX * 4 {
            waiting.pop_front();
        }
        self.mark_delivered(&good, now, file_seq);
        Ok(taken)
    }

    /// Are `INBOX_FILES_WAITING_MAX` of the files written for `node`'s `port` still unclaimed?
    /// (One stat a cycle while the receiver keeps up: the oldest file written.)
    fn inbox_backlogged(&mut self, node: &NodeName, port: u16) -> bool {
        let Some(waiting) = self.inbox_files.get_mut(&(node.clone(), port)) else { return false };
        let new_dir = self.volume.inbox(node, port).new_dir();
        while let Some(file_seq) = waiting.front() {
            if new_dir.join(batch_file_name(self.epoch, *file_seq, "pkt")).exists() {
                break;
            }
            waiting.pop_front();
        }
        let backlogged = waiting.len() >= INBOX_FILES_WAITING_MAX;
        if waiting.is_empty() {
            // Only ports with unclaimed files keep an entry.
            self.inbox_files.remove(&(node.clone(), port));
        }
        backlogged
    }

    /// Sends a prefix of `keys` over a fabric connection; returns how many it took. A connection
    /// without room (its node reads slowly) takes none this cycle.
    fn deliver_over(&mut self, conn: &Conn, keys: &[(Key, Entry)], now: Time) -> Result<usize, QueueError> {
        if !conn.has_delivery_room() {
            self.skip_delivery(keys, now);
            return Ok(keys.len());
        }
        let Encoded { bytes, taken, good, .. } = self.encode_delivery(keys)?;
        if good.is_empty() {
            return Ok(taken);
        }
        if !conn.send(&fsbridge::fabric::Frame::Packets(bytes)) {
            self.skip_delivery(keys, now);
            return Ok(keys.len());
        }
        if let Some(hub) = &self.fabric {
            hub.count(|counters| counters.packets_delivered += good.len() as u64);
        }
        // No inbox file stands for these: a redelivery is never held back waiting for one.
        self.mark_delivered(&good, now, 0);
        Ok(taken)
    }

    /// Encodes a prefix of `keys` (bounded per file) as one packets batch. A packet damaged in
    /// every mirror is dead-lettered on the way; an error before anything was read is returned,
    /// after that the batch ends where it struck.
    fn encode_delivery(&mut self, keys: &[(Key, Entry)]) -> Result<Encoded, QueueError> {
        let mut encoder = self.encoder(BatchKind::Packets);
        let file_seq = self.batch_seq;
        let mut bytes = 0;
        let mut taken = 0;
        let mut good = Vec::new();
        for (key, entry) in keys.iter().take(DELIVER_PACKETS_PER_FILE_MAX) {
            if taken > 0 && bytes + entry.payload_bytes as usize > DELIVER_FILE_BYTES_MAX {
                break;
            }
            match self.queue.read_stored(entry.location) {
                Ok((_, packet)) => {
                    encoder.push(&Record::Packet(packet));
                    good.push((*key, *entry));
                }
                Err(QueueError::Damaged { reason, .. }) => self.dead_letter_damaged(*key, *entry, reason),
                Err(error) if taken == 0 => return Err(error),
                Err(_) => break,
            }
            bytes += entry.payload_bytes as usize;
            taken += 1;
        }
        self.counters.read_repairs = self.queue.read_repairs;
        Ok(Encoded { bytes: encoder.finish(), taken, file_seq, good })
    }

    /// A packet whose stored bytes are damaged in every mirror: it can never be delivered. Its
    /// bytes go to quarantine and it is dead-lettered with the reason, so that its port goes on.
    fn dead_letter_damaged(&mut self, key: Key, entry: Entry, reason: String) {
        let id = self.index.id(key);
        let reason = format!("damaged in every queue mirror: {reason}");
        if let Some(bytes) = self.queue.read_raw(entry.location) {
            let name = format!("queue-{}-{}", entry.location.segment, entry.location.offset);
            let origin = id.origin.clone();
            self.quarantine_bytes(&origin, &name, &bytes, &format!("{} ({reason})", id_text(&id)));
        }
        self.dead_letter(vec![(id, entry.destination, reason)]);
    }

    fn mark_delivered(&mut self, keys: &[(Key, Entry)], now: Time, file_seq: u64) {
        for (key, entry) in keys {
            if self.index.mark_delivered(*key, entry.destination, now, file_seq) {
                self.counters.delivered += 1;
                let id = self.index.id(*key);
                self.ack_later(&id, AckState::Delivered, String::new());
            } else {
                self.counters.redelivered += 1;
            }
        }
    }

    /// `keys` could not be delivered now: undelivered ones stay first in their queue; ones in flight
    /// (due again) go back on the redelivery schedule.
    fn skip_delivery(&mut self, keys: &[(Key, Entry)], now: Time) {
        for (key, _) in keys {
            self.index.postpone(*key, now);
        }
    }

    /// Reads receipts and appends a done record for each packet of this partition its destination
    /// receipted (not synced: the cycle syncs once for everything it staged). With several
    /// partitions, receipts for packets another partition holds are set aside for forwarding.
    fn stage_receipts(&mut self) -> Result<Option<ReceiptGroup>, fsbridge::SpoolError> {
        let mut files: Vec<(fsbridge::Spool, String)> = Vec::new();
        // (receiving node, packet id).
        let mut received: Vec<(NodeName, PacketId)> = Vec::new();
        let owned: Vec<NodeName> = self.nodes.iter().filter(|node| self.owns(node)).cloned().collect();
        for node in owned {
            let spool = self.volume.receipts(&node);
            match self.read_receipt_spool(&spool, Some(&node), &mut files, &mut received) {
                Ok(()) => self.node_recovered(&node, NodeStep::Receipts),
                Err(error) => self.node_failed(&node, NodeStep::Receipts, error),
            }
        }
        if self.config.partition.count > 1 {
            let spool = self.volume.forwarded_receipts(self.config.partition.index);
            self.read_receipt_spool(&spool, None, &mut files, &mut received)?;
        }
        let mut fabric_frames = 0;
        if let Some(hub) = &self.fabric {
            for conn in hub.connections() {
                let ids = conn.take_receipts();
                if !ids.is_empty() {
                    fabric_frames += 1;
                    hub.count(|counters| counters.receipts_received += ids.len() as u64);
                    received.extend(ids.into_iter().map(|id| (conn.node.clone(), id)));
                }
            }
        }
        if files.is_empty() && fabric_frames == 0 {
            return Ok(None);
        }
        let mut done = Vec::new();
        let mut forward: BTreeMap<(u32, NodeName), Vec<PacketId>> = BTreeMap::new();
        // Receipts for packets not in flight, by the receiving node's address.
        let mut strays: HashMap<Ipv4Addr, HashSet<Key>> = HashMap::new();
        for (node, id) in received {
            let owner = self.origin_partition(&id.origin);
            if owner != self.config.partition.index {
                forward.entry((owner, node)).or_default().push(id);
            } else if self.is_receipt_of(&id, &node) {
                done.push(id);
            } else if let (Some(key), Some(addr)) = (self.index.key(&id), self.node_to_addr.get(&node)) {
                strays.entry(*addr).or_default().insert(key);
            }
        }
        // A receipt written while this server was down (or before a partition changed owner) is
        // for a packet the replay queued again: it is at the front of its port's line.
        let mut requeued = Vec::new();
        for (addr, keys) in strays {
            let found: HashSet<Key> = self.index.find_undelivered(&addr, &keys, REQUEUED_WINDOW).into_iter().collect();
            if !found.is_empty() {
                done.extend(found.iter().map(|key| self.index.id(*key)));
                requeued.push((addr, found));
            }
        }
        let at_unix_us = now_us();
        done.sort();
        done.dedup();
        for id in &done {
            let record =
                QueueRecord::Done { id: id.clone(), outcome: Outcome::Receipted, at_unix_us, reason: String::new() };
            self.queue.append(&record);
        }
        Ok(Some(ReceiptGroup { files, done, forward, requeued, fabric_frames, at_unix_us }))
    }

    /// The receipts are durable: release their packets, ack, forward the others' and remove the
    /// files. (If the cycle's sync failed this is not called: the files stay and are read again;
    /// fabric receipts are lost, which means a redelivery the receiving shim drops.)
    fn complete_receipts(&mut self, group: ReceiptGroup) -> Result<usize, fsbridge::SpoolError> {
        for (addr, keys) in &group.requeued {
            for entry in self.index.remove_undelivered(addr, keys, REQUEUED_WINDOW) {
                self.finished(entry, Outcome::Receipted, group.at_unix_us);
            }
        }
        for id in &group.done {
            self.finish(id, Outcome::Receipted, group.at_unix_us, None);
            self.counters.receipted += 1;
            self.ack_later(id, AckState::Receipted, String::new());
        }
        if let Err(error) = self.forward_receipts(group.forward) {
            // The files stay and are read again: receipts taken twice change nothing.
            self.report("forwarding receipts", error);
            return Ok(0);
        }
        // Not synced: a receipt file that comes back after a crash is read again and changes nothing.
        for (spool, name) in &group.files {
            spool.remove_unsynced(name)?;
        }
        Ok(group.files.len() + group.fabric_frames)
    }

    /// Reads one receipt spool: a node's own (`node` is who receipted) or a partition's forwarded
    /// receipts (each file's header names the receiving node; only servers write there).
    fn read_receipt_spool(
        &mut self,
        spool: &fsbridge::Spool,
        node: Option<&NodeName>,
        files: &mut Vec<(fsbridge::Spool, String)>,
        received: &mut Vec<(NodeName, PacketId)>,
    ) -> Result<(), fsbridge::SpoolError> {
        let origin = node.map_or("server", NodeName::as_str).to_owned();
        let scan = spool.scan(RECEIPT_FILES_PER_NODE_MAX, HIDDEN_FILES_PER_PASS_MAX)?;
        for name in scan.hidden {
            let path = spool.new_dir().join(name);
            self.quarantine_path(path, &origin, "hidden file in a spool (no ftss writer makes one)");
        }
        for name in scan.names {
            let path = spool.new_dir().join(&name);
            // Forwarded receipts name the receiving node in their header, so only servers may
            // write them: a file there owned by another user (a node) is not taken.
            if node.is_none()
                && let Some(owner) = foreign_owner(&path)
            {
                let reason =
                    format!("forwarded receipts owned by uid {owner}, not the server's: only servers write here");
                self.quarantine_path(path, &origin, &reason);
                continue;
            }
            let bytes = match spool.read(&name) {
                Ok(Some(bytes)) => bytes,
                Ok(None) => continue,
                Err(error) => {
                    self.quarantine_path(path, &origin, &error.to_string());
                    continue;
                }
            };
            match decode_receipts(&bytes) {
                Ok((writer, ids)) => {
                    let receiver = node.cloned().unwrap_or(writer);
                    received.extend(ids.into_iter().map(|id| (receiver.clone(), id)));
                    files.push((spool.clone(), name));
                }
                Err(reason) => {
                    self.quarantine_path(path, &origin, &reason);
                }
            }
        }
        Ok(())
    }

    /// Publishes receipts for other partitions into their forwarded-receipt spools, one file per
    /// (partition, receiving node); the header names the receiving node.
    fn forward_receipts(
        &mut self,
        forward: BTreeMap<(u32, NodeName), Vec<PacketId>>,
    ) -> Result<(), fsbridge::SpoolError> {
        for ((partition, node), ids) in forward {
            self.batch_seq += 1;
            let header =
                BatchHeader { kind: BatchKind::Receipts, node, epoch: self.epoch, batch_seq: self.batch_seq, flags: 0 };
            let mut encoder = BatchEncoder::new(&header);
            for id in &ids {
                encoder.push(&Record::Receipt(id.clone()));
            }
            let spool = self.volume.forwarded_receipts(partition);
            spool.create()?;
            spool.publish(&batch_file_name(self.epoch, self.batch_seq, "rcpt"), &encoder.finish())?;
        }
        Ok(())
    }

    /// Does this server (partition) serve `node`: drain its outbox, read its receipts?
    /// Not for a node refused for claiming another's address: its files wait, untouched.
    fn owns(&self, node: &NodeName) -> bool {
        let partition = &self.config.partition;
        let mine = partition.count <= 1 || fsbridge::layout::partition_of(node, partition.count) == partition.index;
        mine && !self.refused.contains(node)
    }

    /// The partition that holds packets from `origin`: the origin node's, or for packets that came
    /// in through a partition's gateway, that partition (named in the gateway origin).
    fn origin_partition(&self, origin: &NodeName) -> u32 {
        let partition = &self.config.partition;
        if partition.count <= 1 {
            return 0;
        }
        match self.gateway_partitions.get(origin) {
            Some(index) => *index,
            None => fsbridge::layout::partition_of(origin, partition.count),
        }
    }

    /// May `node` receipt `id`? Only the destination node of a packet in flight may.
    fn is_receipt_of(&self, id: &PacketId, node: &NodeName) -> bool {
        self.index
            .key(id)
            .and_then(|key| self.index.in_flight(key))
            .is_some_and(|(entry, _)| self.addr_to_node.get(entry.destination.ip()) == Some(node))
    }

    /// Dead-letters packets whose destination stayed unknown for longer than `--hold`.
    fn dead_letter_expired(&mut self) {
        let now = now_us();
        let hold_us = self.config.hold.as_micros() as u64;
        let cutoff = now.saturating_sub(hold_us);
        let mut expired: Vec<(PacketId, SocketAddrV4)> = Vec::new();
        for destination in self.index.destinations() {
            if self.addr_to_node.contains_key(&destination) || self.is_external(&destination) {
                continue;
            }
            let room = DEAD_LETTERS_PER_CYCLE_MAX.saturating_sub(expired.len());
            expired.extend(self.index.stored_before(&destination, cutoff, room));
        }
        if expired.is_empty() {
            return;
        }
        let letters = expired
            .into_iter()
            .map(|(id, destination)| {
                let reason =
                    format!("no node registered for {} within {}s", destination.ip(), self.config.hold.as_secs());
                (id, destination, reason)
            })
            .collect();
        self.dead_letter(letters);
    }

    /// Records each packet as dead-lettered (one sync for all), then lets it go, tells its sender
    /// and shows it in status. If the sync fails nothing changes: they are tried again later.
    fn dead_letter(&mut self, letters: Vec<(PacketId, SocketAddrV4, String)>) {
        let now = now_us();
        for (id, _, reason) in &letters {
            let record = QueueRecord::Done {
                id: id.clone(),
                outcome: Outcome::DeadLettered,
                at_unix_us: now,
                reason: reason.clone(),
            };
            self.queue.append(&record);
        }
        if let Err(error) = self.sync_queue() {
            self.push_back(format!("queue: {error}"));
            return;
        }
        for (id, destination, reason) in letters {
            self.finish(&id, Outcome::DeadLettered, now, Some(destination));
            self.counters.dead_lettered += 1;
            eprintln!("ftss-server: dead-lettered {}: {reason}", id_text(&id));
            self.ack_later(&id, AckState::Rejected, reason.clone());
            self.dead_letters.push_back(DeadLetter {
                id: id_text(&id),
                destination: destination.ip().to_string(),
                reason,
                at_unix_ms: now / 1000,
            });
            if self.dead_letters.len() > DEAD_LETTERS_SHOWN_MAX {
                self.dead_letters.pop_front();
            }
        }
    }

    /// Frees retained packets whose time is up and deletes segments nothing lives in. When the
    /// active segment holds nothing live, a new one is started so the old one can go too: without
    /// `--retain`, receipted bytes do not linger.
    fn reclaim(&mut self) {
        self.book.expire(now_us());
        let active_idle = !self.book.is_live(self.active_segment_id());
        if active_idle
            && self.queue.active_has_records()
            && let Err(error) = self.queue.rotate()
        {
            self.report("starting a new segment", error);
        }
        let active = self.active_segment_id();
        if let Some(cursors) = self.logs.checkpoint(&self.volume, active) {
            // Older segments may hold the only copy of a cursor: write them all into the active
            // segment before any is reclaimed.
            for (node, log, offset) in cursors {
                self.queue.append(&QueueRecord::Cursor { node, log, offset });
            }
            if let Err(error) = self.sync_queue() {
                self.report("writing outbox log cursors", error);
                return;
            }
            self.logs.checkpointed(active);
        }
        self.queue.reclaim(|segment| self.book.is_live(segment));
    }

    fn active_segment_id(&self) -> u64 {
        self.queue.active_segment()
    }

    /// Removes what dead writers left behind: old ack files, and files in `tmp/` of every spool
    /// (including inbox files a receiving shim claimed and then died holding; their packets are
    /// delivered again because no receipt came).
    fn housekeeping(&mut self) {
        if self.housekept_at.is_some_and(|at| at.elapsed() < HOUSEKEEPING_INTERVAL) {
            return;
        }
        self.housekept_at = Some(Instant::now());
        for node in self.nodes.iter().filter(|node| self.owns(node)) {
            let _ = fsbridge::spool::sweep_older_than(&self.volume.acks(node).new_dir(), ACK_FILE_AGE_MAX);
            let inboxes =
                self.volume.inbox_ports(node).unwrap_or_default().into_iter().map(|port| self.volume.inbox(node, port));
            let spools = [self.volume.outbox(node), self.volume.receipts(node), self.volume.acks(node)];
            for spool in spools.into_iter().chain(inboxes) {
                let _ = spool.sweep_tmp(TMP_FILE_AGE_MAX);
            }
        }
    }

    /// Takes a sample of the counters for the rates (at every status write).
    fn sample_rates(&mut self) {
        let now = Instant::now();
        self.samples.push_back((now, self.counters.stored, self.counters.delivered, self.counters.receipted));
        while self.samples.front().is_some_and(|(at, ..)| now.duration_since(*at) > RATE_WINDOW) {
            self.samples.pop_front();
        }
    }

    /// Rates over the samples of the last `RATE_WINDOW`.
    fn rates(&self) -> Rates {
        let (Some(first), Some(last)) = (self.samples.front(), self.samples.back()) else { return Rates::default() };
        let seconds = last.0.duration_since(first.0).as_secs_f64();
        let rate = |from: u64, to: u64| if seconds > 0.0 { (to - from) as f64 / seconds } else { 0.0 };
        Rates {
            stored_per_second: rate(first.1, last.1),
            delivered_per_second: rate(first.2, last.2),
            receipted_per_second: rate(first.3, last.3),
        }
    }

    /// The status document (also what `status --json` prints).
    pub fn status(&self, stopped: bool) -> Status {
        let now = now_us();
        let mut nodes: BTreeMap<String, NodeStatus> = BTreeMap::new();
        for node in &self.nodes {
            let addr = self.node_to_addr.get(node).map(|addr| addr.to_string());
            let errors =
                self.node_errors.get(node).map(|errors| errors.values().cloned().collect()).unwrap_or_default();
            nodes.insert(node.to_string(), NodeStatus { addr, errors, ..NodeStatus::default() });
        }
        let mut unknown_destination = 0;
        for destination in self.index.destinations() {
            let stats = self.index.stats(&destination);
            let Some(node) = self.addr_to_node.get(&destination) else {
                unknown_destination += stats.packets;
                continue;
            };
            let status = nodes.get_mut(node.as_str()).expect("registered node listed");
            status.queued += stats.packets;
            status.queued_bytes += stats.bytes;
            status.in_flight += stats.in_flight;
            let oldest = stats.oldest_stored_unix_us.map_or(0, |stored| now.saturating_sub(stored) / 1000);
            status.oldest_age_ms = status.oldest_age_ms.max(oldest);
        }
        let mut counters = self.counters.clone();
        counters.read_repairs = self.queue.read_repairs;
        Status {
            running: !stopped,
            pid: std::process::id(),
            started_unix_ms: self.started_unix_ms,
            updated_unix_ms: now / 1000,
            degraded: self.queue.degraded(),
            backpressure: self.backpressure.clone(),
            counters,
            rates: self.rates(),
            queue: QueueStatus {
                packets: self.index.len() as u64,
                retained: self.book.retained() as u64,
                held_unknown_destination: unknown_destination,
                segments: self.queue.segment_count() as u64,
                bytes: self.queue.bytes(),
                mirrors: self.queue.mirror_status(),
            },
            config: ConfigStatus {
                retain_seconds: self.config.retain.as_secs(),
                hold_seconds: self.config.hold.as_secs(),
                redeliver_after_ms: self.config.redeliver_after.as_millis() as u64,
                destination_bytes_max: self.config.limits.destination_bytes,
                destination_packets_max: self.config.limits.destination_packets,
                queue_bytes_max: self.config.limits.total_bytes,
                queue_packets_max: self.config.limits.total_packets,
            },
            recovery: self.recovery.clone(),
            dead_letters: self.dead_letters.iter().cloned().collect(),
            gateway: GatewayStatus {
                counters: GatewayCounters {
                    nat_sockets: self.gateway.nat_count() as u64,
                    ..self.gateway.counters.clone()
                },
                ingress: self.gateway.ingress_status(),
                last_send_error: self.gateway.last_send_error.clone(),
            },
            last_error: self.last_error.clone(),
            active: self.active.clone(),
            partition: (self.config.partition.count > 1).then_some(self.config.partition),
            fabric: self.fabric.as_ref().map(|hub| FabricStatus {
                listening: hub.listening().to_vec(),
                counters: hub.counters(),
                connections: hub.status(),
            }),
            nodes,
        }
    }

    fn write_status(&mut self, stopped: bool) {
        self.sample_rates();
        let status = self.status(stopped);
        let text = serde_json::to_vec_pretty(&status).expect("status serializes");
        if let Some(snapshot) = &self.metrics {
            let value = serde_json::to_value(&status).expect("status serializes");
            snapshot.set(crate::metrics::render(&value, &self.sync_seconds));
        }
        let path = self.volume.partition_status_path(self.config.partition.index, self.config.partition.count);
        let tmp = path.with_extension(format!("json.tmp.{}", std::process::id()));
        // Status is advisory: a failed write is logged, never fatal.
        let result = std::fs::write(&tmp, &text).and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(error) = result {
            self.report("writing status", format!("{}: {error}", path.display()));
        }
        self.status_written_at = Some(Instant::now());
    }
}

/// Decodes an outbox batch and stamps each packet with the node it was drained from.
/// Returns the packets and whether the sender wants acks.
/// The owner of `path` if it is not this process's user (`None` if it is, or the file is gone).
fn foreign_owner(path: &std::path::Path) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    let owner = std::fs::symlink_metadata(path).ok()?.uid();
    (owner != nix::unistd::geteuid().as_raw()).then_some(owner)
}

/// Space a done record takes in the queue (with its origin name and a reason: at most about 100
/// bytes), kept free for every queued packet.
const DONE_RECORD_BYTES: u64 = 128;
/// Queue space a packet takes besides its payload, counted generously: its stored record's
/// framing, id and addresses, and its done record to come.
const PACKET_SPACE_BYTES: u64 = 256;

/// A receiving shim refreshes a claimed file's mtime every second while the app has not read all
/// of it; a claim older than this is a dead process's.
const CLAIM_FRESH: Duration = Duration::from_secs(5);

/// Names of the inbox files held claimed (`tmp/<name>.claimed-<pid>`) and refreshed within
/// `CLAIM_FRESH`, in the inbox whose `tmp/` is `tmp_dir`.
fn fresh_claims(tmp_dir: &std::path::Path) -> HashSet<String> {
    let mut fresh = HashSet::new();
    for entry in std::fs::read_dir(tmp_dir).into_iter().flatten().flatten() {
        let name = entry.file_name();
        let Some((file, _)) = name.to_str().and_then(|name| name.split_once(".claimed-")) else { continue };
        let recent = entry
            .metadata()
            .and_then(|meta| meta.modified())
            .is_ok_and(|modified| modified.elapsed().unwrap_or_default() < CLAIM_FRESH);
        if recent {
            fresh.insert(file.to_owned());
        }
    }
    fresh
}

fn decode_outbox_batch(
    bytes: &[u8],
    node: &NodeName,
    node_addr: Option<Ipv4Addr>,
) -> Result<(Vec<Packet>, bool), String> {
    let batch = fsbridge::format::decode_batch(bytes).map_err(|error| error.to_string())?;
    if batch.header.kind != BatchKind::Packets {
        return Err(format!("an outbox holds packet batches, found a {:?} batch", batch.header.kind));
    }
    let mut packets = Vec::with_capacity(batch.records.len());
    for record in batch.records {
        let Record::Packet(mut packet) = record else { unreachable!("decode checks tags against the kind") };
        packet.id.origin = node.clone();
        if let Some(addr) = node_addr {
            packet.source.set_ip(addr);
        }
        packets.push(packet);
    }
    Ok((packets, batch.header.flags & fsbridge::format::FLAG_WANTS_ACKS != 0))
}

/// A receipt batch: the node its header names and the receipted ids.
fn decode_receipts(bytes: &[u8]) -> Result<(NodeName, Vec<PacketId>), String> {
    let batch = fsbridge::format::decode_batch(bytes).map_err(|error| error.to_string())?;
    if batch.header.kind != BatchKind::Receipts {
        return Err(format!("a receipt spool holds receipt batches, found a {:?} batch", batch.header.kind));
    }
    let ids = batch
        .records
        .into_iter()
        .map(|record| match record {
            Record::Receipt(id) => id,
            _ => unreachable!("decode checks tags against the kind"),
        })
        .collect();
    Ok((batch.header.node, ids))
}

/// `ftss-server status` output.
#[derive(Debug, Serialize)]
pub struct Status {
    pub running: bool,
    pub pid: u32,
    pub started_unix_ms: u64,
    pub updated_unix_ms: u64,
    pub degraded: bool,
    pub backpressure: Backpressure,
    pub counters: Counters,
    pub rates: Rates,
    pub queue: QueueStatus,
    pub config: ConfigStatus,
    pub recovery: RecoveryReport,
    pub dead_letters: Vec<DeadLetter>,
    pub gateway: GatewayStatus,
    pub last_error: Option<String>,
    /// With `--ha`: this (active) instance and its lease epoch.
    pub active: Option<Active>,
    /// With `--partitions`: the share of the nodes this status is about.
    pub partition: Option<Partition>,
    /// With `--fabric-listen`: where, the counters and the connected nodes.
    pub fabric: Option<FabricStatus>,
    pub nodes: BTreeMap<String, NodeStatus>,
}

#[derive(Debug, Serialize)]
pub struct FabricStatus {
    pub listening: Vec<String>,
    pub counters: FabricCounters,
    pub connections: Vec<crate::fabric::ConnectionStatus>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Active {
    pub instance: String,
    pub lease_epoch: u64,
}

#[derive(Debug, Serialize)]
pub struct GatewayStatus {
    pub counters: GatewayCounters,
    pub ingress: Vec<IngressStatus>,
    pub last_send_error: Option<String>,
}

#[derive(Debug, Default, Serialize)]
pub struct Rates {
    pub stored_per_second: f64,
    pub delivered_per_second: f64,
    pub receipted_per_second: f64,
}

#[derive(Debug, Serialize)]
pub struct QueueStatus {
    pub packets: u64,
    pub retained: u64,
    pub held_unknown_destination: u64,
    pub segments: u64,
    pub bytes: u64,
    pub mirrors: Vec<MirrorStatus>,
}

#[derive(Debug, Serialize)]
pub struct ConfigStatus {
    pub retain_seconds: u64,
    pub hold_seconds: u64,
    pub redeliver_after_ms: u64,
    pub destination_bytes_max: u64,
    pub destination_packets_max: u64,
    pub queue_bytes_max: u64,
    pub queue_packets_max: u64,
}

#[derive(Debug, Default, Serialize)]
pub struct NodeStatus {
    pub addr: Option<String>,
    pub queued: u64,
    pub queued_bytes: u64,
    pub in_flight: u64,
    pub oldest_age_ms: u64,
    /// Why this node's spools cannot be served now (empty when all is well).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
}

/// The monotonic clock as the core counts it: microseconds since this process first asked.
pub fn monotonic_now() -> Time {
    static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let origin = *ORIGIN.get_or_init(Instant::now);
    Time(u64::try_from(origin.elapsed().as_micros()).unwrap_or(u64::MAX))
}

/// The index entry of a stored packet.
fn entry(packet: &Packet, location: Location, stored_unix_us: u64) -> Entry {
    Entry { location, destination: packet.destination, stored_unix_us, payload_bytes: packet.payload.len() as u16 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &std::path::Path) -> Config {
        Config {
            volume: dir.join("volume"),
            queue_dirs: vec![dir.join("queue")],
            poll: Duration::from_millis(10),
            redeliver_after: Duration::from_secs(5),
            retain: Duration::ZERO,
            hold: Duration::from_secs(3600),
            limits: Limits {
                destination_packets: 1 << 20,
                destination_bytes: 1 << 30,
                total_packets: 1 << 23,
                total_bytes: 1 << 34,
            },
            fabric: vec!["10.77.0.0/16".parse().unwrap()],
            ingress: Vec::new(),
            fabric_listen: Vec::new(),
            fabric_keys: dir.join("keys"),
            partition: Partition::default(),
            log_abandon_after: Duration::from_secs(600),
        }
    }

    /// Publishes one outbox file of node a with `count` packets for 10.77.0.2:9000.
    fn outbox_file(volume: &Volume, count: u64) -> PathBuf {
        let node = NodeName::new("a").unwrap();
        for (name, addr) in [("a", "10.77.0.1"), ("b", "10.77.0.2")] {
            let config = fsbridge::NodeConfig { addr: addr.parse().unwrap() };
            volume.register_node(&NodeName::new(name).unwrap(), &config).unwrap();
        }
        let header = BatchHeader { kind: BatchKind::Packets, node: node.clone(), epoch: 7, batch_seq: 1, flags: 0 };
        let mut encoder = BatchEncoder::new(&header);
        for seq in 1..=count {
            encoder.push(&Record::Packet(Packet {
                id: PacketId { origin: node.clone(), epoch: 7, seq },
                source: "10.77.0.1:5000".parse().unwrap(),
                destination: "10.77.0.2:9000".parse().unwrap(),
                sent_unix_us: seq,
                payload: vec![b'x'; 10],
            }));
        }
        volume.outbox(&node).publish(&batch_file_name(7, 1, "pkt"), &encoder.finish()).unwrap()
    }

    /// Item 2 of the durability audit: the lease was checked only between cycles, so an instance
    /// paused mid-cycle past its term (SIGSTOP, a hung disk or NFS call) resumed after its successor
    /// fenced the queue and went on to ack and remove outbox files. After every group commit the
    /// gate is asked; once it says no, nothing is acked or removed and the server stops.
    #[test]
    fn a_deposed_instance_acks_and_removes_nothing_after_its_group_commit() {
        let dir = std::env::temp_dir().join(format!("ftss-gate-{}-{}", std::process::id(), fsbridge::random_u64()));
        let mut server = Server::open(config(&dir)).unwrap();
        let file = outbox_file(&server.volume, 3);
        server.set_gate(|| false);
        server.cycle();
        assert!(server.deposed());
        assert!(file.exists(), "a deposed instance removed an outbox file");
        assert_eq!((server.counters.acked, server.counters.delivered), (0, 0));
        // The one that may act takes the same file normally.
        drop(server);
        let mut server = Server::open(config(&dir)).unwrap();
        server.set_gate(|| true);
        server.cycle();
        assert!(!file.exists());
        // (Its records reached the queue in the deposed one's commit: found again, stored once.)
        assert_eq!(server.index.len(), 3);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
