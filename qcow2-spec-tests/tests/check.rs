//! `qnbd check` against `qemu-img check` on damaged images built at test time.
//!
//! Each case makes an image with qemu-img / qemu-io, then damages it with byte pokes (or a
//! `kill -9` of a qemu-io writer). For each image:
//! 1. `qnbd check --output=json` prints exactly what `qemu-img check --output=json` prints, with
//!    the same exit code (under both I/O engines);
//! 2. `qnbd check -r all` on one copy and `qemu-img check -r all` on another end with the same
//!    exit code, and `qemu-img check` afterwards finds no more corruptions or leaks in our
//!    copy than in QEMU's (for the few images QEMU cannot repair, ours must come out clean);
//! 3. when both repaired copies are clean, they hold the same guest data.

use qcow2_spec_tests::{qnbd, require_tools, scratch_dir, tool, IoEngine, Run};
use serde_json::Value;
use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

const TOOLS: &[&str] = &["qemu-img", "qemu-io"];

// ------------------------------------------------------------------------------ byte pokes

fn read_u64(img: &Path, off: u64) -> u64 {
    let f = fs::File::open(img).expect("open image");
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, off).expect("read image");
    u64::from_be_bytes(b)
}

fn read_u32(img: &Path, off: u64) -> u32 {
    let f = fs::File::open(img).expect("open image");
    let mut b = [0u8; 4];
    f.read_exact_at(&mut b, off).expect("read image");
    u32::from_be_bytes(b)
}

fn write_bytes(img: &Path, off: u64, bytes: &[u8]) {
    let f = OpenOptions::new()
        .write(true)
        .open(img)
        .expect("open image rw");
    f.write_all_at(bytes, off).expect("poke image");
}

fn write_u64(img: &Path, off: u64, v: u64) {
    write_bytes(img, off, &v.to_be_bytes());
}

struct Geometry {
    cluster_bits: u32,
    l1_offset: u64,
    reftable_offset: u64,
    refcount_order: u32,
    extended_l2: bool,
}

fn geometry(img: &Path) -> Geometry {
    let version = read_u32(img, 4);
    Geometry {
        cluster_bits: read_u32(img, 20),
        l1_offset: read_u64(img, 40),
        reftable_offset: read_u64(img, 48),
        refcount_order: if version >= 3 { read_u32(img, 96) } else { 4 },
        extended_l2: version >= 3 && read_u64(img, 72) & (1 << 4) != 0,
    }
}

/// Host offset of the L2 table of guest cluster 0.
fn l2_table(img: &Path) -> u64 {
    let g = geometry(img);
    read_u64(img, g.l1_offset) & 0x00ff_ffff_ffff_fe00
}

/// Byte offset of the L2 entry of guest cluster `index` (in the first L2 table).
fn l2_entry_at(img: &Path, index: u64) -> u64 {
    let g = geometry(img);
    l2_table(img) + index * if g.extended_l2 { 16 } else { 8 }
}

fn l2_entry(img: &Path, index: u64) -> u64 {
    read_u64(img, l2_entry_at(img, index))
}

fn set_l2_entry(img: &Path, index: u64, v: u64) {
    write_u64(img, l2_entry_at(img, index), v);
}

/// Set the refcount of host cluster `cluster` (covered by the first refcount block).
fn set_refcount(img: &Path, cluster: u64, value: u64) {
    let g = geometry(img);
    let block = read_u64(img, g.reftable_offset) & !0x1ff;
    let bits = 1u64 << g.refcount_order;
    assert!(cluster < (8u64 << g.cluster_bits) / bits);
    if bits < 8 {
        let byte_off = block + cluster * bits / 8;
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(img)
            .expect("open image rw");
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, byte_off).expect("read refblock");
        let shift = (cluster * bits) % 8;
        let mask = (((1u64 << bits) - 1) << shift) as u8;
        b[0] = (b[0] & !mask) | (((value << shift) as u8) & mask);
        f.write_all_at(&b, byte_off).expect("write refblock");
    } else {
        let w = (bits / 8) as usize;
        let be = value.to_be_bytes();
        write_bytes(img, block + cluster * w as u64, &be[8 - w..]);
    }
}

