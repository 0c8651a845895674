//! `qnbd compare`: qemu-img compare. Two images (any formats, backing chains followed) are
//! compared by guest contents, walking the block status of both chains as qemu-img does, so
//! ranges both report as zero are not read, with its messages, its offsets and its exit codes:
//! 0 identical, 1 different, 2 an image could not be opened, 3 the allocation could not be
//! queried, 4 data could not be read.
//!
//! The walk is `img_compare` step for step: the chunk at each offset ends where either chain's
//! block status changes (QEMU's `bdrv_block_status_above`, reproduced flag for flag below
//! from what each layer maps, so that strict mode compares the same status words), data chunks
//! are read at most 2 MiB at a time and compared in 512-byte sectors, and the offset reported
//! is the first differing sector.

use super::progress::QemuProgress;
use super::{locking, open_options};
use crate::block::{BlockDevice, Mapping};
use crate::error::{Error, ErrorKind, Result};
use crate::open::{CacheMode, Format, Image, Locking};
use clap::Args;
use std::io::Write;
use std::sync::Arc;

#[derive(Debug, Args)]
#[command(args_override_self = true)]
pub struct CompareArgs {
    /// Format of the first image (qcow2, raw); probed when omitted.
    #[arg(short = 'f', long = "a-format", value_name = "FMT")]
    pub format1: Option<String>,
    /// Format of the second image (qcow2, raw); probed when omitted.
    #[arg(short = 'F', long = "b-format", value_name = "FMT")]
    pub format2: Option<String>,
    /// Strict mode: images of different sizes, or with a different block status anywhere
    /// (allocation, zero, compressed), differ.
    #[arg(short = 's', long = "strict")]
    pub strict: bool,
    /// Host cache mode of both images: writeback (default), none, writethrough, directsync,
    /// unsafe.
    #[arg(short = 'T', long = "cache", value_name = "SRC_CACHE")]
    pub cache: Option<String>,
    /// Share the images with writers: read-only, no lock denied to others (qemu-img -U).
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// Show progress (as qemu-img: a figure every 2 %).
    #[arg(short = 'p', long = "progress")]
    pub progress: bool,
    /// Quiet: no progress and no messages but errors (the exit code tells the result).
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    /// QEMU object definition (TYPE,id=ID,...): accepted for qemu-img's command lines (secrets,
    /// TLS credentials); compare needs none of them. Repeatable.
    #[arg(long = "object", value_name = "OBJDEF")]
    pub objects: Vec<String>,
    #[arg(long = "allow-backing", value_name = "PATH", help = super::ALLOW_BACKING_HELP)]
    pub allow_backing: Vec<String>,
    #[arg(long = "image-opts", help = super::IMAGE_OPTS_HELP)]
    pub image_opts: bool,
    /// The first image: a file name, a block device, json:{...}, or QemuOpts with --image-opts.
    pub filename1: String,
    /// The second image, named the same ways.
    pub filename2: String,
}

// QEMU's block status flags (include/block/block-common.h).
const DATA: u32 = 0x01;
const ZERO: u32 = 0x02;
const OFFSET_VALID: u32 = 0x04;
const ALLOCATED: u32 = 0x10;
const EOF: u32 = 0x20;
const COMPRESSED: u32 = 0x80;

/// qemu-img's `IO_BUF_SIZE`: the most compared per read.
const IO_BUF: u64 = 2 << 20;
const SECTOR: usize = 512;

/// One opened image as the walk sees it.
struct Side<'a> {
    name: &'a str,
    image: Image,
}

