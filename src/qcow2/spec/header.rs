//! qcow2 spec, "Header": the fixed header (v2: 72 bytes, v3: at least 104) and its validation.

use super::extensions::Extensions;
use super::limits::*;
use crate::error::{Error, Result};
use zerocopy::byteorder::big_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// qcow2 spec, "Header": magic "QFI\xfb".
pub const QCOW_MAGIC: u32 = 0x5146_49fb;

/// Incompatible feature bits (qcow2 spec, "Header", bytes 72-79).
pub mod incompat {
    pub const DIRTY: u64 = 1 << 0;
    pub const CORRUPT: u64 = 1 << 1;
    pub const DATA_FILE: u64 = 1 << 2;
    pub const COMPRESSION: u64 = 1 << 3;
    pub const EXTL2: u64 = 1 << 4;
    pub const MASK: u64 = DIRTY | CORRUPT | DATA_FILE | COMPRESSION | EXTL2;
}
/// Compatible feature bits.
pub mod compat {
    pub const LAZY_REFCOUNTS: u64 = 1 << 0;
}
/// Autoclear feature bits.
pub mod autoclear {
    pub const BITMAPS: u64 = 1 << 0;
    pub const DATA_FILE_RAW: u64 = 1 << 1;
    pub const MASK: u64 = BITMAPS | DATA_FILE_RAW;
}

/// Encryption methods (header `crypt_method`).
pub const CRYPT_NONE: u32 = 0;
pub const CRYPT_AES: u32 = 1;
pub const CRYPT_LUKS: u32 = 2;

/// The header as it lies on disk (v3 layout with the compression type byte).
#[derive(Debug, Clone, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawHeader {
    pub magic: U32,
    pub version: U32,
    pub backing_file_offset: U64,
    pub backing_file_size: U32,
    pub cluster_bits: U32,
    pub size: U64,
    pub crypt_method: U32,
    pub l1_size: U32,
    pub l1_table_offset: U64,
    pub refcount_table_offset: U64,
    pub refcount_table_clusters: U32,
    pub nb_snapshots: U32,
    pub snapshots_offset: U64,
    // version 3
    pub incompatible_features: U64,
    pub compatible_features: U64,
    pub autoclear_features: U64,
    pub refcount_order: U32,
    pub header_length: U32,
    pub compression_type: u8,
    pub padding: [u8; 7],
}

pub const RAW_HEADER_LEN: usize = std::mem::size_of::<RawHeader>();
const _: () = assert!(RAW_HEADER_LEN == 112);

/// qcow2 spec, "Header": the fields a writer updates in place, each written as one piece
/// (two adjacent fields that must change together are one variant).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderField {
    /// `size` (bytes 24-31).
    Size(u64),
    /// `l1_size` and `l1_table_offset` (bytes 36-47).
    L1Table { size: u32, offset: u64 },
    /// `refcount_table_offset` and `refcount_table_clusters` (bytes 48-59).
    RefcountTable { offset: u64, clusters: u32 },
    /// `incompatible_features` (bytes 72-79).
    IncompatibleFeatures(u64),
    /// `autoclear_features` (bytes 88-95).
    AutoclearFeatures(u64),
}

impl HeaderField {
    /// Byte offset of the field in the header.
    pub fn offset(&self) -> u64 {
        (match self {
            HeaderField::Size(_) => std::mem::offset_of!(RawHeader, size),
            HeaderField::L1Table { .. } => std::mem::offset_of!(RawHeader, l1_size),
            HeaderField::RefcountTable { .. } => {
                std::mem::offset_of!(RawHeader, refcount_table_offset)
            }
            HeaderField::IncompatibleFeatures(_) => {
                std::mem::offset_of!(RawHeader, incompatible_features)
            }
            HeaderField::AutoclearFeatures(_) => {
                std::mem::offset_of!(RawHeader, autoclear_features)
            }
        }) as u64
    }

