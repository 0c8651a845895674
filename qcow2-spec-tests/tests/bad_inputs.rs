//! Malformed and hostile images: the read-side cases 1–30 and 35–49 of `bad-inputs.md`.
//!
//! Every image is built at test time: a valid image from `qemu-img create` and `qemu-io`, then
//! bytes poked at header, L1, L2, refcount, extension, snapshot and bitmap-directory offsets that
//! this file finds by parsing the image itself. Tests are named after the case number.
//!
//! Every run of the binary is bounded (20 s wall clock, 512 MiB address space through
//! `prlimit`) and must end with exit 0, or with exit 1 and a message on stderr that starts with
//! `qnbd: `. A panic, a signal, exit 101 or a timeout fails the case whatever was expected, and a
//! refused image must be left byte-for-byte unchanged. Expected messages are QEMU's wording where
//! `bad-inputs.md` quotes one, matched case-insensitively.
//!
//! The binary under test is `$QNBD_BIN` when set, else `qnbd` of this build's profile (built on
//! demand, see `qcow2_spec_tests::qnbd_bin`). The prefix checked on stderr is `qemu-img: ` for a binary of
//! that name, so `QNBD_BIN=/usr/bin/qemu-img` replays the same pokes against QEMU; the cases where this
//! project deliberately refuses what QEMU tolerates (9, 25, 26, 28, 43, 44, ...) then fail there.
//!
//! `BAD_INPUTS_VERBOSE=1` prints every run with its outcome and stderr.
//!
//! Out of scope here (write side or no CLI surface yet): 19 and 20 read-write opens, 22–24
//! write parts, 31–34 (refcount repair and allocation), 42 (`bitmap --add`), 45 (untrusted mode).

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::TcpListener;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use qcow2_spec_tests::{qnbd_bin, require_tools, scratch_dir};
use serde_json::Value;

/// Tools that build and bound the cases.
const TOOLS: &[&str] = &["qemu-img", "qemu-io", "prlimit", "mkfifo"];

// ---------------------------------------------------------------------------------------------
// qcow2 layout, as far as the tests need it (qcow2 spec, "Header" and "Header extensions").

/// qcow2 spec, "Header": magic `QFI\xfb`.
const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";
const OFF_VERSION: u64 = 4;
const OFF_BACKING_FILE_OFFSET: u64 = 8;
const OFF_BACKING_FILE_SIZE: u64 = 16;
const OFF_CLUSTER_BITS: u64 = 20;
const OFF_SIZE: u64 = 24;
const OFF_CRYPT_METHOD: u64 = 32;
const OFF_L1_SIZE: u64 = 36;
const OFF_L1_TABLE_OFFSET: u64 = 40;
const OFF_REFCOUNT_TABLE_OFFSET: u64 = 48;
const OFF_REFCOUNT_TABLE_CLUSTERS: u64 = 56;
const OFF_NB_SNAPSHOTS: u64 = 60;
const OFF_SNAPSHOTS_OFFSET: u64 = 64;
const OFF_INCOMPATIBLE: u64 = 72;
const OFF_COMPATIBLE: u64 = 80;
const OFF_AUTOCLEAR: u64 = 88;
const OFF_REFCOUNT_ORDER: u64 = 96;
const OFF_HEADER_LENGTH: u64 = 100;
const OFF_COMPRESSION_TYPE: u64 = 104;

/// qcow2 spec, "Header extensions": feature name table.
const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
/// qcow2 spec, "Header extensions": backing file format name.
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// qcow2 spec, "Header extensions": bitmaps.
const EXT_BITMAPS: u32 = 0x2385_2875;
/// qcow2 spec, "Header extensions": external data file name.
const EXT_DATA_FILE: u32 = 0x4441_5441;

/// qcow2 spec, "Cluster mapping": host offset bits of L1 and standard L2 entries.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// qcow2 spec, "Cluster mapping": refcount is exactly one.
const QCOW_OFLAG_COPIED: u64 = 1 << 63;
/// qcow2 spec, "Cluster mapping": compressed cluster descriptor follows.
const QCOW_OFLAG_COMPRESSED: u64 = 1 << 62;

const TIB: u64 = 1 << 40;

fn be_u32(b: &[u8], off: u64) -> u32 {
    let o = off as usize;
    u32::from_be_bytes(b[o..o + 4].try_into().unwrap())
}

fn be_u64(b: &[u8], off: u64) -> u64 {
    let o = off as usize;
    u64::from_be_bytes(b[o..o + 8].try_into().unwrap())
}

/// The header fields the pokes need.
#[derive(Debug, Clone)]
struct Header {
    backing_file_offset: u64,
    cluster_bits: u32,
    l1_table_offset: u64,
    refcount_table_offset: u64,
    incompatible: u64,
    header_length: u64,
}

impl Header {
    fn parse(b: &[u8]) -> Header {
        assert_eq!(&b[..4], QCOW2_MAGIC, "fixture is not qcow2");
        assert_eq!(be_u32(b, OFF_VERSION), 3, "fixtures are qcow2 v3");
        Header {
            backing_file_offset: be_u64(b, OFF_BACKING_FILE_OFFSET),
            cluster_bits: be_u32(b, OFF_CLUSTER_BITS),
            l1_table_offset: be_u64(b, OFF_L1_TABLE_OFFSET),
            refcount_table_offset: be_u64(b, OFF_REFCOUNT_TABLE_OFFSET),
            incompatible: be_u64(b, OFF_INCOMPATIBLE),
            header_length: u64::from(be_u32(b, OFF_HEADER_LENGTH)),
        }
    }

    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    fn extended_l2(&self) -> bool {
        self.incompatible & (1 << 4) != 0
    }

    fn l2_entry_size(&self) -> u64 {
        if self.extended_l2() {
            16
        } else {
            8
        }
    }
}

/// One header extension: where its 8-byte type/length prefix sits, its type and data length.
#[derive(Debug, Clone, Copy)]
struct Ext {
    at: u64,
    kind: u32,
    len: u32,
}

impl Ext {
    fn data(&self) -> u64 {
        self.at + 8
    }
}

fn extensions(b: &[u8]) -> Vec<Ext> {
    let h = Header::parse(b);
    let end = h.cluster_size().min(b.len() as u64);
    let mut at = h.header_length;
    let mut out = Vec::new();
    while at + 8 <= end {
        let kind = be_u32(b, at);
        let len = be_u32(b, at + 4);
        if kind == 0 {
            break;
        }
        out.push(Ext { at, kind, len });
        at += 8 + u64::from(len).next_multiple_of(8);
    }
    out
}

fn find_ext(b: &[u8], kind: u32) -> Ext {
    extensions(b)
        .into_iter()
        .find(|e| e.kind == kind)
        .unwrap_or_else(|| panic!("extension {kind:#x} not in fixture"))
}

/// Rewrites the extension area: `exts` in order, then the end marker. The image must not have a
/// backing file name (it would be overwritten).
fn set_extensions(path: &Path, exts: &[(u32, Vec<u8>)]) {
    let b = fs::read(path).unwrap();
    let h = Header::parse(&b);
    assert_eq!(
        h.backing_file_offset, 0,
        "set_extensions needs an image without backing"
    );
    let mut area = Vec::new();
    for (kind, data) in exts {
        area.extend_from_slice(&kind.to_be_bytes());
        area.extend_from_slice(&(data.len() as u32).to_be_bytes());
        area.extend_from_slice(data);
        area.resize(area.len().next_multiple_of(8), 0);
    }
    area.extend_from_slice(&[0; 8]);
    assert!(h.header_length + (area.len() as u64) <= h.cluster_size());
    poke(path, h.header_length, &area);
}

fn poke(path: &Path, off: u64, bytes: &[u8]) {
    let mut f = OpenOptions::new().write(true).open(path).unwrap();
    f.seek(SeekFrom::Start(off)).unwrap();
    f.write_all(bytes).unwrap();
}

fn poke_u8(path: &Path, off: u64, v: u8) {
    poke(path, off, &[v]);
}

fn poke_u16(path: &Path, off: u64, v: u16) {
    poke(path, off, &v.to_be_bytes());
}

fn poke_u32(path: &Path, off: u64, v: u32) {
    poke(path, off, &v.to_be_bytes());
}

fn poke_u64(path: &Path, off: u64, v: u64) {
    poke(path, off, &v.to_be_bytes());
}

fn or_u8(path: &Path, off: u64, bits: u8) {
    let b = fs::read(path).unwrap();
    poke_u8(path, off, b[off as usize] | bits);
}

/// File offset of the L1 entry for guest cluster `guest_cluster`.
fn l1_entry_at(b: &[u8], guest_cluster: u64) -> u64 {
    let h = Header::parse(b);
    let per_l2 = h.cluster_size() / h.l2_entry_size();
    h.l1_table_offset + 8 * (guest_cluster / per_l2)
}

/// File offset of the (first 8 bytes of the) L2 entry for guest cluster `guest_cluster`.
fn l2_entry_at(b: &[u8], guest_cluster: u64) -> u64 {
    let h = Header::parse(b);
    let per_l2 = h.cluster_size() / h.l2_entry_size();
    let l2 = be_u64(b, l1_entry_at(b, guest_cluster)) & OFFSET_MASK;
    assert_ne!(l2, 0, "guest cluster {guest_cluster} has no L2 table");
    l2 + h.l2_entry_size() * (guest_cluster % per_l2)
}

