//! The status report (status.json) and the rates in it.

use super::*;

/// `ftss-server status` output.
#[derive(Debug, Serialize)]
pub struct Status {
    pub running: bool,
    pub pid: u32,
    pub started_unix_ms: u64,
    pub updated_unix_ms: u64,
    pub degraded: bool,
    pub backpressure: Backpressure,
    pub counters: Counters,
    pub rates: Rates,
    /// Where the main loop's time went since the start, step by step.
    pub cycle_time: CycleTime,
    pub queue: QueueStatus,
    pub config: ConfigStatus,
    pub recovery: RecoveryReport,
    pub dead_letters: Vec<DeadLetter>,
    pub gateway: GatewayStatus,
    pub last_error: Option<String>,
    /// With `--ha`: this (active) instance and its lease epoch.
    pub active: Option<Active>,
    /// With `--partitions`: the share of the nodes this status is about.
    pub partition: Option<Partition>,
    /// With `--fabric-listen`: where, the counters and the connected nodes.
    pub fabric: Option<FabricStatus>,
    pub nodes: BTreeMap<String, NodeStatus>,
}

#[derive(Debug, Serialize)]
pub struct FabricStatus {
    pub listening: Vec<String>,
    pub counters: FabricCounters,
    pub connections: Vec<crate::fabric::ConnectionStatus>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Active {
    pub instance: String,
    pub lease_epoch: u64,
}

#[derive(Debug, Serialize)]
pub struct GatewayStatus {
    pub counters: GatewayCounters,
    pub ingress: Vec<IngressStatus>,
    pub last_send_error: Option<String>,
}

#[derive(Debug, Default, Serialize)]
pub struct Rates {
    pub stored_per_second: f64,
    pub delivered_per_second: f64,
    pub receipted_per_second: f64,
}

#[derive(Debug, Serialize)]
pub struct QueueStatus {
    pub packets: u64,
    pub retained: u64,
    pub held_unknown_destination: u64,
    pub segments: u64,
    pub bytes: u64,
    pub mirrors: Vec<MirrorStatus>,
}

#[derive(Debug, Serialize)]
pub struct ConfigStatus {
    pub retain_seconds: u64,
    pub hold_seconds: u64,
    pub redeliver_after_ms: u64,
    pub destination_bytes_max: u64,
    pub destination_packets_max: u64,
    pub queue_bytes_max: u64,
    pub queue_packets_max: u64,
}

#[derive(Debug, Default, Serialize)]
pub struct NodeStatus {
    pub addr: Option<String>,
    pub queued: u64,
    pub queued_bytes: u64,
    pub in_flight: u64,
    pub oldest_age_ms: u64,
    /// Whole IP packets from the node's agent (ftss-node); absent for nodes that sent or got none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip: Option<IpCounts>,
    /// Why this node's spools cannot be served now (empty when all is well).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
}

impl Server {
    /// Takes a sample of the counters for the rates (at every status write).
    pub(super) fn sample_rates(&mut self) {
        let now = monotonic_now();
        self.samples.push_back((now, self.counters.stored, self.counters.delivered, self.counters.receipted));
        while self.samples.front().is_some_and(|(at, ..)| now.duration_since(*at) > RATE_WINDOW) {
            self.samples.pop_front();
        }
    }

    /// Rates over the samples of the last `RATE_WINDOW`.
    pub(super) fn rates(&self) -> Rates {
        let (Some(first), Some(last)) = (self.samples.front(), self.samples.back()) else { return Rates::default() };
        let seconds = last.0.duration_since(first.0).as_secs_f64();
        let rate = |from: u64, to: u64| if seconds > 0.0 { (to - from) as f64 / seconds } else { 0.0 };
        Rates {
            stored_per_second: rate(first.1, last.1),
            delivered_per_second: rate(first.2, last.2),
            receipted_per_second: rate(first.3, last.3),
        }
    }

