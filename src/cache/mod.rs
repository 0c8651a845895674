//! Bounded metadata caches (L2 tables, refcount blocks).
//!
//! `MetaCache` maps a host offset to a shared, immutable table. It holds at most `capacity`
//! entries and evicts with CLOCK (second chance: an approximation of least recently used, with
//! O(1) operations). Lookups take a short lock and never hold it
//! across I/O: a miss loads outside the lock and inserts afterwards (two racing loaders of the
//! same table both read it; the second insert wins, both answers are equal).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, Mutex};

/// Hasher for host offsets (cluster-aligned u64 keys): one multiply, no SipHash rounds.
#[derive(Debug, Default)]
struct OffsetHasher(u64);

impl Hasher for OffsetHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u64(&mut self, k: u64) {
        // Fibonacci hashing; the high bits (which hashbrown uses) depend on every key bit
        self.0 = (k ^ (k >> 29)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

#[derive(Debug)]
struct Slot<V> {
    key: u64,
    value: Arc<V>,
    /// Used since the clock hand last passed (second chance).
    referenced: bool,
}

/// CLOCK replacement: slots in a ring, a hand that clears `referenced` bits until it finds an
/// entry not used since its last pass. Lookup, insert and eviction are O(1) (amortised).
#[derive(Debug)]
struct Inner<V> {
    index: HashMap<u64, usize, BuildHasherDefault<OffsetHasher>>,
    slots: Vec<Slot<V>>,
    hand: usize,
}

#[derive(Debug)]
pub struct MetaCache<V> {
    inner: Mutex<Inner<V>>,
    capacity: usize,
}

impl<V> MetaCache<V> {
    pub fn new(capacity: usize) -> Self {
        MetaCache {
            inner: Mutex::new(Inner {
                index: HashMap::default(),
                slots: Vec::new(),
                hand: 0,
            }),
            capacity: capacity.max(1),
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner<V>> {
        // A panic while holding this lock cannot leave the cache inconsistent in a way that
        // matters (index and slots are updated together without calls that panic between
        // them), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn get(&self, key: u64) -> Option<Arc<V>> {
        let mut g = self.lock();
        let i = *g.index.get(&key)?;
        let s = &mut g.slots[i];
        s.referenced = true;
        Some(s.value.clone())
    }

    pub fn insert(&self, key: u64, value: Arc<V>) {
        let mut g = self.lock();
        if let Some(&i) = g.index.get(&key) {
            let s = &mut g.slots[i];
            s.value = value;
            s.referenced = true;
            return;
        }
        if g.slots.len() < self.capacity {
            let i = g.slots.len();
            g.slots.push(Slot {
                key,
                value,
                referenced: false,
            });
            g.index.insert(key, i);
            return;
        }
        // Sweep: at most one full turn clears every bit, so this ends within 2 * len steps.
        let n = g.slots.len();
        let mut hand = g.hand % n;
        while g.slots[hand].referenced {
            g.slots[hand].referenced = false;
            hand = (hand + 1) % n;
        }
        let old = std::mem::replace(
            &mut g.slots[hand],
            Slot {
                key,
                value,
                referenced: false,
            },
        );
        g.index.remove(&old.key);
        g.index.insert(key, hand);
        g.hand = (hand + 1) % n;
    }

    pub fn remove(&self, key: u64) {
        let mut g = self.lock();
        let Some(i) = g.index.remove(&key) else {
            return;
        };
        g.slots.swap_remove(i);
        if i < g.slots.len() {
            let moved = g.slots[i].key;
            g.index.insert(moved, i);
        }
    }

    pub fn clear(&self) {
        let mut g = self.lock();
        g.index.clear();
        g.slots.clear();
        g.hand = 0;
    }

    pub fn len(&self) -> usize {
        self.lock().slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Get `key`, loading it with `load` on a miss.
    pub fn get_or_load<E>(
        &self,
        key: u64,
        load: impl FnOnce() -> Result<V, E>,
    ) -> Result<Arc<V>, E> {
        if let Some(v) = self.get(key) {
            return Ok(v);
        }
        let v = Arc::new(load()?);
        self.insert(key, v.clone());
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recently_used_at_capacity() {
        let c = MetaCache::new(2);
        c.insert(1, Arc::new(10));
        c.insert(2, Arc::new(20));
        assert_eq!(c.get(1).as_deref(), Some(&10));
        c.insert(3, Arc::new(30));
        assert_eq!(c.len(), 2);
        assert!(c.get(2).is_none());
        assert_eq!(c.get(1).as_deref(), Some(&10));
        assert_eq!(c.get(3).as_deref(), Some(&30));
    }

    #[test]
    fn remove_and_reinsert_keep_the_index_consistent() {
        let c = MetaCache::new(3);
        for k in 0..3u64 {
            c.insert(k << 16, Arc::new(k));
        }
        c.remove(0);
        assert_eq!(c.len(), 2);
        assert_eq!(c.get(2 << 16).as_deref(), Some(&2));
        assert_eq!(c.get(1 << 16).as_deref(), Some(&1));
        for k in 10..100u64 {
            c.insert(k << 16, Arc::new(k));
            assert!(c.len() <= 3);
            assert_eq!(c.get(k << 16).as_deref(), Some(&k));
        }
        c.clear();
        assert!(c.is_empty());
    }
}
