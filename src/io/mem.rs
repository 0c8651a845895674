//! In-memory storage: the double behind unit tests, fuzzing and property tests.

use super::{Extent, Storage};
use std::io;
use std::sync::{Arc, RwLock};

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

    /// Memory never blocks.
    fn read_at_nowait(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        self.read_at(buf, off)
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

/// A crash-simulating storage: writes land in a volatile layer, `sync` makes them durable.
/// `on_sync` sees (durable bytes, pending writes) just before each sync applies them, which is
/// every point at which a crash can cut the write stream.
pub struct CrashStorage {
    inner: std::sync::Mutex<CrashState>,
    on_sync: SyncHook,
}

/// Called with (durable bytes, pending writes) before each sync.
pub type SyncHook = Box<dyn Fn(&[u8], &[(u64, Vec<u8>)]) + Send + Sync>;

struct CrashState {
    durable: Vec<u8>,
    /// Writes since the last sync, in order.
    pending: Vec<(u64, Vec<u8>)>,
    /// What reads see: durable + pending.
    live: Vec<u8>,
}

impl std::fmt::Debug for CrashStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CrashStorage")
    }
}

impl CrashStorage {
    pub fn new(
        data: Vec<u8>,
        on_sync: impl Fn(&[u8], &[(u64, Vec<u8>)]) + Send + Sync + 'static,
    ) -> Self {
        CrashStorage {
            inner: std::sync::Mutex::new(CrashState {
                durable: data.clone(),
                pending: Vec::new(),
                live: data,
            }),
            on_sync: Box::new(on_sync),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, CrashState> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The durable image after a crash now.
    pub fn durable(&self) -> Vec<u8> {
        self.state().durable.clone()
    }

    /// Apply writes to an image buffer (extending it as files do).
    pub fn apply(base: &mut Vec<u8>, writes: &[(u64, Vec<u8>)]) {
        for (off, d) in writes {
            let off = *off as usize;
            if base.len() < off + d.len() {
                base.resize(off + d.len(), 0);
            }
            base[off..off + d.len()].copy_from_slice(d);
        }
    }
}

impl Storage for CrashStorage {
    fn len(&self) -> io::Result<u64> {
        Ok(self.state().live.len() as u64)
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        let s = self.state();
        let Ok(off) = usize::try_from(off) else {
            return Ok(0);
        };
        if off >= s.live.len() {
            return Ok(0);
        }
        let n = buf.len().min(s.live.len() - off);
        buf[..n].copy_from_slice(&s.live[off..off + n]);
        Ok(n)
    }

    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        let mut s = self.state();
        let w = vec![(off, buf.to_vec())];
        CrashStorage::apply(&mut s.live, &w);
        s.pending.push((off, buf.to_vec()));
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut s = self.state();
        s.live.resize(len as usize, 0);
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        let mut s = self.state();
        (self.on_sync)(&s.durable, &s.pending);
        let pending = std::mem::take(&mut s.pending);
        CrashStorage::apply(&mut s.durable, &pending);
        let live_len = s.live.len();
        s.durable.resize(live_len, 0);
        Ok(())
    }

    fn engine_name(&self) -> &'static str {
        "crash"
    }
}

/// Which fault a `FaultStorage` injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// No fault (yet): see `FaultStorage::arm`.
    None,
    /// Writes fail with EIO after `n` successful ones.
    WriteEio { after: u64 },
    /// Writes fail with ENOSPC once the file would grow past `limit` bytes.
    Enospc { limit: u64 },
    /// Every sync fails after `n` successful ones (and keeps failing: sticky).
    SyncEio { after: u64 },
    /// Reads fail with EIO.
    ReadEio,
    /// Sync number `at` fails with EIO, the others succeed (a transient fsync error).
    SyncEioOnce { at: u64 },
    /// Storage operation number `at` fails with `errno`; operations are writes, syncs and
    /// length changes, counted together from 0 (across every storage sharing the counter).
    /// `sticky`: later operations fail too; for ENOSPC only those that would grow the file
    /// (a full disk still takes overwrites and syncs), for any other errno all of them (a
    /// dead disk).
    AtOp { at: u64, errno: i32, sticky: bool },
}

