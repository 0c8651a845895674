//! Map / chain-resolve throughput on a fragmented qcow2 image (criterion).
//!
//! The image (1 GiB, 64 KiB clusters) is built once with qemu-img + qemu-io: 8192 clusters
//! written in a scrambled order, so the L2 tables point all over the file and no two neighbouring
//! guest clusters are contiguous on the host. Compare with `qemu-img map` on the same image:
//! `benches/README.md` has the commands and the figures.

mod common;

use common::fragmented_image;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use qnbd::open::{open_image, OpenOptions};

fn bench_map(c: &mut Criterion) {
    let Some(img) = fragmented_image() else {
        eprintln!("skipping map bench: qemu-img/qemu-io not available");
        return;
    };
    let path = img.to_string_lossy().into_owned();
    let image = open_image(&path, &OpenOptions::default()).expect("open bench image");
    let size = image.chain.size();
    let mut g = c.benchmark_group("map");
    g.throughput(Throughput::Bytes(size));
    g.bench_function("qemu-img-map-entries/1GiB-fragmented", |b| {
        b.iter(|| {
            let e = qnbd::cli::map::entries(&image.chain, 0, None).expect("map");
            assert!(e.len() > 8000);
        })
    });
    g.bench_function("chain-resolve/1GiB-fragmented", |b| {
        b.iter(|| {
            let mut off = 0;
            let mut n = 0;
            while off < size {
                let r = image.chain.resolve(off, size - off).expect("resolve");
                off += r.len;
                n += 1;
            }
            assert!(n > 8000);
        })
    });
    g.bench_function("chain-resolve-many/1GiB-fragmented", |b| {
        let mut runs = Vec::new();
        b.iter(|| {
            let mut off = 0;
            let mut n = 0;
            while off < size {
                runs.clear();
                image
                    .chain
                    .resolve_many(off, size - off, 1024, &mut runs)
                    .expect("resolve_many");
                off += runs.iter().map(|r| r.len).sum::<u64>();
                n += runs.len();
            }
            assert!(n > 8000);
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = bench_map
}
criterion_main!(benches);
