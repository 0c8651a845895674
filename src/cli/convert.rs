//! `qnbd convert`: qemu-img convert of one or more sources (concatenated) to raw or qcow2
//! (sparse output as `-S` says, `-l` internal snapshot, `-c` compressed clusters,
//! `-o` creation options, `-B` backing file, progress with `-p`).

use super::open_options;
use super::progress::Progress;
use crate::block::{Mapping, NoBacking};
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
    /// Skip creating the target: write into an existing image (qcow2), file or block device
    /// (raw), at least as large as the sources.
    #[arg(short = 'n')]
    pub no_create: bool,
    /// With -n: the existing target already reads as zeros (it is not zeroed first).
    #[arg(long = "target-is-zero")]
    pub target_is_zero: bool,
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
    /// Sparse detection: zero runs of at least this many bytes inside data are not written
    /// (multiple of 512, at most 16M; default 4k); 0 writes everything (fully allocated).
    #[arg(short = 'S', value_name = "SIZE", allow_hyphen_values = true)]
    pub sparse_size: Option<String>,
    /// Convert this internal snapshot of the (qcow2) source: ID or NAME, or snapshot.id=ID
    /// and/or snapshot.name=NAME.
    #[arg(short = 'l', value_name = "SNAPSHOT")]
    pub snapshot: Option<String>,
    /// The source images (file, block device, json:{...}, nbd:// URI), concatenated in this
    /// order, then the output image (created unless -n; a block device or /dev/null is written
    /// in place).
    #[arg(value_name = "FILE", num_args = 0..)]
    pub files: Vec<String>,
}

/// The sources, one after the other.
struct Sources {
    /// `(offset in the output, image)`.
    parts: Vec<(u64, crate::open::Image)>,
    size: u64,
}

/// How a run of the sources reads.
struct Extent {
    len: u64,
    /// Reads as zeros without reading data (unallocated, zero clusters, host holes).
    zero: bool,
    /// Allocated in the top image of its source.
    top: bool,
}

impl Sources {
    fn part(&self, pos: u64) -> (usize, u64) {
        let i = self.parts.partition_point(|(start, _)| *start <= pos) - 1;
        (i, pos - self.parts[i].0)
    }

    /// The run at `pos` (at most `len` bytes, never past the end of one source).
    fn resolve(&self, pos: u64, len: u64) -> Result<Extent> {
        let (i, off) = self.part(pos);
        let chain = &self.parts[i].1.chain;
        let r = chain.resolve(off, len.min(chain.size() - off))?;
        let zero = match r.mapping {
            Mapping::Zero { .. } | Mapping::Backing { .. } => true,
            Mapping::Data { zero, .. } => zero,
            Mapping::Compressed => false,
        };
        Ok(Extent {
            len: r.len,
            zero,
            top: r.depth == 1,
        })
    }

    /// `(offset in its source, the source's alignment)` at `pos`: qemu-img cuts status runs
    /// at multiples of a source's cluster size (512 for raw).
    fn alignment(&self, pos: u64) -> (u64, u64) {
        let (i, off) = self.part(pos);
        let q = self.parts[i].1.layers[0].qcow2.as_ref();
        (off, q.map_or(512, |q| q.cluster_size().max(512)))
    }

    fn read(&self, mut pos: u64, mut buf: &mut [u8]) -> Result<()> {
        while !buf.is_empty() {
            let (i, off) = self.part(pos);
            let chain = &self.parts[i].1.chain;
            let n = (buf.len() as u64).min(chain.size() - off) as usize;
            let (head, rest) = buf.split_at_mut(n);
            chain.read(off, head)?;
            buf = rest;
            pos += n as u64;
        }
        Ok(())
    }
}

/// qemu-img's default `-S` (4 KiB, in bytes).
const DEFAULT_MIN_SPARSE: u64 = 4096;

/// qemu-img's copy buffer (`IO_BUF_SIZE`, 2 MiB); larger for a target with larger clusters,
/// at most 16 MiB (`MAX_BUF_SECTORS`).
const IO_BUF: u64 = 2 << 20;
const MAX_BUF: u64 = 16 << 20;

