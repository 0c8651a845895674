//! The one error type of the library.
//!
//! Every failure carries an [`ErrorKind`] (what class of problem: callers branch on it, and it
//! maps onto an NBD errno; every command that fails exits 1, as qemu-img does), a human message in the style of qemu-img (what failed, where, why) and, when there is
//! one, the underlying `io::Error`. Nothing from a disk image or the wire may panic: it becomes one
//! of these.

use std::fmt;
use std::io;

/// Class of failure; decides NBD errnos and what callers do about an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The host storage failed (EIO, ENOSPC, ...).
    Io,
    /// The image is not what its header claims, or not an image we can parse.
    InvalidImage,
    /// A well-formed image uses a feature this build does not implement (encryption, ...).
    Unsupported,
    /// Metadata that was parsed is inconsistent (overlap, unaligned entry, beyond EOF).
    Corrupt,
    /// A request lies outside the image.
    OutOfRange,
    /// The open policy or the access mode forbids the operation.
    Denied,
    /// A caller-supplied argument is invalid.
    InvalidArgument,
    /// Another user holds the file in a way that conflicts (an image lock).
    Busy,
    /// A named object (a bitmap, a snapshot) does not exist.
    NotFound,
    /// A persistent structure exists but cannot be trusted (a bitmap left `in-use`).
    Inconsistent,
}

/// Library error: kind + message + optional source.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    msg: String,
    source: Option<io::Error>,
    /// Set by [`Error::open_failed`] and cleared by [`Error::context`]: the file whose open
    /// failed, while the error is exactly that failure.
    failed_open: Option<String>,
}

impl Error {
    pub fn new(kind: ErrorKind, msg: impl Into<String>) -> Self {
        Error {
            kind,
            msg: msg.into(),
            source: None,
            failed_open: None,
        }
    }

    /// An I/O failure during `what`.
    pub fn io(what: impl Into<String>, source: io::Error) -> Self {
        Error {
            kind: ErrorKind::Io,
            msg: what.into(),
            source: Some(source),
            failed_open: None,
        }
    }

    /// The host could not open the file `path` (`Could not open 'PATH'`, with the OS error).
    pub fn open_failed(path: &str, source: io::Error) -> Self {
        Error {
            failed_open: Some(path.to_string()),
            ..Self::io(format!("Could not open '{path}'"), source)
        }
    }

    /// The file whose open failed, when this error is that failure and nothing more (no
    /// context added since): the command line then words it as qemu-img does.
    pub fn failed_open(&self) -> Option<&str> {
        self.failed_open.as_deref()
    }

    pub fn invalid(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidImage, msg)
    }

    pub fn unsupported(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unsupported, msg)
    }

    pub fn corrupt(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::Corrupt, msg)
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    pub fn message(&self) -> &str {
        &self.msg
    }

    pub fn io_source(&self) -> Option<&io::Error> {
        self.source.as_ref()
    }

    /// Prefix the message with context (e.g. the file name).
    pub fn context(mut self, ctx: impl fmt::Display) -> Self {
        self.msg = format!("{ctx}: {}", self.msg);
        self.failed_open = None;
        self
    }

    /// The errno an NBD reply should carry for this error.
    pub fn errno(&self) -> i32 {
        match self.kind {
            ErrorKind::Io => self
                .source
                .as_ref()
                .and_then(|e| e.raw_os_error())
                .unwrap_or(libc::EIO),
            ErrorKind::OutOfRange | ErrorKind::InvalidArgument | ErrorKind::NotFound => {
                libc::EINVAL
            }
            ErrorKind::Denied | ErrorKind::Inconsistent => libc::EPERM,
            ErrorKind::Busy => libc::EAGAIN,
            ErrorKind::Unsupported => libc::ENOTSUP,
            ErrorKind::InvalidImage | ErrorKind::Corrupt => libc::EIO,
        }
    }
}

/// strerror's text of an I/O error, as QEMU prints it (without Rust's " (os error N)").
pub fn strerror_of(e: &io::Error) -> String {
    let text = e.to_string();
    match (e.raw_os_error(), text.rfind(" (os error ")) {
        (Some(_), Some(i)) => text[..i].to_string(),
        _ => text,
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.msg)?;
        if let Some(s) = &self.source {
            write!(f, ": {}", strerror_of(s))?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_ref().map(|e| e as _)
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

static PROGRAM: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();

/// Name the process reports as (`qnbd`, or `qemu-img` / `qemu-nbd` when invoked by those
/// names); set once, at startup.
pub fn set_program(name: &'static str) {
    let _ = PROGRAM.set(name);
}

/// The prefix of every message on stderr: the program name (see [`set_program`]).
pub fn program() -> &'static str {
    PROGRAM.get().copied().unwrap_or("qnbd")
}

/// A line that tells a person what to do about a refusal (`\nhint: ...`), appended to QEMU's
/// wording only when running as `qnbd`: invoked as `qemu-img` or `qemu-nbd`, messages stay
/// QEMU's, line for line, for the tools that parse them.
pub fn hint(what_to_do: &str) -> String {
    if program() == "qnbd" {
        format!("\nhint: {what_to_do}")
    } else {
        String::new()
    }
}
