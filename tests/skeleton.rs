//! The walking skeleton end to end: real nc and python3 under the real shim, the real ftss-server,
//! a local directory as the volume.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

fn numbered_lines(count: usize, tag: &str) -> Vec<String> {
    (0..count).map(|index| format!("{tag}-line-{index:05}-{}", "x".repeat(index % 40))).collect()
}

/// Waits up to `limit` for every sent line, gives a duplicate time to show up, then judges.
fn expect_in_order_exactly_once(received: &LineCollector, sent: &[String], limit: Duration) {
    assert!(
        wait_until(limit, || received.count() >= sent.len()),
        "only {} of {} lines arrived",
        received.count(),
        sent.len()
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_in_order_exactly_once(&received.lines(), sent);
}

/// Splits received output back into lines (nc may join several lines into one datagram).
fn assert_in_order_exactly_once(received: &[String], sent: &[String]) {
    let missing: Vec<_> = sent.iter().filter(|line| !received.contains(line)).take(5).collect();
    assert!(
        missing.is_empty(),
        "{} of {} lines missing, e.g. {missing:?}",
        sent.len() - received.len().min(sent.len()),
        sent.len()
    );
    assert_eq!(received.len(), sent.len(), "duplicates or extra lines received");
    assert_eq!(received, sent, "lines out of order");
}

#[test]
fn thousand_nc_lines_cross_volume_and_queue_in_order_exactly_once() {
    let mut fabric = Fabric::new("nc1000");
    fabric.start_server();
    let (mut listener, received) = nc_listener(&fabric, "b", "10.77.0.2", 9000);
    std::thread::sleep(Duration::from_millis(300));
    let lines = numbered_lines(1000, "a");
    assert!(nc_send_lines(&fabric, "a", "10.77.0.1", "10.77.0.2", 9000, &lines), "sender nc did not exit");
    expect_in_order_exactly_once(&received, &lines, Duration::from_secs(60));
    listener.kill();

    assert!(wait_until(Duration::from_secs(10), || fabric.counter("receipted") >= fabric.counter("stored")));
    let status = fabric.status();
    let counters = &status["counters"];
    let stored = counters["stored"].as_u64().unwrap();
    assert!(stored >= 1, "nothing stored: {status}");
    assert_eq!(counters["drained"], counters["stored"], "{status}");
    assert!(counters["delivered"].as_u64().unwrap() >= stored, "{status}");
    assert_eq!(counters["receipted"].as_u64().unwrap(), stored, "{status}");
    assert_eq!(status["queue"]["packets"], 0, "{status}");
    assert_eq!(counters["quarantined"], 0, "{status}");
    // nc's shim (FTSS_ACK=volume) waits for no acks, so the server wrote no ack files for it.
    assert!(files_in(&fabric.volume.join("nodes/a/ack/new")).is_empty(), "ack files nobody reads");
}

#[test]
fn lines_sent_while_the_server_is_down_arrive_when_it_starts() {
    let mut fabric = Fabric::new("server-late");
    let (mut listener, received) = nc_listener(&fabric, "b", "10.77.0.2", 9001);
    std::thread::sleep(Duration::from_millis(300));
    let lines = numbered_lines(50, "held");
    // The sends are accepted (nc writes them all and exits) although no server runs.
    assert!(nc_send_lines(&fabric, "a", "10.77.0.1", "10.77.0.2", 9001, &lines), "sender blocked without a server");
    assert!(!outbox_entries(&fabric.volume, "a").is_empty(), "nothing held in the outbox");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(received.count(), 0, "delivered without a server?");

    fabric.start_server();
    expect_in_order_exactly_once(&received, &lines, Duration::from_secs(30));
    // nc sealed its outbox log at exit, so the server removes it once read.
    assert!(
        wait_until(Duration::from_secs(10), || outbox_entries(&fabric.volume, "a").is_empty()),
        "outbox not drained: {:?}",
        outbox_entries(&fabric.volume, "a")
    );
    listener.kill();
}

#[test]
fn lines_sent_before_the_receiver_starts_arrive_when_it_binds() {
    let mut fabric = Fabric::new("receiver-late");
    fabric.start_server();
    // Node b must be registered so the server can route to it; a previous run of its app did that.
    fsbridge::Volume::new(&fabric.volume)
        .register_node(
            &fsbridge::NodeName::new("b").unwrap(),
            &fsbridge::NodeConfig { addr: "10.77.0.2".parse().unwrap() },
        )
        .unwrap();
    let lines = numbered_lines(50, "early");
    assert!(nc_send_lines(&fabric, "a", "10.77.0.1", "10.77.0.2", 9002, &lines));
    // Held on the volume in b's inbox for port 9002.
    let inbox = fabric.volume.join("nodes/b/in/9002/new");
    assert!(wait_until(Duration::from_secs(10), || !files_in(&inbox).is_empty()), "not delivered to b's inbox");
    let (mut listener, received) = nc_listener(&fabric, "b", "10.77.0.2", 9002);
    expect_in_order_exactly_once(&received, &lines, Duration::from_secs(30));
    listener.kill();
    assert!(
        wait_until(Duration::from_secs(10), || fabric.status()["queue"]["packets"] == 0),
        "not receipted: {}",
        fabric.status()
    );
}

const PY_RECEIVER: &str = r#"
import socket, sys, hashlib
count = int(sys.argv[1])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[2])))
s.settimeout(60)
print("ready", flush=True)
for _ in range(count):
    data, addr = s.recvfrom(65535)
    print(addr[0], addr[1], len(data), hashlib.sha256(data).hexdigest(), flush=True)
