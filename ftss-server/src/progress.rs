//! Progress for long operations (scrub, dump, resync): shown on a terminal, silent when piped.

use std::io::{IsTerminal, Write};
use std::time::Instant;

pub struct Progress {
    what: &'static str,
    started: Instant,
    visible: bool,
}

impl Progress {
    pub fn new(what: &'static str) -> Progress {
        let visible = std::io::stderr().is_terminal();
        let progress = Progress { what, started: Instant::now(), visible };
        progress.show(0, 0);
        progress
    }

    /// Shows `done` of `total` (total 0: unknown).
    pub fn show(&self, done: u64, total: u64) {
        if !self.visible {
            return;
        }
        let mut stderr = std::io::stderr();
        let _ = if total > 0 {
            write!(stderr, "\r{}: {done}/{total} ({:.1}s)   ", self.what, self.started.elapsed().as_secs_f64())
        } else {
            write!(stderr, "\r{}... ({:.1}s)   ", self.what, self.started.elapsed().as_secs_f64())
        };
        let _ = stderr.flush();
    }

    pub fn done(&self) {
        if self.visible {
            eprintln!("\r{}: done in {:.1}s   ", self.what, self.started.elapsed().as_secs_f64());
        }
    }
}
