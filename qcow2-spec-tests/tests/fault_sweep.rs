//! The fault sweep: for every layout that matters, a fixed workload of writes, write-zeroes,
//! discards and flushes runs once per storage operation index, with that operation failing
//! (EIO or ENOSPC, once or from then on). Operations are every write, sync and length change
//! of the image and of its data file, numbered together; not one random point, all of them.
//!
//! After each run the image is closed, and then:
//! - `qemu-img check` finds no corruption (leaked clusters are allowed) and the corrupt bit is
//!   not set (an I/O error is not corruption);
//! - qnbd opens it again, and every byte reads as a value the model allows: what the
//!   acknowledged operations wrote if they came before the last completed flush, the old value
//!   or the new one for anything after it or anything that failed, the original contents
//!   where nothing wrote;
//! - for a sample of the points, qemu-img reads the same contents as qnbd.
//!
//! `QNBD_SWEEP_STRIDE=N` visits every N-th operation index only (default 1: all of them);
//! `QNBD_SWEEP_LAYOUTS=a,b` runs only the named layouts.

use qcow2_spec_tests::{require_tools, scratch_dir};
use qnbd::block::{Access, BlockDevice, Chain, ZeroMode};
use qnbd::io::mem::{Fault, FaultStorage, MemStorage};
use qnbd::io::Storage;
use qnbd::open::{open_storage_image, Format};
use qnbd::qcow2::{Qcow2, Qcow2Options};
use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

const EIO: i32 = 5;
const ENOSPC: i32 = 28;

