//! `cargo run --release --example bench -- [--quick] [--json] [--volume DIR] [--only NAME,…]`
//!
//! Measures, in one run, every scenario of the benchmark with the same payload sizes (64 B, 512 B,
//! 8 KiB) and sender counts (1, 8), and prints a table (and with `--json` one JSON object per
//! scenario and size on stdout, the table then going to stderr):
//!
//! - `fsync-limit`: 4 KiB append + fdatasync on the volume's disk (the physical limit per sync).
//! - `ack-limit`: closed-loop senders on unix sockets to one thread that group-commits with one
//!   write and fdatasync on the volume's disk and then acks, with nothing else (the physical limit
//!   of any transport that acks after its sync, ftss-fabric and redis-stream among them).
//! - `deliver-limit`: the same, where the server also writes each synced group to a receiver
//!   thread, which sends receipts back once a millisecond for the next group to sync (the
//!   ceiling of a transport that stores, acks, delivers and takes receipts durably).
//! - `udp-raw`: loopback UDP between two `loadgen` processes (the ceiling).
//! - `shim-passthrough`: the same under the shim, destination outside FTSS_ROUTES.
//! - `ftss-async`, `ftss-volume`, `ftss-guaranteed`: end to end through a real ftss-server on a
//!   local-directory volume; latency from the sender's call to the receiver's recvfrom (and, as
//!   `ack_p50_us`/`ack_p99_us`, from the call to its return after the server's ack).
//! - `ftss-recv-once`: `ftss-volume` with the receiver in `FTSS_RECV=once` (each datagram's id
//!   appended to the port's once-ledger and fdatasync'd before recv returns it): the cost of
//!   exactly once per port, against `ftss-volume` in the same run.
//! - `ftss-fabric`, `ftss-fabric-async`: the same through the fabric transport (both nodes connected
//!   to the server over a unix socket; `volume` ack mode, which over the fabric waits for the
//!   server's stored ack, and `async`).
//! - `ftss-1-instance`, `ftss-2-instances`: two flows crossing partitions (a → c, e → b), each with
//!   the run's sender count and `async` acks (so the servers set the pace), through one server and
//!   through two instances sharing two partitions (`--ha --partitions 2`): how throughput grows
//!   with instances.
//! - `ftss-smb`, `smb-file-per-packet`: the same over a private smbd + smbnetfs mount (skipped
//!   unless samba, smbnetfs and fuse3 are installed and port 445 on loopback is free).
//! - `nfs-file-per-packet`, `ftss-nfs`, `smb-kernel-file-per-packet`, `ftss-smb-kernel`: a node in
//!   a QEMU guest on the kernel's NFSv4.2 / SMB3 client (default mounts of nfs-ganesha / smbd on
//!   the host), the naive file-per-packet spool against ftss on the same mount (`bench/lab.rs`;
//!   skipped unless the lab's packages are installed).
//! - `veth-udp`, `tun-udp`, `veth-tcp`, `tun-tcp`: two network namespaces joined by a veth pair
//!   (the plain network) or by ftss-node in each with ftss-server between (`bench/tun.rs`): loadgen
//!   UDP without the shim, and one nc TCP stream (MB/s); skipped unless root with /dev/net/tun.
//! - `redis-stream`: redis-server with appendonly + appendfsync always, XADD / XREADGROUP + XACK.
//! - `server-rss`: ftss-server's RSS with 1M packets queued for an absent receiver, against idle.
//!
//! Senders are threads of one `loadgen` process (one socket each), so ftss's per-process group
//! commit applies, as it would to a multi-threaded app. `--volume DIR` puts every scenario's files
//! under DIR (default: a directory under the system temp dir). FTSS_BIN_DIR uses already-built
//! binaries (`libftss_shim.so`, `ftss-server`, `examples/loadgen`) instead of building them.

#[path = "bench/ack_limit.rs"]
mod ack_limit;
#[path = "bench/apps.rs"]
mod apps;
#[path = "../tests/common/mod.rs"]
mod common;
#[path = "bench/disk.rs"]
mod disk;
#[path = "bench/lab.rs"]
mod lab;
#[path = "bench/procs.rs"]
mod procs;
#[path = "bench/redis.rs"]
mod redis;
#[path = "bench/report.rs"]
mod report;
#[path = "bench/scaleout.rs"]
mod scaleout;
#[path = "bench/server_rss.rs"]
mod server_rss;
#[path = "bench/smb.rs"]
mod smb;
#[path = "bench/tun.rs"]
mod tun;

