//! The routing agent: drain outboxes → store durably → ack the source → deliver to inboxes →
//! take receipts → delete. One cycle does each step once with bounded work; `run` repeats cycles.
//!
//! Invariants:
//! - A packet is acked (`Stored`) only after `Queue::sync` returned for the group that holds it.
//! - An outbox file is removed only after its packets are durable and acked.
//! - The source node of a packet is the outbox it was drained from, never the file's own claim.
//! - A packet leaves the queue only after its destination node receipted it.

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use fsbridge::format::BatchEncoder;
use fsbridge::layout::batch_file_name;
use fsbridge::{Ack, AckState, BatchHeader, BatchKind, NodeName, Packet, PacketId, Record, SpoolError, Volume};
use serde::Serialize;

use crate::queue::{Location, Queue, QueueError, Recovered, RecoveryReport};

/// Most outbox files drained from one node in one cycle; keeps one busy node from starving others.
const DRAIN_FILES_PER_NODE_MAX: usize = 256;
/// Most packets drained in one cycle, across nodes; bounds the memory of one group commit.
const DRAIN_PACKETS_PER_CYCLE_MAX: usize = 65_536;
/// Most packets written into one inbox batch file.
const DELIVER_PACKETS_PER_FILE_MAX: usize = 4096;
/// Most packets delivered in one cycle; bounds the time one cycle spends writing inboxes.
const DELIVER_PACKETS_PER_CYCLE_MAX: usize = 65_536;
/// Most receipt files read from one node in one cycle.
const RECEIPT_FILES_PER_NODE_MAX: usize = 1024;
/// How often the node registry (`node.toml` files) is re-read.
const REGISTRY_REFRESH: Duration = Duration::from_secs(1);
/// How often status.json is rewritten (`ftss-server status` reads it; NFS/SMB make it cheap enough).
const STATUS_INTERVAL: Duration = Duration::from_millis(250);
/// Ack files older than this are removed: acks are for processes waiting now, not a history.
const ACK_FILE_AGE_MAX: Duration = Duration::from_secs(300);
/// Files in `tmp/` older than this were left by a writer that died mid-publish.
const TMP_FILE_AGE_MAX: Duration = Duration::from_secs(3600);

/// Settings of `ftss-server run`.
#[derive(Clone, Debug)]
pub struct Config {
    pub volume: PathBuf,
    pub queue_dirs: Vec<PathBuf>,
    pub poll: Duration,
    pub redeliver_after: Duration,
}

/// Errors that stop the server. Per-file problems are not errors: those files are quarantined.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The durable queue failed: nothing more can be acked safely.
    #[error("queue: {0}")]
    Queue(#[from] QueueError),
    /// The volume itself is unusable (cannot list or write its directories).
    #[error("volume: {0}")]
    Volume(#[from] SpoolError),
}

/// Counters, as shown by `ftss-server status`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Counters {
    pub drained_files: u64,
    pub drained: u64,
    pub stored: u64,
    pub duplicates: u64,
    pub acked: u64,
    pub delivered: u64,
    pub redelivered: u64,
    pub receipted: u64,
    pub quarantined: u64,
    pub syncs: u64,
}

/// The state of one queued packet. Payloads stay on disk.
struct Entry {
    location: Location,
    destination: SocketAddrV4,
    order: u64,
    delivered_at: Option<Instant>,
}

/// The server's state and its I/O.
pub struct Server {
    config: Config,
    volume: Volume,
    queue: Queue,
    entries: HashMap<PacketId, Entry>,
    /// Store order → packet id: delivery walks this in order.
    by_order: BTreeMap<u64, PacketId>,
    /// Live packet count per segment, for reclaiming.
    live_per_segment: BTreeMap<u64, u64>,
    next_order: u64,
    nodes: Vec<NodeName>,
    addr_to_node: HashMap<Ipv4Addr, NodeName>,
    node_to_addr: HashMap<NodeName, Ipv4Addr>,
    registry_loaded_at: Option<Instant>,
    status_written_at: Option<Instant>,
    counters: Counters,
    recovery: RecoveryReport,
    epoch: u64,
    batch_seq: u64,
    started_unix_ms: u64,
}

