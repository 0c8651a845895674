//! The one entry point for opening images: probe the format, apply the open policy (which files
//! an image may name), choose the I/O engine, and build the backing chain.
//!
//! Backing and data file names found inside an image are plain local file names, resolved
//! against the directory of the image that names them (as QEMU's `path_combine`); `json:` or
//! `nbd://` strings are never interpreted. Loops are detected by (device, inode) identity and
//! the depth is capped, so a hostile chain cannot spin or exhaust memory.

use crate::block::raw::RawDevice;
use crate::block::{BlockDevice, Chain};
use crate::error::{Error, ErrorKind, Result};
use crate::io::lock::{LockSpec, Perm};
use crate::io::{sync::SyncFile, Engine, Storage};
use crate::qcow2::{Qcow2, Qcow2Options};
use std::fs::OpenOptions as FsOpenOptions;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

/// Image formats this build reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Qcow2,
    Raw,
}

impl Format {
    pub fn parse(s: &str) -> Result<Format> {
        match s {
            "qcow2" => Ok(Format::Qcow2),
            "raw" => Ok(Format::Raw),
            other => Err(Error::unsupported(format!(
                "Unknown driver '{other}' (supported formats: qcow2, raw)"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Format::Qcow2 => "qcow2",
            Format::Raw => "raw",
        }
    }
}

/// Where files named inside images (backing files, external data files) may be.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Allowed {
    /// Anywhere: the caller trusts the images (and names their files itself).
    Anywhere,
    /// In the directory of the top image, or below it.
    #[default]
    ImageDir,
    /// In one of these directories (or below), or exactly one of these files; each entry
    /// canonical (see [`canonical_allowed`]).
    Paths(Vec<PathBuf>),
}

/// What an image may make us open, and how far.
#[derive(Debug, Clone)]
pub struct OpenPolicy {
    /// Open backing files named inside images.
    pub allow_backing: bool,
    /// Open external data files named inside images.
    pub allow_data_file: bool,
    /// Where those files may be.
    pub allowed: Allowed,
    /// Longest chain accepted (top image included).
    pub max_depth: usize,
}

impl OpenPolicy {
    /// Nothing an image names is opened (`--allow-backing none`).
    pub fn no_references() -> Self {
        OpenPolicy {
            allow_backing: false,
            allow_data_file: false,
            ..OpenPolicy::default()
        }
    }

    /// Whatever an image names is opened (files the user named on the command line).
    pub fn trusted() -> Self {
        OpenPolicy {
            allowed: Allowed::Anywhere,
            ..OpenPolicy::default()
        }
    }
}

/// Canonical form of an `--allow-backing` entry (it must exist).
pub fn canonical_allowed(path: &str) -> Result<PathBuf> {
    std::fs::canonicalize(path).map_err(|e| Error::io(format!("--allow-backing '{path}'"), e))
}

/// The places a chain opened from `top` may reach, or `None` for anywhere.
fn allowed_roots(top: &str, policy: &OpenPolicy) -> Result<Option<Vec<PathBuf>>> {
    Ok(match &policy.allowed {
        Allowed::Anywhere => None,
        Allowed::Paths(p) => Some(p.clone()),
        Allowed::ImageDir => {
            let dir = match Path::new(top).parent() {
                Some(d) if !d.as_os_str().is_empty() => d,
                _ => Path::new("."),
            };
            let dir = std::fs::canonicalize(dir).map_err(|e| Error::open_failed(top, e))?;
            Some(vec![dir])
        }
    })
}

/// Check a file an image names (resolved to `path`) against the allowed places; returns the
/// path to open (the canonical one when checked).
fn admit(path: &str, roots: Option<&[PathBuf]>) -> Result<String> {
    let Some(roots) = roots else {
        return Ok(path.to_string());
    };
    let canon = std::fs::canonicalize(path).map_err(|e| Error::open_failed(path, e))?;
    if !roots.iter().any(|r| canon.starts_with(r)) {
        return Err(Error::new(
            ErrorKind::Denied,
            format!(
                "'{path}' resolves to '{}', outside the places allowed for files named by images (see --allow-backing)",
                canon.display()
            ),
        ));
    }
    canon.to_str().map(str::to_string).ok_or_else(|| {
        Error::new(
            ErrorKind::Denied,
            format!("Could not open '{path}': the path is not UTF-8"),
        )
    })
}

/// Default cap on chain length: deep enough for long snapshot chains, small enough that a
/// hostile or looping chain fails fast.
pub const DEFAULT_MAX_DEPTH: usize = 256;

impl Default for OpenPolicy {
    fn default() -> Self {
        OpenPolicy {
            allow_backing: true,
            allow_data_file: true,
            allowed: Allowed::ImageDir,
            max_depth: DEFAULT_MAX_DEPTH,
        }
    }
}

/// Host cache mode of the image files, QEMU's `cache=` (qemu-nbd `--cache`, qemu-img `-t`):
///
/// | mode | `O_DIRECT` | every write flushed | flush syncs |
/// |---|---|---|---|
/// | `writeback` (default) | no | no | yes |
/// | `none` | yes | no | yes |
/// | `writethrough` | no | yes | yes |
/// | `directsync` | yes | yes | yes |
/// | `unsafe` | no | no | no |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheMode {
    #[default]
    Writeback,
    None,
    Writethrough,
    DirectSync,
    Unsafe,
}

impl CacheMode {
    /// QEMU's names (`bdrv_parse_cache_mode`: `off` is `none`).
    pub fn parse(s: &str) -> Option<CacheMode> {
        match s {
            "writeback" => Some(CacheMode::Writeback),
            "none" | "off" => Some(CacheMode::None),
            "writethrough" => Some(CacheMode::Writethrough),
            "directsync" => Some(CacheMode::DirectSync),
            "unsafe" => Some(CacheMode::Unsafe),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            CacheMode::Writeback => "writeback",
            CacheMode::None => "none",
            CacheMode::Writethrough => "writethrough",
            CacheMode::DirectSync => "directsync",
            CacheMode::Unsafe => "unsafe",
        }
    }

