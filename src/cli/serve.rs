//! `qnbd serve`: the NBD server with qemu-nbd's command line.
//!
//! Flags keep qemu-nbd's names and defaults (`-p 10809`, `-b 0.0.0.0`, `-e 1`,
//! `--handshake-limit 10`, exit after the last client unless `-t`), TLS included
//! (`--object tls-creds-x509|tls-creds-psk|authz-simple`, `--tls-creds`, `--tls-authz`, and
//! the short `--tls-certificates DIR` / `--tls-psk FILE`). Every file is locked as qemu-nbd
//! locks it. Invoked as `qemu-nbd` (see `cli::Personality`), this is qemu-nbd's command line.
//! What this build cannot do is refused with a clear message instead of being silently
//! ignored (`-c`/`-d`: there is no kernel NBD device here). See `docs/serve.md`.

use super::open_options;
use crate::error::{Error, ErrorKind, Result};
use crate::io::Engine;
use crate::nbd::export::{ChainBackend, DiscardMode, Export, ExportBackend, ExportSet};
use crate::nbd::meta::Available;
use crate::nbd::server::{self, ConnConfig, Server, ServerConfig, Stop};
use crate::nbd::tls::{Credentials, TlsServer};
use crate::open::{open_image, CacheMode, OpenPolicy};
use clap::Args;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Args)]
#[command(args_override_self = true)]
pub struct ServeArgs {
    #[arg(long = "image-opts", help = super::IMAGE_OPTS_HELP)]
    pub image_opts: bool,
    /// Image to export (qemu-nbd's FILE).
    pub image: Option<String>,
    /// Image format (qcow2, raw); probed when omitted.
    #[arg(short = 'f', long = "format")]
    pub format: Option<String>,
    /// Export read-only (without it the export is writable, as with qemu-nbd).
    #[arg(short = 'r', long = "read-only")]
    pub read_only: bool,
    /// Export name (default: the empty name).
    #[arg(short = 'x', long = "export-name", default_value = "")]
    pub export_name: String,
    /// Export description (NBD_INFO_DESCRIPTION).
    #[arg(short = 'D', long = "description")]
    pub description: Option<String>,
    /// Keep serving after the last client disconnects.
    #[arg(short = 't', long = "persistent")]
    pub persistent: bool,
    /// Maximum simultaneous clients (0 = unlimited); multi-conn is advertised when not 1.
    #[arg(short = 'e', long = "shared", default_value_t = 1, value_parser = parse_shared)]
    pub shared: usize,
    /// Export a persistent dirty bitmap as qemu:dirty-bitmap:NAME (repeatable).
    #[arg(short = 'B', long = "bitmap")]
    pub bitmaps: Vec<String>,
    /// Expose the qemu:allocation-depth metadata context.
    #[arg(short = 'A', long = "allocation-depth")]
    pub allocation_depth: bool,
    /// Expose the image from this byte offset.
    #[arg(short = 'o', long = "offset", value_parser = super::parse_size_arg)]
    pub offset: Option<u64>,
    /// Host cache mode: writeback (default), none (O_DIRECT), writethrough (every write
    /// flushed), directsync (both), unsafe (flushes do not sync).
    #[arg(long = "cache")]
    pub cache: Option<String>,
    /// Same as --cache=none.
    #[arg(short = 'n', long = "nocache")]
    pub nocache: bool,
    /// I/O backend: threads (positioned I/O), native (positioned I/O), io_uring.
    #[arg(long = "aio")]
    pub aio: Option<String>,
    /// Discard mode (ignore/off, unmap/on); no effect on a read-only export.
    #[arg(long = "discard")]
    pub discard: Option<String>,
    /// Zero detection (off, on, unmap); no effect on a read-only export.
    #[arg(long = "detect-zeroes")]
    pub detect_zeroes: Option<String>,
    /// Fork into the background once the server listens.
    #[arg(long = "fork")]
    pub fork: bool,
    /// Write the server's pid to this file (mode 0600, locked while the server runs).
    #[arg(long = "pid-file")]
    pub pid_file: Option<String>,
    /// Keep request statistics (per export and command type: requests, bytes, errors, latency
    /// p50/p99/p99.9, in flight, connections) and write them to FILE ('-': stderr) on SIGUSR1
    /// and on exit.
    #[arg(long = "stats", value_name = "FILE|-")]
    pub stats: Option<String>,
    /// Serve the statistics in Prometheus' text format over HTTP at ADDR (a Unix socket path,
    /// or HOST:PORT).
    #[arg(long = "metrics", value_name = "ADDR")]
    pub metrics: Option<String>,
    /// Drop clients that have not finished negotiation within N seconds (0 = no limit).
    #[arg(long = "handshake-limit", default_value_t = 10, value_parser = parse_handshake_limit)]
    pub handshake_limit: u64,
    /// List the exports of a running server (at -k, or -b/-p) and exit.
    #[arg(short = 'L', long = "list")]
    pub list: bool,
    /// Interface to bind (or the host to query with -L).
    #[arg(short = 'b', long = "bind")]
    pub bind: Option<String>,
    /// TCP port.
    #[arg(short = 'p', long = "port", value_parser = super::qemu_int::<u16>)]
    pub port: Option<u16>,
    /// Unix socket path (absolute).
    #[arg(short = 'k', long = "socket")]
    pub socket: Option<String>,
    /// Throw-away overlay: writes go to a temporary qcow2 image backed by IMAGE, which stays
    /// unchanged; the overlay is deleted (it is unlinked right after opening).
    #[arg(short = 's', long = "snapshot")]
    pub snapshot: bool,
    /// Export an internal snapshot (ID, NAME, snapshot.id=ID or snapshot.name=NAME), read-only.
    #[arg(short = 'l', long = "load-snapshot")]
    pub load_snapshot: Option<String>,
    /// Require TLS with the credentials of this --object id (qemu-nbd's form).
    #[arg(long = "tls-creds", value_name = "ID")]
    pub tls_creds: Option<String>,
    /// With -L: the name the server's certificate must carry (default: the -b host; needed
    /// for a Unix socket).
    #[arg(long = "tls-hostname", value_name = "HOSTNAME")]
    pub tls_hostname: Option<String>,
    /// Admit only TLS clients whose identity an --object authz-simple,id=ID lists.
    #[arg(long = "tls-authz", value_name = "ID")]
    pub tls_authz: Option<String>,
    /// QEMU objects: tls-creds-x509,id=ID,endpoint=server|client,dir=DIR[,verify-peer=on|off],
    /// tls-creds-psk,id=ID,endpoint=server|client,dir=DIR[,username=NAME],
    /// authz-simple,id=ID,identity=NAME (commas inside values doubled; endpoint=client with
    /// -L). Repeatable.
    #[arg(long = "object", value_name = "SPEC")]
    pub objects: Vec<String>,
    /// Require TLS with X.509 credentials from DIR (ca-cert.pem, server-cert.pem,
    /// server-key.pem, optional ca-crl.pem); client certificates are required.
    #[arg(long = "tls-certificates", value_name = "DIR")]
    pub tls_certificates: Option<String>,
    /// Require TLS with pre-shared keys from FILE (username:hexkey lines, as psktool writes).
    #[arg(long = "tls-psk", value_name = "FILE")]
    pub tls_psk: Option<String>,
    /// Connections open at once, negotiating or not (0 = no limit); further clients are
    /// closed at once.
    #[arg(long = "max-connections", default_value_t = 100, value_parser = super::qemu_int::<usize>)]
    pub max_connections: usize,
    #[arg(long = "allow-backing", value_name = "PATH", help = super::ALLOW_BACKING_HELP)]
    pub allow_backing: Vec<String>,
    /// Log more: -v logs every connection, negotiation and refused request (info), -vv also
    /// accepted connections (debug). Errors and warnings are always logged.
    #[arg(short = 'v', long = "verbose", action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Log level: error, warn (the default), info (-v) or debug (-vv).
    #[arg(long = "log-level", value_name = "LEVEL", value_parser = parse_log_level)]
    pub log_level: Option<crate::log::Level>,
    /// Log line format: text (PROGRAM: LEVEL: [conn ID PEER: ]MESSAGE) or json (one object per
    /// line: time, level, program, event, conn, peer, msg).
    #[arg(long = "log-format", value_name = "FORMAT", value_parser = ["text", "json"])]
    pub log_format: Option<String>,
    /// Log every request that takes at least MS milliseconds, once, with its client (warn).
    #[arg(long = "log-slow", value_name = "MS")]
    pub log_slow: Option<u64>,
    /// Serve one client on stdin/stdout, then exit.
    #[arg(long = "stdio")]
    pub stdio: bool,
    /// Additional export, as qemu-storage-daemon's --export reads:
    /// [type=nbd,][id=ID,]name=NAME,file=PATH[,format=FMT][,writable=on][,description=TEXT]
    /// [,allocation-depth=on][,bitmap=NAME][,discard=unmap][,detect-zeroes=on|unmap].
    /// Read-only unless writable=on (readonly=off is the same). Repeatable.
    #[arg(long = "export")]
    pub exports: Vec<String>,
    /// qemu-nbd's kernel device mode (connect IMAGE to /dev/nbdN): refused, qnbd serves
    /// sockets only (attach the kernel device with nbd-client to the socket instead).
    #[arg(short = 'c', long = "connect", value_name = "DEV")]
    pub connect: Option<String>,
    /// qemu-nbd's kernel device disconnect: refused, as -c.
    #[arg(short = 'd', long = "disconnect")]
    pub disconnect: bool,
    /// Worker threads executing requests (default: one per CPU, at least 2).
    #[arg(long = "workers", value_parser = super::qemu_int::<usize>)]
    pub workers: Option<usize>,
}

