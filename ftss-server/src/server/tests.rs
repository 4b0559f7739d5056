//! Unit tests of the driver: the gate, and the server on the simulated disk.

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
        fabric_gather: GatherWait::Spin,
    }
}

/// A simulated disk installed on this thread, with its clock, and the directory the server uses
/// (its queue directory made).
struct SimWorld {
    disk: fsbridge::disk::sim::SimDisk,
    _installed: fsbridge::disk::sim::Installed,
    unix_us: u64,
    monotonic_us: u64,
    dir: PathBuf,
}

impl SimWorld {
    fn new() -> SimWorld {
        let disk = fsbridge::disk::sim::SimDisk::new(1, 1 << 30);
        let _installed = fsbridge::disk::sim::install(&disk);
        let mut world =
            SimWorld { disk, _installed, unix_us: 1_800_000_000_000_000, monotonic_us: 1_000_000, dir: "/sim".into() };
        world.tick(0);
        fsbridge::disk::create_dir_all(world.dir.join("queue")).unwrap();
        world
    }

    /// Moves both clocks on by `micros`.
    fn tick(&mut self, micros: u64) {
        (self.unix_us, self.monotonic_us) = (self.unix_us + micros, self.monotonic_us + micros);
        self.disk.set_clock(self.unix_us, self.monotonic_us);
    }
}

/// Registers nodes a (10.77.0.1) and b (10.77.0.2).
fn register_a_and_b(volume: &Volume) {
    for (name, addr) in [("a", "10.77.0.1"), ("b", "10.77.0.2")] {
        let config = fsbridge::NodeConfig { addr: addr.parse().unwrap() };
        volume.register_node(&NodeName::new(name).unwrap(), &config).unwrap();
    }
}

/// Publishes one outbox file of node a with `count` packets for 10.77.0.2:9000.
fn outbox_file(volume: &Volume, count: u64) -> PathBuf {
    outbox_batch(volume, 1, count)
}

/// Publishes outbox file `batch` of node a with `count` packets for 10.77.0.2:9000 (ids
/// `batch * 1000 + 1…`).
fn outbox_batch(volume: &Volume, batch: u64, count: u64) -> PathBuf {
    register_a_and_b(volume);
    let bytes = packet_batch("a", batch, count);
    volume.outbox(&NodeName::new("a").unwrap()).publish(&batch_file_name(7, batch, "pkt"), &bytes).unwrap()
}

/// An outbox batch of node `from` (a or b) with `count` packets for the other node's port 9000
/// (epoch 7, ids `batch * 1000 + 1…`).
fn packet_batch(from: &str, batch: u64, count: u64) -> Vec<u8> {
    packet_batch_with_flags(from, batch, count, 0)
}

/// [`packet_batch`] with the header's `flags` (whether the sender wants acks).
fn packet_batch_with_flags(from: &str, batch: u64, count: u64, flags: u8) -> Vec<u8> {
    let node = NodeName::new(from).unwrap();
    let (source, destination) = match from {
        "a" => ("10.77.0.1:5000", "10.77.0.2:9000"),
        _ => ("10.77.0.2:5000", "10.77.0.1:9000"),
    };
    let header = BatchHeader { kind: BatchKind::Packets, node: node.clone(), epoch: 7, batch_seq: batch, flags };
    let mut encoder = BatchEncoder::new(&header);
    for seq in batch * 1000 + 1..=batch * 1000 + count {
        encoder.push(&Record::Packet(Packet {
            id: PacketId { origin: node.clone(), epoch: 7, seq },
            source: source.parse().unwrap(),
            destination: destination.parse().unwrap(),
            sent_unix_us: seq,
            payload: vec![b'x'; 10],
        }));
    }
    encoder.finish()
}

/// A server on the simulated disk with nodes a and b registered, after its first cycle; and its
/// poll interval in µs.
fn sim_server_after_one_cycle() -> (SimWorld, Server, u64) {
    let world = SimWorld::new();
    let config = config(&world.dir);
    let poll_us = config.poll.as_micros() as u64;
    let mut server = Server::open(config).unwrap();
    register_a_and_b(&server.volume);
    server.cycle();
    (world, server, poll_us)
}

/// Fabric and gateway traffic wake the server far more often than the poll interval; listing
/// every node's outbox and receipts on each of those cycles cost a tenth of its CPU. The volume
/// is read again at once after a read that found something, and otherwise once the poll interval
/// has passed.
#[test]
fn the_volume_is_read_again_at_once_only_after_a_read_that_found_something() {
    let (mut world, mut server, poll_us) = sim_server_after_one_cycle();
    outbox_batch(&server.volume, 1, 3);
    server.cycle();
    assert_eq!(server.index.len(), 0, "the volume was read again within the poll interval after finding nothing");
    world.tick(poll_us - 1);
    server.cycle();
    assert_eq!(server.index.len(), 0, "the volume was read again within the poll interval after finding nothing");
    world.tick(1);
    server.cycle();
    assert_eq!(server.index.len(), 3, "the volume was not read once the poll interval had passed");
    outbox_batch(&server.volume, 2, 2);
    server.cycle();
    assert_eq!(server.index.len(), 5, "a read that found files was not followed by another at once");
    server.cycle();
    outbox_batch(&server.volume, 3, 1);
    server.cycle();
    assert_eq!(server.index.len(), 5);
    world.tick(poll_us);
    server.cycle();
    assert_eq!(server.index.len(), 6);
}

