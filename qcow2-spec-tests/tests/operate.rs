//! Operating qnbd as an installed service: what `scripts/install` puts in place (man pages
//! that `man` renders, shell completions that bash completes with, systemd units that
//! `systemd-analyze verify` accepts), and `serve`'s readiness notification as systemd reads it.
//! The lists of commands and options come from `qnbd --help`, not from this file.

use qcow2_spec_tests::{
    nbd_greets, qnbd_bin, require_tools, scratch_dir, workspace_root, NbdServer,
};
use std::collections::BTreeSet;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

const PREFIX: &str = "/opt/qnbd";

fn run(cmd: &mut Command) -> (i32, String, String) {
    let out = cmd.output().expect("the command starts");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `scripts/install --systemd PREFIX` into `destdir`, with the binary under test.
fn install(destdir: &Path) -> PathBuf {
    let (rc, out, err) = run(Command::new(workspace_root().join("scripts/install"))
        .args(["--systemd", "--links", PREFIX])
        .env("QNBD_BIN", qnbd_bin())
        .env("DESTDIR", destdir));
    assert_eq!(rc, 0, "scripts/install: {out}{err}");
    destdir.join(PREFIX.trim_start_matches('/'))
}

/// The subcommands `qnbd --help` lists (without clap's `help`).
fn subcommands() -> Vec<String> {
    let (rc, out, _) = run(Command::new(qnbd_bin()).arg("--help"));
    assert_eq!(rc, 0);
    // the commands stand under headings between the usage line and the options
    let list: Vec<String> = out
        .lines()
        .skip_while(|l| !l.starts_with("Usage:"))
        .take_while(|l| !l.starts_with("Options:"))
        .filter(|l| l.starts_with("  ") && !l.starts_with("   "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(String::from)
        .collect();
    assert!(list.len() >= 10, "{out}");
    list
}

/// The long options `qnbd SUB --help` lists.
fn long_options(sub: &str) -> BTreeSet<String> {
    let (rc, out, _) = run(Command::new(qnbd_bin()).args([sub, "--help"]));
    assert_eq!(rc, 0, "{sub} --help");
    let mut set = BTreeSet::new();
    for line in out.lines() {
        let t = line.trim_start();
        if !t.starts_with('-') {
            continue;
        }
        for word in t.split([' ', ',', '=', '<', '[']) {
            if let Some(name) = word.strip_prefix("--") {
                let name: String = name
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                    .collect();
                if !name.is_empty() {
                    set.insert(format!("--{name}"));
                }
            }
        }
    }
    assert!(set.contains("--help"), "{sub}: {out}");
    set
}

/// What bash's completion function offers for `words` (the last one being completed).
fn bash_complete(script: &Path, words: &[&str]) -> BTreeSet<String> {
    let quoted: Vec<String> = words.iter().map(|w| format!("'{w}'")).collect();
    let line = words.join(" ");
    let prog = format!(
        "source '{}'; COMP_WORDS=({}); COMP_CWORD={}; COMP_LINE='{line}'; COMP_POINT={}; \
         _qnbd qnbd '{}' '{}'; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        script.display(),
        quoted.join(" "),
        words.len() - 1,
        line.len(),
        words[words.len() - 1],
        words[words.len().saturating_sub(2)],
    );
    let (rc, out, err) = run(Command::new("bash").args(["--norc", "-c", &prog]));
    assert_eq!(rc, 0, "{err}");
    out.lines().map(String::from).collect()
}

#[test]
fn installed_pages_and_completions_cover_every_command_and_option() {
    if !require_tools("man pages and completions", &["man", "bash"]) {
        return;
    }
    let tmp = scratch_dir();
    let root = install(tmp.path());
    let man1 = root.join("share/man/man1");
    let bash = root.join("share/bash-completion/completions/qnbd");
    for f in [
        root.join("share/zsh/site-functions/_qnbd"),
        root.join("share/fish/vendor_completions.d/qnbd.fish"),
    ] {
        let text = std::fs::read_to_string(&f).unwrap();
        for sub in subcommands() {
            assert!(text.contains(&sub), "{}: {sub}", f.display());
        }
    }
    for link in ["qemu-img", "qemu-nbd"] {
        let (rc, out, _) = run(Command::new(root.join("bin").join(link)).arg("--version"));
        assert_eq!(rc, 0);
        assert!(out.starts_with(link), "{link} --version: {out}");
    }
    // the top page lists every subcommand's page
    let page = |name: &str| -> String {
        let (rc, out, err) = run(Command::new("man")
            .arg("-l")
            .arg(man1.join(format!("{name}.1")))
            .env("MANWIDTH", "1000")
            .env("MAN_KEEP_FORMATTING", "0")
            .env("GROFF_NO_SGR", "1")
            .env("PAGER", "cat"));
        assert_eq!(rc, 0, "man {name}: {err}");
        // overstrike sequences (bold, underline) off, and no hyphenation at line ends
        let mut plain = String::new();
        let mut chars = out.chars().peekable();
        while let Some(c) = chars.next() {
            if chars.peek() == Some(&'\u{8}') {
                chars.next();
                continue;
            }
            plain.push(c);
        }
        plain.replace(['\u{2010}', '\u{2212}'], "-")
    };
    let top = page("qnbd");
    let subs = subcommands();
    let offered = bash_complete(&bash, &["qnbd", ""]);
    for sub in &subs {
        assert!(
            top.contains(&format!("qnbd-{sub}(1)")),
            "qnbd(1) lacks {sub}"
        );
        assert!(
            offered.contains(sub),
            "bash does not offer {sub}: {offered:?}"
        );
        let text = page(&format!("qnbd-{sub}"));
        let completed = bash_complete(&bash, &["qnbd", sub, "--"]);
        for opt in long_options(sub) {
            assert!(text.contains(&opt), "qnbd-{sub}(1) lacks {opt}");
            assert!(
                completed.contains(&opt),
                "bash does not complete qnbd {sub} {opt}: {completed:?}"
            );
        }
    }
    // an unknown page is refused with the way out
    let (rc, _, err) = run(Command::new(qnbd_bin()).args(["man", "nosuch"]));
    assert_eq!(rc, 1);
    assert!(err.contains("No subcommand 'nosuch'"), "{err}");
}

#[test]
fn installed_units_verify() {
    if !require_tools("systemd units", &["systemd-analyze", "man"]) {
        return;
    }
    let tmp = scratch_dir();
    let root = install(tmp.path());
    let units = root.join("lib/systemd/system");
    let dir = tmp.path().join("verify");
    std::fs::create_dir_all(&dir).unwrap();
    // an instance of each template; ExecStart= points at the installed binary
    let service = std::fs::read_to_string(units.join("qnbd@.service")).unwrap();
    assert!(service.contains(&format!("ExecStart={PREFIX}/bin/qnbd serve")));
    let bin = root.join("bin/qnbd");
    let service = service.replace(&format!("{PREFIX}/bin/qnbd"), &bin.display().to_string());
    std::fs::write(dir.join("qnbd@demo.service"), service).unwrap();
    std::fs::copy(units.join("qnbd@.socket"), dir.join("qnbd@demo.socket")).unwrap();
    for want in [
        "Type=notify",
        "DynamicUser=yes",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "ReadWritePaths=",
        "--pid-file",
    ] {
        let text = std::fs::read_to_string(dir.join("qnbd@demo.service")).unwrap();
        assert!(text.contains(want), "qnbd@.service lacks {want}");
    }
    // verify also runs `man` on every Documentation= page: the installed pages must be found
    let (rc, out, err) = run(Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.join("qnbd@demo.service"))
        .arg(dir.join("qnbd@demo.socket"))
        .env("MANPATH", root.join("share/man"))
        .env("SYSTEMD_LOG_LEVEL", "notice"));
    assert_eq!(rc, 0, "systemd-analyze verify: {out}{err}");
    assert!(
        err.trim().is_empty(),
        "systemd-analyze verify warned: {err}"
    );
    // and it does catch a bad unit
    std::fs::write(
        dir.join("qnbd@bad.service"),
        "[Service]\nType=notify\nExecStart=/nonexistent/qnbd serve\nBogusKey=1\n",
    )
    .unwrap();
    let (rc, _, err) = run(Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.join("qnbd@bad.service")));
    assert_ne!(rc, 0);
    assert!(err.contains("BogusKey"), "{err}");
}

/// `serve` under a service manager: READY=1 once it listens with its image open (a client is
/// greeted at once), with MAINPID and the pid file naming the server, and STOPPING=1 on
/// SIGTERM before a clean exit. Both socket address forms of NOTIFY_SOCKET.
#[test]
fn serve_notifies_readiness_and_stopping() {
    let tmp = scratch_dir();
    let dir = tmp.path();
    std::fs::write(dir.join("img.raw"), vec![0u8; 1 << 20]).unwrap();
    for abstract_name in [false, true] {
        let (notify, target) = if abstract_name {
            use std::os::linux::net::SocketAddrExt;
            let name = format!("qnbd-test-{}", std::process::id());
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(&name).unwrap();
            (UnixDatagram::bind_addr(&addr).unwrap(), format!("@{name}"))
        } else {
            let p = dir.join("notify");
            (UnixDatagram::bind(&p).unwrap(), p.display().to_string())
        };
        notify
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let sock = dir.join(format!("nbd{}.sock", abstract_name as u8));
        let pid_file = dir.join(format!("qnbd{}.pid", abstract_name as u8));
        let child = Command::new(qnbd_bin())
            .args(["serve", "-t", "-f", "raw", "-k"])
            .arg(&sock)
            .arg("--pid-file")
            .arg(&pid_file)
            .arg(dir.join("img.raw"))
            .env("NOTIFY_SOCKET", &target)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut buf = [0u8; 4096];
        let n = notify.recv(&mut buf).expect("READY=1 within 60 s");
        let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
        let lines: Vec<&str> = msg.lines().collect();
        assert!(lines.contains(&"READY=1"), "{msg}");
        assert!(
            lines.contains(&format!("MAINPID={}", child.id()).as_str()),
            "{msg}"
        );
        // ready means serving: the first connection is greeted without waiting
        assert!(
            nbd_greets(&sock, Duration::from_secs(5)),
            "not serving at READY=1"
        );
        let pid = std::fs::read_to_string(&pid_file).unwrap();
        assert_eq!(pid.trim(), child.id().to_string());
        let (rc, _, _) = run(Command::new("kill").args(["-TERM", &child.id().to_string()]));
        assert_eq!(rc, 0);
        let n = notify.recv(&mut buf).expect("STOPPING=1 after SIGTERM");
        assert_eq!(&buf[..n], b"STOPPING=1");
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let _ = std::fs::remove_file(dir.join("notify"));
    }
}

fn have_python_nbd() -> bool {
    let ok = Command::new("/usr/bin/python3")
        .args(["-c", "import nbd"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        qcow2_spec_tests::skip(
            "statistics",
            "/usr/bin/python3 has no 'nbd' module (python3-libnbd; scripts/test installs it)",
        );
    }
    ok
}

/// A known workload through libnbd, request by request.
const WORKLOAD: &str = r#"
import nbd, sys
h = nbd.NBD()
h.add_meta_context("base:allocation")
h.connect_uri(sys.argv[1])
for i in range(10):
    h.pwrite(b"\x01" * 4096, i * 4096)
for i in range(5):
    h.pread(65536, 0)
h.pread(1 << 20, 1 << 20)
h.flush()
h.zero(8192, 2 << 20)
h.trim(4096, 3 << 20)
h.block_status(65536, 0, lambda *a: 0)
h.set_strict_mode(0)
try:
    h.pread(4096, 4 << 20)
    sys.exit("a read past the end succeeded")
except nbd.Error:
    pass
h.shutdown()
"#;

/// One GET of the metrics endpoint at the Unix socket `sock`: the body's samples.
fn scrape(sock: &Path) -> Vec<(String, f64)> {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.0 200 OK"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').unwrap();
            (k.to_string(), v.parse().unwrap())
        })
        .collect()
}

