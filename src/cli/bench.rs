//! `qnbd bench`: like `qemu-img bench` (same options and defaults), reporting IOPS, MB/s and
//! latency percentiles, in human or JSON form.
//!
//! Requests are issued by `depth` threads sharing one opened image (one request in flight per
//! thread), in the order qemu-img bench uses: `count` requests of `size` bytes starting at
//! `offset`, each `step` bytes after the previous (default: `size`), wrapping at the end of the
//! image. `--random` picks request offsets at random (aligned to `size`) instead.
//!
//! `--nbd URI` sends the same request stream to an NBD server (qnbd's or any other) over one
//! connection with `depth` requests in flight, so servers can be compared with one client.

use super::{open_options, parse_size_arg, OutputFormat};
use crate::block::Chain;
use crate::error::{Error, ErrorKind, Result};
use crate::io::Engine;
use crate::nbd::client::{decode_simple_reply, encode_request, open_export, Target, Uri};
use crate::nbd::wire::{
    NBD_CMD_DISC, NBD_CMD_FLUSH, NBD_CMD_READ, NBD_CMD_WRITE, NBD_FLAG_READ_ONLY,
};
use crate::open::CacheMode;
use clap::Args;
use serde_json::json;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Mutex};
use std::time::Instant;

#[derive(Debug, Args)]
#[command(args_override_self = true)]
pub struct BenchArgs {
    /// Image format (qcow2, raw); probed when omitted.
    #[arg(short = 'f', long = "format")]
    pub format: Option<String>,
    /// Write instead of read.
    #[arg(short = 'w', long = "write")]
    pub write: bool,
    /// Requests in flight (one thread each).
    #[arg(short = 'd', long = "depth", default_value_t = 64)]
    pub depth: usize,
    /// Bytes per request.
    #[arg(short = 's', long = "size", value_parser = parse_size_arg, default_value = "4096")]
    pub size: u64,
    /// Number of requests.
    #[arg(short = 'c', long = "count", default_value_t = 75000)]
    pub count: u64,
    /// First offset.
    #[arg(short = 'o', long = "offset", value_parser = parse_size_arg, default_value = "0")]
    pub offset: u64,
    /// Distance between the starts of consecutive requests (default: the request size).
    #[arg(short = 'S', long = "step-size", value_parser = parse_size_arg)]
    pub step: Option<u64>,
    /// I/O engine: io_uring, threads, native (native needs -t none or directsync, as in
    /// qemu-img).
    #[arg(short = 'i', long = "aio")]
    pub aio: Option<String>,
    /// Same as -i native.
    #[arg(short = 'n', long = "native")]
    pub native: bool,
    /// Host cache mode: writeback (default), none (O_DIRECT), writethrough, directsync, unsafe.
    #[arg(short = 't', long = "cache")]
    pub cache: Option<String>,
    /// Byte pattern written, 0 to 255 (qemu-img bench --pattern).
    #[arg(long = "pattern", default_value_t = 0)]
    pub pattern: u32,
    /// Flush after this many write requests (0: never; at least the depth). Each flush waits
    /// for the requests in flight first, unless --no-drain.
    #[arg(long = "flush-interval", default_value_t = 0)]
    pub flush_interval: u64,
    /// With --flush-interval: flush while other requests are in flight.
    #[arg(long = "no-drain")]
    pub no_drain: bool,
    /// Accepted for qemu-img's command lines; like qemu-img bench, the report is printed anyway.
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    /// Random offsets (aligned to the request size) instead of a sequence.
    #[arg(long = "random")]
    pub random: bool,
    /// Output format: human (qemu-img's text) or json (qemu-img's JSON).
    #[arg(long = "output", value_enum, default_value_t = OutputFormat::Human)]
    pub output: OutputFormat,
    /// Share the image with writers: read-only, no lock denied to others (qemu-img -U).
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// Drive an NBD server instead of a local image (nbd://HOST[:PORT]/EXPORT or
    /// nbd+unix:///EXPORT?socket=PATH): one connection, `depth` requests in flight.
    #[arg(long = "nbd", value_name = "URI", conflicts_with = "image")]
    pub nbd: Option<String>,
    #[arg(long = "image-opts", help = super::IMAGE_OPTS_HELP)]
    pub image_opts: bool,
    /// The image to drive (not with --nbd).
    #[arg(required_unless_present = "nbd")]
    pub image: Option<String>,
}

