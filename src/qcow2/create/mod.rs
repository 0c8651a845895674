//! New qcow2 images, laid out exactly as `qemu-img create` lays them out.
//!
//! QEMU does not compute a layout up front: `qcow2_co_create` writes a header cluster, a one-cluster
//! refcount table at cluster 1 and an empty refcount block at cluster 2, opens that image, and
//! then lets the ordinary allocator do the rest (refcount the first three clusters, grow the L1
//! table, preallocate through `preallocate_co` or, for `falloc`/`full`, build a fresh refcount
//! area with `qcow2_refcount_area`). Which cluster ends up where therefore depends on the
//! allocator's free-cluster cursor, on when refcount blocks are added (and the retries that
//! follow), and on the refcount table moving when it fills up.
//!
//! To make the same file we replay that sequence against an in-memory model of the allocator
//! ([`Alloc`]): the same cursor, the same self-describing refcount blocks, the same retry after a
//! refcount block was placed, the same table growth. The model also tracks the host file length
//! the way QEMU's writes and truncations move it, because `preallocate_co` and `falloc`/`full`
//! decide from that length what to truncate or preallocate. Metadata is then written from the
//! final model state (header, refcount table and blocks, L1, L2), and the writes QEMU makes that
//! are not metadata (a refcount table it later abandons, copy-on-write zeros past the end of the
//! disk, the first block of a data file, preallocated data) are replayed as recorded.
//!
//! Result: the image file and the data file equal QEMU's byte for byte, with the same holes, for
//! the option sets the spec tests compare (`qcow2-spec-tests/tests/create.rs`); `actual-size`
//! then matches too, as long as both files sit on the same file system.
//!
//! Known difference: when a preallocated data run exactly fills the range of one refcount block
//! (only seen with 512-byte clusters and wide refcounts, e.g. `cluster_size=512,
//! refcount_bits=64,preallocation=metadata`), QEMU places that block's refcount block and the
//! data in a different order than this model does. The image is consistent (`qemu-img check`
//! is clean, same guest content and map) but the clusters after that point sit elsewhere.
//!
//! Not supported: encryption, and `qemu-img create`'s own steps (options, backing probing), which
//! live in `cli/create.rs`.

mod model;
pub(crate) use model::refcount_metadata;
mod options;

use super::spec::extensions::{Extensions, FeatureName};
use super::spec::header::{autoclear, compat, incompat, Header};
use super::spec::refblock;
use super::spec::table::L2Table;
use crate::block::create_raw::{create_empty, grow, write_zeros};
use crate::error::{Error, ErrorKind, Result};
use model::{Alloc, Op, Target, OFLAG_COPIED};
use options::invalid;
pub use options::{CompressionType, CreateOptions, Preallocation};
use std::fs::File;
use std::os::unix::fs::FileExt;

/// QEMU's feature name table (`qcow2_update_header`), written for v3 images with clusters
/// larger than 4 KiB.
const FEATURES: [(u8, u8, &str); 8] = [
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
];

/// The first cluster as `qcow2_update_header` writes it.
fn header_cluster(opts: &CreateOptions, size: u64, a: &Alloc) -> Result<Vec<u8>> {
    let cs = a.cs as usize;
    let mut incompatible = 0;
    if opts.data_file.is_some() {
        incompatible |= incompat::DATA_FILE;
    }
    if opts.compression_type != CompressionType::Zlib {
        incompatible |= incompat::COMPRESSION;
    }
    if opts.extended_l2 {
        incompatible |= incompat::EXTL2;
    }
    let header = Header {
        version: opts.version,
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits: a.cluster_bits,
        size,
        crypt_method: 0,
        l1_size: a.l1.len() as u32,
        l1_table_offset: a.l1_offset,
        refcount_table_offset: a.reftable_offset,
        refcount_table_clusters: (a.reftable.len() as u64 * 8 / a.cs) as u32,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible_features: incompatible,
        compatible_features: if opts.lazy_refcounts {
            compat::LAZY_REFCOUNTS
        } else {
            0
        },
        autoclear_features: if opts.data_file_raw {
            autoclear::DATA_FILE_RAW
        } else {
            0
        },
        refcount_order: a.refcount_order,
        header_length: 112,
        compression_type: opts.compression_type,
        unknown_fields: Vec::new(),
    };
    let feature_table = if opts.version >= 3 && a.cs > 4096 {
        FEATURES
            .iter()
            .map(|&(kind, bit, name)| FeatureName {
                kind,
                bit,
                name: name.into(),
            })
            .collect()
    } else {
        Vec::new()
    };
    let ext = Extensions {
        backing_format: opts.backing_format.clone(),
        data_file: opts.data_file.clone(),
        feature_table,
        ..Extensions::default()
    };
    let mut buf = header.encode_area(&ext, opts.backing_file.as_deref());
    if buf.len() > cs {
        // (with a backing file, the name is what no longer fits)
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            match &opts.backing_file {
                Some(b) => format!("Could not assign backing file '{b}': No space left on device"),
                None => "Could not update qcow2 header: No space left on device".into(),
            },
        ));
    }
    buf.resize(cs, 0);
    Ok(buf)
}

