//! The generic block layer: what a single image layer answers about itself, and the chain that
//! walks layers. Nothing here names a format or an I/O engine.
//!
//! Contract: a layer's [`BlockDevice::map`] answers for that layer only. Unallocated is
//! [`Mapping::Backing`], never `Zero`; the [`chain::Chain`] walks `Backing` downwards and counts
//! layers (that count is `qemu:allocation-depth`).

use crate::error::Result;
use crate::io::Storage;
use std::fmt;
use std::sync::Arc;

pub mod chain;
pub mod create_raw;
pub mod plan;
pub mod raw;
pub mod walk;

pub use chain::Chain;
pub use plan::{Completion, ReadPlan, Segment, Wait};
pub use walk::ChainRun;

/// Which host file of a layer holds a data run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileRole {
    /// The image file itself.
    Image,
    /// The external data file (qcow2 `data_file`).
    DataFile,
}

/// What one layer says about a guest range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// Guest data stored in this layer at `host` in `file`, contiguous for the run. `zero` is set
    /// when the host knows the bytes read as zeros (a hole in the host file under a preallocated
    /// cluster).
    Data {
        file: FileRole,
        host: u64,
        zero: bool,
    },
    /// Reads as zeros and is allocated in this layer (hides any backing file). `host` is the
    /// preallocated host cluster, if one is kept.
    Zero { file: FileRole, host: Option<u64> },
    /// A compressed cluster of this layer (runs never span two compressed clusters).
    Compressed,
    /// Not allocated in this layer: the next layer down shows through (zeros when there is
    /// none). `host` is set when a host cluster exists although the range is unallocated
    /// (extended L2 subclusters).
    Backing { file: FileRole, host: Option<u64> },
}

impl Mapping {
    /// Host offset the map reports for this run, if any.
    pub fn host(&self) -> Option<u64> {
        match *self {
            Mapping::Data { host, .. } => Some(host),
            Mapping::Zero { host, .. } | Mapping::Backing { host, .. } => host,
            Mapping::Compressed => None,
        }
    }
}

/// A run of `len` guest bytes with one mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub len: u64,
    pub mapping: Mapping,
}

/// Whether a device accepts writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Access {
    #[default]
    ReadOnly,
    ReadWrite,
}

/// How write-zeroes may leave the range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZeroMode {
    /// Host space may be released (NBD WRITE_ZEROES without NO_HOLE).
    MayUnmap,
    /// Keep host allocation where there is one (NBD NO_HOLE).
    KeepAllocated,
}

/// Held by a reader from mapping to the end of its data I/O (see `BlockDevice::pin`).
pub type ReadPin<'a> = Option<std::sync::RwLockReadGuard<'a, ()>>;

/// What lies below a layer: the source of copy-on-write data.
pub trait CowSource {
    /// Whether there is anything below (a backing file).
    fn has_backing(&self) -> bool;
    /// Read guest bytes as seen below the layer (zeros where nothing is below).
    fn read_below(&self, off: u64, buf: &mut [u8]) -> Result<()>;
}

/// No backing file.
pub struct NoBacking;

impl CowSource for NoBacking {
    fn has_backing(&self) -> bool {
        false
    }
    fn read_below(&self, _off: u64, buf: &mut [u8]) -> Result<()> {
        buf.fill(0);
        Ok(())
    }
}

fn read_only_error() -> crate::error::Error {
    crate::error::Error::new(
        crate::error::ErrorKind::Denied,
        "the image is opened read-only",
    )
}

/// One layer of an image chain (a qcow2 image, a raw file, ...).
pub trait BlockDevice: Send + Sync + fmt::Debug {
    /// Guest-visible size in bytes.
    fn size(&self) -> u64;

    /// Format name as qemu-img prints it ("qcow2", "raw").
    fn format_name(&self) -> &'static str;

    /// Whether this format can have a backing file at all (QEMU's `supports_backing`): decides
    /// whether an unallocated range at the bottom of a chain reads as "zero" in `qemu-img map`.
    fn supports_backing(&self) -> bool;

    /// Map the range starting at `off` (`off < size()`, `len > 0`). The returned run is non-empty
    /// and at most `len` bytes (also clamped to `size()`).
    fn map(&self, off: u64, len: u64) -> Result<Run>;

