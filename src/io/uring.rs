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
//!
//! [`EventRing`] is the other kind of ring: one per NBD data-plane thread (`nbd/plane.rs`),
//! carrying socket receives and sends, file reads and an eventfd wake-up, with an in-flight
//! table that owns every submitted buffer until its completion is reaped. [`WakeFd`] wakes it
//! from other threads.

use super::buf::IoBuf;
use super::sync::seek_extent;
use super::{Extent, Storage};
use io_uring::{opcode, types, IoUring, Probe};
use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::{AsRawFd, RawFd};
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

impl Drop for UringFile {
    fn drop(&mut self) {
        // the rings may keep the description alive past this close (see `release_all`)
        super::lock::release_all(&self.file);
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
                match submit_and_wait(ring, pending) {
                    Ok(_) => {}
                    Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                    Err(e) => {
                        // What the kernel took is in flight and writes into `ops`' buffers:
                        // wait for all of it before the buffers can be given back.
                        Self::reap(ring, &mut results, &mut pending);
                        let in_flight = pending.saturating_sub(ring.submission().len());
                        Self::drain(ring, in_flight);
                        return Err(e);
                    }
                }
                Self::reap(ring, &mut results, &mut pending);
            }
        }
        Ok(results)
    }

    fn reap(ring: &mut IoUring, results: &mut [i32], pending: &mut usize) {
        for cqe in ring.completion() {
            let idx = cqe.user_data() as usize;
            if let Some(slot) = results.get_mut(idx) {
                *slot = cqe.result();
            }
            *pending = pending.saturating_sub(1);
        }
    }

    /// Wait, without submitting anything more, until `in_flight` operations have completed.
    /// Used after a failed submission; the ring is dropped afterwards (entries it never took
    /// stay unsubmitted). If the kernel keeps refusing to wait, the process aborts: returning
    /// would let the kernel write into freed memory.
    fn drain(ring: &mut IoUring, mut in_flight: usize) {
        /// `IORING_ENTER_GETEVENTS`
        const GETEVENTS: u32 = 1;
        let mut failures = 0u32;
        while in_flight > 0 {
            let want = u32::try_from(in_flight).unwrap_or(u32::MAX);
            // SAFETY: io_uring_enter with nothing to submit only waits for completions; no
            // argument struct is passed.
            let r = unsafe {
                ring.submitter()
                    .enter::<libc::sigset_t>(0, want, GETEVENTS, None)
            };
            if let Err(e) = r {
                if e.raw_os_error() != Some(libc::EINTR) {
                    failures += 1;
                    if failures > 10_000 {
                        eprintln!("{}: io_uring: cannot wait for {in_flight} operations in flight ({e}); aborting", crate::error::program());
                        std::process::abort();
                    }
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            }
            for _ in ring.completion() {
                in_flight -= 1;
            }
        }
    }
}

/// `submit_and_wait`, with an error injected after a successful submission when a test asks
/// for it (the entries are then in flight, as after a real failure of the wait).
fn submit_and_wait(ring: &mut IoUring, want: usize) -> io::Result<usize> {
    #[cfg(test)]
    if let Some(errno) = inject::take() {
        ring.submit()?;
        return Err(io::Error::from_raw_os_error(errno));
    }
    ring.submit_and_wait(want)
}

/// Fault injection for the submission path (tests only).
#[cfg(test)]
pub mod inject {
    use std::cell::Cell;

    thread_local! {
        static NEXT: Cell<Option<i32>> = const { Cell::new(None) };
    }

    /// Make the next wait of this thread fail with `errno` after its entries were submitted.
    pub fn fail_next_wait(errno: i32) {
        NEXT.with(|c| c.set(Some(errno)));
    }

