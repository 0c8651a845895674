//! Export filters: backends that wrap another and change one thing about it.
//!
//! * [`Offset`] (`serve -o N`): the export starts N bytes into the image.
//! * [`DetectZeroes`] (`--detect-zeroes=on|unmap`): a WRITE whose payload is all zeros becomes
//!   a WRITE_ZEROES, as QEMU's `detect-zeroes` turns it into a zero write on the top node
//!   (`unmap`: one that may release space, which the export's discard mode then allows).
//!
//! A filter forwards what it does not change, dirty bitmaps included, except the batched
//! block status (`block_status_many`) and planned reads (`read_planned`): those fall back to
//! the trait's defaults, one status or one read at a time.

use super::export::{Access, AsyncPlan, Completion, ExportBackend, Status, ZeroFlags};
use crate::error::Result;
use std::sync::Arc;

/// An export shifted by `-o OFFSET`.
#[derive(Debug)]
pub struct Offset {
    inner: Arc<dyn ExportBackend>,
    offset: u64,
}

impl Offset {
    pub fn new(inner: Arc<dyn ExportBackend>, offset: u64) -> Offset {
        Offset { inner, offset }
    }
}

impl ExportBackend for Offset {
    fn size(&self) -> u64 {
        self.inner.size().saturating_sub(self.offset)
    }
    fn read(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        self.inner.read(off + self.offset, buf)
    }
    fn read_nowait(&self, off: u64, buf: &mut [u8]) -> Result<Completion> {
        self.inner.read_nowait(off + self.offset, buf)
    }
    fn plan_async(&self, off: u64, len: u64) -> Option<AsyncPlan> {
        self.inner.plan_async(off + self.offset, len)
    }
    fn reuse_epoch(&self) -> u64 {
        self.inner.reuse_epoch()
    }
    fn writes_buffered(&self) -> bool {
        self.inner.writes_buffered()
    }
    fn request_alignment(&self) -> u32 {
        self.inner.request_alignment()
    }
    fn block_status(&self, off: u64, len: u64) -> Result<Status> {
        self.inner.block_status(off + self.offset, len)
    }
    fn access(&self) -> Access {
        self.inner.access()
    }
    fn can_trim(&self) -> bool {
        self.inner.can_trim()
    }
    fn can_zero(&self) -> bool {
        self.inner.can_zero()
    }
    fn can_fast_zero(&self) -> bool {
        self.inner.can_fast_zero()
    }
    fn write(&self, off: u64, data: &[u8], fua: bool) -> Result<()> {
        self.inner.write(off + self.offset, data, fua)
    }
    fn write_zeroes(&self, off: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.inner.write_zeroes(off + self.offset, len, flags)
    }
    fn trim(&self, off: u64, len: u64, fua: bool) -> Result<()> {
        self.inner.trim(off + self.offset, len, fua)
    }
    fn flush(&self) -> Result<()> {
        self.inner.flush()
    }
    fn close(&self) -> Result<()> {
        self.inner.close()
    }
    fn cache(&self, off: u64, len: u64) -> Result<()> {
        self.inner.cache(off + self.offset, len)
    }
    fn bitmaps(&self) -> Vec<String> {
        self.inner.bitmaps()
    }
    fn dirty_bitmap(&self, name: &str, off: u64, len: u64) -> Result<(u64, bool)> {
        self.inner.dirty_bitmap(name, off + self.offset, len)
    }
}

/// Zero detection on writes (see the module documentation).
#[derive(Debug)]
pub struct DetectZeroes {
    inner: Arc<dyn ExportBackend>,
    /// `unmap`: zero writes may release space (QEMU's `BDRV_REQ_MAY_UNMAP`).
    unmap: bool,
}

impl DetectZeroes {
    pub fn new(inner: Arc<dyn ExportBackend>, unmap: bool) -> DetectZeroes {
        DetectZeroes { inner, unmap }
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

impl ExportBackend for DetectZeroes {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        self.inner.read(off, buf)
    }
    fn read_nowait(&self, off: u64, buf: &mut [u8]) -> Result<Completion> {
        self.inner.read_nowait(off, buf)
    }
    fn plan_async(&self, off: u64, len: u64) -> Option<AsyncPlan> {
        self.inner.plan_async(off, len)
    }
    fn reuse_epoch(&self) -> u64 {
        self.inner.reuse_epoch()
    }
    fn writes_buffered(&self) -> bool {
        self.inner.writes_buffered()
    }
    fn request_alignment(&self) -> u32 {
        self.inner.request_alignment()
    }
    fn block_status(&self, off: u64, len: u64) -> Result<Status> {
        self.inner.block_status(off, len)
    }
    fn access(&self) -> Access {
        self.inner.access()
    }
    fn can_trim(&self) -> bool {
        self.inner.can_trim()
    }
    fn can_zero(&self) -> bool {
        self.inner.can_zero()
    }
    fn can_fast_zero(&self) -> bool {
        self.inner.can_fast_zero()
    }
    fn write(&self, off: u64, data: &[u8], fua: bool) -> Result<()> {
        if !data.is_empty() && all_zero(data) {
            let flags = ZeroFlags {
                no_hole: !self.unmap,
                fast: false,
                fua,
            };
            return self.inner.write_zeroes(off, data.len() as u64, flags);
        }
        self.inner.write(off, data, fua)
    }
    fn write_zeroes(&self, off: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.inner.write_zeroes(off, len, flags)
    }
    fn trim(&self, off: u64, len: u64, fua: bool) -> Result<()> {
        self.inner.trim(off, len, fua)
    }
    fn flush(&self) -> Result<()> {
        self.inner.flush()
    }
    fn close(&self) -> Result<()> {
        self.inner.close()
    }
    fn cache(&self, off: u64, len: u64) -> Result<()> {
        self.inner.cache(off, len)
    }
    fn bitmaps(&self) -> Vec<String> {
        self.inner.bitmaps()
    }
    fn dirty_bitmap(&self, name: &str, off: u64, len: u64) -> Result<(u64, bool)> {
        self.inner.dirty_bitmap(name, off, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
