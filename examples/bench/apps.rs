//! Scenarios with real app processes: `loadgen` senders and a receiver, plain, under the shim in
//! pass-through, and end to end through a real ftss-server (local directory or SMB volume).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use fsbridge::{NodeConfig, NodeName, Volume};
use serde_json::{Value, json};

use crate::procs::{Proc, cpu_ticks, free_udp_port, proc_status_kib};
use crate::report::Measurement;
use crate::{Bench, Run};

/// Fabric addresses of the two nodes.
pub const SENDER_NODE: (&str, Ipv4Addr) = ("a", Ipv4Addr::new(10, 77, 0, 1));
pub const RECEIVER_NODE: (&str, Ipv4Addr) = ("b", Ipv4Addr::new(10, 77, 0, 2));
/// How long the receiver waits after the last datagram once it knows the count (plain UDP may drop).
pub const UDP_IDLE: Duration = Duration::from_millis(500);
/// The same for ftss: a packet may wait for a poll of the server and of the receiving shim.
pub const FTSS_IDLE: Duration = Duration::from_secs(10);
/// How long a process may take to start, or to report once the work is over.
const START_LIMIT: Duration = Duration::from_secs(20);
const REPORT_LIMIT: Duration = Duration::from_secs(180);
/// Poll interval of the shims' inboxes on a local volume (latency-tuned; the default is 10 ms).
pub const POLL_MS: u64 = 1;
/// The server's full-read interval: its default. Between full reads the server wakes on inotify
/// (the local export, whatever the nodes mount) and on the fabric's sockets, so a shorter one
/// only adds reads of spools that did not change.
const SERVER_POLL_MS: u64 = 20;
/// The shims' inbox poll interval on a network mount: the default, since every poll there is a
/// round trip to the file server.
pub const NETWORK_POLL_MS: u64 = 10;

/// Where the apps find the volume and the server's process, for an ftss scenario.
pub struct Fabric {
    /// The volume as the nodes see it (FTSS_VOLUME).
    pub node_volume: PathBuf,
    /// FTSS_POLL_MS of the nodes.
    pub node_poll_ms: u64,
    pub server: Proc,
    /// The server's status.json.
    pub status_path: PathBuf,
    pub dir: PathBuf,
    /// With the fabric transport: where the nodes connect (they then use no volume).
    pub fabric_endpoint: Option<String>,
}

impl Fabric {
    /// Makes a volume at `server_volume` (as the server sees it), registers both nodes, starts the server.
    pub fn start(bench: &Bench, dir: &Path, server_volume: &Path, node_volume: &Path) -> Result<Fabric, String> {
        Fabric::start_with(bench, dir, server_volume, node_volume, None)
    }

