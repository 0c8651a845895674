//! `qnbd resize` against `qemu-img resize` on copies of the same image: same virtual size,
//! `qemu-img check` clean, same guest content, same refusals.

use qcow2_spec_tests::{qnbd_bin, require_tools};
use std::path::Path;
use std::process::Command;

fn sh(cmd: &mut Command) -> (i32, String) {
    let o = cmd.output().expect("spawn");
    (
        o.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

fn virtual_size(img: &Path) -> u64 {
    let o = Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(img)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    v["virtual-size"].as_u64().unwrap()
}

#[test]
fn resize_matches_qemu_img() {
    if !require_tools("resize", &["qemu-img", "qemu-io"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (opts, steps) in [
        ("cluster_size=512", vec!["+100M", "--shrink 300k", "2G"]),
        ("cluster_size=64k", vec!["+1G", "--shrink -1G", "10G"]),
        ("compat=0.10,cluster_size=4k", vec!["64M", "--shrink 1M"]),
        ("extended_l2=on", vec!["+3G", "--shrink 700k"]),
    ] {
        let ours = dir.path().join("ours.qcow2");
        let theirs = dir.path().join("theirs.qcow2");
        let (rc, out) = sh(Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-o", opts])
            .arg(&ours)
            .arg("1M"));
        assert_eq!(rc, 0, "{out}");
        let (rc, out) = sh(Command::new("qemu-io")
            .args(["-c", "write -P 0x61 0 1M"])
            .arg(&ours));
        assert_eq!(rc, 0, "{out}");
        std::fs::copy(&ours, &theirs).unwrap();
        for step in steps {
            let args: Vec<&str> = step.split(' ').collect();
            let (shrink, size) = if args.len() == 2 {
                (true, args[1])
            } else {
                (false, args[0])
            };
            let mut q = Command::new(qnbd_bin());
            q.arg("resize");
            if shrink {
                q.arg("--shrink");
            }
            let (rc_ours, out_ours) = sh(q.arg(&ours).arg(size));
            let mut e = Command::new("qemu-img");
            e.arg("resize");
            if shrink {
                e.arg("--shrink");
            }
            let (rc_qemu, out_qemu) = sh(e.arg(&theirs).arg(size));
            assert_eq!(
                rc_ours, rc_qemu,
                "[{opts}] {step}: ours {out_ours} qemu {out_qemu}"
            );
            assert_eq!(
                virtual_size(&ours),
                virtual_size(&theirs),
                "[{opts}] {step}"
            );
            let (rc, out) = sh(Command::new("qemu-img").arg("check").arg(&ours));
            assert_eq!(rc, 0, "[{opts}] {step}: {out}");
            let (rc, out) = sh(Command::new("qemu-img")
                .args(["compare", "-f", "qcow2", "-F", "qcow2"])
                .arg(&ours)
                .arg(&theirs));
            assert_eq!(rc, 0, "[{opts}] {step}: {out}");
        }
        // shrinking without --shrink is refused, like qemu-img
        let (rc, out) = sh(Command::new(qnbd_bin()).arg("resize").arg(&ours).arg("4k"));
        assert_eq!(rc, 1, "{out}");
        assert!(out.contains("Use the --shrink option"), "{out}");
    }
}
