//! Operator tooling: pcap dumps read back with tshark, Prometheus metrics scraped over HTTP, the
//! TOML settings file, the systemd units, the human status table.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const PY_SENDER: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("10.77.0.1", int(sys.argv[2])))
for n in range(int(sys.argv[1])):
    s.sendto(f"pcap-{n}".encode(), ("10.77.0.2", 9500))
"#;

/// Sends `count` datagrams from 10.77.0.1:`source_port` (each test its own port: the shim reserves
/// bound ports host-wide).
fn send(fabric: &Fabric, count: usize, source_port: u16) {
    let mut command = fabric.command("a", "10.77.0.1", "python3");
    let output = command.args(["-c", PY_SENDER, &count.to_string(), &source_port.to_string()]).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
}

fn queue_args(fabric: &Fabric) -> Vec<String> {
    fabric.queue_dirs.iter().flat_map(|dir| ["--queue-dir".to_string(), dir.display().to_string()]).collect()
}

#[test]
fn dump_pcap_is_read_back_by_tshark() {
    assert!(have("tshark"), "tshark is not installed (bash .ci/run installs it)");
    let mut fabric = Fabric::new("pcap");
    fabric.start_server();
    // Nobody receives at b: the packets stay queued.
    send(&fabric, 5, 4321);
    assert!(wait_until(Duration::from_secs(20), || fabric.counter("stored") >= 5));
    let pcap = fabric.dir.0.join("dump.pcap");
    let output = Command::new(server_path())
        .arg("dump")
        .args(queue_args(&fabric))
        .args(["--node", "a", "--since", "1h", "--pcap"])
        .arg(&pcap)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let lines = tshark_fields(&pcap);
    let expected: Vec<String> = (0..5)
        .map(|n| {
            let hex: String = format!("pcap-{n}").bytes().map(|byte| format!("{byte:02x}")).collect();
            format!("10.77.0.1\t4321\t10.77.0.2\t9500\t{hex}")
        })
        .collect();
    assert_eq!(lines, expected);
    // A filter that matches nothing writes an empty capture (header only), which tshark reads.
    let empty = fabric.dir.0.join("empty.pcap");
    let output = Command::new(server_path())
        .arg("dump")
        .args(queue_args(&fabric))
        .args(["--node", "zz", "--pcap"])
        .arg(&empty)
        .output()
        .unwrap();
    assert!(output.status.success());
    let count = Command::new("tshark").arg("-r").arg(&empty).stderr(Stdio::null()).output().unwrap();
    assert!(count.status.success() && count.stdout.is_empty());
}

fn scrape(port: u16) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
    assert!(response.contains("Content-Type: text/plain; version=0.0.4"), "{response}");
    response.split_once("\r\n\r\n").expect("a body").1.to_owned()
}

fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|line| line.starts_with(name) && line[name.len()..].starts_with(' '))
        .and_then(|line| line.rsplit(' ').next()?.parse().ok())
}

#[test]
fn metrics_are_served_in_prometheus_text_format() {
    let mut fabric = Fabric::new("metrics");
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    fabric.start_server_with(&["--metrics", &format!("127.0.0.1:{port}")]);
    send(&fabric, 7, 4322);
    assert!(
        wait_until(Duration::from_secs(20), || sample(&scrape(port), "ftss_stored_total") == Some(7.0)),
        "{}",
        scrape(port)
    );
    let text = scrape(port);
    for line in text.lines().filter(|line| !line.starts_with('#')) {
        let (name, value) = line.rsplit_once(' ').unwrap();
        assert!(value.parse::<f64>().is_ok(), "not a sample line: {line}");
        assert!(name.starts_with("ftss_"), "{line}");
    }
    assert!(text.contains("# TYPE ftss_sync_seconds histogram"));
    assert!(sample(&text, "ftss_sync_seconds_count").is_some_and(|count| count >= 1.0), "{text}");
    // Every group commit is counted, whatever it carried (packets, receipts, egress records,
    // dead letters, log cursors): the status's counter and the histogram agree (issue 18: three
    // of the four sync sites were not counted).
    assert_eq!(sample(&text, "ftss_syncs_total"), sample(&text, "ftss_sync_seconds_count"), "{text}");
    assert_eq!(sample(&text, "ftss_queue_packets"), Some(7.0), "{text}");
    // Where the main loop's time goes: every step is there, the syncs took time, and the steps
    // of the cycles add up to no more than the server has been running.
    assert!(sample(&text, "ftss_cycles_total").is_some_and(|cycles| cycles >= 1.0), "{text}");
    let steps = ["gather", "read", "deliver_early", "sync", "complete", "deliver", "other", "idle"];
    let seconds: Vec<f64> = steps
        .iter()
        .map(|step| sample(&text, &format!("ftss_cycle_seconds_total{{step=\"{step}\"}}")).expect(step))
        .collect();
    assert!(seconds[3] > 0.0, "no time in syncs: {text}");
    let status = fabric.status();
    let running = status["updated_unix_ms"].as_f64().unwrap() - status["started_unix_ms"].as_f64().unwrap();
    let total: f64 = seconds.iter().sum();
    // All of the main loop's time is in some step (startup before the loop aside).
    assert!(total <= running / 1000.0 + 1.0 && total >= running / 2000.0 - 0.5, "{seconds:?} in {running} ms: {text}");
    assert_eq!(status["cycle_time"]["seconds"].as_object().map(|steps| steps.len()), Some(steps.len()), "{status}");
    assert_eq!(sample(&text, "ftss_degraded"), Some(0.0));
    assert_eq!(sample(&text, "ftss_backpressure"), Some(0.0));
    assert!(text.contains("ftss_mirror_healthy{dir="), "{text}");
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.write_all(b"GET /nothing HTTP/1.1\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 404"), "{response}");
}

