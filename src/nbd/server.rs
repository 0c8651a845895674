//! Sockets and threads: listeners, the negotiation thread of each connection, and the
//! threaded transmission driver (the other driver is [`super::plane`]).
//!
//! A [`Server`] owns its listeners (TCP, Unix, a socket-activation fd), a small worker pool
//! shared by every connection and, unless the portable engine was asked for, the ring data
//! planes. Each connection starts on a thread of its own that runs the handshake (under a time
//! limit). A plain socket connection then moves to a data plane (see `plane.rs`); TLS
//! connections, and every connection when there are no planes, stay on their thread for
//! transmission (the threaded path):
//!
//! The thread decodes requests as they arrive and runs each where `dispatch::route` says. Reads
//! the page cache can answer (up to 256 KiB) and small writes without FUA are executed right
//! there: no thread hand-off, and their replies are queued and leave in one vectored write before
//! the thread next waits for the socket. Everything else (cache misses, big requests, flushes,
//! zeroing, trims, block status) goes to the pool; workers execute it against the shared export
//! and write the reply under the connection's writer lock as soon as it is ready, so replies leave
//! in completion order (clients match them by cookie). Per connection, the number of requests in
//! flight on the workers and the bytes they may hold are bounded (`dispatch.rs`); the reader waits
//! while a bound is reached.
//!
//! With TLS configured, `NBD_OPT_STARTTLS` swaps the connection's stream for a
//! [`super::tls::TlsStream`] in the middle of the handshake loop; the rest of the driver does
//! not know the difference. The TLS handshake counts against the same negotiation deadline.
//!
//! Process behaviour follows qemu-nbd: at most `shared` clients at once (0 = no limit; further
//! clients wait in the listen backlog), and beyond that at most `max_connections` sockets open
//! at once, negotiating or not (a client past that cap is closed at once, so a crowd of idle
//! connections cannot keep others waiting — qemu CVE-2024-7409), the server exits when the last client that completed
//! negotiation disconnects unless `persistent`, and SIGTERM/SIGINT end it cleanly (Unix socket
//! files are removed).
//!
//! Why one file of about 1,300 lines: the accept loop, the negotiation thread and the threaded
//! driver share one set of per-connection state (the `Inflight` bounds, the writer lock, the
//! stop pipe and the `ConnEnd` a connection reports) and one shutdown protocol; read apart they
//! hide who wakes whom. The protocol itself is not here (`handshake.rs`, `transmission.rs`,
//! `session.rs`), nor the dispatch policy (`dispatch.rs`).

use super::dispatch::{job_cost, route, Pool, Route, MAX_INFLIGHT, MAX_JOB_BYTES_THREADED};
use super::export::{Completion, ExportSet, Wait};
use super::handshake::{self, Handshake, Outcome, Tls};
use super::reply::ReplyBatch;
use super::session::Session;
use super::socket::Socket;
use super::tls::{TlsServer, TlsStream};
use super::transmission::{self, Command, Decoded, Limits, Payload};
use crate::error::{Error, Result};
use crate::log::{self, Level};
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// A listening socket.
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    /// The path is removed when the server stops (when set).
    Unix(UnixListener, Option<PathBuf>),
}

impl Listener {
    fn fd(&self) -> RawFd {
        match self {
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Unix(l, _) => l.as_raw_fd(),
        }
    }

    /// Accept one connection (waiting for it unless the listener is non-blocking); the
    /// connection itself is blocking.
    pub(crate) fn accept(&self) -> io::Result<Stream> {
        match self {
            Listener::Tcp(l) => {
                let (s, _) = l.accept()?;
                s.set_nonblocking(false)?;
                let _ = s.set_nodelay(true);
                Ok(Stream::from(s))
            }
            Listener::Unix(l, _) => {
                let (s, _) = l.accept()?;
                s.set_nonblocking(false)?;
                Ok(Stream::from(s))
            }
        }
    }
}

/// Bind a TCP listener (qemu-nbd's `-b`/`-p`).
pub fn listen_tcp(addr: &str, port: u16) -> Result<Listener> {
    let host = if addr.contains(':') && !addr.starts_with('[') {
        format!("[{addr}]:{port}")
    } else {
        format!("{addr}:{port}")
    };
    let l = TcpListener::bind(&host)
        .map_err(|e| Error::io(format!("Failed to bind socket to {host}"), e))?;
    Ok(Listener::Tcp(l))
}

/// Bind a Unix socket listener (qemu-nbd's `-k`); an existing socket file is replaced.
pub fn listen_unix(path: &str) -> Result<Listener> {
    if !path.starts_with('/') {
        return Err(Error::new(
            crate::ErrorKind::InvalidArgument,
            "socket path must be absolute",
        ));
    }
    if let Ok(md) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if md.file_type().is_socket() {
            let _ = std::fs::remove_file(path);
        }
    }
    let l = UnixListener::bind(path)
        .map_err(|e| Error::io(format!("Failed to bind socket to {path}"), e))?;
    Ok(Listener::Unix(l, Some(PathBuf::from(path))))
}