fn set_header_u64(img: &Path, off: u64, f: impl FnOnce(u64) -> u64) {
    let v = read_u64(img, off);
    write_u64(img, off, f(v));
}

fn grow(img: &Path, len: u64) {
    let f = OpenOptions::new()
        .write(true)
        .open(img)
        .expect("open image rw");
    f.set_len(len).expect("grow image");
}

// ------------------------------------------------------------------------------ running

fn must(run: Run) -> Run {
    assert!(run.success(), "{}: {}", run.command, run.outcome());
    run
}

fn create(dir: &Path, name: &str, opts: &str, size: &str) {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([name, size]);
    must(tool("qemu-img", dir, args));
}

fn io(dir: &Path, name: &str, cmds: &[&str]) {
    let mut args = Vec::new();
    for c in cmds {
        args.extend(["-c", *c]);
    }
    args.push(name);
    must(tool("qemu-io", dir, args));
}

fn json_of(run: &Run) -> Value {
    serde_json::from_slice(&run.stdout).unwrap_or_else(|e| {
        panic!(
            "{}: stdout is not JSON ({e}): {:?}; {}",
            run.command,
            run.stdout_text(),
            run.outcome()
        )
    })
}

fn count(v: &Value, key: &str) -> u64 {
    v.get(key).and_then(Value::as_u64).unwrap_or(0)
}

/// What QEMU achieves with `-r all` on this image, compared with what we achieve.
#[derive(Clone, Copy, PartialEq, Eq)]
enum RepairExpect {
    /// Same exit code; our result no worse.
    AsQemu,
    /// QEMU cannot repair this image; we must leave it clean.
    BetterThanQemu,
}

/// Compare `qnbd check` with `qemu-img check` on `dir/name`, plain and with `-r all`.
fn compare(dir: &Path, name: &str, repair: RepairExpect) {
    let q = tool("qemu-img", dir, ["check", "--output=json", name]);
    for engine in IoEngine::ALL {
        let n = qnbd(engine, dir, ["check", "--output=json", name]);
        assert_eq!(
            n.code, q.code,
            "{name} ({engine:?}): exit code of qnbd check {} vs qemu-img check {}\nqnbd stderr: {}\nqemu stderr: {}",
            n.outcome(), q.outcome(), n.stderr, q.stderr
        );
        if q.stdout.is_empty() {
            assert!(
                n.stdout.is_empty(),
                "{name}: qemu-img printed nothing, qnbd: {}",
                n.stdout_text()
            );
            continue;
        }
        assert_eq!(
            json_of(&n),
            json_of(&q),
            "{name} ({engine:?}): JSON differs\nqnbd stderr: {}\nqemu stderr: {}",
            n.stderr,
            q.stderr
        );
        assert_eq!(
            n.stdout_text(),
            q.stdout_text(),
            "{name}: JSON text differs"
        );
        // the human output is the same too
        let nh = qnbd(engine, dir, ["check", name]);
        let qh = tool("qemu-img", dir, ["check", name]);
        assert_eq!(
            nh.stdout_text(),
            qh.stdout_text(),
            "{name}: human output differs"
        );
    }

    // repair one copy each
    let ours = format!("ours-{name}");
    let theirs = format!("qemu-{name}");
    fs::copy(dir.join(name), dir.join(&ours)).expect("copy image");
    fs::copy(dir.join(name), dir.join(&theirs)).expect("copy image");
    let qr = tool("qemu-img", dir, ["check", "-r", "all", theirs.as_str()]);
    let nr = qnbd(IoEngine::Sync, dir, ["check", "-r", "all", ours.as_str()]);
    let qa = tool("qemu-img", dir, ["check", "--output=json", theirs.as_str()]);
    let na = tool("qemu-img", dir, ["check", "--output=json", ours.as_str()]);
    let ctx = format!(
        "{name}: qemu-img check -r all: {}\nqnbd check -r all: {}\n{}\nqemu-img check of QEMU's repair: {} {}\nqemu-img check of our repair: {} {}",
        qr.outcome(),
        nr.outcome(),
        nr.stdout_text(),
        qa.outcome(),
        qa.stdout_text(),
        na.outcome(),
        na.stdout_text()
    );
    match repair {
        RepairExpect::AsQemu => {
            assert_eq!(nr.code, qr.code, "exit code of the repair\n{ctx}");
            assert_eq!(na.code, qa.code, "exit code after the repair\n{ctx}");
            if !qa.stdout.is_empty() {
                let (nv, qv) = (json_of(&na), json_of(&qa));
                for key in ["corruptions", "leaks", "check-errors"] {
                    assert!(
                        count(&nv, key) <= count(&qv, key),
                        "{key} after repair\n{ctx}"
                    );
                }
            }
        }
        RepairExpect::BetterThanQemu => {
            assert_ne!(
                qa.code,
                Some(0),
                "QEMU repaired this image after all\n{ctx}"
            );
            assert_eq!(nr.code, Some(0), "our repair\n{ctx}");
            assert_eq!(na.code, Some(0), "qemu-img check after our repair\n{ctx}");
        }
    }
    if na.code == Some(0) && qa.code == Some(0) {
        let c = tool("qemu-img", dir, ["compare", theirs.as_str(), ours.as_str()]);
        assert!(
            c.success(),
            "guest data after the repairs differ\n{}\n{ctx}",
            c.outcome()
        );
    }
}

