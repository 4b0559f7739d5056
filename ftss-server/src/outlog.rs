//! The server's side of nodes' outbox logs (`fsbridge::log`): which segments to read, where each
//! read starts, and what to do with a segment's end.
//!
//! The read position of every segment is committed in the queue (a `Cursor` record in the same
//! sync as the packets read), so after a crash reading resumes exactly after what was stored. The
//! cursors are written again into each new active queue segment before old segments are
//! reclaimed, so the latest cursor of every segment still on the volume always survives. (One
//! exception: the cursors of a queue group torn by a power loss in its sync are dropped at
//! recovery, and the segment is read again from the cursor before; see `queue::forget_cursors`.)
//!
//! One writer's segments are read in order: a later segment only once the earlier one is finished
//! and deleted, so packets keep their send order. A segment is finished when it is read to its
//! seal, or read to its end while a later segment of the same writer exists (a writer starts the
//! next segment only after its last write to the previous one, e.g. after a failed write whose
//! batch it then wrote again there), or read to its end and unchanged for the abandon time (its
//! writer died).

use fsbridge::hash::HashMap;
use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use crate::core::Time;
use crate::server::monotonic_now;

use fsbridge::log::{self, LogError, LogReader, Tail};
use fsbridge::{NodeName, Volume};

use crate::core::segment_end::{self, Decision, Facts, Later};

/// Most segments kept open; beyond, the least recently read are closed (and reopened as needed).
const OPEN_SEGMENTS_MAX: usize = 4096;
/// Most writers whose segments are taken from one node's log directory per cycle.
pub const SEGMENTS_LISTED_MAX: usize = 4096;

/// A segment: the node whose outbox holds it, and its name.
pub type SegmentKey = (NodeName, String);

/// A node's log directory: (segment to read, whether a later one of its writer exists) per
/// writer, and names that are not segment names.
pub type Listing = (Vec<(String, bool)>, Vec<String>);

/// What reading one segment gave this cycle.
pub enum Step {
    /// Frames (offset just past each, batch bytes), and whether the seal follows the last one.
    Frames { frames: Vec<(u64, Vec<u8>)>, sealed: bool },
    /// Damage from `from` to `to` (`None`: the rest of the file; the segment is then moved aside
    /// whole).
    Damaged { from: u64, to: Option<u64>, reason: String, bytes: Vec<u8> },
    /// The segment is finished (sealed and read, or abandoned and read): delete it.
    Finished,
    /// Nothing to do now.
    Idle,
}

struct Open {
    reader: LogReader,
    bad_since: Option<(u64, Time)>,
    used_at: Time,
}

/// How long a segment has been seen unchanged: its (mtime, length) when last looked at, since when
/// (by this server's monotonic clock) that has held, and the age its mtime claimed when the server
/// first saw it. Kept apart from the open file, so that closing it (more than `OPEN_SEGMENTS_MAX`
/// writers) does not start the count again.
struct Quiet {
    stamp: Option<(SystemTime, u64)>,
    since: Time,
    age_when_seen: Duration,
}

/// How long the segment read by `reader` has been unchanged, and how long this server has watched
/// it so. The mtime gives the age when the segment is first seen (so that after a restart an
/// abandoned segment is not kept for another abandon time); from then on only changes of mtime or
/// length this server saw count, timed by its monotonic clock.
fn unchanged_for(quiet: &mut HashMap<SegmentKey, Quiet>, key: &SegmentKey, reader: &LogReader) -> (Duration, Duration) {
    let stamp = reader.stamp();
    let now = monotonic_now();
    let entry = quiet.entry(key.clone()).or_insert_with(|| {
        let wall = fsbridge::disk::system_now();
        let age = stamp.map(|(modified, _)| wall.duration_since(modified).unwrap_or_default()).unwrap_or_default();
        Quiet { stamp, since: now, age_when_seen: age }
    });
    // An fstat that fails says nothing: it counts as a change (never as quiet).
    if stamp.is_none() || stamp != entry.stamp {
        *entry = Quiet { stamp, since: now, age_when_seen: Duration::ZERO };
    }
    let watched = now.duration_since(entry.since);
    (entry.age_when_seen + watched, watched)
}

impl Open {
    /// Damage from `from` to `to` (the bytes are kept only for a part; a whole rest of the file is
    /// moved aside as it is).
    fn damaged(&mut self, from: u64, to: Option<u64>, reason: String) -> Result<Step, LogError> {
        let bytes = match to {
            Some(to) => self.reader.bytes(from, to)?,
            None => Vec::new(),
        };
        self.bad_since = None;
        Ok(Step::Damaged { from, to, reason, bytes })
    }
}

