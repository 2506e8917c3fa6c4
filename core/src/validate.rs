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
/// Longest idempotency key, in bytes (a producer's
/// [`Record::with_idempotency_key`] and a consumer's
/// [`IdempotencyStore::first_seen`](crate::IdempotencyStore::first_seen)).
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 1024;
/// Furthest a delivery time may lie ahead of the send: ten years.
///
/// A record's delay ([`Record::with_delay`]) or delivery time
/// ([`Record::with_deliver_at`]) beyond this is refused with
/// `InvalidArgument`, so every backend's clock arithmetic (Lua numbers,
/// PostgreSQL `bigint`) holds.
pub const MAX_DELIVERY_DELAY: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);
/// Longest time-to-live of an idempotency key
/// ([`IdempotencyStore::first_seen`](crate::IdempotencyStore::first_seen)):
/// ten years, like [`MAX_DELIVERY_DELAY`].
pub const MAX_IDEMPOTENCY_TTL: Duration = MAX_DELIVERY_DELAY;

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
        idempotency_key(k)
            .map_err(|e| Error::invalid(format!("topic `{topic}`: {}", e.message())))?;
    }
    if let Some(at) = record.deliver_at {
        delivery_time(topic, at, crate::now_ms())?;
    }
    Ok(())
}

/// A delivery time (ms since the Unix epoch) of a record sent at `now_ms`:
/// at most [`MAX_DELIVERY_DELAY`] ahead. A time in the past means "now".
///
/// # Errors
/// `InvalidArgument` naming the topic and how far ahead the time was.
pub fn delivery_time(topic: &str, deliver_at_ms: u64, now_ms: u64) -> Result<()> {
    let max_ms = u64::try_from(MAX_DELIVERY_DELAY.as_millis()).unwrap_or(u64::MAX);
    let ahead = deliver_at_ms.saturating_sub(now_ms);
    if ahead > max_ms {
        return Err(Error::invalid(format!(
            "topic `{topic}`: delivery time is {} ahead; the most is {} days",
            describe_ms(ahead),
            MAX_DELIVERY_DELAY.as_secs() / 86_400
        )));
    }
    Ok(())
}

fn describe_ms(ms: u64) -> String {
    let days = ms / 86_400_000;
    if days >= 365 * 1000 {
        format!("{} years", days / 365)
    } else {
        format!("{days} days")
    }
}

/// An idempotency key: 1 to [`MAX_IDEMPOTENCY_KEY_BYTES`] bytes, no NUL
/// character (no server stores one in a text column).
///
/// # Errors
/// `InvalidArgument`; the message shows at most the key's first 64
/// characters.
pub fn idempotency_key(key: &str) -> Result<()> {
    if key.is_empty() {
        return Err(Error::invalid("idempotency key must not be empty"));
    }
    if key.len() > MAX_IDEMPOTENCY_KEY_BYTES {
        return Err(Error::invalid(format!(
            "idempotency key `{}` is {} bytes; the most is {MAX_IDEMPOTENCY_KEY_BYTES}",
            preview(key),
            key.len()
        )));
    }
    if key.contains('\0') {
        return Err(Error::invalid(format!(
            "idempotency key `{}` contains a NUL character",
            preview(key)
        )));
    }
    Ok(())
}

/// A consumer-side idempotency record
/// ([`IdempotencyStore::first_seen`](crate::IdempotencyStore::first_seen)):
/// a valid key and a time-to-live above zero and at most
/// [`MAX_IDEMPOTENCY_TTL`]. A zero TTL would remember nothing, so a handler
/// wrapped with it would silently stop deduplicating.
///
/// # Errors
/// `InvalidArgument` naming the key (shortened) and the TTL.
pub fn first_seen(key: &str, ttl: Duration) -> Result<()> {
    idempotency_key(key)?;
    if ttl.is_zero() {
        return Err(Error::invalid(format!(
            "idempotency key `{}`: ttl must be above zero",
            preview(key)
        )));
    }
    if ttl > MAX_IDEMPOTENCY_TTL {
        return Err(Error::invalid(format!(
            "idempotency key `{}`: ttl of {} is longer than the most, {} days",
            preview(key),
            describe_ms(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)),
            MAX_IDEMPOTENCY_TTL.as_secs() / 86_400
        )));
    }
    Ok(())
}

