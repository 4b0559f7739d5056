//! Outbox logs: the fast path of a node's outbox. One sending process appends its batches to a
//! segment file of its own and makes each durable with one fdatasync: no file is created, renamed or
//! listed per batch, and the space is zero-filled ahead of the writer, so the sync writes data
//! blocks only and no file-system metadata (on ext4 about 1.6 × the rate of an append + fdatasync,
//! and concurrent processes' syncs overlap).
//!
//! ```text
//! nodes/<node>/out/log/<epoch:016x>-<segment:016x>.log
//! segment := header frame* [seal] zeros
//! header  := magic "FTSL" | version u16 | reserved u16 | epoch u64 | segment u64 | crc32c u32
//! frame   := magic "FTLF" | len u32 | crc32c u32 (of len and batch) | batch (a fsbridge batch, len bytes)
//! seal    := magic "FTLE" | 0 u32 | crc32c u32 (of the 0)        the writer moved on to the next segment
//! ```
//!
//! A zero magic (or the end of the file) is the end of what was written so far. Segments are made
//! whole (`tmp/`, header and a first stretch of zeros, fsync, rename into `log/`, fsync `log/`), and
//! on a local file system a writer extends the zeros ahead of itself in growing steps (synced
//! before the frame that needs them is written), so a reader never sees a hole and a frame never
//! lands in space the disk could not provide. On NFS, SMB and FUSE mounts frames are appended
//! instead (zeros would cost as much to send as data); a failed append leaves at most a partial
//! frame at the end, which the reader skips once the writer has moved to its next segment.
//!
//! The reader is ftss-server, which keeps its position in each log in its own durable queue (a
//! cursor record committed with the packets it read), deletes a segment once it is sealed and read
//! to the seal, and deletes an unsealed one once it has been read to its end and left unchanged for
//! the abandon time (its writer died). A writer therefore never appends to a segment it left idle
//! for [`IDLE_ROTATE`]; it seals it and starts another, and a write that itself took longer than
//! [`STALE_WRITE`] is written again to a fresh segment (the server drops the duplicate by packet id).
//!
//! Over NFS a reader on another client may see a frame only after the writer's fdatasync (which
//! sends the COMMIT); the server reads the array's local file system, where a frame is visible as
//! soon as it is written. A frame can be read before its writer's sync returns; if that sync fails
//! (an I/O error: space is allocated beforehand) the writer retries in a fresh segment and the
//! server keeps the first copy, so the app that saw the error may have its datagram delivered.

use crate::disk::File;