/// Listing every spool of every node at each of those cycles was most of the server's system
/// calls at 8 busy senders (about 40 of 57 a cycle with two nodes). Between polls only the
/// spools that found something at their last read (or that inotify names) are read again.
#[test]
fn between_polls_only_the_spools_that_found_something_are_read_again() {
    let (mut world, mut server, poll_us) = sim_server_after_one_cycle();
    world.tick(poll_us);
    outbox_batch(&server.volume, 1, 3);
    server.cycle();
    assert_eq!(server.index.len(), 3, "a read at the poll interval missed node a's outbox");
    let b = NodeName::new("b").unwrap();
    server.volume.outbox(&b).publish(&batch_file_name(7, 1, "pkt"), &packet_batch("b", 1, 2)).unwrap();
    outbox_batch(&server.volume, 2, 1);
    server.cycle();
    assert_eq!(server.index.len(), 4, "node a's outbox (busy at its last read) must be read, node b's not yet");
    server.cycle();
    assert_eq!(server.index.len(), 4);
    world.tick(poll_us);
    server.cycle();
    assert_eq!(server.index.len(), 6, "node b's outbox was not read at the poll interval");
}

/// A read is bounded (files a cycle, bytes a cycle): what it leaves is read at the next cycle,
/// not at the next poll, though no event comes for it.
#[test]
fn a_spool_left_with_files_by_the_cycles_bound_is_read_again_at_once() {
    let world = SimWorld::new();
    let mut server = Server::open(config(&world.dir)).unwrap();
    register_a_and_b(&server.volume);
    server.cycle();
    let files = DRAIN_FILES_PER_NODE_MAX as u64 * 2 + 1;
    for batch in 1..=files {
        outbox_batch(&server.volume, batch, 1);
    }
    // Within the poll interval from here on: the first read is the only one the poll gives.
    server.volume_reads.keep((NodeName::new("a").unwrap(), Area::Outbox));
    run_cycles(&mut server, 3);
    assert_eq!(server.index.len() as u64, files, "files left by a bounded read waited for the poll");
}

/// A directory on the real file system (inotify raises no events for the simulated disk).
fn real_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ftss-server-{tag}-{}-{}", std::process::id(), fsbridge::random_u64()));
    std::fs::create_dir_all(dir.join("queue")).unwrap();
    dir
}

/// Runs `count` cycles of `server` back to back.
fn run_cycles(server: &mut Server, count: usize) {
    for _ in 0..count {
        server.cycle();
    }
}

/// A server on a real directory (inotify works there) with nodes a and b registered, polling once
/// an hour: what it reads between polls is what its events and its own keep rule name.
fn hour_poll_server(tag: &str) -> (PathBuf, Server) {
    let dir = real_dir(tag);
    let mut config = config(&dir);
    config.poll = Duration::from_secs(3600);
    let server = Server::open(config).unwrap();
    register_a_and_b(&server.volume);
    (dir, server)
}

/// Between polls the server reads the spools inotify names. With a poll of an hour, each kind of
/// write a node makes (an outbox file, a log append, a receipt) must still be taken at the next
/// cycle, including into a log directory made after the server began.
#[test]
fn with_a_poll_of_an_hour_every_kind_of_spool_written_is_read_at_the_next_cycle() {
    let (dir, mut server) = hour_poll_server("spots");
    let (a, b) = (NodeName::new("a").unwrap(), NodeName::new("b").unwrap());
    server.cycle();
    server.cycle();
    outbox_batch(&server.volume, 1, 3);
    server.cycle();
    assert_eq!(server.index.len(), 3, "an outbox file");
    server.volume.outbox(&b).publish(&batch_file_name(7, 1, "pkt"), &packet_batch("b", 1, 2)).unwrap();
    server.cycle();
    assert_eq!(server.index.len(), 5, "another node's outbox file");
    let mut log = fsbridge::log::LogWriter::new(server.volume.outbox(&a).dir(), 8);
    log.append(&packet_batch("a", 2, 4)).unwrap();
    server.cycle();
    assert_eq!(server.index.len(), 9, "the first frame of a new log directory");
    run_cycles(&mut server, 3);
    log.append(&packet_batch("a", 3, 1)).unwrap();
    server.cycle();
    assert_eq!(server.index.len(), 10, "an append to a log segment");
    run_cycles(&mut server, 3);
    let delivered: Vec<PacketId> = handed_on(inbox_packets(&server.volume, "b"));
    assert_eq!(delivered.len(), 8, "node a's packets went into b's inbox");
    let header = BatchHeader { kind: BatchKind::Receipts, node: b.clone(), epoch: 9, batch_seq: 1, flags: 0 };
    let mut encoder = BatchEncoder::new(&header);
    for id in delivered {
        encoder.push(&Record::Receipt(id));
    }
    server.volume.receipts(&b).publish(&batch_file_name(9, 1, "rcpt"), &encoder.finish()).unwrap();
    server.cycle();
    assert_eq!(server.counters.receipted, 8, "a receipt file");
    std::fs::remove_dir_all(dir).unwrap();
}

