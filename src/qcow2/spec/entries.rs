//! qcow2 spec, "Cluster mapping", "Compressed Clusters Descriptor", "Extended L2 Entries":
//! L1/L2 entry masks and the one place an L2 entry is classified (bit 62 before bit 0), per
//! cluster (`cluster_type`, what `check` walks) and per subcluster (`classify`, what reads and
//! writes map).

/// L1 entry: L2 table offset, bits 9-55.
pub const L1E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// L1 entry reserved bits (1-8, 56-62).
pub const L1E_RESERVED_MASK: u64 = 0x7f00_0000_0000_01fe;
/// L2 entry: host cluster offset, bits 9-55.
pub const L2E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Standard cluster descriptor reserved bits (1-8, 56-61).
pub const L2E_RESERVED_MASK: u64 = 0x3f00_0000_0000_01fe;
/// Refcount table entry: refcount block offset, bits 9-63.
pub const REFT_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;

pub const OFLAG_COPIED: u64 = 1 << 63;
pub const OFLAG_COMPRESSED: u64 = 1 << 62;
pub const OFLAG_ZERO: u64 = 1;

/// Subclusters per cluster with extended L2 entries.
pub const SUBCLUSTERS: u32 = 32;
pub const L2_BITMAP_ALL_ALLOC: u64 = 0xffff_ffff;

/// QEMU's `QCow2ClusterType`: what one cluster is, from its descriptor alone (before any
/// subcluster bitmap is looked at).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterType {
    /// No host cluster: the backing file shows through (with extended L2, some subclusters
    /// may still read as zero).
    Unallocated,
    /// Reads as zero, no host cluster (standard L2 only).
    ZeroPlain,
    /// Reads as zero, host cluster kept (standard L2 only).
    ZeroAlloc,
    /// A host cluster (with extended L2, its subclusters say which parts hold data).
    Normal,
    Compressed,
}

/// QEMU's `QCow2SubclusterType`: what one (sub)cluster is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubclusterType {
    /// Allocated data at a host cluster.
    Normal,
    Compressed,
    /// Reads as zero, no host cluster.
    ZeroPlain,
    /// Reads as zero, host cluster kept (preallocated).
    ZeroAlloc,
    /// Unallocated, no host cluster: the backing file shows through.
    UnallocatedPlain,
    /// Unallocated subcluster of a cluster that has a host cluster.
    UnallocatedAlloc,
    /// Both "allocated" and "reads as zero" bits set, or allocation bits without a host cluster.
    Invalid,
}

impl SubclusterType {
    /// Types whose entry carries a meaningful host offset.
    pub fn has_host_offset(self) -> bool {
        matches!(
            self,
            SubclusterType::Normal | SubclusterType::ZeroAlloc | SubclusterType::UnallocatedAlloc
        )
    }
}

/// Layout facts an entry needs to be classified.
#[derive(Debug, Clone, Copy)]
pub struct EntryLayout {
    pub cluster_bits: u32,
    pub extended_l2: bool,
    pub data_file: bool,
}

impl EntryLayout {
    /// QEMU's `qcow2_get_cluster_type`. The zero flag (bit 0) counts only without extended L2;
    /// with an external data file, offset 0 with the copied flag is a host cluster.
    pub fn cluster_type(&self, entry: u64) -> ClusterType {
        if entry & OFLAG_COMPRESSED != 0 {
            ClusterType::Compressed
        } else if entry & OFLAG_ZERO != 0 && !self.extended_l2 {
            if entry & L2E_OFFSET_MASK != 0 {
                ClusterType::ZeroAlloc
            } else {
                ClusterType::ZeroPlain
            }
        } else if entry & L2E_OFFSET_MASK == 0 {
            if self.data_file && entry & OFLAG_COPIED != 0 {
                ClusterType::Normal
            } else {
                ClusterType::Unallocated
            }
        } else {
            ClusterType::Normal
        }
    }

