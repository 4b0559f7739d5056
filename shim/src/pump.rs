//! The receive thread: moves datagrams from the volume (and from the real network, for sockets
//! bound there too) into the app's fabric sockets, and writes receipts and reads acks.
//!
//! One pass, every `FTSS_POLL_MS` or sooner when a socket becomes writable or the real network has
//! a datagram:
//! 1. write a receipt batch for everything the app received since the last pass;
//! 2. for each fabric socket with a port: inject held datagrams, then read its inbox files in name
//!    order, drop duplicates, inject, and remove each file once all of it is injected or held;
//! 3. in `guaranteed` mode, read new ack files for this process;
//! 4. relay datagrams that arrived on the real side sockets.

use std::collections::{HashSet, VecDeque};
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;

use fsbridge::format::{BatchEncoder, PAYLOAD_BYTES_MAX, decode_batch};
use fsbridge::layout::batch_file_name;
use fsbridge::{BatchHeader, BatchKind, Record};
use libc::{c_int, sockaddr_in, socklen_t};

use crate::config::AckMode;
use crate::log;
use crate::real::real;
use crate::socket::{INJECT_HEADER_BYTES, Shim, Sock, inject_header};

/// Inbox files read per socket per pass.
const INBOX_FILES_PER_PASS: usize = 16;
/// Datagrams relayed from one side socket per pass.
const RELAY_PER_PASS: usize = 256;
/// Ack file names remembered as already read (older ones are removed by the server by then).
const SEEN_ACK_FILES_MAX: usize = 4096;

pub fn run(shim: &'static Shim) {
    let mut receipt_seq = 0u64;
    let mut seen_acks: (HashSet<String>, VecDeque<String>) = (HashSet::new(), VecDeque::new());
    loop {
        flush_receipts(shim, &mut receipt_seq);
        let socks = shim.socks();
        let mut waiting_for_room = Vec::new();
        for sock in &socks {
            if !fill(shim, sock) {
                waiting_for_room.push(sock.clone());
            }
        }
        if shim.config.ack == AckMode::Guaranteed {
            read_acks(shim, &mut seen_acks);
        }
        wait(shim, &socks, &waiting_for_room);
    }
}

/// Sleeps until the poll interval ends, a side socket has a datagram, or a full socket has room.
fn wait(shim: &Shim, socks: &[Arc<Sock>], waiting_for_room: &[Arc<Sock>]) {
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
    let timeout = shim.config.poll.as_millis().min(60_000) as c_int;
    // SAFETY: fds is a valid array of pollfd.
    let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
    if ready <= 0 {
        return;
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
        // SAFETY: zeroed sockaddr_in is valid; buffer is live.
        let mut from: sockaddr_in = unsafe { zeroed() };
        let mut from_len = size_of::<sockaddr_in>() as socklen_t;
        let payload = &mut buffer[INJECT_HEADER_BYTES..];
        let received = unsafe {
            (real().recvfrom)(
                sock.side,
                payload.as_mut_ptr().cast(),
                payload.len(),
                libc::MSG_DONTWAIT,
                (&mut from as *mut sockaddr_in).cast(),
                &mut from_len,
            )
        };
        if received < 0 {
            return;
        }
        let source = SocketAddrV4::new(Ipv4Addr::from(u32::from_be(from.sin_addr.s_addr)), u16::from_be(from.sin_port));
        buffer[..INJECT_HEADER_BYTES].copy_from_slice(&inject_header(source, 0));
        // A full app socket drops the datagram, as the kernel would for plain UDP.
        let _ = inject(sock, &buffer[..INJECT_HEADER_BYTES + received as usize]);
    }
}

