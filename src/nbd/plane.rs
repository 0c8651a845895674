//! The ring data plane: transmission for plain (non-TLS) connections on event rings.
//!
//! A few plane threads (default: one per core) each own one [`EventRing`] that carries the
//! socket receives and sends of every connection assigned to it, the file reads of their
//! READs that miss the page cache, plus an eventfd read that wakes the plane when a worker finished a request or a new connection arrives. Connections
//! are handed over after negotiation (which stays on a short-lived thread, under its time
//! limit) and spread round-robin over the planes; the image is shared, so a multi-conn client
//! sees one image whichever plane serves it.
//!
//! Per connection, one receive and at most one send are in flight. Each turn of a plane's loop
//! decodes every complete request in the receive buffer, answers what needs no waiting right there
//! (where `dispatch::route` says: reads the page cache holds, via `preadv2(RWF_NOWAIT)`, and small
//! writes without FUA), queues their replies, and submits all the sends and receives of the turn
//! with one `io_uring_enter`, which also waits for the next completions. A READ the page cache
//! cannot answer is planned into (file, host offset) reads and zero runs and read on the ring
//! (`KIND_FILE`); one whose plan or read fails, or whose clusters were reused meanwhile, is read
//! again by a worker. Everything else that may wait for the disk or takes metadata locks for long
//! (big or FUA writes, flushes, zeroing, trims, block status) goes to the shared worker pool; the
//! worker posts the finished reply back to the plane, which sends it. Replies leave in completion
//! order; clients match cookies.
//!
//! Buffers: a connection's receive buffer and queued replies are owned by the ring while an
//! operation on them is in flight, and come back with the completion. Read data sits in
//! page-aligned buffers from a pool shared by the plane and its jobs, sent with `sendmsg`
//! straight from there. A write payload larger than the receive buffer is received directly
//! into the buffer the write command owns.
//!
//! Bounds per connection: at most [`MAX_INFLIGHT`] requests on the workers and the ring, holding
//! at most [`MAX_JOB_BYTES_PLANE`] (both in `dispatch.rs`; the last request admitted may go past
//! it), plus a bound on replies waiting for a slow reader (`MAX_QUEUED_REPLY`): the plane
//! stops decoding (and receiving) while any of them is reached.

use super::dispatch::{job_cost, route, Pool, Route, MAX_INFLIGHT, MAX_JOB_BYTES_PLANE};
use super::export::{AsyncPlan, Completion, Wait};
use super::reply::ReplyBatch;
use super::session::{self, Session};
use super::socket::Socket;
use super::stats::Started;
use super::transmission::{self, Command, Decoded, HeaderMode, Limits, Payload, RawRequest};
use crate::block::Segment;
use crate::io::buf::IoBuf;
use crate::io::uring::{EventRing, RingDone, RingOp, WakeFd};
use crate::log::{self, Level};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;

/// The receive buffer's usual size; a write payload that does not fit is received into its
/// own buffer.
const RECV_BUF: usize = 256 << 10;
/// Reply bytes queued or being sent per connection before the plane stops decoding. Small: a
/// client that keeps many reads in flight (nbdcopy: 64 x 256 KiB on each of 4 connections) must
/// not make the plane copy far ahead of the socket, or the reply buffers outgrow the pool and
/// every one is a fresh allocation (page faults) again.
const MAX_QUEUED_REPLY: usize = 1 << 20;
/// Empty reply batches a plane keeps for reuse.
const MAX_SPARE_BATCHES: usize = 4 * MAX_INFLIGHT;
/// Submission queue entries per plane ring.
pub(crate) const RING_ENTRIES: u32 = 256;

const WAKE_TOKEN: u64 = u64::MAX;
const KIND_RECV: u64 = 1;
const KIND_SEND: u64 = 2;
/// A receive into a big write's own payload buffer.
const KIND_RECV_BIG: u64 = 3;
/// A file read of a planned READ (`piece` says which).
const KIND_FILE: u64 = 4;
/// Data segments of one READ read on the ring at most (more: the workers read it).
const MAX_RING_SEGMENTS: usize = 256;