/// The whole creation, computed: what `create_qcow2` writes.
struct Plan {
    alloc: Alloc,
    header: Vec<u8>,
    l2_entry_size: u64,
}

fn plan(opts: &CreateOptions) -> Result<Plan> {
    let prealloc = opts.validate()?;
    let size = crate::units::align_up(opts.size, 512)
        .filter(|&s| s <= i64::MAX as u64)
        .ok_or_else(|| invalid("Image size too large"))?;
    let mut a = Alloc::new(opts);
    // refcount the header, the refcount table and its first block
    a.alloc_clusters(3 * a.cs)?;
    let l2_entry_size: u64 = if opts.extended_l2 { 16 } else { 8 };
    let subcluster_size = if opts.extended_l2 { a.cs / 32 } else { a.cs };
    // qcow2_co_truncate: the L1 table first, exactly as large as the disk needs
    let cover = a.cs << a.l2_bits;
    a.grow_l1(size.div_ceil(cover), true)
        .map_err(|e| e.context("Could not resize image"))?;
    match prealloc {
        Preallocation::Off => {
            if a.has_data_file {
                a.grow_file(Target::Data, size, Preallocation::Off);
            }
        }
        Preallocation::Metadata => a.preallocate(size, prealloc, subcluster_size)?,
        Preallocation::Falloc | Preallocation::Full => {
            if a.has_data_file {
                a.preallocate(size, prealloc, subcluster_size)?;
            } else {
                a.preallocate_data(size, prealloc, l2_entry_size)?;
            }
        }
    }
    let header = header_cluster(opts, size, &a)?;
    Ok(Plan {
        alloc: a,
        header,
        l2_entry_size,
    })
}

fn io_err(path: &str, what: &str) -> impl FnOnce(std::io::Error) -> Error {
    let msg = format!("{what} '{path}'");
    move |e| Error::io(msg, e)
}

fn apply(plan: &Plan, image: &File, data: Option<&File>, path: &str) -> Result<()> {
    let a = &plan.alloc;
    let cs = a.cs;
    let file_of = |t: Target| -> Result<&File> {
        match t {
            Target::Image => Ok(image),
            Target::Data => data.ok_or_else(|| Error::corrupt("no data file to write to")),
        }
    };
    // The writes QEMU makes in the image file when it creates it: the header cluster, then the
    // refcount table with its first block.
    image
        .write_all_at(&plan.header, 0)
        .map_err(io_err(path, "Could not write qcow2 header to"))?;
    let mut first = vec![0u8; 2 * cs as usize];
    first[..8].copy_from_slice(&(2 * cs).to_be_bytes());
    image
        .write_all_at(&first, cs)
        .map_err(io_err(path, "Could not write refcount table to"))?;
    for op in &a.ops {
        match op {
            Op::Bytes { off, data } => image
                .write_all_at(data, *off)
                .map_err(io_err(path, "Could not write refcount metadata to"))?,
            Op::Zeros { target, off, len } => write_zeros(file_of(*target)?, *off, *len)?,
            Op::Grow {
                target,
                cur,
                new_len,
                mode,
            } => grow(file_of(*target)?, *cur, *new_len, *mode)?,
        }
    }
    // final metadata: refcount blocks, L2 tables, L1 table, header
    let entries_per_block = 1u64 << a.rb_bits;
    let mut block = vec![0u8; cs as usize];
    for (ti, &off) in a.reftable.iter().enumerate() {
        if off == 0 {
            continue;
        }
        block.fill(0);
        let base = ti as u64 * entries_per_block;
        for i in 0..entries_per_block {
            if a.bit(base + i) {
                refblock::set(&mut block, a.refcount_order, i, 1);
            }
        }
        image
            .write_all_at(&block, off)
            .map_err(io_err(path, "Could not write refcount block to"))?;
    }
    let extended = plan.l2_entry_size == 16;
    for t in a.l2.values() {
        let mut table = L2Table::zeroed(cs, extended);
        for r in &t.runs {
            for k in 0..r.count {
                let e = (r.host + (k << a.cluster_bits)) | OFLAG_COPIED;
                table.set_entry((r.index + k) as usize, e);
            }
        }
        image
            .write_all_at(&table.encode(), t.offset)
            .map_err(io_err(path, "Could not write L2 table to"))?;
    }
    if a.l1_offset != 0 {
        image
            .write_all_at(&a.l1.encode(), a.l1_offset)
            .map_err(io_err(path, "Could not write L1 table to"))?;
    }
    image
        .write_all_at(&plan.header, 0)
        .map_err(io_err(path, "Could not write qcow2 header to"))?;
    let len = image
        .metadata()
        .map_err(io_err(path, "Could not stat"))?
        .len();
    if len < a.image_len {
        image
            .set_len(a.image_len)
            .map_err(io_err(path, "Could not resize"))?;
    }
    image.sync_all().map_err(io_err(path, "Could not flush"))?;
    if let Some(d) = data {
        d.sync_all()
            .map_err(io_err(path, "Could not flush data file of"))?;
    }
    Ok(())
}

