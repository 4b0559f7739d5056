//! Acks to the sources (ack files, fabric frames) and the doorbells that tell nodes of news.

use super::*;

impl Server {
    /// The ack for a packet now durable in the queue: stored, or accepted (best effort) for an
    /// address outside the fabric.
    pub(super) fn stored_ack(&self, packet: &Packet) -> Ack {
        let state =
            if self.is_external(packet.destination.ip()) { AckState::AcceptedBestEffort } else { AckState::Stored };
        Ack { id: packet.id.clone(), state, reason: String::new() }
    }

    /// Sends acks over a fabric connection, in frames of bounded size.
    pub(super) fn send_acks(&mut self, conn: &Conn, acks: &[Ack]) {
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

    /// Writes the "stored" acks of each source node (a file per waiting process), then removes the outbox files.
    pub(super) fn ack_and_remove(&mut self, drained: &[Drained]) -> Result<(), fsbridge::SpoolError> {
        let mut by_node: BTreeMap<&NodeName, Vec<&Drained>> = BTreeMap::new();
        for batch in drained {
            by_node.entry(&batch.node).or_default().push(batch);
        }
        for (node, batches) in by_node {
            // Only senders that wait for acks get ack files (a file per process and cycle).
            for batch in batches.iter().filter(|batch| batch.acks != AcksWanted::None) {
                if let Some(packet) = batch.packets.first() {
                    self.remember_ack_epoch(node, packet.id.epoch, batch.acks == AcksWanted::StoredOnly);
                }
            }
            let acks: Vec<Ack> = batches
                .iter()
                .filter(|batch| batch.acks != AcksWanted::None)
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
    /// packets, delivered and receipted, are written for it too unless `stored_only`).
    pub(super) fn remember_ack_epoch(&mut self, node: &NodeName, epoch: u64, stored_only: bool) {
        let key = (node.clone(), epoch);
        if self.ack_epochs.insert(key.clone(), stored_only).is_none() {
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
    pub(super) fn publish_acks(&mut self, node: &NodeName, acks: &[Ack]) -> Result<(), fsbridge::SpoolError> {
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
    pub(super) fn ack_later(&mut self, id: &PacketId, state: AckState, reason: String) {
        if id.origin == self.gateway_origin {
            // Came from the external network: nobody there reads acks.
            return;
        }
        self.pending_acks.entry(id.origin.clone()).or_default().push(Ack { id: id.clone(), state, reason });
    }

    pub(super) fn flush_acks(&mut self) {
        for (node, acks) in std::mem::take(&mut self.pending_acks) {
            let mut acks = self.ack_over_fabric(&node, acks);
            acks.retain(|ack| match self.ack_epochs.get(&(node.clone(), ack.id.epoch)) {
                None => false,
                Some(stored_only) => !stored_only || !matches!(ack.state, AckState::Delivered | AckState::Receipted),
            });
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
    /// (for the volume). Over the fabric only what a node acts on goes: stored (or accepted) and
    /// rejected. Delivered and receipted acks are dropped there: every fabric node (the shim and
    /// ftss-node) ignores them, and each would cost a frame, a write and a wakeup of the node per
    /// cycle.
    pub(super) fn ack_over_fabric(&mut self, node: &NodeName, acks: Vec<Ack>) -> Vec<Ack> {
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
                Some(_) if matches!(ack.state, AckState::Delivered | AckState::Receipted) => {}
                Some(index) => by_conn.entry(index as u64).or_default().push(ack),
                None => rest.push(ack),
            }
        }
        for (index, acks) in by_conn {
            self.send_acks(&conns[index as usize], &acks);
        }
        rest
    }

    pub(super) fn encoder(&mut self, kind: BatchKind) -> BatchEncoder {
        self.batch_seq += 1;
        let node = NodeName::new("ftss-server").expect("valid name");
        BatchEncoder::new(&BatchHeader { kind, node, epoch: self.epoch, batch_seq: self.batch_seq, flags: 0 })
    }

    /// Announces the inbox and ack files published since the last call in their nodes' bells (one
    /// write a node), so that nodes on NFS find them without listing a directory. A bell that
    /// cannot be written costs only time: the nodes' periodic sweep finds the files.
    pub(super) fn ring_bells(&mut self) {
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
    pub(super) fn ring_later(&mut self, node: NodeName, mut rings: Vec<Ring>) {
        let pending = self.pending_rings.entry(node).or_default();
        rings.append(pending);
        rings.truncate(RINGS_HELD_MAX);
        *pending = rings;
    }
}
