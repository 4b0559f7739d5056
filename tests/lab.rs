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
    let mut guest = boot_node("smoke", "host_root\nmount_volume nfs4.1\ncat /newroot$VOLUME/from-host; echo\necho from-nfs >/newroot$VOLUME/nfs-file\n\
                 VOLUME=/mnt/smb mount_volume smb3\necho from-smb >/newroot/mnt/smb/smb-file\n\
                 in_root python3 -c 'print(\"PY-\" + \"OK\")'\n".into(), &ganesha, Some(&smbd));
    let status = guest.wait(Duration::from_secs(60));
    let console = guest.console();
    assert_eq!(status, Some(0), "guest failed:\n{console}\nganesha: {}", ganesha.log());
    assert_eq!(std::fs::read_to_string(volume.join("nfs-file")).unwrap(), "from-nfs\n");
    assert_eq!(std::fs::read_to_string(volume.join("smb-file")).unwrap(), "from-smb\n");
    assert!(console.contains("PY-OK"), "{console}");
}

/// Boots a node guest that reaches `ganesha` (and `smbd`, if given) and runs `script`.
fn boot_node(name: &str, script: String, ganesha: &Ganesha, smbd: Option<&Smbd>) -> Guest {
    Guest::boot(&GuestSpec {
        name,
        script,
        nfs_port: Some(ganesha.port),
        smb_port: smbd.map(|smbd| smbd.port),
        memory_mib: 512,
        cmdline: String::new(),
        qemu_args: Vec::new(),
    })
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
/// answer; prints "RTT n seconds" or "LOST n". With DIR (a directory on the volume), each datagram
/// is preceded by the same request/reply with plain files, the baseline of the array's round trips
/// (the array VM's PY_FILE_ECHO answers): `req-N` written, synced and renamed into DIR, the answer
/// read from the known file `rep-N` with `O_DIRECT` every 10 ms (the shim's poll); printed
/// "BASE n seconds" (or "BASE-LOST n").
const PY_REQUESTER: &str = r#"
import mmap, os, socket, sys, time
host, port, count, wait = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
d = sys.argv[5] if len(sys.argv) > 5 else None
if d:
    os.makedirs(d, exist_ok=True)
    buf = mmap.mmap(-1, 4096)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 0))
for n in range(count):
    if d:
        fd = os.open(os.path.join(d, f"rep-{n}"), os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o644)
        started = time.monotonic()
        tmp = os.path.join(d, f"tmp-{n}")
        with open(tmp, "wb") as f:
            f.write(f"req-{n}".encode())
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, os.path.join(d, f"req-{n}"))
        answered = False
        while not answered and time.monotonic() < started + wait:
            answered = os.preadv(fd, [buf], 0) > 0
            if not answered:
                time.sleep(0.01)
        os.close(fd)
        print(f"BASE {n} {time.monotonic() - started:.3f}" if answered else f"BASE-LOST {n}", flush=True)
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
    guest_app_with(script, args, "")
}

/// Like [`guest_app`], with more environment (`NAME=value ...`) for the shim.
fn guest_app_with(script: &str, args: &str, env: &str) -> String {
    let shim = common::shim_path();
    format!(
        "cat >/newroot/tmp/app.py <<'PYEOF'\n{script}\nPYEOF\n\
         in_root env LD_PRELOAD={shim} FTSS_VOLUME=$VOLUME FTSS_NODE=b FTSS_ADDR=10.77.0.2 FTSS_LOG=/tmp/shim.log {env} \
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
    let mut guest = boot_node("rtt", script, &ganesha, Some(&smbd));
    let status = guest.wait(limit);
    let console = guest.console();
    assert_eq!(status, Some(0), "guest job failed:\n{console}\nserver: {}", fabric.server_log());
    let results = timings(guest.lines("RTT "), count);
    eprintln!("{kind} ({cache:?}): {results:?}\n{}", guest.lines("LAB-SHIM-LOG").join("\n"));
    results
}

fn percentile(results: &[Option<f64>], fraction: f64) -> f64 {
    let mut seconds: Vec<f64> = results.iter().map(|r| r.unwrap_or(f64::INFINITY)).collect();
    seconds.sort_by(f64::total_cmp);
    seconds[((seconds.len() as f64 * fraction).ceil() as usize).clamp(1, seconds.len()) - 1]
}

/// A node on a kernel client with default mount options gets its answers within a second (before
/// the doorbells, NFSv4.1 behind nfs-ganesha took 30 s at p90, or never answered).
#[test]
fn request_reply_over_kernel_nfs_and_smb_answers_within_a_second() {
    let _lab = lab::exclusive();
    for kind in ["nfs4.1", "nfs4.2", "smb3"] {
        let results = round_trips(kind, GaneshaCache::Default, 10, 20.0);
        assert!(results.iter().all(Option::is_some), "{kind}: requests went unanswered: {results:?}");
        let p90 = percentile(&results, 0.9);
        assert!(p90 < 1.0, "{kind}: round trip p90 {p90:.3} s (all: {results:?})");
    }
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
        let mut guest = boot_node("vis", script, &ganesha, None);
        let status = guest.wait(Duration::from_secs(120));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        writer.join().unwrap();
        eprintln!("{cache:?} status {status:?}\n{}", guest.lines("VIS ").join("\n"));
    }
}

/// Sends COUNT lines "<tag>-<n>" to HOST:PORT (volume ack mode: each send returns once durable on
/// the volume) and prints "SENT n" for each send that returned.
const PY_GUEST_SENDER: &str = r#"
import socket, sys
host, port, tag, count = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for n in range(count):
    s.sendto(f"{tag}-{n}\n".encode(), (host, port))
    print(f"SENT {n}", flush=True)
"#;

/// nc under the shim on a node over kernel NFS / SMB receives lines from the array host, and a
/// python sender there sends lines to nc on the array host: every line whose send returned
/// arrives once, intact.
#[test]
fn nc_and_python_exchange_lines_both_ways_over_kernel_nfs_and_smb() {
    let _lab = lab::exclusive();
    let count = 20;
    for kind in ["nfs4.2", "smb3"] {
        let mut fabric = common::Fabric::new(&format!("lab-lines-{kind}"));
        fabric.start_server();
        let ganesha = Ganesha::start(&fabric.volume, GaneshaCache::Default);
        let smbd = Smbd::start(&fabric.volume);
        let (_listener, host_lines) = common::nc_listener(&fabric, "a", "10.77.0.1", 9100);
        let to_guest: Vec<String> = (0..count).map(|n| format!("to-guest-{n}")).collect();
        assert!(common::nc_send_lines(&fabric, "a", "10.77.0.1", "10.77.0.2", 9000, &to_guest));
        let shim = common::shim_path();
        let script = format!(
            "{mount}in_root env LD_PRELOAD={shim} FTSS_VOLUME=$VOLUME FTSS_NODE=b FTSS_ADDR=10.77.0.2 \
             FTSS_LOG=/tmp/nc.log timeout 60 nc -u -l 9000 >/newroot/tmp/got &\n\
             {sender}\
             for i in $(seq 1 600); do [ \"$(wc -l </newroot/tmp/got)\" -ge {count} ] && break; sleep 0.1; done\n\
             sed 's/^/GOT /' /newroot/tmp/got\n",
            mount = mount_lines(kind),
            shim = shim.display(),
            sender = guest_app(PY_GUEST_SENDER, &format!("10.77.0.1 9100 from-guest {count}")),
        );
        let mut guest = boot_node("lines", script, &ganesha, Some(&smbd));
        let status = guest.wait(Duration::from_secs(150));
        let console = guest.console();
        assert_eq!(status, Some(0), "{kind}: guest job failed:\n{console}\nserver: {}", fabric.server_log());
        // History: every line the host's nc sent arrived in the guest once, in order.
        assert_eq!(guest.lines("GOT "), to_guest, "{kind}: what the guest's nc got\n{console}");
        // Every line whose send returned in the guest reaches the host's nc once.
        let sent: Vec<String> = guest.lines("SENT ").iter().map(|n| format!("from-guest-{}", n.trim())).collect();
        assert_eq!(sent.len(), count, "{kind}: sends that returned\n{console}");
        assert!(
            common::wait_until(Duration::from_secs(20), || host_lines.count() >= count),
            "{kind}: the host's nc got {:?}",
            host_lines.lines()
        );
        assert_eq!(host_lines.lines(), sent, "{kind}: lost, duplicated or changed on the way to the host");
    }
}