use crate::fsops::{self as fs, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::format::BATCH_BYTES_MAX;
use crate::spool::{SpoolError, sync_directory, write_file_durably};

/// First bytes of every segment.
pub const SEGMENT_MAGIC: [u8; 4] = *b"FTSL";
/// The one segment version this code writes and reads.
pub const SEGMENT_VERSION: u16 = 1;
/// Bytes of the segment header.
pub const SEGMENT_HEADER_BYTES: u64 = 4 + 2 + 2 + 8 + 8 + 4;
/// First bytes of a frame.
pub const FRAME_MAGIC: [u8; 4] = *b"FTLF";
/// First bytes of the seal.
pub const SEAL_MAGIC: [u8; 4] = *b"FTLE";
/// Bytes of a frame's (or the seal's) head.
pub const FRAME_HEAD_BYTES: u64 = 12;
/// Largest batch in one frame (the same bound as a batch file).
pub const FRAME_BATCH_BYTES_MAX: usize = BATCH_BYTES_MAX;
/// A writer starts a new segment before one would grow past this (unless a single frame is larger).
pub const SEGMENT_BYTES_MAX: u64 = 8 * 1024 * 1024;
/// First read of a segment in one call; later reads in the call double up to the budget.
const READ_FIRST_BYTES: usize = 64 * 1024;
/// Most bytes checksummed while looking for the next valid frame in one call (hostile files could
/// otherwise make the search quadratic).
const RESYNC_CHECKSUM_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Zeros written when a segment is created.
const ZEROS_FIRST_BYTES: u64 = 64 * 1024;
/// Largest stretch of zeros written ahead at once (steps double up to this).
const ZEROS_STEP_MAX_BYTES: u64 = 1024 * 1024;
/// A writer idle this long seals its segment before writing again, so that a reader may treat a
/// segment left unchanged for much longer (the server's abandon time, 10 minutes by default) as
/// dead.
pub const IDLE_ROTATE: Duration = Duration::from_secs(60);
/// A write whose previous one was this long ago (the process was stopped in between) is written
/// again to a fresh segment: its segment may have been taken for abandoned meanwhile.
pub const STALE_WRITE: Duration = Duration::from_secs(300);
/// A write this long after the previous one checks that its segment still exists.
const REMOVED_CHECK_AFTER: Duration = Duration::from_secs(30);
/// The suffix of segment names.
pub const SEGMENT_SUFFIX: &str = "log";

/// The name of segment `segment` of the writer with `epoch`.
pub fn segment_name(epoch: u64, segment: u64) -> String {
    crate::layout::batch_file_name(epoch, segment, SEGMENT_SUFFIX)
}

/// Parses a segment name into (epoch, segment).
pub fn parse_segment_name(name: &str) -> Option<(u64, u64)> {
    if !name.ends_with(".log") || name.len() != 16 + 1 + 16 + 4 {
        return None;
    }
    crate::layout::parse_batch_file_name(name)
}

fn segment_header(epoch: u64, segment: u64) -> Vec<u8> {
    let mut header = Vec::with_capacity(SEGMENT_HEADER_BYTES as usize);
    header.extend_from_slice(&SEGMENT_MAGIC);
    header.extend_from_slice(&SEGMENT_VERSION.to_le_bytes());
    header.extend_from_slice(&0u16.to_le_bytes());
    header.extend_from_slice(&epoch.to_le_bytes());
    header.extend_from_slice(&segment.to_le_bytes());
    let crc = crc32c::crc32c(&header);
    header.extend_from_slice(&crc.to_le_bytes());
    header
}

fn frame_crc(len: u32, batch: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&len.to_le_bytes()), batch)
}

/// Encodes one frame holding `batch`.
pub fn encode_frame(out: &mut Vec<u8>, batch: &[u8]) {
    let len = u32::try_from(batch.len()).expect("a batch is far below 4 GiB");
    out.extend_from_slice(&FRAME_MAGIC);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&frame_crc(len, batch).to_le_bytes());
    out.extend_from_slice(batch);
}

fn encode_seal() -> Vec<u8> {
    let mut seal = SEAL_MAGIC.to_vec();
    seal.extend_from_slice(&0u32.to_le_bytes());
    seal.extend_from_slice(&frame_crc(0, &[]).to_le_bytes());
    seal
}

/// The appending side: one per sending process (one epoch).
pub struct LogWriter {
    dir: PathBuf,
    tmp_dir: PathBuf,
    epoch: u64,
    segment: u64,
    /// The open segment; `None` before the first write and after a failed one (the next write
    /// starts a fresh segment: the failed one may hold a partial frame at its end).
    file: Option<File>,
    offset: u64,
    zeroed_end: u64,
    zeros_step: u64,
    /// Zero-fill ahead (local file systems); on network and FUSE mounts frames are appended
    /// instead: there the zeros would cost as much to send as the data.
    preallocate: bool,
    /// When the last frame was written, on the boot-time clock (which, unlike the monotonic
    /// clock, goes on while the machine is suspended).
    last_write: Duration,
}

impl LogWriter {
    /// A writer for the outbox at `outbox_dir` (`nodes/<node>/out`); nothing is created before the
    /// first append.
    pub fn new(outbox_dir: &Path, epoch: u64) -> LogWriter {
        LogWriter {
            dir: outbox_dir.join("log"),
            tmp_dir: outbox_dir.join("tmp"),
            epoch,
            segment: 0,
            file: None,
            offset: 0,
            zeroed_end: 0,
            zeros_step: ZEROS_FIRST_BYTES,
            preallocate: true,
            last_write: boot_time(),
        }
    }

