//! The ring data plane against QEMU's answers: every reference image served by `qnbd serve`
//! (ring plane, the default) and by `qnbd serve --aio=threads` (the threaded path) reads back,
//! through libnbd, exactly what `qemu-img convert -O raw` gives (sha256 recorded by QEMU).
//!
//! The reads mix sizes so that every path of the plane runs: requests up to 256 KiB answered
//! from the page cache on the plane thread, requests that miss the cache (the image's pages are
//! dropped with `posix_fadvise(DONTNEED)` first) and requests over 256 KiB, both planned into
//! file reads on the ring, and unaligned requests. Simple and structured replies both run.
//!
//! Each client checks, while its connection is open, which path the server put it on: `qnbd
//! serve` names its threads, ring data planes `nbd-plane-N`, and a connection served on the
//! threaded path keeps its `nbd-conn` thread for its whole life, while one handed over to a plane
//! lets that thread end right after negotiation. A connection that fell back to the threaded
//! path while planes were asked for fails the test. Where the kernel refuses io_uring the plane
//! half is skipped with a printed reason, except under CI.

use qcow2_spec_tests::{qnbd_bin, reference_set, require_tools, Expect};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Names of the threads of process `pid` (`/proc/PID/task/TID/comm`).
fn thread_names(pid: u32) -> Vec<String> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .map(|n| n.trim_end().to_string())
        .collect()
}

/// Checks that the one connection open on server `pid` (past negotiation) is served by a ring
/// data plane (`plane`) or on the threaded path: plane threads and no connection thread, or no
/// plane thread and the connection's own thread. The connection thread of a handed-over
/// connection ends a moment after the hand-over: waits for that a little.
fn check_serving_path(pid: u32, plane: bool) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let names = thread_names(pid);
        let planes = names.iter().filter(|n| n.starts_with("nbd-plane-")).count();
        let conns = names.iter().filter(|n| *n == "nbd-conn").count();
        let ok = if plane {
            planes > 0 && conns == 0
        } else {
            planes == 0 && conns == 1
        };
        if ok {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let want = if plane {
                "a ring data plane"
            } else {
                "the threaded path"
            };
            return Err(format!(
                "the connection was not served by {want}: {planes} plane thread(s), {conns} \
                 connection thread(s) in the server (threads: {names:?})"
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs a client script that prints its result line, then waits for a line on stdin before it
/// closes its connection. In between, the server's serving path is checked (see
/// [`check_serving_path`]). Returns the client's output (its first line included) and the
/// path check's verdict.
fn run_client(cmd: &mut Command, server_pid: u32, plane: bool) -> (Output, Result<(), String>) {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the client");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let err_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stderr.read_to_end(&mut v);
        v
    });
    let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
    let mut first = String::new();
    let _ = stdout.read_line(&mut first);
    // an empty first line: the client ended before its result, nothing to check
    let path = if first.is_empty() {
        Ok(())
    } else {
        check_serving_path(server_pid, plane)
    };
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(b"done\n");
    }
    let mut rest = Vec::new();
    let _ = stdout.read_to_end(&mut rest);
    let status = child.wait().expect("wait for the client");
    let mut out = first.into_bytes();
    out.extend(rest);
    let stderr = err_reader.join().unwrap_or_default();
    (
        Output {
            status,
            stdout: out,
            stderr,
        },
        path,
    )
}

/// Whether the ring plane can run here: `true`, or a printed skip (a failure under CI).
fn planes_available(what: &str) -> bool {
    match qnbd::testing::ring_plane_available() {
        Ok(()) => true,
        Err(e) => {
            qcow2_spec_tests::skip(
                &format!("{what} on the ring plane"),
                &format!("the kernel refuses io_uring here ({e})"),
            );
            false
        }
    }
}

