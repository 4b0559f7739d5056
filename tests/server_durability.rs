//! ftss-server under real failures: kill -9 during transfers, corrupted and removed mirrors, a full
//! queue disk, destination limits, retention, dead letters. Real processes throughout.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::apps::*;
use common::history::{Ack, History};
use common::*;

fn start_receiver(fabric: &Fabric, port: u16) -> (Proc, LineCollector) {
    let receiver = Receiver::start(fabric, port);
    (receiver.proc, receiver.lines)
}

/// A sender of `count` datagrams "<tag>-<n><pad>"; its lines say "ok n" per acknowledged send.
fn start_sender(fabric: &Fabric, count: usize, port: u16, tag: &str, pad: usize) -> (Proc, LineCollector) {
    let sender = Sender::start(fabric, port, tag, count, pad);
    (sender.proc, sender.said)
}

/// Received payloads after the "ready" line.
fn payloads(receiver: &LineCollector) -> Vec<String> {
    receiver.lines().into_iter().skip(1).collect()
}

#[test]
fn kill_9_of_the_server_during_a_transfer_loses_nothing_acknowledged_and_duplicates_nothing() {
    let mut fabric = Fabric::new("kill9");
    fabric.start_server();
    let (_receiver, received) = start_receiver(&fabric, 7100);
    let count = 10_000;
    let (mut sender, acked) = start_sender(&fabric, count, 7100, "k", 0);
    let seed = fsbridge::unix_now_us() | 1;
    eprintln!("kill -9 schedule seed {seed}");
    let mut random = Random(seed);
    let mut kills = 0;
    let deadline = Instant::now() + Duration::from_secs(240);
    while (kills < 20 || sender.child.try_wait().unwrap().is_none()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50 + random.below(400)));
        fabric.kill_server();
        kills += 1;
        std::thread::sleep(Duration::from_millis(random.below(100)));
        fabric.start_server();
    }
    assert!(kills >= 20, "only {kills} kills");
    assert!(sender.wait_exit(Duration::from_secs(60)), "sender stuck");
    let acked: BTreeSet<usize> =
        acked.lines().iter().filter_map(|line| line.strip_prefix("ok ")).map(|n| n.parse().unwrap()).collect();
    assert_eq!(acked.len(), count, "every send returned (the server is not on the send path in volume mode)");
    wait_until(Duration::from_secs(120), || payloads(&received).len() >= count);
    let mut history = History::new();
    for n in acked {
        history.sent(format!("k-{n}"), Ack::Volume);
    }
    for payload in payloads(&received) {
        history.received("receiver", payload);
    }
    history.check().assert_ok(&format!("{kills} kills of the server"));
}

/// The server sleeps for its poll interval when nothing happens; a node writing into the volume
/// wakes it (inotify on the file system the server reads the volume from). With a poll of a
/// minute, two nodes that register after the server started (new node directories), a sender's
/// outbox log and a receiver's receipts are all noticed: every datagram arrives, and is receipted,
/// long before the first poll.
#[test]
fn writes_into_the_volume_wake_a_server_that_polls_once_a_minute() {
    let mut fabric = Fabric::new("wake");
    fabric.start_server_with(&["--poll", "60s"]);
    let (_receiver, received) = start_receiver(&fabric, 7300);
    let (mut sender, _) = start_sender(&fabric, 20, 7300, "wake", 10);
    assert!(sender.wait_exit(Duration::from_secs(30)));
    assert!(
        wait_until(Duration::from_secs(20), || payloads(&received).len() >= 20),
        "got {:?}\n{}",
        payloads(&received),
        fabric.status()
    );
    assert_eq!(payloads(&received), expected("wake", 20, 10));
    assert!(wait_until(Duration::from_secs(20), || fabric.counter("receipted") >= 20), "{}", fabric.status());
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "log"))
        .collect();
    files.sort();
    files
}