    /// Files are opened with `O_DIRECT` (QEMU's `cache.direct`).
    pub fn direct(self) -> bool {
        matches!(self, CacheMode::None | CacheMode::DirectSync)
    }

    /// Every write is durable before it completes (QEMU's `cache.writeback=off`).
    pub fn write_through(self) -> bool {
        matches!(self, CacheMode::Writethrough | CacheMode::DirectSync)
    }

    /// Flushes succeed without syncing (QEMU's `cache.no-flush`).
    pub fn no_flush(self) -> bool {
        self == CacheMode::Unsafe
    }
}

/// The image locks a command takes, as the QEMU tool it stands for would (see
/// [`crate::io::lock`]): QEMU, qemu-img, qemu-nbd and qnbd then refuse each other's conflicting
/// opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Locking {
    /// Most of qemu-img's commands (map, check, compare, bench, bitmap): a reader holds read, a
    /// writer read and write; neither denies anything by itself (the qcow2 driver adds its own
    /// claims, see [`lock_spec`]).
    #[default]
    Tool,
    /// `qemu-img convert`'s source: read, and nobody may write or resize it meanwhile.
    ConvertSource,
    /// `qemu-img resize`: read, write and resize.
    Resize,
    /// `qemu-img info`: metadata only, so no consistent read is held.
    Inspect,
    /// qemu-nbd: like a guest, it lets others write a raw image but nobody resize it.
    Server,
    /// `-U` / `--force-share`: read-only, and nothing denied to anyone.
    ForceShare,
    /// No locks (`file.locking=off`).
    Off,
}

/// Which file of a layer is being opened, for its locks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FileRole {
    /// The image the command names.
    Top,
    /// A backing file below it.
    Backing,
    /// The external data file of a qcow2 layer.
    DataFile,
}

