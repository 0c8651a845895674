//! `qnbd bitmap`: qemu-img bitmap (`--add`, `--remove`, `--clear`, `--enable`, `--disable`,
//! `--merge`), applied in the order given and stored in one header update, or not at all; plus
//! `--list`, `--dump` and `--recover`.

use super::{open_options, parse_size_arg, OutputFormat};
use crate::bitmap::{DirtyBitmap, State};
use crate::error::{Error, ErrorKind, Result};
use crate::open::{open_image, Format, OpenOptions};
use crate::qcow2::bitmaps::LiveBitmap;
use crate::qcow2::spec::bitmap_dir::{DirEntry, FLAG_AUTO};
use clap::Args;
use serde_json::json;
use std::sync::{Arc, RwLock};

#[derive(Debug, Args)]
#[command(args_override_self = true)]
pub struct BitmapArgs {
    /// Create the bitmap (persistent, enabled unless --disable).
    #[arg(long = "add")]
    pub add: bool,
    /// Delete the bitmap (also an in-use one).
    #[arg(long = "remove")]
    pub remove: bool,
    /// Clear every bit.
    #[arg(long = "clear")]
    pub clear: bool,
    /// Start recording writes (sets the `auto` flag).
    #[arg(long = "enable")]
    pub enable: bool,
    /// Stop recording writes.
    #[arg(long = "disable")]
    pub disable: bool,
    /// Merge bitmap SOURCE (of this image, or of -b FILE) into the bitmap.
    #[arg(long = "merge", value_name = "SOURCE")]
    pub merge: Vec<String>,
    /// Image holding the --merge source bitmap.
    #[arg(short = 'b', value_name = "SOURCE_FILE")]
    pub source_file: Option<String>,
    /// Format of SOURCE_FILE.
    #[arg(short = 'F', value_name = "SOURCE_FMT")]
    pub source_format: Option<String>,
    /// Granularity of a new bitmap (power of two, 512 B to 2 GiB).
    #[arg(short = 'g', value_parser = parse_size_arg)]
    pub granularity: Option<u64>,
    /// List the bitmaps: name, granularity, flags, state, dirty bytes.
    #[arg(long = "list")]
    pub list: bool,
    /// Print the bitmap's dirty and clean extents.
    #[arg(long = "dump")]
    pub dump: bool,
    /// Make an in-use (inconsistent) bitmap usable again: dirty wherever the image itself holds
    /// data or zeroes, so no change it may have missed goes unnoticed.
    #[arg(long = "recover")]
    pub recover: bool,
    /// Output format: human (qemu-img's text) or json (qemu-img's JSON).
    #[arg(long = "output", value_enum, default_value_t = OutputFormat::Human)]
    pub output: OutputFormat,
    /// With --dump: from this guest offset (size suffixes allowed).
    #[arg(long = "start-offset", value_parser = parse_size_arg, default_value = "0")]
    pub start_offset: u64,
    /// With --dump: at most this many bytes from the start offset.
    #[arg(long = "max-length", value_parser = parse_size_arg)]
    pub max_length: Option<u64>,
    /// Image format (must be qcow2).
    #[arg(short = 'f', long = "format")]
    pub format: Option<String>,
    /// With --list / --dump: share the image with writers (read-only, no lock denied to
    /// others), as qemu-img info -U. Refused with changes.
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    #[arg(long = "image-opts", help = super::IMAGE_OPTS_HELP)]
    pub image_opts: bool,
    /// The qcow2 image holding the bitmaps.
    pub image: String,
    /// The bitmap to act on (every action but --list and --recover without a name needs it).
    pub bitmap: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    Add,
    Remove,
    Clear,
    Enable,
    Disable,
    Merge(String),
    Recover,
}

/// The operations in command-line order (qemu-img applies them in that order).
impl Op {
    /// qemu-img's name of the operation, for messages.
    fn name(&self) -> &'static str {
        match self {
            Op::Add => "add",
            Op::Remove => "remove",
            Op::Clear => "clear",
            Op::Enable => "enable",
            Op::Disable => "disable",
            Op::Merge(_) => "merge",
            Op::Recover => "recover",
        }
    }
}

