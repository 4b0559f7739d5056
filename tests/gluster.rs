//! ftss on a distributed, replicated volume: GlusterFS replica 3 (three bricks, real glusterd),
//! mounted with the FUSE client; nodes, ftss-server and its queue all live on the mount.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::apps::*;
use common::gluster::GlusterVolume;
use common::*;

fn fabric_on(volume: &GlusterVolume, tag: &str) -> Fabric {
    let mut fabric = Fabric::with_volume(tag, volume.mount.join("volume"));
    std::fs::create_dir_all(&fabric.volume).unwrap();
    fabric.queue_dirs = vec![volume.mount.join("queue")];
    fabric
}

#[test]
fn nc_lines_cross_a_gluster_replica_3_volume() {
    let volume = GlusterVolume::create("nc");
    let mut fabric = fabric_on(&volume, "gluster-nc");
    fabric.start_server();
    let (mut listener, received) = nc_listener(&fabric, "b", "10.77.0.2", 9600);
    std::thread::sleep(Duration::from_millis(500));
    let lines: Vec<String> = (0..200).map(|index| format!("gluster-line-{index:04}")).collect();
    assert!(nc_send_lines(&fabric, "a", "10.77.0.1", "10.77.0.2", 9600, &lines), "sender stuck");
    assert!(
        wait_until(Duration::from_secs(120), || received.count() >= lines.len()),
        "only {} arrived",
        received.count()
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(received.lines(), lines);
    listener.kill();
    assert!(wait_until(Duration::from_secs(30), || fabric.status()["queue"]["packets"] == 0), "{}", fabric.status());
}

#[test]
fn a_brick_killed_mid_transfer_loses_nothing_and_heals() {
    let volume = GlusterVolume::create("brick");
    let mut fabric = fabric_on(&volume, "gluster-brick");
    fabric.start_server();
    let receiver = Receiver::start(&fabric, 9601);
    let received = &receiver.lines;

    let count = 600;
    let mut sender = Sender::start(&fabric, 9601, "g", count, 0);
    let said = &sender.said;
    assert!(wait_until(Duration::from_secs(60), || said.count() >= 150), "too slow: {}", said.count());
    let killed = volume.kill_brick();
    eprintln!("killed brick process {killed}");
    assert!(wait_until(Duration::from_secs(60), || said.count() >= 350), "stalled with a brick down: {}", said.count());
    volume.restart_bricks();
    assert!(sender.proc.wait_exit(Duration::from_secs(180)), "sender stuck");
    let acknowledged = sender.acknowledged();
    assert_eq!(acknowledged.len(), count);
    assert!(
        wait_until(Duration::from_secs(180), || {
            let got: HashSet<String> = received.lines().into_iter().collect();
            acknowledged.iter().all(|line| got.contains(line))
        }),
        "acknowledged packets lost"
    );
    let lines: Vec<String> = received.lines().into_iter().skip(1).collect();
    let unique: HashSet<&String> = lines.iter().collect();
    assert_eq!(unique.len(), lines.len(), "handed to the app twice");
    // Quiesce (status.json alone changes four times a second), then the brick must catch up.
    drop(receiver);
    fabric.stop_server();
    assert!(volume.wait_healed(Duration::from_secs(300)), "self-heal did not finish");
}

fn start_instance(fabric: &Fabric, name: &str) -> Proc {
    fabric.start_instance(name, &["--lease-term", "3s"])
}

/// The live lease holder, as `ftss-server status` shows it (None before the volume exists).
fn lease_holder(fabric: &Fabric) -> Option<String> {
    let output = std::process::Command::new(server_path())
        .arg("status")
        .arg("--volume")
        .arg(&fabric.volume)
        .arg("--json")
        .output()
        .ok()?;
    let status: serde_json::Value = serde_json::from_slice(&output.stdout).ok()?;
    (status["lease"]["live"] == true).then(|| status["lease"]["holder"].as_str().unwrap_or_default().to_owned())
}

#[test]
fn the_standby_takes_over_when_the_active_server_is_killed() {
    let volume = GlusterVolume::create("ha");
    let fabric = fabric_on(&volume, "gluster-ha");
    let mut first = start_instance(&fabric, "first");
    assert!(
        wait_until(Duration::from_secs(30), || lease_holder(&fabric).as_deref() == Some("first")),
        "first never became active"
    );
    let _second = start_instance(&fabric, "second");

    let receiver = Receiver::start(&fabric, 9601);
    let received = &receiver.lines;
    let count = 600;
    let mut sender = Sender::start(&fabric, 9601, "g", count, 0);
    assert!(wait_until(Duration::from_secs(60), || received.count() >= 100), "no traffic through the first instance");

    first.kill();
    let killed_at = std::time::Instant::now();
    assert!(
        wait_until(Duration::from_secs(30), || lease_holder(&fabric).as_deref() == Some("second")),
        "the standby never took over"
    );
    let takeover = killed_at.elapsed();
    eprintln!("standby active {takeover:?} after kill -9 of the active instance (lease term 3s)");
    assert!(takeover < Duration::from_secs(6), "takeover took {takeover:?}, more than two lease terms");
    assert!(
        wait_until(Duration::from_secs(20), || fabric.status()["active"]["instance"] == "second"),
        "{}",
        fabric.status()
    );

    assert!(sender.proc.wait_exit(Duration::from_secs(180)), "sender stuck");
    let acknowledged = sender.acknowledged();
    assert_eq!(acknowledged.len(), count);
    assert!(
        wait_until(Duration::from_secs(120), || {
            let got: HashSet<String> = received.lines().into_iter().collect();
            acknowledged.iter().all(|line| got.contains(line))
        }),
        "acknowledged packets lost across the failover"
    );
    let lines: Vec<String> = received.lines().into_iter().skip(1).collect();
    let unique: HashSet<&String> = lines.iter().collect();
    assert_eq!(unique.len(), lines.len(), "handed to the app twice");
}
