//! Command line: clap structures turned into library options, and output formatting in
//! qemu-img's formats. Only this module and `open.rs` name concrete formats and I/O engines.

pub mod bench;
pub mod bitmap;
pub mod check;
pub mod convert;
pub mod create;
pub mod info;
pub mod map;
pub mod qjson;
pub mod resize;
pub mod serve;

use crate::error::Error;
use crate::io::Engine;
use crate::open::{canonical_allowed, Allowed, Format, OpenOptions, OpenPolicy};
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "qnbd",
    version,
    about = "qcow2 / raw image engine with a built-in NBD server",
    long_about = "qcow2 / raw image engine with a built-in NBD server.\n\nThe inspection commands print what qemu-img prints (same JSON), so scripts written for qemu-img work unchanged.\nThe I/O engine is io_uring when the kernel allows it, positioned I/O otherwise; QNBD_IO_ENGINE=sync|io_uring forces one."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum OutputFormat {
    #[default]
    Human,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show information about an image (qemu-img info).
    Info(info::InfoArgs),
    /// Show the allocation map of an image (qemu-img map).
    Map(map::MapArgs),
    /// Convert an image (qemu-img convert).
    Convert(convert::ConvertArgs),
    /// Change the virtual size of an image (qemu-img resize).
    Resize(resize::ResizeArgs),
    /// Measure request throughput and latency on an image (qemu-img bench).
    Bench(bench::BenchArgs),
    /// Manage and inspect persistent dirty bitmaps (qemu-img bitmap).
    Bitmap(bitmap::BitmapArgs),
    /// Check an image for consistency and optionally repair it (qemu-img check).
    Check(check::CheckArgs),
    /// Create a new image (qemu-img create).
    Create(create::CreateArgs),
    /// Export images over NBD (qemu-nbd).
    Serve(Box<serve::ServeArgs>),
}

/// Options every image-opening command shares.
pub(crate) fn open_options(format: Option<&str>) -> Result<OpenOptions, Error> {
    Ok(OpenOptions {
        format: format.map(Format::parse).transpose()?,
        engine: Engine::from_env()
            .map_err(|e| Error::new(crate::error::ErrorKind::InvalidArgument, e))?,
        ..OpenOptions::default()
    })
}

/// Help text of `--allow-backing`, shared by the commands that open chains.
pub(crate) const ALLOW_BACKING_HELP: &str = "Directory (or single file) where backing and data files named inside images may be; repeatable. Default: the directory of the image. 'none': open no file an image names";

/// The open policy from `--allow-backing` values: none given = the top image's directory,
/// `none` = no file an image names, otherwise those directories or files (canonical).
pub(crate) fn open_policy(allow: &[String]) -> Result<OpenPolicy, Error> {
    if allow.is_empty() {
        return Ok(OpenPolicy::default());
    }
    if allow.iter().any(|a| a == "none") {
        if allow.len() > 1 {
            return Err(Error::new(
                crate::ErrorKind::InvalidArgument,
                "--allow-backing none cannot be combined with other --allow-backing values",
            ));
        }
        return Ok(OpenPolicy::no_references());
    }
    let paths = allow
        .iter()
        .map(|a| canonical_allowed(a))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(OpenPolicy {
        allowed: Allowed::Paths(paths),
        ..OpenPolicy::default()
    })
}

/// Split a QemuOpts string: `,` separates fields, `,,` is a literal comma.
pub(crate) fn split_qemu_opts(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                out.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    out.push(cur);
    out
}

/// Parse a size argument the way qemu-img does (suffixes k, M, G, ...).
pub(crate) fn parse_size_arg(s: &str) -> Result<u64, String> {
    crate::units::parse_size(s).ok_or_else(|| format!("Invalid size '{s}'"))
}

/// Run the command line; returns the process exit code.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 1 } else { 0 };
            let _ = e.print();
            return code;
        }
    };
    let res = match cli.command {
        Command::Info(a) => info::run(&a),
        Command::Map(a) => map::run(&a),
        Command::Convert(a) => convert::run(&a),
        Command::Resize(a) => resize::run(&a),
        Command::Bench(a) => bench::run(&a),
        Command::Bitmap(a) => bitmap::run(&a),
        Command::Check(a) => check::run(&a),
        Command::Create(a) => create::run(&a),
        Command::Serve(a) => serve::run(&a),
    };
    match res {
        Ok(code) => code,
        Err(e) => {
            eprintln!("qnbd: {e}");
            1
        }
    }
}
