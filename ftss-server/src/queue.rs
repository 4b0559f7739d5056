//! The durable queue: segment logs under each `--queue-dir`, one identical copy per mirror.
//!
//! ```text
//! queue-dir/seg-<id:016x>.log
//! segment := header record*
//! header  := magic "FTSQ" | version u16 | segment id u64 | crc32c u32
//! record  := fsbridge record framing (tag u8 | len u32 | body | crc32c u32)
//!            tag PACKET: a stored packet (fsbridge packet body)
//!            tag RECEIPT: "done": the packet with this id was receipted and may be reclaimed
//! ```
//!
//! Appends go to every mirror at the same offset and are made durable together by [`Queue::sync`]
//! (one fdatasync per mirror for the whole group). Recovery reads each mirror, keeps the longest valid
//! prefix, truncates torn tails and copies the chosen bytes over mirrors that differ.
//! Packets are read back from disk on delivery, so memory holds only the index, not payloads.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use fsbridge::format::{self, DecodeError, PAYLOAD_BYTES_MAX, TAG_PACKET, TAG_RECEIPT};
use fsbridge::{Packet, PacketId, Record};
use thiserror::Error;

const SEGMENT_MAGIC: [u8; 4] = *b"FTSQ";
const SEGMENT_VERSION: u16 = 1;
const SEGMENT_HEADER_BYTES: usize = 4 + 2 + 8 + 4;
/// A segment is closed and a new one started past this size.
pub const SEGMENT_BYTES_MAX: u64 = 64 * 1024 * 1024;
/// Largest record body in the queue: a packet with its id and addresses.
const RECORD_BODY_BYTES_MAX: usize = PAYLOAD_BYTES_MAX + 256;

/// Errors of the queue; each names the file.
#[derive(Debug, Error)]
pub enum QueueError {
    /// An I/O error on a queue file.
    #[error("{operation} {path}: {source}")]
    Io { operation: &'static str, path: PathBuf, source: io::Error },
    /// A stored record failed its checksum in every mirror.
    #[error("packet at segment {segment} offset {offset} is unreadable in every mirror: {reason}")]
    Unreadable { segment: u64, offset: u64, reason: String },
}

impl From<QueueError> for io::Error {
    fn from(error: QueueError) -> io::Error {
        io::Error::other(error)
    }
}

/// Where a record lives: the same in every mirror.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Location {
    pub segment: u64,
    pub offset: u64,
    pub length: u32,
}

/// What recovery found, in log order.
pub enum Recovered {
    Stored { location: Location, packet: Packet },
    Done { id: PacketId },
}

/// What recovery did, for the log and for status.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct RecoveryReport {
    pub segments: usize,
    pub records: usize,
    pub torn_bytes_truncated: u64,
    pub mirrors_repaired: usize,
}

struct Mirror {
    dir: PathBuf,
    active: Option<File>,
}

/// The mirrored segment log.
pub struct Queue {
    mirrors: Vec<Mirror>,
    /// Segment id → its size in bytes (identical in every mirror).
    segments: BTreeMap<u64, u64>,
    active_segment: u64,
    /// Bytes appended since the last sync, not yet written.
    pending: Vec<u8>,
    /// Read handles, opened on demand.
    readers: BTreeMap<(usize, u64), File>,
}

fn io_error<'a>(operation: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> QueueError + 'a {
    move |source| QueueError::Io { operation, path: path.to_path_buf(), source }
}

fn segment_name(segment: u64) -> String {
    format!("seg-{segment:016x}.log")
}

