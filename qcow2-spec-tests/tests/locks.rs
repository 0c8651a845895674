//! Image locks against QEMU's: qnbd takes the same OFD lock bytes as qemu-nbd / qemu-img on
//! every file of a chain (read from `/proc/locks`), and every command refuses or accepts an
//! image that a QEMU tool or another qnbd holds exactly when QEMU's own tool does, with QEMU's
//! words and exit code. A refused open changes nothing: the image's bytes are compared.

use qcow2_spec_tests::{
    nbd_greets, qnbd_bin, require_tools, scratch_dir, sha256_file, tool_ok, NbdServer,
};
use std::collections::BTreeSet;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn tools() -> bool {
    require_tools("image locks", &["qemu-img", "qemu-io", "qemu-nbd"])
}

/// The OFD lock bytes held on `file` by anyone (from `/proc/locks`, matched by device and
/// inode), as a sorted list of byte offsets.
fn lock_bytes(file: &Path) -> Vec<u64> {
    let m = std::fs::metadata(file).unwrap();
    let dev = m.dev();
    let (major, minor) = (
        ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff),
        (dev & 0xff) | ((dev >> 12) & !0xff),
    );
    let id = format!("{major:02x}:{minor:02x}:{}", m.ino());
    let text = std::fs::read_to_string("/proc/locks").unwrap();
    let mut bytes = BTreeSet::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        // "N: OFDLCK ADVISORY READ -1 MAJ:MIN:INO START END"
        let Some(pos) = f.iter().position(|x| *x == id) else {
            continue;
        };
        let (Some(a), Some(b)) = (f.get(pos + 1), f.get(pos + 2)) else {
            continue;
        };
        let (a, b): (u64, u64) = (a.parse().unwrap(), b.parse().unwrap_or(u64::MAX));
        bytes.extend(a..=b.min(a + 1000));
    }
    bytes.into_iter().collect()
}

/// A chain of nobody's making: top.qcow2 over mid.qcow2 over base.raw, a raw image, and a
/// qcow2 image with an external data file.
fn images(dir: &Path) {
    let ok = |args: &[&str]| tool_ok("qemu-img", dir, args);
    ok(&["create", "-q", "-f", "raw", "base.raw", "4M"]);
    ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        "mid.qcow2",
    ]);
    ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
    ]);
    ok(&["create", "-q", "-f", "raw", "r.raw", "4M"]);
    ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "data_file=d.data",
        "dq.qcow2",
        "4M",
    ]);
    tool_ok(
        "qemu-io",
        dir,
        ["-f", "qcow2", "-c", "write -P 7 0 1M", "top.qcow2"],
    );
}

const FILES: &[&str] = &[
    "top.qcow2",
    "mid.qcow2",
    "base.raw",
    "r.raw",
    "dq.qcow2",
    "d.data",
];

fn all_locks(dir: &Path) -> Vec<(String, Vec<u64>)> {
    FILES
        .iter()
        .map(|f| (f.to_string(), lock_bytes(&dir.join(f))))
        .collect()
}

