//! Exports: what a client can connect to, and the backend that answers for it.
//!
//! An [`Export`] pairs a name and description with an [`ExportBackend`], the narrow interface
//! the NBD server needs from the block layer: data, writes, zeroes, trims, flushes, block
//! status and dirty bitmaps. `session.rs` turns its answers into reply bytes. This module never
//! names an image format: [`ChainBackend`] serves any [`Chain`].

use super::meta::Available;
use super::transmission::HeaderMode;
use super::wire::*;
use crate::block::Chain;
pub use crate::block::Completion;
use crate::error::{Error, ErrorKind, Result};
use std::fmt;
use std::sync::Arc;

/// Whether an export accepts writes: the block layer's answer, passed through.
pub use crate::block::Access;

/// Block status of a run starting at the queried offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    /// Length of the run (non-zero, at most the queried length).
    pub len: u64,
    /// `base:allocation` flags (`NBD_STATE_HOLE`, `NBD_STATE_ZERO`).
    pub allocation: u32,
    /// `qemu:allocation-depth`: 0 allocated nowhere, 1 top layer, 2 first backing file, ...
    pub depth: u32,
}

/// A READ planned as file reads and zero runs (see [`ExportBackend::plan_async`]).
#[derive(Debug, Clone)]
pub struct AsyncPlan {
    pub epoch: u64,
    pub segments: Vec<crate::block::Segment>,
}

/// Whether a READ may wait for the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Block until the data is read (worker threads).
    Block,
    /// Only answer from memory (the connection's own thread).
    Never,
}

/// Options of `NBD_CMD_WRITE_ZEROES`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ZeroFlags {
    pub no_hole: bool,
    pub fast: bool,
    pub fua: bool,
}

fn denied() -> Error {
    Error::new(ErrorKind::Denied, "export is read-only")
}

/// What the NBD server needs from the storage behind an export. Required: size, read, status.
/// Writes, trims, zeroing and dirty bitmaps have defaults that refuse, so a read-only backend
/// implements only the first three.
pub trait ExportBackend: Send + Sync + fmt::Debug {
    /// Guest size in bytes.
    fn size(&self) -> u64;

    /// Read `buf.len()` bytes at `off` (the range is inside the export).
    fn read(&self, off: u64, buf: &mut [u8]) -> Result<()>;

    /// `read` if it needs no waiting for the disk (page-cache hits); `WouldBlock` otherwise.
    /// The default always answers `WouldBlock`, which is correct, only slower.
    fn read_nowait(&self, off: u64, buf: &mut [u8]) -> Result<Completion> {
        let _ = (off, buf);
        Ok(Completion::WouldBlock)
    }

    /// Status of the run at `off` (at most `len` bytes, `len > 0`).
    fn block_status(&self, off: u64, len: u64) -> Result<Status>;

    /// A read of `len` bytes at `off` planned for asynchronous file reads, with the reuse
    /// epoch read before planning (see `Chain::plan_async`). `None` (the default): read with
    /// [`read`](Self::read) instead.
    fn plan_async(&self, off: u64, len: u64) -> Option<AsyncPlan> {
        let _ = (off, len);
        None
    }

    /// The reuse epoch an [`AsyncPlan`] is checked against once its reads completed.
    fn reuse_epoch(&self) -> u64 {
        0
    }

    /// The NBD minimum block size to advertise (1 unless the image asks for more).
    fn request_alignment(&self) -> u32 {
        1
    }

    /// Whether small writes complete in memory, so the server may run them on the connection's
    /// own thread (false: each waits for the device or a flush; the workers run them).
    fn writes_buffered(&self) -> bool {
        true
    }

    /// Statuses of consecutive runs from `off` (at most `len` bytes, `len > 0`): append at least
    /// one and at most `max` to `out`. The default asks `block_status` once; a backend that can
    /// answer many runs per metadata lookup overrides it.
    fn block_status_many(
        &self,
        off: u64,
        len: u64,
        max: usize,
        out: &mut Vec<Status>,
    ) -> Result<()> {
        let _ = max;
        out.push(self.block_status(off, len)?);
        Ok(())
    }

