//! Compressed clusters: raw deflate (no zlib header) and zstd frames. Output is bounded by the
//! cluster size whatever the input claims, so a decompression bomb stops at one cluster.

use super::spec::header::CompressionType;
use crate::error::{Error, Result};

/// Decompress `input` into exactly `out.len()` bytes (one cluster); trailing input is ignored.
pub fn decompress(kind: CompressionType, input: &[u8], out: &mut [u8]) -> Result<()> {
    match kind {
        CompressionType::Zlib => inflate(input, out),
        CompressionType::Zstd => unzstd(input, out),
    }
}

fn inflate(input: &[u8], out: &mut [u8]) -> Result<()> {
    use flate2::{Decompress, FlushDecompress, Status};
    let mut d = Decompress::new(false);
    loop {
        let before_out = d.total_out();
        let before_in = d.total_in();
        let inp = &input[(d.total_in() as usize).min(input.len())..];
        let out_len = out.len();
        let o = &mut out[(d.total_out() as usize).min(out_len)..];
        let st = d
            .decompress(inp, o, FlushDecompress::Finish)
            .map_err(|e| Error::corrupt(format!("could not decompress cluster (deflate): {e}")))?;
        if d.total_out() as usize >= out.len() {
            return Ok(());
        }
        match st {
            Status::StreamEnd => break,
            Status::Ok | Status::BufError => {
                if d.total_out() == before_out && d.total_in() == before_in {
                    break;
                }
            }
        }
    }
    Err(Error::corrupt(
        "could not decompress cluster (deflate): stream ended before one cluster of output",
    ))
}

fn unzstd(input: &[u8], out: &mut [u8]) -> Result<()> {
    use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};
    let err =
        |e: std::io::Error| Error::corrupt(format!("could not decompress cluster (zstd): {e}"));
    let mut dec = Decoder::new().map_err(err)?;
    let mut inb = InBuffer::around(input);
    let mut outb = OutBuffer::around(out);
    loop {
        let before_in = inb.pos();
        let before_out = outb.pos();
        let hint = dec.run(&mut inb, &mut outb).map_err(err)?;
        if outb.pos() == outb.capacity() {
            return Ok(());
        }
        if hint == 0 {
            // end of a frame; QEMU accepts several frames back to back
            if inb.pos() >= input.len() {
                break;
            }
            dec.reinit().map_err(err)?;
            continue;
        }
        if inb.pos() == before_in && outb.pos() == before_out {
            break;
        }
    }
    Err(Error::corrupt(
        "could not decompress cluster (zstd): stream ended before one cluster of output",
    ))
}

/// Compress one cluster; `None` when the result would not be smaller than the input.
pub fn compress(kind: CompressionType, input: &[u8]) -> Result<Option<Vec<u8>>> {
    let out = match kind {
        CompressionType::Zlib => {
            use flate2::{Compress, Compression, FlushCompress, Status};
            // raw deflate (no zlib header), as QEMU writes it
            let mut c = Compress::new(Compression::default(), false);
            let mut out = vec![0u8; input.len()];
            match c.compress(input, &mut out, FlushCompress::Finish) {
                Ok(Status::StreamEnd) => {
                    out.truncate(c.total_out() as usize);
                    out
                }
                _ => return Ok(None),
            }
        }
        CompressionType::Zstd => {
            zstd::bulk::compress(input, 0).map_err(|e| Error::io("zstd compression", e))?
        }
    };
    Ok((out.len() < input.len()).then_some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_both_kinds() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i / 100) as u8).collect();
        for kind in [CompressionType::Zlib, CompressionType::Zstd] {
            let c = compress(kind, &data).unwrap().unwrap();
            let mut out = vec![0u8; data.len()];
            // trailing garbage after the stream is ignored
            let mut padded = c.clone();
            padded.extend_from_slice(&[0xff; 300]);
            decompress(kind, &padded, &mut out).unwrap();
            assert_eq!(out, data);
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut out = vec![0u8; 4096];
        assert!(decompress(CompressionType::Zlib, &[0xff; 100], &mut out).is_err());
        assert!(decompress(CompressionType::Zstd, &[0xff; 100], &mut out).is_err());
        assert!(decompress(CompressionType::Zlib, &[], &mut out).is_err());
    }

    #[test]
    fn bomb_stops_at_one_cluster() {
        let big = vec![0u8; 1 << 20];
        let c = compress(CompressionType::Zlib, &big).unwrap().unwrap();
        let mut out = vec![1u8; 4096];
        decompress(CompressionType::Zlib, &c, &mut out).unwrap();
        assert!(out.iter().all(|&b| b == 0));
    }
}
