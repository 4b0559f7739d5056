//! Draining: outbox files and outbox logs read, checked against the bounds, stored as one group.

use super::*;

/// Decodes an outbox batch and stamps each packet with the node it was drained from.
/// Returns the packets and the acks the sender wants.
pub(super) fn decode_outbox_batch(
    bytes: &[u8],
    node: &NodeName,
    node_addr: Option<Ipv4Addr>,
) -> Result<(Vec<Packet>, AcksWanted), String> {
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
    Ok((packets, AcksWanted::from_flags(batch.header.flags)))
}

/// Is a failed read of a spool file the file's own doing (it is not a regular file, too large,
/// or closed to this user), as opposed to the volume's (EIO, ESTALE, a timeout), which passes?
fn is_the_files_fault(error: &fsbridge::SpoolError) -> bool {
    match error {
        fsbridge::SpoolError::NotRegular { .. } | fsbridge::SpoolError::TooLarge { .. } => true,
        other => matches!(other.raw_os_error(), Some(libc::EACCES) | Some(libc::EPERM)),
    }
}

impl Server {
    /// Turns gateway arrivals into packets for their fabric destination.
    pub(super) fn arrivals_to_packets(&mut self, arrivals: Vec<Arrival>) -> Vec<Packet> {
        let mut packets = Vec::new();
        for arrival in arrivals {
            let destination = match arrival.target {
                Target::Address(addr) => addr,
                Target::Node(node, port) => match self.registry.addr(&node) {
                    Some(addr) => SocketAddrV4::new(addr, port),
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

    /// Reads outbox files, fabric frames and gateway arrivals and appends their packets to the
    /// queue (not synced: the cycle syncs once for everything it staged). `None` if there was none.
    /// The volume's outboxes are read as `plan` says (see [`VolumeReads`]).
    pub(super) fn stage_drain(&mut self, plan: &VolumePlan) -> Result<Option<DrainGroup>, fsbridge::SpoolError> {
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
        let mut drained = if plan.any() { self.read_outboxes(&mut budget, plan) } else { Vec::new() };
        let mut from_fabric = self.read_fabric(&mut budget);
        let mut refused = Vec::new();
        for batch in &mut drained {
            let registered = self.registry.addr(&batch.node);
            self.check_ip_packets((&batch.node, registered, batch.acks), &mut batch.packets, &mut refused);
        }
        for taken in &mut from_fabric {
            // Over the fabric the source is the authenticated connection's address.
            let sender = (&taken.conn.node, Some(taken.conn.addr), AcksWanted::None);
            self.check_ip_packets(sender, &mut taken.packets, &mut refused);
        }
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
        if drained.is_empty() && arrived.is_empty() && from_fabric.is_empty() && refused.is_empty() {
            return Ok(None);
        }
        let mut group = DrainGroup {
            arrived,
            drained,
            from_fabric,
            refused,
            locations: Vec::new(),
            stored_unix_us: now_us(),
            early: Vec::new(),
        };
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

    /// Takes out of `packets` (drained from `node`, whose registered address is `registered`) the
    /// whole IP packets that may not be carried: from a node with no registered address (the
    /// record's source is the registered address, so nothing else ties the packet's source to the
    /// node), a malformed header, addresses other than the record's, or a destination outside the
    /// fabric (the gateway carries datagrams, not packets). They go into `refused`: counted, and
    /// their senders told, once the cycle's group is durable (`complete_drain`).
    fn check_ip_packets(
        &self,
        (node, registered, acks): (&NodeName, Option<Ipv4Addr>, AcksWanted),
        packets: &mut Vec<Packet>,
        refused: &mut Vec<Refused>,
    ) {
        if !packets.iter().any(fsbridge::ip::is_ip_packet) {
            return;
        }
        packets.retain(|packet| {
            if !fsbridge::ip::is_ip_packet(packet) {
                return true;
            }
            let reason = match fsbridge::ip::check_packet(packet) {
                _ if registered != Some(*packet.source.ip()) => "the sending node has no registered address".to_owned(),
                Err(error) => error.to_string(),
                Ok(_) if self.is_external(packet.destination.ip()) => "IP destination outside the fabric".to_owned(),
                Ok(_) => return true,
            };
            refused.push(Refused { node: node.clone(), id: packet.id.clone(), reason, acks });
            false
        });
    }

    /// Counts the group's IP packets, stored and refused, per node, and tells the refused ones'
    /// senders (their epoch remembered even when nothing of theirs was stored).
    fn count_ip_packets(&mut self, group: &mut DrainGroup) {
        for (packet, location) in group.packets().zip(&group.locations) {
            if location.is_some() && fsbridge::ip::is_ip_packet(packet) {
                self.ip.entry(packet.id.origin.clone()).or_default().sent += 1;
            }
        }
        for refused in std::mem::take(&mut group.refused) {
            *self.ip.entry(refused.node.clone()).or_default().refused.entry(refused.reason.clone()).or_default() += 1;
            if refused.acks != AcksWanted::None {
                self.remember_ack_epoch(&refused.node, refused.id.epoch, refused.acks == AcksWanted::StoredOnly);
            }
            self.ack_later(&refused.id, AckState::Rejected, refused.reason);
        }
    }

    /// The cycle's sync failed (or an earlier sync in the cycle, which rolled the group's records
    /// back with its own: see `Server::store`): nothing of the group is durable. No ack; the outbox files stay and
    /// are listed again (in order) next cycle; fabric frames go back in front of their
    /// connections' queues, in order; gateway arrivals are kept for the next cycle.
    pub(super) fn abort_drain(&mut self, group: DrainGroup) {
        self.remember_aborted_early(group.early);
        self.outbox_backlog.clear();
        // In order: the group's arrivals, then any this cycle kept back.
        let kept = std::mem::replace(&mut self.arrivals_kept, group.arrived);
        self.arrivals_kept.extend(kept);
        for taken in group.from_fabric.into_iter().rev() {
            taken.conn.unpop(taken.packets);
        }
    }

    /// The group is durable: index its packets, ack them, remove the outbox files. (Those from
    /// fabric connections were acked already, first thing after the sync: see `Server::store`.)
    pub(super) fn complete_drain(&mut self, mut group: DrainGroup) -> Result<usize, fsbridge::SpoolError> {
        let total = group.packets().count();
        let fresh = group.locations.iter().flatten().count();
        self.counters.drained += (total - group.arrived.len()) as u64;
        self.counters.duplicates += (total - fresh) as u64;
        self.counters.stored += fresh as u64;
        self.count_ip_packets(&mut group);
        let stored_unix_us = group.stored_unix_us;
        // Packets written out ahead of a sync that failed: in flight in that file.
        let mut written_before = Vec::new();
        for (packet, location) in group.packets().zip(&group.locations) {
            if let Some(location) = location {
                self.insert(packet, *location, stored_unix_us);
                if let Some(file_seq) = self.early_aborted.remove(&packet.id) {
                    written_before.push(EarlyFile {
                        file_seq,
                        packets: vec![(packet.id.clone(), entry(packet, *location, stored_unix_us))],
                    });
                }
            }
        }
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
        let removed = self.ack_and_remove(&group.drained);
        // After the "stored" acks, as a delivery later in the cycle would come.
        written_before.append(&mut group.early);
        self.mark_early(written_before);
        removed?;
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

    /// Reads and decodes up to the cycle's bound of outbox files and log frames, quarantining bad
    /// ones and leaving those whose destination is over its limit. A node whose spool cannot be
    /// read is reported and passed over: it holds up no other node. Only the spools `plan` names
    /// are read; each that found something (or failed, or was cut short) is read again next cycle.
    pub(super) fn read_outboxes(&mut self, budget: &mut Budget, plan: &VolumePlan) -> Vec<Drained> {
        let mut drained: Vec<Drained> = Vec::new();
        let owned: Vec<NodeName> =
            self.nodes.iter().filter(|node| self.owns(node) && plan.touches(node)).cloned().collect();
        for node in owned {
            // A spool that gave packets, or was cut short by a bound, is read again next cycle
            // (refused, failed or empty ones wait for an event or the poll).
            type Reader =
                fn(&mut Server, &NodeName, &mut Vec<Drained>, &mut Budget) -> Result<bool, fsbridge::SpoolError>;
            let spools: [(Area, Reader); 2] =
                [(Area::Outbox, Server::read_outbox_files), (Area::Log, Server::read_logs)];
            let mut read = Ok(());
            for (area, reader) in spools.into_iter().filter(|(area, _)| plan.reads(&node, *area)) {
                let before = drained.len();
                let more = reader(self, &node, &mut drained, budget);
                if drained.len() > before || matches!(more, Ok(true)) {
                    self.volume_reads.keep((node.clone(), area));
                }
                read = read.and(more.map(|_| ()));
            }
            match read {
                Ok(()) => self.node_recovered(&node, NodeStep::Drain),
                Err(error) => self.node_failed(&node, NodeStep::Drain, error),
            }
        }
        drained
    }

    /// Reads `node`'s outbox files, in name order, within the cycle's bounds. Returns whether a
    /// bound stopped it with files left (not a refusal: those wait for room).
    pub(super) fn read_outbox_files(
        &mut self,
        node: &NodeName,
        drained: &mut Vec<Drained>,
        budget: &mut Budget,
    ) -> Result<bool, fsbridge::SpoolError> {
        for attempt in 0..DRAIN_FILES_PER_NODE_MAX {
            if budget.cycle_full() {
                return Ok(!budget.is_closed());
            }
            // List the directory again only at the start of a cycle: files drained earlier in
            // this cycle are still there until the group is acked.
            let Some(name) = self.next_outbox_name(node, attempt == 0)? else {
                return Ok(false);
            };
            // A file the volume fails to read stays first in line (the error fails this node's
            // drain for the cycle, and shows in status); it is read again next cycle.
            let Some((packets, acks)) = self.read_outbox_file(node, &name)? else {
                self.pop_outbox_name(node);
                continue;
            };
            if let Some(reason) = self.refusal(&packets, budget) {
                self.push_back(reason);
                // Files of one writer must stay in order: this one stays first in line.
                return Ok(false);
            }
            self.pop_outbox_name(node);
            budget.take(&packets);
            drained.push(Drained { node: node.clone(), source: Source::File(name), packets, acks });
        }
        Ok(true)
    }

    /// A step failed for one node only (its spool cannot be listed or read): counted, shown in
    /// status, and logged once per new reason; other nodes go on.
    pub(super) fn node_failed(&mut self, node: &NodeName, step: NodeStep, error: impl std::fmt::Display) {
        let message = format!("{}: {error}", step.describe());
        self.counters.errors += 1;
        let errors = self.node_errors.entry(node.clone()).or_default();
        if errors.get(&step) != Some(&message) {
            eprintln!("ftss-server: node {node}: {message}");
            errors.insert(step, message.clone());
        }
        self.last_error = Some(format!("node {node}: {message}"));
    }

    pub(super) fn node_recovered(&mut self, node: &NodeName, step: NodeStep) {
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
    /// order, and deals with segment ends and damage. Returns whether a bound stopped it with
    /// segments left.
    pub(super) fn read_logs(
        &mut self,
        node: &NodeName,
        drained: &mut Vec<Drained>,
        budget: &mut Budget,
    ) -> Result<bool, fsbridge::SpoolError> {
        let (segments, foreign) = self.logs.readable(&self.volume, node)?;
        let log_dir = self.volume.outbox(node).dir().join("log");
        for name in foreign {
            self.quarantine_path(log_dir.join(name), node.as_str(), "unexpected file name in an outbox log directory");
        }
        let node_addr = self.registry.addr(node);
        // A listing cut at its bound leaves segments for the next.
        let mut more = segments.len() >= crate::outlog::SEGMENTS_LISTED_MAX;
        for (name, has_successor) in segments {
            if budget.cycle_full() {
                more |= !budget.is_closed();
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
                Step::Finished => {
                    self.finish_log(&key);
                    // Only the lowest segment of a writer is listed: its next one, there already
                    // (the events of its making may have come with the seal's), is read next cycle.
                    more |= has_successor;
                }
                Step::Damaged { from, to, reason, bytes } => {
                    self.log_damaged(&key, from, to, &reason, &bytes, drained);
                }
                Step::Frames { frames, sealed } => self.log_frames(&key, node_addr, frames, sealed, drained, budget),
            }
        }
        Ok(more)
    }

    /// Damage in log segment `key` from byte `from`: up to `to` (the next valid frame), its bytes
    /// are quarantined and reading goes on from there; to the end (`None`), the segment is moved
    /// aside whole.
    pub(super) fn log_damaged(
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
                    acks: AcksWanted::None,
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
    pub(super) fn log_frames(
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
            let (packets, acks) = match decode_outbox_batch(&batch, node, node_addr) {
                Ok(decoded) => decoded,
                Err(reason) => {
                    let reason = format!("outbox log {name}, frame ending at byte {end}: {reason}");
                    self.quarantine_bytes(node, &format!("{name}-{end}"), &batch, &reason);
                    (Vec::new(), AcksWanted::None)
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
                acks,
            });
        }
    }

    /// A log segment is read to its seal (or abandoned and read to its end): remove it.
    pub(super) fn finish_log(&mut self, key: &(NodeName, String)) {
        let path = self.volume.outbox(&key.0).dir().join("log").join(&key.1);
        match fsbridge::spool::remove_file_idempotent(&path) {
            Ok(()) => self.logs.forget(key),
            Err(error) => self.report("removing a finished outbox log", error),
        }
    }

    /// Why `packets` may not be taken now (a destination, or the queue, at its bounds), if so.
    pub(super) fn refusal(&self, packets: &[Packet], budget: &Budget) -> Option<String> {
        let queued = |ip: &Ipv4Addr| {
            let (packets, bytes) = self.index.queued(ip);
            Load::stored(packets, bytes)
        };
        budget.refuse(packets, queued, Load::stored(self.index.len() as u64, self.index.bytes()))
    }

    /// The next outbox file of `node` in name order. Names come from a bounded listing kept between
    /// cycles, so a flooded outbox costs one directory scan per `OUTBOX_BACKLOG_MAX` files.
    pub(super) fn next_outbox_name(
        &mut self,
        node: &NodeName,
        may_list: bool,
    ) -> Result<Option<String>, fsbridge::SpoolError> {
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

    pub(super) fn pop_outbox_name(&mut self, node: &NodeName) {
        if let Some(backlog) = self.outbox_backlog.get_mut(node) {
            backlog.pop_front();
        }
    }

    /// Reads and decodes one outbox file; `None` if it is gone or was quarantined.
    /// Reads and decodes one outbox file: its packets, `None` if it is gone or was quarantined
    /// (a bad name, not a regular file, too large, not readable for this user, bad bytes), or the
    /// error that kept it from being read (EIO, a stale handle…: it is no fault of the file's).
    pub(super) fn read_outbox_file(
        &mut self,
        node: &NodeName,
        name: &str,
    ) -> Result<Option<(Vec<Packet>, AcksWanted)>, fsbridge::SpoolError> {
        let outbox = self.volume.outbox(node);
        let path = outbox.new_dir().join(name);
        if fsbridge::layout::parse_batch_file_name(name).is_none_or(|_| !name.ends_with(".pkt")) {
            self.quarantine_path(path, node.as_str(), "unexpected file name in an outbox (want <epoch>-<seq>.pkt)");
            return Ok(None);
        }
        let bytes = match outbox.read(name) {
            Ok(Some(bytes)) => bytes,
            Ok(None) => return Ok(None),
            Err(error) if is_the_files_fault(&error) => {
                self.quarantine_path(path, node.as_str(), &error.to_string());
                return Ok(None);
            }
            Err(error) => return Err(error),
        };
        match decode_outbox_batch(&bytes, node, self.registry.addr(node)) {
            Ok(decoded) => Ok(Some(decoded)),
            Err(reason) => {
                self.quarantine_path(path, node.as_str(), &reason);
                Ok(None)
            }
        }
    }

    /// A node directory or one of its spools being a symlink would let one node's files be read as
    /// another's: such a node is skipped and the link quarantined.
    pub(super) fn node_is_sound(&mut self, node: &NodeName) -> bool {
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
            if fsbridge::fsops::symlink_metadata(&path).is_ok_and(|meta| meta.is_symlink) {
                self.quarantine_path(path, node.as_str(), "a symlink where a node directory belongs");
                return false;
            }
        }
        true
    }
}
