//! The receive thread: moves datagrams from the volume (and from the real network, for sockets
//! bound there too) into the app's fabric sockets, and writes receipts and reads acks.
//!
//! One pass, every `FTSS_POLL_MS` or sooner when a socket becomes writable or the real network has
//! a datagram (at once when the last pass took its full share of a backlog of inbox files):
//! 1. write a receipt batch for everything the app received since the last pass;
//! 2. for each fabric socket with a port: inject held datagrams, then claim its inbox files in name
//!    order (a rename, so that two processes serving one port — a forked child and its parent, or
//!    SO_REUSEPORT apps — never both take a file), drop duplicates, inject, and remove each file
//!    once all of it is injected or held;
//! 3. while a sender waits for the server's ack (`guaranteed`), read and remove the ack files the
//!    server wrote for this process;
//! 4. relay datagrams that arrived on the real side sockets.
//!
//! Over the fabric transport, deliveries arrive on the link thread ([`deliver_from_fabric`]) and
//! acks with them; a pass then only injects what is held, sends receipts and tells the server the
//! bound ports.
//!
//! A connected socket only gets datagrams from its peer (the kernel's rule for UDP); the rest are
//! dropped here (and receipted, so the server does not deliver them again).

use std::collections::{HashSet, VecDeque};
use std::mem::{size_of, zeroed};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use fsbridge::format::{BatchEncoder, PAYLOAD_BYTES_MAX, decode_batch};
use fsbridge::layout::{batch_file_name, parse_batch_file_name};
use fsbridge::spool::{RecentNames, read_regular_file, remove_file_idempotent};
use fsbridge::{BatchHeader, BatchKind, Packet, Record, Spool};
use libc::{c_int, socklen_t};

use crate::addr::{self, INJECT_HEADER_BYTES, inject_header};
use crate::doorbell::Doorbells;
use crate::log;
use crate::real::real;
use crate::state::{Shim, Sock, mark_received};
use crate::sys::lock;
use fsbridge::dedupe::Seen;

/// Inbox files read per socket per pass.
const INBOX_FILES_PER_PASS: usize = 16;
/// Datagrams relayed from one side socket per pass.
const RELAY_PER_PASS: usize = 256;
/// Ack file names remembered as read but not yet removed (a removal the file system refused).
const SEEN_ACK_FILES_MAX: usize = 4096;

pub fn run(shim: &'static Shim) {
    let mut seen_acks = RecentNames::new(SEEN_ACK_FILES_MAX);
    let mut bells = Doorbells::new();
    // The bell directory's inotify watch (a hint that works on local file systems only).
    let mut hint = None;
    let mut receipts_flushed_at = Instant::now();
    loop {
        // Receipts go out once a poll interval, however often the hint wakes the pass: each batch
        // is a file the server reads and a done record it syncs, and nothing waits for them.
        if receipts_flushed_at.elapsed() >= shim.config.poll {
            receipts_flushed_at = Instant::now();
            flush_receipts(shim);
        }
        let socks = shim.socks();
        // Taken before any socket lock: the table comes first in the lock order.
        let open: HashSet<u64> = socks.iter().map(|sock| sock.id).collect();
        tend_claims(shim, &open);
        let fabric = shim.link();
        let awaits_acks = fabric.is_none() && shim.outbox().awaits_acks();
        // Over the volume, the bells say which inbox and ack files are new; the directories are
        // listed only on a sweep (see `doorbell`). Over the fabric there are no such files.
        let reads_bells = fabric.is_none() && (!socks.is_empty() || awaits_acks);
        if reads_bells && bells.sweep_due() {
            // Before the bells are read, so that a ring after the read wakes the wait. Again at
            // every sweep: the directory may have appeared (or been made again) since.
            hint = crate::notify::watch(&shim.volume.bell_dir(&shim.config.node)).or(hint);
        }
        let sweep = reads_bells && bells.pass(shim, &bound_ports(&socks).into_iter().collect());
        // One listing of in/ per sweep says which ports have an inbox at all: a send-only
        // socket's port has none, and probing it costs a failed open (a round trip on SMB/NFS).
        let listed_ports: HashSet<u16> = if sweep {
            shim.volume.inbox_ports(&shim.config.node).map(|ports| ports.into_iter().collect()).unwrap_or_default()
        } else {
            HashSet::new()
        };
        let mut waiting_for_room = Vec::new();
        let mut more = false;
        for sock in &socks {
            match fill(shim, sock, &open, &mut bells, &listed_ports) {
                Filled::Done => {}
                Filled::More => more = true,
                Filled::Full => waiting_for_room.push(sock.clone()),
            }
        }
        match fabric {
            Some(link) => link.announce_ports(bound_ports(&socks)),
            None if awaits_acks => read_acks(shim, &mut bells, sweep, &mut seen_acks),
            None => {}
        }
        // A backlog of inbox files: the next pass starts at once (relaying only what is there).
        // Every bell starts a pass: the server rings a few times a cycle at most, so the passes
        // are bounded by its cycles (a pass takes what every bell since the last one announced).
        let timeout = if more { Duration::ZERO } else { shim.config.poll };
        wait(&socks, &waiting_for_room, hint.filter(|_| reads_bells), timeout);
    }
}

