//! The qcow2 driver. Table of contents:
//!
//! | file | owns |
//! | --- | --- |
//! | `spec/` | on-disk codecs: header, extensions, L1/L2 entries, refcount blocks, snapshots, bitmap directory |
//! | `mod.rs` (here) | open (header, extensions, L1, snapshots, bitmap directory), `BlockDevice` |
//! | `meta.rs` | the metadata state writers change (`Meta`, under `Qcow2::meta`) |
//! | `tables.rs` | L2 tables through the bounded cache; the mapping of one guest range |
//! | `refcount.rs` | refcount table and blocks: reads, changes, allocation, write-back |
//! | `alloc.rs` | the write side: cluster allocation, COW, zeroes, discard, refcount updates, ordered flushes, resize, compressed writes |
//! | `bitmaps.rs` | persistent dirty bitmaps: load, `in-use`, store on close |
//! | `cluster_set.rs` | sets of host clusters (metadata overlap checks) |
//! | `compress.rs` | deflate / zstd clusters |
//! | `create.rs` | new images (qemu-img create's layouts) |
//! | `luks.rs` | the LUKS header, recognised for `info` (encrypted images are never served) |
//! | `check.rs` | consistency check and repair (qemu-img check) |
//!
//! This module never opens other files: backing and data files are opened by `open.rs` under
//! the open policy and handed in.

pub mod alloc;
pub mod bitmaps;
pub mod check;
mod cluster_set;
pub mod compress;
pub mod create;
mod header_write;
pub mod luks;
mod meta;
pub mod refcount;
pub mod spec;
pub mod tables;

use crate::block::{BlockDevice, FileRole, Run};
use crate::cache::MetaCache;
use crate::error::{Error, Result};
use crate::io::PastEof;
use crate::io::{read_exact, Storage};
use spec::bitmap_dir::{self, DirEntry};
use spec::entries::EntryLayout;
use spec::extensions::Extensions;
use spec::header::{Header, HeaderError, RAW_HEADER_LEN};
use spec::snapshot::{self, Snapshot};
use spec::table::{L1Table, L2Table};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

/// QEMU's default maximum L2 cache (32 MiB on Linux), enough to map the whole image when smaller.
pub const DEFAULT_L2_CACHE_MAX: u64 = 32 << 20;

/// Tuning and mode for opening a qcow2 image.
#[derive(Debug, Clone, Default)]
pub struct Qcow2Options {
    /// Bytes of L2 tables to keep in memory (`l2-cache-size`); `None` = QEMU's default.
    pub l2_cache_size: Option<u64>,
    /// Open for metadata queries only (`info`): encrypted images and missing data files are
    /// tolerated; data reads are refused.
    pub no_io: bool,
    /// Read-only or read-write.
    pub access: crate::block::Access,
    /// Present this internal snapshot (by id or name) instead of the active image (read-only).
    pub snapshot: Option<String>,
}

#[derive(Debug)]
pub struct Qcow2 {
    file: Arc<dyn Storage>,
    data_file: Option<Arc<dyn Storage>>,
    header: Header,
    ext: Extensions,
    layout: EntryLayout,
    /// Metadata that writes change (L1, dirty tables, refcounts, sizes); see `alloc.rs`.
    meta: RwLock<meta::Meta>,
    /// Held shared by reads from mapping to the end of their data I/O; taken exclusively before
    /// freed clusters become reusable, so a freed cluster never changes under a reader.
    io_barrier: RwLock<()>,
    /// Changes (before any of them can be allocated again) whenever freed clusters become
    /// reusable: a read that did not hold the barrier checks it did not change meanwhile.
    reuse_epoch: AtomicU64,
    /// Persistent dirty bitmaps (see `bitmaps.rs`).
    bitmaps_live: std::sync::Mutex<bitmaps::BitmapSet>,
    size: AtomicU64,
    l2_cache: MetaCache<L2Table>,
    refblock_cache: MetaCache<Vec<u8>>,
    access: crate::block::Access,
    backing_name: Option<String>,
    snapshots: Vec<Snapshot>,
    bitmaps: Result<Vec<DirEntry>, String>,
    metadata_prealloc: OnceLock<bool>,
    no_io: bool,
    luks: Option<luks::LuksHeader>,
}

