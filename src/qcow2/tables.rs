//! Loading and storing tables, L2 tables through the bounded cache, and the mapping of one
//! guest range (QEMU's `qcow2_get_host_offset` + `qcow2_co_block_status`).
//!
//! Every read or write of a whole L1, L2, refcount or bitmap table goes through
//! [`Table::load`] / [`Table::store`] or [`L2Table::load`] / [`L2Table::store`]; the byte order
//! lives in `spec/table.rs`.

use super::compress;
use super::refcount;
use super::spec::entries::{SubclusterType, L1E_OFFSET_MASK, L2E_OFFSET_MASK};
use super::spec::table::{L2Table, Table, TableKind};
use super::Qcow2;
use crate::block::{Mapping, Run};
use crate::error::{Error, Result};
use crate::io::{read_exact_or_zero, read_words, Extent, PastEof, Storage};
use std::sync::Arc;

impl<K: TableKind> Table<K> {
    /// Read a table of `entries` entries at host offset `off`.
    pub(crate) fn load(
        st: &dyn Storage,
        off: u64,
        entries: u64,
        eof: PastEof,
    ) -> std::io::Result<Self> {
        Ok(Table::from_be_words(read_words(
            st,
            off,
            entries as usize,
            eof,
        )?))
    }

    /// Write the whole table at host offset `off`.
    pub(crate) fn store(&self, st: &dyn Storage, off: u64) -> std::io::Result<()> {
        st.write_at(&self.encode(), off)
    }
}

impl L2Table {
    /// Read the one-cluster L2 table at host offset `off` (past the end of the file reads as
    /// zeros).
    pub(crate) fn load(
        st: &dyn Storage,
        off: u64,
        cluster_size: u64,
        extended: bool,
    ) -> std::io::Result<Self> {
        let words = read_words(st, off, (cluster_size / 8) as usize, PastEof::Zeros)?;
        Ok(L2Table::from_be_words(words, extended))
    }

    /// Write the whole table at host offset `off`.
    pub(crate) fn store(&self, st: &dyn Storage, off: u64) -> std::io::Result<()> {
        st.write_at(&self.encode(), off)
    }
}

/// Load the L2 table at host offset `l2_off`: the dirty copy when a write changed it, else
/// through the cache.
pub(crate) fn load_l2_in(q: &Qcow2, m: &super::meta::Meta, l2_off: u64) -> Result<Arc<L2Table>> {
    if let Some(t) = m.dirty_l2.get(&l2_off) {
        return Ok(t.clone());
    }
    load_l2(q, l2_off)
}

/// Load (through the cache) the clean L2 table at host offset `l2_off`.
pub(crate) fn load_l2(q: &Qcow2, l2_off: u64) -> Result<Arc<L2Table>> {
    q.l2_cache.get_or_load(l2_off, || {
        L2Table::load(
            &**q.file(),
            l2_off,
            q.cluster_size(),
            q.header.extended_l2(),
        )
        .map_err(|e| Error::io(format!("Could not read L2 table at {l2_off:#x}"), e))
    })
}

/// Locate the L2 table for `off`: `Ok(None)` when the L1 entry is empty.
pub(crate) fn l2_for(
    q: &Qcow2,
    m: &super::meta::Meta,
    off: u64,
) -> Result<Option<(u64, Arc<L2Table>)>> {
    let l1_idx = off / q.header.l2_coverage();
    let Some(l1e) = usize::try_from(l1_idx).ok().and_then(|i| m.l1.get(i)) else {
        return Ok(None);
    };
    let l2_off = l1e & L1E_OFFSET_MASK;
    if l1e & super::spec::entries::L1E_RESERVED_MASK != 0 {
        return Err(Error::corrupt(format!(
            "L1 entry {l1e:#x} has reserved bits set (L1 index: {l1_idx:#x})"
        )));
    }
    if l2_off == 0 {
        return Ok(None);
    }
    if l2_off & (q.cluster_size() - 1) != 0 {
        return Err(Error::corrupt(format!(
            "L2 table offset {l2_off:#x} unaligned (L1 index: {l1_idx:#x})"
        )));
    }
    if l2_off >= m.file_len && !m.dirty_l2.contains_key(&l2_off) {
        return Err(Error::corrupt(format!(
            "L2 table offset {l2_off:#x} beyond the end of the file (L1 index: {l1_idx:#x})"
        )));
    }
    Ok(Some((l2_off, load_l2_in(q, m, l2_off)?)))
}

