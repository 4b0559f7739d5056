//! ftss-node: the node agent. A TUN interface (`ftss0`) holds the node's fabric address and the
//! routes of `FTSS_ROUTES`, so the kernel's own stack hands it every IP packet for the fabric, from
//! any program (static binaries, Go, setuid, TCP, ICMP). Each packet is carried through the volume
//! as the shim carries datagrams (`fsbridge::ip`): appended to this process's outbox log with one
//! fdatasync a batch, stored by ftss-server, delivered into the destination node's `in/0/` inbox,
//! where that node's agent writes it into its TUN device and receipts it. A packet not receipted is
//! delivered again, so a restarted agent gets what it missed.
//!
//! The guarantee is the `async` level: the application's `send` returned before the agent read the
//! packet from the device. Once read, a packet is durable before the next is read. The agent asks
//! the server for "stored" acks and keeps at most `WINDOW_PACKETS_MAX` packets and
//! `WINDOW_BYTES_MAX` bytes written but not yet stored; at that bound, while the volume fails, or
//! with `OUTBOX_SEGMENTS_MAX` outbox segments unread (acks lost with a crashed server), it stops
//! reading the device and the kernel drops at the device's queue, as an interface does.
//!
//! This binary does not link the shim's library (whose exported hooks would take over its own
//! sockets); it uses fsbridge only.

mod tun;

use std::collections::{BTreeMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use fsbridge::bell::{BellReader, Ring, RingKind};
use fsbridge::dedupe::{Dedupe, Seen};
use fsbridge::format::{BatchEncoder, PAYLOAD_BYTES_MAX, decode_batch};
use fsbridge::ip::{Cidr, IP_PORT, parse_ipv4};
use fsbridge::layout::{batch_file_name, parse_batch_file_name};
use fsbridge::log::{LogWriter, parse_segment_name};
use fsbridge::spool::{RecentNames, list_names, read_regular_file, remove_file_idempotent};
use fsbridge::{AckState, BatchHeader, BatchKind, NodeConfig, NodeName, Packet, PacketId, Record, Volume};

use tun::Tun;

/// Packets in one outbox batch (one fdatasync).
const BATCH_PACKETS_MAX: usize = 1024;
/// Bytes of packets in one outbox batch.
const BATCH_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Packets written to the outbox and not yet acked as stored by the server, at most.
const WINDOW_PACKETS_MAX: usize = 4096;
/// Bytes of those packets, at most.
const WINDOW_BYTES_MAX: usize = 16 * 1024 * 1024;
/// A packet without its ack this long leaves the window (an ack lost with a crashed server; the
/// outbox's segment bound still holds).
const ACK_LOST_AFTER: Duration = Duration::from_secs(30);
/// Ack files remembered as read but not removable (EBUSY on SMB).
const SEEN_ACK_FILES_MAX: usize = 4096;
/// Unread outbox segments (8 MiB each) of this agent before it stops reading the device.
const OUTBOX_SEGMENTS_MAX: usize = 8;
/// How often the outbox's backlog is counted (a listing of `out/log`).
const BACKLOG_CHECK: Duration = Duration::from_secs(1);
/// How often the inbox directory is listed although the bells are read.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// Inbox files taken in one pass.
const INBOX_FILES_PER_PASS: usize = 64;
/// Bells read (one per server partition writing to this node).
const BELLS_MAX: usize = 64;
/// Announced inbox files remembered until taken (more are left to the sweep).
const ANNOUNCED_MAX: usize = 8192;
/// Receipts kept for a later pass when writing them fails.
const RECEIPTS_PENDING_MAX: usize = 1 << 16;
/// Default MTU of the interface: large packets mean fewer of them to store (at most the largest
/// payload a record holds).
const DEFAULT_MTU: u32 = 16_384;

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn log(message: std::fmt::Arguments) {
    eprintln!("ftss-node[{}]: {message}", std::process::id());
}

macro_rules! log {
    ($($arg:tt)*) => { log(format_args!($($arg)*)) };
}

/// The agent's settings: the shim's names, and two of its own.
struct Config {
    volume: PathBuf,
    node: NodeName,
    addr: Ipv4Addr,
    routes: Vec<Cidr>,
    poll: Duration,
    device: String,
    mtu: u32,
}

const USAGE: &str = "usage: ftss-node [--dev NAME] [--mtu BYTES]
Carries every IP packet of this node for the fabric's networks through the FTSS volume.
Environment (as for the shim): FTSS_VOLUME (the mounted volume), FTSS_NODE, FTSS_ADDR (this node's
fabric address), FTSS_ROUTES (default 10.77.0.0/16), FTSS_POLL_MS (default 10), FTSS_DEV (default
ftss0), FTSS_MTU (default 16384). FTSS_TRANSPORT must be volume (the fabric transport does not carry
IP packets yet). Needs CAP_NET_ADMIN; keeps only that once the interface is up.";

impl Config {
    fn from_env_and_args() -> Result<Config, String> {
        let var = |name: &str| std::env::var(name).ok().filter(|value| !value.is_empty());
        let mut device = var("FTSS_DEV").unwrap_or_else(|| "ftss0".to_owned());
        let mut mtu = var("FTSS_MTU");
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--dev" => device = args.next().ok_or("--dev needs a name")?,
                "--mtu" => mtu = Some(args.next().ok_or("--mtu needs a number")?),
                "-h" | "--help" => {
                    println!("{USAGE}");
                    std::process::exit(0);
                }
                other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
            }
        }
        match var("FTSS_TRANSPORT").as_deref() {
            None | Some("volume") => {}
            Some(other) => {
                return Err(format!("FTSS_TRANSPORT {other:?}: ftss-node carries IP packets over the volume only"));
            }
        }
        let volume = var("FTSS_VOLUME").ok_or("FTSS_VOLUME is not set")?;
        let node =
            NodeName::new(&var("FTSS_NODE").ok_or("FTSS_NODE is not set")?).map_err(|error| error.to_string())?;
        let addr = var("FTSS_ADDR").ok_or("FTSS_ADDR is not set")?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| format!("FTSS_ADDR {addr:?} is not an IPv4 address"))?;
        let routes = var("FTSS_ROUTES").unwrap_or_else(|| "10.77.0.0/16".to_owned());
        let routes =
            routes.split(',').filter(|part| !part.trim().is_empty()).map(Cidr::parse).collect::<Result<Vec<_>, _>>()?;
        let poll = match var("FTSS_POLL_MS") {
            Some(text) => {
                Duration::from_millis(text.parse().map_err(|_| format!("FTSS_POLL_MS {text:?} is not a number"))?)
            }
            None => Duration::from_millis(10),
        };
        let mtu = match mtu {
            Some(text) => text.parse::<u32>().map_err(|_| format!("MTU {text:?} is not a number"))?,
            None => DEFAULT_MTU,
        };
        if !(576..=PAYLOAD_BYTES_MAX as u32).contains(&mtu) {
            return Err(format!("MTU {mtu} is outside 576..={PAYLOAD_BYTES_MAX}"));
        }
        Ok(Config { volume: volume.into(), node, addr, routes, poll, device, mtu })
    }
}

