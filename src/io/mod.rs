//! Storage objects and I/O engines: the home of io_uring and of all `unsafe` code (`sys.rs`
//! wraps the other system calls the layers above need).
//!
//! [`Storage`] is the narrow trait every layer above reads and writes host files through; it is
//! also the test seam (in-memory, crash-simulating and fault-injecting doubles live in [`mem`]).
//! Two engines implement it for real files: [`sync::SyncFile`] (positioned I/O, the portable
//! engine) and `uring::UringFile` (io_uring; probed at open, falls back cleanly when the kernel or
//! a sandbox refuses it). Only `open.rs` and `cli/` choose between them.

#![allow(unsafe_code)]

use std::fmt;
use std::io;

pub mod buf;
pub mod direct;
pub mod lock;
pub mod mem;
pub mod noflush;
pub mod sync;
pub mod sys;
#[cfg(feature = "uring")]
pub mod uring;

/// Which I/O engine backs a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Engine {
    /// io_uring when the kernel allows it, otherwise positioned I/O.
    #[default]
    Auto,
    /// Positioned I/O (`pread`/`pwrite`) only.
    Sync,
    /// io_uring only; opening fails if the kernel refuses it.
    Uring,
}

impl Engine {
    pub fn parse(s: &str) -> Option<Engine> {
        match s {
            "auto" => Some(Engine::Auto),
            "sync" | "threads" | "native" => Some(Engine::Sync),
            "io_uring" | "uring" => Some(Engine::Uring),
            _ => None,
        }
    }

    /// Engine named by the `QNBD_IO_ENGINE` environment variable (used by the test suite to run
    /// everything over both engines), else `Auto`. An unknown name is an error, so a typo
    /// never silently tests the wrong engine.
    pub fn from_env() -> Result<Engine, String> {
        match std::env::var("QNBD_IO_ENGINE") {
            Ok(s) if !s.is_empty() => Engine::parse(&s).ok_or_else(|| {
                format!("QNBD_IO_ENGINE: unknown I/O engine '{s}' (auto, sync, io_uring)")
            }),
            _ => Ok(Engine::Auto),
        }
    }
}

/// Where a byte range of a sparse file stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extent {
    /// `len` bytes of data from the queried offset.
    Data(u64),
    /// `len` bytes of hole from the queried offset.
    Hole(u64),
}

/// How [`Storage::zero_range`] makes a range read as zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZeroRange {
    /// Read as zeros, host blocks released (`FALLOC_FL_PUNCH_HOLE`; `BLKZEROOUT` on a block
    /// device, which may unmap).
    Deallocate,
    /// Read as zeros, host blocks kept or allocated (`FALLOC_FL_ZERO_RANGE`; `BLKZEROOUT`).
    KeepAllocated,
    /// A discard: host blocks released, contents afterwards unspecified (a file's hole reads
    /// as zeros; `BLKDISCARD` on a block device).
    Discard,
}

/// `fallocate` on a regular file, or the matching ioctl on a block device, for
/// [`Storage::zero_range`]; `Unsupported` where neither applies.
pub(crate) fn zero_range_fd(
    fd: std::os::fd::RawFd,
    off: u64,
    len: u64,
    how: ZeroRange,
) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    let unsupported = || io::Error::from(io::ErrorKind::Unsupported);
    let (o, l) = (
        i64::try_from(off).map_err(|_| unsupported())?,
        i64::try_from(len).map_err(|_| unsupported())?,
    );
    // SAFETY: fstat writes into the zeroed struct we own; the fd is open for the caller.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if st.st_mode & libc::S_IFMT == libc::S_IFBLK {
        let range: [u64; 2] = [off, len];
        let req = match how {
            ZeroRange::Discard => BLKDISCARD,
            ZeroRange::Deallocate | ZeroRange::KeepAllocated => BLKZEROOUT,
        };
        // SAFETY: BLKDISCARD / BLKZEROOUT read two u64 (offset, length) from the pointer,
        // which points at our array for the duration of the call.
        let r = unsafe { libc::ioctl(fd, req, range.as_ptr()) };
        if r != 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EOPNOTSUPP) | Some(libc::ENOTTY) | Some(libc::EINVAL) => {
                    Err(unsupported())
                }
                _ => Err(e),
            };
        }
        return Ok(());
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(unsupported());
    }
    let mode = match how {
        ZeroRange::Deallocate | ZeroRange::Discard => {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        }
        ZeroRange::KeepAllocated => libc::FALLOC_FL_ZERO_RANGE,
    };
    loop {
        // SAFETY: fallocate takes only integers; the fd is open for the caller.
        let r = unsafe { libc::fallocate(fd, mode, o, l) };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL) => {
                return Err(unsupported())
            }
            _ => return Err(e),
        }
    }
}

