//! ftss-server as a library: the binary (`main.rs`) is its command line, and tests and fuzzers
//! reach the parts from here.
//!
//! - [`core`]: the decisions, with no I/O and no clock (time comes in as an argument); clippy
//!   refuses file, clock and libc calls there (`ftss-server/clippy.toml`).
//! - The I/O shell around it: [`queue`] (the durable mirrored queue on the array's disks),
//!   [`outlog`] (reading the nodes' outbox logs), [`fabric`] (the authenticated stream),
//!   [`gateway`] (the external network), [`lease`] (high availability), [`status`] and
//!   [`metrics`], driven cycle by cycle by [`server`]; [`single`] and [`scaleout`] run one
//!   server or one per partition.
//! - [`sim`]: the deterministic simulator, running the queue and the core on a simulated disk
//!   under crashes and faults.

// The I/O ban is for `core` alone (it denies these lints); the shell makes the calls.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

pub mod config;
pub mod core;
pub mod dump;
pub mod fabric;
pub mod gateway;
pub mod lease;
pub mod metrics;
pub mod outlog;
pub mod progress;
pub mod queue;
pub mod scaleout;
pub mod server;
pub mod sim;
pub mod single;
pub mod status;
pub mod watch;
