//! ftss on a real SMB volume: Samba's smbd on loopback, mounted by smbnetfs (FUSE). Both nodes use
//! the mount; ftss-server works on the share's own directory, as it would on the array.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::apps::*;
use common::smb::SmbShare;
use common::*;

#[test]
fn nc_lines_cross_an_smb_mounted_volume() {
    let share = SmbShare::start("smb-nc");
    let mut fabric = Fabric::with_volume("smb-nc-fabric", share.local.clone());
    fabric.start_server();
    // The nodes see the same volume through the SMB mount.
    let mut nodes = Fabric::with_volume("smb-nc-nodes", share.mounted.clone());
    nodes.dir = TempDir::new("smb-nc-logs");
    let (mut listener, received) = nc_listener(&nodes, "b", "10.77.0.2", 9100);
    std::thread::sleep(Duration::from_millis(500));
    let lines: Vec<String> = (0..200).map(|index| format!("smb-line-{index:04}")).collect();
    assert!(nc_send_lines(&nodes, "a", "10.77.0.1", "10.77.0.2", 9100, &lines), "sender stuck");
    assert!(
        wait_until(Duration::from_secs(90), || received.count() >= lines.len()),
        "only {} arrived",
        received.count()
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(received.lines(), lines);
    listener.kill();
    assert!(wait_until(Duration::from_secs(20), || fabric.status()["queue"]["packets"] == 0), "{}", fabric.status());
    assert_eq!(fabric.counter("quarantined"), 0);
}

#[test]
fn smbd_killed_mid_transfer_loses_nothing_acknowledged_and_traffic_resumes() {
    let share = SmbShare::start("smb-kill");
    let mut fabric = Fabric::with_volume("smb-kill-fabric", share.local.clone());
    fabric.start_server();
    let mut nodes = Fabric::with_volume("smb-kill-nodes", share.mounted.clone());
    nodes.dir = TempDir::new("smb-kill-logs");

    let receiver = Receiver::start(&nodes, 9101);
    let received = &receiver.lines;

    let count = 300;
    let mut sender = Sender::start_with(&nodes, 9101, "s", count, 0, &[("FTSS_TIMEOUT", "5")]);
    let said = &sender.said;

    assert!(wait_until(Duration::from_secs(60), || said.count() >= 100), "sender too slow: {}", said.count());
    share.kill_smbd();
    std::thread::sleep(Duration::from_secs(2));
    share.start_smbd();
    assert!(sender.proc.wait_exit(Duration::from_secs(180)), "traffic did not resume: {:?}", said.lines().last());

    let acknowledged = sender.acknowledged();
    assert_eq!(acknowledged.len(), count);
    let failed = sender.errors();
    eprintln!("errors seen by the app while smbd was down: {failed:?}");
    assert!(wait_until(Duration::from_secs(120), || {
        let got: Vec<String> = received.lines();
        acknowledged.iter().all(|line| got.contains(line))
    }));
    // A datagram arrives once, unless the app itself sent it twice after an error.
    let mut times: HashMap<String, usize> = HashMap::new();
    for line in received.lines().into_iter().skip(1) {
        *times.entry(line).or_default() += 1;
    }
    for (line, count) in times {
        let retried = failed.iter().any(|error| error.split(' ').nth(1) == line.strip_prefix("s-"));
        assert!(count == 1 || retried, "{line} arrived {count} times");
    }
}