/// Cursors and open segments.
#[derive(Default)]
pub struct Logs {
    cursors: HashMap<SegmentKey, u64>,
    open: HashMap<SegmentKey, Open>,
    quiet: HashMap<SegmentKey, Quiet>,
    /// The queue segment the cursors were last all written into.
    checkpointed_in: Option<u64>,
    /// Per node, the epoch the next listing of its log directory starts from (see `readable`).
    turn: HashMap<NodeName, u64>,
}

impl Logs {
    /// A cursor found by recovery (later ones replace earlier ones).
    pub fn recover(&mut self, node: NodeName, log: String, offset: u64) {
        self.cursors.insert((node, log), offset);
    }

    /// Where reading `key` starts: its committed cursor, or just past the header.
    pub fn position(&self, key: &SegmentKey) -> u64 {
        self.cursors.get(key).copied().unwrap_or(log::SEGMENT_HEADER_BYTES)
    }

    /// Frames up to `offset` of `key` are durable in the queue.
    pub fn commit(&mut self, key: SegmentKey, offset: u64) {
        let cursor = self.cursors.entry(key).or_insert(0);
        *cursor = (*cursor).max(offset);
    }

    /// The segment was deleted or moved aside: forget it.
    pub fn forget(&mut self, key: &SegmentKey) {
        self.cursors.remove(key);
        self.open.remove(key);
        self.quiet.remove(key);
    }

    /// Segments of `node` to read now: for each writer (epoch), its lowest segment, and whether a
    /// later one exists. Also the names that are not segment names (to quarantine). At most
    /// `SEGMENTS_LISTED_MAX` writers a cycle, taken in turn: each listing starts with the epochs
    /// after the last one served, so that a pile of lingering segments (dead writers waiting for
    /// the abandon time) cannot starve the writers whose epochs sort after theirs.
    pub fn readable(&mut self, volume: &Volume, node: &NodeName) -> Result<Listing, fsbridge::SpoolError> {
        let dir = volume.outbox(node).dir().join("log");
        let from = self.turn.get(node).copied().unwrap_or(0);
        // Per epoch: (lowest segment, its name, whether another exists); the smallest epochs at or
        // after `from`, and (for the wrap) the smallest before it, each bounded.
        let mut after: BTreeMap<u64, (u64, String, bool)> = BTreeMap::new();
        let mut before: BTreeMap<u64, (u64, String, bool)> = BTreeMap::new();
        let mut foreign = Vec::new();
        fsbridge::spool::visit_names(&dir, |name| {
            let Some((epoch, segment)) = log::parse_segment_name(&name) else {
                if !name.starts_with('.') && foreign.len() < SEGMENTS_LISTED_MAX {
                    foreign.push(name);
                }
                return;
            };
            let side = if epoch >= from { &mut after } else { &mut before };
            match side.get_mut(&epoch) {
                Some(lowest) => {
                    lowest.2 = true;
                    if segment < lowest.0 {
                        lowest.0 = segment;
                        lowest.1 = name;
                    }
                }
                None => {
                    side.insert(epoch, (segment, name, false));
                    if side.len() > SEGMENTS_LISTED_MAX {
                        side.pop_last();
                    }
                }
            }
        })?;
        let wrapped = SEGMENTS_LISTED_MAX.saturating_sub(after.len());
        let chosen: Vec<(u64, (u64, String, bool))> =
            after.into_iter().chain(before.into_iter().take(wrapped)).take(SEGMENTS_LISTED_MAX).collect();
        // The next listing starts after the last epoch served (from the start once all were).
        let next = match chosen.last() {
            Some((epoch, _)) if chosen.len() == SEGMENTS_LISTED_MAX => epoch.wrapping_add(1),
            _ => 0,
        };
        self.turn.insert(node.clone(), next);
        let readable = chosen.into_iter().map(|(_, (_, name, has_successor))| (name, has_successor)).collect();
        Ok((readable, foreign))
    }