fn ops_in_order(a: &BitmapArgs) -> Vec<Op> {
    let mut out = Vec::new();
    let mut merges = a.merge.iter();
    let mut args = std::env::args().skip_while(|x| x != "bitmap");
    while let Some(x) = args.next() {
        match x.as_str() {
            "--add" => out.push(Op::Add),
            "--remove" => out.push(Op::Remove),
            "--clear" => out.push(Op::Clear),
            "--enable" => out.push(Op::Enable),
            "--disable" => out.push(Op::Disable),
            "--recover" => out.push(Op::Recover),
            "--merge" => {
                let _ = args.next();
                if let Some(m) = merges.next() {
                    out.push(Op::Merge(m.clone()));
                }
            }
            s if s.starts_with("--merge=") => {
                if let Some(m) = merges.next() {
                    out.push(Op::Merge(m.clone()));
                }
            }
            _ => {}
        }
    }
    // called as a library (no matching argv): fall back to a fixed order
    if out.is_empty() {
        if a.add {
            out.push(Op::Add);
        }
        out.extend(a.merge.iter().cloned().map(Op::Merge));
        for (f, op) in [
            (a.clear, Op::Clear),
            (a.enable, Op::Enable),
            (a.disable, Op::Disable),
            (a.remove, Op::Remove),
            (a.recover, Op::Recover),
        ] {
            if f {
                out.push(op);
            }
        }
    }
    // `--add --disable`: created disabled (one operation in qemu-img)
    out
}

fn bad(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidArgument, msg)
}

fn inconsistent(name: &str) -> Error {
    Error::new(
        ErrorKind::Denied,
        format!(
            "Bitmap '{name}' is inconsistent and cannot be used\nTry block-dirty-bitmap-remove to delete this bitmap from disk"
        ),
    )
}

fn default_granularity(cluster_size: u64) -> u64 {
    cluster_size.clamp(4096, 65536)
}

