//! Writing the header: every change to the first cluster (a field updated in place by the
//! write side or by `check`, the whole header area rewritten for bitmaps, the extension area
//! rewritten by `check`) goes through [`write_header`], which writes and then syncs. The
//! bytes come from `spec/header.rs` (`HeaderField`, `Header::encode_area`); `create.rs`
//! encodes its first cluster with the same `encode_area`.

use super::spec::header::HeaderField;
use crate::io::Storage;
use std::io;

/// One change to the header cluster.
#[derive(Debug, Clone, Copy)]
pub(crate) enum HeaderWrite<'a> {
    /// One field (or pair of adjacent fields) in place.
    Field(HeaderField),
    /// Bytes of the header cluster from offset `at` on.
    Area { at: u64, bytes: &'a [u8] },
}

/// The step of [`write_header`] that failed.
#[derive(Debug)]
pub(crate) enum HeaderWriteError {
    Write(io::Error),
    Sync(io::Error),
}

impl HeaderWriteError {
    /// The I/O error, whichever step it came from.
    pub(crate) fn into_io(self) -> io::Error {
        match self {
            HeaderWriteError::Write(e) | HeaderWriteError::Sync(e) => e,
        }
    }
}

/// Write `w` and make it durable.
pub(crate) fn write_header(st: &dyn Storage, w: HeaderWrite<'_>) -> Result<(), HeaderWriteError> {
    match w {
        HeaderWrite::Field(f) => st.write_at(&f.encode(), f.offset()),
        HeaderWrite::Area { at, bytes } => st.write_at(bytes, at),
    }
    .map_err(HeaderWriteError::Write)?;
    st.sync().map_err(HeaderWriteError::Sync)
}