    /// The field's bytes as on disk.
    pub fn encode(&self) -> Vec<u8> {
        match *self {
            HeaderField::Size(v)
            | HeaderField::IncompatibleFeatures(v)
            | HeaderField::AutoclearFeatures(v) => v.to_be_bytes().to_vec(),
            HeaderField::L1Table { size, offset } => {
                let mut b = size.to_be_bytes().to_vec();
                b.extend_from_slice(&offset.to_be_bytes());
                b
            }
            HeaderField::RefcountTable { offset, clusters } => {
                let mut b = offset.to_be_bytes().to_vec();
                b.extend_from_slice(&clusters.to_be_bytes());
                b
            }
        }
    }
}

/// Compression type of the image (qcow2 spec, "Additional fields", byte 104).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompressionType {
    Zlib,
    Zstd,
}

impl CompressionType {
    pub fn name(self) -> &'static str {
        match self {
            CompressionType::Zlib => "zlib",
            CompressionType::Zstd => "zstd",
        }
    }
}

/// A validated header. Everything that sizes an allocation has been bounded.
#[derive(Debug, Clone)]
pub struct Header {
    pub version: u32,
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible_features: u64,
    pub compatible_features: u64,
    pub autoclear_features: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression_type: CompressionType,
    /// Bytes of header fields beyond the 112 we know (kept for rewrites).
    pub unknown_fields: Vec<u8>,
}

/// Problems found before the feature table is available: unknown incompatible bits are reported
/// by the caller, which can read the feature name table.
#[derive(Debug)]
pub enum HeaderError {
    Fatal(Error),
    UnknownIncompatible { header: Box<Header>, mask: u64 },
}

impl From<Error> for HeaderError {
    fn from(e: Error) -> Self {
        HeaderError::Fatal(e)
    }
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    pub fn extended_l2(&self) -> bool {
        self.incompatible_features & incompat::EXTL2 != 0
    }

    pub fn has_data_file(&self) -> bool {
        self.incompatible_features & incompat::DATA_FILE != 0
    }

    pub fn data_file_raw(&self) -> bool {
        self.autoclear_features & autoclear::DATA_FILE_RAW != 0
    }

    pub fn is_corrupt(&self) -> bool {
        self.incompatible_features & incompat::CORRUPT != 0
    }

    pub fn is_dirty(&self) -> bool {
        self.incompatible_features & incompat::DIRTY != 0
    }

    pub fn lazy_refcounts(&self) -> bool {
        self.compatible_features & compat::LAZY_REFCOUNTS != 0
    }

    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// Bytes per L2 entry (8, or 16 with extended L2).
    pub fn l2_entry_size(&self) -> u64 {
        if self.extended_l2() {
            16
        } else {
            8
        }
    }

