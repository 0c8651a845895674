//! A backing chain: layer 0 is the image the user named, layer 1 its backing file, and so on.
//!
//! `resolve` walks `Mapping::Backing` downwards and reports which layer answered (the 1-based
//! depth that `qemu:allocation-depth` exports; 0 means no layer holds the range). `read` plans a
//! guest read from resolved runs; `map_entry` reproduces `qemu-img map`'s per-range answer.

use super::{Access, BlockDevice, CowSource, FileRole, Mapping, ZeroMode};
use crate::error::{Error, ErrorKind, Result};
use crate::io::read_exact_or_zero;
use std::os::fd::RawFd;
use std::sync::Arc;

/// The answer of the chain for a guest range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resolved {
    pub len: u64,
    /// The mapping in the layer that answered; `Backing` when no layer did.
    pub mapping: Mapping,
    /// 1 = top layer, 2 = first backing file, ...; 0 = allocated nowhere.
    pub depth: usize,
}

impl Resolved {
    /// Reads as zeros (`base:allocation` ZERO).
    pub fn reads_zero(&self) -> bool {
        match self.mapping {
            Mapping::Zero { .. } | Mapping::Backing { .. } => true,
            Mapping::Data { zero, .. } => zero,
            Mapping::Compressed => false,
        }
    }

    /// Holds data (`base:allocation` not HOLE).
    pub fn is_data(&self) -> bool {
        matches!(self.mapping, Mapping::Data { .. } | Mapping::Compressed)
    }
}

/// One entry of `qemu-img map --output=json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapEntry {
    pub start: u64,
    pub length: u64,
    /// 0-based layer index as qemu-img prints it.
    pub depth: usize,
    pub present: bool,
    pub zero: bool,
    pub data: bool,
    pub compressed: bool,
    pub offset: Option<u64>,
}

