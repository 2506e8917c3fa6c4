//! The dedup window of producer idempotency keys for one topic.
//!
//! Maps a key to the receipt of its first append until the window passes.
//! Loaded lazily from storage at first use after open; pruned as it goes.

use crate::record::Receipt;
use std::collections::{HashMap, VecDeque};

/// Idempotency keys seen on one topic within its window.
#[derive(Debug, Default)]
pub(crate) struct DedupWindow {
    entries: HashMap<String, (Receipt, u64)>,
    order: VecDeque<(u64, String)>,
}

impl DedupWindow {
    /// The receipt of `key` if it was appended within the window.
    pub fn get(&self, key: &str, now_ms: u64) -> Option<Receipt> {
        self.entries
            .get(key)
            .filter(|(_, expires)| *expires > now_ms)
            .map(|(r, _)| *r)
    }

    /// Remember `key` until `expires_ms`.
    pub fn insert(&mut self, key: String, receipt: Receipt, expires_ms: u64) {
        self.order.push_back((expires_ms, key.clone()));
        self.entries.insert(key, (receipt, expires_ms));
    }

    /// Forget what expired.
    pub fn prune(&mut self, now_ms: u64) {
        while let Some((expires, _)) = self.order.front() {
            if *expires > now_ms {
                break;
            }
            let (_, key) = self.order.pop_front().expect("front exists");
            if self.entries.get(&key).is_some_and(|(_, e)| *e <= now_ms) {
                self.entries.remove(&key);
            }
        }
    }
}