/// One outbox file that was read and decoded this cycle.
struct Drained {
    node: NodeName,
    name: String,
    packets: Vec<Packet>,
}

impl Server {
    /// Opens the queue (recovering it) and the volume.
    pub fn open(config: Config) -> Result<Server, ServerError> {
        let volume = Volume::new(&config.volume);
        volume.create()?;
        let (queue, recovered, recovery) = Queue::open(&config.queue_dirs)?;
        let mut server = Server {
            config,
            volume,
            queue,
            entries: HashMap::new(),
            by_order: BTreeMap::new(),
            live_per_segment: BTreeMap::new(),
            next_order: 0,
            nodes: Vec::new(),
            addr_to_node: HashMap::new(),
            node_to_addr: HashMap::new(),
            registry_loaded_at: None,
            status_written_at: None,
            counters: Counters::default(),
            recovery,
            epoch: fsbridge::random_u64(),
            batch_seq: 0,
            started_unix_ms: fsbridge::unix_now_us() / 1000,
        };
        for item in recovered {
            match item {
                Recovered::Stored { location, packet } => server.insert(packet.id, packet.destination, location),
                Recovered::Done { id } => server.remove(&id),
            }
        }
        Ok(server)
    }

    pub fn recovery(&self) -> &RecoveryReport {
        &self.recovery
    }

    fn insert(&mut self, id: PacketId, destination: SocketAddrV4, location: Location) {
        if self.entries.contains_key(&id) {
            return;
        }
        let order = self.next_order;
        self.next_order += 1;
        self.by_order.insert(order, id.clone());
        *self.live_per_segment.entry(location.segment).or_insert(0) += 1;
        self.entries.insert(id, Entry { location, destination, order, delivered_at: None });
    }

    fn remove(&mut self, id: &PacketId) {
        if let Some(entry) = self.entries.remove(id) {
            self.by_order.remove(&entry.order);
            let live = self.live_per_segment.get_mut(&entry.location.segment).expect("segment counted");
            *live -= 1;
            if *live == 0 {
                self.live_per_segment.remove(&entry.location.segment);
            }
        }
    }

    /// Runs cycles until `stop` returns true.
    pub fn run(&mut self, stop: impl Fn() -> bool) -> Result<(), ServerError> {
        while !stop() {
            let busy = self.cycle()?;
            if !busy {
                std::thread::sleep(self.config.poll);
            }
        }
        self.write_status(true);
        Ok(())
    }

    /// One pass over every step. Returns whether anything was done.
    pub fn cycle(&mut self) -> Result<bool, ServerError> {
        self.refresh_registry()?;
        let drained = self.drain()?;
        let delivered = self.deliver()?;
        let receipted = self.take_receipts()?;
        self.queue.reclaim(|segment| self.live_per_segment.contains_key(&segment))?;
        if self.status_written_at.is_none_or(|at| at.elapsed() >= STATUS_INTERVAL) {
            self.housekeeping();
            self.write_status(false);
        }
        Ok(drained + delivered + receipted > 0)
    }

    fn refresh_registry(&mut self) -> Result<(), ServerError> {
        if self.registry_loaded_at.is_some_and(|at| at.elapsed() < REGISTRY_REFRESH) {
            return Ok(());
        }
        let (nodes, invalid) = self.volume.list_nodes()?;
        for name in invalid {
            self.quarantine_path(
                self.volume.nodes_dir().join(&name),
                "volume",
                "node directory name is not a valid node name",
            );
        }
        self.addr_to_node.clear();
        self.node_to_addr.clear();
        for node in &nodes {
            match self.volume.node_config(node) {
                Ok(Some(config)) => {
                    self.addr_to_node.insert(config.addr, node.clone());
                    self.node_to_addr.insert(node.clone(), config.addr);
                }
                Ok(None) => {}
                Err(reason) => eprintln!("ftss-server: ignoring registration of {node}: {reason}"),
            }
        }
        self.nodes = nodes;
        self.registry_loaded_at = Some(Instant::now());
        Ok(())
    }