/// The locks `locking` takes on one file: the permissions of QEMU's tool, then those its
/// format driver adds (qcow2 lets nobody else write or resize the file that holds its
/// metadata, and needs to grow it when writing). Matches what QEMU 10 locks, measured in
/// `/proc/locks` (see `qcow2-spec-tests/tests/locks.rs`).
fn lock_spec(locking: Locking, format: Format, role: FileRole, writable: bool) -> LockSpec {
    const W: Perm = Perm::WRITE;
    const RS: Perm = Perm::RESIZE;
    let rw = |w: bool| {
        if w {
            Perm::READ | W | RS
        } else {
            Perm::READ
        }
    };
    let mut spec = match (locking, role) {
        (Locking::Off, _) => return LockSpec::default(),
        (Locking::ForceShare, _) => {
            return LockSpec {
                perm: Perm::READ,
                deny: Perm::NONE,
            }
        }
        (_, FileRole::DataFile) => {
            return LockSpec {
                perm: rw(writable),
                deny: RS,
            }
        }
        (_, FileRole::Backing) => LockSpec {
            perm: Perm::READ,
            deny: Perm::NONE,
        },
        (Locking::Inspect, FileRole::Top) => LockSpec::default(),
        (Locking::Tool, FileRole::Top) => LockSpec {
            perm: if writable { Perm::READ | W } else { Perm::READ },
            deny: Perm::NONE,
        },
        (Locking::Resize, FileRole::Top) => LockSpec {
            perm: rw(true),
            deny: Perm::NONE,
        },
        (Locking::ConvertSource, FileRole::Top) => LockSpec {
            perm: Perm::READ,
            deny: W | RS,
        },
        (Locking::Server, FileRole::Top) => LockSpec {
            perm: if writable { Perm::READ | W } else { Perm::READ },
            deny: RS,
        },
    };
    if format == Format::Qcow2 {
        spec.deny = spec.deny | W | RS;
        if writable {
            spec.perm = spec.perm | RS;
        }
    }
    spec
}

#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// Format of the top image; probed when `None`.
    pub format: Option<Format>,
    pub engine: Engine,
    /// Host cache mode of every file of the chain (data files included).
    pub cache: CacheMode,
    pub writable: bool,
    /// Image locks taken on every file opened (top, backing files, data files).
    pub locking: Locking,
    pub policy: OpenPolicy,
    /// Do not open the backing chain (qemu-img info without --backing-chain).
    pub no_backing: bool,
    /// Metadata only: no data file needed, encryption tolerated (qemu-img info).
    pub no_io: bool,
    /// Every write becomes compressed clusters of the top image (`driver=compress`).
    pub compress_writes: bool,
    pub qcow2: Qcow2Options,
}

/// One opened layer with what `info` needs to know about it.
#[derive(Debug, Clone)]
pub struct OpenedLayer {
    /// The name the layer was opened by (as given, or combined from its parent's backing name).
    pub filename: String,
    pub format: Format,
    pub storage: Arc<dyn Storage>,
    pub device: Arc<dyn BlockDevice>,
    pub qcow2: Option<Arc<Qcow2>>,
    /// The backing name as stored in the image.
    pub backing_filename: Option<String>,
    /// The backing name resolved against this image's directory.
    pub full_backing_filename: Option<String>,
    pub backing_format: Option<String>,
    /// (device, inode) of the external data file, when there is one.
    pub data_identity: Option<(u64, u64)>,
}

#[derive(Debug, Clone)]
pub struct Image {
    pub layers: Vec<OpenedLayer>,
    pub chain: Chain,
}

/// Whether io_uring works here (probed once per process).
pub fn uring_available() -> bool {
    #[cfg(feature = "uring")]
    {
        static OK: OnceLock<bool> = OnceLock::new();
        *OK.get_or_init(|| crate::io::uring::probe().is_ok())
    }
    #[cfg(not(feature = "uring"))]
    {
        let _ = OnceLock::<bool>::new;
        false
    }
}