    /// Like [`Fabric::start`]; with `fabric_endpoint` the server also listens there, both nodes get
    /// keys, and the apps use the fabric transport instead of the volume.
    pub fn start_with(
        bench: &Bench,
        dir: &Path,
        server_volume: &Path,
        node_volume: &Path,
        fabric_endpoint: Option<&str>,
    ) -> Result<Fabric, String> {
        let volume = Volume::new(server_volume);
        volume.create().map_err(|error| error.to_string())?;
        // Registered up front so that the server drains and routes from its first cycle.
        for (name, addr) in [SENDER_NODE, RECEIVER_NODE] {
            let node = NodeName::new(name).expect("valid node name");
            volume.register_node(&node, &NodeConfig { addr }).map_err(|error| error.to_string())?;
        }
        let mut command = Command::new(&bench.server_bin);
        command
            .arg("run")
            .arg("--volume")
            .arg(server_volume)
            .arg("--queue-dir")
            .arg(dir.join("queue"))
            .arg("--poll")
            .arg(format!("{SERVER_POLL_MS}ms"));
        if let Some(endpoint) = fabric_endpoint {
            let keys = server_volume.join("server").join("fabric-keys");
            std::fs::create_dir_all(&keys).map_err(|error| error.to_string())?;
            for (name, _) in [SENDER_NODE, RECEIVER_NODE] {
                std::fs::write(keys.join(format!("{name}.key")), fsbridge::fabric::generate_key_text())
                    .map_err(|error| error.to_string())?;
            }
            command.arg("--fabric-listen").arg(endpoint);
        }
        let server = Proc::start("ftss-server", command, &dir.join("server.log"))?;
        if let Some(fsbridge::fabric::Endpoint::Unix(path)) = fabric_endpoint.and_then(|text| text.parse().ok()) {
            let deadline = std::time::Instant::now() + START_LIMIT;
            while !path.exists() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let node_poll_ms = if server_volume == node_volume { POLL_MS } else { NETWORK_POLL_MS };
        Ok(Fabric {
            node_volume: node_volume.to_path_buf(),
            node_poll_ms,
            server,
            status_path: volume.status_path(),
            dir: dir.to_path_buf(),
            fabric_endpoint: fabric_endpoint.map(String::from),
        })
    }

    /// Environment of an app on `node` with the shim preloaded.
    pub fn env(&self, bench: &Bench, node: (&str, Ipv4Addr), ack: &str) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = vec![
            ("LD_PRELOAD".into(), bench.shim.display().to_string()),
            ("FTSS_NODE".into(), node.0.into()),
            ("FTSS_ADDR".into(), node.1.to_string()),
            ("FTSS_ACK".into(), ack.into()),
            ("FTSS_POLL_MS".into(), self.node_poll_ms.to_string()),
            ("FTSS_LOG".into(), self.dir.join(format!("{}.log", node.0)).display().to_string()),
        ];
        match &self.fabric_endpoint {
            None => env.push(("FTSS_VOLUME".into(), self.node_volume.display().to_string())),
            Some(endpoint) => {
                let key = self.node_volume.join("server").join("fabric-keys").join(format!("{}.key", node.0));
                env.push(("FTSS_TRANSPORT".into(), "fabric".into()));
                env.push(("FTSS_FABRIC".into(), endpoint.clone()));
                env.push(("FTSS_FABRIC_KEY".into(), key.display().to_string()));
            }
        }
        env
    }
}

/// One sender/receiver pair of loadgen processes.
pub struct Apps {
    pub receiver_env: Vec<(String, String)>,
    pub sender_env: Vec<(String, String)>,
    /// The network namespaces they run in (the tun scenarios), else the bench's own.
    pub netns: Option<(String, String)>,
    pub bind: String,
    pub to: String,
    pub idle: Duration,
}

/// `udp-raw`: loopback UDP, no shim.
pub fn udp_raw(bench: &Bench, run: &Run) -> Result<Measurement, String> {
    let port = free_udp_port()?;
    let dir = bench.run_dir("udp-raw")?;
    let apps = Apps {
        receiver_env: Vec::new(),
        sender_env: Vec::new(),
        netns: None,
        bind: format!("127.0.0.1:{port}"),
        to: format!("127.0.0.1:{port}"),
        idle: UDP_IDLE,
    };
    let mut measurement = Measurement::new("udp-raw", run.payload, run.senders, false);
    drive(bench, run, &dir.0, &apps, &mut measurement)?;
    Ok(measurement)
}

/// `shim-passthrough`: the same, both apps under the shim with a volume, destination outside FTSS_ROUTES.
pub fn shim_passthrough(bench: &Bench, run: &Run) -> Result<Measurement, String> {
    let port = free_udp_port()?;
    let dir = bench.run_dir("shim-passthrough")?;
    let volume = dir.0.join("volume");
    Volume::new(&volume).create().map_err(|error| error.to_string())?;
    let env = |node: (&str, Ipv4Addr)| -> Vec<(String, String)> {
        vec![
            ("LD_PRELOAD".into(), bench.shim.display().to_string()),
            ("FTSS_VOLUME".into(), volume.display().to_string()),
            ("FTSS_NODE".into(), node.0.into()),
            ("FTSS_ADDR".into(), node.1.to_string()),
            ("FTSS_LOG".into(), dir.0.join(format!("{}.log", node.0)).display().to_string()),
        ]
    };
    let apps = Apps {
        receiver_env: env(RECEIVER_NODE),
        sender_env: env(SENDER_NODE),
        netns: None,
        bind: format!("127.0.0.1:{port}"),
        to: format!("127.0.0.1:{port}"),
        idle: UDP_IDLE,
    };
    let mut measurement = Measurement::new("shim-passthrough", run.payload, run.senders, false);
    drive(bench, run, &dir.0, &apps, &mut measurement)?;
    Ok(measurement)
}

