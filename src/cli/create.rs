//! `qnbd create`: qemu-img create for qcow2 and raw, with the same options, defaults, messages
//! and `Formatting '...'` line (byte for byte: the option order is QEMU's option list order).

use super::open_options;
use crate::block::create_raw::{create_raw, Preallocation};
use crate::error::{Error, ErrorKind, Result};
use crate::open::{open_image, Format};
use crate::qcow2::create::{create_qcow2, CompressionType, CreateOptions};
use clap::Args;
use std::path::Path;

#[derive(Debug, Args)]
#[command(args_override_self = true)]
pub struct CreateArgs {
    /// Image format (qcow2 or raw); raw when omitted, like qemu-img.
    #[arg(short = 'f', long = "format", default_value = "raw")]
    pub format: String,
    /// Format options, comma separated (`,,` is a literal comma); may be repeated.
    #[arg(short = 'o', long = "options")]
    pub options: Vec<String>,
    /// Backing file (stored in the image as given).
    #[arg(short = 'b', long = "backing")]
    pub backing: Option<String>,
    /// Format of the backing file.
    #[arg(short = 'F', long = "backing-format")]
    pub backing_format: Option<String>,
    /// Do not open the backing file (its size is then not known: SIZE is required).
    #[arg(short = 'u')]
    pub unsafe_backing: bool,
    /// Quiet: do not print the `Formatting` line.
    #[arg(short = 'q')]
    pub quiet: bool,
    /// The image file to create (optional with `-o help`: the protocol's options are then
    /// listed too).
    pub image: Option<String>,
    /// Virtual size (suffixes k, M, G, T, P, E); taken from the backing file when omitted.
    #[arg(allow_hyphen_values = true)]
    pub size: Option<String>,
}

fn arg_err(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidArgument, msg)
}

/// Split a QemuOpts string (`,,` is a literal comma), dropping empty fields.
fn split_opts(s: &str) -> Vec<String> {
    super::split_qemu_opts(s)
        .into_iter()
        .filter(|p| !p.is_empty())
        .collect()
}

fn parse_bool(key: &str, v: &str) -> Result<bool> {
    match v {
        "on" | "yes" | "true" | "y" => Ok(true),
        "off" | "no" | "false" | "n" => Ok(false),
        _ => Err(arg_err(format!("Parameter '{key}' expects 'on' or 'off'"))),
    }
}

fn parse_size_opt(key: &str, v: &str) -> Result<u64> {
    crate::units::parse_size(v).ok_or_else(|| {
        arg_err(format!(
            "Parameter '{key}' expects a non-negative number below 2^64\nOptional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively."
        ))
    })
}

/// One option as given: its printed form and the raw text.
#[derive(Debug, Default, Clone)]
pub(crate) struct Given {
    pub(crate) cluster_size: Option<u64>,
    pub(crate) extended_l2: Option<(String, bool)>,
    pub(crate) preallocation: Option<String>,
    compression_type: Option<String>,
    size: Option<u64>,
    pub(crate) compat: Option<String>,
    pub(crate) backing_file: Option<String>,
    pub(crate) backing_fmt: Option<String>,
    data_file: Option<String>,
    data_file_raw: Option<(String, bool)>,
    lazy_refcounts: Option<(String, bool)>,
    pub(crate) refcount_bits: Option<u64>,
}

impl Given {
    /// `-o size=`.
    pub(crate) fn size_opt(&self) -> Option<u64> {
        self.size
    }
}

pub(crate) fn parse_given(fmt: Format, options: &[String]) -> Result<Given> {
    let mut g = Given::default();
    for o in options {
        for kv in split_opts(o) {
            let (k, v) = kv.split_once('=').unwrap_or((kv.as_str(), "on"));
            let known = match fmt {
                Format::Raw => matches!(k, "size" | "preallocation"),
                Format::Qcow2 => true,
            };
            if !known {
                return Err(arg_err(format!("Invalid parameter '{k}'")));
            }
            match k {
                "size" => g.size = Some(parse_size_opt(k, v)?),
                "preallocation" => g.preallocation = Some(v.to_string()),
                "cluster_size" => g.cluster_size = Some(parse_size_opt(k, v)?),
                "extended_l2" => g.extended_l2 = Some((v.into(), parse_bool(k, v)?)),
                "compression_type" => g.compression_type = Some(v.to_string()),
                "compat" => g.compat = Some(v.to_string()),
                "backing_file" => g.backing_file = Some(v.to_string()),
                "backing_fmt" => g.backing_fmt = Some(v.to_string()),
                "data_file" => g.data_file = Some(v.to_string()),
                "data_file_raw" => g.data_file_raw = Some((v.into(), parse_bool(k, v)?)),
                "lazy_refcounts" => g.lazy_refcounts = Some((v.into(), parse_bool(k, v)?)),
                "refcount_bits" => {
                    g.refcount_bits = Some(
                        v.parse::<u64>()
                            .map_err(|_| arg_err(format!("Parameter '{k}' expects a number")))?,
                    )
                }
                _ => return Err(arg_err(format!("Invalid parameter '{k}'"))),
            }
        }
    }
    Ok(g)
}

