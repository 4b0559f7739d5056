//! What each fd number is to the shim, in one atomic byte per fd: the pass-through fast path of
//! every hook is one load from this table.
//!
//! - `Kind::None`: not ours; every call goes straight to libc.
//! - `Kind::Candidate`: an app's UDP socket (IPv4 or IPv6) that may become a fabric socket.
//! - `Kind::Fabric`: an app's fd that is one end of a socketpair fed by the shim (an entry in the
//!   shim's table, shared by every fd dup'ed from it).
//! - `Kind::Internal`: the shim's own fds (side sockets, socketpair ends, the log, files on the
//!   volume): the app's `close`, `close_range` and `closefrom` leave them alone.
//! - `Kind::Releasing`: one of those while the shim closes it. The kernel frees the number as the
//!   close begins, but the close may go on (NFS writes back at close); an app close of the number
//!   waits until the mark is gone ([`wait_released`]), so that it never mistakes the app's next fd
//!   there for the shim's.

use std::sync::atomic::{AtomicI32, AtomicU8, Ordering};

use libc::c_int;

use crate::addr::Family;

/// fds at or above this are never ours (passed through); bounds the table.
pub const FD_TABLE_MAX: usize = 65_536;

/// What an fd is to the shim (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    None = 0,
    Candidate = 1,
    Fabric = 2,
    Internal = 3,
    Releasing = 4,
}

impl Kind {
    fn from_bits(bits: u8) -> Kind {
        match bits & KIND_BITS {
            1 => Kind::Candidate,
            2 => Kind::Fabric,
            3 => Kind::Internal,
            4 => Kind::Releasing,
            _ => Kind::None,
        }
    }
}

/// The bits of a table byte that hold the kind.
const KIND_BITS: u8 = 0x0f;
/// Flag bit: the app's socket is AF_INET6.
const V6: u8 = 0x10;

static KIND: [AtomicU8; FD_TABLE_MAX] = [const { AtomicU8::new(Kind::None as u8) }; FD_TABLE_MAX];

/// For each FABRIC fd, its socket's side fd plus one (0: none). Lets a send to a destination
/// outside the fabric go straight to the kernel socket without the shim's socket-table lock (the
/// pass-through cost of a converted socket, e.g. one bound to the wildcard address). A side fd
/// stays open for as long as any app fd refers to its socket; an app that closes an fd while
/// another thread sends on it races as it would on the kernel's own fd table.
static SIDE: [AtomicI32; FD_TABLE_MAX] = [const { AtomicI32::new(0) }; FD_TABLE_MAX];

fn slot(fd: c_int) -> Option<&'static AtomicU8> {
    usize::try_from(fd).ok().and_then(|index| KIND.get(index))
}

/// The kind of `fd` (one of the constants above).
pub fn kind(fd: c_int) -> Kind {
    slot(fd).map_or(Kind::None, |slot| Kind::from_bits(slot.load(Ordering::Acquire)))
}

/// The family of a candidate or fabric fd.
pub fn family(fd: c_int) -> Family {
    match slot(fd).map_or(0, |slot| slot.load(Ordering::Acquire)) & V6 {
        0 => Family::V4,
        _ => Family::V6,
    }
}

pub fn set(fd: c_int, kind: Kind, family: Family) {
    if let Some(slot) = slot(fd) {
        let flag = if family == Family::V6 { V6 } else { 0 };
        slot.store(kind as u8 | flag, Ordering::Release);
    }
}

/// Copies `old`'s kind, family and side fd to `new` (after a dup).
pub fn copy(old: c_int, new: c_int) {
    if let (Some(old_slot), Some(new_slot)) = (slot(old), slot(new)) {
        let side = side_slot(old).map_or(0, |side| side.load(Ordering::Acquire));
        if let Some(new_side) = side_slot(new) {
            new_side.store(side, Ordering::Release);
        }
        new_slot.store(old_slot.load(Ordering::Acquire), Ordering::Release);
    }
}

pub fn clear(fd: c_int) {
    if let Some(slot) = slot(fd) {
        slot.store(Kind::None as u8, Ordering::Release);
    }
    if let Some(side) = side_slot(fd) {
        side.store(0, Ordering::Release);
    }
}

fn side_slot(fd: c_int) -> Option<&'static AtomicI32> {
    usize::try_from(fd).ok().and_then(|index| SIDE.get(index))
}

/// Records `side` as the kernel socket behind the fabric fd `fd`.
pub fn set_side(fd: c_int, side: c_int) {
    if let Some(slot) = side_slot(fd) {
        slot.store(side + 1, Ordering::Release);
    }
}

/// The kernel socket behind the fabric fd `fd`, if it has one recorded.
pub fn side(fd: c_int) -> Option<c_int> {
    side_slot(fd).map(|slot| slot.load(Ordering::Acquire) - 1).filter(|side| *side >= 0)
}

/// Is `fd` an app socket the shim handles (candidate or fabric)?
pub fn is_ours(fd: c_int) -> bool {
    matches!(kind(fd), Kind::Candidate | Kind::Fabric)
}

pub fn is_fabric(fd: c_int) -> bool {
    kind(fd) == Kind::Fabric
}

/// Every fd of one of the `wanted` kinds in `first..=last` (bounded by the table), in order.
pub fn of_kinds_in(first: c_int, last: c_int, wanted: &'static [Kind]) -> impl Iterator<Item = c_int> {
    let first = first.max(0);
    let last = last.min(FD_TABLE_MAX as c_int - 1);
    (first..=last).filter(move |fd| wanted.contains(&kind(*fd)))
}

/// Every fd of `wanted` kind in `first..=last` (bounded by the table).
pub fn of_kind_in(first: c_int, last: c_int, wanted: Kind) -> impl Iterator<Item = c_int> {
    let first = first.max(0);
    let last = last.min(FD_TABLE_MAX as c_int - 1);
    (first..=last).filter(move |fd| kind(*fd) == wanted)
}

/// Numbers marked [`Kind::Releasing`] now (a forked child clears theirs: the closing thread is not
/// there).
static RELEASING: AtomicI32 = AtomicI32::new(0);

/// Marks one of the shim's fds as being closed by the shim.
pub fn begin_release(fd: c_int) {
    if let Some(slot) = slot(fd) {
        RELEASING.fetch_add(1, Ordering::AcqRel);
        slot.store(Kind::Releasing as u8, Ordering::Release);
    }
    if let Some(side) = side_slot(fd) {
        side.store(0, Ordering::Release);
    }
}

/// The shim's close of `fd` is over: the number is the kernel's to give again (unless the app's
/// new socket there has marked it already).
pub fn end_release(fd: c_int) {
    if let Some(slot) = slot(fd) {
        let _ = slot.compare_exchange(Kind::Releasing as u8, Kind::None as u8, Ordering::AcqRel, Ordering::Acquire);
        RELEASING.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Waits while the shim is closing the fd that had this number (see [`Kind::Releasing`]).
pub fn wait_released(fd: c_int) {
    while kind(fd) == Kind::Releasing {
        std::thread::sleep(std::time::Duration::from_micros(50));
    }
}

/// In a forked child: no thread of the shim's is closing anything here.
pub fn forget_releases_in_child() {
    if RELEASING.swap(0, Ordering::AcqRel) == 0 {
        return;
    }
    for slot in &KIND {
        let _ = slot.compare_exchange(Kind::Releasing as u8, Kind::None as u8, Ordering::AcqRel, Ordering::Acquire);
    }
}