/// What the agent did, logged at exit.
#[derive(Default)]
struct Counts {
    sent: AtomicU64,
    received: AtomicU64,
    duplicates: AtomicU64,
    /// Read from the device but not carried (not IPv4, not from this node's address).
    dropped_out: AtomicU64,
    /// From the inbox but not for this node, or not IPv4.
    dropped_in: AtomicU64,
    /// Refused by the server (its acks said so).
    refused: AtomicU64,
    /// Left the window without an ack (`ACK_LOST_AFTER`).
    ack_overdue: AtomicU64,
}

struct Agent {
    config: Config,
    volume: Volume,
    tun: Tun,
    epoch: u64,
    counts: Counts,
    window: Window,
}

/// Packets written to the outbox that the server has not acked as stored.
#[derive(Default)]
struct InFlight {
    /// seq → (bytes, when written).
    packets: BTreeMap<u64, (usize, Instant)>,
    bytes: usize,
}

impl InFlight {
    fn is_full(&self) -> bool {
        self.packets.len() >= WINDOW_PACKETS_MAX || self.bytes >= WINDOW_BYTES_MAX
    }

    fn remove(&mut self, seq: u64) -> bool {
        let Some((bytes, _)) = self.packets.remove(&seq) else { return false };
        self.bytes -= bytes;
        true
    }
}