/// How far a pass got with one socket's inbox.
enum Filled {
    /// Everything there was is injected (or there was nothing).
    Done,
    /// The pass's share of files is injected; more may be waiting.
    More,
    /// The app's socket is full: the rest waits until it reads.
    Full,
}

/// The ports of this process's fabric sockets.
fn bound_ports(socks: &[Arc<Sock>]) -> Vec<u16> {
    socks.iter().filter_map(|sock| sock.lock().local.map(|local| local.port())).collect()
}

/// Most datagrams held for one socket from fabric deliveries; more are left to the server's
/// redelivery (no receipt is written for them).
const FABRIC_HELD_MAX: usize = 8192;

/// Packets the server delivered over the fabric: each goes to the socket bound to its port, with
/// the same duplicate and peer rules as inbox files. One for a port with no socket (it just
/// closed) or a socket holding too many is left without a receipt, so the server delivers it
/// again later.
pub fn deliver_from_fabric(shim: &Shim, packets: Vec<Packet>) {
    let socks = shim.socks();
    let open: HashSet<u64> = socks.iter().map(|sock| sock.id).collect();
    let mut touched: Vec<&Arc<Sock>> = Vec::new();
    for packet in packets {
        let port = packet.destination.port();
        let found = socks.iter().find_map(|sock| {
            let state = sock.lock();
            state.local.filter(|local| local.port() == port).map(|_| (sock, state.peer))
        });
        let Some((sock, peer)) = found else { continue };
        let target = Target { sock, peer, open: &open };
        let mut held = lock(&sock.held);
        if held.len() >= FABRIC_HELD_MAX {
            continue;
        }
        take_packet(shim, &target, &mut held, packet);
        drop(held);
        if !touched.iter().any(|seen| Arc::ptr_eq(seen, sock)) {
            touched.push(sock);
        }
    }
    for sock in touched {
        let mut held = lock(&sock.held);
        while let Some(datagram) = held.front() {
            if !inject(sock, datagram) {
                break; // the receive thread injects the rest when the app makes room
            }
            held.pop_front();
        }
    }
}

