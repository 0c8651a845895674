//! `qnbd measure`: qemu-img measure — the size a new image needs, for a given virtual size or
//! to hold an existing image's contents, with qemu-img's figures, wording, JSON and exit codes.
//!
//! For qcow2 output (QEMU's `qcow2_measure`): `fully-allocated` is a header cluster, every L2
//! table and the L1 table of the virtual size, the refcount structures that cover all of that
//! and the data; `required` replaces the data by the clusters (of the new cluster size) that
//! hold data in the source chain, or by all of it with a backing file or `falloc`/`full`
//! preallocation. `bitmaps` is what copying the source's persistent bitmaps would add. For raw
//! output both figures are the virtual size.

use super::create::{parse_given, Given};
use super::qjson::to_qemu_pretty;
use super::{open_named, open_options, OutputFormat};
use crate::error::{Error, ErrorKind, Result};
use crate::open::Format;
use crate::qcow2::create::Preallocation;
use clap::Args;
use serde_json::{Map, Value};

/// `QCOW_MAX_L1_SIZE`: the largest L1 table qcow2 allows (32 MiB).
const MAX_L1_BYTES: u64 = 32 << 20;

#[derive(Debug, Args)]
#[command(args_override_self = true)]
pub struct MeasureArgs {
    /// Format of the source image (qcow2, raw); probed when omitted.
    #[arg(short = 'f', long = "format")]
    pub format: Option<String>,
    /// Format of the image to measure for (qcow2 or raw; default raw).
    #[arg(short = 'O', long = "target-format", default_value = "raw")]
    pub target_format: String,
    /// Creation options of the new image (as `create -o`; repeatable).
    #[arg(short = 'o', long = "options")]
    pub options: Vec<String>,
    /// Output format: human (qemu-img's text) or json (qemu-img's JSON).
    #[arg(long = "output", value_enum, default_value_t = OutputFormat::Human)]
    pub output: OutputFormat,
    /// Measure a new image of this virtual size (instead of a source image).
    #[arg(long = "size", value_name = "SIZE", allow_hyphen_values = true)]
    pub size: Option<String>,
    /// Measure this internal snapshot of the source (ID, NAME, snapshot.id=ID or
    /// snapshot.name=NAME).
    #[arg(short = 'l', long = "snapshot", value_name = "SNAPSHOT")]
    pub snapshot: Option<String>,
    /// Share the source with writers: read-only, no lock denied to others (qemu-img -U).
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    #[arg(long = "allow-backing", value_name = "PATH", help = super::ALLOW_BACKING_HELP)]
    pub allow_backing: Vec<String>,
    #[arg(long = "image-opts", help = super::IMAGE_OPTS_HELP)]
    pub image_opts: bool,
    /// The source image (omit with --size).
    pub image: Option<String>,
}

fn arg_err(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidArgument, msg)
}

/// What measuring needs to know of a source image.
struct Source {
    /// Virtual size in bytes.
    size: u64,
    /// Guest ranges that hold data (not zeros) anywhere in the chain, in order.
    data: Vec<(u64, u64)>,
    /// `(name length, granularity, disk size)` of the top image's persistent bitmaps, when the
    /// source is a qcow2 v3 image (`None`: it cannot hold persistent bitmaps).
    bitmaps: Option<Vec<(usize, u64, u64)>>,
}

fn open_source(a: &MeasureArgs, image: &str) -> Result<Source> {
    let mut opts = open_options(a.format.as_deref())?;
    opts.writable = false;
    opts.locking = super::locking(image, a.force_share, false, crate::open::Locking::Tool)?;
    opts.policy = super::open_policy(&a.allow_backing)?;
    opts.qcow2.snapshot = a.snapshot.clone();
    let name = super::image_name(image, a.image_opts, &mut opts)?;
    let img = open_named(&name, &opts).map_err(|e| {
        if e.kind() == ErrorKind::NotFound && a.snapshot.is_some() {
            // qemu-img's words (qemu-nbd names the snapshot)
            Error::new(
                ErrorKind::NotFound,
                "Failed to load snapshot: Can't find snapshot",
            )
        } else {
            e
        }
    })?;
    let size = img.chain.size();
    let data = super::map::entries(&img.chain, 0, None)?
        .into_iter()
        .filter(|e| e.data && !e.zero)
        .map(|e| (e.start, e.length))
        .collect();
    let bitmaps = img.layers.first().and_then(|l| {
        let q = l.qcow2.as_ref()?;
        if q.header().version < 3 {
            return None;
        }
        let list = q.bitmaps().map(<[_]>::to_vec).unwrap_or_default();
        Some(
            list.iter()
                .map(|b| (b.name.len(), 1u64 << b.granularity_bits, size))
                .collect(),
        )
    });
    Ok(Source {
        size,
        data,
        bitmaps,
    })
}

