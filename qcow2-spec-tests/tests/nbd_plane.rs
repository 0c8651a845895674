//! The ring data plane against QEMU's answers: every reference image served by `qnbd serve`
//! (ring plane, the default) and by `qnbd serve --aio=threads` (the threaded path) reads back,
//! through libnbd, exactly what `qemu-img convert -O raw` gives (sha256 recorded by QEMU).
//!
//! The reads mix sizes so that every path of the plane runs: requests up to 256 KiB answered
//! from the page cache on the plane thread, requests that miss the cache (the image's pages are
//! dropped with `posix_fadvise(DONTNEED)` first) and requests over 256 KiB, both planned into
//! file reads on the ring, and unaligned requests. Simple and structured replies both run.

use qcow2_spec_tests::{qnbd_bin, reference_set, require_tools, Expect};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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
h.shutdown()
print(m.hexdigest())
"#;

struct Srv(Child);

impl Drop for Srv {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(dir: &Path, sock: &Path, image: &str, fmt: &str, extra: &[&str]) -> Option<Srv> {
    let _ = std::fs::remove_file(sock);
    let child = Command::new(qnbd_bin())
        .current_dir(dir)
        .args(["serve", "-r", "-t", "-f", fmt, "-k"])
        .arg(sock)
        .args(extra)
        .arg(image)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
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
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "python3-nbd is missing (CI=true)"
        );
        eprintln!("SKIP: the python nbd module is not installed");
        return;
    }
    let tmp = qcow2_spec_tests::scratch_dir();
    let script = tmp.path().join("reader.py");
    std::fs::write(&script, READER).unwrap();
    let sock = tmp.path().join("plane.sock");
    let mut checked = 0;
    let mut failures = Vec::new();
    for (k, image) in set.images.iter().enumerate() {
        let Expect::Value(want) = set.expected_sha256(&image.name) else {
            continue;
        };
        for (plane, extra) in [("ring", &[][..]), ("threads", &["--aio=threads"][..])] {
            let Some(_srv) = serve(&set.dir, &sock, &image.name, image.format(), extra) else {
                failures.push(format!("{} ({plane}): qnbd serve refused it", image.name));
                continue;
            };
            let uri = format!("nbd+unix:///?socket={}", sock.display());
            for structured in ["1", "0"] {
                let out = Command::new(py)
                    .arg(&script)
                    .arg(&uri)
                    .arg(set.dir.join(&image.name))
                    .arg(structured)
                    .arg(k.to_string())
                    .output()
                    .expect("python3");
                let got = String::from_utf8_lossy(&out.stdout).trim().to_string();
                if !out.status.success() || got != want {
                    failures.push(format!(
                        "{} ({plane}, structured={structured}): sha256 {got} != {want}; {}",
                        image.name,
                        String::from_utf8_lossy(&out.stderr)
                    ));
                }
                checked += 1;
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(checked >= 40, "only {checked} reads compared");
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
h.shutdown()
print("ok")
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
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "python3-nbd missing"
        );
        eprintln!("SKIP: the python nbd module is not installed");
        return;
    }
    let tmp = qcow2_spec_tests::scratch_dir();
    let dir = tmp.path();
    std::fs::write(dir.join("writer.py"), WRITER).unwrap();
    for (k, aio) in ["--aio=io_uring", "--aio=threads"].iter().enumerate() {
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
        let out = Command::new(py)
            .arg(dir.join("writer.py"))
            .arg(format!("nbd+unix:///?socket={}", sock.display()))
            .arg(k.to_string())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{aio}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
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
