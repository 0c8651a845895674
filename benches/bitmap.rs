//! Dirty-bitmap costs (criterion): marking per 4 KiB write, and walking the extents of a
//! bitmap of a 1 TiB disk at 512 B granularity (what `qnbd bitmap --dump` and
//! `qemu:dirty-bitmap` block status do).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use qnbd::bitmap::DirtyBitmap;

const TIB: u64 = 1 << 40;

fn bench_bitmap(c: &mut Criterion) {
    let mut g = c.benchmark_group("bitmap");
    // marking: 4 KiB writes at scattered offsets of a 1 TiB disk, 512 B granularity
    let mut bm = DirtyBitmap::new(TIB, 512);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    g.throughput(Throughput::Elements(1));
    g.bench_function("mark-4k/1TiB-512B", |b| {
        b.iter(|| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            bm.mark((x % (TIB / 4096)) * 4096, 4096);
        })
    });
    // dump: 200k dirty 64 KiB extents spread over 1 TiB
    let mut d = DirtyBitmap::new(TIB, 512);
    for i in 0..200_000u64 {
        d.mark(i * (TIB / 200_000), 65536);
    }
    g.throughput(Throughput::Bytes(TIB));
    g.bench_function("dump-extents/1TiB-512B-200k-extents", |b| {
        b.iter(|| {
            let mut off = 0;
            let mut n = 0u64;
            while off < TIB {
                let (len, _) = d.run_at(off, TIB - off);
                off += len;
                n += 1;
            }
            assert!(n >= 400_000);
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10);
    targets = bench_bitmap
}
criterion_main!(benches);
