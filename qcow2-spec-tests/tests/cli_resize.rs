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

/// `resize --preallocation=MODE` on copies of the same image: same exit code and message
/// (after the program prefix), same allocation (`qemu-img map` without offsets, disk usage),
/// same content. qcow2 growth takes `off` only (other modes are refused by qnbd: see README).
#[test]
fn resize_preallocation_matches_qemu_img() {
    if !require_tools("resize --preallocation", &["qemu-img"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let strip = |s: &str| {
        s.lines()
            .map(|l| {
                l.split_once(": ")
                    .map_or(l, |(p, r)| {
                        if p.contains("qemu-img") || p.contains("qnbd") {
                            r
                        } else {
                            l
                        }
                    })
                    .to_string()
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    let map = |img: &Path| {
        let o = Command::new("qemu-img")
            .args(["map", "--output=json", "-f", "raw"])
            .arg(img)
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let mut v = v.as_array().unwrap().clone();
        for e in &mut v {
            e.as_object_mut().unwrap().remove("offset");
        }
        serde_json::Value::Array(v)
    };
    for mode in ["off", "metadata", "falloc", "full", "bogus"] {
        for (start, size, extra) in [
            ("1M", "3M", ""),
            ("0", "1M", ""),
            ("1M", "512k", "--shrink"),
            ("1M", "1M", ""),
        ] {
            let mut outcome = Vec::new();
            for (prog, name) in [
                ("qemu-img", "theirs.raw"),
                (qnbd_bin().to_str().unwrap(), "ours.raw"),
            ] {
                let img = d.join(name);
                let _ = std::fs::remove_file(&img);
                let (rc, out) = sh(Command::new("qemu-img")
                    .args(["create", "-q", "-f", "raw"])
                    .arg(&img)
                    .arg(start));
                assert_eq!(rc, 0, "{out}");
                let mut c = Command::new(prog);
                c.args(["resize", "-f", "raw", &format!("--preallocation={mode}")]);
                if !extra.is_empty() {
                    c.arg(extra);
                }
                let (rc, out) = sh(c.arg(&img).arg(size));
                let blocks =
                    std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&img).unwrap());
                outcome.push((rc, strip(&out), map(&img), blocks / 8));
            }
            assert_eq!(
                outcome[1], outcome[0],
                "raw {start} -> {extra} {size} --preallocation={mode}: ours (left) vs qemu-img"
            );
        }
    }
    // qcow2: off grows as qemu-img; the other modes are refused
    let img = d.join("q.qcow2");
    let (rc, out) = sh(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg("1M"));
    assert_eq!(rc, 0, "{out}");
    let (rc, out) = sh(Command::new(qnbd_bin())
        .args(["resize", "--preallocation=off"])
        .arg(&img)
        .arg("3M"));
    assert_eq!(rc, 0, "{out}");
    assert_eq!(virtual_size(&img), 3 << 20);
    for mode in ["metadata", "falloc", "full"] {
        let (rc, out) = sh(Command::new(qnbd_bin())
            .args(["resize", &format!("--preallocation={mode}")])
            .arg(&img)
            .arg("4M"));
        assert_eq!(rc, 1, "{out}");
        assert!(out.contains("not supported"), "{out}");
        assert_eq!(virtual_size(&img), 3 << 20);
    }
    let (rc, out) = sh(Command::new("qemu-img").arg("check").arg(&img));
    assert_eq!(rc, 0, "{out}");
}
