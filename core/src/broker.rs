//! The four traits every backend implements: [`Broker`], [`Producer`],
//! [`Consumer`] and [`IdempotencyStore`].
//!
//! They are dyn-compatible (`Arc<dyn Broker>`) and keep the required
//! methods few. Conveniences (`send`, `commit_message`, `stream`,
//! `redrive`) live in blanket extension traits ([`ProducerExt`],
//! [`ConsumerExt`], [`BrokerExt`]), as object_store's `ObjectStoreExt`
//! does, so no backend can implement them differently. Bring them into
//! scope with `use conveyor::prelude::*`.
//!
//! Each method's `# Errors` section lists the [`crate::ErrorKind`]s the
//! contract gives it, and its `# Cancel safety` section what a dropped
//! future leaves behind.

use crate::config::{GroupConfig, SeekTo, TopicConfig};
use crate::describe::{GroupDescription, GroupLag, TopicDescription};
use crate::error::{Error, ErrorKind, Result};
use crate::record::{Message, Receipt, Record};
use async_trait::async_trait;
use futures::stream::BoxStream;
use std::sync::Arc;
use std::time::Duration;

/// What a backend may lack, as the contract allows (nothing else).
///
/// ```
/// use conveyor::Capabilities;
/// assert!(Capabilities::EMBEDDED.persistent && Capabilities::EMBEDDED.embedded);
/// assert!(!Capabilities::IN_MEMORY.persistent);
/// assert!(Capabilities::SERVER.persistent && !Capabilities::SERVER.embedded);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Capabilities {
    /// Closing and reopening keeps everything acknowledged.
    pub persistent: bool,
    /// A local store owned by one process (torn-tail recovery, `Locked`).
    pub embedded: bool,
}

impl Capabilities {
    /// A local store on disk, owned by one process (mmap, RocksDB).
    pub const EMBEDDED: Capabilities = Capabilities {
        persistent: true,
        embedded: true,
    };
    /// Gone with the process (the memory backend).
    pub const IN_MEMORY: Capabilities = Capabilities {
        persistent: false,
        embedded: false,
    };
    /// A server shared by many processes (Redis, PostgreSQL).
    pub const SERVER: Capabilities = Capabilities {
        persistent: true,
        embedded: false,
    };
}

/// How to fail a message in [`Consumer::nack`] (contract §4a, §4b).
///
/// ```
/// use conveyor::NackOptions;
/// use std::time::Duration;
/// let options = NackOptions::new()
///     .with_delay(Duration::from_secs(30))
///     .with_reason("smtp 451: try again later");
/// assert_eq!(options.reason.as_deref(), Some("smtp 451: try again later"));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct NackOptions {
    /// Redeliver after this delay; `None` uses the group's retry backoff.
    /// Capped at [`MAX_REDELIVERY_DELAY`] (12 hours), so a message is never
    /// parked forever.
    pub delay: Option<Duration>,
    /// Why it failed; goes to the DLQ header `conveyor.dlq.error` if this
    /// was the last allowed attempt.
    pub reason: Option<String>,
}

impl NackOptions {
    /// The group's retry backoff, no reason.
    pub fn new() -> Self {
        NackOptions::default()
    }

    /// Redeliver after `delay` (capped at [`MAX_REDELIVERY_DELAY`]).
    pub fn with_delay(mut self, delay: Duration) -> Self {
        self.delay = Some(delay);
        self
    }

    /// Say why it failed (the DLQ's `conveyor.dlq.error` header).
    pub fn with_reason(mut self, reason: impl Into<String>) -> Self {
        self.reason = Some(reason.into());
        self
    }

    /// The delay to apply: the given one or `backoff`, capped at
    /// [`MAX_REDELIVERY_DELAY`].
    pub fn delay_or(&self, backoff: Duration) -> Duration {
        self.delay.unwrap_or(backoff).min(MAX_REDELIVERY_DELAY)
    }
}

/// The longest a `nack` delay or an `extend` may be: 12 hours (SQS's
/// maximum visibility timeout; contract §4a, §4b). Longer values are capped, so no message is
/// parked forever.
pub const MAX_REDELIVERY_DELAY: Duration = Duration::from_secs(12 * 60 * 60);

/// What [`Consumer::ack_batch`] did with a batch: how many messages it
/// settled, and which it did not and why.
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct BatchAck {
    /// Messages settled by this call.
    pub acked: usize,
    /// The messages not settled: their index in the batch and the error
    /// `ack` would have returned for them, in batch order.
    pub failed: Vec<(usize, Error)>,
}

impl BatchAck {
    /// Whether every message of the batch was settled.
    pub fn is_complete(&self) -> bool {
        self.failed.is_empty()
    }

    /// `Ok(acked)` if every message was settled, else the first failure.
    ///
    /// # Errors
    /// The error of the first message not settled.
    pub fn into_result(self) -> Result<usize> {
        match self.failed.into_iter().next() {
            None => Ok(self.acked),
            Some((_, e)) => Err(e),
        }
    }
}

