//! A member of a consumer group on the embedded engine.
//!
//! Turns `poll`, `ack`, `nack`, `extend`, `commit` and `seek` into changes
//! of the group state (under the engine lock, never held across `.await`),
//! reads records from storage outside the lock, and persists before
//! returning.

use super::group::{Group, Member, Retry};
use super::lease::{Lease, LeaseTable};
use super::{millis, persist, Inner, LogStorage, ReadRange, StateKey, MAX_POLL_BYTES};
use crate::broker::{
    BatchAck, Consumer, NackOptions, NackOutcome, TopicPartition, MAX_REDELIVERY_DELAY,
};
use crate::config::{DeliveryMode, GroupConfig, SeekTo};
use crate::dlq::{self, DeadLetter};
use crate::error::{Error, ErrorKind, Result};
use crate::now_ms;
use crate::record::{DeliveryToken, Message};
use async_trait::async_trait;
use bytes::Bytes;
use std::collections::BTreeSet;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub(crate) struct EngineConsumer<S: LogStorage> {
    inner: Arc<Inner<S>>,
    group: Arc<str>,
    member: u64,
    topics: BTreeSet<String>,
    mode: DeliveryMode,
    rotate: AtomicUsize,
    closed: AtomicBool,
}

/// Leases taken by a queue-mode poll that has not returned yet: (partition,
/// offset, lease id, attempts before). Dropped while not empty (the poll
/// failed or its future was dropped), it gives them back, so a dropped
/// poll leaves no lease held and no attempt raised.
struct Taken<'a, S: LogStorage> {
    inner: &'a Inner<S>,
    group: &'a str,
    leases: Vec<(TopicPartition, u64, u64, u32)>,
}

impl<S: LogStorage> Drop for Taken<'_, S> {
    fn drop(&mut self) {
        if self.leases.is_empty() {
            return;
        }
        let mut dirty = Vec::new();
        {
            let mut state = self.inner.state.lock();
            if let Some(g) = state.groups.get_mut(self.group) {
                for (tp, offset, lease, before) in self.leases.drain(..) {
                    if let Some(t) = g.queue.get_mut(&tp) {
                        t.unlease(offset, lease, before);
                        dirty.extend(persist::lease_keys(self.group, &tp, t));
                    }
                }
            }
        }
        self.inner.mark_dirty(dirty);
        self.inner.notify();
    }
}

/// Sorted offsets as contiguous ranges, one storage read each.
fn contiguous_runs(offsets: &[u64]) -> Vec<Range<u64>> {
    let mut sorted = offsets.to_vec();
    sorted.sort_unstable();
    let mut runs: Vec<Range<u64>> = Vec::new();
    for o in sorted {
        match runs.last_mut() {
            Some(r) if r.end == o => r.end = o + 1,
            _ => runs.push(o..o + 1),
        }
    }
    runs
}

/// The lease id a queue-mode token carries.
/// An ack checked against everything but the group state.
enum PreparedAck {
    Queue {
        tp: TopicPartition,
        lease: u64,
    },
    Stream {
        tp: TopicPartition,
        next: u64,
        generation: u64,
    },
}

impl PreparedAck {
    fn topic_partition(&self) -> &TopicPartition {
        match self {
            PreparedAck::Queue { tp, .. } | PreparedAck::Stream { tp, .. } => tp,
        }
    }
}

fn lease_id(token: &DeliveryToken, what: &str) -> Result<u64> {
    lease_of(token)
        .ok_or_else(|| Error::invalid(format!("{what}: the message carries no queue-mode lease")))
}

/// The lease id a queue-mode delivery carries (no error text to build on
/// the hot path).
fn lease_of(token: &DeliveryToken) -> Option<u64> {
    <[u8; 8]>::try_from(token.lease().as_ref())
        .ok()
        .map(u64::from_le_bytes)
}

impl<S: LogStorage> EngineConsumer<S> {
    pub fn new(
        inner: Arc<Inner<S>>,
        group: &str,
        member: u64,
        topics: BTreeSet<String>,
        mode: DeliveryMode,
    ) -> Self {
        EngineConsumer {
            inner,
            group: Arc::from(group),
            member,
            topics,
            mode,
            rotate: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
        }
    }

