//! Transmission phase, sans-I/O: decode and validate requests, encode replies.
//!
//! [`decode_header`] looks at the bytes received so far and either asks for more, hands back a
//! request header plus what to do with its payload, or declares the stream broken (bad magic,
//! a payload too large to be worth reading). [`validate`] turns a header (and its payload) into
//! a typed [`Command`] or an NBD error for the client; nothing after it sees an unchecked range
//! or flag. The `encode_*` functions append reply bytes for the negotiated [`HeaderMode`].
//!
//! Choices where the specification leaves room (all tested):
//! * zero-length READ, TRIM, CACHE and WRITE_ZEROES succeed; zero-length BLOCK_STATUS is EINVAL
//!   (as qemu-nbd);
//! * FLUSH ignores nonzero offset/length (as qemu-nbd);
//! * writes past the end are ENOSPC, reads/trims/block-status past the end EINVAL; write-type
//!   commands on a read-only export are EPERM before any range check;
//! * READ longer than the maximum payload (32 MiB) is EINVAL and the stream stays in sync;
//! * a compact WRITE whose payload exceeds the maximum is drained (up to twice the maximum,
//!   never buffered) and answered EINVAL; larger ones, or an extended payload beyond the
//!   maximum, end the connection without allocating anything.

use super::extents::Extent;
use super::wire::*;
use zerocopy::FromBytes;

/// Which headers the session negotiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum HeaderMode {
    /// Compact requests, simple replies only.
    Simple,
    /// Compact requests, structured replies (`NBD_OPT_STRUCTURED_REPLY`).
    Structured,
    /// Extended requests and replies (`NBD_OPT_EXTENDED_HEADERS`).
    Extended,
}

/// Largest payload we accept or send (advertised as the maximum block size).
pub const MAX_PAYLOAD: u32 = 32 << 20;

/// Advertised block sizes: minimum, preferred, maximum (qemu-nbd's values).
pub const BLOCK_SIZES: (u32, u32, u32) = (1, 4096, MAX_PAYLOAD);

/// A request header as it arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawRequest {
    pub flags: u16,
    pub cmd: u16,
    pub cookie: u64,
    pub offset: u64,
    /// Effect length, or payload length when the request carries a payload.
    pub length: u64,
}

/// What follows a header on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payload {
    None,
    /// Read this many bytes and hand them to [`validate`].
    Take(usize),
    /// Read and discard this many bytes, then fail the request with EINVAL.
    Drain(u64),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    /// At least this many bytes are needed in total.
    NeedMore(usize),
    Request {
        req: RawRequest,
        header_len: usize,
        payload: Payload,
    },
    /// The stream cannot be trusted any more: hard disconnect.
    Fatal(String),
}

/// Decode the request header at the start of `buf`.
pub fn decode_header(mode: HeaderMode, buf: &[u8]) -> Decoded {
    let extended = mode == HeaderMode::Extended;
    let need = if extended {
        EXTENDED_REQUEST_HEADER_LEN
    } else {
        REQUEST_HEADER_LEN
    };
    if buf.len() < need {
        return Decoded::NeedMore(need);
    }
    let (req, payload) = if extended {
        let Ok((h, _)) = ExtendedRequestHeader::read_from_prefix(buf) else {
            return Decoded::NeedMore(need);
        };
        if h.magic.get() != NBD_EXTENDED_REQUEST_MAGIC {
            return Decoded::Fatal(format!("invalid request magic {:#x}", h.magic.get()));
        }
        let req = RawRequest {
            flags: h.flags.get(),
            cmd: h.cmd_type.get(),
            cookie: h.cookie.get(),
            offset: h.offset.get(),
            length: h.length.get(),
        };
        // a WRITE always carries `length` bytes, with or without NBD_CMD_FLAG_PAYLOAD_LEN
        let payload = if req.flags & NBD_CMD_FLAG_PAYLOAD_LEN == 0 && req.cmd != NBD_CMD_WRITE {
            Payload::None
        } else if req.length > u64::from(MAX_PAYLOAD) {
            return Decoded::Fatal(format!(
                "payload length {} is larger than max len ({MAX_PAYLOAD})",
                req.length
            ));
        } else {
            Payload::Take(req.length as usize)
        };
        (req, payload)
    } else {
        let Ok((h, _)) = RequestHeader::read_from_prefix(buf) else {
            return Decoded::NeedMore(need);
        };
        if h.magic.get() != NBD_REQUEST_MAGIC {
            return Decoded::Fatal(format!("invalid request magic {:#x}", h.magic.get()));
        }
        let req = RawRequest {
            flags: h.flags.get(),
            cmd: h.cmd_type.get(),
            cookie: h.cookie.get(),
            offset: h.offset.get(),
            length: u64::from(h.length.get()),
        };
        let payload = if req.cmd != NBD_CMD_WRITE {
            Payload::None
        } else if req.length <= u64::from(MAX_PAYLOAD) {
            Payload::Take(req.length as usize)
        } else if req.length <= 2 * u64::from(MAX_PAYLOAD) {
            Payload::Drain(req.length)
        } else {
            return Decoded::Fatal(format!(
                "write length {} is larger than max len ({MAX_PAYLOAD})",
                req.length
            ));
        };
        (req, payload)
    };
    Decoded::Request {
        req,
        header_len: need,
        payload,
    }
}