    fn quarantine_path(&mut self, path: PathBuf, origin: &str, reason: &str) {
        match self.volume.quarantine(&path, origin, reason) {
            Ok(target) => {
                self.counters.quarantined += 1;
                eprintln!("ftss-server: quarantined {} as {}: {reason}", path.display(), target.display());
            }
            Err(error) => {
                eprintln!("ftss-server: cannot quarantine {}: {error} (reason was: {reason})", path.display())
            }
        }
    }

    /// Reads outbox files, stores their packets with one sync, acks, removes the files.
    fn drain(&mut self) -> Result<usize, ServerError> {
        let mut drained: Vec<Drained> = Vec::new();
        let mut packets_total = 0;
        for node in self.nodes.clone() {
            let outbox = self.volume.outbox(&node);
            for name in outbox.list(DRAIN_FILES_PER_NODE_MAX)? {
                if packets_total >= DRAIN_PACKETS_PER_CYCLE_MAX {
                    break;
                }
                let path = outbox.new_dir().join(&name);
                let bytes = match outbox.read(&name) {
                    Ok(Some(bytes)) => bytes,
                    Ok(None) => continue,
                    Err(error) => {
                        self.quarantine_path(path, node.as_str(), &error.to_string());
                        continue;
                    }
                };
                match decode_outbox_batch(&bytes, &node, self.node_to_addr.get(&node).copied()) {
                    Ok(packets) => {
                        packets_total += packets.len();
                        drained.push(Drained { node: node.clone(), name, packets });
                    }
                    Err(reason) => self.quarantine_path(path, node.as_str(), &reason),
                }
            }
        }
        if drained.is_empty() {
            return Ok(0);
        }
        for batch in &drained {
            for packet in &batch.packets {
                self.counters.drained += 1;
                if self.entries.contains_key(&packet.id) {
                    // Drained before a crash that came before the outbox file was removed.
                    self.counters.duplicates += 1;
                    continue;
                }
                let location = self.queue.append(&Record::Packet(packet.clone()));
                self.insert(packet.id.clone(), packet.destination, location);
                self.counters.stored += 1;
            }
        }
        self.queue.sync()?;
        self.counters.syncs += 1;
        self.ack_and_remove(&drained)?;
        self.counters.drained_files += drained.len() as u64;
        Ok(drained.len())
    }

    /// Writes one ack file per source node for what was just stored, then removes the outbox files.
    fn ack_and_remove(&mut self, drained: &[Drained]) -> Result<(), ServerError> {
        let mut by_node: BTreeMap<&NodeName, Vec<&Drained>> = BTreeMap::new();
        for batch in drained {
            by_node.entry(&batch.node).or_default().push(batch);
        }
        for (node, batches) in by_node {
            let mut encoder = self.encoder(BatchKind::Acks);
            for packet in batches.iter().flat_map(|batch| &batch.packets) {
                encoder.push(&Record::Ack(Ack {
                    id: packet.id.clone(),
                    state: AckState::Stored,
                    reason: String::new(),
                }));
            }
            let count = encoder.record_count() as u64;
            let name = batch_file_name(self.epoch, self.batch_seq, "ack");
            self.volume.acks(node).publish(&name, &encoder.finish())?;
            self.counters.acked += count;
            let outbox = self.volume.outbox(node);
            for batch in batches {
                outbox.remove_unsynced(&batch.name)?;
            }
            outbox.sync()?;
        }
        Ok(())
    }

