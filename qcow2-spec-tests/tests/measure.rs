//! `qnbd measure` against `qemu-img measure`: for sources nobody here made (a sparse raw file,
//! `qemu-img convert -c` output, zero clusters written by qemu-io, a chain whose base is
//! shorter, extended L2, an internal snapshot, persistent bitmaps, compat=0.10) and for
//! `--size` alone, under every cluster size and refcount width tried, the human and JSON output,
//! the error messages and the exit codes equal qemu-img's; run as `qnbd measure` and through a
//! `qemu-img` link.

use qcow2_spec_tests::{qemu_words, qnbd_bin, require_tools, scratch_dir, tool, Run};
use std::path::Path;

fn sh(dir: &Path, cmd: &str) {
    let r = tool("sh", dir, ["-c", cmd]);
    assert!(r.success(), "{cmd}: {}", r.outcome());
}

/// stdout, stderr without the program prefix, exit code.
fn answer(r: &Run) -> (String, String, Option<i32>) {
    (r.stdout_text(), qemu_words(&r.stderr), r.code)
}

fn make_sources(d: &Path) {
    for cmd in [
        "qemu-img create -q -f raw sp.raw 100M",
        "qemu-io -f raw -c 'write 10M 1M' -c 'write 50M 4k' sp.raw",
        "qemu-img convert -c -O qcow2 sp.raw cz.qcow2",
        "qemu-img convert -c -O qcow2 -o compression_type=zstd,cluster_size=4k sp.raw zs.qcow2",
        "qemu-img create -q -f qcow2 zc.qcow2 64M",
        "qemu-io -c 'write -z 0 8M' -c 'write -P 1 8M 100k' -c 'write -P 1 9M 1k' zc.qcow2",
        "qemu-img create -q -f qcow2 -o cluster_size=4k base.qcow2 32M",
        "qemu-io -c 'write -P 2 0 5M' base.qcow2",
        "qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2 40M",
        "qemu-io -c 'write -P 3 30M 6M' -c 'write -z 1M 1M' top.qcow2",
        "qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=128k el.qcow2 50M",
        "qemu-io -c 'write -P 4 1k 3k' -c 'write -P 4 1M 65k' el.qcow2",
        "qemu-img create -q -f qcow2 -o cluster_size=4k bm.qcow2 1G",
        "qemu-io -c 'write -P 1 0 20M' bm.qcow2",
        "qemu-img snapshot -c s1 bm.qcow2",
        "qemu-io -c 'write -P 2 100M 5M' bm.qcow2",
        "qemu-img bitmap --add bm.qcow2 b1",
        "qemu-img bitmap --add -g 1M bm.qcow2 a-longer-bitmap-name",
        "qemu-img create -q -f qcow2 -o compat=0.10 v2.qcow2 10M",
        "qemu-io -c 'write -P 5 0 1M' v2.qcow2",
        "qemu-img create -q -f qcow2 empty.qcow2 10M",
        "qemu-img create -q -f raw odd.raw 1000001",
    ] {
        sh(d, cmd);
    }
}

