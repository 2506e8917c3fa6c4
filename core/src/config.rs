//! Configuration: topics, groups, durability and broker options.
//!
//! Plain structs with `Default` and `with_*` builders. Validation of these
//! values lives in [`crate::backend::validate`], run once before anything is written.

pub use crate::group_settings::JoinSettings;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Default `max_message_bytes`: 1 MiB.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 1024 * 1024;

/// How long records are kept. Both limits may be set; either removes records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Retention {
    /// Remove records older than this.
    pub max_age: Option<Duration>,
    /// Keep at most about this many bytes per partition (whole records, or
    /// whole segments for segment logs, are removed from the head).
    pub max_bytes: Option<u64>,
}

impl Retention {
    /// Keep everything.
    pub fn forever() -> Self {
        Retention::default()
    }
    /// Remove records older than `age`.
    pub fn with_max_age(mut self, age: Duration) -> Self {
        self.max_age = Some(age);
        self
    }
    /// Keep at most `bytes` per partition.
    pub fn with_max_bytes(mut self, bytes: u64) -> Self {
        self.max_bytes = Some(bytes);
        self
    }
    /// Whether any limit is set.
    pub fn is_limited(&self) -> bool {
        self.max_age.is_some() || self.max_bytes.is_some()
    }
}

/// A topic's configuration, chosen at creation.
///
/// ```
/// use conveyor::{Retention, TopicConfig};
/// use std::time::Duration;
/// let config = TopicConfig::new(8)
///     .with_retention(Retention::forever().with_max_age(Duration::from_secs(7 * 86_400)));
/// assert_eq!(config.partitions, 8);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct TopicConfig {
    /// Number of partitions, 1 to 10,000. May grow later, never shrink.
    pub partitions: u32,
    /// What is kept.
    pub retention: Retention,
    /// Largest record (key + value + headers), default 1 MiB.
    pub max_message_bytes: usize,
    /// How long an idempotency key deduplicates, default 2 minutes.
    pub dedup_window: Duration,
}

impl Default for TopicConfig {
    fn default() -> Self {
        TopicConfig {
            partitions: 1,
            retention: Retention::default(),
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            dedup_window: Duration::from_secs(120),
        }
    }
}

impl TopicConfig {
    /// A topic with `partitions` partitions and defaults otherwise.
    pub fn new(partitions: u32) -> Self {
        TopicConfig {
            partitions,
            ..TopicConfig::default()
        }
    }
    /// Set the retention.
    pub fn with_retention(mut self, retention: Retention) -> Self {
        self.retention = retention;
        self
    }
    /// Set `max_message_bytes`.
    pub fn with_max_message_bytes(mut self, bytes: usize) -> Self {
        self.max_message_bytes = bytes;
        self
    }
    /// Set the dedup window of idempotency keys.
    pub fn with_dedup_window(mut self, window: Duration) -> Self {
        self.dedup_window = window;
        self
    }
}

/// How a group hands out records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DeliveryMode {
    /// Partitions are owned by one member each; committed offsets; replay
    /// and seek (Kafka consumer groups).
    Stream,
    /// Any member takes any record under a lease; ack/nack; visibility
    /// timeout (SQS, Pulsar Shared).
    Queue,
}

impl DeliveryMode {
    /// The mode's name as server backends store it: `stream` or `queue`.
    ///
    /// ```
    /// use conveyor_core::DeliveryMode;
    /// for m in [DeliveryMode::Stream, DeliveryMode::Queue] {
    ///     assert_eq!(DeliveryMode::parse(m.name())?, m);
    /// }
    /// # Ok::<(), conveyor_core::Error>(())
    /// ```
    pub fn name(self) -> &'static str {
        match self {
            DeliveryMode::Stream => "stream",
            DeliveryMode::Queue => "queue",
        }
    }

    /// The mode [`DeliveryMode::name`] names.
    ///
    /// # Errors
    /// `Internal` for any other string (a stored mode that cannot be read).
    pub fn parse(name: &str) -> crate::Result<Self> {
        match name {
            "stream" => Ok(DeliveryMode::Stream),
            "queue" => Ok(DeliveryMode::Queue),
            other => Err(crate::Error::internal(format!(
                "unknown stored group mode `{other}`"
            ))),
        }
    }
}

