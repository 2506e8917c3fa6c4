//! The topic → partitions map every embedded storage keeps, with the
//! lookups and errors the contract wants (`TopicNotFound`,
//! `PartitionOutOfRange`). Owns no files and no records: `P` is the
//! storage's partition type.

use crate::error::{Error, Result};
use parking_lot::RwLock;
use std::collections::HashMap;
use std::sync::Arc;

type Partitions<P> = Arc<RwLock<Vec<Arc<P>>>>;

/// Partitions by topic; partitions are only ever added, per topic.
pub struct PartitionMap<P> {
    topics: RwLock<HashMap<String, Partitions<P>>>,
}

impl<P> Default for PartitionMap<P> {
    fn default() -> Self {
        PartitionMap {
            topics: RwLock::new(HashMap::new()),
        }
    }
}

impl<P> std::fmt::Debug for PartitionMap<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartitionMap")
            .field("topics", &self.topics.read().len())
            .finish()
    }
}

impl<P> PartitionMap<P> {
    /// Partition `partition` of `topic`.
    pub fn get(&self, topic: &str, partition: u32) -> Result<Arc<P>> {
        let topics = self.topics.read();
        let parts = topics
            .get(topic)
            .ok_or_else(|| Error::topic_not_found(topic))?
            .read();
        parts
            .get(partition as usize)
            .cloned()
            .ok_or_else(|| Error::partition_out_of_range(topic, partition, parts.len() as u32))
    }

    /// A topic's partitions, in order (empty if the topic is unknown).
    pub fn topic(&self, topic: &str) -> Vec<Arc<P>> {
        self.topics
            .read()
            .get(topic)
            .map(|p| p.read().clone())
            .unwrap_or_default()
    }

    /// Every partition of every topic.
    pub fn all(&self) -> Vec<Arc<P>> {
        self.topics
            .read()
            .values()
            .flat_map(|p| p.read().clone())
            .collect()
    }

    /// How many partitions `topic` has here (0 if unknown).
    pub fn count(&self, topic: &str) -> u32 {
        self.topics
            .read()
            .get(topic)
            .map_or(0, |p| p.read().len() as u32)
    }

    /// Grow `topic` to `partitions`, opening each missing partition with
    /// `open(index)` (outside the map's locks: it may do I/O). Concurrent
    /// growers may both open a partition; only one is kept.
    pub async fn grow<F, Fut>(&self, topic: &str, partitions: u32, mut open: F) -> Result<()>
    where
        F: FnMut(u32) -> Fut,
        Fut: std::future::Future<Output = Result<P>>,
    {
        let have = self.count(topic);
        let mut opened = Vec::new();
        for p in have..partitions {
            opened.push(Arc::new(open(p).await?));
        }
        let parts = self
            .topics
            .write()
            .entry(topic.to_string())
            .or_default()
            .clone();
        let mut parts = parts.write();
        for (p, part) in (have..partitions).zip(opened) {
            if parts.len() as u32 == p {
                parts.push(part);
            }
        }
        Ok(())
    }

    /// Forget a topic.
    pub fn remove(&self, topic: &str) {
        self.topics.write().remove(topic);
    }

    /// Forget every topic.
    pub fn clear(&self) {
        self.topics.write().clear();
    }
}
