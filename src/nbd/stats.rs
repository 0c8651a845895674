//! Request statistics of one export, like nbdkit's stats filter: per command type the number
//! of requests, the bytes they covered, the errors returned, and latency percentiles; the
//! requests in flight and the connections. Counters are relaxed atomics shared by every
//! connection and worker of the export, so recording costs a few uncontended additions; the
//! drivers record only when statistics were asked for (`serve --stats` / `--metrics`).
//!
//! Latency is measured from the moment a driver has decoded and validated the request to the
//! moment its reply is ready to be sent: queueing for a worker counts, the socket does not.
//! Percentiles come from a log-linear histogram (8 buckets per power of two) and are reported
//! as the upper bound of their bucket: at most 12.5 % above the true value.

use super::transmission::Command;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// An NBD command type, as counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    WriteZeroes,
    Trim,
    Flush,
    BlockStatus,
    Cache,
}

impl Op {
    pub const ALL: [Op; 7] = [
        Op::Read,
        Op::Write,
        Op::WriteZeroes,
        Op::Trim,
        Op::Flush,
        Op::BlockStatus,
        Op::Cache,
    ];

    /// The name in reports (nbdkit's stats filter's names where it has one).
    pub fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::WriteZeroes => "zero",
            Op::Trim => "trim",
            Op::Flush => "flush",
            Op::BlockStatus => "block_status",
            Op::Cache => "cache",
        }
    }

    /// The command's type and the guest bytes it covers (`None` for DISC).
    pub fn of(cmd: &Command) -> Option<(Op, u64)> {
        Some(match cmd {
            Command::Disc => return None,
            Command::Read { length, .. } => (Op::Read, u64::from(*length)),
            Command::Write { data, .. } => (Op::Write, data.len() as u64),
            Command::WriteZeroes { length, .. } => (Op::WriteZeroes, *length),
            Command::Trim { length, .. } => (Op::Trim, *length),
            Command::Flush => (Op::Flush, 0),
            Command::BlockStatus { length, .. } => (Op::BlockStatus, *length),
            Command::Cache { length, .. } => (Op::Cache, *length),
        })
    }
}

/// Buckets of the latency histogram: values below 8 ns have one each, then 8 per power of two
/// up to 2^64 ns.
const BUCKETS: usize = 8 + 61 * 8;

fn bucket(ns: u64) -> usize {
    if ns < 8 {
        return ns as usize;
    }
    let p = 63 - ns.leading_zeros() as usize; // 3..=63
    let sub = ((ns >> (p - 3)) & 7) as usize;
    8 + (p - 3) * 8 + sub
}

/// The largest value that falls in bucket `b`.
fn bucket_top(b: usize) -> u64 {
    if b < 8 {
        return b as u64;
    }
    let p = (b - 8) / 8 + 3;
    let sub = ((b - 8) % 8) as u64;
    let low = (8 + sub) << (p - 3);
    low + ((1u64 << (p - 3)) - 1)
}

struct Histogram {
    counts: Box<[AtomicU64]>,
}

impl Histogram {
    fn new() -> Self {
        Histogram {
            counts: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn add(&self, ns: u64) {
        self.counts[bucket(ns)].fetch_add(1, Relaxed);
    }

    /// The `q` quantiles (0 < q <= 1) of what was recorded, in nanoseconds (0 when empty).
    fn quantiles(&self, qs: &[f64]) -> Vec<u64> {
        let counts: Vec<u64> = self.counts.iter().map(|c| c.load(Relaxed)).collect();
        let total: u64 = counts.iter().sum();
        qs.iter()
            .map(|&q| {
                if total == 0 {
                    return 0;
                }
                let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
                let mut seen = 0;
                for (b, &n) in counts.iter().enumerate() {
                    seen += n;
                    if seen >= rank {
                        return bucket_top(b);
                    }
                }
                bucket_top(BUCKETS - 1)
            })
            .collect()
    }
}

struct OpStats {
    requests: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
    latency: Histogram,
}

impl OpStats {
    fn new() -> Self {
        OpStats {
            requests: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            latency: Histogram::new(),
        }
    }
}

/// A request being served: what [`Stats::end`] records.
#[derive(Debug, Clone, Copy)]
pub struct Started {
    op: Op,
    bytes: u64,
    at: Instant,
}

impl Started {
    /// A validated request starts now (`None` for DISC, which is not counted).
    pub fn of(cmd: &Command) -> Option<Started> {
        let (op, bytes) = Op::of(cmd)?;
        Some(Started {
            op,
            bytes,
            at: Instant::now(),
        })
    }

    pub fn op(&self) -> Op {
        self.op
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn elapsed(&self) -> Duration {
        self.at.elapsed()
    }
}

/// One export's statistics.
pub struct Stats {
    since: Instant,
    ops: [OpStats; 7],
    in_flight: AtomicI64,
    connections: AtomicU64,
    open_connections: AtomicI64,
    /// Requests refused before execution (malformed, out of range, not allowed).
    rejected: AtomicU64,
}

impl std::fmt::Debug for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stats")
            .field("in_flight", &self.in_flight.load(Relaxed))
            .finish_non_exhaustive()
    }
}

impl Default for Stats {
    fn default() -> Self {
        Stats::new()
    }
}

/// What one command type's line of a report says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpReport {
    pub op: Op,
    pub requests: u64,
    pub bytes: u64,
    pub errors: u64,
    /// p50, p99, p99.9 latency.
    pub latency: [Duration; 3],
}

