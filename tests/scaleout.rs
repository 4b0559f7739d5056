//! Scale-out: two ftss-server instances share the nodes in two partitions (each with its own
//! lease and queue), traffic crosses partitions both ways (receipts forwarded to the partition that
//! holds the packet), and when one instance is killed with SIGKILL the other takes its partition
//! over: nothing acknowledged is lost, nothing is handed to an app twice.
//!
//! Nodes and their partitions of two (CRC32C of the name): a → 0, b → 0, c → 1, e → 1.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;

fn start_instance(fabric: &Fabric, name: &str) -> Proc {
    fabric.start_instance(name, &["--lease-term", "2s", "--partitions", "2"])
}

/// Who serves each partition, as `ftss-server status` shows it.
fn holders(fabric: &Fabric) -> Vec<(bool, String)> {
    fabric.status()["partitions"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|partition| (partition["running"] == true, partition["holder"].as_str().unwrap_or("").to_owned()))
        .collect()
}

fn served_by(fabric: &Fabric, expected: [&str; 2]) -> bool {
    holders(fabric) == vec![(true, expected[0].to_owned()), (true, expected[1].to_owned())]
}

fn lines(tag: &str, range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|index| format!("{tag}-{index:04}")).collect()
}

/// Every line of `sent` arrived, none twice.
fn expect_all_once(received: &LineCollector, sent: &[String], limit: Duration) {
    let complete = || {
        let got: HashSet<String> = received.lines().into_iter().collect();
        sent.iter().all(|line| got.contains(line))
    };
    assert!(wait_until(limit, complete), "lost: {} of {} arrived", received.count(), sent.len());
    std::thread::sleep(Duration::from_millis(500));
    let got = received.lines();
    let unique: HashSet<&String> = got.iter().collect();
    assert_eq!(unique.len(), got.len(), "handed to the app twice");
    assert_eq!(got.len(), sent.len(), "unexpected lines: {got:?}");
}

#[test]
fn two_instances_share_the_partitions_and_one_takes_over_when_the_other_is_killed() {
    let mut fabric = Fabric::new("scaleout");
    fabric.queue_dirs.push(fabric.dir.0.join("queue-mirror"));
    let _one = start_instance(&fabric, "one");
    assert!(wait_until(Duration::from_secs(10), || fabric.volume.join("nodes").is_dir()), "no volume made");
    assert!(wait_until(Duration::from_secs(20), || served_by(&fabric, ["one", "one"])), "{:?}", holders(&fabric));
    let mut two = start_instance(&fabric, "two");
    assert!(
        wait_until(Duration::from_secs(30), || served_by(&fabric, ["one", "two"])),
        "the second instance never got its share: {:?}",
        holders(&fabric)
    );

    let (mut at_c, to_c) = nc_listener(&fabric, "c", "10.77.0.3", 9700);
    let (mut at_b, to_b) = nc_listener(&fabric, "b", "10.77.0.2", 9701);
    std::thread::sleep(Duration::from_millis(500));
    // a (partition 0) → c (partition 1) and e (partition 1) → b (partition 0).
    let mut from_a = NcSender::start(&fabric, "a", "10.77.0.1", "10.77.0.3", 9700);
    let mut from_e = NcSender::start(&fabric, "e", "10.77.0.5", "10.77.0.2", 9701);
    from_a.send(&lines("a-to-c", 0..150));
    from_e.send(&lines("e-to-b", 0..150));
    assert!(wait_until(Duration::from_secs(30), || to_c.count() >= 100 && to_b.count() >= 100), "no traffic");
    let both_stored = || {
        let status = fabric.status();
        let partitions = status["partitions"].as_array().cloned().unwrap_or_default();
        partitions.len() == 2 && partitions.iter().all(|partition| partition["stored"].as_u64().unwrap_or(0) > 0)
    };
    assert!(wait_until(Duration::from_secs(10), both_stored), "a partition stored nothing: {}", fabric.status());

    two.kill();
    from_a.send(&lines("a-to-c", 150..300));
    from_e.send(&lines("e-to-b", 150..300));
    assert!(
        wait_until(Duration::from_secs(30), || served_by(&fabric, ["one", "one"])),
        "partition 1 was not taken over: {:?}",
        holders(&fabric)
    );
    assert!(from_a.finish(Duration::from_secs(60)) && from_e.finish(Duration::from_secs(60)), "a sender is stuck");
    expect_all_once(&to_c, &lines("a-to-c", 0..300), Duration::from_secs(60));
    expect_all_once(&to_b, &lines("e-to-b", 0..300), Duration::from_secs(60));
    at_c.kill();
    at_b.kill();
    assert!(
        wait_until(Duration::from_secs(20), || {
            // Counters start again in the instance that took partition 1 over; the queues must be empty.
            let status = fabric.status();
            status["queue"]["packets"] == 0 && status["running"] == true
        }),
        "{}",
        fabric.status()
    );
    let lease = std::fs::read_to_string(fabric.volume.join("server/lease-p1")).unwrap();
    assert!(lease.contains("holder = \"one\"") && lease.contains("epoch = 3"), "{lease}");
}
