//! The server's configuration, errors and counters, and the groups a cycle builds.

use super::*;

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
    /// How the cycle after a group acked over the fabric waits for those senders' next packets.
    pub fabric_gather: GatherWait,
}

/// How the server waits for the fabric senders it just acked (see `Server::gather_fabric`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GatherWait {
    /// Looks at the connections without sleeping, giving the CPU to any other runnable thread
    /// between looks, for at most the wait's bound (the last sync's time): no thread wakeup on
    /// the server's side, and none for the senders' writes to pay for. After three waits in a
    /// row that ran out the waits sleep until one sees its senders back, so senders that do not
    /// come back within a sync's time cost at most three spins each time they did.
    Spin,
    /// Sleeps in `poll` until the packets come or the bound passes.
    Sleep,
}

impl std::str::FromStr for GatherWait {
    type Err = String;

    fn from_str(text: &str) -> Result<GatherWait, String> {
        match text {
            "spin" => Ok(GatherWait::Spin),
            "sleep" => Ok(GatherWait::Sleep),
            other => Err(format!("{other:?} is not spin or sleep")),
        }
    }
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
pub(super) fn gateway_origin(index: u32) -> NodeName {
    let name = if index == 0 { GATEWAY_ORIGIN.to_owned() } else { format!("{GATEWAY_ORIGIN}-p{index}") };
    NodeName::new(&name).expect("a valid node name")
}

/// Packets to deliver this cycle, per destination (node, port), in store order.
pub(super) type Due = BTreeMap<(NodeName, u16), Vec<(Key, Entry)>>;

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
    /// Of `delivered`: written into their inbox before their group's sync (see `deliver_early`).
    pub delivered_early: u64,
    pub redelivered: u64,
    pub receipted: u64,
    pub dead_lettered: u64,
    pub quarantined: u64,
    pub syncs: u64,
    /// Waits for acked fabric senders (see `Server::gather_fabric`) that ended with every
    /// expected packet in, that ran out first, and that spun rather than slept (a wait cut short
    /// by a connection waiting for admission is neither met nor ran out).
    pub fabric_gathers_met: u64,
    pub fabric_gathers_ran_out: u64,
    pub fabric_gathers_spun: u64,
    pub read_repairs: u64,
    pub backpressure_events: u64,
    pub errors: u64,
}

/// A node's whole IP packets (from its agent, ftss-node), for status.
#[derive(Clone, Debug, Default, Serialize)]
pub struct IpCounts {
    /// Drained from the node and stored.
    pub sent: u64,
    /// Written into the node's inbox (first deliveries).
    pub delivered: u64,
    /// Refused when drained from the node, by reason (never stored; the kernel's rule for a bad
    /// packet is to drop it).
    pub refused: BTreeMap<String, u64>,
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

/// What a cycle's drain has taken so far, against its bounds.
/// What the server does per node, for errors that concern one node only.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum NodeStep {
    Register,
    Drain,
    Receipts,
}

impl NodeStep {
    pub(super) fn describe(self) -> &'static str {
        match self {
            NodeStep::Register => "registering",
            NodeStep::Drain => "reading its outbox",
            NodeStep::Receipts => "reading its receipts",
        }
    }
}

/// One delivery batch: `taken` of the keys offered are dealt with (`good` are in `bytes`, the
/// rest were dead-lettered as damaged).
pub(super) struct Encoded {
    pub(super) bytes: Vec<u8>,
    pub(super) taken: usize,
    pub(super) file_seq: u64,
    pub(super) good: Vec<(Key, Entry)>,
}

/// Packets staged in the queue by one cycle, waiting for its sync.
pub(super) struct DrainGroup {
    pub(super) arrived: Vec<Packet>,
    pub(super) drained: Vec<Drained>,
    pub(super) from_fabric: Vec<FabricDrained>,
    /// IP packets refused this cycle (see `check_ip_packets`); their refusals count once the
    /// group is durable (a failed sync reads the outbox again and refuses them again).
    pub(super) refused: Vec<Refused>,
    /// Per packet, in the order of [`DrainGroup::packets`]: where it was appended (`None`: a
    /// duplicate of a stored one).
    pub(super) locations: Vec<Option<Location>>,
    pub(super) stored_unix_us: u64,
    /// Inbox files written with packets of this group before its sync (see `deliver_early`).
    pub(super) early: Vec<EarlyFile>,
}

/// An inbox file written with fresh packets of a drain group while its sync was still to come.
/// Once the group is durable its packets count as delivered in that file; if the sync fails
/// they are drained again and delivered again, and the receiving shim drops the second copy.
pub(super) struct EarlyFile {
    pub(super) file_seq: u64,
    pub(super) packets: Vec<(PacketId, Entry)>,
}

/// An IP packet not stored, and why.
pub(super) struct Refused {
    pub(super) node: NodeName,
    pub(super) id: PacketId,
    pub(super) reason: String,
    pub(super) acks: AcksWanted,
}

impl DrainGroup {
    /// Every packet of the group: gateway arrivals, outbox files, fabric frames.
    pub(super) fn packets(&self) -> impl Iterator<Item = &Packet> {
        self.arrived
            .iter()
            .chain(self.drained.iter().flat_map(|batch| &batch.packets))
            .chain(self.from_fabric.iter().flat_map(|taken| &taken.packets))
    }
}

