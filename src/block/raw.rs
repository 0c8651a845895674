//! Raw images: guest offset = host offset. Holes of a sparse host file are reported the way
//! QEMU's file driver reports them (SEEK_DATA / SEEK_HOLE), as zero ranges owned by this layer.

use super::{Access, BlockDevice, CowSource, FileRole, Mapping, Run, ZeroMode};
use crate::error::{Error, ErrorKind, Result};
use crate::io::{Extent, Storage};
use std::sync::{Arc, Mutex};

/// The bytes QEMU's format probing reads, and the first sector a probed raw image guards.
pub const PROBE_LEN: usize = 512;

/// The format other than raw that QEMU's probing (`bdrv_probe_all` without a file name) would
/// find in an image's first bytes, if any. Raw is what remains.
pub fn probed_format(head: &[u8]) -> Option<&'static str> {
    let be32 = |at: usize| {
        head.get(at..at + 4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    };
    let le32 = |at: usize| {
        head.get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    if head.starts_with(b"QFI\xfb") {
        return Some(if be32(4) == Some(1) { "qcow" } else { "qcow2" });
    }
    const MAGICS: &[(&[u8], &str)] = &[
        (b"QED\0", "qed"),
        (b"KDMV", "vmdk"),
        (b"COWD", "vmdk"),
        (b"# Disk DescriptorFile", "vmdk"),
        (b"conectix", "vpc"),
        (b"vhdxfile", "vhdx"),
        (b"LUKS\xba\xbe", "luks"),
        (b"WithoutFreeSpace", "parallels"),
        (b"WithouFreSpacExt", "parallels"),
        (b"Bochs Virtual HD Image", "bochs"),
        (b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0", "cloop"),
    ];
    if let Some((_, name)) = MAGICS.iter().find(|(m, _)| head.starts_with(m)) {
        return Some(name);
    }
    // VirtualBox: the signature follows a 64-byte text header
    if le32(64) == Some(0xbeda_107f) {
        return Some("vdi");
    }
    None
}

#[derive(Debug)]
pub struct RawDevice {
    storage: Arc<dyn Storage>,
    size: u64,
    access: Access,
    /// Opened without a format, by probing: as QEMU does, requests are sector-aligned and no
    /// write may make the first sector probe as another format (a guest could otherwise turn
    /// the image into, say, a qcow2 naming any host file as its backing file).
    probed: bool,
    /// Held across the check and the write of the first sector of a probed image.
    first_sector: Mutex<()>,
}

impl RawDevice {
    /// A writable raw device.
    pub fn new_writable(storage: Arc<dyn Storage>) -> Result<RawDevice> {
        let mut d = RawDevice::new(storage)?;
        d.access = Access::ReadWrite;
        Ok(d)
    }

    /// Mark the image as opened by probing (see `probed`).
    pub fn probed(mut self, probed: bool) -> RawDevice {
        self.probed = probed;
        self
    }

    /// For a probed image: refuse a change of the first sector (`data`, or zeros when `None`,
    /// over `[off, off + len)`) after which it would probe as another format. Call with
    /// `first_sector` held.
    fn check_first_sector(&self, off: u64, data: Option<&[u8]>, len: u64) -> Result<()> {
        if !self.probed || off >= PROBE_LEN as u64 || len == 0 {
            return Ok(());
        }
        let mut head = [0u8; PROBE_LEN];
        let mut got = 0;
        while got < PROBE_LEN {
            match self.storage.read_at(&mut head[got..], got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io("Could not read the first sector", e)),
            }
        }
        let start = off as usize;
        let n = (PROBE_LEN - start).min(usize::try_from(len).unwrap_or(usize::MAX));
        match data {
            Some(d) => head[start..start + n].copy_from_slice(&d[..n]),
            None => head[start..start + n].fill(0),
        }
        match probed_format(&head) {
            Some(name) => Err(Error::new(
                ErrorKind::Denied,
                format!(
                    "refusing a write that makes the first sector of a probed raw image look \
                     like {name}; give the format (-f raw) to allow it"
                ),
            )),
            None => Ok(()),
        }
    }

    /// Run `op` with the first sector guarded when it touches it on a probed image.
    fn guarded<T>(
        &self,
        off: u64,
        data: Option<&[u8]>,
        len: u64,
        op: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        if !self.probed || off >= PROBE_LEN as u64 || len == 0 {
            return op();
        }
        let _g = self
            .first_sector
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.check_first_sector(off, data, len)?;
        op()
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
    /// up to whole sectors; past the end of the file it reads as zeros already, so zeroing and
    /// discarding stop at the end of the file).
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
            probed: false,
            first_sector: Mutex::new(()),
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

    fn request_alignment(&self) -> u32 {
        // QEMU's raw driver over a probed image: whole sectors
        if self.probed {
            PROBE_LEN as u32
        } else {
            1
        }
    }

    fn write(&self, off: u64, buf: &[u8], _below: &dyn CowSource) -> Result<()> {
        self.check_writable(off, buf.len() as u64)?;
        // data written into the partial last sector beyond the end of the file extends the
        // file to the sector's end, as QEMU's file driver does (the size stays the same)
        self.guarded(off, Some(buf), buf.len() as u64, || {
            self.storage
                .write_at(buf, off)
                .map_err(|e| Error::io(format!("Could not write at {off:#x}"), e))
        })
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
        let zeroed = self.guarded(off, None, len, || {
            match self.storage.zero_range(off, n, how) {
                Ok(()) => Ok(true),
                Err(e) if e.kind() == std::io::ErrorKind::Unsupported => Ok(false),
                Err(e) => Err(Error::io(format!("Could not zero at {off:#x}"), e)),
            }
        })?;
        if zeroed {
            return Ok(());
        }
        let chunk = 1u64 << 20;
        let zeros = vec![0u8; chunk.min(len) as usize];
        let mut pos = off;
        while pos < off + len {
            let n = chunk.min(off + len - pos);
            self.write(pos, &zeros[..n as usize], below)?;
            pos += n;
        }
        Ok(())
    }

    fn discard(&self, off: u64, len: u64, _below: &dyn CowSource) -> Result<()> {
        self.check_writable(off, len)?;
        // advisory: where the host cannot release space, nothing happens (as in QEMU)
        let n = self.in_file(off, len)?;
        self.guarded(off, None, len, || {
            match self
                .storage
                .zero_range(off, n, crate::io::ZeroRange::Discard)
            {
                Err(e) if e.kind() != std::io::ErrorKind::Unsupported => {
                    Err(Error::io(format!("Could not discard at {off:#x}"), e))
                }
                _ => Ok(()),
            }
        })
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
