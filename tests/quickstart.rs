//! The quickstart example works as the README promises (CI also runs it through `cargo run`).

mod common;

use std::process::Command;

#[test]
fn quickstart_delivers_every_line_with_nc_and_without() {
    let example = common::artifact_dir().join("examples/quickstart");
    assert!(example.exists(), "{} missing: build with --all-targets first (bash .ci/run does)", example.display());
    let output = Command::new(&example).env("FTSS_BIN_DIR", common::artifact_dir()).output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "quickstart failed:\n{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("b got:   goodbye"), "{stdout}");
    assert!(stdout.contains("all 5 lines delivered through the volume."), "{stdout}");
    let receipted = stdout.lines().any(|line| line.split_whitespace().eq(["receipted", "5"]));
    assert!(receipted, "status does not show the receipts:\n{stdout}");
    quickstart_works_without_nc();
}

/// On a machine without nc the quickstart runs its own UDP programs under the shim, says so, and
/// still delivers every line (old: "quickstart failed: nc (netcat-openbsd) is not installed").
/// Called after the run with nc: two quickstarts at once would both bind port 9000.
fn quickstart_works_without_nc() {
    let example = common::artifact_dir().join("examples/quickstart");
    let output = Command::new(&example)
        .env("FTSS_BIN_DIR", common::artifact_dir())
        .env("PATH", "/nonexistent")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "quickstart failed:\n{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("nc (netcat-openbsd) is not installed: using quickstart's own UDP programs"), "{stdout}");
    assert!(stdout.contains("all 5 lines delivered through the volume."), "{stdout}");
}
