//! Metadata contexts an export offers and how client queries select them.
//!
//! Contexts (proto.md "Metadata querying"; qemu `docs/interop/nbd.rst`):
//! `base:allocation`, `qemu:allocation-depth` (when the export enables it) and
//! `qemu:dirty-bitmap:<name>` for every exported bitmap, and the vendor context
//! `qnbd:dirty-allocated:<name>` (dirty and holding data) beside each. Query syntax follows
//! qemu-nbd:
//! `base:` and `qemu:` list their whole namespace, `qemu:dirty-bitmap:` lists every bitmap; the
//! empty leaf selects nothing in `NBD_OPT_SET_META_CONTEXT`; unknown namespaces and unknown
//! leaves are ignored, never errors.

/// A metadata context of an export.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum MetaContext {
    BaseAllocation,
    AllocationDepth,
    DirtyBitmap(String),
    /// Vendor context: bit 0 set where the bitmap is dirty *and* the range holds data (not a
    /// hole), so a backup client needs one query instead of two.
    DirtyAllocated(String),
}

impl MetaContext {
    /// Name on the wire.
    pub fn name(&self) -> String {
        match self {
            MetaContext::BaseAllocation => "base:allocation".into(),
            MetaContext::AllocationDepth => "qemu:allocation-depth".into(),
            MetaContext::DirtyBitmap(n) => format!("qemu:dirty-bitmap:{n}"),
            MetaContext::DirtyAllocated(n) => format!("qnbd:dirty-allocated:{n}"),
        }
    }
}

/// Whether a query lists (wildcards allowed) or selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueryMode {
    List,
    Set,
}

/// The contexts an export offers, in the order (and with the ids) they are reported.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Available {
    pub allocation_depth: bool,
    pub bitmaps: Vec<String>,
    /// Leave the `qnbd:` contexts out of a list of everything (an empty
    /// `NBD_OPT_LIST_META_CONTEXT`), so a client sees exactly qemu-nbd's list; a `qnbd:` query
    /// still finds them.
    pub hide_vendor: bool,
}

impl Available {
    /// Every context, in id order: base:allocation = 0, qemu:allocation-depth = 1, bitmaps from 2.
    pub fn all(&self) -> Vec<(u32, MetaContext)> {
        let mut v = vec![(0, MetaContext::BaseAllocation)];
        if self.allocation_depth {
            v.push((1, MetaContext::AllocationDepth));
        }
        for (i, b) in self.bitmaps.iter().enumerate() {
            v.push((2 + i as u32, MetaContext::DirtyBitmap(b.clone())));
        }
        let base = 2 + self.bitmaps.len() as u32;
        for (i, b) in self.bitmaps.iter().enumerate() {
            v.push((base + i as u32, MetaContext::DirtyAllocated(b.clone())));
        }
        v
    }

    /// What an empty list query reports: [`Available::all`], without the vendor contexts when
    /// they are hidden.
    pub fn listed(&self) -> Vec<(u32, MetaContext)> {
        let mut v = self.all();
        if self.hide_vendor {
            v.retain(|(_, c)| !matches!(c, MetaContext::DirtyAllocated(_)));
        }
        v
    }

    /// The contexts matched by one query, with their ids.
    pub fn matching(&self, query: &[u8], mode: QueryMode) -> Vec<(u32, MetaContext)> {
        let Ok(q) = std::str::from_utf8(query) else {
            return Vec::new();
        };
        let list = mode == QueryMode::List;
        let all = self.all();
        let pick = |f: &dyn Fn(&MetaContext) -> bool| -> Vec<(u32, MetaContext)> {
            all.iter().filter(|(_, c)| f(c)).cloned().collect()
        };
        if let Some(leaf) = q.strip_prefix("base:") {
            match leaf {
                "allocation" => pick(&|c| *c == MetaContext::BaseAllocation),
                "" if list => pick(&|c| *c == MetaContext::BaseAllocation),
                _ => Vec::new(),
            }
        } else if let Some(leaf) = q.strip_prefix("qnbd:") {
            if leaf.is_empty() || leaf == "dirty-allocated:" {
                if list {
                    pick(&|c| matches!(c, MetaContext::DirtyAllocated(_)))
                } else {
                    Vec::new()
                }
            } else if let Some(name) = leaf.strip_prefix("dirty-allocated:") {
                pick(&|c| matches!(c, MetaContext::DirtyAllocated(n) if n == name))
            } else {
                Vec::new()
            }
        } else if let Some(leaf) = q.strip_prefix("qemu:") {
            if leaf.is_empty() {
                if list {
                    pick(&|c| {
                        matches!(
                            c,
                            MetaContext::AllocationDepth | MetaContext::DirtyBitmap(_)
                        )
                    })
                } else {
                    Vec::new()
                }
            } else if leaf == "allocation-depth" {
                pick(&|c| *c == MetaContext::AllocationDepth)
            } else if let Some(name) = leaf.strip_prefix("dirty-bitmap:") {
                if name.is_empty() {
                    if list {
                        pick(&|c| matches!(c, MetaContext::DirtyBitmap(_)))
                    } else {
                        Vec::new()
                    }
                } else {
                    pick(&|c| matches!(c, MetaContext::DirtyBitmap(n) if n == name))
                }
            } else {
                Vec::new()
            }
        } else {
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn avail() -> Available {
        Available {
            allocation_depth: true,
            bitmaps: vec!["b0".into(), "b1".into()],
            hide_vendor: false,
        }
    }

    fn names(v: Vec<(u32, MetaContext)>) -> Vec<String> {
        v.into_iter().map(|(_, c)| c.name()).collect()
    }

    #[test]
    fn qemu_namespace_lists_depth_and_bitmaps() {
        assert_eq!(
            names(avail().matching(b"qemu:", QueryMode::List)),
            [
                "qemu:allocation-depth",
                "qemu:dirty-bitmap:b0",
                "qemu:dirty-bitmap:b1"
            ]
        );
        assert!(avail().matching(b"qemu:", QueryMode::Set).is_empty());
    }

    #[test]
    fn dirty_bitmap_namespace_lists_bitmaps_only() {
        assert_eq!(
            names(avail().matching(b"qemu:dirty-bitmap:", QueryMode::List)),
            ["qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:b1"]
        );
        assert_eq!(
            names(avail().matching(b"qemu:dirty-bitmap:b1", QueryMode::Set)),
            ["qemu:dirty-bitmap:b1"]
        );
        assert!(avail()
            .matching(b"qemu:dirty-bitmap:nosuch", QueryMode::Set)
            .is_empty());
    }

    #[test]
    fn vendor_namespace_lists_dirty_allocated_contexts() {
        assert_eq!(
            names(avail().matching(b"qnbd:", QueryMode::List)),
            ["qnbd:dirty-allocated:b0", "qnbd:dirty-allocated:b1"]
        );
        assert_eq!(
            names(avail().matching(b"qnbd:dirty-allocated:b1", QueryMode::Set)),
            ["qnbd:dirty-allocated:b1"]
        );
    }

    #[test]
    fn depth_is_offered_only_when_enabled() {
        let a = Available::default();
        assert!(a
            .matching(b"qemu:allocation-depth", QueryMode::Set)
            .is_empty());
        assert_eq!(
            names(a.matching(b"base:", QueryMode::List)),
            ["base:allocation"]
        );
        assert!(a.matching(b"base:", QueryMode::Set).is_empty());
        assert!(a.matching(b"x-foo:bar", QueryMode::Set).is_empty());
        assert!(a.matching(&[0xff, b':'], QueryMode::Set).is_empty());
    }
}
