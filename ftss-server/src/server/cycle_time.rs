//! Where the main loop's time goes: the wall time of each step of the cycle, summed since the
//! start, with the number of cycles. status.json carries it as `cycle_time` and the metrics as
//! `ftss_cycle_seconds_total{step=…}` and `ftss_cycles_total`. Two looks a while apart give the
//! mean of each step per cycle over that while (the bench reports it for every ftss scenario).
//!
//! The steps, in the order a cycle takes them:
//! - `gather`: waiting for the fabric packets of senders that were just acked (see
//!   `Server::gather_fabric`; the wait ends when they came or at its deadline);
//! - `read`: planning the volume's reads, draining outboxes, logs and fabric connections, taking
//!   receipts, and appending their records to the queue;
//! - `deliver_early`: inbox files written before the sync (`Server::deliver_early`);
//! - `deliver`, in a cycle that waited for fabric senders and has something to store: the
//!   cycle's deliveries (inbox files, fabric frames, the gateway), made before its sync (see
//!   `Server::store`);
//! - `sync`: the group commit of the cycle's packets and receipts (the write of what was
//!   appended and the `fdatasync` of every mirror). The other syncs (dead letters, log cursors,
//!   gateway egress records) fall in the step they are part of; `ftss_sync_seconds` counts them
//!   all. One of those made by a delivery before the sync writes the group's records too, and
//!   leaves this step little to do;
//! - `complete`: after that sync: acks, the index, receipts applied, outbox files removed, and the
//!   bells rung for the acks;
//! - `deliver`, in the other cycles: the deliveries, after the sync;
//! - `other`: the rest of the cycle: volume events, the node registry, fabric admissions and
//!   port lists, a failed group's undoing, dead letters, ack files, reclaim, status;
//! - `idle`: between cycles, waiting for work (not part of a cycle).

use std::time::Instant;

use serde::Serialize;

/// A step of the cycle (see the module's notes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CycleStep {
    Gather,
    Read,
    DeliverEarly,
    Sync,
    Complete,
    Deliver,
    Other,
    Idle,
}

/// Every step, with its name in status.json and the metrics.
pub const STEPS: [(CycleStep, &str); 8] = [
    (CycleStep::Gather, "gather"),
    (CycleStep::Read, "read"),
    (CycleStep::DeliverEarly, "deliver_early"),
    (CycleStep::Sync, "sync"),
    (CycleStep::Complete, "complete"),
    (CycleStep::Deliver, "deliver"),
    (CycleStep::Other, "other"),
    (CycleStep::Idle, "idle"),
];

/// The running sums.
#[derive(Debug, Default)]
pub struct CycleClock {
    nanos: [u64; STEPS.len()],
    cycles: u64,
    /// When the current cycle began, and its time so far in named steps.
    cycle_started: Option<Instant>,
    named_this_cycle: u64,
}

impl CycleClock {
    /// Adds the time since `since` to `step`.
    pub fn add(&mut self, step: CycleStep, since: Instant) {
        let nanos = since.elapsed().as_nanos() as u64;
        self.nanos[step as usize] += nanos;
        if step != CycleStep::Idle && self.cycle_started.is_some() {
            self.named_this_cycle += nanos;
        }
    }

    pub fn begin_cycle(&mut self) {
        self.cycle_started = Some(Instant::now());
        self.named_this_cycle = 0;
    }

    /// Ends the cycle: what no step named is `other`.
    pub fn end_cycle(&mut self) {
        let Some(started) = self.cycle_started.take() else { return };
        let total = started.elapsed().as_nanos() as u64;
        self.nanos[CycleStep::Other as usize] += total.saturating_sub(self.named_this_cycle);
        self.cycles += 1;
    }

    pub fn report(&self) -> CycleTime {
        CycleTime {
            cycles: self.cycles,
            seconds: STEPS.iter().map(|(step, name)| (*name, self.nanos[*step as usize] as f64 / 1e9)).collect(),
        }
    }
}

/// `cycle_time` in status.json.
#[derive(Debug, Serialize)]
pub struct CycleTime {
    /// Cycles run since the start.
    pub cycles: u64,
    /// Seconds spent in each step since the start.
    pub seconds: std::collections::BTreeMap<&'static str, f64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_cycle_splits_into_its_named_steps_and_the_rest() {
        let mut clock = CycleClock::default();
        let outside = Instant::now();
        clock.begin_cycle();
        let sync = Instant::now();
        std::thread::sleep(Duration::from_millis(20));
        clock.add(CycleStep::Sync, sync);
        std::thread::sleep(Duration::from_millis(10));
        clock.end_cycle();
        let total = outside.elapsed().as_secs_f64();
        let idle = Instant::now();
        std::thread::sleep(Duration::from_millis(5));
        clock.add(CycleStep::Idle, idle);
        let report = clock.report();
        assert_eq!(report.cycles, 1);
        assert!(report.seconds["sync"] >= 0.020, "{report:?}");
        assert!(report.seconds["other"] >= 0.010, "{report:?}");
        // The rest is what the named steps left: together they are the cycle, no more.
        assert!(report.seconds["sync"] + report.seconds["other"] <= total, "{report:?} in {total} s");
        assert!(report.seconds["idle"] >= 0.005, "{report:?}");
        assert_eq!(report.seconds["gather"], 0.0);
        assert_eq!(report.seconds.len(), STEPS.len());
    }
}
