//! `loadgen`: the plain UDP app the bench runs, with or without the shim preloaded.
//!
//! It uses only Rust std `UdpSocket` (plus `setsockopt` for a larger receive buffer), so under
//! `LD_PRELOAD=libftss_shim.so` it is an unmodified app like any other.
//!
//! ```text
//! loadgen send --to IP:PORT --payload BYTES --threads N --duration-ms MS
//!     N threads, one socket each, send datagrams back to back for MS milliseconds. Every payload
//!     starts with the send time (Unix ns, u64 LE), the thread and a sequence number. Prints one JSON
//!     line {"sent","errors","elapsed_us","send_p50_us","send_p99_us","max_rss_kib","cpu_us"} (the send
//!     latency is how long each sendto call took: with FTSS_ACK=guaranteed, the time to the ack),
//!     then waits for stdin to close before exiting, so that nothing still queued inside the process
//!     (FTSS_ACK=async) is cut off.
//! loadgen files --dir DIR --payload BYTES --threads N --duration-ms MS
//!     The naive spool every packet-over-files design starts from, as a baseline: N threads each
//!     write every packet as its own file (create in DIR/tmp, write, fsync, close, rename into
//!     DIR/new) for MS milliseconds. Prints the same JSON line as `send` (without waiting for stdin).
//! loadgen recv --bind IP:PORT --idle-ms MS
//!     Prints "ready" once bound, then receives. A line on stdin gives the number of datagrams sent;
//!     it stops when that many arrived, or MS milliseconds after the last one once the number is
//!     known (plain UDP may drop). Prints one JSON line {"received","first_send_ns","last_recv_ns",
//!     "p50_us","p99_us","max_us","max_rss_kib","cpu_us"}: latency is from the sender's call to
//!     recvfrom; cpu_us is the process's user + system CPU time.
//! ```

use std::io::{BufRead, Read, Write};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Bytes at the start of every payload: send time (ns), thread, sequence number.
const STAMP_BYTES: usize = 8 + 4 + 8;
/// Receive buffer asked for, so that a burst of small datagrams is not dropped by the kernel.
const RECEIVE_BUFFER_BYTES: libc::c_int = 16 * 1024 * 1024;
/// How long one recvfrom waits before the loop checks whether it is done.
const RECEIVE_POLL: Duration = Duration::from_millis(50);
/// Largest datagram received (the UDP limit).
const DATAGRAM_BYTES_MAX: usize = 65_536;
/// Latency samples kept per process; beyond this every sample still counts, but only these are sorted.
const SAMPLES_MAX: usize = 4_000_000;
/// A receiver gives up this long after start if the bench never says how many were sent.
const RECEIVE_DEADLINE: Duration = Duration::from_secs(600);

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("send") => send(&args[1..]),
        Some("recv") => receive(&args[1..]),
        Some("files") => files(&args[1..]),
        _ => Err("usage: loadgen send --to IP:PORT --payload BYTES --threads N --duration-ms MS | \
                  loadgen files --dir DIR --payload BYTES --threads N --duration-ms MS | \
                  loadgen recv --bind IP:PORT --idle-ms MS"
            .into()),
    };
    if let Err(message) = result {
        eprintln!("loadgen: {message}");
        std::process::exit(1);
    }
}

/// The value after `--name`.
fn option(args: &[String], name: &str) -> Result<String, String> {
    args.iter()
        .position(|arg| arg == name)
        .and_then(|index| args.get(index + 1))
        .cloned()
        .ok_or(format!("missing {name}"))
}

fn number(args: &[String], name: &str) -> Result<u64, String> {
    let text = option(args, name)?;
    text.parse().map_err(|_| format!("{name} {text:?} is not a number"))
}

fn unix_now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|elapsed| elapsed.as_nanos() as u64).unwrap_or(0)
}

/// This process's peak resident set (VmHWM), in KiB.
fn max_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// CPU time (user + system) this process used so far, in µs: a cost per datagram that, unlike a
/// rate, does not change when other work on the machine takes CPU away.
fn cpu_us() -> u64 {
    // SAFETY: getrusage fills the zeroed struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let micros = |time: libc::timeval| time.tv_sec as u64 * 1_000_000 + time.tv_usec as u64;
    micros(usage.ru_utime) + micros(usage.ru_stime)
}