    fn encoder(&mut self, kind: BatchKind) -> BatchEncoder {
        self.batch_seq += 1;
        let node = NodeName::new("ftss-server").expect("valid name");
        BatchEncoder::new(&BatchHeader { kind, node, epoch: self.epoch, batch_seq: self.batch_seq })
    }

    /// Writes due packets into their destination inboxes, in store order, grouped per (node, port).
    fn deliver(&mut self) -> Result<usize, ServerError> {
        let now = Instant::now();
        let mut due: BTreeMap<(NodeName, u16), Vec<PacketId>> = BTreeMap::new();
        let mut count = 0;
        for id in self.by_order.values() {
            let entry = &self.entries[id];
            let ready = entry.delivered_at.is_none_or(|at| now.duration_since(at) >= self.config.redeliver_after);
            if !ready {
                continue;
            }
            // Unknown destinations stay queued: the receiver may register later.
            let Some(node) = self.addr_to_node.get(entry.destination.ip()) else { continue };
            due.entry((node.clone(), entry.destination.port())).or_default().push(id.clone());
            count += 1;
            if count >= DELIVER_PACKETS_PER_CYCLE_MAX {
                break;
            }
        }
        for ((node, port), ids) in due {
            for chunk in ids.chunks(DELIVER_PACKETS_PER_FILE_MAX) {
                self.deliver_file(&node, port, chunk, now)?;
            }
        }
        Ok(count)
    }

    fn deliver_file(&mut self, node: &NodeName, port: u16, ids: &[PacketId], now: Instant) -> Result<(), ServerError> {
        let mut encoder = self.encoder(BatchKind::Packets);
        for id in ids {
            let location = self.entries[id].location;
            let packet = self.queue.read_packet(location)?;
            encoder.push(&Record::Packet(packet));
        }
        let name = batch_file_name(self.epoch, self.batch_seq, "pkt");
        self.volume.inbox(node, port).publish(&name, &encoder.finish())?;
        for id in ids {
            let entry = self.entries.get_mut(id).expect("entry exists");
            if entry.delivered_at.is_some() {
                self.counters.redelivered += 1;
            } else {
                self.counters.delivered += 1;
            }
            entry.delivered_at = Some(now);
        }
        Ok(())
    }

    /// Reads receipts; a receipted packet is marked done in the queue (synced) and forgotten.
    fn take_receipts(&mut self) -> Result<usize, ServerError> {
        let mut files = Vec::new();
        let mut done = Vec::new();
        for node in self.nodes.clone() {
            let spool = self.volume.receipts(&node);
            for name in spool.list(RECEIPT_FILES_PER_NODE_MAX)? {
                let path = spool.new_dir().join(&name);
                let bytes = match spool.read(&name) {
                    Ok(Some(bytes)) => bytes,
                    Ok(None) => continue,
                    Err(error) => {
                        self.quarantine_path(path, node.as_str(), &error.to_string());
                        continue;
                    }
                };
                match decode_receipts(&bytes) {
                    Ok(ids) => {
                        for id in ids {
                            // Only the destination node may receipt a packet.
                            let from_destination = self
                                .entries
                                .get(&id)
                                .is_some_and(|entry| self.addr_to_node.get(entry.destination.ip()) == Some(&node));
                            if from_destination {
                                done.push(id);
                            }
                        }
                        files.push((node.clone(), name));
                    }
                    Err(reason) => self.quarantine_path(path, node.as_str(), &reason),
                }
            }
        }
        if files.is_empty() {
            return Ok(0);
        }
        for id in &done {
            self.queue.append(&Record::Receipt(id.clone()));
        }
        self.queue.sync()?;
        for id in &done {
            if self.entries.contains_key(id) {
                self.remove(id);
                self.counters.receipted += 1;
            }
        }
        for (node, name) in &files {
            self.volume.receipts(node).remove(name)?;
        }
        Ok(files.len())
    }

