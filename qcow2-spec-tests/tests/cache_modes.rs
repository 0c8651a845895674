//! Host cache modes (`serve --cache` / `-n`, `bench -t`, `convert -t` / `-T`) against qemu-nbd
//! and qemu-img.
//!
//! The same client writes go through `qnbd serve` and `qemu-nbd` in the same cache mode; the
//! images must then pass `qemu-img check` and compare equal. `O_DIRECT` is checked where the
//! kernel shows it: the `flags` line of `/proc/PID/fdinfo/FD` of every descriptor open on an
//! image file. `writethrough` is checked by killing the server (SIGKILL) right after writes the
//! client never flushed: every acknowledged write must be in the image. Missing tools (or a
//! ramfs that cannot be mounted) skip a test, or the part that needs them, with a printed
//! reason, except under CI, where every part must run.

use qcow2_spec_tests::{
    qnbd, require_tools, scratch_dir, tool, IoEngine, NbdServer as Server, Run,
};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// `O_DIRECT` in the octal `flags` of fdinfo (x86 and most architectures).
const O_DIRECT: u32 = 0o40000;

fn sh(script: &str, dir: &Path) {
    let r = tool("sh", dir, ["-ec", script]);
    assert!(r.success(), "{script}\n{}", r.outcome());
}

/// `fdinfo` flags of every descriptor of `pid` open on one of `files` (canonical paths).
fn image_fd_flags(pid: u32, files: &[PathBuf]) -> Vec<(PathBuf, u32)> {
    let mut out = Vec::new();
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).expect("read /proc/PID/fd");
    for fd in fds.flatten() {
        let Ok(target) = std::fs::read_link(fd.path()) else {
            continue;
        };
        if !files.contains(&target) {
            continue;
        }
        let info = std::fs::read_to_string(format!(
            "/proc/{pid}/fdinfo/{}",
            fd.file_name().to_string_lossy()
        ))
        .unwrap_or_default();
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
            .unwrap_or_else(|| panic!("no flags in fdinfo: {info}"));
        out.push((target, flags));
    }
    out
}

/// Every file of `files` is open in `pid`, each descriptor with (`direct`) or without
/// `O_DIRECT`. qemu-nbd opens backing files only after it listens: wait for them a little.
fn assert_direct(pid: u32, files: &[PathBuf], direct: bool, who: &str) {
    let t = Instant::now();
    let mut seen = image_fd_flags(pid, files);
    while t.elapsed() < Duration::from_secs(10)
        && !files.iter().all(|f| seen.iter().any(|(p, _)| p == f))
    {
        std::thread::sleep(Duration::from_millis(20));
        seen = image_fd_flags(pid, files);
    }
    for f in files {
        assert!(
            seen.iter().any(|(p, _)| p == f),
            "{who}: {} is not open: {seen:?}",
            f.display()
        );
    }
    for (p, flags) in &seen {
        assert_eq!(
            flags & O_DIRECT != 0,
            direct,
            "{who}: {} flags {flags:o}",
            p.display()
        );
    }
}

/// Reproducible qemu-io commands: writes of any offset and length (most not sector-aligned),
/// zeroing and discards over the first `size` bytes, ending with a flush.
fn random_writes(seed: u64, n: usize, size: u64) -> Vec<String> {
    let mut x = seed;
    let mut next = move || {
        x = x
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        x >> 17
    };
    let mut cmds = Vec::new();
    for i in 0..n {
        let len = 1 + next() % (192 << 10);
        let off = next() % (size - len);
        cmds.push(match next() % 8 {
            0 => format!("write -z {off} {len}"),
            1 => format!("discard {off} {len}"),
            _ => format!("write -P {} {off} {len}", (i % 250) + 1),
        });
    }
    cmds.push("flush".into());
    cmds
}

fn qemu_io(uri: &str, cmds: &[String]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for x in cmds {
        c.args(["-c", x]);
    }
    c.arg(uri);
    let r = qcow2_spec_tests::run_command(c);
    assert!(r.success(), "qemu-io over {uri}: {}", r.outcome());
    let out = r.stdout_text();
    assert!(!out.contains("failed"), "qemu-io over {uri}: {out}");
}

/// Unaligned writes, zeroing, trim and flush from libnbd (nbdsh needs the system python).
fn nbdsh(uri: &str, script: &str) -> Run {
    let mut c = Command::new("nbdsh");
    c.env("PATH", "/usr/bin:/bin")
        .args(["-u", uri, "-c"])
        .arg(script);
    qcow2_spec_tests::run_command(c)
}