/// Open a host file with the chosen engine; writable files get a sticky flush-failure state.
/// No image lock is taken: see [`open_storage_with`].
pub fn open_storage(path: &str, engine: Engine, writable: bool) -> Result<Arc<dyn Storage>> {
    open_storage_with(
        path,
        engine,
        writable,
        CacheMode::Writeback,
        LockSpec::default(),
    )
}

/// [`open_storage`] in a host cache mode (`O_DIRECT` files get the alignment layer
/// [`crate::io::direct::DirectFile`], `unsafe` ignores flushes), claiming `lock` on the file
/// before anything is read; a conflict closes the file again and is an [`ErrorKind::Busy`].
pub fn open_storage_with(
    path: &str,
    engine: Engine,
    writable: bool,
    cache: CacheMode,
    lock: LockSpec,
) -> Result<Arc<dyn Storage>> {
    let mut s = open_storage_raw(path, engine, writable, cache.direct(), lock)?;
    if cache.no_flush() {
        s = Arc::new(crate::io::noflush::NoFlush::new(s));
    }
    Ok(if writable {
        Arc::new(crate::io::StickySync::new(s))
    } else {
        s
    })
}

fn open_storage_raw(
    path: &str,
    engine: Engine,
    writable: bool,
    direct: bool,
    lock: LockSpec,
) -> Result<Arc<dyn Storage>> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = FsOpenOptions::new()
        .read(true)
        .write(writable)
        .custom_flags(if direct { libc::O_DIRECT } else { 0 })
        .open(path)
        .map_err(|e| {
            if direct && e.raw_os_error() == Some(libc::EINVAL) {
                // what open(2) answers on file systems without direct I/O (ramfs, old tmpfs)
                Error::new(
                    ErrorKind::Unsupported,
                    format!("Could not open '{path}': filesystem does not support O_DIRECT"),
                )
            } else {
                Error::open_failed(path, e)
            }
        })?;
    if file.metadata().map(|m| m.is_dir()).unwrap_or(false) {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!("Could not open '{path}': Is a directory"),
        ));
    }
    if !lock.is_empty() {
        crate::io::lock::claim_file(&file, lock, path)
            .map_err(|e| e.context(format!("Could not open '{path}'")))?;
    }
    if !direct {
        return open_engine(path, file, engine);
    }
    let align = crate::io::direct::probe_alignment(&file);
    let inner = open_engine(path, file, engine)?;
    crate::io::direct::DirectFile::new(inner, align)
        .map(|d| Arc::new(d) as Arc<dyn Storage>)
        .map_err(|e| Error::open_failed(path, e))
}

fn open_engine(path: &str, file: std::fs::File, engine: Engine) -> Result<Arc<dyn Storage>> {
    match engine {
        Engine::Sync => Ok(Arc::new(SyncFile::new(file))),
        Engine::Auto | Engine::Uring => {
            #[cfg(feature = "uring")]
            {
                if uring_available() {
                    match crate::io::uring::UringFile::new(
                        file.try_clone().map_err(|e| Error::open_failed(path, e))?,
                    ) {
                        Ok(u) => return Ok(Arc::new(u)),
                        Err(e) if engine == Engine::Uring => {
                            return Err(Error::io("io_uring is not available", e))
                        }
                        Err(_) => {}
                    }
                } else if engine == Engine::Uring {
                    return Err(Error::unsupported(
                        "io_uring is not available on this system (use --aio threads)",
                    ));
                }
            }
            #[cfg(not(feature = "uring"))]
            if engine == Engine::Uring {
                return Err(Error::unsupported("this build has no io_uring support"));
            }
            Ok(Arc::new(SyncFile::new(file)))
        }
    }
}

