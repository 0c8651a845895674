//! OFLAG_COPIED of the active tables (QEMU's `check_oflag_copied`) and the header repairs at
//! the end of a repairing check: the dirty and corrupt bits, and a bitmaps extension the
//! autoclear bit no longer vouches for.

use super::*;
use zerocopy::FromBytes;

impl Checker<'_> {
    /// `check_oflag_copied` (active tables only).
    pub(super) fn check_oflag_copied(&mut self, fix: Repair) -> Result<(), Fail> {
        let repair = if fix.errors() {
            true
        } else if fix.leaks() {
            self.res.check_errors == 0 && self.res.corruptions == 0 && self.res.leaks == 0
        } else {
            false
        };
        let mut l1_dirty = false;
        for i in 0..self.l1.len() {
            if self.l1[i] != 0 {
                self.work.step(self.l2_units());
            }
            let l1e = self.l1[i];
            let l2_offset = l1e & L1E_OFFSET_MASK;
            if l2_offset == 0 {
                continue;
            }
            let Ok(rc) = self.disk_refcount(l2_offset >> self.cbits) else {
                continue;
            };
            if (rc == 1) != (l1e & OFLAG_COPIED != 0) {
                self.res.corruptions += 1;
                self.msg(format!(
                    "{} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={l1e:x} refcount={rc}",
                    if repair { "Repairing" } else { "ERROR" }
                ));
                if repair {
                    self.l1[i] = if rc == 1 {
                        l1e | OFLAG_COPIED
                    } else {
                        l1e & !OFLAG_COPIED
                    };
                    let off = self.l1_offset + i as u64 * 8;
                    if let Err(e) = self.file.write_at(&self.l1.encode_entry(i), off) {
                        self.res.check_errors += 1;
                        return Err(Fail(io_errno(&e)));
                    }
                    l1_dirty = true;
                    self.res.corruptions -= 1;
                    self.res.corruptions_fixed += 1;
                }
            }
            let mut table = match self.read_l2(l2_offset) {
                Ok(t) => t,
                Err(e) => {
                    self.msg(format!(
                        "ERROR: Could not read L2 table: {}",
                        strerror(io_errno(&e))
                    ));
                    self.res.check_errors += 1;
                    return Err(Fail(io_errno(&e)));
                }
            };
            let mut l2_dirty = 0u64;
            for j in 0..table.len() {
                let e = table.entry(j);
                let ty = self.layout.cluster_type(e);
                if ty != ClusterType::Normal && ty != ClusterType::ZeroAlloc {
                    continue;
                }
                let rc = if self.data_file {
                    1
                } else {
                    match self.disk_refcount((e & L2E_OFFSET_MASK) >> self.cbits) {
                        Ok(r) => r,
                        Err(_) => continue,
                    }
                };
                if (rc == 1) != (e & OFLAG_COPIED != 0) {
                    self.res.corruptions += 1;
                    self.msg(format!(
                        "{} OFLAG_COPIED data cluster: l2_entry={e:x} refcount={rc}",
                        if repair { "Repairing" } else { "ERROR" }
                    ));
                    if repair {
                        table.set_entry(
                            j,
                            if rc == 1 {
                                e | OFLAG_COPIED
                            } else {
                                e & !OFLAG_COPIED
                            },
                        );
                        l2_dirty += 1;
                    }
                }
            }
            if l2_dirty > 0 {
                if let Some(what) = self.overlaps_metadata(l2_offset, self.cs, Ol::ActiveL2) {
                    self.msg(format!(
                        "ERROR: Could not write L2 table; metadata overlap check failed: \
                         overlaps with {what}"
                    ));
                    self.res.check_errors += 1;
                    return Err(Fail(libc::EIO));
                }
                if let Err(e) = table.store(self.file, l2_offset) {
                    self.msg(format!(
                        "ERROR: Could not write L2 table: {}",
                        strerror(io_errno(&e))
                    ));
                    self.res.check_errors += 1;
                    return Err(Fail(io_errno(&e)));
                }
                self.res.corruptions -= l2_dirty;
                self.res.corruptions_fixed += l2_dirty;
                l1_dirty = true;
            }
        }
        if l1_dirty {
            if let Err(e) = self.file.sync() {
                self.res.check_errors += 1;
                return Err(Fail(io_errno(&e)));
            }
        }
        Ok(())
    }

    /// `qcow2_mark_clean` + `qcow2_mark_consistent`: clear the dirty and corrupt bits. Also
    /// drops a bitmaps extension that the autoclear bit no longer vouches for (QEMU does that
    /// on every read-write open), since its clusters have just been freed as leaks.
    pub(super) fn mark_clean_and_consistent(&mut self) -> Result<(), Fail> {
        let h = self.q.header();
        if h.version >= 3 {
            let new = self.incompatible & !(incompat::DIRTY | incompat::CORRUPT);
            if new != self.incompatible {
                let field = HeaderField::IncompatibleFeatures(new);
                write_header(self.file, HeaderWrite::Field(field))
                    .map_err(|e| Fail(io_errno(&e.into_io())))?;
                self.incompatible = new;
            }
        }
        if self.q.extensions().bitmaps.is_some() && h.autoclear_features & autoclear::BITMAPS == 0 {
            self.drop_bitmaps_extension()?;
        }
        Ok(())
    }

    /// Rewrite the header extension area without the bitmaps extension.
    pub(super) fn drop_bitmaps_extension(&mut self) -> Result<(), Fail> {
        let h = self.q.header();
        let start = u64::from(h.header_length);
        let end = h.extensions_end().min(self.cs);
        if end <= start {
            return Ok(());
        }
        let mut area = vec![0u8; (end - start) as usize];
        read_exact_or_zero(self.file, &mut area, start).map_err(|e| Fail(io_errno(&e)))?;
        let mut out = Vec::with_capacity(area.len());
        let mut pos = 0usize;
        while let Ok((rec, _)) =
            crate::qcow2::spec::extensions::RawExtHeader::read_from_prefix(&area[pos..])
        {
            let (ty, len) = (rec.magic.get(), rec.length.get() as usize);
            if ty == crate::qcow2::spec::extensions::EXT_END {
                break;
            }
            let padded = len.div_ceil(8) * 8;
            let Some(next) = (pos + 8).checked_add(padded).filter(|&n| n <= area.len()) else {
                return Ok(()); // malformed: leave it alone
            };
            if ty != crate::qcow2::spec::extensions::EXT_BITMAPS {
                out.extend_from_slice(&area[pos..next]);
            }
            pos = next;
        }
        out.resize(area.len(), 0);
        let w = HeaderWrite::Area {
            at: start,
            bytes: &out,
        };
        write_header(self.file, w).map_err(|e| Fail(io_errno(&e.into_io())))
    }
}
