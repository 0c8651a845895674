//! Persistent dirty bitmaps (qcow2 spec, "Bitmaps extension"): load with every check QEMU
//! makes, the `in-use` / `auto` lifecycle, marking by the write path, and storing on close.
//!
//! Lifecycle:
//! - A bitmap with `in-use` set when the image is opened, or every bitmap when the autoclear
//!   `bitmaps` bit is clear, is inconsistent: listed, never exported, never trusted, kept on disk
//!   as it is.
//! - A read-write open loads every consistent bitmap and sets `in-use` on disk (directory
//!   rewritten in place and synced) before any write can happen.
//! - Every write, write-zeroes and discard marks the enabled (`auto`) bitmaps.
//! - `store` (clean close, or a bitmap command): metadata flushed, bitmap data written to new
//!   clusters (all-zero clusters as zero table entries), new tables and a new directory with
//!   `in-use` cleared, then the header points at the new directory, then the old clusters are
//!   freed. A crash in between leaves the old directory (with `in-use`) in place: inconsistent,
//!   never silently wrong.

use super::spec::bitmap_dir::{
    DirEntry, RawDirEntry, DIR_ENTRY_LEN, FLAG_AUTO, FLAG_IN_USE, TABLE_ENTRY_FLAG_ALL_ONES,
    TABLE_ENTRY_OFFSET_MASK, TABLE_ENTRY_RESERVED_MASK,
};
use super::spec::extensions::BitmapsExt;
use super::spec::table::BitmapTable;
use super::Qcow2;
use crate::bitmap::{DirtyBitmap, State};
use crate::error::{Error, ErrorKind, Result};
use crate::io::read_exact;
use crate::io::PastEof;
use std::sync::{Arc, RwLock};
use zerocopy::FromBytes;

/// One bitmap of the image.
#[derive(Debug, Clone)]
pub struct LiveBitmap {
    /// The directory entry as found on disk at open (or as created).
    pub entry: DirEntry,
    pub state: State,
    /// Bitmap data once loaded (always loaded for consistent bitmaps of a writable image).
    pub data: Option<Arc<RwLock<DirtyBitmap>>>,
}

/// The bitmaps of an image, guarded by `Qcow2::bitmaps_live`.
#[derive(Debug, Default)]
pub struct BitmapSet {
    pub list: Vec<LiveBitmap>,
    /// Why the directory could not be read, if it could not.
    pub error: Option<String>,
    /// Changed since the last store (marks, or a management command).
    pub changed: bool,
    /// `in-use` was set on disk by this open.
    pub marked_in_use: bool,
}

/// Summary for `bitmap --list` and `info`.
#[derive(Debug, Clone)]
pub struct BitmapInfo {
    pub name: String,
    pub granularity: u64,
    pub in_use: bool,
    pub auto: bool,
    pub state: State,
    /// Dirty bytes, when the data could be read.
    pub dirty_bytes: Option<u64>,
}

fn inconsistent(name: &str) -> Error {
    Error::new(
        ErrorKind::Inconsistent,
        format!(
            "Bitmap '{name}' is inconsistent and cannot be used{}",
            crate::error::hint(&format!(
                "'qnbd bitmap --recover IMAGE {name}' makes it usable (conservatively dirty); \
                 'qnbd bitmap --remove IMAGE {name}' drops it (then take a full backup)"
            ))
        ),
    )
}

/// Number of bitmap table entries a bitmap of `size` bytes at `granularity` needs.
pub fn table_size_for(size: u64, granularity: u64, cluster_size: u64) -> u64 {
    let bits = size.div_ceil(granularity);
    // QEMU serialises in 64-bit words
    let bytes = bits.div_ceil(64) * 8;
    bytes.div_ceil(cluster_size)
}

