//! The write side of the qcow2 driver: cluster allocation, copy-on-write, write-zeroes,
//! discard, and the ordering that keeps the image consistent across a crash.
//!
//! Metadata changes are made in memory under the metadata lock (`Meta`) and reach the disk at
//! `flush` (or when too many tables are dirty), in this order:
//!
//! 1. guest data (already written in place; the data file is synced first),
//! 2. refcount blocks that gained references, then the refcount table (with an fsync between:
//!    a table entry never points at a block that is not on disk),
//! 3. L2 tables, then L1 entries,
//! 4. only then the pending refcount decrements (clusters freed by COW, discard, zeroing), so a
//!    cluster is never free on disk while a durable L2 entry still points at it; readers in
//!    flight are drained first (`io_barrier`), so a freed cluster never changes under a read.
//!
//! A crash at any point leaves at worst leaked clusters, never a reference to a cluster with a
//! too-low refcount. Writes that would land on metadata set the corrupt bit and fail.
//!
//! Refcount changes, cluster allocation and step 2 live in `refcount.rs`; this file decides
//! what to allocate, copies, repoints L2 entries and runs the flush in order.

use super::cluster_set::ClusterSet;
use super::compress;
use super::header_write::HeaderWrite;
use super::meta::Meta;
use super::spec::entries::{
    SubclusterType, L2E_OFFSET_MASK, L2_BITMAP_ALL_ALLOC, OFLAG_COPIED, OFLAG_ZERO,
    REFT_OFFSET_MASK,
};
use super::spec::header::{autoclear, incompat, HeaderField};
use super::spec::table::L2Table;
use super::tables::l2_for;
use super::{io_err, Qcow2};
use crate::block::{Access, CowSource, ZeroMode};
use crate::error::{Error, ErrorKind, Result};
use crate::io::read_exact_or_zero;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// All-zero subcluster bitmap: every subcluster reads as zero.
const L2_BITMAP_ALL_ZEROES: u64 = 0xffff_ffff_0000_0000;
/// Dirty tables kept in memory before an implicit metadata flush.
const MAX_DIRTY_TABLES: usize = 512;

impl Qcow2 {
    /// Checks and header updates due before the first write of this open.
    pub(crate) fn prepare(&self, m: &mut Meta) -> Result<()> {
        if self.access != Access::ReadWrite {
            return Err(Error::new(
                ErrorKind::Denied,
                "the image is opened read-only",
            ));
        }
        if m.corrupt {
            return Err(Error::corrupt(
                "the image is marked corrupt; writes are refused (repair it with 'qnbd check -r all')",
            ));
        }
        if m.prepared {
            return Ok(());
        }
        self.ensure_reftable(m)?;
        // Unknown autoclear bits must be cleared before the first write (qcow2 spec, "Header");
        // the bitmaps bit stays: this writer maintains the bitmaps.
        if self.header.version >= 3 {
            let keep = m.autoclear & autoclear::MASK;
            if keep != m.autoclear {
                self.write_header_field(HeaderField::AutoclearFeatures(keep))?;
                m.autoclear = keep;
            }
        }
        m.metadata = Some(self.metadata_clusters(m)?);
        m.prepared = true;
        Ok(())
    }

    /// Host clusters that hold metadata.
    fn metadata_clusters(&self, m: &Meta) -> Result<ClusterSet> {
        let cs = self.cs();
        let mut set = ClusterSet::default();
        let mut add_range = |off: u64, len: u64| {
            if len == 0 {
                return;
            }
            let first = off / cs;
            let last = off.saturating_add(len - 1) / cs;
            set.insert_range(first, last.saturating_add(1));
        };
        add_range(0, cs);
        add_range(m.l1_offset, m.l1.len() as u64 * 8);
        add_range(m.reftable_offset, u64::from(m.reftable_clusters) * cs);
        for &e in m.reftable.iter().flatten() {
            let off = e & REFT_OFFSET_MASK;
            if off != 0 {
                add_range(off, cs);
            }
        }
        for &e in &m.l1 {
            let off = e & super::spec::entries::L1E_OFFSET_MASK;
            if off != 0 {
                add_range(off, cs);
            }
        }
        for s in self.snapshots() {
            add_range(s.l1_table_offset, u64::from(s.l1_size) * 8);
        }
        if let Some(b) = self.ext.bitmaps {
            add_range(b.directory_offset, b.directory_size);
        }
        if let Ok(bms) = self.bitmaps() {
            for b in bms {
                add_range(b.table_offset, u64::from(b.table_size) * 8);
            }
        }
        if let Some(c) = self.ext.crypto {
            add_range(c.offset, c.length);
        }
        Ok(set)
    }

