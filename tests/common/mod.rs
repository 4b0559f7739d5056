//! Test harness: a temporary fabric (volume + queue dirs), the real ftss-server and real apps under
//! the real shim. Nothing is mocked.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// Where `cargo build --release` (or the test's own profile) put the binaries.
pub fn artifact_dir() -> PathBuf {
    // The test binary lives in target/<profile>/deps/.
    let exe = std::env::current_exe().expect("test exe path");
    exe.parent().and_then(Path::parent).expect("target/<profile>").to_path_buf()
}

/// A binary the workspace built, next to the test binaries' profile directory.
fn built(name: &str) -> PathBuf {
    let path = artifact_dir().join(name);
    assert!(
        path.exists(),
        "{} missing: run `cargo build` with the same profile first (bash .ci/run does)",
        path.display()
    );
    path
}

pub fn shim_path() -> PathBuf {
    built("libftss_shim.so")
}

pub fn server_path() -> PathBuf {
    built("ftss-server")
}

pub fn node_agent_path() -> PathBuf {
    built("ftss-node")
}

pub fn have(program: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {program}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A free UDP port on loopback (the kernel picks it).
pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!(
            "ftss-test-{tag}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("FTSS_KEEP_TEST_DIRS").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A child process killed on drop.
pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Proc {
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait up to `limit`.
    pub fn terminate(&mut self, limit: Duration) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        self.kill();
    }

    /// Waits for exit up to `limit`; kills on timeout. Returns whether it exited by itself.
    pub fn wait_exit(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            thread::sleep(Duration::from_millis(20));
        }
        self.kill();
        false
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A fabric: one volume, queue dirs, an optional running server.
pub struct Fabric {
    pub dir: TempDir,
    pub volume: PathBuf,
    pub queue_dirs: Vec<PathBuf>,
    pub server: Option<Proc>,
    /// Nodes that use the fabric transport: node name → endpoint (`unix:…` or `tcp:…`).
    pub fabric_nodes: std::collections::HashMap<String, String>,
}

impl Fabric {
    pub fn new(tag: &str) -> Fabric {
        let dir = TempDir::new(tag);
        let volume = dir.0.join("volume");
        std::fs::create_dir_all(&volume).unwrap();
        // Prepared as `ftss-server init` does (the nodes' shims refuse a volume without its marker).
        fsbridge::Volume::new(&volume).create().unwrap();
        let queue_dirs = vec![dir.0.join("queue")];
        Fabric { dir, volume, queue_dirs, server: None, fabric_nodes: Default::default() }
    }

    pub fn with_volume(tag: &str, volume: PathBuf) -> Fabric {
        let mut fabric = Fabric::new(tag);
        fsbridge::Volume::new(&volume).create().unwrap();
        fabric.volume = volume;
        fabric
    }

    pub fn start_server(&mut self) {
        self.start_server_with(&[]);
    }

    pub fn start_server_with(&mut self, extra: &[&str]) {
        assert!(self.server.is_none(), "server already running");
        let mut command = Command::new(server_path());
        command.arg("run").arg("--volume").arg(&self.volume);
        for dir in &self.queue_dirs {
            command.arg("--queue-dir").arg(dir);
        }
        if !extra.contains(&"--poll") {
            command.args(["--poll", "10ms"]);
        }
        command.args(extra);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.0.join("server.log")).unwrap();
        command.stdout(Stdio::null()).stderr(log);
        let started_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
        // Ready once it has written its first status (its sockets are bound and its queue is open);
        // a previous server's status, written within the second, must not pass for it.
        let status_path = self.volume.join("server/status.json");
        let _ = std::fs::remove_file(&status_path);
        self.server = Some(Proc { child: command.spawn().expect("start ftss-server"), name: "ftss-server".into() });
        wait_until(Duration::from_secs(10), || {
            std::fs::read(&status_path)
                .ok()
                .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
                .is_some_and(|status| {
                    status["started_unix_ms"].as_u64().is_some_and(|started| started + 1000 >= started_ms)
                })
        });
    }

    /// Starts one more ftss-server instance with `--ha` (named `name`, log in `<name>.log`) and
    /// `extra` arguments; the caller owns it.
    pub fn start_instance(&self, name: &str, extra: &[&str]) -> Proc {
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.dir.0.join(format!("{name}.log"))).unwrap();
        let mut command = Command::new(server_path());
        command.arg("run").arg("--volume").arg(&self.volume);
        for dir in &self.queue_dirs {
            command.arg("--queue-dir").arg(dir);
        }
        command.args(["--poll", "10ms", "--ha", "--instance", name]).args(extra).stdout(Stdio::null()).stderr(log);
        Proc { child: command.spawn().expect("start ftss-server"), name: name.into() }
    }

    pub fn stop_server(&mut self) {
        if let Some(mut server) = self.server.take() {
            server.terminate(Duration::from_secs(10));
        }
    }

    pub fn kill_server(&mut self) {
        if let Some(mut server) = self.server.take() {
            server.kill();
        }
    }

    pub fn server_log(&self) -> String {
        std::fs::read_to_string(self.dir.0.join("server.log")).unwrap_or_default()
    }

    /// Environment for an app running as `node` with fabric address `addr`: over the volume, or
    /// over the fabric transport (no FTSS_VOLUME at all) for nodes in `fabric_nodes`.
    pub fn node_env(&self, node: &str, addr: &str) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = vec![
            ("LD_PRELOAD".into(), shim_path().display().to_string()),
            ("FTSS_NODE".into(), node.into()),
            ("FTSS_ADDR".into(), addr.into()),
            ("FTSS_LOG".into(), self.dir.0.join(format!("{node}.log")).display().to_string()),
        ];
        match self.fabric_nodes.get(node) {
            None => env.push(("FTSS_VOLUME".into(), self.volume.display().to_string())),
            Some(endpoint) => {
                env.push(("FTSS_TRANSPORT".into(), "fabric".into()));
                env.push(("FTSS_FABRIC".into(), endpoint.clone()));
                env.push(("FTSS_FABRIC_KEY".into(), self.key_path(node).display().to_string()));
            }
        }
        env
    }

    /// Where `ftss-server fabric-key` puts `node`'s key (the server's default keys directory).
    pub fn key_path(&self, node: &str) -> PathBuf {
        self.volume.join("server/fabric-keys").join(format!("{node}.key"))
    }

    /// Makes `node` a fabric node connecting to `endpoint`, with a new key made by the server's
    /// `fabric-key` command.
    pub fn use_fabric(&mut self, node: &str, endpoint: &str) {
        if !self.key_path(node).exists() {
            let output = Command::new(server_path())
                .args(["fabric-key", "--node", node, "--volume"])
                .arg(&self.volume)
                .output()
                .unwrap();
            assert!(output.status.success(), "fabric-key: {}", String::from_utf8_lossy(&output.stderr));
        }
        self.fabric_nodes.insert(node.into(), endpoint.into());
    }

    pub fn command(&self, node: &str, addr: &str, program: &str) -> Command {
        let mut command = Command::new(program);
        command.env_remove("FTSS_VOLUME").env_remove("FTSS_TRANSPORT");
        command.envs(self.node_env(node, addr));
        command
    }

    /// `ftss-server status --json`, parsed.
    pub fn status(&self) -> serde_json::Value {
        let output =
            Command::new(server_path()).arg("status").arg("--volume").arg(&self.volume).arg("--json").output().unwrap();
        assert!(output.status.success(), "status failed: {}", String::from_utf8_lossy(&output.stderr));
        serde_json::from_slice(&output.stdout).expect("status is JSON")
    }

    pub fn counter(&self, name: &str) -> u64 {
        self.status()["counters"][name].as_u64().unwrap_or(0)
    }

    pub fn node_log(&self, node: &str) -> String {
        std::fs::read_to_string(self.dir.0.join(format!("{node}.log"))).unwrap_or_default()
    }
}