/// `ftss-async`, `ftss-volume`, `ftss-guaranteed` on a local directory volume.
pub fn ftss_local(bench: &Bench, run: &Run, scenario: &'static str, ack: &str) -> Result<Measurement, String> {
    let dir = bench.run_dir(scenario)?;
    let volume = dir.0.join("volume");
    let fabric = Fabric::start(bench, &dir.0, &volume, &volume)?;
    ftss(bench, run, scenario, ack, fabric)
}

/// `ftss-fabric`, `ftss-fabric-async`: both nodes connect to the server over a unix socket (the
/// fabric transport); the server's queue is the same as for the volume scenarios.
pub fn ftss_fabric(bench: &Bench, run: &Run, scenario: &'static str, ack: &str) -> Result<Measurement, String> {
    let dir = bench.run_dir(scenario)?;
    let volume = dir.0.join("volume");
    let endpoint = format!("unix:{}", dir.0.join("fabric.sock").display());
    let fabric = Fabric::start_with(bench, &dir.0, &volume, &volume, Some(&endpoint))?;
    ftss(bench, run, scenario, ack, fabric)
}

/// `ftss-recv-once`: as `ftss-volume`, with the receiver in `FTSS_RECV=once` (every datagram
/// recorded in the port's once-ledger, fdatasync'd, before recv returns it).
pub fn ftss_recv_once(bench: &Bench, run: &Run) -> Result<Measurement, String> {
    let scenario = "ftss-recv-once";
    let dir = bench.run_dir(scenario)?;
    let volume = dir.0.join("volume");
    let fabric = Fabric::start(bench, &dir.0, &volume, &volume)?;
    ftss_with(bench, run, scenario, "volume", fabric, &[("FTSS_RECV", "once")])
}

/// End to end through `fabric`'s server: node a sends to node b.
pub fn ftss(
    bench: &Bench,
    run: &Run,
    scenario: &'static str,
    ack: &str,
    fabric: Fabric,
) -> Result<Measurement, String> {
    ftss_with(bench, run, scenario, ack, fabric, &[])
}

/// [`ftss`], with `receiver_extra` added to the receiver's environment.
fn ftss_with(
    bench: &Bench,
    run: &Run,
    scenario: &'static str,
    ack: &str,
    fabric: Fabric,
    receiver_extra: &[(&str, &str)],
) -> Result<Measurement, String> {
    let port = free_udp_port()?;
    let mut receiver_env = fabric.env(bench, RECEIVER_NODE, ack);
    receiver_env.extend(receiver_extra.iter().map(|(key, value)| (key.to_string(), value.to_string())));
    let apps = Apps {
        receiver_env,
        sender_env: fabric.env(bench, SENDER_NODE, ack),
        netns: None,
        bind: format!("0.0.0.0:{port}"),
        to: format!("{}:{port}", RECEIVER_NODE.1),
        idle: FTSS_IDLE,
    };
    let mut measurement = Measurement::new(scenario, run.payload, run.senders, ack != "async");
    let mut fabric = fabric;
    let server_cpu_before = cpu_ticks(fabric.server.pid());
    let status_before = read_status(&fabric.status_path);
    let result = drive(bench, run, &fabric.dir, &apps, &mut measurement);
    let server_cpu = cpu_ticks(fabric.server.pid()).zip(server_cpu_before).map(|(after, before)| after - before);
    let server_rss = proc_status_kib(fabric.server.pid(), "VmHWM");
    // The server writes its last status as it stops.
    fabric.server.terminate(Duration::from_secs(5));
    result?;
    measurement.extra.push(("server_max_rss_kib", json!(server_rss)));
    measurement.extra.push(("server_cycle_us", cycle_means(&status_before, &read_status(&fabric.status_path))));
    // Clock ticks are 10 ms (USER_HZ 100): the run's few seconds give a rough figure.
    if let (Some(ticks), Some(packets)) = (server_cpu, Some(measurement.packets).filter(|packets| *packets > 0)) {
        measurement.extra.push(("server_cpu_ns_per_packet", json!(ticks * 10_000_000 / packets)));
    }
    if ack == "guaranteed" {
        // Every sendto returned only after the server's stored ack: that is the ack latency.
        let send_p50 = measurement.extra("send_p50_us").cloned().unwrap_or(Value::Null);
        let send_p99 = measurement.extra("send_p99_us").cloned().unwrap_or(Value::Null);
        measurement.extra.push(("ack_p50_us", send_p50));
        measurement.extra.push(("ack_p99_us", send_p99));
    }
    Ok(measurement)
}

