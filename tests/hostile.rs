//! Hostile and broken input on the volume: each bad file is quarantined with a reason and counted in
//! status, nothing else is lost, and the server keeps running.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::apps::*;
use common::*;
use fsbridge::format::BatchEncoder;
use fsbridge::{BatchHeader, BatchKind, NodeName, Packet, PacketId, Record};

fn node(name: &str) -> NodeName {
    NodeName::new(name).unwrap()
}

/// A valid packet batch as a writer named `origin` would make it.
fn batch(origin: &str, epoch: u64, packets: &[(&str, &str, &[u8])]) -> Vec<u8> {
    let header = BatchHeader { kind: BatchKind::Packets, node: node(origin), epoch, batch_seq: 1, flags: 0 };
    let mut encoder = BatchEncoder::new(&header);
    for (seq, (source, destination, payload)) in packets.iter().enumerate() {
        encoder.push(&Record::Packet(Packet {
            id: PacketId { origin: node(origin), epoch, seq: seq as u64 + 1 },
            source: source.parse().unwrap(),
            destination: destination.parse().unwrap(),
            sent_unix_us: fsbridge::unix_now_us(),
            payload: payload.to_vec(),
        }));
    }
    encoder.finish()
}

fn outbox(fabric: &Fabric, node: &str) -> PathBuf {
    fabric.volume.join("nodes").join(node).join("out")
}

/// Publishes `bytes` into a spool the way a writer would: tmp/ then rename into new/.
fn drop_file(spool: &Path, name: &str, bytes: &[u8]) {
    std::fs::create_dir_all(spool.join("tmp")).unwrap();
    std::fs::create_dir_all(spool.join("new")).unwrap();
    let tmp = spool.join("tmp").join(name);
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, spool.join("new").join(name)).unwrap();
}

fn register(fabric: &Fabric, name: &str, addr: &str) {
    let volume = fsbridge::Volume::new(&fabric.volume);
    volume.register_node(&node(name), &fsbridge::NodeConfig { addr: addr.parse().unwrap() }).unwrap();
}

/// Reasons of every quarantined file, by original file name.
fn quarantine_reasons(fabric: &Fabric) -> Vec<(String, String)> {
    let dir = fabric.volume.join("quarantine");
    let mut reasons = Vec::new();
    for name in files_in(&dir) {
        let Some(stem) = name.strip_suffix(".reason") else { continue };
        let text = std::fs::read_to_string(dir.join(&name)).unwrap();
        let file = text.lines().find_map(|line| line.strip_prefix("file: ")).unwrap_or_default();
        let file = Path::new(file).file_name().unwrap().to_string_lossy().into_owned();
        let reason = text.lines().find_map(|line| line.strip_prefix("reason: ")).unwrap_or_default().to_owned();
        assert!(dir.join(stem).symlink_metadata().is_ok(), "quarantined file {stem} missing beside its reason");
        reasons.push((file, reason));
    }
    reasons
}

fn file_name(seq: u64) -> String {
    fsbridge::layout::batch_file_name(0xBAD, seq, "pkt")
}

#[test]
fn every_kind_of_bad_outbox_file_is_quarantined_with_its_reason() {
    let mut fabric = Fabric::new("hostile");
    register(&fabric, "a", "10.77.0.1");
    register(&fabric, "b", "10.77.0.2");
    fabric.start_server();
    let good = batch("a", 0xBAD, &[("10.77.0.1:1", "10.77.0.2:9", b"hello")]);
    let header_len = BatchEncoder::new(&BatchHeader {
        kind: BatchKind::Packets,
        node: node("a"),
        epoch: 0xBAD,
        batch_seq: 1,
        flags: 0,
    })
    .len_bytes();
    let outside = fabric.dir.0.join("outside-the-volume");
    std::fs::write(&outside, b"secret").unwrap();

    let mut random = vec![0u8; 4096];
    let mut state = 0x1234_5678_9ABC_DEF1u64;
    for byte in &mut random {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        *byte = state as u8;
    }
    let mut crc = good.clone();
    crc[good.len() - 20] ^= 0x40;
    let mut huge = good.clone();
    huge[header_len + 1..header_len + 5].copy_from_slice(&u32::MAX.to_le_bytes());
    let mut version = good.clone();
    version[4] = 99;

    let out = outbox(&fabric, "a");
    let cases: Vec<(String, Vec<u8>, &str)> = vec![
        (file_name(1), random, "bad magic"),
        (file_name(2), good[..good.len() - 7].to_vec(), "truncated"),
        (file_name(3), crc, "crc32c mismatch"),
        (file_name(4), huge, "exceeds the limit"),
        (file_name(5), Vec::new(), "truncated"),
        (file_name(6), version, "unsupported batch version 99"),
        ("a..b.pkt".into(), good.clone(), "unexpected file name"),
    ];
    for (name, bytes, _) in &cases {
        drop_file(&out, name, bytes);
    }
    std::os::unix::fs::symlink(&outside, out.join("new").join(file_name(7))).unwrap();
    std::fs::create_dir_all(out.join("new").join(file_name(8))).unwrap();
    std::fs::write(out.join("new").join("..sneaky"), &good).unwrap();
    std::fs::create_dir_all(fabric.volume.join("nodes/b/rcpt/new").join("0000000000000001-0000000000000001.rcpt"))
        .unwrap();

    let expected_count = cases.len() + 4;
    assert!(
        wait_until(Duration::from_secs(20), || fabric.counter("quarantined") as usize >= expected_count),
        "{}",
        fabric.status()
    );
    let reasons = quarantine_reasons(&fabric);
    for (name, _, reason) in &cases {
        let found = reasons.iter().find(|(file, _)| file == name);
        assert!(found.is_some_and(|(_, text)| text.contains(reason)), "{name}: want {reason:?}, have {found:?}");
    }
    for (name, reason) in [
        (file_name(7), "is not a regular file"),
        (file_name(8), "is not a regular file"),
        ("..sneaky".to_string(), "hidden file"),
        ("0000000000000001-0000000000000001.rcpt".to_string(), "is not a regular file"),
    ] {
        let found = reasons.iter().find(|(file, _)| *file == name);
        assert!(found.is_some_and(|(_, text)| text.contains(reason)), "{name}: want {reason:?}, have {found:?}");
    }
    assert_eq!(std::fs::read(&outside).unwrap(), b"secret", "the symlink's target was touched");
    assert_eq!(fabric.status()["quarantine_files"], expected_count as u64);
    assert!(files_in(&out.join("new")).is_empty(), "bad files left in the outbox");
    assert!(fabric.server.as_mut().unwrap().child.try_wait().unwrap().is_none(), "server died");

    // Good traffic still flows.
    let (mut listener, received) = nc_listener(&fabric, "b", "10.77.0.2", 9200);
    std::thread::sleep(Duration::from_millis(300));
    let lines: Vec<String> = (0..20).map(|index| format!("still-working-{index}")).collect();
    assert!(nc_send_lines(&fabric, "a", "10.77.0.1", "10.77.0.2", 9200, &lines));
    assert!(wait_until(Duration::from_secs(20), || received.count() >= lines.len()));
    assert_eq!(received.lines(), lines);
    listener.kill();
}

