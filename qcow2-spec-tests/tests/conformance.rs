//! qnbd against QEMU on the whole reference set (`images/make-reference-images.sh`).
//!
//! For every image in `MANIFEST.tsv` and under both I/O engines, `qnbd info`, `qnbd map` and
//! `qnbd convert -O raw` must give what `qemu-img` gave on the same file with the same command
//! line: parsed-JSON equality for info and map, equal sha256 for convert. Where qemu-img refused
//! an image, qnbd must refuse it too (exit 1, a `qnbd: ` message). Commands run in the reference
//! directory with relative image names, as QEMU's truth was recorded.
//!
//! Each test collects every mismatch and reports them all at the end, so one run gives the whole
//! list.
//!
//! Comparisons are exact, including `actual-size` and the `zero` flag that qemu-img map derives
//! from host-file holes inside allocated clusters. Both depend on the host file layout, which
//! differs between two builds of the set but not between two readers of the same files: the
//! truth is recorded from the very files qnbd reads, after the script has dug real holes in them
//! (an "unwritten" extent left by fallocate would read as a hole or as data depending on the page
//! cache). Tests that ask qemu-img live run it right before qnbd, on the same file.

use qcow2_spec_tests::{
    check_convert, check_info, check_map, compare_runs, qnbd, reference_set, sha256_file, tool,
    Expect, IoEngine, Mismatches, Output, ReferenceSet,
};

#[test]
fn info_json_matches_qemu_img_on_every_reference_image() {
    let Some(set) = reference_set() else { return };
    let mut found = Mismatches::new("qnbd info --output=json --backing-chain -U vs qemu-img info");
    for image in &set.images {
        let expect = set.expected_info(&image.name);
        for engine in IoEngine::ALL {
            let result = check_info(engine, &set.dir, &image.name, image.format(), &expect);
            found.record(&image.name, engine, result);
        }
    }
    found.assert_none();
}

#[test]
fn map_json_matches_qemu_img_on_every_reference_image() {
    let Some(set) = reference_set() else { return };
    let mut found = Mismatches::new("qnbd map --output=json vs qemu-img map");
    for image in &set.images {
        let expect = set.expected_map(&image.name);
        for engine in IoEngine::ALL {
            let result = check_map(engine, &set.dir, &image.name, image.format(), &expect);
            found.record(&image.name, engine, result);
        }
    }
    found.assert_none();
}

#[test]
fn convert_to_raw_matches_qemu_img_on_every_reference_image() {
    let Some(set) = reference_set() else { return };
    let mut found = Mismatches::new("qnbd convert -O raw vs qemu-img convert (sha256)");
    for image in &set.images {
        let expect = set.expected_sha256(&image.name);
        for engine in IoEngine::ALL {
            let result = check_convert(engine, &set.dir, &image.name, image.format(), &expect);
            found.record(&image.name, engine, result);
        }
    }
    found.assert_none();
}

