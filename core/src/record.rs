//! What producers send ([`Record`]) and consumers receive ([`Message`]).
//!
//! This module owns the payload types and their size accounting; it knows
//! nothing of storage or delivery rules.

use crate::config::DeliveryMode;
use crate::engine::StoredMessage;
use crate::error::{Error, Result};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A header: a `String` name and a bytes value. Names may repeat; order is kept.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Header {
    /// The header name.
    pub name: String,
    /// The header value, byte for byte.
    pub value: Bytes,
}

impl Header {
    /// A header from a name and a value.
    pub fn new(name: impl Into<String>, value: impl Into<Bytes>) -> Self {
        Header {
            name: name.into(),
            value: value.into(),
        }
    }
}

/// What a producer sends: optional key, value, headers, optional explicit
/// partition and optional idempotency key.
///
/// ```
/// use conveyor::Record;
/// let record = Record::new("order 42 placed")
///     .with_key("order-42")
///     .with_header("content-type", "text/plain")
///     .with_idempotency_key("evt-7f3a");
/// assert_eq!(record.key.as_deref(), Some(&b"order-42"[..]));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Record {
    /// Partitioning key; records with the same key go to the same partition.
    pub key: Option<Bytes>,
    /// The payload; may be empty.
    pub value: Bytes,
    /// Ordered headers; duplicates allowed.
    pub headers: Vec<Header>,
    /// An explicit partition, overriding the key.
    pub partition: Option<u32>,
    /// Deduplicates sends to its partition within the topic's dedup
    /// window; without a key or partition, it also picks the partition
    /// (murmur2 of the idempotency key), so a retry lands where the first
    /// try did.
    pub idempotency_key: Option<String>,
    /// Delayed delivery (contract §3): no queue-mode group is offered the
    /// record before this time (ms since the Unix epoch). Stream-mode groups read it in
    /// offset order without waiting.
    pub deliver_at: Option<u64>,
}

impl Record {
    /// A record with this value and nothing else.
    pub fn new(value: impl Into<Bytes>) -> Self {
        Record {
            value: value.into(),
            ..Record::default()
        }
    }

    /// Set the partitioning key.
    pub fn with_key(mut self, key: impl Into<Bytes>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Append a header (names may repeat).
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<Bytes>) -> Self {
        self.headers.push(Header::new(name, value));
        self
    }

    /// Send to this partition, whatever the key.
    pub fn with_partition(mut self, partition: u32) -> Self {
        self.partition = Some(partition);
        self
    }

    /// Deduplicate on this key within the topic's dedup window.
    pub fn with_idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }

    /// Deliver to queue-mode groups no earlier than `delay` from when it is
    /// sent (contract §3; SQS message timers, Pulsar delayed delivery). The record is
    /// stored at once and gets its offset; stream-mode groups read it in
    /// offset order without waiting.
    pub fn with_delay(mut self, delay: Duration) -> Self {
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.deliver_at = Some(crate::now_ms().saturating_add(ms));
        self
    }

    /// Deliver to queue-mode groups no earlier than `at` (see
    /// [`Record::with_delay`]). A time in the past means "now".
    pub fn with_deliver_at(mut self, at: SystemTime) -> Self {
        let ms = at
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        self.deliver_at = Some(ms);
        self
    }

    /// Size counted against `max_message_bytes`: key + value + headers
    /// (names and values).
    pub fn size(&self) -> usize {
        payload_size(self.key.as_ref(), &self.value, &self.headers)
    }
}

/// Size of key + value + headers, as the contract counts it.
pub fn payload_size(key: Option<&Bytes>, value: &Bytes, headers: &[Header]) -> usize {
    key.map_or(0, |k| k.len())
        + value.len()
        + headers
            .iter()
            .map(|h| h.name.len() + h.value.len())
            .sum::<usize>()
}

/// Where and when a record was stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Receipt {
    /// The partition the record went to.
    pub partition: u32,
    /// Its offset in that partition.
    pub offset: u64,
    /// Append time, milliseconds since the Unix epoch.
    pub timestamp: u64,
}

/// How a message was handed out: the group and mode that received it, the
/// generation (stream mode), and what the backend needs to settle it.
///
/// Opaque to users: they pass messages back unchanged. Backends build one
/// per delivery ([`DeliveryToken::stream`], [`DeliveryToken::queue`]) and
/// read it back in `ack`/`nack`/`extend` through [`Message::delivery`],
/// which also refuses a message of another group, a message that was
/// fetched without a group, and a message whose topic, partition, offset or
/// attempt was changed after delivery.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct DeliveryToken {
    group: Option<Arc<str>>,
    mode: Option<DeliveryMode>,
    generation: u64,
    data: Bytes,
    /// A digest of topic, partition, offset and attempt as delivered.
    origin: u64,
}

impl DeliveryToken {
    /// A stream-mode delivery to `group`, made while this member owned the
    /// partition in `generation`.
    pub fn stream(group: impl Into<Arc<str>>, generation: u64) -> Self {
        DeliveryToken {
            group: Some(group.into()),
            mode: Some(DeliveryMode::Stream),
            generation,
            ..DeliveryToken::default()
        }
    }

    /// A queue-mode delivery to `group` under a lease the backend
    /// identifies by `lease` (any bytes: a number, a stream entry id, a
    /// row id).
    pub fn queue(group: impl Into<Arc<str>>, lease: impl Into<Bytes>) -> Self {
        DeliveryToken {
            group: Some(group.into()),
            mode: Some(DeliveryMode::Queue),
            data: lease.into(),
            ..DeliveryToken::default()
        }
    }

