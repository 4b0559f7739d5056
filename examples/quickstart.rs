//! `cargo run --release --example quickstart`: the whole of ftss in one minute.
//!
//! Builds the shim and the server (same profile as this example), makes a temporary directory the
//! FTSS volume, starts ftss-server, runs `nc -u -l 9000` as node b and `nc -u 10.77.0.2 9000` as
//! node a (both under the shim), sends a few lines, prints what b received and the server status,
//! and cleans up. Without nc it runs itself as the two UDP apps instead (`udp-listen`,
//! `udp-send`: plain `std::net::UdpSocket`) and says so. Set FTSS_BIN_DIR to use already-built
//! binaries instead of building.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const LINES: [&str; 5] = [
    "hello from node a",
    "this line crossed the FTSS volume",
    "it was fsync'd before nc's write returned",
    "and stored durably by ftss-server before delivery",
    "goodbye",
];

fn main() {
    // The fallback for machines without nc: this program, run again as a plain UDP app.
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["udp-listen", port] => return udp_listen(port),
        ["udp-send", host, port] => return udp_send(host, port),
        _ => {}
    }
    if let Err(message) = run() {
        eprintln!("quickstart failed: {message}");
        std::process::exit(1);
    }
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn bin_dir() -> Result<PathBuf, String> {
    if let Some(dir) = std::env::var_os("FTSS_BIN_DIR") {
        return Ok(PathBuf::from(dir));
    }
    // This example's binary is target/<profile>/examples/quickstart.
    let exe = std::env::current_exe().map_err(|error| error.to_string())?;
    let dir = exe.parent().and_then(Path::parent).ok_or("cannot find the target directory")?.to_path_buf();
    let release = dir.file_name().is_some_and(|name| name == "release");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    println!("building libftss_shim.so and ftss-server ...");
    let mut build = Command::new(cargo);
    build.args(["build", "-q", "-p", "ftss-shim", "-p", "ftss-server"]).current_dir(env!("CARGO_MANIFEST_DIR"));
    if release {
        build.arg("--release");
    }
    let status = build.status().map_err(|error| format!("running cargo: {error}"))?;
    if !status.success() {
        return Err("cargo build failed".into());
    }
    Ok(dir)
}

fn run() -> Result<(), String> {
    let bin = bin_dir()?;
    let shim = bin.join("libftss_shim.so");
    let server_bin = bin.join("ftss-server");
    for path in [&shim, &server_bin] {
        if !path.exists() {
            return Err(format!("{} not found", path.display()));
        }
    }
    let apps = if Command::new("nc").arg("-h").stderr(Stdio::null()).stdout(Stdio::null()).status().is_ok() {
        Apps::Nc
    } else {
        println!("nc (netcat-openbsd) is not installed: using quickstart's own UDP programs (std::net::UdpSocket)");
        Apps::Own(std::env::current_exe().map_err(|error| error.to_string())?)
    };
    let root = std::env::temp_dir().join(format!("ftss-quickstart-{}", std::process::id()));
    let result = demo(&root, &shim, &server_bin, &apps);
    if std::env::var_os("FTSS_KEEP").is_some() {
        println!("kept {} (FTSS_KEEP is set)", root.display());
    } else {
        let _ = std::fs::remove_dir_all(&root);
    }
    result
}

/// The UDP programs the demo runs under the shim.
enum Apps {
    /// `nc -u -l 9000` and `nc -u 10.77.0.2 9000`.
    Nc,
    /// This program again: `udp-listen 9000` and `udp-send 10.77.0.2 9000` (no nc needed).
    Own(PathBuf),
}

impl Apps {
    fn listener(&self) -> (Command, &'static str) {
        match self {
            Apps::Nc => {
                let mut command = Command::new("nc");
                command.args(["-u", "-l", "9000"]);
                (command, "nc -u -l 9000            ")
            }
            Apps::Own(exe) => {
                let mut command = Command::new(exe);
                command.args(["udp-listen", "9000"]);
                (command, "quickstart udp-listen 9000")
            }
        }
    }

    fn sender(&self) -> (Command, &'static str) {
        match self {
            Apps::Nc => {
                let mut command = Command::new("nc");
                command.args(["-u", "-q", "1", "10.77.0.2", "9000"]);
                (command, "nc -u 10.77.0.2 9000     ")
            }
            Apps::Own(exe) => {
                let mut command = Command::new(exe);
                command.args(["udp-send", "10.77.0.2", "9000"]);
                (command, "quickstart udp-send 10.77.0.2 9000")
            }
        }
    }
}