/// A writer's segments are read one at a time, the lowest first. The cycle that finds a segment's
/// seal removes it; the writer's next segment, on disk already (its events taken with the seal's),
/// must be read at the next cycle, not at the next poll.
#[test]
fn after_a_log_segment_is_finished_the_writers_next_segment_is_read_at_the_next_cycle() {
    let (dir, mut server) = hour_poll_server("next-segment");
    let a = NodeName::new("a").unwrap();
    server.cycle();
    let mut log = fsbridge::log::LogWriter::new(server.volume.outbox(&a).dir(), 8);
    log.append(&packet_batch("a", 1, 2)).unwrap();
    server.cycle();
    assert_eq!(server.index.len(), 2, "the first segment's frame");
    run_cycles(&mut server, 3);
    // The writer seals its segment and starts the next with a frame, between two cycles.
    log.seal();
    log.append(&packet_batch("a", 2, 3)).unwrap();
    run_cycles(&mut server, 3);
    assert_eq!(server.index.len(), 5, "the next segment waited for the poll");
    std::fs::remove_dir_all(dir).unwrap();
}

/// A node may replace its spool directory with a symlink (to make the server drain, and then
/// remove, files elsewhere). Full reads check every node's directories first; a cycle between
/// polls must check them too when events came from the directories that hold the spools.
#[test]
fn a_spool_directory_replaced_by_a_symlink_between_polls_is_quarantined_not_read() {
    let (dir, mut server) = hour_poll_server("symlink");
    let b = NodeName::new("b").unwrap();
    server.cycle();
    server.volume.outbox(&b).publish(&batch_file_name(7, 1, "pkt"), &packet_batch("b", 1, 2)).unwrap();
    server.cycle();
    assert_eq!(server.index.len(), 2);
    let secret = dir.join("secret");
    std::fs::create_dir_all(&secret).unwrap();
    std::fs::write(secret.join(batch_file_name(7, 2, "pkt")), packet_batch("b", 2, 1)).unwrap();
    let new_dir = server.volume.outbox(&b).new_dir();
    std::fs::rename(&new_dir, new_dir.with_file_name("moved")).unwrap();
    std::os::unix::fs::symlink(&secret, &new_dir).unwrap();
    server.cycle();
    assert_eq!(server.index.len(), 2, "a file behind the symlink was drained");
    assert!(secret.join(batch_file_name(7, 2, "pkt")).exists(), "a file behind the symlink was removed");
    assert!(!new_dir.is_symlink(), "the symlink was not quarantined");
    // The node makes its outbox again: watched again, and read at the next cycle.
    std::fs::create_dir_all(&new_dir).unwrap();
    server.cycle();
    server.volume.outbox(&b).publish(&batch_file_name(7, 3, "pkt"), &packet_batch("b", 3, 1)).unwrap();
    server.cycle();
    assert_eq!(server.index.len(), 3, "the outbox made again was not read before the poll");
    std::fs::remove_dir_all(dir).unwrap();
}

/// Found by the spool simulator: an outbox file that could not be read for a moment (EIO
/// from the volume) was quarantined as if its bytes were bad, so its packets, durable on the
/// volume and acked to the sender, were never delivered. A read error leaves the file in line.
#[test]
fn an_outbox_file_that_cannot_be_read_for_a_while_is_drained_later_not_quarantined() {
    use fsbridge::disk::sim::Call;
    let mut world = SimWorld::new();
    let mut server = Server::open(config(&world.dir)).unwrap();
    let file = outbox_file(&server.volume, 3);
    world.disk.break_calls(&file, Call::Read, libc::EIO);
    server.cycle();
    assert_eq!(server.counters.quarantined, 0, "a file the volume failed to read was quarantined");
    assert!(world.disk.peek(&file).is_some(), "the file left its outbox");
    assert_eq!(server.index.len(), 0);
    world.disk.repair();
    // Read again at the next poll.
    world.tick(1_000_000);
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
    use fsbridge::disk::sim::Call;
    let mut world = SimWorld::new();
    let mut config = config(&world.dir);
    config.hold = Duration::from_secs(1);
    let mut server = Server::open(config).unwrap();
    register_a_and_b(&server.volume);
    server.cycle();
    let b = server.volume.node_dir(&NodeName::new("b").unwrap()).join("node.toml");
    world.disk.break_calls(&b, Call::Read, libc::EIO);
    outbox_file(&server.volume, 3);
    for _ in 0..3 {
        world.tick(2_000_000);
        server.cycle();
    }
    assert_eq!(server.counters.dead_lettered, 0, "packets for a registered node were dead-lettered");
    assert_eq!(server.counters.delivered, 3);
    world.disk.repair();
}

