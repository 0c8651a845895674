//! Command line: clap structures turned into library options, and output formatting in
//! qemu-img's formats. Only this module and `open.rs` name concrete formats and I/O engines.

pub mod bench;
pub mod bitmap;
pub mod check;
pub mod compare;
pub mod convert;
pub mod create;
pub mod dd;
pub mod image_opts;
pub mod info;
pub mod manual;
pub mod map;
pub mod measure;
pub mod progress;
pub mod qjson;
pub mod rebase;
pub mod resize;
pub mod serve;
pub mod snapshot;

use crate::error::Error;
use crate::io::Engine;
use crate::open::{canonical_allowed, Allowed, Format, Locking, OpenOptions, OpenPolicy};
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
    /// The size a new image needs, for a virtual size or an image's contents (qemu-img measure).
    Measure(measure::MeasureArgs),
    /// Convert an image (qemu-img convert).
    Convert(convert::ConvertArgs),
    /// Copy blocks of an image into a new image (qemu-img dd).
    Dd(dd::DdArgs),
    /// Name a new backing file in an image's header (qemu-img rebase -u).
    Rebase(rebase::RebaseArgs),
    /// Change the virtual size of an image (qemu-img resize).
    Resize(resize::ResizeArgs),
    /// Measure request throughput and latency on an image (qemu-img bench).
    Bench(bench::BenchArgs),
    /// Manage and inspect persistent dirty bitmaps (qemu-img bitmap).
    Bitmap(bitmap::BitmapArgs),
    /// List an image's internal snapshots (qemu-img snapshot -l).
    Snapshot(snapshot::SnapshotArgs),
    /// Check an image for consistency and optionally repair it (qemu-img check).
    Check(check::CheckArgs),
    /// Compare the guest contents of two images (qemu-img compare).
    Compare(compare::CompareArgs),
    /// Create a new image (qemu-img create).
    Create(create::CreateArgs),
    /// Export images over NBD (qemu-nbd).
    Serve(Box<serve::ServeArgs>),
    /// Print or install the manual pages (generated from these definitions).
    Man(manual::ManArgs),
    /// Print or install shell completions (bash, zsh, fish).
    Completions(manual::CompletionsArgs),
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

/// The image locks of a command that opens `path` (`writable` or not) as qemu-img's `base`
/// would, `-U` / `--force-share` included: like qemu-img, force-share is for read-only opens
/// only.
pub(crate) fn locking(
    path: &str,
    force_share: bool,
    writable: bool,
    base: Locking,
) -> Result<Locking, Error> {
    match (force_share, writable) {
        (true, true) => Err(Error::new(
            crate::ErrorKind::InvalidArgument,
            format!(
                "Could not open '{path}': force-share=on can only be used with read-only images{}",
                crate::error::hint("drop -U/--force-share to write, or open read-only")
            ),
        )),
        (true, false) => Ok(Locking::ForceShare),
        (false, _) => Ok(base),
    }
}

/// The file a command line image name stands for: a `json:` name or (with `--image-opts`) a
/// QemuOpts string sets options in `opts` (format, locking, backing, cache) and names the
/// file; a plain name is the file. Errors are worded as qemu-img words them.
pub(crate) fn image_name(
    name: &str,
    image_opts: bool,
    opts: &mut OpenOptions,
) -> Result<String, Error> {
    if image_opts && opts.format.is_some() {
        return Err(Error::new(
            crate::ErrorKind::InvalidArgument,
            "--image-opts and --format are mutually exclusive",
        ));
    }
    match image_opts::parse(name, image_opts)
        .map_err(|e| e.context(format!("Could not open '{name}'")))?
    {
        Some(spec) => {
            spec.apply(opts)
                .map_err(|e| e.context(format!("Could not open '{name}'")))?;
            Ok(spec.filename)
        }
        None => Ok(name.to_string()),
    }
}

/// Help text of `--image-opts`.
pub(crate) const IMAGE_OPTS_HELP: &str = "Treat the image name as QEMU image options (driver=qcow2,file.filename=PATH,file.locking=off,backing=,...); json:{...} names are always understood";