    /// QEMU's `qcow2_get_subcluster_type`: the cluster type, refined by the subcluster bitmap
    /// under extended L2.
    pub fn classify(&self, entry: u64, bitmap: u64, sc_index: u32) -> SubclusterType {
        use SubclusterType::*;
        let allocated = match self.cluster_type(entry) {
            ClusterType::Compressed => return Compressed,
            ClusterType::ZeroPlain => return ZeroPlain,
            ClusterType::ZeroAlloc => return ZeroAlloc,
            ClusterType::Unallocated if !self.extended_l2 => return UnallocatedPlain,
            ClusterType::Normal if !self.extended_l2 => return Normal,
            ty => ty == ClusterType::Normal,
        };
        let zero_bit = 1u64 << (32 + sc_index);
        let alloc_bit = 1u64 << sc_index;
        if allocated {
            if (bitmap >> 32) & bitmap != 0 {
                Invalid
            } else if bitmap & zero_bit != 0 {
                ZeroAlloc
            } else if bitmap & alloc_bit != 0 {
                Normal
            } else {
                UnallocatedAlloc
            }
        } else if bitmap & L2_BITMAP_ALL_ALLOC != 0 {
            Invalid
        } else if bitmap & zero_bit != 0 {
            ZeroPlain
        } else {
            UnallocatedPlain
        }
    }

    /// Compressed cluster descriptor: (host byte offset, bytes to read).
    pub fn compressed(&self, entry: u64) -> CompressedDesc {
        let csize_shift = 62 - (self.cluster_bits - 8);
        let csize_mask = (1u64 << (self.cluster_bits - 8)) - 1;
        let offset_mask = (1u64 << csize_shift) - 1;
        let host = entry & offset_mask;
        let sectors = ((entry >> csize_shift) & csize_mask) + 1;
        CompressedDesc {
            host,
            len: sectors * 512 - (host & 511),
        }
    }
}

/// Where a compressed cluster's bytes lie in the image file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompressedDesc {
    pub host: u64,
    pub len: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use SubclusterType::*;

    const STD: EntryLayout = EntryLayout {
        cluster_bits: 16,
        extended_l2: false,
        data_file: false,
    };
    const EXT: EntryLayout = EntryLayout {
        cluster_bits: 16,
        extended_l2: true,
        data_file: false,
    };

    #[test]
    fn compressed_bit_is_tested_before_the_zero_bit() {
        // observed from QEMU: a compressed descriptor with bit 0 set
        let e = 0x4000_0000_0005_004f;
        assert_eq!(STD.classify(e, 0, 0), Compressed);
        let d = STD.compressed(e);
        assert_eq!(d.host, 0x5_004f);
        assert_eq!(d.len, 512 - 0x4f);
    }

    #[test]
    fn two_zero_cluster_forms() {
        assert_eq!(STD.classify(1, 0, 0), ZeroPlain);
        assert_eq!(STD.classify(0x8000_0000_0005_0001, 0, 0), ZeroAlloc);
        assert_eq!(STD.classify(0, 0, 0), UnallocatedPlain);
        assert_eq!(STD.classify(0x8000_0000_0005_0000, 0, 0), Normal);
    }

    #[test]
    fn external_data_file_offset_zero_with_copied_is_data() {
        let l = EntryLayout {
            data_file: true,
            ..STD
        };
        assert_eq!(l.classify(OFLAG_COPIED, 0, 0), Normal);
        assert_eq!(l.classify(0, 0, 0), UnallocatedPlain);
    }

    #[test]
    fn zero_flag_is_a_cluster_type_only_without_extended_l2() {
        let host = 0x8000_0000_0005_0000;
        assert_eq!(STD.cluster_type(host | OFLAG_ZERO), ClusterType::ZeroAlloc);
        assert_eq!(EXT.cluster_type(host | OFLAG_ZERO), ClusterType::Normal);
        assert_eq!(STD.cluster_type(OFLAG_ZERO), ClusterType::ZeroPlain);
        assert_eq!(EXT.cluster_type(OFLAG_ZERO), ClusterType::Unallocated);
        assert_eq!(
            STD.cluster_type(0x4000_0000_0005_0001),
            ClusterType::Compressed
        );
        let l = EntryLayout {
            data_file: true,
            ..EXT
        };
        assert_eq!(l.cluster_type(OFLAG_COPIED), ClusterType::Normal);
    }

    #[test]
    fn subcluster_bitmaps() {
        let host = 0x8000_0000_0005_0000;
        assert_eq!(EXT.classify(host, 0x4, 2), Normal);
        assert_eq!(EXT.classify(host, 0x4, 1), UnallocatedAlloc);
        assert_eq!(EXT.classify(host, 0x3 << 32, 0), ZeroAlloc);
        assert_eq!(EXT.classify(0, 0xffff_ffff << 32, 5), ZeroPlain);
        assert_eq!(EXT.classify(0, 0x1, 0), Invalid);
        assert_eq!(EXT.classify(host, 0x1 | (0x1 << 32), 3), Invalid);
    }
}