/// Flips one byte inside the first occurrence of `needle` in a mirror's segments.
fn flip_byte_of(dir: &Path, needle: &[u8]) {
    for path in segment_files(dir) {
        let mut bytes = std::fs::read(&path).unwrap();
        if let Some(at) = bytes.windows(needle.len()).position(|window| window == needle) {
            bytes[at + 1] ^= 0x20;
            std::fs::write(&path, &bytes).unwrap();
            return;
        }
    }
    panic!("{} not found in {}", String::from_utf8_lossy(needle), dir.display());
}

fn mirror_fabric(tag: &str) -> Fabric {
    let mut fabric = Fabric::new(tag);
    fabric.queue_dirs = vec![fabric.dir.0.join("mirror0"), fabric.dir.0.join("mirror1")];
    fabric
}

#[test]
fn flipped_bytes_in_one_mirror_are_served_from_the_other_and_repaired() {
    let mut fabric = mirror_fabric("flip");
    fabric.start_server();
    // Node b is not registered yet, so the packets stay in the queue (held) until it is.
    let (mut sender, _) = start_sender(&fabric, 20, 7200, "flip", 50);
    assert!(sender.wait_exit(Duration::from_secs(30)));
    assert!(wait_until(Duration::from_secs(20), || fabric.counter("stored") >= 20), "{}", fabric.status());

    // Packets just stored are delivered from the server's memory; after a restart they are read
    // back from the mirrors.
    fabric.stop_server();
    fabric.start_server();
    // While the server runs: corrupt packet 3 in mirror 0, then let b register and receive.
    flip_byte_of(&fabric.queue_dirs[0], b"flip-3p");
    let (_receiver, received) = start_receiver(&fabric, 7200);
    assert!(wait_until(Duration::from_secs(30), || payloads(&received).len() >= 20), "got {:?}", payloads(&received));
    assert_eq!(payloads(&received), expected("flip", 20, 50), "wrong bytes delivered");
    assert!(wait_until(Duration::from_secs(5), || fabric.counter("read_repairs") >= 1), "{}", fabric.status());

    // With the server stopped: corrupt mirror 1; scrub finds and repairs it.
    fabric.stop_server();
    let mirror0 = segment_files(&fabric.queue_dirs[0]);
    assert!(!mirror0.is_empty());
    // Retained bytes are gone after receipt; send more to an absent port so something is on disk.
    fabric.start_server();
    let (mut sender, _) = start_sender(&fabric, 5, 7201, "scrub", 50);
    assert!(sender.wait_exit(Duration::from_secs(30)));
    assert!(wait_until(Duration::from_secs(20), || fabric.counter("stored") >= 5));
    fabric.stop_server();
    flip_byte_of(&fabric.queue_dirs[1], b"scrub-2p");
    let mut scrub = Command::new(server_path());
    scrub.arg("scrub").arg("--json");
    for dir in &fabric.queue_dirs {
        scrub.arg("--queue-dir").arg(dir);
    }
    let output = scrub.output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["mirrors_repaired"], 1, "{report}");
    for (left, right) in segment_files(&fabric.queue_dirs[0]).iter().zip(segment_files(&fabric.queue_dirs[1])) {
        assert_eq!(std::fs::read(left).unwrap(), std::fs::read(&right).unwrap(), "mirrors differ after scrub");
    }
    fabric.start_server();
    let (_receiver, received) = start_receiver(&fabric, 7201);
    assert!(wait_until(Duration::from_secs(30), || payloads(&received).len() >= 5));
    assert_eq!(payloads(&received), expected("scrub", 5, 50));
}

