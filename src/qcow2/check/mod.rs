//! Consistency check and repair of a qcow2 image (QEMU's `qcow2_co_check_locked`,
//! `qcow2_check_refcounts` and the functions they call).
//!
//! The check walks every structure that owns host clusters — header, refcount table and
//! blocks, active and snapshot L1/L2 tables, the snapshot table, the bitmap directory with its
//! tables and data (only while the autoclear `bitmaps` bit vouches for them) and the LUKS
//! header — and counts the references to each host cluster in an in-memory refcount array
//! of the image's own refcount width, sized by the file length (bounded, see
//! [`MAX_IMRT_BYTES`]). It then compares that array with the refcounts on disk and checks
//! OFLAG_COPIED of the active tables. Findings are counted the way QEMU counts them and
//! worded the way QEMU prints them, so `qnbd check` and `qemu-img check` agree.
//!
//! Repair (`Repair::Leaks` / `Repair::All`) writes through the image's `Storage` in a crash-safe
//! order: refcount blocks first (a refcount too high is harmless), then L2/L1 entries, then
//! the header, with a `sync()` after each group. A refcount structure that cannot be trusted
//! (refcount 0 for a used cluster, broken refcount table entries, refblocks with a wrong
//! refcount) is rebuilt from the in-memory array into free clusters, then the header is
//! pointed at the new refcount table; the old structure becomes leaked and is freed by the
//! same run. This module never reads guest data.

mod copied;
mod refcounts;
mod walk;

use super::header_write::{write_header, HeaderWrite};
use super::spec::entries::{
    ClusterType, EntryLayout, L1E_OFFSET_MASK, L1E_RESERVED_MASK, L2E_OFFSET_MASK,
    L2E_RESERVED_MASK, L2_BITMAP_ALL_ALLOC, OFLAG_COPIED, OFLAG_ZERO, REFT_OFFSET_MASK,
};
use super::spec::header::{autoclear, incompat, HeaderField};
use super::spec::table::{BitmapTable, L1Table, L2Table, RefTable};
use super::spec::{bitmap_dir, limits, refblock, snapshot};
use super::Qcow2;
use crate::io::PastEof;
use crate::io::{read_exact_or_zero, Storage};
use std::collections::{BTreeSet, HashMap};

/// Refcount table entry reserved bits (0-8).
const REFT_RESERVED_MASK: u64 = 0x1ff;
/// Extended L2 bitmap: the "reads as zero" half.
const L2_BITMAP_ALL_ZEROES: u64 = 0xffff_ffff_0000_0000;
/// Largest in-memory refcount array we build (QEMU only refuses above 2^31 clusters; a
/// 1 GiB array covers 32 TiB of 64 KiB clusters at 16-bit refcounts).
pub const MAX_IMRT_BYTES: u64 = 1 << 30;

/// What `check` may repair (qemu-img `-r`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Repair {
    /// Report only.
    #[default]
    None,
    /// `-r leaks`: drop refcounts that are too high.
    Leaks,
    /// `-r all`: also refcounts that are too low, OFLAG_COPIED, broken refcount structures.
    All,
}

impl Repair {
    fn leaks(self) -> bool {
        self != Repair::None
    }
    fn errors(self) -> bool {
        self == Repair::All
    }
}

/// QEMU's `BdrvCheckResult` with its `BlockFragInfo`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CheckResult {
    pub corruptions: u64,
    pub leaks: u64,
    pub check_errors: u64,
    pub corruptions_fixed: u64,
    pub leaks_fixed: u64,
    pub image_end_offset: u64,
    pub total_clusters: u64,
    pub allocated_clusters: u64,
    pub fragmented_clusters: u64,
    pub compressed_clusters: u64,
}

impl CheckResult {
    fn add_counts(&mut self, o: &CheckResult) {
        self.corruptions += o.corruptions;
        self.leaks += o.leaks;
        self.check_errors += o.check_errors;
        self.corruptions_fixed += o.corruptions_fixed;
        self.leaks_fixed += o.leaks_fixed;
    }
}

/// What one run of the check found (and, with a repair mode, did).
#[derive(Debug, Clone, Default)]
pub struct CheckOutcome {
    pub result: CheckResult,
    /// Diagnostics worded as QEMU's, in the order found (qemu-img prints them on stderr).
    pub messages: Vec<String>,
    /// Remarks beyond what qemu-img reports (in-use bitmaps); they never change the result.
    pub warnings: Vec<String>,
    /// The check could not complete: why (qemu-img: "Check failed: <why>").
    pub failure: Option<String>,
}