/// What a [`Consumer::nack`] did with the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NackOutcome {
    /// It will be delivered again (after the delay), attempt number raised.
    Redeliver,
    /// It had used its last allowed attempt: it was appended to the DLQ
    /// topic and settled for the group.
    DeadLettered,
}

/// A topic and partition.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicPartition {
    /// Topic name.
    pub topic: String,
    /// Partition number.
    pub partition: u32,
}

impl TopicPartition {
    /// A topic and partition.
    pub fn new(topic: impl Into<String>, partition: u32) -> Self {
        TopicPartition {
            topic: topic.into(),
            partition,
        }
    }
}

impl std::fmt::Display for TopicPartition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.topic, self.partition)
    }
}

/// A storage engine holding topics and consumer groups.
///
/// The required methods are storage; conveniences built on them live in
/// [`BrokerExt`] (blanket-implemented, so every backend behaves the same).
///
/// Every method may also fail with [`ErrorKind::Closed`] after
/// [`close`](Broker::close), [`ErrorKind::Unavailable`] when a server
/// backend cannot reach its server (retriable), and [`ErrorKind::Io`] or
/// [`ErrorKind::Corrupt`] when storage fails; the `# Errors` sections list
/// what each call adds to those.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> conveyor::Result<()> {
/// use conveyor::prelude::*;
/// use std::time::Duration;
///
/// let broker = conveyor::open("memory://").await?;
/// broker.create_topic("orders", TopicConfig::new(3)).await?;
///
/// let producer = broker.producer().await?;
/// let receipt = producer.send("orders", Record::new("placed").with_key("order-1")).await?;
///
/// let consumer = broker.consumer("email", &["orders"], GroupConfig::queue()).await?;
/// let messages = consumer.poll(10, Duration::from_secs(1)).await?;
/// assert_eq!(messages[0].offset, receipt.offset);
/// consumer.ack(&messages[0]).await?;
/// # Ok(())
/// # }
/// ```
///
/// [`ErrorKind::Closed`]: crate::ErrorKind::Closed
/// [`ErrorKind::Unavailable`]: crate::ErrorKind::Unavailable
/// [`ErrorKind::Io`]: crate::ErrorKind::Io
/// [`ErrorKind::Corrupt`]: crate::ErrorKind::Corrupt
#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// What this backend may lack.
    fn capabilities(&self) -> Capabilities;

    /// Create a topic. Same config again: no-op.
    ///
    /// # Errors
    /// `TopicExists` if it exists with another config; `InvalidArgument`
    /// for a bad name or config (zero or more than 10,000 partitions, zero
    /// `max_message_bytes`, ...).
    ///
    /// # Cancel safety
    /// Not cancel safe: dropped mid-call, the topic may or may not exist;
    /// calling again with the same config settles it.
    async fn create_topic(&self, name: &str, config: TopicConfig) -> Result<()>;

    /// Delete a topic and its records, and forget every group's state for
    /// it.
    ///
    /// # Errors
    /// `TopicNotFound`; `InvalidArgument` for a bad name.
    ///
    /// # Cancel safety
    /// Not cancel safe: dropped mid-call, the topic may be half removed;
    /// call again.
    async fn delete_topic(&self, name: &str) -> Result<()>;

    /// Names of all topics, sorted.
    ///
    /// # Errors
    /// Only the common ones (see the trait docs).
    ///
    /// # Cancel safety
    /// Cancel safe: it changes nothing.
    async fn list_topics(&self) -> Result<Vec<String>>;

    /// Config and per partition log start, log end and bytes.
    ///
    /// # Errors
    /// `TopicNotFound`; `InvalidArgument` for a bad name.
    ///
    /// # Cancel safety
    /// Cancel safe: it changes nothing a caller can observe.
    async fn describe_topic(&self, name: &str) -> Result<TopicDescription>;

    /// Grow a topic to `partitions` partitions (never shrink; the same
    /// count is a no-op).
    ///
    /// # Errors
    /// `TopicNotFound`; `InvalidArgument` for fewer partitions than now or
    /// more than 10,000.
    ///
    /// # Cancel safety
    /// Not cancel safe: dropped mid-call, the topic may or may not have
    /// grown; call again.
    async fn add_partitions(&self, name: &str, partitions: u32) -> Result<()>;

    /// A producer (cheap; share it).
    ///
    /// # Errors
    /// Only the common ones (see the trait docs).
    ///
    /// # Cancel safety
    /// Cancel safe.
    async fn producer(&self) -> Result<Arc<dyn Producer>>;

    /// Join `group` for `topics` as a new member. Creates the group on first
    /// use with `config`. A group's settings belong to the group: a later
    /// member never changes them. It must give the same settings (compared
    /// by [`crate::group_settings::differences`]) or join with
    /// [`JoinSettings::UseExisting`](crate::JoinSettings::UseExisting);
    /// only [`alter_group`](Broker::alter_group) changes them.
    ///
    /// # Errors
    /// `GroupModeMismatch` if the group exists in the other mode;
    /// `InvalidArgument` if it exists with other settings (the message
    /// names each field, stored and given) and `config.join` is
    /// `MustMatch`; `TopicNotFound` (unless auto-create is on);
    /// `InvalidArgument` for a bad group name or config, or no topics.
    ///
    /// # Cancel safety
    /// Not cancel safe: dropped mid-call, a member may have joined and will
    /// be removed after the session timeout.
    async fn consumer(
        &self,
        group: &str,
        topics: &[&str],
        config: GroupConfig,
    ) -> Result<Arc<dyn Consumer>>;

    /// Change a group's settings explicitly (contract §4): the fields
    /// `changes` names, nothing else. Running members follow: leases taken
    /// from now on use the new visibility timeout, the next failure the
    /// new `max_deliveries` and backoff, the next heartbeat the new session
    /// timeout. Returns the settings now stored.
    ///
    /// The default implementation answers `Unsupported`; every backend of
    /// this workspace implements it.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> conveyor::Result<()> {
    /// use conveyor::prelude::*;
    /// use conveyor::GroupChanges;
    /// use std::time::Duration;
    ///
    /// let broker = conveyor::open("memory://").await?;
    /// broker.create_topic("orders", TopicConfig::new(1)).await?;
    /// let _fleet = broker.consumer("billing", &["orders"], GroupConfig::queue()).await?;
    /// let now = broker
    ///     .alter_group("billing", GroupChanges::new().with_visibility_timeout(Duration::from_secs(10)))
    ///     .await?;
    /// assert_eq!(now.visibility_timeout, Duration::from_secs(10));
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// `GroupNotFound`; `InvalidArgument` for a bad group name, no change,
    /// or settings that are not valid (zero timeouts or `max_deliveries`);
    /// `ReadOnly` on a read-only broker.
    ///
    /// # Cancel safety
    /// Not cancel safe: dropped mid-call, the change may or may not be
    /// stored; altering again with the same changes is safe.
    async fn alter_group(&self, group: &str, changes: crate::GroupChanges) -> Result<GroupConfig> {
        let _ = changes;
        Err(Error::new(
            ErrorKind::Unsupported,
            format!("group `{group}`: this backend cannot alter a group's settings"),
        ))
    }

    /// Names of all groups, sorted.
    ///
    /// # Errors
    /// Only the common ones (see the trait docs).
    ///
    /// # Cancel safety
    /// Cancel safe: it changes nothing.
    async fn list_groups(&self) -> Result<Vec<String>>;

    /// Per partition committed offset, log end and lag (plus in-flight and
    /// available counts in queue mode).
    ///
    /// # Errors
    /// `GroupNotFound`; `InvalidArgument` for a bad name.
    ///
    /// # Cancel safety
    /// Cancel safe: it changes nothing a caller can observe.
    async fn group_lag(&self, group: &str) -> Result<GroupLag>;

    /// A group's settings, members (what each owns or holds leased) and
    /// lag: what `conveyor group describe` prints.
    ///
    /// The default implementation reports the lag only (no config, no
    /// members, `members_visible: false`); the embedded engine reports
    /// everything.
    ///
    /// # Errors
    /// `GroupNotFound`; `InvalidArgument` for an invalid group name.
    ///
    /// # Cancel safety
    /// Cancel safe: it only reads.
    async fn describe_group(&self, group: &str) -> Result<GroupDescription> {
        let lag = self.group_lag(group).await?;
        Ok(GroupDescription {
            group: lag.group.clone(),
            config: None,
            generation: 0,
            members: Vec::new(),
            members_visible: false,
            lag,
        })
    }

    /// Read up to `max` records of a partition from `offset` without a
    /// group (offsets below the log start read from the log start).
    /// Messages have attempt 1 and cannot be acked.
    ///
    /// # Errors
    /// `TopicNotFound`, `PartitionOutOfRange`.
    ///
    /// # Cancel safety
    /// Cancel safe: it changes nothing.
    async fn fetch(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
        max: usize,
    ) -> Result<Vec<Message>>;

    /// The offset of the first record with timestamp >= `timestamp` (the
    /// log end if none).
    ///
    /// # Errors
    /// `TopicNotFound`, `PartitionOutOfRange`.
    ///
    /// # Cancel safety
    /// Cancel safe: it changes nothing.
    async fn offset_for_timestamp(
        &self,
        topic: &str,
        partition: u32,
        timestamp: u64,
    ) -> Result<u64>;

    /// The backend's idempotency store for consumers.
    fn idempotency_store(&self) -> Arc<dyn IdempotencyStore>;

    /// Flush and release resources. Later calls fail with `Closed`;
    /// closing twice is a no-op.
    ///
    /// # Errors
    /// `Io` if the final flush fails.
    ///
    /// # Cancel safety
    /// Not cancel safe: dropped mid-call, the broker is closed but may not
    /// have flushed (what `Durability` promised still holds).
    async fn close(&self) -> Result<()>;

    /// Delete a consumer group: its committed offsets, queue-mode cursors
    /// and leases (attempt counts included), and its membership, on every
    /// topic (contract §4). Afterwards [`list_groups`](Broker::list_groups)
    /// no longer shows it and [`group_lag`](Broker::group_lag) is
    /// `GroupNotFound`; a group of the same name joined later starts
    /// afresh (from its `StartFrom`, attempts at 1). The records are not
    /// touched.
    ///
    /// A group with live members is refused, as Kafka refuses deleting a
    /// non-empty group: close them, or wait for their session timeout,
    /// and call again. A handle of a member that was already gone (silent
    /// past its session timeout) is not brought back by deleting: its
    /// later calls fail; join again with [`consumer`](Broker::consumer).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> conveyor::Result<()> {
    /// use conveyor::prelude::*;
    /// use conveyor::ErrorKind;
    ///
    /// let broker = conveyor::open("memory://").await?;
    /// broker.create_topic("orders", TopicConfig::new(1)).await?;
    /// let typo = broker.consumer("emial", &["orders"], GroupConfig::stream()).await?;
    /// let refused = broker.delete_group("emial").await.unwrap_err();
    /// assert_eq!(refused.kind(), ErrorKind::GroupNotEmpty);
    /// typo.close().await?;
    /// broker.delete_group("emial").await?;
    /// assert!(broker.list_groups().await?.is_empty());
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// `GroupNotFound`; `GroupNotEmpty` while the group has live members
    /// (the message names them); `InvalidArgument` for a bad group name;
    /// `ReadOnly` on a read-only broker.
    ///
    /// # Cancel safety
    /// Not cancel safe: dropped mid-call, the group may be deleted, or on
    /// a server backend partly deleted (still listed); call again.
    async fn delete_group(&self, group: &str) -> Result<()>;

    /// A cheap round trip to the store, for a readiness probe: a server
    /// backend asks its server (PostgreSQL `SELECT 1` on a pooled
    /// connection; Redis `PING`, on Cluster to every master); an embedded
    /// backend answers at once.
    ///
    /// # Errors
    /// `Closed` after [`close`](Broker::close); `Unavailable` when the
    /// server cannot be reached in the broker's timeout (retry later);
    /// `Unauthenticated`, `PermissionDenied` as the backend maps them.
    ///
    /// # Cancel safety
    /// Cancel safe: it changes nothing.
    async fn ping(&self) -> Result<()>;
}