/// A node VM killed -9 (power loss) while sending over kernel NFS: every send that had returned
/// arrives at the array host's receiver, and none twice.
#[test]
fn a_node_vm_killed_mid_send_over_nfs_loses_no_acked_datagram() {
    let _lab = lab::exclusive();
    let mut fabric = common::Fabric::new("lab-node-kill");
    fabric.start_server();
    let ganesha = Ganesha::start(&fabric.volume, GaneshaCache::Default);
    let receiver =
        common::apps::Receiver::start_script(&fabric, "a", "10.77.0.1", common::apps::PY_RECEIVER, &["9100"]);
    let script = format!("{}{}", mount_lines("nfs4.2"), guest_app(PY_GUEST_SENDER, "10.77.0.1 9100 kill 100000"));
    let mut guest = boot_node("kill", script, &ganesha, None);
    let sending = common::wait_until(Duration::from_secs(120), || guest.lines("SENT ").len() >= 200);
    assert!(sending, "the guest did not get going:\n{}", guest.console());
    guest.kill();
    let acked: Vec<String> = guest.lines("SENT ").iter().map(|n| format!("kill-{}", n.trim())).collect();
    // The receiver prints each payload with its newline: drop the blank lines between.
    let payloads = || -> Vec<String> { receiver.payloads().into_iter().filter(|line| !line.is_empty()).collect() };
    let arrived = common::wait_until(Duration::from_secs(60), || {
        let got = payloads();
        acked.iter().all(|line| got.contains(line))
    });
    let got = payloads();
    let missing: Vec<&String> = acked.iter().filter(|line| !got.contains(line)).collect();
    assert!(
        arrived,
        "{} of {} acked sends never arrived: {:?}",
        missing.len(),
        acked.len(),
        &missing[..missing.len().min(10)]
    );
    let mut seen = std::collections::HashSet::new();
    let twice: Vec<&String> = got.iter().filter(|line| !seen.insert(*line)).collect();
    assert!(twice.is_empty(), "delivered twice: {twice:?}");
    eprintln!("node VM killed after {} acked sends; {} datagrams arrived in all", acked.len(), got.len());
}

/// Tries one datagram to node a from a socket and from a dup of it; prints "SEND-OK" or
/// "SEND-ERR <errno>" for each.
const PY_TRY_SEND: &str = r#"
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for sock in (s, s.dup()):
    try:
        sock.sendto(b"should-not-leave", ("10.77.0.1", 9100))
        print("SEND-OK", flush=True)
    except OSError as error:
        print(f"SEND-ERR {error.errno}", flush=True)
"#;

/// The job lines that run `ftss-server check` on the guest's volume path and print its verdict.
fn check_lines() -> String {
    format!(
        "in_root {} check --volume $VOLUME >/newroot/tmp/check 2>&1; echo \"CHECK-EXIT $?\"; sed 's/^/CHECK /' /newroot/tmp/check\n",
        common::server_path().display()
    )
}

/// A node whose volume is a soft NFS mount, an SMB mount with nostrictsync, or not mounted at all
/// is refused: `ftss-server check` says why and exits non-zero, and the shim fails the app's fabric
/// sends with ENETUNREACH (never passing them to the real network) and writes nothing there.
#[test]
fn unsafe_or_missing_mounts_are_refused_and_fail_closed() {
    let _lab = lab::exclusive();
    let fabric = common::Fabric::new("lab-unsafe");
    let ganesha = Ganesha::start(&fabric.volume, GaneshaCache::Default);
    let smbd = Smbd::start(&fabric.volume);
    let artifacts = common::artifact_dir();
    let cases = [
        (
            "soft-nfs",
            format!("host_root 2\nbind_host {}\nmount_volume nfs4.2 soft\n", artifacts.display()),
            "soft NFS mount",
        ),
        (
            "smb-nostrictsync",
            format!("host_root\nbind_host {}\nmount_volume smb3 nostrictsync\n", artifacts.display()),
            "nostrictsync",
        ),
        (
            "not-mounted",
            format!("host_root\nbind_host {}\nmkdir -p /newroot$VOLUME\n", artifacts.display()),
            "no ftss-volume marker",
        ),
    ];
    for (case, mount, reason) in cases {
        let script = format!(
            "{mount}{}{}echo \"LEFT $(ls -A /newroot$VOLUME | tr '\\n' ' ')\"\n",
            check_lines(),
            guest_app(PY_TRY_SEND, "")
        );
        let mut guest = boot_node(case, script, &ganesha, Some(&smbd));
        let status = guest.wait(Duration::from_secs(120));
        let console = guest.console();
        assert_eq!(status, Some(0), "{case}: guest job failed:\n{console}");
        assert_ne!(
            guest.lines("CHECK-EXIT ").first().map(String::as_str),
            Some("0"),
            "{case}: check passed:\n{console}"
        );
        assert!(guest.lines("CHECK ").join("\n").contains(reason), "{case}: check did not say {reason:?}:\n{console}");
        let refused = format!("ERR {}", libc::ENETUNREACH);
        assert_eq!(guest.lines("SEND-"), vec![refused.clone(), refused], "{case}: sends not refused:\n{console}");
        assert!(
            guest.lines("LAB-SHIM-LOG ").join("").contains(reason),
            "{case}: the shim's log does not say why:\n{console}"
        );
        // Nothing was written where the volume should be (no node registered, no outbox).
        assert!(!fabric.volume.join("nodes/b").exists(), "{case}: the refusing shim wrote to the volume");
        if case == "not-mounted" {
            assert_eq!(
                guest.lines("LEFT ").first().map(|left| left.trim().to_owned()),
                Some(String::new()),
                "{case}:\n{console}"
            );
        }
    }
}

/// The NFS server restarted (kill -9, then started again) while a node sends over a hard NFSv4.2
/// mount: the node waits and goes on; every send that returned arrives once.
#[test]
fn an_nfs_server_restart_mid_send_loses_no_acked_datagram() {
    let _lab = lab::exclusive();
    let mut fabric = common::Fabric::new("lab-nfs-restart");
    fabric.start_server();
    let mut ganesha = Ganesha::start_with(&fabric.volume, GaneshaCache::Default, true);
    let receiver =
        common::apps::Receiver::start_script(&fabric, "a", "10.77.0.1", common::apps::PY_RECEIVER, &["9100"]);
    let count = 400;
    let script =
        format!("{}{}", mount_lines("nfs4.2"), guest_app(PY_GUEST_SENDER, &format!("10.77.0.1 9100 restart {count}")));
    let mut guest = boot_node("restart", script, &ganesha, None);
    let sending = common::wait_until(Duration::from_secs(120), || guest.lines("SENT ").len() >= 100);
    assert!(sending, "the guest did not get going:\n{}", guest.console());
    ganesha.kill();
    let before = guest.lines("SENT ").len();
    std::thread::sleep(Duration::from_secs(3));
    ganesha.restart();
    let status = guest.wait(Duration::from_secs(180));
    let console = guest.console();
    assert_eq!(status, Some(0), "the guest's job failed after the NFS server came back:\n{console}");
    let acked: Vec<String> = guest.lines("SENT ").iter().map(|n| format!("restart-{}", n.trim())).collect();
    assert_eq!(acked.len(), count, "every send returns once the server is back:\n{console}");
    let payloads = || -> Vec<String> { receiver.payloads().into_iter().filter(|line| !line.is_empty()).collect() };
    let arrived = common::wait_until(Duration::from_secs(60), || payloads().len() >= count);
    let got = payloads();
    assert!(arrived, "{} of {count} arrived", got.len());
    assert_eq!(got, acked, "lost, duplicated or reordered across the NFS server's restart");
    eprintln!("NFS server killed after {before} sends and restarted 3 s later; {count} of {count} arrived once");
}