    /// The status document (also what `status --json` prints).
    pub fn status(&self, stopped: bool) -> Status {
        let now = now_us();
        let mut nodes: BTreeMap<String, NodeStatus> = BTreeMap::new();
        for node in &self.nodes {
            let addr = self.registry.addr(node).map(|addr| addr.to_string());
            let errors =
                self.node_errors.get(node).map(|errors| errors.values().cloned().collect()).unwrap_or_default();
            let ip = self.ip.get(node).cloned();
            nodes.insert(node.to_string(), NodeStatus { addr, errors, ip, ..NodeStatus::default() });
        }
        let mut unknown_destination = 0;
        for destination in self.index.destinations() {
            let stats = self.index.stats(&destination);
            let Some(node) = self.registry.node(&destination) else {
                unknown_destination += stats.packets;
                continue;
            };
            let status = nodes.get_mut(node.as_str()).expect("registered node listed");
            status.queued += stats.packets;
            status.queued_bytes += stats.bytes;
            status.in_flight += stats.in_flight;
            let oldest = stats.oldest_stored_unix_us.map_or(0, |stored| now.saturating_sub(stored) / 1000);
            status.oldest_age_ms = status.oldest_age_ms.max(oldest);
        }
        let mut counters = self.counters.clone();
        counters.read_repairs = self.queue.read_repairs;
        Status {
            running: !stopped,
            pid: std::process::id(),
            started_unix_ms: self.started_unix_ms,
            updated_unix_ms: now / 1000,
            degraded: self.queue.degraded(),
            backpressure: self.backpressure.clone(),
            counters,
            rates: self.rates(),
            cycle_time: self.clock.report(),
            queue: QueueStatus {
                packets: self.index.len() as u64,
                retained: self.book.retained() as u64,
                held_unknown_destination: unknown_destination,
                segments: self.queue.segment_count() as u64,
                bytes: self.queue.bytes(),
                mirrors: self.queue.mirror_status(),
            },
            config: ConfigStatus {
                retain_seconds: self.config.retain.as_secs(),
                hold_seconds: self.config.hold.as_secs(),
                redeliver_after_ms: self.config.redeliver_after.as_millis() as u64,
                destination_bytes_max: self.config.limits.destination_bytes,
                destination_packets_max: self.config.limits.destination_packets,
                queue_bytes_max: self.config.limits.total_bytes,
                queue_packets_max: self.config.limits.total_packets,
            },
            recovery: self.recovery.clone(),
            dead_letters: self.dead_letters.iter().cloned().collect(),
            gateway: GatewayStatus {
                counters: GatewayCounters {
                    nat_sockets: self.gateway.nat_count() as u64,
                    ..self.gateway.counters.clone()
                },
                ingress: self.gateway.ingress_status(),
                last_send_error: self.gateway.last_send_error.clone(),
            },
            last_error: self.last_error.clone(),
            active: self.active.clone(),
            partition: (self.config.partition.count > 1).then_some(self.config.partition),
            fabric: self.fabric.as_ref().map(|hub| FabricStatus {
                listening: hub.listening().to_vec(),
                counters: hub.counters(),
                connections: hub.status(),
            }),
            nodes,
        }
    }

    pub(super) fn write_status(&mut self, stopped: bool) {
        self.sample_rates();
        let status = self.status(stopped);
        let text = serde_json::to_vec_pretty(&status).expect("status serializes");
        if let Some(snapshot) = &self.metrics {
            let value = serde_json::to_value(&status).expect("status serializes");
            snapshot.set(crate::metrics::render(&value, &self.sync_seconds));
        }
        let path = self.volume.partition_status_path(self.config.partition.index, self.config.partition.count);
        let tmp = path.with_extension(format!("json.tmp.{}", std::process::id()));
        // Status is advisory: a failed write is logged, never fatal.
        let result = fsbridge::disk::write(&tmp, &text).and_then(|()| fsbridge::fsops::rename(&tmp, &path));
        if let Err(error) = result {
            self.report("writing status", format!("{}: {error}", path.display()));
        }
        self.status_written_at = Some(monotonic_now());
    }
}
