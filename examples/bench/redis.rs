//! `redis-stream`: the durable broker a user would otherwise put in between. A private
//! redis-server on a loopback port with `appendonly yes` + `appendfsync always`; senders XADD,
//! one receiver XREADGROUP + XACK. Speaks RESP itself (a few commands need no client library).

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::procs::{Proc, free_tcp_port, proc_status_kib, unix_now_ns};
use crate::report::{Measurement, percentile};
use crate::{Bench, Run};

const STREAM: &str = "ftss-bench";
const GROUP: &str = "bench";
/// Entries one XREADGROUP may return.
const READ_COUNT: &str = "1024";
/// How long one XREADGROUP blocks (ms) before the receiver checks whether it is done.
const READ_BLOCK_MS: &str = "100";
/// How long the receiver waits after the last entry once it knows how many were sent.
const RECEIVE_IDLE: Duration = Duration::from_secs(3);
/// How long redis-server may take to answer PING after start.
const START_LIMIT: Duration = Duration::from_secs(10);
/// Bytes at the start of every payload: send time (ns).
const STAMP_BYTES: usize = 8;
/// Latency samples kept.
const SAMPLES_MAX: usize = 4_000_000;

/// A RESP reply.
#[derive(Debug)]
enum Reply {
    Simple(String),
    Error(String),
    Integer,
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Reply>>),
}