impl Drop for Fabric {
    fn drop(&mut self) {
        self.kill_server();
    }
}

/// Polls `condition` until it holds or `limit` passes.
pub fn wait_until(limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if condition() {
            return true;
        }
        thread::sleep(Duration::from_millis(25));
    }
    condition()
}

/// Collects a child's stdout lines in a thread.
pub struct LineCollector {
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl LineCollector {
    pub fn start(stdout: impl Read + Send + 'static) -> LineCollector {
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = lines.clone();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                match line {
                    Ok(line) => sink.lock().unwrap().push(line),
                    Err(_) => break,
                }
            }
        });
        LineCollector { lines }
    }

    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.lines.lock().unwrap().len()
    }
}

/// Starts `nc -u -l PORT` as a shimmed node; stdout collected.
pub fn nc_listener(fabric: &Fabric, node: &str, addr: &str, port: u16) -> (Proc, LineCollector) {
    let mut command = fabric.command(node, addr, "nc");
    command.args(["-u", "-l", &port.to_string()]).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null());
    let mut child = command.spawn().expect("start nc -u -l");
    let collector = LineCollector::start(child.stdout.take().unwrap());
    (Proc { child, name: format!("nc -l ({node})") }, collector)
}

/// A shimmed `nc -u -q 1 HOST PORT` fed one line per write, so it sends (mostly) one datagram per line.
pub struct NcSender {
    pub proc: Proc,
    stdin: Option<std::process::ChildStdin>,
}

