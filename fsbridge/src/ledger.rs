//! Once-ledgers (`FTSS_RECV=once`): which packets the processes on one port of a node have handed
//! to their app, kept on the volume so that the next process on that port never gets one again.
//!
//! ```text
//! nodes/<node>/once/<port>/<boot>-<pidns>-<pid>-<start>.ledger   one file per process
//! file   := record*
//! record := fsbridge record framing, tag TAG_LEDGER; body := (epoch key u64 | start u64 | end u64)*
//!           the sequence numbers start..end of one sender epoch (named by the receiver's
//!           64-bit key of origin and epoch), all handed to the app
//! ```
//!
//! A process appends a record and fdatasyncs it before `recv` returns a datagram it names: that
//! sync is the moment of delivery. When a process first binds the port it reads every file in the
//! port's directory. A file whose process is gone (another boot, or a pid that no longer runs with
//! that start time) is inherited: its ranges are written into the new process's own file, synced,
//! and only then is the old file removed, so a port's history passes from process to process in a
//! few ranges. Files of live processes (siblings sharing the port) are read and left alone. A file
//! from another pid namespace of this boot cannot be judged, so it is read and kept.
//!
//! Bounds: a file holds at most the ranges of `EPOCHS_MAX` sender epochs, `RANGES_PER_EPOCH_MAX`
//! each (as the shim's dedupe does); when appends make it `COMPACT_AFTER_BYTES` longer than its
//! compact form, it is rewritten compact (temporary file, fdatasync, rename). Forgetting the
//! oldest ranges can only let a very old redelivery through again, never drop a datagram.

use crate::disk::File;

use crate::fsops::{self as fs, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::format::{self, TAG_LEDGER};
use crate::seqset::SeenIds;
use crate::spool::{self, SpoolError};

/// Sender epochs remembered per port, and ranges per epoch.
pub const EPOCHS_MAX: usize = 4096;
pub const RANGES_PER_EPOCH_MAX: usize = 256;
/// A file is rewritten compact when appends have made it this much longer than its compact form.
pub const COMPACT_AFTER_BYTES: u64 = 1 << 20;
const RANGE_BYTES: usize = 24;
/// One record holds at most this many ranges (a compact rewrite writes several records).
const RANGES_PER_RECORD_MAX: usize = 4096;
const SUFFIX: &str = ".ledger";

/// The ledger of one port, as one process keeps it.
pub struct Ledger {
    dir: PathBuf,
    path: PathBuf,
    file: File,
    /// Bytes of the file that hold whole records (the next record goes here, over any torn bytes
    /// a failed append left).
    length: u64,
    /// Length of the compact form when it was last written.
    compact_length: u64,
    /// What this process's file says: inherited ranges and everything handed since.
    ids: SeenIds<u64>,
}

/// What opening a port's ledger found.
pub struct Opened {
    pub ledger: Ledger,
    /// Every range handed on this port by earlier processes and by live siblings: (epoch key,
    /// start, end).
    pub handed: Vec<(u64, u64, u64)>,
    /// Files of processes that are gone, inherited and removed.
    pub inherited_files: usize,
    /// Bytes that were not whole records (torn by a crash mid-append, or damaged), per file.
    pub unreadable: Vec<(PathBuf, u64)>,
}

/// Who a ledger file belongs to, from its name.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Writer {
    boot: String,
    pid_namespace: u64,
    pid: u32,
    start: u64,
}

impl Writer {
    fn me() -> Writer {
        let pid = std::process::id();
        Writer { boot: boot_id(), pid_namespace: pid_namespace(), pid, start: process_start(pid).unwrap_or(0) }
    }

    fn file_name(&self) -> String {
        format!("{}-{}-{}-{}{SUFFIX}", self.boot, self.pid_namespace, self.pid, self.start)
    }

    fn parse(name: &str) -> Option<Writer> {
        let mut parts = name.strip_suffix(SUFFIX)?.split('-');
        let writer = Writer {
            boot: parts.next()?.to_owned(),
            pid_namespace: parts.next()?.parse().ok()?,
            pid: parts.next()?.parse().ok()?,
            start: parts.next()?.parse().ok()?,
        };
        parts.next().is_none().then_some(writer)
    }