/// The listener passed by systemd-style socket activation (`LISTEN_PID` equal to our pid,
/// `LISTEN_FDS` = 1, fd 3), if any. The variables are removed from the environment.
pub fn socket_activation() -> Result<Option<Listener>> {
    let pid = std::env::var("LISTEN_PID").ok();
    let fds = std::env::var("LISTEN_FDS").ok();
    let (Some(pid), Some(fds)) = (pid, fds) else {
        return Ok(None);
    };
    if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
        return Ok(None);
    }
    std::env::remove_var("LISTEN_PID");
    std::env::remove_var("LISTEN_FDS");
    std::env::remove_var("LISTEN_FDNAMES");
    let n: u32 = fds
        .trim()
        .parse()
        .map_err(|_| Error::new(crate::ErrorKind::InvalidArgument, "invalid LISTEN_FDS"))?;
    if n != 1 {
        return Err(Error::unsupported(format!(
            "qnbd does not support socket activation with LISTEN_FDS > 1 (got {n})"
        )));
    }
    match crate::io::sys::take_activation_socket() {
        Ok(crate::io::sys::Activated::Unix(l)) => Ok(Some(Listener::Unix(l, None))),
        Ok(crate::io::sys::Activated::Tcp(l)) => Ok(Some(Listener::Tcp(l))),
        Err(_) => Err(Error::new(
            crate::ErrorKind::InvalidArgument,
            "Socket activation failed: invalid file descriptor fd = 3",
        )),
    }
}

/// The stream a connection speaks NBD over: its socket, or TLS over it after
/// `NBD_OPT_STARTTLS`. The threaded driver reads, writes, sets timeouts and shuts down
/// through it.
#[derive(Debug)]
pub enum Stream {
    Plain(Socket),
    Tls(TlsStream),
}

impl Stream {
    /// Another handle on the same stream (a reader, a writer and a control handle share one
    /// connection).
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Plain(s) => Stream::Plain(s.try_clone()?),
            Stream::Tls(t) => Stream::Tls(t.clone()),
        })
    }

    pub fn set_timeout(&self, d: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.set_timeout(d),
            Stream::Tls(t) => {
                t.set_timeout(d);
                Ok(())
            }
        }
    }

    pub fn shutdown(&self) {
        match self {
            Stream::Plain(s) => s.shutdown(),
            Stream::Tls(t) => t.shutdown(),
        }
    }

    /// The client's address for the log.
    pub fn peer(&self) -> String {
        match self {
            Stream::Plain(s) => s.peer(),
            Stream::Tls(_) => "tls".to_string(),
        }
    }

    /// The plain socket, for a TLS upgrade or a data plane (`None` once TLS runs over it).
    pub fn socket(&self) -> Option<io::Result<Socket>> {
        match self {
            Stream::Plain(s) => Some(s.try_clone()),
            Stream::Tls(_) => None,
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(t) => t.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(t) => t.write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write_vectored(bufs),
            Stream::Tls(t) => t.write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(t) => t.flush(),
        }
    }
}

impl From<UnixStream> for Stream {
    fn from(s: UnixStream) -> Stream {
        Stream::Plain(Socket::Unix(s))
    }
}

impl From<TcpStream> for Stream {
    fn from(s: TcpStream) -> Stream {
        Stream::Plain(Socket::Tcp(s))
    }
}

/// Requests in flight on one connection.
#[derive(Default)]
struct Inflight {
    state: Mutex<(usize, usize)>,
    cv: Condvar,
}

impl Inflight {
    fn acquire(&self, bytes: usize) {
        let Ok(mut g) = self.state.lock() else { return };
        while g.0 >= MAX_INFLIGHT || (g.0 > 0 && g.1 + bytes > MAX_JOB_BYTES_THREADED) {
            g = match self.cv.wait(g) {
                Ok(g) => g,
                Err(_) => return,
            };
        }
        g.0 += 1;
        g.1 += bytes;
    }

    fn release(&self, bytes: usize) {
        if let Ok(mut g) = self.state.lock() {
            g.0 = g.0.saturating_sub(1);
            g.1 = g.1.saturating_sub(bytes);
        }
        self.cv.notify_all();
    }

    fn wait_idle(&self) {
        let Ok(mut g) = self.state.lock() else { return };
        while g.0 > 0 {
            g = match self.cv.wait(g) {
                Ok(g) => g,
                Err(_) => return,
            };
        }
    }
}

/// How a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnEnd {
    /// Closed before entering transmission.
    NotNegotiated,
    /// Entered transmission, then closed.
    Negotiated,
    /// Entered transmission on a data plane, which reports the end itself.
    HandedOver,
}

/// Called once per connection when it ends (a plane calls it for connections handed over).
pub type EndHook = Arc<dyn Fn(ConnEnd) + Send + Sync>;