/// Conveniences over [`Broker`], implemented once for every backend.
#[async_trait]
pub trait BrokerExt: Broker {
    /// Move up to `max` messages (all if `None`) of a DLQ topic back to the
    /// group that dead-lettered them (and to no other group); returns how
    /// many were moved (contract §5). See [`crate::dlq::redrive`].
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> conveyor::Result<()> {
    /// use conveyor::prelude::*;
    /// use conveyor::{DlqPolicy, NackOptions, NackOutcome};
    /// use std::time::Duration;
    ///
    /// let broker = conveyor::open("memory://").await?;
    /// broker.create_topic("mail", TopicConfig::new(1)).await?;
    /// broker.producer().await?.send("mail", Record::new("to: a@example.com")).await?;
    /// let sender = broker
    ///     .consumer("sender", &["mail"], GroupConfig::queue().with_dlq(DlqPolicy::new(1)))
    ///     .await?;
    /// let m = sender.poll(1, Duration::from_secs(1)).await?.remove(0);
    /// let outcome = sender.nack(&m, NackOptions::new().with_reason("smtp down")).await?;
    /// assert_eq!(outcome, NackOutcome::DeadLettered); // to `mail.sender.dlq`
    ///
    /// // The SMTP server is back: send the dead letters to `sender` again.
    /// assert_eq!(broker.redrive("mail.sender.dlq", None).await?, 1);
    /// let again = sender.poll(1, Duration::from_secs(1)).await?;
    /// assert_eq!(&again[0].value[..], b"to: a@example.com");
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// `TopicNotFound` for the DLQ topic; `InvalidArgument` for a topic
    /// that is not a DLQ (refused before any group is joined on it) and
    /// for a message without its origin headers (it stays in the DLQ); the
    /// errors of `send` for the origin topic (the message stays in the
    /// DLQ).
    ///
    /// # Cancel safety
    /// Not cancel safe: dropped mid-call, a message may have been appended
    /// to its origin and not yet settled in the DLQ; it is redriven again
    /// (a duplicate, never a loss).
    async fn redrive(&self, dlq_topic: &str, max: Option<usize>) -> Result<usize> {
        crate::dlq::redrive(self, dlq_topic, max).await
    }

    /// Discard every dead letter of a DLQ topic still waiting for redrive
    /// (contract §5); returns how many. See [`crate::dlq::purge`].
    ///
    /// # Errors
    /// `TopicNotFound`; `InvalidArgument` if the topic is not a DLQ.
    ///
    /// # Cancel safety
    /// Not cancel safe: dropped mid-call, some dead letters may be
    /// discarded and the rest still waiting; call again.
    async fn purge_dlq(&self, dlq_topic: &str) -> Result<usize> {
        crate::dlq::purge(self, dlq_topic).await
    }

    /// Discard one dead letter of a DLQ topic, by partition and offset, so
    /// no redrive moves it (contract §5). See [`crate::dlq::discard`].
    ///
    /// # Errors
    /// `TopicNotFound`, `PartitionOutOfRange`; `InvalidArgument` if the
    /// record is not a waiting dead letter.
    ///
    /// # Cancel safety
    /// Not cancel safe: dropped mid-call, the dead letter may or may not
    /// be discarded; call again (`InvalidArgument` once it was).
    async fn discard_dead_letter(
        &self,
        dlq_topic: &str,
        partition: u32,
        offset: u64,
    ) -> Result<()> {
        crate::dlq::discard(self, dlq_topic, partition, offset).await
    }
}

impl<B: Broker + ?Sized> BrokerExt for B {}

/// Appends records to topics.
///
/// The one required method is [`send_batch`](Producer::send_batch);
/// [`ProducerExt::send`] is built on it.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> conveyor::Result<()> {
/// use conveyor::prelude::*;
///
/// let broker = conveyor::open("memory://").await?;
/// broker.create_topic("orders", TopicConfig::new(4)).await?;
/// let producer = broker.producer().await?; // cheap: share it
///
/// // One record: same key, same partition, in order.
/// let receipt = producer
///     .send("orders", Record::new("placed").with_key("order-42").with_idempotency_key("evt-1"))
///     .await?;
/// // A retry with the same idempotency key is stored once: same receipt.
/// let again = producer
///     .send("orders", Record::new("placed").with_key("order-42").with_idempotency_key("evt-1"))
///     .await?;
/// assert_eq!(receipt, again);
///
/// // Many: each partition's records are appended atomically, in order.
/// let receipts = producer
///     .send_batch("orders", vec![Record::new("a"), Record::new("b").with_header("source", "web")])
///     .await?;
/// assert_eq!(receipts.len(), 2);
/// # Ok(())
/// # }
/// ```
#[async_trait]
pub trait Producer: Send + Sync {
    /// Append `records` to `topic` (contract §3). Records for one partition are appended
    /// contiguously and atomically, in the order given; receipts come back
    /// in input order. Returns only once the records are stored per the
    /// broker's durability and visible to consumers. A record with an
    /// idempotency key already appended to its partition within the dedup
    /// window is not appended again: its receipt is the original one.
    ///
    /// # Errors
    /// `TopicNotFound` (unless auto-create is on); `PartitionOutOfRange`
    /// for an explicit partition; `MessageTooLarge`; `InvalidArgument` for
    /// a bad topic name, header name or idempotency key. Bad input is
    /// refused before anything is written. A storage error (`Io`,
    /// `Unavailable`) during a batch spanning several partitions may leave
    /// some partitions appended and others not; each partition is all or
    /// nothing, and a retry with idempotency keys appends each record once.
    ///
    /// # Cancel safety
    /// Not cancel safe: dropped mid-call, the records may or may not have
    /// been appended. Use idempotency keys and send again.
    async fn send_batch(&self, topic: &str, records: Vec<Record>) -> Result<Vec<Receipt>>;

