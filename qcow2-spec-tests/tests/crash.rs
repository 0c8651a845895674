//! Crash consistency at the `Storage` seam: a workload runs on a `CrashStorage`; at every sync
//! the test builds the images a crash could leave (nothing of the unsynced writes, all of them,
//! random subsets in any order, a torn write) and checks each with qemu-img: no corruption
//! (leaks allowed), and every write acknowledged before the last completed flush is intact.
//! Fault injection (`FaultStorage`): EIO, ENOSPC and sticky flush failures give errors, never a
//! panic, and leave an image qemu-img accepts.

use qnbd::block::{Chain, ZeroMode};
use qnbd::io::mem::{CrashStorage, Fault, FaultStorage, MemStorage};
use qnbd::io::Storage;
use qnbd::open::{open_storage_image, Format};
use qnbd::qcow2::Qcow2Options;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

/// The oracle tool, or a printed skip (a failure under `CI=true`).
fn have(tool: &str) -> bool {
    qcow2_spec_tests::require_tools(tool, &[tool])
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// A new image with `opts`. Two recipes made by QEMU rather than created empty:
/// `compressed:OPTS` (1.5 MiB of data packed by `qemu-img convert -c`) and `snapshot:OPTS`
/// (data written by qemu-io, then an internal snapshot sharing every cluster and L2 table).
fn fresh_image(dir: &Path, opts: &str, size: u64) -> Vec<u8> {
    let p = dir.join("fresh.qcow2");
    let _ = std::fs::remove_file(&p);
    let sh = |prog: &str, args: &[&str]| {
        let o = Command::new(prog)
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{prog} {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    let size_s = size.to_string();
    if let Some(o) = opts.strip_prefix("compressed:") {
        sh(
            "qemu-img",
            &["create", "-q", "-f", "raw", "src.raw", &size_s],
        );
        sh(
            "qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                "write -P 0x71 0 1M",
                "-c",
                "write -P 0x72 1M 512k",
                "src.raw",
            ],
        );
        sh(
            "qemu-img",
            &[
                "convert",
                "-c",
                "-O",
                "qcow2",
                "-o",
                o,
                "src.raw",
                "fresh.qcow2",
            ],
        );
    } else if let Some(o) = opts.strip_prefix("snapshot:") {
        sh(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                o,
                "fresh.qcow2",
                &size_s,
            ],
        );
        sh("qemu-io", &["-c", "write -P 0x73 0 1536k", "fresh.qcow2"]);
        sh("qemu-img", &["snapshot", "-c", "s1", "fresh.qcow2"]);
    } else {
        sh(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                opts,
                "fresh.qcow2",
                &size_s,
            ],
        );
    }
    std::fs::read(&p).unwrap()
}

/// Guest contents of an image before the workload (zeros for an empty one).
fn initial_content(dir: &Path, image: &[u8], size: u64) -> Vec<u8> {
    let p = dir.join("initial.qcow2");
    std::fs::write(&p, image).unwrap();
    let mut v = guest_content(&p, &dir.join("initial.raw")).expect("read the initial image");
    v.resize(size as usize, 0);
    v
}

/// Shared between the workload and the crash checker.
#[derive(Default)]
struct Progress {
    /// Guest content as of the last completed flush.
    flushed: Vec<u8>,
    /// Guest bytes written since that flush (may or may not have survived).
    dirty: Vec<bool>,
    checked: usize,
    failures: Vec<String>,
}

