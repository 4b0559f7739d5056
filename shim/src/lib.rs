//! libftss_shim.so: preload it into an unmodified UDP application and its datagrams to fabric
//! addresses (`FTSS_ROUTES`) travel through the FTSS volume with guaranteed delivery; datagrams for
//! this node arrive from the volume. All other traffic passes through untouched, and with
//! `FTSS_VOLUME` unset the shim does nothing at all.
//!
//! Layers, as in Samba's socket_wrapper: `real` (the libc functions, resolved once), `socket` (the
//! logic, starting every call with "is this fd ours?") and `hooks` (the exported symbols, one line
//! each). The modules form one chain, each importing only those before it in [`LAYERS`] (a test
//! holds it): the low-level pieces (`real`, `addr`, `fds`, `config`, `sys`), the pieces of state
//! (`capture`, `claims`; the duplicate filter is `fsbridge::dedupe`), the fabric link and the
//! outbox, the once-ledgers, the process state (`state`), then the logic (`doorbell`, `pump`,
//! `socket`), privilege separation and fork handling, and the exported hooks. The crate root keeps only the constructor, the log
//! and the fail-closed refusal.
//!
//! A fabric socket is a real kernel object: the app's fd becomes one end of an AF_UNIX datagram
//! socketpair, and the shim's receive thread writes each arriving datagram (with a small header
//! carrying the fabric source address) into the other end. So poll, select, epoll, O_NONBLOCK and
//! SO_RCVTIMEO all work natively on the app's fd, without hooking every wait call.

mod addr;
mod capture;
mod claims;
pub mod config;
mod doorbell;
mod fabric;
mod fds;
mod fork;
mod hooks;
mod notify;
mod once;
pub mod outbox;
mod privsep;
mod pump;
mod real;
mod socket;
mod state;
mod sys;

use std::fs::File;
use std::io::Write;
use std::sync::{Mutex, OnceLock};

use config::Config;

pub(crate) static LOG: Mutex<Option<File>> = Mutex::new(None);

/// Writes one line to FTSS_LOG (never to the app's stdout/stderr).
pub(crate) fn log_line(message: std::fmt::Arguments) {
    let mut log = LOG.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(file) = log.as_mut() {
        let _ = writeln!(file, "ftss-shim[{}] {message}", std::process::id());
    }
}

macro_rules! log {
    ($($arg:tt)*) => { $crate::log_line(format_args!($($arg)*)) };
}
pub(crate) use log;

/// A shim that was configured but could not start safely (the volume is not mounted, or mounted
/// in a way that loses acknowledged writes): it carries nothing and fails fabric sends.
pub(crate) struct Refusal {
    /// The networks the shim would have carried; `None`: unknown, so every IPv4 destination.
    carried: Option<Vec<config::Cidr>>,
    reason: String,
}

impl Refusal {
    /// Is `addr` one the shim would have carried?
    pub(crate) fn covers(&self, addr: std::net::SocketAddr) -> bool {
        match addr::normalize(addr) {
            std::net::SocketAddr::V4(v4) => {
                self.carried.as_ref().is_none_or(|carried| carried.iter().any(|network| network.contains(*v4.ip())))
            }
            std::net::SocketAddr::V6(_) => false,
        }
    }

    /// The errno a send or connect to `addr` fails with (the reason goes to FTSS_LOG).
    pub(crate) fn refuse(&self, addr: std::net::SocketAddr) -> libc::c_int {
        // The first few are logged: an app retrying in a loop must not fill the log.
        if REFUSALS_LOGGED.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < REFUSALS_LOGGED_MAX {
            log!("refused a datagram for {addr}: {}", self.reason);
        }
        libc::ENETUNREACH
    }
}

static REFUSAL: OnceLock<Refusal> = OnceLock::new();
/// Refused sends logged with their reason (the rest only fail).
const REFUSALS_LOGGED_MAX: u32 = 16;
static REFUSALS_LOGGED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

pub(crate) fn refusal() -> Option<&'static Refusal> {
    REFUSAL.get()
}

fn open_log(config: &Config) {
    if let Some(path) = &config.log {
        open_log_at(path);
    }
}

fn open_log_at(path: &std::path::Path) {
    // The app's closefrom-style loops leave the log open (see `fds`), and it sits above the
    // numbers apps reuse.
    let fd = sys::new_internal(|| {
        std::fs::OpenOptions::new().create(true).append(true).open(path).map_or(-1, std::os::fd::IntoRawFd::into_raw_fd)
    });
    if fd >= 0 {
        // SAFETY: new_internal returns an open fd that nothing else owns.
        let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        // Whatever was there before goes after the lock (its close goes through the app's hook).
        let _previous = LOG.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).replace(file);
    }
}

/// A panic in the shim is a bug: its message goes to FTSS_LOG, never to the app's stderr (the hook
/// that panicked then fails its call with EIO). This hook belongs to the shim's own copy of std.
fn log_panics() {
    std::panic::set_hook(Box::new(|info| log_line(format_args!("bug: {info}"))));
}