/// Host offset and additional-sector count of the compressed descriptor at L2 entry `at`.
fn compressed_descriptor(b: &[u8], at: u64) -> (u64, u64) {
    let h = Header::parse(b);
    let e = be_u64(b, at);
    assert_ne!(
        e & QCOW_OFLAG_COMPRESSED,
        0,
        "fixture cluster is not compressed"
    );
    let x = 62 - (u64::from(h.cluster_bits) - 8);
    (e & ((1 << x) - 1), (e >> x) & ((1 << (62 - x)) - 1))
}

fn compressed_entry(b: &[u8], host: u64, extra_sectors: u64) -> u64 {
    let h = Header::parse(b);
    let x = 62 - (u64::from(h.cluster_bits) - 8);
    QCOW_OFLAG_COMPRESSED | (extra_sectors << x) | host
}

/// The first bitmap directory entry: file offsets of the extension data and of the entry.
struct BitmapDir {
    ext: u64,
    dir: u64,
}

fn bitmap_dir(b: &[u8]) -> BitmapDir {
    let e = find_ext(b, EXT_BITMAPS);
    BitmapDir {
        ext: e.data(),
        dir: be_u64(b, e.data() + 16),
    }
}

/// Raw deflate (RFC 1951, one fixed-Huffman block) of `1 + 258 * repeats` copies of `byte`:
/// a few KiB that inflate far beyond one cluster.
fn deflate_bomb(byte: u8, repeats: usize) -> Vec<u8> {
    struct Bits {
        out: Vec<u8>,
        acc: u64,
        n: u32,
    }
    impl Bits {
        fn put(&mut self, v: u64, count: u32) {
            self.acc |= v << self.n;
            self.n += count;
            while self.n >= 8 {
                self.out.push(self.acc as u8);
                self.acc >>= 8;
                self.n -= 8;
            }
        }
        /// Huffman codes are sent most significant bit first.
        fn code(&mut self, code: u64, len: u32) {
            let rev = (0..len).fold(0, |r, i| r | (((code >> i) & 1) << (len - 1 - i)));
            self.put(rev, len);
        }
    }
    assert!(byte < 144);
    let mut w = Bits {
        out: Vec::new(),
        acc: 0,
        n: 0,
    };
    w.put(1, 1); // BFINAL
    w.put(1, 2); // BTYPE = fixed Huffman
    w.code(0x30 + u64::from(byte), 8); // literal
    for _ in 0..repeats {
        w.code(0xc0 + 5, 8); // length symbol 285 = 258 bytes
        w.code(0, 5); // distance 1
    }
    w.code(0, 7); // end of block
    w.put(0, 7);
    w.out
}

/// Deterministic noise (xorshift64*).
fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        seed ^= seed >> 12;
        seed ^= seed << 25;
        seed ^= seed >> 27;
        out.extend_from_slice(&seed.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

// ---------------------------------------------------------------------------------------------
// Running the binary under test.

struct Bin {
    path: PathBuf,
    prefix: String,
}

fn bin() -> &'static Bin {
    static BIN: OnceLock<Bin> = OnceLock::new();
    BIN.get_or_init(|| {
        let path = qnbd_bin().to_path_buf();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let tool = if name.starts_with("qemu-img") {
            "qemu-img"
        } else {
            "qnbd"
        };
        Bin {
            prefix: format!("{tool}: "),
            path,
        }
    })
}

const TIMEOUT: Duration = Duration::from_secs(20);
const ADDRESS_SPACE: u64 = 512 << 20;

#[derive(Debug)]
struct Run {
    cmd: String,
    code: Option<i32>,
    signal: Option<i32>,
    timed_out: bool,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("{}: stdout is not JSON ({e}):\n{}", self.cmd, self.stdout))
    }

    fn describe(&self) -> String {
        let status = if self.timed_out {
            "timed out after 20 s".to_string()
        } else if let Some(s) = self.signal {
            format!("killed by signal {s}")
        } else {
            format!("exit {}", self.code.unwrap_or(-1))
        };
        let err = self.stderr.trim_end();
        let err: String = err.chars().take(600).collect();
        format!("`{}` -> {status}, stderr: {err:?}", self.cmd)
    }
}

fn run_bin(dir: &Path, args: &[&str]) -> Run {
    let b = bin();
    let out_path = dir.join(".stdout");
    let err_path = dir.join(".stderr");
    let mut child = Command::new("prlimit")
        .arg(format!("--as={ADDRESS_SPACE}"))
        .arg("--core=0")
        .arg("--")
        .arg(&b.path)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(File::create(&out_path).unwrap())
        .stderr(File::create(&err_path).unwrap())
        .spawn()
        .expect("spawning prlimit (util-linux)");
    let start = Instant::now();
    let mut timed_out = false;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if start.elapsed() > TIMEOUT {
            timed_out = true;
            let _ = child.kill();
            break child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let mut stdout = String::new();
    let mut stderr = String::new();
    File::open(&out_path)
        .unwrap()
        .take(1 << 20)
        .read_to_string(&mut stdout)
        .ok();
    File::open(&err_path)
        .unwrap()
        .take(1 << 20)
        .read_to_string(&mut stderr)
        .ok();
    let shown: Vec<String> = args
        .iter()
        .map(|a| a.replace(&format!("{}/", dir.display()), ""))
        .collect();
    Run {
        cmd: format!("{} {}", b.prefix.trim_end_matches(": "), shown.join(" ")),
        code: status.code(),
        signal: status.signal(),
        timed_out,
        stdout,
        stderr,
    }
}

/// What a run must end with.
#[derive(Debug, Clone, Copy)]
enum Want {
    /// Exit 0.
    Ok,
    /// Exit 1 with a message containing one of these (any message when empty).
    Fail(&'static [&'static str]),
    /// Either of the above: the policy is open, only clean behaviour is required.
    Either(&'static [&'static str]),
}

/// Message fragments used by several cases.
const NOT_QCOW2: &[&str] = &["not in qcow2 format"];
const BEYOND_EOF: &[&str] = &["beyond the end", "end of file", "past the end", "eof"];
const ENCRYPTED: &[&str] = &["encrypt"];
const LOOP: &[&str] = &["loop"];
const CORRUPT_ENTRY: &[&str] = &["reserved", "invalid", "corrupt"];
const DECOMPRESS: &[&str] = &["decompress", "compress"];
const NOT_FOUND: &[&str] = &["no such file", "not found"];
const ANY: &[&str] = &[];

/// One case: a scratch directory and the list of broken expectations, reported together.
struct Case {
    name: &'static str,
    dir: tempfile::TempDir,
    problems: Vec<String>,
}

