//! The dispatch policy both transmission drivers share (the threaded path in `server.rs` and
//! the ring data plane in `plane.rs`): which requests run where, the bounds per connection,
//! and the worker pool that runs what may wait.
//!
//! [`route`] is the one place that says where a request runs; both drivers call it for every
//! valid request and only carry out its answer. A request is executed on the driver's own
//! thread when it cannot wait for the disk (a read of at most [`INLINE_READ_MAX`] bytes the
//! page cache holds, a write of at most [`INLINE_WRITE_MAX`] bytes without FUA that completes
//! in the page cache); everything else goes off the driver's thread, to the [`Pool`] (the
//! plane reads a READ on its ring first when it can, see `plane.rs`).
//!
//! What a request off the driver's thread holds is its [`job_cost`]. A connection stops reading
//! while [`MAX_INFLIGHT`] such requests are in flight or their costs reach its driver's byte
//! bound: [`MAX_JOB_BYTES_THREADED`] or [`MAX_JOB_BYTES_PLANE`] (the two differ because a
//! worker of the threaded driver sends its own reply, while the plane holds every reply until
//! its ring has sent it).

use super::transmission::Command;
use std::sync::{mpsc, Arc, Mutex};
use std::thread;

/// Requests in flight per connection at most (on the workers, and on the plane's ring).
pub const MAX_INFLIGHT: usize = 64;
/// The threaded driver's bound on the [`job_cost`] of a connection's requests on the workers
/// (request payloads and reply data): a request waits until it fits, except that one request
/// may exceed it when nothing else is in flight. Loose, because a worker writes its reply to
/// the socket itself as soon as it is ready (the socket holds the rest back) and reuses its
/// own reply buffers.
pub const MAX_JOB_BYTES_THREADED: usize = 64 << 20;
/// The plane's bound on the [`job_cost`] of a connection's requests on the workers and the
/// ring: the plane stops decoding that connection once it is reached (so one request may
/// exceed it). Tighter than [`MAX_JOB_BYTES_THREADED`] because on the plane every reply's data
/// waits in buffers of the plane's shared pool until the ring has sent it: with many reads in
/// flight (nbdcopy: 64 x 256 KiB on each of 4 connections) the buffers would outgrow the pool
/// and every one become a fresh allocation.
pub const MAX_JOB_BYTES_PLANE: usize = 8 << 20;

/// Reads up to this size may be answered on the connection's thread (or its plane) from the page
/// cache; bigger ones go to the workers (or the plane's ring), so that copying one request's
/// data overlaps with sending another's.
pub(crate) const INLINE_READ_MAX: u32 = 256 << 10;
/// Writes (without FUA) up to this size are done on the connection's thread (or its plane) when
/// they complete in the page cache.
pub(crate) const INLINE_WRITE_MAX: usize = 128 << 10;

/// Where a driver runs a valid request (the answer of [`route`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route {
    /// `NBD_CMD_DISC`: read no more requests; the replies still in flight go out.
    Disconnect,
    /// A READ of at most [`INLINE_READ_MAX`] bytes: try it on the driver's thread from the page
    /// cache (`Session::read_into(.., Wait::Never)`). When that would wait
    /// (`Completion::WouldBlock`), the driver goes on as for [`Route::Worker`].
    PageCacheRead { offset: u64, length: u32, df: bool },
    /// A write without FUA of at most [`INLINE_WRITE_MAX`] bytes on a backend whose writes
    /// complete in the page cache: execute it on the driver's thread (`Session::execute`). An
    /// in-place write is a page-cache copy, an allocating one changes metadata under a lock
    /// that the workers would only queue on.
    InlineWrite,
    /// Everything else (big or FUA writes, flushes, zeroing, trims, block status, big reads):
    /// off the driver's thread, on the [`Pool`] (the plane reads a READ on its ring first when
    /// it can).
    Worker,
}

/// Where `cmd` runs. `writes_buffered` says whether the export's writes complete in the page
/// cache (`ExportBackend::writes_buffered`); it is asked only for a write that is otherwise
/// small enough to run inline.
#[inline]
pub(crate) fn route(cmd: &Command, writes_buffered: impl FnOnce() -> bool) -> Route {
    match *cmd {
        Command::Disc => Route::Disconnect,
        Command::Read { offset, length, df } if length <= INLINE_READ_MAX => {
            Route::PageCacheRead { offset, length, df }
        }
        Command::Write {
            ref data,
            fua: false,
            ..
        } if data.len() <= INLINE_WRITE_MAX && writes_buffered() => Route::InlineWrite,
        _ => Route::Worker,
    }
}

/// What a request off the driver's thread counts against its connection's byte bound
/// ([`MAX_JOB_BYTES_THREADED`], [`MAX_JOB_BYTES_PLANE`]).
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

#[cfg(test)]
mod tests {
    use super::*;

    fn read(length: u32) -> Command {
        Command::Read {
            offset: 4096,
            length,
            df: true,
        }
    }

    fn write(len: usize, fua: bool) -> Command {
        Command::Write {
            offset: 0,
            data: vec![0; len],
            fua,
        }
    }

    /// Reads up to the inline bound are tried from the page cache, bigger ones are not.
    #[test]
    fn small_reads_are_tried_from_the_page_cache() {
        let page_cache = Route::PageCacheRead {
            offset: 4096,
            length: INLINE_READ_MAX,
            df: true,
        };
        assert_eq!(route(&read(INLINE_READ_MAX), || true), page_cache);
        assert_eq!(route(&read(INLINE_READ_MAX + 1), || true), Route::Worker);
    }

    /// A write runs inline only when it is small, without FUA, and the export's writes are
    /// buffered; the export is asked only about such a write.
    #[test]
    fn only_small_buffered_writes_without_fua_run_inline() {
        assert_eq!(
            route(&write(INLINE_WRITE_MAX, false), || true),
            Route::InlineWrite
        );
        assert_eq!(
            route(&write(INLINE_WRITE_MAX, false), || false),
            Route::Worker
        );
        let never_asked = || -> bool { panic!("writes_buffered asked") };
        assert_eq!(
            route(&write(INLINE_WRITE_MAX + 1, false), never_asked),
            Route::Worker
        );
        assert_eq!(route(&write(512, true), never_asked), Route::Worker);
        assert_eq!(
            route(&read(512), never_asked),
            Route::PageCacheRead {
                offset: 4096,
                length: 512,
                df: true
            }
        );
    }

    /// DISC ends reading; flushes, trims, zeroing and block status go to the workers.
    #[test]
    fn disc_disconnects_and_the_rest_goes_to_the_workers() {
        assert_eq!(route(&Command::Disc, || true), Route::Disconnect);
        for cmd in [
            Command::Flush,
            Command::Trim {
                offset: 0,
                length: 512,
                fua: false,
            },
            Command::WriteZeroes {
                offset: 0,
                length: 512,
                no_hole: false,
                fast: false,
                fua: false,
            },
            Command::Cache {
                offset: 0,
                length: 512,
            },
            Command::BlockStatus {
                offset: 0,
                length: 512,
                req_one: false,
                ids: None,
            },
        ] {
            assert_eq!(route(&cmd, || true), Route::Worker, "{cmd:?}");
        }
    }
}
