//! Exports: what a client can connect to, and the execution of validated commands.
//!
//! An [`Export`] pairs a name and description with an [`ExportBackend`], the narrow interface
//! the NBD server needs from the block layer. The backend answers for data, block status and
//! (later) writes and dirty bitmaps; this module turns its answers into reply bytes. It never
//! names an image format: [`ChainBackend`] serves any [`Chain`].
//!
//! READ with structured replies sends `NBD_REPLY_TYPE_OFFSET_HOLE` for ranges that read as
//! zeros (unless the client set DF); BLOCK_STATUS is answered from block status only, never by
//! reading data.

use super::extents::{Extent, ExtentBuilder, MAX_EXTENTS};
use super::handshake::Session;
use super::meta::{Available, MetaContext};
use super::reply::ReplyBatch;
use super::transmission::{self, Command, HeaderMode, MAX_PAYLOAD};
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

    /// Whether small writes complete in memory, so the server may run them on the connection's
    /// own thread (false: each waits for the device or a flush; the workers run them).
    /// The NBD minimum block size to advertise (1 unless the image asks for more).
    fn request_alignment(&self) -> u32 {
        1
    }

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
        Err(Error::unsupported(format!(
            "Bitmap '{name}' is not found (bitmap support not available yet)"
        )))
    }
}

/// Reads data inside a range that [`ExportBackend::read_planned`] resolved.
pub trait PlannedRead {
    /// Read `buf.len()` bytes at `off`; with `Wait::Never`, `WouldBlock` (and `buf` in an
    /// unspecified state) when that would wait for the disk.
    fn read(&self, off: u64, buf: &mut [u8], wait: Wait) -> Result<Completion>;
}

/// Reads straight through a backend (each read maps its range again).
struct Direct<'a, B: ?Sized>(&'a B);

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

