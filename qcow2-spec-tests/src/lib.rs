//! Shared helpers for qnbd's spec tests: QEMU is the oracle, qnbd must agree with it.
//!
//! What lives here, in the order a test meets it:
//!
//! * [`require_tools`] — the oracle tools a test needs. A developer without them gets a printed
//!   `SKIP` line; under CI ([`in_ci`]: `CI=true` or `CI=1`) a missing tool fails the test
//!   instead (`scripts/test` installs them). [`skip`] does the same for any other reason a test
//!   cannot run here.
//! * [`reference_set`] — the reference images and QEMU's ground truth, built by
//!   `images/make-reference-images.sh` into `target/reference-images/`. Built once and shared by
//!   every test binary: a lock file keeps parallel builders out, and a stamp (hash of the script
//!   and of the QEMU version) triggers a rebuild when either changes. Tests must treat the set as
//!   read-only (copy an image before writing to it).
//! * [`qnbd_bin`] and [`qnbd`] — the `qnbd` binary of the profile these tests were built with
//!   (built on first use), run under one [`IoEngine`] with a timeout.
//! * [`check_info`], [`check_map`], [`check_convert`] — one qnbd-vs-QEMU comparison each, against
//!   an [`Expect`]ed value (QEMU's output) or an expected refusal.
//! * [`Mismatches`] — collects every failed comparison of a test and reports them all at once,
//!   with a diff ([`json_diff`], [`line_diff`]).
//!
//! Nothing here writes into the reference set or into `images/`.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::{Digest, Sha256};

// ---------------------------------------------------------------------------------------------
// Where things are

/// The workspace root (the directory holding the root `Cargo.toml`, `images/`, `scripts/`).
pub fn workspace_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent().unwrap_or(here).to_path_buf()
}

/// `images/` in the workspace: the committed fixtures, their MANIFEST and the image scripts.
pub fn images_dir() -> PathBuf {
    workspace_root().join("images")
}

/// The profile directory this test binary was built into (`target/release`, `target/debug`):
/// test executables live in `<profile dir>/deps/`.
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("path of the running test executable");
    exe.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| workspace_root().join("target").join("debug"))
}

/// The cargo target directory (`target/`), home of the reference set and of test scratch space.
pub fn target_dir() -> PathBuf {
    profile_dir()
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// A scratch directory under `target/` (same file system as the images, removed on drop).
pub fn scratch_dir() -> tempfile::TempDir {
    let base = target_dir().join("spec-scratch");
    fs::create_dir_all(&base).expect("create target/spec-scratch");
    tempfile::Builder::new()
        .prefix("t")
        .tempdir_in(base)
        .expect("create a scratch directory")
}

// ---------------------------------------------------------------------------------------------
// Tools

/// `CI=true` (or `1`): missing tools are failures, not skips. The one test of the `CI`
/// variable in the tests (`scripts/test` reads it the same way).
pub fn in_ci() -> bool {
    qnbd::testing::in_ci()
}

/// Skips (part of) a test: prints `SKIP what: why` and returns, or panics under CI, where every
/// test must run in full. The caller returns (or leaves the skipped part out) afterwards.
pub fn skip(what: &str, why: &str) {
    if in_ci() {
        panic!("{what}: {why} (CI: a skip is a failure)");
    }
    eprintln!("SKIP {what}: {why}");
}

/// A tool's messages as QEMU words them: every line without its program prefix (`qemu-img: `,
/// `qemu-nbd: `, `qnbd: `) and without qnbd's `hint:` lines (what to do, added after QEMU's
/// words when run as qnbd), so qnbd's stderr compares with QEMU's.
pub fn qemu_words(stderr: &str) -> String {
    stderr
        .lines()
        .filter(|l| !l.starts_with("hint: "))
        .map(|l| {
            ["qemu-img: ", "qemu-nbd: ", "qnbd: "]
                .iter()
                .find_map(|p| l.strip_prefix(p))
                .unwrap_or(l)
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Whether an executable named `tool` is on `PATH`.
pub fn have_tool(tool: &str) -> bool {
    let Some(path) = std::env::var_os("PATH") else {
        return false;
    };
    std::env::split_paths(&path).any(|dir| {
        fs::metadata(dir.join(tool))
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    })
}

/// True when every tool is present. Otherwise prints why `what` is skipped and returns false, or
/// panics under CI.
pub fn require_tools(what: &str, tools: &[&str]) -> bool {
    let missing: Vec<&str> = tools.iter().copied().filter(|t| !have_tool(t)).collect();
    if missing.is_empty() {
        return true;
    }
    skip(
        what,
        &format!(
            "missing tool(s): {} (scripts/test installs them when run as root)",
            missing.join(", ")
        ),
    );
    false
}

// ---------------------------------------------------------------------------------------------
// Running programs

/// What a finished program left behind.
#[derive(Debug)]
pub struct Run {
    /// The command line, for messages.
    pub command: String,
    /// Exit code; `None` if killed by a signal (or by the timeout).
    pub code: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: String,
    pub timed_out: bool,
}

impl Run {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// One paragraph saying how the program ended, for mismatch reports.
    pub fn outcome(&self) -> String {
        let how = match (self.timed_out, self.code) {
            (true, _) => "timed out".to_string(),
            (false, Some(c)) => format!("exit {c}"),
            (false, None) => "killed by a signal".to_string(),
        };
        let err = self.stderr.trim_end();
        if err.is_empty() {
            how
        } else {
            format!("{how}, stderr: {}", clip(err, 600))
        }
    }
}

/// Per-command time limit: `QNBD_TEST_TIMEOUT` seconds, default 300.
pub fn command_timeout() -> Duration {
    let secs = std::env::var("QNBD_TEST_TIMEOUT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    Duration::from_secs(secs)
}

/// Runs `cmd` to completion (stdin closed, output captured), killing it after
/// [`command_timeout`].
pub fn run_command(mut cmd: Command) -> Run {
    let command = describe_command(&cmd);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {command}: {e}"));
    let mut out = child.stdout.take().expect("piped stdout");
    let mut err = child.stderr.take().expect("piped stderr");
    let out_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = out.read_to_end(&mut buf);
        buf
    });
    let err_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = err.read_to_end(&mut buf);
        buf
    });
    let deadline = Instant::now() + command_timeout();
    let mut timed_out = false;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() >= deadline => {
                timed_out = true;
                let _ = child.kill();
                break child.wait().ok();
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => panic!("waiting for {command}: {e}"),
        }
    };
    let stdout = out_reader.join().unwrap_or_default();
    let stderr = String::from_utf8_lossy(&err_reader.join().unwrap_or_default()).into_owned();
    Run {
        command,
        code: if timed_out {
            None
        } else {
            status.and_then(|s| s.code())
        },
        stdout,
        stderr,
        timed_out,
    }
}

