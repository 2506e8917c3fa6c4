//! The keys of the engine's persisted state, encoded and parsed in one
//! place.
//!
//! This is a persisted format: every embedded storage (mmap's state log,
//! RocksDB's state column family) stores these strings as they are, so a
//! change here is a change of the disk format. The round-trip test below
//! pins every kind.
//!
//! | key | value |
//! |---|---|
//! | `t/{topic}` | the topic's config (JSON) |
//! | `g/{group}` | the group's config and topics (JSON) |
//! | `c/{group}/{topic}/{partition}` | the committed offset (decimal) |
//! | `q/{group}/{topic}/{partition}` | the queue-mode lease table's header: `"{floor} {next}"` (JSON of the whole table before format 2; read, never written) |
//! | `l/{group}/{topic}/{partition}/{offset}` | one offset's lease entry: `"s"`, `"{attempts}"` or `"{attempts} {not_before_ms}"` (see the lease module) |
//! | `i/{key}` | an idempotency-store entry's expiry, ms (decimal) |
//!
//! Group and topic names cannot contain `/` (see [`crate::validate`]), so
//! the fields of `c/`, `q/` and `l/` keys split unambiguously;
//! idempotency keys may contain anything and take the rest of the key.

use crate::broker::TopicPartition;
use std::fmt;
use std::str::FromStr;

/// One key of the engine's persisted state.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum StateKey {
    /// A topic's config.
    Topic(String),
    /// A group's config and topics.
    Group(String),
    /// A stream-mode group's committed offset for one partition.
    Commit(String, TopicPartition),
    /// A queue-mode group's lease-table header for one partition.
    Leases(String, TopicPartition),
    /// One offset's entry in a queue-mode group's lease table.
    LeaseEntry(String, TopicPartition, u64),
    /// An entry of the consumer-side idempotency store.
    Idempotency(String),
}

/// A string that is not a state key; says why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BadStateKey(pub &'static str);

impl fmt::Display for BadStateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl fmt::Display for StateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StateKey::Topic(t) => write!(f, "t/{t}"),
            StateKey::Group(g) => write!(f, "g/{g}"),
            StateKey::Commit(g, tp) => write!(f, "c/{g}/{}/{}", tp.topic, tp.partition),
            StateKey::Leases(g, tp) => write!(f, "q/{g}/{}/{}", tp.topic, tp.partition),
            StateKey::LeaseEntry(g, tp, o) => {
                write!(f, "l/{g}/{}/{}/{o}", tp.topic, tp.partition)
            }
            StateKey::Idempotency(k) => write!(f, "i/{k}"),
        }
    }
}

fn group_partition(rest: &str) -> Result<(String, TopicPartition), BadStateKey> {
    let mut it = rest.splitn(3, '/');
    let (Some(group), Some(topic), Some(partition)) = (it.next(), it.next(), it.next()) else {
        return Err(BadStateKey("expected group/topic/partition"));
    };
    let partition = partition
        .parse()
        .map_err(|_| BadStateKey("partition is not a number"))?;
    Ok((group.to_string(), TopicPartition::new(topic, partition)))
}

impl FromStr for StateKey {
    type Err = BadStateKey;

    fn from_str(s: &str) -> Result<Self, BadStateKey> {
        let (kind, rest) = s.split_once('/').ok_or(BadStateKey("no kind prefix"))?;
        Ok(match kind {
            "t" => StateKey::Topic(rest.to_string()),
            "g" => StateKey::Group(rest.to_string()),
            "i" => StateKey::Idempotency(rest.to_string()),
            "c" => {
                let (g, tp) = group_partition(rest)?;
                StateKey::Commit(g, tp)
            }
            "q" => {
                let (g, tp) = group_partition(rest)?;
                StateKey::Leases(g, tp)
            }
            "l" => {
                let (rest, offset) = rest
                    .rsplit_once('/')
                    .ok_or(BadStateKey("expected group/topic/partition/offset"))?;
                let offset = offset
                    .parse()
                    .map_err(|_| BadStateKey("offset is not a number"))?;
                let (g, tp) = group_partition(rest)?;
                StateKey::LeaseEntry(g, tp, offset)
            }
            _ => return Err(BadStateKey("unknown key kind")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_round_trips_and_keeps_its_text() {
        let tp = TopicPartition::new("orders.events", 7);
        let cases = [
            (StateKey::Topic("orders.events".into()), "t/orders.events"),
            (StateKey::Group("email".into()), "g/email"),
            (
                StateKey::Commit("email".into(), tp.clone()),
                "c/email/orders.events/7",
            ),
            (
                StateKey::Leases("sms".into(), tp.clone()),
                "q/sms/orders.events/7",
            ),
            (
                StateKey::LeaseEntry("sms".into(), tp, 42),
                "l/sms/orders.events/7/42",
            ),
            (
                StateKey::Idempotency("evt/with/slashes".into()),
                "i/evt/with/slashes",
            ),
        ];
        for (key, text) in cases {
            assert_eq!(key.to_string(), text, "{key:?}");
            assert_eq!(text.parse::<StateKey>(), Ok(key));
        }
    }

    #[test]
    fn malformed_keys_are_refused() {
        for bad in [
            "",
            "t",
            "x/y",
            "c/g/t",
            "c/g/t/notanumber",
            "q/g",
            "l/g/t/1",
            "l/g/t/1/x",
            "l/g/t/x/1",
        ] {
            assert!(bad.parse::<StateKey>().is_err(), "{bad}");
        }
    }
}
