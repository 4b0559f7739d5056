//! A plain Rust std `UdpSocket` program for the shim's end-to-end tests (tests/shim_apps.rs); it knows
//! nothing about ftss.
//!
//! - `shim_std_udp echo <bind>`: answers every datagram with its upper-cased copy until a datagram
//!   "quit" arrives; waits with `set_read_timeout` and `peek_from`, answers from a `try_clone`.
//! - `shim_std_udp ask <bind> <peer> <count>`: connects, sends `count` questions, reads the answers
//!   with a read timeout, prints `answered <n>`, sends "quit".
//! - `shim_std_udp blast <bind> <peer> <threads> <count>`: `threads` threads share one socket and
//!   each sends `count` datagrams "t<thread>-<seq>"; prints `sent <n>`.
//! - `shim_std_udp sink <bind> <total>`: 4 threads receive on clones of one socket until `total`
//!   distinct datagrams arrived (or 120 s pass with nothing new); prints
//!   `distinct <n> duplicates <n>`.
//! - `shim_std_udp signal-close <bind>`: closes a TCP socket whose close lingers (`SO_LINGER`, with
//!   unsent data its peer never reads); meanwhile a second thread binds a new UDP socket to `bind`
//!   and a third interrupts the close with a signal whose handler closes an fd too. Prints
//!   `handled=<bool> bound=<bool>` once all three are done.
//! - `shim_std_udp fork-during-close <bind>`: binds a UDP socket to `bind`, then forks while
//!   another thread is in a lingering close; the child binds a second socket, sends itself a
//!   datagram and reads it. Prints `child=ok` (`child=failed`, or `child=hung` if it has not
//!   exited within 10 s).

use std::collections::HashSet;
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::IntoRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// How long `sink` and `ask` wait for anything new before giving up.
const QUIET_LIMIT: Duration = Duration::from_secs(120);
/// Threads `sink` receives with, on clones of one socket.
const SINK_THREADS: usize = 4;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |index: usize| args.get(index).unwrap_or_else(|| panic!("missing argument {index}: {args:?}")).as_str();
    match arg(0) {
        "echo" => echo(arg(1)),
        "ask" => ask(arg(1), arg(2).parse().unwrap(), arg(3).parse().unwrap()),
        "blast" => blast(arg(1), arg(2).parse().unwrap(), arg(3).parse().unwrap(), arg(4).parse().unwrap()),
        "sink" => sink(arg(1), arg(2).parse().unwrap()),
        "signal-close" => signal_close(arg(1)),
        "fork-during-close" => fork_during_close(arg(1)),
        other => panic!("unknown mode {other}"),
    }
}

fn echo(bind: &str) {
    let socket = UdpSocket::bind(bind).expect("bind");
    socket.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    assert_eq!(socket.read_timeout().unwrap(), Some(Duration::from_millis(200)));
    let answers = socket.try_clone().expect("try_clone");
    println!("ready {}", socket.local_addr().unwrap());
    let mut buffer = [0u8; 2048];
    loop {
        // Peek first (MSG_PEEK), then take it: what apps that size their buffer do.
        let peeked = match socket.peek_from(&mut buffer) {
            Ok(peeked) => peeked,
            Err(error) if matches!(error.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                continue;
            }
            Err(error) => panic!("peek_from: {error}"),
        };
        let (length, from) = socket.recv_from(&mut buffer).expect("recv_from");
        assert_eq!(peeked, (length, from), "peek and receive disagree");
        if &buffer[..length] == b"quit" {
            break;
        }
        let answer = buffer[..length].to_ascii_uppercase();
        answers.send_to(&answer, from).expect("send_to");
    }
    println!("done");
}

