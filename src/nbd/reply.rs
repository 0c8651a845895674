//! Replies on their way to the socket: encoded headers and page-aligned data buffers, sent with
//! one vectored write, so read data is copied once (page cache -> buffer) before the socket takes
//! it, and several replies leave in one system call.
//!
//! A [`ReplyBatch`] never does I/O itself: the server hands [`ReplyBatch::slices`] to the
//! transport and calls [`ReplyBatch::clear`] afterwards, which returns the data buffers to a
//! small pool for the next replies.

use crate::io::buf::{IoBuf, ALIGN};
use std::io::IoSlice;
use std::sync::{Arc, Mutex};

/// Bytes of idle data buffers a batch keeps for reuse.
const POOL_BYTES: usize = 8 << 20;
/// Data buffers up to this size are pooled; bigger ones are freed once sent.
const POOL_MAX_BUF: usize = 1 << 20;

#[derive(Debug)]
enum Part {
    /// `head[start..end]`.
    Head(usize, usize),
    /// The first `len` bytes of a buffer.
    Data(IoBuf, usize),
}

/// Idle data buffers, shared by the batches of one thread or data plane.
#[derive(Debug, Default)]
struct Pool {
    bufs: Vec<IoBuf>,
    bytes: usize,
}

/// Replies queued for one vectored write.
#[derive(Debug, Default)]
pub struct ReplyBatch {
    head: Vec<u8>,
    parts: Vec<Part>,
    pool: Arc<Mutex<Pool>>,
    bytes: usize,
}

/// A position in a batch to roll back to (a reply that could not be completed).
#[derive(Debug, Clone, Copy)]
pub struct Mark {
    head: usize,
    parts: usize,
    bytes: usize,
}

impl ReplyBatch {
    pub fn new() -> ReplyBatch {
        ReplyBatch::default()
    }

    /// An empty batch that takes and returns data buffers through `self`'s pool.
    pub fn sharing_pool(&self) -> ReplyBatch {
        ReplyBatch {
            pool: self.pool.clone(),
            ..ReplyBatch::default()
        }
    }

    /// Move everything queued in `other` to the end of `self` (data buffers are moved, not
    /// copied); `other` is left empty.
    pub fn append(&mut self, other: &mut ReplyBatch) {
        for p in std::mem::take(&mut other.parts) {
            match p {
                Part::Head(s, e) => self.push_head(|o| o.extend_from_slice(&other.head[s..e])),
                Part::Data(b, n) => self.push_data(b, n),
            }
        }
        other.head.clear();
        other.bytes = 0;
    }

    pub fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }

    /// Bytes queued.
    pub fn len(&self) -> usize {
        self.bytes
    }

    /// Pieces queued (each one I/O vector).
    pub fn pieces(&self) -> usize {
        self.parts.len()
    }

    /// Append header bytes written by `encode` (merged with header bytes just before them).
    pub fn push_head(&mut self, encode: impl FnOnce(&mut Vec<u8>)) {
        let start = self.head.len();
        encode(&mut self.head);
        let end = self.head.len();
        if end == start {
            return;
        }
        self.bytes += end - start;
        if let Some(Part::Head(_, e)) = self.parts.last_mut() {
            if *e == start {
                *e = end;
                return;
            }
        }
        self.parts.push(Part::Head(start, end));
    }

    /// A page-aligned buffer of at least `len` bytes (contents unspecified), from the pool when
    /// one fits.
    pub fn take_buf(&mut self, len: usize) -> IoBuf {
        let want = len.div_ceil(ALIGN).max(1) * ALIGN;
        if let Ok(mut p) = self.pool.lock() {
            if let Some(i) = p
                .bufs
                .iter()
                .position(|b| b.len() >= want && b.len() <= want * 2)
            {
                let b = p.bufs.swap_remove(i);
                p.bytes -= b.len();
                return b;
            }
        }
        IoBuf::new(want)
    }

    /// Give back a buffer taken with [`take_buf`](Self::take_buf) but not queued.
    pub fn give_back(&mut self, buf: IoBuf) {
        if let Ok(mut p) = self.pool.lock() {
            if buf.len() <= POOL_MAX_BUF && p.bytes + buf.len() <= POOL_BYTES {
                p.bytes += buf.len();
                p.bufs.push(buf);
            }
        }
    }

    /// Queue the first `len` bytes of `buf` (`len <= buf.len()`).
    pub fn push_data(&mut self, buf: IoBuf, len: usize) {
        let len = len.min(buf.len());
        self.bytes += len;
        self.parts.push(Part::Data(buf, len));
    }

    pub fn mark(&self) -> Mark {
        Mark {
            head: self.head.len(),
            parts: self.parts.len(),
            bytes: self.bytes,
        }
    }

    /// Drop everything queued after `m`.
    pub fn rollback(&mut self, m: Mark) {
        while self.parts.len() > m.parts {
            if let Some(Part::Data(b, _)) = self.parts.pop() {
                self.give_back(b);
            }
        }
        if let Some(Part::Head(_, e)) = self.parts.last_mut() {
            *e = (*e).min(m.head);
        }
        self.head.truncate(m.head);
        self.bytes = m.bytes;
    }

    /// The queued bytes as I/O vectors, in order.
    pub fn slices(&self) -> Vec<IoSlice<'_>> {
        self.parts
            .iter()
            .map(|p| match p {
                Part::Head(s, e) => IoSlice::new(&self.head[*s..*e]),
                Part::Data(b, n) => IoSlice::new(&b[..*n]),
            })
            .collect()
    }

    /// Everything queued, as one byte vector (tests, and callers that want plain bytes).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.bytes);
        for s in self.slices() {
            v.extend_from_slice(&s);
        }
        v
    }

    /// Forget what was queued (after it was sent); data buffers go back to the pool.
    pub fn clear(&mut self) {
        for p in std::mem::take(&mut self.parts) {
            if let Part::Data(b, _) = p {
                self.give_back(b);
            }
        }
        self.head.clear();
        self.bytes = 0;
    }
}

#[cfg(feature = "uring")]
impl crate::io::uring::SendData for ReplyBatch {
    fn slices(&self) -> Vec<IoSlice<'_>> {
        ReplyBatch::slices(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_keeps_order_and_rolls_back() {
        let mut b = ReplyBatch::new();
        b.push_head(|v| v.extend_from_slice(b"ab"));
        let mut d = b.take_buf(3);
        d[..3].copy_from_slice(b"cde");
        b.push_data(d, 3);
        b.push_head(|v| v.extend_from_slice(b"f"));
        let m = b.mark();
        b.push_head(|v| v.extend_from_slice(b"gh"));
        let d = b.take_buf(10);
        b.push_data(d, 10);
        b.rollback(m);
        b.push_head(|v| v.extend_from_slice(b"i"));
        assert_eq!(b.to_vec(), b"abcdefi");
        assert_eq!(b.len(), 7);
        assert_eq!(b.pieces(), 3);
        b.clear();
        assert!(b.is_empty());
        // the data buffers came back to the pool
        assert_eq!(b.pool.lock().unwrap().bufs.len(), 2);
        assert_eq!(b.take_buf(4096).as_ptr() as usize % ALIGN, 0);
    }
}