/// Open the image a qemu-img-style command names. A file that cannot be opened at all is
/// reported as qemu-img reports it: its front end wraps the file layer's
/// "Could not open 'F': REASON" in another "Could not open 'F': ".
pub(crate) fn open_named(path: &str, opts: &OpenOptions) -> Result<crate::open::Image, Error> {
    crate::open::open_image(path, opts).map_err(|e| named_open_error(path, e))
}

/// See [`open_named`].
pub(crate) fn named_open_error(path: &str, e: Error) -> Error {
    if e.failed_open() == Some(path) {
        e.context(format!("Could not open '{path}'"))
    } else {
        e
    }
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

/// Parse a size argument the way qemu-img does (suffixes k, M, G, ...; leading blanks
/// skipped, as `strtod` skips them).
pub(crate) fn parse_size_arg(s: &str) -> Result<u64, String> {
    crate::units::parse_size(s.trim_start()).ok_or_else(|| format!("Invalid size '{s}'"))
}

/// Parse an integer option the way QEMU's `qemu_strtoi(s, NULL, 0, ..)` does: leading blanks
/// skipped (virtnbdbackup passes `-e 2` as one argument, so getopt hands over ` 2`), an
/// optional `+`, then decimal, `0x` hexadecimal or `0` octal, and nothing after.
pub(crate) fn qemu_int<T: TryFrom<u64>>(s: &str) -> Result<T, String> {
    let bad = || format!("invalid value '{s}'");
    let t = s.trim_start();
    let t = t.strip_prefix('+').unwrap_or(t);
    let (digits, radix) = if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        (h, 16)
    } else if t.len() > 1 && t.starts_with('0') {
        (&t[1..], 8)
    } else {
        (t, 10)
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return Err(bad());
    }
    let v = u64::from_str_radix(digits, radix).map_err(|_| bad())?;
    T::try_from(v).map_err(|_| format!("value '{s}' out of range"))
}

/// How the process was invoked: as itself, or by one of QEMU's tool names (a symlink named
/// `qemu-img` or `qemu-nbd`), when it takes that tool's command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Personality {
    Qnbd,
    QemuImg,
    QemuNbd,
}

impl Personality {
    /// From `argv[0]`'s file name.
    pub fn from_argv0(argv0: &std::ffi::OsStr) -> Personality {
        match std::path::Path::new(argv0)
            .file_name()
            .and_then(|n| n.to_str())
        {
            Some("qemu-img") => Personality::QemuImg,
            Some("qemu-nbd") => Personality::QemuNbd,
            _ => Personality::Qnbd,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Personality::Qnbd => "qnbd",
            Personality::QemuImg => "qemu-img",
            Personality::QemuNbd => "qemu-nbd",
        }
    }
}

/// The QEMU release whose command lines, messages and JSON the QEMU-named modes follow; it is
/// what `qemu-img --version` reports (tools parse it to decide which options to pass).
pub const QEMU_COMPAT_VERSION: &str = "10.0.0";

/// `qemu-nbd` by name: qemu-nbd's command line is `qnbd serve`'s.
#[derive(Debug, Parser)]
#[command(
    name = "qemu-nbd",
    disable_version_flag = true,
    infer_long_args = true,
    about = "Export a disk image over NBD (qnbd serve, invoked as qemu-nbd)"
)]
struct QemuNbdCli {
    /// Output version information and exit.
    #[arg(short = 'V', long = "version")]
    version: bool,
    #[command(flatten)]
    serve: serve::ServeArgs,
}

fn version_text(p: Personality) -> String {
    let ours = env!("CARGO_PKG_VERSION");
    match p {
        Personality::Qnbd => format!("qnbd {ours}\n"),
        Personality::QemuImg => {
            format!("qemu-img version {QEMU_COMPAT_VERSION} (qnbd {ours})\n")
        }
        Personality::QemuNbd => format!("qemu-nbd {QEMU_COMPAT_VERSION} (qnbd {ours})\n"),
    }
}

