//! The four traits every backend implements: [`Broker`], [`Producer`],
//! [`Consumer`] and [`IdempotencyStore`].
//!
//! They are dyn-compatible (`Arc<dyn Broker>`), keep the required methods
//! few, and build conveniences (`send`, `commit_message`, `stream`,
//! `redrive`) as provided methods on top of them.

use crate::config::{GroupConfig, SeekTo, TopicConfig};
use crate::describe::{GroupLag, TopicDescription};
use crate::error::Result;
use crate::record::{Message, Receipt, Record};
use async_trait::async_trait;
use futures::stream::BoxStream;
use std::sync::Arc;
use std::time::Duration;

/// What a backend may lack, as the contract allows (nothing else).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Capabilities {
    /// Closing and reopening keeps everything acknowledged.
    pub persistent: bool,
    /// A local store owned by one process (torn-tail recovery, `Locked`).
    pub embedded: bool,
}

impl Capabilities {
    /// Capabilities with both flags set as given.
    pub fn new(persistent: bool, embedded: bool) -> Self {
        Capabilities {
            persistent,
            embedded,
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
/// ```
/// # tokio_test_block_on(async {
/// use conveyor_core::{Broker, GroupConfig, Record, TopicConfig};
/// use std::time::Duration;
///
/// let broker = conveyor_memory::open_default();
/// broker.create_topic("orders", TopicConfig::new(3)).await?;
///
/// let producer = broker.producer().await?;
/// let receipt = producer.send("orders", Record::new("placed").with_key("order-1")).await?;
///
/// let consumer = broker.consumer("email", &["orders"], GroupConfig::queue()).await?;
/// let messages = consumer.poll(10, Duration::from_secs(1)).await?;
/// assert_eq!(messages[0].offset, receipt.offset);
/// consumer.ack(&messages[0]).await?;
/// # Ok::<(), conveyor_core::Error>(())
/// # });
/// # fn tokio_test_block_on<F: std::future::Future>(f: F) -> F::Output {
/// #     tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
/// # }
/// ```
#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// What this backend may lack.
    fn capabilities(&self) -> Capabilities;

    /// Create a topic. Same config again: no-op; another config:
    /// `TopicExists`.
    async fn create_topic(&self, name: &str, config: TopicConfig) -> Result<()>;

    /// Delete a topic and its records.
    async fn delete_topic(&self, name: &str) -> Result<()>;

    /// Names of all topics, sorted.
    async fn list_topics(&self) -> Result<Vec<String>>;

    /// Config and per partition log start, log end and bytes.
    async fn describe_topic(&self, name: &str) -> Result<TopicDescription>;

    /// Grow a topic to `partitions` partitions (never shrink).
    async fn add_partitions(&self, name: &str, partitions: u32) -> Result<()>;

    /// A producer (cheap; share it).
    async fn producer(&self) -> Result<Arc<dyn Producer>>;

    /// Join `group` for `topics` as a new member. Creates the group on first
    /// use with `config`; a different delivery mode is `GroupModeMismatch`.
    async fn consumer(
        &self,
        group: &str,
        topics: &[&str],
        config: GroupConfig,
    ) -> Result<Arc<dyn Consumer>>;

    /// Names of all groups, sorted.
    async fn list_groups(&self) -> Result<Vec<String>>;

    /// Per partition committed offset, log end and lag (plus in-flight and
    /// available counts in queue mode).
    async fn group_lag(&self, group: &str) -> Result<GroupLag>;

    /// Read up to `max` records of a partition from `offset` without a
    /// group (offsets below the log start read from the log start).
    /// Messages have attempt 1.
    async fn fetch(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
        max: usize,
    ) -> Result<Vec<Message>>;

    /// The offset of the first record with timestamp >= `timestamp` (the
    /// log end if none).
    async fn offset_for_timestamp(
        &self,
        topic: &str,
        partition: u32,
        timestamp: u64,
    ) -> Result<u64>;

    /// The backend's idempotency store for consumers.
    fn idempotency_store(&self) -> Arc<dyn IdempotencyStore>;

    /// Flush and release resources. Later calls fail with `Closed`.
    async fn close(&self) -> Result<()>;

    /// Move up to `max` messages (all if `None`) of a DLQ topic back to
    /// their original topics; returns how many were moved. See
    /// [`crate::dlq::redrive`].
    async fn redrive(&self, dlq_topic: &str, max: Option<usize>) -> Result<usize> {
        crate::dlq::redrive(self, dlq_topic, max).await
    }
}

/// Appends records to topics.
#[async_trait]
pub trait Producer: Send + Sync {
    /// Append `records` to `topic`. Records for one partition are appended
    /// contiguously and atomically, in the order given; receipts come back
    /// in input order. Returns only once the records are stored per the
    /// broker's durability and visible to consumers.
    async fn send_batch(&self, topic: &str, records: Vec<Record>) -> Result<Vec<Receipt>>;

    /// Make everything sent so far durable now.
    async fn flush(&self) -> Result<()>;

    /// Append one record.
    async fn send(&self, topic: &str, record: Record) -> Result<Receipt> {
        let mut receipts = self.send_batch(topic, vec![record]).await?;
        receipts
            .pop()
            .ok_or_else(|| crate::Error::internal("send_batch returned no receipt"))
    }
}

/// A member of a consumer group.
///
/// Every call is a heartbeat; `poll` keeps heartbeating while it waits. A
/// member not heard from for the session timeout is removed; dropping the
/// last handle or calling [`close`](Consumer::close) leaves at once.
#[async_trait]
pub trait Consumer: Send + Sync {
    /// Up to `max` messages, waiting up to `timeout` for the first one.
    /// Returns an empty vector on timeout.
    async fn poll(&self, max: usize, timeout: Duration) -> Result<Vec<Message>>;

    /// Settle a message. Queue mode: ends its lease for good
    /// (`LeaseExpired` if the lease was lost). Stream mode: commits
    /// `offset + 1` for its partition.
    async fn ack(&self, message: &Message) -> Result<()>;

    /// Report a failure: the message is redelivered after `delay` (the
    /// group's retry backoff if `None`) with its attempt number raised, or
    /// dead-lettered if it used its last allowed attempt. `reason` goes to
    /// the DLQ header `conveyor.dlq.error`. Stream mode rewinds the
    /// partition to the message (unless it was dead-lettered: then the
    /// position stays). Says which happened.
    async fn nack(
        &self,
        message: &Message,
        delay: Option<Duration>,
        reason: Option<&str>,
    ) -> Result<NackOutcome>;

    /// Queue mode: prolong the message's lease to `by` from now.
    async fn extend(&self, message: &Message, by: Duration) -> Result<()>;

    /// Stream mode: commit `offset` (the next to read) for a partition.
    /// Cumulative. `Fenced` if this member does not own the partition in
    /// the current generation.
    async fn commit(&self, topic: &str, partition: u32, offset: u64) -> Result<()>;

    /// Stream mode: move this member's position in a partition it owns.
    /// Queue mode: move the group's cursor for the partition (all members).
    async fn seek(&self, topic: &str, partition: u32, to: SeekTo) -> Result<()>;

    /// Stream mode: the partitions this member owns now (after applying
    /// any pending rebalance). Queue mode: every partition of its topics.
    async fn assignment(&self) -> Result<Vec<TopicPartition>>;

    /// The group's current generation (stream mode; 0 in queue mode).
    async fn generation(&self) -> Result<u64>;

    /// Leave the group now; unacked queue-mode leases are released.
    async fn close(&self) -> Result<()>;

    /// Commit `message.offset + 1` for its partition (stream mode), checking
    /// the message's generation.
    async fn commit_message(&self, message: &Message) -> Result<()> {
        self.ack(message).await
    }

    /// The messages as a stream, polling in batches of `batch`. Errors end
    /// nothing: they are yielded and polling goes on.
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

/// Remembers which event ids a consumer has handled.
#[async_trait]
pub trait IdempotencyStore: Send + Sync {
    /// Atomically record `key` for `ttl`; `true` if it was not already
    /// recorded (the caller should do the work), `false` if it was.
    async fn first_seen(&self, key: &str, ttl: Duration) -> Result<bool>;

    /// Forget `key` (so a failed handler can run again).
    async fn forget(&self, key: &str) -> Result<()>;
}