    /// Gone for sure: another boot, or (in our pid namespace) no process with that pid and start.
    fn gone(&self, me: &Writer) -> bool {
        if self.boot != me.boot {
            return true;
        }
        if self.pid_namespace != me.pid_namespace {
            return false;
        }
        process_start(self.pid) != Some(self.start)
    }
}

/// The directory of `port`'s ledgers under a node's directory.
pub fn port_dir(node_dir: &Path, port: u16) -> PathBuf {
    node_dir.join("once").join(port.to_string())
}

impl Ledger {
    /// Opens this process's ledger for the port whose directory is `dir` (see [`port_dir`]):
    /// reads every file there, inherits those of processes that are gone (their ranges are made
    /// durable in this process's file before they are removed) and reports everything handed.
    pub fn open(dir: &Path) -> Result<Opened, SpoolError> {
        let io_error = |operation, path: &Path| {
            let path = path.to_path_buf();
            move |source| SpoolError::Io { operation, path, source }
        };
        fs::create_dir_all(dir).map_err(io_error("creating", dir))?;
        let me = Writer::me();
        let path = dir.join(me.file_name());
        let mut names = Vec::new();
        spool::visit_names(dir, |name| names.push(name))?;
        names.sort();
        let mut ids = SeenIds::new(EPOCHS_MAX, RANGES_PER_EPOCH_MAX);
        let mut handed = Vec::new();
        let mut gone = Vec::new();
        let mut unreadable = Vec::new();
        for name in names {
            let Some(writer) = Writer::parse(&name) else { continue };
            let file_path = dir.join(&name);
            if file_path == path {
                // Our own name from an earlier open in this process (a forked child never has the
                // parent's name): its ranges are ours already.
                continue;
            }
            let bytes = match fs::read(&file_path) {
                Ok(bytes) => bytes,
                Err(error) if spool::is_gone(&error) => continue,
                Err(source) => return Err(SpoolError::Io { operation: "reading", path: file_path, source }),
            };
            let (ranges, whole) = decode(&bytes);
            if whole < bytes.len() {
                unreadable.push((file_path.clone(), (bytes.len() - whole) as u64));
            }
            let inherit = writer.gone(&me);
            for &(epoch, start, end) in &ranges {
                if inherit {
                    ids.insert_range(epoch, start, end);
                }
            }
            handed.extend(ranges);
            if inherit {
                gone.push(file_path);
            }
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
            .map_err(io_error("creating", &path))?;
        let compact = encode_all(&ids);
        file.write_all_at(&compact, 0).and_then(|()| file.sync_data()).map_err(io_error("writing", &path))?;
        spool::sync_directory(dir)?;
        for old in &gone {
            if let Err(error) = fs::remove_file(old)
                && !spool::is_gone(&error)
            {
                return Err(SpoolError::Io { operation: "removing", path: old.clone(), source: error });
            }
        }
        let length = compact.len() as u64;
        let ledger = Ledger { dir: dir.to_path_buf(), path, file, length, compact_length: length, ids };
        Ok(Opened { ledger, handed, inherited_files: gone.len(), unreadable })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Makes `ids` (epoch key, sequence) durable as handed to the app: one write and one
    /// fdatasync. On error nothing may be taken as handed; the next append overwrites what this
    /// one left.
    pub fn append(&mut self, ids: &[(u64, u64)]) -> io::Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut sorted = ids.to_vec();
        sorted.sort_unstable();
        let mut ranges: Vec<(u64, u64, u64)> = Vec::new();
        for (epoch, seq) in sorted {
            match ranges.last_mut() {
                Some((last_epoch, _, end)) if *last_epoch == epoch && *end == seq => *end = seq.saturating_add(1),
                Some((last_epoch, _, end)) if *last_epoch == epoch && *end > seq => {}
                _ => ranges.push((epoch, seq, seq.saturating_add(1))),
            }
        }
        let mut bytes = Vec::new();
        encode(&mut bytes, &ranges);
        self.file.write_all_at(&bytes, self.length)?;
        self.file.sync_data()?;
        self.length += bytes.len() as u64;
        for (epoch, start, end) in ranges {
            self.ids.insert_range(epoch, start, end);
        }
        if self.length > self.compact_length + COMPACT_AFTER_BYTES {
            // Best effort: the long form stays valid if the rewrite fails.
            let _ = self.compact();
        }
        Ok(())
    }

    /// Rewrites the file in compact form: a temporary file, synced, renamed over ours.
    fn compact(&mut self) -> io::Result<()> {
        let bytes = encode_all(&self.ids);
        let tmp = self.dir.join(format!(".{}.tmp", self.path.file_name().and_then(|name| name.to_str()).unwrap_or("")));
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&tmp)?;
        file.write_all_at(&bytes, 0).and_then(|()| file.sync_data())?;
        fs::rename(&tmp, &self.path)?;
        spool::sync_directory(&self.dir)?;
        self.file = file;
        self.length = bytes.len() as u64;
        self.compact_length = self.length;
        Ok(())
    }