/// `-e`, with qemu-nbd's message.
fn parse_shared(s: &str) -> std::result::Result<usize, String> {
    super::qemu_int(s).map_err(|_| format!("Invalid shared device number '{s}'"))
}

/// `--handshake-limit`, with qemu-nbd's message.
fn parse_handshake_limit(s: &str) -> std::result::Result<u64, String> {
    super::qemu_int(s).map_err(|_| format!("Invalid handshake limit '{s}'"))
}

fn bad(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidArgument, msg)
}

struct ExportSpec {
    name: String,
    file: String,
    format: Option<String>,
    description: Option<String>,
    depth: bool,
    readonly: bool,
    discard: DiscardMode,
    /// `--detect-zeroes`: `None` off, `Some(unmap)`.
    detect_zeroes: Option<bool>,
    bitmaps: Vec<String>,
    /// `-s`: serve a temporary overlay.
    overlay: bool,
    /// `-l`: serve this internal snapshot.
    internal_snapshot: Option<String>,
    /// `--image-opts`: `file` is a QemuOpts string.
    image_opts: bool,
}

fn parse_export(s: &str) -> Result<ExportSpec> {
    let mut spec = ExportSpec {
        name: String::new(),
        file: String::new(),
        format: None,
        description: None,
        depth: false,
        readonly: true,
        discard: DiscardMode::Ignore,
        detect_zeroes: None,
        bitmaps: Vec::new(),
        overlay: false,
        internal_snapshot: None,
        image_opts: false,
    };
    let mut have_name = false;
    for kv in s.split(',') {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| bad(format!("--export: expected key=value, got '{kv}'")))?;
        let on = |v: &str| -> Result<bool> {
            match v {
                "on" | "true" | "yes" => Ok(true),
                "off" | "false" | "no" => Ok(false),
                _ => Err(bad(format!("--export: {k} expects on or off"))),
            }
        };
        match k {
            "name" => {
                spec.name = v.to_string();
                have_name = true;
            }
            "file" => spec.file = v.to_string(),
            "format" => spec.format = Some(v.to_string()),
            "description" => spec.description = Some(v.to_string()),
            "allocation-depth" => spec.depth = on(v)?,
            "writable" => spec.readonly = !on(v)?,
            "readonly" => spec.readonly = on(v)?,
            // qemu-storage-daemon's --export type=nbd,id=ID,... form
            "type" if v == "nbd" => {}
            "type" => return Err(bad(format!("--export: type '{v}' is not supported (nbd)"))),
            "id" => {}
            "bitmap" => spec.bitmaps.push(v.to_string()),
            "discard" => spec.discard = discard_mode(v)?,
            "detect-zeroes" => spec.detect_zeroes = detect_zeroes_mode(v)?,
            _ => return Err(bad(format!("--export: unknown key '{k}'"))),
        }
    }
    if !have_name || spec.file.is_empty() {
        return Err(bad("--export needs name=... and file=..."));
    }
    Ok(spec)
}