/// Sends one datagram into the app's socket. False if there is no room now.
fn inject(sock: &Sock, datagram: &[u8]) -> bool {
    // SAFETY: datagram is a live buffer; shim_end is our fd.
    let sent = unsafe {
        libc::send(sock.shim_end, datagram.as_ptr().cast(), datagram.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
    };
    sent >= 0
}

/// Injects held datagrams, then new inbox files. Returns false if the app's socket is full.
fn fill(shim: &Shim, sock: &Arc<Sock>) -> bool {
    let Some(local) = sock.lock().local else { return true };
    let mut held = sock.held.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    while let Some(datagram) = held.front() {
        if !inject(sock, datagram) {
            return false;
        }
        held.pop_front();
    }
    let inbox = shim.volume.inbox(&shim.config.node, local.port());
    let names = match inbox.list(INBOX_FILES_PER_PASS) {
        Ok(names) => names,
        Err(error) => {
            log!("cannot list inbox of port {}: {error}", local.port());
            return true;
        }
    };
    for name in names {
        let path = inbox.new_dir().join(&name);
        let batch = match inbox.read(&name) {
            Ok(None) => continue,
            Ok(Some(bytes)) => decode_batch(&bytes).map_err(|error| error.to_string()),
            Err(error) => Err(error.to_string()),
        };
        let batch = match batch {
            Ok(batch) if batch.header.kind == BatchKind::Packets => batch,
            Ok(batch) => {
                quarantine(
                    shim,
                    &path,
                    &format!("an inbox holds packet batches, found a {:?} batch", batch.header.kind),
                );
                continue;
            }
            Err(reason) => {
                quarantine(shim, &path, &reason);
                continue;
            }
        };
        for record in batch.records {
            let Record::Packet(packet) = record else { continue };
            let duplicate = shim.dedupe.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).check(&packet.id);
            match duplicate {
                // Redelivered after the app already had it: the receipt was lost or late; send it again.
                Some(true) => shim.receipts.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).push(packet.id),
                Some(false) => {}
                None => {
                    let token = shim.next_token();
                    sock.tokens.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).insert(token, packet.id);
                    let mut datagram = Vec::with_capacity(INJECT_HEADER_BYTES + packet.payload.len());
                    datagram.extend_from_slice(&inject_header(packet.source, token));
                    datagram.extend_from_slice(&packet.payload);
                    held.push_back(datagram);
                }
            }
        }
        // Everything in the file is now injected or held in memory; if this process dies the
        // missing receipts make the server deliver it again.
        if let Err(error) = inbox.remove(&name) {
            log!("cannot remove inbox file {name}: {error}");
        }
        while let Some(datagram) = held.front() {
            if !inject(sock, datagram) {
                return false;
            }
            held.pop_front();
        }
    }
    true
}

fn quarantine(shim: &Shim, path: &std::path::Path, reason: &str) {
    log!("quarantining {}: {reason}", path.display());
    if let Err(error) = shim.volume.quarantine(path, shim.config.node.as_str(), reason) {
        log!("cannot quarantine {}: {error}", path.display());
    }
}

fn flush_receipts(shim: &Shim, receipt_seq: &mut u64) {
    let ids = std::mem::take(&mut *shim.receipts.lock().unwrap_or_else(|poisoned| poisoned.into_inner()));
    if ids.is_empty() {
        return;
    }
    *receipt_seq += 1;
    let header = BatchHeader {
        kind: BatchKind::Receipts,
        node: shim.config.node.clone(),
        epoch: shim.epoch,
        batch_seq: *receipt_seq,
    };
    let mut encoder = BatchEncoder::new(&header);
    for id in &ids {
        encoder.push(&Record::Receipt(id.clone()));
    }
    let name = batch_file_name(shim.epoch, *receipt_seq, "rcpt");
    if let Err(error) = shim.volume.receipts(&shim.config.node).publish(&name, &encoder.finish()) {
        log!("cannot write receipts ({} packets; the server will deliver them again): {error}", ids.len());
    }
}

fn read_acks(shim: &Shim, seen: &mut (HashSet<String>, VecDeque<String>)) {
    let spool = shim.volume.acks(&shim.config.node);
    let Ok(names) = spool.list(usize::MAX) else { return };
    for name in names {
        if seen.0.contains(&name) {
            continue;
        }
        let Ok(Some(bytes)) = spool.read(&name) else { continue };
        if let Ok(batch) = decode_batch(&bytes) {
            let mine = batch.records.into_iter().filter_map(|record| match record {
                Record::Ack(ack) if ack.id.epoch == shim.epoch && ack.id.origin == shim.config.node => Some(ack.id.seq),
                _ => None,
            });
            shim.outbox.record_acks(mine);
        }
        seen.0.insert(name.clone());
        seen.1.push_back(name);
        if seen.1.len() > SEEN_ACK_FILES_MAX
            && let Some(oldest) = seen.1.pop_front()
        {
            seen.0.remove(&oldest);
        }
    }
}
