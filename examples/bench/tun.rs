//! `veth-udp`, `tun-udp`, `veth-tcp`, `tun-tcp`: two network namespaces, nodes a (10.77.0.1) and b
//! (10.77.0.2), joined either by a veth pair (the plain network: the baseline) or by ftss-node in
//! each and ftss-server on a local directory volume (every IP packet crosses the array). UDP:
//! loadgen from a to b, unmodified and without the shim (pps, latency, what the kernel dropped).
//! TCP: one nc stream from a to b (MB/s). The tun scenarios also give the server's CPU time per IP
//! packet it stored.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::apps::{self, Apps, Fabric, RECEIVER_NODE, SENDER_NODE};
use crate::procs::{Proc, cpu_ticks, free_udp_port};
use crate::report::Measurement;
use crate::{Bench, Run};

/// The agents' inbox poll (as the shims' in the local-volume scenarios).
const AGENT_POLL_MS: u64 = apps::POLL_MS;
/// How long a TCP transfer may take.
const TCP_LIMIT: Duration = Duration::from_secs(300);

/// Two namespaces, removed (with whatever runs in them) when dropped.
struct Pair {
    a: String,
    b: String,
    /// a's end of the veth pair, once joined so.
    veth_a: Option<String>,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let output = Command::new("ip").args(args).output().map_err(|error| format!("ip: {error}"))?;
    if !output.status.success() {
        return Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&output.stderr).trim()));
    }
    Ok(())
}

impl Pair {
    fn new() -> Result<Pair, String> {
        let tag = format!("{}-{}", std::process::id(), fsbridge::random_u64() % 100_000);
        let pair = Pair { a: format!("ftssbench-{tag}-a"), b: format!("ftssbench-{tag}-b"), veth_a: None };
        for netns in [&pair.a, &pair.b] {
            ip(&["netns", "add", netns])?;
            ip(&["-n", netns, "link", "set", "lo", "up"])?;
        }
        Ok(pair)
    }

    /// Joins the two with a veth pair holding the nodes' addresses.
    fn join_with_veth(&mut self) -> Result<(), String> {
        let tag = fsbridge::random_u64() % 1_000_000;
        let (end_a, end_b) = (format!("fva{tag}"), format!("fvb{tag}"));
        ip(&["link", "add", &end_a, "type", "veth", "peer", "name", &end_b])?;
        for (end, netns, node) in [(&end_a, &self.a, SENDER_NODE), (&end_b, &self.b, RECEIVER_NODE)] {
            ip(&["link", "set", end, "netns", netns])?;
            ip(&["-n", netns, "addr", "add", &format!("{}/24", node.1), "dev", end])?;
            ip(&["-n", netns, "link", "set", end, "up"])?;
        }
        self.veth_a = Some(end_a);
        Ok(())
    }

    /// Packets a's interface toward b has sent so far (the kernel's counter).
    fn sent_by_a(&self) -> Option<u64> {
        let device = self.veth_a.as_deref().unwrap_or("ftss0");
        let output =
            Command::new("ip").args(["-n", &self.a, "-s", "-j", "link", "show", "dev", device]).output().ok()?;
        let links: serde_json::Value = serde_json::from_slice(&output.stdout).ok()?;
        links[0]["stats64"]["tx"]["packets"].as_u64()
    }