    /// Make everything sent so far durable now.
    ///
    /// # Errors
    /// `Io` if the sync fails (an embedded store then refuses writes until
    /// reopened).
    ///
    /// # Cancel safety
    /// Cancel safe: dropping it only stops waiting.
    async fn flush(&self) -> Result<()>;
}

/// Conveniences over [`Producer`], implemented once for every backend.
#[async_trait]
pub trait ProducerExt: Producer {
    /// Append one record (see [`Producer::send_batch`]).
    ///
    /// # Errors
    /// As [`Producer::send_batch`].
    ///
    /// # Cancel safety
    /// As [`Producer::send_batch`]: not cancel safe.
    async fn send(&self, topic: &str, record: Record) -> Result<Receipt> {
        let mut receipts = self.send_batch(topic, vec![record]).await?;
        receipts.pop().ok_or_else(|| {
            crate::Error::internal(format!("topic `{topic}`: send_batch returned no receipt"))
        })
    }
}

impl<P: Producer + ?Sized> ProducerExt for P {}

/// A member of a consumer group.
///
/// Every call is a heartbeat; `poll` keeps heartbeating while it waits. A
/// member not heard from for the session timeout is removed; dropping the
/// last handle or calling [`close`](Consumer::close) leaves at once.
///
/// Every method may also fail with `Closed` (this consumer or its broker
/// was closed), `Unavailable` (server backends, retriable) and `Io`.
/// Settling calls (`ack`, `nack`, `extend`, `commit_message`) take a
/// message this consumer's group received, unchanged: a message of another
/// group, one read with `fetch`, or one whose topic, partition, offset or
/// attempt was changed is `InvalidArgument` (contract §4, §7).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> conveyor::Result<()> {
/// use conveyor::prelude::*;
/// use conveyor::{NackOptions, NackOutcome, SeekTo};
/// use std::time::Duration;
///
/// let broker = conveyor::open("memory://").await?;
/// broker.create_topic("jobs", TopicConfig::new(2)).await?;
/// let producer = broker.producer().await?;
/// producer.send("jobs", Record::new("resize image 7")).await?;
/// producer.send("jobs", Record::new("resize image 8")).await?;
///
/// // Queue mode: each message is leased to one member; ack or nack it.
/// let workers = broker.consumer("workers", &["jobs"], GroupConfig::queue()).await?;
/// for message in workers.poll(10, Duration::from_secs(1)).await? {
///     if message.value.ends_with(b"7") {
///         workers.ack(&message).await?;
///     } else {
///         // Long work? `workers.extend(&message, d)` first. Failed: say why.
///         let outcome = workers
///             .nack(&message, NackOptions::new().with_delay(Duration::from_secs(5)).with_reason("busy"))
///             .await?;
///         assert_eq!(outcome, NackOutcome::Redeliver);
///     }
/// }
///
/// // Stream mode: partitions owned by one member, offsets committed per
/// // partition, replay by seeking.
/// let audit = broker.consumer("audit", &["jobs"], GroupConfig::stream()).await?;
/// let batch = audit.poll(10, Duration::from_secs(1)).await?;
/// audit.commit_batch(&batch).await?;
/// for tp in audit.assignment().await? {
///     audit.seek(&tp.topic, tp.partition, SeekTo::Beginning).await?; // replay
/// }
/// audit.close().await?;
/// # Ok(())
/// # }
/// ```
#[async_trait]
pub trait Consumer: Send + Sync {
    /// Up to `max` messages, waiting up to `timeout` for the first one.
    /// Returns an empty vector on timeout. Queue mode leases what it
    /// returns (one attempt each); stream mode advances this member's
    /// position.
    ///
    /// # Errors
    /// Only the common ones (see the trait docs). A member removed by a
    /// session timeout rejoins here.
    ///
    /// # Cancel safety
    /// Cancel safe (contract §4): if the future is dropped (a `select!` branch that lost,
    /// a timeout), no message was taken: no lease stays held, no attempt
    /// count is raised, and no position moves.
    async fn poll(&self, max: usize, timeout: Duration) -> Result<Vec<Message>>;

