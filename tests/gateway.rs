//! The external network gateway: unshimmed programs on loopback play the outside world; nodes under
//! the shim carry FTSS_EGRESS=127.0.0.0/8 so their replies go out through ftss-server.

mod common;

use std::io::Write;
use std::net::UdpSocket;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::apps::*;
use common::*;

fn register(fabric: &Fabric, name: &str, addr: &str) {
    let node = fsbridge::NodeName::new(name).unwrap();
    let config = fsbridge::NodeConfig { addr: addr.parse().unwrap() };
    fsbridge::Volume::new(&fabric.volume).register_node(&node, &config).unwrap();
}

fn ingress_arg(port: u16, node_port: u16) -> String {
    format!("127.0.0.1:{port}=b:{node_port}")
}

#[test]
fn an_outside_nc_and_an_inside_nc_talk_both_ways() {
    outside_and_inside_nc_talk("gw-nc", 9400, Some("127.0.0.0/8"));
}

/// Replies go back the way they came: the inside nc has no FTSS_EGRESS for the outside peer, yet
/// its replies reach the outside nc, a connected UDP client that accepts them only from the
/// ingress address it sent to (old: they left b's own network from b's own port, and the outside
/// heard nothing).
#[test]
fn replies_to_an_ingress_peer_go_back_through_the_gateway_without_egress_settings() {
    outside_and_inside_nc_talk("gw-reply", 9401, None);
}

/// An outside `nc -u` (no shim, connected to the ingress address) and `nc -u -l` on node b under
/// the shim (with `egress` as its FTSS_EGRESS) exchange three rounds of lines.
fn outside_and_inside_nc_talk(tag: &str, node_port: u16, egress: Option<&str>) {
    let mut fabric = Fabric::new(tag);
    register(&fabric, "b", "10.77.0.2");
    let ingress = free_udp_port();
    fabric.start_server_with(&["--ingress", &ingress_arg(ingress, node_port)]);

    let mut inside = fabric.command("b", "10.77.0.2", "nc");
    if let Some(egress) = egress {
        inside.env("FTSS_EGRESS", egress);
    }
    inside.args(["-u", "-l", &node_port.to_string()]);
    inside.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::null());
    let mut inside = inside.spawn().unwrap();
    let mut inside_stdin = inside.stdin.take().unwrap();
    let inside_heard = LineCollector::start(inside.stdout.take().unwrap());
    let _inside = Proc { child: inside, name: "inside nc".into() };

    let mut outside = Command::new("nc");
    outside.args(["-u", "127.0.0.1", &ingress.to_string()]).env_remove("LD_PRELOAD");
    outside.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::null());
    let mut outside = outside.spawn().unwrap();
    let mut outside_stdin = outside.stdin.take().unwrap();
    let outside_heard = LineCollector::start(outside.stdout.take().unwrap());
    let _outside = Proc { child: outside, name: "outside nc".into() };
    std::thread::sleep(Duration::from_millis(300));

    for round in 0..3 {
        outside_stdin.write_all(format!("from-outside-{round}\n").as_bytes()).unwrap();
        outside_stdin.flush().unwrap();
        assert!(
            wait_until(Duration::from_secs(20), || inside_heard.count() > round),
            "inside did not hear round {round}: {}",
            fabric.status()
        );
        inside_stdin.write_all(format!("from-inside-{round}\n").as_bytes()).unwrap();
        inside_stdin.flush().unwrap();
        assert!(
            wait_until(Duration::from_secs(20), || outside_heard.count() > round),
            "outside did not hear round {round}: {}",
            fabric.status()
        );
    }
    assert_eq!(inside_heard.lines(), ["from-outside-0", "from-outside-1", "from-outside-2"]);
    assert_eq!(outside_heard.lines(), ["from-inside-0", "from-inside-1", "from-inside-2"]);
    // status.json is rewritten four times a second.
    let counted = wait_until(Duration::from_secs(5), || {
        let counters = &fabric.status()["gateway"]["counters"];
        counters["ingress_received"].as_u64() >= Some(3) && counters["egress_sent"].as_u64() >= Some(3)
    });
    assert!(counted, "{}", fabric.status());
}