fn describe_command(cmd: &Command) -> String {
    let mut s = String::new();
    for (k, v) in cmd.get_envs() {
        if let Some(v) = v {
            let _ = write!(s, "{}={} ", k.to_string_lossy(), v.to_string_lossy());
        }
    }
    let prog = Path::new(cmd.get_program());
    s.push_str(
        &prog
            .file_name()
            .unwrap_or(cmd.get_program())
            .to_string_lossy(),
    );
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs a QEMU tool (or any program on `PATH`) in `cwd`.
pub fn tool<I, S>(program: &str, cwd: &Path, args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(program);
    cmd.current_dir(cwd).args(args);
    run_command(cmd)
}

// ---------------------------------------------------------------------------------------------
// The qnbd binary

/// The I/O engines qnbd can run on (`QNBD_IO_ENGINE`). Oracle comparisons run under each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IoEngine {
    Sync,
    IoUring,
}

impl IoEngine {
    pub const ALL: [IoEngine; 2] = [IoEngine::Sync, IoEngine::IoUring];

    /// The value of `QNBD_IO_ENGINE` that selects this engine.
    pub fn as_str(self) -> &'static str {
        match self {
            IoEngine::Sync => "sync",
            IoEngine::IoUring => "io_uring",
        }
    }
}

/// Path of the `qnbd` binary these tests drive: `$QNBD_BIN` if set, else the binary of this test
/// build's profile, built (once per test process) with `cargo build --profile P --bin qnbd`.
/// Cargo does nothing when it is up to date, and rebuilds it when `src/` changed since.
pub fn qnbd_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("QNBD_BIN") {
            return PathBuf::from(bin);
        }
        let profile_dir = profile_dir();
        let profile = match profile_dir.file_name().and_then(OsStr::to_str) {
            Some("debug") | None => "dev".to_string(),
            Some(p) => p.to_string(),
        };
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let target = target_dir();
        let mut cmd = Command::new(cargo);
        cmd.current_dir(workspace_root())
            .args(["build", "--quiet", "--profile", &profile])
            .args(["--package", "qnbd", "--bin", "qnbd", "--target-dir"])
            .arg(&target);
        let run = run_command(cmd);
        assert!(
            run.success(),
            "building the qnbd binary failed ({}):\n{}",
            run.command,
            run.stderr
        );
        let bin = profile_dir.join("qnbd");
        assert!(
            bin.is_file(),
            "cargo built qnbd but {} is missing",
            bin.display()
        );
        bin
    })
}

/// Runs `qnbd ARGS` in `cwd` with `QNBD_IO_ENGINE=engine`.
pub fn qnbd<I, S>(engine: IoEngine, cwd: &Path, args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(qnbd_bin());
    cmd.current_dir(cwd)
        .env("QNBD_IO_ENGINE", engine.as_str())
        .args(args);
    run_command(cmd)
}

// ---------------------------------------------------------------------------------------------
// The reference set

/// Tools `images/make-reference-images.sh` needs for a complete set (NBD truth included).
pub const REFERENCE_TOOLS: &[&str] = &[
    "qemu-img",
    "qemu-io",
    "qemu-nbd",
    "nbdinfo",
    "python3",
    "sha256sum",
    "truncate",
];

/// One line of `MANIFEST.tsv`.
#[derive(Debug, Clone)]
pub struct RefImage {
    pub name: String,
    /// What `qemu-img check` exits with on this image.
    pub check_rc: i32,
    pub description: String,
}

impl RefImage {
    /// The format the truth was recorded with (`-f`): raw for `*.raw`, else qcow2.
    pub fn format(&self) -> &'static str {
        if self.name.ends_with(".raw") {
            "raw"
        } else {
            "qcow2"
        }
    }
}

/// The built reference set: `dir` holds the images (run tools there, with relative names, as
/// QEMU's truth did), `dir/truth/` QEMU's answers.
#[derive(Debug)]
pub struct ReferenceSet {
    pub dir: PathBuf,
    pub images: Vec<RefImage>,
}

