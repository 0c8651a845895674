//! Files opened with `O_DIRECT` (`--cache=none`, `directsync`): I/O that bypasses the host page
//! cache, at the price of alignment rules.
//!
//! The kernel accepts a direct transfer only when the file offset and the length are multiples
//! of the file's direct-I/O block (its logical block size, usually 512 or 4096 bytes) and the
//! buffer sits on a suitably aligned address. Guest data requests mostly satisfy that already;
//! qcow2 metadata I/O does not (the 104-byte header, an 8-byte L1 entry, a refcount table entry).
//! [`DirectFile`] wraps the engine of an `O_DIRECT` file and passes aligned requests straight
//! through; any other request is bounced through a page-aligned buffer covering the whole blocks
//! it touches:
//!
//! * an unaligned read reads the covering blocks and copies the requested bytes out;
//! * an unaligned write does read-modify-write of its partial first and last blocks, each under
//!   a lock striped by block number, so two writers patching different bytes of one block never
//!   lose each other's bytes. Whole blocks in the middle are written directly (or copied to an
//!   aligned buffer when only the memory address is misaligned). An aligned write never overlaps
//!   a block being patched unless the callers' own byte ranges overlap, so it takes no stripe.
//! * a bounced block that straddles the end of the file would leave the file longer than the
//!   write asked for (the whole block is written); such a write runs alone (exclusive side of a
//!   reader-writer lock that every other write holds shared) and restores the length after it.
//!
//! Reads never wait on the page cache here, so [`Storage::read_at_nowait`] answers `WouldBlock`:
//! a direct read always goes to the device, and the NBD server's cached-read fast path does not
//! apply.

use super::buf::{IoBuf, ALIGN};
use super::{Extent, Storage};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::io::AsRawFd;
use std::sync::{Arc, Mutex, RwLock};

/// Direct-I/O alignment of a file: file offsets and lengths are multiples of `offset`, buffer
/// addresses multiples of `memory`. Both are powers of two.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Alignment {
    pub offset: usize,
    pub memory: usize,
}

impl Alignment {
    /// Used when the kernel cannot tell: a page is a multiple of every common logical block size.
    pub const FALLBACK: Alignment = Alignment {
        offset: 4096,
        memory: 4096,
    };
}

/// The direct-I/O alignment of `file`: `statx(STATX_DIOALIGN)` (Linux 6.1+), else the logical
/// block size of a block device (`BLKSSZGET`), else [`Alignment::FALLBACK`].
pub fn probe_alignment(file: &File) -> Alignment {
    let fd = file.as_raw_fd();
    let mut stx = std::mem::MaybeUninit::<libc::statx>::zeroed();
    // SAFETY: statx writes at most one `struct statx` into `stx`, which is valid for writes of
    // that size; the empty path with AT_EMPTY_PATH names `fd` itself.
    let r = unsafe {
        libc::statx(
            fd,
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            stx.as_mut_ptr(),
        )
    };
    if r == 0 {
        // SAFETY: statx succeeded, so it filled the structure (zero-initialised before anyway).
        let stx = unsafe { stx.assume_init() };
        let off = stx.stx_dio_offset_align as usize;
        let mem = stx.stx_dio_mem_align as usize;
        if stx.stx_mask & libc::STATX_DIOALIGN != 0
            && off.is_power_of_two()
            && mem.is_power_of_two()
        {
            return Alignment {
                offset: off,
                memory: mem,
            };
        }
    }
    if file
        .metadata()
        .map(|m| m.file_type().is_block_device())
        .unwrap_or(false)
    {
        let mut size: libc::c_int = 0;
        // SAFETY: BLKSSZGET writes one int into `size`, which lives for the whole call.
        let r = unsafe { libc::ioctl(fd, libc::BLKSSZGET, &mut size) };
        if r == 0 && size > 0 && (size as usize).is_power_of_two() {
            return Alignment {
                offset: size as usize,
                memory: size as usize,
            };
        }
    }
    Alignment::FALLBACK
}

