//! `ack-limit`: the fastest a server that acks only after its fdatasync can go on this machine,
//! with nothing of ftss in it. Each sender thread writes one datagram-sized message to its own
//! unix stream socket and waits for an 8-byte ack; one server thread polls every socket, takes
//! every whole message that has arrived, appends them all to one file with a single positioned
//! write inside zeros written ahead (so the sync writes data, never the inode), fdatasyncs, and
//! only then acks each message. That is a group commit with one event loop, Redis's shape, with
//! no parsing, checksums, index, delivery or spool: the floor under ftss-fabric and redis-stream
//! alike (both add their own work to the same sync and the same two thread crossings).

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

/// The server's side of one sender: bytes of a message read so far, whole messages waiting for
/// the sync.
struct Peer {
    stream: UnixStream,
    partial: usize,
    waiting: usize,
}

fn serve(mut peers: Vec<Peer>, payload: usize, file: File, stop: &AtomicBool) -> io::Result<u64> {
    let mut buffer = vec![0_u8; READ_BYTES_MAX];
    let mut group = Vec::with_capacity(READ_BYTES_MAX);
    let mut offset = 0_u64;
    let mut zeroed_end = 0_u64;
    let mut syncs = 0_u64;
    let acks = vec![0x61_u8; 8 * 1024];
    for peer in &peers {
        peer.stream.set_nonblocking(true)?;
    }
    let mut fds: Vec<libc::pollfd> = peers
        .iter()
        .map(|peer| libc::pollfd { fd: peer.stream.as_raw_fd(), events: libc::POLLIN, revents: 0 })
        .collect();
    while !stop.load(Ordering::Relaxed) {
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
        syncs += 1;
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
    }
    Ok(syncs)
}

pub fn ack_limit(dir: &Path, payload: usize, senders: usize, duration: Duration) -> Result<Measurement, String> {
    let path = dir.join("ack-limit.log");
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
    let stop = AtomicBool::new(false);
    let message = vec![0x5a_u8; payload];
    let started = Instant::now();
    let (syncs, results) = std::thread::scope(|scope| {
        let server = scope.spawn(|| serve(peers, payload, file, &stop));
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
        (server.join().unwrap_or_else(|_| Err(io::Error::other("server panicked"))), results)
    });
    let elapsed = started.elapsed();
    let _ = std::fs::remove_file(&path);
    let syncs = syncs.map_err(|error| format!("ack-limit server: {error}"))?;
    let mut operations = 0;
    let mut samples = Vec::new();
    for result in results {
        let (done, taken) = result.map_err(|error| format!("ack-limit sender: {error}"))?;
        operations += done;
        samples.extend(taken);
    }
    samples.sort_unstable();
    let mut measurement = Measurement::new("ack-limit", payload, senders, true);
    measurement.packets = operations;
    measurement.pps = Some(operations as f64 / elapsed.as_secs_f64());
    measurement.p50_us = percentile(&samples, 0.50);
    measurement.p99_us = percentile(&samples, 0.99);
    measurement.max_rss_kib = crate::procs::proc_status_kib(std::process::id(), "VmHWM");
    measurement.extra.push(("packets_per_sync", serde_json::json!(operations as f64 / syncs.max(1) as f64)));
    Ok(measurement)
}