/// Ring tokens: bits 0-7 the kind, 8-23 a piece of a file read, 24-63 the connection or file
/// read's index.
fn token(idx: usize, piece: usize, kind: u64) -> u64 {
    ((idx as u64) << 24) | (((piece as u64) & 0xffff) << 8) | kind
}

fn untoken(t: u64) -> (usize, usize, u64) {
    ((t >> 24) as usize, ((t >> 8) & 0xffff) as usize, t & 0xff)
}

/// What a plane needs to take over a connection.
pub struct Handover {
    /// The negotiated plain connection.
    pub socket: Socket,
    pub session: Session,
    /// Bytes received after the end of negotiation (pipelined requests).
    pub pending: Vec<u8>,
    /// Called once the connection is closed.
    pub on_end: Box<dyn FnOnce() + Send>,
}

enum Msg {
    Conn(Box<Handover>),
    /// A worker finished a request of connection `conn`.
    Done {
        conn: usize,
        batch: ReplyBatch,
        cost: usize,
    },
}

struct Handle {
    tx: mpsc::Sender<Msg>,
    wake: Arc<WakeFd>,
}

/// The plane threads of a server.
pub struct Planes {
    handles: Vec<Handle>,
    next: AtomicUsize,
}

impl Planes {
    /// Start `n` plane threads sharing `pool` for blocking work. Fails when the kernel refuses
    /// the rings (the caller then serves connections on threads).
    pub fn start(n: usize, pool: Pool) -> io::Result<Planes> {
        crate::io::uring::probe_event_ring()?;
        let mut handles = Vec::new();
        for i in 0..n.max(1) {
            let wake = Arc::new(WakeFd::new()?);
            let (tx, rx) = mpsc::channel();
            let (ready_tx, ready_rx) = mpsc::sync_channel(1);
            let (pool, tx2, wake2) = (pool.clone(), tx.clone(), wake.clone());
            thread::Builder::new()
                .name(format!("nbd-plane-{i}"))
                .spawn(move || {
                    // the ring is made by the thread that submits to it (single issuer)
                    let ring = match EventRing::new(RING_ENTRIES) {
                        Ok(r) => {
                            let _ = ready_tx.send(Ok(()));
                            r
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    Plane {
                        ring,
                        rx,
                        tx: tx2,
                        wake: wake2,
                        pool,
                        conns: Vec::new(),
                        free: Vec::new(),
                        dirty: Vec::new(),
                        batches: Vec::new(),
                        bufs: ReplyBatch::new(),
                        reads: Vec::new(),
                        free_reads: Vec::new(),
                    }
                    .run()
                })?;
            ready_rx
                .recv()
                .map_err(|_| io::Error::other("data plane thread ended"))??;
            handles.push(Handle { tx, wake });
        }
        Ok(Planes {
            handles,
            next: AtomicUsize::new(0),
        })
    }

    /// Give a negotiated connection to the next plane. On failure the hand-over comes back.
    pub fn hand_over(&self, h: Handover) -> Result<(), Box<Handover>> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        let hd = &self.handles[i];
        match hd.tx.send(Msg::Conn(Box::new(h))) {
            Ok(()) => {
                hd.wake.signal();
                Ok(())
            }
            Err(mpsc::SendError(msg)) => match msg {
                Msg::Conn(h) => Err(h),
                // `send` gives back the message it was given: the arm above
                Msg::Done { .. } => Ok(()),
            },
        }
    }
}

struct Conn {
    socket: Socket,
    session: Arc<Session>,
    lim: Limits,
    on_end: Option<Box<dyn FnOnce() + Send>>,
    /// Received bytes; `inbuf[start..]` not decoded yet. `None` while a receive into it is in
    /// flight.
    inbuf: Option<Vec<u8>>,
    start: usize,
    /// Bytes the decoder needs at `start` before it can go on.
    need: usize,
    /// A write whose payload is being received into its own buffer.
    big: Option<(RawRequest, Vec<u8>, usize)>,
    /// Payload bytes still to discard, and the request they belong to.
    drain: Option<(RawRequest, u64)>,
    recv_pending: bool,
    /// Replies not yet handed to the ring.
    out: ReplyBatch,
    /// The batch being sent (owned by the ring while `send_pending`).
    send_pending: bool,
    sending_bytes: usize,
    jobs: usize,
    job_bytes: usize,
    /// No more requests: the client closed, sent DISC, broke the protocol, or the socket failed.
    stop_reading: bool,
    /// Sending failed: replies are dropped.
    broken: bool,
}

struct Plane {
    ring: EventRing<ReplyBatch>,
    rx: mpsc::Receiver<Msg>,
    tx: mpsc::Sender<Msg>,
    wake: Arc<WakeFd>,
    pool: Pool,
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
    /// Connections to look at before the next wait.
    dirty: Vec<usize>,
    /// Empty batches for worker jobs, sharing the plane's buffer pool.
    batches: Vec<ReplyBatch>,
    /// Owner of the plane's buffer pool.
    bufs: ReplyBatch,
    /// READs whose data is being read on the ring.
    reads: Vec<Option<FileRead>>,
    free_reads: Vec<usize>,
}

/// A READ answered from file reads on the plane's ring.
struct FileRead {
    conn: usize,
    req: RawRequest,
    offset: u64,
    length: u32,
    df: bool,
    /// The backend's reuse epoch before planning; the data counts only if it is unchanged.
    epoch: u64,
    /// The reply: header bytes, and data buffers (taken by the ring while being filled).
    pieces: Vec<ReplyPart>,
    outstanding: usize,
    failed: bool,
    cost: usize,
    /// For the export's statistics.
    started: Option<Started>,
}

/// One part of a reply the plane assembles: header bytes, or a data buffer (taken by the ring
/// while it is being filled).
enum ReplyPart {
    Head(Vec<u8>),
    Data(Option<IoBuf>, usize),
}

/// The plane's own failures (not a connection's).
fn log(msg: &str) {
    log::event(Level::Error, "plane", None, msg);
}

impl Plane {
    fn run(mut self) {
        if self.arm_wake().is_err() {
            log("data plane: cannot wait on its wake-up descriptor");
            return;
        }
        let mut done: Vec<RingDone<ReplyBatch>> = Vec::new();
        loop {
            self.take_messages();
            while let Some(i) = self.dirty.pop() {
                self.pump(i);
            }
            if let Err(e) = self.ring.submit_and_wait(1) {
                log(&format!("data plane: io_uring_enter failed: {e}"));
                thread::sleep(std::time::Duration::from_millis(1));
            }
            self.ring.complete(&mut done);
            for d in done.drain(..) {
                self.completed(d);
            }
        }
    }