impl Stats {
    pub fn new() -> Self {
        Stats {
            since: Instant::now(),
            ops: std::array::from_fn(|_| OpStats::new()),
            in_flight: AtomicI64::new(0),
            connections: AtomicU64::new(0),
            open_connections: AtomicI64::new(0),
            rejected: AtomicU64::new(0),
        }
    }

    fn slot(&self, op: Op) -> &OpStats {
        &self.ops[Op::ALL.iter().position(|&o| o == op).unwrap_or(0)]
    }

    /// A validated request starts (`None` for DISC, which is not counted).
    pub fn begin(&self, cmd: &Command) -> Option<Started> {
        let t = Started::of(cmd)?;
        self.started(&t);
        Some(t)
    }

    /// `t` (from [`Started::of`]) is in flight.
    pub fn started(&self, _t: &Started) {
        self.in_flight.fetch_add(1, Relaxed);
    }

    /// Its reply is ready: `ok` unless it is an error reply.
    pub fn end(&self, s: Started, ok: bool) {
        let ns = u64::try_from(s.at.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let o = self.slot(s.op);
        o.requests.fetch_add(1, Relaxed);
        o.bytes.fetch_add(s.bytes, Relaxed);
        if !ok {
            o.errors.fetch_add(1, Relaxed);
        }
        o.latency.add(ns);
        self.in_flight.fetch_sub(1, Relaxed);
    }

    /// A request was refused before execution.
    pub fn rejected(&self) {
        self.rejected.fetch_add(1, Relaxed);
    }

    pub fn connection_opened(&self) {
        self.connections.fetch_add(1, Relaxed);
        self.open_connections.fetch_add(1, Relaxed);
    }

    pub fn connection_closed(&self) {
        self.open_connections.fetch_sub(1, Relaxed);
    }

    /// Every command type's figures, in [`Op::ALL`] order.
    pub fn ops(&self) -> Vec<OpReport> {
        Op::ALL
            .iter()
            .map(|&op| {
                let o = self.slot(op);
                let q = o.latency.quantiles(&[0.5, 0.99, 0.999]);
                OpReport {
                    op,
                    requests: o.requests.load(Relaxed),
                    bytes: o.bytes.load(Relaxed),
                    errors: o.errors.load(Relaxed),
                    latency: [0, 1, 2].map(|i| Duration::from_nanos(q[i])),
                }
            })
            .collect()
    }

    /// The report `serve --stats` writes: one line for the export, one per command type that
    /// saw requests.
    pub fn report(&self, export: &str) -> String {
        let secs = self.since.elapsed().as_secs_f64();
        let ops = self.ops();
        let requests: u64 = ops.iter().map(|o| o.requests).sum();
        let bytes: u64 = ops.iter().map(|o| o.bytes).sum();
        let mut s = String::new();
        let _ = writeln!(
            s,
            "export '{export}': {secs:.3} s, {requests} requests, {bytes} bytes, {} rejected, \
             {} in flight, {} connections ({} open)",
            self.rejected.load(Relaxed),
            self.in_flight.load(Relaxed).max(0),
            self.connections.load(Relaxed),
            self.open_connections.load(Relaxed).max(0),
        );
        for o in ops.iter().filter(|o| o.requests > 0) {
            let us = |d: Duration| d.as_secs_f64() * 1e6;
            let _ = writeln!(
                s,
                "  {}: {} requests, {} bytes, {} errors, {:.1} MB/s, latency p50 {:.1} us, \
                 p99 {:.1} us, p99.9 {:.1} us",
                o.op.name(),
                o.requests,
                o.bytes,
                o.errors,
                if secs > 0.0 {
                    o.bytes as f64 / secs / 1e6
                } else {
                    0.0
                },
                us(o.latency[0]),
                us(o.latency[1]),
                us(o.latency[2]),
            );
        }
        s
    }

    /// The export's series in Prometheus' text exposition format (the `# HELP`/`# TYPE` lines
    /// come from [`prometheus_header`], once per scrape).
    pub fn prometheus(&self, export: &str, out: &mut String) {
        let e = export.replace('\\', "\\\\").replace('"', "\\\"");
        for o in self.ops() {
            let l = format!("export=\"{e}\",op=\"{}\"", o.op.name());
            let _ = writeln!(out, "qnbd_requests_total{{{l}}} {}", o.requests);
            let _ = writeln!(out, "qnbd_bytes_total{{{l}}} {}", o.bytes);
            let _ = writeln!(out, "qnbd_errors_total{{{l}}} {}", o.errors);
            for (q, d) in ["0.5", "0.99", "0.999"].iter().zip(o.latency) {
                let _ = writeln!(
                    out,
                    "qnbd_latency_seconds{{{l},quantile=\"{q}\"}} {:.9}",
                    d.as_secs_f64()
                );
            }
        }
        let l = format!("export=\"{e}\"");
        let _ = writeln!(
            out,
            "qnbd_in_flight{{{l}}} {}",
            self.in_flight.load(Relaxed).max(0)
        );
        let _ = writeln!(
            out,
            "qnbd_rejected_total{{{l}}} {}",
            self.rejected.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "qnbd_connections_total{{{l}}} {}",
            self.connections.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "qnbd_connections{{{l}}} {}",
            self.open_connections.load(Relaxed).max(0)
        );
    }
}

/// The `# HELP` and `# TYPE` lines of every series [`Stats::prometheus`] writes.
pub fn prometheus_header() -> &'static str {
    "# HELP qnbd_requests_total NBD requests answered, by command type.\n\
     # TYPE qnbd_requests_total counter\n\
     # HELP qnbd_bytes_total Guest bytes covered by the answered requests.\n\
     # TYPE qnbd_bytes_total counter\n\
     # HELP qnbd_errors_total Requests answered with an error.\n\
     # TYPE qnbd_errors_total counter\n\
     # HELP qnbd_latency_seconds Request latency from decoding to reply, by quantile.\n\
     # TYPE qnbd_latency_seconds summary\n\
     # HELP qnbd_in_flight Requests being served.\n\
     # TYPE qnbd_in_flight gauge\n\
     # HELP qnbd_rejected_total Requests refused before execution.\n\
     # TYPE qnbd_rejected_total counter\n\
     # HELP qnbd_connections_total Connections that entered transmission.\n\
     # TYPE qnbd_connections_total counter\n\
     # HELP qnbd_connections Connections in transmission now.\n\
     # TYPE qnbd_connections gauge\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_every_value_and_bound_it() {
        for ns in (0..5000u64).chain([1 << 20, (1 << 40) + 12345, u64::MAX / 3, u64::MAX]) {
            let b = bucket(ns);
            assert!(b < BUCKETS, "{ns}");
            assert!(bucket_top(b) >= ns, "{ns}: top {}", bucket_top(b));
            if b > 0 {
                assert!(bucket_top(b - 1) < ns, "{ns}: below {}", bucket_top(b - 1));
            }
            // a bucket is at most 1/8 of its values wide
            assert!(bucket_top(b) - ns <= ns / 8 + 1, "{ns}");
        }
    }

    #[test]
    fn quantiles_follow_the_recorded_values() {
        let h = Histogram::new();
        assert_eq!(h.quantiles(&[0.5]), vec![0]);
        for ns in 1..=1000u64 {
            h.add(ns * 1000);
        }
        let q = h.quantiles(&[0.5, 0.99, 0.999]);
        for (got, want) in q.iter().zip([500_000u64, 990_000, 999_000]) {
            assert!(*got >= want && *got <= want + want / 8, "{got} vs {want}");
        }
    }

    #[test]
    fn requests_are_counted_by_type() {
        let s = Stats::new();
        let read = Command::Read {
            offset: 0,
            length: 4096,
            df: false,
        };
        let t = s.begin(&read).unwrap();
        assert_eq!(s.in_flight.load(Relaxed), 1);
        s.end(t, true);
        let t = s.begin(&Command::Flush).unwrap();
        s.end(t, false);
        assert!(s.begin(&Command::Disc).is_none());
        let ops = s.ops();
        assert_eq!((ops[0].requests, ops[0].bytes, ops[0].errors), (1, 4096, 0));
        assert_eq!((ops[4].requests, ops[4].errors), (1, 1));
        assert_eq!(s.in_flight.load(Relaxed), 0);
        let r = s.report("x");
        assert!(r.contains("2 requests, 4096 bytes"), "{r}");
        assert!(
            r.contains("  read: 1 requests, 4096 bytes, 0 errors"),
            "{r}"
        );
        assert!(!r.contains("trim"), "{r}");
        let mut p = String::new();
        s.prometheus("x", &mut p);
        assert!(
            p.contains("qnbd_requests_total{export=\"x\",op=\"read\"} 1\n"),
            "{p}"
        );
        assert!(
            p.contains("qnbd_errors_total{export=\"x\",op=\"flush\"} 1\n"),
            "{p}"
        );
    }
}
