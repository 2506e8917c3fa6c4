//! Observability types: what `describe_topic`, `group_lag` and
//! `describe_group` report.

use crate::config::{DeliveryMode, GroupConfig, TopicConfig};
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

/// One member of a consumer group, as described.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct MemberDescription {
    /// The member's id in the group (the backend's; stable while it is a
    /// member).
    pub id: String,
    /// The topics it reads.
    pub topics: Vec<String>,
    /// Stream mode: the partitions it owns in the current generation, as
    /// `(topic, partition)`.
    pub assignment: Vec<(String, u32)>,
    /// Queue mode: messages leased to it now.
    pub leases: u64,
    /// Milliseconds since it last polled or settled (its heartbeat).
    pub idle_ms: u64,
}

impl MemberDescription {
    /// A member reading `topics`, holding nothing; backends outside this
    /// crate fill in the other (public) fields.
    pub fn new(id: impl Into<String>, topics: Vec<String>) -> Self {
        MemberDescription {
            id: id.into(),
            topics,
            assignment: Vec::new(),
            leases: 0,
            idle_ms: 0,
        }
    }
}

/// A consumer group, as described: its settings, its members with what
/// each holds, and its lag.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct GroupDescription {
    /// Group name.
    pub group: String,
    /// Its settings (mode, visibility and session timeouts, DLQ policy),
    /// where the broker knows them (`None` from the default
    /// [`describe_group`](crate::Broker::describe_group)).
    pub config: Option<GroupConfig>,
    /// Stream mode: the generation (bumped by every rebalance).
    pub generation: u64,
    /// The members now.
    pub members: Vec<MemberDescription>,
    /// Whether `members` is what the group has. `false` where this broker
    /// cannot see members: a read-only view of an embedded store, whose
    /// members live in the owning process's memory.
    pub members_visible: bool,
    /// Lag per partition.
    pub lag: GroupLag,
}

impl GroupDescription {
    /// A group with `lag`, no known config, generation 0 and no visible
    /// members; backends outside this crate fill in the other (public)
    /// fields.
    pub fn new(group: impl Into<String>, lag: GroupLag) -> Self {
        GroupDescription {
            group: group.into(),
            config: None,
            generation: 0,
            members: Vec::new(),
            members_visible: false,
            lag,
        }
    }
}