    fn arm_wake(&mut self) -> io::Result<()> {
        let fd = self.wake.raw();
        self.ring
            .push(WAKE_TOKEN, RingOp::Wake { fd })
            .map_err(|(e, _)| e)
    }

    fn take_messages(&mut self) {
        while let Ok(m) = self.rx.try_recv() {
            match m {
                Msg::Conn(h) => self.add(*h),
                Msg::Done { conn, batch, cost } => {
                    let mut batch = batch;
                    if let Some(Some(c)) = self.conns.get_mut(conn) {
                        c.jobs -= 1;
                        c.job_bytes -= cost;
                        if !c.broken {
                            c.out.append(&mut batch);
                        }
                        self.dirty.push(conn);
                    }
                    batch.clear();
                    recycle(&mut self.batches, batch);
                }
            }
        }
    }

    fn add(&mut self, h: Handover) {
        let Handover {
            socket,
            session,
            pending,
            on_end,
        } = h;
        let lim = Limits {
            size: session.export.size(),
            mode: session.mode,
            flags: session.flags,
            contexts: session.contexts.len(),
        };
        let mut inbuf = Vec::with_capacity(RECV_BUF.max(pending.len()));
        inbuf.extend_from_slice(&pending);
        let c = Conn {
            socket,
            session: Arc::new(session),
            lim,
            on_end: Some(on_end),
            inbuf: Some(inbuf),
            start: 0,
            need: 0,
            big: None,
            drain: None,
            recv_pending: false,
            out: self
                .batches
                .pop()
                .unwrap_or_else(|| self.bufs.sharing_pool()),
            send_pending: false,
            sending_bytes: 0,
            jobs: 0,
            job_bytes: 0,
            stop_reading: false,
            broken: false,
        };
        let i = match self.free.pop() {
            Some(i) => {
                self.conns[i] = Some(c);
                i
            }
            None => {
                self.conns.push(Some(c));
                self.conns.len() - 1
            }
        };
        self.dirty.push(i);
    }

