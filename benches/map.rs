//! Map / chain-resolve throughput on a fragmented qcow2 image (criterion).
//!
//! The image (1 GiB, 64 KiB clusters) is built once with qemu-img + qemu-io: 8192 clusters
//! written in a scrambled order, so the L2 tables point all over the file and no two neighbouring
//! guest clusters are contiguous on the host. Compare with `qemu-img map` on the same image:
//! `benches/README.md` has the commands and the figures.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use qnbd::open::{open_image, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

fn fragmented_image() -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let img = dir.join("bench-fragmented.qcow2");
    if img.exists() {
        return Some(img);
    }
    let tmp = dir.join("bench-fragmented.qcow2.tmp");
    let ok = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-o", "cluster_size=64k"])
        .arg(&tmp)
        .arg("1G")
        .status()
        .ok()?
        .success();
    if !ok {
        return None;
    }
    // scrambled order: cluster i*4099 mod 16384, half of the disk
    let mut cmds = String::new();
    for i in 0..8192u64 {
        let c = (i * 4099) % 16384;
        cmds.push_str(&format!("write -q -P {} {} 4k\n", i % 251, c * 65536));
    }
    let mut child = Command::new("qemu-io")
        .args(["-f", "qcow2"])
        .arg(&tmp)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .ok()?;
    child.stdin.take()?.write_all(cmds.as_bytes()).ok()?;
    if !child.wait().ok()?.success() {
        return None;
    }
    std::fs::rename(&tmp, &img).ok()?;
    Some(img)
}

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
