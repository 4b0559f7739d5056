//! ftss-server: the store-and-forward routing agent that runs on the storage array.

// The I/O ban of `clippy.toml` is for `core` alone.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::{Parser, Subcommand};
use ftss_server::{config, dump, lease, metrics, queue, scaleout, server, single, status};

/// Guaranteed delivery for UDP apps through a shared fault-tolerant volume.
///
/// Nodes run their unmodified UDP apps under libftss_shim.so with the FTSS volume mounted; this
/// server drains every node's outbox into durable mirrored queues, acknowledges the source,
/// delivers into the destination's inbox and deletes (or retains) each packet once the destination
/// receipts it.
#[derive(Parser)]
#[command(name = "ftss-server", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Drain every node's outbox into the durable queue, ack, deliver, take receipts.
    ///
    /// Runs until SIGTERM or SIGINT. A packet is acknowledged to its source only after it is
    /// fdatasync'd on every healthy --queue-dir (mirror); it leaves the queue after the destination
    /// receipts it. A full queue disk or a destination over its byte limit stops draining the
    /// affected outboxes until there is room (backpressure); a failed mirror is dropped and the
    /// server runs degraded on the others until the directory is usable again, then resyncs it.
    Run(Box<config::FlagSettings>),
    /// Show the server's counters, per-node queue depth, mirror health and backpressure.
    ///
    /// Reads what the server keeps on the volume (server/status.json, rewritten 4 times a second)
    /// and adds the live outbox backlog, so it also works while the server is down.
    Status {
        #[arg(long)]
        volume: PathBuf,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Prepare a volume: its top-level directories and the `ftss-volume` marker.
    ///
    /// Run it on the array before nodes start (`run` does it too). A node's shim refuses a volume
    /// path without the marker, so an unmounted mountpoint is never filled instead.
    Init {
        #[arg(long)]
        volume: PathBuf,
    },
    /// Check that a volume is safe to use from here: its marker is there and it is not mounted in a
    /// way that loses acknowledged writes (`soft` NFS, SMB `nostrictsync`).
    ///
    /// Run it on each node against its mountpoint; the shim makes the same checks at start and
    /// refuses to carry traffic (fails closed) when one fails. Exits non-zero with the reasons.
    Check {
        #[arg(long)]
        volume: PathBuf,
    },
    /// Verify every queue segment in every mirror; truncate torn tails and repair bad mirrors.
    ///
    /// Run it while the server is stopped (the server does the same at every start).
    Scrub {
        #[arg(long = "queue-dir", required = true)]
        queue_dirs: Vec<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Make a fabric key for a node: writes KEYS/NODE.key (mode 600) and prints its path.
    ///
    /// Copy the file to the node (FTSS_FABRIC_KEY=/path/to/NODE.key); the server reads the keys
    /// directory at every connection, so no restart is needed. Refuses to replace an existing key
    /// unless --force is given.
    FabricKey {
        /// The keys directory (the server's --fabric-keys; default VOLUME/server/fabric-keys).
        #[arg(long)]
        keys: Option<PathBuf>,
        /// The volume, to find the default keys directory.
        #[arg(long)]
        volume: Option<PathBuf>,
        #[arg(long)]
        node: String,
        /// Replace an existing key (the node must get the new one).
        #[arg(long)]
        force: bool,
    },
    /// List the packets in the queue (queued, retained after receipt, dead-lettered), like postcat.
    ///
    /// Read-only: safe while the server runs.
    Dump {
        #[arg(long = "queue-dir", required = true)]
        queue_dirs: Vec<PathBuf>,
        /// Which packets: queued, receipted, dead-lettered, sent or all.
        #[arg(long, default_value = "all")]
        state: dump::StateFilter,
        /// Only packets from this node (or to it, when --volume is given to look up its address).
        #[arg(long)]
        node: Option<String>,
        /// The volume, to resolve --node to its registered address.
        #[arg(long)]
        volume: Option<PathBuf>,
        /// Only packets sent within this long before now (e.g. 10m, 2h).
        #[arg(long, value_parser = config::parse_duration)]
        since: Option<Duration>,
        /// Also print each payload (escaped text).
        #[arg(long)]
        payload: bool,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
        /// Write the packets to this pcap file (IPv4/UDP frames with the fabric addresses and ports
        /// and the original timestamps) instead of printing them; read it with Wireshark or tshark.
        #[arg(long)]
        pcap: Option<PathBuf>,
    },
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop_signal(_signal: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn install_stop_handlers() {
    for signal in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(signal, on_stop_signal as *const () as libc::sighandler_t) };
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(flags) => config::resolve(*flags).and_then(run),
        Command::Status { volume, json } => status::show(&volume, json),
        Command::Init { volume } => fsbridge::Volume::new(&volume)
            .create()
            .map(|()| println!("{} is an FTSS volume", volume.display()))
            .map_err(|error| error.to_string()),
        Command::Check { volume } => match fsbridge::mounts::check_volume(&volume) {
            Ok(()) => {
                println!("{}: ok", volume.display());
                Ok(())
            }
            Err(problems) => Err(problems.join("\n")),
        },
        Command::Scrub { queue_dirs, json } => scrub(&queue_dirs, json),
        Command::FabricKey { keys, volume, node, force } => fabric_key(keys, volume, &node, force),
        Command::Dump { queue_dirs, state, node, volume, since, payload, json, pcap } => {
            let since_unix_us = since.map(|ago| fsbridge::unix_now_us().saturating_sub(ago.as_micros() as u64));
            let options = dump::DumpOptions { state, node, volume, since_unix_us, payload, json, pcap };
            dump::dump(&queue_dirs, &options)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("ftss-server: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run(settings: config::RunSettings) -> Result<(), String> {
    install_stop_handlers();
    let config::RunSettings { config, metrics, ha } = settings;
    if let Some(ha) = ha.clone().filter(|ha| ha.partitions > 1) {
        return scaleout::run(config, ha, &STOP);
    }
    // Without --ha this is the only server of its queue directories and its volume: a second one
    // is refused, naming this one (the locks live as long as `_single_locks`).
    let (lease, _single_locks) = match &ha {
        Some(ha) => match become_active(&config, ha)? {
            Some(lease) => (lease, Vec::new()),
            None => return Ok(()),
        },
        None => {
            let single::Guard { locks, lease } = single::claim(&config.volume, &config.queue_dirs)?;
            (lease, locks)
        }
    };
    let lease = std::rc::Rc::new(std::cell::RefCell::new(lease));
    // Recovering a large queue can outlast a term: the lease is renewed meanwhile.
    let opened = lease.borrow_mut().renew_during("starting", || server::Server::open(config));
    let mut server = opened.map_err(|error| error.to_string())?;
    if ha.is_some() {
        let lease_now = lease.borrow();
        if !lease_now.still_acting() {
            return Err("lost the lease while starting (another instance is active): stopped".into());
        }
        server.take_over(lease_now.holder(), lease_now.epoch()).map_err(|error| error.to_string())?;
        drop(lease_now);
        let gate = lease.clone();
        server.set_gate(move || gate.borrow().still_acting());
    }
    if let Some(addr) = metrics {
        let snapshot = metrics::Snapshot::default();
        metrics::serve(addr, snapshot.clone()).map_err(|error| format!("metrics on {addr}: {error}"))?;
        server.export_metrics(snapshot);
    }
    let recovery = server.recovery();
    eprintln!(
        "ftss-server: started (pid {}); recovered {} records in {} segments, truncated {} torn bytes, repaired {} \
         mirrors, skipped {} damaged records ({} bytes), {} mirrors failed",
        std::process::id(),
        recovery.records,
        recovery.segments,
        recovery.torn_bytes_truncated,
        recovery.mirrors_repaired,
        recovery.damaged_records,
        recovery.damaged_bytes,
        recovery.mirrors_failed
    );
    let deposed = std::cell::Cell::new(false);
    server.run(|| {
        if STOP.load(Ordering::SeqCst) {
            return true;
        }
        let kept = if ha.is_some() {
            lease.borrow_mut().keep("active instance")
        } else {
            lease.borrow_mut().keep_unless_taken("server")
        };
        if !kept {
            deposed.set(true);
        }
        deposed.get()
    });
    if deposed.get() || server.deposed() {
        return Err("lost the lease (another instance is active, or the volume is unreachable): stopped".into());
    }
    Ok(())
}

/// Waits as a standby until this instance holds the lease. `None` if stopped while waiting.
fn become_active(config: &server::Config, ha: &config::HaSettings) -> Result<Option<lease::Lease>, String> {
    let mut lease = lease::Lease::new(&config.volume, ha.instance.clone(), ha.lease_term);
    eprintln!("ftss-server: instance {} is standby", ha.instance);
    loop {
        if STOP.load(Ordering::SeqCst) {
            return Ok(None);
        }
        match lease.try_acquire() {
            Ok(true) => {
                eprintln!("ftss-server: instance {} is active (lease epoch {})", ha.instance, lease.epoch());
                return Ok(Some(lease));
            }
            Ok(false) => {}
            Err(error) => eprintln!("ftss-server: cannot take the lease: {error}"),
        }
        std::thread::sleep(ha.lease_term / 10);
    }
}

fn fabric_key(keys: Option<PathBuf>, volume: Option<PathBuf>, node: &str, force: bool) -> Result<(), String> {
    let node = fsbridge::NodeName::new(node).map_err(|error| error.to_string())?;
    let dir = match (keys, volume) {
        (Some(keys), _) => keys,
        (None, Some(volume)) => volume.join("server").join("fabric-keys"),
        (None, None) => return Err("give --keys DIR or --volume DIR".into()),
    };
    std::fs::create_dir_all(&dir).map_err(|error| format!("{}: {error}", dir.display()))?;
    let path = dir.join(format!("{node}.key"));
    if path.exists() && !force {
        return Err(format!("{} exists (use --force to replace it)", path.display()));
    }
    let tmp = dir.join(format!(".{node}.key.{}", std::process::id()));
    let written = {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .and_then(|mut file| file.write_all(fsbridge::fabric::generate_key_text().as_bytes()).and(file.sync_all()))
            .and_then(|()| std::fs::rename(&tmp, &path))
    };
    written.map_err(|error| format!("{}: {error}", path.display()))?;
    println!("{}", path.display());
    Ok(())
}

fn scrub(queue_dirs: &[PathBuf], json: bool) -> Result<(), String> {
    // Scrubbing truncates torn tails: never under a running server's appends.
    let _locks = single::lock_queue_dirs(queue_dirs, &single::Identity::this_process())?;
    let report = queue::scrub(queue_dirs).map_err(|error| error.to_string())?;
    if json {
        println!("{}", serde_json::to_string(&report).expect("report serializes"));
    } else {
        println!(
            "scrubbed {} mirrors: {} segments, {} records verified, {} torn bytes truncated, {} mirror copies \
             repaired, {} damaged records skipped ({} bytes, kept in {}/), {} mirrors failed",
            queue_dirs.len(),
            report.segments,
            report.records,
            report.torn_bytes_truncated,
            report.mirrors_repaired,
            report.damaged_records,
            report.damaged_bytes,
            queue::DAMAGED_DIR,
            report.mirrors_failed
        );
    }
    Ok(())
}