/// Print a clap error (help and version are not errors) and give its exit code. Invoked by a
/// QEMU tool's name, the errors scripts see are worded as that tool's getopt and checks word
/// them.
/// qemu-nbd's refusal of a command line without exactly one image.
const QEMU_NBD_ARGC: &str =
    "qemu-nbd: Invalid number of arguments\nTry `qemu-nbd --help' for more information.\n";

/// qemu-img's refusal of missing (or, with `extra`, surplus) positional arguments of `sub`.
fn qemu_img_positionals(
    sub: Option<&str>,
    extra: bool,
    args: &[std::ffi::OsString],
) -> Option<String> {
    let sub = sub?;
    let tail = format!("\nTry 'qemu-img {sub} --help' for more info\n");
    let extra_arg = || {
        args.last()
            .map(|a| a.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    Some(match (sub, extra) {
        ("info" | "map" | "check" | "bench", _) => {
            format!("qemu-img: Expecting one image file name{tail}")
        }
        ("compare", _) => format!("qemu-img: Expecting two image file names{tail}"),
        ("create", false) => format!("qemu-img: Expecting image file name{tail}"),
        ("create", true) => format!("qemu-img: Unexpected argument: {}{tail}", extra_arg()),
        ("resize", false) => format!("qemu-img: Expecting image file name and size{tail}"),
        ("resize", true) => format!("qemu-img: Extra argument(s) in command line{tail}"),
        ("convert", false) => "qemu-img: Must specify image file name\n".into(),
        ("bitmap", _) => {
            let acts = [
                "--add",
                "--remove",
                "--clear",
                "--enable",
                "--disable",
                "--merge",
            ];
            let any = args.iter().any(|a| {
                let a = a.to_string_lossy();
                acts.iter()
                    .any(|x| a == *x || a.starts_with(&format!("{x}=")))
            });
            if any {
                "qemu-img: Expecting filename and bitmap name\n".into()
            } else {
                format!("qemu-img: {}\n", bitmap::need_an_action())
            }
        }
        _ => return None,
    })
}

fn clap_exit(e: clap::Error, p: Personality, args: &[std::ffi::OsString]) -> i32 {
    use clap::error::{ContextKind, ContextValue, ErrorKind as K};
    if !e.use_stderr() {
        let _ = e.print();
        return 0;
    }
    let ctx = |k| match e.get(k) {
        Some(ContextValue::String(s)) => Some(s.clone()),
        _ => None,
    };
    let prog = p.name();
    let sub = match e.get(ContextKind::Usage) {
        Some(ContextValue::StyledStr(u)) => u
            .to_string()
            .split_whitespace()
            .nth(2)
            .filter(|w| !w.starts_with('[') && !w.starts_with('<'))
            .map(str::to_string),
        _ => None,
    };
    let text = match (p, e.kind()) {
        (Personality::Qnbd, _) => None,
        (_, K::ValueValidation) => {
            use std::error::Error as _;
            e.source().map(|s| format!("{prog}: {s}\n"))
        }
        (Personality::QemuNbd, K::MissingRequiredArgument) => Some(QEMU_NBD_ARGC.into()),
        (Personality::QemuNbd, K::UnknownArgument)
            if ctx(ContextKind::InvalidArg).is_some_and(|a| !a.starts_with('-')) =>
        {
            Some(QEMU_NBD_ARGC.into())
        }
        (Personality::QemuNbd, K::UnknownArgument) => ctx(ContextKind::InvalidArg).map(|a| {
            let what = match a.strip_prefix('-') {
                Some(short) if !short.starts_with('-') => format!("invalid option -- '{short}'"),
                _ => format!(
                    "unrecognized option '{}'",
                    a.split('=').next().unwrap_or(&a)
                ),
            };
            format!("{prog}: {what}\n{prog}: Try `{prog} --help' for more information.\n")
        }),
        (Personality::QemuImg, K::InvalidSubcommand) => {
            ctx(ContextKind::InvalidSubcommand).map(|c| {
                format!("{prog}: Command not found: {c}\nTry '{prog} --help' for more info\n")
            })
        }
        // an option given last without its value: getopt's words
        (Personality::QemuImg, K::InvalidValue)
            if ctx(ContextKind::InvalidValue).is_some_and(|v| v.is_empty()) =>
        {
            // clap names no usage here: the command is the first argument
            let cmd = sub
                .clone()
                .or_else(|| {
                    args.get(1)
                        .map(|a| a.to_string_lossy().into_owned())
                        .filter(|a| !a.starts_with('-'))
                })
                .map(|s| format!("{prog} {s}"))
                .unwrap_or(prog.into());
            let last = args
                .last()
                .map(|a| a.to_string_lossy().into_owned())
                .unwrap_or_default();
            let what = match (last.strip_prefix("--"), last.strip_prefix('-')) {
                (Some(_), _) => {
                    let long = ctx(ContextKind::InvalidArg).unwrap_or_default();
                    let long = long.split(' ').next().unwrap_or_default().to_string();
                    format!("option '{long}' requires an argument")
                }
                (None, Some(short)) => format!(
                    "option requires an argument -- '{}'",
                    short.chars().last().unwrap_or('?')
                ),
                _ => {
                    return {
                        let _ = e.print();
                        1
                    }
                }
            };
            Some(format!("{cmd}: {what}\nTry '{cmd} --help' for more info\n"))
        }
        (Personality::QemuImg, K::MissingRequiredArgument) => {
            qemu_img_positionals(sub.as_deref(), false, args)
        }
        (Personality::QemuImg, K::UnknownArgument)
            if ctx(ContextKind::InvalidArg).is_some_and(|a| !a.starts_with('-')) =>
        {
            qemu_img_positionals(sub.as_deref(), true, args)
        }
        (Personality::QemuImg, K::UnknownArgument) => ctx(ContextKind::InvalidArg).map(|a| {
            let cmd = sub
                .clone()
                .map(|s| format!("{prog} {s}"))
                .unwrap_or(prog.into());
            let what = match a.strip_prefix('-') {
                Some(short) if !short.starts_with('-') => format!("invalid option -- '{short}'"),
                _ => format!(
                    "unrecognized option '{}'",
                    a.split('=').next().unwrap_or(&a)
                ),
            };
            format!("{cmd}: {what}\nTry '{cmd} --help' for more info\n")
        }),
        _ => None,
    };
    match text {
        Some(t) => eprint!("{t}"),
        None => {
            let _ = e.print();
        }
    }
    1
}

/// Run the command line; returns the process exit code.
pub fn main() -> i32 {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let personality = args
        .first()
        .map(|a| Personality::from_argv0(a))
        .unwrap_or(Personality::Qnbd);
    crate::error::set_program(personality.name());
    if personality == Personality::QemuNbd {
        let cli = match QemuNbdCli::try_parse_from(&args) {
            Ok(c) => c,
            Err(e) => return clap_exit(e, personality, &args),
        };
        if cli.version {
            print!("{}", version_text(personality));
            return 0;
        }
        return finish(serve::run(&cli.serve));
    }
    if personality == Personality::QemuImg
        && matches!(
            args.get(1).and_then(|a| a.to_str()),
            Some("-V" | "--version" | "--versio" | "--versi" | "--vers" | "--ver")
        )
    {
        print!("{}", version_text(personality));
        return 0;
    }
    let command = match personality {
        Personality::QemuImg => <Cli as clap::CommandFactory>::command()
            .name("qemu-img")
            .bin_name("qemu-img")
            .infer_long_args(true)
            .disable_version_flag(true),
        _ => grouped_help(<Cli as clap::CommandFactory>::command()),
    };
    let cli = match command
        .try_get_matches_from(&args)
        .and_then(|m| <Cli as clap::FromArgMatches>::from_arg_matches(&m))
    {
        Ok(c) => c,
        Err(e) => return clap_exit(e, personality, &args),
    };
    let res = match cli.command {
        Command::Info(a) => info::run(&a),
        Command::Map(a) => map::run(&a),
        Command::Measure(a) => measure::run(&a),
        Command::Convert(a) => convert::run(&a),
        Command::Resize(a) => resize::run(&a),
        Command::Rebase(a) => rebase::run(&a),
        Command::Dd(a) => dd::run(&a),
        Command::Bench(a) => bench::run(&a),
        Command::Bitmap(a) => bitmap::run(&a),
        Command::Check(a) => check::run(&a),
        Command::Snapshot(a) => snapshot::run(&a),
        Command::Compare(a) => compare::run(&a),
        Command::Create(a) => create::run(&a),
        Command::Serve(a) => serve::run(&a),
        Command::Man(a) => manual::run_man(&a),
        Command::Completions(a) => manual::run_completions(&a),
    };
    finish(res)
}

/// Which heading of `qnbd --help` a subcommand is listed under.
fn help_group(name: &str) -> &'static str {
    match name {
        "info" | "map" | "measure" | "check" | "compare" | "snapshot" | "bitmap" | "bench" => {
            "Inspect and check images (qemu-img)"
        }
        "create" | "convert" | "dd" | "rebase" | "resize" => "Create and change images (qemu-img)",
        "serve" => "Serve images over NBD (qemu-nbd)",
        "man" | "completions" => "Install",
        _ => "Other",
    }
}

/// `qnbd --help` with the subcommands under headings, each with its own one-line help.
fn grouped_help(mut cmd: clap::Command) -> clap::Command {
    cmd.build();
    let mut groups: Vec<(&'static str, Vec<(String, String)>)> = Vec::new();
    for sub in cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
    {
        let g = help_group(sub.get_name());
        let about = sub.get_about().map(|a| a.to_string()).unwrap_or_default();
        let entry = (sub.get_name().to_string(), about);
        match groups.iter_mut().find(|(h, _)| *h == g) {
            Some((_, v)) => v.push(entry),
            None => groups.push((g, vec![entry])),
        }
    }
    let width = groups
        .iter()
        .flat_map(|(_, v)| v.iter().map(|(n, _)| n.len()))
        .max()
        .unwrap_or(0);
    let mut t = String::from("{about-with-newline}\n{usage-heading} {usage}\n");
    for (heading, subs) in &groups {
        t.push_str(&format!("\n{heading}:\n"));
        for (name, about) in subs {
            t.push_str(&format!("  {name:width$}  {about}\n"));
        }
    }
    t.push_str(&format!(
        "  {:width$}  Print this message or the help of the given subcommand(s)\n",
        "help"
    ));
    t.push_str("\nRun 'qnbd COMMAND --help' for a command's options.\n\nOptions:\n{options}");
    cmd.help_template(t)
}

/// The exit code of a command's result; an error is printed first.
fn finish(res: Result<i32, Error>) -> i32 {
    match res {
        Ok(code) => code,
        Err(e) => {
            eprintln!("{}: {e}", crate::error::program());
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{grouped_help, Cli};
    use clap::CommandFactory;

    /// `qnbd --help` lists every subcommand under one of its headings.
    #[test]
    fn help_lists_every_subcommand_under_a_heading() {
        let mut cmd = grouped_help(<Cli as clap::CommandFactory>::command());
        let help = cmd.render_long_help().to_string();
        for sub in cmd.get_subcommands() {
            let line = format!("  {}  ", sub.get_name());
            assert!(
                help.lines().any(|l| l.starts_with(&line)),
                "{} missing:\n{help}",
                sub.get_name()
            );
        }
        assert!(!help.contains("\nOther:"), "{help}");
        assert!(
            help.contains("Serve images over NBD (qemu-nbd):\n  serve"),
            "{help}"
        );
    }

    /// `--help` explains every option and positional of every command.
    #[test]
    fn every_option_and_positional_has_help() {
        let cmd = Cli::command();
        let mut missing = Vec::new();
        for sub in cmd.get_subcommands() {
            for arg in sub.get_arguments() {
                if arg.is_hide_set() || matches!(arg.get_id().as_str(), "help" | "version") {
                    continue;
                }
                let text = arg
                    .get_help()
                    .or(arg.get_long_help())
                    .map(|h| h.to_string())
                    .unwrap_or_default();
                if text.trim().len() < 8 {
                    missing.push(format!("{} {}", sub.get_name(), arg.get_id()));
                }
            }
        }
        assert!(missing.is_empty(), "options without help: {missing:#?}");
    }
}