fn read_err(what: &str, off: u64) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |e| Error::io(format!("Could not read {what} at {off:#x}"), e)
}

impl Qcow2 {
    /// Open a qcow2 image on `file`. Validation follows QEMU's `qcow2_do_open`, so the first
    /// problem reported is the one QEMU reports.
    pub fn open(file: Arc<dyn Storage>, opts: &Qcow2Options) -> Result<Qcow2> {
        let file_len = file
            .len()
            .map_err(|e| Error::io("Could not get the image length", e))?;
        // The fixed header first: the cluster size bounds how much more to read.
        let mut head = vec![0u8; RAW_HEADER_LEN];
        let n = file
            .read_at(&mut head, 0)
            .map_err(read_err("the qcow2 header", 0))?;
        head.truncate(n);
        let first_cluster_len = match Header::parse(&head) {
            Ok(h) => h.cluster_size(),
            Err(HeaderError::UnknownIncompatible { header, .. }) => header.cluster_size(),
            Err(HeaderError::Fatal(e)) => {
                // A short buffer can fail on header_length; retry below with the real cluster.
                if n >= 24 && head[..4] == spec::header::QCOW_MAGIC.to_be_bytes() {
                    let bits = u32::from_be_bytes([head[20], head[21], head[22], head[23]]);
                    if (9..=21).contains(&bits) {
                        1u64 << bits
                    } else {
                        return Err(e);
                    }
                } else {
                    return Err(e);
                }
            }
        };
        let mut first = vec![0u8; first_cluster_len as usize];
        let n = file
            .read_at(&mut first, 0)
            .map_err(read_err("the first cluster", 0))?;
        // bytes past EOF read as zeros, as in QEMU
        let _ = n;
        let header_res = Header::parse(&first);
        let header = match header_res {
            Ok(h) => h,
            Err(HeaderError::Fatal(e)) => return Err(e),
            Err(HeaderError::UnknownIncompatible { header, mask }) => {
                let ext = Extensions::parse(
                    ext_area(&first, &header),
                    header.cluster_size(),
                    header.autoclear_features & spec::header::autoclear::BITMAPS != 0,
                )
                .unwrap_or_default();
                return Err(Error::unsupported(ext.unsupported_features_message(mask)));
            }
        };
        let cs = header.cluster_size();
        let ext = Extensions::parse(
            ext_area(&first, &header),
            cs,
            header.autoclear_features & spec::header::autoclear::BITMAPS != 0,
        )?;
        if header.has_data_file() && ext.data_file.is_none() && !opts.no_io {
            return Err(Error::invalid("'data-file' is required for this image"));
        }
        if header.crypt_method != 0 && !opts.no_io {
            return Err(Error::unsupported(format!(
                "encrypted images are not supported (qcow2 crypt_method {}: {}); decrypt it with qemu-img convert first",
                header.crypt_method,
                if header.crypt_method == 1 { "AES" } else { "LUKS" }
            )));
        }
        if header.crypt_method == spec::header::CRYPT_LUKS && ext.crypto.is_none() && !opts.no_io {
            return Err(Error::invalid(format!(
                "Missing CRYPTO header for crypt method {}",
                header.crypt_method
            )));
        }
        let backing_name = if header.backing_file_offset != 0 {
            let off = header.backing_file_offset as usize;
            let len = header.backing_file_size as usize;
            // bounded by Header::parse: off + len <= cluster size
            let raw = first
                .get(off..off + len)
                .ok_or_else(|| Error::invalid("Backing file name too long"))?;
            let end = raw.iter().position(|&c| c == 0).unwrap_or(raw.len());
            Some(String::from_utf8_lossy(&raw[..end]).into_owned())
        } else {
            None
        };

        // L1 table (bounded to 32 MiB by the header checks)
        let l1_bytes = header.l1_size as u64 * 8;
        if header.l1_size > 0 && header.l1_table_offset.saturating_add(l1_bytes) > file_len {
            return Err(Error::corrupt(format!(
                "Active L1 table at {:#x} ({} entries) lies beyond the end of the file ({:#x})",
                header.l1_table_offset, header.l1_size, file_len
            )));
        }
        let l1 = L1Table::load(
            &*file,
            header.l1_table_offset,
            u64::from(header.l1_size),
            PastEof::Error,
        )
        .map_err(read_err("the L1 table", header.l1_table_offset))?;

        let snapshots = read_snapshots(&*file, &header, file_len)?;
        if opts.access == crate::block::Access::ReadWrite && !opts.no_io {
            // the write side keeps every snapshot's L1 table out of reach of allocation: each
            // must be a valid table (QEMU's qcow2_validate_table, checked here at open)
            for sn in &snapshots {
                validate_snapshot_l1(sn, header.cluster_size(), file_len)
                    .map_err(|e| e.context("the image cannot be opened read-write"))?;
            }
        }
        let mut header = header;
        let mut l1 = l1;
        if let Some(want) = &opts.snapshot {
            // `-l ID_OR_NAME`, `-l snapshot.id=ID` or `-l snapshot.name=NAME`, as qemu-nbd
            // (both snapshot.id and snapshot.name: the snapshot must have both)
            let sn = match snapshot_selector(want) {
                Some((None, None)) => None,
                Some((id, name)) => snapshots.iter().find(|s| {
                    id.as_deref().is_none_or(|i| i == s.id)
                        && name.as_deref().is_none_or(|n| n == s.name)
                }),
                None => snapshots
                    .iter()
                    .find(|s| s.id == *want)
                    .or_else(|| snapshots.iter().find(|s| s.name == *want)),
            }
            .ok_or_else(|| {
                Error::new(
                    crate::ErrorKind::NotFound,
                    format!("Can't find snapshot '{want}'"),
                )
            })?;
            validate_snapshot_l1(sn, header.cluster_size(), file_len)
                .map_err(|e| e.context("Failed to load snapshot"))?;
            l1 = L1Table::load(
                &*file,
                sn.l1_table_offset,
                u64::from(sn.l1_size),
                PastEof::Error,
            )
            .map_err(read_err("a snapshot L1 table", sn.l1_table_offset))?;
            header.size = sn.disk_size.unwrap_or(header.size);
            if header.l1_entries_needed() > l1.len() as u64 {
                return Err(Error::corrupt(format!(
                    "Snapshot '{}': L1 table too small for its disk size",
                    sn.name
                )));
            }
            header.l1_table_offset = sn.l1_table_offset;
            header.l1_size = sn.l1_size;
        }

        // A broken bitmap directory makes the image unusable, as in QEMU (its bitmaps could
        // not be kept consistent by any writer).
        let bitmaps = match ext.bitmaps {
            None => Ok(Vec::new()),
            Some(b) => match load_bitmap_dir(&*file, &header, b, file_len) {
                Ok(v) => Ok(v),
                Err(e) => return Err(e),
            },
        };

        let luks = match (header.crypt_method, ext.crypto) {
            (spec::header::CRYPT_LUKS, Some(c)) if c.offset < file_len => {
                let mut b = vec![0u8; luks::LUKS_HEADER_LEN];
                read_exact(&*file, &mut b, c.offset)
                    .ok()
                    .and_then(|_| luks::LuksHeader::parse(&b).ok())
            }
            _ => None,
        };
        let l2_table_bytes = cs;
        let l2_cache_bytes = opts.l2_cache_size.unwrap_or_else(|| {
            // enough to cover the whole image, capped like QEMU
            let tables = header.l1_entries_needed().max(1);
            (tables * l2_table_bytes).min(DEFAULT_L2_CACHE_MAX)
        });
        let l2_entries = (l2_cache_bytes / l2_table_bytes).max(2) as usize;
        let layout = EntryLayout {
            cluster_bits: header.cluster_bits,
            extended_l2: header.extended_l2(),
            data_file: header.has_data_file(),
        };
        if opts.access == crate::block::Access::ReadWrite && !opts.no_io {
            if header.is_corrupt() {
                return Err(Error::new(
                    crate::ErrorKind::Denied,
                    "qcow2: Image is corrupt; cannot be opened read/write",
                ));
            }
            if header.is_dirty() {
                // Lazy refcounts were not written back before a crash: rebuild them before the
                // first allocation, as QEMU does on a read-write open.
                drop(first);
                let ro = Qcow2::open(
                    file.clone(),
                    &Qcow2Options {
                        access: crate::block::Access::ReadOnly,
                        ..opts.clone()
                    },
                )?;
                let out = check::check(&ro, check::Repair::All);
                drop(ro);
                if let Some(f) = out.failure {
                    return Err(Error::corrupt(format!("Could not repair dirty image: {f}")));
                }
                let again = Qcow2::open(
                    file.clone(),
                    &Qcow2Options {
                        access: crate::block::Access::ReadOnly,
                        ..opts.clone()
                    },
                )?;
                if again.header().is_dirty() {
                    return Err(Error::corrupt(
                        "Could not repair dirty image: refcount errors remain (see 'qnbd check')",
                    ));
                }
                drop(again);
                return Qcow2::open(file, opts);
            }
        }
        let meta = meta::Meta::new(&header, ext.bitmaps, l1, file_len);
        let q = Qcow2 {
            file,
            data_file: None,
            l2_cache: MetaCache::new(l2_entries),
            refblock_cache: MetaCache::new((l2_entries / 4).max(4)),
            size: AtomicU64::new(header.size),
            meta: RwLock::new(meta),
            io_barrier: RwLock::new(()),
            reuse_epoch: AtomicU64::new(0),
            bitmaps_live: std::sync::Mutex::new(bitmaps::BitmapSet::default()),
            access: if opts.no_io || opts.snapshot.is_some() {
                crate::block::Access::ReadOnly
            } else {
                opts.access
            },
            header,
            ext,
            layout,
            backing_name,
            snapshots,
            bitmaps,
            metadata_prealloc: OnceLock::new(),
            no_io: opts.no_io,
            luks,
        };
        let set = q.init_bitmaps();
        *q.bitmaps_lock() = set;
        if q.access == crate::block::Access::ReadWrite {
            q.bitmaps_open_rw()?;
        }
        Ok(q)
    }

