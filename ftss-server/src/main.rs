//! ftss-server: the store-and-forward routing agent that runs on the storage array.

mod dump;
mod gateway;
mod index;
mod queue;
mod server;
mod status;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::{Parser, Subcommand};

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
    Run {
        /// The FTSS volume as a local directory (the directory nodes mount over NFS/SMB).
        #[arg(long)]
        volume: PathBuf,
        /// A queue directory; repeat to keep one mirror per directory (put them on different disks).
        #[arg(long = "queue-dir", required = true)]
        queue_dirs: Vec<PathBuf>,
        /// How long to sleep when a cycle found nothing to do.
        #[arg(long, default_value = "20ms", value_parser = parse_duration)]
        poll: Duration,
        /// Deliver a packet again if it is not receipted within this time.
        #[arg(long, default_value = "5s", value_parser = parse_duration)]
        redeliver_after: Duration,
        /// Keep receipted packets this long (listable with `dump`); 0 deletes them on receipt.
        #[arg(long, default_value = "0s", value_parser = parse_duration)]
        retain: Duration,
        /// Hold packets for a destination no node has registered this long, then dead-letter them.
        #[arg(long, default_value = "24h", value_parser = parse_duration)]
        hold: Duration,
        /// Most queued payload bytes for one destination before its senders are pushed back.
        #[arg(long, default_value_t = 1 << 30)]
        destination_bytes_max: u64,
        /// The fabric's addresses (repeatable). Packets for unregistered addresses inside are held;
        /// packets for addresses outside go to the external network through the gateway.
        #[arg(long = "fabric", default_value = "10.77.0.0/16")]
        fabric: Vec<gateway::Cidr>,
        /// LISTEN=NODE:PORT (repeatable): datagrams arriving on the external UDP address LISTEN are
        /// stored and delivered to NODE's PORT; the node's replies leave from LISTEN.
        #[arg(long = "ingress")]
        ingress: Vec<gateway::IngressRule>,
    },
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
    /// Verify every queue segment in every mirror; truncate torn tails and repair bad mirrors.
    ///
    /// Run it while the server is stopped (the server does the same at every start).
    Scrub {
        #[arg(long = "queue-dir", required = true)]
        queue_dirs: Vec<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// List the packets in the queue (queued, retained after receipt, dead-lettered), like postcat.
    ///
    /// Read-only: safe while the server runs.
    Dump {
        #[arg(long = "queue-dir", required = true)]
        queue_dirs: Vec<PathBuf>,
        /// Which packets: queued, receipted, dead-lettered or all.
        #[arg(long, default_value = "all")]
        state: dump::StateFilter,
        /// Only packets sent by this node.
        #[arg(long)]
        origin: Option<String>,
        /// Also print each payload (escaped text).
        #[arg(long)]
        payload: bool,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
}

/// Parses durations such as `250ms`, `5s`, `10m`, `2h`, `7d`.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let digits = text.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let unit = &text[digits.len()..];
    let value: u64 = digits.parse().map_err(|_| format!("{text:?} is not a duration like 500ms, 5s, 10m, 2h, 7d"))?;
    let millis = match unit {
        "ms" => value,
        "s" | "" => value * 1000,
        "m" => value * 60_000,
        "h" => value * 3_600_000,
        "d" => value * 86_400_000,
        _ => return Err(format!("unknown unit {unit:?} in {text:?}: use ms, s, m, h or d")),
    };
    Ok(Duration::from_millis(millis))
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
        Command::Run {
            volume,
            queue_dirs,
            poll,
            redeliver_after,
            retain,
            hold,
            destination_bytes_max,
            fabric,
            ingress,
        } => run(server::Config {
            volume,
            queue_dirs,
            poll,
            redeliver_after,
            retain,
            hold,
            destination_bytes_max,
            fabric,
            ingress,
        }),
        Command::Status { volume, json } => status::show(&volume, json),
        Command::Scrub { queue_dirs, json } => scrub(&queue_dirs, json),
        Command::Dump { queue_dirs, state, origin, payload, json } => {
            dump::dump(&queue_dirs, state, origin.as_deref(), payload, json)
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

fn run(config: server::Config) -> Result<(), String> {
    install_stop_handlers();
    let mut server = server::Server::open(config).map_err(|error| error.to_string())?;
    let recovery = server.recovery();
    eprintln!(
        "ftss-server: started (pid {}); recovered {} records in {} segments, truncated {} torn bytes, repaired {} mirrors",
        std::process::id(),
        recovery.records,
        recovery.segments,
        recovery.torn_bytes_truncated,
        recovery.mirrors_repaired
    );
    server.run(|| STOP.load(Ordering::SeqCst));
    Ok(())
}

fn scrub(queue_dirs: &[PathBuf], json: bool) -> Result<(), String> {
    let report = queue::scrub(queue_dirs).map_err(|error| error.to_string())?;
    if json {
        println!("{}", serde_json::to_string(&report).expect("report serializes"));
    } else {
        println!(
            "scrubbed {} mirrors: {} segments, {} records verified, {} torn bytes truncated, {} mirror copies repaired",
            queue_dirs.len(),
            report.segments,
            report.records,
            report.torn_bytes_truncated,
            report.mirrors_repaired
        );
    }
    Ok(())
}
