//! `qnbd dd`: qemu-img dd — copy `count` blocks of `bs` bytes of an image's guest contents,
//! after skipping `skip` blocks, into a new image, with qemu-img's operands, messages and exit
//! codes.
//!
//! qemu-img's arithmetic is kept, quirks included: `count` limits the input *before* `skip` is
//! applied (`count=20 skip=10` copies ten blocks), a `skip` past the end of the input reports
//! `cannot skip to specified offset` and still creates an empty output (exit 0), and the new
//! image's size is rounded up to whole 512-byte sectors. Every block is written, zeros
//! included, so a qcow2 output is fully allocated, as qemu-img leaves it.

use super::{open_named, open_options};
use crate::error::{Error, ErrorKind, Result};
use crate::open::{open_image, Format, OpenOptions};
use clap::Args;

#[derive(Debug, Args)]
#[command(args_override_self = true)]
pub struct DdArgs {
    /// Format of the input (qcow2, raw); probed when omitted.
    #[arg(short = 'f', long = "format")]
    pub format: Option<String>,
    /// Format of the output (raw or qcow2; default raw).
    #[arg(short = 'O', long = "output-format", default_value = "raw")]
    pub output_format: String,
    /// Share the input with writers: read-only, no lock denied to others (qemu-img -U).
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    #[arg(long = "image-opts", help = super::IMAGE_OPTS_HELP)]
    pub image_opts: bool,
    #[arg(long = "allow-backing", value_name = "PATH", help = super::ALLOW_BACKING_HELP)]
    pub allow_backing: Vec<String>,
    /// Operands: bs=BLOCK_SIZE (default 512, suffixes k, M, G...), count=BLOCKS, skip=BLOCKS,
    /// if=INPUT, of=OUTPUT.
    #[arg(value_name = "OPERAND")]
    pub operands: Vec<String>,
}

fn arg_err(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidArgument, msg)
}

/// The operands as qemu-img's `img_dd` reads them (a later operand replaces an earlier one).
#[derive(Debug, PartialEq, Eq)]
struct Operands {
    bs: u64,
    count: Option<u64>,
    skip: Option<u64>,
    input: Option<String>,
    output: Option<String>,
}

/// `qemu_strtoi64` on a block count: decimal (or `0x` / `0` prefixed), no suffix, no sign.
fn blocks(what: &str, v: &str) -> Result<u64> {
    let range = || {
        arg_err(format!(
            "Invalid {what} specified. Must be between 0 and 9223372036854775807."
        ))
    };
    let (digits, radix) = if let Some(h) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        (h, 16)
    } else if v.len() > 1 && v.starts_with('0') {
        (&v[1..], 8)
    } else {
        (v, 10)
    };
    if let Some(neg) = v.strip_prefix('-') {
        if !neg.is_empty() && neg.bytes().all(|b| b.is_ascii_digit()) {
            return Err(range());
        }
    }
    let n = u64::from_str_radix(digits, radix)
        .ok()
        .filter(|_| !digits.is_empty() && !digits.starts_with('+'))
        .ok_or_else(|| arg_err(format!("Invalid {what} specified: '{v}'.")))?;
    if n > i64::MAX as u64 {
        return Err(range());
    }
    Ok(n)
}

fn parse_operands(ops: &[String]) -> Result<Operands> {
    let mut o = Operands {
        bs: 512,
        count: None,
        skip: None,
        input: None,
        output: None,
    };
    for op in ops {
        let Some((k, v)) = op.split_once('=') else {
            return Err(arg_err(format!("unrecognized operand {op}")));
        };
        match k {
            "bs" => {
                let range = || arg_err("Invalid bs specified. Must be between 1 and 2147483647.");
                if v.trim_start().starts_with('-') {
                    return Err(range());
                }
                let n = crate::units::parse_size(v)
                    .ok_or_else(|| arg_err(format!("Invalid bs specified: '{v}'.")))?;
                if n == 0 || n > i32::MAX as u64 {
                    return Err(range());
                }
                o.bs = n;
            }
            "count" => o.count = Some(blocks("count", v)?),
            "skip" => o.skip = Some(blocks("skip", v)?),
            "if" => o.input = Some(v.to_string()),
            "of" => o.output = Some(v.to_string()),
            _ => return Err(arg_err(format!("unrecognized operand {k}"))),
        }
    }
    Ok(o)
}