    /// Attach the external data file (opened by `open.rs` under the open policy).
    pub fn set_data_file(&mut self, data: Arc<dyn Storage>) {
        self.data_file = Some(data);
    }

    /// The LUKS header of an encrypted image (for `info`).
    pub fn luks(&self) -> Option<&luks::LuksHeader> {
        self.luks.as_ref()
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    pub fn extensions(&self) -> &Extensions {
        &self.ext
    }

    pub fn backing_name(&self) -> Option<&str> {
        self.backing_name.as_deref()
    }

    /// `qemu-img rebase -u`: name `backing` (with format `format`) as the backing file, or none,
    /// in the header, as QEMU's `qcow2_change_backing_file` + `qcow2_update_header` do: the
    /// whole first cluster is rewritten (fixed header, extensions, the name, zeros) in one
    /// synced write. For an image opened with `no_io` on writable storage and closed right
    /// after: this handle's own view of the header is not updated. Errors carry the errno
    /// or the words QEMU reports (`EINVAL` for a name over 1023 bytes; "No space left in the
    /// file header" when the header would not fit in the first cluster).
    pub fn change_backing_file(&self, backing: Option<&str>, format: Option<&str>) -> Result<()> {
        let errno =
            |n: i32, what: &str| Error::io(what.to_string(), std::io::Error::from_raw_os_error(n));
        if backing.is_some_and(|b| b.len() > 1023) {
            return Err(errno(libc::EINVAL, "backing file name too long"));
        }
        let mut h = self.header.clone();
        h.backing_file_offset = 0;
        h.backing_file_size = 0;
        let mut ext = self.ext.clone();
        ext.backing_format = backing.and(format).map(str::to_string);
        let mut area = h.encode_area(&ext, backing);
        let cs = self.cs();
        if area.len() as u64 > cs {
            return Err(Error::new(
                crate::ErrorKind::InvalidArgument,
                "No space left in the file header",
            ));
        }
        area.resize(cs as usize, 0);
        header_write::write_header(
            &**self.file(),
            header_write::HeaderWrite::Area {
                at: 0,
                bytes: &area,
            },
        )
        .map_err(|e| Error::io("Could not update the image header", e.into_io()))
    }

    pub fn backing_format(&self) -> Option<&str> {
        self.ext.backing_format.as_deref()
    }

    pub fn data_file_name(&self) -> Option<&str> {
        self.ext.data_file.as_deref()
    }

    pub fn snapshots(&self) -> &[Snapshot] {
        &self.snapshots
    }

    /// The bitmap directory, or why it could not be loaded.
    pub fn bitmaps(&self) -> Result<&[DirEntry], &str> {
        self.bitmaps.as_deref().map_err(|e| e.as_str())
    }

    pub fn file(&self) -> &Arc<dyn Storage> {
        &self.file
    }

    pub fn file_len(&self) -> u64 {
        self.meta_read().file_len
    }

    pub(crate) fn meta_read(&self) -> std::sync::RwLockReadGuard<'_, meta::Meta> {
        // A panic while holding the lock would have left tables half updated; the corrupt flag
        // set by the write path stops further writes, so reading on is safe.
        self.meta.read().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn meta_write(&self) -> std::sync::RwLockWriteGuard<'_, meta::Meta> {
        self.meta.write().unwrap_or_else(|e| e.into_inner())
    }