    pub(super) fn take() -> Option<i32> {
        NEXT.with(|c| c.take())
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
        super::file_len(&self.file)
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

    fn zero_range(&self, off: u64, len: u64, how: super::ZeroRange) -> io::Result<()> {
        super::zero_range_fd(self.file.as_raw_fd(), off, len, how)
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

    fn raw_fd(&self) -> Option<RawFd> {
        Some(self.file.as_raw_fd())
    }

    fn identity(&self) -> Option<(u64, u64)> {
        self.file.metadata().ok().map(|m| (m.dev(), m.ino()))
    }
}

// ---------------------------------------------------------------------------------------------
// Event rings: the NBD data plane's socket and file I/O.

/// Whether io_uring here supports what an [`EventRing`] submits (socket receive and `sendmsg`,
/// file and eventfd reads).
pub fn probe_event_ring() -> io::Result<()> {
    let ring = IoUring::new(4)?;
    let mut probe = Probe::new();
    ring.submitter().register_probe(&mut probe)?;
    for code in [
        opcode::Read::CODE,
        opcode::Recv::CODE,
        opcode::SendMsg::CODE,
    ] {
        if !probe.is_supported(code) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("io_uring opcode {code} not supported"),
            ));
        }
    }
    Ok(())
}

/// Bytes a ring send takes whole. The ring keeps the value boxed and untouched from submission
/// until the send completes, so the slices it returned stay valid for the kernel.
pub trait SendData {
    /// The bytes to send, in order.
    fn slices(&self) -> Vec<io::IoSlice<'_>>;
}

/// An operation on an [`EventRing`], owning its buffers until its completion is reaped.
pub enum RingOp<D> {
    /// Receive into the spare capacity of `buf` (at most `max` bytes); on completion the bytes
    /// received are part of `buf` (its length grew by the result). With `all`, the kernel keeps
    /// receiving until `max` bytes came (or the peer closed, or an error).
    Recv {
        fd: RawFd,
        buf: Vec<u8>,
        max: usize,
        all: bool,
    },
    /// Send `data` without its first `skip` bytes. The kernel keeps sending until all of it is
    /// sent (`MSG_WAITALL`), so a short result means an error or a closed peer.
    Send {
        fd: RawFd,
        data: Box<D>,
        skip: usize,
    },
    /// Read `len` bytes at file offset `off` into `buf[at..at + len]`.
    Read {
        fd: RawFd,
        buf: IoBuf,
        at: usize,
        len: usize,
        off: u64,
    },
    /// Wait until a [`WakeFd`] is signalled (its counter is read and reset).
    Wake { fd: RawFd },
}

/// A reaped completion: the caller's token, the kernel's result (bytes, or `-errno`) and the
/// operation with its buffers.
pub struct RingDone<D> {
    pub token: u64,
    pub result: i32,
    pub op: RingOp<D>,
}

struct Slot<D> {
    token: u64,
    op: RingOp<D>,
    /// The I/O vectors and message header of a send; heap allocations that do not move when
    /// the slot does.
    iov: Vec<libc::iovec>,
    msg: Option<Box<libc::msghdr>>,
    /// The eventfd counter a `Wake` reads into.
    counter: Option<Box<u64>>,
}

// SAFETY: the raw pointers in `iov` and `msg` point only into heap memory owned by the same
// slot (the send data, the iovec array); moving the slot to another thread moves that
// ownership with it, exactly as for the owning fields themselves.
unsafe impl<D: Send> Send for Slot<D> {}

/// One io_uring owned by one thread, with an in-flight table that owns every submitted
/// operation's buffers. A buffer comes back to the caller only with its completion, so the
/// kernel never writes into memory the caller can reuse. The file descriptors named by the
/// operations must stay open until their completions are reaped (the caller's duty: a closed and
/// reused descriptor would receive the I/O).
pub struct EventRing<D> {
    ring: IoUring,
    slots: Vec<Option<Slot<D>>>,
    free: Vec<usize>,
    busy: usize,
}

impl<D: SendData> EventRing<D> {
    /// A ring for the calling thread only: completions' task work runs when this thread
    /// waits (`DEFER_TASKRUN`), not as interrupts while it decodes and copies. Kernels without
    /// those flags get a plain ring.
    pub fn new(entries: u32) -> io::Result<Self> {
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_coop_taskrun()
            .build(entries)
            .or_else(|_| IoUring::new(entries))?;
        Ok(EventRing {
            ring,
            slots: Vec::new(),
            free: Vec::new(),
            busy: 0,
        })
    }

    /// Operations submitted and not yet reaped.
    pub fn in_flight(&self) -> usize {
        self.busy
    }