struct Layout {
    name: &'static str,
    /// How to build it, in a scratch directory: the image is `t.qcow2`, a backing image
    /// `b.img`, a data file `d.raw`.
    build: &'static [&'static [&'static str]],
    size: u64,
    cluster: u64,
    /// The image has a backing file `b.img` of format `backing_fmt`.
    backing: Option<&'static str>,
    /// The image has an external data file `d.raw`.
    data_file: bool,
    v3: bool,
}

const SRC: &[&str] = &["qemu-img", "create", "-q", "-f", "raw", "src.raw", "2M"];
const SRC_DATA: &[&str] = &[
    "qemu-io",
    "-f",
    "raw",
    "-c",
    "write -P 0x61 0 1M",
    "-c",
    "write -P 0x62 1M 512k",
    "src.raw",
];

fn layouts() -> Vec<Layout> {
    vec![
        Layout {
            name: "plain-64k",
            build: &[&["qemu-img", "create", "-q", "-f", "qcow2", "t.qcow2", "2M"]],
            size: 2 << 20,
            cluster: 65536,
            backing: None,
            data_file: false,
            v3: true,
        },
        Layout {
            name: "512b-refcount1",
            build: &[&[
                "qemu-img",
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "cluster_size=512,refcount_bits=1",
                "t.qcow2",
                "1M",
            ]],
            size: 1 << 20,
            cluster: 512,
            backing: None,
            data_file: false,
            v3: true,
        },
        Layout {
            name: "4k-refcount64",
            build: &[&[
                "qemu-img",
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "cluster_size=4k,refcount_bits=64",
                "t.qcow2",
                "2M",
            ]],
            size: 2 << 20,
            cluster: 4096,
            backing: None,
            data_file: false,
            v3: true,
        },
        Layout {
            name: "2M-clusters",
            build: &[&[
                "qemu-img",
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "cluster_size=2M",
                "t.qcow2",
                "8M",
            ]],
            size: 8 << 20,
            cluster: 2 << 20,
            backing: None,
            data_file: false,
            v3: true,
        },
        Layout {
            name: "v2-16k",
            build: &[&[
                "qemu-img",
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "compat=0.10,cluster_size=16k",
                "t.qcow2",
                "2M",
            ]],
            size: 2 << 20,
            cluster: 16384,
            backing: None,
            data_file: false,
            v3: false,
        },
        Layout {
            name: "extended-l2-32k",
            build: &[&[
                "qemu-img",
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "extended_l2=on,cluster_size=32k",
                "t.qcow2",
                "2M",
            ]],
            size: 2 << 20,
            cluster: 32768,
            backing: None,
            data_file: false,
            v3: true,
        },
        Layout {
            name: "compressed-zlib",
            build: &[
                SRC,
                SRC_DATA,
                &[
                    "qemu-img",
                    "convert",
                    "-c",
                    "-O",
                    "qcow2",
                    "-o",
                    "cluster_size=16k",
                    "src.raw",
                    "t.qcow2",
                ],
            ],
            size: 2 << 20,
            cluster: 16384,
            backing: None,
            data_file: false,
            v3: true,
        },
        Layout {
            name: "compressed-zstd-extended-l2",
            build: &[
                SRC,
                SRC_DATA,
                &[
                    "qemu-img",
                    "convert",
                    "-c",
                    "-O",
                    "qcow2",
                    "-o",
                    "compression_type=zstd,extended_l2=on,cluster_size=32k",
                    "src.raw",
                    "t.qcow2",
                ],
            ],
            size: 2 << 20,
            cluster: 32768,
            backing: None,
            data_file: false,
            v3: true,
        },
        Layout {
            name: "snapshots",
            build: &[
                &[
                    "qemu-img",
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-o",
                    "cluster_size=16k",
                    "t.qcow2",
                    "2M",
                ],
                &["qemu-io", "-c", "write -P 0x41 0 1536k", "t.qcow2"],
                &["qemu-img", "snapshot", "-c", "s1", "t.qcow2"],
                &["qemu-io", "-c", "write -P 0x42 256k 128k", "t.qcow2"],
                &["qemu-img", "snapshot", "-c", "s2", "t.qcow2"],
            ],
            size: 2 << 20,
            cluster: 16384,
            backing: None,
            data_file: false,
            v3: true,
        },
        Layout {
            name: "backing-shorter",
            build: &[
                &["qemu-img", "create", "-q", "-f", "qcow2", "b.img", "1M"],
                &["qemu-io", "-c", "write -P 0x51 0 1M", "b.img"],
                &[
                    "qemu-img",
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-o",
                    "cluster_size=8k",
                    "-b",
                    "b.img",
                    "-F",
                    "qcow2",
                    "t.qcow2",
                    "2M",
                ],
            ],
            size: 2 << 20,
            cluster: 8192,
            backing: Some("qcow2"),
            data_file: false,
            v3: true,
        },
        Layout {
            name: "v2-raw-backing",
            build: &[
                SRC,
                SRC_DATA,
                &["cp", "src.raw", "b.img"],
                &[
                    "qemu-img",
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-o",
                    "compat=0.10",
                    "-b",
                    "b.img",
                    "-F",
                    "raw",
                    "t.qcow2",
                    "2M",
                ],
            ],
            size: 2 << 20,
            cluster: 65536,
            backing: Some("raw"),
            data_file: false,
            v3: false,
        },
        Layout {
            name: "compressed-backing",
            build: &[
                SRC,
                SRC_DATA,
                &[
                    "qemu-img", "convert", "-c", "-O", "qcow2", "src.raw", "b.img",
                ],
                &[
                    "qemu-img",
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-o",
                    "extended_l2=on",
                    "-b",
                    "b.img",
                    "-F",
                    "qcow2",
                    "t.qcow2",
                    "2M",
                ],
            ],
            size: 2 << 20,
            cluster: 65536,
            backing: Some("qcow2"),
            data_file: false,
            v3: true,
        },
        Layout {
            name: "data-file",
            build: &[&[
                "qemu-img",
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "data_file=d.raw,cluster_size=16k",
                "t.qcow2",
                "2M",
            ]],
            size: 2 << 20,
            cluster: 16384,
            backing: None,
            data_file: true,
            v3: true,
        },
        Layout {
            name: "data-file-raw",
            build: &[&[
                "qemu-img",
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "data_file=d.raw,data_file_raw=on,cluster_size=16k",
                "t.qcow2",
                "2M",
            ]],
            size: 2 << 20,
            cluster: 16384,
            backing: None,
            data_file: true,
            v3: true,
        },
        Layout {
            name: "bitmap",
            build: &[
                &[
                    "qemu-img",
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-o",
                    "cluster_size=16k",
                    "t.qcow2",
                    "2M",
                ],
                &["qemu-img", "bitmap", "--add", "t.qcow2", "b0"],
            ],
            size: 2 << 20,
            cluster: 16384,
            backing: None,
            data_file: false,
            v3: true,
        },
    ]
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Write { off: u64, len: u64, pat: u8 },
    Zero { off: u64, len: u64, keep: bool },
    Discard { off: u64, len: u64 },
    Flush,
}

/// The fixed workload, scaled to the cluster size: partial and whole clusters, a write
/// across a cluster boundary, zeroes in both modes, whole-cluster discards, flushes between.
fn workload(cs: u64, size: u64) -> Vec<Op> {
    // offsets in clusters (and bytes), clipped to the image
    let at = |clusters: u64, bytes: u64| clusters * cs + bytes;
    let raw = [
        Op::Write {
            off: 100,
            len: 3000,
            pat: 1,
        },
        Op::Write {
            off: at(2, 0) - 700,
            len: 1400,
            pat: 2,
        },
        Op::Flush,
        Op::Write {
            off: at(3, 0),
            len: cs,
            pat: 3,
        },
        Op::Zero {
            off: at(1, 512),
            len: 1024,
            keep: false,
        },
        Op::Write {
            off: 100,
            len: 200,
            pat: 4,
        },
        Op::Flush,
        Op::Zero {
            off: at(3, 0),
            len: cs,
            keep: false,
        },
        Op::Zero {
            off: at(2, 0),
            len: cs,
            keep: true,
        },
        Op::Discard {
            off: at(4, 0),
            len: 2 * cs,
        },
        Op::Write {
            off: at(6, 10),
            len: 5000,
            pat: 5,
        },
        Op::Flush,
        Op::Write {
            off: at(4, 1),
            len: 777,
            pat: 6,
        },
        Op::Write {
            off: size - 4096,
            len: 4096,
            pat: 7,
        },
    ];
    let clip = |off: u64, len: u64| -> Option<(u64, u64)> {
        (off < size).then(|| (off, len.min(size - off)))
    };
    raw.iter()
        .filter_map(|op| match *op {
            Op::Write { off, len, pat } => {
                clip(off, len).map(|(off, len)| Op::Write { off, len, pat })
            }
            Op::Zero { off, len, keep } => {
                clip(off, len).map(|(off, len)| Op::Zero { off, len, keep })
            }
            Op::Discard { off, len } => clip(off, len).map(|(off, len)| Op::Discard { off, len }),
            Op::Flush => Some(Op::Flush),
        })
        .collect()
}

/// What a byte may read as after a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Val {
    /// Its contents before the workload.
    Original,
    /// What the backing file shows there (a discard in v2 uncovers it).
    Below,
    Byte(u8),
}

