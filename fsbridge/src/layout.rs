//! Paths on the volume (see the crate docs for the tree) and the node registry (`node.toml`).

use crate::fsops as fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::NodeName;
use crate::bell::BellWriter;
use crate::spool::{self, Spool, SpoolError};

/// What a node registers about itself in `nodes/<node>/node.toml`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// The node's fabric IPv4 address; the server routes packets for it to this node.
    pub addr: Ipv4Addr,
}

/// Which of `count` server partitions owns `node` (scale-out: each active ftss-server instance
/// serves the nodes of the partitions it holds). Stable across restarts and versions: CRC32C of the
/// name.
pub fn partition_of(node: &NodeName, count: u32) -> u32 {
    assert!(count > 0, "at least one partition");
    crc32c::crc32c(node.as_str().as_bytes()) % count
}

/// A mounted FTSS volume.
#[derive(Clone, Debug)]
pub struct Volume {
    root: PathBuf,
}

/// Suffix of the file beside a quarantined file that says why it was moved aside.
pub const QUARANTINE_REASON_SUFFIX: &str = ".reason";

impl Volume {
    pub fn new(root: impl Into<PathBuf>) -> Volume {
        Volume { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn nodes_dir(&self) -> PathBuf {
        self.root.join("nodes")
    }

    pub fn node_dir(&self, node: &NodeName) -> PathBuf {
        self.nodes_dir().join(node.as_str())
    }

    pub fn outbox(&self, node: &NodeName) -> Spool {
        Spool::new(self.node_dir(node).join("out"))
    }

    /// The inbox of one UDP port of a node; a port with no socket bound holds its packets here.
    pub fn inbox(&self, node: &NodeName, port: u16) -> Spool {
        Spool::new(self.node_dir(node).join("in").join(port.to_string()))
    }

    pub fn receipts(&self, node: &NodeName) -> Spool {
        Spool::new(self.node_dir(node).join("rcpt"))
    }

    pub fn acks(&self, node: &NodeName) -> Spool {
        Spool::new(self.node_dir(node).join("ack"))
    }

    /// The directory of a node's doorbells, one per server writer (see [`crate::bell`]).
    pub fn bell_dir(&self, node: &NodeName) -> PathBuf {
        self.node_dir(node).join("bell")
    }

    /// The doorbell a server partition writes for a node.
    pub fn bell_path(&self, node: &NodeName, partition: u32) -> PathBuf {
        self.bell_dir(node).join(format!("p{partition}"))
    }

    pub fn quarantine_dir(&self) -> PathBuf {
        self.root.join("quarantine")
    }

    pub fn server_dir(&self) -> PathBuf {
        self.root.join("server")
    }

    pub fn status_path(&self) -> PathBuf {
        self.server_dir().join("status.json")
    }

    /// The status file of one partition when the server runs as several (`status.json` for one).
    pub fn partition_status_path(&self, partition: u32, count: u32) -> PathBuf {
        if count <= 1 { self.status_path() } else { self.server_dir().join(format!("status-p{partition}.json")) }
    }

    /// Receipts forwarded to a partition's server by the instance that read them (scale-out: the
    /// destination's partition reads its receipts, the origin's partition holds the packet).
    pub fn forwarded_receipts(&self, partition: u32) -> Spool {
        Spool::new(self.server_dir().join(format!("receipts-p{partition}")))
    }

    /// Creates the top-level directories and the volume's marker.
    pub fn create(&self) -> Result<(), SpoolError> {
        for dir in [self.nodes_dir(), self.quarantine_dir(), self.server_dir()] {
            fs::create_dir_all(&dir).map_err(|source| SpoolError::Io { operation: "creating", path: dir, source })?;
        }
        crate::mounts::write_marker(&self.root).map_err(|source| SpoolError::Io {
            operation: "writing the marker of",
            path: self.root.clone(),
            source,
        })
    }

    /// Creates a node's spools and writes its `node.toml` (atomically, only if it changed).
    pub fn register_node(&self, node: &NodeName, config: &NodeConfig) -> Result<(), SpoolError> {
        for spool in [self.outbox(node), self.receipts(node), self.acks(node)] {
            spool.create()?;
        }
        // The node's inbox directory and bells exist before the server first writes them: a
        // node that looked up a missing name could keep that answer in its NFS client's cache for
        // up to a minute.
        let inboxes = self.node_dir(node).join("in");
        fs::create_dir_all(&inboxes).map_err(|source| SpoolError::Io {
            operation: "creating",
            path: inboxes.clone(),
            source,
        })?;
        let bell = self.bell_path(node, 0);
        if fs::symlink_metadata(&bell).is_err() {
            BellWriter::create(&bell).map_err(|error| SpoolError::Io {
                operation: "creating the bell",
                path: bell.clone(),
                source: error.into(),
            })?;
        }
        if self.node_config(node).ok().flatten().as_ref() == Some(config) {
            return Ok(());
        }
        let text = toml::to_string(config).expect("NodeConfig serializes");
        let dir = self.node_dir(node);
        let tmp = dir.join(format!(".node.toml.{}.{:x}", std::process::id(), crate::random_u64()));
        spool::write_file_durably(&tmp, text.as_bytes())?;
        fs::rename(&tmp, dir.join("node.toml"))
            .map_err(|source| SpoolError::Rename { path: dir.join("node.toml"), source })?;
        spool::sync_directory(&dir)
    }

    /// A node's registration; `Ok(None)` if it has none.
    pub fn node_config(&self, node: &NodeName) -> Result<Option<NodeConfig>, String> {
        let path = self.node_dir(node).join("node.toml");
        let bytes = match spool::read_regular_file(&path) {
            Ok(Some(bytes)) => bytes,
            Ok(None) => return Ok(None),
            Err(error) => return Err(error.to_string()),
        };
        let text = std::str::from_utf8(&bytes).map_err(|_| format!("{}: not UTF-8", path.display()))?;
        toml::from_str(text).map(Some).map_err(|error| format!("{}: {error}", path.display()))
    }

    /// Every node directory with a valid name, sorted. Invalid names are returned separately.
    pub fn list_nodes(&self) -> Result<(Vec<NodeName>, Vec<String>), SpoolError> {
        let mut nodes = Vec::new();
        let mut invalid = Vec::new();
        for name in spool::list_names(&self.nodes_dir(), usize::MAX)? {
            match NodeName::new(&name) {
                Ok(node) => nodes.push(node),
                Err(_) => invalid.push(name),
            }
        }
        Ok((nodes, invalid))
    }

    /// Ports of a node that have an inbox directory.
    pub fn inbox_ports(&self, node: &NodeName) -> Result<Vec<u16>, SpoolError> {
        let names = spool::list_names(&self.node_dir(node).join("in"), usize::MAX)?;
        Ok(names.iter().filter_map(|name| name.parse().ok()).collect())
    }

    /// Moves `path` into `quarantine/` under a unique name and writes the reason beside it.
    /// Returns the new path. The file is never deleted.
    pub fn quarantine(&self, path: &Path, origin: &str, reason: &str) -> Result<PathBuf, SpoolError> {
        let dir = self.quarantine_dir();
        fs::create_dir_all(&dir).map_err(|source| SpoolError::Io {
            operation: "creating",
            path: dir.clone(),
            source,
        })?;
        let base = path.file_name().map(|name| name.to_string_lossy().into_owned()).unwrap_or_default();
        let safe: String =
            base.chars().map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '_' }).collect();
        let name = format!("{}-{}-{}", crate::unix_now_us(), origin, safe.trim_start_matches('.'));
        let target = dir.join(&name);
        fs::rename(path, &target).map_err(|source| SpoolError::Rename { path: target.clone(), source })?;
        let reason_text = format!("origin: {origin}\nfile: {}\nreason: {reason}\n", path.display());
        let reason_path = dir.join(format!("{name}{QUARANTINE_REASON_SUFFIX}"));
        spool::write_file_durably(&reason_path, reason_text.as_bytes())?;
        spool::sync_directory(&dir)?;
        Ok(target)
    }
}

