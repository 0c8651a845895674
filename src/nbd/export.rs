//! Exports: what a client can connect to, and the backend that answers for it.
//!
//! An [`Export`] pairs a name and description with an [`ExportBackend`], the narrow interface
//! the NBD server needs from the block layer: mapped runs, data, writes, zeroes, trims,
//! flushes and dirty bitmaps. `session.rs` turns its answers into reply bytes. This module
//! never names an image format: [`ChainBackend`] serves any [`Chain`], with `serve`'s export
//! options (`-o`, `--detect-zeroes`, `--discard`, `-B`) as options of its own.

use super::meta::Available;
use super::transmission::HeaderMode;
use super::wire::*;
use crate::block::Chain;
pub use crate::block::{ChainRun, Completion, Wait};
use crate::error::{Error, ErrorKind, Result};
use std::fmt;
use std::sync::Arc;

/// Whether an export accepts writes: the block layer's answer, passed through.
pub use crate::block::Access;

/// A READ planned as file reads and zero runs (see [`ExportBackend::plan_async`]).
#[derive(Debug, Clone)]
pub struct AsyncPlan {
    pub epoch: u64,
    pub segments: Vec<crate::block::Segment>,
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

/// What the NBD server needs from the storage behind an export: its size, how a range is
/// mapped (as [`ChainRun`]s, the same answer for READ's hole/data split and for block
/// status), its data, and, for a writable backend, writes, zeroes, trims and flushes. What a
/// read-only backend need not answer has a default that refuses or does nothing. A writable
/// backend supports TRIM, WRITE_ZEROES and FAST_ZERO (the transmission flags say so).
pub trait ExportBackend: Send + Sync + fmt::Debug {
    /// Guest size in bytes.
    fn size(&self) -> u64;

    fn access(&self) -> Access {
        Access::ReadOnly
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

    /// Resolve `[off, off + len)` (`len > 0`, inside the export) once and call `f` with its
    /// runs, in order and covering the range exactly, and a reader for data inside the range,
    /// valid until `f` returns.
    fn read_planned(&self, off: u64, len: u64, f: &mut PlanUser<'_>) -> Result<Completion>;

    /// Runs from `off` (at most `len` bytes, `len > 0`): append at least one and at most `max`
    /// to `out`, contiguous from `off`.
    fn block_status(&self, off: u64, len: u64, max: usize, out: &mut Vec<ChainRun>) -> Result<()>;

    /// A read of `len` bytes at `off` planned for asynchronous file reads, with the reuse
    /// epoch read before planning (see `Chain::plan_async`). `None` (the default): read with
    /// [`read_planned`](Self::read_planned) instead.
    fn plan_async(&self, off: u64, len: u64) -> Option<AsyncPlan> {
        let _ = (off, len);
        None
    }

    /// The reuse epoch an [`AsyncPlan`] is checked against once its reads completed.
    fn reuse_epoch(&self) -> u64 {
        0
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

    /// The run of the exported dirty bitmap `name` at `off`: (length, dirty).
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

/// A chain's read plan, read at export offsets (`by`: the export's `-o` offset into the
/// image).
struct Shifted<'a> {
    plan: crate::block::ReadPlan<'a>,
    by: u64,
}

impl PlannedRead for Shifted<'_> {
    fn read(&self, off: u64, buf: &mut [u8], wait: Wait) -> Result<Completion> {
        self.plan.read(off + self.by, buf, wait)
    }
}

/// What [`ExportBackend::read_planned`] calls: with the range's runs, in order, and a reader
/// for the data.
pub type PlanUser<'f> = dyn FnMut(&[ChainRun], &dyn PlannedRead) -> Result<Completion> + 'f;

/// What TRIM and write-zeroes may do with host space (qemu-nbd's `--discard`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DiscardMode {
    /// TRIM succeeds and does nothing; write-zeroes keeps allocation (qemu-nbd's default).
    #[default]
    Ignore,
    /// TRIM releases clusters; write-zeroes may release them unless NO_HOLE.
    Unmap,
}

/// A backend over an image chain; writable when the chain's top layer is. What `serve` can
/// change about an export is an option here rather than a wrapper, so every route (planned
/// reads, batched block status, ring plans, bitmaps) sees it:
///
/// * `with_offset` (`serve -o N`): the export starts N bytes into the image;
/// * `with_detect_zeroes` (`--detect-zeroes=on|unmap`): a WRITE whose payload is all zeros
///   becomes a WRITE_ZEROES, as QEMU's `detect-zeroes` turns it into a zero write on the top
///   node (`unmap`: one that may release space, which the export's discard mode then allows).
#[derive(Debug, Clone)]
pub struct ChainBackend {
    chain: Chain,
    discard: DiscardMode,
    bitmaps: Vec<(String, Arc<std::sync::RwLock<crate::bitmap::DirtyBitmap>>)>,
    /// Export offset 0 is this image offset.
    offset: u64,
    /// Zero detection on writes: `Some(unmap)`.
    detect_zeroes: Option<bool>,
}

impl ChainBackend {
    pub fn new(chain: Chain) -> Self {
        ChainBackend {
            chain,
            discard: DiscardMode::Ignore,
            bitmaps: Vec::new(),
            offset: 0,
            detect_zeroes: None,
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

    /// Start the export `offset` bytes into the image (qemu-nbd's `-o`); at most the image
    /// size.
    pub fn with_offset(mut self, offset: u64) -> Result<Self> {
        if offset > self.chain.size() {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("Offset ({offset}) is past the end of the image"),
            ));
        }
        self.offset = offset;
        Ok(self)
    }