#[test]
fn serve_takes_the_lock_bytes_qemu_nbd_takes() {
    if !tools() {
        return;
    }
    let d = scratch_dir();
    let dir = d.path();
    images(dir);
    let cases: &[&[&str]] = &[
        &["-f", "qcow2", "top.qcow2"],
        &["-r", "-f", "qcow2", "top.qcow2"],
        &["-s", "-f", "qcow2", "top.qcow2"],
        &["-e", "3", "-f", "qcow2", "top.qcow2"],
        &["-f", "raw", "r.raw"],
        &["-r", "-f", "raw", "r.raw"],
        &["-f", "qcow2", "dq.qcow2"],
        &["-r", "-f", "qcow2", "dq.qcow2"],
        &["-f", "raw", "base.raw"],
    ];
    let mut problems = Vec::new();
    for args in cases {
        let q = NbdServer::qemu_nbd(dir, "q", args);
        let theirs = all_locks(dir);
        // killed, not stopped: only its locks matter here, and a qemu-nbd that gets SIGTERM
        // just after a probing connection can take long to wind down under load
        drop(q);
        assert!(
            all_locks(dir).iter().all(|(_, b)| b.is_empty()),
            "locks left after qemu-nbd"
        );
        let o = NbdServer::qnbd(dir, "o", args);
        let ours = all_locks(dir);
        o.stop();
        if theirs != ours {
            problems.push(format!(
                "{args:?}:\n qemu-nbd {theirs:?}\n qnbd     {ours:?}"
            ));
        }
        assert!(
            theirs.iter().any(|(_, b)| !b.is_empty()),
            "{args:?}: qemu-nbd took no lock at all"
        );
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Something holding an image open: a server or an interactive qemu-io.
enum Holder {
    Server(NbdServer),
    Io(Child),
}

impl Holder {
    fn start(dir: &Path, who: &str, args: &[&str], file: &Path) -> Holder {
        let h = match who {
            "qemu-nbd" => Holder::Server(NbdServer::qemu_nbd(dir, "h", args)),
            "qnbd" => Holder::Server(NbdServer::qnbd(dir, "h", args)),
            _ => {
                let child = Command::new("qemu-io")
                    .current_dir(dir)
                    .args(args)
                    .stdin(Stdio::piped())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap();
                Holder::Io(child)
            }
        };
        let t = Instant::now();
        while lock_bytes(file).is_empty() {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "{who} {args:?} took no lock"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        h
    }

    fn stop(self) {
        match self {
            Holder::Server(s) => s.stop(),
            Holder::Io(mut c) => {
                if let Some(mut i) = c.stdin.take() {
                    let _ = i.write_all(b"quit\n");
                }
                let _ = c.wait();
            }
        }
    }
}

/// How a contender ended: exit code (`None`: still serving after it listened) and its stderr
/// without the tool's name.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    code: Option<i32>,
    stderr: String,
}

/// A message as QEMU words it (see `qemu_words`).
fn strip_tool(s: &str) -> String {
    qcow2_spec_tests::qemu_words(s)
}

fn run(dir: &Path, program: &Path, args: &[&str]) -> Outcome {
    let out = Command::new(program)
        .current_dir(dir)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    Outcome {
        code: out.status.code(),
        stderr: strip_tool(&String::from_utf8_lossy(&out.stderr)),
    }
}

/// Start a server on a socket of its own: `None` if it listens (then it is stopped), else its
/// exit code and stderr.
fn serve(dir: &Path, program: &Path, args: &[&str]) -> Outcome {
    let sock = dir.join("contender.sock");
    let _ = std::fs::remove_file(&sock);
    let mut child = Command::new(program)
        .current_dir(dir)
        .args(args)
        .arg("-k")
        .arg(&sock)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            return Outcome {
                code: st.code(),
                stderr: strip_tool(&err),
            };
        }
        if nbd_greets(&sock, Duration::from_secs(5)) {
            let _ = child.kill();
            let _ = child.wait();
            return Outcome {
                code: None,
                stderr: String::new(),
            };
        }
        assert!(t.elapsed() < Duration::from_secs(20), "{args:?} hung");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// One contender: QEMU's command and qnbd's, same image, same options.
struct Contender {
    label: &'static str,
    qemu: (&'static str, Vec<&'static str>),
    ours: Vec<&'static str>,
    server: bool,
}

fn contenders(img: &'static str, fmt: &'static str) -> Vec<Contender> {
    let img_cmd = |label, args: Vec<&'static str>| Contender {
        label,
        qemu: ("qemu-img", args.clone()),
        ours: args,
        server: false,
    };
    let srv = |label, args: Vec<&'static str>| {
        let mut ours = vec!["serve"];
        ours.extend(args.iter().copied());
        Contender {
            label,
            qemu: ("qemu-nbd", args),
            ours,
            server: true,
        }
    };
    vec![
        srv("serve", vec!["-f", fmt, img]),
        srv("serve -r", vec!["-r", "-f", fmt, img]),
        srv("serve -s", vec!["-s", "-f", fmt, img]),
        img_cmd("info", vec!["info", "-f", fmt, img]),
        img_cmd("info -U", vec!["info", "-U", "-f", fmt, img]),
        img_cmd("map", vec!["map", "-f", fmt, img]),
        img_cmd("map -U", vec!["map", "-U", "-f", fmt, img]),
        img_cmd("check", vec!["check", "-f", fmt, img]),
        img_cmd("check -U", vec!["check", "-U", "-f", fmt, img]),
        img_cmd(
            "check -U -r all",
            vec!["check", "-U", "-r", "all", "-f", fmt, img],
        ),
        img_cmd(
            "convert",
            vec!["convert", "-f", fmt, "-O", "raw", img, "out.raw"],
        ),
        img_cmd(
            "convert -U",
            vec!["convert", "-U", "-f", fmt, "-O", "raw", img, "out.raw"],
        ),
        img_cmd(
            "bench -U -w",
            vec!["bench", "-U", "-w", "-c", "1", "-f", fmt, img],
        ),
        img_cmd("resize", vec!["resize", "-f", fmt, img, "+1M"]),
        img_cmd(
            "create an overlay",
            vec!["create", "-f", "qcow2", "-b", img, "-F", fmt, "ov.qcow2"],
        ),
        // last: where QEMU lets these in, the image is gone or rewritten
        img_cmd(
            "convert onto it",
            vec!["convert", "-O", "raw", "-f", "raw", "r2.raw", img],
        ),
        img_cmd("create over it", vec!["create", "-f", "qcow2", img, "1M"]),
    ]
}