    /// The current segment's path (for logs).
    pub fn segment_path(&self) -> PathBuf {
        self.dir.join(segment_name(self.epoch, self.segment))
    }

    /// Appends `batch` as one frame and makes it durable (one pwrite, one fdatasync). On error
    /// nothing may be assumed durable; the next call starts a fresh segment.
    pub fn append(&mut self, batch: &[u8]) -> Result<(), SpoolError> {
        if batch.len() > FRAME_BATCH_BYTES_MAX {
            return Err(SpoolError::TooLarge { path: self.segment_path(), bytes: batch.len() as u64 });
        }
        let frame_len = FRAME_HEAD_BYTES + batch.len() as u64;
        loop {
            let previous = self.last_write;
            let full =
                self.offset > SEGMENT_HEADER_BYTES && self.offset + frame_len + FRAME_HEAD_BYTES > SEGMENT_BYTES_MAX;
            if self.file.is_none() || full || boot_time().saturating_sub(previous) >= IDLE_ROTATE {
                self.start_segment()?;
            }
            let previous = self.last_write;
            let result = self.write_frame(batch);
            if result.is_err() {
                self.file = None;
                return result;
            }
            let now = boot_time();
            self.last_write = now;
            let gap = now.saturating_sub(previous);
            // After a quiet spell, also ask whether the segment is still there (a reader whose
            // clock jumped may have taken it for dead). Not per batch: on a network mount the
            // fstat is a round trip.
            let removed = gap >= REMOVED_CHECK_AFTER
                && self.file.as_ref().and_then(|file| file.metadata().ok()).is_some_and(|meta| meta.nlink == 0);
            if gap < STALE_WRITE && !removed {
                return Ok(());
            }
            // Stopped (or suspended) between the idle check and the end of the write for longer
            // than a reader waits before taking an unchanged segment for dead, or the segment is
            // already gone: write it again where nobody can have given up.
            self.file = None;
        }
    }

    /// Seals the current segment (at exit): the reader removes it once it has read it, instead
    /// of waiting for the abandon time. A later append starts a new segment.
    pub fn seal(&mut self) {
        if let Some(file) = self.file.take() {
            let _ = file.write_all_at(&encode_seal(), self.offset);
        }
    }

    fn write_frame(&mut self, batch: &[u8]) -> Result<(), SpoolError> {
        let path = self.segment_path();
        let write_error = |source| SpoolError::Write { path: path.clone(), source };
        let mut bytes = Vec::with_capacity(FRAME_HEAD_BYTES as usize + batch.len());
        encode_frame(&mut bytes, batch);
        let end = self.offset + bytes.len() as u64;
        let file = self.file.as_ref().expect("a segment is open");
        // Extend the zeros first, with a sync of their own (once per step, up to 1 MiB): the frame
        // then only overwrites space that is durably allocated, so a full disk (or NFS reporting
        // it at the sync) fails the extension before any of the frame is visible to the reader,
        // and a send reported as failed is never delivered. The seal's room is kept zeroed too.
        if self.preallocate && end + FRAME_HEAD_BYTES > self.zeroed_end {
            let target = end + FRAME_HEAD_BYTES + self.zeros_step;
            let zeros = vec![0; (target - self.zeroed_end) as usize];
            file.write_all_at(&zeros, self.zeroed_end).map_err(write_error)?;
            file.sync_data().map_err(write_error)?;
            self.zeroed_end = target;
            self.zeros_step = (self.zeros_step * 2).min(ZEROS_STEP_MAX_BYTES);
        }
        file.write_all_at(&bytes, self.offset).map_err(write_error)?;
        file.sync_data().map_err(write_error)?;
        self.offset = end;
        Ok(())
    }

