//! `--metrics ADDR`: Prometheus text exposition over HTTP (GET /metrics), served by one thread from
//! a snapshot the server loop renders every status interval.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

/// Bytes of a request head read at most; anything longer is refused.
const REQUEST_HEAD_BYTES_MAX: usize = 8192;

/// The latest rendered exposition, shared with the HTTP thread.
#[derive(Clone, Default)]
pub struct Snapshot(Arc<Mutex<String>>);

impl Snapshot {
    pub fn set(&self, text: String) {
        *self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = text;
    }

    fn get(&self) -> String {
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }
}

/// Binds `addr` and serves the snapshot from a background thread.
pub fn serve(addr: SocketAddr, snapshot: Snapshot) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr)?;
    std::thread::Builder::new().name("ftss-metrics".into()).spawn(move || {
        for stream in listener.incoming().flatten() {
            let _ = answer(stream, &snapshot);
        }
    })?;
    Ok(())
}

fn answer(stream: TcpStream, snapshot: &Snapshot) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut head_bytes = request_line.len();
    loop {
        let mut line = String::new();
        let read = reader.read_line(&mut line)?;
        head_bytes += read;
        if read == 0 || line == "\r\n" || line == "\n" || head_bytes > REQUEST_HEAD_BYTES_MAX {
            break;
        }
    }
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, body, content_type) = match (method, path) {
        ("GET", "/metrics") => ("200 OK", snapshot.get(), "text/plain; version=0.0.4; charset=utf-8"),
        ("GET", _) => ("404 Not Found", "try /metrics\n".to_owned(), "text/plain"),
        _ => ("405 Method Not Allowed", String::new(), "text/plain"),
    };
    let mut stream = stream;
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// Sync latency histogram bucket bounds, in seconds.
pub const SYNC_BUCKETS: [f64; 10] = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1.0];

/// A latency histogram in the Prometheus sense (cumulative buckets, sum, count).
#[derive(Clone, Debug, Default)]
pub struct Histogram {
    counts: [u64; SYNC_BUCKETS.len()],
    sum_seconds: f64,
    count: u64,
}

impl Histogram {
    pub fn observe(&mut self, seconds: f64) {
        for (index, bound) in SYNC_BUCKETS.iter().enumerate() {
            if seconds <= *bound {
                self.counts[index] += 1;
            }
        }
        self.sum_seconds += seconds;
        self.count += 1;
    }
}

/// Renders the status document (as `status --json` shows it) and the sync histogram.
pub fn render(status: &Value, sync: &Histogram) -> String {
    let mut out = Exposition::default();
    out.counters(status);
    out.queue(status);
    out.nodes(status);
    out.cycle_time(status);
    out.histogram(sync);
    out.text
}

/// Prometheus text being written.
#[derive(Default)]
struct Exposition {
    text: String,
}

fn number(value: &Value) -> f64 {
    value.as_f64().unwrap_or(0.0)
}

fn flag(value: &Value) -> f64 {
    if *value == true { 1.0 } else { 0.0 }
}

impl Exposition {
    fn metric(&mut self, name: &str, kind: &str, help: &str, samples: Vec<(String, f64)>) {
        self.text.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        for (labels, value) in samples {
            self.text.push_str(&format!("{name}{labels} {value}\n"));
        }
    }

    /// A metric with one sample and no labels.
    fn single(&mut self, name: &str, kind: &str, help: &str, value: f64) {
        self.metric(name, kind, help, vec![(String::new(), value)]);
    }

    /// The server's counters and the gateway's.
    fn counters(&mut self, status: &Value) {
        if let Some(counters) = status["counters"].as_object() {
            for (name, value) in counters {
                let help = format!("Packets or events counted as {name}.");
                self.single(&format!("ftss_{name}_total"), "counter", &help, number(value));
            }
        }
        if let Some(counters) = status["gateway"]["counters"].as_object() {
            for (name, value) in counters {
                let kind = if name == "nat_sockets" { "gauge" } else { "counter" };
                let suffix = if kind == "counter" { "_total" } else { "" };
                self.single(&format!("ftss_gateway_{name}{suffix}"), kind, &format!("Gateway {name}."), number(value));
            }
        }
    }

