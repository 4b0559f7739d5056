//! ftss-node, the TUN agent, end to end: each node is a network namespace of its own with the real
//! agent in it, the real ftss-server drains a volume both share, and real programs talk across:
//! ping, a statically linked busybox (nslookup over UDP, wget over TCP), curl and python3's
//! http.server, nc carrying 50 MB, python3 sockets. Faults are real: the receiving agent is killed
//! with SIGKILL mid-transfer, and a node's agent is down while a datagram is sent to it.
//!
//! Needs root (network namespaces, /dev/net/tun); .ci/run installs busybox-static, iputils-ping,
//! curl, dnsmasq and strace.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::history::{Ack, History};
use common::*;

/// One node: its namespace and its agent.
struct Node {
    name: String,
    addr: String,
    netns: String,
    agent: Option<Proc>,
}

/// A fabric whose nodes are namespaces running ftss-node.
struct Nodes {
    fabric: Fabric,
    nodes: Vec<Node>,
}

impl Nodes {
    /// The server, and one namespace per `(node, addr)` (agents not started yet).
    fn new(tag: &str, nodes: &[(&str, &str)]) -> Nodes {
        assert!(Path::new("/dev/net/tun").exists(), "/dev/net/tun is needed");
        let mut fabric = Fabric::new(tag);
        fabric.start_server();
        let nodes = nodes
            .iter()
            .map(|(name, addr)| {
                let netns = format!("ftss-{}-{name}-{}", std::process::id(), fsbridge::random_u64() % 100_000);
                run_ok(Command::new("ip").args(["netns", "add", &netns]));
                run_ok(Command::new("ip").args(["-n", &netns, "link", "set", "lo", "up"]));
                Node { name: name.to_string(), addr: addr.to_string(), netns, agent: None }
            })
            .collect();
        Nodes { fabric, nodes }
    }

    fn node(&self, name: &str) -> &Node {
        self.nodes.iter().find(|node| node.name == name).expect("known node")
    }

    /// Starts `name`'s agent and waits for its interface to be up.
    fn start_agent(&mut self, name: &str) {
        let log_path = self.fabric.dir.0.join(format!("agent-{name}.log"));
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path).unwrap();
        let volume = self.fabric.volume.clone();
        let node = self.nodes.iter_mut().find(|node| node.name == name).expect("known node");
        let child = Command::new("ip")
            .args(["netns", "exec", &node.netns])
            .arg(node_agent_path())
            .env("FTSS_VOLUME", &volume)
            .env("FTSS_NODE", &node.name)
            .env("FTSS_ADDR", &node.addr)
            .env_remove("LD_PRELOAD")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start ftss-node");
        node.agent = Some(Proc { child, name: format!("ftss-node {name}") });
        let netns = node.netns.clone();
        assert!(
            wait_until(Duration::from_secs(10), || {
                Command::new("ip")
                    .args(["-n", &netns, "-o", "addr", "show", "dev", "ftss0"])
                    .output()
                    .is_ok_and(|output| String::from_utf8_lossy(&output.stdout).contains("inet "))
            }),
            "the agent of {name} did not bring ftss0 up: {}",
            self.agent_log(name)
        );
    }

    fn agent_log(&self, name: &str) -> String {
        std::fs::read_to_string(self.fabric.dir.0.join(format!("agent-{name}.log"))).unwrap_or_default()
    }

    fn agent_pid(&self, name: &str) -> u32 {
        self.node(name).agent.as_ref().expect("agent running").child.id()
    }

    /// A command run inside `name`'s namespace (without the shim).
    fn command(&self, name: &str, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.node(name).netns, program]).env_remove("LD_PRELOAD");
        command
    }

    /// `status --json`'s figures for `name`'s IP packets.
    fn ip_counts(&self, name: &str) -> (u64, u64) {
        let status = self.fabric.status();
        let ip = &status["nodes"][name]["ip"];
        (ip["sent"].as_u64().unwrap_or(0), ip["delivered"].as_u64().unwrap_or(0))
    }

    /// `len` random bytes in a file to send, and nc on b listening on port 5000 writing what it
    /// gets into another: (the bytes, their file, the received file, the listener).
    fn tcp_transfer_to_b(&self, len: usize) -> (Vec<u8>, PathBuf, PathBuf, Proc) {
        let data = random_bytes(len);
        let input = self.fabric.dir.0.join("data");
        std::fs::write(&input, &data).unwrap();
        let received = self.fabric.dir.0.join("received");
        let mut listener = self.command("b", "sh");
        listener.arg("-c").arg(format!("nc -l -p 5000 > {}", received.display())).stdin(Stdio::null());
        let listener = Proc { child: listener.spawn().expect("nc -l"), name: "nc -l".into() };
        std::thread::sleep(Duration::from_millis(300));
        (data, input, received, listener)
    }

    /// python3 running `script` on `name`, its stdout lines collected.
    fn python_on(&self, name: &str, script: &str) -> (Proc, LineCollector) {
        let mut command = self.command(name, "python3");
        command.args(["-c", script]).stdout(Stdio::piped()).stderr(Stdio::null());
        let mut child = command.spawn().expect("python3");
        let lines = LineCollector::start(child.stdout.take().unwrap());
        (Proc { child, name: format!("python3 on {name}") }, lines)
    }

    fn logs(&self) -> String {
        let agents: Vec<String> =
            self.nodes.iter().map(|node| format!("agent {}:\n{}", node.name, self.agent_log(&node.name))).collect();
        format!("{}\nserver:\n{}", agents.join("\n"), self.fabric.server_log())
    }
}

