//! The fabric transport end to end: real nc and python3 under the real shim with
//! FTSS_TRANSPORT=fabric (no volume on the node), the real ftss-server listening on a unix socket
//! and on loopback TCP, a volume node and a fabric node talking, a server killed with SIGKILL mid
//! transfer, nodes with wrong keys and claimed addresses, and hostile frame streams.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::apps::{Receiver, Sender, expected};
use common::history::{Ack, History};
use common::*;
use fsbridge::fabric::{self, FABRIC_VERSION, Frame, Hello};
use fsbridge::{BatchEncoder, BatchHeader, BatchKind, NodeName, Packet, PacketId, Record};

/// The server's unix socket endpoint in the test's directory.
fn unix_endpoint(fabric: &Fabric) -> String {
    format!("unix:{}", fabric.dir.0.join("fabric.sock").display())
}

/// A fabric whose server listens on a unix socket, with these nodes using it; also the socket's path.
fn listening_fabric(tag: &str, nodes: &[&str]) -> (Fabric, std::path::PathBuf) {
    let mut fabric = Fabric::new(tag);
    let endpoint = unix_endpoint(&fabric);
    fabric.start_server_with(&["--fabric-listen", &endpoint]);
    for node in nodes {
        fabric.use_fabric(node, &endpoint);
    }
    let path = fabric.dir.0.join("fabric.sock");
    (fabric, path)
}