const NBDSH_WRITES: &str = "h.pwrite(b'\\x77' * 70001, 10 * 1024 * 1024 + 333)\n\
                            h.pwrite(b'\\x78' * 3, 511)\n\
                            h.zero(65536 + 17, 12 * 1024 * 1024 + 5)\n\
                            h.trim(65536, 13 * 1024 * 1024)\n\
                            h.flush()";

fn canon(p: PathBuf) -> PathBuf {
    std::fs::canonicalize(&p).unwrap_or(p)
}

fn check_and_compare(d: &Path, ours: &str, theirs: &str) {
    let r = tool("qemu-img", d, ["check", ours]);
    assert!(r.success(), "qemu-img check {ours}: {}", r.outcome());
    let r = tool(
        "qemu-img",
        d,
        ["compare", "-f", "qcow2", "-F", "qcow2", ours, theirs],
    );
    assert!(
        r.success(),
        "qemu-img compare {ours} {theirs}: {}",
        r.outcome()
    );
}

/// `--cache=none` and `directsync` (both engines) open every file of the chain with
/// `O_DIRECT`, like qemu-nbd, and random unaligned writes over NBD leave images that pass
/// `qemu-img check` and equal what qemu-nbd made of the same writes in the same mode.
#[test]
fn direct_modes_write_like_qemu_nbd() {
    if !require_tools(
        "direct_modes_write_like_qemu_nbd",
        &["qemu-img", "qemu-io", "qemu-nbd"],
    ) {
        return;
    }
    // libnbd's writes run where nbdsh is installed (always under CI)
    let with_nbdsh = qcow2_spec_tests::have_tool("nbdsh");
    if !with_nbdsh {
        qcow2_spec_tests::skip(
            "direct_modes_write_like_qemu_nbd: the nbdsh writes",
            "missing tool: nbdsh",
        );
    }
    let dir = scratch_dir();
    let d = dir.path();
    // a backing chain (the backing file is opened O_DIRECT too), 4 KiB clusters with 8-bit
    // refcounts, and 512-byte clusters (metadata smaller than a direct-I/O block)
    let layouts: [(&str, &str); 3] = [
        ("chain", "-b base.qcow2 -F qcow2"),
        ("c4k", "-o cluster_size=4k,refcount_bits=8"),
        ("c512", "-o cluster_size=512"),
    ];
    sh(
        "qemu-img create -q -f qcow2 base.qcow2 32M
         qemu-io -f qcow2 -c 'write -P 5 0 32M' base.qcow2 >/dev/null",
        d,
    );
    let mut seed = 1;
    for mode in ["none", "directsync"] {
        for aio in ["io_uring", "threads"] {
            for (name, opts) in layouts {
                let (ours, theirs) = (
                    format!("ours-{mode}-{aio}-{name}.qcow2"),
                    format!("theirs-{mode}-{aio}-{name}.qcow2"),
                );
                sh(
                    &format!(
                        "qemu-img create -q -f qcow2 {opts} {ours} 32M
                         qemu-img create -q -f qcow2 {opts} {theirs} 32M"
                    ),
                    d,
                );
                let cache = format!("--cache={mode}");
                let aio_arg = format!("--aio={aio}");
                let o = Server::qnbd(
                    d,
                    "ours",
                    &["-f", "qcow2", &cache, &aio_arg, "--discard=unmap", &ours],
                );
                let t = Server::qemu_nbd(
                    d,
                    "theirs",
                    &["-f", "qcow2", &cache, "--discard=unmap", &theirs],
                );
                let mut ours_files = vec![canon(d.join(&ours))];
                let mut theirs_files = vec![canon(d.join(&theirs))];
                if name == "chain" {
                    ours_files.push(canon(d.join("base.qcow2")));
                    theirs_files.push(canon(d.join("base.qcow2")));
                }
                assert_direct(
                    o.pid(),
                    &ours_files,
                    true,
                    &format!("qnbd {cache} {aio_arg}"),
                );
                assert_direct(t.pid(), &theirs_files, true, &format!("qemu-nbd {cache}"));
                let cmds = random_writes(seed, 40, 32 << 20);
                seed += 1;
                for srv in [&o, &t] {
                    qemu_io(&srv.uri, &cmds);
                    if with_nbdsh {
                        let r = nbdsh(&srv.uri, NBDSH_WRITES);
                        assert!(r.success(), "nbdsh over {}: {}", srv.uri, r.outcome());
                    }
                }
                o.stop();
                t.stop();
                check_and_compare(d, &ours, &theirs);
            }
        }
    }
}

