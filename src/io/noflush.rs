//! `--cache=unsafe`: a storage whose flushes succeed without syncing anything.
//!
//! Writes still reach the host (the qcow2 driver writes its dirty metadata when asked to flush,
//! as QEMU's `cache.no-flush` does); only the `fdatasync` is skipped, so data survives a crash
//! of the process but not of the host.

use super::{Extent, Storage};
use std::io;
use std::sync::Arc;

#[derive(Debug)]
pub struct NoFlush {
    inner: Arc<dyn Storage>,
}

impl NoFlush {
    pub fn new(inner: Arc<dyn Storage>) -> NoFlush {
        NoFlush { inner }
    }
}

impl Storage for NoFlush {
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        self.inner.read_at(buf, off)
    }
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.inner.write_at(buf, off)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
    fn zero_range(&self, off: u64, len: u64, how: super::ZeroRange) -> io::Result<()> {
        self.inner.zero_range(off, len, how)
    }
    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
    fn allocated_size(&self) -> io::Result<u64> {
        self.inner.allocated_size()
    }
    fn extent_at(&self, off: u64) -> io::Result<Option<Extent>> {
        self.inner.extent_at(off)
    }
    fn read_many(&self, reqs: &mut [(u64, &mut [u8])]) -> io::Result<()> {
        self.inner.read_many(reqs)
    }
    fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
        self.inner.raw_fd()
    }
    fn buffered(&self) -> bool {
        self.inner.buffered()
    }
    fn read_at_nowait(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        self.inner.read_at_nowait(buf, off)
    }
    fn engine_name(&self) -> &'static str {
        self.inner.engine_name()
    }
    fn identity(&self) -> Option<(u64, u64)> {
        self.inner.identity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::mem::{Fault, FaultStorage};

    #[test]
    fn flush_succeeds_without_reaching_the_file() {
        let f = FaultStorage::new(vec![0; 4096], Fault::SyncEio { after: 0 });
        assert!(f.sync().is_err());
        let n = NoFlush::new(Arc::new(f));
        n.write_at(&[1, 2, 3], 10).unwrap();
        n.sync().unwrap();
        let mut b = [0u8; 3];
        n.read_at(&mut b, 10).unwrap();
        assert_eq!(b, [1, 2, 3]);
    }
}