    fn check_open(&self) -> Result<()> {
        self.inner.check_open()?;
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::new(
                ErrorKind::Closed,
                format!("consumer of group `{}` is closed", self.group),
            ));
        }
        Ok(())
    }

    fn group(&self) -> &str {
        &self.group
    }

    fn vanished(&self) -> Error {
        Error::new(
            ErrorKind::GroupNotFound,
            format!(
                "group `{}` was deleted while this member was gone: join it again",
                self.group
            ),
        )
    }

    fn what(&self, m: &Message) -> String {
        format!("group `{}`: {}", self.group, m.position())
    }

    /// Heartbeat; with `rejoin`, a member removed by a session timeout joins
    /// again (as a new generation). Also expires silent members.
    fn heartbeat(&self, state: &mut super::State, rejoin: bool) -> bool {
        let now = now_ms();
        let Some(g) = state.groups.get_mut(self.group()) else {
            return false;
        };
        let mut changed = !g.expire_members(now).is_empty();
        match g.members.get_mut(&self.member) {
            Some(m) => m.last_seen_ms = now,
            None if rejoin => {
                g.members.insert(
                    self.member,
                    Member {
                        topics: self.topics.clone(),
                        last_seen_ms: now,
                    },
                );
                changed = true;
            }
            None => {}
        }
        if changed {
            state.rebalance(self.group());
        }
        changed
    }

    /// Heartbeat, then this member's group in the locked state.
    fn member_group<'a>(&self, state: &'a mut super::State, rejoin: bool) -> Result<&'a mut Group> {
        self.heartbeat(state, rejoin);
        state
            .groups
            .get_mut(self.group())
            .ok_or_else(|| self.vanished())
    }

    fn rotated<T: Clone>(&self, items: &[T]) -> Vec<T> {
        if items.is_empty() {
            return Vec::new();
        }
        let start = self.rotate.fetch_add(1, Ordering::Relaxed) % items.len();
        items[start..]
            .iter()
            .chain(&items[..start])
            .cloned()
            .collect()
    }

    /// One stream-mode attempt: read from owned partitions at their
    /// positions. Returns messages and the earliest time a paused
    /// partition resumes (now, if records addressed to other groups were
    /// passed and the caller should look again at once).
    ///
    /// Cancel safe: every read happens first; positions move only after
    /// the last one, under the lock, with no `.await` between that and
    /// returning.
    async fn poll_stream(&self, max: usize) -> Result<(Vec<Message>, Option<u64>)> {
        let now = now_ms();
        let mut next_due: Option<u64> = None;
        let (plan, changed) = {
            let mut guard = self.inner.state.lock();
            let changed = self.heartbeat(&mut guard, true);
            let g = guard
                .groups
                .get_mut(self.group())
                .ok_or_else(|| self.vanished())?;
            let owned = g.owned_by(self.member);
            let mut plan = Vec::new();
            for (tp, owner) in self.rotated(&owned) {
                let Ok(b) = self.inner.bounds(&tp) else {
                    continue;
                };
                let part = g.stream.entry(tp.clone()).or_default();
                let pos = part
                    .position
                    .unwrap_or_else(|| part.committed.unwrap_or(b.log_start))
                    .max(b.log_start);
                part.position = Some(pos);
                if let Some(r) = part.retries.get(&pos) {
                    if r.not_before_ms > now {
                        next_due = Some(min_due(next_due, r.not_before_ms));
                        continue;
                    }
                }
                if pos < b.log_end {
                    plan.push((tp, pos, owner.generation, b.log_start));
                }
            }
            (plan, changed)
        };
        if changed {
            self.inner.notify();
        }
        let mut reads = Vec::with_capacity(plan.len());
        let mut planned = 0usize;
        for (tp, pos, generation, log_start) in plan {
            if planned >= max {
                break;
            }
            let found = self
                .inner
                .storage
                .read(
                    &tp.topic,
                    tp.partition,
                    ReadRange::from(pos)
                        .with_max_records(max - planned)
                        .with_max_bytes(MAX_POLL_BYTES),
                )
                .await?;
            planned += found.len();
            reads.push((tp, pos, generation, log_start, found));
        }
        let mut out = Vec::with_capacity(planned);
        let mut commits = Vec::new();
        {
            let mut guard = self.inner.state.lock();
            let Some(g) = guard.groups.get_mut(self.group()) else {
                return Err(self.vanished());
            };
            for (tp, pos, generation, log_start, found) in reads {
                let Some(last) = found.last().map(|m| m.offset) else {
                    continue;
                };
                if g.check_owner(self.member, &tp, Some(generation)).is_err() {
                    continue;
                }
                let part = g.stream.entry(tp.clone()).or_default();
                if part.position != Some(pos) {
                    continue; // a seek or nack moved it meanwhile
                }
                part.position = Some(last.saturating_add(1));
                let mut passed = false;
                for m in found {
                    if !dlq::is_for_group(&m.headers, self.group()) {
                        // Redriven to another group (contract §5): passed
                        // unseen, and committed over once reached.
                        part.skipped.pass(m.offset);
                        passed = true;
                        continue;
                    }
                    let attempt = part.retries.get(&m.offset).map_or(1, |r| r.attempt);
                    let token = DeliveryToken::stream(self.group.clone(), generation);
                    out.push(Message::from_stored(
                        tp.topic.clone(),
                        tp.partition,
                        m,
                        attempt,
                        token,
                    ));
                }
                if passed {
                    next_due = Some(now); // look again at once
                    let base = part.committed.unwrap_or(log_start);
                    if part.commit_through(base) {
                        commits.push(StateKey::Commit(self.group.to_string(), tp));
                    }
                }
            }
        }
        self.inner.mark_dirty(commits);
        Ok((out, next_due))
    }

    /// One queue-mode attempt, in three steps so that a dropped poll takes
    /// nothing (contract §4: `Consumer::poll` is cancel safe; §4b: leases):
    ///
    /// 1. under the lock, plan: expire leases (DLQ moves run in a task of
    ///    their own, which a dropped poll cannot stop) and list the offsets
    ///    available now, changing nothing else;
    /// 2. without the lock, read those records;
    /// 3. under the lock, lease each record still available (another poll
    ///    may have taken it meanwhile): records addressed to another group
    ///    are settled unseen, records whose delivery time has not come are
    ///    deferred to it, the rest are leased. Then persist; if that fails
    ///    or the future is dropped before it returns, [`Taken`] gives the
    ///    leases back and restores the attempt counts.
    async fn poll_queue(&self, max: usize) -> Result<(Vec<Message>, Option<u64>)> {
        let (plan, mut next_due) = self.plan_queue(max)?;
        let mut runs = Vec::with_capacity(plan.len());
        for (tp, offsets) in plan {
            for run in contiguous_runs(&offsets) {
                let found = self
                    .inner
                    .storage
                    .read(
                        &tp.topic,
                        tp.partition,
                        ReadRange::from(run.start).with_max_records((run.end - run.start) as usize),
                    )
                    .await?;
                runs.push((tp.clone(), found));
            }
        }
        let mut taken = Taken {
            inner: &self.inner,
            group: self.group(),
            leases: Vec::new(),
        };
        let mut out = Vec::with_capacity(runs.iter().map(|(_, found)| found.len()).sum());
        let mut dirty = Vec::new();
        {
            let now = now_ms();
            let mut guard = self.inner.state.lock();
            let state = &mut *guard;
            let Some(g) = state.groups.get_mut(self.group()) else {
                return Err(self.vanished());
            };
            let visibility = millis(g.config.visibility_timeout);
            for (tp, found) in runs {
                let Some(table) = g.queue.get_mut(&tp) else {
                    continue;
                };
                for m in found {
                    if !table.can_lease(m.offset, now) {
                        continue;
                    }
                    if !dlq::is_for_group(&m.headers, self.group()) {
                        table.skip(m.offset); // redriven to another group (contract §5)
                        next_due = Some(now);
                        continue;
                    }
                    if let Some(at) = m.deliver_at.filter(|at| *at > now) {
                        table.defer(m.offset, at); // delayed delivery (contract §3)
                        next_due = Some(min_due(next_due, at));
                        continue;
                    }
                    state.next_lease += 1;
                    let lease = Lease {
                        member: self.member,
                        id: state.next_lease,
                        deadline_ms: now.saturating_add(visibility),
                    };
                    let before = table.attempts_of(m.offset).unwrap_or(0);
                    let attempt = table.lease(m.offset, lease);
                    taken.leases.push((tp.clone(), m.offset, lease.id, before));
                    let token = DeliveryToken::queue(
                        self.group.clone(),
                        Bytes::copy_from_slice(&lease.id.to_le_bytes()),
                    );
                    out.push(Message::from_stored(
                        tp.topic.clone(),
                        tp.partition,
                        m,
                        attempt,
                        token,
                    ));
                }
                dirty.extend(persist::lease_keys(self.group(), &tp, table));
            }
        }
        self.inner.mark_dirty(dirty);
        self.inner.persist().await?;
        taken.leases.clear(); // delivered: the caller has them now
        Ok((out, next_due))
    }

    /// Step 1 of [`poll_queue`](Self::poll_queue): the offsets to read per
    /// partition, and when to look again.
    #[allow(clippy::type_complexity)]
    fn plan_queue(&self, max: usize) -> Result<(Vec<(TopicPartition, Vec<u64>)>, Option<u64>)> {
        let now = now_ms();
        let mut next_due: Option<u64> = None;
        let mut dead_jobs = Vec::new();
        let mut plan = Vec::new();
        let mut planned = 0usize;
        {
            let mut guard = self.inner.state.lock();
            self.heartbeat(&mut guard, true);
            let state = &mut *guard;
            let parts = state.partitions_of(&self.topics);
            let g = state
                .groups
                .get_mut(self.group())
                .ok_or_else(|| self.vanished())?;
            let max_deliveries = g.config.dlq.max_deliveries;
            for tp in self.rotated(&parts) {
                let Ok(b) = self.inner.bounds(&tp) else {
                    continue;
                };
                let table = g
                    .queue
                    .entry(tp.clone())
                    .or_insert_with(|| LeaseTable::starting_at(b.log_start));
                table.normalize(b.log_start, b.log_end);
                for e in table.expire(now, max_deliveries) {
                    dead_jobs.push((tp.clone(), e));
                }
                if planned < max {
                    let offsets = table.available(now, b.log_end, max - planned);
                    planned += offsets.len();
                    if !offsets.is_empty() {
                        plan.push((tp.clone(), offsets));
                    }
                }
                if let Some(due) = table.next_due() {
                    next_due = Some(min_due(next_due, due));
                }
            }
        }
        if !dead_jobs.is_empty() {
            // Their own task: a dropped poll must not strand them half-moved.
            let inner = self.inner.clone();
            let group = self.group.to_string();
            tokio::spawn(async move {
                if let Err(e) = inner.dead_letter_expired(&group, dead_jobs).await {
                    tracing::warn!(group, error = %e, "dead-letter move failed");
                }
            });
        }
        Ok((plan, next_due))
    }

    /// Stream mode: the offset after `m`, which must be below the log end
    /// (a commit past the log end would skip records produced later).
    fn next_offset(&self, m: &Message, tp: &TopicPartition) -> Result<u64> {
        let log_end = self.inner.bounds(tp)?.log_end;
        match m.offset.checked_add(1) {
            Some(next) if next <= log_end => Ok(next),
            _ => Err(Error::invalid(format!(
                "{}: offset {} is at or past the log end ({log_end})",
                self.what(m),
                m.offset
            ))),
        }
    }

    /// The checks of an ack that need no group state: the delivery
    /// belongs to this group, the topic is read here, and (stream mode)
    /// the offset is below the log end.
    /// `last` is the partition of the previous message of a batch, whose
    /// checks need not run again.
    fn prepare_ack(&self, m: &Message, last: Option<&TopicPartition>) -> Result<PreparedAck> {
        let token = m.delivery(self.group())?;
        let tp = match last {
            Some(tp) if tp.partition == m.partition && tp.topic == m.topic => tp.clone(),
            _ => self.subscribed(&m.topic, m.partition)?,
        };
        Ok(match self.mode {
            DeliveryMode::Queue => PreparedAck::Queue {
                lease: match lease_of(token) {
                    Some(lease) => lease,
                    None => lease_id(token, &self.what(m))?,
                },
                tp,
            },
            DeliveryMode::Stream => PreparedAck::Stream {
                next: self.next_offset(m, &tp)?,
                generation: token.generation(),
                tp,
            },
        })
    }

    /// Settle a prepared ack in the locked group; returns the partition
    /// whose state changed ([`Self::changed_keys`] says what to write).
    fn apply_ack(
        &self,
        g: &mut Group,
        m: &Message,
        prepared: PreparedAck,
    ) -> Result<TopicPartition> {
        match prepared {
            PreparedAck::Queue { tp, lease } => {
                let Some(table) = g.queue.get_mut(&tp) else {
                    return Err(Error::new(
                        ErrorKind::LeaseExpired,
                        format!("{}: no lease held", self.what(m)),
                    ));
                };
                if !table.try_ack(m.offset, lease) {
                    return Err(Error::lease_lost(m.offset, &self.what(m)));
                }
                Ok(tp)
            }
            PreparedAck::Stream {
                tp,
                next,
                generation,
            } => {
                g.check_owner(self.member, &tp, Some(generation))?;
                let part = g.stream.entry(tp.clone()).or_default();
                part.commit_through(next);
                let committed = part.committed.unwrap_or(next);
                part.retries = part.retries.split_off(&committed);
                Ok(tp)
            }
        }
    }

    /// The state keys to write for acks applied to `partitions` (each
    /// once, however many acks it took).
    fn changed_keys(&self, g: &mut Group, partitions: BTreeSet<TopicPartition>) -> Vec<StateKey> {
        let mut keys = Vec::new();
        for tp in partitions {
            match self.mode {
                DeliveryMode::Queue => {
                    if let Some(table) = g.queue.get_mut(&tp) {
                        keys.extend(persist::lease_keys(self.group(), &tp, table));
                    }
                }
                DeliveryMode::Stream => keys.push(StateKey::Commit(self.group.to_string(), tp)),
            }
        }
        keys
    }

    fn subscribed(&self, topic: &str, partition: u32) -> Result<TopicPartition> {
        let config = self.inner.check_partition(topic, partition)?;
        let _ = config;
        if !self.topics.contains(topic) {
            return Err(Error::invalid(format!(
                "group `{}`: this consumer does not read topic `{topic}`",
                self.group
            )));
        }
        Ok(TopicPartition::new(topic, partition))
    }

    fn leave(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        let mut state = self.inner.state.lock();
        let left = state
            .groups
            .get_mut(self.group())
            .is_some_and(|g| g.remove_member(self.member, now_ms()));
        if left {
            state.rebalance(self.group());
        }
        drop(state);
        self.inner.notify();
        tracing::debug!(group = %self.group, member = self.member, "member left");
    }
}

