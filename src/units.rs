//! Byte-size helpers shared by every layer: parsing of size suffixes (as qemu-img accepts them) and
//! human formatting (as qemu-img prints them), plus checked alignment arithmetic.

/// Round `v` up to a multiple of the power of two `align`; `None` on overflow.
pub fn align_up(v: u64, align: u64) -> Option<u64> {
    debug_assert!(align.is_power_of_two());
    v.checked_add(align - 1).map(|x| x & !(align - 1))
}

/// Round `v` down to a multiple of the power of two `align`.
pub fn align_down(v: u64, align: u64) -> u64 {
    debug_assert!(align.is_power_of_two());
    v & !(align - 1)
}

/// `ceil(a / b)` for `b > 0`.
pub fn div_ceil(a: u64, b: u64) -> u64 {
    a / b + u64::from(!a.is_multiple_of(b))
}

/// Parse a size as qemu-img does: a number with an optional suffix k/K, M, G, T, P, E (powers of
/// 1024) or b/B (bytes). Fractions are accepted with a suffix ("1.5G").
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_lowercase() {
                'b' => 0,
                'k' => 10,
                'm' => 20,
                'g' => 30,
                't' => 40,
                'p' => 50,
                'e' => 60,
                _ => return None,
            };
            (&s[..i], 1u64 << shift)
        }
        _ => (s, 1),
    };
    if num.is_empty() {
        return None;
    }
    if let Ok(v) = num.parse::<u64>() {
        return v.checked_mul(mult);
    }
    if mult > 1 {
        if let Ok(f) = num.parse::<f64>() {
            if f.is_finite() && f >= 0.0 {
                let v = f * mult as f64;
                if v < u64::MAX as f64 {
                    return Some(v as u64);
                }
            }
        }
    }
    None
}

/// qemu's `size_to_str`: "1 MiB", "1.32 MiB", "512 B". Three significant digits, binary units.
pub fn size_to_str(val: u64) -> String {
    const SUFFIXES: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    // Same algorithm as qemu's util/cutils.c size_to_str(): pick the largest unit such that the
    // value is at least 1000 units of the previous one, print with %0.3g.
    let mut i = 0usize;
    let mut div: f64 = 1.0;
    while i + 1 < SUFFIXES.len() && (val as f64) / (div * 1024.0) >= 0.9765625 {
        // qemu: frexp(val / (1000 / 1024), &i) -> (i - 1) / 10 is the unit
        i += 1;
        div *= 1024.0;
    }
    let v = val as f64 / div;
    format!("{} {}", fmt_g3(v), SUFFIXES[i])
}

/// C's `%0.3g` for the positive values `size_to_str` prints.
fn fmt_g3(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let exp = v.abs().log10().floor() as i32;
    let exp = {
        // rounding can carry into the next decade (999.6 -> 1e+03)
        let scaled = (v / 10f64.powi(exp - 2)).round();
        if scaled >= 1000.0 {
            exp + 1
        } else {
            exp
        }
    };
    if !(-4..3).contains(&exp) {
        // %g switches to exponent form; sizes never get there with binary units below 1000*1024
        let m = v / 10f64.powi(exp);
        return format!("{}e+{:02}", trim_zeros(&format!("{:.2}", m)), exp);
    }
    let decimals = (2 - exp).max(0) as usize;
    trim_zeros(&format!("{:.*}", decimals, v))
}

fn trim_zeros(s: &str) -> String {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_qemu_size_suffixes() {
        assert_eq!(parse_size("64k"), Some(65536));
        assert_eq!(parse_size("1M"), Some(1 << 20));
        assert_eq!(parse_size("1.5G"), Some(3 << 29));
        assert_eq!(parse_size("512"), Some(512));
        assert_eq!(parse_size("512b"), Some(512));
        assert_eq!(parse_size("x"), None);
        assert_eq!(parse_size("20E"), None);
    }

    #[test]
    fn formats_sizes_like_qemu() {
        assert_eq!(size_to_str(8 << 20), "8 MiB");
        assert_eq!(size_to_str(1380352), "1.32 MiB");
        assert_eq!(size_to_str(512), "512 B");
        assert_eq!(size_to_str(1000), "0.977 KiB");
        assert_eq!(size_to_str(5 << 30), "5 GiB");
        assert_eq!(size_to_str(1441792), "1.38 MiB");
    }

    #[test]
    fn alignment_helpers_are_checked() {
        assert_eq!(align_up(1, 512), Some(512));
        assert_eq!(align_up(u64::MAX, 512), None);
        assert_eq!(align_down(1023, 512), 512);
        assert_eq!(div_ceil(1025, 512), 3);
    }
}