/// One connection to redis-server.
struct Connection {
    writer: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Connection {
    fn open(port: u16) -> Result<Connection, String> {
        let stream = TcpStream::connect(("127.0.0.1", port)).map_err(|error| format!("redis connect: {error}"))?;
        stream.set_nodelay(true).map_err(|error| error.to_string())?;
        let reader = BufReader::new(stream.try_clone().map_err(|error| error.to_string())?);
        Ok(Connection { writer: stream, reader })
    }

    fn command(&mut self, args: &[&[u8]]) -> Result<Reply, String> {
        let mut request = format!("*{}\r\n", args.len()).into_bytes();
        for arg in args {
            request.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
            request.extend_from_slice(arg);
            request.extend_from_slice(b"\r\n");
        }
        self.writer.write_all(&request).map_err(|error| format!("redis write: {error}"))?;
        match self.reply()? {
            Reply::Error(message) => Err(format!("redis: {message}")),
            reply => Ok(reply),
        }
    }

    fn line(&mut self) -> Result<String, String> {
        let mut line = String::new();
        self.reader.read_line(&mut line).map_err(|error| format!("redis read: {error}"))?;
        if !line.ends_with("\r\n") {
            return Err("redis closed the connection".into());
        }
        line.truncate(line.len() - 2);
        Ok(line)
    }

    fn reply(&mut self) -> Result<Reply, String> {
        let line = self.line()?;
        let (kind, rest) = line.split_at(1);
        let number = || rest.parse::<i64>().map_err(|_| format!("bad RESP line {line:?}"));
        match kind {
            "+" => Ok(Reply::Simple(rest.to_owned())),
            "-" => Ok(Reply::Error(rest.to_owned())),
            ":" => number().map(|_| Reply::Integer),
            "$" => {
                let length = number()?;
                if length < 0 {
                    return Ok(Reply::Bulk(None));
                }
                let mut bytes = vec![0u8; length as usize + 2];
                std::io::Read::read_exact(&mut self.reader, &mut bytes).map_err(|error| error.to_string())?;
                bytes.truncate(length as usize);
                Ok(Reply::Bulk(Some(bytes)))
            }
            "*" => {
                let length = number()?;
                if length < 0 {
                    return Ok(Reply::Array(None));
                }
                let items = (0..length).map(|_| self.reply()).collect::<Result<Vec<_>, _>>()?;
                Ok(Reply::Array(Some(items)))
            }
            _ => Err(format!("unexpected RESP line {line:?}")),
        }
    }
}

/// redis-server with its own directory; stopped on drop.
struct RedisServer {
    process: Proc,
    port: u16,
}

impl RedisServer {
    fn start(dir: &std::path::Path) -> Result<RedisServer, String> {
        let port = free_tcp_port()?;
        let mut command = Command::new("redis-server");
        command
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--protected-mode", "no"])
            .args(["--appendonly", "yes", "--appendfsync", "always", "--save", ""])
            .arg("--dir")
            .arg(dir)
            .args(["--daemonize", "no", "--logfile"])
            .arg(dir.join("redis.log"));
        let process = Proc::start("redis-server", command, &dir.join("redis.stderr"))?;
        let started = Instant::now();
        loop {
            if let Ok(mut connection) = Connection::open(port)
                && let Ok(Reply::Simple(pong)) = connection.command(&[b"PING"])
                && pong == "PONG"
            {
                return Ok(RedisServer { process, port });
            }
            if started.elapsed() > START_LIMIT {
                return Err(format!("redis-server did not answer on port {port} (see {})", dir.display()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Receives until `expected` entries arrived (or it idles once `expected` is known); returns
/// (received, first send ns, last receive ns, sorted latency samples).
fn receive(port: u16, expected: &AtomicU64, stop: &AtomicBool) -> Result<(u64, u64, u64, Vec<u32>), String> {
    let mut connection = Connection::open(port)?;
    let mut received = 0u64;
    let mut first_send_ns = u64::MAX;
    let mut last_recv_ns = 0u64;
    let mut samples = Vec::new();
    let mut last_arrival = Instant::now();
    loop {
        let known = expected.load(Ordering::SeqCst);
        if received >= known
            || stop.load(Ordering::SeqCst)
            || (known != u64::MAX && last_arrival.elapsed() > RECEIVE_IDLE)
        {
            break;
        }
        let reply = connection.command(&[
            b"XREADGROUP",
            b"GROUP",
            GROUP.as_bytes(),
            b"receiver",
            b"COUNT",
            READ_COUNT.as_bytes(),
            b"BLOCK",
            READ_BLOCK_MS.as_bytes(),
            b"STREAMS",
            STREAM.as_bytes(),
            b">",
        ])?;
        let now_ns = unix_now_ns();
        let mut ids: Vec<Vec<u8>> = Vec::new();
        for (id, payload) in entries(reply) {
            if payload.len() >= STAMP_BYTES {
                let sent_ns = u64::from_le_bytes(payload[..8].try_into().expect("8 bytes"));
                first_send_ns = first_send_ns.min(sent_ns);
                if samples.len() < SAMPLES_MAX {
                    samples.push((now_ns.saturating_sub(sent_ns) / 1000).min(u64::from(u32::MAX)) as u32);
                }
            }
            ids.push(id);
        }
        if ids.is_empty() {
            continue;
        }
        received += ids.len() as u64;
        last_recv_ns = now_ns;
        last_arrival = Instant::now();
        let mut ack: Vec<&[u8]> = vec![b"XACK", STREAM.as_bytes(), GROUP.as_bytes()];
        ack.extend(ids.iter().map(Vec::as_slice));
        connection.command(&ack)?;
    }
    samples.sort_unstable();
    Ok((received, first_send_ns, last_recv_ns, samples))
}

/// (id, payload) of each entry in an XREADGROUP reply: [[stream, [[id, [field, value]], …]]].
fn entries(reply: Reply) -> Vec<(Vec<u8>, Vec<u8>)> {
    let Reply::Array(Some(streams)) = reply else { return Vec::new() };
    let mut out = Vec::new();
    for stream in streams {
        let Reply::Array(Some(mut parts)) = stream else { continue };
        let Some(Reply::Array(Some(items))) = parts.pop() else { continue };
        for item in items {
            let Reply::Array(Some(mut pair)) = item else { continue };
            let fields = pair.pop();
            let id = pair.pop();
            if let (Some(Reply::Bulk(Some(id))), Some(Reply::Array(Some(mut fields)))) = (id, fields)
                && let Some(Reply::Bulk(Some(value))) = fields.pop()
            {
                out.push((id, value));
            }
        }
    }
    out
}

/// One sender: XADD back to back for `duration`; returns (sent, sorted call latencies).
fn send(port: u16, payload: usize, duration: Duration) -> Result<(u64, Vec<u32>), String> {
    let mut connection = Connection::open(port)?;
    let mut bytes = vec![0x5a_u8; payload.max(STAMP_BYTES)];
    let mut sent = 0;
    let mut samples = Vec::new();
    let started = Instant::now();
    while started.elapsed() < duration {
        let call = Instant::now();
        bytes[..8].copy_from_slice(&unix_now_ns().to_le_bytes());
        connection.command(&[b"XADD", STREAM.as_bytes(), b"*", b"d", &bytes])?;
        sent += 1;
        if samples.len() < SAMPLES_MAX {
            samples.push(call.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
        }
    }
    Ok((sent, samples))
}

pub fn redis_stream(bench: &Bench, run: &Run) -> Result<Measurement, String> {
    let dir = bench.run_dir("redis")?;
    let mut server = RedisServer::start(&dir.0)?;
    let port = server.port;
    let mut setup = Connection::open(port)?;
    setup.command(&[b"XGROUP", b"CREATE", STREAM.as_bytes(), GROUP.as_bytes(), b"$", b"MKSTREAM"])?;
    let expected = AtomicU64::new(u64::MAX);
    let stop = AtomicBool::new(false);
    let (sent, mut send_samples, received) = std::thread::scope(|scope| {
        let receiver = scope.spawn(|| receive(port, &expected, &stop));
        let senders: Vec<_> = (0..run.senders).map(|_| scope.spawn(|| send(port, run.payload, run.duration))).collect();
        let mut sent = 0u64;
        let mut samples = Vec::new();
        let mut failure = None;
        for sender in senders {
            match sender.join().unwrap_or_else(|_| Err("sender panicked".into())) {
                Ok((count, more)) => {
                    sent += count;
                    samples.extend(more);
                }
                Err(error) => failure = Some(error),
            }
        }
        if failure.is_some() {
            stop.store(true, Ordering::SeqCst);
        }
        expected.store(sent, Ordering::SeqCst);
        let received = receiver.join().unwrap_or_else(|_| Err("receiver panicked".into()));
        match failure {
            Some(error) => Err(error),
            None => Ok((sent, samples, received)),
        }
    })?;
    let (count, first_send_ns, last_recv_ns, samples) = received?;
    send_samples.sort_unstable();
    let mut measurement = Measurement::new("redis-stream", run.payload, run.senders, true);
    measurement.packets = count;
    if count > 0 && last_recv_ns > first_send_ns {
        measurement.pps = Some(count as f64 / ((last_recv_ns - first_send_ns) as f64 / 1e9));
        measurement.p50_us = percentile(&samples, 0.50);
        measurement.p99_us = percentile(&samples, 0.99);
    }
    // The apps here are threads of the bench; the memory that matters is the broker's.
    measurement.max_rss_kib = proc_status_kib(std::process::id(), "VmHWM");
    measurement.extra.push(("sent", json!(sent)));
    measurement.extra.push(("lost", json!(sent.saturating_sub(count))));
    measurement.extra.push(("send_p50_us", json!(percentile(&send_samples, 0.50))));
    measurement.extra.push(("send_p99_us", json!(percentile(&send_samples, 0.99))));
    measurement.extra.push(("server_max_rss_kib", json!(proc_status_kib(server.process.pid(), "VmHWM"))));
    server.process.terminate(Duration::from_secs(5));
    Ok(measurement)
}
