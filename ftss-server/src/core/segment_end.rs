//! What the server does where the frames of a node's outbox-log segment stop: the outbox-log
//! rules, as a table ([`RULES`]) that [`decide`] walks (the first row that matches wins).
//!
//! The shell (`outlog`) reads the segment and gathers the [`Facts`]; looking for a valid frame
//! further on reads the rest of the file, so it is done only when a row asks for it
//! ([`Decision::Look`]), and the facts are decided again with the answer.

use std::time::Duration;

/// How long a frame that stays invalid is taken for a write in progress before it is damage.
pub const BAD_FRAME_GRACE: Duration = Duration::from_secs(10);

/// What follows the last whole frame read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tail {
    /// The writer's seal: the segment is complete.
    Sealed,
    /// The end of the file (the writer may append more).
    Open,
    /// Bytes that are not a valid frame.
    Bad,
}

/// How long a bad frame at the read position has been seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bad {
    /// Just now, for the first time at this position.
    FirstSeen,
    /// For less than [`BAD_FRAME_GRACE`], or the file changed within it (a frame being written).
    WithinGrace,
    /// For [`BAD_FRAME_GRACE`] or longer, and the file unchanged as long.
    PastGrace,
}

/// Whether a valid frame follows the bad bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Later {
    Unknown,
    Yes,
    No,
}

/// What is known about a segment read to where its frames stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Facts {
    pub tail: Tail,
    /// The segment's writer has started a later segment (it writes this one no more).
    pub has_successor: bool,
    /// The segment is abandoned (see [`abandoned`]).
    pub abandoned: bool,
    /// For a bad tail; ignored otherwise.
    pub bad: Bad,
    /// For a bad tail; ignored otherwise.
    pub later: Later,
}

/// What the shell does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// The segment is finished: delete it (its cursor goes with it).
    Finished,
    /// Nothing now; read again next cycle.
    Idle,
    /// Note when the bad frame at this position was first seen, then as `Idle`.
    WatchBad,
    /// Look for a valid frame after the bad bytes, then decide again.
    Look,
    /// The bad bytes are damage: quarantine them up to the next valid frame (the whole rest of
    /// the file when there is none) and read on from there.
    Damage,
}

/// One rule: the facts it matches (`None`: any) and its decision.
#[derive(Clone, Copy, Debug)]
pub struct Row {
    pub tail: Tail,
    pub has_successor: Option<bool>,
    pub abandoned: Option<bool>,
    pub bad: Option<Bad>,
    pub later: Option<Later>,
    pub decision: Decision,
    pub why: &'static str,
}

const fn row(
    tail: Tail,
    has_successor: Option<bool>,
    abandoned: Option<bool>,
    bad: Option<Bad>,
    later: Option<Later>,
    decision: Decision,
    why: &'static str,
) -> Row {
    Row { tail, has_successor, abandoned, bad, later, decision, why }
}

use Bad::*;
use Decision::*;
use Later::{No, Unknown, Yes};
use Tail::{Open, Sealed};

/// The outbox-log rules, in order.
pub static RULES: &[Row] = &[
    row(Sealed, None, None, None, None, Finished, "read to its seal: complete"),
    row(Open, Some(true), None, None, None, Finished, "read to its end and its writer moved on to a later segment"),
    row(Open, None, Some(true), None, None, Finished, "read to its end and abandoned: its writer died"),
    row(Open, None, None, None, None, Idle, "read to its end: its writer may append more"),
    row(Tail::Bad, Some(true), None, None, Some(Unknown), Look, "its writer moved on: where do the bad bytes end?"),
    row(
        Tail::Bad,
        Some(true),
        None,
        None,
        None,
        Damage,
        "its writer moved on: bad bytes are damage or a failed write's end",
    ),
    row(Tail::Bad, None, None, Some(FirstSeen), None, WatchBad, "a frame may be being written: start the grace"),
    row(Tail::Bad, None, None, Some(WithinGrace), None, Idle, "within the grace: a frame may be being written"),
    row(
        Tail::Bad,
        None,
        None,
        Some(PastGrace),
        Some(Unknown),
        Look,
        "past the grace: is there a valid frame further on?",
    ),
    row(Tail::Bad, None, None, Some(PastGrace), Some(Yes), Damage, "past the grace, and valid frames follow: damage"),
    row(
        Tail::Bad,
        None,
        Some(true),
        Some(PastGrace),
        Some(No),
        Damage,
        "past the grace, nothing valid follows, abandoned: the rest is damage",
    ),
    row(
        Tail::Bad,
        None,
        Some(false),
        Some(PastGrace),
        Some(No),
        Idle,
        "past the grace, nothing valid follows: its writer may still write it",
    ),
];

impl Row {
    fn matches(&self, facts: &Facts) -> bool {
        let bad = facts.tail == Tail::Bad;
        self.tail == facts.tail
            && self.has_successor.is_none_or(|want| want == facts.has_successor)
            && self.abandoned.is_none_or(|want| want == facts.abandoned)
            && self.bad.is_none_or(|want| bad && want == facts.bad)
            && self.later.is_none_or(|want| bad && want == facts.later)
    }
}

