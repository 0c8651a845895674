//! qcow2 spec, "Cluster mapping", "Host cluster management", "Bitmap table": the tables of
//! big-endian 64-bit entries (L1, L2, refcount table, bitmap tables) as typed values.
//!
//! A table is decoded once, into native words, when it is read, and encoded once when it is
//! written; nothing else in the driver touches the byte order of a table entry. Decoding works
//! in place on a buffer of words that was read straight from disk, so loading an L2 table costs
//! one buffer and no copy. Loading and storing through a `Storage` is in `qcow2/tables.rs`
//! (this layer does no I/O).

use std::marker::PhantomData;

/// Decode big-endian words in place (the buffer was read from disk as bytes).
pub fn words_from_be(mut words: Vec<u64>) -> Vec<u64> {
    for w in &mut words {
        *w = u64::from_be(*w);
    }
    words
}

/// Decode a byte buffer of big-endian words (a trailing partial word is ignored).
pub fn decode_words(bytes: &[u8]) -> Vec<u64> {
    bytes
        .chunks_exact(8)
        .map(|c| {
            let mut a = [0u8; 8];
            a.copy_from_slice(c);
            u64::from_be_bytes(a)
        })
        .collect()
}

/// Encode native words as big-endian bytes.
pub fn encode_words(words: &[u64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(words.len() * 8);
    for w in words {
        out.extend_from_slice(&w.to_be_bytes());
    }
    out
}

/// Which table a [`Table`] is (a marker type only: the encoding is the same for all).
pub trait TableKind: std::fmt::Debug {}

/// qcow2 spec, "Cluster mapping": the L1 table (one entry per L2 table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct L1;
/// qcow2 spec, "Host cluster management": the refcount table (one entry per refcount block).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ref;
/// qcow2 spec, "Bitmap table": one entry per cluster of bitmap data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bitmap;
impl TableKind for L1 {}
impl TableKind for Ref {}
impl TableKind for Bitmap {}

/// A table of one 64-bit entry per slot, decoded to native words.
#[derive(Debug, PartialEq, Eq)]
pub struct Table<K: TableKind> {
    entries: Vec<u64>,
    kind: PhantomData<K>,
}

impl<K: TableKind> Clone for Table<K> {
    fn clone(&self) -> Self {
        Table::new(self.entries.clone())
    }
}

impl<K: TableKind> Default for Table<K> {
    fn default() -> Self {
        Table::new(Vec::new())
    }
}

/// The active or a snapshot's L1 table.
pub type L1Table = Table<L1>;
/// The refcount table.
pub type RefTable = Table<Ref>;
/// A bitmap's table.
pub type BitmapTable = Table<Bitmap>;

impl<K: TableKind> Table<K> {
    /// A table of these (native) entries.
    pub fn new(entries: Vec<u64>) -> Self {
        Table {
            entries,
            kind: PhantomData,
        }
    }

    /// `len` zero entries.
    pub fn zeroed(len: usize) -> Self {
        Table::new(vec![0; len])
    }

    /// From words read from disk unchanged (decoded in place).
    pub fn from_be_words(words: Vec<u64>) -> Self {
        Table::new(words_from_be(words))
    }

    /// From the table's bytes as on disk.
    pub fn decode(bytes: &[u8]) -> Self {
        Table::new(decode_words(bytes))
    }

    /// The table's bytes as on disk (exactly `len() * 8`).
    pub fn encode(&self) -> Vec<u8> {
        encode_words(&self.entries)
    }

    /// Entry `i` as it lies on disk.
    pub fn encode_entry(&self, i: usize) -> [u8; 8] {
        self.entries[i].to_be_bytes()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes the table takes on disk.
    pub fn byte_len(&self) -> u64 {
        self.entries.len() as u64 * 8
    }

    pub fn get(&self, i: usize) -> Option<u64> {
        self.entries.get(i).copied()
    }

    pub fn as_slice(&self) -> &[u64] {
        &self.entries
    }

    pub fn as_mut_slice(&mut self) -> &mut [u64] {
        &mut self.entries
    }

    pub fn iter(&self) -> std::slice::Iter<'_, u64> {
        self.entries.iter()
    }

    /// Grow (with zero entries) or shrink to `len` entries.
    pub fn resize(&mut self, len: usize) {
        self.entries.resize(len, 0);
    }
}

impl<K: TableKind> std::ops::Index<usize> for Table<K> {
    type Output = u64;
    fn index(&self, i: usize) -> &u64 {
        &self.entries[i]
    }
}

impl<K: TableKind> std::ops::IndexMut<usize> for Table<K> {
    fn index_mut(&mut self, i: usize) -> &mut u64 {
        &mut self.entries[i]
    }
}

impl<'a, K: TableKind> IntoIterator for &'a Table<K> {
    type Item = &'a u64;
    type IntoIter = std::slice::Iter<'a, u64>;
    fn into_iter(self) -> Self::IntoIter {
        self.entries.iter()
    }
}

/// qcow2 spec, "Cluster mapping" and "Extended L2 Entries": an L2 table. With extended L2
/// each entry is two words, the cluster descriptor and the subcluster allocation bitmap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct L2Table {
    words: Vec<u64>,
    extended: bool,
}