    /// Settle a message. Queue mode: ends its lease for good. Stream mode:
    /// commits `offset + 1` for its partition (never backwards), cumulative
    /// **per partition**: other partitions are not committed (see
    /// [`ConsumerExt::commit_batch`]).
    ///
    /// # Errors
    /// Queue mode: `LeaseExpired` if the lease was lost (it expired and the
    /// message may have been re-leased; the new lease is not settled).
    /// Stream mode: `Fenced` if the partition was reassigned since
    /// delivery. `InvalidArgument` for a message not delivered to this
    /// group (see the trait docs).
    ///
    /// # Cancel safety
    /// Not cancel safe: dropped mid-call, the message may or may not be
    /// settled. Acking again is safe (`LeaseExpired` if it was).
    async fn ack(&self, message: &Message) -> Result<()>;

    /// Settle many messages in one call: each as [`ack`](Consumer::ack)
    /// would, and all of them stored together (one write, and one sync
    /// under `Durability::Always`, for the whole batch). The messages may
    /// come from several partitions and polls.
    ///
    /// Each message succeeds or fails on its own: one whose lease was lost
    /// or that was already settled (`LeaseExpired`), one of a partition
    /// reassigned since delivery (`Fenced`), or one not delivered to this
    /// group (`InvalidArgument`) is listed in [`BatchAck::failed`] and
    /// does not stop the others. Stream mode commits per partition, as
    /// `ack` does: the highest acked offset of each partition counts.
    ///
    /// The default implementation calls `ack` for each message; the
    /// embedded backends do better.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> conveyor_core::Result<()> {
    /// use conveyor_core::prelude::*;
    /// use std::time::Duration;
    ///
    /// let broker = conveyor_memory::open_default();
    /// broker.create_topic("orders", TopicConfig::new(2)).await?;
    /// let producer = broker.producer().await?;
    /// for i in 0..10 {
    ///     producer.send("orders", Record::new(format!("order {i}"))).await?;
    /// }
    /// let consumer = broker.consumer("email", &["orders"], GroupConfig::queue()).await?;
    /// let batch = consumer.poll(100, Duration::from_secs(1)).await?;
    /// let outcome = consumer.ack_batch(&batch).await?;
    /// assert_eq!(outcome.acked, batch.len());
    /// assert!(outcome.failed.is_empty());
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// Only for the call as a whole: the common ones (see the trait
    /// docs), such as `Io` when the batch could not be stored. Then none
    /// of the acks is known to be durable; acking them again is safe
    /// (those already settled are `LeaseExpired` in [`BatchAck::failed`]).
    ///
    /// # Cancel safety
    /// Not cancel safe: dropped mid-call, any subset of the batch may be
    /// settled. Acking again is safe.
    async fn ack_batch(&self, messages: &[Message]) -> Result<BatchAck> {
        let mut outcome = BatchAck::default();
        for (i, m) in messages.iter().enumerate() {
            match self.ack(m).await {
                Ok(()) => outcome.acked += 1,
                Err(e) if matches!(e.kind(), ErrorKind::Closed) => return Err(e),
                Err(e) => outcome.failed.push((i, e)),
            }
        }
        Ok(outcome)
    }