/// Guess the format from the first bytes, as QEMU's probing would for the formats we know.
pub fn probe(storage: &dyn Storage) -> Result<Format> {
    let mut head = [0u8; crate::block::raw::PROBE_LEN];
    let mut n = 0;
    while n < head.len() {
        match storage.read_at(&mut head[n..], n as u64) {
            Ok(0) => break,
            Ok(got) => n += got,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(Error::io(
                    "Could not read image for determining its format",
                    e,
                ))
            }
        }
    }
    match crate::block::raw::probed_format(&head[..n]) {
        None => Ok(Format::Raw),
        Some("qcow2") => Ok(Format::Qcow2),
        Some(name) => Err(Error::unsupported(format!(
            "Image format '{name}' is not supported (supported formats: qcow2, raw)"
        ))),
    }
}

/// QEMU's `path_combine`: a relative `name` is taken relative to the directory of `base`.
pub fn combine_path(base: &str, name: &str) -> String {
    if name.starts_with('/') {
        return name.to_string();
    }
    match base.rfind('/') {
        Some(i) => format!("{}{}", &base[..=i], name),
        None => name.to_string(),
    }
}

/// Open the file of one image (`filename` in messages, at `open_path`), probing its format
/// unless given, and claim the locks `lock` gives for that format. A probed format is only
/// known once the file is open, so probing reads the magic through an unlocked open first (as
/// QEMU's probe does) and then opens the file for use with its locks.
fn open_file(
    filename: &str,
    open_path: &str,
    format: Option<Format>,
    engine: Engine,
    writable: bool,
    cache: CacheMode,
    lock: impl Fn(Format) -> LockSpec,
) -> Result<(Arc<dyn Storage>, Format)> {
    let format = match format {
        Some(f) => f,
        None => {
            let unlocked = open_storage_with(
                open_path,
                engine,
                false,
                CacheMode::Writeback,
                LockSpec::default(),
            )?;
            probe(&*unlocked).map_err(|e| e.context(format!("Could not open '{filename}'")))?
        }
    };
    let storage = open_storage_with(open_path, engine, writable, cache, lock(format))?;
    Ok((storage, format))
}

/// Open the single file `path` as the image a command names (no backing chain, no data
/// file), with the locks of `locking`: for commands that read the image's own structures
/// (`check`).
pub fn open_top_file(
    path: &str,
    format: Option<Format>,
    engine: Engine,
    writable: bool,
    locking: Locking,
) -> Result<(Arc<dyn Storage>, Format)> {
    open_file(
        path,
        path,
        format,
        engine,
        writable,
        CacheMode::Writeback,
        |f| lock_spec(locking, f, FileRole::Top, writable),
    )
}

/// The locks `locking` takes on a raw file a command writes whole (a `convert` target): read
/// and write held, nothing denied, as qemu-img holds its target.
pub fn target_lock(locking: Locking) -> LockSpec {
    match locking {
        Locking::Off => LockSpec::default(),
        _ => LockSpec {
            perm: Perm::READ | Perm::WRITE,
            deny: Perm::NONE,
        },
    }
}