    /// The group that received the message (`None` for `fetch`).
    pub fn group(&self) -> Option<&str> {
        self.group.as_deref()
    }

    /// The mode of the group that received the message.
    pub fn mode(&self) -> Option<DeliveryMode> {
        self.mode
    }

    /// Stream mode: the generation in which the partition was assigned to
    /// the member that received the message (0 in queue mode).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Queue mode: the backend's lease identifier, as given to
    /// [`DeliveryToken::queue`].
    pub fn lease(&self) -> &Bytes {
        &self.data
    }
}

/// A digest of a delivery's position: FNV-1a-style mixing of the topic, 8
/// bytes at a time, then the numbers. Cheap, since every delivered message
/// gets one; it guards against a changed message, not against forgery.
fn origin(topic: &str, partition: u32, offset: u64, attempt: u32) -> u64 {
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mix = |h: u64, n: u64| (h ^ n).wrapping_mul(PRIME).rotate_left(29);
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ topic.len() as u64;
    let mut chunks = topic.as_bytes().chunks_exact(8);
    for c in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(c);
        h = mix(h, u64::from_le_bytes(word));
    }
    let mut tail = [0u8; 8];
    let rest = chunks.remainder();
    tail[..rest.len()].copy_from_slice(rest);
    h = mix(h, u64::from_le_bytes(tail));
    h = mix(h, u64::from(partition) | (u64::from(attempt) << 32));
    mix(h, offset)
}

/// What a consumer receives.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Message {
    /// The topic it was read from.
    pub topic: String,
    /// The partition it was read from.
    pub partition: u32,
    /// Its offset in that partition.
    pub offset: u64,
    /// The key, byte for byte as sent.
    pub key: Option<Bytes>,
    /// The value, byte for byte as sent.
    pub value: Bytes,
    /// The headers, in the order sent.
    pub headers: Vec<Header>,
    /// Append time, milliseconds since the Unix epoch, set by the broker.
    pub timestamp: u64,
    /// Delivery attempt: 1 on first delivery.
    pub attempt: u32,
    /// The producer's idempotency key, if it set one: the natural event id
    /// for [`crate::runner::Idempotent`]. Kept through dead-lettering and
    /// redrive.
    pub idempotency_key: Option<String>,
    /// When the producer asked for it to be delivered (delayed delivery),
    /// ms since the epoch.
    pub deliver_at: Option<u64>,
    token: DeliveryToken,
}

impl Message {
    /// A message as a backend delivers it: `stored`, read from
    /// `topic`/`partition`, on delivery `attempt`, settled with `token`
    /// ([`DeliveryToken::default`] for reads without a group).
    pub fn from_stored(
        topic: impl Into<String>,
        partition: u32,
        stored: StoredMessage,
        attempt: u32,
        mut token: DeliveryToken,
    ) -> Self {
        let topic = topic.into();
        if token.group.is_some() {
            token.origin = origin(&topic, partition, stored.offset, attempt);
        }
        // Dead-lettered and redriven records carry the original's key in a
        // header (they must not be deduplicated against it).
        let idempotency_key = stored
            .idempotency_key
            .or_else(|| crate::dlq::carried_idempotency_key(&stored.headers).map(str::to_string));
        Message {
            topic,
            partition,
            offset: stored.offset,
            key: stored.key,
            value: stored.value,
            headers: stored.headers,
            timestamp: stored.timestamp,
            attempt,
            idempotency_key,
            deliver_at: stored.deliver_at,
            token,
        }
    }

    /// How it was delivered (for backends).
    pub fn token(&self) -> &DeliveryToken {
        &self.token
    }

    /// The delivery token, if this message was delivered to `group` and
    /// still names the topic, partition and offset it was delivered with.
    /// Backends call this first in every settling call (contract §4, §7).
    ///
    /// # Errors
    /// [`crate::ErrorKind::InvalidArgument`] naming the group that received it (or
    /// saying it was fetched without a group), or saying that its position
    /// was changed after delivery.
    pub fn delivery(&self, group: &str) -> Result<&DeliveryToken> {
        match self.token.group() {
            None => Err(Error::invalid(format!(
                "group `{group}`: {} was read without a group (fetch); only messages a \
                 group's consumer received can be settled",
                self.position()
            ))),
            Some(g) if g != group => Err(Error::invalid(format!(
                "group `{group}`: {} was delivered to group `{g}`, not to this group",
                self.position()
            ))),
            Some(_)
                if self.token.origin
                    != origin(&self.topic, self.partition, self.offset, self.attempt) =>
            {
                Err(Error::invalid(format!(
                    "group `{group}`: {} is not the position this message was delivered \
                     with (its topic, partition, offset or attempt was changed)",
                    self.position()
                )))
            }
            Some(_) => Ok(&self.token),
        }
    }

    /// The first header with this name.
    pub fn header(&self, name: &str) -> Option<&Bytes> {
        self.headers
            .iter()
            .find(|h| h.name == name)
            .map(|h| &h.value)
    }

    /// The first header with this name, as UTF-8 text.
    pub fn header_str(&self, name: &str) -> Option<&str> {
        self.header(name).and_then(|v| std::str::from_utf8(v).ok())
    }

    /// `topic/partition@offset`, for messages and logs.
    pub fn position(&self) -> String {
        format!("{}/{}@{}", self.topic, self.partition, self.offset)
    }
}
