//! `qnbd info`: qemu-img info, same JSON (member order included) and human output.

use super::qjson::to_qemu_pretty;
use super::{open_options, OutputFormat};
use crate::error::{Error, Result};
use crate::open::OpenedLayer;
use crate::units::size_to_str;
use clap::Args;
use serde_json::{json, Map, Value};
use std::io::Write;

#[derive(Debug, Args)]
#[command(args_override_self = true)]
pub struct InfoArgs {
    /// Image format (qcow2, raw); probed when omitted.
    #[arg(short = 'f', long = "format")]
    pub format: Option<String>,
    /// Output format: human (qemu-img's text) or json (qemu-img's JSON).
    #[arg(long = "output", value_enum, default_value_t = OutputFormat::Human)]
    pub output: OutputFormat,
    /// Show every image of the backing chain.
    #[arg(long = "backing-chain")]
    pub backing_chain: bool,
    /// Share the image with writers: read-only, no lock denied to others (qemu-img -U).
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    #[arg(long = "allow-backing", value_name = "PATH", help = super::ALLOW_BACKING_HELP)]
    pub allow_backing: Vec<String>,
    #[arg(long = "image-opts", help = super::IMAGE_OPTS_HELP)]
    pub image_opts: bool,
    /// The image: a file name, a block device, json:{...}, or QemuOpts with --image-opts.
    pub image: String,
}

fn file_child(l: &OpenedLayer) -> Result<Value> {
    let len = l
        .storage
        .len()
        .map_err(|e| Error::io("Could not get the file length", e))?;
    let alloc = l
        .storage
        .allocated_size()
        .map_err(|e| Error::io("Could not get the allocated size", e))?;
    // QEMU sizes block nodes in whole 512-byte sectors
    let len = crate::units::align_up(len, 512).unwrap_or(len);
    Ok(json!({
        "children": [],
        "virtual-size": len,
        "filename": l.filename,
        "format": "file",
        "actual-size": alloc,
        "format-specific": {"type": "file", "data": {}},
        "dirty-flag": false,
    }))
}

/// One layer's `ImageInfo` as qemu-img builds it.
pub fn layer_info(l: &OpenedLayer) -> Result<Value> {
    let mut m = Map::new();
    let alloc = l
        .storage
        .allocated_size()
        .map_err(|e| Error::io("Could not get the allocated size", e))?;
    if let Some(q) = &l.qcow2 {
        let h = q.header();
        if let Some(f) = &l.backing_format {
            m.insert("backing-filename-format".into(), json!(f));
        }
        if !q.snapshots().is_empty() {
            m.insert("snapshots".into(), Value::Array(snapshots_json(q)));
        }
        m.insert("virtual-size".into(), json!(h.size));

        m.insert("filename".into(), json!(l.filename));
        m.insert("cluster-size".into(), json!(h.cluster_size()));
        m.insert("format".into(), json!("qcow2"));
        m.insert("actual-size".into(), json!(alloc));
        let mut d = Map::new();
        if h.version == 2 {
            d.insert("compat".into(), json!("0.10"));
            d.insert("compression-type".into(), json!(h.compression_type.name()));
            d.insert("refcount-bits".into(), json!(h.refcount_bits()));
        } else {
            d.insert("compat".into(), json!("1.1"));
            d.insert("compression-type".into(), json!(h.compression_type.name()));
            d.insert("lazy-refcounts".into(), json!(h.lazy_refcounts()));
            let bitmaps = q
                .bitmaps()
                .map_err(|e| Error::invalid(format!("Could not open '{}': {e}", l.filename)))?;
            if !bitmaps.is_empty() {
                let list: Vec<Value> = bitmaps
                    .iter()
                    .map(|b| {
                        let mut flags = Vec::new();
                        if b.in_use() {
                            flags.push("in-use");
                        }
                        if b.auto() {
                            flags.push("auto");
                        }
                        json!({"flags": flags, "name": b.name, "granularity": b.granularity()})
                    })
                    .collect();
                d.insert("bitmaps".into(), Value::Array(list));
            }
            d.insert("refcount-bits".into(), json!(h.refcount_bits()));
            if let Some(l) = q.luks() {
                d.insert("encrypt".into(), l.info_json());
            }
            if let Some(df) = q.data_file_name() {
                d.insert("data-file".into(), json!(df));
            }
            if h.has_data_file() {
                d.insert("data-file-raw".into(), json!(h.data_file_raw()));
            }
            d.insert("corrupt".into(), json!(h.is_corrupt()));
            d.insert("extended-l2".into(), json!(h.extended_l2()));
        }
        m.insert(
            "format-specific".into(),
            json!({"type": "qcow2", "data": Value::Object(d)}),
        );
        if let Some(b) = &l.backing_filename {
            if let Some(full) = &l.full_backing_filename {
                m.insert("full-backing-filename".into(), json!(full));
            }
            m.insert("backing-filename".into(), json!(b));
        }
        if h.crypt_method != 0 {
            m.insert("encrypted".into(), json!(true));
        }
        m.insert("dirty-flag".into(), json!(h.is_dirty()));
    } else {
        m.insert("virtual-size".into(), json!(l.device.size()));
        m.insert("filename".into(), json!(l.filename));
        m.insert("format".into(), json!("raw"));
        m.insert("actual-size".into(), json!(alloc));
        m.insert("dirty-flag".into(), json!(false));
    }
    // QEMU inserts "children" last; within its hash bucket it then comes first.
    m.insert(
        "children".into(),
        json!([{"name": "file", "info": file_child(l)?}]),
    );
    Ok(Value::Object(m))
}

