//! The committed fixture images in `images/` (see `images/MANIFEST`, rebuilt by
//! `images/make-fixtures.sh`).
//!
//! First, the files are what the manifest says (no QEMU needed). Then qnbd reads each one as
//! qemu-img does, asked live on the same file: info, map and convert, under both I/O engines.

use std::ffi::OsStr;
use std::fs;

use qcow2_spec_tests::{
    check_convert, compare_runs, images_dir, qnbd, require_tools, sha256_file, tool, Expect,
    IoEngine, Mismatches, Output,
};

struct Fixture {
    name: String,
    sha256: String,
    size: u64,
}

fn manifest() -> Vec<Fixture> {
    let path = images_dir().join("MANIFEST");
    let text = fs::read_to_string(&path).expect("read images/MANIFEST");
    let mut out: Vec<Fixture> = Vec::new();
    for line in text.lines() {
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            out.push(Fixture {
                name: name.to_string(),
                sha256: String::new(),
                size: 0,
            });
        } else if let (Some(f), Some((key, value))) = (out.last_mut(), line.split_once(": ")) {
            match key {
                "sha256" => f.sha256 = value.to_string(),
                "size" => f.size = value.parse().expect("size in images/MANIFEST"),
                _ => {}
            }
        }
    }
    out
}

fn format_of(name: &str) -> &'static str {
    if name.ends_with(".raw") {
        "raw"
    } else {
        "qcow2"
    }
}

#[test]
fn fixture_files_match_their_manifest() {
    let fixtures = manifest();
    assert!(
        fixtures.iter().any(|f| f.name == "default.qcow2"),
        "images/MANIFEST must list default.qcow2"
    );
    let mut problems = Vec::new();
    for f in &fixtures {
        let path = images_dir().join(&f.name);
        match (fs::metadata(&path), sha256_file(&path)) {
            (Ok(meta), Ok(sum)) => {
                if meta.len() != f.size {
                    problems.push(format!(
                        "{}: {} bytes, MANIFEST says {}",
                        f.name,
                        meta.len(),
                        f.size
                    ));
                }
                if meta.len() >= 300 * 1024 {
                    problems.push(format!(
                        "{}: {} bytes, fixtures stay under 300 KiB",
                        f.name,
                        meta.len()
                    ));
                }
                if sum != f.sha256 {
                    problems.push(format!(
                        "{}: sha256 {sum}, MANIFEST says {}",
                        f.name, f.sha256
                    ));
                }
            }
            (Err(e), _) | (_, Err(e)) => problems.push(format!("{}: {e}", f.name)),
        }
    }
    // Every image file in images/ is described.
    for entry in fs::read_dir(images_dir()).expect("list images/") {
        let name = entry
            .expect("directory entry")
            .file_name()
            .to_string_lossy()
            .into_owned();
        let is_image = name.ends_with(".qcow2") || name.ends_with(".raw");
        if is_image && !fixtures.iter().any(|f| f.name == name) {
            problems.push(format!("{name}: in images/ but not in images/MANIFEST"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Each qemu-img command runs right before the same qnbd command, so both see the file (and the
/// host's view of its holes) in the same state.
#[test]
fn qnbd_reads_every_fixture_as_qemu_img_does() {
    if !require_tools("fixture oracle", &["qemu-img"]) {
        return;
    }
    let dir = images_dir();
    let mut info = Mismatches::new("fixtures: qnbd info --output=json vs qemu-img info");
    let mut map = Mismatches::new("fixtures: qnbd map --output=json vs qemu-img map");
    let mut convert = Mismatches::new("fixtures: qnbd convert -O raw vs qemu-img convert");
    let scratch = qcow2_spec_tests::scratch_dir();
    for f in manifest() {
        let (name, format) = (f.name.as_str(), format_of(&f.name));
        let args = [
            "info",
            "--output=json",
            "--backing-chain",
            "-U",
            "-f",
            format,
            name,
        ];
        let qemu = tool("qemu-img", &dir, args);
        for engine in IoEngine::ALL {
            let ours = qnbd(engine, &dir, args);
            info.record(name, engine, compare_runs(&qemu, &ours, Output::Json));
        }
        let args = ["map", "--output=json", "-f", format, name];
        let qemu = tool("qemu-img", &dir, args);
        for engine in IoEngine::ALL {
            let ours = qnbd(engine, &dir, args);
            map.record(name, engine, compare_runs(&qemu, &ours, Output::MapJson));
        }
        let flat = scratch.path().join(format!("{name}.raw"));
        let qemu = tool(
            "qemu-img",
            &dir,
            [
                OsStr::new("convert"),
                OsStr::new("-U"),
                OsStr::new("-f"),
                OsStr::new(format),
                OsStr::new("-O"),
                OsStr::new("raw"),
                OsStr::new(name),
                flat.as_os_str(),
            ],
        );
        assert!(qemu.success(), "{}: {}", qemu.command, qemu.outcome());
        let expect_sha = Expect::Value(sha256_file(&flat).expect("hash qemu-img's output"));
        fs::remove_file(&flat).expect("remove qemu-img's output");
        for engine in IoEngine::ALL {
            let result = check_convert(engine, &dir, name, format, &expect_sha);
            convert.record(name, engine, result);
        }
    }
    let report: String = [info.report(), map.report(), convert.report()].concat();
    assert!(report.is_empty(), "\n{report}");
}