use std::cell::Cell;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use procs::TempDir;
use report::{Measurement, TABLE_HEADER, table_row};

const PAYLOADS: [usize; 3] = [64, 512, 8192];
const SENDERS: [usize; 2] = [1, 8];
/// Every scenario, in the order they run.
const SCENARIOS: [&str; 25] = [
    "fsync-limit",
    "ack-limit",
    "deliver-limit",
    "udp-raw",
    "shim-passthrough",
    "ftss-async",
    "ftss-volume",
    "ftss-recv-once",
    "ftss-guaranteed",
    "ftss-fabric",
    "ftss-fabric-async",
    "ftss-1-instance",
    "ftss-2-instances",
    "ftss-smb",
    "smb-file-per-packet",
    "nfs-file-per-packet",
    "ftss-nfs",
    "smb-kernel-file-per-packet",
    "ftss-smb-kernel",
    "veth-udp",
    "tun-udp",
    "veth-tcp",
    "tun-tcp",
    "redis-stream",
    "server-rss",
];

/// How long and how much, per mode.
struct Plan {
    /// How long senders send in each run.
    duration: Duration,
    payloads: Vec<usize>,
    /// Packets queued for the server-rss scenario.
    rss_packets: u64,
    /// Bytes of the TCP scenarios' transfer.
    tcp_bytes: usize,
    /// Runs of each point of the cheap baselines (fsync-limit, udp-raw, shim-passthrough); the
    /// median by pps is reported, because on a shared machine their rates vary by more than the
    /// differences they are compared for.
    repeats: usize,
}

impl Plan {
    fn new(quick: bool, smoke: bool) -> Plan {
        if smoke {
            // The CI smoke: every scenario once or twice, a fraction of a second each.
            Plan {
                duration: Duration::from_millis(150),
                payloads: vec![512],
                rss_packets: 2_000,
                tcp_bytes: 4_000_000,
                repeats: 1,
            }
        } else if quick {
            Plan {
                duration: Duration::from_millis(600),
                payloads: PAYLOADS.to_vec(),
                rss_packets: 200_000,
                tcp_bytes: 20_000_000,
                repeats: 1,
            }
        } else {
            Plan {
                duration: Duration::from_secs(3),
                payloads: PAYLOADS.to_vec(),
                rss_packets: 1_000_000,
                tcp_bytes: 100_000_000,
                repeats: 3,
            }
        }
    }
}

/// What every scenario needs: the binaries and where to put files.
pub struct Bench {
    pub shim: PathBuf,
    pub server_bin: PathBuf,
    pub loadgen_bin: PathBuf,
    base: PathBuf,
    runs: Cell<u32>,
}

impl Bench {
    /// A fresh directory for one run, removed when dropped.
    pub fn run_dir(&self, tag: &str) -> Result<TempDir, String> {
        let index = self.runs.get() + 1;
        self.runs.set(index);
        TempDir::new(self.base.join(format!("{index:03}-{tag}")))
    }
}

/// One point of the grid.
pub struct Run {
    pub payload: usize,
    pub senders: usize,
    pub duration: Duration,
}

struct Options {
    quick: bool,
    json: bool,
    smoke: bool,
    volume: Option<PathBuf>,
    only: Option<Vec<String>>,
    /// Only this payload size / sender count (for profiling one point).
    payload: Option<usize>,
    senders: Option<usize>,
}

fn parse_options() -> Result<Options, String> {
    let mut options =
        Options { quick: false, json: false, smoke: false, volume: None, only: None, payload: None, senders: None };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quick" => options.quick = true,
            "--json" => options.json = true,
            // Hidden: the CI smoke test's tiny run.
            "--smoke" => options.smoke = true,
            "--volume" => options.volume = Some(args.next().ok_or("--volume needs a directory")?.into()),
            "--only" => {
                let names: Vec<String> =
                    args.next().ok_or("--only needs names")?.split(',').map(String::from).collect();
                if let Some(unknown) = names.iter().find(|name| !SCENARIOS.contains(&name.as_str())) {
                    return Err(format!("unknown scenario {unknown:?}; known: {}", SCENARIOS.join(", ")));
                }
                options.only = Some(names);
            }
            "--payload" => options.payload = Some(number(args.next(), "--payload")?),
            "--senders" => options.senders = Some(number(args.next(), "--senders")?),
            "-h" | "--help" => {
                println!(
                    "usage: bench [--quick] [--json] [--volume DIR] [--only SCENARIO,…] [--payload B] [--senders N]"
                );
                println!("scenarios: {}", SCENARIOS.join(", "));
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }
    Ok(options)
}

