//! Untrusted images (bad-inputs.md cases 43–49): what an image names must not reach files the
//! command line did not allow, loops and deep chains end with an error, and probing never
//! turns a raw disk into a qcow2 image. QEMU (qemu-img, qemu-nbd) is the oracle where it has
//! an answer; where QEMU opens whatever an image names, qnbd refuses by design (see
//! `docs/serve.md`, "Files named by images").

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn tools() -> bool {
    qcow2_spec_tests::require_tools("untrusted images", &["qemu-img", "qemu-io", "nbdcopy"])
}

fn run(dir: &Path, prog: &str, args: &[&str]) -> (i32, String, String) {
    let o = Command::new(prog)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{prog}: {e}"));
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn qnbd(dir: &Path, args: &[&str]) -> (i32, String, String) {
    run(dir, qcow2_spec_tests::qnbd_bin().to_str().unwrap(), args)
}

fn sh(script: &str, dir: &Path) {
    let (rc, o, e) = run(dir, "sh", &["-ec", script]);
    assert_eq!(rc, 0, "{script}\n{o}{e}");
}

/// `qnbd serve` on a socket: Ok(stderr) if it started serving (then it is stopped), Err(stderr)
/// if it exited first.
fn serve_starts(dir: &Path, args: &[&str]) -> Result<(), String> {
    let sock = dir.join("s.sock");
    let _ = std::fs::remove_file(&sock);
    let log = dir.join("serve.log");
    let mut child = Command::new(qcow2_spec_tests::qnbd_bin())
        .arg("serve")
        .args(["-r", "-t", "-k"])
        .arg(&sock)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let t = Instant::now();
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            return Err(std::fs::read_to_string(&log).unwrap_or_default());
        }
        if sock.exists() {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(());
        }
        if t.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("qnbd serve neither started nor failed in 20 s: {args:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn refused(r: (i32, String, String), what: &str, needle: &str) {
    assert_ne!(r.0, 0, "{what}: succeeded: {}", r.1);
    assert!(r.2.contains(needle), "{what}: {}", r.2);
}

/// Case 43 and 44: loops (A→B→A, self) and a chain deeper than the cap end with an error,
/// fast, in every command.
#[test]
fn loops_and_deep_chains_are_refused() {
    if !tools() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    sh(
        "qemu-img create -q -f qcow2 -u -b b.qcow2 -F qcow2 a.qcow2 1M
         qemu-img create -q -f qcow2 -u -b a.qcow2 -F qcow2 b.qcow2 1M
         qemu-img create -q -f qcow2 self.qcow2 1M
         qemu-img rebase -q -u -b self.qcow2 -F qcow2 self.qcow2
         qemu-img create -q -f raw l0.raw 1M
         qemu-img create -q -f qcow2 -u -b l0.raw -F raw l1.qcow2 1M
         i=1; while [ $i -lt 300 ]; do
             qemu-img create -q -f qcow2 -u -b l$i.qcow2 -F qcow2 l$((i+1)).qcow2 1M; i=$((i+1))
         done",
        d,
    );
    for img in ["a.qcow2", "self.qcow2"] {
        let (rc, _, e) = run(d, "qemu-img", &["info", "--backing-chain", img]);
        assert_ne!(rc, 0);
        assert!(e.contains("infinite loop"), "qemu-img: {e}");
        refused(
            qnbd(d, &["info", "--backing-chain", img]),
            img,
            "infinite loop",
        );
        refused(
            qnbd(d, &["map", "--output=json", img]),
            img,
            "infinite loop",
        );
        let e = serve_starts(d, &["-f", "qcow2", img]).expect_err("serve started");
        assert!(e.contains("infinite loop"), "{e}");
    }
    refused(
        qnbd(d, &["info", "--backing-chain", "l300.qcow2"]),
        "deep chain",
        "too deep",
    );
    let e = serve_starts(d, &["-f", "qcow2", "l300.qcow2"]).expect_err("serve started");
    assert!(e.contains("too deep"), "{e}");
    // a chain just under the cap opens
    assert_eq!(qnbd(d, &["map", "--output=json", "l255.qcow2"]).0, 0);
}

/// Case 45: `../` traversal, absolute host paths and symlinks out of the image's directory are
/// refused unless `--allow-backing` allows them; `--allow-backing none` refuses every backing
/// file; plain `info` still prints the names without opening them.
#[test]
fn backing_files_outside_the_allowed_places_are_refused() {
    if !tools() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    sh(
        "qemu-img create -q -f qcow2 outside.qcow2 1M
         qemu-io -f qcow2 -c 'write -P 0x42 0 64k' outside.qcow2 >/dev/null
         mkdir -p in
         qemu-img create -q -f qcow2 -u -b ../outside.qcow2 -F qcow2 in/dotdot.qcow2 1M
         qemu-img create -q -f qcow2 -u -b /etc/hostname -F raw in/abs.qcow2 1M
         ln -s ../outside.qcow2 in/link.qcow2
         qemu-img create -q -f qcow2 -u -b link.qcow2 -F qcow2 in/via-link.qcow2 1M
         qemu-img create -q -f qcow2 in/base.qcow2 1M
         qemu-img create -q -f qcow2 -u -b base.qcow2 -F qcow2 in/local.qcow2 1M",
        d,
    );
    for img in ["in/dotdot.qcow2", "in/abs.qcow2", "in/via-link.qcow2"] {
        let r = qnbd(d, &["info", "--backing-chain", img]);
        refused(r, img, "outside the places allowed");
        refused(
            qnbd(d, &["map", "--output=json", img]),
            img,
            "outside the places allowed",
        );
        refused(
            qnbd(d, &["convert", "-O", "raw", img, "out.raw"]),
            img,
            "outside the places allowed",
        );
        let e = serve_starts(d, &["-f", "qcow2", img]).expect_err("serve started");
        assert!(e.contains("outside the places allowed"), "{img}: {e}");
        // the name is still shown
        let (rc, o, e) = qnbd(d, &["info", img]);
        assert_eq!(rc, 0, "{e}");
        assert!(o.contains("backing file: "), "{o}");
    }
    // allowed explicitly: a directory, or exactly one file
    let top = d.display().to_string();
    for allow in [top.clone(), format!("{top}/outside.qcow2")] {
        for img in ["in/dotdot.qcow2", "in/via-link.qcow2"] {
            let (rc, o, e) = qnbd(
                d,
                &["info", "--backing-chain", "--allow-backing", &allow, img],
            );
            assert_eq!(rc, 0, "{img} with {allow}: {e}");
            assert_eq!(o.matches("image: ").count(), 2, "{o}");
            serve_starts(d, &["-f", "qcow2", "--allow-backing", &allow, img]).unwrap();
        }
    }
    // allowing one file does not allow its neighbours
    refused(
        qnbd(
            d,
            &[
                "info",
                "--backing-chain",
                "--allow-backing",
                &format!("{top}/outside.qcow2"),
                "in/abs.qcow2",
            ],
        ),
        "abs with one file allowed",
        "outside the places allowed",
    );
    // the image's own directory is the default
    assert_eq!(qnbd(d, &["info", "--backing-chain", "in/local.qcow2"]).0, 0);
    serve_starts(d, &["-f", "qcow2", "in/local.qcow2"]).unwrap();
    let e = serve_starts(
        d,
        &["-f", "qcow2", "--allow-backing", "none", "in/local.qcow2"],
    )
    .expect_err("serve started with --allow-backing none");
    assert!(e.contains("not allowed"), "{e}");
}

/// Case 46: a data file named `/etc/hostname`: `info` prints it without opening it (a FIFO
/// named the same way would block any open), every command that reads data refuses it.
#[test]
fn data_file_on_a_host_path_is_printed_not_opened() {
    if !tools() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    // both names are 13 bytes: the extension is patched in place
    sh(
        "qemu-img create -q -f qcow2 -o data_file=abcdefghij.dd host.qcow2 1M
         qemu-img create -q -f qcow2 -o data_file=abcdefghij.dd fifo.qcow2 1M
         rm abcdefghij.dd
         mkfifo fifo-data.fff",
        d,
    );
    for (img, name) in [
        ("host.qcow2", "/etc/hostname"),
        ("fifo.qcow2", "fifo-data.fff"),
    ] {
        let p = d.join(img);
        let mut b = std::fs::read(&p).unwrap();
        let at = b
            .windows(13)
            .position(|w| w == b"abcdefghij.dd")
            .expect("data file name in the header");
        b[at..at + 13].copy_from_slice(name.as_bytes());
        std::fs::write(&p, b).unwrap();
    }
    for img in ["host.qcow2", "fifo.qcow2"] {
        let (rc, o, e) = qnbd(d, &["info", "--output=json", img]);
        assert_eq!(rc, 0, "{e}");
        let (qrc, qo, qe) = run(d, "qemu-img", &["info", "--output=json", "-U", img]);
        assert_eq!(qrc, 0, "{qe}");
        let want = if img == "host.qcow2" {
            "\"data-file\": \"/etc/hostname\""
        } else {
            "\"data-file\": \"fifo-data.fff\""
        };
        assert!(o.contains(want), "{o}");
        assert!(qo.contains(want), "{qo}");
    }
    let e = serve_starts(d, &["-f", "qcow2", "host.qcow2"]).expect_err("serve started");
    assert!(e.contains("outside the places allowed"), "{e}");
    refused(
        qnbd(d, &["convert", "-O", "raw", "host.qcow2", "out.raw"]),
        "convert",
        "outside the places allowed",
    );
}

/// Case 47: `json:`, `nbd:` and `file:` strings inside an image are plain local names.
#[test]
fn protocol_strings_in_images_are_plain_file_names() {
    if !tools() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    sh(
        r#"qemu-img create -q -f qcow2 -u -F raw \
             -b 'json:{"driver":"raw","file":{"driver":"file","filename":"/etc/hostname"}}' j.qcow2 1M
         qemu-img create -q -f qcow2 -u -F raw -b 'file:/etc/hostname' f.qcow2 1M
         qemu-img create -q -f qcow2 -u -F raw -b 'nbd:localhost:10809' n.qcow2 1M
         truncate -s 1M 'nbd:localhost:10809'
         head -c 65536 /dev/zero | tr '\0' 'w' | dd of='nbd:localhost:10809' conv=notrunc 2>/dev/null"#,
        d,
    );
    for img in ["j.qcow2", "f.qcow2"] {
        refused(
            qnbd(d, &["info", "--backing-chain", img]),
            img,
            "No such file or directory",
        );
        refused(
            qnbd(d, &["info", "--backing-chain", "--allow-backing", "/", img]),
            img,
            "No such file or directory",
        );
    }
    // a local file with the "nbd:" name is what gets opened
    let (rc, o, e) = qnbd(d, &["info", "--backing-chain", "n.qcow2"]);
    assert_eq!(rc, 0, "{e}");
    assert!(o.contains("image: nbd:localhost:10809"), "{o}");
    let (rc, o, e) = qnbd(d, &["map", "--output=json", "n.qcow2"]);
    assert_eq!(rc, 0, "{e}");
    assert!(o.contains("\"depth\": 1"), "{o}");
}

/// Case 48: a raw disk whose first bytes are a qcow2 header naming `/etc/hostname` stays raw
/// with `-f raw`: the whole file is the disk, nothing it names is opened.
#[test]
fn raw_disk_with_a_qcow2_header_stays_raw() {
    if !tools() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    sh(
        "qemu-img create -q -f qcow2 -u -b /etc/hostname -F raw hdr.qcow2 1M
         cp hdr.qcow2 disk.raw",
        d,
    );
    let (rc, o, e) = qnbd(d, &["info", "-f", "raw", "disk.raw"]);
    assert_eq!(rc, 0, "{e}");
    let (_, qo, _) = run(d, "qemu-img", &["info", "-f", "raw", "disk.raw"]);
    assert!(
        o.contains("file format: raw") && qo.contains("file format: raw"),
        "{o}"
    );
    assert!(!o.contains("backing file"), "{o}");
    // served raw: the bytes are the file's own
    let sock = d.join("raw.sock");
    let mut child = Command::new(qcow2_spec_tests::qnbd_bin())
        .args(["serve", "-r", "-f", "raw", "-k"])
        .arg(&sock)
        .arg(d.join("disk.raw"))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !sock.exists() && t.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let (rc, _, e) = run(
        d,
        "nbdcopy",
        &[
            &format!("nbd+unix:///?socket={}", sock.display()),
            "copy.raw",
        ],
    );
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(rc, 0, "{e}");
    let disk = std::fs::read(d.join("disk.raw")).unwrap();
    let copy = std::fs::read(d.join("copy.raw")).unwrap();
    assert_eq!(copy.len(), disk.len().div_ceil(512) * 512);
    assert_eq!(&copy[..disk.len()], &disk[..]);
    // probed (no -f) it is qcow2, and its backing file is refused
    refused(
        qnbd(d, &["info", "--backing-chain", "disk.raw"]),
        "probed",
        "outside the places allowed",
    );
}

/// Case 49: the declared backing format wins over what the backing file looks like, as in
/// QEMU: a qcow2 file declared raw reads as raw bytes; a raw file declared qcow2 fails.
#[test]
fn declared_backing_format_is_used_never_probed() {
    if !tools() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    sh(
        "qemu-img create -q -f qcow2 base.qcow2 1M
         qemu-io -f qcow2 -c 'write -P 0x33 0 64k' base.qcow2 >/dev/null
         qemu-img create -q -f qcow2 -u -b base.qcow2 -F raw as-raw.qcow2 1M
         qemu-img create -q -f raw base.raw 1M
         qemu-img create -q -f qcow2 -u -b base.raw -F qcow2 as-qcow2.qcow2 1M
         qemu-img convert -O raw as-raw.qcow2 qemu.raw",
        d,
    );
    let (rc, _, e) = qnbd(d, &["convert", "-O", "raw", "as-raw.qcow2", "qnbd.raw"]);
    assert_eq!(rc, 0, "{e}");
    let q = std::fs::read(d.join("qemu.raw")).unwrap();
    let n = std::fs::read(d.join("qnbd.raw")).unwrap();
    assert!(
        q == n,
        "qnbd and qemu-img read the mislabelled backing file differently"
    );
    assert_eq!(&n[..4], b"QFI\xfb", "the backing file was not read as raw");
    let (qrc, _, _) = run(
        d,
        "qemu-img",
        &["info", "--backing-chain", "as-qcow2.qcow2"],
    );
    assert_ne!(qrc, 0);
    assert_ne!(qnbd(d, &["info", "--backing-chain", "as-qcow2.qcow2"]).0, 0);
    assert!(serve_starts(d, &["-f", "qcow2", "as-qcow2.qcow2"]).is_err());
}
