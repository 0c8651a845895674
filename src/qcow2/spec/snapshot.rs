//! qcow2 spec, "Snapshots": the internal snapshot table (variable-length entries, 8-aligned).

use super::limits::MAX_SNAPSHOT_EXTRA_DATA;
use crate::error::{Error, Result};

/// Fixed part of a snapshot table entry.
pub const ENTRY_HEADER_LEN: usize = 40;

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

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// From the 40-byte fixed part: total entry length (padded to 8). Bounded by the u16/u32 fields.
pub fn entry_len(head: &[u8; ENTRY_HEADER_LEN], index: usize) -> Result<usize> {
    let id_len = be16(&head[12..]) as usize;
    let name_len = be16(&head[14..]) as usize;
    let extra = be32(&head[36..]);
    if extra > MAX_SNAPSHOT_EXTRA_DATA {
        return Err(Error::invalid(format!(
            "Too much extra metadata in snapshot table entry {index}"
        )));
    }
    let raw = ENTRY_HEADER_LEN + extra as usize + id_len + name_len;
    Ok(raw.div_ceil(8) * 8)
}

/// Parse one entry; `buf` holds the whole entry (`entry_len` bytes).
pub fn parse_entry(buf: &[u8], version: u32, index: usize) -> Result<Snapshot> {
    if buf.len() < ENTRY_HEADER_LEN {
        return Err(Error::invalid("Snapshot table entry truncated"));
    }
    let id_len = be16(&buf[12..]) as usize;
    let name_len = be16(&buf[14..]) as usize;
    let extra_len = be32(&buf[36..]) as usize;
    let need = ENTRY_HEADER_LEN + extra_len + id_len + name_len;
    if buf.len() < need {
        return Err(Error::invalid("Snapshot table entry truncated"));
    }
    if version >= 3 && extra_len < 16 {
        return Err(Error::invalid(format!(
            "Snapshot table entry {index} is too small (extra data of {extra_len} bytes; version 3 needs 16)"
        )));
    }
    let extra = &buf[ENTRY_HEADER_LEN..ENTRY_HEADER_LEN + extra_len];
    let ids = ENTRY_HEADER_LEN + extra_len;
    let vm_state_size = if extra_len >= 8 {
        be64(extra)
    } else {
        u64::from(be32(&buf[32..]))
    };
    Ok(Snapshot {
        l1_table_offset: be64(buf),
        l1_size: be32(&buf[8..]),
        id: String::from_utf8_lossy(&buf[ids..ids + id_len]).into_owned(),
        name: String::from_utf8_lossy(&buf[ids + id_len..ids + id_len + name_len]).into_owned(),
        date_sec: be32(&buf[16..]),
        date_nsec: be32(&buf[20..]),
        vm_clock_nsec: be64(&buf[24..]),
        vm_state_size,
        disk_size: (extra_len >= 16).then(|| be64(&extra[8..])),
        icount: (extra_len >= 24).then(|| be64(&extra[16..])),
        extra: extra.to_vec(),
    })
}