    /// Queue `op` (submitted by the next [`submit_and_wait`](Self::submit_and_wait), or at once
    /// when the submission queue is full). On error the operation is returned untouched.
    pub fn push(&mut self, token: u64, op: RingOp<D>) -> Result<(), (io::Error, RingOp<D>)> {
        let mut slot = Slot {
            token,
            op,
            iov: Vec::new(),
            msg: None,
            counter: None,
        };
        let entry = match Self::entry(&mut slot) {
            Ok(e) => e,
            Err(e) => return Err((e, slot.op)),
        };
        if self.ring.submission().is_full() {
            if let Err(e) = self.ring.submit() {
                return Err((e, slot.op));
            }
        }
        let idx = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(None);
                self.slots.len() - 1
            }
        };
        let entry = entry.user_data(idx as u64);
        // SAFETY: every pointer in the entry points into heap memory owned by `slot` (the
        // receive Vec's spare capacity, the boxed send data and its iovec array / msghdr, the
        // read IoBuf, the boxed eventfd counter). The slot is stored in `self.slots` right
        // after this and stays there, unmodified, until the entry's completion is reaped in
        // `complete`; moving the slot moves none of that heap memory. If the ring is dropped
        // with operations in flight, their slots are leaked, not freed (see Drop).
        let pushed = unsafe { self.ring.submission().push(&entry) };
        if pushed.is_err() {
            self.free.push(idx);
            return Err((io::Error::other("io_uring submission queue full"), slot.op));
        }
        self.slots[idx] = Some(slot);
        self.busy += 1;
        Ok(())
    }

    fn entry(slot: &mut Slot<D>) -> io::Result<io_uring::squeue::Entry> {
        let len32 = |n: usize| u32::try_from(n).map_err(|_| einval());
        Ok(match &mut slot.op {
            RingOp::Recv { fd, buf, max, all } => {
                let room = (buf.capacity() - buf.len()).min(*max);
                if room == 0 {
                    return Err(einval());
                }
                let spare = buf.spare_capacity_mut();
                let flags = if *all { libc::MSG_WAITALL } else { 0 };
                opcode::Recv::new(types::Fd(*fd), spare.as_mut_ptr().cast(), len32(room)?)
                    .flags(flags)
                    .build()
            }
            RingOp::Send { fd, data, skip } => {
                let mut left = *skip;
                for s in data.slices() {
                    if left >= s.len() {
                        left -= s.len();
                        continue;
                    }
                    let rest = &s[left..];
                    left = 0;
                    slot.iov.push(libc::iovec {
                        iov_base: rest.as_ptr() as *mut libc::c_void,
                        iov_len: rest.len(),
                    });
                    if slot.iov.len() == MAX_SEND_IOV {
                        break;
                    }
                }
                if slot.iov.is_empty() {
                    return Err(einval());
                }
                // SAFETY: msghdr is plain old data; all-zero is a valid (empty) value.
                let mut msg: Box<libc::msghdr> = Box::new(unsafe { std::mem::zeroed() });
                msg.msg_iov = slot.iov.as_mut_ptr();
                msg.msg_iovlen = slot.iov.len() as _;
                let entry = opcode::SendMsg::new(types::Fd(*fd), &*msg as *const libc::msghdr)
                    .flags((libc::MSG_NOSIGNAL | libc::MSG_WAITALL) as u32)
                    .build();
                slot.msg = Some(msg);
                entry
            }
            RingOp::Read {
                fd,
                buf,
                at,
                len,
                off,
            } => {
                let end = at.checked_add(*len).ok_or_else(einval)?;
                if end > buf.len() || *len == 0 {
                    return Err(einval());
                }
                let dst = &mut buf[*at..end];
                opcode::Read::new(types::Fd(*fd), dst.as_mut_ptr(), len32(*len)?)
                    .offset(*off)
                    .build()
            }
            RingOp::Wake { fd } => {
                let p: *mut u64 = &mut **slot.counter.insert(Box::new(0));
                opcode::Read::new(types::Fd(*fd), p.cast(), 8).build()
            }
        })
    }

    /// Submit what is queued and wait until at least `want` completions are ready.
    pub fn submit_and_wait(&mut self, want: usize) -> io::Result<()> {
        loop {
            match self.ring.submit_and_wait(want) {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {
                    if want == 0 || !self.ring.completion().is_empty() {
                        return Ok(());
                    }
                }
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    // completion queue overflowing: reap first
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Move every ready completion to `out`.
    pub fn complete(&mut self, out: &mut Vec<RingDone<D>>) {
        for cqe in self.ring.completion() {
            let (idx, result) = (cqe.user_data() as usize, cqe.result());
            let Some(slot) = self.slots.get_mut(idx).and_then(Option::take) else {
                continue;
            };
            self.free.push(idx);
            self.busy -= 1;
            let Slot { token, mut op, .. } = slot;
            if let RingOp::Recv { buf, .. } = &mut op {
                if result > 0 {
                    let n = (result as usize).min(buf.capacity() - buf.len());
                    // SAFETY: the kernel reported writing `n` bytes into the spare capacity
                    // that the receive was given, starting at the old length.
                    unsafe { buf.set_len(buf.len() + n) };
                }
            }
            out.push(RingDone { token, result, op });
        }
    }
}

impl<D> Drop for EventRing<D> {
    fn drop(&mut self) {
        // The kernel may still write into the buffers of operations in flight after the ring's
        // descriptor is closed (cancellation is asynchronous): leak them rather than free them.
        for s in self.slots.drain(..).flatten() {
            std::mem::forget(s);
        }
    }
}

/// I/O vectors per ring send.
const MAX_SEND_IOV: usize = 1024;

/// An eventfd that wakes an [`EventRing`] waiting on it (`RingOp::Wake`) from another thread.
#[derive(Debug)]
pub struct WakeFd(std::os::fd::OwnedFd);

impl WakeFd {
    pub fn new() -> io::Result<WakeFd> {
        // SAFETY: eventfd(2) with valid flags; the result is checked before use.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor owned by nobody else.
        Ok(WakeFd(unsafe {
            <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd)
        }))
    }

    pub fn raw(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    /// Wake the ring (cheap; many signals before the ring looks count as one).
    pub fn signal(&self) {
        let one: u64 = 1;
        // SAFETY: writing 8 bytes from a valid local to our own eventfd.
        unsafe {
            libc::write(
                self.0.as_raw_fd(),
                (&one as *const u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A wait that fails with operations in flight returns only once they have all completed:
    /// the reads here are on a socket that has no data until a thread writes it later, so they
    /// are surely in flight when the injected error comes; the call must wait for them (the
    /// buffers hold the bytes) and nothing may complete after it returned.
    #[test]
    fn a_failed_wait_reaps_everything_in_flight() {
        let Ok(mut ring) = IoUring::new(RING_ENTRIES) else {
            assert!(
                !crate::testing::in_ci(),
                "io_uring is refused here (CI: a failure)"
            );
            eprintln!("SKIP: io_uring is refused here");
            return;
        };
        for errno in [libc::EBUSY, libc::EAGAIN, libc::EIO] {
            let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
            let mut bufs = vec![vec![0u8; 512]; 4];
            let writer = std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(100));
                b.write_all(&[7u8; 2048]).unwrap();
                b
            });
            let started = std::time::Instant::now();
            {
                let mut ops: Vec<(u64, Op<'_>)> =
                    bufs.iter_mut().map(|b| (0, Op::Read(b))).collect();
                inject::fail_next_wait(errno);
                let r = UringFile::run_on(&mut ring, a.as_raw_fd(), &mut ops);
                assert_eq!(r.unwrap_err().raw_os_error(), Some(errno));
            }
            let waited = started.elapsed();
            let _b = writer.join().unwrap();
            std::thread::sleep(std::time::Duration::from_millis(20));
            ring.submit().unwrap();
            assert_eq!(
                ring.completion().len(),
                0,
                "operations completed after run_on returned (errno {errno})"
            );
            assert!(
                waited >= std::time::Duration::from_millis(80),
                "returned after {waited:?}, before the reads completed"
            );
            assert!(bufs.iter().all(|b| b.iter().all(|&x| x == 7)));
        }
    }
}
