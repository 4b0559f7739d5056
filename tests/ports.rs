//! Delivery is per port: a port whose app is gone (or never reads) keeps its own packets queued and
//! in its inbox, and the other ports of the same node go on receiving.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::apps::*;
use common::*;

#[test]
fn a_port_nobody_reads_does_not_hold_up_the_other_ports_of_its_node() {
    let mut fabric = Fabric::new("ports-stuck");
    fabric.start_server();
    // Node b has an app on port 7102 and none on 7101 (it died, or never started).
    let receiver = Receiver::start(&fabric, 7102);
    // More packets for the dead port than a destination may have in flight (65 536).
    let backlog = 70_000;
    let mut flood = Sender::start_with(&fabric, 7101, "stuck", backlog, 0, &[("FTSS_ACK", "async")]);
    assert!(flood.proc.wait_exit(Duration::from_secs(120)), "the flood did not finish");
    assert_eq!(flood.acknowledged().len(), backlog);
    assert!(
        wait_until(Duration::from_secs(120), || fabric.counter("stored") >= backlog as u64),
        "not stored: {}",
        fabric.status()
    );
    // The live port's datagrams are stored behind the whole backlog, and still arrive.
    let mut live = Sender::start(&fabric, 7102, "live", 20, 0);
    assert!(live.proc.wait_exit(Duration::from_secs(60)), "the live sender did not finish");
    let wanted: HashSet<String> = expected("live", 20, 0).into_iter().collect();
    assert!(
        wait_until(Duration::from_secs(60), || {
            let got: HashSet<String> = receiver.payloads().into_iter().collect();
            wanted.is_subset(&got)
        }),
        "the live port got {} of 20 datagrams: {}",
        receiver.payloads().len(),
        fabric.status()
    );
    // Nothing of the dead port's backlog is lost: all of it is still queued or in its inbox.
    let queued = fabric.status()["queue"]["packets"].as_u64().unwrap_or(0);
    assert!(queued >= backlog as u64, "queued {queued} of {backlog}");
    assert_eq!(fabric.counter("dead_lettered"), 0);
}
