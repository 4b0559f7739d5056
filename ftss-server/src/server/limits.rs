//! The bounds of one cycle and of every queue and buffer the server keeps.

use super::*;

/// Unclaimed inbox files of one port after which new packets for it wait for the receiver.
pub(super) const INBOX_FILES_WAITING_MAX: usize = 4;

/// Most bytes read from one outbox log segment in one cycle.
pub(super) const LOG_READ_BYTES_MAX: usize = 4 * 1024 * 1024;

/// Most outbox files drained from one node in one cycle; keeps one busy node from starving others.
pub(super) const DRAIN_FILES_PER_NODE_MAX: usize = 256;

/// Longest the cycle after a group acked over the fabric waits for those senders to send again
/// (at most the last sync's time), so that one sync takes them all; see `Server::gather_fabric`.
pub(super) const FABRIC_GATHER_WAIT_MAX: Duration = Duration::from_micros(200);
/// Waits for acked fabric senders in a row that ran out, after which the waits sleep instead of
/// spinning (`GatherWait::Spin`) until one sees its senders back.
pub(super) const GATHER_RUN_OUTS_BEFORE_SLEEP: u32 = 3;
/// How soon an idle main loop looks again at a fabric connection whose next frame waits for
/// inbound room (other connections' frames taken from the queue make it).
pub(super) const HELD_FRAME_RECHECK: Duration = Duration::from_millis(50);

/// Most packets drained in one cycle, across nodes; bounds the memory of one group commit.
pub(super) const DRAIN_PACKETS_PER_CYCLE_MAX: usize = 65_536;

/// A drain group at least this large is followed by returning freed memory to the system.
pub(super) const TRIM_AFTER_PACKETS: usize = 4096;

/// Most payload bytes drained in one cycle: with large datagrams the packet count alone would let a
/// cycle hold gigabytes (the decoded packets and the queue's write buffer).
pub(super) const DRAIN_BYTES_PER_CYCLE_MAX: usize = 32 * 1024 * 1024;

/// Nodes whose bell the server keeps open (one fd each; well under the usual soft limit of 1,024
/// open files, which the queue and the spools also draw on).
pub(super) const BELLS_OPEN_MAX: usize = 256;

/// Bell records kept for a node whose bell cannot be written now.
pub(super) const RINGS_HELD_MAX: usize = 65_536;

/// Most packets written into one inbox batch file.
pub(super) const DELIVER_PACKETS_PER_FILE_MAX: usize = 4096;

/// Most payload bytes written into one inbox batch file (bounds the receiving shim's memory).
pub(super) const DELIVER_FILE_BYTES_MAX: usize = 4 * 1024 * 1024;

/// Most packets delivered in one cycle; bounds the time one cycle spends writing inboxes.
pub(super) const DELIVER_PACKETS_PER_CYCLE_MAX: usize = 65_536;
/// Packets remembered as written out ahead of a sync that failed (see `early_aborted`).
pub(super) const EARLY_ABORTED_MAX: usize = DELIVER_PACKETS_PER_CYCLE_MAX;

/// Outbox names listed at once per node: bounds memory when a node floods its outbox.
pub(super) const OUTBOX_BACKLOG_MAX: usize = 16_384;

/// Hidden files quarantined per spool per housekeeping pass.
pub(super) const HIDDEN_FILES_PER_PASS_MAX: usize = 64;

/// Most receipt files read from one node in one cycle.
pub(super) const RECEIPT_FILES_PER_NODE_MAX: usize = 1024;

/// How often the node registry (`node.toml` files) is re-read.
pub(super) const REGISTRY_REFRESH: Duration = Duration::from_secs(1);
/// Least time between registry reads that volume events ask for (a new node directory, a
/// `node.toml` written): a node rewriting its registration in a loop cannot make every cycle
/// read every node's.
pub(super) const REGISTRY_REFRESH_WOKEN: Duration = Duration::from_millis(10);

/// How often status.json is rewritten.
pub(super) const STATUS_INTERVAL: Duration = Duration::from_millis(250);

/// How often failed mirrors are checked for a return.
pub(super) const RESYNC_INTERVAL: Duration = Duration::from_secs(1);

/// Ack files older than this are removed: acks are for processes waiting now, not a history.
pub(super) const ACK_FILE_AGE_MAX: Duration = Duration::from_secs(300);

/// How often `housekeeping` sweeps.
pub(super) const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(10);
/// An active segment that holds nothing live is replaced (so that it can be deleted) at most this
/// often.
pub(super) const IDLE_ROTATE_EVERY: Duration = Duration::from_secs(1);

/// Files in `tmp/` older than this were left by a writer that died mid-publish.
pub(super) const TMP_FILE_AGE_MAX: Duration = Duration::from_secs(3600);

/// Dead letters remembered for status.
pub(super) const DEAD_LETTERS_SHOWN_MAX: usize = 32;

/// Most packets dead-lettered in one cycle.
pub(super) const DEAD_LETTERS_PER_CYCLE_MAX: usize = 65_536;

/// Most packets in flight (delivered, not receipted) per destination address: a receiver that stops
/// reading holds at most this many in its inbox; the rest wait in the queue.
pub(super) const IN_FLIGHT_PER_DESTINATION_MAX: usize = 131_072;

/// Packets delivered to one port and not yet receipted: a port whose app stopped reading takes at
/// most this much of its node's room, so it takes eight such ports to hold up the node's others.
pub(super) const IN_FLIGHT_PER_PORT_MAX: usize = 16_384;

/// How far into a port's line a receipt for a packet not in flight is looked for: what earlier
/// instances can have delivered before this one replayed (their in-flight limit), twice over.
pub(super) const REQUEUED_WINDOW: usize = 2 * IN_FLIGHT_PER_PORT_MAX;

/// Sending processes remembered as waiting for acks (most recent first to go when full).
pub(super) const ACK_EPOCHS_MAX: usize = 4096;

/// Most acks in one fabric frame (a frame's bytes are bounded).
pub(super) const ACKS_PER_FRAME_MAX: usize = 16_384;

/// Inbox files a fabric node's newly bound port takes back from the volume in one go.
pub(super) const RECLAIM_FILES_MAX: usize = 4096;

/// Window over which status computes rates.
pub(super) const RATE_WINDOW: Duration = Duration::from_secs(10);

/// Space a done record takes in the queue (with its origin name and a reason: at most about 100
/// bytes), kept free for every queued packet.
pub(super) const DONE_RECORD_BYTES: u64 = 128;

/// Queue space a packet takes besides its payload, counted generously: its stored record's
/// framing, id and addresses, and its done record to come.
pub(super) const PACKET_SPACE_BYTES: u64 = 256;