    fn completed(&mut self, d: RingDone<ReplyBatch>) {
        if d.token == WAKE_TOKEN {
            if self.arm_wake().is_err() {
                log("data plane: cannot re-arm its wake-up descriptor");
            }
            return;
        }
        let (i, piece, kind) = untoken(d.token);
        if kind == KIND_FILE {
            self.file_read_done(i, piece, d);
            return;
        }
        let Some(Some(c)) = self.conns.get_mut(i) else {
            return;
        };
        match d.op {
            RingOp::Recv { buf, .. } => {
                c.recv_pending = false;
                if d.result <= 0 {
                    if d.result < 0 {
                        log::event(
                            Level::Info,
                            "receive-failed",
                            Some(&c.session.conn),
                            &format!(
                                "receive failed: {}",
                                io::Error::from_raw_os_error(-d.result)
                            ),
                        );
                    }
                    c.stop_reading = true;
                }
                match (kind, c.big.as_mut()) {
                    (KIND_RECV_BIG, Some((_, v, _))) => *v = buf,
                    _ => c.inbuf = Some(buf),
                }
            }
            RingOp::Send { mut data, skip, .. } => {
                c.send_pending = false;
                let total = data.len();
                if d.result <= 0 {
                    if d.result < 0 {
                        log::event(
                            Level::Info,
                            "send-failed",
                            Some(&c.session.conn),
                            &format!("send failed: {}", io::Error::from_raw_os_error(-d.result)),
                        );
                    }
                    c.broken = true;
                    c.stop_reading = true;
                    c.socket.shutdown();
                    data.clear();
                    c.sending_bytes = 0;
                } else {
                    let skip = skip + d.result as usize;
                    if skip < total {
                        // a short send: the rest goes first, before anything queued since
                        let fd = c.socket.as_raw_fd();
                        c.send_pending = true;
                        c.sending_bytes = total - skip;
                        let token = token(i, 0, KIND_SEND);
                        if let Err((_, op)) = self.ring.push(token, RingOp::Send { fd, data, skip })
                        {
                            c.send_pending = false;
                            c.broken = true;
                            c.stop_reading = true;
                            c.socket.shutdown();
                            if let RingOp::Send { mut data, .. } = op {
                                data.clear();
                            }
                        }
                        self.dirty.push(i);
                        return;
                    }
                    data.clear();
                    c.sending_bytes = 0;
                }
                // the sent batch's buffers are back in the pool; keep the empty batch
                recycle(&mut self.batches, *data);
            }
            _ => {}
        }
        self.dirty.push(i);
    }

    /// Decode and execute what the connection's buffer holds, then start its receive and send.
    fn pump(&mut self, i: usize) {
        self.decode(i);
        self.start_io(i);
        self.maybe_close(i);
    }

    fn decode(&mut self, i: usize) {
        loop {
            let Some(Some(c)) = self.conns.get_mut(i) else {
                return;
            };
            if c.stop_reading
                || c.big.is_some()
                || c.jobs >= MAX_INFLIGHT
                || c.job_bytes >= MAX_JOB_BYTES_PLANE
                || c.out.len() + c.sending_bytes >= MAX_QUEUED_REPLY
            {
                return;
            }
            let Some(inbuf) = c.inbuf.as_mut() else {
                return;
            };
            if let Some((req, left)) = c.drain.take() {
                let avail = (inbuf.len() - c.start) as u64;
                let k = avail.min(left);
                c.start += k as usize;
                if k < left {
                    c.drain = Some((req, left - k));
                    c.need = 1;
                    compact(inbuf, &mut c.start);
                    return;
                }
                self.dispatch(i, req, None, true);
                continue;
            }
            let avail = &inbuf[c.start..];
            let (req, header_len, payload) = match transmission::decode_header(c.lim.mode, avail) {
                Decoded::NeedMore(n) => {
                    c.need = n;
                    compact(inbuf, &mut c.start);
                    return;
                }
                Decoded::Fatal(why) => {
                    log::event(
                        Level::Warn,
                        "protocol-error",
                        Some(&c.session.conn),
                        &format!("Request handling failed: {why}; closing the connection"),
                    );
                    c.stop_reading = true;
                    return;
                }
                Decoded::Request {
                    req,
                    header_len,
                    payload,
                } => (req, header_len, payload),
            };
            match payload {
                Payload::None => {
                    c.start += header_len;
                    self.dispatch(i, req, None, false);
                }
                Payload::Take(n) => {
                    let have = avail.len() - header_len;
                    if have >= n {
                        let s = c.start + header_len;
                        let data = inbuf[s..s + n].to_vec();
                        c.start = s + n;
                        self.dispatch(i, req, Some(data), false);
                    } else if header_len + n > RECV_BUF {
                        // receive the rest straight into the command's own buffer
                        let s = c.start + header_len;
                        let mut v = Vec::with_capacity(n);
                        v.extend_from_slice(&inbuf[s..]);
                        c.start = inbuf.len();
                        compact(inbuf, &mut c.start);
                        c.big = Some((req, v, n));
                        return;
                    } else {
                        c.need = header_len + n;
                        compact(inbuf, &mut c.start);
                        return;
                    }
                }
                Payload::Drain(n) => {
                    c.start += header_len;
                    c.drain = Some((req, n));
                }
            }
        }
    }