    /// Map consecutive runs from `off` (`off < size()`, `len > 0`, `max > 0`): append to `out`
    /// at least one and at most `max` runs, contiguous from `off` and covering at most `len`
    /// bytes (clamped to `size()`). Each run answers exactly as `map` would for its bytes; only
    /// where runs are cut may differ. An error after the first run ends the batch early instead
    /// (the error belongs to a range the caller may never ask about). Formats override it to
    /// map many runs per metadata lock and table lookup.
    fn map_many(&self, off: u64, len: u64, max: usize, out: &mut Vec<Run>) -> Result<()> {
        let end = off.saturating_add(len).min(self.size());
        if end <= off {
            // out of range: `map` gives the error
            out.push(self.map(off, len)?);
            return Ok(());
        }
        let mut pos = off;
        for i in 0..max.max(1) {
            let run = match self.map(pos, end - pos) {
                Ok(run) => run,
                // the runs before a failing one stand; asking for that range reports it
                Err(_) if i > 0 => break,
                Err(e) => return Err(e),
            };
            let n = run.len.clamp(1, end - pos);
            out.push(Run { len: n, ..run });
            pos += n;
            if pos >= end {
                break;
            }
        }
        Ok(())
    }

    /// The storage behind a [`FileRole`].
    fn storage(&self, role: FileRole) -> Option<&Arc<dyn Storage>>;

    /// Read `buf.len()` guest bytes at `off` from a range that `map` reported as `Compressed`
    /// (the range stays inside one cluster).
    fn read_compressed(&self, off: u64, buf: &mut [u8]) -> Result<()>;

    /// Keep host clusters mapped by this layer from being reused until the pin is dropped.
    fn pin(&self) -> ReadPin<'_> {
        None
    }

    /// A counter that changes before host clusters this layer freed can be allocated again.
    /// A reader that maps without a pin and reads later is right if the counter read before
    /// mapping equals the one read after its data arrived (layers that never reuse host space
    /// answer a constant).
    fn reuse_epoch(&self) -> u64 {
        0
    }

    fn access(&self) -> Access {
        Access::ReadOnly
    }

    /// The smallest request this device handles without read-modify-write on the caller's
    /// behalf (QEMU's `request_alignment`): the NBD minimum block size it advertises.
    fn request_alignment(&self) -> u32 {
        1
    }

    /// The cluster size of compressed writes, when this device stores them (`driver=compress`).
    fn compress_cluster(&self) -> Option<u64> {
        None
    }

    /// Store one whole cluster at `off` compressed (see [`BlockDevice::compress_cluster`]).
    fn write_compressed(&self, off: u64, data: &[u8], below: &dyn CowSource) -> Result<()> {
        let _ = (off, data, below);
        Err(crate::error::Error::unsupported(
            "compressed writes need a qcow2 image",
        ))
    }

    /// Write guest bytes; partial clusters are completed from `below`. Durability (FUA,
    /// write-through) is not the layer's business: `Chain` flushes afterwards.
    fn write(&self, off: u64, buf: &[u8], below: &dyn CowSource) -> Result<()> {
        let _ = (off, buf, below);
        Err(read_only_error())
    }

    /// Make the range read as zeros.
    fn write_zeroes(
        &self,
        off: u64,
        len: u64,
        mode: ZeroMode,
        below: &dyn CowSource,
    ) -> Result<()> {
        let _ = (off, len, mode, below);
        Err(read_only_error())
    }

    /// Release the range (advisory; may read back as zeros or, in formats without zero clusters,
    /// as the backing file).
    fn discard(&self, off: u64, len: u64, below: &dyn CowSource) -> Result<()> {
        let _ = (off, len, below);
        Err(read_only_error())
    }

    /// Make every completed write durable.
    fn flush(&self) -> Result<()> {
        Ok(())
    }

    /// Clean close: flush, and write back whatever is kept until close (dirty bitmaps). The
    /// device stays usable; a later close is cheap.
    fn close(&self) -> Result<()> {
        self.flush()
    }

    /// A persistent dirty bitmap of this layer.
    fn dirty_bitmap(
        &self,
        name: &str,
    ) -> Result<std::sync::Arc<std::sync::RwLock<crate::bitmap::DirtyBitmap>>> {
        Err(crate::error::Error::new(
            crate::error::ErrorKind::NotFound,
            format!("Bitmap '{name}' is not found"),
        ))
    }

    /// Whether `write_zeroes` of this range works on metadata only (no zero data written):
    /// NBD's FAST_ZERO.
    fn zero_is_fast(&self, off: u64, len: u64) -> bool {
        let _ = (off, len);
        false
    }
}