/// An internal error that ends the check, as an errno.
#[derive(Debug, Clone, Copy)]
struct Fail(i32);

fn strerror(errno: i32) -> String {
    let s = std::io::Error::from_raw_os_error(errno).to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

fn io_errno(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

/// One table QEMU's metadata overlap check knows about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ol {
    ActiveL2,
    InactiveL2,
    /// Writing a new refcount structure: the old one is being replaced, and its valid
    /// refblocks are counted as used anyway (so never reallocated); only broken entries of
    /// the old table could "overlap", and those protect nothing.
    OldRefcounts,
}

struct SnapInfo {
    id: String,
    name: String,
    l1_offset: u64,
    l1_size: u32,
}

/// Run the check (and the repair `repair` asks for) on an opened image. The image must have
/// been opened on writable storage when `repair != Repair::None`. After a repair, the caller
/// re-opens the image and checks it again without repair (as qemu-img does).
pub fn check(q: &Qcow2, repair: Repair) -> CheckOutcome {
    check_with_progress(q, repair, &mut |_, _| {})
}

/// [`check`], reporting its progress to `progress(done, total)` in units of table entries
/// walked and clusters compared. `total` is an estimate that may shrink (snapshot L1 tables
/// are counted as full until read) or grow (a repair adds passes); `done / total` only rises.
pub fn check_with_progress(
    q: &Qcow2,
    repair: Repair,
    progress: &mut dyn FnMut(u64, u64),
) -> CheckOutcome {
    let mut c = match Checker::new(q, repair) {
        Ok(c) => c,
        Err((msg, res)) => {
            return CheckOutcome {
                result: res,
                messages: vec![],
                warnings: vec![],
                failure: Some(msg),
            }
        }
    };
    c.work.cb = Some(progress);
    let failure = c.run().err().map(|Fail(e)| strerror(e));
    CheckOutcome {
        result: c.total,
        messages: c.log,
        warnings: c.warnings,
        failure,
    }
}

/// Progress of one check: units done and the estimated total.
#[derive(Default)]
struct Work<'a> {
    done: u64,
    total: u64,
    cb: Option<&'a mut dyn FnMut(u64, u64)>,
}

impl Work<'_> {
    fn add_total(&mut self, n: u64) {
        self.total = self.total.saturating_add(n);
    }

    fn sub_total(&mut self, n: u64) {
        self.total = self.total.saturating_sub(n).max(self.done);
    }

    fn step(&mut self, n: u64) {
        self.done = self.done.saturating_add(n).min(self.total);
        if let Some(cb) = self.cb.as_mut() {
            cb(self.done, self.total);
        }
    }
}

struct Checker<'a> {
    q: &'a Qcow2,
    file: &'a dyn Storage,
    repair: Repair,
    cs: u64,
    cbits: u32,
    order: u32,
    /// log2 of refcount entries per refcount block
    rb_bits: u32,
    refcount_max: u64,
    ext_l2: bool,
    data_file: bool,
    /// How entries are classified (the spec classifier).
    layout: EntryLayout,
    file_len: u64,

    /// Result of the refcount part (QEMU's `refcount_res`).
    res: CheckResult,
    /// Result of the whole check.
    total: CheckResult,
    log: Vec<String>,
    warnings: Vec<String>,
    corruption_signalled: bool,

    // structures as found on disk
    incompatible: u64,
    l1_offset: u64,
    l1: L1Table,
    reftable_offset: u64,
    reftable_clusters: u64,
    reftable: RefTable,
    refblocks: HashMap<u64, Vec<u8>>,
    dirty_refblocks: BTreeSet<u64>,
    snapshots: Vec<SnapInfo>,
    snapshots_offset: u64,
    snapshots_size: u64,
    bitmap_dir: Option<(u64, u64)>,

    // in-memory refcount table (one big refblock of the image's refcount width)
    imrt: Vec<u8>,
    nb_clusters: u64,

    /// Progress (`-p`).
    work: Work<'a>,
}

