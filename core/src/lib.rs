//! # conveyor-core
//!
//! The types, traits and errors of Conveyor, and the machinery its backends
//! share. A backend implements storage; the rules of the delivery contract
//! (validation, partitioning, group assignment, leases, dead letters, dedup)
//! are written here once.
//!
//! - [`Broker`], [`Producer`], [`Consumer`], [`IdempotencyStore`]: the API.
//! - [`engine::Engine`]: the whole contract over a small
//!   [`engine::LogStorage`] trait, used by the embedded backends.
//! - [`runner`]: the consume-process-settle loop with retries and DLQ.
#![deny(missing_docs)]

pub mod assignment;
pub mod broker;
pub mod config;
pub mod describe;
pub mod dlq;
pub mod engine;
pub mod error;
pub mod partitioner;
pub mod record;
pub mod runner;
pub mod validate;

pub use broker::{
    Broker, Capabilities, Consumer, IdempotencyStore, NackOutcome, Producer, TopicPartition,
};
pub use config::{
    BrokerOptions, DeliveryMode, DlqPolicy, Durability, GroupConfig, Retention, RetryBackoff,
    SeekTo, StartFrom, TopicConfig,
};
pub use describe::{GroupLag, PartitionDescription, PartitionLag, TopicDescription};
pub use error::{Error, ErrorKind, Result};
pub use partitioner::{murmur2, partition_for_key};
pub use record::{DeliveryToken, Header, Message, Receipt, Record};

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