/// Where the copy goes.
trait Sink {
    /// Write `data` at `off` (only called for data that is not all zeros).
    fn write(&mut self, off: u64, data: &[u8]) -> Result<()>;
    fn finish(&mut self) -> Result<()>;
    /// Whether the target already holds a data cluster at `off` (written in place, without
    /// the copy-on-write of a new cluster).
    fn allocated(&self, _off: u64) -> Result<bool> {
        Ok(false)
    }
    /// Make a range the copy skips read as zeros (a target that was not zeroed first).
    fn zero(&mut self, _off: u64, _len: u64) -> Result<()> {
        Ok(())
    }
}

struct RawSink {
    file: std::sync::Arc<dyn crate::io::Storage>,
    path: String,
}

impl Sink for RawSink {
    fn zero(&mut self, off: u64, len: u64) -> Result<()> {
        zero_target(&*self.file, off, len, &self.path)
    }
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
    fn zero(&mut self, off: u64, len: u64) -> Result<()> {
        // a partial cluster that holds no data is zeroed whole (QEMU's qcow2 write-zeroes
        // widens an unaligned request over clusters that read as zeros)
        let (cs, size) = (self.cluster, self.image.chain.size());
        let mut from = off;
        let mut to = off + len;
        if !from.is_multiple_of(cs) && !self.allocated(from)? {
            from -= from % cs;
        }
        if !to.is_multiple_of(cs) && to < size && !self.allocated(to)? {
            to = to.div_ceil(cs).saturating_mul(cs).min(size);
        }
        self.image
            .chain
            .write_zeroes(from, to - from, crate::block::ZeroMode::MayUnmap, false)
    }
    fn allocated(&self, off: u64) -> Result<bool> {
        let r = self.image.chain.resolve(off, 1)?;
        Ok(r.depth == 1 && matches!(r.mapping, Mapping::Data { .. } | Mapping::Compressed))
    }
}

/// Copy in whole units of `chunk` bytes (aligned): every unit that holds anything that does
/// not read as zeros (with `top_only`, anything the source's top layer holds; with `fully`,
/// every unit). Used for compressed output (whole clusters) and `-B`.
fn copy_units(
    src: &Sources,
    sink: &mut dyn Sink,
    chunk: u64,
    top_only: bool,
    fully: bool,
    zero_skipped: bool,
    progress: &mut Progress,
) -> Result<()> {
    let size = src.size;
    let mut buf = crate::io::buf::IoBuf::new(chunk as usize);
    let mut pos = 0u64;
    progress.show(0);
    while pos < size {
        let unit_end = ((pos / chunk + 1) * chunk).min(size);
        // does any part of this unit need copying?
        let mut need = fully;
        let mut p = pos;
        while p < unit_end && !need {
            let r = src.resolve(p, unit_end - p)?;
            need = if top_only { r.top } else { !r.zero };
            p += r.len;
        }
        if need {
            let n = (unit_end - pos) as usize;
            let b = &mut buf[..n];
            src.read(pos, b)?;
            if top_only || fully || b.iter().any(|&x| x != 0) {
                sink.write(pos, b)?;
            } else if zero_skipped {
                sink.zero(pos, n as u64)?;
            }
        } else if zero_skipped {
            sink.zero(pos, unit_end - pos)?;
        }
        pos = unit_end;
        progress.show(pos);
    }
    sink.finish()?;
    progress.done();
    Ok(())
}

const SECTOR: usize = 512;

fn sector_is_zero(buf: &[u8], i: usize) -> bool {
    let end = ((i + 1) * SECTOR).min(buf.len());
    buf[i * SECTOR..end].iter().all(|&x| x == 0)
}

/// qemu-img's `is_allocated_sectors`: the length in sectors of the run of equal (zero or data)
/// sectors at the start of `buf` (`n` sectors, the first at sector `sector`), its end moved to
/// an `alignment` boundary where that saves a partial write; `(data, sectors)`.
fn allocated_run(buf: &[u8], n: usize, sector: u64, alignment: u64) -> (bool, usize) {
    let zero = sector_is_zero(buf, 0);
    let mut i = 1;
    while i < n && sector_is_zero(buf, i) == zero {
        i += 1;
    }
    if i == n {
        return (!zero, i);
    }
    let mut zero = zero;
    let tail = ((sector + i as u64) & (alignment - 1)) as usize;
    if tail != 0 {
        if zero && i <= tail {
            // the data that follows rewrites this unaligned head anyway
            zero = false;
        }
        if !zero {
            i = (i + alignment as usize - tail).min(n);
        } else {
            i -= tail;
        }
    }
    (!zero, i)
}

