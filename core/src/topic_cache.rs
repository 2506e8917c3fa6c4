//! A server backend's short-lived cache of topic registry rows, written
//! once: a send then costs one round trip instead of two. A topic deleted
//! meanwhile fails the append, which forgets it; partitions added by
//! another process are seen within the cache's lifetime (a send to an
//! explicit partition beyond the cached count looks again first).

use parking_lot::Mutex;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Topic name → row, each kept for `ttl`.
#[derive(Debug)]
pub struct TopicCache<T> {
    ttl: Duration,
    rows: Mutex<HashMap<String, (T, Instant)>>,
}

impl<T: Clone> TopicCache<T> {
    /// An empty cache whose rows live for `ttl`.
    pub fn new(ttl: Duration) -> Self {
        TopicCache {
            ttl,
            rows: Mutex::new(HashMap::new()),
        }
    }

    /// The row of `name`, if cached less than `ttl` ago.
    pub fn get(&self, name: &str) -> Option<T> {
        let rows = self.rows.lock();
        let (row, at) = rows.get(name)?;
        (at.elapsed() < self.ttl).then(|| row.clone())
    }

    /// Cache `row` as `name`'s, read just now.
    pub fn put(&self, name: &str, row: &T) {
        self.rows
            .lock()
            .insert(name.to_string(), (row.clone(), Instant::now()));
    }

    /// Drop `name`'s row (deleted, grown, or found stale).
    pub fn forget(&self, name: &str) {
        self.rows.lock().remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_expire_and_can_be_forgotten() {
        let c = TopicCache::new(Duration::from_millis(30));
        c.put("t", &1);
        assert_eq!(c.get("t"), Some(1));
        c.forget("t");
        assert_eq!(c.get("t"), None);
        c.put("t", &2);
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(c.get("t"), None);
    }
}
