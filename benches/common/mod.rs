//! Shared by the benches: the fragmented 1 GiB qcow2 they measure.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// 1 GiB qcow2, 64 KiB clusters, 8192 clusters written with qemu-io in a scrambled order (the L2
/// tables point all over the file; no two neighbouring guest clusters are contiguous on the
/// host). Built once into the target's tmp directory; `None` without qemu-img / qemu-io.
pub fn fragmented_image() -> Option<PathBuf> {
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
