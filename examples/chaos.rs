//! `cargo run --release --example chaos -- --seed S --minutes M [--no-clock]` (as root)
//!
//! A fault campaign: real senders and receivers (python3 under the shim) and an HA pair of real
//! ftss-server instances, on a volume and two queue mirrors of their own (small tmpfs mounts, so
//! that "full" is real), driven through a random schedule of faults drawn from the seed:
//!
//! - kill -9 of a server, a sender or a receiver (each restarted, as systemd or the app would);
//! - SIGSTOP and SIGCONT of any of them (a server stopped past its lease term is deposed);
//! - ENOSPC on the queue disk and on the volume;
//! - bytes flipped in, and tails cut from, one queue mirror's segments;
//! - hostile files in spools, and flipped bytes in inbox files waiting for a receiver;
//! - steps of the wall clock, forward and back (`--no-clock` leaves the clock alone);
//! - HA failovers, which all of the above cause.
//!
//! At the end the faults stop, everything is resumed, the senders finish and the history is
//! checked: every datagram whose send returned success in `volume` or `guaranteed` mode arrived,
//! none reached one process twice, every payload is one that was sent. The seed and the verdict are
//! printed; the exit status is 1 on a violation (replay it with the same seed). Run one campaign at
//! a time: the receivers bind ports 9781–9783 on the host (no test uses them), and the clock is
//! the machine's.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant};

use common::apps::{PY_RECEIVER, Random, SmallDisk};
use common::history::{Ack, History};
use common::{Fabric, LineCollector, Proc};

/// Sends "<tag>-<n>" to HOST:PORT until the file STOP exists, a few hundred a second; prints
/// "OK n" once a send returned and "ERR n errno" when it failed, then retries that n.
const PY_SENDER: &str = r#"
import os, socket, sys, time
host, port, tag, stop = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
n = 0
while not os.path.exists(stop):
    try:
        s.sendto(f"{tag}-{n}".encode(), (host, port))
        print(f"OK {n}", flush=True)
        n += 1
        time.sleep(0.003)
    except OSError as error:
        print(f"ERR {n} {error.errno}", flush=True)
        time.sleep(0.1)
"#;

const LEASE_TERM: &str = "3s";

struct Args {
    seed: u64,
    minutes: f64,
    clock: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args { seed: 1, minutes: 1.0, clock: true };
    let mut words = std::env::args().skip(1);
    while let Some(word) = words.next() {
        let mut value = |name: &str| words.next().ok_or(format!("{name} needs a value"));
        match word.as_str() {
            "--seed" => args.seed = value("--seed")?.parse().map_err(|_| "--seed: a number")?,
            "--minutes" => args.minutes = value("--minutes")?.parse().map_err(|_| "--minutes: a number")?,
            "--no-clock" => args.clock = false,
            other => return Err(format!("unknown argument {other:?} (--seed S --minutes M [--no-clock])")),
        }
    }
    Ok(args)
}

/// One sender process and what it said.
struct Sender {
    proc: Proc,
    said: LineCollector,
    tag: String,
    ack: Ack,
}

/// One receiver process (an incarnation) and what it got.
struct Receiver {
    proc: Proc,
    lines: LineCollector,
    name: String,
}

/// A sender's line of traffic: the port it sends to, its mode, and its incarnations so far.
struct Line {
    port: u16,
    ack: Ack,
    env: Vec<(&'static str, &'static str)>,
    sender: Sender,
    receiver: Receiver,
    senders_started: usize,
    receivers_started: usize,
}

struct Campaign {
    fabric: Fabric,
    random: Random,
    servers: Vec<(String, Option<Proc>)>,
    lines: Vec<Line>,
    history: History,
    stop_file: PathBuf,
    queue_disk: PathBuf,
    volume_disk: PathBuf,
    clock_offset_s: i64,
    faults: BTreeMap<&'static str, usize>,
}

fn signal(proc: &Proc, signal: i32) {
    // SAFETY: signalling a child of ours.
    unsafe { libc::kill(proc.child.id() as i32, signal) };
}

