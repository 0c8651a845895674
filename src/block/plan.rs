//! Read plans: a guest range resolved once through the chain and then read from the host
//! offsets the runs name.
//!
//! [`ReadPlan`] pins every layer while it lives (a host cluster it names cannot be freed and
//! reused), so the threaded NBD path and `Chain::read` read without mapping again. For the
//! ring data plane, [`plan_async_in`] turns the runs into [`Segment`]s (file reads by
//! descriptor and zero runs) without pinning; the caller checks the reuse epoch instead.

use super::walk::{no_layer, resolve_batch, resolve_many_in, ChainRun};
use super::{BlockDevice, Mapping, ReadPin};
use crate::error::{Error, ErrorKind, Result};
use crate::io::read_exact_or_zero;
use std::os::fd::RawFd;
use std::sync::Arc;

/// Pin every layer, then resolve `[off, off + len)` through `layers` completely.
pub(super) fn plan_in(layers: &[Arc<dyn BlockDevice>], off: u64, len: u64) -> Result<ReadPlan<'_>> {
    // pinned before mapping: a host cluster the plan names cannot be freed and reused until
    // the plan (and so the data I/O done through it) is finished
    let pins: Vec<_> = layers.iter().map(|l| l.pin()).collect();
    let mut runs = Vec::new();
    let mut starts = Vec::new();
    let mut scratch = Vec::new();
    let mut pos = off;
    let end = off + len;
    while pos < end {
        let first = runs.len();
        let limit = first.saturating_add(1024);
        let got = resolve_many_in(layers, 0, pos, end - pos, limit, &mut runs, &mut scratch)?;
        for r in &runs[first..] {
            starts.push(pos);
            pos += r.len;
        }
        if got == 0 {
            return Err(no_layer());
        }
    }
    Ok(ReadPlan {
        layers,
        _pins: pins,
        off,
        len,
        runs,
        starts,
    })
}

/// A guest range resolved once through the chain, every layer pinned while the plan lives:
/// the runs tell what reads as zeros and what is data (so a reply can send holes), and
/// [`ReadPlan::read`] reads from the host offsets they name, without mapping again. No host
/// cluster the plan names can be freed and reused before the plan is dropped.
pub struct ReadPlan<'a> {
    layers: &'a [Arc<dyn BlockDevice>],
    _pins: Vec<ReadPin<'a>>,
    off: u64,
    len: u64,
    runs: Vec<ChainRun>,
    /// Guest offset where each run starts.
    starts: Vec<u64>,
}

impl std::fmt::Debug for ReadPlan<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadPlan")
            .field("off", &self.off)
            .field("len", &self.len)
            .field("runs", &self.runs)
            .finish_non_exhaustive()
    }
}

impl ReadPlan<'_> {
    /// The resolved runs, in guest order, covering the planned range exactly.
    pub fn runs(&self) -> &[ChainRun] {
        &self.runs
    }

    /// Read `buf.len()` guest bytes at `off` (inside the planned range). With `Wait::Never`,
    /// `Completion::WouldBlock` when that would wait for the disk (`buf` then unspecified);
    /// compressed clusters always answer `WouldBlock` then.
    pub fn read(&self, off: u64, buf: &mut [u8], wait: Wait) -> Result<Completion> {
        let end = off.checked_add(buf.len() as u64);
        if off < self.off || end.is_none_or(|e| e > self.off + self.len) {
            return Err(Error::new(
                ErrorKind::OutOfRange,
                format!("read {off:#x}+{:#x} outside the planned range", buf.len()),
            ));
        }
        let layer_at = |depth: usize| depth.checked_sub(1).and_then(|i| self.layers.get(i));
        let mut i = self.starts.partition_point(|&s| s <= off).saturating_sub(1);
        let mut done = 0usize;
        while done < buf.len() {
            let pos = off + done as u64;
            let (Some(r), Some(&start)) = (self.runs.get(i), self.starts.get(i)) else {
                return Err(no_layer());
            };
            let into = pos - start;
            let n = usize::try_from(r.len - into)
                .unwrap_or(usize::MAX)
                .min(buf.len() - done);
            let dst = &mut buf[done..done + n];
            match r.mapping {
                Mapping::Data { file, host, .. } => {
                    let host = host + into;
                    let layer = layer_at(r.depth).ok_or_else(no_layer)?;
                    let st = layer.storage(file).ok_or_else(|| {
                        Error::new(ErrorKind::Corrupt, "data run in a missing data file")
                    })?;
                    let io_err = |e| {
                        Error::io(
                            format!("reading guest offset {pos:#x} at host {host:#x}"),
                            e,
                        )
                    };
                    match wait {
                        Wait::Block => read_exact_or_zero(&**st, dst, host).map_err(io_err)?,
                        Wait::Never => match st.read_at_nowait(dst, host) {
                            Ok(k) if k == dst.len() => {}
                            // partly cached, or the end of the file: the blocking path
                            // completes it
                            Ok(_) => return Ok(Completion::WouldBlock),
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                                return Ok(Completion::WouldBlock)
                            }
                            Err(e) => return Err(io_err(e)),
                        },
                    }
                }
                Mapping::Compressed if wait == Wait::Never => return Ok(Completion::WouldBlock),
                Mapping::Compressed => {
                    let layer = layer_at(r.depth).ok_or_else(no_layer)?;
                    layer.read_compressed(pos, dst)?;
                }
                Mapping::Zero { .. } | Mapping::Backing { .. } => dst.fill(0),
            }
            done += n;
            i += 1;
        }
        Ok(Completion::Done)
    }
}