struct Outcome {
    op: Op,
    ok: bool,
}

struct Built {
    dir: tempfile::TempDir,
    top: Vec<u8>,
    base: Option<Vec<u8>>,
    data: Option<Vec<u8>>,
    original: Vec<u8>,
    below: Vec<u8>,
}

/// Run a setup command (program and arguments) that must succeed.
fn sh(args: &[&str], cwd: &Path) {
    qcow2_spec_tests::tool_ok(args[0], cwd, &args[1..]);
}

fn qemu_read(img: &Path, out: &Path) -> Vec<u8> {
    let _ = std::fs::remove_file(out);
    sh(
        &[
            "qemu-img",
            "convert",
            "-U",
            "-O",
            "raw",
            img.to_str().unwrap(),
            out.to_str().unwrap(),
        ],
        img.parent().unwrap_or(Path::new("/")),
    );
    std::fs::read(out).unwrap()
}

fn build(l: &Layout) -> Built {
    let dir = scratch_dir();
    let d = dir.path();
    for step in l.build {
        sh(step, d);
    }
    let original = qemu_read(&d.join("t.qcow2"), &d.join("orig.raw"));
    let below = match l.backing {
        Some(_) => {
            let mut b = qemu_read(&d.join("b.img"), &d.join("below.raw"));
            b.resize(l.size as usize, 0);
            b
        }
        None => vec![0; l.size as usize],
    };
    Built {
        top: std::fs::read(d.join("t.qcow2")).unwrap(),
        base: l.backing.map(|_| std::fs::read(d.join("b.img")).unwrap()),
        data: l.data_file.then(|| std::fs::read(d.join("d.raw")).unwrap()),
        original,
        below,
        dir,
    }
}