/// Build an image with `build(dir)` returning its name, then compare.
fn case(what: &str, repair: RepairExpect, build: impl FnOnce(&Path) -> String) {
    if !require_tools(what, TOOLS) {
        return;
    }
    let tmp = scratch_dir();
    let dir = tmp.path();
    let name = build(dir);
    compare(dir, &name, repair);
}

/// 16 MiB image with 128 KiB of data at 0: clusters 0 header, 1 reftable, 2 refblock, 3 L1,
/// 4 L2, 5-6 data (64 KiB clusters).
fn basic(dir: &Path, opts: &str) -> String {
    create(dir, "img.qcow2", opts, "16M");
    io(dir, "img.qcow2", &["write -P 0x11 0 128k"]);
    "img.qcow2".into()
}

use RepairExpect::*;

// ------------------------------------------------------------------------------ cases

#[test]
fn clean_image_is_clean() {
    case("clean", AsQemu, |d| basic(d, ""));
}

#[test]
fn leaked_cluster_is_a_leak_and_repaired() {
    case("leak", AsQemu, |d| {
        let n = basic(d, "");
        let img = d.join(&n);
        grow(&img, 1 << 20);
        set_refcount(&img, 10, 1);
        n
    });
}

#[test]
fn refcount_too_high_on_data_cluster() {
    case("refcount 2 reference 1", AsQemu, |d| {
        let n = basic(d, "");
        set_refcount(&d.join(&n), 5, 2);
        n
    });
}

#[test]
fn refcount_too_low_rebuilds_refcounts() {
    case("refcount 0 reference 1", AsQemu, |d| {
        let n = basic(d, "");
        set_refcount(&d.join(&n), 6, 0);
        n
    });
}

#[test]
fn double_reference_with_copied() {
    case("two L2 entries, one cluster, COPIED", AsQemu, |d| {
        let n = basic(d, "");
        let img = d.join(&n);
        let e0 = l2_entry(&img, 0);
        set_l2_entry(&img, 3, e0);
        n
    });
}

#[test]
fn l2_entry_into_the_refcount_table() {
    case("L2 entry -> refcount table", AsQemu, |d| {
        let n = basic(d, "");
        let img = d.join(&n);
        let rt = geometry(&img).reftable_offset;
        set_l2_entry(&img, 0, (1 << 63) | rt);
        n
    });
}

#[test]
fn unaligned_l2_entry() {
    case("unaligned data cluster", AsQemu, |d| {
        let n = basic(d, "");
        let img = d.join(&n);
        let e = l2_entry(&img, 0);
        set_l2_entry(&img, 0, e | 0x200);
        n
    });
}