/// The first rule that matches `facts`.
pub fn decide(facts: &Facts) -> &'static Row {
    RULES.iter().find(|row| row.matches(facts)).expect("the last rules for each tail match anything left")
}

/// How long a bad frame has been seen (`None`: first time at this position), given how long the
/// file has been unchanged.
pub fn bad_state(seen_for: Option<Duration>, unchanged_for: Duration) -> Bad {
    match seen_for {
        None => FirstSeen,
        Some(seen) if seen < BAD_FRAME_GRACE || unchanged_for < BAD_FRAME_GRACE => WithinGrace,
        Some(_) => PastGrace,
    }
}

/// Is a segment abandoned: unchanged for `abandon_after` (`age`: counted from its mtime when this
/// server first saw it), and watched unchanged by this server (`watched`, by its monotonic clock)
/// for longer than a writer may stay idle and still append (`idle_rotate`)? The second part makes
/// a step of the wall clock harmless whatever the mtime says: a live writer has appended by then,
/// or started a new segment.
pub fn abandoned(age: Duration, watched: Duration, abandon_after: Duration, idle_rotate: Duration) -> bool {
    age >= abandon_after && watched >= idle_rotate
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(tail: Tail, has_successor: bool, abandoned: bool, bad: Bad, later: Later) -> Facts {
        Facts { tail, has_successor, abandoned, bad, later }
    }

    /// Each row of the table, with facts it (and no earlier row) decides.
    #[test]
    fn every_rule_decides_its_case() {
        let cases: [(Facts, usize); 12] = [
            (facts(Sealed, false, false, FirstSeen, Unknown), 0),
            (facts(Open, true, false, FirstSeen, Unknown), 1),
            (facts(Open, false, true, FirstSeen, Unknown), 2),
            (facts(Open, false, false, FirstSeen, Unknown), 3),
            (facts(Tail::Bad, true, false, FirstSeen, Unknown), 4),
            (facts(Tail::Bad, true, false, FirstSeen, No), 5),
            (facts(Tail::Bad, false, true, FirstSeen, Unknown), 6),
            (facts(Tail::Bad, false, true, WithinGrace, Unknown), 7),
            (facts(Tail::Bad, false, false, PastGrace, Unknown), 8),
            (facts(Tail::Bad, false, false, PastGrace, Yes), 9),
            (facts(Tail::Bad, false, true, PastGrace, No), 10),
            (facts(Tail::Bad, false, false, PastGrace, No), 11),
        ];
        assert_eq!(cases.len(), RULES.len(), "a case for every row");
        for (facts, index) in cases {
            let chosen = decide(&facts);
            assert!(
                std::ptr::eq(chosen, &RULES[index]),
                "{facts:?} should be row {index} ({}), was: {}",
                RULES[index].why,
                chosen.why
            );
        }
    }

    /// Every combination of facts has a rule, and a sealed or an open tail never looks for frames
    /// or quarantines anything (only bad bytes are damage).
    #[test]
    fn every_combination_is_decided_and_only_bad_bytes_are_damage() {
        for tail in [Sealed, Open, Tail::Bad] {
            for has_successor in [false, true] {
                for abandoned in [false, true] {
                    for bad in [FirstSeen, WithinGrace, PastGrace] {
                        for later in [Unknown, Yes, No] {
                            let facts = facts(tail, has_successor, abandoned, bad, later);
                            let decision = decide(&facts).decision;
                            if tail != Tail::Bad {
                                assert!(!matches!(decision, Damage | Look | WatchBad), "{facts:?}: {decision:?}");
                            }
                            if later != Unknown {
                                assert_ne!(decision, Look, "{facts:?} looked again");
                            }
                        }
                    }
                }
            }
        }
    }

    /// The grace counts both how long the bad frame was seen and how long the file stayed
    /// unchanged; abandonment needs both the age and this server's own watch.
    #[test]
    fn the_grace_and_the_abandon_rule() {
        let grace = BAD_FRAME_GRACE;
        let second = Duration::from_secs(1);
        assert_eq!(bad_state(None, grace * 5), FirstSeen);
        assert_eq!(bad_state(Some(grace - second), grace * 5), WithinGrace);
        assert_eq!(bad_state(Some(grace * 5), grace - second), WithinGrace, "the file changed within the grace");
        assert_eq!(bad_state(Some(grace), grace), PastGrace);
        let (hour, idle) = (Duration::from_secs(3600), Duration::from_secs(30));
        assert!(abandoned(hour, idle, hour, idle));
        assert!(!abandoned(hour - second, idle, hour, idle), "too young");
        assert!(
            !abandoned(hour * 10, idle - second, hour, idle),
            "an old mtime, but watched too briefly (a clock step)"
        );
    }
}
