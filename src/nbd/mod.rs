//! The NBD server: protocol code (sans-I/O) and the listeners that drive it.
//!
//! * [`wire`] — constants and fixed headers in the specification's names.
//! * [`meta`] — metadata contexts and query matching.
//! * [`handshake`] — fixed-newstyle negotiation as a byte-in/byte-out state machine.
//! * [`transmission`] — request decoding and validation, reply encoding.
//! * [`extents`] — block-status descriptor building.
//! * [`export`] — exports and the [`export::ExportBackend`] trait (what a backend answers).
//! * [`session`] — a negotiated session and the execution of its commands.
//! * [`metrics`] — the statistics over HTTP in Prometheus' text format (`serve --metrics`).
//! * [`stats`] — request statistics per export (counts, bytes, errors, latency percentiles).
//! * [`reply`] — replies queued as headers + page-aligned data buffers for vectored writes.
//! * [`dispatch`] — which requests run on a driver's thread and which on the worker pool,
//!   and the bounds per connection, shared by both drivers.
//! * [`socket`] — a client's socket (TCP or Unix).
//! * [`server`] — listeners, connections, the threaded driver.
//! * [`plane`] — the ring data plane: plain connections served on event rings after negotiation.
//! * [`tls`] — TLS credentials, handshake and authorization, and the encrypted transport.
//! * [`client`] — the small client behind `serve -L` (listing a server's exports).
//!
//! Socket I/O happens in [`socket`], [`metrics`], [`server`] and [`plane`] (the two transmission drivers), [`tls`] (the
//! TLS handshake and stream) and [`client`]; the protocol modules are sans-I/O. This module
//! never imports `qcow2`: it sees images through `block::Chain` only.

pub mod client;
pub mod dispatch;
pub mod export;
pub mod extents;
pub mod handshake;
pub mod meta;
pub mod metrics;
#[cfg(feature = "uring")]
pub mod plane;
pub mod reply;
pub mod server;
pub mod session;
pub mod socket;
pub mod stats;
pub mod tls;
pub mod transmission;
pub mod wire;