#[test]
fn a_removed_mirror_degrades_then_resyncs_without_loss() {
    let mut fabric = mirror_fabric("mirror-gone");
    fabric.start_server();
    let (_receiver, received) = start_receiver(&fabric, 7300);
    let (mut sender, acked) = start_sender(&fabric, 3000, 7300, "m", 0);
    assert!(wait_until(Duration::from_secs(30), || acked.count() >= 500));
    std::fs::remove_dir_all(&fabric.queue_dirs[1]).unwrap();
    assert!(wait_until(Duration::from_secs(20), || fabric.status()["degraded"] == true), "{}", fabric.status());
    let mirrors = fabric.status()["queue"]["mirrors"].clone();
    assert_eq!(mirrors[1]["healthy"], false, "{mirrors}");
    std::fs::create_dir_all(&fabric.queue_dirs[1]).unwrap();
    assert!(wait_until(Duration::from_secs(20), || fabric.status()["degraded"] == false), "{}", fabric.status());
    assert!(sender.wait_exit(Duration::from_secs(60)));
    assert!(
        wait_until(Duration::from_secs(60), || payloads(&received).len() >= 3000),
        "got {}",
        payloads(&received).len()
    );
    assert_eq!(payloads(&received), expected("m", 3000, 0));
    fabric.stop_server();
    let (left, right) = (segment_files(&fabric.queue_dirs[0]), segment_files(&fabric.queue_dirs[1]));
    assert_eq!(left.len(), right.len());
    for (left, right) in left.iter().zip(&right) {
        assert_eq!(std::fs::read(left).unwrap(), std::fs::read(right).unwrap(), "resynced mirror differs");
    }
}

#[test]
fn a_full_queue_disk_pushes_back_loses_nothing_and_recovers() {
    let mut fabric = Fabric::new("enospc");
    let disk = SmallDisk::mount(&fabric.queue_dirs[0], "8m");
    fabric.start_server();
    let (_receiver, received) = start_receiver(&fabric, 7400);
    let (mut sender, _) = start_sender(&fabric, 10, 7400, "before", 0);
    assert!(sender.wait_exit(Duration::from_secs(30)));
    assert!(wait_until(Duration::from_secs(20), || payloads(&received).len() >= 10));

    let filler = disk.fill();
    let (mut sender, _) = start_sender(&fabric, 200, 7400, "full", 100);
    assert!(sender.wait_exit(Duration::from_secs(30)), "senders must not block on the server in volume mode");
    assert!(
        wait_until(Duration::from_secs(20), || fabric.status()["backpressure"]["active"] == true),
        "{}",
        fabric.status()
    );
    let reasons = fabric.status()["backpressure"]["reasons"].to_string();
    // "disk full" from a write, or the drain stopping at the reserve kept for receipts.
    assert!(reasons.contains("disk full") || reasons.contains("disk nearly full"), "{reasons}");
    // A few may still fit in the last allocated page of the segment; most cannot be stored.
    assert!(payloads(&received).len() < 100, "{} delivered although the disk is full", payloads(&received).len());
    assert!(!outbox_entries(&fabric.volume, "a").is_empty(), "outbox must keep what was not stored");

    std::fs::remove_file(filler).unwrap();
    assert!(
        wait_until(Duration::from_secs(60), || payloads(&received).len() >= 210),
        "got {}",
        payloads(&received).len()
    );
    let mut all = expected("before", 10, 0);
    all.extend(expected("full", 200, 100));
    assert_eq!(payloads(&received), all);
    assert!(wait_until(Duration::from_secs(10), || fabric.status()["backpressure"]["active"] == false));
    fabric.stop_server();
}

#[test]
fn a_destination_over_its_byte_limit_pushes_back_its_senders() {
    let mut fabric = Fabric::new("dest-limit");
    fabric.start_server_with(&["--destination-bytes-max", "1000"]);
    // Each datagram carries 100+ bytes; b is absent so its queue fills up to the limit.
    let (mut sender, _) = start_sender(&fabric, 30, 7500, "lim", 100);
    assert!(sender.wait_exit(Duration::from_secs(30)));
    assert!(
        wait_until(Duration::from_secs(20), || fabric.status()["backpressure"]["reasons"]
            .to_string()
            .contains("over its limit")),
        "{}",
        fabric.status()
    );
    let stored = fabric.counter("stored");
    // Each counts its payload and 64 bytes of record: a handful fit, passed by at most one batch.
    assert!((2..30).contains(&stored), "stored {stored} despite the limit");
    let (_receiver, received) = start_receiver(&fabric, 7500);
    assert!(
        wait_until(Duration::from_secs(60), || payloads(&received).len() >= 30),
        "got {}",
        payloads(&received).len()
    );
    assert_eq!(payloads(&received), expected("lim", 30, 100));
}

