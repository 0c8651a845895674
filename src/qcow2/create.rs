//! New qcow2 images, laid out exactly as `qemu-img create` lays them out.
//!
//! QEMU does not compute a layout up front: `qcow2_co_create` writes a header cluster, a one-cluster
//! refcount table at cluster 1 and an empty refcount block at cluster 2, opens that image, and
//! then lets the ordinary allocator do the rest (refcount the first three clusters, grow the L1
//! table, preallocate through `preallocate_co` or, for `falloc`/`full`, build a fresh refcount
//! area with `qcow2_refcount_area`). Which cluster ends up where therefore depends on the
//! allocator's free-cluster cursor, on when refcount blocks are added (and the retries that
//! follow), and on the refcount table moving when it fills up.
//!
//! To make the same file we replay that sequence against an in-memory model of the allocator
//! ([`Alloc`]): the same cursor, the same self-describing refcount blocks, the same retry after a
//! refcount block was placed, the same table growth. The model also tracks the host file length
//! the way QEMU's writes and truncations move it, because `preallocate_co` and `falloc`/`full`
//! decide from that length what to truncate or preallocate. Metadata is then written from the
//! final model state (header, refcount table and blocks, L1, L2), and the writes QEMU makes that
//! are not metadata (a refcount table it later abandons, copy-on-write zeros past the end of the
//! disk, the first block of a data file, preallocated data) are replayed as recorded.
//!
//! Result: the image file and the data file equal QEMU's byte for byte, with the same holes, for
//! the option sets the spec tests compare (`qcow2-spec-tests/tests/create.rs`); `actual-size`
//! then matches too, as long as both files sit on the same file system.
//!
//! Known difference: when a preallocated data run exactly fills the range of one refcount block
//! (only seen with 512-byte clusters and wide refcounts, e.g. `cluster_size=512,
//! refcount_bits=64,preallocation=metadata`), QEMU places that block's refcount block and the
//! data in a different order than this model does. The image is consistent (`qemu-img check`
//! is clean, same guest content and map) but the clusters after that point sit elsewhere.
//!
//! Not supported: encryption, and `qemu-img create`'s own steps (options, backing probing), which
//! live in `cli/create.rs`.

use super::spec::extensions::{Extensions, FeatureName};
use super::spec::header::{autoclear, compat, incompat, Header};
use super::spec::limits::{MAX_L1_SIZE, MAX_REFTABLE_SIZE};
use super::spec::refblock;
use super::spec::table::{L1Table, L2Table, RefTable};
use crate::block::create_raw::{create_empty, grow, write_zeros};
use crate::error::{Error, ErrorKind, Result};
use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;

pub use super::spec::header::CompressionType;
pub use crate::block::create_raw::Preallocation;

/// L1/L2 entry flag: refcount is exactly one (qcow2 spec, "Cluster mapping").
const OFLAG_COPIED: u64 = 1 << 63;
/// `BDRV_REQUEST_MAX_BYTES`: the block layer's largest single request.
const REQUEST_MAX_BYTES: u64 = 0x7fff_fe00;

/// Everything `qemu-img create -f qcow2 -o ...` lets one choose (encryption aside).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateOptions {
    /// Virtual size in bytes; rounded up to 512 like QEMU does.
    pub size: u64,
    /// 2 (`compat=0.10`) or 3 (`compat=1.1`).
    pub version: u32,
    pub cluster_size: u64,
    pub refcount_bits: u32,
    pub lazy_refcounts: bool,
    pub extended_l2: bool,
    pub compression_type: CompressionType,
    /// External data file name, stored in the image as given.
    pub data_file: Option<String>,
    pub data_file_raw: bool,
    pub preallocation: Preallocation,
    /// Backing file name, stored in the image as given.
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
}