#[test]
fn ingress_is_stored_while_the_receiver_is_down_and_across_a_server_kill() {
    let mut fabric = Fabric::new("gw-ingress");
    register(&fabric, "b", "10.77.0.2");
    let ingress = free_udp_port();
    let args = ["--ingress".to_string(), ingress_arg(ingress, 9401)];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    fabric.start_server_with(&args);
    let outside = UdpSocket::bind("127.0.0.1:0").unwrap();
    for index in 0..10 {
        outside.send_to(format!("early-{index}").as_bytes(), ("127.0.0.1", ingress)).unwrap();
    }
    assert!(wait_until(Duration::from_secs(20), || fabric.counter("stored") >= 10), "{}", fabric.status());
    // Stored: a kill -9 now must not lose them.
    fabric.kill_server();
    fabric.start_server_with(&args);
    let receiver = Receiver::start_with_source(&fabric, "b", "10.77.0.2", 9401);
    assert!(wait_until(Duration::from_secs(30), || receiver.payloads().len() >= 10), "got {:?}", receiver.payloads());
    let outside_port = outside.local_addr().unwrap().port();
    let expected: Vec<String> = (0..10).map(|index| format!("127.0.0.1 {outside_port} early-{index}")).collect();
    assert_eq!(receiver.payloads(), expected, "not delivered with the outside sender's real address");
}

#[test]
fn ingress_read_while_the_queue_disk_is_full_is_stored_once_space_returns() {
    let mut fabric = Fabric::new("gw-queue-full");
    let disk = SmallDisk::mount(&fabric.queue_dirs[0], "8m");
    register(&fabric, "b", "10.77.0.2");
    let ingress = free_udp_port();
    let args = ["--ingress".to_string(), ingress_arg(ingress, 9402)];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    fabric.start_server_with(&args);
    let receiver = Receiver::start_with_source(&fabric, "b", "10.77.0.2", 9402);
    let filler = disk.fill();
    let outside = UdpSocket::bind("127.0.0.1:0").unwrap();
    // Together more than the page the queue segment may still have room in.
    let pad = "p".repeat(2000);
    for index in 0..3 {
        outside.send_to(format!("full-{index}{pad}").as_bytes(), ("127.0.0.1", ingress)).unwrap();
    }
    // The server reads them from its socket and cannot store them: the cycle's sync fails (and
    // while it keeps what it read, the rest wait in the socket).
    let received = || fabric.status()["gateway"]["counters"]["ingress_received"].as_u64().unwrap_or(0);
    assert!(wait_until(Duration::from_secs(20), || received() >= 1), "{}", fabric.status());
    assert!(
        wait_until(Duration::from_secs(20), || fabric.status()["backpressure"]["active"] == true),
        "{}",
        fabric.status()
    );
    // Failed cycles for a while (the first may still have fit in the segment's last page).
    std::thread::sleep(Duration::from_secs(1));
    std::fs::remove_file(&filler).unwrap();
    assert!(
        wait_until(Duration::from_secs(30), || receiver.payloads().len() >= 3),
        "got {}",
        receiver.payloads().len()
    );
    let outside_port = outside.local_addr().unwrap().port();
    let expected: Vec<String> = (0..3).map(|index| format!("127.0.0.1 {outside_port} full-{index}{pad}")).collect();
    assert_eq!(receiver.payloads(), expected);
    // The status file is rewritten every 250 ms, so its counter may lag the delivery.
    assert!(wait_until(Duration::from_secs(10), || received() >= 3), "{}", fabric.status());
    assert_eq!(received(), 3, "read once, kept across the failed cycles");
}