fn tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Waits for every line of `sent`, then checks order and that nothing came twice.
fn expect_exactly(received: &LineCollector, sent: &[String], limit: Duration) {
    assert!(
        wait_until(limit, || received.count() >= sent.len()),
        "only {} of {} lines arrived: {:?}",
        received.count(),
        sent.len(),
        received.lines().iter().take(5).collect::<Vec<_>>()
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(received.lines(), sent, "lines missing, repeated or out of order");
}

fn lines(tag: &str, count: usize) -> Vec<String> {
    (0..count).map(|index| format!("{tag}-{index:04}")).collect()
}

fn fabric_counter(fabric: &Fabric, name: &str) -> u64 {
    fabric.status()["fabric"]["counters"][name].as_u64().unwrap_or(0)
}

#[test]
fn nc_to_nc_over_unix_and_tcp_fabric_connections() {
    let mut fabric = Fabric::new("fabric-nc");
    let unix = unix_endpoint(&fabric);
    let port = tcp_port();
    let listen_tcp = format!("tcp:127.0.0.1:{port}");
    fabric.start_server_with(&["--fabric-listen", &unix, "--fabric-listen", &listen_tcp]);
    fabric.use_fabric("b", &unix);
    fabric.use_fabric("a", &listen_tcp);

    let (mut listener, received) = nc_listener(&fabric, "b", "10.77.0.2", 9100);
    assert!(
        wait_until(Duration::from_secs(10), || fabric.status()["fabric"]["connections"]
            .as_array()
            .is_some_and(|connections| connections.iter().any(|c| c["ports"] == serde_json::json!([9100])))),
        "the receiver never announced its port: {}",
        fabric.status()["fabric"]
    );
    let sent = lines("tcp-to-unix", 500);
    assert!(nc_send_lines(&fabric, "a", "10.77.0.1", "10.77.0.2", 9100, &sent), "sender nc did not exit");
    expect_exactly(&received, &sent, Duration::from_secs(60));
    listener.kill();

    // nc may join lines into one datagram: count datagrams as the server stored them.
    assert!(wait_until(Duration::from_secs(10), || fabric.counter("receipted") >= fabric.counter("stored")));
    let status = fabric.status();
    let stored = status["counters"]["stored"].as_u64().unwrap();
    assert!(stored >= 1, "{status}");
    assert_eq!(status["counters"]["drained_files"], 0, "nothing went through outbox files: {status}");
    assert_eq!(status["queue"]["packets"], 0, "{status}");
    assert_eq!(status["fabric"]["counters"]["packets_received"], stored, "{}", status["fabric"]);
    assert!(status["fabric"]["counters"]["packets_delivered"].as_u64().unwrap() >= stored, "{}", status["fabric"]);
    assert_eq!(status["nodes"]["b"]["addr"], "10.77.0.2", "the server registered the fabric node: {status}");
    assert!(!fabric.volume.join("nodes/a/out/new").read_dir().unwrap().any(|_| true), "no outbox files");
    assert!(fabric.node_log("a").contains("fabric: connected to tcp:"), "{}", fabric.node_log("a"));
}

#[test]
fn a_volume_node_and_a_fabric_node_talk_both_ways() {
    let mut fabric = Fabric::new("fabric-mixed");
    let endpoint = unix_endpoint(&fabric);
    fabric.start_server_with(&["--fabric-listen", &endpoint]);
    fabric.use_fabric("b", &endpoint);

    let (mut at_a, from_b) = nc_listener(&fabric, "a", "10.77.0.1", 9201);
    let (mut at_b, from_a) = nc_listener(&fabric, "b", "10.77.0.2", 9202);
    std::thread::sleep(Duration::from_millis(500));
    let to_b = lines("volume-to-fabric", 200);
    let to_a = lines("fabric-to-volume", 200);
    assert!(nc_send_lines(&fabric, "a", "10.77.0.1", "10.77.0.2", 9202, &to_b));
    assert!(nc_send_lines(&fabric, "b", "10.77.0.2", "10.77.0.1", 9201, &to_a));
    expect_exactly(&from_a, &to_b, Duration::from_secs(60));
    expect_exactly(&from_b, &to_a, Duration::from_secs(60));
    at_a.kill();
    at_b.kill();
    let status = fabric.status();
    assert!(status["counters"]["drained_log_frames"].as_u64().unwrap() >= 1, "a used its outbox: {status}");
    assert!(fabric_counter(&fabric, "packets_received") >= 1, "b sent over the fabric: {}", status["fabric"]);
    assert!(fabric_counter(&fabric, "packets_delivered") >= 1, "b received over the fabric: {}", status["fabric"]);
}

#[test]
fn packets_waiting_in_the_volume_inbox_go_to_a_fabric_socket_that_binds_later() {
    let mut fabric = Fabric::new("fabric-late");
    let endpoint = unix_endpoint(&fabric);
    fabric.start_server_with(&["--fabric-listen", &endpoint]);
    fabric.use_fabric("b", &endpoint);
    // b connects once (so its address is registered), then its app goes away.
    let (mut first, _) = nc_listener(&fabric, "b", "10.77.0.2", 9301);
    assert!(wait_until(Duration::from_secs(10), || fabric.status()["nodes"]["b"]["addr"] == "10.77.0.2"));
    first.kill();
    std::thread::sleep(Duration::from_millis(300));

    let sent = lines("while-away", 100);
    assert!(nc_send_lines(&fabric, "a", "10.77.0.1", "10.77.0.2", 9301, &sent));
    let inbox = fabric.volume.join("nodes/b/in/9301/new");
    assert!(
        wait_until(Duration::from_secs(10), || !files_in(&inbox).is_empty()),
        "with no fabric socket on the port, the server delivers into the volume inbox"
    );
    let (mut later, received) = nc_listener(&fabric, "b", "10.77.0.2", 9301);
    expect_exactly(&received, &sent, Duration::from_secs(30));
    later.kill();
    assert!(files_in(&inbox).is_empty(), "the server took its inbox files back: {:?}", files_in(&inbox));
}

/// Kills the server (and starts it again with `arguments`) while `sender` sends `count` datagrams
/// to `receiver`, at least three times; then checks the history: every acked datagram received,
/// none twice, even after a redelivery would have come. Returns the number of kills.
fn kill_server_during(
    fabric: &mut Fabric,
    arguments: &[&str],
    sender: &mut Sender,
    receiver: &Receiver,
    count: usize,
    pause: impl Fn(u64) -> Duration,
) -> u64 {
    let mut kills = 0;
    while kills < 6 && sender.acknowledged().len() < count {
        std::thread::sleep(pause(kills));
        fabric.kill_server();
        kills += 1;
        std::thread::sleep(Duration::from_millis(200));
        fabric.start_server_with(arguments);
    }
    assert!(kills >= 3, "the transfer ended before the server was killed three times");
    assert!(sender.proc.wait_exit(Duration::from_secs(120)), "sender did not finish");
    assert_eq!(sender.acknowledged().len(), count, "errors: {:?}", sender.errors());
    assert!(
        wait_until(Duration::from_secs(60), || receiver.payloads().len() >= count),
        "{} of {count} received after {kills} kills",
        receiver.payloads().len()
    );
    std::thread::sleep(Duration::from_secs(3)); // a redelivery would show up now
    let mut history = History::new();
    sender.record(&mut history, Ack::Volume);
    receiver.record(&mut history, "receiver");
    history.check().assert_ok(&format!("{kills} kills of the server during a fabric transfer"));
    kills
}

#[test]
fn server_killed_during_a_fabric_transfer_loses_nothing_acknowledged_and_repeats_nothing() {
    let mut fabric = Fabric::new("fabric-kill");
    let port = tcp_port();
    let listen = format!("tcp:127.0.0.1:{port}");
    let unix = unix_endpoint(&fabric);
    let arguments = ["--fabric-listen", listen.as_str(), "--fabric-listen", unix.as_str(), "--redeliver-after", "2s"];
    fabric.start_server_with(&arguments);
    fabric.use_fabric("a", &listen);
    fabric.use_fabric("b", &unix);
    let receiver = Receiver::start(&fabric, 9400);
    let count = 3000;
    let mut sender = Sender::start(&fabric, 9400, "k", count, 100);
    let pause = |kills| Duration::from_millis(250 + 100 * kills);
    kill_server_during(&mut fabric, &arguments, &mut sender, &receiver, count, pause);
    assert!(fabric.node_log("a").contains("reconnecting"), "{}", fabric.node_log("a"));
}

/// Threads of one process share its connection: a blocking sender writes its own frame when no one
/// else is writing, the others leave theirs to the flusher, and every reconnect sends again what
/// is unacked. Through kills of the server, the history holds.
#[test]
fn threads_sharing_a_fabric_connection_through_server_kills_lose_nothing_acknowledged_and_repeat_nothing() {
    let mut fabric = Fabric::new("fabric-threads");
    let unix = unix_endpoint(&fabric);
    let arguments = ["--fabric-listen", unix.as_str(), "--redeliver-after", "2s"];
    fabric.start_server_with(&arguments);
    fabric.use_fabric("a", &unix);
    fabric.use_fabric("b", &unix);
    let receiver = Receiver::start(&fabric, 9410);
    let (threads, each) = (6, 3000);
    let mut sender = Sender::start_threads(&fabric, 9410, "t", threads, each);
    let pause = |kills| Duration::from_millis(150 + 50 * kills);
    kill_server_during(&mut fabric, &arguments, &mut sender, &receiver, threads * each, pause);
    // Each outage is about a second, within every send's wait for its ack: a packet left behind
    // in the outbox would show as a send that timed out.
    assert!(sender.errors().is_empty(), "{:?}", sender.errors());
}

/// After a group's acks the server waits for those senders' next packets, so that one sync takes
/// them all: spinning by default, or sleeping in poll with `--fabric-gather sleep`. Either way
/// every packet arrives exactly once, every send is acked, and status counts the waits.
#[test]
fn the_wait_for_acked_fabric_senders_spins_or_sleeps_and_status_counts_it() {
    for mode in ["spin", "sleep"] {
        let mut fabric = Fabric::new(&format!("fabric-gather-{mode}"));
        let unix = unix_endpoint(&fabric);
        fabric.start_server_with(&["--fabric-listen", unix.as_str(), "--fabric-gather", mode]);
        fabric.use_fabric("a", &unix);
        fabric.use_fabric("b", &unix);
        let receiver = Receiver::start(&fabric, 9420);
        let (threads, each) = (4, 500);
        let mut sender = Sender::start_threads(&fabric, 9420, mode, threads, each);
        assert!(sender.proc.wait_exit(Duration::from_secs(120)), "{mode}: sender did not finish");
        assert_eq!(sender.acknowledged().len(), threads * each, "{mode}: errors: {:?}", sender.errors());
        assert!(
            wait_until(Duration::from_secs(60), || receiver.payloads().len() >= threads * each),
            "{mode}: {} of {} received",
            receiver.payloads().len(),
            threads * each
        );
        std::thread::sleep(Duration::from_secs(1));
        let mut history = History::new();
        sender.record(&mut history, Ack::Volume);
        receiver.record(&mut history, "receiver");
        history.check().assert_ok(&format!("fabric senders with --fabric-gather {mode}"));
        let counters = fabric.status()["counters"].clone();
        let met = counters["fabric_gathers_met"].as_u64().unwrap_or(0);
        let ran_out = counters["fabric_gathers_ran_out"].as_u64().unwrap_or(0);
        // Every cycle that acked fabric packets waits once; closed-loop senders of 2,000 packets
        // need at least 500 such cycles (at most one packet of each thread in each).
        assert!(met + ran_out >= each as u64 / 2, "{mode}: {counters}");
        assert!(met >= 1, "{mode}: no wait ever saw its senders come back: {counters}");
        let spun = counters["fabric_gathers_spun"].as_u64().unwrap_or(0);
        match mode {
            "spin" => assert!(spun >= 1, "{mode}: no wait spun: {counters}"),
            _ => assert_eq!(spun, 0, "{mode}: a wait spun: {counters}"),
        }
    }
}

/// A sender writes its own frame only into a connection with room: with the server stopped (its
/// socket full of unread frames), a single-threaded app's send still fails after FTSS_TIMEOUT,
/// having waited for its ack with its signals deliverable, and its thread dies at once on a
/// SIGTERM sent to it alone. (A sender that wrote into the full socket itself would wait there,
/// signals held, until the connection's write timeout.)
#[test]
fn a_sender_whose_server_stopped_reading_still_fails_in_time_and_dies_at_once_on_sigterm() {
    let mut fabric = Fabric::new("fabric-stopped");
    let unix = unix_endpoint(&fabric);
    fabric.start_server_with(&["--fabric-listen", unix.as_str()]);
    fabric.use_fabric("a", &unix);
    fabric.use_fabric("b", &unix);
    let _receiver = Receiver::start(&fabric, 9420);
    // 60,000-byte datagrams: a few fill the connection's socket buffer.
    let mut sender = Sender::start_with(&fabric, 9420, "s", 1_000_000, 60_000, &[("FTSS_TIMEOUT", "1")]);
    assert!(wait_until(Duration::from_secs(20), || !sender.acknowledged().is_empty()), "nothing sent");
    let server = fabric.server.as_ref().expect("server runs").child.id() as libc::pid_t;
    // SAFETY: signals to the test's own children.
    unsafe { libc::kill(server, libc::SIGSTOP) };
    // Each send now fails after a second, its frame left unread: after a few the socket is full.
    // The sender prints a line per send; it must never go quiet for long.
    let watched = Instant::now();
    let (mut lines, mut changed, mut longest) = (sender.said.lines().len(), Instant::now(), Duration::ZERO);
    while watched.elapsed() < Duration::from_secs(12) {
        std::thread::sleep(Duration::from_millis(50));
        let now = sender.said.lines().len();
        if now != lines {
            (lines, changed) = (now, Instant::now());
        }
        longest = longest.max(changed.elapsed());
    }
    let timed_out = sender.errors().iter().filter(|line| line.ends_with(" 110")).count();
    let pid = sender.proc.child.id() as libc::pid_t;
    // To the app's own (main) thread, not to the process: the shim's threads never hold signals,
    // and one sent to the process could be taken by one of them.
    // SAFETY: as above; the main thread's id is the pid.
    unsafe { libc::syscall(libc::SYS_tgkill, pid, pid, libc::SIGTERM) };
    let dies = Instant::now();
    let died = sender.proc.wait_exit(Duration::from_secs(5));
    let took = dies.elapsed();
    // SAFETY: as above.
    unsafe { libc::kill(server, libc::SIGCONT) };
    assert!(timed_out >= 6, "sends did not time out: {:?}", sender.errors());
    assert!(longest < Duration::from_secs(3), "a send took {longest:?} with FTSS_TIMEOUT=1");
    assert!(died && took < Duration::from_secs(2), "the sender took {took:?} to die on SIGTERM (died: {died})");
}

#[test]
fn wrong_keys_and_claimed_addresses_are_refused() {
    let mut fabric = Fabric::new("fabric-auth");
    let endpoint = unix_endpoint(&fabric);
    fabric.start_server_with(&["--fabric-listen", &endpoint]);
    fabric.use_fabric("a", &endpoint);
    fabric.use_fabric("b", &endpoint);
    let receiver = Receiver::start(&fabric, 9500);

    // a's app is given some other key file: it cannot prove it is a.
    let wrong_key = fabric.dir.0.join("wrong.key");
    std::fs::write(&wrong_key, fabric::generate_key_text()).unwrap();
    let wrong_env =
        [("FTSS_ACK", "guaranteed"), ("FTSS_TIMEOUT", "2"), ("FTSS_FABRIC_KEY", wrong_key.to_str().unwrap())];
    let mut wrong = Sender::start_with(&fabric, 9500, "w", 3, 0, &wrong_env);
    assert!(wait_until(Duration::from_secs(20), || !wrong.errors().is_empty()), "a send with a wrong key returned");
    assert!(wrong.acknowledged().is_empty());
    assert!(wrong.errors()[0].ends_with(&libc::ETIMEDOUT.to_string()), "{:?}", wrong.errors());
    wrong.proc.kill();
    assert!(fabric.server_log().contains("wrong key for this node"), "{}", fabric.server_log());
    assert!(fabric.node_log("a").contains("refused: authentication failed"), "{}", fabric.node_log("a"));

    // c has a valid key of its own but claims b's address.
    fabric.use_fabric("c", &endpoint);
    let mut claim = fabric.command("c", "10.77.0.2", "python3");
    claim
        .args(["-c", common::apps::PY_SENDER, "10.77.0.1", "9", "c", "1", "0"])
        .env("FTSS_ACK", "guaranteed")
        .env("FTSS_TIMEOUT", "2")
        .stdout(std::process::Stdio::null());
    let mut claim = Proc { child: claim.spawn().unwrap(), name: "claimer".into() };
    assert!(
        wait_until(Duration::from_secs(20), || fabric
            .server_log()
            .contains("address 10.77.0.2 is registered to node b")),
        "{}",
        fabric.server_log()
    );
    claim.kill();
    assert!(fabric_counter(&fabric, "refused") >= 2, "{}", fabric.status()["fabric"]);
    assert!(receiver.payloads().is_empty(), "a refused node got packets through: {:?}", receiver.payloads());

    // With its own key, a gets through.
    let mut right = Sender::start(&fabric, 9500, "r", 3, 0);
    assert!(right.proc.wait_exit(Duration::from_secs(30)));
    assert!(
        wait_until(Duration::from_secs(20), || receiver.payloads() == expected("r", 3, 0)),
        "{:?}",
        receiver.payloads()
    );
}

/// A session authenticated with `node`'s real key over the server's unix socket, and the sealer
/// for the frames it sends.
fn authenticated(
    fabric: &Fabric,
    path: &std::path::Path,
    node: &str,
    addr: &str,
) -> (UnixStream, fabric::FrameSealer, fabric::FrameOpener) {
    authenticated_with_epoch(fabric, path, node, addr, fsbridge::random_u64())
}

/// The same, for a process whose packet ids carry `epoch`.
fn authenticated_with_epoch(
    fabric: &Fabric,
    path: &std::path::Path,
    node: &str,
    addr: &str,
    epoch: u64,
) -> (UnixStream, fabric::FrameSealer, fabric::FrameOpener) {
    let key = fabric::read_key_file(&fabric.key_path(node)).unwrap();
    let mut stream = UnixStream::connect(path).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let Frame::Challenge { nonce, .. } = fabric::read_frame(&mut stream).unwrap() else { panic!("no challenge") };
    let mut hello = Hello {
        version: FABRIC_VERSION,
        node: NodeName::new(node).unwrap(),
        addr: addr.parse().unwrap(),
        epoch,
        nonce: fabric::nonce(),
        proof: [0; fabric::PROOF_BYTES],
    };
    hello.proof = fabric::client_proof(&key, &nonce, &hello);
    fabric::write_frame(&mut stream, &Frame::Hello(hello.clone())).unwrap();
    assert!(matches!(fabric::read_frame(&mut stream), Ok(Frame::Welcome { .. })), "not welcomed");
    let (sealer, opener) = fabric::session(&key, &nonce, &hello.nonce, fabric::Role::Node);
    (stream, sealer, opener)
}

/// A small xorshift generator: the fuzz cases are reproducible from the seed in a failure message.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, bound: usize) -> usize {
        (self.next() % bound as u64) as usize
    }

    fn bytes(&mut self, count: usize) -> Vec<u8> {
        (0..count).map(|_| self.next() as u8).collect()
    }
}