/// Where qnbd refuses what QEMU lets through (README, "Image locks"): a file someone else
/// has open is never emptied. `(holder, contender, QEMU's exit code)`: qemu-img create over a
/// raw image a writer has open truncates it, fails when reopening it as qcow2 and deletes it;
/// qemu-img convert onto it rewrites it under the writer.
const DIVERGENCES: &[(&str, &str, i32)] = &[
    ("qemu-io", "create over it", 1),
    ("qemu-io", "convert onto it", 0),
];

/// Contenders that change the image when they are let in.
const WRITERS: &[&str] = &["resize", "create over it", "convert onto it"];

fn contend(dir: &Path, c: &Contender, qnbd: &Path) -> (Outcome, Outcome) {
    let _ = std::fs::remove_file(dir.join("ov.qcow2"));
    let qemu = if c.server {
        serve(dir, Path::new(c.qemu.0), &c.qemu.1)
    } else {
        run(dir, Path::new(c.qemu.0), &c.qemu.1)
    };
    let _ = std::fs::remove_file(dir.join("ov.qcow2"));
    let ours = if c.server {
        serve(dir, qnbd, &c.ours)
    } else {
        run(dir, qnbd, &c.ours)
    };
    (qemu, ours)
}

/// Every contender against every holder, QEMU's tools and qnbd side by side. Only refusals
/// are compared word for word (a command that succeeds prints its own results, compared by
/// the tests of that command).
fn matrix(img: &'static str, fmt: &'static str, holders: &[(&str, Vec<&str>)]) {
    let d = scratch_dir();
    let dir = d.path();
    images(dir);
    tool_ok(
        "qemu-img",
        dir,
        ["create", "-q", "-f", "raw", "r2.raw", "1M"],
    );
    let file: PathBuf = dir.join(img);
    let before = sha256_file(&file).unwrap();
    let qnbd = qnbd_bin();
    let mut problems = Vec::new();
    let mut refused = 0;
    let mut by_holder: Vec<Vec<Option<i32>>> = Vec::new();
    let mut before = before;
    for (who, args) in holders {
        let h = Holder::start(dir, who, args, &file);
        let mut codes = Vec::new();
        // QEMU lets some writers in beside some holders (two writers on a raw file): then
        // the image may change, and the check below is not for this holder
        let mut wrote = false;
        for c in contenders(img, fmt) {
            let divergence = DIVERGENCES
                .iter()
                .find(|(h, l, _)| *h == *who && *l == c.label && fmt == "raw");
            if let Some((_, _, qemu_code)) = divergence {
                let pre = sha256_file(&file).unwrap();
                let o = run(dir, qnbd, &c.ours);
                let intact = sha256_file(&file).ok() == Some(pre);
                let q = run(dir, Path::new(c.qemu.0), &c.qemu.1);
                if o.code != Some(1) || !intact || q.code != Some(*qemu_code) {
                    problems.push(format!(
                        "holder {who} {args:?}, contender {} (a documented divergence): \
                         qnbd {o:?}, image intact: {intact}; QEMU {q:?}",
                        c.label
                    ));
                }
                wrote = true;
                codes.push(o.code);
                continue;
            }
            let (q, o) = contend(dir, &c, qnbd);
            if WRITERS.contains(&c.label) && (q.code == Some(0) || o.code == Some(0)) {
                wrote = true;
            }
            let refusal = q.code != Some(0) && q.code.is_some();
            if refusal {
                refused += 1;
            }
            let same = if refusal { q == o } else { q.code == o.code };
            if !same {
                problems.push(format!(
                    "holder {who} {args:?}, contender {}:\n QEMU {q:?}\n qnbd {o:?}",
                    c.label
                ));
            }
            codes.push(o.code);
        }
        h.stop();
        by_holder.push(codes);
        if !file.exists() {
            // QEMU deleted it (see DIVERGENCES): a fresh one for the next holder
            tool_ok("qemu-img", dir, ["create", "-q", "-f", fmt, img, "4M"]);
        }
        let now = sha256_file(&file).unwrap();
        if !wrote && now != before {
            problems.push(format!(
                "holder {who} {args:?}: {img} changed under a refused contender"
            ));
        }
        before = now;
    }
    // a qnbd holder is refused and shared exactly like the QEMU holder it stands for
    for (i, (who, args)) in holders.iter().enumerate() {
        if *who != "qnbd" {
            continue;
        }
        let twin = holders
            .iter()
            .position(|(w, a)| *w == "qemu-nbd" && a == args)
            .expect("a qemu-nbd twin for every qnbd holder");
        if by_holder[i] != by_holder[twin] {
            problems.push(format!(
                "contenders against qnbd {args:?} ended {:?}, against qemu-nbd {:?}",
                by_holder[i], by_holder[twin]
            ));
        }
    }
    assert!(
        refused > 0,
        "no contender was refused: the test holds nothing"
    );
    assert!(problems.is_empty(), "{}", problems.join("\n\n"));
}

