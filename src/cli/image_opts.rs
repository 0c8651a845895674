//! Image names given on the command line in QEMU's structured forms: `json:{...}` and
//! `--image-opts` (QemuOpts `key=value,...` with dotted keys). Only the subset management
//! tools use is accepted (vdsm, virt-v2v, libvirt):
//!
//! | key | meaning |
//! |---|---|
//! | `driver` | `qcow2` or `raw` (the format), or `compress` over a qcow2 `file` |
//! | `file.driver` | `file` or `host_device` (the protocol: a local file or block device) |
//! | `file.filename` (or `filename`) | the path |
//! | `file.locking` | `on` / `auto` (default) or `off`: QEMU's image locks (see `io::lock`) |
//! | `backing` | `null` (JSON) or empty: open this layer alone, no backing file |
//! | `cache.direct`, `cache.no-flush` (also under `file.`) | host cache mode |
//! | `file.aio` | `threads`, `native` or `io_uring` |
//! | `read-only` | `on` / `true`: open read-only |
//!
//! Anything else is refused by name, so a tool never gets a silently different image. Names
//! found inside images are never parsed this way: they stay plain local file names.

use crate::error::{Error, ErrorKind, Result};
use crate::open::{CacheMode, Format, Locking, OpenOptions};

/// What a structured name says, beyond the path.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageSpec {
    pub filename: String,
    pub format: Option<Format>,
    /// `driver=compress`: writes become compressed clusters.
    pub compress: bool,
    pub no_backing: bool,
    pub locking_off: bool,
    pub direct: Option<bool>,
    pub no_flush: Option<bool>,
    pub aio: Option<String>,
    pub read_only: bool,
}

fn bad(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidArgument, msg)
}

/// QEMU's boolean spellings (`qapi_bool_parse`).
fn boolean(key: &str, v: &str) -> Result<bool> {
    match v {
        "on" | "yes" | "true" | "y" => Ok(true),
        "off" | "no" | "false" | "n" => Ok(false),
        _ => Err(bad(format!("Parameter '{key}' expects 'on' or 'off'"))),
    }
}

/// Flatten a JSON object into dotted keys (`{"file": {"filename": "x"}}` → `file.filename=x`),
/// as QEMU's `qdict_flatten` does; `null` stays distinguishable (as `None`).
fn flatten(
    prefix: &str,
    v: &serde_json::Value,
    out: &mut Vec<(String, Option<String>)>,
) -> Result<()> {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out)?;
            }
        }
        serde_json::Value::Null => out.push((prefix.to_string(), None)),
        serde_json::Value::String(s) => out.push((prefix.to_string(), Some(s.clone()))),
        serde_json::Value::Bool(b) => out.push((
            prefix.to_string(),
            Some(if *b { "on" } else { "off" }.into()),
        )),
        serde_json::Value::Number(n) => out.push((prefix.to_string(), Some(n.to_string()))),
        serde_json::Value::Array(_) => {
            return Err(bad(format!(
                "Parameter '{prefix}': lists are not supported"
            )))
        }
    }
    Ok(())
}

/// The pairs of a `json:` name.
fn json_pairs(s: &str) -> Result<Vec<(String, Option<String>)>> {
    let v: serde_json::Value = serde_json::from_str(s)
        .map_err(|e| bad(format!("Could not parse the JSON options: {e}")))?;
    if !v.is_object() {
        return Err(bad("Could not parse the JSON options: not an object"));
    }
    let mut out = Vec::new();
    flatten("", &v, &mut out)?;
    Ok(out)
}

/// The pairs of an `--image-opts` string (`,,` is a literal comma).
fn opts_pairs(s: &str) -> Result<Vec<(String, Option<String>)>> {
    super::split_qemu_opts(s)
        .into_iter()
        .filter(|kv| !kv.is_empty())
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => Ok((k.to_string(), Some(v.to_string()))),
            None => Err(bad(format!("Invalid parameter '{kv}'"))),
        })
        .collect()
}

