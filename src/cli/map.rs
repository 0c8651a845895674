//! `qnbd map`: qemu-img map, same JSON and human output.

use super::{open_options, parse_size_arg, OutputFormat};
use crate::block::{Chain, Mapping};
use crate::error::{Error, ErrorKind, Result};
use clap::Args;
use std::io::Write;

/// One entry of `qemu-img map --output=json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapEntry {
    pub start: u64,
    pub length: u64,
    /// 0-based layer index as qemu-img prints it.
    pub depth: usize,
    pub present: bool,
    pub zero: bool,
    pub data: bool,
    pub compressed: bool,
    pub offset: Option<u64>,
}

impl MapEntry {
    /// qemu-img's `entry_mergeable`.
    pub fn mergeable(&self, next: &MapEntry) -> bool {
        if self.length == 0 {
            return false;
        }
        if self.zero != next.zero
            || self.data != next.data
            || self.compressed != next.compressed
            || self.depth != next.depth
            || self.present != next.present
            || self.offset.is_some() != next.offset.is_some()
        {
            return false;
        }
        match (self.offset, next.offset) {
            (Some(a), Some(b)) => a.checked_add(self.length) == Some(b),
            _ => true,
        }
    }
}

/// `qemu-img map`'s answer for the range at `off` of `chain` (qemu-img.c `get_block_status`).
pub fn map_entry(chain: &Chain, off: u64, len: u64) -> Result<MapEntry> {
    if off.checked_add(len).is_none_or(|end| end > chain.size()) {
        return Err(Error::new(
            ErrorKind::OutOfRange,
            format!(
                "range {off:#x}+{len:#x} beyond the end of the image ({:#x})",
                chain.size()
            ),
        ));
    }
    let mut len = len;
    for (i, layer) in chain.layers().iter().enumerate() {
        let run = layer.map(off, len.min(layer.size().saturating_sub(off)).max(1))?;
        len = run.len.clamp(1, len);
        let entry = |present, zero, data, compressed, offset| MapEntry {
            start: off,
            length: len,
            depth: i,
            present,
            zero,
            data,
            compressed,
            offset,
        };
        match run.mapping {
            Mapping::Data { host, zero, .. } => {
                return Ok(entry(true, zero, true, false, Some(host)))
            }
            Mapping::Zero { host, .. } => return Ok(entry(true, true, false, false, host)),
            Mapping::Compressed => return Ok(entry(true, false, true, true, None)),
            Mapping::Backing { host, .. } => {
                let beyond_backing = chain.layers().get(i + 1).map(|b| off >= b.size());
                match beyond_backing {
                    // no backing file: unallocated reads as zero (if the format has backing
                    // files at all)
                    None => {
                        let zero = layer.supports_backing();
                        return Ok(entry(false, zero, false, false, host));
                    }
                    Some(true) => return Ok(entry(false, true, false, false, host)),
                    Some(false) => {}
                }
            }
        }
    }
    // unreachable in practice: the last layer answers above
    Err(Error::new(
        ErrorKind::Corrupt,
        "chain walk fell off the end",
    ))
}

#[derive(Debug, Args)]
#[command(args_override_self = true)]
pub struct MapArgs {
    /// Image format (qcow2, raw); probed when omitted.
    #[arg(short = 'f', long = "format")]
    pub format: Option<String>,
    /// Output format: human (qemu-img's text) or json (qemu-img's JSON).
    #[arg(long = "output", value_enum, default_value_t = OutputFormat::Human)]
    pub output: OutputFormat,
    /// Map from this guest offset (size suffixes allowed).
    #[arg(short = 's', long = "start-offset", value_parser = parse_size_arg, default_value = "0")]
    pub start_offset: u64,
    /// Map at most this many bytes from the start offset (default: to the end).
    #[arg(short = 'l', long = "max-length", value_parser = parse_size_arg)]
    pub max_length: Option<u64>,
    /// Share the image with writers: read-only, no lock denied to others (qemu-img -U).
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    #[arg(long = "allow-backing", value_name = "PATH", help = super::ALLOW_BACKING_HELP)]
    pub allow_backing: Vec<String>,
    #[arg(long = "image-opts", help = super::IMAGE_OPTS_HELP)]
    pub image_opts: bool,
    /// The image: a file name, a block device, json:{...}, or QemuOpts with --image-opts.
    pub image: String,
}

