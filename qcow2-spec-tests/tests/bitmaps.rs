//! Persistent dirty bitmaps against QEMU, both directions:
//! - bitmaps made and dirtied by QEMU read back identically (`qnbd bitmap --dump` and
//!   `qnbd serve -B` equal qemu-nbd -B + nbdinfo for every consistent bitmap of the reference
//!   set);
//! - bitmaps written by qnbd read back identically by QEMU (flags in `qemu-img info`, clean
//!   `qemu-img check`, `qemu-nbd -B` maps equal to the same writes done through qemu-nbd);
//! - every `qnbd bitmap` operation equals the same `qemu-img bitmap` operation;
//! - a writer killed mid-write leaves `in-use`; `--recover` makes the bitmap usable again.

use qcow2_spec_tests::{nbd_greets, qnbd_bin, reference_set, require_tools};
use serde_json::Value;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn sh(script: &str, dir: &Path) -> (i32, String) {
    let o = Command::new("sh")
        .arg("-c")
        .arg(script)
        .current_dir(dir)
        .output()
        .unwrap();
    (
        o.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

struct Srv(Child);
impl Drop for Srv {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(cmd: &mut Command, sock: &Path) -> Srv {
    let child = cmd.stdin(Stdio::null()).spawn().expect("spawn server");
    let t = Instant::now();
    while !nbd_greets(sock, Duration::from_secs(20)) {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "server did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Srv(child)
}

/// nbdinfo --json --map=qemu:dirty-bitmap:NAME against a server on `sock`.
fn nbd_map(sock: &Path, name: &str) -> Value {
    let o = Command::new("nbdinfo")
        .args(["--json", &format!("--map=qemu:dirty-bitmap:{name}")])
        .arg(format!("nbd+unix:///?socket={}", sock.display()))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// (offset, length, dirty) runs, merged.
fn runs_of_nbdinfo(v: &Value) -> Vec<(u64, u64, bool)> {
    let mut out: Vec<(u64, u64, bool)> = Vec::new();
    for e in v.as_array().unwrap() {
        let (o, l, d) = (
            e["offset"].as_u64().unwrap(),
            e["length"].as_u64().unwrap(),
            e["type"].as_u64().unwrap() & 1 != 0,
        );
        match out.last_mut() {
            Some(last) if last.2 == d && last.0 + last.1 == o => last.1 += l,
            _ => out.push((o, l, d)),
        }
    }
    out
}

fn runs_of_dump(v: &Value) -> Vec<(u64, u64, bool)> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["start"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["dirty"].as_bool().unwrap(),
            )
        })
        .collect()
}

#[test]
fn qemu_made_bitmaps_read_back_identically() {
    if !require_tools("bitmaps", &["qemu-img", "qemu-nbd", "nbdinfo"]) {
        return;
    }
    let Some(set) = reference_set() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut compared = 0;
    let mut failures = Vec::new();
    for img in &set.images {
        let name = &img.name;
        let prefix = format!("{name}.nbd-dirty-bitmap-");
        let Ok(rd) = std::fs::read_dir(set.dir.join("truth")) else {
            continue;
        };
        for f in rd.flatten() {
            let fname = f.file_name().to_string_lossy().to_string();
            let Some(bm) = fname
                .strip_prefix(&prefix)
                .and_then(|s| s.strip_suffix(".json"))
            else {
                continue;
            };
            let truth: Value =
                serde_json::from_str(&std::fs::read_to_string(f.path()).unwrap()).unwrap();
            let want = runs_of_nbdinfo(&truth);
            // --dump
            let o = Command::new(qnbd_bin())
                .args(["bitmap", "--dump", "--output=json"])
                .arg(name)
                .arg(bm)
                .current_dir(&set.dir)
                .output()
                .unwrap();
            let dump: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
            if !o.status.success() || runs_of_dump(&dump) != want {
                failures.push(format!(
                    "{name} {bm}: --dump differs: {}",
                    String::from_utf8_lossy(&o.stderr)
                ));
            }
            // serve -B
            let sock = dir.path().join("s.sock");
            let _ = std::fs::remove_file(&sock);
            let srv = start(
                Command::new(qnbd_bin())
                    .args(["serve", "-r", "-t", "-f", "qcow2", "-B", bm, "-k"])
                    .arg(&sock)
                    .arg(set.dir.join(name)),
                &sock,
            );
            let got = nbd_map(&sock, bm);
            drop(srv);
            if got != truth {
                failures.push(format!("{name} {bm}: serve -B map differs from qemu-nbd's"));
            }
            compared += 1;
        }
    }
    assert!(compared >= 8, "only {compared} bitmaps compared");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn bitmap_operations_match_qemu_img() {
    if !require_tools("bitmaps", &["qemu-img", "qemu-io"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let q = qnbd_bin().display().to_string();
    let (rc, out) = sh(
        "qemu-img create -q -f qcow2 base.qcow2 64M
         qemu-io -c 'write -P 1 0 1M' base.qcow2 >/dev/null
         qemu-img bitmap --add base.qcow2 e0
         qemu-img bitmap --add -g 512 --disable base.qcow2 d0
         qemu-io -c 'write -P 2 8M 100k' base.qcow2 >/dev/null
         cp base.qcow2 src.qcow2
         qemu-img bitmap --add -g 1M src.qcow2 s0
         qemu-io -c 'write 40M 64k' src.qcow2 >/dev/null
         qemu-img create -q -f qcow2 -o compat=0.10 v2.qcow2 1M",
        d,
    );
    assert_eq!(rc, 0, "{out}");
    let info_bitmaps = |f: &str| -> (i32, String) {
        sh(
            &format!(
                "qemu-img info --output=json {f} | python3 -c 'import json,sys; print(json.load(sys.stdin)[\"format-specific\"][\"data\"].get(\"bitmaps\"))'"
            ),
            d,
        )
    };
    for (img, args) in [
        ("base.qcow2", "--add b0"),
        ("base.qcow2", "--add -g 512 b0"),
        ("base.qcow2", "--add -g 2G b0"),
        ("base.qcow2", "--add --disable b0"),
        ("base.qcow2", "--add -g 256 b0"),
        ("base.qcow2", "--add -g 3000 b0"),
        ("base.qcow2", "--add e0"),
        ("base.qcow2", "--remove e0"),
        ("base.qcow2", "--remove nope"),
        ("base.qcow2", "--clear e0"),
        ("base.qcow2", "--disable e0"),
        ("base.qcow2", "--enable d0"),
        ("base.qcow2", "--merge e0 d0"),
        ("base.qcow2", "--add --merge e0 b0"),
        ("base.qcow2", "--merge s0 -b src.qcow2 -F qcow2 d0"),
        ("base.qcow2", "--add b0 --clear"),
        ("v2.qcow2", "--add b0"),
    ] {
        let (rc, out) = sh(
            &format!(
                "cp {img} o.qcow2 && cp {img} t.qcow2
                 {q} bitmap {} o.qcow2 {} > o.out 2>&1; echo $? > o.rc
                 qemu-img bitmap {} t.qcow2 {} > t.out 2>&1; echo $? > t.rc",
                args.rsplit_once(' ').unwrap().0,
                args.rsplit_once(' ').unwrap().1,
                args.rsplit_once(' ').unwrap().0,
                args.rsplit_once(' ').unwrap().1,
            ),
            d,
        );
        assert_eq!(rc, 0, "{out}");
        let ro = std::fs::read_to_string(d.join("o.rc")).unwrap();
        let rt = std::fs::read_to_string(d.join("t.rc")).unwrap();
        let eo = std::fs::read_to_string(d.join("o.out")).unwrap();
        let et = std::fs::read_to_string(d.join("t.out")).unwrap();
        assert_eq!(ro, rt, "{img} {args}: exit codes; ours: {eo} qemu: {et}");
        assert_eq!(
            info_bitmaps("o.qcow2"),
            info_bitmaps("t.qcow2"),
            "{img} {args}: qemu-img info bitmaps"
        );
        let (rc, out) = sh("qemu-img check o.qcow2", d);
        assert_eq!(rc, 0, "{img} {args}: {out}");
        // same dirty bits for every bitmap both have
        if ro.trim() == "0" {
            let (_, names) = sh(
                "qemu-img info --output=json o.qcow2 | python3 -c 'import json,sys; [print(b[\"name\"]) for b in json.load(sys.stdin)[\"format-specific\"][\"data\"].get(\"bitmaps\",[])]'",
                d,
            );
            for n in names.lines() {
                let (_, a) = sh(&format!("{q} bitmap --dump --output=json o.qcow2 {n}"), d);
                let (_, b) = sh(&format!("{q} bitmap --dump --output=json t.qcow2 {n}"), d);
                assert_eq!(a, b, "{img} {args}: bitmap {n} differs");
            }
        }
        // message of a refusal names the same problem as qemu-img's
        if rt.trim() != "0" {
            let key = et.lines().next().unwrap_or("").replace("qemu-img: ", "");
            let key = key.split(':').next_back().unwrap_or("").trim().to_string();
            assert!(
                eo.contains(key.split_whitespace().next().unwrap_or("")),
                "{img} {args}: ours '{eo}' vs qemu '{et}'"
            );
        }
    }
}

#[test]
fn qnbd_written_bitmaps_read_back_identically_in_qemu() {
    if !require_tools("bitmaps", &["qemu-img", "qemu-io", "qemu-nbd", "nbdinfo"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (rc, out) = sh(
        "qemu-img create -q -f qcow2 -o cluster_size=64k ours.qcow2 32M
         qemu-io -c 'write -P 1 0 2M' ours.qcow2 >/dev/null
         qemu-img bitmap --add ours.qcow2 a64k
         qemu-img bitmap --add -g 512 ours.qcow2 a512
         qemu-img bitmap --add -g 1M ours.qcow2 a1M
         qemu-img bitmap --add -g 2G ours.qcow2 a2G
         qemu-img bitmap --add --disable ours.qcow2 off
         cp ours.qcow2 theirs.qcow2",
        d,
    );
    assert_eq!(rc, 0, "{out}");
    let writes = [
        "write -P 7 5M 100k",
        "write -P 8 7340000 5000",
        "write -z 9M 1M",
        "write -z -u 12M 64k",
        "discard 16M 2M",
        "write -P 9 31M 1M",
        // allocated clusters after the first write: the in-place fast path must mark too
        "write -P 4 1M 4k",
        "write -P 4 1572864 70000",
    ];
    for (file, server) in [("ours.qcow2", "qnbd"), ("theirs.qcow2", "qemu-nbd")] {
        let sock = d.join(format!("{server}.sock"));
        let mut cmd = if server == "qnbd" {
            let mut c = Command::new(qnbd_bin());
            c.args(["serve", "-f", "qcow2", "--discard=unmap", "-k"]);
            c
        } else {
            let mut c = Command::new("qemu-nbd");
            c.args(["-f", "qcow2", "--discard=unmap", "-k"]);
            c
        };
        cmd.arg(&sock).arg(d.join(file));
        let mut srv = start(&mut cmd, &sock);
        let mut io = Command::new("qemu-io");
        io.args(["-f", "raw"]);
        for w in writes {
            io.args(["-c", w]);
        }
        let o = io
            .arg(format!("nbd+unix:///?socket={}", sock.display()))
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        // the server exits after its last client (no -t) and stores the bitmaps
        let t = Instant::now();
        while srv.0.try_wait().unwrap().is_none() {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "{server} did not exit"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = &mut srv;
    }
    let (rc, out) = sh("qemu-img check ours.qcow2", d);
    assert_eq!(rc, 0, "{out}");
    // the host layouts differ; the format-specific data (bitmap names, flags, granularity)
    // must not
    let fs = |f: &str| {
        sh(
            &format!(
                "qemu-img info --output=json {f} | python3 -c 'import json,sys; print(json.load(sys.stdin)[\"format-specific\"])'"
            ),
            d,
        )
    };
    assert_eq!(
        fs("ours.qcow2"),
        fs("theirs.qcow2"),
        "qemu-img info differs"
    );
    for bm in ["a64k", "a512", "a1M", "a2G", "off"] {
        let mut maps = Vec::new();
        for file in ["ours.qcow2", "theirs.qcow2"] {
            let sock = d.join("x.sock");
            let _ = std::fs::remove_file(&sock);
            let srv = start(
                Command::new("qemu-nbd")
                    .args(["-r", "-t", "-f", "qcow2", "-B", bm, "-k"])
                    .arg(&sock)
                    .arg(d.join(file)),
                &sock,
            );
            maps.push(nbd_map(&sock, bm));
            drop(srv);
        }
        assert_eq!(
            maps[0], maps[1],
            "bitmap {bm}: qemu-nbd sees ours differently"
        );
    }
}

#[test]
fn killed_writer_leaves_in_use_and_recover_makes_it_usable() {
    if !require_tools("bitmaps", &["qemu-img", "qemu-io", "qemu-nbd", "nbdinfo"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (rc, out) = sh(
        "qemu-img create -q -f qcow2 k.qcow2 16M
         qemu-io -c 'write -P 1 0 1M' k.qcow2 >/dev/null
         qemu-img bitmap --add k.qcow2 b0",
        d,
    );
    assert_eq!(rc, 0, "{out}");
    let sock = d.join("k.sock");
    let mut srv = start(
        Command::new(qnbd_bin())
            .args(["serve", "-t", "-f", "qcow2", "-k"])
            .arg(&sock)
            .arg(d.join("k.qcow2")),
        &sock,
    );
    let o = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 5 4M 64k", "-c", "flush"])
        .arg(format!("nbd+unix:///?socket={}", sock.display()))
        .output()
        .unwrap();
    assert!(o.status.success());
    // SIGKILL: no clean close
    srv.0.kill().unwrap();
    srv.0.wait().unwrap();
    let (_, info) = sh("qemu-img info --output=json k.qcow2", d);
    assert!(
        info.contains("\"in-use\""),
        "in-use not set after a crash: {info}"
    );
    let (rc, out) = sh("qemu-nbd -r -f qcow2 -B b0 -k $PWD/n.sock k.qcow2 2>&1", d);
    assert_ne!(rc, 0);
    assert!(out.contains("inconsistent"), "{out}");
    let (rc, out) = sh(
        &format!("{} bitmap --dump k.qcow2 b0", qnbd_bin().display()),
        d,
    );
    assert_eq!(rc, 1, "{out}");
    assert!(out.contains("inconsistent"), "{out}");
    let (rc, out) = sh(&format!("{} check k.qcow2", qnbd_bin().display()), d);
    assert_eq!(rc, 0, "{out}");
    let (rc, out) = sh(
        &format!("{} bitmap --recover k.qcow2 b0", qnbd_bin().display()),
        d,
    );
    assert_eq!(rc, 0, "{out}");
    let (rc, out) = sh("qemu-img check k.qcow2", d);
    assert_eq!(rc, 0, "{out}");
    let (_, info) = sh("qemu-img info --output=json k.qcow2", d);
    assert!(!info.contains("\"in-use\""), "{info}");
    // conservative: everything the image holds is dirty, including the write that was in flight
    let sock = d.join("r.sock");
    let srv = start(
        Command::new("qemu-nbd")
            .args(["-r", "-t", "-f", "qcow2", "-B", "b0", "-k"])
            .arg(&sock)
            .arg(d.join("k.qcow2")),
        &sock,
    );
    let runs = runs_of_nbdinfo(&nbd_map(&sock, "b0"));
    drop(srv);
    let dirty = |off: u64| runs.iter().any(|r| r.2 && r.0 <= off && off < r.0 + r.1);
    assert!(dirty(4 << 20) && dirty(0), "{runs:?}");
    assert!(!dirty(10 << 20), "{runs:?}");
}

/// The vendor context `qnbd:dirty-allocated:NAME`: dirty and holding data, in one query.
#[test]
fn dirty_allocated_context_is_dirty_and_data() {
    if !require_tools("bitmaps", &["qemu-img", "qemu-io", "nbdinfo"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (rc, out) = sh(
        "qemu-img create -q -f qcow2 v.qcow2 8M
         qemu-io -c 'write -P 1 6M 1M' v.qcow2 >/dev/null
         qemu-img bitmap --add v.qcow2 b0
         qemu-io -c 'write -P 2 0 1M' -c 'write -z 2M 1M' -c 'write -P 3 7M 64k' v.qcow2 >/dev/null",
        d,
    );
    assert_eq!(rc, 0, "{out}");
    let sock = d.join("v.sock");
    let srv = start(
        Command::new(qnbd_bin())
            .args(["serve", "-r", "-t", "-f", "qcow2", "-B", "b0", "-k"])
            .arg(&sock)
            .arg(d.join("v.qcow2")),
        &sock,
    );
    let o = Command::new("nbdinfo")
        .args(["--json", "--map=qnbd:dirty-allocated:b0"])
        .arg(format!("nbd+unix:///?socket={}", sock.display()))
        .output()
        .unwrap();
    drop(srv);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let runs = runs_of_nbdinfo(&v);
    let at = |off: u64| {
        runs.iter()
            .find(|r| r.0 <= off && off < r.0 + r.1)
            .unwrap()
            .2
    };
    assert!(at(0), "dirty data must be set: {runs:?}");
    assert!(!at(2 << 20), "dirty zeroes hold no data: {runs:?}");
    assert!(!at(6 << 20), "clean data is not dirty: {runs:?}");
    assert!(at(7 << 20), "{runs:?}");
    assert!(!at(4 << 20), "{runs:?}");
}

/// SIGTERM is a clean close: the bitmaps are stored and `in-use` is cleared.
#[test]
fn sigterm_stores_bitmaps() {
    if !require_tools("bitmaps", &["qemu-img", "qemu-io"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (rc, out) = sh(
        "qemu-img create -q -f qcow2 t.qcow2 16M && qemu-img bitmap --add t.qcow2 b0",
        d,
    );
    assert_eq!(rc, 0, "{out}");
    let sock = d.join("t.sock");
    let mut srv = start(
        Command::new(qnbd_bin())
            .args(["serve", "-t", "-f", "qcow2", "-k"])
            .arg(&sock)
            .arg(d.join("t.qcow2")),
        &sock,
    );
    let o = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 5 1M 64k"])
        .arg(format!("nbd+unix:///?socket={}", sock.display()))
        .output()
        .unwrap();
    assert!(o.status.success());
    let (_, info) = sh("qemu-img info -U --output=json t.qcow2", d);
    assert!(
        info.contains("in-use"),
        "in-use must be set while serving: {info}"
    );
    // our own child, by PID
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(srv.0.id().to_string())
        .status();
    let t = Instant::now();
    while srv.0.try_wait().unwrap().is_none() {
        assert!(t.elapsed() < Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(20));
    }
    let (_, info) = sh("qemu-img info --output=json t.qcow2", d);
    assert!(!info.contains("in-use"), "{info}");
    let (rc, out) = sh(
        &format!(
            "{} bitmap --dump --output=json t.qcow2 b0",
            qnbd_bin().display()
        ),
        d,
    );
    assert_eq!(rc, 0, "{out}");
    assert!(
        out.contains("\"start\": 1048576, \"length\": 65536, \"dirty\": true"),
        "{out}"
    );
    let (rc, out) = sh("qemu-img check t.qcow2", d);
    assert_eq!(rc, 0, "{out}");
}