/// Options of one connection.
#[derive(Clone)]
pub struct ConnConfig {
    pub exports: Arc<ExportSet>,
    pub handshake_limit: Option<Duration>,
    /// When set, TLS is required before any other option.
    pub tls: Option<Arc<TlsServer>>,
    /// Ring data planes that plain connections move to after negotiation (`None`: every
    /// connection is served on its own thread).
    #[cfg(feature = "uring")]
    pub planes: Option<Arc<super::plane::Planes>>,
}

/// Serve one client over `reader` / `writer`. `ctl` sets timeouts and shuts the stream down.
/// Negotiation runs here (under the handshake limit); then a plain socket connection moves to
/// a data plane when `cfg` has planes (`end` is handed over with it), and any other stays on
/// this thread for the threaded driver ([`transmit`]).
pub fn serve_connection(
    reader: Box<dyn Read + Send>,
    writer: Box<dyn Write + Send>,
    ctl: Option<Stream>,
    cfg: &ConnConfig,
    pool: &Pool,
    end: Option<&EndHook>,
    conn: log::Conn,
) -> ConnEnd {
    let n = match negotiate(reader, writer, ctl, cfg, &conn) {
        Ok(n) => n,
        Err(e) => return e,
    };
    let Negotiated {
        mut session,
        pending,
        reader,
        writer,
        ctl,
    } = n;
    session.conn = Arc::new(conn);
    log::event(
        Level::Info,
        "negotiated",
        Some(&session.conn),
        &format!(
            "export '{}': {} replies, {} metadata context(s)",
            session.export.name,
            match session.mode {
                super::transmission::HeaderMode::Simple => "simple",
                super::transmission::HeaderMode::Structured => "structured",
                super::transmission::HeaderMode::Extended => "extended",
            },
            session.contexts.len()
        ),
    );
    let export = session.export.clone();
    if let Some(s) = &export.stats {
        s.connection_opened();
    }
    #[cfg(feature = "uring")]
    let (session, pending) = match (&cfg.planes, &ctl, end) {
        // a TLS stream has no plain socket to hand over: it stays on this thread
        (Some(planes), Some(c), Some(end)) => match c.socket() {
            Some(Ok(socket)) => {
                let end = end.clone();
                let ended = export.clone();
                let tag = session.conn.clone();
                let h = super::plane::Handover {
                    socket,
                    session,
                    pending,
                    on_end: Box::new(move || {
                        if let Some(s) = &ended.stats {
                            s.connection_closed();
                        }
                        log::event(Level::Info, "closed", Some(&tag), "connection closed");
                        end(ConnEnd::Negotiated)
                    }),
                };
                match planes.hand_over(h) {
                    Ok(()) => return ConnEnd::HandedOver,
                    Err(h) => (h.session, h.pending),
                }
            }
            _ => (session, pending),
        },
        _ => (session, pending),
    };
    #[cfg(not(feature = "uring"))]
    let _ = end;

    let tag = session.conn.clone();
    let end = transmit(reader, writer, ctl, pool, session, pending);
    if let Some(s) = &export.stats {
        s.connection_closed();
    }
    log::event(Level::Info, "closed", Some(&tag), "connection closed");
    end
}

/// What a finished negotiation leaves: the session, bytes the client pipelined after it, and
/// the streams (TLS ones after STARTTLS).
struct Negotiated {
    session: Session,
    pending: Vec<u8>,
    reader: Box<dyn Read + Send>,
    writer: SharedWriter,
    ctl: Option<Arc<Stream>>,
}

fn shutdown(ctl: &Option<Arc<Stream>>) {
    if let Some(c) = ctl {
        c.shutdown();
    }
}

fn send(w: &SharedWriter, bytes: &[u8]) -> io::Result<()> {
    let mut g = w
        .lock()
        .map_err(|_| io::Error::other("writer lock poisoned"))?;
    g.write_all(bytes)?;
    g.flush()
}