impl<'a> Checker<'a> {
    fn new(q: &'a Qcow2, repair: Repair) -> Result<Self, (String, CheckResult)> {
        let h = q.header();
        let file: &dyn Storage = &**q.file();
        let fail = |msg: String| {
            (
                msg,
                CheckResult {
                    check_errors: 1,
                    ..CheckResult::default()
                },
            )
        };
        let file_len = file
            .len()
            .map_err(|e| fail(format!("Could not get the image length: {e}")))?;
        let cs = h.cluster_size();
        let cbits = h.cluster_bits;
        let order = h.refcount_order;
        let l1 = L1Table::load(
            file,
            h.l1_table_offset,
            u64::from(h.l1_size),
            PastEof::Zeros,
        )
        .map_err(|e| fail(format!("Could not read the L1 table: {e}")))?;
        let reftable_clusters = u64::from(h.refcount_table_clusters);
        let reftable = RefTable::load(
            file,
            h.refcount_table_offset,
            reftable_clusters * cs / 8,
            PastEof::Zeros,
        )
        .map_err(|e| fail(format!("Could not read the refcount table: {e}")))?;
        // The snapshot table's size is the sum of its (8-aligned) entries.
        let mut snapshots_size = 0u64;
        let mut off = h.snapshots_offset;
        for i in 0..h.nb_snapshots as usize {
            let mut head = [0u8; snapshot::ENTRY_HEADER_LEN];
            read_exact_or_zero(file, &mut head, off)
                .map_err(|e| fail(format!("Could not read the snapshot table: {e}")))?;
            let len = snapshot::entry_len(&head, i).map_err(|e| fail(e.to_string()))? as u64;
            // QEMU's snapshots_size ends right after the last entry's name (no padding)
            let rec: &snapshot::RawSnapshotHeader = zerocopy::transmute_ref!(&head);
            let raw = snapshot::ENTRY_HEADER_LEN as u64
                + u64::from(rec.id_str_size.get())
                + u64::from(rec.name_size.get())
                + u64::from(rec.extra_data_size.get());
            snapshots_size = off - h.snapshots_offset + raw;
            off += len;
        }
        let snapshots = q
            .snapshots()
            .iter()
            .map(|s| SnapInfo {
                id: s.id.clone(),
                name: s.name.clone(),
                l1_offset: s.l1_table_offset,
                l1_size: s.l1_size,
            })
            .collect();
        let mut warnings = Vec::new();
        let bitmaps_trusted = h.autoclear_features & autoclear::BITMAPS != 0;
        let bitmap_dir = match q.extensions().bitmaps {
            Some(b) if bitmaps_trusted => Some((b.directory_offset, b.directory_size)),
            _ => None,
        };
        if bitmap_dir.is_some() {
            if let Ok(dir) = q.bitmaps() {
                for b in dir.iter().filter(|b| b.in_use()) {
                    warnings.push(format!(
                        "bitmap '{}' is marked in-use: the program that wrote this image did not \
                         close it cleanly, so the bitmap is inconsistent and cannot be used \
                         (remove it with 'qemu-img bitmap --remove')",
                        b.name
                    ));
                }
            }
        }
        Ok(Checker {
            q,
            file,
            repair,
            cs,
            cbits,
            order,
            rb_bits: cbits + 3 - order,
            refcount_max: refblock::max_value(order),
            ext_l2: h.extended_l2(),
            data_file: h.has_data_file(),
            layout: EntryLayout {
                cluster_bits: cbits,
                extended_l2: h.extended_l2(),
                data_file: h.has_data_file(),
            },
            file_len,
            res: CheckResult::default(),
            total: CheckResult::default(),
            log: Vec::new(),
            warnings,
            corruption_signalled: false,
            incompatible: h.incompatible_features,
            l1_offset: h.l1_table_offset,
            l1,
            reftable_offset: h.refcount_table_offset,
            reftable_clusters,
            reftable,
            refblocks: HashMap::new(),
            dirty_refblocks: BTreeSet::new(),
            snapshots,
            snapshots_offset: h.snapshots_offset,
            snapshots_size,
            bitmap_dir,
            imrt: Vec::new(),
            nb_clusters: 0,
            work: Work::default(),
        })
    }

    /// Entries of one L2 table: the progress units of walking it.
    fn l2_units(&self) -> u64 {
        self.cs / if self.ext_l2 { 16 } else { 8 }
    }

    /// Progress units of walking the active L1 table (every L2 table it names).
    fn active_walk_units(&self) -> u64 {
        self.l1.iter().filter(|&&e| e != 0).count() as u64 * self.l2_units()
    }