/// QEMU's `qcow2_calc_prealloc_size`: the whole file of a fully allocated image.
fn prealloc_size(size: u64, cs: u64, refcount_order: u32, l2e: u64) -> u64 {
    let aligned = size.div_ceil(cs) * cs;
    let mut meta = cs; // header
    let nl2e = (aligned / cs).div_ceil(cs / l2e) * (cs / l2e);
    meta += nl2e * l2e;
    let nl1e = (nl2e * l2e / cs).div_ceil(cs / 8) * (cs / 8);
    meta += nl1e * 8;
    let (blocks, table) =
        crate::qcow2::create::refcount_metadata((meta + aligned) / cs, cs, refcount_order, false);
    meta += (blocks + table) * cs;
    meta + aligned
}

/// `qcow2_get_persistent_dirty_bitmap_size`: data clusters, table clusters and directory of
/// the bitmaps, copied into an image of cluster size `cs`.
fn bitmaps_size(bitmaps: &[(usize, u64, u64)], cs: u64) -> u64 {
    let mut size = 0;
    let mut dir = 0u64;
    for &(name_len, granularity, disk) in bitmaps {
        let bits = disk.div_ceil(granularity);
        let clusters = bits.div_ceil(8).div_ceil(cs);
        size += clusters * cs;
        size += (clusters * 8).div_ceil(cs) * cs;
        dir += (24 + name_len as u64).div_ceil(8) * 8;
    }
    size + dir.div_ceil(cs) * cs
}

/// Bytes of the clusters of size `cs` that hold any of `data` (qemu's block-status walk
/// rounds each data run out to whole clusters and counts a cluster once).
fn data_clusters_bytes(data: &[(u64, u64)], cs: u64) -> u64 {
    let mut total = 0;
    let mut counted_to = 0u64; // clusters below this offset are counted
    for &(start, len) in data {
        let first = (start / cs * cs).max(counted_to);
        let end = (start + len).div_ceil(cs) * cs;
        if end > first {
            total += end - first;
            counted_to = end;
        }
    }
    total
}

/// The figures: (required, fully-allocated, bitmaps).
type Figures = (u64, u64, Option<u64>);

fn measure_qcow2(g: &Given, virtual_size: u64, src: Option<&Source>) -> Result<Figures> {
    let extended_l2 = g.extended_l2.as_ref().is_some_and(|x| x.1);
    let cs = g.cluster_size.unwrap_or(65536);
    if !cs.is_power_of_two() || !(512..=2 << 20).contains(&cs) {
        return Err(arg_err(
            "Cluster size must be a power of two between 512 and 2048k",
        ));
    }
    if extended_l2 && cs < 16384 {
        return Err(arg_err(
            "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
        ));
    }
    let version = match g.compat.as_deref() {
        None | Some("1.1") | Some("v3") => 3,
        Some("0.10") | Some("v2") => 2,
        Some(c) => return Err(arg_err(format!("Invalid compatibility level: '{c}'"))),
    };
    let refcount_bits = g.refcount_bits.unwrap_or(16);
    if refcount_bits == 0 || refcount_bits > 64 || !refcount_bits.is_power_of_two() {
        return Err(arg_err(
            "Refcount width must be a power of two and may not exceed 64 bits",
        ));
    }
    if version < 3 && refcount_bits != 16 {
        return Err(arg_err(
            "Different refcount widths than 16 bits require compatibility level 1.1 or above \
             (use compat=1.1 or greater)",
        ));
    }
    let prealloc = match g.preallocation.as_deref() {
        None => Preallocation::Off,
        Some(p) => Preallocation::parse(p)
            .ok_or_else(|| arg_err(format!("invalid parameter value: {p}")))?,
    };
    let l2e = if extended_l2 { 16 } else { 8 };
    let mut virtual_size = virtual_size.div_ceil(cs) * cs;
    let l2_tables = (virtual_size / cs).div_ceil(cs / l2e);
    if l2_tables.saturating_mul(8) > MAX_L1_BYTES {
        return Err(arg_err(
            "The image size is too large (try using a larger cluster size)",
        ));
    }
    let mut required = 0;
    if let Some(s) = src {
        virtual_size = s.size.div_ceil(cs) * cs;
        required = if g.backing_file.is_some() {
            // nothing is known of what the new backing file shares with the source
            virtual_size
        } else {
            data_clusters_bytes(&s.data, cs)
        };
    }
    if matches!(prealloc, Preallocation::Full | Preallocation::Falloc) {
        required = virtual_size;
    }
    let fully = prealloc_size(virtual_size, cs, refcount_bits.trailing_zeros(), l2e);
    let required = fully - virtual_size + required;
    let bitmaps = match src.and_then(|s| s.bitmaps.as_ref()) {
        Some(b) if version >= 3 => Some(bitmaps_size(b, cs)),
        _ => None,
    };
    Ok((required, fully, bitmaps))
}

