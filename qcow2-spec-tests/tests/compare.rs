//! `qnbd compare` against `qemu-img compare` on pairs of images built at test time with
//! qemu-img and qemu-io: for every pair and command line, `qnbd compare ARGS` and qnbd invoked
//! through a `qemu-img` symlink (`qemu-img compare ARGS`) print what `qemu-img compare ARGS`
//! prints on stdout (byte for byte, progress lines included), the same message on stderr after
//! the program-name prefix, and end with the same exit code (0 identical, 1 different, 2 an
//! image could not be opened). Each case also pins what qemu-img itself answers, so a case
//! that stopped testing what it says fails loudly.
//!
//! Also: `-U` against an image qemu-nbd holds writable, and the lock refusal without it.

use qcow2_spec_tests::{
    qnbd, qnbd_bin, require_tools, scratch_dir, tool, tool_ok, IoEngine, NbdServer, Run,
};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const TOOLS: &[&str] = &["qemu-img", "qemu-io"];

/// `qemu-img ARGS` (split on blanks) in `dir`, which must succeed.
fn img(dir: &Path, args: &str) {
    tool_ok("qemu-img", dir, args.split_whitespace());
}

/// `qemu-io -f FMT -c CMD... FILE` in `dir`, which must succeed.
fn io(dir: &Path, fmt: &str, file: &str, cmds: &[&str]) {
    let mut a = vec!["-f", fmt];
    for c in cmds {
        a.extend(["-c", c]);
    }
    a.push(file);
    tool_ok("qemu-io", dir, a);
}

/// Overwrite one byte of a file in place.
fn poke(dir: &Path, file: &str, off: u64, byte: u8) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join(file))
        .unwrap();
    f.write_all_at(&[byte], off).unwrap();
}

/// A qcow2 image with data, a zero cluster, holes and a non-aligned tail of data: the base
/// most cases start from.
fn base_qcow2(dir: &Path, name: &str) {
    img(dir, &format!("create -q -f qcow2 {name} 8M"));
    io(
        dir,
        "qcow2",
        name,
        &[
            "write -P 0x11 0 1M",
            "write -z 1M 64k",
            "write -P 0x22 3M 200k",
            "write -P 0x33 7M 4k",
        ],
    );
}