    pub fn access(&self) -> crate::block::Access {
        self.access
    }

    pub fn cluster_size(&self) -> u64 {
        self.header.cluster_size()
    }

    fn data_storage(&self) -> Result<&Arc<dyn Storage>> {
        if self.header.has_data_file() {
            self.data_file.as_ref().ok_or_else(|| {
                Error::new(
                    crate::ErrorKind::Denied,
                    "the external data file of this image is not open",
                )
            })
        } else {
            Ok(&self.file)
        }
    }

    fn data_role(&self) -> FileRole {
        if self.header.has_data_file() {
            FileRole::DataFile
        } else {
            FileRole::Image
        }
    }
}

impl Qcow2 {
    /// Grow or shrink the guest size (`resize`). Shrinking releases the clusters past the end.
    pub fn resize(&self, new_size: u64) -> Result<()> {
        alloc::resize(self, new_size, &crate::block::NoBacking)
    }
}

impl Drop for Qcow2 {
    /// Clean close: make every completed write and its metadata durable.
    fn drop(&mut self) {
        if self.access == crate::block::Access::ReadWrite {
            if let Err(e) = alloc::flush(self) {
                eprintln!(
                    "{}: could not flush the image on close: {e}",
                    crate::error::program()
                );
                return;
            }
            // bitmaps stay in-use (inconsistent) if storing them fails: never silently wrong
            if let Err(e) = self.store_bitmaps() {
                eprintln!(
                    "{}: could not store dirty bitmaps on close: {e}",
                    crate::error::program()
                );
            }
        }
    }
}