/// Read guest bytes through `layers`: resolved once, every layer pinned for the whole read, so
/// no host cluster it maps can be freed and reused under us.
pub(super) fn read_in(
    layers: &[Arc<dyn BlockDevice>],
    off: u64,
    buf: &mut [u8],
    wait: Wait,
) -> Result<Completion> {
    plan_in(layers, off, buf.len() as u64)?.read(off, buf, wait)
}

/// Whether a read may wait for the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Block until the data is read.
    Block,
    /// Only read what is in memory (the page cache).
    Never,
}

/// How a non-blocking read ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    Done,
    /// Part of the data is not in memory; use the blocking read.
    WouldBlock,
}

/// One piece of a read planned for an asynchronous engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Segment {
    /// `len` bytes at `host` of the file behind descriptor `fd`.
    Data { fd: RawFd, host: u64, len: u64 },
    /// `len` bytes that read as zeros.
    Zero(u64),
}

/// Runs resolved per batch while planning an asynchronous read.
const PLAN_BATCH: usize = 64;

impl Segment {
    /// Guest bytes this piece covers.
    pub fn bytes(&self) -> u64 {
        match *self {
            Segment::Data { len, .. } | Segment::Zero(len) => len,
        }
    }
}

/// Plan a read of `len` bytes at `off` as reads by file descriptor and zero runs, for an
/// engine that reads asynchronously without pinning the layers. `None` when some part
/// cannot be read that way (compressed clusters, storage without a descriptor). The data
/// read is right only if `Chain::reuse_epoch`, read before this call, is
/// unchanged once every read has completed; otherwise read again with `Chain::read`.
/// Ranges past the end of a host file read short: treat a short read like a changed epoch.
pub(super) fn plan_async_in(
    layers: &[Arc<dyn BlockDevice>],
    off: u64,
    len: u64,
) -> Result<Option<Vec<Segment>>> {
    let mut segs: Vec<Segment> = Vec::new();
    let mut runs = Vec::new();
    let end = off + len;
    let mut pos = off;
    while pos < end {
        // many runs per layer lookup (`map_many`); an error stops a batch at its run, and
        // is reported when the next batch starts there
        runs.clear();
        resolve_batch(layers, pos, end - pos, PLAN_BATCH, &mut runs)?;
        for r in &runs {
            let n = r.len.clamp(1, end - pos);
            let seg = if r.reads_zero() {
                // zeros whatever the mapping (as the hole/data split of a READ counts them)
                Segment::Zero(n)
            } else {
                match r.mapping {
                    Mapping::Data { file, host, .. } => {
                        let layer = r
                            .depth
                            .checked_sub(1)
                            .and_then(|i| layers.get(i))
                            .ok_or_else(no_layer)?;
                        let Some(fd) = layer.storage(file).and_then(|s| s.raw_fd()) else {
                            return Ok(None);
                        };
                        Segment::Data { fd, host, len: n }
                    }
                    _ => return Ok(None),
                }
            };
            // merge with the previous piece when contiguous
            match (segs.last_mut(), seg) {
                (Some(Segment::Zero(l)), Segment::Zero(k)) => *l += k,
                (
                    Some(Segment::Data { fd, host, len }),
                    Segment::Data {
                        fd: f2,
                        host: h2,
                        len: k,
                    },
                ) if *fd == f2 && *host + *len == h2 => *len += k,
                _ => segs.push(seg),
            }
            pos += n;
            if pos >= end {
                break;
            }
        }
    }
    Ok(Some(segs))
}