impl<S: LogStorage> Drop for EngineConsumer<S> {
    fn drop(&mut self) {
        self.leave();
    }
}

/// Move a nacked message to the DLQ, then settle it for the group; if the
/// append fails the message is given back (queue mode) or stays where it
/// is (stream mode), so it comes again.
async fn dead_letter_nacked<S: LogStorage>(
    inner: Arc<Inner<S>>,
    group: String,
    mode: DeliveryMode,
    m: Message,
    attempts: u32,
    reason: Option<String>,
) -> Result<()> {
    let config = inner
        .state
        .lock()
        .groups
        .get(&group)
        .map(|g| g.config.clone())
        .ok_or_else(|| Error::internal(format!("group `{group}` vanished")))?;
    let dead = DeadLetter {
        topic: &m.topic,
        partition: m.partition,
        offset: m.offset,
        group: &group,
        attempts,
        error: reason.as_deref(),
        failed_at: now_ms(),
        idempotency_key: m.idempotency_key.as_deref(),
    };
    let tp = TopicPartition::new(m.topic.clone(), m.partition);
    let record = dlq::dead_letter_record(m.key.clone(), m.value.clone(), &m.headers, &dead);
    let result = inner
        .append_dead_letter(&group, &config, record, &dead)
        .await;
    let key = {
        let mut guard = inner.state.lock();
        let Some(g) = guard.groups.get_mut(&group) else {
            return result;
        };
        match mode {
            DeliveryMode::Queue => {
                if let Some(t) = g.queue.get_mut(&tp) {
                    match &result {
                        Ok(()) => t.settle(m.offset),
                        Err(_) => t.abort_dead_letter(m.offset),
                    }
                    persist::lease_keys(&group, &tp, t)
                } else {
                    Vec::new()
                }
            }
            DeliveryMode::Stream => {
                let part = g.stream.entry(tp.clone()).or_default();
                match &result {
                    Ok(()) => {
                        part.retries.remove(&m.offset);
                        part.commit_through(m.offset.saturating_add(1));
                    }
                    // Not in the DLQ: rewind to it, so it comes again (on
                    // its last attempt, so the next nack tries the DLQ again).
                    Err(_) => {
                        part.position = Some(m.offset);
                        part.retries.insert(
                            m.offset,
                            Retry {
                                attempt: m.attempt,
                                not_before_ms: 0,
                            },
                        );
                    }
                }
                vec![StateKey::Commit(group.clone(), tp)]
            }
        }
    };
    inner.mark_dirty(key);
    inner.persist().await?;
    inner.notify();
    result
}