    /// Reads `key` from its cursor, about `budget` bytes. `has_successor`: its writer has started
    /// a later segment. `abandon_after`: how long an unsealed segment read to its end must stay
    /// unchanged before it is taken for dead.
    pub fn step(
        &mut self,
        volume: &Volume,
        key: &SegmentKey,
        has_successor: bool,
        budget: usize,
        abandon_after: Duration,
    ) -> Result<Step, LogError> {
        let from = self.position(key);
        if !self.open.contains_key(key) {
            let path = volume.outbox(&key.0).dir().join("log").join(&key.1);
            let Some(reader) = LogReader::open(&path)? else {
                self.forget(key);
                return Ok(Step::Idle);
            };
            self.close_least_used();
            self.open.insert(key.clone(), Open { reader, bad_since: None, used_at: monotonic_now() });
        }
        let quiet = &mut self.quiet;
        let open = self.open.get_mut(key).expect("opened above");
        open.used_at = monotonic_now();
        let chunk = open.reader.read(from, budget)?;
        if !chunk.frames.is_empty() {
            open.bad_since = None;
            return Ok(Step::Frames { frames: chunk.frames, sealed: chunk.tail == Tail::Sealed });
        }
        let tail = match &chunk.tail {
            Tail::Sealed => segment_end::Tail::Sealed,
            Tail::Open => segment_end::Tail::Open,
            Tail::Bad(_) => segment_end::Tail::Bad,
        };
        let unchanged = unchanged_for(quiet, key, &open.reader);
        let abandoned = segment_end::abandoned(unchanged.0, unchanged.1, abandon_after, log::IDLE_ROTATE);
        let bad = match open.bad_since {
            Some((offset, since)) if offset == from => {
                segment_end::bad_state(Some(monotonic_now().duration_since(since)), unchanged.0)
            }
            _ => segment_end::bad_state(None, unchanged.0),
        };
        let mut facts = Facts { tail, has_successor, abandoned, bad, later: Later::Unknown };
        let mut to = None;
        loop {
            return match segment_end::decide(&facts).decision {
                Decision::Finished => Ok(Step::Finished),
                Decision::Idle => Ok(Step::Idle),
                Decision::WatchBad => {
                    open.bad_since = Some((from, monotonic_now()));
                    Ok(Step::Idle)
                }
                Decision::Look => {
                    to = open.reader.next_valid_frame(from)?;
                    facts.later = if to.is_some() { Later::Yes } else { Later::No };
                    continue;
                }
                Decision::Damage => {
                    let Tail::Bad(reason) = chunk.tail else { unreachable!("only bad bytes are damage") };
                    open.damaged(from, to, reason)
                }
            };
        }
    }

    fn close_least_used(&mut self) {
        if self.open.len() < OPEN_SEGMENTS_MAX {
            return;
        }
        if let Some(oldest) = self.open.iter().min_by_key(|(_, open)| open.used_at).map(|(key, _)| key.clone()) {
            self.open.remove(&oldest);
        }
    }

    /// The cursors to write into queue segment `active` before older segments are reclaimed, or
    /// `None` if they are there already. Cursors of segments no longer on the volume are dropped.
    pub fn checkpoint(&mut self, volume: &Volume, active: u64) -> Option<Vec<(NodeName, String, u64)>> {
        if self.checkpointed_in == Some(active) {
            return None;
        }
        // Only a segment that is certainly gone loses its cursor (not one an I/O error hides).
        let exists = |(node, name): &SegmentKey| {
            let path = volume.outbox(node).dir().join("log").join(name);
            !matches!(fsbridge::fsops::symlink_metadata(&path), Err(error) if error.kind() == std::io::ErrorKind::NotFound)
        };
        self.cursors.retain(|key, _| exists(key));
        // Segments this server stopped reading (another instance took the node, say).
        self.quiet.retain(|key, _| exists(key));
        Some(self.cursors.iter().map(|((node, name), offset)| (node.clone(), name.clone(), *offset)).collect())
    }

    /// The cursors returned by [`Logs::checkpoint`] are durable in `active`.
    pub fn checkpointed(&mut self, active: u64) {
        self.checkpointed_in = Some(active);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Item 10 of the durability audit: only the 4,096 smallest segment names of a node were
    /// listed, so with more lingering segments (dead writers waiting for the abandon time) a live
    /// writer whose epoch sorts after them was never read. Writers now take turns.
    #[test]
    fn more_lingering_segments_than_one_listing_takes_starve_no_writer() {
        let root = std::env::temp_dir().join(format!("ftss-outlog-{}-{}", std::process::id(), fsbridge::random_u64()));
        let volume = Volume::new(&root);
        let node = NodeName::new("a").unwrap();
        let dir = volume.outbox(&node).dir().join("log");
        std::fs::create_dir_all(&dir).unwrap();
        let name = |epoch: u64, segment: u64| format!("{epoch:016x}-{segment:016x}.log");
        for epoch in 1..=(SEGMENTS_LISTED_MAX as u64 + 500) {
            std::fs::write(dir.join(name(epoch, 1)), b"").unwrap();
        }
        let live = u64::MAX - 7;
        std::fs::write(dir.join(name(live, 3)), b"").unwrap();
        std::fs::write(dir.join(name(live, 4)), b"").unwrap();
        std::fs::write(dir.join("stray.txt"), b"").unwrap();
        let mut logs = Logs::default();
        let mut served = Vec::new();
        for _ in 0..2 {
            let (readable, foreign) = logs.readable(&volume, &node).unwrap();
            assert!(readable.len() <= SEGMENTS_LISTED_MAX);
            assert_eq!(foreign, vec!["stray.txt".to_string()]);
            served.extend(readable);
        }
        assert!(served.contains(&(name(live, 3), true)), "the live writer was never listed");
        assert!(served.contains(&(name(1, 1), false)) && served.contains(&(name(4596, 1), false)));
        std::fs::remove_dir_all(root).unwrap();
    }
}
