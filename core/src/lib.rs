//! # conveyor-core
//!
//! The types, traits and errors of Conveyor, and the machinery its backends
//! share. A backend implements storage; the rules of the delivery contract
//! (validation, partitioning, group assignment, leases, dead letters, dedup)
//! are written here once.
//!
//! - [`Broker`], [`Producer`], [`Consumer`], [`IdempotencyStore`]: the API,
//!   with conveniences in [`BrokerExt`], [`ProducerExt`], [`ConsumerExt`]
//!   (all in the [`prelude`]).
//! - [`runner`]: the consume-process-settle loop with retries and DLQ.
//! - [`backend`]: for backend authors only: the embedded
//!   [`Engine`](backend::Engine) over a small
//!   [`LogStorage`](backend::LogStorage) trait, validation, assignment.
//!   Applications never need it.
//!
//! Applications use this crate through the `conveyor` facade
//! (`conveyor::open(url)`, `conveyor::prelude::*`), and the examples here
//! use those paths.
//!
//! "Contract §N" in these docs refers to the numbered sections of the
//! semantics page (`docs/semantics.md`, rendered as `conveyor::semantics`):
//! the delivery contract every backend keeps.
#![deny(missing_docs)]

mod assignment;
mod backoff;
pub mod broker;
pub mod config;
pub mod describe;
pub mod dlq;
mod embedded;
mod engine;
pub mod error;
pub mod group_settings;
mod headers;
#[cfg(feature = "json")]
pub mod json;
mod member_partition;
mod merge;
pub mod observe;
pub mod partitioner;
pub mod record;
mod retrying_producer;
pub mod runner;
mod topic_cache;
mod url;
mod validate;
mod waiting;

pub mod backend {
    //! What backend authors need and applications do not: the embedded
    //! [`Engine`] (the whole contract over a [`LogStorage`]), the pure
    //! rule functions server backends reuse ([`assign`], [`validate`]),
    //! and the storage-level record types.
    //!
    //! A new embedded backend implements [`LogStorage`] and wraps it in an
    //! [`Engine`]; a server backend implements [`crate::Broker`] directly and
    //! calls [`validate`], [`assign`] and [`crate::dlq`]'s record builders
    //! inside its own transactions or scripts. Either way it runs the
    //! conformance suite (`conveyor-conformance`).
    pub use crate::assignment::*;
    pub use crate::embedded::{
        blocking, blocking_short, may_block_in_place, spawn_interval_flusher,
    };
    pub use crate::engine::{
        Appended, Engine, LogStorage, PartitionBounds, PartitionMap, ReadRange, StoredMessage,
        StoredRecord,
    };
    pub use crate::headers::{decode_headers, encode_headers};
    pub use crate::member_partition::{MemberPartition, Retry};
    pub use crate::merge::{Merge, MergedCall};
    pub use crate::topic_cache::TopicCache;
    pub use crate::url::{
        parse_bool, parse_durability, redact as redact_url, url_password, BrokerUrl,
        COMMON_OPTIONS as COMMON_URL_OPTIONS,
    };
    pub use crate::waiting::{poll_until, within};

    pub mod validate {
        //! Validation of names, configs and records, written once: every
        //! backend refuses bad input before writing anything (contract §7).
        pub use crate::validate::*;
    }
}

pub mod prelude {
    //! The traits an application calls methods of, in one import:
    //! `use conveyor_core::prelude::*;` (or `conveyor::prelude::*`).
    pub use crate::broker::{
        Broker, BrokerExt, Consumer, ConsumerExt, IdempotencyStore, Producer, ProducerExt,
    };
    pub use crate::config::{GroupConfig, TopicConfig};
    pub use crate::record::{Message, Record};
}

pub use broker::{
    BatchAck, Broker, BrokerExt, Capabilities, Consumer, ConsumerExt, IdempotencyStore,
    NackOptions, NackOutcome, Producer, ProducerExt, TopicPartition, MAX_REDELIVERY_DELAY,
};
pub use config::{
    BrokerOptions, DeliveryMode, DlqPolicy, Durability, GroupConfig, Retention, RetryBackoff,
    SeekTo, StartFrom, TopicConfig,
};
pub use describe::{
    GroupDescription, GroupLag, MemberDescription, PartitionDescription, PartitionLag,
    TopicDescription,
};
pub use error::{Error, ErrorKind, Result};
pub use group_settings::{GroupChanges, JoinSettings};
pub use partitioner::{murmur2, partition_for_key};
pub use record::{DeliveryToken, Header, Message, Receipt, Record};
pub use retrying_producer::{RetryingProducer, SendRetry};

/// The first whole millisecond since the Unix epoch that is at least
/// `delay` from now: rounded up, so that a time kept in milliseconds
/// (a retry's "not before") never comes early (a truncated `now_ms() +
/// delay` could be up to a millisecond early).
///
/// ```
/// use std::time::Duration;
/// let before = std::time::SystemTime::now();
/// let at = conveyor_core::deadline_ms(Duration::from_millis(250));
/// let at = std::time::UNIX_EPOCH + Duration::from_millis(at);
/// assert!(at.duration_since(before).unwrap() >= Duration::from_millis(250));
/// ```
pub fn deadline_ms(delay: std::time::Duration) -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| {
            let nanos = d.saturating_add(delay).as_nanos();
            nanos.div_ceil(1_000_000).min(u64::MAX as u128) as u64
        })
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
