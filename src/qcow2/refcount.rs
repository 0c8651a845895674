//! Refcount table and refcount blocks (read side).

use super::spec::entries::REFT_OFFSET_MASK;
use super::spec::refblock;
use super::Qcow2;
use crate::error::{Error, Result};
use crate::io::read_exact_or_zero;

impl Qcow2 {
    /// The refcount table (a copy; at most 8 MiB by the header checks).
    pub fn reftable(&self) -> Result<Vec<u64>> {
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
        let bytes = u64::from(m.reftable_clusters) * self.header.cluster_size();
        let mut raw = vec![0u8; bytes as usize];
        read_exact_or_zero(&**self.file(), &mut raw, m.reftable_offset)
            .map_err(|e| Error::io("Could not read the refcount table", e))?;
        m.reftable = Some(
            raw.chunks_exact(8)
                .map(|c| {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(c);
                    u64::from_be_bytes(a)
                })
                .collect(),
        );
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
        let t = m.reftable.as_deref().unwrap_or(&[]);
        let Some(&rte) = usize::try_from(index / per_block)
            .ok()
            .and_then(|i| t.get(i))
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
        q.write(1 << 20, &[7u8; 4096], &NoBacking, false).unwrap();
        let run = crate::qcow2::tables::map(&q, 1 << 20, 4096).unwrap();
        let Mapping::Data { host, .. } = run.mapping else {
            panic!("not data: {:?}", run.mapping)
        };
        let c = host / 65536;
        assert_eq!(q.refcount(c).unwrap(), 1);
        // a second allocation lands elsewhere
        q.write(2 << 20, &[8u8; 4096], &NoBacking, false).unwrap();
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