    /// Report a failure (contract §4a, §4b, §5): the message is redelivered after
    /// [`NackOptions::delay`] (the group's retry backoff if `None`) with
    /// its attempt number raised, or dead-lettered if it used its last
    /// allowed attempt (the reason goes to the DLQ header
    /// `conveyor.dlq.error`). Stream mode rewinds the partition to the
    /// message (unless it was dead-lettered: then the position stays).
    /// Says which happened.
    ///
    /// # Errors
    /// As [`ack`](Consumer::ack); plus the errors of appending to the DLQ
    /// topic (then the message is not settled and comes again).
    ///
    /// # Cancel safety
    /// Not cancel safe: dropped mid-call, the nack may or may not have
    /// taken effect; a DLQ move that started completes (or is retried)
    /// on its own, so nothing is lost.
    async fn nack(&self, message: &Message, options: NackOptions) -> Result<NackOutcome>;

    /// Queue mode (contract §4b): prolong the message's lease to `by` from now (capped at
    /// [`MAX_REDELIVERY_DELAY`]).
    ///
    /// # Errors
    /// `LeaseExpired` if the lease was lost; `WrongMode` in stream mode.
    ///
    /// # Cancel safety
    /// Cancel safe on the embedded backends (nothing to wait for); on
    /// server backends the lease may or may not have been extended.
    async fn extend(&self, message: &Message, by: Duration) -> Result<()>;

