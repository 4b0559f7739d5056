//! The server's decisions, with no I/O: no files, no libc, no clock. The shell feeds them
//! events and the time and carries out what they decide. Enforced: clippy denies the calls and
//! types listed in `ftss-server/clippy.toml` in this module.

#![deny(clippy::disallowed_methods, clippy::disallowed_types)]

use std::time::Duration;

pub mod admission;
pub mod book;
pub mod index;
pub mod registry;
pub mod segment_end;

/// A point on the server's monotonic clock, in microseconds from an arbitrary origin. The shell
/// reads the clock ([`crate::server::monotonic_now`]); a simulator makes the time up.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Time(pub u64);

impl Time {
    /// The time elapsed since `earlier`; zero if `earlier` is later.
    pub fn duration_since(self, earlier: Time) -> Duration {
        Duration::from_micros(self.0.saturating_sub(earlier.0))
    }

    /// This time less `duration`, if that is not before the origin.
    pub fn checked_sub(self, duration: Duration) -> Option<Time> {
        u64::try_from(duration.as_micros()).ok().and_then(|micros| self.0.checked_sub(micros)).map(Time)
    }
}

impl std::ops::Add<Duration> for Time {
    type Output = Time;

    fn add(self, duration: Duration) -> Time {
        Time(self.0.saturating_add(u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)))
    }
}

/// Where a record lives in the queue: the same in every mirror.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Location {
    pub segment: u64,
    pub offset: u64,
    pub length: u32,
}
