//! Integrity regressions of the write path, one test per way an image could be corrupted or a
//! write could fail on an ordinary image: writes, zeroes and discards over compressed clusters
//! (packed by `qemu-img convert -c`, zlib and zstd, extended L2, shared with snapshots, in a
//! backing image), a full disk, a data write failing under a new L2 table, refcounts of
//! unflushed allocations, a data file that is the image itself (or another file of the chain
//! or of another export), unbounded snapshot tables, the `serve -s` overlay file, FAST_ZERO,
//! and dirty bitmaps of compressed writes. Contents are compared with a shadow copy, and every
//! image written must pass `qemu-img check`.

use qcow2_spec_tests::{qnbd_bin, require_tools, run_command, scratch_dir, NbdServer};
use qnbd::block::{Access, BlockDevice, Chain, Mapping, NoBacking, ZeroMode};
use qnbd::io::mem::{Fault, FaultStorage};
use qnbd::open::{open_image, open_storage_image, Format, OpenOptions};
use qnbd::qcow2::{Qcow2, Qcow2Options};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn have(tools: &[&str]) -> bool {
    require_tools("integrity", tools)
}

fn run(prog: &str, args: &[&str], cwd: &Path) -> qcow2_spec_tests::Run {
    qcow2_spec_tests::tool_ok(prog, cwd, args)
}

/// `qemu-img check` exit code and output.
fn check(img: &Path) -> (i32, String) {
    qcow2_spec_tests::qemu_img_check(img.parent().unwrap_or(Path::new("/")), img)
}

fn assert_clean(img: &Path, what: &str) {
    let (rc, out) = check(img);
    assert_eq!(rc, 0, "{what}: qemu-img check: {out}");
}

/// Guest contents as qemu-img reads them (`-l` selects an internal snapshot).
fn contents(img: &Path, snapshot: Option<&str>) -> Vec<u8> {
    let out = img.with_extension(format!("read-{}.raw", snapshot.unwrap_or("active")));
    let _ = std::fs::remove_file(&out);
    let mut args = vec!["convert", "-U", "-O", "raw"];
    let l;
    if let Some(s) = snapshot {
        l = format!("snapshot.name={s}");
        args.extend(["-l", &l]);
    }
    let img_s = img.to_str().unwrap();
    let out_s = out.to_str().unwrap();
    args.extend([img_s, out_s]);
    run("qemu-img", &args, Path::new("/"));
    let v = std::fs::read(&out).unwrap();
    let _ = std::fs::remove_file(&out);
    v
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(a.len().min(b.len()));
    }
    a.iter().zip(b).position(|(x, y)| x != y)
}

/// A raw source with varied, compressible data over its first 4 MiB (every 64 KiB differs).
fn source_raw(dir: &Path, size: u64) -> (PathBuf, Vec<u8>) {
    let p = dir.join("src.raw");
    let mut v = vec![0u8; size as usize];
    for (i, chunk) in v[..(4 << 20).min(size as usize)]
        .chunks_mut(512)
        .enumerate()
    {
        let pat = (i / 128) as u8 ^ 0x61;
        chunk.fill(pat);
        chunk[..8].copy_from_slice(&(i as u64).to_le_bytes());
    }
    std::fs::write(&p, &v).unwrap();
    (p, v)
}

fn rw() -> OpenOptions {
    OpenOptions {
        writable: true,
        format: Some(Format::Qcow2),
        policy: qnbd::open::OpenPolicy::trusted(),
        ..Default::default()
    }
}

fn w(chain: &Chain, shadow: &mut [u8], off: u64, len: u64, pat: u8) {
    chain
        .write(off, &vec![pat; len as usize], false)
        .unwrap_or_else(|e| panic!("write {off:#x}+{len:#x}: {e}"));
    shadow[off as usize..(off + len) as usize].fill(pat);
}