/// The server's status.json (null if it cannot be read).
fn read_status(path: &Path) -> Value {
    std::fs::read(path).ok().and_then(|bytes| serde_json::from_slice(&bytes).ok()).unwrap_or(Value::Null)
}

/// The server's cycles between two status documents: how many, the mean of each step of a cycle
/// and of the whole cycle in microseconds (idle time between cycles apart), and how many packets
/// each stored. Null if the later document lacks them.
fn cycle_means(before: &Value, after: &Value) -> Value {
    let count = |status: &Value, pointer: &str| status.pointer(pointer).and_then(Value::as_f64);
    // A server that just started may not have written its first status yet: nothing before.
    let Some(cycles_after) = count(after, "/cycle_time/cycles") else { return Value::Null };
    let cycles_before = count(before, "/cycle_time/cycles").unwrap_or(0.0);
    let cycles = cycles_after - cycles_before;
    if cycles <= 0.0 {
        return Value::Null;
    }
    let mut means = serde_json::Map::new();
    means.insert("cycles".into(), json!(cycles));
    let mut total = 0.0;
    for (step, seconds) in after["cycle_time"]["seconds"].as_object().into_iter().flatten() {
        let spent =
            seconds.as_f64().unwrap_or(0.0) - count(before, &format!("/cycle_time/seconds/{step}")).unwrap_or(0.0);
        if step != "idle" {
            total += spent;
            means.insert(step.clone(), json!((spent / cycles * 1e7).round() / 10.0));
        }
    }
    means.insert("cycle".into(), json!((total / cycles * 1e7).round() / 10.0));
    let stored = count(after, "/counters/stored").unwrap_or(0.0) - count(before, "/counters/stored").unwrap_or(0.0);
    means.insert("stored_per_cycle".into(), json!((stored / cycles * 100.0).round() / 100.0));
    Value::Object(means)
}

/// loadgen with `env`, in network namespace `netns` (the tun scenarios) or the bench's own.
fn loadgen(bench: &Bench, env: &[(String, String)], netns: Option<&str>) -> Command {
    let mut command = match netns {
        Some(netns) => {
            let mut command = Command::new("ip");
            command.args(["netns", "exec", netns]).arg(&bench.loadgen_bin);
            command
        }
        None => Command::new(&bench.loadgen_bin),
    };
    command.envs(env.iter().map(|(key, value)| (key.as_str(), value.as_str())));
    command
}

/// Starts a loadgen receiver bound to `bind` and waits until it says it is ready.
pub fn start_receiver(
    bench: &Bench,
    (env, netns): (&[(String, String)], Option<&str>),
    bind: &str,
    idle: Duration,
    log: &Path,
) -> Result<Proc, String> {
    let mut command = loadgen(bench, env, netns);
    command.args(["recv", "--bind", bind, "--idle-ms", &idle.as_millis().to_string()]);
    let receiver = Proc::start("loadgen recv", command, log)?;
    let ready = receiver.line(START_LIMIT)?;
    if ready != "ready" {
        return Err(format!("loadgen recv said {ready:?}"));
    }
    Ok(receiver)
}