/// The lease table of `tp`, or `LeaseExpired` if none was ever leased.
fn leases<'a>(g: &'a mut Group, tp: &TopicPartition, what: &str) -> Result<&'a mut LeaseTable> {
    g.queue
        .get_mut(tp)
        .ok_or_else(|| Error::new(ErrorKind::LeaseExpired, format!("{what}: no lease held")))
}

fn min_due(a: Option<u64>, b: u64) -> u64 {
    a.map_or(b, |x| x.min(b))
}

#[async_trait]
impl<S: LogStorage> Consumer for EngineConsumer<S> {
    async fn group_config(&self) -> Result<GroupConfig> {
        self.inner.group_settings(self.group())
    }

    async fn poll(&self, max: usize, timeout: Duration) -> Result<Vec<Message>> {
        self.check_open()?;
        if max == 0 {
            return Ok(Vec::new());
        }
        let started = Instant::now();
        let mut changes = self.inner.changed.subscribe();
        let session = self
            .inner
            .state
            .lock()
            .groups
            .get(self.group())
            .map(|g| g.config.session_timeout)
            .unwrap_or(Duration::from_secs(10));
        loop {
            changes.borrow_and_update();
            let (messages, due) = match self.mode {
                DeliveryMode::Stream => self.poll_stream(max).await?,
                DeliveryMode::Queue => self.poll_queue(max).await?,
            };
            if !messages.is_empty() {
                return Ok(messages);
            }
            let elapsed = started.elapsed();
            if elapsed >= timeout {
                return Ok(Vec::new());
            }
            let mut wait = (timeout - elapsed)
                .min(session / 4)
                .max(Duration::from_millis(1));
            if let Some(due) = due {
                let now = now_ms();
                wait = wait.min(Duration::from_millis(
                    min_due(Some(due), now + 10_000) - now.min(due),
                ));
                wait = wait.max(Duration::from_millis(1));
            }
            let _ = tokio::time::timeout(wait, changes.changed()).await;
            self.check_open()?;
        }
    }