fn number(value: Option<String>, name: &str) -> Result<usize, String> {
    value.and_then(|text| text.parse().ok()).ok_or(format!("{name} needs a number"))
}

fn main() {
    let result = parse_options().and_then(run);
    match result {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(message) => {
            eprintln!("bench failed: {message}");
            std::process::exit(1);
        }
    }
}

/// Where the shim, the server and loadgen are; builds them (same profile) unless FTSS_BIN_DIR is set.
fn binaries() -> Result<(PathBuf, PathBuf, PathBuf), String> {
    let dir = match std::env::var_os("FTSS_BIN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => build()?,
    };
    let paths = (dir.join("libftss_shim.so"), dir.join("ftss-server"), dir.join("examples").join("loadgen"));
    for path in [&paths.0, &paths.1, &paths.2] {
        if !path.exists() {
            return Err(format!("{} not found", path.display()));
        }
    }
    Ok(paths)
}

fn build() -> Result<PathBuf, String> {
    // This binary is target/<profile>/examples/bench.
    let exe = std::env::current_exe().map_err(|error| error.to_string())?;
    let dir = exe.parent().and_then(Path::parent).ok_or("cannot find the target directory")?.to_path_buf();
    let release = dir.file_name().is_some_and(|name| name == "release");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("building libftss_shim.so, ftss-server and loadgen ...");
    let builds: [&[&str]; 2] = [&["-p", "ftss-shim", "-p", "ftss-server"], &["-p", "ftss", "--example", "loadgen"]];
    for targets in builds {
        let mut command = Command::new(&cargo);
        command.args(["build", "-q"]).args(targets).current_dir(env!("CARGO_MANIFEST_DIR"));
        if release {
            command.arg("--release");
        }
        let status = command.status().map_err(|error| format!("running cargo: {error}"))?;
        if !status.success() {
            return Err("cargo build failed".into());
        }
    }
    if !release {
        eprintln!("note: not a release build; numbers are not representative (use --release)");
    }
    Ok(dir)
}