/// All map entries of `[start, start+max)` with qemu-img's merging.
pub fn entries(chain: &crate::block::Chain, start: u64, max: Option<u64>) -> Result<Vec<MapEntry>> {
    let size = chain.size();
    let end = match max {
        Some(m) => start.saturating_add(m).min(size),
        None => size,
    };
    let mut out = Vec::new();
    let mut curr: Option<MapEntry> = None;
    let mut pos = start.min(end);
    while pos < end {
        let next = map_entry(chain, pos, end - pos)
            .map_err(|e| Error::new(e.kind(), format!("Could not read file metadata: {e}")))?;
        pos += next.length;
        match &mut curr {
            Some(c) if c.mergeable(&next) => c.length += next.length,
            Some(c) => {
                out.push(*c);
                curr = Some(next);
            }
            None => curr = Some(next),
        }
    }
    match curr {
        Some(c) => out.push(c),
        // qemu-img prints one empty entry for an empty window
        None => out.push(MapEntry {
            start,
            length: 0,
            depth: 0,
            present: false,
            zero: false,
            data: false,
            compressed: false,
            offset: None,
        }),
    }
    Ok(out)
}

pub fn format_json(entries: &[MapEntry]) -> String {
    let mut s = String::from("[");
    for (i, e) in entries.iter().enumerate() {
        s.push_str(&format!(
            "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
            e.start, e.length, e.depth, e.present, e.zero, e.data, e.compressed
        ));
        if let Some(o) = e.offset {
            s.push_str(&format!(", \"offset\": {o}"));
        }
        s.push('}');
        if i + 1 < entries.len() {
            s.push_str(",\n");
        }
    }
    s.push_str("]\n");
    s
}

fn hex16(v: u64) -> String {
    let s = if v == 0 {
        "0".to_string()
    } else {
        format!("{v:#x}")
    };
    format!("{s:<16}")
}

/// qemu-img's human map: only data ranges, with zero and unallocated ranges coalesced.
pub fn format_human(ents: &[MapEntry], layers: &[crate::open::OpenedLayer]) -> Result<String> {
    let mut s = format!(
        "{:<16}{:<16}{:<16}{}\n",
        "Offset", "Length", "Mapped to", "File"
    );
    // qemu-img ignores the distinction between 0, ZERO and ZERO|DATA in this format
    let mut merged: Vec<MapEntry> = Vec::new();
    for e in ents {
        let mut e = *e;
        if !e.data || e.zero {
            e.data = false;
            e.zero = true;
        }
        match merged.last_mut() {
            Some(c) if c.mergeable(&e) => c.length += e.length,
            _ => merged.push(e),
        }
    }
    for e in &merged {
        if e.data && e.offset.is_none() {
            return Err(Error::unsupported(
                "File contains external, encrypted or compressed clusters.",
            ));
        }
        if e.data && !e.zero {
            // the file holding the data: the external data file when the layer has one
            let file = layers
                .get(e.depth)
                .map(|l| match &l.qcow2 {
                    Some(q) if q.header().has_data_file() => q
                        .data_file_name()
                        .map(|df| crate::open::combine_path(&l.filename, df))
                        .unwrap_or_else(|| l.filename.clone()),
                    _ => l.filename.clone(),
                })
                .unwrap_or_default();
            s.push_str(&format!(
                "{}{}{}{}\n",
                hex16(e.start),
                hex16(e.length),
                hex16(e.offset.unwrap_or(0)),
                file
            ));
        }
    }
    Ok(s)
}

pub fn run(a: &MapArgs) -> Result<i32> {
    let mut opts = open_options(a.format.as_deref())?;
    opts.writable = false;
    opts.locking = super::locking(&a.image, a.force_share, false, crate::open::Locking::Tool)?;
    opts.policy = super::open_policy(&a.allow_backing)?;
    let name = super::image_name(&a.image, a.image_opts, &mut opts)?;
    let img = super::open_named(&name, &opts)?;
    let ents = entries(&img.chain, a.start_offset, a.max_length)?;
    let mut out = std::io::stdout().lock();
    match a.output {
        OutputFormat::Json => {
            let _ = out.write_all(format_json(&ents).as_bytes());
        }
        OutputFormat::Human => {
            let _ = out.write_all(format_human(&ents, &img.layers)?.as_bytes());
        }
    }
    Ok(0)
}