impl<'a> Side<'a> {
    fn new(name: &'a str, image: Image) -> Side<'a> {
        Side { name, image }
    }

    fn size(&self) -> u64 {
        self.image.chain.size()
    }

    /// QEMU's `bdrv_co_do_block_status` of chain layer `i` (precise mode): its status word and
    /// how many bytes it holds for (0 at or past the layer's end).
    fn layer_status(&self, i: usize, off: u64, bytes: u64) -> Result<(u32, u64)> {
        let layers = self.image.chain.layers();
        let dev: &Arc<dyn BlockDevice> = &layers[i];
        let total = dev.size();
        if off >= total {
            return Ok((EOF, 0));
        }
        let bytes = bytes.min(total - off);
        if bytes == 0 {
            return Ok((0, 0));
        }
        let run = dev.map(off, bytes)?;
        let pnum = run.len.clamp(1, bytes);
        let ov = |host: Option<u64>| if host.is_some() { OFFSET_VALID } else { 0 };
        let mut ret = match run.mapping {
            // a preallocated cluster over a hole of the host file is data that reads as
            // zeros (QEMU asks the file, `BDRV_BLOCK_RECURSE`, and clears that flag again)
            Mapping::Data { zero, .. } => DATA | OFFSET_VALID | if zero { ZERO } else { 0 },
            Mapping::Zero { host, .. } => ZERO | ov(host),
            Mapping::Compressed => DATA | COMPRESSED,
            Mapping::Backing { host, .. } => ov(host),
        };
        if ret & (DATA | ZERO) != 0 {
            ret |= ALLOCATED;
        } else if dev.supports_backing() {
            match layers.get(i + 1) {
                None => ret |= ZERO,
                Some(below) if off >= below.size() => ret |= ZERO,
                Some(_) => {}
            }
        }
        if off + pnum == total {
            ret |= EOF;
        }
        Ok((ret, pnum))
    }

    /// QEMU's `bdrv_block_status_above(bs, NULL, ...)`: the status of the whole chain at `off`.
    fn status(&self, off: u64, bytes: u64) -> Result<(u32, u64)> {
        let (mut ret, mut pnum) = self.layer_status(0, off, bytes)?;
        if pnum == 0 || ret & ALLOCATED != 0 {
            return Ok((ret, pnum));
        }
        let eof = (ret & EOF != 0).then_some(off + pnum);
        let mut bytes = pnum;
        for i in 1..self.image.chain.layers().len() {
            let (r, p) = self.layer_status(i, off, bytes)?;
            if p == 0 {
                // a short backing file: what it does not cover reads as zeros, allocated there
                ret = ZERO | ALLOCATED;
                pnum = bytes;
                break;
            }
            ret = r;
            pnum = p;
            if ret & ALLOCATED != 0 {
                ret &= !EOF;
                break;
            }
            bytes = pnum;
        }
        if Some(off + pnum) == eof {
            ret |= EOF;
        }
        Ok((ret, pnum))
    }

    fn read(&self, off: u64, buf: &mut [u8]) -> std::result::Result<(), Outcome> {
        self.image.chain.read(off, buf).map_err(|e| {
            Outcome::Failed(
                4,
                format!("Error while reading offset {off} of {}: {e}", self.name),
            )
        })
    }

    fn status_or_fail(&self, off: u64, bytes: u64) -> std::result::Result<(u32, u64), Outcome> {
        self.status(off, bytes).map_err(|_| {
            Outcome::Failed(
                3,
                format!("Sector allocation test failed for {}", self.name),
            )
        })
    }
}

/// How the walk ended early.
enum Outcome {
    /// The images differ: the message for stdout.
    Differ(String),
    /// An error: the exit code and the message for stderr.
    Failed(i32, String),
}

/// qemu-img's `compare_buffers` with 512-byte sectors: whether the first sector differs, and
/// how long the prefix of sectors with that same answer is.
fn compare_buffers(a: &[u8], b: &[u8]) -> (bool, usize) {
    let n = a.len();
    let mut i = n.min(SECTOR);
    let res = a[..i] != b[..i];
    while i < n {
        let l = (n - i).min(SECTOR);
        if (a[i..i + l] != b[i..i + l]) != res {
            break;
        }
        i += l;
    }
    (res, i)
}

/// qemu-img's `find_nonzero`: the start of the first sector holding a non-zero byte.
fn find_nonzero(buf: &[u8]) -> Option<usize> {
    buf.chunks(SECTOR)
        .position(|s| s.iter().any(|&b| b != 0))
        .map(|i| i * SECTOR)
}

/// qemu-img's `check_empty_sectors`: the range of `side` must read as zeros.
fn check_empty(
    side: &Side,
    off: u64,
    len: u64,
    buf: &mut [u8],
) -> std::result::Result<(), Outcome> {
    let b = &mut buf[..len as usize];
    side.read(off, b)?;
    match find_nonzero(b) {
        Some(i) => Err(Outcome::Differ(format!(
            "Content mismatch at offset {}!",
            off + i as u64
        ))),
        None => Ok(()),
    }
}

/// The walk of `img_compare` once both images are open: `Ok` when identical.
fn walk(
    a: &Side,
    b: &Side,
    strict: bool,
    progress: &mut QemuProgress,
    say: &mut dyn FnMut(&str),
) -> std::result::Result<(), Outcome> {
    let (size1, size2) = (a.size(), b.size());
    let total = size1.min(size2);
    let base = size1.max(size2);
    progress.print(0.0, 0);
    if strict && size1 != size2 {
        return Err(Outcome::Differ("Strict mode: Image size mismatch!".into()));
    }
    let step = |progress: &mut QemuProgress, chunk: u64| {
        progress.print((chunk as f32 / base as f32) * 100.0, 100);
    };
    let mut buf1 = crate::io::buf::IoBuf::new(IO_BUF as usize);
    let mut buf2 = crate::io::buf::IoBuf::new(IO_BUF as usize);
    let mut off = 0u64;
    while off < total {
        let (s1, p1) = a.status_or_fail(off, size1 - off)?;
        let (s2, p2) = b.status_or_fail(off, size2 - off)?;
        let (alloc1, alloc2) = (s1 & ALLOCATED != 0, s2 & ALLOCATED != 0);
        let mut chunk = p1.min(p2);
        if strict && s1 != s2 {
            return Err(Outcome::Differ(format!(
                "Strict mode: Offset {off} block status mismatch!"
            )));
        }
        if s1 & ZERO != 0 && s2 & ZERO != 0 {
            // both read as zeros
        } else if alloc1 == alloc2 {
            if alloc1 {
                chunk = chunk.min(IO_BUF);
                let n = chunk as usize;
                a.read(off, &mut buf1[..n])?;
                b.read(off, &mut buf2[..n])?;
                let (differ, same) = compare_buffers(&buf1[..n], &buf2[..n]);
                if differ || same != n {
                    let at = off + if differ { 0 } else { same as u64 };
                    return Err(Outcome::Differ(format!("Content mismatch at offset {at}!")));
                }
            }
        } else {
            chunk = chunk.min(IO_BUF);
            let side = if alloc1 { a } else { b };
            check_empty(side, off, chunk, &mut buf1)?;
        }
        off += chunk;
        step(progress, chunk);
    }
    if size1 != size2 {
        say("Warning: Image size mismatch!");
        let over = if size1 > size2 { a } else { b };
        while off < base {
            let (s, mut chunk) = over.status_or_fail(off, base - off)?;
            if s & ALLOCATED != 0 && s & ZERO == 0 {
                chunk = chunk.min(IO_BUF);
                check_empty(over, off, chunk, &mut buf1)?;
            }
            off += chunk;
            step(progress, chunk);
        }
    }
    Ok(())
}

/// The `--object` definitions: checked as QEMU's `user_creatable_process_cmdline` checks them
/// (a type it knows and an id); none changes how compare opens or reads images.
fn check_objects(objects: &[String]) -> std::result::Result<(), String> {
    const KNOWN: &[&str] = &[
        "secret",
        "secret_keyring",
        "tls-creds-x509",
        "tls-creds-psk",
        "tls-creds-anon",
        "authz-simple",
        "authz-list",
        "authz-listfile",
        "authz-pam",
        "throttle-group",
        "iothread",
    ];
    for o in objects {
        let fields = super::split_qemu_opts(o);
        let mut kind = None;
        let mut id = None;
        for (i, f) in fields.iter().enumerate() {
            match f.split_once('=') {
                Some(("qom-type", v)) => kind = Some(v.to_string()),
                Some(("id", v)) => id = Some(v.to_string()),
                Some(_) => {}
                None if i == 0 => kind = Some(f.clone()),
                None => return Err(format!("Invalid parameter '{f}'")),
            }
        }
        let kind = kind
            .filter(|k| !k.is_empty())
            .ok_or("Parameter 'qom-type' is missing")?;
        if !KNOWN.contains(&kind.as_str()) {
            return Err(format!(
                "Parameter 'qom-type' does not accept value '{kind}'"
            ));
        }
        if id.is_none_or(|i| i.is_empty()) {
            return Err("Parameter 'id' is missing".into());
        }
    }
    Ok(())
}

/// Open one of the two images as qemu-img compare's `img_open` does (read-only, `-U`).
fn open_one(a: &CompareArgs, name: &str, format: Option<&str>, cache: CacheMode) -> Result<Image> {
    if a.image_opts && format.is_some() {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            "--image-opts and --format are mutually exclusive",
        ));
    }
    let mut opts = open_options(None)?;
    if let Some(f) = format {
        opts.format = Some(Format::parse(f).map_err(|_| {
            Error::new(
                ErrorKind::Unsupported,
                format!("Could not open '{name}': Unknown driver '{f}'"),
            )
        })?);
    }
    opts.writable = false;
    opts.cache = cache;
    opts.locking = locking(name, a.force_share, false, Locking::Tool)?;
    opts.policy = super::open_policy(&a.allow_backing)?;
    let file = super::image_name(name, a.image_opts, &mut opts)?;
    super::open_named(&file, &opts)
}

