//! Real, unmodified programs under the real shim, both directions, against the real server: nc,
//! socat (with its fork per datagram), python3 asyncio (epoll) and selectors, a Rust std UdpSocket
//! with read timeouts; fork and vfork; 8 threads × 10,000 datagrams; the three ack modes.

mod common;

use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

/// Generous: the two cores are shared with other test binaries.
const ARRIVAL_LIMIT: Duration = Duration::from_secs(120);

fn std_udp_program() -> String {
    let path = artifact_dir().join("examples").join("shim_std_udp");
    assert!(path.exists(), "{} missing: `cargo build --release --all-targets` first", path.display());
    path.display().to_string()
}

/// Starts a shimmed program with piped stdin/stdout; its stdout lines are collected.
fn spawn(command: &mut Command, name: &str) -> (Proc, LineCollector) {
    command.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = command.spawn().unwrap_or_else(|error| panic!("start {name}: {error}"));
    let lines = LineCollector::start(child.stdout.take().unwrap());
    (Proc { child, name: name.into() }, lines)
}

fn wait_for_line(lines: &LineCollector, what: &str) -> bool {
    wait_until(ARRIVAL_LIMIT, || lines.lines().iter().any(|line| line.contains(what)))
}

fn stderr_of(proc: &mut Proc) -> String {
    let mut text = String::new();
    if let Some(mut stderr) = proc.child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut stderr, &mut text);
    }
    text
}

fn write_stdin(child: &mut Child, text: &str) {
    let stdin = child.stdin.as_mut().expect("stdin piped");
    stdin.write_all(text.as_bytes()).unwrap();
    stdin.flush().unwrap();
}

/// Receives `count` datagrams on 0.0.0.0:PORT, printing "host port payload" for each.
const PY_RECEIVER: &str = r#"
import socket, sys
count, port = int(sys.argv[1]), int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", port))
s.settimeout(120)
print("ready", flush=True)
for _ in range(count):
    data, addr = s.recvfrom(65535)
    print(addr[0], addr[1], data.decode(), flush=True)
"#;

fn py_receiver(fabric: &Fabric, node: &str, addr: &str, port: u16, count: usize) -> (Proc, LineCollector) {
    let mut command = fabric.command(node, addr, "python3");
    command.args(["-c", PY_RECEIVER, &count.to_string(), &port.to_string()]);
    let (proc, lines) = spawn(&mut command, "python receiver");
    assert!(wait_for_line(&lines, "ready"), "receiver not ready");
    (proc, lines)
}

#[test]
fn nc_talks_both_ways() {
    let mut fabric = Fabric::new("apps-nc");
    fabric.start_server();
    let mut command = fabric.command("b", "10.77.0.2", "nc");
    command.args(["-u", "-l", "9401"]);
    let (mut listener, heard_by_b) = spawn(&mut command, "nc -l");
    std::thread::sleep(Duration::from_millis(300));
    let mut command = fabric.command("a", "10.77.0.1", "nc");
    command.args(["-u", "10.77.0.2", "9401"]);
    let (mut talker, heard_by_a) = spawn(&mut command, "nc");
    write_stdin(&mut talker.child, "ping from a\n");
    assert!(wait_for_line(&heard_by_b, "ping from a"), "b heard {:?}", heard_by_b.lines());
    // nc -l now answers the peer it heard from.
    write_stdin(&mut listener.child, "pong from b\n");
    assert!(wait_for_line(&heard_by_a, "pong from b"), "a heard {:?}", heard_by_a.lines());
    assert_eq!(heard_by_b.lines(), ["ping from a"]);
    assert_eq!(heard_by_a.lines(), ["pong from b"]);
}

#[test]
fn socat_recvfrom_fork_server_answers_a_datagram_client() {
    if !have("socat") {
        panic!("socat is required (bash .ci/run installs it)");
    }
    let mut fabric = Fabric::new("apps-socat");
    fabric.start_server();
    // UDP4-RECVFROM with fork: a child process per datagram answers on the inherited socket.
    let mut command = fabric.command("b", "10.77.0.2", "socat");
    command.args(["-T", "5", "UDP4-RECVFROM:9402,bind=10.77.0.2,fork", "SYSTEM:tr a-z A-Z"]);
    let (_server, _) = spawn(&mut command, "socat server");
    std::thread::sleep(Duration::from_millis(300));
    for word in ["first", "second", "third"] {
        let output = fabric
            .command("a", "10.77.0.1", "sh")
            .args(["-c", &format!("printf '{word}\\n' | socat -t 5 - UDP4-DATAGRAM:10.77.0.2:9402")])
            .output()
            .unwrap();
        assert!(output.status.success(), "socat client: {}", String::from_utf8_lossy(&output.stderr));
        assert_eq!(String::from_utf8_lossy(&output.stdout), format!("{}\n", word.to_uppercase()));
    }
    assert!(fabric.node_log("b").contains("forked child"), "socat's children did not fork under the shim");
}

const PY_ASYNCIO_SERVER: &str = r#"
import asyncio, sys
port = int(sys.argv[1])
class Echo(asyncio.DatagramProtocol):
    def __init__(self, done):
        self.done = done
    def connection_made(self, transport):
        self.transport = transport
    def datagram_received(self, data, addr):
        if data == b"quit":
            self.done.set_result(None)
        else:
            self.transport.sendto(data.upper(), addr)
async def main():
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    transport, _ = await loop.create_datagram_endpoint(lambda: Echo(done), local_addr=("10.77.0.2", port))
    print("ready", flush=True)
    await asyncio.wait_for(done, 120)
    transport.close()
    print("done", flush=True)
asyncio.run(main())
"#;

