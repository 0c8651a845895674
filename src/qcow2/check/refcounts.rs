//! The refcount side of the check (QEMU's `check_refblocks`, `calculate_refcounts`,
//! `compare_refcounts` and `rebuild_refcount_structure`): the refcount table and blocks are
//! counted, the in-memory array is compared with the counts on disk, and a refcount structure
//! that cannot be trusted is rebuilt into free clusters before the header is repointed.

use super::*;

impl Checker<'_> {
    /// `check_refblocks`.
    pub(super) fn check_refblocks(&mut self, rebuild: &mut bool) -> Result<(), Fail> {
        for i in 0..self.reftable.len() {
            let rte = self.reftable[i];
            let offset = rte & REFT_OFFSET_MASK;
            let cluster = offset >> self.cbits;
            if rte & REFT_RESERVED_MASK != 0 {
                self.msg(format!(
                    "ERROR refcount table entry {i} has reserved bits set"
                ));
                self.res.corruptions += 1;
                *rebuild = true;
                continue;
            }
            if offset & (self.cs - 1) != 0 {
                self.msg(format!(
                    "ERROR refcount block {i} is not cluster aligned; refcount table entry \
                     corrupted"
                ));
                self.res.corruptions += 1;
                *rebuild = true;
                continue;
            }
            if cluster >= self.nb_clusters {
                self.res.corruptions += 1;
                let fix = self.repair.errors();
                self.msg(format!(
                    "{} refcount block {i} is outside image",
                    if fix { "Repairing" } else { "ERROR" }
                ));
                if fix {
                    match self.grow_file(offset) {
                        Ok(()) => {
                            self.res.corruptions -= 1;
                            self.res.corruptions_fixed += 1;
                            self.inc(offset, self.cs)?;
                        }
                        Err(Fail(e)) if e == libc::ENOMEM => {
                            self.res.check_errors += 1;
                            return Err(Fail(e));
                        }
                        Err(Fail(e)) => {
                            *rebuild = true;
                            self.msg(format!("ERROR could not resize image: {}", strerror(e)));
                        }
                    }
                }
                continue;
            }
            if offset != 0 {
                self.inc(offset, self.cs)?;
                let r = self.imrt_get(cluster);
                if r != 1 {
                    self.msg(format!("ERROR refcount block {i} refcount={r}"));
                    self.res.corruptions += 1;
                    *rebuild = true;
                }
            }
        }
        Ok(())
    }

    /// Extend the file so that the refcount block at `offset` lies inside it.
    pub(super) fn grow_file(&mut self, offset: u64) -> Result<(), Fail> {
        let new_len = offset.checked_add(self.cs).ok_or(Fail(libc::EINVAL))?;
        let n = new_len.div_ceil(self.cs);
        if (n << self.order).div_ceil(8) > MAX_IMRT_BYTES {
            return Err(Fail(libc::EFBIG));
        }
        self.file.set_len(new_len).map_err(|e| Fail(io_errno(&e)))?;
        self.file_len = self.file.len().map_err(|e| Fail(io_errno(&e)))?;
        let n = self.file_len.div_ceil(self.cs);
        if n > self.nb_clusters {
            self.imrt_resize(n)?;
        }
        Ok(())
    }

    /// `calculate_refcounts`.
    pub(super) fn calculate_refcounts(&mut self, rebuild: &mut bool) -> Result<(), Fail> {
        if self.imrt.is_empty() {
            let n = self.nb_clusters;
            if let Err(e) = self.imrt_resize(n) {
                self.res.check_errors += 1;
                return Err(e);
            }
        }
        self.inc(0, self.cs)?;
        let (l1o, l1s) = (self.l1_offset, self.l1.len() as u64);
        self.check_l1(l1o, l1s, true, true)?;
        if self.data_file && !self.snapshots.is_empty() {
            self.msg(format!(
                "ERROR {} snapshots in image with data file",
                self.snapshots.len()
            ));
            self.res.corruptions += 1;
        }
        for i in 0..self.snapshots.len() {
            let (off, size) = (self.snapshots[i].l1_offset, self.snapshots[i].l1_size);
            if off & (self.cs - 1) != 0 {
                let s = &self.snapshots[i];
                let m = format!(
                    "ERROR snapshot {} ({}) l1_offset={}: L1 table is not cluster aligned; \
                     snapshot table entry corrupted",
                    s.id,
                    s.name,
                    c_hex(off)
                );
                self.msg(m);
                self.res.corruptions += 1;
                continue;
            }
            if u64::from(size) > limits::MAX_L1_SIZE / 8 {
                let s = &self.snapshots[i];
                let m = format!(
                    "ERROR snapshot {} ({}) l1_size={}: L1 table is too large; snapshot \
                     table entry corrupted",
                    s.id,
                    s.name,
                    c_hex(u64::from(size))
                );
                self.msg(m);
                self.res.corruptions += 1;
                continue;
            }
            self.check_l1(off, u64::from(size), false, false)?;
        }
        self.inc(self.snapshots_offset, self.snapshots_size)?;
        self.inc(self.reftable_offset, self.reftable.byte_len())?;
        if self.q.header().crypt_method == crate::qcow2::spec::header::CRYPT_LUKS {
            if let Some(c) = self.q.extensions().crypto {
                self.inc(c.offset, c.length)?;
            }
        }
        self.check_bitmaps()?;
        self.check_refblocks(rebuild)
    }

    /// `compare_refcounts`; returns the highest cluster in use.
    pub(super) fn compare_refcounts(&mut self, fix: Repair, rebuild: &mut bool) -> u64 {
        let mut highest = 0;
        for i in 0..self.nb_clusters {
            if i & 4095 == 4095 {
                self.work.step(4096);
            }
            let r1 = match self.disk_refcount(i) {
                Ok(r) => r,
                Err(Fail(e)) => {
                    self.msg(format!(
                        "Can't get refcount for cluster {i}: {}",
                        strerror(e)
                    ));
                    self.res.check_errors += 1;
                    continue;
                }
            };
            let r2 = self.imrt_get(i);
            if r1 > 0 || r2 > 0 {
                highest = i;
            }
            if r1 == r2 {
                continue;
            }
            #[derive(PartialEq)]
            enum Fix {
                No,
                Leak,
                Corruption,
            }
            let f = if r1 == 0 {
                *rebuild = true;
                Fix::No
            } else if r1 > r2 && fix.leaks() {
                Fix::Leak
            } else if r1 < r2 && fix.errors() {
                Fix::Corruption
            } else {
                Fix::No
            };
            self.msg(format!(
                "{} cluster {i} refcount={r1} reference={r2}",
                if f != Fix::No {
                    "Repairing"
                } else if r1 < r2 {
                    "ERROR"
                } else {
                    "Leaked"
                }
            ));
            if f != Fix::No && self.set_disk_refcount(i, r2).is_ok() {
                if f == Fix::Leak {
                    self.res.leaks_fixed += 1;
                } else {
                    self.res.corruptions_fixed += 1;
                }
                continue;
            }
            if r1 < r2 {
                self.res.corruptions += 1;
            } else {
                self.res.leaks += 1;
            }
        }
        self.work.step(self.nb_clusters & 4095);
        highest
    }

    /// `alloc_clusters_imrt`.
    pub(super) fn alloc_imrt(&mut self, count: u64, first_free: &mut u64) -> Result<u64, Fail> {
        let mut cluster = *first_free;
        let mut first_gap = true;
        let mut free = 0u64;
        while cluster < self.nb_clusters && free < count {
            if self.imrt_get(cluster) == 0 {
                free += 1;
                if first_gap {
                    *first_free = cluster;
                    first_gap = false;
                }
            } else {
                free = 0;
            }
            cluster += 1;
        }
        if free < count {
            self.imrt_resize(cluster + count - free)?;
        }
        cluster -= free;
        for i in 0..count {
            self.imrt_set(cluster + i, 1);
        }
        Ok(cluster << self.cbits)
    }

    /// `rebuild_refcounts_write_refblocks`: returns whether the reftable grew.
    pub(super) fn write_refblocks(
        &mut self,
        first: u64,
        mut end: u64,
        reftable: &mut RefTable,
    ) -> Result<bool, String> {
        let mut first_free = 0u64;
        let mut grown = false;
        let per_block = 1u64 << self.rb_bits;
        let mut cluster = first;
        while cluster < end {
            if self.imrt_get(cluster) == 0 {
                cluster += 1;
                continue;
            }
            let index = cluster >> self.rb_bits;
            let start = index << self.rb_bits;
            let existing = usize::try_from(index)
                .ok()
                .and_then(|i| reftable.get(i))
                .unwrap_or(0);
            let rb_off = if existing != 0 {
                existing
            } else {
                first_free = first_free.max(start);
                let off = self
                    .alloc_imrt(1, &mut first_free)
                    .map_err(|Fail(e)| format!("ERROR allocating refblock: {}", strerror(e)))?;
                let rb_cluster = off / self.cs;
                if rb_cluster >= end {
                    end = rb_cluster + 1;
                }
                if reftable.len() as u64 <= index {
                    let entries = ((index + 1) * 8).div_ceil(self.cs) * self.cs / 8;
                    if entries * 8 > limits::MAX_REFTABLE_SIZE * 2 {
                        return Err("ERROR allocating reftable memory".into());
                    }
                    reftable.resize(entries as usize);
                    grown = true;
                }
                reftable[index as usize] = off;
                off
            };
            if let Some(what) = self.overlaps_metadata(rb_off, self.cs, Ol::OldRefcounts) {
                return Err(format!(
                    "ERROR writing refblock: overlaps with {what}: {}",
                    strerror(libc::EIO)
                ));
            }
            let bstart = (index * self.cs) as usize;
            let block = self
                .imrt
                .get(bstart..bstart + self.cs as usize)
                .ok_or_else(|| "ERROR writing refblock: refcount array too short".to_string())?;
            self.file
                .write_at(block, rb_off)
                .map_err(|e| format!("ERROR writing refblock: {}", strerror(io_errno(&e))))?;
            cluster = start + per_block;
        }
        Ok(grown)
    }

    /// `rebuild_refcount_structure`: new refblocks and reftable from the in-memory array,
    /// written into clusters that are free in it; the old structure becomes leaked.
    pub(super) fn rebuild_refcount_structure(&mut self) -> Result<(), String> {
        self.refblocks.clear();
        self.dirty_refblocks.clear();
        let mut reftable = RefTable::default();
        let n = self.nb_clusters;
        self.write_refblocks(0, n, &mut reftable)?;
        let mut changed;
        let mut rt_offset;
        let mut rt_clusters;
        loop {
            let len = reftable.byte_len();
            rt_clusters = len.div_ceil(self.cs);
            let mut first_free = 0;
            rt_offset = self
                .alloc_imrt(rt_clusters, &mut first_free)
                .map_err(|Fail(e)| format!("ERROR allocating reftable: {}", strerror(e)))?;
            let s = rt_offset / self.cs;
            // the reftable's own clusters need their refcounts written; if that grows the
            // reftable, allocate it again (the earlier allocation is leaked and freed later)
            changed = self.write_refblocks(s, s + rt_clusters, &mut reftable)?;
            if !changed {
                break;
            }
        }
        if let Some(what) = self.overlaps_metadata(rt_offset, reftable.byte_len(), Ol::OldRefcounts)
        {
            return Err(format!("ERROR writing reftable: overlaps with {what}"));
        }
        reftable
            .store(self.file, rt_offset)
            .and_then(|_| self.file.sync())
            .map_err(|e| format!("ERROR writing reftable: {}", strerror(io_errno(&e))))?;
        let field = HeaderField::RefcountTable {
            offset: rt_offset,
            clusters: rt_clusters as u32,
        };
        write_header(self.file, HeaderWrite::Field(field)).map_err(|e| {
            format!(
                "ERROR setting reftable: {}",
                strerror(io_errno(&e.into_io()))
            )
        })?;
        self.reftable = reftable;
        self.reftable_offset = rt_offset;
        self.reftable_clusters = rt_clusters;
        self.refblocks.clear();
        Ok(())
    }

    /// `qcow2_check_refcounts`.
    pub(super) fn check_refcounts(&mut self) -> Result<(), Fail> {
        let nb = self.file_len.div_ceil(self.cs);
        if nb > i32::MAX as u64 || (nb << self.order).div_ceil(8) > MAX_IMRT_BYTES {
            self.res.check_errors += 1;
            return Err(Fail(libc::EFBIG));
        }
        self.nb_clusters = nb;
        self.estimate_work();
        let size = self.q.header().size / 512 * 512;
        self.res.total_clusters = size.div_ceil(self.cs);
        let mut rebuild = false;
        let fix = self.repair;
        self.calculate_refcounts(&mut rebuild)?;
        let pre_compare = self.res;
        let mut highest = self.compare_refcounts(Repair::None, &mut rebuild);

        if rebuild && fix.errors() {
            let old = self.res;
            let mut fresh_leaks = 0;
            self.msg("Rebuilding refcount structure".into());
            if let Err(m) = self.rebuild_refcount_structure() {
                self.msg(m);
                self.res.check_errors += 1;
                return Err(Fail(libc::EIO));
            }
            self.file_len = match self.file.len() {
                Ok(l) => l,
                Err(e) => {
                    self.res.check_errors += 1;
                    return Err(Fail(io_errno(&e)));
                }
            };
            self.res.corruptions = 0;
            self.res.leaks = 0;
            rebuild = false;
            // a second walk and comparison of the rebuilt structure
            self.work
                .add_total(self.active_walk_units() + self.nb_clusters);
            self.imrt.iter_mut().for_each(|b| *b = 0);
            self.calculate_refcounts(&mut rebuild)?;
            if fix.leaks() {
                self.work.add_total(self.nb_clusters);
                let saved = self.res;
                self.res = CheckResult::default();
                highest = self.compare_refcounts(Repair::Leaks, &mut rebuild);
                if rebuild {
                    self.msg("ERROR rebuilt refcount structure is still broken".into());
                }
                fresh_leaks = self.res.leaks;
                self.res = saved;
                if let Err(Fail(e)) = self.flush_refblocks() {
                    self.res.check_errors += 1;
                    return Err(Fail(e));
                }
            }
            if self.res.corruptions < old.corruptions {
                self.res.corruptions_fixed += old.corruptions - self.res.corruptions;
            }
            if self.res.leaks < old.leaks {
                self.res.leaks_fixed += old.leaks - self.res.leaks;
            }
            self.res.leaks += fresh_leaks;
        } else if fix != Repair::None {
            if rebuild {
                self.msg("ERROR need to rebuild refcount structures".into());
                self.res.check_errors += 1;
                return Err(Fail(libc::EIO));
            }
            if self.res.leaks != 0 || self.res.corruptions != 0 {
                self.work.add_total(self.nb_clusters);
                self.res = pre_compare;
                highest = self.compare_refcounts(fix, &mut rebuild);
                if let Err(Fail(e)) = self.flush_refblocks() {
                    self.res.check_errors += 1;
                    return Err(Fail(e));
                }
            }
        }
        self.check_oflag_copied(fix)?;
        self.res.image_end_offset = (highest + 1) * self.cs;
        Ok(())
    }
}
