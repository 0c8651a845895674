//! Write path throughput through the engine (criterion): allocating 4 KiB and 64 KiB writes at
//! random cluster-aligned offsets of a fresh image, and 4 KiB sequential writes. Each sample
//! writes into a fresh qcow2 (made by qemu-img, so the comparison with `qemu-img bench -w` in
//! `benches/README.md` starts from the same file).

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use qnbd::open::{open_image, OpenOptions};
use std::path::PathBuf;
use std::process::Command;

const N: u64 = 2000;

fn fresh(dir: &std::path::Path) -> Option<PathBuf> {
    let p = dir.join("w.qcow2");
    let _ = std::fs::remove_file(&p);
    Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&p)
        .arg("4G")
        .status()
        .ok()?
        .success()
        .then_some(p)
}

fn bench_write(c: &mut Criterion) {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    if fresh(&dir).is_none() {
        eprintln!("skipping write bench: qemu-img not available");
        return;
    }
    let opts = OpenOptions {
        writable: true,
        ..OpenOptions::default()
    };
    let mut g = c.benchmark_group("write");
    for (name, size, random) in [
        ("alloc-4k-random", 4096u64, true),
        ("alloc-64k-random", 65536, true),
        ("seq-4k", 4096, false),
    ] {
        g.throughput(Throughput::Elements(N));
        g.bench_function(name, |b| {
            b.iter_batched(
                || {
                    let p = fresh(&dir).expect("qemu-img create");
                    open_image(p.to_str().unwrap(), &opts).expect("open")
                },
                |img| {
                    let buf = vec![0x5au8; size as usize];
                    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
                    for i in 0..N {
                        let off = if random {
                            x ^= x << 13;
                            x ^= x >> 7;
                            x ^= x << 17;
                            (x % 65536) * 65536
                        } else {
                            i * size
                        };
                        img.chain.write(off, &buf, false).expect("write");
                    }
                    img.chain.flush().expect("flush");
                    img
                },
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10);
    targets = bench_write
}
criterion_main!(benches);
