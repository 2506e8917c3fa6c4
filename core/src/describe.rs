//! Observability types: what `describe_topic` and `group_lag` report.

use crate::config::{DeliveryMode, TopicConfig};
use serde::{Deserialize, Serialize};

/// One partition of a topic, as described.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionDescription {
    /// Partition number.
    pub partition: u32,
    /// First retained offset.
    pub log_start: u64,
    /// Offset the next record will get.
    pub log_end: u64,
    /// Bytes stored for the partition (as the backend counts them).
    pub bytes: u64,
}

/// A topic, as described.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicDescription {
    /// Topic name.
    pub name: String,
    /// Its config.
    pub config: TopicConfig,
    /// Per partition bounds.
    pub partitions: Vec<PartitionDescription>,
}

/// Lag of one partition for a group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionLag {
    /// Topic name.
    pub topic: String,
    /// Partition number.
    pub partition: u32,
    /// Stream mode: the committed offset (next to read). Queue mode: the
    /// lowest unsettled offset.
    pub committed: u64,
    /// The log end.
    pub log_end: u64,
    /// Records not yet settled: `log_end - committed` (minus records
    /// already acked above it, in queue mode).
    pub lag: u64,
    /// Queue mode: messages leased to members now.
    pub in_flight: u64,
    /// Queue mode: messages that could be delivered now.
    pub available: u64,
}

/// A group's lag over all its partitions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupLag {
    /// Group name.
    pub group: String,
    /// Its delivery mode.
    pub mode: DeliveryMode,
    /// Per partition.
    pub partitions: Vec<PartitionLag>,
}

impl GroupLag {
    /// Total lag over all partitions.
    pub fn total_lag(&self) -> u64 {
        self.partitions.iter().map(|p| p.lag).sum()
    }
    /// Total in flight over all partitions.
    pub fn total_in_flight(&self) -> u64 {
        self.partitions.iter().map(|p| p.in_flight).sum()
    }
}
