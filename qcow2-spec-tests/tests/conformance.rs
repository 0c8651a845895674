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
//! Comparisons are exact, including `actual-size` and the `zero` flag of map extents inside
//! allocated clusters: both depend on how the host file system laid out the image file (the
//! latter on `SEEK_HOLE`), which differs between two builds of the set but not between two
//! readers of the same file, and the truth is always recorded from the very files qnbd reads.

use qcow2_spec_tests::{
    check_convert, check_info, check_map, line_diff, qnbd, reference_set, tool, IoEngine,
    Mismatches,
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
        ("snapshots.qcow2", false),
        ("bitmaps.qcow2", false),
        ("extended-l2.qcow2", false),
        ("compressed-zstd.qcow2", false),
        ("datafile-raw.qcow2", false),
        ("dirty-lazy-refcounts.qcow2", false),
        ("luks-encrypted.qcow2", false),
        ("plain.raw", false),
    ];
    let mut found = Mismatches::new("qnbd info (human) vs qemu-img info");
    for &(name, chain) in cases {
        let format = set.image(name).format();
        let mut args = vec!["info", "-U", "-f", format];
        if chain {
            args.push("--backing-chain");
        }
        args.push(name);
        let label = if chain {
            format!("{name} --backing-chain")
        } else {
            name.to_string()
        };
        let qemu = tool("qemu-img", &set.dir, &args);
        assert!(qemu.success(), "{}: {}", qemu.command, qemu.outcome());
        let expected: Vec<String> = qemu.stdout_text().lines().map(String::from).collect();
        for engine in IoEngine::ALL {
            let run = qnbd(engine, &set.dir, &args);
            let result = if !run.success() {
                Err(format!("qnbd failed: {}", run.outcome()))
            } else {
                let actual: Vec<String> = run.stdout_text().lines().map(String::from).collect();
                let diff = line_diff(&expected, &actual, 2);
                if diff.is_empty() {
                    Ok(())
                } else {
                    Err(diff.join("\n"))
                }
            };
            found.record(&label, engine, result);
        }
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
