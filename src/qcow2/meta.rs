//! The metadata state writers change, guarded by `Qcow2::meta`: the active L1 table, dirty
//! L2 tables and refcount blocks not yet written, the refcount table, refcount decrements
//! waiting for the tables to be durable, and the header fields that move (table offsets,
//! size, autoclear bits, the bitmaps extension). Readers take the lock shared; `alloc.rs`
//! (the write side) and `refcount.rs` change it under the lock taken exclusively, and
//! `flush_tables` writes it back in the order of the crash-safety rules (see `alloc.rs`).

use super::cluster_set::ClusterSet;
use super::spec::header::Header;
use super::spec::table::{L1Table, L2Table, RefTable};
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

/// Metadata that writes change. Guarded by `Qcow2::meta`.
#[derive(Debug)]
pub(crate) struct Meta {
    /// The active L1 table as the writers see it (entries may be newer than on disk).
    pub l1: L1Table,
    /// Host offset of the active L1 table (changes when the table grows and moves).
    pub l1_offset: u64,
    /// L1 indexes changed in memory and not yet written.
    pub l1_dirty: BTreeSet<usize>,
    /// L2 tables changed in memory and not yet written, by host offset.
    pub dirty_l2: HashMap<u64, Arc<L2Table>>,
    /// The refcount table, loaded on first use.
    pub reftable: Option<RefTable>,
    /// Host offset of the refcount table (changes when the table grows and moves).
    pub reftable_offset: u64,
    /// Clusters the refcount table occupies (the header field).
    pub reftable_clusters: u32,
    /// The refcount table changed in memory and is not written yet.
    pub reftable_dirty: bool,
    /// Refcount blocks changed in memory and not yet written, by host offset.
    pub dirty_refblocks: HashMap<u64, Arc<Vec<u8>>>,
    /// Host cluster indexes whose refcount drops by one once the tables are durable.
    pub pending_decrements: Vec<u64>,
    /// Where the search for a free host cluster starts (cluster index).
    pub free_hint: u64,
    /// The image file's length as the allocator knows it.
    pub file_len: u64,
    /// The guest size (changes on resize).
    pub size: u64,
    /// The header's corrupt bit: set, every write is refused.
    pub corrupt: bool,
    /// Autoclear bits as on disk now.
    pub autoclear: u64,
    /// The trusted bitmaps extension as on disk now.
    pub bitmaps_ext: Option<super::spec::extensions::BitmapsExt>,
    /// The first write's preparations are done (dirty bit or repair, bitmaps `in-use`).
    pub(crate) prepared: bool,
    /// Host clusters holding metadata (for overlap checks), built before the first write.
    pub(crate) metadata: Option<ClusterSet>,
}

impl Meta {
    pub(crate) fn new(
        h: &Header,
        bitmaps_ext: Option<super::spec::extensions::BitmapsExt>,
        l1: L1Table,
        file_len: u64,
    ) -> Meta {
        Meta {
            l1,
            l1_offset: h.l1_table_offset,
            l1_dirty: BTreeSet::new(),
            dirty_l2: HashMap::new(),
            reftable: None,
            reftable_offset: h.refcount_table_offset,
            reftable_clusters: h.refcount_table_clusters,
            reftable_dirty: false,
            dirty_refblocks: HashMap::new(),
            pending_decrements: Vec::new(),
            free_hint: 0,
            file_len,
            size: h.size,
            corrupt: h.is_corrupt(),
            autoclear: h.autoclear_features,
            bitmaps_ext,
            prepared: false,
            metadata: None,
        }
    }

    /// Anything changed in memory that is not on disk yet.
    pub(crate) fn is_dirty(&self) -> bool {
        !self.l1_dirty.is_empty()
            || !self.dirty_l2.is_empty()
            || self.reftable_dirty
            || !self.dirty_refblocks.is_empty()
            || !self.pending_decrements.is_empty()
    }
}
