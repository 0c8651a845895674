//! A set of host cluster indexes stored as disjoint ranges: the metadata map of the write side.
//!
//! Metadata mostly comes in contiguous runs (L1 tables, the refcount table, snapshot L1
//! tables), and a crafted image can name 65,536 snapshots whose L1 tables cover millions of
//! clusters each; a range set keeps building the map proportional to the number of tables, not
//! to the clusters they cover.

use std::collections::BTreeMap;

#[derive(Debug, Default, Clone)]
pub(crate) struct ClusterSet {
    /// start -> end (exclusive); ranges are disjoint and never adjacent.
    ranges: BTreeMap<u64, u64>,
}

impl ClusterSet {
    pub(crate) fn contains(&self, c: u64) -> bool {
        self.ranges
            .range(..=c)
            .next_back()
            .is_some_and(|(_, &end)| c < end)
    }

    pub(crate) fn insert(&mut self, c: u64) {
        self.insert_range(c, c.saturating_add(1));
    }

    /// Add `[start, end)`.
    pub(crate) fn insert_range(&mut self, mut start: u64, mut end: u64) {
        if start >= end {
            return;
        }
        // merge with a range that starts before and reaches `start`
        if let Some((&s, &e)) = self.ranges.range(..=start).next_back() {
            if e >= start {
                start = s;
                end = end.max(e);
                self.ranges.remove(&s);
            }
        }
        // swallow the ranges that start inside (or right after) the new one
        while let Some((&s, &e)) = self.ranges.range(start..).next() {
            if s > end {
                break;
            }
            end = end.max(e);
            self.ranges.remove(&s);
        }
        self.ranges.insert(start, end);
    }

    pub(crate) fn remove(&mut self, c: u64) {
        let Some((&s, &e)) = self.ranges.range(..=c).next_back() else {
            return;
        };
        if c >= e {
            return;
        }
        self.ranges.remove(&s);
        if s < c {
            self.ranges.insert(s, c);
        }
        if c + 1 < e {
            self.ranges.insert(c + 1, e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ClusterSet;
    use std::collections::HashSet;

    #[test]
    fn behaves_like_a_hash_set() {
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut a = ClusterSet::default();
        let mut b = HashSet::new();
        for _ in 0..20_000 {
            let c = next() % 300;
            match next() % 3 {
                0 => {
                    let len = next() % 20;
                    a.insert_range(c, c + len);
                    b.extend(c..c + len);
                }
                1 => {
                    a.insert(c);
                    b.insert(c);
                }
                _ => {
                    a.remove(c);
                    b.remove(&c);
                }
            }
            for x in 0..330 {
                assert_eq!(a.contains(x), b.contains(&x), "cluster {x}");
            }
        }
    }

    #[test]
    fn huge_ranges_cost_one_entry() {
        let mut a = ClusterSet::default();
        for _ in 0..65_536 {
            a.insert_range(10, 10 + (1 << 24));
        }
        assert!(a.contains(10 + (1 << 24) - 1) && !a.contains(10 + (1 << 24)));
        assert_eq!(a.ranges.len(), 1);
    }
}