/// The value at `fraction` (0..=1) of sorted samples; 0 if there are none.
fn percentile(sorted: &[u32], fraction: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let index = ((sorted.len() - 1) as f64 * fraction).round() as usize;
    sorted[index]
}

struct SenderResult {
    sent: u64,
    errors: u64,
    samples_us: Vec<u32>,
}

fn send(args: &[String]) -> Result<(), String> {
    let to: SocketAddr = option(args, "--to")?.parse().map_err(|_| "--to is not IP:PORT")?;
    let payload = number(args, "--payload")? as usize;
    let threads = number(args, "--threads")?.max(1);
    let duration = Duration::from_millis(number(args, "--duration-ms")?);
    if payload < STAMP_BYTES {
        return Err(format!("--payload must be at least {STAMP_BYTES} bytes"));
    }
    let started = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|thread| {
            std::thread::spawn(move || {
                send_thread(to, payload, thread as u32, duration, SAMPLES_MAX / threads as usize)
            })
        })
        .collect();
    report_senders(workers, started)?;
    std::io::stdout().flush().map_err(|error| error.to_string())?;
    // Stay alive until the bench is done with us (the shim may still be flushing in async mode).
    let mut rest = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut rest);
    Ok(())
}

/// Joins the sending (or file-writing) threads and prints their one JSON line.
fn report_senders(
    workers: Vec<std::thread::JoinHandle<Result<SenderResult, String>>>,
    started: Instant,
) -> Result<(), String> {
    let mut results = Vec::new();
    for worker in workers {
        results.push(worker.join().map_err(|_| "a sending thread panicked")??);
    }
    let elapsed = started.elapsed();
    let sent: u64 = results.iter().map(|result| result.sent).sum();
    let errors: u64 = results.iter().map(|result| result.errors).sum();
    let mut samples: Vec<u32> = results.into_iter().flat_map(|result| result.samples_us).collect();
    samples.sort_unstable();
    println!(
        "{{\"sent\":{sent},\"errors\":{errors},\"elapsed_us\":{},\"send_p50_us\":{},\"send_p99_us\":{},\"max_rss_kib\":{},\"cpu_us\":{}}}",
        elapsed.as_micros(),
        percentile(&samples, 0.50),
        percentile(&samples, 0.99),
        max_rss_kib(),
        cpu_us()
    );
    Ok(())
}

fn files(args: &[String]) -> Result<(), String> {
    let dir = std::path::PathBuf::from(option(args, "--dir")?);
    let payload = number(args, "--payload")? as usize;
    let threads = number(args, "--threads")?.max(1);
    let duration = Duration::from_millis(number(args, "--duration-ms")?);
    let (tmp, new) = (dir.join("tmp"), dir.join("new"));
    for path in [&tmp, &new] {
        std::fs::create_dir_all(path).map_err(|error| format!("{}: {error}", path.display()))?;
    }
    let started = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|thread| {
            let (tmp, new) = (tmp.clone(), new.clone());
            std::thread::spawn(move || -> Result<SenderResult, String> {
                let bytes = vec![0x3c_u8; payload];
                let mut result = SenderResult { sent: 0, errors: 0, samples_us: Vec::new() };
                let begun = Instant::now();
                while begun.elapsed() < duration {
                    let call = Instant::now();
                    let name = format!("{thread:04x}-{:016x}.pkt", result.sent + result.errors);
                    let staged = tmp.join(&name);
                    let written = std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .open(&staged)
                        .and_then(|mut file| {
                            file.write_all(&bytes)?;
                            file.sync_all()
                        })
                        .and_then(|()| std::fs::rename(&staged, new.join(&name)));
                    match written {
                        Ok(()) => result.sent += 1,
                        Err(_) => result.errors += 1,
                    }
                    if result.samples_us.len() < SAMPLES_MAX / threads as usize {
                        result.samples_us.push(call.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                    }
                }
                Ok(result)
            })
        })
        .collect();
    report_senders(workers, started)?;
    Ok(())
}

