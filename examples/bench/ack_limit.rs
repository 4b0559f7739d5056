//! `ack-limit`: the fastest a server that acks only after its fdatasync can go on this machine,
//! with nothing of ftss in it. Each sender thread writes one datagram-sized message to its own
//! unix stream socket and waits for an 8-byte ack; one server thread polls every socket, takes
//! every whole message that has arrived, appends them all to one file with a single positioned
//! write inside zeros written ahead (so the sync writes data, never the inode), fdatasyncs, and
//! only then acks each message. That is a group commit with one event loop, Redis's shape, with
//! no parsing, checksums, index, delivery or spool: the floor under ftss-fabric and redis-stream
//! alike (both add their own work to the same sync and the same two thread crossings).
//!
//! `deliver-limit` is the same loop with the rest of what ftss-fabric and redis-stream do for each
//! message: after the acks the server writes the group's messages to a receiver thread on a unix
//! socket of its own, and the receiver sends back an 8-byte receipt for each message, at most
//! once a millisecond (as the shim sends its receipts at FTSS_POLL_MS), which the server appends
//! to its next group and syncs with it. Still no parsing, checksums, index or spool: the ceiling
//! of a transport that stores, acks, delivers and takes receipts durably, on this machine.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::report::{Measurement, percentile};

/// Zeros written ahead of the appends at a time (the sync that writes them also writes the inode).
const ZEROS_AHEAD_BYTES: u64 = 1024 * 1024;
/// Latency samples kept per sender.
const SAMPLES_PER_SENDER_MAX: usize = 1_000_000;
/// Bytes a sender's socket may hold unread at the server: one message each is all a closed loop has.
const READ_BYTES_MAX: usize = 256 * 1024;
/// Bytes of delivered messages the server holds for a receiver that has not read them; beyond it
/// the run fails (a closed loop of senders never gets near it unless the receiver stalls).
const DELIVERY_BACKLOG_BYTES_MAX: usize = 64 * 1024 * 1024;
/// How often the receiver sends its receipts (the bench's FTSS_POLL_MS for the shims).
const RECEIPT_INTERVAL: Duration = Duration::from_millis(1);
/// Bytes of one receipt, and of one ack.
const RECEIPT_BYTES: usize = 8;

/// The server's side of the receiver (deliver-limit): messages not yet written to it, and the
/// bytes of a receipt read so far.
struct Delivery {
    stream: UnixStream,
    /// Bytes for the receiver; those before `written` went out already.
    backlog: Vec<u8>,
    written: usize,
    partial: usize,
}

