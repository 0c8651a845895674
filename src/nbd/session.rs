//! A negotiated session and the execution of its commands: what the two transmission drivers
//! (`server.rs`, `plane.rs`) call for every request. A command is executed against the
//! session's export backend and answered as the session's header mode asks (simple,
//! structured or extended replies); READ replies are built into a [`ReplyBatch`] of headers
//! and page-aligned data buffers, BLOCK_STATUS replies carry one chunk per selected
//! metadata context.
//!
//! READ with structured replies sends `NBD_REPLY_TYPE_OFFSET_HOLE` for ranges that read as
//! zeros (unless the client set DF); BLOCK_STATUS is answered from block status only, never by
//! reading data.

use super::export::{ChainRun, Export, PlannedRead, Wait, ZeroFlags};
use super::extents::{Extent, ExtentBuilder, MAX_EXTENTS};
use super::meta::MetaContext;
use super::reply::ReplyBatch;
use super::stats::Started;
use super::transmission::{self, Command, HeaderMode};
use super::wire::*;
use crate::block::Completion;
use crate::error::{Error, Result};
use crate::log;
use std::sync::Arc;

/// What transmission needs from a finished negotiation.
#[derive(Debug, Clone)]
pub struct Session {
    pub export: Arc<Export>,
    pub mode: HeaderMode,
    /// Selected metadata contexts with their ids.
    pub contexts: Vec<(u32, MetaContext)>,
    /// Transmission flags sent to the client.
    pub flags: u16,
    /// The connection, for the log.
    pub conn: Arc<log::Conn>,
}

impl Session {
    /// A validated request starts: what [`Session::execute`] and [`Session::read_into`] record
    /// when its reply is ready (`None` when the export keeps no statistics).
    #[inline]
    pub fn begin(&self, cmd: &Command) -> Option<Started> {
        if self.export.stats.is_none() && log::slow_threshold().is_none() {
            return None;
        }
        let t = Started::of(cmd)?;
        if let Some(s) = &self.export.stats {
            s.started(&t);
        }
        Some(t)
    }

    /// A request was refused before execution.
    pub fn rejected(&self) {
        if let Some(s) = &self.export.stats {
            s.rejected();
        }
    }

    #[inline]
    fn end(&self, started: Option<Started>, ok: bool) {
        let Some(t) = started else { return };
        if let Some(s) = &self.export.stats {
            s.end(t, ok);
        }
        if let Some(limit) = log::slow_threshold() {
            let took = t.elapsed();
            if took >= limit {
                log::event(
                    log::Level::Warn,
                    "slow-request",
                    Some(&self.conn),
                    &format!(
                        "slow {} of {} bytes: {:.1} ms (threshold {} ms)",
                        t.op().name(),
                        t.bytes(),
                        took.as_secs_f64() * 1e3,
                        limit.as_millis()
                    ),
                );
            }
        }
    }

    /// An error reply to a request: logged (warn) with what failed.
    fn failed(&self, what: &str, e: &Error) {
        log::event(
            log::Level::Warn,
            "request-failed",
            Some(&self.conn),
            &format!("{what} failed: {e}"),
        );
    }