    /// Execute one validated-or-refused request of connection `i`.
    fn dispatch(&mut self, i: usize, req: RawRequest, data: Option<Vec<u8>>, drained: bool) {
        let Some(Some(c)) = self.conns.get_mut(i) else {
            return;
        };
        let mode = c.lim.mode;
        let cmd = match transmission::validate(&req, data, drained, &c.lim) {
            Ok(cmd) => cmd,
            Err(rej) => {
                log::event(
                    Level::Info,
                    "request-refused",
                    Some(&c.session.conn),
                    &format!("request {:#x} refused: {}", req.cookie, rej.msg),
                );
                c.session.rejected();
                c.out.push_head(|o| {
                    transmission::encode_error(o, mode, req.cookie, req.offset, rej.errno, &rej.msg)
                });
                return;
            }
        };
        let started = c.session.begin(&cmd);
        match route(&cmd, || c.session.export.backend.writes_buffered()) {
            Route::Disconnect => {
                c.stop_reading = true;
                return;
            }
            Route::PageCacheRead { offset, length, df } => {
                let done = c.session.read_into(
                    req.cookie,
                    req.offset,
                    offset,
                    length,
                    df,
                    &mut c.out,
                    Wait::Never,
                    started,
                );
                if done == Completion::Done {
                    return;
                }
            }
            Route::InlineWrite => {
                let reply = c.session.execute(req.cookie, req.offset, cmd, started);
                c.out.push_head(|o| o.extend_from_slice(&reply));
                return;
            }
            Route::Worker => {}
        }
        // off the plane's thread: a READ is read on the ring when its plan allows
        if let Command::Read { offset, length, df } = cmd {
            if length > 0 {
                if let Some(plan) = c.session.export.backend.plan_async(offset, length.into()) {
                    if self.ring_read(i, req, offset, length, df, plan, started) {
                        return;
                    }
                }
            }
        }
        self.hand_to_worker(i, req, cmd, started);
    }

    fn hand_to_worker(
        &mut self,
        i: usize,
        req: RawRequest,
        cmd: Command,
        started: Option<Started>,
    ) {
        let Some(Some(c)) = self.conns.get_mut(i) else {
            return;
        };
        let cost = job_cost(&cmd);
        c.jobs += 1;
        c.job_bytes += cost;
        let mut batch = self
            .batches
            .pop()
            .unwrap_or_else(|| self.bufs.sharing_pool());
        let s = c.session.clone();
        let (tx, wake) = (self.tx.clone(), self.wake.clone());
        self.pool.run(Box::new(move || {
            if let Command::Read { offset, length, df } = cmd {
                s.read_into(
                    req.cookie,
                    req.offset,
                    offset,
                    length,
                    df,
                    &mut batch,
                    Wait::Block,
                    started,
                );
            } else {
                let out = s.execute(req.cookie, req.offset, cmd, started);
                batch.push_head(|o| o.extend_from_slice(&out));
            }
            let _ = tx.send(Msg::Done {
                conn: i,
                batch,
                cost,
            });
            wake.signal();
        }));
    }