    fn housekeeping(&mut self) {
        for node in &self.nodes {
            let _ = fsbridge::spool::sweep_older_than(&self.volume.acks(node).new_dir(), ACK_FILE_AGE_MAX);
            for spool in [self.volume.outbox(node), self.volume.receipts(node), self.volume.acks(node)] {
                let _ = spool.sweep_tmp(TMP_FILE_AGE_MAX);
            }
        }
    }

    /// The status document (also what `status --json` prints).
    pub fn status(&self, stopped: bool) -> Status {
        let mut nodes: BTreeMap<String, NodeStatus> = BTreeMap::new();
        for node in &self.nodes {
            nodes.insert(
                node.to_string(),
                NodeStatus { addr: self.node_to_addr.get(node).map(|addr| addr.to_string()), queued: 0 },
            );
        }
        let mut unknown_destination = 0;
        for entry in self.entries.values() {
            match self.addr_to_node.get(entry.destination.ip()) {
                Some(node) => nodes.get_mut(node.as_str()).expect("registered node listed").queued += 1,
                None => unknown_destination += 1,
            }
        }
        Status {
            running: !stopped,
            pid: std::process::id(),
            started_unix_ms: self.started_unix_ms,
            updated_unix_ms: fsbridge::unix_now_us() / 1000,
            counters: self.counters.clone(),
            queue: QueueStatus {
                packets: self.entries.len() as u64,
                held_unknown_destination: unknown_destination,
                segments: self.queue.segment_count() as u64,
                bytes: self.queue.bytes(),
                dirs: self.queue.dirs().iter().map(|dir| dir.display().to_string()).collect(),
            },
            recovery: self.recovery.clone(),
            nodes,
        }
    }

    fn write_status(&mut self, stopped: bool) {
        let text = serde_json::to_vec_pretty(&self.status(stopped)).expect("status serializes");
        let path = self.volume.status_path();
        let tmp = path.with_extension(format!("json.tmp.{}", std::process::id()));
        // Status is advisory: a failed write is logged, never fatal.
        let result = std::fs::write(&tmp, &text).and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(error) = result {
            eprintln!("ftss-server: cannot write {}: {error}", path.display());
        }
        self.status_written_at = Some(Instant::now());
    }
}

/// Decodes an outbox batch and stamps each packet with the node it was drained from.
fn decode_outbox_batch(bytes: &[u8], node: &NodeName, node_addr: Option<Ipv4Addr>) -> Result<Vec<Packet>, String> {
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
    Ok(packets)
}

fn decode_receipts(bytes: &[u8]) -> Result<Vec<PacketId>, String> {
    let batch = fsbridge::format::decode_batch(bytes).map_err(|error| error.to_string())?;
    if batch.header.kind != BatchKind::Receipts {
        return Err(format!("a receipt spool holds receipt batches, found a {:?} batch", batch.header.kind));
    }
    Ok(batch
        .records
        .into_iter()
        .map(|record| match record {
            Record::Receipt(id) => id,
            _ => unreachable!("decode checks tags against the kind"),
        })
        .collect())
}

/// `ftss-server status` output.
#[derive(Debug, Serialize)]
pub struct Status {
    pub running: bool,
    pub pid: u32,
    pub started_unix_ms: u64,
    pub updated_unix_ms: u64,
    pub counters: Counters,
    pub queue: QueueStatus,
    pub recovery: RecoveryReport,
    pub nodes: BTreeMap<String, NodeStatus>,
}

#[derive(Debug, Default, Serialize)]
pub struct QueueStatus {
    pub packets: u64,
    pub held_unknown_destination: u64,
    pub segments: u64,
    pub bytes: u64,
    pub dirs: Vec<String>,
}

#[derive(Debug, Default, Serialize)]
pub struct NodeStatus {
    pub addr: Option<String>,
    pub queued: u64,
}