impl ReferenceSet {
    pub fn truth_path(&self, name: &str, suffix: &str) -> PathBuf {
        self.dir.join("truth").join(format!("{name}.{suffix}"))
    }

    /// The truth file's text, `None` when QEMU produced none.
    pub fn truth_text(&self, name: &str, suffix: &str) -> Option<String> {
        fs::read_to_string(self.truth_path(name, suffix)).ok()
    }

    /// The truth file parsed as JSON; `None` when absent or empty (QEMU failed).
    pub fn truth_json(&self, name: &str, suffix: &str) -> Option<Value> {
        let text = self.truth_text(name, suffix)?;
        if text.trim().is_empty() {
            return None;
        }
        Some(serde_json::from_str(&text).unwrap_or_else(|e| {
            panic!("truth file {name}.{suffix} is not JSON: {e}");
        }))
    }

    /// First line of QEMU's error output for `name.suffix` (e.g. `info.err`), if any.
    pub fn truth_error(&self, name: &str, suffix: &str) -> Option<String> {
        let text = self.truth_text(name, suffix)?;
        let line = text.lines().find(|l| !l.trim().is_empty())?;
        Some(line.to_string())
    }

    pub fn image(&self, name: &str) -> &RefImage {
        self.images
            .iter()
            .find(|i| i.name == name)
            .unwrap_or_else(|| panic!("{name} is not in the reference set's MANIFEST.tsv"))
    }

    /// What `qemu-img info --output=json --backing-chain -U -f FMT NAME` gave.
    pub fn expected_info(&self, name: &str) -> Expect<Value> {
        match self.truth_json(name, "info.json") {
            Some(v) => Expect::Value(v),
            None => Expect::Refusal(self.refusal_text(name, &["info.err"])),
        }
    }

    /// What `qemu-img map --output=json -f FMT NAME` gave (without a key for encrypted images).
    pub fn expected_map(&self, name: &str) -> Expect<Value> {
        if self.truth_path(name, "map-nosecret.err").exists() {
            return Expect::Refusal(self.refusal_text(name, &["map-nosecret.err"]));
        }
        match self.truth_json(name, "map.json") {
            Some(v) => Expect::Value(v),
            None => Expect::Refusal(self.refusal_text(name, &["map.err"])),
        }
    }

    /// sha256 of `qemu-img convert -O raw -f FMT NAME` (without a key for encrypted images).
    pub fn expected_sha256(&self, name: &str) -> Expect<String> {
        if self.truth_path(name, "sha256-nosecret.err").exists() {
            return Expect::Refusal(self.refusal_text(name, &["sha256-nosecret.err"]));
        }
        match self.truth_text(name, "sha256") {
            Some(s) if !s.trim().is_empty() => Expect::Value(s.trim().to_string()),
            _ => Expect::Refusal(self.refusal_text(name, &["sha256.err"])),
        }
    }

    fn refusal_text(&self, name: &str, suffixes: &[&str]) -> String {
        suffixes
            .iter()
            .find_map(|s| self.truth_error(name, s))
            .unwrap_or_else(|| "qemu-img failed without a message".to_string())
    }
}

/// The reference set, built on first use; `None` (test skipped, reason printed) when the tools
/// to build it are missing outside CI.
pub fn reference_set() -> Option<&'static ReferenceSet> {
    static SET: OnceLock<Result<Option<ReferenceSet>, String>> = OnceLock::new();
    let set = SET.get_or_init(|| {
        if !require_tools("reference images", REFERENCE_TOOLS) {
            return Ok(None);
        }
        build_reference_set().map(Some)
    });
    match set {
        Ok(set) => set.as_ref(),
        Err(e) => panic!("{e}"),
    }
}

/// Hash of everything the reference set depends on: the script and the QEMU that ran it.
fn reference_stamp(script: &Path) -> Result<String, String> {
    let mut h = Sha256::new();
    h.update(b"qnbd reference set v1\n");
    h.update(fs::read(script).map_err(|e| format!("reading {}: {e}", script.display()))?);
    for t in ["qemu-img", "qemu-io", "qemu-nbd"] {
        let v = tool(t, &workspace_root(), ["--version"]);
        h.update(&v.stdout);
    }
    h.update(format!("nbdinfo={}\n", have_tool("nbdinfo")).as_bytes());
    Ok(hex(&h.finalize()))
}

