//! Refcount table and refcount blocks: reading them, and the write side (changes, new
//! blocks, table growth, cluster allocation, write-back) that `alloc.rs` and `bitmaps.rs` use.

use super::meta::Meta;
use super::spec::entries::REFT_OFFSET_MASK;
use super::spec::header::HeaderField;
use super::spec::refblock;
use super::spec::table::RefTable;
use super::{io_err, Qcow2};
use crate::error::{Error, ErrorKind, Result};
use crate::io::read_exact_or_zero;
use crate::io::PastEof;
use std::collections::HashMap;
use std::sync::Arc;

impl Qcow2 {
    /// The refcount table (a copy; at most 8 MiB by the header checks).
    pub fn reftable(&self) -> Result<RefTable> {
        {
            let m = self.meta_read();
            if let Some(t) = &m.reftable {
                return Ok(t.clone());
            }
        }
        let mut m = self.meta_write();
        self.ensure_reftable(&mut m)?;
        Ok(m.reftable.clone().unwrap_or_default())
    }

    /// Load the refcount table into `m` if it is not there yet.
    pub(crate) fn ensure_reftable(&self, m: &mut super::meta::Meta) -> Result<()> {
        if m.reftable.is_some() {
            return Ok(());
        }
        let entries = u64::from(m.reftable_clusters) * self.header.cluster_size() / 8;
        let table = RefTable::load(&**self.file(), m.reftable_offset, entries, PastEof::Zeros)
            .map_err(|e| Error::io("Could not read the refcount table", e))?;
        m.reftable = Some(table);
        Ok(())
    }

    /// Refcount of host cluster `index`.
    pub fn refcount(&self, index: u64) -> Result<u64> {
        {
            let m = self.meta_read();
            if m.reftable.is_some() {
                return self.refcount_in(&m, index);
            }
        }
        let mut m = self.meta_write();
        self.ensure_reftable(&mut m)?;
        self.refcount_in(&m, index)
    }

    /// Entries per refcount block.
    pub(crate) fn refblock_entries(&self) -> u64 {
        self.header.cluster_size() * 8 / u64::from(self.header.refcount_bits())
    }

    /// The refcount block at `block_off`: the dirty copy if there is one, else cached.
    pub(crate) fn refblock(
        &self,
        m: &super::meta::Meta,
        block_off: u64,
    ) -> Result<std::sync::Arc<Vec<u8>>> {
        if let Some(b) = m.dirty_refblocks.get(&block_off) {
            return Ok(b.clone());
        }
        let h = &self.header;
        self.refblock_cache.get_or_load(block_off, || {
            let mut raw = vec![0u8; h.cluster_size() as usize];
            read_exact_or_zero(&**self.file(), &mut raw, block_off).map_err(|e| {
                Error::io(
                    format!("Could not read refcount block at {block_off:#x}"),
                    e,
                )
            })?;
            Ok::<_, Error>(raw)
        })
    }

    /// Refcount of host cluster `index` with the metadata lock held (reftable loaded).
    pub(crate) fn refcount_in(&self, m: &super::meta::Meta, index: u64) -> Result<u64> {
        let h = &self.header;
        let per_block = self.refblock_entries();
        let Some(rte) = usize::try_from(index / per_block)
            .ok()
            .and_then(|i| m.reftable.as_ref()?.get(i))
        else {
            return Ok(0);
        };
        let block_off = rte & REFT_OFFSET_MASK;
        if block_off == 0 {
            return Ok(0);
        }
        if block_off & (h.cluster_size() - 1) != 0 {
            return Err(Error::corrupt(format!(
                "Refblock offset {block_off:#x} unaligned (reftable index: {:#x})",
                index / per_block
            )));
        }
        // the dirty copy when a change is not on disk yet
        let block = self.refblock(m, block_off)?;
        refblock::get(&block, h.refcount_order, index % per_block)
            .ok_or_else(|| Error::corrupt("refcount index outside its block"))
    }
}