/// Open the layout over fault-injecting storages sharing one operation counter.
/// The chain is `None` when the open itself failed (a read-write open writes: `in-use` bits
/// of bitmaps).
fn open(
    l: &Layout,
    b: &Built,
    fault: Fault,
) -> (Option<Chain>, Arc<FaultStorage>, Option<Arc<FaultStorage>>) {
    let ops = Arc::new(AtomicU64::new(0));
    let top = Arc::new(FaultStorage::with_counter(
        b.top.clone(),
        fault,
        ops.clone(),
    ));
    let data = b
        .data
        .as_ref()
        .map(|d| Arc::new(FaultStorage::with_counter(d.clone(), fault, ops.clone())));
    let opts = Qcow2Options {
        access: Access::ReadWrite,
        ..Qcow2Options::default()
    };
    let Ok(mut q) = Qcow2::open(top.clone(), &opts) else {
        return (None, top, data);
    };
    if let Some(d) = &data {
        q.set_data_file(d.clone());
    }
    let mut layers: Vec<Arc<dyn BlockDevice>> = vec![Arc::new(q)];
    layers.extend(backing_layer(l, b));
    (Some(Chain::new(layers).unwrap()), top, data)
}

/// The layout's backing image, read-only in memory (never faulted: it is only read).
fn backing_layer(l: &Layout, b: &Built) -> Option<Arc<dyn BlockDevice>> {
    let (fmt, base) = (l.backing?, b.base.as_ref()?);
    let f = if fmt == "raw" {
        Format::Raw
    } else {
        Format::Qcow2
    };
    let st: Arc<dyn Storage> = Arc::new(MemStorage::new(base.clone()));
    Some(open_storage_image(st, Some(f), &Qcow2Options::default()).expect("open the backing image"))
}

/// Run the workload; then a final flush and close. Returns each operation's outcome (the
/// final flush and close count as a last flush).
fn run_workload(chain: &Chain, ops: &[Op]) -> Vec<Outcome> {
    let mut out = Vec::new();
    for &op in ops {
        let ok = match op {
            Op::Write { off, len, pat } => {
                chain.write(off, &vec![pat; len as usize], false).is_ok()
            }
            Op::Zero { off, len, keep } => chain
                .write_zeroes(
                    off,
                    len,
                    if keep {
                        ZeroMode::KeepAllocated
                    } else {
                        ZeroMode::MayUnmap
                    },
                    false,
                )
                .is_ok(),
            Op::Discard { off, len } => chain.discard(off, len, false).is_ok(),
            Op::Flush => chain.flush().is_ok(),
        };
        out.push(Outcome { op, ok });
    }
    let ok = chain.flush().is_ok() & chain.close().is_ok();
    out.push(Outcome { op: Op::Flush, ok });
    out
}

