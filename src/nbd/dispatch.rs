//! The dispatch policy both transmission drivers share (the threaded path in `server.rs` and
//! the ring data plane in `plane.rs`): which requests run where, the bounds per connection,
//! and the worker pool that runs what may wait.
//!
//! A request is executed on the driver's own thread when it cannot wait for the disk (a read
//! of at most [`INLINE_READ_MAX`] bytes the page cache holds, a write of at most
//! [`INLINE_WRITE_MAX`] bytes without FUA that completes in the page cache); everything else
//! goes to the [`Pool`]. What a request handed to the pool holds is its [`job_cost`]; a
//! connection stops reading while [`MAX_INFLIGHT`] requests or its byte bound are reached (the
//! threaded driver's is [`MAX_INFLIGHT_BYTES`], request payloads and reply data; the plane
//! bounds the bytes on its workers and ring more tightly, see `plane.rs`).

use super::transmission::Command;
use std::sync::{mpsc, Arc, Mutex};
use std::thread;

/// Requests in flight per connection at most.
pub const MAX_INFLIGHT: usize = 64;
/// Bytes of request payload and reply data held per connection at most (one request may exceed
/// it when nothing else is in flight).
pub const MAX_INFLIGHT_BYTES: usize = 64 << 20;

/// Reads up to this size may be answered on the connection's thread (or its plane) from the page
/// cache; bigger ones go to the workers (or the plane's ring), so that copying one request's
/// data overlaps with sending another's.
pub(crate) const INLINE_READ_MAX: u32 = 256 << 10;
/// Writes (without FUA) up to this size are done on the connection's thread (or its plane) when
/// they complete in the page cache.
pub(crate) const INLINE_WRITE_MAX: usize = 128 << 10;

/// What a request handed to the workers counts against its connection's in-flight bytes.
pub(crate) fn job_cost(cmd: &Command) -> usize {
    64 + match cmd {
        Command::Read { length, .. } => *length as usize,
        Command::Write { data, .. } => data.len(),
        Command::BlockStatus { .. } => 1 << 20,
        _ => 0,
    }
}

/// Work for the pool: one request, executed and answered by a worker.
pub(crate) type Job = Box<dyn FnOnce() + Send>;

/// The worker threads shared by all connections.
#[derive(Clone)]
pub struct Pool {
    tx: mpsc::Sender<Job>,
}

impl Pool {
    pub fn new(workers: usize) -> Pool {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..workers.max(1) {
            let rx = rx.clone();
            let _ = thread::Builder::new()
                .name(format!("nbd-worker-{i}"))
                .spawn(move || loop {
                    let job = match rx.lock() {
                        Ok(r) => r.recv(),
                        Err(_) => return,
                    };
                    match job {
                        Ok(j) => j(),
                        Err(_) => return,
                    }
                });
        }
        Pool { tx }
    }

    pub(crate) fn run(&self, job: Job) {
        if let Err(mpsc::SendError(job)) = self.tx.send(job) {
            // no worker left: run inline rather than drop the request
            job();
        }
    }
}
