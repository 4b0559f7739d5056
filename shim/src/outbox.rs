//! The process's outbox writer: group commit of datagrams into batches on the volume.
//!
//! Senders push packets into a bounded ring (`ringbuf`) and get a sequence number; one flusher thread
//! takes everything in the ring, appends it as one batch to the process's outbox log with one
//! fdatasync (`fsbridge::log`; or, with `FTSS_OUTBOX=files`, publishes it as one batch file with
//! its fsyncs), and then wakes every
//! sender whose sequence number is now published. Concurrent senders therefore share one batch and
//! one sync; a sender in `volume` mode returns only once its batch is published, in `async` mode as
//! soon as the ring took it.
//!
//! Over the fabric transport the flusher writes each batch as a frame instead, and a packet counts
//! as published when the server's "stored" ack for it arrives: until then it stays in `unacked`
//! (bounded, and still counted in the ring's byte bound) and is sent again after a reconnect.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Condvar, Mutex, MutexGuard, TryLockError};
use std::thread::Thread;
use std::time::{Duration, Instant};

use fsbridge::format::{BATCH_BYTES_MAX, BatchEncoder, FLAG_WANTS_ACKS, RECORD_OVERHEAD_BYTES};
use fsbridge::layout::batch_file_name;
use fsbridge::log::LogWriter;
use fsbridge::{BatchHeader, BatchKind, NodeName, Packet, Record, Spool};
use ringbuf::traits::{Consumer, Observer, Producer, Split};
use ringbuf::{HeapCons, HeapProd, HeapRb};

use crate::fabric::{Link, Wire};
use crate::log;
use crate::sys::SignalsHeld;

/// Most packets waiting in the ring.
pub const RING_PACKETS_MAX: usize = 8192;
/// Most payload bytes waiting in the ring (the memory bound of the send path).
pub const RING_BYTES_MAX: usize = 16 * 1024 * 1024;
/// Most bytes in one batch file; a larger backlog is split.
const BATCH_FILE_BYTES_MAX: usize = BATCH_BYTES_MAX / 4;
/// Packets sent over the fabric and not yet acked; the flusher takes no more from the ring beyond.
pub const UNACKED_PACKETS_MAX: usize = RING_PACKETS_MAX;
/// Failed batches remembered so that their senders can be told; older ones have no waiter left.
const FAILURES_MAX: usize = 64;
/// Most packets the flusher waits to gather for one batch.
const GATHER_PACKETS_MAX: usize = 256;
/// Longest the flusher waits to gather them (at most half the last publish's time).
const GATHER_WAIT_MAX: Duration = Duration::from_micros(200);
/// Pause before the flusher retries a batch whose publish failed.
const PUBLISH_RETRY_PAUSE: Duration = Duration::from_millis(100);
/// Publish attempts for one batch before its senders are failed with EIO.
const PUBLISH_ATTEMPTS_MAX: u32 = 5;

/// Why a send failed; each maps to the errno the app sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// The ring is full and the socket is non-blocking (or its SO_SNDTIMEO expired): EAGAIN.
    #[error("the outbox ring is full")]
    WouldBlock,
    /// Durability (or the server's ack) did not come within FTSS_TIMEOUT: ETIMEDOUT. The datagram
    /// may still be delivered later (it stays queued or published).
    #[error("no durability or ack within FTSS_TIMEOUT")]
    TimedOut,
    /// The batch could not be published on the volume (errno of the cause).
    #[error("the batch could not be published on the volume (errno {0})")]
    Io(i32),
}

impl SendError {
    /// The errno the app sees. A publish failure passes its cause on (ENOSPC for a full volume,
    /// which tests/faults.rs expects), EIO when there is none.
    pub fn errno(self) -> i32 {
        match self {
            SendError::WouldBlock => libc::EAGAIN,
            SendError::TimedOut => libc::ETIMEDOUT,
            SendError::Io(0) => libc::EIO,
            SendError::Io(errno) => errno,
        }
    }
}

