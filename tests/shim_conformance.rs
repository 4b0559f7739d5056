//! The shim behaves like the kernel: examples/shim_conformance.rs runs every call and flag once
//! against plain loopback (no shim) and once under the shim against the fabric (real server, real
//! volume), and the two outputs must be identical line for line.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::*;

fn conformance_program() -> PathBuf {
    let path = artifact_dir().join("examples").join("shim_conformance");
    assert!(path.exists(), "{} missing: `cargo build --release --all-targets` first", path.display());
    path
}

fn run(command: &mut Command) -> Vec<String> {
    let output = command.output().expect("run shim_conformance");
    assert!(
        output.status.success(),
        "shim_conformance failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap().lines().map(str::to_owned).collect()
}

#[test]
fn every_call_and_flag_behaves_on_the_fabric_as_on_loopback() {
    let kernel =
        run(Command::new(conformance_program()).arg("127.0.0.1").env_remove("LD_PRELOAD").env_remove("FTSS_VOLUME"));
    // The reference must itself show the behaviours compared (so both cannot be equally broken).
    for expected in [
        "truncation: flags=0x0 poll=1/0x1 first=10 from inet:SELF:P0/16",
        "truncation: flags=0x20 poll=1/0x1 first=100",
        "truncation: recvmsg=10 truncated=true",
        "connect: disconnect=0 peer=ENOTCONN send=EDESTADDRREQ shutdown=ENOTCONN",
        "send-receive: largest sent=65507 poll=1/0x1 got=65507 too-big=EMSGSIZE",
        "ipv6: v4-to-v6 got=7 from inet6:mapped-SELF:",
        "signals: blocking recv under SIGALRM=EINTR",
    ] {
        assert!(kernel.iter().any(|line| line.starts_with(expected)), "kernel run lacks {expected:?}: {kernel:#?}");
    }

    let mut fabric = Fabric::new("conformance");
    fabric.start_server();
    let shimmed = run(fabric.command("a", "10.77.0.1", conformance_program().to_str().unwrap()).arg("10.77.0.1"));
    let differences: Vec<String> = kernel
        .iter()
        .zip(&shimmed)
        .filter(|(kernel, shimmed)| kernel != shimmed)
        .map(|(kernel, shimmed)| format!("kernel: {kernel}\n  shim: {shimmed}"))
        .collect();
    assert!(differences.is_empty(), "the shim differs from the kernel:\n{}", differences.join("\n"));
    assert_eq!(kernel.len(), shimmed.len(), "different number of observations");

    // And the datagrams really crossed the fabric.
    assert!(fabric.node_log("a").contains("is now a fabric socket"), "{}", fabric.node_log("a"));
    assert!(
        wait_until(std::time::Duration::from_secs(10), || fabric.counter("receipted") >= 31),
        "{}",
        fabric.status()
    );
}
