//! The delivery contract over a [`LogStorage`]: what the memory, mmap and
//! RocksDB backends share.
//!
//! [`Engine`] implements [`Broker`] for any storage: validation,
//! partitioning, idempotent produce, consumer groups (sticky assignment,
//! generations, fencing), queue-mode leases, DLQ moves, retention
//! bookkeeping, lag, and the idempotency store. Group state lives in memory
//! under one lock and is persisted through [`LogStorage::put_state`] before
//! the call that changed it returns. The storage never sees a rule.

mod admin;
mod consumer;
mod dedup;
mod group;
mod group_admin;
mod group_settings;
mod idempotency;
mod lease;
mod membership;
mod partitions;
mod persist;
mod produce;
use idempotency::EngineIdempotency;
use produce::EngineProducer;
use sweep::sweeper;
mod state_key;
mod storage;
mod sweep;

pub use partitions::PartitionMap;
pub use storage::{Appended, LogStorage, PartitionBounds, ReadRange, StoredMessage, StoredRecord};

use crate::broker::{Broker, Capabilities, Consumer, IdempotencyStore, Producer, TopicPartition};
use crate::config::{BrokerOptions, DeliveryMode, GroupConfig, StartFrom, TopicConfig};
use crate::describe::{
    GroupDescription, GroupLag, MemberDescription, PartitionDescription, PartitionLag,
    TopicDescription,
};
use crate::dlq::{dead_letter_record, DeadLetter};
use crate::error::{Error, ErrorKind, Result};
use crate::record::{DeliveryToken, Message, Receipt, Record};
use crate::{now_ms, partitioner, validate};
use async_trait::async_trait;
use bytes::Bytes;
use dedup::DedupWindow;
use group::{Group, GroupMeta, Member};
use lease::{LeaseTable, PersistedLeases};
use parking_lot::Mutex;
use state_key::StateKey;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::watch;

/// Largest amount of value bytes one partition read returns in a poll.
const MAX_POLL_BYTES: usize = 8 * 1024 * 1024;
/// How often the background sweeper runs.
const SWEEP_EVERY: Duration = Duration::from_millis(50);

/// The broker state kept under the engine's lock.
#[derive(Default)]
struct State {
    topics: BTreeMap<String, TopicConfig>,
    groups: BTreeMap<String, Group>,
    next_member: u64,
    next_lease: u64,
    round_robin: HashMap<String, u32>,
}

impl State {
    fn partitions_of(&self, topics: &BTreeSet<String>) -> Vec<TopicPartition> {
        topics
            .iter()
            .filter_map(|t| self.topics.get(t).map(|c| (t, c.partitions)))
            .flat_map(|(t, n)| (0..n).map(move |p| TopicPartition::new(t.clone(), p)))
            .collect()
    }

    /// All partitions of the topics the group's members read.
    fn member_partitions(&self, group: &Group) -> Vec<TopicPartition> {
        let topics: BTreeSet<String> = group
            .members
            .values()
            .flat_map(|m| m.topics.iter().cloned())
            .collect();
        self.partitions_of(&topics)
    }

    fn rebalance(&mut self, group: &str) {
        if let Some(g) = self.groups.get(group) {
            let parts = self.member_partitions(g);
            if let Some(g) = self.groups.get_mut(group) {
                g.rebalance(&parts);
            }
        }
    }
}

/// A duration in whole milliseconds, saturating at `u64::MAX` (so
/// `Duration::MAX` means "forever", never an overflow).
pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Shared state of an engine, its producers and consumers.
pub(crate) struct Inner<S: LogStorage> {
    storage: S,
    options: BrokerOptions,
    caps: Capabilities,
    state: Mutex<State>,
    dirty: Mutex<BTreeSet<StateKey>>,
    persist_lock: tokio::sync::Mutex<()>,
    admin_lock: tokio::sync::Mutex<()>,
    changed: watch::Sender<u64>,
    dedup: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Option<DedupWindow>>>>>,
    idempotency: Mutex<HashMap<String, u64>>,
    closed: AtomicBool,
    /// Opened with [`Engine::open_read_only`]: every write is refused.
    read_only: bool,
}

/// Stops the sweeper when the last [`Engine`] handle is dropped.
struct SweeperGuard(Option<tokio::task::JoinHandle<()>>);

impl Drop for SweeperGuard {
    fn drop(&mut self) {
        if let Some(h) = self.0.take() {
            h.abort();
        }
    }
}

/// A [`Broker`] over any [`LogStorage`]. Cheap to clone.
pub struct Engine<S: LogStorage> {
    inner: Arc<Inner<S>>,
    _sweeper: Arc<SweeperGuard>,
}

impl<S: LogStorage> Clone for Engine<S> {
    fn clone(&self) -> Self {
        Engine {
            inner: self.inner.clone(),
            _sweeper: self._sweeper.clone(),
        }
    }
}

impl<S: LogStorage> std::fmt::Debug for Engine<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("options", &self.inner.options)
            .field("capabilities", &self.inner.caps)
            .finish_non_exhaustive()
    }
}

