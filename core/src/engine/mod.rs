//! The delivery contract over a [`LogStorage`]: what the memory, mmap and
//! RocksDB backends share.
//!
//! [`Engine`] implements [`Broker`] for any storage: validation,
//! partitioning, idempotent produce, consumer groups (sticky assignment,
//! generations, fencing), queue-mode leases, DLQ moves, retention
//! bookkeeping, lag, and the idempotency store. Group state lives in memory
//! under one lock and is persisted through [`LogStorage::put_state`] before
//! the call that changed it returns. The storage never sees a rule.

mod consumer;
mod dedup;
mod group;
mod lease;
mod partitions;
mod storage;

pub use partitions::PartitionMap;
pub use storage::{
    Appended, LogStorage, PartitionBounds, ReadRange, StoredMessage, StoredRecord,
};

use crate::broker::{Broker, Capabilities, Consumer, IdempotencyStore, Producer, TopicPartition};
use crate::config::{BrokerOptions, DeliveryMode, GroupConfig, StartFrom, TopicConfig};
use crate::describe::{GroupLag, PartitionDescription, PartitionLag, TopicDescription};
use crate::dlq::{dead_letter_record, DeadLetter};
use crate::error::{Error, ErrorKind, Result};
use crate::record::{DeliveryToken, Header, Message, Receipt, Record};
use crate::{now_ms, partitioner, validate};
use async_trait::async_trait;
use bytes::Bytes;
use dedup::DedupWindow;
use group::{Group, GroupMeta, Member};
use lease::{LeaseTable, PersistedLeases};
use parking_lot::Mutex;
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

fn key_topic(topic: &str) -> String {
    format!("t/{topic}")
}
fn key_group(group: &str) -> String {
    format!("g/{group}")
}
fn key_commit(group: &str, tp: &TopicPartition) -> String {
    format!("c/{group}/{}/{}", tp.topic, tp.partition)
}
fn key_leases(group: &str, tp: &TopicPartition) -> String {
    format!("q/{group}/{}/{}", tp.topic, tp.partition)
}
fn key_idempotency(key: &str) -> String {
    format!("i/{key}")
}

fn parse_group_tp(rest: &str) -> Option<(String, TopicPartition)> {
    let mut it = rest.splitn(3, '/');
    let group = it.next()?.to_string();
    let topic = it.next()?.to_string();
    let partition = it.next()?.parse().ok()?;
    Some((group, TopicPartition::new(topic, partition)))
}

fn corrupt_state(key: &str, err: impl std::fmt::Display) -> Error {
    Error::new(
        ErrorKind::Corrupt,
        format!("state entry `{key}` cannot be read: {err}"),
    )
}

