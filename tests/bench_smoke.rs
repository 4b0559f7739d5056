//! Keeps the benchmark working: runs `examples/bench --quick --json --smoke` (a fraction of a second
//! per scenario) and checks that every scenario printed well-formed lines. Never asserts speed.

mod common;

use std::collections::BTreeSet;
use std::process::Command;

const SCENARIOS: [&str; 25] = [
    "fsync-limit",
    "ack-limit",
    "deliver-limit",
    "udp-raw",
    "shim-passthrough",
    "ftss-async",
    "ftss-volume",
    "ftss-recv-once",
    "ftss-guaranteed",
    "ftss-fabric",
    "ftss-fabric-async",
    "ftss-1-instance",
    "ftss-2-instances",
    "ftss-smb",
    "smb-file-per-packet",
    "nfs-file-per-packet",
    "ftss-nfs",
    "smb-kernel-file-per-packet",
    "ftss-smb-kernel",
    "veth-udp",
    "tun-udp",
    "veth-tcp",
    "tun-tcp",
    "redis-stream",
    "server-rss",
];
const FIELDS: [&str; 9] =
    ["scenario", "payload", "senders", "packets", "pps", "p50_us", "p99_us", "max_rss_kib", "durable"];

#[test]
fn bench_smoke_prints_one_json_object_per_scenario_line() {
    let dir = common::artifact_dir();
    let bench = dir.join("examples").join("bench");
    assert!(bench.exists(), "{} missing: cargo test builds the examples first", bench.display());
    common::shim_path();
    common::server_path();
    let output = Command::new(&bench)
        .args(["--quick", "--json", "--smoke"])
        .env("FTSS_BIN_DIR", &dir)
        .output()
        .expect("run the bench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "bench failed\nstdout:\n{stdout}\nstderr:\n{stderr}");

    let mut seen = BTreeSet::new();
    for line in stdout.lines() {
        let object: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|error| panic!("not JSON: {line:?}: {error}"));
        for field in FIELDS {
            assert!(object.get(field).is_some(), "{field} missing in {line}");
        }
        let scenario = object["scenario"].as_str().expect("scenario is a string");
        assert!(SCENARIOS.contains(&scenario), "unknown scenario in {line}");
        assert!(object["durable"].is_boolean(), "{line}");
        match object.get("skipped") {
            // Only optional tools (samba/smbnetfs, redis-server) may be missing; nothing may fail.
            Some(why) => assert!(!why.as_str().unwrap_or("").starts_with("failed"), "{line}"),
            None => assert!(object["packets"].as_u64().is_some_and(|packets| packets > 0), "nothing measured: {line}"),
        }
        if scenario == "ack-limit" || scenario == "deliver-limit" {
            // Every ack follows a sync that carried at least the acked message.
            let per_sync = object["packets_per_sync"].as_f64().unwrap_or(0.0);
            assert!(per_sync >= 1.0, "{scenario} acked {per_sync} messages a sync: {line}");
        }
        if scenario == "deliver-limit" {
            // Only acked messages are delivered, and the receiver got some.
            let delivered = object["delivered"].as_u64().unwrap_or(0);
            let packets = object["packets"].as_u64().unwrap_or(0);
            assert!(delivered >= 1 && delivered <= packets, "delivered {delivered} of {packets} acked: {line}");
        }
        seen.insert(scenario.to_owned());
    }
    for scenario in SCENARIOS {
        assert!(seen.contains(scenario), "no line for {scenario}\nstdout:\n{stdout}\nstderr:\n{stderr}");
    }
}