/// Map the range at `off` (`off < size`), at most `len` bytes, within one L2 table.
pub(crate) fn map(q: &Qcow2, off: u64, len: u64) -> Result<Run> {
    // decided before taking the metadata lock: the detection reads refcounts itself
    let prealloc = q.metadata_preallocation();
    let m = q.meta_read();
    map_in(q, &m, off, len, prealloc)
}

/// `map` for consecutive runs (see `BlockDevice::map_many`): the metadata lock is taken and the
/// L2 table looked up once per L2 table the runs cross, not once per run.
pub(crate) fn map_many(
    q: &Qcow2,
    off: u64,
    len: u64,
    max: usize,
    out: &mut Vec<Run>,
) -> Result<()> {
    let prealloc = q.metadata_preallocation();
    let cov = q.header.l2_coverage();
    let want_end = off.saturating_add(len);
    let mut pos = off;
    let mut left = max.max(1);
    loop {
        let m = q.meta_read();
        let end = want_end.min(m.size);
        let table_end = (pos / cov + 1).saturating_mul(cov).min(end);
        if table_end <= pos {
            // only the first table can be out of range (later ones are entered below `end`)
            return Err(out_of_range(pos));
        }
        let table = match l2_for(q, &m, pos) {
            Ok(t) => t,
            Err(_) if left < max.max(1) => return Ok(()),
            Err(e) => return Err(e),
        };
        let table = table.as_ref().map(|(o, t)| (*o, &**t));
        while pos < table_end && left > 0 {
            let run = match map_in_table(q, &m, pos, table_end, table, prealloc) {
                Ok(run) => run,
                // the runs before a bad entry stand; the caller meets the error if it asks
                // for that range itself
                Err(_) if left < max.max(1) => return Ok(()),
                Err(e) => return Err(e),
            };
            pos += run.len;
            left -= 1;
            out.push(run);
        }
        if left == 0 || pos >= end {
            return Ok(());
        }
    }
}

fn out_of_range(off: u64) -> Error {
    Error::new(
        crate::ErrorKind::OutOfRange,
        format!("map request at {off:#x} beyond the end of the image"),
    )
}

/// `map` with the metadata lock held. `prealloc`: look into the host file for holes inside
/// data clusters (QEMU's behaviour for preallocated images).
pub(crate) fn map_in(
    q: &Qcow2,
    m: &super::meta::Meta,
    off: u64,
    len: u64,
    prealloc: bool,
) -> Result<Run> {
    let cov = q.header.l2_coverage();
    let table_end = (off / cov + 1).saturating_mul(cov);
    let end = off.saturating_add(len).min(table_end).min(m.size);
    if end <= off {
        return Err(out_of_range(off));
    }
    let table = l2_for(q, m, off)?;
    map_in_table(
        q,
        m,
        off,
        end,
        table.as_ref().map(|(o, t)| (*o, &**t)),
        prealloc,
    )
}