impl L2Table {
    /// An empty (all unallocated) table of one cluster.
    pub fn zeroed(cluster_size: u64, extended: bool) -> Self {
        L2Table {
            words: vec![0; (cluster_size / 8) as usize],
            extended,
        }
    }

    /// From words read from disk unchanged (decoded in place).
    pub fn from_be_words(words: Vec<u64>, extended: bool) -> Self {
        L2Table {
            words: words_from_be(words),
            extended,
        }
    }

    /// From the table's bytes as on disk.
    pub fn decode(bytes: &[u8], extended: bool) -> Self {
        L2Table {
            words: decode_words(bytes),
            extended,
        }
    }

    /// The table's bytes as on disk.
    pub fn encode(&self) -> Vec<u8> {
        encode_words(&self.words)
    }

    /// Entry `i` (with its bitmap under extended L2) as it lies on disk.
    pub fn encode_entry(&self, i: usize) -> Vec<u8> {
        let w = self.width();
        encode_words(&self.words[i * w..i * w + w])
    }

    pub fn extended(&self) -> bool {
        self.extended
    }

    /// Words per entry: 1, or 2 with extended L2.
    pub fn width(&self) -> usize {
        if self.extended {
            2
        } else {
            1
        }
    }

    /// Bytes per entry on disk.
    pub fn entry_size(&self) -> u64 {
        self.width() as u64 * 8
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.words.len() / self.width()
    }

    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }

    /// Bytes the table takes on disk.
    pub fn byte_len(&self) -> u64 {
        self.words.len() as u64 * 8
    }

    /// The cluster descriptor of entry `i` (0, unallocated, outside the table).
    pub fn entry(&self, i: usize) -> u64 {
        self.words.get(i * self.width()).copied().unwrap_or(0)
    }

    /// The subcluster bitmap of entry `i` (0 without extended L2 or outside the table).
    pub fn bitmap(&self, i: usize) -> u64 {
        if self.extended {
            self.words.get(i * 2 + 1).copied().unwrap_or(0)
        } else {
            0
        }
    }

    /// Entry `i` as (descriptor, bitmap).
    pub fn get(&self, i: usize) -> (u64, u64) {
        (self.entry(i), self.bitmap(i))
    }

    /// Set the descriptor of entry `i`.
    pub fn set_entry(&mut self, i: usize, e: u64) {
        let w = self.width();
        self.words[i * w] = e;
    }

    /// Set the subcluster bitmap of entry `i` (extended L2 only; ignored otherwise).
    pub fn set_bitmap(&mut self, i: usize, b: u64) {
        if self.extended {
            self.words[i * 2 + 1] = b;
        }
    }

    /// Set entry `i` (descriptor and, with extended L2, bitmap).
    pub fn set(&mut self, i: usize, e: u64, b: u64) {
        self.set_entry(i, e);
        self.set_bitmap(i, b);
    }

    /// The descriptors of entries `from..to` when the table has no bitmaps (standard L2), for
    /// scans over long runs of equal entries; `None` with extended L2.
    pub fn standard_entries(&self, from: usize, to: usize) -> Option<&[u64]> {
        if self.extended {
            None
        } else {
            self.words.get(from..to.max(from))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_tables_round_trip_big_endian() {
        let bytes = [0, 0, 0, 0, 0, 1, 0, 0, 0x80, 0, 0, 0, 0, 2, 0, 0];
        let t = L1Table::decode(&bytes);
        assert_eq!(t.as_slice(), &[0x1_0000, 0x8000_0000_0002_0000]);
        assert_eq!(t.encode(), bytes);
        let raw: Vec<u64> = vec![u64::from_ne_bytes(bytes[..8].try_into().unwrap())];
        assert_eq!(RefTable::from_be_words(raw).as_slice(), &[0x1_0000]);
    }

    #[test]
    fn extended_l2_entries_are_two_words() {
        let mut t = L2Table::zeroed(16384, true);
        assert_eq!(t.len(), 1024);
        t.set(3, 0x8000_0000_0005_0000, 0xff);
        assert_eq!(t.get(3), (0x8000_0000_0005_0000, 0xff));
        let enc = t.encode();
        assert_eq!(enc[48..56], 0x8000_0000_0005_0000u64.to_be_bytes());
        assert_eq!(enc[56..64], 0xffu64.to_be_bytes());
        assert_eq!(t.encode_entry(3), enc[48..64]);
        assert_eq!(L2Table::decode(&enc, true), t);
        let s = L2Table::decode(&enc, false);
        assert_eq!(
            (s.len(), s.entry(6), s.bitmap(6)),
            (2048, 0x8000_0000_0005_0000, 0)
        );
    }
}
