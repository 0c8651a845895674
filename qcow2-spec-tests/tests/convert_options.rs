//! `qnbd convert` options side by side with `qemu-img convert` on the same inputs (made by
//! qemu-img and qemu-io): `-l` internal snapshots, several sources, `-S`, `-n` into qcow2
//! targets and `--target-is-zero`. Each case runs both programs with the same arguments and
//! compares exit codes, messages (after the program prefix), `qemu-img compare` of the outputs,
//! their allocation (`qemu-img map --output=json` without host offsets) and `qemu-img check`
//! of qcow2 outputs.

use qcow2_spec_tests::{qemu_img_check, qnbd_bin, require_tools, scratch_dir};
use std::path::Path;
use std::process::Command;

/// `sh -ec SCRIPT` in `dir`: exit code, stdout, stderr.
fn sh(script: &str, dir: &Path) -> (i32, String, String) {
    let o = Command::new("sh")
        .arg("-ec")
        .arg(script)
        .current_dir(dir)
        .output()
        .unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn setup(script: &str, dir: &Path) {
    let (rc, out, err) = sh(script, dir);
    assert_eq!(rc, 0, "setup failed: {out}{err}");
}

/// The allocation of `img`: qemu-img map's JSON without host offsets.
fn map(dir: &Path, fmt: &str, img: &str) -> String {
    let (rc, out, err) = sh(&format!("qemu-img map --output=json -f {fmt} {img}"), dir);
    assert_eq!(rc, 0, "map {img}: {err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let mut lines = Vec::new();
    for mut e in v.as_array().unwrap().iter().cloned() {
        e.as_object_mut().unwrap().remove("offset");
        lines.push(e.to_string());
    }
    lines.join("\n")
}

/// Messages without the program prefix.
fn messages(err: &str) -> String {
    qcow2_spec_tests::qemu_words(err)
}

/// Runs `convert ARGS` with qemu-img (output `q.FMT`) and qnbd (output `o.FMT`); `{out}` in
/// `args` is the output name, `{prep}` a shell command run before each (with `{out}` too).
/// Same exit code and messages; on success the outputs are compared. Returns qemu-img's exit
/// code.
fn side_by_side(dir: &Path, fmt: &str, prep: &str, args: &str) -> i32 {
    let q = qnbd_bin().display().to_string();
    let run = |prog: &str, out: &str| {
        let p = prep.replace("{out}", out);
        let a = args.replace("{out}", out);
        sh(&format!("rm -f {out}\n{p}\n{prog} convert {a}"), dir)
    };
    let (rc_q, _, err_q) = run("qemu-img", &format!("q.{fmt}"));
    let (rc_o, _, err_o) = run(&q, &format!("o.{fmt}"));
    // the outputs' own names stand as OUT
    let (mo, mq) = (
        messages(&err_o).replace(&format!("o.{fmt}"), "OUT"),
        messages(&err_q).replace(&format!("q.{fmt}"), "OUT"),
    );
    assert_eq!(
        (rc_o, mo),
        (rc_q, mq),
        "convert {args}: qnbd (left) vs qemu-img (right)"
    );
    if rc_q != 0 {
        return rc_q;
    }
    let (q_out, o_out) = (format!("q.{fmt}"), format!("o.{fmt}"));
    let (rc, out, err) = sh(
        &format!("qemu-img compare -f {fmt} -F {fmt} {q_out} {o_out}"),
        dir,
    );
    assert_eq!(rc, 0, "convert {args}: outputs differ: {out}{err}");
    assert_eq!(
        map(dir, fmt, &o_out),
        map(dir, fmt, &q_out),
        "convert {args}: allocation of qnbd's output (left) vs qemu-img's (right)"
    );
    if fmt == "qcow2" {
        let (rc, out) = qemu_img_check(dir, &dir.join(&o_out));
        assert_eq!(rc, 0, "convert {args}: qemu-img check: {out}");
    }
    0
}

/// s.qcow2 with snapshot `snap1` (id 1) over older data, ov.qcow2 over it with its own
/// snapshot `ovs`, r.raw.
fn snapshot_images(d: &Path) {
    setup(
        "qemu-img create -q -f qcow2 s.qcow2 4M
         qemu-io -f qcow2 -c 'write -P 1 0 1M' -c 'write -c -P 3 2M 64k' -c 'write -z 3M 64k' s.qcow2 >/dev/null
         qemu-img snapshot -c snap1 s.qcow2
         qemu-io -f qcow2 -c 'write -P 2 0 512k' -c 'write -P 4 3M 64k' s.qcow2 >/dev/null
         qemu-img snapshot -c snap2 s.qcow2
         qemu-io -f qcow2 -c 'write -P 5 1M 1M' s.qcow2 >/dev/null
         qemu-img create -q -f qcow2 -b s.qcow2 -F qcow2 ov.qcow2
         qemu-io -f qcow2 -c 'write -P 6 0 4k' ov.qcow2 >/dev/null
         qemu-img snapshot -c ovs ov.qcow2
         qemu-io -f qcow2 -c 'write -P 7 0 8k' ov.qcow2 >/dev/null
         qemu-img create -q -f raw r.raw 1M",
        d,
    );
}

#[test]
fn convert_internal_snapshot() {
    if !require_tools("convert -l", &["qemu-img", "qemu-io"]) {
        return;
    }
    let dir = scratch_dir();
    let d = dir.path();
    snapshot_images(d);
    for fmt in ["raw", "qcow2"] {
        for l in [
            "snap1",
            "1",
            "snap2",
            "2",
            "snapshot.id=1",
            "snapshot.name=snap2",
            "snapshot.id=2,snapshot.name=snap2",
        ] {
            assert_eq!(
                side_by_side(d, fmt, "", &format!("-l {l} -O {fmt} s.qcow2 {{out}}")),
                0,
                "-l {l}"
            );
        }
        // a snapshot of an overlay: its backing file keeps its active state
        assert_eq!(
            side_by_side(d, fmt, "", &format!("-l ovs -O {fmt} ov.qcow2 {{out}}")),
            0
        );
    }
    // refusals, with qemu-img's messages
    for (l, src) in [
        ("nosuch", "s.qcow2"),
        ("snapshot.id=9", "s.qcow2"),
        ("snapshot.name=snap9", "s.qcow2"),
        ("snapshot.id=1,snapshot.name=snap2", "s.qcow2"),
        ("'snapshot.id='", "s.qcow2"),
        ("''", "s.qcow2"),
        ("foo=1", "s.qcow2"),
        ("snapshot.id=1,foo=2", "s.qcow2"),
        ("snapshot.foo=1", "s.qcow2"),
        ("snap1", "r.raw"),
        ("ovs", "s.qcow2"),
    ] {
        assert_eq!(
            side_by_side(d, "raw", "", &format!("-l {l} -O raw {src} {{out}}")),
            1,
            "-l {l} {src}"
        );
    }
}

/// Sources of several kinds: c.qcow2 (compressed, zero and data clusters, unallocated),
/// top.qcow2 over base.qcow2, odd.raw (5000 random bytes: not a multiple of 512),
/// z4k.qcow2 (4 KiB clusters: data with zero runs of 12 KiB, 100 KiB and 1 KiB inside).
fn mixed_images(d: &Path) {
    setup(
        "qemu-img create -q -f qcow2 c.qcow2 4M
         qemu-io -f qcow2 -c 'write -P 1 0 64k' -c 'write -P 2 68k 4k' -c 'write -P 0 200k 64k' -c 'write -z 1M 128k' -c 'write -c -P 7 3M 64k' c.qcow2 >/dev/null
         qemu-img create -q -f qcow2 base.qcow2 2M
         qemu-io -f qcow2 -c 'write -P 3 0 1M' base.qcow2 >/dev/null
         qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2
         qemu-io -f qcow2 -c 'write -P 4 512k 64k' -c 'write -z 0 64k' top.qcow2 >/dev/null
         head -c 5000 /dev/urandom > odd.raw
         qemu-img create -q -f qcow2 -o cluster_size=4k z4k.qcow2 1M
         qemu-io -f qcow2 -c 'write -P 1 0 4k' -c 'write -P 0 4k 12k' -c 'write -P 2 16k 4k' -c 'write -P 0 20k 100k' -c 'write -P 3 120k 1k' -c 'write -P 0 121k 1k' -c 'write -P 3 122k 1k' z4k.qcow2 >/dev/null",
        d,
    );
}

#[test]
fn convert_several_sources() {
    if !require_tools("convert with several sources", &["qemu-img", "qemu-io"]) {
        return;
    }
    let dir = scratch_dir();
    let d = dir.path();
    mixed_images(d);
    for fmt in ["raw", "qcow2"] {
        for srcs in [
            "c.qcow2 top.qcow2",
            "odd.raw c.qcow2 odd.raw",
            "top.qcow2 odd.raw z4k.qcow2 c.qcow2",
        ] {
            for opts in ["", "-c", "-o cluster_size=4k"] {
                if fmt == "raw" && !opts.is_empty() {
                    continue;
                }
                assert_eq!(
                    side_by_side(d, fmt, "", &format!("{opts} -O {fmt} {srcs} {{out}}")),
                    0,
                    "{opts} {srcs}"
                );
            }
        }
    }
    // -f names the format of every source
    assert_eq!(
        side_by_side(d, "raw", "", "-f raw -O raw odd.raw c.qcow2 {out}"),
        0
    );
    for args in [
        "-f qcow2 -O raw c.qcow2 odd.raw {out}",
        "-O qcow2 -B base.qcow2 -F qcow2 top.qcow2 c.qcow2 {out}",
        "-l snap1 -O raw c.qcow2 c.qcow2 {out}",
        "-O raw c.qcow2 nonexist.qcow2 {out}",
        "-O raw c.qcow2",
    ] {
        assert_eq!(side_by_side(d, "raw", "", args), 1, "{args}");
    }
}

#[test]
fn convert_sparse_size() {
    if !require_tools("convert -S", &["qemu-img", "qemu-io"]) {
        return;
    }
    let dir = scratch_dir();
    let d = dir.path();
    mixed_images(d);
    for s in ["0", "512", "4k", "8k", "3k", "64k", "1M", "16M"] {
        for src in [
            "z4k.qcow2",
            "c.qcow2",
            "top.qcow2",
            "odd.raw c.qcow2 z4k.qcow2",
        ] {
            for (fmt, opts) in [
                ("raw", ""),
                ("qcow2", ""),
                ("qcow2", "-o cluster_size=4k"),
                ("qcow2", "-c"),
            ] {
                assert_eq!(
                    side_by_side(d, fmt, "", &format!("-S {s} {opts} -O {fmt} {src} {{out}}")),
                    0,
                    "-S {s} {opts} {src}"
                );
            }
        }
    }
    for s in ["1", "1000", "-1", "x", "32M", "9223372036854775808"] {
        assert_eq!(
            side_by_side(d, "raw", "", &format!("-S {s} -O raw c.qcow2 {{out}}")),
            1,
            "-S {s}"
        );
    }
}

#[test]
fn convert_into_existing_targets() {
    if !require_tools("convert -n", &["qemu-img", "qemu-io"]) {
        return;
    }
    let dir = scratch_dir();
    let d = dir.path();
    mixed_images(d);
    snapshot_images(d);
    // targets holding old data everywhere (v3 with 4 KiB clusters, v2), fresh ones, raw ones
    let old_v3 = "qemu-img create -q -f qcow2 -o cluster_size=4k {out} 8M; qemu-io -f qcow2 -c 'write -P 9 0 8M' {out} >/dev/null";
    let old_v2 = "qemu-img create -q -f qcow2 -o compat=0.10 {out} 8M; qemu-io -f qcow2 -c 'write -P 9 0 8M' {out} >/dev/null";
    let fresh = "qemu-img create -q -f qcow2 {out} 8M";
    let backed = "qemu-img create -q -f qcow2 -b $PWD/s.qcow2 -F qcow2 {out}";
    setup("head -c 8M /dev/urandom > old.rnd", d);
    let raw_old = "cp old.rnd {out}";
    for src in ["z4k.qcow2", "c.qcow2", "top.qcow2", "odd.raw c.qcow2"] {
        for tz in ["", "--target-is-zero"] {
            for (fmt, prep, opts) in [
                ("qcow2", old_v3, ""),
                ("qcow2", old_v2, ""),
                ("qcow2", fresh, ""),
                ("qcow2", fresh, "-S 0"),
                ("qcow2", fresh, "-c"),
                ("raw", raw_old, ""),
                ("raw", raw_old, "-S 0"),
            ] {
                assert_eq!(
                    side_by_side(
                        d,
                        fmt,
                        prep,
                        &format!("-n {tz} {opts} -O {fmt} {src} {{out}}")
                    ),
                    0,
                    "-n {tz} {opts} {src} onto: {prep}"
                );
            }
        }
        // (a target smaller than the sources is refused by both)
        side_by_side(d, "qcow2", backed, &format!("-n -O qcow2 {src} {{out}}"));
    }
    // a snapshot into an existing image
    assert_eq!(
        side_by_side(d, "qcow2", old_v3, "-n -l snap1 -O qcow2 s.qcow2 {out}"),
        0
    );
    // refusals
    for (prep, args) in [
        ("", "-n -O qcow2 c.qcow2 {out}"),
        (
            "qemu-img create -q -f raw {out} 8M",
            "-n -O qcow2 c.qcow2 {out}",
        ),
        (
            "qemu-img create -q -f qcow2 {out} 1M",
            "-n -O qcow2 c.qcow2 {out}",
        ),
        (fresh, "-n -o cluster_size=4k -O qcow2 c.qcow2 {out}"),
        (fresh, "--target-is-zero -O qcow2 c.qcow2 {out}"),
    ] {
        assert_eq!(side_by_side(d, "qcow2", prep, args), 1, "{args}");
    }
    // qemu-img reports this one but exits 0, converting nothing
    side_by_side(
        d,
        "qcow2",
        fresh,
        "-n --target-is-zero -B s.qcow2 -F qcow2 -O qcow2 c.qcow2 {out}",
    );
    assert_eq!(
        side_by_side(d, "raw", "", "--target-is-zero -O raw c.qcow2 {out}"),
        1
    );
}