    /// Start the connection's receive (when the decoder waits for bytes) and send (when replies
    /// are queued and no send is in flight).
    fn start_io(&mut self, i: usize) {
        let Some(Some(c)) = self.conns.get_mut(i) else {
            return;
        };
        let fd = c.socket.as_raw_fd();
        if !c.send_pending && !c.out.is_empty() && !c.broken {
            let next = self
                .batches
                .pop()
                .unwrap_or_else(|| self.bufs.sharing_pool());
            let data = Box::new(std::mem::replace(&mut c.out, next));
            c.sending_bytes = data.len();
            c.send_pending = true;
            let token = token(i, 0, KIND_SEND);
            if let Err((e, op)) = self.ring.push(token, RingOp::Send { fd, data, skip: 0 }) {
                log(&format!("data plane: cannot queue a send: {e}"));
                c.send_pending = false;
                c.sending_bytes = 0;
                c.broken = true;
                c.stop_reading = true;
                c.socket.shutdown();
                if let RingOp::Send { mut data, .. } = op {
                    data.clear();
                    recycle(&mut self.batches, *data);
                }
            }
        }
        if c.recv_pending || c.stop_reading {
            return;
        }
        let mut tok = token(i, 0, KIND_RECV);
        let op = if let Some((_, v, want)) = c.big.as_mut() {
            // exactly the payload's length: bytes past it belong to the next request
            let n = *want - v.len();
            if n == 0 {
                // the payload is complete: execute the write
                let Some((req, v, _)) = c.big.take() else {
                    return;
                };
                self.dispatch(i, req, Some(v), false);
                self.dirty.push(i);
                return;
            }
            tok = token(i, 0, KIND_RECV_BIG);
            RingOp::Recv {
                fd,
                buf: std::mem::take(v),
                max: n,
                all: true,
            }
        } else {
            let throttled = c.jobs >= MAX_INFLIGHT
                || c.job_bytes >= MAX_JOB_BYTES_PLANE
                || c.out.len() + c.sending_bytes >= MAX_QUEUED_REPLY;
            let Some(mut buf) = c.inbuf.take() else {
                return;
            };
            let have = buf.len() - c.start;
            if throttled || (c.drain.is_none() && have >= c.need.max(1) && c.need > 0) {
                // nothing to receive for now (decoding resumes when jobs finish)
                c.inbuf = Some(buf);
                return;
            }
            if c.drain.is_some() {
                // discarded payload: receive over what was consumed
                buf.clear();
                c.start = 0;
            }
            let want = c.need.max(1);
            if buf.capacity() < c.start + want {
                buf.reserve(c.start + want - buf.len());
            }
            if buf.capacity() == buf.len() {
                buf.reserve(RECV_BUF);
            }
            RingOp::Recv {
                fd,
                buf,
                max: usize::MAX,
                all: false,
            }
        };
        c.recv_pending = true;
        if let Err((e, op)) = self.ring.push(tok, op) {
            log(&format!("data plane: cannot queue a receive: {e}"));
            c.recv_pending = false;
            c.stop_reading = true;
            if let RingOp::Recv { buf, .. } = op {
                match c.big.as_mut() {
                    Some((_, v, _)) => *v = buf,
                    None => c.inbuf = Some(buf),
                }
            }
        }
    }