/// A validated command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Read {
        offset: u64,
        length: u32,
        df: bool,
    },
    Write {
        offset: u64,
        data: Vec<u8>,
        fua: bool,
    },
    Disc,
    Flush,
    Trim {
        offset: u64,
        length: u64,
        fua: bool,
    },
    Cache {
        offset: u64,
        length: u64,
    },
    WriteZeroes {
        offset: u64,
        length: u64,
        no_hole: bool,
        fast: bool,
        fua: bool,
    },
    BlockStatus {
        offset: u64,
        length: u64,
        req_one: bool,
        /// Context ids the client restricted the reply to (`NBD_CMD_FLAG_PAYLOAD_LEN`).
        ids: Option<Vec<u32>>,
    },
}

/// What validation needs to know about the session.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub size: u64,
    pub mode: HeaderMode,
    /// Transmission flags sent to the client.
    pub flags: u16,
    /// Number of selected metadata contexts.
    pub contexts: usize,
}

/// A request refused with an NBD error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub errno: u32,
    pub msg: String,
}

fn reject(errno: u32, msg: impl Into<String>) -> Rejection {
    Rejection {
        errno,
        msg: msg.into(),
    }
}

/// Validate a request; `payload` is what [`Payload::Take`] asked for (`None` otherwise).
pub fn validate(
    req: &RawRequest,
    payload: Option<Vec<u8>>,
    drained: bool,
    lim: &Limits,
) -> Result<Command, Rejection> {
    let read_only = lim.flags & NBD_FLAG_READ_ONLY != 0;
    let has_payload = lim.mode == HeaderMode::Extended && req.flags & NBD_CMD_FLAG_PAYLOAD_LEN != 0;
    let mut allowed = NBD_CMD_FLAG_FUA;
    match req.cmd {
        NBD_CMD_READ => allowed |= NBD_CMD_FLAG_DF,
        NBD_CMD_WRITE | NBD_CMD_BLOCK_STATUS if lim.mode == HeaderMode::Extended => {
            allowed |= NBD_CMD_FLAG_PAYLOAD_LEN
        }
        NBD_CMD_WRITE_ZEROES => allowed |= NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO,
        _ => {}
    }
    if req.cmd == NBD_CMD_BLOCK_STATUS {
        allowed |= NBD_CMD_FLAG_REQ_ONE;
    }
    let known = matches!(
        req.cmd,
        NBD_CMD_READ
            | NBD_CMD_WRITE
            | NBD_CMD_DISC
            | NBD_CMD_FLUSH
            | NBD_CMD_TRIM
            | NBD_CMD_CACHE
            | NBD_CMD_WRITE_ZEROES
            | NBD_CMD_BLOCK_STATUS
    );
    if !known {
        return Err(reject(
            NBD_EINVAL,
            format!("unknown command type {}", req.cmd),
        ));
    }
    if drained {
        return Err(reject(
            NBD_EINVAL,
            "payload larger than the maximum block size",
        ));
    }
    if req.flags & !allowed != 0 {
        return Err(reject(
            NBD_EINVAL,
            format!(
                "unsupported flags {:#x} for command {}",
                req.flags & !allowed,
                req.cmd
            ),
        ));
    }
    if req.flags & NBD_CMD_FLAG_DF != 0 && lim.flags & NBD_FLAG_SEND_DF == 0 {
        return Err(reject(NBD_EINVAL, "DF flag needs structured replies"));
    }
    if req.flags & NBD_CMD_FLAG_FAST_ZERO != 0 && lim.flags & NBD_FLAG_SEND_FAST_ZERO == 0 {
        return Err(reject(NBD_EINVAL, "fast zero was not advertised"));
    }
    // (an extended WRITE carries `length` bytes whether or not NBD_CMD_FLAG_PAYLOAD_LEN is set;
    // QEMU's client does not set it)
    let fua = req.flags & NBD_CMD_FLAG_FUA != 0;
    let is_write = matches!(req.cmd, NBD_CMD_WRITE | NBD_CMD_TRIM | NBD_CMD_WRITE_ZEROES);
    if is_write && read_only {
        return Err(reject(NBD_EPERM, "export is read-only"));
    }

    // BLOCK_STATUS payload form: 64-bit effect length, then context ids.
    let mut length = req.length;
    let mut ids = None;
    let mut payload = payload;
    if req.cmd == NBD_CMD_BLOCK_STATUS && has_payload {
        let p = payload.take().unwrap_or_default();
        if lim.flags & NBD_FLAG_BLOCK_STATUS_PAYLOAD == 0 {
            return Err(reject(
                NBD_EINVAL,
                "block status payload was not advertised",
            ));
        }
        if p.len() < 8 || !(p.len() - 8).is_multiple_of(4) {
            return Err(reject(NBD_EINVAL, "malformed block status payload"));
        }
        let mut eff = [0u8; 8];
        eff.copy_from_slice(&p[..8]);
        length = u64::from_be_bytes(eff);
        let list: Vec<u32> = p[8..]
            .chunks_exact(4)
            .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        ids = Some(list);
    }

    let end = req.offset.checked_add(length);
    let in_range = matches!(end, Some(e) if e <= lim.size);
    let range_check = |errno: u32| -> Result<(), Rejection> {
        if in_range {
            Ok(())
        } else {
            Err(reject(
                errno,
                format!(
                    "operation past EOF; From: {}, Len: {}, Size: {}",
                    req.offset, length, lim.size
                ),
            ))
        }
    };
    match req.cmd {
        NBD_CMD_READ => {
            if length > u64::from(MAX_PAYLOAD) {
                return Err(reject(
                    NBD_EINVAL,
                    format!("len ({length}) is larger than max len ({MAX_PAYLOAD})"),
                ));
            }
            range_check(NBD_EINVAL)?;
            Ok(Command::Read {
                offset: req.offset,
                length: length as u32,
                df: req.flags & NBD_CMD_FLAG_DF != 0,
            })
        }
        NBD_CMD_WRITE => {
            range_check(NBD_ENOSPC)?;
            Ok(Command::Write {
                offset: req.offset,
                data: payload.unwrap_or_default(),
                fua,
            })
        }
        NBD_CMD_DISC => Ok(Command::Disc),
        NBD_CMD_FLUSH => Ok(Command::Flush),
        NBD_CMD_TRIM => {
            range_check(NBD_EINVAL)?;
            Ok(Command::Trim {
                offset: req.offset,
                length,
                fua,
            })
        }
        NBD_CMD_CACHE => {
            range_check(NBD_EINVAL)?;
            Ok(Command::Cache {
                offset: req.offset,
                length,
            })
        }
        NBD_CMD_WRITE_ZEROES => {
            range_check(NBD_ENOSPC)?;
            Ok(Command::WriteZeroes {
                offset: req.offset,
                length,
                no_hole: req.flags & NBD_CMD_FLAG_NO_HOLE != 0,
                fast: req.flags & NBD_CMD_FLAG_FAST_ZERO != 0,
                fua,
            })
        }
        _ => {
            // NBD_CMD_BLOCK_STATUS
            if lim.contexts == 0 {
                return Err(reject(NBD_EINVAL, "no metadata context was negotiated"));
            }
            if length == 0 {
                return Err(reject(NBD_EINVAL, "need non-zero length"));
            }
            range_check(NBD_EINVAL)?;
            Ok(Command::BlockStatus {
                offset: req.offset,
                length,
                req_one: req.flags & NBD_CMD_FLAG_REQ_ONE != 0,
                ids,
            })
        }
    }
}