fn valid_packets_frame(node: &str, seq: u64) -> Vec<u8> {
    let header = BatchHeader {
        kind: BatchKind::Packets,
        node: NodeName::new(node).unwrap(),
        epoch: 1,
        batch_seq: seq,
        flags: 0,
    };
    let mut encoder = BatchEncoder::new(&header);
    encoder.push(&Record::Packet(Packet {
        id: PacketId { origin: NodeName::new(node).unwrap(), epoch: 1, seq },
        source: "10.77.0.9:1".parse().unwrap(),
        destination: "10.77.0.2:9600".parse().unwrap(),
        sent_unix_us: 0,
        payload: b"fuzz".to_vec(),
    }));
    Frame::Packets(encoder.finish()).encode()
}

/// One hostile stream: garbage before or after a valid handshake, frames with flipped bytes, lying
/// lengths, cut-off frames, frames a node may not send.
fn hostile_stream(fabric: &Fabric, path: &std::path::Path, rng: &mut Rng, case: usize) {
    let bytes = match case % 6 {
        0 => {
            let count = 1 + rng.below(4096);
            rng.bytes(count)
        }
        1 => {
            let mut frame = Frame::Hello(Hello {
                version: FABRIC_VERSION,
                node: NodeName::new("fuzz").unwrap(),
                addr: "10.77.0.9".parse().unwrap(),
                epoch: 1,
                nonce: [0; 32],
                proof: [0; 32],
            })
            .encode();
            let index = rng.below(frame.len());
            frame[index] ^= 1 << rng.below(8);
            frame
        }
        2 => (u32::MAX - rng.below(1000) as u32).to_le_bytes().to_vec(),
        _ => Vec::new(),
    };
    if case % 6 < 3 {
        let Ok(mut stream) = UnixStream::connect(path) else { return };
        let _ = stream.write_all(&bytes);
        let _ = stream.shutdown(std::net::Shutdown::Write);
        let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
        let mut rest = Vec::new();
        let _ = stream.read_to_end(&mut rest);
        return;
    }
    let (mut stream, mut sealer, _) = authenticated(fabric, path, "fuzz", "10.77.0.9");
    let mut frame = match case % 6 {
        3 => valid_packets_frame("fuzz", case as u64),
        4 => Frame::Ports((0..rng.below(50)).map(|_| rng.next() as u16).collect()).encode(),
        _ => Frame::Challenge { version: 1, nonce: [0; 32] }.encode(),
    };
    // Sealed as a real node would, then (mostly) damaged: a frame that loses its MAC or its
    // integrity is refused, an intact one is taken (packets) or refused for its type.
    let tag = sealer.seal(&frame);
    frame.extend_from_slice(&tag);
    let mutations = rng.below(4);
    for _ in 0..mutations {
        let index = rng.below(frame.len());
        frame[index] = rng.next() as u8;
    }
    if rng.below(4) == 0 {
        frame.truncate(rng.below(frame.len()));
    }
    let _ = stream.write_all(&frame);
    let trailing = rng.below(64);
    let _ = stream.write_all(&rng.bytes(trailing));
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest);
}