/// Where a new group starts, per partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum StartFrom {
    /// At the log start (default).
    #[default]
    Earliest,
    /// At the log end when the group is created.
    Latest,
}

/// Dead-letter policy of a group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct DlqPolicy {
    /// Deliveries allowed before a message is dead-lettered (default 5).
    pub max_deliveries: u32,
    /// DLQ topic; default `{topic}.{group}.dlq`.
    pub topic: Option<String>,
}

impl Default for DlqPolicy {
    fn default() -> Self {
        DlqPolicy {
            max_deliveries: 5,
            topic: None,
        }
    }
}

impl DlqPolicy {
    /// Dead-letter after `n` deliveries.
    pub fn new(max_deliveries: u32) -> Self {
        DlqPolicy {
            max_deliveries,
            topic: None,
        }
    }
    /// Use this DLQ topic instead of `{topic}.{group}.dlq`.
    pub fn with_topic(mut self, topic: impl Into<String>) -> Self {
        self.topic = Some(topic.into());
        self
    }
    /// The DLQ topic for messages of `topic` failed in `group`.
    pub fn topic_for(&self, topic: &str, group: &str) -> String {
        self.topic
            .clone()
            .unwrap_or_else(|| dlq_topic_name(topic, group))
    }
}

/// The default DLQ topic name: `{topic}.{group}.dlq`, shortened to the
/// 249-character name limit if needed.
pub fn dlq_topic_name(topic: &str, group: &str) -> String {
    let mut name = format!("{topic}.{group}.dlq");
    if name.len() > crate::validate::MAX_NAME_LEN {
        // Keep the suffix that marks it as a DLQ; names are ASCII.
        let keep = crate::validate::MAX_NAME_LEN - 4;
        name = format!("{}.dlq", &name[..keep]);
    }
    name
}

/// Exponential backoff between redeliveries after a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RetryBackoff {
    /// Delay after the first failure.
    pub initial: Duration,
    /// Upper bound of the delay.
    pub max: Duration,
    /// Growth factor per attempt (at least 1).
    pub multiplier: u32,
}

impl Default for RetryBackoff {
    fn default() -> Self {
        RetryBackoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(30),
            multiplier: 2,
        }
    }
}

impl RetryBackoff {
    /// No delay between attempts.
    pub fn none() -> Self {
        RetryBackoff {
            initial: Duration::ZERO,
            max: Duration::ZERO,
            multiplier: 1,
        }
    }
    /// Fixed delay.
    pub fn fixed(delay: Duration) -> Self {
        RetryBackoff {
            initial: delay,
            max: delay,
            multiplier: 1,
        }
    }
    /// Exponential from `initial` to `max`, doubling.
    pub fn exponential(initial: Duration, max: Duration) -> Self {
        RetryBackoff {
            initial,
            max,
            multiplier: 2,
        }
    }
    /// The delay before attempt `failed_attempt + 1`, after `failed_attempt`
    /// deliveries failed (1-based).
    pub fn delay_after(&self, failed_attempt: u32) -> Duration {
        let exp = failed_attempt.saturating_sub(1).min(30);
        let factor = (self.multiplier.max(1) as u64).saturating_pow(exp);
        let nanos = (self.initial.as_nanos() as u64).saturating_mul(factor);
        Duration::from_nanos(nanos).min(self.max.max(self.initial))
    }
}

/// A consumer group's configuration. The member that creates the group
/// sets it; the delivery mode and start are fixed then, the other settings
/// change only by [`Broker::alter_group`](crate::Broker::alter_group). A
/// later member must give the same settings, or join with
/// [`JoinSettings::UseExisting`] to take the group's (contract §4).
///
/// ```
/// use conveyor::{DlqPolicy, GroupConfig};
/// use std::time::Duration;
/// let email = GroupConfig::queue()
///     .with_visibility_timeout(Duration::from_secs(60))
///     .with_dlq(DlqPolicy::new(3));
/// let loyalty = GroupConfig::stream();
/// # let _ = (email, loyalty);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct GroupConfig {
    /// Stream or queue.
    pub mode: DeliveryMode,
    /// Where a new group starts.
    pub start: StartFrom,
    /// Queue mode: how long a delivered message is leased (default 30 s).
    pub visibility_timeout: Duration,
    /// A member silent this long is removed (default 10 s).
    pub session_timeout: Duration,
    /// Dead-letter policy.
    pub dlq: DlqPolicy,
    /// Delay before a nacked message (without its own delay) is redelivered.
    pub retry_backoff: RetryBackoff,
    /// What these settings mean if the group already exists: they must
    /// match (default), or the group's are used. Not stored.
    #[serde(skip)]
    pub join: JoinSettings,
}