    /// Resolve `[off, off + len)` (`len > 0`) once and call `f` with its split into pieces
    /// that read as zeros and data, in order, neighbours merged (one data piece covering the
    /// range when `holes` is false), and a reader for data inside the range, valid until `f`
    /// returns.
    /// The default splits with `block_status` and reads with `read` / `read_nowait`.
    fn read_planned(
        &self,
        off: u64,
        len: u64,
        holes: bool,
        f: &mut PlanUser<'_>,
    ) -> Result<Completion> {
        let mut runs: Vec<Piece> = Vec::new();
        let end = off + len;
        if holes {
            let mut pos = off;
            while pos < end {
                let st = self.block_status(pos, end - pos)?;
                let n = st.len.clamp(1, end - pos);
                push_run(&mut runs, st.allocation & NBD_STATE_ZERO != 0, n);
                pos += n;
            }
        } else {
            runs.push(Piece::Data(len));
        }
        f(&runs, &Direct(self))
    }

    fn access(&self) -> Access {
        Access::ReadOnly
    }

    fn can_trim(&self) -> bool {
        false
    }

    fn can_zero(&self) -> bool {
        false
    }

    fn can_fast_zero(&self) -> bool {
        false
    }

    fn write(&self, _off: u64, _data: &[u8], _fua: bool) -> Result<()> {
        Err(denied())
    }

    fn write_zeroes(&self, _off: u64, _len: u64, _flags: ZeroFlags) -> Result<()> {
        Err(denied())
    }

    fn trim(&self, _off: u64, _len: u64, _fua: bool) -> Result<()> {
        Err(denied())
    }

    /// Make every completed write durable (a no-op for a read-only backend).
    fn flush(&self) -> Result<()> {
        Ok(())
    }

    /// Clean close at server shutdown (flush, store bitmaps).
    fn close(&self) -> Result<()> {
        self.flush()
    }

    /// Prefetch hint (`NBD_CMD_CACHE`); success means nothing more than "no error".
    fn cache(&self, _off: u64, _len: u64) -> Result<()> {
        Ok(())
    }

    /// Names of the dirty bitmaps this backend can export.
    fn bitmaps(&self) -> Vec<String> {
        Vec::new()
    }

    /// The run of bitmap `name` at `off`: (length, dirty).
    fn dirty_bitmap(&self, name: &str, _off: u64, _len: u64) -> Result<(u64, bool)> {
        Err(Error::new(
            ErrorKind::NotFound,
            format!("Bitmap '{name}' is not found"),
        ))
    }
}

/// Reads data inside a range that [`ExportBackend::read_planned`] resolved.
pub trait PlannedRead {
    /// Read `buf.len()` bytes at `off`; with `Wait::Never`, `WouldBlock` (and `buf` in an
    /// unspecified state) when that would wait for the disk.
    fn read(&self, off: u64, buf: &mut [u8], wait: Wait) -> Result<Completion>;
}

/// Reads straight through a backend (each read maps its range again).
pub(crate) struct Direct<'a, B: ?Sized>(pub(crate) &'a B);

impl<B: ExportBackend + ?Sized> PlannedRead for Direct<'_, B> {
    fn read(&self, off: u64, buf: &mut [u8], wait: Wait) -> Result<Completion> {
        match wait {
            Wait::Block => self.0.read(off, buf).map(|_| Completion::Done),
            Wait::Never => self.0.read_nowait(off, buf),
        }
    }
}

impl PlannedRead for crate::block::ReadPlan<'_> {
    fn read(&self, off: u64, buf: &mut [u8], wait: Wait) -> Result<Completion> {
        let wait = match wait {
            Wait::Block => crate::block::Wait::Block,
            Wait::Never => crate::block::Wait::Never,
        };
        crate::block::ReadPlan::read(self, off, buf, wait)
    }
}

