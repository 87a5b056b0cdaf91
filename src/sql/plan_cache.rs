//! A cache of statement analyses by SQL text, bounded by entries and by bytes, so that
//! a statement prepared or sent again is not parsed again. Oldest entries go first.
//!
//! It holds statement texts (which may contain literal values) only in memory and
//! never logs them.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

/// Most entries kept.
pub const MAX_ENTRIES: usize = 2048;
/// Most bytes of texts plus estimated analysis sizes kept.
pub const MAX_BYTES: usize = 8 << 20;
/// Texts longer than this are analysed every time (they are rare and would crowd out
/// everything else).
pub const MAX_TEXT_BYTES: usize = 64 << 10;

pub struct PlanCache<V> {
    entries: HashMap<Arc<[u8]>, (Arc<V>, usize)>,
    order: VecDeque<Arc<[u8]>>,
    bytes: usize,
    max_entries: usize,
    max_bytes: usize,
}

impl<V> std::fmt::Debug for PlanCache<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the texts: they may hold values.
        f.debug_struct("PlanCache")
            .field("entries", &self.entries.len())
            .field("bytes", &self.bytes)
            .finish()
    }
}

impl<V> Default for PlanCache<V> {
    fn default() -> Self {
        PlanCache::new(MAX_ENTRIES, MAX_BYTES)
    }
}

impl<V> PlanCache<V> {
    pub fn new(max_entries: usize, max_bytes: usize) -> PlanCache<V> {
        PlanCache {
            entries: HashMap::new(),
            order: VecDeque::new(),
            bytes: 0,
            max_entries,
            max_bytes,
        }
    }

    pub fn get(&self, text: &[u8]) -> Option<Arc<V>> {
        self.entries.get(text).map(|(value, _)| value.clone())
    }

    /// Keeps `value` for `text`; `value_bytes` estimates its size. Evicts the oldest
    /// entries until both bounds hold.
    pub fn insert(&mut self, text: &[u8], value: Arc<V>, value_bytes: usize) {
        let size = text.len() + value_bytes;
        if text.len() > MAX_TEXT_BYTES || size > self.max_bytes || self.entries.contains_key(text) {
            return;
        }
        while !self.order.is_empty()
            && (self.entries.len() >= self.max_entries || self.bytes + size > self.max_bytes)
        {
            if let Some(oldest) = self.order.pop_front() {
                if let Some((_, old_size)) = self.entries.remove(&oldest) {
                    self.bytes -= old_size;
                }
            }
        }
        let key: Arc<[u8]> = Arc::from(text);
        self.order.push_back(key.clone());
        self.entries.insert(key, (value, size));
        self.bytes += size;
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes accounted to the entries kept.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hits_what_was_inserted() {
        let mut cache = PlanCache::new(4, 1000);
        cache.insert(b"SELECT 1", Arc::new(1), 10);
        assert_eq!(cache.get(b"SELECT 1").as_deref(), Some(&1));
        assert_eq!(cache.get(b"SELECT 2"), None);
    }

    #[test]
    fn evicts_the_oldest_past_the_entry_bound() {
        let mut cache = PlanCache::new(2, 1000);
        cache.insert(b"a", Arc::new(1), 1);
        cache.insert(b"b", Arc::new(2), 1);
        cache.insert(b"c", Arc::new(3), 1);
        assert_eq!(cache.len(), 2);
        assert_eq!(cache.get(b"a"), None);
        assert_eq!(cache.get(b"c").as_deref(), Some(&3));
    }

    #[test]
    fn evicts_the_oldest_past_the_byte_bound() {
        let mut cache = PlanCache::new(100, 30);
        cache.insert(b"aaaa", Arc::new(1), 8);
        cache.insert(b"bbbb", Arc::new(2), 8);
        assert_eq!(cache.bytes(), 24);
        cache.insert(b"cccc", Arc::new(3), 8);
        assert!(cache.bytes() <= 30);
        assert_eq!(cache.get(b"aaaa"), None);
        assert_eq!(cache.get(b"bbbb").as_deref(), Some(&2));
        assert_eq!(cache.get(b"cccc").as_deref(), Some(&3));
    }

    #[test]
    fn does_not_keep_what_cannot_fit() {
        let mut cache = PlanCache::new(100, 30);
        cache.insert(b"aaaa", Arc::new(1), 100);
        assert!(cache.is_empty());
        let long = vec![b'x'; MAX_TEXT_BYTES + 1];
        let mut roomy = PlanCache::new(100, usize::MAX / 2);
        roomy.insert(&long, Arc::new(1), 1);
        assert!(roomy.is_empty());
    }
}