pub fn run(a: &MeasureArgs) -> Result<i32> {
    let size = match &a.size {
        Some(s) => {
            let negative = s
                .trim_start()
                .strip_prefix('-')
                .is_some_and(|r| crate::units::parse_size(r).is_some());
            let v = crate::units::parse_size(s).filter(|_| !negative);
            let v = match v {
                Some(v) => v,
                None if negative => u64::MAX,
                None => return Err(arg_err(format!("Invalid image size specified: '{s}'."))),
            };
            if v > i64::MAX as u64 {
                return Err(arg_err(
                    "Invalid image size specified. Must be between 0 and 9223372036854775807.",
                ));
            }
            Some(v)
        }
        None => None,
    };
    match (&a.image, size) {
        (Some(_), Some(_)) => {
            return Err(arg_err("--size N cannot be used together with a filename."))
        }
        (None, None) => {
            return Err(arg_err(
                "Either --size N or one filename must be specified.",
            ))
        }
        (None, Some(_)) if a.image_opts || a.format.is_some() || a.snapshot.is_some() => {
            return Err(arg_err(
                "--image-opts, -f, and -l require a filename argument.",
            ))
        }
        _ => {}
    }
    let src = match &a.image {
        Some(image) => Some(open_source(a, image)?),
        None => None,
    };
    let target = match a.target_format.as_str() {
        "qcow2" => Format::Qcow2,
        "raw" => Format::Raw,
        "vmdk" | "vdi" | "vhdx" | "vpc" | "qed" | "qcow" | "luks" | "parallels" | "cloop"
        | "dmg" | "bochs" => {
            return Err(arg_err(format!(
                "Block driver '{}' does not support size measurement",
                a.target_format
            )))
        }
        other => return Err(arg_err(format!("Unknown file format '{other}'"))),
    };
    let g = parse_given(target, &a.options).map_err(|e| {
        arg_err(format!(
            "{}\n{}: Invalid options for file format '{}'",
            e.message(),
            crate::error::program(),
            target.name()
        ))
    })?;
    // `-o size=` counts only without a source, and --size wins over it
    let virtual_size = size.or(g.size_opt()).unwrap_or(0);
    let (required, fully, bitmaps) = match target {
        Format::Qcow2 => measure_qcow2(&g, virtual_size, src.as_ref())?,
        Format::Raw => {
            if let Some(p) = g.preallocation.as_deref() {
                Preallocation::parse(p)
                    .ok_or_else(|| arg_err(format!("invalid parameter value: {p}")))?;
            }
            // a new raw image of --size is rounded up to whole sectors; a source keeps its size
            let n = src
                .as_ref()
                .map_or(virtual_size.div_ceil(512).saturating_mul(512), |s| s.size);
            (n, n, None)
        }
    };
    match a.output {
        OutputFormat::Human => {
            println!("required size: {required}");
            println!("fully allocated size: {fully}");
            if let Some(b) = bitmaps {
                println!("bitmaps size: {b}");
            }
        }
        OutputFormat::Json => {
            let mut m = Map::new();
            m.insert("required".into(), Value::from(required));
            m.insert("fully-allocated".into(), Value::from(fully));
            if let Some(b) = bitmaps {
                m.insert("bitmaps".into(), Value::from(b));
            }
            println!("{}", to_qemu_pretty(&Value::Object(m)));
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Figures qemu-img 10 gives for `measure --size` (checked by hand against qemu-img).
    #[test]
    fn fully_allocated_sizes_follow_qemu_s_formula() {
        assert_eq!(prealloc_size(1 << 30, 65536, 4, 8), 1_074_135_040);
        assert_eq!(prealloc_size(0, 65536, 4, 8), 196_608);
        assert_eq!(prealloc_size(10 << 20, 65536, 4, 8), 10_813_440);
    }

    #[test]
    fn data_clusters_count_each_cluster_once() {
        let cs = 65536;
        assert_eq!(data_clusters_bytes(&[(0, 1)], cs), cs);
        assert_eq!(data_clusters_bytes(&[(10, 10), (30, 10)], cs), cs);
        assert_eq!(data_clusters_bytes(&[(cs - 1, 2)], cs), 2 * cs);
        assert_eq!(
            data_clusters_bytes(&[(0, 4096), (cs + 5, 1), (3 * cs, cs)], cs),
            3 * cs
        );
    }

    #[test]
    fn bitmaps_take_data_table_and_directory_clusters() {
        // one 1 GiB bitmap at 4 KiB granularity, name of 2 bytes, into 64 KiB clusters
        assert_eq!(bitmaps_size(&[(2, 4096, 1 << 30)], 65536), 196_608);
        assert_eq!(bitmaps_size(&[], 65536), 0);
    }
}
