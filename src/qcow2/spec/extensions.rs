//! qcow2 spec, "Header extensions": typed parsing of the extension area of the first cluster.
//!
//! The extension header and the fixed-size bodies (bitmaps, full disk encryption, feature name
//! table entries) are zerocopy big-endian records.

use super::limits::*;
use crate::error::{Error, Result};
use zerocopy::byteorder::big_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// qcow2 spec, "Header extensions": end of the extension area.
pub const EXT_END: u32 = 0x0000_0000;
/// qcow2 spec, "Header extensions": backing file format name string.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// qcow2 spec, "Header extensions": feature name table.
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
/// qcow2 spec, "Header extensions": bitmaps extension.
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// qcow2 spec, "Header extensions": full disk encryption header pointer.
pub const EXT_CRYPTO: u32 = 0x0537_be77;
/// qcow2 spec, "Header extensions": external data file name string.
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// qcow2 spec, "Header extensions": the header of every extension, followed by `length` bytes
/// of data and padding to 8.
#[derive(Debug, Clone, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawExtHeader {
    pub magic: U32,
    pub length: U32,
}
const _: () = assert!(std::mem::size_of::<RawExtHeader>() == 8);

/// qcow2 spec, "Feature name table": one entry as it lies on disk.
#[derive(Debug, Clone, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawFeatureName {
    pub feature_type: u8,
    pub bit_number: u8,
    /// Padded with zeros; not NUL-terminated when all 46 bytes are used.
    pub feature_name: [u8; 46],
}
const _: () = assert!(std::mem::size_of::<RawFeatureName>() == 48);

/// qcow2 spec, "Bitmaps extension": the extension data as it lies on disk.
#[derive(Debug, Clone, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawBitmapsExt {
    pub nb_bitmaps: U32,
    pub reserved32: U32,
    pub bitmap_directory_size: U64,
    pub bitmap_directory_offset: U64,
}
const _: () = assert!(std::mem::size_of::<RawBitmapsExt>() == 24);

/// qcow2 spec, "Full disk encryption header pointer": the extension data as it lies on disk.
#[derive(Debug, Clone, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawCryptoExt {
    pub offset: U64,
    pub length: U64,
}
const _: () = assert!(std::mem::size_of::<RawCryptoExt>() == 16);

/// One entry of the feature name table (qcow2 spec, "Feature name table").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureName {
    /// 0 incompatible, 1 compatible, 2 autoclear.
    pub kind: u8,
    pub bit: u8,
    pub name: String,
}

/// qcow2 spec, "Bitmaps extension".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapsExt {
    pub nb_bitmaps: u32,
    pub directory_size: u64,
    pub directory_offset: u64,
}

impl From<&RawBitmapsExt> for BitmapsExt {
    fn from(r: &RawBitmapsExt) -> Self {
        BitmapsExt {
            nb_bitmaps: r.nb_bitmaps.get(),
            directory_size: r.bitmap_directory_size.get(),
            directory_offset: r.bitmap_directory_offset.get(),
        }
    }
}

/// qcow2 spec, "Full disk encryption header pointer".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CryptoExt {
    pub offset: u64,
    pub length: u64,
}

/// Everything the extension area holds.
#[derive(Debug, Clone, Default)]
pub struct Extensions {
    pub backing_format: Option<String>,
    pub feature_table: Vec<FeatureName>,
    pub bitmaps: Option<BitmapsExt>,
    /// The bitmaps extension of an image whose autoclear `bitmaps` bit is clear: every bitmap
    /// in it is inconsistent (a writer without bitmap support touched the image).
    pub bitmaps_untrusted: Option<BitmapsExt>,
    pub crypto: Option<CryptoExt>,
    pub data_file: Option<String>,
    /// Extensions of unknown type, kept verbatim for header rewrites: (type, data).
    pub unknown: Vec<(u32, Vec<u8>)>,
}

