//! `qnbd rebase -u` against `qemu-img rebase -u`: on copies of the same images (made by
//! qemu-img: an overlay over qcow2, over raw, v2, with a data-file-less v3 feature table, no
//! backing at all), the new backing name and format, removal with `-b ""` and with no `-b`,
//! and the refusals (no `-F`, a name over 1023 bytes, a raw image, a missing image) give the
//! same output, message and exit code, and leave files that are byte for byte qemu-img's.
//! Run as `qnbd rebase` and through a `qemu-img` link. Safe mode is refused and changes nothing.

use qcow2_spec_tests::{qemu_words, qnbd_bin, require_tools, scratch_dir, sha256_file, tool, Run};
use std::path::Path;

fn sh(dir: &Path, cmd: &str) {
    let r = tool("sh", dir, ["-c", cmd]);
    assert!(r.success(), "{cmd}: {}", r.outcome());
}

fn answer(r: &Run, copy: &str) -> (String, String, Option<i32>) {
    (
        r.stdout_text(),
        qemu_words(&r.stderr).replace(copy, "IMG"),
        r.code,
    )
}

#[test]
fn rebase_unsafe_is_qemu_img_s() {
    if !require_tools("rebase", &["qemu-img", "qemu-io"]) {
        return;
    }
    let tmp = scratch_dir();
    let d = tmp.path();
    for cmd in [
        "qemu-img create -q -f qcow2 base.qcow2 16M",
        "qemu-img create -q -f qcow2 base2.qcow2 16M",
        "qemu-img create -q -f raw base.raw 16M",
        "qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2 16M",
        "qemu-io -c 'write -P 7 1M 64k' top.qcow2",
        "qemu-img create -q -f qcow2 -b base.raw -F raw rawtop.qcow2 16M",
        "qemu-img create -q -f qcow2 -o compat=0.10 -b base.qcow2 -F qcow2 v2.qcow2 16M",
        "qemu-img create -q -f qcow2 -o cluster_size=512 -b base.qcow2 -F qcow2 small.qcow2 16M",
        "qemu-img create -q -f qcow2 alone.qcow2 16M",
        "qemu-img create -q -f raw plain.raw 16M",
    ] {
        sh(d, cmd);
    }
    let bin = d.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::os::unix::fs::symlink(qnbd_bin(), bin.join("qemu-img")).unwrap();
    let link = bin.join("qemu-img");
    let long = "n".repeat(1024);
    let fits_in_512 = "m".repeat(600);
    let images = [
        "top.qcow2",
        "rawtop.qcow2",
        "v2.qcow2",
        "small.qcow2",
        "alone.qcow2",
    ];
    let mut cases: Vec<(String, Vec<String>)> = Vec::new();
    let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    for img in images {
        for args in [
            v(&["-u", "-b", "base2.qcow2", "-F", "qcow2"]),
            v(&["-u", "-b", "base.raw", "-F", "raw"]),
            v(&["-u", "-b", "../elsewhere/x.img", "-F", "vmdk"]),
            v(&["-u", "-b", ""]),
            v(&["-u"]),
            v(&["-u", "-b", "base2.qcow2"]),
            v(&["-u", "-b", &long, "-F", "raw"]),
            v(&["-u", "-b", &fits_in_512, "-F", "raw"]),
            v(&["-u", "-q", "-p", "-b", "base2.qcow2", "-F", "qcow2"]),
            v(&["-u", "-f", "qcow2", "-b", "base2.qcow2", "-F", "qcow2"]),
        ] {
            cases.push((img.to_string(), args));
        }
    }
    cases.push((
        "plain.raw".into(),
        v(&["-u", "-f", "raw", "-b", "base.qcow2", "-F", "qcow2"]),
    ));
    let mut problems = Vec::new();
    for (img, args) in &cases {
        let run_on = |program: &str, copy: &str| {
            std::fs::copy(d.join(img), d.join(copy)).unwrap();
            let mut a = vec!["rebase".to_string()];
            a.extend(args.iter().cloned());
            a.push(copy.to_string());
            let r = tool(program, d, &a);
            (answer(&r, copy), sha256_file(&d.join(copy)).unwrap())
        };
        let (q, qsum) = run_on("qemu-img", "q.img");
        for (who, p) in [("qnbd", qnbd_bin()), ("link", link.as_path())] {
            let (o, osum) = run_on(p.to_str().unwrap(), "o.img");
            if o != q {
                problems.push(format!(
                    "{who} {img} {args:?}:\n qemu-img {q:?}\n ours     {o:?}"
                ));
            } else if osum != qsum {
                problems.push(format!("{who} {img} {args:?}: files differ"));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));

    // safe mode is refused, and the image is unchanged
    let before = sha256_file(&d.join("top.qcow2")).unwrap();
    let r = tool(
        qnbd_bin().to_str().unwrap(),
        d,
        ["rebase", "-b", "base2.qcow2", "-F", "qcow2", "top.qcow2"],
    );
    assert_eq!(r.code, Some(1), "{}", r.outcome());
    assert!(
        r.stderr.contains("not supported by this version"),
        "{}",
        r.stderr
    );
    assert_eq!(sha256_file(&d.join("top.qcow2")).unwrap(), before);
}
