//! Validation of names, configs and records, done once before any write.
//!
//! Every backend calls these before touching storage, so bad input is
//! refused with the same `ErrorKind` and message everywhere.

use crate::config::{GroupConfig, TopicConfig};
use crate::error::{Error, ErrorKind, Result};
use crate::record::Record;
use std::time::Duration;

/// Longest topic or group name.
pub const MAX_NAME_LEN: usize = 249;
/// Most partitions a topic may have.
pub const MAX_PARTITIONS: u32 = 10_000;

fn check_name(what: &str, name: &str) -> Result<()> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(Error::invalid(format!(
            "{what} name `{}` must be 1 to {MAX_NAME_LEN} characters (got {})",
            name.escape_debug(),
            name.chars().count()
        )));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(Error::invalid(format!(
            "{what} name `{}` has `{}`: only [A-Za-z0-9._-] are allowed",
            name.escape_debug(),
            bad.escape_debug()
        )));
    }
    if name == "." || name == ".." {
        return Err(Error::invalid(format!("{what} name `{name}` is reserved")));
    }
    Ok(())
}

/// A topic name: 1 to 249 characters of `[A-Za-z0-9._-]`, not `.` or `..`.
pub fn topic_name(name: &str) -> Result<()> {
    check_name("topic", name)
}

/// A group name: the same rules as topics.
pub fn group_name(name: &str) -> Result<()> {
    check_name("group", name)
}

/// A partition count: 1 to 10,000.
pub fn partition_count(topic: &str, partitions: u32) -> Result<()> {
    if partitions == 0 || partitions > MAX_PARTITIONS {
        return Err(Error::invalid(format!(
            "topic `{topic}`: partitions must be 1 to {MAX_PARTITIONS} (got {partitions})"
        )));
    }
    Ok(())
}

/// A topic config.
pub fn topic_config(topic: &str, config: &TopicConfig) -> Result<()> {
    partition_count(topic, config.partitions)?;
    if config.max_message_bytes == 0 {
        return Err(Error::invalid(format!(
            "topic `{topic}`: max_message_bytes must be at least 1"
        )));
    }
    if config.retention.max_bytes == Some(0) {
        return Err(Error::invalid(format!(
            "topic `{topic}`: retention max_bytes must be at least 1"
        )));
    }
    if config.retention.max_age == Some(Duration::ZERO) {
        return Err(Error::invalid(format!(
            "topic `{topic}`: retention max_age must be above zero"
        )));
    }
    Ok(())
}

/// A group config.
pub fn group_config(group: &str, config: &GroupConfig) -> Result<()> {
    if config.dlq.max_deliveries == 0 {
        return Err(Error::invalid(format!(
            "group `{group}`: dlq max_deliveries must be at least 1"
        )));
    }
    if config.visibility_timeout.is_zero() {
        return Err(Error::invalid(format!(
            "group `{group}`: visibility_timeout must be above zero"
        )));
    }
    if config.session_timeout.is_zero() {
        return Err(Error::invalid(format!(
            "group `{group}`: session_timeout must be above zero"
        )));
    }
    if let Some(dlq) = &config.dlq.topic {
        topic_name(dlq)?;
    }
    Ok(())
}

/// Joining `group` for `topics` with `config`: a valid group name and
/// config, and at least one topic (each topic's existence is the
/// backend's to check).
pub fn join(group: &str, topics: &[&str], config: &GroupConfig) -> Result<()> {
    group_name(group)?;
    group_config(group, config)?;
    if topics.is_empty() {
        return Err(Error::invalid(format!(
            "group `{group}`: a consumer needs at least one topic"
        )));
    }
    Ok(())
}

/// A record bound for `topic` with `partitions` partitions and this size
/// limit: explicit partition in range, size within `max_message_bytes`,
/// idempotency key non-empty. The headers redrive adds
/// ([`crate::dlq::is_redrive_header`]) are not counted: a record that fit
/// when it was first sent can always be redriven (contract §1, §5).
pub fn record(
    topic: &str,
    record: &Record,
    partitions: u32,
    max_message_bytes: usize,
) -> Result<()> {
    if let Some(p) = record.partition {
        if p >= partitions {
            return Err(Error::partition_out_of_range(topic, p, partitions));
        }
    }
    let audit: usize = record
        .headers
        .iter()
        .filter(|h| crate::dlq::is_redrive_header(&h.name))
        .map(|h| h.name.len() + h.value.len())
        .sum();
    let size = record.size() - audit;
    if size > max_message_bytes {
        return Err(Error::new(
            ErrorKind::MessageTooLarge,
            format!(
                "topic `{topic}`: record of {size} bytes exceeds max_message_bytes ({max_message_bytes})"
            ),
        ));
    }
    if let Some(k) = &record.idempotency_key {
        if k.is_empty() {
            return Err(Error::invalid(format!(
                "topic `{topic}`: idempotency key must not be empty"
            )));
        }
    }
    Ok(())
}

/// A partition number of a topic with `partitions` partitions.
pub fn partition(topic: &str, partition: u32, partitions: u32) -> Result<()> {
    if partition >= partitions {
        return Err(Error::partition_out_of_range(topic, partition, partitions));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(topic_name("orders.events-v1_2").is_ok());
        assert!(topic_name(&"a".repeat(249)).is_ok());
        for bad in ["", "a b", "ü", "a/b", ".", "..", &"a".repeat(250)] {
            let err = topic_name(bad).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{bad}");
        }
    }

    #[test]
    fn partitions() {
        assert!(partition_count("t", 1).is_ok());
        assert!(partition_count("t", 10_000).is_ok());
        assert!(partition_count("t", 0).is_err());
        assert!(partition_count("t", 10_001).is_err());
    }
}