    async fn ack(&self, m: &Message) -> Result<()> {
        self.check_open()?;
        let prepared = self.prepare_ack(m, None)?;
        let keys = {
            let mut guard = self.inner.state.lock();
            let g = self.member_group(&mut guard, false)?;
            let tp = self.apply_ack(g, m, prepared)?;
            self.changed_keys(g, BTreeSet::from([tp]))
        };
        self.inner.mark_dirty(keys);
        self.inner.persist().await
    }

    async fn ack_batch(&self, messages: &[Message]) -> Result<BatchAck> {
        self.check_open()?;
        let mut outcome = BatchAck::default();
        // The checks that read topic configs and log ends first: they take
        // the state lock themselves.
        let mut prepared: Vec<(usize, &Message, PreparedAck)> = Vec::with_capacity(messages.len());
        for (i, m) in messages.iter().enumerate() {
            let last = prepared.last().map(|(_, _, p)| p.topic_partition());
            match self.prepare_ack(m, last) {
                Ok(p) => prepared.push((i, m, p)),
                Err(e) => outcome.failed.push((i, e)),
            }
        }
        let keys = {
            let mut guard = self.inner.state.lock();
            let g = self.member_group(&mut guard, false)?;
            let mut changed = BTreeSet::new();
            for (i, m, p) in prepared {
                match self.apply_ack(g, m, p) {
                    Ok(tp) => {
                        changed.insert(tp);
                        outcome.acked += 1;
                    }
                    Err(e) => outcome.failed.push((i, e)),
                }
            }
            self.changed_keys(g, changed)
        };
        outcome.failed.sort_by_key(|(i, _)| *i);
        // One write (one sync under `always`) for the whole batch.
        self.inner.mark_dirty(keys);
        self.inner.persist().await?;
        Ok(outcome)
    }

