//! Mutation fuzzing of every fsbridge decoder, seeded from `fuzz/corpus/` (valid files of every
//! kind). Runs for `FTSS_FUZZ_SECONDS` (default 10) per decoder; CI runs it on every change.
//!
//! Properties: no input panics or allocates beyond the input; whatever decodes re-encodes to bytes
//! that decode to the same value; every seed decodes.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use fsbridge::format::{self, BatchEncoder, decode_batch};
use fsbridge::{Batch, Record};

fn corpus_of(kind: &str) -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(kind);
    let mut seeds: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|error| panic!("{}: {error}", dir.display()))
        .flatten()
        .map(|entry| (entry.file_name().to_string_lossy().into_owned(), std::fs::read(entry.path()).unwrap()))
        .collect();
    seeds.sort();
    assert!(seeds.len() >= 2, "seed corpus {kind} too small");
    seeds
}

fn corpus() -> Vec<(String, Vec<u8>)> {
    corpus_of("batch")
}

fn budget() -> Duration {
    let seconds = std::env::var("FTSS_FUZZ_SECONDS").ok().and_then(|text| text.parse().ok()).unwrap_or(10.0);
    Duration::from_secs_f64(seconds)
}

/// xorshift64*: small, fast, reproducible from the printed seed.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, bound: usize) -> usize {
        if bound == 0 { 0 } else { (self.next() % bound as u64) as usize }
    }
}

/// One random edit of the kinds that find decoder bugs: bit flips, interesting values, length
/// fields set to extremes, insertions, deletions, truncation, splicing another seed in.
fn mutate(bytes: &mut Vec<u8>, random: &mut Random, seeds: &[(String, Vec<u8>)]) {
    let len = bytes.len();
    match random.below(8) {
        0 if len > 0 => {
            let at = random.below(len);
            bytes[at] ^= 1 << random.below(8);
        }
        1 if len > 0 => {
            let at = random.below(len);
            bytes[at] = [0, 1, 0x7F, 0x80, 0xEE, 0xFF][random.below(6)];
        }
        2 if len >= 4 => {
            let at = random.below(len - 3);
            let value: u32 = [0, 1, 0xFFFF, 0x7FFF_FFFF, u32::MAX, len as u32][random.below(6)];
            bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
        }
        3 => {
            let at = random.below(len + 1);
            let count = 1 + random.below(16);
            for _ in 0..count {
                bytes.insert(at, random.next() as u8);
            }
        }
        4 if len > 0 => {
            let at = random.below(len);
            let end = (at + 1 + random.below(16)).min(len);
            bytes.drain(at..end);
        }
        5 => bytes.truncate(random.below(len + 1)),
        6 => {
            let other = &seeds[random.below(seeds.len())].1;
            let from = random.below(other.len());
            let take = random.below(other.len() - from + 1);
            let at = random.below(len + 1);
            bytes.splice(at..at, other[from..from + take].iter().copied());
        }
        _ => {}
    }
}

fn reencode(batch: &Batch) -> Vec<u8> {
    let mut encoder = BatchEncoder::new(&batch.header);
    for record in &batch.records {
        encoder.push(record);
    }
    encoder.finish()
}

/// Runs `check` on mutants of every seed for the time budget; returns how many inputs it tried.
fn fuzz(name: &str, seeds: Vec<(String, Vec<u8>)>, mut check: impl FnMut(&[u8])) -> u64 {
    let seed = std::env::var("FTSS_FUZZ_SEED").ok().and_then(|text| text.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1
    });
    eprintln!("fuzzing {name} with FTSS_FUZZ_SEED={seed}");
    let mut random = Random(seed);
    let deadline = Instant::now() + budget();
    let mut runs = 0u64;
    while Instant::now() < deadline {
        for _ in 0..256 {
            let mut input = seeds[random.below(seeds.len())].1.clone();
            for _ in 0..1 + random.below(6) {
                mutate(&mut input, &mut random, &seeds);
            }
            check(&input);
            runs += 1;
        }
    }
    eprintln!("{name}: {runs} inputs");
    runs
}

#[test]
fn every_seed_decodes() {
    for (name, bytes) in corpus() {
        let batch = decode_batch(&bytes).unwrap_or_else(|error| panic!("seed {name}: {error}"));
        assert_eq!(decode_batch(&reencode(&batch)).unwrap(), batch, "seed {name} does not round-trip");
    }
}

#[test]
fn fuzz_decode_batch() {
    let runs = fuzz("decode_batch", corpus(), |input| {
        if let Ok(batch) = decode_batch(input) {
            let again = decode_batch(&reencode(&batch)).expect("a decoded batch re-encodes to a valid batch");
            assert_eq!(again, batch);
        }
    });
    assert!(runs > 1000);
}

#[test]
fn fuzz_record_and_body_decoders() {
    let runs = fuzz("read_record/decode_body/decode_packet/decode_packet_id_prefix", corpus(), |input| {
        let _ = format::read_record(input, 0, input.len());
        for tag in [format::TAG_PACKET, format::TAG_ACK, format::TAG_RECEIPT, 0x42] {
            if let Ok(record) = format::decode_body(tag, input, 0) {
                let mut body = Vec::new();
                format::encode_body(&mut body, &record);
                assert_eq!(format::decode_body(tag, &body, 0).unwrap(), record);
            }
        }
        if let Ok(packet) = format::decode_packet(input, 0) {
            let mut body = Vec::new();
            format::encode_body(&mut body, &Record::Packet(packet.clone()));
            assert_eq!(format::decode_packet(&body, 0).unwrap(), packet);
        }
        if let Ok((id, used)) = format::decode_packet_id_prefix(input) {
            assert!(used <= input.len());
            let mut bytes = Vec::new();
            format::encode_packet_id(&mut bytes, &id);
            assert_eq!(&bytes[..], &input[..used]);
        }
    });
    assert!(runs > 1000);
}

