//! Scale-out: several active instances share the nodes. The nodes are split into `--partitions N`
//! by a hash of their name (`fsbridge::layout::partition_of`); each partition has its own lease
//! (`server/lease-p<K>`), its own queue (`p<K>/` in every `--queue-dir`) and its own status file.
//! An instance serves every partition it holds with its own `Server` on its own thread: that
//! server drains the outboxes of the partition's nodes, acks them, delivers their packets to any
//! node, and reads the receipts of the partition's nodes, forwarding receipts for packets another
//! partition holds to that partition (`server/receipts-p<K>/`).
//!
//! Balance: every instance keeps a heartbeat file (`server/instances/<name>`); an instance takes
//! expired partition leases while it holds fewer than its fair share (partitions ÷ live instances,
//! rounded up) and gives one back (releases its lease at once) while it holds more. So a second
//! instance started beside a first one soon serves half of the partitions, and when an instance
//! dies the others take its partitions once their leases expire. Each partition's lease works as
//! in single-partition HA (renewal, stepping down before the term ends, fencing by epoch).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::config::HaSettings;
use crate::lease::Lease;
use crate::server::{Config, Partition, Server};

/// A partition this instance serves.
struct Held {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
    /// Asked to give the partition back (rebalancing); it releases its lease when it stops.
    releasing: bool,
}

/// What an instance's heartbeat file says.
#[derive(Serialize, Deserialize)]
struct Heartbeat {
    expires_unix_ms: u64,
    pid: u32,
}

fn now_ms() -> u64 {
    fsbridge::unix_now_us() / 1000
}

fn instances_dir(volume: &Path) -> PathBuf {
    volume.join("server").join("instances")
}

fn beat(volume: &Path, instance: &str, term: Duration) -> Result<(), String> {
    let dir = instances_dir(volume);
    std::fs::create_dir_all(&dir).map_err(|error| format!("{}: {error}", dir.display()))?;
    let record = Heartbeat { expires_unix_ms: now_ms() + term.as_millis() as u64, pid: std::process::id() };
    let tmp = dir.join(format!(".{instance}.{}", std::process::id()));
    let text = toml::to_string(&record).expect("heartbeat serializes");
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, dir.join(instance)))
        .map_err(|error| error.to_string())
}

/// Instances whose heartbeat has not expired (this one included once it has beaten); `None` if the
/// directory cannot be listed (the caller keeps its last count). A heartbeat that cannot be read
/// or parsed counts by its file's age: an instance that beat within the last `term` is alive, so
/// an I/O hiccup does not make the others take on its share.
fn live_instances(volume: &Path, term: Duration) -> Option<u32> {
    let dir = instances_dir(volume);
    let names = fsbridge::spool::list_names(&dir, usize::MAX).ok()?;
    let now = now_ms();
    let alive = |name: &String| {
        let path = dir.join(name);
        let heartbeat = std::fs::read_to_string(&path).ok().and_then(|text| toml::from_str::<Heartbeat>(&text).ok());
        match heartbeat {
            Some(heartbeat) => heartbeat.expires_unix_ms > now,
            None => std::fs::metadata(&path)
                .and_then(|meta| meta.modified())
                .is_ok_and(|modified| modified.elapsed().unwrap_or_default() < term),
        }
    };
    Some(names.iter().filter(|name| alive(name)).count() as u32)
}

/// The settings of one partition's server: its queue inside every queue dir; the external
/// gateway's ingress ports only in partition 0 (one socket per port).
fn partition_config(config: &Config, partition: Partition) -> Config {
    let mut config = config.clone();
    config.queue_dirs = config.queue_dirs.iter().map(|dir| dir.join(format!("p{}", partition.index))).collect();
    if partition.index != 0 {
        config.ingress.clear();
    }
    config.partition = partition;
    config
}