fn human(l: &OpenedLayer, v: &Value) -> String {
    let mut s = String::new();
    let g = |k: &str| v.get(k).cloned().unwrap_or(Value::Null);
    let size = g("virtual-size").as_u64().unwrap_or(0);
    s.push_str(&format!("image: {}\n", l.filename));
    s.push_str(&format!("file format: {}\n", l.format.name()));
    s.push_str(&format!(
        "virtual size: {} ({} bytes)\n",
        size_to_str(size),
        size
    ));
    s.push_str(&format!(
        "disk size: {}\n",
        size_to_str(g("actual-size").as_u64().unwrap_or(0))
    ));
    if v.get("encrypted").and_then(Value::as_bool) == Some(true) {
        s.push_str("encrypted: yes\n");
    }
    if let Some(cs) = v.get("cluster-size").and_then(Value::as_u64) {
        s.push_str(&format!("cluster_size: {cs}\n"));
    }
    if let Some(b) = v.get("backing-filename").and_then(Value::as_str) {
        let full = v
            .get("full-backing-filename")
            .and_then(Value::as_str)
            .unwrap_or(b);
        if full != b {
            s.push_str(&format!("backing file: {b} (actual path: {full})\n"));
        } else {
            s.push_str(&format!("backing file: {b}\n"));
        }
    }
    if let Some(f) = v.get("backing-filename-format").and_then(Value::as_str) {
        s.push_str(&format!("backing file format: {f}\n"));
    }
    if v.get("dirty-flag").and_then(Value::as_bool) == Some(true) {
        s.push_str("cleanly shut down: no\n");
    }
    if let Some(snaps) = v.get("snapshots").and_then(Value::as_array) {
        s.push_str(&snapshot_table(snaps));
    }
    if let Some(fs) = v.get("format-specific").and_then(|f| f.get("data")) {
        s.push_str("Format specific information:\n");
        super::qjson::dump_human(fs, 1, &mut s);
    }
    if let Some(child) = v
        .get("children")
        .and_then(|c| c.get(0))
        .and_then(|c| c.get("info"))
    {
        let len = child["virtual-size"].as_u64().unwrap_or(0);
        s.push_str("Child node '/file':\n");
        s.push_str(&format!("    filename: {}\n", l.filename));
        s.push_str("    protocol type: file\n");
        s.push_str(&format!(
            "    file length: {} ({len} bytes)\n",
            size_to_str(len)
        ));
        s.push_str(&format!(
            "    disk size: {}\n",
            size_to_str(child["actual-size"].as_u64().unwrap_or(0))
        ));
    }
    s
}