/// Bytes of the first cluster holding header extensions.
fn ext_area<'a>(first: &'a [u8], h: &Header) -> &'a [u8] {
    let start = (h.header_length as usize).min(first.len());
    let end = (h.extensions_end() as usize).clamp(start, first.len());
    &first[start..end]
}

/// QEMU's `qcow2_validate_table` for a snapshot's L1 table, with its messages.
fn validate_snapshot_l1(sn: &Snapshot, cluster_size: u64, file_len: u64) -> Result<()> {
    let bytes = u64::from(sn.l1_size) * 8;
    let why = if bytes > spec::limits::MAX_L1_SIZE {
        "Snapshot L1 table too large"
    } else if !sn.l1_table_offset.is_multiple_of(cluster_size) {
        "Snapshot L1 table offset invalid"
    } else if sn.l1_table_offset.saturating_add(bytes) > file_len {
        "Snapshot L1 table exceeds the end of the file"
    } else {
        return Ok(());
    };
    Err(Error::corrupt(format!(
        "{why} (snapshot '{}', id {})",
        sn.name, sn.id
    )))
}

fn read_snapshots(file: &dyn Storage, h: &Header, file_len: u64) -> Result<Vec<Snapshot>> {
    let mut out = Vec::new();
    let mut off = h.snapshots_offset;
    let mut total = 0u64;
    for i in 0..h.nb_snapshots as usize {
        let mut head = [0u8; snapshot::ENTRY_HEADER_LEN];
        if off.saturating_add(head.len() as u64) > file_len {
            return Err(Error::invalid(format!(
                "Snapshot table entry {i} lies beyond the end of the file"
            )));
        }
        read_exact(file, &mut head, off).map_err(read_err("the snapshot table", off))?;
        let len = snapshot::entry_len(&head, i)?;
        total += len as u64;
        // QCOW_MAX_SNAPSHOTS_SIZE
        if total > 1024 * spec::limits::MAX_SNAPSHOTS {
            return Err(Error::invalid("Snapshot table exceeds the maximum size"));
        }
        let mut buf = vec![0u8; len];
        // the padding of the last entry may lie past the end of the file
        crate::io::read_exact_or_zero(file, &mut buf, off)
            .map_err(read_err("the snapshot table", off))?;
        out.push(snapshot::parse_entry(&buf, h.version, i)?);
        off += len as u64;
    }
    Ok(out)
}