impl NcSender {
    pub fn start(fabric: &Fabric, node: &str, addr: &str, host: &str, port: u16) -> NcSender {
        let mut command = fabric.command(node, addr, "nc");
        command
            .args(["-u", "-q", "1", host, &port.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut child = command.spawn().expect("start nc -u");
        let stdin = child.stdin.take();
        NcSender { proc: Proc { child, name: format!("nc -u ({node})") }, stdin }
    }

    pub fn send(&mut self, lines: &[String]) {
        use std::io::Write;
        let stdin = self.stdin.as_mut().expect("not finished");
        for line in lines {
            stdin.write_all(format!("{line}\n").as_bytes()).expect("nc stdin");
            stdin.flush().expect("nc stdin");
            thread::sleep(Duration::from_micros(300));
        }
    }

    /// Closes stdin; nc exits a second later. Returns whether it exited within `limit`.
    pub fn finish(&mut self, limit: Duration) -> bool {
        self.stdin = None;
        self.proc.wait_exit(limit)
    }
}

/// Sends `lines` with a new shimmed nc and waits for it to exit; returns whether it did in time.
pub fn nc_send_lines(fabric: &Fabric, node: &str, addr: &str, host: &str, port: u16, lines: &[String]) -> bool {
    let mut sender = NcSender::start(fabric, node, addr, host, port);
    sender.send(lines);
    sender.finish(Duration::from_secs(30))
}

/// Files directly in a directory (not recursive), names only.
pub fn files_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|entries| entries.flatten().map(|entry| entry.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}

/// What a node's outbox holds on the volume: batch files (`out/new/`) and log segments (`out/log/`).
pub fn outbox_entries(volume: &Path, node: &str) -> Vec<String> {
    let outbox = volume.join("nodes").join(node).join("out");
    let mut entries = files_in(&outbox.join("new"));
    entries.extend(files_in(&outbox.join("log")));
    entries
}

pub mod apps;
pub mod gluster;
pub mod history;
pub mod lab;
pub mod smb;

/// The `Uid:` line of process `pid` (real, effective, saved and file-system uids).
pub fn uid_line(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| status.lines().find(|line| line.starts_with("Uid:")).map(str::to_owned))
}

/// Has process `pid` given up root in all four of its uids?
pub fn dropped_root(pid: u32) -> bool {
    uid_line(pid).is_some_and(|line| !line.split_whitespace().skip(1).any(|id| id == "0"))
}