/// `-s`: a temporary qcow2 overlay backed by `file` (absolute path), like qemu-nbd's. Also
/// returns `file` opened with the locks qemu-nbd holds on it under its overlay, opened by the
/// name the user gave (for QEMU's messages); keep it until the overlay's chain is open.
fn temporary_overlay(
    file: &str,
    format: Option<crate::open::Format>,
    locking: crate::open::Locking,
    policy: &OpenPolicy,
) -> Result<(String, crate::open::Image)> {
    let abs = std::fs::canonicalize(file)
        .map_err(|e| Error::io(format!("Could not open '{file}'"), e))?;
    let abs = abs.to_string_lossy().into_owned();
    let probe_opts = crate::open::OpenOptions {
        format,
        no_io: true,
        no_backing: true,
        locking: match locking {
            crate::open::Locking::Off => locking,
            _ => crate::open::Locking::Server,
        },
        policy: policy.clone(),
        ..Default::default()
    };
    let base = open_image(file, &probe_opts)?;
    let fmt = base.layers[0].format;
    let size = base.chain.size();
    let dir = std::env::var("TMPDIR").unwrap_or_else(|_| "/var/tmp".into());
    let path = create_private_file(&dir, "qnbd-snapshot-", ".qcow2")?;
    let copts = crate::qcow2::create::CreateOptions {
        size,
        backing_file: Some(abs),
        backing_format: Some(fmt.name().to_string()),
        ..Default::default()
    };
    crate::qcow2::create::create_qcow2(&path, &copts)?;
    Ok((path, base))
}

/// An image open failure as qemu-nbd reports it: `Failed to blk_new_open 'FILE': ...`, and a
/// lock conflict without the "Could not open" of the file layer.
fn blk_open_error(file: &str, e: Error) -> Error {
    let e = match (e.kind(), e.message().split_once("': ")) {
        (ErrorKind::Busy, Some((head, rest))) if head.starts_with("Could not open '") => {
            Error::new(ErrorKind::Busy, rest)
        }
        _ => e,
    };
    e.context(format!("Failed to blk_new_open '{file}'"))
}

/// Create a new file in `dir` with an unpredictable name, mode 0600, refusing to reuse or
/// follow anything already there (`O_CREAT | O_EXCL`); returns its path.
fn create_private_file(dir: &str, prefix: &str, suffix: &str) -> Result<String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut last = None;
    for _ in 0..16 {
        let mut r = [0u8; 8];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut r))
            .map_err(|e| Error::io("Could not read /dev/urandom", e))?;
        let path = format!("{dir}/{prefix}{:016x}{suffix}", u64::from_ne_bytes(r));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
        {
            Ok(_) => return Ok(path),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => {
                return Err(Error::io(
                    format!("Could not create a temporary overlay in '{dir}'"),
                    e,
                ))
            }
        }
    }
    Err(Error::io(
        format!("Could not create a temporary overlay in '{dir}'"),
        last.unwrap_or_else(|| std::io::Error::from_raw_os_error(libc::EEXIST)),
    ))
}

fn discard_mode(v: &str) -> Result<DiscardMode> {
    match v {
        "ignore" | "off" => Ok(DiscardMode::Ignore),
        "unmap" | "on" => Ok(DiscardMode::Unmap),
        _ => Err(bad(format!("Invalid discard mode `{v}'"))),
    }
}

/// `--detect-zeroes`: `None` for off, `Some(unmap)` otherwise.
fn detect_zeroes_mode(v: &str) -> Result<Option<bool>> {
    match v {
        "off" => Ok(None),
        "on" => Ok(Some(false)),
        "unmap" => Ok(Some(true)),
        _ => Err(bad(format!(
            "Failed to parse detect_zeroes mode: invalid parameter value: {v}"
        ))),
    }
}

/// The files an export has open, by (device, inode).
struct ExportFiles {
    name: String,
    all: Vec<(u64, u64)>,
    /// The files its writes go to (the top image and its data file).
    written: Vec<(u64, u64)>,
}