/// The length of an open file: its size, or for a block device the device's size
/// (`BLKGETSIZE64`; `st_size` of a device is 0).
pub fn file_len(file: &std::fs::File) -> io::Result<u64> {
    use std::os::unix::fs::FileTypeExt;
    let m = file.metadata()?;
    if !m.file_type().is_block_device() {
        return Ok(m.len());
    }
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points at `size` for the
    // duration of the call; the fd is open for the lifetime of `file`.
    let r = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(file),
            BLKGETSIZE64,
            &mut size as *mut u64,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

/// `_IOR(0x12, 114, size_t)`: the size of a block device in bytes.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
/// `_IO(0x12, 119)`: discard a byte range of a block device.
const BLKDISCARD: libc::c_ulong = 0x1277;
/// `_IO(0x12, 127)`: write zeros to a byte range of a block device.
const BLKZEROOUT: libc::c_ulong = 0x127f;

/// A host file (or a double of one). Offsets are host byte offsets.
///
/// Required methods are the few an engine must provide; `StorageExt` adds the rest.
pub trait Storage: Send + Sync + fmt::Debug {
    /// Current length in bytes.
    fn len(&self) -> io::Result<u64>;

    /// Whether the file is empty.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Read into `buf` at `off`; returns the number of bytes read, short only at end of file.
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize>;

    /// Write all of `buf` at `off`.
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()>;

    /// Truncate or extend.
    fn set_len(&self, len: u64) -> io::Result<()>;

    /// Make `[off, off + len)` read as zeros without writing them (see [`ZeroRange`]);
    /// `ErrorKind::Unsupported` where the host cannot, and then the caller writes zeros or, for
    /// a discard, does nothing.
    fn zero_range(&self, off: u64, len: u64, how: ZeroRange) -> io::Result<()> {
        let _ = (off, len, how);
        Err(io::ErrorKind::Unsupported.into())
    }

    /// Make everything written so far durable.
    fn sync(&self) -> io::Result<()>;

    /// Bytes actually allocated on the host (`st_blocks * 512`), for `actual-size`.
    fn allocated_size(&self) -> io::Result<u64> {
        self.len()
    }

    /// Data or hole at `off` (SEEK_DATA / SEEK_HOLE); `None` when the host cannot tell (then
    /// everything counts as data). Beyond EOF answers `Hole(0)`... callers clamp to `len()`.
    fn extent_at(&self, off: u64) -> io::Result<Option<Extent>> {
        let _ = off;
        Ok(None)
    }

    /// Several reads at once; engines that can batch (io_uring) override this.
    fn read_many(&self, reqs: &mut [(u64, &mut [u8])]) -> io::Result<()> {
        for (off, buf) in reqs.iter_mut() {
            read_exact_or_zero(self, buf, *off)?;
        }
        Ok(())
    }

    /// Read into `buf` at `off` only if that needs no waiting (the bytes are in the page cache):
    /// `ErrorKind::WouldBlock` otherwise, and from engines that cannot tell. Returns the number
    /// of bytes read, which may be short (partly cached, or end of file). The NBD server answers
    /// cached reads on the connection's own thread with it and hands the rest to its workers.
    fn read_at_nowait(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        let _ = (buf, off);
        Err(io::ErrorKind::WouldBlock.into())
    }

    /// Name of the engine, for diagnostics ("sync", "io_uring", "mem").
    fn engine_name(&self) -> &'static str;

    /// The file descriptor an asynchronous engine may read this storage's bytes from, at the
    /// same offsets (`None`: in-memory doubles, and wrappers that transform the bytes).
    fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }

    /// Whether writes land in the page cache (`false`: `O_DIRECT`, every write waits for the
    /// device).
    fn buffered(&self) -> bool {
        true
    }

    /// Device and inode identity, for loop detection in backing chains.
    fn identity(&self) -> Option<(u64, u64)> {
        None
    }
}

/// `preadv2(RWF_NOWAIT)` on a file: the page-cache-only read behind
/// [`Storage::read_at_nowait`] for both file engines.
pub(crate) fn pread_nowait(fd: std::os::fd::RawFd, buf: &mut [u8], off: u64) -> io::Result<usize> {
    let off = libc::off_t::try_from(off).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    loop {
        // SAFETY: `iov` describes `buf`, valid for writes of its length for the whole call.
        let n = unsafe { libc::preadv2(fd, &iov, 1, off, libc::RWF_NOWAIT) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            // kernels or file systems without RWF_NOWAIT: "cannot tell"
            Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) | Some(libc::ENOSYS) => {
                return Err(io::ErrorKind::WouldBlock.into())
            }
            _ => return Err(e),
        }
    }
}