/// The name of a batch file: writer epoch and sequence in fixed-width hex, so names sort in publish
/// order for each writer, and a kind suffix.
pub fn batch_file_name(epoch: u64, batch_seq: u64, suffix: &str) -> String {
    format!("{epoch:016x}-{batch_seq:016x}.{suffix}")
}

/// Parses a name made by [`batch_file_name`] into (epoch, batch_seq).
pub fn parse_batch_file_name(name: &str) -> Option<(u64, u64)> {
    let (stem, _suffix) = name.split_once('.')?;
    let (epoch, seq) = stem.split_once('-')?;
    if epoch.len() != 16 || seq.len() != 16 {
        return None;
    }
    Some((u64::from_str_radix(epoch, 16).ok()?, u64::from_str_radix(seq, 16).ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn register_and_quarantine() {
        let root = std::env::temp_dir().join(format!("fsbridge-layout-{}-{}", std::process::id(), crate::random_u64()));
        let volume = Volume::new(&root);
        volume.create().unwrap();
        let node = NodeName::new("a").unwrap();
        let config = NodeConfig { addr: "10.77.0.1".parse().unwrap() };
        volume.register_node(&node, &config).unwrap();
        volume.register_node(&node, &config).unwrap();
        assert_eq!(volume.node_config(&node).unwrap(), Some(config));
        assert_eq!(volume.list_nodes().unwrap().0, vec![node.clone()]);

        let bad = volume.outbox(&node).new_dir().join("junk");
        fs::write(&bad, b"garbage").unwrap();
        let moved = volume.quarantine(&bad, "a", "bad magic").unwrap();
        assert!(!bad.exists());
        assert_eq!(fs::read(&moved).unwrap(), b"garbage");
        let reason = fs::read_to_string(format!("{}{QUARANTINE_REASON_SUFFIX}", moved.display())).unwrap();
        assert!(reason.contains("bad magic"));
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn batch_names_round_trip_and_sort() {
        let name = batch_file_name(0xABC, 2, "pkt");
        assert_eq!(parse_batch_file_name(&name), Some((0xABC, 2)));
        assert!(batch_file_name(1, 9, "pkt") < batch_file_name(1, 10, "pkt"));
        assert_eq!(parse_batch_file_name("../x"), None);
    }
}
