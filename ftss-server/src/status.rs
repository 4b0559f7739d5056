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
        let backlog = volume.outbox(&node).scan(0, 0).map(|scan| scan.visible_total).unwrap_or(0);
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
    if let Some(lease) = crate::lease::read(&volume.server_dir().join("lease")) {
        let live = fsbridge::unix_now_us() / 1000 < lease.expires_unix_ms;
        status["lease"] = json!({ "holder": lease.holder, "epoch": lease.epoch, "expires_unix_ms": lease.expires_unix_ms, "live": live });
    }
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
    if status["lease"].is_object() {
        let lease = &status["lease"];
        let state = if lease["live"] == true { "active" } else { "lease expired" };
        println!(
            "ha: {} is {state} (lease epoch {})",
            lease["holder"].as_str().unwrap_or("?"),
            number(&lease["epoch"])
        );
    }
    if status["degraded"].as_bool().unwrap_or(false) {
        println!("DEGRADED: a queue mirror has failed; packets are kept on the healthy mirrors only");
    }
    if status["backpressure"]["active"].as_bool().unwrap_or(false) {
        for reason in status["backpressure"]["reasons"].as_array().into_iter().flatten() {
            println!("BACKPRESSURE: {}", reason.as_str().unwrap_or("?"));
        }
    }
    if let Some(error) = status["last_error"].as_str() {
        println!("last error: {error}");
    }
    println!("counters:");
    if let Some(counters) = status["counters"].as_object() {
        for (name, value) in counters {
            println!("  {name:<20} {}", number(value));
        }
    }
    let rates = &status["rates"];
    if rates.is_object() {
        println!(
            "rates (10 s): stored {:.0}/s, delivered {:.0}/s, receipted {:.0}/s",
            rates["stored_per_second"].as_f64().unwrap_or(0.0),
            rates["delivered_per_second"].as_f64().unwrap_or(0.0),
            rates["receipted_per_second"].as_f64().unwrap_or(0.0)
        );
    }
    let queue = &status["queue"];
    println!(
        "queue: {} packets ({} retained, {} for unknown destinations), {} segments, {} bytes",
        number(&queue["packets"]),
        number(&queue["retained"]),
        number(&queue["held_unknown_destination"]),
        number(&queue["segments"]),
        number(&queue["bytes"])
    );
    for mirror in queue["mirrors"].as_array().into_iter().flatten() {
        let health = if mirror["healthy"].as_bool().unwrap_or(false) { "healthy" } else { "FAILED" };
        let error = mirror["error"].as_str().map(|error| format!(" ({error})")).unwrap_or_default();
        println!("  mirror {} {health}{error}", mirror["dir"].as_str().unwrap_or("?"));
    }
    println!("quarantine: {} files", number(&status["quarantine_files"]));
    let gateway = &status["gateway"]["counters"];
    if gateway.is_object() {
        println!(
            "gateway: ingress received {} (unroutable {}), egress sent {} (send errors {}), {} NAT sockets",
            number(&gateway["ingress_received"]),
            number(&gateway["ingress_unroutable"]),
            number(&gateway["egress_sent"]),
            number(&gateway["egress_send_errors"]),
            number(&gateway["nat_sockets"])
        );
        for rule in status["gateway"]["ingress"].as_array().into_iter().flatten() {
            println!(
                "  ingress {} -> {}:{} received {}",
                rule["listen"].as_str().unwrap_or("?"),
                rule["node"].as_str().unwrap_or("?"),
                number(&rule["port"]),
                number(&rule["received"])
            );
        }
    }
    let fabric = &status["fabric"];
    if fabric.is_object() {
        let counters = &fabric["counters"];
        let listening: Vec<&str> =
            fabric["listening"].as_array().into_iter().flatten().filter_map(|endpoint| endpoint.as_str()).collect();
        println!(
            "fabric: listening on {}; packets received {}, delivered {}, receipts {}; refused {}, bad frames {}",
            listening.join(", "),
            number(&counters["packets_received"]),
            number(&counters["packets_delivered"]),
            number(&counters["receipts_received"]),
            number(&counters["refused"]),
            number(&counters["bad_frames"])
        );
        for connection in fabric["connections"].as_array().into_iter().flatten() {
            let ports: Vec<String> =
                connection["ports"].as_array().into_iter().flatten().map(|port| port.to_string()).collect();
            println!(
                "  node {} ({}) from {}, ports {}",
                connection["node"].as_str().unwrap_or("?"),
                connection["addr"].as_str().unwrap_or("?"),
                connection["peer"].as_str().unwrap_or("?"),
                if ports.is_empty() { "none".to_owned() } else { ports.join(",") }
            );
        }
    }
    for letter in status["dead_letters"].as_array().into_iter().flatten() {
        println!(
            "dead letter {} to {}: {}",
            letter["id"].as_str().unwrap_or("?"),
            letter["destination"].as_str().unwrap_or("?"),
            letter["reason"].as_str().unwrap_or("?")
        );
    }
    println!(
        "{:<20} {:<16} {:>10} {:>12} {:>12} {:>12}",
        "NODE", "ADDR", "QUEUED", "BYTES", "OLDEST MS", "OUTBOX FILES"
    );
    if let Some(nodes) = status["nodes"].as_object() {
        for (name, node) in nodes {
            println!(
                "{:<20} {:<16} {:>10} {:>12} {:>12} {:>12}",
                name,
                node["addr"].as_str().unwrap_or("-"),
                number(&node["queued"]),
                number(&node["queued_bytes"]),
                number(&node["oldest_age_ms"]),
                number(&node["outbox_files"])
            );
        }
    }
}