    /// Rewrite the header cluster (fixed header, extensions, backing file name) from the
    /// current state, with `bitmaps` as the bitmaps extension; synced. Like QEMU's
    /// `qcow2_update_header`, one write of the header area.
    pub(crate) fn rewrite_header(
        &self,
        m: &mut Meta,
        bitmaps: Option<super::spec::extensions::BitmapsExt>,
    ) -> Result<()> {
        let cs = self.cs();
        let mut h = self.header.clone();
        h.size = m.size;
        h.l1_size = m.l1.len() as u32;
        h.l1_table_offset = m.l1_offset;
        h.refcount_table_offset = m.reftable_offset;
        h.refcount_table_clusters = m.reftable_clusters;
        if m.corrupt {
            h.incompatible_features |= incompat::CORRUPT;
        }
        let mut autoclear_bits = m.autoclear & autoclear::MASK;
        if bitmaps.is_some() {
            autoclear_bits |= autoclear::BITMAPS;
        }
        h.autoclear_features = autoclear_bits;
        let mut ext = self.ext.clone();
        ext.bitmaps = bitmaps;
        ext.bitmaps_untrusted = None;
        let area = h.encode_area(&ext, self.backing_name());
        if area.len() as u64 > cs {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "the header extensions do not fit in the first cluster",
            ));
        }
        self.write_header(HeaderWrite::Area {
            at: 0,
            bytes: &area,
        })?;
        m.autoclear = autoclear_bits;
        m.bitmaps_ext = bitmaps;
        Ok(())
    }

    /// Queue a decrement for every host cluster a (soon unreferenced) entry holds.
    fn release_entry(&self, m: &mut Meta, entry: u64) {
        if self.header.has_data_file() {
            return; // data clusters in an external data file are not refcounted
        }
        if entry & super::spec::entries::OFLAG_COMPRESSED != 0 {
            let d = self.layout.compressed(entry);
            let first = (d.host & !511) / self.cs();
            let last = (d.host + d.len - 1) / self.cs();
            for c in first..=last {
                m.pending_decrements.push(c);
            }
        } else {
            let host = entry & L2E_OFFSET_MASK;
            if host != 0 {
                m.pending_decrements.push(host / self.cs());
            }
        }
    }

    // ---- L2 tables ---------------------------------------------------------------------------

    /// The L2 table covering `guest`, ready to be modified: allocated if missing, copied if it is
    /// shared with a snapshot. Returns (L1 index, L2 offset, table).
    ///
    /// A new or copied table is stored as a dirty table before L1 is repointed at it, so every
    /// state this leaves behind (also when the caller fails afterwards) can be flushed: L1 never
    /// names a cluster that holds no table.
    fn l2_for_write(&self, m: &mut Meta, guest: u64) -> Result<(usize, u64, L2Table)> {
        let cs = self.cs();
        let l1_idx = (guest / self.header.l2_coverage()) as usize;
        if l1_idx >= m.l1.len() {
            return Err(Error::new(
                ErrorKind::OutOfRange,
                format!("guest offset {guest:#x} beyond the L1 table"),
            ));
        }
        let l1e = m.l1[l1_idx];
        let (table, old_off) = match l2_for(self, m, guest)? {
            Some((l2_off, table)) if l1e & OFLAG_COPIED != 0 => {
                return Ok((l1_idx, l2_off, (*table).clone()))
            }
            // shared with a snapshot: copy it
            Some((l2_off, table)) => ((*table).clone(), Some(l2_off)),
            None => (L2Table::zeroed(cs, self.header.extended_l2()), None),
        };
        let new_off = self.alloc_meta_clusters(m, 1)?;
        m.dirty_l2.insert(new_off, Arc::new(table.clone()));
        m.l1[l1_idx] = new_off | OFLAG_COPIED;
        m.l1_dirty.insert(l1_idx);
        if let Some(old) = old_off {
            m.pending_decrements.push(old / cs);
        }
        Ok((l1_idx, new_off, table))
    }

    fn store_l2(&self, m: &mut Meta, l2_off: u64, table: L2Table) {
        m.dirty_l2.insert(l2_off, Arc::new(table));
    }

    /// Check that an in-place write to host cluster `host` does not hit metadata.
    fn check_overlap(&self, m: &mut Meta, host: u64) -> Result<()> {
        let c = host / self.cs();
        if m.metadata.as_ref().is_some_and(|s| s.contains(c)) {
            let why = format!("Preventing invalid write on metadata (host cluster {host:#x})");
            return Err(self.mark_corrupt(m, why));
        }
        Ok(())
    }

    /// Current content of one guest cluster as this layer + `below` show it.
    fn cluster_content(
        &self,
        m: &Meta,
        guest_cluster: u64,
        entry: u64,
        bitmap: u64,
        below: &dyn CowSource,
    ) -> Result<Vec<u8>> {
        let cs = self.cs() as usize;
        let mut buf = vec![0u8; cs];
        let size = m.size;
        let valid = (size - guest_cluster).min(cs as u64) as usize;
        let spc = if self.header.extended_l2() { 32 } else { 1 };
        let sc = cs / spc;
        for i in 0..spc {
            let lo = i * sc;
            if lo >= valid {
                break;
            }
            let hi = (lo + sc).min(valid);
            let dst = &mut buf[lo..hi];
            match self.layout.classify(entry, bitmap, i as u32) {
                SubclusterType::Normal => {
                    let host = self.host_of(entry, guest_cluster) + lo as u64;
                    read_exact_or_zero(&**self.data_st()?, dst, host)
                        .map_err(io_err(format!("Could not read cluster data at {host:#x}")))?;
                }
                SubclusterType::Compressed => {
                    let mut full = vec![0u8; cs];
                    super::tables::read_compressed_entry(self, entry, m.file_len, &mut full)?;
                    buf[..valid].copy_from_slice(&full[..valid]);
                    return Ok(buf);
                }
                SubclusterType::ZeroPlain | SubclusterType::ZeroAlloc => {}
                SubclusterType::UnallocatedPlain | SubclusterType::UnallocatedAlloc => {
                    below.read_below(guest_cluster + lo as u64, dst)?;
                }
                SubclusterType::Invalid => {
                    return Err(Error::corrupt(format!(
                        "Invalid cluster entry found (guest offset {guest_cluster:#x})"
                    )))
                }
            }
        }
        Ok(buf)
    }

    /// Host offset of the cluster an entry maps (guest offset for external data files).
    fn host_of(&self, entry: u64, guest_cluster: u64) -> u64 {
        let off = entry & L2E_OFFSET_MASK;
        if self.header.has_data_file() && off == 0 {
            guest_cluster
        } else {
            off
        }
    }

    /// A host cluster for new data of `guest_cluster`.
    fn new_data_cluster(&self, m: &mut Meta, guest_cluster: u64) -> Result<u64> {
        if self.header.has_data_file() {
            Ok(guest_cluster)
        } else {
            self.alloc_clusters(m, 1)
        }
    }

    fn write_data(&self, m: &mut Meta, host: u64, buf: &[u8]) -> Result<()> {
        self.data_st()?.write_at(buf, host).map_err(io_err(format!(
            "Could not write guest data at host offset {host:#x}"
        )))?;
        if !self.header.has_data_file() {
            m.file_len = m.file_len.max(host + buf.len() as u64);
        }
        Ok(())
    }

    /// A new cluster that must read as zeros apart from `data`: when it lies past the end of
    /// the file, only `data` is written and the file is extended over the rest of the cluster
    /// (which then reads as zeros) instead of writing a cluster of zeros. False (nothing
    /// written) when the cluster is inside the file (reused space holds old bytes).
    fn write_into_fresh(
        &self,
        m: &mut Meta,
        host: u64,
        in_off: usize,
        data: &[u8],
    ) -> Result<bool> {
        let st = self.data_st()?;
        let len = st.len().map_err(io_err("Could not get the image length"))?;
        if host < len.max(m.file_len) {
            return Ok(false);
        }
        self.write_data(m, host + in_off as u64, data)?;
        let end = host + self.cs();
        if host + ((in_off + data.len()) as u64) < end {
            st.set_len(end)
                .map_err(io_err("Could not extend the image file"))?;
        }
        m.file_len = m.file_len.max(end);
        Ok(true)
    }

    /// Write `data` at `in_off` inside the guest cluster at `guest_cluster`.
    fn write_in_cluster(
        &self,
        m: &mut Meta,
        guest_cluster: u64,
        in_off: usize,
        data: &[u8],
        below: &dyn CowSource,
    ) -> Result<()> {
        let cs = self.cs() as usize;
        let (_, l2_off, mut table) = self.l2_for_write(m, guest_cluster)?;
        let ext = self.header.extended_l2();
        let idx = ((guest_cluster / cs as u64) % self.header.l2_entries()) as usize;
        let (entry, bitmap) = table.get(idx);
        let host_off = entry & L2E_OFFSET_MASK;
        let compressed = entry & super::spec::entries::OFLAG_COMPRESSED != 0;
        // (a compressed descriptor's offset is a byte offset: no alignment to check)
        if !compressed && host_off != 0 && host_off & (cs as u64 - 1) != 0 {
            let why = format!("Cluster allocation offset {host_off:#x} unaligned (L2 offset: {l2_off:#x}, L2 index: {idx:#x})");
            return Err(self.mark_corrupt(m, why));
        }
        let has_host = !compressed
            && (host_off != 0 || (self.header.has_data_file() && entry & OFLAG_COPIED != 0));
        let owned = has_host && entry & OFLAG_COPIED != 0;

        if !ext {
            let ty = self.layout.classify(entry, 0, 0);
            if ty == SubclusterType::Normal && owned {
                let host = self.host_of(entry, guest_cluster);
                if !self.header.has_data_file() {
                    self.check_overlap(m, host)?;
                }
                self.write_data(m, host + in_off as u64, data)?;
                return Ok(());
            }
            let reads_zero = ty == SubclusterType::ZeroPlain
                || (ty == SubclusterType::UnallocatedPlain && !below.has_backing());
            if reads_zero && !has_host && !compressed && !self.header.has_data_file() {
                let host = self.new_data_cluster(m, guest_cluster)?;
                if self.write_into_fresh(m, host, in_off, data)? {
                    table.set_entry(idx, host | OFLAG_COPIED);
                    self.store_l2(m, l2_off, table);
                    return Ok(());
                }
                // not past the end of the file: write the whole cluster
                let mut buf = vec![0u8; cs];
                buf[in_off..in_off + data.len()].copy_from_slice(data);
                self.write_data(m, host, &buf)?;
                table.set_entry(idx, host | OFLAG_COPIED);
                self.store_l2(m, l2_off, table);
                return Ok(());
            }
            let mut buf = if in_off == 0 && data.len() == cs {
                Vec::new()
            } else {
                self.cluster_content(m, guest_cluster, entry, 0, below)?
            };
            if buf.is_empty() {
                buf = data.to_vec();
            } else {
                buf[in_off..in_off + data.len()].copy_from_slice(data);
            }
            let reuse = ty == SubclusterType::ZeroAlloc && owned;
            let host = if reuse {
                let h = self.host_of(entry, guest_cluster);
                if !self.header.has_data_file() {
                    self.check_overlap(m, h)?;
                }
                h
            } else {
                self.new_data_cluster(m, guest_cluster)?
            };
            self.write_data(m, host, &buf)?;
            table.set_entry(idx, host | OFLAG_COPIED);
            self.store_l2(m, l2_off, table);
            // the old cluster is released only once the table no longer names it
            if !reuse && (has_host || compressed) {
                self.release_entry(m, entry);
            }
            return Ok(());
        }

        // extended L2: subclusters
        let sc = cs / 32;
        let first_sc = in_off / sc;
        let last_sc = (in_off + data.len() - 1) / sc;
        let mut release = None;
        let (host, mut new_bitmap) = if owned {
            let h = self.host_of(entry, guest_cluster);
            if !self.header.has_data_file() {
                self.check_overlap(m, h)?;
            }
            (h, bitmap)
        } else if has_host || compressed {
            // shared or compressed: move every allocated subcluster to a new cluster
            let content = self.cluster_content(m, guest_cluster, entry, bitmap, below)?;
            let h = self.new_data_cluster(m, guest_cluster)?;
            let bm = if compressed {
                L2_BITMAP_ALL_ALLOC
            } else {
                bitmap
            };
            self.write_data(m, h, &content)?;
            // released once the table names the new cluster (below)
            release = Some(entry);
            (h, bm)
        } else {
            (self.new_data_cluster(m, guest_cluster)?, bitmap)
        };
        for s in first_sc..=last_sc {
            let lo = s * sc;
            let hi = lo + sc;
            let wlo = in_off.max(lo);
            let whi = (in_off + data.len()).min(hi);
            let src = &data[wlo - in_off..whi - in_off];
            let alloc_bit = 1u64 << s;
            let zero_bit = 1u64 << (32 + s);
            if new_bitmap & alloc_bit != 0 || (wlo == lo && whi == hi) {
                self.write_data(m, host + wlo as u64, src)?;
            } else {
                // complete the subcluster from what it reads as now
                let mut sub = vec![0u8; sc];
                if new_bitmap & zero_bit == 0 {
                    below.read_below(guest_cluster + lo as u64, &mut sub)?;
                }
                sub[wlo - lo..whi - lo].copy_from_slice(src);
                self.write_data(m, host + lo as u64, &sub)?;
            }
            new_bitmap = (new_bitmap | alloc_bit) & !zero_bit;
        }
        table.set(idx, host | OFLAG_COPIED, new_bitmap);
        self.store_l2(m, l2_off, table);
        if let Some(old) = release {
            self.release_entry(m, old);
        }
        Ok(())
    }

    /// Write-zeroes or discard over whole clusters `[first, first + n)` of one L2 table.
    fn zero_clusters(
        &self,
        m: &mut Meta,
        guest: u64,
        n: u64,
        how: ClearMode,
        below: &dyn CowSource,
    ) -> Result<()> {
        let cs = self.cs();
        let (_, l2_off, mut table) = match how {
            // discarding creates a table only to hide a backing file (zero clusters, v3)
            ClearMode::Discard
                if l2_for(self, m, guest)?.is_none()
                    && !(below.has_backing() && self.header.version >= 3) =>
            {
                return Ok(())
            }
            _ => self.l2_for_write(m, guest)?,
        };
        let ext = self.header.extended_l2();
        let v3 = self.header.version >= 3;
        let mut released = Vec::new();
        for k in 0..n {
            let g = guest + k * cs;
            let idx = ((g / cs) % self.header.l2_entries()) as usize;
            let (entry, bitmap) = table.get(idx);
            let host_off = entry & L2E_OFFSET_MASK;
            let compressed = entry & super::spec::entries::OFLAG_COMPRESSED != 0;
            let has_host = !compressed
                && (host_off != 0 || (self.header.has_data_file() && entry & OFLAG_COPIED != 0));
            let allocated =
                compressed || has_host || (!ext && entry & OFLAG_ZERO != 0) || (ext && bitmap != 0);
            let owned = has_host && entry & OFLAG_COPIED != 0;
            let keep = matches!(how, ClearMode::Zero(ZeroMode::KeepAllocated)) && owned;
            let (ne, nb) = match how {
                ClearMode::Discard => {
                    if !allocated && !below.has_backing() {
                        continue;
                    }
                    if !allocated && below.has_backing() && !v3 {
                        continue;
                    }
                    if ext {
                        (0, L2_BITMAP_ALL_ZEROES)
                    } else if v3 {
                        (OFLAG_ZERO, 0)
                    } else {
                        (0, 0)
                    }
                }
                ClearMode::Zero(_) => {
                    if ext {
                        if keep {
                            (
                                entry & (L2E_OFFSET_MASK | OFLAG_COPIED),
                                L2_BITMAP_ALL_ZEROES,
                            )
                        } else {
                            (0, L2_BITMAP_ALL_ZEROES)
                        }
                    } else if v3 {
                        if keep {
                            ((entry & (L2E_OFFSET_MASK | OFLAG_COPIED)) | OFLAG_ZERO, 0)
                        } else {
                            (OFLAG_ZERO, 0)
                        }
                    } else if !below.has_backing() {
                        if keep {
                            // v2 without zero flag: zero the data in place
                            let host = self.host_of(entry, g);
                            self.check_overlap(m, host)?;
                            let zeros = vec![0u8; cs as usize];
                            self.write_data(m, host, &zeros)?;
                            continue;
                        }
                        (0, 0)
                    } else {
                        unreachable_v2()?
                    }
                }
            };
            if (has_host || compressed) && !keep {
                released.push(entry);
            }
            table.set(idx, ne, nb);
        }
        self.store_l2(m, l2_off, table);
        // only once the table no longer names them (an error above left them referenced)
        for e in released {
            self.release_entry(m, e);
        }
        Ok(())
    }

    /// Flush the metadata when too many tables are dirty or too many decrements pending
    /// (`MAX_DIRTY_TABLES`).
    fn maybe_flush(&self, m: &mut Meta) -> Result<()> {
        if m.dirty_l2.len() + m.dirty_refblocks.len() > MAX_DIRTY_TABLES
            || m.pending_decrements.len() > 65536
        {
            self.flush_tables(m, Barrier::NotHeld)?;
        }
        Ok(())
    }

    // ---- flush -------------------------------------------------------------------------------

    /// The whole ordered metadata flush (module doc, steps 1-4). Step 4 (making freed clusters
    /// reusable) needs every read and in-place write in flight drained: with
    /// `Barrier::NotHeld` it is done only if `io_barrier` can be taken without waiting (the
    /// caller holds the metadata lock, which those requests may be waiting for), else the
    /// decrements stay pending for a later flush.
    pub(crate) fn flush_tables(&self, m: &mut Meta, barrier: Barrier) -> Result<()> {
        let tables_dirty = !m.dirty_l2.is_empty() || !m.l1_dirty.is_empty();
        if tables_dirty && m.dirty_refblocks.is_empty() && !m.reftable_dirty {
            // guest data before the tables that point at it
            self.file
                .sync()
                .map_err(io_err("Could not flush guest data"))?;
        }
        // (flush_refcounts syncs data and refcount blocks together)
        self.flush_refcounts(m)?;
        if !m.dirty_l2.is_empty() {
            let tables: Vec<(u64, Arc<L2Table>)> =
                m.dirty_l2.iter().map(|(k, v)| (*k, v.clone())).collect();
            for (off, t) in &tables {
                t.store(&*self.file, *off)
                    .map_err(io_err(format!("Could not write L2 table at {off:#x}")))?;
                m.file_len = m.file_len.max(off + t.byte_len());
            }
            // L2 tables before the L1 entries that point at them
            self.file
                .sync()
                .map_err(io_err("Could not flush L2 tables"))?;
            for (off, t) in tables {
                self.l2_cache.insert(off, t);
                m.dirty_l2.remove(&off);
            }
        }
        if !m.l1_dirty.is_empty() {
            for &i in &m.l1_dirty {
                self.file
                    .write_at(&m.l1.encode_entry(i), m.l1_offset + 8 * i as u64)
                    .map_err(io_err("Could not write the L1 table"))?;
            }
            self.file
                .sync()
                .map_err(io_err("Could not flush the L1 table"))?;
            m.l1_dirty.clear();
        }
        if !m.pending_decrements.is_empty() {
            let _drained = match barrier {
                Barrier::Held => None,
                Barrier::NotHeld => match self.io_barrier.try_write() {
                    Ok(g) => Some(g),
                    Err(std::sync::TryLockError::Poisoned(e)) => Some(e.into_inner()),
                    Err(std::sync::TryLockError::WouldBlock) => return Ok(()),
                },
            };
            // unpinned readers (the data plane's ring reads) learn that a cluster they mapped
            // may have changed owner
            self.reuse_epoch.fetch_add(1, Ordering::SeqCst);
            let dec = std::mem::take(&mut m.pending_decrements);
            for (i, c) in dec.iter().enumerate() {
                if let Err(e) = self.adjust_refcount(m, *c, -1) {
                    m.pending_decrements.extend_from_slice(&dec[i + 1..]);
                    return Err(e);
                }
                if self.refcount_in(m, *c).unwrap_or(1) == 0 {
                    if let Some(s) = m.metadata.as_mut() {
                        s.remove(*c);
                    }
                }
            }
            self.flush_refcounts(m)?;
        }
        Ok(())
    }
}