/// Shared state of an engine, its producers and consumers.
pub(crate) struct Inner<S: LogStorage> {
    storage: S,
    options: BrokerOptions,
    caps: Capabilities,
    state: Mutex<State>,
    dirty: Mutex<BTreeSet<String>>,
    persist_lock: tokio::sync::Mutex<()>,
    admin_lock: tokio::sync::Mutex<()>,
    changed: watch::Sender<u64>,
    dedup: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Option<DedupWindow>>>>>,
    idempotency: Mutex<HashMap<String, u64>>,
    closed: AtomicBool,
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
    pub async fn open(storage: S, options: BrokerOptions) -> Result<Self> {
        let entries = storage.load_state().await?;
        let mut state = State::default();
        let mut idempotency = HashMap::new();
        let mut later = Vec::new();
        let now = now_ms();
        for (key, value) in entries {
            if let Some(topic) = key.strip_prefix("t/") {
                let config: TopicConfig =
                    serde_json::from_slice(&value).map_err(|e| corrupt_state(&key, e))?;
                state.topics.insert(topic.to_string(), config);
            } else if let Some(group) = key.strip_prefix("g/") {
                let meta: GroupMeta =
                    serde_json::from_slice(&value).map_err(|e| corrupt_state(&key, e))?;
                let mut g = Group::new(group, meta.config);
                g.topics = meta.topics;
                state.groups.insert(group.to_string(), g);
            } else if let Some(k) = key.strip_prefix("i/") {
                let expires: u64 = std::str::from_utf8(&value)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| corrupt_state(&key, "not a number"))?;
                if expires > now {
                    idempotency.insert(k.to_string(), expires);
                }
            } else {
                later.push((key, value));
            }
        }
        for (key, value) in later {
            let (kind, rest) = key.split_at(2);
            let (group, tp) =
                parse_group_tp(rest).ok_or_else(|| corrupt_state(&key, "malformed key"))?;
            let Some(g) = state.groups.get_mut(&group) else {
                continue;
            };
            match kind {
                "c/" => {
                    let offset: u64 = std::str::from_utf8(&value)
                        .ok()
                        .and_then(|s| s.parse().ok())
                        .ok_or_else(|| corrupt_state(&key, "not an offset"))?;
                    g.stream.entry(tp).or_default().committed = Some(offset);
                }
                "q/" => {
                    let p: PersistedLeases =
                        serde_json::from_slice(&value).map_err(|e| corrupt_state(&key, e))?;
                    g.queue.insert(tp, LeaseTable::restore(p));
                }
                _ => return Err(corrupt_state(&key, "unknown key kind")),
            }
        }
        for (topic, config) in &state.topics {
            storage.ensure_partitions(topic, config.partitions).await?;
        }
        Ok(Self::from_parts(storage, options, state, idempotency))
    }

    /// An engine over a storage known to be empty (no state to load), for
    /// synchronous construction of in-memory brokers.
    pub fn fresh(storage: S, options: BrokerOptions) -> Self {
        Self::from_parts(storage, options, State::default(), HashMap::new())
    }

    fn from_parts(
        storage: S,
        options: BrokerOptions,
        state: State,
        idempotency: HashMap<String, u64>,
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
        });
        let handle = tokio::runtime::Handle::try_current()
            .ok()
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

async fn sweeper<S: LogStorage>(inner: Weak<Inner<S>>) {
    let mut ticks: u64 = 0;
    loop {
        tokio::time::sleep(SWEEP_EVERY).await;
        let Some(inner) = inner.upgrade() else { return };
        if inner.closed.load(Ordering::Acquire) {
            return;
        }
        ticks += 1;
        if let Err(e) = inner.sweep(ticks.is_multiple_of(20)).await {
            tracing::warn!(error = %e, "sweep failed");
        }
    }
}

