//! fsbridge: the one definition of the FTSS volume — its layout, the bytes of its files, and how to
//! publish and read them safely on local disks, NFS and SMB.
//!
//! # Layout
//! ```text
//! VOLUME/
//!   ftss-volume                       the marker: written by ftss-server; nodes refuse a volume without it
//!   nodes/<node>/node.toml            addr = "10.77.0.2"   (written by the node's shim)
//!   nodes/<node>/out/log/             outbox logs (`log`): one per sending process, drained by ftss-server
//!   nodes/<node>/out/{tmp,new}/       packet batch files the node sends (FTSS_OUTBOX=files)
//!   nodes/<node>/in/<port>/{tmp,new}/ packet batches for the node's UDP port; written by ftss-server
//!   nodes/<node>/in/0/{tmp,new}/      whole IP packets for the node's agent, ftss-node (`ip`)
//!   nodes/<node>/rcpt/{tmp,new}/      receipts: packets the node's apps received; read by ftss-server
//!   nodes/<node>/ack/{tmp,new}/       acks: the state of the node's packets; written by ftss-server
//!   nodes/<node>/bell/<writer>        doorbells: every inbox and ack file published, read with O_DIRECT (`bell`)
//!   quarantine/<file> + <file>.reason files that could not be read, moved aside with a reason
//!   server/status.json                ftss-server's counters, rewritten every 250 ms
//!   server/fabric-keys/<node>.key     fabric nodes' keys (`fabric`)
//!   server/lease, server/lease-p<K>   high availability: the active server (of partition K)
//!   server/instances/<instance>       scale-out: instance heartbeats
//!   server/status-p<K>.json           scale-out: partition K's counters
//!   server/receipts-p<K>/{tmp,new}/   scale-out: receipts forwarded to partition K's server
//! ```
//!
//! Every spool directory has a `tmp/` and a `new/`. A writer creates a uniquely named file in `tmp/`,
//! writes it fully, fsyncs it, checks `close`, renames it into `new/` and fsyncs `new/` (Maildir).
//! Readers poll `new/` and never see a partial file. Names are `<epoch>-<seq>.<kind>` in fixed-width
//! hex, so a listing sorted by name is each writer's publish order. Names starting with `.` (NFS
//! silly-renames, editor files) are ignored.
//!
//! `format` holds the bytes; `spool` the file operations; `layout` the paths; `log` the outbox logs
//! (batches appended to a per-process segment, one fdatasync each); `fabric` the same batches
//! framed for a stream connection to ftss-server.

pub mod bell;
pub mod dedupe;
pub mod disk;
pub mod fabric;
pub mod format;
pub mod fsops;
pub mod hash;
pub mod ip;
pub mod layout;
pub mod ledger;
pub mod log;
pub mod mounts;
pub mod pcap;
pub mod seqset;
pub mod spool;

pub use format::{Ack, AckState, Batch, BatchEncoder, BatchHeader, BatchKind, DecodeError, Packet, PacketId, Record};
pub use layout::{NodeConfig, Volume};
pub use spool::{Spool, SpoolError};

use std::fmt;

/// Longest node name; names are directory names and travel in every packet id.
pub const NODE_NAME_BYTES_MAX: usize = 64;

/// A node's name: 1–64 bytes of `[A-Za-z0-9_.-]`, not starting with `.`, so that it is always a
/// safe single path component (no `/`, no `..`, no hidden files).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeName(String);

/// Why a string is not a node name.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid node name {0:?}: use 1-64 characters of A-Z a-z 0-9 _ . - not starting with '.'")]
pub struct InvalidNodeName(pub String);

impl NodeName {
    pub fn new(name: &str) -> Result<NodeName, InvalidNodeName> {
        let valid = !name.is_empty()
            && name.len() <= NODE_NAME_BYTES_MAX
            && !name.starts_with('.')
            && name.bytes().all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'_' | b'.' | b'-'));
        if valid { Ok(NodeName(name.to_owned())) } else { Err(InvalidNodeName(name.to_owned())) }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeName {
    fn fmt(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str(&self.0)
    }
}

impl fmt::Debug for NodeName {
    fn fmt(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        write!(formatter, "{:?}", self.0)
    }
}

/// Microseconds since the Unix epoch, for packet timestamps.
pub fn unix_now_us() -> u64 {
    disk::unix_now_us()
}

/// A random u64 from the kernel, for epochs (on a thread running the simulator: its seeded stream).
pub fn random_u64() -> u64 {
    if let Some(disk) = disk::sim::current() {
        return disk.random();
    }
    let mut bytes = [0u8; 8];
    // SAFETY: the buffer is valid for 8 bytes.
    let filled = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if filled != 8 {
        // getrandom cannot fail for 8 bytes once the pool is ready; fall back to time and pid.
        return unix_now_us().rotate_left(17) ^ u64::from(std::process::id()) ^ (std::ptr::addr_of!(bytes) as u64);
    }
    u64::from_le_bytes(bytes)
}

/// A fresh directory under the system temp dir for one unit test (`fsbridge-<tag>-<pid>-<random>`).
#[cfg(test)]
pub(crate) fn test_dir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("fsbridge-{tag}-{}-{:x}", std::process::id(), random_u64()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names() {
        for good in ["a", "node-1", "n.x_y", &"x".repeat(64)] {
            assert!(NodeName::new(good).is_ok(), "{good}");
        }
        for bad in ["", ".", "..", ".hidden", "a/b", "a b", "ä", &"x".repeat(65), "a\0"] {
            assert!(NodeName::new(bad).is_err(), "{bad:?}");
        }
    }
}