fn build_reference_set() -> Result<ReferenceSet, String> {
    let target = target_dir();
    fs::create_dir_all(&target).map_err(|e| format!("creating {}: {e}", target.display()))?;
    let dir = target.join("reference-images");
    let script = images_dir().join("make-reference-images.sh");
    let stamp = reference_stamp(&script)?;

    // One builder at a time across test processes; the lock goes with the file handle.
    let lock_path = target.join("reference-images.lock");
    let lock =
        File::create(&lock_path).map_err(|e| format!("creating {}: {e}", lock_path.display()))?;
    lock.lock()
        .map_err(|e| format!("locking {}: {e}", lock_path.display()))?;

    let stamp_path = dir.join("STAMP");
    let current = fs::read_to_string(&stamp_path).unwrap_or_default();
    if current.trim() != stamp || !dir.join("MANIFEST.tsv").is_file() {
        let fresh = target.join("reference-images.new");
        for d in [&dir, &fresh] {
            if d.exists() {
                fs::remove_dir_all(d).map_err(|e| format!("removing {}: {e}", d.display()))?;
            }
        }
        let log_path = target.join("reference-images.log");
        eprintln!(
            "building the reference images into {} (log: {}) ...",
            dir.display(),
            log_path.display()
        );
        let started = Instant::now();
        let log =
            File::create(&log_path).map_err(|e| format!("creating {}: {e}", log_path.display()))?;
        let log_err = log
            .try_clone()
            .map_err(|e| format!("cloning the log handle: {e}"))?;
        let status = Command::new("bash")
            .arg(&script)
            .arg(&fresh)
            .env_remove("TRUTH")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .status()
            .map_err(|e| format!("running {}: {e}", script.display()))?;
        if !status.success() {
            let log_text = fs::read_to_string(&log_path).unwrap_or_default();
            let tail: Vec<&str> = log_text.lines().rev().take(30).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            return Err(format!(
                "{} failed ({status}); last lines of {}:\n{}",
                script.display(),
                log_path.display(),
                tail.join("\n")
            ));
        }
        fs::write(fresh.join("STAMP"), format!("{stamp}\n"))
            .map_err(|e| format!("writing the stamp: {e}"))?;
        fs::rename(&fresh, &dir).map_err(|e| format!("renaming {}: {e}", fresh.display()))?;
        eprintln!(
            "reference images built in {:.0} s",
            started.elapsed().as_secs_f64()
        );
    }
    drop(lock);
    load_reference_set(dir)
}

fn load_reference_set(dir: PathBuf) -> Result<ReferenceSet, String> {
    let manifest = dir.join("MANIFEST.tsv");
    let text = fs::read_to_string(&manifest)
        .map_err(|e| format!("reading {}: {e}", manifest.display()))?;
    let mut images = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let mut fields = line.splitn(3, '\t');
        let (Some(name), Some(rc), Some(description)) =
            (fields.next(), fields.next(), fields.next())
        else {
            return Err(format!(
                "{}:{}: expected 3 fields",
                manifest.display(),
                n + 1
            ));
        };
        let check_rc = rc
            .parse()
            .map_err(|e| format!("{}:{}: check rc {rc:?}: {e}", manifest.display(), n + 1))?;
        images.push(RefImage {
            name: name.to_string(),
            check_rc,
            description: description.to_string(),
        });
    }
    Ok(ReferenceSet { dir, images })
}

// ---------------------------------------------------------------------------------------------
// Comparisons

/// What QEMU did with a command line: produced a value, or refused (its message).
#[derive(Debug, Clone)]
pub enum Expect<T> {
    Value(T),
    Refusal(String),
}

/// How to compare two programs' standard output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    /// Parsed JSON values must be equal (key order free); differences listed by path.
    Json,
    /// A `map --output=json` extent list: equal values, differences shown extent by extent.
    MapJson,
    /// Text, line for line.
    Text,
}

/// qnbd's `ours` against what qemu-img did with the same arguments (`qemu`): both refuse, or both
/// succeed with equal output.
pub fn compare_runs(qemu: &Run, ours: &Run, output: Output) -> Result<(), String> {
    if !qemu.success() {
        let msg = qemu.stderr.lines().find(|l| !l.trim().is_empty());
        return check_refusal(ours, msg.unwrap_or("qemu-img failed without a message"));
    }
    if output == Output::Text {
        if !ours.success() {
            return Err(format!("qnbd failed: {}", ours.outcome()));
        }
        let lines =
            |r: &Run| -> Vec<String> { r.stdout_text().lines().map(String::from).collect() };
        let diff = line_diff(&lines(qemu), &lines(ours), 2);
        return if diff.is_empty() {
            Ok(())
        } else {
            Err(diff.join("\n"))
        };
    }
    let expected: Value = serde_json::from_slice(&qemu.stdout)
        .map_err(|e| format!("qemu-img printed no valid JSON ({e}): {}", qemu.command))?;
    let actual = parse_json_output(ours)?;
    if expected == actual {
        return Ok(());
    }
    Err(match output {
        Output::MapJson => line_diff(&extent_lines(&expected), &extent_lines(&actual), 2),
        _ => json_diff(&expected, &actual),
    }
    .join("\n"))
}

/// qnbd must refuse the way the CLI contract says: exit 1, message starting with `qnbd: `.
pub fn check_refusal(run: &Run, qemu_message: &str) -> Result<(), String> {
    if run.code == Some(1) && run.stderr.starts_with("qnbd: ") {
        return Ok(());
    }
    Err(format!(
        "qemu-img refused ({}); qnbd must exit 1 with a \"qnbd: \" message, but: {}",
        clip(qemu_message, 200),
        run.outcome()
    ))
}

/// `qnbd info -f FMT --output=json --backing-chain -U NAME` in `dir` against `expect`.
pub fn check_info(
    engine: IoEngine,
    dir: &Path,
    name: &str,
    format: &str,
    expect: &Expect<Value>,
) -> Result<(), String> {
    let run = qnbd(
        engine,
        dir,
        [
            "info",
            "-f",
            format,
            "--output=json",
            "--backing-chain",
            "-U",
            name,
        ],
    );
    let expected = match expect {
        Expect::Refusal(msg) => return check_refusal(&run, msg),
        Expect::Value(v) => v,
    };
    let actual = parse_json_output(&run)?;
    let diff = json_diff(expected, &actual);
    if diff.is_empty() {
        Ok(())
    } else {
        Err(diff.join("\n"))
    }
}