impl MapEntry {
    /// qemu-img's `entry_mergeable`.
    pub fn mergeable(&self, next: &MapEntry) -> bool {
        if self.length == 0 {
            return false;
        }
        if self.zero != next.zero
            || self.data != next.data
            || self.compressed != next.compressed
            || self.depth != next.depth
            || self.present != next.present
            || self.offset.is_some() != next.offset.is_some()
        {
            return false;
        }
        match (self.offset, next.offset) {
            (Some(a), Some(b)) => a.checked_add(self.length) == Some(b),
            _ => true,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Chain {
    layers: Vec<Arc<dyn BlockDevice>>,
    /// Flush after every write and write-zeroes (`cache=writethrough`, `directsync`).
    write_through: bool,
}

impl Chain {
    /// `layers[0]` is the top; each next one is the backing file of the previous.
    pub fn new(layers: Vec<Arc<dyn BlockDevice>>) -> Result<Chain> {
        if layers.is_empty() {
            return Err(Error::new(ErrorKind::InvalidArgument, "empty chain"));
        }
        Ok(Chain {
            layers,
            write_through: false,
        })
    }

    /// Make every write and write-zeroes durable before it returns, as if each carried FUA
    /// (QEMU's BlockBackend with its write cache disabled: `cache=writethrough`, `directsync`).
    pub fn with_write_through(mut self, on: bool) -> Chain {
        self.write_through = on;
        self
    }

    pub fn write_through(&self) -> bool {
        self.write_through
    }

    /// Whether a write completes in memory (page cache, no flush): cheap enough for the NBD
    /// server to run on a connection's own thread. Not with `O_DIRECT` files or write-through.
    pub fn writes_buffered(&self) -> bool {
        let top = &self.layers[0];
        !self.write_through
            && [FileRole::Image, FileRole::DataFile]
                .into_iter()
                .filter_map(|r| top.storage(r))
                .all(|s| s.buffered())
    }

    pub fn top(&self) -> &Arc<dyn BlockDevice> {
        &self.layers[0]
    }

    pub fn layers(&self) -> &[Arc<dyn BlockDevice>] {
        &self.layers
    }

    pub fn size(&self) -> u64 {
        self.layers[0].size()
    }

    fn check_range(&self, off: u64, len: u64) -> Result<()> {
        match off.checked_add(len) {
            Some(end) if end <= self.size() => Ok(()),
            _ => Err(Error::new(
                ErrorKind::OutOfRange,
                format!(
                    "range {off:#x}+{len:#x} beyond the end of the image ({:#x})",
                    self.size()
                ),
            )),
        }
    }

    /// Resolve the range at `off` (at most `len` bytes, `len > 0`) through the chain.
    pub fn resolve(&self, off: u64, len: u64) -> Result<Resolved> {
        self.check_range(off, len)?;
        resolve_in(&self.layers, off, len)
    }

    /// Read guest bytes.
    pub fn read(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        self.check_range(off, buf.len() as u64)?;
        read_in(&self.layers, off, buf, Wait::Block).map(|_| ())
    }

    /// Read guest bytes if that needs no waiting for the disk (data in the page cache, zeros,
    /// unallocated ranges); `Completion::WouldBlock` otherwise, with `buf` in an unspecified
    /// state. Compressed clusters always answer `WouldBlock`.
    pub fn read_nowait(&self, off: u64, buf: &mut [u8]) -> Result<Completion> {
        self.check_range(off, buf.len() as u64)?;
        read_in(&self.layers, off, buf, Wait::Never)
    }

    /// Whether the top layer accepts writes.
    pub fn access(&self) -> Access {
        self.layers[0].access()
    }

    /// Write guest bytes to the top layer (copy-on-write from the layers below).
    pub fn write(&self, off: u64, buf: &[u8], fua: bool) -> Result<()> {
        self.check_range(off, buf.len() as u64)?;
        self.layers[0].write(
            off,
            buf,
            &Below(&self.layers[1..]),
            fua || self.write_through,
        )
    }

    /// Make a range read as zeros.
    pub fn write_zeroes(&self, off: u64, len: u64, mode: ZeroMode) -> Result<()> {
        self.check_range(off, len)?;
        self.layers[0].write_zeroes(off, len, mode, &Below(&self.layers[1..]))?;
        if self.write_through {
            self.flush()?;
        }
        Ok(())
    }

    /// Release a range (advisory).
    pub fn discard(&self, off: u64, len: u64) -> Result<()> {
        self.check_range(off, len)?;
        self.layers[0].discard(off, len, &Below(&self.layers[1..]))
    }

    /// A persistent dirty bitmap, looked up from the top layer down (as qemu-nbd does).
    pub fn dirty_bitmap(
        &self,
        name: &str,
    ) -> Result<Arc<std::sync::RwLock<crate::bitmap::DirtyBitmap>>> {
        let mut first_err = None;
        for l in &self.layers {
            match l.dirty_bitmap(name) {
                Ok(b) => return Ok(b),
                Err(e) if e.message().contains("not found") => {
                    first_err.get_or_insert(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(first_err.unwrap_or_else(|| {
            Error::new(
                ErrorKind::InvalidArgument,
                format!("Bitmap '{name}' is not found"),
            )
        }))
    }

    /// Whether zeroing this range touches metadata only.
    pub fn zero_is_fast(&self, off: u64, len: u64) -> bool {
        self.layers[0].zero_is_fast(off, len)
    }

    /// Clean close of the top layer (flush, store bitmaps).
    pub fn close(&self) -> Result<()> {
        self.layers[0].close()
    }

    /// Make completed writes durable.
    pub fn flush(&self) -> Result<()> {
        self.layers[0].flush()
    }
}

/// The layers below the top: the copy-on-write source.
struct Below<'a>(&'a [Arc<dyn BlockDevice>]);

impl CowSource for Below<'_> {
    fn has_backing(&self) -> bool {
        !self.0.is_empty()
    }

    fn read_below(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        if self.0.is_empty() {
            buf.fill(0);
            return Ok(());
        }
        read_in(self.0, off, buf, Wait::Block).map(|_| ())
    }
}

fn no_layer() -> Error {
    Error::new(ErrorKind::Corrupt, "a run maps to no layer")
}

/// Resolve through `layers` (the first is the top). Offsets beyond the top's size are the
/// caller's to refuse; beyond a shorter lower layer they read as zeros.
fn resolve_in(layers: &[Arc<dyn BlockDevice>], off: u64, len: u64) -> Result<Resolved> {
    {
        let mut len = len;
        for (i, layer) in layers.iter().enumerate() {
            let size = layer.size();
            if off >= size {
                // beyond the end of a (shorter) backing file: zeros, owned by no layer
                return Ok(Resolved {
                    len,
                    mapping: Mapping::Backing {
                        file: FileRole::Image,
                        host: None,
                    },
                    depth: 0,
                });
            }
            len = len.min(size - off);
            let run = layer.map(off, len)?;
            debug_assert!(run.len > 0 && run.len <= len);
            len = run.len.clamp(1, len);
            if !matches!(run.mapping, Mapping::Backing { .. }) {
                return Ok(Resolved {
                    len,
                    mapping: run.mapping,
                    depth: i + 1,
                });
            }
        }
        Ok(Resolved {
            len,
            mapping: Mapping::Backing {
                file: FileRole::Image,
                host: None,
            },
            depth: 0,
        })
    }
}

/// Read guest bytes through `layers`. Every layer is pinned for the whole read, so no host
/// cluster it maps can be freed and reused under us.
fn read_in(
    layers: &[Arc<dyn BlockDevice>],
    off: u64,
    buf: &mut [u8],
    wait: Wait,
) -> Result<Completion> {
    let _pins: Vec<_> = layers.iter().map(|l| l.pin()).collect();
    let layer_at = |depth: usize| depth.checked_sub(1).and_then(|i| layers.get(i));
    {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = off + done as u64;
            let r = resolve_in(layers, pos, (buf.len() - done) as u64)?;
            let n = usize::try_from(r.len)
                .unwrap_or(usize::MAX)
                .min(buf.len() - done);
            let dst = &mut buf[done..done + n];
            match r.mapping {
                Mapping::Data { file, host, .. } => {
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
        }
        Ok(Completion::Done)
    }
}

/// Whether a read may wait for the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wait {
    Block,
    Never,
}

/// How a non-blocking read ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    Done,
    /// Part of the data is not in memory; use the blocking read.
    WouldBlock,
}

impl Chain {
    /// `qemu-img map`'s answer for the range at `off` (qemu-img.c `get_block_status`).
    pub fn map_entry(&self, off: u64, len: u64) -> Result<MapEntry> {
        self.check_range(off, len)?;
        let mut len = len;
        for (i, layer) in self.layers.iter().enumerate() {
            let run = layer.map(off, len.min(layer.size().saturating_sub(off)).max(1))?;
            len = run.len.clamp(1, len);
            let entry = |present, zero, data, compressed, offset| MapEntry {
                start: off,
                length: len,
                depth: i,
                present,
                zero,
                data,
                compressed,
                offset,
            };
            match run.mapping {
                Mapping::Data { host, zero, .. } => {
                    return Ok(entry(true, zero, true, false, Some(host)))
                }
                Mapping::Zero { host, .. } => return Ok(entry(true, true, false, false, host)),
                Mapping::Compressed => return Ok(entry(true, false, true, true, None)),
                Mapping::Backing { host, .. } => {
                    let beyond_backing = self.layers.get(i + 1).map(|b| off >= b.size());
                    match beyond_backing {
                        // no backing file: unallocated reads as zero (if the format has backing
                        // files at all)
                        None => {
                            let zero = layer.supports_backing();
                            return Ok(entry(false, zero, false, false, host));
                        }
                        Some(true) => return Ok(entry(false, true, false, false, host)),
                        Some(false) => {}
                    }
                }
            }
        }
        // unreachable in practice: the last layer answers above
        Err(Error::new(
            ErrorKind::Corrupt,
            "chain walk fell off the end",
        ))
    }
}

/// One piece of a read planned for an asynchronous engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Segment {
    /// `len` bytes at `host` of the file behind descriptor `fd`.
    Data { fd: RawFd, host: u64, len: u64 },
    /// `len` bytes that read as zeros.
    Zero(u64),
}

impl Chain {
    /// A value that changes before any layer can reuse host space it freed (see
    /// [`BlockDevice::reuse_epoch`]).
    pub fn reuse_epoch(&self) -> u64 {
        self.layers
            .iter()
            .fold(0u64, |a, l| a.wrapping_add(l.reuse_epoch()))
    }

    /// Plan a read of `len` bytes at `off` as reads by file descriptor and zero runs, for an
    /// engine that reads asynchronously without pinning the layers. `None` when some part
    /// cannot be read that way (compressed clusters, storage without a descriptor). The data
    /// read is right only if [`reuse_epoch`](Self::reuse_epoch), read before this call, is
    /// unchanged once every read has completed; otherwise read again with [`Chain::read`].
    /// Ranges past the end of a host file read short: treat a short read like a changed epoch.
    pub fn plan_read(&self, off: u64, len: u64) -> Result<Option<Vec<Segment>>> {
        self.check_range(off, len)?;
        let mut segs: Vec<Segment> = Vec::new();
        let mut pos = off;
        let end = off + len;
        while pos < end {
            let r = resolve_in(&self.layers, pos, end - pos)?;
            let n = r.len.clamp(1, end - pos);
            let seg = match r.mapping {
                Mapping::Data { file, host, .. } => {
                    let layer = r
                        .depth
                        .checked_sub(1)
                        .and_then(|i| self.layers.get(i))
                        .ok_or_else(no_layer)?;
                    let Some(fd) = layer.storage(file).and_then(|s| s.raw_fd()) else {
                        return Ok(None);
                    };
                    Segment::Data { fd, host, len: n }
                }
                Mapping::Compressed => return Ok(None),
                Mapping::Zero { .. } | Mapping::Backing { .. } => Segment::Zero(n),
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
        }
        Ok(Some(segs))
    }
}
