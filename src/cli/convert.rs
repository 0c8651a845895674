//! `qnbd convert`: qemu-img convert to raw (sparse output, progress with `-p`).

use super::open_options;
use crate::block::Mapping;
use crate::error::{Error, ErrorKind, Result};
use crate::open::open_image;
use clap::Args;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::FileExt;

#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// Source format (qcow2, raw); probed when omitted.
    #[arg(short = 'f')]
    pub format: Option<String>,
    /// Output format.
    #[arg(short = 'O', default_value = "raw")]
    pub out_format: String,
    /// Show progress.
    #[arg(short = 'p')]
    pub progress: bool,
    /// Open the source without taking locks (accepted for qemu-img compatibility).
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    pub src: String,
    pub dst: String,
}

/// Zero blocks of this size inside data are skipped (qemu-img's default `-S 4k`).
const SPARSE_BLOCK: usize = 4096;
const CHUNK: u64 = 2 << 20;

pub fn run(a: &ConvertArgs) -> Result<i32> {
    if a.out_format != "raw" {
        return Err(Error::unsupported(format!(
            "output format '{}' is not supported by convert yet (use -O raw)",
            a.out_format
        )));
    }
    let opts = open_options(a.format.as_deref())?;
    let img = open_image(&a.src, &opts)?;
    let chain = &img.chain;
    let size = chain.size();
    let out = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&a.dst)
        .map_err(|e| Error::io(format!("Could not create '{}'", a.dst), e))?;
    out.set_len(size)
        .map_err(|e| Error::io(format!("Could not resize '{}'", a.dst), e))?;
    let mut buf = vec![0u8; CHUNK as usize];
    let mut pos = 0u64;
    let mut last_pct = -1.0f64;
    let progress = |pos: u64, last: &mut f64| {
        if !a.progress {
            return;
        }
        let pct = if size == 0 {
            100.0
        } else {
            (pos as f64 * 100.0 / size as f64 * 100.0).floor() / 100.0
        };
        if pct != *last {
            *last = pct;
            let mut e = std::io::stdout().lock();
            let _ = write!(e, "    ({pct:.2}/100%)\r");
            let _ = e.flush();
        }
    };
    progress(0, &mut last_pct);
    while pos < size {
        let r = chain.resolve(pos, (size - pos).min(CHUNK))?;
        let n = r.len;
        let reads_zero = match r.mapping {
            Mapping::Zero { .. } | Mapping::Backing { .. } => true,
            Mapping::Data { zero, .. } => zero,
            Mapping::Compressed => false,
        };
        if !reads_zero {
            let b = &mut buf[..n as usize];
            chain.read(pos, b)?;
            for (i, blk) in b.chunks(SPARSE_BLOCK).enumerate() {
                if blk.iter().any(|&x| x != 0) {
                    let at = pos + (i * SPARSE_BLOCK) as u64;
                    out.write_all_at(blk, at).map_err(|e| {
                        Error::io(format!("Could not write to '{}' at {at:#x}", a.dst), e)
                    })?;
                }
            }
        }
        pos += n;
        progress(pos, &mut last_pct);
    }
    out.sync_data()
        .map_err(|e| Error::io(format!("Could not flush '{}'", a.dst), e))?;
    if a.progress {
        println!("    (100.00/100%)");
    }
    let _ = ErrorKind::Io;
    Ok(0)
}
