//! `qnbd dd` against `qemu-img dd` on the same inputs (a sparse raw file, `qemu-img convert -c`
//! output, zero clusters from qemu-io, a chain over a shorter base, extended L2): messages and
//! exit codes equal, and when both create an output, the same virtual size, contents
//! `qemu-img compare` calls identical, the same allocation (`qemu-img map` without offsets)
//! and a clean `qemu-img check`. Run as `qnbd dd` and through a `qemu-img` link.

use qcow2_spec_tests::{qemu_words, qnbd_bin, require_tools, scratch_dir, tool, Run};
use serde_json::Value;
use std::path::Path;

fn sh(dir: &Path, cmd: &str) {
    let r = tool("sh", dir, ["-c", cmd]);
    assert!(r.success(), "{cmd}: {}", r.outcome());
}

/// stdout and stderr without the program prefix and with the output's name replaced, and the
/// exit code.
fn answer(r: &Run, out: &str) -> (String, String, Option<i32>) {
    let err = qemu_words(&r.stderr).replace(out, "OUT");
    (r.stdout_text().replace(out, "OUT"), err, r.code)
}

/// The allocation of an image: `qemu-img map` runs without host offsets, and its size.
fn shape(dir: &Path, img: &str) -> (Vec<(u64, u64, bool, bool)>, Value) {
    let m = tool("qemu-img", dir, ["map", "--output=json", img]);
    assert!(m.success(), "{}", m.outcome());
    let v: Value = serde_json::from_slice(&m.stdout).unwrap();
    let runs = v
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["start"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["data"].as_bool().unwrap(),
                e["zero"].as_bool().unwrap(),
            )
        })
        .collect();
    let i = tool("qemu-img", dir, ["info", "--output=json", img]);
    let info: Value = serde_json::from_slice(&i.stdout).unwrap();
    (runs, info["virtual-size"].clone())
}

#[test]
fn dd_copies_as_qemu_img_dd() {
    if !require_tools("dd", &["qemu-img", "qemu-io"]) {
        return;
    }
    let tmp = scratch_dir();
    let d = tmp.path();
    for cmd in [
        "qemu-img create -q -f raw sp.raw 100M",
        "qemu-io -f raw -c 'write -P 9 10M 1M' -c 'write -P 8 50M 4k' sp.raw",
        "qemu-img convert -c -O qcow2 sp.raw cz.qcow2",
        "qemu-img create -q -f qcow2 zc.qcow2 64M",
        "qemu-io -c 'write -z 0 8M' -c 'write -P 1 8M 100k' zc.qcow2",
        "qemu-img create -q -f qcow2 -o cluster_size=4k base.qcow2 32M",
        "qemu-io -c 'write -P 2 0 5M' base.qcow2",
        "qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2 40M",
        "qemu-io -c 'write -P 3 30M 6M' top.qcow2",
        "qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=128k el.qcow2 5M",
        "qemu-io -c 'write -P 4 1k 3k' -c 'write -P 4 1M 65k' el.qcow2",
        "qemu-img create -q -f raw odd.raw 1000001",
    ] {
        sh(d, cmd);
    }
    let bin = d.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::os::unix::fs::symlink(qnbd_bin(), bin.join("qemu-img")).unwrap();
    let link = bin.join("qemu-img");
    let cases: &[&[&str]] = &[
        &["-f", "raw", "bs=64k", "count=10", "if=sp.raw"],
        &["bs=64k", "skip=10", "if=sp.raw"],
        &["bs=64k", "count=20", "skip=10", "if=sp.raw"],
        &["-O", "qcow2", "bs=1M", "if=sp.raw"],
        &["-O", "qcow2", "if=cz.qcow2", "bs=1000", "count=20000"],
        &["bs=1M", "if=cz.qcow2"],
        &["bs=1k", "count=10", "if=top.qcow2", "-O", "qcow2"],
        &["bs=4k", "if=top.qcow2", "-O", "qcow2"],
        &[
            "bs=1.5k",
            "count=100",
            "skip=3",
            "if=zc.qcow2",
            "-O",
            "qcow2",
        ],
        &["-O", "qcow2", "bs=64k", "if=el.qcow2"],
        &["bs=1000", "count=1", "if=sp.raw"],
        &["bs=1000", "count=1", "if=sp.raw", "-O", "qcow2"],
        &["bs=3k", "if=odd.raw"],
        &["bs=64k", "skip=2000", "if=sp.raw"],
        &["bs=1M", "count=0", "if=sp.raw"],
        &["bs=1M", "count=3", "count=5", "if=sp.raw"],
        &["-U", "bs=1M", "count=2", "if=sp.raw"],
        &["if=", "bs=1M", "count=1", "if=sp.raw"],
        // refusals
        &["bs=0", "if=sp.raw"],
        &["bs=-1", "if=sp.raw"],
        &["bs=3G", "if=sp.raw"],
        &["bs=abc", "if=sp.raw"],
        &["count=-1", "if=sp.raw"],
        &["count=10k", "if=sp.raw"],
        &["skip=abc", "if=sp.raw"],
        &["junk", "if=sp.raw"],
        &["conv=notrunc", "if=sp.raw"],
        &["bs=1M"],
        &["if=nonexistent"],
        &["-O", "xyz", "if=sp.raw"],
        &["-f", "qcow2", "if=sp.raw"],
    ];
    let mut problems = Vec::new();
    for c in cases {
        let args_for = |out: &str| {
            let mut v: Vec<String> = vec!["dd".into()];
            v.extend(c.iter().map(|s| s.to_string()));
            v.push(format!("of={out}"));
            v
        };
        let q = tool("qemu-img", d, args_for("q.out"));
        let qa = answer(&q, "q.out");
        for (who, program) in [("qnbd", qnbd_bin()), ("qemu-img link", link.as_path())] {
            let _ = std::fs::remove_file(d.join("o.out"));
            let o = tool(program.to_str().unwrap(), d, args_for("o.out"));
            let oa = answer(&o, "o.out");
            if oa != qa {
                problems.push(format!(
                    "{who} dd {c:?}:\n qemu-img {qa:?}\n ours     {oa:?}"
                ));
                continue;
            }
            if !d.join("q.out").exists() {
                continue;
            }
            let fmt = if c.contains(&"qcow2") && c.contains(&"-O") {
                "qcow2"
            } else {
                "raw"
            };
            let cmp = tool(
                "qemu-img",
                d,
                ["compare", "-f", fmt, "-F", fmt, "q.out", "o.out"],
            );
            if !cmp.success() {
                problems.push(format!(
                    "{who} dd {c:?}: contents differ: {}",
                    cmp.outcome()
                ));
            }
            if shape(d, "q.out") != shape(d, "o.out") {
                problems.push(format!(
                    "{who} dd {c:?}: allocation or size differ:\n {:?}\n {:?}",
                    shape(d, "q.out"),
                    shape(d, "o.out")
                ));
            }
            if fmt == "qcow2" {
                let chk = tool("qemu-img", d, ["check", "o.out"]);
                if !chk.success() {
                    problems.push(format!("{who} dd {c:?}: check: {}", chk.outcome()));
                }
            }
        }
        let _ = std::fs::remove_file(d.join("q.out"));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