impl Case {
    /// `None` (the test is skipped) when a tool that builds the images is missing.
    fn new(name: &'static str) -> Option<Case> {
        if !require_tools(name, TOOLS) {
            return None;
        }
        Some(Case {
            name,
            dir: scratch_dir(),
            problems: Vec::new(),
        })
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    fn file(&self, file: &str) -> String {
        self.path(file).to_str().unwrap().to_string()
    }

    fn tool(&self, prog: &str, args: &[&str]) {
        let out = Command::new(prog)
            .args(args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("{}: running {prog}: {e}", self.name));
        assert!(
            out.status.success(),
            "{}: {prog} {args:?} failed: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn qemu_img(&self, args: &[&str]) {
        self.tool("qemu-img", args);
    }

    /// `qemu-img create -f qcow2 -o OPTS FILE SIZE`, then each `qemu-io` command.
    fn image(&self, file: &str, opts: &str, size: &str, io: &[&str]) -> PathBuf {
        let p = self.file(file);
        let mut args = vec!["create", "-q", "-f", "qcow2"];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend([p.as_str(), size]);
        self.qemu_img(&args);
        if !io.is_empty() {
            let mut a = vec!["-f", "qcow2"];
            for c in io {
                a.extend(["-c", c]);
            }
            a.push(&p);
            self.tool("qemu-io", &a);
        }
        PathBuf::from(p)
    }

    /// 1 MiB, 64 KiB clusters, the first cluster written with 0xab (L2 at 0x40000, data at
    /// 0x50000 with QEMU's allocator, but nothing here relies on that).
    fn standard(&self, file: &str) -> PathBuf {
        self.image(file, "", "1M", &["write -P 0xab 0 64k"])
    }

    fn overlay(&self, file: &str, backing: &str, fmt: &str) -> PathBuf {
        let p = self.file(file);
        self.qemu_img(&[
            "create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", fmt, &p, "1M",
        ]);
        PathBuf::from(p)
    }

    fn bytes(&self, p: &Path) -> Vec<u8> {
        fs::read(p).unwrap()
    }

    /// Runs the binary and records every way the run breaks the contract or `want`.
    fn run(&mut self, args: &[&str], want: Want) -> Run {
        let r = run_bin(self.dir.path(), args);
        self.judge(&r, want);
        r
    }

    fn judge(&mut self, r: &Run, want: Want) {
        if std::env::var_os("BAD_INPUTS_VERBOSE").is_some() {
            eprintln!("{}: {}", self.name, r.describe());
        }
        let prefix = &bin().prefix;
        let mut bad = Vec::new();
        if r.timed_out {
            bad.push("hang".to_string());
        } else if r.signal.is_some() {
            bad.push("signal".to_string());
        } else if r.code == Some(101) {
            bad.push("exit 101".to_string());
        }
        if r.stderr.contains("panicked") {
            bad.push("panic".to_string());
        }
        let clean = bad.is_empty();
        if clean && r.code != Some(0) {
            if r.code != Some(1) {
                bad.push("exit code other than 0/1".to_string());
            }
            if !r.stderr.starts_with(prefix.as_str()) {
                bad.push(format!("stderr does not start with {prefix:?}"));
            }
        }
        let matches = |frags: &[&str]| {
            let low = r.stderr.to_lowercase();
            frags.is_empty() || frags.iter().any(|f| low.contains(&f.to_lowercase()))
        };
        if clean {
            match want {
                Want::Ok if r.code != Some(0) => bad.push("expected success".into()),
                Want::Fail(f) if r.code == Some(0) => {
                    bad.push(format!("expected failure mentioning {f:?}"))
                }
                Want::Fail(f) | Want::Either(f) if r.code != Some(0) && !matches(f) => {
                    bad.push(format!("message should mention one of {f:?}"))
                }
                _ => {}
            }
        }
        if !bad.is_empty() {
            self.problems
                .push(format!("{}: {}", bad.join("; "), r.describe()));
        }
    }

    fn check(&mut self, ok: bool, what: impl Into<String>) {
        if !ok {
            self.problems.push(what.into());
        }
    }

    fn finish(self) {
        if !self.problems.is_empty() {
            panic!(
                "{}: {} problem(s):\n  {}",
                self.name,
                self.problems.len(),
                self.problems.join("\n  ")
            );
        }
    }

    // ---- common patterns ---------------------------------------------------------------

    /// Open-time refusal: `info -f qcow2`, probed `info --output json`, probed `map` and
    /// `convert -f qcow2` all fail with `msgs`, and the image is not written.
    fn refused(&mut self, img: &Path, msgs: &'static [&'static str]) {
        self.refused_with(img, msgs, true);
    }

    fn refused_with(&mut self, img: &Path, msgs: &'static [&'static str], probe: bool) {
        let before = self.bytes(img);
        let i = img.to_str().unwrap();
        let out = self.file("out.raw");
        self.run(&["info", "-f", "qcow2", i], Want::Fail(msgs));
        if probe {
            self.run(&["info", "--output", "json", i], Want::Fail(msgs));
            self.run(&["map", "--output", "json", i], Want::Fail(msgs));
        } else {
            self.run(&["map", "-f", "qcow2", i], Want::Fail(msgs));
        }
        self.run(
            &["convert", "-f", "qcow2", "-O", "raw", i, &out],
            Want::Fail(msgs),
        );
        let after = self.bytes(img);
        self.check(before == after, "refused image was modified");
    }

    /// Runtime corruption: `info` opens the image; `map` and `convert` end as `map` and
    /// `convert` say.
    fn runtime_error(&mut self, img: &Path, map: Want, convert: Want) {
        self.runtime_error_with(img, map, convert, true);
    }

    /// As [`Case::runtime_error`] for images with compressed clusters, whose human-readable
    /// `map` is refused outright (as by `qemu-img map`): only the JSON map is judged.
    fn runtime_error_compressed(&mut self, img: &Path, map: Want, convert: Want) {
        self.runtime_error_with(img, map, convert, false);
    }

    fn runtime_error_with(&mut self, img: &Path, map: Want, convert: Want, human_map: bool) {
        let before = self.bytes(img);
        let i = img.to_str().unwrap();
        let out = self.file("out.raw");
        self.run(&["info", "-f", "qcow2", i], Want::Ok);
        self.run(&["info", "--output", "json", i], Want::Ok);
        self.run(&["map", "-f", "qcow2", "--output", "json", i], map);
        if human_map {
            self.run(&["map", "-f", "qcow2", i], map);
        }
        self.run(&["convert", "-f", "qcow2", "-O", "raw", i, &out], convert);
        let after = self.bytes(img);
        self.check(before == after, "image was modified by a read-only command");
    }

    /// The image opens and reads: info, map and convert succeed, and the converted raw image
    /// equals `expect` when given.
    fn reads(&mut self, img: &Path, fmt: &str, expect: Option<&[u8]>) {
        let i = img.to_str().unwrap();
        let out = self.file("out.raw");
        let _ = fs::remove_file(&out);
        self.run(&["info", "-f", fmt, i], Want::Ok);
        self.run(&["info", "-f", fmt, "--output", "json", i], Want::Ok);
        self.run(&["map", "-f", fmt, "--output", "json", i], Want::Ok);
        let c = self.run(&["convert", "-f", fmt, "-O", "raw", i, &out], Want::Ok);
        if let (Some(want), Some(0)) = (expect, c.code) {
            let got = fs::read(&out).unwrap_or_default();
            self.check(
                got == want,
                format!("{}: converted data differs from the expected image", c.cmd),
            );
        }
    }
}

/// Expected raw content of [`Case::standard`].
fn standard_content() -> Vec<u8> {
    let mut v = vec![0u8; 1 << 20];
    v[..64 << 10].fill(0xab);
    v
}

/// All JSON values stored under `key`, anywhere in `v`.
fn json_find<'a>(v: &'a Value, key: &str, out: &mut Vec<&'a Value>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                if k == key {
                    out.push(x);
                }
                json_find(x, key, out);
            }
        }
        Value::Array(a) => a.iter().for_each(|x| json_find(x, key, out)),
        _ => {}
    }
}

fn json_has(v: &Value, key: &str, want: &Value) -> bool {
    let mut found = Vec::new();
    json_find(v, key, &mut found);
    found.contains(&want)
}

/// The bitmap objects (`{"name": ..., "flags": [...]}`) listed in `info` JSON.
fn json_bitmaps(v: &Value) -> Vec<Value> {
    let mut names = Vec::new();
    json_find(v, "bitmaps", &mut names);
    names
        .into_iter()
        .filter_map(|b| b.as_array())
        .flatten()
        .cloned()
        .collect()
}

