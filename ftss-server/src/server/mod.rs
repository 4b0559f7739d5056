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
//!
//! This file is the driver: the `Server`, one `cycle` and the group commit in `store`. Each kind
//! of I/O has its own file: `startup` (recovery and replay), `drain` (outbox files and logs),
//! `acks` (ack files, fabric acks, doorbells), `links` (fabric connections), `deliver` (inbox
//! files, fabric deliveries, the gateway), `receipts` (receipts and dead letters), `maintenance`
//! (registry, quarantine, reclaim, housekeeping) and `report` (status.json); `limits` holds every
//! bound and `types` the configuration and the groups a cycle builds. The decisions they carry
//! out are in `crate::core`.

use fsbridge::hash::{HashMap, HashSet};
use std::collections::{BTreeMap, VecDeque};
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

mod acks;
mod deliver;
mod drain;
mod limits;
mod links;
mod maintenance;
mod receipts;
mod report;
mod startup;
mod types;

use self::limits::*;
use self::maintenance::{foreign_owner, fresh_claims};
pub use self::report::*;
pub use self::types::*;

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
    /// Addresses with packets queued and no node registered, and when this server first found
    /// them so: the hold before their packets are dead-lettered counts from then.
    unregistered_since: HashMap<Ipv4Addr, Time>,
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
    registry_loaded_at: Option<Time>,
    status_written_at: Option<Time>,
    resync_checked_at: Time,
    housekept_at: Option<Time>,
    counters: Counters,
    samples: VecDeque<(Time, u64, u64, u64)>,
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

fn now_us() -> u64 {
    fsbridge::unix_now_us()
}

fn id_text(id: &PacketId) -> String {
    format!("{}/{:016x}/{}", id.origin, id.epoch, id.seq)
}

/// The monotonic clock as the core counts it: microseconds since this process first asked (on
/// a thread running the simulator, the simulated disk's clock).
pub fn monotonic_now() -> Time {
    if let Some(disk) = fsbridge::disk::sim::current() {
        return Time(disk.monotonic_us());
    }
    static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let origin = *ORIGIN.get_or_init(Instant::now);
    Time(u64::try_from(origin.elapsed().as_micros()).unwrap_or(u64::MAX))
}

/// The index entry of a stored packet.
fn entry(packet: &Packet, location: Location, stored_unix_us: u64) -> Entry {
    Entry { location, destination: packet.destination, stored_unix_us, payload_bytes: packet.payload.len() as u16 }
}

impl Server {
    /// Sets the gate asked after every group commit (see the field).
    pub fn set_gate(&mut self, gate: impl FnMut() -> bool + 'static) {
        self.gate = Some(Box::new(gate));
    }

    /// Packets held in the queue, not yet receipted or dead-lettered.
    pub fn queued_packets(&self) -> u64 {
        self.index.len() as u64
    }