impl ExportFiles {
    /// A file one export writes must not be open in another export (as image, backing file or
    /// data file): the two would overwrite each other's data and metadata.
    fn check_against(&self, others: &[ExportFiles]) -> Result<()> {
        for o in others {
            let clash = self.written.iter().any(|id| o.all.contains(id))
                || o.written.iter().any(|id| self.all.contains(id));
            if clash {
                return Err(bad(format!(
                    "exports '{}' and '{}' use the same file and one of them writes it",
                    o.name, self.name
                )));
            }
        }
        Ok(())
    }
}

fn build_export(
    spec: &ExportSpec,
    (engine, cache): (Engine, CacheMode),
    policy: &OpenPolicy,
    offset: u64,
    multi_conn: bool,
    stats: bool,
) -> Result<(Arc<Export>, ExportFiles)> {
    if spec.name.len() > crate::nbd::wire::NBD_MAX_STRING {
        return Err(bad(format!("export name '{}' too long", spec.name)));
    }
    if spec
        .description
        .as_ref()
        .is_some_and(|d| d.len() > crate::nbd::wire::NBD_MAX_STRING)
    {
        return Err(bad("description too long"));
    }
    let mut opts = open_options(spec.format.as_deref())?;
    opts.engine = engine;
    opts.cache = cache;
    opts.writable = !spec.readonly && spec.internal_snapshot.is_none();
    opts.locking = crate::open::Locking::Server;
    opts.qcow2.snapshot = spec.internal_snapshot.clone();
    opts.policy = policy.clone();
    let named = super::image_name(&spec.file, spec.image_opts, &mut opts)
        .map_err(|e| blk_open_error(&spec.file, e))?;
    let (file, base_guard) = if spec.overlay {
        let (path, base) = temporary_overlay(&named, opts.format, opts.locking, policy)
            .map_err(|e| blk_open_error(&spec.file, e))?;
        (path, Some(base))
    } else {
        (named.clone(), None)
    };
    if spec.overlay {
        opts.format = Some(crate::open::Format::Qcow2);
        // the overlay names the image the user gave us: allow it, and what the image itself
        // may name (its own directory) under the same rules
        if let Ok(orig) = std::fs::canonicalize(&named) {
            let dir = orig.parent().map(|p| p.to_path_buf()).unwrap_or_default();
            match &mut opts.policy.allowed {
                crate::open::Allowed::Anywhere => {}
                crate::open::Allowed::ImageDir => {
                    opts.policy.allowed = crate::open::Allowed::Paths(vec![orig, dir])
                }
                crate::open::Allowed::Paths(v) => v.push(orig),
            }
            opts.policy.allow_backing = true;
        }
    }
    let image = open_image(&file, &opts);
    if spec.overlay {
        // the open file stays usable; nothing is left behind on exit
        let _ = std::fs::remove_file(&file);
    }
    drop(base_guard);
    let image = image.map_err(|e| blk_open_error(&spec.file, e))?;
    let files = ExportFiles {
        name: spec.name.clone(),
        all: image.file_identities(),
        written: image.written_identities(),
    };
    if spec.detect_zeroes == Some(true) && spec.discard != DiscardMode::Unmap {
        return Err(bad(
            "setting detect-zeroes to unmap is not allowed without setting discard operation to unmap",
        ));
    }
    let mut backend = ChainBackend::new(image.chain)
        .with_discard(spec.discard)
        .with_bitmaps(&spec.bitmaps)?
        .with_offset(offset)
        .map_err(|e| bad(e.message()))?;
    if let Some(unmap) = spec.detect_zeroes {
        backend = backend.with_detect_zeroes(unmap);
    }
    let backend: Arc<dyn ExportBackend> = Arc::new(backend);
    let export = Arc::new(Export {
        name: spec.name.clone(),
        description: spec.description.clone(),
        backend,
        contexts: Available {
            allocation_depth: spec.depth,
            bitmaps: spec.bitmaps.clone(),
            // invoked as qemu-nbd: list what qemu-nbd lists
            hide_vendor: crate::error::program() == "qemu-nbd",
        },
        multi_conn,
        stats: stats.then(crate::nbd::stats::Stats::new),
    });
    Ok((export, files))
}

/// One `--object` value: its type and its properties (QEMU's syntax: the type first, or
/// `qom-type=`; `,,` is a literal comma).
fn parse_object(s: &str) -> Result<(String, Vec<(String, String)>)> {
    let fields = super::split_qemu_opts(s);
    let mut it = fields.into_iter();
    let first = it.next().unwrap_or_default();
    let mut props = Vec::new();
    let mut kind = None;
    if let Some(t) = first.strip_prefix("qom-type=") {
        kind = Some(t.to_string());
    } else if first.contains('=') {
        let (k, v) = first.split_once('=').unwrap_or_default();
        props.push((k.to_string(), v.to_string()));
    } else {
        kind = Some(first);
    }
    for f in it {
        let (k, v) = f
            .split_once('=')
            .ok_or_else(|| bad(format!("--object: expected key=value, got '{f}'")))?;
        if k == "qom-type" {
            kind = Some(v.to_string());
        } else {
            props.push((k.to_string(), v.to_string()));
        }
    }
    let kind = kind
        .filter(|k| !k.is_empty())
        .ok_or_else(|| bad("--object: Parameter 'qom-type' is missing"))?;
    Ok((kind, props))
}

fn on_off(key: &str, v: &str) -> Result<bool> {
    match v {
        "on" | "yes" | "true" => Ok(true),
        "off" | "no" | "false" => Ok(false),
        _ => Err(bad(format!(
            "Parameter '{key}' expects 'on' or 'off', got '{v}'"
        ))),
    }
}

/// A `tls-creds-*` object of the command line.
#[derive(Debug, Clone)]
struct TlsObject {
    id: String,
    kind: String,
    endpoint: String,
    dir: PathBuf,
    verify_peer: bool,
    username: String,
}