const PY_ASYNCIO_CLIENT: &str = r#"
import asyncio, sys
port, count = int(sys.argv[1]), int(sys.argv[2])
class Client(asyncio.DatagramProtocol):
    def __init__(self, done):
        self.done, self.answers = done, []
    def datagram_received(self, data, addr):
        self.answers.append((data.decode(), addr))
        if len(self.answers) == count:
            self.done.set_result(None)
async def main():
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    transport, client = await loop.create_datagram_endpoint(lambda: Client(done), remote_addr=("10.77.0.2", port))
    for index in range(count):
        transport.sendto(f"message-{index}".encode())
    await asyncio.wait_for(done, 120)
    for data, addr in sorted(client.answers):
        print(data, addr[0], addr[1], flush=True)
    transport.sendto(b"quit")
    transport.close()
asyncio.run(main())
"#;

#[test]
fn python_asyncio_datagram_protocols_talk_both_ways() {
    let mut fabric = Fabric::new("apps-asyncio");
    fabric.start_server();
    let mut command = fabric.command("b", "10.77.0.2", "python3");
    command.args(["-c", PY_ASYNCIO_SERVER, "9403"]);
    let (mut server, server_lines) = spawn(&mut command, "asyncio server");
    assert!(wait_for_line(&server_lines, "ready"), "server: {}", stderr_of(&mut server));
    let count = 50;
    let output =
        fabric.command("a", "10.77.0.1", "python3").args(["-c", PY_ASYNCIO_CLIENT, "9403", "50"]).output().unwrap();
    assert!(output.status.success(), "client: {}", String::from_utf8_lossy(&output.stderr));
    let mut expected: Vec<String> = (0..count).map(|index| format!("MESSAGE-{index} 10.77.0.2 9403")).collect();
    expected.sort();
    let answers: Vec<String> = String::from_utf8(output.stdout).unwrap().lines().map(str::to_owned).collect();
    assert_eq!(answers, expected);
    assert!(wait_for_line(&server_lines, "done"), "server did not get quit: {}", stderr_of(&mut server));
}

const PY_SELECTORS_SERVER: &str = r#"
import selectors, socket, sys
port = int(sys.argv[1])
selector = selectors.DefaultSelector()
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setblocking(False)
s.bind(("0.0.0.0", port))
selector.register(s, selectors.EVENT_READ)
print("ready", type(selector).__name__, flush=True)
while True:
    events = selector.select(timeout=120)
    if not events:
        sys.exit("nothing arrived")
    data, addr = s.recvfrom(2048)
    if data == b"quit":
        break
    s.sendto(data[::-1], addr)
print("done", flush=True)
"#;

const PY_TIMEOUT_CLIENT: &str = r#"
import socket, sys
port = int(sys.argv[1])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(0.2)
try:
    s.recvfrom(100)
    sys.exit("received from nobody")
except socket.timeout:
    print("timeout-ok", flush=True)
s.settimeout(60)
for index in range(20):
    text = f"selector-{index}".encode()
    s.sendto(text, ("10.77.0.2", port))
    data, addr = s.recvfrom(2048)
    assert data == text[::-1], (data, text)
    assert addr == ("10.77.0.2", port), addr
print("answered", flush=True)
s.sendto(b"quit", ("10.77.0.2", port))
"#;

/// A fabric with its server running and PY_SELECTORS_SERVER ready on node b's `port`.
fn selectors_server(tag: &str, port: &str) -> (Fabric, Proc, LineCollector) {
    let mut fabric = Fabric::new(tag);
    fabric.start_server();
    let mut command = fabric.command("b", "10.77.0.2", "python3");
    command.args(["-c", PY_SELECTORS_SERVER, port]);
    let (mut server, server_lines) = spawn(&mut command, "selectors server");
    assert!(wait_for_line(&server_lines, "ready EpollSelector"), "server: {}", stderr_of(&mut server));
    (fabric, server, server_lines)
}