/// Check every byte of `got` against what the outcomes allow. Returns a description of the
/// first byte that breaks the model.
fn check_model(l: &Layout, b: &Built, outcomes: &[Outcome], got: &[u8]) -> Result<(), String> {
    if got.len() != b.original.len() {
        return Err(format!("size {} != {}", got.len(), b.original.len()));
    }
    let last_flush = outcomes
        .iter()
        .rposition(|o| matches!(o.op, Op::Flush) && o.ok);
    // segment boundaries: every op edge
    let mut edges = vec![0u64, l.size];
    for o in outcomes {
        match o.op {
            Op::Write { off, len, .. } | Op::Zero { off, len, .. } | Op::Discard { off, len } => {
                edges.push(off);
                edges.push(off + len);
                // discards act on whole clusters only
                edges.push(off.div_ceil(l.cluster) * l.cluster);
                edges.push((off + len) / l.cluster * l.cluster);
            }
            Op::Flush => {}
        }
    }
    edges.retain(|&e| e <= l.size);
    edges.sort_unstable();
    edges.dedup();
    for seg in edges.windows(2) {
        let (s, e) = (seg[0], seg[1]);
        if s == e {
            continue;
        }
        let mut allowed = vec![Val::Original];
        for (i, o) in outcomes.iter().enumerate() {
            let (off, len, v) = match o.op {
                Op::Write { off, len, pat } => (off, len, Val::Byte(pat)),
                Op::Zero { off, len, .. } => (off, len, Val::Byte(0)),
                Op::Discard { off, len } => {
                    let first = off.div_ceil(l.cluster) * l.cluster;
                    let end = if off + len == l.size {
                        l.size
                    } else {
                        (off + len) / l.cluster * l.cluster
                    };
                    let v = if l.v3 || l.backing.is_none() {
                        Val::Byte(0)
                    } else {
                        Val::Below
                    };
                    if first >= end {
                        continue;
                    }
                    // a discard is advisory: the old contents may stay
                    if s >= first && e <= end {
                        allowed.push(v);
                    }
                    continue;
                }
                Op::Flush => continue,
            };
            if s < off || e > off + len {
                continue;
            }
            let durable = last_flush.is_some_and(|f| i < f);
            if o.ok && durable {
                allowed = vec![v];
            } else if !allowed.contains(&v) {
                allowed.push(v);
            }
        }
        for pos in s..e {
            let g = got[pos as usize];
            let fits = allowed.iter().any(|v| match v {
                Val::Original => g == b.original[pos as usize],
                Val::Below => g == b.below[pos as usize],
                Val::Byte(x) => g == *x,
            });
            if !fits {
                return Err(format!(
                    "byte {pos:#x} reads {g:#x}; allowed {allowed:?} (original {:#x})",
                    b.original[pos as usize]
                ));
            }
        }
    }
    Ok(())
}

/// Write the run's files next to each other and ask qemu-img.
fn qemu_check(b: &Built, dir: &Path, top: &[u8], data: Option<&[u8]>) -> Result<(), String> {
    std::fs::write(dir.join("t.qcow2"), top).unwrap();
    if let Some(d) = data {
        std::fs::write(dir.join("d.raw"), d).unwrap();
    }
    if let Some(base) = &b.base {
        let p = dir.join("b.img");
        if !p.exists() {
            std::fs::write(p, base).unwrap();
        }
    }
    let (rc, out) = qcow2_spec_tests::qemu_img_check(dir, Path::new("t.qcow2"));
    if rc != 0 && rc != 3 {
        return Err(format!("qemu-img check rc {rc}: {out}"));
    }
    Ok(())
}

/// Reopen the bytes a run left with qnbd (read-only) and read the whole guest.
fn qnbd_read(
    l: &Layout,
    b: &Built,
    top: &[u8],
    data: Option<&[u8]>,
) -> Result<(Vec<u8>, bool), String> {
    let st: Arc<dyn Storage> = Arc::new(MemStorage::new(top.to_vec()));
    let mut q = Qcow2::open(st, &Qcow2Options::default()).map_err(|e| format!("reopen: {e}"))?;
    let corrupt = q.header().is_corrupt();
    if let Some(d) = data {
        q.set_data_file(Arc::new(MemStorage::new(d.to_vec())));
    }
    let mut layers: Vec<Arc<dyn BlockDevice>> = vec![Arc::new(q)];
    layers.extend(backing_layer(l, b));
    let chain = Chain::new(layers).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; chain.size() as usize];
    chain.read(0, &mut buf).map_err(|e| format!("read: {e}"))?;
    Ok((buf, corrupt))
}

