//! Creating host files the way QEMU's file driver does (`block/file-posix.c`, `raw_co_create`
//! and `handle_aiocb_truncate`), so that a file we create is byte for byte, hole for hole, the
//! file `qemu-img create` makes:
//!
//! * creation truncates an existing file to 0, then grows it to the requested size;
//! * growing a file from length 0 without preallocation writes zeros over its first block (QEMU
//!   does this so that later alignment probing finds allocated storage): 4096 bytes, or 512 when
//!   the new size is below 4096;
//! * `falloc` reserves the new range with `fallocate`, `full` writes zeros over it.
//!
//! Raw images are plain files: sizes are rounded up to 512 bytes, and `metadata` preallocation is
//! refused after the file was created (as qemu-img leaves it: empty).

use crate::error::{Error, ErrorKind, Result};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;

/// Preallocation modes of `qemu-img create -o preallocation=`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Preallocation {
    #[default]
    Off,
    Metadata,
    Falloc,
    Full,
}

impl Preallocation {
    /// The QAPI spelling (`off`, `metadata`, `falloc`, `full`).
    pub fn parse(s: &str) -> Option<Preallocation> {
        match s {
            "off" => Some(Preallocation::Off),
            "metadata" => Some(Preallocation::Metadata),
            "falloc" => Some(Preallocation::Falloc),
            "full" => Some(Preallocation::Full),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Preallocation::Off => "off",
            Preallocation::Metadata => "metadata",
            Preallocation::Falloc => "falloc",
            Preallocation::Full => "full",
        }
    }
}

/// Bytes of zeros written per call when preallocating with `full`.
const ZERO_CHUNK: usize = 1 << 20;

/// Create (or empty) `path` for writing, as QEMU's file driver does before formatting. The
/// file is locked as `qemu-img create` locks it before anything is truncated, so an image
/// another process has open (a running guest's disk) is refused, not emptied under it.
pub fn create_empty(path: &str) -> Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| Error::io(format!("Could not create '{path}'"), e))?;
    crate::io::lock::claim_file(&file, crate::io::lock::CREATE, path)?;
    // a device keeps its size and contents (QEMU's host_device driver does not truncate)
    let regular = file.metadata().map(|m| m.is_file()).unwrap_or(true);
    if regular {
        file.set_len(0)
            .map_err(|e| Error::io(format!("Could not create '{path}'"), e))?;
    }
    Ok(file)
}

/// Give a file created by [`create_empty`] its size: a regular file is extended, a device
/// must already be at least that large (QEMU: "Cannot grow device files").
pub fn size_created(file: &File, path: &str, size: u64) -> Result<()> {
    let regular = file.metadata().map(|m| m.is_file()).unwrap_or(true);
    if regular {
        // the file is empty: grown as file-posix grows it (its first block written)
        return grow(file, 0, size, Preallocation::Off).map_err(|e| e.context(path));
    }
    let len = crate::io::file_len(file).map_err(|e| Error::open_failed(path, e))?;
    if len < size {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            "Cannot grow device files",
        ));
    }
    Ok(())
}

/// Write `len` zero bytes at `off`.
pub fn write_zeros(file: &File, mut off: u64, len: u64) -> Result<()> {
    let buf = vec![0u8; ZERO_CHUNK.min(usize::try_from(len).unwrap_or(ZERO_CHUNK))];
    let end = off
        .checked_add(len)
        .ok_or_else(|| Error::new(ErrorKind::InvalidArgument, "File too large"))?;
    while off < end {
        let n = (end - off).min(buf.len() as u64) as usize;
        file.write_all_at(&buf[..n], off)
            .map_err(|e| Error::io(format!("Could not write zeros at {off:#x}"), e))?;
        off += n as u64;
    }
    Ok(())
}

/// Reserve `[off, off + len)` with `fallocate` (mode 0: the file grows, blocks are allocated).
pub fn fallocate(file: &File, off: u64, len: u64) -> Result<()> {
    fallocate_fd(std::os::fd::AsRawFd::as_raw_fd(file), off, len)
}

/// [`fallocate`] on an open descriptor (a storage's `raw_fd`).
pub fn fallocate_fd(fd: std::os::fd::RawFd, off: u64, len: u64) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    let (Ok(o), Ok(l)) = (i64::try_from(off), i64::try_from(len)) else {
        return Err(Error::new(ErrorKind::InvalidArgument, "File too large"));
    };
    if let Err(e) = crate::io::sys::fallocate(fd, o, l) {
        return Err(Error::io("Could not preallocate new data", e));
    }
    Ok(())
}

/// Grow `file` from `cur` to `new_len` bytes as file-posix's truncate does for each mode.
/// `Metadata` behaves as `Off` (a plain file has no metadata to preallocate).
pub fn grow(file: &File, cur: u64, new_len: u64, mode: Preallocation) -> Result<()> {
    if new_len <= cur {
        return Ok(());
    }
    match mode {
        Preallocation::Off | Preallocation::Metadata => {
            file.set_len(new_len)
                .map_err(|e| Error::io("Could not resize file", e))?;
            if cur == 0 {
                // file-posix `allocate_first_block`
                let n = if new_len < 4096 { 512 } else { 4096 };
                write_zeros(file, 0, n.min(new_len))?;
            }
        }
        Preallocation::Falloc => fallocate(file, cur, new_len - cur)?,
        Preallocation::Full => {
            file.set_len(new_len)
                .map_err(|e| Error::io("Could not resize file", e))?;
            write_zeros(file, cur, new_len - cur)?;
        }
    }
    Ok(())
}

/// `qemu-img create -f raw`: a file of `size` bytes (rounded up to 512).
pub fn create_raw(path: &str, size: u64, prealloc: Preallocation) -> Result<()> {
    let size = crate::units::align_up(size, 512)
        .ok_or_else(|| Error::new(ErrorKind::InvalidArgument, "Image size too large"))?;
    let file = create_empty(path)?;
    if prealloc == Preallocation::Metadata {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            "Unsupported preallocation mode: metadata",
        ));
    }
    grow(&file, 0, size, prealloc)?;
    file.sync_all()
        .map_err(|e| Error::io(format!("Could not flush '{path}'"), e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn raw_sizes_round_up_to_sectors_and_first_block_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.raw");
        let p = p.to_str().unwrap();
        create_raw(p, 1_000_000, Preallocation::Off).unwrap();
        let m = std::fs::metadata(p).unwrap();
        assert_eq!(m.len(), 1_000_448);
        assert!(m.blocks() > 0, "first block is allocated like QEMU's");
    }

    #[test]
    fn raw_refuses_metadata_preallocation_after_creating_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.raw");
        let p = p.to_str().unwrap();
        let e = create_raw(p, 1 << 20, Preallocation::Metadata).unwrap_err();
        assert_eq!(e.message(), "Unsupported preallocation mode: metadata");
        assert_eq!(std::fs::metadata(p).unwrap().len(), 0);
    }

    #[test]
    fn full_preallocation_allocates_everything() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.raw");
        let p = p.to_str().unwrap();
        create_raw(p, 1 << 20, Preallocation::Full).unwrap();
        let m = std::fs::metadata(p).unwrap();
        assert!(m.blocks() * 512 >= 1 << 20);
    }
}