/// Runs `qemu-img ARGS` and `qnbd ARGS` (under each engine) in the reference directory and
/// records whether they agree.
fn compare_live(
    set: &ReferenceSet,
    found: &mut Mismatches,
    label: &str,
    args: &[String],
    output: Output,
) {
    let qemu = tool("qemu-img", &set.dir, args);
    for engine in IoEngine::ALL {
        let ours = qnbd(engine, &set.dir, args);
        found.record(label, engine, compare_runs(&qemu, &ours, output));
    }
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// Human `info` output, line for line, on images that between them show every section qemu-img
/// prints: backing file lines, snapshot table, bitmaps, encryption, data file, the dirty flag,
/// v2 format data, raw, and a backing chain.
#[test]
fn info_human_output_matches_qemu_img() {
    let Some(set) = reference_set() else { return };
    let cases: &[(&str, bool)] = &[
        ("v3-basic.qcow2", false),
        ("v2-compat010.qcow2", false),
        ("chain-top.qcow2", false),
        ("chain-top.qcow2", true),
        ("probe-top.qcow2", true),
        ("snapshots.qcow2", false),
        ("bitmaps.qcow2", false),
        ("bitmap-inuse.qcow2", false),
        ("extended-l2.qcow2", false),
        ("compressed-zstd.qcow2", false),
        ("datafile-raw.qcow2", false),
        ("dirty-lazy-refcounts.qcow2", false),
        ("luks-encrypted.qcow2", false),
        ("feature-unknown-incompatible.qcow2", false),
        ("plain.raw", false),
    ];
    let mut found = Mismatches::new("qnbd info (human) vs qemu-img info");
    for &(name, chain) in cases {
        let mut args = strings(&["info", "-U", "-f", set.image(name).format()]);
        if chain {
            args.push("--backing-chain".into());
        }
        args.push(name.into());
        let label = if chain {
            format!("{name} --backing-chain")
        } else {
            name.to_string()
        };
        compare_live(set, &mut found, &label, &args, Output::Text);
    }
    found.assert_none();
}

/// `info` without `-f`: the format is probed, and the answer is still qemu-img's.
#[test]
fn info_json_with_probed_format_matches_qemu_img() {
    let Some(set) = reference_set() else { return };
    let mut found = Mismatches::new("qnbd info --output=json (format probed) vs qemu-img info");
    for image in &set.images {
        let args = strings(&[
            "info",
            "--output=json",
            "--backing-chain",
            "-U",
            &image.name,
        ]);
        compare_live(set, &mut found, &image.name, &args, Output::Json);
    }
    found.assert_none();
}

/// `map --start-offset/--max-length` windows that start and end inside extents, clusters,
/// subclusters and compressed clusters, at and past the end of the disk, and of length 0.
#[test]
fn map_window_matches_qemu_img() {
    let Some(set) = reference_set() else { return };
    let cases: &[(&str, u64, Option<u64>)] = &[
        ("chain-top.qcow2", 65_636, Some(1_048_576)),
        ("chain-top.qcow2", 7_340_032 + 4_096, None),
        ("v3-basic.qcow2", 100, Some(1_000)),
        ("v3-basic.qcow2", 1_048_576 + 512, Some(2_097_152)),
        ("v3-basic.qcow2", 67_108_000, None),
        ("v3-basic.qcow2", 67_108_864, None),
        ("v3-basic.qcow2", 99_999_999, None),
        ("v3-basic.qcow2", 0, Some(0)),
        ("extended-l2.qcow2", 3_000, Some(70_000)),
        ("extended-l2-backed.qcow2", 1_000, Some(40_000)),
        ("cluster-512.qcow2", 31 * 1_024 + 1, Some(100_000)),
        ("large-sparse.qcow2", 2_147_450_880 + 10, Some(131_072)),
        ("unaligned-size.qcow2", 999_000, None),
        ("compressed-zlib.qcow2", 70_000, Some(200_000)),
        ("datafile-raw.qcow2", 1_000, Some(2_097_152)),
        ("short-backing-top.qcow2", 3_140_000, Some(100_000)),
        ("plain.raw", 4_000, Some(2_097_152)),
    ];
    let mut found = Mismatches::new("qnbd map --start-offset/--max-length vs qemu-img map");
    for &(name, start, len) in cases {
        let format = set.image(name).format();
        let start = start.to_string();
        let mut args = strings(&[
            "map",
            "--output=json",
            "-f",
            format,
            "--start-offset",
            &start,
        ]);
        if let Some(len) = len {
            args.extend(strings(&["--max-length", &len.to_string()]));
        }
        args.push(name.into());
        let label = args[4..].join(" ");
        compare_live(set, &mut found, &label, &args, Output::MapJson);
    }
    found.assert_none();
}

/// Human `map` output (data ranges with the file each maps to), including qemu-img's refusal to
/// print it for compressed clusters.
#[test]
fn map_human_output_matches_qemu_img() {
    let Some(set) = reference_set() else { return };
    let names = [
        "v3-basic.qcow2",
        "chain-top.qcow2",
        "chain2-top.qcow2",
        "extended-l2-backed.qcow2",
        "datafile.qcow2",
        "datafile-raw.qcow2",
        "large-sparse.qcow2",
        "compressed-zlib.qcow2",
        "plain.raw",
    ];
    let mut found = Mismatches::new("qnbd map (human) vs qemu-img map");
    for name in names {
        let args = strings(&["map", "-f", set.image(name).format(), name]);
        compare_live(set, &mut found, name, &args, Output::Text);
    }
    found.assert_none();
}

/// The reference set is what its manifest says: every listed image exists and qemu-img check
/// gave the expected exit code when the truth was recorded. (The script checks this too; this
/// keeps a stale or hand-edited set from passing silently.)
#[test]
fn reference_set_is_complete() {
    let Some(set) = reference_set() else { return };
    assert!(
        set.images.len() >= 60,
        "only {} reference images",
        set.images.len()
    );
    let mut problems = Vec::new();
    for image in &set.images {
        if !set.dir.join(&image.name).is_file() {
            problems.push(format!("{}: file missing", image.name));
        }
        let rc = set.truth_text(&image.name, "check.rc");
        if rc.as_deref().map(str::trim) != Some(image.check_rc.to_string().as_str()) {
            problems.push(format!(
                "{}: qemu-img check rc {:?}, manifest says {}",
                image.name, rc, image.check_rc
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// `convert -p` prints qemu-img's progress lines: `    (P.PP/100%)` separated by `\r`, from
/// 0.00 to 100.00 without going back, then a newline; the output file is unchanged by `-p`.
#[test]
fn convert_progress_has_qemu_img_shape() {
    let Some(set) = reference_set() else { return };
    let mut found = Mismatches::new("qnbd convert -p progress output");
    for name in ["v3-basic.qcow2", "chain-top.qcow2", "large-sparse.qcow2"] {
        let image = set.image(name);
        let expect = set.expected_sha256(name);
        for engine in IoEngine::ALL {
            let scratch = qcow2_spec_tests::scratch_dir();
            let dst = scratch.path().join("out.raw");
            let dst = dst.to_str().expect("scratch path is UTF-8");
            let run = qnbd(
                engine,
                &set.dir,
                [
                    "convert",
                    "-p",
                    "-f",
                    image.format(),
                    "-O",
                    "raw",
                    name,
                    dst,
                ],
            );
            let result = if run.success() {
                check_progress(&run.stdout_text()).and_then(|()| {
                    let sum = sha256_file(std::path::Path::new(dst)).map_err(|e| e.to_string())?;
                    match &expect {
                        Expect::Value(want) if *want == sum => Ok(()),
                        _ => Err(format!("with -p the output's sha256 is {sum}")),
                    }
                })
            } else {
                Err(format!("qnbd convert -p failed: {}", run.outcome()))
            };
            found.record(name, engine, result);
        }
    }
    found.assert_none();
}

fn check_progress(out: &str) -> Result<(), String> {
    let body = out.strip_suffix("\r\n").ok_or_else(|| {
        let tail: String = out
            .chars()
            .rev()
            .take(40)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        format!("qemu-img ends with \"    (100.00/100%)\\r\\n\", qnbd with {tail:?}")
    })?;
    let mut last = -1.0f64;
    let mut values = Vec::new();
    for seg in body.split('\r') {
        let value = seg
            .strip_prefix("    (")
            .and_then(|s| s.strip_suffix("/100%)"))
            .filter(|v| v.len() >= 4 && v.as_bytes()[v.len() - 3] == b'.')
            .and_then(|v| v.parse::<f64>().ok())
            .ok_or_else(|| format!("segment {seg:?} is not \"    (P.PP/100%)\""))?;
        if value < last {
            return Err(format!("progress went back from {last:.2} to {value:.2}"));
        }
        last = value;
        values.push(value);
    }
    match (values.first(), values.last()) {
        (Some(&first), Some(&last)) if first == 0.0 && last == 100.0 => Ok(()),
        _ => Err(format!("progress runs {values:?}, not 0.00 .. 100.00")),
    }
}
