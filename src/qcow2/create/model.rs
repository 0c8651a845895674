//! The model of QEMU's allocator that `qemu-img create` runs (see the opening of
//! `create/mod.rs`): the free-cluster cursor, the self-describing refcount blocks, the retry
//! after a refcount block was placed, refcount table growth, L1/L2 tables, the host file
//! lengths, and the non-metadata writes QEMU makes, recorded in order.

use super::options::{CreateOptions, Preallocation};
use crate::error::{Error, ErrorKind, Result};
use crate::qcow2::spec::limits::{MAX_L1_SIZE, MAX_REFTABLE_SIZE};
use crate::qcow2::spec::table::{L1Table, RefTable};
use std::collections::BTreeMap;

/// L1/L2 entry flag: refcount is exactly one (qcow2 spec, "Cluster mapping").
pub(super) const OFLAG_COPIED: u64 = 1 << 63;
/// `BDRV_REQUEST_MAX_BYTES`: the block layer's largest single request.
pub(super) const REQUEST_MAX_BYTES: u64 = 0x7fff_fe00;

/// Which host file a recorded write goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Target {
    Image,
    Data,
}

/// A write QEMU makes that is not part of the final metadata, kept in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Op {
    Bytes {
        off: u64,
        data: Vec<u8>,
    },
    Zeros {
        target: Target,
        off: u64,
        len: u64,
    },
    Grow {
        target: Target,
        cur: u64,
        new_len: u64,
        mode: Preallocation,
    },
}

/// An allocation failure of the model: `Again` is QEMU's `-EAGAIN` (a refcount block was just
/// placed, search again); `Fail` ends the creation.
#[derive(Debug)]
pub(super) enum AllocErr {
    Again,
    Fail(Error),
}

impl From<Error> for AllocErr {
    fn from(e: Error) -> Self {
        AllocErr::Fail(e)
    }
}

pub(super) fn too_big(what: &str) -> Error {
    Error::new(
        ErrorKind::InvalidArgument,
        format!("{what}: File too large"),
    )
}