fn z(chain: &Chain, shadow: &mut [u8], off: u64, len: u64, mode: ZeroMode) {
    chain
        .write_zeroes(off, len, mode, false)
        .unwrap_or_else(|e| panic!("write_zeroes {off:#x}+{len:#x}: {e}"));
    shadow[off as usize..(off + len) as usize].fill(0);
}

/// The operations of the compressed-cluster workload, applied to the image and the shadow.
fn compressed_workload(chain: &Chain, shadow: &mut [u8], cs: u64) {
    // partial writes inside compressed clusters (the old data merged in), one across two
    w(chain, shadow, 3 << 20, 65536, 5);
    w(chain, shadow, (1 << 20) + 4096 + 17, 3000, 6);
    w(chain, shadow, 2 * cs - 100, 300, 7);
    // a whole cluster
    w(chain, shadow, 5 * cs, cs, 8);
    // zeroes: unaligned (data path) and whole clusters (metadata), both modes
    z(chain, shadow, (2 << 20) + 1000, 5000, ZeroMode::MayUnmap);
    z(chain, shadow, 8 * cs, 2 * cs, ZeroMode::MayUnmap);
    z(chain, shadow, 11 * cs, cs, ZeroMode::KeepAllocated);
    chain.flush().unwrap();
    // discard of whole clusters reads as zeros afterwards (v3)
    let (off, len) = (14 * cs, 3 * cs);
    chain.discard(off, len, false).unwrap();
    shadow[off as usize..(off + len) as usize].fill(0);
    // overwrite what was just written (now an owned cluster)
    w(chain, shadow, 3 << 20, 4096, 9);
    chain.flush().unwrap();
}

/// The exact report: a compressed image served writable, a 64 KiB write over compressed data
/// with qemu-io.
#[test]
fn write_over_compressed_data_through_serve() {
    if !have(&["qemu-img", "qemu-io"]) {
        return;
    }
    let dir = scratch_dir();
    let d = dir.path();
    let (src, mut shadow) = source_raw(d, 16 << 20);
    run(
        "qemu-img",
        &[
            "convert",
            "-c",
            "-O",
            "qcow2",
            src.to_str().unwrap(),
            "w.qcow2",
        ],
        d,
    );
    let sock = d.join("S");
    let server = NbdServer::start(
        d,
        qnbd_bin(),
        &["serve", "-t", "-f", "qcow2", "w.qcow2"],
        &sock,
    );
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let o = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 5 3M 64k", "-c", "flush", &uri])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && !text.contains("failed"), "{text}");
    server.stop();
    shadow[3 << 20..(3 << 20) + 65536].fill(5);
    let img = d.join("w.qcow2");
    assert_clean(&img, "after the write");
    assert_eq!(first_difference(&contents(&img, None), &shadow), None);
}