impl<S: LogStorage> Inner<S> {
    fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::new(ErrorKind::Closed, "the broker is closed"));
        }
        Ok(())
    }

    fn notify(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    fn mark_dirty(&self, keys: impl IntoIterator<Item = String>) {
        if self.caps.persistent {
            self.dirty.lock().extend(keys);
        }
    }

    fn value_for(&self, state: &State, key: &str) -> Option<Bytes> {
        let json = |v: serde_json::Result<Vec<u8>>| v.ok().map(Bytes::from);
        if let Some(topic) = key.strip_prefix("t/") {
            return state
                .topics
                .get(topic)
                .and_then(|c| json(serde_json::to_vec(c)));
        }
        if let Some(group) = key.strip_prefix("g/") {
            return state
                .groups
                .get(group)
                .and_then(|g| json(serde_json::to_vec(&g.meta())));
        }
        if let Some(k) = key.strip_prefix("i/") {
            return self
                .idempotency
                .lock()
                .get(k)
                .map(|e| Bytes::from(e.to_string()));
        }
        let (kind, rest) = key.split_at(2);
        let (group, tp) = parse_group_tp(rest)?;
        if !state.topics.contains_key(&tp.topic) {
            return None;
        }
        let g = state.groups.get(&group)?;
        match kind {
            "c/" => g
                .stream
                .get(&tp)
                .and_then(|p| p.committed)
                .map(|o| Bytes::from(o.to_string())),
            "q/" => g
                .queue
                .get(&tp)
                .and_then(|t| json(serde_json::to_vec(&t.persisted()))),
            _ => None,
        }
    }

    /// Write every dirty state key, in its current value, before returning.
    async fn persist(&self) -> Result<()> {
        if !self.caps.persistent {
            return Ok(());
        }
        let _guard = self.persist_lock.lock().await;
        let keys = std::mem::take(&mut *self.dirty.lock());
        if keys.is_empty() {
            return Ok(());
        }
        let changes: Vec<(String, Option<Bytes>)> = {
            let state = self.state.lock();
            keys.iter()
                .map(|k| (k.clone(), self.value_for(&state, k)))
                .collect()
        };
        if let Err(e) = self.storage.put_state(changes).await {
            self.dirty.lock().extend(keys);
            return Err(e);
        }
        Ok(())
    }

    fn topic_config(&self, topic: &str) -> Result<TopicConfig> {
        self.state
            .lock()
            .topics
            .get(topic)
            .copied()
            .ok_or_else(|| Error::topic_not_found(topic))
    }

    /// The topic's config, creating it if auto-create is on.
    async fn topic_or_create(&self, topic: &str) -> Result<TopicConfig> {
        validate::topic_name(topic)?;
        match self.topic_config(topic) {
            Err(e) if e.kind() == ErrorKind::TopicNotFound && self.options.auto_create_topics => {
                self.ensure_topic(topic, TopicConfig::default()).await
            }
            other => other,
        }
    }

    /// Create the topic if missing; return its config either way.
    async fn ensure_topic(&self, topic: &str, config: TopicConfig) -> Result<TopicConfig> {
        match self.create_topic(topic, config, true).await {
            Ok(()) => self.topic_config(topic),
            Err(e) => Err(e),
        }
    }

    async fn create_topic(&self, name: &str, config: TopicConfig, lenient: bool) -> Result<()> {
        self.check_open()?;
        validate::topic_name(name)?;
        validate::topic_config(name, &config)?;
        let _admin = self.admin_lock.lock().await;
        if let Some(existing) = self.state.lock().topics.get(name) {
            if *existing == config || lenient {
                return Ok(());
            }
            return Err(Error::new(
                ErrorKind::TopicExists,
                format!(
                    "topic `{name}` exists with another config ({} partitions, asked for {})",
                    existing.partitions, config.partitions
                ),
            ));
        }
        self.storage
            .ensure_partitions(name, config.partitions)
            .await?;
        self.state.lock().topics.insert(name.to_string(), config);
        self.dedup.lock().remove(name);
        self.mark_dirty([key_topic(name)]);
        self.persist().await?;
        tracing::debug!(
            topic = name,
            partitions = config.partitions,
            "topic created"
        );
        Ok(())
    }

    async fn delete_topic(&self, name: &str) -> Result<()> {
        self.check_open()?;
        validate::topic_name(name)?;
        let _admin = self.admin_lock.lock().await;
        let mut dirty = vec![key_topic(name)];
        {
            let mut state = self.state.lock();
            let config = state
                .topics
                .remove(name)
                .ok_or_else(|| Error::topic_not_found(name))?;
            let groups: Vec<String> = state.groups.keys().cloned().collect();
            for gname in groups {
                let g = state.groups.get_mut(&gname).expect("listed");
                let had = g.topics.remove(name);
                for p in 0..config.partitions {
                    let tp = TopicPartition::new(name, p);
                    g.stream.remove(&tp);
                    g.queue.remove(&tp);
                    g.owners.remove(&tp);
                    dirty.push(key_commit(&gname, &tp));
                    dirty.push(key_leases(&gname, &tp));
                }
                if had {
                    dirty.push(key_group(&gname));
                    state.rebalance(&gname);
                }
            }
        }
        self.dedup.lock().remove(name);
        self.mark_dirty(dirty);
        self.persist().await?;
        self.storage.drop_topic(name).await?;
        self.notify();
        Ok(())
    }

    async fn add_partitions(&self, name: &str, partitions: u32) -> Result<()> {
        self.check_open()?;
        validate::topic_name(name)?;
        validate::partition_count(name, partitions)?;
        let _admin = self.admin_lock.lock().await;
        let current = self.topic_config(name)?;
        if partitions < current.partitions {
            return Err(Error::invalid(format!(
                "topic `{name}`: partitions can only grow ({} now, asked for {partitions})",
                current.partitions
            )));
        }
        if partitions == current.partitions {
            return Ok(());
        }
        self.storage.ensure_partitions(name, partitions).await?;
        let mut dirty = vec![key_topic(name)];
        {
            let mut state = self.state.lock();
            if let Some(c) = state.topics.get_mut(name) {
                c.partitions = partitions;
            }
            let groups: Vec<String> = state
                .groups
                .iter()
                .filter(|(_, g)| g.members.values().any(|m| m.topics.contains(name)))
                .map(|(n, _)| n.clone())
                .collect();
            for g in groups {
                state.rebalance(&g);
                dirty.push(key_group(&g));
            }
        }
        self.mark_dirty(dirty);
        self.persist().await?;
        self.notify();
        Ok(())
    }

    fn bounds(&self, tp: &TopicPartition) -> Result<PartitionBounds> {
        self.storage.bounds(&tp.topic, tp.partition)
    }

    /// Append to one partition, then wake pollers and apply retention.
    async fn append(
        &self,
        topic: &str,
        partition: u32,
        records: Vec<StoredRecord>,
        config: &TopicConfig,
    ) -> Result<Appended> {
        let appended = self.storage.append(topic, partition, records).await?;
        self.notify();
        if config.retention.is_limited() {
            self.storage
                .enforce_retention(topic, partition, &config.retention, now_ms())
                .await?;
        }
        Ok(appended)
    }

    /// Partitions for a batch: explicit, else Kafka's partitioner on the
    /// key, else round robin (the counter is taken once per batch).
    fn pick_partitions(&self, topic: &str, records: &[Record], partitions: u32) -> Vec<u32> {
        let unkeyed = records
            .iter()
            .filter(|r| r.partition.is_none() && r.key.is_none())
            .count() as u32;
        let mut next = if unkeyed > 0 {
            let mut state = self.state.lock();
            let counter = state.round_robin.entry(topic.to_string()).or_insert(0);
            let first = *counter;
            *counter = counter.wrapping_add(unkeyed);
            first
        } else {
            0
        };
        records
            .iter()
            .map(|r| match (r.partition, &r.key) {
                (Some(p), _) => p,
                (None, Some(key)) => partitioner::partition_for_key(key, partitions),
                (None, None) => {
                    let p = next % partitions;
                    next = next.wrapping_add(1);
                    p
                }
            })
            .collect()
    }

    fn pick_partition(&self, topic: &str, record: &Record, partitions: u32) -> u32 {
        if let Some(p) = record.partition {
            return p;
        }
        if let Some(key) = &record.key {
            return partitioner::partition_for_key(key, partitions);
        }
        let mut state = self.state.lock();
        let counter = state.round_robin.entry(topic.to_string()).or_insert(0);
        let p = *counter % partitions;
        *counter = counter.wrapping_add(1);
        p
    }

    async fn send_batch(&self, topic: &str, records: Vec<Record>) -> Result<Vec<Receipt>> {
        self.check_open()?;
        let config = self.topic_or_create(topic).await?;
        for record in &records {
            crate::dlq::validate_record(
                topic,
                record,
                config.partitions,
                config.max_message_bytes,
            )?;
        }
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let targets = self.pick_partitions(topic, &records, config.partitions);
        if records.iter().all(|r| r.idempotency_key.is_none()) {
            let keep = vec![true; records.len()];
            return self
                .append_by_partition(topic, &config, records, &targets, &keep)
                .await
                .map(|r| r.into_iter().map(|x| x.expect("all appended")).collect());
        }

        // Idempotent produce: check, append and remember under the topic's
        // dedup lock, so concurrent duplicates append exactly once.
        let window = self
            .dedup
            .lock()
            .entry(topic.to_string())
            .or_default()
            .clone();
        let mut guard = window.lock().await;
        let now = now_ms();
        if guard.is_none() {
            let mut w = DedupWindow::default();
            let since = now.saturating_sub(millis(config.dedup_window));
            for (key, receipt) in self.storage.idempotency_keys_since(topic, since).await? {
                let expires = receipt
                    .timestamp
                    .saturating_add(millis(config.dedup_window));
                w.insert(key, receipt, expires);
            }
            *guard = Some(w);
        }
        let w = guard.as_mut().expect("loaded");
        w.prune(now);
        let mut first_of: HashMap<&str, usize> = HashMap::new();
        let mut known: Vec<Option<Receipt>> = vec![None; records.len()];
        let mut same_as: Vec<Option<usize>> = vec![None; records.len()];
        for (i, r) in records.iter().enumerate() {
            if let Some(k) = r.idempotency_key.as_deref() {
                if let Some(receipt) = w.get(k, now) {
                    known[i] = Some(receipt);
                } else if let Some(&j) = first_of.get(k) {
                    same_as[i] = Some(j);
                } else {
                    first_of.insert(k, i);
                }
            }
        }
        let keep: Vec<bool> = (0..records.len())
            .map(|i| known[i].is_none() && same_as[i].is_none())
            .collect();
        let keys: Vec<Option<String>> = records.iter().map(|r| r.idempotency_key.clone()).collect();
        let appended = self
            .append_by_partition(topic, &config, records, &targets, &keep)
            .await?;
        let expires_in = millis(config.dedup_window);
        let mut receipts = Vec::with_capacity(keep.len());
        for i in 0..keep.len() {
            let receipt = match (known[i], same_as[i]) {
                (Some(r), _) => r,
                (None, Some(j)) => appended[j].expect("first occurrence appended"),
                (None, None) => {
                    let r = appended[i].expect("appended");
                    if let Some(k) = &keys[i] {
                        w.insert(k.clone(), r, r.timestamp.saturating_add(expires_in));
                    }
                    r
                }
            };
            receipts.push(receipt);
        }
        Ok(receipts)
    }

    /// Append the kept records, grouped by partition (each group atomic, in
    /// input order); receipts by input index.
    async fn append_by_partition(
        &self,
        topic: &str,
        config: &TopicConfig,
        records: Vec<Record>,
        targets: &[u32],
        keep: &[bool],
    ) -> Result<Vec<Option<Receipt>>> {
        let stored = |r: Record| StoredRecord {
            key: r.key,
            value: r.value,
            headers: r.headers,
            idempotency_key: r.idempotency_key,
            deliver_at: None,
        };
        // One partition (explicit, single-partition topic, one key): no grouping.
        if keep.iter().all(|k| *k) && targets.windows(2).all(|w| w[0] == w[1]) {
            let partition = targets[0];
            let n = records.len();
            let recs = records.into_iter().map(stored).collect();
            let a = self.append(topic, partition, recs, config).await?;
            return Ok((0..n)
                .map(|i| {
                    Some(Receipt {
                        partition,
                        offset: a.base_offset + i as u64,
                        timestamp: a.timestamp,
                    })
                })
                .collect());
        }
        let mut by_partition: BTreeMap<u32, (Vec<usize>, Vec<StoredRecord>)> = BTreeMap::new();
        for (i, r) in records.into_iter().enumerate() {
            if !keep[i] {
                continue;
            }
            let entry = by_partition.entry(targets[i]).or_default();
            entry.0.push(i);
            entry.1.push(stored(r));
        }
        let appends = by_partition.into_iter().map(|(p, (idx, recs))| async move {
            let a = self.append(topic, p, recs, config).await?;
            Ok::<_, Error>((p, idx, a))
        });
        let done = futures::future::try_join_all(appends).await?;
        let mut receipts = vec![None; keep.len()];
        for (partition, idx, a) in done {
            for (n, i) in idx.into_iter().enumerate() {
                receipts[i] = Some(Receipt {
                    partition,
                    offset: a.base_offset + n as u64,
                    timestamp: a.timestamp,
                });
            }
        }
        Ok(receipts)
    }

    /// Append a dead letter to the group's DLQ topic (created on demand).
    async fn append_dead_letter(
        &self,
        group: &str,
        config: &GroupConfig,
        data: (Option<Bytes>, Bytes, Vec<Header>),
        dead: DeadLetter<'_>,
    ) -> Result<()> {
        let dlq = config.dlq.topic_for(dead.topic, group);
        let dlq_config = self.ensure_topic(&dlq, TopicConfig::new(1)).await?;
        let record = dead_letter_record(data.0, data.1, &data.2, &dead);
        let partition = self.pick_partition(&dlq, &record, dlq_config.partitions);
        let stored = StoredRecord {
            key: record.key,
            value: record.value,
            headers: record.headers,
            idempotency_key: None,
            deliver_at: None,
        };
        self.append(&dlq, partition, vec![stored], &dlq_config)
            .await?;
        tracing::info!(group, topic = dead.topic, partition = dead.partition, offset = dead.offset, attempts = dead.attempts, dlq = %dlq, "dead-lettered");
        Ok(())
    }

    /// Move queue-mode messages whose last lease expired to the DLQ, then
    /// settle them. A failure leaves them to be tried again.
    async fn dead_letter_expired(
        &self,
        group: &str,
        jobs: Vec<(TopicPartition, lease::Expired)>,
    ) -> Result<()> {
        let mut first_err = None;
        for (tp, job) in jobs {
            let result = self.dead_letter_one_expired(group, &tp, job).await;
            let mut state = self.state.lock();
            if let Some(table) = state
                .groups
                .get_mut(group)
                .and_then(|g| g.queue.get_mut(&tp))
            {
                match &result {
                    Ok(()) => table.settle(job.offset),
                    Err(_) => table.abort_dead_letter(job.offset),
                }
            }
            drop(state);
            self.mark_dirty([key_leases(group, &tp)]);
            if let Err(e) = result {
                tracing::warn!(group, %tp, offset = job.offset, error = %e, "dead-letter move failed; will retry");
                first_err.get_or_insert(e);
            }
        }
        self.persist().await?;
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    async fn dead_letter_one_expired(
        &self,
        group: &str,
        tp: &TopicPartition,
        job: lease::Expired,
    ) -> Result<()> {
        let config = match self.state.lock().groups.get(group) {
            Some(g) => g.config.clone(),
            None => return Ok(()),
        };
        let found = self
            .storage
            .read(
                &tp.topic,
                tp.partition,
                ReadRange::from(job.offset).with_max_records(1).with_max_bytes(1),
            )
            .await?;
        let Some(m) = found.into_iter().find(|m| m.offset == job.offset) else {
            return Ok(()); // removed by retention meanwhile
        };
        let dead = DeadLetter {
            topic: &tp.topic,
            partition: tp.partition,
            offset: job.offset,
            group,
            attempts: job.attempts,
            error: Some("visibility timeout expired"),
            failed_at: now_ms(),
        };
        self.append_dead_letter(group, &config, (m.key, m.value, m.headers), dead)
            .await
    }

    /// Session timeouts, expired leases, and (with `retention`) retention.
    async fn sweep(&self, retention: bool) -> Result<()> {
        self.check_open()?;
        let now = now_ms();
        let mut jobs: Vec<(String, Vec<(TopicPartition, lease::Expired)>)> = Vec::new();
        let mut rebalanced = false;
        {
            let mut guard = self.state.lock();
            let state = &mut *guard;
            let names: Vec<String> = state.groups.keys().cloned().collect();
            for name in names {
                let gone = state
                    .groups
                    .get_mut(&name)
                    .expect("listed")
                    .expire_members(now);
                if !gone.is_empty() {
                    tracing::debug!(group = %name, members = ?gone, "session timeout");
                    state.rebalance(&name);
                    rebalanced = true;
                }
                let g = state.groups.get_mut(&name).expect("listed");
                if g.mode() != DeliveryMode::Queue {
                    continue;
                }
                let max = g.config.dlq.max_deliveries;
                let mut group_jobs = Vec::new();
                for (tp, table) in g.queue.iter_mut() {
                    if table.inflight.values().any(|l| l.deadline_ms <= now) {
                        rebalanced = true; // something became available
                        for e in table.expire(now, max) {
                            group_jobs.push((tp.clone(), e));
                        }
                    }
                }
                if !group_jobs.is_empty() {
                    jobs.push((name, group_jobs));
                }
            }
        }
        if rebalanced {
            self.notify();
        }
        for (group, group_jobs) in jobs {
            self.dead_letter_expired(&group, group_jobs).await?;
        }
        if retention {
            let topics: Vec<(String, TopicConfig)> = self
                .state
                .lock()
                .topics
                .iter()
                .filter(|(_, c)| c.retention.is_limited())
                .map(|(n, c)| (n.clone(), *c))
                .collect();
            for (topic, config) in topics {
                for p in 0..config.partitions {
                    self.storage
                        .enforce_retention(&topic, p, &config.retention, now)
                        .await?;
                }
            }
        }
        Ok(())
    }

    fn message(
        tp: &TopicPartition,
        m: StoredMessage,
        attempt: u32,
        token: DeliveryToken,
    ) -> Message {
        Message::new(
            tp.topic.clone(),
            tp.partition,
            m.offset,
            m.key,
            m.value,
            m.headers,
            m.timestamp,
            attempt,
            token,
        )
    }

    async fn join(
        self: &Arc<Self>,
        group: &str,
        topics: &[&str],
        config: GroupConfig,
    ) -> Result<Arc<dyn Consumer>> {
        self.check_open()?;
        validate::group_name(group)?;
        validate::group_config(group, &config)?;
        if topics.is_empty() {
            return Err(Error::invalid(format!(
                "group `{group}`: a consumer needs at least one topic"
            )));
        }
        let mut names = BTreeSet::new();
        for t in topics {
            self.topic_or_create(t).await?;
            names.insert(t.to_string());
        }
        let now = now_ms();
        let mut dirty = vec![key_group(group)];
        let member = {
            let mut guard = self.state.lock();
            let state = &mut *guard;
            // A topic may have been deleted since the check.
            if let Some(t) = names.iter().find(|t| !state.topics.contains_key(*t)) {
                return Err(Error::topic_not_found(t));
            }
            let g = state
                .groups
                .entry(group.to_string())
                .or_insert_with(|| Group::new(group, config.clone()));
            if g.config.mode != config.mode {
                return Err(Error::new(
                    ErrorKind::GroupModeMismatch,
                    format!(
                        "group `{group}` is a {:?}-mode group; cannot join it in {:?} mode",
                        g.config.mode, config.mode
                    ),
                ));
            }
            // The latest member's settings apply; mode and start stay.
            let start = g.config.start;
            g.config = config.clone();
            g.config.start = start;
            // A topic new to the group starts where the group's `start` says.
            let new_topics: Vec<String> = names.difference(&g.topics).cloned().collect();
            for t in &new_topics {
                g.topics.insert(t.clone());
                for p in 0..state.topics[t].partitions {
                    let tp = TopicPartition::new(t.clone(), p);
                    let b = self.bounds(&tp)?;
                    let at = match start {
                        StartFrom::Latest => b.log_end,
                        StartFrom::Earliest => b.log_start,
                    };
                    match g.mode() {
                        DeliveryMode::Stream => {
                            if start == StartFrom::Latest {
                                g.stream.entry(tp.clone()).or_default().committed = Some(at);
                                dirty.push(key_commit(group, &tp));
                            }
                        }
                        DeliveryMode::Queue => {
                            g.queue
                                .entry(tp.clone())
                                .or_insert_with(|| LeaseTable::starting_at(at));
                            dirty.push(key_leases(group, &tp));
                        }
                    }
                }
            }
            let id = state.next_member;
            state.next_member += 1;
            let g = state.groups.get_mut(group).expect("inserted");
            g.members.insert(
                id,
                Member {
                    topics: names.clone(),
                    last_seen_ms: now,
                },
            );
            state.rebalance(group);
            id
        };
        self.mark_dirty(dirty);
        self.persist().await?;
        self.notify();
        tracing::debug!(group, member, ?topics, mode = ?config.mode, "member joined");
        Ok(Arc::new(consumer::EngineConsumer::new(
            self.clone(),
            group,
            member,
            names,
            config.mode,
        )))
    }

    fn group_lag(&self, group: &str) -> Result<GroupLag> {
        validate::group_name(group)?;
        let now = now_ms();
        let mut guard = self.state.lock();
        let state = &mut *guard;
        let g = state.groups.get_mut(group).ok_or_else(|| {
            Error::new(
                ErrorKind::GroupNotFound,
                format!("group `{group}` does not exist"),
            )
        })?;
        let mut partitions = Vec::new();
        for topic in g.topics.clone() {
            let Some(config) = state.topics.get(&topic) else {
                continue;
            };
            for p in 0..config.partitions {
                let tp = TopicPartition::new(topic.clone(), p);
                let b = self.storage.bounds(&tp.topic, tp.partition)?;
                let lag = match g.mode() {
                    DeliveryMode::Stream => {
                        let committed = g
                            .stream
                            .get(&tp)
                            .and_then(|s| s.committed)
                            .unwrap_or(b.log_start)
                            .clamp(b.log_start, b.log_end.max(b.log_start));
                        PartitionLag {
                            topic: tp.topic.clone(),
                            partition: p,
                            committed,
                            log_end: b.log_end,
                            lag: b.log_end.saturating_sub(committed),
                            in_flight: 0,
                            available: 0,
                        }
                    }
                    DeliveryMode::Queue => {
                        let table = g
                            .queue
                            .entry(tp.clone())
                            .or_insert_with(|| LeaseTable::starting_at(b.log_start));
                        table.normalize(b.log_start, b.log_end);
                        let (lag, in_flight, available) = table.lag(b.log_end, now);
                        PartitionLag {
                            topic: tp.topic.clone(),
                            partition: p,
                            committed: table.floor,
                            log_end: b.log_end,
                            lag,
                            in_flight,
                            available,
                        }
                    }
                };
                partitions.push(lag);
            }
        }
        Ok(GroupLag {
            group: group.to_string(),
            mode: g.mode(),
            partitions,
        })
    }

    fn check_partition(&self, topic: &str, partition: u32) -> Result<TopicConfig> {
        validate::topic_name(topic)?;
        let config = self.topic_config(topic)?;
        validate::partition(topic, partition, config.partitions)?;
        Ok(config)
    }

    async fn first_seen(&self, key: &str, ttl: Duration) -> Result<bool> {
        self.check_open()?;
        if key.is_empty() {
            return Err(Error::invalid("idempotency key must not be empty"));
        }
        if ttl.is_zero() {
            return Err(Error::invalid(format!(
                "idempotency key `{key}`: ttl must be above zero"
            )));
        }
        let now = now_ms();
        let fresh = {
            let mut map = self.idempotency.lock();
            if map.len() > 4096 && map.len().is_power_of_two() {
                map.retain(|_, exp| *exp > now);
            }
            match map.get(key) {
                Some(exp) if *exp > now => false,
                _ => {
                    map.insert(key.to_string(), now.saturating_add(millis(ttl)));
                    true
                }
            }
        };
        if fresh {
            self.mark_dirty([key_idempotency(key)]);
            self.persist().await?;
        }
        Ok(fresh)
    }

    async fn forget(&self, key: &str) -> Result<()> {
        self.check_open()?;
        self.idempotency.lock().remove(key);
        self.mark_dirty([key_idempotency(key)]);
        self.persist().await
    }
}

/// A producer of an [`Engine`].
struct EngineProducer<S: LogStorage> {
    inner: Arc<Inner<S>>,
}

#[async_trait]
impl<S: LogStorage> Producer for EngineProducer<S> {
    async fn send_batch(&self, topic: &str, records: Vec<Record>) -> Result<Vec<Receipt>> {
        self.inner.send_batch(topic, records).await
    }

    async fn flush(&self) -> Result<()> {
        self.inner.check_open()?;
        self.inner.storage.flush().await
    }
}

/// The idempotency store of an [`Engine`]: a local table, persisted with
/// the group state.
struct EngineIdempotency<S: LogStorage> {
    inner: Arc<Inner<S>>,
}

#[async_trait]
impl<S: LogStorage> IdempotencyStore for EngineIdempotency<S> {
    async fn first_seen(&self, key: &str, ttl: Duration) -> Result<bool> {
        self.inner.first_seen(key, ttl).await
    }

    async fn forget(&self, key: &str) -> Result<()> {
        self.inner.forget(key).await
    }
}

#[async_trait]
impl<S: LogStorage> Broker for Engine<S> {
    fn capabilities(&self) -> Capabilities {
        self.inner.caps
    }

    async fn create_topic(&self, name: &str, config: TopicConfig) -> Result<()> {
        self.inner.create_topic(name, config, false).await
    }

    async fn delete_topic(&self, name: &str) -> Result<()> {
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
            if config.retention.is_limited() {
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
        self.inner.add_partitions(name, partitions).await
    }

    async fn producer(&self) -> Result<Arc<dyn Producer>> {
        self.inner.check_open()?;
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
        self.inner.join(group, topics, config).await
    }

    async fn list_groups(&self) -> Result<Vec<String>> {
        self.inner.check_open()?;
        Ok(self.inner.state.lock().groups.keys().cloned().collect())
    }

    async fn group_lag(&self, group: &str) -> Result<GroupLag> {
        self.inner.check_open()?;
        self.inner.group_lag(group)
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
        let tp = TopicPartition::new(topic, partition);
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
            .map(|m| Inner::<S>::message(&tp, m, 1, DeliveryToken::default()))
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
        self.inner.persist().await?;
        self.inner.storage.close().await
    }
}