/// A node cut off from the network for 30 s (its link taken down) while it sends and receives
/// over a hard NFSv4.2 mount: it waits, then goes on; every send that returned arrives once, and
/// it receives every datagram sent to it meanwhile, once.
#[test]
fn a_node_cut_off_for_30_s_loses_nothing_and_goes_on() {
    let _lab = lab::exclusive();
    let mut fabric = common::Fabric::new("lab-link-down");
    fabric.start_server();
    let ganesha = Ganesha::start(&fabric.volume, GaneshaCache::Default);
    let receiver =
        common::apps::Receiver::start_script(&fabric, "a", "10.77.0.1", common::apps::PY_RECEIVER, &["9100"]);
    let count = 300;
    let incoming: Vec<String> = (0..20).map(|n| format!("while-cut-off-{n}")).collect();
    let shim = common::shim_path();
    // Sends may wait out the cut (the default FTSS_TIMEOUT, 30 s, would report them unconfirmed).
    let sender = guest_app_with(PY_GUEST_SENDER, &format!("10.77.0.1 9100 cut {count}"), "FTSS_TIMEOUT=120");
    let script = format!(
        "{mount}in_root env LD_PRELOAD={shim} FTSS_VOLUME=$VOLUME FTSS_NODE=b FTSS_ADDR=10.77.0.2 \
         FTSS_LOG=/tmp/nc.log timeout 200 nc -u -l 9000 >/newroot/tmp/got &\n\
         ( {sender_line} ) >/newroot/tmp/sent &\n\
         sender=$!\n\
         until [ \"$(grep -c SENT /newroot/tmp/sent)\" -ge 50 ]; do sleep 0.1; done\n\
         ip link set eth0 down\n\
         echo \"CUT $(grep -c SENT /newroot/tmp/sent)\"\n\
         sleep 30\n\
         echo \"DURING $(grep -c SENT /newroot/tmp/sent)\"\n\
         ip link set eth0 up\n\
         ip route add default via 10.0.2.2 2>/dev/null\n\
         wait $sender\n\
         cat /newroot/tmp/sent\n\
         for i in $(seq 1 900); do [ \"$(wc -l </newroot/tmp/got)\" -ge {incoming} ] && break; sleep 0.1; done\n\
         sed 's/^/GOT /' /newroot/tmp/got\n",
        mount = mount_lines("nfs4.2"),
        shim = shim.display(),
        sender_line = sender.trim_end(),
        incoming = incoming.len(),
    );
    let mut guest = boot_node("cut", script, &ganesha, None);
    let cut = guest.wait_for("CUT ", Duration::from_secs(120));
    assert!(cut, "the guest did not get going:\n{}", guest.console());
    // Sent to the node while it is cut off: they wait in the array for it.
    assert!(common::nc_send_lines(&fabric, "a", "10.77.0.1", "10.77.0.2", 9000, &incoming));
    let status = guest.wait(Duration::from_secs(300));
    let console = guest.console();
    assert_eq!(status, Some(0), "the guest's job failed after its link came back:\n{console}");
    let number = |prefix: &str| guest.lines(prefix).first().and_then(|n| n.trim().parse::<usize>().ok()).unwrap();
    let (before, during) = (number("CUT "), number("DURING "));
    assert!(during <= before + 2, "sends kept returning with the node cut off ({before} -> {during})");
    let acked: Vec<String> = guest.lines("SENT ").iter().map(|n| format!("cut-{}", n.trim())).collect();
    assert_eq!(acked.len(), count, "every send returns once the link is back:\n{console}");
    assert_eq!(guest.lines("GOT "), incoming, "what the node received:\n{console}");
    let payloads = || -> Vec<String> { receiver.payloads().into_iter().filter(|line| !line.is_empty()).collect() };
    common::wait_until(Duration::from_secs(60), || payloads().len() >= count);
    assert_eq!(payloads(), acked, "lost, duplicated or reordered across the cut");
    eprintln!("cut off after {before} sends ({during} returned during the 30 s); {count} of {count} arrived once");
}

/// The array's volume fills up while a node sends over kernel NFS: the app's sends fail with a
/// clear errno (ENOSPC, or ENOBUFS once the shim's ring is full behind it) and the reason is in
/// FTSS_LOG; when space returns the app's retries go through, and every send that returned
/// arrives once.
#[test]
fn a_full_volume_seen_through_nfs_gives_a_clear_errno_and_traffic_resumes() {
    let _lab = lab::exclusive();
    let mut fabric = common::Fabric::new("lab-volume-full");
    let disk = common::apps::SmallDisk::mount(&fabric.volume, "16m");
    fabric.start_server();
    let ganesha = Ganesha::start(&fabric.volume, GaneshaCache::Default);
    let receiver = common::apps::Receiver::start(&fabric, 9100);
    let count = 600;
    // A node b sending to node b's own receiver port on the array host would loop back; the
    // receiver here is node b on the host, the guest is node a.
    let script = format!(
        "{}{}grep -m 1 'No space left' /newroot/tmp/shim.log | sed 's/^/LAB-ENOSPC /'\n",
        mount_lines("nfs4.2"),
        guest_app(common::apps::PY_SENDER, &format!("10.77.0.2 9100 full {count} 200"))
            .replace("FTSS_NODE=b FTSS_ADDR=10.77.0.2", "FTSS_NODE=a FTSS_ADDR=10.77.0.1")
    );
    let mut guest = boot_node("full", script, &ganesha, None);
    let going = common::wait_until(Duration::from_secs(120), || guest.lines("ok ").len() >= 50);
    assert!(going, "the guest did not get going:\n{}", guest.console());
    let filled_at = guest.lines("ok ").len();
    let filler = disk.fill();
    let refused = common::wait_until(Duration::from_secs(90), || {
        guest.lines("err ").iter().any(|line| line.ends_with(" 28") || line.ends_with(" 105"))
    });
    assert!(refused, "no ENOSPC/ENOBUFS reached the app:\n{}", guest.console());
    std::fs::remove_file(&filler).unwrap();
    let status = guest.wait(Duration::from_secs(240));
    let console = guest.console();
    assert_eq!(status, Some(0), "the guest's job failed:\n{console}");
    assert!(!guest.lines("LAB-ENOSPC ").is_empty(), "the reason is not in FTSS_LOG:\n{console}");
    let acked: Vec<String> =
        guest.lines("ok ").iter().map(|n| format!("full-{}{}", n.trim(), "p".repeat(200))).collect();
    assert_eq!(acked.len(), count, "every datagram is sent in the end:\n{console}");
    common::wait_until(Duration::from_secs(60), || receiver.payloads().len() >= count);
    let got = receiver.payloads();
    let unique: std::collections::HashSet<&String> = got.iter().collect();
    assert_eq!(unique.len(), got.len(), "a datagram was handed over twice");
    let missing = acked.iter().filter(|line| !unique.contains(line)).count();
    assert_eq!(missing, 0, "{missing} of {count} acked datagrams never arrived");
    eprintln!(
        "volume filled after {filled_at} sends; {} refused sends retried; {count} of {count} arrived once",
        guest.lines("err ").len()
    );
}

/// The array as the claims describe it, in a VM: two virtio disks (each behind a dm device, so a
/// test can make one fail) under md RAID1, fronted by dm-writecache on a file-backed NVDIMM (the
/// non-volatile write cache: it outlives a kill -9 of the VM), then one more dm device (where a
/// test injects I/O errors under the file system), ext4, exported by the kernel's nfsd (NFSv3 and
/// NFSv4.2) and, if asked, by Samba; ftss-server runs there with its queue on the same stack, and
/// the test's apps as node a (10.77.0.1). Nodes reach it over a guest-only network (10.9.0.0/24,
/// qemu's UDP socket backend on loopback, so either side can be killed and booted again).
struct Array {
    dir: TempDir,
    _host_programs: TempDir,
    /// The host's ganesha: only the guests' programs (the host's `/`), read-only.
    ganesha: Ganesha,
    array_port: u16,
    node_port: u16,
    guest: Option<Guest>,
    /// Earlier boots (killed), kept for their consoles.
    earlier: Vec<Guest>,
}

/// The array's third disk: the replacement for a failed RAID leg.
const ARRAY_DISK_MIB: u64 = 128;