/// Writes, write-zeroes and discards over compressed clusters on every layout that has them.
#[test]
fn writes_zeroes_and_discards_over_compressed_clusters() {
    if !have(&["qemu-img"]) {
        return;
    }
    let dir = scratch_dir();
    let d = dir.path();
    let size = 8u64 << 20;
    let (src, original) = source_raw(d, size);
    let src_s = src.to_str().unwrap();
    for ctype in ["zlib", "zstd"] {
        for (ext, cs) in [
            (false, 65536u64),
            (true, 65536),
            (false, 4096),
            (true, 32768),
        ] {
            for variant in ["plain", "snapshot", "compressed-backing"] {
                let what = format!("{ctype} ext_l2={ext} cluster {cs} {variant}");
                let img = d.join("c.qcow2");
                let _ = std::fs::remove_file(&img);
                let opts = format!(
                    "compression_type={ctype},cluster_size={cs},extended_l2={}",
                    if ext { "on" } else { "off" }
                );
                let (top, base) = if variant == "compressed-backing" {
                    let base = d.join("base.qcow2");
                    let _ = std::fs::remove_file(&base);
                    run(
                        "qemu-img",
                        &[
                            "convert",
                            "-c",
                            "-O",
                            "qcow2",
                            "-o",
                            &opts,
                            src_s,
                            "base.qcow2",
                        ],
                        d,
                    );
                    let o = format!("{opts},backing_file=base.qcow2,backing_fmt=qcow2");
                    run(
                        "qemu-img",
                        &["create", "-q", "-f", "qcow2", "-o", &o, "c.qcow2"],
                        d,
                    );
                    (img.clone(), Some(base))
                } else {
                    run(
                        "qemu-img",
                        &[
                            "convert", "-c", "-O", "qcow2", "-o", &opts, src_s, "c.qcow2",
                        ],
                        d,
                    );
                    (img.clone(), None)
                };
                if variant == "snapshot" {
                    run("qemu-img", &["snapshot", "-c", "s1", "c.qcow2"], d);
                }
                let mut shadow = original.clone();
                {
                    let image = open_image(top.to_str().unwrap(), &rw())
                        .unwrap_or_else(|e| panic!("{what}: open: {e}"));
                    compressed_workload(&image.chain, &mut shadow, cs);
                    image.chain.close().unwrap();
                }
                assert_clean(&top, &what);
                let got = contents(&top, None);
                if let Some(at) = first_difference(&got, &shadow) {
                    panic!("{what}: contents differ at {at:#x}");
                }
                if variant == "snapshot" {
                    let snap = contents(&top, Some("s1"));
                    assert_eq!(first_difference(&snap, &original), None, "{what}: snapshot");
                }
                if let Some(b) = base {
                    assert_clean(&b, &what);
                    assert_eq!(first_difference(&contents(&b, None), &original), None);
                }
            }
        }
    }
}

/// Open a qcow2 held in a fault-injecting storage, writable.
fn open_faulty(st: &Arc<FaultStorage>) -> Chain {
    let opts = Qcow2Options {
        access: Access::ReadWrite,
        ..Qcow2Options::default()
    };
    let dev = open_storage_image(st.clone(), Some(Format::Qcow2), &opts).unwrap();
    Chain::new(vec![dev]).unwrap()
}

/// ENOSPC while rewriting compressed data: the write fails, the refcounts of the packed host
/// clusters still match their references, and the range holds old or new data per request.
#[test]
fn a_full_disk_under_writes_over_compressed_data_keeps_refcounts() {
    if !have(&["qemu-img"]) {
        return;
    }
    let dir = scratch_dir();
    let d = dir.path();
    let size = 16u64 << 20;
    let (src, original) = source_raw(d, size);
    for ext in ["off", "on"] {
        let img = d.join("w.qcow2");
        let _ = std::fs::remove_file(&img);
        let opts = format!("extended_l2={ext}");
        run(
            "qemu-img",
            &[
                "convert",
                "-c",
                "-O",
                "qcow2",
                "-o",
                &opts,
                src.to_str().unwrap(),
                "w.qcow2",
            ],
            d,
        );
        let bytes = std::fs::read(&img).unwrap();
        let limit = bytes.len() as u64 + 3 * 65536;
        let st = Arc::new(FaultStorage::new(bytes, Fault::Enospc { limit }));
        let chain = open_faulty(&st);
        let r = chain.write(1 << 20, &vec![0x33u8; 2 << 20], false);
        let e = r.expect_err("the write should hit ENOSPC");
        assert!(
            e.to_string().contains("No space left on device"),
            "extended_l2={ext}: {e}"
        );
        let _ = chain.flush();
        drop(chain);
        let left = st.snapshot();
        let incompatible = u64::from_be_bytes(left[72..80].try_into().unwrap());
        assert_eq!(incompatible & 2, 0, "extended_l2={ext}: marked corrupt");
        std::fs::write(&img, left).unwrap();
        let (rc, out) = check(&img);
        assert!(rc == 0 || rc == 3, "extended_l2={ext}: {out}");
        let got = contents(&img, None);
        for (c, (g, o)) in got.chunks(65536).zip(original.chunks(65536)).enumerate() {
            let off = c as u64 * 65536;
            let in_write = ((1 << 20)..(3 << 20)).contains(&off);
            let new = g.iter().all(|&b| b == 0x33);
            assert!(
                g == o || (in_write && new),
                "extended_l2={ext}: cluster at {off:#x} is neither old nor new data"
            );
        }
    }
}

