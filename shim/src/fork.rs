//! fork and exit.
//!
//! fork: the shim's threads do not survive it, and a lock another thread held at that moment would
//! stay locked forever in the child. So, as Samba's socket_wrapper does, the `prepare` handler takes
//! every shim lock in the fixed order (see `socket`'s module docs) and the `parent` and `child`
//! handlers release them. The child then draws a new epoch (packet ids stay unique without
//! coordination), gets a fresh outbox (what the parent queued, the parent publishes) and starts its
//! own threads (at once if it inherited fabric sockets). Inherited fabric sockets keep working in both processes: they share
//! the kernel socketpair, and inbox files are claimed by rename, so each datagram goes to one of
//! them.
//!
//! exit: in `async` mode the ring may still hold datagrams; an `atexit` handler waits (up to
//! FTSS_TIMEOUT) until the flusher has published them, and writes the last receipts.

use std::any::Any;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::{Arc, MutexGuard};
use std::time::Instant;

use crate::state::{Shim, Sock};
use crate::sys::lock;

/// The locks the forking thread holds between `prepare` and `parent`/`child`.
struct Held {
    // Fields drop in order: the guards first, then the sockets they borrow from.
    _guards: Vec<Box<dyn Any>>,
    _socks: Vec<Arc<Sock>>,
}

static HELD: AtomicPtr<Held> = AtomicPtr::new(std::ptr::null_mut());

/// Erases a guard's lifetime so it can be kept until the fork is over.
///
/// # Safety
/// The mutex must outlive the guard (a static, or a socket kept alive in [`Held`]).
unsafe fn keep<T: 'static>(guard: MutexGuard<'_, T>) -> Box<dyn Any> {
    Box::new(unsafe { std::mem::transmute::<MutexGuard<'_, T>, MutexGuard<'static, T>>(guard) })
}

fn take_locks(shim: &'static Shim) -> Held {
    let mut guards = Vec::new();
    // SAFETY (all keeps): the shim is static; the sockets are kept alive in Held.
    unsafe {
        guards.push(keep(lock(&shim.start_lock)));
        let table = lock(&shim.table);
        let socks = {
            let mut socks: Vec<Arc<Sock>> = table.values().cloned().collect();
            socks.sort_by_key(|sock| Arc::as_ptr(sock) as usize);
            socks.dedup_by_key(|sock| Arc::as_ptr(sock) as usize);
            socks
        };
        guards.push(keep(table));
        for sock in &socks {
            guards.push(keep(lock(&sock.state)));
            guards.push(keep(lock(&sock.held)));
        }
        guards.push(keep(lock(&shim.once)));
        guards.push(keep(lock(&shim.dedupe)));
        guards.push(keep(lock(&shim.receipts)));
        guards.push(keep(lock(&shim.ingress_peers)));
        guards.push(keep(lock(&crate::LOG)));
        Held { _guards: guards, _socks: socks }
    }
}

extern "C" fn prepare() {
    let _ = catch_unwind(|| {
        if let Some(shim) = crate::state::shim() {
            HELD.store(Box::into_raw(Box::new(take_locks(shim))), Ordering::Release);
        }
    });
}

fn release_locks() {
    let held = HELD.swap(std::ptr::null_mut(), Ordering::AcqRel);
    if !held.is_null() {
        // SAFETY: from Box::into_raw in prepare, taken once.
        drop(unsafe { Box::from_raw(held) });
    }
}

extern "C" fn parent() {
    let _ = catch_unwind(release_locks);
}

extern "C" fn child() {
    let _ = catch_unwind(AssertUnwindSafe(|| {
        release_locks();
        // The fd lock is not taken above (fork would wait out another thread's long close): the
        // child starts it afresh, and forgets closes of the shim's under way in other threads.
        crate::sys::reset_fd_lock_in_child();
        crate::fds::forget_releases_in_child();
        if let Some(shim) = crate::state::shim() {
            shim.after_fork_in_child();
            if !shim.socks().is_empty() {
                shim.ensure_started();
            }
        }
    }));
}

extern "C" fn at_exit() {
    let _ = catch_unwind(|| {
        let Some(shim) = crate::state::shim() else { return };
        if shim.in_vfork_child() {
            return;
        }
        if !shim.outbox().wait_idle(Instant::now() + shim.config.timeout) {
            crate::log!("exit: datagrams still queued after FTSS_TIMEOUT are lost");
        } else {
            shim.outbox().seal_log();
        }
        crate::pump::flush_receipts(shim);
        // Packets of claimed files the app never read are delivered again; sooner without them.
        crate::pump::release_claims(shim);
    });
}

/// Installs the fork handlers and the exit handler (once, from the constructor).
pub fn install() {
    // SAFETY: plain C registrations of functions that live as long as the process.
    unsafe {
        libc::pthread_atfork(Some(prepare), Some(parent), Some(child));
        libc::atexit(at_exit);
    }
}