// ---- Reply encoding ----

/// Append a simple reply header.
pub fn encode_simple(out: &mut Vec<u8>, cookie: u64, error: u32) {
    out.extend_from_slice(&NBD_SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
}

/// Append a structured or extended chunk header for a payload of `len` bytes (the payload is
/// appended by the caller). `req_offset` is the request's offset (extended headers echo it).
pub fn encode_chunk_header(
    out: &mut Vec<u8>,
    mode: HeaderMode,
    cookie: u64,
    req_offset: u64,
    flags: u16,
    reply_type: u16,
    len: usize,
) {
    if mode == HeaderMode::Extended {
        out.extend_from_slice(&NBD_EXTENDED_REPLY_MAGIC.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
        out.extend_from_slice(&reply_type.to_be_bytes());
        out.extend_from_slice(&cookie.to_be_bytes());
        out.extend_from_slice(&req_offset.to_be_bytes());
        out.extend_from_slice(&(len as u64).to_be_bytes());
    } else {
        out.extend_from_slice(&NBD_STRUCTURED_REPLY_MAGIC.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
        out.extend_from_slice(&reply_type.to_be_bytes());
        out.extend_from_slice(&cookie.to_be_bytes());
        out.extend_from_slice(&(len as u32).to_be_bytes());
    }
}

/// Append the reply of a successful command without payload.
pub fn encode_ok(out: &mut Vec<u8>, mode: HeaderMode, cookie: u64, req_offset: u64) {
    match mode {
        HeaderMode::Extended => encode_chunk_header(
            out,
            mode,
            cookie,
            req_offset,
            NBD_REPLY_FLAG_DONE,
            NBD_REPLY_TYPE_NONE,
            0,
        ),
        _ => encode_simple(out, cookie, 0),
    }
}

/// Append an error reply: a simple reply without structured replies, else a final
/// `NBD_REPLY_TYPE_ERROR` chunk carrying `msg` (cut to the string limit).
pub fn encode_error(
    out: &mut Vec<u8>,
    mode: HeaderMode,
    cookie: u64,
    req_offset: u64,
    errno: u32,
    msg: &str,
) {
    if mode == HeaderMode::Simple {
        encode_simple(out, cookie, errno);
        return;
    }
    let mut m = msg.as_bytes();
    if m.len() > NBD_MAX_STRING {
        let mut cut = NBD_MAX_STRING;
        while !msg.is_char_boundary(cut) {
            cut -= 1;
        }
        m = &m[..cut];
    }
    encode_chunk_header(
        out,
        mode,
        cookie,
        req_offset,
        NBD_REPLY_FLAG_DONE,
        NBD_REPLY_TYPE_ERROR,
        6 + m.len(),
    );
    out.extend_from_slice(&errno.to_be_bytes());
    out.extend_from_slice(&(m.len() as u16).to_be_bytes());
    out.extend_from_slice(m);
}

/// Append an `NBD_REPLY_TYPE_OFFSET_HOLE` chunk.
pub fn encode_hole(
    out: &mut Vec<u8>,
    mode: HeaderMode,
    cookie: u64,
    req_offset: u64,
    flags: u16,
    offset: u64,
    len: u32,
) {
    encode_chunk_header(
        out,
        mode,
        cookie,
        req_offset,
        flags,
        NBD_REPLY_TYPE_OFFSET_HOLE,
        12,
    );
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

/// Append the header of an `NBD_REPLY_TYPE_OFFSET_DATA` chunk for `len` data bytes (the caller
/// appends exactly `len` bytes).
pub fn encode_data_header(
    out: &mut Vec<u8>,
    mode: HeaderMode,
    cookie: u64,
    req_offset: u64,
    flags: u16,
    offset: u64,
    len: usize,
) {
    encode_chunk_header(
        out,
        mode,
        cookie,
        req_offset,
        flags,
        NBD_REPLY_TYPE_OFFSET_DATA,
        8 + len,
    );
    out.extend_from_slice(&offset.to_be_bytes());
}

/// Append a block-status chunk for one context: `NBD_REPLY_TYPE_BLOCK_STATUS` (32-bit fields)
/// or, with extended headers, `NBD_REPLY_TYPE_BLOCK_STATUS_EXT`.
pub fn encode_block_status(
    out: &mut Vec<u8>,
    mode: HeaderMode,
    cookie: u64,
    req_offset: u64,
    flags: u16,
    context_id: u32,
    extents: &[Extent],
) {
    if mode == HeaderMode::Extended {
        encode_chunk_header(
            out,
            mode,
            cookie,
            req_offset,
            flags,
            NBD_REPLY_TYPE_BLOCK_STATUS_EXT,
            8 + 16 * extents.len(),
        );
        out.extend_from_slice(&context_id.to_be_bytes());
        out.extend_from_slice(&(extents.len() as u32).to_be_bytes());
        for e in extents {
            out.extend_from_slice(&e.len.to_be_bytes());
            out.extend_from_slice(&e.flags.to_be_bytes());
        }
    } else {
        encode_chunk_header(
            out,
            mode,
            cookie,
            req_offset,
            flags,
            NBD_REPLY_TYPE_BLOCK_STATUS,
            4 + 8 * extents.len(),
        );
        out.extend_from_slice(&context_id.to_be_bytes());
        for e in extents {
            // compact requests carry 32-bit lengths and extents are clamped to the request
            out.extend_from_slice(&(e.len.min(u64::from(u32::MAX)) as u32).to_be_bytes());
            out.extend_from_slice(&(e.flags as u32).to_be_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compact(flags: u16, cmd: u16, cookie: u64, off: u64, len: u32) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
        v.extend_from_slice(&flags.to_be_bytes());
        v.extend_from_slice(&cmd.to_be_bytes());
        v.extend_from_slice(&cookie.to_be_bytes());
        v.extend_from_slice(&off.to_be_bytes());
        v.extend_from_slice(&len.to_be_bytes());
        v
    }

    fn lim(mode: HeaderMode) -> Limits {
        let mut flags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_READ_ONLY | NBD_FLAG_SEND_FUA;
        if mode != HeaderMode::Simple {
            flags |= NBD_FLAG_SEND_DF;
        }
        Limits {
            size: 1 << 20,
            mode,
            flags,
            contexts: 1,
        }
    }

    fn check(mode: HeaderMode, bytes: &[u8]) -> Result<Command, Rejection> {
        match decode_header(mode, bytes) {
            Decoded::Request { req, payload, .. } => {
                validate(&req, None, matches!(payload, Payload::Drain(_)), &lim(mode))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn short_header_needs_more() {
        let b = compact(0, NBD_CMD_READ, 1, 0, 512);
        for n in 0..b.len() {
            assert_eq!(
                decode_header(HeaderMode::Simple, &b[..n]),
                Decoded::NeedMore(28)
            );
        }
    }

    #[test]
    fn bad_magic_is_fatal() {
        let mut b = compact(0, NBD_CMD_READ, 1, 0, 512);
        b[0] ^= 1;
        assert!(matches!(
            decode_header(HeaderMode::Simple, &b),
            Decoded::Fatal(_)
        ));
        // a compact header on an extended session is garbage too
        let mut b = compact(0, NBD_CMD_READ, 1, 0, 512);
        b.extend_from_slice(&[0; 4]);
        assert!(matches!(
            decode_header(HeaderMode::Extended, &b),
            Decoded::Fatal(_)
        ));
    }

    #[test]
    fn read_past_end_and_wrapping_are_einval() {
        let e = check(
            HeaderMode::Simple,
            &compact(0, NBD_CMD_READ, 1, (1 << 20) - 1, 2),
        );
        assert_eq!(e.unwrap_err().errno, NBD_EINVAL);
        let e = check(
            HeaderMode::Simple,
            &compact(0, NBD_CMD_READ, 1, u64::MAX, 2),
        );
        assert_eq!(e.unwrap_err().errno, NBD_EINVAL);
    }

    #[test]
    fn read_over_max_payload_is_einval() {
        let mut l = lim(HeaderMode::Simple);
        l.size = 1 << 30;
        let req = RawRequest {
            flags: 0,
            cmd: NBD_CMD_READ,
            cookie: 1,
            offset: 0,
            length: u64::from(MAX_PAYLOAD) + 1,
        };
        assert_eq!(
            validate(&req, None, false, &l).unwrap_err().errno,
            NBD_EINVAL
        );
        let req = RawRequest {
            length: u64::from(MAX_PAYLOAD),
            ..req
        };
        assert!(validate(&req, None, false, &l).is_ok());
    }

    #[test]
    fn unknown_command_and_flags_are_einval() {
        let e = check(HeaderMode::Simple, &compact(0, 99, 1, 0, 1));
        assert_eq!(e.unwrap_err().errno, NBD_EINVAL);
        let e = check(HeaderMode::Simple, &compact(1 << 10, NBD_CMD_READ, 1, 0, 1));
        assert_eq!(e.unwrap_err().errno, NBD_EINVAL);
        let e = check(
            HeaderMode::Simple,
            &compact(NBD_CMD_FLAG_REQ_ONE, NBD_CMD_READ, 1, 0, 1),
        );
        assert_eq!(e.unwrap_err().errno, NBD_EINVAL);
        // DF without structured replies
        let e = check(
            HeaderMode::Simple,
            &compact(NBD_CMD_FLAG_DF, NBD_CMD_READ, 1, 0, 1),
        );
        assert_eq!(e.unwrap_err().errno, NBD_EINVAL);
        let ok = check(
            HeaderMode::Structured,
            &compact(NBD_CMD_FLAG_DF, NBD_CMD_READ, 1, 0, 1),
        );
        assert!(ok.is_ok());
    }

    #[test]
    fn writes_on_read_only_are_eperm() {
        for cmd in [NBD_CMD_WRITE, NBD_CMD_TRIM, NBD_CMD_WRITE_ZEROES] {
            let e = check(HeaderMode::Simple, &compact(0, cmd, 1, u64::MAX, 0));
            assert_eq!(e.unwrap_err().errno, NBD_EPERM);
        }
    }

    #[test]
    fn oversized_write_payload_is_drained_or_fatal() {
        let b = compact(0, NBD_CMD_WRITE, 1, 0, MAX_PAYLOAD + 4096);
        match decode_header(HeaderMode::Simple, &b) {
            Decoded::Request { payload, .. } => {
                assert_eq!(payload, Payload::Drain(u64::from(MAX_PAYLOAD) + 4096))
            }
            other => panic!("{other:?}"),
        }
        let b = compact(0, NBD_CMD_WRITE, 1, 0, u32::MAX);
        assert!(matches!(
            decode_header(HeaderMode::Simple, &b),
            Decoded::Fatal(_)
        ));
    }

    #[test]
    fn zero_length_requests() {
        assert!(check(HeaderMode::Simple, &compact(0, NBD_CMD_READ, 1, 0, 0)).is_ok());
        assert!(check(HeaderMode::Simple, &compact(0, NBD_CMD_CACHE, 1, 0, 0)).is_ok());
        let e = check(
            HeaderMode::Structured,
            &compact(0, NBD_CMD_BLOCK_STATUS, 1, 0, 0),
        );
        assert_eq!(e.unwrap_err().errno, NBD_EINVAL);
        // flush with reserved fields set is accepted
        assert_eq!(
            check(HeaderMode::Simple, &compact(0, NBD_CMD_FLUSH, 1, 7, 9)),
            Ok(Command::Flush)
        );
    }

    #[test]
    fn extended_block_status_payload_form() {
        let mut l = lim(HeaderMode::Extended);
        l.flags |= NBD_FLAG_BLOCK_STATUS_PAYLOAD;
        let req = RawRequest {
            flags: NBD_CMD_FLAG_PAYLOAD_LEN,
            cmd: NBD_CMD_BLOCK_STATUS,
            cookie: 1,
            offset: 0,
            length: 12,
        };
        let mut p = 4096u64.to_be_bytes().to_vec();
        p.extend_from_slice(&1u32.to_be_bytes());
        assert_eq!(
            validate(&req, Some(p), false, &l),
            Ok(Command::BlockStatus {
                offset: 0,
                length: 4096,
                req_one: false,
                ids: Some(vec![1])
            })
        );
        let e = validate(&req, Some(vec![0; 9]), false, &l);
        assert_eq!(e.unwrap_err().errno, NBD_EINVAL);
    }

    #[test]
    fn error_chunk_layout() {
        let mut out = Vec::new();
        encode_error(&mut out, HeaderMode::Structured, 7, 0, NBD_EINVAL, "no");
        assert_eq!(out.len(), 20 + 6 + 2);
        assert_eq!(&out[..4], &NBD_STRUCTURED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&out[4..6], &NBD_REPLY_FLAG_DONE.to_be_bytes());
        assert_eq!(&out[6..8], &NBD_REPLY_TYPE_ERROR.to_be_bytes());
        assert_eq!(&out[16..20], &8u32.to_be_bytes());
        let mut out = Vec::new();
        encode_ok(&mut out, HeaderMode::Extended, 7, 4096);
        assert_eq!(out.len(), 32);
        assert_eq!(&out[16..24], &4096u64.to_be_bytes());
    }
}
