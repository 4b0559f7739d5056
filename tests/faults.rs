//! Real failures while traffic flows: kill -9 of senders, receivers and the server at random points,
//! a volume that fills up, a receiver that never reads.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Sends "<tag>-<n>" to 10.77.0.2:PORT for n in 0.., printing "ok n" once sendto returned and
/// "err n errno" when it failed (then retrying that n after a pause, as an app would).
const PY_SENDER: &str = r#"
import socket, sys, time
port, tag, count = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
n = 0
while n < count:
    try:
        s.sendto(f"{tag}-{n}".encode(), ("10.77.0.2", port))
        print(f"ok {n}", flush=True)
        n += 1
    except OSError as error:
        print(f"err {n} {error.errno}", flush=True)
        time.sleep(0.1)
"#;

const PY_RECEIVER: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
print("ready", flush=True)
while True:
    data, _ = s.recvfrom(65535)
    print(data.decode(), flush=True)
"#;

struct Receiver {
    proc: Proc,
    lines: LineCollector,
}

fn start_receiver(fabric: &Fabric, port: u16) -> Receiver {
    let mut command = fabric.command("b", "10.77.0.2", "python3");
    command
        .args(["-c", PY_RECEIVER, &port.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = command.spawn().unwrap();
    let lines = LineCollector::start(child.stdout.take().unwrap());
    assert!(wait_until(Duration::from_secs(10), || lines.count() >= 1), "receiver not ready");
    Receiver { proc: Proc { child, name: "receiver".into() }, lines }
}

struct Sender {
    proc: Proc,
    said: LineCollector,
    tag: String,
}

fn start_sender(fabric: &Fabric, port: u16, tag: &str, count: usize, extra_env: &[(&str, &str)]) -> Sender {
    let mut command = fabric.command("a", "10.77.0.1", "python3");
    command.args(["-c", PY_SENDER, &port.to_string(), tag, &count.to_string()]).envs(extra_env.iter().copied());
    command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null());
    let mut child = command.spawn().unwrap();
    let said = LineCollector::start(child.stdout.take().unwrap());
    Sender { proc: Proc { child, name: format!("sender {tag}") }, said, tag: tag.into() }
}

impl Sender {
    /// Payloads whose send returned success.
    fn acknowledged(&self) -> Vec<String> {
        self.said
            .lines()
            .iter()
            .filter_map(|line| line.strip_prefix("ok "))
            .map(|n| format!("{}-{n}", self.tag))
            .collect()
    }

    fn errors(&self) -> Vec<String> {
        self.said.lines().into_iter().filter(|line| line.starts_with("err ")).collect()
    }
}

struct Random(u64);

impl Random {
    fn below(&mut self, bound: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % bound
    }
}

#[test]
fn kill_9_of_senders_receivers_and_the_server_at_random_points() {
    let mut fabric = Fabric::new("chaos");
    fabric.start_server_with(&["--redeliver-after", "1s"]);
    let port = 7800;
    let seed = fsbridge::unix_now_us() | 1;
    eprintln!("chaos seed {seed}");
    let mut random = Random(seed);
    let mut receivers = vec![start_receiver(&fabric, port)];
    let mut senders: Vec<Sender> = Vec::new();
    let mut next_sender = 0;
    let started = Instant::now();
    let mut kills: HashMap<&str, usize> = HashMap::new();
    for _round in 0..30 {
        if senders.last_mut().is_none_or(|sender| sender.proc.child.try_wait().unwrap().is_some()) {
            senders.push(start_sender(&fabric, port, &format!("s{next_sender}"), 400, &[]));
            next_sender += 1;
        }
        std::thread::sleep(Duration::from_millis(100 + random.below(300)));
        match random.below(3) {
            0 => {
                senders.last_mut().unwrap().proc.kill();
                *kills.entry("sender").or_default() += 1;
            }
            1 => {
                receivers.last_mut().unwrap().proc.kill();
                *kills.entry("receiver").or_default() += 1;
                std::thread::sleep(Duration::from_millis(random.below(200)));
                receivers.push(start_receiver(&fabric, port));
            }
            _ => {
                fabric.kill_server();
                *kills.entry("server").or_default() += 1;
                std::thread::sleep(Duration::from_millis(random.below(200)));
                fabric.start_server_with(&["--redeliver-after", "1s"]);
            }
        }
    }
    eprintln!("kills {kills:?} in {:?}", started.elapsed());
    for sender in &mut senders {
        sender.proc.wait_exit(Duration::from_secs(60));
    }
    let acknowledged: Vec<String> = senders.iter().flat_map(Sender::acknowledged).collect();
    assert!(acknowledged.len() > 500, "too little traffic: {}", acknowledged.len());
    let everything =
        || -> HashSet<String> { receivers.iter().flat_map(|r| r.lines.lines().into_iter().skip(1)).collect() };
    let arrived = wait_until(Duration::from_secs(120), || {
        let got = everything();
        acknowledged.iter().all(|line| got.contains(line))
    });
    let got = everything();
    let missing: Vec<_> = acknowledged.iter().filter(|line| !got.contains(*line)).take(5).collect();
    assert!(arrived, "acknowledged but lost: {missing:?} ({} acknowledged)", acknowledged.len());
    for (index, receiver) in receivers.iter().enumerate() {
        let lines = receiver.lines.lines();
        let unique: HashSet<&String> = lines.iter().collect();
        assert_eq!(unique.len(), lines.len(), "receiver {index} was handed a packet twice");
    }
}

/// A tmpfs mounted at `dir`, unmounted on drop.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(dir: &Path, size: &str) -> SmallDisk {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(unsafe { libc::geteuid() }, 0, "this test mounts a tmpfs and must run as root (CI does)");
        std::fs::create_dir_all(dir).unwrap();
        let status =
            Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]).arg(dir).status();
        assert!(status.unwrap().success(), "mount tmpfs on {}", dir.display());
        SmallDisk(dir.to_path_buf())
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_full_volume_gives_senders_a_clear_errno_and_traffic_resumes_when_space_returns() {
    let mut fabric = Fabric::new("volume-full");
    let _disk = SmallDisk::mount(&fabric.volume, "16m");
    fabric.start_server();
    let receiver = start_receiver(&fabric, 7900);
    let mut sender = start_sender(&fabric, 7900, "v", 2000, &[]);
    assert!(wait_until(Duration::from_secs(30), || sender.acknowledged().len() >= 100));
    let filler = fabric.volume.join("filler");
    let _ = Command::new("dd")
        .arg("if=/dev/zero")
        .arg(format!("of={}", filler.display()))
        .arg("bs=64k")
        .stderr(Stdio::null())
        .status();
    assert!(
        // ENOSPC from the failed publish, or ENOBUFS once the shim's bounded ring is full behind it.
        wait_until(Duration::from_secs(30), || sender
            .errors()
            .iter()
            .any(|line| line.ends_with(" 28") || line.ends_with(" 105"))),
        "no ENOSPC/ENOBUFS reported to the app: {:?}",
        sender.said.lines().last()
    );
    assert!(
        fabric.node_log("a").contains("No space left on device"),
        "the reason is not in FTSS_LOG: {}",
        fabric.node_log("a")
    );
    std::fs::remove_file(&filler).unwrap();
    assert!(sender.proc.wait_exit(Duration::from_secs(120)), "traffic did not resume");
    let acknowledged = sender.acknowledged();
    assert_eq!(acknowledged.len(), 2000);
    assert!(wait_until(Duration::from_secs(60), || {
        let got: HashSet<String> = receiver.lines.lines().into_iter().collect();
        acknowledged.iter().all(|line| got.contains(line))
    }));
    let lines = receiver.lines.lines();
    let unique: HashSet<&String> = lines.iter().collect();
    assert_eq!(unique.len(), lines.len(), "a packet was handed over twice");
    assert!(fabric.server.as_mut().unwrap().child.try_wait().unwrap().is_none(), "server died");
}