#[test]
fn unaligned_preallocated_zero_cluster_is_zeroed() {
    case("unaligned zero-alloc cluster", AsQemu, |d| {
        let n = basic(d, "");
        let img = d.join(&n);
        let e = l2_entry(&img, 1);
        set_l2_entry(&img, 1, e | 0x200 | 1);
        n
    });
}

#[test]
fn l2_entry_with_reserved_bits() {
    case("L2 reserved bit 57", AsQemu, |d| {
        let n = basic(d, "");
        let img = d.join(&n);
        let e = l2_entry(&img, 0);
        set_l2_entry(&img, 0, e | (1 << 57));
        n
    });
}

#[test]
fn l1_entry_with_reserved_bits() {
    case("L1 reserved bit 60", AsQemu, |d| {
        let n = basic(d, "");
        let img = d.join(&n);
        let l1 = geometry(&img).l1_offset;
        set_header_u64(&img, l1, |e| e | (1 << 60));
        n
    });
}

#[test]
fn unaligned_l2_table_offset() {
    case("unaligned L2 table", AsQemu, |d| {
        let n = basic(d, "");
        let img = d.join(&n);
        let l1 = geometry(&img).l1_offset;
        set_header_u64(&img, l1, |e| e | 0x200);
        n
    });
}

#[test]
fn unaligned_refblock_is_rebuilt() {
    // QEMU marks the image corrupt and then cannot write the new refcount blocks
    case("unaligned refblock", BetterThanQemu, |d| {
        let n = basic(d, "");
        let img = d.join(&n);
        let rt = geometry(&img).reftable_offset;
        set_header_u64(&img, rt, |e| e | 0x200);
        n
    });
}

#[test]
fn data_cluster_beyond_end_of_file() {
    case("L2 entry -> 1 TiB", AsQemu, |d| {
        let n = basic(d, "");
        set_l2_entry(&d.join(&n), 1, (1 << 63) | (1 << 40));
        n
    });
}

#[test]
fn truncated_file() {
    case("file cut inside the data", AsQemu, |d| {
        let n = basic(d, "");
        let img = d.join(&n);
        let f = OpenOptions::new().write(true).open(&img).expect("open");
        f.set_len(5 << 16).expect("truncate");
        n
    });
}

#[test]
fn dirty_lazy_refcounts_after_kill() {
    case("lazy refcounts, qemu-io killed", AsQemu, |d| {
        create(d, "img.qcow2", "lazy_refcounts=on", "16M");
        // qemu-io raises SIGKILL on itself: refcounts never reach the disk, the dirty bit does
        let r = tool(
            "qemu-io",
            d,
            [
                "-c",
                "write -P 0x22 0 256k",
                "-c",
                "write -P 0x23 1M 64k",
                "-c",
                "flush",
                "-c",
                "write -P 0x24 2M 64k",
                "-c",
                "sigraise 9",
                "img.qcow2",
            ],
        );
        assert_eq!(
            r.code,
            None,
            "qemu-io should have been killed: {}",
            r.outcome()
        );
        assert!(
            read_u64(&d.join("img.qcow2"), 72) & 1 != 0,
            "dirty bit not set"
        );
        "img.qcow2".into()
    });
}

#[test]
fn dirty_bit_alone_is_cleared_by_repair() {
    case("dirty bit only", AsQemu, |d| {
        let n = basic(d, "lazy_refcounts=on");
        set_header_u64(&d.join(&n), 72, |v| v | 1);
        n
    });
}

#[test]
fn corrupt_bit_alone() {
    case("corrupt bit only", AsQemu, |d| {
        let n = basic(d, "");
        set_header_u64(&d.join(&n), 72, |v| v | 2);
        n
    });
}

#[test]
fn bitmaps_count_while_autoclear_is_set() {
    case("bitmap", AsQemu, |d| {
        create(d, "img.qcow2", "", "16M");
        must(tool("qemu-img", d, ["bitmap", "--add", "img.qcow2", "b0"]));
        io(d, "img.qcow2", &["write -P 0x33 0 128k"]);
        "img.qcow2".into()
    });
}