#[test]
fn python_selectors_server_answers_a_timeout_client() {
    let (fabric, mut server, server_lines) = selectors_server("apps-selectors", "9404");
    let output = fabric.command("a", "10.77.0.1", "python3").args(["-c", PY_TIMEOUT_CLIENT, "9404"]).output().unwrap();
    assert!(output.status.success(), "client: {}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(String::from_utf8_lossy(&output.stdout), "timeout-ok\nanswered\n");
    assert!(wait_for_line(&server_lines, "done"), "server did not get quit: {}", stderr_of(&mut server));
}

/// An event-loop client: binds the wildcard address with port 0 and registers the socket with epoll
/// at once (as asyncio, tokio and Go do), sends plain UDP to a real address, then asks a fabric
/// server and waits for the answer through epoll.
const PY_EPOLL_CLIENT: &str = r#"
import selectors, socket, sys
real_port, fabric_port = int(sys.argv[1]), int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setblocking(False)
s.bind(("0.0.0.0", 0))
selector = selectors.DefaultSelector()
selector.register(s, selectors.EVENT_READ)
port = s.getsockname()[1]
s.sendto(b"plain", ("127.0.0.1", real_port))
print("sent-plain", port, flush=True)
for index in range(5):
    s.sendto(f"fabric-{index}".encode(), ("10.77.0.2", fabric_port))
    if not selector.select(timeout=60):
        sys.exit("epoll never reported the answer")
    data, addr = s.recvfrom(2048)
    assert data == f"fabric-{index}".encode()[::-1], data
    assert addr == ("10.77.0.2", fabric_port), addr
print("answered", flush=True)
s.sendto(b"quit", ("10.77.0.2", fabric_port))
"#;

#[test]
fn an_event_loop_client_bound_to_wildcard_port_zero_gets_fabric_answers_through_epoll() {
    let (fabric, mut server, server_lines) = selectors_server("apps-port-zero", "9420");
    let real = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    real.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let real_port = real.local_addr().unwrap().port().to_string();
    let mut command = fabric.command("a", "10.77.0.1", "python3");
    command.args(["-c", PY_EPOLL_CLIENT, &real_port, "9420"]);
    let (mut client, client_lines) = spawn(&mut command, "epoll client");
    let mut buffer = [0u8; 64];
    let (len, from) = real.recv_from(&mut buffer).expect("the plain datagram arrives");
    assert_eq!(&buffer[..len], b"plain");
    assert!(wait_for_line(&client_lines, "sent-plain"), "client: {}", stderr_of(&mut client));
    let bound: u16 = client_lines.lines()[0].split(' ').nth(1).unwrap().parse().unwrap();
    assert_eq!(from.port(), bound, "plain UDP leaves from the port the bind gave");
    assert!(wait_for_line(&client_lines, "answered"), "client: {}", stderr_of(&mut client));
    assert!(wait_for_line(&server_lines, "done"), "server did not get quit: {}", stderr_of(&mut server));
}

#[test]
fn rust_std_udp_sockets_with_read_timeouts_talk_both_ways() {
    let mut fabric = Fabric::new("apps-rust");
    fabric.start_server();
    let mut command = fabric.command("b", "10.77.0.2", &std_udp_program());
    command.args(["echo", "10.77.0.2:9405"]);
    let (mut echo, echo_lines) = spawn(&mut command, "rust echo");
    assert!(wait_for_line(&echo_lines, "ready 10.77.0.2:9405"), "echo: {}", stderr_of(&mut echo));
    let output = fabric
        .command("a", "10.77.0.1", &std_udp_program())
        .args(["ask", "10.77.0.1:0", "10.77.0.2:9405", "200"])
        .output()
        .unwrap();
    assert!(output.status.success(), "ask: {}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(String::from_utf8_lossy(&output.stdout), "answered 200\n");
    assert!(wait_for_line(&echo_lines, "done"), "echo did not get quit: {}", stderr_of(&mut echo));
    assert!(echo.wait_exit(Duration::from_secs(10)));
    assert!(echo.child.wait().unwrap().success(), "echo failed: {}", stderr_of(&mut echo));
}

const PY_FORKER: &str = r#"
import os, socket, subprocess, sys
port = int(sys.argv[1])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("10.77.0.1", 0))
destination = ("10.77.0.2", port)
s.sendto(b"parent-before-fork", destination)
pid = os.fork()
if pid == 0:
    for index in range(10):
        s.sendto(f"child-{index}".encode(), destination)
    os._exit(0)
_, status = os.waitpid(pid, 0)
assert status == 0, status
# subprocess uses vfork and closes every other fd in the child (close_range) before exec.
subprocess.run(["true"], check=True)
for index in range(10):
    s.sendto(f"parent-{index}".encode(), destination)
print("port", s.getsockname()[1], flush=True)
"#;

#[test]
fn a_forked_child_sends_on_an_inherited_socket() {
    let mut fabric = Fabric::new("apps-fork");
    fabric.start_server();
    let (_receiver, received) = py_receiver(&fabric, "b", "10.77.0.2", 9406, 21);
    let output = fabric.command("a", "10.77.0.1", "python3").args(["-c", PY_FORKER, "9406"]).output().unwrap();
    assert!(output.status.success(), "forker: {}", String::from_utf8_lossy(&output.stderr));
    let stdout = String::from_utf8(output.stdout).unwrap();
    let port = stdout.trim().strip_prefix("port ").expect("port line");
    assert!(wait_until(ARRIVAL_LIMIT, || received.count() >= 22), "got {:?}", received.lines());
    std::thread::sleep(Duration::from_millis(500));
    let mut got: Vec<String> = received.lines()[1..].to_vec();
    got.sort();
    let mut expected: Vec<String> = std::iter::once("parent-before-fork".to_owned())
        .chain((0..10).map(|index| format!("child-{index}")))
        .chain((0..10).map(|index| format!("parent-{index}")))
        .map(|payload| format!("10.77.0.1 {port} {payload}"))
        .collect();
    expected.sort();
    assert_eq!(got, expected);
    // The child drew its own epoch (packet ids stay unique).
    let log = fabric.node_log("a");
    assert!(log.contains("forked child: new epoch"), "{log}");
}

/// A daemon-style "close every fd above mine" loop (close_range and closefrom through ctypes, and a
/// close of each number in turn) runs while the
/// shim's receive thread makes its own fds, in the parent and again in a forked child (whose thread
/// starts at once). Then the app's files and sockets close when it closes them, and new sockets get
/// every datagram sent to them.
const PY_CLOSER: &str = r#"
import ctypes, errno, os, socket, sys, tempfile, time
libc = ctypes.CDLL(None, use_errno=True)
scratch = tempfile.mkdtemp()
libc.close_range.argtypes = [ctypes.c_uint, ctypes.c_uint, ctypes.c_int]
seconds = float(sys.argv[1])

def close_above(fd):
    end = time.monotonic() + seconds
    rounds = 0
    while time.monotonic() < end:
        if rounds % 3 == 0 and libc.close_range(fd + 1, 0xFFFFFFFF, 0) != 0:
            raise OSError(ctypes.get_errno(), "close_range")
        if rounds % 3 == 1:
            libc.closefrom(fd + 1)
        if rounds % 3 == 2:
            for number in range(fd + 1, 1024):
                try:
                    os.close(number)
                except OSError:
                    pass
        rounds += 1
        time.sleep(0.005)

def identities():
    # (device, inode) of every open fd: the shim's files may sit at low numbers for a moment (it
    # opens them outside its lock), so "closed" is judged by what an fd refers to, not its number.
    found = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            info = os.stat(f"/proc/self/fd/{name}")
        except OSError:
            continue
        found.add((info.st_dev, info.st_ino))
    return found

def identity(fd):
    info = os.fstat(fd)
    return (info.st_dev, info.st_ino)

def check(tag, s1):
    # The app's files, open while it sends: they get the numbers the close loop freed.
    files = [os.open(os.path.join(scratch, f"{tag}-{index}"), os.O_RDWR | os.O_CREAT) for index in range(8)]
    for round in range(3):
        s2 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s2.bind(("10.77.0.1", 0))
        s2.settimeout(20)
        socket_identity = identity(s2.fileno())
        want = sorted(f"{tag}-{round}-{index}".encode() for index in range(3))
        for payload in want:
            s1.sendto(payload, s2.getsockname())
        got = sorted(s2.recv(100) for _ in want)
        assert got == want, (tag, round, got)
        s2.close()
        assert socket_identity not in identities(), f"{tag}: a socket is still open after close"
    sizes = [os.fstat(fd).st_size for fd in files]
    assert sizes == [0] * len(files), f"{tag}: the shim wrote into the app's files: {sizes}"
    file_identities = [identity(fd) for fd in files]
    for fd in files:
        os.close(fd)
    still = [fd for fd, ident in zip(files, file_identities) if ident in identities()]
    assert not still, f"{tag}: files at fds {still} stay open after the app closed them"
    print(tag, "ok", flush=True)

s1 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s1.bind(("10.77.0.1", 0))
close_above(s1.fileno())
check("parent", s1)
# Now the shim has files open (its outbox log): the loop must leave them too.
close_above(s1.fileno())
check("parent-again", s1)
pid = os.fork()
if pid == 0:
    try:
        close_above(s1.fileno())
        check("child", s1)
    except BaseException as error:
        print("child failed:", repr(error), flush=True)
        os._exit(1)
    os._exit(0)
_, status = os.waitpid(pid, 0)
assert status == 0, status
"#;

#[test]
fn an_apps_close_range_while_the_shim_makes_its_own_fds_takes_none_of_them() {
    let mut fabric = Fabric::new("apps-close-range");
    fabric.start_server();
    // The shim's threads pause 100 ms between making each fd of theirs and marking it (a test
    // knob), so the app's loop, running 1 s, closes fds in that moment if it can.
    let output = fabric
        .command("a", "10.77.0.1", "python3")
        .env("FTSS_TEST_NEW_FD_PAUSE_MS", "100")
        .args(["-c", PY_CLOSER, "1.0"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "closer: {stdout}\n{}\n{}",
        String::from_utf8_lossy(&output.stderr),
        fabric.node_log("a")
    );
    assert_eq!(stdout, "parent ok\nparent-again ok\nchild ok\n");
}

#[test]
fn a_close_in_a_signal_handler_during_a_lingering_close_while_a_socket_is_made_does_not_hang() {
    // The lingering close holds the shim's fd lock for reading, the new fabric socket waits to
    // take it for writing, and the handler's close must not queue behind that writer.
    let mut fabric = Fabric::new("apps-signal-close");
    fabric.start_server();
    let mut command = fabric.command("a", "10.77.0.1", &std_udp_program());
    command.args(["signal-close", "10.77.0.1:0"]);
    let (mut proc, lines) = spawn(&mut command, "signal-close");
    let finished = proc.wait_exit(Duration::from_secs(30));
    let stderr = stderr_of(&mut proc);
    assert!(finished, "hung (killed after 30 s): {:?} {stderr}", lines.lines());
    assert!(wait_until(Duration::from_secs(5), || !lines.lines().is_empty()), "{stderr}");
    assert_eq!(lines.lines(), ["handled=true bound=true"], "{stderr}");
}

#[test]
fn a_fork_while_another_thread_is_in_a_long_close_leaves_a_working_child() {
    let mut fabric = Fabric::new("apps-fork-close");
    fabric.start_server();
    let output = fabric
        .command("a", "10.77.0.1", &std_udp_program())
        .args(["fork-during-close", "10.77.0.1:0"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout} {}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(stdout, "child=ok\n", "{}", fabric.node_log("a"));
}

#[test]
fn eight_threads_send_ten_thousand_datagrams_each_and_four_receiving_threads_get_each_once() {
    let threads = 8;
    let each = 10_000;
    let mut fabric = Fabric::new("apps-threads");
    fabric.start_server();
    let mut command = fabric.command("b", "10.77.0.2", &std_udp_program());
    command.args(["sink", "0.0.0.0:9407", &(threads * each).to_string()]);
    let (mut sink, sink_lines) = spawn(&mut command, "sink");
    assert!(wait_for_line(&sink_lines, "ready"), "sink: {}", stderr_of(&mut sink));
    let started = std::time::Instant::now();
    let output = fabric
        .command("a", "10.77.0.1", &std_udp_program())
        .args(["blast", "10.77.0.1:0", "10.77.0.2:9407", &threads.to_string(), &each.to_string()])
        .output()
        .unwrap();
    assert!(output.status.success(), "blast: {}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(String::from_utf8_lossy(&output.stdout), format!("sent {}\n", threads * each));
    let send_seconds = started.elapsed().as_secs_f64();
    assert!(
        wait_until(Duration::from_secs(300), || sink_lines.lines().iter().any(|line| line.starts_with("distinct"))),
        "sink did not finish: {:?} {}",
        sink_lines.lines(),
        stderr_of(&mut sink)
    );
    let total_seconds = started.elapsed().as_secs_f64();
    eprintln!(
        "80,000 datagrams from 8 threads: sent (volume mode) in {send_seconds:.1} s, all received within {total_seconds:.1} s"
    );
    let last = sink_lines.lines().last().cloned().unwrap();
    assert_eq!(last, format!("distinct {} duplicates 0", threads * each));
}

const PY_GUARANTEED_SENDER: &str = r#"
import errno, socket, sys, time
port = int(sys.argv[1])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("10.77.0.1", 0))
started = time.monotonic()
try:
    s.sendto(b"while-down", ("10.77.0.2", port))
    print("sent while-down", flush=True)
except OSError as error:
    print("error", errno.errorcode[error.errno], round(time.monotonic() - started, 1), flush=True)
sys.stdin.readline()
s.sendto(b"while-up", ("10.77.0.2", port))
print("sent while-up", flush=True)
"#;

#[test]
fn guaranteed_sends_fail_with_etimedout_while_the_server_is_down_and_return_after_its_ack() {
    let mut fabric = Fabric::new("apps-guaranteed");
    // The receiver registers node b; no server runs yet.
    let (_receiver, received) = py_receiver(&fabric, "b", "10.77.0.2", 9408, 2);
    let mut command = fabric.command("a", "10.77.0.1", "python3");
    command.args(["-c", PY_GUARANTEED_SENDER, "9408"]).env("FTSS_ACK", "guaranteed").env("FTSS_TIMEOUT", "2");
    let (mut sender, sender_lines) = spawn(&mut command, "guaranteed sender");
    assert!(wait_until(ARRIVAL_LIMIT, || sender_lines.count() >= 1), "sender stuck: {}", stderr_of(&mut sender));
    let line = sender_lines.lines()[0].clone();
    let fields: Vec<&str> = line.split(' ').collect();
    assert_eq!(&fields[..2], ["error", "ETIMEDOUT"], "{line}");
    let waited: f64 = fields[2].parse().unwrap();
    assert!(waited >= 1.9, "returned after {waited} s, before FTSS_TIMEOUT");
    let acks = fabric.volume.join("nodes/a/ack/new");
    assert!(files_in(&acks).is_empty(), "an ack without a server?");
    assert!(fabric.node_log("a").contains("errno 110"), "the reason is not in FTSS_LOG: {}", fabric.node_log("a"));

    fabric.start_server();
    write_stdin(&mut sender.child, "go\n");
    assert!(wait_for_line(&sender_lines, "sent while-up"), "sender: {}", stderr_of(&mut sender));
    // The send returned, so the server wrote an ack (which the sender read and removed).
    assert!(wait_until(ARRIVAL_LIMIT, || fabric.counter("acked") >= 1), "send returned without an ack");
    // The timed-out datagram was published all the same: nothing is lost, it arrives too.
    assert!(wait_until(ARRIVAL_LIMIT, || received.count() >= 3), "got {:?}", received.lines());
    let mut payloads: Vec<String> =
        received.lines()[1..].iter().map(|line| line.rsplit(' ').next().unwrap().to_owned()).collect();
    payloads.sort();
    assert_eq!(payloads, ["while-down", "while-up"]);
}

/// Sends three datagrams in guaranteed mode, one after the other, printing how long each took.
const PY_TIMED_GUARANTEED: &str = r#"
import socket, sys, time
port = int(sys.argv[1])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for index in range(3):
    started = time.monotonic()
    s.sendto(f"bell-{index}".encode(), ("10.77.0.2", port))
    print("sent", index, round(time.monotonic() - started, 3), flush=True)
"#;

#[test]
fn on_a_local_volume_the_servers_bells_wake_a_receiver_and_an_ack_waiter_long_before_their_poll() {
    let mut fabric = Fabric::new("apps-bell-hint");
    fabric.start_server();
    // A pass a minute: without the bell directory's inotify hint the first delivery would wait
    // up to 60 s, and the first ack until the 50 s FTSS_TIMEOUT failed the send.
    let poll = ("FTSS_POLL_MS", "60000");
    let mut command = fabric.command("b", "10.77.0.2", "python3");
    command.args(["-c", PY_RECEIVER, "3", "9409"]).env(poll.0, poll.1);
    let (_receiver, received) = spawn(&mut command, "python receiver");
    assert!(wait_for_line(&received, "ready"), "receiver not ready");
    let mut command = fabric.command("a", "10.77.0.1", "python3");
    command.args(["-c", PY_TIMED_GUARANTEED, "9409"]).env(poll.0, poll.1);
    command.env("FTSS_ACK", "guaranteed").env("FTSS_TIMEOUT", "50");
    let (mut sender, sent) = spawn(&mut command, "guaranteed sender");
    let within = Duration::from_secs(40);
    assert!(wait_until(within, || sent.count() >= 3), "sender: {:?} {}", sent.lines(), stderr_of(&mut sender));
    assert!(wait_until(within, || received.count() >= 4), "received only {:?}", received.lines());
    let mut payloads: Vec<String> =
        received.lines()[1..].iter().map(|line| line.rsplit(' ').next().unwrap().to_owned()).collect();
    payloads.sort();
    assert_eq!(payloads, ["bell-0", "bell-1", "bell-2"]);
    // The sends returned, so the server acked them (its status is written every few seconds).
    assert!(wait_until(within, || fabric.counter("acked") >= 3), "the sends returned without the server's acks");
}

const PY_ASYNC_BURST: &str = r#"
import socket, sys
port, count = int(sys.argv[1]), int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
padding = "x" * 8000
for index in range(count):
    s.sendto(f"burst-{index}:{padding}".encode(), ("10.77.0.2", port))
# Exit at once: megabytes are still in the ring; the shim's exit handler publishes them.
"#;

#[test]
fn async_mode_returns_at_once_and_publishes_everything_before_exit() {
    let mut fabric = Fabric::new("apps-async");
    fabric.start_server();
    let count = 3000;
    let (_receiver, received) = py_receiver(&fabric, "b", "10.77.0.2", 9409, count);
    let output = fabric
        .command("a", "10.77.0.1", "python3")
        .args(["-c", PY_ASYNC_BURST, "9409", &count.to_string()])
        .env("FTSS_ACK", "async")
        .output()
        .unwrap();
    assert!(output.status.success(), "sender: {}", String::from_utf8_lossy(&output.stderr));
    assert!(wait_until(ARRIVAL_LIMIT, || received.count() > count), "only {} arrived", received.count() - 1);
    let payloads: Vec<String> = received.lines()[1..]
        .iter()
        .map(|line| line.rsplit(' ').next().unwrap().split(':').next().unwrap().to_owned())
        .collect();
    let expected: Vec<String> = (0..count).map(|index| format!("burst-{index}")).collect();
    assert_eq!(payloads, expected, "lost, duplicated or reordered");
}

const PY_CLOSE_UNREAD_REBIND: &str = r#"
import array, fcntl, socket, sys, termios, time
port = int(sys.argv[1])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("10.77.0.2", port))
print("ready", flush=True)
waiting = array.array("i", [0])
while waiting[0] == 0:
    time.sleep(0.02)
    fcntl.ioctl(s.fileno(), termios.FIONREAD, waiting)
print("queued", waiting[0], flush=True)
s.close()
# The port is free again at once, as after any close.
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("10.77.0.2", port))
s.settimeout(120)
data, addr = s.recvfrom(100)
print("got", data.decode(), flush=True)
"#;

#[test]
fn a_datagram_left_unread_in_a_closed_socket_reaches_the_next_socket_on_its_port() {
    let mut fabric = Fabric::new("apps-close-unread");
    fabric.start_server_with(&["--redeliver-after", "1s"]);
    let mut command = fabric.command("b", "10.77.0.2", "python3");
    command.args(["-c", PY_CLOSE_UNREAD_REBIND, "9410"]);
    let (mut receiver, lines) = spawn(&mut command, "close-unread receiver");
    assert!(wait_for_line(&lines, "ready"), "receiver: {}", stderr_of(&mut receiver));
    let sent = "left-unread";
    assert!(nc_send_lines(&fabric, "a", "10.77.0.1", "10.77.0.2", 9410, &[sent.to_owned()]));
    // FIONREAD saw it queued (payload bytes, without the shim's header), then the socket closed.
    assert!(wait_for_line(&lines, "queued"), "never queued: {}", stderr_of(&mut receiver));
    assert_eq!(lines.lines()[1], format!("queued {}", sent.len() + 1));
    assert!(wait_for_line(&lines, "got"), "not delivered again: {:?} {}", lines.lines(), stderr_of(&mut receiver));
    assert_eq!(lines.lines()[2], format!("got {sent}"));
}

const PY_DAEMON: &str = r#"
import os, socket, sys
port = int(sys.argv[1])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("10.77.0.2", port))
s.settimeout(120)
if os.fork() > 0:
    print("parent exits", flush=True)
    os._exit(0)