#[test]
fn fuzz_node_registration() {
    // node.toml is written by nodes and read by the server: it must never panic either.
    let runs = fuzz("node.toml", corpus_of("node_toml"), |input| {
        if let Ok(text) = std::str::from_utf8(input) {
            let _ = toml::from_str::<fsbridge::NodeConfig>(text);
        }
    });
    assert!(runs > 100);
}

/// Seeds for the fabric frame decoder: one frame of every type, batch frames wrapping the batch
/// corpus, and two frames back to back.
fn frame_seeds() -> Vec<(String, Vec<u8>)> {
    use fsbridge::fabric::{Frame, Hello};
    let hello = Hello {
        version: 1,
        node: fsbridge::NodeName::new("node-a").unwrap(),
        addr: "10.77.0.1".parse().unwrap(),
        epoch: 7,
        nonce: [1; 32],
        proof: [2; 32],
    };
    let mut frames = vec![
        Frame::Challenge { version: 1, nonce: [3; 32] },
        Frame::Hello(hello),
        Frame::Welcome { proof: [4; 32] },
        Frame::Refused { reason: "authentication failed".into() },
        Frame::Ports(vec![9000, 53, 65535]),
    ];
    for (name, batch) in corpus() {
        frames.push(match name.split('-').next() {
            Some("acks") => Frame::Acks(batch),
            Some("receipts") => Frame::Receipts(batch),
            _ => Frame::Packets(batch),
        });
    }
    let mut seeds: Vec<(String, Vec<u8>)> =
        frames.iter().enumerate().map(|(index, frame)| (format!("frame-{index}"), frame.encode())).collect();
    let mut pair = frames[0].encode();
    pair.extend(frames[4].encode());
    seeds.push(("two-frames".into(), pair));
    seeds
}

#[test]
fn fuzz_fabric_frames() {
    use fsbridge::fabric::{Frame, read_frame};
    let runs = fuzz("fabric read_frame", frame_seeds(), |input| {
        let mut reader = input;
        // A stream may hold several frames: read until the first error, as a connection does.
        while let Ok(frame) = read_frame(&mut reader) {
            let bytes = frame.encode();
            assert_eq!(read_frame(&mut &bytes[..]).unwrap(), frame, "a decoded frame re-encodes to itself");
            if let Frame::Packets(batch) | Frame::Acks(batch) | Frame::Receipts(batch) = &frame {
                let _ = decode_batch(batch);
            }
        }
    });
    assert!(runs > 1000);
}

/// Regenerates the seed corpus: `cargo test -p fsbridge --test fuzz -- --ignored write_seed_corpus`.
#[test]
#[ignore]
fn write_seed_corpus() {
    use fsbridge::{Ack, AckState, BatchHeader, BatchKind, NodeName, Packet, PacketId};
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let node = NodeName::new("node-a").unwrap();
    let id = |seq| PacketId { origin: node.clone(), epoch: 0x1234_5678_9ABC_DEF0, seq };
    let packet = |seq: u64, payload: Vec<u8>| Packet {
        id: id(seq),
        source: "10.77.0.1:4000".parse().unwrap(),
        destination: "10.77.0.2:9000".parse().unwrap(),
        sent_unix_us: 1_795_600_000_000_000 + seq,
        payload,
    };
    let header = |kind| BatchHeader { kind, node: node.clone(), epoch: 0x1234_5678_9ABC_DEF0, batch_seq: 7, flags: 0 };
    let mut seeds: Vec<(&str, Vec<u8>)> = Vec::new();
    let mut encoder = BatchEncoder::new(&header(BatchKind::Packets));
    encoder.push(&Record::Packet(packet(1, b"hello\n".to_vec())));
    seeds.push(("packets-one", encoder.finish()));
    let mut encoder = BatchEncoder::new(&header(BatchKind::Packets));
    for seq in 1..=5 {
        encoder.push(&Record::Packet(packet(seq, vec![seq as u8; seq as usize * 40])));
    }
    encoder.push(&Record::Packet(packet(6, Vec::new())));
    seeds.push(("packets-several", encoder.finish()));
    seeds.push(("packets-none", BatchEncoder::new(&header(BatchKind::Packets)).finish()));
    let mut encoder = BatchEncoder::new(&header(BatchKind::Acks));
    encoder.push(&Record::Ack(Ack { id: id(1), state: AckState::Stored, reason: String::new() }));
    encoder.push(&Record::Ack(Ack { id: id(2), state: AckState::Rejected, reason: "no node registered".into() }));
    seeds.push(("acks", encoder.finish()));
    let mut encoder = BatchEncoder::new(&header(BatchKind::Receipts));
    encoder.push(&Record::Receipt(id(1)));
    encoder.push(&Record::Receipt(id(2)));
    seeds.push(("receipts", encoder.finish()));
    std::fs::create_dir_all(dir.join("batch")).unwrap();
    for (name, bytes) in seeds {
        std::fs::write(dir.join("batch").join(name), bytes).unwrap();
    }
    std::fs::create_dir_all(dir.join("node_toml")).unwrap();
    std::fs::write(dir.join("node_toml/plain"), "addr = \"10.77.0.2\"\n").unwrap();
    std::fs::write(dir.join("node_toml/comment"), "# node b\naddr = '10.77.255.254' # fabric\n").unwrap();
}
