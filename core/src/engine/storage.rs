//! The small storage trait embedded backends implement.
//!
//! [`LogStorage`] is only storage: partition logs and a key-value table of
//! state. All delivery rules (groups, assignment, leases, DLQ moves, dedup,
//! validation) live in [`crate::engine::Engine`], which calls this trait. A
//! storage must not validate names or configs (the engine has), and must
//! not interpret state values (they are opaque bytes).

use crate::broker::Capabilities;
use crate::config::Retention;
use crate::error::Result;
use crate::record::{Header, Receipt};
use async_trait::async_trait;
use bytes::Bytes;

/// A record as the engine hands it to storage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRecord {
    /// Key, if any.
    pub key: Option<Bytes>,
    /// Value.
    pub value: Bytes,
    /// Headers in order.
    pub headers: Vec<Header>,
    /// The producer's idempotency key, kept so the dedup window can be
    /// rebuilt at open ([`LogStorage::idempotency_keys_since`]), and so
    /// consumers see it on the [`crate::Message`].
    pub idempotency_key: Option<String>,
    /// Delayed delivery: no queue-mode group is offered the record before
    /// this time (ms since the epoch). Stored as is; storage never acts on
    /// it.
    pub deliver_at: Option<u64>,
}

/// A record as storage returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    /// Offset in the partition.
    pub offset: u64,
    /// Append time, ms since the epoch.
    pub timestamp: u64,
    /// Key.
    pub key: Option<Bytes>,
    /// Value.
    pub value: Bytes,
    /// Headers in order.
    pub headers: Vec<Header>,
    /// The producer's idempotency key, as appended.
    pub idempotency_key: Option<String>,
    /// The delivery time, as appended (ms since the epoch).
    pub deliver_at: Option<u64>,
}

impl StoredMessage {
    /// The record appended at `offset` at `timestamp`, as read back.
    pub fn from_record(offset: u64, timestamp: u64, record: StoredRecord) -> Self {
        StoredMessage {
            offset,
            timestamp,
            key: record.key,
            value: record.value,
            headers: record.headers,
            idempotency_key: record.idempotency_key,
            deliver_at: record.deliver_at,
        }
    }
}

/// Which records a [`LogStorage::read`] returns: from `from`, at most
/// `max_records`, stopping early once `max_bytes` of values are read
/// (always at least one record if any).
///
/// ```
/// use conveyor_core::backend::ReadRange;
/// let range = ReadRange::from(42).with_max_records(10).with_max_bytes(1 << 20);
/// assert_eq!((range.from, range.max_records, range.max_bytes), (42, 10, 1 << 20));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReadRange {
    /// First offset wanted (below the log start reads from the log start).
    pub from: u64,
    /// At most this many records.
    pub max_records: usize,
    /// Stop once this many value bytes are read (at least one record).
    pub max_bytes: usize,
}

impl ReadRange {
    /// Everything from `offset` on, unbounded (narrow it with `with_*`).
    pub fn from(offset: u64) -> Self {
        ReadRange {
            from: offset,
            max_records: usize::MAX,
            max_bytes: usize::MAX,
        }
    }

    /// At most `n` records.
    pub fn with_max_records(mut self, n: usize) -> Self {
        self.max_records = n;
        self
    }

    /// Stop once `n` value bytes are read (always at least one record).
    pub fn with_max_bytes(mut self, n: usize) -> Self {
        self.max_bytes = n;
        self
    }

    /// Whether a read that has `records` records and `value_bytes` bytes
    /// of values so far is done.
    pub fn is_full(&self, records: usize, value_bytes: usize) -> bool {
        records >= self.max_records || (records > 0 && value_bytes >= self.max_bytes)
    }
}

/// Bounds of a partition log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PartitionBounds {
    /// First retained offset.
    pub log_start: u64,
    /// Offset of the next record.
    pub log_end: u64,
    /// Bytes the partition takes.
    pub bytes: u64,
}

/// Where an appended batch landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// Offset of the first record of the batch; the rest follow densely.
    pub base_offset: u64,
    /// The batch's timestamp (all records of a batch share it).
    pub timestamp: u64,
}

