//! `ftss-server status`: reads the status the server keeps on the volume and adds what can be seen
//! live (outbox backlog), so it also works while the server is down.

use std::path::Path;

use fsbridge::Volume;
use serde_json::{Value, json};

/// The server rewrites status.json every second; older than this means it is not running.
const STALE_AFTER_MS: u64 = 5000;

pub fn show(volume_dir: &Path, as_json: bool) -> Result<(), String> {
    let volume = Volume::new(volume_dir);
    if !volume.nodes_dir().is_dir() {
        return Err(format!("{} is not an FTSS volume (no nodes/ directory)", volume_dir.display()));
    }
    let mut status = match std::fs::read(volume.status_path()) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes).map_err(|error| format!("{}: {error}", volume.status_path().display()))?
        }
        Err(_) => json!({ "running": false, "counters": {}, "queue": {}, "nodes": {} }),
    };
    let updated = status["updated_unix_ms"].as_u64().unwrap_or(0);
    let fresh = fsbridge::unix_now_us() / 1000 <= updated + STALE_AFTER_MS;
    status["running"] = json!(status["running"].as_bool().unwrap_or(false) && fresh);
    let (nodes, _invalid) = volume.list_nodes().map_err(|error| error.to_string())?;
    for node in nodes {
        let backlog = volume.outbox(&node).list(usize::MAX).map(|names| names.len()).unwrap_or(0);
        let entry = &mut status["nodes"][node.as_str()];
        if entry.is_null() {
            *entry = json!({ "addr": volume.node_config(&node).ok().flatten().map(|config| config.addr.to_string()), "queued": 0 });
        }
        entry["outbox_files"] = json!(backlog);
    }
    let quarantined = fsbridge::spool::list_names(&volume.quarantine_dir(), usize::MAX)
        .map(|names| names.iter().filter(|name| !name.ends_with(fsbridge::layout::QUARANTINE_REASON_SUFFIX)).count())
        .unwrap_or(0);
    status["quarantine_files"] = json!(quarantined);
    if as_json {
        println!("{status}");
    } else {
        print_table(&status);
    }
    Ok(())
}

fn number(value: &Value) -> String {
    value.as_u64().map_or_else(|| "-".to_owned(), |number| number.to_string())
}

fn print_table(status: &Value) {
    let running = if status["running"].as_bool().unwrap_or(false) { "running" } else { "not running" };
    println!("ftss-server: {running} (pid {})", number(&status["pid"]));
    println!("counters:");
    if let Some(counters) = status["counters"].as_object() {
        for (name, value) in counters {
            println!("  {name:<14} {}", number(value));
        }
    }
    let queue = &status["queue"];
    println!(
        "queue: {} packets ({} for unknown destinations), {} segments, {} bytes",
        number(&queue["packets"]),
        number(&queue["held_unknown_destination"]),
        number(&queue["segments"]),
        number(&queue["bytes"])
    );
    println!("quarantine: {} files", number(&status["quarantine_files"]));
    println!("{:<20} {:<16} {:>10} {:>12}", "NODE", "ADDR", "QUEUED", "OUTBOX FILES");
    if let Some(nodes) = status["nodes"].as_object() {
        for (name, node) in nodes {
            println!(
                "{:<20} {:<16} {:>10} {:>12}",
                name,
                node["addr"].as_str().unwrap_or("-"),
                number(&node["queued"]),
                number(&node["outbox_files"])
            );
        }
    }
}
