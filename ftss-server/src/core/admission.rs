//! Admission of drained packets against the queue's bounds: per destination and in total, in
//! packets and in stored bytes (payload plus the record around it, so that empty datagrams count
//! too). No I/O: the server says what the queue holds, this says whether a batch may be taken.
//!
//! A batch is taken while every destination it names, and the queue as a whole, is under its
//! limits, so a limit is exceeded by at most one batch (refusing a batch larger than the limit
//! would hold its writer back forever). A refused batch stays first in its writer's line: files
//! and frames of one writer are taken in order.

use fsbridge::hash::HashMap;
use std::net::Ipv4Addr;

use fsbridge::Packet;

/// Bytes a stored packet costs beyond its payload: record framing, id, addresses and times (a
/// stored record with an empty payload is 55–70 bytes, by origin name length).
pub const RECORD_OVERHEAD_BYTES: u64 = 64;

/// The bounds of the queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub destination_packets: u64,
    pub destination_bytes: u64,
    pub total_packets: u64,
    pub total_bytes: u64,
}

/// Packets and their stored bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Load {
    pub packets: u64,
    pub bytes: u64,
}

impl Load {
    /// What `packets` payload bytes in `packets` packets cost when stored.
    pub fn stored(packets: u64, payload_bytes: u64) -> Load {
        Load { packets, bytes: payload_bytes + packets * RECORD_OVERHEAD_BYTES }
    }

    fn add(&mut self, other: Load) {
        self.packets += other.packets;
        self.bytes += other.bytes;
    }

    fn plus(self, other: Load) -> Load {
        Load { packets: self.packets + other.packets, bytes: self.bytes + other.bytes }
    }
}

/// What one drain cycle has taken so far, against the cycle's own caps and the queue's limits.
pub struct Budget {
    limits: Limits,
    cycle_packets_max: usize,
    cycle_bytes_max: usize,
    /// Taken this cycle: packets and payload bytes (for the cycle caps).
    pub packets: usize,
    pub bytes: usize,
    /// Taken this cycle, per destination and in all (stored bytes), not yet in the queue.
    accepted: HashMap<Ipv4Addr, Load>,
    total: Load,
    closed: Option<String>,
}

impl Budget {
    pub fn new(limits: Limits, cycle_packets_max: usize, cycle_bytes_max: usize) -> Budget {
        Budget {
            limits,
            cycle_packets_max,
            cycle_bytes_max,
            packets: 0,
            bytes: 0,
            accepted: HashMap::default(),
            total: Load::default(),
            closed: None,
        }
    }

    /// Has this cycle taken all it may?
    pub fn cycle_full(&self) -> bool {
        self.packets >= self.cycle_packets_max || self.bytes >= self.cycle_bytes_max
    }

    /// Payload bytes this cycle may still take.
    pub fn cycle_bytes_left(&self) -> usize {
        self.cycle_bytes_max.saturating_sub(self.bytes)
    }

    /// Nothing more is taken this cycle, for `reason` (the queue disk is down to its reserve).
    pub fn close(&mut self, reason: String) {
        self.closed = Some(reason);
    }

    pub fn is_closed(&self) -> bool {
        self.closed.is_some()
    }

    /// Why `packets` may not be taken now, if so. `queued` is what the queue holds for a
    /// destination, `queued_total` what it holds in all.
    pub fn refuse(&self, packets: &[Packet], queued: impl Fn(&Ipv4Addr) -> Load, queued_total: Load) -> Option<String> {
        if let Some(reason) = &self.closed {
            return Some(reason.clone());
        }
        let total = queued_total.plus(self.total);
        if total.packets >= self.limits.total_packets {
            return Some(format!("the queue holds {} packets, its limit", total.packets));
        }
        if total.bytes >= self.limits.total_bytes {
            return Some(format!("the queue holds {} bytes, its limit", total.bytes));
        }
        let mut checked: Vec<&Ipv4Addr> = Vec::new();
        for packet in packets {
            let ip = packet.destination.ip();
            if checked.contains(&ip) {
                continue;
            }
            checked.push(ip);
            let load = queued(ip).plus(self.accepted.get(ip).copied().unwrap_or_default());
            if load.packets >= self.limits.destination_packets || load.bytes >= self.limits.destination_bytes {
                return Some(format!(
                    "queue for {ip} is over its limit ({} packets, {} bytes)",
                    load.packets, load.bytes
                ));
            }
        }
        None
    }

    /// Counts `packets` as taken.
    pub fn take(&mut self, packets: &[Packet]) {
        for packet in packets {
            let load = Load::stored(1, packet.payload.len() as u64);
            self.accepted.entry(*packet.destination.ip()).or_default().add(load);
            self.total.add(load);
            self.bytes += packet.payload.len();
        }
        self.packets += packets.len();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fsbridge::{NodeName, PacketId};

    fn packet(seq: u64, destination: &str, payload: usize) -> Packet {
        Packet {
            id: PacketId { origin: NodeName::new("a").unwrap(), epoch: 1, seq },
            source: "10.77.0.1:1".parse().unwrap(),
            destination: destination.parse().unwrap(),
            sent_unix_us: 0,
            payload: vec![0; payload],
        }
    }

    const LIMITS: Limits =
        Limits { destination_packets: 100, destination_bytes: 100_000, total_packets: 150, total_bytes: 1_000_000 };

    #[test]
    fn empty_datagrams_count_against_the_bounds() {
        let mut budget = Budget::new(Limits { destination_bytes: 640, ..LIMITS }, 1000, 1 << 20);
        let nothing = |_: &Ipv4Addr| Load::default();
        let mut taken = 0;
        for seq in 0..50 {
            let batch = [packet(seq, "10.77.0.2:9", 0)];
            if budget.refuse(&batch, nothing, Load::default()).is_some() {
                break;
            }
            budget.take(&batch);
            taken += 1;
        }
        assert_eq!(taken, 10, "640 bytes hold ten empty datagrams of 64 stored bytes");
    }

    #[test]
    fn each_destination_and_the_whole_queue_have_packet_limits() {
        let budget = Budget::new(LIMITS, 1000, 1 << 20);
        let queued = |ip: &Ipv4Addr| match ip.octets()[3] {
            2 => Load::stored(100, 0),
            _ => Load::stored(10, 0),
        };
        let full = budget.refuse(&[packet(1, "10.77.0.2:9", 1)], queued, Load::stored(110, 0));
        assert!(full.is_some_and(|reason| reason.contains("10.77.0.2")));
        assert!(budget.refuse(&[packet(2, "10.77.0.3:9", 1)], queued, Load::stored(110, 0)).is_none());
        let total = budget.refuse(&[packet(3, "10.77.0.3:9", 1)], queued, Load::stored(150, 0));
        assert!(total.is_some_and(|reason| reason.contains("150 packets")));
    }

    #[test]
    fn what_the_cycle_took_counts_until_the_queue_has_it() {
        let mut budget = Budget::new(LIMITS, 1000, 1 << 20);
        let nothing = |_: &Ipv4Addr| Load::default();
        let batch: Vec<Packet> = (0..100).map(|seq| packet(seq, "10.77.0.2:9", 10)).collect();
        assert!(budget.refuse(&batch, nothing, Load::default()).is_none());
        budget.take(&batch);
        assert!(budget.refuse(&[packet(100, "10.77.0.2:9", 10)], nothing, Load::default()).is_some());
        assert_eq!((budget.packets, budget.bytes), (100, 1000));
        assert!(!budget.cycle_full());
    }
}