/// A data write that fails right after its L2 table was allocated: L1 must never name the
/// table before it exists, whatever is flushed afterwards.
#[test]
fn a_failed_data_write_under_a_new_l2_table_leaves_a_valid_image() {
    if !have(&["qemu-img"]) {
        return;
    }
    let dir = scratch_dir();
    let d = dir.path();
    for opts in ["cluster_size=4096", "cluster_size=16384,extended_l2=on"] {
        let img = d.join("l1.qcow2");
        let _ = std::fs::remove_file(&img);
        run(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "-o", opts, "l1.qcow2", "64M"],
            d,
        );
        let cs = if opts.contains("16384") { 16384 } else { 4096 };
        let st = Arc::new(FaultStorage::new(std::fs::read(&img).unwrap(), Fault::None));
        let chain = open_faulty(&st);
        chain.write(0, &[1u8; 4096], false).unwrap();
        chain.flush().unwrap();
        // a freed cluster with stale bytes, the first one the next allocation takes
        chain.write(12 << 20, &vec![0xabu8; cs], false).unwrap();
        chain.flush().unwrap();
        chain.discard(12 << 20, cs as u64, false).unwrap();
        chain.flush().unwrap();
        // the next storage operation is the data write of a cluster under a table that does
        // not exist yet (each L2 table covers 2 MiB here, or 16 MiB with extended L2); the
        // table gets the freed cluster
        st.arm(Fault::AtOp {
            at: st.ops(),
            errno: 5, // EIO
            sticky: false,
        });
        assert!(chain.write(40 << 20, &[2u8; 4096], false).is_err());
        chain.flush().expect("flush after a failed write");
        // and a later write elsewhere reuses whatever was allocated
        chain.write(8 << 20, &[3u8; 4096], false).unwrap();
        chain.flush().unwrap();
        drop(chain);
        std::fs::write(&img, st.snapshot()).unwrap();
        let (rc, out) = check(&img);
        assert!(rc == 0 || rc == 3, "{opts}: {out}");
        let got = contents(&img, None);
        assert!(got[..4096].iter().all(|&b| b == 1), "{opts}");
        assert!(
            got[8 << 20..(8 << 20) + 4096].iter().all(|&b| b == 3),
            "{opts}"
        );
        let r = &got[40 << 20..(40 << 20) + 4096];
        assert!(r.iter().all(|&b| b == 0), "{opts}: failed write left data");
        // and qnbd reads it again
        let image = open_image(img.to_str().unwrap(), &rw()).unwrap();
        let mut buf = vec![0u8; 4096];
        image.chain.read(40 << 20, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
    }
}

/// A cluster allocated since the last flush has refcount 1 at once (the dirty refcount block
/// answers, not the copy on disk), and a freed one 0.
#[test]
fn refcounts_see_unflushed_changes() {
    if !have(&["qemu-img"]) {
        return;
    }
    let dir = scratch_dir();
    let d = dir.path();
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            "r.qcow2",
            "16M",
        ],
        d,
    );
    let st = Arc::new(FaultStorage::new(
        std::fs::read(d.join("r.qcow2")).unwrap(),
        Fault::None,
    ));
    let opts = Qcow2Options {
        access: Access::ReadWrite,
        ..Qcow2Options::default()
    };
    let q = Qcow2::open(st, &opts).unwrap();
    q.write(1 << 20, &[7u8; 4096], &NoBacking).unwrap();
    let run = q.map(1 << 20, 4096).unwrap();
    let Mapping::Data { host, .. } = run.mapping else {
        panic!("not data: {:?}", run.mapping)
    };
    assert_eq!(
        q.refcount(host / 4096).unwrap(),
        1,
        "new cluster before the flush"
    );
    q.flush().unwrap();
    assert_eq!(q.refcount(host / 4096).unwrap(), 1, "after the flush");
    q.discard(1 << 20, 4096, &NoBacking).unwrap();
    q.flush().unwrap();
    assert_eq!(q.refcount(host / 4096).unwrap(), 0, "freed cluster");
}

