//! `qnbd snapshot` against `qemu-img snapshot`: `-l` (and no operation, which lists) prints
//! qemu-img's table for images whose snapshots qemu-img made (one, several, v2, none, raw),
//! with and without `-q` and `-U`, refuses like qemu-img (a writer holds the image, a missing
//! file, mixed operations), run as `qnbd snapshot` and through a `qemu-img` link. `-c`, `-a`
//! and `-d` are refused and leave the image byte for byte unchanged.

use qcow2_spec_tests::{
    qemu_words, qnbd_bin, require_tools, scratch_dir, sha256_file, tool, NbdServer, Run,
};
use std::path::Path;

fn sh(dir: &Path, cmd: &str) {
    let r = tool("sh", dir, ["-c", cmd]);
    assert!(r.success(), "{cmd}: {}", r.outcome());
}

/// stdout, the message without the program prefix and without qnbd's `hint:` lines, exit code.
fn answer(r: &Run) -> (String, String, Option<i32>) {
    let err = qemu_words(&r.stderr).replace("Try 'qnbd snapshot", "Try 'qemu-img snapshot");
    (r.stdout_text(), err, r.code)
}

#[test]
fn snapshot_list_is_qemu_img_s() {
    if !require_tools("snapshot", &["qemu-img", "qemu-io", "qemu-nbd"]) {
        return;
    }
    let tmp = scratch_dir();
    let d = tmp.path();
    for cmd in [
        "qemu-img create -q -f qcow2 one.qcow2 64M",
        "qemu-io -c 'write -P 1 0 1M' one.qcow2",
        "qemu-img snapshot -c first one.qcow2",
        "qemu-img create -q -f qcow2 -o cluster_size=4k three.qcow2 16M",
        "qemu-img snapshot -c a three.qcow2",
        "qemu-io -c 'write -P 2 1M 1M' three.qcow2",
        "qemu-img snapshot -c 'with space' three.qcow2",
        "qemu-img snapshot -c a-much-longer-snapshot-name-than-the-column three.qcow2",
        "qemu-img snapshot -d a three.qcow2",
        "qemu-img snapshot -c again three.qcow2",
        "qemu-img create -q -f qcow2 -o compat=0.10 v2.qcow2 8M",
        "qemu-img snapshot -c old v2.qcow2",
        "qemu-img create -q -f qcow2 none.qcow2 8M",
        "qemu-img create -q -f raw plain.raw 8M",
    ] {
        sh(d, cmd);
    }
    let bin = d.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::os::unix::fs::symlink(qnbd_bin(), bin.join("qemu-img")).unwrap();
    let link = bin.join("qemu-img");
    let mut cases: Vec<Vec<&str>> = Vec::new();
    for img in [
        "one.qcow2",
        "three.qcow2",
        "v2.qcow2",
        "none.qcow2",
        "plain.raw",
    ] {
        cases.push(vec!["-l", img]);
        cases.push(vec![img]);
        cases.push(vec!["-q", "-l", img]);
        cases.push(vec!["-U", "-l", img]);
    }
    cases.push(vec!["-f", "raw", "-l", "plain.raw"]);
    cases.push(vec!["-l", "nonexistent.qcow2"]);
    cases.push(vec!["-l", "-c", "x", "one.qcow2"]);
    cases.push(vec!["-a", "x", "-d", "y", "one.qcow2"]);
    let mut problems = Vec::new();
    let check = |problems: &mut Vec<String>, c: &[&str], tag: &str| {
        let mut args = vec!["snapshot"];
        args.extend_from_slice(c);
        let q = answer(&tool("qemu-img", d, &args));
        for (who, p) in [("qnbd", qnbd_bin()), ("link", link.as_path())] {
            let o = answer(&tool(p.to_str().unwrap(), d, &args));
            if o != q {
                problems.push(format!(
                    "{tag}{who} {c:?}:\n qemu-img {q:?}\n ours     {o:?}"
                ));
            }
        }
    };
    for c in &cases {
        check(&mut problems, c, "");
    }
    // a writer holds the image: refused without -U, listed with it
    let holder = NbdServer::qemu_nbd(d, "w", &["-f", "qcow2", "one.qcow2"]);
    check(&mut problems, &["-l", "one.qcow2"], "held: ");
    check(&mut problems, &["-U", "-l", "one.qcow2"], "held: ");
    holder.stop();
    assert!(problems.is_empty(), "{}", problems.join("\n"));

    // -c, -a and -d are refused before anything is opened for writing
    for op in [["-c", "new"], ["-a", "first"], ["-d", "first"]] {
        let before = sha256_file(&d.join("one.qcow2")).unwrap();
        let r = tool(
            qnbd_bin().to_str().unwrap(),
            d,
            ["snapshot", op[0], op[1], "one.qcow2"],
        );
        assert_eq!(r.code, Some(1), "{}", r.outcome());
        assert!(
            r.stderr.contains("not supported by this version"),
            "{}",
            r.stderr
        );
        assert_eq!(sha256_file(&d.join("one.qcow2")).unwrap(), before, "{op:?}");
    }
}