impl Qcow2 {
    pub(crate) fn bitmaps_lock(&self) -> std::sync::MutexGuard<'_, BitmapSet> {
        self.bitmaps_live.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Build the bitmap set at open.
    pub(crate) fn init_bitmaps(&self) -> BitmapSet {
        let mut set = BitmapSet::default();
        match self.bitmaps() {
            Ok(entries) => {
                for e in entries {
                    let state = if e.in_use() {
                        State::Inconsistent
                    } else if e.auto() {
                        State::Enabled
                    } else {
                        State::Disabled
                    };
                    set.list.push(LiveBitmap {
                        entry: e.clone(),
                        state,
                        data: None,
                    });
                }
            }
            Err(e) => set.error = Some(e.to_string()),
        }
        if let Some(b) = self.ext.bitmaps_untrusted {
            // listed as inconsistent, never used
            let mut dir = vec![
                0u8;
                b.directory_size
                    .min(super::spec::limits::MAX_BITMAP_DIRECTORY_SIZE)
                    as usize
            ];
            if read_exact(&**self.file(), &mut dir, b.directory_offset).is_ok() {
                if let Ok(entries) = super::spec::bitmap_dir::parse(
                    &dir,
                    b.nb_bitmaps,
                    self.cluster_size(),
                    self.header.size,
                ) {
                    for e in entries {
                        set.list.push(LiveBitmap {
                            entry: e,
                            state: State::Inconsistent,
                            data: None,
                        });
                    }
                }
            }
        }
        set
    }

    /// Read a bitmap's data from disk, with QEMU's checks (`load_bitmap_data`).
    fn load_bitmap_data(&self, e: &DirEntry, size: u64, file_len: u64) -> Result<DirtyBitmap> {
        let cs = self.cluster_size();
        let gran = e.granularity();
        let want = table_size_for(size, gran, cs);
        if want != u64::from(e.table_size) {
            return Err(Error::corrupt(format!(
                "Bitmap '{}': table size {} does not match the image size (expected {want})",
                e.name, e.table_size
            )));
        }
        let tbytes = u64::from(e.table_size) * 8;
        if e.table_offset.saturating_add(tbytes) > file_len {
            return Err(Error::corrupt(format!(
                "Bitmap '{}': bitmap table at {:#x} lies beyond the end of the file",
                e.name, e.table_offset
            )));
        }
        let table = BitmapTable::load(
            &**self.file(),
            e.table_offset,
            u64::from(e.table_size),
            PastEof::Error,
        )
        .map_err(|err| Error::io(format!("Could not read bitmap table of '{}'", e.name), err))?;
        let mut bm = DirtyBitmap::new(size, gran);
        let bits_per_cluster = cs * 8;
        let mut buf = vec![0u8; cs as usize];
        for (i, &entry) in table.iter().enumerate() {
            let off = entry & TABLE_ENTRY_OFFSET_MASK;
            if entry & TABLE_ENTRY_RESERVED_MASK != 0
                || (off != 0 && (entry & TABLE_ENTRY_FLAG_ALL_ONES != 0 || !off.is_multiple_of(cs)))
            {
                return Err(Error::corrupt(format!(
                    "Bitmap '{}': invalid bitmap table entry {i} ({entry:#x})",
                    e.name
                )));
            }
            let first_bit = i as u64 * bits_per_cluster;
            if off == 0 {
                if entry & TABLE_ENTRY_FLAG_ALL_ONES != 0 {
                    bm.set_range_bits(first_bit, bits_per_cluster);
                }
                continue;
            }
            if off >= file_len {
                return Err(Error::corrupt(format!(
                    "Bitmap '{}': data cluster {off:#x} lies beyond the end of the file",
                    e.name
                )));
            }
            crate::io::read_exact_or_zero(&**self.file(), &mut buf, off).map_err(|err| {
                Error::io(format!("Could not read bitmap data of '{}'", e.name), err)
            })?;
            bm.deserialize(first_bit, &buf);
        }
        Ok(bm)
    }

