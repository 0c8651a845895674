//! A real full disk under `qnbd serve`: the image lives on a small tmpfs (mounted by the test;
//! root is needed, else it skips with the reason, and under CI it fails), the filesystem is
//! filled, and real clients (qemu-io, and nbdsh with two connections at once) write, zero and
//! trim over compressed, extended-L2 and plain images until the disk refuses. Then space is
//! freed, the same server takes more writes, and after it stops: `qemu-img check` finds no
//! corruption, every acknowledged write before the last completed flush reads back, failed
//! requests left old or new data (per request), and nothing else changed.

use qcow2_spec_tests::{qnbd_bin, require_tools, scratch_dir, skip, NbdServer};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Run a setup command (program and arguments) that must succeed.
fn sh(args: &[&str], cwd: &Path) {
    qcow2_spec_tests::tool_ok(args[0], cwd, &args[1..]);
}

/// A tmpfs mounted for the test, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: PathBuf, size: &str) -> Result<Tmpfs, String> {
        std::fs::create_dir_all(&at).map_err(|e| e.to_string())?;
        let o = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&at)
            .output()
            .map_err(|e| e.to_string())?;
        if !o.status.success() {
            return Err(String::from_utf8_lossy(&o.stderr).trim().to_string());
        }
        Ok(Tmpfs(at))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Fill the filesystem at `dir` up to `leave` free bytes with a file `fill`.
fn fill(dir: &Path, leave: u64) -> PathBuf {
    use std::io::Write;
    let p = dir.join("fill");
    let mut f = std::fs::File::create(&p).unwrap();
    let chunk = vec![0x5au8; 65536];
    while f.write_all(&chunk).is_ok() {}
    drop(f);
    let len = std::fs::metadata(&p).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(len.saturating_sub(leave)).unwrap();
    f.sync_all().unwrap();
    p
}

/// The client workload, as nbdsh (python) on two connections: 64 KiB writes of a pattern
/// per request, zeroes and trims, flushes; prints one line per request: `op off len pat ok`.
const CLIENT: &str = r##"
import nbd, sys
sock, phase = sys.argv[1], sys.argv[2]
hs = []
for _ in range(2):
    h = nbd.NBD()
    h.connect_unix(sock)
    hs.append(h)
K = 65536
ops = []
if phase == "full":
    for i in range(48):
        ops.append(("write", (56 + i) * K, K, 0x40 + i % 32))
        if i % 12 == 11:
            ops.append(("flush", 0, 0, 0))
    ops.append(("zero", 40 * K, 3 * K, 0))
    ops.append(("zero", 50 * K + 1000, 2000, 0))
    ops.append(("trim", 20 * K, 2 * K, 0))
    ops.append(("flush", 0, 0, 0))
else:
    for i in range(8):
        ops.append(("write", (128 + i) * K, K, 0x70 + i))
    ops.append(("flush", 0, 0, 0))
for n, (op, off, ln, pat) in enumerate(ops):
    h = hs[n % 2]
    try:
        if op == "write":
            h.pwrite(bytes([pat]) * ln, off)
        elif op == "zero":
            h.zero(ln, off)
        elif op == "trim":
            h.trim(ln, off)
        else:
            h.flush()
        ok = 1
    except nbd.Error as e:
        ok = 0
        print("# %s %d: %s" % (op, off, e), file=sys.stderr)
    print(op, off, ln, pat, ok)
for h in hs:
    h.shutdown()
"##;

#[derive(Debug)]
struct Req {
    op: String,
    off: u64,
    len: u64,
    pat: u8,
    ok: bool,
}

fn client(sock: &Path, phase: &str) -> Vec<Req> {
    let o = Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(CLIENT)
        .arg(sock)
        .arg(phase)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "client: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Req {
                op: f[0].to_string(),
                off: f[1].parse().unwrap(),
                len: f[2].parse().unwrap(),
                pat: f[3].parse().unwrap(),
                ok: f[4] == "1",
            }
        })
        .collect()
}

/// Every byte against the requests: a write or zero acknowledged before the last completed
/// flush is there; anything after it, or failed, left the old or the new value; a trim
/// may leave the old data or zeros; nothing else changed.
fn verify(what: &str, original: &[u8], got: &[u8], reqs: &[Req]) {
    assert_eq!(got.len(), original.len(), "{what}: size");
    let last_flush = reqs.iter().rposition(|r| r.op == "flush" && r.ok);
    // segments between request edges share one set of allowed values
    let mut edges = vec![0u64, original.len() as u64];
    for r in reqs {
        edges.push(r.off);
        edges.push(r.off + r.len);
    }
    edges.sort_unstable();
    edges.dedup();
    for seg in edges.windows(2) {
        let (s, e) = (seg[0], seg[1]);
        let mut allowed: Vec<Option<u8>> = vec![None];
        for (i, r) in reqs.iter().enumerate() {
            let v = match r.op.as_str() {
                "write" => r.pat,
                "zero" | "trim" => 0,
                _ => continue,
            };
            if s < r.off || e > r.off + r.len {
                continue;
            }
            let durable = r.ok && r.op != "trim" && last_flush.is_some_and(|f| i < f);
            if durable {
                allowed = vec![Some(v)];
            } else if !allowed.contains(&Some(v)) {
                allowed.push(Some(v));
            }
        }
        for pos in s as usize..e as usize {
            let g = got[pos];
            let ok = allowed.iter().any(|v| match v {
                None => g == original[pos],
                Some(x) => g == *x,
            });
            assert!(
                ok,
                "{what}: byte {pos:#x} reads {g:#x}, allowed {allowed:?} (original {:#x})",
                original[pos]
            );
        }
    }
}

