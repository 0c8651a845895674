//! Entry points for fuzzing and property tests: open bytes as an image and exercise the read
//! side without touching the file system.

use crate::block::{Chain, Mapping};
use crate::error::Result;
use crate::io::mem::MemStorage;
use crate::open::open_storage_image;
use crate::qcow2::Qcow2Options;
use std::sync::Arc;

/// Open `data` as a qcow2 (or raw) image in memory, map it from start to end and read every
/// mapped run (bounded: at most 4096 runs and 64 MiB of reads).
pub fn open_and_map(data: &[u8]) -> Result<()> {
    let storage = Arc::new(MemStorage::new(data.to_vec()));
    let dev = open_storage_image(storage, None, &Qcow2Options::default())?;
    let chain = Chain::new(vec![dev.clone()])?;
    let size = dev.size();
    let mut off = 0u64;
    let mut runs = 0;
    let mut read_budget: u64 = 64 << 20;
    let mut buf = Vec::new();
    while off < size && runs < 4096 {
        let e = chain.map_entry(off, size - off)?;
        let r = chain.resolve(off, size - off)?;
        let n = r.len.min(e.length).max(1);
        let want = n.min(1 << 20).min(read_budget);
        if want > 0 && !matches!(r.mapping, Mapping::Backing { .. }) {
            buf.resize(want as usize, 0);
            chain.read(off, &mut buf)?;
            read_budget -= want;
        }
        off += n;
        runs += 1;
    }
    Ok(())
}

/// Run one NBD connection whose client bytes are `data` against a writable 1 MiB in-memory
/// raw export (with `qemu:allocation-depth`), discarding the replies. The fuzz target for the
/// handshake and transmission phases; returns the number of reply bytes the server wrote.
pub fn nbd_session(data: &[u8]) -> usize {
    use crate::nbd::export::{ChainBackend, Export, ExportSet};
    use crate::nbd::meta::Available;
    use crate::nbd::server::{serve_connection, ConnConfig, Pool};
    use std::io::{Cursor, Write};
    use std::sync::Mutex;

    let mut img = vec![0u8; 1 << 20];
    img[..4096].fill(0xab);
    let storage = Arc::new(MemStorage::new(img));
    let Ok(dev) = open_storage_image(
        storage,
        Some(crate::open::Format::Raw),
        &Qcow2Options {
            access: crate::block::Access::ReadWrite,
            ..Qcow2Options::default()
        },
    ) else {
        return 0;
    };
    let Ok(chain) = Chain::new(vec![dev]) else {
        return 0;
    };
    let export = Arc::new(Export {
        name: String::new(),
        description: Some("fuzz".into()),
        backend: Arc::new(ChainBackend::new(chain)),
        contexts: Available {
            allocation_depth: true,
            bitmaps: Vec::new(),
        },
        multi_conn: true,
    });
    let cfg = ConnConfig {
        exports: Arc::new(ExportSet::new(vec![export])),
        handshake_limit: None,
        verbose: false,
        tls: None,
        #[cfg(feature = "uring")]
        planes: None,
    };
    #[derive(Clone, Default)]
    struct Counter(Arc<Mutex<usize>>);
    impl Write for Counter {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            *self.0.lock().unwrap_or_else(|e| e.into_inner()) += b.len();
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let out = Counter::default();
    let pool = Pool::new(1);
    let _ = serve_connection(
        Box::new(Cursor::new(data.to_vec())),
        Box::new(out.clone()),
        None,
        &cfg,
        &pool,
        None,
    );
    drop(pool);
    let n = *out.0.lock().unwrap_or_else(|e| e.into_inner());
    n
}
