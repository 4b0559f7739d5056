//! Doorbells: how a node learns of new inbox and ack files without listing a directory.
//!
//! On NFS a directory listing can be stale for a long time: the Linux client caches a directory's
//! attributes and entries (up to `acdirmax`, 60 s by default), and NFS gateways such as
//! nfs-ganesha cache what changes behind them (the array's server writes the export's directory
//! directly). Two reads do reach the file on the server every time, measured in the lab
//! (`tests/lab.rs`, `measure_visibility`) against ganesha with its default caches:
//! - an `O_DIRECT` read of a known file at an offset (a buffered read there stayed stale);
//! - a rename of a file by its known name.
//!
//! So each server writer appends one 32-byte record to the node's bell for every inbox or ack file
//! it publishes, and the node's shim reads its bells with `O_DIRECT` from where it left off, then
//! claims the named files by rename. Listings remain only as a slow, periodic sweep for anything a
//! bell missed.
//!
//! `nodes/<node>/bell/<writer>`: a 32-byte header, then 32-byte records.
//! - header: `FTBL`, version (u16), 2 zero bytes, generation (u64), 12 zero bytes, CRC32C of the
//!   first 28 bytes;
//! - record: kind (u8), a zero byte, port (u16), epoch (u64), seq (u64), 8 zero bytes, CRC32C of
//!   the first 28 bytes. The file it names is `batch_file_name(epoch, seq, ..)` in the port's inbox
//!   (`Packets`) or the node's ack spool (`Acks`); `Moved` says the bell was replaced by a new
//!   generation (open it again by name).
//!
//! A bell is advisory and written without syncs: a record lost in a crash only delays a file until
//! the sweep finds it, and the packets it holds stay in the server's queue until receipted.
//! Integers are little-endian.

use crate::disk::File;

use crate::fsops::{self as fs, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::log::read_at_most;
use crate::spool::{self, SpoolError};

/// Bytes of the header and of each record.
pub const BELL_RECORD_BYTES: usize = 32;
/// A bell is replaced by a new generation once it holds this many bytes (32 768 records).
pub const BELL_BYTES_MAX: u64 = 1 << 20;
/// Records a reader takes in one read (bounds its buffer: 64 KiB).
const RECORDS_PER_READ_MAX: usize = 2048;
/// Records a reader opening a bell looks back at (files announced shortly before it started that
/// may still wait for it; older ones are left to the sweep).
pub const BELL_BACKLOG_RECORDS: u64 = 1024;
/// Records of a full bell written again at the start of its next generation.
const BELL_CARRIED_RECORDS: u64 = 1024;
/// `O_DIRECT` wants buffers, offsets and lengths aligned to the device's block (at most 4 KiB).
const DIRECT_ALIGN: usize = 4096;

const MAGIC: &[u8; 4] = b"FTBL";
const VERSION: u16 = 1;

/// What a bell record announces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RingKind {
    /// A packet batch file in the inbox of `port`.
    Packets,
    /// An ack file for the sending process whose epoch is `epoch` (port 0).
    Acks,
    /// This bell was replaced: open it again by name.
    Moved,
}

impl RingKind {
    fn code(self) -> u8 {
        match self {
            RingKind::Packets => 1,
            RingKind::Acks => 2,
            RingKind::Moved => 3,
        }
    }

    fn from_code(code: u8) -> Option<RingKind> {
        match code {
            1 => Some(RingKind::Packets),
            2 => Some(RingKind::Acks),
            3 => Some(RingKind::Moved),
            _ => None,
        }
    }
}

/// One record: a file that was published, named by `batch_file_name(epoch, seq, ..)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Ring {
    pub kind: RingKind,
    pub port: u16,
    pub epoch: u64,
    pub seq: u64,
}

