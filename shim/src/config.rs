//! The shim's settings, read once from the environment.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use fsbridge::NodeName;

/// When a send returns to the app.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AckMode {
    /// After the datagram is in the process's bounded in-memory ring; a flusher publishes it soon.
    Async,
    /// After the datagram's batch is fsync'd and published on the volume.
    Volume,
    /// After ftss-server's "stored" ack for the datagram is read from the volume.
    Guaranteed,
}

/// How this node reaches ftss-server.
#[derive(Clone, Debug)]
pub enum Transport {
    /// Batch files on the mounted volume (`FTSS_VOLUME`).
    Volume,
    /// A stream connection (`FTSS_TRANSPORT=fabric`, `FTSS_FABRIC`), authenticated with the node's
    /// key (`FTSS_FABRIC_KEY`, a file).
    Fabric { endpoint: fsbridge::fabric::Endpoint, key: Vec<u8> },
}

pub use fsbridge::ip::Cidr;

/// Everything the environment says.
#[derive(Clone, Debug)]
pub struct Config {
    /// The mounted volume (empty with the fabric transport and no FTSS_VOLUME).
    pub volume: PathBuf,
    pub transport: Transport,
    pub node: NodeName,
    pub addr: Ipv4Addr,
    pub routes: Vec<Cidr>,
    /// External networks the operator carries through the array's gateway (`FTSS_EGRESS`; default
    /// none): best-effort delivery, acked as "accepted".
    pub egress: Vec<Cidr>,
    pub ack: AckMode,
    /// `FTSS_OUTBOX`: `log` (default) appends batches to a per-process outbox log (one fdatasync a
    /// batch); `files` publishes one batch file each (Maildir: create, fsync, rename, fsync dir).
    pub outbox_log: bool,
    pub log: Option<PathBuf>,
    /// `FTSS_PCAP`: record this process's fabric datagrams in a pcap file.
    pub pcap: Option<PathBuf>,
    /// How often the inbox is polled.
    pub poll: Duration,
    /// `FTSS_RECV=once`: a datagram is recorded durably in its port's once-ledger before recv
    /// returns it, and never handed to a later process on that port (see `once`). Default
    /// (`FTSS_RECV=all`): at least once.
    pub recv_once: bool,
    /// How long a send may wait for durability or an ack before it fails with ETIMEDOUT.
    pub timeout: Duration,
    /// `FTSS_TEST_NEW_FD_PAUSE_MS` (tests only; default 0): the shim's threads pause this long
    /// between creating one of their own fds and taking it for the shim, so that a test can make
    /// the app close fds in exactly that moment.
    pub new_fd_pause: Duration,
}

/// What a shim that cannot carry traffic must refuse: the networks `FTSS_ROUTES` and
/// `FTSS_EGRESS` name (`FTSS_ROUTES` unset: the default), or `None` when either cannot be parsed
/// (then every IPv4 destination is refused: the fabric's extent is unknown).
pub fn carried_networks_from_env() -> Option<Vec<Cidr>> {
    let var = |name: &str| std::env::var(name).ok().filter(|value| !value.is_empty());
    let routes = var("FTSS_ROUTES").unwrap_or_else(|| DEFAULT_ROUTES.to_owned());
    let egress = var("FTSS_EGRESS").unwrap_or_default();
    routes
        .split(',')
        .chain(egress.split(','))
        .filter(|part| !part.trim().is_empty())
        .map(Cidr::parse)
        .collect::<Result<Vec<_>, _>>()
        .ok()
}

/// Does the environment ask for ftss (`FTSS_VOLUME` or `FTSS_TRANSPORT` set)? Then a configuration
/// that cannot be used fails closed.
pub fn wanted_from_env() -> bool {
    ["FTSS_VOLUME", "FTSS_TRANSPORT"].iter().any(|name| std::env::var_os(name).is_some_and(|value| !value.is_empty()))
}

/// Default `FTSS_ROUTES`.
pub const DEFAULT_ROUTES: &str = "10.77.0.0/16";