/// The first 64 characters of `s`, escaped, with `...` when cut: what an
/// error shows of user input that may be long.
pub fn preview(s: &str) -> String {
    const SHOWN: usize = 64;
    let mut out: String = s
        .chars()
        .take(SHOWN)
        .collect::<String>()
        .escape_debug()
        .to_string();
    if s.chars().nth(SHOWN).is_some() {
        out.push_str("...");
    }
    out
}

/// A partition number of a topic with `partitions` partitions.
pub fn partition(topic: &str, partition: u32, partitions: u32) -> Result<()> {
    if partition >= partitions {
        return Err(Error::partition_out_of_range(topic, partition, partitions));
    }
    Ok(())
}

/// Stream mode: the offset after `offset` (a message being acked or
/// nacked), which must not pass the partition's log end `log_end`.
///
/// # Errors
/// `InvalidArgument`, naming `what`, when it would.
pub fn next_offset(offset: u64, log_end: u64, what: &str) -> Result<u64> {
    match offset.checked_add(1) {
        Some(next) if next <= log_end => Ok(next),
        _ => Err(Error::invalid(format!(
            "{what}: offset {offset} is at or past the log end ({log_end})"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_offset_stays_within_the_log() {
        assert_eq!(next_offset(4, 5, "ack").expect("below the end"), 5);
        for (offset, end) in [(5, 5), (9, 5), (u64::MAX, u64::MAX)] {
            let e = next_offset(offset, end, "ack").expect_err("at or past the end");
            assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        }
    }

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
    fn idempotency_keys() {
        assert!(idempotency_key("evt-1").is_ok());
        assert!(idempotency_key(&"k".repeat(MAX_IDEMPOTENCY_KEY_BYTES)).is_ok());
        for bad in [
            String::new(),
            "k".repeat(MAX_IDEMPOTENCY_KEY_BYTES + 1),
            "a\0b".to_string(),
        ] {
            let e = idempotency_key(&bad).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidArgument);
            assert!(
                e.to_string().len() < 300,
                "the key is not echoed whole: {e}"
            );
        }
        assert!(first_seen("k", Duration::from_secs(1)).is_ok());
        assert!(first_seen("k", MAX_IDEMPOTENCY_TTL).is_ok());
        for (key, ttl) in [
            ("", Duration::from_secs(1)),
            ("k", Duration::ZERO),
            ("k", Duration::MAX),
        ] {
            let e = first_seen(key, ttl).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{key:?} {ttl:?}");
        }
    }

    #[test]
    fn delivery_times_are_bounded() {
        let now = 1_700_000_000_000;
        let max = u64::try_from(MAX_DELIVERY_DELAY.as_millis()).unwrap();
        assert!(delivery_time("t", 0, now).is_ok(), "the past means now");
        assert!(delivery_time("t", now + max, now).is_ok());
        for bad in [now + max + 1, u64::MAX, i64::MAX as u64] {
            let e = delivery_time("t", bad, now).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidArgument);
            assert!(e.to_string().contains("3650 days"), "{e}");
        }
        let far = Record::new("x").with_delay(Duration::MAX);
        assert_eq!(
            record("t", &far, 1, 100).unwrap_err().kind(),
            ErrorKind::InvalidArgument
        );
        let ok = Record::new("x").with_delay(Duration::from_secs(86_400));
        assert!(record("t", &ok, 1, 100).is_ok());
    }

    #[test]
    fn previews_are_short() {
        assert_eq!(preview("abc"), "abc");
        assert_eq!(preview(&"x".repeat(100)), format!("{}...", "x".repeat(64)));
        assert_eq!(preview("a\nb"), "a\\nb");
    }

    #[test]
    fn partitions() {
        assert!(partition_count("t", 1).is_ok());
        assert!(partition_count("t", 10_000).is_ok());
        assert!(partition_count("t", 0).is_err());
        assert!(partition_count("t", 10_001).is_err());
    }
}