impl Default for CreateOptions {
    /// qemu-img's defaults: compat 1.1, 64 KiB clusters, 16-bit refcounts, zlib, no
    /// preallocation.
    fn default() -> Self {
        CreateOptions {
            size: 0,
            version: 3,
            cluster_size: 65536,
            refcount_bits: 16,
            lazy_refcounts: false,
            extended_l2: false,
            compression_type: CompressionType::Zlib,
            data_file: None,
            data_file_raw: false,
            preallocation: Preallocation::Off,
            backing_file: None,
            backing_format: None,
        }
    }
}

fn invalid(msg: &str) -> Error {
    Error::new(ErrorKind::InvalidArgument, msg)
}

impl CreateOptions {
    /// QEMU's checks, in `qcow2_co_create`'s order and with its messages. Returns the effective
    /// preallocation mode (`data_file_raw` turns `off` into `metadata`, as QEMU does, so the
    /// L2 tables map the data file 1:1).
    pub fn validate(&self) -> Result<Preallocation> {
        if self.version != 2 && self.version != 3 {
            return Err(invalid(&format!(
                "Invalid compatibility level: '{}'",
                self.version
            )));
        }
        if self.extended_l2 && self.version < 3 {
            return Err(invalid(
                "Extended L2 entries are only supported with compatibility level 1.1 and above (use version=v3 or greater)",
            ));
        }
        let cs = self.cluster_size;
        if !cs.is_power_of_two() || !(512..=(2 << 20)).contains(&cs) {
            return Err(invalid(
                "Cluster size must be a power of two between 512 and 2048k",
            ));
        }
        if self.extended_l2 && cs < 16384 {
            return Err(invalid(
                "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
            ));
        }
        if self.backing_file.is_some()
            && self.preallocation != Preallocation::Off
            && !self.extended_l2
        {
            return Err(invalid(
                "Backing file and preallocation can only be used at the same time if extended_l2 is on",
            ));
        }
        if self.backing_format.is_some() && self.backing_file.is_none() {
            return Err(invalid(
                "Backing format cannot be used without backing file",
            ));
        }
        if self.version < 3 && self.lazy_refcounts {
            return Err(invalid(
                "Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)",
            ));
        }
        if self.refcount_bits > 64 || !self.refcount_bits.is_power_of_two() {
            return Err(invalid(
                "Refcount width must be a power of two and may not exceed 64 bits",
            ));
        }
        if self.version < 3 && self.refcount_bits != 16 {
            return Err(invalid(
                "Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)",
            ));
        }
        if self.data_file_raw && self.data_file.is_none() {
            return Err(invalid("data-file-raw requires data-file"));
        }
        if self.data_file_raw && self.backing_file.is_some() {
            return Err(invalid(
                "Backing file and data-file-raw cannot be used at the same time",
            ));
        }
        let mut prealloc = self.preallocation;
        if self.data_file_raw && prealloc == Preallocation::Off {
            prealloc = Preallocation::Metadata;
        }
        if self.data_file.is_some() && self.version < 3 {
            return Err(invalid(
                "External data files are only supported with compatibility level 1.1 and above (use version=v3 or greater)",
            ));
        }
        if self.compression_type != CompressionType::Zlib && self.version < 3 {
            return Err(invalid(
                "Non-zlib compression type is only supported with compatibility level 1.1 and above (use version=v3 or greater)",
            ));
        }
        if let Some(b) = &self.backing_file {
            if b.len() > 1023 {
                return Err(invalid("Backing file name too long"));
            }
        }
        if let Some(f) = &self.backing_format {
            if f.len() >= 16 {
                return Err(invalid("Backing format name too long"));
            }
        }
        Ok(prealloc)
    }
}

/// Which host file a recorded write goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Image,
    Data,
}

/// A write QEMU makes that is not part of the final metadata, kept in order.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
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
enum AllocErr {
    Again,
    Fail(Error),
}

impl From<Error> for AllocErr {
    fn from(e: Error) -> Self {
        AllocErr::Fail(e)
    }
}

