//! The `write_ops` fuzz target: input bytes choose a qcow2 layout and a sequence of writes,
//! write-zeroes, discards, flushes and compressed writes, run on in-memory storages of which
//! one operation fails; the image left behind must open, pass the consistency check and read
//! only values the operations allow.
//!
//! Input format (bytes past the end read as 0):
//!
//! | bytes | meaning |
//! | --- | --- |
//! | 1 | cluster size: `512 << (b % 13)` (512 B to 2 MiB) |
//! | 1 | refcount width: `1 << (b % 7)` (1 to 64 bits) |
//! | 1 | flags: 1 v2, 2 extended L2, 4 data file, 8 raw data file, 16 zstd, 32 lazy refcounts, 64 dirty bitmap, 128 smallest L2 cache |
//! | 2 | guest size: `((u16 % 8192 >> (u16 >> 13)) + 1) * 512` (512 B to 4 MiB) |
//! | 1 | bitmap granularity: `512 << (b % 8)` |
//! | 1 | fault: 0 none, 1 EIO once, 2 EIO from then on, 3 ENOSPC once, 4 ENOSPC from then on (`b % 5`) |
//! | 2 | the failing storage operation: `u16 % 1024` |
//! | 1 | prefill: the first `b % 9` operations build the starting image (no fault) |
//! | ... | operations, until the input ends (at most 64 after the prefill) |
//!
//! An operation is a kind byte (`b % 8`: 0 and 7 write, 1 FUA write, 2 write-zeroes that may
//! unmap, 3 write-zeroes that keeps the allocation, 4 discard, 5 flush, 6 compressed write),
//! then, except for a flush, a 2-byte cluster index (modulo the cluster count); a compressed
//! write adds a pattern byte. The others add an offset byte (`% 4`: cluster start, a
//! 512-aligned offset from 2 more bytes, any offset from 3 more bytes, 1 to 256 bytes before
//! the cluster end from 1 more byte), a length byte (`% 4`: 1 to 4096 bytes from 2 more bytes,
//! `(b >> 2) % 4 + 1` clusters, `(b >> 2) % 64 + 1` sectors, to the end of the image) and, for
//! writes, a pattern byte. Ranges are clipped to the image; past 8 MiB of written data writes
//! shrink to 4 KiB, past six compressed writes those are plain writes.
//!
//! Checked, with a panic for any violation:
//! - the starting image (created by qnbd's own create code, then the prefill without faults)
//!   reads exactly what the prefill wrote;
//! - without a fault every operation succeeds and the image leaks nothing;
//! - after the faulty run and close, the bytes open again (read-only), the consistency check
//!   finds no corruption (leaks allowed), the corrupt bit is clear, and every guest byte reads a
//!   value the model allows: what an acknowledged operation wrote if a flush completed after it,
//!   the old value or the new one for operations after the last completed flush and for failed
//!   ones, the starting contents where nothing wrote;
//! - a dirty bitmap that reads as consistent afterwards marks every acknowledged operation's
//!   range and every byte that changed; without a fault it must be consistent.

use crate::bitmap::{DirtyBitmap, State};
use crate::block::{Access, BlockDevice, Chain, NoBacking, ZeroMode};
use crate::error::{Error, ErrorKind, Result};
use crate::io::mem::{Fault, FaultStorage, MemStorage};
use crate::io::Storage;
use crate::qcow2::bitmaps::LiveBitmap;
use crate::qcow2::check::{check, Repair};
use crate::qcow2::create::{create_qcow2, CompressionType, CreateOptions};
use crate::qcow2::spec::bitmap_dir::{DirEntry, FLAG_AUTO};
use crate::qcow2::{Qcow2, Qcow2Options};
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

/// Operations after the prefill.
const MAX_OPS: usize = 64;
const MAX_PREFILL: u8 = 8;
/// Longest single operation.
const MAX_OP_BYTES: u64 = 2 << 20;
/// Data bytes all writes of one input may carry; past it writes shrink to 4 KiB.
const WRITE_BUDGET: u64 = 8 << 20;
/// Compressed writes per input (later ones are plain writes).
const MAX_COMPRESSED: u32 = 6;
/// Bytes of created images kept for reuse.
const CACHE_BYTES: usize = 256 << 20;
const BITMAP: &str = "b0";

