//! `ftss-server dump`: what is in the queue, packet by packet (Postfix's postcat for ftss).

use std::collections::HashMap;
use std::path::PathBuf;

use fsbridge::{Packet, PacketId};
use serde_json::json;

use crate::queue::{self, Outcome, QueueRecord};

/// Which packets `dump` lists.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum StateFilter {
    Queued,
    Receipted,
    DeadLettered,
    Sent,
    All,
}

struct Item {
    stored_unix_us: u64,
    packet: Packet,
    done: Option<(Outcome, u64, String)>,
}

/// What `dump` selects and how it prints.
pub struct DumpOptions {
    pub state: StateFilter,
    /// Packets from this node, or to its registered address when the volume is known.
    pub node: Option<String>,
    /// The volume, to resolve `node` to its address.
    pub volume: Option<PathBuf>,
    /// Only packets sent at or after this time (µs since the Unix epoch).
    pub since_unix_us: Option<u64>,
    pub payload: bool,
    pub json: bool,
    /// Write a pcap file instead of printing.
    pub pcap: Option<PathBuf>,
}

pub fn dump(dirs: &[PathBuf], options: &DumpOptions) -> Result<(), String> {
    let progress = crate::progress::Progress::new("reading the queue");
    let records = queue::read_only_scan(dirs).map_err(|error| error.to_string())?;
    progress.done();
    let node_addr = match (&options.node, &options.volume) {
        (Some(node), Some(volume)) => {
            let name = fsbridge::NodeName::new(node).map_err(|error| error.to_string())?;
            fsbridge::Volume::new(volume).node_config(&name)?.map(|config| config.addr)
        }
        _ => None,
    };
    let mut order: Vec<PacketId> = Vec::new();
    let mut items: HashMap<PacketId, Item> = HashMap::new();
    for recovered in records {
        match recovered.record {
            QueueRecord::Stored { stored_unix_us, packet } => {
                if !items.contains_key(&packet.id) {
                    order.push(packet.id.clone());
                    items.insert(packet.id.clone(), Item { stored_unix_us, packet, done: None });
                }
            }
            QueueRecord::Done { id, outcome, at_unix_us, reason } => {
                if let Some(item) = items.get_mut(&id) {
                    item.done = Some((outcome, at_unix_us, reason));
                }
            }
            // Read positions in outbox logs and filler over damage, not packets.
            QueueRecord::Cursor { .. } | QueueRecord::Skipped { .. } => {}
        }
    }
    let mut pcap = match &options.pcap {
        Some(path) => {
            let file = std::fs::File::create(path).map_err(|error| format!("{}: {error}", path.display()))?;
            Some(fsbridge::pcap::PcapWriter::new(std::io::BufWriter::new(file)).map_err(|error| error.to_string())?)
        }
        None => None,
    };
    let mut shown = 0;
    for id in order {
        let item = &items[&id];
        let state = match &item.done {
            None => StateFilter::Queued,
            Some((Outcome::Receipted, ..)) => StateFilter::Receipted,
            Some((Outcome::DeadLettered, ..)) => StateFilter::DeadLettered,
            Some((Outcome::Sent, ..)) => StateFilter::Sent,
        };
        let node_matches = options.node.as_deref().is_none_or(|node| {
            node == id.origin.as_str() || node_addr.is_some_and(|addr| addr == *item.packet.destination.ip())
        });
        let recent = options.since_unix_us.is_none_or(|since| item.packet.sent_unix_us >= since);
        if (options.state != StateFilter::All && options.state != state) || !node_matches || !recent {
            continue;
        }
        shown += 1;
        match &mut pcap {
            Some(writer) => {
                let packet = &item.packet;
                writer
                    .write_datagram(packet.sent_unix_us, packet.source, packet.destination, &packet.payload)
                    .map_err(|error| error.to_string())?;
            }
            None => print_item(item, state, options.payload, options.json),
        }
    }
    match (pcap, &options.pcap) {
        (Some(mut writer), Some(path)) => {
            writer.flush().map_err(|error| format!("{}: {error}", path.display()))?;
            eprintln!("wrote {shown} packets to {}", path.display());
        }
        _ if !options.json => println!("{shown} packets"),
        _ => {}
    }
    Ok(())
}

fn state_name(state: StateFilter) -> &'static str {
    match state {
        StateFilter::Queued => "queued",
        StateFilter::Receipted => "receipted",
        StateFilter::DeadLettered => "dead-lettered",
        StateFilter::Sent => "sent",
        StateFilter::All => "all",
    }
}

fn print_item(item: &Item, state: StateFilter, payload: bool, as_json: bool) {
    let packet = &item.packet;
    let id = format!("{}/{:016x}/{}", packet.id.origin, packet.id.epoch, packet.id.seq);
    let (done_at, reason) = match &item.done {
        Some((_, at, reason)) => (Some(rfc3339(*at)), reason.as_str()),
        None => (None, ""),
    };
    let text = String::from_utf8_lossy(&packet.payload).escape_debug().to_string();
    if as_json {
        let mut object = json!({
            "id": id,
            "state": state_name(state),
            "source": packet.source.to_string(),
            "destination": packet.destination.to_string(),
            "sent": rfc3339(packet.sent_unix_us),
            "stored": rfc3339(item.stored_unix_us),
            "done": done_at,
            "reason": reason,
            "bytes": packet.payload.len(),
        });
        if payload {
            object["payload"] = json!(text);
        }
        println!("{object}");
        return;
    }
    println!(
        "{id} {} {} -> {} sent {} stored {} bytes {}{}{}",
        state_name(state),
        packet.source,
        packet.destination,
        rfc3339(packet.sent_unix_us),
        rfc3339(item.stored_unix_us),
        packet.payload.len(),
        done_at.map(|at| format!(" done {at}")).unwrap_or_default(),
        if reason.is_empty() { String::new() } else { format!(" reason {reason:?}") },
    );
    if payload {
        println!("  payload \"{text}\"");
    }
}

/// Microseconds since the Unix epoch as RFC 3339 UTC, e.g. 2026-11-25T12:00:00.123456Z.
pub fn rfc3339(unix_us: u64) -> String {
    let seconds = unix_us / 1_000_000;
    let (days, second_of_day) = (seconds / 86_400, seconds % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 { month_index + 3 } else { month_index - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        second_of_day / 3600,
        second_of_day % 3600 / 60,
        second_of_day % 60,
        unix_us % 1_000_000
    )
}

#[cfg(test)]
mod tests {
    use super::rfc3339;

    #[test]
    fn dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(rfc3339(951_782_400_000_001), "2000-02-29T00:00:00.000001Z");
        assert_eq!(rfc3339(1_795_609_719_651_000), "2026-11-25T12:28:39.651000Z");
    }
}