/// `-n` is `--cache=none`, also for a read-only export (qemu-nbd opens it `O_DIRECT` too), and
/// the data read back through `O_DIRECT` is the image's.
#[test]
fn read_only_exports_read_through_o_direct() {
    if !require_tools(
        "read_only_exports_read_through_o_direct",
        &["qemu-img", "qemu-io", "qemu-nbd"],
    ) {
        return;
    }
    let dir = scratch_dir();
    let d = dir.path();
    sh(
        "qemu-img create -q -f qcow2 -o cluster_size=512 ro.qcow2 8M
         qemu-io -f qcow2 -c 'write -P 1 0 4k' -c 'write -P 2 1001 77777' -c 'write -c -P 3 4M 64k' \
                 -c 'write -z 5M 1M' -c 'write -P 4 7M 1M' ro.qcow2 >/dev/null
         qemu-img convert -O raw ro.qcow2 expected.raw",
        d,
    );
    let files = [canon(d.join("ro.qcow2"))];
    for args in [
        &["-r", "-n", "-f", "qcow2", "ro.qcow2"][..],
        &[
            "-r",
            "--cache=none",
            "--aio=io_uring",
            "-f",
            "qcow2",
            "ro.qcow2",
        ][..],
    ] {
        let who = format!("qnbd serve {args:?}");
        let srv = Server::qnbd(d, "ro", args);
        assert_direct(srv.pid(), &files, true, &who);
        let r = tool(
            "qemu-img",
            d,
            ["convert", "-f", "raw", "-O", "raw", &srv.uri, "got.raw"],
        );
        assert!(r.success(), "{who}: {}", r.outcome());
        let r = tool("cmp", d, ["expected.raw", "got.raw"]);
        assert!(r.success(), "{who}: {}", r.outcome());
        srv.stop();
    }
    let t = Server::qemu_nbd(d, "theirs", &["-r", "-n", "-f", "qcow2", "ro.qcow2"]);
    assert_direct(t.pid(), &files, true, "qemu-nbd -r -n");
}

/// `writethrough` and `directsync` acknowledge a write only once it is durable: a server
/// killed with SIGKILL right after writes the client never flushed leaves every one of them in
/// a consistent image, as qemu-nbd does. `writeback` and `unsafe` never open `O_DIRECT`; data
/// flushed by the client lands like on qemu-nbd in every mode.
#[test]
fn writethrough_survives_a_killed_server() {
    if !require_tools(
        "writethrough_survives_a_killed_server",
        &["qemu-img", "qemu-io", "qemu-nbd", "nbdsh"],
    ) {
        return;
    }
    let dir = scratch_dir();
    let d = dir.path();
    for mode in ["writethrough", "directsync", "writeback", "unsafe"] {
        let (ours, theirs) = (format!("ours-{mode}.qcow2"), format!("theirs-{mode}.qcow2"));
        sh(
            &format!(
                "qemu-img create -q -f qcow2 {ours} 16M
                 qemu-img create -q -f qcow2 {theirs} 16M"
            ),
            d,
        );
        let cache = format!("--cache={mode}");
        let durable = matches!(mode, "writethrough" | "directsync");
        let direct = mode == "directsync";
        let mut o = Server::qnbd(d, "ours", &["-f", "qcow2", &cache, &ours]);
        let mut t = Server::qemu_nbd(d, "theirs", &["-f", "qcow2", &cache, &theirs]);
        assert_direct(
            o.pid(),
            &[canon(d.join(&ours))],
            direct,
            &format!("qnbd {cache}"),
        );
        assert_direct(
            t.pid(),
            &[canon(d.join(&theirs))],
            direct,
            &format!("qemu-nbd {cache}"),
        );
        for srv in [&mut o, &mut t] {
            // allocating writes, unaligned ones among them, then SIGKILL from inside the
            // client while its connection is still open: no flush, no clean close
            let script = format!(
                "import os, signal\n\
                 h.pwrite(b'\\x11' * 65536, 0)\n\
                 h.pwrite(b'\\x22' * 5000, 3 * 1024 * 1024 + 100)\n\
                 h.pwrite(b'\\x33' * 4096, 9 * 1024 * 1024)\n\
                 h.zero(65536, 9 * 1024 * 1024 + 4096)\n\
                 {}\n\
                 os.kill({}, signal.SIGKILL)",
                if durable { "" } else { "h.flush()" },
                srv.pid()
            );
            let r = nbdsh(&srv.uri, &script);
            // the script reached its last line only if every write was acknowledged
            use std::os::unix::process::ExitStatusExt;
            let st = srv.wait();
            assert_eq!(
                st.signal(),
                Some(9),
                "{mode}: server {} not killed by the client ({st}): {}",
                srv.uri,
                r.outcome()
            );
        }
        drop(o);
        drop(t);
        let r = tool("qemu-img", d, ["check", &ours]);
        assert!(
            r.success(),
            "{mode}: qemu-img check {ours}: {}",
            r.outcome()
        );
        let r = tool(
            "qemu-io",
            d,
            [
                "-f",
                "qcow2",
                "-c",
                "read -P 0x11 0 64k",
                "-c",
                "read -P 0x22 3145828 5000",
                "-c",
                "read -P 0x33 9M 4k",
                "-c",
                "read -P 0 9441280 4096",
                &ours,
            ],
        );
        assert!(
            r.success() && !r.stdout_text().contains("fail"),
            "{mode}: written data not in {ours}: {}",
            r.outcome()
        );
        check_and_compare(d, &ours, &theirs);
    }
}

