//! High availability: which of several ftss-server instances is active, decided by a lease kept on
//! the volume (`server/lease`), so that a standby can take over when the active one dies.
//!
//! - The active instance renews the lease every third of its term. If it cannot renew (the volume is
//!   unreachable, or another instance holds the lease) it stops before the term ends.
//! - A standby takes over only after the lease has expired. It claims the next epoch by creating
//!   `server/lease.epochs/<epoch>` exclusively (O_EXCL: of two standbys racing, exactly one gets
//!   it), then writes the lease with that epoch (tmp + rename).
//! - Epochs only go up. An instance whose epoch has a successor claim, or whose lease file shows a
//!   higher epoch, is deposed; a lease file showing a lower epoch is a late write of a deposed
//!   instance and is overwritten at the next renewal.
//! - The epoch is a fencing token: a new active instance fences the queue at the epoch it won
//!   (`Queue::fence`, which refuses an epoch not above the last), so late appends of a deposed
//!   instance are cut off at the next recovery. The server asks [`Lease::still_acting`] after every
//!   group commit, before it acks or removes anything.
//!
//! No locks: exclusive create and rename are atomic on NFS (v3 and later), SMB and Gluster. On an
//! NFS client, a claim another host just created can stay hidden behind the negative lookup cache
//! of the claims directory; the lease file is read by name (close-to-open), and the standby's next
//! renewal rewrites it, so a deposed instance on NFS sees its successor within a third of a term.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Bytes of the lease file (padded), so that it can be rewritten in place on a full volume.
const LEASE_FILE_BYTES: usize = 512;

/// How many epoch claims are kept behind the newest.
const CLAIMS_KEPT: u64 = 8;

/// What the lease file says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    pub holder: String,
    pub epoch: u64,
    pub expires_unix_ms: u64,
    pub term_ms: u64,
}

/// This instance's view of the lease.
pub struct Lease {
    path: PathBuf,
    holder: String,
    term: Duration,
    epoch: u64,
    renewed_at: Option<Instant>,
}

fn now_ms() -> u64 {
    fsbridge::unix_now_us() / 1000
}

/// Where the lease of partition `index` lives when there are several.
pub fn partition_lease_path(volume: &Path, index: u32) -> PathBuf {
    volume.join("server").join(format!("lease-p{index}"))
}

/// Reads the lease file; `None` if there is none or it is unreadable (treated as expired).
pub fn read(path: &Path) -> Option<LeaseRecord> {
    let bytes = fsbridge::spool::read_regular_file(path).ok()??;
    toml::from_str(std::str::from_utf8(&bytes).ok()?).ok()
}

impl Lease {
    pub fn new(volume: &Path, holder: String, term: Duration) -> Lease {
        Lease { path: volume.join("server").join("lease"), holder, term, epoch: 0, renewed_at: None }
    }

    /// The lease of one of `count` partitions (`server/lease-p<index>`; `server/lease` for one).
    pub fn for_partition(volume: &Path, holder: String, term: Duration, index: u32, count: u32) -> Lease {
        let mut lease = Lease::new(volume, holder, term);
        if count > 1 {
            lease.path = partition_lease_path(volume, index);
        }
        lease
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// Where epoch claims live: `<lease>.epochs/`.
    fn claims_dir(&self) -> PathBuf {
        let name = self.path.file_name().expect("lease file name").to_string_lossy();
        self.path.with_file_name(format!("{name}.epochs"))
    }

    /// Claims `epoch` for this instance by creating its claim file exclusively. False if another
    /// instance claimed it first.
    fn claim(&self, epoch: u64) -> Result<bool, String> {
        use std::io::Write;
        let dir = self.claims_dir();
        std::fs::create_dir_all(&dir).map_err(|error| format!("{}: {error}", dir.display()))?;
        let path = dir.join(epoch.to_string());
        let mut file = match std::fs::OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(file) => file,
            Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => return Ok(false),
            Err(error) => return Err(format!("{}: {error}", path.display())),
        };
        // The name is the claim; the holder inside is for people, written if there is room (on a
        // full volume it is not, and taking over must still work: the new active instance is
        // what drains the volume).
        let _ = file.write_all(self.holder.as_bytes()).and_then(|()| file.sync_all());
        fsbridge::spool::sync_directory(&dir).map_err(|error| error.to_string())?;
        // Claims older than the last few are of no use to anyone.
        for old in self.claims().into_iter().filter(|old| *old + CLAIMS_KEPT < epoch) {
            let _ = std::fs::remove_file(dir.join(old.to_string()));
        }
        Ok(true)
    }

