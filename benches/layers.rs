//! Per-layer micro-benchmarks (criterion): L2 entry decoding, single warm lookups through the
//! chain, read planning, NBD request decoding and block-status extent building. The whole-image
//! walks are in `map.rs`, bitmaps in `bitmap.rs`, the write path in `write.rs`.
//!
//! The image is the fragmented 1 GiB qcow2 of `common/mod.rs`, shared with `map.rs`.

mod common;

use common::fragmented_image;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use qnbd::nbd::extents::ExtentBuilder;
use qnbd::nbd::transmission::{decode_header, Decoded, HeaderMode};
use qnbd::open::{open_image, OpenOptions};
use qnbd::qcow2::spec::entries::{EntryLayout, OFLAG_COPIED};
use std::hint::black_box;

/// A small deterministic generator (xorshift), so every run measures the same work.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn bench_layers(c: &mut Criterion) {
    let mut g = c.benchmark_group("layers");

    // L2 entries of a 64 KiB table: standard entries with and without COPIED, zero flags
    let layout = EntryLayout {
        cluster_bits: 16,
        extended_l2: false,
        data_file: false,
    };
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let entries: Vec<u64> = (0..8192)
        .map(|_| match rng.next() % 4 {
            0 => 0,
            1 => 1,
            _ => ((rng.next() % (1 << 20)) << 16) | OFLAG_COPIED,
        })
        .collect();
    g.throughput(Throughput::Elements(entries.len() as u64));
    g.bench_function("l2-classify/8192-entries", |b| {
        b.iter(|| {
            for &e in &entries {
                black_box(layout.classify(black_box(e), 0, 0));
            }
        })
    });

    // NBD request headers as they arrive pipelined (32 x 4k READ)
    let mut reqs = Vec::new();
    for i in 0..32u64 {
        reqs.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        reqs.extend_from_slice(&0u16.to_be_bytes());
        reqs.extend_from_slice(&0u16.to_be_bytes());
        reqs.extend_from_slice(&i.to_be_bytes());
        reqs.extend_from_slice(&(i * 4096).to_be_bytes());
        reqs.extend_from_slice(&4096u32.to_be_bytes());
    }
    g.throughput(Throughput::Elements(32));
    g.bench_function("nbd-decode-header/32-reads", |b| {
        b.iter(|| {
            let mut at = 0;
            while at < reqs.len() {
                match decode_header(HeaderMode::Structured, &reqs[at..]) {
                    Decoded::Request { header_len, .. } => at += header_len,
                    _ => unreachable!("well-formed requests"),
                }
            }
        })
    });

    // block-status extents: 200 000 alternating runs (what a fragmented image gives)
    g.throughput(Throughput::Elements(200_000));
    g.bench_function("nbd-extents/200k-runs", |b| {
        b.iter(|| {
            let mut e = ExtentBuilder::new(0, 200_000 * 65536, false, 1 << 20);
            for i in 0..200_000u64 {
                if !e.push(65536, i & 1) {
                    break;
                }
            }
            black_box(e.finish())
        })
    });

    let Some(img) = fragmented_image() else {
        eprintln!("skipping the image benches: qemu-img/qemu-io not available");
        g.finish();
        return;
    };
    let path = img.to_string_lossy().into_owned();
    let image = open_image(&path, &OpenOptions::default()).expect("open bench image");
    let chain = image.chain;
    let size = chain.size();
    // warm the L2 cache
    let _ = chain.resolve(0, size);
    let offs: Vec<u64> = (0..1024)
        .map(|_| (rng.next() % (size / 4096)) * 4096)
        .collect();
    g.throughput(Throughput::Elements(offs.len() as u64));
    g.bench_function("chain-resolve-4k/warm-random", |b| {
        b.iter(|| {
            for &o in &offs {
                black_box(chain.resolve(o, 4096).expect("resolve"));
            }
        })
    });
    g.bench_function("chain-plan-read-1m/warm-random", |b| {
        b.iter(|| {
            for &o in &offs {
                let o = o.min(size - (1 << 20));
                black_box(chain.plan_async(o, 1 << 20).expect("plan"));
            }
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = bench_layers
}
criterion_main!(benches);