/// One part of a READ's range: sent as an OFFSET_HOLE chunk or as data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Piece {
    /// `len` bytes that read as zeros.
    Hole(u64),
    /// `len` bytes to read.
    Data(u64),
}

impl Piece {
    /// Guest bytes the piece covers.
    #[allow(clippy::len_without_is_empty)] // a piece is never empty
    pub fn len(self) -> u64 {
        match self {
            Piece::Hole(n) | Piece::Data(n) => n,
        }
    }
}

/// What [`ExportBackend::read_planned`] calls: with the range's hole/data split, in order,
/// and a reader for the data.
pub type PlanUser<'f> = dyn FnMut(&[Piece], &dyn PlannedRead) -> Result<Completion> + 'f;

/// Append a run to a hole/data split, merging it into the last piece when they agree.
pub(crate) fn push_run(runs: &mut Vec<Piece>, zero: bool, n: u64) {
    match (runs.last_mut(), zero) {
        (Some(Piece::Hole(l)), true) | (Some(Piece::Data(l)), false) => *l += n,
        (_, true) => runs.push(Piece::Hole(n)),
        (_, false) => runs.push(Piece::Data(n)),
    }
}

/// `base:allocation` and `qemu:allocation-depth` of a resolved run.
fn status_of(r: &crate::block::Resolved) -> Status {
    let mut allocation = 0;
    if !r.is_data() {
        allocation |= NBD_STATE_HOLE;
    }
    if r.reads_zero() {
        allocation |= NBD_STATE_ZERO;
    }
    Status {
        len: r.len,
        allocation,
        depth: u32::try_from(r.allocation_depth()).unwrap_or(u32::MAX),
    }
}

/// What TRIM and write-zeroes may do with host space (qemu-nbd's `--discard`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DiscardMode {
    /// TRIM succeeds and does nothing; write-zeroes keeps allocation (qemu-nbd's default).
    #[default]
    Ignore,
    /// TRIM releases clusters; write-zeroes may release them unless NO_HOLE.
    Unmap,
}

/// A backend over an image chain; writable when the chain's top layer is.
#[derive(Debug, Clone)]
pub struct ChainBackend {
    chain: Chain,
    discard: DiscardMode,
    bitmaps: Vec<(String, Arc<std::sync::RwLock<crate::bitmap::DirtyBitmap>>)>,
}

impl ChainBackend {
    pub fn new(chain: Chain) -> Self {
        ChainBackend {
            chain,
            discard: DiscardMode::Ignore,
            bitmaps: Vec::new(),
        }
    }

    /// Export these persistent bitmaps as `qemu:dirty-bitmap:NAME` (live: writes through this
    /// export keep marking the enabled ones).
    pub fn with_bitmaps(mut self, names: &[String]) -> Result<Self> {
        for n in names {
            let b = self.chain.dirty_bitmap(n)?;
            self.bitmaps.push((n.clone(), b));
        }
        Ok(self)
    }

    pub fn with_discard(mut self, discard: DiscardMode) -> Self {
        self.discard = discard;
        self
    }

    fn check_writable(&self) -> Result<()> {
        match self.access() {
            Access::ReadWrite => Ok(()),
            Access::ReadOnly => Err(denied()),
        }
    }
}

impl ExportBackend for ChainBackend {
    fn size(&self) -> u64 {
        self.chain.size()
    }

    fn read(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        self.chain.read(off, buf)
    }

    fn read_nowait(&self, off: u64, buf: &mut [u8]) -> Result<Completion> {
        self.chain.read_nowait(off, buf)
    }

    fn plan_async(&self, off: u64, len: u64) -> Option<AsyncPlan> {
        let epoch = self.chain.reuse_epoch();
        let segments = self.chain.plan_async(off, len).ok()??;
        Some(AsyncPlan { epoch, segments })
    }