#[test]
fn a_node_that_breaks_the_protocol_after_the_handshake_is_told_why() {
    let (fabric, path) = listening_fabric("fabric-farewell", &["rude"]);
    let (mut stream, mut sealer, mut opener) = authenticated(&fabric, &path, "rude", "10.77.0.9");
    // Sealed correctly, but a node may not send a challenge.
    let mut frame = Frame::Challenge { version: FABRIC_VERSION, nonce: [0; 32] }.encode();
    let tag = sealer.seal(&frame);
    frame.extend_from_slice(&tag);
    stream.write_all(&frame).unwrap();
    match opener.read(&mut stream, fabric::FRAME_BODY_BYTES_MAX) {
        Ok(Frame::Refused { reason }) => assert!(reason.contains("may not send a challenge"), "{reason}"),
        other => panic!("expected a sealed refusal, got {other:?}"),
    }
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "the connection goes on after the refusal");
    assert!(fabric.server_log().contains("may not send a challenge"), "{}", fabric.server_log());
}

#[test]
fn hostile_frame_streams_never_crash_the_server() {
    let (mut fabric, path) = listening_fabric("fabric-fuzz", &["fuzz", "a", "b"]);
    let seed = fsbridge::random_u64() | 1;
    let mut rng = Rng(seed);
    for case in 0..600 {
        hostile_stream(&fabric, &path, &mut rng, case);
    }
    let server = fabric.server.as_mut().unwrap();
    assert!(server.child.try_wait().unwrap().is_none(), "the server died (seed {seed:#x}): {}", fabric.server_log());
    let counted = |name: &str| fabric_counter(&fabric, name) >= 100;
    assert!(
        wait_until(Duration::from_secs(10), || counted("bad_frames") && counted("refused")),
        "seed {seed:#x}: {}",
        fabric.status()["fabric"]
    );

    // Still serving real nodes.
    let (mut listener, received) = nc_listener(&fabric, "b", "10.77.0.2", 9601);
    std::thread::sleep(Duration::from_millis(500));
    let sent = lines("after-fuzz", 50);
    assert!(nc_send_lines(&fabric, "a", "10.77.0.1", "10.77.0.2", 9601, &sent));
    expect_exactly(&received, &sent, Duration::from_secs(30));
    listener.kill();
}

