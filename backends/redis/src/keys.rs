//! The key layout (see the crate docs). Every key starts with a hash tag
//! `{namespace/...}` naming what it belongs to, so that all keys one script
//! touches share a slot on Redis Cluster: the namespace's registry, one
//! partition (its log, dedup state and every queue-mode group's leases in
//! it), or one group (members, owners, commits).

/// Keys of the namespace's registry (one slot).
pub(crate) struct Registry {
    pub topics: String,
    pub configs: String,
    pub seq: String,
    pub groups: String,
}

impl Registry {
    pub(crate) fn new(ns: &str) -> Self {
        let p = format!("{{{ns}/m}}");
        Registry {
            topics: format!("{p}:topics"),
            configs: format!("{p}:configs"),
            seq: format!("{p}:seq"),
            groups: format!("{p}:groups"),
        }
    }
}

/// Keys of one partition (one slot), by topic id.
pub(crate) struct Part {
    prefix: String,
    pub meta: String,
    pub log: String,
    pub idem: String,
    pub idem_times: String,
    pub groups: String,
}

impl Part {
    pub(crate) fn new(ns: &str, topic_id: u64, partition: u32) -> Self {
        let prefix = format!("{{{ns}/t{topic_id}.{partition}}}");
        Part {
            meta: format!("{prefix}:m"),
            log: format!("{prefix}:log"),
            idem: format!("{prefix}:idem"),
            idem_times: format!("{prefix}:idemt"),
            groups: format!("{prefix}:groups"),
            prefix,
        }
    }

    /// A queue-mode group's keys in this partition.
    pub(crate) fn queue(&self, group: &str) -> Queue {
        let q = format!("{}:q:{group}", self.prefix);
        Queue {
            cursor: format!("{q}:c"),
            state: format!("{q}:s"),
            dead: format!("{q}:d"),
            legacy: [
                format!("{q}:l"),
                format!("{q}:r"),
                format!("{q}:a"),
                format!("{q}:t"),
            ],
        }
    }
}

/// A queue-mode group's keys in one partition.
pub(crate) struct Queue {
    /// Hash: `cur` (the next fresh offset).
    pub cursor: String,
    /// Sorted set: every message leased or waiting to be offered again,
    /// one member each (`queue_settle.lua` has the format).
    pub state: String,
    /// Hash: dead letters waiting for their move to the DLQ.
    pub dead: String,
    /// The layout before the state set: leases, ready, attempts, lease
    /// tokens (converted by `queue_migrate.lua`, see [`crate::migrate`]).
    pub legacy: [String; 4],
}

impl Queue {
    /// Every key, the legacy ones included (to delete a group).
    pub(crate) fn all(&self) -> Vec<&str> {
        let mut all = vec![self.cursor.as_str(), &self.state, &self.dead];
        all.extend(self.legacy.iter().map(String::as_str));
        all
    }
}

/// Keys of one group (one slot).
pub(crate) struct Group {
    pub meta: String,
    pub members: String,
    pub subs: String,
    pub topics: String,
    pub owners: String,
    pub commits: String,
}

impl Group {
    pub(crate) fn new(ns: &str, group: &str) -> Self {
        let p = format!("{{{ns}/g.{group}}}");
        Group {
            meta: format!("{p}:meta"),
            members: format!("{p}:mem"),
            subs: format!("{p}:sub"),
            topics: format!("{p}:topics"),
            owners: format!("{p}:own"),
            commits: format!("{p}:commits"),
        }
    }
}

/// The pub/sub channel that wakes waiting polls of a namespace.
pub(crate) fn wake_channel(ns: &str) -> String {
    format!("conveyor:{ns}:wake")
}

/// A partition's field in a group's owners hash.
pub(crate) fn owner_field(topic: &str, partition: u32) -> String {
    format!("{topic}/{partition}")
}

/// A partition's field in a group's commits hash (by topic id, so that a
/// topic deleted and created again starts afresh).
pub(crate) fn commit_field(topic_id: u64, partition: u32) -> String {
    format!("{topic_id}/{partition}")
}