    /// Turn all-zero WRITEs into WRITE_ZEROES (`unmap`: ones that may release space).
    pub fn with_detect_zeroes(mut self, unmap: bool) -> Self {
        self.detect_zeroes = Some(unmap);
        self
    }

    fn check_writable(&self) -> Result<()> {
        match self.access() {
            Access::ReadWrite => Ok(()),
            Access::ReadOnly => Err(denied()),
        }
    }
}

/// Whether every byte of `data` is zero (sixteen bytes at a time).
fn all_zero(data: &[u8]) -> bool {
    let mut chunks = data.chunks_exact(16);
    let words = chunks
        .by_ref()
        .all(|c| u128::from_ne_bytes(c.try_into().unwrap_or([1; 16])) == 0);
    words && chunks.remainder().iter().all(|&b| b == 0)
}

impl ExportBackend for ChainBackend {
    fn size(&self) -> u64 {
        self.chain.size() - self.offset
    }

    fn access(&self) -> Access {
        self.chain.access()
    }

    fn request_alignment(&self) -> u32 {
        self.chain.top().request_alignment()
    }

    fn writes_buffered(&self) -> bool {
        self.chain.writes_buffered()
    }

    fn read_planned(&self, off: u64, len: u64, f: &mut PlanUser<'_>) -> Result<Completion> {
        let plan = self.chain.plan_read(off + self.offset, len)?;
        let runs = plan.runs().to_vec();
        f(
            &runs,
            &Shifted {
                plan,
                by: self.offset,
            },
        )
    }

    fn block_status(&self, off: u64, len: u64, max: usize, out: &mut Vec<ChainRun>) -> Result<()> {
        self.chain.resolve_many(off + self.offset, len, max, out)
    }

    fn plan_async(&self, off: u64, len: u64) -> Option<AsyncPlan> {
        let epoch = self.chain.reuse_epoch();
        let segments = self.chain.plan_async(off + self.offset, len).ok()??;
        Some(AsyncPlan { epoch, segments })
    }

    fn reuse_epoch(&self) -> u64 {
        self.chain.reuse_epoch()
    }

    fn write(&self, off: u64, data: &[u8], fua: bool) -> Result<()> {
        self.check_writable()?;
        if let Some(unmap) = self.detect_zeroes {
            if !data.is_empty() && all_zero(data) {
                let flags = ZeroFlags {
                    no_hole: !unmap,
                    fast: false,
                    fua,
                };
                return self.write_zeroes(off, data.len() as u64, flags);
            }
        }
        self.chain.write(off + self.offset, data, fua)
    }

    fn write_zeroes(&self, off: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.check_writable()?;
        let off = off + self.offset;
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
        self.chain.write_zeroes(off, len, mode, flags.fua)
    }