    /// Stream mode: commit `offset` (the next to read) for one partition.
    /// Cumulative per partition; may move backwards (an explicit reset).
    ///
    /// # Errors
    /// `Fenced` if this member does not own the partition in the current
    /// generation; `InvalidArgument` for an offset past the log end or a
    /// topic this consumer does not read; `PartitionOutOfRange`;
    /// `WrongMode` in queue mode.
    ///
    /// # Cancel safety
    /// Not cancel safe: dropped mid-call, the commit may or may not be
    /// stored. Committing again is safe.
    async fn commit(&self, topic: &str, partition: u32, offset: u64) -> Result<()>;

    /// Stream mode: move this member's position in a partition it owns.
    /// Queue mode: move the group's cursor for the partition (all members).
    ///
    /// # Errors
    /// `Fenced` (stream mode) if this member does not own the partition;
    /// `PartitionOutOfRange`; `InvalidArgument` for a topic this consumer
    /// does not read.
    ///
    /// # Cancel safety
    /// Not cancel safe: dropped mid-call, the position may or may not have
    /// moved. Seeking again is safe.
    async fn seek(&self, topic: &str, partition: u32, to: SeekTo) -> Result<()>;

    /// Stream mode: the partitions this member owns now (after applying
    /// any pending rebalance). Queue mode: every partition of its topics.
    ///
    /// # Errors
    /// Only the common ones (see the trait docs).
    ///
    /// # Cancel safety
    /// Cancel safe.
    async fn assignment(&self) -> Result<Vec<TopicPartition>>;

    /// The group's settings as stored now (they may differ from the config
    /// this member joined with if it joined with
    /// [`JoinSettings::UseExisting`](crate::JoinSettings::UseExisting), or
    /// if [`Broker::alter_group`] changed them since). The
    /// [`Runner`](crate::runner::Runner) takes its lease extension from
    /// here, so the settings are given once.
    ///
    /// The default implementation answers `Unsupported` (for wrappers);
    /// every backend of this workspace implements it.
    ///
    /// # Errors
    /// `GroupNotFound` if the group was deleted.
    ///
    /// # Cancel safety
    /// Cancel safe: it only reads.
    async fn group_config(&self) -> Result<GroupConfig> {
        Err(Error::new(
            ErrorKind::Unsupported,
            "this consumer cannot report its group's settings",
        ))
    }

    /// What this member's metrics and spans are labelled with (its
    /// backend and group), for code that opens its own spans
    /// ([`crate::observe::process_span`]); the [`Runner`](crate::runner::Runner)
    /// labels its `process` spans and metrics with it. `None` (the
    /// default) for a consumer of a broker not wrapped by
    /// [`crate::observe::observe`]; `conveyor::open` wraps every broker.
    fn labels(&self) -> Option<crate::observe::Labels> {
        None
    }

    /// The group's current generation (stream mode; 0 in queue mode).
    ///
    /// # Errors
    /// Only the common ones (see the trait docs).
    ///
    /// # Cancel safety
    /// Cancel safe.
    async fn generation(&self) -> Result<u64>;

    /// Leave the group now; unacked queue-mode leases are released (their
    /// messages come again, attempt raised); stream-mode partitions move to
    /// the other members.
    ///
    /// # Errors
    /// `Io` if persisting the departure fails (the member is gone anyway).
    ///
    /// # Cancel safety
    /// Cancel safe: the member leaves at the first poll of the future.
    async fn close(&self) -> Result<()>;
}

/// Conveniences over [`Consumer`], implemented once for every backend.
#[async_trait]
pub trait ConsumerExt: Consumer {
    /// Stream mode: commit `message.offset + 1` for **its partition** only,
    /// checking the message's generation (the same as [`Consumer::ack`]
    /// there). To commit a polled batch, which spans partitions, use
    /// [`ConsumerExt::commit_batch`].
    ///
    /// # Errors
    /// As [`Consumer::ack`].
    ///
    /// # Cancel safety
    /// As [`Consumer::ack`]: not cancel safe; committing again is safe.
    async fn commit_message(&self, message: &Message) -> Result<()> {
        self.ack(message).await
    }