/// Runs this instance until `stop`: takes and gives back partitions, serving each held one.
pub fn run(config: Config, ha: HaSettings, stop: &'static AtomicBool) -> Result<(), String> {
    let count = ha.partitions;
    fsbridge::Volume::new(&config.volume).create().map_err(|error| error.to_string())?;
    let mut held: BTreeMap<u32, Held> = BTreeMap::new();
    let mut beaten_at: Option<Instant> = None;
    let mut live = 1;
    eprintln!("ftss-server: instance {} serves a share of {count} partitions", ha.instance);
    while !stop.load(Ordering::SeqCst) {
        if beaten_at.is_none_or(|at| at.elapsed() >= ha.lease_term / 3) {
            match beat(&config.volume, &ha.instance, ha.lease_term) {
                Ok(()) => beaten_at = Some(Instant::now()),
                Err(error) => eprintln!("ftss-server: cannot write the instance heartbeat: {error}"),
            }
        }
        held.retain(|index, partition| {
            if !partition.thread.is_finished() {
                return true;
            }
            eprintln!("ftss-server: instance {} no longer serves partition {index}", ha.instance);
            false
        });
        live = live_instances(&config.volume, ha.lease_term).unwrap_or(live);
        let share = count.div_ceil(live.max(1)) as usize;
        let serving = held.values().filter(|partition| !partition.releasing).count();
        if serving > share {
            if let Some((index, partition)) = held.iter_mut().rev().find(|(_, partition)| !partition.releasing) {
                eprintln!("ftss-server: instance {} gives partition {index} back (fair share {share})", ha.instance);
                partition.releasing = true;
                partition.stop.store(true, Ordering::SeqCst);
            }
        } else if serving < share {
            for index in (0..count).filter(|index| !held.contains_key(index)) {
                let mut lease = Lease::for_partition(&config.volume, ha.instance.clone(), ha.lease_term, index, count);
                match lease.try_acquire() {
                    Ok(true) => {
                        let partition = Partition { index, count };
                        held.insert(index, start(partition_config(&config, partition), lease, stop)?);
                        break;
                    }
                    Ok(false) => {}
                    Err(error) => eprintln!("ftss-server: cannot take the lease of partition {index}: {error}"),
                }
            }
        }
        std::thread::sleep(ha.lease_term / 10);
    }
    for partition in held.values() {
        partition.stop.store(true, Ordering::SeqCst);
    }
    for (_, partition) in held {
        let _ = partition.thread.join();
    }
    let _ = std::fs::remove_file(instances_dir(&config.volume).join(&ha.instance));
    Ok(())
}

/// Starts serving a partition whose lease was just won.
fn start(config: Config, lease: Lease, global_stop: &'static AtomicBool) -> Result<Held, String> {
    let stop = Arc::new(AtomicBool::new(false));
    let thread_stop = stop.clone();
    let index = config.partition.index;
    eprintln!("ftss-server: instance {} serves partition {index} (lease epoch {})", lease.holder(), lease.epoch());
    let thread = std::thread::Builder::new()
        .name(format!("partition-{index}"))
        .spawn(move || serve(config, lease, &thread_stop, global_stop))
        .map_err(|error| format!("cannot start the thread of partition {index}: {error}"))?;
    Ok(Held { stop, thread, releasing: false })
}

/// One partition's server, until it is stopped (then the lease is released for a quick takeover)
/// or deposed (it cannot renew: it stops before its term ends and leaves the lease alone).
fn serve(config: Config, mut lease: Lease, stop: &AtomicBool, global_stop: &AtomicBool) {
    let index = config.partition.index;
    let opened = lease.renew_during(&format!("partition {index}"), || Server::open(config));
    let mut server = match opened {
        Ok(server) => server,
        Err(error) => {
            eprintln!("ftss-server: partition {index}: {error}");
            let _ = lease.release();
            return;
        }
    };
    if !lease.still_acting() {
        eprintln!("ftss-server: partition {index}: lost the lease while starting: stopped");
        return;
    }
    if let Err(error) = server.take_over(lease.holder(), lease.epoch()) {
        eprintln!("ftss-server: partition {index}: fencing the queue: {error}");
        let _ = lease.release();
        return;
    }
    let lease = std::rc::Rc::new(std::cell::RefCell::new(lease));
    let gate = lease.clone();
    server.set_gate(move || gate.borrow().still_acting());
    let deposed = std::cell::Cell::new(false);
    server.run(|| {
        if stop.load(Ordering::SeqCst) || global_stop.load(Ordering::SeqCst) {
            return true;
        }
        if !lease.borrow_mut().keep(&format!("partition {index}")) {
            deposed.set(true);
        }
        deposed.get()
    });
    if deposed.get() || server.deposed() {
        eprintln!("ftss-server: partition {index}: lost the lease (another instance serves it now): stopped");
    } else if let Err(error) = lease.borrow_mut().release() {
        eprintln!("ftss-server: partition {index}: cannot release the lease: {error}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeats_count_by_expiry_and_unreadable_ones_by_age() {
        let volume = std::env::temp_dir().join(format!("ftss-heartbeats-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&volume);
        let term = Duration::from_secs(10);
        assert_eq!(live_instances(&volume, term), Some(0), "no directory yet");
        beat(&volume, "one", term).unwrap();
        let expired = Heartbeat { expires_unix_ms: now_ms() - 1, pid: 1 };
        std::fs::write(instances_dir(&volume).join("gone"), toml::to_string(&expired).unwrap()).unwrap();
        // Cut short by a crash of the file server, say: fresh, so its instance counts as alive.
        std::fs::write(instances_dir(&volume).join("torn"), "expires_unix_ms = ").unwrap();
        assert_eq!(live_instances(&volume, term), Some(2));
        let old = std::time::SystemTime::now() - Duration::from_secs(60);
        std::fs::File::options()
            .write(true)
            .open(instances_dir(&volume).join("torn"))
            .unwrap()
            .set_modified(old)
            .unwrap();
        assert_eq!(live_instances(&volume, term), Some(1));
        std::fs::remove_dir_all(&volume).unwrap();
    }
}
