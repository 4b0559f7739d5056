//! `ftss-server run` settings: command-line flags over a TOML file (`--config FILE`) over defaults.
//! Every flag has a key of the same name in the file (`queue-dir = ["/a", "/b"]`, `retain = "1h"`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use fsbridge::fabric::Endpoint;

use crate::core::admission::Limits;
use crate::gateway::{Cidr, IngressRule};
use crate::server::Config;

/// Shortest `--log-abandon-after`: the writers' stale-write time (5 min) plus a margin.
const LOG_ABANDON_AFTER_MIN: Duration = Duration::from_secs(360);

/// The settings file; unknown keys are errors.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileSettings {
    pub volume: Option<PathBuf>,
    pub queue_dir: Option<Vec<PathBuf>>,
    pub poll: Option<String>,
    pub redeliver_after: Option<String>,
    pub retain: Option<String>,
    pub hold: Option<String>,
    pub log_abandon_after: Option<String>,
    pub destination_bytes_max: Option<u64>,
    pub destination_packets_max: Option<u64>,
    pub queue_bytes_max: Option<u64>,
    pub queue_packets_max: Option<u64>,
    pub fabric: Option<Vec<String>>,
    pub ingress: Option<Vec<String>>,
    pub metrics: Option<String>,
    pub ha: Option<bool>,
    pub lease_term: Option<String>,
    pub instance: Option<String>,
    pub fabric_listen: Option<Vec<String>>,
    pub fabric_keys: Option<PathBuf>,
    pub partitions: Option<u32>,
    pub fabric_gather: Option<String>,
}

/// The same settings as given on the command line (all optional there too).
#[derive(Debug, Default, clap::Args)]
pub struct FlagSettings {
    /// A TOML file with any of the settings below (keys named like the flags); flags override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The FTSS volume as a local directory (the directory nodes mount over NFS/SMB).
    #[arg(long)]
    pub volume: Option<PathBuf>,
    /// A queue directory; repeat to keep one mirror per directory (put them on different disks).
    #[arg(long = "queue-dir")]
    pub queue_dir: Vec<PathBuf>,
    /// How long to sleep when a cycle found nothing to do [default: 20ms].
    #[arg(long)]
    pub poll: Option<String>,
    /// Deliver a packet again if it is not receipted within this time [default: 5s].
    #[arg(long)]
    pub redeliver_after: Option<String>,
    /// Keep receipted (and sent) packets this long, listable with `dump`; 0 deletes them [default: 0s].
    #[arg(long)]
    pub retain: Option<String>,
    /// Hold packets for a fabric address no node registered this long, then dead-letter them
    /// [default: 24h].
    #[arg(long)]
    pub hold: Option<String>,
    /// Delete an outbox log segment that was read to its end and left unchanged this long without
    /// being sealed (its process died). Must be well above a minute: writers seal a segment they
    /// left idle for a minute instead of appending to it; at least 6m [default: 10m].
    #[arg(long)]
    pub log_abandon_after: Option<String>,
    /// Most queued bytes for one destination (payloads plus 64 bytes a packet) before its
    /// senders are pushed back [default: 1073741824].
    #[arg(long)]
    pub destination_bytes_max: Option<u64>,
    /// Most queued packets for one destination before its senders are pushed back
    /// [default: 1048576].
    #[arg(long)]
    pub destination_packets_max: Option<u64>,
    /// Most queued bytes in all (payloads plus 64 bytes a packet) before every sender is pushed
    /// back [default: 17179869184].
    #[arg(long)]
    pub queue_bytes_max: Option<u64>,
    /// Most queued packets in all before every sender is pushed back; the index costs about 40
    /// bytes of memory a packet [default: 8388608].
    #[arg(long)]
    pub queue_packets_max: Option<u64>,
    /// The fabric's addresses (repeatable). Packets for unregistered addresses inside are held;
    /// packets for addresses outside go to the external network [default: 10.77.0.0/16].
    #[arg(long)]
    pub fabric: Vec<String>,
    /// LISTEN=NODE:PORT (repeatable): datagrams arriving on the external UDP address LISTEN are
    /// stored and delivered to NODE's PORT; the node's replies leave from LISTEN.
    #[arg(long)]
    pub ingress: Vec<String>,
    /// Serve Prometheus metrics over HTTP on this address (GET /metrics), e.g. 127.0.0.1:9477.
    #[arg(long)]
    pub metrics: Option<String>,
    /// High availability: run as one of several instances sharing the volume (and a queue-dir on
    /// it); one is active at a time, decided by a lease in the volume's server/ directory.
    #[arg(long)]
    pub ha: bool,
    /// How long the active instance's lease lasts without renewal [default: 10s]; a standby takes
    /// over at most this long after the active instance dies.
    #[arg(long)]
    pub lease_term: Option<String>,
    /// This instance's name in the lease and in status [default: HOSTNAME-PID].
    #[arg(long)]
    pub instance: Option<String>,
    /// Accept fabric connections here: unix:/PATH or tcp:ADDR:PORT (repeatable). Nodes with
    /// FTSS_TRANSPORT=fabric send and receive over them instead of the volume.
    #[arg(long = "fabric-listen")]
    pub fabric_listen: Vec<String>,
    /// Directory of per-node fabric keys, NODE.key (made by `ftss-server fabric-key`)
    /// [default: VOLUME/server/fabric-keys].
    #[arg(long)]
    pub fabric_keys: Option<PathBuf>,
    /// Scale-out (with --ha): split the nodes into this many partitions, each with its own lease,
    /// queue (a p<N> directory in every --queue-dir) and status; every instance serves the
    /// partitions it holds, taking its fair share of them, and the rest fail over [default: 1].
    #[arg(long)]
    pub partitions: Option<u32>,
    /// How the server waits, after acking packets that came over the fabric, for those senders'
    /// next packets (at most the last sync's time, so that one sync takes them all): `spin` looks
    /// at the connections without sleeping, yielding the CPU to any other runnable thread (a
    /// faster round trip for the nodes, for up to that time of a CPU a cycle); `sleep` sleeps in
    /// poll [default: spin].
    #[arg(long)]
    pub fabric_gather: Option<String>,
}