    /// Size of the file (for tests and status).
    pub fn len(&self) -> u64 {
        self.length
    }

    pub fn is_empty(&self) -> bool {
        self.length == 0
    }
}

fn encode(out: &mut Vec<u8>, ranges: &[(u64, u64, u64)]) {
    for chunk in ranges.chunks(RANGES_PER_RECORD_MAX) {
        format::write_record(out, TAG_LEDGER, |body| {
            for (epoch, start, end) in chunk {
                body.extend_from_slice(&epoch.to_le_bytes());
                body.extend_from_slice(&start.to_le_bytes());
                body.extend_from_slice(&end.to_le_bytes());
            }
        });
    }
}

fn encode_all(ids: &SeenIds<u64>) -> Vec<u8> {
    let mut ranges: Vec<(u64, u64, u64)> = ids.ranges().collect();
    ranges.sort_unstable();
    let mut bytes = Vec::new();
    encode(&mut bytes, &ranges);
    bytes
}

/// The ranges of the whole records at the start of `bytes`, and how many bytes they span. Reading
/// stops at the first record that is not whole (a torn append, or damage: ranges after it are
/// forgotten, which can only let a duplicate through).
fn decode(bytes: &[u8]) -> (Vec<(u64, u64, u64)>, usize) {
    let mut ranges = Vec::new();
    let mut offset = 0;
    while offset < bytes.len() {
        let Ok((tag, body, next)) = format::read_record(bytes, offset, RANGES_PER_RECORD_MAX * RANGE_BYTES) else {
            break;
        };
        if tag != TAG_LEDGER || body.len() % RANGE_BYTES != 0 {
            break;
        }
        for range in body.chunks_exact(RANGE_BYTES) {
            let word = |at: usize| u64::from_le_bytes(range[at..at + 8].try_into().expect("8 bytes"));
            let (epoch, start, end) = (word(0), word(8), word(16));
            if start < end {
                ranges.push((epoch, start, end));
            }
        }
        offset = next;
    }
    (ranges, offset)
}

/// The first 8 hex digits of this boot's id (another boot means every old process is gone).
fn boot_id() -> String {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|id| id.trim().chars().filter(char::is_ascii_hexdigit).take(8).collect())
        .filter(|id: &String| !id.is_empty())
        .unwrap_or_else(|| "0".into())
}

fn pid_namespace() -> u64 {
    fs::metadata("/proc/self/ns/pid").map(|meta| meta.ino).unwrap_or(0)
}