#[test]
fn a_peer_that_dribbles_its_hello_is_cut_off_at_the_handshake_deadline() {
    let mut fabric = Fabric::new("fabric-slow");
    let endpoint = unix_endpoint(&fabric);
    fabric.start_server_with(&["--fabric-listen", &endpoint]);
    let mut stream = UnixStream::connect(fabric.dir.0.join("fabric.sock")).unwrap();
    let started = std::time::Instant::now();
    let Ok(Frame::Challenge { .. }) = fabric::read_frame(&mut stream) else { panic!("no challenge") };
    // A plausible length prefix, then one byte a second: every read is quick, the whole is not.
    let mut cut_off = false;
    for byte in [100u8, 0, 0, 0].into_iter().chain(std::iter::repeat(2)).take(30) {
        if stream.write_all(&[byte]).is_err() {
            cut_off = true;
            break;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    let elapsed = started.elapsed();
    assert!(cut_off, "the server kept a dribbling handshake open for {elapsed:?}");
    assert!(elapsed < Duration::from_secs(20), "cut off only after {elapsed:?}");
    assert!(fabric.server_log().contains("handshake took too long"), "{}", fabric.server_log());
}

/// Sealed packets frames of `node`, one packet each, with these sequence numbers, back to back.
fn sealed_packets_frames(sealer: &mut fabric::FrameSealer, node: &str, seqs: std::ops::Range<u64>) -> Vec<u8> {
    let mut bytes = Vec::new();
    for seq in seqs {
        let frame = valid_packets_frame(node, seq);
        let tag = sealer.seal(&frame);
        bytes.extend_from_slice(&frame);
        bytes.extend_from_slice(&tag);
    }
    bytes
}

/// Reads ack frames until `count` acks came; returns the acked sequence numbers (in order, each
/// ack's state checked) and how many frames carried them.
fn read_stored_acks(stream: &mut UnixStream, opener: &mut fabric::FrameOpener, count: usize) -> (Vec<u64>, usize) {
    let (mut seqs, mut frames) = (Vec::new(), 0);
    while seqs.len() < count {
        let frame = opener.read(stream, fabric::FRAME_BODY_BYTES_MAX).expect("an ack frame");
        let Frame::Acks(bytes) = frame else { panic!("expected acks, got {frame:?}") };
        frames += 1;
        for record in fsbridge::format::decode_batch(&bytes).unwrap().records {
            let Record::Ack(ack) = record else { panic!("not an ack: {record:?}") };
            assert_eq!(ack.state, fsbridge::AckState::Stored, "{ack:?}");
            seqs.push(ack.id.seq);
        }
    }
    (seqs, frames)
}

#[test]
fn frames_that_arrive_together_get_one_ack_frame_and_frames_cut_anywhere_are_put_together() {
    let (fabric, path) = listening_fabric("fabric-framing", &["burst"]);
    let (mut stream, mut sealer, mut opener) = authenticated(&fabric, &path, "burst", "10.77.0.9");
    // Eight frames in one write: the server takes them in one cycle and acks them in one frame
    // (one write to the node and one wakeup of it, not eight).
    stream.write_all(&sealed_packets_frames(&mut sealer, "burst", 1..9)).unwrap();
    let (acked, frames) = read_stored_acks(&mut stream, &mut opener, 8);
    assert_eq!(acked, (1..9).collect::<Vec<u64>>(), "acks missing, repeated or out of order");
    assert_eq!(frames, 1, "8 frames that arrived together were acked in {frames} frames");

    // Eight more, written a byte or two at a time: frames cut at every place are reassembled.
    let bytes = sealed_packets_frames(&mut sealer, "burst", 9..17);
    for (index, piece) in bytes.chunks(2).enumerate() {
        stream.write_all(piece).unwrap();
        if index % 8 == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let (acked, _) = read_stored_acks(&mut stream, &mut opener, 8);
    assert_eq!(acked, (9..17).collect::<Vec<u64>>(), "acks missing, repeated or out of order");
    assert_eq!(fabric_counter(&fabric, "bad_frames"), 0, "{}", fabric.server_log());
}

#[test]
fn a_fabric_node_is_told_stored_and_not_delivered_or_receipted() {
    let (fabric, path) = listening_fabric("fabric-acks", &["self"]);
    // Packet ids carry the epoch the process gave in its hello, as the shim's do.
    let epoch = fsbridge::random_u64();
    let (mut stream, mut sealer, mut opener) = authenticated_with_epoch(&fabric, &path, "self", "10.77.0.9", epoch);
    let mut writer = stream.try_clone().unwrap();
    let mut send = |frame: Frame| {
        let mut bytes = frame.encode();
        let tag = sealer.seal(&bytes);
        bytes.extend_from_slice(&tag);
        writer.write_all(&bytes).unwrap();
    };
    // The node takes its own datagram: stored, delivered to it, receipted by it.
    send(Frame::Ports(vec![9700]));
    std::thread::sleep(Duration::from_millis(300));
    let header = |kind| BatchHeader { kind, node: NodeName::new("self").unwrap(), epoch, batch_seq: 1, flags: 0 };
    let id = PacketId { origin: NodeName::new("self").unwrap(), epoch, seq: 1 };
    let mut encoder = BatchEncoder::new(&header(BatchKind::Packets));
    encoder.push(&Record::Packet(Packet {
        id: id.clone(),
        source: "10.77.0.9:9700".parse().unwrap(),
        destination: "10.77.0.9:9700".parse().unwrap(),
        sent_unix_us: 0,
        payload: b"to myself".to_vec(),
    }));
    send(Frame::Packets(encoder.finish()));
    let (mut stored, mut delivered) = (false, false);
    while !(stored && delivered) {
        match opener.read(&mut stream, fabric::FRAME_BODY_BYTES_MAX).expect("a frame") {
            Frame::Acks(bytes) => {
                for record in fsbridge::format::decode_batch(&bytes).unwrap().records {
                    let Record::Ack(ack) = record else { panic!("not an ack: {record:?}") };
                    assert_eq!(ack.state, fsbridge::AckState::Stored, "{ack:?}");
                    stored = true;
                }
            }
            Frame::Packets(bytes) => {
                let records = fsbridge::format::decode_batch(&bytes).unwrap().records;
                assert!(matches!(&records[..], [Record::Packet(packet)] if packet.payload == b"to myself"));
                delivered = true;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let mut encoder = BatchEncoder::new(&header(BatchKind::Receipts));
    encoder.push(&Record::Receipt(id));
    send(Frame::Receipts(encoder.finish()));
    assert!(
        wait_until(Duration::from_secs(10), || fabric.status()["counters"]["receipted"].as_u64() == Some(1)),
        "{}",
        fabric.status()["counters"]
    );
    // Delivered and receipted acks would have come within the cycles that took them.
    stream.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    match opener.read(&mut stream, fabric::FRAME_BODY_BYTES_MAX) {
        Err(fabric::FrameError::Io(error)) if error.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("after its stored ack, the node was sent {other:?}"),
    }
}
