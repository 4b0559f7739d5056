//! The fabric glue: batches read from and delivered over authenticated stream connections.

use super::*;

impl Server {
    /// Takes packet frames from the fabric connections within what is left of this cycle's bounds
    /// after `drained`; a frame for a destination over its byte limit stays first in its
    /// connection's line (and the connection's reader stops when its queue is full). Receipts are
    /// queued apart and taken by `stage_receipts`, so they never wait behind such a frame.
    pub(super) fn read_fabric(&mut self, budget: &mut Budget) -> Vec<FabricDrained> {
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

    /// `acked` fabric packets were just acked: their senders, if they wait for the ack, send again
    /// within a round trip. The next group commit waits for them (and for what is queued now) up
    /// to the last sync's time, bounded by [`FABRIC_GATHER_WAIT_MAX`]: one sync for all of them
    /// instead of one for the early ones and another, a sync later, for the rest. A lone sender
    /// loses nothing (its packet is all the group waits for), and a sender that does not come
    /// back costs at most the bound.
    pub(super) fn expect_fabric(&mut self, acked: usize) {
        let Some(hub) = &self.fabric else { return };
        if acked == 0 {
            return;
        }
        // Packets that came during the sync are counted too (they are still in the sockets).
        hub.poll_read(None, Duration::ZERO);
        let queued = hub.queued_packets();
        let window = self.last_sync.min(FABRIC_GATHER_WAIT_MAX);
        self.gather = Some(Gather { expected: queued + acked, until: Instant::now() + window });
    }

    /// Waits (see [`Server::expect_fabric`]) until the expected fabric packets are queued or the
    /// deadline passes; a connection waiting to be admitted ends the wait at once. Gateway
    /// datagrams and volume events wait for the next cycle (at most the bound). The hub's
    /// wakeups taken here are signalled again on the way out: port lists, receipts and closes
    /// that came meanwhile are the next cycle's, and the main loop must not sleep on them.
    ///
    /// With [`GatherWait::Spin`] the wait looks at the connections without sleeping and yields
    /// the CPU between looks. On a closed loop the senders come back one after another over
    /// about a sync's time; sleeping in `poll`, the server is woken by each of their frames, each
    /// sender's write pays for that wakeup, and the server's CPU goes idle in between, which a
    /// virtual machine's vCPU leaves slowly. After [`GATHER_RUN_OUTS_BEFORE_SLEEP`] waits in a row
    /// ran out (senders that do not come back within a sync's time, such as apps that pause
    /// between sends) the waits sleep, until one sees its senders back (see [`gather_spins`]).
    pub(super) fn gather_fabric(&mut self) {
        let Some(gather) = self.gather.take() else { return };
        let Some(hub) = &self.fabric else { return };
        let spin = gather_spins(self.config.fabric_gather, self.gathers_ran_out);
        let mut took_wakeup = false;
        // Some(met), or None when a connection waiting for admission cut the wait short.
        let outcome = loop {
            if hub.queued_packets() >= gather.expected {
                break Some(true);
            }
            if !hub.pending().is_empty() {
                break None;
            }
            let now = Instant::now();
            // At the deadline one last look, whatever the wait did before (a sync that took
            // microseconds leaves a wait that would otherwise end before it looked at all).
            let expired = now >= gather.until;
            let wait = if spin || expired { Duration::ZERO } else { gather.until - now };
            if hub.poll_read(Some(hub.wake_fd()), wait) == Some(true) {
                hub.clear_wake();
                took_wakeup = true;
            }
            if expired {
                break Some(hub.queued_packets() >= gather.expected);
            }
            if spin {
                // Another runnable thread on this CPU (a sender, on a small machine) goes first.
                std::thread::yield_now();
            }
        };
        match outcome {
            Some(true) => {
                self.gathers_ran_out = 0;
                self.counters.fabric_gathers_met += 1;
            }
            Some(false) => {
                self.gathers_ran_out = self.gathers_ran_out.saturating_add(1);
                self.counters.fabric_gathers_ran_out += 1;
            }
            None => {}
        }
        if spin {
            self.counters.fabric_gathers_spun += 1;
        }
        if took_wakeup {
            hub.wake_again();
        }
    }

    /// Acks packets taken from fabric connections (now durable) over the connection they came on.
    /// A connection that closed meanwhile gets nothing: its node sends them again and they are
    /// acked as duplicates.
    /// The acks of a cycle go in one frame per connection (up to the frame's bound), whatever
    /// number of frames brought their packets: one write, and one wakeup of the node.
    pub(super) fn ack_fabric(&mut self, from_fabric: &[FabricDrained]) {
        let mut by_conn: Vec<(&Arc<Conn>, Vec<Ack>)> = Vec::new();
        for taken in from_fabric {
            let acks = taken.packets.iter().map(|packet| self.stored_ack(packet));
            // `read_fabric` takes a connection's frames one after the other.
            match by_conn.last_mut().filter(|(conn, _)| conn.id == taken.conn.id) {
                Some((_, list)) => list.extend(acks),
                None => by_conn.push((&taken.conn, acks.collect())),
            }
        }
        for (conn, acks) in by_conn {
            self.send_acks(conn, &acks);
        }
    }

    /// Fabric bookkeeping at the start of a cycle: admit authenticated nodes, take their port
    /// announcements (a newly bound port takes back what waits for it in the volume inbox), and
    /// forget closed connections. Returns how much was done.
    pub(super) fn tend_fabric(&mut self) -> usize {
        let Some(hub) = &self.fabric else { return 0 };
        // What the nodes sent since the last look (the wait woke on it, or the cycles ran back to
        // back); the wake fd is cleared if it was signalled.
        if hub.poll_read(Some(hub.wake_fd()), Duration::ZERO) == Some(true) {
            hub.clear_wake();
        }
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
    pub(super) fn admit(&mut self, conn: &Conn) {
        if let Some(owner) = self.registry.node(&conn.addr)
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
        self.registry.bind(&conn.node, conn.addr);
        if !self.nodes.contains(&conn.node) {
            self.nodes.push(conn.node.clone());
            self.nodes.sort();
        }
        conn.admit();
    }

    /// A fabric process bound `port` of `node`: packets the server put in that port's volume inbox
    /// (while no connection had the port) are taken back, by the same claiming rename a receiving
    /// shim uses, and become due for delivery over the connection at once.
    pub(super) fn reclaim_inbox(&mut self, node: &NodeName, port: u16) {
        let inbox = self.volume.inbox(node, port);
        let Ok(names) = inbox.list(RECLAIM_FILES_MAX) else { return };
        let now = monotonic_now();
        let mut keys = Vec::new();
        for name in names {
            let claimed = inbox.tmp_dir().join(format!("{name}.claimed-server-{}", std::process::id()));
            if fsbridge::fsops::rename(inbox.new_dir().join(&name), &claimed).is_err() {
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
            self.index.due_now(key, now);
        }
    }

    /// The fabric connection packets for `node`'s `port` go over: the newest live one of that node
    /// with the port bound.
    pub(super) fn fabric_route(&self, node: &NodeName, port: u16) -> Option<Arc<Conn>> {
        let hub = self.fabric.as_ref()?;
        hub.connections().into_iter().rev().find(|conn| conn.node == *node && !conn.is_closed() && conn.has_port(port))
    }

    pub(super) fn push_back(&mut self, reason: String) {
        if !self.backpressure.reasons.contains(&reason) {
            if self.backpressure.reasons.is_empty() {
                self.counters.backpressure_events += 1;
            }
            self.backpressure.active = true;
            self.backpressure.reasons.push(reason);
        }
    }
}

/// Does the next wait for acked fabric senders spin (see [`Server::gather_fabric`]), after
/// `run_outs` waits in a row that ran out?
pub(super) fn gather_spins(mode: GatherWait, run_outs: u32) -> bool {
    mode == GatherWait::Spin && run_outs < GATHER_RUN_OUTS_BEFORE_SLEEP
}
