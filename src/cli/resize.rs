//! `qnbd resize`: qemu-img resize (grow, or shrink with `--shrink`).

use crate::error::{Error, ErrorKind, Result};
use crate::open::Format;
use clap::Args;

#[derive(Debug, Args)]
#[command(args_override_self = true)]
pub struct ResizeArgs {
    /// Image format (qcow2, raw); probed when omitted.
    #[arg(short = 'f', long = "format")]
    pub format: Option<String>,
    /// Allow making the image smaller (data past the new end is lost).
    #[arg(long = "shrink")]
    pub shrink: bool,
    /// Preallocation of the new area: off (default), metadata, falloc, full (raw: off,
    /// falloc, full; qcow2: off).
    #[arg(long = "preallocation", value_name = "MODE")]
    pub preallocation: Option<String>,
    /// Quiet: print nothing on success.
    #[arg(short = 'q')]
    pub quiet: bool,
    #[arg(long = "image-opts", help = super::IMAGE_OPTS_HELP)]
    pub image_opts: bool,
    /// The image to resize.
    pub image: String,
    /// New size, or +SIZE / -SIZE relative to the current one (suffixes k, M, G, T).
    #[arg(allow_hyphen_values = true)]
    pub size: String,
}

pub fn run(a: &ResizeArgs) -> Result<i32> {
    let mut opts = super::open_options(a.format.as_deref())?;
    opts.writable = true;
    opts.locking = crate::open::Locking::Resize;
    opts.no_backing = true;
    let name = super::image_name(&a.image, a.image_opts, &mut opts)?;
    let img = super::open_named(&name, &opts)?;
    let layer = &img.layers[0];
    let cur = img.chain.size();
    let (rel, num) = match a.size.as_bytes().first() {
        Some(b'+') => (1i8, &a.size[1..]),
        Some(b'-') => (-1, &a.size[1..]),
        _ => (0, a.size.as_str()),
    };
    let n = crate::units::parse_size(num).ok_or_else(|| {
        Error::new(
            ErrorKind::InvalidArgument,
            "Invalid image size specified. You may use k, M, G, T, P or E suffixes for\nkilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.",
        )
    })?;
    let new = match rel {
        1 => cur.checked_add(n),
        -1 => cur.checked_sub(n),
        _ => Some(n),
    }
    .ok_or_else(|| {
        Error::new(
            ErrorKind::InvalidArgument,
            "New image size must be positive",
        )
    })?;
    use crate::block::create_raw::Preallocation;
    let prealloc = match a.preallocation.as_deref() {
        None => Preallocation::Off,
        Some(m) => Preallocation::parse(m).ok_or_else(|| {
            Error::new(
                ErrorKind::InvalidArgument,
                format!("Invalid preallocation mode '{m}'"),
            )
        })?,
    };
    if new <= cur && prealloc != Preallocation::Off {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            "Preallocation can only be used for growing images",
        ));
    }
    if new < cur && !a.shrink {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            "Use the --shrink option to perform a shrink operation.",
        ));
    }
    match layer.format {
        Format::Qcow2 => {
            let q = layer
                .qcow2
                .as_ref()
                .ok_or_else(|| Error::new(ErrorKind::InvalidArgument, "not a qcow2 image"))?;
            if prealloc != Preallocation::Off {
                return Err(Error::unsupported(format!(
                    "Growing a qcow2 image with preallocation={} is not supported by this version (only off)",
                    prealloc.name()
                )));
            }
            q.resize(new)?;
        }
        Format::Raw => {
            if prealloc == Preallocation::Metadata {
                return Err(Error::unsupported(
                    "Unsupported preallocation mode: metadata",
                ));
            }
            let st = &layer.storage;
            st.set_len(new)
                .map_err(|e| Error::io("Could not resize the image", e))?;
            if new > cur {
                // as file-posix grows a file: the first block of an empty one written, `falloc`
                // reserves the new range, `full` writes zeros over it
                let zeros = |from: u64, to: u64| -> Result<()> {
                    let buf = vec![0u8; 1 << 20];
                    let mut off = from;
                    while off < to {
                        let n = (to - off).min(buf.len() as u64) as usize;
                        st.write_at(&buf[..n], off)
                            .map_err(|e| Error::io("Could not write zeros", e))?;
                        off += n as u64;
                    }
                    Ok(())
                };
                match prealloc {
                    Preallocation::Off | Preallocation::Metadata => {
                        if cur == 0 {
                            zeros(0, if new < 4096 { 512 } else { 4096 }.min(new))?;
                        }
                    }
                    Preallocation::Falloc => {
                        // the descriptor the image was opened (and locked) with, not the
                        // name again: a json:/--image-opts name is not a path
                        let fd = st.raw_fd().ok_or_else(|| {
                            Error::unsupported("preallocation=falloc needs a host file")
                        })?;
                        crate::block::create_raw::fallocate_fd(fd, cur, new - cur)?;
                        if cur == 0 {
                            zeros(0, if new < 4096 { 512 } else { 4096 }.min(new))?;
                        }
                    }
                    Preallocation::Full => zeros(cur, new)?,
                }
            }
            layer
                .storage
                .sync()
                .map_err(|e| Error::io("Could not flush the image", e))?;
        }
    }
    if !a.quiet {
        println!("Image resized.");
    }
    Ok(0)
}