    /// Execute a validated command and return the encoded reply (empty for `NBD_CMD_DISC`);
    /// `started` (from [`Session::begin`]) is recorded once the reply is ready.
    pub fn execute(
        &self,
        cookie: u64,
        req_offset: u64,
        cmd: Command,
        started: Option<Started>,
    ) -> Vec<u8> {
        let mode = self.mode;
        let mut out = Vec::new();
        let what = super::stats::Op::of(&cmd);
        let res = match cmd {
            Command::Disc => return out,
            Command::Read { offset, length, df } => {
                let mut batch = ReplyBatch::new();
                let r = self.read_into(
                    cookie,
                    req_offset,
                    offset,
                    length,
                    df,
                    &mut batch,
                    Wait::Block,
                    started,
                );
                debug_assert_eq!(r, Completion::Done);
                return batch.to_vec();
            }
            Command::BlockStatus {
                offset,
                length,
                req_one,
                ids,
            } => {
                let (out, ok) = self.block_status(cookie, req_offset, offset, length, req_one, ids);
                self.end(started, ok);
                return out;
            }
            Command::Write { offset, data, fua } => self.export.backend.write(offset, &data, fua),
            Command::Flush => self.export.backend.flush(),
            Command::Trim {
                offset,
                length,
                fua,
            } => self.export.backend.trim(offset, length, fua),
            // a prefetch hint: "no error" is all success means (the range is checked)
            Command::Cache { .. } => Ok(()),
            Command::WriteZeroes {
                offset,
                length,
                no_hole,
                fast,
                fua,
            } => self
                .export
                .backend
                .write_zeroes(offset, length, ZeroFlags { no_hole, fast, fua }),
        };
        self.end(started, res.is_ok());
        match res {
            Ok(()) => transmission::encode_ok(&mut out, mode, cookie, req_offset),
            Err(e) => {
                let (op, n) = what.map_or(("request", 0), |(op, n)| (op.name(), n));
                self.failed(
                    &format!("request {cookie:#x} ({op} at {req_offset}, {n} bytes)"),
                    &e,
                );
                encode_failure(&mut out, mode, cookie, req_offset, &e)
            }
        }
        out
    }

    /// Append the reply to a READ to `batch`. With `Wait::Never` the data must come without
    /// waiting for the disk: `Completion::WouldBlock` (and `batch` unchanged) when it cannot.
    /// Errors become error replies. `started` is recorded when the reply is ready (not on
    /// `WouldBlock`: the request goes on elsewhere).
    #[allow(clippy::too_many_arguments)]
    pub fn read_into(
        &self,
        cookie: u64,
        req_offset: u64,
        offset: u64,
        length: u32,
        df: bool,
        batch: &mut ReplyBatch,
        wait: Wait,
        started: Option<Started>,
    ) -> Completion {
        let mode = self.mode;
        let mark = batch.mark();
        match self.read_parts(mode, cookie, req_offset, offset, length, df, batch, wait) {
            Ok(Completion::Done) => {
                self.end(started, true);
                Completion::Done
            }
            Ok(Completion::WouldBlock) => {
                batch.rollback(mark);
                Completion::WouldBlock
            }
            Err(e) => {
                batch.rollback(mark);
                self.failed(
                    &format!("request {cookie:#x} (read at {offset}, {length} bytes)"),
                    &e,
                );
                batch.push_head(|out| encode_failure(out, mode, cookie, req_offset, &e));
                self.end(started, false);
                Completion::Done
            }
        }
    }