/// QemuOpts prints string values with commas doubled.
fn esc(s: &str) -> String {
    s.replace(',', ",,")
}

/// The `Formatting` line, in QEMU's option-list order with its defaults.
fn formatting_line(image: &str, fmt: Format, g: &Given, size: u64) -> String {
    let mut parts: Vec<String> = Vec::new();
    match fmt {
        Format::Raw => {
            parts.push(format!("size={size}"));
            if let Some(p) = &g.preallocation {
                parts.push(format!("preallocation={}", esc(p)));
            }
        }
        Format::Qcow2 => {
            parts.push(format!("cluster_size={}", g.cluster_size.unwrap_or(65536)));
            let b = |v: &Option<(String, bool)>| v.as_ref().map_or("off".into(), |x| x.0.clone());
            parts.push(format!("extended_l2={}", b(&g.extended_l2)));
            if let Some(p) = &g.preallocation {
                parts.push(format!("preallocation={}", esc(p)));
            }
            parts.push(format!(
                "compression_type={}",
                esc(g.compression_type.as_deref().unwrap_or("zlib"))
            ));
            parts.push(format!("size={size}"));
            if let Some(c) = &g.compat {
                parts.push(format!("compat={}", esc(c)));
            }
            if let Some(v) = &g.backing_file {
                parts.push(format!("backing_file={}", esc(v)));
            }
            if let Some(v) = &g.backing_fmt {
                parts.push(format!("backing_fmt={}", esc(v)));
            }
            if let Some(v) = &g.data_file {
                parts.push(format!("data_file={}", esc(v)));
            }
            if let Some((s, _)) = &g.data_file_raw {
                parts.push(format!("data_file_raw={s}"));
            }
            parts.push(format!("lazy_refcounts={}", b(&g.lazy_refcounts)));
            parts.push(format!("refcount_bits={}", g.refcount_bits.unwrap_or(16)));
        }
    }
    format!(
        "Formatting '{image}', fmt={} {}",
        fmt.name(),
        parts.join(" ")
    )
}

/// The backing file name as QEMU opens it: relative names are relative to the new image.
fn backing_path(image: &str, backing: &str) -> String {
    if Path::new(backing).is_absolute() {
        return backing.to_string();
    }
    match Path::new(image).parent() {
        Some(dir) if !dir.as_os_str().is_empty() => {
            dir.join(backing).to_string_lossy().into_owned()
        }
        _ => backing.to_string(),
    }
}

/// QAPI's enum checks: they run before the format's own validation.
pub(crate) fn qcow2_options(g: &Given, size: u64) -> Result<CreateOptions> {
    let mut o = CreateOptions {
        size,
        ..CreateOptions::default()
    };
    if let Some(c) = &g.compat {
        o.version = match c.as_str() {
            "0.10" | "v2" => 2,
            "1.1" | "v3" => 3,
            _ => {
                return Err(arg_err(format!(
                    "Parameter 'version' does not accept value '{c}'"
                )))
            }
        };
    }
    if let Some(p) = &g.preallocation {
        o.preallocation = Preallocation::parse(p).ok_or_else(|| {
            arg_err(format!(
                "Parameter 'preallocation' does not accept value '{p}'"
            ))
        })?;
    }
    if let Some(c) = &g.compression_type {
        o.compression_type = match c.as_str() {
            "zlib" => CompressionType::Zlib,
            "zstd" => CompressionType::Zstd,
            _ => {
                return Err(arg_err(format!(
                    "Parameter 'compression-type' does not accept value '{c}'"
                )))
            }
        };
    }
    if let Some(cs) = g.cluster_size {
        o.cluster_size = cs;
    }
    if let Some(rb) = g.refcount_bits {
        o.refcount_bits = u32::try_from(rb).unwrap_or(u32::MAX);
    }
    o.lazy_refcounts = g.lazy_refcounts.as_ref().is_some_and(|x| x.1);
    o.extended_l2 = g.extended_l2.as_ref().is_some_and(|x| x.1);
    o.data_file_raw = g.data_file_raw.as_ref().is_some_and(|x| x.1);
    o.data_file = g.data_file.clone();
    o.backing_file = g.backing_file.clone();
    o.backing_format = g.backing_fmt.clone();
    Ok(o)
}