const PY_DEAF: &str = r#"
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
print("ready", flush=True)
time.sleep(3600)
"#;

fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn a_receiver_that_never_reads_stays_bounded_and_loses_nothing() {
    let mut fabric = Fabric::new("deaf");
    fabric.start_server();
    let mut deaf = fabric.command("b", "10.77.0.2", "python3");
    deaf.args(["-c", PY_DEAF, "8000"]).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null());
    let mut deaf = deaf.spawn().unwrap();
    let ready = LineCollector::start(deaf.stdout.take().unwrap());
    let mut deaf = Proc { child: deaf, name: "deaf".into() };
    assert!(wait_until(Duration::from_secs(10), || ready.count() >= 1));

    // 20,000 datagrams of 1 KiB: 20 MiB, far more than the socket and the shim may hold.
    let count = 20_000;
    let payload = "x".repeat(1000);
    let script = format!(
        "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         for n in range({count}):\n    s.sendto(f'd-{{n}}-{payload}'.encode(), ('10.77.0.2', 8000))\n"
    );
    let output = fabric.command("a", "10.77.0.1", "python3").args(["-c", &script]).output().unwrap();
    assert!(output.status.success(), "the sender was blocked or failed");
    assert!(wait_until(Duration::from_secs(60), || fabric.counter("stored") >= count), "{}", fabric.status());
    std::thread::sleep(Duration::from_secs(2));
    let deaf_peak = peak_rss_kib(deaf.child.id());
    let server_peak = peak_rss_kib(fabric.server.as_ref().unwrap().child.id());
    eprintln!("deaf receiver peak RSS {deaf_peak} KiB, server peak RSS {server_peak} KiB");
    assert!(deaf_peak < 96 * 1024, "the deaf receiver's shim buffered {deaf_peak} KiB");
    assert!(server_peak < 96 * 1024, "the server buffered {server_peak} KiB");
    assert_eq!(fabric.counter("receipted"), 0);
    deaf.kill();

    let receiver = start_receiver(&fabric, 8000);
    let expected: Vec<String> = (0..count).map(|n| format!("d-{n}-{payload}")).collect();
    assert!(
        wait_until(Duration::from_secs(120), || receiver.lines.count() > count as usize),
        "only {} arrived",
        receiver.lines.count() - 1
    );
    let got: Vec<String> = receiver.lines.lines().into_iter().skip(1).collect();
    assert_eq!(got.len(), expected.len());
    let got_set: HashSet<&String> = got.iter().collect();
    assert_eq!(got_set.len(), got.len(), "handed over twice");
    assert!(expected.iter().all(|line| got_set.contains(line)), "lost packets");
}