/// SIGSTOP, a pause, SIGCONT.
fn stop_for(proc: &Proc, hold: Duration) {
    signal(proc, libc::SIGSTOP);
    std::thread::sleep(hold);
    signal(proc, libc::SIGCONT);
}

impl Campaign {
    fn start_server(&self, name: &str) -> Proc {
        self.fabric.start_instance(name, &["--lease-term", LEASE_TERM, "--redeliver-after", "3s"])
    }

    fn start_sender(&self, line: usize, incarnation: usize) -> Sender {
        let spec = &self.lines[line];
        let tag = format!("p{}i{incarnation}", spec.port);
        Campaign::spawn_sender(&self.fabric, spec.port, &tag, spec.ack, &spec.env, &self.stop_file)
    }

    fn spawn_sender(fabric: &Fabric, port: u16, tag: &str, ack: Ack, env: &[(&str, &str)], stop: &Path) -> Sender {
        let mode = if ack == Ack::Guaranteed { "guaranteed" } else { "volume" };
        let mut command = fabric.command("a", "10.77.0.1", "python3");
        command
            .args(["-c", PY_SENDER, "10.77.0.2", &port.to_string(), tag])
            .arg(stop)
            .env("FTSS_ACK", mode)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = command.spawn().expect("python3");
        let said = LineCollector::start(child.stdout.take().expect("stdout"));
        Sender { proc: Proc { child, name: format!("sender {tag}") }, said, tag: tag.to_owned(), ack }
    }

    fn spawn_receiver(fabric: &Fabric, port: u16, name: String) -> Receiver {
        let mut command = fabric.command("b", "10.77.0.2", "python3");
        command.args(["-c", PY_RECEIVER, &port.to_string()]).stdin(Stdio::null()).stdout(Stdio::piped());
        command.stderr(Stdio::null());
        let mut child = command.spawn().expect("python3");
        let lines = LineCollector::start(child.stdout.take().expect("stdout"));
        common::wait_until(Duration::from_secs(20), || lines.count() >= 1);
        Receiver { proc: Proc { child, name: name.clone() }, lines, name }
    }

    /// Records what a sender said (its sends that returned, and those that failed). A sender
    /// killed -9 may have been inside its next send, which may have gone through without its line
    /// being printed: that one is an attempt, allowed but not required.
    fn record_sender(history: &mut History, sender: &Sender) {
        let mut next = 0u64;
        for line in sender.said.lines() {
            let mut words = line.split_whitespace();
            match (words.next(), words.next().and_then(|n| n.parse::<u64>().ok())) {
                (Some("OK"), Some(n)) => {
                    history.sent(format!("{}-{n}", sender.tag), sender.ack);
                    next = next.max(n + 1);
                }
                (Some("ERR"), Some(n)) => history.send_failed(format!("{}-{n}", sender.tag)),
                _ => {}
            }
        }
        history.send_failed(format!("{}-{next}", sender.tag));
    }

    fn record_receiver(history: &mut History, receiver: &Receiver) {
        for payload in receiver.lines.lines().into_iter().skip(1) {
            history.received(receiver.name.clone(), payload);
        }
    }

    fn count(&mut self, fault: &'static str) {
        *self.faults.entry(fault).or_default() += 1;
    }

    fn pause(&mut self, low_ms: u64, high_ms: u64) -> Duration {
        Duration::from_millis(low_ms + self.random.below(high_ms - low_ms + 1))
    }

    /// Restarts servers that are gone (deposed ones exit; a supervisor would start them again).
    fn tend_servers(&mut self) {
        for index in 0..self.servers.len() {
            let exited = match &mut self.servers[index].1 {
                Some(proc) => matches!(proc.child.try_wait(), Ok(Some(_))),
                None => true,
            };
            if exited {
                let name = self.servers[index].0.clone();
                let proc = self.start_server(&name);
                self.servers[index].1 = Some(proc);
            }
        }
    }

    /// Fills a tmpfs for a while, then gives the space back.
    fn fill_for(&mut self, disk: PathBuf, fault: &'static str) {
        let filler = disk.join("chaos-filler");
        let _ = Command::new("dd")
            .arg("if=/dev/zero")
            .arg(format!("of={}", filler.display()))
            .arg("bs=64k")
            .stderr(Stdio::null())
            .status();
        self.count(fault);
        std::thread::sleep(self.pause(500, 5000));
        let _ = std::fs::remove_file(&filler);
    }

