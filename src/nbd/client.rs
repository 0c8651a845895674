//! The small blocking client behind `qnbd serve -L` and `qnbd bench --nbd`: list a server's
//! exports with their size, flags, block sizes and metadata contexts, printed the way
//! `qemu-nbd -L` prints them; open an export for simple-reply transmission (the bench drives the
//! socket itself, with many requests in flight).

use super::wire::*;
use crate::error::{Error, ErrorKind, Result};
use std::io::{Read, Write};

fn proto(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidArgument, msg)
}

struct Conn<S: Read + Write> {
    s: S,
}

impl<S: Read + Write> Conn<S> {
    fn read_exact(&mut self, n: usize) -> Result<Vec<u8>> {
        let mut v = vec![0u8; n];
        self.s
            .read_exact(&mut v)
            .map_err(|e| Error::io("reading from the server", e))?;
        Ok(v)
    }

    fn send_opt(&mut self, opt: u32, data: &[u8]) -> Result<()> {
        let mut v = IHAVEOPT.to_be_bytes().to_vec();
        v.extend_from_slice(&opt.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        self.s
            .write_all(&v)
            .map_err(|e| Error::io("writing to the server", e))
    }

    /// One option reply: (type, data).
    fn reply(&mut self, opt: u32) -> Result<(u32, Vec<u8>)> {
        let h = self.read_exact(20)?;
        let magic = u64::from_be_bytes(h[0..8].try_into().unwrap_or_default());
        let o = u32::from_be_bytes(h[8..12].try_into().unwrap_or_default());
        let t = u32::from_be_bytes(h[12..16].try_into().unwrap_or_default());
        let l = u32::from_be_bytes(h[16..20].try_into().unwrap_or_default());
        if magic != REPLY_MAGIC || o != opt || l > (1 << 24) {
            return Err(proto("Unexpected option reply from the server"));
        }
        Ok((t, self.read_exact(l as usize)?))
    }
}

/// What the server said about one export.
#[derive(Debug, Default, Clone)]
pub struct ExportInfo {
    pub name: String,
    pub description: Option<String>,
    pub size: u64,
    pub flags: u16,
    pub block_sizes: Option<(u32, u32, u32)>,
    pub contexts: Vec<String>,
}

/// List every export of the server on `s` (structured/extended headers negotiated when
/// offered, so the flags are the ones a modern client sees). Returns (extended?, exports).
///
/// With `tls`, the client starts TLS first (`NBD_OPT_STARTTLS`) and checks the server's
/// certificate against the host name given.
pub fn list_exports<S: Read + Write>(
    s: S,
    tls: Option<(&super::tls::TlsClient, Option<&str>)>,
) -> Result<(bool, Vec<ExportInfo>)> {
    let mut c = Conn { s };
    let g = c.read_exact(18)?;
    if g[0..8] != NBDMAGIC.to_be_bytes() || g[8..16] != IHAVEOPT.to_be_bytes() {
        return Err(proto("Server is not a newstyle NBD server"));
    }
    let flags = u16::from_be_bytes([g[16], g[17]]);
    let mut cflags = NBD_FLAG_C_FIXED_NEWSTYLE;
    if flags & NBD_FLAG_NO_ZEROES != 0 {
        cflags |= NBD_FLAG_C_NO_ZEROES;
    }
    c.s.write_all(&cflags.to_be_bytes())
        .map_err(|e| Error::io("writing to the server", e))?;
    match tls {
        None => list_options(c),
        Some((client, host)) => {
            c.send_opt(NBD_OPT_STARTTLS, &[])?;
            let (t, _) = c.reply(NBD_OPT_STARTTLS)?;
            if t != NBD_REP_ACK {
                return Err(proto("Server don't support STARTTLS option"));
            }
            let s = client.connect(c.s, host)?;
            list_options(Conn { s })
        }
    }
}

/// The option phase of [`list_exports`], after the greeting (and TLS).
fn list_options<S: Read + Write>(mut c: Conn<S>) -> Result<(bool, Vec<ExportInfo>)> {
    c.send_opt(NBD_OPT_EXTENDED_HEADERS, &[])?;
    let mut extended = c.reply(NBD_OPT_EXTENDED_HEADERS)?.0 == NBD_REP_ACK;
    if !extended {
        c.send_opt(NBD_OPT_STRUCTURED_REPLY, &[])?;
        let _ = c.reply(NBD_OPT_STRUCTURED_REPLY)?;
        extended = false;
    }
    c.send_opt(NBD_OPT_LIST, &[])?;
    let mut names = Vec::new();
    loop {
        let (t, d) = c.reply(NBD_OPT_LIST)?;
        match t {
            NBD_REP_SERVER if d.len() >= 4 => {
                let n = (u32::from_be_bytes(d[0..4].try_into().unwrap_or_default()) as usize)
                    .min(d.len() - 4);
                names.push(d[4..4 + n].to_vec());
            }
            NBD_REP_ACK => break,
            NBD_REP_ERR_TLS_REQD => {
                return Err(proto(format!(
                    "TLS negotiation required before option {NBD_OPT_LIST} (list)\n\
                     Did you forget a valid tls-creds?\nserver reported: {}",
                    String::from_utf8_lossy(&d)
                )))
            }
            t if t & NBD_REP_FLAG_ERROR != 0 => {
                return Err(proto(format!(
                    "Server refused to list exports: {}",
                    String::from_utf8_lossy(&d)
                )))
            }
            _ => return Err(proto("Unexpected reply to NBD_OPT_LIST")),
        }
    }
    let mut out = Vec::new();
    for name in names {
        let mut info = ExportInfo {
            name: String::from_utf8_lossy(&name).into_owned(),
            ..ExportInfo::default()
        };
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(&name);
        d.extend_from_slice(&3u16.to_be_bytes());
        for i in [NBD_INFO_NAME, NBD_INFO_DESCRIPTION, NBD_INFO_BLOCK_SIZE] {
            d.extend_from_slice(&i.to_be_bytes());
        }
        c.send_opt(NBD_OPT_INFO, &d)?;
        loop {
            let (t, d) = c.reply(NBD_OPT_INFO)?;
            if t == NBD_REP_ACK || t & NBD_REP_FLAG_ERROR != 0 {
                break;
            }
            if t != NBD_REP_INFO || d.len() < 2 {
                continue;
            }
            match u16::from_be_bytes([d[0], d[1]]) {
                NBD_INFO_EXPORT if d.len() >= 12 => {
                    info.size = u64::from_be_bytes(d[2..10].try_into().unwrap_or_default());
                    info.flags = u16::from_be_bytes([d[10], d[11]]);
                }
                NBD_INFO_DESCRIPTION => {
                    info.description = Some(String::from_utf8_lossy(&d[2..]).into_owned())
                }
                NBD_INFO_BLOCK_SIZE if d.len() >= 14 => {
                    let u =
                        |i: usize| u32::from_be_bytes(d[i..i + 4].try_into().unwrap_or_default());
                    info.block_sizes = Some((u(2), u(6), u(10)));
                }
                _ => {}
            }
        }
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(&name);
        d.extend_from_slice(&0u32.to_be_bytes());
        c.send_opt(NBD_OPT_LIST_META_CONTEXT, &d)?;
        loop {
            let (t, d) = c.reply(NBD_OPT_LIST_META_CONTEXT)?;
            if t == NBD_REP_META_CONTEXT && d.len() >= 4 {
                info.contexts
                    .push(String::from_utf8_lossy(&d[4..]).into_owned());
            } else {
                break;
            }
        }
        out.push(info);
    }
    let _ = c.send_opt(NBD_OPT_ABORT, &[]);
    let _ = c.reply(NBD_OPT_ABORT);
    Ok((extended, out))
}

/// qemu-nbd's names for transmission flags, in bit order.
const FLAG_NAMES: [(u16, &str); 12] = [
    (NBD_FLAG_READ_ONLY, "readonly"),
    (NBD_FLAG_SEND_FLUSH, "flush"),
    (NBD_FLAG_SEND_FUA, "fua"),
    (NBD_FLAG_ROTATIONAL, "rotational"),
    (NBD_FLAG_SEND_TRIM, "trim"),
    (NBD_FLAG_SEND_WRITE_ZEROES, "zeroes"),
    (NBD_FLAG_SEND_DF, "df"),
    (NBD_FLAG_CAN_MULTI_CONN, "multi"),
    (NBD_FLAG_SEND_RESIZE, "resize"),
    (NBD_FLAG_SEND_CACHE, "cache"),
    (NBD_FLAG_SEND_FAST_ZERO, "fast-zero"),
    (NBD_FLAG_BLOCK_STATUS_PAYLOAD, "block-status-payload"),
];

/// Format a listing as `qemu-nbd -L` does.
pub fn format_list(extended: bool, exports: &[ExportInfo]) -> String {
    let mut s = format!("exports available: {}\n", exports.len());
    for e in exports {
        s += &format!(" export: '{}'\n", e.name);
        if let Some(d) = &e.description {
            s += &format!("  description: {d}\n");
        }
        s += &format!("  size:  {}\n", e.size);
        let names: Vec<&str> = FLAG_NAMES
            .iter()
            .filter(|(b, _)| e.flags & b != 0)
            .map(|(_, n)| *n)
            .collect();
        s += &format!("  flags: {:#x} ( {} )\n", e.flags, names.join(" "));
        if let Some((min, opt, max)) = e.block_sizes {
            s += &format!("  min block: {min}\n  opt block: {opt}\n  max block: {max}\n");
        }
        s += &format!(
            "  transaction size: {}\n",
            if extended { "64-bit" } else { "32-bit" }
        );
        s += &format!("  available meta contexts: {}\n", e.contexts.len());
        for c in &e.contexts {
            s += &format!("   {c}\n");
        }
    }
    s
}

/// Where an NBD URI points: `nbd://HOST[:PORT][/EXPORT]` or
/// `nbd+unix:///[EXPORT]?socket=PATH` (the forms qemu and libnbd accept).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uri {
    pub target: Target,
    pub export: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Tcp(String, u16),
    Unix(String),
}

