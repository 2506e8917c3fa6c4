//! What producers send ([`Record`]) and consumers receive ([`Message`]).
//!
//! This module owns the payload types and their size accounting; it knows
//! nothing of storage or delivery rules.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

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
/// use conveyor_core::Record;
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
    /// Deduplicates sends within the topic's dedup window.
    pub idempotency_key: Option<String>,
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

/// How a message was handed out; used by `ack`, `nack`, `extend` and
/// `commit` to check that the caller still holds it. Backends fill it in;
/// users pass messages back unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct DeliveryToken {
    /// Stream mode: the generation in which the partition was assigned to
    /// the member that received the message.
    pub generation: u64,
    /// Queue mode: the lease this delivery holds (unique per delivery).
    pub lease: u64,
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
    /// How it was delivered (for `ack`/`nack`/`commit`).
    pub token: DeliveryToken,
}

impl Message {
    /// Build a message (for backends and tests).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        topic: impl Into<String>,
        partition: u32,
        offset: u64,
        key: Option<Bytes>,
        value: Bytes,
        headers: Vec<Header>,
        timestamp: u64,
        attempt: u32,
        token: DeliveryToken,
    ) -> Self {
        Message {
            topic: topic.into(),
            partition,
            offset,
            key,
            value,
            headers,
            timestamp,
            attempt,
            token,
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
