//! Maintenance: the node registry, quarantine, reclaiming segments and housekeeping.

use super::*;

/// The owner of `path` if it is not this process's user (`None` if it is, or the file is gone).
pub(super) fn foreign_owner(path: &std::path::Path) -> Option<u32> {
    let owner = fsbridge::fsops::symlink_metadata(path).ok()?.uid;
    (owner != nix::unistd::geteuid().as_raw()).then_some(owner)
}

/// A receiving shim refreshes a claimed file's mtime every second while the app has not read all
/// of it; a claim older than this is a dead process's.
pub(super) const CLAIM_FRESH: Duration = Duration::from_secs(5);

/// Names of the inbox files held claimed (`tmp/<name>.claimed-<pid>`) and refreshed within
/// `CLAIM_FRESH`, in the inbox whose `tmp/` is `tmp_dir`.
pub(super) fn fresh_claims(tmp_dir: &std::path::Path) -> HashSet<String> {
    let mut fresh = HashSet::default();
    let now = fsbridge::disk::system_now();
    for name in fsbridge::fsops::read_dir_names(tmp_dir).into_iter().flatten() {
        let Some((file, _)) = name.to_str().and_then(|name| name.split_once(".claimed-")) else { continue };
        let recent = fsbridge::fsops::metadata(tmp_dir.join(&name))
            .is_ok_and(|meta| now.duration_since(meta.modified).unwrap_or_default() < CLAIM_FRESH);
        if recent {
            fresh.insert(file.to_owned());
        }
    }
    fresh
}

impl Server {
    /// Takes the volume's inotify events: news makes the cycle read the volume; a new node
    /// directory makes it read the registry; a new directory may be one to watch.
    pub(super) fn take_volume_events(&mut self) {
        let Some(watcher) = self.watcher.as_mut() else { return };
        let woken = watcher.take();
        self.volume_reads.woken(&woken);
        if woken.nodes {
            self.registry_woken = true;
        }
        if woken.dirs {
            self.watch_volume();
        }
    }

    /// The directories of `node` the server reads, with the part of its spools each is. Parents
    /// come before their children (a child's watch is tried after its parent's).
    pub(super) fn spool_dirs(&self, node: &NodeName) -> impl Iterator<Item = (PathBuf, Area)> + use<> {
        let node_dir = self.volume.node_dir(node);
        [
            (node_dir.clone(), Area::Tree),
            (node_dir.join("out"), Area::Tree),
            (node_dir.join("rcpt"), Area::Tree),
            (self.volume.outbox(node).new_dir(), Area::Outbox),
            (node_dir.join("out").join("log"), Area::Log),
            (self.volume.receipts(node).new_dir(), Area::Receipts),
        ]
        .into_iter()
    }

    /// Watches the directories this server's nodes write into (those not watched yet).
    pub(super) fn watch_volume(&mut self) {
        if self.watcher.is_none() {
            return;
        }
        let mut dirs = Vec::new();
        for node in self.nodes.iter().filter(|node| self.owns(node)) {
            dirs.extend(self.spool_dirs(node).map(|(dir, area)| (dir, Tag::Node((node.clone(), area)))));
        }
        if self.config.partition.count > 1 {
            dirs.push((self.volume.forwarded_receipts(self.config.partition.index).new_dir(), Tag::Forwarded));
        }
        if let Some(watcher) = self.watcher.as_mut() {
            watcher.watch(dirs);
        }
    }

    pub(super) fn refresh_registry(&mut self) -> Result<(), fsbridge::SpoolError> {
        let now = monotonic_now();
        let every = if self.registry_woken { REGISTRY_REFRESH_WOKEN } else { REGISTRY_REFRESH };
        if self.registry_loaded_at.is_some_and(|at| now.duration_since(at) < every) {
            return Ok(());
        }
        self.registry_loaded_at = Some(now);
        self.registry_woken = false;
        let (nodes, invalid) = self.volume.list_nodes()?;
        for name in invalid {
            let path = self.volume.nodes_dir().join(&name);
            self.quarantine_path(path, "volume", "node directory name is not a valid node name");
        }
        // Who owns which address is the registry's decision (core::registry); here the reading.
        let mut read = Vec::with_capacity(nodes.len());
        for node in &nodes {
            let registration = match self.volume.node_config(node) {
                Ok(Some(config)) => {
                    let registered_unix_us = fsbridge::fsops::metadata(self.volume.node_dir(node).join("node.toml"))
                        .ok()
                        .and_then(|meta| meta.modified.duration_since(std::time::UNIX_EPOCH).ok())
                        .map_or(0, |since| since.as_micros() as u64);
                    Registration::Address { addr: config.addr, registered_unix_us }
                }
                Ok(None) => Registration::Absent,
                Err(reason) => Registration::Unreadable(reason),
            };
            read.push((node.clone(), registration));
        }
        for (node, verdict) in self.registry.refresh(read) {
            match verdict {
                Verdict::Granted(_) | Verdict::Unregistered { reason: None } => {
                    self.node_recovered(&node, NodeStep::Register)
                }
                Verdict::Kept { addr, reason } => {
                    let error = format!("cannot read its registration (keeping {addr}): {reason}");
                    self.node_failed(&node, NodeStep::Register, error);
                }
                Verdict::Refused { addr, holder } => {
                    let reason = format!("its address {addr} is node {holder}'s: registration refused");
                    self.node_failed(&node, NodeStep::Register, reason);
                }
                Verdict::Unregistered { reason: Some(reason) } => {
                    self.node_failed(&node, NodeStep::Register, format!("ignoring its registration: {reason}"));
                }
            }
        }
        self.nodes = nodes;
        self.watch_volume();
        Ok(())
    }

