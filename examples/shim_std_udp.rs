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

use std::collections::HashSet;
use std::net::{SocketAddr, UdpSocket};
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