# The child, alone with the inherited socket, waits in poll() (settimeout) before recvfrom.
data, addr = s.recvfrom(100)
print("child got", data.decode().strip(), addr[0], flush=True)
"#;

#[test]
fn a_daemonized_child_receives_on_the_socket_its_exited_parent_bound() {
    let mut fabric = Fabric::new("apps-daemon");
    fabric.start_server();
    let mut command = fabric.command("b", "10.77.0.2", "python3");
    command.args(["-c", PY_DAEMON, "9411"]);
    let (mut parent, lines) = spawn(&mut command, "daemon");
    assert!(wait_for_line(&lines, "parent exits"), "{}", stderr_of(&mut parent));
    assert!(parent.wait_exit(Duration::from_secs(30)), "parent did not exit");
    assert!(nc_send_lines(&fabric, "a", "10.77.0.1", "10.77.0.2", 9411, &["to-the-daemon".to_owned()]));
    assert!(wait_for_line(&lines, "child got"), "child heard nothing: {:?}", lines.lines());
    assert_eq!(lines.lines()[1], "child got to-the-daemon 10.77.0.1");
}

const PY_DUPS: &str = r#"
import os, socket, sys
port = int(sys.argv[1])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("10.77.0.2", port))
d = s.dup()  # fcntl64(F_DUPFD_CLOEXEC) in libpython
s.close()
d.settimeout(120)
print("ready", d.getsockname()[0], d.getsockname()[1], flush=True)
data, addr = d.recvfrom(100)
print("dup got", data.decode().strip(), flush=True)
os.dup2(d.fileno(), 100)
d.close()
e = socket.socket(fileno=100)  # asks the fd for its family, type and protocol
e.settimeout(120)
print("adopted", e.family.name, e.type.name, e.proto, flush=True)
data, addr = e.recvfrom(100)
print("dup2 got", data.decode().strip(), flush=True)
"#;

