//! Raw images: guest offset = host offset. Holes of a sparse host file are reported the way
//! QEMU's file driver reports them (SEEK_DATA / SEEK_HOLE), as zero ranges owned by this layer.

use super::{Access, BlockDevice, CowSource, FileRole, Mapping, Run, ZeroMode};
use crate::error::{Error, ErrorKind, Result};
use crate::io::{Extent, Storage};
use std::sync::Arc;

#[derive(Debug)]
pub struct RawDevice {
    storage: Arc<dyn Storage>,
    size: u64,
    access: Access,
}

impl RawDevice {
    /// A writable raw device.
    pub fn new_writable(storage: Arc<dyn Storage>) -> Result<RawDevice> {
        let mut d = RawDevice::new(storage)?;
        d.access = Access::ReadWrite;
        Ok(d)
    }

    fn check_writable(&self, off: u64, len: u64) -> Result<()> {
        if self.access != Access::ReadWrite {
            return Err(Error::new(
                ErrorKind::Denied,
                "the image is opened read-only",
            ));
        }
        match off.checked_add(len) {
            Some(e) if e <= self.size => Ok(()),
            _ => Err(Error::new(
                ErrorKind::OutOfRange,
                "write beyond the end of the image",
            )),
        }
    }

    /// How much of `[off, off + len)` lies inside the host file (the device's size is rounded
    /// up to whole sectors; the part past the end of the file is not the file's to change).
    fn in_file(&self, off: u64, len: u64) -> Result<u64> {
        let flen = self
            .storage
            .len()
            .map_err(|e| Error::io("Could not get the image length", e))?;
        Ok(flen.saturating_sub(off).min(len))
    }

    pub fn new(storage: Arc<dyn Storage>) -> Result<RawDevice> {
        let size = storage
            .len()
            .map_err(|e| Error::io("Could not get the image length", e))?;
        // QEMU sizes block nodes in whole 512-byte sectors; the tail reads as zeros.
        let size = crate::units::align_up(size, 512).unwrap_or(size);
        Ok(RawDevice {
            storage,
            size,
            access: Access::ReadOnly,
        })
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
        let flen = self
            .storage
            .len()
            .map_err(|e| Error::io("Could not get the image length", e))?;
        if off >= flen {
            // the partial last sector past the end of the file reads as zeros
            return Ok(Run {
                len: want,
                mapping: Mapping::Zero {
                    file: FileRole::Image,
                    host: Some(off),
                },
            });
        }
        let want = want.min(flen - off).max(1);
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

    fn access(&self) -> Access {
        self.access
    }

    fn write(&self, off: u64, buf: &[u8], _below: &dyn CowSource, fua: bool) -> Result<()> {
        self.check_writable(off, buf.len() as u64)?;
        // the last partial sector lies beyond the file: write only what the file holds
        let n = self.in_file(off, buf.len() as u64)? as usize;
        self.storage
            .write_at(&buf[..n], off)
            .map_err(|e| Error::io(format!("Could not write at {off:#x}"), e))?;
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    fn write_zeroes(
        &self,
        off: u64,
        len: u64,
        mode: ZeroMode,
        below: &dyn CowSource,
    ) -> Result<()> {
        self.check_writable(off, len)?;
        // as QEMU's file driver: a hole where host space may be released, else a zeroed
        // range that stays allocated; zeros written where the host can do neither
        let how = match mode {
            ZeroMode::MayUnmap => crate::io::ZeroRange::Deallocate,
            ZeroMode::KeepAllocated => crate::io::ZeroRange::KeepAllocated,
        };
        let n = self.in_file(off, len)?;
        match self.storage.zero_range(off, n, how) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::Unsupported => {}
            Err(e) => return Err(Error::io(format!("Could not zero at {off:#x}"), e)),
        }
        let chunk = 1u64 << 20;
        let zeros = vec![0u8; chunk.min(len) as usize];
        let mut pos = off;
        while pos < off + len {
            let n = chunk.min(off + len - pos);
            self.write(pos, &zeros[..n as usize], below, false)?;
            pos += n;
        }
        Ok(())
    }

    fn discard(&self, off: u64, len: u64, _below: &dyn CowSource) -> Result<()> {
        self.check_writable(off, len)?;
        // advisory: where the host cannot release space, nothing happens (as in QEMU)
        let n = self.in_file(off, len)?;
        match self
            .storage
            .zero_range(off, n, crate::io::ZeroRange::Discard)
        {
            Err(e) if e.kind() != std::io::ErrorKind::Unsupported => {
                Err(Error::io(format!("Could not discard at {off:#x}"), e))
            }
            _ => Ok(()),
        }
    }

    fn flush(&self) -> Result<()> {
        if self.access == Access::ReadWrite {
            self.storage
                .sync()
                .map_err(|e| Error::io("Could not flush the image", e))?;
        }
        Ok(())
    }
}
