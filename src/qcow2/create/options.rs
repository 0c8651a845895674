//! The options of a new qcow2 image (`qemu-img create -f qcow2 -o ...`) and QEMU's checks
//! of them, in its order and with its messages.

use crate::error::{Error, ErrorKind, Result};

pub use crate::block::create_raw::Preallocation;
pub use crate::qcow2::spec::header::CompressionType;

/// Everything `qemu-img create -f qcow2 -o ...` lets one choose (encryption aside).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateOptions {
    /// Virtual size in bytes; rounded up to 512 like QEMU does.
    pub size: u64,
    /// 2 (`compat=0.10`) or 3 (`compat=1.1`).
    pub version: u32,
    pub cluster_size: u64,
    pub refcount_bits: u32,
    pub lazy_refcounts: bool,
    pub extended_l2: bool,
    pub compression_type: CompressionType,
    /// External data file name, stored in the image as given.
    pub data_file: Option<String>,
    pub data_file_raw: bool,
    pub preallocation: Preallocation,
    /// Backing file name, stored in the image as given.
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
}

impl Default for CreateOptions {
    /// qemu-img's defaults: compat 1.1, 64 KiB clusters, 16-bit refcounts, zlib, no
    /// preallocation.
    fn default() -> Self {
        CreateOptions {
            size: 0,
            version: 3,
            cluster_size: 65536,
            refcount_bits: 16,
            lazy_refcounts: false,
            extended_l2: false,
            compression_type: CompressionType::Zlib,
            data_file: None,
            data_file_raw: false,
            preallocation: Preallocation::Off,
            backing_file: None,
            backing_format: None,
        }
    }
}

pub(super) fn invalid(msg: &str) -> Error {
    Error::new(ErrorKind::InvalidArgument, msg)
}

impl CreateOptions {
    /// QEMU's checks, in `qcow2_co_create`'s order and with its messages. Returns the effective
    /// preallocation mode (`data_file_raw` turns `off` into `metadata`, as QEMU does, so the
    /// L2 tables map the data file 1:1).
    pub fn validate(&self) -> Result<Preallocation> {
        if self.version != 2 && self.version != 3 {
            return Err(invalid(&format!(
                "Invalid compatibility level: '{}'",
                self.version
            )));
        }
        if self.extended_l2 && self.version < 3 {
            return Err(invalid(
                "Extended L2 entries are only supported with compatibility level 1.1 and above (use version=v3 or greater)",
            ));
        }
        let cs = self.cluster_size;
        if !cs.is_power_of_two() || !(512..=(2 << 20)).contains(&cs) {
            return Err(invalid(
                "Cluster size must be a power of two between 512 and 2048k",
            ));
        }
        if self.extended_l2 && cs < 16384 {
            return Err(invalid(
                "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
            ));
        }
        if self.backing_file.is_some()
            && self.preallocation != Preallocation::Off
            && !self.extended_l2
        {
            return Err(invalid(
                "Backing file and preallocation can only be used at the same time if extended_l2 is on",
            ));
        }
        if self.backing_format.is_some() && self.backing_file.is_none() {
            return Err(invalid(
                "Backing format cannot be used without backing file",
            ));
        }
        if self.version < 3 && self.lazy_refcounts {
            return Err(invalid(
                "Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)",
            ));
        }
        if self.refcount_bits > 64 || !self.refcount_bits.is_power_of_two() {
            return Err(invalid(
                "Refcount width must be a power of two and may not exceed 64 bits",
            ));
        }
        if self.version < 3 && self.refcount_bits != 16 {
            return Err(invalid(
                "Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)",
            ));
        }
        if self.data_file_raw && self.data_file.is_none() {
            return Err(invalid("data-file-raw requires data-file"));
        }
        if self.data_file_raw && self.backing_file.is_some() {
            return Err(invalid(
                "Backing file and data-file-raw cannot be used at the same time",
            ));
        }
        let mut prealloc = self.preallocation;
        if self.data_file_raw && prealloc == Preallocation::Off {
            prealloc = Preallocation::Metadata;
        }
        if self.data_file.is_some() && self.version < 3 {
            return Err(invalid(
                "External data files are only supported with compatibility level 1.1 and above (use version=v3 or greater)",
            ));
        }
        if self.compression_type != CompressionType::Zlib && self.version < 3 {
            return Err(invalid(
                "Non-zlib compression type is only supported with compatibility level 1.1 and above (use version=v3 or greater)",
            ));
        }
        if let Some(b) = &self.backing_file {
            if b.len() > 1023 {
                return Err(invalid("Backing file name too long"));
            }
        }
        if let Some(f) = &self.backing_format {
            if f.len() >= 16 {
                return Err(invalid("Backing format name too long"));
            }
        }
        Ok(prealloc)
    }
}
