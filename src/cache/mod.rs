//! Bounded metadata caches (L2 tables, refcount blocks).
//!
//! `MetaCache` maps a host offset to a shared, immutable table. It holds at most `capacity`
//! entries and evicts the least recently used one. Lookups take a short lock and never hold it
//! across I/O: a miss loads outside the lock and inserts afterwards (two racing loaders of the
//! same table both read it; the second insert wins, both answers are equal).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

#[derive(Debug)]
struct Slot<V> {
    value: Arc<V>,
    stamp: u64,
}

#[derive(Debug)]
struct Inner<V> {
    map: HashMap<u64, Slot<V>>,
    clock: u64,
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
                map: HashMap::new(),
                clock: 0,
            }),
            capacity: capacity.max(1),
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner<V>> {
        // A panic while holding this lock cannot leave the map inconsistent (every mutation is a
        // single HashMap call), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn get(&self, key: u64) -> Option<Arc<V>> {
        let mut g = self.lock();
        g.clock += 1;
        let now = g.clock;
        g.map.get_mut(&key).map(|s| {
            s.stamp = now;
            s.value.clone()
        })
    }

    pub fn insert(&self, key: u64, value: Arc<V>) {
        let mut g = self.lock();
        g.clock += 1;
        let now = g.clock;
        if !g.map.contains_key(&key) && g.map.len() >= self.capacity {
            if let Some((&victim, _)) = g.map.iter().min_by_key(|(_, s)| s.stamp) {
                g.map.remove(&victim);
            }
        }
        g.map.insert(key, Slot { value, stamp: now });
    }

    pub fn remove(&self, key: u64) {
        self.lock().map.remove(&key);
    }

    pub fn clear(&self) {
        self.lock().map.clear();
    }

    pub fn len(&self) -> usize {
        self.lock().map.len()
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
}