/// The image an input chose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub size: u64,
    pub cluster_size: u64,
    pub refcount_bits: u32,
    pub version: u32,
    pub extended_l2: bool,
    pub zstd: bool,
    pub lazy_refcounts: bool,
    pub data_file: bool,
    pub data_file_raw: bool,
    /// A persistent dirty bitmap of this granularity.
    pub bitmap: Option<u64>,
    /// Open with the smallest L2 cache (two tables).
    pub small_cache: bool,
}

/// One guest operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOp {
    Write {
        off: u64,
        len: u64,
        pat: u8,
        fua: bool,
    },
    Zero {
        off: u64,
        len: u64,
        keep: bool,
    },
    Discard {
        off: u64,
        len: u64,
    },
    Flush,
    /// `Qcow2::write_compressed` of one whole cluster.
    Compressed {
        off: u64,
        len: u64,
        pat: u8,
    },
}

impl WriteOp {
    fn range(&self) -> Option<(u64, u64)> {
        match *self {
            WriteOp::Write { off, len, .. }
            | WriteOp::Zero { off, len, .. }
            | WriteOp::Discard { off, len }
            | WriteOp::Compressed { off, len, .. } => Some((off, len)),
            WriteOp::Flush => None,
        }
    }
}

/// What one input ran (for summaries).
#[derive(Debug, Clone)]
pub struct WriteOpsReport {
    pub layout: Layout,
    pub fault: Fault,
    pub prefill: usize,
    pub ops: usize,
    /// Operations that failed (the final flush and close count as one).
    pub failed: usize,
    /// Storage operations (writes, syncs, length changes) of the faulty run.
    pub storage_ops: u64,
    /// The fault's operation index was reached.
    pub fault_hit: bool,
}

struct Bytes<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Bytes<'_> {
    fn u8(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }
    /// `n` bytes, little-endian.
    fn uint(&mut self, n: usize) -> u64 {
        (0..n).fold(0u64, |v, i| v | (u64::from(self.u8()) << (8 * i)))
    }
    fn more(&self) -> bool {
        self.pos < self.data.len()
    }
}

fn parse_layout(r: &mut Bytes) -> Layout {
    let cluster_size = 512u64 << (r.u8() % 13);
    let refcount_bits = 1u32 << (r.u8() % 7);
    let flags = r.u8();
    let s = r.uint(2);
    let size = (((s & 0x1fff) >> (s >> 13)) + 1) * 512;
    let granularity = 512u64 << (r.u8() % 8);
    let mut l = Layout {
        size,
        cluster_size,
        refcount_bits,
        version: 3,
        extended_l2: flags & 2 != 0 && cluster_size >= 16384,
        zstd: flags & 16 != 0,
        lazy_refcounts: flags & 32 != 0,
        data_file: flags & 4 != 0,
        data_file_raw: flags & 12 == 12,
        bitmap: (flags & 64 != 0).then_some(granularity),
        small_cache: flags & 128 != 0,
    };
    if flags & 1 != 0 {
        // what compat=0.10 allows
        l = Layout {
            version: 2,
            refcount_bits: 16,
            extended_l2: false,
            zstd: false,
            lazy_refcounts: false,
            data_file: false,
            data_file_raw: false,
            bitmap: None,
            ..l
        };
    }
    l
}

fn parse_fault(r: &mut Bytes) -> Fault {
    let kind = r.u8() % 5;
    let at = r.uint(2) % 1024;
    let (errno, sticky) = match kind {
        0 => return Fault::None,
        1 => (libc::EIO, false),
        2 => (libc::EIO, true),
        3 => (libc::ENOSPC, false),
        _ => (libc::ENOSPC, true),
    };
    Fault::AtOp { at, errno, sticky }
}

/// What an input may still spend: data bytes of writes, compressed writes.
struct Budget {
    bytes: u64,
    compressed: u32,
}