/// `authz-simple` objects: (id, identity).
type Authz = Vec<(String, String)>;

/// The `--object`s: TLS credentials and `authz-simple` identities.
fn tls_objects(a: &ServeArgs) -> Result<(Vec<TlsObject>, Authz)> {
    let mut creds: Vec<TlsObject> = Vec::new();
    let mut authz: Vec<(String, String)> = Vec::new();
    for o in &a.objects {
        let (kind, props) = parse_object(o)?;
        let get = |k: &str| props.iter().find(|p| p.0 == k).map(|p| p.1.as_str());
        let id = get("id")
            .filter(|i| !i.is_empty())
            .ok_or_else(|| bad(format!("--object {kind}: Parameter 'id' is missing")))?
            .to_string();
        if creds.iter().any(|c| c.id == id) || authz.iter().any(|c| c.0 == id) {
            return Err(bad(format!("attempt to add duplicate property '{id}'")));
        }
        let allowed: &[&str] = match kind.as_str() {
            "tls-creds-x509" => &["id", "endpoint", "dir", "verify-peer", "priority"],
            "tls-creds-psk" => &[
                "id",
                "endpoint",
                "dir",
                "priority",
                "username",
                "verify-peer",
            ],
            "authz-simple" => &["id", "identity"],
            "tls-creds-anon" => {
                return Err(Error::unsupported(
                    "tls-creds-anon is not supported: anonymous TLS authenticates nobody (use tls-creds-x509 or tls-creds-psk)",
                ))
            }
            "authz-list" | "authz-listfile" | "authz-pam" => {
                return Err(Error::unsupported(format!(
                    "--object {kind} is not supported (use authz-simple)"
                )))
            }
            other => return Err(bad(format!("Invalid object type '{other}'"))),
        };
        if let Some((k, _)) = props.iter().find(|p| !allowed.contains(&p.0.as_str())) {
            return Err(bad(format!("Property '{kind}.{k}' not found")));
        }
        if kind == "authz-simple" {
            let ident = get("identity")
                .ok_or_else(|| bad("--object authz-simple: Parameter 'identity' is missing"))?;
            authz.push((id, ident.to_string()));
            continue;
        }
        let endpoint = get("endpoint").unwrap_or("client").to_string();
        if endpoint != "server" && endpoint != "client" {
            return Err(bad(format!(
                "Parameter 'endpoint' does not accept value '{endpoint}'"
            )));
        }
        let dir = PathBuf::from(
            get("dir").ok_or_else(|| bad(format!("--object {kind}: 'dir' is required")))?,
        );
        // verify-peer is a property of every tls-creds object (for PSK, where both sides
        // always authenticate, QEMU accepts it and it changes nothing)
        let verify_peer = on_off("verify-peer", get("verify-peer").unwrap_or("on"))?;
        creds.push(TlsObject {
            id,
            kind,
            endpoint,
            dir,
            verify_peer,
            username: get("username").unwrap_or("qemu").to_string(),
        });
    }
    Ok((creds, authz))
}

/// The TLS client side of `-L`, from `--tls-creds` (an object with `endpoint=client`).
fn tls_client(a: &ServeArgs) -> Result<Option<crate::nbd::tls::TlsClient>> {
    use crate::nbd::tls::{ClientCredentials, TlsClient};
    if a.tls_authz.is_some() {
        return Err(bad("TLS authorization is incompatible with export list"));
    }
    if a.tls_certificates.is_some() || a.tls_psk.is_some() {
        return Err(bad(
            "--tls-certificates and --tls-psk are server options; with -L use --object \
             tls-creds-x509|tls-creds-psk,endpoint=client and --tls-creds",
        ));
    }
    let (creds, _) = tls_objects(a)?;
    let Some(id) = &a.tls_creds else {
        if a.tls_hostname.is_some() {
            return Err(bad("--tls-hostname is not permitted without --tls-creds"));
        }
        return Ok(None);
    };
    let o = creds
        .iter()
        .find(|c| &c.id == id)
        .ok_or_else(|| bad(format!("No TLS credentials with id '{id}'")))?;
    if o.endpoint != "client" {
        return Err(bad(format!(
            "Expecting TLS credentials with a client endpoint (object '{id}')"
        )));
    }
    let c = if o.kind == "tls-creds-x509" {
        ClientCredentials::X509 {
            dir: o.dir.clone(),
            verify_peer: o.verify_peer,
        }
    } else {
        ClientCredentials::Psk {
            file: o.dir.join("keys.psk"),
            username: o.username.clone(),
        }
    };
    TlsClient::new(&c).map(Some)
}