/// Read all of `buf` at `off`; bytes past the end of the file read as zeros (as QEMU's file
/// driver does for format drivers reading beyond the end of a short image file).
pub fn read_exact_or_zero<S: Storage + ?Sized>(s: &S, buf: &mut [u8], off: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let pos = off
            .checked_add(done as u64)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        let n = s.read_at(&mut buf[done..], pos)?;
        if n == 0 {
            buf[done..].fill(0);
            break;
        }
        done += n;
    }
    Ok(())
}

/// Read all of `buf` at `off`; a read that would pass end of file is an error (`UnexpectedEof`).
pub fn read_exact<S: Storage + ?Sized>(s: &S, buf: &mut [u8], off: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let pos = off
            .checked_add(done as u64)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        let n = s.read_at(&mut buf[done..], pos)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past end of file",
            ));
        }
        done += n;
    }
    Ok(())
}

/// What a read that passes the end of the file does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PastEof {
    /// The bytes past the end read as zeros (QEMU's behaviour for metadata reads).
    Zeros,
    /// The read fails (`UnexpectedEof`).
    Error,
}

/// `n` native-layout words at `off`, read straight into the word buffer (no second buffer);
/// the caller decodes their byte order.
pub fn read_words<S: Storage + ?Sized>(
    s: &S,
    off: u64,
    n: usize,
    eof: PastEof,
) -> io::Result<Vec<u64>> {
    let mut words = vec![0u64; n];
    let bytes = zerocopy::IntoBytes::as_mut_bytes(words.as_mut_slice());
    match eof {
        PastEof::Zeros => read_exact_or_zero(s, bytes, off)?,
        PastEof::Error => read_exact(s, bytes, off)?,
    }
    Ok(words)
}

/// A storage whose `sync` failure is permanent: once a sync has failed, the kernel may have
/// dropped dirty pages (`fsyncgate`), so no later sync may report the data as durable.
#[derive(Debug)]
pub struct StickySync<S: Storage + ?Sized> {
    failed: std::sync::atomic::AtomicBool,
    inner: std::sync::Arc<S>,
}

impl<S: Storage + ?Sized> StickySync<S> {
    pub fn new(inner: std::sync::Arc<S>) -> Self {
        StickySync {
            failed: false.into(),
            inner,
        }
    }
}

impl<S: Storage + ?Sized> Storage for StickySync<S> {
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        self.inner.read_at(buf, off)
    }
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.inner.write_at(buf, off)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
    fn zero_range(&self, off: u64, len: u64, how: ZeroRange) -> io::Result<()> {
        self.inner.zero_range(off, len, how)
    }
    fn sync(&self) -> io::Result<()> {
        use std::sync::atomic::Ordering;
        if self.failed.load(Ordering::Acquire) {
            return Err(io::Error::other(
                "an earlier flush failed; data written before it may be lost",
            ));
        }
        self.inner.sync().inspect_err(|_| {
            self.failed.store(true, Ordering::Release);
        })
    }
    fn allocated_size(&self) -> io::Result<u64> {
        self.inner.allocated_size()
    }
    fn extent_at(&self, off: u64) -> io::Result<Option<Extent>> {
        self.inner.extent_at(off)
    }
    fn read_many(&self, reqs: &mut [(u64, &mut [u8])]) -> io::Result<()> {
        self.inner.read_many(reqs)
    }
    fn read_at_nowait(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        self.inner.read_at_nowait(buf, off)
    }
    fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
        self.inner.raw_fd()
    }
    fn buffered(&self) -> bool {
        self.inner.buffered()
    }
    fn engine_name(&self) -> &'static str {
        self.inner.engine_name()
    }
    fn identity(&self) -> Option<(u64, u64)> {
        self.inner.identity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// The wrapper must pass the page-cache-only read through: without it every NBD read would
    /// take the workers' path.
    #[test]
    fn sticky_sync_forwards_nowait_reads() {
        let dir = std::env::temp_dir().join(format!("qnbd-sticky-{}", std::process::id()));
        std::fs::write(&dir, vec![7u8; 8192]).unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&dir)
            .unwrap();
        let inner = Arc::new(sync::SyncFile::new(f));
        let mut direct = vec![0u8; 4096];
        let want = inner.read_at_nowait(&mut direct, 0);
        let s = StickySync::new(inner);
        let mut buf = vec![0u8; 4096];
        let got = s.read_at_nowait(&mut buf, 0);
        std::fs::remove_file(&dir).unwrap();
        assert_eq!(got.is_ok(), want.is_ok());
        if let (Ok(a), Ok(b)) = (got, want) {
            assert_eq!(a, b);
            assert_eq!(buf, direct);
        }
    }
}
