//! Property tests of the write path: random sequences of write / write-zeroes (both modes) /
//! discard / flush / resize on images of every layout that matters, against a shadow raw file.
//! After each sequence the image is closed and `qemu-img check` must report no errors and no
//! leaks, and `qemu-img compare` must call it identical to the shadow. Both I/O engines run.

use qnbd::block::ZeroMode;
use qnbd::io::Engine;
use qnbd::open::{open_image, OpenOptions};
use std::path::Path;
use std::process::Command;

/// The oracle tool, or a printed skip (a failure under `CI=true`).
fn have(tool: &str) -> bool {
    qcow2_spec_tests::require_tools(tool, &[tool])
}

/// xorshift64*: deterministic, seedable.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

#[derive(Debug, Clone)]
struct Layout {
    name: &'static str,
    create_opts: String,
    cluster: u64,
    v3: bool,
    ext_l2: bool,
    backing: bool,
    data_file_raw: bool,
    snapshot: bool,
    /// L2 cache of two tables (evictions on every step; bad-inputs 79).
    tiny_cache: bool,
}

fn run(cmd: &mut Command) -> std::process::Output {
    cmd.output().expect("spawn")
}

fn qemu_img(args: &[&str]) -> std::process::Output {
    run(Command::new("qemu-img").args(args))
}

