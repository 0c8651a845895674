//! `qnbd convert`: qemu-img convert to raw or qcow2 (sparse output, `-c` compressed clusters,
//! `-o` creation options, `-B` backing file, progress with `-p`).

use super::open_options;
use super::progress::Progress;
use crate::block::{Chain, Mapping, NoBacking};
use crate::error::{Error, ErrorKind, Result};
use crate::open::{open_image, CacheMode, Format, OpenOptions};
use clap::Args;

#[derive(Debug, Args)]
#[command(args_override_self = true)]
pub struct ConvertArgs {
    /// Source format (qcow2, raw); probed when omitted.
    #[arg(short = 'f')]
    pub format: Option<String>,
    /// Output format (raw or qcow2).
    #[arg(short = 'O', default_value = "raw")]
    pub out_format: String,
    /// Creation options of the output (as qemu-img create -o); may be repeated.
    #[arg(short = 'o')]
    pub options: Vec<String>,
    /// Write compressed clusters (qcow2 output).
    #[arg(short = 'c')]
    pub compress: bool,
    /// Backing file of the output: only data allocated in the source's top image is copied.
    #[arg(short = 'B')]
    pub backing: Option<String>,
    /// Format of the backing file given with -B.
    #[arg(short = 'F')]
    pub backing_format: Option<String>,
    /// Show progress.
    #[arg(short = 'p')]
    pub progress: bool,
    /// Skip creating the target: write into an existing file or block device (raw output).
    #[arg(short = 'n')]
    pub no_create: bool,
    /// Quiet: no progress and no messages but errors.
    #[arg(short = 'q')]
    pub quiet: bool,
    /// Share the source with writers: no lock denied to others (qemu-img -U).
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    #[arg(long = "allow-backing", value_name = "PATH", help = super::ALLOW_BACKING_HELP)]
    pub allow_backing: Vec<String>,
    /// Host cache mode of the output: writeback (default), none, writethrough, directsync,
    /// unsafe.
    #[arg(short = 't')]
    pub cache: Option<String>,
    /// Host cache mode of the source: writeback (default), none, writethrough, directsync,
    /// unsafe.
    #[arg(short = 'T')]
    pub src_cache: Option<String>,
    #[arg(long = "image-opts", help = super::IMAGE_OPTS_HELP)]
    pub image_opts: bool,
    /// Convert this internal snapshot of the (qcow2) source: ID or NAME, or snapshot.id=ID
    /// and/or snapshot.name=NAME.
    #[arg(short = 'l', value_name = "SNAPSHOT")]
    pub snapshot: Option<String>,
    /// The source image (file, block device, json:{...}, nbd:// URI).
    pub src: String,
    /// The output image (created unless -n; a block device or /dev/null is written in place).
    pub dst: String,
}

/// Zero blocks of this size inside data are skipped (qemu-img's default `-S 4k`).
const SPARSE_BLOCK: usize = 4096;

/// Where the copy goes.
trait Sink {
    /// Write `data` at `off` (only called for data that is not all zeros).
    fn write(&mut self, off: u64, data: &[u8]) -> Result<()>;
    fn finish(&mut self) -> Result<()>;
}

struct RawSink {
    file: std::sync::Arc<dyn crate::io::Storage>,
    path: String,
}

impl Sink for RawSink {
    fn write(&mut self, off: u64, data: &[u8]) -> Result<()> {
        self.file
            .write_at(data, off)
            .map_err(|e| Error::io(format!("Could not write to '{}' at {off:#x}", self.path), e))
    }
    fn finish(&mut self) -> Result<()> {
        self.file
            .sync()
            .map_err(|e| Error::io(format!("Could not flush '{}'", self.path), e))
    }
}

struct Qcow2Sink {
    image: crate::open::Image,
    compress: bool,
    cluster: u64,
}

impl Sink for Qcow2Sink {
    fn write(&mut self, off: u64, data: &[u8]) -> Result<()> {
        if self.compress {
            if let Some(q) = &self.image.layers[0].qcow2 {
                // whole clusters only: the copy loop hands out cluster-aligned chunks
                let mut pos = 0usize;
                while pos < data.len() {
                    let n = (self.cluster as usize).min(data.len() - pos);
                    q.write_compressed(off + pos as u64, &data[pos..pos + n], &NoBacking)?;
                    pos += n;
                }
                return Ok(());
            }
        }
        self.image.chain.write(off, data, false)
    }
    fn finish(&mut self) -> Result<()> {
        self.image.chain.flush()
    }
}

