//! Inbox files this process claimed whose packets the app has not all read yet.
//!
//! A claimed file (renamed to `tmp/<file>.claimed-<pid>` in its inbox) is kept while any of its
//! packets waits in one of this process's sockets, and its mtime is refreshed every second: the
//! server does not deliver those packets again while the claim is fresh, so a sibling process on
//! the same port (SO_REUSEPORT apps, forked receivers with sockets of their own) never gets a copy
//! of a packet this one will still hand over. Once every packet of the file is read, or its socket
//! closes, the file goes; if this process dies, the claim goes stale and the server delivers again.
//!
//! Only bookkeeping here: the receive thread does the file system work (never the app's `recv`).

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// How often a held claim's mtime is refreshed (the server takes a claim for live for a few times
/// this).
pub const TOUCH_EVERY: Duration = Duration::from_secs(1);

struct Claim {
    path: PathBuf,
    sock: u64,
    waiting: usize,
    touched: Instant,
}

#[derive(Default)]
pub struct Claims {
    files: HashMap<u64, Claim>,
    /// Packet key (see `Dedupe::key`) → the claim holding it.
    by_packet: HashMap<u128, u64>,
    next: u64,
}

/// What the receive thread has to do for the claims this pass.
#[derive(Default)]
pub struct Chores {
    pub remove: Vec<PathBuf>,
    pub touch: Vec<PathBuf>,
}

impl Claims {
    /// `path` holds `packets` now waiting in socket `sock`. False if there are none (the caller
    /// removes the file at once).
    pub fn hold(&mut self, path: PathBuf, sock: u64, packets: &[u128]) -> bool {
        if packets.is_empty() {
            return false;
        }
        self.next += 1;
        let claim = self.next;
        let mut waiting = 0;
        for key in packets {
            if self.by_packet.insert(*key, claim).is_none() {
                waiting += 1;
            }
        }
        self.files.insert(claim, Claim { path, sock, waiting, touched: Instant::now() });
        true
    }

    /// The app read the packet with `key`.
    pub fn read(&mut self, key: u128) {
        if let Some(claim) = self.by_packet.remove(&key)
            && let Some(file) = self.files.get_mut(&claim)
        {
            file.waiting = file.waiting.saturating_sub(1);
        }
    }

    /// Claims that are done (all read, or their socket closed) go; the others are touched when due.
    pub fn chores(&mut self, open: &HashSet<u64>) -> Chores {
        let mut chores = Chores::default();
        let done: Vec<u64> = self
            .files
            .iter()
            .filter(|(_, file)| file.waiting == 0 || !open.contains(&file.sock))
            .map(|(claim, _)| *claim)
            .collect();
        for claim in done {
            let file = self.files.remove(&claim).expect("listed");
            chores.remove.push(file.path);
            self.by_packet.retain(|_, holder| *holder != claim);
        }
        for file in self.files.values_mut() {
            if file.touched.elapsed() >= TOUCH_EVERY {
                file.touched = Instant::now();
                chores.touch.push(file.path.clone());
            }
        }
        chores
    }

    /// A forked child: the claims are its parent's.
    pub fn clear(&mut self) {
        self.files.clear();
        self.by_packet.clear();
    }

    /// Every claimed file (removed at exit: what is unread will be delivered again).
    pub fn take_all(&mut self) -> Vec<PathBuf> {
        self.by_packet.clear();
        self.files.drain().map(|(_, file)| file.path).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claim_goes_once_every_packet_is_read_or_its_socket_closes() {
        let mut claims = Claims::default();
        assert!(!claims.hold("empty".into(), 1, &[]));
        assert!(claims.hold("f1".into(), 1, &[10, 11]));
        assert!(claims.hold("f2".into(), 2, &[20]));
        claims.read(10);
        let open: HashSet<u64> = [1, 2].into_iter().collect();
        assert!(claims.chores(&open).remove.is_empty());
        claims.read(11);
        assert_eq!(claims.chores(&open).remove, vec![PathBuf::from("f1")]);
        let only_one: HashSet<u64> = [1].into_iter().collect();
        assert_eq!(claims.chores(&only_one).remove, vec![PathBuf::from("f2")]);
        assert!(claims.files.is_empty() && claims.by_packet.is_empty());
    }
}