/// The internal snapshots of `q` as `info --output=json` lists them (QDict member order).
pub(crate) fn snapshots_json(q: &crate::qcow2::Qcow2) -> Vec<Value> {
    q.snapshots()
        .iter()
        .map(|s| {
            let mut o = Map::new();
            if let Some(ic) = s.icount {
                o.insert("icount".into(), json!(ic));
            }
            o.insert(
                "vm-clock-nsec".into(),
                json!(s.vm_clock_nsec % 1_000_000_000),
            );
            o.insert("name".into(), json!(s.name));
            o.insert("date-sec".into(), json!(s.date_sec));
            o.insert("date-nsec".into(), json!(s.date_nsec));
            o.insert(
                "vm-clock-sec".into(),
                json!(s.vm_clock_nsec / 1_000_000_000),
            );
            o.insert("id".into(), json!(s.id));
            o.insert("vm-state-size".into(), json!(s.vm_state_size));
            Value::Object(o)
        })
        .collect()
}

/// `Snapshot list:` and its table, as `info` and `snapshot -l` print it (block/qapi.c
/// `bdrv_snapshot_dump`).
pub(crate) fn snapshot_table(snaps: &[Value]) -> String {
    let mut s = String::from("Snapshot list:\n");
    s.push_str(&format!(
        "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}\n",
        "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT"
    ));
    for sn in snaps {
        s.push_str(&snapshot_line(sn));
    }
    s
}

fn snapshot_line(sn: &Value) -> String {
    let date_sec = sn["date-sec"].as_i64().unwrap_or(0);
    let date = format_local_time(date_sec);
    let clock_sec = sn["vm-clock-sec"].as_u64().unwrap_or(0);
    let clock_nsec = sn["vm-clock-nsec"].as_u64().unwrap_or(0);
    let clock = format!(
        "{:04}:{:02}:{:02}.{:03}",
        clock_sec / 3600,
        (clock_sec / 60) % 60,
        clock_sec % 60,
        (clock_nsec / 1_000_000) % 1000
    );
    let icount = sn
        .get("icount")
        .and_then(Value::as_u64)
        .map(|i| i.to_string())
        .unwrap_or_default();
    format!(
        "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}\n",
        sn["id"].as_str().unwrap_or(""),
        sn["name"].as_str().unwrap_or(""),
        size_to_str(sn["vm-state-size"].as_u64().unwrap_or(0)),
        date,
        clock,
        icount
    )
}

fn format_local_time(t: i64) -> String {
    match crate::io::sys::local_time(t) {
        Some((y, mo, d, h, mi, sec)) => {
            format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{sec:02}")
        }
        None => String::new(),
    }
}

pub fn run(a: &InfoArgs) -> Result<i32> {
    let mut opts = open_options(a.format.as_deref())?;
    opts.no_io = true;
    opts.no_backing = !a.backing_chain;
    opts.locking = super::locking(
        &a.image,
        a.force_share,
        false,
        crate::open::Locking::Inspect,
    )?;
    opts.policy = super::open_policy(&a.allow_backing)?;
    let name = super::image_name(&a.image, a.image_opts, &mut opts)?;
    let img = super::open_named(&name, &opts)?;
    let mut infos = Vec::new();
    for l in &img.layers {
        infos.push(layer_info(l)?);
    }
    let mut out = std::io::stdout().lock();
    match a.output {
        OutputFormat::Json => {
            let v = if a.backing_chain {
                Value::Array(infos)
            } else {
                infos.into_iter().next().unwrap_or(Value::Null)
            };
            let _ = writeln!(out, "{}", to_qemu_pretty(&v));
        }
        OutputFormat::Human => {
            let mut first = true;
            for (l, v) in img.layers.iter().zip(&infos) {
                if !first {
                    let _ = writeln!(out);
                }
                first = false;
                let _ = out.write_all(human(l, v).as_bytes());
            }
        }
    }
    Ok(0)
}