/// Whether `file` was opened with `O_DIRECT`.
pub fn is_direct(file: &File) -> bool {
    // SAFETY: F_GETFL on an open descriptor has no memory-safety preconditions.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    flags >= 0 && flags & libc::O_DIRECT != 0
}

/// Largest bounce buffer one step of an unaligned request uses.
const BOUNCE_MAX: usize = 1 << 20;
/// Number of read-modify-write locks (blocks share one by block number modulo this).
const STRIPES: usize = 64;

/// An `O_DIRECT` file that accepts any offset, length and buffer (see the module doc).
pub struct DirectFile {
    inner: Arc<dyn Storage>,
    align: Alignment,
    /// Shared by every write that keeps the file length it asks for; exclusive for a write whose
    /// bounced last block lies partly beyond the end of the file, and for `set_len`.
    size: RwLock<()>,
    /// Read-modify-write of one block at a time, striped by block number.
    stripes: Vec<Mutex<()>>,
}

impl std::fmt::Debug for DirectFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectFile")
            .field("inner", &self.inner)
            .field("align", &self.align)
            .finish()
    }
}

impl DirectFile {
    /// Wrap `inner` (an engine over an `O_DIRECT` file, or any storage that enforces `align`).
    pub fn new(inner: Arc<dyn Storage>, align: Alignment) -> io::Result<DirectFile> {
        if !align.offset.is_power_of_two()
            || !align.memory.is_power_of_two()
            || align.memory > ALIGN
            || align.offset > BOUNCE_MAX
        {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "unsupported O_DIRECT alignment (offset {}, memory {})",
                    align.offset, align.memory
                ),
            ));
        }
        Ok(DirectFile {
            inner,
            align,
            size: RwLock::new(()),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
        })
    }

    pub fn alignment(&self) -> Alignment {
        self.align
    }

    fn block(&self) -> u64 {
        self.align.offset as u64
    }

    fn down(&self, x: u64) -> u64 {
        x & !(self.block() - 1)
    }

    fn up(&self, x: u64) -> io::Result<u64> {
        x.checked_add(self.block() - 1)
            .map(|y| self.down(y))
            .ok_or_else(einval)
    }

    fn mem_aligned(&self, p: *const u8) -> bool {
        (p as usize).is_multiple_of(self.align.memory)
    }

    fn aligned(&self, p: *const u8, len: usize, off: u64) -> bool {
        self.mem_aligned(p) && (len as u64 | off).is_multiple_of(self.block())
    }

    /// Read whole blocks at the aligned `off` into `b` until it is full or the file ends;
    /// returns the bytes read (the end of the file may fall inside a block).
    fn read_blocks(&self, b: &mut [u8], off: u64) -> io::Result<usize> {
        let mut got = 0;
        while got < b.len() {
            let n = self.inner.read_at(&mut b[got..], off + got as u64)?;
            got += n;
            // end of file, or it falls inside the last block read: nothing aligned follows
            if n == 0 || !(got as u64).is_multiple_of(self.block()) {
                break;
            }
        }
        Ok(got)
    }

    /// Patch `data` into the block at the aligned `blk`, `within` bytes into it.
    fn rmw(&self, blk: u64, within: usize, data: &[u8]) -> io::Result<()> {
        let stripe = (blk / self.block()) as usize % STRIPES;
        let _g = self.stripes[stripe]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let mut b = IoBuf::new(self.align.offset);
        // beyond the end of the file the block reads as zeros (IoBuf starts zeroed)
        self.read_blocks(&mut b, blk)?;
        b[within..within + data.len()].copy_from_slice(data);
        self.inner.write_at(&b, blk)
    }

    /// Write `buf` at `off` as partial first block, whole middle blocks, partial last block.
    fn write_pieces(&self, buf: &[u8], off: u64) -> io::Result<()> {
        let bs = self.block();
        let end = off + buf.len() as u64;
        let mut pos = off;
        if !pos.is_multiple_of(bs) || end - pos < bs {
            let blk = self.down(pos);
            let n = (end.min(blk + bs) - pos) as usize;
            self.rmw(blk, (pos - blk) as usize, &buf[..n])?;
            pos += n as u64;
        }
        let mid_end = self.down(end).max(pos);
        if mid_end > pos {
            let src = &buf[(pos - off) as usize..(mid_end - off) as usize];
            if self.mem_aligned(src.as_ptr()) {
                self.inner.write_at(src, pos)?;
            } else {
                let mut b = IoBuf::new(src.len().min(BOUNCE_MAX));
                for (i, chunk) in src.chunks(BOUNCE_MAX).enumerate() {
                    b[..chunk.len()].copy_from_slice(chunk);
                    let at = pos + (i * BOUNCE_MAX) as u64;
                    self.inner.write_at(&b[..chunk.len()], at)?;
                }
            }
            pos = mid_end;
        }
        if pos < end {
            self.rmw(pos, 0, &buf[(pos - off) as usize..])?;
        }
        Ok(())
    }
}