    /// The first estimate: the walk of active and snapshot tables (snapshot tables as if
    /// full), one comparison of every cluster, and the OFLAG_COPIED pass.
    fn estimate_work(&mut self) {
        let snap_slots: u64 = self.snapshots.iter().map(|s| u64::from(s.l1_size)).sum();
        let walk = self.active_walk_units() + snap_slots.saturating_mul(self.l2_units());
        self.work.add_total(walk);
        self.work.add_total(self.nb_clusters);
        self.work.add_total(self.active_walk_units());
    }

    fn msg(&mut self, s: String) {
        self.log.push(s);
    }

    /// `qcow2_co_check_locked`.
    fn run(&mut self) -> Result<(), Fail> {
        let r = self.check_refcounts();
        let refcount_res = self.res;
        self.total.add_counts(&refcount_res);
        self.total.image_end_offset = refcount_res.image_end_offset;
        self.total.total_clusters = refcount_res.total_clusters;
        self.total.allocated_clusters = refcount_res.allocated_clusters;
        self.total.fragmented_clusters = refcount_res.fragmented_clusters;
        self.total.compressed_clusters = refcount_res.compressed_clusters;
        r?;
        if self.repair != Repair::None
            && self.total.check_errors == 0
            && self.total.corruptions == 0
        {
            self.mark_clean_and_consistent()?;
        }
        Ok(())
    }

    // ---------------------------------------------------------------- in-memory refcounts

    fn imrt_get(&self, k: u64) -> u64 {
        refblock::get(&self.imrt, self.order, k).unwrap_or(0)
    }

    fn imrt_set(&mut self, k: u64, v: u64) {
        let _ = refblock::set(&mut self.imrt, self.order, k, v);
    }

    /// `realloc_refcount_array`: room for `n` entries, in whole clusters.
    fn imrt_resize(&mut self, n: u64) -> Result<(), Fail> {
        let bytes = (n << self.order).div_ceil(8);
        let bytes = bytes.div_ceil(self.cs) * self.cs;
        if bytes > MAX_IMRT_BYTES {
            return Err(Fail(libc::ENOMEM));
        }
        if bytes as usize > self.imrt.len() {
            self.imrt.resize(bytes as usize, 0);
        }
        self.nb_clusters = n;
        Ok(())
    }

    /// `qcow2_inc_refcounts_imrt`.
    fn inc(&mut self, offset: u64, size: u64) -> Result<(), Fail> {
        if size == 0 {
            return Ok(());
        }
        let end = i128::from(offset) + i128::from(size);
        if end - i128::from(self.file_len) >= i128::from(self.cs) {
            self.msg(format!(
                "ERROR: counting reference for region exceeding the end of the file by one \
                 cluster or more: offset 0x{offset:x} size 0x{size:x}"
            ));
            self.res.corruptions += 1;
            return Ok(());
        }
        let start = offset >> self.cbits;
        let last = (offset + size - 1) >> self.cbits;
        for k in start..=last {
            if k >= self.nb_clusters {
                if let Err(e) = self.imrt_resize(k + 1) {
                    self.res.check_errors += 1;
                    return Err(e);
                }
            }
            let r = self.imrt_get(k);
            if r == self.refcount_max {
                self.msg(format!(
                    "ERROR: overflow cluster offset=0x{:x}",
                    k << self.cbits
                ));
                self.msg(
                    "Use qemu-img amend to increase the refcount entry width or qemu-img \
                     convert to create a clean copy if the image cannot be opened for writing"
                        .into(),
                );
                self.res.corruptions += 1;
                continue;
            }
            self.imrt_set(k, r + 1);
        }
        Ok(())
    }

    // ---------------------------------------------------------------- on-disk refcounts

    fn signal_corruption(&mut self, what: String) {
        if !self.corruption_signalled {
            self.corruption_signalled = true;
            self.msg(format!(
                "qcow2: Image is corrupt: {what}; further non-fatal corruption events will be \
                 suppressed"
            ));
        }
    }

    fn load_refblock(&mut self, off: u64) -> Result<(), Fail> {
        if !self.refblocks.contains_key(&off) {
            let mut b = vec![0u8; self.cs as usize];
            read_exact_or_zero(self.file, &mut b, off).map_err(|e| Fail(io_errno(&e)))?;
            self.refblocks.insert(off, b);
        }
        Ok(())
    }