#[test]
fn settings_come_from_a_toml_file_and_flags_override_it() {
    let mut fabric = Fabric::new("config");
    let file = fabric.dir.0.join("server.toml");
    std::fs::write(
        &file,
        format!(
            "volume = {:?}\nqueue-dir = [{:?}]\nretain = \"2h\"\nhold = \"7m\"\npoll = \"10ms\"\n",
            fabric.volume.display().to_string(),
            fabric.queue_dirs[0].display().to_string()
        ),
    )
    .unwrap();
    let mut server = Command::new(server_path());
    server.args(["run", "--config"]).arg(&file).args(["--hold", "3m"]).stderr(Stdio::null());
    let server = server.spawn().unwrap();
    let _server = Proc { child: server, name: "server".into() };
    assert!(wait_until(Duration::from_secs(10), || fabric.volume.join("server/status.json").exists()));
    assert!(wait_until(Duration::from_secs(5), || fabric.status()["config"]["retain_seconds"] == 7200));
    assert_eq!(fabric.status()["config"]["hold_seconds"], 180, "the flag must win over the file");
    fabric.server = None;

    for (text, key) in [
        ("volume = \"/v\"\nqueue-dir = [\"/q\"]\nretian = \"1h\"\n", "retian"),
        ("volume = \"/v\"\nqueue-dir = [\"/q\"]\nhold = \"forever\"\n", "hold"),
    ] {
        std::fs::write(&file, text).unwrap();
        let output = Command::new(server_path()).args(["run", "--config"]).arg(&file).output().unwrap();
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(key), "the error does not name {key}: {stderr}");
    }
}