/// Open one layer known as `filename`, from the file at `open_path`.
fn open_layer(
    filename: &str,
    open_path: &str,
    format: Option<Format>,
    opts: &OpenOptions,
    top: bool,
    roots: Option<&[PathBuf]>,
) -> Result<OpenedLayer> {
    let writable = opts.writable && top;
    let role = if top {
        FileRole::Top
    } else {
        FileRole::Backing
    };
    let probed = format.is_none();
    let (storage, format) = open_file(
        filename,
        open_path,
        format,
        opts.engine,
        writable,
        opts.cache,
        |f| lock_spec(opts.locking, f, role, writable),
    )?;
    match format {
        Format::Raw => {
            let dev = if writable {
                RawDevice::new_writable(storage.clone())?
            } else {
                RawDevice::new(storage.clone())?
            };
            let dev = Arc::new(dev.probed(probed));
            Ok(OpenedLayer {
                filename: filename.to_string(),
                format,
                storage,
                device: dev,
                qcow2: None,
                backing_filename: None,
                full_backing_filename: None,
                backing_format: None,
                data_identity: None,
            })
        }
        Format::Qcow2 => {
            let qopts = Qcow2Options {
                no_io: opts.no_io,
                access: if opts.writable && top {
                    crate::block::Access::ReadWrite
                } else {
                    crate::block::Access::ReadOnly
                },
                // an internal snapshot is the top image's (backing files keep their active
                // state, as QEMU's bdrv_snapshot_load_tmp)
                snapshot: if top {
                    opts.qcow2.snapshot.clone()
                } else {
                    None
                },
                ..opts.qcow2.clone()
            };
            let mut q = Qcow2::open(storage.clone(), &qopts)
                .map_err(|e| e.context(format!("Could not open '{filename}'")))?;
            let mut data_identity = None;
            if q.header().has_data_file() && !opts.no_io {
                let Some(name) = q.data_file_name().map(str::to_string) else {
                    return Err(Error::invalid(format!(
                        "Could not open '{filename}': 'data-file' is required for this image"
                    )));
                };
                if !opts.policy.allow_data_file {
                    return Err(Error::new(
                        ErrorKind::Denied,
                        format!(
                            "Could not open '{filename}': opening its data file '{name}' is not allowed{}",
                            crate::error::hint("--allow-backing DIR names where files named by images may be opened")
                        ),
                    ));
                }
                let path = combine_path(filename, &name);
                let lock = lock_spec(opts.locking, Format::Raw, FileRole::DataFile, writable);
                let own = || {
                    // its data writes would land on its own header and tables
                    Error::invalid(format!(
                        "Could not open '{filename}': its data file '{name}' is the image itself"
                    ))
                };
                let admitted = admit(&path, roots)
                    .map_err(|e| e.context(format!("Could not open '{filename}'")))?;
                // before opening it: a second open of the image itself would also meet the
                // image's own locks, and say less
                if file_identity(&admitted).is_some()
                    && file_identity(&admitted) == storage.identity()
                {
                    return Err(own());
                }
                let data = open_storage_with(&admitted, opts.engine, writable, opts.cache, lock)
                    .map_err(|e| e.context(format!("Could not open '{filename}'")))?;
                data_identity = data.identity();
                if data_identity.is_some() && data_identity == storage.identity() {
                    return Err(own());
                }
                q.set_data_file(data);
            }
            let backing = q.backing_name().map(str::to_string);
            let full = backing.as_deref().map(|b| combine_path(filename, b));
            let bfmt = q.backing_format().map(str::to_string);
            let q = Arc::new(q);
            Ok(OpenedLayer {
                filename: filename.to_string(),
                format,
                storage,
                device: q.clone(),
                qcow2: Some(q),
                backing_filename: backing,
                full_backing_filename: full,
                backing_format: bfmt,
                data_identity,
            })
        }
    }
}

