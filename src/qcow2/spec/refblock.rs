//! qcow2 spec, "Host cluster management": refcount block entries of width 2^order bits
//! (orders 0..=6; sub-byte widths are LSB-first within each byte).

/// Read entry `index` of a refcount block. `None` if the index is outside `block`.
pub fn get(block: &[u8], order: u32, index: u64) -> Option<u64> {
    let bits = 1u64 << order;
    match order {
        0..=2 => {
            let per_byte = 8 / bits;
            let byte = *block.get(usize::try_from(index / per_byte).ok()?)?;
            let shift = (index % per_byte) * bits;
            Some(u64::from(byte >> shift) & ((1 << bits) - 1))
        }
        3..=6 => {
            let w = (bits / 8) as usize;
            let start = usize::try_from(index).ok()?.checked_mul(w)?;
            let b = block.get(start..start + w)?;
            Some(b.iter().fold(0u64, |acc, &x| (acc << 8) | u64::from(x)))
        }
        _ => None,
    }
}

/// Write entry `index`; returns false if the index or the value does not fit.
pub fn set(block: &mut [u8], order: u32, index: u64, value: u64) -> bool {
    let bits = 1u64 << order;
    if bits < 64 && value >> bits != 0 {
        return false;
    }
    match order {
        0..=2 => {
            let per_byte = 8 / bits;
            let Some(byte) = usize::try_from(index / per_byte)
                .ok()
                .and_then(|i| block.get_mut(i))
            else {
                return false;
            };
            let shift = (index % per_byte) * bits;
            let mask = (((1u64 << bits) - 1) << shift) as u8;
            *byte = (*byte & !mask) | ((value << shift) as u8 & mask);
            true
        }
        3..=6 => {
            let w = (bits / 8) as usize;
            let Some(start) = usize::try_from(index).ok().and_then(|i| i.checked_mul(w)) else {
                return false;
            };
            let Some(b) = block.get_mut(start..start + w) else {
                return false;
            };
            let be = value.to_be_bytes();
            b.copy_from_slice(&be[8 - w..]);
            true
        }
        _ => false,
    }
}

/// Largest refcount an entry of this order holds.
pub fn max_value(order: u32) -> u64 {
    if order >= 6 {
        u64::MAX
    } else {
        (1u64 << (1u64 << order)) - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_order_round_trips() {
        for order in 0..=6u32 {
            let mut block = vec![0u8; 64];
            let entries = 64 * 8 / (1u64 << order);
            for i in 0..entries {
                let v = (i * 7 + 1) & max_value(order);
                assert!(set(&mut block, order, i, v));
            }
            for i in 0..entries {
                assert_eq!(get(&block, order, i), Some((i * 7 + 1) & max_value(order)));
            }
            assert_eq!(get(&block, order, entries), None);
        }
    }

    #[test]
    fn sub_byte_entries_are_lsb_first() {
        let block = [0b0000_0010u8];
        assert_eq!(get(&block, 0, 1), Some(1));
        assert_eq!(get(&block, 0, 0), Some(0));
        let block = [0b1110_0100u8];
        assert_eq!(get(&block, 1, 0), Some(0));
        assert_eq!(get(&block, 1, 1), Some(1));
        assert_eq!(get(&block, 1, 2), Some(2));
        assert_eq!(get(&block, 1, 3), Some(3));
    }
}