    /// Close the connection once it stopped reading and nothing of it is in flight.
    fn maybe_close(&mut self, i: usize) {
        let Some(Some(c)) = self.conns.get_mut(i) else {
            return;
        };
        if !c.stop_reading || c.jobs > 0 || c.send_pending {
            return;
        }
        if !c.out.is_empty() && !c.broken {
            return;
        }
        if c.recv_pending {
            // a receive may wait forever on a silent client: end it
            c.socket.shutdown();
            return;
        }
        let Some(c) = self.conns[i].take() else {
            return;
        };
        self.free.push(i);
        c.socket.shutdown();
        if let Some(f) = c.on_end {
            f();
        }
        let mut out = c.out;
        out.clear();
        recycle(&mut self.batches, out);
    }
}

/// Keep an emptied batch for reuse, up to [`MAX_SPARE_BATCHES`] (every connection and job
/// takes one and gives it back: without the bound, a burst would be kept for ever).
fn recycle(batches: &mut Vec<ReplyBatch>, mut batch: ReplyBatch) {
    if batches.len() < MAX_SPARE_BATCHES {
        batch.clear();
        batches.push(batch);
    }
}

/// Move the undecoded bytes of `buf` to its front.
fn compact(buf: &mut Vec<u8>, start: &mut usize) {
    if *start == 0 {
        return;
    }
    if *start >= buf.len() {
        buf.clear();
    } else {
        buf.drain(..*start);
    }
    *start = 0;
}

impl Plane {
    /// Start the file reads of a planned READ on the ring; false when it cannot be (the caller
    /// then gives the READ to the workers).
    #[allow(clippy::too_many_arguments)]
    fn ring_read(
        &mut self,
        i: usize,
        req: RawRequest,
        offset: u64,
        length: u32,
        df: bool,
        plan: AsyncPlan,
        started: Option<Started>,
    ) -> bool {
        let Some(Some(c)) = self.conns.get_mut(i) else {
            return false;
        };
        let data_segs = plan
            .segments
            .iter()
            .filter(|s| matches!(s, Segment::Data { .. }))
            .count();
        if data_segs == 0 || data_segs > MAX_RING_SEGMENTS {
            // all zeros: the inline path answers it; too fragmented: the workers
            return false;
        }
        let mode = c.lim.mode;
        let (cookie, roff) = (req.cookie, req.offset);
        // the reply's pieces, and the file reads that fill its data buffers
        let mut pieces: Vec<ReplyPart> = Vec::new();
        let mut reads: Vec<(usize, RawFd, u64, usize)> = Vec::new();
        let mut add_data = |pieces: &mut Vec<ReplyPart>, out: &mut ReplyBatch, s: &Segment| match *s
        {
            Segment::Data { fd, host, len } => {
                let len = len as usize;
                reads.push((pieces.len(), fd, host, len));
                pieces.push(ReplyPart::Data(Some(out.take_buf(len)), len));
            }
            Segment::Zero(len) => {
                let len = len as usize;
                let mut b = out.take_buf(len);
                b[..len].fill(0);
                pieces.push(ReplyPart::Data(Some(b), len));
            }
        };
        if mode == HeaderMode::Simple {
            let mut h = Vec::new();
            transmission::encode_simple(&mut h, cookie, 0);
            pieces.push(ReplyPart::Head(h));
            for s in &plan.segments {
                add_data(&mut pieces, &mut c.out, s);
            }
        } else {
            // structured: the hole/data split and chunk headers of a READ on the other paths
            // (zero runs are holes unless DF; each data piece one chunk over its segments)
            let mut split: Vec<session::Piece> = Vec::new();
            for s in &plan.segments {
                let zero = !df && matches!(s, Segment::Zero(_));
                session::push_run(&mut split, zero, s.bytes());
            }
            let mut segs = plan.segments.iter();
            let mut pos = offset;
            let last = split.len().saturating_sub(1);
            for (k, piece) in split.into_iter().enumerate() {
                let mut h = Vec::new();
                session::encode_read_chunk(&mut h, mode, cookie, roff, k == last, pos, piece);
                pieces.push(ReplyPart::Head(h));
                // a piece is a merge of whole segments: take those it covers
                let mut covered = 0;
                while covered < piece.len() {
                    let Some(s) = segs.next() else { break };
                    covered += s.bytes();
                    if let session::Piece::Data(_) = piece {
                        add_data(&mut pieces, &mut c.out, s);
                    }
                }
                pos += piece.len();
            }
        }
        let cost = job_cost(&Command::Read { offset, length, df });
        c.jobs += 1;
        c.job_bytes += cost;
        let idx = match self.free_reads.pop() {
            Some(k) => k,
            None => {
                self.reads.push(None);
                self.reads.len() - 1
            }
        };
        let mut fr = FileRead {
            conn: i,
            req,
            offset,
            length,
            df,
            epoch: plan.epoch,
            pieces,
            outstanding: 0,
            failed: false,
            cost,
            started,
        };
        for (piece, fd, host, len) in reads {
            let Some(ReplyPart::Data(slot, _)) = fr.pieces.get_mut(piece) else {
                continue;
            };
            let Some(buf) = slot.take() else {
                continue;
            };
            let op = RingOp::Read {
                fd,
                buf,
                at: 0,
                len,
                off: host,
            };
            match self.ring.push(token(idx, piece, KIND_FILE), op) {
                Ok(()) => fr.outstanding += 1,
                Err((_, op)) => {
                    if let RingOp::Read { buf, .. } = op {
                        *slot = Some(buf);
                    }
                    fr.failed = true;
                }
            }
        }
        let finished = fr.outstanding == 0;
        self.reads[idx] = Some(fr);
        if finished {
            self.finish_read(idx);
        }
        true
    }