    /// Segment files of queue mirror b.
    fn mirror_segments(&self) -> Vec<PathBuf> {
        let dir = self.queue_disk.join("b");
        common::files_in(&dir).into_iter().filter(|name| name.starts_with("seg-")).map(|name| dir.join(name)).collect()
    }

    fn damage_mirror(&mut self, cut: bool) {
        let segments = self.mirror_segments();
        if segments.is_empty() {
            return;
        }
        let path = segments[self.random.below(segments.len() as u64) as usize].clone();
        let Ok(file) = std::fs::OpenOptions::new().read(true).write(true).open(&path) else { return };
        let Ok(len) = file.metadata().map(|meta| meta.len()) else { return };
        if len == 0 {
            return;
        }
        if cut {
            let keep = self.random.below(len);
            let _ = file.set_len(keep);
            self.count("mirror tail cut");
        } else {
            use std::os::unix::fs::FileExt;
            for _ in 0..1 + self.random.below(3) {
                let at = self.random.below(len);
                let mut byte = [0u8];
                if file.read_exact_at(&mut byte, at).is_ok() {
                    let _ = file.write_all_at(&[byte[0] ^ 0x40], at);
                }
            }
            self.count("mirror bytes flipped");
        }
    }

    fn hostile_file(&mut self) {
        let volume = self.fabric.volume.clone();
        let targets = [
            volume.join("nodes/a/out/new"),
            volume.join("nodes/b/rcpt/new"),
            volume.join(format!("nodes/b/in/{}/new", self.lines[0].port)),
        ];
        let dir = &targets[self.random.below(targets.len() as u64) as usize];
        let name = format!("{:016x}-{:016x}.pkt", 0xbad0_0000 + self.random.below(1 << 20), self.random.below(1 << 20));
        let mut bytes = b"FTSB".to_vec();
        for _ in 0..self.random.below(200) {
            bytes.push(self.random.below(256) as u8);
        }
        let _ = std::fs::write(dir.join(name), bytes);
        self.count("hostile spool file");
    }

    fn damage_inbox_file(&mut self) {
        let port = self.lines[self.random.below(self.lines.len() as u64) as usize].port;
        let dir = self.fabric.volume.join(format!("nodes/b/in/{port}/new"));
        let files = common::files_in(&dir);
        if files.is_empty() {
            return;
        }
        let path = dir.join(&files[self.random.below(files.len() as u64) as usize]);
        if let Ok(mut bytes) = std::fs::read(&path)
            && !bytes.is_empty()
        {
            let at = self.random.below(bytes.len() as u64) as usize;
            bytes[at] ^= 0x10;
            let _ = std::fs::write(&path, bytes);
            self.count("inbox file damaged");
        }
    }

    fn step_clock(&mut self, seconds: i64) {
        if step_wall_clock(seconds) {
            self.clock_offset_s += seconds;
            CLOCK_OFFSET_S.store(self.clock_offset_s, Ordering::SeqCst);
            self.count(if seconds > 0 { "clock stepped forward" } else { "clock stepped back" });
        }
    }