struct Case {
    name: &'static str,
    setup: fn(&Path),
    args: &'static [&'static str],
    /// What qemu-img must answer: its exit code and the start of its stdout (after progress).
    code: i32,
    stdout: &'static str,
    /// A getopt refusal: qnbd (by its own name) words it as clap does, so only the exit code
    /// of `qnbd compare` is compared; the `qemu-img` link must match fully.
    getopt: bool,
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "qcow2 and its raw conversion are identical",
            setup: |d| {
                base_qcow2(d, "a.qcow2");
                img(d, "convert -O raw a.qcow2 b.raw");
            },
            args: &["a.qcow2", "b.raw"],
            code: 0,
            stdout: "Images are identical.\n",
            getopt: false,
        },
        Case {
            name: "formats given with -f and -F",
            setup: |d| {
                base_qcow2(d, "a.qcow2");
                img(d, "convert -O raw a.qcow2 b.raw");
            },
            args: &["-f", "qcow2", "-F", "raw", "a.qcow2", "b.raw"],
            code: 0,
            stdout: "Images are identical.\n",
            getopt: false,
        },
        Case {
            name: "one byte different inside a data cluster",
            setup: |d| {
                base_qcow2(d, "a.qcow2");
                img(d, "convert -O raw a.qcow2 b.raw");
                poke(d, "b.raw", (3 << 20) + 70_000, 0x99);
            },
            args: &["a.qcow2", "b.raw"],
            code: 1,
            stdout: "Content mismatch at offset 3215360!\n",
            getopt: false,
        },
        Case {
            name: "one byte different at offset 0",
            setup: |d| {
                base_qcow2(d, "a.qcow2");
                img(d, "convert -O raw a.qcow2 b.raw");
                poke(d, "b.raw", 0, 0x12);
            },
            args: &["b.raw", "a.qcow2"],
            code: 1,
            stdout: "Content mismatch at offset 0!\n",
            getopt: false,
        },
        Case {
            name: "the last byte differs (written into a hole of the raw file)",
            setup: |d| {
                base_qcow2(d, "a.qcow2");
                img(d, "convert -O raw a.qcow2 b.raw");
                poke(d, "b.raw", (8 << 20) - 1, 1);
            },
            args: &["a.qcow2", "b.raw"],
            code: 1,
            stdout: "Content mismatch at offset 8388096!\n",
            getopt: false,
        },
        Case {
            name: "a byte different inside a compressed cluster",
            setup: |d| {
                base_qcow2(d, "a.qcow2");
                img(d, "convert -c -O qcow2 a.qcow2 c.qcow2");
                img(d, "convert -O raw a.qcow2 b.raw");
                poke(d, "b.raw", 65_536 * 5 + 1_234, 0x00);
            },
            args: &["c.qcow2", "b.raw"],
            code: 1,
            stdout: "Content mismatch at offset 328704!\n",
            getopt: false,
        },
        Case {
            name: "compressed qcow2 and its raw original are identical",
            setup: |d| {
                base_qcow2(d, "a.qcow2");
                img(d, "convert -c -O qcow2 a.qcow2 c.qcow2");
                img(d, "convert -O raw a.qcow2 b.raw");
            },
            args: &["b.raw", "c.qcow2"],
            code: 0,
            stdout: "Images are identical.\n",
            getopt: false,
        },
        Case {
            name: "a backing chain and its flattened copy are identical",
            setup: |d| {
                base_qcow2(d, "base.qcow2");
                img(d, "create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2");
                io(
                    d,
                    "qcow2",
                    "top.qcow2",
                    &["write -P 0x44 512k 128k", "write -z 3M 64k"],
                );
                img(d, "convert -O raw top.qcow2 flat.raw");
            },
            args: &["top.qcow2", "flat.raw"],
            code: 0,
            stdout: "Images are identical.\n",
            getopt: false,
        },
        Case {
            name: "a byte different in the backing file, under the overlay",
            setup: |d| {
                base_qcow2(d, "base.qcow2");
                img(d, "create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2");
                io(d, "qcow2", "top.qcow2", &["write -P 0x44 512k 128k"]);
                img(d, "convert -O raw top.qcow2 flat.raw");
                io(d, "qcow2", "base.qcow2", &["write -P 0x77 3200k 1"]);
            },
            args: &["flat.raw", "top.qcow2"],
            code: 1,
            stdout: "Content mismatch at offset 3276800!\n",
            getopt: false,
        },
        Case {
            name: "a zero cluster and an unallocated one read the same",
            setup: |d| {
                img(d, "create -q -f qcow2 z.qcow2 4M");
                io(d, "qcow2", "z.qcow2", &["write -z 0 1M"]);
                img(d, "create -q -f qcow2 u.qcow2 4M");
            },
            args: &["z.qcow2", "u.qcow2"],
            code: 0,
            stdout: "Images are identical.\n",
            getopt: false,
        },
        Case {
            name: "strict: a zero cluster and an unallocated one differ in block status",
            setup: |d| {
                img(d, "create -q -f qcow2 z.qcow2 4M");
                io(d, "qcow2", "z.qcow2", &["write -z 1M 1M"]);
                img(d, "create -q -f qcow2 u.qcow2 4M");
            },
            args: &["-s", "z.qcow2", "u.qcow2"],
            code: 1,
            stdout: "Strict mode: Offset 0 block status mismatch!\n",
            getopt: false,
        },
        Case {
            name: "strict: written zeros and unallocated (non-strict says identical)",
            setup: |d| {
                img(d, "create -q -f qcow2 w.qcow2 4M");
                io(d, "qcow2", "w.qcow2", &["write -P 0 2M 64k"]);
                img(d, "create -q -f qcow2 u.qcow2 4M");
            },
            args: &["--strict", "w.qcow2", "u.qcow2"],
            code: 1,
            stdout: "Strict mode: Offset 0 block status mismatch!\n",
            getopt: false,
        },
        Case {
            name: "written zeros and unallocated, not strict",
            setup: |d| {
                img(d, "create -q -f qcow2 w.qcow2 4M");
                io(d, "qcow2", "w.qcow2", &["write -P 0 2M 64k"]);
                img(d, "create -q -f qcow2 u.qcow2 4M");
            },
            args: &["w.qcow2", "u.qcow2"],
            code: 0,
            stdout: "Images are identical.\n",
            getopt: false,
        },
        Case {
            name: "strict: an image and its copy",
            setup: |d| {
                base_qcow2(d, "a.qcow2");
                std::fs::copy(d.join("a.qcow2"), d.join("copy.qcow2")).unwrap();
            },
            args: &["-s", "a.qcow2", "copy.qcow2"],
            code: 0,
            stdout: "Images are identical.\n",
            getopt: false,
        },
        Case {
            name: "strict: qcow2 against raw, where holes and unallocated clusters differ",
            setup: |d| {
                base_qcow2(d, "a.qcow2");
                img(d, "convert -O raw a.qcow2 b.raw");
            },
            args: &["-s", "a.qcow2", "b.raw"],
            code: 1,
            stdout: "Strict mode: Offset 1048576 block status mismatch!\n",
            getopt: false,
        },
        Case {
            name: "strict: the difference found in a chunk whose status matches",
            setup: |d| {
                base_qcow2(d, "a.qcow2");
                std::fs::copy(d.join("a.qcow2"), d.join("copy.qcow2")).unwrap();
                io(d, "qcow2", "copy.qcow2", &["write -P 0x5a 100000 1"]);
            },
            args: &["-s", "a.qcow2", "copy.qcow2"],
            code: 1,
            stdout: "Content mismatch at offset 99840!\n",
            getopt: false,
        },
        Case {
            name: "different sizes, the tail of the longer reads as zeros",
            setup: |d| {
                base_qcow2(d, "a.qcow2");
                img(d, "convert -O raw a.qcow2 b.raw");
                img(d, "resize -q -f raw b.raw 12M");
            },
            args: &["a.qcow2", "b.raw"],
            code: 0,
            stdout: "Warning: Image size mismatch!\nImages are identical.\n",
            getopt: false,
        },
        Case {
            name: "different sizes, data in the tail of the longer",
            setup: |d| {
                base_qcow2(d, "a.qcow2");
                img(d, "convert -O qcow2 a.qcow2 long.qcow2");
                img(d, "resize -q -f qcow2 long.qcow2 12M");
                io(
                    d,
                    "qcow2",
                    "long.qcow2",
                    &["write -z 8M 64k", "write -P 0x66 9000k 3"],
                );
            },
            args: &["long.qcow2", "a.qcow2"],
            code: 1,
            stdout: "Warning: Image size mismatch!\nContent mismatch at offset 9216000!\n",
            getopt: false,
        },
        Case {
            name: "different sizes, a difference before the shorter one ends",
            setup: |d| {
                base_qcow2(d, "a.qcow2");
                img(d, "convert -O qcow2 a.qcow2 long.qcow2");
                img(d, "resize -q -f qcow2 long.qcow2 12M");
                io(
                    d,
                    "qcow2",
                    "long.qcow2",
                    &["write -P 0x66 2M 1", "write -P 1 10M 1"],
                );
            },
            args: &["a.qcow2", "long.qcow2"],
            code: 1,
            stdout: "Content mismatch at offset 2097152!\n",
            getopt: false,
        },
        Case {
            name: "strict: different sizes",
            setup: |d| {
                base_qcow2(d, "a.qcow2");
                img(d, "convert -O raw a.qcow2 b.raw");
                img(d, "resize -q -f raw b.raw 12M");
            },
            args: &["-s", "a.qcow2", "b.raw"],
            code: 1,
            stdout: "Strict mode: Image size mismatch!\n",
            getopt: false,
        },
        Case {
            name: "an overlay larger than its backing file",
            setup: |d| {
                img(d, "create -q -f qcow2 small.qcow2 2M");
                io(d, "qcow2", "small.qcow2", &["write -P 0x21 1536k 512k"]);
                img(d, "create -q -f qcow2 -b small.qcow2 -F qcow2 big.qcow2 6M");
                io(d, "qcow2", "big.qcow2", &["write -P 0x31 5M 4k"]);
                img(d, "convert -O raw big.qcow2 big.raw");
                poke(d, "big.raw", (5 << 20) + 4096 + 3, 1);
            },
            args: &["big.qcow2", "big.raw"],
            code: 1,
            stdout: "Content mismatch at offset 5246976!\n",
            getopt: false,
        },
        Case {
            name: "quiet: nothing printed, the exit code tells",
            setup: |d| {
                base_qcow2(d, "a.qcow2");
                img(d, "convert -O raw a.qcow2 b.raw");
                poke(d, "b.raw", 12_345, 0x99);
            },
            args: &["-q", "a.qcow2", "b.raw"],
            code: 1,
            stdout: "",
            getopt: false,
        },
        Case {
            name: "progress, as qemu-img prints it",
            setup: |d| {
                img(d, "create -q -f qcow2 p.qcow2 100M");
                io(
                    d,
                    "qcow2",
                    "p.qcow2",
                    &["write -P 1 0 30M", "write -P 2 50M 10M", "write -z 70M 3M"],
                );
                img(d, "convert -O raw p.qcow2 p.raw");
            },
            args: &["-p", "p.qcow2", "p.raw"],
            code: 0,
            stdout: "    (0.00/100%)\r",
            getopt: false,
        },
        Case {
            name: "progress with different sizes and a mismatch",
            setup: |d| {
                img(d, "create -q -f qcow2 p.qcow2 40M");
                io(d, "qcow2", "p.qcow2", &["write -P 1 0 30M"]);
                img(d, "convert -O raw p.qcow2 p.raw");
                img(d, "resize -q -f raw p.raw 41M");
                poke(d, "p.raw", (40 << 20) + 100, 1);
            },
            args: &["-p", "p.qcow2", "p.raw"],
            code: 1,
            stdout: "    (0.00/100%)\r",
            getopt: false,
        },
        Case {
            name: "-T none and -U",
            setup: |d| {
                base_qcow2(d, "a.qcow2");
                img(d, "convert -O raw a.qcow2 b.raw");
            },
            args: &["-T", "none", "-U", "a.qcow2", "b.raw"],
            code: 0,
            stdout: "Images are identical.\n",
            getopt: false,
        },
        Case {
            name: "--image-opts",
            setup: |d| {
                base_qcow2(d, "a.qcow2");
                img(d, "convert -O raw a.qcow2 b.raw");
            },
            args: &[
                "--image-opts",
                "driver=qcow2,file.filename=a.qcow2",
                "driver=raw,file.driver=file,file.filename=b.raw",
            ],
            code: 0,
            stdout: "Images are identical.\n",
            getopt: false,
        },
        Case {
            name: "json: names",
            setup: |d| {
                base_qcow2(d, "a.qcow2");
                img(d, "convert -O raw a.qcow2 b.raw");
                poke(d, "b.raw", 777, 3);
            },
            args: &[
                "json:{\"driver\":\"qcow2\",\"file\":{\"driver\":\"file\",\"filename\":\"a.qcow2\"}}",
                "json:{\"driver\":\"raw\",\"file\":{\"driver\":\"file\",\"filename\":\"b.raw\"}}",
            ],
            code: 1,
            stdout: "Content mismatch at offset 512!\n",
            getopt: false,
        },
        Case {
            name: "a missing file",
            setup: |d| base_qcow2(d, "a.qcow2"),
            args: &["a.qcow2", "nosuch.qcow2"],
            code: 2,
            stdout: "",
            getopt: false,
        },
        Case {
            name: "a missing file with -p: the progress newline only",
            setup: |d| base_qcow2(d, "a.qcow2"),
            args: &["-p", "nosuch.qcow2", "a.qcow2"],
            code: 2,
            stdout: "\n",
            getopt: false,
        },
        Case {
            name: "a format that does not exist",
            setup: |d| base_qcow2(d, "a.qcow2"),
            args: &["-f", "nosuchfmt", "a.qcow2", "a.qcow2"],
            code: 2,
            stdout: "",
            getopt: false,
        },
        Case {
            name: "a raw file opened as qcow2",
            setup: |d| {
                base_qcow2(d, "a.qcow2");
                img(d, "convert -O raw a.qcow2 b.raw");
            },
            args: &["-F", "qcow2", "a.qcow2", "b.raw"],
            code: 2,
            stdout: "",
            getopt: false,
        },
        Case {
            name: "--image-opts with -f",
            setup: |d| base_qcow2(d, "a.qcow2"),
            args: &["--image-opts", "-f", "qcow2", "a.qcow2", "a.qcow2"],
            code: 2,
            stdout: "",
            getopt: false,
        },
        Case {
            name: "an invalid cache mode",
            setup: |d| base_qcow2(d, "a.qcow2"),
            args: &["-T", "sometimes", "a.qcow2", "a.qcow2"],
            code: 2,
            stdout: "",
            getopt: false,
        },
        Case {
            name: "an unknown object type",
            setup: |d| base_qcow2(d, "a.qcow2"),
            args: &["--object", "nosuchtype,id=o", "a.qcow2", "a.qcow2"],
            code: 2,
            stdout: "",
            getopt: false,
        },
        Case {
            name: "a secret object is accepted",
            setup: |d| base_qcow2(d, "a.qcow2"),
            args: &["--object", "secret,id=s0,data=x", "a.qcow2", "a.qcow2"],
            code: 0,
            stdout: "Images are identical.\n",
            getopt: false,
        },
        Case {
            name: "one file name",
            setup: |d| base_qcow2(d, "a.qcow2"),
            args: &["a.qcow2"],
            code: 1,
            stdout: "",
            getopt: true,
        },
        Case {
            name: "three file names",
            setup: |d| base_qcow2(d, "a.qcow2"),
            args: &["a.qcow2", "a.qcow2", "a.qcow2"],
            code: 1,
            stdout: "",
            getopt: true,
        },
        Case {
            name: "an unknown option",
            setup: |d| base_qcow2(d, "a.qcow2"),
            args: &["-x", "a.qcow2", "a.qcow2"],
            code: 1,
            stdout: "",
            getopt: true,
        },
        Case {
            name: "an option without its value",
            setup: |d| base_qcow2(d, "a.qcow2"),
            args: &["a.qcow2", "a.qcow2", "-f"],
            code: 1,
            stdout: "",
            getopt: true,
        },
    ]
}

