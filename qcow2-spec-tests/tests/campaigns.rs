//! Short samples of the two long campaigns, with the qnbd binary of this test build:
//!
//! * `scripts/crash-campaign --points 50`: `kill -9` of `qnbd serve` under a multi-connection
//!   write workload, 50 points spread round-robin over every layout (compressed zlib and zstd,
//!   internal snapshots, backing chains, extended L2, persistent bitmap, external data files,
//!   plain); after each
//!   crash `qemu-img check` finds no corruption and the guest content keeps every write
//!   acknowledged before the last completed flush (or with FUA).
//! * `scripts/soak --duration 20 --clients 16`: 16 verifying clients against one `serve -e 0`,
//!   bounded RSS growth, clean `qemu-img check` afterwards.
//!
//! Both print a summary line, shown here; the full campaigns (500 points, 10 minutes) are the
//! scripts' defaults (README.md, "Crash and soak campaigns").

use qcow2_spec_tests::{qnbd_bin, require_tools, run_command, scratch_dir, skip, workspace_root};
use std::process::Command;

/// The scripts run on the system python, whose `nbd` module comes from python3-libnbd.
fn have_python_nbd(what: &str) -> bool {
    let ok = Command::new("/usr/bin/python3")
        .args(["-c", "import nbd"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if ok {
        return true;
    }
    skip(
        what,
        "/usr/bin/python3 has no 'nbd' module (python3-libnbd; scripts/test installs it)",
    );
    false
}

fn run_script(script: &str, args: &[&str]) {
    let mut cmd = Command::new(workspace_root().join("scripts").join(script));
    cmd.args(args).arg("--qnbd").arg(qnbd_bin());
    let run = run_command(cmd);
    let out = run.stdout_text();
    println!("{out}");
    let summary = out
        .lines()
        .rev()
        .find(|l| l.starts_with(&format!("{script}:")))
        .unwrap_or("(no summary line)");
    assert!(
        run.success(),
        "{} failed ({}):\n{summary}",
        run.command,
        run.outcome()
    );
    eprintln!("{summary}");
}

#[test]
fn crash_campaign_sample() {
    if !require_tools("crash campaign", &["qemu-img", "qemu-io"])
        || !have_python_nbd("crash campaign")
    {
        return;
    }
    let scratch = scratch_dir();
    let workdir = scratch.path().join("crash");
    let workdir = workdir.to_str().expect("scratch path is UTF-8");
    run_script(
        "crash-campaign",
        &["--points", "50", "--seed", "1", "--workdir", workdir],
    );
}

#[test]
fn soak_sample() {
    if !require_tools("soak", &["qemu-img"]) || !have_python_nbd("soak") {
        return;
    }
    run_script(
        "soak",
        &["--duration", "20", "--clients", "16", "--seed", "1"],
    );
}