fn bitmap_flags(v: &Value, name: &str) -> Option<Vec<String>> {
    json_bitmaps(v)
        .into_iter()
        .find(|b| b.get("name").and_then(Value::as_str) == Some(name))
        .map(|b| {
            b.get("flags")
                .and_then(Value::as_array)
                .map(|f| {
                    f.iter()
                        .filter_map(|x| x.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default()
        })
}

// ---------------------------------------------------------------------------------------------
// Harness check: a valid image passes, so a failure elsewhere is about the poke.

#[test]
fn valid_image_reads_back() {
    let Some(mut c) = Case::new("valid_image_reads_back") else {
        return;
    };
    let img = c.standard("a.qcow2");
    c.reads(&img, "qcow2", Some(&standard_content()));
    c.finish();
}

#[test]
fn valid_compressed_images_read_back() {
    // The last compressed cluster of a QEMU image may end in a partial sector, so its sector
    // count already runs past EOF by up to 511 bytes: that must read.
    let Some(mut c) = Case::new("valid_compressed_images_read_back") else {
        return;
    };
    for ty in ["zlib", "zstd"] {
        let img = c.image(
            &format!("{ty}.qcow2"),
            &format!("compression_type={ty}"),
            "1M",
            &["write -c -P 0xab 0 64k"],
        );
        c.reads(&img, "qcow2", Some(&standard_content()));
    }
    c.finish();
}

// ---------------------------------------------------------------------------------------------
// Header / open time (cases 1–21).

#[test]
fn case_01_bad_magic_refused() {
    let Some(mut c) = Case::new("case_01_bad_magic_refused") else {
        return;
    };
    let img = c.standard("a.qcow2");
    poke(&img, 0, b"QFI\xfa");
    // Probing sees no qcow2 magic, so only the forced format must refuse.
    c.refused_with(&img, NOT_QCOW2, false);
    c.finish();
}

#[test]
fn case_01_empty_file_probes_as_raw() {
    let Some(mut c) = Case::new("case_01_empty_file_probes_as_raw") else {
        return;
    };
    let img = c.path("empty");
    File::create(&img).unwrap();
    let i = img.to_str().unwrap();
    let r = c.run(&["info", "--output", "json", i], Want::Ok);
    if r.code == Some(0) {
        let ok = r.json().get("format") == Some(&Value::from("raw"));
        c.check(ok, format!("{}: format is not raw: {}", r.cmd, r.stdout));
    }
    c.run(&["map", i], Want::Ok);
    c.run(&["info", "-f", "qcow2", i], Want::Fail(NOT_QCOW2));
    c.run(&["map", "-f", "qcow2", i], Want::Fail(NOT_QCOW2));
    c.finish();
}

#[test]
fn case_01_random_bytes_probe_as_raw() {
    let Some(mut c) = Case::new("case_01_random_bytes_probe_as_raw") else {
        return;
    };
    let img = c.path("noise");
    let data = noise(1 << 20, 0x9e37_79b9_7f4a_7c15);
    assert_ne!(&data[..4], QCOW2_MAGIC);
    fs::write(&img, &data).unwrap();
    let i = img.to_str().unwrap();
    let r = c.run(&["info", "--output", "json", i], Want::Ok);
    if r.code == Some(0) {
        let ok = r.json().get("format") == Some(&Value::from("raw"));
        c.check(ok, format!("{}: format is not raw: {}", r.cmd, r.stdout));
    }
    c.reads(&img, "raw", Some(&data));
    c.run(&["info", "-f", "qcow2", i], Want::Fail(NOT_QCOW2));
    c.run(&["map", "-f", "qcow2", i], Want::Fail(NOT_QCOW2));
    c.finish();
}

#[test]
fn case_01_truncated_header_refused() {
    let Some(mut c) = Case::new("case_01_truncated_header_refused") else {
        return;
    };
    let img = c.standard("a.qcow2");
    let head = c.bytes(&img)[..50].to_vec();
    fs::write(&img, head).unwrap();
    let i = img.to_str().unwrap();
    // QEMU: "qcow2 header too short" (the missing bytes read as zeros).
    let msgs: &[&str] = &["too short", "truncated", "end of file", "eof"];
    c.run(&["info", "-f", "qcow2", i], Want::Fail(msgs));
    c.run(&["map", "-f", "qcow2", i], Want::Fail(msgs));
    // Probing a 50-byte file with the qcow2 magic: QEMU picks qcow2 and refuses; raw is safe too.
    c.run(&["info", i], Want::Either(ANY));
    c.finish();
}

#[test]
fn case_02_version_1_refused() {
    let Some(mut c) = Case::new("case_02_version_1_refused") else {
        return;
    };
    let img = c.standard("a.qcow2");
    poke_u32(&img, OFF_VERSION, 1);
    // Version 1 is the older qcow format, which a prober may name differently: force qcow2.
    c.refused_with(&img, &["Unsupported qcow2 version 1"], false);
    c.finish();
}

#[test]
fn case_02_version_4_refused() {
    let Some(mut c) = Case::new("case_02_version_4_refused") else {
        return;
    };
    let img = c.standard("a.qcow2");
    poke_u32(&img, OFF_VERSION, 4);
    c.refused(&img, &["Unsupported qcow2 version 4"]);
    c.finish();
}

#[test]
fn case_03_cluster_bits_8_refused() {
    let Some(mut c) = Case::new("case_03_cluster_bits_8_refused") else {
        return;
    };
    let img = c.standard("a.qcow2");
    poke_u32(&img, OFF_CLUSTER_BITS, 8);
    c.refused(&img, &["Unsupported cluster size: 2^8"]);
    c.finish();
}

#[test]
fn case_03_cluster_bits_22_refused() {
    let Some(mut c) = Case::new("case_03_cluster_bits_22_refused") else {
        return;
    };
    let img = c.standard("a.qcow2");
    poke_u32(&img, OFF_CLUSTER_BITS, 22);
    c.refused(&img, &["Unsupported cluster size: 2^22"]);
    c.finish();
}

#[test]
fn case_03_extended_l2_small_clusters_refused() {
    let Some(mut c) = Case::new("case_03_extended_l2_small_clusters_refused") else {
        return;
    };
    let img = c.image(
        "x.qcow2",
        "extended_l2=on,cluster_size=16k",
        "1M",
        &["write -P 1 0 4k"],
    );
    poke_u32(&img, OFF_CLUSTER_BITS, 13);
    // QEMU: "Unsupported subcluster size: 256".
    c.refused(&img, &["cluster size"]);
    c.finish();
}

#[test]
fn case_04_huge_virtual_size_refused() {
    let Some(mut c) = Case::new("case_04_huge_virtual_size_refused") else {
        return;
    };
    let img = c.standard("a.qcow2");
    poke_u64(&img, OFF_SIZE, 1 << 62);
    c.refused(&img, &["Image is too big"]);
    let img2 = c.standard("b.qcow2");
    poke_u64(&img2, OFF_SIZE, u64::MAX);
    c.refused(&img2, &["Image is too big", "too large"]);
    c.finish();
}

#[test]
fn case_05_crypt_method_3_refused() {
    let Some(mut c) = Case::new("case_05_crypt_method_3_refused") else {
        return;
    };
    let img = c.standard("a.qcow2");
    poke_u32(&img, OFF_CRYPT_METHOD, 3);
    c.refused(&img, &["Unsupported encryption method"]);
    c.finish();
}

#[test]
fn case_05_legacy_aes_info_only() {
    let Some(mut c) = Case::new("case_05_legacy_aes_info_only") else {
        return;
    };
    let img = c.standard("a.qcow2");
    poke_u32(&img, OFF_CRYPT_METHOD, 1);
    c.runtime_error(&img, Want::Fail(ENCRYPTED), Want::Fail(ENCRYPTED));
    c.finish();
}

#[test]
fn case_05_luks_info_only() {
    let Some(mut c) = Case::new("case_05_luks_info_only") else {
        return;
    };
    let p = c.file("luks.qcow2");
    c.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        "secret,id=sec0,data=123456",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
        &p,
        "1M",
    ]);
    let img = PathBuf::from(p);
    c.runtime_error(&img, Want::Fail(ENCRYPTED), Want::Fail(ENCRYPTED));
    c.finish();
}

#[test]
fn case_06_l1_too_small_refused() {
    let Some(mut c) = Case::new("case_06_l1_too_small_refused") else {
        return;
    };
    let img = c.standard("a.qcow2");
    poke_u32(&img, OFF_L1_SIZE, 0);
    c.refused(&img, &["L1 table is too small"]);
    c.finish();
}

#[test]
fn case_07_huge_l1_size_refused() {
    let Some(mut c) = Case::new("case_07_huge_l1_size_refused") else {
        return;
    };
    let img = c.standard("a.qcow2");
    poke_u32(&img, OFF_L1_SIZE, 0x1000_0000);
    c.refused(&img, &["Active L1 table too large"]);
    c.finish();
}

#[test]
fn case_08_unaligned_l1_offset_refused() {
    let Some(mut c) = Case::new("case_08_unaligned_l1_offset_refused") else {
        return;
    };
    let img = c.standard("a.qcow2");
    let h = Header::parse(&c.bytes(&img));
    poke_u64(&img, OFF_L1_TABLE_OFFSET, h.l1_table_offset + 0x200);
    c.refused(&img, &["Active L1 table offset invalid"]);
    c.finish();
}

#[test]
fn case_09_l1_beyond_eof_not_read_as_empty() {
    // QEMU opens this and reads zeros. Expected for us: refuse, or open read-only and report
    // the corruption; either way the data commands must not present an empty disk.
    let Some(mut c) = Case::new("case_09_l1_beyond_eof_not_read_as_empty") else {
        return;
    };
    let img = c.standard("a.qcow2");
    poke_u64(&img, OFF_L1_TABLE_OFFSET, TIB);
    let i = img.to_str().unwrap();
    let out = c.file("out.raw");
    c.run(&["info", "-f", "qcow2", i], Want::Either(ANY));
    c.run(&["map", "-f", "qcow2", i], Want::Fail(ANY));
    c.run(
        &["convert", "-f", "qcow2", "-O", "raw", i, &out],
        Want::Fail(ANY),
    );
    c.finish();
}

#[test]
fn case_10_unaligned_refcount_table_refused() {
    let Some(mut c) = Case::new("case_10_unaligned_refcount_table_refused") else {
        return;
    };
    let img = c.standard("a.qcow2");
    let h = Header::parse(&c.bytes(&img));
    poke_u64(
        &img,
        OFF_REFCOUNT_TABLE_OFFSET,
        h.refcount_table_offset + 0x200,
    );
    c.refused(&img, &["Reference count table offset invalid"]);
    c.finish();
}

#[test]
fn case_10_huge_refcount_table_refused() {
    let Some(mut c) = Case::new("case_10_huge_refcount_table_refused") else {
        return;
    };
    let img = c.standard("a.qcow2");
    poke_u32(&img, OFF_REFCOUNT_TABLE_CLUSTERS, 0x100_0000);
    c.refused(&img, &["Reference count table too large"]);
    c.finish();
}

#[test]
fn case_11_refcount_order_7_refused() {
    let Some(mut c) = Case::new("case_11_refcount_order_7_refused") else {
        return;
    };
    let img = c.standard("a.qcow2");
    poke_u32(&img, OFF_REFCOUNT_ORDER, 7);
    c.refused(
        &img,
        &["Reference count entry width too large; may not exceed 64 bits"],
    );
    c.finish();
}

#[test]
fn case_11_refcount_orders_0_to_6_read() {
    let Some(mut c) = Case::new("case_11_refcount_orders_0_to_6_read") else {
        return;
    };
    for bits in [1, 2, 4, 8, 16, 32, 64] {
        let img = c.image(
            &format!("r{bits}.qcow2"),
            &format!("refcount_bits={bits}"),
            "1M",
            &["write -P 0xab 0 64k"],
        );
        c.reads(&img, "qcow2", Some(&standard_content()));
    }
    c.finish();
}

#[test]
fn case_12_header_length_96_refused() {
    let Some(mut c) = Case::new("case_12_header_length_96_refused") else {
        return;
    };
    let img = c.standard("a.qcow2");
    poke_u32(&img, OFF_HEADER_LENGTH, 96);
    c.refused(&img, &["qcow2 header too short"]);
    c.finish();
}

#[test]
fn case_12_header_length_not_multiple_of_8_refused() {
    // QEMU reads extensions from byte 108 and fails with "Header extension too large".
    let Some(mut c) = Case::new("case_12_header_length_not_multiple_of_8_refused") else {
        return;
    };
    let img = c.standard("a.qcow2");
    poke_u32(&img, OFF_HEADER_LENGTH, 108);
    c.refused(&img, &["header"]);
    c.finish();
}

#[test]
fn case_12_header_length_beyond_cluster_refused() {
    let Some(mut c) = Case::new("case_12_header_length_beyond_cluster_refused") else {
        return;
    };
    let img = c.standard("a.qcow2");
    poke_u32(&img, OFF_HEADER_LENGTH, 0x1_0008);
    c.refused(&img, &["qcow2 header exceeds cluster size"]);
    c.finish();
}

#[test]
fn case_13_unknown_incompatible_bit_refused() {
    let Some(mut c) = Case::new("case_13_unknown_incompatible_bit_refused") else {
        return;
    };
    let img = c.standard("a.qcow2");
    or_u8(&img, OFF_INCOMPATIBLE + 7, 0x20);
    c.refused(
        &img,
        &["Unsupported qcow2 feature(s): Unknown incompatible feature: 20"],
    );
    c.finish();
}

#[test]
fn case_13_unknown_incompatible_bit_named_from_table() {
    let Some(mut c) = Case::new("case_13_unknown_incompatible_bit_named_from_table") else {
        return;
    };
    let img = c.standard("a.qcow2");
    let b = c.bytes(&img);
    let ft = find_ext(&b, EXT_FEATURE_TABLE);
    let mut table = b[ft.data() as usize..(ft.data() + u64::from(ft.len)) as usize].to_vec();
    let mut entry = vec![0u8, 5];
    entry.extend_from_slice(b"frobnicate");
    entry.resize(48, 0);
    table.extend_from_slice(&entry);
    set_extensions(&img, &[(EXT_FEATURE_TABLE, table)]);
    or_u8(&img, OFF_INCOMPATIBLE + 7, 0x20);
    c.refused(&img, &["Unsupported qcow2 feature(s): frobnicate"]);
    c.finish();
}

#[test]
fn case_14_unknown_compatible_bit_ignored() {
    let Some(mut c) = Case::new("case_14_unknown_compatible_bit_ignored") else {
        return;
    };
    let img = c.standard("a.qcow2");
    or_u8(&img, OFF_COMPATIBLE + 7, 0x20);
    c.reads(&img, "qcow2", Some(&standard_content()));
    c.finish();
}

#[test]
fn case_14_unknown_autoclear_bit_ignored() {
    // Read side only: clearing the bit before the first write is a write-path concern.
    let Some(mut c) = Case::new("case_14_unknown_autoclear_bit_ignored") else {
        return;
    };
    let img = c.standard("a.qcow2");
    or_u8(&img, OFF_AUTOCLEAR + 7, 0x20);
    c.reads(&img, "qcow2", Some(&standard_content()));
    c.finish();
}

#[test]
fn case_15_compression_type_2_refused() {
    let Some(mut c) = Case::new("case_15_compression_type_2_refused") else {
        return;
    };
    let img = c.standard("a.qcow2");
    or_u8(&img, OFF_INCOMPATIBLE + 7, 0x08);
    poke_u8(&img, OFF_COMPRESSION_TYPE, 2);
    // QEMU: "qcow2: unknown compression type: 2".
    c.refused(&img, &["Unknown compression type"]);
    c.finish();
}

#[test]
fn case_15_compression_type_without_bit_refused() {
    let Some(mut c) = Case::new("case_15_compression_type_without_bit_refused") else {
        return;
    };
    let img = c.standard("a.qcow2");
    poke_u8(&img, OFF_COMPRESSION_TYPE, 1);
    c.refused(
        &img,
        &["Compression type incompatible feature bit must be set"],
    );
    c.finish();
}

#[test]
fn case_16_backing_name_too_long_refused() {
    let Some(mut c) = Case::new("case_16_backing_name_too_long_refused") else {
        return;
    };
    c.standard("base.qcow2");
    let img = c.overlay("over.qcow2", "base.qcow2", "qcow2");
    poke_u32(&img, OFF_BACKING_FILE_SIZE, 2000);
    c.refused(&img, &["Backing file name too long"]);
    c.finish();
}

#[test]
fn case_16_backing_offset_outside_cluster_refused() {
    let Some(mut c) = Case::new("case_16_backing_offset_outside_cluster_refused") else {
        return;
    };
    c.standard("base.qcow2");
    let img = c.overlay("over.qcow2", "base.qcow2", "qcow2");
    poke_u64(&img, OFF_BACKING_FILE_OFFSET, 0x1_0008);
    c.refused(&img, &["Invalid backing file offset"]);
    c.finish();
}

#[test]
fn case_17_huge_snapshot_count_refused() {
    let Some(mut c) = Case::new("case_17_huge_snapshot_count_refused") else {
        return;
    };
    let img = c.standard("a.qcow2");
    poke_u32(&img, OFF_NB_SNAPSHOTS, 0x1000_0000);
    poke_u64(&img, OFF_SNAPSHOTS_OFFSET, 0x1_0000);
    c.refused(&img, &["Snapshot table too large"]);
    c.finish();
}

#[test]
fn case_17_unaligned_snapshot_table_refused() {
    let Some(mut c) = Case::new("case_17_unaligned_snapshot_table_refused") else {
        return;
    };
    let img = c.standard("a.qcow2");
    poke_u32(&img, OFF_NB_SNAPSHOTS, 1);
    poke_u64(&img, OFF_SNAPSHOTS_OFFSET, 0x1_0200);
    c.refused(&img, &["Snapshot table offset invalid"]);
    c.finish();
}

#[test]
fn case_18_extension_past_cluster_refused() {
    let Some(mut c) = Case::new("case_18_extension_past_cluster_refused") else {
        return;
    };
    let img = c.standard("a.qcow2");
    let ft = find_ext(&c.bytes(&img), EXT_FEATURE_TABLE);
    poke_u32(&img, ft.at + 4, 0x1_0000);
    c.refused(&img, &["Header extension too large"]);
    let img2 = c.standard("b.qcow2");
    poke_u32(&img2, ft.at + 4, u32::MAX);
    c.refused(&img2, &["Header extension too large"]);
    c.finish();
}

#[test]
fn case_18_duplicate_extension_refused() {
    // QEMU takes the last backing-format extension; bad-inputs.md expects a refusal.
    let Some(mut c) = Case::new("case_18_duplicate_extension_refused") else {
        return;
    };
    let img = c.standard("a.qcow2");
    set_extensions(
        &img,
        &[
            (EXT_BACKING_FORMAT, b"qcow2".to_vec()),
            (EXT_BACKING_FORMAT, b"raw".to_vec()),
        ],
    );
    c.refused(&img, &["extension"]);
    c.finish();
}

#[test]
fn case_18_end_marker_mid_area_refused() {
    // An end-of-extensions entry (type 0) with a non-zero length followed by another extension.
    // QEMU stops at type 0; bad-inputs.md expects a refusal.
    let Some(mut c) = Case::new("case_18_end_marker_mid_area_refused") else {
        return;
    };
    let img = c.standard("a.qcow2");
    set_extensions(
        &img,
        &[(0, vec![0xee; 8]), (EXT_BACKING_FORMAT, b"raw".to_vec())],
    );
    c.refused(&img, &["extension"]);
    c.finish();
}

#[test]
fn case_19_corrupt_bit_opens_read_only() {
    // The read-write half (open refused with "Image is corrupt; cannot be opened read/write")
    // needs a writable open, which the read-only commands here do not have.
    let Some(mut c) = Case::new("case_19_corrupt_bit_opens_read_only") else {
        return;
    };
    let img = c.standard("a.qcow2");
    or_u8(&img, OFF_INCOMPATIBLE + 7, 0x02);
    let i = img.to_str().unwrap();
    let r = c.run(&["info", "--output", "json", i], Want::Ok);
    if r.code == Some(0) {
        let ok = json_has(&r.json(), "corrupt", &Value::Bool(true));
        c.check(
            ok,
            format!("{}: no \"corrupt\": true in {}", r.cmd, r.stdout),
        );
    }
    c.reads(&img, "qcow2", Some(&standard_content()));
    c.finish();
}

#[test]
fn case_20_dirty_bit_opens_read_only() {
    // Refcount rebuild on a read-write open is a write-path concern.
    let Some(mut c) = Case::new("case_20_dirty_bit_opens_read_only") else {
        return;
    };
    let img = c.image(
        "a.qcow2",
        "lazy_refcounts=on",
        "1M",
        &["write -P 0xab 0 64k"],
    );
    or_u8(&img, OFF_INCOMPATIBLE + 7, 0x01);
    let i = img.to_str().unwrap();
    let r = c.run(&["info", "--output", "json", i], Want::Ok);
    if r.code == Some(0) {
        let ok = json_has(&r.json(), "dirty-flag", &Value::Bool(true));
        c.check(
            ok,
            format!("{}: no \"dirty-flag\": true in {}", r.cmd, r.stdout),
        );
    }
    let before = c.bytes(&img);
    c.reads(&img, "qcow2", Some(&standard_content()));
    c.check(
        before == c.bytes(&img),
        "read-only commands modified a dirty image",
    );
    c.finish();
}

#[test]
fn case_21_truncated_file_bounded() {
    // Cut inside the L2 table, then inside the data cluster. Reads of the missing ranges may
    // fail or read zeros (policy); either way: clean exit, bounded.
    let Some(mut c) = Case::new("case_21_truncated_file_bounded") else {
        return;
    };
    for (name, cut) in [("in_l2", 0u64), ("in_data", 1)] {
        let img = c.standard(&format!("{name}.qcow2"));
        let b = c.bytes(&img);
        let l2e = l2_entry_at(&b, 0);
        let data = be_u64(&b, l2e) & OFFSET_MASK;
        let at = if cut == 0 { l2e + 4 } else { data + 0x8000 };
        OpenOptions::new()
            .write(true)
            .open(&img)
            .unwrap()
            .set_len(at)
            .unwrap();
        let i = img.to_str().unwrap();
        let out = c.file("out.raw");
        c.run(&["info", "-f", "qcow2", i], Want::Either(ANY));
        c.run(&["map", "-f", "qcow2", i], Want::Either(ANY));
        c.run(
            &["convert", "-f", "qcow2", "-O", "raw", i, &out],
            Want::Either(ANY),
        );
    }
    c.finish();
}

// ---------------------------------------------------------------------------------------------
// Mapping content, found at runtime (cases 22–30).

#[test]
fn case_22_unaligned_data_offset_eio() {
    let Some(mut c) = Case::new("case_22_unaligned_data_offset_eio") else {
        return;
    };
    let img = c.standard("a.qcow2");
    let b = c.bytes(&img);
    let at = l2_entry_at(&b, 0);
    poke_u64(&img, at, be_u64(&b, at) + 0x200);
    // QEMU: "Cluster allocation offset 0x50200 unaligned (L2 offset: 0x40000, L2 index: 0)".
    let w = Want::Fail(&["unaligned"]);
    c.runtime_error(&img, w, w);
    c.finish();
}

#[test]
fn case_23_unaligned_l2_offset_eio() {
    let Some(mut c) = Case::new("case_23_unaligned_l2_offset_eio") else {
        return;
    };
    let img = c.standard("a.qcow2");
    let b = c.bytes(&img);
    let at = l1_entry_at(&b, 0);
    poke_u64(&img, at, be_u64(&b, at) + 0x200);
    // QEMU: "L2 table offset 0x40200 unaligned (L1 index: 0)".
    let w = Want::Fail(&["unaligned"]);
    c.runtime_error(&img, w, w);
    c.finish();
}

#[test]
fn case_24_entries_into_metadata_read_bounded() {
    // Reads through such entries may return the metadata bytes (QEMU) or fail; the write-side
    // overlap check is out of scope here.
    let Some(mut c) = Case::new("case_24_entries_into_metadata_read_bounded") else {
        return;
    };
    let img = c.standard("l2.qcow2");
    let b = c.bytes(&img);
    let h = Header::parse(&b);
    poke_u64(
        &img,
        l2_entry_at(&b, 0),
        h.refcount_table_offset | QCOW_OFLAG_COPIED,
    );
    c.runtime_error(&img, Want::Either(ANY), Want::Either(ANY));
    let img = c.standard("l1.qcow2");
    poke_u64(
        &img,
        l1_entry_at(&b, 0),
        h.refcount_table_offset | QCOW_OFLAG_COPIED,
    );
    c.runtime_error(&img, Want::Either(ANY), Want::Either(ANY));
    let img = c.standard("header.qcow2");
    poke_u64(&img, l2_entry_at(&b, 0), QCOW_OFLAG_COPIED | 0x1_0000);
    poke_u64(
        &img,
        l2_entry_at(&b, 1),
        QCOW_OFLAG_COPIED | h.l1_table_offset,
    );
    c.runtime_error(&img, Want::Either(ANY), Want::Either(ANY));
    c.finish();
}

#[test]
fn case_25_l2_reserved_bits_corrupt() {
    // QEMU ignores reserved bits on I/O; bad-inputs.md: treat as corruption.
    let Some(mut c) = Case::new("case_25_l2_reserved_bits_corrupt") else {
        return;
    };
    let img = c.standard("a.qcow2");
    let b = c.bytes(&img);
    let at = l2_entry_at(&b, 0);
    poke_u64(&img, at, be_u64(&b, at) | (1 << 57));
    let w = Want::Fail(CORRUPT_ENTRY);
    c.runtime_error(&img, w, w);
    c.finish();
}

#[test]
fn case_25_l1_reserved_bits_corrupt() {
    let Some(mut c) = Case::new("case_25_l1_reserved_bits_corrupt") else {
        return;
    };
    let img = c.standard("a.qcow2");
    let b = c.bytes(&img);
    let at = l1_entry_at(&b, 0);
    poke_u64(&img, at, be_u64(&b, at) | (1 << 57));
    let w = Want::Fail(CORRUPT_ENTRY);
    c.runtime_error(&img, w, w);
    c.finish();
}

#[test]
fn case_26_host_offset_beyond_eof_eio() {
    // QEMU reads zeros (and a write grows the file to 1 TiB); expected for us: EIO.
    let Some(mut c) = Case::new("case_26_host_offset_beyond_eof_eio") else {
        return;
    };
    let img = c.standard("a.qcow2");
    let b = c.bytes(&img);
    poke_u64(&img, l2_entry_at(&b, 0), TIB | QCOW_OFLAG_COPIED);
    let w = Want::Fail(BEYOND_EOF);
    c.runtime_error(&img, w, w);
    c.finish();
}

#[test]
fn case_27_garbage_compressed_data_eio() {
    // `map` reports a compressed cluster without inflating it, so only reads must fail.
    let Some(mut c) = Case::new("case_27_garbage_compressed_data_eio") else {
        return;
    };
    for ty in ["zlib", "zstd"] {
        let img = c.image(
            &format!("{ty}.qcow2"),
            &format!("compression_type={ty}"),
            "1M",
            &["write -c -P 0xab 0 64k"],
        );
        let b = c.bytes(&img);
        let (host, _) = compressed_descriptor(&b, l2_entry_at(&b, 0));
        poke(&img, host, &[0xff; 16]);
        c.runtime_error_compressed(&img, Want::Ok, Want::Fail(DECOMPRESS));
    }
    c.finish();
}

#[test]
fn case_28_compressed_beyond_eof_eio() {
    let Some(mut c) = Case::new("case_28_compressed_beyond_eof_eio") else {
        return;
    };
    let img = c.image("a.qcow2", "", "1M", &["write -c -P 0xab 0 64k"]);
    let b = c.bytes(&img);
    let at = l2_entry_at(&b, 0);
    poke_u64(&img, at, compressed_entry(&b, TIB, 0));
    let w = Want::Fail(BEYOND_EOF);
    c.runtime_error_compressed(&img, w, w);
    c.finish();
}

#[test]
fn case_28_compressed_sectors_past_eof_bounded() {
    // The descriptor starts at valid data but claims the maximal sector count, far past EOF.
    // bad-inputs.md expects EIO; QEMU inflates what is there. Either is accepted, but a
    // successful read must return the real data.
    let Some(mut c) = Case::new("case_28_compressed_sectors_past_eof_bounded") else {
        return;
    };
    let img = c.image("a.qcow2", "", "1M", &["write -c -P 0xab 0 64k"]);
    let b = c.bytes(&img);
    let at = l2_entry_at(&b, 0);
    let (host, _) = compressed_descriptor(&b, at);
    poke_u64(&img, at, compressed_entry(&b, host, 0xff));
    let i = img.to_str().unwrap();
    let out = c.file("out.raw");
    c.run(&["info", "-f", "qcow2", i], Want::Ok);
    c.run(
        &["map", "-f", "qcow2", "--output", "json", i],
        Want::Either(BEYOND_EOF),
    );
    let r = c.run(
        &["convert", "-f", "qcow2", "-O", "raw", i, &out],
        Want::Either(BEYOND_EOF),
    );
    if r.code == Some(0) {
        let ok = fs::read(&out).unwrap() == standard_content();
        c.check(ok, format!("{}: wrong data", r.cmd));
    }
    c.finish();
}

#[test]
fn case_29_decompression_bomb_bounded() {
    // A valid raw-deflate stream of ~6.6 KiB inflating to 1 MiB of 0x5a, linked as cluster 0.
    // The decoder must stop at one cluster of output: either the read fails, or it returns
    // exactly one cluster of 0x5a (QEMU's behaviour).
    let Some(mut c) = Case::new("case_29_decompression_bomb_bounded") else {
        return;
    };
    let img = c.image("a.qcow2", "", "1M", &["write -c -P 0xab 0 64k"]);
    let b = c.bytes(&img);
    let at = l2_entry_at(&b, 0);
    let bomb = deflate_bomb(0x5a, 4065);
    let host = (b.len() as u64).next_multiple_of(512);
    let extra = (bomb.len() as u64 - 1) / 512;
    poke(&img, host, &bomb);
    poke_u64(&img, at, compressed_entry(&b, host, extra));
    let i = img.to_str().unwrap();
    let out = c.file("out.raw");
    c.run(&["info", "-f", "qcow2", i], Want::Ok);
    c.run(&["map", "-f", "qcow2", "--output", "json", i], Want::Ok);
    let r = c.run(
        &["convert", "-f", "qcow2", "-O", "raw", i, &out],
        Want::Either(DECOMPRESS),
    );
    if r.code == Some(0) {
        let got = fs::read(&out).unwrap();
        let mut want = vec![0u8; 1 << 20];
        want[..64 << 10].fill(0x5a);
        c.check(got == want, format!("{}: wrong data", r.cmd));
    }
    c.finish();
}

#[test]
fn case_30_extended_l2_alloc_and_zero_eio() {
    let Some(mut c) = Case::new("case_30_extended_l2_alloc_and_zero_eio") else {
        return;
    };
    let img = c.image(
        "x.qcow2",
        "extended_l2=on,cluster_size=16k",
        "1M",
        &["write -P 0xab 0 4k"],
    );
    let b = c.bytes(&img);
    let at = l2_entry_at(&b, 0) + 8;
    // Subcluster 0 both allocated (bit 0) and reading as zeros (bit 32).
    poke_u64(&img, at, be_u64(&b, at) | (1 << 32) | 1);
    let w = Want::Fail(&["Invalid cluster entry"]);
    c.runtime_error(&img, w, w);
    c.finish();
}

// ---------------------------------------------------------------------------------------------
// Bitmaps (cases 35–41).

/// 1 MiB image with bitmap `bm` (auto) that has dirty bits, so its table has a data cluster.
fn bitmap_image(c: &Case, file: &str, names: &[&str]) -> PathBuf {
    let img = c.image(file, "", "1M", &[]);
    let p = img.to_str().unwrap();
    for n in names {
        c.qemu_img(&["bitmap", "--add", p, n]);
    }
    c.tool("qemu-io", &["-f", "qcow2", "-c", "write -P 0xab 0 64k", p]);
    img
}

#[test]
fn case_35_autoclear_cleared_bitmaps_ignored() {
    let Some(mut c) = Case::new("case_35_autoclear_cleared_bitmaps_ignored") else {
        return;
    };
    let img = bitmap_image(&c, "a.qcow2", &["bm"]);
    let b = c.bytes(&img);
    poke_u8(
        &img,
        OFF_AUTOCLEAR + 7,
        b[(OFF_AUTOCLEAR + 7) as usize] & !1,
    );
    let i = img.to_str().unwrap();
    let r = c.run(&["info", "--output", "json", i], Want::Ok);
    if r.code == Some(0) {
        // The bitmaps must be absent (QEMU) or at least never shown as consistent.
        let flags = bitmap_flags(&r.json(), "bm");
        let ok = flags.is_none_or(|f| f.iter().any(|x| x == "in-use"));
        c.check(
            ok,
            format!("{}: bitmap shown as valid: {}", r.cmd, r.stdout),
        );
    }
    c.reads(&img, "qcow2", Some(&standard_content()));
    c.finish();
}

#[test]
fn case_36_in_use_bitmap_listed() {
    let Some(mut c) = Case::new("case_36_in_use_bitmap_listed") else {
        return;
    };
    let img = bitmap_image(&c, "a.qcow2", &["bm"]);
    let d = bitmap_dir(&c.bytes(&img));
    or_u8(&img, d.dir + 15, 0x01);
    let i = img.to_str().unwrap();
    let r = c.run(&["info", "--output", "json", i], Want::Ok);
    if r.code == Some(0) {
        let flags = bitmap_flags(&r.json(), "bm").unwrap_or_default();
        let ok = flags.iter().any(|x| x == "in-use");
        c.check(
            ok,
            format!("{}: bitmap not shown in-use: {}", r.cmd, r.stdout),
        );
    }
    c.reads(&img, "qcow2", Some(&standard_content()));
    c.finish();
}

/// Cases 37/38: QEMU refuses the whole image with `qemu_msg`; opening it with the bitmap
/// marked unusable is allowed too. Either way the run is clean and, when it opens, the data
/// reads back and the bitmap is never shown as a normal, consistent one.
fn bitmap_refused_or_unusable(c: &mut Case, img: &Path, qemu_msg: &'static [&'static str]) {
    let i = img.to_str().unwrap();
    let r = c.run(&["info", "--output", "json", i], Want::Either(qemu_msg));
    if r.code == Some(0) {
        let shown_ok = json_bitmaps(&r.json()).iter().any(|b| {
            let flags: Vec<&str> = b
                .get("flags")
                .and_then(Value::as_array)
                .map(|f| f.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            flags == ["auto"]
        });
        c.check(
            !shown_ok,
            format!("{}: broken bitmap shown as valid: {}", r.cmd, r.stdout),
        );
        c.reads(img, "qcow2", Some(&standard_content()));
    } else {
        let out = c.file("out.raw");
        c.run(&["map", i], Want::Either(qemu_msg));
        c.run(&["convert", "-O", "raw", i, &out], Want::Either(qemu_msg));
    }
}

#[test]
fn case_37_bitmap_constraints() {
    let Some(mut c) = Case::new("case_37_bitmap_constraints") else {
        return;
    };
    let cons: &[&str] = &["doesn't satisfy the constraints"];
    // granularity_bits 8 and 40
    for (n, g) in [(0, 8u8), (1, 40)] {
        let img = bitmap_image(&c, &format!("g{n}.qcow2"), &["bm"]);
        let d = bitmap_dir(&c.bytes(&img));
        poke_u8(&img, d.dir + 17, g);
        bitmap_refused_or_unusable(&mut c, &img, cons);
    }
    // type 2
    let img = bitmap_image(&c, "type.qcow2", &["bm"]);
    let d = bitmap_dir(&c.bytes(&img));
    poke_u8(&img, d.dir + 16, 2);
    bitmap_refused_or_unusable(&mut c, &img, cons);
    // reserved flag bit 5
    let img = bitmap_image(&c, "flag.qcow2", &["bm"]);
    let d = bitmap_dir(&c.bytes(&img));
    or_u8(&img, d.dir + 15, 0x20);
    bitmap_refused_or_unusable(&mut c, &img, cons);
    c.finish();
}

#[test]
fn case_38_broken_bitmap_directory() {
    let Some(mut c) = Case::new("case_38_broken_bitmap_directory") else {
        return;
    };
    let broken: &[&str] = &["Broken bitmap directory", "bitmap"];
    // name_size 0
    let img = bitmap_image(&c, "name0.qcow2", &["bm"]);
    let d = bitmap_dir(&c.bytes(&img));
    poke_u16(&img, d.dir + 18, 0);
    bitmap_refused_or_unusable(&mut c, &img, broken);
    // extra_data_size 8 without the extra_data_compatible flag
    let img = bitmap_image(&c, "extra.qcow2", &["bm"]);
    let d = bitmap_dir(&c.bytes(&img));
    poke_u32(&img, d.dir + 20, 8);
    bitmap_refused_or_unusable(&mut c, &img, broken);
    // name_size 2000 (> 1023, and past the directory)
    let img = bitmap_image(&c, "long.qcow2", &["bm"]);
    let d = bitmap_dir(&c.bytes(&img));
    poke_u16(&img, d.dir + 18, 2000);
    bitmap_refused_or_unusable(&mut c, &img, broken);
    // duplicate names: b1, b2 -> b1, b1
    let img = bitmap_image(&c, "dup.qcow2", &["b1", "b2"]);
    let b = c.bytes(&img);
    let dir = bitmap_dir(&b).dir as usize;
    let dir_size = be_u64(&b, bitmap_dir(&b).ext + 8) as usize;
    let pos = b[dir..dir + dir_size]
        .windows(2)
        .position(|w| w == b"b2")
        .expect("second bitmap name");
    poke(&img, (dir + pos) as u64, b"b1");
    bitmap_refused_or_unusable(&mut c, &img, broken);
    c.finish();
}

#[test]
fn case_39_zero_bitmaps_refused() {
    let Some(mut c) = Case::new("case_39_zero_bitmaps_refused") else {
        return;
    };
    let img = bitmap_image(&c, "a.qcow2", &["bm"]);
    let d = bitmap_dir(&c.bytes(&img));
    poke_u32(&img, d.ext, 0);
    c.refused(&img, &["found bitmaps extension with zero bitmaps"]);
    c.finish();
}

#[test]
fn case_39_unaligned_bitmap_directory_refused() {
    let Some(mut c) = Case::new("case_39_unaligned_bitmap_directory_refused") else {
        return;
    };
    let img = bitmap_image(&c, "a.qcow2", &["bm"]);
    let d = bitmap_dir(&c.bytes(&img));
    poke_u64(&img, d.ext + 16, d.dir + 0x200);
    c.refused(&img, &["invalid bitmap directory offset"]);
    c.finish();
}

#[test]
fn case_39_bitmap_directory_size_inconsistent_refused() {
    let Some(mut c) = Case::new("case_39_bitmap_directory_size_inconsistent_refused") else {
        return;
    };
    let broken: &[&str] = &["Broken bitmap directory", "bitmap"];
    let img = bitmap_image(&c, "a.qcow2", &["bm"]);
    let b = c.bytes(&img);
    let d = bitmap_dir(&b);
    poke_u64(&img, d.ext + 8, be_u64(&b, d.ext + 8) + 8);
    c.refused(&img, broken);
    let img = bitmap_image(&c, "b.qcow2", &["bm"]);
    poke_u64(&img, d.ext + 8, 1 << 40);
    c.refused(&img, broken);
    c.finish();
}

#[test]
fn case_40_bitmap_table_beyond_eof_listed() {
    let Some(mut c) = Case::new("case_40_bitmap_table_beyond_eof_listed") else {
        return;
    };
    let img = bitmap_image(&c, "a.qcow2", &["bm"]);
    let d = bitmap_dir(&c.bytes(&img));
    poke_u64(&img, d.dir, TIB);
    let i = img.to_str().unwrap();
    let r = c.run(&["info", "--output", "json", i], Want::Ok);
    if r.code == Some(0) {
        let ok = bitmap_flags(&r.json(), "bm").is_some();
        c.check(ok, format!("{}: bitmap not listed: {}", r.cmd, r.stdout));
    }
    c.reads(&img, "qcow2", Some(&standard_content()));
    c.finish();
}

#[test]
fn case_41_bitmap_table_bad_entries_bounded() {
    // Without a bitmap export the table is never loaded by these commands; they must stay clean.
    let Some(mut c) = Case::new("case_41_bitmap_table_bad_entries_bounded") else {
        return;
    };
    for (n, bits) in [(0, 1u64 << 3), (1, 1)] {
        let img = bitmap_image(&c, &format!("t{n}.qcow2"), &["bm"]);
        let b = c.bytes(&img);
        let table = be_u64(&b, bitmap_dir(&b).dir);
        poke_u64(&img, table, be_u64(&b, table) | bits);
        let i = img.to_str().unwrap();
        c.run(&["info", "--output", "json", i], Want::Either(ANY));
        c.run(&["map", i], Want::Either(ANY));
    }
    c.finish();
}

// ---------------------------------------------------------------------------------------------
// Chains, external files, probing (cases 43–49).

fn chain_must_fail(c: &mut Case, img: &Path, msgs: &'static [&'static str]) {
    let i = img.to_str().unwrap();
    let out = c.file("out.raw");
    c.run(&["info", "--backing-chain", i], Want::Fail(msgs));
    c.run(
        &["info", "--backing-chain", "--output", "json", i],
        Want::Fail(msgs),
    );
    c.run(&["map", i], Want::Fail(msgs));
    c.run(&["convert", "-O", "raw", i, &out], Want::Fail(msgs));
}

