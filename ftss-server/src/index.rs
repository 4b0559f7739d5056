//! The in-memory index of the queue: which packets are queued for which destination, in store
//! order, which are in flight (delivered, not yet receipted) and when they are due again. No I/O:
//! the server feeds it events and the time. Payloads stay on disk; an entry is a few dozen bytes.
//!
//! Every operation of a cycle costs in proportion to the packets it touches, never to the size of
//! the queue, so a queue of millions of held packets does not slow the server down.

use std::collections::{HashMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use fsbridge::{NodeName, PacketId};

use crate::queue::Location;

/// A packet id with its origin node interned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Key {
    epoch: u64,
    seq: u64,
    origin: u32,
}

/// One queued packet.
#[derive(Clone, Copy, Debug)]
pub struct Entry {
    pub location: Location,
    pub destination: SocketAddrV4,
    pub stored_unix_us: u64,
    pub payload_bytes: u16,
    /// When it was last written to an inbox, and the batch seq of that inbox file.
    pub delivered: Option<(Instant, u64)>,
}

/// The queue of one destination address.
#[derive(Default)]
struct Destination {
    /// Not yet delivered, in store order.
    undelivered: VecDeque<Key>,
    /// Delivered at least once, in delivery order; may hold keys already finished (removed lazily).
    in_flight: VecDeque<Key>,
    in_flight_count: usize,
    packets: u64,
    bytes: u64,
}

/// Per-destination figures for status.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DestinationStats {
    pub packets: u64,
    pub bytes: u64,
    pub in_flight: u64,
    pub oldest_stored_unix_us: Option<u64>,
}

/// The index.
#[derive(Default)]
pub struct Index {
    entries: HashMap<Key, Entry>,
    destinations: HashMap<Ipv4Addr, Destination>,
    /// Deliveries in time order, for finding redeliveries due; stale items are skipped.
    deliveries: VecDeque<(Instant, Key)>,
    origins: Vec<NodeName>,
    origin_numbers: HashMap<NodeName, u32>,
}

impl Index {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    fn intern(&mut self, origin: &NodeName) -> u32 {
        if let Some(number) = self.origin_numbers.get(origin) {
            return *number;
        }
        let number = self.origins.len() as u32;
        self.origins.push(origin.clone());
        self.origin_numbers.insert(origin.clone(), number);
        number
    }

    /// The key of an id, if its origin has ever been seen (otherwise nothing of it is queued).
    pub fn key(&self, id: &PacketId) -> Option<Key> {
        let origin = *self.origin_numbers.get(&id.origin)?;
        Some(Key { epoch: id.epoch, seq: id.seq, origin })
    }

    pub fn id(&self, key: Key) -> PacketId {
        PacketId { origin: self.origins[key.origin as usize].clone(), epoch: key.epoch, seq: key.seq }
    }

    pub fn contains(&self, id: &PacketId) -> bool {
        self.key(id).is_some_and(|key| self.entries.contains_key(&key))
    }

    pub fn get(&self, key: Key) -> Option<&Entry> {
        self.entries.get(&key)
    }

    /// Adds a stored packet at the back of its destination's queue. False if already present.
    pub fn insert(&mut self, id: &PacketId, entry: Entry) -> bool {
        let origin = self.intern(&id.origin);
        let key = Key { epoch: id.epoch, seq: id.seq, origin };
        if self.entries.contains_key(&key) {
            return false;
        }
        let destination = self.destinations.entry(*entry.destination.ip()).or_default();
        destination.undelivered.push_back(key);
        destination.packets += 1;
        destination.bytes += u64::from(entry.payload_bytes);
        self.entries.insert(key, entry);
        true
    }

    /// Removes a packet (receipted or dead-lettered); returns its entry.
    pub fn remove(&mut self, id: &PacketId) -> Option<Entry> {
        let key = self.key(id)?;
        let entry = self.entries.remove(&key)?;
        let destination = self.destinations.get_mut(entry.destination.ip()).expect("queued packets have a destination");
        destination.packets -= 1;
        destination.bytes -= u64::from(entry.payload_bytes);
        if entry.delivered.is_some() {
            destination.in_flight_count -= 1;
        }
        // Keys stay in the deques until they reach the front; trim what is there now.
        trim_front(&mut destination.undelivered, &self.entries);
        trim_front(&mut destination.in_flight, &self.entries);
        if destination.packets == 0 {
            self.destinations.remove(entry.destination.ip());
        }
        Some(entry)
    }