fn parse_op(r: &mut Bytes, l: &Layout, budget: &mut Budget) -> WriteOp {
    let kind = r.u8() % 8;
    if kind == 5 {
        return WriteOp::Flush;
    }
    let (cs, size) = (l.cluster_size, l.size);
    let cluster = r.uint(2) % size.div_ceil(cs);
    if kind == 6 {
        let off = cluster * cs;
        let len = cs.min(size - off);
        budget.bytes = budget.bytes.saturating_sub(len);
        let pat = r.u8();
        if budget.compressed == 0 {
            // compressing big clusters is slow: a few per input, then plain writes
            return WriteOp::Write {
                off,
                len,
                pat,
                fua: false,
            };
        }
        budget.compressed -= 1;
        return WriteOp::Compressed { off, len, pat };
    }
    let intra = match r.u8() % 4 {
        0 => 0,
        1 => r.uint(2) % (cs / 512) * 512,
        2 => r.uint(3) % cs,
        _ => cs - 1 - u64::from(r.u8()) % cs.min(512),
    };
    let off = (cluster * cs + intra).min(size - 1);
    let lb = r.u8();
    let len = match lb % 4 {
        0 => r.uint(2) % 4096 + 1,
        1 => (u64::from(lb >> 2) % 4 + 1) * cs,
        2 => (u64::from(lb >> 2) % 64 + 1) * 512,
        _ => size - off,
    };
    let mut len = len.min(size - off).min(MAX_OP_BYTES);
    match kind {
        2 | 3 => WriteOp::Zero {
            off,
            len,
            keep: kind == 3,
        },
        4 => WriteOp::Discard { off, len },
        _ => {
            if budget.bytes < len {
                len = len.min(4096);
            }
            budget.bytes = budget.bytes.saturating_sub(len);
            WriteOp::Write {
                off,
                len,
                pat: r.u8(),
                fua: kind == 1,
            }
        }
    }
}

/// The byte a write with pattern `pat` puts at guest offset `pos`: patterns below 0x80
/// repeat every 251 bytes (they compress), the others are noise (they do not).
#[cfg(test)]
fn value(pat: u8, pos: u64) -> u8 {
    if pat < 0x80 {
        pat ^ (pos % 251) as u8
    } else {
        (noise(pat, pos >> 3) >> ((pos & 7) * 8)) as u8
    }
}