/// A storage that injects one kind of fault.
#[derive(Debug)]
pub struct FaultStorage {
    inner: MemStorage,
    fault: std::sync::Mutex<Fault>,
    writes: std::sync::atomic::AtomicU64,
    syncs: std::sync::atomic::AtomicU64,
    ops: Arc<std::sync::atomic::AtomicU64>,
}

impl FaultStorage {
    pub fn new(data: Vec<u8>, fault: Fault) -> Self {
        Self::with_counter(data, fault, Arc::default())
    }

    /// A storage whose operations are numbered by `ops`, shared with other storages (an
    /// image and its data file) so that `Fault::AtOp` can name any operation of them.
    pub fn with_counter(
        data: Vec<u8>,
        fault: Fault,
        ops: Arc<std::sync::atomic::AtomicU64>,
    ) -> Self {
        FaultStorage {
            inner: MemStorage::new(data),
            fault: std::sync::Mutex::new(fault),
            writes: 0.into(),
            syncs: 0.into(),
            ops,
        }
    }

    /// Replace the fault from now on.
    pub fn arm(&self, fault: Fault) {
        *self.fault.lock().unwrap_or_else(|e| e.into_inner()) = fault;
    }

    /// Operations (writes, syncs, length changes) numbered so far.
    pub fn ops(&self) -> u64 {
        self.ops.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The current bytes.
    pub fn snapshot(&self) -> Vec<u8> {
        let len = self.inner.len().unwrap_or(0) as usize;
        let mut v = vec![0u8; len];
        let _ = self.inner.read_at(&mut v, 0);
        v
    }

    pub fn into_inner(self) -> Vec<u8> {
        self.inner.into_inner()
    }

    fn fault(&self) -> Fault {
        *self.fault.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Number this operation; the errno it fails with under `Fault::AtOp`, if any.
    fn op_fault(&self, grows: bool) -> Option<i32> {
        let n = self.ops.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        match self.fault() {
            Fault::AtOp { at, errno, sticky } => {
                let hit = n == at || (sticky && n > at && (errno != libc::ENOSPC || grows));
                hit.then_some(errno)
            }
            _ => None,
        }
    }
}

impl Storage for FaultStorage {
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        if self.fault() == Fault::ReadEio {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        self.inner.read_at(buf, off)
    }

    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        use std::sync::atomic::Ordering;
        let grows = off.saturating_add(buf.len() as u64) > self.inner.len()?;
        if let Some(errno) = self.op_fault(grows) {
            return Err(io::Error::from_raw_os_error(errno));
        }
        let fail = match self.fault() {
            Fault::WriteEio { after } => {
                (self.writes.fetch_add(1, Ordering::SeqCst) >= after).then_some(libc::EIO)
            }
            Fault::Enospc { limit } => {
                (off + buf.len() as u64 > limit.max(self.inner.len()?)).then_some(libc::ENOSPC)
            }
            _ => None,
        };
        if let Some(errno) = fail {
            return Err(io::Error::from_raw_os_error(errno));
        }
        self.inner.write_at(buf, off)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let grows = len > self.inner.len()?;
        if let Some(errno) = self.op_fault(grows) {
            return Err(io::Error::from_raw_os_error(errno));
        }
        if let Fault::Enospc { limit } = self.fault() {
            if len > limit.max(self.inner.len()?) {
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
        }
        self.inner.set_len(len)
    }

    fn sync(&self) -> io::Result<()> {
        use std::sync::atomic::Ordering;
        if let Some(errno) = self.op_fault(false) {
            return Err(io::Error::from_raw_os_error(errno));
        }
        let n = self.syncs.fetch_add(1, Ordering::SeqCst);
        match self.fault() {
            Fault::SyncEio { after } if n >= after => {
                return Err(io::Error::from_raw_os_error(libc::EIO))
            }
            Fault::SyncEioOnce { at } if n == at => {
                return Err(io::Error::from_raw_os_error(libc::EIO))
            }
            _ => {}
        }
        Ok(())
    }

    fn engine_name(&self) -> &'static str {
        "fault"
    }
}