/// The TLS side of the server from the command line, or `None` without TLS.
fn tls_server(a: &ServeArgs) -> Result<Option<Arc<TlsServer>>> {
    if a.tls_hostname.is_some() {
        return Err(bad(if a.tls_creds.is_some() {
            "TLS hostname is only supported with export list"
        } else {
            "--tls-hostname is not permitted without --tls-creds"
        }));
    }
    let (objects, authz) = tls_objects(a)?;
    let mut creds: Vec<(String, Credentials)> = Vec::new();
    for o in objects {
        if o.endpoint != "server" {
            return Err(bad(format!(
                "Expecting TLS credentials with a server endpoint (object '{}')",
                o.id
            )));
        }
        let c = if o.kind == "tls-creds-x509" {
            Credentials::X509 {
                dir: o.dir,
                verify_peer: o.verify_peer,
            }
        } else {
            Credentials::Psk {
                file: o.dir.join("keys.psk"),
            }
        };
        creds.push((o.id, c));
    }
    let short = match (&a.tls_certificates, &a.tls_psk) {
        (Some(_), Some(_)) => {
            return Err(bad("--tls-certificates and --tls-psk exclude each other"))
        }
        (Some(d), None) => Some(Credentials::X509 {
            dir: PathBuf::from(d),
            verify_peer: true,
        }),
        (None, Some(f)) => Some(Credentials::Psk {
            file: PathBuf::from(f),
        }),
        (None, None) => None,
    };
    let chosen = match (&a.tls_creds, short) {
        (Some(_), Some(_)) => {
            return Err(bad("--tls-creds excludes --tls-certificates and --tls-psk"))
        }
        (Some(id), None) => Some(
            creds
                .iter()
                .find(|c| &c.0 == id)
                .map(|c| c.1.clone())
                .ok_or_else(|| bad(format!("No TLS credentials with id '{id}'")))?,
        ),
        (None, s) => s,
    };
    let Some(chosen) = chosen else {
        if a.tls_authz.is_some() {
            return Err(bad("--tls-authz is not permitted without --tls-creds"));
        }
        return Ok(None);
    };
    let allow = match &a.tls_authz {
        None => None,
        Some(id) => Some(
            authz
                .iter()
                .filter(|z| &z.0 == id)
                .map(|z| z.1.clone())
                .collect::<Vec<_>>(),
        )
        .filter(|v| !v.is_empty())
        .map(Some)
        .ok_or_else(|| bad(format!("No authorization object with id '{id}'")))?,
    };
    Ok(Some(Arc::new(TlsServer::new(&chosen, allow)?)))
}

fn list(a: &ServeArgs) -> Result<i32> {
    if a.image.is_some() || !a.exports.is_empty() || a.fork {
        return Err(bad(
            "List mode is incompatible with a file name, --export and --fork",
        ));
    }
    let tls = tls_client(a)?;
    // the certificate is checked against --tls-hostname, else the host connected to (a Unix
    // socket has none: QEMU then refuses an x509 connection, and so does qnbd)
    let (ext, exports) = if let Some(k) = &a.socket {
        let host = a.tls_hostname.as_deref();
        if let (Some(t), None) = (&tls, host) {
            if t.needs_hostname() {
                return Err(bad("No hostname for certificate validation"));
            }
        }
        let s = std::os::unix::net::UnixStream::connect(k)
            .map_err(|e| Error::io(format!("Failed to connect to '{k}'"), e))?;
        crate::nbd::client::list_exports(s, tls.as_ref().map(|t| (t, host)))?
    } else {
        let host = a.bind.clone().unwrap_or_else(|| "localhost".into());
        let port = a.port.unwrap_or(10809);
        let s = std::net::TcpStream::connect((host.as_str(), port))
            .map_err(|e| Error::io(format!("Failed to connect to '{host}:{port}'"), e))?;
        let check = a.tls_hostname.as_deref().unwrap_or(host.as_str());
        crate::nbd::client::list_exports(s, tls.as_ref().map(|t| (t, Some(check))))?
    };
    print!("{}", crate::nbd::client::format_list(ext, &exports));
    Ok(0)
}

/// The pipe a forked child reports readiness (or an error) through.
struct ForkPipe(std::fs::File);

impl ForkPipe {
    fn send(&mut self, msg: &[u8]) {
        let _ = self.0.write_all(msg);
    }
}

/// Fork; the parent waits for the child's report and exits; the child returns its pipe.
fn daemonize() -> Result<ForkPipe> {
    use crate::io::sys;
    let (r, w) = sys::pipe(false).map_err(|e| Error::io("pipe", e))?;
    // fork runs before the image is opened and before any worker or connection thread exists
    // (sys::fork refuses otherwise)
    match sys::fork().map_err(|e| Error::io("fork", e))? {
        sys::Forked::Parent => {
            drop(w);
            let mut f = std::fs::File::from(r);
            let mut msg = Vec::new();
            let _ = f.read_to_end(&mut msg);
            if msg.starts_with(b"OK") {
                std::process::exit(0);
            }
            let _ = std::io::stderr().write_all(&msg);
            std::process::exit(1);
        }
        sys::Forked::Child => {
            drop(r);
            sys::setsid();
            Ok(ForkPipe(std::fs::File::from(w)))
        }
    }
}

/// `--stats`: every export's report, to `target` (`-`: stderr; a file is replaced whole).
fn write_stats(target: &str, exports: &[Arc<Export>]) {
    let report: String = exports
        .iter()
        .filter_map(|e| e.stats.as_ref().map(|s| s.report(&e.name)))
        .collect();
    let res = if target == "-" {
        std::io::stderr().write_all(report.as_bytes())
    } else {
        let tmp = format!("{target}.tmp");
        std::fs::write(&tmp, report.as_bytes()).and_then(|_| std::fs::rename(&tmp, target))
    };
    if let Err(e) = res {
        eprintln!(
            "{}: cannot write statistics to '{target}': {e}",
            crate::error::program()
        );
    }
}

/// `--metrics ADDR`: a Unix socket path (absolute; removed at exit) or HOST:PORT.
fn metrics_listener(addr: &str) -> Result<(server::Listener, Option<String>)> {
    if addr.starts_with('/') {
        return Ok((server::listen_unix(addr)?, Some(addr.to_string())));
    }
    let Some((host, port)) = addr.rsplit_once(':') else {
        return Err(bad(format!(
            "--metrics '{addr}': expected an absolute socket path or HOST:PORT"
        )));
    };
    let port: u16 = port
        .parse()
        .map_err(|_| bad(format!("--metrics '{addr}': bad port '{port}'")))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    Ok((server::listen_tcp(host, port)?, None))
}