#[test]
fn bitmaps_with_autoclear_cleared_are_leaks() {
    case("bitmaps autoclear cleared", AsQemu, |d| {
        create(d, "img.qcow2", "", "16M");
        must(tool("qemu-img", d, ["bitmap", "--add", "img.qcow2", "b0"]));
        io(d, "img.qcow2", &["write -P 0x33 0 128k"]);
        set_header_u64(&d.join("img.qcow2"), 88, |v| v & !1);
        "img.qcow2".into()
    });
}

#[test]
fn snapshot_shares_clusters_with_refcount_2() {
    case("snapshot", AsQemu, |d| {
        let n = basic(d, "");
        must(tool("qemu-img", d, ["snapshot", "-c", "s1", n.as_str()]));
        io(d, &n, &["write -P 0x44 64k 64k"]);
        n
    });
}

#[test]
fn snapshot_shared_cluster_with_refcount_1() {
    case("snapshot, shared refcount too low", AsQemu, |d| {
        let n = basic(d, "");
        must(tool("qemu-img", d, ["snapshot", "-c", "s1", n.as_str()]));
        set_refcount(&d.join(&n), 5, 1);
        n
    });
}

#[test]
fn every_refcount_width() {
    for bits in [1, 2, 4, 8, 16, 32, 64] {
        case(&format!("refcount_bits={bits}"), AsQemu, |d| {
            let n = basic(d, &format!("refcount_bits={bits}"));
            let img = d.join(&n);
            grow(&img, 1 << 20);
            set_refcount(&img, 12, 1);
            n
        });
        case(&format!("refcount_bits={bits}, too low"), AsQemu, |d| {
            let n = basic(d, &format!("refcount_bits={bits}"));
            set_refcount(&d.join(&n), 5, 0);
            n
        });
    }
}

#[test]
fn extended_l2_clean_and_invalid_bitmaps() {
    case("extended L2", AsQemu, |d| {
        create(d, "img.qcow2", "extended_l2=on", "16M");
        io(
            d,
            "img.qcow2",
            &[
                "write -P 0x55 4k 2k",
                "write -z 128k 4k",
                "write -P 1 1M 64k",
            ],
        );
        "img.qcow2".into()
    });
    case("extended L2, alloc and zero bits", AsQemu, |d| {
        create(d, "img.qcow2", "extended_l2=on", "16M");
        io(d, "img.qcow2", &["write -P 0x55 0 64k"]);
        let img = d.join("img.qcow2");
        let at = l2_entry_at(&img, 0) + 8;
        write_u64(&img, at, 0x0000_0001_ffff_ffff);
        "img.qcow2".into()
    });
    case("extended L2, unallocated with alloc bits", AsQemu, |d| {
        create(d, "img.qcow2", "extended_l2=on", "16M");
        io(d, "img.qcow2", &["write -P 0x55 0 64k"]);
        let img = d.join("img.qcow2");
        let at = l2_entry_at(&img, 5) + 8;
        write_u64(&img, at, 0x3);
        "img.qcow2".into()
    });
}

#[test]
fn compressed_clusters() {
    case("compressed", AsQemu, |d| {
        create(d, "img.qcow2", "", "16M");
        io(
            d,
            "img.qcow2",
            &[
                "write -c -P 0x66 0 64k",
                "write -c -P 0x67 64k 64k",
                "write -P 1 1M 64k",
            ],
        );
        "img.qcow2".into()
    });
    case("compressed with COPIED", AsQemu, |d| {
        create(d, "img.qcow2", "", "16M");
        io(d, "img.qcow2", &["write -c -P 0x66 0 64k"]);
        let img = d.join("img.qcow2");
        let e = l2_entry(&img, 0);
        set_l2_entry(&img, 0, e | (1 << 63));
        "img.qcow2".into()
    });
}