    /// One fault, drawn from the seed.
    fn fault(&mut self, clock: bool) {
        match self.random.below(14) {
            0 | 1 => {
                let index = self.random.below(self.servers.len() as u64) as usize;
                if let Some(mut proc) = self.servers[index].1.take() {
                    proc.kill();
                }
                self.count("server killed -9");
                std::thread::sleep(self.pause(0, 2000));
            }
            2 => {
                let index = self.random.below(self.servers.len() as u64) as usize;
                let hold = self.pause(300, 8000);
                if let Some(proc) = &self.servers[index].1 {
                    stop_for(proc, hold);
                    self.count("server stopped and continued");
                }
            }
            3 => {
                let index = self.random.below(self.lines.len() as u64) as usize;
                let line = &mut self.lines[index];
                line.receivers_started += 1;
                let name = format!("receiver {} #{}", line.port, line.receivers_started);
                line.receiver.proc.kill();
                Campaign::record_receiver(&mut self.history, &line.receiver);
                line.receiver = Campaign::spawn_receiver(&self.fabric, line.port, name);
                self.count("receiver killed -9");
            }
            4 => {
                let index = self.random.below(self.lines.len() as u64) as usize;
                let hold = self.pause(300, 6000);
                stop_for(&self.lines[index].receiver.proc, hold);
                self.count("receiver stopped and continued");
            }
            5 => {
                let index = self.random.below(self.lines.len() as u64) as usize;
                self.lines[index].sender.proc.kill();
                Campaign::record_sender(&mut self.history, &self.lines[index].sender);
                self.lines[index].senders_started += 1;
                let incarnation = self.lines[index].senders_started;
                self.lines[index].sender = self.start_sender(index, incarnation);
                self.count("sender killed -9");
            }
            6 => {
                let index = self.random.below(self.lines.len() as u64) as usize;
                let hold = self.pause(300, 4000);
                stop_for(&self.lines[index].sender.proc, hold);
                self.count("sender stopped and continued");
            }
            7 => self.fill_for(self.queue_disk.clone(), "queue disk full"),
            8 => self.fill_for(self.volume_disk.clone(), "volume full"),
            9 => self.damage_mirror(false),
            10 => self.damage_mirror(true),
            11 => self.hostile_file(),
            12 => self.damage_inbox_file(),
            _ if clock => {
                let size = 20 + self.random.below(70) as i64;
                let back = self.random.below(2) == 0;
                self.step_clock(if back { -size } else { size });
            }
            _ => {}
        }
    }
}