    async fn nack(&self, m: &Message, options: NackOptions) -> Result<NackOutcome> {
        self.check_open()?;
        let token = m.delivery(self.group())?;
        let tp = self.subscribed(&m.topic, m.partition)?;
        let what = self.what(m);
        let now = now_ms();
        let last_attempt = match self.mode {
            DeliveryMode::Queue => {
                let lease = lease_id(token, &what)?;
                let mut guard = self.inner.state.lock();
                let g = self.member_group(&mut guard, false)?;
                let max = g.config.dlq.max_deliveries;
                let attempts = g
                    .queue
                    .get(&tp)
                    .and_then(|t| t.attempts_of(m.offset))
                    .unwrap_or(m.attempt);
                let delay = options.delay_or(g.config.retry_backoff.delay_after(attempts));
                let t = leases(g, &tp, &what)?;
                let (attempts, last) = t.nack(
                    m.offset,
                    lease,
                    now.saturating_add(millis(delay)),
                    max,
                    &what,
                )?;
                self.inner
                    .mark_dirty(persist::lease_keys(self.group(), &tp, t));
                last.then_some(attempts)
            }
            DeliveryMode::Stream => {
                self.next_offset(m, &tp)?;
                let mut guard = self.inner.state.lock();
                let g = self.member_group(&mut guard, false)?;
                let max = g.config.dlq.max_deliveries;
                g.check_owner(self.member, &tp, Some(token.generation()))?;
                if m.attempt >= max {
                    Some(m.attempt)
                } else {
                    let delay = options.delay_or(g.config.retry_backoff.delay_after(m.attempt));
                    let part = g.stream.entry(tp.clone()).or_default();
                    part.position = Some(m.offset);
                    part.retries.insert(
                        m.offset,
                        Retry {
                            attempt: m.attempt.saturating_add(1),
                            not_before_ms: crate::deadline_ms(delay),
                        },
                    );
                    None
                }
            }
        };
        let Some(attempts) = last_attempt else {
            self.inner.persist().await?;
            self.inner.notify();
            return Ok(NackOutcome::Redeliver);
        };
        // The DLQ move runs in a task of its own: once started it completes
        // (or gives the message back) even if this future is dropped.
        let job = dead_letter_nacked(
            self.inner.clone(),
            self.group.to_string(),
            self.mode,
            m.clone(),
            attempts,
            options.reason,
        );
        tokio::spawn(job)
            .await
            .map_err(|e| Error::internal(format!("{what}: dead-letter task failed: {e}")))??;
        Ok(NackOutcome::DeadLettered)
    }

