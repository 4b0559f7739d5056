//! ftss-server: the store-and-forward routing agent that runs on the storage array.

mod queue;
mod server;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::{Parser, Subcommand};

/// Guaranteed delivery for UDP apps through a shared fault-tolerant volume.
#[derive(Parser)]
#[command(name = "ftss-server", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Drain every node's outbox into the durable queue, ack, deliver, take receipts.
    ///
    /// Runs until SIGTERM or SIGINT. A packet is acknowledged to its source only after it is
    /// fdatasync'd on every --queue-dir (mirror); it is deleted after the destination receipts it.
    Run {
        /// The mounted FTSS volume (the directory nodes mount over NFS/SMB).
        #[arg(long)]
        volume: PathBuf,
        /// A queue directory; repeat to keep one mirror per directory (put them on different disks).
        #[arg(long = "queue-dir", required = true)]
        queue_dirs: Vec<PathBuf>,
        /// How long to sleep when a cycle found nothing to do (e.g. 20ms).
        #[arg(long, default_value = "20ms", value_parser = parse_duration)]
        poll: Duration,
        /// Deliver a packet again if it is not receipted within this time.
        #[arg(long, default_value = "5s", value_parser = parse_duration)]
        redeliver_after: Duration,
    },
    /// Show the server's counters and per-node queue depth (read from the volume).
    Status {
        #[arg(long)]
        volume: PathBuf,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Verify every queue segment in every mirror; truncate torn tails and repair bad mirrors.
    ///
    /// Run it while the server is stopped.
    Scrub {
        #[arg(long = "queue-dir", required = true)]
        queue_dirs: Vec<PathBuf>,
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
        Command::Run { volume, queue_dirs, poll, redeliver_after } => {
            run(server::Config { volume, queue_dirs, poll, redeliver_after })
        }
        Command::Status { volume, json } => status::show(&volume, json),
        Command::Scrub { queue_dirs, json } => scrub(&queue_dirs, json),
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
    server.run(|| STOP.load(Ordering::SeqCst)).map_err(|error| error.to_string())
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

mod status;