fn too_big(what: &str) -> Error {
    Error::new(
        ErrorKind::InvalidArgument,
        format!("{what}: File too large"),
    )
}

/// One mapped run of an L2 table: `count` entries from `index` map to `host`, `host + cs`, ...
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    index: u64,
    count: u64,
    host: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct L2 {
    offset: u64,
    runs: Vec<Run>,
}

/// QEMU's `qcow2_refcount_metadata_size`: refcount blocks needed to cover `clusters` clusters
/// plus themselves and their table (returns the block count).
fn refcount_blocks_needed(mut clusters: u64, cs: u64, order: u32, mut generous: bool) -> u64 {
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
            return blocks;
        }
    }
}

/// The allocator model: refcounts (0 or 1: creation never shares a cluster), the refcount
/// table, the free-cluster cursor, L1 and L2 tables, and the host file lengths.
struct Alloc {
    cluster_bits: u32,
    cs: u64,
    refcount_order: u32,
    /// log2 of the entries per refcount block.
    rb_bits: u32,
    l2_bits: u32,
    used: Vec<u64>,
    reftable: RefTable,
    reftable_offset: u64,
    free_index: u64,
    l1: L1Table,
    l1_offset: u64,
    l2: BTreeMap<u64, L2>,
    has_data_file: bool,
    image_len: u64,
    data_len: u64,
    ops: Vec<Op>,
}