#[test]
fn egress_is_best_effort_acked_and_a_closed_port_blocks_nothing() {
    let mut fabric = Fabric::new("gw-egress");
    fabric.start_server();
    let open = UdpSocket::bind("127.0.0.1:0").unwrap();
    open.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let open_port = open.local_addr().unwrap().port();
    let closed_port = free_udp_port();
    let script = format!(
        "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         for n in range(10):\n    s.sendto(f'out-{{n}}'.encode(), ('127.0.0.1', {open_port}))\n\
         for n in range(10):\n    s.sendto(b'nobody', ('127.0.0.1', {closed_port}))\n"
    );
    let output = fabric
        .command("a", "10.77.0.1", "python3")
        .args(["-c", &script])
        .env("FTSS_EGRESS", "127.0.0.0/8")
        .env("FTSS_ACK", "guaranteed")
        .env("FTSS_TIMEOUT", "20")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "guaranteed sends to the outside did not return: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let mut buffer = [0u8; 100];
    for index in 0..10 {
        let (length, _) = open.recv_from(&mut buffer).expect("egress datagram");
        assert_eq!(&buffer[..length], format!("out-{index}").as_bytes());
    }
    assert!(
        wait_until(Duration::from_secs(10), || fabric.status()["gateway"]["counters"]["egress_sent"].as_u64()
            >= Some(20)),
        "{}",
        fabric.status()
    );
    let status = fabric.status();
    assert_eq!(status["queue"]["packets"], 0, "{status}");
    assert_eq!(status["counters"]["dead_lettered"], 0, "{status}");
}

/// dig (outside, no shim) asks dnsmasq on node b through an ingress mapping and gets its answer:
/// dnsmasq learns where the query came to from IP_PKTINFO (which the shim supplies for fabric
/// datagrams) and its reply goes back through the gateway from the ingress port, the only source
/// dig accepts. dnsmasq runs in its default mode: it drops root for `nobody` once its socket is
/// bound, on a volume whose root only root may enter; the shim's privilege helper (forked before
/// the drop, still root) makes its volume operations.
#[test]
fn dig_gets_answers_from_dnsmasq_on_a_node_behind_ingress() {
    assert!(
        have("dnsmasq") && have("dig"),
        "dnsmasq and dig are needed (.ci/run installs dnsmasq-base and bind9-dnsutils)"
    );
    let mut fabric = Fabric::new("gw-dns");
    std::fs::set_permissions(&fabric.volume, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    register(&fabric, "b", "10.77.0.2");
    let ingress = free_udp_port();
    fabric.start_server_with(&["--ingress", &ingress_arg(ingress, 5399)]);
    let mut dnsmasq = fabric.command("b", "10.77.0.2", "dnsmasq");
    dnsmasq
        .args([
            "--keep-in-foreground",
            "--port=5399",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--pid-file=",
            "--log-facility=-",
            "--log-queries",
            "--address=/printer.example.test/10.1.2.3",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut dnsmasq = dnsmasq.spawn().expect("dnsmasq");
    let said = LineCollector::start(dnsmasq.stderr.take().unwrap());
    let pid = dnsmasq.id();
    let _dnsmasq = Proc { child: dnsmasq, name: "dnsmasq".into() };
    assert!(
        wait_until(Duration::from_secs(10), || said.lines().iter().any(|line| line.contains("started"))),
        "{:?}",
        said.lines()
    );
    assert!(
        wait_until(Duration::from_secs(10), || dropped_root(pid)),
        "dnsmasq did not drop root: {:?}",
        uid_line(pid)
    );
    for round in 0..3 {
        let output = Command::new("dig")
            .args(["@127.0.0.1", "-p", &ingress.to_string(), "+short", "+tries=2", "+time=10", "printer.example.test"])
            .env_remove("LD_PRELOAD")
            .output()
            .expect("dig");
        let answer = String::from_utf8_lossy(&output.stdout).trim().to_string();
        assert_eq!(
            answer,
            "10.1.2.3",
            "round {round}: dig said {answer:?}\ndnsmasq: {:?}\nb: {}\n{}",
            said.lines(),
            fabric.node_log("b"),
            fabric.status()
        );
    }
    // The helper goes when the app does (the app's end of its socket closes).
    let log = fabric.node_log("b");
    let helper: u32 = log
        .lines()
        .find_map(|line| line.split("helper ").nth(1)?.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no privilege helper in the log:\n{log}"));
    drop(_dnsmasq);
    assert!(
        wait_until(Duration::from_secs(10), || {
            // Gone, or a zombie waiting for whoever adopted it.
            std::fs::read_to_string(format!("/proc/{helper}/stat"))
                .map_or(true, |stat| stat.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')))
        }),
        "helper {helper} outlived dnsmasq"
    );
}
