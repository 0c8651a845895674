//! The chain walk: how a guest range resolves through the layers of a backing chain.
//!
//! Layer 0 is the top. A layer's `Mapping::Backing` sends the walk one layer down; the layer
//! that answers gives the run its 1-based `depth` (what `qemu:allocation-depth` exports; 0
//! means no layer holds the range). Past the end of a shorter backing file the range reads as
//! zeros owned by no layer. [`resolve_in`] answers one run, [`resolve_many_in`] many per
//! layer lookup (`BlockDevice::map_many`).

use super::{BlockDevice, FileRole, Mapping, Run};
use crate::error::{Error, ErrorKind, Result};
use std::sync::Arc;

/// The answer of the chain for a guest range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainRun {
    pub len: u64,
    /// The mapping in the layer that answered; `Backing` when no layer did.
    pub mapping: Mapping,
    /// 1 = top layer, 2 = first backing file, ...; 0 = allocated nowhere.
    pub depth: usize,
    /// When `depth` is 0 because the range lies beyond the end of a backing file shorter than
    /// the layers above it: that file's depth (its synthesized zeros count as allocated there
    /// for `qemu:allocation-depth`, as QEMU's `bdrv_is_allocated_above` counts them); else 0.
    pub past_end_of: usize,
}

impl ChainRun {
    /// The depth `qemu:allocation-depth` reports: the answering layer, or the shorter backing
    /// file beyond whose end the range lies.
    pub fn allocation_depth(&self) -> usize {
        if self.depth == 0 {
            self.past_end_of
        } else {
            self.depth
        }
    }

    /// Reads as zeros (`base:allocation` ZERO).
    pub fn reads_zero(&self) -> bool {
        match self.mapping {
            Mapping::Zero { .. } | Mapping::Backing { .. } => true,
            Mapping::Data { zero, .. } => zero,
            Mapping::Compressed => false,
        }
    }

    /// Holds data (`base:allocation` not HOLE).
    pub fn is_data(&self) -> bool {
        matches!(self.mapping, Mapping::Data { .. } | Mapping::Compressed)
    }
}

pub(super) fn no_layer() -> Error {
    Error::new(ErrorKind::Corrupt, "a run maps to no layer")
}

/// Resolve through `layers` (the first is the top). Offsets beyond the top's size are the
/// caller's to refuse; beyond a shorter lower layer they read as zeros.
pub(super) fn resolve_in(layers: &[Arc<dyn BlockDevice>], off: u64, len: u64) -> Result<ChainRun> {
    {
        let mut len = len;
        for (i, layer) in layers.iter().enumerate() {
            let size = layer.size();
            if off >= size {
                // beyond the end of a (shorter) backing file: zeros, owned by no layer
                return Ok(ChainRun {
                    len,
                    mapping: Mapping::Backing {
                        file: FileRole::Image,
                        host: None,
                    },
                    depth: 0,
                    past_end_of: i + 1,
                });
            }
            len = len.min(size - off);
            let run = layer.map(off, len)?;
            debug_assert!(run.len > 0 && run.len <= len);
            len = run.len.clamp(1, len);
            if !matches!(run.mapping, Mapping::Backing { .. }) {
                return Ok(ChainRun {
                    len,
                    mapping: run.mapping,
                    depth: i + 1,
                    past_end_of: 0,
                });
            }
        }
        Ok(ChainRun {
            len,
            mapping: Mapping::Backing {
                file: FileRole::Image,
                host: None,
            },
            depth: 0,
            past_end_of: 0,
        })
    }
}

/// Resolve consecutive runs of `[off, off + len)` through `layers` (the first is the top,
/// `depth` layers above it in the whole chain) until `out` holds `limit` runs; returns how many
/// bytes the appended runs cover (0 only when `out` was already full). `scratch` holds each
/// layer's runs while they are walked (left as it was found).
pub(super) fn resolve_many_in(
    layers: &[Arc<dyn BlockDevice>],
    depth: usize,
    off: u64,
    len: u64,
    limit: usize,
    out: &mut Vec<ChainRun>,
    scratch: &mut Vec<Run>,
) -> Result<u64> {
    // zeros owned by no layer: below the bottom (`past_end_of` 0), or beyond the end of a
    // (shorter) backing file (`past_end_of` its depth)
    let unowned = |len, past_end_of| ChainRun {
        len,
        mapping: Mapping::Backing {
            file: FileRole::Image,
            host: None,
        },
        depth: 0,
        past_end_of,
    };
    if out.len() >= limit || len == 0 {
        return Ok(0);
    }
    let Some((layer, below)) = layers.split_first() else {
        out.push(unowned(len, 0));
        return Ok(len);
    };
    let size = layer.size();
    if off >= size {
        out.push(unowned(len, depth + 1));
        return Ok(len);
    }
    let inside = len.min(size - off);
    let base = scratch.len();
    let res = layer
        .map_many(off, inside, limit - out.len(), scratch)
        .and_then(|()| walk_runs(below, depth, off, inside, limit, out, scratch, base));
    scratch.truncate(base);
    let done = res?;
    if done == inside && inside < len && out.len() < limit {
        out.push(unowned(len - inside, depth + 1));
        return Ok(len);
    }
    Ok(done)
}

/// The second half of `resolve_many_in`: turn the runs one layer mapped (`scratch[base..]`,
/// from `off`, covering at most `inside` bytes) into resolved runs, walking `below` for the
/// unallocated ones. Returns the bytes covered.
#[allow(clippy::too_many_arguments)]
fn walk_runs(
    below: &[Arc<dyn BlockDevice>],
    depth: usize,
    off: u64,
    inside: u64,
    limit: usize,
    out: &mut Vec<ChainRun>,
    scratch: &mut Vec<Run>,
    base: usize,
) -> Result<u64> {
    let mut done = 0u64;
    let mut i = base;
    while let Some(&run) = scratch.get(i) {
        i += 1;
        let n = run.len.clamp(1, inside - done);
        if out.len() >= limit {
            return Ok(done);
        }
        if !matches!(run.mapping, Mapping::Backing { .. }) {
            out.push(ChainRun {
                len: n,
                mapping: run.mapping,
                depth: depth + 1,
                past_end_of: 0,
            });
        } else if below.is_empty() {
            out.push(ChainRun {
                len: n,
                mapping: Mapping::Backing {
                    file: FileRole::Image,
                    host: None,
                },
                depth: 0,
                past_end_of: 0,
            });
        } else {
            let got = resolve_many_in(below, depth + 1, off + done, n, limit, out, scratch)?;
            if got < n {
                return Ok(done + got);
            }
        }
        done += n;
        if done >= inside {
            break;
        }
    }
    Ok(done)
}

/// Append at least one and at most `max` runs from `off` (at most `len` bytes, `len > 0`) to
/// `out`, contiguous from `off`. An error only fails the call when it concerns the first run:
/// runs are pushed whole and in order, so the ones before a failure stand, and the error is
/// reported when the caller asks for that range itself (as [`resolve_in`] run by run would).
pub(super) fn resolve_batch(
    layers: &[Arc<dyn BlockDevice>],
    off: u64,
    len: u64,
    max: usize,
    out: &mut Vec<ChainRun>,
) -> Result<()> {
    let first = out.len();
    let limit = first.saturating_add(max.max(1));
    match resolve_many_in(layers, 0, off, len, limit, out, &mut Vec::new()) {
        Ok(_) => Ok(()),
        Err(_) if out.len() > first => Ok(()),
        Err(e) => Err(e),
    }
}