/// Found by the spool simulator: the hold for an unregistered address was counted from each
/// packet's store time, so when a restarted server failed its first read of a node's
/// registration, every packet for that node older than the hold was dead-lettered at once.
/// The hold now counts from when this server found the address unregistered.
#[test]
fn packets_are_held_for_the_hold_time_from_when_their_address_was_found_unregistered() {
    use fsbridge::disk::sim::Call;
    let mut world = SimWorld::new();
    let dir = world.dir.clone();
    let mut config = config(&dir);
    config.hold = Duration::from_secs(3);
    let mut server = Server::open(config.clone()).unwrap();
    outbox_file(&server.volume, 3);
    server.cycle();
    assert_eq!(server.index.len(), 3);
    drop(server);
    world.tick(10_000_000);
    let b = dir.join("volume/nodes/b/node.toml");
    world.disk.break_calls(&b, Call::Read, libc::EIO);
    let mut server = Server::open(config).unwrap();
    for _ in 0..2 {
        server.cycle();
        world.tick(1_000_000);
    }
    assert_eq!(server.counters.dead_lettered, 0, "dead-lettered before the hold time passed");
    world.disk.repair();
    world.tick(1_000_000);
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

/// ftss-node asks for "stored" acks only (`FLAG_STORED_ACKS_ONLY`): it bounds what it has written
/// and not yet seen stored, and the delivered and receipted acks a shim in `guaranteed` mode gets
/// would be ack files written for nothing. A shim's epoch still gets them.
#[test]
fn a_sender_asking_for_stored_acks_only_gets_no_delivered_acks() {
    use fsbridge::format::{FLAG_STORED_ACKS_ONLY, FLAG_WANTS_ACKS};
    let mut world = SimWorld::new();
    let mut server = Server::open(config(&world.dir)).unwrap();
    register_a_and_b(&server.volume);
    let node = NodeName::new("a").unwrap();
    for (epoch, flags) in [(7u64, FLAG_WANTS_ACKS), (8, FLAG_WANTS_ACKS | FLAG_STORED_ACKS_ONLY)] {
        let header = BatchHeader { kind: BatchKind::Packets, node: node.clone(), epoch, batch_seq: 1, flags };
        let mut encoder = BatchEncoder::new(&header);
        encoder.push(&Record::Packet(Packet {
            id: PacketId { origin: node.clone(), epoch, seq: 1 },
            source: "10.77.0.1:5000".parse().unwrap(),
            destination: "10.77.0.2:9000".parse().unwrap(),
            sent_unix_us: 1,
            payload: vec![b'x'; 10],
        }));
        server.volume.outbox(&node).publish(&batch_file_name(epoch, 1, "pkt"), &encoder.finish()).unwrap();
    }
    for _ in 0..4 {
        server.cycle();
        world.tick(20_000);
    }
    assert_eq!(server.counters.delivered, 2);
    let acks = server.volume.acks(&node);
    let mut states: std::collections::BTreeSet<(u64, u8)> = Default::default();
    for name in acks.list(usize::MAX).unwrap() {
        let batch = fsbridge::format::decode_batch(&acks.read(&name).unwrap().unwrap()).unwrap();
        for record in batch.records {
            if let Record::Ack(ack) = record {
                states.insert((ack.id.epoch, ack.state as u8));
            }
        }
    }
    let expected: std::collections::BTreeSet<(u64, u8)> =
        [(7, AckState::Stored as u8), (7, AckState::Delivered as u8), (8, AckState::Stored as u8)]
            .into_iter()
            .collect();
    assert_eq!(states, expected);
}

/// A receiver that keeps up leaves the active segment with nothing live after most cycles; a new
/// segment was started (and the old one deleted) each time, 40 % of the server's time in the
/// ftss-node bench. Now at most once a second, and the receipted bytes still go.
#[test]
fn an_idle_active_segment_is_replaced_at_most_once_a_second() {
    let mut world = SimWorld::new();
    let mut server = Server::open(config(&world.dir)).unwrap();
    let b = NodeName::new("b").unwrap();
    let first = server.queue.active_segment();
    let mut receipted = 0;
    for batch in 1..=20 {
        outbox_batch(&server.volume, batch, 5);
        server.cycle();
        let inbox = server.volume.inbox(&b, 9000);
        let header = BatchHeader { kind: BatchKind::Receipts, node: b.clone(), epoch: 9, batch_seq: batch, flags: 0 };
        let mut encoder = BatchEncoder::new(&header);
        for name in inbox.list(usize::MAX).unwrap() {
            let bytes = inbox.read(&name).unwrap().unwrap();
            for record in fsbridge::format::decode_batch(&bytes).unwrap().records {
                if let Record::Packet(packet) = record {
                    encoder.push(&Record::Receipt(packet.id));
                    receipted += 1;
                }
            }
            inbox.remove(&name).unwrap();
        }
        server.volume.receipts(&b).publish(&batch_file_name(9, batch, "rcpt"), &encoder.finish()).unwrap();
        world.tick(10_000);
        server.cycle();
        world.tick(10_000);
    }
    assert_eq!((receipted, server.counters.receipted), (100, 100));
    assert!(
        server.queue.active_segment() <= first + 1,
        "segments started in 400 ms: {}",
        server.queue.active_segment() - first
    );
    world.tick(1_000_000);
    server.cycle();
    server.cycle();
    assert_eq!(server.queue.segment_count(), 1, "the receipted packets' segment was not deleted");
}

/// Volume events (a new node directory, a `node.toml` written) make the registry be read again
/// soon, but not more often than every 10 ms, however many events come; without them, once a
/// second.
#[test]
fn the_registry_is_read_again_soon_after_an_event_but_not_at_every_event() {
    let mut world = SimWorld::new();
    let mut server = Server::open(config(&world.dir)).unwrap();
    server.refresh_registry().unwrap();
    let read_at = server.registry_loaded_at;
    world.tick(1_000);
    server.registry_woken = true;
    server.refresh_registry().unwrap();
    assert_eq!(server.registry_loaded_at, read_at, "read again 1 ms after the last read");
    world.tick(9_000);
    server.refresh_registry().unwrap();
    assert_ne!(server.registry_loaded_at, read_at, "not read again 10 ms after an event");
    assert!(!server.registry_woken);
    let read_at = server.registry_loaded_at;
    world.tick(500_000);
    server.refresh_registry().unwrap();
    assert_eq!(server.registry_loaded_at, read_at, "read again within a second with no event");
    world.tick(500_000);
    server.refresh_registry().unwrap();
    assert_ne!(server.registry_loaded_at, read_at, "not read again after a second");
}

/// An agent whose first batch held only refused IP packets never got their "rejected" acks: its
/// epoch was remembered from stored packets only, so the acks were dropped and the packets held
/// its window for 30 s. The refusal is counted once, and told.
#[test]
fn a_refused_ip_packet_is_told_to_a_sender_nothing_of_which_was_stored_yet() {
    use fsbridge::format::{FLAG_STORED_ACKS_ONLY, FLAG_WANTS_ACKS};
    let mut world = SimWorld::new();
    let mut server = Server::open(config(&world.dir)).unwrap();
    register_a_and_b(&server.volume);
    let node = NodeName::new("a").unwrap();
    let header = BatchHeader {
        kind: BatchKind::Packets,
        node: node.clone(),
        epoch: 5,
        batch_seq: 1,
        flags: FLAG_WANTS_ACKS | FLAG_STORED_ACKS_ONLY,
    };
    let mut encoder = BatchEncoder::new(&header);
    encoder.push(&Record::Packet(Packet {
        id: PacketId { origin: node.clone(), epoch: 5, seq: 1 },
        source: "10.77.0.1:0".parse().unwrap(),
        destination: "10.77.0.2:0".parse().unwrap(),
        sent_unix_us: 1,
        payload: b"not an IPv4 packet at all".to_vec(),
    }));
    server.volume.outbox(&node).publish(&batch_file_name(5, 1, "pkt"), &encoder.finish()).unwrap();
    for _ in 0..3 {
        server.cycle();
        world.tick(20_000);
    }
    assert_eq!(server.index.len(), 0);
    let counts = server.ip.get(&node).cloned().unwrap_or_default();
    assert_eq!(counts.refused.values().sum::<u64>(), 1, "{:?}", counts.refused);
    let acks = server.volume.acks(&node);
    let mut states = Vec::new();
    for name in acks.list(usize::MAX).unwrap() {
        for record in fsbridge::format::decode_batch(&acks.read(&name).unwrap().unwrap()).unwrap().records {
            if let Record::Ack(ack) = record {
                states.push((ack.id.seq, ack.state as u8));
            }
        }
    }
    states.sort();
    assert_eq!(states, vec![(1, AckState::Rejected as u8)]);
}

/// The packets in `node`'s inbox for port 9000, file by file in name order, as a receiving shim
/// reads them.
fn inbox_packets(volume: &Volume, node: &str) -> Vec<Vec<PacketId>> {
    let inbox = volume.inbox(&NodeName::new(node).unwrap(), 9000);
    let mut names = fsbridge::disk::read_dir_names(inbox.new_dir()).unwrap_or_default();
    names.sort();
    names
        .into_iter()
        .map(|name| {
            let bytes = fsbridge::disk::read(inbox.new_dir().join(name)).unwrap();
            let batch = fsbridge::format::decode_batch(&bytes).unwrap();
            batch
                .records
                .into_iter()
                .map(|record| match record {
                    Record::Packet(packet) => packet.id,
                    other => panic!("an inbox file holds packets, found {other:?}"),
                })
                .collect()
        })
        .collect()
}

/// The ids node a's `outbox_file` gives its 3 packets.
fn ids_1001_to_1003() -> Vec<PacketId> {
    (1001..=1003).map(|seq| PacketId { origin: NodeName::new("a").unwrap(), epoch: 7, seq }).collect()
}

/// What a receiving shim hands its app from `files`, read in order through its duplicate filter.
fn handed_on(files: Vec<Vec<PacketId>>) -> Vec<PacketId> {
    use fsbridge::dedupe::{Dedupe, Seen};
    let mut dedupe = Dedupe::new();
    let mut handed = Vec::new();
    for id in files.into_iter().flatten() {
        if dedupe.get(&id).is_none() {
            dedupe.set(&id, Seen::Received);
            handed.push(id);
        }
    }
    handed
}

/// A server on a simulated disk with node a's outbox file of 3 packets (`ids_1001_to_1003`) for
/// node b: the world, the server, the outbox file, its queue's one segment and its poll in µs.
fn one_outbox_file_and_the_queue_segment() -> (SimWorld, Server, PathBuf, PathBuf, u64) {
    let world = SimWorld::new();
    let server = Server::open(config(&world.dir)).unwrap();
    let outbox = outbox_file(&server.volume, 3);
    let segments = world.disk.files_in(&world.dir.join("queue"));
    assert_eq!(segments.len(), 1);
    let segment = segments[0].0.clone();
    let poll_us = server.config.poll.as_micros() as u64;
    (world, server, outbox, segment, poll_us)
}

/// A drained packet goes into its inbox before the queue's sync, so that the receiver reads it
/// while the sync runs; nothing is acked until the sync has returned. Here the server dies as it
/// enters that sync (kill -9; the files it wrote stay): the packets are in their inbox already
/// and the outbox file is still there. The restarted server recovers them from the queue, acks
/// them and delivers them again, and the receiving shim's duplicate filter hands each on once.
#[test]
fn packets_reach_their_inbox_before_the_queue_sync_and_are_acked_only_after_it() {
    use fsbridge::disk::sim::{Call, Crash};
    let (mut world, mut server, outbox, segment, poll_us) = one_outbox_file_and_the_queue_segment();
    world.disk.crash_at_next(&segment, Call::Sync);
    let died = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| server.cycle()));
    assert!(died.is_err_and(|payload| payload.is::<Crash>()), "the server did not reach the queue's sync");
    let volume = server.volume.clone();
    drop(server);
    assert_eq!(
        inbox_packets(&volume, "b"),
        vec![ids_1001_to_1003()],
        "the packets were not in their inbox when the queue's sync began"
    );
    assert!(world.disk.peek(&outbox).is_some(), "the outbox file went (acked) before the queue's sync");

    let mut server = Server::open(config(&world.dir)).unwrap();
    world.tick(poll_us);
    server.cycle();
    assert!(world.disk.peek(&outbox).is_none(), "the outbox file was not acked once its packets were durable");
    assert_eq!(server.index.len(), 3);
    let files = inbox_packets(&server.volume, "b");
    assert_eq!(files.len(), 2, "the restarted server did not deliver the packets again");
    assert_eq!(handed_on(files), ids_1001_to_1003(), "the receiving shim would hand a packet on twice, or miss one");
}