/// systemd's readiness protocol (`sd_notify(3)`): send `state` (`READY=1`, `STOPPING=1`, ...)
/// as one datagram to `$NOTIFY_SOCKET` when it is set (a path, or `@name` in the abstract
/// namespace). A failure is reported and otherwise ignored: the export works without it.
fn sd_notify(state: &str) {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent =
        UnixDatagram::unbound().and_then(|sock| match target.as_bytes().strip_prefix(b"@") {
            Some(name) => SocketAddr::from_abstract_name(name)
                .and_then(|addr| sock.send_to_addr(state.as_bytes(), &addr)),
            None => sock.send_to(state.as_bytes(), &target),
        });
    if let Err(e) = sent {
        eprintln!(
            "{}: cannot notify the service manager at {}: {e}",
            crate::error::program(),
            target.to_string_lossy()
        );
    }
}

fn write_pid_file(path: &str) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::io(format!("Cannot open pid file '{path}'"), e))?;
    if let Err(e) = crate::io::sys::flock_exclusive_nb(&f) {
        return Err(Error::io("Cannot lock pid file", e));
    }
    f.set_len(0)
        .and_then(|_| (&f).write_all(format!("{}\n", std::process::id()).as_bytes()))
        .map_err(|e| Error::io(format!("Failed to write pid file '{path}'"), e))?;
    // the lock lives as long as the process
    std::mem::forget(f);
    Ok(())
}

fn parse_log_level(s: &str) -> std::result::Result<crate::log::Level, String> {
    crate::log::Level::parse(s).ok_or_else(|| "expected error, warn, info or debug".to_string())
}

pub fn run(a: &ServeArgs) -> Result<i32> {
    let level = a.log_level.unwrap_or(match a.verbose {
        0 => crate::log::Level::Warn,
        1 => crate::log::Level::Info,
        _ => crate::log::Level::Debug,
    });
    let format = match a.log_format.as_deref() {
        Some("json") => crate::log::Format::Json,
        _ => crate::log::Format::Text,
    };
    crate::log::configure(level, format);
    crate::log::set_slow_threshold(a.log_slow.unwrap_or(0));
    if a.connect.is_some() || a.disconnect {
        return Err(Error::unsupported(
            "kernel NBD devices (-c / -d) are not supported: serve on a socket (-k or -p) and \
             attach the device with nbd-client",
        ));
    }
    if a.list {
        return list(a);
    }
    if a.snapshot && a.load_snapshot.is_some() {
        return Err(bad("-s and -l cannot be used together"));
    }
    let cache = cache_mode(a)?;
    if let Some(d) = &a.discard {
        discard_mode(d)?;
    }
    if let Some(d) = &a.detect_zeroes {
        detect_zeroes_mode(d)?;
    }
    let engine = match a.aio.as_deref() {
        None => Engine::from_env().map_err(bad)?,
        Some("native") if !cache.direct() => {
            // qemu-nbd's refusal (from opening the image): Linux AIO only works on O_DIRECT
            // files
            let e = bad(
                "aio=native was specified, but it requires cache.direct=on, which was not specified.",
            );
            return Err(match &a.image {
                Some(f) => e.context(format!("Failed to blk_new_open '{f}'")),
                None => e,
            });
        }
        Some("threads") | Some("native") => Engine::Sync,
        Some("io_uring") => Engine::Uring,
        Some(o) => return Err(bad(format!("Invalid aio mode '{o}'"))),
    };
    if a.image.is_none() && a.exports.is_empty() {
        return Err(bad(if crate::error::program() == "qemu-nbd" {
            "Invalid number of arguments\nTry `qemu-nbd --help' for more information."
        } else {
            "Expected exactly one file name argument (or --export)"
        }));
    }
    if a.stdio && (a.fork || a.socket.is_some() || a.port.is_some() || a.bind.is_some()) {
        return Err(bad("--stdio is incompatible with --fork, -k, -b and -p"));
    }
    let tls = tls_server(a)?;
    if tls.is_some() && a.stdio {
        return Err(bad("--stdio cannot be combined with TLS"));
    }
    let policy = super::open_policy(&a.allow_backing)?;
    let specs: Vec<ExportSpec> = a
        .exports
        .iter()
        .map(|s| parse_export(s))
        .collect::<Result<_>>()?;

    let mut fork_pipe = if a.fork { Some(daemonize()?) } else { None };
    let res = serve(a, (engine, cache), specs, tls, &policy, &mut fork_pipe);
    if let (Err(e), Some(p)) = (&res, fork_pipe.as_mut()) {
        p.send(format!("{}: {e}\n", crate::error::program()).as_bytes());
        std::process::exit(1);
    }
    res
}

/// Default workers with `O_DIRECT` files: enough requests in flight to keep a device busy.
const DIRECT_MIN_WORKERS: usize = 16;

/// `--cache` / `-n` (given at most once, as qemu-nbd insists).
fn cache_mode(a: &ServeArgs) -> Result<CacheMode> {
    if a.nocache && a.cache.is_some() {
        return Err(bad("-n and --cache can only be specified once"));
    }
    match &a.cache {
        _ if a.nocache => Ok(CacheMode::None),
        None => Ok(CacheMode::Writeback),
        Some(c) => CacheMode::parse(c).ok_or_else(|| bad(format!("Invalid cache mode '{c}'"))),
    }
}