#[test]
fn every_storage_operation_fails_in_turn_without_corruption() {
    if !require_tools("fault sweep", &["qemu-img", "qemu-io"]) {
        return;
    }
    let stride: u64 = std::env::var("QNBD_SWEEP_STRIDE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
        .max(1);
    let only: Option<Vec<String>> = std::env::var("QNBD_SWEEP_LAYOUTS")
        .ok()
        .map(|s| s.split(',').map(str::to_string).collect());
    let faults: [(i32, bool); 4] = [(EIO, false), (EIO, true), (ENOSPC, false), (ENOSPC, true)];
    let failures = Mutex::new(Vec::<String>::new());
    let mut summary = Vec::new();
    let mut total_points = 0u64;
    for l in layouts() {
        if only
            .as_ref()
            .is_some_and(|o| !o.iter().any(|n| n == l.name))
        {
            continue;
        }
        let started = std::time::Instant::now();
        let b = build(&l);
        let ops = workload(l.cluster, l.size);
        // a clean run: the number of operations to sweep, and the model must hold
        let (chain, top, data) = open(&l, &b, Fault::None);
        let chain = chain.expect("open the top image");
        let outcomes = run_workload(&chain, &ops);
        drop(chain);
        assert!(
            outcomes.iter().all(|o| o.ok),
            "{}: clean run failed",
            l.name
        );
        let n_ops = top.ops();
        let top_bytes = top.snapshot();
        let data_bytes = data.as_ref().map(|d| d.snapshot());
        let (got, _) = qnbd_read(&l, &b, &top_bytes, data_bytes.as_deref()).unwrap();
        check_model(&l, &b, &outcomes, &got)
            .unwrap_or_else(|e| panic!("{}: clean run: {e}", l.name));
        qemu_check(&b, b.dir.path(), &top_bytes, data_bytes.as_deref())
            .unwrap_or_else(|e| panic!("{}: clean run: {e}", l.name));
        // every operation index, every fault kind; two threads (the checks are processes)
        let points: Vec<(u64, i32, bool)> = (0..n_ops)
            .step_by(stride as usize)
            .flat_map(|at| {
                faults
                    .iter()
                    .map(move |&(errno, sticky)| (at, errno, sticky))
            })
            .collect();
        total_points += points.len() as u64;
        let next = Mutex::new(0usize);
        std::thread::scope(|s| {
            for t in 0..2 {
                let (l, b, ops, points, next, failures) = (&l, &b, &ops, &points, &next, &failures);
                s.spawn(move || {
                    let wdir = b.dir.path().join(format!("w{t}"));
                    std::fs::create_dir_all(&wdir).unwrap();
                    loop {
                        let k = {
                            let mut g = next.lock().unwrap();
                            let k = *g;
                            *g += 1;
                            k
                        };
                        let Some(&(at, errno, sticky)) = points.get(k) else {
                            break;
                        };
                        let what = format!(
                            "{}: op {at}/{n_ops} fails with {} ({})",
                            l.name,
                            if errno == EIO { "EIO" } else { "ENOSPC" },
                            if sticky { "from then on" } else { "once" }
                        );
                        let (chain, top, data) = open(l, b, Fault::AtOp { at, errno, sticky });
                        let outcomes = match chain {
                            Some(chain) => run_workload(&chain, ops),
                            // the open failed: nothing was acknowledged
                            None => Vec::new(),
                        };
                        let top_bytes = top.snapshot();
                        let data_bytes = data.as_ref().map(|d| d.snapshot());
                        let r = qemu_check(b, &wdir, &top_bytes, data_bytes.as_deref())
                            .and_then(|()| qnbd_read(l, b, &top_bytes, data_bytes.as_deref()))
                            .and_then(|(got, corrupt)| {
                                if corrupt {
                                    return Err("the corrupt bit is set".into());
                                }
                                check_model(l, b, &outcomes, &got)?;
                                // QEMU reads what qnbd reads (a sample of the points)
                                if k % 7 == 0 {
                                    let q = qemu_read(&wdir.join("t.qcow2"), &wdir.join("q.raw"));
                                    if q != got {
                                        return Err(
                                            "qemu-img reads other contents than qnbd".into()
                                        );
                                    }
                                }
                                Ok(())
                            });
                        if let Err(e) = r {
                            let ok: Vec<bool> = outcomes.iter().map(|o| o.ok).collect();
                            failures
                                .lock()
                                .unwrap()
                                .push(format!("{what}: {e} (outcomes {ok:?})"));
                        }
                    }
                });
            }
        });
        summary.push(format!(
            "{} {} ops × 4 faults in {:.1} s",
            l.name,
            n_ops.div_ceil(stride),
            started.elapsed().as_secs_f64()
        ));
    }
    eprintln!(
        "fault sweep: {total_points} fault points: {}",
        summary.join(", ")
    );
    let f = failures.into_inner().unwrap();
    assert!(
        f.is_empty(),
        "{} of {total_points} fault points broke the image or lost data:\n{}",
        f.len(),
        f[..f.len().min(15)].join("\n")
    );
}
