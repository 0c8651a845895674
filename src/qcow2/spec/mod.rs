//! qcow2 on-disk format: pure codecs, no I/O, no locking (the fuzz and property-test surface).
//!
//! Names and order follow `docs/interop/qcow2.rst` of QEMU ("the spec").

pub mod bitmap_dir;
pub mod entries;
pub mod extensions;
pub mod header;
pub mod refblock;
pub mod snapshot;
pub mod table;

/// QEMU limits that bound every allocation sized by an on-disk field.
pub mod limits {
    /// qcow2.h `QCOW_MAX_REFTABLE_SIZE`.
    pub const MAX_REFTABLE_SIZE: u64 = 8 << 20;
    /// qcow2.h `QCOW_MAX_L1_SIZE`.
    pub const MAX_L1_SIZE: u64 = 32 << 20;
    /// qcow2.h `QCOW_MAX_SNAPSHOTS`.
    pub const MAX_SNAPSHOTS: u64 = 65536;
    /// qcow2.h `QCOW_MAX_SNAPSHOT_EXTRA_DATA`.
    pub const MAX_SNAPSHOT_EXTRA_DATA: u32 = 1024;
    /// qcow2.h `QCOW2_MAX_BITMAPS`.
    pub const MAX_BITMAPS: u32 = 65535;
    /// qcow2.h `QCOW2_MAX_BITMAP_DIRECTORY_SIZE`.
    pub const MAX_BITMAP_DIRECTORY_SIZE: u64 = 1024 * 65535;
    pub const MIN_CLUSTER_BITS: u32 = 9;
    pub const MAX_CLUSTER_BITS: u32 = 21;
    /// Backing file names are at most 1023 bytes.
    pub const MAX_BACKING_NAME: u32 = 1023;
}