fn serve(
    a: &ServeArgs,
    engine: (Engine, CacheMode),
    specs: Vec<ExportSpec>,
    tls: Option<Arc<TlsServer>>,
    policy: &OpenPolicy,
    fork_pipe: &mut Option<ForkPipe>,
) -> Result<i32> {
    let multi_conn = a.shared != 1;
    let keep_stats = a.stats.is_some() || a.metrics.is_some();
    let mut exports = Vec::new();
    let mut files: Vec<ExportFiles> = Vec::new();
    if let Some(img) = &a.image {
        let spec = ExportSpec {
            name: a.export_name.clone(),
            file: img.clone(),
            format: a.format.clone(),
            description: a.description.clone(),
            depth: a.allocation_depth,
            readonly: a.read_only,
            discard: match a.discard.as_deref() {
                Some(d) => discard_mode(d)?,
                None => DiscardMode::Ignore,
            },
            detect_zeroes: match a.detect_zeroes.as_deref() {
                Some(d) => detect_zeroes_mode(d)?,
                None => None,
            },
            bitmaps: a.bitmaps.clone(),
            overlay: a.snapshot,
            internal_snapshot: a.load_snapshot.clone(),
            image_opts: a.image_opts,
        };
        let (e, f) = build_export(
            &spec,
            engine,
            policy,
            a.offset.unwrap_or(0),
            multi_conn,
            keep_stats,
        )?;
        f.check_against(&files)?;
        exports.push(e);
        files.push(f);
    }
    for s in &specs {
        if exports.iter().any(|e: &Arc<Export>| e.name == s.name) {
            return Err(bad(format!("export name '{}' given twice", s.name)));
        }
        let (e, f) = build_export(s, engine, policy, 0, multi_conn, keep_stats)?;
        f.check_against(&files)?;
        exports.push(e);
        files.push(f);
    }
    let to_flush: Vec<Arc<Export>> = exports.clone();
    for e in &exports {
        crate::log::event(
            crate::log::Level::Info,
            "export-opened",
            None,
            &format!(
                "export '{}' opened: {} bytes, {}",
                e.name,
                e.size(),
                if e.backend.access() == crate::block::Access::ReadWrite {
                    "writable"
                } else {
                    "read-only"
                }
            ),
        );
    }
    let conn = ConnConfig {
        exports: Arc::new(ExportSet::new(exports)),
        handshake_limit: (a.handshake_limit > 0).then(|| Duration::from_secs(a.handshake_limit)),
        tls,
        #[cfg(feature = "uring")]
        planes: None,
    };
    let workers = a.workers.unwrap_or_else(|| {
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
            .max(2);
        // O_DIRECT: every read a worker does waits for the device, so the worker count is the
        // device queue depth; page-cache reads mostly finish on the connection thread instead
        if engine.1.direct() {
            (cpus * 4).max(DIRECT_MIN_WORKERS)
        } else {
            cpus
        }
    });
    if a.stdio {
        server::serve_stdio(&conn, workers);
        for e in &to_flush {
            e.backend.close()?;
        }
        return Ok(0);
    }
    let listeners = match server::socket_activation()? {
        Some(l) => {
            if a.socket.is_some() || a.bind.is_some() || a.port.is_some() {
                return Err(bad("-k, -b and -p cannot be used with socket activation"));
            }
            vec![l]
        }
        None => match &a.socket {
            Some(k) => {
                if a.bind.is_some() || a.port.is_some() {
                    return Err(bad("-k cannot be combined with -b or -p"));
                }
                vec![server::listen_unix(k)?]
            }
            None => vec![server::listen_tcp(
                a.bind.as_deref().unwrap_or("0.0.0.0"),
                a.port.unwrap_or(10809),
            )?],
        },
    };
    let metrics_path = match &a.metrics {
        Some(addr) => {
            let (listener, path) = metrics_listener(addr)?;
            crate::nbd::metrics::start(listener, conn.exports.clone())?;
            path
        }
        None => None,
    };
    let stats_target = a.stats.clone();
    let on_usr1: Option<Box<dyn Fn() + Send>> = stats_target.clone().map(|t| {
        let exports = to_flush.clone();
        Box::new(move || write_stats(&t, &exports)) as Box<dyn Fn() + Send>
    });
    let srv = Server::new(
        ServerConfig {
            on_usr1,
            conn,
            shared: a.shared,
            max_connections: a.max_connections,
            persistent: a.persistent,
            workers,
            // one ring data plane per core, unless the portable engine was asked for
            planes: if engine.0 == Engine::Sync {
                0
            } else {
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1)
            },
        },
        listeners,
    )?;
    if let Some(p) = &a.pid_file {
        write_pid_file(p)?;
    }
    if let Some(mut p) = fork_pipe.take() {
        p.send(b"OK");
        drop(p);
        if a.verbose == 0 && a.log_level.is_none() {
            let _ = crate::io::sys::stdio_to_null();
        }
    }
    // listening, images open, pid file written: the service is ready (MAINPID: after --fork
    // the server is this child, not the process the service manager started)
    sd_notify(&format!("READY=1\nMAINPID={}", std::process::id()));
    let stop = srv.run();
    sd_notify("STOPPING=1");
    if let Some(t) = &stats_target {
        write_stats(t, &to_flush);
    }
    if let Some(p) = &metrics_path {
        let _ = std::fs::remove_file(p);
    }
    let stop = stop?;
    // clean shutdown: every completed write and its metadata reach the disk before we exit
    let mut rc = 0;
    for e in &to_flush {
        match e.backend.close() {
            Ok(()) => crate::log::event(
                crate::log::Level::Info,
                "export-closed",
                None,
                &format!("export '{}' closed", e.name),
            ),
            Err(err) => {
                crate::log::event(
                    crate::log::Level::Error,
                    "export-closed",
                    None,
                    &format!("export '{}': close on shutdown failed: {err}", e.name),
                );
                rc = 1;
            }
        }
    }
    match stop {
        Stop::Signal | Stop::LastClient => Ok(rc),
    }
}