/// Replace `from` by `to` (same length) in the header cluster.
fn patch_name(img: &Path, from: &str, to: &str) {
    assert_eq!(from.len(), to.len());
    let mut b = std::fs::read(img).unwrap();
    let head = &mut b[..65536];
    let at = head
        .windows(from.len())
        .position(|w| w == from.as_bytes())
        .unwrap_or_else(|| panic!("{from} not in the header"));
    head[at..at + to.len()].copy_from_slice(to.as_bytes());
    std::fs::write(img, b).unwrap();
}

/// An image whose data file is the image itself (by its own name, by a hard link, or another
/// image of its chain) is refused at open, and nothing is written.
#[test]
fn a_data_file_that_is_the_image_or_its_chain_is_refused() {
    if !have(&["qemu-img"]) {
        return;
    }
    let dir = scratch_dir();
    let d = dir.path();
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "data_file=x.qcow2",
            "w.qcow2",
            "4M",
        ],
        d,
    );
    let img = d.join("w.qcow2");
    let header = std::fs::read(&img).unwrap();
    for (name, what) in [("w.qcow2", "its own name"), ("h.qcow2", "a hard link")] {
        std::fs::write(&img, &header).unwrap();
        patch_name(&img, "x.qcow2", name);
        let _ = std::fs::remove_file(d.join("h.qcow2"));
        std::fs::hard_link(&img, d.join("h.qcow2")).unwrap();
        let before = std::fs::read(&img).unwrap();
        let e = open_image(img.to_str().unwrap(), &rw()).expect_err(what);
        assert!(e.to_string().contains("is the image itself"), "{what}: {e}");
        // the server refuses to start, the header stays
        let mut cmd = Command::new(qcow2_spec_tests::qnbd_bin());
        cmd.args(["serve", "-f", "qcow2", "-k"])
            .arg(d.join("S"))
            .arg(&img);
        let r = run_command(cmd);
        let (code, err) = (r.code, r.stderr);
        assert_eq!(code, Some(1), "{what}: {err}");
        assert!(err.contains("is the image itself"), "{what}: {err}");
        assert_eq!(
            std::fs::read(&img).unwrap(),
            before,
            "{what}: image changed"
        );
    }
    // an overlay whose data file is its backing image
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "b.qcow2", "4M"],
        d,
    );
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "data_file=y.qcow2",
            "-b",
            "b.qcow2",
            "-F",
            "qcow2",
            "o.qcow2",
            "4M",
        ],
        d,
    );
    patch_name(&d.join("o.qcow2"), "y.qcow2", "b.qcow2");
    let base_before = std::fs::read(d.join("b.qcow2")).unwrap();
    let e = open_image(d.join("o.qcow2").to_str().unwrap(), &rw()).expect_err("chain");
    assert!(e.to_string().contains("data file is also used"), "{e}");
    assert_eq!(std::fs::read(d.join("b.qcow2")).unwrap(), base_before);
}

/// `serve`: one export's writable file may not be another export's file.
#[test]
fn exports_sharing_a_written_file_are_refused() {
    if !have(&["qemu-img"]) {
        return;
    }
    let dir = scratch_dir();
    let d = dir.path();
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "data_file=d.raw",
            "a.qcow2",
            "4M",
        ],
        d,
    );
    let sock = d.join("S");
    let mut cmd = Command::new(qcow2_spec_tests::qnbd_bin());
    cmd.current_dir(d)
        .args(["serve", "-k", sock.to_str().unwrap()])
        .args(["--export", "name=a,file=a.qcow2,format=qcow2,writable=on"])
        .args(["--export", "name=b,file=d.raw,format=raw,readonly=on"]);
    let r = run_command(cmd);
    let (code, err) = (r.code, r.stderr);
    assert_eq!(code, Some(1), "{err}");
    // refused by the export check, or before it by the image locks (the second open of the
    // data file meets the first export's claim on it, as two qemu-nbd would)
    assert!(
        err.contains("use the same file") || err.contains("Is another process using the image"),
        "{err}"
    );
    // two read-only exports of one file are fine (checked by starting and stopping)
    let s = NbdServer::start(
        d,
        qnbd_bin(),
        &[
            "serve",
            "--export",
            "name=a,file=a.qcow2,format=qcow2,readonly=on",
            "--export",
            "name=b,file=d.raw,format=raw,readonly=on",
        ],
        &sock,
    );
    s.stop();
}