/// A group commit that fails after its packets went out ahead of it: nothing is acked, the next
/// cycle writes nothing out ahead (a queue whose syncs keep failing would otherwise write the same
/// packets every cycle), and once the packets are stored they count as in flight in the file they
/// already went into, so no second copy goes out while a receiver may hold that one claimed.
#[test]
fn after_a_failed_group_commit_its_packets_count_as_in_flight_in_the_file_they_went_into() {
    use fsbridge::disk::sim::Call;
    let (mut world, mut server, outbox, segment, poll_us) = one_outbox_file_and_the_queue_segment();
    // A full disk fails the sync once; the rollback that follows works.
    world.disk.fail_next(&segment, Call::Sync, libc::ENOSPC);
    server.cycle();
    assert_eq!(inbox_packets(&server.volume, "b"), vec![ids_1001_to_1003()]);
    assert!(world.disk.peek(&outbox).is_some(), "the outbox file went (acked) though the queue's sync failed");
    assert_eq!(server.index.len(), 0, "packets whose sync failed are queued");
    assert_eq!(server.counters.delivered, 0, "packets whose sync failed count as delivered");

    world.tick(poll_us);
    server.cycle();
    assert!(world.disk.peek(&outbox).is_none(), "the outbox file was not acked once its packets were durable");
    assert_eq!(server.index.len(), 3);
    assert_eq!(server.counters.delivered, 3, "the packets do not count as in flight in the file they went into");
    assert_eq!(
        inbox_packets(&server.volume, "b"),
        vec![ids_1001_to_1003()],
        "a second copy went out while the first could still be claimed"
    );
    // Not receipted: once the redelivery time has passed and the file was taken, they go again.
    let inbox = server.volume.inbox(&NodeName::new("b").unwrap(), 9000);
    for name in fsbridge::disk::read_dir_names(inbox.new_dir()).unwrap() {
        fsbridge::disk::remove_file(inbox.new_dir().join(name)).unwrap();
    }
    world.tick(server.config.redeliver_after.as_micros() as u64 + poll_us);
    server.cycle();
    assert_eq!(inbox_packets(&server.volume, "b"), vec![ids_1001_to_1003()]);
    assert_eq!(server.counters.redelivered, 3);
}

