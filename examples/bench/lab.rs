//! Scenarios on the kernel's own NFS and SMB clients: a node in a QEMU guest (the lab of
//! `tests/lab`, TCG, one vCPU) mounts the volume with default options from nfs-ganesha (NFSv4.2)
//! or smbd (SMB3) on the host's loopback, and runs `loadgen` there. ftss-server and the receivers
//! run on the host against the exported directory, as on the array.
//!
//! - `ftss-nfs`, `ftss-smb-kernel`: `loadgen send` under the shim (node a, `volume` acks, so every
//!   send returns once its datagram is durable on the NFS/SMB server), to one `loadgen recv` per
//!   grid point under the shim on the host (node b).
//! - `nfs-file-per-packet`, `smb-kernel-file-per-packet`: the naive spool on the same mount in the
//!   same guest (`loadgen files`: a file per packet, fsynced and renamed), the baseline.
//!
//! Guest and host clocks differ (a TCG guest's clock starts from the emulated RTC), so rates are
//! the sender's (sent / elapsed) and latencies those of the send call (the time until the
//! datagram was durable on the server); the receiver's count gives the losses.

use std::panic::AssertUnwindSafe;
use std::time::Duration;

use serde_json::{Value, json};

use crate::common::lab::{Ganesha, GaneshaCache, Guest, GuestSpec, Smbd};
use crate::procs::{Proc, free_udp_port, have};
use crate::report::Measurement;
use crate::{Bench, Run, apps};

/// (kernel client, the ftss scenario, its file-per-packet baseline).
pub const KINDS: [(&str, &str, &str); 2] =
    [("nfs4.2", "ftss-nfs", "nfs-file-per-packet"), ("smb3", "ftss-smb-kernel", "smb-kernel-file-per-packet")];

/// Why the lab scenarios cannot run here, or `None`.
fn unavailable() -> Option<String> {
    for program in ["qemu-system-x86_64", "ganesha.nfsd", "smbd", "socat", "cpio", "depmod"] {
        if !have(program) && !have(&format!("/usr/sbin/{program}")) {
            return Some(format!("{program} not installed (bash .ci/run installs the lab's packages)"));
        }
    }
    None
}

/// Runs the selected lab scenarios over `grid`, one guest per kernel client.
pub fn run(bench: &Bench, grid: &[Run], selected: &dyn Fn(&str) -> bool, emit: &mut dyn FnMut(Measurement)) {
    for (kind, ftss, files) in KINDS {
        let wanted: Vec<&'static str> = [files, ftss].into_iter().filter(|name| selected(name)).collect();
        if wanted.is_empty() {
            continue;
        }
        let skip_all = |emit: &mut dyn FnMut(Measurement), why: &str| {
            for name in &wanted {
                for run in grid {
                    emit(Measurement::skipped(name, run.payload, run.senders, true, why));
                }
            }
        };
        if let Some(why) = unavailable() {
            skip_all(emit, &why);
            continue;
        }
        let measured = std::panic::catch_unwind(AssertUnwindSafe(|| one_guest(bench, grid, kind, &wanted)));
        match measured {
            Ok(Ok(measurements)) => measurements.into_iter().for_each(&mut *emit),
            Ok(Err(error)) => skip_all(emit, &format!("failed: {error}")),
            Err(panic) => {
                let why = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|text| text.to_string()))
                    .unwrap_or_default();
                skip_all(emit, &format!("failed: {}", why.lines().next().unwrap_or("the lab panicked")));
            }
        }
    }
}