/// Build a v3 image (512-byte clusters) naming `count` snapshots whose L1 tables each cover
/// `l1_size` entries at `l1_off` (zeros, inside the file).
fn image_with_snapshots(d: &Path, count: u32, l1_size: u32) -> Vec<u8> {
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=512",
            "s.qcow2",
            "1M",
        ],
        d,
    );
    let mut b = std::fs::read(d.join("s.qcow2")).unwrap();
    let table_off = b.len().div_ceil(512) * 512;
    let mut table = Vec::new();
    let l1_off_slot = table_off as u64 + 64 * u64::from(count);
    let l1_off = l1_off_slot.div_ceil(512) * 512;
    for i in 0..count {
        let id = format!("{:04x}", i % 0xffff);
        let mut e = Vec::new();
        e.extend_from_slice(&l1_off.to_be_bytes());
        e.extend_from_slice(&l1_size.to_be_bytes());
        e.extend_from_slice(&(id.len() as u16).to_be_bytes());
        e.extend_from_slice(&0u16.to_be_bytes());
        e.extend_from_slice(&[0u8; 20]); // dates, vm clock, old vm state size
        e.extend_from_slice(&16u32.to_be_bytes());
        e.extend_from_slice(&0u64.to_be_bytes()); // vm state size
        e.extend_from_slice(&(1u64 << 20).to_be_bytes()); // disk size
        e.extend_from_slice(id.as_bytes());
        e.resize(64, 0);
        table.extend_from_slice(&e);
    }
    b.resize(table_off, 0);
    b.extend_from_slice(&table);
    let end = (l1_off + u64::from(l1_size) * 8).min(l1_off + (40 << 20));
    b.resize(end as usize, 0);
    b[60..64].copy_from_slice(&count.to_be_bytes());
    b[64..72].copy_from_slice(&(table_off as u64).to_be_bytes());
    b
}

/// 65,536 snapshots with 32 MiB L1 tables each: a writable open and a write finish at once;
/// an L1 table larger than QEMU allows is refused clearly for writing (reading still works).
#[test]
fn huge_snapshot_tables_neither_hang_nor_pass_unchecked() {
    if !have(&["qemu-img"]) {
        return;
    }
    let dir = scratch_dir();
    let d = dir.path();
    let bytes = image_with_snapshots(d, 65_536, (32 << 20) / 8);
    let st = Arc::new(FaultStorage::new(bytes, Fault::None));
    let t = Instant::now();
    let chain = open_faulty(&st);
    chain.write(4096, &[9u8; 8192], false).unwrap();
    chain.flush().unwrap();
    let mut buf = vec![0u8; 8192];
    chain.read(4096, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 9));
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "open + write took {:?}",
        t.elapsed()
    );
    drop(chain);
    let bad = image_with_snapshots(d, 2, (32 << 20) / 8 + 1);
    let p = d.join("bad.qcow2");
    std::fs::write(&p, &bad).unwrap();
    let e = open_image(p.to_str().unwrap(), &rw()).expect_err("too large an L1 table");
    assert!(e.to_string().contains("Snapshot L1 table too large"), "{e}");
    let ro = OpenOptions {
        writable: false,
        ..rw()
    };
    let image = open_image(p.to_str().unwrap(), &ro).expect("read-only open");
    let mut buf = vec![0u8; 512];
    image.chain.read(0, &mut buf).unwrap();
}

