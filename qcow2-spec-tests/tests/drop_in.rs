//! qnbd invoked as `qemu-nbd` / `qemu-img` (a symlink of that name), with the command lines
//! management tools really run, side by side with QEMU's tools on copies of the same image:
//! what clients see (`nbdinfo --json`, every metadata context's map), what writes leave behind
//! (`qemu-img compare`, `qemu-img map` of the two files, `qemu-img check` of ours), and how
//! bad command lines end (exit code and message).

use qcow2_spec_tests::{nbd_greets, qnbd_bin, require_tools, scratch_dir, tool, tool_ok};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn tools() -> bool {
    require_tools(
        "qnbd as qemu-nbd / qemu-img",
        &["qemu-img", "qemu-io", "qemu-nbd", "nbdinfo"],
    )
}

/// A directory holding `qemu-nbd` and `qemu-img` links to the qnbd binary.
fn link_dir(root: &Path) -> PathBuf {
    let bin = root.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    for name in ["qemu-nbd", "qemu-img"] {
        std::os::unix::fs::symlink(qnbd_bin(), bin.join(name)).unwrap();
    }
    bin
}

/// A qcow2 image nobody here made: data, a zeroed cluster, a backing-less layout from
/// qemu-io, and a persistent bitmap `cpt` that saw some of the writes.
fn make_disk(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    tool_ok(
        "qemu-img",
        dir,
        ["create", "-q", "-f", "qcow2", "disk.qcow2", "16M"],
    );
    let io = |c: &str| tool_ok("qemu-io", dir, ["-f", "qcow2", "-c", c, "disk.qcow2"]);
    io("write -P 0x11 0 1M");
    io("write -z 4M 512k");
    tool_ok(
        "qemu-img",
        dir,
        ["bitmap", "--add", "-f", "qcow2", "disk.qcow2", "cpt"],
    );
    io("write -P 0x22 8M 192k");
    io("write -P 0x33 12M 64k");
}