impl Default for GroupConfig {
    fn default() -> Self {
        GroupConfig {
            mode: DeliveryMode::Stream,
            start: StartFrom::Earliest,
            visibility_timeout: Duration::from_secs(30),
            session_timeout: Duration::from_secs(10),
            dlq: DlqPolicy::default(),
            retry_backoff: RetryBackoff::default(),
            join: JoinSettings::MustMatch,
        }
    }
}

impl GroupConfig {
    /// A stream-mode group with defaults.
    pub fn stream() -> Self {
        GroupConfig::default()
    }
    /// A queue-mode group with defaults.
    pub fn queue() -> Self {
        GroupConfig {
            mode: DeliveryMode::Queue,
            ..GroupConfig::default()
        }
    }
    /// Set where a new group starts.
    pub fn with_start(mut self, start: StartFrom) -> Self {
        self.start = start;
        self
    }
    /// Set the visibility timeout (queue mode).
    pub fn with_visibility_timeout(mut self, timeout: Duration) -> Self {
        self.visibility_timeout = timeout;
        self
    }
    /// Set the session timeout.
    pub fn with_session_timeout(mut self, timeout: Duration) -> Self {
        self.session_timeout = timeout;
        self
    }
    /// Set the DLQ policy.
    pub fn with_dlq(mut self, dlq: DlqPolicy) -> Self {
        self.dlq = dlq;
        self
    }
    /// Set the retry backoff.
    pub fn with_retry_backoff(mut self, backoff: RetryBackoff) -> Self {
        self.retry_backoff = backoff;
        self
    }
    /// Say what these settings mean if the group already exists (default
    /// [`JoinSettings::MustMatch`]).
    pub fn with_join_settings(mut self, join: JoinSettings) -> Self {
        self.join = join;
        self
    }
}

/// When `send` may return, relative to the record reaching stable storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Durability {
    /// Left in OS buffers (survives a process crash on file backends, not a
    /// machine crash).
    #[default]
    None,
    /// Flushed at least every interval.
    Interval(Duration),
    /// Synced before `send` returns.
    Always,
}

/// Options every backend is opened with.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct BrokerOptions {
    /// Durability of sends.
    pub durability: Durability,
    /// Create missing topics (with default config) on produce or subscribe.
    pub auto_create_topics: bool,
}

impl BrokerOptions {
    /// Set durability.
    pub fn with_durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }
    /// Turn auto-creation of topics on or off.
    pub fn with_auto_create_topics(mut self, on: bool) -> Self {
        self.auto_create_topics = on;
        self
    }
}

/// Where `seek` moves a member's position in a partition.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> conveyor::Result<()> {
/// use conveyor::prelude::*;
/// use conveyor::SeekTo;
/// use std::time::Duration;
///
/// let broker = conveyor::open("memory://").await?;
/// broker.create_topic("orders", TopicConfig::new(1)).await?;
/// let producer = broker.producer().await?;
/// let first = producer.send("orders", Record::new("a")).await?;
/// producer.send("orders", Record::new("b")).await?;
///
/// let replay = broker.consumer("replay", &["orders"], GroupConfig::stream()).await?;
/// // Replay from a point in time (ms since the epoch), an offset, or the ends.
/// replay.seek("orders", 0, SeekTo::Timestamp(first.timestamp)).await?;
/// replay.seek("orders", 0, SeekTo::Offset(1)).await?;
/// let m = replay.poll(1, Duration::from_secs(1)).await?;
/// assert_eq!(&m[0].value[..], b"b");
/// replay.seek("orders", 0, SeekTo::End).await?; // only new records from here
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SeekTo {
    /// The log start.
    Beginning,
    /// The log end (only new records).
    End,
    /// This offset (clamped to the log start and end).
    Offset(u64),
    /// The first record with timestamp >= this (ms since the epoch).
    Timestamp(u64),
}