/// High-availability settings.
#[derive(Clone, Debug)]
pub struct HaSettings {
    pub lease_term: Duration,
    pub instance: String,
    /// Partitions of the nodes (1: one instance is active for all of them).
    pub partitions: u32,
}

/// Most partitions: each costs a thread, a lease and a queue per instance that holds it.
pub const PARTITIONS_MAX: u32 = 64;

/// Everything `run` needs.
#[derive(Debug)]
pub struct RunSettings {
    pub config: Config,
    pub metrics: Option<SocketAddr>,
    pub ha: Option<HaSettings>,
}

/// Parses durations such as `250ms`, `5s`, `10m`, `2h`, `7d`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let digits = text.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let unit = &text[digits.len()..];
    let value: u64 = digits.parse().map_err(|_| format!("{text:?} is not a duration like 500ms, 5s, 10m, 2h, 7d"))?;
    let millis = match unit {
        "ms" => value,
        "s" | "" => value * 1000,
        "m" => value * 60_000,
        "h" => value * 3_600_000,
        "d" => value * 86_400_000,
        _ => return Err(format!("unknown unit {unit:?} in {text:?}: use ms, s, m, h or d")),
    };
    Ok(Duration::from_millis(millis))
}

fn read_file(path: &Path) -> Result<FileSettings, String> {
    let text = std::fs::read_to_string(path).map_err(|error| format!("{}: {error}", path.display()))?;
    toml::from_str(&text).map_err(|error| format!("{}: {error}", path.display()))
}

/// A flag if given, else the file's key, else the default; errors name the key.
fn duration(key: &str, flag: Option<String>, file: Option<String>, default: &str) -> Result<Duration, String> {
    let text = flag.or(file).unwrap_or_else(|| default.to_owned());
    parse_duration(&text).map_err(|error| format!("{key}: {error}"))
}