/// Sleeps until `timeout` ends, a side socket has a datagram, a full socket has room, a new
/// fabric socket nudges it, or (on a local file system) the server rings a bell of this node.
fn wait(socks: &[Arc<Sock>], waiting_for_room: &[Arc<Sock>], hint: Option<c_int>, timeout: Duration) {
    let mut fds: Vec<libc::pollfd> = Vec::new();
    let mut relays = Vec::new();
    for sock in socks {
        if sock.lock().side_bound {
            fds.push(libc::pollfd { fd: sock.side, events: libc::POLLIN, revents: 0 });
            relays.push(sock.clone());
        }
    }
    for sock in waiting_for_room {
        fds.push(libc::pollfd { fd: sock.shim_end, events: libc::POLLOUT, revents: 0 });
    }
    // The nudge and the hint, each with its index in `fds`.
    let wakers: Vec<(c_int, usize)> = [crate::notify::nudge_fd(), hint]
        .into_iter()
        .flatten()
        .map(|fd| {
            fds.push(libc::pollfd { fd, events: libc::POLLIN, revents: 0 });
            (fd, fds.len() - 1)
        })
        .collect();
    // Rounded up: a wait of 0.4 ms must not become a poll that returns at once.
    let timeout = timeout.as_micros().div_ceil(1000).min(60_000) as c_int;
    // SAFETY: fds is a valid array of pollfd.
    let ready = unsafe { (real().poll)(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
    if ready <= 0 {
        return;
    }
    for (fd, index) in wakers {
        if fds[index].revents != 0 {
            crate::notify::drain(fd);
        }
    }
    for (index, sock) in relays.iter().enumerate() {
        if fds[index].revents & libc::POLLIN != 0 {
            relay(sock);
        }
    }
}

/// Moves real-network datagrams from the side socket into the app's socket.
fn relay(sock: &Sock) {
    let mut buffer = vec![0u8; INJECT_HEADER_BYTES + PAYLOAD_BYTES_MAX];
    for _ in 0..RELAY_PER_PASS {
        // SAFETY: zeroed storage is valid; buffer is live.
        let mut from: libc::sockaddr_storage = unsafe { zeroed() };
        let mut from_len = size_of::<libc::sockaddr_storage>() as socklen_t;
        let payload = &mut buffer[INJECT_HEADER_BYTES..];
        let received = unsafe {
            (real().recvfrom)(
                sock.side,
                payload.as_mut_ptr().cast(),
                payload.len(),
                libc::MSG_DONTWAIT,
                (&mut from as *mut libc::sockaddr_storage).cast(),
                &mut from_len,
            )
        };
        if received < 0 {
            return;
        }
        let Some(source) = addr::from_storage(&from) else { continue };
        if !sock.accepts(source) {
            continue;
        }
        buffer[..INJECT_HEADER_BYTES].copy_from_slice(&inject_header(source, None));
        // A full app socket drops the datagram, as the kernel would for plain UDP.
        let _ = inject(sock, &buffer[..INJECT_HEADER_BYTES + received as usize]);
    }
}

/// Sends one datagram into the app's socket. False if there is no room now.
fn inject(sock: &Sock, datagram: &[u8]) -> bool {
    // SAFETY: datagram is a live buffer; shim_end is our fd.
    let sent = unsafe {
        (real().sendto)(
            sock.shim_end,
            datagram.as_ptr().cast(),
            datagram.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            std::ptr::null(),
            0,
        )
    };
    sent >= 0
}

/// Takes `name` out of the inbox by renaming it aside; `None` if another process took it first.
fn claim(inbox: &Spool, name: &str) -> Option<std::path::PathBuf> {
    let claimed = inbox.tmp_dir().join(format!("{name}.claimed-{}", std::process::id()));
    match fsbridge::fsops::rename(inbox.new_dir().join(name), &claimed) {
        Ok(()) => Some(claimed),
        Err(error) if fsbridge::spool::is_gone(&error) => None,
        Err(error) => {
            log!("cannot claim inbox file {name}: {error}");
            None
        }
    }
}

/// Injects held datagrams, then new inbox files: those the bells announced for the socket's port,
/// and on a sweep those listed in its inbox (`listed_ports`: the ports that have one). Says
/// whether more may wait or the socket is full.
fn fill(
    shim: &Shim,
    sock: &Arc<Sock>,
    open: &HashSet<u64>,
    bells: &mut Doorbells,
    listed_ports: &HashSet<u16>,
) -> Filled {
    let (local, peer) = {
        let state = sock.lock();
        (state.local, state.peer)
    };
    let Some(local) = local else { return Filled::Done };
    let target = Target { sock, peer, open };
    let mut held = lock(&sock.held);
    while let Some(datagram) = held.front() {
        if !inject(sock, datagram) {
            return Filled::Full;
        }
        held.pop_front();
    }
    let inbox = shim.volume.inbox(&shim.config.node, local.port());
    let (names, full_share) = inbox_names(&inbox, local.port(), bells, listed_ports);
    let mut claimed = 0;
    let mut names = names.into_iter();
    while let Some(name) = names.next() {
        let Some(path) = claim(&inbox, &name) else { continue };
        claimed += 1;
        let Some(waiting) = take_file(shim, &target, &mut held, &path) else { continue };
        // Everything in the file is now injected or held in memory. The file stays claimed while
        // the app has not read all of it (so that no sibling on the port gets it again); if this
        // process dies the missing receipts make the server deliver it again.
        if !lock(&shim.claims).hold(path.clone(), sock.id, &waiting)
            && let Err(error) = remove_file_idempotent(&path)
        {
            log!("cannot remove claimed inbox file {}: {error}", path.display());
        }
        while let Some(datagram) = held.front() {
            if !inject(sock, datagram) {
                // The rest waits for the app to make room, in order.
                bells.put_back_inbox(local.port(), names);
                return Filled::Full;
            }
            held.pop_front();
        }
    }
    if full_share && claimed > 0 { Filled::More } else { Filled::Done }
}

/// The inbox files to take for `port` this pass, in publish order: those the bells announced,
/// and on a sweep (`listed_ports`) those listed. Also whether more may wait: only behind a full
/// share of files this pass could take (files it cannot claim must not turn the wait into a spin).
fn inbox_names(inbox: &Spool, port: u16, bells: &mut Doorbells, listed_ports: &HashSet<u16>) -> (Vec<String>, bool) {
    let mut names = bells.take_inbox(port, INBOX_FILES_PER_PASS);
    let mut full_share = bells.has_inbox(port);
    if listed_ports.contains(&port) {
        match inbox.list(INBOX_FILES_PER_PASS) {
            Ok(listed) => {
                full_share |= listed.len() == INBOX_FILES_PER_PASS;
                for name in listed {
                    if !names.contains(&name) {
                        names.push(name);
                    }
                }
            }
            Err(error) => log!("cannot list inbox of port {port}: {error}"),
        }
    }
    // Names sort in publish order (one server epoch's sequence), so announced and listed files
    // are taken in the order they were stored.
    names.sort_unstable();
    names.dedup();
    let full_share = full_share || names.len() >= INBOX_FILES_PER_PASS;
    (names, full_share)
}

/// Reads the claimed inbox file at `path` and takes its packets (injected, or held in order).
/// Returns the keys of those still waiting for the app; `None` if the file was gone or was
/// quarantined.
fn take_file(
    shim: &Shim,
    target: &Target<'_>,
    held: &mut VecDeque<Vec<u8>>,
    path: &std::path::Path,
) -> Option<Vec<u128>> {
    let batch = match read_regular_file(path) {
        Ok(None) => return None,
        Ok(Some(bytes)) => decode_batch(&bytes).map_err(|error| error.to_string()),
        Err(error) => Err(error.to_string()),
    };
    let batch = match batch {
        Ok(batch) if batch.header.kind == BatchKind::Packets => batch,
        Ok(batch) => {
            quarantine(shim, path, &format!("an inbox holds packet batches, found a {:?} batch", batch.header.kind));
            return None;
        }
        Err(reason) => {
            quarantine(shim, path, &reason);
            return None;
        }
    };
    let mut waiting = Vec::new();
    for record in batch.records {
        let Record::Packet(packet) = record else { continue };
        let key = fsbridge::dedupe::Dedupe::key(&packet.id);
        if take_packet(shim, target, held, packet) {
            waiting.push(key);
        }
    }
    Some(waiting)
}

/// The socket an inbox is read for, as it was when the pass began (read before its `held` lock).
struct Target<'a> {
    sock: &'a Sock,
    peer: Option<SocketAddr>,
    /// Ids of the sockets open in this process.
    open: &'a HashSet<u64>,
}

/// Removes claimed files that are done and refreshes the others (see `claims`).
fn tend_claims(shim: &Shim, open: &HashSet<u64>) {
    let chores = lock(&shim.claims).chores(open);
    for path in chores.remove {
        if let Err(error) = remove_file_idempotent(&path) {
            log!("cannot remove claimed inbox file {}: {error}", path.display());
        }
    }
    for path in chores.touch {
        // Both times become now (the file server's now, over NFS).
        let _ = fsbridge::fsops::touch(&path);
    }
}

/// At exit: every claimed file goes, so that what the app did not read is delivered again soon.
pub fn release_claims(shim: &Shim) {
    for path in lock(&shim.claims).take_all() {
        let _ = remove_file_idempotent(&path);
    }
}

/// Decides what becomes of one packet from the inbox: held for injection, receipted at once, or
/// ignored as a duplicate. True if it is held for the app.
fn take_packet(shim: &Shim, target: &Target, held: &mut VecDeque<Vec<u8>>, packet: Packet) -> bool {
    if !shim.config.is_fabric(*packet.source.ip()) {
        // From outside, through the gateway's ingress: replies to it go back that way.
        lock(&shim.ingress_peers).heard(packet.source);
    }
    let seen = lock(&shim.dedupe).get(&packet.id);
    let from_peer = target.peer.is_none_or(|peer| peer == SocketAddr::V4(packet.source));
    let sock = target.sock;
    match seen {
        // Redelivered after the app already had it: the receipt was lost or late; send it again.
        Some(Seen::Received) => {
            lock(&shim.receipts).push(packet.id);
            false
        }
        // Still waiting in a socket that is open: the app will read it.
        Some(Seen::Queued(holder)) if target.open.contains(&holder) => false,
        // A connected socket does not receive from others: dropped, as the kernel would, and done.
        _ if !from_peer => {
            mark_received(shim, &packet.id);
            false
        }
        // New, or its socket was closed before the app read it: hand it over (again).
        _ => {
            lock(&shim.dedupe).set(&packet.id, Seen::Queued(sock.id));
            let mut datagram = Vec::with_capacity(INJECT_HEADER_BYTES + packet.payload.len());
            datagram.extend_from_slice(&inject_header(SocketAddr::V4(packet.source), Some(&packet.id)));
            datagram.extend_from_slice(&packet.payload);
            held.push_back(datagram);
            true
        }
    }
}

fn quarantine(shim: &Shim, path: &std::path::Path, reason: &str) {
    log!("quarantining {}: {reason}", path.display());
    if let Err(error) = shim.volume.quarantine(path, shim.config.node.as_str(), reason) {
        log!("cannot quarantine {}: {error}", path.display());
    }
}

/// Writes a receipt batch for everything the app received since the last one (also at exit).
pub fn flush_receipts(shim: &Shim) {
    let ids = std::mem::take(&mut *lock(&shim.receipts));
    if ids.is_empty() {
        return;
    }
    if let Some(link) = shim.link() {
        let unsent = link.send_receipts(ids);
        if !unsent.is_empty() {
            let mut pending = lock(&shim.receipts);
            if pending.len() + unsent.len() <= crate::fabric::RECEIPTS_PENDING_MAX {
                pending.extend(unsent);
            }
        }
        return;
    }
    let receipt_seq = shim.receipt_seq.fetch_add(1, Ordering::Relaxed) + 1;
    let epoch = shim.epoch();
    let header = BatchHeader {
        kind: BatchKind::Receipts,
        node: shim.config.node.clone(),
        epoch,
        batch_seq: receipt_seq,
        flags: 0,
    };
    let mut encoder = BatchEncoder::new(&header);
    for id in &ids {
        encoder.push(&Record::Receipt(id.clone()));
    }
    let name = batch_file_name(epoch, receipt_seq, "rcpt");
    // Not synced: a receipt lost in a crash of this node only makes the server deliver the packet
    // again, and the receiving shim hands a packet it has seen to the app only once.
    match shim.volume.receipts(&shim.config.node).publish_volatile(&name, &encoder.finish()) {
        Ok(_) => {
            if RECEIPTS_FAILING.swap(false, Ordering::Relaxed) {
                log!("receipts are written again");
            }
        }
        Err(error) => {
            // Kept for the next pass (bounded): a dropped receipt costs a redelivery.
            if !RECEIPTS_FAILING.swap(true, Ordering::Relaxed) {
                log!("cannot write receipts ({} packets; kept and tried again each pass): {error}", ids.len());
            }
            let mut pending = lock(&shim.receipts);
            let room = crate::fabric::RECEIPTS_PENDING_MAX.saturating_sub(pending.len());
            pending.extend(ids.into_iter().take(room));
        }
    }
}

/// Did the last receipt write fail (logged once until one works again)?
static RECEIPTS_FAILING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Reads the ack files the bells announced for this process and, on a sweep, those listed.
fn read_acks(shim: &Shim, bells: &mut Doorbells, sweep: bool, seen: &mut RecentNames) {
    let spool = shim.volume.acks(&shim.config.node);
    let mut names = bells.take_acks();
    if sweep && let Ok(listed) = spool.list(usize::MAX) {
        for name in listed {
            if !names.contains(&name) {
                names.push(name);
            }
        }
    }
    let epoch = shim.epoch();
    // The server writes each process's acks into files named after its epoch; this process is
    // their only reader and removes each once read (the server sweeps those of dead processes).
    let mine = names.into_iter().filter(|name| parse_batch_file_name(name).is_some_and(|(of, _)| of == epoch));
    for name in mine {
        if seen.contains(&name) {
            continue;
        }
        let Ok(Some(bytes)) = spool.read(&name) else { continue };
        if let Ok(batch) = decode_batch(&bytes) {
            let acked = batch.records.into_iter().filter_map(|record| match record {
                Record::Ack(ack) if ack.id.epoch == epoch && ack.id.origin == shim.config.node => Some(ack.id.seq),
                _ => None,
            });
            shim.outbox().record_acks(acked);
        }
        if spool.remove_unsynced(&name).is_ok() {
            continue;
        }
        // Not removable now (EBUSY on SMB): remember it was read.
        seen.insert(name);
    }
}