    fn reuse_epoch(&self) -> u64 {
        self.chain.reuse_epoch()
    }

    fn request_alignment(&self) -> u32 {
        self.chain.top().request_alignment()
    }

    fn writes_buffered(&self) -> bool {
        self.chain.writes_buffered()
    }

    fn block_status(&self, off: u64, len: u64) -> Result<Status> {
        let r = self.chain.resolve(off, len)?;
        Ok(Status {
            len: r.len.clamp(1, len),
            ..status_of(&r)
        })
    }

    fn block_status_many(
        &self,
        off: u64,
        len: u64,
        max: usize,
        out: &mut Vec<Status>,
    ) -> Result<()> {
        let mut runs = Vec::new();
        self.chain.resolve_many(off, len, max, &mut runs)?;
        out.extend(runs.iter().map(status_of));
        Ok(())
    }

    fn read_planned(
        &self,
        off: u64,
        len: u64,
        holes: bool,
        f: &mut PlanUser<'_>,
    ) -> Result<Completion> {
        let plan = self.chain.plan_read(off, len)?;
        let mut runs: Vec<Piece> = Vec::new();
        if holes {
            for r in plan.runs() {
                push_run(&mut runs, r.reads_zero(), r.len);
            }
        } else {
            runs.push(Piece::Data(len));
        }
        f(&runs, &plan)
    }

    fn access(&self) -> Access {
        self.chain.access()
    }

    fn can_trim(&self) -> bool {
        true
    }

    fn can_zero(&self) -> bool {
        true
    }

    fn can_fast_zero(&self) -> bool {
        true
    }

    fn write(&self, off: u64, data: &[u8], fua: bool) -> Result<()> {
        self.check_writable()?;
        self.chain.write(off, data, fua)
    }

    fn write_zeroes(&self, off: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.check_writable()?;
        if flags.fast && !self.chain.zero_is_fast(off, len) {
            // NBD_CMD_FLAG_FAST_ZERO: fail at once rather than write zeros the slow way
            return Err(Error::new(
                ErrorKind::Unsupported,
                "fast zeroing is not possible for this range",
            ));
        }
        let mode = if flags.no_hole || self.discard == DiscardMode::Ignore {
            crate::block::ZeroMode::KeepAllocated
        } else {
            crate::block::ZeroMode::MayUnmap
        };
        self.chain.write_zeroes(off, len, mode)?;
        if flags.fua {
            self.chain.flush()?;
        }
        Ok(())
    }

    fn trim(&self, off: u64, len: u64, fua: bool) -> Result<()> {
        self.check_writable()?;
        if self.discard == DiscardMode::Unmap {
            self.chain.discard(off, len)?;
        }
        if fua {
            self.chain.flush()?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        self.chain.flush()
    }

    fn close(&self) -> Result<()> {
        self.chain.close()
    }

    fn bitmaps(&self) -> Vec<String> {
        self.bitmaps.iter().map(|(n, _)| n.clone()).collect()
    }

    fn dirty_bitmap(&self, name: &str, off: u64, len: u64) -> Result<(u64, bool)> {
        let Some((_, b)) = self.bitmaps.iter().find(|(n, _)| n == name) else {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("Bitmap '{name}' is not exported"),
            ));
        };
        let g = b.read().unwrap_or_else(|e| e.into_inner());
        if off >= g.size() {
            return Ok((len.max(1), false));
        }
        let (n, dirty) = g.run_at(off, len);
        Ok((n.max(1), dirty))
    }
}

/// One export of the server.
#[derive(Debug)]
pub struct Export {
    pub name: String,
    pub description: Option<String>,
    pub backend: Arc<dyn ExportBackend>,
    pub contexts: Available,
    /// Advertise `NBD_FLAG_CAN_MULTI_CONN` (qemu-nbd does when more than one client may
    /// connect).
    pub multi_conn: bool,
}

