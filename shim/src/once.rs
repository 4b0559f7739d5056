//! `FTSS_RECV=once`: exactly once per port, across restarts of the receiving app.
//!
//! By default a datagram is delivered at least once: its receipt is written after the app read
//! it, so an app killed in between gets it again in its next incarnation. With `FTSS_RECV=once`,
//! a socket bound to an explicit port records each datagram in the port's once-ledger
//! (`fsbridge::ledger`) and fdatasyncs it *before* recv returns it; a process that binds the port
//! later loads the ledger and never hands those datagrams to its app (it receipts them instead).
//! The sync is the moment of delivery: an app killed after it returned but before the app did
//! anything with the datagram has still had it, as with a datagram the kernel handed over.
//!
//! Cost: one append + fdatasync on the volume per recv. Receives that run at the same time
//! (threads, sockets on the same port) share one sync (group commit: whoever holds the file next
//! writes what all waiting callers queued). Sockets bound to port 0 (replies to an ephemeral port)
//! are left alone: a restarted app never has that port again.
//!
//! When the ledger cannot be written the datagram stays in the socket: a blocking recv waits and
//! tries again, a non-blocking one says EAGAIN after a short pause (an event loop then comes back,
//! without spinning). Nothing is handed that is not recorded, nothing recorded is lost.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex};

use fsbridge::PacketId;
use fsbridge::ledger::{self, Ledger};
use libc::c_int;

use crate::log;
use crate::sys::lock;
use fsbridge::dedupe::Dedupe;

/// Ledger failures remembered per port (enough for every caller waiting when they happen).
const FAILURES_KEPT: usize = 1024;

/// One port's ledger in this process, with its group commit.
pub struct PortLedger {
    port: u16,
    /// The file; held while writing.
    file: Mutex<Ledger>,
    group: Mutex<Group>,
}

#[derive(Default)]
struct Group {
    /// Ids queued by callers since the last write, and the last ticket handed out.
    pending: Vec<(u64, u64)>,
    issued: u64,
    /// Every ticket up to here has been written (or failed, as `failures` says).
    resolved: u64,
    /// Ticket ranges whose write failed, with the errno.
    failures: VecDeque<(u64, u64, c_int)>,
    /// A failure is being reported (logged once until a write works again).
    failing: bool,
}

/// The ledgers this process has open, by port.
#[derive(Default)]
pub struct Ledgers {
    ports: HashMap<u16, Arc<PortLedger>>,
}

impl Ledgers {
    /// Forgets every ledger (a forked child: the files are named for the parent).
    pub fn clear(&mut self) {
        self.ports.clear();
    }
}

/// At bind of `port` in once mode: opens this process's ledger for the port (inheriting those of
/// processes that are gone) and marks everything handed on the port as received, so that it is
/// receipted and never injected. Fails (errno) when the ledger cannot be read or written.
pub fn prepare(
    ledgers: &Mutex<Ledgers>,
    dedupe: &Mutex<Dedupe>,
    node_dir: &Path,
    port: u16,
) -> Result<Arc<PortLedger>, c_int> {
    let mut ledgers = lock(ledgers);
    if let Some(ledger) = ledgers.ports.get(&port) {
        return Ok(ledger.clone());
    }
    let dir = ledger::port_dir(node_dir, port);
    let opened = Ledger::open(&dir).map_err(|error| {
        log!("FTSS_RECV=once: cannot open the ledger of port {port} in {}: {error}", dir.display());
        error.raw_os_error().unwrap_or(libc::EIO)
    })?;
    for (path, bytes) in &opened.unreadable {
        log!("FTSS_RECV=once: {} has {bytes} bytes that are not whole records (ignored)", path.display());
    }
    if opened.inherited_files > 0 || !opened.handed.is_empty() {
        log!(
            "FTSS_RECV=once: port {port}: {} ranges handed by earlier or sibling processes ({} files inherited)",
            opened.handed.len(),
            opened.inherited_files
        );
    }
    {
        let mut dedupe = lock(dedupe);
        for &(epoch, start, end) in &opened.handed {
            dedupe.mark_received_range(epoch, start, end);
        }
    }
    let ledger = Arc::new(PortLedger { port, file: Mutex::new(opened.ledger), group: Mutex::default() });
    ledgers.ports.insert(port, ledger.clone());
    Ok(ledger)
}

impl PortLedger {
    /// Makes `id` durable as handed to the app (see the module docs). Callers that come while
    /// another writes queue their ids; the next writer takes them all in one sync.
    pub fn commit(&self, id: &PacketId) -> Result<(), c_int> {
        let ticket = {
            let mut group = lock(&self.group);
            group.pending.push((Dedupe::epoch_key(id), id.seq));
            group.issued += 1;
            group.issued
        };
        let mut file = lock(&self.file);
        let (batch, last) = {
            let mut group = lock(&self.group);
            if ticket <= group.resolved {
                let failed = group.failures.iter().find(|(first, last, _)| (*first..=*last).contains(&ticket));
                return match failed {
                    Some((_, _, errno)) => Err(*errno),
                    None => Ok(()),
                };
            }
            (std::mem::take(&mut group.pending), group.issued)
        };
        let result = file.append(&batch);
        drop(file);
        let mut group = lock(&self.group);
        let first = group.resolved + 1;
        group.resolved = last;
        match result {
            Ok(()) => {
                if group.failing {
                    group.failing = false;
                    log!("FTSS_RECV=once: the ledger of port {} is written again", self.port);
                }
                Ok(())
            }
            Err(error) => {
                let errno = error.raw_os_error().unwrap_or(libc::EIO);
                if group.failures.len() == FAILURES_KEPT {
                    group.failures.pop_front();
                }
                group.failures.push_back((first, last, errno));
                if !group.failing {
                    group.failing = true;
                    log!(
                        "FTSS_RECV=once: cannot write the ledger of port {} ({error}); datagrams wait in the socket",
                        self.port
                    );
                }
                Err(errno)
            }
        }
    }
}