/// `qnbd map -f FMT --output=json NAME` in `dir` against `expect`.
pub fn check_map(
    engine: IoEngine,
    dir: &Path,
    name: &str,
    format: &str,
    expect: &Expect<Value>,
) -> Result<(), String> {
    let run = qnbd(engine, dir, ["map", "-f", format, "--output=json", name]);
    let expected = match expect {
        Expect::Refusal(msg) => return check_refusal(&run, msg),
        Expect::Value(v) => v,
    };
    let actual = parse_json_output(&run)?;
    if *expected == actual {
        return Ok(());
    }
    Err(line_diff(&extent_lines(expected), &extent_lines(&actual), 2).join("\n"))
}

/// `qnbd convert -f FMT -O raw NAME DST` in `dir`; the sha256 of DST against `expect`. On a
/// mismatch, and when qemu-img is at hand, the report says where the contents differ.
pub fn check_convert(
    engine: IoEngine,
    dir: &Path,
    name: &str,
    format: &str,
    expect: &Expect<String>,
) -> Result<(), String> {
    let scratch = scratch_dir();
    let dst = scratch.path().join("out.raw");
    let run = qnbd(
        engine,
        dir,
        [
            OsStr::new("convert"),
            OsStr::new("-f"),
            OsStr::new(format),
            OsStr::new("-O"),
            OsStr::new("raw"),
            OsStr::new(name),
            dst.as_os_str(),
        ],
    );
    let expected = match expect {
        Expect::Refusal(msg) => return check_refusal(&run, msg),
        Expect::Value(v) => v,
    };
    if !run.success() {
        return Err(format!("qnbd convert failed: {}", run.outcome()));
    }
    let actual = sha256_file(&dst).map_err(|e| format!("reading qnbd's output: {e}"))?;
    if actual == *expected {
        return Ok(());
    }
    let mut msg = format!("sha256 qemu-img {expected}, qnbd {actual}");
    if have_tool("qemu-img") {
        let reference = scratch.path().join("qemu.raw");
        let q = tool(
            "qemu-img",
            dir,
            [
                OsStr::new("convert"),
                OsStr::new("-U"),
                OsStr::new("-f"),
                OsStr::new(format),
                OsStr::new("-O"),
                OsStr::new("raw"),
                OsStr::new(name),
                reference.as_os_str(),
            ],
        );
        if q.success() {
            match describe_difference(&reference, &dst) {
                Ok(d) => msg.push_str(&format!("\n{d}")),
                Err(e) => msg.push_str(&format!("\n(comparing contents: {e})")),
            }
        }
    }
    Err(msg)
}

fn parse_json_output(run: &Run) -> Result<Value, String> {
    if !run.success() {
        return Err(format!("qnbd failed: {}", run.outcome()));
    }
    serde_json::from_slice(&run.stdout).map_err(|e| {
        format!(
            "qnbd printed no valid JSON ({e}); stdout starts: {}",
            clip(&run.stdout_text(), 300)
        )
    })
}

/// Key order of `qemu-img map --output=json` extents.
const EXTENT_KEYS: [&str; 8] = [
    "start",
    "length",
    "depth",
    "present",
    "zero",
    "data",
    "compressed",
    "offset",
];

/// One line per map extent, keys in qemu-img's order (unknown keys after them), so two maps can
/// be compared with [`line_diff`].
pub fn extent_lines(map: &Value) -> Vec<String> {
    let Some(extents) = map.as_array() else {
        return vec![format!("(not an array) {}", clip(&map.to_string(), 300))];
    };
    extents
        .iter()
        .map(|e| match e.as_object() {
            Some(obj) => {
                let mut parts: Vec<String> = EXTENT_KEYS
                    .iter()
                    .filter_map(|k| obj.get(*k).map(|v| format!("\"{k}\": {v}")))
                    .collect();
                let mut extra: Vec<String> = obj
                    .iter()
                    .filter(|(k, _)| !EXTENT_KEYS.contains(&k.as_str()))
                    .map(|(k, v)| format!("\"{k}\": {v}"))
                    .collect();
                extra.sort();
                parts.extend(extra);
                format!("{{ {} }}", parts.join(", "))
            }
            None => e.to_string(),
        })
        .collect()
}

/// Differences between two JSON values as `path: qemu-img X, qnbd Y` lines (objects compared by
/// key, arrays by index); empty when equal.
pub fn json_diff(expected: &Value, actual: &Value) -> Vec<String> {
    let mut out = Vec::new();
    walk_json("$", expected, actual, &mut out);
    out
}

fn walk_json(path: &str, expected: &Value, actual: &Value, out: &mut Vec<String>) {
    match (expected, actual) {
        (Value::Object(e), Value::Object(a)) => {
            for (k, ev) in e {
                let p = format!("{path}.{k}");
                match a.get(k) {
                    Some(av) => walk_json(&p, ev, av, out),
                    None => out.push(format!("{p}: qemu-img {}, qnbd (absent)", short(ev))),
                }
            }
            for (k, av) in a {
                if !e.contains_key(k) {
                    out.push(format!("{path}.{k}: qemu-img (absent), qnbd {}", short(av)));
                }
            }
        }
        (Value::Array(e), Value::Array(a)) => {
            for (i, (ev, av)) in e.iter().zip(a).enumerate() {
                walk_json(&format!("{path}[{i}]"), ev, av, out);
            }
            if e.len() != a.len() {
                out.push(format!(
                    "{path}: qemu-img has {} elements, qnbd {}",
                    e.len(),
                    a.len()
                ));
                for (i, v) in e.iter().enumerate().skip(a.len()) {
                    out.push(format!("{path}[{i}]: qemu-img {}, qnbd (absent)", short(v)));
                }
                for (i, v) in a.iter().enumerate().skip(e.len()) {
                    out.push(format!("{path}[{i}]: qemu-img (absent), qnbd {}", short(v)));
                }
            }
        }
        (e, a) if e != a => out.push(format!("{path}: qemu-img {}, qnbd {}", short(e), short(a))),
        _ => {}
    }
}