fn list<T: std::str::FromStr<Err = String>>(
    key: &str,
    flag: Vec<String>,
    file: Option<Vec<String>>,
    default: &[&str],
) -> Result<Vec<T>, String> {
    let texts = if !flag.is_empty() {
        flag
    } else {
        file.unwrap_or_else(|| default.iter().map(|text| text.to_string()).collect())
    };
    texts.iter().map(|text| text.parse().map_err(|error| format!("{key}: {error}"))).collect()
}

/// Merges flags over the file over the defaults.
pub fn resolve(flags: FlagSettings) -> Result<RunSettings, String> {
    let file = match &flags.config {
        Some(path) => read_file(path)?,
        None => FileSettings::default(),
    };
    let volume =
        flags.volume.or(file.volume).ok_or("volume: required (--volume DIR or volume = \"DIR\" in --config)")?;
    let queue_dirs = if flags.queue_dir.is_empty() { file.queue_dir.unwrap_or_default() } else { flags.queue_dir };
    if queue_dirs.is_empty() {
        return Err("queue-dir: at least one is required (--queue-dir DIR or queue-dir = [\"DIR\"] in --config)".into());
    }
    let metrics = match flags.metrics.or(file.metrics) {
        Some(text) => {
            Some(text.parse().map_err(|_| format!("metrics: {text:?} is not an address like 127.0.0.1:9477"))?)
        }
        None => None,
    };
    let config = Config {
        queue_dirs,
        poll: duration("poll", flags.poll, file.poll, "20ms")?,
        redeliver_after: duration("redeliver-after", flags.redeliver_after, file.redeliver_after, "5s")?,
        retain: duration("retain", flags.retain, file.retain, "0s")?,
        hold: duration("hold", flags.hold, file.hold, "24h")?,
        log_abandon_after: duration("log-abandon-after", flags.log_abandon_after, file.log_abandon_after, "10m")
            .and_then(|after| {
                // Writers append to a segment idle for up to a minute and accept a write that
                // took up to five: an abandon time below that would delete live segments.
                if after < LOG_ABANDON_AFTER_MIN {
                    Err(format!("log-abandon-after: at least {}s", LOG_ABANDON_AFTER_MIN.as_secs()))
                } else {
                    Ok(after)
                }
            })?,
        limits: Limits {
            destination_bytes: flags.destination_bytes_max.or(file.destination_bytes_max).unwrap_or(1 << 30),
            destination_packets: flags.destination_packets_max.or(file.destination_packets_max).unwrap_or(1 << 20),
            total_bytes: flags.queue_bytes_max.or(file.queue_bytes_max).unwrap_or(1 << 34),
            total_packets: flags.queue_packets_max.or(file.queue_packets_max).unwrap_or(1 << 23),
        },
        fabric: list::<Cidr>("fabric", flags.fabric, file.fabric, &["10.77.0.0/16"])?,
        ingress: list::<IngressRule>("ingress", flags.ingress, file.ingress, &[])?,
        fabric_listen: list::<Endpoint>("fabric-listen", flags.fabric_listen, file.fabric_listen, &[])?,
        partition: crate::server::Partition::default(),
        fabric_gather: flags
            .fabric_gather
            .or(file.fabric_gather)
            .map_or(Ok(crate::server::GatherWait::Spin), |text| text.parse())
            .map_err(|error| format!("fabric-gather: {error}"))?,
        fabric_keys: flags
            .fabric_keys
            .or(file.fabric_keys)
            .unwrap_or_else(|| volume.join("server").join("fabric-keys")),
        volume,
    };
    let ha = if flags.ha || file.ha == Some(true) {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let instance =
            flags.instance.or(file.instance).unwrap_or_else(|| format!("{}-{}", host.trim(), std::process::id()));
        let partitions = flags.partitions.or(file.partitions).unwrap_or(1);
        if !(1..=PARTITIONS_MAX).contains(&partitions) {
            return Err(format!("partitions: {partitions} is not between 1 and {PARTITIONS_MAX}"));
        }
        if partitions > 1 && (!config.fabric_listen.is_empty() || metrics.is_some()) {
            return Err("partitions: --fabric-listen and --metrics need a single partition".into());
        }
        let lease_term = duration("lease-term", flags.lease_term, file.lease_term, "10s")?;
        Some(HaSettings { lease_term, instance, partitions })
    } else if flags.partitions.or(file.partitions).is_some_and(|partitions| partitions != 1) {
        return Err("partitions: needs --ha (instances share the partitions through leases)".into());
    } else {
        None
    };
    Ok(RunSettings { config, metrics, ha })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> PathBuf {
        let path =
            std::env::temp_dir().join(format!("ftss-config-{}-{}.toml", std::process::id(), fsbridge::random_u64()));
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn flags_override_the_file_and_errors_name_the_key() {
        let path = file("volume = \"/v\"\nqueue-dir = [\"/q1\", \"/q2\"]\nretain = \"1h\"\nhold = \"2m\"\n");
        let flags = FlagSettings { config: Some(path.clone()), hold: Some("5s".into()), ..FlagSettings::default() };
        let RunSettings { config, metrics, ha } = resolve(flags).unwrap();
        assert!(ha.is_none());
        assert_eq!(config.volume, PathBuf::from("/v"));
        assert_eq!(config.queue_dirs.len(), 2);
        assert_eq!(config.retain, Duration::from_secs(3600));
        assert_eq!(config.hold, Duration::from_secs(5));
        assert_eq!(config.redeliver_after, Duration::from_secs(5));
        assert!(metrics.is_none());

        let unknown = file("volume = \"/v\"\nqueue-dir = [\"/q\"]\nretian = \"1h\"\n");
        let error = resolve(FlagSettings { config: Some(unknown), ..FlagSettings::default() }).unwrap_err();
        assert!(error.contains("retian"), "{error}");
        let bad = file("volume = \"/v\"\nqueue-dir = [\"/q\"]\nretain = \"1 hour\"\n");
        let error = resolve(FlagSettings { config: Some(bad), ..FlagSettings::default() }).unwrap_err();
        assert!(error.starts_with("retain:"), "{error}");
        let bad = file("volume = \"/v\"\nqueue-dir = [\"/q\"]\ningress = [\"nonsense\"]\n");
        let error = resolve(FlagSettings { config: Some(bad), ..FlagSettings::default() }).unwrap_err();
        assert!(error.starts_with("ingress:"), "{error}");
        let missing = resolve(FlagSettings::default()).unwrap_err();
        assert!(missing.starts_with("volume:"), "{missing}");
    }

    #[test]
    fn the_wait_for_fabric_senders_spins_unless_told_to_sleep() {
        let base =
            || FlagSettings { volume: Some("/v".into()), queue_dir: vec!["/q".into()], ..FlagSettings::default() };
        assert_eq!(resolve(base()).unwrap().config.fabric_gather, crate::server::GatherWait::Spin);
        let sleep = file("volume = \"/v\"\nqueue-dir = [\"/q\"]\nfabric-gather = \"sleep\"\n");
        let settings = resolve(FlagSettings { config: Some(sleep.clone()), ..FlagSettings::default() }).unwrap();
        assert_eq!(settings.config.fabric_gather, crate::server::GatherWait::Sleep);
        let flags = FlagSettings { config: Some(sleep), fabric_gather: Some("spin".into()), ..FlagSettings::default() };
        assert_eq!(resolve(flags).unwrap().config.fabric_gather, crate::server::GatherWait::Spin);
        let error = resolve(FlagSettings { fabric_gather: Some("fast".into()), ..base() }).unwrap_err();
        assert!(error.starts_with("fabric-gather:") && error.contains("fast"), "{error}");
    }
}