impl<S: LogStorage> Engine<S> {
    /// Open an engine over `storage`, restoring topics, groups, offsets,
    /// lease attempt counts and the idempotency table from its state.
    ///
    /// # Errors
    /// The storage's errors loading its state or opening partitions
    /// (`Io`, `Corrupt`).
    pub async fn open(storage: S, options: BrokerOptions) -> Result<Self> {
        Self::open_as(storage, options, false).await
    }

    /// Open a read-only engine over a storage opened read-only (a snapshot
    /// of another process's live store): topics, groups and offsets as of
    /// now; describe, lag, fetch and time lookups work, and every write
    /// (topic admin, producers, joining a group, the idempotency store)
    /// is refused with [`ErrorKind::ReadOnly`]. No background sweeper
    /// runs, retention is not enforced and nothing is persisted at close.
    ///
    /// # Errors
    /// As [`Engine::open`].
    pub async fn open_read_only(storage: S, options: BrokerOptions) -> Result<Self> {
        Self::open_as(storage, options, true).await
    }

    async fn open_as(storage: S, options: BrokerOptions, read_only: bool) -> Result<Self> {
        let entries = storage.load_state().await?;
        let restored = persist::restore(entries, now_ms())?;
        for (topic, config) in &restored.state.topics {
            storage.ensure_partitions(topic, config.partitions).await?;
        }
        let engine = Self::from_parts(
            storage,
            options,
            restored.state,
            restored.idempotency,
            read_only,
        );
        // Written with the next change (nothing is written at open; a
        // read-only engine never writes).
        engine.inner.mark_dirty(restored.rewrite);
        Ok(engine)
    }

    /// An engine over a storage known to be empty (no state to load), for
    /// synchronous construction of in-memory brokers.
    pub fn fresh(storage: S, options: BrokerOptions) -> Self {
        Self::from_parts(storage, options, State::default(), HashMap::new(), false)
    }

    fn from_parts(
        storage: S,
        options: BrokerOptions,
        state: State,
        idempotency: HashMap<String, u64>,
        read_only: bool,
    ) -> Self {
        let caps = storage.capabilities();
        let inner = Arc::new(Inner {
            storage,
            options,
            caps,
            state: Mutex::new(state),
            dirty: Mutex::new(BTreeSet::new()),
            persist_lock: tokio::sync::Mutex::new(()),
            admin_lock: tokio::sync::Mutex::new(()),
            changed: watch::channel(0).0,
            dedup: Mutex::new(HashMap::new()),
            idempotency: Mutex::new(idempotency),
            closed: AtomicBool::new(false),
            read_only,
        });
        // A read-only engine changes nothing: no sessions, leases or
        // retention to sweep.
        let handle = tokio::runtime::Handle::try_current()
            .ok()
            .filter(|_| !read_only)
            .map(|rt| rt.spawn(sweeper(Arc::downgrade(&inner))));
        Engine {
            inner,
            _sweeper: Arc::new(SweeperGuard(handle)),
        }
    }

    /// The storage under this engine.
    pub fn storage(&self) -> &S {
        &self.inner.storage
    }

    /// Run one sweep now: session timeouts, expired leases (and their DLQ
    /// moves), retention. The background sweeper does this every 50 ms.
    pub async fn sweep(&self) -> Result<()> {
        self.inner.sweep(true).await
    }
}

impl<S: LogStorage> Inner<S> {
    fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::new(ErrorKind::Closed, "the broker is closed"));
        }
        Ok(())
    }

    /// Refuse a write on a read-only engine (and on a closed one).
    fn check_writable(&self, what: &str) -> Result<()> {
        self.check_open()?;
        if self.read_only {
            return Err(Error::new(
                ErrorKind::ReadOnly,
                format!("{what}: the broker was opened read-only (read_only=true); open it without read_only to write"),
            ));
        }
        Ok(())
    }

    fn notify(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    fn topic_config(&self, topic: &str) -> Result<TopicConfig> {
        self.state
            .lock()
            .topics
            .get(topic)
            .copied()
            .ok_or_else(|| Error::topic_not_found(topic))
    }

    fn bounds(&self, tp: &TopicPartition) -> Result<PartitionBounds> {
        self.storage.bounds(&tp.topic, tp.partition)
    }

    fn check_partition(&self, topic: &str, partition: u32) -> Result<TopicConfig> {
        validate::topic_name(topic)?;
        let config = self.topic_config(topic)?;
        validate::partition(topic, partition, config.partitions)?;
        Ok(config)
    }
}

#[async_trait]
impl<S: LogStorage> Broker for Engine<S> {
    fn capabilities(&self) -> Capabilities {
        self.inner.caps
    }

    async fn create_topic(&self, name: &str, config: TopicConfig) -> Result<()> {
        self.inner
            .check_writable(&format!("create topic `{name}`"))?;
        self.inner.create_topic(name, config, false).await
    }

    async fn delete_topic(&self, name: &str) -> Result<()> {
        self.inner
            .check_writable(&format!("delete topic `{name}`"))?;
        self.inner.delete_topic(name).await
    }