fn verify_units(dir: &Path, unit: &str) -> String {
    let output = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(dir.join(unit))
        .env("SYSTEMD_UNIT_PATH", format!("{}:", dir.display()))
        .output()
        .unwrap();
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

#[test]
fn the_systemd_units_verify_cleanly() {
    assert!(have("systemd-analyze"), "systemd-analyze is missing (bash .ci/run installs systemd)");
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/systemd");
    let dir = TempDir::new("units");
    let nc_path = String::from_utf8(Command::new("sh").args(["-c", "command -v nc"]).output().unwrap().stdout).unwrap();
    let nc_path = nc_path.trim().to_owned();
    for name in ["ftss-server.service", "legacy-app.service", "legacy-app.service.d/ftss.conf"] {
        std::fs::create_dir_all(dir.0.join(name).parent().unwrap()).unwrap();
        let text = std::fs::read_to_string(examples.join(name)).unwrap();
        // Point ExecStart at binaries that exist here (verify checks them).
        let text = text.replace("/usr/local/bin/ftss-server", &server_path().display().to_string());
        let text = text.replace("/usr/bin/nc", &nc_path);
        std::fs::write(dir.0.join(name), text).unwrap();
    }
    for unit in ["ftss-server.service", "legacy-app.service"] {
        let complaints = verify_units(&dir.0, unit);
        assert!(complaints.trim().is_empty(), "{unit}: {complaints}");
    }
    // The check can fail: a bad key in the drop-in is reported.
    std::fs::write(dir.0.join("legacy-app.service.d/broken.conf"), "[Service]\nEnviroment=X=1\n").unwrap();
    assert!(
        verify_units(&dir.0, "legacy-app.service").contains("Enviroment"),
        "systemd-analyze did not read the drop-in"
    );
    // The example settings file is valid for the server.
    let settings = std::fs::read_to_string(examples.join("server.toml")).unwrap();
    let parsed: toml::Value = toml::from_str(&settings).unwrap();
    assert!(parsed.get("queue-dir").is_some());
}

#[test]
fn status_prints_a_readable_table_and_scrub_is_quiet_when_piped() {
    let mut fabric = Fabric::new("table");
    let node = fsbridge::NodeName::new("b").unwrap();
    let config = fsbridge::NodeConfig { addr: "10.77.0.2".parse().unwrap() };
    fsbridge::Volume::new(&fabric.volume).register_node(&node, &config).unwrap();
    fabric.start_server();
    send(&fabric, 3, 4323);
    assert!(wait_until(Duration::from_secs(20), || fabric.counter("stored") >= 3));
    let output = Command::new(server_path()).arg("status").arg("--volume").arg(&fabric.volume).output().unwrap();
    let table = String::from_utf8(output.stdout).unwrap();
    assert!(table.starts_with("ftss-server: running"), "{table}");
    let header = table.lines().find(|line| line.starts_with("NODE")).expect("node table header");
    assert!(header.contains("QUEUED") && header.contains("OLDEST MS"), "{header}");
    let row_b = table.lines().find(|line| line.starts_with("b ")).expect("row for node b");
    assert_eq!(row_b.split_whitespace().nth(2), Some("3"), "{row_b}");
    fabric.stop_server();
    let output = Command::new(server_path()).arg("scrub").args(queue_args(&fabric)).output().unwrap();
    assert!(output.status.success());
    assert!(output.stderr.is_empty(), "progress written to a pipe: {}", String::from_utf8_lossy(&output.stderr));
    assert!(String::from_utf8_lossy(&output.stdout).contains("records verified"));
}

fn tshark_fields(pcap: &Path) -> Vec<String> {
    let fields = Command::new("tshark")
        .arg("-r")
        .arg(pcap)
        .args([
            "-T",
            "fields",
            "-e",
            "ip.src",
            "-e",
            "udp.srcport",
            "-e",
            "ip.dst",
            "-e",
            "udp.dstport",
            "-e",
            "data.data",
        ])
        .stderr(Stdio::null())
        .output()
        .unwrap();
    assert!(fields.status.success(), "tshark cannot read {}", pcap.display());
    String::from_utf8(fields.stdout).unwrap().lines().map(str::to_owned).collect()
}

#[test]
fn ftss_pcap_records_what_one_process_sent_and_received() {
    assert!(have("tshark"), "tshark is not installed (bash .ci/run installs it)");
    let mut fabric = Fabric::new("shim-pcap");
    fabric.start_server();
    let received_pcap = fabric.dir.0.join("b.pcap");
    let mut receiver = fabric.command("b", "10.77.0.2", "python3");
    receiver
        .args(["-c", common::apps::PY_RECEIVER, "9501"])
        .env("FTSS_PCAP", &received_pcap)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut receiver = receiver.spawn().unwrap();
    let lines = LineCollector::start(receiver.stdout.take().unwrap());
    let _receiver = Proc { child: receiver, name: "receiver".into() };
    assert!(wait_until(Duration::from_secs(20), || lines.count() >= 1));
    let sent_pcap = fabric.dir.0.join("a.pcap");
    let script = "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ns.bind(('10.77.0.1', 4324))\n\
                  for n in range(3):\n    s.sendto(f'cap-{n}'.encode(), ('10.77.0.2', 9501))\n";
    let output =
        fabric.command("a", "10.77.0.1", "python3").args(["-c", script]).env("FTSS_PCAP", &sent_pcap).output().unwrap();
    assert!(output.status.success());
    assert!(wait_until(Duration::from_secs(20), || lines.count() >= 4), "got {:?}", lines.lines());
    let expected: Vec<String> = (0..3)
        .map(|n| {
            let hex: String = format!("cap-{n}").bytes().map(|byte| format!("{byte:02x}")).collect();
            format!("10.77.0.1\t4324\t10.77.0.2\t9501\t{hex}")
        })
        .collect();
    assert_eq!(tshark_fields(&sent_pcap), expected, "the sender's capture");
    assert_eq!(tshark_fields(&received_pcap), expected, "the receiver's capture");
}

/// Every subcommand's `--help` describes that subcommand (old: `fabric-key --help` described
/// `dump`, and `dump --help` had no description), and `--version` works.
#[test]
fn each_subcommand_help_describes_it_and_version_works() {
    let help = |command: &str| {
        let output = Command::new(server_path()).args([command, "--help"]).output().unwrap();
        assert!(output.status.success(), "{command} --help failed");
        String::from_utf8_lossy(&output.stdout).lines().next().unwrap_or_default().to_string()
    };
    for (command, first_line_starts) in [
        ("run", "Drain every node's outbox"),
        ("status", "Show the server's counters"),
        ("init", "Prepare a volume"),
        ("check", "Check that a volume is safe"),
        ("scrub", "Verify every queue segment"),
        ("fabric-key", "Make a fabric key for a node"),
        ("dump", "List the packets in the queue"),
    ] {
        let first = help(command);
        assert!(first.starts_with(first_line_starts), "{command} --help begins {first:?}");
    }
    let version = Command::new(server_path()).arg("--version").output().unwrap();
    assert!(version.status.success());
    assert!(String::from_utf8_lossy(&version.stdout).starts_with("ftss-server 0."), "{version:?}");
}
