//! Outbox logs (the shim's default outbox): damaged and hostile segments are quarantined with a
//! reason while every sound frame around them is delivered; a sender killed with SIGKILL leaves
//! its segment unsealed, and the server drains it and removes it after the abandon time.

mod common;

use std::collections::HashSet;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use common::apps::*;
use common::*;
use fsbridge::format::BatchEncoder;
use fsbridge::log::{FRAME_HEAD_BYTES, LogWriter, SEGMENT_HEADER_BYTES, segment_name};
use fsbridge::{BatchHeader, BatchKind, NodeName, Packet, PacketId, Record};

fn node(name: &str) -> NodeName {
    NodeName::new(name).unwrap()
}

/// One packet batch from node a to b:9 with `payload`, as a shim would write it.
fn batch(epoch: u64, seq: u64, payload: &str) -> Vec<u8> {
    let header = BatchHeader { kind: BatchKind::Packets, node: node("a"), epoch, batch_seq: seq, flags: 0 };
    let mut encoder = BatchEncoder::new(&header);
    encoder.push(&Record::Packet(Packet {
        id: PacketId { origin: node("a"), epoch, seq },
        source: "10.77.0.1:1".parse().unwrap(),
        destination: "10.77.0.2:9".parse().unwrap(),
        sent_unix_us: fsbridge::unix_now_us(),
        payload: format!("{payload}\n").into_bytes(),
    }));
    encoder.finish()
}

fn register(fabric: &Fabric, name: &str, addr: &str) {
    let volume = fsbridge::Volume::new(&fabric.volume);
    volume.register_node(&node(name), &fsbridge::NodeConfig { addr: addr.parse().unwrap() }).unwrap();
}

fn quarantine_reasons(volume: &Path) -> String {
    let dir = volume.join("quarantine");
    files_in(&dir)
        .iter()
        .filter(|name| name.ends_with(".reason"))
        .map(|name| std::fs::read_to_string(dir.join(name)).unwrap())
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn damaged_and_hostile_segments_are_quarantined_and_every_sound_frame_is_delivered() {
    let mut fabric = Fabric::new("log-hostile");
    register(&fabric, "a", "10.77.0.1");
    register(&fabric, "b", "10.77.0.2");
    let (mut listener, received) = nc_listener(&fabric, "b", "10.77.0.2", 9);
    let outbox = fabric.volume.join("nodes/a/out");
    let log_dir = outbox.join("log");

    // Writer 1: three frames, the middle one damaged on disk, then a second segment.
    let mut writer = LogWriter::new(&outbox, 0x11);
    for (seq, payload) in [(1, "w1-a"), (2, "w1-damaged"), (3, "w1-b")] {
        writer.append(&batch(0x11, seq, payload)).unwrap();
    }
    let first = log_dir.join(segment_name(0x11, 1));
    let second_frame = SEGMENT_HEADER_BYTES + FRAME_HEAD_BYTES + batch(0x11, 1, "w1-a").len() as u64;
    let file = std::fs::OpenOptions::new().write(true).open(&first).unwrap();
    file.write_all_at(b"\xff\xff", second_frame + FRAME_HEAD_BYTES + 20).unwrap();
    writer.seal();
    writer.append(&batch(0x11, 4, "w1-c")).unwrap();
    writer.seal();

    // Writer 2: a frame whose checksum holds but whose batch is not a packet batch, between two
    // good ones.
    let mut writer = LogWriter::new(&outbox, 0x22);
    writer.append(&batch(0x22, 1, "w2-a")).unwrap();
    writer.append(b"FTSB not really a batch").unwrap();
    writer.append(&batch(0x22, 2, "w2-b")).unwrap();
    writer.seal();

    // Hostile files: a foreign name, a segment with a forged header, a symlink.
    std::fs::write(log_dir.join("junk.log"), b"junk").unwrap();
    std::fs::write(log_dir.join(segment_name(0x33, 1)), vec![0x55; 4096]).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", log_dir.join(segment_name(0x44, 1))).unwrap();

    fabric.start_server();
    let expected: HashSet<String> = ["w1-a", "w1-b", "w1-c", "w2-a", "w2-b"].into_iter().map(String::from).collect();
    assert!(
        wait_until(Duration::from_secs(30), || received.lines().into_iter().collect::<HashSet<_>>() == expected),
        "received {:?}",
        received.lines()
    );
    assert!(
        wait_until(Duration::from_secs(20), || files_in(&log_dir).is_empty()),
        "segments left: {:?}",
        files_in(&log_dir)
    );
    let reasons = quarantine_reasons(&fabric.volume);
    for wanted in [
        "fails its checksum",
        "batch",
        "unexpected file name in an outbox log directory",
        "bad segment header",
        "a symlink, not a file",
    ] {
        assert!(reasons.contains(wanted), "no quarantine reason {wanted:?} in:\n{reasons}");
    }
    // Status is rewritten a few times a second.
    assert!(wait_until(Duration::from_secs(5), || fabric.counter("quarantined") == 5), "{}", fabric.status());
    assert_eq!(received.lines().len(), 5, "a frame was delivered twice: {:?}", received.lines());
    assert!(fabric.server.as_mut().unwrap().child.try_wait().unwrap().is_none(), "server died");
    std::thread::sleep(Duration::from_millis(300));
    listener.kill();
}

#[test]
fn a_killed_senders_unsealed_log_is_drained_and_removed_after_the_abandon_time() {
    let mut fabric = Fabric::new("log-abandoned");
    // An abandon time shorter than a writer may legitimately stay quiet is refused.
    let refused = std::process::Command::new(server_path())
        .args(["run", "--volume"])
        .arg(&fabric.volume)
        .arg("--queue-dir")
        .arg(&fabric.queue_dirs[0])
        .args(["--log-abandon-after", "30s"])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("log-abandon-after: at least 360s"), "{stderr}");
    fabric.start_server();
    let receiver = Receiver::start(&fabric, 7950);
    let mut sender = Sender::start(&fabric, 7950, "k", 100_000, 0);
    assert!(wait_until(Duration::from_secs(30), || sender.acknowledged().len() >= 500));
    sender.proc.kill();
    let acknowledged = sender.acknowledged();
    let log_dir = fabric.volume.join("nodes/a/out/log");
    assert!(!files_in(&log_dir).is_empty(), "the killed sender's segment is there");
    assert!(
        wait_until(Duration::from_secs(60), || {
            let got: HashSet<String> = receiver.payloads().into_iter().collect();
            acknowledged.iter().all(|line| got.contains(line))
        }),
        "acknowledged datagrams missing"
    );
    let payloads = receiver.payloads();
    let unique: HashSet<&String> = payloads.iter().collect();
    assert_eq!(unique.len(), payloads.len(), "a datagram was handed over twice");
    // Unsealed (the process never exited cleanly): removed once unchanged for the abandon time
    // (10 minutes). An mtime that jumps while the server watches (a wall-clock step on the array)
    // is a change, not age; the segment is made to look that old, and a server that first sees it
    // so (after a restart) takes it for abandoned.
    std::thread::sleep(Duration::from_secs(1));
    assert!(!files_in(&log_dir).is_empty(), "removed before the abandon time");
    let age_segments = || {
        for name in files_in(&log_dir) {
            let file = std::fs::OpenOptions::new().write(true).open(log_dir.join(name)).unwrap();
            file.set_modified(std::time::SystemTime::now() - Duration::from_secs(11 * 60)).unwrap();
        }
    };
    age_segments();
    // Many server cycles (it polls every 20 ms at most).
    std::thread::sleep(Duration::from_secs(3));
    assert!(!files_in(&log_dir).is_empty(), "an mtime step made a watched segment look abandoned");
    fabric.stop_server();
    age_segments();
    fabric.start_server();
    // Once the new server has also watched it unchanged for a minute (longer than a writer may
    // stay idle and still append to it).
    assert!(
        wait_until(Duration::from_secs(150), || files_in(&log_dir).is_empty()),
        "segments left: {:?}",
        files_in(&log_dir)
    );
    assert_eq!(fabric.counter("quarantined"), 0, "{}", fabric.status());
}