/// Receipts staged in the queue by one cycle, waiting for its sync.
pub(super) struct ReceiptGroup {
    /// Every file read, removed once its receipts are durable here or forwarded.
    pub(super) files: Vec<(fsbridge::Spool, String)>,
    /// Packets of this partition receipted by their destination (a done record is appended).
    pub(super) done: Vec<PacketId>,
    /// Receipts for packets other partitions hold.
    pub(super) forward: BTreeMap<(u32, NodeName), Vec<PacketId>>,
    /// Of `done`, the packets that were not in flight (queued again by a replay), per destination.
    pub(super) requeued: Vec<(Ipv4Addr, HashSet<Key>)>,
    pub(super) fabric_frames: usize,
    pub(super) at_unix_us: u64,
}

/// Packets taken from one fabric connection this cycle.
pub(super) struct FabricDrained {
    pub(super) conn: Arc<Conn>,
    pub(super) packets: Vec<Packet>,
}

/// One outbox file, or one frame of an outbox log, that was read and decoded this cycle.
pub(super) struct Drained {
    pub(super) node: NodeName,
    pub(super) source: Source,
    pub(super) packets: Vec<Packet>,
    /// The acks the sender waits for (the batch's flags).
    pub(super) acks: AcksWanted,
}

/// Which acks a sending process asked for, by its batches' flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum AcksWanted {
    None,
    /// `FLAG_STORED_ACKS_ONLY`: stored or rejected, not delivered or receipted.
    StoredOnly,
    All,
}

impl AcksWanted {
    pub(super) fn from_flags(flags: u8) -> AcksWanted {
        use fsbridge::format::{FLAG_STORED_ACKS_ONLY, FLAG_WANTS_ACKS};
        match (flags & FLAG_WANTS_ACKS != 0, flags & FLAG_STORED_ACKS_ONLY != 0) {
            (false, _) => AcksWanted::None,
            (true, true) => AcksWanted::StoredOnly,
            (true, false) => AcksWanted::All,
        }
    }
}

/// Where drained packets came from.
pub(super) enum Source {
    /// A batch file in `out/new/`, removed once its packets are durable.
    File(String),
    /// Frames of an outbox log segment up to `end`; with `sealed` the segment ends there and is
    /// removed once they are durable.
    Log { name: String, end: u64, sealed: bool },
}

/// When the volume's outboxes and receipt spools are read, and which. Listing them costs a few
/// system calls per spool (network round trips on NFS), and fabric traffic wakes the server far
/// more often than the poll interval. So:
/// - every spool of every owned node is read at the poll interval (and at once after lost events);
/// - between those reads, a cycle reads only the spools that inotify said were written in, and
///   those whose last read found something (files or frames: a sender or receiver is busy there,
///   and a read is bounded, so more may wait);
/// - a spool whose directory the watcher does not cover is read whenever any spool is.
///
/// After a read that found nothing anywhere the volume waits for an event or the poll interval,
/// however often the fabric or the gateway wakes the server. The spools to read are at most four
/// per owned node.
#[derive(Clone, Debug, Default)]
pub(super) struct VolumeReads {
    last_full: Option<Time>,
    lost: bool,
    dirty: HashSet<Spot>,
    forwarded: bool,
}

/// The spools one cycle reads.
#[derive(Clone, Debug, Default)]
pub(super) struct VolumePlan {
    /// Every spool (and every node's directories are checked).
    pub(super) full: bool,
    pub(super) spots: HashSet<Spot>,
    pub(super) forwarded: bool,
    /// Nodes whose directories failed their check this cycle (a symlink was quarantined): none
    /// of their spools is read.
    pub(super) unsound: HashSet<NodeName>,
}

impl VolumePlan {
    /// Is anything read?
    pub(super) fn any(&self) -> bool {
        self.full || self.forwarded || !self.spots.is_empty()
    }

    /// Is `area` of `node` read? (A change in the node's directories reads all of its spools.)
    pub(super) fn reads(&self, node: &NodeName, area: Area) -> bool {
        !self.unsound.contains(node)
            && (self.full
                || self.spots.contains(&(node.clone(), area))
                || self.spots.contains(&(node.clone(), Area::Tree)))
    }

    /// Is any spool of `node` read?
    pub(super) fn touches(&self, node: &NodeName) -> bool {
        [Area::Tree, Area::Outbox, Area::Log, Area::Receipts].into_iter().any(|area| self.reads(node, area))
    }
}

impl VolumeReads {
    /// The spools the cycle starting at `now` reads; they count as read (see [`VolumeReads::keep`]).
    pub(super) fn plan(&mut self, now: Time, poll: Duration) -> VolumePlan {
        let full = self.lost || self.last_full.is_none_or(|last| now.duration_since(last) >= poll);
        let plan = VolumePlan {
            full,
            spots: std::mem::take(&mut self.dirty),
            forwarded: self.forwarded,
            unsound: HashSet::default(),
        };
        self.forwarded = false;
        if full {
            self.last_full = Some(now);
            self.lost = false;
        }
        plan
    }

    /// What volume events said: these spools were written in, or events were lost.
    pub(super) fn woken(&mut self, woken: &crate::watch::Woken) {
        self.lost |= woken.lost;
        self.forwarded |= woken.forwarded;
        self.dirty.extend(woken.spots.iter().cloned());
    }

    /// `spot` found something (or was not read to its end): read it again at the next cycle.
    pub(super) fn keep(&mut self, spot: Spot) {
        self.dirty.insert(spot);
    }

    /// The forwarded receipts found something: read them again at the next cycle.
    pub(super) fn keep_forwarded(&mut self) {
        self.forwarded = true;
    }
}
