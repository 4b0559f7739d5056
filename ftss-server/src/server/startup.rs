//! Opening the server: recovering the queue and replaying it into the index and the book.

use super::*;

impl Server {
    /// Opens the queue (recovering it) and the volume.
    pub fn open(config: Config) -> Result<Server, ServerError> {
        let volume = Volume::new(&config.volume);
        volume.create()?;
        let (queue, recovered, recovery) = Queue::open(&config.queue_dirs)?;
        let gateway = Gateway::open(&config.ingress)?;
        let book = Book::new(config.retain);
        let config_partition = config.partition;
        let volume_nodes_dir = volume.nodes_dir();
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
            registry: Registry::default(),
            node_errors: HashMap::default(),
            holds: Holds::default(),
            gate: None,
            deposed: false,
            outbox_backlog: HashMap::default(),
            pending_acks: BTreeMap::new(),
            bells: HashMap::default(),
            pending_rings: BTreeMap::new(),
            arrivals_kept: Vec::new(),
            registry_loaded_at: None,
            registry_woken: false,
            volume_reads: VolumeReads::default(),
            watcher: Watcher::new(volume_nodes_dir),
            status_written_at: None,
            resync_checked_at: monotonic_now(),
            housekept_at: None,
            idle_rotated_at: None,
            counters: Counters::default(),
            samples: VecDeque::new(),
            dead_letters: VecDeque::new(),
            ip: BTreeMap::new(),
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
            clock: CycleClock::default(),
            metrics: None,
            active: None,
            gateway_seq: 0,
            fabric,
            fabric_turn: 0,
            ack_epochs: HashMap::default(),
            ack_epoch_order: VecDeque::new(),
            logs: Logs::default(),
            inbox_files: HashMap::default(),
            gather: None,
            gathers_ran_out: 0,
            last_sync: Duration::ZERO,
            commit_failed: false,
            early_aborted: HashMap::default(),
            early_aborted_order: VecDeque::new(),
            delivered_ahead: 0,
            delivered_before_sync: None,
            receipted_unsynced: HashSet::default(),
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
    pub(super) fn replay(&mut self, recovered: Vec<crate::queue::Recovered>) {
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

    pub(super) fn insert(&mut self, packet: &Packet, location: Location, stored_unix_us: u64) {
        if self.index.insert(&packet.id, entry(packet, location, stored_unix_us)) {
            self.book.stored(location.segment);
        }
    }

    /// The packet is receipted or dead-lettered: it leaves the queue (its bytes may be retained).
    /// `destination` finds packets that were never delivered (dead letters, egress).
    pub(super) fn finish(
        &mut self,
        id: &PacketId,
        outcome: Outcome,
        at_unix_us: u64,
        destination: Option<SocketAddrV4>,
    ) {
        if let Some(entry) = self.index.remove(id, destination) {
            self.finished(entry, outcome, at_unix_us);
        }
    }

    /// A packet removed from the index: its bytes are retained or its segment released.
    pub(super) fn finished(&mut self, entry: Entry, outcome: Outcome, at_unix_us: u64) {
        self.book.finished(entry.location.segment, outcome, at_unix_us);
    }
}