#[test]
fn external_data_file() {
    case("data file", AsQemu, |d| {
        create(d, "img.qcow2", "data_file=img.data", "16M");
        io(d, "img.qcow2", &["write -P 0x77 0 128k"]);
        "img.qcow2".into()
    });
    case("data file, leak", AsQemu, |d| {
        create(d, "img.qcow2", "data_file=img.data", "16M");
        io(d, "img.qcow2", &["write -P 0x77 0 128k"]);
        let img = d.join("img.qcow2");
        grow(&img, 1 << 20);
        set_refcount(&img, 9, 1);
        "img.qcow2".into()
    });
}

#[test]
fn version_2_image() {
    case("compat=0.10 leak", AsQemu, |d| {
        let n = basic(d, "compat=0.10");
        let img = d.join(&n);
        grow(&img, 1 << 20);
        set_refcount(&img, 11, 1);
        n
    });
}

#[test]
fn raw_images_have_no_checks() {
    if !require_tools("raw check", TOOLS) {
        return;
    }
    let tmp = scratch_dir();
    let d = tmp.path();
    must(tool(
        "qemu-img",
        d,
        ["create", "-q", "-f", "raw", "r.img", "1M"],
    ));
    let q = tool("qemu-img", d, ["check", "r.img"]);
    let n = qnbd(IoEngine::Sync, d, ["check", "r.img"]);
    assert_eq!(q.code, Some(63));
    assert_eq!(n.code, Some(63), "{}", n.outcome());
    let n = qnbd(IoEngine::Sync, d, ["check", "missing.qcow2"]);
    assert_eq!(n.code, Some(1), "{}", n.outcome());
}

#[test]
fn leaks_only_repair_matches_qemu() {
    if !require_tools("check -r leaks", TOOLS) {
        return;
    }
    let tmp = scratch_dir();
    let d = tmp.path();
    let n = basic(d, "");
    let img = d.join(&n);
    grow(&img, 1 << 20);
    set_refcount(&img, 10, 1);
    set_refcount(&img, 5, 2);
    fs::copy(&img, d.join("q.qcow2")).expect("copy");
    fs::copy(&img, d.join("n.qcow2")).expect("copy");
    let q = tool(
        "qemu-img",
        d,
        ["check", "-r", "leaks", "--output=json", "q.qcow2"],
    );
    let o = qnbd(
        IoEngine::Sync,
        d,
        ["check", "-r", "leaks", "--output=json", "n.qcow2"],
    );
    assert_eq!(o.code, q.code, "{}\n{}", o.outcome(), q.outcome());
    let (mut ov, mut qv) = (json_of(&o), json_of(&q));
    ov["filename"] = Value::Null;
    qv["filename"] = Value::Null;
    assert_eq!(ov, qv);
}

#[test]
fn in_use_bitmap_is_a_warning_only() {
    if !require_tools("in-use bitmap", TOOLS) {
        return;
    }
    let tmp = scratch_dir();
    let d = tmp.path();
    create(d, "img.qcow2", "", "16M");
    must(tool("qemu-img", d, ["bitmap", "--add", "img.qcow2", "b0"]));
    // qemu-io sets in-use on its read-write open and dies before clearing it
    let r = tool(
        "qemu-io",
        d,
        ["-c", "write -P 1 0 64k", "-c", "sigraise 9", "img.qcow2"],
    );
    assert_eq!(r.code, None, "{}", r.outcome());
    let q = tool("qemu-img", d, ["check", "img.qcow2"]);
    let n = qnbd(IoEngine::Sync, d, ["check", "img.qcow2"]);
    assert_eq!(n.code, q.code, "{}", n.outcome());
    assert_eq!(n.stdout_text(), q.stdout_text());
    assert!(
        n.stderr.contains("bitmap 'b0' is marked in-use"),
        "no in-use warning: {}",
        n.stderr
    );
    let j = qnbd(IoEngine::Sync, d, ["check", "--output=json", "img.qcow2"]);
    assert!(
        !j.stderr.contains("in-use"),
        "warning in JSON mode: {}",
        j.stderr
    );
}