/// `serve -s`: the temporary overlay is a new private file (mode 0600, O_EXCL, a random
/// name), never a predictable path opened with O_TRUNC.
#[test]
fn the_serve_snapshot_overlay_is_a_private_new_file() {
    if !have(&["qemu-img"]) {
        return;
    }
    let dir = scratch_dir();
    let d = dir.path();
    let tmp = d.join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "base.qcow2", "4M"],
        d,
    );
    let sock = d.join("S");
    let server = NbdServer::start_env(
        d,
        qnbd_bin(),
        &["serve", "-s", "-f", "qcow2", "base.qcow2"],
        &sock,
        &[("TMPDIR", tmp.to_str().unwrap())],
    );
    // the overlay is unlinked at once; find it among the server's open files
    let mut found = None;
    for fd in std::fs::read_dir(format!("/proc/{}/fd", server.pid())).unwrap() {
        let fd = fd.unwrap().path();
        if let Ok(target) = std::fs::read_link(&fd) {
            let t = target.to_string_lossy().into_owned();
            if t.starts_with(tmp.to_str().unwrap()) {
                found = Some((fd, t));
            }
        }
    }
    let (fd, name) = found.expect("no overlay file open in TMPDIR");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&fd).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{name}");
    assert!(
        !name.contains(&format!("-{}-", server.pid())),
        "predictable overlay name {name}"
    );
    assert_eq!(
        std::fs::read_dir(&tmp).unwrap().count(),
        0,
        "overlay left in TMPDIR"
    );
}

/// NBD_CMD_FLAG_FAST_ZERO: metadata-only zeroing of whole subclusters (extended L2) succeeds
/// without writing data; anything that would need data writes fails with ENOTSUP at once.
#[test]
fn fast_zero_is_fast_or_refused() {
    if !have(&["qemu-img", "qemu-nbd", "nbdsh"]) {
        return;
    }
    let dir = scratch_dir();
    let d = dir.path();
    let (src, _) = source_raw(d, 4 << 20);
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on,cluster_size=64k",
            "z.qcow2",
            "4M",
        ],
        d,
    );
    run(
        "qemu-img",
        &[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            "extended_l2=on,cluster_size=64k",
            src.to_str().unwrap(),
            "zc.qcow2",
        ],
        d,
    );
    // the same requests against qemu-nbd, on copies of the images
    std::fs::copy(d.join("z.qcow2"), d.join("qz.qcow2")).unwrap();
    std::fs::copy(d.join("zc.qcow2"), d.join("qzc.qcow2")).unwrap();
    let sock = d.join("S");
    let server = NbdServer::start(
        d,
        qnbd_bin(),
        &[
            "serve",
            "-t",
            "-e",
            "0",
            "--export",
            "name=z,file=z.qcow2,format=qcow2,writable=on",
            "--export",
            "name=zc,file=zc.qcow2,format=qcow2,writable=on",
        ],
        &sock,
    );
    let script = r#"
import nbd, sys
def conn(name, sock):
    h = nbd.NBD()
    h.set_export_name(name)
    h.connect_unix(sock)
    return h
def fast(h, off, n):
    try:
        h.zero(n, off, nbd.CMD_FLAG_FAST_ZERO)
        return "ok"
    except nbd.Error as e:
        return "ENOTSUP" if "(ENOTSUP)" in str(e) else "error %s" % e