pub fn run(a: &CreateArgs) -> Result<i32> {
    let fmt = match a.format.as_str() {
        "qcow2" => Format::Qcow2,
        "raw" => Format::Raw,
        other => {
            return Err(arg_err(format!(
                "Unknown file format '{other}' (supported: qcow2, raw)"
            )))
        }
    };
    if asks_option_help(&a.options) {
        // as qemu-img: before anything else is looked at (other options, SIZE)
        print!("{}", option_help(fmt, a.image.is_some()));
        return Ok(0);
    }
    let Some(img) = a.image.as_deref() else {
        return Err(arg_err(format!(
            "Expecting image file name\nTry '{} create --help' for more info",
            crate::error::program()
        )));
    };
    let mut g = parse_given(fmt, &a.options).map_err(|e| e.context(img))?;
    if let Some(s) = &a.size {
        let v = crate::units::parse_size(s)
            .ok_or_else(|| arg_err(format!("Invalid image size specified: '{s}'.")))?;
        if v > i64::MAX as u64 {
            return Err(arg_err(
                "Invalid image size specified. Must be between 0 and 9223372036854775807.",
            ));
        }
        if g.size.is_some() {
            return Err(arg_err("The image size must be specified only once").context(img));
        }
        g.size = Some(v);
    }
    if let Some(b) = &a.backing {
        g.backing_file = Some(b.clone());
    }
    if let Some(f) = &a.backing_format {
        g.backing_fmt = Some(f.clone());
    }
    if fmt == Format::Raw && g.backing_file.is_some() {
        return Err(arg_err("Backing file not supported for file format 'raw'").context(img));
    }
    if let Some(b) = g.backing_file.clone() {
        let path = backing_path(img, &b);
        if g.backing_fmt.is_none() {
            let detected = open_image(
                &path,
                &crate::open::OpenOptions {
                    no_backing: true,
                    no_io: true,
                    // as qemu-img: an overlay may be created over an image in use
                    locking: crate::open::Locking::ForceShare,
                    ..open_options(None)?
                },
            )
            .ok()
            .and_then(|i| i.layers.first().map(|l| l.format.name()));
            let mut msg = "Backing file specified without backing format".to_string();
            if let Some(d) = detected {
                msg.push_str(&format!("\nDetected format of {d}."));
            }
            msg.push_str(&crate::error::hint(&format!(
                "name the backing file's format with -F {}",
                detected.unwrap_or("FMT")
            )));
            return Err(arg_err(msg).context(img));
        }
        if !a.unsafe_backing {
            let opened = open_image(
                &path,
                &crate::open::OpenOptions {
                    no_io: true,
                    locking: crate::open::Locking::ForceShare,
                    ..open_options(g.backing_fmt.as_deref())?
                },
            )
            .map_err(|e| {
                // strerror text, as QEMU prints it (without Rust's "(os error N)")
                let msg = e.to_string();
                let msg = msg.split(" (os error ").next().unwrap_or(&msg).to_string();
                Error::new(e.kind(), format!("{msg}\nCould not open backing image.")).context(img)
            })?;
            if g.size.is_none() {
                g.size = Some(opened.chain.size());
            }
        }
    }
    let Some(size) = g.size else {
        return Err(arg_err("Image creation needs a size parameter").context(img));
    };
    if !a.quiet {
        println!("{}", formatting_line(img, fmt, &g, size));
    }
    match fmt {
        Format::Raw => {
            let p = match &g.preallocation {
                None => Preallocation::Off,
                Some(p) => Preallocation::parse(p).ok_or_else(|| {
                    arg_err(format!("Invalid preallocation mode: '{p}'")).context(img)
                })?,
            };
            create_raw(img, size, p).map_err(|e| e.context(img))?;
        }
        Format::Qcow2 => {
            let o = qcow2_options(&g, size).map_err(|e| e.context(img))?;
            create_qcow2(img, &o).map_err(|e| e.context(img))?;
        }
    }
    Ok(0)
}