/// A directory holding a `qemu-img` link to the qnbd binary.
fn link_dir(root: &Path) -> PathBuf {
    let bin = root.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::os::unix::fs::symlink(qnbd_bin(), bin.join("qemu-img")).unwrap();
    bin
}

/// stderr with each line's program prefix (`qemu-img: `, `qnbd: `) taken off.
/// The message without the program prefix and without qnbd's `hint:` lines (QEMU's words,
/// then what to do; by the name `qemu-img` there are none).
fn message(run: &Run) -> String {
    qcow2_spec_tests::qemu_words(&run.stderr)
}

/// `ours` ended as `qemu` did: exit code, stdout and (unless `code_only`) the message.
fn same(qemu: &Run, ours: &Run, code_only: bool) -> Result<(), String> {
    let mut errs = Vec::new();
    if ours.code != qemu.code {
        errs.push(format!("exit {:?}, qemu-img {:?}", ours.code, qemu.code));
    }
    if !code_only {
        if ours.stdout != qemu.stdout {
            errs.push(format!(
                "stdout {:?}, qemu-img {:?}",
                ours.stdout_text(),
                qemu.stdout_text()
            ));
        }
        if message(ours) != message(qemu) {
            errs.push(format!(
                "stderr {:?}, qemu-img {:?}",
                ours.stderr, qemu.stderr
            ));
        }
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(format!("{}: {}", ours.command, errs.join("; ")))
    }
}