fn dump(fabric: &Fabric, state: &str) -> Vec<serde_json::Value> {
    let mut command = Command::new(server_path());
    command.args(["dump", "--json", "--payload", "--state", state]);
    for dir in &fabric.queue_dirs {
        command.arg("--queue-dir").arg(dir);
    }
    let output = command.output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap().lines().map(|line| serde_json::from_str(line).unwrap()).collect()
}

#[test]
fn retain_keeps_receipted_packets_listable_and_without_it_they_are_gone() {
    for retain in [true, false] {
        let mut fabric = Fabric::new(if retain { "retain" } else { "no-retain" });
        if retain {
            fabric.start_server_with(&["--retain", "1h"]);
        } else {
            fabric.start_server();
        }
        let (_receiver, received) = start_receiver(&fabric, 7600);
        let (mut sender, _) = start_sender(&fabric, 5, 7600, "kept", 0);
        assert!(sender.wait_exit(Duration::from_secs(30)));
        assert!(wait_until(Duration::from_secs(20), || payloads(&received).len() >= 5));
        assert!(wait_until(Duration::from_secs(10), || fabric.counter("receipted") >= 5), "{}", fabric.status());
        if retain {
            let listed = dump(&fabric, "receipted");
            let texts: Vec<&str> = listed.iter().map(|item| item["payload"].as_str().unwrap()).collect();
            assert_eq!(texts, expected("kept", 5, 0), "{listed:?}");
            assert_eq!(fabric.status()["queue"]["retained"], 5);
        } else {
            assert!(
                wait_until(Duration::from_secs(10), || dump(&fabric, "all").is_empty()),
                "{:?}",
                dump(&fabric, "all")
            );
        }
    }
}

#[test]
fn packets_for_an_unknown_destination_are_dead_lettered_after_the_hold() {
    let mut fabric = Fabric::new("hold");
    fabric.start_server_with(&["--hold", "1s"]);
    let output = fabric
        .command("a", "10.77.0.1", "python3")
        .args([
            "-c",
            "import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'nobody', ('10.77.9.9', 9))",
        ])
        .output()
        .unwrap();
    assert!(output.status.success());
    assert!(wait_until(Duration::from_secs(20), || fabric.counter("dead_lettered") == 1), "{}", fabric.status());
    let status = fabric.status();
    let reason = status["dead_letters"][0]["reason"].as_str().unwrap();
    assert!(reason.contains("no node registered for 10.77.9.9"), "{reason}");
    assert_eq!(status["queue"]["packets"], 0);
    let dead = dump(&fabric, "dead-lettered");
    assert!(dead.len() <= 1, "{dead:?}");
    assert!(fabric.server.as_mut().unwrap().child.try_wait().unwrap().is_none(), "server died");
}