/// The run at `off` up to `end` (`off < end`, both in the L2 table that covers `off`), given
/// that table (`None`: the L1 entry is empty) as `(host offset, entries)`.
fn map_in_table(
    q: &Qcow2,
    m: &super::meta::Meta,
    off: u64,
    end: u64,
    table: Option<(u64, &L2Table)>,
    prealloc: bool,
) -> Result<Run> {
    let h = &q.header;
    let cs = h.cluster_size();
    let cb = h.cluster_bits;
    let Some((l2_off, table)) = table else {
        return Ok(Run {
            len: end - off,
            mapping: Mapping::Backing {
                file: q.data_role(),
                host: None,
            },
        });
    };
    let ext = h.extended_l2();
    let spc: u64 = if ext { 32 } else { 1 };
    let sc_size = cs / spc;
    let l2_entries = h.l2_entries();
    let entry_at = |idx: u64| -> (u64, u64) { table.get(idx as usize) };

    let first_l2_idx = (off >> cb) % l2_entries;
    let first_sc = ((off & (cs - 1)) / sc_size) as u32;
    let (e0, b0) = entry_at(first_l2_idx);
    let ty = q.layout.classify(e0, b0, first_sc);
    // reserved bits of a standard descriptor: QEMU ignores them on I/O, `check` reports them;
    // we refuse to interpret such an entry
    if e0 & super::spec::entries::OFLAG_COMPRESSED == 0
        && e0 & super::spec::entries::L2E_RESERVED_MASK != 0
    {
        return Err(Error::corrupt(format!(
            "L2 entry {e0:#x} has reserved bits set (L2 offset: {l2_off:#x}, L2 index: {first_l2_idx:#x})"
        )));
    }
    if ty == SubclusterType::Compressed {
        let d = q.layout.compressed(e0);
        if d.host >= m.file_len {
            return Err(Error::corrupt(format!(
                "Compressed cluster at host offset {:#x} lies beyond the end of the file (L2 offset: {l2_off:#x}, L2 index: {first_l2_idx:#x})",
                d.host
            )));
        }
    }
    let guest_cluster = off & !(cs - 1);
    let host_cluster = e0 & L2E_OFFSET_MASK;
    match ty {
        SubclusterType::Invalid => {
            return Err(Error::corrupt(format!(
                "Invalid cluster entry found (L2 offset: {l2_off:#x}, L2 index: {first_l2_idx:#x})"
            )))
        }
        t if t.has_host_offset() => {
            if host_cluster & (cs - 1) != 0 {
                return Err(Error::corrupt(format!(
                    "Cluster allocation offset {host_cluster:#x} unaligned (L2 offset: {l2_off:#x}, L2 index: {first_l2_idx:#x})"
                )));
            }
            if h.has_data_file() && host_cluster != guest_cluster {
                return Err(Error::corrupt(format!(
                    "External data file host cluster offset {host_cluster:#x} does not match guest cluster offset: {guest_cluster:#x}, L2 index: {first_l2_idx:#x})"
                )));
            }
            if t == SubclusterType::Normal && !h.has_data_file() && host_cluster >= m.file_len {
                return Err(Error::corrupt(format!(
                    "Cluster allocation offset {host_cluster:#x} beyond the end of the file (L2 offset: {l2_off:#x}, L2 index: {first_l2_idx:#x})"
                )));
            }
        }
        _ => {}
    }

    // Extend the run over following subclusters of the same type (and contiguous host clusters
    // for types with a host offset); compressed runs stop at the cluster end.
    let run_end = if ty == SubclusterType::Compressed {
        (guest_cluster + cs).min(end)
    } else {
        let mut pos = guest_cluster + (first_sc as u64 + 1) * sc_size;
        let mut idx = first_l2_idx;
        let mut sc = first_sc + 1;
        if !ext && !ty.has_host_offset() {
            // Fast path over long unallocated or zero stretches: an entry equal to the first
            // one classifies the same (without subclusters the type depends on the entry only).
            let last = (end - guest_cluster)
                .div_ceil(cs)
                .min(l2_entries - first_l2_idx);
            let from = first_l2_idx as usize + 1;
            let to = first_l2_idx as usize + last as usize;
            let same = table
                .standard_entries(from, to)
                .map_or(0, |t| t.iter().take_while(|&&e| e == e0).count());
            pos += same as u64 * cs;
            idx += same as u64;
        }
        'outer: while pos < end {
            if sc as u64 == spc {
                idx += 1;
                sc = 0;
                if idx >= l2_entries {
                    break;
                }
            }
            let (e, b) = entry_at(idx);
            if ty.has_host_offset() {
                let expect = host_cluster + (idx - first_l2_idx) * cs;
                if e & L2E_OFFSET_MASK != expect {
                    break 'outer;
                }
            }
            if q.layout.classify(e, b, sc) != ty {
                break;
            }
            pos += sc_size;
            sc += 1;
        }
        pos.min(end)
    };
    let mut run_len = run_end - off;
    let in_cluster = off & (cs - 1);
    let role = q.data_role();
    let mapping = match ty {
        SubclusterType::Normal => {
            let host = if h.has_data_file() && e0 & L2E_OFFSET_MASK == 0 {
                guest_cluster + in_cluster
            } else {
                host_cluster + in_cluster
            };
            let mut zero = false;
            if prealloc {
                // QEMU recurses into the host file for preallocated images (BDRV_BLOCK_RECURSE)
                let st = q.data_storage()?;
                let flen = st
                    .len()
                    .map_err(|e| Error::io("Could not get file length", e))?;
                if host >= flen {
                    zero = true;
                } else {
                    match st.extent_at(host) {
                        Ok(Some(Extent::Hole(n))) => {
                            zero = true;
                            if host.saturating_add(n) < flen || n > run_len {
                                run_len = run_len.min(n.max(1));
                            }
                        }
                        Ok(Some(Extent::Data(n))) => run_len = run_len.min(n.max(1)),
                        _ => {}
                    }
                }
            }
            Mapping::Data {
                file: role,
                host,
                zero,
            }
        }
        SubclusterType::ZeroAlloc => Mapping::Zero {
            file: role,
            host: Some(host_cluster + in_cluster),
        },
        SubclusterType::ZeroPlain => Mapping::Zero {
            file: role,
            host: None,
        },
        SubclusterType::UnallocatedAlloc => Mapping::Backing {
            file: role,
            host: Some(host_cluster + in_cluster),
        },
        SubclusterType::UnallocatedPlain => Mapping::Backing {
            file: role,
            host: None,
        },
        SubclusterType::Compressed => Mapping::Compressed,
        SubclusterType::Invalid => unreachable_invalid()?,
    };
    Ok(Run {
        len: run_len,
        mapping,
    })
}

