//! The in-memory index of the queue: which packets are queued for which destination, in store
//! order, which are in flight (delivered, not yet receipted) and when they are due again. No I/O:
//! the server feeds it events and the time. Payloads stay on disk.
//!
//! Memory is what a queue of millions of held packets (a receiver that is away) costs, so a packet
//! waiting for delivery is 40 bytes in its destination's queue and nothing else. Lookups by id are
//! only needed for packets in flight (receipts) and for ids stored before (an outbox file drained
//! again after a crash, a batch sent again over a new fabric connection): the first has a map of its
//! own, the second a few sequence ranges per sender epoch (`fsbridge::seqset`), both bounded.
//!
//! Every operation costs in proportion to the packets it touches, never to the size of the queue.

use fsbridge::hash::{HashMap, HashSet};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use fsbridge::seqset::SeenIds;
use fsbridge::{NodeName, PacketId};

use crate::core::{Location, Time};

/// Sender epochs whose stored ids are remembered (the least recently stored to go first), and
/// sequence ranges kept per epoch: a sender's ids are one range unless its batches were reordered.
const STORED_EPOCHS_MAX: usize = 8192;
const STORED_RANGES_PER_EPOCH_MAX: usize = 256;

/// A packet id with its origin node interned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Key {
    epoch: u64,
    seq: u64,
    origin: u32,
}

/// One queued packet, as the server sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub location: Location,
    pub destination: SocketAddrV4,
    pub stored_unix_us: u64,
    pub payload_bytes: u16,
}

/// An entry without its destination address (which its queue knows), packed into 16 bytes.
#[derive(Clone, Copy, Debug)]
struct Packed {
    segment: u32,
    offset: u32,
    length: u32,
    port: u16,
    payload_bytes: u16,
}

/// A queued packet as its destination's queue holds it: 40 bytes (the key's fields inline, so that
/// its padding is used).
#[derive(Clone, Copy, Debug)]
struct Item {
    epoch: u64,
    seq: u64,
    origin: u32,
    stored_unix_s: u32,
    packed: Packed,
}

impl Packed {
    fn pack(entry: &Entry) -> Packed {
        assert!(entry.location.segment <= u64::from(u32::MAX) && entry.location.offset <= u64::from(u32::MAX));
        Packed {
            segment: entry.location.segment as u32,
            offset: entry.location.offset as u32,
            length: entry.location.length,
            port: entry.destination.port(),
            payload_bytes: entry.payload_bytes,
        }
    }
}

impl Item {
    fn new(key: Key, entry: &Entry) -> Item {
        let stored_unix_s = (entry.stored_unix_us / 1_000_000) as u32;
        Item { epoch: key.epoch, seq: key.seq, origin: key.origin, stored_unix_s, packed: Packed::pack(entry) }
    }

    fn key(&self) -> Key {
        Key { epoch: self.epoch, seq: self.seq, origin: self.origin }
    }

    fn entry(&self, ip: Ipv4Addr) -> Entry {
        let packed = &self.packed;
        Entry {
            location: Location {
                segment: u64::from(packed.segment),
                offset: u64::from(packed.offset),
                length: packed.length,
            },
            destination: SocketAddrV4::new(ip, packed.port),
            stored_unix_us: u64::from(self.stored_unix_s) * 1_000_000,
            payload_bytes: packed.payload_bytes,
        }
    }
}

/// A packet delivered at least once and not yet receipted.
struct InFlight {
    entry: Entry,
    /// When it was last written to an inbox, and the batch seq of that inbox file.
    delivered_at: Time,
    file: u64,
}

/// The packets of one destination port not yet delivered, and how many of its are in flight.
#[derive(Default)]
struct Port {
    /// In store order.
    undelivered: VecDeque<Item>,
    in_flight: usize,
}

/// The queue of one destination address: one line per port, so that a port whose app has stopped
/// reading holds only its own packets back.
#[derive(Default)]
struct Destination {
    ports: HashMap<u16, Port>,
    /// Delivered, in delivery order; may hold keys already receipted (removed lazily).
    in_flight_order: VecDeque<Key>,
    in_flight_count: usize,
    packets: u64,
    bytes: u64,
}