fn queue_segments(fabric: &Fabric) -> Vec<String> {
    files_in(&fabric.queue_dirs[0]).into_iter().filter(|name| name.ends_with(".log")).collect()
}

#[test]
fn a_server_killed_after_its_queue_segments_were_reclaimed_goes_on_from_its_cursor() {
    let mut fabric = Fabric::new("log-cursor");
    fabric.start_server();
    let (mut listener, received) = nc_listener(&fabric, "b", "10.77.0.2", 9301);
    std::thread::sleep(Duration::from_millis(300));
    // One long-lived sender: its outbox log segment stays open (unsealed) throughout.
    let mut sender = NcSender::start(&fabric, "a", "10.77.0.1", "10.77.0.2", 9301);
    let first: Vec<String> = (0..100).map(|index| format!("before-{index:03}")).collect();
    sender.send(&first);
    assert!(wait_until(Duration::from_secs(30), || received.count() >= first.len()), "got {}", received.count());
    // Everything is receipted, so the queue starts a new segment and removes the old ones: the
    // cursor of the sender's segment survives only if it was written into the new one.
    let old_segments = queue_segments(&fabric);
    assert!(
        wait_until(Duration::from_secs(30), || {
            let now = queue_segments(&fabric);
            !now.is_empty() && old_segments.iter().all(|old| !now.contains(old))
        }),
        "queue segments not reclaimed: {old_segments:?} → {:?}",
        queue_segments(&fabric)
    );
    fabric.kill_server();
    fabric.start_server();
    let second: Vec<String> = (0..100).map(|index| format!("after-{index:03}")).collect();
    sender.send(&second);
    let all: Vec<String> = first.iter().chain(&second).cloned().collect();
    assert!(wait_until(Duration::from_secs(30), || received.count() >= all.len()), "got {}", received.count());
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(received.lines(), all);
    // The receiving shim would drop re-delivered ids; the server's own count shows whether it read
    // the segment again from its start (nc may put several lines in one datagram, so the count is
    // at most one per line of the second half, and twice that if the first half came again).
    let stored = fabric.counter("stored");
    assert!(stored >= 1 && stored <= second.len() as u64, "stored {stored}: {}", fabric.status());
    assert_eq!(fabric.counter("duplicates"), 0, "{}", fabric.status());
    assert!(sender.finish(Duration::from_secs(10)));
    listener.kill();
}