fn einval() -> io::Error {
    io::Error::from_raw_os_error(libc::EINVAL)
}

impl Storage for DirectFile {
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.aligned(buf.as_ptr(), buf.len(), off) {
            return self.inner.read_at(buf, off);
        }
        let mut done = 0usize;
        let mut bounce = IoBuf::new(0);
        while done < buf.len() {
            let pos = off.checked_add(done as u64).ok_or_else(einval)?;
            let start = self.down(pos);
            let skip = (pos - start) as usize;
            let want = (buf.len() - done).min(BOUNCE_MAX - skip);
            let span = (self.up(pos + want as u64)? - start) as usize;
            if bounce.len() < span {
                bounce = IoBuf::new(span);
            }
            let n = self.read_blocks(&mut bounce[..span], start)?;
            if n <= skip {
                break;
            }
            let k = (n - skip).min(want);
            buf[done..done + k].copy_from_slice(&bounce[skip..skip + k]);
            done += k;
            if k < want {
                break;
            }
        }
        Ok(done)
    }

    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let end = off.checked_add(buf.len() as u64).ok_or_else(einval)?;
        if self.aligned(buf.as_ptr(), buf.len(), off) {
            let _g = self.size.read().unwrap_or_else(|e| e.into_inner());
            return self.inner.write_at(buf, off);
        }
        let written_end = self.up(end)?;
        {
            let _g = self.size.read().unwrap_or_else(|e| e.into_inner());
            // Under the shared lock the length only grows, so a check that passes stays true.
            let len = self.inner.len()?;
            if written_end <= len.max(end) {
                return self.write_pieces(buf, off);
            }
        }
        // The last block reaches past both the end of the file and the end of the write:
        // alone, write it and cut the file back to the length the write asked for.
        let _g = self.size.write().unwrap_or_else(|e| e.into_inner());
        let want = self.inner.len()?.max(end);
        self.write_pieces(buf, off)?;
        if self.inner.len()? > want {
            self.inner.set_len(want)?;
        }
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let _g = self.size.write().unwrap_or_else(|e| e.into_inner());
        self.inner.set_len(len)
    }

    fn zero_range(&self, off: u64, len: u64, how: super::ZeroRange) -> io::Result<()> {
        // fallocate works on any byte range of an O_DIRECT file; the page cache is not used
        let _g = self.size.read().unwrap_or_else(|e| e.into_inner());
        self.inner.zero_range(off, len, how)
    }

    fn sync(&self) -> io::Result<()> {
        self.inner.sync()
    }

    fn allocated_size(&self) -> io::Result<u64> {
        self.inner.allocated_size()
    }

    fn extent_at(&self, off: u64) -> io::Result<Option<Extent>> {
        self.inner.extent_at(off)
    }

    fn read_many(&self, reqs: &mut [(u64, &mut [u8])]) -> io::Result<()> {
        if reqs
            .iter()
            .all(|(o, b)| self.aligned(b.as_ptr(), b.len(), *o))
        {
            return self.inner.read_many(reqs);
        }
        for (off, buf) in reqs.iter_mut() {
            super::read_exact_or_zero(self, buf, *off)?;
        }
        Ok(())
    }

    fn read_at_nowait(&self, _buf: &mut [u8], _off: u64) -> io::Result<usize> {
        // a direct read always waits for the device
        Err(io::ErrorKind::WouldBlock.into())
    }

    /// Asynchronous readers get the descriptor itself: their aligned reads go straight to the
    /// device, an unaligned one fails with `EINVAL` (the NBD plane then reads through `self`).
    fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
        self.inner.raw_fd()
    }

    fn buffered(&self) -> bool {
        false
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
    use crate::io::mem::MemStorage;

    /// A storage that refuses what `O_DIRECT` refuses (unaligned offset, length or address)
    /// and counts the requests that reach it.
    #[derive(Debug)]
    struct Strict {
        mem: MemStorage,
        align: Alignment,
    }

    impl Strict {
        fn check(&self, p: *const u8, len: usize, off: u64) -> io::Result<()> {
            if !(p as usize).is_multiple_of(self.align.memory)
                || !len.is_multiple_of(self.align.offset)
                || !off.is_multiple_of(self.align.offset as u64)
            {
                return Err(einval());
            }
            Ok(())
        }
    }

    impl Storage for Strict {
        fn len(&self) -> io::Result<u64> {
            self.mem.len()
        }
        fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
            self.check(buf.as_ptr(), buf.len(), off)?;
            self.mem.read_at(buf, off)
        }
        fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
            self.check(buf.as_ptr(), buf.len(), off)?;
            self.mem.write_at(buf, off)
        }
        fn set_len(&self, len: u64) -> io::Result<()> {
            self.mem.set_len(len)
        }
        fn sync(&self) -> io::Result<()> {
            Ok(())
        }
        fn engine_name(&self) -> &'static str {
            "strict"
        }
    }

    /// splitmix64: reproducible random numbers without a dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    fn strict(len: usize, offset: usize, memory: usize) -> DirectFile {
        let align = Alignment { offset, memory };
        let inner = Arc::new(Strict {
            mem: MemStorage::new(vec![0; len]),
            align,
        });
        DirectFile::new(inner, align).unwrap()
    }

    /// Random reads, writes and length changes of any offset, length and buffer address against
    /// a shadow `Vec`: contents and length always agree, and nothing unaligned reaches the file.
    fn shadow_run(d: &DirectFile, seed: u64, ops: usize) {
        let mut rng = Rng(seed);
        let mut shadow = vec![0u8; d.len().unwrap() as usize];
        for step in 0..ops {
            let len = shadow.len() as u64;
            match rng.below(10) {
                0..=3 => {
                    let n = 1 + rng.below(3 * 4096) as usize;
                    let off = rng.below(len + 3000);
                    // odd buffer addresses too
                    let shift = rng.below(7) as usize;
                    let mut data = vec![0u8; n + shift];
                    data.iter_mut().for_each(|b| *b = rng.next() as u8);
                    d.write_at(&data[shift..], off).unwrap();
                    let end = off as usize + n;
                    if end > shadow.len() {
                        shadow.resize(end, 0);
                    }
                    shadow[off as usize..end].copy_from_slice(&data[shift..]);
                }
                4..=8 => {
                    let n = 1 + rng.below(3 * 4096) as usize;
                    let off = rng.below(len + 1000);
                    let shift = rng.below(7) as usize;
                    let mut buf = vec![0xeeu8; n + shift];
                    let got = d.read_at(&mut buf[shift..], off).unwrap();
                    let want = (shadow.len() as u64).saturating_sub(off).min(n as u64) as usize;
                    assert_eq!(got, want, "step {step}: read {n} at {off}");
                    if got > 0 {
                        assert_eq!(
                            &buf[shift..shift + got],
                            &shadow[off as usize..off as usize + got],
                            "step {step}: read {n} at {off}"
                        );
                    }
                }
                _ => {
                    let new = rng.below(64 * 1024);
                    d.set_len(new).unwrap();
                    shadow.resize(new as usize, 0);
                }
            }
            assert_eq!(d.len().unwrap(), shadow.len() as u64, "step {step}: length");
        }
        let mut all = vec![0u8; shadow.len()];
        crate::io::read_exact(d, &mut all, 0).unwrap();
        assert_eq!(all, shadow);
    }

    #[test]
    fn unaligned_io_matches_a_shadow_buffer() {
        for (i, &(offset, memory)) in [(512, 512), (4096, 4096), (512, 4), (4096, 512)]
            .iter()
            .enumerate()
        {
            // an unaligned starting length exercises the end-of-file block
            let d = strict(40_000 + i * 77, offset, memory);
            shadow_run(&d, 0xfeed + i as u64, 3000);
        }
    }

    #[test]
    fn aligned_requests_pass_straight_through() {
        let d = strict(1 << 16, 4096, 4096);
        let mut b = IoBuf::new(8192);
        b.fill(7);
        d.write_at(&b, 4096).unwrap();
        let mut r = IoBuf::new(8192);
        assert_eq!(d.read_at(&mut r, 4096).unwrap(), 8192);
        assert!(r.iter().all(|&x| x == 7));
        assert_eq!(d.len().unwrap(), 1 << 16);
    }

    #[test]
    fn write_past_end_keeps_the_requested_length() {
        let d = strict(1000, 512, 512);
        d.write_at(&[1; 10], 1200).unwrap();
        assert_eq!(d.len().unwrap(), 1210);
        let mut b = [9u8; 300];
        assert_eq!(d.read_at(&mut b, 1000).unwrap(), 210);
        assert!(b[..200].iter().all(|&x| x == 0));
        assert!(b[200..210].iter().all(|&x| x == 1));
        // inside the file, the last partial block: the length stays
        d.write_at(&[2; 3], 1100).unwrap();
        assert_eq!(d.len().unwrap(), 1210);
    }

    /// Concurrent writers patching different bytes of the same blocks lose nothing.
    #[test]
    fn concurrent_patches_of_one_block_are_kept() {
        let d = Arc::new(strict(8192, 4096, 4096));
        std::thread::scope(|s| {
            for t in 0..8u8 {
                let d = d.clone();
                s.spawn(move || {
                    for i in 0..200u64 {
                        // thread t owns bytes t, t+8, t+16, ... of the first two blocks
                        let off = (i * 8 + t as u64) % 8192;
                        d.write_at(&[t + 1], off).unwrap();
                    }
                });
            }
        });
        let mut all = IoBuf::new(8192);
        d.read_at(&mut all, 0).unwrap();
        for i in 0..1600usize {
            assert_eq!(all[i], (i % 8) as u8 + 1, "byte {i}");
        }
    }

    /// The same shadow run on a real `O_DIRECT` file of the test's temporary directory, over
    /// both engines (skipped where the file system refuses `O_DIRECT`).
    #[test]
    fn unaligned_io_on_a_real_direct_file() {
        use std::os::unix::fs::OpenOptionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("direct.img");
        std::fs::write(&path, vec![0u8; 40_000]).unwrap();
        let open = || {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_DIRECT)
                .open(&path)
        };
        let file = match open() {
            Ok(f) => f,
            Err(e) => {
                eprintln!("skipped: {} refuses O_DIRECT: {e}", dir.path().display());
                return;
            }
        };
        assert!(is_direct(&file));
        let align = probe_alignment(&file);
        let sync: Arc<dyn Storage> = Arc::new(crate::io::sync::SyncFile::new(file));
        shadow_run(&DirectFile::new(sync, align).unwrap(), 1, 1500);
        #[cfg(feature = "uring")]
        if crate::io::uring::probe().is_ok() {
            std::fs::write(&path, vec![0u8; 40_000]).unwrap();
            let u: Arc<dyn Storage> =
                Arc::new(crate::io::uring::UringFile::new(open().unwrap()).unwrap());
            shadow_run(&DirectFile::new(u, align).unwrap(), 2, 1500);
        }
    }
}
