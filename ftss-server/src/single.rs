//! One server at a time without `--ha`: a second `ftss-server run` on the same queue directory or
//! the same volume refuses to start and names the one running (as Kafka's `.lock` in every log dir
//! and PostgreSQL's `postmaster.pid` do). Two writers in one queue interleave records and lose
//! acked packets.
//!
//! - **Each queue directory**: an exclusive `flock` on `<dir>/LOCK`, held for the process's life
//!   (the kernel drops it when the process dies, however it dies); the file says who holds it.
//! - **The volume**: the HA lease (`server/lease`), taken by the single server too and renewed while
//!   it runs, so that a server on another host (with its own queue directories) sees it. A lease
//!   whose holder is provably dead (this host, and a process or boot that is gone) is taken at once
//!   instead of after its term, so that a restart after a crash does not wait.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use crate::lease::{self, Lease};

/// The lock file in each queue directory.
pub const LOCK_FILE: &str = "LOCK";
/// The term of a single server's lease on the volume.
pub const LEASE_TERM: Duration = Duration::from_secs(10);
/// The holder prefix of a single (non-HA) server's lease.
const HOLDER_PREFIX: &str = "single";

/// What this process is, for lock files and the lease: host, boot, pid, start time.
pub struct Identity {
    pub host: String,
    pub boot: String,
    pub pid: u32,
    pub since_unix_s: u64,
}

impl Identity {
    pub fn this_process() -> Identity {
        let host = nix::unistd::gethostname().ok().and_then(|name| name.into_string().ok()).unwrap_or_default();
        let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default().trim().to_owned();
        Identity { host, boot, pid: std::process::id(), since_unix_s: fsbridge::unix_now_us() / 1_000_000 }
    }

    /// The lease holder string: `single:<host>:<boot>:<pid>:<since>`.
    fn holder(&self) -> String {
        format!("{HOLDER_PREFIX}:{}:{}:{}:{}", self.host, self.boot, self.pid, self.since_unix_s)
    }

    fn describe(&self) -> String {
        format!("pid {} on host {} since {} (unix seconds)", self.pid, self.host, self.since_unix_s)
    }
}

/// Parses a holder written by [`Identity::holder`].
fn parse_holder(holder: &str) -> Option<Identity> {
    let mut parts = holder.split(':');
    if parts.next()? != HOLDER_PREFIX {
        return None;
    }
    let host = parts.next()?.to_owned();
    let boot = parts.next()?.to_owned();
    let pid = parts.next()?.parse().ok()?;
    let since_unix_s = parts.next()?.parse().ok()?;
    Some(Identity { host, boot, pid, since_unix_s })
}

/// Is the process `holder` names gone for sure? Only provable on this host: another boot, or no
/// such process (or a zombie).
fn holder_is_dead(holder: &Identity, me: &Identity) -> bool {
    if holder.host != me.host {
        return false;
    }
    if holder.boot != me.boot || holder.pid == me.pid {
        return true;
    }
    match std::fs::read_to_string(format!("/proc/{}/stat", holder.pid)) {
        Err(_) => true,
        // The state follows the parenthesized command name.
        Ok(stat) => stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

/// The locks and the lease of a single server (the locks go with the process; the lease expires).
pub struct Guard {
    /// Held until dropped.
    pub locks: Vec<Flock<File>>,
    /// To be kept ([`Lease::keep`]) while the server runs.
    pub lease: Lease,
}

/// Takes every queue directory's lock, then the volume's lease; an error names the server that
/// holds either.
pub fn claim(volume: &Path, queue_dirs: &[PathBuf]) -> Result<Guard, String> {
    let me = Identity::this_process();
    let locks = lock_queue_dirs(queue_dirs, &me)?;
    let path = volume.join("server").join("lease");
    let mut lease = Lease::new(volume, me.holder(), LEASE_TERM);
    if let Some(current) = lease::read(&path) {
        let alive = fsbridge::unix_now_us() / 1000 < current.expires_unix_ms;
        let dead = parse_holder(&current.holder).is_some_and(|holder| holder_is_dead(&holder, &me));
        if alive && !dead {
            let who = parse_holder(&current.holder)
                .map_or_else(|| format!("instance {:?} (--ha)", current.holder), |holder| holder.describe());
            return Err(format!(
                "another ftss-server is running on volume {}: {who}, holding {} (stop it first, or run every \
                 instance with --ha)",
                volume.display(),
                path.display()
            ));
        }
        if alive {
            // Its holder is gone: let the lease lapse now rather than wait out its term.
            lease.expire_stale(&current).map_err(|error| format!("{}: {error}", path.display()))?;
        }
    }
    match lease.try_acquire() {
        Ok(true) => Ok(Guard { locks, lease }),
        Ok(false) => {
            let holder = lease::read(&path).map(|record| record.holder).unwrap_or_default();
            Err(format!("another ftss-server took volume {} at the same moment ({holder})", volume.display()))
        }
        Err(error) => Err(format!("taking the volume's lease {}: {error}", path.display())),
    }
}

/// Locks every queue directory (a server's, or `scrub`'s while it repairs them).
pub fn lock_queue_dirs(queue_dirs: &[PathBuf], me: &Identity) -> Result<Vec<Flock<File>>, String> {
    queue_dirs.iter().map(|dir| lock_dir(dir, me)).collect()
}

/// Locks `<dir>/LOCK` exclusively and writes who holds it.
fn lock_dir(dir: &Path, me: &Identity) -> Result<Flock<File>, String> {
    std::fs::create_dir_all(dir).map_err(|error| format!("{}: {error}", dir.display()))?;
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|error| format!("{}: {error}", path.display()))?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(mut lock) => {
            let text = format!("{}\n", me.describe());
            let written = lock.set_len(0).and_then(|()| lock.write_all(text.as_bytes()));
            written.map_err(|error| format!("{}: {error}", path.display()))?;
            Ok(lock)
        }
        Err((_, Errno::EWOULDBLOCK)) => {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            Err(format!(
                "another ftss-server is using queue directory {}: {} (lock {})",
                dir.display(),
                holder.trim(),
                path.display()
            ))
        }
        Err((_, errno)) => Err(format!("locking {}: {errno}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holders_round_trip_and_only_provably_dead_ones_are_dead() {
        let me = Identity::this_process();
        let parsed = parse_holder(&me.holder()).unwrap();
        assert_eq!((parsed.host.as_str(), parsed.pid), (me.host.as_str(), me.pid));
        // This very process is "dead" as a holder: a record from before a reboot that reused our pid.
        assert!(holder_is_dead(&parsed, &me));
        let other_boot = Identity { boot: "another-boot".into(), pid: 1, ..Identity::this_process() };
        assert!(holder_is_dead(&other_boot, &me));
        let other_host = Identity { host: "elsewhere".into(), pid: 999_999, ..Identity::this_process() };
        assert!(!holder_is_dead(&other_host, &me));
        let live = Identity { pid: 1, ..Identity::this_process() };
        assert!(!holder_is_dead(&live, &me), "pid 1 lives");
        assert!(parse_holder("instance-a").is_none());
    }
}
