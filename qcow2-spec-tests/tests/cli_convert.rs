//! `qnbd convert -O qcow2`: the output passes `qemu-img check`, `qemu-img compare` calls it
//! identical to the source, `-c` clusters are compressed and readable by QEMU, `-B` writes only
//! what the source's top image holds.

use qcow2_spec_tests::{qnbd_bin, require_tools};
use std::path::Path;
use std::process::Command;

fn sh(script: &str, dir: &Path) -> (i32, String) {
    let o = Command::new("sh")
        .arg("-ec")
        .arg(script)
        .current_dir(dir)
        .output()
        .unwrap();
    (
        o.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

#[test]
fn convert_to_qcow2_is_valid_and_identical() {
    if !require_tools("convert", &["qemu-img", "qemu-io"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // top.qcow2 over base.qcow2; rnd.raw random (incompressible); mixed.qcow2 (4 KiB
    // clusters): rnd.raw's data in its first 3000000 bytes, a 64 KiB pattern over its start, a
    // compressed cluster at 3 MiB, the rest unallocated
    let (rc, out) = sh(
        "qemu-img create -q -f qcow2 base.qcow2 8M
         qemu-io -f qcow2 -c 'write -P 1 0 2M' -c 'write -P 2 6M 1M' base.qcow2 >/dev/null
         qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2
         qemu-io -f qcow2 -c 'write -P 3 1M 64k' -c 'write -z 6M 64k' -c 'write -P 4 7M 3000' top.qcow2 >/dev/null
         head -c 3000000 /dev/urandom > rnd.raw
         qemu-img create -q -f qcow2 -o cluster_size=4k mixed.qcow2 4M
         qemu-img convert -n -f raw --target-image-opts rnd.raw driver=qcow2,file.filename=mixed.qcow2
         qemu-io -f qcow2 -c 'write -P 9 0 64k' -c 'write -c -P 8 3M 64k' mixed.qcow2 >/dev/null",
        d,
    );
    // every setup command must succeed (`sh -e`)
    assert_eq!(rc, 0, "setup failed: {out}");
    let q = qnbd_bin().display().to_string();
    for (src, args) in [
        ("top.qcow2", ""),
        ("top.qcow2", "-o compat=0.10"),
        ("top.qcow2", "-o cluster_size=512,refcount_bits=64"),
        ("top.qcow2", "-o extended_l2=on"),
        ("top.qcow2", "-c"),
        ("top.qcow2", "-c -o compression_type=zstd,cluster_size=4k"),
        ("mixed.qcow2", "-c -o cluster_size=2M"),
        ("rnd.raw", "-c"),
        ("rnd.raw", "-o preallocation=metadata"),
    ] {
        let script = format!(
            "rm -f out.qcow2
             {q} convert -p {args} -O qcow2 {src} out.qcow2 >/dev/null
             qemu-img check out.qcow2
             qemu-img compare {src} out.qcow2"
        );
        let (rc, out) = sh(&script, d);
        assert_eq!(rc, 0, "{src} {args}: {out}");
        if args.contains("-c") && src != "rnd.raw" {
            let (rc, map) = sh("qemu-img map --output=json out.qcow2", d);
            assert_eq!(rc, 0);
            assert!(
                map.contains("\"compressed\": true"),
                "{src} {args}: no compressed cluster in {map}"
            );
        }
    }
    // -B: only the top image's data is copied; the rest shows the new backing file
    let script = format!(
        "rm -f out.qcow2
         {q} convert -O qcow2 -B base.qcow2 -F qcow2 top.qcow2 out.qcow2
         qemu-img check out.qcow2
         qemu-img compare top.qcow2 out.qcow2
         qemu-img info --output=json out.qcow2 | grep -q '\"backing-filename\": \"base.qcow2\"'"
    );
    let (rc, out) = sh(&script, d);
    assert_eq!(rc, 0, "-B: {out}");
    let (rc, map) = sh("qemu-img map --output=json out.qcow2", d);
    assert_eq!(rc, 0);
    assert!(
        map.contains("\"depth\": 1"),
        "-B copied backing data: {map}"
    );
    // raw output stays byte-identical to qemu-img's
    let (rc, out) = sh(
        &format!(
            "{q} convert -O raw top.qcow2 a.raw && qemu-img convert -O raw top.qcow2 b.raw && cmp a.raw b.raw"
        ),
        d,
    );
    assert_eq!(rc, 0, "{out}");
    // refusals
    let (rc, out) = sh(&format!("{q} convert -c -O raw top.qcow2 x.raw"), d);
    assert_eq!(rc, 1, "{out}");
    assert!(out.contains("Compression not supported"), "{out}");
}
