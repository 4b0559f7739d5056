//! ftss on a real SMB volume: Samba's smbd on loopback, mounted by smbnetfs (FUSE). Both nodes use
//! the mount; ftss-server works on the share's own directory, as it would on the array.

mod common;

use std::collections::HashMap;
use std::process::Stdio;
use std::time::Duration;

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

/// Sends "s-<n>" for n in 0..count; an app that sees an error retries (with a new packet) and says
/// so: "ok n" once a send returned, "err n <errno>" for each failure.
const PY_RETRYING_SENDER: &str = r#"
import socket, sys, time
count = int(sys.argv[1])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for n in range(count):
    while True:
        try:
            s.sendto(f"s-{n}".encode(), ("10.77.0.2", 9101))
            print(f"ok {n}", flush=True)
            break
        except OSError as error:
            print(f"err {n} {error.errno}", flush=True)
            time.sleep(0.2)
"#;

const PY_RECEIVER: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 9101))
print("ready", flush=True)
while True:
    data, _ = s.recvfrom(65535)
    print(data.decode(), flush=True)
"#;

#[test]
fn smbd_killed_mid_transfer_loses_nothing_acknowledged_and_traffic_resumes() {
    let share = SmbShare::start("smb-kill");
    let mut fabric = Fabric::with_volume("smb-kill-fabric", share.local.clone());
    fabric.start_server();
    let mut nodes = Fabric::with_volume("smb-kill-nodes", share.mounted.clone());
    nodes.dir = TempDir::new("smb-kill-logs");

    let mut receiver = nodes.command("b", "10.77.0.2", "python3");
    receiver.args(["-c", PY_RECEIVER]).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null());
    let mut receiver = receiver.spawn().unwrap();
    let received = LineCollector::start(receiver.stdout.take().unwrap());
    let _receiver = Proc { child: receiver, name: "receiver".into() };
    assert!(wait_until(Duration::from_secs(20), || received.count() >= 1));

    let count = 300;
    let mut sender = nodes.command("a", "10.77.0.1", "python3");
    sender.args(["-c", PY_RETRYING_SENDER, &count.to_string()]).env("FTSS_TIMEOUT", "5");
    sender.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null());
    let mut sender = sender.spawn().unwrap();
    let said = LineCollector::start(sender.stdout.take().unwrap());
    let mut sender = Proc { child: sender, name: "sender".into() };

    assert!(wait_until(Duration::from_secs(60), || said.count() >= 100), "sender too slow: {}", said.count());
    share.kill_smbd();
    std::thread::sleep(Duration::from_secs(2));
    share.start_smbd();
    assert!(sender.wait_exit(Duration::from_secs(180)), "traffic did not resume: {:?}", said.lines().last());

    let said = said.lines();
    let acknowledged: Vec<String> =
        said.iter().filter_map(|line| line.strip_prefix("ok ")).map(|n| format!("s-{n}")).collect();
    assert_eq!(acknowledged.len(), count);
    let failed: Vec<String> = said.iter().filter(|line| line.starts_with("err ")).cloned().collect();
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
