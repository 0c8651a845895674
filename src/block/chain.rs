//! A backing chain: layer 0 is the image the user named, layer 1 its backing file, and so on.
//!
//! [`Chain`] is the handle every user of an image holds: it checks ranges, resolves them
//! (`walk.rs`), reads through read plans (`plan.rs`), and sends writes to the top layer with
//! the layers below as the copy-on-write source (`Below`). `cli/map.rs` builds
//! `qemu-img map`'s per-range answer on [`Chain::layers`].

use super::plan::{plan_async_in, plan_in, read_in, Completion, ReadPlan, Segment, Wait};
use super::walk::{resolve_batch, resolve_in, ChainRun};
use super::{Access, BlockDevice, CowSource, FileRole, ZeroMode};
use crate::error::{Error, ErrorKind, Result};
use std::sync::Arc;

#[derive(Debug, Clone)]
pub struct Chain {
    layers: Vec<Arc<dyn BlockDevice>>,
    /// Flush after every write and write-zeroes (`cache=writethrough`, `directsync`).
    write_through: bool,
    /// `driver=compress`: writes go to the top layer as whole compressed clusters, one
    /// request at a time (a partial cluster is read, merged and rewritten under this lock).
    compress: Option<Arc<std::sync::Mutex<()>>>,
}

impl Chain {
    /// `layers[0]` is the top; each next one is the backing file of the previous.
    pub fn new(layers: Vec<Arc<dyn BlockDevice>>) -> Result<Chain> {
        if layers.is_empty() {
            return Err(Error::new(ErrorKind::InvalidArgument, "empty chain"));
        }
        Ok(Chain {
            layers,
            write_through: false,
            compress: None,
        })
    }

    /// Make every write and write-zeroes durable before it returns, as if each carried FUA
    /// (QEMU's BlockBackend with its write cache disabled: `cache=writethrough`, `directsync`).
    pub fn with_write_through(mut self, on: bool) -> Chain {
        self.write_through = on;
        self
    }

    pub fn write_through(&self) -> bool {
        self.write_through
    }

    /// Turn every write into compressed clusters of the top layer (QEMU's `compress` filter
    /// driver). Fails when the top layer cannot store them (raw, or a qcow2 image with an
    /// external data file).
    pub fn with_compressed_writes(mut self, on: bool) -> Result<Chain> {
        if on {
            if self.layers[0].compress_cluster().is_none() {
                return Err(Error::unsupported(
                    "driver 'compress' needs a qcow2 image without an external data file",
                ));
            }
            self.compress = Some(Arc::new(std::sync::Mutex::new(())));
        }
        Ok(self)
    }

    pub fn compressed_writes(&self) -> bool {
        self.compress.is_some()
    }

    /// Whether a write completes in memory (page cache, no flush): cheap enough for the NBD
    /// server to run on a connection's own thread. Not with `O_DIRECT` files or write-through.
    pub fn writes_buffered(&self) -> bool {
        let top = &self.layers[0];
        !self.write_through
            && self.compress.is_none()
            && [FileRole::Image, FileRole::DataFile]
                .into_iter()
                .filter_map(|r| top.storage(r))
                .all(|s| s.buffered())
    }

    pub fn top(&self) -> &Arc<dyn BlockDevice> {
        &self.layers[0]
    }

    pub fn layers(&self) -> &[Arc<dyn BlockDevice>] {
        &self.layers
    }

    pub fn size(&self) -> u64 {
        self.layers[0].size()
    }

    fn check_range(&self, off: u64, len: u64) -> Result<()> {
        match off.checked_add(len) {
            Some(end) if end <= self.size() => Ok(()),
            _ => Err(Error::new(
                ErrorKind::OutOfRange,
                format!(
                    "range {off:#x}+{len:#x} beyond the end of the image ({:#x})",
                    self.size()
                ),
            )),
        }
    }

    /// Resolve the range at `off` (at most `len` bytes, `len > 0`) through the chain.
    pub fn resolve(&self, off: u64, len: u64) -> Result<ChainRun> {
        self.check_range(off, len)?;
        resolve_in(&self.layers, off, len)
    }

    /// Resolve consecutive runs from `off` (at most `len` bytes, `len > 0`): append at least one
    /// and at most `max` runs to `out`, contiguous from `off`. Each run answers as `resolve`
    /// would for its bytes; each layer maps many runs per call (`BlockDevice::map_many`). An
    /// error only fails the call when it concerns the first run.
    pub fn resolve_many(
        &self,
        off: u64,
        len: u64,
        max: usize,
        out: &mut Vec<ChainRun>,
    ) -> Result<()> {
        self.check_range(off, len)?;
        resolve_batch(&self.layers, off, len, max, out)
    }