/// The cookie of the FLUSHes `--flush-interval` sends over NBD (request cookies are the
/// in-flight slots, below the depth).
const FLUSH_COOKIE: u64 = u64::MAX - 1;

/// Offset of request number `i`.
fn request_offset(a: &BenchArgs, i: u64, size: u64, rng_state: u64) -> u64 {
    let slots = (size / a.size).max(1);
    if a.random {
        // splitmix64 of the request number: reproducible, no shared state
        let mut z = rng_state.wrapping_add(i.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        return (z % slots) * a.size;
    }
    let step = a.step.unwrap_or(a.size);
    let span = size - a.size + 1;
    (a.offset + i.wrapping_mul(step)) % span
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// What one run measured.
struct Measured {
    engine: &'static str,
    elapsed: f64,
    /// Per-request latencies in ns, sorted.
    lat: Vec<u64>,
}

/// qemu-img bench's checks of its arguments, with its messages, before anything is opened.
fn check_args(a: &BenchArgs) -> Result<()> {
    let bad = |m: &str| Err(Error::new(ErrorKind::InvalidArgument, m));
    const MAX: u64 = i32::MAX as u64;
    if a.count == 0 || a.count > MAX {
        return bad("Invalid request count specified. Must be between 1 and 2147483647.");
    }
    if a.depth == 0 || a.depth as u64 > MAX {
        return bad("Invalid queue depth specified. Must be between 1 and 2147483647.");
    }
    if a.size == 0 || a.size > MAX {
        return bad("Invalid buffer size specified. Must be between 1 and 2147483647.");
    }
    if a.pattern > 255 {
        return bad("Invalid pattern byte specified. Must be between 0 and 255.");
    }
    if let Some(aio) = &a.aio {
        if Engine::parse(aio).is_none() {
            return bad(&format!("Invalid aio option: {aio}"));
        }
    }
    if a.flush_interval > 0 && !a.write {
        return bad("--flush-interval is only available in write tests");
    }
    if a.flush_interval > 0 && a.flush_interval < a.depth as u64 {
        return bad("Flush interval can't be smaller than depth");
    }
    Ok(())
}

/// The -i / -n engine asked for ("native" when -n).
fn aio(a: &BenchArgs) -> Option<&str> {
    if a.native {
        Some("native")
    } else {
        a.aio.as_deref()
    }
}

fn announce(a: &BenchArgs) {
    if a.output == OutputFormat::Human {
        println!(
            "Sending {} {} requests, {} bytes each, {} in parallel (starting at offset {}, step size {})",
            a.count,
            if a.write { "write" } else { "read" },
            a.size,
            a.depth,
            a.offset,
            if a.random { "random".to_string() } else { a.step.unwrap_or(a.size).to_string() }
        );
        if a.flush_interval > 0 {
            println!("Sending flush every {} requests", a.flush_interval);
        }
    }
}

pub fn run(a: &BenchArgs) -> Result<i32> {
    check_args(a)?;
    let m = match (&a.nbd, &a.image) {
        (Some(uri), _) => run_nbd(a, uri)?,
        (None, Some(image)) => run_local(a, image)?,
        (None, None) => {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                "an image or --nbd URI is required",
            ))
        }
    };
    report(a, &m);
    Ok(0)
}

