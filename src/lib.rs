//! qnbd: a qcow2 / raw image engine with a built-in NBD server.
//!
//! Floors (who may import whom), from the bottom:
//! 1. [`error`], [`log`], [`units`], [`cache`] (bounded caches), [`bitmap`] (dirty bitmaps in memory)
//! 2. [`io`] (storage + I/O engines, `io::sys` for other system calls: all io_uring and all
//!    `unsafe` code; `unsafe_code` is denied everywhere else)
//! 3. [`block`] (generic layer: `BlockDevice`, `Chain`), [`qcow2::spec`] (pure codecs)
//! 4. [`qcow2`] (the driver), `nbd` (the protocol; never imports `qcow2`)
//! 5. [`open`] (probe, open policy, engine choice, chain building)
//! 6. [`cli`] (argument structs, output formatting)
//! 7. [`testing`] (entry points of the fuzz targets and test helpers)
//!
//! `docs/architecture.md` draws the rooms and the READ / WRITE / BLOCK_STATUS routes.

#![deny(unsafe_code)]

pub mod bitmap;
pub mod block;
pub mod cache;
pub mod cli;
pub mod error;
pub mod io;
pub mod log;
pub mod nbd;
pub mod open;
pub mod qcow2;
pub mod testing;
pub mod units;

pub use error::{Error, ErrorKind, Result};