/// A queue whose group commits keep failing (its only mirror failed) must not write packets out
/// ahead of every attempt: each cycle drains the same unacked outbox again, and each copy would be
/// one more inbox file and one more pass of the receiver, for as long as the disk stays broken.
#[test]
fn while_group_commits_fail_nothing_goes_out_ahead_of_them() {
    use fsbridge::disk::sim::Call;
    let (mut world, mut server, _, segment, poll_us) = one_outbox_file_and_the_queue_segment();
    world.disk.break_calls(&segment, Call::Sync, libc::EIO);
    server.cycle();
    assert_eq!(inbox_packets(&server.volume, "b").len(), 1, "the first group did not go out ahead of its sync");
    outbox_batch(&server.volume, 2, 3);
    for _ in 0..3 {
        world.tick(poll_us);
        server.cycle();
    }
    assert_eq!(
        inbox_packets(&server.volume, "b").len(),
        1,
        "packets went out ahead of group commits that kept failing"
    );
    assert_eq!(server.index.len(), 0);
}

#[test]
fn the_wait_for_fabric_senders_spins_until_three_in_a_row_ran_out() {
    use super::links::gather_spins;
    assert!(gather_spins(GatherWait::Spin, 0));
    assert!(gather_spins(GatherWait::Spin, 2));
    assert!(!gather_spins(GatherWait::Spin, 3));
    assert!(!gather_spins(GatherWait::Spin, u32::MAX));
    assert!(!gather_spins(GatherWait::Sleep, 0));
}