pub fn run(a: &BitmapArgs) -> Result<i32> {
    let mut opts = open_options(a.format.as_deref())?;
    opts.no_backing = true;
    let inspecting = a.list || a.dump;
    opts.locking = super::locking(
        &a.image,
        a.force_share,
        !inspecting,
        crate::open::Locking::Tool,
    )?;
    if inspecting {
        return inspect(a, opts);
    }
    let ops = ops_in_order(a);
    if ops.is_empty() {
        return Err(bad(need_an_action()));
    }
    let name = a
        .bitmap
        .clone()
        .ok_or_else(|| bad("Expecting filename and bitmap name"))?;
    opts.writable = true;
    let file = super::image_name(&a.image, a.image_opts, &mut opts)?;
    let img = super::open_named(&file, &opts)?;
    let layer = &img.layers[0];
    let q = layer.qcow2.clone().ok_or_else(|| {
        Error::unsupported(format!(
            "Format '{}' does not support persistent dirty bitmaps",
            layer.format.name()
        ))
    })?;
    let size = img.chain.size();
    let cs = q.cluster_size();
    let mut list = q.live_bitmaps()?;
    // private copies of the data, so a failure half-way changes nothing
    for b in &mut list {
        if let Some(d) = &b.data {
            let copy = d.read().unwrap_or_else(|e| e.into_inner()).clone();
            b.data = Some(Arc::new(RwLock::new(copy)));
        }
    }
    let find = |list: &[LiveBitmap], n: &str| list.iter().position(|b| b.entry.name == n);
    let disable_new = a.add && a.disable;
    for op in &ops {
        if disable_new && *op == Op::Disable {
            continue;
        }
        let result: Result<()> = (|| {
            match op {
                Op::Add => {
                    if q.header().version < 3 {
                        return Err(Error::unsupported(
                            "Cannot store dirty bitmaps in qcow2 v2 files",
                        ));
                    }
                    if find(&list, &name).is_some() {
                        return Err(bad(format!("Bitmap already exists: {name}")));
                    }
                    if name.len() > 1023 {
                        return Err(bad("Bitmap name is too long"));
                    }
                    if name.is_empty() {
                        return Err(bad("Bitmap name cannot be empty"));
                    }
                    let g = a.granularity.unwrap_or_else(|| default_granularity(cs));
                    if !g.is_power_of_two() || g < 512 {
                        return Err(bad("Granularity must be power of 2 and at least 512"));
                    }
                    if g > 1 << 31 {
                        return Err(bad("Granularity is too big: 2^31 bytes at most"));
                    }
                    list.push(LiveBitmap {
                        entry: DirEntry {
                            table_offset: 0,
                            table_size: 0,
                            flags: if disable_new { 0 } else { FLAG_AUTO },
                            kind: 1,
                            granularity_bits: g.trailing_zeros() as u8,
                            name: name.clone(),
                            extra_data: Vec::new(),
                        },
                        state: if disable_new {
                            State::Disabled
                        } else {
                            State::Enabled
                        },
                        data: Some(Arc::new(RwLock::new(DirtyBitmap::new(size, g)))),
                    });
                }
                Op::Remove => {
                    let i = find(&list, &name)
                        .ok_or_else(|| bad(format!("Dirty bitmap '{name}' not found")))?;
                    list.remove(i);
                }
                Op::Clear | Op::Enable | Op::Disable => {
                    let i = find(&list, &name)
                        .ok_or_else(|| bad(format!("Dirty bitmap '{name}' not found")))?;
                    let b = &mut list[i];
                    if b.state == State::Inconsistent {
                        return Err(inconsistent(&name));
                    }
                    match op {
                        Op::Clear => {
                            if let Some(d) = &b.data {
                                d.write().unwrap_or_else(|e| e.into_inner()).clear();
                            }
                        }
                        Op::Enable => b.state = State::Enabled,
                        _ => b.state = State::Disabled,
                    }
                }
                Op::Merge(src) => {
                    let i = find(&list, &name)
                        .ok_or_else(|| bad(format!("Dirty bitmap '{name}' not found")))?;
                    if list[i].state == State::Inconsistent {
                        return Err(inconsistent(&name));
                    }
                    let source: DirtyBitmap = match &a.source_file {
                        Some(f) => {
                            let sopts = OpenOptions {
                                format: a
                                    .source_format
                                    .as_deref()
                                    .map(Format::parse)
                                    .transpose()?,
                                no_backing: true,
                                ..opts.clone()
                            };
                            let sopts = OpenOptions {
                                writable: false,
                                ..sopts
                            };
                            let simg = open_image(f, &sopts)?;
                            let sq = simg.layers[0].qcow2.clone().ok_or_else(|| {
                                Error::unsupported("the merge source must be a qcow2 image")
                            })?;
                            let d = sq.bitmap(src).map_err(|e| {
                                if e.kind() == crate::ErrorKind::Inconsistent {
                                    inconsistent(src)
                                } else {
                                    bad(format!("Dirty bitmap '{src}' not found"))
                                }
                            })?;
                            let g = d.read().unwrap_or_else(|e| e.into_inner()).clone();
                            g
                        }
                        None => {
                            let j = find(&list, src)
                                .ok_or_else(|| bad(format!("Dirty bitmap '{src}' not found")))?;
                            if list[j].state == State::Inconsistent {
                                return Err(inconsistent(src));
                            }
                            let d = list[j].data.clone().ok_or_else(|| inconsistent(src))?;
                            let g = d.read().unwrap_or_else(|e| e.into_inner()).clone();
                            g
                        }
                    };
                    if let Some(d) = &list[i].data {
                        d.write().unwrap_or_else(|e| e.into_inner()).merge(&source);
                    }
                }
                Op::Recover => {
                    let i = find(&list, &name)
                        .ok_or_else(|| bad(format!("Dirty bitmap '{name}' not found")))?;
                    if list[i].state != State::Inconsistent {
                        return Err(bad(format!(
                            "Bitmap '{name}' is consistent; nothing to recover"
                        )));
                    }
                    let g = list[i].entry.granularity();
                    let mut d = DirtyBitmap::new(size, g);
                    // conservative: every range this image itself holds may have changed
                    for e in super::map::entries(&img.chain, 0, None)? {
                        if e.depth == 0 && e.present {
                            d.mark(e.start, e.length);
                        }
                    }
                    let b = &mut list[i];
                    b.state = if b.entry.auto() {
                        State::Enabled
                    } else {
                        State::Disabled
                    };
                    b.data = Some(Arc::new(RwLock::new(d)));
                }
            }
            Ok(())
        })();
        // as qemu-img: which operation failed, then why
        result
            .map_err(|e| e.context(format!("Operation {} on bitmap {name} failed", op.name())))?;
    }
    q.set_bitmaps(list)?;
    Ok(0)
}

