//! The io_uring engine.
//!
//! Each `UringFile` owns a small pool of rings; an operation takes a ring, pushes its SQEs (a
//! batch for `read_many`), waits for exactly those completions and puts the ring back. The
//! buffers of a batch are borrowed for the whole call and the call does not return before every
//! CQE of the batch has been reaped, so the kernel never writes into memory the caller got back.
//! `probe()` decides at open time whether the kernel (or a seccomp sandbox) allows io_uring and
//! the opcodes we use; `open.rs` falls back to the sync engine when it does not.
//!
//! Where a ring buys nothing the engine uses positioned I/O in the calling thread: writes (a
//! buffered one is a page-cache copy, an `O_DIRECT` one a wait for the device either way) and
//! single reads of `O_DIRECT` files. Page-cache hits are tried with `RWF_NOWAIT` first.

use super::sync::seek_extent;
use super::{Extent, Storage};
use io_uring::{opcode, types, IoUring, Probe};
use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::sync::Mutex;

const RING_ENTRIES: u32 = 64;
const MAX_POOLED_RINGS: usize = 8;

/// Whether io_uring works here with the opcodes this engine needs.
pub fn probe() -> io::Result<()> {
    let ring = IoUring::new(4)?;
    let mut probe = Probe::new();
    ring.submitter().register_probe(&mut probe)?;
    for code in [opcode::Read::CODE, opcode::Fsync::CODE] {
        if !probe.is_supported(code) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("io_uring opcode {code} not supported"),
            ));
        }
    }
    Ok(())
}

pub struct UringFile {
    file: File,
    /// Opened without `O_DIRECT`: writes go through the page cache.
    buffered: bool,
    rings: Mutex<Vec<IoUring>>,
}

impl std::fmt::Debug for UringFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringFile")
            .field("file", &self.file)
            .finish()
    }
}

enum Op<'a> {
    Read(&'a mut [u8]),
    Fsync,
}

impl UringFile {
    pub fn new(file: File) -> io::Result<Self> {
        let ring = IoUring::new(RING_ENTRIES)?;
        // SAFETY: F_GETFL on an open descriptor has no memory-safety preconditions.
        let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
        Ok(UringFile {
            buffered: flags >= 0 && flags & libc::O_DIRECT == 0,
            file,
            rings: Mutex::new(vec![ring]),
        })
    }

    fn take_ring(&self) -> io::Result<IoUring> {
        let pooled = self.rings.lock().map(|mut v| v.pop()).unwrap_or(None);
        match pooled {
            Some(r) => Ok(r),
            None => IoUring::new(RING_ENTRIES),
        }
    }

    fn put_ring(&self, ring: IoUring) {
        if let Ok(mut v) = self.rings.lock() {
            if v.len() < MAX_POOLED_RINGS {
                v.push(ring);
            }
        }
    }