#[test]
fn python_socket_dup_dup2_and_fromfd_keep_receiving() {
    let mut fabric = Fabric::new("apps-dups");
    fabric.start_server();
    let mut command = fabric.command("b", "10.77.0.2", "python3");
    command.args(["-c", PY_DUPS, "9412"]);
    let (mut receiver, lines) = spawn(&mut command, "dups receiver");
    assert!(wait_for_line(&lines, "ready 10.77.0.2 9412"), "{}", stderr_of(&mut receiver));
    let mut sender = NcSender::start(&fabric, "a", "10.77.0.1", "10.77.0.2", 9412);
    sender.send(&["first".to_owned()]);
    assert!(wait_for_line(&lines, "dup got first"), "{:?} {}", lines.lines(), stderr_of(&mut receiver));
    assert!(wait_for_line(&lines, "adopted AF_INET SOCK_DGRAM 17"), "{:?}", lines.lines());
    sender.send(&["second".to_owned()]);
    assert!(wait_for_line(&lines, "dup2 got second"), "{:?} {}", lines.lines(), stderr_of(&mut receiver));
    assert!(sender.finish(Duration::from_secs(30)));
}

const PY_FORK_UNDER_LOAD: &str = r#"
import os, socket, sys, threading
port, forks, threads, each = (int(arg) for arg in sys.argv[1:5])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("10.77.0.1", 0))
destination = ("10.77.0.2", port)
def worker(thread):
    for index in range(each):
        s.sendto(f"thread-{thread}-{index}".encode(), destination)
