//! qcow2 spec, "Bitmap directory": entries (fixed part, extra data, name, padding to 8) with the
//! checks QEMU's `bitmap_list_load` / `check_dir_entry` make.
//!
//! The fixed part of an entry is a zerocopy big-endian record ([`RawDirEntry`]).

use super::limits::MAX_BITMAP_DIRECTORY_SIZE;
use crate::error::{Error, Result};
use zerocopy::byteorder::big_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// qcow2 spec, "Bitmap directory": the fixed part of a directory entry as it lies on disk.
#[derive(Debug, Clone, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawDirEntry {
    pub bitmap_table_offset: U64,
    pub bitmap_table_size: U32,
    pub flags: U32,
    pub bitmap_type: u8,
    pub granularity_bits: u8,
    pub name_size: U16,
    pub extra_data_size: U32,
}

pub const DIR_ENTRY_LEN: usize = std::mem::size_of::<RawDirEntry>();
const _: () = assert!(DIR_ENTRY_LEN == 24);

/// qcow2 spec, "Bitmap directory": flag bits.
pub const FLAG_IN_USE: u32 = 1 << 0;
pub const FLAG_AUTO: u32 = 1 << 1;
pub const FLAG_EXTRA_DATA_COMPATIBLE: u32 = 1 << 2;
/// qcow2-bitmap.c `BME_RESERVED_FLAGS`.
pub const RESERVED_FLAGS: u32 = 0xffff_fffc;
pub const MIN_GRANULARITY_BITS: u8 = 9;
pub const MAX_GRANULARITY_BITS: u8 = 31;
pub const MAX_NAME_SIZE: u16 = 1023;
/// qcow2-bitmap.c `BME_MAX_TABLE_SIZE`, `BME_MAX_PHYS_SIZE`.
pub const MAX_TABLE_SIZE: u32 = 0x800_0000;
pub const MAX_PHYS_SIZE: u64 = 0x2000_0000;
/// Bitmap type: dirty tracking bitmap.
pub const TYPE_DIRTY_TRACKING: u8 = 1;
/// Bitmap table entry: offset bits 9-55; reserved bits (QEMU `BME_TABLE_ENTRY_RESERVED_MASK`).
pub const TABLE_ENTRY_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
pub const TABLE_ENTRY_RESERVED_MASK: u64 = 0xff00_0000_0000_01fe;
pub const TABLE_ENTRY_FLAG_ALL_ONES: u64 = 1;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub table_offset: u64,
    pub table_size: u32,
    pub flags: u32,
    pub kind: u8,
    pub granularity_bits: u8,
    pub name: String,
    pub extra_data: Vec<u8>,
}

impl DirEntry {
    pub fn in_use(&self) -> bool {
        self.flags & FLAG_IN_USE != 0
    }
    pub fn auto(&self) -> bool {
        self.flags & FLAG_AUTO != 0
    }
    pub fn granularity(&self) -> u64 {
        1u64 << self.granularity_bits
    }

    /// Serialized size (padded to 8).
    pub fn encoded_len(&self) -> usize {
        (DIR_ENTRY_LEN + self.extra_data.len() + self.name.len()).div_ceil(8) * 8
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        let raw = RawDirEntry {
            bitmap_table_offset: U64::new(self.table_offset),
            bitmap_table_size: U32::new(self.table_size),
            flags: U32::new(self.flags),
            bitmap_type: self.kind,
            granularity_bits: self.granularity_bits,
            name_size: U16::new(self.name.len() as u16),
            extra_data_size: U32::new(self.extra_data.len() as u32),
        };
        out.extend_from_slice(raw.as_bytes());
        out.extend_from_slice(&self.extra_data);
        out.extend_from_slice(self.name.as_bytes());
        while !(out.len() - start).is_multiple_of(8) {
            out.push(0);
        }
    }

    /// qcow2-bitmap.c `check_dir_entry`.
    fn satisfies_constraints(&self, cluster_size: u64, virtual_size: u64) -> bool {
        let fail = self.table_size == 0
            || self.table_offset == 0
            || !self.table_offset.is_multiple_of(cluster_size)
            || self.table_size > MAX_TABLE_SIZE
            || self.granularity_bits > MAX_GRANULARITY_BITS
            || self.granularity_bits < MIN_GRANULARITY_BITS
            || self.flags & RESERVED_FLAGS != 0
            || self.name.len() > MAX_NAME_SIZE as usize
            || self.kind != TYPE_DIRTY_TRACKING;
        if fail {
            return false;
        }
        let phys = u64::from(self.table_size) * cluster_size;
        if phys > MAX_PHYS_SIZE {
            return false;
        }
        if !self.in_use() {
            let covered = (phys * 8).checked_shl(u32::from(self.granularity_bits));
            // covered may overflow u64 only when it is huge; then it covers any size
            if let Some(c) = covered {
                if c >> u32::from(self.granularity_bits) == phys * 8 && virtual_size > c {
                    return false;
                }
            }
        }
        true
    }
}

