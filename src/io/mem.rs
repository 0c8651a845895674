//! In-memory storage: the double behind unit tests, fuzzing and property tests.

use super::{Extent, Storage};
use std::io;
use std::sync::RwLock;

#[derive(Debug, Default)]
pub struct MemStorage {
    data: RwLock<Vec<u8>>,
}

impl MemStorage {
    pub fn new(data: Vec<u8>) -> Self {
        MemStorage {
            data: RwLock::new(data),
        }
    }

    pub fn into_inner(self) -> Vec<u8> {
        self.data.into_inner().unwrap_or_else(|e| e.into_inner())
    }

    fn poisoned() -> io::Error {
        io::Error::other("storage lock poisoned")
    }
}

impl Storage for MemStorage {
    fn len(&self) -> io::Result<u64> {
        Ok(self.data.read().map_err(|_| Self::poisoned())?.len() as u64)
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        let d = self.data.read().map_err(|_| Self::poisoned())?;
        let Ok(off) = usize::try_from(off) else {
            return Ok(0);
        };
        if off >= d.len() {
            return Ok(0);
        }
        let n = buf.len().min(d.len() - off);
        buf[..n].copy_from_slice(&d[off..off + n]);
        Ok(n)
    }

    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        let mut d = self.data.write().map_err(|_| Self::poisoned())?;
        let off = usize::try_from(off).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
        let end = off
            .checked_add(buf.len())
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EFBIG))?;
        if end > d.len() {
            d.resize(end, 0);
        }
        d[off..end].copy_from_slice(buf);
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let len = usize::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
        self.data
            .write()
            .map_err(|_| Self::poisoned())?
            .resize(len, 0);
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        Ok(())
    }

    fn extent_at(&self, off: u64) -> io::Result<Option<Extent>> {
        let len = self.len()?;
        Ok(Some(if off >= len {
            Extent::Hole(0)
        } else {
            Extent::Data(len - off)
        }))
    }

    fn engine_name(&self) -> &'static str {
        "mem"
    }
}