/// The data file name resolved like QEMU opens it: relative to the current directory.
fn data_file_path(name: &str) -> &str {
    name
}

/// `qemu-img create -f qcow2`: write the image at `path` (and its external data file).
/// On failure the files are removed, as qemu-img does.
pub fn create_qcow2(path: &str, opts: &CreateOptions) -> Result<()> {
    let plan = match plan(opts) {
        Ok(p) => p,
        Err(e) => {
            // qemu-img has already created the files when the format layer refuses the options,
            // and deletes them again
            let _ = std::fs::remove_file(path);
            if let Some(d) = &opts.data_file {
                let _ = std::fs::remove_file(data_file_path(d));
            }
            return Err(e);
        }
    };
    let image = create_empty(path)?;
    let data = match &opts.data_file {
        Some(d) => Some(create_empty(data_file_path(d))?),
        None => None,
    };
    let res = apply(&plan, &image, data.as_ref(), path);
    if res.is_err() {
        let _ = std::fs::remove_file(path);
        if let Some(d) = &opts.data_file {
            let _ = std::fs::remove_file(data_file_path(d));
        }
    }
    res
}

#[cfg(test)]
mod tests {
    use super::super::spec::extensions::{EXT_BACKING_FORMAT, EXT_FEATURE_TABLE};
    use super::*;
    use model::{refcount_blocks_needed, Run};

    fn opts(size: u64) -> CreateOptions {
        CreateOptions {
            size,
            ..CreateOptions::default()
        }
    }

    #[test]
    fn default_layout_is_header_reftable_refblock_l1() {
        let p = plan(&opts(1 << 30)).unwrap();
        let a = &p.alloc;
        assert_eq!(a.reftable_offset, 0x10000);
        assert_eq!(a.reftable[0], 0x20000);
        assert_eq!(a.l1_offset, 0x30000);
        assert_eq!(a.l1.len(), 2);
        // the L1 table is written exactly, not padded to a cluster
        assert_eq!(a.image_len, 0x30010);
        assert!((0..4).all(|c| a.refcount(c) == 1));
        assert_eq!(a.refcount(4), 0);
    }

    #[test]
    fn empty_disk_has_no_l1_table() {
        let p = plan(&opts(0)).unwrap();
        assert_eq!(p.alloc.l1_offset, 0);
        assert_eq!(p.alloc.image_len, 0x30000);
    }

    #[test]
    fn metadata_preallocation_interleaves_l2_tables_and_data() {
        let p = plan(&CreateOptions {
            preallocation: Preallocation::Metadata,
            ..opts(1 << 30)
        })
        .unwrap();
        let a = &p.alloc;
        assert_eq!(a.l1[0], 0x4_0000 | OFLAG_COPIED);
        assert_eq!(
            a.l2[&0].runs,
            vec![Run {
                index: 0,
                count: 8192,
                host: 0x5_0000
            }]
        );
        assert_eq!(a.l1[1], 0x2005_0000 | OFLAG_COPIED);
        assert_eq!(a.l2[&1].runs[0].host, 0x2006_0000);
        assert_eq!(a.image_len, 0x4006_0000);
    }