    /// The epochs claimed so far.
    fn claims(&self) -> Vec<u64> {
        std::fs::read_dir(self.claims_dir())
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| entry.file_name().to_str().and_then(|name| name.parse().ok()))
            .collect()
    }

    /// Has another instance claimed a later epoch than this one's, or written one into the lease?
    pub fn superseded(&self) -> bool {
        if self.epoch == 0 {
            return true;
        }
        let successor = self.claims_dir().join((self.epoch + 1).to_string());
        successor.symlink_metadata().is_ok()
            || read(&self.path).is_some_and(|record| {
                record.epoch > self.epoch || (record.epoch == self.epoch && record.holder != self.holder)
            })
    }

    /// May this instance still act (ack, remove, rotate)? Its term has not run out by its own
    /// clock, and no later epoch exists. Asked after every group commit, and before a cycle's
    /// deliveries ahead of its sync.
    pub fn still_acting(&self) -> bool {
        self.valid() && !self.superseded()
    }

    fn write(&self, epoch: u64) -> Result<(), String> {
        let record = LeaseRecord {
            holder: self.holder.clone(),
            epoch,
            expires_unix_ms: now_ms() + self.term.as_millis() as u64,
            term_ms: self.term.as_millis() as u64,
        };
        let dir = self.path.parent().expect("lease lives in server/");
        std::fs::create_dir_all(dir).map_err(|error| error.to_string())?;
        let tmp = dir.join(format!(".lease.{}.{:x}", std::process::id(), fsbridge::random_u64()));
        let mut text = toml::to_string(&record).expect("lease serializes");
        // Always the same size, so that it can be rewritten in place.
        text.push_str(&" ".repeat(LEASE_FILE_BYTES.saturating_sub(text.len() + 1)));
        text.push('\n');
        if let Err(error) = fsbridge::spool::write_file_durably(&tmp, text.as_bytes()) {
            let _ = std::fs::remove_file(&tmp);
            // A full volume: the lease file's own block is rewritten instead (no new space). Only
            // this way can a standby take over, and the active server drain, a volume that filled.
            return self.write_in_place(&text).map_err(|in_place| format!("{error}; in place: {in_place}"));
        }
        std::fs::rename(&tmp, &self.path).map_err(|error| {
            let _ = std::fs::remove_file(&tmp);
            format!("{}: {error}", self.path.display())
        })?;
        fsbridge::spool::sync_directory(dir).map_err(|error| error.to_string())
    }

    fn write_in_place(&self, text: &str) -> Result<(), String> {
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new().write(true).open(&self.path).map_err(|error| error.to_string())?;
        file.write_all_at(text.as_bytes(), 0).and_then(|()| file.sync_data()).map_err(|error| error.to_string())
    }

    /// Rewrites `current` (another holder's record, read from the file) as expired now, so that
    /// [`Lease::try_acquire`] may take it at once: for a holder known to be dead.
    pub fn expire_stale(&self, current: &LeaseRecord) -> Result<(), String> {
        let stale = Lease {
            path: self.path.clone(),
            holder: current.holder.clone(),
            term: Duration::ZERO,
            epoch: 0,
            renewed_at: None,
        };
        stale.write(current.epoch)
    }

    /// Tries to become active. True if this instance now holds the lease.
    pub fn try_acquire(&mut self) -> Result<bool, String> {
        let current = read(&self.path);
        if let Some(current) = &current {
            if current.holder == self.holder && current.epoch == self.epoch && self.epoch > 0 {
                return self.renew();
            }
            if now_ms() < current.expires_unix_ms {
                return Ok(false);
            }
        }
        // The next epoch above any written or claimed (a claimant may have died before writing).
        let highest = self.claims().into_iter().max().unwrap_or(0);
        let epoch = current.map_or(0, |current| current.epoch).max(highest) + 1;
        if !self.claim(epoch)? {
            return Ok(false);
        }
        self.epoch = epoch;
        self.write(epoch)?;
        self.renewed_at = Some(Instant::now());
        Ok(true)
    }

    /// Renews the lease. False if another instance holds it now (this one is deposed).
    pub fn renew(&mut self) -> Result<bool, String> {
        if self.superseded() {
            return Ok(false);
        }
        // A lower epoch in the file is a late write of a deposed instance: overwritten.
        self.write(self.epoch)?;
        self.renewed_at = Some(Instant::now());
        Ok(true)
    }

    /// Gives the lease up at once (it expires now), so another instance may take it without
    /// waiting for the term to run out. Only if this instance still holds it.
    pub fn release(&mut self) -> Result<(), String> {
        let still_mine =
            read(&self.path).is_some_and(|record| record.holder == self.holder && record.epoch == self.epoch);
        if still_mine {
            let saved = self.term;
            self.term = Duration::ZERO;
            let written = self.write(self.epoch);
            self.term = saved;
            written?;
        }
        self.renewed_at = None;
        Ok(())
    }

    /// Renews the lease when due; false once this instance may no longer act (another holds the
    /// lease, or the term is nearly over without a renewal). `what` names it in error messages.
    pub fn keep(&mut self, what: &str) -> bool {
        if self.renewal_due() {
            match self.renew() {
                Ok(true) => {}
                Ok(false) => return false,
                Err(error) => eprintln!("ftss-server: {what}: cannot renew the lease: {error}"),
            }
        }
        self.valid()
    }

    /// For a single (non-HA) server: renews the lease when due; false only once another server
    /// holds it. A renewal that fails (the volume unreachable) is logged and tried again a third of
    /// a term later: with no standby, stopping would only stop the service.
    pub fn keep_unless_taken(&mut self, what: &str) -> bool {
        if !self.renewal_due() {
            return true;
        }
        match self.renew() {
            Ok(still_mine) => still_mine,
            Err(error) => {
                eprintln!("ftss-server: {what}: cannot renew the lease: {error}");
                self.renewed_at = Some(Instant::now());
                true
            }
        }
    }

    /// Runs `open` (recovering a large queue can take longer than a term) while a second thread
    /// keeps the lease renewed, so that no standby takes over an instance that is starting.
    pub fn renew_during<T>(&mut self, what: &str, open: impl FnOnce() -> T) -> T {
        let step = (self.term / 10).max(Duration::from_millis(10));
        // The renewing thread waits on this channel between renewals: when `open` is done the
        // sender is dropped and it stops at once (a plain sleep kept every start waiting for up
        // to a step, a second with the default term).
        let (opened, wait) = std::sync::mpsc::channel::<()>();
        std::thread::scope(|scope| {
            let lease = &mut *self;
            scope.spawn(move || {
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = wait.recv_timeout(step) {
                    if lease.renewal_due()
                        && let Err(error) = lease.renew()
                    {
                        eprintln!("ftss-server: {what}: cannot renew the lease while starting: {error}");
                    }
                }
            });
            let result = open();
            drop(opened);
            result
        })
    }

    /// Is a renewal due (a third of the term since the last one)?
    pub fn renewal_due(&self) -> bool {
        self.renewed_at.is_none_or(|at| at.elapsed() >= self.term / 3)
    }

    /// May this instance still act? It must stop a safety margin before its term would end.
    pub fn valid(&self) -> bool {
        self.renewed_at.is_some_and(|at| at.elapsed() + self.term / 4 < self.term)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Starting with a long lease term returned only after the renewing thread's next step (a
    /// tenth of the term: a second at the default, six minutes here): it returns once the open
    /// is done.
    #[test]
    fn renewing_during_a_quick_open_does_not_wait_for_the_next_renewal() {
        let volume = std::env::temp_dir().join(format!("ftss-lease-{}-{}", std::process::id(), fsbridge::random_u64()));
        let mut lease = Lease::new(&volume, "starting".into(), Duration::from_secs(3600));
        assert!(lease.try_acquire().unwrap());
        // The open takes long enough for the renewing thread to be waiting between renewals.
        let open = || {
            std::thread::sleep(Duration::from_millis(100));
            42
        };
        assert_eq!(lease.renew_during("test", open), 42);
        std::fs::remove_dir_all(&volume).unwrap();
    }

    #[test]
    fn one_holder_at_a_time_and_takeover_after_expiry() {
        let volume = std::env::temp_dir().join(format!("ftss-lease-{}-{}", std::process::id(), fsbridge::random_u64()));
        let term = Duration::from_millis(600);
        let mut first = Lease::new(&volume, "first".into(), term);
        let mut second = Lease::new(&volume, "second".into(), term);
        assert!(first.try_acquire().unwrap());
        assert_eq!(first.epoch(), 1);
        assert!(!second.try_acquire().unwrap(), "took a lease that had not expired");
        assert!(first.renew().unwrap());
        std::thread::sleep(term + Duration::from_millis(50));
        assert!(!first.valid(), "an unrenewed lease must stop being valid before its term ends");
        assert!(second.try_acquire().unwrap());
        assert_eq!(second.epoch(), 2);
        assert!(!first.renew().unwrap(), "the deposed holder renewed");
        assert_eq!(read(&volume.join("server/lease")).unwrap().holder, "second");
        std::fs::remove_dir_all(volume).unwrap();
    }

    /// Item 2 of the durability audit: a standby took the next epoch by rewriting the lease and
    /// reading it back after a pause, so one that had read the expired lease before another's write
    /// could write the same epoch after the other had already checked: two instances, one epoch.
    #[test]
    fn two_standbys_never_win_one_epoch_and_a_deposed_write_does_not_depose_the_successor() {
        let volume = std::env::temp_dir().join(format!("ftss-lease-{}-{}", std::process::id(), fsbridge::random_u64()));
        let path = volume.join("server/lease");
        let term = Duration::from_millis(600);
        let mut old = Lease::new(&volume, "old".into(), term);
        assert!(old.try_acquire().unwrap());
        std::thread::sleep(term + Duration::from_millis(50));
        let expired = std::fs::read(&path).unwrap();
        let mut first = Lease::new(&volume, "first".into(), term);
        let mut second = Lease::new(&volume, "second".into(), term);
        assert!(first.try_acquire().unwrap());
        // The second read the expired lease before the first wrote: it acts on that view now.
        std::fs::write(&path, &expired).unwrap();
        let second_won = second.try_acquire().unwrap();
        assert!(!(second_won && second.epoch() == first.epoch()), "two instances hold epoch {}", first.epoch());
        if second_won {
            assert!(!first.renew().unwrap() && !first.still_acting(), "the first still acts under a later epoch");
        }
        // A deposed instance that writes its old epoch into the lease does not depose the current one.
        let (mut current, mut deposed) = if second_won { (second, first) } else { (first, second) };
        deposed.epoch = current.epoch - 1;
        deposed.write(deposed.epoch).unwrap();
        assert!(current.renew().unwrap(), "a lower epoch in the lease deposed the current holder");
        assert!(current.still_acting());
        assert!(!deposed.still_acting());
        std::fs::remove_dir_all(volume).unwrap();
    }
}