    /// Entries per L2 table.
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / self.l2_entry_size()
    }

    /// Where header extensions end: the backing file name, or the end of the first cluster.
    pub fn extensions_end(&self) -> u64 {
        if self.backing_file_offset != 0 {
            self.backing_file_offset
        } else {
            self.cluster_size()
        }
    }

    /// Parse and validate, in QEMU's order (`qcow2_do_open`), so that the first problem reported
    /// is the one QEMU reports. `buf` holds at least the first 112 bytes of the file (shorter
    /// input means a truncated file) and, when available, the rest of the first cluster.
    pub fn parse(buf: &[u8]) -> Result<Header, HeaderError> {
        if buf.len() < 72 {
            if buf.len() >= 4 && buf[..4] == QCOW_MAGIC.to_be_bytes() {
                return Err(Error::invalid("qcow2 header truncated").into());
            }
            return Err(Error::invalid("Image is not in qcow2 format").into());
        }
        let mut padded = [0u8; RAW_HEADER_LEN];
        let n = buf.len().min(RAW_HEADER_LEN);
        padded[..n].copy_from_slice(&buf[..n]);
        let raw = RawHeader::read_from_bytes(&padded)
            .map_err(|_| Error::invalid("Image is not in qcow2 format"))?;
        if raw.magic.get() != QCOW_MAGIC {
            return Err(Error::invalid("Image is not in qcow2 format").into());
        }
        let version = raw.version.get();
        if !(2..=3).contains(&version) {
            return Err(Error::unsupported(format!("Unsupported qcow2 version {version}")).into());
        }
        let cluster_bits = raw.cluster_bits.get();
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(
                Error::invalid(format!("Unsupported cluster size: 2^{cluster_bits}")).into(),
            );
        }
        let cluster_size = 1u64 << cluster_bits;
        let (incompatible, compatible, autoclear_f, refcount_order, header_length) = if version == 2
        {
            (0, 0, 0, 4, 72)
        } else {
            if buf.len() < 104 {
                return Err(Error::invalid("qcow2 header truncated").into());
            }
            let hl = raw.header_length.get();
            if hl < 104 {
                return Err(Error::invalid("qcow2 header too short").into());
            }
            (
                raw.incompatible_features.get(),
                raw.compatible_features.get(),
                raw.autoclear_features.get(),
                raw.refcount_order.get(),
                hl,
            )
        };
        if u64::from(header_length) > cluster_size {
            return Err(Error::invalid("qcow2 header exceeds cluster size").into());
        }
        if (header_length as usize) > buf.len() {
            return Err(Error::invalid("qcow2 header truncated").into());
        }
        let unknown_fields = if header_length as usize > RAW_HEADER_LEN {
            buf[RAW_HEADER_LEN..header_length as usize].to_vec()
        } else {
            Vec::new()
        };
        let backing_file_offset = raw.backing_file_offset.get();
        if backing_file_offset > cluster_size {
            return Err(Error::invalid("Invalid backing file offset").into());
        }
        // compression type (validate_compression_type)
        let ctype = if header_length > 104 {
            raw.compression_type
        } else {
            0
        };
        let compression_type = match ctype {
            0 => CompressionType::Zlib,
            1 => CompressionType::Zstd,
            t => return Err(Error::unsupported(format!("Unknown compression type '{t}'")).into()),
        };
        let cbit = incompatible & incompat::COMPRESSION != 0;
        if compression_type != CompressionType::Zlib && !cbit {
            return Err(
                Error::invalid("Compression type incompatible feature bit must be set").into(),
            );
        }
        if compression_type == CompressionType::Zlib && cbit {
            return Err(Error::invalid(
                "Compression type incompatible feature bit must not be set",
            )
            .into());
        }
        let header = Header {
            version,
            backing_file_offset,
            backing_file_size: raw.backing_file_size.get(),
            cluster_bits,
            size: raw.size.get(),
            crypt_method: raw.crypt_method.get(),
            l1_size: raw.l1_size.get(),
            l1_table_offset: raw.l1_table_offset.get(),
            refcount_table_offset: raw.refcount_table_offset.get(),
            refcount_table_clusters: raw.refcount_table_clusters.get(),
            nb_snapshots: raw.nb_snapshots.get(),
            snapshots_offset: raw.snapshots_offset.get(),
            incompatible_features: incompatible,
            compatible_features: compatible,
            autoclear_features: autoclear_f,
            refcount_order,
            header_length,
            compression_type,
            unknown_fields,
        };
        let unknown = incompatible & !incompat::MASK;
        if unknown != 0 {
            return Err(HeaderError::UnknownIncompatible {
                header: Box::new(header),
                mask: unknown,
            });
        }
        header.validate_rest()?;
        Ok(header)
    }

    /// The checks QEMU makes after the feature bits.
    fn validate_rest(&self) -> Result<()> {
        if self.refcount_order > 6 {
            return Err(Error::invalid(
                "Reference count entry width too large; may not exceed 64 bits",
            ));
        }
        if self.crypt_method > CRYPT_LUKS {
            return Err(Error::unsupported(format!(
                "Unsupported encryption method: {}",
                self.crypt_method
            )));
        }
        if self.refcount_table_clusters == 0 {
            return Err(Error::invalid(
                "Image does not contain a reference count table",
            ));
        }
        let cs = self.cluster_size();
        self.validate_table(
            self.refcount_table_offset,
            u64::from(self.refcount_table_clusters),
            cs,
            MAX_REFTABLE_SIZE,
            "Reference count table",
        )?;
        self.validate_table(
            self.snapshots_offset,
            u64::from(self.nb_snapshots),
            40,
            40 * MAX_SNAPSHOTS,
            "Snapshot table",
        )?;
        self.validate_table(
            self.l1_table_offset,
            u64::from(self.l1_size),
            8,
            MAX_L1_SIZE,
            "Active L1 table",
        )?;
        let needed = self.l1_entries_needed();
        if needed > i32::MAX as u64 {
            return Err(Error::invalid("Image is too big"));
        }
        if u64::from(self.l1_size) < needed {
            return Err(Error::invalid("L1 table is too small"));
        }
        if self.backing_file_offset != 0 {
            let room = cs - self.backing_file_offset;
            if u64::from(self.backing_file_size) > room.min(u64::from(MAX_BACKING_NAME)) {
                return Err(Error::invalid("Backing file name too long"));
            }
        }
        if self.has_data_file() && self.nb_snapshots > 0 {
            // QEMU refuses snapshots with external data files on creation; reading them would
            // alias guest data, so refuse here too.
            return Err(Error::invalid(
                "Internal snapshots are not allowed with an external data file",
            ));
        }
        if self.data_file_raw() && !self.has_data_file() {
            return Err(Error::invalid("data-file-raw requires a data file"));
        }
        if self.extended_l2() && self.cluster_bits < 14 {
            return Err(Error::invalid(
                "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
            ));
        }
        Ok(())
    }

    /// qcow2.c `qcow2_validate_table`.
    fn validate_table(
        &self,
        offset: u64,
        entries: u64,
        entry_len: u64,
        max_bytes: u64,
        name: &str,
    ) -> Result<()> {
        if entries > max_bytes / entry_len {
            return Err(Error::invalid(format!("{name} too large")));
        }
        let bytes = entries * entry_len;
        if (i64::MAX as u64) - bytes < offset || offset & (self.cluster_size() - 1) != 0 {
            return Err(Error::invalid(format!("{name} offset invalid")));
        }
        Ok(())
    }

    /// Number of L1 entries needed to map `size` bytes (QEMU's `size_to_l1`).
    pub fn l1_entries_needed(&self) -> u64 {
        let shift = self.cluster_bits as u64
            + (self.cluster_bits as u64 - self.l2_entry_size().trailing_zeros() as u64);
        // size is u64; shift is at most 21 + 18 = 39
        let cover = 1u64 << shift;
        self.size / cover + u64::from(!self.size.is_multiple_of(cover))
    }

    /// Bytes of guest space one L2 table maps.
    pub fn l2_coverage(&self) -> u64 {
        self.l2_entries() * self.cluster_size()
    }

    /// Serialize the known fields (112 bytes, v3 layout; v2 writers use the first 72).
    pub fn to_raw(&self) -> RawHeader {
        RawHeader {
            magic: QCOW_MAGIC.into(),
            version: self.version.into(),
            backing_file_offset: self.backing_file_offset.into(),
            backing_file_size: self.backing_file_size.into(),
            cluster_bits: self.cluster_bits.into(),
            size: self.size.into(),
            crypt_method: self.crypt_method.into(),
            l1_size: self.l1_size.into(),
            l1_table_offset: self.l1_table_offset.into(),
            refcount_table_offset: self.refcount_table_offset.into(),
            refcount_table_clusters: self.refcount_table_clusters.into(),
            nb_snapshots: self.nb_snapshots.into(),
            snapshots_offset: self.snapshots_offset.into(),
            incompatible_features: self.incompatible_features.into(),
            compatible_features: self.compatible_features.into(),
            autoclear_features: self.autoclear_features.into(),
            refcount_order: self.refcount_order.into(),
            header_length: self.header_length.into(),
            compression_type: match self.compression_type {
                CompressionType::Zlib => 0,
                CompressionType::Zstd => 1,
            },
            padding: [0; 7],
        }
    }

    /// The header area as `qcow2_update_header` lays it out: the fixed header, the extension
    /// area, then the backing file name, with `backing_file_offset` and `backing_file_size`
    /// set to where the name lands. No size check: callers compare against the cluster size.
    pub fn encode_area(&self, ext: &Extensions, backing_file: Option<&str>) -> Vec<u8> {
        let mut h = self.clone();
        let mut area = h.to_bytes();
        area.extend_from_slice(&ext.encode());
        if let Some(name) = backing_file {
            h.backing_file_offset = area.len() as u64;
            h.backing_file_size = name.len() as u32;
            let fixed = h.to_bytes();
            area[..fixed.len()].copy_from_slice(&fixed);
            area.extend_from_slice(name.as_bytes());
        }
        area
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let raw = self.to_raw();
        let mut v = raw.as_bytes().to_vec();
        if self.version == 2 {
            v.truncate(72);
        } else {
            v.truncate((self.header_length as usize).min(RAW_HEADER_LEN));
            v.extend_from_slice(&self.unknown_fields);
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_fields_sit_at_their_spec_offsets() {
        let cases = [
            (HeaderField::Size(1 << 30), 24, 8),
            (
                HeaderField::L1Table {
                    size: 2,
                    offset: 0x3_0000,
                },
                36,
                12,
            ),
            (
                HeaderField::RefcountTable {
                    offset: 0x1_0000,
                    clusters: 1,
                },
                48,
                12,
            ),
            (HeaderField::IncompatibleFeatures(incompat::CORRUPT), 72, 8),
            (HeaderField::AutoclearFeatures(autoclear::BITMAPS), 88, 8),
        ];
        for (f, off, len) in cases {
            assert_eq!((f.offset(), f.encode().len()), (off, len), "{f:?}");
        }
        assert_eq!(
            HeaderField::L1Table {
                size: 2,
                offset: 0x3_0000
            }
            .encode(),
            [0, 0, 0, 2, 0, 0, 0, 0, 0, 3, 0, 0]
        );
    }

    fn minimal_v3() -> Vec<u8> {
        let h = Header {
            version: 3,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits: 16,
            size: 1 << 20,
            crypt_method: 0,
            l1_size: 1,
            l1_table_offset: 0x30000,
            refcount_table_offset: 0x10000,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: 112,
            compression_type: CompressionType::Zlib,
            unknown_fields: vec![],
        };
        h.to_bytes()
    }

    #[test]
    fn round_trips_a_v3_header() {
        let b = minimal_v3();
        let h = Header::parse(&b).unwrap();
        assert_eq!(h.cluster_size(), 65536);
        assert_eq!(h.to_bytes(), b);
    }

    #[test]
    fn bad_magic_is_not_qcow2() {
        let mut b = minimal_v3();
        b[0] = 0;
        let Err(HeaderError::Fatal(e)) = Header::parse(&b) else {
            panic!()
        };
        assert_eq!(e.message(), "Image is not in qcow2 format");
    }

    #[test]
    fn unknown_incompatible_bit_is_reported_with_mask() {
        let mut b = minimal_v3();
        b[72..80].copy_from_slice(&(1u64 << 40).to_be_bytes());
        match Header::parse(&b) {
            Err(HeaderError::UnknownIncompatible { mask, .. }) => assert_eq!(mask, 1 << 40),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn huge_l1_is_refused_before_allocation() {
        let mut b = minimal_v3();
        b[36..40].copy_from_slice(&0x1000_0000u32.to_be_bytes());
        let Err(HeaderError::Fatal(e)) = Header::parse(&b) else {
            panic!()
        };
        assert_eq!(e.message(), "Active L1 table too large");
    }
}