    fn file_read_done(&mut self, idx: usize, piece: usize, d: RingDone<ReplyBatch>) {
        let Some(Some(fr)) = self.reads.get_mut(idx) else {
            return;
        };
        fr.outstanding = fr.outstanding.saturating_sub(1);
        if let RingOp::Read { buf, len, .. } = d.op {
            if d.result < 0 || d.result as usize != len {
                // an error, or a short read (end of a host file): the workers' read decides
                fr.failed = true;
            }
            if let Some(ReplyPart::Data(slot, _)) = fr.pieces.get_mut(piece) {
                *slot = Some(buf);
            }
        }
        if fr.outstanding == 0 {
            self.finish_read(idx);
        }
    }

    /// All reads of a planned READ are back: queue its reply, or give it to the workers when a
    /// read failed or a host cluster may have changed owner meanwhile.
    fn finish_read(&mut self, idx: usize) {
        let Some(fr) = self.reads.get_mut(idx).and_then(Option::take) else {
            return;
        };
        self.free_reads.push(idx);
        let Some(Some(c)) = self.conns.get_mut(fr.conn) else {
            return;
        };
        c.jobs -= 1;
        c.job_bytes -= fr.cost;
        self.dirty.push(fr.conn);
        let stale = c.session.export.backend.reuse_epoch() != fr.epoch;
        if fr.failed || stale || c.broken {
            for p in fr.pieces {
                if let ReplyPart::Data(Some(b), _) = p {
                    c.out.give_back(b);
                }
            }
            if !c.broken {
                let cmd = Command::Read {
                    offset: fr.offset,
                    length: fr.length,
                    df: fr.df,
                };
                self.hand_to_worker(fr.conn, fr.req, cmd, fr.started);
            } else {
                c.session.read_done(fr.started, false);
            }
            return;
        }
        c.session.read_done(fr.started, true);
        for p in fr.pieces {
            match p {
                ReplyPart::Head(h) => c.out.push_head(|o| o.extend_from_slice(&h)),
                ReplyPart::Data(Some(b), n) => c.out.push_data(b, n),
                ReplyPart::Data(None, _) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::server::tests::scripted_client;
    use crate::nbd::server::ConnEnd;

    /// After negotiation the connection moves to a plane, which serves the same session as
    /// the threaded driver and reports its end; many sessions one after another leave no
    /// spare batches beyond the bound (a batch was once kept per connection, for ever).
    #[test]
    fn a_plane_serves_sessions_and_keeps_its_spares_bounded() {
        if let Err(e) = crate::testing::ring_plane_available() {
            assert!(!crate::testing::in_ci(), "no ring data plane here: {e}");
            eprintln!("SKIP: no ring data plane here: {e}");
            return;
        }
        let pool = Pool::new(2);
        let planes = Arc::new(Planes::start(1, pool.clone()).unwrap());
        for _ in 0..3 {
            let mut cfg = crate::testing::fuzz_export_config().unwrap();
            cfg.planes = Some(planes.clone());
            let (answered, reported) = scripted_client(cfg, pool.clone());
            assert_eq!(answered, ConnEnd::HandedOver);
            assert_eq!(reported, ConnEnd::Negotiated);
        }
    }

    #[test]
    fn recycle_keeps_at_most_the_bound() {
        let mut spare = Vec::new();
        let owner = ReplyBatch::new();
        for _ in 0..MAX_SPARE_BATCHES + 10 {
            recycle(&mut spare, owner.sharing_pool());
        }
        assert_eq!(spare.len(), MAX_SPARE_BATCHES);
    }
}
