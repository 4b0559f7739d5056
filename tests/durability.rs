//! The durability audit (issue 16): each defect found, proven by a test that failed before its fix.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Fabric, Proc};

/// Starts `ftss-server run` (no `--ha`) on `fabric`'s volume with `queue_dirs`; stderr to `log`.
fn start_plain_server(fabric: &Fabric, queue_dirs: &[std::path::PathBuf], log: &str) -> Proc {
    let log = std::fs::File::create(fabric.dir.0.join(log)).unwrap();
    let mut command = Command::new(common::server_path());
    command.arg("run").arg("--volume").arg(&fabric.volume);
    for dir in queue_dirs {
        command.arg("--queue-dir").arg(dir);
    }
    command.args(["--poll", "10ms"]).stdout(Stdio::null()).stderr(log);
    Proc { child: command.spawn().expect("start ftss-server"), name: "second server".into() }
}

/// Item 11: two `ftss-server run` without `--ha` on one queue directory, or on one volume with
/// queue directories of their own (two hosts), both ran; one killed -9 mid-transfer then cost 245
/// of 1,000 acked datagrams. The second must refuse to start and name the first; and once the
/// first is gone (kill -9), a new one starts at once.
#[test]
fn a_second_server_without_ha_is_refused_and_names_the_running_one() {
    let mut fabric = Fabric::new("second-server");
    fabric.start_server();
    let first_pid = fabric.server.as_ref().expect("server runs").child.id();
    let other_queue = fabric.dir.0.join("other-queue");
    for (case, queue_dirs) in [("same queue directory", fabric.queue_dirs.clone()), ("same volume", vec![other_queue])]
    {
        let log = format!("second-{}.log", case.replace(' ', "-"));
        let mut second = start_plain_server(&fabric, &queue_dirs, &log);
        let exited = second.wait_exit(Duration::from_secs(20));
        let said = std::fs::read_to_string(fabric.dir.0.join(&log)).unwrap_or_default();
        assert!(exited, "{case}: a second server kept running beside the first:\n{said}");
        let status = second.child.wait().unwrap();
        assert!(!status.success(), "{case}: the second server exited 0:\n{said}");
        assert!(
            said.contains(&format!("pid {first_pid}")),
            "{case}: the refusal does not name the first server:\n{said}"
        );
    }
    // The first server is still the one working: it delivers.
    let receiver = common::apps::Receiver::start(&fabric, 9100);
    assert!(common::nc_send_lines(&fabric, "a", "10.77.0.1", "10.77.0.2", 9100, &["still-one-server".to_string()]));
    assert!(common::wait_until(Duration::from_secs(20), || receiver
        .payloads()
        .iter()
        .any(|line| line == "still-one-server")));

    // After a crash of the first, the next one does not wait for the lease to run out.
    fabric.kill_server();
    let started = std::time::Instant::now();
    fabric.start_server();
    let restarted = fabric.server.as_mut().expect("server runs");
    assert!(!restarted.wait_exit(Duration::from_secs(2)), "the restarted server stopped:\n{}", fabric.server_log());
    assert!(started.elapsed() < Duration::from_secs(8), "the restart waited {:?}", started.elapsed());
}