/// A process's start time in clock ticks after boot (field 22 of /proc/<pid>/stat).
fn process_start(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count from the last ')'.
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn temp_dir(tag: &str) -> PathBuf {
        crate::test_dir(&format!("ledger-{tag}"))
    }

    #[test]
    fn a_gone_process_is_inherited_and_its_file_removed() {
        let dir = temp_dir("inherit");
        // A file left by a process of another boot.
        let mut old = Vec::new();
        encode(&mut old, &[(7, 1, 101), (9, 5, 6)]);
        fs::write(dir.join(format!("ffffffff-1-4242-1{SUFFIX}")), &old).unwrap();
        let opened = Ledger::open(&dir).unwrap();
        assert_eq!(opened.inherited_files, 1);
        let mut handed = opened.handed.clone();
        handed.sort_unstable();
        assert_eq!(handed, vec![(7, 1, 101), (9, 5, 6)]);
        let mut ledger = opened.ledger;
        ledger.append(&[(7, 101), (7, 102), (8, 1)]).unwrap();
        let names: Vec<_> = fs::read_dir(&dir).unwrap().map(|entry| entry.unwrap().file_name()).collect();
        assert_eq!(names.len(), 1, "only this process's file is left: {names:?}");
        // What the next process (here: read as another boot's) would inherit.
        let (ranges, whole) = decode(&fs::read(ledger.path()).unwrap());
        assert_eq!(whole as u64, ledger.len());
        let mut seen = SeenIds::new(16, 16);
        for (epoch, start, end) in ranges {
            seen.insert_range(epoch, start, end);
        }
        assert!(seen.contains(7, 1) && seen.contains(7, 102) && seen.contains(9, 5) && seen.contains(8, 1));
        assert!(!seen.contains(7, 103) && !seen.contains(9, 6));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_live_siblings_file_is_read_and_kept() {
        let dir = temp_dir("sibling");
        // pid 1 runs in every pid namespace we can see; its start time is what /proc says.
        let me = Writer::me();
        let init = Writer { pid: 1, start: process_start(1).unwrap(), ..me };
        let mut bytes = Vec::new();
        encode(&mut bytes, &[(3, 10, 20)]);
        fs::write(dir.join(init.file_name()), &bytes).unwrap();
        let opened = Ledger::open(&dir).unwrap();
        assert_eq!(opened.inherited_files, 0);
        assert_eq!(opened.handed, vec![(3, 10, 20)]);
        assert!(dir.join(init.file_name()).exists());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_torn_append_is_reported_and_the_whole_records_kept() {
        let dir = temp_dir("torn");
        let mut bytes = Vec::new();
        encode(&mut bytes, &[(1, 1, 5)]);
        let whole = bytes.len();
        encode(&mut bytes, &[(1, 5, 9)]);
        bytes.truncate(whole + 7);
        fs::write(dir.join(format!("ffffffff-1-4243-1{SUFFIX}")), &bytes).unwrap();
        let opened = Ledger::open(&dir).unwrap();
        assert_eq!(opened.handed, vec![(1, 1, 5)]);
        assert_eq!(opened.unreadable.len(), 1);
        assert_eq!(opened.unreadable[0].1, 7);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn appends_compact_past_the_bound() {
        let dir = temp_dir("compact");
        let mut ledger = Ledger::open(&dir).unwrap().ledger;
        // Every other sequence number, 500 per append: ranges do not merge, records stay long.
        let mut seq = 0;
        let mut compacted = false;
        for _ in 0..400 {
            let before = ledger.len();
            let batch: Vec<(u64, u64)> = (0..500).map(|n| (1, seq + 2 * n)).collect();
            seq += 1000;
            ledger.append(&batch).unwrap();
            if ledger.len() < before {
                compacted = true;
                break;
            }
        }
        assert!(compacted, "never compacted");
        seq -= 2;
        assert!(ledger.len() < COMPACT_AFTER_BYTES, "compacted: {} bytes", ledger.len());
        let (ranges, _) = decode(&fs::read(ledger.path()).unwrap());
        assert!(ranges.len() <= RANGES_PER_EPOCH_MAX, "{} ranges", ranges.len());
        assert!(ranges.iter().any(|&(_, _, end)| end == seq + 1), "the newest are kept");
        fs::remove_dir_all(&dir).unwrap();
    }
}