/// Starts a loadgen sender to `to` with the run's payload, threads and duration.
pub fn start_sender(
    bench: &Bench,
    (env, netns): (&[(String, String)], Option<&str>),
    to: &str,
    run: &Run,
    log: &Path,
) -> Result<Proc, String> {
    let mut command = loadgen(bench, env, netns);
    command.args(["send", "--to", to, "--payload", &run.payload.to_string()]);
    command.args(["--threads", &run.senders.to_string(), "--duration-ms", &run.duration.as_millis().to_string()]);
    Proc::start("loadgen send", command, log)
}

/// Waits for the sender's report, tells the receiver how many were sent, waits for its report,
/// and lets both exit: (sender's report, receiver's report).
pub fn collect(sender: &mut Proc, receiver: &mut Proc, run: &Run) -> Result<(Value, Value), String> {
    let sent = sender.json_line(run.duration + REPORT_LIMIT)?;
    let sent_count = sent["sent"].as_u64().ok_or("loadgen send reported no count")?;
    receiver.tell(&sent_count.to_string())?;
    let received = receiver.json_line(REPORT_LIMIT)?;
    sender.finish(Duration::from_secs(5));
    receiver.finish(Duration::from_secs(5));
    Ok((sent, received))
}

/// Runs the receiver, then the senders for the run's duration; fills `measurement`.
pub fn drive(bench: &Bench, run: &Run, dir: &Path, apps: &Apps, measurement: &mut Measurement) -> Result<(), String> {
    let log = dir.join("loadgen-recv.log");
    let (receiver_netns, sender_netns) = match &apps.netns {
        Some((receiver, sender)) => (Some(receiver.as_str()), Some(sender.as_str())),
        None => (None, None),
    };
    let mut receiver = start_receiver(bench, (&apps.receiver_env, receiver_netns), &apps.bind, apps.idle, &log)?;
    let to = &apps.to;
    let mut sender = start_sender(bench, (&apps.sender_env, sender_netns), to, run, &dir.join("loadgen-send.log"))?;
    let (sent, received) = collect(&mut sender, &mut receiver, run)?;
    let sent_count = sent["sent"].as_u64().unwrap_or(0);

    let count = received["received"].as_u64().unwrap_or(0);
    let first_send_ns = received["first_send_ns"].as_u64().unwrap_or(0);
    let last_recv_ns = received["last_recv_ns"].as_u64().unwrap_or(0);
    measurement.packets = count;
    if count > 0 && last_recv_ns > first_send_ns {
        measurement.pps = Some(count as f64 / ((last_recv_ns - first_send_ns) as f64 / 1e9));
        measurement.p50_us = received["p50_us"].as_u64();
        measurement.p99_us = received["p99_us"].as_u64();
    }
    measurement.max_rss_kib = received["max_rss_kib"].as_u64().max(sent["max_rss_kib"].as_u64());
    measurement.extra.push(("sent", json!(sent_count)));
    measurement.extra.push(("lost", json!(sent_count.saturating_sub(count))));
    measurement.extra.push(("send_errors", sent["errors"].clone()));
    measurement.extra.push(("send_p50_us", sent["send_p50_us"].clone()));
    measurement.extra.push(("send_p99_us", sent["send_p99_us"].clone()));
    // CPU per datagram of each process: the cost the shim adds, independent of how busy the machine is.
    let per_packet = |cpu_us: Option<u64>, packets: u64| cpu_us.filter(|_| packets > 0).map(|cpu| cpu * 1000 / packets);
    measurement.extra.push(("send_cpu_ns_per_packet", json!(per_packet(sent["cpu_us"].as_u64(), sent_count))));
    measurement.extra.push(("recv_cpu_ns_per_packet", json!(per_packet(received["cpu_us"].as_u64(), count))));
    Ok(())
}
