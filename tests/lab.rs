//! The real storage stack: kernel NFS and SMB clients in QEMU guests (see tests/common/lab.rs).

mod common;

use std::time::Duration;

use common::TempDir;
use common::lab::{self, Ganesha, GaneshaCache, Guest, GuestSpec, Smbd};

#[test]
fn guest_mounts_the_volume_over_nfs_and_smb() {
    let _lab = lab::exclusive();
    let dir = TempDir::new("lab-smoke");
    let volume = dir.0.join("volume");
    std::fs::create_dir_all(&volume).unwrap();
    std::fs::write(volume.join("from-host"), b"hello").unwrap();
    let ganesha = Ganesha::start(&volume, GaneshaCache::Off);
    let smbd = Smbd::start(&volume);
    let mut guest = Guest::boot(&GuestSpec {
        name: "smoke",
        script: "host_root\nmount_volume nfs4.1\ncat /newroot$VOLUME/from-host; echo\necho from-nfs >/newroot$VOLUME/nfs-file\n\
                 VOLUME=/mnt/smb mount_volume smb3\necho from-smb >/newroot/mnt/smb/smb-file\n\
                 in_root python3 -c 'print(\"PY-\" + \"OK\")'\n".into(),
        nfs_port: Some(ganesha.port),
        smb_port: Some(smbd.port),
        memory_mib: 512,
    });
    let status = guest.wait(Duration::from_secs(60));
    let console = guest.console();
    assert_eq!(status, Some(0), "guest failed:\n{console}\nganesha: {}", ganesha.log());
    assert_eq!(std::fs::read_to_string(volume.join("nfs-file")).unwrap(), "from-nfs\n");
    assert_eq!(std::fs::read_to_string(volume.join("smb-file")).unwrap(), "from-smb\n");
    assert!(console.contains("PY-OK"), "{console}");
}

/// Answers every datagram with the same payload (node a, on the array host).
const PY_ECHO: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
print("ready", flush=True)
while True:
    data, addr = s.recvfrom(65535)
    s.sendto(data, addr)
"#;

/// Sends COUNT requests to HOST:PORT one after another, each waiting up to WAIT seconds for its
/// answer; prints "RTT n seconds" or "LOST n".
const PY_REQUESTER: &str = r#"
import socket, sys, time
host, port, count, wait = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 0))
for n in range(count):
    started = time.monotonic()
    s.sendto(f"req-{n}".encode(), (host, port))
    deadline = started + wait
    answered = False
    while not answered and time.monotonic() < deadline:
        s.settimeout(max(0.001, deadline - time.monotonic()))
        try:
            data, _ = s.recvfrom(65535)
        except socket.timeout:
            break
        answered = data == f"req-{n}".encode()
    print(f"RTT {n} {time.monotonic() - started:.3f}" if answered else f"LOST {n}", flush=True)
"#;

/// The job line that runs a python script under the shim in the guest as node b (10.77.0.2).
fn guest_app(script: &str, args: &str) -> String {
    let shim = common::shim_path();
    format!(
        "cat >/newroot/tmp/app.py <<'PYEOF'\n{script}\nPYEOF\n\
         in_root env LD_PRELOAD={shim} FTSS_VOLUME=$VOLUME FTSS_NODE=b FTSS_ADDR=10.77.0.2 FTSS_LOG=/tmp/shim.log \
         python3 /tmp/app.py {args}\n\
         echo \"LAB-SHIM-LOG $(tail -n 5 /newroot/tmp/shim.log 2>/dev/null | tr '\\n' '|')\"\n",
        shim = shim.display(),
    )
}

/// How a guest mounts the volume, and the job lines that do it (with the programs' root).
fn mount_lines(kind: &str) -> String {
    let minor = kind.strip_prefix("nfs4.").unwrap_or("1");
    let artifacts = common::artifact_dir();
    format!("host_root {minor}\nbind_host {}\nmount_volume {kind}\n", artifacts.display())
}