fn run_local(a: &BenchArgs, image: &str) -> Result<Measured> {
    let mut opts = open_options(a.format.as_deref())?;
    if let Some(aio) = aio(a) {
        opts.engine = Engine::parse(aio).ok_or_else(|| {
            Error::new(
                ErrorKind::InvalidArgument,
                format!("Invalid aio option: {aio}"),
            )
        })?;
    }
    if let Some(c) = &a.cache {
        opts.cache = CacheMode::parse(c)
            .ok_or_else(|| Error::new(ErrorKind::InvalidArgument, "Invalid cache mode"))?;
    }
    if aio(a) == Some("native") && !opts.cache.direct() {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!(
                "Could not open '{image}': aio=native was specified, but it requires \
                 cache.direct=on, which was not specified."
            ),
        ));
    }
    opts.writable = a.write;
    opts.locking = super::locking(image, a.force_share, a.write, crate::open::Locking::Tool)?;
    let name = super::image_name(image, a.image_opts, &mut opts)?;
    let img = super::open_named(&name, &opts)?;
    let chain: &Chain = &img.chain;
    let size = chain.size();
    if a.size > size {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            "request size is larger than the image",
        ));
    }
    if a.offset >= size {
        return Err(Error::new(
            ErrorKind::Io,
            format!(
                "Failed request: offset {} is beyond the end of the image ({size} bytes)",
                a.offset
            ),
        ));
    }
    announce(a);
    let next = AtomicU64::new(0);
    let writes_done = AtomicU64::new(0);
    // a flush waits for the writes in flight and holds new ones back (qemu-img bench drains
    // before each flush) unless --no-drain
    let gate = std::sync::RwLock::new(());
    let drain = !a.no_drain;
    let lat: Mutex<Vec<u64>> = Mutex::new(Vec::with_capacity(a.count as usize));
    let first_err: Mutex<Option<Error>> = Mutex::new(None);
    let seed = 0x1234_5678_9abc_def0u64;
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..a.depth.min(a.count.max(1) as usize) {
            s.spawn(|| {
                let mut buf = crate::io::buf::IoBuf::new(a.size as usize);
                if a.write {
                    buf.fill(a.pattern as u8);
                }
                let mut mine = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= a.count {
                        break;
                    }
                    let off = request_offset(a, i, size, seed);
                    let t = Instant::now();
                    let r = if a.write {
                        let held = drain.then(|| gate.read().unwrap_or_else(|e| e.into_inner()));
                        let r = chain.write(off, &buf, false);
                        drop(held);
                        let n = writes_done.fetch_add(1, Ordering::Relaxed) + 1;
                        if r.is_ok() && a.flush_interval > 0 && n.is_multiple_of(a.flush_interval) {
                            let _all =
                                drain.then(|| gate.write().unwrap_or_else(|e| e.into_inner()));
                            chain.flush()
                        } else {
                            r
                        }
                    } else {
                        chain.read(off, &mut buf)
                    };
                    mine.push(t.elapsed().as_nanos() as u64);
                    if let Err(e) = r {
                        let mut g = first_err.lock().unwrap_or_else(|e| e.into_inner());
                        g.get_or_insert(e);
                        break;
                    }
                }
                lat.lock().unwrap_or_else(|e| e.into_inner()).extend(mine);
            });
        }
    });
    if a.write {
        chain.flush()?;
    }
    let elapsed = start.elapsed().as_secs_f64();
    if let Some(e) = first_err.into_inner().unwrap_or_else(|e| e.into_inner()) {
        return Err(e);
    }
    let mut l = lat.into_inner().unwrap_or_else(|e| e.into_inner());
    l.sort_unstable();
    Ok(Measured {
        engine: img.layers[0].storage.engine_name(),
        elapsed,
        lat: l,
    })
}

/// Connect to `uri`, negotiate, and return (reader, writer, shutdown handle, size, flags).
type Split = (
    Box<dyn Read + Send>,
    Box<dyn Write + Send>,
    Box<dyn Fn() + Send + Sync>,
    u64,
    u16,
);

fn connect(uri: &str) -> Result<Split> {
    let u = Uri::parse(uri)?;
    let cerr = |e| Error::io(format!("Failed to connect to '{uri}'"), e);
    match &u.target {
        Target::Unix(p) => {
            let mut s = UnixStream::connect(p).map_err(cerr)?;
            let o = open_export(&mut s, &u.export)?;
            let (size, flags) = (o.size, o.flags);
            let r = s.try_clone().map_err(cerr)?;
            let c = s.try_clone().map_err(cerr)?;
            let stop = move || {
                let _ = c.shutdown(std::net::Shutdown::Both);
            };
            Ok((Box::new(r), Box::new(s), Box::new(stop), size, flags))
        }
        Target::Tcp(h, port) => {
            let mut s = TcpStream::connect((h.as_str(), *port)).map_err(cerr)?;
            let _ = s.set_nodelay(true);
            let o = open_export(&mut s, &u.export)?;
            let (size, flags) = (o.size, o.flags);
            let r = s.try_clone().map_err(cerr)?;
            let c = s.try_clone().map_err(cerr)?;
            let stop = move || {
                let _ = c.shutdown(std::net::Shutdown::Both);
            };
            Ok((Box::new(r), Box::new(s), Box::new(stop), size, flags))
        }
    }
}