impl Delivery {
    /// Writes as much of the backlog as the socket takes now.
    fn flush(&mut self) -> io::Result<()> {
        while self.written < self.backlog.len() {
            match self.stream.write(&self.backlog[self.written..]) {
                Ok(written) => {
                    self.written += written;
                    if self.written == self.backlog.len() {
                        self.backlog.clear();
                        self.written = 0;
                    }
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return Err(error),
            }
        }
        Ok(())
    }

    /// Reads the receipts that came; appends one 8-byte record per whole receipt to `group`.
    fn read_receipts(&mut self, buffer: &mut [u8], group: &mut Vec<u8>) -> io::Result<bool> {
        loop {
            match self.stream.read(buffer) {
                Ok(0) => return Ok(false),
                Ok(read) => {
                    let bytes = self.partial + read;
                    let whole = bytes / RECEIPT_BYTES;
                    self.partial = bytes % RECEIPT_BYTES;
                    group.extend(std::iter::repeat_n(0x72_u8, whole * RECEIPT_BYTES));
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Ok(true),
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return Err(error),
            }
        }
    }
}

/// The server's side of one sender: bytes of a message read so far, whole messages waiting for
/// the sync.
struct Peer {
    stream: UnixStream,
    partial: usize,
    waiting: usize,
}

fn serve(
    mut peers: Vec<Peer>,
    mut delivery: Option<Delivery>,
    payload: usize,
    file: File,
    stop: &AtomicBool,
) -> io::Result<u64> {
    let mut buffer = vec![0_u8; READ_BYTES_MAX];
    let mut group = Vec::with_capacity(READ_BYTES_MAX);
    let mut offset = 0_u64;
    let mut zeroed_end = 0_u64;
    let mut syncs = 0_u64;
    let acks = vec![0x61_u8; 8 * 1024];
    for peer in &peers {
        peer.stream.set_nonblocking(true)?;
    }
    if let Some(delivery) = &delivery {
        delivery.stream.set_nonblocking(true)?;
    }
    let mut fds: Vec<libc::pollfd> = peers
        .iter()
        .map(|peer| libc::pollfd { fd: peer.stream.as_raw_fd(), events: libc::POLLIN, revents: 0 })
        .collect();
    // The receiver's socket is polled last: receipts in, and room for the backlog out.
    if let Some(delivery) = &delivery {
        fds.push(libc::pollfd { fd: delivery.stream.as_raw_fd(), events: libc::POLLIN, revents: 0 });
    }
    let mut delivered = Vec::with_capacity(READ_BYTES_MAX);
    while !stop.load(Ordering::Relaxed) {
        if let Some(delivery) = &delivery {
            let last = fds.len() - 1;
            fds[last].events =
                if delivery.written == delivery.backlog.len() { libc::POLLIN } else { libc::POLLIN | libc::POLLOUT };
        }
        // SAFETY: fds is a valid array of pollfd of the given length.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 100) };
        if ready < 0 {
            let error = io::Error::last_os_error();
            if error.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(error);
        }
        group.clear();
        delivered.clear();
        if let Some(delivery) = delivery.as_mut()
            && fds[fds.len() - 1].revents != 0
        {
            delivery.flush()?;
            if !delivery.read_receipts(&mut buffer, &mut group)? {
                // The receiver finished.
                let last = fds.len() - 1;
                fds[last].fd = -1;
            }
        }
        for (peer, fd) in peers.iter_mut().zip(&mut fds) {
            if fd.revents == 0 {
                continue;
            }
            loop {
                match peer.stream.read(&mut buffer) {
                    // A sender that finished closed its end: poll no longer looks at it.
                    Ok(0) => {
                        fd.fd = -1;
                        break;
                    }
                    Ok(read) => {
                        group.extend_from_slice(&buffer[..read]);
                        if delivery.is_some() {
                            delivered.extend_from_slice(&buffer[..read]);
                        }
                        let bytes = peer.partial + read;
                        peer.waiting += bytes / payload;
                        peer.partial = bytes % payload;
                    }
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                    Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                    Err(error) => return Err(error),
                }
            }
        }
        if group.is_empty() {
            continue;
        }
        let end = offset + group.len() as u64;
        file.write_all_at(&group, offset)?;
        if end > zeroed_end {
            zeroed_end = (end / ZEROS_AHEAD_BYTES + 1) * ZEROS_AHEAD_BYTES;
            file.write_all_at(&vec![0; (zeroed_end - end) as usize], end)?;
        }
        file.sync_data()?;
        // Syncs that acked messages (deliver-limit also syncs groups of receipts alone).
        if peers.iter().any(|peer| peer.waiting > 0) {
            syncs += 1;
        }
        offset = end;
        for peer in &mut peers {
            let mut left = peer.waiting * 8;
            while left > 0 {
                match peer.stream.write(&acks[..left.min(acks.len())]) {
                    Ok(written) => left -= written,
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                    Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                    // A sender that finished closes its end.
                    Err(error) if error.kind() == io::ErrorKind::BrokenPipe => left = 0,
                    Err(error) => return Err(error),
                }
            }
            peer.waiting = 0;
        }
        if let Some(delivery) = delivery.as_mut()
            && !delivered.is_empty()
        {
            if delivery.backlog.len() - delivery.written + delivered.len() > DELIVERY_BACKLOG_BYTES_MAX {
                return Err(io::Error::other("the receiver fell more than the backlog's bound behind"));
            }
            if delivery.written > 0 && delivery.written * 2 >= delivery.backlog.len() {
                // What went out is dropped now and then, not at every write.
                delivery.backlog.drain(..delivery.written);
                delivery.written = 0;
            }
            delivery.backlog.extend_from_slice(&delivered);
            delivery.flush()?;
        }
    }
    Ok(syncs)
}

/// Did the server's end close (it stops before the receiver)?
fn ended(error: &io::Error) -> bool {
    matches!(error.kind(), io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe)
}

/// The receiver thread (deliver-limit): reads whole messages and sends a receipt for each, at most
/// once per `RECEIPT_INTERVAL`; returns the messages it got.
fn receive(mut stream: UnixStream, payload: usize, stop: &AtomicBool) -> io::Result<u64> {
    let mut buffer = vec![0_u8; READ_BYTES_MAX];
    let mut partial = 0;
    let mut received = 0_u64;
    let mut owed = 0_usize;
    let mut last_sent = Instant::now();
    let receipts = vec![0x72_u8; 64 * 1024];
    stream.set_nonblocking(true)?;
    loop {
        // Rounded up: a wait of 0 ms would spin until the receipts are due.
        let wait_ms = if owed > 0 {
            RECEIPT_INTERVAL.saturating_sub(last_sent.elapsed()).as_micros().div_ceil(1000) as i32
        } else {
            100
        };
        let mut fd = libc::pollfd { fd: stream.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut fd, 1, wait_ms) } < 0 {
            let error = io::Error::last_os_error();
            if error.kind() != io::ErrorKind::Interrupted {
                return Err(error);
            }
        }
        loop {
            match stream.read(&mut buffer) {
                Ok(0) => return Ok(received),
                // The server stops first and may leave receipts unread: that closes with a reset.
                Err(error) if ended(&error) => return Ok(received),
                Ok(read) => {
                    let bytes = partial + read;
                    received += (bytes / payload) as u64;
                    owed += bytes / payload;
                    partial = bytes % payload;
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return Err(error),
            }
        }
        if owed > 0 && last_sent.elapsed() >= RECEIPT_INTERVAL {
            let mut left = owed * RECEIPT_BYTES;
            while left > 0 {
                match stream.write(&receipts[..left.min(receipts.len())]) {
                    Ok(written) => left -= written,
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                    Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                    Err(error) if ended(&error) => return Ok(received),
                    Err(error) => return Err(error),
                }
            }
            owed = 0;
            last_sent = Instant::now();
        }
        if stop.load(Ordering::Relaxed) {
            return Ok(received);
        }
    }
}

/// `ack-limit`, or with `deliver` `deliver-limit`.
pub fn ack_limit(
    dir: &Path,
    payload: usize,
    senders: usize,
    duration: Duration,
    deliver: bool,
) -> Result<Measurement, String> {
    let name = if deliver { "deliver-limit" } else { "ack-limit" };
    let path = dir.join(format!("{name}.log"));
    let file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|error| format!("{}: {error}", path.display()))?;
    let mut clients = Vec::new();
    let mut peers = Vec::new();
    for _ in 0..senders {
        let (client, server) = UnixStream::pair().map_err(|error| error.to_string())?;
        clients.push(client);
        peers.push(Peer { stream: server, partial: 0, waiting: 0 });
    }
    let (delivery, receiver_end) = if deliver {
        let (server_end, receiver_end) = UnixStream::pair().map_err(|error| error.to_string())?;
        (Some(Delivery { stream: server_end, backlog: Vec::new(), written: 0, partial: 0 }), Some(receiver_end))
    } else {
        (None, None)
    };
    let stop = AtomicBool::new(false);
    let receiver_stop = AtomicBool::new(false);
    let message = vec![0x5a_u8; payload];
    let started = Instant::now();
    let (syncs, results, received) = std::thread::scope(|scope| {
        let receiver = receiver_end.map(|stream| scope.spawn(|| receive(stream, payload, &receiver_stop)));
        let server = scope.spawn(|| serve(peers, delivery, payload, file, &stop));
        let workers: Vec<_> = clients
            .into_iter()
            .map(|mut client| {
                let message = &message;
                scope.spawn(move || -> io::Result<(u64, Vec<u32>)> {
                    let mut operations = 0_u64;
                    let mut samples = Vec::new();
                    let mut ack = [0_u8; 8];
                    while started.elapsed() < duration {
                        let call = Instant::now();
                        client.write_all(message)?;
                        client.read_exact(&mut ack)?;
                        operations += 1;
                        if samples.len() < SAMPLES_PER_SENDER_MAX {
                            samples.push(call.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                        }
                    }
                    Ok((operations, samples))
                })
            })
            .collect();
        let results: Vec<io::Result<(u64, Vec<u32>)>> = workers
            .into_iter()
            .map(|worker| worker.join().unwrap_or_else(|_| Err(io::Error::other("panicked"))))
            .collect();
        stop.store(true, Ordering::Relaxed);
        let syncs = server.join().unwrap_or_else(|_| Err(io::Error::other("server panicked")));
        receiver_stop.store(true, Ordering::Relaxed);
        let received = receiver.map(|receiver| receiver.join().unwrap_or_else(|_| Err(io::Error::other("panicked"))));
        (syncs, results, received)
    });
    let elapsed = started.elapsed();
    let _ = std::fs::remove_file(&path);
    let syncs = syncs.map_err(|error| format!("{name} server: {error}"))?;
    let mut operations = 0;
    let mut samples = Vec::new();
    for result in results {
        let (done, taken) = result.map_err(|error| format!("{name} sender: {error}"))?;
        operations += done;
        samples.extend(taken);
    }
    samples.sort_unstable();
    let mut measurement = Measurement::new(name, payload, senders, true);
    if let Some(received) = received {
        let received = received.map_err(|error| format!("{name} receiver: {error}"))?;
        // Every message acked was delivered, except what was still on its way when the run
        // stopped (the server stops first).
        measurement.extra.push(("delivered", serde_json::json!(received)));
    }
    measurement.packets = operations;
    measurement.pps = Some(operations as f64 / elapsed.as_secs_f64());
    measurement.p50_us = percentile(&samples, 0.50);
    measurement.p99_us = percentile(&samples, 0.99);
    measurement.max_rss_kib = crate::procs::proc_status_kib(std::process::id(), "VmHWM");
    measurement.extra.push(("packets_per_sync", serde_json::json!(operations as f64 / syncs.max(1) as f64)));
    Ok(measurement)
}
