//! Which queue segments still hold something live, and the replay of a recovered queue.
//!
//! A segment may be reclaimed (deleted) once nothing in it is live: no packet still queued and no
//! receipted packet still inside `--retain`. The book counts live records per segment and keeps
//! the retained ones in the order their time runs out. Replay turns what queue recovery read back
//! into the index and the book: a packet with no `done` record is queued again, a receipted or
//! sent one inside `--retain` keeps its segment alive, and every cursor is handed back. No I/O:
//! times come in as arguments.

use fsbridge::hash::HashMap;
use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use fsbridge::{NodeName, Packet, PacketId};

use crate::core::Location;
use crate::queue::{Outcome, QueueRecord, Recovered};

/// Live records per segment and the retained ones.
#[derive(Debug, Default)]
pub struct Book {
    /// Live records per segment (queued, or receipted but retained).
    live: BTreeMap<u64, u64>,
    /// Receipted packets kept for `--retain`: (until µs, segment), oldest first.
    retained: VecDeque<(u64, u64)>,
    retain_us: u64,
}

/// What replay hands to the shell, record by record, in log order of the packets.
#[derive(Debug)]
pub enum Replayed<'a> {
    /// A packet to queue again: the shell indexes it and answers whether the index took it (an
    /// id stored twice is queued once).
    Queued { packet: &'a Packet, location: Location, stored_unix_us: u64 },
    /// A packet that is done (its id must not be stored again).
    Done { id: &'a PacketId },
    /// How far a node's outbox log was stored.
    Cursor { node: &'a NodeName, log: &'a str, offset: u64 },
}

impl Book {
    pub fn new(retain: Duration) -> Book {
        Book { retain_us: u64::try_from(retain.as_micros()).unwrap_or(u64::MAX), ..Book::default() }
    }

    /// A packet in `segment` is queued.
    pub fn stored(&mut self, segment: u64) {
        *self.live.entry(segment).or_insert(0) += 1;
    }

    /// A queued packet of `segment` is done at `at_unix_us`: it stays live for `--retain` unless it
    /// was dead-lettered (dead letters are copied out, not retained).
    pub fn finished(&mut self, segment: u64, outcome: Outcome, at_unix_us: u64) {
        if outcome != Outcome::DeadLettered && self.retain_us > 0 {
            self.retained.push_back((at_unix_us.saturating_add(self.retain_us), segment));
        } else {
            self.release(segment);
        }
    }

    fn release(&mut self, segment: u64) {
        let live = self.live.get_mut(&segment).expect("segment counted");
        *live -= 1;
        if *live == 0 {
            self.live.remove(&segment);
        }
    }

    /// Releases the retained packets whose time is up at `now_unix_us`.
    pub fn expire(&mut self, now_unix_us: u64) {
        while self.retained.front().is_some_and(|(until, _)| *until <= now_unix_us) {
            let (_, segment) = self.retained.pop_front().expect("front exists");
            self.release(segment);
        }
    }

    /// Does anything in `segment` still live?
    pub fn is_live(&self, segment: u64) -> bool {
        self.live.contains_key(&segment)
    }

    /// The oldest segment with something live in it.
    pub fn oldest_live(&self) -> Option<u64> {
        self.live.keys().next().copied()
    }

    /// Receipted packets retained now.
    pub fn retained(&self) -> usize {
        self.retained.len()
    }

    /// Replays what queue recovery read back at `now_unix_us` (see the module notes), handing
    /// packets to queue, done ids and cursors to `shell`. Its answer counts for queued packets
    /// only: those the index took are booked live.
    pub fn replay(&mut self, recovered: &[Recovered], now_unix_us: u64, mut shell: impl FnMut(Replayed<'_>) -> bool) {
        let mut done: HashMap<&PacketId, (Outcome, u64)> = HashMap::default();
        for item in recovered {
            match &item.record {
                QueueRecord::Done { id, outcome, at_unix_us, .. } => {
                    done.insert(id, (*outcome, *at_unix_us));
                }
                QueueRecord::Cursor { node, log, offset } => {
                    shell(Replayed::Cursor { node, log, offset: *offset });
                }
                QueueRecord::Stored { .. } | QueueRecord::Skipped { .. } => {}
            }
        }
        let mut retained = Vec::new();
        for item in recovered {
            let QueueRecord::Stored { stored_unix_us, packet } = &item.record else { continue };
            let Some((outcome, at)) = done.get(&packet.id) else {
                if shell(Replayed::Queued { packet, location: item.location, stored_unix_us: *stored_unix_us }) {
                    self.stored(item.location.segment);
                }
                continue;
            };
            shell(Replayed::Done { id: &packet.id });
            let until = at.saturating_add(self.retain_us);
            if *outcome != Outcome::DeadLettered && self.retain_us > 0 && until > now_unix_us {
                self.stored(item.location.segment);
                retained.push((until, item.location.segment));
            }
        }
        retained.sort_unstable();
        self.retained.extend(retained);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddrV4;

    fn packet(seq: u64) -> Packet {
        Packet {
            id: PacketId { origin: NodeName::new("a").unwrap(), epoch: 1, seq },
            source: SocketAddrV4::new([10, 77, 0, 1].into(), 1000),
            destination: SocketAddrV4::new([10, 77, 0, 2].into(), 2000),
            sent_unix_us: 0,
            payload: vec![seq as u8],
        }
    }

    fn at(segment: u64, offset: u64) -> Location {
        Location { segment, offset, length: 10 }
    }

    fn stored(seq: u64, segment: u64) -> Recovered {
        Recovered { location: at(segment, seq), record: QueueRecord::Stored { stored_unix_us: 1, packet: packet(seq) } }
    }

    fn done(seq: u64, segment: u64, outcome: Outcome, at_unix_us: u64) -> Recovered {
        let record = QueueRecord::Done { id: packet(seq).id, outcome, at_unix_us, reason: String::new() };
        Recovered { location: at(segment, 100 + seq), record }
    }

    #[test]
    fn a_segment_lives_while_a_packet_is_queued_or_retained_in_it() {
        let mut book = Book::new(Duration::from_secs(10));
        book.stored(1);
        book.stored(1);
        book.stored(2);
        book.finished(1, Outcome::DeadLettered, 0);
        assert!(book.is_live(1), "one packet of segment 1 is still queued");
        book.finished(1, Outcome::Receipted, 5_000_000);
        book.expire(14_999_999);
        assert!(book.is_live(1), "retained until 15 s");
        book.expire(15_000_000);
        assert!(!book.is_live(1));
        assert_eq!(book.oldest_live(), Some(2));
    }

    #[test]
    fn replay_queues_what_is_not_done_and_retains_what_is_inside_retain() {
        let recovered = [
            stored(1, 1),
            stored(2, 1),
            stored(3, 2),
            stored(4, 2),
            done(2, 2, Outcome::Receipted, 95_000_000),
            done(3, 2, Outcome::Receipted, 50_000_000),
            done(4, 2, Outcome::DeadLettered, 95_000_000),
            Recovered {
                location: at(2, 300),
                record: QueueRecord::Cursor { node: NodeName::new("a").unwrap(), log: "l".into(), offset: 7 },
            },
        ];
        let mut book = Book::new(Duration::from_secs(10));
        let (mut queued, mut done_ids, mut cursors) = (Vec::new(), Vec::new(), Vec::new());
        book.replay(&recovered, 100_000_000, |replayed| match replayed {
            Replayed::Queued { packet, .. } => {
                queued.push(packet.id.seq);
                true
            }
            Replayed::Done { id } => {
                done_ids.push(id.seq);
                true
            }
            Replayed::Cursor { offset, .. } => {
                cursors.push(offset);
                true
            }
        });
        assert_eq!(queued, [1]);
        assert_eq!(done_ids, [2, 3, 4]);
        assert_eq!(cursors, [7]);
        // Packet 1 is queued (segment 1); 2 is retained until 105 s (segment 1); 3's time is up;
        // 4 was dead-lettered.
        assert_eq!(book.retained(), 1);
        assert!(book.is_live(1) && !book.is_live(2));
        book.finished(1, Outcome::DeadLettered, 0);
        assert!(book.is_live(1));
        book.expire(105_000_000);
        assert!(!book.is_live(1));
    }
}