    /// Where the refcount of cluster `k` lives: `None` when no refcount block covers it.
    fn refblock_of(&mut self, k: u64) -> Result<Option<u64>, Fail> {
        let rti = k >> self.rb_bits;
        let Some(rte) = usize::try_from(rti).ok().and_then(|i| self.reftable.get(i)) else {
            return Ok(None);
        };
        let off = rte & REFT_OFFSET_MASK;
        if off == 0 {
            return Ok(None);
        }
        if off & (self.cs - 1) != 0 {
            self.signal_corruption(format!(
                "Refblock offset {} unaligned (reftable index: {})",
                c_hex(off),
                c_hex(rti)
            ));
            return Err(Fail(libc::EIO));
        }
        self.load_refblock(off)?;
        Ok(Some(off))
    }

    /// `qcow2_get_refcount`.
    fn disk_refcount(&mut self, k: u64) -> Result<u64, Fail> {
        let Some(off) = self.refblock_of(k)? else {
            return Ok(0);
        };
        let idx = k & ((1u64 << self.rb_bits) - 1);
        Ok(self
            .refblocks
            .get(&off)
            .and_then(|b| refblock::get(b, self.order, idx))
            .unwrap_or(0))
    }

    /// Set the on-disk refcount of cluster `k` (kept dirty until `flush_refblocks`).
    fn set_disk_refcount(&mut self, k: u64, v: u64) -> Result<(), Fail> {
        let Some(off) = self.refblock_of(k)? else {
            return Err(Fail(libc::EIO));
        };
        let idx = k & ((1u64 << self.rb_bits) - 1);
        let order = self.order;
        let ok = self
            .refblocks
            .get_mut(&off)
            .is_some_and(|b| refblock::set(b, order, idx, v));
        if !ok {
            return Err(Fail(libc::EINVAL));
        }
        self.dirty_refblocks.insert(off);
        Ok(())
    }

    fn flush_refblocks(&mut self) -> Result<(), Fail> {
        if self.dirty_refblocks.is_empty() {
            return Ok(());
        }
        for off in std::mem::take(&mut self.dirty_refblocks) {
            if let Some(b) = self.refblocks.get(&off) {
                self.file.write_at(b, off).map_err(|e| Fail(io_errno(&e)))?;
            }
        }
        self.file.sync().map_err(|e| Fail(io_errno(&e)))
    }

    // ---------------------------------------------------------------- metadata overlap

    /// `qcow2_check_metadata_overlap` in QEMU's default ("cached") mode.
    fn overlaps_metadata(&self, offset: u64, size: u64, ign: Ol) -> Option<&'static str> {
        if size == 0 {
            return None;
        }
        if offset < self.cs {
            return Some("qcow2_header");
        }
        let cs = self.cs;
        let start = offset & !(cs - 1);
        let end = (offset + size).div_ceil(cs) * cs;
        let hit = |o: u64, len: u64| len > 0 && o < end && start < o.saturating_add(len);
        if hit(self.l1_offset, self.l1.byte_len()) {
            return Some("active L1 table");
        }
        if ign != Ol::OldRefcounts && hit(self.reftable_offset, self.reftable.byte_len()) {
            return Some("refcount table");
        }
        if hit(self.snapshots_offset, self.snapshots_size) {
            return Some("snapshot table");
        }
        if self
            .snapshots
            .iter()
            .any(|s| hit(s.l1_offset, u64::from(s.l1_size) * 8))
        {
            return Some("inactive L1 table");
        }
        if ign != Ol::ActiveL2
            && self
                .l1
                .iter()
                .any(|&e| e & L1E_OFFSET_MASK != 0 && hit(e & L1E_OFFSET_MASK, cs))
        {
            return Some("active L2 table");
        }
        if ign != Ol::OldRefcounts
            && self
                .reftable
                .iter()
                .any(|&e| e & REFT_OFFSET_MASK != 0 && hit(e & REFT_OFFSET_MASK, cs))
        {
            return Some("refcount block");
        }
        if let Some((o, len)) = self.bitmap_dir {
            if hit(o, len) {
                return Some("bitmap directory");
            }
        }
        None
    }
}

/// qcow2-bitmap.c `check_table_entry`.
fn bitmap_entry_ok(e: u64, cs: u64) -> bool {
    if e & bitmap_dir::TABLE_ENTRY_RESERVED_MASK != 0 {
        return false;
    }
    let off = e & bitmap_dir::TABLE_ENTRY_OFFSET_MASK;
    off == 0 || (e & bitmap_dir::TABLE_ENTRY_FLAG_ALL_ONES == 0 && off.is_multiple_of(cs))
}