    /// Resolve `[off, off + len)` once, with every layer pinned, for reading (see [`ReadPlan`]).
    pub fn plan_read(&self, off: u64, len: u64) -> Result<ReadPlan<'_>> {
        self.check_range(off, len)?;
        plan_in(&self.layers, off, len)
    }

    /// Read guest bytes.
    pub fn read(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        self.check_range(off, buf.len() as u64)?;
        read_in(&self.layers, off, buf, Wait::Block).map(|_| ())
    }

    /// Read guest bytes if that needs no waiting for the disk (data in the page cache, zeros,
    /// unallocated ranges); `Completion::WouldBlock` otherwise, with `buf` in an unspecified
    /// state. Compressed clusters always answer `WouldBlock`.
    pub fn read_nowait(&self, off: u64, buf: &mut [u8]) -> Result<Completion> {
        self.check_range(off, buf.len() as u64)?;
        read_in(&self.layers, off, buf, Wait::Never)
    }

    /// Whether the top layer accepts writes.
    pub fn access(&self) -> Access {
        self.layers[0].access()
    }

    /// Write guest bytes to the top layer (copy-on-write from the layers below).
    pub fn write(&self, off: u64, buf: &[u8], fua: bool) -> Result<()> {
        self.check_range(off, buf.len() as u64)?;
        if let Some(lock) = &self.compress {
            let _one = lock.lock().unwrap_or_else(|e| e.into_inner());
            self.write_compressing(off, buf)?;
            return self.settle(fua || self.write_through);
        }
        self.layers[0].write(off, buf, &Below(&self.layers[1..]))?;
        self.settle(fua || self.write_through)
    }

    /// Whole compressed clusters for `buf` at `off`: a cluster the write covers in part is
    /// completed with what the guest reads there now.
    fn write_compressing(&self, off: u64, buf: &[u8]) -> Result<()> {
        let top = &self.layers[0];
        let below = Below(&self.layers[1..]);
        let cs = top
            .compress_cluster()
            .ok_or_else(|| Error::unsupported("compressed writes need a qcow2 image"))?;
        let size = self.size();
        let mut pos = 0usize;
        while pos < buf.len() {
            let g = off + pos as u64;
            let start = g - g % cs;
            let clen = cs.min(size - start) as usize;
            let within = (g - start) as usize;
            let n = (clen - within).min(buf.len() - pos);
            if within == 0 && n == clen {
                top.write_compressed(start, &buf[pos..pos + n], &below)?;
            } else {
                let mut c = vec![0u8; clen];
                self.read(start, &mut c)?;
                c[within..within + n].copy_from_slice(&buf[pos..pos + n]);
                top.write_compressed(start, &c, &below)?;
            }
            pos += n;
        }
        Ok(())
    }

    /// Make a range read as zeros; durable before it returns with `fua` (or write-through).
    pub fn write_zeroes(&self, off: u64, len: u64, mode: ZeroMode, fua: bool) -> Result<()> {
        self.check_range(off, len)?;
        let _one = self
            .compress
            .as_ref()
            .map(|l| l.lock().unwrap_or_else(|e| e.into_inner()));
        self.layers[0].write_zeroes(off, len, mode, &Below(&self.layers[1..]))?;
        self.settle(fua || self.write_through)
    }

    /// Release a range (advisory); with `fua`, what was written before is durable when it
    /// returns (write-through does not apply: QEMU's BlockBackend adds FUA to writes only).
    pub fn discard(&self, off: u64, len: u64, fua: bool) -> Result<()> {
        self.check_range(off, len)?;
        let _one = self
            .compress
            .as_ref()
            .map(|l| l.lock().unwrap_or_else(|e| e.into_inner()));
        self.layers[0].discard(off, len, &Below(&self.layers[1..]))?;
        self.settle(fua)
    }

    /// A persistent dirty bitmap, looked up from the top layer down (as qemu-nbd does).
    pub fn dirty_bitmap(
        &self,
        name: &str,
    ) -> Result<Arc<std::sync::RwLock<crate::bitmap::DirtyBitmap>>> {
        let mut first_err = None;
        for l in &self.layers {
            match l.dirty_bitmap(name) {
                Ok(b) => return Ok(b),
                Err(e) if e.kind() == ErrorKind::NotFound => {
                    first_err.get_or_insert(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(first_err.unwrap_or_else(|| {
            Error::new(ErrorKind::NotFound, format!("Bitmap '{name}' is not found"))
        }))
    }

    /// Whether zeroing this range touches metadata only.
    pub fn zero_is_fast(&self, off: u64, len: u64) -> bool {
        self.layers[0].zero_is_fast(off, len)
    }

    /// Clean close of the top layer (flush, store bitmaps).
    pub fn close(&self) -> Result<()> {
        self.layers[0].close()
    }

    /// Make completed writes durable.
    pub fn flush(&self) -> Result<()> {
        self.layers[0].flush()
    }

    /// The one FUA path: after a request asked to be durable (`durable`: its FUA flag, or
    /// write-through), flush.
    fn settle(&self, durable: bool) -> Result<()> {
        if durable {
            self.flush()
        } else {
            Ok(())
        }
    }
}

/// The layers below the top: the copy-on-write source.
struct Below<'a>(&'a [Arc<dyn BlockDevice>]);

impl CowSource for Below<'_> {
    fn has_backing(&self) -> bool {
        !self.0.is_empty()
    }

    fn read_below(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        if self.0.is_empty() {
            buf.fill(0);
            return Ok(());
        }
        read_in(self.0, off, buf, Wait::Block).map(|_| ())
    }
}

impl Chain {
    /// A value that changes before any layer can reuse host space it freed (see
    /// [`BlockDevice::reuse_epoch`]).
    pub fn reuse_epoch(&self) -> u64 {
        self.layers
            .iter()
            .fold(0u64, |a, l| a.wrapping_add(l.reuse_epoch()))
    }

    /// Plan a read of `len` bytes at `off` as reads by file descriptor and zero runs (see
    /// `plan.rs`): `None` when some part cannot be read that way. Read
    /// [`reuse_epoch`](Self::reuse_epoch) before this call and compare it once every read has
    /// completed; if it changed, read again with [`Chain::read`].
    pub fn plan_async(&self, off: u64, len: u64) -> Result<Option<Vec<Segment>>> {
        self.check_range(off, len)?;
        plan_async_in(&self.layers, off, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::{Mapping, Run};
    use crate::io::mem::MemStorage;
    use crate::io::Storage;

    /// A scripted layer: `runs` of (length, mapping) from guest offset 0; data reads come from
    /// `file`.
    #[derive(Debug)]
    struct Scripted {
        runs: Vec<(u64, Mapping)>,
        file: Arc<dyn Storage>,
        /// Mapping at or after this offset fails (a corrupt table).
        fail_at: u64,
    }

    impl BlockDevice for Scripted {
        fn size(&self) -> u64 {
            self.runs.iter().map(|r| r.0).sum()
        }
        fn format_name(&self) -> &'static str {
            "scripted"
        }
        fn supports_backing(&self) -> bool {
            true
        }
        fn map(&self, off: u64, len: u64) -> Result<Run> {
            if off >= self.fail_at {
                return Err(Error::new(ErrorKind::Corrupt, "bad table"));
            }
            let mut start = 0;
            for &(n, mapping) in &self.runs {
                if off < start + n {
                    let into = off - start;
                    let mapping = match mapping {
                        Mapping::Data { file, host, zero } => Mapping::Data {
                            file,
                            host: host + into,
                            zero,
                        },
                        m => m,
                    };
                    return Ok(Run {
                        len: (n - into).min(len),
                        mapping,
                    });
                }
                start += n;
            }
            Err(Error::new(ErrorKind::OutOfRange, "beyond the end"))
        }
        fn storage(&self, _role: FileRole) -> Option<&Arc<dyn Storage>> {
            Some(&self.file)
        }
        fn read_compressed(&self, _off: u64, buf: &mut [u8]) -> Result<()> {
            buf.fill(0xcc);
            Ok(())
        }
    }

    fn data(host: u64) -> Mapping {
        Mapping::Data {
            file: FileRole::Image,
            host,
            zero: false,
        }
    }

    const BACKING: Mapping = Mapping::Backing {
        file: FileRole::Image,
        host: None,
    };

    /// top: data, backing, zero, backing, compressed, backing; mid (shorter than the top):
    /// backing, data, backing; base: data everywhere it exists (shorter still).
    fn chain() -> Chain {
        let file: Arc<dyn Storage> = Arc::new(MemStorage::new(
            (0..8192u32).map(|i| (i % 251) as u8).collect(),
        ));
        let layer = |runs: Vec<(u64, Mapping)>| -> Arc<dyn BlockDevice> {
            Arc::new(Scripted {
                runs,
                file: file.clone(),
                fail_at: u64::MAX,
            })
        };
        let zero = Mapping::Zero {
            file: FileRole::Image,
            host: None,
        };
        Chain::new(vec![
            layer(vec![
                (100, data(1000)),
                (300, BACKING),
                (50, zero),
                (250, BACKING),
                (64, Mapping::Compressed),
                (236, BACKING),
            ]),
            layer(vec![(150, BACKING), (200, data(3000)), (450, BACKING)]),
            layer(vec![(600, data(5000))]),
        ])
        .unwrap()
    }

    /// Per byte: (mapping with the host offset of that byte, depth).
    fn per_byte(runs: &[ChainRun]) -> Vec<(Mapping, usize)> {
        let mut v = Vec::new();
        for r in runs {
            for i in 0..r.len {
                let m = match r.mapping {
                    Mapping::Data { file, host, zero } => Mapping::Data {
                        file,
                        host: host + i,
                        zero,
                    },
                    m => m,
                };
                v.push((m, r.depth));
            }
        }
        v
    }

    #[test]
    fn resolve_many_answers_as_resolve_per_byte() {
        let c = chain();
        let size = c.size();
        for off in [0, 1, 99, 100, 149, 420, 599, 600, 777] {
            let mut single = Vec::new();
            let mut pos = off;
            while pos < size {
                let r = c.resolve(pos, size - pos).unwrap();
                pos += r.len;
                single.push(r);
            }
            let expect = per_byte(&single);
            for max in [1, 2, 3, 1000] {
                let mut many = Vec::new();
                let mut pos = off;
                while pos < size {
                    let before = many.len();
                    c.resolve_many(pos, size - pos, max, &mut many).unwrap();
                    let got = &many[before..];
                    assert!(!got.is_empty() && got.len() <= max);
                    pos += got.iter().map(|r| r.len).sum::<u64>();
                }
                assert_eq!(pos, size);
                assert_eq!(per_byte(&many), expect, "off {off} max {max}");
            }
        }
    }

    #[test]
    fn planned_reads_equal_reads_and_cover_the_range() {
        let c = chain();
        let size = c.size() as usize;
        let mut whole = vec![0u8; size];
        c.read(0, &mut whole).unwrap();
        assert_eq!(whole[0], (1000 % 251) as u8);
        // 150..350 comes from the middle layer, 400..450 is a zero cluster, 450..600 from the
        // base (the middle layer's run is unallocated there), 600..700 beyond the base: zeros
        assert_eq!(whole[150], (3000 % 251) as u8);
        assert!(whole[400..450].iter().all(|&b| b == 0));
        assert_eq!(whole[450], (5450 % 251) as u8);
        assert!(whole[600..700].iter().all(|&b| b == 0));
        assert!(whole[700..764].iter().all(|&b| b == 0xcc));
        for (off, len) in [(0, 800), (90, 300), (399, 2), (450, 151)] {
            let plan = c.plan_read(off, len).unwrap();
            assert_eq!(plan.runs().iter().map(|r| r.len).sum::<u64>(), len);
            let mut buf = vec![0u8; len as usize];
            assert_eq!(
                plan.read(off, &mut buf, Wait::Block).unwrap(),
                Completion::Done
            );
            assert_eq!(buf, whole[off as usize..(off + len) as usize]);
            // a piece from the middle of the plan
            let mut piece = vec![0u8; (len / 2) as usize];
            plan.read(off + len / 4, &mut piece, Wait::Block).unwrap();
            let s = (off + len / 4) as usize;
            assert_eq!(piece, whole[s..s + piece.len()]);
            // outside the plan: refused
            assert!(plan.read(off + len, &mut [0u8; 1], Wait::Block).is_err());
        }
    }

    #[test]
    fn an_error_past_the_first_run_ends_the_batch_early() {
        let file: Arc<dyn Storage> = Arc::new(MemStorage::new(vec![7; 4096]));
        let top: Arc<dyn BlockDevice> = Arc::new(Scripted {
            runs: vec![(100, data(0)), (100, BACKING), (100, data(200))],
            file,
            fail_at: 200,
        });
        let c = Chain::new(vec![top]).unwrap();
        let mut runs = Vec::new();
        c.resolve_many(0, 300, 10, &mut runs).unwrap();
        assert_eq!(runs.iter().map(|r| r.len).sum::<u64>(), 200);
        // asked for itself, the bad range fails, as a read through it does
        assert!(c.resolve_many(200, 100, 10, &mut runs).is_err());
        assert!(c.read(150, &mut [0u8; 100]).is_err());
        let mut buf = [0u8; 100];
        c.read(100, &mut buf).unwrap();
        assert_eq!(buf, [0u8; 100]);
    }
}