/// Partition logs plus a key-value state table.
///
/// Rules a storage must keep:
/// - `append` is atomic per call (all records or none), assigns dense
///   offsets starting at the log end, sets a timestamp that never goes below
///   the partition's previous one, is safe to call concurrently (calls for
///   one partition are serialised), and returns only when the batch is
///   visible to `read` and as durable as the storage's durability setting
///   says. A reader never sees offset N+1 before offset N.
/// - `read` from below the log start reads from the log start; from the log
///   end or beyond returns nothing.
/// - Offsets are never reused, even across restarts, retention and
///   `drop_topic` followed by recreation is allowed to restart at 0.
/// - `put_state` applies its whole batch atomically and durably (per the
///   durability setting) before returning; `load_state` returns the latest
///   value of every key.
#[async_trait]
pub trait LogStorage: Send + Sync + 'static {
    /// Whether the storage persists (`persistent`) and is a local store
    /// owned by one process (`embedded`).
    fn capabilities(&self) -> Capabilities;

    /// Every state key and its latest value, read at open.
    ///
    /// # Errors
    /// `Corrupt` naming the file and position for damaged state; `Io`.
    ///
    /// # Cancel safety
    /// Cancel safe: it only reads.
    async fn load_state(&self) -> Result<Vec<(String, Bytes)>>;

    /// Set (`Some`) or delete (`None`) state keys, atomically.
    ///
    /// # Errors
    /// `Io` (a storage that failed a sync refuses further writes until
    /// reopened); `Closed`. On error nothing of the batch may be assumed
    /// applied: the engine keeps the keys dirty and writes them again.
    ///
    /// # Cancel safety
    /// Must be atomic even if dropped: all of the batch or none is stored.
    async fn put_state(&self, changes: Vec<(String, Option<Bytes>)>) -> Result<()>;

    /// Make sure partitions `0..partitions` of `topic` exist (creating empty
    /// logs for missing ones). Called on create, on growth and at open.
    ///
    /// # Errors
    /// `Io`, `Closed`.
    ///
    /// # Cancel safety
    /// Idempotent: dropped mid-call, calling again finishes the job.
    async fn ensure_partitions(&self, topic: &str, partitions: u32) -> Result<()>;

    /// Remove a topic's logs.
    ///
    /// # Errors
    /// `Io`, `Closed`.
    ///
    /// # Cancel safety
    /// Idempotent: dropped mid-call, calling again finishes the job.
    async fn drop_topic(&self, topic: &str) -> Result<()>;

    /// Append a batch to one partition (see the trait rules).
    ///
    /// # Errors
    /// `Io` (after a failed sync, every later append too, until reopened);
    /// `Closed`; `InvalidArgument` for a batch the format cannot hold.
    ///
    /// # Cancel safety
    /// Atomic even if dropped: the batch is appended whole or not at all,
    /// but a dropped call may have appended it without saying so.
    async fn append(
        &self,
        topic: &str,
        partition: u32,
        records: Vec<StoredRecord>,
    ) -> Result<Appended>;

    /// The records of `range`, in offset order (see [`ReadRange`]).
    ///
    /// # Errors
    /// `Corrupt` naming the file and position of a damaged batch; `Io`.
    ///
    /// # Cancel safety
    /// Cancel safe: it only reads.
    async fn read(
        &self,
        topic: &str,
        partition: u32,
        range: ReadRange,
    ) -> Result<Vec<StoredMessage>>;

    /// Log start, log end and bytes of a partition (cheap; no I/O).
    ///
    /// # Errors
    /// `TopicNotFound` or `PartitionOutOfRange` for a log that does not
    /// exist.
    fn bounds(&self, topic: &str, partition: u32) -> Result<PartitionBounds>;

    /// Offset of the first record with timestamp >= `timestamp`, or the log
    /// end if there is none.
    ///
    /// # Errors
    /// `Corrupt`, `Io`.
    ///
    /// # Cancel safety
    /// Cancel safe: it only reads.
    async fn offset_for_timestamp(
        &self,
        topic: &str,
        partition: u32,
        timestamp: u64,
    ) -> Result<u64>;

    /// Remove whole records (or segments) from the head that `retention`
    /// no longer keeps at time `now_ms`. Never touches the log end.
    ///
    /// # Errors
    /// `Io`. A failure leaves the log start where it was or moved forward,
    /// never a hole.
    ///
    /// # Cancel safety
    /// Dropped mid-call, the log start may have moved; records above it
    /// are intact.
    async fn enforce_retention(
        &self,
        topic: &str,
        partition: u32,
        retention: &Retention,
        now_ms: u64,
    ) -> Result<()>;

    /// Idempotency keys of records appended to `topic` at or after
    /// `since_ms`, with their receipts (used to rebuild dedup windows at
    /// open). A non-persistent storage returns nothing.
    ///
    /// # Errors
    /// `Corrupt`, `Io`.
    ///
    /// # Cancel safety
    /// Cancel safe: it only reads.
    async fn idempotency_keys_since(
        &self,
        topic: &str,
        since_ms: u64,
    ) -> Result<Vec<(String, Receipt)>>;

    /// Make everything appended and put so far durable.
    ///
    /// # Errors
    /// `Io` (and the storage fails stop: later writes are refused).
    ///
    /// # Cancel safety
    /// Cancel safe: dropping it only stops waiting.
    async fn flush(&self) -> Result<()>;

    /// Flush and release files and locks.
    ///
    /// # Errors
    /// `Io` if the final flush fails; the files and locks are released
    /// anyway.
    ///
    /// # Cancel safety
    /// Not cancel safe: dropped mid-call, the storage is closed but may not
    /// be flushed.
    async fn close(&self) -> Result<()>;
}
