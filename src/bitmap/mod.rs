//! Format-agnostic dirty bitmaps: one bit per `granularity` bytes of guest space, set by every
//! write, write-zeroes and discard while the bitmap is enabled.
//!
//! Bits live in chunks allocated on first use, so a large disk with a fine granularity costs
//! memory only where it was written (a 1 TiB disk at 512 B granularity has 2^31 bits; an empty
//! bitmap of it allocates nothing). Bit order inside the chunk words is LSB-first, the order of
//! the qcow2 on-disk format, so serialising a chunk is a byte copy.

/// Bits per chunk (8 KiB of bitmap).
const CHUNK_BITS: u64 = 1 << 16;
const WORDS: usize = (CHUNK_BITS / 64) as usize;

/// What a bitmap may be used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Records writes (qcow2 `auto` flag).
    Enabled,
    /// Kept but not recording.
    Disabled,
    /// Left `in-use` by a writer that did not close the image, or invalidated: listed, never
    /// exported, never trusted.
    Inconsistent,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Enabled => "enabled",
            State::Disabled => "disabled",
            State::Inconsistent => "inconsistent",
        }
    }
}

#[derive(Clone)]
pub struct DirtyBitmap {
    granularity: u64,
    size: u64,
    chunks: Vec<Option<Box<[u64; WORDS]>>>,
}

impl std::fmt::Debug for DirtyBitmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyBitmap")
            .field("granularity", &self.granularity)
            .field("size", &self.size)
            .field(
                "chunks",
                &self.chunks.iter().filter(|c| c.is_some()).count(),
            )
            .finish()
    }
}

impl DirtyBitmap {
    /// An all-clean bitmap for a disk of `size` bytes. `granularity` is a power of two.
    pub fn new(size: u64, granularity: u64) -> DirtyBitmap {
        debug_assert!(granularity.is_power_of_two());
        let bits = size.div_ceil(granularity);
        let nchunks = bits.div_ceil(CHUNK_BITS) as usize;
        DirtyBitmap {
            granularity,
            size,
            chunks: vec![None; nchunks],
        }
    }

