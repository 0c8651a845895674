//! Entry points for fuzzing and property tests: open bytes as an image and exercise the read
//! side without touching the file system; [`write_ops`] exercises the write side under an
//! injected storage fault.

use crate::block::{Chain, Mapping};
use crate::error::Result;
use crate::io::mem::MemStorage;
use crate::open::open_storage_image;
use crate::qcow2::Qcow2Options;
use std::sync::Arc;

/// `CI=true` (or `1`): the one test of the `CI` variable (the spec tests call it through
/// `qcow2_spec_tests::in_ci`, `scripts/test` reads it the same way). Under CI a test that
/// cannot run (a missing tool or kernel feature) fails instead of skipping.
pub fn in_ci() -> bool {
    matches!(std::env::var("CI").as_deref(), Ok("true") | Ok("1"))
}

pub mod write_ops;
pub use write_ops::write_ops;

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
        let e = crate::cli::map::map_entry(&chain, off, size - off)?;
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
    nbd_session_end(data).0
}

/// [`nbd_session`], also saying how the connection ended (whether it entered transmission).
pub fn nbd_session_end(data: &[u8]) -> (usize, crate::nbd::server::ConnEnd) {
    use crate::nbd::dispatch::Pool;
    use crate::nbd::server::{serve_connection, ConnEnd};
    use std::io::{Cursor, Write};
    use std::sync::Mutex;

    let Some(cfg) = fuzz_export_config() else {
        return (0, ConnEnd::NotNegotiated);
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
    let end = serve_connection(
        Box::new(Cursor::new(data.to_vec())),
        Box::new(out.clone()),
        None,
        &cfg,
        &pool,
        None,
        crate::log::Conn::default(),
    );
    drop(pool);
    let n = *out.0.lock().unwrap_or_else(|e| e.into_inner());
    (n, end)
}

/// The export of the NBD fuzz sessions: a writable 1 MiB in-memory raw image.
pub(crate) fn fuzz_export_config() -> Option<crate::nbd::server::ConnConfig> {
    use crate::nbd::export::{ChainBackend, Export, ExportSet};
    use crate::nbd::meta::Available;
    use crate::nbd::server::ConnConfig;

    let mut img = vec![0u8; 1 << 20];
    img[..4096].fill(0xab);
    let storage = Arc::new(MemStorage::new(img));
    let dev = open_storage_image(
        storage,
        Some(crate::open::Format::Raw),
        &Qcow2Options {
            access: crate::block::Access::ReadWrite,
            ..Qcow2Options::default()
        },
    )
    .ok()?;
    let chain = Chain::new(vec![dev]).ok()?;
    let export = Arc::new(Export {
        name: String::new(),
        description: Some("fuzz".into()),
        backend: Arc::new(ChainBackend::new(chain)),
        contexts: Available {
            allocation_depth: true,
            bitmaps: Vec::new(),
            hide_vendor: false,
        },
        multi_conn: true,
        stats: None,
    });
    Some(ConnConfig {
        exports: Arc::new(ExportSet::new(vec![export])),
        handshake_limit: None,
        tls: None,
        #[cfg(feature = "uring")]
        planes: None,
    })
}

/// `Ok` when the kernel gives this process what a ring data plane needs (the io_uring opcodes,
/// an eventfd and a ring of the planes' size); otherwise the error that makes
/// [`Planes::start`](crate::nbd::plane::Planes::start) fail, and `qnbd serve` serve every
/// connection on threads. Starts no plane.
#[cfg(feature = "uring")]
pub fn ring_plane_available() -> std::io::Result<()> {
    use crate::io::uring::{probe_event_ring, EventRing, WakeFd};
    use crate::nbd::reply::ReplyBatch;

    probe_event_ring()?;
    let _wake = WakeFd::new()?;
    let _ring = EventRing::<ReplyBatch>::new(crate::nbd::plane::RING_ENTRIES)?;
    Ok(())
}

/// [`nbd_session`] over a real Unix socket pair, with the connection handed to a ring data plane
/// after negotiation (as `qnbd serve` does): the client bytes are written from another thread
/// and the half-closed, the replies read until the server closes. Returns the number of reply
/// bytes; panics if the server neither answers nor closes within 20 s (a hang). `None` when the
/// kernel refuses io_uring here.
#[cfg(feature = "uring")]
pub fn nbd_plane_session(data: &[u8]) -> Option<usize> {
    nbd_plane_session_end(data).map(|(n, _)| n)
}

/// [`nbd_plane_session`], also saying how the negotiation thread let go of the connection:
/// [`ConnEnd::HandedOver`](crate::nbd::server::ConnEnd::HandedOver) when a plane served its
/// transmission phase, [`ConnEnd::Negotiated`](crate::nbd::server::ConnEnd::Negotiated) when
/// it entered transmission but stayed on the threaded path.
#[cfg(feature = "uring")]
pub fn nbd_plane_session_end(data: &[u8]) -> Option<(usize, crate::nbd::server::ConnEnd)> {
    use crate::nbd::dispatch::Pool;
    use crate::nbd::plane::Planes;
    use crate::nbd::server::{serve_connection, ConnEnd, EndHook};
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::sync::OnceLock;
    use std::time::Duration;

    static SHARED: OnceLock<Option<(Pool, Arc<Planes>)>> = OnceLock::new();
    let (pool, planes) = SHARED
        .get_or_init(|| {
            let pool = Pool::new(2);
            let planes = Planes::start(2, pool.clone()).ok()?;
            Some((pool, Arc::new(planes)))
        })
        .as_ref()?;
    let mut cfg = fuzz_export_config()?;
    cfg.planes = Some(planes.clone());
    let (server, mut client) = UnixStream::pair().ok()?;
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let hook: EndHook = Arc::new(move |_end: ConnEnd| {
        let _ = done_tx.send(());
    });
    let pool = pool.clone();
    let srv = std::thread::spawn(move || {
        let (r, c) = (server.try_clone().ok()?, server.try_clone().ok()?);
        let end = serve_connection(
            Box::new(r),
            Box::new(server),
            Some(c.into()),
            &cfg,
            &pool,
            Some(&hook),
            crate::log::Conn::default(),
        );
        if end != ConnEnd::HandedOver {
            hook(end);
        }
        Some(end)
    });
    let mut w = client.try_clone().ok()?;
    let input = data.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = w.write_all(&input);
        let _ = w.shutdown(std::net::Shutdown::Write);
    });
    client
        .set_read_timeout(Some(Duration::from_secs(20)))
        .ok()?;
    let mut total = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match client.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => total += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("the plane session neither answered nor closed: {e}"),
        }
    }
    let _ = writer.join();
    let end = srv.join().ok().flatten();
    // the end hook runs once the plane (or the negotiation thread) let go of the connection
    done_rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the connection's end was never reported");
    Some((total, end?))
}