    /// A READ answered elsewhere (the plane's ring) is done (`ok`: its data is sent, not
    /// dropped with its connection): record `started`.
    pub fn read_done(&self, started: Option<Started>, ok: bool) {
        self.end(started, ok);
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
            return self
                .export
                .backend
                .read_planned(offset, len as u64, &mut |_, reader| {
                    Self::read_piece(reader, offset, len, batch, wait)
                });
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
        self.export
            .backend
            .read_planned(offset, len as u64, &mut |mapped, reader| {
                let runs = read_split(mapped, len as u64, !df);
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
        cookie: u64,
        req_offset: u64,
        offset: u64,
        length: u64,
        req_one: bool,
        ids: Option<Vec<u32>>,
    ) -> (Vec<u8>, bool) {
        let mode = self.mode;
        let mut out = Vec::new();
        let selected: Vec<&(u32, MetaContext)> = match &ids {
            None => self.contexts.iter().collect(),
            Some(list) => {
                let mut sel = Vec::new();
                for id in list {
                    match self.contexts.iter().find(|(i, _)| i == id) {
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
                            return (out, false);
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
            return (out, false);
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
                            let (n, dirty) = self.export.backend.dirty_bitmap(
                                name,
                                pos,
                                offset + length - pos,
                            )?;
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
                            let (n1, dirty) =
                                self.export.backend.dirty_bitmap(name, pos, end - pos)?;
                            let n1 = n1.clamp(1, end - pos);
                            let (n, flag) = if dirty {
                                let mut one = Vec::with_capacity(1);
                                self.export.backend.block_status(pos, n1, 1, &mut one)?;
                                let r = one.first().ok_or_else(no_run)?;
                                (r.len.clamp(1, n1), u32::from(r.is_data()))
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
                self.export
                    .backend
                    .block_status(pos, end - pos, want, &mut statuses)?;
                if statuses.is_empty() {
                    return Err(no_run());
                }
                want = (want * 4).min(STATUS_BATCH_MAX);
                for r in &statuses {
                    if pos >= end || !(busy(&alloc) || busy(&depth)) {
                        break;
                    }
                    let n = r.len.clamp(1, end - pos);
                    if let Some(b) = alloc.as_mut() {
                        b.push(n, allocation_flags(r).into());
                    }
                    if let Some(b) = depth.as_mut() {
                        let d = u32::try_from(r.allocation_depth()).unwrap_or(u32::MAX);
                        b.push(n, d.into());
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
            Err(e) => {
                encode_failure(&mut out, mode, cookie, req_offset, &e);
                return (out, false);
            }
        }
        (out, true)
    }
}

/// `base:allocation` flags of a mapped run: `NBD_STATE_HOLE` unless it holds data,
/// `NBD_STATE_ZERO` when it reads as zeros.
fn allocation_flags(r: &ChainRun) -> u32 {
    let mut f = 0;
    if !r.is_data() {
        f |= NBD_STATE_HOLE;
    }
    if r.reads_zero() {
        f |= NBD_STATE_ZERO;
    }
    f
}

/// A backend that answered block status with no run (a broken backend, never the chain).
fn no_run() -> Error {
    Error::new(
        crate::error::ErrorKind::Corrupt,
        "block status answered no run",
    )
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

/// Append a run to a hole/data split, merging it into the last piece when they agree.
pub(crate) fn push_run(runs: &mut Vec<Piece>, zero: bool, n: u64) {
    match (runs.last_mut(), zero) {
        (Some(Piece::Hole(l)), true) | (Some(Piece::Data(l)), false) => *l += n,
        (_, true) => runs.push(Piece::Hole(n)),
        (_, false) => runs.push(Piece::Data(n)),
    }
}

/// How a structured READ of `len` bytes over `runs` is sent: ranges that read as zeros as
/// holes when `holes` (neighbours merged), else one data piece.
fn read_split(runs: &[ChainRun], len: u64, holes: bool) -> Vec<Piece> {
    if !holes {
        return vec![Piece::Data(len)];
    }
    let mut split = Vec::new();
    for r in runs {
        push_run(&mut split, r.reads_zero(), r.len);
    }
    split
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::export::tests::export;
    use crate::nbd::transmission::Limits;

    fn session(mode: HeaderMode) -> Session {
        let e = Arc::new(export(true));
        let contexts = e.contexts.all();
        Session {
            flags: e.transmission_flags(mode),
            export: e,
            mode,
            contexts,
            conn: Arc::default(),
        }
    }

    #[test]
    fn structured_read_sends_holes() {
        let s = session(HeaderMode::Structured);
        let out = s.execute(
            9,
            0,
            Command::Read {
                offset: 0,
                length: 131072 + 4096,
                df: false,
            },
            None,
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
        let out = s.execute(
            9,
            0,
            Command::Read {
                offset: 0,
                length: 8192,
                df: true,
            },
            None,
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
        let out = s.execute(1, 1000, cmd, None);
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
        let out = s.execute(
            3,
            0,
            Command::Write {
                offset: 0,
                data: vec![1],
                fua: false,
            },
            None,
        );
        assert_eq!(&out[4..8], &NBD_EPERM.to_be_bytes());
    }
}