fn send_thread(
    to: SocketAddr,
    payload_bytes: usize,
    thread: u32,
    duration: Duration,
    samples_max: usize,
) -> Result<SenderResult, String> {
    let socket = UdpSocket::bind("0.0.0.0:0").map_err(|error| format!("bind: {error}"))?;
    let mut payload = vec![0x5a_u8; payload_bytes];
    let mut result = SenderResult { sent: 0, errors: 0, samples_us: Vec::new() };
    let started = Instant::now();
    let mut seq = 0u64;
    while started.elapsed() < duration {
        seq += 1;
        let call = Instant::now();
        payload[..8].copy_from_slice(&unix_now_ns().to_le_bytes());
        payload[8..12].copy_from_slice(&thread.to_le_bytes());
        payload[12..20].copy_from_slice(&seq.to_le_bytes());
        match socket.send_to(&payload, to) {
            Ok(_) => result.sent += 1,
            // Plain UDP may report ENOBUFS/ECONNREFUSED under load; count them and go on.
            Err(_) => result.errors += 1,
        }
        if result.samples_us.len() < samples_max {
            result.samples_us.push(call.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
        }
    }
    Ok(result)
}

/// Enlarges the receive buffer; SO_RCVBUFFORCE (root) ignores rmem_max, SO_RCVBUF is the fallback.
fn enlarge_receive_buffer(socket: &UdpSocket) {
    let size = RECEIVE_BUFFER_BYTES;
    for option in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
        // SAFETY: a valid fd and a pointer to a c_int of the given length.
        let done = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                (&size as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if done == 0 {
            return;
        }
    }
}

fn receive(args: &[String]) -> Result<(), String> {
    let bind: SocketAddr = option(args, "--bind")?.parse().map_err(|_| "--bind is not IP:PORT")?;
    let idle = Duration::from_millis(number(args, "--idle-ms")?);
    let socket = UdpSocket::bind(bind).map_err(|error| format!("bind {bind}: {error}"))?;
    enlarge_receive_buffer(&socket);
    socket.set_read_timeout(Some(RECEIVE_POLL)).map_err(|error| error.to_string())?;
    println!("ready");
    std::io::stdout().flush().map_err(|error| error.to_string())?;

    // u64::MAX until the bench says how many were sent.
    let expected = Arc::new(AtomicU64::new(u64::MAX));
    let expected_writer = expected.clone();
    std::thread::spawn(move || {
        let mut line = String::new();
        if std::io::stdin().lock().read_line(&mut line).is_ok()
            && let Ok(count) = line.trim().parse()
        {
            expected_writer.store(count, Ordering::SeqCst);
        }
    });

    let mut buffer = vec![0u8; DATAGRAM_BYTES_MAX];
    let mut samples: Vec<u32> = Vec::new();
    let mut received = 0u64;
    let mut first_send_ns = u64::MAX;
    let mut last_recv_ns = 0u64;
    let mut last_arrival = Instant::now();
    let started = Instant::now();
    loop {
        let known = expected.load(Ordering::SeqCst);
        if received >= known
            || (known != u64::MAX && last_arrival.elapsed() >= idle)
            || started.elapsed() >= RECEIVE_DEADLINE
        {
            break;
        }
        let length = match socket.recv_from(&mut buffer) {
            Ok((length, _)) => length,
            Err(_) => continue, // timeout: check the stop conditions again
        };
        let now_ns = unix_now_ns();
        last_arrival = Instant::now();
        if length < STAMP_BYTES {
            continue;
        }
        let sent_ns = u64::from_le_bytes(buffer[..8].try_into().expect("8 bytes"));
        received += 1;
        first_send_ns = first_send_ns.min(sent_ns);
        last_recv_ns = now_ns;
        if samples.len() < SAMPLES_MAX {
            samples.push((now_ns.saturating_sub(sent_ns) / 1000).min(u64::from(u32::MAX)) as u32);
        }
    }
    samples.sort_unstable();
    println!(
        "{{\"received\":{received},\"first_send_ns\":{},\"last_recv_ns\":{last_recv_ns},\"p50_us\":{},\"p99_us\":{},\"max_us\":{},\"max_rss_kib\":{},\"cpu_us\":{}}}",
        if received == 0 { 0 } else { first_send_ns },
        percentile(&samples, 0.50),
        percentile(&samples, 0.99),
        samples.last().copied().unwrap_or(0),
        max_rss_kib(),
        cpu_us()
    );
    std::io::stdout().flush().map_err(|error| error.to_string())?;
    Ok(())
}