    /// Packets held in the queue for `destination`.
    pub fn queued_packets_for(&self, destination: &Ipv4Addr) -> u64 {
        self.index.queued(destination).0
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
        if monotonic_now().duration_since(self.resync_checked_at) >= RESYNC_INTERVAL {
            self.resync_checked_at = monotonic_now();
            if self.queue.degraded() {
                self.queue.resync_failed();
            }
        }
        if self.status_written_at.is_none_or(|at| monotonic_now().duration_since(at) >= STATUS_INTERVAL) {
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

    /// Found by the spool simulator: an outbox file that could not be read for a moment (EIO
    /// from the volume) was quarantined as if its bytes were bad, so its packets, durable on the
    /// volume and acked to the sender, were never delivered. A read error leaves the file in line.
    #[test]
    fn an_outbox_file_that_cannot_be_read_for_a_while_is_drained_later_not_quarantined() {
        use fsbridge::disk::sim::{Call, SimDisk, install};
        let disk = SimDisk::new(1, 1 << 30);
        let _installed = install(&disk);
        let dir = PathBuf::from("/sim");
        fsbridge::disk::create_dir_all(dir.join("queue")).unwrap();
        let mut server = Server::open(config(&dir)).unwrap();
        let file = outbox_file(&server.volume, 3);
        disk.break_calls(&file, Call::Read, libc::EIO);
        server.cycle();
        assert_eq!(server.counters.quarantined, 0, "a file the volume failed to read was quarantined");
        assert!(disk.peek(&file).is_some(), "the file left its outbox");
        assert_eq!(server.index.len(), 0);
        disk.repair();
        server.cycle();
        assert_eq!(server.index.len(), 3, "the file was drained once it could be read");
        assert!(fsbridge::fsops::metadata(&file).is_err());
    }

    /// Found by the spool simulator: one failed read of a registered node's `node.toml` (EIO from
    /// the volume) unregistered the node until the next refresh, so packets queued for it were
    /// held as for an unknown address and, being older than the hold time, dead-lettered at once.
    /// A registration that cannot be read now keeps the last one read.
    #[test]
    fn a_registration_that_cannot_be_read_for_a_while_keeps_the_node_registered() {
        use fsbridge::disk::sim::{Call, SimDisk, install};
        let disk = SimDisk::new(1, 1 << 30);
        let _installed = install(&disk);
        let (mut unix_us, mut monotonic_us) = (1_800_000_000_000_000, 1_000_000);
        disk.set_clock(unix_us, monotonic_us);
        let dir = PathBuf::from("/sim");
        fsbridge::disk::create_dir_all(dir.join("queue")).unwrap();
        let mut config = config(&dir);
        config.hold = Duration::from_secs(1);
        let mut server = Server::open(config).unwrap();
        for (name, addr) in [("a", "10.77.0.1"), ("b", "10.77.0.2")] {
            let config = fsbridge::NodeConfig { addr: addr.parse().unwrap() };
            server.volume.register_node(&NodeName::new(name).unwrap(), &config).unwrap();
        }
        server.cycle();
        let b = server.volume.node_dir(&NodeName::new("b").unwrap()).join("node.toml");
        disk.break_calls(&b, Call::Read, libc::EIO);
        outbox_file(&server.volume, 3);
        for _ in 0..3 {
            (unix_us, monotonic_us) = (unix_us + 2_000_000, monotonic_us + 2_000_000);
            disk.set_clock(unix_us, monotonic_us);
            server.cycle();
        }
        assert_eq!(server.counters.dead_lettered, 0, "packets for a registered node were dead-lettered");
        assert_eq!(server.counters.delivered, 3);
        disk.repair();
    }

    /// Found by the spool simulator: the hold for an unregistered address was counted from each
    /// packet's store time, so when a restarted server failed its first read of a node's
    /// registration, every packet for that node older than the hold was dead-lettered at once.
    /// The hold now counts from when this server found the address unregistered.
    #[test]
    fn packets_are_held_for_the_hold_time_from_when_their_address_was_found_unregistered() {
        use fsbridge::disk::sim::{Call, SimDisk, install};
        let disk = SimDisk::new(1, 1 << 30);
        let _installed = install(&disk);
        let (mut unix_us, mut monotonic_us) = (1_800_000_000_000_000, 1_000_000);
        let mut tick = |micros: u64| {
            (unix_us, monotonic_us) = (unix_us + micros, monotonic_us + micros);
            disk.set_clock(unix_us, monotonic_us);
        };
        tick(0);
        let dir = PathBuf::from("/sim");
        fsbridge::disk::create_dir_all(dir.join("queue")).unwrap();
        let mut config = config(&dir);
        config.hold = Duration::from_secs(3);
        let mut server = Server::open(config.clone()).unwrap();
        outbox_file(&server.volume, 3);
        server.cycle();
        assert_eq!(server.index.len(), 3);
        drop(server);
        tick(10_000_000);
        let b = dir.join("volume/nodes/b/node.toml");
        disk.break_calls(&b, Call::Read, libc::EIO);
        let mut server = Server::open(config).unwrap();
        for _ in 0..2 {
            server.cycle();
            tick(1_000_000);
        }
        assert_eq!(server.counters.dead_lettered, 0, "dead-lettered before the hold time passed");
        disk.repair();
        tick(1_000_000);
        server.cycle();
        assert_eq!((server.counters.dead_lettered, server.counters.delivered), (0, 3));
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