/// Eight bytes of noise for the 8-byte word `word` of guest offsets.
fn noise(pat: u8, word: u64) -> u64 {
    let mut z = word ^ (u64::from(pat) << 56);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// `out[i] = value(pat, off + i)`, fast.
fn fill(pat: u8, off: u64, out: &mut [u8]) {
    if pat < 0x80 {
        let table: Vec<u8> = (0..251u32).map(|i| pat ^ i as u8).collect();
        let mut k = (off % 251) as usize;
        let mut i = 0;
        while i < out.len() {
            let n = (251 - k).min(out.len() - i);
            out[i..i + n].copy_from_slice(&table[k..k + n]);
            i += n;
            k = 0;
        }
    } else {
        let mut i = 0;
        while i < out.len() {
            let pos = off + i as u64;
            let w = noise(pat, pos >> 3).to_le_bytes();
            let start = (pos & 7) as usize;
            let n = (8 - start).min(out.len() - i);
            out[i..i + n].copy_from_slice(&w[start..start + n]);
            i += n;
        }
    }
}

fn pattern(pat: u8, off: u64, len: u64) -> Vec<u8> {
    let mut v = vec![0u8; len as usize];
    fill(pat, off, &mut v);
    v
}

type CacheKey = (u64, u64, u32, u32, bool, bool, bool, bool, bool);
type Files = (Vec<u8>, Option<Vec<u8>>);

/// A new image of the layout as `qnbd create` writes it (image bytes, data file bytes),
/// made in a temporary directory once per layout and kept in memory.
fn fresh_image(l: &Layout) -> Result<Files> {
    static CACHE: OnceLock<Mutex<(HashMap<CacheKey, Files>, usize)>> = OnceLock::new();
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let key: CacheKey = (
        l.size,
        l.cluster_size,
        l.refcount_bits,
        l.version,
        l.extended_l2,
        l.zstd,
        l.lazy_refcounts,
        l.data_file,
        l.data_file_raw,
    );
    let cache = CACHE.get_or_init(Mutex::default);
    if let Some(f) = cache.lock().unwrap_or_else(|e| e.into_inner()).0.get(&key) {
        return Ok(f.clone());
    }
    let shm = std::path::Path::new("/dev/shm");
    let tmp = if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    // fixed-width names: the data file's name is stored in the image
    let dir = tmp.join(format!(
        "qnbd-write-ops-{:010}-{:010}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::SeqCst)
    ));
    std::fs::create_dir_all(&dir).map_err(|e| Error::io("Could not create a directory", e))?;
    let img = dir.join("t.qcow2");
    let data = dir.join("d.raw");
    let opts = CreateOptions {
        size: l.size,
        version: l.version,
        cluster_size: l.cluster_size,
        refcount_bits: l.refcount_bits,
        lazy_refcounts: l.lazy_refcounts,
        extended_l2: l.extended_l2,
        compression_type: if l.zstd {
            CompressionType::Zstd
        } else {
            CompressionType::Zlib
        },
        data_file: l.data_file.then(|| data.to_string_lossy().into_owned()),
        data_file_raw: l.data_file_raw,
        ..CreateOptions::default()
    };
    let res = create_qcow2(&img.to_string_lossy(), &opts).and_then(|()| {
        let top = std::fs::read(&img).map_err(|e| Error::io("Could not read the image", e))?;
        let d = if l.data_file {
            Some(std::fs::read(&data).map_err(|e| Error::io("Could not read the data file", e))?)
        } else {
            None
        };
        Ok((top, d))
    });
    let _ = std::fs::remove_dir_all(&dir);
    let files = res?;
    let mut c = cache.lock().unwrap_or_else(|e| e.into_inner());
    let n = files.0.len() + files.1.as_ref().map_or(0, Vec::len);
    if c.1 + n > CACHE_BYTES {
        c.0.clear();
        c.1 = 0;
    }
    c.0.insert(key, files.clone());
    c.1 += n;
    Ok(files)
}

struct Opened {
    q: Arc<Qcow2>,
    chain: Chain,
}

/// Open the image read-write over fault-injecting storages sharing one operation counter.
fn open_rw(
    l: &Layout,
    top: &Arc<FaultStorage>,
    data: Option<&Arc<FaultStorage>>,
) -> Result<Opened> {
    let opts = Qcow2Options {
        access: Access::ReadWrite,
        l2_cache_size: l.small_cache.then_some(0),
        ..Qcow2Options::default()
    };
    let mut q = Qcow2::open(top.clone(), &opts)?;
    if let Some(d) = data {
        q.set_data_file(d.clone());
    }
    let q = Arc::new(q);
    let chain = Chain::new(vec![q.clone() as Arc<dyn BlockDevice>])?;
    Ok(Opened { q, chain })
}

#[derive(Debug, Clone, Copy)]
struct Outcome {
    op: WriteOp,
    ok: bool,
}

/// Run `ops`, then a final flush and close (recorded as one last flush). A FUA write that
/// succeeded is recorded as the write followed by a completed flush.
fn run_ops(o: &Opened, ops: &[WriteOp]) -> Vec<Outcome> {
    let mut out = Vec::with_capacity(ops.len() + 1);
    for &op in ops {
        let ok = match op {
            WriteOp::Write { off, len, pat, fua } => {
                o.chain.write(off, &pattern(pat, off, len), fua).is_ok()
            }
            WriteOp::Zero { off, len, keep } => {
                let mode = if keep {
                    ZeroMode::KeepAllocated
                } else {
                    ZeroMode::MayUnmap
                };
                o.chain.write_zeroes(off, len, mode, false).is_ok()
            }
            WriteOp::Discard { off, len } => o.chain.discard(off, len, false).is_ok(),
            WriteOp::Flush => o.chain.flush().is_ok(),
            WriteOp::Compressed { off, len, pat } => {
                o.q.write_compressed(off, &pattern(pat, off, len), &NoBacking)
                    .is_ok()
            }
        };
        out.push(Outcome { op, ok });
        if ok && matches!(op, WriteOp::Write { fua: true, .. }) {
            out.push(Outcome {
                op: WriteOp::Flush,
                ok: true,
            });
        }
    }
    let ok = o.chain.flush().is_ok() & o.chain.close().is_ok();
    out.push(Outcome {
        op: WriteOp::Flush,
        ok,
    });
    out
}

/// What a byte may read as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Val {
    /// Its contents before the operations.
    Original,
    Zero,
    Data(u8),
}

/// The whole clusters a discard covers (it leaves partial ones alone; the image's partial
/// last cluster counts as whole when the range reaches the end).
fn discard_span(l: &Layout, off: u64, len: u64) -> (u64, u64) {
    let cs = l.cluster_size;
    let first = (off.div_ceil(cs) * cs).min(l.size);
    let end = if off + len == l.size {
        l.size
    } else {
        (off + len) / cs * cs
    };
    (first, end.max(first))
}