#[ctor::ctor(unsafe)]
fn init() {
    // Every real function first, before any hook can run: no dlsym (which allocates) inside a hook.
    real::real();
    log_panics();
    let shim = match Config::from_env() {
        Ok(None) => None,
        Ok(Some(config)) => {
            sys::set_new_fd_pause(config.new_fd_pause);
            sys::keep_volume_fds();
            open_log(&config);
            if let Some(path) = &config.pcap {
                capture::open(path);
            }
            match state::Shim::start(config.clone()) {
                Ok(shim) => Some(shim),
                Err(error) => {
                    // Fail closed: the app runs, but nothing meant for the fabric reaches the
                    // real network.
                    log!("refusing to carry fabric traffic (sends to it fail with ENETUNREACH): {error}");
                    let carried = Some(config.routes.iter().chain(&config.egress).copied().collect());
                    let _ = REFUSAL.set(Refusal { carried, reason: error });
                    None
                }
            }
        }
        // Asked to carry fabric traffic but unable to: fail closed, as above. The networks it
        // would have carried are read as far as they can be (all of IPv4 if not at all).
        Err(error) if config::wanted_from_env() => {
            let carried = config::carried_networks_from_env();
            if let Ok(path) = std::env::var("FTSS_LOG") {
                open_log_at(std::path::Path::new(&path));
            }
            let extent = if carried.is_some() { "fabric traffic" } else { "any IPv4 traffic (FTSS_ROUTES unreadable)" };
            log!("misconfigured, refusing to carry {extent} (sends to it fail with ENETUNREACH): {error}");
            let _ = REFUSAL.set(Refusal { carried, reason: format!("misconfigured: {error}") });
            None
        }
        Err(error) => {
            if let Ok(path) = std::env::var("FTSS_LOG")
                && let Ok(mut file) = std::fs::OpenOptions::new().create(true).append(true).open(path)
            {
                let _ =
                    writeln!(file, "ftss-shim[{}] disabled, passing everything through: {error}", std::process::id());
            }
            None
        }
    };
    let enabled = shim.is_some();
    let _ = state::SHIM.set(shim);
    if enabled {
        fork::install();
    }
}

/// The shim's modules, lowest first: each may import only those before it.
#[cfg_attr(not(test), allow(dead_code))]
const LAYERS: &[&str] = &[
    "real", "addr", "fds", "config", "sys", "notify", "capture", "claims", "fabric", "outbox", "once", "state",
    "doorbell", "pump", "socket", "privsep", "fork", "hooks",
];

#[cfg(test)]
mod layering_tests {
    use super::LAYERS;

    /// Every module's source, by name.
    const SOURCES: &[(&str, &str)] = &[
        ("real", include_str!("real.rs")),
        ("addr", include_str!("addr.rs")),
        ("fds", include_str!("fds.rs")),
        ("config", include_str!("config.rs")),
        ("sys", include_str!("sys.rs")),
        ("notify", include_str!("notify.rs")),
        ("capture", include_str!("capture.rs")),
        ("claims", include_str!("claims.rs")),
        ("fabric", include_str!("fabric.rs")),
        ("outbox", include_str!("outbox.rs")),
        ("once", include_str!("once.rs")),
        ("state", include_str!("state.rs")),
        ("doorbell", include_str!("doorbell.rs")),
        ("pump", include_str!("pump.rs")),
        ("socket", include_str!("socket.rs")),
        ("privsep", include_str!("privsep.rs")),
        ("fork", include_str!("fork.rs")),
        ("hooks", include_str!("hooks.rs")),
    ];

    #[test]
    fn every_module_imports_only_modules_below_it() {
        // The shim's constructor ran in this test binary too: its panic hook writes to FTSS_LOG.
        drop(std::panic::take_hook());
        let modules: Vec<&str> = include_str!("lib.rs")
            .lines()
            .filter_map(|line| line.strip_prefix("mod ").or_else(|| line.strip_prefix("pub mod ")))
            .filter_map(|rest| rest.strip_suffix(";"))
            .collect();
        let mut layered: Vec<&str> = LAYERS.to_vec();
        layered.sort_unstable();
        let mut declared = modules.clone();
        declared.sort_unstable();
        assert_eq!(layered, declared, "LAYERS must name every module once");
        assert_eq!(SOURCES.iter().map(|(name, _)| *name).collect::<Vec<_>>(), LAYERS);
        for (at, (name, source)) in SOURCES.iter().enumerate() {
            for (used_at, used) in LAYERS.iter().enumerate() {
                let mentioned = source.contains(&format!("crate::{used}::"))
                    || source.contains(&format!("crate::{used};"))
                    || source.contains(&format!("crate::{used}::{{"));
                assert!(!mentioned || used_at < at || used_at == at, "{name} imports {used}, which is above it");
            }
        }
    }
}