/// Copy every range that does not read as zeros (or, with `top_only`, every range the source's
/// top layer holds). `chunk` is the copy unit, aligned to it.
fn copy(
    src: &Chain,
    sink: &mut dyn Sink,
    chunk: u64,
    top_only: bool,
    whole_units: bool,
    progress: &mut Progress,
) -> Result<()> {
    let size = src.size();
    let mut buf = crate::io::buf::IoBuf::new(chunk as usize);
    let mut pos = 0u64;
    progress.show(0);
    while pos < size {
        let unit_end = ((pos / chunk + 1) * chunk).min(size);
        // does any part of this unit need copying?
        let mut need = false;
        let mut p = pos;
        while p < unit_end {
            let r = src.resolve(p, unit_end - p)?;
            let zero = match r.mapping {
                Mapping::Zero { .. } | Mapping::Backing { .. } => true,
                Mapping::Data { zero, .. } => zero,
                Mapping::Compressed => false,
            };
            if top_only {
                if r.depth == 1 {
                    need = true;
                    break;
                }
            } else if !zero {
                need = true;
                break;
            }
            p += r.len;
        }
        if need {
            let n = (unit_end - pos) as usize;
            let b = &mut buf[..n];
            src.read(pos, b)?;
            if top_only || (whole_units && b.iter().any(|&x| x != 0)) {
                sink.write(pos, b)?;
            } else if !whole_units && b.iter().any(|&x| x != 0) {
                // skip zero 4k blocks inside the unit (qemu-img's -S 4k), in runs
                let mut i = 0usize;
                while i < n {
                    let blk_end = (i + SPARSE_BLOCK).min(n);
                    if b[i..blk_end].iter().all(|&x| x == 0) {
                        i = blk_end;
                        continue;
                    }
                    let mut j = blk_end;
                    while j < n {
                        let e = (j + SPARSE_BLOCK).min(n);
                        if b[j..e].iter().all(|&x| x == 0) {
                            break;
                        }
                        j = e;
                    }
                    sink.write(pos + i as u64, &b[i..j])?;
                    i = j;
                }
            }
        }
        pos = unit_end;
        progress.show(pos);
    }
    sink.finish()?;
    progress.done();
    Ok(())
}

/// Make `[0, size)` of an existing target read as zeros: host zeroing where it can
/// (`PUNCH_HOLE`, `BLKZEROOUT`), zeros written where it cannot.
fn zero_target(t: &dyn crate::io::Storage, size: u64, path: &str) -> Result<()> {
    match t.zero_range(0, size, crate::io::ZeroRange::Deallocate) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::Unsupported => {}
        Err(e) => return Err(Error::io(format!("Could not zero '{path}'"), e)),
    }
    let zeros = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < size {
        let n = (size - off).min(zeros.len() as u64) as usize;
        t.write_at(&zeros[..n], off)
            .map_err(|e| Error::io(format!("Could not write to '{path}' at {off:#x}"), e))?;
        off += n as u64;
    }
    Ok(())
}

/// `-l snapshot.id=ID,snapshot.name=NAME`: only those two keys (qemu-img's
/// internal_snapshot_opts); a plain `-l` value is an ID or a name.
fn check_snapshot_param(sn: &str) -> Result<()> {
    if !sn.starts_with("snapshot.") {
        return Ok(());
    }
    for part in super::split_qemu_opts(sn) {
        let key = part.split_once('=').map_or(part.as_str(), |(k, _)| k);
        if !matches!(key, "snapshot.id" | "snapshot.name") {
            // QEMU reports the option, then the whole parameter
            eprintln!("{}: Invalid parameter '{key}'", crate::error::program());
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("Failed in parsing snapshot param '{sn}'"),
            ));
        }
    }
    Ok(())
}

