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
use crate::core::registry::{Holds, Registration, Registry, Verdict};
use crate::fabric::{Conn, FabricCounters, Hub};
use crate::gateway::{Arrival, Cidr, Gateway, GatewayCounters, IngressRule, IngressStatus, Target};
use crate::metrics::{Histogram, Snapshot};
use crate::outlog::{Logs, SegmentKey, Step};
use crate::queue::{Location, MirrorStatus, Outcome, Queue, QueueError, QueueRecord, RecoveryReport};
use crate::watch::{Area, Spot, Tag, Watcher};

mod acks;
mod cycle_time;
mod deliver;
mod drain;
mod limits;
mod links;
mod maintenance;
mod receipts;
mod report;
mod startup;
mod types;

pub use self::cycle_time::CycleTime;
use self::cycle_time::{CycleClock, CycleStep};
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
    /// Which node owns which address.
    registry: Registry,
    /// The steps failing for one node, with why (shown in status until they work again).
    node_errors: HashMap<NodeName, BTreeMap<NodeStep, String>>,
    /// When each address with packets queued and no owner was found so (the hold counts from then).
    holds: Holds,
    /// Asked after every group commit, before anything is acked or removed, and once before a
    /// cycle's deliveries ahead of its sync: may this instance still act? (With `--ha`: does it
    /// still hold the lease?) Once it says no, the server stops.
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
    /// Volume events said a node came or registered: the registry is read again after
    /// `REGISTRY_REFRESH_WOKEN` rather than `REGISTRY_REFRESH`.
    registry_woken: bool,
    /// When the volume's outboxes and receipts were last read, and whether they held anything.
    volume_reads: VolumeReads,
    /// inotify watches on the directories nodes write into (a wakeup hint; `None` without).
    watcher: Option<Watcher>,
    status_written_at: Option<Time>,
    resync_checked_at: Time,
    housekept_at: Option<Time>,
    /// When an idle active segment was last replaced by a new one (see `reclaim`).
    idle_rotated_at: Option<Time>,
    counters: Counters,
    samples: VecDeque<(Time, u64, u64, u64)>,
    dead_letters: VecDeque<DeadLetter>,
    /// Whole IP packets (ftss-node) each node sent, was delivered and had refused.
    ip: BTreeMap<NodeName, IpCounts>,
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
    /// Where the main loop's time goes, step by step (`cycle_time` in status.json).
    clock: CycleClock,
    metrics: Option<Snapshot>,
    /// Set when running as one of several instances (`--ha`).
    active: Option<Active>,
    /// Sequence of packets that came in through the gateway (ids: gateway origin, this epoch).
    gateway_seq: u64,
    /// The fabric listener, with `--fabric-listen`.
    fabric: Option<Hub>,
    /// Sending processes (node, epoch) that asked for acks, and the order they were seen in.
    /// With whether each wants only stored (and rejected) acks.
    ack_epochs: HashMap<(NodeName, u64), bool>,
    ack_epoch_order: VecDeque<(NodeName, u64)>,
    /// Which fabric connection is drained first this cycle (turns rotate).
    fabric_turn: usize,
    /// Nodes' outbox logs: committed read positions and open segments.
    logs: Logs,
    /// Inbox files written per (node, port), oldest first, until seen claimed.
    inbox_files: HashMap<(NodeName, u16), VecDeque<u64>>,
    /// Set when packets were acked over the fabric: how many packets the next group may wait for.
    gather: Option<Gather>,
    /// Waits for acked fabric senders in a row that ran out before they all came back.
    gathers_ran_out: u32,
    /// How long the last group commit took.
    last_sync: Duration,
    /// The last group commit failed: nothing goes out ahead of a sync until one succeeds (a queue
    /// whose syncs keep failing would otherwise write the same packets out every cycle).
    commit_failed: bool,
    /// Packets written out ahead of a sync that failed, with the inbox file each went into, oldest
    /// first and bounded: when they are stored they count as in flight in that file, so that no
    /// second copy goes to a sibling process while it is claimed.
    early_aborted: HashMap<PacketId, u64>,
    early_aborted_order: VecDeque<PacketId>,
    /// Packets this cycle wrote out ahead of its sync, counted against the cycle's delivery bound.
    delivered_ahead: usize,
    /// This cycle's deliveries, made before its sync (the receivers work while it runs).
    delivered_before_sync: Option<Result<usize, QueueError>>,
    /// While those deliveries are made: the packets whose receipts the cycle's group takes.
    receipted_unsynced: HashSet<Key>,
}