    /// Stream mode: commit a whole polled batch, **per partition**: for
    /// each topic and partition in `messages`, the offset after its
    /// highest message. (A batch spans partitions and a commit is
    /// cumulative per partition, so committing only `batch.last()` would
    /// leave the other partitions uncommitted, to be read again after a
    /// restart.) Queue mode: acks every message.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> conveyor::Result<()> {
    /// use conveyor::prelude::*;
    /// use std::time::Duration;
    ///
    /// let broker = conveyor::open("memory://").await?;
    /// broker.create_topic("orders", TopicConfig::new(3)).await?;
    /// let producer = broker.producer().await?;
    /// for i in 0..9 {
    ///     producer.send("orders", Record::new(format!("order {i}"))).await?;
    /// }
    /// let loyalty = broker.consumer("loyalty", &["orders"], GroupConfig::stream()).await?;
    /// let batch = loyalty.poll(100, Duration::from_secs(1)).await?;
    /// // ... handle the batch ...
    /// loyalty.commit_batch(&batch).await?;
    /// assert_eq!(broker.group_lag("loyalty").await?.total_lag(), 9 - batch.len() as u64);
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// As [`Consumer::ack`]; partitions before the failing one stay
    /// committed.
    ///
    /// # Cancel safety
    /// Not cancel safe: dropped mid-call, some partitions may be committed
    /// and others not; committing again is safe.
    async fn commit_batch(&self, messages: &[Message]) -> Result<()> {
        if messages
            .iter()
            .any(|m| m.token().mode() != Some(crate::config::DeliveryMode::Stream))
        {
            for m in messages {
                self.ack(m).await?;
            }
            return Ok(());
        }
        let mut last: std::collections::BTreeMap<(&str, u32), &Message> =
            std::collections::BTreeMap::new();
        for m in messages {
            let entry = last.entry((m.topic.as_str(), m.partition)).or_insert(m);
            if m.offset > entry.offset {
                *entry = m;
            }
        }
        for m in last.values() {
            self.ack(m).await?;
        }
        Ok(())
    }

    /// The messages as a stream, polling in batches of `batch`. Errors end
    /// nothing: they are yielded and polling goes on.
    ///
    /// Dropping the stream between items is cancel safe, as `poll` is;
    /// messages already polled but not yet yielded are not lost: queue
    /// mode redelivers them after their lease expires (attempt raised),
    /// stream mode after a restart from the committed offset.
    fn stream(&self, batch: usize) -> BoxStream<'_, Result<Message>> {
        use futures::StreamExt;
        let batch = batch.max(1);
        futures::stream::unfold(
            std::collections::VecDeque::new(),
            move |mut buf| async move {
                loop {
                    if let Some(m) = buf.pop_front() {
                        return Some((Ok(m), buf));
                    }
                    match self.poll(batch, Duration::from_secs(1)).await {
                        Ok(ms) => buf.extend(ms),
                        Err(e) => return Some((Err(e), buf)),
                    }
                }
            },
        )
        .boxed()
    }
}

impl<C: Consumer + ?Sized> ConsumerExt for C {}

/// Remembers which event ids a consumer has handled (contract §8).
#[async_trait]
pub trait IdempotencyStore: Send + Sync {
    /// Atomically record `key` for `ttl`; `true` if it was not already
    /// recorded (the caller should do the work), `false` if it was.
    ///
    /// # Errors
    /// `InvalidArgument` for an empty key or a zero ttl; `Unavailable`,
    /// `Io`.
    ///
    /// # Cancel safety
    /// Not cancel safe: dropped mid-call, the key may or may not be
    /// recorded; `forget` it if the work was not done.
    async fn first_seen(&self, key: &str, ttl: Duration) -> Result<bool>;

    /// Forget `key` (so a failed handler can run again).
    ///
    /// # Errors
    /// `Unavailable`, `Io`.
    ///
    /// # Cancel safety
    /// Not cancel safe: the key may or may not be forgotten; call again.
    async fn forget(&self, key: &str) -> Result<()>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nack_delays_are_capped_so_nothing_is_parked_forever() {
        let backoff = Duration::from_secs(1);
        assert_eq!(NackOptions::new().delay_or(backoff), backoff);
        assert_eq!(
            NackOptions::new()
                .with_delay(Duration::from_millis(5))
                .delay_or(backoff),
            Duration::from_millis(5)
        );
        assert_eq!(
            NackOptions::new()
                .with_delay(Duration::MAX)
                .delay_or(backoff),
            MAX_REDELIVERY_DELAY
        );
        assert_eq!(
            NackOptions::new().delay_or(Duration::MAX),
            MAX_REDELIVERY_DELAY,
            "a group backoff of Duration::MAX is capped too"
        );
    }
}