workers = [threading.Thread(target=worker, args=(thread,)) for thread in range(threads)]
for worker_thread in workers:
    worker_thread.start()
# Fork while the other threads are inside the shim's send path and hold its locks.
for index in range(forks):
    pid = os.fork()
    if pid == 0:
        s.sendto(f"fork-{index}".encode(), destination)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert status == 0, status
for worker_thread in workers:
    worker_thread.join()
print("done", flush=True)
"#;

#[test]
fn forking_while_other_threads_send_never_deadlocks_and_loses_nothing() {
    let (forks, threads, each) = (30, 4, 250);
    let total = forks + threads * each;
    let mut fabric = Fabric::new("apps-fork-load");
    fabric.start_server();
    let (_receiver, received) = py_receiver(&fabric, "b", "10.77.0.2", 9413, total);
    let mut command = fabric.command("a", "10.77.0.1", "python3");
    command.args(["-c", PY_FORK_UNDER_LOAD, "9413", &forks.to_string(), &threads.to_string(), &each.to_string()]);
    let (mut sender, lines) = spawn(&mut command, "fork under load");
    assert!(wait_for_line(&lines, "done"), "sender stuck (a deadlock?): {}", stderr_of(&mut sender));
    assert!(wait_until(ARRIVAL_LIMIT, || received.count() > total), "only {} arrived", received.count() - 1);
    std::thread::sleep(Duration::from_millis(500));
    let mut payloads: Vec<String> =
        received.lines()[1..].iter().map(|line| line.rsplit(' ').next().unwrap().to_owned()).collect();
    payloads.sort();
    let mut expected: Vec<String> = (0..forks)
        .map(|index| format!("fork-{index}"))
        .chain((0..threads).flat_map(|thread| (0..each).map(move |index| format!("thread-{thread}-{index}"))))
        .collect();
    expected.sort();
    assert_eq!(payloads, expected);
}