/// With fabric senders waiting on a group, the cycle's deliveries go out before the group's sync.
/// A delivery through the gateway records its outcome with a sync of its own, which takes the
/// group's records with it; when that sync fails, they are rolled back with its own. The group
/// must then count as not stored (its own sync, finding nothing left to write, succeeds): nothing
/// acked, the outbox file kept, and the packets stored by a later cycle, as a restart shows.
#[test]
fn a_delivery_sync_that_fails_before_the_group_sync_leaves_the_group_unacked() {
    use fsbridge::disk::sim::Call;
    let mut world = SimWorld::new();
    let config = config(&world.dir);
    let poll_us = config.poll.as_micros() as u64;
    let mut server = Server::open(config.clone()).unwrap();
    register_a_and_b(&server.volume);
    let segment = world.disk.files_in(&world.dir.join("queue"))[0].0.clone();
    let a = NodeName::new("a").unwrap();
    // A datagram for an address outside the fabric (the gateway's; loopback here).
    let header = BatchHeader { kind: BatchKind::Packets, node: a.clone(), epoch: 7, batch_seq: 1, flags: 0 };
    let mut encoder = BatchEncoder::new(&header);
    let external = PacketId { origin: a.clone(), epoch: 7, seq: 1001 };
    encoder.push(&Record::Packet(Packet {
        id: external.clone(),
        source: "10.77.0.1:5000".parse().unwrap(),
        destination: "127.0.0.1:9".parse().unwrap(),
        sent_unix_us: 1,
        payload: vec![b'x'; 10],
    }));
    server.volume.outbox(&a).publish(&batch_file_name(7, 1, "pkt"), &encoder.finish()).unwrap();
    after_acking_fabric_senders(&mut server);
    server.cycle();
    // Stored, and not sent yet (sent, it would be done and out of the index).
    assert_eq!(server.index.len(), 1, "the gateway's datagram was not stored, or went out in the cycle that stored it");

    let outbox = outbox_batch(&server.volume, 2, 3);
    world.disk.fail_next(&segment, Call::Sync, libc::ENOSPC);
    world.tick(poll_us);
    after_acking_fabric_senders(&mut server);
    server.cycle();
    assert!(world.disk.peek(&outbox).is_some(), "the outbox file went (acked) though its records were rolled back");
    assert!(server.commit_failed, "the rolled-back group commit does not count as failed");
    for seq in 2001..=2003 {
        let id = PacketId { origin: a.clone(), epoch: 7, seq };
        assert!(!server.index.seen(&id), "packet {seq}, rolled back, is indexed as stored");
    }

    world.tick(poll_us);
    server.cycle();
    assert!(world.disk.peek(&outbox).is_none(), "the outbox file was not acked once its packets were durable");
    drop(server);
    let server = Server::open(config).unwrap();
    for seq in 2001..=2003 {
        let id = PacketId { origin: a.clone(), epoch: 7, seq };
        assert!(server.index.seen(&id), "packet {seq} was acked and is not in the queue after a restart");
    }
}