/// qemu-img's `is_allocated_sectors_min`: a leading zero run is skipped whatever its length;
/// after data, zero runs shorter than `min` sectors are written as data.
fn allocated_run_min(
    buf: &[u8],
    n: usize,
    min: usize,
    sector: u64,
    alignment: u64,
) -> (bool, usize) {
    let min = min.min(n);
    let (data, first) = allocated_run(buf, n, sector, alignment);
    if !data {
        return (false, first);
    }
    let (mut used, mut checked) = (first, first);
    while checked < n {
        let (data, len) = allocated_run(
            &buf[checked * SECTOR..],
            n - checked,
            sector + checked as u64,
            alignment,
        );
        checked += len;
        if data {
            used = checked;
        } else if len >= min {
            break;
        }
    }
    (true, used)
}

/// Copy as qemu-img does without `-c` and `-B`: runs that read as zeros are skipped (the target
/// reads as zeros), data runs are read `buf_size` bytes at a time and written but for zero runs
/// of at least `min_sparse` bytes (`-S`; 0: everything is written, zeros included). Writes are
/// widened to whole units of `grain` bytes (a qcow2 target's clusters, which QEMU allocates
/// whole, their untouched part written as zeros).
#[allow(clippy::too_many_arguments)]
fn copy_sparse(
    src: &Sources,
    sink: &mut dyn Sink,
    min_sparse: u64,
    buf_size: u64,
    grain: u64,
    check_target: bool,
    zero_skipped: bool,
    progress: &mut Progress,
) -> Result<()> {
    let size = src.size;
    let mut buf = crate::io::buf::IoBuf::new(buf_size as usize);
    let mut wide = Vec::new();
    // where the widened writes got to
    let mut written = 0u64;
    let min = (min_sparse / SECTOR as u64) as usize;
    // qemu: MAX(pow2floor(min_sparse), the target's request alignment) in sectors
    let alignment = if min == 0 {
        1
    } else {
        1u64 << (usize::BITS - 1 - min.leading_zeros())
    };
    let mut pos = 0u64;
    progress.show(0);
    while pos < size {
        let r = src.resolve(pos, size - pos)?;
        let mut run = r.len;
        let (in_part, align) = src.alignment(pos);
        let tail = (in_part + run) % align;
        if run > tail {
            run -= tail;
        }
        // a sector is data or zeros as a whole (the zero tail of an unaligned raw file is part
        // of its last sector)
        let zero = r.zero && pos.is_multiple_of(SECTOR as u64);
        if !zero {
            run = (pos + run).div_ceil(SECTOR as u64) * SECTOR as u64 - pos;
            run = run.min(size - pos);
        }
        let n = run.min(buf_size);
        if zero && min_sparse != 0 {
            if zero_skipped {
                sink.zero(pos, n)?;
            }
            pos += n;
            progress.show(pos);
            continue;
        }
        let b = &mut buf[..n as usize];
        src.read(pos, b)?;
        let sectors = (n as usize).div_ceil(SECTOR);
        let mut i = 0usize;
        while i < sectors {
            let (data, len) = if min == 0 {
                (true, sectors - i)
            } else {
                allocated_run_min(
                    &b[i * SECTOR..],
                    sectors - i,
                    min,
                    pos / SECTOR as u64 + i as u64,
                    alignment,
                )
            };
            if !data && zero_skipped {
                let from = pos + (i * SECTOR) as u64;
                let to = (pos + ((i + len) * SECTOR) as u64).min(pos + n);
                sink.zero(from, to - from)?;
            }
            if data {
                let from = pos + (i * SECTOR) as u64;
                let to = (pos + ((i + len) * SECTOR) as u64).min(pos + n);
                if grain <= 1 {
                    sink.write(from, &b[i * SECTOR..(to - pos) as usize])?;
                } else {
                    // a new cluster is written whole (QEMU's copy-on-write of zeros); one the
                    // target already holds (`--target-is-zero` over old data) in place
                    let head = from - from % grain;
                    let mut wfrom = if check_target && sink.allocated(head)? {
                        from
                    } else {
                        head
                    };
                    wfrom = wfrom.max(written);
                    let tail = to.div_ceil(grain).saturating_mul(grain).min(size);
                    let wto = if tail > to && check_target && sink.allocated(to)? {
                        to
                    } else {
                        tail
                    };
                    if wto > wfrom {
                        if wfrom >= pos && wto <= pos + n {
                            sink.write(wfrom, &b[(wfrom - pos) as usize..(wto - pos) as usize])?;
                        } else {
                            wide.resize((wto - wfrom) as usize, 0);
                            src.read(wfrom, &mut wide)?;
                            sink.write(wfrom, &wide)?;
                        }
                        written = wto;
                    }
                }
            }
            i += len;
        }
        pos += n;
        progress.show(pos);
    }
    sink.finish()?;
    progress.done();
    Ok(())
}