/// Round trips from a node on the kernel client `kind` to an echo app on the array host; the
/// seconds each took (`None`: no answer within `wait`).
fn round_trips(kind: &str, cache: GaneshaCache, count: usize, wait: f64) -> Vec<Option<f64>> {
    let mut fabric = common::Fabric::new(&format!("lab-rtt-{kind}"));
    fabric.start_server();
    let ganesha = Ganesha::start(&fabric.volume, cache);
    let smbd = Smbd::start(&fabric.volume);
    let mut echo = fabric.command("a", "10.77.0.1", "python3");
    echo.args(["-c", PY_ECHO, "7000"]).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::null());
    let mut echo = common::Proc { child: echo.spawn().unwrap(), name: "echo".into() };
    let echo_lines = common::LineCollector::start(echo.child.stdout.take().unwrap());
    assert!(common::wait_until(Duration::from_secs(10), || echo_lines.count() > 0), "echo app did not start");
    let script = format!("{}{}", mount_lines(kind), guest_app(PY_REQUESTER, &format!("10.77.0.1 7000 {count} {wait}")));
    let limit = Duration::from_secs_f64(60.0 + wait * count as f64);
    let mut guest = Guest::boot(&GuestSpec {
        name: "rtt",
        script,
        nfs_port: Some(ganesha.port),
        smb_port: Some(smbd.port),
        memory_mib: 512,
    });
    let status = guest.wait(limit);
    let console = guest.console();
    assert_eq!(status, Some(0), "guest job failed:\n{console}\nserver: {}", fabric.server_log());
    let mut results = vec![None; count];
    for line in guest.lines("RTT ") {
        let mut parts = line.split_whitespace();
        let n: usize = parts.next().unwrap().parse().unwrap();
        results[n] = Some(parts.next().unwrap().parse().unwrap());
    }
    eprintln!("{kind} ({cache:?}): {results:?}\n{}", guest.lines("LAB-SHIM-LOG").join("\n"));
    results
}

fn percentile(results: &[Option<f64>], fraction: f64) -> f64 {
    let mut seconds: Vec<f64> = results.iter().map(|r| r.unwrap_or(f64::INFINITY)).collect();
    seconds.sort_by(f64::total_cmp);
    seconds[((seconds.len() as f64 * fraction).ceil() as usize).clamp(1, seconds.len()) - 1]
}

#[test]
#[ignore = "a measurement, not a check: cargo test --release --test lab measure -- --ignored --nocapture"]
fn measure_round_trips() {
    let _lab = lab::exclusive();
    for (kind, cache) in [("nfs4.1", GaneshaCache::Off), ("smb3", GaneshaCache::Off), ("nfs4.1", GaneshaCache::Default)]
    {
        let results = round_trips(kind, cache, 6, 40.0);
        eprintln!("MEASURE {kind} {cache:?} p50 {:.3} p90 {:.3}", percentile(&results, 0.5), percentile(&results, 0.9));
    }
}

/// What a node sees of files the array host changes directly in the export's directory: a fresh
/// listing, a buffered read and an O_DIRECT read of an appended file, and a rename of a new file
/// by its name.
#[test]
#[ignore = "an experiment: cargo test --release --test lab visibility -- --ignored --nocapture"]
fn measure_visibility() {
    let _lab = lab::exclusive();
    for cache in [GaneshaCache::Off, GaneshaCache::Default] {
        let dir = TempDir::new("lab-visibility");
        let volume = dir.0.join("volume");
        std::fs::create_dir_all(volume.join("d/new")).unwrap();
        std::fs::create_dir_all(volume.join("d/tmp")).unwrap();
        std::fs::write(volume.join("d/bell"), b"").unwrap();
        let ganesha = Ganesha::start(&volume, cache);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = {
            let volume = volume.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                use std::io::Write;
                let mut n = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    std::fs::write(volume.join(format!("d/new/f{n}")), b"x").unwrap();
                    let mut bell = std::fs::OpenOptions::new().append(true).open(volume.join("d/bell")).unwrap();
                    bell.write_all(format!("{n:07}\n").as_bytes()).unwrap();
                    n += 1;
                    std::thread::sleep(Duration::from_millis(300));
                }
            })
        };
        let probe = r#"
import os, mmap, time
d = "/mnt/ftss/d"
buf = mmap.mmap(-1, 1 << 16)
for i in range(40):
    fd = os.open(d + "/bell", os.O_RDONLY | os.O_DIRECT)
    n = os.preadv(fd, [buf], 0)
    os.close(fd)
    direct = bytes(buf[:n]).split()
    with open(d + "/bell", "rb") as f:
        buffered = f.read().split()
    listed = sorted(int(x[1:]) for x in os.listdir(d + "/new"))
    last = int(direct[-1]) if direct else -1
    renamed = "none"
    if last >= 0:
        try:
            os.rename(f"{d}/new/f{last}", f"{d}/tmp/f{last}")
            renamed = "ok"
        except OSError as e:
            renamed = f"errno {e.errno}"
    print(f"VIS {i} direct {last} buffered {int(buffered[-1]) if buffered else -1} listed {listed[-1] if listed else -1} rename {renamed}", flush=True)
    time.sleep(0.25)
"#;
        let script = format!(
            "{}cat >/newroot/tmp/p.py <<'EOF'\n{probe}\nEOF\nin_root python3 /tmp/p.py\n",
            mount_lines("nfs4.1")
        );
        let mut guest = Guest::boot(&GuestSpec {
            name: "vis",
            script,
            nfs_port: Some(ganesha.port),
            smb_port: None,
            memory_mib: 512,
        });
        let status = guest.wait(Duration::from_secs(120));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        writer.join().unwrap();
        eprintln!("{cache:?} status {status:?}\n{}", guest.lines("VIS ").join("\n"));
    }
}