"#;

const PY_SENDER: &str = r#"
import socket, sys, random, hashlib
count, port, seed = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("10.77.0.1", 5555))
for _ in range(count):
    data = rng.randbytes(rng.randint(0, 8192))
    assert s.sendto(data, ("10.77.0.2", port)) == len(data)
    print(len(data), hashlib.sha256(data).hexdigest(), flush=True)
"#;

#[test]
fn python_sender_and_receiver_exchange_random_datagrams_byte_exact() {
    let mut fabric = Fabric::new("python");
    fabric.start_server();
    let count = 1000;
    let mut receiver = fabric.command("b", "10.77.0.2", "python3");
    receiver.args(["-c", PY_RECEIVER, &count.to_string(), "7000"]).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut receiver = receiver.spawn().unwrap();
    let received = LineCollector::start(receiver.stdout.take().unwrap());
    assert!(wait_until(Duration::from_secs(10), || received.count() >= 1), "receiver not ready");

    let sender = fabric
        .command("a", "10.77.0.1", "python3")
        .args(["-c", PY_SENDER, &count.to_string(), "7000", "42"])
        .output()
        .unwrap();
    assert!(sender.status.success(), "sender failed: {}", String::from_utf8_lossy(&sender.stderr));
    let sent: Vec<String> = String::from_utf8(sender.stdout).unwrap().lines().map(str::to_owned).collect();
    assert_eq!(sent.len(), count);

    assert!(wait_until(Duration::from_secs(60), || received.count() > count), "only {} arrived", received.count() - 1);
    let status = receiver.wait().unwrap();
    assert!(status.success(), "receiver failed");
    let got: Vec<String> = received.lines()[1..].to_vec();
    for (index, (line, expected)) in got.iter().zip(&sent).enumerate() {
        assert_eq!(line, &format!("10.77.0.1 5555 {expected}"), "datagram {index} differs");
    }
}

#[test]
fn without_ftss_volume_nc_over_real_loopback_is_unchanged() {
    let port = free_udp_port();
    let shim = shim_path();
    let mut listener = Command::new("nc")
        .args(["-u", "-l", "127.0.0.1", &port.to_string()])
        .env("LD_PRELOAD", &shim)
        .env_remove("FTSS_VOLUME")
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let received = LineCollector::start(listener.stdout.take().unwrap());
    std::thread::sleep(Duration::from_millis(300));
    let mut sender = Command::new("nc")
        .args(["-u", "-q", "1", "127.0.0.1", &port.to_string()])
        .env("LD_PRELOAD", &shim)
        .env_remove("FTSS_VOLUME")
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = sender.stdin.take().unwrap();
    for index in 0..20 {
        writeln!(stdin, "plain-{index}").unwrap();
        stdin.flush().unwrap();
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(stdin);
    assert!(wait_until(Duration::from_secs(10), || received.count() >= 20), "got {:?}", received.lines());
    let expected: Vec<String> = (0..20).map(|index| format!("plain-{index}")).collect();
    assert_eq!(received.lines(), expected);
    let _ = sender.wait();
    let _ = listener.kill();
    let _ = listener.wait();
}

#[test]
fn corrupt_outbox_file_is_quarantined_and_delivery_continues() {
    let mut fabric = Fabric::new("corrupt");
    fabric.start_server();
    let (mut listener, received) = nc_listener(&fabric, "b", "10.77.0.2", 9003);
    std::thread::sleep(Duration::from_millis(300));
    let first = numbered_lines(10, "before");
    // One sender throughout: nc -l talks only to the first peer it heard from, like real UDP nc.
    let mut sender = NcSender::start(&fabric, "a", "10.77.0.1", "10.77.0.2", 9003);
    sender.send(&first);
    assert!(wait_until(Duration::from_secs(20), || received.count() >= first.len()));

    // Garbage published the way a broken writer would: complete, renamed into new/.
    let outbox = fabric.volume.join("nodes/a/out");
    std::fs::write(
        outbox.join("tmp/0000000000000000-0000000000000001.pkt"),
        b"FTSB\x01\x00garbage that is not a batch",
    )
    .unwrap();
    std::fs::rename(
        outbox.join("tmp/0000000000000000-0000000000000001.pkt"),
        outbox.join("new/0000000000000000-0000000000000001.pkt"),
    )
    .unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || fabric.counter("quarantined") >= 1),
        "not quarantined: {}",
        fabric.status()
    );

    let quarantine = fabric.volume.join("quarantine");
    let names = files_in(&quarantine);
    let reason = names.iter().find(|name| name.ends_with(".reason")).expect("reason file");
    let text = std::fs::read_to_string(quarantine.join(reason)).unwrap();
    assert!(text.contains("reason: unknown batch kind 103"), "reason does not say why: {text}");
    let moved = names.iter().find(|name| !name.ends_with(".reason")).expect("quarantined file");
    assert_eq!(
        std::fs::read(quarantine.join(moved)).unwrap(),
        b"FTSB\x01\x00garbage that is not a batch",
        "content altered"
    );

    let second = numbered_lines(10, "after");
    sender.send(&second);
    assert!(sender.finish(Duration::from_secs(20)));
    let all: Vec<String> = first.iter().chain(&second).cloned().collect();
    expect_in_order_exactly_once(&received, &all, Duration::from_secs(20));
    listener.kill();
    assert!(fabric.server.as_mut().unwrap().child.try_wait().unwrap().is_none(), "server died");
}