#[test]
fn case_43_backing_loop_refused() {
    let Some(mut c) = Case::new("case_43_backing_loop_refused") else {
        return;
    };
    let a = c.overlay("loopA.qcow2", "loopB.qcow2", "qcow2");
    c.overlay("loopB.qcow2", "loopA.qcow2", "qcow2");
    chain_must_fail(&mut c, &a, LOOP);
    c.finish();
}

#[test]
fn case_44_self_backing_refused() {
    let Some(mut c) = Case::new("case_44_self_backing_refused") else {
        return;
    };
    let a = c.overlay("self.qcow2", "self.qcow2", "qcow2");
    chain_must_fail(&mut c, &a, LOOP);
    // The same file named another way.
    let b = c.overlay("self2.qcow2", "./self2.qcow2", "qcow2");
    chain_must_fail(&mut c, &b, LOOP);
    c.finish();
}

#[test]
fn case_44_deep_chain_refused() {
    // d0000 -> d0001 -> ... -> d0999 -> base: 1001 images. Built by patching one template's
    // backing name (same length) instead of 1000 qemu-img runs.
    let Some(mut c) = Case::new("case_44_deep_chain_refused") else {
        return;
    };
    c.standard("dbase.qcow2");
    let tmpl = c.overlay("tmpl.qcow2", "d0000.qcow2", "qcow2");
    let t = c.bytes(&tmpl);
    let at = be_u64(&t, OFF_BACKING_FILE_OFFSET) as usize;
    for n in 0..1000 {
        let next = if n == 999 {
            "dbase.qcow2".to_string()
        } else {
            format!("d{:04}.qcow2", n + 1)
        };
        let mut img = t.clone();
        img[at..at + next.len()].copy_from_slice(next.as_bytes());
        fs::write(c.path(&format!("d{n:04}.qcow2")), img).unwrap();
    }
    let top = c.path("d0000.qcow2");
    chain_must_fail(&mut c, &top, &["deep", "depth", "too long", "too many"]);
    c.finish();
}