struct State {
    producer: HeapProd<Packet>,
    next_seq: u64,
    /// Every seq ≤ this has been handled by the flusher (published or failed).
    published_seq: u64,
    queued_bytes: usize,
    failures: VecDeque<(u64, u64, i32)>,
    /// Seqs whose sender waits for the server's ack (guaranteed mode), registered when queued so
    /// an ack read early is not missed.
    awaiting_ack: BTreeSet<u64>,
    /// Seqs of `awaiting_ack` the server has acked as stored.
    acked: BTreeSet<u64>,
    /// Fabric: packets sent and not yet acked, by seq.
    unacked: BTreeMap<u64, Packet>,
    /// Fabric: the highest seq taken from the ring.
    taken_seq: u64,
    /// Fabric: the flusher must look at the link again (it reconnected).
    nudged: bool,
    /// Ring occupancy at which a sender wakes the flusher: 1 normally, more while it gathers a
    /// batch (so that it is not woken for every packet it is waiting for anyway).
    wake_at: usize,
    /// Senders parked until their seq is published (with `park_published`), by seq, one sender
    /// per seq. Each is woken alone once its seq is, not every waiting sender at every ack.
    published_waiters: BTreeMap<u64, Thread>,
    /// Senders parked until their seq's ack arrives (guaranteed mode), by seq.
    ack_waiters: BTreeMap<u64, Thread>,
    /// Threads waiting on `progress`.
    progress_waiters: usize,
}

/// Who sends fabric batches holds this: the flusher, or a sender that writes its own packet.
struct FabricSend {
    /// The last batch's seq on the connection.
    batch_seq: u64,
    /// The connection generation whose unacked packets were all sent again.
    sent_generation: u64,
}

/// The shared outbox of one process.
pub struct Outbox {
    state: Mutex<State>,
    fabric_send: Mutex<FabricSend>,
    consumer: Mutex<HeapCons<Packet>>,
    /// Signalled when the ring gains packets.
    work: Condvar,
    /// Signalled when a batch is published or fails, or an ack arrives, if a thread waits on it:
    /// for room, for idleness, or (on the volume) for its seq to be published.
    progress: Condvar,
    spool: Spool,
    /// The process's outbox log (`FTSS_OUTBOX=log`); without it each batch is a file in `spool`.
    log: Mutex<Option<LogWriter>>,
    node: NodeName,
    epoch: u64,
    /// Senders wait for the server's stored acks (guaranteed mode): batches ask the server for them.
    wants_acks: bool,
    /// Senders waiting for their seq to be published park and are woken one by one (over the
    /// fabric, where acks come in small, uneven groups). Otherwise they share `progress`: each
    /// batch on the volume releases nearly every waiting sender, which one broadcast does in one
    /// system call.
    park_published: bool,
}

impl Outbox {
    pub fn new(spool: Spool, log: Option<LogWriter>, node: NodeName, epoch: u64, wants_acks: bool) -> Outbox {
        let (producer, consumer) = HeapRb::<Packet>::new(RING_PACKETS_MAX).split();
        Outbox {
            state: Mutex::new(State {
                producer,
                next_seq: 1,
                published_seq: 0,
                queued_bytes: 0,
                failures: VecDeque::new(),
                awaiting_ack: BTreeSet::new(),
                acked: BTreeSet::new(),
                unacked: BTreeMap::new(),
                taken_seq: 0,
                nudged: false,
                wake_at: 1,
                published_waiters: BTreeMap::new(),
                ack_waiters: BTreeMap::new(),
                progress_waiters: 0,
            }),
            fabric_send: Mutex::new(FabricSend { batch_seq: 0, sent_generation: 0 }),
            consumer: Mutex::new(consumer),
            work: Condvar::new(),
            progress: Condvar::new(),
            spool,
            log: Mutex::new(log),
            node,
            epoch,
            wants_acks,
            park_published: false,
        }
    }