fn unreachable_invalid() -> Result<Mapping> {
    Err(Error::corrupt("Invalid cluster entry found"))
}

/// Read guest bytes of a compressed cluster.
pub(crate) fn read_compressed(q: &Qcow2, off: u64, buf: &mut [u8]) -> Result<()> {
    let cs = q.cluster_size();
    let in_cluster = (off & (cs - 1)) as usize;
    if in_cluster + buf.len() > cs as usize {
        return Err(Error::new(
            crate::ErrorKind::InvalidArgument,
            "compressed read crosses a cluster boundary",
        ));
    }
    let m = q.meta_read();
    let file_len = m.file_len;
    let Some((l2_off, table)) = l2_for(q, &m, off)? else {
        return Err(Error::corrupt("compressed read of an unallocated cluster"));
    };
    drop(m);
    let idx = (off >> q.header.cluster_bits) % q.header.l2_entries();
    let e = table.entry(idx as usize);
    if q.layout.classify(e, 0, 0) != SubclusterType::Compressed {
        return Err(Error::corrupt(format!(
            "cluster at guest offset {off:#x} changed while reading (L2 offset {l2_off:#x})"
        )));
    }
    let mut out = vec![0u8; cs as usize];
    read_compressed_entry(q, e, file_len, &mut out).map_err(|e| {
        Error::new(
            e.kind(),
            format!(
                "{} (guest offset {:#x}, L2 offset {l2_off:#x}, L2 index {idx:#x})",
                e.message(),
                off & !(cs - 1)
            ),
        )
    })?;
    buf.copy_from_slice(&out[in_cluster..in_cluster + buf.len()]);
    Ok(())
}

/// Decompress the cluster a compressed L2 entry describes into `out` (one cluster).
pub(crate) fn read_compressed_entry(
    q: &Qcow2,
    entry: u64,
    file_len: u64,
    out: &mut [u8],
) -> Result<()> {
    let desc = q.layout.compressed(entry);
    if desc.host >= file_len {
        return Err(Error::corrupt(format!(
            "Compressed cluster at host offset {:#x} lies beyond the end of the file",
            desc.host
        )));
    }
    // Data may end at EOF in the middle of a cluster; read what is there.
    let avail = (file_len - desc.host).min(desc.len) as usize;
    let mut input = vec![0u8; avail];
    read_exact_or_zero(&**q.file(), &mut input, desc.host).map_err(|e| {
        Error::io(
            format!("Could not read compressed cluster at {:#x}", desc.host),
            e,
        )
    })?;
    compress::decompress(q.header.compression_type, &input, out)
        .map_err(|e| Error::corrupt(format!("{} (host offset {:#x})", e.message(), desc.host)))
}