fn qemu_check(img: &Path) -> (i32, String) {
    let o = Command::new("qemu-img")
        .args(["check", "--output=json", "-f", "qcow2"])
        .arg(img)
        .output()
        .unwrap();
    (
        o.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

fn guest_content(img: &Path, out: &Path) -> Option<Vec<u8>> {
    let o = Command::new("qemu-img")
        .args(["convert", "-f", "qcow2", "-O", "raw"])
        .arg(img)
        .arg(out)
        .output()
        .ok()?;
    if !o.status.success() {
        return None;
    }
    std::fs::read(out).ok()
}

fn check_crash_image(bytes: &[u8], what: &str, dir: &Path, p: &Mutex<Progress>) {
    let img: PathBuf = dir.join("crash.qcow2");
    std::fs::write(&img, bytes).unwrap();
    let (rc, out) = qemu_check(&img);
    let mut g = p.lock().unwrap();
    g.checked += 1;
    if rc != 0 && rc != 3 {
        g.failures
            .push(format!("{what}: qemu-img check rc {rc}: {out}"));
        return;
    }
    let Some(content) = guest_content(&img, &dir.join("crash.raw")) else {
        g.failures.push(format!("{what}: qemu-img convert failed"));
        return;
    };
    for (i, (&want, &dirty)) in g.flushed.iter().zip(g.dirty.iter()).enumerate() {
        if !dirty && content.get(i).copied().unwrap_or(0) != want {
            g.failures.push(format!(
                "{what}: flushed byte at {i:#x} lost (want {want:#x}, got {:#x})",
                content.get(i).copied().unwrap_or(0)
            ));
            return;
        }
    }
}

fn crash_workload(opts: &str, seed: u64) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let dpath = dir.path().to_path_buf();
    let size: u64 = 2 << 20;
    let image = fresh_image(&dpath, opts, size);
    let initial = initial_content(&dpath, &image, size);
    let progress = Arc::new(Mutex::new(Progress {
        flushed: initial.clone(),
        dirty: vec![false; size as usize],
        ..Progress::default()
    }));
    let p2 = progress.clone();
    let d2 = dpath.clone();
    let rng_cell = Mutex::new(Rng(seed | 1));
    let storage = Arc::new(CrashStorage::new(image, move |durable, pending| {
        // crash before any of the pending writes reached the disk
        check_crash_image(durable, "nothing-of-pending", &d2, &p2);
        // all of them
        let mut all = durable.to_vec();
        CrashStorage::apply(&mut all, pending);
        check_crash_image(&all, "all-pending", &d2, &p2);
        if pending.len() > 1 {
            let mut rng = rng_cell.lock().unwrap();
            for k in 0..3 {
                // a random subset, in a random order
                let mut img = durable.to_vec();
                let mut sub: Vec<(u64, Vec<u8>)> = pending
                    .iter()
                    .filter(|_| rng.below(2) == 0)
                    .cloned()
                    .collect();
                if k == 2 {
                    sub.reverse();
                }
                CrashStorage::apply(&mut img, &sub);
                check_crash_image(&img, "subset-of-pending", &d2, &p2);
            }
            // a torn write: half the sectors of one write
            let (off, data) = &pending[rng.below(pending.len() as u64) as usize];
            let mut img = durable.to_vec();
            let half: Vec<(u64, Vec<u8>)> = data
                .chunks(512)
                .enumerate()
                .filter(|(i, _)| i % 2 == 0)
                .map(|(i, c)| (off + (i * 512) as u64, c.to_vec()))
                .collect();
            CrashStorage::apply(&mut img, &half);
            check_crash_image(&img, "torn-write", &d2, &p2);
        }
    }));
    let opts_q = Qcow2Options {
        access: qnbd::block::Access::ReadWrite,
        ..Qcow2Options::default()
    };
    let dev = open_storage_image(storage.clone(), Some(Format::Qcow2), &opts_q).unwrap();
    let chain = Chain::new(vec![dev]).unwrap();
    let mut rng = Rng(seed.wrapping_mul(7919) | 1);
    let mut shadow = initial;
    for step in 0..40 {
        let off = rng.below(size);
        let len = (1 + rng.below(200_000)).min(size - off);
        let r = off as usize..(off + len) as usize;
        match rng.below(10) {
            0..=5 => {
                let pat = (step % 250) as u8 + 1;
                chain.write(off, &vec![pat; len as usize], false).unwrap();
                shadow[r.clone()].fill(pat);
            }
            6..=7 => {
                chain
                    .write_zeroes(off, len, ZeroMode::MayUnmap, false)
                    .unwrap();
                shadow[r.clone()].fill(0);
            }
            _ => {
                chain.discard(off, len, false).unwrap();
                // discard is advisory: the range is unknown until the next flush
            }
        }
        {
            let mut g = progress.lock().unwrap();
            for d in &mut g.dirty[r] {
                *d = true;
            }
        }
        if rng.below(3) == 0 {
            chain.flush().unwrap();
            // after a completed flush the shadow is durable (discarded ranges read as zeros in
            // v3 images, which is what the shadow of a discard must then be)
            let mut g = progress.lock().unwrap();
            let mut cur = vec![0u8; size as usize];
            chain.read(0, &mut cur).unwrap();
            for (i, d) in g.dirty.iter().enumerate() {
                if !*d {
                    assert_eq!(cur[i], g.flushed[i], "read-back differs at {i:#x}");
                }
            }
            g.flushed = cur.clone();
            shadow = cur;
            g.dirty.iter_mut().for_each(|d| *d = false);
        }
    }
    drop(chain);
    let g = progress.lock().unwrap();
    assert!(
        g.checked > 10,
        "too few crash points checked: {}",
        g.checked
    );
    g.failures.clone()
}

#[test]
fn crash_at_every_sync_point_leaves_a_consistent_image() {
    if !have("qemu-img") {
        return;
    }
    let mut failures = Vec::new();
    for (opts, seed) in [
        ("cluster_size=64k", 1),
        ("cluster_size=4k,refcount_bits=64", 2),
        ("cluster_size=512,refcount_bits=16", 3),
        ("extended_l2=on,cluster_size=32k", 4),
        ("compat=0.10,cluster_size=16k", 5),
        ("compressed:cluster_size=16k", 6),
        (
            "compressed:compression_type=zstd,extended_l2=on,cluster_size=32k",
            7,
        ),
        ("snapshot:cluster_size=8k", 8),
    ] {
        for f in crash_workload(opts, seed) {
            failures.push(format!("[{opts}] {f}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} crash states failed:\n{}",
        failures.len(),
        failures[..failures.len().min(10)].join("\n")
    );
}

fn fault_run(fault: Fault) -> (Vec<u8>, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let image = fresh_image(dir.path(), "cluster_size=4k", 1 << 20);
    let st = Arc::new(FaultStorage::new(image, fault));
    let opts_q = Qcow2Options {
        access: qnbd::block::Access::ReadWrite,
        ..Qcow2Options::default()
    };
    let mut errors = Vec::new();
    {
        let dev = open_storage_image(st.clone(), Some(Format::Qcow2), &opts_q).unwrap();
        let chain = Chain::new(vec![dev]).unwrap();
        for i in 0..64u64 {
            if let Err(e) = chain.write(i * 12288 % (1 << 20), &[i as u8 + 1; 5000], false) {
                errors.push(e.to_string());
            }
            if i % 8 == 7 {
                if let Err(e) = chain.flush() {
                    errors.push(e.to_string());
                }
            }
        }
    }
    let st = Arc::try_unwrap(st).expect("storage still shared");
    (st.into_inner(), errors)
}

#[test]
fn injected_faults_are_errors_and_the_image_stays_valid() {
    if !have("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for fault in [
        Fault::WriteEio { after: 40 },
        Fault::Enospc { limit: 200_000 },
        Fault::SyncEio { after: 3 },
    ] {
        let (bytes, errors) = fault_run(fault);
        assert!(!errors.is_empty(), "{fault:?}: no error reported");
        let p = dir.path().join("fault.qcow2");
        std::fs::write(&p, &bytes).unwrap();
        let (rc, out) = qemu_check(&p);
        // what reached the file may leak clusters, never corrupt
        assert!(
            rc == 0 || rc == 3,
            "{fault:?}: qemu-img check rc {rc}: {out}\nerrors: {errors:?}"
        );
    }
    // reads failing: an error, not a panic
    let image = fresh_image(dir.path(), "cluster_size=4k", 1 << 20);
    let st = Arc::new(FaultStorage::new(image, Fault::ReadEio));
    assert!(open_storage_image(st, Some(Format::Qcow2), &Qcow2Options::default()).is_err());
    let _ = MemStorage::default().len();
}

#[test]
fn dirty_lazy_refcount_image_is_repaired_on_read_write_open() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("dirty.qcow2");
    let o = Command::new("qemu-img")
        .args([
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "lazy_refcounts=on,cluster_size=4k",
        ])
        .arg(&img)
        .arg("4M")
        .output()
        .unwrap();
    assert!(o.status.success());
    // a writer killed with unwritten lazy refcounts
    let _ = Command::new("qemu-io")
        .args([
            "-c",
            "write -P 1 0 1M",
            "-c",
            "flush",
            "-c",
            "write -P 2 1M 512k",
            "-c",
            "sigraise 9",
        ])
        .arg(&img)
        .output()
        .unwrap();
    let (rc, out) = qemu_check(&img);
    assert_eq!(rc, 2, "the crash should have left stale refcounts: {out}");
    {
        let opts = qnbd::open::OpenOptions {
            writable: true,
            ..Default::default()
        };
        let image = qnbd::open::open_image(img.to_str().unwrap(), &opts).expect("open rw");
        let h = image.layers[0].qcow2.as_ref().unwrap().header().clone();
        assert!(
            !h.is_dirty(),
            "dirty bit still set after the read-write open"
        );
        image.chain.write(2 << 20, &[3u8; 8192], false).unwrap();
    }
    let (rc, out) = qemu_check(&img);
    assert_eq!(rc, 0, "{out}");
    let content = guest_content(&img, &dir.path().join("out.raw")).unwrap();
    assert!(content[..1 << 20].iter().all(|&b| b == 1));
    assert!(content[2 << 20..(2 << 20) + 8192].iter().all(|&b| b == 3));
}

/// A flush that failed once keeps failing (the data written before it may be gone), also when
/// the storage's next fsync would succeed.
#[test]
fn a_failed_flush_is_sticky() {
    if !have("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = fresh_image(dir.path(), "cluster_size=4k", 1 << 20);
    let inner = Arc::new(FaultStorage::new(image, Fault::SyncEioOnce { at: 1 }));
    let st: Arc<dyn Storage> = Arc::new(qnbd::io::StickySync::new(inner));
    let opts_q = Qcow2Options {
        access: qnbd::block::Access::ReadWrite,
        ..Qcow2Options::default()
    };
    let dev = open_storage_image(st, Some(Format::Qcow2), &opts_q).unwrap();
    let chain = Chain::new(vec![dev]).unwrap();
    let mut failed = false;
    for i in 0..8u64 {
        chain.write(i * 8192, &[1u8; 8192], false).unwrap_or(());
        match chain.flush() {
            Err(_) => failed = true,
            Ok(()) => assert!(!failed, "flush {i} succeeded after an earlier flush failed"),
        }
    }
    assert!(failed, "the injected fsync error never surfaced");
}