/// A file system that refuses `O_DIRECT` gives qemu-nbd's message and exit status, no panic.
/// tmpfs accepts `O_DIRECT` since Linux 6.6; ramfs never does (mounted here when root).
#[test]
fn file_systems_without_o_direct_are_refused_cleanly() {
    if !require_tools(
        "file_systems_without_o_direct_are_refused_cleanly",
        &["qemu-img", "qemu-nbd"],
    ) {
        return;
    }
    let dir = scratch_dir();
    let d = dir.path();
    let probe = |p: &Path| -> bool {
        use std::os::unix::fs::OpenOptionsExt;
        let f = p.join(format!("qnbd-direct-probe-{}", std::process::id()));
        let ok = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .custom_flags(O_DIRECT as i32)
            .open(&f)
            .is_ok();
        let _ = std::fs::remove_file(&f);
        ok
    };
    let shm = Path::new("/dev/shm");
    let mut mounted = None;
    let place = if shm.is_dir() && !probe(shm) {
        shm.to_path_buf()
    } else {
        let m = d.join("ramfs");
        std::fs::create_dir_all(&m).unwrap();
        let r = tool(
            "mount",
            d,
            ["-t", "ramfs", "none", &m.display().to_string()],
        );
        if !r.success() {
            qcow2_spec_tests::skip(
                "file_systems_without_o_direct_are_refused_cleanly",
                &format!(
                    "/dev/shm accepts O_DIRECT (Linux >= 6.6 tmpfs) and ramfs cannot be mounted \
                     here: {}",
                    r.outcome()
                ),
            );
            return;
        }
        mounted = Some(m.clone());
        m
    };
    struct Unmount(Option<PathBuf>);
    impl Drop for Unmount {
        fn drop(&mut self) {
            if let Some(m) = &self.0 {
                let _ = Command::new("umount").arg(m).status();
            }
        }
    }
    let _unmount = Unmount(mounted);
    let img = place.join(format!("qnbd-nodirect-{}.qcow2", std::process::id()));
    let img_s = img.display().to_string();
    let r = tool("qemu-img", d, ["create", "-q", "-f", "qcow2", &img_s, "1M"]);
    assert!(r.success(), "{}", r.outcome());
    let sock = d.join("x.sock").display().to_string();
    let theirs = tool("qemu-nbd", d, ["-n", "-f", "qcow2", "-k", &sock, &img_s]);
    for args in [
        vec!["serve", "-n", "-f", "qcow2", "-k", &sock, &img_s],
        vec![
            "serve",
            "-r",
            "--cache=directsync",
            "-f",
            "qcow2",
            "-k",
            &sock,
            &img_s,
        ],
    ] {
        let ours = qnbd(IoEngine::Sync, d, &args);
        assert_eq!(ours.code, Some(1), "{}", ours.outcome());
        assert_eq!(theirs.code, Some(1), "{}", theirs.outcome());
        let want = format!("Could not open '{img_s}': filesystem does not support O_DIRECT");
        assert!(theirs.stderr.contains(&want), "qemu-nbd: {}", theirs.stderr);
        assert!(ours.stderr.contains(&want), "qnbd: {}", ours.stderr);
    }
    // without O_DIRECT the same file serves
    let r = qnbd(
        IoEngine::Sync,
        d,
        ["info", "--output", "json", img_s.as_str()],
    );
    assert!(r.success(), "{}", r.outcome());
    let _ = std::fs::remove_file(&img);
}