/// One guest on `kind` running every wanted scenario at every grid point, in grid order (the
/// baseline first at each point).
fn one_guest(bench: &Bench, grid: &[Run], kind: &str, wanted: &[&'static str]) -> Result<Vec<Measurement>, String> {
    let dir = bench.run_dir(&format!("lab-{kind}"))?;
    let volume = dir.0.join("volume");
    let mut fabric = apps::Fabric::start(bench, &dir.0, &volume, &volume)?;
    let ganesha = Ganesha::start(&volume, GaneshaCache::Default);
    let smbd = Smbd::start(&volume);
    let ftss_scenario = wanted.iter().find(|name| name.starts_with("ftss-")).copied();
    let files_scenario = wanted.iter().find(|name| !name.starts_with("ftss-")).copied();

    // A receiver per grid point on the host, each on its own port.
    let mut receivers = Vec::new();
    if ftss_scenario.is_some() {
        for (index, _) in grid.iter().enumerate() {
            let port = free_udp_port()?;
            let log = dir.0.join(format!("recv-{index}.log"));
            let env = fabric.env(bench, apps::RECEIVER_NODE, "volume");
            receivers.push((
                port,
                apps::start_receiver(bench, (&env, None), &format!("0.0.0.0:{port}"), apps::FTSS_IDLE, &log)?,
            ));
        }
    }

    let minor = kind.strip_prefix("nfs4.").unwrap_or("1");
    let loadgen_bin = bench.loadgen_bin.canonicalize().map_err(|error| error.to_string())?;
    let shim = bench.shim.canonicalize().map_err(|error| error.to_string())?;
    let loadgen = loadgen_bin.display();
    let artifacts = loadgen_bin.parent().and_then(|examples| examples.parent()).ok_or("no artifact directory")?;
    let mut script = format!("host_root {minor}\nbind_host {}\nmount_volume {kind}\n", artifacts.display());
    for (index, run) in grid.iter().enumerate() {
        let common =
            format!("--payload {} --threads {} --duration-ms {}", run.payload, run.senders, run.duration.as_millis());
        if files_scenario.is_some() {
            script.push_str(&format!(
                "out=$(in_root {loadgen} files --dir $VOLUME/baseline-{index} {common}); echo \"BENCH-FILES {index} $out\"\n"
            ));
        }
        if ftss_scenario.is_some() {
            let port = receivers[index].0;
            script.push_str(&format!(
                "out=$(in_root env LD_PRELOAD={shim} FTSS_VOLUME=$VOLUME FTSS_NODE={node} FTSS_ADDR={addr} FTSS_ACK=volume \
                 FTSS_LOG=/tmp/shim.log {loadgen} send --to {to}:{port} {common} </dev/null); echo \"BENCH-FTSS {index} $out\"\n",
                shim = shim.display(),
                node = apps::SENDER_NODE.0,
                addr = apps::SENDER_NODE.1,
                to = apps::RECEIVER_NODE.1,
            ));
        }
    }
    let mut guest = Guest::boot(&GuestSpec {
        name: "bench",
        script,
        nfs_port: Some(ganesha.port),
        smb_port: Some(smbd.port),
        memory_mib: 512,
        cmdline: String::new(),
        qemu_args: Vec::new(),
    });
    let per_point: Duration = grid.iter().map(|run| run.duration * 2 + Duration::from_secs(60)).sum();
    let status = guest.wait(Duration::from_secs(120) + per_point);
    if status != Some(0) {
        let console = guest.console();
        let said: Vec<&str> = console.lines().filter(|line| !line.starts_with('[')).collect();
        let tail = &said[said.len().saturating_sub(6)..];
        return Err(format!("the guest's job failed ({status:?}): {}", tail.join(" | ")));
    }
    let report = |prefix: &str, index: usize| -> Result<Value, String> {
        guest
            .lines(prefix)
            .iter()
            .find_map(|line| line.strip_prefix(&format!("{index} ")).map(str::to_string))
            .ok_or(format!("no {prefix}line for point {index}"))
            .and_then(|text| serde_json::from_str(&text).map_err(|error| format!("{prefix}{text:?}: {error}")))
    };

    let mut measurements = Vec::new();
    for (index, run) in grid.iter().enumerate() {
        if let Some(name) = files_scenario {
            let sent = report("BENCH-FILES ", index)?;
            let mut measurement = sender_measurement(name, run, &sent);
            measurement.packets = sent["sent"].as_u64().unwrap_or(0);
            measurements.push(measurement);
        }
        if let Some(name) = ftss_scenario {
            let sent = report("BENCH-FTSS ", index)?;
            let mut measurement = sender_measurement(name, run, &sent);
            let count = sent["sent"].as_u64().unwrap_or(0);
            let receiver: &mut Proc = &mut receivers[index].1;
            receiver.tell(&count.to_string())?;
            let received = receiver.json_line(Duration::from_secs(180))?;
            receiver.finish(Duration::from_secs(5));
            let got = received["received"].as_u64().unwrap_or(0);
            measurement.packets = got;
            measurement.extra.push(("lost", json!(count.saturating_sub(got))));
            measurements.push(measurement);
        }
    }
    fabric.server.terminate(Duration::from_secs(5));
    Ok(measurements)
}

/// A measurement from a sender's report: its rate and its send-call latency.
fn sender_measurement(name: &'static str, run: &Run, sent: &Value) -> Measurement {
    let mut measurement = Measurement::new(name, run.payload, run.senders, true);
    let count = sent["sent"].as_u64().unwrap_or(0);
    let elapsed_us = sent["elapsed_us"].as_u64().unwrap_or(0);
    if count > 0 && elapsed_us > 0 {
        measurement.pps = Some(count as f64 / (elapsed_us as f64 / 1e6));
    }
    measurement.p50_us = sent["send_p50_us"].as_u64();
    measurement.p99_us = sent["send_p99_us"].as_u64();
    measurement.max_rss_kib = sent["max_rss_kib"].as_u64();
    measurement.extra.push(("sent", json!(count)));
    measurement.extra.push(("send_errors", sent["errors"].clone()));
    measurement.extra.push(("sender_cpu_us", sent["cpu_us"].clone()));
    measurement
}
