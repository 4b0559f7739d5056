//! Real failures while traffic flows: kill -9 of senders, receivers and the server at random points,
//! a volume that fills up, a receiver that never reads.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use common::apps::*;
use common::history::{Ack, History};
use common::*;

#[test]
fn kill_9_of_senders_receivers_and_the_server_at_random_points() {
    let mut fabric = Fabric::new("chaos");
    fabric.start_server_with(&["--redeliver-after", "1s"]);
    let port = 7800;
    let seed = fsbridge::unix_now_us() | 1;
    eprintln!("chaos seed {seed}");
    let mut random = Random(seed);
    let mut receivers = vec![Receiver::start(&fabric, port)];
    let mut senders: Vec<Sender> = Vec::new();
    let mut next_sender = 0;
    let started = Instant::now();
    let mut kills: HashMap<&str, usize> = HashMap::new();
    for _round in 0..30 {
        if senders.last_mut().is_none_or(|sender| sender.proc.child.try_wait().unwrap().is_some()) {
            senders.push(Sender::start(&fabric, port, &format!("s{next_sender}"), 400, 0));
            next_sender += 1;
        }
        std::thread::sleep(Duration::from_millis(100 + random.below(300)));
        match random.below(3) {
            0 => {
                senders.last_mut().unwrap().proc.kill();
                *kills.entry("sender").or_default() += 1;
            }
            1 => {
                receivers.last_mut().unwrap().proc.kill();
                *kills.entry("receiver").or_default() += 1;
                std::thread::sleep(Duration::from_millis(random.below(200)));
                receivers.push(Receiver::start(&fabric, port));
            }
            _ => {
                fabric.kill_server();
                *kills.entry("server").or_default() += 1;
                std::thread::sleep(Duration::from_millis(random.below(200)));
                fabric.start_server_with(&["--redeliver-after", "1s"]);
            }
        }
    }
    eprintln!("kills {kills:?} in {:?}", started.elapsed());
    for sender in &mut senders {
        sender.proc.wait_exit(Duration::from_secs(60));
    }
    let mut sent = History::new();
    for sender in &senders {
        sender.record(&mut sent, Ack::Volume);
    }
    let history = |receivers: &[Receiver]| {
        let mut history = sent.clone();
        for (index, receiver) in receivers.iter().enumerate() {
            receiver.record(&mut history, &format!("receiver {index}"));
        }
        history.check()
    };
    assert!(history(&receivers).acked > 500, "too little traffic: {}", history(&receivers));
    wait_until(Duration::from_secs(120), || history(&receivers).lost.is_empty());
    history(&receivers).assert_ok(&format!("kill -9 of senders, receivers and the server ({kills:?})"));
}

#[test]
fn a_full_volume_gives_senders_a_clear_errno_and_traffic_resumes_when_space_returns() {
    let mut fabric = Fabric::new("volume-full");
    let disk = SmallDisk::mount(&fabric.volume, "16m");
    fabric.start_server();
    // Enough bytes that the sender is still sending when the disk fills up, whatever its speed: a
    // local outbox log writes up to 1 MiB of zeros ahead of itself, and sends into that space
    // still succeed after the fill (20,000 bare datagrams fit there, and a CI run saw all of them
    // succeed). 20,000 of 256 B are about 5.5 MiB, several times what can be reserved, and less
    // than a log segment, so no drained segment is deleted to give space back.
    // The receiver starts only once the space is back: a receiver deletes the inbox files it has
    // read, and on a full tmpfs each page it frees lets the sender append a few more datagrams
    // (a CI run saw all 20,000 succeed after the fill, most likely that way: the server and the
    // sender taking turns at the pages the receiver freed).
    let count = 20_000;
    let pad = 256;
    let mut sender = Sender::start(&fabric, 7900, "v", count, pad);
    assert!(wait_until(Duration::from_secs(30), || sender.acknowledged().len() >= 100));
    let filler = disk.fill();
    assert!(
        // ENOSPC from the failed publish, or ENOBUFS once the shim's bounded ring is full behind it.
        wait_until(Duration::from_secs(30), || sender
            .errors()
            .iter()
            .any(|line| line.ends_with(" 28") || line.ends_with(" 105"))),
        "no ENOSPC/ENOBUFS reported to the app: {:?}",
        sender.said.lines().last()
    );
    assert!(
        fabric.node_log("a").contains("No space left on device"),
        "the reason is not in FTSS_LOG: {}",
        fabric.node_log("a")
    );
    std::fs::remove_file(&filler).unwrap();
    let receiver = Receiver::start(&fabric, 7900);
    assert!(sender.proc.wait_exit(Duration::from_secs(120)), "traffic did not resume");
    let acknowledged = sender.acknowledged();
    assert_eq!(acknowledged.len(), count);
    assert!(wait_until(Duration::from_secs(60), || {
        let got: HashSet<String> = receiver.lines.lines().into_iter().collect();
        acknowledged.iter().all(|line| got.contains(line))
    }));
    let lines = receiver.lines.lines();
    let unique: HashSet<&String> = lines.iter().collect();
    assert_eq!(unique.len(), lines.len(), "a packet was handed over twice");
    assert!(fabric.server.as_mut().unwrap().child.try_wait().unwrap().is_none(), "server died");
}

#[test]
fn a_receiver_that_never_reads_stays_bounded_and_loses_nothing() {
    let mut fabric = Fabric::new("deaf");
    fabric.start_server();
    let mut deaf = Receiver::start_script(&fabric, "b", "10.77.0.2", PY_DEAF, &["8000"]);

    // 20,000 datagrams of 1 KiB: 20 MiB, far more than the socket and the shim may hold.
    let count = 20_000;
    let payload = "x".repeat(1000);
    let script = format!(
        "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         for n in range({count}):\n    s.sendto(f'd-{{n}}-{payload}'.encode(), ('10.77.0.2', 8000))\n"
    );
    let output = fabric.command("a", "10.77.0.1", "python3").args(["-c", &script]).output().unwrap();
    assert!(output.status.success(), "the sender was blocked or failed");
    assert!(wait_until(Duration::from_secs(60), || fabric.counter("stored") >= count), "{}", fabric.status());
    std::thread::sleep(Duration::from_secs(2));
    let deaf_peak = peak_rss_kib(deaf.proc.child.id());
    let server_peak = peak_rss_kib(fabric.server.as_ref().unwrap().child.id());
    eprintln!("deaf receiver peak RSS {deaf_peak} KiB, server peak RSS {server_peak} KiB");
    assert!(deaf_peak < 96 * 1024, "the deaf receiver's shim buffered {deaf_peak} KiB");
    assert!(server_peak < 96 * 1024, "the server buffered {server_peak} KiB");
    assert_eq!(fabric.counter("receipted"), 0);
    deaf.proc.kill();

    let receiver = Receiver::start(&fabric, 8000);
    let expected: Vec<String> = (0..count).map(|n| format!("d-{n}-{payload}")).collect();
    assert!(
        wait_until(Duration::from_secs(120), || receiver.lines.count() > count as usize),
        "only {} arrived",
        receiver.lines.count() - 1
    );
    let got: Vec<String> = receiver.lines.lines().into_iter().skip(1).collect();
    assert_eq!(got.len(), expected.len());
    let got_set: HashSet<&String> = got.iter().collect();
    assert_eq!(got_set.len(), got.len(), "handed over twice");
    assert!(expected.iter().all(|line| got_set.contains(line)), "lost packets");
}