/// The window of packets in flight to the server, and a wakeup for the sender when acks free it.
#[derive(Default)]
struct Window {
    state: Mutex<InFlight>,
    changed: Condvar,
}

impl Window {
    fn lock(&self) -> MutexGuard<'_, InFlight> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn add(&self, packets: &[Packet]) {
        let now = Instant::now();
        let mut state = self.lock();
        for packet in packets {
            state.packets.insert(packet.id.seq, (packet.payload.len(), now));
            state.bytes += packet.payload.len();
        }
    }

    fn acked(&self, seqs: impl IntoIterator<Item = u64>) {
        let mut state = self.lock();
        let mut any = false;
        for seq in seqs {
            any |= state.remove(seq);
        }
        if any {
            self.changed.notify_all();
        }
    }

    /// Waits up to `timeout` for room below the bounds; says whether there is. Packets whose ack is
    /// overdue leave the window (counted).
    fn wait_for_room(&self, timeout: Duration, overdue: &AtomicU64) -> bool {
        let mut state = self.lock();
        while let Some((&seq, &(_, at))) = state.packets.first_key_value() {
            if at.elapsed() < ACK_LOST_AFTER {
                break;
            }
            state.remove(seq);
            overdue.fetch_add(1, Ordering::Relaxed);
        }
        if state.is_full() {
            state = self.changed.wait_timeout(state, timeout).unwrap_or_else(|poisoned| poisoned.into_inner()).0;
        }
        !state.is_full()
    }
}

fn main() {
    let config = match Config::from_env_and_args() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("ftss-node: {error}");
            std::process::exit(2);
        }
    };
    if let Err(error) = run(config) {
        eprintln!("ftss-node: {error}");
        std::process::exit(1);
    }
}

fn run(config: Config) -> Result<(), String> {
    if !config.volume.is_dir() {
        return Err(format!("FTSS_VOLUME {} is not a directory", config.volume.display()));
    }
    fsbridge::mounts::check_volume(&config.volume).map_err(|problems| problems.join("; "))?;
    let volume = Volume::new(&config.volume);
    volume
        .register_node(&config.node, &NodeConfig { addr: config.addr })
        .map_err(|error| format!("registering node {}: {error}", config.node))?;
    volume.inbox(&config.node, IP_PORT).create().map_err(|error| format!("creating the IP inbox: {error}"))?;
    let tun = Tun::create(&config.device, config.addr, config.mtu, &config.routes)
        .map_err(|error| format!("setting up {}: {error}", config.device))?;
    if let Err(error) = tun::keep_only_net_admin() {
        tun.release();
        return Err(format!("dropping capabilities: {error}"));
    }
    for signal in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { libc::signal(signal, on_stop_signal as *const () as libc::sighandler_t) };
    }
    let epoch = fsbridge::random_u64();
    log!(
        "node {} addr {} on {} (mtu {}) routes {} volume {} epoch {epoch:016x}",
        config.node,
        config.addr,
        tun.name,
        config.mtu,
        config.routes.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
        config.volume.display()
    );
    let agent = Arc::new(Agent { config, volume, tun, epoch, counts: Counts::default(), window: Window::default() });
    let receiver = {
        let agent = agent.clone();
        std::thread::Builder::new().name("ftss-node-rx".into()).spawn(move || receive_loop(&agent))
    };
    let receiver = match receiver {
        Ok(receiver) => receiver,
        Err(error) => {
            agent.tun.release();
            return Err(format!("starting the receive thread: {error}"));
        }
    };
    send_loop(&agent);
    let _ = receiver.join();
    agent.tun.release();
    let counts = &agent.counts;
    log!(
        "stopping: sent {} received {} duplicates {} dropped (out/in) {}/{} refused {} acks overdue {}",
        counts.sent.load(Ordering::Relaxed),
        counts.received.load(Ordering::Relaxed),
        counts.duplicates.load(Ordering::Relaxed),
        counts.dropped_out.load(Ordering::Relaxed),
        counts.dropped_in.load(Ordering::Relaxed),
        counts.refused.load(Ordering::Relaxed),
        counts.ack_overdue.load(Ordering::Relaxed)
    );
    Ok(())
}