    /// Every bitmap with its state (and dirty bytes when it can be read).
    pub fn bitmap_infos(&self) -> Vec<BitmapInfo> {
        let list: Vec<LiveBitmap> = self.bitmaps_lock().list.clone();
        list.into_iter()
            .map(|b| {
                let dirty = if b.state == State::Inconsistent {
                    None
                } else {
                    self.bitmap(&b.entry.name)
                        .ok()
                        .map(|d| d.read().unwrap_or_else(|e| e.into_inner()).dirty_bytes())
                };
                BitmapInfo {
                    name: b.entry.name.clone(),
                    granularity: b.entry.granularity(),
                    in_use: b.entry.in_use(),
                    auto: b.entry.auto(),
                    state: b.state,
                    dirty_bytes: dirty,
                }
            })
            .collect()
    }

    /// The data of a consistent bitmap (loaded on first use).
    pub fn bitmap(&self, name: &str) -> Result<Arc<RwLock<DirtyBitmap>>> {
        // Lock order: the metadata lock before the bitmaps lock, as the writers take them
        // (they mark the bitmaps with the metadata lock held); never the other way round.
        let (size, file_len) = {
            let m = self.meta_read();
            (m.size, m.file_len)
        };
        let mut set = self.bitmaps_lock();
        let Some(b) = set.list.iter_mut().find(|b| b.entry.name == name) else {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("Bitmap '{name}' not found"),
            ));
        };
        if b.state == State::Inconsistent {
            return Err(inconsistent(name));
        }
        if let Some(d) = &b.data {
            return Ok(d.clone());
        }
        let data = Arc::new(RwLock::new(
            self.load_bitmap_data(&b.entry, size, file_len)?,
        ));
        b.data = Some(data.clone());
        Ok(data)
    }

    /// Mark every enabled bitmap dirty for `[off, off+len)` (called by the write path).
    pub(crate) fn mark_bitmaps(&self, off: u64, len: u64) {
        let mut set = self.bitmaps_lock();
        let mut any = false;
        for b in set.list.iter().filter(|b| b.state == State::Enabled) {
            if let Some(d) = &b.data {
                d.write().unwrap_or_else(|e| e.into_inner()).mark(off, len);
                any = true;
            }
        }
        if any {
            set.changed = true;
        }
    }

    /// Read-write open: load every consistent bitmap and set `in-use` on disk before the first
    /// write (directory rewritten in place, synced).
    pub(crate) fn bitmaps_open_rw(&self) -> Result<()> {
        let names: Vec<String> = {
            let set = self.bitmaps_lock();
            if let Some(e) = &set.error {
                return Err(Error::corrupt(format!("Could not load bitmaps: {e}")));
            }
            set.list
                .iter()
                .filter(|b| b.state != State::Inconsistent)
                .map(|b| b.entry.name.clone())
                .collect()
        };
        if names.is_empty() {
            return Ok(());
        }
        for n in &names {
            self.bitmap(n)?;
        }
        let Some(ext) = self.ext.bitmaps else {
            return Ok(());
        };
        // set in-use in the directory, in place
        let mut dir = vec![0u8; ext.directory_size as usize];
        read_exact(&**self.file(), &mut dir, ext.directory_offset)
            .map_err(|e| Error::io("Could not read the bitmap directory", e))?;
        let mut pos = 0usize;
        while let Ok((rec, _)) = RawDirEntry::mut_from_prefix(&mut dir[pos..]) {
            rec.flags.set(rec.flags.get() | FLAG_IN_USE);
            let (name, extra) = (
                usize::from(rec.name_size.get()),
                rec.extra_data_size.get() as usize,
            );
            pos += (DIR_ENTRY_LEN + extra + name).div_ceil(8) * 8;
            if pos > dir.len() {
                break;
            }
        }
        self.file()
            .write_at(&dir, ext.directory_offset)
            .map_err(|e| Error::io("Could not mark bitmaps in use", e))?;
        self.file()
            .sync()
            .map_err(|e| Error::io("Could not flush the bitmap directory", e))?;
        let mut set = self.bitmaps_lock();
        set.marked_in_use = true;
        Ok(())
    }

    /// Store every bitmap and rewrite the directory with `in-use` cleared (clean close, or
    /// after a bitmap command). A no-op when nothing needs storing.
    pub fn store_bitmaps(&self) -> Result<()> {
        {
            let set = self.bitmaps_lock();
            if !set.changed && !set.marked_in_use {
                return Ok(());
            }
        }
        if self.header.version < 3 {
            return Err(Error::unsupported(
                "Cannot store dirty bitmaps in qcow2 v2 files",
            ));
        }
        let _barrier = self.io_barrier.write().unwrap_or_else(|e| e.into_inner());
        let mut m = self.meta_write();
        self.prepare(&mut m)?;
        self.flush_tables(&mut m, super::alloc::Barrier::Held)?;
        let cs = self.cluster_size();
        let list: Vec<LiveBitmap> = self.bitmaps_lock().list.clone();
        let mut new_entries = Vec::new();
        // clusters of the on-disk directory, and of every bitmap not kept as it is, are freed
        // once the header points at the new directory
        let mut old_clusters: Vec<u64> = Vec::new();
        let old_entries: Vec<DirEntry> = match m.bitmaps_ext {
            Some(d) => {
                let first = d.directory_offset / cs;
                old_clusters.extend(first..first + d.directory_size.div_ceil(cs));
                let mut dir = vec![0u8; d.directory_size as usize];
                read_exact(&**self.file(), &mut dir, d.directory_offset)
                    .map_err(|e| Error::io("Could not read the bitmap directory", e))?;
                super::spec::bitmap_dir::parse(&dir, d.nb_bitmaps, cs, m.size)?
            }
            None => Vec::new(),
        };
        for b in &list {
            if b.state == State::Inconsistent && b.data.is_none() {
                // kept on disk as it is (its clusters stay referenced)
                new_entries.push(b.entry.clone());
                continue;
            }
            let data = match &b.data {
                Some(d) => d.clone(),
                None => continue,
            };
            let bm = data.read().unwrap_or_else(|e| e.into_inner()).clone();
            let tsize = table_size_for(m.size, bm.granularity(), cs);
            let mut table = BitmapTable::zeroed(tsize as usize);
            let mut buf = vec![0u8; cs as usize];
            let bits_per_cluster = cs * 8;
            for (i, t) in table.as_mut_slice().iter_mut().enumerate() {
                let first_bit = i as u64 * bits_per_cluster;
                if bm.range_clear(first_bit, bits_per_cluster) {
                    continue;
                }
                bm.serialize(first_bit, &mut buf);
                let off = self.alloc_meta_clusters(&mut m, 1)?;
                self.file()
                    .write_at(&buf, off)
                    .map_err(|e| Error::io("Could not write bitmap data", e))?;
                m.file_len = m.file_len.max(off + cs);
                *t = off;
            }
            let tclusters = (tsize * 8).div_ceil(cs).max(1);
            let toff = self.alloc_meta_clusters(&mut m, tclusters)?;
            let mut traw = table.encode();
            traw.resize((tclusters * cs) as usize, 0);
            self.file()
                .write_at(&traw, toff)
                .map_err(|e| Error::io("Could not write a bitmap table", e))?;
            m.file_len = m.file_len.max(toff + tclusters * cs);
            let mut flags = 0;
            if b.state == State::Enabled {
                flags |= FLAG_AUTO;
            }
            new_entries.push(DirEntry {
                table_offset: toff,
                table_size: tsize as u32,
                flags,
                kind: 1,
                granularity_bits: bm.granularity().trailing_zeros() as u8,
                name: b.entry.name.clone(),
                extra_data: Vec::new(),
            });
        }
        for old in &old_entries {
            let kept = new_entries
                .iter()
                .any(|n| n.name == old.name && n.table_offset == old.table_offset);
            if !kept {
                old_clusters.extend(self.bitmap_clusters(old, m.file_len));
            }
        }
        let new_ext = if new_entries.is_empty() {
            None
        } else {
            let mut dir = Vec::new();
            for e in &new_entries {
                e.encode(&mut dir);
            }
            let dclusters = (dir.len() as u64).div_ceil(cs);
            let doff = self.alloc_meta_clusters(&mut m, dclusters)?;
            self.file()
                .write_at(&dir, doff)
                .map_err(|e| Error::io("Could not write the bitmap directory", e))?;
            m.file_len = m.file_len.max(doff + dir.len() as u64);
            Some(BitmapsExt {
                nb_bitmaps: new_entries.len() as u32,
                directory_size: dir.len() as u64,
                directory_offset: doff,
            })
        };
        // new data, tables, directory and their refcounts durable before the header switch
        self.file()
            .sync()
            .map_err(|e| Error::io("Could not flush bitmaps", e))?;
        self.flush_tables(&mut m, super::alloc::Barrier::Held)?;
        self.rewrite_header(&mut m, new_ext)?;
        for c in old_clusters {
            self.adjust_refcount(&mut m, c, -1)?;
        }
        self.flush_tables(&mut m, super::alloc::Barrier::Held)?;
        drop(m);
        let mut set = self.bitmaps_lock();
        for (b, e) in set.list.iter_mut().zip(new_entries.iter()) {
            b.entry = e.clone();
        }
        set.changed = false;
        set.marked_in_use = false;
        Ok(())
    }

    /// Host clusters of a bitmap's table and data (for freeing).
    fn bitmap_clusters(&self, e: &DirEntry, file_len: u64) -> Vec<u64> {
        let cs = self.cluster_size();
        let mut out = Vec::new();
        let tbytes = u64::from(e.table_size) * 8;
        let first = e.table_offset / cs;
        out.extend(first..first + tbytes.div_ceil(cs));
        if e.table_offset + tbytes <= file_len {
            let entries = u64::from(e.table_size);
            if let Ok(table) =
                BitmapTable::load(&**self.file(), e.table_offset, entries, PastEof::Error)
            {
                for &entry in &table {
                    let off = entry & TABLE_ENTRY_OFFSET_MASK;
                    if off != 0 {
                        out.push(off / cs);
                    }
                }
            }
        }
        out
    }

    /// Replace the bitmap list (bitmap commands) and store it at once.
    pub fn set_bitmaps(&self, list: Vec<LiveBitmap>) -> Result<()> {
        {
            let mut set = self.bitmaps_lock();
            set.list = list;
            set.changed = true;
        }
        self.store_bitmaps()
    }

    /// The bitmap list (clone), for bitmap commands.
    pub fn live_bitmaps(&self) -> Result<Vec<LiveBitmap>> {
        let set = self.bitmaps_lock();
        if let Some(e) = &set.error {
            return Err(Error::corrupt(e.clone()));
        }
        Ok(set.list.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;
    use std::time::Duration;

    /// A writer holds the metadata lock and marks the bitmaps while another thread loads a
    /// bitmap: both take the locks in one order, so neither waits for the other forever.
    #[test]
    fn loading_a_bitmap_beside_a_writer_does_not_deadlock() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("b.qcow2");
        let made = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&p)
            .arg("1M")
            .status()
            .is_ok_and(|s| s.success())
            && Command::new("qemu-img")
                .args(["bitmap", "--add"])
                .arg(&p)
                .arg("b0")
                .status()
                .is_ok_and(|s| s.success());
        if !made {
            assert!(
                !crate::testing::in_ci(),
                "qemu-img is missing (CI: a failure)"
            );
            eprintln!("SKIP: qemu-img is missing");
            return;
        }
        let st = Arc::new(crate::io::mem::MemStorage::new(std::fs::read(&p).unwrap()));
        // read-only: the bitmap is loaded on first use
        let q = Arc::new(Qcow2::open(st, &Default::default()).unwrap());
        let (tx, rx) = std::sync::mpsc::channel();
        let q2 = q.clone();
        std::thread::spawn(move || {
            let guard = q2.meta_write();
            let q3 = q2.clone();
            let loader = std::thread::spawn(move || q3.bitmap("b0").map(|_| ()));
            std::thread::sleep(Duration::from_millis(100));
            q2.mark_bitmaps(0, 512);
            drop(guard);
            let ok = loader.join().map(|r| r.is_ok()).unwrap_or(false);
            let _ = tx.send(ok);
        });
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(10)),
            Ok(true),
            "bitmap load and writer deadlocked"
        );
    }
}