    /// Moves `path` into quarantine with `reason`; returns whether it was moved.
    pub(super) fn quarantine_path(&mut self, path: PathBuf, origin: &str, reason: &str) -> bool {
        match self.volume.quarantine(&path, origin, reason) {
            Ok(target) => {
                self.counters.quarantined += 1;
                eprintln!("ftss-server: quarantined {} as {}: {reason}", path.display(), target.display());
                true
            }
            Err(error) => {
                self.report("quarantining", format!("{}: {error} (reason was: {reason})", path.display()));
                false
            }
        }
    }

    /// Writes `bytes` (a damaged or undecodable part of an outbox log) into quarantine with a reason.
    pub(super) fn quarantine_bytes(&mut self, node: &NodeName, name: &str, bytes: &[u8], reason: &str) {
        let dir = self.volume.quarantine_dir();
        let staged = dir.join(format!(".{name}.{}", fsbridge::random_u64()));
        let written = fsbridge::fsops::create_dir_all(&dir)
            .map_err(|source| fsbridge::SpoolError::Io { operation: "creating", path: dir.clone(), source })
            .and_then(|()| fsbridge::spool::write_file_durably(&staged, bytes));
        match written {
            Ok(()) => {
                self.quarantine_path(staged, node.as_str(), reason);
            }
            Err(error) => self.report("quarantining", format!("{name}: {error} (reason was: {reason})")),
        }
    }

    /// Frees retained packets whose time is up and deletes segments nothing lives in. When the
    /// active segment holds nothing live, a new one is started so the old one can go too: without
    /// `--retain`, receipted bytes do not linger (for more than `IDLE_ROTATE_EVERY`: a receiver
    /// that keeps up empties the queue every cycle, and a segment created and another deleted each
    /// time cost the server 40 % of its time).
    pub(super) fn reclaim(&mut self) {
        self.book.expire(now_us());
        let active_idle = !self.book.is_live(self.active_segment_id());
        let now = monotonic_now();
        if active_idle
            && self.queue.active_has_records()
            && self.idle_rotated_at.is_none_or(|at| now.duration_since(at) >= IDLE_ROTATE_EVERY)
        {
            match self.queue.rotate() {
                Ok(()) => self.idle_rotated_at = Some(now),
                Err(error) => self.report("starting a new segment", error),
            }
        }
        let active = self.active_segment_id();
        if let Some(cursors) = self.logs.checkpoint(&self.volume, active) {
            // Older segments may hold the only copy of a cursor: write them all into the active
            // segment before any is reclaimed.
            for (node, log, offset) in cursors {
                self.queue.append(&QueueRecord::Cursor { node, log, offset });
            }
            if let Err(error) = self.sync_queue() {
                self.report("writing outbox log cursors", error);
                return;
            }
            self.logs.checkpointed(active);
        }
        self.queue.reclaim(|segment| self.book.is_live(segment));
    }

    pub(super) fn active_segment_id(&self) -> u64 {
        self.queue.active_segment()
    }

    /// Removes what dead writers left behind: old ack files, and files in `tmp/` of every spool
    /// (including inbox files a receiving shim claimed and then died holding; their packets are
    /// delivered again because no receipt came).
    pub(super) fn housekeeping(&mut self) {
        if self.housekept_at.is_some_and(|at| monotonic_now().duration_since(at) < HOUSEKEEPING_INTERVAL) {
            return;
        }
        self.housekept_at = Some(monotonic_now());
        for node in self.nodes.iter().filter(|node| self.owns(node)) {
            let _ = fsbridge::spool::sweep_older_than(&self.volume.acks(node).new_dir(), ACK_FILE_AGE_MAX);
            let inboxes =
                self.volume.inbox_ports(node).unwrap_or_default().into_iter().map(|port| self.volume.inbox(node, port));
            let spools = [self.volume.outbox(node), self.volume.receipts(node), self.volume.acks(node)];
            for spool in spools.into_iter().chain(inboxes) {
                let _ = spool.sweep_tmp(TMP_FILE_AGE_MAX);
            }
        }
    }
}