    /// The queue, its mirrors and the server's state.
    fn queue(&mut self, status: &Value) {
        let queue = &status["queue"];
        self.single(
            "ftss_queue_packets",
            "gauge",
            "Packets in the queue (not yet receipted).",
            number(&queue["packets"]),
        );
        self.single(
            "ftss_queue_retained_packets",
            "gauge",
            "Receipted packets kept for --retain.",
            number(&queue["retained"]),
        );
        self.single("ftss_queue_bytes", "gauge", "Bytes of queue segments (one mirror).", number(&queue["bytes"]));
        self.single(
            "ftss_queue_unknown_destination_packets",
            "gauge",
            "Packets held for unregistered fabric addresses.",
            number(&queue["held_unknown_destination"]),
        );
        let mirrors: Vec<(String, f64)> = queue["mirrors"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|mirror| {
                (format!("{{dir=\"{}\"}}", escape(mirror["dir"].as_str().unwrap_or(""))), flag(&mirror["healthy"]))
            })
            .collect();
        self.metric("ftss_mirror_healthy", "gauge", "1 if the queue mirror is healthy.", mirrors);
        self.single("ftss_degraded", "gauge", "1 if a queue mirror has failed.", flag(&status["degraded"]));
        self.single(
            "ftss_backpressure",
            "gauge",
            "1 while some outboxes are not drained (full disk, destination over its limit).",
            flag(&status["backpressure"]["active"]),
        );
    }

    /// Per node: queued packets and bytes, in flight, the oldest's age.
    fn nodes(&mut self, status: &Value) {
        let mut depth = Vec::new();
        let mut bytes = Vec::new();
        let mut oldest = Vec::new();
        let mut in_flight = Vec::new();
        let mut ip = Vec::new();
        if let Some(nodes) = status["nodes"].as_object() {
            for (name, node) in nodes {
                let labels = format!("{{node=\"{}\"}}", escape(name));
                if !node["ip"].is_null() {
                    for outcome in ["sent", "delivered"] {
                        let labels = format!("{{node=\"{}\",outcome=\"{outcome}\"}}", escape(name));
                        ip.push((labels, number(&node["ip"][outcome])));
                    }
                    for (reason, count) in node["ip"]["refused"].as_object().into_iter().flatten() {
                        let labels =
                            format!("{{node=\"{}\",outcome=\"refused\",reason=\"{}\"}}", escape(name), escape(reason));
                        ip.push((labels, number(count)));
                    }
                }
                depth.push((labels.clone(), number(&node["queued"])));
                bytes.push((labels.clone(), number(&node["queued_bytes"])));
                in_flight.push((labels.clone(), number(&node["in_flight"])));
                oldest.push((labels, number(&node["oldest_age_ms"]) / 1000.0));
            }
        }
        self.metric("ftss_node_queued_packets", "gauge", "Packets queued for the node.", depth);
        self.metric("ftss_node_queued_bytes", "gauge", "Payload bytes queued for the node.", bytes);
        self.metric(
            "ftss_node_in_flight_packets",
            "gauge",
            "Packets delivered to the node and not yet receipted.",
            in_flight,
        );
        self.metric("ftss_node_oldest_age_seconds", "gauge", "Age of the oldest packet queued for the node.", oldest);
        self.metric(
            "ftss_node_ip_packets_total",
            "counter",
            "Whole IP packets of the node's agent (ftss-node): sent, delivered to it, refused by reason.",
            ip,
        );
    }

    /// Where the main loop's time went, step by step (status.json's `cycle_time`).
    fn cycle_time(&mut self, status: &Value) {
        let cycle_time = &status["cycle_time"];
        self.single("ftss_cycles_total", "counter", "Cycles of the main loop.", number(&cycle_time["cycles"]));
        let steps: Vec<(String, f64)> = cycle_time["seconds"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(step, seconds)| (format!("{{step=\"{}\"}}", escape(step)), number(seconds)))
            .collect();
        self.metric(
            "ftss_cycle_seconds_total",
            "counter",
            "Wall time of the main loop by step of its cycle (idle: between cycles).",
            steps,
        );
    }

    /// The group-commit time histogram.
    fn histogram(&mut self, sync: &Histogram) {
        self.text.push_str(
            "# HELP ftss_sync_seconds Time of one group commit (write and fdatasync on every mirror).\n# TYPE ftss_sync_seconds histogram\n",
        );
        for (index, bound) in SYNC_BUCKETS.iter().enumerate() {
            self.text.push_str(&format!("ftss_sync_seconds_bucket{{le=\"{bound}\"}} {}\n", sync.counts[index]));
        }
        self.text.push_str(&format!("ftss_sync_seconds_bucket{{le=\"+Inf\"}} {}\n", sync.count));
        self.text
            .push_str(&format!("ftss_sync_seconds_sum {}\nftss_sync_seconds_count {}\n", sync.sum_seconds, sync.count));
    }
}

fn escape(text: &str) -> String {
    text.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}
