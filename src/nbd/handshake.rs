//! Fixed-newstyle negotiation, sans-I/O.
//!
//! The server sends [`greeting`]; then [`Handshake::feed`] takes whatever bytes arrived,
//! appends the replies to send, and says whether to continue, to enter transmission with a
//! [`Session`], or to close. Bytes after the final option are left unconsumed for the
//! transmission phase. Nothing here blocks, allocates in proportion to a length the client
//! claims, or panics on any input.
//!
//! Bounds (NBD spec "Conventions" and qemu-nbd's behaviour): option payloads above 32 MiB end
//! the connection; known options above 1 MiB are drained unread and refused with
//! `NBD_REP_ERR_TOO_BIG`; unknown options are drained and refused with `NBD_REP_ERR_UNSUP`;
//! strings longer than 4096 bytes are `NBD_REP_ERR_INVALID` (queries that long are ignored).
//!
//! TLS (NBD spec "TLS support", FORCEDTLS mode): without TLS configured, `NBD_OPT_STARTTLS` is
//! refused with `NBD_REP_ERR_POLICY` (as qemu-nbd). With TLS required, every option but
//! `STARTTLS` and `ABORT` is drained unread and refused with `NBD_REP_ERR_TLS_REQD`, and
//! `EXPORT_NAME` (which cannot be refused) ends the connection. An accepted `STARTTLS` is
//! answered with `NBD_REP_ACK` and yields [`Outcome::StartTls`]: the driver drops every byte
//! after it that already arrived in plaintext (nbdkit CVE-2021-3716), runs the TLS handshake,
//! and keeps feeding this machine, which has forgotten everything negotiated before.

use super::export::{Export, ExportSet};
use super::meta::{MetaContext, QueryMode};
use super::session::Session;
use super::transmission::HeaderMode;
use super::transmission::BLOCK_SIZES;
use super::wire::*;
use std::sync::Arc;

/// Option payloads above this end the connection (qemu-nbd's limit).
pub const MAX_OPTION_LEN: u32 = 32 << 20;
/// Known options above this are drained, not buffered.
pub const OPTION_BUFFER_LIMIT: u32 = 1 << 20;

#[derive(Debug)]
pub enum Outcome {
    /// Feed more bytes.
    Continue,
    /// `NBD_OPT_STARTTLS` was accepted (its `NBD_REP_ACK` is in the output): discard the rest
    /// of the input, upgrade the stream to TLS, then feed the bytes that arrive over TLS.
    StartTls,
    /// Negotiation finished: enter transmission.
    Ready(Session),
    /// Send what was produced, then close; the string says why (for the log).
    Close(String),
    /// The client ended the negotiation with `NBD_OPT_ABORT` (acknowledged in the output): a
    /// normal end, not a failure.
    Abort,
}

#[derive(Debug)]
enum State {
    ClientFlags,
    OptHeader,
    OptData {
        opt: u32,
        len: usize,
    },
    OptSkip {
        opt: u32,
        remaining: u64,
        reply: u32,
    },
    Finished,
}

/// Where a negotiation stands with TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tls {
    /// Not configured: `NBD_OPT_STARTTLS` is refused with `NBD_REP_ERR_POLICY`.
    Off,
    /// Configured and not started yet: only `STARTTLS` and `ABORT` are served.
    Required,
    /// Running: a second `STARTTLS` is `NBD_REP_ERR_INVALID`.
    Active,
}

/// The server side of one negotiation.
#[derive(Debug)]
pub struct Handshake {
    exports: Arc<ExportSet>,
    tls: Tls,
    state: State,
    buf: Vec<u8>,
    fixed: bool,
    no_zeroes: bool,
    mode: HeaderMode,
    /// Export name and contexts of the last `NBD_OPT_SET_META_CONTEXT`.
    meta: Option<(Vec<u8>, Vec<Selected>)>,
}

/// A selected metadata context and its id.
type Selected = (u32, MetaContext);

/// The server's first 18 bytes.
pub fn greeting() -> Vec<u8> {
    let mut v = Vec::with_capacity(18);
    v.extend_from_slice(&NBDMAGIC.to_be_bytes());
    v.extend_from_slice(&IHAVEOPT.to_be_bytes());
    v.extend_from_slice(&(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES).to_be_bytes());
    v
}

fn reply(out: &mut Vec<u8>, opt: u32, reply_type: u32, data: &[u8]) {
    out.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&opt.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// A little reader over an option payload.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn u16(&mut self) -> Option<u16> {
        let (h, t) = self.0.split_first_chunk::<2>()?;
        self.0 = t;
        Some(u16::from_be_bytes(*h))
    }
    fn u32(&mut self) -> Option<u32> {
        let (h, t) = self.0.split_first_chunk::<4>()?;
        self.0 = t;
        Some(u32::from_be_bytes(*h))
    }
    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.0.len() {
            return None;
        }
        let (h, t) = self.0.split_at(n);
        self.0 = t;
        Some(h)
    }
}