    #[test]
    fn unaligned_metadata_preallocation_writes_zeros_to_the_cluster_end() {
        let p = plan(&CreateOptions {
            preallocation: Preallocation::Metadata,
            ..opts(1_000_000)
        })
        .unwrap();
        assert!(p.alloc.ops.contains(&Op::Zeros {
            target: Target::Image,
            off: 0x14_4400,
            len: 0x15_0000 - 0x14_4400
        }));
        assert_eq!(p.alloc.image_len, 0x15_0000);
    }

    #[test]
    fn falloc_moves_the_refcount_table_and_reuses_its_cluster_for_l2() {
        let p = plan(&CreateOptions {
            preallocation: Preallocation::Falloc,
            ..opts(100 << 20)
        })
        .unwrap();
        let a = &p.alloc;
        assert_eq!(a.reftable_offset, 0x4_0000);
        assert_eq!(a.l2[&0].offset, 0x1_0000);
        assert_eq!(a.l2[&0].runs[0].host, 0x5_0000);
        assert_eq!(a.image_len, 0x5_0000 + (100 << 20));
    }

    #[test]
    fn small_clusters_grow_the_refcount_table() {
        // 512-byte clusters with 64-bit refcounts: one refcount block covers 64 clusters and
        // the first table 64 blocks, so 4 MiB of metadata must move the table.
        let p = plan(&CreateOptions {
            cluster_size: 512,
            refcount_bits: 64,
            preallocation: Preallocation::Metadata,
            ..opts(4 << 20)
        })
        .unwrap();
        let a = &p.alloc;
        assert_ne!(a.reftable_offset, 512);
        // every cluster below the end of the file that is in use is counted exactly once
        let used = (0..a.image_len / 512)
            .filter(|&c| a.refcount(c) == 1)
            .count();
        assert!(used > (4 << 20) / 512);
    }

    #[test]
    fn header_carries_extensions_in_qemu_order() {
        let p = plan(&CreateOptions {
            backing_file: Some("base.raw".into()),
            backing_format: Some("raw".into()),
            data_file: None,
            ..opts(1 << 20)
        })
        .unwrap();
        let h = &p.header;
        assert_eq!(h[112..116], EXT_BACKING_FORMAT.to_be_bytes());
        assert_eq!(h[128..132], EXT_FEATURE_TABLE.to_be_bytes());
        let boff = u64::from_be_bytes(h[8..16].try_into().unwrap()) as usize;
        assert_eq!(&h[boff..boff + 8], b"base.raw");
        assert_eq!(boff, 128 + 8 + 384 + 8);
    }

    #[test]
    fn validation_uses_qemu_messages() {
        let cases: [(CreateOptions, &str); 6] = [
            (
                CreateOptions { cluster_size: 1000, ..opts(0) },
                "Cluster size must be a power of two between 512 and 2048k",
            ),
            (
                CreateOptions { refcount_bits: 3, ..opts(0) },
                "Refcount width must be a power of two and may not exceed 64 bits",
            ),
            (
                CreateOptions { version: 2, lazy_refcounts: true, ..opts(0) },
                "Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)",
            ),
            (
                CreateOptions { extended_l2: true, cluster_size: 8192, ..opts(0) },
                "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
            ),
            (
                CreateOptions {
                    backing_file: Some("b".into()),
                    preallocation: Preallocation::Metadata,
                    ..opts(0)
                },
                "Backing file and preallocation can only be used at the same time if extended_l2 is on",
            ),
            (
                CreateOptions { data_file_raw: true, ..opts(0) },
                "data-file-raw requires data-file",
            ),
        ];
        for (o, msg) in cases {
            assert_eq!(o.validate().unwrap_err().message(), msg);
        }
    }

    #[test]
    fn data_file_raw_implies_metadata_preallocation() {
        let o = CreateOptions {
            data_file: Some("d".into()),
            data_file_raw: true,
            ..opts(1 << 20)
        };
        assert_eq!(o.validate().unwrap(), Preallocation::Metadata);
        let p = plan(&o).unwrap();
        // data clusters map 1:1 onto the data file
        assert_eq!(
            p.alloc.l2[&0].runs,
            vec![Run {
                index: 0,
                count: 16,
                host: 0
            }]
        );
    }

    #[test]
    fn refcount_metadata_size_matches_qemu_fixed_point() {
        // 64 KiB clusters, 16-bit refcounts: one block covers 32768 clusters
        assert_eq!(refcount_blocks_needed(5, 65536, 4, false), 1);
        assert_eq!(refcount_blocks_needed(32767, 65536, 4, false), 2);
    }
}