fn qemu_io(img: &Path, fmt: &str, cmds: &[String]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", fmt]);
    for x in cmds {
        c.args(["-c", x]);
    }
    c.arg(img);
    let o = run(&mut c);
    assert!(
        o.status.success(),
        "qemu-io failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Which whole clusters of [off, off+len) a discard releases (partial clusters stay).
fn discarded_clusters(off: u64, len: u64, size: u64, cs: u64) -> (u64, u64) {
    let first = off.div_ceil(cs) * cs;
    let end = if off + len == size {
        size.div_ceil(cs) * cs
    } else {
        (off + len) / cs * cs
    };
    (first, end.max(first))
}

fn one_sequence(l: &Layout, engine: Engine, seed: u64, dir: &Path) {
    let size0: u64 = (4u64 << 20).max(12 * l.cluster);
    let img = dir.join(format!("{}-{seed}.qcow2", l.name));
    let base = dir.join(format!("{}-{seed}-base.raw", l.name));
    let mut shadow = vec![0u8; size0 as usize];
    let mut base_data = Vec::new();
    let img_s = img.to_str().unwrap().to_string();
    if l.backing {
        // a raw base with a pattern in every 3rd 4k block
        base_data = vec![0u8; size0 as usize];
        for (i, b) in base_data.chunks_mut(4096).enumerate() {
            if i % 3 == 0 {
                b.fill((i % 251) as u8 + 1);
            }
        }
        std::fs::write(&base, &base_data).unwrap();
        shadow.copy_from_slice(&base_data);
        let o = qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &l.create_opts,
            "-b",
            base.to_str().unwrap(),
            "-F",
            "raw",
            &img_s,
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    } else {
        let o = qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &l.create_opts,
            &img_s,
            &size0.to_string(),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        // some QEMU-written content to start from (incl. a compressed cluster when possible)
        let mut cmds = vec![
            format!("write -P 0x11 0 {}", l.cluster),
            format!("write -P 0x22 {} 3000", 5 * l.cluster + 100),
        ];
        if !l.data_file_raw && !l.create_opts.contains("data_file") && l.cluster >= 4096 {
            cmds.push(format!("write -c -P 0x33 {} {}", 8 * l.cluster, l.cluster));
        }
        qemu_io(&img, "qcow2", &cmds);
        shadow[..l.cluster as usize].fill(0x11);
        let o = (5 * l.cluster + 100) as usize;
        shadow[o..o + 3000].fill(0x22);
        if cmds.len() == 3 {
            let o = (8 * l.cluster) as usize;
            shadow[o..o + l.cluster as usize].fill(0x33);
        }
    }
    let snap_content = if l.snapshot {
        let o = qemu_img(&["snapshot", "-c", "s1", &img_s]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        Some(shadow.clone())
    } else {
        None
    };
    let mut opts = OpenOptions {
        engine,
        writable: true,
        ..OpenOptions::default()
    };
    if l.tiny_cache {
        opts.qcow2.l2_cache_size = Some(2 * l.cluster);
    }
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut size = size0;
    let mut log = Vec::new();
    {
        let mut image = open_image(&img_s, &opts).expect("open rw");
        for _ in 0..60 {
            let op = rng.below(100);
            let span = l.cluster * 3;
            let off = rng.below(size);
            let len = (1 + rng.below(span)).min(size - off);
            match op {
                0..=44 => {
                    let pat = (rng.next() % 255) as u8 + 1;
                    let data = vec![pat; len as usize];
                    log.push(format!("write {off:#x}+{len:#x} {pat:#x}"));
                    image
                        .chain
                        .write(off, &data, rng.below(8) == 0)
                        .expect("write");
                    shadow[off as usize..(off + len) as usize].fill(pat);
                }
                45..=59 => {
                    let mode = if rng.below(2) == 0 {
                        ZeroMode::MayUnmap
                    } else {
                        ZeroMode::KeepAllocated
                    };
                    log.push(format!("zero {off:#x}+{len:#x} {mode:?}"));
                    image
                        .chain
                        .write_zeroes(off, len, mode, false)
                        .expect("write_zeroes");
                    shadow[off as usize..(off + len) as usize].fill(0);
                }
                60..=74 => {
                    log.push(format!("discard {off:#x}+{len:#x}"));
                    image.chain.discard(off, len, false).expect("discard");
                    if !l.data_file_raw {
                        let (a, b) = discarded_clusters(off, len, size, l.cluster);
                        let b = b.min(size);
                        for p in a..b {
                            // v2 with a backing file: the backing data shows again
                            shadow[p as usize] = if !l.v3 && l.backing && !l.ext_l2 {
                                base_data.get(p as usize).copied().unwrap_or(0)
                            } else {
                                0
                            };
                        }
                    }
                }
                75..=89 => {
                    log.push("flush".into());
                    image.chain.flush().expect("flush");
                }
                _ => {
                    // verify a random range through our own read path
                    let mut buf = vec![0u8; len as usize];
                    image.chain.read(off, &mut buf).expect("read");
                    assert!(
                        buf == shadow[off as usize..(off + len) as usize],
                        "{}: read mismatch at {off:#x}+{len:#x} after {log:?}",
                        l.name
                    );
                }
            }
            if rng.below(40) == 0 && !l.backing && !l.data_file_raw {
                let grow = l.cluster * (1 + rng.below(64));
                let q = image.layers[0].qcow2.clone().expect("qcow2");
                log.push(format!("resize +{grow:#x}"));
                q.resize(size + grow).expect("resize");
                size += grow;
                shadow.resize(size as usize, 0);
                // the old open holds the image's locks until it is closed
                drop(q);
                drop(image);
                image = open_image(&img_s, &opts).expect("reopen");
            }
        }
    }
    let shadow_path = dir.join(format!("{}-{seed}.shadow", l.name));
    std::fs::write(&shadow_path, &shadow).unwrap();
    verify(l, engine, seed, &img_s, &shadow_path, &log);
    if let Some(snap) = snap_content {
        let out = dir.join(format!("{}-{seed}.snap.raw", l.name));
        let o = qemu_img(&[
            "convert",
            "-l",
            "snapshot.name=s1",
            "-O",
            "raw",
            &img_s,
            out.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let got = std::fs::read(&out).unwrap();
        assert!(
            got[..snap.len()] == snap[..],
            "{}: snapshot s1 content changed",
            l.name
        );
    }
    // the other direction: QEMU writes after us, then we read and write again
    let a = l.cluster + 777;
    let b = (size / 2) & !511;
    qemu_io(
        &img,
        "qcow2",
        &[
            format!("write -P 0x5a {a} 4096"),
            format!("write -z {b} {}", 2 * l.cluster),
        ],
    );
    shadow[a as usize..a as usize + 4096].fill(0x5a);
    shadow[b as usize..(b + 2 * l.cluster) as usize].fill(0);
    {
        let image = open_image(&img_s, &opts).expect("reopen after qemu");
        let mut all = vec![0u8; size as usize];
        image.chain.read(0, &mut all).expect("read after qemu");
        assert!(
            all == shadow,
            "{}: our read differs after QEMU wrote",
            l.name
        );
        let c = 3 * l.cluster + 5;
        image
            .chain
            .write(c, &[0xc3; 10000], false)
            .expect("write after qemu");
        shadow[c as usize..c as usize + 10000].fill(0xc3);
    }
    std::fs::write(&shadow_path, &shadow).unwrap();
    verify(
        l,
        engine,
        seed,
        &img_s,
        &shadow_path,
        &["after qemu".to_string()],
    );
}

fn verify(l: &Layout, engine: Engine, seed: u64, img_s: &str, shadow_path: &Path, log: &[String]) {
    let o = qemu_img(&["check", "--output=json", img_s]);
    let js = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        o.status.success(),
        "{} engine {engine:?} seed {seed}: qemu-img check rc {:?}\n{js}\n{}\nops: {log:?}",
        l.name,
        o.status.code(),
        String::from_utf8_lossy(&o.stderr)
    );
    let o = qemu_img(&[
        "compare",
        "-f",
        "qcow2",
        "-F",
        "raw",
        img_s,
        shadow_path.to_str().unwrap(),
    ]);
    assert!(
        o.status.success(),
        "{} engine {engine:?} seed {seed}: qemu-img compare: {}{}\nops: {log:?}",
        l.name,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

fn layouts() -> Vec<Layout> {
    let mk = |name, opts: &str, cluster, v3, ext_l2, backing, raw| Layout {
        name,
        create_opts: opts.to_string(),
        cluster,
        v3,
        ext_l2,
        backing,
        data_file_raw: raw,
        snapshot: false,
        tiny_cache: false,
    };
    let snap = |name, opts: &str, cluster, ext_l2| Layout {
        snapshot: true,
        ..mk(name, opts, cluster, true, ext_l2, false, false)
    };
    vec![
        mk(
            "v3-64k",
            "cluster_size=64k",
            65536,
            true,
            false,
            false,
            false,
        ),
        mk(
            "v3-512-rc64",
            "cluster_size=512,refcount_bits=64",
            512,
            true,
            false,
            false,
            false,
        ),
        mk(
            "v3-512-rc1",
            "cluster_size=512,refcount_bits=1",
            512,
            true,
            false,
            false,
            false,
        ),
        mk(
            "v3-4k-rc2",
            "cluster_size=4k,refcount_bits=2",
            4096,
            true,
            false,
            false,
            false,
        ),
        mk(
            "v3-2M",
            "cluster_size=2M",
            2 << 20,
            true,
            false,
            false,
            false,
        ),
        mk("v2-64k", "compat=0.10", 65536, false, false, false, false),
        mk(
            "v2-4k-backed",
            "compat=0.10,cluster_size=4k",
            4096,
            false,
            false,
            true,
            false,
        ),
        mk(
            "v3-64k-backed",
            "cluster_size=64k",
            65536,
            true,
            false,
            true,
            false,
        ),
        mk(
            "v3-1k-backed-rc8",
            "cluster_size=1k,refcount_bits=8",
            1024,
            true,
            false,
            true,
            false,
        ),
        mk(
            "extl2-64k",
            "extended_l2=on",
            65536,
            true,
            true,
            false,
            false,
        ),
        mk(
            "extl2-32k-backed",
            "extended_l2=on,cluster_size=32k",
            32768,
            true,
            true,
            true,
            false,
        ),
        mk(
            "zstd-16k",
            "compression_type=zstd,cluster_size=16k",
            16384,
            true,
            false,
            false,
            false,
        ),
        mk(
            "lazy-64k",
            "lazy_refcounts=on",
            65536,
            true,
            false,
            false,
            false,
        ),
        snap("snapshot-64k", "cluster_size=64k", 65536, false),
        snap(
            "snapshot-512-rc4",
            "cluster_size=512,refcount_bits=4",
            512,
            false,
        ),
        snap("snapshot-extl2", "extended_l2=on", 65536, true),
        Layout {
            tiny_cache: true,
            ..mk(
                "tiny-cache-512-rc64",
                "cluster_size=512,refcount_bits=64",
                512,
                true,
                false,
                true,
                false,
            )
        },
    ]
}

#[test]
fn random_sequences_stay_valid_and_match_the_shadow() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut engines = vec![Engine::Sync];
    if qnbd::open::uring_available() {
        engines.push(Engine::Uring);
    }
    for l in layouts() {
        for (i, &engine) in engines.iter().enumerate() {
            for seed in 1..=2u64 {
                one_sequence(&l, engine, seed * 10 + i as u64, dir.path());
            }
        }
    }
}

#[test]
fn external_data_file_images_stay_valid() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (name, raw) in [("datafile", false), ("datafile-raw", true)] {
        let data = dir.path().join(format!("{name}.data"));
        let l = Layout {
            name: if raw { "datafile-raw" } else { "datafile" },
            create_opts: format!(
                "data_file={},data_file_raw={}",
                data.display(),
                if raw { "on" } else { "off" }
            ),
            cluster: 65536,
            v3: true,
            ext_l2: false,
            backing: false,
            data_file_raw: raw,
            snapshot: false,
            tiny_cache: false,
        };
        for seed in 1..=2 {
            one_sequence(&l, Engine::Sync, seed, dir.path());
        }
    }
}