impl Config {
    /// `Ok(None)` when neither `FTSS_VOLUME` nor `FTSS_TRANSPORT=fabric` is set: the shim then
    /// passes everything through.
    pub fn from_env() -> Result<Option<Config>, String> {
        let var = |name: &str| std::env::var(name).ok().filter(|value| !value.is_empty());
        let transport = match var("FTSS_TRANSPORT").as_deref() {
            None | Some("volume") => {
                if var("FTSS_VOLUME").is_none() {
                    return Ok(None);
                }
                Transport::Volume
            }
            Some("fabric") => {
                let endpoint = var("FTSS_FABRIC")
                    .ok_or("FTSS_TRANSPORT=fabric needs FTSS_FABRIC (unix:/PATH or tcp:HOST:PORT)")?;
                let endpoint = endpoint.parse()?;
                let key = var("FTSS_FABRIC_KEY")
                    .ok_or("FTSS_TRANSPORT=fabric needs FTSS_FABRIC_KEY (the node's key file)")?;
                let key = fsbridge::fabric::read_key_file(std::path::Path::new(&key))?;
                Transport::Fabric { endpoint, key }
            }
            Some(other) => return Err(format!("FTSS_TRANSPORT {other:?} is not one of volume, fabric")),
        };
        let volume = var("FTSS_VOLUME").unwrap_or_default();
        let node = var("FTSS_NODE").ok_or("FTSS_NODE is not set")?;
        let node = NodeName::new(&node).map_err(|error| error.to_string())?;
        let addr = var("FTSS_ADDR").ok_or("FTSS_ADDR is not set")?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| format!("FTSS_ADDR {addr:?} is not an IPv4 address"))?;
        let routes = var("FTSS_ROUTES").unwrap_or_else(|| DEFAULT_ROUTES.to_owned());
        let routes =
            routes.split(',').filter(|part| !part.trim().is_empty()).map(Cidr::parse).collect::<Result<Vec<_>, _>>()?;
        let egress = var("FTSS_EGRESS").unwrap_or_default();
        let egress =
            egress.split(',').filter(|part| !part.trim().is_empty()).map(Cidr::parse).collect::<Result<Vec<_>, _>>()?;
        let ack = match var("FTSS_ACK").as_deref() {
            None | Some("volume") => AckMode::Volume,
            Some("async") => AckMode::Async,
            Some("guaranteed") => AckMode::Guaranteed,
            Some(other) => return Err(format!("FTSS_ACK {other:?} is not one of async, volume, guaranteed")),
        };
        let outbox_log = match var("FTSS_OUTBOX").as_deref() {
            None | Some("log") => true,
            Some("files") => false,
            Some(other) => return Err(format!("FTSS_OUTBOX {other:?} is not one of log, files")),
        };
        let recv_once = match var("FTSS_RECV").as_deref() {
            None | Some("all") => false,
            Some("once") => true,
            Some(other) => return Err(format!("FTSS_RECV {other:?} is not one of all, once")),
        };
        if recv_once && volume.is_empty() {
            return Err("FTSS_RECV=once needs FTSS_VOLUME: the ports' once-ledgers live on the volume".into());
        }
        let poll = millis_var("FTSS_POLL_MS", 10)?;
        let new_fd_pause = millis_var("FTSS_TEST_NEW_FD_PAUSE_MS", 0)?;
        let timeout = millis_var("FTSS_TIMEOUT_MS", 30_000)?;
        let timeout = match var("FTSS_TIMEOUT") {
            Some(seconds) => Duration::from_secs_f64(
                seconds
                    .parse::<f64>()
                    .ok()
                    .filter(|value| *value > 0.0)
                    .ok_or(format!("FTSS_TIMEOUT {seconds:?} is not seconds"))?,
            ),
            None => timeout,
        };
        Ok(Some(Config {
            volume: volume.into(),
            transport,
            node,
            addr,
            routes,
            egress,
            ack,
            outbox_log,
            log: var("FTSS_LOG").map(PathBuf::from),
            pcap: var("FTSS_PCAP").map(PathBuf::from),
            poll,
            recv_once,
            timeout,
            new_fd_pause,
        }))
    }

    pub fn is_fabric_transport(&self) -> bool {
        matches!(self.transport, Transport::Fabric { .. })
    }

    /// Is `addr` carried by ftss (a fabric route, or an external network sent through the gateway)?
    pub fn is_fabric(&self, addr: Ipv4Addr) -> bool {
        self.routes.iter().chain(&self.egress).any(|route| route.contains(addr))
    }
}

fn millis_var(name: &str, default: u64) -> Result<Duration, String> {
    match std::env::var(name) {
        Ok(text) if !text.is_empty() => text
            .parse()
            .map(Duration::from_millis)
            .map_err(|_| format!("{name} {text:?} is not a number of milliseconds")),
        _ => Ok(Duration::from_millis(default)),
    }
}