/// In a network namespace of its own (only `lo`, with 10.77.0.2 on it): a plain UDP listener on
/// the fabric address 10.77.0.2:7900 and on 127.0.0.1:7901, then python under the shim with
/// `env` sending one datagram to each. Prints what the sender saw ("fabric errno N" or "fabric
/// sent", "other ...") and what reached the listeners ("leaked ...", "got other").
const NETNS_PROBE: &str = r#"
ip link set lo up && ip addr add 10.77.0.2/32 dev lo || exit 3
python3 -c '
import socket, sys
fabric = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); fabric.bind(("10.77.0.2", 7900))
other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); other.bind(("127.0.0.1", 7901))
for s in (fabric, other): s.settimeout(2)
print("listening", flush=True)
for s, name in ((fabric, "leaked"), (other, "got other")):
    try:
        data, _ = s.recvfrom(100); print(name, data.decode(), flush=True)
    except socket.timeout:
        pass
' &
sleep 0.5
env "$@" python3 -c '
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for target, name in ((("10.77.0.2", 7900), "fabric"), (("127.0.0.1", 7901), "other")):
    try:
        s.sendto(name.encode(), target); print(name, "sent", flush=True)
    except OSError as error:
        print(name, "errno", error.errno, flush=True)
'
wait
"#;

/// Runs the probe with the shim and `env`; returns its output.
fn probe_in_netns(env: &[String]) -> String {
    let output = Command::new("unshare")
        .args(["--net", "sh", "-c", NETNS_PROBE, "probe"])
        .arg(format!("LD_PRELOAD={}", shim_path().display()))
        .args(env)
        .output()
        .expect("unshare");
    let text = String::from_utf8_lossy(&output.stdout).to_string() + &String::from_utf8_lossy(&output.stderr);
    assert!(text.contains("listening"), "the probe did not run: {text}");
    text
}