/// The option phase: greeting, options (STARTTLS swapping the streams), until the client
/// enters transmission (`Ok`) or the connection ends (`Err`, always `NotNegotiated`).
fn negotiate(
    mut reader: Box<dyn Read + Send>,
    writer: Box<dyn Write + Send>,
    ctl: Option<Stream>,
    cfg: &ConnConfig,
    conn: &log::Conn,
) -> std::result::Result<Negotiated, ConnEnd> {
    let failed = |why: &str| {
        log::event(
            Level::Warn,
            "negotiation-failed",
            Some(conn),
            &format!("option negotiation failed: {why}"),
        )
    };
    let mut writer: SharedWriter = Arc::new(Mutex::new(writer));
    let mut ctl: Option<Arc<Stream>> = ctl.map(Arc::from);
    let deadline = cfg.handshake_limit.map(|d| Instant::now() + d);
    let tls_mode = if cfg.tls.is_some() {
        Tls::Required
    } else {
        Tls::Off
    };
    let mut hs = Handshake::with_tls(cfg.exports.clone(), tls_mode);
    let mut buf = vec![0u8; 64 << 10];
    let mut pending: Vec<u8> = Vec::new();
    if let Some(c) = &ctl {
        let _ = c.set_timeout(cfg.handshake_limit);
    }
    if send(&writer, &handshake::greeting()).is_err() {
        shutdown(&ctl);
        return Err(ConnEnd::NotNegotiated);
    }
    let session: Session = loop {
        if let (Some(d), Some(c)) = (deadline, &ctl) {
            let left = d.saturating_duration_since(Instant::now());
            if left.is_zero() {
                failed("handshake timed out");
                shutdown(&ctl);
                return Err(ConnEnd::NotNegotiated);
            }
            let _ = c.set_timeout(Some(left));
        }
        let n = match reader.read(&mut buf) {
            // a hang-up mid-negotiation (EOF, or a reset from a client that closed with our
            // greeting unread: health checks do) is the client's choice, not a failure
            Ok(0) => {
                log::event(
                    Level::Info,
                    "negotiation-closed",
                    Some(conn),
                    "client closed the connection during negotiation",
                );
                shutdown(&ctl);
                return Err(ConnEnd::NotNegotiated);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
                ) =>
            {
                log::event(
                    Level::Info,
                    "negotiation-closed",
                    Some(conn),
                    &format!("client closed the connection during negotiation ({e})"),
                );
                shutdown(&ctl);
                return Err(ConnEnd::NotNegotiated);
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                let why = if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) {
                    "handshake timed out".to_string()
                } else {
                    e.to_string()
                };
                failed(&why);
                shutdown(&ctl);
                return Err(ConnEnd::NotNegotiated);
            }
        };
        let mut out = Vec::new();
        let (used, outcome) = hs.feed(&buf[..n], &mut out);
        let sent = out.is_empty() || send(&writer, &out).is_ok();
        match outcome {
            Outcome::Continue if sent => {}
            Outcome::Continue => {
                shutdown(&ctl);
                return Err(ConnEnd::NotNegotiated);
            }
            Outcome::StartTls => {
                // what the client sent after STARTTLS in plaintext is dropped unread
                // (nbdkit CVE-2021-3716): only bytes that arrive over TLS are options
                if used < n {
                    log::event(
                        Level::Info,
                        "starttls-discard",
                        Some(conn),
                        &format!(
                            "discarding {} plaintext bytes sent after NBD_OPT_STARTTLS",
                            n - used
                        ),
                    );
                }
                let upgraded = match (sent, &cfg.tls, &ctl) {
                    (true, Some(tls), Some(c)) => match c.socket() {
                        Some(Ok(sock)) => tls.accept(sock, deadline),
                        Some(Err(e)) => Err(e.to_string()),
                        None => Err("this transport cannot carry TLS".into()),
                    },
                    _ => Err("TLS is not available on this connection".into()),
                };
                match upgraded {
                    Ok(t) => {
                        log::event(
                            Level::Info,
                            "tls",
                            Some(conn),
                            &format!(
                                "TLS established ({}; client identity: {})",
                                t.summary(),
                                t.identity().unwrap_or("none")
                            ),
                        );
                        reader = Box::new(t.clone());
                        writer = Arc::new(Mutex::new(Box::new(t.clone())));
                        ctl = Some(Arc::new(Stream::Tls(t)));
                    }
                    Err(why) => {
                        failed(&why);
                        shutdown(&ctl);
                        return Err(ConnEnd::NotNegotiated);
                    }
                }
            }
            Outcome::Ready(s) => {
                pending.extend_from_slice(&buf[used..n]);
                if !sent {
                    shutdown(&ctl);
                    return Err(ConnEnd::NotNegotiated);
                }
                break s;
            }
            Outcome::Close(why) => {
                failed(&why);
                shutdown(&ctl);
                return Err(ConnEnd::NotNegotiated);
            }
            Outcome::Abort => {
                log::event(
                    Level::Info,
                    "negotiation-aborted",
                    Some(conn),
                    "client ended the negotiation (NBD_OPT_ABORT)",
                );
                shutdown(&ctl);
                return Err(ConnEnd::NotNegotiated);
            }
        }
    };
    if let Some(c) = &ctl {
        let _ = c.set_timeout(None);
    }

    Ok(Negotiated {
        session,
        pending,
        reader,
        writer,
        ctl,
    })
}