/// Runs everything selected; returns false if any scenario failed.
fn run(options: Options) -> Result<bool, String> {
    let (shim, server_bin, loadgen_bin) = binaries()?;
    let plan = Plan::new(options.quick, options.smoke);
    let root = match &options.volume {
        Some(dir) => dir.join(format!("ftss-bench-{}", std::process::id())),
        None => std::env::temp_dir().join(format!("ftss-bench-{}", std::process::id())),
    };
    let root = TempDir::new(root)?;
    let bench = Bench { shim, server_bin, loadgen_bin, base: root.0.clone(), runs: Cell::new(0) };
    let selected = |name: &str| options.only.as_ref().is_none_or(|only| only.iter().any(|item| item == name));
    let started = Instant::now();
    let mut results: Vec<Measurement> = Vec::new();
    let mut emit = |measurement: Measurement| {
        if options.json {
            println!("{}", measurement.to_json());
            let _ = std::io::stdout().flush();
        }
        eprintln!("{}", table_row(&measurement));
        results.push(measurement);
    };
    eprintln!("{TABLE_HEADER}");

    let senders_grid: Vec<usize> =
        SENDERS.into_iter().filter(|senders| options.senders.is_none_or(|only| only == *senders)).collect();
    let grid = |payloads: &[usize]| -> Vec<Run> {
        payloads
            .iter()
            .filter(|payload| options.payload.is_none_or(|only| only == **payload))
            .flat_map(|&payload| {
                senders_grid.iter().map(move |&senders| Run { payload, senders, duration: plan.duration })
            })
            .collect()
    };

    if selected("fsync-limit") {
        for senders in senders_grid.clone() {
            let dir = bench.run_dir("fsync-limit")?;
            emit(outcome("fsync-limit", disk::FSYNC_APPEND_BYTES, senders, true, || {
                median_of(plan.repeats, || disk::fsync_limit(&dir.0, senders, plan.duration))
            }));
        }
    }
    for (name, deliver) in [("ack-limit", false), ("deliver-limit", true)] {
        if !selected(name) {
            continue;
        }
        for run in grid(&plan.payloads) {
            let dir = bench.run_dir(name)?;
            emit(outcome(name, run.payload, run.senders, true, || {
                median_of(plan.repeats, || {
                    ack_limit::ack_limit(&dir.0, run.payload, run.senders, run.duration, deliver)
                })
            }));
        }
    }
    type AppScenario = (&'static str, bool, fn(&Bench, &Run) -> Result<Measurement, String>);
    // The plain-UDP pair runs interleaved (raw, pass-through, raw, …) so that both see the same
    // background load; each reports its median run.
    for run in grid(&plan.payloads) {
        let (mut raw, mut passthrough) = (Vec::new(), Vec::new());
        for _ in 0..plan.repeats {
            if selected("udp-raw") {
                raw.push(apps::udp_raw(&bench, &run));
            }
            if selected("shim-passthrough") {
                passthrough.push(apps::shim_passthrough(&bench, &run));
            }
        }
        for (name, runs) in [("udp-raw", raw), ("shim-passthrough", passthrough)] {
            if !runs.is_empty() {
                emit(outcome(name, run.payload, run.senders, false, || median(runs)));
            }
        }
    }
    let app_scenarios: [AppScenario; 8] = [
        ("ftss-async", false, |bench, run| apps::ftss_local(bench, run, "ftss-async", "async")),
        ("ftss-volume", true, |bench, run| apps::ftss_local(bench, run, "ftss-volume", "volume")),
        ("ftss-recv-once", true, |bench, run| apps::ftss_recv_once(bench, run)),
        ("ftss-guaranteed", true, |bench, run| apps::ftss_local(bench, run, "ftss-guaranteed", "guaranteed")),
        ("ftss-fabric", true, |bench, run| apps::ftss_fabric(bench, run, "ftss-fabric", "volume")),
        ("ftss-fabric-async", false, |bench, run| apps::ftss_fabric(bench, run, "ftss-fabric-async", "async")),
        ("ftss-1-instance", false, |bench, run| scaleout::scaleout(bench, run, "ftss-1-instance", 1)),
        ("ftss-2-instances", false, |bench, run| scaleout::scaleout(bench, run, "ftss-2-instances", 2)),
    ];
    for (name, durable, scenario) in app_scenarios {
        if selected(name) {
            for run in grid(&plan.payloads) {
                emit(outcome(name, run.payload, run.senders, durable, || scenario(&bench, &run)));
            }
        }
    }
    if selected("ftss-smb") || selected("smb-file-per-packet") {
        run_smb(&bench, &grid(&plan.payloads), &selected, &mut emit)?;
    }
    lab::run(&bench, &grid(&plan.payloads), &selected, &mut emit);
    tun::run(&bench, &grid(&plan.payloads), plan.tcp_bytes, &selected, &mut emit);
    if selected("redis-stream") {
        let missing = !procs::have("redis-server");
        for run in grid(&plan.payloads) {
            if missing {
                emit(Measurement::skipped(
                    "redis-stream",
                    run.payload,
                    run.senders,
                    true,
                    "redis-server not installed (apt-get install redis-server)",
                ));
                continue;
            }
            emit(outcome("redis-stream", run.payload, run.senders, true, || redis::redis_stream(&bench, &run)));
        }
    }
    if selected("server-rss") {
        let run = Run { payload: 64, senders: 1, duration: plan.duration };
        emit(outcome("server-rss", 64, 1, true, || server_rss::server_rss(&bench, &run, plan.rss_packets)));
    }

    print_summary(&results, options.json, started);
    Ok(!results.iter().any(|measurement| measurement.skipped.as_deref().is_some_and(|why| why.starts_with("failed"))))
}

/// The table and the targets, on stdout (on stderr with `--json`, which keeps stdout JSON only).
fn print_summary(results: &[Measurement], json: bool, started: Instant) {
    let mut lines = vec![String::new(), TABLE_HEADER.to_owned()];
    lines.extend(results.iter().map(table_row));
    lines.push(String::new());
    lines.extend(targets(results));
    lines.push(format!("total time {:.0} s", started.elapsed().as_secs_f64()));
    for line in lines {
        if json {
            eprintln!("{line}");
        } else {
            println!("{line}");
        }
    }
}

/// Runs `measure` `repeats` times and keeps the run with the median pps.
fn median_of(repeats: usize, mut measure: impl FnMut() -> Result<Measurement, String>) -> Result<Measurement, String> {
    median((0..repeats.max(1)).map(|_| measure()).collect())
}

/// The run with the median pps (all rates in `pps_runs`); the first failure if any run failed.
fn median(runs: Vec<Result<Measurement, String>>) -> Result<Measurement, String> {
    let mut runs = runs.into_iter().collect::<Result<Vec<_>, _>>()?;
    if runs.len() == 1 {
        return Ok(runs.remove(0));
    }
    runs.sort_by(|a, b| a.pps.unwrap_or(0.0).total_cmp(&b.pps.unwrap_or(0.0)));
    let rates: Vec<u64> = runs.iter().map(|run| run.pps.unwrap_or(0.0) as u64).collect();
    let mut median = runs.remove(runs.len() / 2);
    median.extra.push(("pps_runs", serde_json::json!(rates)));
    Ok(median)
}

/// Runs one measurement; a failure becomes a "failed: …" line instead of ending the bench.
fn outcome(
    scenario: &'static str,
    payload: usize,
    senders: usize,
    durable: bool,
    measure: impl FnOnce() -> Result<Measurement, String>,
) -> Measurement {
    measure()
        .unwrap_or_else(|error| Measurement::skipped(scenario, payload, senders, durable, &format!("failed: {error}")))
}

fn run_smb(
    bench: &Bench,
    grid: &[Run],
    selected: &dyn Fn(&str) -> bool,
    emit: &mut dyn FnMut(Measurement),
) -> Result<(), String> {
    let share = match smb::unavailable() {
        Some(why) => Err(why),
        None => {
            let dir = bench.run_dir("smb")?;
            smb::SmbShare::start(&dir.0).map(|share| (share, dir)).map_err(|error| format!("failed: {error}"))
        }
    };
    for (name, durable) in [("ftss-smb", true), ("smb-file-per-packet", true)] {
        if !selected(name) {
            continue;
        }
        for run in grid {
            let (share, _dir) = match &share {
                Ok(share) => share,
                Err(why) => {
                    emit(Measurement::skipped(name, run.payload, run.senders, durable, why));
                    continue;
                }
            };
            emit(outcome(name, run.payload, run.senders, durable, || {
                let index = bench.runs.get() + 1;
                bench.runs.set(index);
                let sub = format!("{index:03}-{name}");
                let local = TempDir::new(share.local.join(&sub))?;
                let mounted = share.mounted.join(&sub);
                if name == "smb-file-per-packet" {
                    return disk::file_per_packet(&mounted, run.payload, run.senders, run.duration);
                }
                let dir = bench.run_dir("ftss-smb")?;
                let fabric = apps::Fabric::start(bench, &dir.0, &local.0.join("volume"), &mounted.join("volume"))?;
                apps::ftss(bench, run, "ftss-smb", "volume", fabric)
            }));
        }
    }
    Ok(())
}

/// The ftss-volume measurement at one grid point.
fn volume_at(results: &[Measurement], payload: usize, senders: usize) -> Option<&Measurement> {
    results
        .iter()
        .find(|m| m.scenario == "ftss-volume" && m.payload == payload && m.senders == senders && m.skipped.is_none())
}

/// The targets as measured ratios.
fn targets(results: &[Measurement]) -> Vec<String> {
    let find = |scenario: &str, payload: usize, senders: usize| {
        results
            .iter()
            .find(|m| m.scenario == scenario && m.payload == payload && m.senders == senders && m.skipped.is_none())
    };
    let pps = |scenario: &str, payload: usize, senders: usize| find(scenario, payload, senders).and_then(|m| m.pps);
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
        _ => "n/a".to_owned(),
    };
    let mut lines = vec!["targets (measured ratio, target):".to_owned()];
    // Ratios of pps at every grid point where both scenarios ran.
    let mut per_grid_point = |scenario: &str, baseline: &str, target: &str| {
        for payload in PAYLOADS {
            for senders in SENDERS {
                let (Some(value), Some(base)) = (pps(scenario, payload, senders), pps(baseline, payload, senders))
                else {
                    continue;
                };
                lines.push(format!(
                    "  {scenario} / {baseline} pps ({payload} B, {senders} senders): {} ({target})",
                    ratio(Some(value), Some(base))
                ));
            }
        }
    };
    per_grid_point("shim-passthrough", "udp-raw", ">= 0.95");
    per_grid_point("ftss-smb", "smb-file-per-packet", ">= 20");
    per_grid_point("ftss-nfs", "nfs-file-per-packet", "kernel NFSv4.2 client");
    per_grid_point("ftss-smb-kernel", "nfs-file-per-packet", "kernel SMB3 client");
    per_grid_point("ftss-smb-kernel", "smb-kernel-file-per-packet", "kernel SMB3 client");
    // The same comparison by CPU per datagram (sender + receiver), which background load does not skew.
    let cpu = |scenario: &str, payload: usize, senders: usize| {
        let measurement = find(scenario, payload, senders)?;
        let send = measurement.extra("send_cpu_ns_per_packet")?.as_f64()?;
        let receive = measurement.extra("recv_cpu_ns_per_packet")?.as_f64()?;
        Some(send + receive)
    };
    for payload in PAYLOADS {
        for senders in SENDERS {
            if let (Some(raw), Some(shim)) =
                (cpu("udp-raw", payload, senders), cpu("shim-passthrough", payload, senders))
            {
                lines.push(format!(
                    "  udp-raw / shim-passthrough CPU per datagram ({payload} B, {senders} senders): {:.2} (>= 0.95: {raw:.0} vs {shim:.0} ns)",
                    raw / shim
                ));
            }
        }
    }
    let fsync = find("fsync-limit", disk::FSYNC_APPEND_BYTES, 1);
    let volume = find("ftss-volume", 512, 8);
    lines.push(format!(
        "  ftss-volume (512 B, 8 senders) / fsync-limit rate: {} (>= 10)",
        ratio(volume.and_then(|m| m.pps), fsync.and_then(|m| m.pps))
    ));
    lines.push(format!(
        "  ftss-volume (512 B, 8 senders) / redis-stream pps: {} (>= 2)",
        ratio(volume.and_then(|m| m.pps), pps("redis-stream", 512, 8))
    ));
    lines.push(format!(
        "  ftss-volume (512 B, 8 senders) p99 / fsync p99: {} (<= 3; send-call p99 / fsync p99: {})",
        ratio(volume.and_then(|m| m.p99_us).map(|v| v as f64), fsync.and_then(|m| m.p99_us).map(|v| v as f64)),
        ratio(
            volume.and_then(|m| m.extra("send_p99_us")).and_then(|v| v.as_f64()),
            fsync.and_then(|m| m.p99_us).map(|v| v as f64)
        )
    ));
    for (payload, senders) in [(512, 1), (512, 8)] {
        let fabric = find("ftss-fabric", payload, senders);
        lines.push(format!(
            "  ftss-fabric / ftss-volume ({payload} B, {senders} senders): pps {}, p50 latency {} (fabric: stored ack, no file I/O on the node)",
            ratio(fabric.and_then(|m| m.pps), volume_at(results, payload, senders).and_then(|m| m.pps)),
            ratio(
                fabric.and_then(|m| m.p50_us).map(|v| v as f64),
                volume_at(results, payload, senders).and_then(|m| m.p50_us).map(|v| v as f64)
            )
        ));
    }
    for payload in PAYLOADS {
        for senders in SENDERS {
            // These scenarios run two flows: their sender count is twice the run's.
            let (one, two) =
                (pps("ftss-1-instance", payload, senders * 2), pps("ftss-2-instances", payload, senders * 2));
            if one.is_some() && two.is_some() {
                lines.push(format!(
                    "  ftss-2-instances / ftss-1-instance pps ({payload} B, 2 flows x {senders} senders): {} (scale-out)",
                    ratio(two, one)
                ));
            }
        }
    }
    if let Some(rss) = results.iter().find(|m| m.scenario == "server-rss" && m.skipped.is_none()) {
        let above = rss.extra("rss_above_idle_kib").and_then(|v| v.as_u64()).unwrap_or(0);
        lines.push(format!("  server RSS above idle with {} queued: {} MiB (<= 64 MiB)", rss.packets, above / 1024));
    }
    lines
}