#[test]
fn packets_not_receipted_are_delivered_again_and_handed_over_once() {
    let mut fabric = Fabric::new("redeliver");
    fabric.start_server_with(&["--redeliver-after", "1s"]);
    // Binds and never reads: the shim injects into its socket, no receipt is written.
    let mut deaf = Receiver::start_script(&fabric, "b", "10.77.0.2", PY_DEAF, &["7700"]);
    let (mut sender, _) = start_sender(&fabric, 20, 7700, "again", 0);
    assert!(sender.wait_exit(Duration::from_secs(30)));
    // Delivered into the deaf process (its inbox files are consumed) but never receipted.
    let inbox = fabric.volume.join("nodes/b/in/7700/new");
    assert!(wait_until(Duration::from_secs(20), || fabric.counter("delivered") >= 20 && files_in(&inbox).is_empty()));
    deaf.proc.kill();
    assert_eq!(fabric.counter("receipted"), 0);

    let (_receiver, received) = start_receiver(&fabric, 7700);
    assert!(wait_until(Duration::from_secs(30), || payloads(&received).len() >= 20), "got {:?}", payloads(&received));
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(payloads(&received), expected("again", 20, 0), "lost, reordered or handed over twice");
    assert!(fabric.counter("redelivered") >= 20, "{}", fabric.status());
    assert!(wait_until(Duration::from_secs(10), || fabric.counter("receipted") == 20), "{}", fabric.status());
}

/// Binds 0.0.0.0:PORT, prints "ready", prints the payloads of COUNT datagrams, then ends at once
/// (`os._exit`: no exit handlers, as a crash right after the app handled a datagram).
const PY_CRASHING_RECEIVER: &str = r#"
import os, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
print("ready", flush=True)
for _ in range(int(sys.argv[2])):
    data, addr = s.recvfrom(65535)
    print(data.decode(), flush=True)
os._exit(0)
"#;

/// A sender of 300 datagrams to a port whose receiver ends abruptly after every 23 it got and is
/// started again, until every acknowledged datagram arrived (or `generations` receivers ran).
/// Returns the history's verdict.
fn crashing_receivers(tag: &str, port: u16, env: &[(&str, &str)], generations: usize) -> common::history::Verdict {
    let mut fabric = Fabric::new(tag);
    fabric.start_server_with(&["--redeliver-after", "1s"]);
    let count = 300;
    let (mut sender, said) = start_sender(&fabric, count, port, tag, 0);
    // Every datagram is durable on the volume before the first receiver starts: the server, which
    // wakes at each write, would otherwise deliver them one small inbox file at a time as they
    // come, and a receiver could end between files, where it has receipted all it was handed.
    assert!(sender.wait_exit(Duration::from_secs(60)), "sender stuck");
    let mut history = History::new();
    let mut generation = 0;
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        generation += 1;
        let mut command = fabric.command("b", "10.77.0.2", "python3");
        command
            .args(["-c", PY_CRASHING_RECEIVER, &port.to_string(), "23"])
            .envs(env.iter().copied())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null());
        let mut child = command.spawn().expect("python3");
        let lines = LineCollector::start(child.stdout.take().unwrap());
        let mut receiver = Proc { child, name: format!("receiver {generation}") };
        // Until it ends by itself, or every acknowledged datagram has arrived.
        let mut done = |history: &History, lines: &LineCollector| {
            let mut seen = history.clone();
            for n in said.lines().iter().filter_map(|line| line.strip_prefix("ok ")) {
                seen.sent(format!("{tag}-{n}"), Ack::Volume);
            }
            for payload in payloads(lines) {
                seen.received(format!("receiver {generation}"), payload);
            }
            sender.child.try_wait().is_ok_and(|status| status.is_some()) && seen.check().lost.is_empty()
        };
        let mut finished = false;
        while receiver.child.try_wait().unwrap().is_none() {
            if done(&history, &lines) || Instant::now() > deadline {
                finished = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        receiver.kill();
        std::thread::sleep(Duration::from_millis(100));
        for payload in payloads(&lines) {
            history.received(format!("receiver {generation}"), payload);
        }
        if finished || generation == generations {
            break;
        }
    }
    assert!(sender.wait_exit(Duration::from_secs(30)), "sender stuck");
    for line in said.lines() {
        if let Some(n) = line.strip_prefix("ok ") {
            history.sent(format!("{tag}-{n}"), Ack::Volume);
        }
    }
    let verdict = history.check();
    eprintln!("{tag}: {generation} receiver processes, {verdict}");
    verdict
}