/// `bench -t` and `convert -T` / `-t` run in every mode (over both engines); what they write
/// passes `qemu-img check` and equals the source.
#[test]
fn bench_and_convert_take_cache_modes() {
    if !require_tools(
        "bench_and_convert_take_cache_modes",
        &["qemu-img", "qemu-io"],
    ) {
        return;
    }
    let dir = scratch_dir();
    let d = dir.path();
    sh(
        "qemu-img create -q -f qcow2 -o cluster_size=4k src.qcow2 8M
         qemu-io -f qcow2 -c 'write -P 1 0 4k' -c 'write -P 2 1001 77777' \
                 -c 'write -z 5M 1M' -c 'write -P 4 7M 1M' -c 'write -P 5 8387000 1608' \
                 src.qcow2 >/dev/null",
        d,
    );
    for engine in IoEngine::ALL {
        for mode in ["none", "directsync", "writethrough", "unsafe", "writeback"] {
            let b = format!("bench-{mode}.qcow2");
            sh(&format!("qemu-img create -q -f qcow2 {b} 8M"), d);
            let r = qnbd(
                engine,
                d,
                [
                    "bench", "-t", mode, "-w", "--random", "-c", "500", "-d", "4", "-s", "4096", &b,
                ],
            );
            assert!(r.success(), "bench -t {mode}: {}", r.outcome());
            let r = tool("qemu-img", d, ["check", &b]);
            assert!(r.success(), "bench -t {mode}: {}", r.outcome());
            for fmt in ["qcow2", "raw"] {
                let out = format!("conv-{mode}.{fmt}");
                let r = qnbd(
                    engine,
                    d,
                    [
                        "convert",
                        "-T",
                        mode,
                        "-t",
                        mode,
                        "-O",
                        fmt,
                        "src.qcow2",
                        &out,
                    ],
                );
                assert!(r.success(), "convert -t {mode} -O {fmt}: {}", r.outcome());
                let r = tool(
                    "qemu-img",
                    d,
                    ["compare", "-f", "qcow2", "-F", fmt, "src.qcow2", &out],
                );
                assert!(r.success(), "convert -t {mode} -O {fmt}: {}", r.outcome());
            }
        }
    }
    let r = qnbd(IoEngine::Sync, d, ["bench", "-t", "bogus", "src.qcow2"]);
    assert_eq!(r.code, Some(1), "{}", r.outcome());
    assert!(r.stderr.contains("Invalid cache mode"), "{}", r.stderr);
    let r = qnbd(
        IoEngine::Sync,
        d,
        ["convert", "-T", "bogus", "-O", "raw", "src.qcow2", "x.raw"],
    );
    assert_eq!(r.code, Some(1), "{}", r.outcome());
    assert!(
        r.stderr.contains("Invalid source cache option: bogus"),
        "{}",
        r.stderr
    );
}

/// qemu-nbd's refusals: `-n` with `--cache`, an unknown mode, `--aio=native` without a direct
/// mode.
#[test]
fn cache_option_refusals_match_qemu_nbd() {
    if !require_tools(
        "cache_option_refusals_match_qemu_nbd",
        &["qemu-img", "qemu-nbd"],
    ) {
        return;
    }
    let dir = scratch_dir();
    let d = dir.path();
    sh("qemu-img create -q -f qcow2 a.qcow2 1M", d);
    let sock = d.join("r.sock").display().to_string();
    for (args, msg) in [
        (&["--cache=bogus"][..], "Invalid cache mode"),
        (&["-n", "--cache=none"][..], "can only be specified once"),
        (
            &["--aio=native"][..],
            "aio=native was specified, but it requires cache.direct=on",
        ),
    ] {
        let mut q = vec!["-f", "qcow2", "-k", &sock];
        q.extend_from_slice(args);
        q.push("a.qcow2");
        let theirs = tool("qemu-nbd", d, &q);
        let mut o = vec!["serve"];
        o.extend_from_slice(&q);
        let ours = qnbd(IoEngine::Sync, d, &o);
        assert_eq!(
            theirs.code,
            Some(1),
            "qemu-nbd {args:?}: {}",
            theirs.outcome()
        );
        assert_eq!(ours.code, Some(1), "qnbd {args:?}: {}", ours.outcome());
        assert!(
            theirs.stderr.contains(msg),
            "qemu-nbd {args:?}: {}",
            theirs.stderr
        );
        assert!(ours.stderr.contains(msg), "qnbd {args:?}: {}", ours.stderr);
    }
    // --aio=native with a direct mode serves
    let o = Server::qnbd(
        d,
        "native",
        &["-f", "qcow2", "--cache=none", "--aio=native", "a.qcow2"],
    );
    o.stop();
}