impl Array {
    fn new(tag: &str) -> Array {
        for program in
            ["mdadm", "ndctl", "dmsetup", "rpc.nfsd", "exportfs", "rpc.mountd", "rpcbind", "mkfs.ext4", "e2fsck"]
        {
            assert!(
                common::have(program),
                "{program} is not installed (bash .ci/run installs the array VM's programs)"
            );
        }
        let dir = TempDir::new(&format!("lab-array-{tag}"));
        for disk in ["leg-a.raw", "leg-b.raw", "spare.raw"] {
            std::fs::File::create(dir.0.join(disk)).unwrap().set_len(ARRAY_DISK_MIB << 20).unwrap();
        }
        let host_programs = TempDir::new("lab-array-host");
        let ganesha = Ganesha::start(&host_programs.0, GaneshaCache::Default);
        let array_port = common::free_udp_port();
        let node_port = std::iter::repeat_with(common::free_udp_port).find(|port| *port != array_port).unwrap();
        Array { dir, _host_programs: host_programs, ganesha, array_port, node_port, guest: None, earlier: Vec::new() }
    }

    /// Boots the array (`fresh`: build the RAID and the file system; else assemble what the disks
    /// and the cache hold, as after a power cut), starts nfsd (and smbd with `smb`), ftss-server
    /// and `apps` (job lines; `$ARRAY_SHIM_ENV` runs a program under the shim as node a), then
    /// runs `job`. Waits until the array is ready.
    fn boot(&mut self, fresh: bool, smb: bool, apps: &str, job: &str) {
        if let Some(old) = self.guest.take() {
            self.earlier.push(old);
        }
        let artifacts = common::artifact_dir();
        let server = common::server_path();
        let shim = common::shim_path();
        let build = if fresh {
            "in_root mdadm --create /dev/md0 --level=1 --raid-devices=2 --metadata=1.2 --assume-clean --run $(dm leg0) $(dm leg1) >/dev/null 2>&1 || fail mdadm\n"
        } else {
            "in_root mdadm --assemble --run /dev/md0 $(dm leg0) $(dm leg1) >/dev/null 2>&1 || fail 'assembling the RAID'\n"
        };
        let namespace = if fresh {
            "in_root ndctl create-namespace -f -e namespace0.0 -m fsdax -M dev >/newroot/tmp/ndctl 2>&1 || { cat /newroot/tmp/ndctl; fail ndctl; }\n"
        } else {
            ""
        };
        let mkfs = if fresh { "in_root mkfs.ext4 -q $(dm top) || fail mkfs\n" } else { "" };
        let samba = if smb {
            "mkdir -p /newroot/tmp/smb/private /newroot/tmp/smb/lock /newroot/tmp/smb/state /newroot/tmp/smb/cache /newroot/tmp/smb/pid /newroot/tmp/smb/rpc\n\
             cat >/newroot/tmp/smb/smb.conf <<'SMBEOF'\n\
             [global]\n  interfaces = 10.9.0.1/24\n  bind interfaces only = yes\n  private dir = /tmp/smb/private\n  \
             lock directory = /tmp/smb/lock\n  state directory = /tmp/smb/state\n  cache directory = /tmp/smb/cache\n  \
             pid directory = /tmp/smb/pid\n  ncalrpc dir = /tmp/smb/rpc\n  log file = /tmp/smb/smbd.log\n  map to guest = Bad User\n  \
             server role = standalone server\n  load printers = no\n  disable spoolss = yes\n  server min protocol = SMB3_00\n\
             [vol]\n  path = /array/vol\n  guest ok = yes\n  read only = no\n  force user = root\n  strict sync = yes\n\
             SMBEOF\n\
             mkdir -p /newroot/var/log/samba /newroot/var/lib/samba/private /newroot/var/cache/samba /newroot/run/samba\n\
             in_root smbd -D -s /tmp/smb/smb.conf || fail smbd\n\
             i=0; until netstat -ltn | grep -q ':445 '; do sleep 0.2; i=$((i+1)); [ $i -lt 150 ] || { cat /newroot/tmp/smb/smbd.log; fail 'smbd is not listening'; }; done\n"
        } else {
            ""
        };
        let script = format!(
            "host_root\nbind_host {artifacts}\n\
             ip addr add 10.9.0.1/24 dev eth1\nip link set eth1 up\n\
             dm() {{ echo /dev/dm-$(in_root dmsetup info -c --noheadings -o minor \"$1\" | tr -d ' '); }}\n\
             sectors() {{ cat /sys/class/block/${{1#/dev/}}/size; }}\n\
             linear() {{ in_root dmsetup create --noudevsync \"$1\" --table \"0 $(sectors $2) linear $2 0\" || fail \"dmsetup $1\"; }}\n\
             # Swaps the table of dm device $1 (e.g. to flakey and back) under a suspend that does not\n\
             # flush (a flush cannot finish while writes fail).\n\
             retable() {{ in_root dmsetup suspend --noflush \"$1\" && in_root dmsetup reload \"$1\" --table \"$2\" && in_root dmsetup resume \"$1\" || fail \"retable $1\"; }}\n\
             {namespace}\
             [ -b /dev/pmem0 ] || fail 'no pmem device (nvdimm)'\n\
             linear leg0 /dev/vda\nlinear leg1 /dev/vdb\n\
             {build}\
             in_root dmsetup create --noudevsync wc --table \"0 $(sectors /dev/md0) writecache p /dev/md0 /dev/pmem0 4096 2 max_age 2000\" || fail 'dmsetup writecache'\n\
             linear top $(dm wc)\n\
             {mkfs}\
             mkdir -p /newroot/array && mount -t ext4 $(dm top) /newroot/array || fail 'mounting the array'\n\
             mkdir -p /newroot/array/vol /newroot/array/queue /newroot/var/lib/nfs/v4recovery /newroot/run/rpcbind\n\
             echo \"ARRAY-STACK $(grep md0 /proc/mdstat) | wc: $(in_root dmsetup table wc)\"\n\
             mount -t nfsd nfsd /newroot/proc/fs/nfsd || fail 'mounting nfsd'\n\
             touch /newroot/var/lib/nfs/etab /newroot/var/lib/nfs/rmtab\n\
             echo 10 >/newroot/proc/fs/nfsd/nfsv4gracetime; echo 10 >/newroot/proc/fs/nfsd/nfsv4leasetime\n\
             in_root rpcbind -w || fail rpcbind\n\
             export_volume() {{ in_root exportfs -o rw,sync,no_root_squash,no_subtree_check,insecure,fsid=1 10.9.0.0/24:/array/vol || fail exportfs; }}\n\
             export_volume\n\
             in_root rpc.mountd || fail mountd\n\
             in_root rpc.nfsd 4 || fail nfsd\n\
             {samba}\
             start_server() {{ bg_root {server} run --volume /array/vol --queue-dir /array/queue --poll 10ms 2>>/newroot/tmp/server.log; SERVER_PID=$!; }}\n\
             dump_queued() {{ in_root {server} dump --queue-dir /array/queue --state queued --payload 2>&1 | grep -F payload | head -n 40 | sed 's/^/ARRAY-QUEUED /'; }}\n\
             start_server\n\
             i=0; until [ -f /newroot/array/vol/ftss-volume ]; do sleep 0.1; i=$((i+1)); [ $i -lt 600 ] || fail 'the server did not start'; done\n\
             ARRAY_SHIM_ENV=\"env LD_PRELOAD={shim} FTSS_VOLUME=/array/vol FTSS_NODE=a FTSS_ADDR=10.77.0.1 FTSS_LOG=/tmp/app.log\"\n\
             {apps}\n\
             echo ARRAY-READY\n\
             {job}\n\
             tail -n 5 /newroot/tmp/server.log | sed 's/^/ARRAY-SERVER /'\n",
            artifacts = artifacts.display(),
            server = server.display(),
            shim = shim.display(),
        );
        let memory_mib = 1024;
        let mut qemu_args = lab::guest_link(self.array_port, self.node_port);
        for disk in ["leg-a.raw", "leg-b.raw", "spare.raw"] {
            qemu_args.extend(lab::existing_disk(&self.dir.0.join(disk)));
        }
        qemu_args.extend(lab::nvdimm(&self.dir.0.join("cache.pmem"), 64, memory_mib));
        let mut guest = Guest::boot(&GuestSpec {
            name: "array",
            script,
            nfs_port: Some(self.ganesha.port),
            smb_port: None,
            memory_mib,
            cmdline: String::new(),
            qemu_args,
        });
        let ready = guest.wait_for("ARRAY-READY", Duration::from_secs(300));
        assert!(ready, "the array VM did not come up:\n{}", guest.console());
        self.guest = Some(guest);
    }