/// FTSS_RECV=once: a receiver that ends abruptly after each few datagrams, started again on the
/// same port, never gets a datagram one of its earlier incarnations got, and gets every acked one.
/// The same schedule without it (the control, three incarnations) hands datagrams to several
/// incarnations: their receipts had not been written when the process ended, so the scenario
/// reaches the window this mode closes. (Without the mode such an app never gets past its first
/// datagrams: each incarnation is handed the same ones again.)
#[test]
fn recv_once_hands_no_datagram_to_two_incarnations_of_a_port() {
    let once = crashing_receivers("once", 7750, &[("FTSS_RECV", "once")], usize::MAX);
    once.assert_ok("FTSS_RECV=once, receivers ending abruptly");
    assert_eq!(once.again, 0, "with FTSS_RECV=once no datagram reaches two processes on the port: {once}");
    let control = crashing_receivers("all", 7751, &[], 3);
    assert!(control.lost.len() < 300 && control.twice.is_empty() && control.foreign.is_empty(), "{control}");
    assert!(control.again > 0, "the control run handed nothing twice, so the test shows nothing: {control}");
}

/// Binds 0.0.0.0:PORT, prints "ready", waits until the file GO exists, then prints every
/// datagram's payload.
const PY_WAITING_RECEIVER: &str = r#"
import os, socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
print("ready", flush=True)
while not os.path.exists(sys.argv[2]):
    time.sleep(0.05)
while True:
    data, addr = s.recvfrom(65535)
    print(data.decode(), flush=True)
"#;

/// FTSS_RECV=once on a full volume: datagrams already in the app's socket are not handed over
/// while the ledger cannot record them (recv waits), and all of them are once space returns.
#[test]
fn recv_once_hands_nothing_it_cannot_record_and_loses_nothing() {
    let base = Fabric::new("once-full");
    let disk_dir = base.dir.0.join("volume-disk");
    let disk = SmallDisk::mount(&disk_dir, "8m");
    let mut fabric = Fabric::with_volume("once-full-volume", disk_dir.join("volume"));
    fabric.start_server();
    let go = fabric.dir.0.join("go");
    let mut command = fabric.command("b", "10.77.0.2", "python3");
    command
        .args(["-c", PY_WAITING_RECEIVER, "7760", go.to_str().unwrap()])
        .env("FTSS_RECV", "once")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    let mut child = command.spawn().expect("python3");
    let lines = LineCollector::start(child.stdout.take().unwrap());
    let _receiver = Proc { child, name: "receiver".into() };
    assert!(wait_until(Duration::from_secs(20), || lines.count() >= 1), "receiver not ready");
    let count = 40;
    let (mut sender, said) = start_sender(&fabric, count, 7760, "held", 0);
    assert!(sender.wait_exit(Duration::from_secs(30)), "sender stuck");
    // Delivered into the receiver's socket (its inbox is empty), not read yet.
    let inbox = fabric.volume.join("nodes/b/in/7760/new");
    assert!(
        wait_until(Duration::from_secs(20), || fabric.counter("delivered") >= count as u64
            && files_in(&inbox).is_empty()),
        "{}",
        fabric.status()
    );
    let filler = disk.fill();
    std::fs::write(&go, b"").unwrap();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(payloads(&lines), Vec::<String>::new(), "handed over before the ledger recorded them");
    assert!(fabric.node_log("b").contains("cannot write the ledger"), "{}", fabric.node_log("b"));
    std::fs::remove_file(filler).unwrap();
    assert!(wait_until(Duration::from_secs(30), || payloads(&lines).len() >= count), "got {:?}", payloads(&lines));
    std::thread::sleep(Duration::from_millis(500));
    let mut history = History::new();
    for n in said.lines().iter().filter_map(|line| line.strip_prefix("ok ")) {
        history.sent(format!("held-{n}"), Ack::Volume);
    }
    for payload in payloads(&lines) {
        history.received("receiver", payload);
    }
    history.check().assert_ok("FTSS_RECV=once through a full volume");
}