fn contents(img: &Path) -> Vec<u8> {
    let out = img.with_extension("raw");
    let _ = std::fs::remove_file(&out);
    sh(
        &[
            "qemu-img",
            "convert",
            "-O",
            "raw",
            img.to_str().unwrap(),
            out.to_str().unwrap(),
        ],
        Path::new("/"),
    );
    let v = std::fs::read(&out).unwrap();
    let _ = std::fs::remove_file(&out);
    v
}

#[test]
fn a_full_disk_under_serve_loses_nothing_acknowledged() {
    if !require_tools("full disk", &["qemu-img", "qemu-io", "nbdsh"]) {
        return;
    }
    let dir = scratch_dir();
    let d = dir.path();
    let fs = match Tmpfs::mount(d.join("mnt"), "24m") {
        Ok(fs) => fs,
        Err(why) => {
            skip(
                "full disk",
                &format!("cannot mount a tmpfs ({why}); needs root"),
            );
            return;
        }
    };
    let mnt = fs.0.clone();
    // a source with data over its first 4 MiB
    let src = d.join("src.raw");
    sh(
        &[
            "qemu-img",
            "create",
            "-q",
            "-f",
            "raw",
            src.to_str().unwrap(),
            "12M",
        ],
        d,
    );
    sh(
        &[
            "qemu-io",
            "-f",
            "raw",
            "-c",
            "write -P 0x61 0 3M",
            "-c",
            "write -P 0x62 3M 1M",
            src.to_str().unwrap(),
        ],
        d,
    );
    for (name, args) in [
        ("compressed", vec!["convert", "-c", "-O", "qcow2"]),
        (
            "compressed-extended-l2",
            vec![
                "convert",
                "-c",
                "-O",
                "qcow2",
                "-o",
                "extended_l2=on,compression_type=zstd",
            ],
        ),
        (
            "plain",
            vec!["convert", "-O", "qcow2", "-o", "cluster_size=16k"],
        ),
    ] {
        let img = mnt.join("w.qcow2");
        let _ = std::fs::remove_file(&img);
        let mut a = args.clone();
        let (s, i) = (
            src.to_str().unwrap().to_string(),
            img.to_str().unwrap().to_string(),
        );
        a.push(&s);
        a.push(&i);
        let mut full = vec!["qemu-img"];
        full.extend(a);
        sh(&full, d);
        let original = contents(&img);
        let filler = fill(&mnt, 192 << 10);
        let sock = d.join("S");
        let server = NbdServer::start(
            d,
            qnbd_bin(),
            &[
                "serve",
                "-t",
                "-e",
                "0",
                "-f",
                "qcow2",
                img.to_str().unwrap(),
            ],
            &sock,
        );
        // qemu-io: one 2 MiB write that cannot fit
        let uri = format!("nbd+unix:///?socket={}", sock.display());
        let o = Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write -P 0x33 3M 2M", &uri])
            .output()
            .unwrap();
        let text =
            String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
        assert!(
            text.contains("No space left on device"),
            "{name}: qemu-io should see ENOSPC: {text}"
        );
        let mut reqs = vec![Req {
            op: "write".into(),
            off: 3 << 20,
            len: 2 << 20,
            pat: 0x33,
            ok: false,
        }];
        reqs.extend(client(&sock, "full"));
        let refused = reqs.iter().filter(|r| !r.ok).count();
        assert!(refused > 1, "{name}: the disk never filled up: {reqs:?}");
        // space again: the same server goes on
        std::fs::remove_file(&filler).unwrap();
        let more = client(&sock, "more");
        assert!(
            more.iter().all(|r| r.ok),
            "{name}: writes after freeing space: {more:?}"
        );
        reqs.extend(more);
        server.stop();
        let o = Command::new("qemu-img")
            .args(["check", "-f", "qcow2"])
            .arg(&img)
            .output()
            .unwrap();
        let rc = o.status.code().unwrap_or(-1);
        assert!(
            rc == 0 || rc == 3,
            "{name}: qemu-img check rc {rc}: {}",
            String::from_utf8_lossy(&o.stdout)
        );
        verify(name, &original, &contents(&img), &reqs);
        eprintln!(
            "full disk [{name}]: {} requests, {refused} refused with ENOSPC, check rc {rc}",
            reqs.len()
        );
        std::fs::remove_file(&img).unwrap();
    }
}