#[test]
fn measure_answers_as_qemu_img() {
    if !require_tools("measure", &["qemu-img", "qemu-io"]) {
        return;
    }
    let tmp = scratch_dir();
    let d = tmp.path();
    make_sources(d);
    let bin = d.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::os::unix::fs::symlink(qnbd_bin(), bin.join("qemu-img")).unwrap();
    let link = bin.join("qemu-img");

    let mut cases: Vec<Vec<String>> = Vec::new();
    let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let sources = [
        "sp.raw",
        "cz.qcow2",
        "zs.qcow2",
        "zc.qcow2",
        "top.qcow2",
        "el.qcow2",
        "bm.qcow2",
        "v2.qcow2",
        "empty.qcow2",
        "odd.raw",
    ];
    let option_sets: [&[&str]; 10] = [
        &[],
        &["-o", "cluster_size=4k"],
        &["-o", "cluster_size=2M"],
        &["-o", "cluster_size=512,refcount_bits=64"],
        &["-o", "refcount_bits=1"],
        &["-o", "extended_l2=on"],
        &["-o", "compat=0.10"],
        &["-o", "backing_file=x"],
        &["-o", "preallocation=metadata"],
        &["-o", "preallocation=full"],
    ];
    for src in sources {
        for o in option_sets {
            let mut c = v(&["-O", "qcow2"]);
            c.extend(v(o));
            c.push(src.into());
            cases.push(c.clone());
            c.push("--output=json".into());
            cases.push(c);
        }
        cases.push(v(&["-O", "raw", src]));
        cases.push(v(&[src, "--output=json"]));
    }
    for size in ["0", "1", "1000", "10M", "1G", "1T", "1P"] {
        for o in [
            "cluster_size=64k",
            "cluster_size=512",
            "cluster_size=2M,refcount_bits=1",
            "extended_l2=on,cluster_size=16k",
            "preallocation=falloc",
        ] {
            cases.push(v(&["-O", "qcow2", "-o", o, "--size", size]));
        }
        cases.push(v(&["--size", size]));
    }
    // snapshots, sources by structured names, -U
    for c in [
        &["-O", "qcow2", "-l", "s1", "bm.qcow2"][..],
        &["-O", "qcow2", "-l", "snapshot.name=s1", "bm.qcow2"],
        &["-O", "qcow2", "-l", "nosuch", "bm.qcow2"],
        &["-O", "qcow2", "-U", "top.qcow2"],
        &["-O", "qcow2", "-f", "raw", "cz.qcow2"],
        &["-O", "qcow2", "-f", "qcow2", "sp.raw"],
        &[
            "-O",
            "qcow2",
            "--image-opts",
            "driver=qcow2,file.filename=zc.qcow2",
        ],
        &[
            "-O",
            "qcow2",
            r#"json:{"driver":"raw","file":{"filename":"sp.raw"}}"#,
        ],
    ] {
        cases.push(v(c));
    }
    // refusals
    for o in [
        "compat=2",
        "refcount_bits=3",
        "refcount_bits=128",
        "compat=0.10,refcount_bits=8",
        "preallocation=foo",
        "cluster_size=1k,extended_l2=on",
        "cluster_size=3k",
        "extended_l2=maybe",
        "cluster_size=abc",
        "foo=1",
        "size=abc",
    ] {
        cases.push(v(&["-O", "qcow2", "-o", o, "--size", "10M"]));
    }
    for c in [
        &["--size", "1G", "sp.raw"][..],
        &[],
        &["--size", "abc"],
        &["--size", "-5"],
        &["--size", "1G", "-O", "vmdk"],
        &["--size", "1P", "-O", "qcow2", "-o", "cluster_size=512"],
        &["nonexistent.qcow2"],
        &["-O", "raw", "-o", "cluster_size=4k", "--size", "10M"],
        &["-l", "s1", "--size", "1M", "-O", "qcow2"],
        &["--size", "10M", "--size", "20M", "-O", "qcow2"],
    ] {
        cases.push(v(c));
    }

    let mut problems = Vec::new();
    for c in &cases {
        let mut args = vec!["measure".to_string()];
        args.extend(c.iter().cloned());
        let qemu = answer(&tool("qemu-img", d, &args));
        for (who, program) in [("qnbd", qnbd_bin()), ("qemu-img link", link.as_path())] {
            let ours = answer(&tool(program.to_str().unwrap(), d, &args));
            if ours != qemu {
                problems.push(format!(
                    "{who} measure {c:?}:\n qemu-img {qemu:?}\n ours     {ours:?}"
                ));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "{} of {} cases differ:\n{}",
        problems.len(),
        cases.len(),
        problems.join("\n")
    );
    assert!(cases.len() > 250, "{}", cases.len());
}