/// The threaded transmission driver: decode requests from `reader` (after `pending`), run
/// small reads and writes here and everything else on `pool`, until DISC, EOF or an error.
fn transmit(
    mut reader: Box<dyn Read + Send>,
    writer: SharedWriter,
    ctl: Option<Arc<Stream>>,
    pool: &Pool,
    session: Session,
    pending: Vec<u8>,
) -> ConnEnd {
    let mut buf = vec![0u8; 64 << 10];
    let session = Arc::new(session);
    let inflight = Arc::new(Inflight::default());
    let broken = Arc::new(AtomicBool::new(false));
    let lim = Limits {
        size: session.export.size(),
        mode: session.mode,
        flags: session.flags,
        contexts: session.contexts.len(),
    };
    // inbuf[start..end] holds received bytes not yet decoded; inbuf only grows (no zeroing of
    // the read area on every socket read)
    let mut end = pending.len();
    let mut inbuf = pending;
    let mut start = 0usize;
    // Replies to reads answered on this thread, sent together before the next socket read.
    let mut batch = ReplyBatch::new();
    loop {
        if broken.load(Ordering::Relaxed) {
            break;
        }
        let (req, header_len, payload) =
            match transmission::decode_header(session.mode, &inbuf[start..end]) {
                Decoded::NeedMore(n) => {
                    if !batch.is_empty() && send_batch(&writer, &mut batch).is_err() {
                        break;
                    }
                    if !fill(&mut *reader, &mut inbuf, &mut start, &mut end, n) {
                        break;
                    }
                    continue;
                }
                Decoded::Fatal(why) => {
                    log::event(
                        Level::Warn,
                        "protocol-error",
                        Some(&session.conn),
                        &format!("Request handling failed: {why}; closing the connection"),
                    );
                    break;
                }
                Decoded::Request {
                    req,
                    header_len,
                    payload,
                } => (req, header_len, payload),
            };
        start += header_len;
        let mut data = None;
        let mut drained = false;
        match payload {
            Payload::None => {}
            Payload::Take(n) => {
                if !fill(&mut *reader, &mut inbuf, &mut start, &mut end, n) {
                    break;
                }
                data = Some(inbuf[start..start + n].to_vec());
                start += n;
            }
            Payload::Drain(mut n) => {
                drained = true;
                let avail = ((end - start) as u64).min(n);
                start += avail as usize;
                n -= avail;
                let mut ok = true;
                while n > 0 {
                    let k = (n as usize).min(buf.len());
                    match reader.read(&mut buf[..k]) {
                        Ok(0) | Err(_) => {
                            ok = false;
                            break;
                        }
                        Ok(r) => n -= r as u64,
                    }
                }
                if !ok {
                    break;
                }
            }
        }
        if start == end {
            end = 0;
            start = 0;
        }
        let cmd = match transmission::validate(&req, data, drained, &lim) {
            Ok(c) => c,
            Err(rej) => {
                log::event(
                    Level::Info,
                    "request-refused",
                    Some(&session.conn),
                    &format!("request {:#x} refused: {}", req.cookie, rej.msg),
                );
                session.rejected();
                let mut out = Vec::new();
                // a READ error must be structured once structured replies are on
                transmission::encode_error(
                    &mut out,
                    session.mode,
                    req.cookie,
                    req.offset,
                    rej.errno,
                    &rej.msg,
                );
                if send(&writer, &out).is_err() {
                    break;
                }
                continue;
            }
        };
        let started = session.begin(&cmd);
        // Reads the page cache can answer and small buffered writes are answered here, without
        // a thread hand-off; their replies go out in one vectored write per batch of requests.
        match route(&cmd, || session.export.backend.writes_buffered()) {
            Route::Disconnect => break,
            Route::PageCacheRead { offset, length, df } => {
                let done = session.read_into(
                    req.cookie,
                    req.offset,
                    offset,
                    length,
                    df,
                    &mut batch,
                    Wait::Never,
                    started,
                );
                if done == Completion::Done {
                    if (batch.len() >= BATCH_BYTES || batch.pieces() >= BATCH_PIECES)
                        && send_batch(&writer, &mut batch).is_err()
                    {
                        break;
                    }
                    continue;
                }
            }
            Route::InlineWrite => {
                let out = session.execute(req.cookie, req.offset, cmd, started);
                batch.push_head(|o| o.extend_from_slice(&out));
                if (batch.len() >= BATCH_BYTES || batch.pieces() >= BATCH_PIECES)
                    && send_batch(&writer, &mut batch).is_err()
                {
                    break;
                }
                continue;
            }
            Route::Worker => {}
        }
        let cost = job_cost(&cmd);
        inflight.acquire(cost);
        let (s, w, inf, br, c2) = (
            session.clone(),
            writer.clone(),
            inflight.clone(),
            broken.clone(),
            ctl.clone(),
        );
        let cookie = req.cookie;
        let req_offset = req.offset;
        pool.run(Box::new(move || {
            let sent = if let Command::Read { offset, length, df } = cmd {
                WORKER_BATCH.with(|b| {
                    let mut b = b.borrow_mut();
                    s.read_into(
                        cookie,
                        req_offset,
                        offset,
                        length,
                        df,
                        &mut b,
                        Wait::Block,
                        started,
                    );
                    send_batch(&w, &mut b)
                })
            } else {
                let out = s.execute(cookie, req_offset, cmd, started);
                if out.is_empty() {
                    Ok(())
                } else {
                    send(&w, &out)
                }
            };
            if sent.is_err() {
                br.store(true, Ordering::Relaxed);
                if let Some(c) = &c2 {
                    c.shutdown();
                }
            }
            inf.release(cost);
        }));
    }
    if !batch.is_empty() {
        let _ = send_batch(&writer, &mut batch);
    }
    inflight.wait_idle();
    shutdown(&ctl);
    ConnEnd::Negotiated
}

