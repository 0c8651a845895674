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
pub mod raw;

pub use chain::{Chain, Resolved};

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

    /// The storage behind a [`FileRole`].
    fn storage(&self, role: FileRole) -> Option<&Arc<dyn Storage>>;

    /// Read `buf.len()` guest bytes at `off` from a range that `map` reported as `Compressed`
    /// (the range stays inside one cluster).
    fn read_compressed(&self, off: u64, buf: &mut [u8]) -> Result<()>;
}