#[test]
fn a_file_claiming_another_source_is_stamped_with_the_outbox_it_came_from() {
    let mut fabric = Fabric::new("impersonate");
    register(&fabric, "a", "10.77.0.1");
    fabric.start_server();
    let receiver = Receiver::start_with_source(&fabric, "c", "10.77.0.3", 9300);
    let received = &receiver.lines;

    // Node a writes a file that says it comes from node b at 10.77.0.2.
    drop_file(
        &outbox(&fabric, "a"),
        &file_name(1),
        &batch("b", 0xBAD, &[("10.77.0.2:4444", "10.77.0.3:9300", b"forged")]),
    );
    assert!(wait_until(Duration::from_secs(20), || received.count() >= 2), "not delivered: {}", fabric.status());
    assert_eq!(received.lines()[1], "10.77.0.1 4444 forged", "the source was not stamped from the outbox");
    assert_eq!(fabric.counter("quarantined"), 0);
}

#[test]
fn a_million_tiny_files_are_drained_in_bounded_batches_with_bounded_memory() {
    let mut fabric = Fabric::new("million");
    register(&fabric, "a", "10.77.0.1");
    let count: u64 = std::env::var("FTSS_MILLION").ok().and_then(|text| text.parse().ok()).unwrap_or(1_000_000);
    let out = outbox(&fabric, "a");
    std::fs::create_dir_all(out.join("new")).unwrap();
    // One datagram per file, to a destination nobody has registered (held in the queue).
    let started = std::time::Instant::now();
    for seq in 1..=count {
        let bytes = tiny_batch(seq);
        std::fs::write(out.join("new").join(fsbridge::layout::batch_file_name(0xF1, seq, "pkt")), bytes).unwrap();
    }
    eprintln!("wrote {count} files in {:?}", started.elapsed());
    fabric.start_server();
    let pid = fabric.server.as_ref().unwrap().child.id();
    // `status` counts the outbox, a scan of up to a million names: poll it gently.
    let deadline = std::time::Instant::now() + Duration::from_secs(1200);
    while fabric.counter("stored") < count && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_secs(2));
    }
    let drained = fabric.counter("stored") >= count;
    eprintln!("drained in {:?}: {}", started.elapsed(), fabric.status()["counters"]);
    assert!(drained, "only {} of {count} stored", fabric.counter("stored"));
    assert_eq!(fabric.counter("quarantined"), 0);
    assert!(files_in(&out.join("new")).is_empty());
    let peak_kib = peak_rss_kib(pid);
    eprintln!("server peak RSS {peak_kib} KiB for {count} files");
    assert!(peak_kib < 128 * 1024, "server peak RSS {peak_kib} KiB: memory is not bounded");
}

/// A one-packet batch whose packet has sequence number `seq`.
fn tiny_batch(seq: u64) -> Vec<u8> {
    let header = BatchHeader { kind: BatchKind::Packets, node: node("a"), epoch: 0xF1, batch_seq: seq, flags: 0 };
    let mut encoder = BatchEncoder::new(&header);
    encoder.push(&Record::Packet(Packet {
        id: PacketId { origin: node("a"), epoch: 0xF1, seq },
        source: "10.77.0.1:1".parse().unwrap(),
        destination: "10.77.99.1:9".parse().unwrap(),
        sent_unix_us: 0,
        payload: b"t".to_vec(),
    }));
    encoder.finish()
}
