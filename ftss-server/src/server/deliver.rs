//! Delivering: first deliveries and redeliveries written to inbox files, fabric links or the gateway.

use super::*;

impl Server {
    /// Writes due packets into their destination inboxes, in store order, grouped per (node, port):
    /// redeliveries that came due, then packets not delivered yet.
    pub(super) fn deliver(&mut self) -> Result<usize, QueueError> {
        let now = monotonic_now();
        let mut due = self.redeliveries_due(now);
        // What this cycle wrote out ahead of its sync counts against the cycle's bound too.
        let mut count = due.values().map(Vec::len).sum::<usize>() + std::mem::take(&mut self.delivered_ahead);
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

    /// Packets whose redelivery came due, per (node, port), except those still waiting in an inbox,
    /// held claimed by a live receiver, or receipted by the group whose sync is still to come
    /// (`receipted_unsynced`; all postponed).
    pub(super) fn redeliveries_due(&mut self, now: Time) -> Due {
        let mut due = Due::new();
        let mut still_in_inbox: HashMap<(NodeName, u16, u64), bool> = HashMap::default();
        // Per inbox, the files held claimed by a live receiving process (listed once a cycle).
        let mut claims: HashMap<(NodeName, u16), HashSet<String>> = HashMap::default();
        let mut over_fabric: HashMap<(NodeName, u16), bool> = HashMap::default();
        for key in self.index.due_again(now, self.config.redeliver_after, DELIVER_PACKETS_PER_CYCLE_MAX) {
            if self.receipted_unsynced.contains(&key) {
                // Receipted this cycle, not yet durably: no copy goes out; it is done once the
                // receipt is, and due again later if the receipt is lost with a failed sync.
                self.index.postpone(key, now);
                continue;
            }
            let (entry, file) = self.index.in_flight(key).expect("due packets are in flight");
            let port = entry.destination.port();
            let Some(node) = self.registry.node(entry.destination.ip()).cloned() else {
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
                    fsbridge::fsops::metadata(inbox.new_dir().join(&name)).is_ok()
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
    /// sends those for external addresses through the gateway. Returns the last error. Packets
    /// receipted by the group whose sync is still to come (requeued ones: their receiver had them
    /// before a restart) stay where they are, done once that sync is.
    pub(super) fn first_deliveries_due(&mut self, due: &mut Due, count: &mut usize) -> Option<QueueError> {
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
            let Some(node) = self.registry.node(&destination).cloned() else { continue };
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
            for (key, entry) in next.into_iter().filter(|(key, _)| !self.receipted_unsynced.contains(key)) {
                due.entry((node.clone(), entry.destination.port())).or_default().push((key, entry));
                *count += 1;
            }
        }
        failure
    }

    /// Writes `due` out, over the fabric or into inbox files. Returns the last error.
    pub(super) fn write_deliveries(&mut self, due: Due, now: Time) -> Option<QueueError> {
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
    pub(super) fn send_external(&mut self, destination: &Ipv4Addr) -> Result<usize, QueueError> {
        let keys = self.index.next_undelivered(
            destination,
            DELIVER_PACKETS_PER_CYCLE_MAX,
            usize::MAX,
            usize::MAX,
            &HashSet::default(),
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
    pub(super) fn deliver_file(
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
        if !self.publish_inbox_file(node, port, file_seq, &bytes) {
            self.skip_delivery(keys, now);
            return Ok(keys.len());
        }
        self.mark_delivered(&good, now, file_seq);
        Ok(taken)
    }

    /// Publishes inbox file `file_seq` of `node`'s `port` and queues its bell record; false (the
    /// error reported) if it could not be written.
    fn publish_inbox_file(&mut self, node: &NodeName, port: u16, file_seq: u64, bytes: &[u8]) -> bool {
        let name = batch_file_name(self.epoch, file_seq, "pkt");
        // No syncs: the queue holds the packet until it is receipted, so a delivery lost in a crash
        // is only delivered again.
        if let Err(error) = self.volume.inbox(node, port).publish_volatile(&name, bytes) {
            self.report("delivering", format!("inbox of {node}:{port}: {error}"));
            return false;
        }
        let ring = Ring { kind: RingKind::Packets, port, epoch: self.epoch, seq: file_seq };
        self.pending_rings.entry(node.clone()).or_default().push(ring);
        let waiting = self.inbox_files.entry((node.clone(), port)).or_default();
        waiting.push_back(file_seq);
        if waiting.len() > INBOX_FILES_WAITING_MAX * 4 {
            waiting.pop_front();
        }
        true
    }

    /// Writes the fresh packets of `group` into their inbox files (and rings the bells) before the
    /// group's sync, so that receivers read them while the queue's `fdatasync` runs instead of
    /// after it: on a busy disk that sync is most of a packet's way through the server.
    ///
    /// Nothing is acked or marked until the sync returns ([`Server::mark_early`]); only the
    /// receivers see the packets sooner. A packet from a node's outbox is durable there already
    /// (the file, or the log the sender synced), so if the sync fails or the server dies first it
    /// is drained and delivered again, and the receiving shim drops the copy as it drops any
    /// redelivery. A datagram from the external network is best effort: it was only in memory.
    /// After a failed sync the same instance counts each such packet, once stored, as in flight in
    /// the file it went into ([`Server::remember_aborted_early`]), so no second copy goes out
    /// while that one may still be claimed.
    ///
    /// Only packets whose sender does not wait for their ack (those wait for the sync: a sender
    /// that waits for its ack sends at the pace of its acks, and on a busy machine a receiver woken
    /// during the sync delays the ack; ftss-guaranteed at 8 senders went to 0.86–0.90 × with them
    /// delivered early). Fabric senders always wait, so this is the volume's traffic and the
    /// gateway's. And only for a port with no older packet waiting (the order per port stays the
    /// store order, up to the first packet that must wait), with room in flight, its inbox not
    /// backlogged and no fabric connection for it. The rest goes the usual way: after the sync,
    /// or, in a cycle that waited for fabric senders, in the next cycle's deliveries before its
    /// sync (see `Server::store`).
    pub(super) fn deliver_early(&mut self, group: &mut DrainGroup) {
        // Not after a failed commit (until one succeeds), and not by an instance that may no
        // longer act (its successor delivers, in its own order; `store` asked the gate).
        if self.commit_failed || self.deposed {
            return;
        }
        // Per packet of the group (in its order): does its sender wait for its ack?
        let waits_for_ack = group
            .arrived
            .iter()
            .map(|_| false)
            .chain(group.drained.iter().flat_map(|batch| batch.packets.iter().map(|_| batch.acks != AcksWanted::None)))
            .chain(group.from_fabric.iter().flat_map(|taken| taken.packets.iter().map(|_| true)));
        // Fresh packets per (destination, port), in the group's order, each id once, up to the
        // first that waits (the line stays in store order).
        let mut lines: Vec<(SocketAddrV4, Vec<(&Packet, Location)>)> = Vec::new();
        let mut line_of: HashMap<SocketAddrV4, usize> = HashMap::default();
        let mut ids: HashSet<&PacketId> = HashSet::default();
        let mut stopped: HashSet<SocketAddrV4> = HashSet::default();
        for ((packet, location), waits) in group.packets().zip(&group.locations).zip(waits_for_ack) {
            let Some(location) = location else { continue };
            let destination = SocketAddrV4::new(*packet.destination.ip(), packet.destination.port());
            if waits {
                stopped.insert(destination);
            }
            // One already written out ahead of a failed sync counts as in flight in that file once
            // stored (`complete_drain`): no second copy.
            if stopped.contains(&destination) || self.early_aborted.contains_key(&packet.id) || !ids.insert(&packet.id)
            {
                continue;
            }
            let line = *line_of.entry(destination).or_insert_with(|| {
                lines.push((destination, Vec::new()));
                lines.len() - 1
            });
            lines[line].1.push((packet, *location));
        }
        let mut early = Vec::new();
        // Taken ahead per destination address this cycle, against its in-flight bound.
        let mut ahead: HashMap<Ipv4Addr, usize> = HashMap::default();
        let mut cycle_room = DELIVER_PACKETS_PER_CYCLE_MAX;
        for (destination, line) in lines {
            let (ip, port) = (*destination.ip(), destination.port());
            if cycle_room == 0 || self.is_external(&ip) {
                continue;
            }
            let Some(node) = self.registry.node(&ip).cloned() else { continue };
            if self.fabric_route(&node, port).is_some() || self.inbox_backlogged(&node, port) {
                continue;
            }
            let taken_ahead = ahead.get(&ip).copied().unwrap_or(0);
            let room = self
                .index
                .room_ahead(
                    &ip,
                    port,
                    IN_FLIGHT_PER_DESTINATION_MAX.saturating_sub(taken_ahead),
                    IN_FLIGHT_PER_PORT_MAX,
                )
                .min(cycle_room)
                .min(DELIVER_PACKETS_PER_FILE_MAX);
            if room == 0 {
                continue;
            }
            let mut encoder = self.encoder(BatchKind::Packets);
            let file_seq = self.batch_seq;
            let mut packets = Vec::new();
            let mut bytes = 0;
            for (packet, location) in line.into_iter().take(room) {
                if !packets.is_empty() && bytes + packet.payload.len() > DELIVER_FILE_BYTES_MAX {
                    break;
                }
                bytes += packet.payload.len();
                encoder.push(&Record::Packet(packet.clone()));
                packets.push((packet.id.clone(), entry(packet, location, group.stored_unix_us)));
            }
            if !self.publish_inbox_file(&node, port, file_seq, &encoder.finish()) {
                // Delivered the usual way (see `deliver_early`'s notes).
                continue;
            }
            *ahead.entry(ip).or_default() += packets.len();
            cycle_room -= packets.len();
            early.push(EarlyFile { file_seq, packets });
        }
        if !early.is_empty() {
            self.ring_bells();
        }
        self.delivered_ahead = DELIVER_PACKETS_PER_CYCLE_MAX - cycle_room;
        group.early = early;
    }

    /// The sync of the group that wrote `early` failed: remembers where each of its packets went
    /// (bounded; the oldest are forgotten first, and a forgotten one is only delivered again).
    pub(super) fn remember_aborted_early(&mut self, early: Vec<EarlyFile>) {
        for file in early {
            for (id, _) in file.packets {
                if self.early_aborted.insert(id.clone(), file.file_seq).is_none() {
                    self.early_aborted_order.push_back(id);
                }
            }
        }
        while self.early_aborted_order.len() > EARLY_ABORTED_MAX {
            if let Some(id) = self.early_aborted_order.pop_front() {
                self.early_aborted.remove(&id);
            }
        }
        // Ids matched since (stored and marked) leave the order lazily.
        if self.early_aborted_order.len() > 2 * self.early_aborted.len() + 1024 {
            let kept = &self.early_aborted;
            self.early_aborted_order.retain(|id| kept.contains_key(id));
        }
    }

    /// The group whose packets went out in `early` files is durable and indexed: those packets
    /// are in flight in those files now (acked as delivered, redelivered if no receipt comes).
    pub(super) fn mark_early(&mut self, early: Vec<EarlyFile>) {
        let now = monotonic_now();
        for file in early {
            let keys: Vec<(Key, Entry)> =
                file.packets.iter().filter_map(|(id, entry)| Some((self.index.key(id)?, *entry))).collect();
            let delivered = self.counters.delivered;
            self.mark_delivered(&keys, now, file.file_seq);
            self.counters.delivered_early += self.counters.delivered - delivered;
        }
    }

    /// Are `INBOX_FILES_WAITING_MAX` of the files written for `node`'s `port` still unclaimed?
    /// (One stat a cycle while the receiver keeps up: the oldest file written.)
    pub(super) fn inbox_backlogged(&mut self, node: &NodeName, port: u16) -> bool {
        let Some(waiting) = self.inbox_files.get_mut(&(node.clone(), port)) else { return false };
        let new_dir = self.volume.inbox(node, port).new_dir();
        while let Some(file_seq) = waiting.front() {
            if fsbridge::fsops::metadata(new_dir.join(batch_file_name(self.epoch, *file_seq, "pkt"))).is_ok() {
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
    pub(super) fn deliver_over(&mut self, conn: &Conn, keys: &[(Key, Entry)], now: Time) -> Result<usize, QueueError> {
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
    pub(super) fn encode_delivery(&mut self, keys: &[(Key, Entry)]) -> Result<Encoded, QueueError> {
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
    pub(super) fn dead_letter_damaged(&mut self, key: Key, entry: Entry, reason: String) {
        let id = self.index.id(key);
        let reason = format!("damaged in every queue mirror: {reason}");
        if let Some(bytes) = self.queue.read_raw(entry.location) {
            let name = format!("queue-{}-{}", entry.location.segment, entry.location.offset);
            let origin = id.origin.clone();
            self.quarantine_bytes(&origin, &name, &bytes, &format!("{} ({reason})", id_text(&id)));
        }
        self.dead_letter(vec![(id, entry.destination, reason)]);
    }

    pub(super) fn mark_delivered(&mut self, keys: &[(Key, Entry)], now: Time, file_seq: u64) {
        for (key, entry) in keys {
            if self.index.mark_delivered(*key, entry.destination, now, file_seq) {
                self.counters.delivered += 1;
                if entry.destination.port() == fsbridge::ip::IP_PORT
                    && let Some(node) = self.registry.node(entry.destination.ip())
                {
                    self.ip.entry(node.clone()).or_default().delivered += 1;
                }
                let id = self.index.id(*key);
                self.ack_later(&id, AckState::Delivered, String::new());
            } else {
                self.counters.redelivered += 1;
            }
        }
    }

    /// `keys` could not be delivered now: undelivered ones stay first in their queue; ones in flight
    /// (due again) go back on the redelivery schedule.
    pub(super) fn skip_delivery(&mut self, keys: &[(Key, Entry)], now: Time) {
        for (key, _) in keys {
            self.index.postpone(*key, now);
        }
    }
}
