//! Page-aligned I/O buffers. A plain `Vec<u8>` may start 16 bytes off a page boundary; copies
//! from the page cache into such buffers measured several times slower, and `O_DIRECT` refuses
//! them, so data buffers are allocated aligned here.

use std::alloc::{self, Layout};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

pub const ALIGN: usize = 4096;

/// An owned, zero-initialised, page-aligned byte buffer.
pub struct IoBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: IoBuf owns its allocation exclusively (like Vec<u8>); no interior sharing.
unsafe impl Send for IoBuf {}
// SAFETY: shared references only give `&[u8]` access.
unsafe impl Sync for IoBuf {}

impl IoBuf {
    /// A zeroed buffer of `len` bytes (`len` may be 0).
    pub fn new(len: usize) -> IoBuf {
        if len == 0 {
            return IoBuf {
                ptr: NonNull::dangling(),
                len: 0,
            };
        }
        let layout = Self::layout(len);
        // SAFETY: layout has a non-zero size (len > 0) and a valid power-of-two alignment.
        let p = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(p) else {
            alloc::handle_alloc_error(layout)
        };
        IoBuf { ptr, len }
    }

    fn layout(len: usize) -> Layout {
        match Layout::from_size_align(len.div_ceil(ALIGN) * ALIGN, ALIGN) {
            Ok(l) => l,
            // only for sizes near usize::MAX, which no caller can request successfully anyway
            Err(_) => alloc::handle_alloc_error(Layout::new::<u8>()),
        }
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: ptr was allocated in `new` with exactly this layout and not freed since.
            unsafe { alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.len)) }
        }
    }
}

impl Deref for IoBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for len initialised (zeroed at allocation) bytes, or dangling
        // with len 0, which from_raw_parts allows.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for IoBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl std::fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IoBuf({} bytes)", self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_page_aligned_and_zeroed() {
        for len in [0, 1, 4096, 5000, 1 << 20] {
            let mut b = IoBuf::new(len);
            assert_eq!(b.len(), len);
            assert!(b.iter().all(|&x| x == 0));
            if len > 0 {
                assert_eq!(b.as_ptr() as usize % ALIGN, 0);
                b[len - 1] = 7;
                assert_eq!(b[len - 1], 7);
            }
        }
    }
}