    /// Queued payload bytes for a destination address.
    pub fn queued_bytes(&self, destination: &Ipv4Addr) -> u64 {
        self.destinations.get(destination).map_or(0, |queue| queue.bytes)
    }

    /// Destination addresses with packets queued.
    pub fn destinations(&self) -> Vec<Ipv4Addr> {
        self.destinations.keys().copied().collect()
    }

    /// Up to `limit` undelivered packets of `destination`, oldest first, without exceeding
    /// `in_flight_max` packets in flight for it. They are not marked delivered yet.
    pub fn next_undelivered(&mut self, destination: &Ipv4Addr, limit: usize, in_flight_max: usize) -> Vec<Key> {
        let entries = &self.entries;
        let Some(queue) = self.destinations.get_mut(destination) else { return Vec::new() };
        trim_front(&mut queue.undelivered, entries);
        let room = in_flight_max.saturating_sub(queue.in_flight_count).min(limit);
        queue.undelivered.iter().filter(|key| entries.contains_key(key)).take(room).copied().collect()
    }

    /// Packets delivered before `now - redeliver_after` and still not receipted, oldest first.
    pub fn due_again(&mut self, now: Instant, redeliver_after: Duration, limit: usize) -> Vec<Key> {
        let mut due = Vec::new();
        while due.len() < limit {
            let Some(&(at, key)) = self.deliveries.front() else { break };
            let current = self.entries.get(&key).and_then(|entry| entry.delivered).is_some_and(|(last, _)| last == at);
            if !current {
                // Receipted since, or delivered again later (a newer item stands for it).
                self.deliveries.pop_front();
                continue;
            }
            if now.duration_since(at) < redeliver_after {
                break;
            }
            self.deliveries.pop_front();
            due.push(key);
        }
        due
    }

    /// Puts a due packet back in line without delivering it (its inbox copy still waits).
    pub fn postpone(&mut self, key: Key, now: Instant) {
        if let Some(entry) = self.entries.get_mut(&key)
            && let Some((_, file)) = entry.delivered
        {
            entry.delivered = Some((now, file));
            self.deliveries.push_back((now, key));
        }
    }

    /// Records that `key` was written to an inbox file; returns whether it was the first time.
    pub fn mark_delivered(&mut self, key: Key, now: Instant, file: u64) -> bool {
        let Some(entry) = self.entries.get_mut(&key) else { return false };
        let first = entry.delivered.is_none();
        entry.delivered = Some((now, file));
        let destination = *entry.destination.ip();
        self.deliveries.push_back((now, key));
        if first {
            let queue = self.destinations.get_mut(&destination).expect("queued packets have a destination");
            trim_front(&mut queue.undelivered, &self.entries);
            queue.in_flight_count += 1;
            queue.in_flight.push_back(key);
            if queue.undelivered.front() == Some(&key) {
                queue.undelivered.pop_front();
            } else if let Some(position) = queue.undelivered.iter().position(|other| *other == key) {
                queue.undelivered.remove(position);
            }
        }
        first
    }

    /// Undelivered packets for `destination` stored at or before `cutoff_unix_us`, oldest first.
    pub fn stored_before(&mut self, destination: &Ipv4Addr, cutoff_unix_us: u64, limit: usize) -> Vec<PacketId> {
        let entries = &self.entries;
        let Some(queue) = self.destinations.get_mut(destination) else { return Vec::new() };
        trim_front(&mut queue.undelivered, entries);
        let keys: Vec<Key> = queue
            .undelivered
            .iter()
            .take_while(|key| entries.get(key).is_none_or(|entry| entry.stored_unix_us <= cutoff_unix_us))
            .filter(|key| entries.contains_key(key))
            .take(limit)
            .copied()
            .collect();
        keys.into_iter().map(|key| self.id(key)).collect()
    }

