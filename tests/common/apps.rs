//! The small real programs the end-to-end tests run under the shim (python3 senders and
//! receivers), and helpers for real failures (a small disk, a process's peak memory).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::history::{Ack, History};
use super::{Fabric, LineCollector, Proc, wait_until};

/// Binds 0.0.0.0:PORT, prints "ready", then every datagram's payload on its own line.
pub const PY_RECEIVER: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
print("ready", flush=True)
while True:
    data, addr = s.recvfrom(65535)
    line = data.decode()
    if len(sys.argv) > 2:
        line = f"{addr[0]} {addr[1]} {line}"
    print(line, flush=True)
"#;

/// Sends "<tag>-<n><pad>" to HOST:PORT for n in 0..COUNT. Prints "ok n" once a send returned and
/// "err n errno" when it failed; then retries that n after a pause, as an app would.
pub const PY_SENDER: &str = r#"
import socket, sys, time
host, port, tag, count, pad = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), "p" * int(sys.argv[5])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
n = 0
while n < count:
    try:
        s.sendto(f"{tag}-{n}{pad}".encode(), (host, port))
        print(f"ok {n}", flush=True)
        n += 1
    except OSError as error:
        print(f"err {n} {error.errno}", flush=True)
        time.sleep(0.1)
"#;

/// PY_SENDER's loop in THREADS threads of one process, each with its own socket, sending
/// "<tag>-<t>-<n>" and printing "ok <t>-<n>" / "err <t>-<n> errno". Odd threads set a socket
/// timeout (Python then makes the fd non-blocking and waits in poll), even ones block.
pub const PY_THREADED_SENDER: &str = r#"
import socket, sys, threading, time
host, port, tag, threads, count = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
out = threading.Lock()
def say(line):
    with out:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
def run(t):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    if t % 2:
        s.settimeout(30.0)
    n = 0
    while n < count:
        try:
            s.sendto(f"{tag}-{t}-{n}".encode(), (host, port))
            say(f"ok {t}-{n}")
            n += 1
        except OSError as error:
            say(f"err {t}-{n} {error.errno}")
            time.sleep(0.1)
workers = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
for worker in workers:
    worker.start()
for worker in workers:
    worker.join()
"#;

/// Binds 0.0.0.0:PORT, prints "ready" and never reads.
pub const PY_DEAF: &str = r#"
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
print("ready", flush=True)
time.sleep(3600)
"#;

/// A python3 receiver under the shim.
pub struct Receiver {
    pub proc: Proc,
    pub lines: LineCollector,
}

impl Receiver {
    /// Starts `script` (PY_RECEIVER or PY_DEAF) as `node` on `port` and waits until it is ready.
    pub fn start_script(fabric: &Fabric, node: &str, addr: &str, script: &str, args: &[&str]) -> Receiver {
        let mut command = fabric.command(node, addr, "python3");
        command.arg("-c").arg(script).args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null());
        let mut child = command.spawn().expect("python3");
        let lines = LineCollector::start(child.stdout.take().unwrap());
        assert!(wait_until(Duration::from_secs(20), || lines.count() >= 1), "receiver not ready");
        Receiver { proc: Proc { child, name: format!("receiver ({node})") }, lines }
    }

    /// Node b (10.77.0.2) receiving on `port`; lines are payloads.
    pub fn start(fabric: &Fabric, port: u16) -> Receiver {
        Receiver::start_script(fabric, "b", "10.77.0.2", PY_RECEIVER, &[&port.to_string()])
    }

    /// Like [`Receiver::start`], each line "source-ip source-port payload".
    pub fn start_with_source(fabric: &Fabric, node: &str, addr: &str, port: u16) -> Receiver {
        Receiver::start_script(fabric, node, addr, PY_RECEIVER, &[&port.to_string(), "with-source"])
    }

    /// Everything received (after the "ready" line).
    pub fn payloads(&self) -> Vec<String> {
        self.lines.lines().into_iter().skip(1).collect()
    }

    /// Records what this process received into `history`, as `process`.
    pub fn record(&self, history: &mut History, process: &str) {
        for payload in self.payloads() {
            history.received(process, payload);
        }
    }
}

/// A python3 sender under the shim (PY_SENDER), as node a (10.77.0.1) unless told otherwise.
pub struct Sender {
    pub proc: Proc,
    pub said: LineCollector,
    tag: String,
    pad: usize,
}

impl Sender {
    pub fn start(fabric: &Fabric, port: u16, tag: &str, count: usize, pad: usize) -> Sender {
        Sender::start_with(fabric, port, tag, count, pad, &[])
    }

