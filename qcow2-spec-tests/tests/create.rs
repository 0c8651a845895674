//! `qnbd create` against `qemu-img create`: for each option set both tools create an image in
//! their own directory (same relative names), and then
//!
//! * stdout, stderr (tool prefix removed) and exit status must be equal;
//! * `qemu-img info --output=json` of both images must be equal (`actual-size` included, to
//!   within a few filesystem blocks);
//! * `qemu-img check` must find no errors and no leaks in ours;
//! * a fresh image without backing file must read as zeros through qemu-io;
//! * `qnbd map --output=json` of ours must equal `qemu-img map --output=json` of QEMU's;
//! * the files (image and data file) must be byte-identical, except where `create.rs` documents
//!   a known difference.
//!
//! Without qemu-img the test prints SKIP, unless under CI (`CI=true` or `CI=1`), where that is a
//! failure.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// True when the oracle tools are here; prints SKIP (or panics under CI) otherwise.
fn require_tools() -> bool {
    qcow2_spec_tests::require_tools("qnbd create vs qemu-img create", &["qemu-img", "qemu-io"])
}

/// The qnbd binary of the profile this test was built with, built on first use.
fn qnbd_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let profile = exe
        .parent()
        .and_then(Path::parent)
        .expect("profile directory")
        .to_path_buf();
    let bin = profile.join("qnbd");
    static BUILD: std::sync::Once = std::sync::Once::new();
    BUILD.call_once(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let mut c = Command::new(cargo);
        c.current_dir(root)
            .args(["build", "-p", "qnbd", "--bin", "qnbd"]);
        if profile.file_name().is_some_and(|n| n == "release") {
            c.arg("--release");
        }
        if let Some(t) = profile.parent() {
            c.env("CARGO_TARGET_DIR", t);
        }
        let st = c.status().expect("run cargo build");
        assert!(st.success(), "building qnbd failed");
    });
    bin
}

fn run_in(dir: &Path, prog: &Path, args: &[&str]) -> Output {
    Command::new(prog)
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {prog:?}: {e}"))
}

fn text(o: &Output) -> String {
    format!(
        "{}{}rc={}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
        o.status.code().unwrap_or(-1)
    )
}

fn json(o: &Output) -> serde_json::Value {
    assert!(
        o.status.success(),
        "command failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).expect("JSON output")
}

struct Case {
    /// Arguments after `create` (image name and size included).
    args: &'static [&'static str],
    /// The files both tools write (compared byte for byte unless `exact` is false).
    files: &'static [&'static str],
    /// Byte-identical with QEMU's (false only for the documented known difference).
    exact: bool,
    /// Compare `qnbd map` with `qemu-img map`. Off where `qnbd map` itself (not creation) is
    /// known to differ: a 0-byte disk (qemu-img prints one 0-length entry, qnbd none) and
    /// fallocated raw ranges (qemu-img reports unwritten extents as zero, qnbd as data).
    map: bool,
}

const fn case(args: &'static [&'static str], files: &'static [&'static str]) -> Case {
    Case {
        args,
        files,
        exact: true,
        map: true,
    }
}

/// A case whose `map` comparison is skipped (see [`Case::map`]).
const fn no_map(args: &'static [&'static str], files: &'static [&'static str]) -> Case {
    Case {
        args,
        files,
        exact: true,
        map: false,
    }
}

const IMG: &[&str] = &["a.qcow2"];

