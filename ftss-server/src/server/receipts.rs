//! Receipts taken (or forwarded to the partition that owns the packet) and dead letters.

use super::*;

/// A receipt batch: the node its header names and the receipted ids.
pub(super) fn decode_receipts(bytes: &[u8]) -> Result<(NodeName, Vec<PacketId>), String> {
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

impl Server {
    /// Reads receipts and appends a done record for each packet of this partition its destination
    /// receipted (not synced: the cycle syncs once for everything it staged). With several
    /// partitions, receipts for packets another partition holds are set aside for forwarding.
    /// The volume's receipt spools are read as `plan` says (see [`VolumeReads`]); each that held
    /// files (or failed) is read again next cycle.
    pub(super) fn stage_receipts(&mut self, plan: &VolumePlan) -> Result<Option<ReceiptGroup>, fsbridge::SpoolError> {
        let mut files: Vec<(fsbridge::Spool, String)> = Vec::new();
        // (receiving node, packet id).
        let mut received: Vec<(NodeName, PacketId)> = Vec::new();
        let owned: Vec<NodeName> =
            self.nodes.iter().filter(|node| self.owns(node) && plan.reads(node, Area::Receipts)).cloned().collect();
        for node in owned {
            let spool = self.volume.receipts(&node);
            let before = files.len();
            let read = self.read_receipt_spool(&spool, Some(&node), &mut files, &mut received);
            if files.len() > before || matches!(read, Ok(true)) {
                self.volume_reads.keep((node.clone(), Area::Receipts));
            }
            match read {
                Ok(_) => self.node_recovered(&node, NodeStep::Receipts),
                Err(error) => self.node_failed(&node, NodeStep::Receipts, error),
            }
        }
        if (plan.full || plan.forwarded) && self.config.partition.count > 1 {
            let spool = self.volume.forwarded_receipts(self.config.partition.index);
            let before = files.len();
            let read = self.read_receipt_spool(&spool, None, &mut files, &mut received);
            if files.len() > before || matches!(read, Ok(true)) {
                self.volume_reads.keep_forwarded();
            }
            read?;
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
        let mut strays: HashMap<Ipv4Addr, HashSet<Key>> = HashMap::default();
        for (node, id) in received {
            let owner = self.origin_partition(&id.origin);
            if owner != self.config.partition.index {
                forward.entry((owner, node)).or_default().push(id);
            } else if self.is_receipt_of(&id, &node) {
                done.push(id);
            } else if let (Some(key), Some(addr)) = (self.index.key(&id), self.registry.addr(&node)) {
                strays.entry(addr).or_default().insert(key);
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
    pub(super) fn complete_receipts(&mut self, group: ReceiptGroup) -> Result<usize, fsbridge::SpoolError> {
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
    pub(super) fn read_receipt_spool(
        &mut self,
        spool: &fsbridge::Spool,
        node: Option<&NodeName>,
        files: &mut Vec<(fsbridge::Spool, String)>,
        received: &mut Vec<(NodeName, PacketId)>,
    ) -> Result<bool, fsbridge::SpoolError> {
        let origin = node.map_or("server", NodeName::as_str).to_owned();
        let scan = spool.scan(RECEIPT_FILES_PER_NODE_MAX, HIDDEN_FILES_PER_PASS_MAX)?;
        // The scan's bound left files for the next.
        let more = scan.visible_total > scan.names.len();
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
        Ok(more)
    }

    /// Publishes receipts for other partitions into their forwarded-receipt spools, one file per
    /// (partition, receiving node); the header names the receiving node.
    pub(super) fn forward_receipts(
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
    pub(super) fn owns(&self, node: &NodeName) -> bool {
        let partition = &self.config.partition;
        let mine = partition.count <= 1 || fsbridge::layout::partition_of(node, partition.count) == partition.index;
        mine && !self.registry.is_refused(node)
    }

    /// The partition that holds packets from `origin`: the origin node's, or for packets that came
    /// in through a partition's gateway, that partition (named in the gateway origin).
    pub(super) fn origin_partition(&self, origin: &NodeName) -> u32 {
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
    pub(super) fn is_receipt_of(&self, id: &PacketId, node: &NodeName) -> bool {
        self.index
            .key(id)
            .and_then(|key| self.index.in_flight(key))
            .is_some_and(|(entry, _)| self.registry.node(entry.destination.ip()) == Some(node))
    }

    /// Dead-letters packets whose destination stayed unknown for longer than `--hold`.
    pub(super) fn dead_letter_expired(&mut self) {
        let now = now_us();
        let hold_us = self.config.hold.as_micros() as u64;
        let cutoff = now.saturating_sub(hold_us);
        let mut expired: Vec<(PacketId, SocketAddrV4)> = Vec::new();
        let unregistered: Vec<Ipv4Addr> = self
            .index
            .destinations()
            .into_iter()
            .filter(|destination| self.registry.node(destination).is_none() && !self.is_external(destination))
            .collect();
        // Held for the hold time since this server found the address unregistered, and since
        // each packet was stored.
        for destination in self.holds.due(&unregistered, monotonic_now(), self.config.hold) {
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
    pub(super) fn dead_letter(&mut self, letters: Vec<(PacketId, SocketAddrV4, String)>) {
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
}