/// Why a bell could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum BellError {
    /// The file's first 32 bytes are not a bell header.
    #[error("{path} is not a bell (bad header)")]
    BadHeader { path: PathBuf },
    /// Opening, reading or writing failed.
    #[error("{operation} bell {path}: {source}")]
    Io { operation: &'static str, path: PathBuf, source: io::Error },
    /// Creating the new generation failed.
    #[error(transparent)]
    Spool(#[from] SpoolError),
}

impl From<BellError> for io::Error {
    fn from(error: BellError) -> io::Error {
        match error {
            BellError::Io { source, .. } => source,
            other => io::Error::other(other.to_string()),
        }
    }
}

fn seal(bytes: &mut [u8; BELL_RECORD_BYTES]) {
    let crc = crc32c::crc32c(&bytes[..28]);
    bytes[28..].copy_from_slice(&crc.to_le_bytes());
}

fn sealed(bytes: &[u8]) -> bool {
    bytes.len() == BELL_RECORD_BYTES && crc32c::crc32c(&bytes[..28]).to_le_bytes() == bytes[28..32]
}

/// The header of a bell of `generation`.
pub fn encode_header(generation: u64) -> [u8; BELL_RECORD_BYTES] {
    let mut bytes = [0u8; BELL_RECORD_BYTES];
    bytes[..4].copy_from_slice(MAGIC);
    bytes[4..6].copy_from_slice(&VERSION.to_le_bytes());
    bytes[8..16].copy_from_slice(&generation.to_le_bytes());
    seal(&mut bytes);
    bytes
}

/// The generation of a header; `None` if `bytes` is not one.
pub fn decode_header(bytes: &[u8]) -> Option<u64> {
    let valid = sealed(bytes) && &bytes[..4] == MAGIC && bytes[4..6] == VERSION.to_le_bytes();
    valid.then(|| u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes")))
}

pub fn encode_ring(ring: &Ring) -> [u8; BELL_RECORD_BYTES] {
    let mut bytes = [0u8; BELL_RECORD_BYTES];
    bytes[0] = ring.kind.code();
    bytes[2..4].copy_from_slice(&ring.port.to_le_bytes());
    bytes[4..12].copy_from_slice(&ring.epoch.to_le_bytes());
    bytes[12..20].copy_from_slice(&ring.seq.to_le_bytes());
    seal(&mut bytes);
    bytes
}

/// A record; `None` if `bytes` is not a sealed record of a known kind.
pub fn decode_ring(bytes: &[u8]) -> Option<Ring> {
    if !sealed(bytes) {
        return None;
    }
    Some(Ring {
        kind: RingKind::from_code(bytes[0])?,
        port: u16::from_le_bytes(bytes[2..4].try_into().expect("2 bytes")),
        epoch: u64::from_le_bytes(bytes[4..12].try_into().expect("8 bytes")),
        seq: u64::from_le_bytes(bytes[12..20].try_into().expect("8 bytes")),
    })
}

/// The server's end of one bell: appends records, one write a batch, and starts a new generation
/// when the file is full. One writer a bell (a server partition's active instance).
pub struct BellWriter {
    path: PathBuf,
    file: File,
    len: u64,
}

impl BellWriter {
    /// Starts a new generation of the bell at `path` (a reader holding the old one is told by a
    /// `Moved` record, or sees the new generation when it opens the name again).
    pub fn create(path: &Path) -> Result<BellWriter, BellError> {
        BellWriter::create_carrying(path, &[])
    }

    /// Starts a new generation that begins with `carried` (whole records of the old one): a
    /// reader that opens the bell by name each time never sees the end of the old generation,
    /// so its last records are written again at the start of the new one (a reader that saw
    /// them only finds the named files gone).
    fn create_carrying(path: &Path, carried: &[u8]) -> Result<BellWriter, BellError> {
        debug_assert_eq!(carried.len() % BELL_RECORD_BYTES, 0);
        let dir = path.parent().expect("a bell lives in a directory");
        fs::create_dir_all(dir).map_err(|source| BellError::Io {
            operation: "creating the directory of",
            path: path.into(),
            source,
        })?;
        let name = path.file_name().expect("file name").to_string_lossy();
        let tmp = dir.join(format!(".{name}.{}.{:x}", std::process::id(), crate::random_u64()));
        let mut bytes = encode_header(crate::random_u64()).to_vec();
        bytes.extend_from_slice(carried);
        spool::write_file_durably(&tmp, &bytes)?;
        let old = OpenOptions::new().append(true).open(path).ok();
        fs::rename(&tmp, path).map_err(|source| {
            let _ = fs::remove_file(&tmp);
            BellError::Io { operation: "publishing", path: path.into(), source }
        })?;
        // Only once the new generation is in place: a Moved record must always lead somewhere.
        if let Some(old) = old {
            let moved = Ring { kind: RingKind::Moved, port: 0, epoch: 0, seq: 0 };
            let _ = old.write_all_at(&encode_ring(&moved), old.metadata().map(|meta| meta.len).unwrap_or(0));
        }
        let file = OpenOptions::new().read(true).write(true).open(path).map_err(|source| BellError::Io {
            operation: "opening",
            path: path.into(),
            source,
        })?;
        Ok(BellWriter { path: path.to_path_buf(), file, len: bytes.len() as u64 })
    }

    /// Opens the bell at `path` to append to it (a restarted server, or the instance taking over
    /// a partition), or starts a new generation when there is none or it is damaged or full.
    pub fn open(path: &Path) -> Result<BellWriter, BellError> {
        let existing = OpenOptions::new().read(true).write(true).open(path).ok().and_then(|file| {
            let mut header = [0u8; BELL_RECORD_BYTES];
            let len = file.metadata().ok()?.len;
            file.read_exact_at(&mut header, 0).ok()?;
            decode_header(&header)?;
            // A record a crashed writer left torn stays behind as a gap readers skip.
            let len = len.div_ceil(BELL_RECORD_BYTES as u64) * BELL_RECORD_BYTES as u64;
            (len < BELL_BYTES_MAX).then_some((file, len))
        });
        match existing {
            Some((file, len)) => Ok(BellWriter { path: path.to_path_buf(), file, len }),
            None => BellWriter::create(path),
        }
    }

    /// Appends `rings` in one write; replaces the bell by a new generation first when it is full.
    pub fn ring(&mut self, rings: &[Ring]) -> Result<(), BellError> {
        if rings.is_empty() {
            return Ok(());
        }
        if self.len + (rings.len() * BELL_RECORD_BYTES) as u64 > BELL_BYTES_MAX {
            let records = (self.len / BELL_RECORD_BYTES as u64).saturating_sub(1).min(BELL_CARRIED_RECORDS);
            let mut carried = vec![0u8; records as usize * BELL_RECORD_BYTES];
            let from = self.len - carried.len() as u64;
            if self.file.read_exact_at(&mut carried, from).is_err() {
                carried.clear();
            }
            *self = BellWriter::create_carrying(&self.path, &carried)?;
        }
        let mut bytes = Vec::with_capacity(rings.len() * BELL_RECORD_BYTES);
        for ring in rings {
            bytes.extend_from_slice(&encode_ring(ring));
        }
        self.file.write_all_at(&bytes, self.len).map_err(|source| BellError::Io {
            operation: "writing",
            path: self.path.clone(),
            source,
        })?;
        self.len += bytes.len() as u64;
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A buffer aligned for `O_DIRECT`.
struct AlignedBuffer {
    bytes: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuffer {
    fn new(len: usize) -> AlignedBuffer {
        let bytes = vec![0u8; len + DIRECT_ALIGN];
        let start = bytes.as_ptr().align_offset(DIRECT_ALIGN);
        AlignedBuffer { bytes, start, len }
    }

    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.bytes[self.start..self.start + self.len]
    }

    fn as_ref(&self) -> &[u8] {
        &self.bytes[self.start..self.start + self.len]
    }
}

/// A node's end of one bell: reads new records with `O_DIRECT` (plain reads where the file system
/// refuses it, as tmpfs and some FUSE file systems do), following new generations.
pub struct BellReader {
    path: PathBuf,
    file: Option<File>,
    direct: bool,
    generation: u64,
    /// Offset of the next record to read.
    offset: u64,
    buffer: AlignedBuffer,
    /// Close the file after each poll (a process that must not hold fds the app could close).
    transient: bool,
}

impl BellReader {
    pub fn new(path: PathBuf) -> BellReader {
        BellReader::with_transient_fd(path, false)
    }

    /// A reader that holds no fd between polls (the shim: an app's `close_range` could close it).
    pub fn with_transient_fd(path: PathBuf, transient: bool) -> BellReader {
        BellReader {
            transient,
            path,
            file: None,
            direct: true,
            generation: 0,
            offset: 0,
            buffer: AlignedBuffer::new(RECORDS_PER_READ_MAX * BELL_RECORD_BYTES + DIRECT_ALIGN),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads `len` bytes at `at` (fewer at the end of the file); returns where they are in the
    /// buffer.
    fn read_at(&mut self, at: u64, len: usize) -> io::Result<Range<usize>> {
        let file = self.file.as_ref().expect("open");
        if !self.direct {
            let read = read_at_most(file, &mut self.buffer.as_mut()[..len], at)?;
            return Ok(0..read);
        }
        let aligned = at - at % DIRECT_ALIGN as u64;
        let skip = (at - aligned) as usize;
        let span = (skip + len).div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN;
        match read_at_most(file, &mut self.buffer.as_mut()[..span], aligned) {
            Ok(read) => Ok(skip.min(read)..read.min(skip + len)),
            Err(error) if error.raw_os_error() == Some(libc::EINVAL) => {
                // This file system takes no direct reads after all: read it plainly from now on.
                self.direct = false;
                self.file = None;
                Err(error)
            }
            Err(error) => Err(error),
        }
    }

    fn open(&mut self) -> Result<(), BellError> {
        let mut options = OpenOptions::new();
        options.read(true);
        let opened = if self.direct {
            match options.clone().custom_flags(libc::O_DIRECT).open(&self.path) {
                Err(error) if error.raw_os_error() == Some(libc::EINVAL) => {
                    self.direct = false;
                    options.open(&self.path)
                }
                other => other,
            }
        } else {
            options.open(&self.path)
        };
        let file = opened.map_err(|source| BellError::Io { operation: "opening", path: self.path.clone(), source })?;
        self.file = Some(file);
        Ok(())
    }

    /// Opens the bell by name again; when it is a new generation, reading starts over at its
    /// first records (the last `BELL_BACKLOG_RECORDS` of it when `backlog`, else all of them).
    fn reopen(&mut self, backlog: bool) -> Result<(), BellError> {
        self.file = None;
        self.open()?;
        let header = match self.read_at(0, BELL_RECORD_BYTES) {
            Ok(range) => decode_header(&self.buffer.as_ref()[range]),
            Err(_) if self.file.is_none() => {
                self.open()?;
                let range = self.read_at(0, BELL_RECORD_BYTES).unwrap_or(0..0);
                decode_header(&self.buffer.as_ref()[range])
            }
            Err(source) => return Err(BellError::Io { operation: "reading", path: self.path.clone(), source }),
        };
        let generation = header.ok_or_else(|| BellError::BadHeader { path: self.path.clone() })?;
        if generation != self.generation || self.offset == 0 {
            self.generation = generation;
            self.offset = BELL_RECORD_BYTES as u64;
            if backlog {
                let len = self.file.as_ref().expect("open").metadata().map(|meta| meta.len).unwrap_or(0);
                let records = len.saturating_sub(BELL_RECORD_BYTES as u64) / BELL_RECORD_BYTES as u64;
                self.offset += records.saturating_sub(BELL_BACKLOG_RECORDS) * BELL_RECORD_BYTES as u64;
            }
        }
        Ok(())
    }

    /// Looks back at the last `BELL_BACKLOG_RECORDS` records again (a socket bound a new port: files
    /// announced for it before it was bound may still wait).
    pub fn rewind_backlog(&mut self) {
        self.offset = 0;
    }

    /// Records written since the last call, in order. `recheck` opens the bell by name again
    /// (a periodic check for a generation started without a `Moved` record, by a server that
    /// crashed).
    pub fn poll(&mut self, recheck: bool, out: &mut Vec<Ring>) -> Result<(), BellError> {
        let result = self.poll_open(recheck, out);
        if self.transient {
            self.file = None;
        }
        result
    }

    fn poll_open(&mut self, recheck: bool, out: &mut Vec<Ring>) -> Result<(), BellError> {
        if self.file.is_none() || recheck || self.offset == 0 {
            // A transient reader comes here every time: the header says whether the name now
            // holds a new generation.
            self.reopen(self.generation == 0 || self.offset == 0)?;
        }
        for _ in 0..2 {
            let offset = self.offset;
            let range = match self.read_at(offset, RECORDS_PER_READ_MAX * BELL_RECORD_BYTES) {
                Ok(range) => range,
                Err(error) if spool::is_gone(&error) || self.file.is_none() => {
                    // Replaced under us (ESTALE) or no direct reads: open the name again.
                    self.reopen(false)?;
                    continue;
                }
                Err(source) => return Err(BellError::Io { operation: "reading", path: self.path.clone(), source }),
            };
            let bytes = &self.buffer.as_ref()[range];
            let mut moved = false;
            let mut taken = 0;
            for chunk in bytes.chunks(BELL_RECORD_BYTES) {
                if chunk.len() < BELL_RECORD_BYTES {
                    break; // A record still being written.
                }
                match decode_ring(chunk) {
                    Some(ring) if ring.kind == RingKind::Moved => {
                        moved = true;
                        break;
                    }
                    Some(ring) => out.push(ring),
                    // Torn: the end of what is written so far, unless records follow (damage in the
                    // middle, or the gap a crashed writer left, is skipped).
                    None if bytes.len() < taken + 2 * BELL_RECORD_BYTES => break,
                    None => {}
                }
                taken += BELL_RECORD_BYTES;
            }
            self.offset = offset + taken as u64;
            if !moved {
                return Ok(());
            }
            let generation = self.generation;
            self.reopen(false)?;
            if self.generation == generation {
                // A Moved record with no new generation behind it (a writer that failed to
                // replace the bell, then appended again): step past it.
                self.offset += BELL_RECORD_BYTES as u64;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn temp_dir(tag: &str) -> PathBuf {
        crate::test_dir(&format!("bell-{tag}"))
    }

    fn ring(port: u16, seq: u64) -> Ring {
        Ring { kind: RingKind::Packets, port, epoch: 7, seq }
    }

    #[test]
    fn records_round_trip_and_damage_is_refused() {
        let record = ring(5353, 42);
        let bytes = encode_ring(&record);
        assert_eq!(decode_ring(&bytes), Some(record));
        let mut damaged = bytes;
        damaged[13] ^= 1;
        assert_eq!(decode_ring(&damaged), None);
        assert_eq!(decode_header(&encode_header(9)), Some(9));
        assert_eq!(decode_header(&bytes), None);
    }

    #[test]
    fn a_reader_sees_each_record_once_across_generations() {
        let dir = temp_dir("generations");
        let path = dir.join("p0");
        let mut writer = BellWriter::create(&path).unwrap();
        let mut reader = BellReader::new(path.clone());
        let mut seen = Vec::new();
        reader.poll(false, &mut seen).unwrap();
        assert!(seen.is_empty());
        writer.ring(&[ring(1, 1), ring(1, 2)]).unwrap();
        reader.poll(false, &mut seen).unwrap();
        assert_eq!(seen, vec![ring(1, 1), ring(1, 2)]);
        // A new generation (a restarted server): the Moved record sends the reader to it.
        let mut writer = BellWriter::create(&path).unwrap();
        writer.ring(&[ring(2, 3)]).unwrap();
        reader.poll(false, &mut seen).unwrap();
        assert_eq!(seen, vec![ring(1, 1), ring(1, 2), ring(2, 3)]);
        // A generation started with no Moved record (the old file gone): found by a recheck.
        fs::remove_file(&path).unwrap();
        let mut writer = BellWriter::create(&path).unwrap();
        writer.ring(&[ring(3, 4)]).unwrap();
        reader.poll(true, &mut seen).unwrap();
        assert_eq!(seen.last(), Some(&ring(3, 4)));
        assert_eq!(seen.len(), 4);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_full_bell_starts_a_new_generation() {
        let dir = temp_dir("full");
        let path = dir.join("p0");
        let mut writer = BellWriter::create(&path).unwrap();
        let mut reader = BellReader::new(path.clone());
        let mut seen = Vec::new();
        let total = (BELL_BYTES_MAX as usize / BELL_RECORD_BYTES) + 100;
        for chunk in (0..total as u64).collect::<Vec<_>>().chunks(500) {
            let rings: Vec<Ring> = chunk.iter().map(|seq| ring(9, *seq)).collect();
            writer.ring(&rings).unwrap();
            reader.poll(false, &mut seen).unwrap();
        }
        reader.poll(false, &mut seen).unwrap();
        // In order, each once, apart from the records a new generation repeats from the old.
        let mut first_seen = std::collections::HashSet::new();
        let seqs: Vec<u64> = seen.iter().map(|ring| ring.seq).filter(|seq| first_seen.insert(*seq)).collect();
        assert_eq!(seqs, (0..total as u64).collect::<Vec<_>>());
        assert!(seen.len() <= total + BELL_CARRIED_RECORDS as usize);
        assert!(fs::metadata(&path).unwrap().len() <= BELL_BYTES_MAX);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_transient_reader_misses_nothing_when_a_full_bell_is_replaced_between_its_polls() {
        let dir = temp_dir("transient");
        let path = dir.join("p0");
        let mut writer = BellWriter::create(&path).unwrap();
        let mut reader = BellReader::with_transient_fd(path.clone(), true);
        let mut seen = Vec::new();
        reader.poll(false, &mut seen).unwrap();
        let per_generation = BELL_BYTES_MAX as usize / BELL_RECORD_BYTES - 1;
        let mut next = 0u64;
        let mut ring_some = |writer: &mut BellWriter, count: usize| {
            let rings: Vec<Ring> = (next..next + count as u64).map(|seq| ring(4, seq)).collect();
            next += count as u64;
            writer.ring(&rings).unwrap();
        };
        ring_some(&mut writer, per_generation - 10);
        // Caught up (a reader takes at most 2048 records a poll; one more than 1024 records
        // behind when the bell is replaced leaves the rest to the sweep).
        for _ in 0..per_generation / 2048 + 1 {
            reader.poll(false, &mut seen).unwrap();
        }
        // The last records of the full generation and the first of the next, with no poll between.
        ring_some(&mut writer, 8);
        ring_some(&mut writer, 20);
        let total = next;
        // A reader takes at most 2048 records a poll.
        for _ in 0..(total as usize / 2048 + 2) {
            reader.poll(false, &mut seen).unwrap();
        }
        let mut seqs: Vec<u64> = seen.iter().map(|ring| ring.seq).collect();
        seqs.sort_unstable();
        seqs.dedup();
        assert_eq!(seqs, (0..total).collect::<Vec<_>>());
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_moved_record_with_no_new_generation_behind_it_is_stepped_over() {
        let dir = temp_dir("moved");
        let path = dir.join("p0");
        let mut writer = BellWriter::create(&path).unwrap();
        let mut reader = BellReader::new(path.clone());
        let mut seen = Vec::new();
        reader.poll(false, &mut seen).unwrap();
        writer.ring(&[ring(1, 1), Ring { kind: RingKind::Moved, port: 0, epoch: 0, seq: 0 }, ring(1, 2)]).unwrap();
        reader.poll(false, &mut seen).unwrap();
        reader.poll(false, &mut seen).unwrap();
        assert_eq!(seen, vec![ring(1, 1), ring(1, 2)]);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_damaged_record_in_the_middle_is_skipped() {
        let dir = temp_dir("damage");
        let path = dir.join("p0");
        let mut writer = BellWriter::create(&path).unwrap();
        let mut reader = BellReader::new(path.clone());
        let mut seen = Vec::new();
        reader.poll(false, &mut seen).unwrap();
        writer.ring(&[ring(1, 1), ring(1, 2), ring(1, 3)]).unwrap();
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(&[0xff], (BELL_RECORD_BYTES * 2 + 5) as u64).unwrap();
        reader.poll(false, &mut seen).unwrap();
        assert_eq!(seen, vec![ring(1, 1), ring(1, 3)]);
        let _ = fs::remove_dir_all(&dir);
    }
}