/// C's `%#x`: `0x` prefix except for zero.
fn c_hex(v: u64) -> String {
    if v == 0 {
        "0".into()
    } else {
        format!("{v:#x}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::mem::MemStorage;
    use crate::qcow2::Qcow2Options;
    use std::sync::Arc;

    /// `images/default.qcow2`: 16 KiB clusters, 16-bit refcounts, 14 clusters in the file.
    fn default_image() -> Vec<u8> {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/images/default.qcow2");
        std::fs::read(path).expect("images/default.qcow2")
    }

    fn run(bytes: Vec<u8>, repair: Repair) -> (CheckOutcome, Arc<MemStorage>) {
        let st = Arc::new(MemStorage::new(bytes));
        let q = Qcow2::open(
            st.clone(),
            &Qcow2Options {
                no_io: true,
                ..Qcow2Options::default()
            },
        )
        .expect("open");
        (check(&q, repair), st)
    }

    fn be64(b: &[u8]) -> u64 {
        u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
    }

    fn snapshot(st: &MemStorage) -> Vec<u8> {
        let mut b = vec![0u8; st.len().expect("len") as usize];
        read_exact_or_zero(st, &mut b, 0).expect("read");
        b
    }

    /// Bump the refcount of host cluster `k` (first refcount block, 16-bit entries).
    fn poke_refcount(img: &mut [u8], k: usize, v: u16) {
        let rt = be64(&img[48..56]) as usize;
        let rb = be64(&img[rt..rt + 8]) as usize;
        img[rb + 2 * k..rb + 2 * k + 2].copy_from_slice(&v.to_be_bytes());
    }

    #[test]
    fn clean_fixture_has_no_findings() {
        let (o, _) = run(default_image(), Repair::None);
        assert!(o.failure.is_none());
        assert_eq!(
            o.result.corruptions + o.result.leaks + o.result.check_errors,
            0
        );
        assert_eq!(o.result.image_end_offset, 229_376);
        assert_eq!(o.result.total_clusters, 4096);
        assert_eq!(o.result.allocated_clusters, 8);
    }

    #[test]
    fn leak_is_found_then_repaired_in_place() {
        let mut img = default_image();
        img.resize(img.len() + (1 << 16), 0);
        poke_refcount(&mut img, 15, 1);
        let (o, _) = run(img.clone(), Repair::None);
        assert_eq!((o.result.leaks, o.result.corruptions), (1, 0));
        assert!(o
            .messages
            .contains(&"Leaked cluster 15 refcount=1 reference=0".to_string()));
        let (o, st) = run(img, Repair::Leaks);
        assert_eq!(o.result.leaks_fixed, 1);
        let (o, _) = run(snapshot(&st), Repair::None);
        assert_eq!((o.result.leaks, o.result.corruptions), (0, 0));
    }

    #[test]
    fn zero_refcount_is_rebuilt_and_dirty_bit_cleared() {
        let mut img = default_image();
        // a used data cluster with refcount 0, and the dirty bit of a crashed lazy writer
        let (o, _) = run(img.clone(), Repair::None);
        assert_eq!(o.result.corruptions, 0);
        poke_refcount(&mut img, 6, 0);
        img[79] |= 1;
        let (o, _) = run(img.clone(), Repair::None);
        assert!(o.result.corruptions >= 1, "{:?}", o.messages);
        let (o, st) = run(img, Repair::All);
        assert!(o.failure.is_none(), "{:?}", o.messages);
        assert!(o
            .messages
            .contains(&"Rebuilding refcount structure".to_string()));
        let fixed = snapshot(&st);
        assert_eq!(fixed[79] & 1, 0, "dirty bit still set");
        let (o, _) = run(fixed, Repair::None);
        assert_eq!(
            (o.result.leaks, o.result.corruptions, o.result.check_errors),
            (0, 0, 0),
            "{:?}",
            o.messages
        );
    }

    #[test]
    fn absurd_file_length_is_refused_cleanly() {
        let st = MemStorage::new(default_image());
        let q = Qcow2::open(
            Arc::new(st),
            &Qcow2Options {
                no_io: true,
                ..Qcow2Options::default()
            },
        )
        .expect("open");
        // 2^31 clusters of 16 KiB would need a 4 GiB array: refused before allocating
        let mut c = Checker::new(&q, Repair::None).expect("checker");
        c.file_len = (1u64 << 31) << 14;
        assert!(matches!(c.check_refcounts(), Err(Fail(libc::EFBIG))));
        assert_eq!(c.res.check_errors, 1);
    }
}
