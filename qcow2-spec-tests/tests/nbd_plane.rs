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