fn sample(samples: &[(String, f64)], key: &str) -> f64 {
    samples
        .iter()
        .find(|(k, _)| k == key)
        .unwrap_or_else(|| panic!("no sample {key} in {samples:?}"))
        .1
}

/// `serve --stats FILE --metrics SOCKET`: a known workload over libnbd gives exact counts
/// and bytes per command type, in the SIGUSR1 report, at exit, and on the metrics endpoint;
/// on the ring data plane (default) and on the threaded path (`--aio threads`).
#[test]
fn statistics_count_a_known_workload_exactly() {
    if !have_python_nbd() {
        return;
    }
    let tmp = scratch_dir();
    let dir = tmp.path();
    std::fs::write(dir.join("img.raw"), vec![0u8; 4 << 20]).unwrap();
    for threads in [false, true] {
        let sock = dir.join("nbd.sock");
        let msock = dir.join("metrics.sock");
        let stats = dir.join("stats.txt");
        let _ = std::fs::remove_file(&stats);
        let mut cmd = Command::new(qnbd_bin());
        cmd.args(["serve", "-t", "-f", "raw", "--discard", "unmap", "-k"])
            .arg(&sock)
            .arg("--stats")
            .arg(&stats)
            .arg("--metrics")
            .arg(&msock);
        if threads {
            cmd.args(["--aio", "threads"]);
        }
        let child = cmd
            .arg(dir.join("img.raw"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let t = std::time::Instant::now();
        while !nbd_greets(&sock, Duration::from_secs(1)) {
            assert!(t.elapsed() < Duration::from_secs(30), "serve did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        let uri = format!("nbd+unix:///?socket={}", sock.display());
        let (rc, out, err) = run(Command::new("/usr/bin/python3").args(["-c", WORKLOAD, &uri]));
        assert_eq!(rc, 0, "{out}{err}");
        // the server frees the connection when it sees the hang-up
        let t = std::time::Instant::now();
        let samples = loop {
            let s = scrape(&msock);
            if sample(&s, "qnbd_connections{export=\"\"}") == 0.0 {
                break s;
            }
            assert!(t.elapsed() < Duration::from_secs(10), "{s:?}");
            std::thread::sleep(Duration::from_millis(20));
        };
        let want: [(&str, f64, f64); 7] = [
            ("read", 6.0, 5.0 * 65536.0 + 1048576.0),
            ("write", 10.0, 40960.0),
            ("zero", 1.0, 8192.0),
            ("trim", 1.0, 4096.0),
            ("flush", 1.0, 0.0),
            ("block_status", 1.0, 65536.0),
            ("cache", 0.0, 0.0),
        ];
        for (op, n, bytes) in want {
            let l = format!("{{export=\"\",op=\"{op}\"}}");
            assert_eq!(
                sample(&samples, &format!("qnbd_requests_total{l}")),
                n,
                "{op}"
            );
            assert_eq!(
                sample(&samples, &format!("qnbd_bytes_total{l}")),
                bytes,
                "{op}"
            );
            assert_eq!(
                sample(&samples, &format!("qnbd_errors_total{l}")),
                0.0,
                "{op}"
            );
        }
        let p50 = sample(
            &samples,
            "qnbd_latency_seconds{export=\"\",op=\"read\",quantile=\"0.5\"}",
        );
        assert!(p50 > 0.0 && p50 < 10.0, "read p50 {p50}");
        assert_eq!(sample(&samples, "qnbd_rejected_total{export=\"\"}"), 1.0);
        assert_eq!(sample(&samples, "qnbd_connections_total{export=\"\"}"), 1.0);
        assert_eq!(sample(&samples, "qnbd_in_flight{export=\"\"}"), 0.0);
        // SIGUSR1 writes the report; the server goes on
        let pid = child.id().to_string();
        assert_eq!(run(Command::new("kill").args(["-USR1", &pid])).0, 0);
        let t = std::time::Instant::now();
        while !stats.exists() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "no report after SIGUSR1"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let report = std::fs::read_to_string(&stats).unwrap();
        for line in [
            "export '': ",
            "20 requests, 1495040 bytes, 1 rejected, 0 in flight, 1 connections (0 open)",
            "  read: 6 requests, 1376256 bytes, 0 errors",
            "  write: 10 requests, 40960 bytes, 0 errors",
            "  zero: 1 requests, 8192 bytes, 0 errors",
            "  trim: 1 requests, 4096 bytes, 0 errors",
            "  flush: 1 requests, 0 bytes, 0 errors",
            "  block_status: 1 requests, 65536 bytes, 0 errors",
        ] {
            assert!(report.contains(line), "{line:?} not in:\n{report}");
        }
        assert!(!report.contains("cache:"), "{report}");
        assert!(
            nbd_greets(&sock, Duration::from_secs(5)),
            "gone after SIGUSR1"
        );
        // at exit the report is written again, and the metrics socket removed
        std::fs::remove_file(&stats).unwrap();
        assert_eq!(run(Command::new("kill").args(["-TERM", &pid])).0, 0);
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report = std::fs::read_to_string(&stats).unwrap();
        assert!(
            report.contains("  write: 10 requests, 40960 bytes"),
            "{report}"
        );
        assert!(!msock.exists(), "metrics socket left behind");
    }
}

/// Start `serve` on `sock` with `args`, stderr captured; returns once it greets.
fn serve_logged(dir: &Path, sock: &Path, args: &[&str]) -> std::process::Child {
    let child = Command::new(qnbd_bin())
        .args(["serve", "-t", "-f", "raw", "-k"])
        .arg(sock)
        .args(args)
        .arg(dir.join("img.raw"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t = std::time::Instant::now();
    while !nbd_greets(sock, Duration::from_secs(1)) {
        assert!(t.elapsed() < Duration::from_secs(30), "serve did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

/// Stop `child` with SIGTERM once its log has settled; its stderr lines.
fn stop_logged(child: std::process::Child) -> Vec<String> {
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        run(Command::new("kill").args(["-TERM", &child.id().to_string()])).0,
        0
    );
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .map(String::from)
        .collect()
}

/// The log of a known session: as JSON lines (`--log-format json -vv`), every event of the
/// session with its connection id and peer, in order; as text (`-v`), the stable
/// `PROGRAM: LEVEL: conn ID PEER: MESSAGE` lines; at the default level nothing for a clean
/// session; `--log-slow` with a threshold nothing reaches logs nothing.
#[test]
fn the_log_tells_a_session_event_by_event() {
    if !have_python_nbd() {
        return;
    }
    let tmp = scratch_dir();
    let dir = tmp.path();
    std::fs::write(dir.join("img.raw"), vec![0u8; 4 << 20]).unwrap();
    let sock = dir.join("nbd.sock");
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let workload = |expect_ok: bool| {
        let (rc, out, err) = run(Command::new("/usr/bin/python3").args(["-c", WORKLOAD, &uri]));
        assert_eq!(rc == 0, expect_ok, "{out}{err}");
    };

    // JSON lines
    let child = serve_logged(dir, &sock, &["--log-format", "json", "-vv"]);
    workload(true);
    let lines = stop_logged(child);
    let events: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    for e in &events {
        assert_eq!(e["program"], "qnbd", "{e}");
        let t = e["time"].as_str().unwrap();
        assert!(
            t.len() == 24 && t.ends_with('Z') && t.as_bytes()[10] == b'T',
            "{t}"
        );
        assert!(e["msg"].is_string() && e["level"].is_string(), "{e}");
    }
    let names: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    // the greeting probe of serve_logged is connection 1; the workload is connection 2
    let want = [
        "export-opened",
        "accepted",
        "negotiation-closed",
        "accepted",
        "negotiated",
        "request-refused",
        "closed",
        "export-closed",
    ];
    assert_eq!(names, want, "{lines:#?}");
    let session: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e.get("conn") == Some(&serde_json::json!(2)))
        .collect();
    assert_eq!(session.len(), 4, "{lines:#?}");
    for e in &session {
        assert_eq!(e["peer"], "unix");
    }
    assert_eq!(events[5]["level"], "info");
    assert!(
        events[5]["msg"].as_str().unwrap().contains("refused: "),
        "{}",
        events[5]
    );
    assert!(
        events[0]["msg"]
            .as_str()
            .unwrap()
            .starts_with("export '' opened: 4194304 bytes, writable"),
        "{}",
        events[0]
    );

    // text, -v
    let child = serve_logged(dir, &sock, &["-v"]);
    workload(true);
    let lines = stop_logged(child);
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("qnbd: info: conn 2 unix: export '': ")
                && l.ends_with("metadata context(s)")),
        "{lines:#?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("qnbd: info: conn 2 unix: request ")),
        "{lines:#?}"
    );
    assert!(lines
        .iter()
        .any(|l| l == "qnbd: info: conn 2 unix: connection closed"));
    assert!(lines.iter().all(|l| !l.contains(": debug: ")), "{lines:#?}");

    // the default level: a clean session says nothing; a slow-request threshold far above
    // anything this workload takes logs nothing either
    let child = serve_logged(dir, &sock, &["--log-slow", "600000"]);
    workload(true);
    let lines = stop_logged(child);
    assert!(lines.is_empty(), "{lines:#?}");
    // a threshold of 1 ms: whatever is logged is a slow-request warning naming its figures
    let child = serve_logged(dir, &sock, &["--log-slow", "1"]);
    workload(true);
    for l in stop_logged(child) {
        assert!(
            l.starts_with("qnbd: warn: conn 2 unix: slow ") && l.ends_with("(threshold 1 ms)"),
            "{l}"
        );
    }
}

/// The `(N.NN/100%)` figures of `-p` output (split at carriage returns), and whether it ended
/// with qemu-img's final `\r\n`.
fn progress_figures(out: &str) -> (Vec<f64>, bool) {
    let figures = out
        .split(['\r', '\n'])
        .filter(|l| !l.is_empty())
        .map(|l| {
            let t = l.trim_start();
            assert!(l.starts_with("    ("), "{l:?}");
            let end = t.find("/100%)").unwrap_or_else(|| panic!("{l:?}"));
            let n = &t[1..end];
            assert_eq!(n.split_once('.').map(|(_, f)| f.len()), Some(2), "{l:?}");
            n.parse::<f64>().unwrap()
        })
        .collect();
    (figures, out.ends_with("(100.00/100%)\r\n"))
}

/// `convert -p` piped prints qemu-img's progress lines (tools parse them), from 0 to 100 in
/// steps of at least 1 %; on a terminal a bar with bytes, rate and time follows the figure.
#[test]
fn convert_progress_is_qemu_img_s_when_piped_and_a_bar_on_a_terminal() {
    if !require_tools("convert -p", &["qemu-img", "qemu-io", "script"]) {
        return;
    }
    let tmp = scratch_dir();
    let d = tmp.path();
    let sh = |cmd: &str| -> (i32, String, String) {
        run(Command::new("sh").arg("-c").arg(cmd).current_dir(d))
    };
    assert_eq!(sh("qemu-img create -q -f raw src.raw 64M").0, 0);
    assert_eq!(
        sh("qemu-io -f raw -c 'write -P 7 0 40M' src.raw >/dev/null").0,
        0
    );
    let q = qnbd_bin().display().to_string();
    for (who, cmd) in [
        (
            "qemu-img",
            "qemu-img convert -p -O qcow2 src.raw a.qcow2".to_string(),
        ),
        ("qnbd", format!("{q} convert -p -O qcow2 src.raw b.qcow2")),
    ] {
        let (rc, out, err) = sh(&cmd);
        assert_eq!(rc, 0, "{who}: {err}");
        let (figs, crlf) = progress_figures(&out);
        assert!(crlf, "{who}: {out:?}");
        assert_eq!(figs.first(), Some(&0.0), "{who}");
        assert!(figs.len() >= 3, "{who}: {figs:?}");
        assert_eq!(&figs[figs.len() - 2..], &[100.0, 100.0], "{who}: {figs:?}");
        for w in figs[..figs.len() - 1].windows(2) {
            assert!(w[1] - w[0] >= 1.0 || w[1] == 100.0, "{who}: {figs:?}");
        }
    }
    assert_eq!(sh("qemu-img compare a.qcow2 b.qcow2").0, 0);
    // a terminal: script(1) gives the command a pty
    let (rc, out, err) = sh(&format!(
        "script -qec '{q} convert -p -O qcow2 src.raw c.qcow2' /dev/null"
    ));
    assert_eq!(rc, 0, "{err}");
    let last = out
        .split(['\r', '\n'])
        .rfind(|l| !l.trim().is_empty())
        .unwrap_or_default()
        .trim_end()
        .to_string();
    assert!(
        last.starts_with("    (100.00/100%) [##############################] 64 MiB / 64 MiB, ")
            && last.contains("/s, done in "),
        "{last:?}"
    );
    assert_eq!(sh("qemu-img compare a.qcow2 c.qcow2").0, 0);
}

/// `check -p` (and `check -r leaks -p`) piped: qemu-img's progress lines from 0 to 100, then
/// exactly the report qemu-img check prints for the same image; the repair leaves an image
/// qemu-img calls clean.
#[test]
fn check_progress_then_qemu_img_s_report() {
    if !require_tools("check -p", &["qemu-img", "qemu-io"]) {
        return;
    }
    let tmp = scratch_dir();
    let d = tmp.path();
    let sh = |cmd: &str| -> (i32, String, String) {
        run(Command::new("sh").arg("-c").arg(cmd).current_dir(d))
    };
    assert_eq!(
        sh("qemu-img create -q -f qcow2 -o cluster_size=4k a.qcow2 256M").0,
        0
    );
    for cmd in [
        "qemu-io -c 'write -P 1 0 60M' a.qcow2",
        "qemu-img snapshot -c s1 a.qcow2",
        "qemu-io -c 'write -P 2 20M 10M' a.qcow2",
    ] {
        let (rc, _, err) = sh(&format!("{cmd} >/dev/null"));
        assert_eq!(rc, 0, "{cmd}: {err}");
    }
    let q = qnbd_bin().display().to_string();
    let split = |out: &str| -> (String, String) {
        let at = out
            .rfind("(100.00/100%)\r\n")
            .expect("the final progress line")
            + 15;
        (out[..at].to_string(), out[at..].to_string())
    };
    let (qrc, qout, _) = sh("qemu-img check a.qcow2");
    let (rc, out, err) = sh(&format!("{q} check -p a.qcow2"));
    assert_eq!((rc, qrc), (0, 0), "{err}");
    let (prog, report) = split(&out);
    assert_eq!(report, qout);
    let (figs, crlf) = progress_figures(&prog);
    assert!(crlf);
    assert_eq!(figs.first(), Some(&0.0));
    assert!(figs.len() >= 20, "{figs:?}");
    for w in figs[..figs.len() - 1].windows(2) {
        assert!(w[1] - w[0] >= 1.0 || w[1] == 100.0, "{figs:?}");
    }
    // a leaked cluster: the file grows by one cluster whose refcount is set to 1 behind the
    // image's back (64 KiB clusters, 16-bit refcounts: the first refcount block covers it)
    assert_eq!(sh("qemu-img create -q -f qcow2 b.qcow2 64M").0, 0);
    let (rc, _, err) = sh("qemu-io -c 'write -P 3 0 3M' b.qcow2 >/dev/null");
    assert_eq!(rc, 0, "{err}");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(d.join("b.qcow2"))
            .unwrap();
        let len = f.metadata().unwrap().len();
        f.set_len(len + 65536).unwrap();
        let mut w = [0u8; 8];
        f.read_exact_at(&mut w, 48).unwrap();
        let reftable = u64::from_be_bytes(w);
        f.read_exact_at(&mut w, reftable).unwrap();
        let refblock = u64::from_be_bytes(w);
        f.write_all_at(&1u16.to_be_bytes(), refblock + len / 65536 * 2)
            .unwrap();
    }
    assert_eq!(sh("qemu-img check b.qcow2").0, 3);
    let (rc, out, err) = sh(&format!("{q} check -r leaks -p b.qcow2"));
    assert_eq!(rc, 0, "{err}");
    let (prog, report) = split(&out);
    assert!(
        report.starts_with(
            "The following inconsistencies were found and repaired:\n\n    1 leaked clusters"
        ),
        "{report:?}"
    );
    let (figs, crlf) = progress_figures(&prog);
    assert!(crlf && figs.first() == Some(&0.0), "{out:?}");
    assert_eq!(sh("qemu-img check b.qcow2").0, 0);
    // -p with JSON output prints no progress (the JSON stays parseable)
    let (rc, out, _) = sh(&format!("{q} check -p --output=json a.qcow2"));
    assert_eq!(rc, 0);
    assert!(
        serde_json::from_str::<serde_json::Value>(&out).is_ok(),
        "{out:?}"
    );
}

/// A refusal names the file and the reason in QEMU's words, and as `qnbd` adds a `hint:` line
/// with the flag that changes it; invoked as `qemu-img` the message is qemu-img's, line for line.
#[test]
fn refusals_say_what_to_do_and_stay_qemu_s_by_name() {
    if !require_tools("refusal hints", &["qemu-img", "qemu-nbd"]) {
        return;
    }
    let tmp = scratch_dir();
    let d = tmp.path();
    let sh = |cmd: &str| -> (i32, String, String) {
        run(Command::new("sh").arg("-c").arg(cmd).current_dir(d))
    };
    let bin = d.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::os::unix::fs::symlink(qnbd_bin(), bin.join("qemu-img")).unwrap();
    let q = qnbd_bin().display().to_string();
    let by_name = bin.join("qemu-img").display().to_string();
    assert_eq!(sh("qemu-img create -q -f qcow2 base.qcow2 1M").0, 0);
    assert_eq!(
        sh("qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2").0,
        0
    );
    // a writer holds the image: the lock refusal
    let holder = NbdServer::qemu_nbd(d, "h", &["-f", "qcow2", "top.qcow2"]);
    let (qrc, _, qerr) = sh("qemu-img check -r all top.qcow2");
    let (nrc, _, nerr) = sh(&format!("{by_name} check -r all top.qcow2"));
    let (rc, _, err) = sh(&format!("{q} check -r all top.qcow2"));
    holder.stop();
    assert_eq!((qrc, nrc, rc), (1, 1, 1), "{qerr}\n{nerr}\n{err}");
    assert_eq!(nerr, qerr, "by name the message is qemu-img's");
    assert!(!nerr.contains("hint:"));
    let hint = err
        .lines()
        .find(|l| l.starts_with("hint: "))
        .unwrap_or_default();
    assert!(hint.contains("-U/--force-share"), "{err}");
    let body: Vec<&str> = err.lines().filter(|l| !l.starts_with("hint: ")).collect();
    let qbody: Vec<String> = qerr
        .lines()
        .map(|l| l.replacen("qemu-img: ", "qnbd: ", 1))
        .collect();
    assert_eq!(body, qbody, "QEMU's words before the hint");
    // the open policy: a backing file not allowed names the file and --allow-backing
    let (rc, _, err) = sh(&format!("{q} map --allow-backing none top.qcow2"));
    assert_eq!(rc, 1);
    assert!(
        err.contains("'base.qcow2'") || err.contains("base.qcow2'"),
        "{err}"
    );
    assert!(
        err.lines()
            .any(|l| l.starts_with("hint: ") && l.contains("--allow-backing")),
        "{err}"
    );
}