impl Uri {
    pub fn parse(uri: &str) -> Result<Uri> {
        let bad = || proto(format!("invalid NBD URI '{uri}'"));
        let (scheme, rest) = uri.split_once("://").ok_or_else(bad)?;
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (auth, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let export = path.to_string();
        match scheme {
            "nbd" => {
                let (host, port) = match auth.rsplit_once(':') {
                    Some((h, p)) if !h.ends_with(':') => (h, p.parse::<u16>().map_err(|_| bad())?),
                    _ => (auth, 10809),
                };
                let host = host.trim_start_matches('[').trim_end_matches(']');
                if host.is_empty() {
                    return Err(bad());
                }
                Ok(Uri {
                    target: Target::Tcp(host.to_string(), port),
                    export,
                })
            }
            "nbd+unix" => {
                let sock = query
                    .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("socket=")))
                    .ok_or_else(bad)?;
                Ok(Uri {
                    target: Target::Unix(sock.to_string()),
                    export,
                })
            }
            _ => Err(bad()),
        }
    }
}

/// One end of a negotiated connection in the transmission phase, with simple replies.
pub struct Opened<S> {
    pub stream: S,
    pub size: u64,
    pub flags: u16,
}

/// Negotiate `export` with `NBD_OPT_GO` (fixed newstyle, no structured replies: every reply is
/// a simple one, READ data follows its 16-byte header).
pub fn open_export<S: Read + Write>(s: S, export: &str) -> Result<Opened<S>> {
    let mut c = Conn { s };
    let g = c.read_exact(18)?;
    if g[0..8] != NBDMAGIC.to_be_bytes() || g[8..16] != IHAVEOPT.to_be_bytes() {
        return Err(proto("Server is not a newstyle NBD server"));
    }
    let flags = u16::from_be_bytes([g[16], g[17]]);
    let mut cflags = NBD_FLAG_C_FIXED_NEWSTYLE;
    if flags & NBD_FLAG_NO_ZEROES != 0 {
        cflags |= NBD_FLAG_C_NO_ZEROES;
    }
    c.s.write_all(&cflags.to_be_bytes())
        .map_err(|e| Error::io("writing to the server", e))?;
    let mut d = (export.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(export.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    c.send_opt(NBD_OPT_GO, &d)?;
    let mut size_flags = None;
    loop {
        let (t, d) = c.reply(NBD_OPT_GO)?;
        match t {
            NBD_REP_ACK => break,
            NBD_REP_INFO
                if d.len() >= 12 && u16::from_be_bytes([d[0], d[1]]) == NBD_INFO_EXPORT =>
            {
                size_flags = Some((
                    u64::from_be_bytes(d[2..10].try_into().unwrap_or_default()),
                    u16::from_be_bytes([d[10], d[11]]),
                ));
            }
            NBD_REP_INFO => {}
            t if t & NBD_REP_FLAG_ERROR != 0 => {
                return Err(proto(format!(
                    "Server refused export '{export}': {}",
                    String::from_utf8_lossy(&d)
                )))
            }
            _ => return Err(proto("Unexpected reply to NBD_OPT_GO")),
        }
    }
    let (size, flags) =
        size_flags.ok_or_else(|| proto("Server sent no export information for NBD_OPT_GO"))?;
    Ok(Opened {
        stream: c.s,
        size,
        flags,
    })
}

/// Append a compact request header (and nothing else) to `out`.
pub fn encode_request(out: &mut Vec<u8>, cmd: u16, cookie: u64, offset: u64, len: u32) {
    out.extend_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
    out.extend_from_slice(&cmd.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

/// A simple reply header: (error, cookie).
pub fn decode_simple_reply(h: &[u8; 16]) -> Result<(u32, u64)> {
    if h[0..4] != NBD_SIMPLE_REPLY_MAGIC.to_be_bytes() {
        return Err(proto("Unexpected reply magic from the server"));
    }
    let err = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
    let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap_or_default());
    Ok((err, cookie))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_parse_like_qemu_and_libnbd() {
        assert_eq!(
            Uri::parse("nbd+unix:///exp?socket=/tmp/s").unwrap(),
            Uri {
                target: Target::Unix("/tmp/s".into()),
                export: "exp".into()
            }
        );
        assert_eq!(
            Uri::parse("nbd://127.0.0.1:10900/").unwrap(),
            Uri {
                target: Target::Tcp("127.0.0.1".into(), 10900),
                export: String::new()
            }
        );
        assert_eq!(
            Uri::parse("nbd://localhost").unwrap().target,
            Target::Tcp("localhost".into(), 10809)
        );
        assert!(Uri::parse("nbd+unix:///").is_err());
        assert!(Uri::parse("http://x/").is_err());
    }
}