#[test]
fn compare_matches_qemu_img() {
    if !require_tools("compare", TOOLS) {
        return;
    }
    let root = scratch_dir();
    let bin = link_dir(root.path());
    let link = bin.join("qemu-img");
    let cases = cases();
    assert!(cases.len() >= 15);
    let mut failures = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        let dir = root.path().join(format!("c{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        (c.setup)(&dir);
        let mut args = vec!["compare"];
        args.extend_from_slice(c.args);
        let qemu = tool("qemu-img", &dir, &args);
        // the case tests what it says
        if qemu.code != Some(c.code) || !qemu.stdout_text().starts_with(c.stdout) {
            failures.push(format!(
                "case '{}': qemu-img answered {:?} {:?} ({}), the case expects {} {:?}",
                c.name,
                qemu.code,
                qemu.stdout_text(),
                qemu.stderr.trim_end(),
                c.code,
                c.stdout
            ));
            continue;
        }
        for engine in IoEngine::ALL {
            let ours = qnbd(engine, &dir, &args);
            if let Err(e) = same(&qemu, &ours, c.getopt) {
                failures.push(format!("case '{}' ({engine:?}): {e}", c.name));
            }
        }
        let linked = tool(link.to_str().unwrap(), &dir, &args);
        if let Err(e) = same(&qemu, &linked, false) {
            failures.push(format!("case '{}' (as qemu-img): {e}", c.name));
        }
    }
    assert!(
        failures.is_empty(),
        "{} mismatch(es):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// An image qemu-nbd holds writable: without `-U` both refuse with QEMU's lock message and
/// exit 2; with `-U` both compare it.
#[test]
fn force_share_against_a_writer() {
    if !require_tools("compare -U", &["qemu-img", "qemu-io", "qemu-nbd"]) {
        return;
    }
    let root = scratch_dir();
    let dir = root.path();
    let bin = link_dir(dir);
    base_qcow2(dir, "a.qcow2");
    img(dir, "convert -O raw a.qcow2 b.raw");
    let server = NbdServer::qemu_nbd(dir, "w", &["-f", "qcow2", "a.qcow2"]);
    let mut failures = Vec::new();
    for (args, code) in [
        (&["compare", "a.qcow2", "b.raw"][..], 2),
        (&["compare", "b.raw", "a.qcow2"][..], 2),
        (&["compare", "-U", "a.qcow2", "b.raw"][..], 0),
        (&["compare", "-U", "-s", "b.raw", "a.qcow2"][..], 1),
    ] {
        let qemu = tool("qemu-img", dir, args);
        assert_eq!(qemu.code, Some(code), "{}", qemu.outcome());
        if code == 2 {
            assert!(
                qemu.stderr.contains("Failed to get shared \"write\" lock"),
                "{}",
                qemu.stderr
            );
        }
        let ours = qnbd(IoEngine::Sync, dir, args);
        if let Err(e) = same(&qemu, &ours, false) {
            failures.push(e);
        }
        let linked = tool(bin.join("qemu-img").to_str().unwrap(), dir, args);
        if let Err(e) = same(&qemu, &linked, false) {
            failures.push(e);
        }
    }
    server.stop();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Every ordered pair of a set of images of different kinds (raw sparse and dense, an odd-sized
/// raw file, qcow2 with zero clusters, compressed, extended L2 subclusters, preallocated
/// metadata, an external data file, overlays over qcow2 and raw backing files, a longer image),
/// strict and not: qnbd answers as qemu-img does, which in strict mode means the same block
/// status word (allocation, zero, offset, EOF, compressed) at the same offsets.
#[test]
fn every_pair_strict_and_not() {
    if !require_tools("compare (pairs)", TOOLS) {
        return;
    }
    let root = scratch_dir();
    let d = root.path();
    base_qcow2(d, "base.qcow2");
    img(d, "convert -O raw base.qcow2 sparse.raw");
    img(d, "convert -c -O qcow2 base.qcow2 compressed.qcow2");
    img(
        d,
        "convert -O qcow2 -o extended_l2=on,cluster_size=128k base.qcow2 ext.qcow2",
    );
    io(d, "qcow2", "ext.qcow2", &["write -P 0x11 5M 4k"]);
    img(
        d,
        "create -q -f qcow2 -o preallocation=metadata prealloc.qcow2 8M",
    );
    io(
        d,
        "qcow2",
        "prealloc.qcow2",
        &[
            "write -P 0x11 0 1M",
            "write -P 0x22 3M 200k",
            "write -P 0x33 7M 4k",
        ],
    );
    img(d, "create -q -f qcow2 -o data_file=df.raw dfile.qcow2 8M");
    io(
        d,
        "qcow2",
        "dfile.qcow2",
        &[
            "write -P 0x11 0 1M",
            "write -P 0x22 3M 200k",
            "write -P 0x33 7M 4k",
        ],
    );
    img(d, "create -q -f qcow2 -b base.qcow2 -F qcow2 hide.qcow2");
    io(d, "qcow2", "hide.qcow2", &["write -z 3M 64k"]);
    img(
        d,
        "create -q -f qcow2 -b sparse.raw -F raw over-raw.qcow2 9M",
    );
    io(d, "qcow2", "over-raw.qcow2", &["write -P 0x33 7M 4k"]);
    let dense: Vec<u8> = (0..(8u32 << 20)).map(|i| (i % 251) as u8).collect();
    std::fs::write(d.join("dense.raw"), &dense).unwrap();
    img(d, "convert -f raw -O qcow2 dense.raw dense.qcow2");
    std::fs::write(d.join("odd.raw"), &dense[..1000]).unwrap();
    img(d, "convert -f raw -O qcow2 odd.raw odd.qcow2");
    let names = [
        "base.qcow2",
        "sparse.raw",
        "compressed.qcow2",
        "ext.qcow2",
        "prealloc.qcow2",
        "dfile.qcow2",
        "hide.qcow2",
        "over-raw.qcow2",
        "dense.raw",
        "dense.qcow2",
        "odd.raw",
        "odd.qcow2",
    ];
    let mut failures = Vec::new();
    let mut outcomes = std::collections::BTreeSet::new();
    for a in names {
        for b in names {
            for strict in [false, true] {
                let mut args = vec!["compare"];
                if strict {
                    args.push("-s");
                }
                args.extend([a, b]);
                let qemu = tool("qemu-img", d, &args);
                outcomes.insert(
                    qemu.stdout_text()
                        .split(|c: char| c.is_ascii_digit())
                        .next()
                        .unwrap_or_default()
                        .to_string(),
                );
                let ours = qnbd(IoEngine::Sync, d, &args);
                if let Err(e) = same(&qemu, &ours, false) {
                    failures.push(e);
                }
            }
        }
    }
    // the set exercises every answer
    assert!(outcomes.len() >= 5, "{outcomes:?}");
    assert!(
        failures.is_empty(),
        "{} mismatch(es):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// A compressed cluster that does not decompress: both exit 4 with "Error while reading offset
/// 0 of FILE: " (the reason after it is each one's own: QEMU says only EIO).
#[test]
fn a_read_error_exits_4() {
    if !require_tools("compare (read error)", TOOLS) {
        return;
    }
    let root = scratch_dir();
    let d = root.path();
    img(d, "create -q -f qcow2 a.qcow2 1M");
    io(d, "qcow2", "a.qcow2", &["write -P 1 0 64k"]);
    img(d, "convert -c -O qcow2 a.qcow2 c.qcow2");
    // the compressed stream of guest cluster 0, found through L1[0] and L2[0]
    let f = std::fs::File::open(d.join("c.qcow2")).unwrap();
    let word = |off: u64| {
        let mut b = [0u8; 8];
        f.read_exact_at(&mut b, off).unwrap();
        u64::from_be_bytes(b)
    };
    let l2 = word(word(40)) & 0x00ff_ffff_ffff_fe00;
    let host = word(l2) & ((1u64 << (62 - (16 - 8))) - 1);
    for i in 0..16 {
        poke(d, "c.qcow2", host + i, 0xff);
    }
    let args = ["compare", "c.qcow2", "a.qcow2"];
    let qemu = tool("qemu-img", d, args);
    assert_eq!(qemu.code, Some(4), "{}", qemu.outcome());
    let ours = qnbd(IoEngine::Sync, d, args);
    assert_eq!(ours.code, Some(4), "{}", ours.outcome());
    let head = "Error while reading offset 0 of c.qcow2: ";
    assert!(message(&qemu).starts_with(head), "{}", qemu.stderr);
    assert!(message(&ours).starts_with(head), "{}", ours.stderr);
    assert_eq!(ours.stdout, qemu.stdout);
}
