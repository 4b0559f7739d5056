//! `server-rss`: ftss-server's resident set with many packets queued for a receiver that is not
//! there (no node has the destination address, so every packet stays queued), against its idle RSS.
//!
//! The packets are written straight into node a's outbox as batch files (fsbridge's format and
//! publish, as the shim writes them): the subject is the server's memory, not the sender.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::process::Command;
use std::time::{Duration, Instant};

use fsbridge::format::BatchEncoder;
use fsbridge::layout::batch_file_name;
use fsbridge::{BatchHeader, BatchKind, NodeConfig, NodeName, Packet, PacketId, Record, Volume};
use serde_json::json;

use crate::procs::{Proc, cpu_ticks, proc_status_kib};
use crate::report::Measurement;
use crate::{Bench, Run};

/// Packets per outbox batch file.
const PACKETS_PER_FILE: u64 = 4096;
/// Nobody has this fabric address.
const ABSENT_RECEIVER: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 77, 0, 99), 9);
const SENDER: (&str, Ipv4Addr) = ("a", Ipv4Addr::new(10, 77, 0, 1));
/// How long the server may take to store everything.
const STORE_LIMIT: Duration = Duration::from_secs(600);
/// How long the server is left alone before its idle RSS is read.
const SETTLE: Duration = Duration::from_millis(500);
/// Window over which the CPU the server burns while holding the backlog (and nothing arrives) is measured.
const CPU_WINDOW: Duration = Duration::from_secs(2);

fn queued(volume: &Volume) -> u64 {
    std::fs::read(volume.status_path())
        .ok()
        .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
        .and_then(|status| status["queue"]["packets"].as_u64())
        .unwrap_or(0)
}

pub fn server_rss(bench: &Bench, run: &Run, packets: u64) -> Result<Measurement, String> {
    let dir = bench.run_dir("server-rss")?;
    let volume = Volume::new(dir.0.join("volume"));
    volume.create().map_err(|error| error.to_string())?;
    let node = NodeName::new(SENDER.0).expect("valid node name");
    volume.register_node(&node, &NodeConfig { addr: SENDER.1 }).map_err(|error| error.to_string())?;
    let mut command = Command::new(&bench.server_bin);
    command
        .arg("run")
        .arg("--volume")
        .arg(volume.root())
        .arg("--queue-dir")
        .arg(dir.0.join("queue"))
        .args(["--poll", "10ms"]);
    let mut server = Proc::start("ftss-server", command, &dir.0.join("server.log"))?;
    std::thread::sleep(SETTLE);
    let idle_rss = proc_status_kib(server.pid(), "VmRSS").ok_or("cannot read the server's RSS")?;

    let started = Instant::now();
    let outbox = volume.outbox(&node);
    let epoch = fsbridge::random_u64();
    let payload = vec![0x42_u8; run.payload];
    let mut seq = 0u64;
    let mut batch_seq = 0u64;
    while seq < packets {
        batch_seq += 1;
        let header = BatchHeader { kind: BatchKind::Packets, node: node.clone(), epoch, batch_seq, flags: 0 };
        let mut encoder = BatchEncoder::new(&header);
        for _ in 0..PACKETS_PER_FILE.min(packets - seq) {
            seq += 1;
            encoder.push(&Record::Packet(Packet {
                id: PacketId { origin: node.clone(), epoch, seq },
                source: SocketAddrV4::new(SENDER.1, 5000),
                destination: ABSENT_RECEIVER,
                sent_unix_us: fsbridge::unix_now_us(),
                payload: payload.clone(),
            }));
        }
        outbox
            .publish(&batch_file_name(epoch, batch_seq, "pkt"), &encoder.finish())
            .map_err(|error| error.to_string())?;
    }
    let written = started.elapsed();
    while queued(&volume) < packets {
        if started.elapsed() > STORE_LIMIT {
            return Err(format!("the server stored only {} of {packets} packets in {STORE_LIMIT:?}", queued(&volume)));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let stored = started.elapsed();
    std::thread::sleep(SETTLE);
    let ticks_before = cpu_ticks(server.pid());
    std::thread::sleep(CPU_WINDOW);
    let ticks_after = cpu_ticks(server.pid());
    // SAFETY: sysconf has no preconditions.
    let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let busy_percent = match (ticks_before, ticks_after) {
        (Some(before), Some(after)) => {
            Some(((after - before) as f64 / ticks_per_second / CPU_WINDOW.as_secs_f64() * 1000.0).round() / 10.0)
        }
        _ => None,
    };
    let queued_rss = proc_status_kib(server.pid(), "VmRSS").ok_or("cannot read the server's RSS")?;
    let peak_rss = proc_status_kib(server.pid(), "VmHWM");
    server.terminate(Duration::from_secs(10));

    let mut measurement = Measurement::new("server-rss", run.payload, 1, true);
    measurement.packets = packets;
    // How fast the server drained and stored the backlog (status.json lags by up to 250 ms).
    measurement.pps = Some(packets as f64 / stored.as_secs_f64());
    measurement.max_rss_kib = peak_rss;
    measurement.extra.push(("idle_rss_kib", json!(idle_rss)));
    measurement.extra.push(("queued_rss_kib", json!(queued_rss)));
    measurement.extra.push(("rss_above_idle_kib", json!(queued_rss.saturating_sub(idle_rss))));
    measurement.extra.push(("bytes_per_queued_packet", json!((queued_rss.saturating_sub(idle_rss) * 1024) / packets)));
    measurement.extra.push(("outbox_write_ms", json!(written.as_millis() as u64)));
    // CPU the server uses per second while it only holds the backlog: 0 would be ideal.
    measurement.extra.push(("holding_cpu_percent", json!(busy_percent)));
    Ok(measurement)
}
