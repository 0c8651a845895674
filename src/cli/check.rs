//! `qnbd check`: qemu-img check — same human and JSON output, same exit codes:
//! 0 clean, 1 check not completed, 2 corruptions, 3 leaks only, 63 format without checks.

use super::progress::Progress;
use super::qjson::to_qemu_pretty;
use super::OutputFormat;
use crate::error::Result;
use crate::io::Engine;
use crate::open::{open_top_file, Format, Locking};
use crate::qcow2::check::{check, check_with_progress, CheckOutcome, CheckResult, Repair};
use crate::qcow2::{Qcow2, Qcow2Options};
use clap::{Args, ValueEnum};
use serde_json::{Map, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RepairArg {
    /// Drop refcounts that are too high (leaked clusters).
    Leaks,
    /// Also fix refcounts that are too low, OFLAG_COPIED and broken refcount structures.
    All,
}

#[derive(Debug, Args)]
#[command(args_override_self = true)]
pub struct CheckArgs {
    /// Image format (qcow2, raw); probed when omitted.
    #[arg(short = 'f', long = "format")]
    pub format: Option<String>,
    /// Output format: human (qemu-img's text) or json (qemu-img's JSON).
    #[arg(long = "output", value_enum, default_value_t = OutputFormat::Human)]
    pub output: OutputFormat,
    /// Repair what can be repaired (opens the image read-write).
    #[arg(short = 'r', long = "repair", value_enum)]
    pub repair: Option<RepairArg>,
    /// Share the image with writers: read-only, no lock denied to others (qemu-img -U).
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// Quiet: print nothing on standard output.
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    /// Show progress (qemu-img's plain lines when piped, a bar on a terminal); the figure is
    /// the share of tables walked and clusters compared, the bytes are the image file's.
    #[arg(short = 'p', long = "progress")]
    pub progress: bool,
    #[arg(long = "image-opts", help = super::IMAGE_OPTS_HELP)]
    pub image_opts: bool,
    /// The image to check.
    pub image: String,
}

const EXIT_NOT_COMPLETED: i32 = 1;
const EXIT_CORRUPT: i32 = 2;
const EXIT_LEAKS: i32 = 3;
const EXIT_UNSUPPORTED: i32 = 63;

/// Open `path` as a qcow2 image for checking; `Ok(None)` for a format without checks.
fn open(
    path: &str,
    format: Option<Format>,
    writable: bool,
    locking: Locking,
) -> Result<Option<Qcow2>> {
    let engine = Engine::from_env()
        .map_err(|e| crate::error::Error::new(crate::error::ErrorKind::InvalidArgument, e))?;
    let (storage, format) = open_top_file(path, format, engine, writable, locking)
        .map_err(|e| super::named_open_error(path, e))?;
    if format != Format::Qcow2 {
        return Ok(None);
    }
    let opts = Qcow2Options {
        no_io: true,
        ..Qcow2Options::default()
    };
    Qcow2::open(storage, &opts)
        .map(Some)
        .map_err(|e| e.context(format!("Could not open '{path}'")))
}

/// The command that repairs: `qemu-img` when invoked by that name, else `qnbd`.
fn tool_name() -> &'static str {
    match crate::error::program() {
        "qemu-img" => "qemu-img",
        _ => "qnbd",
    }
}

fn report(outcome: &CheckOutcome, human: bool) {
    for m in &outcome.messages {
        eprintln!("{m}");
    }
    if human {
        for w in &outcome.warnings {
            eprintln!("{}: warning: {w}", crate::error::program());
        }
    }
}

/// qemu-img's `dump_human_image_check`.
pub fn format_human(r: &CheckResult) -> String {
    let mut s = String::new();
    if r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0 {
        s.push_str("No errors were found on the image.\n");
    } else {
        if r.corruptions != 0 {
            s.push_str(&format!(
                "\n{} errors were found on the image.\nData may be corrupted, or further writes \
                 to the image may corrupt it.\n",
                r.corruptions
            ));
        }
        if r.leaks != 0 {
            s.push_str(&format!(
                "\n{} leaked clusters were found on the image.\nThis means waste of disk space, \
                 but no harm to data.\n",
                r.leaks
            ));
        }
        if r.check_errors != 0 {
            s.push_str(&format!(
                "\n{} internal errors have occurred during the check.\n",
                r.check_errors
            ));
        }
    }
    if r.total_clusters != 0 && r.allocated_clusters != 0 {
        let a = r.allocated_clusters as f64;
        s.push_str(&format!(
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters\n",
            r.allocated_clusters,
            r.total_clusters,
            a * 100.0 / r.total_clusters as f64,
            r.fragmented_clusters as f64 * 100.0 / a,
            r.compressed_clusters as f64 * 100.0 / a
        ));
    }
    if r.image_end_offset != 0 {
        s.push_str(&format!("Image end offset: {}\n", r.image_end_offset));
    }
    s
}