    fn netns(&self) -> Option<(String, String)> {
        // (receiver, sender)
        Some((self.b.clone(), self.a.clone()))
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        for netns in [&self.a, &self.b] {
            if let Ok(output) = Command::new("ip").args(["netns", "pids", netns]).output() {
                for pid in String::from_utf8_lossy(&output.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
            }
            let _ = Command::new("ip").args(["netns", "del", netns]).status();
        }
    }
}

/// The array between the namespaces: the server and an agent in each.
struct Array {
    fabric: Fabric,
    agents: Vec<Proc>,
    volume: PathBuf,
}

impl Array {
    fn start(bench: &Bench, node_bin: &Path, dir: &Path, pair: &Pair) -> Result<Array, String> {
        let volume = dir.join("volume");
        let fabric = Fabric::start(bench, dir, &volume, &volume)?;
        let mut agents = Vec::new();
        for (netns, node) in [(&pair.a, SENDER_NODE), (&pair.b, RECEIVER_NODE)] {
            let mut command = Command::new("ip");
            command
                .args(["netns", "exec", netns])
                .arg(node_bin)
                .env("FTSS_VOLUME", &volume)
                .env("FTSS_NODE", node.0)
                .env("FTSS_ADDR", node.1.to_string())
                .env("FTSS_POLL_MS", AGENT_POLL_MS.to_string())
                .env_remove("LD_PRELOAD");
            agents.push(Proc::start("ftss-node", command, &dir.join(format!("agent-{}.log", node.0)))?);
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let output = Command::new("ip").args(["-n", netns, "-o", "addr", "show", "dev", "ftss0"]).output();
                if output.is_ok_and(|output| String::from_utf8_lossy(&output.stdout).contains("inet ")) {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(format!("ftss-node did not bring ftss0 up in {netns}"));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(Array { fabric, agents, volume })
    }

    /// IP packets the server stored (both nodes), from its status.
    fn ip_packets_stored(&self) -> u64 {
        // status.json is rewritten every 250 ms.
        std::thread::sleep(Duration::from_millis(400));
        let Ok(bytes) = std::fs::read(self.volume.join("server").join("status.json")) else { return 0 };
        let Ok(status) = serde_json::from_slice::<serde_json::Value>(&bytes) else { return 0 };
        [SENDER_NODE.0, RECEIVER_NODE.0].iter().filter_map(|node| status["nodes"][node]["ip"]["sent"].as_u64()).sum()
    }

    fn server_ticks(&self) -> Option<u64> {
        cpu_ticks(self.fabric.server.pid())
    }

    fn stop(mut self) {
        for agent in &mut self.agents {
            agent.terminate(Duration::from_secs(5));
        }
        self.fabric.server.terminate(Duration::from_secs(5));
    }
}

/// Adds the server's CPU time per IP packet stored (clock ticks of 10 ms: a rough figure).
fn server_cpu(measurement: &mut Measurement, ticks: Option<u64>, packets: u64) {
    measurement.extra.push(("ip_packets_stored", json!(packets)));
    if let Some(ticks) = ticks.filter(|_| packets > 0) {
        measurement.extra.push(("server_cpu_ns_per_packet", json!(ticks * 10_000_000 / packets)));
    }
}

/// The two namespaces of `scenario`, joined by the array (`tun-*`: returned) or a veth pair.
fn nodes(bench: &Bench, node_bin: &Path, dir: &Path, scenario: &str) -> Result<(Pair, Option<Array>), String> {
    let mut pair = Pair::new()?;
    if scenario.starts_with("tun") {
        let array = Array::start(bench, node_bin, dir, &pair)?;
        return Ok((pair, Some(array)));
    }
    pair.join_with_veth()?;
    Ok((pair, None))
}

/// `veth-udp` / `tun-udp` at one grid point.
fn udp(bench: &Bench, node_bin: &Path, run: &Run, scenario: &'static str) -> Result<Measurement, String> {
    let dir = bench.run_dir(scenario)?;
    let (pair, array) = nodes(bench, node_bin, &dir.0, scenario)?;
    let tun = array.is_some();
    let port = free_udp_port()?;
    let apps = Apps {
        receiver_env: Vec::new(),
        sender_env: Vec::new(),
        netns: pair.netns(),
        bind: format!("0.0.0.0:{port}"),
        to: format!("{}:{port}", RECEIVER_NODE.1),
        idle: if tun { apps::FTSS_IDLE } else { apps::UDP_IDLE },
    };
    let mut measurement = Measurement::new(scenario, run.payload, run.senders, false);
    let ticks_before = array.as_ref().and_then(Array::server_ticks);
    let result = apps::drive(bench, run, &dir.0, &apps, &mut measurement);
    if let Some(array) = array {
        let ticks = array.server_ticks().zip(ticks_before).map(|(after, before)| after - before);
        server_cpu(&mut measurement, ticks, array.ip_packets_stored());
        array.stop();
    }
    result?;
    Ok(measurement)
}

/// `veth-tcp` / `tun-tcp`: `bytes` through one nc TCP stream.
fn tcp(bench: &Bench, node_bin: &Path, bytes: usize, scenario: &'static str) -> Result<Measurement, String> {
    let dir = bench.run_dir(scenario)?;
    let (pair, array) = nodes(bench, node_bin, &dir.0, scenario)?;
    let mut receiver = Command::new("ip");
    receiver.args(["netns", "exec", &pair.b, "sh", "-c", "nc -l -p 5000 | wc -c"]);
    let mut receiver = Proc::start("nc -l", receiver, &dir.0.join("nc-recv.log"))?;
    std::thread::sleep(Duration::from_millis(300));
    let ticks_before = array.as_ref().and_then(Array::server_ticks);
    let packets_before = pair.sent_by_a();
    let started = Instant::now();
    let send = format!("head -c {bytes} /dev/zero | nc -N {} 5000", RECEIVER_NODE.1);
    let sent = Command::new("ip")
        .args(["netns", "exec", &pair.a, "sh", "-c", &send])
        .status()
        .map_err(|error| format!("nc: {error}"))?;
    let count = receiver.line(TCP_LIMIT);
    let seconds = started.elapsed().as_secs_f64();
    let mut measurement = Measurement::new(scenario, 0, 1, false);
    // IP packets a sent toward b (data and its own acks), by its interface's counter.
    measurement.packets = pair.sent_by_a().zip(packets_before).map_or(0, |(after, before)| after - before);
    if let Some(array) = array {
        let ticks = array.server_ticks().zip(ticks_before).map(|(after, before)| after - before);
        server_cpu(&mut measurement, ticks, array.ip_packets_stored());
        array.stop();
    }
    receiver.finish(Duration::from_secs(5));
    if !sent.success() {
        return Err("the sending nc failed".into());
    }
    let received: usize = count?.trim().parse().map_err(|_| "the receiver printed no byte count")?;
    if received != bytes {
        return Err(format!("received {received} of {bytes} bytes"));
    }
    measurement.extra.push(("tcp_bytes", json!(bytes)));
    measurement.extra.push(("seconds", json!((seconds * 1000.0).round() / 1000.0)));
    measurement.extra.push(("mb_per_s", json!((bytes as f64 / 1e6 / seconds * 10.0).round() / 10.0)));
    Ok(measurement)
}

/// Runs the selected scenarios: UDP over the grid, then one TCP transfer of `tcp_bytes` each.
pub fn run(
    bench: &Bench,
    grid: &[Run],
    tcp_bytes: usize,
    selected: &dyn Fn(&str) -> bool,
    emit: &mut dyn FnMut(Measurement),
) {
    let node_bin = bench.server_bin.with_file_name("ftss-node");
    let missing = if !node_bin.exists() {
        Some(format!("{} not built", node_bin.display()))
    } else if !Path::new("/dev/net/tun").exists() || Command::new("ip").arg("-V").output().is_err() {
        Some("needs /dev/net/tun and iproute2".to_owned())
    } else {
        // SAFETY: getuid has no preconditions.
        (unsafe { libc::getuid() } != 0).then(|| "needs root (network namespaces)".to_owned())
    };
    for scenario in ["veth-udp", "tun-udp"] {
        if !selected(scenario) {
            continue;
        }
        for run in grid {
            let measurement = match &missing {
                Some(why) => Measurement::skipped(scenario, run.payload, run.senders, false, why),
                None => {
                    crate::outcome(scenario, run.payload, run.senders, false, || udp(bench, &node_bin, run, scenario))
                }
            };
            emit(measurement);
        }
    }
    for scenario in ["veth-tcp", "tun-tcp"] {
        if !selected(scenario) {
            continue;
        }
        let measurement = match &missing {
            Some(why) => Measurement::skipped(scenario, 0, 1, false, why),
            None => crate::outcome(scenario, 0, 1, false, || tcp(bench, &node_bin, tcp_bytes, scenario)),
        };
        emit(measurement);
    }
}
