//! `qnbd bench`: like `qemu-img bench` (same options and defaults), reporting IOPS, MB/s and
//! latency percentiles, in human or JSON form.
//!
//! Requests are issued by `depth` threads sharing one opened image (one request in flight per
//! thread), in the order qemu-img bench uses: `count` requests of `size` bytes starting at
//! `offset`, each `step` bytes after the previous (default: `size`), wrapping at the end of the
//! image. `--random` picks request offsets at random (aligned to `size`) instead.

use super::{open_options, parse_size_arg, OutputFormat};
use crate::block::Chain;
use crate::error::{Error, ErrorKind, Result};
use crate::io::Engine;
use crate::open::open_image;
use clap::Args;
use serde_json::json;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

#[derive(Debug, Args)]
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
    /// I/O engine: io_uring, threads/sync (qemu-img bench's -i).
    #[arg(short = 'i', long = "aio")]
    pub aio: Option<String>,
    /// Cache mode (accepted for qemu-img compatibility: writeback, none, ...).
    #[arg(short = 't', long = "cache")]
    pub cache: Option<String>,
    /// Byte pattern written (qemu-img bench --pattern).
    #[arg(long = "pattern", default_value_t = 0)]
    pub pattern: u8,
    /// Flush after this many write requests (0: never; qemu-img bench --flush-interval).
    #[arg(long = "flush-interval", default_value_t = 0)]
    pub flush_interval: u64,
    /// Random offsets (aligned to the request size) instead of a sequence.
    #[arg(long = "random")]
    pub random: bool,
    #[arg(long = "output", value_enum, default_value_t = OutputFormat::Human)]
    pub output: OutputFormat,
    /// Open the image without taking locks (accepted for qemu-img compatibility).
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    pub image: String,
}

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

pub fn run(a: &BenchArgs) -> Result<i32> {
    let mut opts = open_options(a.format.as_deref())?;
    if let Some(aio) = &a.aio {
        opts.engine = Engine::parse(aio).ok_or_else(|| {
            Error::new(
                ErrorKind::InvalidArgument,
                format!("Invalid AIO option: '{aio}'"),
            )
        })?;
    }
    opts.writable = a.write;
    if a.size == 0 || a.depth == 0 {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            "request size and depth must be positive",
        ));
    }
    let img = open_image(&a.image, &opts)?;
    let chain: &Chain = &img.chain;
    let size = chain.size();
    if a.size > size {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            "request size is larger than the image",
        ));
    }
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
    }
    let next = AtomicU64::new(0);
    let writes_done = AtomicU64::new(0);
    let lat: Mutex<Vec<u64>> = Mutex::new(Vec::with_capacity(a.count as usize));
    let first_err: Mutex<Option<Error>> = Mutex::new(None);
    let seed = 0x1234_5678_9abc_def0u64;
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..a.depth.min(a.count.max(1) as usize) {
            s.spawn(|| {
                let mut buf = crate::io::buf::IoBuf::new(a.size as usize);
                if a.write {
                    buf.fill(a.pattern);
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
                        let r = chain.write(off, &buf, false);
                        let n = writes_done.fetch_add(1, Ordering::Relaxed) + 1;
                        if r.is_ok() && a.flush_interval > 0 && n.is_multiple_of(a.flush_interval) {
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
    let n = l.len() as f64;
    let iops = n / elapsed;
    let mbps = n * a.size as f64 / elapsed / 1e6;
    let us = |v: u64| v as f64 / 1000.0;
    let engine = img.layers[0].storage.engine_name();
    match a.output {
        OutputFormat::Human => {
            println!("Run completed in {elapsed:.3} seconds.");
            println!(
                "engine {engine}: {iops:.0} IOPS, {mbps:.1} MB/s; latency us: p50 {:.1} p90 {:.1} p99 {:.1} p99.9 {:.1} max {:.1}",
                us(percentile(&l, 0.5)),
                us(percentile(&l, 0.9)),
                us(percentile(&l, 0.99)),
                us(percentile(&l, 0.999)),
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
                    "p50": us(percentile(&l, 0.5)),
                    "p90": us(percentile(&l, 0.9)),
                    "p99": us(percentile(&l, 0.99)),
                    "p99.9": us(percentile(&l, 0.999)),
                    "max": us(l.last().copied().unwrap_or(0)),
                },
            });
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        }
    }
    Ok(0)
}
