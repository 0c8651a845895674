//! The portable engine: positioned I/O (`pread`/`pwrite`) on a `std::fs::File`.

use super::{Extent, Storage};
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::io::AsRawFd;

#[derive(Debug)]
pub struct SyncFile {
    file: File,
}

impl Drop for SyncFile {
    fn drop(&mut self) {
        super::lock::release_all(&self.file);
    }
}

impl SyncFile {
    pub fn new(file: File) -> Self {
        SyncFile { file }
    }

    pub fn file(&self) -> &File {
        &self.file
    }
}

/// SEEK_DATA/SEEK_HOLE on `file` at `off`, shared by both engines.
pub(crate) fn seek_extent(file: &File, off: u64, len: u64) -> io::Result<Option<Extent>> {
    if off >= len {
        return Ok(Some(Extent::Hole(0)));
    }
    let fd = file.as_raw_fd();
    let Ok(o) = libc::off_t::try_from(off) else {
        return Ok(None);
    };
    // SAFETY: lseek on a valid open descriptor has no memory-safety preconditions.
    let data = unsafe { libc::lseek(fd, o, libc::SEEK_DATA) };
    if data < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            // trailing hole
            Some(libc::ENXIO) => Ok(Some(Extent::Hole(len - off))),
            Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => Ok(None),
            _ => Err(e),
        };
    }
    let data = data as u64;
    if data > off {
        return Ok(Some(Extent::Hole(data.min(len) - off)));
    }
    // SAFETY: as above.
    let hole = unsafe { libc::lseek(fd, o, libc::SEEK_HOLE) };
    if hole < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENXIO) | Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => Ok(None),
            _ => Err(e),
        };
    }
    let hole = (hole as u64).min(len);
    if hole <= off {
        return Ok(None);
    }
    Ok(Some(Extent::Data(hole - off)))
}

impl Storage for SyncFile {
    fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        Some(self.file.as_raw_fd())
    }

    fn len(&self) -> io::Result<u64> {
        super::file_len(&self.file)
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        loop {
            match self.file.read_at(buf, off) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => return r,
            }
        }
    }

    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.file.write_all_at(buf, off)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn zero_range(&self, off: u64, len: u64, how: super::ZeroRange) -> io::Result<()> {
        super::zero_range_fd(std::os::fd::AsRawFd::as_raw_fd(&self.file), off, len, how)
    }

    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn allocated_size(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.blocks() * 512)
    }

    fn read_at_nowait(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        super::pread_nowait(self.file.as_raw_fd(), buf, off)
    }

    fn extent_at(&self, off: u64) -> io::Result<Option<Extent>> {
        seek_extent(&self.file, off, self.len()?)
    }

    fn engine_name(&self) -> &'static str {
        "sync"
    }

    fn identity(&self) -> Option<(u64, u64)> {
        self.file.metadata().ok().map(|m| (m.dev(), m.ino()))
    }
}