    async fn extend(&self, m: &Message, by: Duration) -> Result<()> {
        self.check_open()?;
        let token = m.delivery(self.group())?;
        let tp = self.subscribed(&m.topic, m.partition)?;
        let mut guard = self.inner.state.lock();
        let g = self.member_group(&mut guard, false)?;
        g.require_mode(DeliveryMode::Queue, "extend")?;
        let what = self.what(m);
        let lease = lease_id(token, &what)?;
        let deadline = now_ms().saturating_add(millis(by.min(MAX_REDELIVERY_DELAY)));
        leases(g, &tp, &what)?.extend(m.offset, lease, deadline, &what)
    }

    async fn commit(&self, topic: &str, partition: u32, offset: u64) -> Result<()> {
        self.check_open()?;
        let tp = self.subscribed(topic, partition)?;
        let b = self.inner.bounds(&tp)?;
        {
            let mut guard = self.inner.state.lock();
            let g = self.member_group(&mut guard, false)?;
            g.require_mode(DeliveryMode::Stream, "commit")?;
            g.check_owner(self.member, &tp, None)?;
            if offset > b.log_end {
                return Err(Error::invalid(format!(
                    "group `{}`: cannot commit offset {offset} for {tp}: log end is {}",
                    self.group, b.log_end
                )));
            }
            let part = g.stream.entry(tp.clone()).or_default();
            part.committed = Some(offset);
            part.retries = part.retries.split_off(&offset);
        }
        self.inner
            .mark_dirty([StateKey::Commit(self.group.to_string(), tp.clone())]);
        self.inner.persist().await
    }

