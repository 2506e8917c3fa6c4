//! The dedup window of producer idempotency keys for one topic, kept per
//! partition (contract §3: a key deduplicates within its partition).
//!
//! Maps (partition, key) to the receipt of its first append until the
//! window passes. Loaded lazily from storage at first use after open;
//! pruned as it goes.

use crate::record::Receipt;
use std::collections::{HashMap, VecDeque};

/// Idempotency keys seen on one topic's partitions within its window.
#[derive(Debug, Default)]
pub(crate) struct DedupWindow {
    entries: HashMap<(u32, String), (Receipt, u64)>,
    order: VecDeque<(u64, (u32, String))>,
}

impl DedupWindow {
    /// The receipt of `key` on `partition` if it was appended within the
    /// window.
    pub fn get(&self, partition: u32, key: &str, now_ms: u64) -> Option<Receipt> {
        self.entries
            .get(&(partition, key.to_string()))
            .filter(|(_, expires)| *expires > now_ms)
            .map(|(r, _)| *r)
    }

    /// Remember `key` on the receipt's partition until `expires_ms`.
    pub fn insert(&mut self, key: String, receipt: Receipt, expires_ms: u64) {
        let id = (receipt.partition, key);
        self.order.push_back((expires_ms, id.clone()));
        self.entries.insert(id, (receipt, expires_ms));
    }

    /// Forget what expired.
    pub fn prune(&mut self, now_ms: u64) {
        while let Some((expires, _)) = self.order.front() {
            if *expires > now_ms {
                break;
            }
            let Some((_, id)) = self.order.pop_front() else {
                break;
            };
            if self.entries.get(&id).is_some_and(|(_, e)| *e <= now_ms) {
                self.entries.remove(&id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receipt(partition: u32, offset: u64) -> Receipt {
        Receipt {
            partition,
            offset,
            timestamp: 0,
        }
    }

    #[test]
    fn a_key_is_per_partition() {
        let mut w = DedupWindow::default();
        w.insert("evt".into(), receipt(1, 7), 100);
        assert_eq!(w.get(1, "evt", 0), Some(receipt(1, 7)));
        assert_eq!(w.get(2, "evt", 0), None);
    }

    #[test]
    fn expiry_is_exclusive_and_prune_keeps_reinserted_keys() {
        let mut w = DedupWindow::default();
        w.insert("a".into(), receipt(0, 1), 10);
        w.insert("b".into(), receipt(0, 2), 20);
        assert_eq!(w.get(0, "a", 9), Some(receipt(0, 1)));
        assert_eq!(w.get(0, "a", 10), None, "expires at its deadline");
        // "a" appended again after expiry: a new entry that outlives the old.
        w.insert("a".into(), receipt(0, 3), 30);
        w.prune(15);
        assert_eq!(w.get(0, "a", 15), Some(receipt(0, 3)));
        assert_eq!(w.get(0, "b", 15), Some(receipt(0, 2)));
        w.prune(30);
        assert_eq!(w.get(0, "a", 29), None);
        assert!(w.entries.is_empty() && w.order.is_empty());
    }
}