/// One mapped run of an L2 table: `count` entries from `index` map to `host`, `host + cs`, ...
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Run {
    pub(super) index: u64,
    pub(super) count: u64,
    pub(super) host: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(super) struct L2 {
    pub(super) offset: u64,
    pub(super) runs: Vec<Run>,
}

/// QEMU's `qcow2_refcount_metadata_size`: the refcount blocks and refcount table clusters
/// needed to count `clusters` clusters plus themselves, as `(blocks, table clusters)`.
/// `generous` adds room for the table to grow, as QEMU's `generous_increase`.
pub(crate) fn refcount_metadata(
    mut clusters: u64,
    cs: u64,
    order: u32,
    mut generous: bool,
) -> (u64, u64) {
    let per_table_cluster = cs / 8;
    let per_block = cs * 8 / (1u64 << order);
    let (mut table, mut blocks, mut n) = (0u64, 0u64, 0u64);
    loop {
        let last = n;
        blocks = (clusters + table + blocks).div_ceil(per_block);
        table = blocks.div_ceil(per_table_cluster);
        n = clusters + blocks + table;
        if n == last && generous {
            clusters += table.div_ceil(2);
            n = 0;
            generous = false;
            continue;
        }
        if n == last {
            return (blocks, table);
        }
    }
}

/// The refcount blocks of [`refcount_metadata`].
pub(super) fn refcount_blocks_needed(clusters: u64, cs: u64, order: u32, generous: bool) -> u64 {
    refcount_metadata(clusters, cs, order, generous).0
}

/// The allocator model: refcounts (0 or 1: creation never shares a cluster), the refcount
/// table, the free-cluster cursor, L1 and L2 tables, and the host file lengths.
pub(super) struct Alloc {
    pub(super) cluster_bits: u32,
    pub(super) cs: u64,
    pub(super) refcount_order: u32,
    /// log2 of the entries per refcount block.
    pub(super) rb_bits: u32,
    pub(super) l2_bits: u32,
    pub(super) used: Vec<u64>,
    pub(super) reftable: RefTable,
    pub(super) reftable_offset: u64,
    pub(super) free_index: u64,
    pub(super) l1: L1Table,
    pub(super) l1_offset: u64,
    pub(super) l2: BTreeMap<u64, L2>,
    pub(super) has_data_file: bool,
    pub(super) image_len: u64,
    pub(super) data_len: u64,
    pub(super) ops: Vec<Op>,
}

impl Alloc {
    pub(super) fn new(opts: &CreateOptions) -> Alloc {
        let cluster_bits = opts.cluster_size.trailing_zeros();
        let cs = opts.cluster_size;
        let refcount_order = opts.refcount_bits.trailing_zeros();
        let mut reftable = RefTable::zeroed((cs / 8) as usize);
        reftable[0] = 2 * cs;
        Alloc {
            cluster_bits,
            cs,
            refcount_order,
            rb_bits: cluster_bits + 3 - refcount_order,
            l2_bits: cluster_bits - if opts.extended_l2 { 4 } else { 3 },
            used: Vec::new(),
            reftable,
            reftable_offset: cs,
            free_index: 0,
            l1: L1Table::default(),
            l1_offset: 0,
            l2: BTreeMap::new(),
            has_data_file: opts.data_file.is_some(),
            // header cluster, then the table and its first (empty) block in one write
            image_len: 3 * cs,
            data_len: 0,
            ops: Vec::new(),
        }
    }

    pub(super) fn bit(&self, c: u64) -> bool {
        let w = (c / 64) as usize;
        self.used.get(w).is_some_and(|x| x & (1 << (c % 64)) != 0)
    }

    pub(super) fn set_bit(&mut self, c: u64, v: bool) {
        let w = (c / 64) as usize;
        if w >= self.used.len() {
            if !v {
                return;
            }
            self.used.resize(w + 1, 0);
        }
        if v {
            self.used[w] |= 1 << (c % 64);
        } else {
            self.used[w] &= !(1 << (c % 64));
        }
    }

    /// `qcow2_get_refcount`: 0 where no refcount block exists.
    pub(super) fn refcount(&self, c: u64) -> u64 {
        let ti = c >> self.rb_bits;
        match self.reftable.get(ti as usize) {
            Some(b) if b != 0 => u64::from(self.bit(c)),
            _ => 0,
        }
    }

    pub(super) fn touch_image(&mut self, end: u64) {
        self.image_len = self.image_len.max(end);
    }

    /// `alloc_clusters_noref`
    pub(super) fn alloc_noref(&mut self, size: u64) -> Result<u64> {
        let n = size.div_ceil(self.cs);
        'retry: loop {
            let mut i = 0;
            while i < n {
                let c = self.free_index;
                self.free_index += 1;
                if self.refcount(c) != 0 {
                    continue 'retry;
                }
                i += 1;
            }
            break;
        }
        if self.free_index > 0 && self.free_index - 1 > (i64::MAX as u64 >> self.cluster_bits) {
            return Err(too_big("Could not allocate clusters"));
        }
        Ok((self.free_index - n) << self.cluster_bits)
    }

    /// `update_refcount` by one, up or down.
    pub(super) fn update_refcount(
        &mut self,
        offset: u64,
        len: u64,
        decrease: bool,
    ) -> Result<(), AllocErr> {
        if len == 0 {
            return Ok(());
        }
        let first = offset >> self.cluster_bits;
        let last = (offset + len - 1) >> self.cluster_bits;
        let mut old_table_index = None;
        for c in first..=last {
            let ti = c >> self.rb_bits;
            if old_table_index != Some(ti) {
                if let Err(e) = self.alloc_refcount_block(c) {
                    // undo what this call changed so far (QEMU's error path)
                    let _ =
                        self.update_refcount(offset, (c - first) << self.cluster_bits, !decrease);
                    return Err(e);
                }
            }
            old_table_index = Some(ti);
            if decrease {
                self.set_bit(c, false);
                if c < self.free_index {
                    self.free_index = c;
                }
            } else {
                if self.bit(c) {
                    return Err(Error::corrupt("refcount of a new cluster is not zero").into());
                }
                self.set_bit(c, true);
            }
        }
        Ok(())
    }

    pub(super) fn same_refblock(&self, a: u64, b: u64) -> bool {
        a >> self.rb_bits == b >> self.rb_bits
    }

    /// `alloc_refcount_block` for the block covering cluster `c`.
    pub(super) fn alloc_refcount_block(&mut self, c: u64) -> Result<(), AllocErr> {
        let ti = c >> self.rb_bits;
        if let Some(b) = self.reftable.get(ti as usize) {
            if b != 0 {
                return Ok(());
            }
        }
        let new_block = self.alloc_noref(self.cs)?;
        let nb = new_block >> self.cluster_bits;
        if self.same_refblock(nb, c) {
            // the block describes itself
            self.set_bit(nb, true);
        } else {
            self.update_refcount(new_block, self.cs, false)?;
        }
        self.touch_image(new_block + self.cs);
        if (ti as usize) < self.reftable.len() {
            self.reftable[ti as usize] = new_block;
            let off = self.reftable_offset + ti * 8;
            self.ops.push(Op::Bytes {
                off,
                data: self.reftable.encode_entry(ti as usize).to_vec(),
            });
            self.touch_image(off + 8);
            return Err(AllocErr::Again);
        }
        // the refcount table is full: build a new self-covering refcount area past everything
        let per_block = 1u64 << self.rb_bits;
        let blocks_used = (c + 1).max(nb + 1).div_ceil(per_block);
        let meta_offset = (blocks_used * per_block) << self.cluster_bits;
        self.refcount_area(meta_offset, 0, false, Some((ti, new_block)))?;
        Err(AllocErr::Again)
    }

    /// `qcow2_refcount_area`: a new refcount table and the blocks covering it, at `start`
    /// (the end of the used file), leaving room for `additional` clusters after it. Returns
    /// where those clusters may go.
    pub(super) fn refcount_area(
        &mut self,
        start: u64,
        additional: u64,
        exact: bool,
        new_block: Option<(u64, u64)>,
    ) -> Result<u64> {
        let cs = self.cs;
        let total =
            refcount_blocks_needed(start / cs + additional, cs, self.refcount_order, !exact);
        if total > MAX_REFTABLE_SIZE {
            return Err(too_big("Failed to resize refcount structures"));
        }
        let area_index = (start / cs) >> self.rb_bits;
        let mut table_size = if exact {
            total
        } else {
            total + total.div_ceil(2)
        };
        table_size = table_size.div_ceil(cs / 8) * (cs / 8);
        let table_clusters = table_size * 8 / cs;
        if table_size > MAX_REFTABLE_SIZE {
            return Err(too_big("Failed to resize refcount structures"));
        }
        let mut table = RefTable::zeroed(table_size as usize);
        let max_index = self.reftable.iter().rposition(|&e| e != 0).unwrap_or(0) as u64;
        let copy = if table_size > max_index {
            (max_index + 1).min(self.reftable.len() as u64)
        } else {
            table_size
        } as usize;
        table.as_mut_slice()[..copy].copy_from_slice(&self.reftable.as_slice()[..copy]);
        if let Some((i, off)) = new_block {
            table[i as usize] = off;
        }
        let new_blocks = table.as_slice()[area_index as usize..total as usize]
            .iter()
            .filter(|&&e| e == 0)
            .count() as u64;
        let table_offset = start + new_blocks * cs;
        let end = table_offset + table_clusters * cs;
        let mut block_offset = start;
        let per_block = 1u64 << self.rb_bits;
        for i in area_index..total {
            if table[i as usize] == 0 {
                table[i as usize] = block_offset;
                block_offset += cs;
            }
            let first_covered = (i * per_block) << self.cluster_bits;
            if first_covered < end {
                let from = start.max(first_covered) >> self.cluster_bits;
                let to =
                    end.min(first_covered + (per_block << self.cluster_bits)) >> self.cluster_bits;
                for c in from..to {
                    self.set_bit(c, true);
                }
            }
        }
        self.ops.push(Op::Bytes {
            off: table_offset,
            data: table.encode(),
        });
        self.touch_image(end);
        let old_offset = self.reftable_offset;
        let old_len = self.reftable.len() as u64 * 8;
        self.reftable = table;
        self.reftable_offset = table_offset;
        // qcow2_free_clusters ignores failures
        let _ = self.update_refcount(old_offset, old_len, true);
        Ok(end)
    }

    /// `qcow2_alloc_clusters`
    pub(super) fn alloc_clusters(&mut self, size: u64) -> Result<u64> {
        loop {
            let off = self.alloc_noref(size)?;
            match self.update_refcount(off, size, false) {
                Ok(()) => return Ok(off),
                Err(AllocErr::Again) => continue,
                Err(AllocErr::Fail(e)) => return Err(e),
            }
        }
    }

    /// `qcow2_alloc_clusters_at`: how many of `n` clusters from `offset` could be taken.
    pub(super) fn alloc_clusters_at(&mut self, offset: u64, n: u64) -> Result<u64> {
        if n == 0 {
            return Ok(0);
        }
        loop {
            let first = offset >> self.cluster_bits;
            let mut i = 0;
            while i < n && self.refcount(first + i) == 0 {
                i += 1;
            }
            match self.update_refcount(offset, i << self.cluster_bits, false) {
                Ok(()) => return Ok(i),
                Err(AllocErr::Again) => continue,
                Err(AllocErr::Fail(e)) => return Err(e),
            }
        }
    }

    /// `qcow2_grow_l1_table`
    pub(super) fn grow_l1(&mut self, min: u64, exact: bool) -> Result<()> {
        let old = self.l1.len() as u64;
        if min <= old {
            return Ok(());
        }
        if min > i32::MAX as u64 / 8 {
            return Err(too_big("Failed to grow the L1 table"));
        }
        let new = if exact {
            min
        } else {
            let mut n = old.max(1);
            while min > n {
                n = (n * 3).div_ceil(2);
            }
            n
        };
        if new > MAX_L1_SIZE / 8 {
            return Err(too_big("Failed to grow the L1 table"));
        }
        let off = self.alloc_clusters(new * 8)?;
        self.touch_image(off + new * 8);
        let old_off = self.l1_offset;
        self.l1.resize(new as usize);
        self.l1_offset = off;
        let _ = self.update_refcount(old_off, old * 8, true);
        Ok(())
    }

    pub(super) fn l1_index(&self, guest: u64) -> u64 {
        guest >> (self.cluster_bits + self.l2_bits)
    }

    pub(super) fn l2_index(&self, guest: u64) -> u64 {
        (guest >> self.cluster_bits) & ((1 << self.l2_bits) - 1)
    }

    /// `get_cluster_table`: the L2 table for `guest`, allocated (`l2_allocate`) when missing.
    pub(super) fn cluster_table(&mut self, guest: u64) -> Result<u64> {
        let i = self.l1_index(guest);
        if i >= self.l1.len() as u64 {
            self.grow_l1(i + 1, false)?;
        }
        if self.l1[i as usize] & OFLAG_COPIED == 0 {
            let off = self.alloc_clusters(self.cs)?;
            self.touch_image(off + self.cs);
            self.l1[i as usize] = off | OFLAG_COPIED;
            self.l2.insert(
                i,
                L2 {
                    offset: off,
                    runs: Vec::new(),
                },
            );
        }
        Ok(i)
    }

    /// `qcow2_alloc_cluster_link_l2` for a preallocated range: entries get COPIED and, with
    /// extended L2, an empty bitmap (host space reserved, reads still go to the backing file).
    pub(super) fn link(&mut self, guest_cluster: u64, host: u64, count: u64) -> Result<()> {
        let i = self.cluster_table(guest_cluster)?;
        let index = self.l2_index(guest_cluster);
        if let Some(t) = self.l2.get_mut(&i) {
            t.runs.push(Run { index, count, host });
        }
        Ok(())
    }

    pub(super) fn write_zeros(&mut self, target: Target, off: u64, len: u64) {
        if len == 0 {
            return;
        }
        self.ops.push(Op::Zeros { target, off, len });
        match target {
            Target::Image => self.touch_image(off + len),
            Target::Data => self.data_len = self.data_len.max(off + len),
        }
    }

    pub(super) fn grow_file(&mut self, target: Target, new_len: u64, mode: Preallocation) {
        let cur = match target {
            Target::Image => self.image_len,
            Target::Data => self.data_len,
        };
        if new_len <= cur {
            return;
        }
        self.ops.push(Op::Grow {
            target,
            cur,
            new_len,
            mode,
        });
        match target {
            Target::Image => self.image_len = new_len,
            Target::Data => self.data_len = new_len,
        }
    }

    /// `qcow2_alloc_host_offset` for fresh (unallocated) guest ranges: returns the host offset
    /// of `offset` and how many bytes were mapped; links the L2 entries and performs the tail
    /// copy-on-write as `qcow2_handle_l2meta` does.
    pub(super) fn alloc_host_offset(
        &mut self,
        offset: u64,
        bytes: u64,
        subcluster_size: u64,
    ) -> Result<(u64, u64)> {
        const INV: u64 = u64::MAX;
        let cs = self.cs;
        let slice = 1u64 << self.l2_bits;
        let mut start = offset;
        let mut remaining = bytes;
        let mut cluster_offset = INV;
        let mut host = INV;
        let mut cur = 0u64;
        let mut metas = Vec::new();
        loop {
            if host == INV && cluster_offset != INV {
                host = cluster_offset;
            }
            start += cur;
            remaining -= cur;
            if cluster_offset != INV {
                cluster_offset += cur;
            }
            if remaining == 0 {
                break;
            }
            cur = remaining;
            // handle_copied: finds a fresh entry, but allocates the L2 table on the way
            self.cluster_table(start)?;
            // handle_alloc
            let in_cluster = start & (cs - 1);
            let mut nb = (in_cluster + cur).div_ceil(cs);
            nb = nb.min(slice - self.l2_index(start));
            nb = nb.min(REQUEST_MAX_BYTES >> self.cluster_bits);
            let alloc_off = if self.has_data_file {
                start & !(cs - 1)
            } else if cluster_offset == INV {
                self.alloc_clusters(nb * cs)?
            } else {
                let at = cluster_offset & !(cs - 1);
                nb = self.alloc_clusters_at(at, nb)?;
                at
            };
            if nb == 0 {
                break;
            }
            let nb_bytes = (cur + in_cluster).min(nb * cs);
            cluster_offset = alloc_off + in_cluster;
            cur = cur.min(nb_bytes - in_cluster);
            // calculate_l2_meta on fresh entries: COW only up to the end of the subcluster
            let cow_end_from = in_cluster + cur;
            let cow_end_to = cow_end_from.div_ceil(subcluster_size) * subcluster_size;
            metas.push((
                start & !(cs - 1),
                alloc_off,
                cow_end_from.div_ceil(cs),
                cow_end_from,
                cow_end_to - cow_end_from,
            ));
        }
        let done = bytes - remaining;
        let target = if self.has_data_file {
            Target::Data
        } else {
            Target::Image
        };
        for (guest, alloc, n, cow_from, cow_len) in metas {
            self.write_zeros(target, alloc + cow_from, cow_len);
            self.link(guest, alloc, n)?;
        }
        Ok((host, done))
    }

    /// `preallocate_co(0, size)`
    pub(super) fn preallocate(
        &mut self,
        size: u64,
        mode: Preallocation,
        subcluster_size: u64,
    ) -> Result<()> {
        let mut bytes = size;
        let mut offset = 0;
        let mut host = 0;
        let mut cur = 0;
        let chunk = (i32::MAX as u64) & !(self.cs - 1);
        while bytes > 0 {
            cur = bytes.min(chunk);
            let (h, done) = self.alloc_host_offset(offset, cur, subcluster_size)?;
            host = h;
            cur = done;
            bytes -= cur;
            offset += cur;
        }
        let (target, len) = if self.has_data_file {
            (Target::Data, self.data_len)
        } else {
            (Target::Image, self.image_len)
        };
        if host + cur > len {
            let mode = if mode == Preallocation::Metadata {
                Preallocation::Off
            } else {
                mode
            };
            self.grow_file(target, host + cur, mode);
        }
        Ok(())
    }

    /// The `falloc` / `full` branch of `qcow2_co_truncate` (no data file): a new refcount area
    /// sized for all data, the data clusters right after it, then the L2 tables wherever the
    /// allocator finds room.
    pub(super) fn preallocate_data(
        &mut self,
        size: u64,
        mode: Preallocation,
        l2_entry_size: u64,
    ) -> Result<()> {
        let cs = self.cs;
        let last_used = (0..self.used.len() as u64 * 64)
            .rev()
            .find(|&c| self.refcount(c) != 0);
        let old_file_size = match last_used {
            Some(c) => (c + 1) * cs,
            None => self.image_len.div_ceil(cs) * cs,
        };
        let data_clusters = size.div_ceil(cs);
        let l2_tables = data_clusters.div_ceil(cs / l2_entry_size) + 1;
        let start = self.refcount_area(old_file_size, data_clusters + l2_tables, true, None)?;
        let got = self.alloc_clusters_at(start, data_clusters)?;
        if got != data_clusters {
            return Err(Error::corrupt("Failed to allocate data clusters"));
        }
        self.grow_file(Target::Image, start + data_clusters * cs, mode);
        let slice = 1u64 << self.l2_bits;
        let mut host = start;
        let mut guest = 0u64;
        let mut left = data_clusters;
        while left > 0 {
            let n = left.min(slice - self.l2_index(guest));
            self.link(guest, host, n)?;
            guest += n * cs;
            host += n * cs;
            left -= n;
        }
        Ok(())
    }
}