/// A server started from one command line; stopped (by pid) on drop.
struct Server {
    child: Option<Child>,
    pid: u32,
    uri: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status();
        let t = Instant::now();
        if let Some(c) = self.child.as_mut() {
            while t.elapsed() < Duration::from_secs(20) {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = c.kill();
            let _ = c.wait();
        } else {
            // forked: wait until the pid is gone
            while t.elapsed() < Duration::from_secs(20)
                && Path::new(&format!("/proc/{}", self.pid)).exists()
            {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// Start `program` with `args` in `dir` (`{SOCK}` and `{PID}` replaced): the server, or how
/// it ended when it did not start (exit code, stderr without the program name).
fn start(
    dir: &Path,
    program: &Path,
    args: &[&str],
    export: &str,
) -> Result<Server, (Option<i32>, String)> {
    // names of their own: two servers started in one directory must not share a socket
    static SERIAL: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let sock = dir.join(format!("s{n}.sock"));
    let pidf = dir.join(format!("s{n}.pid"));
    let _ = std::fs::remove_file(&sock);
    let _ = std::fs::remove_file(&pidf);
    let args: Vec<String> = args
        .iter()
        .map(|a| {
            a.replace("{SOCK}", sock.to_str().unwrap())
                .replace("{PID}", pidf.to_str().unwrap())
        })
        .collect();
    let fork = args.iter().any(|a| a == "--fork");
    let errf = dir.join(format!("s{n}.err"));
    let mut child = Command::new(program)
        .current_dir(dir)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&errf).unwrap())
        .spawn()
        .unwrap();
    let err = |code| {
        let text = std::fs::read_to_string(&errf).unwrap_or_default();
        let text = text
            .lines()
            .map(|l| {
                l.strip_prefix("qemu-nbd: ")
                    .or_else(|| l.strip_prefix("qemu-img: "))
                    .unwrap_or(l)
            })
            .collect::<Vec<_>>()
            .join("\n");
        (code, text)
    };
    let uri = format!("nbd+unix:///{export}?socket={}", sock.display());
    let t = Instant::now();
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            if !fork || !st.success() {
                return Err(err(st.code()));
            }
            // the parent of a forked server exits once the child serves
            let pid: u32 = std::fs::read_to_string(&pidf)
                .unwrap_or_default()
                .trim()
                .parse()
                .unwrap_or_else(|_| panic!("{program:?} {args:?}: no pid file after --fork"));
            assert!(
                nbd_greets(&sock, Duration::from_secs(5)),
                "{program:?} {args:?}: forked server not serving"
            );
            return Ok(Server {
                child: None,
                pid,
                uri,
            });
        }
        if !fork && nbd_greets(&sock, Duration::from_secs(5)) {
            let pid = child.id();
            return Ok(Server {
                child: Some(child),
                pid,
                uri,
            });
        }
        assert!(t.elapsed() < Duration::from_secs(20), "{args:?}: no start");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn nbdinfo(args: &[&str], uri: &str) -> String {
    let mut a: Vec<&str> = args.to_vec();
    a.push(uri);
    let r = tool("nbdinfo", Path::new("."), &a);
    let out = r.stdout_text().replace(uri, "URI");
    format!("exit {:?}\n{out}{}", r.code, r.stderr)
}

/// A real tool's command line: what it runs, the export name clients use, whether it writes.
struct Case {
    tool: &'static str,
    args: &'static [&'static str],
    export: &'static str,
    writes: bool,
}

const CASES: &[Case] = &[
    Case {
        tool: "virtnbdbackup (offline backup)",
        args: &[
            "-r",
            "--format",
            "qcow2",
            "-x",
            "sda",
            "disk.qcow2",
            "-k",
            "{SOCK}",
            "-t",
            "-e 2",
            "--fork",
            "--detect-zeroes=on",
            "--pid-file",
            "{PID}",
            "--bitmap=cpt",
        ],
        export: "sda",
        writes: false,
    },
    Case {
        tool: "vdsm (image transfer, writable)",
        args: &[
            "--socket",
            "{SOCK}",
            "--persistent",
            "--shared=8",
            "--export-name=",
            "--cache=none",
            "--aio=native",
            "--allocation-depth",
            "--discard=unmap",
            "--detect-zeroes=unmap",
            "-f",
            "qcow2",
            "disk.qcow2",
        ],
        export: "",
        writes: true,
    },
    Case {
        tool: "vdsm (image transfer with a bitmap, read-only)",
        args: &[
            "--socket",
            "{SOCK}",
            "--persistent",
            "--shared=8",
            "--export-name=",
            "--cache=none",
            "--aio=native",
            "--allocation-depth",
            "--read-only",
            "--bitmap",
            "cpt",
            "-f",
            "qcow2",
            "disk.qcow2",
        ],
        export: "",
        writes: false,
    },
    Case {
        tool: "virt-v2v (output)",
        args: &[
            "-t",
            "--shared=0",
            "--discard=unmap",
            "--pid-file",
            "{PID}",
            "--socket",
            "{SOCK}",
            "-f",
            "qcow2",
            "disk.qcow2",
        ],
        export: "",
        writes: true,
    },
    Case {
        tool: "virt-v2v (input, throw-away overlay)",
        args: &[
            "-t",
            "--shared=0",
            "--discard=unmap",
            "--pid-file",
            "{PID}",
            "--socket",
            "{SOCK}",
            "-s",
            "-f",
            "qcow2",
            "disk.qcow2",
        ],
        export: "",
        writes: true,
    },
    Case {
        tool: "OpenNebula (backup)",
        args: &[
            "-r",
            "-k",
            "{SOCK}",
            "-f",
            "qcow2",
            "-t",
            "-B",
            "cpt",
            "disk.qcow2",
        ],
        export: "",
        writes: false,
    },
];

/// Writes a copy tool or guest would send: data, explicit zeroes, zero-filled data (what
/// zero detection turns into zero writes), a discard.
const WRITES: &[&str] = &[
    "write -P 0x44 64k 128k",
    "write -z 8M 64k",
    "write -P 0 12M 64k",
    "write -P 0 2M 1M",
    "discard 0 64k",
    "flush",
];

/// `qemu-img map --output=json` without host offsets (where each allocator put a cluster),
/// adjacent runs that then agree merged: the guest-visible allocation.
fn guest_layout(json: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(json).unwrap_or_default();
    let mut out: Vec<serde_json::Value> = Vec::new();
    for e in v.as_array().into_iter().flatten() {
        let mut e = e.clone();
        if let Some(o) = e.as_object_mut() {
            o.remove("offset");
        }
        let key = |x: &serde_json::Value| {
            let mut x = x.clone();
            if let Some(o) = x.as_object_mut() {
                o.remove("start");
                o.remove("length");
            }
            x
        };
        if let Some(last) = out.last_mut() {
            if key(last) == key(&e) {
                let len = last["length"].as_u64().unwrap_or(0) + e["length"].as_u64().unwrap_or(0);
                last["length"] = len.into();
                continue;
            }
        }
        out.push(e);
    }
    serde_json::to_string_pretty(&out).unwrap()
}

#[test]
fn real_command_lines_serve_what_qemu_nbd_serves() {
    if !tools() {
        return;
    }
    let d = scratch_dir();
    let root = d.path();
    let bin = link_dir(root);
    let mut problems = Vec::new();
    for (i, c) in CASES.iter().enumerate() {
        let (q, o) = (root.join(format!("q{i}")), root.join(format!("o{i}")));
        make_disk(&q);
        std::fs::create_dir_all(&o).unwrap();
        std::fs::copy(q.join("disk.qcow2"), o.join("disk.qcow2")).unwrap();
        let theirs = start(&q, Path::new("qemu-nbd"), c.args, c.export);
        let ours = start(&o, &bin.join("qemu-nbd"), c.args, c.export);
        let (theirs, ours) = match (theirs, ours) {
            (Ok(t), Ok(o)) => (t, o),
            (Err(t), Err(o)) => {
                if t != o {
                    problems.push(format!(
                        "{}: refusals differ:\n QEMU {t:?}\n qnbd {o:?}",
                        c.tool
                    ));
                }
                continue;
            }
            (t, o) => {
                problems.push(format!(
                    "{}: qemu-nbd {:?}, qnbd {:?}",
                    c.tool,
                    t.as_ref().map(|_| "serves").map_err(|e| e.clone()),
                    o.as_ref().map(|_| "serves").map_err(|e| e.clone())
                ));
                continue;
            }
        };
        let mut same = |what: &str, a: String, b: String| {
            if a != b {
                problems.push(format!(
                    "{}: {what}:\n--- qemu-nbd\n{a}\n--- qnbd\n{b}",
                    c.tool
                ));
            }
        };
        same(
            "nbdinfo --json",
            nbdinfo(&["--json", "--no-content"], &theirs.uri),
            nbdinfo(&["--json", "--no-content"], &ours.uri),
        );
        for ctx in [
            "base:allocation",
            "qemu:allocation-depth",
            "qemu:dirty-bitmap:cpt",
        ] {
            let arg = format!("--map={ctx}");
            same(
                &format!("nbdinfo {arg}"),
                nbdinfo(&["--json", &arg], &theirs.uri),
                nbdinfo(&["--json", &arg], &ours.uri),
            );
        }
        if c.writes {
            for w in WRITES {
                let r = |u: &str| {
                    let r = tool("qemu-io", Path::new("."), ["-f", "raw", "-c", w, u]);
                    format!("exit {:?} {}", r.code, r.stderr)
                };
                same(&format!("qemu-io {w}"), r(&theirs.uri), r(&ours.uri));
            }
            same(
                "nbdinfo --map after the writes",
                nbdinfo(&["--json", "--map"], &theirs.uri),
                nbdinfo(&["--json", "--map"], &ours.uri),
            );
        }
        drop(theirs);
        drop(ours);
        let (qf, of) = (q.join("disk.qcow2"), o.join("disk.qcow2"));
        let cmp = tool(
            "qemu-img",
            Path::new("."),
            [
                "compare".as_ref(),
                "-f".as_ref(),
                "qcow2".as_ref(),
                "-F".as_ref(),
                "qcow2".as_ref(),
                qf.as_os_str(),
                of.as_os_str(),
            ],
        );
        same(
            "qemu-img compare of the two files",
            "Some(0)".into(),
            format!("{:?}", cmp.code),
        );
        let map = |f: &Path| {
            guest_layout(
                &tool(
                    "qemu-img",
                    Path::new("."),
                    ["map".as_ref(), "--output=json".as_ref(), f.as_os_str()],
                )
                .stdout_text(),
            )
        };
        same("qemu-img map of the two files", map(&qf), map(&of));
        let (code, out) = qcow2_spec_tests::qemu_img_check(&o, &of);
        same(
            "qemu-img check of ours",
            "exit 0".into(),
            format!("exit {code}"),
        );
        if code != 0 {
            problems.push(format!("{}: qemu-img check:\n{out}", c.tool));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n\n"));
}

/// Option grammar as getopt_long reads it, and bad command lines: each ends like qemu-nbd's.
#[test]
fn command_line_grammar_and_refusals_match_qemu_nbd() {
    if !tools() {
        return;
    }
    let d = scratch_dir();
    let root = d.path();
    let bin = link_dir(root);
    let q = root.join("q");
    make_disk(&q);
    let lines: &[&[&str]] = &[
        &["-r", "-k", "{SOCK}", "-e2", "-f", "qcow2", "disk.qcow2"],
        &[
            "-r",
            "-k",
            "{SOCK}",
            "--shared",
            "2",
            "disk.qcow2",
            "-f",
            "qcow2",
        ],
        &[
            "disk.qcow2",
            "-r",
            "-k",
            "{SOCK}",
            "--share=3",
            "--form=qcow2",
        ],
        &["-rk", "{SOCK}", "disk.qcow2"],
        &["-r", "-k", "{SOCK}", "-e", " 0x10", "disk.qcow2"],
        &["-r", "-k", "{SOCK}", "-e", "2x", "disk.qcow2"],
        &["-r", "-k", "{SOCK}", "--detect-zeroes=bad", "disk.qcow2"],
        &["-k", "{SOCK}", "--detect-zeroes=unmap", "disk.qcow2"],
        &["-k", "{SOCK}", "--discard=bad", "disk.qcow2"],
        &["-k", "{SOCK}", "--aio=native", "disk.qcow2"],
        &["-r", "-k", "{SOCK}", "missing.qcow2"],
        &["-r", "-k", "{SOCK}"],
        &[],
        &["-r", "-k", "{SOCK}", "disk.qcow2", "extra"],
        &["-r", "-k", "{SOCK}", "--bogus", "disk.qcow2"],
        &["-r", "-k", "{SOCK}", "-Z", "disk.qcow2"],
    ];
    let mut problems = Vec::new();
    for args in lines {
        let theirs = start(&q, Path::new("qemu-nbd"), args, "").map(|_| ());
        let ours = start(&q, &bin.join("qemu-nbd"), args, "").map(|_| ());
        // both serving is equal; both refusing must say the same thing
        let equal = match (&theirs, &ours) {
            (Ok(()), Ok(())) => true,
            (Err((a, x)), Err((b, y))) => a == b && x == y,
            _ => false,
        };
        if !equal {
            problems.push(format!(
                "{args:?}:\n qemu-nbd {theirs:?}\n qnbd     {ours:?}"
            ));
        }
    }
    // the version line tools parse
    let v = tool(bin.join("qemu-nbd").to_str().unwrap(), root, ["--version"]);
    assert!(
        v.success() && v.stdout_text().starts_with("qemu-nbd 10."),
        "{}",
        v.outcome()
    );
    let v = tool(bin.join("qemu-img").to_str().unwrap(), root, ["--version"]);
    assert!(
        v.success() && v.stdout_text().starts_with("qemu-img version 10."),
        "{}",
        v.outcome()
    );
    assert!(problems.is_empty(), "{}", problems.join("\n\n"));
}

/// qemu-img by name: the same commands as `qnbd`, QEMU's program name in messages.
#[test]
fn qemu_img_by_name_answers_as_qemu_img() {
    if !tools() {
        return;
    }
    let d = scratch_dir();
    let root = d.path();
    let bin = link_dir(root);
    let q = root.join("q");
    make_disk(&q);
    let ours = bin.join("qemu-img");
    let lines: &[&[&str]] = &[
        &["info", "--output=json", "disk.qcow2"],
        &["info", "--out=json", "-f", "qcow2", "disk.qcow2"],
        &["map", "--output=json", "disk.qcow2"],
        &["check", "disk.qcow2"],
        &["info", "missing.qcow2"],
        &["check", "-U", "-r", "all", "disk.qcow2"],
        &["bitmap", "--add", "disk.qcow2", "cpt"],
        // positional arguments missing or surplus
        &["info"],
        &["info", "disk.qcow2", "extra"],
        &["map"],
        &["check"],
        &["check", "disk.qcow2", "extra"],
        &["create"],
        &["create", "-f", "qcow2"],
        &["create", "-f", "raw", "new.raw", "1M", "extra"],
        &["convert"],
        &["convert", "disk.qcow2"],
        &["resize"],
        &["resize", "disk.qcow2"],
        &["resize", "disk.qcow2", "1M", "extra"],
        &["bench"],
        &["bench", "disk.qcow2", "extra"],
        &["bitmap"],
        &["bitmap", "disk.qcow2"],
        &["bitmap", "--add", "disk.qcow2"],
        &["bitmap", "--add", "disk.qcow2", "b", "extra"],
        &["info", "--bogus", "disk.qcow2"],
        &["nosuchcommand"],
    ];
    let mut problems = Vec::new();
    for args in lines {
        let a = tool("qemu-img", &q, *args);
        let b = tool(ours.to_str().unwrap(), &q, *args);
        if (a.code, a.stdout_text(), a.stderr.clone())
            != (b.code, b.stdout_text(), b.stderr.clone())
        {
            problems.push(format!(
                "{args:?}:\n qemu-img {}\n qnbd     {}",
                a.outcome(),
                b.outcome()
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n\n"));
}

/// A chain of nobody's making for the structured-name tests: top.qcow2 (40 MiB) over
/// mid.qcow2 (32 MiB) over base.raw (24 MiB), each layer holding some data.
fn make_chain(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let img = |a: &[&str]| tool_ok("qemu-img", dir, a);
    img(&["create", "-q", "-f", "raw", "base.raw", "24M"]);
    tool_ok(
        "qemu-io",
        dir,
        ["-f", "raw", "-c", "write -P 1 0 2M", "base.raw"],
    );
    img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        "mid.qcow2",
        "32M",
    ]);
    tool_ok(
        "qemu-io",
        dir,
        ["-f", "qcow2", "-c", "write -P 2 1M 2M", "mid.qcow2"],
    );
    img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
        "40M",
    ]);
    tool_ok(
        "qemu-io",
        dir,
        ["-f", "qcow2", "-c", "write -P 3 2M 1M", "top.qcow2"],
    );
}

/// `json:` names and `--image-opts`, as vdsm and libvirt pass them: served and inspected side
/// by side with QEMU's tools.
#[test]
fn structured_image_names_open_what_qemu_opens() {
    if !tools() {
        return;
    }
    let d = scratch_dir();
    let root = d.path();
    let bin = link_dir(root);
    let q = root.join("q");
    make_chain(&q);
    let mut problems = Vec::new();
    // served: vdsm's one-layer export (backing null), and a whole chain by json name
    let served: &[&[&str]] = &[
        &[
            "-r",
            "-k",
            "{SOCK}",
            "-A",
            "-t",
            r#"json:{"driver": "qcow2", "file": {"driver": "file", "filename": "top.qcow2"}, "backing": null}"#,
        ],
        &[
            "-r",
            "-k",
            "{SOCK}",
            "-A",
            "-t",
            r#"json:{"driver": "qcow2", "file": {"driver": "file", "filename": "top.qcow2"}}"#,
        ],
        &[
            "-r",
            "-k",
            "{SOCK}",
            "-A",
            "-t",
            "--image-opts",
            "driver=qcow2,file.driver=file,file.filename=top.qcow2,backing=",
        ],
        &[
            "-r",
            "-k",
            "{SOCK}",
            "-t",
            "--image-opts",
            "driver=raw,file.driver=file,file.filename=base.raw",
        ],
        &[
            "-r",
            "-k",
            "{SOCK}",
            "-t",
            r#"json:{"driver": "qcow2", "file": {"driver": "nbd", "path": "/x"}}"#,
        ],
    ];
    for args in served {
        let theirs = start(&q, Path::new("qemu-nbd"), args, "");
        let ours = start(&q, &bin.join("qemu-nbd"), args, "");
        match (theirs, ours) {
            (Ok(t), Ok(o)) => {
                for what in [
                    vec!["--json", "--no-content"],
                    vec!["--json", "--map=base:allocation"],
                    vec!["--json", "--map=qemu:allocation-depth"],
                ] {
                    let (a, b) = (nbdinfo(&what, &t.uri), nbdinfo(&what, &o.uri));
                    if a != b {
                        problems.push(format!("{args:?} nbdinfo {what:?}:\n{a}\n---\n{b}"));
                    }
                }
                let data = |u: &str| {
                    let r = tool("nbdcopy", Path::new("."), [u, "-"]);
                    (r.code, r.stdout)
                };
                if data(&t.uri) != data(&o.uri) {
                    problems.push(format!("{args:?}: contents differ"));
                }
            }
            (Err((a, _)), Err((b, _))) if a == b => {}
            (t, o) => problems.push(format!(
                "{args:?}: qemu-nbd {:?}, qnbd {:?}",
                t.map(|_| ()),
                o.map(|_| ())
            )),
        }
    }
    // inspected: qemu-img by name with the same names
    let ours = bin.join("qemu-img");
    let lines: &[&[&str]] = &[
        &[
            "map",
            "--output=json",
            "--image-opts",
            "driver=qcow2,file.driver=file,file.filename=top.qcow2",
        ],
        &[
            "map",
            "--output=json",
            "--image-opts",
            "driver=qcow2,file.filename=top.qcow2,backing=",
        ],
        &[
            "map",
            "--output=json",
            r#"json:{"driver":"qcow2","file":{"driver":"file","filename":"top.qcow2"},"backing":null}"#,
        ],
        &[
            "info",
            "--output=json",
            "--image-opts",
            "driver=qcow2,file.filename=mid.qcow2",
        ],
        &[
            "check",
            "--image-opts",
            "driver=qcow2,file.driver=file,file.filename=top.qcow2",
        ],
    ];
    for args in lines {
        let a = tool("qemu-img", &q, *args);
        let b = tool(ours.to_str().unwrap(), &q, *args);
        if (a.code, a.stdout_text()) != (b.code, b.stdout_text()) {
            problems.push(format!(
                "{args:?}:\n qemu-img {} {}\n qnbd     {} {}",
                a.outcome(),
                a.stdout_text(),
                b.outcome(),
                b.stdout_text()
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n\n"));
}

/// `file.locking=off` opens an image another process holds, for QEMU and for qnbd alike.
#[test]
fn locking_off_opens_an_image_in_use() {
    if !tools() {
        return;
    }
    let d = scratch_dir();
    let root = d.path();
    let bin = link_dir(root);
    let q = root.join("q");
    make_chain(&q);
    let mut holder = Command::new("qemu-io")
        .current_dir(&q)
        .args(["-f", "qcow2", "top.qcow2"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let ours = bin.join("qemu-img");
    for (args, want) in [
        (vec!["info", "top.qcow2"], Some(1)),
        (
            vec![
                "info",
                "--image-opts",
                "driver=qcow2,file.driver=file,file.filename=top.qcow2,file.locking=off",
            ],
            Some(0),
        ),
        (
            vec![
                "map",
                r#"json:{"driver":"qcow2","file":{"driver":"file","filename":"top.qcow2","locking":"off"}}"#,
            ],
            Some(0),
        ),
    ] {
        let a = tool("qemu-img", &q, &args);
        let b = tool(ours.to_str().unwrap(), &q, &args);
        assert_eq!(a.code, want, "qemu-img {args:?}: {}", a.outcome());
        assert_eq!(b.code, want, "qnbd {args:?}: {}", b.outcome());
    }
    let _ = holder.kill();
    let _ = holder.wait();
}

/// `-o N -B bm`: qemu-nbd refuses the pair (its offset node hides the bitmap: "Bitmap 'cpt' is
/// not found"); qnbd serves the bitmap shifted with the data, so its extents are qemu-nbd's
/// unshifted ones from N on, moved down by N (a deliberate difference, in the README).
#[test]
fn an_offset_export_carries_its_bitmap_shifted() {
    if !tools() {
        return;
    }
    let d = scratch_dir();
    let root = d.path();
    let bin = link_dir(root);
    make_disk(root);
    const N: u64 = 1 << 20;
    let offset = N.to_string();
    let with_offset: &[&str] = &[
        "-r",
        "-k",
        "{SOCK}",
        "-f",
        "qcow2",
        "-o",
        &offset,
        "-B",
        "cpt",
        "-t",
        "disk.qcow2",
    ];
    match start(root, Path::new("qemu-nbd"), with_offset, "") {
        Err((Some(1), e)) => assert!(e.contains("Bitmap 'cpt' is not found"), "{e}"),
        Err(e) => panic!("qemu-nbd -o -B: {e:?}"),
        Ok(_) => panic!("qemu-nbd -o -B now serves: compare the bitmaps directly"),
    }
    let whole: &[&str] = &[
        "-r",
        "-k",
        "{SOCK}",
        "-f",
        "qcow2",
        "-B",
        "cpt",
        "-t",
        "disk.qcow2",
    ];
    let extents = |uri: &str| -> Vec<(u64, u64, u64)> {
        let r = tool(
            "nbdinfo",
            Path::new("."),
            ["--json", "--map=qemu:dirty-bitmap:cpt", uri],
        );
        assert_eq!(r.code, Some(0), "nbdinfo: {}", r.stderr);
        let v: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|e| {
                let f = |k: &str| e[k].as_u64().unwrap();
                (f("offset"), f("length"), f("type"))
            })
            .collect()
    };
    let theirs = start(root, Path::new("qemu-nbd"), whole, "").unwrap();
    let q = extents(&theirs.uri);
    drop(theirs);
    let ours = start(root, &bin.join("qemu-nbd"), with_offset, "").unwrap();
    let o = extents(&ours.uri);
    drop(ours);
    // qemu-nbd's extents clipped to [N, end), shifted down by N, equal neighbours merged
    let mut want: Vec<(u64, u64, u64)> = Vec::new();
    for (off, len, ty) in q {
        let (s, e) = (off.max(N), off + len);
        if e <= s {
            continue;
        }
        match want.last_mut() {
            Some(last) if last.2 == ty && last.0 + last.1 == s - N => last.1 += e - s,
            _ => want.push((s - N, e - s, ty)),
        }
    }
    assert!(
        want.iter().any(|e| e.2 == 1),
        "the bitmap has dirty ranges past N"
    );
    assert_eq!(o, want);
}

/// What a client script sees of an export's negotiation: NBD_OPT_INFO and NBD_OPT_GO with and
/// without a block-size request (libnbd through the system python).
const NEGOTIATION: &str = r#"
import nbd, sys
for req in (True, False):
    h = nbd.NBD(); h.set_request_block_size(req); h.set_opt_mode(True)
    h.connect_uri(sys.argv[1])
    try:
        h.opt_info(); r = 'info min=%d' % h.get_block_size(nbd.SIZE_MINIMUM)
    except nbd.Error as e:
        r = 'info refused errno=%s' % e.errno
    try:
        h.opt_go(); r += ' go min=%d size=%d' % (h.get_block_size(nbd.SIZE_MINIMUM), h.get_size())
    except nbd.Error as e:
        r += ' go refused errno=%s' % e.errno
    print('request_block_size=%s: %s' % (req, r))
"#;

/// Raw images whose size is not a multiple of 512, given as `-f raw` and probed (no `-f`):
/// advertised size and block sizes, negotiation, `--list`, block status, writes into the
/// partial last sector and into the first sector (a probed image refuses to become another
/// format), and the file each server leaves, side by side with qemu-nbd.
#[test]
fn odd_sized_and_probed_raw_images_serve_as_qemu_nbd_serves_them() {
    if !tools() {
        return;
    }
    let d = scratch_dir();
    let root = d.path();
    let bin = link_dir(root);
    let mut problems = Vec::new();
    // 1,000,001 bytes: the last sector is one byte long
    let contents: Vec<u8> = (0..1_000_001u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8 | 1)
        .collect();
    std::fs::write(root.join("magic"), b"QFI\xfb\0\0\0\x03").unwrap();
    let qemu_io = |uri: &str, cmds: &[&str]| {
        let mut a = vec!["-f", "raw"];
        for c in cmds {
            a.extend(["-c", c]);
        }
        a.push(uri);
        let r = tool("qemu-io", root, &a);
        // without the timing lines
        let text: String = r
            .stdout_text()
            .lines()
            .filter(|l| !l.contains(" ops; "))
            .map(|l| format!("{l}\n"))
            .collect();
        format!("exit {:?}\n{text}{}", r.code, r.stderr).replace(uri, "URI")
    };
    for probed in [false, true] {
        let mut args = vec!["-t", "-k", "{SOCK}"];
        if !probed {
            args.extend(["-f", "raw"]);
        }
        args.push("odd.raw");
        let mut seen = Vec::new();
        for program in [Path::new("qemu-nbd"), &bin.join("qemu-nbd")] {
            std::fs::write(root.join("odd.raw"), &contents).unwrap();
            let s = start(root, program, &args, "").unwrap_or_else(|e| panic!("{args:?}: {e:?}"));
            let sock = s.uri.rsplit("socket=").next().unwrap().to_string();
            let neg = Command::new("/usr/bin/python3")
                .args(["-c", NEGOTIATION, &s.uri])
                .output()
                .unwrap();
            assert!(
                neg.status.success(),
                "{}",
                String::from_utf8_lossy(&neg.stderr)
            );
            let list = |p: &Path| {
                let r = tool(p.to_str().unwrap(), root, ["-L", "-k", &sock]);
                format!("exit {:?}\n{}", r.code, r.stdout_text())
            };
            let mut out = vec![
                nbdinfo(&["--json", "--no-content"], &s.uri),
                nbdinfo(&["--map"], &s.uri),
                String::from_utf8_lossy(&neg.stdout).into_owned(),
                list(Path::new("qemu-nbd")),
                list(&bin.join("qemu-nbd")),
                // the partial last sector: written, read back, mapped
                qemu_io(
                    &s.uri,
                    &[
                        "write -P 7 1000000 448",
                        "read -P 7 1000000 448",
                        "read -v 999990 32",
                    ],
                ),
                // the first sector: data in place is fine, another format's magic is not
                qemu_io(
                    &s.uri,
                    &[
                        "write -P 0 0 512",
                        "write -s magic 0 8",
                        "write -s magic 8 8",
                        "write -z 0 4",
                        "read -v 0 16",
                    ],
                ),
                nbdinfo(&["--map"], &s.uri),
            ];
            drop(s);
            let file = std::fs::read(root.join("odd.raw")).unwrap();
            out.push(format!(
                "file: {} bytes, sha256 {}",
                file.len(),
                qcow2_spec_tests::sha256_file(&root.join("odd.raw")).unwrap()
            ));
            seen.push(out);
        }
        for (i, (a, b)) in seen[0].iter().zip(&seen[1]).enumerate() {
            if a != b {
                problems.push(format!(
                    "probed={probed} step {i}:\n--- qemu-nbd\n{a}\n--- qnbd\n{b}"
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n\n"));
}

/// `qemu-img bench` command lines (as management scripts and benchmark wrappers write them):
/// the same checks, messages and exit codes from qnbd as `qemu-img` (by name), `-n`,
/// `--no-drain` and `-q` included; and `bench --nbd` ignores the image options it has no
/// use for, and writes what it was asked to, flushing at the interval with or without drain.
#[test]
fn bench_command_lines_run_as_qemu_img_runs_them() {
    if !tools() {
        return;
    }
    let d = scratch_dir();
    let root = d.path();
    let bin = link_dir(root);
    let q = root.join("q");
    std::fs::create_dir_all(&q).unwrap();
    tool_ok(
        "qemu-img",
        &q,
        ["create", "-q", "-f", "raw", "b.raw", "16M"],
    );
    let ours = bin.join("qemu-img");
    let cases: &[&[&str]] = &[
        &[],
        &["-w", "-d", "4", "--flush-interval=100"],
        &["-w", "-d", "4", "--flush-interval=100", "--no-drain"],
        &["--no-drain"],
        &["-w", "-q", "--pattern=7"],
        &["--flush-interval=10"],
        &["-w", "--flush-interval=10"],
        &["-d", "0"],
        &["-s", "0"],
        &["-c", "5", "-c", "0"],
        &["-w", "--pattern=300"],
        &["-i", "bogus"],
        &["-t", "bogus"],
        &["-n"],
        &["-n", "-t", "none"],
        &["-i", "native", "-t", "none"],
        &["-i", "threads", "-S", "8192", "-o", "4096"],
    ];
    let keep = |s: &str| {
        s.lines()
            .filter(|l| !l.starts_with("Run completed") && !l.starts_with("engine "))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let mut problems = Vec::new();
    for extra in cases {
        let mut args = vec!["bench", "-f", "raw", "-c", "500"];
        args.extend_from_slice(extra);
        args.push("b.raw");
        let a = tool("qemu-img", &q, &args);
        let b = tool(ours.to_str().unwrap(), &q, &args);
        if (a.code, keep(&a.stdout_text()), a.stderr.clone())
            != (b.code, keep(&b.stdout_text()), b.stderr.clone())
        {
            problems.push(format!(
                "{args:?}:\n qemu-img {}\n{}\n qnbd     {}\n{}",
                a.outcome(),
                keep(&a.stdout_text()),
                b.outcome(),
                keep(&b.stdout_text())
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n\n"));
    // over NBD, against qemu-nbd: options for a local image are ignored; writes land
    for (i, drain) in [&[][..], &["--no-drain"][..]].iter().enumerate() {
        let srv = start(
            &q,
            Path::new("qemu-nbd"),
            &["-t", "-f", "raw", "-k", "{SOCK}", "b.raw"],
            "",
        )
        .expect("qemu-nbd");
        let uri = srv.uri.clone();
        let pattern = format!("--pattern={}", 0x30 + i);
        let mut args = vec![
            "bench",
            "-f",
            "qcow2",
            "-t",
            "none",
            "-i",
            "native",
            "-U",
            "--image-opts",
            "-w",
            "-c",
            "1024",
            "-d",
            "8",
            "-s",
            "4096",
            "--flush-interval=64",
            &pattern,
            "--nbd",
            &uri,
        ];
        args.extend_from_slice(drain);
        let r = tool(qnbd_bin().to_str().unwrap(), &q, &args);
        assert!(r.success(), "{args:?}: {}", r.outcome());
        assert!(
            r.stdout_text().contains("Sending flush every 64 requests"),
            "{}",
            r.stdout_text()
        );
        drop(srv);
        let data = std::fs::read(q.join("b.raw")).unwrap();
        assert!(
            data[..4 << 20].iter().all(|&b| b == 0x30 + i as u8),
            "{args:?}: the first 4 MiB do not hold the pattern"
        );
        assert!(
            data[4 << 20..].iter().all(|&b| b == 0),
            "{args:?}: wrote past"
        );
    }
}

/// `json:{"driver":"compress",...}` over a qcow2 image with a backing file: every write
/// becomes compressed clusters, a partial cluster merged with what the guest read there
/// (backing data included), zero writes stay zero clusters. qnbd and qemu-nbd given the same
/// name and the same writes leave the same map (`compressed: true` included) and contents,
/// and both images pass `qemu-img check`. Rewriting a compressed cluster, which qemu-nbd fails
/// with EIO, qnbd stores again compressed.
#[test]
fn compress_driver_writes_compressed_clusters_as_qemu_nbd_does() {
    if !tools() {
        return;
    }
    let d = scratch_dir();
    let root = d.path();
    let mut maps = Vec::new();
    let mut datas = Vec::new();
    for (who, program) in [("ours", qnbd_bin()), ("theirs", Path::new("qemu-nbd"))] {
        let dir = root.join(who);
        std::fs::create_dir_all(&dir).unwrap();
        tool_ok(
            "qemu-img",
            &dir,
            ["create", "-q", "-f", "raw", "base.raw", "4M"],
        );
        tool_ok(
            "qemu-io",
            &dir,
            ["-f", "raw", "-c", "write -P 0x42 0 1M", "base.raw"],
        );
        tool_ok(
            "qemu-img",
            &dir,
            [
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                "base.raw",
                "-F",
                "raw",
                "top.qcow2",
                "4M",
            ],
        );
        let name = format!(
            r#"json:{{"driver":"compress","file":{{"driver":"qcow2","file":{{"driver":"file","filename":"{}"}}}}}}"#,
            dir.join("top.qcow2").display()
        );
        let mut args = vec!["-t", "-k", "{SOCK}", name.as_str()];
        if who == "ours" {
            args.insert(0, "serve");
        }
        let srv = start(&dir, program, &args, "").expect("server");
        for c in [
            "write -P 0x61 0 64k",
            "write -P 0x62 70k 4k",
            "write -z 128k 64k",
            "write -P 0x64 192k 128k",
            "write -P 0x65 4190208 4096",
        ] {
            tool_ok("qemu-io", &dir, ["-f", "raw", "-c", c, srv.uri.as_str()]);
        }
        let again = tool(
            "qemu-io",
            &dir,
            ["-f", "raw", "-c", "write -P 0x66 0 64k", srv.uri.as_str()],
        );
        match who {
            "ours" => assert!(
                again.success() && !again.stdout_text().contains("failed"),
                "{}",
                again.outcome()
            ),
            _ => assert!(
                again.stdout_text().contains("Input/output error")
                    || again.stderr.contains("Input/output error"),
                "qemu-nbd no longer refuses a rewrite: {}",
                again.outcome()
            ),
        }
        drop(srv);
        let check = tool("qemu-img", &dir, ["check", "top.qcow2"]);
        assert!(check.success(), "{who}: {}", check.outcome());
        let map = tool_ok("qemu-img", &dir, ["map", "--output=json", "top.qcow2"]);
        maps.push(map.stdout_text());
        tool_ok(
            "qemu-img",
            &dir,
            ["convert", "-O", "raw", "top.qcow2", "guest.raw"],
        );
        let mut data = std::fs::read(dir.join("guest.raw")).unwrap();
        if who == "ours" {
            assert!(
                data[..64 << 10].iter().all(|&b| b == 0x66),
                "the rewrite is lost"
            );
        }
        // the rewrite qemu-nbd refused: compare the rest
        data[..64 << 10].fill(0);
        datas.push(data);
    }
    assert_eq!(
        maps[0], maps[1],
        "qemu-img map of qnbd's and qemu-nbd's images"
    );
    assert!(maps[0].contains(r#""compressed": true"#), "{}", maps[0]);
    assert!(datas[0] == datas[1], "guest contents differ");
    // the partial cluster holds the backing data around the write
    let g = &datas[0];
    assert!(g[64 << 10..70 << 10].iter().all(|&b| b == 0x42));
    assert!(g[70 << 10..74 << 10].iter().all(|&b| b == 0x62));
    assert!(g[74 << 10..128 << 10].iter().all(|&b| b == 0x42));
}
