//! One measured (or skipped) scenario run, and how it is printed: a JSON line and a table row.

use serde_json::{Map, Value, json};

/// The result of one scenario at one payload size and sender count.
pub struct Measurement {
    pub scenario: &'static str,
    pub payload: usize,
    pub senders: usize,
    /// Datagrams (or syncs, or files) that completed.
    pub packets: u64,
    pub pps: Option<f64>,
    pub p50_us: Option<u64>,
    pub p99_us: Option<u64>,
    /// Peak resident set of the app processes (for brokers/servers see `extra`).
    pub max_rss_kib: Option<u64>,
    /// Does a completed packet survive a crash of the machine?
    pub durable: bool,
    /// Scenario-specific fields (send/ack latency, server RSS, losses).
    pub extra: Vec<(&'static str, Value)>,
    /// Why the scenario did not run.
    pub skipped: Option<String>,
}

impl Measurement {
    pub fn new(scenario: &'static str, payload: usize, senders: usize, durable: bool) -> Measurement {
        Measurement {
            scenario,
            payload,
            senders,
            packets: 0,
            pps: None,
            p50_us: None,
            p99_us: None,
            max_rss_kib: None,
            durable,
            extra: Vec::new(),
            skipped: None,
        }
    }

    pub fn skipped(scenario: &'static str, payload: usize, senders: usize, durable: bool, why: &str) -> Measurement {
        let mut measurement = Measurement::new(scenario, payload, senders, durable);
        measurement.skipped = Some(why.to_owned());
        measurement
    }

    pub fn extra(&self, name: &str) -> Option<&Value> {
        self.extra.iter().find(|(key, _)| *key == name).map(|(_, value)| value)
    }

    pub fn to_json(&self) -> Value {
        let mut object = Map::new();
        object.insert("scenario".into(), json!(self.scenario));
        object.insert("payload".into(), json!(self.payload));
        object.insert("senders".into(), json!(self.senders));
        object.insert("packets".into(), json!(self.packets));
        object.insert("pps".into(), json!(self.pps.map(|pps| (pps * 10.0).round() / 10.0)));
        object.insert("p50_us".into(), json!(self.p50_us));
        object.insert("p99_us".into(), json!(self.p99_us));
        object.insert("max_rss_kib".into(), json!(self.max_rss_kib));
        object.insert("durable".into(), json!(self.durable));
        for (key, value) in &self.extra {
            object.insert((*key).into(), value.clone());
        }
        if let Some(why) = &self.skipped {
            object.insert("skipped".into(), json!(why));
        }
        Value::Object(object)
    }
}

fn cell(value: Option<u64>) -> String {
    value.map_or("-".into(), |value| value.to_string())
}

pub const TABLE_HEADER: &str =
    "scenario              payload senders   packets        pps    p50_us    p99_us  rss_kib durable  notes";

/// One table row.
pub fn table_row(measurement: &Measurement) -> String {
    let notes = match &measurement.skipped {
        Some(why) => format!("skipped: {why}"),
        None => measurement
            .extra
            .iter()
            .filter(|(key, _)| !key.ends_with("_ns"))
            .map(|(key, value)| format!("{key}={value}"))
            .collect::<Vec<_>>()
            .join(" "),
    };
    format!(
        "{:<21} {:>7} {:>7} {:>9} {:>10} {:>9} {:>9} {:>8} {:<7}  {notes}",
        measurement.scenario,
        measurement.payload,
        measurement.senders,
        measurement.packets,
        measurement.pps.map_or("-".into(), |pps| format!("{pps:.0}")),
        cell(measurement.p50_us),
        cell(measurement.p99_us),
        cell(measurement.max_rss_kib),
        if measurement.durable { "yes" } else { "no" },
    )
}

/// The value at `fraction` (0..=1) of sorted samples.
pub fn percentile(sorted: &[u32], fraction: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let index = ((sorted.len() - 1) as f64 * fraction).round() as usize;
    Some(u64::from(sorted[index]))
}