/// Open `path` and (unless `no_backing`) its whole backing chain.
pub fn open_image(path: &str, opts: &OpenOptions) -> Result<Image> {
    let roots = allowed_roots(path, &opts.policy)?;
    let roots = roots.as_deref();
    let top = open_layer(path, path, opts.format, opts, true, roots)?;
    let mut seen: Vec<(u64, u64)> = top.storage.identity().into_iter().collect();
    let mut layers = vec![top];
    loop {
        if opts.no_backing {
            break;
        }
        let Some(last) = layers.last() else { break };
        let Some(next) = last.full_backing_filename.clone() else {
            break;
        };
        if !opts.policy.allow_backing {
            return Err(Error::new(
                ErrorKind::Denied,
                format!(
                    "Could not open backing file '{next}' of '{}': backing files are not allowed by the open policy{}",
                    last.filename,
                    crate::error::hint("--allow-backing DIR names where files named by images may be opened")
                ),
            ));
        }
        if layers.len() >= opts.policy.max_depth {
            return Err(Error::invalid(format!(
                "Backing chain of '{path}' is too deep (more than {} images)",
                opts.policy.max_depth
            )));
        }
        let fmt = match last.backing_format.as_deref() {
            Some(f) => Some(
                Format::parse(f)
                    .map_err(|e| e.context(format!("Could not open backing file '{next}'")))?,
            ),
            None => None,
        };
        let parent = last.filename.clone();
        // a backing file that is a data file of the chain: said before its open meets that
        // data file's locks
        if let Some(id) = file_identity(&next) {
            if let Some(l) = layers.iter().find(|l| l.data_identity == Some(id)) {
                return Err(Error::invalid(format!(
                    "Could not open '{}': its data file is also used by '{next}' of the same backing chain",
                    l.filename
                )));
            }
        }
        let layer = admit(&next, roots)
            .and_then(|p| open_layer(&next, &p, fmt, opts, false, roots))
            .map_err(|e| {
                Error::new(
                    e.kind(),
                    format!("Could not open backing file of '{parent}': {e}"),
                )
            })?;
        if let Some(id) = layer.storage.identity() {
            if seen.contains(&id) {
                return Err(Error::invalid(format!(
                    "Backing file '{next}' creates an infinite loop (backing chain of '{path}')"
                )));
            }
            seen.push(id);
        }
        layers.push(layer);
    }
    check_distinct_files(&layers)?;
    let chain = Chain::new(layers.iter().map(|l| l.device.clone()).collect())?
        .with_write_through(opts.cache.write_through())
        .with_compressed_writes(opts.compress_writes)?;
    Ok(Image { layers, chain })
}

/// (device, inode) of the file at `path`, if it exists.
fn file_identity(path: &str) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// A data file must be no image of the chain and no other layer's data file (compared by
/// device and inode, so other names of the same file are caught): writes through it would
/// overwrite that image's metadata.
fn check_distinct_files(layers: &[OpenedLayer]) -> Result<()> {
    for (i, l) in layers.iter().enumerate() {
        let Some(d) = l.data_identity else { continue };
        for (j, other) in layers.iter().enumerate() {
            let clash =
                other.storage.identity() == Some(d) || (j != i && other.data_identity == Some(d));
            if clash {
                return Err(Error::invalid(format!(
                    "Could not open '{}': its data file is also used by '{}' of the same backing chain",
                    l.filename, other.filename
                )));
            }
        }
    }
    Ok(())
}

impl Image {
    /// (device, inode) of every file this image has open: each layer and each data file.
    pub fn file_identities(&self) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        for l in &self.layers {
            out.extend(l.storage.identity());
            out.extend(l.data_identity);
        }
        out
    }

    /// (device, inode) of the files writes go to: the top image and its data file.
    pub fn written_identities(&self) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        if let Some(top) = self.layers.first() {
            if top.device.access() == crate::block::Access::ReadWrite {
                out.extend(top.storage.identity());
                out.extend(top.data_identity);
            }
        }
        out
    }
}

/// Open a single image from an in-memory or test storage (no backing chain).
pub fn open_storage_image(
    storage: Arc<dyn Storage>,
    format: Option<Format>,
    qopts: &Qcow2Options,
) -> Result<Arc<dyn BlockDevice>> {
    let format = match format {
        Some(f) => f,
        None => probe(&*storage)?,
    };
    Ok(match format {
        Format::Raw if qopts.access == crate::block::Access::ReadWrite => {
            Arc::new(RawDevice::new_writable(storage)?)
        }
        Format::Raw => Arc::new(RawDevice::new(storage)?),
        Format::Qcow2 => Arc::new(Qcow2::open(storage, qopts)?),
    })
}

/// Whether `path` exists (for error messages).
pub fn exists(path: &str) -> bool {
    Path::new(path).exists()
}
