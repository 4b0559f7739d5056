//! Scenarios that only touch files: the fsync limit of the volume's disk, and the naive
//! one-file-per-packet spool on a mount (the baseline ftss's batching is measured against).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::report::{Measurement, percentile};

/// Bytes appended before each fdatasync in `fsync-limit`.
pub const FSYNC_APPEND_BYTES: usize = 4096;
/// Latency samples kept per thread.
const SAMPLES_PER_THREAD_MAX: usize = 1_000_000;

struct ThreadResult {
    operations: u64,
    samples_us: Vec<u32>,
}

/// Runs `operation(thread, index)` back to back on `threads` threads for `duration`; each call is
/// one timed sample.
fn timed_threads(
    threads: usize,
    duration: Duration,
    operation: impl Fn(usize, u64) -> Result<(), String> + Sync,
) -> Result<(u64, Vec<u32>, Duration), String> {
    let started = Instant::now();
    let results: Vec<Result<ThreadResult, String>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|thread| {
                let operation = &operation;
                scope.spawn(move || {
                    let mut result = ThreadResult { operations: 0, samples_us: Vec::new() };
                    let begun = Instant::now();
                    while begun.elapsed() < duration {
                        let call = Instant::now();
                        operation(thread, result.operations)?;
                        result.operations += 1;
                        if result.samples_us.len() < SAMPLES_PER_THREAD_MAX {
                            result.samples_us.push(call.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                        }
                    }
                    Ok(result)
                })
            })
            .collect();
        workers.into_iter().map(|worker| worker.join().unwrap_or_else(|_| Err("worker panicked".into()))).collect()
    });
    let elapsed = started.elapsed();
    let mut operations = 0;
    let mut samples = Vec::new();
    for result in results {
        let result = result?;
        operations += result.operations;
        samples.extend(result.samples_us);
    }
    samples.sort_unstable();
    Ok((operations, samples, elapsed))
}

fn fill(measurement: &mut Measurement, operations: u64, samples: &[u32], elapsed: Duration) {
    measurement.packets = operations;
    measurement.pps = Some(operations as f64 / elapsed.as_secs_f64());
    measurement.p50_us = percentile(samples, 0.50);
    measurement.p99_us = percentile(samples, 0.99);
    measurement.max_rss_kib = crate::procs::proc_status_kib(std::process::id(), "VmHWM");
}

/// `fsync-limit`: each thread appends 4 KiB to its own file in `dir` and fdatasyncs it.
pub fn fsync_limit(dir: &Path, senders: usize, duration: Duration) -> Result<Measurement, String> {
    let files: Vec<File> = (0..senders)
        .map(|thread| {
            let path = dir.join(format!("fsync-limit-{thread}.log"));
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|error| format!("{}: {error}", path.display()))
        })
        .collect::<Result<_, _>>()?;
    let block = vec![0xa5_u8; FSYNC_APPEND_BYTES];
    let (operations, samples, elapsed) = timed_threads(senders, duration, |thread, _| {
        let mut file = &files[thread];
        file.write_all(&block).map_err(|error| error.to_string())?;
        file.sync_data().map_err(|error| error.to_string())
    })?;
    let mut measurement = Measurement::new("fsync-limit", FSYNC_APPEND_BYTES, senders, true);
    fill(&mut measurement, operations, &samples, elapsed);
    Ok(measurement)
}

/// `smb-file-per-packet`: every packet is its own file: create in `tmp/`, write, fsync, close,
/// rename into `new/` — the Maildir dance without batching, on `dir` (the SMB mount).
pub fn file_per_packet(dir: &Path, payload: usize, senders: usize, duration: Duration) -> Result<Measurement, String> {
    let tmp = dir.join("tmp");
    let new = dir.join("new");
    for path in [&tmp, &new] {
        std::fs::create_dir_all(path).map_err(|error| format!("{}: {error}", path.display()))?;
    }
    let bytes = vec![0x3c_u8; payload];
    let (operations, samples, elapsed) = timed_threads(senders, duration, |thread, index| {
        let name = format!("{thread:04x}-{index:016x}.pkt");
        let staged: PathBuf = tmp.join(&name);
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&staged)
            .map_err(|error| format!("{}: {error}", staged.display()))?;
        file.write_all(&bytes).map_err(|error| error.to_string())?;
        file.sync_all().map_err(|error| error.to_string())?;
        drop(file);
        std::fs::rename(&staged, new.join(&name)).map_err(|error| error.to_string())
    })?;
    let mut measurement = Measurement::new("smb-file-per-packet", payload, senders, true);
    fill(&mut measurement, operations, &samples, elapsed);
    Ok(measurement)
}
