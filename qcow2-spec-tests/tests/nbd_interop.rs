//! `qnbd serve` against real NBD clients, with `qemu-nbd` as the oracle.
//!
//! Every test builds its images with qemu-img / qemu-io in a temporary directory, serves the
//! same image with `qnbd serve` and `qemu-nbd`, and compares what the clients see (nbdinfo,
//! nbdcopy, qemu-img, qemu-io). Hostile-client tests speak raw NBD over a Unix socket and check
//! that each bad request is answered as the specification says and that the server keeps
//! serving. Missing tools skip a test with a printed reason, except under CI.

use qcow2_spec_tests::{nbd_greets, require_tools};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn qnbd_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("QNBD_BIN") {
        return p.into();
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let bin = target.join("debug").join("qnbd");
    static BUILD: std::sync::Once = std::sync::Once::new();
    BUILD.call_once(|| {
        let st = Command::new(env!("CARGO"))
            .args(["build", "-p", "qnbd", "--bin", "qnbd"])
            .current_dir(&root)
            .status()
            .expect("cargo build");
        assert!(st.success());
    });
    bin
}

/// What a command gave: exit code (-1 when killed by a signal), stdout, stderr.
type Out = (i32, String, String);

fn run(cmd: &mut Command) -> Out {
    let o = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn sh(script: &str, dir: &Path) {
    let (rc, out, err) = run(Command::new("sh").arg("-ec").arg(script).current_dir(dir));
    assert_eq!(rc, 0, "{script}\n{out}\n{err}");
}

/// A server process killed on drop.
struct Srv {
    child: Child,
    uri: String,
    sock: PathBuf,
}

impl Drop for Srv {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_for(sock: &Path) {
    let t = Instant::now();
    while !nbd_greets(sock, Duration::from_secs(20)) {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "server did not start: {sock:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn start(mut cmd: Command, sock: PathBuf) -> Srv {
    let child = cmd.stdin(Stdio::null()).spawn().expect("spawn server");
    // probing connects count as clients; both servers run with -t so that is harmless
    wait_for(&sock);
    Srv {
        child,
        uri: format!("nbd+unix:///?socket={}", sock.display()),
        sock,
    }
}

fn qnbd(dir: &Path, name: &str, args: &[&str]) -> Srv {
    let sock = dir.join(format!("{name}.sock"));
    let mut c = Command::new(qnbd_bin());
    c.arg("serve").args(args).arg("-k").arg(&sock);
    start(c, sock)
}

fn qemu_nbd(dir: &Path, name: &str, args: &[&str]) -> Srv {
    let sock = dir.join(format!("{name}.sock"));
    let mut c = Command::new("qemu-nbd");
    c.args(args).arg("-k").arg(&sock);
    start(c, sock)
}

/// The test images: (file, format, qemu-io pattern checks "pattern off len").
fn make_images(dir: &Path) {
    sh(
        "qemu-img create -q -f qcow2 a.qcow2 16M
         qemu-io -f qcow2 -c 'write -P 1 0 4k' -c 'write -P 2 1M 64k' -c 'write -z 4M 128k' \
                 -c 'write -c -P 3 8M 64k' -c 'write -P 4 15M 1M' a.qcow2 >/dev/null
         qemu-img create -q -f qcow2 base.qcow2 8M
         qemu-io -f qcow2 -c 'write -P 5 0 2M' -c 'write -P 9 6M 512k' base.qcow2 >/dev/null
         qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 mid.qcow2
         qemu-io -f qcow2 -c 'write -P 6 1M 1M' -c 'write -z 6M 64k' mid.qcow2 >/dev/null
         qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2
         qemu-io -f qcow2 -c 'write -P 7 0 64k' -c 'write -z 1536k 64k' top.qcow2 >/dev/null
         qemu-img convert -O raw a.qcow2 a.raw
         qemu-img convert -O raw top.qcow2 top.raw",
        dir,
    );
}

fn strip_uri(s: &str) -> String {
    s.lines()
        .filter(|l| !l.contains("\"uri\""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// sha256 of what the shell command `cmd` prints; the command must succeed.
fn sha(cmd: &str, dir: &Path) -> String {
    let o = Command::new("sh")
        .arg("-ec")
        .arg(cmd)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        o.status.success(),
        "{cmd}: {}: {}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    Sha256::digest(&o.stdout)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// One client command run against qnbd (`ours`) and against qemu-nbd (`theirs`): both must
/// succeed and print the same. Every difference goes to `failures`.
fn compare_runs(failures: &mut Vec<String>, what: &str, ours: Out, theirs: Out) {
    let mut found = Vec::new();
    for (who, o) in [("qnbd", &ours), ("qemu-nbd", &theirs)] {
        if o.0 != 0 {
            found.push(format!(
                "against {who} it exited {}: {}",
                o.0,
                o.2.trim_end()
            ));
        }
    }
    if ours.1 != theirs.1 {
        found.push(format!(
            "stdout differs:\n--- qnbd\n{}\n--- qemu-nbd\n{}",
            ours.1, theirs.1
        ));
    }
    if found.is_empty() {
        eprintln!("{what}: same");
    } else {
        failures.push(format!("{what}: {}", found.join("\n")));
    }
}

#[test]
fn clients_see_what_qemu_nbd_serves() {
    if !require_tools(
        "clients_see_what_qemu_nbd_serves",
        &["qemu-img", "qemu-io", "qemu-nbd", "nbdinfo", "nbdcopy"],
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    make_images(dir);
    let mut failures = Vec::new();
    for img in ["a.qcow2", "top.qcow2"] {
        let path = dir.join(img);
        let p = path.to_str().unwrap();
        let ours = qnbd(
            dir,
            &format!("q-{img}"),
            &["-r", "-t", "-A", "-f", "qcow2", p],
        );
        let theirs = qemu_nbd(
            dir,
            &format!("r-{img}"),
            &["-r", "-t", "-A", "-f", "qcow2", p],
        );
        let info = |u: &str| {
            let (rc, out, err) = run(Command::new("nbdinfo").args(["--json", "--no-content", u]));
            (rc, strip_uri(&out), err)
        };
        compare_runs(
            &mut failures,
            &format!("{img}: nbdinfo --json"),
            info(&ours.uri),
            info(&theirs.uri),
        );
        for ctx in ["base:allocation", "qemu:allocation-depth"] {
            let m =
                |u: &str| run(Command::new("nbdinfo").args(["--json", &format!("--map={ctx}"), u]));
            compare_runs(
                &mut failures,
                &format!("{img}: nbdinfo --map={ctx}"),
                m(&ours.uri),
                m(&theirs.uri),
            );
        }
        let map =
            |u: &str| run(Command::new("qemu-img").args(["map", "--output=json", "-f", "raw", u]));
        compare_runs(
            &mut failures,
            &format!("{img}: qemu-img map (NBD client)"),
            map(&ours.uri),
            map(&theirs.uri),
        );
        let mut check = |what: &str, a: String, b: String| {
            if a != b {
                failures.push(format!(
                    "{img}: {what} differs:\n--- qnbd\n{a}\n--- expected\n{b}"
                ));
            } else {
                eprintln!("{img}: {what}: same");
            }
        };
        let (rc, out, err) =
            run(Command::new("qemu-img")
                .args(["compare", "-f", "qcow2", "-F", "raw", p, &ours.uri]));
        check(
            "qemu-img compare file vs qnbd",
            format!("{rc} {out}{err}"),
            "0 Images are identical.\n".into(),
        );
        let raw = img.replace(".qcow2", ".raw");
        check(
            "nbdcopy | sha256sum",
            sha(&format!("nbdcopy '{}' -", ours.uri), dir),
            sha(&format!("cat {raw}"), dir),
        );
        let reads: &[&str] = if img == "a.qcow2" {
            &[
                "read -P 1 0 4k",
                "read -P 2 1M 64k",
                "read -P 0 4M 128k",
                "read -P 3 8M 64k",
                "read -P 4 15M 1M",
                "read -P 0 12M 1M",
            ]
        } else {
            &[
                "read -P 7 0 64k",
                "read -P 5 64k 960k",
                "read -P 6 1M 512k",
                "read -P 0 1536k 64k",
                "read -P 0 6M 64k",
                "read -P 9 6208k 448k",
            ]
        };
        for r in reads {
            let (rc, out, err) =
                run(Command::new("qemu-io").args(["-r", "-f", "raw", "-c", r, &ours.uri]));
            let ok =
                rc == 0 && !out.contains("Pattern verification failed") && !out.contains("fail");
            check(
                &format!("qemu-io {r}"),
                format!("{ok} {err}"),
                "true ".into(),
            );
        }
        let l = |s: &Path| run(Command::new("qemu-nbd").args(["-L", "-k"]).arg(s));
        compare_runs(
            &mut failures,
            &format!("{img}: qemu-nbd -L"),
            l(&ours.sock),
            l(&theirs.sock),
        );
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn several_exports_are_listed_and_served() {
    if !require_tools(
        "several_exports_are_listed_and_served",
        &["qemu-img", "qemu-io", "nbdinfo", "qemu-nbd"],
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    make_images(dir);
    let a = format!(
        "name=disk-a,file={},format=qcow2,description=first",
        dir.join("a.qcow2").display()
    );
    let b = format!(
        "name=disk-b,file={},format=qcow2,allocation-depth=on",
        dir.join("top.qcow2").display()
    );
    let s = qnbd(
        dir,
        "multi",
        &["-t", "-e", "0", "--export", &a, "--export", &b],
    );
    let (rc, out, err) = run(Command::new("nbdinfo").args(["--list", "--json", &s.uri]));
    assert_eq!(rc, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let ex = v["exports"].as_array().unwrap();
    let names: Vec<&str> = ex
        .iter()
        .map(|e| e["export-name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["disk-a", "disk-b"]);
    assert_eq!(ex[0]["description"], "first");
    assert_eq!(ex[0]["export-size"], 16 << 20);
    assert_eq!(ex[1]["export-size"], 8 << 20);
    assert_eq!(ex[0]["can_multi_conn"], true);
    assert_eq!(
        ex[1]["contexts"],
        serde_json::json!(["base:allocation", "qemu:allocation-depth"])
    );
    let uri_b = format!("nbd+unix:///disk-b?socket={}", s.sock.display());
    let (rc, _, err) = run(Command::new("qemu-img")
        .args(["compare", "-U", "-f", "qcow2", "-F", "raw"])
        .arg(dir.join("top.qcow2"))
        .arg(&uri_b));
    assert_eq!(rc, 0, "{err}");
    // an unknown export is refused, the server keeps going
    let bad = format!("nbd+unix:///nosuch?socket={}", s.sock.display());
    let (rc, _, _) = run(Command::new("nbdinfo").arg(&bad));
    assert_ne!(rc, 0);
    let (rc, _, _) = run(Command::new("nbdinfo").arg(&uri_b));
    assert_eq!(rc, 0);
}

// ---- raw protocol client ----

const FIXED: u32 = 1;
const NO_ZEROES: u32 = 2;

struct Raw {
    s: UnixStream,
}

impl Raw {
    fn connect(sock: &Path) -> Raw {
        let s = UnixStream::connect(sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut r = Raw { s };
        let g = r.read(18);
        assert_eq!(&g[..8], b"NBDMAGIC");
        r
    }
    fn read(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0; n];
        self.s.read_exact(&mut v).unwrap();
        v
    }
    fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).unwrap();
    }
    fn opt(&mut self, opt: u32, data: &[u8]) {
        let mut v = b"IHAVEOPT".to_vec();
        v.extend(opt.to_be_bytes());
        v.extend((data.len() as u32).to_be_bytes());
        v.extend(data);
        self.send(&v);
    }
    fn opt_reply(&mut self) -> (u32, Vec<u8>) {
        let h = self.read(20);
        let t = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let l = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        (t, self.read(l))
    }
    /// Negotiate (optionally structured replies + base:allocation) and GO to the default export.
    fn go(sock: &Path, structured: bool) -> Raw {
        let mut r = Raw::connect(sock);
        r.send(&(FIXED | NO_ZEROES).to_be_bytes());
        if structured {
            r.opt(8, &[]);
            assert_eq!(r.opt_reply().0, 1);
            let mut d = 0u32.to_be_bytes().to_vec();
            d.extend(1u32.to_be_bytes());
            d.extend(15u32.to_be_bytes());
            d.extend(b"base:allocation");
            r.opt(10, &d);
            while r.opt_reply().0 != 1 {}
        }
        r.opt(7, &[0, 0, 0, 0, 0, 0]);
        loop {
            let (t, _) = r.opt_reply();
            if t == 1 {
                break;
            }
            assert_eq!(t, 3, "GO failed");
        }
        r
    }
    fn request(&mut self, flags: u16, cmd: u16, cookie: u64, off: u64, len: u32) {
        let mut v = 0x2560_9513u32.to_be_bytes().to_vec();
        v.extend(flags.to_be_bytes());
        v.extend(cmd.to_be_bytes());
        v.extend(cookie.to_be_bytes());
        v.extend(off.to_be_bytes());
        v.extend(len.to_be_bytes());
        self.send(&v);
    }
    /// Read one simple reply: (error, cookie).
    fn simple(&mut self) -> (u32, u64) {
        let h = self.read(16);
        assert_eq!(&h[..4], &0x6744_6698u32.to_be_bytes());
        (
            u32::from_be_bytes(h[4..8].try_into().unwrap()),
            u64::from_be_bytes(h[8..16].try_into().unwrap()),
        )
    }
    /// Read structured chunks until DONE: list of (type, cookie, payload).
    fn structured(&mut self) -> Vec<(u16, u64, Vec<u8>)> {
        let mut v = Vec::new();
        loop {
            let h = self.read(4);
            if h == 0x6744_6698u32.to_be_bytes() {
                let rest = self.read(12);
                let e = u32::from_be_bytes(rest[0..4].try_into().unwrap());
                v.push((if e == 0 { 0 } else { 0x8001 }, 0, e.to_be_bytes().to_vec()));
                return v;
            }
            let h = self.read(16);
            let flags = u16::from_be_bytes(h[0..2].try_into().unwrap());
            let t = u16::from_be_bytes(h[2..4].try_into().unwrap());
            let cookie = u64::from_be_bytes(h[4..12].try_into().unwrap());
            let l = u32::from_be_bytes(h[12..16].try_into().unwrap()) as usize;
            v.push((t, cookie, self.read(l)));
            if flags & 1 != 0 {
                return v;
            }
        }
    }
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0) | Err(_))
    }
}

fn error_of(chunks: &[(u16, u64, Vec<u8>)]) -> Option<u32> {
    chunks
        .iter()
        .find(|c| c.0 & 0x8000 != 0)
        .map(|c| u32::from_be_bytes(c.2[0..4].try_into().unwrap()))
}

fn still_serves(sock: &Path) {
    let mut r = Raw::go(sock, false);
    r.request(0, 0, 42, 1 << 20, 4096);
    assert_eq!(r.simple(), (0, 42));
    assert!(r.read(4096).iter().all(|&b| b == 2));
}

#[test]
fn hostile_requests_are_answered_and_the_server_keeps_serving() {
    // the ring data plane (the default) and the threaded path decode requests separately
    hostile_requests("--aio=io_uring");
    hostile_requests("--aio=threads");
}

fn hostile_requests(aio: &str) {
    if !require_tools("hostile_requests", &["qemu-img", "qemu-io"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    make_images(dir);
    let img = dir.join("a.qcow2");
    let s = qnbd(
        dir,
        "hostile",
        &[
            "-r",
            "-t",
            "-e",
            "0",
            aio,
            "-f",
            "qcow2",
            img.to_str().unwrap(),
        ],
    );
    let size: u64 = 16 << 20;

    // simple replies: every refusal keeps the connection in sync
    let mut r = Raw::go(&s.sock, false);
    let cases: &[(u16, u16, u64, u32, u32)] = &[
        (0, 0, size - 1, 2, 22),        // read past the end
        (0, 0, u64::MAX - 10, 100, 22), // offset + length wraps
        (0, 99, 0, 512, 22),            // unknown command
        (1 << 10, 0, 0, 512, 22),       // unknown flag
        (8, 0, 0, 512, 22),             // REQ_ONE on READ
        (4, 0, 0, 512, 22),             // DF without structured replies
        (2, 4, 0, 512, 22),             // NO_HOLE on TRIM (flag checks come first)
        (0, 6, 0, 4096, 1),             // WRITE_ZEROES on a read-only export
        (0, 4, 0, 4096, 1),             // TRIM on a read-only export
        (0, 0, 0, (32 << 20) + 1, 22),  // READ above the maximum payload
        (0, 7, 0, 4096, 22),            // BLOCK_STATUS without contexts
    ];
    for (i, &(flags, cmd, off, len, want)) in cases.iter().enumerate() {
        r.request(flags, cmd, i as u64, off, len);
        assert_eq!(r.simple(), (want, i as u64), "case {i}");
    }
    // zero-length read, flush with reserved fields, cache
    r.request(0, 0, 100, 0, 0);
    assert_eq!(r.simple(), (0, 100));
    r.request(0, 3, 101, 7, 9);
    assert_eq!(r.simple(), (0, 101));
    r.request(0, 5, 102, 0, 1 << 20);
    assert_eq!(r.simple(), (0, 102));
    // a 32 MiB read is fine (the image is only 16 MiB, so read the maximum inside it)
    r.request(0, 0, 103, 0, 16 << 20);
    assert_eq!(r.simple(), (0, 103));
    let data = r.read(16 << 20);
    assert!(data[..4096].iter().all(|&b| b == 1));
    // a write with an oversized payload is drained and refused, the stream stays in sync
    let big = (32u32 << 20) + 4096;
    r.request(0, 1, 104, 0, big);
    let junk = vec![0xee; big as usize];
    r.send(&junk);
    assert_eq!(r.simple(), (22, 104));
    // a write on a read-only export
    r.request(0, 1, 105, 0, 512);
    r.send(&[1; 512]);
    assert_eq!(r.simple(), (1, 105));
    still_serves(&s.sock);

    // structured replies: READ errors are error chunks; holes; REQ_ONE; clamped extents
    let mut r = Raw::go(&s.sock, true);
    r.request(0, 0, 1, size, 1);
    assert_eq!(error_of(&r.structured()), Some(22));
    r.request(0, 0, 2, 4 << 20, 128 << 10);
    let c = r.structured();
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].0, 2, "zero cluster read as OFFSET_HOLE");
    r.request(4, 0, 3, 4 << 20, 128 << 10);
    let c = r.structured();
    assert_eq!((c.len(), c[0].0, c[0].2.len()), (1, 1, 8 + (128 << 10)));
    r.request(8, 7, 4, 0, 0xffff_ffff);
    assert_eq!(error_of(&r.structured()), Some(22), "beyond end");
    r.request(8, 7, 5, 0, 8 << 20);
    let c = r.structured();
    assert_eq!(c[0].0, 5);
    assert_eq!(c[0].2.len(), 4 + 8, "REQ_ONE: one descriptor");
    r.request(0, 7, 6, 1000, 5000);
    let c = r.structured();
    let p = &c[0].2;
    let total: u64 = p[4..]
        .chunks(8)
        .map(|d| u32::from_be_bytes(d[0..4].try_into().unwrap()) as u64)
        .sum();
    assert_eq!(total, 5000, "extents clamped to the request");
    drop(r);

    // bad magic: the connection is dropped, nothing is interpreted as payload
    let mut r = Raw::go(&s.sock, false);
    r.send(&[0xde, 0xad, 0xbe, 0xef]);
    r.send(&[0; 24]);
    assert!(r.closed());
    still_serves(&s.sock);

    // truncated header and mid-request disconnects
    for cut in [1usize, 10, 27] {
        let mut r = Raw::go(&s.sock, false);
        let mut v = 0x2560_9513u32.to_be_bytes().to_vec();
        v.extend([0u8; 24]);
        r.send(&v[..cut]);
        drop(r);
    }
    let mut r = Raw::go(&s.sock, false);
    r.request(0, 1, 9, 0, 1 << 20);
    r.send(&[0; 1000]);
    drop(r);
    still_serves(&s.sock);

    // handshake abuse: huge option length, unknown option, bad client flags
    let mut r = Raw::connect(&s.sock);
    r.send(&(FIXED | NO_ZEROES).to_be_bytes());
    r.opt(0x1234, b"x");
    assert_eq!(r.opt_reply().0, 0x8000_0001);
    let mut v = b"IHAVEOPT".to_vec();
    v.extend(7u32.to_be_bytes());
    v.extend(0x7fff_ffffu32.to_be_bytes());
    r.send(&v);
    assert!(r.closed());
    let mut r = Raw::connect(&s.sock);
    r.send(&0x83u32.to_be_bytes());
    assert!(r.closed());
    still_serves(&s.sock);
}

#[test]
fn handshake_limit_drops_idle_clients() {
    if !require_tools(
        "handshake_limit_drops_idle_clients",
        &["qemu-img", "qemu-io"],
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    make_images(dir);
    let img = dir.join("a.qcow2");
    let s = qnbd(
        dir,
        "idle",
        &[
            "-r",
            "-t",
            "-e",
            "0",
            "--handshake-limit",
            "1",
            "-f",
            "qcow2",
            img.to_str().unwrap(),
        ],
    );
    let t = Instant::now();
    let mut r = Raw::connect(&s.sock);
    assert!(r.closed());
    assert!(t.elapsed() < Duration::from_secs(10));
    still_serves(&s.sock);
}

#[test]
fn server_exits_after_the_last_client_unless_persistent() {
    if !require_tools(
        "server_exits_after_the_last_client_unless_persistent",
        &["qemu-img", "qemu-io", "nbdinfo"],
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    make_images(dir);
    let img = dir.join("a.qcow2");
    let sock = dir.join("once.sock");
    let mut child = Command::new(qnbd_bin())
        .args(["serve", "-r", "-f", "qcow2", "-k"])
        .arg(&sock)
        .arg(&img)
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !sock.exists() {
        assert!(t.elapsed() < Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(20));
    }
    let (rc, _, err) =
        run(Command::new("nbdinfo").arg(format!("nbd+unix:///?socket={}", sock.display())));
    assert_eq!(rc, 0, "{err}");
    let t = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            assert!(st.success());
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "server did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!sock.exists(), "socket file removed on exit");
}

#[test]
fn socket_activation_works_with_libnbd_captive_servers() {
    if !require_tools(
        "socket_activation_works_with_libnbd_captive_servers",
        &["qemu-img", "qemu-io", "nbdinfo", "qemu-nbd"],
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    make_images(dir);
    let img = dir.join("top.qcow2");
    let ours = run(Command::new("nbdinfo")
        .args(["--map=qemu:allocation-depth", "--", "["])
        .arg(qnbd_bin())
        .args(["serve", "-r", "-A", "-f", "qcow2"])
        .arg(&img)
        .arg("]"));
    let theirs = run(Command::new("nbdinfo")
        .args([
            "--map=qemu:allocation-depth",
            "--",
            "[",
            "qemu-nbd",
            "-r",
            "-A",
            "-f",
            "qcow2",
        ])
        .arg(&img)
        .arg("]"));
    let mut failures = Vec::new();
    compare_runs(
        &mut failures,
        "nbdinfo --map=qemu:allocation-depth [ server ]",
        ours,
        theirs,
    );
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// Every prefix of a valid client transcript, fed over stdio, ends the server cleanly.
#[test]
fn truncated_transcripts_over_stdio_never_crash() {
    if !require_tools(
        "truncated_transcripts_over_stdio_never_crash",
        &["qemu-img", "qemu-io"],
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    make_images(dir);
    let img = dir.join("a.qcow2");
    let mut t = (FIXED | NO_ZEROES).to_be_bytes().to_vec();
    let opt = |t: &mut Vec<u8>, o: u32, d: &[u8]| {
        t.extend(b"IHAVEOPT");
        t.extend(o.to_be_bytes());
        t.extend((d.len() as u32).to_be_bytes());
        t.extend(d);
    };
    opt(&mut t, 0x99, b"zz");
    opt(&mut t, 11, &[]);
    let mut d = 0u32.to_be_bytes().to_vec();
    d.extend(1u32.to_be_bytes());
    d.extend(15u32.to_be_bytes());
    d.extend(b"base:allocation");
    opt(&mut t, 10, &d);
    opt(&mut t, 7, &[0, 0, 0, 0, 0, 0]);
    let hs_len = t.len();
    for (flags, cmd, off, len) in [
        (0u16, 0u16, 0u64, 4096u64),
        (0, 7, 0, 1 << 20),
        (0, 5, 0, 512),
        (0, 2, 0, 0),
    ] {
        t.extend(0x21e4_1c71u32.to_be_bytes());
        t.extend(flags.to_be_bytes());
        t.extend(cmd.to_be_bytes());
        t.extend(7u64.to_be_bytes());
        t.extend(off.to_be_bytes());
        t.extend(len.to_be_bytes());
    }
    let cuts: Vec<usize> = (0..=hs_len)
        .chain((hs_len..=t.len()).step_by(5))
        .chain([t.len()])
        .collect();
    for cut in cuts {
        let mut c = Command::new(qnbd_bin())
            .args(["serve", "--stdio", "-r", "-f", "qcow2"])
            .arg(&img)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        {
            let mut stdin = c.stdin.take().unwrap();
            let _ = stdin.write_all(&t[..cut]);
        }
        let o = c.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            o.status.success() && !err.contains("panicked"),
            "cut {cut}: {err}"
        );
        assert!(o.stdout.starts_with(b"NBDMAGIC"));
    }
}

/// The same writes through qnbd and through qemu-nbd (both over QEMU's own NBD client, which
/// negotiates extended headers, and libnbd's nbdsh) leave images QEMU calls identical, and ours
/// passes `qemu-img check`.
#[test]
fn writes_from_real_clients_land_like_on_qemu_nbd() {
    if !require_tools(
        "writes_from_real_clients_land_like_on_qemu_nbd",
        &["qemu-img", "qemu-io", "qemu-nbd"],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    sh(
        "qemu-img create -q -f qcow2 base.qcow2 32M
         qemu-io -f qcow2 -c 'write -P 5 0 32M' base.qcow2 >/dev/null
         for n in ours theirs; do
           qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 $n.qcow2
           qemu-img create -q -f qcow2 -o cluster_size=4k,refcount_bits=8 $n-small.qcow2 32M
         done",
        d,
    );
    for (img, flags) in [
        ("", &["--discard=unmap"][..]),
        // the threaded path (--aio=threads) for the second image
        ("-small", &["--discard=ignore", "--aio=threads"][..]),
    ] {
        let ours_file = d.join(format!("ours{img}.qcow2")).display().to_string();
        let theirs_file = d.join(format!("theirs{img}.qcow2")).display().to_string();
        let ours = qnbd(
            d,
            &format!("ours{img}"),
            &[&[ours_file.as_str(), "-f", "qcow2", "-t"][..], flags].concat(),
        );
        let theirs = qemu_nbd(
            d,
            &format!("theirs{img}"),
            &[
                &["-f", "qcow2", "-t"][..],
                flags,
                &[theirs_file.as_str()][..],
            ]
            .concat(),
        );
        for srv in [&ours, &theirs] {
            let cmds = [
                "write -P 0xa1 0 1M",
                "write -P 0xa2 1000 3000",
                "write -z 2M 1M",
                "write -z -u 3M 256k",
                "discard 4M 1M",
                "write -P 0xa3 5M 4096",
                "write -f -P 0xa4 6M 64k",
                "write -z 7M 12345",
                "flush",
                "aio_write -P 0xa5 8M 64k",
                "aio_write -P 0xa6 9M 64k",
                "aio_flush",
            ];
            let mut c = Command::new("qemu-io");
            c.args(["-f", "raw"]);
            for x in cmds {
                c.args(["-c", x]);
            }
            let (rc, out, err) = run(c.arg(&srv.uri));
            assert_eq!(rc, 0, "qemu-io over {}: {out}{err}", srv.uri);
            assert!(!out.contains("failed"), "{}: {out}", srv.uri);
            if require_tools(
                "writes_from_real_clients_land_like_on_qemu_nbd (nbdsh writes)",
                &["nbdsh"],
            ) {
                let (rc, out, err) = run(Command::new("nbdsh")
                    .env("PATH", "/usr/bin:/bin")
                    .args(["-u", &srv.uri, "-c"])
                    .arg(
                        "h.pwrite(b'\\x77' * 70000, 10 * 1024 * 1024 + 333)\n\
                         h.zero(65536, 12 * 1024 * 1024)\n\
                         h.trim(65536, 13 * 1024 * 1024)\n\
                         h.flush()",
                    ));
                assert_eq!(rc, 0, "nbdsh over {}: {out}{err}", srv.uri);
            }
        }
        drop(ours);
        drop(theirs);
        let (rc, out, err) = run(Command::new("qemu-img")
            .args(["check"])
            .arg(d.join(format!("ours{img}.qcow2"))));
        assert_eq!(rc, 0, "check ours{img}: {out}{err}");
        let (rc, out, err) = run(Command::new("qemu-img")
            .args(["compare", "-f", "qcow2", "-F", "qcow2"])
            .arg(d.join(format!("ours{img}.qcow2")))
            .arg(d.join(format!("theirs{img}.qcow2"))));
        assert_eq!(rc, 0, "compare ours{img} theirs{img}: {out}{err}");
    }
}

/// fio's nbd engine, queue depth 32 on two connections (multi-conn), random 4k writes with
/// crc32c verification; afterwards the image passes `qemu-img check`.
#[test]
fn fio_verified_writes_over_multi_conn() {
    if !require_tools("fio_verified_writes_over_multi_conn", &["qemu-img", "fio"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    sh("qemu-img create -q -f qcow2 f.qcow2 64M", d);
    let f = d.join("f.qcow2").display().to_string();
    let srv = qnbd(d, "fio", &[f.as_str(), "-f", "qcow2", "-t", "-e", "4"]);
    let job = format!(
        "[global]\nioengine=nbd\nuri={}\nrw=randwrite\nbs=4k\niodepth=32\nsize=16M\n\
         verify=crc32c\nverify_fatal=1\ndo_verify=1\n\n[a]\noffset=0\n\n[b]\noffset=32M\n",
        srv.uri
    );
    std::fs::write(d.join("w.fio"), job).unwrap();
    let (rc, out, err) = run(Command::new("fio").arg("w.fio").current_dir(d));
    assert_eq!(rc, 0, "fio: {out}{err}");
    assert!(!out.contains("verify failed"), "{out}");
    drop(srv);
    let (rc, out, err) = run(Command::new("qemu-img").arg("check").arg(d.join("f.qcow2")));
    assert_eq!(rc, 0, "{out}{err}");
}

/// `-l` exports an internal snapshot read-only (content equal to qemu-img convert -l), `-s`
/// takes writes into a throw-away overlay and leaves the image untouched.
#[test]
fn internal_snapshots_and_throwaway_overlays() {
    if !require_tools(
        "internal_snapshots_and_throwaway_overlays",
        &["qemu-img", "qemu-io", "nbdcopy"],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    sh(
        "qemu-img create -q -f qcow2 s.qcow2 8M
         qemu-io -c 'write -P 1 0 1M' s.qcow2 >/dev/null
         qemu-img snapshot -c first s.qcow2
         qemu-io -c 'write -P 2 0 512k' -c 'write -P 3 4M 1M' s.qcow2 >/dev/null
         qemu-img convert -l snapshot.name=first -O raw s.qcow2 first.raw
         qemu-img convert -O raw s.qcow2 active.raw
         sha256sum s.qcow2 > before.sum",
        d,
    );
    let img = d.join("s.qcow2").display().to_string();
    for sel in ["first", "1", "snapshot.name=first", "snapshot.id=1"] {
        let srv = qnbd(d, "l", &[&img, "-f", "qcow2", "-t", "-l", sel]);
        let got = sha(&format!("nbdcopy '{}' -", srv.uri), d);
        assert_eq!(got, sha("cat first.raw", d), "-l {sel}");
        let (rc, out, _) = run(Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write 0 4k"])
            .arg(&srv.uri));
        assert!(
            rc != 0 || out.contains("failed"),
            "-l export accepted a write"
        );
    }
    let (rc, _, err) = run(Command::new(qnbd_bin())
        .args(["serve", "-l", "nope", "-f", "qcow2", "-k"])
        .arg(d.join("x.sock"))
        .arg(&img));
    assert_eq!(rc, 1);
    assert!(err.contains("Can't find snapshot"), "{err}");
    // -s: writes land in the overlay only
    let srv = qnbd(d, "s", &[&img, "-f", "qcow2", "-t", "-s"]);
    let (rc, out, err) = run(Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "write -P 9 0 2M",
            "-c",
            "read -P 9 0 2M",
            "-c",
            "read -P 3 4M 1M",
        ])
        .arg(&srv.uri));
    assert_eq!(rc, 0, "{out}{err}");
    assert!(!out.contains("fail"), "{out}");
    drop(srv);
    sh("sha256sum -c before.sum >/dev/null", d);
    let got = sha(
        "qemu-img convert -O raw s.qcow2 after.raw && cat after.raw",
        d,
    );
    assert_eq!(got, sha("cat active.raw", d));
}