fn load_bitmap_dir(
    file: &dyn Storage,
    h: &Header,
    b: spec::extensions::BitmapsExt,
    file_len: u64,
) -> Result<Vec<DirEntry>> {
    if b.directory_size == 0 {
        return Err(Error::invalid("Requested bitmap directory size is zero"));
    }
    if b.directory_offset.saturating_add(b.directory_size) > file_len {
        return Err(Error::corrupt(
            "bitmap directory lies beyond the end of the file",
        ));
    }
    let mut dir = vec![0u8; b.directory_size as usize];
    read_exact(file, &mut dir, b.directory_offset)
        .map_err(read_err("the bitmap directory", b.directory_offset))?;
    bitmap_dir::parse(&dir, b.nb_bitmaps, h.cluster_size(), h.size)
}

pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |e| Error::io(what, e)
}

/// Helpers of the write side (`alloc.rs`, `refcount.rs`, `bitmaps.rs`).
impl Qcow2 {
    pub(crate) fn cs(&self) -> u64 {
        self.header.cluster_size()
    }

    pub(crate) fn data_st(&self) -> Result<&Arc<dyn Storage>> {
        self.data_storage()
    }

    /// Write to the header cluster and make it durable (see `header_write.rs`).
    pub(crate) fn write_header(&self, w: header_write::HeaderWrite<'_>) -> Result<()> {
        header_write::write_header(&*self.file, w).map_err(|e| match e {
            header_write::HeaderWriteError::Write(e) => {
                Error::io("Could not update the qcow2 header", e)
            }
            header_write::HeaderWriteError::Sync(e) => {
                Error::io("Could not flush the qcow2 header", e)
            }
        })
    }

    /// Write one header field in place and make it durable.
    pub(crate) fn write_header_field(&self, f: spec::header::HeaderField) -> Result<()> {
        self.write_header(header_write::HeaderWrite::Field(f))
    }

    /// Set the corrupt bit on disk (best effort) and refuse further writes.
    pub(crate) fn mark_corrupt(&self, m: &mut meta::Meta, why: String) -> Error {
        if !m.corrupt {
            m.corrupt = true;
            let bits = self.header.incompatible_features | spec::header::incompat::CORRUPT;
            let _ = self.write_header_field(spec::header::HeaderField::IncompatibleFeatures(bits));
        }
        Error::corrupt(format!(
            "{why}; the image has been marked as corrupt and further writes are refused"
        ))
    }
}

