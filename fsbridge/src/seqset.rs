//! Which packet ids have been seen, kept as ranges of sequence numbers per sender epoch.
//!
//! A sender numbers its packets 1, 2, 3… within its epoch, and they arrive mostly in order, so the
//! ids seen of one epoch are a handful of ranges however many there are: a receiver (or the
//! server) can remember every id it has seen for as long as the sender lives, in a few bytes, where
//! a window of the last N ids is outrun within seconds at high rates. Both dimensions are bounded:
//! at most `epochs_max` epochs (the least recently used goes first) and `ranges_max` ranges per
//! epoch (the lowest goes first). Forgetting can only let a duplicate through, never drop a packet.

use crate::hash::HashMap;
use std::collections::BTreeMap;
use std::hash::Hash;

/// Sequence numbers as disjoint ranges `start..end`, keyed by start.
#[derive(Clone, Debug, Default)]
pub struct SeqRanges {
    ranges: BTreeMap<u64, u64>,
}

impl SeqRanges {
    pub fn contains(&self, seq: u64) -> bool {
        self.ranges.range(..=seq).next_back().is_some_and(|(_, end)| seq < *end)
    }

    /// Adds `seq`; false if it was there already.
    pub fn insert(&mut self, seq: u64) -> bool {
        if self.contains(seq) {
            return false;
        }
        let end = seq.saturating_add(1);
        let before = self.ranges.range(..seq).next_back().filter(|(_, end)| **end == seq).map(|(start, _)| *start);
        let after = self.ranges.get(&end).copied();
        match (before, after) {
            (Some(start), Some(after_end)) => {
                self.ranges.remove(&end);
                self.ranges.insert(start, after_end);
            }
            (Some(start), None) => {
                self.ranges.insert(start, end);
            }
            (None, Some(after_end)) => {
                self.ranges.remove(&end);
                self.ranges.insert(seq, after_end);
            }
            (None, None) => {
                self.ranges.insert(seq, end);
            }
        }
        true
    }

    /// Adds every sequence number in `start..end` (merging with the ranges it touches).
    pub fn insert_range(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let (mut start, mut end) = (start, end);
        // The range that begins at or before `start` and reaches it, then every range beginning
        // inside `start..=end`: all merge into one.
        if let Some((&first, &first_end)) = self.ranges.range(..=start).next_back()
            && first_end >= start
        {
            start = first;
            end = end.max(first_end);
        }
        let touching: Vec<(u64, u64)> = self.ranges.range(start..=end).map(|(s, e)| (*s, *e)).collect();
        for (touching_start, touching_end) in touching {
            self.ranges.remove(&touching_start);
            end = end.max(touching_end);
        }
        self.ranges.insert(start, end);
    }

    /// The ranges `start..end`, lowest first.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.ranges.iter().map(|(start, end)| (*start, *end))
    }

    pub fn range_count(&self) -> usize {
        self.ranges.len()
    }

    fn drop_lowest(&mut self) {
        if let Some((&start, _)) = self.ranges.iter().next() {
            self.ranges.remove(&start);
        }
    }
}

/// Seen ids per sender epoch (`K` names one), bounded as the module says.
pub struct SeenIds<K> {
    epochs: HashMap<K, (SeqRanges, u64)>,
    epochs_max: usize,
    ranges_max: usize,
    clock: u64,
}

impl<K: Hash + Eq + Copy> SeenIds<K> {
    pub fn new(epochs_max: usize, ranges_max: usize) -> SeenIds<K> {
        SeenIds { epochs: HashMap::default(), epochs_max: epochs_max.max(1), ranges_max: ranges_max.max(1), clock: 0 }
    }

    pub fn contains(&self, epoch: K, seq: u64) -> bool {
        self.epochs.get(&epoch).is_some_and(|(ranges, _)| ranges.contains(seq))
    }

    /// Records `seq` of `epoch`; false if it was known already.
    pub fn insert(&mut self, epoch: K, seq: u64) -> bool {
        self.clock += 1;
        let clock = self.clock;
        if !self.epochs.contains_key(&epoch) && self.epochs.len() >= self.epochs_max {
            self.forget_least_recent();
        }
        let (ranges, used) = self.epochs.entry(epoch).or_default();
        *used = clock;
        let new = ranges.insert(seq);
        if ranges.range_count() > self.ranges_max {
            ranges.drop_lowest();
        }
        new
    }