pub fn run(a: &CompareArgs) -> Result<i32> {
    let prog = crate::error::program();
    let fail = |code: i32, msg: &str| {
        eprintln!("{prog}: {msg}");
        code
    };
    if let Err(m) = check_objects(&a.objects) {
        return Ok(fail(2, &m));
    }
    let quiet = a.quiet;
    let mut progress = QemuProgress::new(a.progress && !quiet, 2.0);
    let code = (|| {
        let cache = match &a.cache {
            None => CacheMode::Writeback,
            Some(c) => match CacheMode::parse(c) {
                Some(m) => m,
                None => return fail(2, &format!("Invalid source cache option: {c}")),
            },
        };
        let img1 = match open_one(a, &a.filename1, a.format1.as_deref(), cache) {
            Ok(i) => i,
            Err(e) => return fail(2, &e.to_string()),
        };
        let img2 = match open_one(a, &a.filename2, a.format2.as_deref(), cache) {
            Ok(i) => i,
            Err(e) => return fail(2, &e.to_string()),
        };
        let s1 = Side::new(&a.filename1, img1);
        let s2 = Side::new(&a.filename2, img2);
        let mut say = |line: &str| {
            if !quiet {
                let mut o = std::io::stdout().lock();
                let _ = writeln!(o, "{line}");
                let _ = o.flush();
            }
        };
        match walk(&s1, &s2, a.strict, &mut progress, &mut say) {
            Ok(()) => {
                say("Images are identical.");
                0
            }
            Err(Outcome::Differ(m)) => {
                say(&m);
                1
            }
            Err(Outcome::Failed(code, m)) => fail(code, &m),
        }
    })();
    progress.end();
    Ok(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_compare_by_sector() {
        let a = vec![0u8; 4096];
        let mut b = a.clone();
        assert_eq!(compare_buffers(&a, &b), (false, 4096));
        b[1500] = 1;
        // the prefix of equal sectors ends at the sector holding the difference
        assert_eq!(compare_buffers(&a, &b), (false, 1024));
        b[3] = 1;
        assert_eq!(compare_buffers(&a, &b), (true, 512));
    }

    #[test]
    fn nonzero_is_found_by_sector() {
        let mut b = vec![0u8; 2048];
        assert_eq!(find_nonzero(&b), None);
        b[1027] = 9;
        assert_eq!(find_nonzero(&b), Some(1024));
        let mut short = vec![0u8; 700];
        short[650] = 1;
        assert_eq!(find_nonzero(&short), Some(512));
    }

    #[test]
    fn objects_are_checked_as_qemu_checks_them() {
        assert!(check_objects(&["secret,id=s0,data=x".into()]).is_ok());
        assert_eq!(
            check_objects(&["bogus,id=x".into()]).unwrap_err(),
            "Parameter 'qom-type' does not accept value 'bogus'"
        );
        assert_eq!(
            check_objects(&["id=x".into()]).unwrap_err(),
            "Parameter 'qom-type' is missing"
        );
        assert_eq!(
            check_objects(&["secret,data=x".into()]).unwrap_err(),
            "Parameter 'id' is missing"
        );
    }
}