    fn trim(&self, off: u64, len: u64, fua: bool) -> Result<()> {
        self.check_writable()?;
        match self.discard {
            DiscardMode::Unmap => self.chain.discard(off + self.offset, len, fua),
            // nothing written, but FUA still asks for what was written before to be durable
            DiscardMode::Ignore if fua => self.chain.flush(),
            DiscardMode::Ignore => Ok(()),
        }
    }

    fn flush(&self) -> Result<()> {
        self.chain.flush()
    }

    fn close(&self) -> Result<()> {
        self.chain.close()
    }

    fn dirty_bitmap(&self, name: &str, off: u64, len: u64) -> Result<(u64, bool)> {
        let Some((_, b)) = self.bitmaps.iter().find(|(n, _)| n == name) else {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("Bitmap '{name}' is not exported"),
            ));
        };
        let g = b.read().unwrap_or_else(|e| e.into_inner());
        let off = off + self.offset;
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
    /// Request statistics (`serve --stats` / `--metrics`); `None`: nothing is recorded.
    pub stats: Option<super::stats::Stats>,
}

impl Export {
    /// Transmission flags for a session in `mode`, set exactly for what this export supports.
    pub fn transmission_flags(&self, mode: HeaderMode) -> u16 {
        let mut f = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA;
        f |= NBD_FLAG_SEND_CACHE;
        match self.backend.access() {
            Access::ReadOnly => f |= NBD_FLAG_READ_ONLY,
            Access::ReadWrite => {
                f |= NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES | NBD_FLAG_SEND_FAST_ZERO
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

    impl Scripted {
        /// The run at `off` (at most `len` bytes) as the chain would answer it.
        fn run(&self, off: u64, len: u64) -> ChainRun {
            use crate::block::{FileRole, Mapping};
            let (start, rl, allocation, depth) = self.at(off);
            let mapping = if allocation & NBD_STATE_HOLE == 0 {
                Mapping::Data {
                    file: FileRole::Image,
                    host: off,
                    zero: allocation & NBD_STATE_ZERO != 0,
                }
            } else if depth > 0 {
                Mapping::Zero {
                    file: FileRole::Image,
                    host: None,
                }
            } else {
                Mapping::Backing {
                    file: FileRole::Image,
                    host: None,
                }
            };
            ChainRun {
                len: (start + rl - off).min(len),
                mapping,
                depth: depth as usize,
                past_end_of: 0,
            }
        }
    }

    impl PlannedRead for Scripted {
        fn read(&self, off: u64, buf: &mut [u8], _wait: Wait) -> Result<Completion> {
            for (i, b) in buf.iter_mut().enumerate() {
                let (_, _, a, _) = self.at(off + i as u64);
                *b = if a & NBD_STATE_ZERO != 0 {
                    0
                } else {
                    self.fill
                };
            }
            Ok(Completion::Done)
        }
    }

    impl ExportBackend for Scripted {
        fn size(&self) -> u64 {
            self.runs.iter().map(|r| r.0).sum()
        }
        fn read_planned(&self, off: u64, len: u64, f: &mut PlanUser<'_>) -> Result<Completion> {
            let mut runs = Vec::new();
            let mut pos = off;
            while pos < off + len {
                let r = self.run(pos, off + len - pos);
                pos += r.len;
                runs.push(r);
            }
            f(&runs, self)
        }
        fn block_status(
            &self,
            off: u64,
            len: u64,
            _max: usize,
            out: &mut Vec<ChainRun>,
        ) -> Result<()> {
            out.push(self.run(off, len));
            Ok(())
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
            stats: None,
        }
    }

    #[test]
    fn read_only_flags_match_qemu_nbd_r() {
        let e = export(false);
        assert_eq!(e.transmission_flags(HeaderMode::Extended), 0x148f);
        assert_eq!(e.transmission_flags(HeaderMode::Simple), 0x040f);
    }

    #[test]
    fn zero_detection_sees_every_byte() {
        for len in [1usize, 15, 16, 17, 4096, 65536 + 3] {
            assert!(all_zero(&vec![0u8; len]));
            for pos in [0, len / 2, len - 1] {
                let mut v = vec![0u8; len];
                v[pos] = 1;
                assert!(!all_zero(&v), "len {len}, byte {pos}");
            }
        }
    }
}
