//! Raw images: guest offset = host offset. Holes of a sparse host file are reported the way
//! QEMU's file driver reports them (SEEK_DATA / SEEK_HOLE), as zero ranges owned by this layer.

use super::{BlockDevice, FileRole, Mapping, Run};
use crate::error::{Error, ErrorKind, Result};
use crate::io::{Extent, Storage};
use std::sync::Arc;

#[derive(Debug)]
pub struct RawDevice {
    storage: Arc<dyn Storage>,
    size: u64,
}

impl RawDevice {
    pub fn new(storage: Arc<dyn Storage>) -> Result<RawDevice> {
        let size = storage
            .len()
            .map_err(|e| Error::io("Could not get the image length", e))?;
        // QEMU sizes block nodes in whole 512-byte sectors; the tail reads as zeros.
        let size = crate::units::align_up(size, 512).unwrap_or(size);
        Ok(RawDevice { storage, size })
    }
}

impl BlockDevice for RawDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn format_name(&self) -> &'static str {
        "raw"
    }

    fn supports_backing(&self) -> bool {
        false
    }

    fn map(&self, off: u64, len: u64) -> Result<Run> {
        let end = off.saturating_add(len).min(self.size);
        if end <= off {
            return Err(Error::new(
                ErrorKind::OutOfRange,
                format!("map request at {off:#x} beyond the end of the image"),
            ));
        }
        let want = end - off;
        let ext = self
            .storage
            .extent_at(off)
            .map_err(|e| Error::io(format!("Could not query allocation at {off:#x}"), e))?;
        let (len, mapping) = match ext {
            Some(Extent::Hole(n)) if n > 0 => (
                n.min(want),
                Mapping::Zero {
                    file: FileRole::Image,
                    host: Some(off),
                },
            ),
            Some(Extent::Data(n)) if n > 0 => (
                n.min(want),
                Mapping::Data {
                    file: FileRole::Image,
                    host: off,
                    zero: false,
                },
            ),
            _ => (
                want,
                Mapping::Data {
                    file: FileRole::Image,
                    host: off,
                    zero: false,
                },
            ),
        };
        Ok(Run { len, mapping })
    }

    fn storage(&self, role: FileRole) -> Option<&Arc<dyn Storage>> {
        match role {
            FileRole::Image => Some(&self.storage),
            FileRole::DataFile => None,
        }
    }

    fn read_compressed(&self, _off: u64, _buf: &mut [u8]) -> Result<()> {
        Err(Error::new(
            ErrorKind::InvalidArgument,
            "raw images have no compressed clusters",
        ))
    }
}