    pub fn start_with(fabric: &Fabric, port: u16, tag: &str, count: usize, pad: usize, env: &[(&str, &str)]) -> Sender {
        Sender::start_to(fabric, "10.77.0.2", port, tag, count, pad, env)
    }

    /// Like [`Sender::start_with`], to `host`.
    pub fn start_to(
        fabric: &Fabric,
        host: &str,
        port: u16,
        tag: &str,
        count: usize,
        pad: usize,
        env: &[(&str, &str)],
    ) -> Sender {
        let arguments = [host, &port.to_string(), tag, &count.to_string(), &pad.to_string()].map(str::to_owned);
        Sender::spawn(fabric, PY_SENDER, &arguments, env, tag, pad)
    }

    /// PY_THREADED_SENDER as node a: `threads` threads of one process, `count` datagrams each.
    pub fn start_threads(fabric: &Fabric, port: u16, tag: &str, threads: usize, count: usize) -> Sender {
        let arguments =
            ["10.77.0.2", &port.to_string(), tag, &threads.to_string(), &count.to_string()].map(str::to_owned);
        Sender::spawn(fabric, PY_THREADED_SENDER, &arguments, &[], tag, 0)
    }

    fn spawn(
        fabric: &Fabric,
        script: &str,
        arguments: &[String],
        env: &[(&str, &str)],
        tag: &str,
        pad: usize,
    ) -> Sender {
        let mut command = fabric.command("a", "10.77.0.1", "python3");
        command
            .args(["-c", script])
            .args(arguments)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = command.spawn().expect("python3");
        let said = LineCollector::start(child.stdout.take().unwrap());
        Sender { proc: Proc { child, name: format!("sender {tag}") }, said, tag: tag.into(), pad }
    }

    /// Payloads whose send returned success, in order.
    pub fn acknowledged(&self) -> Vec<String> {
        let pad = "p".repeat(self.pad);
        self.said
            .lines()
            .iter()
            .filter_map(|line| line.strip_prefix("ok "))
            .map(|n| format!("{}-{n}{pad}", self.tag))
            .collect()
    }

    /// "err n errno" lines.
    pub fn errors(&self) -> Vec<String> {
        self.said.lines().into_iter().filter(|line| line.starts_with("err ")).collect()
    }

    /// Records this sender's sends into `history`: those that returned (in mode `ack`) and those
    /// that failed.
    pub fn record(&self, history: &mut History, ack: Ack) {
        for payload in self.acknowledged() {
            history.sent(payload, ack);
        }
        let pad = "p".repeat(self.pad);
        for line in self.errors() {
            if let Some(n) = line.split_whitespace().nth(1) {
                history.send_failed(format!("{}-{n}{pad}", self.tag));
            }
        }
        // A sender killed -9 may have been inside its next send, which may have gone through
        // without its line being printed: an attempt, allowed but not required.
        let sent = self.acknowledged().len();
        history.send_failed(format!("{}-{sent}{pad}", self.tag));
    }
}

/// The payloads `Sender` sends: "<tag>-<n><pad>" for n in 0..count.
pub fn expected(tag: &str, count: usize, pad: usize) -> Vec<String> {
    (0..count).map(|n| format!("{tag}-{n}{}", "p".repeat(pad))).collect()
}

/// A tiny deterministic generator (xorshift) so a failing run can be repeated from its seed.
pub struct Random(pub u64);

impl Random {
    pub fn below(&mut self, bound: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % bound
    }
}

/// A tmpfs of a given size mounted at a directory, unmounted on drop (tests run as root in CI).
pub struct SmallDisk(PathBuf);

impl SmallDisk {
    pub fn mount(dir: &Path, size: &str) -> SmallDisk {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(unsafe { libc::geteuid() }, 0, "this test mounts a tmpfs and must run as root (CI does)");
        std::fs::create_dir_all(dir).unwrap();
        let status =
            Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]).arg(dir).status();
        assert!(status.unwrap().success(), "mount tmpfs on {}", dir.display());
        SmallDisk(dir.to_path_buf())
    }

    /// Fills the disk with zeros: a file in 64 KiB blocks, whose path it returns (removing it
    /// gives the space back), and a small one in 4 KiB blocks for the last partial block's worth,
    /// which stays.
    pub fn fill(&self) -> PathBuf {
        let filler = self.0.join("filler");
        for (path, block) in [(&filler, "bs=64k"), (&self.0.join("filler-tail"), "bs=4k")] {
            let _ = Command::new("dd")
                .arg("if=/dev/zero")
                .arg(format!("of={}", path.display()))
                .arg(block)
                .stderr(Stdio::null())
                .status();
        }
        filler
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Peak resident memory of a running process, in KiB.
pub fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}