/// qcow2-refcount.c `qcow2_detect_metadata_preallocation`.
pub(crate) fn detect_metadata_preallocation(q: &Qcow2) -> Result<bool> {
    let cs = q.cluster_size();
    let file_length = q
        .file()
        .len()
        .map_err(|e| Error::io("Could not get file length", e))?;
    let file_length = crate::units::align_up(file_length, 512).unwrap_or(file_length);
    let real_allocation = q
        .file()
        .allocated_size()
        .map_err(|e| Error::io("Could not get allocated size", e))?;
    let real_clusters = real_allocation / cs;
    let threshold = (real_clusters * 10 / 9).max(real_clusters + 2);
    let end_cluster = file_length.div_ceil(cs);
    let mut count = 0u64;
    let mut i = 0u64;
    while i < end_cluster && count < threshold {
        count += u64::from(q.refcount(i)? != 0);
        i += 1;
    }
    Ok(count >= threshold)
}

/// The write side (QEMU's `qcow2-refcount.c`): refcount changes, refcount blocks and table
/// growth, cluster allocation, and writing the refcount structures back.
impl Qcow2 {
    /// Change the refcount of host cluster `idx` by `delta` (creating its refcount block when
    /// needed).
    pub(crate) fn adjust_refcount(&self, m: &mut Meta, idx: u64, delta: i64) -> Result<()> {
        let per = self.refblock_entries();
        let block_idx = idx / per;
        let block_off = self.ensure_refblock(m, block_idx)?;
        let mut block = (*self.refblock(m, block_off)?).clone();
        let order = self.header.refcount_order;
        let cur = refblock::get(&block, order, idx % per)
            .ok_or_else(|| Error::corrupt("refcount index outside its block"))?;
        let new = if delta >= 0 {
            cur.checked_add(delta as u64)
                .filter(|&v| v <= refblock::max_value(order))
                .ok_or_else(|| {
                    Error::new(
                        ErrorKind::Unsupported,
                        format!(
                            "refcount of cluster {idx} would overflow its {}-bit width",
                            1u32 << order
                        ),
                    )
                })?
        } else {
            match cur.checked_sub(delta.unsigned_abs()) {
                Some(v) => v,
                None => {
                    let why = format!("Refcount of cluster {idx} would drop below zero (is {cur})");
                    return Err(self.mark_corrupt(m, why));
                }
            }
        };
        refblock::set(&mut block, order, idx % per, new);
        m.dirty_refblocks.insert(block_off, Arc::new(block));
        if new == 0 && idx < m.free_hint {
            m.free_hint = idx;
        }
        Ok(())
    }

    /// Host offset of refcount block `block_idx`, allocating it (self-describing, inside the
    /// range it covers) when the table has none yet.
    fn ensure_refblock(&self, m: &mut Meta, block_idx: u64) -> Result<u64> {
        let cs = self.cs();
        let per = self.refblock_entries();
        let have = m
            .reftable
            .as_ref()
            .and_then(|t| t.get(block_idx as usize))
            .unwrap_or(0)
            & REFT_OFFSET_MASK;
        if have != 0 {
            if have & (cs - 1) != 0 {
                let why =
                    format!("Refblock offset {have:#x} unaligned (reftable index: {block_idx:#x})");
                return Err(self.mark_corrupt(m, why));
            }
            return Ok(have);
        }
        if block_idx as usize >= m.reftable.as_ref().map_or(0, |t| t.len()) {
            self.grow_reftable(m, block_idx)?;
            if Self::block_exists(m, block_idx) {
                return self.ensure_refblock(m, block_idx);
            }
        }
        // Every cluster this block covers has refcount 0, so its first cluster not used as
        // metadata is free: place the block there and let it count itself.
        let mut at = block_idx * per;
        while m.metadata.as_ref().is_some_and(|s| s.contains(at)) {
            at += 1;
        }
        let mut block = vec![0u8; cs as usize];
        refblock::set(&mut block, self.header.refcount_order, at % per, 1);
        let off = at * cs;
        m.dirty_refblocks.insert(off, Arc::new(block));
        if let Some(t) = m.reftable.as_mut() {
            t[block_idx as usize] = off;
        }
        m.reftable_dirty = true;
        if let Some(s) = m.metadata.as_mut() {
            s.insert(at);
        }
        Ok(off)
    }

