//! qcow2 spec, "Snapshots": the internal snapshot table (variable-length entries, 8-aligned).
//!
//! The fixed part of an entry is a zerocopy big-endian record ([`RawSnapshotHeader`]); the
//! optional extra data fields are read as zerocopy `U64`s.

use super::limits::MAX_SNAPSHOT_EXTRA_DATA;
use crate::error::{Error, Result};
use zerocopy::byteorder::big_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// qcow2 spec, "Snapshots": the fixed part of a snapshot table entry as it lies on disk.
#[derive(Debug, Clone, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawSnapshotHeader {
    pub l1_table_offset: U64,
    pub l1_size: U32,
    pub id_str_size: U16,
    pub name_size: U16,
    pub date_sec: U32,
    pub date_nsec: U32,
    pub vm_clock_nsec: U64,
    pub vm_state_size: U32,
    pub extra_data_size: U32,
}

/// Fixed part of a snapshot table entry.
pub const ENTRY_HEADER_LEN: usize = std::mem::size_of::<RawSnapshotHeader>();
const _: () = assert!(ENTRY_HEADER_LEN == 40);

impl RawSnapshotHeader {
    /// Entry length without the padding: fixed part, extra data, id and name.
    fn unpadded_len(&self) -> usize {
        ENTRY_HEADER_LEN
            + self.extra_data_size.get() as usize
            + self.id_str_size.get() as usize
            + self.name_size.get() as usize
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub l1_table_offset: u64,
    pub l1_size: u32,
    pub id: String,
    pub name: String,
    pub date_sec: u32,
    pub date_nsec: u32,
    pub vm_clock_nsec: u64,
    pub vm_state_size: u64,
    pub disk_size: Option<u64>,
    /// `None` when the entry has no icount field (QEMU prints none then).
    pub icount: Option<u64>,
    /// Extra data kept verbatim for rewrites.
    pub extra: Vec<u8>,
}

/// From the 40-byte fixed part: total entry length (padded to 8). Bounded by the u16/u32 fields.
pub fn entry_len(head: &[u8; ENTRY_HEADER_LEN], index: usize) -> Result<usize> {
    let head: &RawSnapshotHeader = zerocopy::transmute_ref!(head);
    if head.extra_data_size.get() > MAX_SNAPSHOT_EXTRA_DATA {
        return Err(Error::invalid(format!(
            "Too much extra metadata in snapshot table entry {index}"
        )));
    }
    Ok(head.unpadded_len().div_ceil(8) * 8)
}

/// Parse one entry; `buf` holds the whole entry (`entry_len` bytes).
pub fn parse_entry(buf: &[u8], version: u32, index: usize) -> Result<Snapshot> {
    let Ok((head, _)) = RawSnapshotHeader::ref_from_prefix(buf) else {
        return Err(Error::invalid("Snapshot table entry truncated"));
    };
    let id_len = head.id_str_size.get() as usize;
    let name_len = head.name_size.get() as usize;
    let extra_len = head.extra_data_size.get() as usize;
    if buf.len() < head.unpadded_len() {
        return Err(Error::invalid("Snapshot table entry truncated"));
    }
    if version >= 3 && extra_len < 16 {
        return Err(Error::invalid(format!(
            "Snapshot table entry {index} is too small (extra data of {extra_len} bytes; version 3 needs 16)"
        )));
    }
    let extra = &buf[ENTRY_HEADER_LEN..ENTRY_HEADER_LEN + extra_len];
    let ids = ENTRY_HEADER_LEN + extra_len;
    // qcow2 spec, "Snapshots", extra data: vm_state_size_large, disk_size, icount, each present
    // when the extra data is long enough to hold it
    let extra_u64 = |at: usize| {
        let (v, _) = U64::read_from_prefix(extra.get(at..)?).ok()?;
        Some(v.get())
    };
    Ok(Snapshot {
        l1_table_offset: head.l1_table_offset.get(),
        l1_size: head.l1_size.get(),
        id: String::from_utf8_lossy(&buf[ids..ids + id_len]).into_owned(),
        name: String::from_utf8_lossy(&buf[ids + id_len..ids + id_len + name_len]).into_owned(),
        date_sec: head.date_sec.get(),
        date_nsec: head.date_nsec.get(),
        vm_clock_nsec: head.vm_clock_nsec.get(),
        vm_state_size: extra_u64(0).unwrap_or(u64::from(head.vm_state_size.get())),
        disk_size: extra_u64(8),
        icount: extra_u64(16),
        extra: extra.to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, name: &str, extra: &[u8]) -> Vec<u8> {
        let mut b = 0x5_0000u64.to_be_bytes().to_vec();
        b.extend_from_slice(&2u32.to_be_bytes());
        b.extend_from_slice(&(id.len() as u16).to_be_bytes());
        b.extend_from_slice(&(name.len() as u16).to_be_bytes());
        b.extend_from_slice(&7u32.to_be_bytes());
        b.extend_from_slice(&8u32.to_be_bytes());
        b.extend_from_slice(&9u64.to_be_bytes());
        b.extend_from_slice(&10u32.to_be_bytes());
        b.extend_from_slice(&(extra.len() as u32).to_be_bytes());
        b.extend_from_slice(extra);
        b.extend_from_slice(id.as_bytes());
        b.extend_from_slice(name.as_bytes());
        b
    }

    #[test]
    fn entry_fields_and_optional_extra_data() {
        let mut extra = 11u64.to_be_bytes().to_vec();
        extra.extend_from_slice(&12u64.to_be_bytes());
        let buf = entry("1", "snap", &extra);
        let head: [u8; ENTRY_HEADER_LEN] = buf[..ENTRY_HEADER_LEN].try_into().unwrap();
        assert_eq!(entry_len(&head, 0).unwrap(), 64);
        let s = parse_entry(&buf, 3, 0).unwrap();
        assert_eq!((s.l1_table_offset, s.l1_size), (0x5_0000, 2));
        assert_eq!((s.id.as_str(), s.name.as_str()), ("1", "snap"));
        assert_eq!((s.date_sec, s.date_nsec, s.vm_clock_nsec), (7, 8, 9));
        assert_eq!(
            (s.vm_state_size, s.disk_size, s.icount),
            (11, Some(12), None)
        );
        // v2 without extra data: the 32-bit vm_state_size
        let s = parse_entry(&entry("1", "snap", &[]), 2, 0).unwrap();
        assert_eq!((s.vm_state_size, s.disk_size), (10, None));
    }

    #[test]
    fn truncated_and_oversized_entries_are_refused() {
        let buf = entry("1", "snap", &[0; 16]);
        for n in [0, 39, 40, buf.len() - 1] {
            let err = parse_entry(&buf[..n], 3, 0).unwrap_err();
            assert_eq!(err.message(), "Snapshot table entry truncated");
        }
        let err = parse_entry(&entry("1", "s", &[0; 8]), 3, 4).unwrap_err();
        assert_eq!(
            err.message(),
            "Snapshot table entry 4 is too small (extra data of 8 bytes; version 3 needs 16)"
        );
        let mut head = [0u8; ENTRY_HEADER_LEN];
        head[36..].copy_from_slice(&(MAX_SNAPSHOT_EXTRA_DATA + 1).to_be_bytes());
        let err = entry_len(&head, 2).unwrap_err();
        assert_eq!(
            err.message(),
            "Too much extra metadata in snapshot table entry 2"
        );
    }
}