/// What the next group commit waits for, up to a deadline: the fabric packets queued when the
/// last group was acked, plus as many as that group acked (closed-loop senders send their next
/// datagram when their ack comes).
struct Gather {
    expected: usize,
    until: Instant,
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
    /// Sets the gate asked after every group commit and before deliveries ahead of one (see the
    /// field).
    pub fn set_gate(&mut self, gate: impl FnMut() -> bool + 'static) {
        self.gate = Some(Box::new(gate));
    }

    /// Packets delivered before their group's sync so far (see `deliver_early`).
    pub fn delivered_early(&self) -> u64 {
        self.counters.delivered_early
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
                let idle = Instant::now();
                self.wait_for_work();
                self.clock.add(CycleStep::Idle, idle);
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
            self.last_sync = started.elapsed();
            self.counters.syncs += 1;
            self.sync_seconds.observe(self.last_sync.as_secs_f64());
        }
        result
    }

    /// Renders metrics into `snapshot` at every status interval from now on.
    pub fn export_metrics(&mut self, snapshot: Snapshot) {
        self.metrics = Some(snapshot);
    }

    /// Sleeps for the poll interval, or less if a datagram arrives at the gateway, a fabric
    /// connection has something, or a node writes into the volume.
    fn wait_for_work(&self) {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        let fabric = self.fabric.as_ref().map(Hub::wake_fd);
        let watcher = self.watcher.as_ref().map(Watcher::fd);
        let (connections, held) = self.fabric.as_ref().map(Hub::polled).unwrap_or_default();
        let mut fds: Vec<PollFd> = self
            .gateway
            .fds()
            .into_iter()
            .chain(fabric)
            .chain(watcher)
            .chain(connections.iter().map(|conn| conn.fd()))
            .map(|fd| PollFd::new(fd, PollFlags::POLLIN))
            .collect();
        // At least every status interval, so that status.json stays current under a long poll;
        // soon if a connection's frame waits for room (nothing wakes the loop for that).
        let mut wait = self.config.poll.min(STATUS_INTERVAL);
        if held {
            wait = wait.min(HELD_FRAME_RECHECK);
        }
        let timeout = PollTimeout::try_from(wait).unwrap_or(PollTimeout::MAX);
        // EINTR (a stop signal) or anything else: the caller's loop looks again.
        let _ = poll(&mut fds, timeout);
    }

    /// Is this an address outside the fabric that no node registered (sent through the gateway)?
    fn is_external(&self, addr: &Ipv4Addr) -> bool {
        self.registry.node(addr).is_none() && !self.config.fabric.iter().any(|cidr| cidr.contains(*addr))
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
        self.clock.begin_cycle();
        let busy = self.cycle_steps();
        self.clock.end_cycle();
        busy
    }

    fn cycle_steps(&mut self) -> bool {
        let mut work = 0;
        self.take_volume_events();
        if let Err(error) = self.refresh_registry() {
            self.report("reading the node registry", error);
        }
        self.backpressure = Backpressure::default();
        if self.fabric.is_some() {
            work += self.tend_fabric();
        }
        work += self.store();
        if self.deposed {
            // Found at the group commit: it writes out nothing more.
            return false;
        }
        // "stored" acks are announced before the cycle spends time delivering (in a cycle that
        // delivered before its sync, there is nothing left to deliver).
        let announcing = Instant::now();
        self.ring_bells();
        self.clock.add(CycleStep::Complete, announcing);
        let delivering = Instant::now();
        let delivered = match self.delivered_before_sync.take() {
            Some(delivered) => delivered,
            None => self.deliver(),
        };
        match delivered {
            Ok(count) => work += count,
            Err(error) => self.report("delivering", error),
        }
        self.clock.add(CycleStep::Deliver, delivering);
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

    /// Which spools of the volume this cycle reads (see [`VolumeReads`]).
    fn volume_plan(&mut self) -> VolumePlan {
        let mut plan = self.volume_reads.plan(monotonic_now(), self.config.poll);
        if let Some(watcher) = self.watcher.as_ref()
            && !plan.full
            && plan.any()
        {
            // Spools no watch covers are read whenever the volume is.
            for node in self.nodes.iter().filter(|node| self.owns(node)) {
                for (dir, area) in self.spool_dirs(node) {
                    if !watcher.covers(&dir) {
                        plan.spots.insert((node.clone(), area));
                    }
                }
            }
            if self.config.partition.count > 1
                && !watcher.covers(&self.volume.forwarded_receipts(self.config.partition.index).new_dir())
            {
                plan.forwarded = true;
            }
        }
        // Every node read is checked first (its directories not symlinks), as on every read.
        let touched: Vec<NodeName> =
            self.nodes.iter().filter(|node| self.owns(node) && plan.touches(node)).cloned().collect();
        for node in touched {
            if !self.node_is_sound(&node) {
                plan.unsound.insert(node);
            }
        }
        plan
    }

    /// Drains new packets and takes receipts with one group commit for both: every record of the
    /// cycle is appended, then one sync, and only then are packets acked and receipted ones
    /// released. Deliveries made before that sync (see below) may sync the queue on their own
    /// way, and so the group with them; the group counts as stored only if no sync rolled the
    /// queue back meanwhile. Returns how much was done.
    fn store(&mut self) -> usize {
        let gathering = Instant::now();
        let gathered = self.gather.is_some();
        self.gather_fabric();
        self.clock.add(CycleStep::Gather, gathering);
        // Whatever syncs the queue before this group's own sync (a delivery that records its
        // outcome) syncs the group with it; if that sync fails, the group's records are gone.
        let rollbacks = self.queue.rollbacks();
        let reading = Instant::now();
        let plan = self.volume_plan();
        let mut drain = self.stage_drain(&plan).unwrap_or_else(|error| {
            self.report("draining", error);
            None
        });
        let receipts = self.stage_receipts(&plan).unwrap_or_else(|error| {
            self.report("taking receipts", error);
            None
        });
        let appended = drain.is_some() || receipts.as_ref().is_some_and(|group| !group.done.is_empty());
        self.clock.add(CycleStep::Read, reading);
        let deliver_first = appended && gathered;
        // Before anything goes out ahead of the sync: once a cycle, as each ask may read the
        // volume (the lease, with `--ha`).
        if drain.is_some() || deliver_first {
            self.may_act();
        }
        if let Some(group) = drain.as_mut() {
            let delivering = Instant::now();
            self.deliver_early(group);
            self.clock.add(CycleStep::DeliverEarly, delivering);
        }
        // With fabric senders waiting on this group, the cycle's deliveries (of packets stored
        // earlier) go out before its sync: their receivers run while the sync does, not while
        // those senders turn round after their acks, on the same CPUs. Not by an instance that
        // may no longer act (its successor delivers), and none of the packets whose receipts
        // this group takes (the receiver has them; they are done once the receipts are durable;
        // the requeued ones are among `done`).
        if deliver_first && !self.deposed {
            let delivering = Instant::now();
            if let Some(group) = &receipts {
                let done = group.done.iter().filter_map(|id| self.index.key(id));
                self.receipted_unsynced.extend(done);
            }
            self.delivered_before_sync = Some(self.deliver());
            self.receipted_unsynced.clear();
            // Receivers of inbox files are told now, not after the sync.
            self.ring_bells();
            self.clock.add(CycleStep::Deliver, delivering);
        }
        if appended {
            let syncing = Instant::now();
            let mut synced = self.sync_queue();
            if synced.is_ok() && self.queue.rollbacks() != rollbacks {
                synced = Err(QueueError::RolledBack);
            }
            self.clock.add(CycleStep::Sync, syncing);
            if let Err(error) = &synced {
                self.push_back(format!("queue: {error}"));
            }
            self.commit_failed = synced.is_err();
            // A deposed instance (paused past its term, say) acks nothing and removes nothing:
            // what it appended after its successor fenced the queue is cut at the next recovery.
            if synced.is_err() || !self.may_act() {
                if let Some(group) = drain {
                    self.abort_drain(group);
                }
                return 0;
            }
        }
        let completing = Instant::now();
        if let Some(group) = drain.as_ref() {
            // Fabric senders waiting for their "stored" ack are the next group: they get it before
            // any of the cycle's bookkeeping (receipts, the index), which needs nothing from them.
            // The next cycle's duplicate check runs after that bookkeeping, in this thread.
            self.ack_fabric(&group.from_fabric);
            self.expect_fabric(group.from_fabric.iter().map(|taken| taken.packets.len()).sum());
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
        self.clock.add(CycleStep::Complete, completing);
        work
    }
}

#[cfg(test)]
mod tests;