/// The chunk header of one piece of a structured READ reply at guest offset `pos` (`last`: the
/// DONE flag): `OFFSET_HOLE` for a hole, the `OFFSET_DATA` header for data (its bytes follow).
pub(crate) fn encode_read_chunk(
    out: &mut Vec<u8>,
    mode: HeaderMode,
    cookie: u64,
    req_offset: u64,
    last: bool,
    pos: u64,
    piece: Piece,
) {
    let flags = if last { NBD_REPLY_FLAG_DONE } else { 0 };
    match piece {
        // n <= 32 MiB fits the 32-bit hole size
        Piece::Hole(n) => {
            transmission::encode_hole(out, mode, cookie, req_offset, flags, pos, n as u32)
        }
        Piece::Data(n) => {
            transmission::encode_data_header(out, mode, cookie, req_offset, flags, pos, n as usize)
        }
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

    /// Execute a validated command and return the encoded reply (empty for `NBD_CMD_DISC`).
    pub fn execute(&self, s: &Session, cookie: u64, req_offset: u64, cmd: Command) -> Vec<u8> {
        let mode = s.mode;
        let mut out = Vec::new();
        let res = match cmd {
            Command::Disc => return out,
            Command::Read { offset, length, df } => {
                let mut batch = ReplyBatch::new();
                let r = self.read_into(
                    mode,
                    cookie,
                    req_offset,
                    offset,
                    length,
                    df,
                    &mut batch,
                    Wait::Block,
                );
                debug_assert_eq!(r, Completion::Done);
                return batch.to_vec();
            }
            Command::BlockStatus {
                offset,
                length,
                req_one,
                ids,
            } => return self.block_status(s, cookie, req_offset, offset, length, req_one, ids),
            Command::Write { offset, data, fua } => self.backend.write(offset, &data, fua),
            Command::Flush => self.backend.flush(),
            Command::Trim {
                offset,
                length,
                fua,
            } => self.backend.trim(offset, length, fua),
            Command::Cache { offset, length } => self.backend.cache(offset, length),
            Command::WriteZeroes {
                offset,
                length,
                no_hole,
                fast,
                fua,
            } => self
                .backend
                .write_zeroes(offset, length, ZeroFlags { no_hole, fast, fua }),
        };
        match res {
            Ok(()) => transmission::encode_ok(&mut out, mode, cookie, req_offset),
            Err(e) => encode_failure(&mut out, mode, cookie, req_offset, &e),
        }
        out
    }

    /// Append the reply to a READ to `batch`. With `Wait::Never` the data must come without
    /// waiting for the disk: `Completion::WouldBlock` (and `batch` unchanged) when it cannot.
    /// Errors become error replies.
    #[allow(clippy::too_many_arguments)]
    pub fn read_into(
        &self,
        mode: HeaderMode,
        cookie: u64,
        req_offset: u64,
        offset: u64,
        length: u32,
        df: bool,
        batch: &mut ReplyBatch,
        wait: Wait,
    ) -> Completion {
        let mark = batch.mark();
        match self.read_parts(mode, cookie, req_offset, offset, length, df, batch, wait) {
            Ok(Completion::Done) => Completion::Done,
            Ok(Completion::WouldBlock) => {
                batch.rollback(mark);
                Completion::WouldBlock
            }
            Err(e) => {
                batch.rollback(mark);
                batch.push_head(|out| encode_failure(out, mode, cookie, req_offset, &e));
                Completion::Done
            }
        }
    }

    /// Read `len` bytes at `pos` into a pooled buffer and queue it.
    fn read_piece(
        reader: &dyn PlannedRead,
        pos: u64,
        len: usize,
        batch: &mut ReplyBatch,
        wait: Wait,
    ) -> Result<Completion> {
        let mut buf = batch.take_buf(len);
        let res = reader.read(pos, &mut buf[..len], wait);
        match res {
            Ok(Completion::Done) => {
                batch.push_data(buf, len);
                Ok(Completion::Done)
            }
            other => {
                batch.give_back(buf);
                other
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn read_parts(
        &self,
        mode: HeaderMode,
        cookie: u64,
        req_offset: u64,
        offset: u64,
        length: u32,
        df: bool,
        batch: &mut ReplyBatch,
        wait: Wait,
    ) -> Result<Completion> {
        let len = length as usize;
        if mode == HeaderMode::Simple {
            batch.push_head(|out| transmission::encode_simple(out, cookie, 0));
            if len == 0 {
                return Ok(Completion::Done);
            }
            return Self::read_piece(&Direct(&*self.backend), offset, len, batch, wait);
        }
        if len == 0 {
            batch.push_head(|out| {
                if mode == HeaderMode::Structured {
                    // a structured reply is required for READ: a lone NONE chunk
                    transmission::encode_chunk_header(
                        out,
                        mode,
                        cookie,
                        req_offset,
                        NBD_REPLY_FLAG_DONE,
                        NBD_REPLY_TYPE_NONE,
                        0,
                    );
                } else {
                    transmission::encode_ok(out, HeaderMode::Extended, cookie, req_offset);
                }
            });
            return Ok(Completion::Done);
        }
        // Structured READ: content chunks in offset order, the last one flagged DONE; ranges
        // that read as zeros become OFFSET_HOLE chunks unless the client set DF. The range is
        // resolved once: the same plan splits the holes and reads the data.
        self.backend
            .read_planned(offset, len as u64, !df, &mut |runs, reader| {
                let mut pos = offset;
                let last = runs.len().saturating_sub(1);
                for (i, &piece) in runs.iter().enumerate() {
                    batch.push_head(|out| {
                        encode_read_chunk(out, mode, cookie, req_offset, i == last, pos, piece)
                    });
                    if let Piece::Data(n) = piece {
                        if Self::read_piece(reader, pos, n as usize, batch, wait)?
                            == Completion::WouldBlock
                        {
                            return Ok(Completion::WouldBlock);
                        }
                    }
                    pos += piece.len();
                }
                Ok(Completion::Done)
            })
    }

    #[allow(clippy::too_many_arguments)]
    fn block_status(
        &self,
        s: &Session,
        cookie: u64,
        req_offset: u64,
        offset: u64,
        length: u64,
        req_one: bool,
        ids: Option<Vec<u32>>,
    ) -> Vec<u8> {
        let mode = s.mode;
        let mut out = Vec::new();
        let selected: Vec<&(u32, MetaContext)> = match &ids {
            None => s.contexts.iter().collect(),
            Some(list) => {
                let mut sel = Vec::new();
                for id in list {
                    match s.contexts.iter().find(|(i, _)| i == id) {
                        Some(c) if !sel.iter().any(|x: &&(u32, MetaContext)| x.0 == *id) => {
                            sel.push(c)
                        }
                        _ => {
                            transmission::encode_error(
                                &mut out,
                                mode,
                                cookie,
                                req_offset,
                                NBD_EINVAL,
                                "unknown or duplicate metadata context id",
                            );
                            return out;
                        }
                    }
                }
                sel
            }
        };
        if selected.is_empty() {
            transmission::encode_error(
                &mut out,
                mode,
                cookie,
                req_offset,
                NBD_EINVAL,
                "no metadata context selected",
            );
            return out;
        }
        // Compact replies carry 32-bit lengths; a compact request never exceeds them.
        let cap = MAX_EXTENTS;
        let res = (|| -> Result<Vec<(u32, Vec<Extent>)>> {
            let mut alloc: Option<ExtentBuilder> = None;
            let mut depth: Option<ExtentBuilder> = None;
            let mut result = Vec::new();
            for (id, ctx) in &selected {
                match ctx {
                    MetaContext::BaseAllocation => {
                        alloc = Some(ExtentBuilder::new(offset, length, req_one, cap))
                    }
                    MetaContext::AllocationDepth => {
                        depth = Some(ExtentBuilder::new(offset, length, req_one, cap))
                    }
                    MetaContext::DirtyBitmap(name) => {
                        let mut b = ExtentBuilder::new(offset, length, req_one, cap);
                        let mut pos = offset;
                        while !b.is_done() {
                            let (n, dirty) =
                                self.backend
                                    .dirty_bitmap(name, pos, offset + length - pos)?;
                            let n = n.max(1);
                            b.push(n, if dirty { NBD_STATE_DIRTY.into() } else { 0 });
                            pos = pos.saturating_add(n);
                        }
                        result.push((*id, b.finish()));
                    }
                    MetaContext::DirtyAllocated(name) => {
                        // dirty bitmap runs intersected with block status runs
                        let mut b = ExtentBuilder::new(offset, length, req_one, cap);
                        let end = offset + length;
                        let mut pos = offset;
                        while !b.is_done() && pos < end {
                            let (n1, dirty) = self.backend.dirty_bitmap(name, pos, end - pos)?;
                            let n1 = n1.clamp(1, end - pos);
                            let (n, flag) = if dirty {
                                let st = self.backend.block_status(pos, n1)?;
                                let n = st.len.clamp(1, n1);
                                let data = st.allocation & NBD_STATE_HOLE == 0;
                                (n, u32::from(data))
                            } else {
                                (n1, 0)
                            };
                            b.push(n, flag.into());
                            pos = pos.saturating_add(n);
                        }
                        result.push((*id, b.finish()));
                    }
                }
            }
            // One chain walk feeds both chain-derived contexts.
            let end = offset + length;
            let mut pos = offset;
            let busy = |b: &Option<ExtentBuilder>| b.as_ref().is_some_and(|b| !b.is_done());
            // Runs come in batches (one metadata lookup per L2 table, not per run), small at
            // first so that a REQ_ONE or short query maps little more than it answers.
            let mut statuses = Vec::new();
            let mut want = if req_one { 2 } else { 16 };
            while pos < end && (busy(&alloc) || busy(&depth)) {
                statuses.clear();
                self.backend
                    .block_status_many(pos, end - pos, want, &mut statuses)?;
                want = (want * 4).min(STATUS_BATCH_MAX);
                for st in &statuses {
                    if pos >= end || !(busy(&alloc) || busy(&depth)) {
                        break;
                    }
                    let n = st.len.clamp(1, end - pos);
                    if let Some(b) = alloc.as_mut() {
                        b.push(n, st.allocation.into());
                    }
                    if let Some(b) = depth.as_mut() {
                        b.push(n, st.depth.into());
                    }
                    pos += n;
                }
            }
            for (id, ctx) in &selected {
                match ctx {
                    MetaContext::BaseAllocation => {
                        result.push((*id, alloc.take().map(|b| b.finish()).unwrap_or_default()))
                    }
                    MetaContext::AllocationDepth => {
                        result.push((*id, depth.take().map(|b| b.finish()).unwrap_or_default()))
                    }
                    MetaContext::DirtyBitmap(_) | MetaContext::DirtyAllocated(_) => {}
                }
            }
            Ok(result)
        })();
        match res {
            Ok(chunks) => {
                let last = chunks.len().saturating_sub(1);
                for (i, (id, ext)) in chunks.iter().enumerate() {
                    let flags = if i == last { NBD_REPLY_FLAG_DONE } else { 0 };
                    transmission::encode_block_status(
                        &mut out, mode, cookie, req_offset, flags, *id, ext,
                    );
                }
            }
            Err(e) => encode_failure(&mut out, mode, cookie, req_offset, &e),
        }
        out
    }
}

fn encode_failure(out: &mut Vec<u8>, mode: HeaderMode, cookie: u64, req_offset: u64, e: &Error) {
    transmission::encode_error(
        out,
        mode,
        cookie,
        req_offset,
        errno_to_nbd(e.errno()),
        &e.to_string(),
    );
}

/// Block-status runs asked of the backend per call at most (a batch is mapped under one
/// metadata lock per L2 table it crosses).
const STATUS_BATCH_MAX: usize = 1024;

/// Advertised block sizes: minimum, preferred, maximum (qemu-nbd's values).
pub const BLOCK_SIZES: (u32, u32, u32) = (1, 4096, MAX_PAYLOAD);

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
    use crate::nbd::transmission::Limits;

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

    fn session(mode: HeaderMode) -> Session {
        let e = Arc::new(export(true));
        let contexts = e.contexts.all();
        Session {
            flags: e.transmission_flags(mode),
            export: e,
            mode,
            contexts,
        }
    }

    #[test]
    fn read_only_flags_match_qemu_nbd_r() {
        let e = export(false);
        assert_eq!(e.transmission_flags(HeaderMode::Extended), 0x148f);
        assert_eq!(e.transmission_flags(HeaderMode::Simple), 0x040f);
    }

    #[test]
    fn structured_read_sends_holes() {
        let s = session(HeaderMode::Structured);
        let out = s.export.execute(
            &s,
            9,
            0,
            Command::Read {
                offset: 0,
                length: 131072 + 4096,
                df: false,
            },
        );
        // data chunk (4096), hole chunk, data chunk (4096 of the last run)
        let first_len = u32::from_be_bytes(out[16..20].try_into().unwrap()) as usize;
        assert_eq!(first_len, 8 + 4096);
        let second = 20 + first_len;
        assert_eq!(
            &out[second + 6..second + 8],
            &NBD_REPLY_TYPE_OFFSET_HOLE.to_be_bytes()
        );
        assert_eq!(&out[second + 20 + 8..second + 32], &126976u32.to_be_bytes());
        // DF: one data chunk with the zeros inline
        let out = s.export.execute(
            &s,
            9,
            0,
            Command::Read {
                offset: 0,
                length: 8192,
                df: true,
            },
        );
        assert_eq!(out.len(), 20 + 8 + 8192);
        assert_eq!(&out[4..6], &NBD_REPLY_FLAG_DONE.to_be_bytes());
    }

    #[test]
    fn block_status_reports_every_context_clamped() {
        let s = session(HeaderMode::Structured);
        let lim = Limits {
            size: s.export.size(),
            mode: s.mode,
            flags: s.flags,
            contexts: s.contexts.len(),
        };
        let req = transmission::RawRequest {
            flags: 0,
            cmd: NBD_CMD_BLOCK_STATUS,
            cookie: 1,
            offset: 1000,
            length: 70000,
        };
        let cmd = transmission::validate(&req, None, false, &lim).unwrap();
        let out = s.export.execute(&s, 1, 1000, cmd);
        // chunk 1: base:allocation: 3096 data, 66904 hole|zero
        assert_eq!(&out[16..20], &(4 + 16u32).to_be_bytes());
        assert_eq!(&out[20..24], &0u32.to_be_bytes());
        assert_eq!(&out[24..28], &3096u32.to_be_bytes());
        assert_eq!(&out[32..36], &66904u32.to_be_bytes());
        assert_eq!(&out[36..40], &3u32.to_be_bytes());
        // chunk 2: depth: 64536 at depth 1, 5464 at depth 0; DONE
        let c2 = 40;
        assert_eq!(&out[c2 + 4..c2 + 6], &NBD_REPLY_FLAG_DONE.to_be_bytes());
        assert_eq!(&out[c2 + 20..c2 + 24], &1u32.to_be_bytes());
        assert_eq!(&out[c2 + 24..c2 + 28], &64536u32.to_be_bytes());
        assert_eq!(&out[c2 + 32..c2 + 36], &5464u32.to_be_bytes());
    }

    #[test]
    fn write_on_read_only_backend_is_eperm() {
        let s = session(HeaderMode::Simple);
        let out = s.export.execute(
            &s,
            3,
            0,
            Command::Write {
                offset: 0,
                data: vec![1],
                fua: false,
            },
        );
        assert_eq!(&out[4..8], &NBD_EPERM.to_be_bytes());
    }
}
