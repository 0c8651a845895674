//! The walk of the tables that own host clusters: active and snapshot L1/L2 tables and the
//! bitmap directory with its tables (QEMU's `check_refcounts_l1`, `check_refcounts_l2` and
//! `qcow2_check_bitmaps_refcounts`). Each reference found is counted in the in-memory
//! refcount array; corrupted entries are reported, and repaired (zeroed) when asked.

use super::*;

impl Checker<'_> {
    // ---------------------------------------------------------------- L1 / L2 walk

    /// Read one L2 table.
    pub(super) fn read_l2(&self, off: u64) -> std::io::Result<L2Table> {
        L2Table::load(self.file, off, self.cs, self.ext_l2)
    }

    /// `fix_l2_entry_by_zero`: the caller has counted the corruption.
    pub(super) fn fix_l2_entry_by_zero(
        &mut self,
        l2_offset: u64,
        table: &mut L2Table,
        i: usize,
        active: bool,
    ) -> (bool, bool) {
        let bitmap = table.bitmap(i);
        let (ne, nb) = if self.ext_l2 {
            let b = (bitmap | (bitmap << 32)) & L2_BITMAP_ALL_ZEROES;
            (0, b)
        } else {
            (OFLAG_ZERO, 0)
        };
        table.set(i, ne, nb);
        let esize = table.entry_size();
        let eoff = l2_offset + i as u64 * esize;
        let ign = if active { Ol::ActiveL2 } else { Ol::InactiveL2 };
        if self.overlaps_metadata(eoff, esize, ign).is_some() {
            self.msg("ERROR: Overlap check failed".into());
            self.res.check_errors += 1;
            return (false, true);
        }
        let buf = table.encode_entry(i);
        let r = self
            .file
            .write_at(&buf, eoff)
            .and_then(|_| self.file.sync());
        if let Err(e) = r {
            self.msg(format!(
                "ERROR: Failed to overwrite L2 table entry: {}",
                strerror(io_errno(&e))
            ));
            self.res.check_errors += 1;
            return (false, false);
        }
        self.res.corruptions -= 1;
        self.res.corruptions_fixed += 1;
        (true, false)
    }

    /// `check_refcounts_l2`.
    pub(super) fn check_l2(
        &mut self,
        l2_offset: u64,
        frag: bool,
        active: bool,
    ) -> Result<(), Fail> {
        let mut table = match self.read_l2(l2_offset) {
            Ok(t) => t,
            Err(e) => {
                self.msg("ERROR: I/O error in check_refcounts_l2".into());
                self.res.check_errors += 1;
                return Err(Fail(io_errno(&e)));
            }
        };
        let mut next_contiguous = 0u64;
        for i in 0..table.len() {
            let (mut e, bitmap) = table.get(i);
            let ty = self.layout.cluster_type(e);
            if ty != ClusterType::Compressed && e & L2E_RESERVED_MASK != 0 {
                self.msg(format!(
                    "ERROR found l2 entry with reserved bits set: {e:x}"
                ));
                self.res.corruptions += 1;
            }
            match ty {
                ClusterType::Compressed => {
                    let layout = self.layout;
                    if e & OFLAG_COPIED != 0 {
                        self.msg(format!(
                            "ERROR: coffset=0x{:x}: copied flag must never be set for compressed \
                             clusters",
                            layout.compressed(e).host
                        ));
                        e &= !OFLAG_COPIED;
                        self.res.corruptions += 1;
                    }
                    if self.data_file {
                        self.msg(format!(
                            "ERROR compressed cluster {i} with data file, entry=0x{e:x}"
                        ));
                        self.res.corruptions += 1;
                        continue;
                    }
                    if bitmap != 0 {
                        self.msg(format!(
                            "ERROR compressed cluster {i} with non-zero subcluster allocation \
                             bitmap, entry=0x{e:x}"
                        ));
                        self.res.corruptions += 1;
                        continue;
                    }
                    let d = layout.compressed(e);
                    self.inc(d.host, d.len)?;
                    if frag {
                        self.res.allocated_clusters += 1;
                        self.res.compressed_clusters += 1;
                        self.res.fragmented_clusters += 1;
                    }
                }
                ClusterType::ZeroAlloc | ClusterType::Normal => {
                    let offset = e & L2E_OFFSET_MASK;
                    if (bitmap >> 32) & bitmap != 0 {
                        self.res.corruptions += 1;
                        self.msg(format!(
                            "ERROR offset={offset:x}: Allocated cluster has corrupted \
                             subcluster allocation bitmap"
                        ));
                    }
                    if offset & (self.cs - 1) != 0 {
                        self.res.corruptions += 1;
                        let contains_data = if self.ext_l2 {
                            bitmap & L2_BITMAP_ALL_ALLOC != 0
                        } else {
                            ty == ClusterType::Normal
                        };
                        if !contains_data {
                            let fix = self.repair.errors();
                            self.msg(format!(
                                "{} offset={offset:x}: Preallocated cluster is not properly \
                                 aligned; L2 entry corrupted.",
                                if fix { "Repairing" } else { "ERROR" }
                            ));
                            if fix {
                                let (fixed, overlap) =
                                    self.fix_l2_entry_by_zero(l2_offset, &mut table, i, active);
                                if overlap {
                                    return Err(Fail(libc::EIO));
                                }
                                if fixed {
                                    continue;
                                }
                            }
                        } else {
                            self.msg(format!(
                                "ERROR offset={offset:x}: Data cluster is not properly aligned; \
                                 L2 entry corrupted."
                            ));
                        }
                    }
                    if frag {
                        self.res.allocated_clusters += 1;
                        if next_contiguous != 0 && offset != next_contiguous {
                            self.res.fragmented_clusters += 1;
                        }
                        next_contiguous = offset + self.cs;
                    }
                    if !self.data_file {
                        self.inc(offset, self.cs)?;
                    }
                }
                ClusterType::ZeroPlain => {}
                ClusterType::Unallocated => {
                    if bitmap & L2_BITMAP_ALL_ALLOC != 0 {
                        self.res.corruptions += 1;
                        self.msg(
                            "ERROR: Unallocated cluster has non-zero subcluster allocation map"
                                .into(),
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// `check_refcounts_l1`.
    pub(super) fn check_l1(
        &mut self,
        l1_offset: u64,
        l1_size: u64,
        frag: bool,
        active: bool,
    ) -> Result<(), Fail> {
        if l1_size == 0 {
            return Ok(());
        }
        self.inc(l1_offset, l1_size * 8)?;
        let l1 = if active {
            self.l1.clone()
        } else {
            match L1Table::load(self.file, l1_offset, l1_size, PastEof::Zeros) {
                Ok(t) => t,
                Err(e) => {
                    self.msg("ERROR: I/O error in check_refcounts_l1".into());
                    self.res.check_errors += 1;
                    return Err(Fail(io_errno(&e)));
                }
            }
        };
        if !active {
            // the estimate counted every slot of a snapshot table
            let zeros = l1.iter().filter(|&&e| e == 0).count() as u64;
            self.work.sub_total(zeros * self.l2_units());
        }
        for &e in &l1 {
            if e == 0 {
                continue;
            }
            if e & L1E_RESERVED_MASK != 0 {
                self.msg(format!(
                    "ERROR found L1 entry with reserved bits set: {e:x}"
                ));
                self.res.corruptions += 1;
            }
            let l2 = e & L1E_OFFSET_MASK;
            self.inc(l2, self.cs)?;
            if l2 & (self.cs - 1) != 0 {
                self.msg(format!(
                    "ERROR l2_offset={l2:x}: Table is not cluster aligned; L1 entry corrupted"
                ));
                self.res.corruptions += 1;
            }
            self.check_l2(l2, frag, active)?;
            self.work.step(self.l2_units());
        }
        Ok(())
    }

    // ---------------------------------------------------------------- whole image

    /// `qcow2_check_bitmaps_refcounts`.
    pub(super) fn check_bitmaps(&mut self) -> Result<(), Fail> {
        let Some((dir_off, dir_size)) = self.bitmap_dir else {
            return Ok(());
        };
        self.inc(dir_off, dir_size)?;
        let dir = match self.q.bitmaps() {
            Ok(d) => d.to_vec(),
            Err(_) => {
                self.res.corruptions += 1;
                return Err(Fail(libc::EINVAL));
            }
        };
        for bm in dir {
            let tsize = u64::from(bm.table_size);
            self.inc(bm.table_offset, tsize * 8)?;
            // read the table a cluster at a time
            let per = self.cs / 8;
            let mut entries = Vec::new();
            let mut i = 0u64;
            while i < tsize {
                let n = per.min(tsize - i);
                match BitmapTable::load(self.file, bm.table_offset + i * 8, n, PastEof::Zeros) {
                    Ok(t) => entries.extend(t.iter()),
                    Err(e) => {
                        self.res.corruptions += 1;
                        return Err(Fail(io_errno(&e)));
                    }
                }
                i += n;
            }
            if entries.iter().any(|&e| !bitmap_entry_ok(e, self.cs)) {
                self.res.corruptions += 1;
                return Err(Fail(libc::EINVAL));
            }
            for e in entries {
                let off = e & bitmap_dir::TABLE_ENTRY_OFFSET_MASK;
                if off != 0 {
                    self.inc(off, self.cs)?;
                }
            }
        }
        Ok(())
    }
}