h = conn("z", sys.argv[1])
h.pwrite(b"\x55" * 65536, 65536)
print("sub-aligned", fast(h, 65536 + 2048, 4096))
print("sub-aligned-hole", fast(h, 3 * 65536 + 8192, 2048))
print("unaligned", fast(h, 65536 + 100, 4096))
print("whole", fast(h, 2 * 65536, 65536))
print("data", h.pread(8192, 65536) == b"\x55" * 2048 + b"\0" * 4096 + b"\x55" * 2048)
h.flush()
hc = conn("zc", sys.argv[2])
print("compressed-sub", fast(hc, 2048, 2048))
print("compressed-whole", fast(hc, 65536, 65536))
"#;
    let client = |z: &Path, zc: &Path| {
        let o = Command::new("/usr/bin/python3")
            .arg("-c")
            .arg(script)
            .arg(z)
            .arg(zc)
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        assert!(
            o.status.success(),
            "{out}{}",
            String::from_utf8_lossy(&o.stderr)
        );
        out
    };
    let out = client(&sock, &sock);
    server.stop();
    let (qs, qsc) = (d.join("QZ"), d.join("QZC"));
    let qemu = Path::new("qemu-nbd");
    let q1 = NbdServer::start(d, qemu, &["-t", "-f", "qcow2", "-x", "z", "qz.qcow2"], &qs);
    let q2 = NbdServer::start(
        d,
        qemu,
        &["-t", "-f", "qcow2", "-x", "zc", "qzc.qcow2"],
        &qsc,
    );
    let theirs = client(&qs, &qsc);
    q1.stop();
    q2.stop();
    assert_eq!(
        out, theirs,
        "qnbd and qemu-nbd answer FAST_ZERO differently"
    );
    let want = "sub-aligned ok\nsub-aligned-hole ok\nunaligned ENOTSUP\nwhole ok\ndata True\n\
                compressed-sub ENOTSUP\ncompressed-whole ok\n";
    assert_eq!(out, want);
    // nothing was written for the fast zeroes: the zeroed subclusters are zero, not data
    let map = run(
        "qemu-img",
        &["map", "--output=json", "-f", "qcow2", "z.qcow2"],
        d,
    );
    let map: serde_json::Value = serde_json::from_slice(&map.stdout).unwrap();
    let at = |off: u64| {
        map.as_array()
            .unwrap()
            .iter()
            .find(|e| {
                let s = e["start"].as_u64().unwrap();
                s <= off && off < s + e["length"].as_u64().unwrap()
            })
            .cloned()
            .unwrap()
    };
    for off in [65536 + 2048, 3 * 65536 + 8192] {
        let e = at(off);
        assert_eq!(
            (e["zero"].as_bool(), e["data"].as_bool()),
            (Some(true), Some(false)),
            "{off:#x}: {e}"
        );
    }
    assert_clean(&d.join("z.qcow2"), "fast zero");
    assert_clean(&d.join("zc.qcow2"), "fast zero (compressed)");
}

/// Compressed writes (`convert -c` into an image with an enabled bitmap) mark the bitmap.
#[test]
fn compressed_writes_mark_enabled_bitmaps() {
    if !have(&["qemu-img", "qemu-nbd", "nbdinfo"]) {
        return;
    }
    let dir = scratch_dir();
    let d = dir.path();
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "b.qcow2", "4M"],
        d,
    );
    run("qemu-img", &["bitmap", "--add", "b.qcow2", "b0"], d);
    {
        let image = open_image(d.join("b.qcow2").to_str().unwrap(), &rw()).unwrap();
        let q = image.layers[0].qcow2.clone().unwrap();
        q.write_compressed(2 << 20, &[0x61u8; 65536], &NoBacking)
            .unwrap();
        image.chain.close().unwrap();
    }
    assert_clean(&d.join("b.qcow2"), "compressed write");
    // QEMU sees the range dirty
    let sock = d.join("S");
    let nbd = NbdServer::start(
        d,
        Path::new("qemu-nbd"),
        &["-r", "-f", "qcow2", "-B", "b0", "b.qcow2"],
        &sock,
    );
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let o = Command::new("nbdinfo")
        .args(["--map=qemu:dirty-bitmap:b0", &uri])
        .output();
    drop(nbd);
    let o = o.expect("run nbdinfo");
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.lines()
            .any(|l| l.split_whitespace().take(3).collect::<Vec<_>>() == ["2097152", "65536", "1"]),
        "bitmap does not show the compressed write:\n{text}"
    );
}
