//! The node's end of the server's doorbells (see `fsbridge::bell`): which inbox and ack files are
//! new, learnt by reading the bells rather than listing directories, which an NFS client can
//! serve from its cache for up to a minute. A listing ("sweep") still runs every
//! `SWEEP_INTERVAL` for anything a bell missed (a record lost in a crash of the array, a bell
//! not found yet).

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use fsbridge::bell::{BellReader, Ring, RingKind};
use fsbridge::layout::batch_file_name;
use fsbridge::spool::list_names;

use crate::log;
use crate::state::Shim;

/// How often the inbox and ack directories are listed even though the bells are read.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// Bells read (one per server partition writing to this node).
const BELLS_MAX: usize = 64;
/// Announced inbox files remembered per port until claimed (more are left to the sweep).
const ANNOUNCED_PER_PORT_MAX: usize = 4096;
/// Announced ack files remembered until read (more are left to the sweep).
const ANNOUNCED_ACKS_MAX: usize = 4096;
/// Inbox file names remembered as taken (the bell backlog a reader may read again is 1,024
/// records a bell).
const TAKEN_NAMES_MAX: usize = 8192;

pub struct Doorbells {
    readers: Vec<BellReader>,
    swept_at: Option<Instant>,
    /// Ports bound at the last pass.
    bound: HashSet<u16>,
    /// Inbox files announced for each bound port, not yet tried.
    inbox: HashMap<u16, VecDeque<String>>,
    /// Ack files announced for this process, not yet read.
    acks: VecDeque<String>,
    rings: Vec<Ring>,
    /// Inbox files already taken (claimed or tried), oldest first: a bell read again from its
    /// backlog (a newly bound port) or a generation that repeats its predecessor's last records
    /// does not queue them again.
    taken: (HashSet<String>, VecDeque<String>),
}

impl Doorbells {
    pub fn new() -> Doorbells {
        Doorbells {
            readers: Vec::new(),
            swept_at: None,
            bound: HashSet::new(),
            inbox: HashMap::new(),
            acks: VecDeque::new(),
            rings: Vec::new(),
            taken: (HashSet::new(), VecDeque::new()),
        }
    }

    /// Reads the bells for a pass over sockets bound to `ports`; returns whether this pass also
    /// sweeps (lists the directories).
    pub fn pass(&mut self, shim: &Shim, ports: &HashSet<u16>) -> bool {
        let sweep = self.sweep_due();
        if sweep {
            self.swept_at = Some(Instant::now());
            self.discover(shim);
        }
        if ports.iter().any(|port| !self.bound.contains(port)) {
            // A newly bound port: files announced for it before it was bound may still wait.
            self.readers.iter_mut().for_each(BellReader::rewind_backlog);
        }
        self.bound.clone_from(ports);
        self.inbox.retain(|port, _| ports.contains(port));
        let epoch = shim.epoch();
        for reader in &mut self.readers {
            if let Err(error) = reader.poll(sweep, &mut self.rings)
                && sweep
            {
                log!("cannot read bell {}: {error}", reader.path().display());
            }
        }
        for ring in self.rings.drain(..) {
            match ring.kind {
                RingKind::Packets if ports.contains(&ring.port) => {
                    let name = batch_file_name(ring.epoch, ring.seq, "pkt");
                    let names = self.inbox.entry(ring.port).or_default();
                    if names.len() < ANNOUNCED_PER_PORT_MAX && !self.taken.0.contains(&name) {
                        names.push_back(name);
                    }
                }
                RingKind::Acks if ring.epoch == epoch && self.acks.len() < ANNOUNCED_ACKS_MAX => {
                    self.acks.push_back(batch_file_name(ring.epoch, ring.seq, "ack"));
                }
                _ => {}
            }
        }
        sweep
    }

    /// Will the next pass sweep?
    pub fn sweep_due(&self) -> bool {
        self.swept_at.is_none_or(|at| at.elapsed() >= SWEEP_INTERVAL)
    }

    /// Opens readers for bells not read yet (`bell/p0` exists from the node's registration on).
    fn discover(&mut self, shim: &Shim) {
        let dir = shim.volume.bell_dir(&shim.config.node);
        let names = match list_names(&dir, BELLS_MAX) {
            Ok(names) => names,
            Err(error) => {
                log!("cannot list bells: {error}");
                return;
            }
        };
        for name in names {
            let path = dir.join(&name);
            if self.readers.len() < BELLS_MAX && !self.readers.iter().any(|reader| reader.path() == path) {
                self.readers.push(BellReader::with_transient_fd(path, true));
            }
        }
    }

    /// Up to `max` inbox files announced for `port`, oldest first.
    pub fn take_inbox(&mut self, port: u16, max: usize) -> Vec<String> {
        let Some(names) = self.inbox.get_mut(&port) else { return Vec::new() };
        let count = names.len().min(max);
        let names: Vec<String> = names.drain(..count).collect();
        for name in &names {
            if self.taken.0.insert(name.clone()) {
                self.taken.1.push_back(name.clone());
            }
        }
        while self.taken.1.len() > TAKEN_NAMES_MAX {
            if let Some(oldest) = self.taken.1.pop_front() {
                self.taken.0.remove(&oldest);
            }
        }
        names
    }

    /// Returns names taken by `take_inbox` but not tried (the socket was full), to be tried first.
    pub fn put_back_inbox(&mut self, port: u16, names: impl DoubleEndedIterator<Item = String>) {
        let queue = self.inbox.entry(port).or_default();
        for name in names.rev() {
            queue.push_front(name);
        }
    }

    /// Whether inbox files announced for `port` are still waiting.
    pub fn has_inbox(&self, port: u16) -> bool {
        self.inbox.get(&port).is_some_and(|names| !names.is_empty())
    }

    /// Ack files announced for this process.
    pub fn take_acks(&mut self) -> Vec<String> {
        self.acks.drain(..).collect()
    }
}
