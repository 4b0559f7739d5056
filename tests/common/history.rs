//! A history checker for durability tests: what each sender was told, what each receiver process
//! got, and the verdict.
//!
//! Senders record every datagram whose send returned success, with the ack mode it was sent in.
//! Receivers record every datagram they got, tagged with the receiving process (its incarnation:
//! a pid, or any name that is different for each process lifetime). The checker then says:
//! - **lost**: acknowledged in `volume` or `guaranteed` mode and never received by anyone;
//! - **twice**: handed to one process more often than it was sent (a send that returned an error
//!   counts as an attempt that may have gone through);
//! - **again**: received by two different processes on the same port (a restarted receiver); legal
//!   without `FTSS_RECV=once`, counted and reported;
//! - **foreign**: received but never sent, i.e. a damaged payload.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

/// The ack mode a send returned under (what its success promised).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Ack {
    /// Returned before anything was durable: may be lost in a crash.
    Async,
    /// Durable on the volume when the send returned.
    Volume,
    /// Stored by the server (its ack) when the send returned.
    Guaranteed,
}

impl Ack {
    fn promises_delivery(self) -> bool {
        !matches!(self, Ack::Async)
    }
}

#[derive(Default, Clone)]
pub struct History {
    /// Payloads whose send returned success, with the mode.
    sent: BTreeMap<String, Ack>,
    /// Payloads whose send failed, and how often (retried or not): never required, and each failed
    /// attempt may still have gone through (a timeout), so it allows one more copy.
    failed: BTreeMap<String, usize>,
    /// (process, payload) in arrival order.
    received: Vec<(String, String)>,
}

impl History {
    pub fn new() -> History {
        History::default()
    }

    /// A send of `payload` returned success in mode `ack`.
    pub fn sent(&mut self, payload: impl Into<String>, ack: Ack) {
        self.sent.insert(payload.into(), ack);
    }

    /// A send of `payload` returned an error (the app may retry it; a success later counts). Like a
    /// timed-out write, a failed send may still have been carried: each one allows one more copy.
    pub fn send_failed(&mut self, payload: impl Into<String>) {
        *self.failed.entry(payload.into()).or_default() += 1;
    }

    /// Process `process` got `payload`.
    pub fn received(&mut self, process: impl Into<String>, payload: impl Into<String>) {
        self.received.push((process.into(), payload.into()));
    }

    pub fn check(&self) -> Verdict {
        let mut per_process: HashMap<(&str, &str), usize> = HashMap::new();
        let mut processes_per_payload: HashMap<&str, BTreeSet<&str>> = HashMap::new();
        let mut foreign = Vec::new();
        for (process, payload) in &self.received {
            *per_process.entry((process, payload)).or_default() += 1;
            processes_per_payload.entry(payload).or_default().insert(process);
            if !self.sent.contains_key(payload.as_str()) && !self.failed.contains_key(payload.as_str()) {
                foreign.push(payload.clone());
            }
        }
        let attempts = |payload: &str| {
            usize::from(self.sent.contains_key(payload)) + self.failed.get(payload).copied().unwrap_or(0)
        };
        let mut twice: Vec<String> = per_process
            .iter()
            .filter(|((_, payload), count)| **count > attempts(payload).max(1))
            .map(|((process, payload), count)| format!("{payload} ×{count} in {process}"))
            .collect();
        twice.sort();
        let lost: Vec<String> = self
            .sent
            .iter()
            .filter(|(payload, ack)| ack.promises_delivery() && !processes_per_payload.contains_key(payload.as_str()))
            .map(|(payload, _)| payload.clone())
            .collect();
        let again = processes_per_payload.values().filter(|processes| processes.len() > 1).count();
        let processes: BTreeSet<&str> = self.received.iter().map(|(process, _)| process.as_str()).collect();
        Verdict {
            acked: self.sent.values().filter(|ack| ack.promises_delivery()).count(),
            received: self.received.len(),
            processes: processes.len(),
            lost,
            twice,
            again,
            foreign,
        }
    }
}

/// What [`History::check`] found.
pub struct Verdict {
    pub acked: usize,
    pub received: usize,
    pub processes: usize,
    pub lost: Vec<String>,
    pub twice: Vec<String>,
    /// Payloads received by more than one process (receiver restarts).
    pub again: usize,
    pub foreign: Vec<String>,
}

impl Verdict {
    pub fn ok(&self) -> bool {
        self.lost.is_empty() && self.twice.is_empty() && self.foreign.is_empty()
    }

    /// Panics with the verdict unless nothing acked was lost, nothing reached one process twice and
    /// every payload is one that was sent.
    pub fn assert_ok(&self, what: &str) {
        assert!(self.ok(), "{what}: {self}");
        eprintln!("{what}: {self}");
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let some = |list: &[String]| list.iter().take(10).cloned().collect::<Vec<_>>().join(", ");
        write!(
            f,
            "{} acked sends, {} datagrams received by {} processes; lost {} [{}]; twice to one process {} [{}]; \
             in more than one process (restarts, shared ports) {}; damaged or never sent {} [{}]",
            self.acked,
            self.received,
            self.processes,
            self.lost.len(),
            some(&self.lost),
            self.twice.len(),
            some(&self.twice),
            self.again,
            self.foreign.len(),
            some(&self.foreign),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checker_finds_each_kind_of_violation() {
        let mut history = History::new();
        history.sent("a-0", Ack::Volume);
        history.sent("a-1", Ack::Guaranteed);
        history.sent("a-2", Ack::Async);
        history.send_failed("a-3");
        history.sent("a-4", Ack::Volume);
        history.send_failed("a-4");
        history.received("p1", "a-4");
        history.received("p1", "a-4");
        history.received("p1", "a-0");
        history.received("p2", "a-0");
        history.received("p2", "a-1");
        history.received("p1", "a-3");
        let verdict = history.check();
        assert!(verdict.ok(), "{verdict}");
        assert_eq!(verdict.again, 1);

        history.received("p2", "a-0");
        history.received("p2", "a-9");
        history.received("p1", "a-4");
        let verdict = history.check();
        assert_eq!(verdict.twice, vec!["a-0 ×2 in p2".to_string(), "a-4 ×3 in p1".to_string()]);
        assert_eq!(verdict.foreign, vec!["a-9".to_string()]);

        let mut history = History::new();
        history.sent("b-0", Ack::Volume);
        assert_eq!(history.check().lost, vec!["b-0".to_string()]);
    }
}