    /// Boots a node (10.9.0.2) that mounts the array's volume as `kind` (nfs3, nfs4.2 or smb3,
    /// default options) and runs `app` (job lines; see [`guest_app`]).
    fn node(&self, kind: &str, app: &str) -> Guest {
        let mount = match kind {
            "nfs3" => {
                "mount -t nfs -o vers=3,nolock,addr=10.9.0.1,mountaddr=10.9.0.1 10.9.0.1:/array/vol /newroot$VOLUME"
            }
            "nfs4.2" => {
                "mount -t nfs4 -o vers=4.2,addr=10.9.0.1,clientaddr=10.9.0.2 10.9.0.1:/array/vol /newroot$VOLUME"
            }
            "smb3" => "mount -t cifs -o ip=10.9.0.1,username=guest,password=,vers=3.0 //10.9.0.1/vol /newroot$VOLUME",
            other => panic!("unknown mount kind {other}"),
        };
        let script = format!(
            "host_root\nbind_host {artifacts}\n\
             ip addr add 10.9.0.2/24 dev eth1\nip link set eth1 up\nmkdir -p /newroot$VOLUME\n\
             for i in $(seq 1 60); do {mount} && break; sleep 1; done\n\
             grep -q \" /newroot$VOLUME \" /proc/mounts || fail 'mounting the array'\n\
             echo \"LAB-MOUNT $(grep \" /newroot$VOLUME \" /proc/mounts)\"\n\
             {app}",
            artifacts = common::artifact_dir().display(),
        );
        Guest::boot(&GuestSpec {
            name: "node",
            script,
            nfs_port: Some(self.ganesha.port),
            smb_port: None,
            memory_mib: 512,
            cmdline: String::new(),
            qemu_args: lab::guest_link(self.node_port, self.array_port),
        })
    }