    pub fn granularity(&self) -> u64 {
        self.granularity
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Number of bits.
    pub fn bits(&self) -> u64 {
        self.size.div_ceil(self.granularity)
    }

    fn chunk_mut(&mut self, c: usize) -> &mut [u64; WORDS] {
        self.chunks[c].get_or_insert_with(|| Box::new([0u64; WORDS]))
    }

    /// Set bits `[first, last]`.
    fn set_bits(&mut self, first: u64, last: u64) {
        let mut b = first;
        while b <= last {
            let c = (b / CHUNK_BITS) as usize;
            let in_c = b % CHUNK_BITS;
            let end_in_c = (last - c as u64 * CHUNK_BITS).min(CHUNK_BITS - 1);
            let chunk = self.chunk_mut(c);
            let mut i = in_c;
            while i <= end_in_c {
                let w = (i / 64) as usize;
                let bit = i % 64;
                if bit == 0 && end_in_c - i >= 63 {
                    chunk[w] = u64::MAX;
                    i += 64;
                } else {
                    chunk[w] |= 1 << bit;
                    i += 1;
                }
            }
            b = c as u64 * CHUNK_BITS + end_in_c + 1;
        }
    }

    /// Mark guest bytes `[off, off+len)` dirty.
    pub fn mark(&mut self, off: u64, len: u64) {
        if len == 0 || off >= self.size {
            return;
        }
        let end = off.saturating_add(len).min(self.size);
        self.set_bits(off / self.granularity, (end - 1) / self.granularity);
    }

    pub fn is_set(&self, bit: u64) -> bool {
        let c = (bit / CHUNK_BITS) as usize;
        match self.chunks.get(c) {
            Some(Some(ch)) => {
                let i = bit % CHUNK_BITS;
                ch[(i / 64) as usize] >> (i % 64) & 1 != 0
            }
            _ => false,
        }
    }

    pub fn clear(&mut self) {
        for c in &mut self.chunks {
            *c = None;
        }
    }

    /// OR `other` into this bitmap (same size; granularities may differ: a bit of `other`
    /// dirties every byte range it covers).
    pub fn merge(&mut self, other: &DirtyBitmap) {
        if other.granularity == self.granularity && other.size == self.size {
            for (i, oc) in other.chunks.iter().enumerate() {
                if let Some(oc) = oc {
                    let ch = self.chunk_mut(i);
                    for (a, b) in ch.iter_mut().zip(oc.iter()) {
                        *a |= *b;
                    }
                }
            }
            return;
        }
        let mut off = 0;
        while off < other.size {
            let (len, dirty) = other.run_at(off, other.size - off);
            if dirty {
                self.mark(off, len);
            }
            off += len;
        }
    }

    /// Number of dirty bytes (dirty bits × granularity, clamped at the disk end).
    pub fn dirty_bytes(&self) -> u64 {
        let mut n = 0u64;
        let mut off = 0;
        while off < self.size {
            let (len, dirty) = self.run_at(off, self.size - off);
            if dirty {
                n += len;
            }
            off += len;
        }
        n
    }

    /// The run of equal state starting at guest offset `off` (< size), at most `max` bytes:
    /// (length, dirty).
    pub fn run_at(&self, off: u64, max: u64) -> (u64, bool) {
        let g = self.granularity;
        let end_limit = off.saturating_add(max).min(self.size);
        let first = off / g;
        let dirty = self.is_set(first);
        let total_bits = self.bits();
        let mut b = first + 1;
        let last_needed = (end_limit - 1) / g;
        while b <= last_needed && b < total_bits {
            let c = (b / CHUNK_BITS) as usize;
            match &self.chunks[c] {
                None => {
                    if dirty {
                        break;
                    }
                    b = (c as u64 + 1) * CHUNK_BITS;
                    continue;
                }
                Some(ch) => {
                    let i = b % CHUNK_BITS;
                    let w = ch[(i / 64) as usize];
                    let bit = i % 64;
                    let want = if dirty { u64::MAX } else { 0 };
                    if bit == 0 && w == want {
                        b += 64;
                        continue;
                    }
                    if (w >> bit & 1 != 0) != dirty {
                        break;
                    }
                    b += 1;
                }
            }
        }
        let end = (b * g).min(end_limit);
        (end - off, dirty)
    }

    /// Serialised bytes of bits `[first_bit, first_bit + 8 * out.len())` (LSB-first, as the
    /// qcow2 bitmap data clusters hold them); bits past the end are zero.
    pub fn serialize(&self, first_bit: u64, out: &mut [u8]) {
        out.fill(0);
        let total = self.bits();
        for (i, byte) in out.iter_mut().enumerate() {
            let base = first_bit + 8 * i as u64;
            if base >= total {
                break;
            }
            let c = (base / CHUNK_BITS) as usize;
            let Some(Some(ch)) = self.chunks.get(c) else {
                continue;
            };
            let in_c = base % CHUNK_BITS;
            let w = ch[(in_c / 64) as usize];
            *byte = (w >> (in_c % 64)) as u8;
        }
        // bits beyond the end of the disk stay zero
        let valid_bits = total.saturating_sub(first_bit);
        if valid_bits < out.len() as u64 * 8 {
            let full = (valid_bits / 8) as usize;
            if let Some(b) = out.get_mut(full) {
                *b &= (1u16 << (valid_bits % 8)).wrapping_sub(1) as u8;
            }
            for b in out.iter_mut().skip(full + 1) {
                *b = 0;
            }
        }
    }

    /// Load serialised bytes for bits starting at `first_bit`.
    pub fn deserialize(&mut self, first_bit: u64, data: &[u8]) {
        let total = self.bits();
        for (i, &byte) in data.iter().enumerate() {
            if byte == 0 {
                continue;
            }
            for k in 0..8u64 {
                if byte >> k & 1 != 0 {
                    let bit = first_bit + 8 * i as u64 + k;
                    if bit < total {
                        self.set_bits(bit, bit);
                    }
                }
            }
        }
    }

    /// Set every bit of `[first_bit, first_bit + n)` (a qcow2 "all ones" table entry).
    pub fn set_range_bits(&mut self, first_bit: u64, n: u64) {
        let total = self.bits();
        if first_bit >= total || n == 0 {
            return;
        }
        let last = (first_bit + n - 1).min(total - 1);
        self.set_bits(first_bit, last);
    }

    /// Whether bits `[first_bit, first_bit + n)` are all clear (cheap for untouched chunks).
    pub fn range_clear(&self, first_bit: u64, n: u64) -> bool {
        let total = self.bits();
        let end = (first_bit + n).min(total);
        let mut b = first_bit;
        while b < end {
            let c = (b / CHUNK_BITS) as usize;
            match &self.chunks[c] {
                None => b = (c as u64 + 1) * CHUNK_BITS,
                Some(ch) => {
                    let i = b % CHUNK_BITS;
                    if i.is_multiple_of(64) && end - b >= 64 {
                        if ch[(i / 64) as usize] != 0 {
                            return false;
                        }
                        b += 64;
                    } else {
                        if ch[(i / 64) as usize] >> (i % 64) & 1 != 0 {
                            return false;
                        }
                        b += 1;
                    }
                }
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_at_granularity_and_reports_runs() {
        let mut b = DirtyBitmap::new(1 << 20, 65536);
        b.mark(100, 10);
        b.mark(3 * 65536 - 1, 2);
        assert_eq!(b.run_at(0, 1 << 20), (65536, true));
        assert_eq!(b.run_at(65536, 1 << 20), (65536, false));
        assert_eq!(b.run_at(2 * 65536, 1 << 20), (2 * 65536, true));
        assert_eq!(b.dirty_bytes(), 3 * 65536);
        assert_eq!(b.run_at(4 * 65536, 1 << 20), ((1 << 20) - 4 * 65536, false));
    }

    #[test]
    fn runs_cross_chunks_and_clamp_to_the_disk_end() {
        let size = 3 * CHUNK_BITS * 512 + 1000;
        let mut b = DirtyBitmap::new(size, 512);
        b.mark(CHUNK_BITS * 512 - 512, 3 * 512);
        assert_eq!(b.run_at(0, size), (CHUNK_BITS * 512 - 512, false));
        assert_eq!(b.run_at(CHUNK_BITS * 512 - 512, size), (3 * 512, true));
        b.mark(size - 1, 1);
        // the last bit covers the partial tail [size - 488, size)
        assert_eq!(b.run_at(size - 1000, size), (512, false));
        assert_eq!(b.run_at(size - 488, size), (488, true));
    }

    #[test]
    fn serialisation_round_trips_lsb_first() {
        let mut b = DirtyBitmap::new(100 * 512, 512);
        b.mark(0, 512);
        b.mark(9 * 512, 512);
        let mut out = [0u8; 16];
        b.serialize(0, &mut out);
        assert_eq!(out[0], 0b0000_0001);
        assert_eq!(out[1], 0b0000_0010);
        let mut c = DirtyBitmap::new(100 * 512, 512);
        c.deserialize(0, &out);
        assert_eq!(c.dirty_bytes(), 1024);
        // bits past the end (bit 100..128) are never serialised as set
        let mut d = DirtyBitmap::new(100 * 512, 512);
        d.set_range_bits(0, 1 << 20);
        d.serialize(0, &mut out);
        assert_eq!(out[12], 0x0f);
        assert_eq!(out[13], 0);
    }

    #[test]
    fn merge_with_other_granularity() {
        let mut a = DirtyBitmap::new(1 << 20, 512);
        let mut b = DirtyBitmap::new(1 << 20, 65536);
        b.mark(70000, 1);
        a.merge(&b);
        assert_eq!(a.run_at(65536, 1 << 20), (65536, true));
        assert!(a.range_clear(0, 128));
    }
}