fn short(v: &Value) -> String {
    clip(&v.to_string(), 160)
}

/// A unified-style diff of two line lists (`-` qemu-img only, `+` qnbd only, ` ` context),
/// with `context` lines around each change; empty when equal.
pub fn line_diff(expected: &[String], actual: &[String], context: usize) -> Vec<String> {
    if expected == actual {
        return Vec::new();
    }
    let ops = diff_ops(expected, actual);
    let changed: Vec<bool> = ops
        .iter()
        .map(|op| !matches!(op, DiffOp::Same(_)))
        .collect();
    let mut out = Vec::new();
    let mut last_shown: Option<usize> = None;
    for (i, op) in ops.iter().enumerate() {
        let near_change =
            (i.saturating_sub(context)..=(i + context).min(ops.len() - 1)).any(|j| changed[j]);
        if !near_change {
            continue;
        }
        if let Some(l) = last_shown {
            if i > l + 1 {
                out.push("  ...".to_string());
            }
        } else if i > 0 {
            out.push("  ...".to_string());
        }
        last_shown = Some(i);
        out.push(match op {
            DiffOp::Same(s) => format!("  {s}"),
            DiffOp::Expected(s) => format!("- {s}"),
            DiffOp::Actual(s) => format!("+ {s}"),
        });
    }
    if last_shown.is_some_and(|l| l + 1 < ops.len()) {
        out.push("  ...".to_string());
    }
    out
}