fn parse_segment_name(name: &str) -> Option<u64> {
    let hex = name.strip_prefix("seg-")?.strip_suffix(".log")?;
    if hex.len() != 16 {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

fn segment_header(segment: u64) -> Vec<u8> {
    let mut header = Vec::with_capacity(SEGMENT_HEADER_BYTES);
    header.extend_from_slice(&SEGMENT_MAGIC);
    header.extend_from_slice(&SEGMENT_VERSION.to_le_bytes());
    header.extend_from_slice(&segment.to_le_bytes());
    let crc = crc32c::crc32c(&header);
    header.extend_from_slice(&crc.to_le_bytes());
    header
}

/// Length of the valid prefix of a segment's bytes (0 if even the header is bad).
fn valid_prefix(bytes: &[u8], segment: u64) -> usize {
    if bytes.len() < SEGMENT_HEADER_BYTES || bytes[..SEGMENT_HEADER_BYTES] != segment_header(segment)[..] {
        return 0;
    }
    let mut offset = SEGMENT_HEADER_BYTES;
    while offset < bytes.len() {
        match read_queue_record(bytes, offset) {
            Ok((_, next)) => offset = next,
            Err(_) => break,
        }
    }
    offset
}

/// Reads and decodes one queue record at `offset`; returns it and the next offset.
fn read_queue_record(bytes: &[u8], offset: usize) -> Result<(Record, usize), DecodeError> {
    let (tag, body, next) = format::read_record(bytes, offset, RECORD_BODY_BYTES_MAX)?;
    if tag != TAG_PACKET && tag != TAG_RECEIPT {
        return Err(DecodeError::InvalidField { offset, field: "queue record tag" });
    }
    Ok((format::decode_body(tag, body, offset + 5)?, next))
}

impl Queue {
    /// Opens (creating if needed) the queue in `dirs`, recovers it and returns what it holds.
    pub fn open(dirs: &[PathBuf]) -> Result<(Queue, Vec<Recovered>, RecoveryReport), QueueError> {
        assert!(!dirs.is_empty(), "at least one queue dir");
        let mut ids = std::collections::BTreeSet::new();
        for dir in dirs {
            fs::create_dir_all(dir).map_err(io_error("creating", dir))?;
            for entry in fs::read_dir(dir).map_err(io_error("listing", dir))?.flatten() {
                if let Some(id) = entry.file_name().to_str().and_then(parse_segment_name) {
                    ids.insert(id);
                }
            }
        }
        let mut report = RecoveryReport::default();
        let mut recovered = Vec::new();
        let mut segments = BTreeMap::new();
        for &segment in &ids {
            let bytes = recover_segment(dirs, segment, &mut report)?;
            let mut offset = SEGMENT_HEADER_BYTES;
            while offset < bytes.len() {
                let (record, next) = read_queue_record(&bytes, offset).expect("valid prefix decodes");
                let location = Location { segment, offset: offset as u64, length: (next - offset) as u32 };
                recovered.push(match record {
                    Record::Packet(packet) => Recovered::Stored { location, packet },
                    Record::Receipt(id) => Recovered::Done { id },
                    Record::Ack(_) => unreachable!("read_queue_record admits only packets and receipts"),
                });
                report.records += 1;
                offset = next;
            }
            segments.insert(segment, bytes.len() as u64);
        }
        report.segments = segments.len();
        let mirrors = dirs.iter().map(|dir| Mirror { dir: dir.clone(), active: None }).collect();
        let active_segment = segments.keys().next_back().copied().unwrap_or(0);
        let mut queue = Queue { mirrors, segments, active_segment, pending: Vec::new(), readers: BTreeMap::new() };
        queue.open_active()?;
        Ok((queue, recovered, report))
    }

    pub fn dirs(&self) -> Vec<PathBuf> {
        self.mirrors.iter().map(|mirror| mirror.dir.clone()).collect()
    }

    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    pub fn bytes(&self) -> u64 {
        self.segments.values().sum()
    }

    /// Opens (creating with a header) the active segment in every mirror.
    fn open_active(&mut self) -> Result<(), QueueError> {
        let segment = self.active_segment;
        let size = *self.segments.entry(segment).or_insert(0);
        let header = segment_header(segment);
        for mirror in &mut self.mirrors {
            let path = mirror.dir.join(segment_name(segment));
            let mut file =
                OpenOptions::new().create(true).append(true).open(&path).map_err(io_error("opening", &path))?;
            if size == 0 {
                file.write_all(&header).map_err(io_error("writing", &path))?;
                file.sync_data().map_err(io_error("syncing", &path))?;
                sync_dir(&mirror.dir)?;
            }
            mirror.active = Some(file);
        }
        if size == 0 {
            self.segments.insert(segment, header.len() as u64);
        }
        Ok(())
    }

    /// Appends a packet (buffered until [`Queue::sync`]); returns where it will live.
    pub fn append(&mut self, record: &Record) -> Location {
        let tag = match record {
            Record::Packet(_) => TAG_PACKET,
            Record::Receipt(_) => TAG_RECEIPT,
            Record::Ack(_) => panic!("acks are not queued"),
        };
        let start = self.pending.len();
        format::write_record(&mut self.pending, tag, |body| format::encode_body(body, record));
        let offset = self.segments[&self.active_segment] + start as u64;
        Location { segment: self.active_segment, offset, length: (self.pending.len() - start) as u32 }
    }

    /// Writes everything appended to every mirror and fdatasyncs each: after this returns Ok, every
    /// appended record is durable on every mirror.
    pub fn sync(&mut self) -> Result<(), QueueError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        for mirror in &mut self.mirrors {
            let path = mirror.dir.join(segment_name(self.active_segment));
            let file = mirror.active.as_mut().expect("active segment open");
            file.write_all(&self.pending).map_err(io_error("writing", &path))?;
            file.sync_data().map_err(io_error("syncing", &path))?;
        }
        *self.segments.get_mut(&self.active_segment).expect("active segment") += self.pending.len() as u64;
        self.pending.clear();
        if self.segments[&self.active_segment] >= SEGMENT_BYTES_MAX {
            self.active_segment += 1;
            self.open_active()?;
        }
        Ok(())
    }

    /// Reads a stored packet back, verifying its checksum; falls back to other mirrors.
    pub fn read_packet(&mut self, location: Location) -> Result<Packet, QueueError> {
        let mut last_reason = String::new();
        for index in 0..self.mirrors.len() {
            match self.read_from_mirror(index, location) {
                Ok(packet) => return Ok(packet),
                Err(reason) => last_reason = reason,
            }
        }
        Err(QueueError::Unreadable { segment: location.segment, offset: location.offset, reason: last_reason })
    }

    fn read_from_mirror(&mut self, index: usize, location: Location) -> Result<Packet, String> {
        let key = (index, location.segment);
        if !self.readers.contains_key(&key) {
            let path = self.mirrors[index].dir.join(segment_name(location.segment));
            let file = File::open(&path).map_err(|error| format!("{}: {error}", path.display()))?;
            self.readers.insert(key, file);
        }
        let mut bytes = vec![0u8; location.length as usize];
        self.readers[&key].read_exact_at(&mut bytes, location.offset).map_err(|error| error.to_string())?;
        match read_queue_record(&bytes, 0) {
            Ok((Record::Packet(packet), _)) => Ok(packet),
            Ok(_) => Err("record is not a packet".into()),
            Err(error) => Err(error.to_string()),
        }
    }

    /// Deletes the oldest segments while `is_live(segment)` is false for them and every older one.
    /// The active segment is never deleted. Returns how many were deleted.
    pub fn reclaim(&mut self, is_live: impl Fn(u64) -> bool) -> Result<usize, QueueError> {
        let mut deleted = 0;
        while let Some((&segment, _)) = self.segments.iter().next() {
            if segment == self.active_segment || is_live(segment) {
                break;
            }
            for (index, mirror) in self.mirrors.iter().enumerate() {
                self.readers.remove(&(index, segment));
                let path = mirror.dir.join(segment_name(segment));
                match fs::remove_file(&path) {
                    Err(error) if error.kind() != io::ErrorKind::NotFound => {
                        return Err(io_error("removing", &path)(error));
                    }
                    _ => {}
                }
                sync_dir(&mirror.dir)?;
            }
            self.segments.remove(&segment);
            deleted += 1;
        }
        Ok(deleted)
    }
}

fn sync_dir(dir: &Path) -> Result<(), QueueError> {
    File::open(dir).and_then(|file| file.sync_all()).map_err(io_error("syncing", dir))
}

/// Reads one segment from every mirror, picks the longest valid copy, truncates torn tails and
/// rewrites mirrors whose bytes differ. Returns the chosen valid bytes.
fn recover_segment(dirs: &[PathBuf], segment: u64, report: &mut RecoveryReport) -> Result<Vec<u8>, QueueError> {
    let mut copies = Vec::new();
    for dir in dirs {
        let path = dir.join(segment_name(segment));
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(error) => return Err(io_error("reading", &path)(error)),
        };
        let valid = valid_prefix(&bytes, segment);
        copies.push((path, bytes, valid));
    }
    let best = copies.iter().max_by_key(|(_, _, valid)| *valid).expect("one mirror at least");
    let mut chosen = best.1[..best.2].to_vec();
    if chosen.is_empty() {
        chosen = segment_header(segment);
    }
    report.torn_bytes_truncated += (best.1.len() - best.2) as u64;
    for (path, bytes, _) in &copies {
        if *bytes != chosen {
            if bytes.starts_with(&chosen) {
                let file = OpenOptions::new().write(true).open(path).map_err(io_error("opening", path))?;
                file.set_len(chosen.len() as u64).map_err(io_error("truncating", path))?;
                file.sync_all().map_err(io_error("syncing", path))?;
            } else {
                fs::write(path, &chosen).map_err(io_error("repairing", path))?;
                File::open(path).and_then(|file| file.sync_all()).map_err(io_error("syncing", path))?;
                report.mirrors_repaired += 1;
            }
        }
    }
    Ok(chosen)
}