/// Check every guest byte of `got` against what the outcomes allow, starting from
/// `original`. Describes the first byte that breaks the model.
fn check_model(
    l: &Layout,
    outcomes: &[Outcome],
    original: &[u8],
    got: &[u8],
) -> std::result::Result<(), String> {
    if got.len() as u64 != l.size {
        return Err(format!("guest size {} != {}", got.len(), l.size));
    }
    let last_flush = outcomes
        .iter()
        .rposition(|o| o.op == WriteOp::Flush && o.ok);
    let mut edges = vec![0u64, l.size];
    for o in outcomes {
        if let Some((off, len)) = o.op.range() {
            edges.extend([off, off + len]);
            if let WriteOp::Discard { .. } = o.op {
                let (a, b) = discard_span(l, off, len);
                edges.extend([a, b]);
            }
        }
    }
    edges.sort_unstable();
    edges.dedup();
    let mut allowed = Vec::new();
    for seg in edges.windows(2) {
        let (s, e) = (seg[0], seg[1]);
        allowed.clear();
        allowed.push(Val::Original);
        for (i, o) in outcomes.iter().enumerate() {
            let v = match o.op {
                WriteOp::Write { pat, .. } | WriteOp::Compressed { pat, .. } => Val::Data(pat),
                WriteOp::Zero { .. } => Val::Zero,
                WriteOp::Discard { off, len } => {
                    // advisory: the old contents may stay
                    let (a, b) = discard_span(l, off, len);
                    if s >= a && e <= b && !allowed.contains(&Val::Zero) {
                        allowed.push(Val::Zero);
                    }
                    continue;
                }
                WriteOp::Flush => continue,
            };
            let Some((off, len)) = o.op.range() else {
                continue;
            };
            if s < off || e > off + len {
                continue;
            }
            if o.ok && last_flush.is_some_and(|f| i < f) {
                allowed.clear();
                allowed.push(v);
            } else if !allowed.contains(&v) {
                allowed.push(v);
            }
        }
        // one value for the whole segment (the usual case), else byte by byte
        let (su, eu) = (s as usize, e as usize);
        let seg = &got[su..eu];
        let mut candidates = Vec::with_capacity(allowed.len());
        for v in &allowed {
            let c: Cow<[u8]> = match *v {
                Val::Original => Cow::Borrowed(&original[su..eu]),
                Val::Zero => Cow::Owned(vec![0; eu - su]),
                Val::Data(p) => Cow::Owned(pattern(p, s, e - s)),
            };
            if *c == *seg {
                candidates.clear();
                break;
            }
            candidates.push(c);
        }
        if candidates.is_empty() {
            continue;
        }
        if let Some(i) = (0..seg.len()).find(|&i| candidates.iter().all(|c| c[i] != seg[i])) {
            let pos = s + i as u64;
            return Err(format!(
                "guest byte {pos:#x} reads {:#04x}; allowed {allowed:?} (original {:#04x})",
                seg[i], original[pos as usize]
            ));
        }
    }
    Ok(())
}

/// An image opened read-only on memory, with its storages (to take the bytes back).
struct Reopened {
    q: Arc<Qcow2>,
    top: Arc<MemStorage>,
    data: Option<Arc<MemStorage>>,
}

impl Reopened {
    fn into_bytes(self) -> Files {
        drop(self.q);
        (take_mem(self.top), self.data.map(take_mem))
    }
}

fn take_mem(st: Arc<MemStorage>) -> Vec<u8> {
    Arc::try_unwrap(st)
        .map(MemStorage::into_inner)
        .unwrap_or_else(|st| {
            let mut v = vec![0u8; st.len().unwrap_or(0) as usize];
            let _ = st.read_at(&mut v, 0);
            v
        })
}

fn take_fault(st: Arc<FaultStorage>) -> Vec<u8> {
    Arc::try_unwrap(st)
        .map(FaultStorage::into_inner)
        .unwrap_or_else(|st| st.snapshot())
}

/// Open the bytes a run left read-only, as `qnbd` would open them.
fn reopen(l: &Layout, top: Vec<u8>, data: Option<Vec<u8>>) -> Result<Reopened> {
    let top = Arc::new(MemStorage::new(top));
    let mut q = Qcow2::open(
        top.clone(),
        &Qcow2Options {
            l2_cache_size: l.small_cache.then_some(0),
            ..Qcow2Options::default()
        },
    )?;
    let data = data.map(|d| Arc::new(MemStorage::new(d)));
    if let Some(d) = &data {
        q.set_data_file(d.clone());
    }
    Ok(Reopened {
        q: Arc::new(q),
        top,
        data,
    })
}