/// Makes the server's next cycle one of a closed loop of fabric senders: it waits for the senders
/// the last cycle acked (none here: the server has no fabric), and delivers before its sync.
fn after_acking_fabric_senders(server: &mut Server) {
    server.gather = Some(Gather { expected: 0, until: Instant::now() });
}

/// An instance that may no longer act delivers nothing more: its successor delivers, in its own
/// order. A cycle with fabric senders asks the gate before the deliveries it makes ahead of its
/// sync, as before writing packets out early, and makes none once the answer is no.
#[test]
fn a_deposed_instance_delivers_nothing_before_its_group_commit_either() {
    let (mut world, mut server, poll_us) = sim_server_after_one_cycle();
    // From a sender that waits for its acks, so not written out ahead of the sync.
    let bytes = packet_batch_with_flags("a", 1, 3, fsbridge::format::FLAG_WANTS_ACKS);
    let a = NodeName::new("a").unwrap();
    server.volume.outbox(&a).publish(&batch_file_name(7, 1, "pkt"), &bytes).unwrap();
    world.tick(poll_us);
    after_acking_fabric_senders(&mut server);
    server.cycle();
    assert_eq!(server.index.len(), 3);
    assert_eq!(server.counters.delivered, 0, "delivered in the cycle that stored them, with fabric senders waiting");

    let outbox = outbox_batch(&server.volume, 2, 3);
    server.set_gate(|| false);
    world.tick(poll_us);
    after_acking_fabric_senders(&mut server);
    server.cycle();
    assert!(server.deposed());
    assert!(world.disk.peek(&outbox).is_some(), "a deposed instance acked an outbox file");
    assert_eq!(server.counters.delivered, 0, "a deposed instance delivered");
    assert!(inbox_packets(&server.volume, "b").is_empty(), "a deposed instance wrote an inbox file");
}

/// A cycle with fabric senders delivers before its sync, while the receipts it took wait for that
/// sync to be applied. A packet whose receipt is among them must not go out again meanwhile,
/// though its redelivery is due: the receiver has it, and a second copy could reach a sibling
/// process on the same port, whose duplicate filter is not the first one's.
#[test]
fn a_packet_receipted_in_the_cycle_is_not_delivered_again_before_its_receipt_is_durable() {
    let (mut world, mut server, poll_us) = sim_server_after_one_cycle();
    outbox_batch(&server.volume, 1, 3);
    world.tick(poll_us);
    server.cycle();
    assert_eq!(inbox_packets(&server.volume, "b"), vec![ids_1001_to_1003()]);
    // The receiver took the file, and its receipts come late, after the redelivery time.
    let b = NodeName::new("b").unwrap();
    let inbox = server.volume.inbox(&b, 9000);
    for name in fsbridge::disk::read_dir_names(inbox.new_dir()).unwrap() {
        fsbridge::disk::remove_file(inbox.new_dir().join(name)).unwrap();
    }
    world.tick(server.config.redeliver_after.as_micros() as u64 + poll_us);
    let header = BatchHeader { kind: BatchKind::Receipts, node: b.clone(), epoch: 9, batch_seq: 1, flags: 0 };
    let mut encoder = BatchEncoder::new(&header);
    for id in ids_1001_to_1003() {
        encoder.push(&Record::Receipt(id));
    }
    server.volume.receipts(&b).publish(&batch_file_name(9, 1, "rcpt"), &encoder.finish()).unwrap();
    after_acking_fabric_senders(&mut server);
    server.cycle();
    assert_eq!(server.counters.receipted, 3);
    assert_eq!(server.counters.redelivered, 0, "receipted packets were delivered again");
    assert!(inbox_packets(&server.volume, "b").is_empty(), "a receipted packet went out again");
    assert_eq!(server.index.len(), 0);
}