impl Destination {
    /// Drops a port's line once it holds nothing (ports come and go).
    fn prune(&mut self, port: u16) {
        if self.ports.get(&port).is_some_and(|line| line.undelivered.is_empty() && line.in_flight == 0) {
            self.ports.remove(&port);
        }
    }

    /// Removes the undelivered item with `key` (normally at the front of its port's line).
    fn take_undelivered(&mut self, key: Key, port: Option<u16>) -> Option<Item> {
        // Callers name the port; only an id of unknown port makes every line a candidate.
        let ports: Vec<u16> = match port {
            Some(port) => vec![port],
            None => self.ports.keys().copied().collect(),
        };
        let found = ports.iter().find_map(|port| {
            let line = self.ports.get(port)?;
            let at_front = line.undelivered.front().is_some_and(|item| item.key() == key);
            at_front.then_some((*port, 0))
        });
        let found = found.or_else(|| {
            ports.iter().find_map(|port| {
                let position = self.ports.get(port)?.undelivered.iter().position(|item| item.key() == key)?;
                Some((*port, position))
            })
        });
        let (port, position) = found?;
        let item = self.ports.get_mut(&port)?.undelivered.remove(position);
        self.prune(port);
        item
    }
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
pub struct Index {
    destinations: HashMap<Ipv4Addr, Destination>,
    in_flight: HashMap<Key, InFlight>,
    /// Deliveries in time order, for finding redeliveries due; stale items are skipped.
    deliveries: VecDeque<(Time, Key)>,
    /// Packets made due at once ([`Index::due_now`]), in the order they go; an item stands while
    /// its packet's delivery time is still the one recorded with it.
    due_first: VecDeque<(Time, Key)>,
    /// Every id stored (by origin and epoch), for recognising one drained or sent again.
    stored: SeenIds<(u32, u64)>,
    packets: usize,
    /// Payload bytes of every queued packet.
    bytes: u64,
    origins: Vec<NodeName>,
    origin_numbers: HashMap<NodeName, u32>,
}

impl Default for Index {
    fn default() -> Index {
        Index {
            destinations: HashMap::default(),
            in_flight: HashMap::default(),
            deliveries: VecDeque::new(),
            due_first: VecDeque::new(),
            stored: SeenIds::new(STORED_EPOCHS_MAX, STORED_RANGES_PER_EPOCH_MAX),
            packets: 0,
            bytes: 0,
            origins: Vec::new(),
            origin_numbers: HashMap::default(),
        }
    }
}

impl Index {
    pub fn len(&self) -> usize {
        self.packets
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
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

    /// Was this id stored recently (a duplicate drain) or is it in flight?
    pub fn seen(&self, id: &PacketId) -> bool {
        self.key(id).is_some_and(|key| {
            self.stored.contains((key.origin, key.epoch), key.seq) || self.in_flight.contains_key(&key)
        })
    }

    /// The entry of a packet in flight, with the batch seq of its last inbox file.
    pub fn in_flight(&self, key: Key) -> Option<(Entry, u64)> {
        self.in_flight.get(&key).map(|flight| (flight.entry, flight.file))
    }

    /// Adds a stored packet at the back of its destination's queue. False if it was stored recently.
    pub fn insert(&mut self, id: &PacketId, entry: Entry) -> bool {
        let origin = self.intern(&id.origin);
        let key = Key { epoch: id.epoch, seq: id.seq, origin };
        if self.stored.contains((key.origin, key.epoch), key.seq) || self.in_flight.contains_key(&key) {
            return false;
        }
        self.remember(key);
        let destination = self.destinations.entry(*entry.destination.ip()).or_default();
        destination.ports.entry(entry.destination.port()).or_default().undelivered.push_back(Item::new(key, &entry));
        destination.packets += 1;
        destination.bytes += u64::from(entry.payload_bytes);
        self.packets += 1;
        self.bytes += u64::from(entry.payload_bytes);
        true
    }

    fn remember(&mut self, key: Key) {
        self.stored.insert((key.origin, key.epoch), key.seq);
    }

    /// Notes that `id` was stored and is done already (replay): a copy that comes again is not
    /// stored a second time.
    pub fn note_done(&mut self, id: &PacketId) {
        let origin = self.intern(&id.origin);
        self.remember(Key { epoch: id.epoch, seq: id.seq, origin });
    }

    /// Removes a packet (receipted, dead-lettered, sent); returns its entry. Packets not in flight
    /// are found in their destination port's line (`destination`), normally at its front.
    pub fn remove(&mut self, id: &PacketId, destination: Option<SocketAddrV4>) -> Option<Entry> {
        let key = self.key(id)?;
        let (entry, was_in_flight) = match self.in_flight.remove(&key) {
            Some(flight) => (flight.entry, true),
            None => {
                let address = destination?;
                let queue = self.destinations.get_mut(address.ip())?;
                (queue.take_undelivered(key, Some(address.port()))?.entry(*address.ip()), false)
            }
        };
        let queue = self.destinations.get_mut(entry.destination.ip()).expect("queued packets have a destination");
        queue.packets -= 1;
        queue.bytes -= u64::from(entry.payload_bytes);
        if was_in_flight {
            queue.in_flight_count -= 1;
            let port = entry.destination.port();
            if let Some(line) = queue.ports.get_mut(&port) {
                line.in_flight -= 1;
            }
            queue.prune(port);
            let in_flight = &self.in_flight;
            while queue.in_flight_order.front().is_some_and(|front| !in_flight.contains_key(front)) {
                queue.in_flight_order.pop_front();
            }
        }
        if queue.packets == 0 {
            self.destinations.remove(entry.destination.ip());
        }
        self.packets -= 1;
        self.bytes -= u64::from(entry.payload_bytes);
        Some(entry)
    }

    /// Queued packets and their payload bytes for a destination address.
    pub fn queued(&self, destination: &Ipv4Addr) -> (u64, u64) {
        self.destinations.get(destination).map_or((0, 0), |queue| (queue.packets, queue.bytes))
    }

    /// Payload bytes of every queued packet.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Destination addresses with packets queued.
    pub fn destinations(&self) -> Vec<Ipv4Addr> {
        self.destinations.keys().copied().collect()
    }

    /// The ports of `destination` with packets not yet delivered.
    pub fn waiting_ports(&self, destination: &Ipv4Addr) -> Vec<u16> {
        let Some(queue) = self.destinations.get(destination) else { return Vec::new() };
        queue.ports.iter().filter(|(_, line)| !line.undelivered.is_empty()).map(|(port, _)| *port).collect()
    }

    /// How many packets for `destination`'s `port` may be handed out ahead of their store (see the
    /// server's early delivery): none while the port has undelivered packets (they go first, in
    /// order), else the room left under `in_flight_max` for the destination and
    /// `port_in_flight_max` for the port.
    pub fn room_ahead(
        &self,
        destination: &Ipv4Addr,
        port: u16,
        in_flight_max: usize,
        port_in_flight_max: usize,
    ) -> usize {
        let Some(queue) = self.destinations.get(destination) else { return in_flight_max.min(port_in_flight_max) };
        let line = queue.ports.get(&port);
        if line.is_some_and(|line| !line.undelivered.is_empty()) {
            return 0;
        }
        let port_in_flight = line.map_or(0, |line| line.in_flight);
        in_flight_max.saturating_sub(queue.in_flight_count).min(port_in_flight_max.saturating_sub(port_in_flight))
    }

    /// Up to `limit` undelivered packets of `destination`, each port's in store order, the port
    /// with the oldest waiting packet first, without exceeding `in_flight_max` packets in flight for
    /// the destination or `port_in_flight_max` for one port, and leaving out the ports in `skip`.
    /// They stay queued until marked delivered or removed.
    pub fn next_undelivered(
        &self,
        destination: &Ipv4Addr,
        limit: usize,
        in_flight_max: usize,
        port_in_flight_max: usize,
        skip: &HashSet<u16>,
    ) -> Vec<(Key, Entry)> {
        let Some(queue) = self.destinations.get(destination) else { return Vec::new() };
        let mut room = in_flight_max.saturating_sub(queue.in_flight_count).min(limit);
        let mut lines: Vec<&Port> = queue
            .ports
            .iter()
            .filter(|(port, line)| !skip.contains(port) && !line.undelivered.is_empty())
            .map(|(_, line)| line)
            .collect();
        lines.sort_by_key(|line| line.undelivered.front().map(|item| (item.stored_unix_s, item.origin, item.seq)));
        let mut next = Vec::new();
        for line in lines {
            let take = port_in_flight_max.saturating_sub(line.in_flight).min(room);
            next.extend(line.undelivered.iter().take(take).map(|item| (item.key(), item.entry(*destination))));
            room -= take;
        }
        next
    }

    /// Packets delivered before `now - redeliver_after` and still not receipted, oldest first.
    pub fn due_again(&mut self, now: Time, redeliver_after: Duration, limit: usize) -> Vec<Key> {
        let mut due = Vec::new();
        while due.len() < limit {
            let Some((at, key)) = self.due_first.pop_front() else { break };
            if self.in_flight.get(&key).is_some_and(|flight| flight.delivered_at == at) {
                due.push(key);
            }
        }
        while due.len() < limit {
            let Some(&(at, key)) = self.deliveries.front() else { break };
            let current = self.in_flight.get(&key).is_some_and(|flight| flight.delivered_at == at);
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
    pub fn postpone(&mut self, key: Key, now: Time) {
        if let Some(flight) = self.in_flight.get_mut(&key) {
            flight.delivered_at = now;
            self.deliveries.push_back((now, key));
        }
    }

    /// Makes a packet in flight due for redelivery at once (its inbox copy was taken back).
    pub fn due_now(&mut self, key: Key, now: Time) {
        let Some(flight) = self.in_flight.get_mut(&key) else { return };
        flight.delivered_at = now;
        // Not among the deliveries by time: `now` less the redelivery time may be before the clock's
        // origin (a server in its first seconds), and the packet would wait that long.
        self.due_first.push_front((now, key));
    }

    /// Records that `key` (for `destination`) was written to an inbox file; returns whether it was
    /// the first time.
    pub fn mark_delivered(&mut self, key: Key, destination: SocketAddrV4, now: Time, file: u64) -> bool {
        self.deliveries.push_back((now, key));
        if let Some(flight) = self.in_flight.get_mut(&key) {
            flight.delivered_at = now;
            flight.file = file;
            return false;
        }
        let Some(queue) = self.destinations.get_mut(destination.ip()) else { return false };
        // Deliveries go in each port's queue order, so the key is at the front of its line.
        let Some(item) = queue.take_undelivered(key, Some(destination.port())) else { return false };
        queue.in_flight_count += 1;
        queue.ports.entry(destination.port()).or_default().in_flight += 1;
        queue.in_flight_order.push_back(key);
        self.in_flight.insert(key, InFlight { entry: item.entry(*destination.ip()), delivered_at: now, file });
        // The order is trimmed from its front as receipts come; a packet that stays unreceipted
        // there (its port's app stopped reading) would let it grow with every other delivery, so
        // it is compacted once it holds twice what is in flight (amortized O(1) a delivery).
        if queue.in_flight_order.len() > 2 * queue.in_flight_count + 1024 {
            let in_flight = &self.in_flight;
            queue.in_flight_order.retain(|key| in_flight.contains_key(key));
        }
        true
    }

    /// Undelivered packets for `destination` stored at or before `cutoff_unix_us`, oldest first,
    /// each port's in its line's order (so removing them in this order always takes a line's front),
    /// with the address each was sent to.
    pub fn stored_before(
        &self,
        destination: &Ipv4Addr,
        cutoff_unix_us: u64,
        limit: usize,
    ) -> Vec<(PacketId, SocketAddrV4)> {
        let Some(queue) = self.destinations.get(destination).filter(|_| limit > 0) else { return Vec::new() };
        let old = |item: &Item| u64::from(item.stored_unix_s) * 1_000_000 <= cutoff_unix_us;
        // A merge of the lines by store time: the heap holds each line's next old item.
        let mut next: BinaryHeap<Reverse<(u32, u16, usize)>> = queue
            .ports
            .iter()
            .filter_map(|(port, line)| line.undelivered.front().filter(|item| old(item)).map(|item| (item, *port)))
            .map(|(item, port)| Reverse((item.stored_unix_s, port, 0)))
            .collect();
        let mut found = Vec::new();
        while found.len() < limit
            && let Some(Reverse((_, port, at))) = next.pop()
        {
            let line = &queue.ports[&port].undelivered;
            found.push((self.id(line[at].key()), SocketAddrV4::new(*destination, port)));
            if let Some(item) = line.get(at + 1).filter(|item| old(item)) {
                next.push(Reverse((item.stored_unix_s, port, at + 1)));
            }
        }
        found
    }

    /// Receipts for packets that are not in flight: the server restarted (or a partition changed
    /// owner) after delivering them, so the replay queued them again as undelivered. Delivery takes
    /// each port's line from its front, so such packets are among the first `window` of their line.
    /// Returns those of `keys` found there, in one pass over each line's window.
    pub fn find_undelivered(&self, destination: &Ipv4Addr, keys: &HashSet<Key>, window: usize) -> Vec<Key> {
        let Some(queue) = self.destinations.get(destination) else { return Vec::new() };
        queue
            .ports
            .values()
            .flat_map(|line| line.undelivered.iter().take(window))
            .map(Item::key)
            .filter(|key| keys.contains(key))
            .collect()
    }

    /// Removes the undelivered packets of `destination` with a key in `keys` from the first `window`
    /// of each port's line (one pass per line, whatever their order), and returns their entries.
    pub fn remove_undelivered(&mut self, destination: &Ipv4Addr, keys: &HashSet<Key>, window: usize) -> Vec<Entry> {
        let Some(queue) = self.destinations.get_mut(destination) else { return Vec::new() };
        let mut removed = Vec::new();
        let ports: Vec<u16> = queue.ports.keys().copied().collect();
        for port in ports {
            let line = &mut queue.ports.get_mut(&port).expect("listed port").undelivered;
            let scanned = window.min(line.len());
            let mut kept: Vec<Item> = Vec::with_capacity(scanned);
            for item in line.drain(..scanned) {
                if keys.contains(&item.key()) {
                    removed.push(item.entry(*destination));
                } else {
                    kept.push(item);
                }
            }
            for item in kept.into_iter().rev() {
                line.push_front(item);
            }
            queue.prune(port);
        }
        for entry in &removed {
            queue.packets -= 1;
            queue.bytes -= u64::from(entry.payload_bytes);
            self.packets -= 1;
            self.bytes -= u64::from(entry.payload_bytes);
        }
        if queue.packets == 0 {
            self.destinations.remove(destination);
        }
        removed
    }

    pub fn stats(&self, destination: &Ipv4Addr) -> DestinationStats {
        let Some(queue) = self.destinations.get(destination) else { return DestinationStats::default() };
        let waiting = queue
            .ports
            .values()
            .filter_map(|line| line.undelivered.front())
            .map(|item| u64::from(item.stored_unix_s) * 1_000_000)
            .min();
        let flying = queue
            .in_flight_order
            .front()
            .and_then(|key| self.in_flight.get(key))
            .map(|flight| flight.entry.stored_unix_us);
        DestinationStats {
            packets: queue.packets,
            bytes: queue.bytes,
            in_flight: queue.in_flight_count as u64,
            oldest_stored_unix_us: [waiting, flying].into_iter().flatten().min(),
        }
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
            stored_unix_us: (1000 + seq) * 1_000_000,
            payload_bytes: 10,
        }
    }

    fn keys(pairs: Vec<(Key, Entry)>) -> Vec<Key> {
        pairs.into_iter().map(|(key, _)| key).collect()
    }

    #[test]
    fn packed_entries_round_trip() {
        let original = entry(7, "10.1.2.3:4567");
        let item = Item::new(Key { epoch: 1, seq: 2, origin: 3 }, &original);
        assert_eq!(item.entry("10.1.2.3".parse().unwrap()), original);
        assert_eq!(std::mem::size_of::<Item>(), 40);
    }

    #[test]
    fn delivery_in_store_order_with_in_flight_limit_and_receipts() {
        let mut index = Index::default();
        for seq in 1..=5 {
            assert!(index.insert(&id(seq), entry(seq, "10.0.0.2:9")));
        }
        assert!(!index.insert(&id(3), entry(3, "10.0.0.2:9")), "duplicate accepted");
        let destination: Ipv4Addr = "10.0.0.2".parse().unwrap();
        let now = Time(1_000_000_000);
        let none = HashSet::default();
        let first = keys(index.next_undelivered(&destination, 10, 2, 2, &none));
        assert_eq!(first, vec![index.key(&id(1)).unwrap(), index.key(&id(2)).unwrap()]);
        for key in &first {
            assert!(index.mark_delivered(*key, "10.0.0.2:9".parse().unwrap(), now, 1));
        }
        assert!(index.next_undelivered(&destination, 10, 2, 2, &none).is_empty(), "in-flight limit ignored");
        assert_eq!(index.remove(&id(2), None).unwrap(), entry(2, "10.0.0.2:9"));
        assert_eq!(keys(index.next_undelivered(&destination, 10, 2, 2, &none)), vec![index.key(&id(3)).unwrap()]);
        let stats = index.stats(&destination);
        assert_eq!((stats.packets, stats.bytes, stats.in_flight), (4, 40, 1));
        assert_eq!(stats.oldest_stored_unix_us, Some(1001 * 1_000_000));
        assert_eq!(index.queued(&destination), (4, 40));
        // An undelivered packet is found through its destination.
        assert!(index.remove(&id(4), None).is_none());
        assert!(index.remove(&id(4), Some("10.0.0.2:9".parse().unwrap())).is_some());
        assert_eq!(index.len(), 3);
    }

    /// Found when the server began to wake on writes: packets taken back from an inbox (a fabric
    /// process bound the port) were made due by dating their delivery one redelivery time back,
    /// which in a server's first seconds is before its clock's origin; they then waited the whole
    /// redelivery time and arrived after packets stored later.
    #[test]
    fn packets_made_due_now_are_due_at_once_and_in_order_even_in_the_clocks_first_seconds() {
        let mut index = Index::default();
        for seq in 1..=4 {
            index.insert(&id(seq), entry(seq, "10.0.0.2:9"));
        }
        let destination: Ipv4Addr = "10.0.0.2".parse().unwrap();
        let none = HashSet::default();
        let redeliver_after = Duration::from_secs(5);
        let start = Time(200_000);
        let first = keys(index.next_undelivered(&destination, 10, 10, 10, &none));
        for key in &first[..3] {
            assert!(index.mark_delivered(*key, "10.0.0.2:9".parse().unwrap(), start, 1));
        }
        let now = Time(700_000);
        assert!(index.due_again(now, redeliver_after, 10).is_empty());
        // Taken back in order, the last first (as the server does).
        for key in first[..3].iter().rev() {
            index.due_now(*key, now);
        }
        assert_eq!(index.due_again(now, redeliver_after, 10), first[..3].to_vec());
        // Once due they are not due again until delivered again and the time has passed.
        assert!(index.due_again(now, redeliver_after, 10).is_empty());
        // A packet receipted meanwhile is not due.
        index.due_now(first[0], now);
        index.remove(&id(1), None);
        assert!(index.due_again(now, redeliver_after, 10).is_empty());
    }

    #[test]
    fn each_port_has_its_own_line_and_in_flight_room() {
        let mut index = Index::default();
        // Port 1 holds a backlog stored first; port 2's packets come after it.
        for seq in 1..=6 {
            index.insert(&id(seq), entry(seq, "10.0.0.2:1"));
        }
        for seq in 7..=8 {
            index.insert(&id(seq), entry(seq, "10.0.0.2:2"));
        }
        let destination: Ipv4Addr = "10.0.0.2".parse().unwrap();
        // Origin "a" is the first interned: number 0.
        let key = |seq| Key { epoch: 9, seq, origin: 0 };
        let now = Time(1_000_000_000);
        // At most 3 in flight per port: port 1 gives 3, port 2 both of its own.
        let first = keys(index.next_undelivered(&destination, 100, 100, 3, &HashSet::default()));
        assert_eq!(first, vec![key(1), key(2), key(3), key(7), key(8)]);
        for (seq, port) in [(1, 1), (2, 1), (3, 1)] {
            index.mark_delivered(key(seq), SocketAddrV4::new(destination, port), now, 1);
        }
        // Port 1 is full (its app does not read); port 2 still gets its packets.
        let next = keys(index.next_undelivered(&destination, 100, 100, 3, &HashSet::default()));
        assert_eq!(next, vec![key(7), key(8)]);
        // A port left out (held for a slow receiver) costs the others nothing.
        let skip: HashSet<u16> = [2].into_iter().collect();
        assert!(index.next_undelivered(&destination, 100, 100, 3, &skip).is_empty());
        let mut waiting = index.waiting_ports(&destination);
        waiting.sort_unstable();
        assert_eq!(waiting, vec![1, 2]);
        // The destination-wide bound still holds.
        assert_eq!(keys(index.next_undelivered(&destination, 100, 4, 3, &HashSet::default())), vec![key(7)]);
        // A receipt frees port 1's room; an emptied port's line goes away.
        index.remove(&id(1), None);
        assert_eq!(keys(index.next_undelivered(&destination, 100, 100, 3, &skip)), vec![key(4)]);
        for seq in [7, 8] {
            index.remove(&id(seq), Some(SocketAddrV4::new(destination, 2)));
        }
        assert_eq!(index.waiting_ports(&destination), vec![1]);
        assert!(!index.destinations[&destination].ports.contains_key(&2));
        assert_eq!(index.stats(&destination).in_flight, 2);
    }

    #[test]
    fn a_packet_never_receipted_does_not_let_the_delivery_order_grow() {
        let mut index = Index::default();
        let destination: Ipv4Addr = "10.0.0.2".parse().unwrap();
        let now = Time(1_000_000_000);
        // Port 1's app never reads: its packet stays in flight at the front of the order.
        index.insert(&id(0), entry(0, "10.0.0.2:1"));
        index.mark_delivered(Key { epoch: 9, seq: 0, origin: 0 }, SocketAddrV4::new(destination, 1), now, 1);
        for seq in 1..=20_000 {
            index.insert(&id(seq), entry(seq, "10.0.0.2:2"));
            index.mark_delivered(Key { epoch: 9, seq, origin: 0 }, SocketAddrV4::new(destination, 2), now, 1);
            index.remove(&id(seq), None);
        }
        let queue = &index.destinations[&destination];
        assert_eq!(queue.in_flight_count, 1);
        assert!(
            queue.in_flight_order.len() <= 2 + 1024 + 1, // twice the 1 in flight, plus the slack
            "{} keys kept",
            queue.in_flight_order.len()
        );
        assert_eq!(index.stats(&destination).in_flight, 1);
    }

    #[test]
    fn receipts_for_packets_queued_again_after_a_restart_find_them_in_any_order() {
        let mut index = Index::default();
        for seq in 0..6 {
            index.insert(&id(seq), entry(seq, "10.77.0.2:9000"));
        }
        index.insert(&id(6), entry(6, "10.77.0.2:9001"));
        let destination: Ipv4Addr = "10.77.0.2".parse().unwrap();
        let wanted: HashSet<Key> = [4, 1, 6, 5].into_iter().map(|seq| index.key(&id(seq)).unwrap()).collect();
        // Seq 5 is beyond a window of 5 on its line: not found, not removed.
        let mut found = index.find_undelivered(&destination, &wanted, 5);
        found.sort_by_key(|key| key.seq);
        assert_eq!(found.iter().map(|key| key.seq).collect::<Vec<_>>(), vec![1, 4, 6]);
        let removed = index.remove_undelivered(&destination, &wanted, 5);
        let mut seqs: Vec<u64> = removed.iter().map(|entry| entry.location.offset / 100).collect();
        seqs.sort();
        assert_eq!(seqs, vec![1, 4, 6]);
        assert_eq!(index.len(), 4);
        let stats = index.stats(&destination);
        assert_eq!((stats.packets, stats.bytes), (4, 40));
        // What is left is delivered in store order, and the emptied port line is gone.
        assert_eq!(index.waiting_ports(&destination), vec![9000]);
        let next = keys(index.next_undelivered(&destination, 10, 10, 10, &HashSet::default()));
        assert_eq!(next.iter().map(|key| key.seq).collect::<Vec<_>>(), vec![0, 2, 3, 5]);
    }

    /// Item 9 of the durability audit: only the last 65,536 stored ids were remembered, so an
    /// outbox file or fabric batch sent again after that many others was stored twice.
    #[test]
    fn an_id_stored_long_ago_is_still_known_when_it_comes_again() {
        let mut index = Index::default();
        assert!(index.insert(&id(1), entry(1, "10.77.0.2:9000")));
        for seq in 2..200_000 {
            let other = PacketId { origin: NodeName::new("c").unwrap(), epoch: 3, seq };
            assert!(index.insert(&other, entry(seq, "10.77.0.3:9000")));
        }
        assert!(index.seen(&id(1)), "an id stored 200,000 packets ago was forgotten");
        assert!(!index.insert(&id(1), entry(1, "10.77.0.2:9000")));
        let destination: Ipv4Addr = "10.77.0.2".parse().unwrap();
        index.remove(&id(1), Some("10.77.0.2:9000".parse().unwrap())).unwrap();
        // Receipted and gone: a copy that comes now is still not stored again.
        assert!(!index.insert(&id(1), entry(1, "10.77.0.2:9000")));
        assert_eq!(index.queued(&destination), (0, 0));
    }

    #[test]
    fn redelivery_comes_due_once_per_delivery() {
        let mut index = Index::default();
        index.insert(&id(1), entry(1, "10.0.0.2:9"));
        index.insert(&id(2), entry(2, "10.0.0.2:9"));
        let start = Time(1_000_000_000);
        let key1 = index.key(&id(1)).unwrap();
        let key2 = index.key(&id(2)).unwrap();
        let port: SocketAddrV4 = "10.0.0.2:9".parse().unwrap();
        index.mark_delivered(key1, port, start, 1);
        index.mark_delivered(key2, port, start, 1);
        let later = start + Duration::from_secs(2);
        assert!(index.due_again(later, Duration::from_secs(5), 10).is_empty());
        index.remove(&id(2), None);
        let much_later = start + Duration::from_secs(6);
        assert_eq!(index.due_again(much_later, Duration::from_secs(5), 10), vec![key1]);
        assert!(!index.mark_delivered(key1, port, much_later, 2), "a redelivery is not a first delivery");
        assert_eq!(index.in_flight(key1).unwrap().1, 2);
        assert!(index.due_again(much_later, Duration::from_secs(5), 10).is_empty());
        assert_eq!(index.due_again(much_later + Duration::from_secs(5), Duration::from_secs(5), 10), vec![key1]);
    }

    #[test]
    fn held_packets_expire_oldest_first() {
        let mut index = Index::default();
        for seq in 1..=4 {
            index.insert(&id(seq), entry(seq, "10.9.9.9:1"));
        }
        // A second port, stored in between.
        index.insert(&id(9), entry(1, "10.9.9.9:2"));
        let destination: Ipv4Addr = "10.9.9.9".parse().unwrap();
        let port = |port| SocketAddrV4::new(destination, port);
        let expired = index.stored_before(&destination, 1002 * 1_000_000, 10);
        assert_eq!(expired, vec![(id(1), port(1)), (id(9), port(2)), (id(2), port(1))]);
        for (id, address) in expired {
            assert!(index.remove(&id, Some(address)).is_some());
        }
        assert!(index.stored_before(&destination, 1002 * 1_000_000, 10).is_empty());
        assert_eq!(index.len(), 2);
    }

    #[test]
    fn a_million_held_packets_cost_about_40_bytes_each() {
        let mut index = Index::default();
        for seq in 0..1_000_000u64 {
            index.insert(&id(seq), entry(seq, "10.9.9.9:1"));
        }
        let queue = &index.destinations[&"10.9.9.9".parse().unwrap()];
        let bytes = queue.ports[&1].undelivered.capacity() * std::mem::size_of::<Item>();
        assert!(bytes <= 1_100_000 * 40, "{bytes} bytes for a million held packets");
    }
}
