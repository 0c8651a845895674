//! `qnbd snapshot`: qemu-img snapshot. `-l` (the default) lists an image's internal snapshots
//! in qemu-img's table. Creating, applying and deleting (`-c`, `-a`, `-d`) rewrite refcounts of
//! every cluster the snapshot shares and are not in this version: they are refused with a
//! clear message before the image is opened, so nothing is changed.

use super::{open_named, open_options};
use crate::error::{Error, ErrorKind, Result};
use clap::Args;
use std::io::Write;

#[derive(Debug, Args)]
#[command(args_override_self = true)]
pub struct SnapshotArgs {
    /// Image format (qcow2, raw); probed when omitted.
    #[arg(short = 'f', long = "format")]
    pub format: Option<String>,
    /// List the snapshots (the default).
    #[arg(short = 'l', long = "list")]
    pub list: bool,
    /// Create a snapshot of this name (not in this version).
    #[arg(short = 'c', long = "create", value_name = "SNAPSHOT")]
    pub create: Option<String>,
    /// Revert the image to this snapshot (not in this version).
    #[arg(short = 'a', long = "apply", value_name = "SNAPSHOT")]
    pub apply: Option<String>,
    /// Delete this snapshot (not in this version).
    #[arg(short = 'd', long = "delete", value_name = "SNAPSHOT")]
    pub delete: Option<String>,
    /// Quiet (the list is still printed, as qemu-img prints it).
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    /// Share the image with writers: read-only, no lock denied to others (qemu-img -U).
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    #[arg(long = "image-opts", help = super::IMAGE_OPTS_HELP)]
    pub image_opts: bool,
    /// The image.
    pub image: String,
}

pub fn run(a: &SnapshotArgs) -> Result<i32> {
    let ops = usize::from(a.list)
        + usize::from(a.create.is_some())
        + usize::from(a.apply.is_some())
        + usize::from(a.delete.is_some());
    if ops > 1 {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!(
                "Cannot mix '-l', '-a', '-c', '-d'\nTry '{} snapshot --help' for more info",
                crate::error::program()
            ),
        ));
    }
    for (flag, what, given) in [
        ("-c", "creating", &a.create),
        ("-a", "applying", &a.apply),
        ("-d", "deleting", &a.delete),
    ] {
        if given.is_some() {
            return Err(Error::unsupported(format!(
                "snapshot {flag}: {what} internal snapshots is not supported by this version \
                 (nothing was changed){}",
                crate::error::hint("qemu-img snapshot does it on an image no one else has open")
            )));
        }
    }
    let mut opts = open_options(a.format.as_deref())?;
    opts.no_io = true;
    opts.no_backing = true;
    opts.locking = super::locking(&a.image, a.force_share, false, crate::open::Locking::Tool)?;
    let name = super::image_name(&a.image, a.image_opts, &mut opts)?;
    let img = open_named(&name, &opts)?;
    let Some(q) = img.layers.first().and_then(|l| l.qcow2.as_ref()) else {
        // a raw image has no snapshots: nothing to list
        return Ok(0);
    };
    let snaps = super::info::snapshots_json(q);
    if !snaps.is_empty() {
        let _ = std::io::stdout().write_all(super::info::snapshot_table(&snaps).as_bytes());
    }
    Ok(0)
}