/// Strings in extensions are not NUL-terminated; a NUL ends them early (as C code reads them).
fn ext_string(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

impl Extensions {
    /// Serialise the extension area (QEMU's order: crypto header, backing format, data file,
    /// feature table, bitmaps, unknown extensions, end), each padded to 8 bytes.
    pub fn encode(&self) -> Vec<u8> {
        fn put(out: &mut Vec<u8>, magic: u32, data: &[u8]) {
            let head = RawExtHeader {
                magic: U32::new(magic),
                length: U32::new(data.len() as u32),
            };
            out.extend_from_slice(head.as_bytes());
            out.extend_from_slice(data);
            while !out.len().is_multiple_of(8) {
                out.push(0);
            }
        }
        let mut out = Vec::new();
        if let Some(c) = self.crypto {
            let d = RawCryptoExt {
                offset: U64::new(c.offset),
                length: U64::new(c.length),
            };
            put(&mut out, EXT_CRYPTO, d.as_bytes());
        }
        if let Some(f) = &self.backing_format {
            put(&mut out, EXT_BACKING_FORMAT, f.as_bytes());
        }
        if let Some(f) = &self.data_file {
            put(&mut out, EXT_DATA_FILE, f.as_bytes());
        }
        if !self.feature_table.is_empty() {
            let d: Vec<RawFeatureName> = self
                .feature_table
                .iter()
                .map(|f| {
                    // longer names are cut to the field
                    let mut feature_name = [0u8; 46];
                    let n = f.name.len().min(feature_name.len());
                    feature_name[..n].copy_from_slice(&f.name.as_bytes()[..n]);
                    RawFeatureName {
                        feature_type: f.kind,
                        bit_number: f.bit,
                        feature_name,
                    }
                })
                .collect();
            put(&mut out, EXT_FEATURE_TABLE, d.as_bytes());
        }
        if let Some(b) = self.bitmaps {
            let d = RawBitmapsExt {
                nb_bitmaps: U32::new(b.nb_bitmaps),
                reserved32: U32::new(0),
                bitmap_directory_size: U64::new(b.directory_size),
                bitmap_directory_offset: U64::new(b.directory_offset),
            };
            put(&mut out, EXT_BITMAPS, d.as_bytes());
        }
        for (m, d) in &self.unknown {
            put(&mut out, *m, d);
        }
        put(&mut out, EXT_END, &[]);
        out
    }

    /// Parse the extension area `area` (the bytes of the first cluster from `start` to `end`).
    /// `cluster_size` validates the bitmap directory offset; `autoclear_bitmaps` tells whether
    /// the bitmaps extension is to be trusted (QEMU skips its validation when the bit is clear).
    pub fn parse(area: &[u8], cluster_size: u64, autoclear_bitmaps: bool) -> Result<Extensions> {
        let mut ext = Extensions::default();
        let mut seen: Vec<u32> = Vec::new();
        let mut off = 0usize;
        let end = area.len();
        while off < end {
            let Ok((head, _)) = RawExtHeader::ref_from_prefix(&area[off..]) else {
                return Err(Error::invalid("Header extension too large"));
            };
            let magic = head.magic.get();
            let len = head.length.get() as usize;
            off += std::mem::size_of::<RawExtHeader>();
            if len > end - off {
                return Err(Error::invalid("Header extension too large"));
            }
            let data = &area[off..off + len];
            if magic == EXT_END && len != 0 {
                return Err(Error::invalid(format!(
                    "Header extension end marker with non-zero length {len}"
                )));
            }
            if magic != EXT_END && seen.contains(&magic) {
                return Err(Error::invalid(format!(
                    "Header extension {magic:#010x} appears twice"
                )));
            }
            seen.push(magic);
            match magic {
                EXT_END => return Ok(ext),
                EXT_BACKING_FORMAT => {
                    if len >= 16 {
                        return Err(Error::invalid(format!(
                            "ERROR: ext_backing_format: len={len} too large (>=16)"
                        )));
                    }
                    ext.backing_format = Some(ext_string(data));
                }
                EXT_FEATURE_TABLE => {
                    // whole entries only; a trailing partial entry is ignored
                    let entries =
                        <[RawFeatureName]>::ref_from_prefix(data).map_or(&[][..], |(t, _)| t);
                    ext.feature_table = entries
                        .iter()
                        .map(|e| FeatureName {
                            kind: e.feature_type,
                            bit: e.bit_number,
                            name: ext_string(&e.feature_name),
                        })
                        .collect();
                }
                EXT_CRYPTO => {
                    let Ok(c) = RawCryptoExt::ref_from_bytes(data) else {
                        return Err(Error::invalid(format!(
                            "CRYPTO header extension size {len}, but expected size 16"
                        )));
                    };
                    let offset = c.offset.get();
                    if !offset.is_multiple_of(cluster_size) {
                        return Err(Error::invalid(format!(
                            "Encryption header offset '{offset}' is not a multiple of cluster size '{cluster_size}'"
                        )));
                    }
                    ext.crypto = Some(CryptoExt {
                        offset,
                        length: c.length.get(),
                    });
                }
                EXT_BITMAPS => {
                    let Ok(raw) = RawBitmapsExt::ref_from_bytes(data) else {
                        return Err(Error::invalid("bitmaps_ext: Invalid extension length"));
                    };
                    if !autoclear_bitmaps {
                        ext.bitmaps_untrusted = Some(BitmapsExt::from(raw));
                    }
                    if autoclear_bitmaps {
                        if raw.reserved32.get() != 0 {
                            return Err(Error::invalid("bitmaps_ext: Reserved field is not zero"));
                        }
                        let b = BitmapsExt::from(raw);
                        if b.nb_bitmaps > MAX_BITMAPS {
                            return Err(Error::invalid(format!(
                                "bitmaps_ext: Image has {} bitmaps, exceeding the QEMU supported maximum of {MAX_BITMAPS}",
                                b.nb_bitmaps
                            )));
                        }
                        if b.nb_bitmaps == 0 {
                            return Err(Error::invalid(
                                "found bitmaps extension with zero bitmaps",
                            ));
                        }
                        if !b.directory_offset.is_multiple_of(cluster_size) {
                            return Err(Error::invalid(
                                "bitmaps_ext: invalid bitmap directory offset",
                            ));
                        }
                        if b.directory_size > MAX_BITMAP_DIRECTORY_SIZE {
                            return Err(Error::invalid(format!(
                                "bitmaps_ext: bitmap directory size ({}) exceeds the maximum supported size ({MAX_BITMAP_DIRECTORY_SIZE})",
                                b.directory_size
                            )));
                        }
                        ext.bitmaps = Some(b);
                    }
                }
                EXT_DATA_FILE => ext.data_file = Some(ext_string(data)),
                other => ext.unknown.push((other, data.to_vec())),
            }
            off += len.div_ceil(8) * 8;
        }
        Ok(ext)
    }

    /// QEMU's `report_unsupported_feature` message for unknown incompatible bits.
    pub fn unsupported_features_message(&self, mut mask: u64) -> String {
        let mut parts = Vec::new();
        for f in &self.feature_table {
            if f.name.is_empty() {
                break;
            }
            if f.kind == 0 && f.bit < 64 && mask & (1u64 << f.bit) != 0 {
                parts.push(f.name.clone());
                mask &= !(1u64 << f.bit);
            }
        }
        if mask != 0 {
            parts.push(format!("Unknown incompatible feature: {mask:x}"));
        }
        format!("Unsupported qcow2 feature(s): {}", parts.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(magic: u32, data: &[u8]) -> Vec<u8> {
        let mut v = magic.to_be_bytes().to_vec();
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        while !v.len().is_multiple_of(8) {
            v.push(0);
        }
        v
    }

    #[test]
    fn parses_backing_format_and_keeps_unknown_extensions() {
        let mut area = ext(EXT_BACKING_FORMAT, b"raw");
        area.extend(ext(0x1234_5678, b"abc"));
        area.extend(ext(EXT_END, b""));
        let e = Extensions::parse(&area, 65536, true).unwrap();
        assert_eq!(e.backing_format.as_deref(), Some("raw"));
        assert_eq!(e.unknown, vec![(0x1234_5678, b"abc".to_vec())]);
    }

    #[test]
    fn extension_running_past_the_area_is_refused() {
        let mut area = 0x1234_5678u32.to_be_bytes().to_vec();
        area.extend_from_slice(&1000u32.to_be_bytes());
        area.extend_from_slice(&[0; 16]);
        let e = Extensions::parse(&area, 65536, true).unwrap_err();
        assert_eq!(e.message(), "Header extension too large");
    }

    #[test]
    fn feature_table_names_unknown_bits() {
        let mut entry = vec![0u8, 40];
        let mut name = b"shiny".to_vec();
        name.resize(46, 0);
        entry.extend(name);
        let area = ext(EXT_FEATURE_TABLE, &entry);
        let e = Extensions::parse(&area, 65536, true).unwrap();
        assert_eq!(
            e.unsupported_features_message((1 << 40) | (1 << 41)),
            "Unsupported qcow2 feature(s): shiny, Unknown incompatible feature: 20000000000"
        );
    }

    #[test]
    fn feature_table_ignores_a_partial_entry_and_cuts_long_names() {
        let mut entry = vec![1u8, 3];
        entry.extend([b'n'; 46]);
        entry.extend([2u8; 47]);
        let e = Extensions::parse(&ext(EXT_FEATURE_TABLE, &entry), 65536, true).unwrap();
        assert_eq!(e.feature_table.len(), 1);
        assert_eq!(e.feature_table[0].name, "n".repeat(46));
        let e = Extensions {
            feature_table: vec![FeatureName {
                kind: 1,
                bit: 3,
                name: "n".repeat(50),
            }],
            ..Extensions::default()
        };
        let mut want = ext(EXT_FEATURE_TABLE, &entry[..48]);
        want.extend(ext(EXT_END, b""));
        assert_eq!(e.encode(), want);
    }

    #[test]
    fn bitmaps_and_crypto_round_trip() {
        let e = Extensions {
            bitmaps: Some(BitmapsExt {
                nb_bitmaps: 2,
                directory_size: 48,
                directory_offset: 0x3_0000,
            }),
            crypto: Some(CryptoExt {
                offset: 0x2_0000,
                length: 0x1234,
            }),
            ..Extensions::default()
        };
        let area = e.encode();
        let mut crypto = 0x2_0000u64.to_be_bytes().to_vec();
        crypto.extend_from_slice(&0x1234u64.to_be_bytes());
        assert_eq!(area[..24], ext(EXT_CRYPTO, &crypto)[..]);
        let p = Extensions::parse(&area, 65536, true).unwrap();
        assert_eq!(p.bitmaps, e.bitmaps);
        assert_eq!(p.crypto, e.crypto);
        let err = Extensions::parse(&ext(EXT_CRYPTO, &crypto[..15]), 65536, true).unwrap_err();
        assert_eq!(
            err.message(),
            "CRYPTO header extension size 15, but expected size 16"
        );
        let err = Extensions::parse(&ext(EXT_BITMAPS, &[0; 23]), 65536, true).unwrap_err();
        assert_eq!(err.message(), "bitmaps_ext: Invalid extension length");
    }
}