/// Read the whole guest.
fn read_all(q: &Arc<Qcow2>) -> Result<Vec<u8>> {
    let chain = Chain::new(vec![q.clone() as Arc<dyn BlockDevice>])?;
    let mut buf = vec![0u8; chain.size() as usize];
    chain.read(0, &mut buf)?;
    Ok(buf)
}

/// The consistency check `qnbd check` runs: no corruption, no failure; with `no_leaks`, no
/// leaked clusters either.
fn assert_consistent(q: &Qcow2, no_leaks: bool, what: &dyn Fn() -> String) {
    let c = check(q, Repair::None);
    let r = &c.result;
    assert!(
        c.failure.is_none() && r.corruptions == 0 && r.check_errors == 0,
        "{}: the check finds {} corruptions, {} errors{}: {:?}",
        what(),
        r.corruptions,
        r.check_errors,
        c.failure
            .as_deref()
            .map(|f| format!(" and fails ({f})"))
            .unwrap_or_default(),
        c.messages
    );
    assert!(
        !no_leaks || r.leaks == 0,
        "{}: {} leaked clusters after a run without errors: {:?}",
        what(),
        r.leaks,
        c.messages
    );
    assert!(
        !q.header().is_corrupt(),
        "{}: the corrupt bit is set",
        what()
    );
}

/// A consistent bitmap marks every range in `marked` and every byte where `got` differs
/// from `original`.
fn check_bitmap(
    q: &Qcow2,
    marked: &[(u64, u64)],
    original: &[u8],
    got: &[u8],
    must_be_consistent: bool,
) -> std::result::Result<(), String> {
    let info = q
        .bitmap_infos()
        .into_iter()
        .find(|b| b.name == BITMAP)
        .ok_or("the bitmap is gone")?;
    if info.in_use || info.state == State::Inconsistent {
        return if must_be_consistent {
            Err("the bitmap is inconsistent after a run without errors".into())
        } else {
            Ok(())
        };
    }
    let bm = q
        .bitmap(BITMAP)
        .map_err(|e| format!("load the bitmap: {e}"))?;
    let bm = bm.read().unwrap_or_else(|e| e.into_inner());
    let g = bm.granularity();
    for &(off, len) in marked {
        if let Some(bit) = (off / g..=(off + len - 1) / g).find(|&b| !bm.is_set(b)) {
            return Err(format!(
                "the bitmap misses {:#x}+{g:#x} of an acknowledged {off:#x}+{len:#x}",
                bit * g
            ));
        }
    }
    for (bit, (a, b)) in original
        .chunks(g as usize)
        .zip(got.chunks(g as usize))
        .enumerate()
    {
        if a != b && !bm.is_set(bit as u64) {
            return Err(format!(
                "the bitmap misses changed bytes at {:#x}",
                bit as u64 * g
            ));
        }
    }
    Ok(())
}

/// Add the dirty bitmap to a writable image (stored at once).
fn add_bitmap(q: &Qcow2, size: u64, granularity: u64) -> Result<()> {
    q.set_bitmaps(vec![LiveBitmap {
        entry: DirEntry {
            table_offset: 0,
            table_size: 0,
            flags: FLAG_AUTO,
            kind: 1,
            granularity_bits: granularity.trailing_zeros() as u8,
            name: BITMAP.into(),
            extra_data: Vec::new(),
        },
        state: State::Enabled,
        data: Some(Arc::new(RwLock::new(DirtyBitmap::new(size, granularity)))),
    }])
}