const READER: &str = r#"
import hashlib, os, random, sys, nbd
uri, image, structured, seed = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4])
def drop(p):
    try:
        fd = os.open(p, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    except OSError:
        pass
for f in os.listdir(os.path.dirname(image) or "."):
    drop(os.path.join(os.path.dirname(image) or ".", f))
h = nbd.NBD()
h.set_request_structured_replies(structured)
h.connect_uri(uri)
size = h.get_size()
rng = random.Random(seed)
sizes = [4096, 65536, 200000, 262144, 300000, 1 << 20, 4 << 20, (8 << 20) - 512]
m = hashlib.sha256()
off = 0
while off < size:
    n = min(rng.choice(sizes), size - off)
    m.update(h.pread(n, off))
    off += n
# the result, then the connection stays open until the test has looked at the server
print(m.hexdigest(), flush=True)
sys.stdin.readline()
h.shutdown()
"#;

struct Srv(Child);

impl Drop for Srv {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `qnbd serve -r -t -v EXTRA IMAGE` on `sock` (the engine its default unless `extra` names
/// one: `QNBD_IO_ENGINE` is not passed on), its messages to `log`.
fn serve(
    dir: &Path,
    sock: &Path,
    image: &str,
    fmt: &str,
    extra: &[&str],
    log: &Path,
) -> Option<Srv> {
    let _ = std::fs::remove_file(sock);
    let log = std::fs::File::create(log).expect("create the server log");
    let child = Command::new(qnbd_bin())
        .current_dir(dir)
        .env_remove("QNBD_IO_ENGINE")
        .args(["serve", "-r", "-t", "-v", "-f", fmt, "-k"])
        .arg(sock)
        .args(extra)
        .arg(image)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn qnbd serve");
    let mut srv = Srv(child);
    let t = Instant::now();
    while !sock.exists() {
        if let Ok(Some(_)) = srv.0.try_wait() {
            return None; // refused to serve this image
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "server did not start"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    Some(srv)
}

#[test]
fn ring_plane_reads_what_qemu_img_converts() {
    if !require_tools("ring plane reads", &["qemu-img", "nbdinfo"]) {
        return;
    }
    let Some(set) = reference_set() else { return };
    let py = Path::new("/usr/bin/python3");
    let has_nbd = Command::new(py)
        .args(["-c", "import nbd"])
        .status()
        .is_ok_and(|s| s.success());
    if !has_nbd {
        qcow2_spec_tests::skip(
            "ring plane reads",
            "the python nbd module (python3-libnbd) is not installed",
        );
        return;
    }
    // the plane (the default) and the threaded path; the plane only where the kernel allows it
    let mut paths = vec![("ring", &[][..])];
    if !planes_available("ring plane reads") {
        paths.clear();
    }
    paths.push(("threads", &["--aio=threads"][..]));
    let tmp = qcow2_spec_tests::scratch_dir();
    let script = tmp.path().join("reader.py");
    std::fs::write(&script, READER).unwrap();
    let sock = tmp.path().join("plane.sock");
    let log = tmp.path().join("server.log");
    let mut checked = 0;
    let mut failures = Vec::new();
    for (k, image) in set.images.iter().enumerate() {
        let Expect::Value(want) = set.expected_sha256(&image.name) else {
            continue;
        };
        for &(plane, extra) in &paths {
            let Some(srv) = serve(&set.dir, &sock, &image.name, image.format(), extra, &log) else {
                failures.push(format!(
                    "{} ({plane}): qnbd serve refused it: {}",
                    image.name,
                    std::fs::read_to_string(&log).unwrap_or_default()
                ));
                continue;
            };
            let uri = format!("nbd+unix:///?socket={}", sock.display());
            for structured in ["1", "0"] {
                let (out, path) = run_client(
                    Command::new(py)
                        .arg(&script)
                        .arg(&uri)
                        .arg(set.dir.join(&image.name))
                        .arg(structured)
                        .arg(k.to_string()),
                    srv.0.id(),
                    plane == "ring",
                );
                let got = String::from_utf8_lossy(&out.stdout).trim().to_string();
                if !out.status.success() || got != want {
                    failures.push(format!(
                        "{} ({plane}, structured={structured}): sha256 {got} != {want}; {}",
                        image.name,
                        String::from_utf8_lossy(&out.stderr)
                    ));
                }
                if let Err(e) = path {
                    failures.push(format!(
                        "{} ({plane}, structured={structured}): {e}; server log: {}",
                        image.name,
                        std::fs::read_to_string(&log).unwrap_or_default()
                    ));
                }
                checked += 1;
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(checked >= 20 * paths.len(), "only {checked} reads compared");
}

const WRITER: &str = r#"
import random, sys, nbd
uri, seed = sys.argv[1], int(sys.argv[2])
h = nbd.NBD()
h.connect_uri(uri)
size = h.get_size()
rng = random.Random(seed)
shadow = bytearray(size)
sizes = [1, 512, 4096, 65536, 131072, 131073, 262144, 262145, 1 << 20, (3 << 20) + 7]
# NBD leaves the order of overlapping writes in flight open: a write waits until no write in
# flight overlaps it, so the shadow copy is the only possible outcome
inflight = []
def reap():
    global inflight
    inflight = [(c, o, n) for (c, o, n) in inflight if not h.aio_command_completed(c)]
for i in range(400):
    n = rng.choice(sizes)
    off = rng.randrange(0, size - n)
    if rng.random() < 0.3:
        off -= off % 65536
    data = bytes([rng.randrange(256)]) * n
    if rng.random() < 0.5:
        data = rng.randbytes(n)
    reap()
    while any(o < off + n and off < o + k for (_, o, k) in inflight) or len(inflight) >= 16:
        h.poll(-1)
        reap()
    shadow[off:off + n] = data
    inflight.append((h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), off), off, n))
    if rng.random() < 0.2:
        # a read is pipelined between the writes too (its data is not checked)
        h.aio_pread(nbd.Buffer(4096), 0 if off >= 8192 else size - 4096)
while h.aio_in_flight() > 0:
    h.poll(-1)
reap()
assert not inflight
h.flush()
off = 0
while off < size:
    n = min(rng.choice([4096, 1 << 20, 5 << 20]), size - off)
    assert h.pread(n, off) == bytes(shadow[off:off + n]), (off, n)
    off += n
# the result, then the connection stays open until the test has looked at the server
print("ok", flush=True)
sys.stdin.readline()
h.shutdown()
"#;

/// Pipelined writes of every payload shape the plane distinguishes (in the receive buffer,
/// received into their own buffer, just over either bound) with reads between them, on the
/// plane and the threaded path: the image reads back as a shadow copy says, and qemu-img check
/// finds no errors.
#[test]
fn pipelined_writes_of_every_size_land_intact() {
    if !require_tools("pipelined writes", &["qemu-img"]) {
        return;
    }
    let py = Path::new("/usr/bin/python3");
    if !Command::new(py)
        .args(["-c", "import nbd"])
        .status()
        .is_ok_and(|s| s.success())
    {
        qcow2_spec_tests::skip(
            "pipelined writes",
            "the python nbd module (python3-libnbd) is not installed",
        );
        return;
    }
    let tmp = qcow2_spec_tests::scratch_dir();
    let dir = tmp.path();
    std::fs::write(dir.join("writer.py"), WRITER).unwrap();
    let mut engines = vec!["--aio=io_uring"];
    if !planes_available("pipelined writes") {
        engines.clear();
    }
    engines.push("--aio=threads");
    for (k, aio) in engines.iter().enumerate() {
        let img = format!("w{k}.qcow2");
        let st = Command::new("qemu-img")
            .current_dir(dir)
            .args(["create", "-q", "-f", "qcow2", &img, "48M"])
            .status()
            .unwrap();
        assert!(st.success());
        let sock = dir.join(format!("w{k}.sock"));
        let _ = std::fs::remove_file(&sock);
        let child = Command::new(qnbd_bin())
            .current_dir(dir)
            .args(["serve", "-t", "-f", "qcow2", aio, "-k"])
            .arg(&sock)
            .arg(&img)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let srv = Srv(child);
        let t = Instant::now();
        while !sock.exists() {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "server did not start"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let (out, path) = run_client(
            Command::new(py)
                .arg(dir.join("writer.py"))
                .arg(format!("nbd+unix:///?socket={}", sock.display()))
                .arg(k.to_string()),
            srv.0.id(),
            *aio == "--aio=io_uring",
        );
        assert!(
            out.status.success(),
            "{aio}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if let Err(e) = path {
            panic!("{aio}: {e}");
        }
        drop(srv);
        let chk = Command::new("qemu-img")
            .current_dir(dir)
            .args(["check", &img])
            .output()
            .unwrap();
        assert!(
            chk.status.success(),
            "{aio}: {}",
            String::from_utf8_lossy(&chk.stdout)
        );
    }
}