/// The same request stream over NBD: one connection, a sender keeping `depth` requests in
/// flight (requests queued together go out in one write) and a receiver matching replies by
/// cookie (the cookie is the in-flight slot).
fn run_nbd(a: &BenchArgs, uri: &str) -> Result<Measured> {
    if a.size > u64::from(crate::nbd::transmission::MAX_PAYLOAD) {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            "request size is larger than an NBD request may be (32 MiB)",
        ));
    }
    let (mut rd, mut wr, stop, size, flags) = connect(uri)?;
    if a.size > size {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            "request size is larger than the export",
        ));
    }
    if a.write && flags & NBD_FLAG_READ_ONLY != 0 {
        return Err(Error::new(ErrorKind::Denied, "the export is read-only"));
    }
    announce(a);
    let depth = a.depth.min(a.count.max(1) as usize);
    let len = a.size as usize;
    let cmd = if a.write { NBD_CMD_WRITE } else { NBD_CMD_READ };
    let seed = 0x1234_5678_9abc_def0u64;
    let (tok_tx, tok_rx) = mpsc::channel::<usize>();
    for i in 0..depth {
        let _ = tok_tx.send(i);
    }
    let starts: Vec<AtomicU64> = (0..depth).map(|_| AtomicU64::new(0)).collect();
    let data = vec![a.pattern as u8; if a.write { len } else { 0 }];
    let flush_every = if a.write { a.flush_interval } else { 0 };
    let flushes = a.count.checked_div(flush_every).unwrap_or(0);
    // the receiver tells a draining sender that its FLUSH was answered
    let (flushed_tx, flushed_rx) = mpsc::channel::<()>();
    let t0 = Instant::now();
    let io = |what: &'static str| move |e| Error::io(what, e);
    let (starts, data, w, r) = (&starts, &data, &mut wr, &mut rd);
    let (sent, got) = std::thread::scope(|s| {
        let sender = s.spawn(move || -> Result<()> {
            let mut out = Vec::new();
            let mut free: Vec<usize> = Vec::with_capacity(depth);
            let mut i = 0u64;
            let send = |w: &mut Box<dyn Write + Send>, out: &mut Vec<u8>| {
                let r = w.write_all(out);
                out.clear();
                r.map_err(|e| {
                    stop();
                    io("writing requests to the server")(e)
                })
            };
            while i < a.count {
                if free.is_empty() {
                    let Ok(k) = tok_rx.recv() else {
                        return Ok(()); // the receiver stopped (and reports why)
                    };
                    free.push(k);
                }
                free.extend(tok_rx.try_iter());
                while let Some(k) = free.pop() {
                    if i >= a.count {
                        free.push(k);
                        break;
                    }
                    let off = request_offset(a, i, size, seed);
                    starts[k].store(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
                    encode_request(&mut out, cmd, k as u64, off, len as u32);
                    out.extend_from_slice(data);
                    i += 1;
                    if flush_every == 0 || !i.is_multiple_of(flush_every) {
                        continue;
                    }
                    if a.no_drain {
                        encode_request(&mut out, NBD_CMD_FLUSH, FLUSH_COOKIE, 0, 0);
                        continue;
                    }
                    // drain: every request answered, then the flush alone
                    send(w, &mut out)?;
                    while free.len() < depth {
                        let Ok(k) = tok_rx.recv() else {
                            return Ok(());
                        };
                        free.push(k);
                    }
                    encode_request(&mut out, NBD_CMD_FLUSH, FLUSH_COOKIE, 0, 0);
                    send(w, &mut out)?;
                    if flushed_rx.recv().is_err() {
                        return Ok(());
                    }
                }
                send(w, &mut out)?;
            }
            Ok(())
        });
        let receiver = s.spawn(move || -> Result<Vec<u64>> {
            let mut lat = Vec::with_capacity(a.count as usize);
            let mut buf = crate::io::buf::IoBuf::new(len);
            let mut h = [0u8; 16];
            for _ in 0..a.count + flushes {
                r.read_exact(&mut h)
                    .map_err(io("reading a reply from the server"))?;
                let (err, cookie) = decode_simple_reply(&h)?;
                if cookie == FLUSH_COOKIE {
                    if err != 0 {
                        return Err(Error::new(
                            ErrorKind::Io,
                            format!("the server failed FLUSH (NBD error {err})"),
                        ));
                    }
                    let _ = flushed_tx.send(());
                    continue;
                }
                if err != 0 {
                    return Err(Error::new(
                        ErrorKind::Io,
                        format!("the server failed a request (NBD error {err})"),
                    ));
                }
                if !a.write {
                    r.read_exact(&mut buf[..len])
                        .map_err(io("reading data from the server"))?;
                }
                let k = usize::try_from(cookie)
                    .ok()
                    .filter(|&k| k < depth)
                    .ok_or_else(|| Error::new(ErrorKind::Io, "reply with an unknown cookie"))?;
                let t = t0.elapsed().as_nanos() as u64;
                lat.push(t.saturating_sub(starts[k].load(Ordering::Relaxed)));
                let _ = tok_tx.send(k);
            }
            Ok(lat)
        });
        let got = receiver.join();
        let sent = sender.join();
        (sent, got)
    });
    let panicked = || Error::new(ErrorKind::Io, "a benchmark thread panicked");
    let mut lat = got.map_err(|_| panicked())??;
    sent.map_err(|_| panicked())??;
    if a.write {
        // like the local mode: the run ends with everything durable
        let mut out = Vec::new();
        encode_request(&mut out, NBD_CMD_FLUSH, u64::MAX, 0, 0);
        wr.write_all(&out).map_err(io("sending FLUSH"))?;
        let mut h = [0u8; 16];
        rd.read_exact(&mut h)
            .map_err(io("reading the FLUSH reply"))?;
        if decode_simple_reply(&h)?.0 != 0 {
            return Err(Error::new(ErrorKind::Io, "the server failed FLUSH"));
        }
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let mut out = Vec::new();
    encode_request(&mut out, NBD_CMD_DISC, 0, 0, 0);
    let _ = wr.write_all(&out);
    lat.sort_unstable();
    Ok(Measured {
        engine: "nbd",
        elapsed,
        lat,
    })
}

fn report(a: &BenchArgs, m: &Measured) {
    let (l, elapsed, engine) = (&m.lat, m.elapsed, m.engine);
    let n = l.len() as f64;
    let iops = n / elapsed;
    let mbps = n * a.size as f64 / elapsed / 1e6;
    let us = |v: u64| v as f64 / 1000.0;
    match a.output {
        OutputFormat::Human => {
            println!("Run completed in {elapsed:.3} seconds.");
            println!(
                "engine {engine}: {iops:.0} IOPS, {mbps:.1} MB/s; latency us: p50 {:.1} p90 {:.1} p99 {:.1} p99.9 {:.1} max {:.1}",
                us(percentile(l, 0.5)),
                us(percentile(l, 0.9)),
                us(percentile(l, 0.99)),
                us(percentile(l, 0.999)),
                us(l.last().copied().unwrap_or(0)),
            );
        }
        OutputFormat::Json => {
            let v = json!({
                "operation": if a.write { "write" } else { "read" },
                "engine": engine,
                "requests": l.len(),
                "request-size": a.size,
                "depth": a.depth,
                "seconds": elapsed,
                "iops": iops,
                "mb-per-second": mbps,
                "latency-us": {
                    "p50": us(percentile(l, 0.5)),
                    "p90": us(percentile(l, 0.9)),
                    "p99": us(percentile(l, 0.99)),
                    "p99.9": us(percentile(l, 0.999)),
                    "max": us(l.last().copied().unwrap_or(0)),
                },
            });
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        }
    }
}