/// Parse a whole directory (`dir` is exactly `directory_size` bytes), as `bitmap_list_load`.
pub fn parse(
    dir: &[u8],
    nb_bitmaps: u32,
    cluster_size: u64,
    virtual_size: u64,
) -> Result<Vec<DirEntry>> {
    if dir.is_empty() {
        return Err(Error::invalid("Requested bitmap directory size is zero"));
    }
    if dir.len() as u64 > MAX_BITMAP_DIRECTORY_SIZE {
        return Err(Error::invalid("Requested bitmap directory size is too big"));
    }
    let broken = || Error::invalid("Broken bitmap directory");
    let mut out: Vec<DirEntry> = Vec::new();
    let mut off = 0usize;
    while off < dir.len() {
        let e = &dir[off..];
        let Ok((raw, _)) = RawDirEntry::ref_from_prefix(e) else {
            return Err(broken());
        };
        if out.len() as u32 >= nb_bitmaps {
            return Err(Error::invalid(
                "More bitmaps found than specified in header extension",
            ));
        }
        let name_size = raw.name_size.get() as usize;
        let extra_size = raw.extra_data_size.get() as usize;
        let len = (DIR_ENTRY_LEN + extra_size + name_size).div_ceil(8) * 8;
        if len > dir.len() - off {
            return Err(broken());
        }
        if extra_size != 0 {
            return Err(Error::unsupported("Bitmap extra data is not supported"));
        }
        let name_bytes = &e[DIR_ENTRY_LEN + extra_size..DIR_ENTRY_LEN + extra_size + name_size];
        let entry = DirEntry {
            table_offset: raw.bitmap_table_offset.get(),
            table_size: raw.bitmap_table_size.get(),
            flags: raw.flags.get(),
            kind: raw.bitmap_type,
            granularity_bits: raw.granularity_bits,
            name: String::from_utf8_lossy(name_bytes).into_owned(),
            extra_data: e[DIR_ENTRY_LEN..DIR_ENTRY_LEN + extra_size].to_vec(),
        };
        if name_size == 0 || !entry.satisfies_constraints(cluster_size, virtual_size) {
            return Err(Error::invalid(format!(
                "Bitmap '{}' doesn't satisfy the constraints",
                entry.name
            )));
        }
        if out.iter().any(|b| b.name == entry.name) {
            return Err(Error::invalid(format!(
                "Duplicate bitmap name '{}'",
                entry.name
            )));
        }
        out.push(entry);
        off += len;
    }
    if out.len() as u32 != nb_bitmaps {
        return Err(Error::invalid(
            "Less bitmaps found than specified in header extension",
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, flags: u32) -> DirEntry {
        DirEntry {
            table_offset: 0x10000,
            table_size: 1,
            flags,
            kind: 1,
            granularity_bits: 16,
            name: name.into(),
            extra_data: vec![],
        }
    }

    #[test]
    fn directory_round_trips() {
        let mut dir = Vec::new();
        entry("b0", FLAG_AUTO).encode(&mut dir);
        entry("b1", FLAG_IN_USE).encode(&mut dir);
        let v = parse(&dir, 2, 65536, 1 << 30).unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(v[1].name, "b1");
        assert!(v[1].in_use());
    }

    #[test]
    fn count_mismatch_and_truncation_are_refused() {
        let mut dir = Vec::new();
        entry("b0", FLAG_AUTO).encode(&mut dir);
        assert!(parse(&dir, 2, 65536, 1 << 20).is_err());
        assert!(parse(&dir[..20], 1, 65536, 1 << 20).is_err());
        let mut e = entry("b0", 1 << 5);
        e.flags = 1 << 5;
        let mut dir = Vec::new();
        e.encode(&mut dir);
        let err = parse(&dir, 1, 65536, 1 << 20).unwrap_err();
        assert_eq!(err.message(), "Bitmap 'b0' doesn't satisfy the constraints");
    }
}