enum DiffOp<'a> {
    Same(&'a str),
    Expected(&'a str),
    Actual(&'a str),
}

fn diff_ops<'a>(e: &'a [String], a: &'a [String]) -> Vec<DiffOp<'a>> {
    // Common prefix and suffix first; LCS on the middle (bounded, else plain replacement).
    let prefix = e.iter().zip(a).take_while(|(x, y)| x == y).count();
    let suffix = e[prefix..]
        .iter()
        .rev()
        .zip(a[prefix..].iter().rev())
        .take_while(|(x, y)| x == y)
        .count();
    let em = &e[prefix..e.len() - suffix];
    let am = &a[prefix..a.len() - suffix];
    let mut ops: Vec<DiffOp<'a>> = e[..prefix].iter().map(|s| DiffOp::Same(s)).collect();
    if em.len().saturating_mul(am.len()) <= 16_000_000 {
        let (n, m) = (em.len(), am.len());
        let mut lcs = vec![0u32; (n + 1) * (m + 1)];
        for i in (0..n).rev() {
            for j in (0..m).rev() {
                lcs[i * (m + 1) + j] = if em[i] == am[j] {
                    lcs[(i + 1) * (m + 1) + j + 1] + 1
                } else {
                    lcs[(i + 1) * (m + 1) + j].max(lcs[i * (m + 1) + j + 1])
                };
            }
        }
        let (mut i, mut j) = (0, 0);
        while i < n || j < m {
            if i < n && j < m && em[i] == am[j] {
                ops.push(DiffOp::Same(&em[i]));
                i += 1;
                j += 1;
            } else if i < n && (j == m || lcs[(i + 1) * (m + 1) + j] >= lcs[i * (m + 1) + j + 1]) {
                // qemu-img's line first, as `diff -u` shows a change
                ops.push(DiffOp::Expected(&em[i]));
                i += 1;
            } else {
                ops.push(DiffOp::Actual(&am[j]));
                j += 1;
            }
        }
    } else {
        ops.extend(em.iter().map(|s| DiffOp::Expected(s)));
        ops.extend(am.iter().map(|s| DiffOp::Actual(s)));
    }
    ops.extend(e[e.len() - suffix..].iter().map(|s| DiffOp::Same(s)));
    ops
}

/// sha256 of a file, lowercase hex.
pub fn sha256_file(path: &Path) -> io::Result<String> {
    let mut f = File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Where two raw disks differ: sizes, the first differing byte, how many 64 KiB blocks differ
/// and the first few of them.
pub fn describe_difference(expected: &Path, actual: &Path) -> io::Result<String> {
    const BLOCK: usize = 64 * 1024;
    let (el, al) = (fs::metadata(expected)?.len(), fs::metadata(actual)?.len());
    let mut out = String::new();
    if el != al {
        let _ = writeln!(out, "size: qemu-img {el}, qnbd {al}");
    }
    let (mut e, mut a) = (File::open(expected)?, File::open(actual)?);
    let (mut eb, mut ab) = (vec![0u8; BLOCK], vec![0u8; BLOCK]);
    let mut offset = 0u64;
    let mut first: Option<(u64, u8, u8)> = None;
    let mut blocks = 0u64;
    let mut listed: Vec<u64> = Vec::new();
    loop {
        let en = read_full(&mut e, &mut eb)?;
        let an = read_full(&mut a, &mut ab)?;
        let n = en.min(an);
        if n == 0 {
            break;
        }
        if eb[..n] != ab[..n] {
            blocks += 1;
            if listed.len() < 8 {
                listed.push(offset);
            }
            if first.is_none() {
                let i = (0..n).find(|&i| eb[i] != ab[i]).unwrap_or(0);
                first = Some((offset + i as u64, eb[i], ab[i]));
            }
        }
        offset += n as u64;
        if en < BLOCK || an < BLOCK {
            break;
        }
    }
    match first {
        Some((off, q, n)) => {
            let list: Vec<String> = listed.iter().map(|o| format!("{o:#x}")).collect();
            let _ = write!(
                out,
                "first difference at {off:#x} (qemu-img {q:#04x}, qnbd {n:#04x}); \
                 {blocks} differing 64 KiB block(s), starting at {}",
                list.join(", ")
            );
        }
        None if el == al => {
            let _ = write!(
                out,
                "contents equal although the hashes differ (file changed?)"
            );
        }
        None => {
            let _ = write!(out, "common prefix identical");
        }
    }
    Ok(out)
}

fn read_full(f: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// `s` cut to `max` characters, with a marker when cut.
pub fn clip(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let cut: String = s.chars().take(max).collect();
        format!("{cut}...")
    }
}

// ---------------------------------------------------------------------------------------------
// Collecting mismatches

/// Every failed comparison of one test, reported together at the end. Identical findings for
/// several engines are reported once, with the engines listed.
pub struct Mismatches {
    what: String,
    checked: usize,
    found: BTreeMap<(String, String), Vec<IoEngine>>,
}

impl Mismatches {
    /// `what` names the comparison, e.g. "qnbd info --output=json vs qemu-img".
    pub fn new(what: impl Into<String>) -> Self {
        Mismatches {
            what: what.into(),
            checked: 0,
            found: BTreeMap::new(),
        }
    }

    /// Records the result of one comparison of `image` under `engine`.
    pub fn record(&mut self, image: &str, engine: IoEngine, result: Result<(), String>) {
        self.checked += 1;
        if let Err(detail) = result {
            self.found
                .entry((image.to_string(), detail))
                .or_default()
                .push(engine);
        }
    }

    /// The distinct images with at least one mismatch.
    pub fn images(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.found.keys().map(|(i, _)| i.as_str()).collect();
        v.dedup();
        v
    }

    /// The full report (empty when all comparisons agreed).
    pub fn report(&self) -> String {
        if self.found.is_empty() {
            return String::new();
        }
        let failed: usize = self.found.values().map(Vec::len).sum();
        let images = self.images();
        let mut out = format!(
            "{}: {failed} of {} comparisons differ, {} image(s): {}\n",
            self.what,
            self.checked,
            images.len(),
            images.join(" ")
        );
        for ((image, detail), engines) in &self.found {
            let engines: Vec<&str> = engines.iter().map(|e| e.as_str()).collect();
            let _ = writeln!(out, "\n=== {image} [{}]", engines.join(", "));
            let lines: Vec<&str> = detail.lines().collect();
            for l in lines.iter().take(60) {
                let _ = writeln!(out, "    {l}");
            }
            if lines.len() > 60 {
                let _ = writeln!(out, "    ... ({} more lines)", lines.len() - 60);
            }
        }
        out
    }

    /// Panics with the report if anything differed; prints a one-line summary either way.
    pub fn assert_none(self) {
        let report = self.report();
        if report.is_empty() {
            eprintln!("{}: all {} comparisons agree", self.what, self.checked);
            return;
        }
        panic!("\n{report}");
    }
}

// ---------------------------------------------------------------------------------------------
// Servers, checks, corpora

/// An NBD server process (`qnbd serve` or `qemu-nbd`) on a Unix socket: started once it
/// greets (see [`nbd_greets`]) (a server that exits first is a panic with its stderr), SIGTERM by
/// [`NbdServer::stop`], SIGKILL on drop.
pub struct NbdServer {
    child: std::process::Child,
    pub uri: String,
}

impl NbdServer {
    pub fn start(dir: &Path, program: &Path, args: &[&str], sock: &Path) -> NbdServer {
        Self::start_env(dir, program, args, sock, &[])
    }

    /// [`NbdServer::start`] with extra environment variables.
    pub fn start_env(
        dir: &Path,
        program: &Path,
        args: &[&str],
        sock: &Path,
        env: &[(&str, &str)],
    ) -> NbdServer {
        let _ = fs::remove_file(sock);
        let child = Command::new(program)
            .envs(env.iter().copied())
            .current_dir(dir)
            .args(args)
            .arg("-k")
            .arg(sock)
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", program.display()));
        let mut s = NbdServer {
            child,
            uri: format!("nbd+unix:///?socket={}", sock.display()),
        };
        let t = Instant::now();
        while !nbd_greets(sock, Duration::from_secs(20)) {
            if let Ok(Some(st)) = s.child.try_wait() {
                let mut err = String::new();
                if let Some(mut e) = s.child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                panic!("{} {args:?} exited with {st}: {err}", program.display());
            }
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        s
    }

    pub fn qnbd(dir: &Path, name: &str, args: &[&str]) -> NbdServer {
        let mut a = vec!["serve", "-t"];
        a.extend_from_slice(args);
        NbdServer::start(dir, qnbd_bin(), &a, &dir.join(format!("{name}.sock")))
    }

    pub fn qemu_nbd(dir: &Path, name: &str, args: &[&str]) -> NbdServer {
        let mut a = vec!["-t"];
        a.extend_from_slice(args);
        NbdServer::start(
            dir,
            Path::new("qemu-nbd"),
            &a,
            &dir.join(format!("{name}.sock")),
        )
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Wait (at most 30 s) for the server to end; its exit status.
    pub fn wait(&mut self) -> std::process::ExitStatus {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(30) {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("server {} did not end", self.uri);
    }

    /// Clean shutdown (both servers flush on SIGTERM).
    pub fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let st = self.wait();
        assert!(st.success(), "server {} after SIGTERM: {st}", self.uri);
    }
}

/// Whether a server on `sock` sends an NBD greeting (`NBDMAGIC`) within `wait`. A server may
/// listen before it opens its images (qemu-nbd does), and close the connection when the open
/// fails, so a socket that accepts is not yet a server that serves.
pub fn nbd_greets(sock: &Path, wait: Duration) -> bool {
    let Ok(mut c) = std::os::unix::net::UnixStream::connect(sock) else {
        return false;
    };
    let _ = c.set_read_timeout(Some(wait));
    let mut magic = [0u8; 8];
    std::io::Read::read_exact(&mut c, &mut magic).is_ok() && &magic == b"NBDMAGIC"
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a tool that must succeed (test setup): its output, or a panic with what it printed.
pub fn tool_ok<I, S>(program: &str, cwd: &Path, args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let r = tool(program, cwd, args);
    assert!(r.success(), "{}", r.outcome());
    r
}

/// `qemu-img check -f qcow2 IMG` (run in `cwd`, so relative backing and data file names
/// resolve): exit code and everything it printed.
pub fn qemu_img_check(cwd: &Path, img: &Path) -> (i32, String) {
    let r = tool(
        "qemu-img",
        cwd,
        [
            OsStr::new("check"),
            OsStr::new("-f"),
            OsStr::new("qcow2"),
            img.as_os_str(),
        ],
    );
    (
        r.code.unwrap_or(-1),
        format!("{}{}", r.stdout_text(), r.stderr),
    )
}

/// The inputs of a fuzz corpus or artifact directory (sorted; dot files and notes left out;
/// empty when the directory does not exist).
pub fn corpus_inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = rd
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .filter(|p| {
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            !name.starts_with('.') && !name.ends_with(".md")
        })
        .collect();
    v.sort();
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_diff_names_the_path_of_every_difference() {
        let qemu = json!([{"format": "qcow2", "cluster-size": 65536, "dirty-flag": false}]);
        let ours = json!([{"format": "qcow2", "cluster-size": 4096, "extra": 1}]);
        assert_eq!(
            json_diff(&qemu, &ours),
            [
                "$[0].cluster-size: qemu-img 65536, qnbd 4096",
                "$[0].dirty-flag: qemu-img false, qnbd (absent)",
                "$[0].extra: qemu-img (absent), qnbd 1",
            ]
        );
        assert!(json_diff(&qemu, &qemu).is_empty());
    }

    #[test]
    fn json_diff_ignores_key_order() {
        let a: Value = serde_json::from_str(r#"{"a": 1, "b": [1, 2]}"#).unwrap();
        let b: Value = serde_json::from_str(r#"{"b": [1, 2], "a": 1}"#).unwrap();
        assert_eq!(a, b);
        assert!(json_diff(&a, &b).is_empty());
    }

    #[test]
    fn line_diff_shows_qemu_lines_before_qnbd_lines_with_context() {
        let lines = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let qemu = lines(&["a", "b", "c", "d", "e", "f", "g"]);
        let ours = lines(&["a", "b", "c", "X", "e", "f", "g"]);
        assert_eq!(
            line_diff(&qemu, &ours, 1),
            ["  ...", "  c", "- d", "+ X", "  e", "  ..."]
        );
        assert!(line_diff(&qemu, &qemu, 1).is_empty());
    }

    #[test]
    fn extent_lines_use_qemu_img_key_order() {
        let map = json!([{"offset": 327680, "start": 0, "length": 65536, "depth": 0,
            "present": true, "zero": false, "data": true, "compressed": false}]);
        assert_eq!(
            extent_lines(&map),
            [concat!(
                r#"{ "start": 0, "length": 65536, "depth": 0, "present": true, "zero": false, "#,
                r#""data": true, "compressed": false, "offset": 327680 }"#
            )]
        );
    }

    #[test]
    fn mismatches_report_every_image_once_per_distinct_finding() {
        let mut m = Mismatches::new("map");
        m.record("a.qcow2", IoEngine::Sync, Err("differs".into()));
        m.record("a.qcow2", IoEngine::IoUring, Err("differs".into()));
        m.record("b.qcow2", IoEngine::Sync, Ok(()));
        m.record("c.qcow2", IoEngine::IoUring, Err("other".into()));
        assert_eq!(m.images(), ["a.qcow2", "c.qcow2"]);
        let report = m.report();
        assert!(report.starts_with("map: 3 of 4 comparisons differ, 2 image(s): a.qcow2 c.qcow2"));
        assert!(report.contains("=== a.qcow2 [sync, io_uring]\n    differs"));
        assert!(report.contains("=== c.qcow2 [io_uring]\n    other"));
    }
}