    /// Seals the current segment (if it is sound) and makes the next one whole.
    fn start_segment(&mut self) -> Result<(), SpoolError> {
        // A number is never tried twice: a failed attempt may leave its name behind.
        let next = self.segment + 1;
        self.segment = next;
        let name = segment_name(self.epoch, next);
        let tmp = self.tmp_dir.join(&name);
        let target = self.dir.join(&name);
        let mut initial = segment_header(self.epoch, next);
        if next == 1 {
            // First segment of this process: make sure the directories exist (cheap, once).
            for dir in [&self.tmp_dir, &self.dir] {
                fs::create_dir_all(dir).map_err(|source| SpoolError::Io {
                    operation: "creating",
                    path: dir.clone(),
                    source,
                })?;
            }
            self.preallocate = is_local_file_system(&self.dir);
        }
        if self.preallocate {
            initial.resize((SEGMENT_HEADER_BYTES + ZEROS_FIRST_BYTES) as usize, 0);
        }
        write_file_durably(&tmp, &initial).inspect_err(|_| {
            let _ = fs::remove_file(&tmp);
        })?;
        // Renamed closed (SMB refuses to rename an open file), then opened again.
        fs::rename(&tmp, &target).map_err(|source| {
            let _ = fs::remove_file(&tmp);
            SpoolError::Rename { path: target.clone(), source }
        })?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&target)
            .map_err(|source| SpoolError::Write { path: target.clone(), source })?;
        sync_directory(&self.dir)?;
        // The new segment exists: a reader that finds the seal finds its successor. A seal lost in
        // a crash only delays the old segment's removal to the abandon time.
        self.seal();
        self.file = Some(file);
        // Nobody can have given up on a segment that did not exist before.
        self.last_write = boot_time();
        self.offset = SEGMENT_HEADER_BYTES;
        self.zeroed_end = initial.len() as u64;
        self.zeros_step = ZEROS_FIRST_BYTES;
        Ok(())
    }
}

/// Time since boot, suspended time included (CLOCK_BOOTTIME).
fn boot_time() -> Duration {
    if let Some(disk) = crate::disk::sim::current() {
        return Duration::from_micros(disk.monotonic_us());
    }
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map_or(Duration::ZERO, |now| Duration::new(now.tv_sec() as u64, now.tv_nsec() as u32))
}

/// Is `dir` on a local disk file system (not NFS, SMB/CIFS, FUSE, or one statfs cannot tell)?
fn is_local_file_system(dir: &Path) -> bool {
    const NFS: i64 = 0x6969;
    const SMB: i64 = 0x517B;
    const SMB2: i64 = 0xFE53_4D42;
    const CIFS: i64 = 0xFF53_4D42;
    const FUSE: i64 = 0x6573_5546;
    match nix::sys::statfs::statfs(dir) {
        // The magic's type is the C `long` of the target (i64 here, i32 on 32-bit ones).
        #[allow(clippy::unnecessary_cast)]
        Ok(info) => !matches!(info.filesystem_type().0 as i64, NFS | SMB | SMB2 | CIFS | FUSE),
        Err(_) => false,
    }
}

/// What a read found after its last whole frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tail {
    /// Zeros: nothing more written yet (or the read's byte budget ended at a frame boundary).
    Open,
    /// The seal: the writer moved on; nothing follows.
    Sealed,
    /// Bytes that are not a whole, valid frame: a write in progress, or damage. Which one it is
    /// shows only with time ([`LogReader::next_valid_frame`]).
    Bad(String),
}

/// Frames read from one position.
#[derive(Debug)]
pub struct Chunk {
    /// (offset just past the frame, batch bytes), in log order.
    pub frames: Vec<(u64, Vec<u8>)>,
    /// Where the tail starts (past the last frame returned).
    pub end: u64,
    pub tail: Tail,
}