fn from_pairs(pairs: Vec<(String, Option<String>)>) -> Result<ImageSpec> {
    let mut spec = ImageSpec::default();
    let mut driver: Option<String> = None;
    let mut inner_driver: Option<String> = None;
    // under driver=compress, the image's keys are one level deeper ("file.")
    let compress = pairs
        .iter()
        .any(|(k, v)| k == "driver" && v.as_deref() == Some("compress"));
    for (k, v) in pairs {
        let key = if compress {
            match k.strip_prefix("file.") {
                Some(rest) => rest.to_string(),
                None if k == "driver" => {
                    spec.compress = true;
                    continue;
                }
                None => return Err(bad(format!("Invalid parameter '{k}' of driver 'compress'"))),
            }
        } else {
            k.clone()
        };
        let val = |v: &Option<String>| {
            v.clone()
                .ok_or_else(|| bad(format!("Parameter '{k}' cannot be null")))
        };
        match key.as_str() {
            "driver" => driver = Some(val(&v)?),
            "file.driver" => inner_driver = Some(val(&v)?),
            "filename" | "file.filename" => spec.filename = val(&v)?,
            "file" => spec.filename = val(&v)?,
            "backing" => match v.as_deref() {
                None | Some("") => spec.no_backing = true,
                Some(b) => {
                    return Err(bad(format!(
                        "backing '{b}': only null (no backing file) is supported here"
                    )))
                }
            },
            "file.locking" | "locking" => {
                spec.locking_off = match val(&v)?.as_str() {
                    "off" => true,
                    "on" | "auto" => false,
                    o => return Err(bad(format!("Invalid parameter value for 'locking': '{o}'"))),
                }
            }
            "cache.direct" | "file.cache.direct" => spec.direct = Some(boolean(&key, &val(&v)?)?),
            "cache.no-flush" | "file.cache.no-flush" => {
                spec.no_flush = Some(boolean(&key, &val(&v)?)?)
            }
            "file.aio" | "aio" => spec.aio = Some(val(&v)?),
            "read-only" => spec.read_only = boolean(&key, &val(&v)?)?,
            _ => {
                let d = driver.as_deref().unwrap_or("qcow2");
                return Err(bad(format!(
                    "Block format '{d}' does not support the option '{k}'"
                )));
            }
        }
    }
    spec.format = match driver.as_deref() {
        None => None,
        Some("file" | "host_device") if inner_driver.is_none() => {
            // a bare protocol node: the file's bytes are the guest's
            Some(Format::Raw)
        }
        Some(d) => Some(Format::parse(d)?),
    };
    if let Some(d) = inner_driver.as_deref() {
        if !matches!(d, "file" | "host_device") {
            return Err(Error::unsupported(format!(
                "Unknown protocol driver '{d}' (supported: file, host_device)"
            )));
        }
    }
    if spec.compress && spec.format != Some(Format::Qcow2) {
        return Err(bad("driver 'compress' needs a qcow2 image under it"));
    }
    if spec.filename.is_empty() {
        return Err(bad("The image options name no file (file.filename)"));
    }
    Ok(spec)
}

/// Parse a command line image name: a `json:` name (always, as QEMU does), an `--image-opts`
/// string when `image_opts`, else `None` (a plain file name).
pub fn parse(name: &str, image_opts: bool) -> Result<Option<ImageSpec>> {
    if let Some(j) = name.strip_prefix("json:") {
        return from_pairs(json_pairs(j)?).map(Some);
    }
    if image_opts {
        return from_pairs(opts_pairs(name)?).map(Some);
    }
    Ok(None)
}

impl ImageSpec {
    /// Apply to the options of a command whose own flags are already in `opts`; a format
    /// given both ways must agree.
    pub fn apply(&self, opts: &mut OpenOptions) -> Result<()> {
        opts.compress_writes |= self.compress;
        if let Some(f) = self.format {
            if opts.format.is_some_and(|g| g != f) {
                return Err(bad(format!(
                    "The format given (-f) and the image options' driver '{}' differ",
                    f.name()
                )));
            }
            opts.format = Some(f);
        }
        if self.no_backing {
            opts.no_backing = true;
        }
        if self.locking_off {
            opts.locking = Locking::Off;
        }
        if self.read_only {
            opts.writable = false;
        }
        let direct = self.direct.unwrap_or(opts.cache.direct());
        let no_flush = self.no_flush.unwrap_or(opts.cache.no_flush());
        let through = opts.cache.write_through();
        opts.cache = match (direct, no_flush, through) {
            (_, true, _) => CacheMode::Unsafe,
            (true, _, true) => CacheMode::DirectSync,
            (true, _, false) => CacheMode::None,
            (false, _, true) => CacheMode::Writethrough,
            (false, _, false) => CacheMode::Writeback,
        };
        if let Some(a) = &self.aio {
            opts.engine = crate::io::Engine::parse(a)
                .ok_or_else(|| bad(format!("Invalid parameter value for 'aio': '{a}'")))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vdsm_json_name() {
        let s = parse(
            r#"json:{"driver": "qcow2", "file": {"driver": "file", "filename": "/x/disk.qcow2"}, "backing": null}"#,
            false,
        )
        .unwrap()
        .unwrap();
        assert_eq!(s.filename, "/x/disk.qcow2");
        assert_eq!(s.format, Some(Format::Qcow2));
        assert!(s.no_backing);
    }

    #[test]
    fn image_opts_with_locking_and_cache() {
        let s = parse(
            "driver=raw,file.driver=host_device,file.filename=/dev/x,,y,file.locking=off,cache.direct=on",
            true,
        )
        .unwrap()
        .unwrap();
        assert_eq!(s.filename, "/dev/x,y");
        assert!(s.locking_off);
        assert_eq!(s.direct, Some(true));
        let mut o = OpenOptions::default();
        s.apply(&mut o).unwrap();
        assert_eq!(o.cache, CacheMode::None);
        assert_eq!(o.locking, Locking::Off);
    }

    #[test]
    fn compress_over_qcow2_and_refusals() {
        let s = parse(
            r#"json:{"driver":"compress","file":{"driver":"qcow2","file":{"driver":"file","filename":"a.qcow2"}}}"#,
            false,
        )
        .unwrap()
        .unwrap();
        assert!(s.compress);
        assert_eq!(s.filename, "a.qcow2");
        assert!(parse(
            "json:{\"driver\":\"qcow2\",\"file\":{\"driver\":\"nbd\",\"filename\":\"x\"}}",
            false
        )
        .is_err());
        assert!(parse("driver=qcow2,file.filename=a,frobnicate=1", true).is_err());
        assert!(parse("json:[1]", false).is_err());
        assert!(parse("plain.qcow2", false).unwrap().is_none());
    }
}