    /// Wakes each sender waiting for its seq to be published alone (the fabric's acks).
    pub fn with_targeted_wakeups(mut self) -> Outbox {
        self.park_published = true;
        self
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Queues a packet built by `build(seq)`; returns its seq once it is in the ring. With
    /// `wants_ack` the sender will call [`Outbox::wait_acked`] for it.
    pub fn enqueue(
        &self,
        payload_len: usize,
        nonblocking: bool,
        deadline: Instant,
        wants_ack: bool,
        wake_flusher: bool,
        build: impl FnOnce(u64) -> Packet,
    ) -> Result<u64, SendError> {
        let mut state = self.lock();
        loop {
            let fits = state.producer.vacant_len() > 0 && state.queued_bytes + payload_len <= RING_BYTES_MAX;
            if fits {
                break;
            }
            if nonblocking {
                return Err(SendError::WouldBlock);
            }
            state = self.wait(state, deadline)?;
        }
        let seq = state.next_seq;
        state.next_seq += 1;
        state.queued_bytes += payload_len;
        if wants_ack {
            state.awaiting_ack.insert(seq);
        }
        let pushed = state.producer.try_push(build(seq));
        assert!(pushed.is_ok(), "ring had room under the lock");
        let wake = wake_flusher && state.producer.occupied_len() >= state.wake_at;
        drop(state);
        if wake {
            self.work.notify_one();
        }
        Ok(seq)
    }

    fn wait<'a>(
        &self,
        mut state: MutexGuard<'a, State>,
        deadline: Instant,
    ) -> Result<MutexGuard<'a, State>, SendError> {
        let now = Instant::now();
        if now >= deadline {
            return Err(SendError::TimedOut);
        }
        state.progress_waiters += 1;
        let (mut state, _) =
            self.progress.wait_timeout(state, deadline - now).unwrap_or_else(|poisoned| poisoned.into_inner());
        state.progress_waiters -= 1;
        Ok(state)
    }

    /// Parks the calling thread, registered in `waiters` under `seq`, until it is woken or
    /// `deadline` passes. Woken or not, it is no longer registered when this returns.
    fn park<'a>(
        &'a self,
        mut state: MutexGuard<'a, State>,
        seq: u64,
        deadline: Instant,
        waiters: fn(&mut State) -> &mut BTreeMap<u64, Thread>,
    ) -> Result<MutexGuard<'a, State>, SendError> {
        let now = Instant::now();
        if now >= deadline {
            return Err(SendError::TimedOut);
        }
        waiters(&mut state).insert(seq, std::thread::current());
        drop(state);
        // An unpark that came first makes this return at once; a spurious return looks again.
        std::thread::park_timeout(deadline - now);
        let mut state = self.lock();
        waiters(&mut state).remove(&seq);
        Ok(state)
    }

    /// Wakes the senders whose seq is now published or acked (`acked`), and the threads waiting
    /// on `progress` if any. Takes the lock held since the change and lets it go first, so that
    /// those woken do not run into it.
    fn wake_waiters(&self, mut state: MutexGuard<'_, State>, acked: &[u64]) {
        let first_unpublished = state.published_seq + 1;
        let later = state.published_waiters.split_off(&first_unpublished);
        let mut woken: Vec<Thread> = std::mem::replace(&mut state.published_waiters, later).into_values().collect();
        woken.extend(acked.iter().filter_map(|seq| state.ack_waiters.remove(seq)));
        let broadcast = state.progress_waiters > 0;
        drop(state);
        for thread in woken {
            thread.unpark();
        }
        if broadcast {
            self.progress.notify_all();
        }
    }

    /// Waits until `seq` is published (or its batch failed).
    pub fn wait_published(&self, seq: u64, deadline: Instant) -> Result<(), SendError> {
        let mut state = self.lock();
        while state.published_seq < seq {
            state = match self.park_published {
                true => self.park(state, seq, deadline, |state| &mut state.published_waiters)?,
                false => self.wait(state, deadline)?,
            };
        }
        match state.failures.iter().find(|(first, last, _)| (*first..=*last).contains(&seq)) {
            Some((_, _, errno)) => Err(SendError::Io(*errno)),
            None => Ok(()),
        }
    }

    /// Waits until the server's "stored" ack for `seq` (queued with `wants_ack`) has been seen. The
    /// caller then calls [`Outbox::stop_awaiting`], whatever the outcome.
    pub fn wait_acked(&self, seq: u64, deadline: Instant) -> Result<(), SendError> {
        let mut state = self.lock();
        while !state.acked.contains(&seq) {
            state = self.park(state, seq, deadline, |state| &mut state.ack_waiters)?;
        }
        Ok(())
    }

    /// The sender of `seq` no longer waits for its ack (it has it, or gave up).
    pub fn stop_awaiting(&self, seq: u64) {
        let mut state = self.lock();
        state.awaiting_ack.remove(&seq);
        state.acked.remove(&seq);
    }

    /// Records acks read from the volume (seqs of this process's epoch). Only seqs a sender waits
    /// for are kept, so the set is bounded by the senders waiting.
    pub fn record_acks(&self, seqs: impl IntoIterator<Item = u64>) {
        let mut state = self.lock();
        let fresh: Vec<u64> = seqs.into_iter().filter(|seq| state.awaiting_ack.contains(seq)).collect();
        if fresh.is_empty() {
            return;
        }
        state.acked.extend(fresh.iter().copied());
        self.wake_waiters(state, &fresh);
    }

    /// Does any sender wait for an ack? (The receive thread reads ack files only then.)
    pub fn awaits_acks(&self) -> bool {
        !self.lock().awaiting_ack.is_empty()
    }

    /// Waits until everything queued is published or `deadline` passes (at exit, for async mode).
    pub fn wait_idle(&self, deadline: Instant) -> bool {
        let mut state = self.lock();
        while state.published_seq + 1 != state.next_seq {
            match self.wait(state, deadline) {
                Ok(next) => state = next,
                Err(_) => return false,
            }
        }
        true
    }

    /// Seals the outbox log (at exit, once idle) so that the server removes it as soon as it has
    /// read it.
    pub fn seal_log(&self) {
        if let Some(log) = self.log.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).as_mut() {
            log.seal();
        }
    }

    /// Is anything queued or being published? (The flusher's exit and the tests use it.)
    pub fn idle(&self) -> bool {
        let state = self.lock();
        state.published_seq + 1 == state.next_seq
    }

    /// The flusher thread's body: publish batches forever.
    pub fn run_flusher(&self) {
        let mut batch_seq = 0u64;
        let (mut expected, mut gather) = (1, Duration::ZERO);
        loop {
            let packets = self.take_batch(expected, gather);
            batch_seq += 1;
            let first = packets[0].id.seq;
            let last = packets[packets.len() - 1].id.seq;
            let bytes: usize = packets.iter().map(|packet| packet.payload.len()).sum();
            let started = Instant::now();
            let outcome = self.publish(batch_seq, &packets);
            expected = packets.len().min(GATHER_PACKETS_MAX);
            gather = (started.elapsed() / 2).min(GATHER_WAIT_MAX);
            let mut state = self.lock();
            if let Err(errno) = outcome {
                state.failures.push_back((first, last, errno));
                if state.failures.len() > FAILURES_MAX {
                    state.failures.pop_front();
                }
            }
            state.published_seq = last;
            state.queued_bytes -= bytes;
            self.wake_waiters(state, &[]);
        }
    }

    /// The flusher over the fabric: sends batches as frames on the link's connection, and after
    /// every reconnect first sends again everything not yet acked (the server drops duplicates).
    pub fn run_fabric_flusher(&self, link: &Link) {
        loop {
            let Some((wire, generation)) = link.current() else {
                self.wait_nudge();
                continue;
            };
            let mut send = self.lock_fabric_send();
            if generation != send.sent_generation {
                let unacked: Vec<Packet> = self.lock().unacked.values().cloned().collect();
                let resent = split_batches(&unacked).into_iter().all(|chunk| {
                    send.batch_seq += 1;
                    link.send_packets(&wire, send.batch_seq, chunk)
                });
                if !resent {
                    continue;
                }
                if !unacked.is_empty() {
                    log!("fabric: sent {} unacknowledged datagrams again", unacked.len());
                }
                send.sent_generation = generation;
            }
            drop(send);
            self.wait_fabric_work();
            // A sender may have sent them meanwhile. A connection that changed meanwhile first
            // gets the unacked again (the loop's top).
            let Some((wire, generation)) = link.current() else { continue };
            let mut send = self.lock_fabric_send();
            if send.sent_generation == generation {
                self.send_fabric_batch(&mut send, link, &wire);
            }
        }
    }

    /// A sender that waits for its packet's ack sends it itself, with whatever else is queued,
    /// when no one else is sending and the connection is up and caught up: one thread wakeup less
    /// on its round trip. Returns false if it did not leave the ring empty (the flusher must look).
    pub fn send_fabric_now(&self, link: &Link) -> bool {
        // Before any lock: a handler that sends must not find this thread's locks held.
        let _signals = SignalsHeld::hold();
        let mut send = match self.fabric_send.try_lock() {
            Ok(send) => send,
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(TryLockError::WouldBlock) => return false,
        };
        let Some((wire, generation)) = link.current() else { return false };
        if generation != send.sent_generation {
            return false;
        }
        // Only a frame the connection takes at once, and only if no other thread is writing on
        // it: the app's thread never waits on the server or on another writer with its signals
        // held (see `Wire::direct_room`).
        let room = wire.direct_room();
        if room == 0 {
            return false;
        }
        let Some(mut sealer) = wire.try_sealer() else { return false };
        let packets = self.take_fabric_packets(room, true);
        if !packets.is_empty() {
            send.batch_seq += 1;
            // A failed write ends the connection; the packets are unacked and go again.
            link.write_sealed(&wire, &mut sealer, &link.packets_frame(send.batch_seq, &packets));
        }
        drop(sealer);
        self.lock().producer.occupied_len() == 0
    }

    /// Wakes the flusher for what a sender queued.
    pub fn wake_flusher(&self) {
        self.work.notify_one();
    }

    fn lock_fabric_send(&self) -> MutexGuard<'_, FabricSend> {
        self.fabric_send.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Takes a batch (as much as the unacked window has room for) and sends it. A failed write
    /// leaves them unacked; they go again on the next connection.
    fn send_fabric_batch(&self, send: &mut FabricSend, link: &Link, wire: &Wire) {
        let packets = self.take_fabric_packets(BATCH_FILE_BYTES_MAX, false);
        if !packets.is_empty() {
            send.batch_seq += 1;
            link.send_packets(wire, send.batch_seq, &packets);
        }
    }

    /// Takes packets for a fabric frame of up to `bytes_max` (with `strict`, the first packet must
    /// fit too; otherwise it is taken whatever its size), as many as the unacked window has room
    /// for, and records them as unacked. The caller holds `fabric_send`.
    fn take_fabric_packets(&self, bytes_max: usize, strict: bool) -> Vec<Packet> {
        let packets = {
            let mut consumer = self.consumer.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let room = UNACKED_PACKETS_MAX.saturating_sub(self.lock().unacked.len());
            Self::take_from(&mut consumer, room, bytes_max, strict)
        };
        if let Some(last) = packets.last() {
            let mut state = self.lock();
            state.taken_seq = last.id.seq;
            for packet in &packets {
                state.unacked.insert(packet.id.seq, packet.clone());
            }
        }
        packets
    }

    /// Wakes the fabric flusher to look at the link (it reconnected).
    pub fn nudge(&self) {
        self.lock().nudged = true;
        self.work.notify_all();
    }

    fn wait_nudge(&self) {
        let mut state = self.lock();
        while !state.nudged {
            state = self.work.wait(state).unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        state.nudged = false;
    }

    /// Blocks until the ring has packets and the unacked set has room, or a nudge.
    fn wait_fabric_work(&self) {
        let mut state = self.lock();
        while (state.producer.occupied_len() == 0 || state.unacked.len() >= UNACKED_PACKETS_MAX) && !state.nudged {
            state = self.work.wait(state).unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        state.nudged = false;
    }

    /// Records the server's stored acks for fabric packets: they are published now.
    pub fn fabric_acked(&self, seqs: &[u64]) {
        let mut state = self.lock();
        // Only then may the flusher wait for these acks (for room in the window); otherwise it
        // waits for packets, and waking it would cost a wakeup for nothing at every ack.
        let flusher_waits_for_room = state.unacked.len() >= UNACKED_PACKETS_MAX;
        let mut freed = 0;
        for seq in seqs {
            if let Some(packet) = state.unacked.remove(seq) {
                freed += packet.payload.len();
            }
        }
        state.queued_bytes -= freed;
        let published = state.unacked.keys().next().map_or(state.taken_seq, |first| first - 1);
        state.published_seq = state.published_seq.max(published);
        let fresh: Vec<u64> = seqs.iter().copied().filter(|seq| state.awaiting_ack.contains(seq)).collect();
        state.acked.extend(fresh.iter().copied());
        self.wake_waiters(state, &fresh);
        if flusher_waits_for_room {
            self.work.notify_all();
        }
    }

    /// Blocks until the ring has packets; then waits up to `gather` for `expected` of them (the
    /// senders the last batch released are about to send again: one sync for all of them beats a
    /// sync for the first and another for the rest); takes as many as fit one batch.
    fn take_batch(&self, expected: usize, gather: Duration) -> Vec<Packet> {
        let mut consumer = self.consumer.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut state = self.lock();
        while consumer.is_empty() {
            state = self.work.wait(state).unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        let deadline = Instant::now() + gather;
        state.wake_at = expected;
        while consumer.occupied_len() < expected {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            state = self.work.wait_timeout(state, deadline - now).unwrap_or_else(|poisoned| poisoned.into_inner()).0;
        }
        state.wake_at = 1;
        drop(state);
        Self::take_from(&mut consumer, usize::MAX, BATCH_FILE_BYTES_MAX, false)
    }

    /// Takes up to `count` packets from the ring, as many as fit `bytes_max` (the first one
    /// whatever its size, unless `strict`).
    fn take_from(consumer: &mut HeapCons<Packet>, count: usize, bytes_max: usize, strict: bool) -> Vec<Packet> {
        let mut packets = Vec::new();
        let mut bytes = 0;
        while packets.len() < count
            && let Some(packet) = consumer.try_peek()
        {
            let size = batch_bytes(packet);
            if (strict || !packets.is_empty()) && bytes + size > bytes_max {
                break;
            }
            bytes += size;
            packets.push(consumer.try_pop().expect("peeked"));
        }
        packets
    }

    fn publish(&self, batch_seq: u64, packets: &[Packet]) -> Result<(), i32> {
        let flags = if self.wants_acks { FLAG_WANTS_ACKS } else { 0 };
        let header =
            BatchHeader { kind: BatchKind::Packets, node: self.node.clone(), epoch: self.epoch, batch_seq, flags };
        let mut encoder = BatchEncoder::new(&header);
        for packet in packets {
            encoder.push(&Record::Packet(packet.clone()));
        }
        let bytes = encoder.finish();
        let name = batch_file_name(self.epoch, batch_seq, "pkt");
        let mut log = self.log.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut attempt = 0;
        loop {
            attempt += 1;
            let published = match log.as_mut() {
                Some(log) => log.append(&bytes),
                None => self.spool.publish(&name, &bytes).map(drop),
            };
            match published {
                Ok(()) => return Ok(()),
                Err(error) if attempt < PUBLISH_ATTEMPTS_MAX => {
                    log!("publish of {name} failed (attempt {attempt}): {error}; retrying");
                    std::thread::sleep(PUBLISH_RETRY_PAUSE);
                }
                Err(error) => {
                    log!("publish of {name} failed, {} datagrams not sent: {error}", packets.len());
                    return Err(error.raw_os_error().unwrap_or(libc::EIO));
                }
            }
        }
    }
}

/// Bytes a packet adds to a batch, with room for its id and addresses.
fn batch_bytes(packet: &Packet) -> usize {
    packet.payload.len() + RECORD_OVERHEAD_BYTES + 128
}

/// Splits `packets` into runs that each fit one batch.
fn split_batches(packets: &[Packet]) -> Vec<&[Packet]> {
    let mut runs = Vec::new();
    let mut start = 0;
    let mut bytes = 0;
    for (index, packet) in packets.iter().enumerate() {
        if index > start && bytes + batch_bytes(packet) > BATCH_FILE_BYTES_MAX {
            runs.push(&packets[start..index]);
            start = index;
            bytes = 0;
        }
        bytes += batch_bytes(packet);
    }
    if start < packets.len() {
        runs.push(&packets[start..]);
    }
    runs
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddrV4;

    use std::sync::Arc;

    use fsbridge::PacketId;

    use super::*;

    fn outbox() -> Outbox {
        let node = NodeName::new("t").unwrap();
        Outbox::new(Spool::new(std::env::temp_dir().join("ftss-outbox-unit-never-written")), None, node, 1, true)
    }

    fn packet(seq: u64) -> Packet {
        let addr: SocketAddrV4 = "10.77.0.1:1".parse().unwrap();
        Packet {
            id: PacketId { origin: NodeName::new("t").unwrap(), epoch: 1, seq },
            source: addr,
            destination: addr,
            sent_unix_us: 0,
            payload: vec![seq as u8],
        }
    }

    #[test]
    fn an_ack_read_before_its_sender_waits_is_kept_and_others_are_not() {
        let outbox = outbox();
        let deadline = Instant::now() + Duration::from_secs(5);
        let waited = outbox.enqueue(1, false, deadline, true, true, packet).unwrap();
        let unwaited = outbox.enqueue(1, false, deadline, false, true, packet).unwrap();
        assert!(outbox.awaits_acks());
        // The receive thread may read the ack before the sender starts waiting for it.
        outbox.record_acks([waited, unwaited, 99]);
        assert_eq!(outbox.wait_acked(waited, Instant::now()), Ok(()));
        outbox.stop_awaiting(waited);
        assert!(!outbox.awaits_acks());
        assert!(outbox.lock().acked.is_empty(), "acks nobody waits for are not kept");
    }

    #[test]
    fn each_parked_sender_is_woken_by_its_own_ack_or_publish_and_no_other() {
        let outbox = Arc::new(outbox().with_targeted_wakeups());
        let deadline = Instant::now() + Duration::from_secs(10);
        let seqs: Vec<u64> = (0..6).map(|_| outbox.enqueue(1, false, deadline, true, true, packet).unwrap()).collect();
        let waiter = |seq: u64, published: bool| {
            let outbox = outbox.clone();
            std::thread::spawn(move || {
                let until = Instant::now() + Duration::from_secs(10);
                match published {
                    true => outbox.wait_published(seq, until),
                    false => outbox.wait_acked(seq, until),
                }
            })
        };
        // Seqs 1..=3 wait for their acks, 4..=6 for their publish.
        let mut acks: Vec<_> = seqs[..3].iter().map(|seq| Some(waiter(*seq, false))).collect();
        let mut publishes: Vec<_> = seqs[3..].iter().map(|seq| Some(waiter(*seq, true))).collect();
        // Let every waiter park (an ack or publish that came first would not be lost either).
        std::thread::sleep(Duration::from_millis(50));
        let started = Instant::now();
        outbox.record_acks([seqs[0], seqs[2]]);
        let mut state = outbox.lock();
        state.published_seq = seqs[4];
        outbox.wake_waiters(state, &[]);
        for handle in [acks[0].take(), acks[2].take(), publishes[0].take(), publishes[1].take()] {
            assert_eq!(handle.unwrap().join().unwrap(), Ok(()));
        }
        assert!(started.elapsed() < Duration::from_secs(5), "woken by the ack or publish, not by a timeout");
        std::thread::sleep(Duration::from_millis(100));
        assert!(!acks[1].as_ref().unwrap().is_finished(), "another seq's ack wakes nobody for this one");
        assert!(!publishes[2].as_ref().unwrap().is_finished(), "a publish short of its seq leaves it waiting");
        outbox.record_acks([seqs[1]]);
        let mut state = outbox.lock();
        state.published_seq = seqs[5];
        outbox.wake_waiters(state, &[]);
        assert_eq!(acks[1].take().unwrap().join().unwrap(), Ok(()));
        assert_eq!(publishes[2].take().unwrap().join().unwrap(), Ok(()));
        assert!(started.elapsed() < Duration::from_secs(5));
        let state = outbox.lock();
        assert!(state.ack_waiters.is_empty() && state.published_waiters.is_empty(), "no waiter stays registered");
    }

    #[test]
    fn a_missing_ack_times_out_and_a_full_ring_refuses_non_blocking_senders() {
        let outbox = outbox();
        let seq = outbox.enqueue(1, false, Instant::now(), true, true, packet).unwrap();
        assert_eq!(outbox.wait_acked(seq, Instant::now()), Err(SendError::TimedOut));
        assert_eq!(SendError::TimedOut.errno(), libc::ETIMEDOUT);
        for _ in 1..RING_PACKETS_MAX {
            outbox.enqueue(0, true, Instant::now(), false, true, packet).unwrap();
        }
        assert_eq!(outbox.enqueue(0, true, Instant::now(), false, true, packet), Err(SendError::WouldBlock));
        assert_eq!(SendError::WouldBlock.errno(), libc::EAGAIN);
        assert_eq!(outbox.enqueue(0, false, Instant::now(), false, true, packet), Err(SendError::TimedOut));
    }
}