    /// Waits for `node`'s job to end; fails at once if the array's job ends first (its own job
    /// failed, so the node would wait for nothing).
    fn wait_node(&mut self, node: &mut Guest, limit: Duration) -> Option<i32> {
        let deadline = std::time::Instant::now() + limit;
        while node.running() && std::time::Instant::now() < deadline {
            if !self.guest().running() {
                panic!("the array's job ended before the node's:\n{}\nnode:\n{}", self.consoles(), node.console());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        node.wait(Duration::from_secs(5))
    }

    fn guest(&mut self) -> &mut Guest {
        self.guest.as_mut().expect("the array is not booted")
    }

    /// kill -9 of the array VM (power loss); its disks and its NVDIMM keep what they held.
    fn kill(&mut self) {
        if let Some(mut guest) = self.guest.take() {
            guest.kill();
            self.earlier.push(guest);
        }
    }

    /// The lines of every boot's console that start with `prefix`, with the boot's number.
    fn lines(&self, prefix: &str) -> Vec<(usize, String)> {
        self.earlier
            .iter()
            .chain(self.guest.as_ref())
            .enumerate()
            .flat_map(|(boot, guest)| guest.lines(prefix).into_iter().map(move |line| (boot, line)))
            .collect()
    }

    fn consoles(&self) -> String {
        self.earlier
            .iter()
            .chain(self.guest.as_ref())
            .map(Guest::console)
            .collect::<Vec<_>>()
            .join("\n--- next boot ---\n")
    }
}

/// Requests a node sends to the array VM's echo app (p90 of ten: the first, from a node the server
/// has not seen yet, is the slowest).
const ARRAY_REQUESTS: usize = 10;

/// Nodes on NFSv3, NFSv4.2 and SMB3 with default mount options, one after another, against kernel
/// nfsd and Samba exporting ext4 on dm-writecache (NVDIMM) over md RAID1 in the array VM, where
/// ftss-server and an echo app run: the requests are answered within a second.
///
/// Two TCG guests share this machine's two cores, so a busy host slows every step of a round trip
/// (one CI run measured everything 5–8 × slower than usual, SMB3 at p90 1.5 s). Each datagram
/// therefore alternates with the same request/reply done with plain files on the same mount and
/// the same array (a synced write and rename there, a synced answer read back with `O_DIRECT`),
/// and the bound is 1 s or 4 × that baseline's p90, whichever is larger. At this machine's usual
/// speed the baseline's p90 is well under 0.25 s, so the bound is 1 s; what the bells
/// fixed, a node waiting for a cached listing (30–60 s), fails it either way.
#[test]
fn request_reply_against_the_array_vm_over_nfs_and_smb_answers_within_a_second() {
    let _lab = lab::exclusive();
    let mut array = Array::new("rtt");
    let apps = format!(
        "cat >/newroot/tmp/echo.py <<'PYEOF'\n{PY_ECHO}\nPYEOF\n\
         in_root $ARRAY_SHIM_ENV python3 /tmp/echo.py 7000 >/dev/null &\n\
         cat >/newroot/tmp/file_echo.py <<'PYEOF'\n{PY_FILE_ECHO}\nPYEOF\n\
         in_root python3 /tmp/file_echo.py /array/vol/lab-base >/dev/null 2>&1 &"
    );
    array.boot(
        true,
        true,
        &apps,
        "i=0; until [ -f /newroot/array/vol/lab-done ] || [ $i -ge 4800 ]; do sleep 0.25; i=$((i+1)); done",
    );
    let kinds = ["nfs3", "nfs4.2", "smb3"];
    for (index, kind) in kinds.iter().enumerate() {
        let last = index + 1 == kinds.len();
        let app = format!(
            "{}{}",
            guest_app(PY_REQUESTER, &format!("10.77.0.1 7000 {ARRAY_REQUESTS} 20 $VOLUME/lab-base/{kind}")),
            if last { "touch /newroot$VOLUME/lab-done\n" } else { "" }
        );
        let mut node = array.node(kind, &app);
        let status = node.wait(Duration::from_secs(300));
        let console = node.console();
        assert_eq!(status, Some(0), "{kind}: the node's job failed:\n{console}\narray:\n{}", array.consoles());
        let results = timings(node.lines("RTT "), ARRAY_REQUESTS);
        let baseline = timings(node.lines("BASE "), ARRAY_REQUESTS);
        eprintln!(
            "{kind}: ftss {results:?}\n{kind}: plain files {baseline:?}\n{}",
            node.lines("LAB-MOUNT ").join("\n")
        );
        assert!(results.iter().all(Option::is_some), "{kind}: requests went unanswered: {results:?}\n{console}");
        assert!(
            baseline.iter().all(Option::is_some),
            "{kind}: plain-file requests went unanswered: {baseline:?}\n{console}"
        );
        let p90 = percentile(&results, 0.9);
        let baseline_p90 = percentile(&baseline, 0.9);
        let bound = f64::max(1.0, 4.0 * baseline_p90);
        assert!(
            p90 < bound,
            "{kind}: round trip p90 {p90:.3} s, bound {bound:.3} s (plain-file p90 {baseline_p90:.3} s)\n\
             ftss: {results:?}\nplain files: {baseline:?}"
        );
    }
    let status = array.guest().wait(Duration::from_secs(60));
    assert_eq!(status, Some(0), "the array's job failed:\n{}", array.consoles());
    eprintln!("{}", array.lines("ARRAY-STACK ").into_iter().map(|(_, line)| line).collect::<Vec<_>>().join("\n"));
}

/// Starts ftss-node as `node` (`addr`) on the volume at `volume` (a path inside the guest's root)
/// and waits for its interface: job lines for a lab guest.
fn agent_lines(volume: &str, node: &str, addr: &str) -> String {
    format!(
        "bg_root env FTSS_VOLUME={volume} FTSS_NODE={node} FTSS_ADDR={addr} {agent} 2>/newroot/tmp/agent.log\n\
         i=0; until ip -o addr show dev ftss0 2>/dev/null | grep -q inet; do sleep 0.2; i=$((i+1)); \
         [ $i -lt 300 ] || {{ sed 's/^/LAB-AGENT /' /newroot/tmp/agent.log; fail 'ftss-node did not bring ftss0 up'; }}; done\n",
        agent = common::node_agent_path().display(),
    )
}

/// ftss-node on the real stack: the array VM runs ftss-server and an agent (node a) serving a
/// 1 MiB file over HTTP; node VMs on kernel NFSv4.2 and SMB3 clients (default mounts) run their
/// own agent (node b), then `ping` and `curl` cross the array: every IP packet is a batch in the
/// node's outbox on the mount, stored on RAID1 behind the NVDIMM cache, and an inbox file back.
#[test]
fn ftss_node_in_guests_carries_ping_and_http_through_the_array_vm_over_nfs_and_smb() {
    let _lab = lab::exclusive();
    let mut array = Array::new("node");
    let apps = format!(
        "mkdir -p /newroot/tmp/www && head -c 1048576 /dev/urandom >/newroot/tmp/www/blob\n\
         sha256sum /newroot/tmp/www/blob | cut -d' ' -f1 >/newroot/array/vol/lab-blob-sha256\n\
         {agent}\
         bg_root python3 -m http.server --bind 10.77.0.1 --directory /tmp/www 8000 >/newroot/tmp/http.log 2>&1\n\
         i=0; until netstat -ltn | grep -q '10.77.0.1:8000 '; do sleep 0.2; i=$((i+1)); \
         [ $i -lt 300 ] || {{ cat /newroot/tmp/http.log; fail 'http.server is not listening'; }}; done",
        agent = agent_lines("/array/vol", "a", "10.77.0.1"),
    );
    let job = format!(
        "i=0; until [ -f /newroot/array/vol/lab-done ] || [ $i -ge 4800 ]; do sleep 0.25; i=$((i+1)); done\n\
         in_root {server} status --volume /array/vol | sed 's/^/ARRAY-STATUS /'\n\
         sed 's/^/ARRAY-AGENT /' /newroot/tmp/agent.log",
        server = common::server_path().display(),
    );
    array.boot(true, true, &apps, &job);
    let kinds = ["nfs4.2", "smb3"];
    for (index, kind) in kinds.iter().enumerate() {
        let last = index + 1 == kinds.len();
        let app = format!(
            "{agent}\
             in_root ping -c 3 -w 120 10.77.0.1 | sed 's/^/LAB-PING /'\n\
             in_root curl -sS --max-time 240 -w 'LAB-SPEED %{{speed_download}}\\n' -o /tmp/blob http://10.77.0.1:8000/blob || echo LAB-CURL-FAILED\n\
             echo \"LAB-BLOB $(in_root sha256sum /tmp/blob | cut -d' ' -f1) $(cat /newroot$VOLUME/lab-blob-sha256)\"\n\
             sed 's/^/LAB-AGENT /' /newroot/tmp/agent.log\n\
             {done}",
            agent = agent_lines("$VOLUME", "b", "10.77.0.2"),
            done = if last { "touch /newroot$VOLUME/lab-done\n" } else { "" },
        );
        let mut node = array.node(kind, &app);
        let status = array.wait_node(&mut node, Duration::from_secs(600));
        let console = node.console();
        assert_eq!(status, Some(0), "{kind}: the node's job failed:\n{console}\narray:\n{}", array.consoles());
        let ping = node.lines("LAB-PING ").join("\n");
        eprintln!("{kind}:\n{ping}\nHTTP bytes/s: {:?}", node.lines("LAB-SPEED "));
        assert!(
            ping.contains("3 packets transmitted, 3 received"),
            "{kind}: ping:\n{console}\narray:\n{}",
            array.consoles()
        );
        let blob = node.lines("LAB-BLOB ");
        let sums: Vec<&str> = blob.first().map(|line| line.split_whitespace().collect()).unwrap_or_default();
        assert!(
            sums.len() == 2 && sums[0] == sums[1],
            "{kind}: the file fetched over HTTP differs from the array's (sha256 got, sent: {blob:?}):\n{console}"
        );
    }
    let status = array.guest().wait(Duration::from_secs(60));
    assert_eq!(status, Some(0), "the array's job failed:\n{}", array.consoles());
    let status = array.lines("ARRAY-STATUS ").into_iter().map(|(_, line)| line).collect::<Vec<_>>();
    eprintln!("{}", status.join("\n"));
    // The server counted node b's IP packets, both ways, and refused none.
    let counts: Vec<u64> = status
        .iter()
        .find(|line| line.starts_with("b "))
        .and_then(|line| line.split_whitespace().last())
        .map(|field| field.split('/').filter_map(|count| count.parse().ok()).collect())
        .unwrap_or_default();
    assert!(
        counts.len() == 3 && counts[0] > 0 && counts[1] > 0 && counts[2] == 0,
        "node b's IP SENT/DELIV/REFUSED: {counts:?}\n{}",
        status.join("\n")
    );
}

/// The same request/reply without ftss, the baseline the round trips are held to (array side, no
/// shim): lists each directory in DIR on the array's own file system every 10 ms and answers each
/// `req-N` by writing and syncing its name into `rep-N`, which the node created beforehand.
const PY_FILE_ECHO: &str = r#"
import os, sys, time
d = sys.argv[1]
os.makedirs(d, exist_ok=True)
answered = set()
while True:
    for sub in os.listdir(d):
        for name in os.listdir(os.path.join(d, sub)):
            if name.startswith("req-") and (sub, name) not in answered:
                answered.add((sub, name))
                fd = os.open(os.path.join(d, sub, "rep-" + name[4:]), os.O_WRONLY)
                os.write(fd, name.encode())
                os.fsync(fd)
                os.close(fd)
    time.sleep(0.01)
"#;

/// Parses "PREFIX n seconds" lines into the seconds of each n (`None`: no answer).
fn timings(lines: Vec<String>, count: usize) -> Vec<Option<f64>> {
    let mut results = vec![None; count];
    for line in lines {
        let mut parts = line.split_whitespace();
        let n: usize = parts.next().unwrap().parse().unwrap();
        results[n] = Some(parts.next().unwrap().parse().unwrap());
    }
    results
}

/// A receiver for the array VM (node a): prints "GOT <pid> <payload>" for each datagram, and
/// appends the same line to FILE (so the array's job can count them).
const PY_ARRAY_RECEIVER: &str = r#"
import os, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
log = open(sys.argv[2], "a")
pid = os.getpid()
while True:
    data, addr = s.recvfrom(65535)
    line = f"GOT {pid} {data.decode(errors='replace')}"
    print(line, flush=True)
    log.write(line + "\n")
    log.flush()
"#;

/// Sends "<tag>-<n>" to HOST:PORT for n = 0, 1, ... until COUNT are sent or the file STOP exists;
/// prints "OK n" when a send returned and "ERR n errno" when it failed, then retries that n after
/// a pause, as an app would.
const PY_RETRY_SENDER: &str = r#"
import os, socket, sys, time
host, port, tag, count, stop = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
n = 0
while n < count and not os.path.exists(stop):
    try:
        s.sendto(f"{tag}-{n}".encode(), (host, port))
        print(f"OK {n}", flush=True)
        n += 1
    except OSError as error:
        print(f"ERR {n} {error.errno}", flush=True)
        time.sleep(0.2)
"#;

/// The array job lines that start [`PY_ARRAY_RECEIVER`] on port 9100 as node a (`RECEIVER_PID`).
fn array_receiver() -> String {
    format!(
        "cat >/newroot/tmp/recv.py <<'PYEOF'\n{PY_ARRAY_RECEIVER}\nPYEOF\n\
         start_receiver() {{ bg_root $ARRAY_SHIM_ENV python3 /tmp/recv.py 9100 /tmp/got; RECEIVER_PID=$!; }}\n\
         start_receiver\n\
         got() {{ cat /newroot/tmp/got 2>/dev/null | wc -l; }}\n\
         # Waits until the receiver has $1 more datagrams than when called, at most 10 minutes.\n\
         wait_got() {{ want=$(( $(got) + $1 )); i=0; until [ $(got) -ge $want ]; do sleep 0.5; i=$((i+1)); [ $i -lt 1200 ] || fail \"the receiver got no more than $(got)\"; done; }}\n"
    )
}

/// The history of a run: node sends that returned ("OK n" on the node's console, acked in
/// `volume` mode) and what each receiver process on the array got.
fn array_history(node: &Guest, array: &Array, tag: &str) -> common::history::History {
    let mut history = common::history::History::new();
    for line in node.lines("OK ") {
        history.sent(format!("{tag}-{}", line.trim()), common::history::Ack::Volume);
    }
    for line in node.lines("ERR ") {
        if let Some(n) = line.split_whitespace().next() {
            history.send_failed(format!("{tag}-{n}"));
        }
    }
    for (boot, line) in array.lines("GOT ") {
        if let Some((pid, payload)) = line.split_once(' ') {
            history.received(format!("boot {boot} pid {pid}"), payload);
        }
    }
    history
}

/// Waits until every acked send of the node is among what the array's receivers got.
fn wait_for_history(node: &Guest, array: &Array, tag: &str, limit: Duration) -> common::history::Verdict {
    common::wait_until(limit, || array_history(node, array, tag).check().lost.is_empty());
    array_history(node, array, tag).check()
}

/// The array VM killed -9 (power loss) while a node on NFSv4.2 (default, hard mount) sends to a
/// receiver on the array, then booted again: it assembles the RAID, the write cache brings back
/// what it held, ext4 replays its journal, ftss-server recovers and a new receiver starts; the
/// node's stuck sends go on once the server is back. Every send that returned arrives, none twice
/// to one receiver process.
#[test]
fn the_array_vm_killed_mid_transfer_and_booted_again_loses_no_acked_datagram() {
    let _lab = lab::exclusive();
    let mut array = Array::new("kill");
    let forever = "while true; do sleep 60; done";
    array.boot(true, false, &array_receiver(), forever);
    let count = 400;
    let app = guest_app(PY_RETRY_SENDER, &format!("10.77.0.1 9100 power {count} $VOLUME/lab-stop"));
    let mut node = array.node("nfs4.2", &app);
    let sending = common::wait_until(Duration::from_secs(300), || array.lines("GOT ").len() >= 80);
    assert!(sending, "no traffic:\n{}\narray:\n{}", node.console(), array.consoles());
    array.kill();
    let acked_at_kill = node.lines("OK ").len();
    std::thread::sleep(Duration::from_secs(2));
    array.boot(false, false, &array_receiver(), forever);
    let status = node.wait(Duration::from_secs(600));
    assert_eq!(status, Some(0), "the node's job failed:\n{}\narray:\n{}", node.console(), array.consoles());
    let verdict = wait_for_history(&node, &array, "power", Duration::from_secs(120));
    verdict.assert_ok(&format!(
        "array VM killed after {acked_at_kill} acked sends; failed sends (n errno) {:?}\n{}",
        node.lines("ERR "),
        array.consoles()
    ));
    assert_eq!(verdict.acked, count, "the node sent everything in the end");
    eprintln!("{}", array.lines("ARRAY-STACK ").into_iter().map(|(_, line)| line).collect::<Vec<_>>().join("\n"));
}

/// The array job lines of a RAID1 leg failing every write (dm-flakey `error_writes`) while a node
/// sends: md drops it and runs degraded; the leg is removed, a new disk added and rebuilt, and an md
/// `check` runs. Then the file system under the volume and the queue fills up, and space returns.
const FAULTS_LEG_AND_FULL: &str = "\
        wait_got 60\n\
        echo ARRAY-PHASE leg\n\
        retable leg0 \"0 $(sectors /dev/vda) flakey /dev/vda 0 0 1 1 error_writes\"\n\
        i=0; until grep -q '(F)' /proc/mdstat; do sleep 0.5; i=$((i+1)); [ $i -lt 240 ] || fail 'md never failed the leg'; done\n\
        echo \"ARRAY-RAID degraded: $(grep md0 /proc/mdstat)\"\n\
        in_root mdadm /dev/md0 --remove $(dm leg0) || fail 'removing the failed leg'\n\
        in_root mdadm /dev/md0 --add /dev/vdc || fail 'adding the new disk'\n\
        sleep 1; in_root mdadm --wait /dev/md0\n\
        echo check >/sys/block/md0/md/sync_action; sleep 1; in_root mdadm --wait /dev/md0\n\
        echo \"ARRAY-RAID rebuilt: $(grep md0 /proc/mdstat) mismatches $(cat /sys/block/md0/md/mismatch_cnt)\"\n\
        wait_got 60\n\
        echo ARRAY-PHASE full\n\
        dd if=/dev/zero of=/newroot/array/filler bs=1M 2>/dev/null; sync\n\
        echo \"ARRAY-FULL $(df -k /newroot/array | tail -n 1)\"\n\
        sleep 20\n\
        rm /newroot/array/filler; sync\n\
";

/// The array job lines of every write under the file system failing with EIO for 5 s; ext4 aborts
/// its journal, and the operator's repair follows: stop the server and the receiver, unexport,
/// fsck, mount, export, start again. Then what the server quarantined is listed.
const FAULTS_EIO: &str = "\
        wait_got 60\n\
        echo ARRAY-PHASE eio\n\
        retable top \"0 $(sectors $(dm wc)) flakey $(dm wc) 0 0 1 1 error_writes\"\n\
        sleep 5\n\
        retable top \"0 $(sectors $(dm wc)) linear $(dm wc) 0\"\n\
        if ! touch /newroot/array/probe 2>/dev/null || grep -q ' /newroot/array ext4 ro' /proc/mounts; then\n\
            echo ARRAY-REPAIR\n\
            kill -9 $SERVER_PID $RECEIVER_PID; sleep 1\n\
            in_root exportfs -ua; in_root rpc.nfsd 0; in_root exportfs -f; sleep 1\n\
            i=0; until umount /newroot/array 2>/dev/null; do sleep 0.5; i=$((i+1)); [ $i -lt 40 ] || { echo \"nfsd threads $(cat /newroot/proc/fs/nfsd/threads)\"; ls -l /proc/*/fd /proc/*/cwd 2>/dev/null | grep array; fail 'unmounting the array'; }; done\n\
            in_root e2fsck -fy $(dm top) >/dev/null 2>&1; echo \"ARRAY-FSCK $?\"\n\
            mount -t ext4 $(dm top) /newroot/array || fail 'mounting the array again'\n\
            ls -l /newroot/array/vol/nodes/b/out/log/ | sed 's/^/ARRAY-NODE-LOG after fsck: /'\n\
            export_volume; in_root rpc.nfsd 4 || fail nfsd\n\
            start_server; start_receiver\n\
        fi\n\
        sleep 30\n\
        for reason in $(find /newroot/array/vol -path '*quarantine*' -name '*.reason' 2>/dev/null); do echo \"ARRAY-QUARANTINE $reason: $(head -c 300 $reason | tr '\\n' ' ')\"; done\n\
        grep -i -E 'quarantin|damage|abandon|skipp|outbox log' /newroot/tmp/server.log | tail -n 20 | sed 's/^/ARRAY-SERVER-SAYS /'\n\
        ls -l /newroot/array/vol/nodes/b/out/log/ | sed 's/^/ARRAY-NODE-LOG /'\n";

/// Runs `faults` (array job lines) while a node on NFSv3 sends to a receiver on the array, then
/// checks the history: every send that returned arrives, none twice to one receiver process.
fn faults_under_the_array(tag: &str, faults: &str) -> Array {
    let mut array = Array::new(tag);
    let job = format!(
        "{faults}{}",
        "        wait_got 60\n\
        touch /newroot/array/vol/lab-stop\n\
        i=0; until [ -f /newroot/array/vol/lab-done ] || [ $i -ge 1200 ]; do sleep 0.5; i=$((i+1)); done\n\
        sleep 10\n\
        echo \"ARRAY-GOT-FILE $(got)\"\n\
        dump_queued\n"
    );
    array.boot(true, false, &array_receiver(), &job);
    let app = format!(
        "{}touch /newroot$VOLUME/lab-done\n",
        guest_app(PY_RETRY_SENDER, "10.77.0.1 9100 fault 100000 $VOLUME/lab-stop")
    );
    let mut node = array.node("nfs3", &app);
    let status = array.wait_node(&mut node, Duration::from_secs(1500));
    assert_eq!(status, Some(0), "the node's job failed:\n{}\narray:\n{}", node.console(), array.consoles());
    let array_status = array.guest().wait(Duration::from_secs(120));
    assert_eq!(array_status, Some(0), "the array's job failed:\n{}", array.consoles());
    let verdict = wait_for_history(&node, &array, "fault", Duration::from_secs(60));
    let report: Vec<String> = [
        "ARRAY-RAID ",
        "ARRAY-FULL ",
        "ARRAY-REPAIR",
        "ARRAY-FSCK ",
        "ARRAY-QUARANTINE ",
        "ARRAY-SERVER-SAYS ",
        "ARRAY-NODE-LOG ",
        "ARRAY-GOT-FILE ",
        "ARRAY-QUEUED ",
    ]
    .iter()
    .flat_map(|prefix| array.lines(prefix))
    .map(|(_, line)| line)
    .collect();
    // The receivers also append every datagram to /tmp/got (ARRAY-GOT-FILE counts its lines):
    // more there than GOT lines on the console would mean the console lost lines, not ftss; the
    // packets still queued at the end (ARRAY-QUEUED) tell a packet passed over from one gone.
    verdict.assert_ok(&format!(
        "faults under the array ({} refused sends; {} GOT lines on the console)\n{}\n{}",
        node.lines("ERR ").len(),
        array.lines("GOT ").len(),
        report.join("\n"),
        array.consoles()
    ));
    eprintln!("{}", report.join("\n"));
    array
}

/// A RAID1 leg failing every write, replaced and rebuilt, then a full file system under the volume
/// and the queue, while a node on NFSv3 sends: every send that returned arrives, none twice to one
/// receiver process, and the rebuilt RAID has no mismatch.
#[test]
fn a_failing_raid_leg_and_a_full_disk_under_the_array_lose_no_acked_datagram() {
    let _lab = lab::exclusive();
    let array = faults_under_the_array("faults", FAULTS_LEG_AND_FULL);
    let raid: Vec<(usize, String)> = array.lines("ARRAY-RAID rebuilt");
    assert!(raid.iter().any(|(_, line)| line.ends_with("mismatches 0")), "the rebuilt RAID: {raid:?}");
}

/// EIO on every write under the array's file system for 5 s, then the operator's repair, twice,
/// while a node on NFSv3 sends: every send that returned arrives, none twice to one receiver
/// process. (Receipts and claimed inbox files the repair left empty are quarantined and their
/// packets delivered again: expected, since neither is synced.)
///
/// History: one CI run at d642378 lost 10 acked sends in a row here (sent just as the errors
/// began). That code deduplicated by a high-water sequence per sender and cut a queue segment at
/// its first damaged record; both were replaced by the durability audit (issue 16, items 6 and 9).
/// Since then it has passed every run. On failure it shows what the server quarantined and said,
/// the receivers' own count of what they got and the packets still queued, to tell which layer
/// lost them.
#[test]
fn io_errors_under_the_array_then_the_operators_repair_lose_no_acked_datagram() {
    let _lab = lab::exclusive();
    faults_under_the_array("eio", &format!("{FAULTS_EIO}{FAULTS_EIO}"));
}

/// Times the file operations the spool makes, with python in a guest on NFSv4.2 (ganesha on the
/// host, through qemu's user network): an append + fdatasync of a small record to a log, and the
/// file-per-packet dance (create, write, fsync, close, rename) at 64 B and 8 KiB.
const PY_FILE_OPS: &str = r#"
import os, sys, time
vol = sys.argv[1]
def timed(name, count, op):
    samples = []
    for n in range(count):
        started = time.monotonic()
        op(n)
        samples.append(time.monotonic() - started)
    samples.sort()
    print(f"OPS {name} p50 {samples[len(samples) // 2] * 1000:.1f} ms p90 {samples[len(samples) * 9 // 10] * 1000:.1f} ms", flush=True)
log = os.open(f"{vol}/ops.log", os.O_RDWR | os.O_CREAT, 0o644)
offset = [0]
def append(size):
    def op(n):
        os.pwrite(log, b"r" * size, offset[0])
        offset[0] += size
        os.fdatasync(log)
    return op
def per_file(size):
    os.makedirs(f"{vol}/tmp", exist_ok=True)
    os.makedirs(f"{vol}/new", exist_ok=True)
    def op(n):
        name = f"{size}-{n}"
        fd = os.open(f"{vol}/tmp/{name}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, b"p" * size)
        os.fsync(fd)
        os.close(fd)
        os.rename(f"{vol}/tmp/{name}", f"{vol}/new/{name}")
    return op
for size in (170, 618, 8300):
    timed(f"append+fdatasync {size} B", 40, append(size))
for size in (64, 512, 8192):
    timed(f"file-per-packet {size} B", 40, per_file(size))
"#;

#[test]
#[ignore = "a measurement, not a check: cargo test --release --test lab file_ops -- --ignored --nocapture"]
fn measure_file_ops_over_kernel_nfs_and_smb() {
    let _lab = lab::exclusive();
    let dir = TempDir::new("lab-file-ops");
    let ganesha = Ganesha::start(&dir.0, GaneshaCache::Default);
    let smbd = Smbd::start(&dir.0);
    for kind in ["nfs4.2", "smb3"] {
        let script = format!(
            "{}cat >/newroot/tmp/ops.py <<'PYEOF'\n{PY_FILE_OPS}\nPYEOF\nin_root python3 /tmp/ops.py $VOLUME\n",
            mount_lines(kind)
        );
        let mut guest = boot_node("ops", script, &ganesha, Some(&smbd));
        let status = guest.wait(Duration::from_secs(300));
        assert_eq!(status, Some(0), "{}", guest.console());
        eprintln!("{kind}:\n{}", guest.lines("OPS ").join("\n"));
    }
}

/// Probes the array's kernel: data written (not synced) to a file on ext4, then every write under
/// ext4 failing until its journal aborts, then `fsync` of that file. Prints what fsync said and
/// what the file holds after the repair (e2fsck, mount).
const PROBE_FSYNC_AFTER_ABORT: &str = r#"
import os, sys, time
path, step = sys.argv[1], sys.argv[2]
if step == "write":
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, b"A" * 8192)
    print("PROBE wrote 8192 unsynced", flush=True)
elif step in ("other", "fsync"):
    what = "other fsync" if step == "other" else "fsync after abort"
    try:
        if step == "other":
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
            os.write(fd, b"B" * 4096)
        else:
            fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        print(f"PROBE {what} returned 0", flush=True)
    except OSError as error:
        print(f"PROBE {what} failed {error.errno}", flush=True)
elif step == "check":
    try:
        data = open(path, "rb").read()
        print(f"PROBE after repair {len(data)} bytes, {data.count(b'A')} of them written", flush=True)
    except OSError as error:
        print(f"PROBE after repair open failed {error.errno}", flush=True)
"#;

#[test]
#[ignore = "an experiment: cargo test --release --test lab fsync_after_a_journal_abort -- --ignored --nocapture"]
fn ext4_fsync_after_a_journal_abort() {
    let _lab = lab::exclusive();
    let mut array = Array::new("probe");
    let job = format!(
        "cat >/newroot/tmp/probe.py <<'PYEOF'\n{PROBE_FSYNC_AFTER_ABORT}\nPYEOF\n\
         kill -9 $SERVER_PID\n\
         in_root python3 /tmp/probe.py /array/probe-a write\n\
         retable top \"0 $(sectors $(dm wc)) flakey $(dm wc) 0 0 1 1 error_writes\"\n\
         in_root python3 /tmp/probe.py /array/probe-b other\n\
         i=0; until grep -q ' /newroot/array ext4 ro' /proc/mounts || [ $i -ge 40 ]; do sleep 0.5; i=$((i+1)); done\n\
         echo \"PROBE mount: $(grep ' /newroot/array ' /proc/mounts)\"\n\
         in_root python3 /tmp/probe.py /array/probe-a fsync\n\
         dmesg | grep -i ext4 | tail -n 8 | sed 's/^/PROBE dmesg /'\n\
         retable top \"0 $(sectors $(dm wc)) linear $(dm wc) 0\"\n\
         in_root exportfs -ua; in_root rpc.nfsd 0; sleep 1\n\
         umount /newroot/array || echo PROBE umount failed\n\
         in_root e2fsck -fy $(dm top) >/dev/null 2>&1; echo \"PROBE fsck $?\"\n\
         mount -t ext4 $(dm top) /newroot/array || fail 'mounting again'\n\
         in_root python3 /tmp/probe.py /array/probe-a check\n"
    );
    array.boot(true, false, "", &job);
    let status = array.guest().wait(Duration::from_secs(300));
    let probe = array.lines("PROBE").into_iter().map(|(_, line)| line).collect::<Vec<_>>().join("\n");
    eprintln!("{probe}");
    assert_eq!(status, Some(0), "{}", array.consoles());
    // What the README's claim rests on: the kernel does not confirm the unsynced data.
    assert!(probe.contains("fsync after abort failed"), "fsync confirmed data after ext4 aborted:\n{probe}");
}