#[test]
fn a_qcow2_image_in_use_is_refused_as_qemu_refuses_it() {
    if !tools() {
        return;
    }
    matrix(
        "top.qcow2",
        "qcow2",
        &[
            ("qemu-io", vec!["-f", "qcow2", "top.qcow2"]),
            ("qemu-nbd", vec!["-f", "qcow2", "top.qcow2"]),
            ("qnbd", vec!["-f", "qcow2", "top.qcow2"]),
            ("qemu-nbd", vec!["-r", "-f", "qcow2", "top.qcow2"]),
            ("qnbd", vec!["-r", "-f", "qcow2", "top.qcow2"]),
        ],
    );
}

#[test]
fn a_raw_image_in_use_is_refused_as_qemu_refuses_it() {
    if !tools() {
        return;
    }
    matrix(
        "r.raw",
        "raw",
        &[
            ("qemu-io", vec!["-f", "raw", "r.raw"]),
            ("qemu-nbd", vec!["-f", "raw", "r.raw"]),
            ("qnbd", vec!["-f", "raw", "r.raw"]),
            ("qemu-nbd", vec!["-r", "-f", "raw", "r.raw"]),
            ("qnbd", vec!["-r", "-f", "raw", "r.raw"]),
        ],
    );
}

#[test]
fn a_backing_file_in_use_below_a_writer_is_refused_to_writers() {
    if !tools() {
        return;
    }
    // qemu-nbd / qnbd serving top.qcow2 writable hold mid.qcow2 as a reader
    matrix(
        "mid.qcow2",
        "qcow2",
        &[
            ("qemu-nbd", vec!["-f", "qcow2", "top.qcow2"]),
            ("qnbd", vec!["-f", "qcow2", "top.qcow2"]),
        ],
    );
}

#[test]
fn one_file_exported_twice_writable_is_refused() {
    if !tools() {
        return;
    }
    let d = scratch_dir();
    let dir = d.path();
    images(dir);
    let before = sha256_file(&dir.join("r.raw")).unwrap();
    std::os::unix::fs::symlink(dir.join("r.raw"), dir.join("alias.raw")).unwrap();
    let o = serve(
        dir,
        qnbd_bin(),
        &[
            "serve",
            "--export",
            "name=a,file=r.raw,format=raw,writable=on",
            "--export",
            "name=b,file=alias.raw,format=raw,writable=on",
        ],
    );
    assert_eq!(o.code, Some(1), "{o:?}");
    assert!(
        o.stderr.contains("use the same file") || o.stderr.contains("lock"),
        "{o:?}"
    );
    assert_eq!(sha256_file(&dir.join("r.raw")).unwrap(), before);
    // read-only twice is fine, as two qemu-nbd -r are
    let o = serve(
        dir,
        qnbd_bin(),
        &[
            "serve",
            "--export",
            "name=a,file=r.raw,format=raw,readonly=on",
            "--export",
            "name=b,file=alias.raw,format=raw,readonly=on",
        ],
    );
    assert_eq!(o.code, None, "{o:?}");
}