impl Qcow2 {
    /// QEMU's `qcow2_detect_metadata_preallocation`: does the image file refcount (almost) all
    /// of its allocated clusters, i.e. was it preallocated? Decides whether block status looks
    /// into the host file for holes inside data clusters.
    pub fn metadata_preallocation(&self) -> bool {
        *self
            .metadata_prealloc
            .get_or_init(|| refcount::detect_metadata_preallocation(self).unwrap_or(false))
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::fresh;
    use super::{map, map_many};
    use crate::block::{BlockDevice, FileRole, Mapping, NoBacking, Run, ZeroMode};

    /// Unallocated ranges show the layer below; written ones map to host clusters holding
    /// the bytes; zeroed ones are zero clusters, with or without their host cluster.
    #[test]
    fn mappings_follow_what_was_written() {
        let (q, _) = fresh(8 << 20, 65536);
        let r = map(&q, 0, 8 << 20).unwrap();
        assert!(
            matches!(r.mapping, Mapping::Backing { host: None, .. }),
            "{r:?}"
        );
        assert!(r.len > 0);
        q.write(128 << 10, &[0x5a; 65536], &NoBacking).unwrap();
        let r = map(&q, 128 << 10, 65536).unwrap();
        let Mapping::Data { file, host, zero } = r.mapping else {
            panic!("{r:?}")
        };
        assert_eq!((file, zero, r.len), (FileRole::Image, false, 65536));
        assert_eq!(host % 65536, 0);
        let mut b = vec![0u8; 65536];
        crate::io::read_exact_or_zero(&**q.file(), &mut b, host).unwrap();
        assert!(b.iter().all(|&x| x == 0x5a));
        q.write_zeroes(128 << 10, 65536, ZeroMode::KeepAllocated, &NoBacking)
            .unwrap();
        let r = map(&q, 128 << 10, 65536).unwrap();
        assert_eq!(
            r.mapping,
            Mapping::Zero {
                file: FileRole::Image,
                host: Some(host)
            }
        );
        q.write_zeroes(128 << 10, 65536, ZeroMode::MayUnmap, &NoBacking)
            .unwrap();
        let r = map(&q, 128 << 10, 65536).unwrap();
        assert!(
            matches!(r.mapping, Mapping::Zero { host: None, .. }),
            "{r:?}"
        );
    }

    /// `map_many` answers what repeated `map` calls answer, run for run.
    #[test]
    fn map_many_agrees_with_map() {
        let (q, _) = fresh(4 << 20, 65536);
        for (i, off) in [0u64, 65536, 3 << 16, 9 << 16, 10 << 16, 40 << 16]
            .iter()
            .enumerate()
        {
            q.write(*off, &vec![i as u8 + 1; 65536], &NoBacking)
                .unwrap();
        }
        q.write_zeroes(20 << 16, 2 << 16, ZeroMode::MayUnmap, &NoBacking)
            .unwrap();
        let mut many: Vec<Run> = Vec::new();
        map_many(&q, 0, 4 << 20, 4096, &mut many).unwrap();
        let mut one = Vec::new();
        let mut off = 0;
        while off < 4 << 20 {
            let r = map(&q, off, (4 << 20) - off).unwrap();
            off += r.len;
            one.push(r);
        }
        assert_eq!(many.iter().map(|r| r.len).sum::<u64>(), 4 << 20);
        // the same bytes in the same states, however the runs are cut
        let expand = |runs: &[Run]| {
            let mut v = Vec::new();
            for r in runs {
                for k in 0..r.len / 65536 {
                    v.push(match r.mapping {
                        Mapping::Data { host, file, zero } => Mapping::Data {
                            host: host + k * 65536,
                            file,
                            zero,
                        },
                        m => m,
                    });
                }
            }
            v
        };
        assert_eq!(expand(&many), expand(&one));
    }
}