/// Replies queued on the connection thread are sent once this many bytes or pieces are queued
/// (or before the thread next waits for the socket).
const BATCH_BYTES: usize = 256 << 10;
const BATCH_PIECES: usize = 256;
/// I/O vectors per `writev` (Linux's `IOV_MAX`).
const MAX_IOV: usize = 1024;

thread_local! {
    /// A worker's reply buffers, reused from one request to the next.
    static WORKER_BATCH: std::cell::RefCell<ReplyBatch> = std::cell::RefCell::new(ReplyBatch::new());
}

type SharedWriter = Arc<Mutex<Box<dyn Write + Send>>>;

/// Write a batch of replies under the connection's writer lock with vectored writes, then
/// recycle its buffers.
fn send_batch(w: &SharedWriter, batch: &mut ReplyBatch) -> io::Result<()> {
    let res = (|| {
        let mut slices = batch.slices();
        let mut g = w
            .lock()
            .map_err(|_| io::Error::other("writer lock poisoned"))?;
        let mut rest: &mut [io::IoSlice<'_>] = &mut slices;
        while !rest.is_empty() {
            let k = rest.len().min(MAX_IOV);
            match g.write_vectored(&rest[..k]) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
                Ok(n) => io::IoSlice::advance_slices(&mut rest, n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        g.flush()
    })();
    batch.clear();
    res
}

/// Make sure `inbuf[start..end]` holds at least `need` bytes; false on EOF or error.
fn fill(
    reader: &mut (dyn Read + Send),
    inbuf: &mut Vec<u8>,
    start: &mut usize,
    end: &mut usize,
    need: usize,
) -> bool {
    if *start > 0 && (*end - *start < need) {
        inbuf.copy_within(*start..*end, 0);
        *end -= *start;
        *start = 0;
    }
    while *end - *start < need {
        let want = (need - (*end - *start)).max(64 << 10);
        if inbuf.len() < *end + want {
            inbuf.resize(*end + want, 0);
        }
        match reader.read(&mut inbuf[*end..]) {
            Ok(0) => return false,
            Ok(n) => *end += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
    true
}

/// Server-wide options.
pub struct ServerConfig {
    pub conn: ConnConfig,
    /// Maximum simultaneous clients; 0 = unlimited.
    pub shared: usize,
    /// Maximum open connections, negotiating or not (0 = unlimited); further ones are closed
    /// as soon as they are accepted.
    pub max_connections: usize,
    /// Keep running after the last client disconnects.
    pub persistent: bool,
    pub workers: usize,
    /// Ring data planes to start (0: connections are served on threads, the portable path).
    /// When the kernel refuses the rings, connections are served on threads too.
    pub planes: usize,
    /// Called on the accept thread when the process gets SIGUSR1 (`serve --stats`).
    pub on_usr1: Option<Box<dyn Fn() + Send>>,
}

static WAKE_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(sig: libc::c_int) {
    let fd = WAKE_FD.load(Ordering::Relaxed);
    if fd >= 0 {
        let b = if sig == libc::SIGUSR1 { b'U' } else { b'S' };
        crate::io::sys::write_raw(fd, &[b]);
    }
}

fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    crate::io::sys::pipe(true).map_err(|e| Error::io("creating the wake-up pipe", e))
}

fn install_signal_handlers(wake_w: RawFd, usr1: bool) {
    WAKE_FD.store(wake_w, Ordering::Relaxed);
    let mut sigs = vec![libc::SIGTERM, libc::SIGINT, libc::SIGHUP];
    if usr1 {
        sigs.push(libc::SIGUSR1);
    }
    // the handler only calls write(2)
    crate::io::sys::install_signal_handler(&sigs, on_signal);
}

/// Why [`Server::run`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// SIGTERM / SIGINT / SIGHUP.
    Signal,
    /// The last client left (not persistent).
    LastClient,
}

pub struct Server {
    cfg: ServerConfig,
    listeners: Vec<Listener>,
    pool: Pool,
}

impl Server {
    pub fn new(mut cfg: ServerConfig, listeners: Vec<Listener>) -> Result<Server> {
        for l in &listeners {
            let r = match l {
                Listener::Tcp(t) => t.set_nonblocking(true),
                Listener::Unix(u, _) => u.set_nonblocking(true),
            };
            r.map_err(|e| Error::io("setting the listener non-blocking", e))?;
        }
        let pool = Pool::new(cfg.workers);
        #[cfg(feature = "uring")]
        if cfg.planes > 0 {
            match super::plane::Planes::start(cfg.planes, pool.clone()) {
                Ok(p) => cfg.conn.planes = Some(Arc::new(p)),
                Err(e) => {
                    log::event(
                        Level::Info,
                        "no-plane",
                        None,
                        &format!(
                            "ring data plane unavailable ({e}); serving connections on threads"
                        ),
                    );
                }
            }
        }
        Ok(Server {
            cfg,
            listeners,
            pool,
        })
    }

    /// Accept and serve clients until a signal, or until the last negotiated client leaves
    /// (unless persistent).
    pub fn run(self) -> Result<Stop> {
        // kept open for the life of the process: the signal handler and connection threads may
        // still write to it after `run` returns
        let (wake_r, wake_w) = pipe()?;
        let (wake_r, wake_w) = (wake_r.into_raw_fd(), wake_w.into_raw_fd());
        install_signal_handlers(wake_w, self.cfg.on_usr1.is_some());
        let active = Arc::new(Mutex::new(0usize));
        let mut next_id = 1u64;
        let stop = loop {
            let n_active = active.lock().map(|g| *g).unwrap_or(0);
            let accepting = self.cfg.shared == 0 || n_active < self.cfg.shared;
            let mut pfds = vec![libc::pollfd {
                fd: wake_r,
                events: libc::POLLIN,
                revents: 0,
            }];
            if accepting {
                for l in &self.listeners {
                    pfds.push(libc::pollfd {
                        fd: l.fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    });
                }
            }
            match crate::io::sys::poll(&mut pfds, -1) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::io("poll", e)),
            }
            if pfds[0].revents != 0 {
                let mut b = [0u8; 64];
                let n = crate::io::sys::read_raw(wake_r, &mut b);
                let got = &b[..n];
                if got.contains(&b'S') {
                    break Stop::Signal;
                }
                if got.contains(&b'U') {
                    if let Some(f) = &self.cfg.on_usr1 {
                        f();
                    }
                }
                if got.contains(&b'L') && !self.cfg.persistent {
                    let n_active = active.lock().map(|g| *g).unwrap_or(0);
                    if n_active == 0 {
                        break Stop::LastClient;
                    }
                }
            }
            if !accepting {
                continue;
            }
            for (i, l) in self.listeners.iter().enumerate() {
                if pfds.get(i + 1).is_none_or(|p| p.revents == 0) {
                    continue;
                }
                let conn = match l.accept() {
                    Ok(c) => c,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => {
                        log::event(Level::Error, "accept", None, &format!("accept failed: {e}"));
                        continue;
                    }
                };
                let over_cap = match active.lock() {
                    Ok(mut g) if self.cfg.max_connections == 0 || *g < self.cfg.max_connections => {
                        *g += 1;
                        false
                    }
                    _ => true,
                };
                if over_cap {
                    log::event(
                        Level::Info,
                        "over-limit",
                        Some(&log::Conn {
                            id: next_id,
                            peer: conn.peer(),
                        }),
                        &format!(
                            "too many connections (limit {}): closing a new client",
                            self.cfg.max_connections
                        ),
                    );
                    next_id += 1;
                    conn.shutdown();
                    continue;
                }
                let tag = log::Conn {
                    id: next_id,
                    peer: conn.peer(),
                };
                next_id += 1;
                log::event(Level::Debug, "accepted", Some(&tag), "connection accepted");
                let (cfg, pool, act) = (self.cfg.conn.clone(), self.pool.clone(), active.clone());
                let hook: EndHook = Arc::new(move |end: ConnEnd| {
                    if let Ok(mut g) = act.lock() {
                        *g = g.saturating_sub(1);
                    }
                    let b = if end == ConnEnd::Negotiated {
                        b'L'
                    } else {
                        b'C'
                    };
                    crate::io::sys::write_raw(wake_w, &[b]);
                });
                let spawned = thread::Builder::new()
                    .name("nbd-conn".into())
                    .spawn(move || {
                        let end = match (conn.try_clone(), conn.try_clone()) {
                            (Ok(r), Ok(c)) => serve_connection(
                                Box::new(r) as Box<dyn Read + Send>,
                                Box::new(conn) as Box<dyn Write + Send>,
                                Some(c),
                                &cfg,
                                &pool,
                                Some(&hook),
                                tag,
                            ),
                            _ => ConnEnd::NotNegotiated,
                        };
                        if end != ConnEnd::HandedOver {
                            hook(end);
                        }
                    });
                if spawned.is_err() {
                    log::event(
                        Level::Error,
                        "thread",
                        None,
                        "could not start a connection thread",
                    );
                    if let Ok(mut g) = active.lock() {
                        *g = g.saturating_sub(1);
                    }
                }
            }
        };
        for l in &self.listeners {
            if let Listener::Unix(_, Some(p)) = l {
                let _ = std::fs::remove_file(p);
            }
        }
        Ok(stop)
    }
}

/// Serve exactly one client on stdin/stdout (tests, fuzzing, inetd-style use).
pub fn serve_stdio(cfg: &ConnConfig, workers: usize) -> ConnEnd {
    let pool = Pool::new(workers);
    serve_connection(
        Box::new(io::stdin()),
        Box::new(io::stdout()),
        None,
        cfg,
        &pool,
        None,
        log::Conn {
            id: 0,
            peer: "stdio".into(),
        },
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::nbd::client::{decode_simple_reply, encode_request, open_export};
    use crate::nbd::wire::*;

    fn reply(s: &mut UnixStream, data: usize) -> (u32, u64, Vec<u8>) {
        let mut h = [0u8; 16];
        s.read_exact(&mut h).expect("a reply header");
        let (err, cookie) = decode_simple_reply(&h).expect("a simple reply");
        let mut d = vec![0u8; if err == 0 { data } else { 0 }];
        s.read_exact(&mut d).expect("the reply's data");
        (err, cookie, d)
    }

    /// Drive one connection over a socket pair against `cfg`'s export (the 1 MiB fuzz
    /// export: a writable raw image whose first 4 KiB are 0xab): negotiate, write, read it
    /// back, read past the end (refused, the connection goes on), flush, disconnect. Returns
    /// what the negotiation thread answered and what the end hook was told.
    pub(crate) fn scripted_client(cfg: ConnConfig, pool: Pool) -> (ConnEnd, ConnEnd) {
        let (server, client) = UnixStream::pair().unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let hook: EndHook = Arc::new(move |e| {
            let _ = tx.send(e);
        });
        let srv = thread::spawn(move || {
            let (r, c) = (server.try_clone().unwrap(), server.try_clone().unwrap());
            let end = serve_connection(
                Box::new(r),
                Box::new(server),
                Some(c.into()),
                &cfg,
                &pool,
                Some(&hook),
                log::Conn::default(),
            );
            if end != ConnEnd::HandedOver {
                hook(end);
            }
            end
        });
        let mut o = open_export(client, "").expect("negotiation");
        assert_eq!(o.size, 1 << 20);
        assert_eq!(o.flags & NBD_FLAG_READ_ONLY, 0);
        let s = &mut o.stream;
        let mut req = Vec::new();
        encode_request(&mut req, NBD_CMD_WRITE, 1, 8192, 4096);
        req.extend_from_slice(&[0x5c; 4096]);
        s.write_all(&req).unwrap();
        assert_eq!(reply(s, 0).0, 0, "WRITE");
        for (cookie, off, want) in [(2u64, 8192u64, 0x5cu8), (3, 0, 0xab), (4, 65536, 0)] {
            req.clear();
            encode_request(&mut req, NBD_CMD_READ, cookie, off, 4096);
            s.write_all(&req).unwrap();
            let (err, c, d) = reply(s, 4096);
            assert_eq!((err, c), (0, cookie));
            assert!(d.iter().all(|&b| b == want), "READ at {off}");
        }
        req.clear();
        encode_request(&mut req, NBD_CMD_READ, 5, 1 << 20, 512);
        s.write_all(&req).unwrap();
        assert_eq!(reply(s, 512).0, NBD_EINVAL, "READ past the end");
        req.clear();
        encode_request(&mut req, NBD_CMD_FLUSH, 6, 0, 0);
        s.write_all(&req).unwrap();
        assert_eq!(reply(s, 0), (0, 6, Vec::new()));
        req.clear();
        encode_request(&mut req, NBD_CMD_DISC, 7, 0, 0);
        s.write_all(&req).unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        assert!(rest.is_empty(), "bytes after DISC");
        let answered = srv.join().unwrap();
        let reported = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("the end was reported");
        (answered, reported)
    }

    /// The threaded driver serves a whole session and reports it negotiated.
    #[test]
    fn the_threaded_driver_serves_a_session() {
        let cfg = crate::testing::fuzz_export_config().unwrap();
        #[cfg(feature = "uring")]
        assert!(cfg.planes.is_none());
        let (answered, reported) = scripted_client(cfg, Pool::new(2));
        assert_eq!(
            (answered, reported),
            (ConnEnd::Negotiated, ConnEnd::Negotiated)
        );
    }

    /// A client that never finishes negotiating is dropped at the handshake limit.
    #[test]
    fn a_silent_client_is_dropped_at_the_handshake_limit() {
        let mut cfg = crate::testing::fuzz_export_config().unwrap();
        cfg.handshake_limit = Some(Duration::from_millis(200));
        let (server, mut client) = UnixStream::pair().unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let t = Instant::now();
        let srv = thread::spawn(move || {
            let (r, c) = (server.try_clone().unwrap(), server.try_clone().unwrap());
            serve_connection(
                Box::new(r),
                Box::new(server),
                Some(c.into()),
                &cfg,
                &Pool::new(1),
                None,
                log::Conn::default(),
            )
        });
        let mut greeting = Vec::new();
        let _ = client.read_to_end(&mut greeting);
        assert_eq!(&greeting[..8], b"NBDMAGIC");
        assert_eq!(srv.join().unwrap(), ConnEnd::NotNegotiated);
        assert!(t.elapsed() < Duration::from_secs(10));
    }
}
