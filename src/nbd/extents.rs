//! Building the descriptor list of one block-status reply chunk.
//!
//! The builder is fed runs in order from the request offset; it coalesces neighbours with equal
//! flags, clamps every extent to the request (so the reply never describes bytes the client did
//! not ask about: the CVE-2025-47711/47712 class of bugs), honours `NBD_CMD_FLAG_REQ_ONE` and
//! caps the number of descriptors so a fragmented image cannot make a reply unbounded.

/// Descriptors per chunk at most (qemu's `NBD_MAX_BLOCK_STATUS_EXTENTS`: 1 MiB of 8-byte
/// descriptors; the spec's ceiling is 2^20).
pub const MAX_EXTENTS: usize = (1 << 20) / 8;

/// One descriptor: length (non-zero) and status flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub len: u64,
    pub flags: u64,
}

#[derive(Debug, Clone)]
pub struct ExtentBuilder {
    end: u64,
    pos: u64,
    req_one: bool,
    cap: usize,
    full: bool,
    extents: Vec<Extent>,
}

impl ExtentBuilder {
    /// A builder for the request `[offset, offset + length)`; `cap` descriptors at most
    /// (clamped to at least 1).
    pub fn new(offset: u64, length: u64, req_one: bool, cap: usize) -> Self {
        ExtentBuilder {
            end: offset.saturating_add(length),
            pos: offset,
            req_one,
            cap: cap.max(1),
            full: length == 0,
            extents: Vec::new(),
        }
    }

    /// Whether the builder takes no more runs.
    pub fn is_done(&self) -> bool {
        self.full || self.pos >= self.end
    }

    /// Append the next run (contiguous with the previous one). Returns whether more runs are
    /// wanted.
    pub fn push(&mut self, len: u64, flags: u64) -> bool {
        if self.is_done() {
            return false;
        }
        let len = len.min(self.end - self.pos);
        if len == 0 {
            return !self.is_done();
        }
        let count = self.extents.len();
        match self.extents.last_mut() {
            Some(last) if last.flags == flags => last.len += len,
            Some(_) if self.req_one || count >= self.cap => {
                self.full = true;
                return false;
            }
            _ => self.extents.push(Extent { len, flags }),
        }
        self.pos += len;
        !self.is_done()
    }

    /// The descriptors (at least one when anything was pushed).
    pub fn finish(self) -> Vec<Extent> {
        self.extents
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_neighbours_coalesce_and_tail_is_clamped() {
        let mut b = ExtentBuilder::new(100, 1000, false, 10);
        assert!(b.push(50, 0));
        assert!(b.push(50, 0));
        assert!(b.push(400, 3));
        assert!(!b.push(1 << 40, 3));
        let e = b.finish();
        assert_eq!(
            e,
            [Extent { len: 100, flags: 0 }, Extent { len: 900, flags: 3 }]
        );
        assert_eq!(e.iter().map(|x| x.len).sum::<u64>(), 1000);
    }

    #[test]
    fn req_one_stops_at_the_first_change() {
        let mut b = ExtentBuilder::new(0, 1 << 30, true, 10);
        assert!(b.push(4096, 0));
        assert!(b.push(4096, 0));
        assert!(!b.push(4096, 3));
        assert_eq!(
            b.finish(),
            [Extent {
                len: 8192,
                flags: 0
            }]
        );
    }

    #[test]
    fn cap_bounds_the_descriptor_count() {
        let mut b = ExtentBuilder::new(0, u64::MAX, false, 3);
        let mut n = 0;
        while b.push(512, n % 2) {
            n += 1;
        }
        let e = b.finish();
        assert_eq!(e.len(), 3);
        assert!(e.iter().all(|x| x.len == 512));
    }
}