/// `udp-listen PORT`: prints every datagram received on 0.0.0.0:PORT as a line.
fn udp_listen(port: &str) {
    let socket = std::net::UdpSocket::bind(format!("0.0.0.0:{port}")).expect("bind");
    let mut buffer = [0u8; 65536];
    let mut out = std::io::stdout();
    while let Ok(length) = socket.recv(&mut buffer) {
        let text = String::from_utf8_lossy(&buffer[..length]);
        let _ = writeln!(out, "{}", text.trim_end_matches('\n'));
        let _ = out.flush();
    }
}

/// `udp-send HOST PORT`: sends every line of stdin as one datagram.
fn udp_send(host: &str, port: &str) {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").expect("bind");
    for line in std::io::stdin().lines().map_while(Result::ok) {
        if let Err(error) = socket.send_to(format!("{line}\n").as_bytes(), format!("{host}:{port}")) {
            eprintln!("udp-send: {error}");
            std::process::exit(1);
        }
    }
}

fn demo(root: &Path, shim: &Path, server_bin: &Path, apps: &Apps) -> Result<(), String> {
    let volume = root.join("volume");
    let queue = root.join("queue");
    std::fs::create_dir_all(&volume).map_err(|error| error.to_string())?;
    // What `ftss-server init --volume` does: the nodes' shims refuse a volume without its marker.
    fsbridge::Volume::new(&volume).create().map_err(|error| error.to_string())?;
    println!("volume:  {}", volume.display());
    println!("queue:   {}", queue.display());

    let server = Command::new(server_bin)
        .args(["run", "--poll", "10ms", "--volume"])
        .arg(&volume)
        .arg("--queue-dir")
        .arg(&queue)
        .stderr(Stdio::null())
        .spawn()
        .map_err(|error| format!("starting ftss-server: {error}"))?;
    let _server = Killed(server);

    let node = |(mut command, _): (Command, &str), name: &str, addr: &str| {
        command
            .env("LD_PRELOAD", shim)
            .env("FTSS_VOLUME", &volume)
            .env("FTSS_NODE", name)
            .env("FTSS_ADDR", addr)
            .env("FTSS_LOG", root.join(format!("{name}.log")));
        command
    };

    println!("node b:  {} (FTSS_NODE=b FTSS_ADDR=10.77.0.2)", apps.listener().1);
    let mut receiver = node(apps.listener(), "b", "10.77.0.2")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|error| format!("starting nc -l: {error}"))?;
    let stdout = receiver.stdout.take().expect("piped");
    let _receiver = Killed(receiver);
    let (lines_tx, lines_rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    std::thread::sleep(Duration::from_millis(300));

    println!("node a:  {} (FTSS_NODE=a FTSS_ADDR=10.77.0.1)", apps.sender().1);
    let mut sender = node(apps.sender(), "a", "10.77.0.1")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .map_err(|error| format!("starting nc: {error}"))?;
    let mut stdin = sender.stdin.take().expect("piped");
    for line in LINES {
        // One write per line, so nc sends one datagram per line.
        stdin.write_all(format!("{line}\n").as_bytes()).map_err(|error| error.to_string())?;
        stdin.flush().map_err(|error| error.to_string())?;
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(stdin);
    let _sender = Killed(sender);

    let mut received = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while received.len() < LINES.len() && Instant::now() < deadline {
        if let Ok(line) = lines_rx.recv_timeout(Duration::from_millis(100)) {
            println!("b got:   {line}");
            received.push(line);
        }
    }
    if received != LINES {
        return Err(format!("node b received {received:?}, expected {LINES:?}"));
    }
    // Wait until b's receipts reached the server (its queue is empty), then show its status.
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let json = Command::new(server_bin).args(["status", "--json", "--volume"]).arg(&volume).output();
        let drained = json
            .ok()
            .and_then(|output| serde_json::from_slice::<serde_json::Value>(&output.stdout).ok())
            .is_some_and(|status| {
                status["counters"]["receipted"].as_u64() >= Some(LINES.len() as u64) && status["queue"]["packets"] == 0
            });
        if drained {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    println!();
    let status = Command::new(server_bin)
        .arg("status")
        .arg("--volume")
        .arg(&volume)
        .output()
        .map_err(|error| error.to_string())?;
    print!("{}", String::from_utf8_lossy(&status.stdout));
    println!("\nall {} lines delivered through the volume.", LINES.len());
    Ok(())
}