pub fn run(a: &ConvertArgs) -> Result<i32> {
    let out_fmt = match a.out_format.as_str() {
        "raw" => Format::Raw,
        "qcow2" => Format::Qcow2,
        other => {
            return Err(Error::unsupported(format!(
                "Unknown file format '{other}' (supported: qcow2, raw)"
            )))
        }
    };
    if a.compress && out_fmt != Format::Qcow2 {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            "Compression not supported for this file format",
        ));
    }
    let cache_mode = |c: &Option<String>, what: &str| match c {
        None => Ok(CacheMode::Writeback),
        Some(c) => CacheMode::parse(c).ok_or_else(|| {
            Error::new(
                ErrorKind::InvalidArgument,
                format!("Invalid {what}cache option: {c}"),
            )
        }),
    };
    let dst_cache = cache_mode(&a.cache, "")?;
    let mut opts = OpenOptions {
        policy: super::open_policy(&a.allow_backing)?,
        cache: cache_mode(&a.src_cache, "source ")?,
        locking: super::locking(
            &a.src,
            a.force_share,
            false,
            crate::open::Locking::ConvertSource,
        )?,
        ..open_options(a.format.as_deref())?
    };
    if let Some(sn) = &a.snapshot {
        check_snapshot_param(sn)?;
        opts.qcow2.snapshot = Some(sn.clone());
    }
    let src = super::image_name(&a.src, a.image_opts, &mut opts)?;
    let img = super::open_named(&src, &opts).map_err(|e| {
        if a.snapshot.is_some() && e.to_string().contains("Can't find snapshot") {
            Error::new(
                ErrorKind::NotFound,
                "Failed to load snapshot: Can't find snapshot",
            )
        } else {
            e
        }
    })?;
    if a.snapshot.is_some() && img.layers[0].format == Format::Raw {
        return Err(Error::unsupported(
            "Failed to load snapshot: Block format 'raw' used by device '' does not support temporarily loading internal snapshots",
        ));
    }
    let size = img.chain.size();
    let mut progress = Progress::new(a.progress && !a.quiet, size);
    match out_fmt {
        Format::Raw => {
            if a.backing.is_some() {
                return Err(Error::new(
                    ErrorKind::InvalidArgument,
                    "Backing file not supported for file format 'raw'",
                ));
            }
            if !a.no_create {
                let ctx = |e: Error| e.context(format!("{}: error while converting raw", a.dst));
                let file = crate::block::create_raw::create_empty(&a.dst).map_err(ctx)?;
                crate::block::create_raw::size_created(&file, &a.dst, size).map_err(ctx)?;
                // the creation's locks (which let nobody in) end here; the target's own open
                // takes those of a writer
                drop(file);
            }
            let target = crate::open::open_storage_with(
                &a.dst,
                opts.engine,
                true,
                dst_cache,
                crate::open::target_lock(crate::open::Locking::Tool),
            )
            .map_err(|e| super::named_open_error(&a.dst, e))?;
            if a.no_create {
                // an existing target (often a block device) holds old data: what the source
                // reads as zeros is zeroed first, the rest is then written over it
                let len = target
                    .len()
                    .map_err(|e| Error::io(format!("Could not open '{}'", a.dst), e))?;
                if len < size {
                    return Err(Error::new(
                        ErrorKind::InvalidArgument,
                        "output file is smaller than input file",
                    ));
                }
                zero_target(&*target, size, &a.dst)?;
            }
            let mut sink = RawSink {
                file: target,
                path: a.dst.clone(),
            };
            copy(&img.chain, &mut sink, 2 << 20, false, false, &mut progress)?;
        }
        Format::Qcow2 => {
            if a.no_create {
                return Err(Error::unsupported(
                    "convert -n writes raw targets only in this version (-O raw)",
                ));
            }
            let mut g = super::create::parse_given(Format::Qcow2, &a.options)
                .map_err(|e| e.context(&a.dst))?;
            if let Some(b) = &a.backing {
                g.backing_file = Some(b.clone());
                g.backing_fmt = a.backing_format.clone().or(g.backing_fmt);
            }
            let copts = super::create::qcow2_options(&g, size)?;
            if copts.backing_file.is_some() && copts.backing_format.is_none() {
                return Err(Error::new(
                    ErrorKind::InvalidArgument,
                    "Backing file specified without backing format (use -F)",
                ));
            }
            let cluster = copts.cluster_size;
            let top_only = copts.backing_file.is_some();
            crate::qcow2::create::create_qcow2(&a.dst, &copts)
                .map_err(|e| e.context(format!("{}: error while converting qcow2", a.dst)))?;
            // the output and its -B backing file are the user's own names
            let dopts = OpenOptions {
                format: Some(Format::Qcow2),
                writable: true,
                engine: opts.engine,
                cache: dst_cache,
                policy: crate::open::OpenPolicy::trusted(),
                ..OpenOptions::default()
            };
            let out = open_image(&a.dst, &dopts)?;
            let mut sink = Qcow2Sink {
                image: out,
                compress: a.compress,
                cluster,
            };
            // compressed clusters are written one whole cluster at a time
            let chunk = if a.compress {
                cluster
            } else {
                cluster.clamp(64 << 10, 2 << 20)
            };
            copy(
                &img.chain,
                &mut sink,
                chunk,
                top_only,
                a.compress,
                &mut progress,
            )?;
        }
    }
    Ok(0)
}