    async fn list_topics(&self) -> Result<Vec<String>> {
        self.inner.check_open()?;
        Ok(self.inner.state.lock().topics.keys().cloned().collect())
    }

    async fn describe_topic(&self, name: &str) -> Result<TopicDescription> {
        self.inner.check_open()?;
        validate::topic_name(name)?;
        let config = self.inner.topic_config(name)?;
        let now = now_ms();
        let mut partitions = Vec::with_capacity(config.partitions as usize);
        for p in 0..config.partitions {
            if config.retention.is_limited() && !self.inner.read_only {
                self.inner
                    .storage
                    .enforce_retention(name, p, &config.retention, now)
                    .await?;
            }
            let b = self.inner.storage.bounds(name, p)?;
            partitions.push(PartitionDescription {
                partition: p,
                log_start: b.log_start,
                log_end: b.log_end,
                bytes: b.bytes,
            });
        }
        Ok(TopicDescription {
            name: name.to_string(),
            config,
            partitions,
        })
    }

    async fn add_partitions(&self, name: &str, partitions: u32) -> Result<()> {
        self.inner
            .check_writable(&format!("add partitions to topic `{name}`"))?;
        self.inner.add_partitions(name, partitions).await
    }

    async fn producer(&self) -> Result<Arc<dyn Producer>> {
        self.inner.check_writable("a producer")?;
        Ok(Arc::new(EngineProducer {
            inner: self.inner.clone(),
        }))
    }

    async fn consumer(
        &self,
        group: &str,
        topics: &[&str],
        config: GroupConfig,
    ) -> Result<Arc<dyn Consumer>> {
        self.inner
            .check_writable(&format!("join group `{group}`"))?;
        self.inner.join(group, topics, config).await
    }

    async fn alter_group(
        &self,
        group: &str,
        changes: crate::group_settings::GroupChanges,
    ) -> Result<GroupConfig> {
        self.inner
            .check_writable(&format!("alter group `{group}`"))?;
        self.inner.alter_group(group, &changes).await
    }

    async fn list_groups(&self) -> Result<Vec<String>> {
        self.inner.check_open()?;
        Ok(self.inner.state.lock().groups.keys().cloned().collect())
    }

    async fn group_lag(&self, group: &str) -> Result<GroupLag> {
        self.inner.check_open()?;
        self.inner.group_lag(group)
    }

    async fn describe_group(&self, group: &str) -> Result<GroupDescription> {
        self.inner.check_open()?;
        let lag = self.inner.group_lag(group)?;
        let now = now_ms();
        let state = self.inner.state.lock();
        let g = state.groups.get(group).ok_or_else(|| {
            Error::new(
                ErrorKind::GroupNotFound,
                format!("group `{group}` does not exist"),
            )
        })?;
        let members = g
            .members
            .iter()
            .map(|(id, m)| MemberDescription {
                id: id.to_string(),
                topics: m.topics.iter().cloned().collect(),
                assignment: g
                    .owners
                    .iter()
                    .filter(|(_, o)| o.member == *id)
                    .map(|(tp, _)| (tp.topic.clone(), tp.partition))
                    .collect(),
                leases: g.queue.values().map(|t| t.leases_of(*id)).sum(),
                idle_ms: now.saturating_sub(m.last_seen_ms),
            })
            .collect();
        Ok(GroupDescription {
            group: group.to_string(),
            config: Some(g.config.clone()),
            generation: g.generation,
            members,
            // A read-only view has the persisted state only: members live
            // in the owning process.
            members_visible: !self.inner.read_only,
            lag,
        })
    }

    async fn fetch(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
        max: usize,
    ) -> Result<Vec<Message>> {
        self.inner.check_open()?;
        self.inner.check_partition(topic, partition)?;
        let found = self
            .inner
            .storage
            .read(
                topic,
                partition,
                ReadRange::from(offset)
                    .with_max_records(max)
                    .with_max_bytes(MAX_POLL_BYTES),
            )
            .await?;
        Ok(found
            .into_iter()
            .map(|m| Message::from_stored(topic, partition, m, 1, DeliveryToken::default()))
            .collect())
    }

    async fn offset_for_timestamp(
        &self,
        topic: &str,
        partition: u32,
        timestamp: u64,
    ) -> Result<u64> {
        self.inner.check_open()?;
        self.inner.check_partition(topic, partition)?;
        self.inner
            .storage
            .offset_for_timestamp(topic, partition, timestamp)
            .await
    }

    fn idempotency_store(&self) -> Arc<dyn IdempotencyStore> {
        Arc::new(EngineIdempotency {
            inner: self.inner.clone(),
        })
    }

    async fn close(&self) -> Result<()> {
        if self.inner.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        self.inner.notify();
        if !self.inner.read_only {
            self.inner.persist().await?;
        }
        self.inner.storage.close().await
    }

    async fn delete_group(&self, group: &str) -> Result<()> {
        self.inner
            .check_writable(&format!("delete group `{group}`"))?;
        self.inner.delete_group(group).await
    }

    async fn ping(&self) -> Result<()> {
        self.inner.check_open()
    }
}