/// qemu-img's `dump_json_image_check` (members in QAPI `ImageCheck` order, printed in QDict
/// order by `to_qemu_pretty`).
pub fn format_json(r: &CheckResult, filename: &str) -> String {
    let mut m = Map::new();
    m.insert("filename".into(), Value::from(filename));
    m.insert("format".into(), Value::from("qcow2"));
    m.insert("check-errors".into(), Value::from(r.check_errors));
    let optional = [
        ("image-end-offset", r.image_end_offset),
        ("corruptions", r.corruptions),
        ("leaks", r.leaks),
        ("corruptions-fixed", r.corruptions_fixed),
        ("leaks-fixed", r.leaks_fixed),
        ("total-clusters", r.total_clusters),
        ("allocated-clusters", r.allocated_clusters),
        ("fragmented-clusters", r.fragmented_clusters),
        ("compressed-clusters", r.compressed_clusters),
    ];
    for (k, v) in optional {
        if v != 0 {
            m.insert(k.into(), Value::from(v));
        }
    }
    format!("{}\n", to_qemu_pretty(&Value::Object(m)))
}

pub fn run(a: &CheckArgs) -> Result<i32> {
    let format = a.format.as_deref().map(Format::parse).transpose()?;
    let repair = match a.repair {
        None => Repair::None,
        Some(RepairArg::Leaks) => Repair::Leaks,
        Some(RepairArg::All) => Repair::All,
    };
    let human = a.output == OutputFormat::Human;
    let writable = repair != Repair::None;
    let locking = match super::locking(&a.image, a.force_share, writable, Locking::Tool) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("{}: {e}", crate::error::program());
            return Ok(EXIT_NOT_COMPLETED);
        }
    };
    let mut o = crate::open::OpenOptions {
        format,
        locking,
        ..Default::default()
    };
    let (path, format, locking) = match super::image_name(&a.image, a.image_opts, &mut o) {
        Ok(p) => (p, o.format, o.locking),
        Err(e) => {
            eprintln!("{}: {e}", crate::error::program());
            return Ok(EXIT_NOT_COMPLETED);
        }
    };
    let q = match open(&path, format, writable, locking) {
        Ok(Some(q)) => q,
        Ok(None) => {
            eprintln!(
                "{}: This image format does not support checks",
                crate::error::program()
            );
            return Ok(EXIT_UNSUPPORTED);
        }
        Err(e) => {
            eprintln!("{}: {e}", crate::error::program());
            return Ok(EXIT_NOT_COMPLETED);
        }
    };
    let h = q.header();
    if let Some(_b) = q.extensions().bitmaps {
        if h.autoclear_features & crate::qcow2::spec::header::autoclear::BITMAPS == 0 {
            eprintln!(
                "{}: warning: a program lacking bitmap support modified this file, so all \
                 bitmaps are now considered inconsistent",
                crate::error::program()
            );
            eprintln!(
                "Some clusters may be leaked, run '{} check -r' on the image file to fix.",
                tool_name()
            );
        }
    }
    let file_len = q.file().len().unwrap_or(0);
    let mut progress = Progress::new(a.progress && !a.quiet && human, file_len);
    progress.show(0);
    let first = check_with_progress(&q, repair, &mut |done, total| {
        if total != 0 {
            progress.show((done as u128 * file_len as u128 / total as u128) as u64);
        }
    });
    progress.done();
    report(&first, human);
    let mut outcome = first.clone();
    let fixed = (first.result.corruptions_fixed, first.result.leaks_fixed);
    if first.failure.is_none() && (fixed.0 != 0 || fixed.1 != 0) {
        if human && !a.quiet {
            print!(
                "The following inconsistencies were found and repaired:\n\n    {} leaked \
                 clusters\n    {} corruptions\n\nDouble checking the fixed image now...\n",
                fixed.1, fixed.0
            );
        }
        drop(q);
        // the repair rewrote metadata under the open image: check a fresh open
        match open(&path, Some(Format::Qcow2), false, locking) {
            Ok(Some(q2)) => {
                outcome = check(&q2, Repair::None);
                report(&outcome, false);
            }
            Ok(None) => unreachable_format()?,
            Err(e) => {
                eprintln!("{}: {e}", crate::error::program());
                return Ok(EXIT_NOT_COMPLETED);
            }
        }
        outcome.result.corruptions_fixed = fixed.0;
        outcome.result.leaks_fixed = fixed.1;
    }
    if outcome.failure.is_none() && !a.quiet {
        if human {
            print!("{}", format_human(&outcome.result));
        } else {
            print!("{}", format_json(&outcome.result, &a.image));
        }
    }
    if let Some(why) = &outcome.failure {
        eprintln!("{}: Check failed: {why}", crate::error::program());
        return Ok(EXIT_NOT_COMPLETED);
    }
    let r = &outcome.result;
    Ok(if r.check_errors != 0 {
        eprintln!("{}: Check failed", crate::error::program());
        EXIT_NOT_COMPLETED
    } else if r.corruptions != 0 {
        EXIT_CORRUPT
    } else if r.leaks != 0 {
        EXIT_LEAKS
    } else {
        0
    })
}

fn unreachable_format() -> Result<()> {
    Err(crate::error::Error::invalid("the image is no longer qcow2"))
}