impl Drop for Nodes {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut agent) = node.agent.take() {
                agent.kill();
            }
            // Whatever still runs in the namespace goes with it.
            let _ = Command::new("ip").args(["netns", "pids", &node.netns]).output().map(|output| {
                for pid in String::from_utf8_lossy(&output.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
            });
            let _ = Command::new("ip").args(["netns", "del", &node.netns]).status();
        }
    }
}

fn run_ok(command: &mut Command) -> Output {
    let output = command.output().expect("run");
    assert!(output.status.success(), "{command:?}: {}", String::from_utf8_lossy(&output.stderr));
    output
}

fn sha256(bytes: &[u8]) -> String {
    let mut child = Command::new("sha256sum").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    child.stdin.take().unwrap().write_all(bytes).unwrap();
    let output = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&output.stdout).split_whitespace().next().unwrap_or_default().to_owned()
}

fn random_bytes(len: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    std::fs::File::open("/dev/urandom").unwrap().read_exact(&mut bytes).unwrap();
    bytes
}

fn is_static(program: &str) -> bool {
    Command::new("file")
        .arg("-L")
        .arg(program)
        .output()
        .is_ok_and(|output| String::from_utf8_lossy(&output.stdout).contains("statically linked"))
}

/// iputils ping and busybox's static ping both get every echo answered across the array, and
/// status counts the IP packets of each node.
#[test]
fn ping_crosses_the_array_and_status_counts_ip_packets_per_node() {
    let mut nodes = Nodes::new("node-ping", &[("a", "10.77.0.1"), ("b", "10.77.0.2")]);
    nodes.start_agent("a");
    nodes.start_agent("b");
    let output = nodes.command("a", "ping").args(["-c", "5", "-i", "0.2", "-W", "10", "10.77.0.2"]).output().unwrap();
    let said = String::from_utf8_lossy(&output.stdout);
    assert!(said.contains("5 received"), "ping: {said}\n{}", nodes.logs());
    assert!(is_static("/usr/bin/busybox"), "busybox-static is needed (.ci/run installs it)");
    let output = nodes.command("b", "busybox").args(["ping", "-c", "3", "-W", "10", "10.77.0.1"]).output().unwrap();
    let said = String::from_utf8_lossy(&output.stdout);
    assert!(said.contains("3 packets received"), "busybox ping: {said}\n{}", nodes.logs());
    // 8 echo requests and 8 replies each way; a few more may be in flight in status's 250 ms.
    assert!(
        wait_until(Duration::from_secs(5), || {
            let (a, b) = (nodes.ip_counts("a"), nodes.ip_counts("b"));
            a.0 >= 8 && a.1 >= 8 && b.0 >= 8 && b.1 >= 8
        }),
        "status: {}",
        nodes.fabric.status()["nodes"]
    );
    let text = run_ok(Command::new(server_path()).args(["status", "--volume"]).arg(&nodes.fabric.volume));
    assert!(String::from_utf8_lossy(&text.stdout).contains("IP SENT/DELIV/REFUSED"));
}