pub fn run(a: &DdArgs) -> Result<i32> {
    let ops = parse_operands(&a.operands)?;
    let (Some(input), Some(output)) = (ops.input.clone(), ops.output.clone()) else {
        return Err(arg_err("Must specify both input and output files"));
    };
    let (input, output) = (
        (!input.is_empty()).then_some(input),
        (!output.is_empty()).then_some(output),
    );
    let (Some(input), Some(output)) = (input, output) else {
        return Err(arg_err("Must specify both input and output files"));
    };
    let out_fmt = match a.output_format.as_str() {
        "raw" => Format::Raw,
        "qcow2" => Format::Qcow2,
        _ => return Err(Error::unsupported("Unknown file format")),
    };
    let mut opts = OpenOptions {
        policy: super::open_policy(&a.allow_backing)?,
        locking: super::locking(
            &input,
            a.force_share,
            false,
            crate::open::Locking::ConvertSource,
        )?,
        ..open_options(a.format.as_deref())?
    };
    let name = super::image_name(&input, a.image_opts, &mut opts)?;
    let img = open_named(&name, &opts)?;
    let mut size = img.chain.size();
    if let Some(count) = ops.count {
        if let Some(n) = count.checked_mul(ops.bs).filter(|&n| n <= i64::MAX as u64) {
            size = size.min(n);
        }
    }
    let mut in_pos = 0;
    if let Some(skip) = ops.skip {
        match skip.checked_mul(ops.bs).filter(|&n| n <= size) {
            Some(n) => in_pos = n,
            None => {
                // qemu-img carries on with an empty output, as dd(1) does
                eprintln!(
                    "{}: {input}: cannot skip to specified offset",
                    crate::error::program()
                );
                in_pos = size;
            }
        }
    }
    let out_size = (size - in_pos).div_ceil(512) * 512;
    let created = |e: Error| e.context(format!("{output}: error while creating output image"));
    match out_fmt {
        Format::Raw => {
            let file = crate::block::create_raw::create_empty(&output).map_err(created)?;
            crate::block::create_raw::size_created(&file, &output, out_size).map_err(created)?;
        }
        Format::Qcow2 => {
            let copts = crate::qcow2::create::CreateOptions {
                size: out_size,
                ..Default::default()
            };
            crate::qcow2::create::create_qcow2(&output, &copts).map_err(created)?;
        }
    }
    let dopts = OpenOptions {
        format: Some(out_fmt),
        writable: true,
        engine: opts.engine,
        policy: crate::open::OpenPolicy::trusted(),
        ..OpenOptions::default()
    };
    let out = open_image(&output, &dopts)?;
    // copied in runs of whole blocks (at least 1 MiB): the same bytes land where qemu-img's
    // block-by-block loop puts them
    let run = ops.bs * (1u64 << 20).div_ceil(ops.bs);
    let mut buf = vec![0u8; run.min(size - in_pos).max(1) as usize];
    let mut out_pos = 0u64;
    while in_pos < size {
        let n = (size - in_pos).min(run) as usize;
        img.chain
            .read(in_pos, &mut buf[..n])
            .map_err(|e| e.context("error while reading from input image file"))?;
        out.chain
            .write(out_pos, &buf[..n], false)
            .map_err(|e| e.context("error while writing to output image file"))?;
        in_pos += n as u64;
        out_pos += n as u64;
    }
    out.chain.flush()?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ops(v: &[&str]) -> Result<Operands> {
        parse_operands(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn operands_parse_as_qemu_img_parses_them() {
        let o = ops(&["bs=1.5k", "count=0x10", "skip=010", "if=a", "of=b", "if=c"]).unwrap();
        assert_eq!(
            o,
            Operands {
                bs: 1536,
                count: Some(16),
                skip: Some(8),
                input: Some("c".into()),
                output: Some("b".into()),
            }
        );
        let msg = |v: &[&str]| ops(v).unwrap_err().message().to_string();
        assert_eq!(
            msg(&["bs=0"]),
            "Invalid bs specified. Must be between 1 and 2147483647."
        );
        assert_eq!(msg(&["bs=abc"]), "Invalid bs specified: 'abc'.");
        assert_eq!(msg(&["count=10k"]), "Invalid count specified: '10k'.");
        assert_eq!(
            msg(&["skip=-1"]),
            "Invalid skip specified. Must be between 0 and 9223372036854775807."
        );
        assert_eq!(msg(&["conv=notrunc"]), "unrecognized operand conv");
        assert_eq!(msg(&["junk"]), "unrecognized operand junk");
    }
}