    pub fn stats(&mut self, destination: &Ipv4Addr) -> DestinationStats {
        let entries = &self.entries;
        let Some(queue) = self.destinations.get_mut(destination) else { return DestinationStats::default() };
        trim_front(&mut queue.undelivered, entries);
        trim_front(&mut queue.in_flight, entries);
        let oldest = [queue.undelivered.front(), queue.in_flight.front()]
            .into_iter()
            .flatten()
            .filter_map(|key| entries.get(key).map(|entry| entry.stored_unix_us))
            .min();
        DestinationStats {
            packets: queue.packets,
            bytes: queue.bytes,
            in_flight: queue.in_flight_count as u64,
            oldest_stored_unix_us: oldest,
        }
    }
}

fn trim_front(keys: &mut VecDeque<Key>, entries: &HashMap<Key, Entry>) {
    while keys.front().is_some_and(|key| !entries.contains_key(key)) {
        keys.pop_front();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(seq: u64) -> PacketId {
        PacketId { origin: NodeName::new("a").unwrap(), epoch: 9, seq }
    }

    fn entry(seq: u64, destination: &str) -> Entry {
        Entry {
            location: Location { segment: 0, offset: seq * 100, length: 100 },
            destination: destination.parse().unwrap(),
            stored_unix_us: 1000 + seq,
            payload_bytes: 10,
            delivered: None,
        }
    }

    #[test]
    fn delivery_in_store_order_with_in_flight_limit_and_receipts() {
        let mut index = Index::default();
        for seq in 1..=5 {
            assert!(index.insert(&id(seq), entry(seq, "10.0.0.2:9")));
        }
        assert!(!index.insert(&id(3), entry(3, "10.0.0.2:9")), "duplicate accepted");
        let destination: Ipv4Addr = "10.0.0.2".parse().unwrap();
        let now = Instant::now();
        let first = index.next_undelivered(&destination, 10, 2);
        assert_eq!(first, vec![index.key(&id(1)).unwrap(), index.key(&id(2)).unwrap()]);
        for key in &first {
            assert!(index.mark_delivered(*key, now, 1));
        }
        assert!(index.next_undelivered(&destination, 10, 2).is_empty(), "in-flight limit ignored");
        index.remove(&id(2));
        assert_eq!(index.next_undelivered(&destination, 10, 2), vec![index.key(&id(3)).unwrap()]);
        let stats = index.stats(&destination);
        assert_eq!((stats.packets, stats.bytes, stats.in_flight, stats.oldest_stored_unix_us), (4, 40, 1, Some(1001)));
        assert_eq!(index.queued_bytes(&destination), 40);
    }

    #[test]
    fn redelivery_comes_due_once_per_delivery() {
        let mut index = Index::default();
        index.insert(&id(1), entry(1, "10.0.0.2:9"));
        index.insert(&id(2), entry(2, "10.0.0.2:9"));
        let start = Instant::now();
        let key1 = index.key(&id(1)).unwrap();
        let key2 = index.key(&id(2)).unwrap();
        index.mark_delivered(key1, start, 1);
        index.mark_delivered(key2, start, 1);
        let later = start + Duration::from_secs(2);
        assert!(index.due_again(later, Duration::from_secs(5), 10).is_empty());
        index.remove(&id(2));
        let much_later = start + Duration::from_secs(6);
        assert_eq!(index.due_again(much_later, Duration::from_secs(5), 10), vec![key1]);
        assert!(!index.mark_delivered(key1, much_later, 2), "a redelivery is not a first delivery");
        assert!(index.due_again(much_later, Duration::from_secs(5), 10).is_empty());
        assert_eq!(index.due_again(much_later + Duration::from_secs(5), Duration::from_secs(5), 10), vec![key1]);
    }

    #[test]
    fn held_packets_expire_oldest_first() {
        let mut index = Index::default();
        for seq in 1..=4 {
            index.insert(&id(seq), entry(seq, "10.9.9.9:1"));
        }
        let destination: Ipv4Addr = "10.9.9.9".parse().unwrap();
        assert_eq!(index.stored_before(&destination, 1002, 10), vec![id(1), id(2)]);
        index.remove(&id(1));
        index.remove(&id(2));
        assert_eq!(index.stored_before(&destination, 1002, 10), Vec::<PacketId>::new());
        assert_eq!(index.len(), 2);
    }
}
