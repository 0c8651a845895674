//! `qnbd rebase`: qemu-img rebase. `-u` (unsafe mode) names a new backing file (or none, with
//! `-b ""` or no `-b`) in the header and touches nothing else, as qemu-img does: the first
//! cluster is rewritten in one synced write, byte for byte as qemu-img leaves it. Safe mode
//! (copying the clusters where the old and new backing files differ) is not in this version
//! and is refused before anything is opened.

use super::open_options;
use crate::error::{Error, ErrorKind, Result};
use crate::open::{open_top_file, Format, Locking};
use crate::qcow2::{Qcow2, Qcow2Options};
use clap::Args;

#[derive(Debug, Args)]
#[command(args_override_self = true)]
pub struct RebaseArgs {
    /// Image format (qcow2); probed when omitted.
    #[arg(short = 'f', long = "format")]
    pub format: Option<String>,
    /// The new backing file ("" for none).
    #[arg(
        short = 'b',
        long = "backing",
        value_name = "BACKING",
        allow_hyphen_values = true
    )]
    pub backing: Option<String>,
    /// Format of the new backing file (required with a backing file).
    #[arg(short = 'F', long = "backing-format", value_name = "FMT")]
    pub backing_format: Option<String>,
    /// Unsafe mode: change the backing file name only, copy nothing.
    #[arg(short = 'u')]
    pub unsafe_mode: bool,
    /// Host cache mode of the image (accepted; -u writes one synced cluster).
    #[arg(short = 't', value_name = "CACHE")]
    pub cache: Option<String>,
    /// Host cache mode of the backing files (accepted; -u opens none).
    #[arg(short = 'T', value_name = "CACHE")]
    pub src_cache: Option<String>,
    /// Show progress (-u has nothing to show).
    #[arg(short = 'p')]
    pub progress: bool,
    /// Quiet: print nothing but errors.
    #[arg(short = 'q')]
    pub quiet: bool,
    /// Write compressed clusters (safe mode only).
    #[arg(short = 'c')]
    pub compress: bool,
    /// Share the backing files with writers (safe mode only).
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// The image.
    pub image: String,
}

pub fn run(a: &RebaseArgs) -> Result<i32> {
    if !a.unsafe_mode {
        return Err(Error::unsupported(format!(
            "rebase without -u (safe mode: copying the clusters where the old and new backing \
             files differ) is not supported by this version (nothing was changed){}",
            crate::error::hint(
                "rebase -u only renames the backing file; use it when both backing files hold \
                 the same data, else qemu-img rebase"
            )
        )));
    }
    let backing = a.backing.as_deref().filter(|b| !b.is_empty());
    let shown = a.backing.as_deref().unwrap_or("");
    let failed = |why: String| {
        Error::new(
            ErrorKind::InvalidArgument,
            format!("Could not change the backing file to '{shown}': {why}"),
        )
    };
    if backing.is_some() && a.backing_format.is_none() {
        return Err(failed("backing format must be specified".into()));
    }
    let opts = open_options(a.format.as_deref())?;
    let (storage, format) = open_top_file(&a.image, opts.format, opts.engine, true, Locking::Tool)
        .map_err(|e| super::named_open_error(&a.image, e))?;
    if format != Format::Qcow2 {
        return Err(failed("Operation not supported".into()));
    }
    // metadata only: nothing is written but the header cluster below
    let q = Qcow2::open(
        storage,
        &Qcow2Options {
            no_io: true,
            ..Qcow2Options::default()
        },
    )
    .map_err(|e| e.context(format!("Could not open '{}'", a.image)))?;
    q.change_backing_file(backing, a.backing_format.as_deref())
        .map_err(|e| match e.io_source() {
            Some(s) => failed(crate::error::strerror_of(s)),
            None => failed(e.message().to_string()),
        })?;
    Ok(0)
}
