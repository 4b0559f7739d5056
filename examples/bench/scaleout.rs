//! `ftss-1-instance` and `ftss-2-instances`: the same traffic through one ftss-server, and through
//! two instances sharing the nodes in two partitions (`--ha --partitions 2`).
//!
//! Two flows run at once, each a loadgen sender with the run's thread count and a loadgen
//! receiver, chosen to cross partitions both ways: node a (partition 0) → node c (partition 1) and
//! node e (partition 1) → node b (partition 0), on a local-directory volume. The rate is all
//! datagrams received over the time from the first send to the last receive.
//!
//! The senders use `async` acks so that the servers set the pace: in `volume` mode each sending
//! process waits for its own batch syncs on the node, and a second server instance cannot make
//! those faster (the packets are stored durably by the servers either way).

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use fsbridge::{NodeConfig, NodeName, Volume};
use serde_json::json;

use crate::apps::{POLL_MS, collect, start_receiver, start_sender};
use crate::procs::{Proc, free_udp_port};
use crate::report::Measurement;
use crate::{Bench, Run};

/// (sender, receiver) nodes of the two flows, and their fabric addresses.
type Node = (&'static str, Ipv4Addr);
const FLOWS: [(Node, Node); 2] = [
    (("a", Ipv4Addr::new(10, 77, 0, 1)), ("c", Ipv4Addr::new(10, 77, 0, 3))),
    (("e", Ipv4Addr::new(10, 77, 0, 5)), ("b", Ipv4Addr::new(10, 77, 0, 2))),
];
const LEASE_TERM: &str = "3s";
/// FTSS_ACK of the senders (see the module docs).
const ACK: &str = "async";
const START_LIMIT: Duration = Duration::from_secs(30);
/// How long a receiver waits after the last datagram once it knows the count.
const IDLE: Duration = Duration::from_secs(10);

/// Runs both flows against `instances` servers (1: a lone server; 2: two instances, two partitions).
pub fn scaleout(bench: &Bench, run: &Run, scenario: &'static str, instances: usize) -> Result<Measurement, String> {
    let dir = bench.run_dir(scenario)?;
    let volume_dir = dir.0.join("volume");
    let volume = Volume::new(&volume_dir);
    volume.create().map_err(|error| error.to_string())?;
    for ((sender, sender_addr), (receiver, receiver_addr)) in FLOWS {
        for (name, addr) in [(sender, sender_addr), (receiver, receiver_addr)] {
            let node = NodeName::new(name).expect("valid node name");
            volume.register_node(&node, &NodeConfig { addr }).map_err(|error| error.to_string())?;
        }
    }
    let mut servers = Vec::new();
    for index in 0..instances {
        let mut command = Command::new(&bench.server_bin);
        // One queue directory for all instances, as on a shared volume: a partition's queue must be
        // where any instance that takes the partition over finds it.
        command.arg("run").arg("--volume").arg(&volume_dir).arg("--queue-dir").arg(dir.0.join("queue"));
        command.arg("--poll").arg(format!("{POLL_MS}ms"));
        if instances > 1 {
            command.args(["--ha", "--lease-term", LEASE_TERM, "--partitions", &instances.to_string()]);
            command.arg("--instance").arg(format!("instance-{index}"));
        }
        servers.push(Proc::start("ftss-server", command, &dir.0.join(format!("server-{index}.log")))?);
        if instances > 1 {
            wait_for_partitions(&volume_dir, index + 1, instances)?;
        }
    }
    let measured = drive_flows(bench, run, &dir.0, &volume_dir);
    for server in &mut servers {
        server.terminate(Duration::from_secs(5));
    }
    let flows = measured?;
    let mut measurement = Measurement::new(scenario, run.payload, run.senders * FLOWS.len(), false);
    measurement.packets = flows.received;
    if flows.received > 0 && flows.elapsed_ns > 0 {
        measurement.pps = Some(flows.received as f64 / (flows.elapsed_ns as f64 / 1e9));
        measurement.p50_us = flows.p50_us;
        measurement.p99_us = flows.p99_us;
    }
    measurement.extra.push(("instances", json!(instances)));
    measurement.extra.push(("sent", json!(flows.sent)));
    measurement.extra.push(("lost", json!(flows.sent.saturating_sub(flows.received))));
    Ok(measurement)
}

/// Waits until `holders` distinct instances serve the `count` partitions between them.
fn wait_for_partitions(volume: &Path, holders: usize, count: usize) -> Result<(), String> {
    let deadline = Instant::now() + START_LIMIT;
    while Instant::now() < deadline {
        let mut seen: Vec<String> = (0..count)
            .filter_map(|index| std::fs::read_to_string(volume.join(format!("server/lease-p{index}"))).ok())
            .filter_map(|text| text.lines().find(|line| line.starts_with("holder")).map(str::to_owned))
            .collect();
        let all_held = seen.len() == count;
        seen.sort();
        seen.dedup();
        if all_held && seen.len() == holders.min(count) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(format!("{holders} instances did not share the {count} partitions in time"))
}

fn env(bench: &Bench, dir: &Path, volume: &Path, node: Node) -> Vec<(String, String)> {
    vec![
        ("LD_PRELOAD".into(), bench.shim.display().to_string()),
        ("FTSS_VOLUME".into(), volume.display().to_string()),
        ("FTSS_NODE".into(), node.0.into()),
        ("FTSS_ADDR".into(), node.1.to_string()),
        ("FTSS_ACK".into(), ACK.into()),
        ("FTSS_POLL_MS".into(), POLL_MS.to_string()),
        ("FTSS_LOG".into(), dir.join(format!("{}.log", node.0)).display().to_string()),
    ]
}

/// What both flows measured together.
struct Flows {
    received: u64,
    /// From the first send to the last receive.
    elapsed_ns: u64,
    /// The worse flow's latency percentiles.
    p50_us: Option<u64>,
    p99_us: Option<u64>,
    sent: u64,
}

/// Runs both flows at once.
fn drive_flows(bench: &Bench, run: &Run, dir: &Path, volume: &Path) -> Result<Flows, String> {
    let mut receivers = Vec::new();
    let mut targets = Vec::new();
    for (index, (_, receiver)) in FLOWS.iter().enumerate() {
        let port = free_udp_port()?;
        let env = env(bench, dir, volume, *receiver);
        let log = dir.join(format!("recv-{index}.log"));
        receivers.push(start_receiver(bench, (&env, None), &format!("0.0.0.0:{port}"), IDLE, &log)?);
        targets.push(format!("{}:{port}", receiver.1));
    }
    let mut senders = Vec::new();
    for (index, (sender, _)) in FLOWS.iter().enumerate() {
        let env = env(bench, dir, volume, *sender);
        senders.push(start_sender(bench, (&env, None), &targets[index], run, &dir.join(format!("send-{index}.log")))?);
    }
    let (mut received_total, mut sent_total) = (0, 0);
    let (mut first_send, mut last_receive) = (u64::MAX, 0);
    let (mut p50, mut p99) = (None, None);
    for (sender, receiver) in senders.iter_mut().zip(receivers.iter_mut()) {
        let (sent, received) = collect(sender, receiver, run)?;
        let count = sent["sent"].as_u64().unwrap_or(0);
        sent_total += count;
        received_total += received["received"].as_u64().unwrap_or(0);
        first_send = first_send.min(received["first_send_ns"].as_u64().unwrap_or(u64::MAX));
        last_receive = last_receive.max(received["last_recv_ns"].as_u64().unwrap_or(0));
        p50 = p50.max(received["p50_us"].as_u64());
        p99 = p99.max(received["p99_us"].as_u64());
    }
    Ok(Flows {
        received: received_total,
        elapsed_ns: last_receive.saturating_sub(first_send),
        p50_us: p50,
        p99_us: p99,
        sent: sent_total,
    })
}