/// Verifies every segment in every mirror; repairs mirrors from the longest valid copy.
pub fn scrub(dirs: &[PathBuf]) -> Result<RecoveryReport, QueueError> {
    let (queue, _recovered, report) = Queue::open(dirs)?;
    drop(queue);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fsbridge::NodeName;

    fn temp_dirs(count: usize) -> Vec<PathBuf> {
        let base = std::env::temp_dir().join(format!("ftss-queue-{}-{}", std::process::id(), fsbridge::random_u64()));
        (0..count).map(|index| base.join(format!("m{index}"))).collect()
    }

    fn packet(seq: u64) -> Packet {
        Packet {
            id: PacketId { origin: NodeName::new("a").unwrap(), epoch: 1, seq },
            source: "10.77.0.1:1000".parse().unwrap(),
            destination: "10.77.0.2:2000".parse().unwrap(),
            sent_unix_us: seq,
            payload: vec![seq as u8; 100],
        }
    }

    #[test]
    fn append_sync_recover_and_read() {
        let dirs = temp_dirs(2);
        let (mut queue, recovered, _) = Queue::open(&dirs).unwrap();
        assert!(recovered.is_empty());
        let locations: Vec<_> = (1..=10).map(|seq| queue.append(&Record::Packet(packet(seq)))).collect();
        queue.append(&Record::Receipt(packet(3).id));
        queue.sync().unwrap();
        assert_eq!(queue.read_packet(locations[4]).unwrap(), packet(5));
        drop(queue);
        let (mut queue, recovered, report) = Queue::open(&dirs).unwrap();
        assert_eq!(report.records, 11);
        assert_eq!(recovered.len(), 11);
        assert!(matches!(&recovered[10], Recovered::Done { id } if *id == packet(3).id));
        assert_eq!(queue.read_packet(locations[9]).unwrap(), packet(10));
    }

    #[test]
    fn torn_tail_is_truncated_and_bad_mirror_repaired() {
        let dirs = temp_dirs(2);
        let (mut queue, _, _) = Queue::open(&dirs).unwrap();
        let location = queue.append(&Record::Packet(packet(1)));
        queue.append(&Record::Packet(packet(2)));
        queue.sync().unwrap();
        drop(queue);
        let path0 = dirs[0].join(segment_name(0));
        let path1 = dirs[1].join(segment_name(0));
        let full = fs::read(&path0).unwrap();
        // Mirror 0: a torn tail (half of the last record). Mirror 1: a flipped byte in record 1.
        fs::write(&path0, &full[..full.len() - 20]).unwrap();
        let mut flipped = full.clone();
        flipped[location.offset as usize + 30] ^= 0xFF;
        fs::write(&path1, &flipped).unwrap();
        let (mut queue, recovered, report) = Queue::open(&dirs).unwrap();
        // Mirror 0 has the longer valid prefix (record 1 intact); record 2 is lost in both copies
        // only because we tore it from the only good copy.
        assert_eq!(recovered.len(), 1);
        assert_eq!(report.mirrors_repaired, 1);
        assert_eq!(queue.read_packet(location).unwrap(), packet(1));
        assert_eq!(fs::read(&path0).unwrap(), fs::read(&path1).unwrap());
    }

    #[test]
    fn read_falls_back_to_the_good_mirror() {
        let dirs = temp_dirs(2);
        let (mut queue, _, _) = Queue::open(&dirs).unwrap();
        let location = queue.append(&Record::Packet(packet(7)));
        queue.sync().unwrap();
        let path0 = dirs[0].join(segment_name(0));
        let mut bytes = fs::read(&path0).unwrap();
        bytes[location.offset as usize + 40] ^= 0x01;
        fs::write(&path0, &bytes).unwrap();
        assert_eq!(queue.read_packet(location).unwrap(), packet(7));
    }
}