/// Device → outbox: reads what is waiting (up to a batch), appends it durably, reads again.
fn send_loop(agent: &Agent) {
    let outbox = agent.volume.outbox(&agent.config.node);
    let mut writer = LogWriter::new(outbox.dir(), agent.epoch);
    let mut buffer = vec![0u8; agent.config.mtu as usize + 1];
    let mut seq = 0u64;
    let mut batch_seq = 0u64;
    let mut backlog = Backlog { checked_at: None, full: false };
    let mut failing = false;
    let mut window_full = false;
    while !STOP.load(Ordering::Relaxed) {
        if backlog.is_full(agent) {
            std::thread::sleep(agent.config.poll);
            continue;
        }
        let room = agent.window.wait_for_room(Duration::from_millis(200), &agent.counts.ack_overdue);
        if room == window_full {
            window_full = !room;
            log!(
                "{}",
                if room {
                    "acks came: reading the device again"
                } else {
                    "the window of unacked packets is full: not reading the device"
                }
            );
        }
        if !room {
            continue;
        }
        agent.tun.wait_readable(200);
        let mut packets = Vec::new();
        let mut bytes = 0;
        while packets.len() < BATCH_PACKETS_MAX && bytes < BATCH_BYTES_MAX {
            let length = match agent.tun.read(&mut buffer) {
                Ok(Some(length)) => length,
                Ok(None) => break,
                Err(error) => {
                    log!("reading {}: {error}", agent.tun.name);
                    std::thread::sleep(Duration::from_millis(100));
                    break;
                }
            };
            let bytes_read = &buffer[..length];
            let Ok(header) = parse_ipv4(bytes_read) else {
                agent.counts.dropped_out.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            if header.source != agent.config.addr {
                agent.counts.dropped_out.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            seq += 1;
            bytes += length;
            packets.push(Packet {
                id: PacketId { origin: agent.config.node.clone(), epoch: agent.epoch, seq },
                source: SocketAddrV4::new(agent.config.addr, IP_PORT),
                destination: SocketAddrV4::new(header.destination, IP_PORT),
                sent_unix_us: fsbridge::unix_now_us(),
                payload: bytes_read.to_vec(),
            });
        }
        if packets.is_empty() {
            continue;
        }
        batch_seq += 1;
        let header = BatchHeader {
            kind: BatchKind::Packets,
            node: agent.config.node.clone(),
            epoch: agent.epoch,
            batch_seq,
            flags: fsbridge::format::FLAG_WANTS_ACKS | fsbridge::format::FLAG_STORED_ACKS_ONLY,
        };
        let mut encoder = BatchEncoder::new(&header);
        for packet in packets.iter() {
            encoder.push(&Record::Packet(packet.clone()));
        }
        let encoded = encoder.finish();
        // In the window before the append: once it returns, the server may store the batch and
        // its ack be read before this thread runs again.
        agent.window.add(&packets);
        // The packets are durable before the next is read; while the volume fails the device is
        // not read (the kernel drops at its queue) and this batch is tried again.
        loop {
            match writer.append(&encoded) {
                Ok(()) => {
                    if std::mem::take(&mut failing) {
                        log!("the outbox is written again");
                    }
                    break;
                }
                Err(error) => {
                    if !std::mem::replace(&mut failing, true) {
                        log!("cannot append to the outbox (retrying): {error}");
                    }
                    if STOP.load(Ordering::Relaxed) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
        agent.counts.sent.fetch_add(packets.len() as u64, Ordering::Relaxed);
    }
    writer.seal();
}

/// How many of this agent's outbox segments the server has not finished reading.
struct Backlog {
    checked_at: Option<Instant>,
    full: bool,
}

impl Backlog {
    fn is_full(&mut self, agent: &Agent) -> bool {
        if self.checked_at.is_some_and(|at| at.elapsed() < if self.full { agent.config.poll } else { BACKLOG_CHECK }) {
            return self.full;
        }
        self.checked_at = Some(Instant::now());
        let dir = agent.volume.outbox(&agent.config.node).dir().join("log");
        let Ok(names) = list_names(&dir, usize::MAX) else { return self.full };
        let mine = names.iter().filter(|name| parse_segment_name(name).is_some_and(|(epoch, _)| epoch == agent.epoch));
        let full = mine.count() > OUTBOX_SEGMENTS_MAX;
        if full != self.full {
            log!(
                "{}",
                if full { "the outbox is backed up: not reading the device" } else { "the outbox drains again" }
            );
        }
        self.full = full;
        full
    }
}

/// Inbox → device: takes the inbox files the bells announce (and, each second, those listed),
/// writes their packets into the device, receipts them and removes the files.
fn receive_loop(agent: &Agent) {
    let inbox = agent.volume.inbox(&agent.config.node, IP_PORT);
    let mut dedupe = Dedupe::new();
    let mut readers: Vec<BellReader> = Vec::new();
    let mut rings: Vec<Ring> = Vec::new();
    let mut announced: VecDeque<String> = VecDeque::new();
    let mut swept_at: Option<Instant> = None;
    let mut receipts: Vec<PacketId> = Vec::new();
    let mut receipt_seq = 0u64;
    let mut acks: Vec<String> = Vec::new();
    let mut seen_acks = RecentNames::new(SEEN_ACK_FILES_MAX);
    while !STOP.load(Ordering::Relaxed) {
        let sweep = swept_at.is_none_or(|at| at.elapsed() >= SWEEP_INTERVAL);
        if sweep {
            swept_at = Some(Instant::now());
            discover_bells(agent, &mut readers);
        }
        for reader in &mut readers {
            let _ = reader.poll(sweep, &mut rings);
        }
        for ring in rings.drain(..) {
            match ring.kind {
                RingKind::Packets if ring.port == IP_PORT && announced.len() < ANNOUNCED_MAX => {
                    announced.push_back(batch_file_name(ring.epoch, ring.seq, "pkt"));
                }
                RingKind::Acks if ring.epoch == agent.epoch && acks.len() < ANNOUNCED_MAX => {
                    acks.push(batch_file_name(ring.epoch, ring.seq, "ack"));
                }
                _ => {}
            }
        }
        read_acks(agent, std::mem::take(&mut acks), sweep, &mut seen_acks);
        let mut names: Vec<String> = announced.drain(..announced.len().min(INBOX_FILES_PER_PASS)).collect();
        if sweep {
            match inbox.list(INBOX_FILES_PER_PASS) {
                Ok(listed) => names.extend(listed),
                Err(error) => log!("cannot list the IP inbox: {error}"),
            }
        }
        names.sort_unstable();
        names.dedup();
        let more = !announced.is_empty() || names.len() >= INBOX_FILES_PER_PASS;
        for name in names {
            take_inbox_file(agent, &inbox, &name, &mut dedupe, &mut receipts);
        }
        flush_receipts(agent, &mut receipts, &mut receipt_seq);
        if !more {
            std::thread::sleep(agent.config.poll);
        }
    }
    flush_receipts(agent, &mut receipts, &mut receipt_seq);
}

/// Reads this agent's ack files (those announced, and on a sweep those listed): the packets they
/// name leave the window. Each file is removed once read.
fn read_acks(agent: &Agent, mut names: Vec<String>, sweep: bool, seen: &mut RecentNames) {
    let spool = agent.volume.acks(&agent.config.node);
    if sweep && let Ok(listed) = spool.list(usize::MAX) {
        names.extend(listed);
    }
    names.sort_unstable();
    names.dedup();
    let mine =
        names.into_iter().filter(|name| parse_batch_file_name(name).is_some_and(|(epoch, _)| epoch == agent.epoch));
    for name in mine {
        if seen.contains(&name) {
            continue;
        }
        let Ok(Some(bytes)) = spool.read(&name) else { continue };
        if let Ok(batch) = decode_batch(&bytes) {
            let mut settled = Vec::new();
            for record in batch.records {
                let Record::Ack(ack) = record else { continue };
                if ack.id.epoch != agent.epoch || ack.id.origin != agent.config.node {
                    continue;
                }
                if ack.state == AckState::Rejected {
                    agent.counts.refused.fetch_add(1, Ordering::Relaxed);
                }
                settled.push(ack.id.seq);
            }
            agent.window.acked(settled);
        }
        if spool.remove_unsynced(&name).is_ok() {
            continue;
        }
        // Not removable now (EBUSY on SMB): remember it was read.
        seen.insert(name);
    }
}

fn discover_bells(agent: &Agent, readers: &mut Vec<BellReader>) {
    let dir = agent.volume.bell_dir(&agent.config.node);
    let Ok(names) = list_names(&dir, BELLS_MAX) else { return };
    for name in names {
        let path = dir.join(&name);
        if readers.len() < BELLS_MAX && !readers.iter().any(|reader| reader.path() == path) {
            readers.push(BellReader::new(path));
        }
    }
}

/// Claims one inbox file (a rename: it is gone if another agent of this node took it), writes its
/// packets into the device and queues their receipts.
fn take_inbox_file(
    agent: &Agent,
    inbox: &fsbridge::Spool,
    name: &str,
    dedupe: &mut Dedupe,
    receipts: &mut Vec<PacketId>,
) {
    let claimed = inbox.tmp_dir().join(format!("{name}.claimed-{}", std::process::id()));
    match fsbridge::fsops::rename(inbox.new_dir().join(name), &claimed) {
        Ok(()) => {}
        Err(error) if fsbridge::spool::is_gone(&error) => return,
        Err(error) => {
            log!("cannot claim inbox file {name}: {error}");
            return;
        }
    }
    let batch = match read_regular_file(&claimed) {
        Ok(None) => return,
        Ok(Some(bytes)) => decode_batch(&bytes).map_err(|error| error.to_string()),
        Err(error) => Err(error.to_string()),
    };
    let batch = match batch {
        Ok(batch) if batch.header.kind == BatchKind::Packets => batch,
        Ok(batch) => {
            quarantine(
                agent,
                &claimed,
                &format!("an inbox holds packet batches, found a {:?} batch", batch.header.kind),
            );
            return;
        }
        Err(reason) => {
            quarantine(agent, &claimed, &reason);
            return;
        }
    };
    for record in batch.records {
        let Record::Packet(packet) = record else { continue };
        match dedupe.get(&packet.id) {
            Some(Seen::Received) => {
                // Redelivered (its receipt was lost or late): receipted again, not written again.
                agent.counts.duplicates.fetch_add(1, Ordering::Relaxed);
                receipts.push(packet.id);
                continue;
            }
            Some(Seen::Queued(_)) | None => {}
        }
        let for_us = parse_ipv4(&packet.payload).is_ok_and(|header| header.destination == agent.config.addr);
        if !for_us {
            agent.counts.dropped_in.fetch_add(1, Ordering::Relaxed);
        } else if let Err(error) = agent.tun.write(&packet.payload) {
            // The kernel refused it (the interface is down): as a link would, it is lost; TCP
            // sends it again.
            log!("writing a packet into {}: {error}", agent.tun.name);
            agent.counts.dropped_in.fetch_add(1, Ordering::Relaxed);
        } else {
            agent.counts.received.fetch_add(1, Ordering::Relaxed);
        }
        dedupe.set(&packet.id, Seen::Received);
        receipts.push(packet.id);
    }
    if let Err(error) = remove_file_idempotent(&claimed) {
        log!("cannot remove claimed inbox file {}: {error}", claimed.display());
    }
}

fn quarantine(agent: &Agent, path: &std::path::Path, reason: &str) {
    log!("quarantining {}: {reason}", path.display());
    if let Err(error) = agent.volume.quarantine(path, agent.config.node.as_str(), reason) {
        log!("cannot quarantine {}: {error}", path.display());
    }
}

/// Writes one receipt batch for the packets taken since the last (kept, bounded, if that fails:
/// a receipt not written costs a redelivery, which the duplicate filter absorbs).
fn flush_receipts(agent: &Agent, receipts: &mut Vec<PacketId>, receipt_seq: &mut u64) {
    if receipts.is_empty() {
        return;
    }
    *receipt_seq += 1;
    let header = BatchHeader {
        kind: BatchKind::Receipts,
        node: agent.config.node.clone(),
        epoch: agent.epoch,
        batch_seq: *receipt_seq,
        flags: 0,
    };
    let mut encoder = BatchEncoder::new(&header);
    for id in receipts.iter() {
        encoder.push(&Record::Receipt(id.clone()));
    }
    let name = batch_file_name(agent.epoch, *receipt_seq, "rcpt");
    match agent.volume.receipts(&agent.config.node).publish_volatile(&name, &encoder.finish()) {
        Ok(_) => receipts.clear(),
        Err(error) => {
            log!("cannot write receipts ({} packets; kept): {error}", receipts.len());
            if receipts.len() > RECEIPTS_PENDING_MAX {
                receipts.drain(..receipts.len() - RECEIPTS_PENDING_MAX);
            }
        }
    }
}