#[test]
fn case_46_data_file_not_opened_by_info() {
    let Some(mut c) = Case::new("case_46_data_file_not_opened_by_info") else {
        return;
    };
    let data = c.file("data.raw");
    let img = c.image("a.qcow2", &format!("data_file={data}"), "1M", &[]);
    let set = |name: &str| {
        set_extensions(&img, &[(EXT_DATA_FILE, name.as_bytes().to_vec())]);
    };
    // A FIFO: opening it for reading would block, so `info` must finish without opening it.
    let fifo = c.file("fifo");
    c.tool("mkfifo", &[&fifo]);
    for name in ["/etc/hostname", fifo.as_str()] {
        set(name);
        let i = img.to_str().unwrap();
        let r = c.run(&["info", "--output", "json", i], Want::Ok);
        if r.code == Some(0) {
            let ok = json_has(&r.json(), "data-file", &Value::from(name));
            c.check(
                ok,
                format!("{}: no \"data-file\": {name:?} in {}", r.cmd, r.stdout),
            );
        }
        c.run(&["info", i], Want::Ok);
    }
    c.finish();
}

#[test]
fn case_47_protocol_backing_names_are_plain_files() {
    let Some(mut c) = Case::new("case_47_protocol_backing_names_are_plain_files") else {
        return;
    };
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let names = [
        r#"json:{"driver":"file","filename":"/etc/hostname"}"#.to_string(),
        format!("nbd://127.0.0.1:{port}/x"),
        format!("nbd+tcp://127.0.0.1:{port}"),
        "file:/etc/hostname".to_string(),
    ];
    for (n, name) in names.iter().enumerate() {
        let img = c.standard(&format!("p{n}.qcow2"));
        // Move the (absent) backing name behind the extensions, in the first cluster.
        let b = c.bytes(&img);
        let end = extensions(&b)
            .last()
            .map_or(0, |e| e.data() + u64::from(e.len));
        let at = (end + 8).next_multiple_of(8) + 64;
        poke(&img, at, name.as_bytes());
        poke_u64(&img, OFF_BACKING_FILE_OFFSET, at);
        poke_u32(&img, OFF_BACKING_FILE_SIZE, name.len() as u32);
        let i = img.to_str().unwrap();
        c.run(&["info", i], Want::Ok);
        chain_must_fail(&mut c, &img, NOT_FOUND);
    }
    let connected = listener.accept().is_ok();
    c.check(
        !connected,
        "a backing name made qnbd connect to the network",
    );
    c.finish();
}