fn flags_of(in_use: bool, auto: bool) -> Vec<&'static str> {
    let mut f = Vec::new();
    if in_use {
        f.push("in-use");
    }
    if auto {
        f.push("auto");
    }
    f
}

fn inspect(a: &BitmapArgs, mut opts: OpenOptions) -> Result<i32> {
    let file = super::image_name(&a.image, a.image_opts, &mut opts)?;
    let img = super::open_named(&file, &opts)?;
    let q = img.layers[0]
        .qcow2
        .clone()
        .ok_or_else(|| Error::unsupported("only qcow2 images hold persistent dirty bitmaps"))?;
    if a.list {
        let infos = q.bitmap_infos();
        match a.output {
            OutputFormat::Json => {
                let v: Vec<_> = infos
                    .iter()
                    .map(|b| {
                        json!({
                            "name": b.name,
                            "granularity": b.granularity,
                            "flags": flags_of(b.in_use, b.auto),
                            "state": b.state.name(),
                            "dirty-bytes": b.dirty_bytes,
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            }
            OutputFormat::Human => {
                println!(
                    "{:<24} {:>12} {:<14} {:<13} {:>14}",
                    "NAME", "GRANULARITY", "FLAGS", "STATE", "DIRTY"
                );
                for b in infos {
                    println!(
                        "{:<24} {:>12} {:<14} {:<13} {:>14}",
                        b.name,
                        b.granularity,
                        flags_of(b.in_use, b.auto).join(","),
                        b.state.name(),
                        b.dirty_bytes
                            .map(|d| d.to_string())
                            .unwrap_or_else(|| "-".into())
                    );
                }
            }
        }
        return Ok(0);
    }
    let name = a
        .bitmap
        .clone()
        .ok_or_else(|| bad("Expecting filename and bitmap name"))?;
    let d = q.bitmap(&name).map_err(|e| {
        if e.kind() == crate::ErrorKind::Inconsistent {
            inconsistent(&name)
        } else {
            e
        }
    })?;
    let bm = d.read().unwrap_or_else(|e| e.into_inner());
    let size = bm.size();
    let start = a.start_offset.min(size);
    let end = match a.max_length {
        Some(m) => start.saturating_add(m).min(size),
        None => size,
    };
    let mut runs = Vec::new();
    let mut pos = start;
    while pos < end {
        let (n, dirty) = bm.run_at(pos, end - pos);
        runs.push((pos, n, dirty));
        pos += n;
    }
    match a.output {
        OutputFormat::Json => {
            let mut s = String::from("[");
            for (i, (off, n, dirty)) in runs.iter().enumerate() {
                s.push_str(&format!(
                    "{{ \"start\": {off}, \"length\": {n}, \"dirty\": {dirty}}}"
                ));
                if i + 1 < runs.len() {
                    s.push_str(",\n");
                }
            }
            s.push(']');
            println!("{s}");
        }
        OutputFormat::Human => {
            println!("{:<16}{:<16}Dirty", "Offset", "Length");
            for (off, n, dirty) in runs {
                if dirty {
                    println!("{:<16}{:<16}yes", format!("{off:#x}"), format!("{n:#x}"));
                }
            }
        }
    }
    Ok(0)
}

/// The refusal of a bitmap command without an action: qemu-img's words by that name (it has
/// no --recover).
pub(crate) fn need_an_action() -> &'static str {
    if crate::error::program() == "qemu-img" {
        "Need at least one of --add, --remove, --clear, --enable, --disable, or --merge"
    } else {
        "Need at least one of --add, --remove, --clear, --enable, --disable, --merge, --recover"
    }
}