    /// Records every sequence number in `start..end` of `epoch`.
    pub fn insert_range(&mut self, epoch: K, start: u64, end: u64) {
        self.clock += 1;
        let clock = self.clock;
        if !self.epochs.contains_key(&epoch) && self.epochs.len() >= self.epochs_max {
            self.forget_least_recent();
        }
        let (ranges, used) = self.epochs.entry(epoch).or_default();
        *used = clock;
        ranges.insert_range(start, end);
        while ranges.range_count() > self.ranges_max {
            ranges.drop_lowest();
        }
    }

    /// Every remembered range as (epoch, start, end).
    pub fn ranges(&self) -> impl Iterator<Item = (K, u64, u64)> + '_ {
        self.epochs.iter().flat_map(|(epoch, (ranges, _))| ranges.iter().map(|(start, end)| (*epoch, start, end)))
    }

    /// How many epochs are remembered.
    pub fn epoch_count(&self) -> usize {
        self.epochs.len()
    }

    /// Drops the least recently used eighth of the epochs (at least one), so that eviction costs
    /// one scan per many insertions.
    fn forget_least_recent(&mut self) {
        let mut uses: Vec<u64> = self.epochs.values().map(|(_, used)| *used).collect();
        let drop = (uses.len() / 8).max(1);
        uses.select_nth_unstable(drop - 1);
        let cutoff = uses[drop - 1];
        self.epochs.retain(|_, (_, used)| *used > cutoff);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_sequences_stay_one_range() {
        let mut ranges = SeqRanges::default();
        for seq in 1..=100_000 {
            assert!(ranges.insert(seq));
        }
        assert_eq!(ranges.range_count(), 1);
        assert!(ranges.contains(1) && ranges.contains(100_000) && !ranges.contains(100_001) && !ranges.contains(0));
        assert!(!ranges.insert(500));
    }

    #[test]
    fn gaps_are_kept_and_closed() {
        let mut ranges = SeqRanges::default();
        for seq in [5, 7, 9, 6, 8, 1] {
            assert!(ranges.insert(seq));
        }
        assert_eq!(ranges.range_count(), 2);
        assert!(!ranges.contains(2) && !ranges.contains(4) && ranges.contains(7) && !ranges.contains(10));
        for seq in 2..=4 {
            ranges.insert(seq);
        }
        assert_eq!(ranges.range_count(), 1);
    }

    #[test]
    fn inserted_ranges_merge_with_what_they_touch() {
        let mut ranges = SeqRanges::default();
        for seq in [1, 2, 10, 20, 21, 40] {
            ranges.insert(seq);
        }
        ranges.insert_range(3, 11);
        assert_eq!(ranges.iter().collect::<Vec<_>>(), vec![(1, 11), (20, 22), (40, 41)]);
        ranges.insert_range(15, 45);
        assert_eq!(ranges.iter().collect::<Vec<_>>(), vec![(1, 11), (15, 45)]);
        ranges.insert_range(11, 15);
        assert_eq!(ranges.iter().collect::<Vec<_>>(), vec![(1, 45)]);
        ranges.insert_range(50, 50);
        assert_eq!(ranges.range_count(), 1);
        let mut seen: SeenIds<u8> = SeenIds::new(4, 2);
        seen.insert_range(1, 0, 5);
        seen.insert_range(1, 10, 12);
        seen.insert_range(1, 20, 30);
        assert!(!seen.contains(1, 3) && seen.contains(1, 11) && seen.contains(1, 29), "the lowest range goes");
        assert_eq!(seen.ranges().count(), 2);
    }

    #[test]
    fn epochs_and_ranges_are_bounded_and_forgetting_only_forgets() {
        let mut seen: SeenIds<u32> = SeenIds::new(16, 4);
        for epoch in 0..64u32 {
            seen.insert(epoch, 1);
        }
        assert!(seen.epoch_count() <= 16);
        assert!(seen.contains(63, 1) && !seen.contains(0, 1));
        for seq in (0..20).map(|n| n * 2) {
            seen.insert(63, seq);
        }
        assert!(seen.contains(63, 38) && !seen.contains(63, 0), "the lowest ranges go first");
        assert!(!seen.contains(63, 39));
    }
}