fn run(args: &Args) -> Result<bool, String> {
    let fabric = Fabric::new("chaos");
    let queue_disk = fabric.dir.0.join("queue-disk");
    let volume_disk = fabric.dir.0.join("volume-disk");
    let _queue_mount = SmallDisk::mount(&queue_disk, "48m");
    let _volume_mount = SmallDisk::mount(&volume_disk, "96m");
    let mut fabric = Fabric::with_volume("chaos-volume", volume_disk.join("volume"));
    fabric.queue_dirs = vec![queue_disk.join("a"), queue_disk.join("b")];
    let stop_file = fabric.dir.0.join("stop");
    let mut campaign = Campaign {
        fabric,
        random: Random(args.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1),
        servers: vec![("s1".into(), None), ("s2".into(), None)],
        lines: Vec::new(),
        history: History::new(),
        stop_file,
        queue_disk,
        volume_disk,
        clock_offset_s: 0,
        faults: BTreeMap::new(),
    };
    campaign.tend_servers();
    type Env = Vec<(&'static str, &'static str)>;
    let specs: [(u16, Ack, Env); 3] = [
        (9781, Ack::Guaranteed, vec![]),
        (9782, Ack::Volume, vec![]),
        (9783, Ack::Volume, vec![("FTSS_OUTBOX", "files")]),
    ];
    for (port, ack, env) in specs {
        let receiver = Campaign::spawn_receiver(&campaign.fabric, port, format!("receiver {port} #1"));
        let tag = format!("p{port}i1");
        let sender = Campaign::spawn_sender(&campaign.fabric, port, &tag, ack, &env, &campaign.stop_file);
        campaign.lines.push(Line { port, ack, env, sender, receiver, senders_started: 1, receivers_started: 1 });
    }
    let deadline = Instant::now() + Duration::from_secs_f64(args.minutes * 60.0);
    while Instant::now() < deadline {
        let pause = campaign.pause(200, 2500);
        std::thread::sleep(pause);
        stop_if_interrupted()?;
        campaign.fault(args.clock);
        campaign.tend_servers();
    }

    // The end: the clock back, space back, everything running; senders finish.
    if campaign.clock_offset_s != 0 {
        let offset = campaign.clock_offset_s;
        campaign.step_clock(-offset);
    }
    stop_if_interrupted()?;
    for line in &campaign.lines {
        signal(&line.sender.proc, libc::SIGCONT);
        signal(&line.receiver.proc, libc::SIGCONT);
    }
    for (_, proc) in &campaign.servers {
        if let Some(proc) = proc {
            signal(proc, libc::SIGCONT);
        }
    }
    campaign.tend_servers();
    std::fs::write(&campaign.stop_file, b"").map_err(|error| error.to_string())?;
    for line in &mut campaign.lines {
        line.sender.proc.wait_exit(Duration::from_secs(120));
        stop_if_interrupted()?;
    }
    for line in &campaign.lines {
        Campaign::record_sender(&mut campaign.history, &line.sender);
    }
    // Everything acked must arrive: wait for it (receivers keep receiving meanwhile).
    let settle = Instant::now() + Duration::from_secs(240);
    loop {
        stop_if_interrupted()?;
        campaign.tend_servers();
        let mut probe = campaign.history.clone();
        for line in &campaign.lines {
            Campaign::record_receiver(&mut probe, &line.receiver);
        }
        if probe.check().lost.is_empty() || Instant::now() > settle {
            break;
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    std::thread::sleep(Duration::from_secs(4));
    for line in &campaign.lines {
        Campaign::record_receiver(&mut campaign.history, &line.receiver);
    }
    let verdict = campaign.history.check();
    eprintln!("chaos: seed {} ran {:.1} minutes; faults:", args.seed, args.minutes);
    for (fault, count) in &campaign.faults {
        eprintln!("  {count:6} × {fault}");
    }
    let quarantined = common::files_in(&campaign.fabric.volume.join("quarantine")).len();
    eprintln!("  {quarantined} files in quarantine");
    println!("chaos seed {}: {verdict}", args.seed);
    Ok(verdict.ok())
}

/// How far the campaign has stepped the wall clock (for the signal handler to undo).
static CLOCK_OFFSET_S: AtomicI64 = AtomicI64::new(0);

/// Steps CLOCK_REALTIME by `seconds`; async-signal-safe (two system calls).
fn step_wall_clock(seconds: i64) -> bool {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime and clock_settime read and write the timespec given.
    unsafe {
        libc::clock_gettime(libc::CLOCK_REALTIME, &mut now) == 0 && {
            now.tv_sec += seconds as libc::time_t;
            libc::clock_settime(libc::CLOCK_REALTIME, &now) == 0
        }
    }
}

/// Set by SIGINT, SIGTERM or SIGHUP: the campaign stops at once (its processes and disks go as it
/// unwinds).
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// A stopped campaign must not leave the clock stepped: the handler steps it back at once (two
/// async-signal-safe calls) and tells the campaign to stop, which kills its processes and
/// unmounts its disks on the way out.
extern "C" fn interrupted(_signal: libc::c_int) {
    let offset = CLOCK_OFFSET_S.swap(0, Ordering::SeqCst);
    if offset != 0 {
        step_wall_clock(-offset);
    }
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn on_interrupt() {
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler makes async-signal-safe calls and touches atomics only.
        unsafe { libc::signal(signal, interrupted as extern "C" fn(libc::c_int) as libc::sighandler_t) };
    }
}

fn stop_if_interrupted() -> Result<(), String> {
    if !INTERRUPTED.load(Ordering::SeqCst) {
        return Ok(());
    }
    // A step taken while the handler ran is undone here.
    let offset = CLOCK_OFFSET_S.swap(0, Ordering::SeqCst);
    if offset != 0 {
        step_wall_clock(-offset);
    }
    Err("interrupted: the clock is back, the campaign's processes are killed".into())
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(message) => {
            eprintln!("chaos: {message}");
            return ExitCode::from(2);
        }
    };
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("chaos: run as root (it mounts small tmpfs disks and steps the clock)");
        return ExitCode::from(2);
    }
    for program in ["python3", "dd", "date"] {
        if !common::have(program) {
            eprintln!("chaos: {program} is not installed");
            return ExitCode::from(2);
        }
    }
    on_interrupt();
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!(
                "chaos: VIOLATION with seed {} (replay: --seed {} --minutes {})",
                args.seed, args.seed, args.minutes
            );
            ExitCode::FAILURE
        }
        Err(message) => {
            eprintln!("chaos: {message}");
            ExitCode::from(2)
        }
    }
}