fn ask(bind: &str, peer: SocketAddr, count: usize) {
    let socket = UdpSocket::bind(bind).expect("bind");
    socket.connect(peer).expect("connect");
    assert_eq!(socket.peer_addr().unwrap(), peer);
    socket.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let questions: Vec<String> = (0..count).map(|index| format!("question-{index}")).collect();
    let mut unanswered: HashSet<String> = questions.iter().map(|question| question.to_uppercase()).collect();
    for question in &questions {
        socket.send(question.as_bytes()).expect("send");
    }
    let mut buffer = [0u8; 2048];
    let mut last_news = Instant::now();
    while !unanswered.is_empty() && last_news.elapsed() < QUIET_LIMIT {
        match socket.recv(&mut buffer) {
            Ok(length) => {
                if unanswered.remove(String::from_utf8_lossy(&buffer[..length]).as_ref()) {
                    last_news = Instant::now();
                }
            }
            Err(error) if matches!(error.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(error) => panic!("recv: {error}"),
        }
    }
    println!("answered {}", count - unanswered.len());
    socket.send(b"quit").expect("send quit");
}

fn blast(bind: &str, peer: SocketAddr, threads: usize, count: usize) {
    let socket = UdpSocket::bind(bind).expect("bind");
    std::thread::scope(|scope| {
        for thread in 0..threads {
            let socket = &socket;
            scope.spawn(move || {
                for seq in 0..count {
                    let datagram = format!("t{thread}-{seq}");
                    let sent = socket.send_to(datagram.as_bytes(), peer).expect("send_to");
                    assert_eq!(sent, datagram.len());
                }
            });
        }
    });
    println!("sent {}", threads * count);
}

fn sink(bind: &str, total: usize) {
    let socket = UdpSocket::bind(bind).expect("bind");
    socket.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    println!("ready");
    let seen = std::sync::Mutex::new((HashSet::new(), 0usize, Instant::now()));
    // Several threads receive on clones of the one socket at once.
    std::thread::scope(|scope| {
        for _ in 0..SINK_THREADS {
            let socket = socket.try_clone().expect("try_clone");
            let seen = &seen;
            scope.spawn(move || {
                let mut buffer = [0u8; 256];
                loop {
                    {
                        let seen = seen.lock().unwrap();
                        if seen.0.len() >= total || seen.2.elapsed() >= QUIET_LIMIT {
                            break;
                        }
                    }
                    match socket.recv_from(&mut buffer) {
                        Ok((length, _)) => {
                            let mut seen = seen.lock().unwrap();
                            seen.2 = Instant::now();
                            if !seen.0.insert(buffer[..length].to_vec()) {
                                seen.1 += 1;
                            }
                        }
                        Err(error)
                            if matches!(
                                error.kind(),
                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                            ) => {}
                        Err(error) => panic!("recv_from: {error}"),
                    }
                }
            });
        }
    });
    let (mut seen, mut duplicates, _) = seen.into_inner().unwrap();
    // Anything delivered twice would come within the server's redelivery time; keep listening.
    let mut buffer = [0u8; 256];
    let linger = Instant::now();
    while linger.elapsed() < Duration::from_secs(6) {
        if let Ok((length, _)) = socket.recv_from(&mut buffer)
            && !seen.insert(buffer[..length].to_vec())
        {
            duplicates += 1;
        }
    }
    println!("distinct {} duplicates {duplicates}", seen.len());
}

static HANDLED: AtomicBool = AtomicBool::new(false);

extern "C" fn close_in_handler(_signal: libc::c_int) {
    // close is async-signal-safe; -1 is never an open fd.
    unsafe { libc::close(-1) };
    HANDLED.store(true, Ordering::SeqCst);
}

fn signal_close(bind: &str) {
    // SAFETY: a plain handler for SIGUSR1, without SA_RESTART.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = close_in_handler as *const () as usize;
        libc::sigemptyset(&mut action.sa_mask);
        assert_eq!(libc::sigaction(libc::SIGUSR1, &action, std::ptr::null_mut()), 0);
    }
    let fd = lingering_socket();
    // SAFETY: this thread's own id.
    let closer = unsafe { libc::pthread_self() };
    let bind = bind.to_owned();
    let binder = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        UdpSocket::bind(&bind).is_ok()
    });
    let signaller = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(600));
        // SAFETY: the main thread is alive until both threads are joined.
        unsafe { libc::pthread_kill(closer, libc::SIGUSR1) };
    });
    // SAFETY: our own fd, closed once.
    unsafe { libc::close(fd) };
    signaller.join().unwrap();
    let bound = binder.join().unwrap();
    println!("handled={} bound={bound}", HANDLED.load(Ordering::SeqCst));
}

/// A connected TCP socket whose close lingers up to 3 s: unsent data its peer (kept open for
/// the process's life) never reads.
fn lingering_socket() -> libc::c_int {
    let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
    let mut stream = TcpStream::connect(listener.local_addr().unwrap()).expect("connect");
    // The peer is kept open and never reads: the close below waits out its linger time.
    let (peer, _) = listener.accept().expect("accept");
    std::mem::forget(peer);
    stream.set_nonblocking(true).unwrap();
    let chunk = vec![7u8; 64 * 1024];
    while stream.write(&chunk).is_ok() {}
    stream.set_nonblocking(false).unwrap();
    let fd = stream.into_raw_fd();
    let linger = libc::linger { l_onoff: 1, l_linger: 3 };
    // SAFETY: SO_LINGER with a linger struct of the right size.
    let set = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(set, 0, "SO_LINGER");
    fd
}

fn fork_during_close(bind: &str) {
    let _first = UdpSocket::bind(bind).expect("bind");
    let fd = lingering_socket();
    // SAFETY: our own fd, closed once.
    let closer = std::thread::spawn(move || unsafe { libc::close(fd) });
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: the child only binds a socket and leaves with _exit.
    let child = unsafe { libc::fork() };
    if child == 0 {
        // A new socket that hears itself: the child's own receive thread must work.
        let heard = UdpSocket::bind(bind).is_ok_and(|socket| {
            let _ = socket.set_read_timeout(Some(Duration::from_secs(5)));
            let mut buffer = [0u8; 16];
            socket.local_addr().is_ok_and(|addr| socket.send_to(b"self", addr).is_ok())
                && socket.recv(&mut buffer).is_ok_and(|length| &buffer[..length] == b"self")
        });
        let code = if heard { 0 } else { 1 };
        // SAFETY: leaving the child without running the parent's exit handlers.
        unsafe { libc::_exit(code) };
    }
    assert!(child > 0, "fork failed");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut status = 0;
    let outcome = loop {
        // SAFETY: waiting for our own child.
        if unsafe { libc::waitpid(child, &mut status, libc::WNOHANG) } == child {
            break if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 { "ok" } else { "failed" };
        }
        if Instant::now() >= deadline {
            // SAFETY: our own child.
            unsafe { libc::kill(child, libc::SIGKILL) };
            break "hung";
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    println!("child={outcome}");
    closer.join().unwrap();
}