/// A statically linked resolver (busybox nslookup, UDP) asks dnsmasq on the other node, and so does
/// a Go program (Debian's prometheus-blackbox-exporter: Go's net package makes its system calls
/// itself, which no LD_PRELOAD shim sees), whose ICMP probe crosses too.
#[test]
fn static_and_go_programs_get_answers_from_dnsmasq_across_the_array() {
    assert!(have("dnsmasq"), "dnsmasq is needed (.ci/run installs dnsmasq-base)");
    assert!(is_static("/usr/bin/busybox"), "busybox-static is needed (.ci/run installs it)");
    let mut nodes = Nodes::new("node-dns", &[("a", "10.77.0.1"), ("b", "10.77.0.2")]);
    nodes.start_agent("a");
    nodes.start_agent("b");
    let mut dnsmasq = nodes.command("b", "dnsmasq");
    dnsmasq
        .args([
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--pid-file=",
            "--user=root",
            "--listen-address=10.77.0.2",
            "--bind-interfaces",
            "--log-facility=-",
            "--address=/printer.example.test/10.1.2.3",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let _dnsmasq = Proc { child: dnsmasq.spawn().expect("dnsmasq"), name: "dnsmasq".into() };
    let mut answered = String::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let output = nodes.command("a", "busybox").args(["nslookup", "printer.example.test", "10.77.0.2"]).output();
        answered = output.map(|output| String::from_utf8_lossy(&output.stdout).into_owned()).unwrap_or_default();
        if answered.contains("10.1.2.3") {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(answered.contains("10.1.2.3"), "nslookup said {answered:?}\n{}", nodes.logs());

    assert!(
        have("prometheus-blackbox-exporter"),
        "the Go prober is needed (.ci/run installs prometheus-blackbox-exporter)"
    );
    let config = nodes.fabric.dir.0.join("blackbox.yml");
    std::fs::write(
        &config,
        "modules:\n\
         \x20 dns_udp:\n\
         \x20   prober: dns\n\
         \x20   timeout: 10s\n\
         \x20   dns:\n\
         \x20     transport_protocol: udp\n\
         \x20     preferred_ip_protocol: ip4\n\
         \x20     query_name: printer.example.test\n\
         \x20     query_type: A\n\
         \x20     validate_answer_rrs:\n\
         \x20       fail_if_none_matches_regexp: ['.*10\\.1\\.2\\.3']\n\
         \x20 icmp:\n\
         \x20   prober: icmp\n\
         \x20   timeout: 10s\n\
         \x20   icmp:\n\
         \x20     preferred_ip_protocol: ip4\n",
    )
    .unwrap();
    let mut prober = nodes.command("a", "prometheus-blackbox-exporter");
    prober
        .arg(format!("--config.file={}", config.display()))
        .arg("--web.listen-address=127.0.0.1:9115")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let _prober = Proc { child: prober.spawn().expect("blackbox exporter"), name: "blackbox exporter".into() };
    for (module, target) in [("dns_udp", "10.77.0.2:53"), ("icmp", "10.77.0.2")] {
        let url = format!("http://127.0.0.1:9115/probe?module={module}&target={target}");
        let mut said = String::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline && !said.lines().any(|line| line == "probe_success 1") {
            std::thread::sleep(Duration::from_millis(200));
            let output = nodes.command("a", "curl").args(["-s", "--max-time", "15", &url]).output();
            said = output.map(|output| String::from_utf8_lossy(&output.stdout).into_owned()).unwrap_or_default();
        }
        assert!(said.lines().any(|line| line == "probe_success 1"), "Go {module} probe said {said}\n{}", nodes.logs());
    }
}

/// TCP: python3's http.server on b, fetched by curl and by the static busybox wget on a; and 50 MB
/// through nc, checked by sha256.
#[test]
fn tcp_carries_http_and_fifty_megabytes_intact() {
    let mut nodes = Nodes::new("node-tcp", &[("a", "10.77.0.1"), ("b", "10.77.0.2")]);
    nodes.start_agent("a");
    nodes.start_agent("b");
    let site = nodes.fabric.dir.0.join("site");
    std::fs::create_dir_all(&site).unwrap();
    let page = random_bytes(3 << 20);
    std::fs::write(site.join("page.bin"), &page).unwrap();
    let mut server = nodes.command("b", "python3");
    server
        .args(["-m", "http.server", "8080", "--bind", "10.77.0.2", "--directory"])
        .arg(&site)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let _server = Proc { child: server.spawn().expect("http.server"), name: "http.server".into() };
    let mut fetched = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline && fetched != page {
        let output =
            nodes.command("a", "curl").args(["-sf", "--max-time", "30", "http://10.77.0.2:8080/page.bin"]).output();
        fetched = output.map(|output| output.stdout).unwrap_or_default();
        if fetched != page {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    assert!(fetched == page, "curl got {} of {} bytes\n{}", fetched.len(), page.len(), nodes.logs());
    let output = nodes
        .command("a", "busybox")
        .args(["wget", "-q", "-O", "-", "http://10.77.0.2:8080/page.bin"])
        .output()
        .expect("busybox wget");
    assert!(
        output.stdout == page,
        "busybox wget got {} bytes: {}",
        output.stdout.len(),
        String::from_utf8_lossy(&output.stderr)
    );

    let (data, input, received, mut listener) = nodes.tcp_transfer_to_b(50_000_000);
    let started = Instant::now();
    let mut sender = nodes.command("a", "sh");
    sender.arg("-c").arg(format!("nc -N 10.77.0.2 5000 < {}", input.display()));
    let sent = sender.status().expect("nc");
    assert!(sent.success(), "nc sender failed\n{}", nodes.logs());
    assert!(listener.wait_exit(Duration::from_secs(60)), "the receiving nc did not see the end\n{}", nodes.logs());
    let seconds = started.elapsed().as_secs_f64();
    let got = std::fs::read(&received).unwrap();
    assert_eq!(got.len(), data.len(), "bytes received\n{}", nodes.logs());
    assert_eq!(sha256(&got), sha256(&data), "sha256 of the transfer");
    eprintln!("50 MB over TCP through the array in {seconds:.2} s ({:.1} MB/s)", 50.0 / seconds);
}

/// A python3 program on a sends 16 MB over TCP, paced over a few seconds; the receiving node's
/// agent is killed with SIGKILL mid-transfer and started again. The interface outlives the agent
/// (it is persistent), the server delivers again what the dead agent did not receipt, TCP resends
/// what was dropped meanwhile: the connection survives and every byte arrives in order.
#[test]
fn the_receiving_agent_killed_mid_transfer_leaves_the_tcp_connection_whole() {
    let mut nodes = Nodes::new("node-kill", &[("a", "10.77.0.1"), ("b", "10.77.0.2")]);
    nodes.start_agent("a");
    nodes.start_agent("b");
    let (data, input, received, mut listener) = nodes.tcp_transfer_to_b(16 << 20);
    // 64 KiB every 15 ms: about 4 MB/s, so the transfer lasts about 4 s.
    let pacer = format!(
        "import socket, sys, time\n\
         s = socket.create_connection(('10.77.0.2', 5000), timeout=120)\n\
         data = open('{}', 'rb').read()\n\
         for at in range(0, len(data), 65536):\n\
         \x20   s.sendall(data[at:at + 65536])\n\
         \x20   time.sleep(0.015)\n\
         s.shutdown(socket.SHUT_WR)\n\
         s.recv(1)\n",
        input.display()
    );
    let mut sender = nodes.command("a", "python3");
    sender.args(["-c", &pacer]).stderr(Stdio::piped());
    let mut sender = Proc { child: sender.spawn().expect("python3 sender"), name: "sender".into() };
    // Mid-transfer: some bytes are in, not all.
    assert!(
        wait_until(Duration::from_secs(30), || std::fs::metadata(&received).is_ok_and(|meta| meta.len() > 2 << 20)),
        "the transfer did not start\n{}",
        nodes.logs()
    );
    let pid = nodes.agent_pid("b");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let _ = nodes.nodes.iter_mut().find(|node| node.name == "b").unwrap().agent.take().map(|mut agent| agent.kill());
    let at_kill = std::fs::metadata(&received).map(|meta| meta.len()).unwrap_or(0);
    std::thread::sleep(Duration::from_millis(500));
    nodes.start_agent("b");
    assert!(listener.wait_exit(Duration::from_secs(120)), "the transfer did not end\n{}", nodes.logs());
    assert!(sender.wait_exit(Duration::from_secs(30)), "the sender did not finish");
    let status = sender.child.wait().unwrap();
    let mut errors = String::new();
    sender.child.stderr.take().unwrap().read_to_string(&mut errors).unwrap();
    assert!(status.success(), "the sender's connection failed: {errors}\n{}", nodes.logs());
    let got = std::fs::read(&received).unwrap();
    assert!(at_kill < data.len() as u64, "the agent was killed after the transfer ended");
    assert_eq!(got.len(), data.len(), "bytes received\n{}", nodes.logs());
    assert_eq!(sha256(&got), sha256(&data), "sha256 of the transfer");
}

/// Datagrams sent (python3, UDP) while the destination node's agent is down are stored, and
/// delivered once it starts: each exactly once, intact (checked by history).
#[test]
fn datagrams_sent_while_the_destination_agent_is_down_arrive_once_it_starts() {
    let mut nodes = Nodes::new("node-down", &[("a", "10.77.0.1"), ("b", "10.77.0.2")]);
    nodes.start_agent("a");
    // b registers (its agent starts once), then stops cleanly: its interface goes with it.
    nodes.start_agent("b");
    nodes
        .nodes
        .iter_mut()
        .find(|node| node.name == "b")
        .unwrap()
        .agent
        .take()
        .unwrap()
        .terminate(Duration::from_secs(10));
    let receiver_script = "import socket, sys\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.bind(('0.0.0.0', 7001))\n\
         s.settimeout(60)\n\
         for _ in range(100):\n\
         \x20   data, peer = s.recvfrom(2048)\n\
         \x20   print(peer[0], data.decode(), flush=True)\n";
    let (mut receiver, lines) = nodes.python_on("b", receiver_script);
    let sender_script = "import socket\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         for n in range(100):\n\
         \x20   s.sendto(('datagram-%03d-' % n + 'x' * n).encode(), ('10.77.0.2', 7001))\n\
         \x20   print(n, flush=True)\n";
    let output = nodes.command("a", "python3").args(["-c", sender_script]).output().expect("python3 sender");
    assert!(output.status.success(), "sender: {}", String::from_utf8_lossy(&output.stderr));
    let mut history = History::new();
    for n in 0..100 {
        // TUN's guarantee: durable once the agent read it from the device (the async level); the
        // agent is running and not backed up, so each is expected.
        history.sent(format!("datagram-{n:03}-{}", "x".repeat(n)), Ack::Volume);
    }
    // Stored and held while b has no agent: nothing arrives.
    assert!(
        wait_until(Duration::from_secs(10), || nodes.ip_counts("a").0 >= 100),
        "the server did not store a's packets: {}\n{}",
        nodes.fabric.status()["nodes"],
        nodes.logs()
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(lines.count(), 0, "delivered with no agent running");
    nodes.start_agent("b");
    assert!(receiver.wait_exit(Duration::from_secs(60)), "got {} of 100\n{}", lines.count(), nodes.logs());
    for line in lines.lines() {
        let (peer, payload) = line.split_once(' ').expect("peer payload");
        assert_eq!(peer, "10.77.0.1");
        history.received("receiver", payload);
    }
    history.check().assert_ok("datagrams sent while the agent was down");
}

/// A node that writes IP packets no agent would (malformed, spoofed, or for an address outside the
/// fabric) has them refused with a counted reason; the server keeps running and a sound packet in
/// the same batch is delivered.
#[test]
fn bad_ip_packets_are_refused_by_reason_and_the_server_keeps_running() {
    use fsbridge::format::BatchEncoder;
    use fsbridge::ip::{IP_PORT, checksum};
    use fsbridge::{BatchHeader, BatchKind, NodeConfig, NodeName, Packet, PacketId, Record, Volume};
    use std::net::{Ipv4Addr, SocketAddrV4};

    let mut fabric = Fabric::new("node-refuse");
    let volume = Volume::new(&fabric.volume);
    let (a, b) = (NodeName::new("a").unwrap(), NodeName::new("b").unwrap());
    volume.register_node(&a, &NodeConfig { addr: Ipv4Addr::new(10, 77, 0, 1) }).unwrap();
    volume.register_node(&b, &NodeConfig { addr: Ipv4Addr::new(10, 77, 0, 2) }).unwrap();
    fabric.start_server();
    let ip = |source: [u8; 4], destination: [u8; 4], body: &[u8]| {
        let mut bytes = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 17, 0, 0];
        bytes[2..4].copy_from_slice(&((20 + body.len()) as u16).to_be_bytes());
        bytes.extend_from_slice(&source);
        bytes.extend_from_slice(&destination);
        let sum = checksum(&bytes);
        bytes[10..12].copy_from_slice(&sum.to_be_bytes());
        bytes.extend_from_slice(body);
        bytes
    };
    let good = ip([10, 77, 0, 1], [10, 77, 0, 2], b"sound");
    let mut bad_checksum = good.clone();
    bad_checksum[8] = 1;
    let cases: Vec<([u8; 4], Vec<u8>)> = vec![
        ([10, 77, 0, 2], good.clone()),
        ([10, 77, 0, 2], ip([10, 77, 0, 9], [10, 77, 0, 2], b"spoofed")),
        ([10, 77, 0, 2], bad_checksum),
        ([10, 77, 0, 2], b"not an IP packet at all".to_vec()),
        ([192, 0, 2, 1], ip([10, 77, 0, 1], [192, 0, 2, 1], b"outside")),
    ];
    let header = BatchHeader { kind: BatchKind::Packets, node: a.clone(), epoch: 7, batch_seq: 1, flags: 0 };
    let mut encoder = BatchEncoder::new(&header);
    for (seq, (destination, payload)) in cases.into_iter().enumerate() {
        encoder.push(&Record::Packet(Packet {
            id: PacketId { origin: a.clone(), epoch: 7, seq: seq as u64 + 1 },
            source: SocketAddrV4::new(Ipv4Addr::new(10, 77, 0, 1), IP_PORT),
            destination: SocketAddrV4::new(Ipv4Addr::from(destination), IP_PORT),
            sent_unix_us: fsbridge::unix_now_us(),
            payload,
        }));
    }
    volume.outbox(&a).publish(&fsbridge::layout::batch_file_name(7, 1, "pkt"), &encoder.finish()).unwrap();
    // Node c has a directory and an outbox but no registered address: its record's source is not
    // rewritten, so it could claim a's address; its IP packets are refused.
    let c = NodeName::new("c").unwrap();
    volume.outbox(&c).create().unwrap();
    let header = BatchHeader { kind: BatchKind::Packets, node: c.clone(), epoch: 9, batch_seq: 1, flags: 0 };
    let mut encoder = BatchEncoder::new(&header);
    encoder.push(&Record::Packet(Packet {
        id: PacketId { origin: c.clone(), epoch: 9, seq: 1 },
        source: SocketAddrV4::new(Ipv4Addr::new(10, 77, 0, 1), IP_PORT),
        destination: SocketAddrV4::new(Ipv4Addr::new(10, 77, 0, 2), IP_PORT),
        sent_unix_us: fsbridge::unix_now_us(),
        payload: ip([10, 77, 0, 1], [10, 77, 0, 2], b"posing as a"),
    }));
    volume.outbox(&c).publish(&fsbridge::layout::batch_file_name(9, 1, "pkt"), &encoder.finish()).unwrap();
    let inbox = volume.inbox(&b, IP_PORT);
    assert!(
        wait_until(Duration::from_secs(10), || inbox.list(16).is_ok_and(|names| !names.is_empty())),
        "the sound packet was not delivered: {}",
        fabric.status()
    );
    // status.json is rewritten every 250 ms.
    let mut status = fabric.status();
    assert!(
        wait_until(Duration::from_secs(5), || {
            status = fabric.status();
            status["counters"]["delivered"].as_u64() == Some(1)
                && status["nodes"]["c"]["ip"]["refused"]["the sending node has no registered address"].as_u64()
                    == Some(1)
        }),
        "{}",
        status["nodes"]
    );
    let refused = &status["nodes"]["a"]["ip"]["refused"];
    for reason in [
        "IP source is not the sending node's address",
        "IPv4 header checksum is wrong",
        "not IPv4 (version 6)",
        "IP destination outside the fabric",
    ] {
        assert_eq!(refused[reason].as_u64(), Some(1), "{reason}: {refused}");
    }
    assert_eq!(status["nodes"]["a"]["ip"]["sent"].as_u64(), Some(1), "{}", status["nodes"]);
    assert_eq!(status["counters"]["stored"].as_u64(), Some(1));
    let names = inbox.list(16).unwrap();
    let bytes = inbox.read(&names[0]).unwrap().unwrap();
    let batch = fsbridge::format::decode_batch(&bytes).unwrap();
    let payloads: Vec<Vec<u8>> = batch
        .records
        .into_iter()
        .filter_map(|record| match record {
            Record::Packet(packet) => Some(packet.payload),
            _ => None,
        })
        .collect();
    assert_eq!(payloads, vec![good]);
    assert!(fabric.server.as_mut().unwrap().child.try_wait().unwrap().is_none(), "the server stopped");
}

/// Backpressure: with the server down, the sending agent keeps at most its window of packets
/// (4,096) written and not acked, then stops reading its device, and the kernel drops at the
/// device's queue, as an interface does. Every packet it read is durable: once the server is
/// back, each arrives, once (checked by history), and the agent reads again.
#[test]
fn with_the_server_down_the_agent_stops_at_its_window_and_loses_nothing_it_read() {
    let mut nodes = Nodes::new("node-window", &[("a", "10.77.0.1"), ("b", "10.77.0.2")]);
    nodes.start_agent("a");
    nodes.start_agent("b");
    nodes.fabric.kill_server();
    let receiver_script = "import socket\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)\n\
         s.bind(('10.77.0.2', 7002))\n\
         s.settimeout(8)\n\
         try:\n\
         \x20   while True:\n\
         \x20       data, peer = s.recvfrom(2048)\n\
         \x20       print(data.decode(), flush=True)\n\
         except socket.timeout:\n\
         \x20   pass\n";
    let (mut receiver, lines) = nodes.python_on("b", receiver_script);
    // Paced (40 a millisecond at most), so that the agent, not the device's queue, sets the pace:
    // on a busy machine a burst overruns the queue before the agent has read its window's worth.
    let sender_script = "import socket, time\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         for n in range(30000):\n\
         \x20   try:\n\
         \x20       s.sendto(b'datagram-%05d' % n, ('10.77.0.2', 7002))\n\
         \x20   except OSError:\n\
         \x20       pass\n\
         \x20   if n % 40 == 39:\n\
         \x20       time.sleep(0.001)\n";
    let output = nodes.command("a", "python3").args(["-c", sender_script]).output().expect("python3 sender");
    assert!(output.status.success(), "sender: {}", String::from_utf8_lossy(&output.stderr));
    assert!(
        wait_until(Duration::from_secs(20), || nodes.agent_log("a").contains("window of unacked packets is full")),
        "the agent did not stop at its window\n{}",
        nodes.logs()
    );
    let outbox_bytes: u64 = std::fs::read_dir(nodes.fabric.volume.join("nodes/a/out/log"))
        .unwrap()
        .filter_map(|entry| entry.ok()?.metadata().ok())
        .map(|meta| meta.len())
        .sum();
    nodes.fabric.start_server();
    assert!(receiver.wait_exit(Duration::from_secs(60)), "the receiver did not finish\n{}", nodes.logs());
    let mut history = History::new();
    for n in 0..30000 {
        // Sent before the agent read them: the async level, which promises nothing.
        history.sent(format!("datagram-{n:05}"), Ack::Async);
    }
    for line in lines.lines() {
        history.received("receiver", line);
    }
    let verdict = history.check();
    verdict.assert_ok("datagrams sent into a node whose server was down");
    // Everything the agent read before it stopped was durable: at least its window arrives, and
    // the kernel dropped beyond the window and the device's queue.
    assert!(
        (4096..30000).contains(&verdict.received),
        "received {} of 30000 (outbox held {outbox_bytes} bytes)\n{}",
        verdict.received,
        nodes.logs()
    );
    assert!(nodes.agent_log("a").contains("acks came: reading the device again"), "{}", nodes.logs());
}

/// A start that fails once the TUN device exists leaves no interface behind. The agent used to
/// make the device persistent right after creating it, so a configuration step that failed left a
/// dead, addressless `ftss0` in the node. strace's fault injection fails one system call at a time:
/// each ioctl of the setup after the device's creation (address, netmask, MTU, flags, up, route,
/// persistence), and `capset` (after the device is persistent: the agent must release it).
#[test]
fn a_start_that_fails_while_setting_up_the_interface_leaves_no_interface() {
    assert!(have("strace"), "strace is needed (.ci/run installs it)");
    let mut nodes = Nodes::new("node-setup", &[("a", "10.77.0.1")]);
    let netns = nodes.node("a").netns.clone();
    let interface_exists =
        || Command::new("ip").args(["-n", &netns, "link", "show", "dev", "ftss0"]).output().unwrap().status.success();
    // The setup's ioctls in order: 1 TUNSETIFF, 2 SIOCSIFADDR, 3 SIOCSIFNETMASK, 4 SIOCSIFMTU,
    // 5 SIOCGIFFLAGS, 6 SIOCSIFFLAGS, 7 SIOCADDRT (one route), 8 TUNSETPERSIST.
    let faults: Vec<(String, &str)> = (2..=8)
        .map(|call| (format!("inject=ioctl:error=EPERM:when={call}"), "setting up ftss0"))
        .chain([("inject=capset:error=EPERM".to_string(), "dropping capabilities")])
        .collect();
    for (fault, error) in faults {
        let output = Command::new("ip")
            .args(["netns", "exec", &netns, "strace", "-f", "-qq", "-e", "trace=ioctl,capset", "-e", &fault])
            .arg(node_agent_path())
            .env("FTSS_VOLUME", &nodes.fabric.volume)
            .env("FTSS_NODE", "a")
            .env("FTSS_ADDR", "10.77.0.1")
            .env("FTSS_ROUTES", "10.77.0.0/16")
            .env_remove("LD_PRELOAD")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&output.stderr);
        assert!(said.contains("(INJECTED)"), "{fault}: nothing was injected:\n{said}");
        assert_eq!(output.status.code(), Some(1), "{fault}: the agent did not fail its start:\n{said}");
        assert!(said.contains(error), "{fault}: the agent's error does not say {error:?}:\n{said}");
        assert!(!interface_exists(), "{fault}: a failed start left ftss0 behind:\n{said}");
    }
    // And the same agent, with nothing injected, starts and makes the interface.
    nodes.start_agent("a");
    assert!(interface_exists());
}
