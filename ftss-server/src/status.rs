//! `ftss-server status`: reads the status the server keeps on the volume and adds what can be seen
//! live (outbox backlog), so it also works while the server is down.

use std::path::Path;

use fsbridge::Volume;
use serde_json::{Value, json};

/// The server rewrites status.json every 250 ms; older than this means it is not running.
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
    status["running"] = json!(is_live(&status));
    let parts = partition_statuses(&volume);
    if parts.iter().any(|part| part["updated_unix_ms"].as_u64().unwrap_or(0) > updated) {
        status = merge_partitions(&volume, parts);
    }
    let (nodes, _invalid) = volume.list_nodes().map_err(|error| error.to_string())?;
    for node in nodes {
        let backlog = volume.outbox(&node).scan(0, 0).map(|scan| scan.visible_total).unwrap_or(0);
        let entry = &mut status["nodes"][node.as_str()];
        if entry.is_null() {
            *entry = json!({ "addr": volume.node_config(&node).ok().flatten().map(|config| config.addr.to_string()), "queued": 0 });
        }
        entry["outbox_files"] = json!(backlog);
        let log_dir = volume.outbox(&node).dir().join("log");
        let segments = fsbridge::spool::list_names(&log_dir, usize::MAX).map(|names| names.len()).unwrap_or(0);
        entry["outbox_log_segments"] = json!(segments);
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

/// Is the server that wrote `status` running (it says so, and it wrote it recently)?
fn is_live(status: &Value) -> bool {
    let updated = status["updated_unix_ms"].as_u64().unwrap_or(0);
    status["running"].as_bool().unwrap_or(false) && fsbridge::unix_now_us() / 1000 <= updated + STALE_AFTER_MS
}

/// The status files of a partitioned server (`status-p<K>.json`), in partition order.
fn partition_statuses(volume: &Volume) -> Vec<Value> {
    let names = fsbridge::spool::list_names(&volume.server_dir(), usize::MAX).unwrap_or_default();
    let mut parts: Vec<Value> = names
        .iter()
        .filter(|name| name.starts_with("status-p") && name.ends_with(".json"))
        .filter_map(|name| std::fs::read(volume.server_dir().join(name)).ok())
        .filter_map(|bytes| serde_json::from_slice::<Value>(&bytes).ok())
        .collect();
    parts.sort_by_key(|part| part["partition"]["index"].as_u64().unwrap_or(0));
    parts
}

/// Adds every number of `from` into the same key of `into` (one level deep).
fn add_numbers(into: &mut Value, from: &Value) {
    let Some(from) = from.as_object() else { return };
    for (key, value) in from {
        let sum = match (into[key.as_str()].as_f64(), value.as_f64()) {
            (Some(a), Some(b)) if value.is_u64() && into[key.as_str()].is_u64() => json!(a as u64 + b as u64),
            (Some(a), Some(b)) => json!(a + b),
            (None, Some(_)) => value.clone(),
            // Nested figures (a node's IP packets, refusals by reason) add up too.
            _ if value.is_object() => {
                if into[key.as_str()].is_null() {
                    into[key.as_str()] = json!({});
                }
                add_numbers(&mut into[key.as_str()], value);
                continue;
            }
            _ => continue,
        };
        into[key.as_str()] = sum;
    }
}

/// One status for the whole service from the partitions' statuses: counters, rates and queue
/// figures added up, per-node figures added (oldest age: the largest), flags of any partition, and
/// a `partitions` list saying which instance serves which partition. Running: every partition is.
fn merge_partitions(volume: &Volume, parts: Vec<Value>) -> Value {
    let mut merged = parts[0].clone();
    let mut all_live = true;
    let mut partitions = Vec::new();
    for (position, part) in parts.iter().enumerate() {
        let index = part["partition"]["index"].as_u64().unwrap_or(0);
        let lease = crate::lease::read(&crate::lease::partition_lease_path(volume.root(), index as u32));
        let live = is_live(part);
        all_live &= live;
        partitions.push(json!({
            "index": index,
            "running": live,
            "pid": part["pid"],
            "holder": lease.as_ref().map(|lease| lease.holder.clone()),
            "lease_epoch": lease.as_ref().map(|lease| lease.epoch),
            "stored": part["counters"]["stored"],
        }));
        if position == 0 {
            continue;
        }
        for section in ["counters", "rates", "queue"] {
            add_numbers(&mut merged[section], &part[section]);
        }
        let mirrors = part["queue"]["mirrors"].as_array().cloned().unwrap_or_default();
        if let Some(list) = merged["queue"]["mirrors"].as_array_mut() {
            list.extend(mirrors);
        }
        for (name, node) in part["nodes"].as_object().into_iter().flatten() {
            let entry = &mut merged["nodes"][name.as_str()];
            if entry.is_null() {
                *entry = node.clone();
                continue;
            }
            let oldest = entry["oldest_age_ms"].as_u64().max(node["oldest_age_ms"].as_u64());
            add_numbers(entry, node);
            entry["oldest_age_ms"] = json!(oldest);
        }
        merged["degraded"] = json!(merged["degraded"] == true || part["degraded"] == true);
        if part["backpressure"]["active"] == true {
            merged["backpressure"]["active"] = json!(true);
            let reasons = part["backpressure"]["reasons"].as_array().cloned().unwrap_or_default();
            if let Some(list) = merged["backpressure"]["reasons"].as_array_mut() {
                list.extend(reasons);
            }
        }
        let letters = part["dead_letters"].as_array().cloned().unwrap_or_default();
        if let Some(list) = merged["dead_letters"].as_array_mut() {
            list.extend(letters);
        }
        if merged["last_error"].is_null() {
            merged["last_error"] = part["last_error"].clone();
        }
    }
    merged["running"] = json!(all_live);
    merged["partitions"] = json!(partitions);
    merged
}

fn number(value: &Value) -> String {
    value.as_u64().map_or_else(|| "-".to_owned(), |number| number.to_string())
}

fn print_table(status: &Value) {
    print_state(status);
    print_counters(status);
    print_queue(status);
    print_gateway(status);
    print_fabric(status);
    print_dead_letters(status);
    print_nodes(status);
}

/// The server's state: running, lease, partitions, degraded, backpressure, last error.
fn print_state(status: &Value) {
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
    for partition in status["partitions"].as_array().into_iter().flatten() {
        let state = if partition["running"] == true { "served" } else { "NOT SERVED" };
        println!(
            "partition {} {state} by {} (lease epoch {}, pid {}), {} stored",
            number(&partition["index"]),
            partition["holder"].as_str().unwrap_or("nobody"),
            number(&partition["lease_epoch"]),
            number(&partition["pid"]),
            number(&partition["stored"])
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
}

/// Counters and rates.
fn print_counters(status: &Value) {
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
}

/// The queue, its mirrors, quarantine.
fn print_queue(status: &Value) {
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
}

fn print_gateway(status: &Value) {
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
}

fn print_fabric(status: &Value) {
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
}

fn print_dead_letters(status: &Value) {
    for letter in status["dead_letters"].as_array().into_iter().flatten() {
        println!(
            "dead letter {} to {}: {}",
            letter["id"].as_str().unwrap_or("?"),
            letter["destination"].as_str().unwrap_or("?"),
            letter["reason"].as_str().unwrap_or("?")
        );
    }
}

/// One line per node.
fn print_nodes(status: &Value) {
    println!(
        "{:<20} {:<16} {:>10} {:>12} {:>12} {:>12} {:>12} {:>22}",
        "NODE", "ADDR", "QUEUED", "BYTES", "OLDEST MS", "OUTBOX FILES", "LOG SEGMENTS", "IP SENT/DELIV/REFUSED"
    );
    if let Some(nodes) = status["nodes"].as_object() {
        for (name, node) in nodes {
            let ip = &node["ip"];
            let refused: u64 =
                ip["refused"].as_object().into_iter().flatten().filter_map(|(_, count)| count.as_u64()).sum();
            let ip = match ip.is_null() {
                true => "-".to_owned(),
                false => format!("{}/{}/{refused}", number(&ip["sent"]), number(&ip["delivered"])),
            };
            println!(
                "{:<20} {:<16} {:>10} {:>12} {:>12} {:>12} {:>12} {:>22}",
                name,
                node["addr"].as_str().unwrap_or("-"),
                number(&node["queued"]),
                number(&node["queued_bytes"]),
                number(&node["oldest_age_ms"]),
                number(&node["outbox_files"]),
                number(&node["outbox_log_segments"]),
                ip
            );
            for (reason, count) in node["ip"]["refused"].as_object().into_iter().flatten() {
                println!("    IP packets refused: {} {reason}", number(count));
            }
        }
    }
}