/// A shim asked to carry fabric traffic (FTSS_VOLUME or FTSS_TRANSPORT set) whose configuration is
/// unusable fails closed: a send to a fabric address fails with ENETUNREACH and never reaches the
/// real network (a listener on that address in the namespace gets nothing), other traffic passes,
/// and FTSS_LOG says why. Each case: a missing fabric key, an unreadable one, a bad FTSS_ADDR, a
/// directory that is not the volume (an unmounted mountpoint), a read-only volume, unreadable
/// FTSS_ROUTES (then every IPv4 destination is refused).
#[test]
fn a_misconfigured_shim_fails_closed_and_leaks_nothing() {
    let fabric = Fabric::new("fail-closed");
    let log = fabric.dir.0.join("shim.log");
    let not_volume = fabric.dir.0.join("not-a-volume");
    std::fs::create_dir_all(&not_volume).unwrap();
    let read_only = fabric.dir.0.join("read-only");
    std::fs::create_dir_all(&read_only).unwrap();
    fsbridge::Volume::new(&read_only).create().unwrap();
    assert!(Command::new("mount").args(["--bind"]).arg(&read_only).arg(&read_only).status().unwrap().success());
    assert!(
        Command::new("mount").args(["-o", "remount,bind,ro"]).arg(&read_only).status().unwrap().success(),
        "remount read-only"
    );
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(read_only.clone());
    let volume = fabric.volume.display().to_string();
    let base = |extra: &[&str]| -> Vec<String> {
        let mut env = vec![format!("FTSS_LOG={}", log.display()), "FTSS_NODE=a".into()];
        env.extend(extra.iter().map(|text| text.to_string()));
        env
    };
    let cases: Vec<(&str, Vec<String>, bool)> = vec![
        (
            "no fabric key",
            base(&["FTSS_ADDR=10.77.0.1", "FTSS_TRANSPORT=fabric", "FTSS_FABRIC=unix:/nonexistent"]),
            true,
        ),
        (
            "unreadable fabric key",
            base(&[
                "FTSS_ADDR=10.77.0.1",
                "FTSS_TRANSPORT=fabric",
                "FTSS_FABRIC=unix:/nonexistent",
                "FTSS_FABRIC_KEY=/nonexistent/a.key",
            ]),
            true,
        ),
        ("bad FTSS_ADDR", base(&["FTSS_ADDR=10.77.0.300", &format!("FTSS_VOLUME={volume}")]), true),
        ("not the volume", base(&["FTSS_ADDR=10.77.0.1", &format!("FTSS_VOLUME={}", not_volume.display())]), true),
        ("read-only volume", base(&["FTSS_ADDR=10.77.0.1", &format!("FTSS_VOLUME={}", read_only.display())]), true),
        (
            "unreadable FTSS_ROUTES",
            base(&["FTSS_ADDR=10.77.0.1", &format!("FTSS_VOLUME={volume}"), "FTSS_ROUTES=10.77.0.0/99"]),
            false,
        ),
    ];
    for (case, env, other_passes) in cases {
        let _ = std::fs::remove_file(&log);
        let said = probe_in_netns(&env);
        assert!(said.contains("fabric errno 101"), "{case}: the fabric send did not fail with ENETUNREACH:\n{said}");
        assert!(!said.contains("leaked"), "{case}: a fabric datagram reached the real network:\n{said}");
        if other_passes {
            assert!(said.contains("other sent") && said.contains("got other"), "{case}: other traffic:\n{said}");
        } else {
            assert!(said.contains("other errno 101"), "{case}: with the fabric's extent unknown:\n{said}");
        }
        let logged = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(logged.contains("refus"), "{case}: FTSS_LOG does not say why:\n{logged}");
    }
}

/// rsyslogd with `$PrivDropToUser nobody` on node b (it binds its UDP input as root, then drops
/// root), on a volume whose root only root may enter: `logger` on node a sends it lines through
/// ftss, and rsyslogd, now nobody, writes each to its file once. The shim's privilege helper,
/// forked before the drop, makes the volume operations.
#[test]
fn rsyslogd_that_drops_root_receives_lines_from_logger() {
    assert!(have("rsyslogd") && have("logger"), "rsyslogd and logger are needed (.ci/run installs rsyslog)");
    let mut fabric = Fabric::new("apps-rsyslog");
    std::fs::set_permissions(&fabric.volume, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    fabric.start_server();
    let dir = fabric.dir.0.join("rsyslog");
    for sub in ["work", "out"] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
        std::fs::set_permissions(dir.join(sub), std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    }
    let messages = dir.join("out/messages");
    let conf = dir.join("rsyslog.conf");
    std::fs::write(
        &conf,
        format!(
            "global(workDirectory=\"{work}\")\n\
             module(load=\"imudp\")\n\
             input(type=\"imudp\" address=\"0.0.0.0\" port=\"5514\")\n\
             $PrivDropToUser nobody\n\
             $PrivDropToGroup nogroup\n\
             *.* action(type=\"omfile\" file=\"{messages}\")\n",
            work = dir.join("work").display(),
            messages = messages.display()
        ),
    )
    .unwrap();
    let mut command = fabric.command("b", "10.77.0.2", "rsyslogd");
    command.arg("-n").arg("-f").arg(&conf).arg("-i").arg(dir.join("rsyslogd.pid"));
    let (mut rsyslogd, _) = spawn(&mut command, "rsyslogd");
    let pid = rsyslogd.child.id();
    assert!(
        wait_until(Duration::from_secs(20), || dropped_root(pid)),
        "rsyslogd did not drop root: {:?}\n{}\n{}",
        uid_line(pid),
        stderr_of(&mut rsyslogd),
        fabric.node_log("b")
    );
    let count = 5;
    for n in 0..count {
        let status = fabric
            .command("a", "10.77.0.1", "logger")
            .args(["--udp", "--server", "10.77.0.2", "--port", "5514", "--tag", "ftss-test"])
            .arg(format!("line {n} through the array"))
            .status()
            .unwrap();
        assert!(status.success(), "logger {n}: {status}");
    }
    let got = || std::fs::read_to_string(&messages).unwrap_or_default();
    let all = wait_until(ARRIVAL_LIMIT, || (0..count).all(|n| got().contains(&format!("line {n} through the array"))));
    assert!(all, "rsyslogd wrote {:?}\nb: {}\nserver: {}", got(), fabric.node_log("b"), fabric.server_log());
    for n in 0..count {
        assert_eq!(got().matches(&format!("line {n} through the array")).count(), 1, "{}", got());
    }
    assert!(fabric.node_log("b").contains("keeps root for the volume"), "{}", fabric.node_log("b"));
}