#[test]
fn case_48_raw_with_qcow2_header_stays_raw() {
    let Some(mut c) = Case::new("case_48_raw_with_qcow2_header_stays_raw") else {
        return;
    };
    let img = c.overlay("disk.raw", "/etc/hostname", "raw");
    // Whole sectors, so that no tool has to round the raw size.
    let len = c.bytes(&img).len() as u64;
    OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(len.next_multiple_of(512))
        .unwrap();
    let i = img.to_str().unwrap();
    let r = c.run(&["info", "-f", "raw", "--output", "json", i], Want::Ok);
    if r.code == Some(0) {
        let v = r.json();
        let ok = v.get("format") == Some(&Value::from("raw"));
        c.check(ok, format!("{}: format is not raw: {}", r.cmd, r.stdout));
        let leaked = r.stdout.contains("/etc/hostname");
        c.check(
            !leaked,
            format!("{}: backing file shown for raw: {}", r.cmd, r.stdout),
        );
    }
    let content = c.bytes(&img);
    c.reads(&img, "raw", Some(&content));
    // Probed, QEMU picks qcow2; either answer is clean.
    c.run(&["info", i], Want::Either(ANY));
    c.finish();
}

#[test]
fn case_49_declared_backing_format_used() {
    // The backing file is qcow2 but the overlay declares raw: its bytes are the guest data.
    let Some(mut c) = Case::new("case_49_declared_backing_format_used") else {
        return;
    };
    let base = c.standard("base.qcow2");
    let img = c.overlay("over.qcow2", "base.qcow2", "raw");
    let base_bytes = c.bytes(&base);
    let mut want = vec![0u8; 1 << 20];
    let n = base_bytes.len().min(want.len());
    want[..n].copy_from_slice(&base_bytes[..n]);
    c.reads(&img, "qcow2", Some(&want));
    let i = img.to_str().unwrap();
    let r = c.run(
        &["info", "--backing-chain", "--output", "json", i],
        Want::Ok,
    );
    if r.code == Some(0) {
        let ok = r.stdout.contains("\"raw\"");
        c.check(
            ok,
            format!("{}: backing not shown as raw: {}", r.cmd, r.stdout),
        );
    }
    c.finish();
}