/// Make `[0, size)` of an existing target read as zeros: host zeroing where it can
/// (`PUNCH_HOLE`, `BLKZEROOUT`), zeros written where it cannot.
fn zero_target(t: &dyn crate::io::Storage, start: u64, size: u64, path: &str) -> Result<()> {
    match t.zero_range(start, size, crate::io::ZeroRange::Deallocate) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::Unsupported => {}
        Err(e) => return Err(Error::io(format!("Could not zero '{path}'"), e)),
    }
    let zeros = vec![0u8; 1 << 20];
    let mut off = start;
    let end = start + size;
    while off < end {
        let n = (end - off).min(zeros.len() as u64) as usize;
        t.write_at(&zeros[..n], off)
            .map_err(|e| Error::io(format!("Could not write to '{path}' at {off:#x}"), e))?;
        off += n as u64;
    }
    Ok(())
}

/// `-S SIZE` (qemu-img's cvtnum and its checks).
fn parse_min_sparse(v: &str) -> Result<u64> {
    let what = "Invalid buffer size for sparse output specified";
    let arg = |m: String| Error::new(ErrorKind::InvalidArgument, m);
    let n = match crate::units::parse_size(v) {
        Some(n) if n <= i64::MAX as u64 => n,
        Some(_) => {
            return Err(arg(format!(
                "{what}. Must be between 0 and 9223372036854775807."
            )))
        }
        None if v.starts_with('-') && crate::units::parse_size(&v[1..]).is_some() => {
            return Err(arg(format!(
                "{what}. Must be between 0 and 9223372036854775807."
            )))
        }
        None => return Err(arg(format!("{what}: '{v}'."))),
    };
    if n % 512 != 0 || n > MAX_BUF {
        return Err(arg(format!(
            "{what}. Valid sizes are multiples of 512 up to {MAX_BUF}. Select 0 to disable sparse detection (fully allocates output)."
        )));
    }
    Ok(n)
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
    if super::create::asks_option_help(&a.options) {
        // as qemu-img: the output format's creation options, merged with the protocol's when a
        // target file is named, and nothing converted
        print!(
            "{}",
            super::create::option_help(out_fmt, a.files.len() >= 2)
        );
        return Ok(0);
    }
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
    if a.target_is_zero && !a.no_create {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            "--target-is-zero requires use of -n flag",
        ));
    }
    let min_sparse = match &a.sparse_size {
        None => DEFAULT_MIN_SPARSE,
        Some(v) => parse_min_sparse(v)?,
    };
    let Some((dst, srcs)) = a.files.split_last().filter(|(_, s)| !s.is_empty()) else {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            "Must specify image file name",
        ));
    };
    let dst = dst.clone();
    if srcs.len() > 1 && a.snapshot.is_some() {
        return Err(Error::unsupported(
            "No support for concatenating multiple snapshot",
        ));
    }
    if srcs.len() > 1 && a.backing.is_some() {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            "Having a backing file for the target makes no sense when concatenating multiple input images",
        ));
    }
    if let Some(sn) = &a.snapshot {
        check_snapshot_param(sn)?;
    }
    let mut parts = Vec::new();
    let mut size = 0u64;
    for src in srcs {
        let mut opts = OpenOptions {
            policy: super::open_policy(&a.allow_backing)?,
            cache: cache_mode(&a.src_cache, "source ")?,
            locking: super::locking(
                src,
                a.force_share,
                false,
                crate::open::Locking::ConvertSource,
            )?,
            ..open_options(a.format.as_deref())?
        };
        opts.qcow2.snapshot = a.snapshot.clone();
        let name = super::image_name(src, a.image_opts, &mut opts)?;
        let img = super::open_named(&name, &opts).map_err(|e| {
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
        let n = img.chain.size();
        parts.push((size, img));
        size = size
            .checked_add(n)
            .ok_or_else(|| Error::invalid("the sources are too large together"))?;
    }
    let engine = open_options(a.format.as_deref())?.engine;
    if a.no_create && !a.options.is_empty() {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            "-o has no effect when skipping image creation",
        ));
    }
    if a.target_is_zero && a.backing.is_some() {
        // qemu-img reports it and stops, with exit status 0 (nothing is converted)
        eprintln!(
            "{}: Cannot use --target-is-zero when the destination image has a backing file",
            crate::error::program()
        );
        return Ok(0);
    }
    let src = Sources { parts, size };
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
                let ctx = |e: Error| e.context(format!("{}: error while converting raw", dst));
                let file = crate::block::create_raw::create_empty(&dst).map_err(ctx)?;
                crate::block::create_raw::size_created(&file, &dst, size).map_err(ctx)?;
                // the creation's locks (which let nobody in) end here; the target's own open
                // takes those of a writer
                drop(file);
            }
            let target = crate::open::open_storage_with(
                &dst,
                engine,
                true,
                dst_cache,
                crate::open::target_lock(crate::open::Locking::Tool),
            )
            .map_err(|e| super::named_open_error(&dst, e))?;
            if a.no_create {
                // an existing target (often a block device) holds old data: what the source
                // reads as zeros is zeroed first, the rest is then written over it
                let len = target
                    .len()
                    .map_err(|e| Error::io(format!("Could not open '{}'", dst), e))?;
                if len < size {
                    return Err(Error::new(
                        ErrorKind::InvalidArgument,
                        "output file is smaller than input file",
                    ));
                }
            }
            let mut sink = RawSink {
                file: target,
                path: dst.clone(),
            };
            copy_sparse(
                &src,
                &mut sink,
                min_sparse,
                IO_BUF,
                1,
                false,
                // QEMU zeroes each range it skips (a host hole where it can)
                a.no_create && !a.target_is_zero,
                &mut progress,
            )?;
        }
        Format::Qcow2 => {
            // the output and its -B backing file are the user's own names
            let dopts = OpenOptions {
                format: Some(Format::Qcow2),
                writable: true,
                engine,
                cache: dst_cache,
                policy: crate::open::OpenPolicy::trusted(),
                ..OpenOptions::default()
            };
            let mut zero_per_run = false;
            let (out, cluster, top_only) = if a.no_create {
                // an existing qcow2 image, at least as large as the sources
                let out = open_image(&dst, &dopts).map_err(|e| {
                    let m = e.to_string();
                    if m.contains("not in qcow2 format") {
                        e
                    } else {
                        e.context(format!("Could not open '{dst}'"))
                    }
                })?;
                if out.chain.size() < size {
                    return Err(Error::new(
                        ErrorKind::InvalidArgument,
                        "output file is smaller than input file",
                    ));
                }
                let cluster = out.layers[0]
                    .qcow2
                    .as_ref()
                    .map_or(65536, |q| q.cluster_size());
                let top_only = a.backing.is_some();
                // what the sources read as zeros must read as zeros in the target: QEMU zeroes
                // each range it skips (zero clusters where whole ones are, v3)
                zero_per_run = !a.target_is_zero && !top_only;
                (out, cluster, top_only)
            } else {
                let mut g = super::create::parse_given(Format::Qcow2, &a.options)
                    .map_err(|e| e.context(&dst))?;
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
                crate::qcow2::create::create_qcow2(&dst, &copts)
                    .map_err(|e| e.context(format!("{}: error while converting qcow2", dst)))?;
                let out = open_image(&dst, &dopts)?;
                (out, copts.cluster_size, copts.backing_file.is_some())
            };
            let mut sink = Qcow2Sink {
                image: out,
                compress: a.compress,
                cluster,
            };
            if a.compress || top_only {
                // compressed clusters are written one whole cluster at a time
                let chunk = if a.compress {
                    cluster
                } else {
                    cluster.clamp(64 << 10, 2 << 20)
                };
                let fully = min_sparse == 0 && !top_only;
                copy_units(
                    &src,
                    &mut sink,
                    chunk,
                    top_only,
                    fully,
                    zero_per_run,
                    &mut progress,
                )?;
            } else {
                let buf = cluster.clamp(IO_BUF, MAX_BUF);
                copy_sparse(
                    &src,
                    &mut sink,
                    min_sparse,
                    buf,
                    cluster,
                    a.target_is_zero || zero_per_run,
                    zero_per_run,
                    &mut progress,
                )?;
            }
        }
    }
    Ok(0)
}