    /// Replace the refcount table by a bigger one that has room for `block_idx`. The new table
    /// and the refcount blocks describing it are written and synced, then the header switches
    /// to it, then the old table is freed.
    fn grow_reftable(&self, m: &mut Meta, block_idx: u64) -> Result<()> {
        // make the current refcounts durable first so the new table copies a consistent state
        self.flush_refcounts(m)?;
        let cs = self.cs();
        let per = self.refblock_entries();
        let old: RefTable = m.reftable.clone().unwrap_or_default();
        let end_cluster = self.end_cluster(m)?;
        // new table + new blocks go at the end of the file; size them with a fixed point
        let mut table_clusters = (old.len() as u64 * 8).div_ceil(cs).max(1);
        let (new_len, nblocks) = loop {
            let table_start = end_cluster;
            let table_end = table_start + table_clusters;
            // blocks needed for everything up to the new metadata, placed after the table
            let mut nblocks = 0u64;
            let mut covered_end;
            loop {
                covered_end = table_end + nblocks;
                let need_blocks = covered_end.div_ceil(per).max(block_idx + 1);
                let missing = (0..need_blocks)
                    .filter(|&b| old.get(b as usize).unwrap_or(0) & REFT_OFFSET_MASK == 0)
                    .count() as u64;
                if missing <= nblocks {
                    break;
                }
                nblocks = missing;
            }
            let need_entries = (table_end + nblocks).div_ceil(per).max(block_idx + 1) + 1;
            let need_clusters = (need_entries * 8).div_ceil(cs);
            if need_clusters <= table_clusters {
                break (table_clusters * cs / 8, nblocks);
            }
            table_clusters = need_clusters;
        };
        if table_clusters * cs > super::spec::limits::MAX_REFTABLE_SIZE {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "the refcount table would exceed its 8 MiB limit",
            ));
        }
        let table_start = end_cluster;
        let mut table = old.clone();
        table.resize(new_len as usize);
        // place missing blocks after the table
        let mut next_block_cluster = table_start + table_clusters;
        let mut new_blocks: Vec<(u64, Vec<u8>)> = Vec::new();
        for (b, entry) in table.as_mut_slice().iter_mut().enumerate() {
            if *entry & REFT_OFFSET_MASK == 0
                && (b as u64) * per < table_start + table_clusters + nblocks
            {
                *entry = next_block_cluster * cs;
                new_blocks.push((next_block_cluster * cs, vec![0u8; cs as usize]));
                next_block_cluster += 1;
            }
        }
        // count the new table and new blocks in the blocks that cover them
        let order = self.header.refcount_order;
        let mut dirty_existing: HashMap<u64, Vec<u8>> = HashMap::new();
        for c in (table_start..table_start + table_clusters)
            .chain(table_start + table_clusters..next_block_cluster)
        {
            let b = c / per;
            let off = table[b as usize] & REFT_OFFSET_MASK;
            if let Some((_, blk)) = new_blocks.iter_mut().find(|(o, _)| *o == off) {
                refblock::set(blk, order, c % per, 1);
            } else {
                let blk = match dirty_existing.get_mut(&off) {
                    Some(b) => b,
                    None => {
                        let cur = (*self.refblock(m, off)?).clone();
                        dirty_existing.entry(off).or_insert(cur)
                    }
                };
                refblock::set(blk, order, c % per, 1);
            }
        }
        let file = &self.file;
        for (off, blk) in new_blocks.iter() {
            file.write_at(blk, *off)
                .map_err(io_err("Could not write a refcount block"))?;
        }
        for (off, blk) in dirty_existing.iter() {
            file.write_at(blk, *off)
                .map_err(io_err("Could not write a refcount block"))?;
        }
        table
            .store(&**file, table_start * cs)
            .map_err(io_err("Could not write the new refcount table"))?;
        file.sync()
            .map_err(io_err("Could not flush the new refcount table"))?;
        self.write_header_field(HeaderField::RefcountTable {
            offset: table_start * cs,
            clusters: table_clusters as u32,
        })?;
        // switch in memory
        for (off, blk) in new_blocks.into_iter().chain(dirty_existing) {
            self.refblock_cache.insert(off, Arc::new(blk));
            m.dirty_refblocks.remove(&off);
        }
        let old_off = m.reftable_offset;
        let old_clusters = u64::from(m.reftable_clusters);
        m.reftable = Some(table);
        m.reftable_offset = table_start * cs;
        m.reftable_clusters = table_clusters as u32;
        m.file_len = m.file_len.max(next_block_cluster * cs);
        if let Some(s) = m.metadata.as_mut() {
            for c in table_start..next_block_cluster {
                s.insert(c);
            }
            for c in 0..old_clusters {
                s.remove(old_off / cs + c);
            }
        }
        // the old table is unreferenced now: free it
        for c in 0..old_clusters {
            self.adjust_refcount(m, old_off / cs + c, -1)?;
        }
        m.reftable_dirty = false;
        Ok(())
    }

    /// First cluster index past everything allocated (refcounts or file length).
    fn end_cluster(&self, m: &Meta) -> Result<u64> {
        let cs = self.cs();
        let mut end = m.file_len.div_ceil(cs);
        let per = self.refblock_entries();
        if let Some(t) = &m.reftable {
            if let Some(last) = t.iter().rposition(|&e| e & REFT_OFFSET_MASK != 0) {
                let blk = self.refblock(m, t[last] & REFT_OFFSET_MASK)?;
                let order = self.header.refcount_order;
                for i in (0..per).rev() {
                    if refblock::get(&blk, order, i).unwrap_or(0) != 0 {
                        end = end.max(last as u64 * per + i + 1);
                        break;
                    }
                }
            }
        }
        for &off in m.dirty_refblocks.keys() {
            end = end.max(off / cs + 1);
        }
        Ok(end)
    }

    fn block_exists(m: &Meta, b: u64) -> bool {
        m.reftable
            .as_ref()
            .and_then(|t| t.get(b as usize))
            .is_some_and(|e| e & REFT_OFFSET_MASK != 0)
    }

    /// Whether host cluster `c` can be handed out.
    fn cluster_free(&self, m: &Meta, c: u64) -> Result<bool> {
        Ok(!m.metadata.as_ref().is_some_and(|s| s.contains(c)) && self.refcount_in(m, c)? == 0)
    }

    /// First cluster of `[from, to)` that cannot be handed out.
    fn first_used(&self, m: &Meta, from: u64, to: u64) -> Result<Option<u64>> {
        for c in from..to {
            if !self.cluster_free(m, c)? {
                return Ok(Some(c));
            }
        }
        Ok(None)
    }

    /// Allocate `n` contiguous clusters for metadata (kept out of reach of data writes).
    pub(crate) fn alloc_meta_clusters(&self, m: &mut Meta, n: u64) -> Result<u64> {
        let off = self.alloc_clusters(m, n)?;
        if let Some(s) = m.metadata.as_mut() {
            for c in 0..n {
                s.insert(off / self.cs() + c);
            }
        }
        Ok(off)
    }

    /// Allocate `n` contiguous free host clusters (refcount set to 1); returns the host offset.
    /// Refcount blocks missing for the run are created right after it (so a run may be longer
    /// than one block covers) and counted in whichever block covers them.
    pub(crate) fn alloc_clusters(&self, m: &mut Meta, n: u64) -> Result<u64> {
        // allocation decisions need the refcount table (and the metadata map)
        self.prepare(m)?;
        let cs = self.cs();
        let per = self.refblock_entries();
        let mut start = m.free_hint;
        'search: loop {
            if start.saturating_add(n).saturating_mul(cs) > (1u64 << 56) {
                return Err(Error::new(
                    ErrorKind::Io,
                    "image file would grow beyond 64 PiB",
                ));
            }
            if let Some(c) = self.first_used(m, start, start + n)? {
                start = c + 1;
                continue 'search;
            }
            // blocks missing for [start, start + n + k), k being their number (fixed point)
            let mut k = 0u64;
            let missing: Vec<u64> = loop {
                let last = (start + n + k - 1) / per;
                let miss: Vec<u64> = (start / per..=last)
                    .filter(|&b| !Self::block_exists(m, b))
                    .collect();
                if miss.len() as u64 == k {
                    break miss;
                }
                k = miss.len() as u64;
            };
            if let Some(c) = self.first_used(m, start + n, start + n + k)? {
                start = c + 1;
                continue 'search;
            }
            if let Some(&maxb) = missing.last() {
                if maxb as usize >= m.reftable.as_ref().map_or(0, |t| t.len()) {
                    self.grow_reftable(m, maxb)?;
                    continue 'search;
                }
            }
            let order = self.header.refcount_order;
            for (j, &b) in missing.iter().enumerate() {
                let at = start + n + j as u64;
                m.dirty_refblocks
                    .insert(at * cs, Arc::new(vec![0u8; cs as usize]));
                if let Some(t) = m.reftable.as_mut() {
                    t[b as usize] = at * cs;
                }
                m.reftable_dirty = true;
                if let Some(s) = m.metadata.as_mut() {
                    s.insert(at);
                }
            }
            // count the new blocks, then the run
            for j in 0..k {
                self.adjust_refcount(m, start + n + j, 1)?;
            }
            for i in 0..n {
                self.adjust_refcount(m, start + i, 1)?;
            }
            let _ = order;
            m.free_hint = start + n + k;
            return Ok(start * cs);
        }
    }

    /// Write refcount blocks and the refcount table (steps 1-2 of the flush order in
    /// `alloc.rs`).
    pub(crate) fn flush_refcounts(&self, m: &mut Meta) -> Result<()> {
        if self.header.has_data_file() {
            self.data_st()?
                .sync()
                .map_err(io_err("Could not flush the data file"))?;
        }
        if m.dirty_refblocks.is_empty() && !m.reftable_dirty {
            return Ok(());
        }
        let blocks: Vec<(u64, Arc<Vec<u8>>)> = m
            .dirty_refblocks
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .collect();
        for (off, b) in &blocks {
            self.file.write_at(b, *off).map_err(io_err(format!(
                "Could not write refcount block at {off:#x}"
            )))?;
            m.file_len = m.file_len.max(off + b.len() as u64);
        }
        self.file
            .sync()
            .map_err(io_err("Could not flush refcount blocks"))?;
        for (off, b) in blocks {
            self.refblock_cache.insert(off, b);
            m.dirty_refblocks.remove(&off);
        }
        if m.reftable_dirty {
            let t = m.reftable.as_ref().map(|t| t.encode()).unwrap_or_default();
            self.file
                .write_at(&t, m.reftable_offset)
                .map_err(io_err("Could not write the refcount table"))?;
            self.file
                .sync()
                .map_err(io_err("Could not flush the refcount table"))?;
            m.reftable_dirty = false;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::fresh;
    use crate::block::{BlockDevice, Mapping, NoBacking};

    /// A new image counts each of its metadata clusters once: header, refcount table and
    /// block, L1 table; nothing past them.
    #[test]
    fn a_fresh_image_counts_its_metadata_once() {
        let (q, _) = fresh(16 << 20, 65536);
        let cs = q.header.cluster_size();
        let mut meta = vec![
            0,
            q.header.refcount_table_offset / cs,
            q.header.l1_table_offset / cs,
        ];
        let t = q.reftable().unwrap();
        meta.push((t[0] & crate::qcow2::spec::entries::REFT_OFFSET_MASK) / cs);
        for &c in &meta {
            assert_eq!(q.refcount(c).unwrap(), 1, "cluster {c}");
        }
        let end = meta.iter().max().unwrap() + 1;
        for c in end..end + 16 {
            assert_eq!(q.refcount(c).unwrap(), 0, "cluster {c}");
        }
        assert!(!super::detect_metadata_preallocation(&q).unwrap());
    }

    /// A cluster allocated by a write counts at once, before any flush: the allocator's
    /// next search must not hand it out again (refcounts read through the dirty blocks).
    #[test]
    fn an_unflushed_allocation_counts_at_once() {
        let (q, _) = fresh(16 << 20, 65536);
        q.write(1 << 20, &[7u8; 4096], &NoBacking).unwrap();
        let run = crate::qcow2::tables::map(&q, 1 << 20, 4096).unwrap();
        let Mapping::Data { host, .. } = run.mapping else {
            panic!("not data: {:?}", run.mapping)
        };
        let c = host / 65536;
        assert_eq!(q.refcount(c).unwrap(), 1);
        // a second allocation lands elsewhere
        q.write(2 << 20, &[8u8; 4096], &NoBacking).unwrap();
        let run = crate::qcow2::tables::map(&q, 2 << 20, 4096).unwrap();
        let Mapping::Data { host: h2, .. } = run.mapping else {
            panic!("not data")
        };
        assert_ne!(h2 / 65536, c);
        q.flush().unwrap();
        assert_eq!(q.refcount(c).unwrap(), 1);
        assert_eq!(q.refcount(h2 / 65536).unwrap(), 1);
    }
}