/// Parse `data` (see the module doc), run it and check the result; panics on any violation.
/// Errors only when the layout cannot be created.
pub fn write_ops(data: &[u8]) -> Result<WriteOpsReport> {
    let mut r = Bytes { data, pos: 0 };
    let l = parse_layout(&mut r);
    let fault = parse_fault(&mut r);
    let nprefill = usize::from(r.u8() % (MAX_PREFILL + 1));
    let mut budget = Budget {
        bytes: WRITE_BUDGET,
        compressed: MAX_COMPRESSED,
    };
    let (mut prefill, mut ops) = (Vec::new(), Vec::new());
    while r.more() && ops.len() < MAX_OPS {
        let op = parse_op(&mut r, &l, &mut budget);
        if prefill.len() < nprefill {
            prefill.push(op);
        } else {
            ops.push(op);
        }
    }
    let (top0, data0) = fresh_image(&l)?;
    if top0.is_empty() {
        return Err(Error::new(ErrorKind::InvalidArgument, "empty image"));
    }

    // the starting image: the prefill without faults
    let what0 = || format!("{l:?}, prefill {prefill:?}");
    let counter = Arc::new(AtomicU64::new(0));
    let top = Arc::new(FaultStorage::with_counter(
        top0,
        Fault::None,
        counter.clone(),
    ));
    let dat = data0.map(|d| Arc::new(FaultStorage::with_counter(d, Fault::None, counter)));
    let o = open_rw(&l, &top, dat.as_ref())
        .unwrap_or_else(|e| panic!("{}: open the new image: {e}", what0()));
    if let Some(g) = l.bitmap {
        add_bitmap(&o.q, l.size, g).unwrap_or_else(|e| panic!("{}: add a bitmap: {e}", what0()));
    }
    let pre = run_ops(&o, &prefill);
    drop(o);
    assert!(
        pre.iter().all(|o| o.ok),
        "{}: an operation failed without a fault: {pre:?}",
        what0()
    );
    let r = reopen(&l, take_fault(top), dat.map(take_fault))
        .unwrap_or_else(|e| panic!("{}: reopen the starting image: {e}", what0()));
    let q = &r.q;
    assert_consistent(q, true, &what0);
    let original = read_all(q).unwrap_or_else(|e| panic!("{}: read: {e}", what0()));
    let zeros = vec![0u8; l.size as usize];
    check_model(&l, &pre, &zeros, &original)
        .unwrap_or_else(|e| panic!("{}: the starting image: {e}", what0()));
    let mut marked: Vec<(u64, u64)> = pre.iter().filter_map(|o| o.op.range()).collect();
    if l.bitmap.is_some() {
        check_bitmap(q, &marked, &zeros, &original, true)
            .unwrap_or_else(|e| panic!("{}: the starting image: {e}", what0()));
    }
    let (base_top, base_data) = r.into_bytes();

    // the run with the fault
    let counter = Arc::new(AtomicU64::new(0));
    let top = Arc::new(FaultStorage::with_counter(base_top, fault, counter.clone()));
    let dat = base_data.map(|d| Arc::new(FaultStorage::with_counter(d, fault, counter)));
    let outcomes = match open_rw(&l, &top, dat.as_ref()) {
        Ok(o) => run_ops(&o, &ops),
        Err(e) if fault == Fault::None => panic!("{}: reopen read-write: {e}", what0()),
        // nothing was acknowledged
        Err(_) => Vec::new(),
    };
    let storage_ops = top.ops();
    let what = || format!("{l:?}, {fault:?} of {storage_ops} operations, outcomes {outcomes:?}");
    let clean = fault == Fault::None;
    if clean {
        assert!(
            outcomes.iter().all(|o| o.ok),
            "{}: an operation failed without a fault",
            what()
        );
    }
    let r = reopen(&l, take_fault(top), dat.map(take_fault))
        .unwrap_or_else(|e| panic!("{}: the image does not open again: {e}", what()));
    let q = &r.q;
    assert_consistent(q, clean, &what);
    let got = read_all(q).unwrap_or_else(|e| panic!("{}: read: {e}", what()));
    check_model(&l, &outcomes, &original, &got).unwrap_or_else(|e| panic!("{}: {e}", what()));
    if l.bitmap.is_some() {
        marked.extend(
            outcomes
                .iter()
                .filter(|o| o.ok)
                .filter_map(|o| o.op.range()),
        );
        check_bitmap(q, &marked, &original, &got, clean)
            .unwrap_or_else(|e| panic!("{}: {e}", what()));
    }
    let fault_hit = matches!(fault, Fault::AtOp { at, .. } if at < storage_ops);
    Ok(WriteOpsReport {
        layout: l,
        fault,
        prefill: prefill.len(),
        ops: ops.len(),
        failed: outcomes.iter().filter(|o| !o.ok).count(),
        storage_ops,
        fault_hit,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_matches_value() {
        for pat in [0u8, 0x41, 0x7f, 0x80, 0xc3, 0xff] {
            for off in [0u64, 1, 7, 250, 251, 4093] {
                let v = pattern(pat, off, 700);
                assert!(v
                    .iter()
                    .enumerate()
                    .all(|(i, &b)| b == value(pat, off + i as u64)));
            }
        }
    }
}
