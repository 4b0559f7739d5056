//! High availability: which of several ftss-server instances is active, decided by a lease kept on
//! the volume (`server/lease`), so that a standby can take over when the active one dies.
//!
//! - The active instance renews the lease every third of its term. If it cannot renew (the volume is
//!   unreachable, or another instance holds the lease) it stops before the term ends.
//! - A standby takes over only after the lease has expired, by writing a lease with the next epoch
//!   (tmp + rename) and reading it back after a pause: of two standbys racing, the later rename wins
//!   and the other sees a holder that is not itself.
//! - The epoch is a fencing token: a new active instance fences the queue at the epoch it won
//!   (`Queue::fence`), so late appends of a deposed instance are cut off at the next recovery.
//!
//! No locks: NFS, SMB and Gluster all do rename atomically, which is all this needs.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

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
        let text = toml::to_string(&record).expect("lease serializes");
        fsbridge::spool::write_file_durably(&tmp, text.as_bytes()).map_err(|error| error.to_string())?;
        std::fs::rename(&tmp, &self.path).map_err(|error| {
            let _ = std::fs::remove_file(&tmp);
            format!("{}: {error}", self.path.display())
        })?;
        fsbridge::spool::sync_directory(dir).map_err(|error| error.to_string())
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
        let epoch = current.map_or(1, |current| current.epoch + 1);
        self.write(epoch)?;
        // Let a racing standby's rename land, then see who won.
        std::thread::sleep((self.term / 10).min(Duration::from_millis(500)));
        let won = read(&self.path).is_some_and(|record| record.holder == self.holder && record.epoch == epoch);
        if won {
            self.epoch = epoch;
            self.renewed_at = Some(Instant::now());
        }
        Ok(won)
    }

    /// Renews the lease. False if another instance holds it now (this one is deposed).
    pub fn renew(&mut self) -> Result<bool, String> {
        let still_mine =
            read(&self.path).is_some_and(|record| record.holder == self.holder && record.epoch == self.epoch);
        if !still_mine {
            return Ok(false);
        }
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
}
