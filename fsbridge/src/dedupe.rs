//! The receive side's duplicate filter: which packet ids a receiving process has handed to the app
//! or holds for it. Pure: no I/O, no clock. The shim keeps one per process; the spool simulator
//! (`ftss-server/src/sim/spool.rs`) gives one to each simulated receiving process.

use std::collections::{HashMap, VecDeque};

use crate::PacketId;
use crate::seqset::SeenIds;

/// Where a packet this process took from its inbox is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    /// Injected into (or held for) the socket with this id; the app has not read it yet.
    Queued(u64),
    /// The app has read it (its receipt is written or queued).
    Received,
}

/// Receive-side duplicate filter: a redelivered packet id is not handed to the app twice. Ids the
/// app has read are kept as sequence ranges per sender epoch (a few bytes per sender, however many
/// packets), so redelivery cannot outrun the filter; ids waiting in a socket are kept exactly.
pub struct Dedupe {
    queued: HashMap<u128, u64>,
    order: VecDeque<u128>,
    received: SeenIds<u64>,
}

/// Packet ids waiting in sockets that are remembered (beyond this, the oldest are forgotten).
pub const DEDUPE_IDS_MAX: usize = 1 << 18;
/// Sender epochs whose received ids are remembered, and sequence ranges kept per epoch.
const RECEIVED_EPOCHS_MAX: usize = 4096;
const RECEIVED_RANGES_PER_EPOCH_MAX: usize = 256;

impl Dedupe {
    pub fn new() -> Dedupe {
        Dedupe {
            queued: HashMap::new(),
            order: VecDeque::new(),
            received: SeenIds::new(RECEIVED_EPOCHS_MAX, RECEIVED_RANGES_PER_EPOCH_MAX),
        }
    }

    /// FNV-1a of origin and epoch: names the sender epoch.
    pub fn epoch_key(id: &PacketId) -> u64 {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in id.origin.as_str().bytes().chain(id.epoch.to_le_bytes()) {
            hash = (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3);
        }
        hash
    }

    pub fn key(id: &PacketId) -> u128 {
        (u128::from(Dedupe::epoch_key(id)) << 64) | u128::from(id.seq)
    }

    /// What is known of `id` (None: new).
    pub fn get(&self, id: &PacketId) -> Option<Seen> {
        if self.received.contains(Dedupe::epoch_key(id), id.seq) {
            return Some(Seen::Received);
        }
        self.queued.get(&Dedupe::key(id)).map(|sock| Seen::Queued(*sock))
    }

    /// Records where `id` is now.
    pub fn set(&mut self, id: &PacketId, seen: Seen) {
        let key = Dedupe::key(id);
        match seen {
            Seen::Received => {
                self.queued.remove(&key);
                self.received.insert(Dedupe::epoch_key(id), id.seq);
            }
            Seen::Queued(sock) => {
                if self.queued.insert(key, sock).is_some() {
                    return;
                }
                self.order.push_back(key);
                while self.order.len() > DEDUPE_IDS_MAX
                    && let Some(oldest) = self.order.pop_front()
                {
                    self.queued.remove(&oldest);
                }
                // Keys of ids read since are stale in the age order: dropped when it is long.
                if self.order.len() > 2 * self.queued.len() + 1024 {
                    let queued = &self.queued;
                    self.order.retain(|key| queued.contains_key(key));
                }
            }
        }
    }

    /// Forgets `id` while it waits in a socket (a forked child leaves it to its parent).
    pub fn forget(&mut self, id: &PacketId) {
        self.queued.remove(&Dedupe::key(id));
    }

    /// Sequence numbers `start..end` of the sender epoch keyed `epoch` were handed to the app (by
    /// an earlier process on a once port): received.
    pub fn mark_received_range(&mut self, epoch: u64, start: u64, end: u64) {
        self.received.insert_range(epoch, start, end);
    }
}

impl Default for Dedupe {
    fn default() -> Dedupe {
        Dedupe::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NodeName;

    #[test]
    fn dedupe_remembers_where_a_packet_is_within_its_window() {
        let id = |seq| PacketId { origin: NodeName::new("a").unwrap(), epoch: 7, seq };
        let mut dedupe = Dedupe::new();
        assert_eq!(dedupe.get(&id(1)), None);
        dedupe.set(&id(1), Seen::Queued(3));
        assert_eq!(dedupe.get(&id(1)), Some(Seen::Queued(3)));
        dedupe.set(&id(1), Seen::Received);
        assert_eq!(dedupe.get(&id(1)), Some(Seen::Received));
        let other_epoch = PacketId { epoch: 8, ..id(1) };
        assert_eq!(dedupe.get(&other_epoch), None, "same seq, other epoch: another packet");
        dedupe.set(&id(2), Seen::Queued(3));
        dedupe.forget(&id(2));
        assert_eq!(dedupe.get(&id(2)), None);
        for seq in 3..(DEDUPE_IDS_MAX as u64 + 5) {
            dedupe.set(&id(seq), Seen::Queued(4));
        }
        assert_eq!(dedupe.get(&id(3)), None, "the oldest waiting ids are forgotten first");
        assert!(dedupe.queued.len() <= DEDUPE_IDS_MAX);
    }

    /// Item 9 of the durability audit: the filter kept the last 2^18 ids, which async senders
    /// outrun in under five seconds (the server's redelivery time): a redelivery after that was
    /// handed to the app again. Ids read are now kept as ranges per sender epoch.
    #[test]
    fn a_packet_read_long_ago_is_still_known_when_it_is_delivered_again() {
        let id = |seq| PacketId { origin: NodeName::new("a").unwrap(), epoch: 7, seq };
        let mut dedupe = Dedupe::new();
        dedupe.set(&id(1), Seen::Queued(3));
        dedupe.set(&id(1), Seen::Received);
        for seq in 2..(4 * DEDUPE_IDS_MAX as u64) {
            dedupe.set(&id(seq), Seen::Queued(3));
            dedupe.set(&id(seq), Seen::Received);
        }
        assert_eq!(dedupe.get(&id(1)), Some(Seen::Received), "forgotten after {} others", 4 * DEDUPE_IDS_MAX);
        assert!(dedupe.queued.is_empty() && dedupe.order.len() <= 1024 + 1);
    }
}