impl Alloc {
    fn new(opts: &CreateOptions) -> Alloc {
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

    fn bit(&self, c: u64) -> bool {
        let w = (c / 64) as usize;
        self.used.get(w).is_some_and(|x| x & (1 << (c % 64)) != 0)
    }

    fn set_bit(&mut self, c: u64, v: bool) {
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
    fn refcount(&self, c: u64) -> u64 {
        let ti = c >> self.rb_bits;
        match self.reftable.get(ti as usize) {
            Some(b) if b != 0 => u64::from(self.bit(c)),
            _ => 0,
        }
    }

    fn touch_image(&mut self, end: u64) {
        self.image_len = self.image_len.max(end);
    }

    /// `alloc_clusters_noref`
    fn alloc_noref(&mut self, size: u64) -> Result<u64> {
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
    fn update_refcount(&mut self, offset: u64, len: u64, decrease: bool) -> Result<(), AllocErr> {
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

    fn same_refblock(&self, a: u64, b: u64) -> bool {
        a >> self.rb_bits == b >> self.rb_bits
    }

    /// `alloc_refcount_block` for the block covering cluster `c`.
    fn alloc_refcount_block(&mut self, c: u64) -> Result<(), AllocErr> {
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
    fn refcount_area(
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
    fn alloc_clusters(&mut self, size: u64) -> Result<u64> {
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
    fn alloc_clusters_at(&mut self, offset: u64, n: u64) -> Result<u64> {
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
    fn grow_l1(&mut self, min: u64, exact: bool) -> Result<()> {
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

    fn l1_index(&self, guest: u64) -> u64 {
        guest >> (self.cluster_bits + self.l2_bits)
    }

    fn l2_index(&self, guest: u64) -> u64 {
        (guest >> self.cluster_bits) & ((1 << self.l2_bits) - 1)
    }

    /// `get_cluster_table`: the L2 table for `guest`, allocated (`l2_allocate`) when missing.
    fn cluster_table(&mut self, guest: u64) -> Result<u64> {
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
    fn link(&mut self, guest_cluster: u64, host: u64, count: u64) -> Result<()> {
        let i = self.cluster_table(guest_cluster)?;
        let index = self.l2_index(guest_cluster);
        if let Some(t) = self.l2.get_mut(&i) {
            t.runs.push(Run { index, count, host });
        }
        Ok(())
    }

    fn write_zeros(&mut self, target: Target, off: u64, len: u64) {
        if len == 0 {
            return;
        }
        self.ops.push(Op::Zeros { target, off, len });
        match target {
            Target::Image => self.touch_image(off + len),
            Target::Data => self.data_len = self.data_len.max(off + len),
        }
    }

    fn grow_file(&mut self, target: Target, new_len: u64, mode: Preallocation) {
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
    fn alloc_host_offset(
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
    fn preallocate(&mut self, size: u64, mode: Preallocation, subcluster_size: u64) -> Result<()> {
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
    fn preallocate_data(
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

/// QEMU's feature name table (`qcow2_update_header`), written for v3 images with clusters
/// larger than 4 KiB.
const FEATURES: [(u8, u8, &str); 8] = [
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
];

/// The first cluster as `qcow2_update_header` writes it.
fn header_cluster(opts: &CreateOptions, size: u64, a: &Alloc) -> Result<Vec<u8>> {
    let cs = a.cs as usize;
    let mut incompatible = 0;
    if opts.data_file.is_some() {
        incompatible |= incompat::DATA_FILE;
    }
    if opts.compression_type != CompressionType::Zlib {
        incompatible |= incompat::COMPRESSION;
    }
    if opts.extended_l2 {
        incompatible |= incompat::EXTL2;
    }
    let header = Header {
        version: opts.version,
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits: a.cluster_bits,
        size,
        crypt_method: 0,
        l1_size: a.l1.len() as u32,
        l1_table_offset: a.l1_offset,
        refcount_table_offset: a.reftable_offset,
        refcount_table_clusters: (a.reftable.len() as u64 * 8 / a.cs) as u32,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible_features: incompatible,
        compatible_features: if opts.lazy_refcounts {
            compat::LAZY_REFCOUNTS
        } else {
            0
        },
        autoclear_features: if opts.data_file_raw {
            autoclear::DATA_FILE_RAW
        } else {
            0
        },
        refcount_order: a.refcount_order,
        header_length: 112,
        compression_type: opts.compression_type,
        unknown_fields: Vec::new(),
    };
    let feature_table = if opts.version >= 3 && a.cs > 4096 {
        FEATURES
            .iter()
            .map(|&(kind, bit, name)| FeatureName {
                kind,
                bit,
                name: name.into(),
            })
            .collect()
    } else {
        Vec::new()
    };
    let ext = Extensions {
        backing_format: opts.backing_format.clone(),
        data_file: opts.data_file.clone(),
        feature_table,
        ..Extensions::default()
    };
    let mut buf = header.encode_area(&ext, opts.backing_file.as_deref());
    if buf.len() > cs {
        // (with a backing file, the name is what no longer fits)
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            match &opts.backing_file {
                Some(b) => format!("Could not assign backing file '{b}': No space left on device"),
                None => "Could not update qcow2 header: No space left on device".into(),
            },
        ));
    }
    buf.resize(cs, 0);
    Ok(buf)
}

/// The whole creation, computed: what `create_qcow2` writes.
struct Plan {
    alloc: Alloc,
    header: Vec<u8>,
    l2_entry_size: u64,
}

fn plan(opts: &CreateOptions) -> Result<Plan> {
    let prealloc = opts.validate()?;
    let size = crate::units::align_up(opts.size, 512)
        .filter(|&s| s <= i64::MAX as u64)
        .ok_or_else(|| invalid("Image size too large"))?;
    let mut a = Alloc::new(opts);
    // refcount the header, the refcount table and its first block
    a.alloc_clusters(3 * a.cs)?;
    let l2_entry_size: u64 = if opts.extended_l2 { 16 } else { 8 };
    let subcluster_size = if opts.extended_l2 { a.cs / 32 } else { a.cs };
    // qcow2_co_truncate: the L1 table first, exactly as large as the disk needs
    let cover = a.cs << a.l2_bits;
    a.grow_l1(size.div_ceil(cover), true)
        .map_err(|e| e.context("Could not resize image"))?;
    match prealloc {
        Preallocation::Off => {
            if a.has_data_file {
                a.grow_file(Target::Data, size, Preallocation::Off);
            }
        }
        Preallocation::Metadata => a.preallocate(size, prealloc, subcluster_size)?,
        Preallocation::Falloc | Preallocation::Full => {
            if a.has_data_file {
                a.preallocate(size, prealloc, subcluster_size)?;
            } else {
                a.preallocate_data(size, prealloc, l2_entry_size)?;
            }
        }
    }
    let header = header_cluster(opts, size, &a)?;
    Ok(Plan {
        alloc: a,
        header,
        l2_entry_size,
    })
}

fn io_err(path: &str, what: &str) -> impl FnOnce(std::io::Error) -> Error {
    let msg = format!("{what} '{path}'");
    move |e| Error::io(msg, e)
}

fn apply(plan: &Plan, image: &File, data: Option<&File>, path: &str) -> Result<()> {
    let a = &plan.alloc;
    let cs = a.cs;
    let file_of = |t: Target| -> Result<&File> {
        match t {
            Target::Image => Ok(image),
            Target::Data => data.ok_or_else(|| Error::corrupt("no data file to write to")),
        }
    };
    // The writes QEMU makes in the image file when it creates it: the header cluster, then the
    // refcount table with its first block.
    image
        .write_all_at(&plan.header, 0)
        .map_err(io_err(path, "Could not write qcow2 header to"))?;
    let mut first = vec![0u8; 2 * cs as usize];
    first[..8].copy_from_slice(&(2 * cs).to_be_bytes());
    image
        .write_all_at(&first, cs)
        .map_err(io_err(path, "Could not write refcount table to"))?;
    for op in &a.ops {
        match op {
            Op::Bytes { off, data } => image
                .write_all_at(data, *off)
                .map_err(io_err(path, "Could not write refcount metadata to"))?,
            Op::Zeros { target, off, len } => write_zeros(file_of(*target)?, *off, *len)?,
            Op::Grow {
                target,
                cur,
                new_len,
                mode,
            } => grow(file_of(*target)?, *cur, *new_len, *mode)?,
        }
    }
    // final metadata: refcount blocks, L2 tables, L1 table, header
    let entries_per_block = 1u64 << a.rb_bits;
    let mut block = vec![0u8; cs as usize];
    for (ti, &off) in a.reftable.iter().enumerate() {
        if off == 0 {
            continue;
        }
        block.fill(0);
        let base = ti as u64 * entries_per_block;
        for i in 0..entries_per_block {
            if a.bit(base + i) {
                refblock::set(&mut block, a.refcount_order, i, 1);
            }
        }
        image
            .write_all_at(&block, off)
            .map_err(io_err(path, "Could not write refcount block to"))?;
    }
    let extended = plan.l2_entry_size == 16;
    for t in a.l2.values() {
        let mut table = L2Table::zeroed(cs, extended);
        for r in &t.runs {
            for k in 0..r.count {
                let e = (r.host + (k << a.cluster_bits)) | OFLAG_COPIED;
                table.set_entry((r.index + k) as usize, e);
            }
        }
        image
            .write_all_at(&table.encode(), t.offset)
            .map_err(io_err(path, "Could not write L2 table to"))?;
    }
    if a.l1_offset != 0 {
        image
            .write_all_at(&a.l1.encode(), a.l1_offset)
            .map_err(io_err(path, "Could not write L1 table to"))?;
    }
    image
        .write_all_at(&plan.header, 0)
        .map_err(io_err(path, "Could not write qcow2 header to"))?;
    let len = image
        .metadata()
        .map_err(io_err(path, "Could not stat"))?
        .len();
    if len < a.image_len {
        image
            .set_len(a.image_len)
            .map_err(io_err(path, "Could not resize"))?;
    }
    image.sync_all().map_err(io_err(path, "Could not flush"))?;
    if let Some(d) = data {
        d.sync_all()
            .map_err(io_err(path, "Could not flush data file of"))?;
    }
    Ok(())
}

/// The data file name resolved like QEMU opens it: relative to the current directory.
fn data_file_path(name: &str) -> &str {
    name
}

/// `qemu-img create -f qcow2`: write the image at `path` (and its external data file).
/// On failure the files are removed, as qemu-img does.
pub fn create_qcow2(path: &str, opts: &CreateOptions) -> Result<()> {
    let plan = match plan(opts) {
        Ok(p) => p,
        Err(e) => {
            // qemu-img has already created the files when the format layer refuses the options,
            // and deletes them again
            let _ = std::fs::remove_file(path);
            if let Some(d) = &opts.data_file {
                let _ = std::fs::remove_file(data_file_path(d));
            }
            return Err(e);
        }
    };
    let image = create_empty(path)?;
    let data = match &opts.data_file {
        Some(d) => Some(create_empty(data_file_path(d))?),
        None => None,
    };
    let res = apply(&plan, &image, data.as_ref(), path);
    if res.is_err() {
        let _ = std::fs::remove_file(path);
        if let Some(d) = &opts.data_file {
            let _ = std::fs::remove_file(data_file_path(d));
        }
    }
    res
}

#[cfg(test)]
mod tests {
    use super::super::spec::extensions::{EXT_BACKING_FORMAT, EXT_FEATURE_TABLE};
    use super::*;

    fn opts(size: u64) -> CreateOptions {
        CreateOptions {
            size,
            ..CreateOptions::default()
        }
    }

    #[test]
    fn default_layout_is_header_reftable_refblock_l1() {
        let p = plan(&opts(1 << 30)).unwrap();
        let a = &p.alloc;
        assert_eq!(a.reftable_offset, 0x10000);
        assert_eq!(a.reftable[0], 0x20000);
        assert_eq!(a.l1_offset, 0x30000);
        assert_eq!(a.l1.len(), 2);
        // the L1 table is written exactly, not padded to a cluster
        assert_eq!(a.image_len, 0x30010);
        assert!((0..4).all(|c| a.refcount(c) == 1));
        assert_eq!(a.refcount(4), 0);
    }

    #[test]
    fn empty_disk_has_no_l1_table() {
        let p = plan(&opts(0)).unwrap();
        assert_eq!(p.alloc.l1_offset, 0);
        assert_eq!(p.alloc.image_len, 0x30000);
    }

    #[test]
    fn metadata_preallocation_interleaves_l2_tables_and_data() {
        let p = plan(&CreateOptions {
            preallocation: Preallocation::Metadata,
            ..opts(1 << 30)
        })
        .unwrap();
        let a = &p.alloc;
        assert_eq!(a.l1[0], 0x4_0000 | OFLAG_COPIED);
        assert_eq!(
            a.l2[&0].runs,
            vec![Run {
                index: 0,
                count: 8192,
                host: 0x5_0000
            }]
        );
        assert_eq!(a.l1[1], 0x2005_0000 | OFLAG_COPIED);
        assert_eq!(a.l2[&1].runs[0].host, 0x2006_0000);
        assert_eq!(a.image_len, 0x4006_0000);
    }

    #[test]
    fn unaligned_metadata_preallocation_writes_zeros_to_the_cluster_end() {
        let p = plan(&CreateOptions {
            preallocation: Preallocation::Metadata,
            ..opts(1_000_000)
        })
        .unwrap();
        assert!(p.alloc.ops.contains(&Op::Zeros {
            target: Target::Image,
            off: 0x14_4400,
            len: 0x15_0000 - 0x14_4400
        }));
        assert_eq!(p.alloc.image_len, 0x15_0000);
    }

    #[test]
    fn falloc_moves_the_refcount_table_and_reuses_its_cluster_for_l2() {
        let p = plan(&CreateOptions {
            preallocation: Preallocation::Falloc,
            ..opts(100 << 20)
        })
        .unwrap();
        let a = &p.alloc;
        assert_eq!(a.reftable_offset, 0x4_0000);
        assert_eq!(a.l2[&0].offset, 0x1_0000);
        assert_eq!(a.l2[&0].runs[0].host, 0x5_0000);
        assert_eq!(a.image_len, 0x5_0000 + (100 << 20));
    }

    #[test]
    fn small_clusters_grow_the_refcount_table() {
        // 512-byte clusters with 64-bit refcounts: one refcount block covers 64 clusters and
        // the first table 64 blocks, so 4 MiB of metadata must move the table.
        let p = plan(&CreateOptions {
            cluster_size: 512,
            refcount_bits: 64,
            preallocation: Preallocation::Metadata,
            ..opts(4 << 20)
        })
        .unwrap();
        let a = &p.alloc;
        assert_ne!(a.reftable_offset, 512);
        // every cluster below the end of the file that is in use is counted exactly once
        let used = (0..a.image_len / 512)
            .filter(|&c| a.refcount(c) == 1)
            .count();
        assert!(used > (4 << 20) / 512);
    }

    #[test]
    fn header_carries_extensions_in_qemu_order() {
        let p = plan(&CreateOptions {
            backing_file: Some("base.raw".into()),
            backing_format: Some("raw".into()),
            data_file: None,
            ..opts(1 << 20)
        })
        .unwrap();
        let h = &p.header;
        assert_eq!(h[112..116], EXT_BACKING_FORMAT.to_be_bytes());
        assert_eq!(h[128..132], EXT_FEATURE_TABLE.to_be_bytes());
        let boff = u64::from_be_bytes(h[8..16].try_into().unwrap()) as usize;
        assert_eq!(&h[boff..boff + 8], b"base.raw");
        assert_eq!(boff, 128 + 8 + 384 + 8);
    }

    #[test]
    fn validation_uses_qemu_messages() {
        let cases: [(CreateOptions, &str); 6] = [
            (
                CreateOptions { cluster_size: 1000, ..opts(0) },
                "Cluster size must be a power of two between 512 and 2048k",
            ),
            (
                CreateOptions { refcount_bits: 3, ..opts(0) },
                "Refcount width must be a power of two and may not exceed 64 bits",
            ),
            (
                CreateOptions { version: 2, lazy_refcounts: true, ..opts(0) },
                "Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)",
            ),
            (
                CreateOptions { extended_l2: true, cluster_size: 8192, ..opts(0) },
                "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
            ),
            (
                CreateOptions {
                    backing_file: Some("b".into()),
                    preallocation: Preallocation::Metadata,
                    ..opts(0)
                },
                "Backing file and preallocation can only be used at the same time if extended_l2 is on",
            ),
            (
                CreateOptions { data_file_raw: true, ..opts(0) },
                "data-file-raw requires data-file",
            ),
        ];
        for (o, msg) in cases {
            assert_eq!(o.validate().unwrap_err().message(), msg);
        }
    }

    #[test]
    fn data_file_raw_implies_metadata_preallocation() {
        let o = CreateOptions {
            data_file: Some("d".into()),
            data_file_raw: true,
            ..opts(1 << 20)
        };
        assert_eq!(o.validate().unwrap(), Preallocation::Metadata);
        let p = plan(&o).unwrap();
        // data clusters map 1:1 onto the data file
        assert_eq!(
            p.alloc.l2[&0].runs,
            vec![Run {
                index: 0,
                count: 16,
                host: 0
            }]
        );
    }

    #[test]
    fn refcount_metadata_size_matches_qemu_fixed_point() {
        // 64 KiB clusters, 16-bit refcounts: one block covers 32768 clusters
        assert_eq!(refcount_blocks_needed(5, 65536, 4, false), 1);
        assert_eq!(refcount_blocks_needed(32767, 65536, 4, false), 2);
    }
}