impl Export {
    /// Transmission flags for a session in `mode`, set exactly for what this export supports.
    pub fn transmission_flags(&self, mode: HeaderMode) -> u16 {
        let mut f = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA;
        f |= NBD_FLAG_SEND_CACHE;
        match self.backend.access() {
            Access::ReadOnly => f |= NBD_FLAG_READ_ONLY,
            Access::ReadWrite => {
                if self.backend.can_trim() {
                    f |= NBD_FLAG_SEND_TRIM;
                }
                if self.backend.can_zero() {
                    f |= NBD_FLAG_SEND_WRITE_ZEROES;
                    if self.backend.can_fast_zero() {
                        f |= NBD_FLAG_SEND_FAST_ZERO;
                    }
                }
            }
        }
        if mode >= HeaderMode::Structured {
            f |= NBD_FLAG_SEND_DF;
        }
        if self.multi_conn {
            f |= NBD_FLAG_CAN_MULTI_CONN;
        }
        if mode == HeaderMode::Extended {
            f |= NBD_FLAG_BLOCK_STATUS_PAYLOAD;
        }
        f
    }

    pub fn size(&self) -> u64 {
        self.backend.size()
    }
}

/// The exports of a server, looked up by exact name.
#[derive(Debug, Default)]
pub struct ExportSet {
    exports: Vec<Arc<Export>>,
}

impl ExportSet {
    pub fn new(exports: Vec<Arc<Export>>) -> Self {
        ExportSet { exports }
    }

    pub fn find(&self, name: &[u8]) -> Option<&Arc<Export>> {
        self.exports.iter().find(|e| e.name.as_bytes() == name)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Export>> {
        self.exports.iter()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A scripted backend: `runs` of (len, allocation, depth); data bytes are `fill` where the
    /// run is data, zero elsewhere.
    #[derive(Debug)]
    pub(crate) struct Scripted {
        pub runs: Vec<(u64, u32, u32)>,
        pub fill: u8,
    }

    impl Scripted {
        fn at(&self, off: u64) -> (u64, u64, u32, u32) {
            let mut start = 0;
            for &(len, a, d) in &self.runs {
                if off < start + len {
                    return (start, len, a, d);
                }
                start += len;
            }
            (start, 1, 3, 0)
        }
    }

    impl ExportBackend for Scripted {
        fn size(&self) -> u64 {
            self.runs.iter().map(|r| r.0).sum()
        }
        fn read(&self, off: u64, buf: &mut [u8]) -> Result<()> {
            for (i, b) in buf.iter_mut().enumerate() {
                let (_, _, a, _) = self.at(off + i as u64);
                *b = if a & NBD_STATE_ZERO != 0 {
                    0
                } else {
                    self.fill
                };
            }
            Ok(())
        }
        fn block_status(&self, off: u64, len: u64) -> Result<Status> {
            let (start, rl, allocation, depth) = self.at(off);
            Ok(Status {
                len: (start + rl - off).min(len),
                allocation,
                depth,
            })
        }
    }

    pub(crate) fn export(depth: bool) -> Export {
        Export {
            name: String::new(),
            description: None,
            backend: Arc::new(Scripted {
                runs: vec![(4096, 0, 1), (61440, 3, 1), (65536, 3, 0), (4096, 0, 2)],
                fill: 0xab,
            }),
            contexts: Available {
                allocation_depth: depth,
                bitmaps: vec![],
                hide_vendor: false,
            },
            multi_conn: false,
        }
    }

    #[test]
    fn read_only_flags_match_qemu_nbd_r() {
        let e = export(false);
        assert_eq!(e.transmission_flags(HeaderMode::Extended), 0x148f);
        assert_eq!(e.transmission_flags(HeaderMode::Simple), 0x040f);
    }
}
