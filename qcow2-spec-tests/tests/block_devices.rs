//! Block devices as images and targets (loop devices over sparse files), side by side with
//! qemu-img and qemu-nbd: size from the device, reads and writes, zeroing and discard through
//! `serve`, `convert -n` onto a device, and `/dev/null` as a convert target.

use qcow2_spec_tests::{qnbd_bin, require_tools, scratch_dir, skip, tool, tool_ok, NbdServer};
use std::path::{Path, PathBuf};

/// A loop device over a file, detached on drop.
struct Loop {
    dev: PathBuf,
}

impl Loop {
    fn new(backing: &Path) -> Option<Loop> {
        let r = tool(
            "losetup",
            Path::new("."),
            ["--find".as_ref(), "--show".as_ref(), backing.as_os_str()],
        );
        if !r.success() {
            return None;
        }
        Some(Loop {
            dev: PathBuf::from(r.stdout_text().trim()),
        })
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = tool(
            "losetup",
            Path::new("."),
            ["-d".as_ref(), self.dev.as_os_str()],
        );
    }
}

/// Two loop devices (QEMU's and ours) over 8 MiB sparse files, or a skip with the reason.
fn devices(dir: &Path) -> Option<(Loop, Loop)> {
    if !require_tools(
        "block devices",
        &["qemu-img", "qemu-io", "qemu-nbd", "losetup", "nbdinfo"],
    ) {
        return None;
    }
    let mut loops = Vec::new();
    for n in ["q.img", "o.img"] {
        let f = dir.join(n);
        std::fs::File::create(&f).unwrap().set_len(8 << 20).unwrap();
        match Loop::new(&f) {
            Some(l) => loops.push(l),
            None => {
                skip(
                    "block devices",
                    "no loop device (losetup failed: not root, or no loop driver)",
                );
                return None;
            }
        }
    }
    let o = loops.pop()?;
    let q = loops.pop()?;
    Some((q, o))
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn a_loop_device_is_served_and_converted_onto_like_qemu_does() {
    let d = scratch_dir();
    let dir = d.path();
    let Some((qdev, odev)) = devices(dir) else {
        return;
    };
    let qnbd = qnbd_bin().to_str().unwrap().to_string();
    let mut problems = Vec::new();
    // info: the size comes from the device
    {
        let (a, b) = (&qdev, &odev);
        let qi = tool(
            "qemu-img",
            dir,
            ["info", "--output=json", "-f", "raw", s(&a.dev)],
        );
        let oi = tool(
            &qnbd,
            dir,
            ["info", "--output=json", "-f", "raw", s(&b.dev)],
        );
        let size = |r: &qcow2_spec_tests::Run| {
            serde_json::from_slice::<serde_json::Value>(&r.stdout)
                .ok()
                .map(|v| v["virtual-size"].clone())
        };
        if size(&qi) != size(&oi) || size(&oi) != Some((8u64 << 20).into()) {
            problems.push(format!("info: {} / {}", qi.outcome(), oi.outcome()));
        }
    }
    // convert -n onto each device: the device then holds the image's guest bytes
    tool_ok(
        "qemu-img",
        dir,
        ["create", "-q", "-f", "qcow2", "src.qcow2", "8M"],
    );
    tool_ok(
        "qemu-io",
        dir,
        [
            "-f",
            "qcow2",
            "-c",
            "write -P 0x5a 1M 1M",
            "-c",
            "write -z 3M 1M",
            "src.qcow2",
        ],
    );
    // dirty both devices first, so zero ranges must really be written
    for l in [&qdev, &odev] {
        tool_ok(
            "qemu-io",
            dir,
            ["-f", "raw", "-c", "write -P 0xee 0 8M", s(&l.dev)],
        );
    }
    let qc = tool(
        "qemu-img",
        dir,
        ["convert", "-n", "-O", "raw", "src.qcow2", s(&qdev.dev)],
    );
    let oc = tool(
        &qnbd,
        dir,
        ["convert", "-n", "-O", "raw", "src.qcow2", s(&odev.dev)],
    );
    if qc.code != oc.code {
        problems.push(format!("convert -n: {} / {}", qc.outcome(), oc.outcome()));
    }
    let bytes = |p: &Path| std::fs::read(p).unwrap();
    let cmp = tool(
        "qemu-img",
        dir,
        [
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "src.qcow2",
            s(&odev.dev),
        ],
    );
    if !cmp.success() {
        problems.push(format!(
            "after convert -n, qemu-img compare: {}",
            cmp.outcome()
        ));
    }
    if bytes(&qdev.dev) != bytes(&odev.dev) {
        problems.push("after convert -n the two devices differ".into());
    }
    // served writable: writes, zeroes and discards land on the device
    let writes = [
        "write -P 0x11 0 64k",
        "write -z 1M 128k",
        "discard 2M 64k",
        "write -P 0x22 4095k 2k",
        "flush",
    ];
    for (prog, dev) in [("qemu-nbd", &qdev), ("qnbd", &odev)] {
        let args = ["-f", "raw", "--discard=unmap", s(&dev.dev)];
        let srv = if prog == "qnbd" {
            NbdServer::qnbd(dir, "o", &args)
        } else {
            NbdServer::qemu_nbd(dir, "q", &args)
        };
        let info = tool("nbdinfo", dir, ["--json", "--no-content", &srv.uri]);
        let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap_or_default();
        if v["exports"][0]["export-size"] != serde_json::json!(8u64 << 20) {
            problems.push(format!("{prog}: nbdinfo {}", info.outcome()));
        }
        for w in writes {
            let r = tool("qemu-io", dir, ["-f", "raw", "-c", w, &srv.uri]);
            if !r.success() {
                problems.push(format!("{prog}: qemu-io {w}: {}", r.outcome()));
            }
        }
        srv.stop();
    }
    // a discarded range may read back as anything; everything else must agree
    let (a, b) = (bytes(&qdev.dev), bytes(&odev.dev));
    let outside = |v: &[u8]| [&v[..2 << 20], &v[(2 << 20) + (64 << 10)..]].concat();
    if outside(&a) != outside(&b) {
        problems.push("after serving, the two devices differ outside the discarded range".into());
    }
    // /dev/null as a convert target
    let qn = tool(
        "qemu-img",
        dir,
        ["convert", "-O", "raw", "src.qcow2", "/dev/null"],
    );
    let on = tool(
        &qnbd,
        dir,
        ["convert", "-O", "raw", "src.qcow2", "/dev/null"],
    );
    if qn.code != on.code {
        problems.push(format!(
            "convert to /dev/null: {} / {}",
            qn.outcome(),
            on.outcome()
        ));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