impl BlockDevice for Qcow2 {
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn format_name(&self) -> &'static str {
        "qcow2"
    }

    fn supports_backing(&self) -> bool {
        true
    }

    fn map(&self, off: u64, len: u64) -> Result<Run> {
        if self.no_io {
            return Err(Error::new(
                crate::ErrorKind::Denied,
                "image opened for metadata only",
            ));
        }
        tables::map(self, off, len)
    }

    fn map_many(&self, off: u64, len: u64, max: usize, out: &mut Vec<Run>) -> Result<()> {
        if self.no_io {
            return Err(Error::new(
                crate::ErrorKind::Denied,
                "image opened for metadata only",
            ));
        }
        tables::map_many(self, off, len, max, out)
    }

    fn storage(&self, role: FileRole) -> Option<&Arc<dyn Storage>> {
        match role {
            FileRole::Image => Some(&self.file),
            FileRole::DataFile => self.data_file.as_ref(),
        }
    }

    fn read_compressed(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        tables::read_compressed(self, off, buf)
    }

    fn reuse_epoch(&self) -> u64 {
        self.reuse_epoch.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn pin(&self) -> crate::block::ReadPin<'_> {
        Some(self.io_barrier.read().unwrap_or_else(|e| e.into_inner()))
    }

    fn access(&self) -> crate::block::Access {
        self.access
    }

    fn write(&self, off: u64, buf: &[u8], below: &dyn crate::block::CowSource) -> Result<()> {
        alloc::write(self, off, buf, below)
    }

    fn write_zeroes(
        &self,
        off: u64,
        len: u64,
        mode: crate::block::ZeroMode,
        below: &dyn crate::block::CowSource,
    ) -> Result<()> {
        alloc::write_zeroes(self, off, len, mode, below)
    }

    fn compress_cluster(&self) -> Option<u64> {
        (!self.header.has_data_file()).then(|| self.header.cluster_size())
    }

    fn write_compressed(
        &self,
        off: u64,
        data: &[u8],
        below: &dyn crate::block::CowSource,
    ) -> Result<()> {
        Qcow2::write_compressed(self, off, data, below)
    }

    fn discard(&self, off: u64, len: u64, below: &dyn crate::block::CowSource) -> Result<()> {
        alloc::discard(self, off, len, below)
    }

    fn flush(&self) -> Result<()> {
        alloc::flush(self)
    }

    fn close(&self) -> Result<()> {
        alloc::flush(self)?;
        if self.access == crate::block::Access::ReadWrite {
            self.store_bitmaps()?;
        }
        Ok(())
    }

    fn dirty_bitmap(&self, name: &str) -> Result<Arc<RwLock<crate::bitmap::DirtyBitmap>>> {
        self.bitmap(name).map_err(|e| {
            if e.kind() == crate::ErrorKind::NotFound {
                Error::new(e.kind(), format!("Bitmap '{name}' is not found"))
            } else {
                e
            }
        })
    }

    fn zero_is_fast(&self, off: u64, len: u64) -> bool {
        alloc::zero_is_fast(self, off, len).unwrap_or(false)
    }
}

/// `snapshot.id=ID` / `snapshot.name=NAME` (comma separated, the last of a key wins, `,,` a
/// literal comma): `(id, name)`; `None` when `want` is a plain ID or name.
pub fn snapshot_selector(want: &str) -> Option<(Option<String>, Option<String>)> {
    if !want.starts_with("snapshot.") {
        return None;
    }
    let (mut id, mut name) = (None, None);
    let mut cur = String::new();
    let mut parts = Vec::new();
    let mut chars = want.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
                continue;
            }
            parts.push(std::mem::take(&mut cur));
        } else {
            cur.push(c);
        }
    }
    parts.push(cur);
    for p in parts {
        match p.split_once('=') {
            Some(("snapshot.id", v)) => id = Some(v.to_string()),
            Some(("snapshot.name", v)) => name = Some(v.to_string()),
            _ => {}
        }
    }
    Some((id, name))
}

/// Fresh in-memory images for the unit tests of this module's files.
#[cfg(test)]
pub(crate) mod test_support {
    use super::create::{create_qcow2, CreateOptions};
    use super::{Qcow2, Qcow2Options};
    use crate::block::{Access, BlockDevice, Chain};
    use crate::io::mem::MemStorage;
    use std::sync::Arc;

    /// A new qcow2 image (`opts`, size and cluster size filled in) opened read-write over
    /// memory, with a chain over it alone.
    pub(crate) fn fresh_with(size: u64, cluster: u64, opts: CreateOptions) -> (Arc<Qcow2>, Chain) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.qcow2");
        let opts = CreateOptions {
            size,
            cluster_size: cluster,
            ..opts
        };
        create_qcow2(p.to_str().unwrap(), &opts).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        let q = Qcow2::open(
            Arc::new(MemStorage::new(bytes)),
            &Qcow2Options {
                access: Access::ReadWrite,
                ..Qcow2Options::default()
            },
        )
        .unwrap();
        let q = Arc::new(q);
        let chain = Chain::new(vec![q.clone() as Arc<dyn BlockDevice>]).unwrap();
        (q, chain)
    }

    /// [`fresh_with`] qemu-img's defaults otherwise.
    pub(crate) fn fresh(size: u64, cluster: u64) -> (Arc<Qcow2>, Chain) {
        fresh_with(size, cluster, CreateOptions::default())
    }
}