    async fn seek(&self, topic: &str, partition: u32, to: SeekTo) -> Result<()> {
        self.check_open()?;
        let tp = self.subscribed(topic, partition)?;
        let b = self.inner.bounds(&tp)?;
        let target = match to {
            SeekTo::Beginning => b.log_start,
            SeekTo::End => b.log_end,
            SeekTo::Offset(n) => n,
            SeekTo::Timestamp(t) => {
                self.inner
                    .storage
                    .offset_for_timestamp(topic, partition, t)
                    .await?
            }
        }
        .clamp(b.log_start, b.log_end.max(b.log_start));
        {
            let mut guard = self.inner.state.lock();
            let g = self.member_group(&mut guard, true)?;
            match self.mode {
                DeliveryMode::Stream => {
                    g.check_owner(self.member, &tp, None)?;
                    let part = g.stream.entry(tp.clone()).or_default();
                    part.position = Some(target);
                    part.retries.clear();
                }
                DeliveryMode::Queue => {
                    let table = g
                        .queue
                        .entry(tp.clone())
                        .or_insert_with(|| LeaseTable::starting_at(target));
                    table.reset(target);
                    self.inner
                        .mark_dirty(persist::lease_keys(self.group(), &tp, table));
                }
            }
        }
        self.inner.persist().await?;
        self.inner.notify();
        Ok(())
    }

    async fn assignment(&self) -> Result<Vec<TopicPartition>> {
        self.check_open()?;
        let mut guard = self.inner.state.lock();
        self.heartbeat(&mut guard, true);
        match self.mode {
            DeliveryMode::Stream => Ok(guard
                .groups
                .get(self.group())
                .map(|g| {
                    g.owned_by(self.member)
                        .into_iter()
                        .map(|(tp, _)| tp)
                        .collect()
                })
                .unwrap_or_default()),
            DeliveryMode::Queue => Ok(guard.partitions_of(&self.topics)),
        }
    }

    async fn generation(&self) -> Result<u64> {
        self.check_open()?;
        let mut guard = self.inner.state.lock();
        self.heartbeat(&mut guard, true);
        Ok(guard.groups.get(self.group()).map_or(0, |g| g.generation))
    }

    async fn close(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Ok(());
        }
        self.leave();
        self.inner.persist().await
    }
}