fn matrix() -> Vec<Case> {
    vec![
        // sizes: aligned, unaligned, 0, sub-sector, large
        case(&["-f", "qcow2", "a.qcow2", "1G"], IMG),
        no_map(&["-f", "qcow2", "a.qcow2", "0"], IMG),
        case(&["-f", "qcow2", "a.qcow2", "1000000"], IMG),
        case(&["-f", "qcow2", "a.qcow2", "1000"], IMG),
        case(&["-f", "qcow2", "a.qcow2", "3T"], IMG),
        case(&["-f", "qcow2", "-o", "size=3M", "a.qcow2"], IMG),
        // compat levels
        case(&["-f", "qcow2", "-o", "compat=0.10", "a.qcow2", "10M"], IMG),
        case(
            &[
                "-f",
                "qcow2",
                "-o",
                "compat=v2,preallocation=metadata",
                "a.qcow2",
                "3M",
            ],
            IMG,
        ),
        case(&["-f", "qcow2", "-o", "compat=1.1", "a.qcow2", "10M"], IMG),
        // cluster sizes 512 .. 2M
        case(
            &["-f", "qcow2", "-o", "cluster_size=512", "a.qcow2", "10M"],
            IMG,
        ),
        case(
            &["-f", "qcow2", "-o", "cluster_size=4k", "a.qcow2", "10M"],
            IMG,
        ),
        case(
            &["-f", "qcow2", "-o", "cluster_size=8k", "a.qcow2", "10M"],
            IMG,
        ),
        case(
            &["-f", "qcow2", "-o", "cluster_size=2M", "a.qcow2", "10G"],
            IMG,
        ),
        case(
            &[
                "-f",
                "qcow2",
                "-o",
                "cluster_size=512,preallocation=metadata",
                "a.qcow2",
                "2M",
            ],
            IMG,
        ),
        // refcount widths
        case(
            &["-f", "qcow2", "-o", "refcount_bits=1", "a.qcow2", "10M"],
            IMG,
        ),
        case(
            &["-f", "qcow2", "-o", "refcount_bits=2", "a.qcow2", "10M"],
            IMG,
        ),
        case(
            &[
                "-f",
                "qcow2",
                "-o",
                "refcount_bits=4,preallocation=metadata",
                "a.qcow2",
                "10M",
            ],
            IMG,
        ),
        case(
            &["-f", "qcow2", "-o", "refcount_bits=8", "a.qcow2", "10M"],
            IMG,
        ),
        case(
            &[
                "-f",
                "qcow2",
                "-o",
                "refcount_bits=32,preallocation=falloc",
                "a.qcow2",
                "10M",
            ],
            IMG,
        ),
        case(
            &[
                "-f",
                "qcow2",
                "-o",
                "refcount_bits=64,preallocation=full",
                "a.qcow2",
                "5M",
            ],
            IMG,
        ),
        case(
            &[
                "-f",
                "qcow2",
                "-o",
                "cluster_size=512,refcount_bits=1,preallocation=metadata",
                "a.qcow2",
                "4M",
            ],
            IMG,
        ),
        Case {
            args: &[
                "-f",
                "qcow2",
                "-o",
                "cluster_size=512,refcount_bits=64,preallocation=metadata",
                "a.qcow2",
                "4M",
            ],
            files: IMG,
            exact: false,
            map: true,
        },
        // features
        case(
            &["-f", "qcow2", "-o", "lazy_refcounts=on", "a.qcow2", "10M"],
            IMG,
        ),
        case(
            &[
                "-f",
                "qcow2",
                "-o",
                "lazy_refcounts=on,preallocation=metadata",
                "a.qcow2",
                "10M",
            ],
            IMG,
        ),
        case(
            &["-f", "qcow2", "-o", "extended_l2=on", "a.qcow2", "10M"],
            IMG,
        ),
        case(
            &[
                "-f",
                "qcow2",
                "-o",
                "extended_l2=on,cluster_size=16k,preallocation=metadata",
                "a.qcow2",
                "1000000",
            ],
            IMG,
        ),
        case(
            &[
                "-f",
                "qcow2",
                "-o",
                "extended_l2=on,cluster_size=2M,preallocation=metadata",
                "a.qcow2",
                "5G",
            ],
            IMG,
        ),
        case(
            &[
                "-f",
                "qcow2",
                "-o",
                "compression_type=zstd",
                "a.qcow2",
                "10M",
            ],
            IMG,
        ),
        // preallocation
        case(
            &["-f", "qcow2", "-o", "preallocation=off", "a.qcow2", "10M"],
            IMG,
        ),
        case(
            &[
                "-f",
                "qcow2",
                "-o",
                "preallocation=metadata",
                "a.qcow2",
                "1000000",
            ],
            IMG,
        ),
        case(
            &[
                "-f",
                "qcow2",
                "-o",
                "preallocation=metadata",
                "a.qcow2",
                "1G",
            ],
            IMG,
        ),
        case(
            &[
                "-f",
                "qcow2",
                "-o",
                "preallocation=falloc",
                "a.qcow2",
                "100M",
            ],
            IMG,
        ),
        case(
            &[
                "-f",
                "qcow2",
                "-o",
                "preallocation=falloc",
                "a.qcow2",
                "1000000",
            ],
            IMG,
        ),
        case(
            &["-f", "qcow2", "-o", "preallocation=full", "a.qcow2", "10M"],
            IMG,
        ),
        // external data files
        case(
            &[
                "-f",
                "qcow2",
                "-o",
                "data_file=a.data",
                "a.qcow2",
                "1000000",
            ],
            &["a.qcow2", "a.data"],
        ),
        case(
            &[
                "-f",
                "qcow2",
                "-o",
                "data_file=a.data,data_file_raw=on",
                "a.qcow2",
                "1000000",
            ],
            &["a.qcow2", "a.data"],
        ),
        case(
            &[
                "-f",
                "qcow2",
                "-o",
                "data_file=a.data,data_file_raw=on",
                "a.qcow2",
                "1M",
            ],
            &["a.qcow2", "a.data"],
        ),
        case(
            &[
                "-f",
                "qcow2",
                "-o",
                "data_file=a.data,preallocation=metadata",
                "a.qcow2",
                "1M",
            ],
            &["a.qcow2", "a.data"],
        ),
        case(
            &[
                "-f",
                "qcow2",
                "-o",
                "data_file=a.data,preallocation=falloc",
                "a.qcow2",
                "1M",
            ],
            &["a.qcow2", "a.data"],
        ),
        case(
            &[
                "-f",
                "qcow2",
                "-o",
                "data_file=a.data,preallocation=full",
                "a.qcow2",
                "1000000",
            ],
            &["a.qcow2", "a.data"],
        ),
        no_map(
            &["-f", "qcow2", "-o", "data_file=a.data", "a.qcow2", "0"],
            &["a.qcow2", "a.data"],
        ),
        // backing files
        case(
            &["-f", "qcow2", "-b", "base.raw", "-F", "raw", "a.qcow2"],
            IMG,
        ),
        case(
            &["-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "a.qcow2"],
            IMG,
        ),
        case(
            &[
                "-f", "qcow2", "-b", "base.raw", "-F", "raw", "a.qcow2", "10M",
            ],
            IMG,
        ),
        case(
            &[
                "-f", "qcow2", "-b", "base.raw", "-F", "raw", "-u", "a.qcow2", "5M",
            ],
            IMG,
        ),
        case(
            &[
                "-f",
                "qcow2",
                "-b",
                "missing.raw",
                "-F",
                "raw",
                "-u",
                "a.qcow2",
                "5M",
            ],
            IMG,
        ),
        case(
            &[
                "-f",
                "qcow2",
                "-o",
                "backing_file=base.raw,backing_fmt=raw",
                "a.qcow2",
            ],
            IMG,
        ),
        case(
            &[
                "-f",
                "qcow2",
                "-o",
                "extended_l2=on,preallocation=metadata",
                "-b",
                "base.raw",
                "-F",
                "raw",
                "a.qcow2",
            ],
            IMG,
        ),
        case(
            &[
                "-f",
                "qcow2",
                "-o",
                "compat=0.10",
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                "a.qcow2",
                "1000000",
            ],
            IMG,
        ),
        case(&["-q", "-f", "qcow2", "a.qcow2", "1M"], IMG),
        // raw
        case(&["-f", "raw", "r.raw", "1000000"], &["r.raw"]),
        no_map(&["-f", "raw", "r.raw", "0"], &["r.raw"]),
        case(&["-f", "raw", "r.raw", "1000"], &["r.raw"]),
        no_map(
            &["-f", "raw", "-o", "preallocation=falloc", "r.raw", "1M"],
            &["r.raw"],
        ),
        case(
            &["-f", "raw", "-o", "preallocation=full", "r.raw", "1M"],
            &["r.raw"],
        ),
        case(&["r.raw", "64k"], &["r.raw"]),
        // refusals: same message, no file left behind
        case(
            &["-f", "qcow2", "-o", "cluster_size=1000", "a.qcow2", "1M"],
            IMG,
        ),
        case(
            &["-f", "qcow2", "-o", "cluster_size=4M", "a.qcow2", "1M"],
            IMG,
        ),
        case(
            &["-f", "qcow2", "-o", "refcount_bits=3", "a.qcow2", "1M"],
            IMG,
        ),
        case(
            &["-f", "qcow2", "-o", "refcount_bits=128", "a.qcow2", "1M"],
            IMG,
        ),
        case(
            &[
                "-f",
                "qcow2",
                "-o",
                "compat=0.10,refcount_bits=8",
                "a.qcow2",
                "1M",
            ],
            IMG,
        ),
        case(
            &[
                "-f",
                "qcow2",
                "-o",
                "compat=0.10,lazy_refcounts=on",
                "a.qcow2",
                "1M",
            ],
            IMG,
        ),
        case(
            &[
                "-f",
                "qcow2",
                "-o",
                "extended_l2=on,cluster_size=8k",
                "a.qcow2",
                "1M",
            ],
            IMG,
        ),
        case(
            &[
                "-f",
                "qcow2",
                "-o",
                "compat=0.10,extended_l2=on",
                "a.qcow2",
                "1M",
            ],
            IMG,
        ),
        case(
            &["-f", "qcow2", "-o", "backing_fmt=raw", "a.qcow2", "1M"],
            IMG,
        ),
        case(
            &["-f", "qcow2", "-o", "data_file_raw=on", "a.qcow2", "1M"],
            IMG,
        ),
        case(
            &[
                "-f",
                "qcow2",
                "-o",
                "compat=0.10,data_file=a.data",
                "a.qcow2",
                "1M",
            ],
            IMG,
        ),
        case(
            &[
                "-f",
                "qcow2",
                "-o",
                "compat=0.10,compression_type=zstd",
                "a.qcow2",
                "1M",
            ],
            IMG,
        ),
        case(
            &["-f", "qcow2", "-o", "compression_type=lz4", "a.qcow2", "1M"],
            IMG,
        ),
        case(&["-f", "qcow2", "-o", "compat=2.0", "a.qcow2", "1M"], IMG),
        case(
            &["-f", "qcow2", "-o", "preallocation=bogus", "a.qcow2", "1M"],
            IMG,
        ),
        case(
            &[
                "-f",
                "qcow2",
                "-o",
                "preallocation=metadata",
                "-b",
                "base.raw",
                "-F",
                "raw",
                "a.qcow2",
            ],
            IMG,
        ),
        case(
            &[
                "-f",
                "qcow2",
                "-o",
                "data_file=a.data,data_file_raw=on",
                "-b",
                "base.raw",
                "-F",
                "raw",
                "a.qcow2",
            ],
            IMG,
        ),
        case(
            &["-f", "qcow2", "-o", "lazy_refcounts=maybe", "a.qcow2", "1M"],
            IMG,
        ),
        case(
            &["-f", "qcow2", "-o", "refcount_bits=abc", "a.qcow2", "1M"],
            IMG,
        ),
        case(
            &[
                "-f",
                "qcow2",
                "-b",
                "missing.raw",
                "-F",
                "raw",
                "a.qcow2",
                "1M",
            ],
            IMG,
        ),
        case(
            &[
                "-f", "qcow2", "-b", "base.raw", "-F", "raw", "-u", "a.qcow2",
            ],
            IMG,
        ),
        case(&["-f", "qcow2", "a.qcow2"], IMG),
        case(
            &["-f", "raw", "-o", "preallocation=metadata", "r.raw", "1M"],
            &["r.raw"],
        ),
    ]
}

/// Fields of `qemu-img info` that name this run's directory.
fn strip_paths(v: &mut serde_json::Value) {
    if let Some(o) = v.as_object_mut() {
        o.remove("full-backing-filename");
        for (_, c) in o.iter_mut() {
            strip_paths(c);
        }
    } else if let Some(a) = v.as_array_mut() {
        a.iter_mut().for_each(strip_paths);
    }
}

/// Host allocation of two files with the same layout may differ by a few filesystem blocks
/// (extent-tree blocks, allocation done in another order): where ours is within
/// [`ACTUAL_SIZE_SLACK`] of QEMU's, take QEMU's figure, so that a real difference in
/// preallocation or sparseness (a cluster or more) still fails.
fn reconcile_actual_size(q: &serde_json::Value, o: &mut serde_json::Value) {
    const ACTUAL_SIZE_SLACK: u64 = 16 * 1024;
    match (q, o) {
        (serde_json::Value::Object(q), serde_json::Value::Object(o)) => {
            for (k, ov) in o.iter_mut() {
                let Some(qv) = q.get(k) else { continue };
                if k == "actual-size" {
                    if let (Some(a), Some(b)) = (qv.as_u64(), ov.as_u64()) {
                        if a.abs_diff(b) <= ACTUAL_SIZE_SLACK {
                            *ov = qv.clone();
                        }
                    }
                } else {
                    reconcile_actual_size(qv, ov);
                }
            }
        }
        (serde_json::Value::Array(q), serde_json::Value::Array(o)) => {
            for (qv, ov) in q.iter().zip(o.iter_mut()) {
                reconcile_actual_size(qv, ov);
            }
        }
        _ => {}
    }
}

fn setup(dir: &Path) {
    fs::create_dir_all(dir).unwrap();
    let ok = |o: Output| assert!(o.status.success(), "{}", text(&o));
    ok(run_in(
        dir,
        Path::new("qemu-img"),
        &["create", "-q", "-f", "raw", "base.raw", "3M"],
    ));
    ok(run_in(
        dir,
        Path::new("qemu-io"),
        &["-f", "raw", "-c", "write -P 0x5a 0 1M", "base.raw"],
    ));
    ok(run_in(
        dir,
        Path::new("qemu-img"),
        &["create", "-q", "-f", "qcow2", "base.qcow2", "2M"],
    ));
}

fn check_case(c: &Case, root: &Path, qnbd: &Path, problems: &mut Vec<String>) {
    let label = c.args.join(" ");
    let q = root.join("q");
    let o = root.join("o");
    let _ = fs::remove_dir_all(&q);
    let _ = fs::remove_dir_all(&o);
    setup(&q);
    setup(&o);
    let mut qargs = vec!["create"];
    qargs.extend_from_slice(c.args);
    let qo = run_in(&q, Path::new("qemu-img"), &qargs);
    let oo = run_in(&o, qnbd, &qargs);
    let qt = text(&qo).replace("qemu-img: ", "PROG: ");
    let ot = text(&oo).replace("qnbd: ", "PROG: ");
    if qt != ot {
        problems.push(format!(
            "[{label}] output differs:\n qemu-img: {qt:?}\n qnbd:     {ot:?}"
        ));
    }
    for f in c.files {
        let (qe, oe) = (q.join(f).exists(), o.join(f).exists());
        if qe != oe {
            problems.push(format!(
                "[{label}] {f}: exists for qemu-img {qe}, for qnbd {oe}"
            ));
        }
    }
    if !qo.status.success() || !oo.status.success() {
        return;
    }
    let img = c.files[0];
    if c.args.contains(&"missing.raw") {
        // nothing can open an image whose backing file is missing: compare the bytes only
        compare_files(c, &q, &o, &label, problems);
        return;
    }
    let fmt = if img.ends_with(".raw") {
        "raw"
    } else {
        "qcow2"
    };
    let info = |d: &Path| {
        let mut v = json(&run_in(
            d,
            Path::new("qemu-img"),
            &["info", "--output=json", "-f", fmt, img],
        ));
        strip_paths(&mut v);
        v
    };
    let (qi, mut oi) = (info(&q), info(&o));
    reconcile_actual_size(&qi, &mut oi);
    if qi != oi && c.exact {
        problems.push(format!(
            "[{label}] qemu-img info differs:\n qemu-img: {qi}\n qnbd:     {oi}"
        ));
    }
    if fmt == "qcow2" {
        let ch = run_in(&o, Path::new("qemu-img"), &["check", "--output=json", img]);
        let v = json(&ch);
        for k in ["check-errors", "leaks", "corruptions"] {
            if v.get(k).and_then(|x| x.as_u64()).unwrap_or(0) != 0 {
                problems.push(format!("[{label}] qemu-img check: {v}"));
                break;
            }
        }
    }
    let size = oi["virtual-size"].as_u64().unwrap_or(0);
    let has_backing = oi.get("backing-filename").is_some();
    if size > 0 && !has_backing {
        // the whole disk when small; its first and last 64 MiB otherwise
        const PART: u64 = 64 << 20;
        let ranges = if size <= 4 * PART {
            vec![(0, size)]
        } else {
            vec![(0, PART), (size - PART, PART)]
        };
        for (off, len) in ranges {
            let cmd = format!("read -P 0 {off} {len}");
            let r = run_in(&o, Path::new("qemu-io"), &["-f", fmt, "-c", &cmd, img]);
            let out = String::from_utf8_lossy(&r.stdout);
            if !r.status.success() || out.contains("Pattern verification failed") {
                problems.push(format!("[{label}] qemu-io {cmd}: {}", text(&r)));
            }
        }
    }
    let qmap = run_in(
        &q,
        Path::new("qemu-img"),
        &["map", "--output=json", "-f", fmt, img],
    );
    let omap = run_in(&o, qnbd, &["map", "--output=json", "-f", fmt, img]);
    if qmap.stdout != omap.stdout && c.exact && c.map {
        problems.push(format!(
            "[{label}] map differs:\n qemu-img: {}\n qnbd:     {}",
            String::from_utf8_lossy(&qmap.stdout),
            String::from_utf8_lossy(&omap.stdout)
        ));
    }
    compare_files(c, &q, &o, &label, problems);
}

fn compare_files(c: &Case, q: &Path, o: &Path, label: &str, problems: &mut Vec<String>) {
    if c.exact {
        for f in c.files {
            let (a, b) = (fs::read(q.join(f)).unwrap(), fs::read(o.join(f)).unwrap());
            if a != b {
                let first = a.iter().zip(&b).position(|(x, y)| x != y);
                problems.push(format!(
                    "[{label}] {f} differs from QEMU's (lengths {} / {}, first differing byte {first:?})",
                    a.len(),
                    b.len()
                ));
            }
        }
    }
}

#[test]
fn create_matches_qemu_img() {
    if !require_tools() {
        return;
    }
    let qnbd = qnbd_bin();
    let root = tempfile::Builder::new()
        .prefix("create")
        .tempdir_in(qnbd.parent().unwrap())
        .unwrap();
    let mut problems = Vec::new();
    let cases = matrix();
    for c in &cases {
        check_case(c, root.path(), &qnbd, &mut problems);
    }
    assert!(
        problems.is_empty(),
        "{} of {} option sets differ:\n{}",
        problems.len(),
        cases.len(),
        problems.join("\n")
    );
}

/// `create -o help` / `-o ?` prints qemu-img's option list (with a file name: merged with the
/// file protocol's), exit 0, whatever else is given; through the qemu-img name too, so the
/// messages of the cases that are refused match as well.
#[test]
fn option_help_matches_qemu_img() {
    if !require_tools() {
        return;
    }
    let qnbd = qnbd_bin();
    let dir = tempfile::tempdir().unwrap();
    let alias = dir.path().join("qemu-img");
    std::os::unix::fs::symlink(&qnbd, &alias).unwrap();
    for args in [
        "-f qcow2 -o help",
        "-f raw -o help",
        "-o help",
        "-f qcow2 -o ?",
        "-o ?",
        "-f qcow2 -o help x.qcow2",
        "-f raw -o help x.raw",
        "-q -f qcow2 -o cluster_size=4k,help x.qcow2 1M",
        "-f qcow2 -o foo=1 -o help",
        "-f qcow2 -o cluster_size=help",
        "-f qcow2 -o help=off x.qcow2 1M",
        "-f qcow2",
    ] {
        let a: Vec<&str> = args.split(' ').collect();
        let q = text(&run_in(
            dir.path(),
            Path::new("qemu-img"),
            &[&["create"], &a[..]].concat(),
        ));
        let o = text(&run_in(dir.path(), &alias, &[&["create"], &a[..]].concat()));
        assert_eq!(o, q, "create {args}: ours (left) vs qemu-img (right)");
        assert!(
            !dir.path().join("x.qcow2").exists(),
            "create {args} made an image"
        );
    }
    // convert -o help: the output format's list, merged with the protocol's when a target is
    // named, and nothing converted
    std::fs::write(dir.path().join("src.raw"), vec![1u8; 65536]).unwrap();
    for args in [
        "-O qcow2 -o help",
        "-O qcow2 -o help src.raw",
        "-O qcow2 -o help src.raw x.qcow2",
        "-O raw -o ?",
        "-o help",
        "-O qcow2 -o cluster_size=4k,help src.raw x.qcow2",
    ] {
        let a: Vec<&str> = args.split(' ').collect();
        let q = text(&run_in(
            dir.path(),
            Path::new("qemu-img"),
            &[&["convert"], &a[..]].concat(),
        ));
        let o = text(&run_in(
            dir.path(),
            &alias,
            &[&["convert"], &a[..]].concat(),
        ));
        assert_eq!(o, q, "convert {args}: ours (left) vs qemu-img (right)");
        assert!(
            !dir.path().join("x.qcow2").exists(),
            "convert {args} made an image"
        );
    }
}