/// Why a segment cannot be read at all.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error(transparent)]
    Spool(#[from] SpoolError),
    /// Not a regular file, or a header that is not this writer's segment: quarantine it.
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

/// The reading side (ftss-server): one open segment.
pub struct LogReader {
    path: PathBuf,
    file: File,
}

impl LogReader {
    /// Opens a segment (never following a symlink) and checks its header against its name.
    /// `Ok(None)` if it is gone.
    pub fn open(path: &Path) -> Result<Option<LogReader>, LogError> {
        let name = path.file_name().and_then(|name| name.to_str()).unwrap_or_default();
        let invalid = |reason: &str| LogError::Invalid { path: path.into(), reason: reason.into() };
        let (epoch, segment) = parse_segment_name(name).ok_or_else(|| invalid("not a log segment name"))?;
        let opened = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open(path);
        let file = match opened {
            Ok(file) => file,
            // Only a segment that is really gone is forgotten (its cursor with it); a stale handle
            // or any other error is retried.
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(error) if error.raw_os_error() == Some(libc::ELOOP) => return Err(invalid("a symlink, not a file")),
            Err(source) => return Err(SpoolError::Io { operation: "opening", path: path.into(), source }.into()),
        };
        let meta = file.metadata().map_err(|source| SpoolError::Io { operation: "stat", path: path.into(), source })?;
        if !meta.is_file {
            return Err(invalid("not a regular file"));
        }
        let mut header = vec![0; SEGMENT_HEADER_BYTES as usize];
        let read = read_at_most(&file, &mut header, 0).map_err(|source| SpoolError::Io {
            operation: "reading",
            path: path.into(),
            source,
        })?;
        if read < header.len() || header != segment_header(epoch, segment) {
            return Err(invalid("bad segment header (magic, version, epoch, segment or checksum)"));
        }
        Ok(Some(LogReader { path: path.into(), file }))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The segment's modification time and length (`None` if fstat fails): a writer's frame
    /// changes the first, an append both.
    pub fn stamp(&self) -> Option<(SystemTime, u64)> {
        let meta = self.file.metadata().ok()?;
        Some((meta.modified, meta.len))
    }

    /// Reads whole frames from `offset`, about `budget` bytes of them (at least one frame if one is
    /// there).
    pub fn read(&self, offset: u64, budget: usize) -> Result<Chunk, SpoolError> {
        // Small reads first, growing while they come back full of frames: an idle segment costs a
        // 64 KiB read a poll, not a read of all the zeros ahead of its writer.
        let mut frames = Vec::new();
        let mut end = offset;
        let mut size = READ_FIRST_BYTES.min(budget.max(4096));
        loop {
            let (chunk, cut) = self.read_chunk(end, size)?;
            let more = cut && !chunk.frames.is_empty();
            frames.extend(chunk.frames);
            end = chunk.end;
            if !more || (end - offset) as usize >= budget {
                return Ok(Chunk { frames, end, tail: chunk.tail });
            }
            size = (size * 2).min(budget.max(4096));
        }
    }

    /// One read of `size` bytes from `offset`, parsed; also whether it ended because the buffer
    /// did (more frames may follow).
    fn read_chunk(&self, offset: u64, size: usize) -> Result<(Chunk, bool), SpoolError> {
        let io_error = |source| SpoolError::Io { operation: "reading", path: self.path.clone(), source };
        let mut buffer = vec![0; size.clamp(4096, FRAME_BATCH_BYTES_MAX) + FRAME_HEAD_BYTES as usize];
        let filled = read_at_most(&self.file, &mut buffer, offset).map_err(io_error)?;
        buffer.truncate(filled);
        let mut frames = Vec::new();
        let mut at = 0usize;
        let mut cut = false;
        let tail = loop {
            let Some(head) = buffer.get(at..at + FRAME_HEAD_BYTES as usize) else {
                if buffer[at..].iter().all(|byte| *byte == 0) {
                    break Tail::Open;
                }
                if frames.is_empty() {
                    break Tail::Bad("a partial frame head at the end of the file".into());
                }
                cut = true;
                break Tail::Open;
            };
            let magic: [u8; 4] = head[..4].try_into().expect("4 bytes");
            let len = u32::from_le_bytes(head[4..8].try_into().expect("4 bytes"));
            let crc = u32::from_le_bytes(head[8..12].try_into().expect("4 bytes"));
            if magic == [0; 4] {
                break Tail::Open;
            }
            if magic == SEAL_MAGIC {
                if len == 0 && crc == frame_crc(0, &[]) {
                    break Tail::Sealed;
                }
                break Tail::Bad("a damaged seal".into());
            }
            if magic != FRAME_MAGIC {
                break Tail::Bad("no frame magic".into());
            }
            if len as usize > FRAME_BATCH_BYTES_MAX {
                break Tail::Bad(format!("frame length {len} over the limit"));
            }
            let body_start = at + FRAME_HEAD_BYTES as usize;
            let body_end = body_start + len as usize;
            if body_end > buffer.len() {
                if !frames.is_empty() {
                    // The buffer ended inside this frame: the next read starts here.
                    cut = true;
                    break Tail::Open;
                }
                // A frame bigger than the budget: read exactly it.
                let mut whole = vec![0; len as usize];
                let got = read_at_most(&self.file, &mut whole, offset + body_start as u64).map_err(io_error)?;
                if got < whole.len() || frame_crc(len, &whole) != crc {
                    break Tail::Bad("a frame that is incomplete or fails its checksum".into());
                }
                frames.push((offset + body_end as u64, whole));
                at = body_end;
                cut = true;
                break Tail::Open;
            }
            let batch = &buffer[body_start..body_end];
            if frame_crc(len, batch) != crc {
                break Tail::Bad("a frame that fails its checksum (written now, or damaged)".into());
            }
            frames.push((offset + body_end as u64, batch.to_vec()));
            at = body_end;
        };
        Ok((Chunk { frames, end: offset + at as u64, tail }, cut))
    }

    /// The offset of the first whole, valid frame or seal after `offset` (for skipping damage).
    /// If the head at `offset` is intact (only its batch is damaged), that is where it says the
    /// next frame starts, so a frame-like run of bytes inside its payload is never taken for one.
    pub fn next_valid_frame(&self, offset: u64) -> Result<Option<u64>, SpoolError> {
        let io_error = |source| SpoolError::Io { operation: "reading", path: self.path.clone(), source };
        let size = self.file.metadata().map_err(io_error)?.len;
        let length = size.saturating_sub(offset).min(SEGMENT_BYTES_MAX + FRAME_BATCH_BYTES_MAX as u64);
        let mut bytes = vec![0; length as usize];
        let filled = read_at_most(&self.file, &mut bytes, offset).map_err(io_error)?;
        bytes.truncate(filled);
        if bytes.starts_with(&FRAME_MAGIC) && bytes.len() >= FRAME_HEAD_BYTES as usize {
            let len = u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes")) as usize;
            let next = FRAME_HEAD_BYTES as usize + len;
            if len <= FRAME_BATCH_BYTES_MAX && bytes.get(next..).is_some_and(is_valid_frame) {
                return Ok(Some(offset + next as u64));
            }
        }
        let mut checksummed = 0usize;
        for start in 1..bytes.len() {
            let rest = &bytes[start..];
            if !(rest.starts_with(&FRAME_MAGIC) || rest.starts_with(&SEAL_MAGIC)) {
                continue;
            }
            // Only a length that can be a frame's, and whose frame fits in what was read, costs a
            // checksum: frame-like bytes with a huge length (inside a payload, say) cost nothing.
            let len = rest.get(4..8).map_or(0, |len| u32::from_le_bytes(len.try_into().expect("4 bytes")) as usize);
            if len > FRAME_BATCH_BYTES_MAX || FRAME_HEAD_BYTES as usize + len > rest.len() {
                continue;
            }
            checksummed += len;
            if checksummed > RESYNC_CHECKSUM_BYTES_MAX {
                // A file made to be slow to search: give up (the segment is moved aside whole once
                // its writer is done with it).
                return Ok(None);
            }
            if is_valid_frame(rest) {
                return Ok(Some(offset + start as u64));
            }
        }
        Ok(None)
    }

    /// The bytes from `start` to `end` (at most to the end of the file), for quarantine.
    pub fn bytes(&self, start: u64, end: u64) -> Result<Vec<u8>, SpoolError> {
        let io_error = |source| SpoolError::Io { operation: "reading", path: self.path.clone(), source };
        let size = self.file.metadata().map_err(io_error)?.len;
        let end = end.min(size).min(start + SEGMENT_BYTES_MAX + FRAME_BATCH_BYTES_MAX as u64);
        let mut bytes = vec![0; end.saturating_sub(start) as usize];
        let filled = read_at_most(&self.file, &mut bytes, start).map_err(io_error)?;
        bytes.truncate(filled);
        Ok(bytes)
    }
}

/// Do `bytes` start with a whole, valid frame or seal?
fn is_valid_frame(bytes: &[u8]) -> bool {
    let Some(head) = bytes.get(..FRAME_HEAD_BYTES as usize) else { return false };
    let len = u32::from_le_bytes(head[4..8].try_into().expect("4 bytes"));
    let crc = u32::from_le_bytes(head[8..12].try_into().expect("4 bytes"));
    if head.starts_with(&SEAL_MAGIC) {
        return len == 0 && crc == frame_crc(0, &[]);
    }
    head.starts_with(&FRAME_MAGIC)
        && bytes
            .get(FRAME_HEAD_BYTES as usize..FRAME_HEAD_BYTES as usize + len as usize)
            .is_some_and(|batch| frame_crc(len, batch) == crc)
}

/// Fills `buffer` from `offset` until it is full or the file ends; returns the bytes read.
pub(crate) fn read_at_most(file: &File, buffer: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buffer.len() {
        match file.read_at(&mut buffer[filled..], offset + filled as u64) {
            Ok(0) => break,
            Ok(read) => filled += read,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn temp_outbox(tag: &str) -> PathBuf {
        crate::test_dir(&format!("log-{tag}"))
    }

    fn only_segment(outbox: &Path) -> PathBuf {
        let mut names: Vec<_> = fs::read_dir(outbox.join("log")).unwrap().map(|entry| entry.unwrap().path()).collect();
        names.sort();
        names.remove(0)
    }

    #[test]
    fn frames_written_are_read_back_in_order_and_the_tail_is_open() {
        let outbox = temp_outbox("order");
        let mut writer = LogWriter::new(&outbox, 7);
        for index in 0..300u32 {
            writer.append(&vec![index as u8; 100 + index as usize * 10]).unwrap();
        }
        let reader = LogReader::open(&only_segment(&outbox)).unwrap().unwrap();
        let mut offset = SEGMENT_HEADER_BYTES;
        let mut seen = 0u32;
        loop {
            let chunk = reader.read(offset, 10_000).unwrap();
            for (end, batch) in &chunk.frames {
                assert_eq!(batch, &vec![seen as u8; 100 + seen as usize * 10]);
                assert!(*end > offset);
                seen += 1;
            }
            assert_eq!(chunk.tail, Tail::Open);
            if chunk.frames.is_empty() {
                break;
            }
            offset = chunk.end;
        }
        assert_eq!(seen, 300);
        fs::remove_dir_all(outbox).unwrap();
    }

    #[test]
    fn a_full_segment_is_sealed_and_the_next_one_follows() {
        let outbox = temp_outbox("seal");
        let mut writer = LogWriter::new(&outbox, 9);
        let batch = vec![5u8; 1024 * 1024];
        for _ in 0..10 {
            writer.append(&batch).unwrap();
        }
        let first = only_segment(&outbox);
        assert_eq!(parse_segment_name(first.file_name().unwrap().to_str().unwrap()), Some((9, 1)));
        let reader = LogReader::open(&first).unwrap().unwrap();
        let mut offset = SEGMENT_HEADER_BYTES;
        let mut frames = 0;
        let tail = loop {
            let chunk = reader.read(offset, 64 * 1024).unwrap();
            frames += chunk.frames.len();
            offset = chunk.end;
            if chunk.tail != Tail::Open || chunk.frames.is_empty() {
                break chunk.tail;
            }
        };
        assert_eq!(tail, Tail::Sealed);
        assert_eq!(frames, 7, "8 MiB holds seven 1 MiB frames");
        assert!(fs::metadata(first).unwrap().len() <= SEGMENT_BYTES_MAX + ZEROS_STEP_MAX_BYTES);
        fs::remove_dir_all(outbox).unwrap();
    }

    #[test]
    fn damage_is_reported_and_skipped_to_the_next_valid_frame() {
        let outbox = temp_outbox("damage");
        let mut writer = LogWriter::new(&outbox, 3);
        for index in 0..3u8 {
            writer.append(&[index; 50]).unwrap();
        }
        let path = only_segment(&outbox);
        let second = SEGMENT_HEADER_BYTES + FRAME_HEAD_BYTES + 50;
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(b"X", second + FRAME_HEAD_BYTES + 10).unwrap();
        let reader = LogReader::open(&path).unwrap().unwrap();
        let chunk = reader.read(SEGMENT_HEADER_BYTES, 4096).unwrap();
        assert_eq!(chunk.frames.len(), 1);
        assert_eq!(chunk.end, second);
        assert!(matches!(chunk.tail, Tail::Bad(_)));
        let next = reader.next_valid_frame(chunk.end).unwrap().unwrap();
        assert_eq!(next, second + FRAME_HEAD_BYTES + 50);
        let rest = reader.read(next, 4096).unwrap();
        assert_eq!(rest.frames, vec![(next + FRAME_HEAD_BYTES + 50, vec![2u8; 50])]);
        assert_eq!(reader.next_valid_frame(rest.end).unwrap(), None);
        fs::remove_dir_all(outbox).unwrap();
    }

    /// Item 10 of the durability audit: the search for the next frame after damage added each
    /// frame-like candidate's claimed length to its budget before checking it, so a payload holding
    /// "FTLF" and a huge length used the whole budget at once: the search gave up and the frames
    /// after the damage (acked ones) were quarantined with it.
    #[test]
    fn frame_like_bytes_with_a_huge_length_do_not_stop_the_search_for_the_next_frame() {
        let outbox = temp_outbox("huge");
        let mut writer = LogWriter::new(&outbox, 4);
        let mut decoy = b"FTLF".to_vec();
        decoy.extend_from_slice(&u32::MAX.to_le_bytes());
        decoy.extend_from_slice(&[0x55; 4]);
        let payload: Vec<u8> = decoy.iter().copied().cycle().take(1200).collect();
        writer.append(&payload).unwrap();
        writer.append(&[7; 40]).unwrap();
        let path = only_segment(&outbox);
        // The first frame's head is damaged: the search has to go through its payload.
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(b"XX", SEGMENT_HEADER_BYTES + 5).unwrap();
        let reader = LogReader::open(&path).unwrap().unwrap();
        let second = SEGMENT_HEADER_BYTES + FRAME_HEAD_BYTES + payload.len() as u64;
        assert_eq!(reader.next_valid_frame(SEGMENT_HEADER_BYTES).unwrap(), Some(second));
        let rest = reader.read(second, 4096).unwrap();
        assert_eq!(rest.frames, vec![(second + FRAME_HEAD_BYTES + 40, vec![7u8; 40])]);
        fs::remove_dir_all(outbox).unwrap();
    }

    #[test]
    fn foreign_files_are_refused() {
        let outbox = temp_outbox("foreign");
        let log = outbox.join("log");
        fs::create_dir_all(&log).unwrap();
        let name = segment_name(1, 1);
        fs::write(log.join(&name), b"FTSL garbage header that is long enough").unwrap();
        assert!(matches!(LogReader::open(&log.join(&name)), Err(LogError::Invalid { .. })));
        let other = segment_name(1, 2);
        std::os::unix::fs::symlink("/etc/passwd", log.join(&other)).unwrap();
        assert!(matches!(LogReader::open(&log.join(&other)), Err(LogError::Invalid { .. })));
        assert!(matches!(LogReader::open(&log.join("x.log")), Err(LogError::Invalid { .. })));
        assert!(LogReader::open(&log.join(segment_name(1, 3))).unwrap().is_none());
        // A header copied from another writer's segment does not pass as this name's.
        let mut writer = LogWriter::new(&outbox, 2);
        writer.append(b"x").unwrap();
        let copied = log.join(segment_name(2, 9));
        fs::copy(log.join(segment_name(2, 1)), &copied).unwrap();
        assert!(matches!(LogReader::open(&copied), Err(LogError::Invalid { .. })));
        fs::remove_dir_all(outbox).unwrap();
    }
}