    /// Run a batch of operations; returns each one's result (bytes or 0) in order.
    fn run(&self, ops: &mut [(u64, Op<'_>)]) -> io::Result<Vec<i32>> {
        let mut ring = self.take_ring()?;
        let res = Self::run_on(&mut ring, self.file.as_raw_fd(), ops);
        // A ring whose batch failed half-way may still hold unreaped completions; drop it then.
        if res.is_ok() {
            self.put_ring(ring);
        }
        res
    }

    fn run_on(ring: &mut IoUring, fd: i32, ops: &mut [(u64, Op<'_>)]) -> io::Result<Vec<i32>> {
        let mut results = vec![0i32; ops.len()];
        for (chunk_no, chunk) in ops.chunks_mut(RING_ENTRIES as usize).enumerate() {
            let base = chunk_no * RING_ENTRIES as usize;
            for (i, (off, op)) in chunk.iter_mut().enumerate() {
                let user = (base + i) as u64;
                let entry = match op {
                    Op::Read(buf) => {
                        let len = u32::try_from(buf.len()).map_err(|_| einval())?;
                        opcode::Read::new(types::Fd(fd), buf.as_mut_ptr(), len)
                            .offset(*off)
                            .build()
                    }
                    Op::Fsync => opcode::Fsync::new(types::Fd(fd))
                        .flags(types::FsyncFlags::DATASYNC)
                        .build(),
                }
                .user_data(user);
                // SAFETY: the SQE points into a buffer borrowed mutably (or shared for writes) by
                // `ops` for the whole of this call, and we wait below for every CQE of this chunk
                // before returning or touching the next chunk, so the buffer outlives the I/O.
                unsafe {
                    ring.submission()
                        .push(&entry)
                        .map_err(|_| io::Error::other("io_uring submission queue full"))?;
                }
            }
            let mut pending = chunk.len();
            while pending > 0 {
                match ring.submit_and_wait(pending) {
                    Ok(_) => {}
                    Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                    Err(e) => return Err(e),
                }
                for cqe in ring.completion() {
                    let idx = cqe.user_data() as usize;
                    if let Some(slot) = results.get_mut(idx) {
                        *slot = cqe.result();
                    }
                    pending = pending.saturating_sub(1);
                }
            }
        }
        Ok(results)
    }
}

fn einval() -> io::Error {
    io::Error::from_raw_os_error(libc::EINVAL)
}

fn check(res: i32) -> io::Result<usize> {
    if res < 0 {
        Err(io::Error::from_raw_os_error(-res))
    } else {
        Ok(res as usize)
    }
}

impl Storage for UringFile {
    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        // A read the page cache can answer whole costs one syscall this way instead of a ring
        // round trip (io_uring would try the same non-blocking read inline first).
        if self.buffered {
            if let Ok(n) = super::pread_nowait(self.file.as_raw_fd(), buf, off) {
                if n == buf.len() {
                    return Ok(n);
                }
            }
        } else {
            // O_DIRECT: the caller waits for the device either way, and one pread is one
            // syscall where a ring round trip is a pool lock, a submission and a wait (with
            // more waiting threads than pooled rings, a ring set up and torn down each time).
            return loop {
                match std::os::unix::fs::FileExt::read_at(&self.file, buf, off) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    r => break r,
                }
            };
        }
        let mut ops = [(off, Op::Read(buf))];
        let r = self.run(&mut ops)?;
        check(r[0])
    }

    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        // A buffered write cannot be done without blocking in the submitting task on most file
        // systems (ext4 refuses RWF_NOWAIT for them), so the ring would hand it to an io-wq
        // kernel thread: two context switches around a page-cache copy, for a caller that
        // waits for the completion anyway; pwrite does the same copy in this thread. An
        // O_DIRECT write waits for the device either way, and a blocking pwrite is the cheapest
        // wait (see read_at).
        std::os::unix::fs::FileExt::write_all_at(&self.file, buf, off)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn sync(&self) -> io::Result<()> {
        let mut ops = [(0, Op::Fsync)];
        check(self.run(&mut ops)?[0]).map(|_| ())
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

    fn read_many(&self, reqs: &mut [(u64, &mut [u8])]) -> io::Result<()> {
        let lens: Vec<(u64, usize)> = reqs.iter().map(|(o, b)| (*o, b.len())).collect();
        let mut ops: Vec<(u64, Op<'_>)> = reqs.iter_mut().map(|(o, b)| (*o, Op::Read(b))).collect();
        let res = self.run(&mut ops)?;
        drop(ops);
        // Short reads (end of file or a partial transfer) are completed one by one.
        for (i, r) in res.into_iter().enumerate() {
            let n = check(r)?;
            let (off, len) = lens[i];
            if n < len {
                let buf = &mut reqs[i].1[n..];
                super::read_exact_or_zero(self, buf, off + n as u64)?;
            }
        }
        Ok(())
    }

    fn engine_name(&self) -> &'static str {
        "io_uring"
    }

    fn identity(&self) -> Option<(u64, u64)> {
        self.file.metadata().ok().map(|m| (m.dev(), m.ino()))
    }
}