/// Whether the caller of `flush_tables` holds `io_barrier` exclusively.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Barrier {
    Held,
    NotHeld,
}

enum ClearMode {
    Zero(ZeroMode),
    Discard,
}

fn unreachable_v2() -> Result<(u64, u64)> {
    Err(Error::new(
        ErrorKind::Unsupported,
        "zero clusters need qcow2 version 3",
    ))
}

/// Guest write.
pub(crate) fn write(q: &Qcow2, off: u64, buf: &[u8], below: &dyn CowSource) -> Result<()> {
    if write_in_place(q, off, buf)? == InPlace::Done {
        return Ok(());
    }
    let cs = q.cs();
    let mut m = q.meta_write();
    q.prepare(&mut m)?;
    check_range(&m, off, buf.len() as u64)?;
    q.mark_bitmaps(off, buf.len() as u64);
    let mut done = 0usize;
    while done < buf.len() {
        let pos = off + done as u64;
        let gc = pos & !(cs - 1);
        let in_off = (pos - gc) as usize;
        let n = (cs as usize - in_off).min(buf.len() - done);
        q.write_in_cluster(&mut m, gc, in_off, &buf[done..done + n], below)?;
        done += n;
        q.maybe_flush(&mut m)?;
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum InPlace {
    Done,
    /// Some cluster needs allocation, COW or a check: nothing was written.
    NotApplicable,
}

/// The write fast path: when every cluster the write touches is a normal data cluster this image
/// owns alone (COPIED, in an owned L2 table), the write changes no metadata. Map under the read
/// lock, then write the data without any metadata lock, so writes to allocated clusters run
/// concurrently with each other and with reads. The `io_barrier` pin taken first keeps a
/// cluster that a concurrent discard frees from being reused before this write has landed
/// (module doc, step 4). Everything unusual (extended L2, compressed or zero clusters, shared
/// clusters, writes that would touch metadata or grow the file, the first write of an open)
/// takes the locked path, which also reports the errors.
fn write_in_place(q: &Qcow2, off: u64, buf: &[u8]) -> Result<InPlace> {
    if q.access != Access::ReadWrite || q.header.extended_l2() || buf.is_empty() {
        return Ok(InPlace::NotApplicable);
    }
    let cs = q.cs();
    let _pin = q.io_barrier.read().unwrap_or_else(|e| e.into_inner());
    let mut segs: Vec<(u64, std::ops::Range<usize>)> = Vec::with_capacity(2);
    {
        let m = q.meta_read();
        if !m.prepared || m.corrupt || off.checked_add(buf.len() as u64).is_none_or(|e| e > m.size)
        {
            return Ok(InPlace::NotApplicable);
        }
        let data_file = q.header.has_data_file();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = off + done as u64;
            let gc = pos & !(cs - 1);
            let in_off = pos - gc;
            let n = ((cs - in_off) as usize).min(buf.len() - done);
            let l1_idx = (gc / q.header.l2_coverage()) as usize;
            if m.l1.get(l1_idx).is_none_or(|e| e & OFLAG_COPIED == 0) {
                return Ok(InPlace::NotApplicable);
            }
            let Some((_, table)) = l2_for(q, &m, gc)? else {
                return Ok(InPlace::NotApplicable);
            };
            let idx = ((gc / cs) % q.header.l2_entries()) as usize;
            let entry = table.entry(idx);
            if q.layout.classify(entry, 0, 0) != SubclusterType::Normal || entry & OFLAG_COPIED == 0
            {
                return Ok(InPlace::NotApplicable);
            }
            let host = q.host_of(entry, gc);
            if !data_file
                && (host & (cs - 1) != 0
                    || host + cs > m.file_len
                    || m.metadata.as_ref().is_none_or(|s| s.contains(host / cs)))
            {
                return Ok(InPlace::NotApplicable);
            }
            match segs.last_mut() {
                Some((h, r)) if *h + r.len() as u64 == host + in_off => r.end += n,
                _ => segs.push((host + in_off, done..done + n)),
            }
            done += n;
        }
    }
    // enabled bitmaps record the write before it happens (as on the locked path)
    q.mark_bitmaps(off, buf.len() as u64);
    let st = q.data_st()?;
    for (host, r) in segs {
        st.write_at(&buf[r], host).map_err(io_err(format!(
            "Could not write guest data at host offset {host:#x}"
        )))?;
    }
    Ok(InPlace::Done)
}

fn check_range(m: &Meta, off: u64, len: u64) -> Result<()> {
    match off.checked_add(len) {
        Some(end) if end <= m.size => Ok(()),
        _ => Err(Error::new(
            ErrorKind::OutOfRange,
            format!(
                "write at {off:#x}+{len:#x} beyond the end of the image ({:#x})",
                m.size
            ),
        )),
    }
}

/// Whether a whole guest cluster already reads as zeros without looking below.
fn cluster_reads_zero(q: &Qcow2, m: &Meta, gc: u64, below: &dyn CowSource) -> Result<bool> {
    let run = super::tables::map_in(q, m, gc, q.cs().min(m.size - gc), false)?;
    Ok(match run.mapping {
        crate::block::Mapping::Zero { .. } => run.len >= q.cs().min(m.size - gc),
        crate::block::Mapping::Backing { .. } => {
            !below.has_backing() && run.len >= q.cs().min(m.size - gc)
        }
        _ => false,
    })
}

/// Make `[off, off+len)` read as zeros.
pub(crate) fn write_zeroes(
    q: &Qcow2,
    off: u64,
    len: u64,
    mode: ZeroMode,
    below: &dyn CowSource,
) -> Result<()> {
    let cs = q.cs();
    let mut m = q.meta_write();
    q.prepare(&mut m)?;
    check_range(&m, off, len)?;
    q.mark_bitmaps(off, len);
    let end = off + len;
    let raw_data_file = q.header.data_file_raw();
    let v2_backed = q.header.version < 3 && below.has_backing();
    let mut pos = off;
    while pos < end {
        let gc = pos & !(cs - 1);
        let cluster_end = (gc + cs).min(m.size);
        let whole = pos == gc && end >= cluster_end;
        if whole && !raw_data_file && !v2_backed {
            // whole clusters up to the end of this L2 table (or of the request)
            let cov = q.header.l2_coverage();
            let table_end = (gc / cov + 1) * cov;
            let mut n = ((end.min(table_end) - gc) / cs).max(1);
            if gc + n * cs > end && gc + n * cs > m.size {
                // the image's partial last cluster counts as whole
                n = n.max(1);
            }
            while n > 0 && gc + n * cs > end && gc + n * cs <= m.size {
                n -= 1;
            }
            if n > 0 {
                q.zero_clusters(&mut m, gc, n, ClearMode::Zero(mode), below)?;
                pos = (gc + n * cs).min(end);
                q.maybe_flush(&mut m)?;
                continue;
            }
        }
        let piece_end = cluster_end.min(end);
        if !raw_data_file && cluster_reads_zero(q, &m, gc, below)? {
            pos = piece_end;
            continue;
        }
        if q.header.extended_l2() && !raw_data_file && subcluster_aligned(q, &m, pos, piece_end) {
            // whole subclusters: zero flags in the bitmap, no data written
            if q.zero_subclusters(&mut m, gc, pos, piece_end)? {
                pos = piece_end;
                q.maybe_flush(&mut m)?;
                continue;
            }
        }
        let zeros = vec![0u8; (piece_end - pos) as usize];
        q.write_in_cluster(&mut m, gc, (pos - gc) as usize, &zeros, below)?;
        pos = piece_end;
        q.maybe_flush(&mut m)?;
    }
    Ok(())
}

/// Whether `[from, to)` covers whole subclusters (the image's partial last one counts as whole).
fn subcluster_aligned(q: &Qcow2, m: &Meta, from: u64, to: u64) -> bool {
    let sc = q.cs() / 32;
    from.is_multiple_of(sc) && (to.is_multiple_of(sc) || to == m.size)
}

/// Whether write-zeroes of `[off, off+len)` changes metadata only (NBD's FAST_ZERO): whole
/// clusters (v3), or whole subclusters of clusters that are not compressed (extended L2).
pub(crate) fn zero_is_fast(q: &Qcow2, off: u64, len: u64) -> Result<bool> {
    if q.header.version < 3 || q.header.data_file_raw() {
        return Ok(false);
    }
    let cs = q.cs();
    let m = q.meta_read();
    let end = match off.checked_add(len) {
        Some(e) if e <= m.size => e,
        _ => return Ok(false),
    };
    let whole = |a: u64, b: u64| a.is_multiple_of(cs) && (b.is_multiple_of(cs) || b == m.size);
    if whole(off, end) {
        return Ok(true);
    }
    if !q.header.extended_l2() || !subcluster_aligned(q, &m, off, end) {
        return Ok(false);
    }
    // the partial clusters at either end are zeroed through their bitmaps: not possible for a
    // compressed cluster (its data would have to be rewritten)
    for gc in [off & !(cs - 1), (end - 1) & !(cs - 1)] {
        if let Some((_, table)) = l2_for(q, &m, gc)? {
            let idx = ((gc / cs) % q.header.l2_entries()) as usize;
            if table.entry(idx) & super::spec::entries::OFLAG_COMPRESSED != 0 {
                return Ok(false);
            }
        }
    }
    Ok(true)
}

impl Qcow2 {
    /// Mark the subclusters covering `[from, to)` (inside the cluster at `gc`) as zero in the
    /// extended L2 bitmap. False (nothing changed) when the cluster is compressed.
    fn zero_subclusters(&self, m: &mut Meta, gc: u64, from: u64, to: u64) -> Result<bool> {
        let cs = self.cs();
        let sc = cs / 32;
        let idx = ((gc / cs) % self.header.l2_entries()) as usize;
        if let Some((_, t)) = l2_for(self, m, gc)? {
            if t.entry(idx) & super::spec::entries::OFLAG_COMPRESSED != 0 {
                return Ok(false);
            }
        }
        let (_, l2_off, mut table) = self.l2_for_write(m, gc)?;
        let first = (from - gc) / sc;
        let last = ((to - gc).div_ceil(sc)).min(32) - 1;
        let mut bm = table.bitmap(idx);
        for s in first..=last {
            bm = (bm & !(1u64 << s)) | (1u64 << (32 + s));
        }
        table.set_bitmap(idx, bm);
        self.store_l2(m, l2_off, table);
        Ok(true)
    }
}

/// Release whole clusters of `[off, off+len)`; partial clusters are left alone.
pub(crate) fn discard(q: &Qcow2, off: u64, len: u64, below: &dyn CowSource) -> Result<()> {
    let cs = q.cs();
    let mut m = q.meta_write();
    q.prepare(&mut m)?;
    check_range(&m, off, len)?;
    q.mark_bitmaps(off, len);
    if q.header.data_file_raw() {
        return Ok(());
    }
    let size = m.size;
    let first = off.div_ceil(cs) * cs;
    // the partial last cluster of the image counts as whole when the range reaches the end
    let end = if off + len == size {
        size.div_ceil(cs) * cs
    } else {
        (off + len) / cs * cs
    };
    let mut pos = first;
    let cov = q.header.l2_coverage();
    while pos < end {
        let table_end = (pos / cov + 1) * cov;
        let n = (end.min(table_end) - pos) / cs;
        q.zero_clusters(&mut m, pos, n, ClearMode::Discard, below)?;
        pos += n * cs;
        q.maybe_flush(&mut m)?;
    }
    Ok(())
}

/// Make everything written so far durable, in the order of the module doc.
pub(crate) fn flush(q: &Qcow2) -> Result<()> {
    if q.access != Access::ReadWrite {
        return Ok(());
    }
    // readers in flight must be done before freed clusters become reusable
    let _barrier = q.io_barrier.write().unwrap_or_else(|e| e.into_inner());
    let mut m = q.meta_write();
    if m.is_dirty() {
        q.flush_tables(&mut m, Barrier::Held)?;
    } else {
        q.file.sync().map_err(io_err("Could not flush the image"))?;
        if q.header.has_data_file() {
            q.data_st()?
                .sync()
                .map_err(io_err("Could not flush the data file"))?;
        }
    }
    Ok(())
}

/// Grow or shrink the guest size.
pub(crate) fn resize(q: &Qcow2, new_size: u64, below: &dyn CowSource) -> Result<()> {
    let cs = q.cs();
    {
        let mut m = q.meta_write();
        q.prepare(&mut m)?;
        if new_size < m.size {
            // release clusters past the new end (whole clusters only)
            let first = new_size.div_ceil(cs) * cs;
            let old_end = m.size.div_ceil(cs) * cs;
            let cov = q.header.l2_coverage();
            let mut pos = first;
            while pos < old_end {
                let table_end = (pos / cov + 1) * cov;
                let n = (old_end.min(table_end) - pos) / cs;
                q.zero_clusters_free(&mut m, pos, n)?;
                pos += n * cs;
            }
        }
        let needed = {
            let shift = q.header.cluster_bits as u64
                + (q.header.cluster_bits as u64 - q.header.l2_entry_size().trailing_zeros() as u64);
            new_size.div_ceil(1u64 << shift)
        };
        if needed as usize > m.l1.len() {
            q.grow_l1(&mut m, needed as usize)?;
        }
        q.flush_tables(&mut m, Barrier::NotHeld)?;
        q.write_header_field(HeaderField::Size(new_size))?;
        m.size = new_size;
        q.size.store(new_size, Ordering::Release);
    }
    let _ = below;
    Ok(())
}

impl Qcow2 {
    /// Unmap whole clusters for good (shrinking): entries become unallocated.
    fn zero_clusters_free(&self, m: &mut Meta, guest: u64, n: u64) -> Result<()> {
        let cs = self.cs();
        let Some((_, _)) = l2_for(self, m, guest)? else {
            return Ok(());
        };
        let (_, l2_off, mut table) = self.l2_for_write(m, guest)?;
        let mut released = Vec::new();
        for k in 0..n {
            let idx = (((guest + k * cs) / cs) % self.header.l2_entries()) as usize;
            let e = table.entry(idx);
            let compressed = e & super::spec::entries::OFLAG_COMPRESSED != 0;
            if compressed || e & L2E_OFFSET_MASK != 0 {
                released.push(e);
            }
            table.set(idx, 0, 0);
        }
        self.store_l2(m, l2_off, table);
        for e in released {
            self.release_entry(m, e);
        }
        Ok(())
    }

    /// Move the L1 table to a bigger one (written and synced before the header points at it).
    fn grow_l1(&self, m: &mut Meta, entries: usize) -> Result<()> {
        let cs = self.cs();
        if entries as u64 * 8 > super::spec::limits::MAX_L1_SIZE {
            return Err(Error::new(ErrorKind::Unsupported, "Image is too big"));
        }
        self.flush_tables(m, Barrier::NotHeld)?;
        let clusters = (entries as u64 * 8).div_ceil(cs);
        let new_off = self.alloc_clusters(m, clusters)?;
        let mut l1 = m.l1.clone();
        l1.resize(entries);
        self.flush_refcounts(m)?;
        let mut raw = l1.encode();
        raw.resize((clusters * cs) as usize, 0);
        self.file
            .write_at(&raw, new_off)
            .map_err(io_err("Could not write the new L1 table"))?;
        self.file
            .sync()
            .map_err(io_err("Could not flush the new L1 table"))?;
        self.write_header_field(HeaderField::L1Table {
            size: entries as u32,
            offset: new_off,
        })?;
        let old_off = m.l1_offset;
        let old_clusters = (m.l1.len() as u64 * 8).div_ceil(cs);
        m.l1 = l1;
        m.l1_offset = new_off;
        m.file_len = m.file_len.max(new_off + clusters * cs);
        if let Some(s) = m.metadata.as_mut() {
            for c in 0..clusters {
                s.insert(new_off / cs + c);
            }
        }
        if !m.l1.is_empty() && old_clusters > 0 && old_off != 0 {
            for c in 0..old_clusters {
                m.pending_decrements.push(old_off / cs + c);
            }
        }
        Ok(())
    }

    /// Store a compressed cluster at guest cluster `guest` (`data` is one whole cluster).
    /// Falls back to a normal write when the data does not compress.
    pub fn write_compressed(&self, guest: u64, data: &[u8], below: &dyn CowSource) -> Result<()> {
        let cs = self.cs();
        if !guest.is_multiple_of(cs) || data.len() as u64 != cs.min(self.meta_read().size - guest) {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                "compressed writes take whole clusters",
            ));
        }
        if self.header.has_data_file() {
            return write(self, guest, data, below);
        }
        let mut full = data.to_vec();
        full.resize(cs as usize, 0);
        let Some(c) = compress::compress(self.header.compression_type, &full)? else {
            return write(self, guest, data, below);
        };
        let mut m = self.meta_write();
        self.prepare(&mut m)?;
        self.mark_bitmaps(guest, data.len() as u64);
        let (_, l2_off, mut table) = self.l2_for_write(&mut m, guest)?;
        let idx = ((guest / cs) % self.header.l2_entries()) as usize;
        let old = table.entry(idx);
        let nclusters = (c.len() as u64).div_ceil(cs);
        let host = self.alloc_clusters(&mut m, nclusters)?;
        self.write_data(&mut m, host, &c)?;
        let sectors = (c.len() as u64).div_ceil(512);
        let csize_shift = 62 - (self.header.cluster_bits - 8);
        let entry = super::spec::entries::OFLAG_COMPRESSED | ((sectors - 1) << csize_shift) | host;
        table.set(idx, entry, 0);
        self.store_l2(&mut m, l2_off, table);
        if old & super::spec::entries::OFLAG_COMPRESSED != 0 || old & L2E_OFFSET_MASK != 0 {
            self.release_entry(&mut m, old);
        }
        self.maybe_flush(&mut m)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::fresh;
    use crate::block::{BlockDevice, Mapping, NoBacking, ZeroMode};

    /// Unaligned writes across cluster boundaries read back; the bytes around them stay
    /// zero.
    #[test]
    fn unaligned_writes_read_back() {
        let (q, chain) = fresh(1 << 20, 4096);
        let mut model = vec![0u8; 1 << 20];
        for (i, (off, len)) in [(100u64, 9000usize), (4095, 2), (65530, 70000), (1000, 1)]
            .into_iter()
            .enumerate()
        {
            let data: Vec<u8> = (0..len).map(|j| (i * 37 + j) as u8 | 1).collect();
            q.write(off, &data, &NoBacking).unwrap();
            model[off as usize..off as usize + len].copy_from_slice(&data);
        }
        let mut got = vec![0u8; 1 << 20];
        chain.read(0, &mut got).unwrap();
        assert!(got == model);
    }

    /// Rewriting an allocated cluster writes in place; a discard frees the host cluster once
    /// the tables are durable; resizing up reads zeros in the new range.
    #[test]
    fn rewrite_in_place_discard_frees_and_resize_grows() {
        let (q, chain) = fresh(1 << 20, 65536);
        q.write(0, &[1u8; 65536], &NoBacking).unwrap();
        let host = |q: &super::Qcow2| match crate::qcow2::tables::map(q, 0, 65536).unwrap().mapping
        {
            Mapping::Data { host, .. } => host,
            m => panic!("{m:?}"),
        };
        let h = host(&q);
        q.write(512, &[2u8; 512], &NoBacking).unwrap();
        assert_eq!(host(&q), h, "a rewrite moved the cluster");
        q.flush().unwrap();
        q.discard(0, 65536, &NoBacking).unwrap();
        q.flush().unwrap();
        assert_eq!(q.refcount(h / 65536).unwrap(), 0);
        let mut b = vec![9u8; 65536];
        chain.read(0, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 0));
        q.resize(2 << 20).unwrap();
        assert_eq!(q.size(), 2 << 20);
        let chain =
            crate::block::Chain::new(vec![q.clone() as std::sync::Arc<dyn BlockDevice>]).unwrap();
        let mut b = vec![9u8; 1 << 20];
        chain.read(1 << 20, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 0));
        q.write_zeroes(1 << 20, 65536, ZeroMode::KeepAllocated, &NoBacking)
            .unwrap();
        q.flush().unwrap();
    }
}