/// The creation options of each format, as qemu-img lists them (`-o help`).
const QCOW2_OPTIONS: &[&str] = &[
    "backing_file=<str>     - File name of a base image",
    "backing_fmt=<str>      - Image format of the base image",
    "cluster_size=<size>    - qcow2 cluster size",
    "compat=<str>           - Compatibility level (v2 [0.10] or v3 [1.1])",
    "compression_type=<str> - Compression method used for image cluster compression",
    "data_file=<str>        - File name of an external data file",
    "data_file_raw=<bool (on/off)> - The external data file must stay valid as a raw image",
    "encrypt.cipher-alg=<str> - Name of encryption cipher algorithm",
    "encrypt.cipher-mode=<str> - Name of encryption cipher mode",
    "encrypt.format=<str>   - Encrypt the image, format choices: 'aes', 'luks'",
    "encrypt.hash-alg=<str> - Name of encryption hash algorithm",
    "encrypt.iter-time=<num> - Time to spend in PBKDF in milliseconds",
    "encrypt.ivgen-alg=<str> - Name of IV generator algorithm",
    "encrypt.ivgen-hash-alg=<str> - Name of IV generator hash algorithm",
    "encrypt.key-secret=<str> - ID of secret providing qcow AES key or LUKS passphrase",
    "encryption=<bool (on/off)> - Encrypt the image with format 'aes'. (Deprecated in favor of encrypt.format=aes)",
    "extended_l2=<bool (on/off)> - Extended L2 tables",
    "lazy_refcounts=<bool (on/off)> - Postpone refcount updates",
    "preallocation=<str>    - Preallocation mode (allowed values: off, metadata, falloc, full)",
    "refcount_bits=<num>    - Width of a reference count entry in bits",
    "size=<size>            - Virtual disk size",
];
const RAW_OPTIONS: &[&str] = &["size=<size>            - Virtual disk size"];
/// QEMU's `file` protocol driver's creation options (listed when a file name is given).
const FILE_OPTIONS: &[&str] = &[
    "extent_size_hint=<size> - Extent size hint for the image file, 0 to disable",
    "nocow=<bool (on/off)>  - Turn off copy-on-write (valid only on btrfs)",
    "preallocation=<str>    - Preallocation mode (allowed values: off, falloc, full)",
    "size=<size>            - Virtual disk size",
];

/// Whether `-o` asks for the option list (`help` or `?` among the options).
pub(crate) fn asks_option_help(options: &[String]) -> bool {
    options
        .iter()
        .flat_map(|o| split_opts(o))
        .any(|p| p == "help" || p == "?")
}

/// `create -o help`: the format's options; with a file name, merged with the protocol's (the
/// format's entry wins, sorted by name), as qemu-img prints them.
pub(crate) fn option_help(fmt: Format, with_file: bool) -> String {
    let own = match fmt {
        Format::Qcow2 => QCOW2_OPTIONS,
        Format::Raw => RAW_OPTIONS,
    };
    let name = |l: &str| l.split('=').next().unwrap_or(l).to_string();
    if !with_file {
        let mut t = format!("Supported {} options:\n", fmt.name());
        for l in own {
            t.push_str(&format!("  {l}\n"));
        }
        t.push_str("\nThe protocol level may support further options.\nSpecify the target filename to include those options.\n");
        return t;
    }
    let mut all: Vec<&str> = own.to_vec();
    for l in FILE_OPTIONS {
        if !all.iter().any(|o| name(o) == name(l)) {
            all.push(l);
        }
    }
    all.sort_by_key(|l| name(l));
    let mut t = String::from("Supported options:\n");
    for l in all {
        t.push_str(&format!("  {l}\n"));
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_split_on_single_commas_only() {
        assert_eq!(split_opts("a=1,b=x,,y,c"), vec!["a=1", "b=x,y", "c"]);
    }

    #[test]
    fn formatting_line_follows_qemu_order() {
        let g = parse_given(
            Format::Qcow2,
            &["compat=1.1,backing_file=b.raw,backing_fmt=raw,data_file=z.data,lazy_refcounts=on,refcount_bits=8,cluster_size=4096,extended_l2=off,preallocation=off,compression_type=zlib".into()],
        )
        .unwrap();
        assert_eq!(
            formatting_line("all.qcow2", Format::Qcow2, &g, 2097152),
            "Formatting 'all.qcow2', fmt=qcow2 cluster_size=4096 extended_l2=off preallocation=off compression_type=zlib size=2097152 compat=1.1 backing_file=b.raw backing_fmt=raw data_file=z.data lazy_refcounts=on refcount_bits=8"
        );
        let g = parse_given(Format::Qcow2, &[]).unwrap();
        assert_eq!(
            formatting_line("a.qcow2", Format::Qcow2, &g, 1073741824),
            "Formatting 'a.qcow2', fmt=qcow2 cluster_size=65536 extended_l2=off compression_type=zlib size=1073741824 lazy_refcounts=off refcount_bits=16"
        );
    }

    #[test]
    fn string_values_print_commas_doubled() {
        let g = parse_given(Format::Qcow2, &["data_file=z,,x.data".into()]).unwrap();
        assert_eq!(g.data_file.as_deref(), Some("z,x.data"));
        assert!(formatting_line("i", Format::Qcow2, &g, 0).contains("data_file=z,,x.data"));
    }
}