/// Why an option was refused: reply type and message.
type Refusal = (u32, String);

fn invalid(msg: impl Into<String>) -> Refusal {
    (NBD_REP_ERR_INVALID, msg.into())
}

impl Handshake {
    pub fn new(exports: Arc<ExportSet>) -> Self {
        Self::with_tls(exports, Tls::Off)
    }

    /// A negotiation that starts in the given TLS state (`Tls::Required` when the server has
    /// credentials).
    pub fn with_tls(exports: Arc<ExportSet>, tls: Tls) -> Self {
        Handshake {
            exports,
            tls,
            state: State::ClientFlags,
            buf: Vec::new(),
            fixed: false,
            no_zeroes: false,
            mode: HeaderMode::Simple,
            meta: None,
        }
    }

    /// Move bytes from `input[*used..]` into the buffer until it holds `need` bytes.
    fn fill(&mut self, input: &[u8], used: &mut usize, need: usize) -> bool {
        let take = (need - self.buf.len().min(need)).min(input.len() - *used);
        self.buf.extend_from_slice(&input[*used..*used + take]);
        *used += take;
        self.buf.len() >= need
    }

    /// Consume bytes from `input`, append replies to `out`. Returns how many bytes were used
    /// and what to do next. After `Ready` or `Close`, further calls consume nothing.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> (usize, Outcome) {
        let mut used = 0;
        loop {
            match self.state {
                State::Finished => return (used, Outcome::Continue),
                State::ClientFlags => {
                    if !self.fill(input, &mut used, 4) {
                        return (used, Outcome::Continue);
                    }
                    let flags =
                        u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]);
                    self.buf.clear();
                    let known = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES;
                    if flags & !known != 0 {
                        return self.finish(
                            used,
                            Outcome::Close(format!(
                                "Unknown client flags {:#x} received",
                                flags & !known
                            )),
                        );
                    }
                    self.fixed = flags & NBD_FLAG_C_FIXED_NEWSTYLE != 0;
                    self.no_zeroes = flags & NBD_FLAG_C_NO_ZEROES != 0;
                    self.state = State::OptHeader;
                }
                State::OptHeader => {
                    if !self.fill(input, &mut used, OPTION_HEADER_LEN) {
                        return (used, Outcome::Continue);
                    }
                    let magic = u64::from_be_bytes(self.buf[0..8].try_into().unwrap_or([0; 8]));
                    let opt = u32::from_be_bytes(self.buf[8..12].try_into().unwrap_or([0; 4]));
                    let len = u32::from_be_bytes(self.buf[12..16].try_into().unwrap_or([0; 4]));
                    self.buf.clear();
                    if magic != IHAVEOPT {
                        return self.finish(used, Outcome::Close("Bad option magic".into()));
                    }
                    if len > MAX_OPTION_LEN {
                        return self.finish(
                            used,
                            Outcome::Close(format!(
                                "len ({len}) is larger than max len ({MAX_OPTION_LEN})"
                            )),
                        );
                    }
                    if !self.fixed && opt != NBD_OPT_EXPORT_NAME {
                        return self.finish(
                            used,
                            Outcome::Close(format!(
                                "Unsupported option {opt} ({}) without fixed newstyle",
                                option_name(opt)
                            )),
                        );
                    }
                    let known = matches!(
                        opt,
                        NBD_OPT_EXPORT_NAME
                            | NBD_OPT_ABORT
                            | NBD_OPT_LIST
                            | NBD_OPT_STARTTLS
                            | NBD_OPT_INFO
                            | NBD_OPT_GO
                            | NBD_OPT_STRUCTURED_REPLY
                            | NBD_OPT_LIST_META_CONTEXT
                            | NBD_OPT_SET_META_CONTEXT
                            | NBD_OPT_EXTENDED_HEADERS
                    );
                    if self.tls == Tls::Required && opt == NBD_OPT_EXPORT_NAME {
                        // no error reply exists for EXPORT_NAME
                        return self.finish(
                            used,
                            Outcome::Close(format!("Option {opt:#x} not permitted before TLS")),
                        );
                    }
                    if opt == NBD_OPT_EXPORT_NAME && len as usize > NBD_MAX_STRING {
                        // no error reply exists for EXPORT_NAME
                        return self.finish(used, Outcome::Close("export name too long".into()));
                    }
                    let tls_gate = self.tls == Tls::Required
                        && !matches!(opt, NBD_OPT_STARTTLS | NBD_OPT_ABORT);
                    self.state = if tls_gate {
                        State::OptSkip {
                            opt,
                            remaining: len.into(),
                            reply: NBD_REP_ERR_TLS_REQD,
                        }
                    } else if !known {
                        State::OptSkip {
                            opt,
                            remaining: len.into(),
                            reply: NBD_REP_ERR_UNSUP,
                        }
                    } else if len > OPTION_BUFFER_LIMIT {
                        State::OptSkip {
                            opt,
                            remaining: len.into(),
                            reply: NBD_REP_ERR_TOO_BIG,
                        }
                    } else {
                        State::OptData {
                            opt,
                            len: len as usize,
                        }
                    };
                }
                State::OptSkip {
                    opt,
                    remaining,
                    reply: rtype,
                } => {
                    let take = remaining.min((input.len() - used) as u64);
                    used += take as usize;
                    let remaining = remaining - take;
                    if remaining > 0 {
                        self.state = State::OptSkip {
                            opt,
                            remaining,
                            reply: rtype,
                        };
                        return (used, Outcome::Continue);
                    }
                    let msg = if rtype == NBD_REP_ERR_TLS_REQD {
                        format!("Option {opt:#x} not permitted before TLS")
                    } else if rtype == NBD_REP_ERR_UNSUP {
                        format!("Unsupported option {opt:#x} ({})", option_name(opt))
                    } else {
                        format!("option {} too large", option_name(opt))
                    };
                    if opt == NBD_OPT_SET_META_CONTEXT {
                        self.meta = None;
                    }
                    reply(out, opt, rtype, msg.as_bytes());
                    self.state = State::OptHeader;
                }
                State::OptData { opt, len } => {
                    if !self.fill(input, &mut used, len) {
                        return (used, Outcome::Continue);
                    }
                    let data = std::mem::take(&mut self.buf);
                    self.state = State::OptHeader;
                    match self.option(opt, &data, out) {
                        Outcome::Continue => {}
                        Outcome::StartTls => return (used, Outcome::StartTls),
                        o => return self.finish(used, o),
                    }
                }
            }
        }
    }

    /// The TLS state of this negotiation.
    pub fn tls(&self) -> Tls {
        self.tls
    }

    /// After `STARTTLS`: nothing negotiated in plaintext survives (NBD spec, `NBD_OPT_STARTTLS`:
    /// "the server MUST NOT preserve any negotiation state"). The client flags stay: they
    /// belong to the greeting, not to an option.
    fn start_tls(&mut self) {
        self.tls = Tls::Active;
        self.mode = HeaderMode::Simple;
        self.meta = None;
        self.buf = Vec::new();
        self.state = State::OptHeader;
    }

    fn finish(&mut self, used: usize, o: Outcome) -> (usize, Outcome) {
        self.state = State::Finished;
        self.buf = Vec::new();
        (used, o)
    }

    fn session(&self, export: &Arc<Export>) -> Session {
        let contexts = match &self.meta {
            Some((name, ctx)) if name.as_slice() == export.name.as_bytes() => ctx.clone(),
            _ => Vec::new(),
        };
        Session {
            export: export.clone(),
            mode: self.mode,
            contexts,
            flags: export.transmission_flags(self.mode),
            conn: Arc::default(),
        }
    }

    /// Handle one complete option.
    fn option(&mut self, opt: u32, data: &[u8], out: &mut Vec<u8>) -> Outcome {
        let res = match opt {
            NBD_OPT_EXPORT_NAME => {
                let Some(export) = self.exports.find(data).cloned() else {
                    return Outcome::Close(format!(
                        "export '{}' not present",
                        String::from_utf8_lossy(data)
                    ));
                };
                let s = self.session(&export);
                out.extend_from_slice(&export.size().to_be_bytes());
                out.extend_from_slice(&s.flags.to_be_bytes());
                if !self.no_zeroes {
                    out.extend_from_slice(&[0; 124]);
                }
                return Outcome::Ready(s);
            }
            NBD_OPT_ABORT => {
                reply(out, opt, NBD_REP_ACK, &[]);
                return Outcome::Abort;
            }
            NBD_OPT_LIST => self.list(data, out),
            NBD_OPT_STARTTLS => match self.tls {
                Tls::Required if data.is_empty() => {
                    reply(out, opt, NBD_REP_ACK, &[]);
                    self.start_tls();
                    return Outcome::StartTls;
                }
                Tls::Required => {
                    // as qemu-nbd: a client that cannot start TLS correctly is dropped
                    reply(out, opt, NBD_REP_ERR_INVALID, b"NBD_OPT_STARTTLS with data");
                    return Outcome::Close("NBD_OPT_STARTTLS with data".into());
                }
                _ if !data.is_empty() => Err(invalid("NBD_OPT_STARTTLS with data")),
                Tls::Active => Err(invalid("TLS already enabled")),
                Tls::Off => Err((NBD_REP_ERR_POLICY, "TLS not configured".into())),
            },
            NBD_OPT_INFO | NBD_OPT_GO => match self.info(opt, data, out) {
                Ok(Some(s)) => return Outcome::Ready(s),
                Ok(None) => Ok(()),
                Err(e) => Err(e),
            },
            NBD_OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    Err(invalid("NBD_OPT_STRUCTURED_REPLY with data"))
                } else if self.mode == HeaderMode::Extended {
                    Err((
                        NBD_REP_ERR_EXT_HEADER_REQD,
                        "extended headers already negotiated".into(),
                    ))
                } else if self.mode == HeaderMode::Structured {
                    Err(invalid("structured reply already negotiated"))
                } else {
                    self.mode = HeaderMode::Structured;
                    reply(out, opt, NBD_REP_ACK, &[]);
                    Ok(())
                }
            }
            NBD_OPT_EXTENDED_HEADERS => {
                if !data.is_empty() {
                    Err(invalid("NBD_OPT_EXTENDED_HEADERS with data"))
                } else if self.mode == HeaderMode::Extended {
                    Err(invalid("extended headers already negotiated"))
                } else {
                    self.mode = HeaderMode::Extended;
                    reply(out, opt, NBD_REP_ACK, &[]);
                    Ok(())
                }
            }
            NBD_OPT_LIST_META_CONTEXT | NBD_OPT_SET_META_CONTEXT => {
                let r = self.meta_context(opt, data, out);
                if r.is_err() && opt == NBD_OPT_SET_META_CONTEXT {
                    self.meta = None;
                }
                r
            }
            _ => Err((NBD_REP_ERR_UNSUP, format!("Unsupported option {opt:#x}"))),
        };
        if let Err((rtype, msg)) = res {
            reply(out, opt, rtype, msg.as_bytes());
        }
        Outcome::Continue
    }

    fn list(&self, data: &[u8], out: &mut Vec<u8>) -> Result<(), Refusal> {
        if !data.is_empty() {
            return Err(invalid("NBD_OPT_LIST with data"));
        }
        for e in self.exports.iter() {
            let mut d = Vec::new();
            d.extend_from_slice(&(e.name.len() as u32).to_be_bytes());
            d.extend_from_slice(e.name.as_bytes());
            if let Some(desc) = &e.description {
                d.extend_from_slice(desc.as_bytes());
            }
            reply(out, NBD_OPT_LIST, NBD_REP_SERVER, &d);
        }
        reply(out, NBD_OPT_LIST, NBD_REP_ACK, &[]);
        Ok(())
    }

    fn info(
        &mut self,
        opt: u32,
        data: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<Option<Session>, Refusal> {
        let mut c = Cursor(data);
        let namelen = c.u32().ok_or_else(|| invalid("option too short"))? as usize;
        if data.len() < 6 || namelen > data.len() - 6 {
            return Err(invalid("name length exceeds the option length"));
        }
        if namelen > NBD_MAX_STRING {
            return Err(invalid(format!("export name too long ({namelen} bytes)")));
        }
        let name = c
            .bytes(namelen)
            .ok_or_else(|| invalid("option too short"))?;
        let n = c.u16().ok_or_else(|| invalid("option too short"))? as usize;
        if c.0.len() != 2 * n {
            return Err(invalid(
                "information request count does not match the length",
            ));
        }
        let mut want_name = false;
        let mut want_desc = false;
        let mut want_sizes = false;
        while let Some(i) = c.u16() {
            match i {
                NBD_INFO_NAME => want_name = true,
                NBD_INFO_DESCRIPTION => want_desc = true,
                NBD_INFO_BLOCK_SIZE => want_sizes = true,
                _ => {}
            }
        }
        let Some(export) = self.exports.find(name).cloned() else {
            return Err((
                NBD_REP_ERR_UNKNOWN,
                format!("export '{}' not present", String::from_utf8_lossy(name)),
            ));
        };
        let align = export.backend.request_alignment().max(BLOCK_SIZES.0);
        // as qemu-nbd: a client that only asks (INFO) without asking for block sizes is told
        // to, when requests need an alignment; GO is served to every client, and one that did
        // not ask is told the minimum is 1 (requests of any size are served regardless)
        if opt == NBD_OPT_INFO && !want_sizes && align > 1 {
            return Err((
                NBD_REP_ERR_BLOCK_SIZE_REQD,
                "request NBD_INFO_BLOCK_SIZE to use this export".to_string(),
            ));
        }
        let s = self.session(&export);
        if want_name {
            let mut d = NBD_INFO_NAME.to_be_bytes().to_vec();
            d.extend_from_slice(export.name.as_bytes());
            reply(out, opt, NBD_REP_INFO, &d);
        }
        if let (true, Some(desc)) = (want_desc, &export.description) {
            let mut d = NBD_INFO_DESCRIPTION.to_be_bytes().to_vec();
            d.extend_from_slice(desc.as_bytes());
            reply(out, opt, NBD_REP_INFO, &d);
        }
        let mut d = NBD_INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        let min_block = if opt == NBD_OPT_INFO || want_sizes {
            align
        } else {
            BLOCK_SIZES.0
        };
        d.extend_from_slice(&min_block.to_be_bytes());
        d.extend_from_slice(&BLOCK_SIZES.1.to_be_bytes());
        d.extend_from_slice(&BLOCK_SIZES.2.to_be_bytes());
        reply(out, opt, NBD_REP_INFO, &d);
        let mut d = NBD_INFO_EXPORT.to_be_bytes().to_vec();
        d.extend_from_slice(&export.size().to_be_bytes());
        d.extend_from_slice(&s.flags.to_be_bytes());
        reply(out, opt, NBD_REP_INFO, &d);
        reply(out, opt, NBD_REP_ACK, &[]);
        Ok((opt == NBD_OPT_GO).then_some(s))
    }

    fn meta_context(&mut self, opt: u32, data: &[u8], out: &mut Vec<u8>) -> Result<(), Refusal> {
        if self.mode == HeaderMode::Simple {
            return Err(invalid("use NBD_OPT_STRUCTURED_REPLY first"));
        }
        let mode = if opt == NBD_OPT_SET_META_CONTEXT {
            QueryMode::Set
        } else {
            QueryMode::List
        };
        let mut c = Cursor(data);
        let namelen = c.u32().ok_or_else(|| invalid("option too short"))? as usize;
        if namelen > NBD_MAX_STRING {
            return Err(invalid(format!("export name too long ({namelen} bytes)")));
        }
        let name = c
            .bytes(namelen)
            .ok_or_else(|| invalid("option too short"))?;
        let nq = c.u32().ok_or_else(|| invalid("option too short"))?;
        let mut queries = Vec::new();
        for _ in 0..nq {
            let qlen = c.u32().ok_or_else(|| invalid("option too short"))? as usize;
            let q = c
                .bytes(qlen)
                .ok_or_else(|| invalid("query runs past the option"))?;
            if qlen <= NBD_MAX_STRING {
                queries.push(q);
            }
        }
        if !c.0.is_empty() {
            return Err(invalid("trailing data after the queries"));
        }
        let Some(export) = self.exports.find(name).cloned() else {
            return Err((
                NBD_REP_ERR_UNKNOWN,
                format!("export '{}' not present", String::from_utf8_lossy(name)),
            ));
        };
        let mut found: Vec<(u32, MetaContext)> = Vec::new();
        if nq == 0 && mode == QueryMode::List {
            found = export.contexts.listed();
        }
        for q in queries {
            for c in export.contexts.matching(q, mode) {
                if !found.iter().any(|f| f.0 == c.0) {
                    found.push(c);
                }
            }
        }
        for (id, ctx) in &found {
            let mut d = id.to_be_bytes().to_vec();
            d.extend_from_slice(ctx.name().as_bytes());
            reply(out, opt, NBD_REP_META_CONTEXT, &d);
        }
        reply(out, opt, NBD_REP_ACK, &[]);
        if mode == QueryMode::Set {
            self.meta = Some((name.to_vec(), found));
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::nbd::export::tests::export;

    pub(crate) fn exports() -> Arc<ExportSet> {
        let mut e = export(true);
        e.name = "disk".into();
        e.description = Some("test export".into());
        Arc::new(ExportSet::new(vec![Arc::new(e)]))
    }

    pub(crate) fn opt(opt: u32, data: &[u8]) -> Vec<u8> {
        let mut v = IHAVEOPT.to_be_bytes().to_vec();
        v.extend_from_slice(&opt.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        v
    }

    pub(crate) fn go(name: &[u8], infos: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name);
        d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            d.extend_from_slice(&i.to_be_bytes());
        }
        opt(NBD_OPT_GO, &d)
    }

    pub(crate) fn meta(name: &[u8], queries: &[&[u8]]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name);
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q);
        }
        d
    }

    const FLAGS: [u8; 4] = [0, 0, 0, 3];

    /// Parse option replies: (option, type, data).
    fn replies(mut b: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        let mut v = Vec::new();
        while b.len() >= 20 {
            assert_eq!(&b[..8], &REPLY_MAGIC.to_be_bytes());
            let o = u32::from_be_bytes(b[8..12].try_into().unwrap());
            let t = u32::from_be_bytes(b[12..16].try_into().unwrap());
            let l = u32::from_be_bytes(b[16..20].try_into().unwrap()) as usize;
            v.push((o, t, b[20..20 + l].to_vec()));
            b = &b[20 + l..];
        }
        assert!(b.is_empty(), "trailing {b:?}");
        v
    }

    fn run(input: &[u8]) -> (Vec<u8>, usize, Outcome) {
        let mut h = Handshake::new(exports());
        let mut out = Vec::new();
        let (used, o) = h.feed(input, &mut out);
        (out, used, o)
    }

    #[test]
    fn greeting_offers_fixed_newstyle_and_no_zeroes() {
        let g = greeting();
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(&g[16..], &[0, 3]);
    }

    #[test]
    fn unknown_option_is_unsup_and_negotiation_continues() {
        let mut input = FLAGS.to_vec();
        input.extend(opt(0x1234, b"junk"));
        input.extend(opt(NBD_OPT_LIST, b""));
        let (out, used, o) = run(&input);
        assert!(matches!(o, Outcome::Continue));
        assert_eq!(used, input.len());
        let r = replies(&out);
        assert_eq!((r[0].0, r[0].1), (0x1234, NBD_REP_ERR_UNSUP));
        assert_eq!(r[1].1, NBD_REP_SERVER);
        assert_eq!(&r[1].2[..8], b"\0\0\0\x04disk");
        assert_eq!(r[2].1, NBD_REP_ACK);
    }

    #[test]
    fn huge_option_length_disconnects_without_reply() {
        let mut input = FLAGS.to_vec();
        input.extend(&IHAVEOPT.to_be_bytes());
        input.extend(&NBD_OPT_GO.to_be_bytes());
        input.extend(&0x7fff_ffffu32.to_be_bytes());
        let (out, _, o) = run(&input);
        assert!(out.is_empty());
        assert!(matches!(o, Outcome::Close(m) if m.contains("2147483647")));
    }

    #[test]
    fn bad_client_flags_and_bad_option_magic_close() {
        let (_, _, o) = run(&[0, 0, 0, 0x83]);
        assert!(matches!(o, Outcome::Close(m) if m.contains("0x80")));
        let mut input = FLAGS.to_vec();
        input.extend(&[0u8; 16]);
        let (out, _, o) = run(&input);
        assert!(out.is_empty() && matches!(o, Outcome::Close(_)));
    }

    #[test]
    fn go_name_errors() {
        let mut input = FLAGS.to_vec();
        input.extend(go(&[b'a'; 5000], &[]));
        input.extend(go(&[b'a'; 4096], &[]));
        // name length larger than the payload
        let mut d = 100u32.to_be_bytes().to_vec();
        d.extend_from_slice(b"disk\0\0");
        input.extend(opt(NBD_OPT_GO, &d));
        let (out, _, o) = run(&input);
        assert!(matches!(o, Outcome::Continue));
        let types: Vec<u32> = replies(&out).iter().map(|r| r.1).collect();
        assert_eq!(
            types,
            [
                NBD_REP_ERR_INVALID,
                NBD_REP_ERR_UNKNOWN,
                NBD_REP_ERR_INVALID
            ]
        );
    }

    #[test]
    fn go_success_sends_infos_then_ack_and_leaves_trailing_bytes() {
        let mut input = FLAGS.to_vec();
        input.extend(opt(NBD_OPT_STRUCTURED_REPLY, b""));
        input.extend(opt(
            NBD_OPT_SET_META_CONTEXT,
            &meta(
                b"disk",
                &[
                    b"base:allocation",
                    b"qemu:allocation-depth",
                    b"qemu:dirty-bitmap:x",
                ],
            ),
        ));
        input.extend(go(b"disk", &[NBD_INFO_NAME, NBD_INFO_DESCRIPTION]));
        let before = input.len();
        input.extend(b"next request");
        let (out, used, o) = run(&input);
        assert_eq!(used, before);
        let Outcome::Ready(s) = o else {
            panic!("{o:?}")
        };
        assert_eq!(s.mode, HeaderMode::Structured);
        assert_eq!(s.contexts.len(), 2);
        let r = replies(&out);
        let types: Vec<u32> = r.iter().map(|r| r.1).collect();
        assert_eq!(
            types,
            [
                NBD_REP_ACK,
                NBD_REP_META_CONTEXT,
                NBD_REP_META_CONTEXT,
                NBD_REP_ACK,
                NBD_REP_INFO,
                NBD_REP_INFO,
                NBD_REP_INFO,
                NBD_REP_INFO,
                NBD_REP_ACK
            ]
        );
        assert_eq!(&r[1].2[4..], b"base:allocation");
        assert_eq!(&r[4].2, b"\0\x01disk");
        assert_eq!(&r[5].2, b"\0\x02test export");
        assert_eq!(r[6].2, [0, 3, 0, 0, 0, 1, 0, 0, 0x10, 0, 2, 0, 0, 0]);
        let mut exp = vec![0, 0];
        exp.extend_from_slice(&(4096u64 + 61440 + 65536 + 4096).to_be_bytes());
        exp.extend_from_slice(&(s.flags).to_be_bytes());
        assert_eq!(r[7].2, exp);
        assert_eq!(s.flags & NBD_FLAG_SEND_DF, NBD_FLAG_SEND_DF);
    }

    #[test]
    fn meta_context_rules() {
        let mut input = FLAGS.to_vec();
        input.extend(opt(
            NBD_OPT_SET_META_CONTEXT,
            &meta(b"disk", &[b"base:allocation"]),
        ));
        input.extend(opt(NBD_OPT_EXTENDED_HEADERS, b""));
        input.extend(opt(NBD_OPT_STRUCTURED_REPLY, b""));
        input.extend(opt(NBD_OPT_LIST_META_CONTEXT, &meta(b"disk", &[b"qemu:"])));
        input.extend(opt(NBD_OPT_LIST_META_CONTEXT, &meta(b"nosuch", &[])));
        let long = vec![b'q'; 5000];
        input.extend(opt(
            NBD_OPT_SET_META_CONTEXT,
            &meta(b"disk", &[&long, b"x:y"]),
        ));
        let (out, _, _) = run(&input);
        let r = replies(&out);
        let types: Vec<u32> = r.iter().map(|r| r.1).collect();
        assert_eq!(
            types,
            [
                NBD_REP_ERR_INVALID,
                NBD_REP_ACK,
                NBD_REP_ERR_EXT_HEADER_REQD,
                NBD_REP_META_CONTEXT,
                NBD_REP_ACK,
                NBD_REP_ERR_UNKNOWN,
                NBD_REP_ACK
            ]
        );
        assert_eq!(&r[3].2[4..], b"qemu:allocation-depth");
    }

    #[test]
    fn export_name_honours_no_zeroes_and_unknown_name_closes() {
        let mut input = FLAGS.to_vec();
        input.extend(opt(NBD_OPT_EXPORT_NAME, b"disk"));
        let (out, _, o) = run(&input);
        assert!(matches!(o, Outcome::Ready(_)));
        assert_eq!(out.len(), 10);
        let mut input = vec![0, 0, 0, 1];
        input.extend(opt(NBD_OPT_EXPORT_NAME, b"disk"));
        let (out, _, _) = run(&input);
        assert_eq!(out.len(), 134);
        let mut input = FLAGS.to_vec();
        input.extend(opt(NBD_OPT_EXPORT_NAME, b"nosuch"));
        let (out, _, o) = run(&input);
        assert!(out.is_empty() && matches!(o, Outcome::Close(_)));
    }

    #[test]
    fn starttls_is_policy_and_abort_acks() {
        let mut input = FLAGS.to_vec();
        input.extend(opt(NBD_OPT_STARTTLS, b""));
        input.extend(opt(NBD_OPT_ABORT, b""));
        let (out, _, o) = run(&input);
        let types: Vec<u32> = replies(&out).iter().map(|r| r.1).collect();
        assert_eq!(types, [NBD_REP_ERR_POLICY, NBD_REP_ACK]);
        assert!(matches!(o, Outcome::Abort));
    }

    #[test]
    fn non_fixed_client_may_only_send_export_name() {
        let mut input = vec![0, 0, 0, 0];
        input.extend(opt(NBD_OPT_LIST, b""));
        let (out, _, o) = run(&input);
        assert!(out.is_empty() && matches!(o, Outcome::Close(_)));
    }

    #[test]
    fn oversized_known_option_is_drained_and_too_big() {
        let mut input = FLAGS.to_vec();
        input.extend(opt(NBD_OPT_GO, &vec![0; OPTION_BUFFER_LIMIT as usize + 1]));
        input.extend(opt(NBD_OPT_LIST, b""));
        let (out, used, _) = run(&input);
        assert_eq!(used, input.len());
        let types: Vec<u32> = replies(&out).iter().map(|r| r.1).collect();
        assert_eq!(types, [NBD_REP_ERR_TOO_BIG, NBD_REP_SERVER, NBD_REP_ACK]);
    }

    /// Feeding a transcript byte by byte gives the same bytes as feeding it at once, and every
    /// prefix leaves the machine waiting (no panic, no early outcome).
    #[test]
    fn every_prefix_of_a_transcript_is_safe() {
        let mut input = FLAGS.to_vec();
        input.extend(opt(0x99, b"abc"));
        input.extend(opt(NBD_OPT_EXTENDED_HEADERS, b""));
        input.extend(opt(NBD_OPT_LIST_META_CONTEXT, &meta(b"disk", &[])));
        input.extend(opt(NBD_OPT_INFO, &go(b"disk", &[1, 2, 3])[16..]));
        input.extend(go(b"disk", &[]));
        let (whole, _, _) = run(&input);
        for cut in 0..input.len() {
            let (_, used, o) = run(&input[..cut]);
            assert_eq!(used, cut);
            assert!(matches!(o, Outcome::Continue));
        }
        let mut h = Handshake::new(exports());
        let mut out = Vec::new();
        let mut ready = false;
        for b in &input {
            let (_, o) = h.feed(std::slice::from_ref(b), &mut out);
            ready |= matches!(o, Outcome::Ready(_));
        }
        assert!(ready);
        assert_eq!(out, whole);
    }

    fn run_tls(input: &[u8]) -> (Handshake, Vec<u8>, usize, Outcome) {
        let mut h = Handshake::with_tls(exports(), Tls::Required);
        let mut out = Vec::new();
        let (used, o) = h.feed(input, &mut out);
        (h, out, used, o)
    }

    #[test]
    fn tls_required_refuses_every_option_but_starttls_and_abort() {
        let mut input = FLAGS.to_vec();
        input.extend(opt(NBD_OPT_LIST, b""));
        input.extend(opt(NBD_OPT_STRUCTURED_REPLY, b""));
        input.extend(go(b"disk", &[]));
        input.extend(opt(NBD_OPT_INFO, &go(b"disk", &[])[16..]));
        input.extend(opt(0x1234, b"junk"));
        input.extend(opt(NBD_OPT_ABORT, b""));
        let (_, out, _, o) = run_tls(&input);
        let r = replies(&out);
        let types: Vec<u32> = r.iter().map(|r| r.1).collect();
        assert_eq!(
            types,
            [
                NBD_REP_ERR_TLS_REQD,
                NBD_REP_ERR_TLS_REQD,
                NBD_REP_ERR_TLS_REQD,
                NBD_REP_ERR_TLS_REQD,
                NBD_REP_ERR_TLS_REQD,
                NBD_REP_ACK
            ]
        );
        assert_eq!(r[2].2, b"Option 0x7 not permitted before TLS");
        assert!(matches!(o, Outcome::Abort));
    }

    #[test]
    fn tls_required_export_name_disconnects() {
        let mut input = FLAGS.to_vec();
        input.extend(opt(NBD_OPT_EXPORT_NAME, b"disk"));
        let (_, out, _, o) = run_tls(&input);
        assert!(out.is_empty());
        assert!(matches!(o, Outcome::Close(m) if m.contains("not permitted before TLS")));
    }

    #[test]
    fn starttls_with_data_is_invalid_and_closes() {
        let mut input = FLAGS.to_vec();
        input.extend(opt(NBD_OPT_STARTTLS, b"x"));
        let (_, out, _, o) = run_tls(&input);
        assert_eq!(replies(&out)[0].1, NBD_REP_ERR_INVALID);
        assert!(matches!(o, Outcome::Close(_)));
    }

    /// Bytes after STARTTLS are left unconsumed (the driver discards them), and nothing the
    /// client did before survives the upgrade.
    #[test]
    fn starttls_stops_at_the_ack_and_forgets_earlier_state() {
        let mut input = FLAGS.to_vec();
        input.extend(opt(NBD_OPT_STRUCTURED_REPLY, b""));
        input.extend(opt(NBD_OPT_STARTTLS, b""));
        let at = input.len();
        // pipelined in plaintext by an attacker: must never be read as options
        input.extend(opt(NBD_OPT_STRUCTURED_REPLY, b""));
        let (mut h, out, used, o) = run_tls(&input);
        assert_eq!(used, at);
        assert!(matches!(o, Outcome::StartTls));
        let types: Vec<u32> = replies(&out).iter().map(|r| r.1).collect();
        assert_eq!(types, [NBD_REP_ERR_TLS_REQD, NBD_REP_ACK]);
        assert_eq!(h.tls(), Tls::Active);
        // now "over TLS": structured replies were not negotiated, a second STARTTLS is invalid
        let mut input = opt(NBD_OPT_LIST_META_CONTEXT, &meta(b"disk", &[]));
        input.extend(opt(NBD_OPT_STARTTLS, b""));
        input.extend(go(b"disk", &[]));
        let mut out = Vec::new();
        let (_, o) = h.feed(&input, &mut out);
        let r = replies(&out);
        assert_eq!(r[0].1, NBD_REP_ERR_INVALID);
        assert_eq!(
            (r[1].1, r[1].2.as_slice()),
            (NBD_REP_ERR_INVALID, &b"TLS already enabled"[..])
        );
        let Outcome::Ready(s) = o else {
            panic!("{o:?}")
        };
        assert_eq!(s.mode, HeaderMode::Simple);
    }
}
