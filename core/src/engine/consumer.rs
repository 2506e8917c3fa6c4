//! A member of a consumer group on the embedded engine.
//!
//! Turns `poll`, `ack`, `nack`, `extend`, `commit` and `seek` into changes
//! of the group state (under the engine lock, never held across `.await`),
//! reads records from storage outside the lock, and persists before
//! returning.

use super::group::{Group, Member, Retry};
use super::lease::{Lease, LeaseTable};
use super::{millis, Inner, LogStorage, ReadRange, StateKey, MAX_POLL_BYTES};
use crate::broker::{Consumer, NackOutcome, TopicPartition};
use crate::config::{DeliveryMode, SeekTo};
use crate::dlq::DeadLetter;
use crate::error::{Error, ErrorKind, Result};
use crate::now_ms;
use crate::record::{DeliveryToken, Message};
use async_trait::async_trait;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub(crate) struct EngineConsumer<S: LogStorage> {
    inner: Arc<Inner<S>>,
    group: String,
    member: u64,
    topics: BTreeSet<String>,
    mode: DeliveryMode,
    rotate: AtomicUsize,
    closed: AtomicBool,
}

/// A queue-mode reservation: a leased offset waiting to be read.
struct Reserved {
    tp: TopicPartition,
    offset: u64,
    attempt: u32,
    lease: u64,
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
            group: group.to_string(),
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

    fn what(&self, m: &Message) -> String {
        format!("group `{}`: {}", self.group, m.position())
    }

    /// Heartbeat; with `rejoin`, a member removed by a session timeout joins
    /// again (as a new generation). Also expires silent members.
    fn heartbeat(&self, state: &mut super::State, rejoin: bool) -> bool {
        let now = now_ms();
        let Some(g) = state.groups.get_mut(&self.group) else {
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
            state.rebalance(&self.group);
        }
        changed
    }

    /// Heartbeat, then this member's group in the locked state.
    fn member_group<'a>(&self, state: &'a mut super::State, rejoin: bool) -> Result<&'a mut Group> {
        self.heartbeat(state, rejoin);
        state
            .groups
            .get_mut(&self.group)
            .ok_or_else(|| Error::internal(format!("group `{}` vanished", self.group)))
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
    /// partition resumes.
    async fn poll_stream(&self, max: usize) -> Result<(Vec<Message>, Option<u64>)> {
        let now = now_ms();
        let mut next_due: Option<u64> = None;
        let (plan, changed) = {
            let mut guard = self.inner.state.lock();
            let changed = self.heartbeat(&mut guard, true);
            let g = guard
                .groups
                .get_mut(&self.group)
                .ok_or_else(|| Error::internal("group vanished"))?;
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
                        next_due =
                            Some(next_due.map_or(r.not_before_ms, |d| d.min(r.not_before_ms)));
                        continue;
                    }
                }
                if pos < b.log_end {
                    plan.push((tp, pos, owner.epoch));
                }
            }
            (plan, changed)
        };
        if changed {
            self.inner.notify();
        }
        let mut out = Vec::new();
        for (tp, pos, epoch) in plan {
            if out.len() >= max {
                break;
            }
            let found = self
                .inner
                .storage
                .read(
                    &tp.topic,
                    tp.partition,
                    ReadRange::from(pos)
                        .with_max_records(max - out.len())
                        .with_max_bytes(MAX_POLL_BYTES),
                )
                .await?;
            let Some(last) = found.last().map(|m| m.offset) else {
                continue;
            };
            let mut guard = self.inner.state.lock();
            let Some(g) = guard.groups.get_mut(&self.group) else {
                break;
            };
            if g.check_owner(self.member, &tp, Some(epoch)).is_err() {
                continue;
            }
            let part = g.stream.entry(tp.clone()).or_default();
            if part.position != Some(pos) {
                continue; // a seek or nack moved it meanwhile
            }
            part.position = Some(last + 1);
            for m in found {
                let attempt = part.retries.get(&m.offset).map_or(1, |r| r.attempt);
                let token = DeliveryToken {
                    generation: epoch,
                    lease: 0,
                };
                out.push(Inner::<S>::message(&tp, m, attempt, token));
            }
        }
        Ok((out, next_due))
    }

    /// One queue-mode attempt: expire leases, lease what is available, read it.
    async fn poll_queue(&self, max: usize) -> Result<(Vec<Message>, Option<u64>)> {
        let now = now_ms();
        let mut next_due: Option<u64> = None;
        let mut dead_jobs = Vec::new();
        let mut reserved: Vec<Reserved> = Vec::new();
        let mut dirty = Vec::new();
        {
            let mut guard = self.inner.state.lock();
            self.heartbeat(&mut guard, true);
            let state = &mut *guard;
            let parts = state.partitions_of(&self.topics);
            let g = state
                .groups
                .get_mut(&self.group)
                .ok_or_else(|| Error::internal("group vanished"))?;
            let visibility = millis(g.config.visibility_timeout);
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
                if reserved.len() < max {
                    let offsets = table.available(now, b.log_end, max - reserved.len());
                    if !offsets.is_empty() {
                        dirty.push(StateKey::Leases(self.group.clone(), tp.clone()));
                    }
                    for offset in offsets {
                        state.next_lease += 1;
                        let lease = Lease {
                            member: self.member,
                            id: state.next_lease,
                            deadline_ms: now.saturating_add(visibility),
                        };
                        let attempt = table.lease(offset, lease);
                        reserved.push(Reserved {
                            tp: tp.clone(),
                            offset,
                            attempt,
                            lease: lease.id,
                        });
                    }
                }
                if let Some(due) = table.next_due() {
                    next_due = Some(next_due.map_or(due, |d| d.min(due)));
                }
            }
        }
        if !dead_jobs.is_empty() {
            if let Err(e) = self.inner.dead_letter_expired(&self.group, dead_jobs).await {
                tracing::warn!(group = %self.group, error = %e, "dead-letter move failed");
            }
        }
        // Read what was leased: contiguous runs per partition.
        let mut by_tp: BTreeMap<TopicPartition, Vec<&Reserved>> = BTreeMap::new();
        for r in &reserved {
            by_tp.entry(r.tp.clone()).or_default().push(r);
        }
        let mut out = Vec::with_capacity(reserved.len());
        let mut missing = Vec::new();
        for (tp, mut rs) in by_tp {
            rs.sort_by_key(|r| r.offset);
            let mut i = 0;
            while i < rs.len() {
                let mut j = i + 1;
                while j < rs.len() && rs[j].offset == rs[j - 1].offset + 1 {
                    j += 1;
                }
                let run = &rs[i..j];
                let found = self
                    .inner
                    .storage
                    .read(
                        &tp.topic,
                        tp.partition,
                        ReadRange::from(run[0].offset).with_max_records(run.len()),
                    )
                    .await?;
                let mut found = found.into_iter().peekable();
                for r in run {
                    while found.peek().is_some_and(|m| m.offset < r.offset) {
                        found.next();
                    }
                    match found.peek() {
                        Some(m) if m.offset == r.offset => {
                            let m = found.next().expect("peeked");
                            let token = DeliveryToken {
                                generation: 0,
                                lease: r.lease,
                            };
                            out.push(Inner::<S>::message(&tp, m, r.attempt, token));
                        }
                        _ => missing.push((tp.clone(), r.offset)),
                    }
                }
                i = j;
            }
        }
        if !missing.is_empty() {
            // Removed by retention between leasing and reading.
            let mut guard = self.inner.state.lock();
            if let Some(g) = guard.groups.get_mut(&self.group) {
                for (tp, offset) in missing {
                    if let Some(t) = g.queue.get_mut(&tp) {
                        t.settle(offset);
                    }
                }
            }
        }
        self.inner.mark_dirty(dirty);
        self.inner.persist().await?;
        Ok((out, next_due))
    }

    /// Move a nacked message to the DLQ, then settle it.
    async fn dead_letter_nacked(
        &self,
        m: &Message,
        attempts: u32,
        reason: Option<&str>,
    ) -> Result<()> {
        let config = self
            .inner
            .state
            .lock()
            .groups
            .get(&self.group)
            .map(|g| g.config.clone())
            .ok_or_else(|| Error::internal("group vanished"))?;
        let dead = DeadLetter {
            topic: &m.topic,
            partition: m.partition,
            offset: m.offset,
            group: &self.group,
            attempts,
            error: reason,
            failed_at: now_ms(),
        };
        let data = (m.key.clone(), m.value.clone(), m.headers.clone());
        let tp = TopicPartition::new(m.topic.clone(), m.partition);
        let result = self
            .inner
            .append_dead_letter(&self.group, &config, data, dead)
            .await;
        {
            let mut guard = self.inner.state.lock();
            let Some(g) = guard.groups.get_mut(&self.group) else {
                return result;
            };
            match self.mode {
                DeliveryMode::Queue => {
                    if let Some(t) = g.queue.get_mut(&tp) {
                        match &result {
                            Ok(()) => t.settle(m.offset),
                            Err(_) => t.abort_dead_letter(m.offset),
                        }
                    }
                }
                DeliveryMode::Stream => {
                    if result.is_ok() {
                        let part = g.stream.entry(tp.clone()).or_default();
                        part.retries.remove(&m.offset);
                        if part.committed.is_none_or(|c| c <= m.offset) {
                            part.committed = Some(m.offset + 1);
                        }
                    }
                }
            }
        }
        self.inner.mark_dirty([match self.mode {
            DeliveryMode::Queue => StateKey::Leases(self.group.clone(), tp.clone()),
            DeliveryMode::Stream => StateKey::Commit(self.group.clone(), tp.clone()),
        }]);
        self.inner.persist().await?;
        self.inner.notify();
        result
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
            .get_mut(&self.group)
            .is_some_and(|g| g.remove_member(self.member, now_ms()));
        if left {
            state.rebalance(&self.group);
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
            .get(&self.group)
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
        let tp = self.subscribed(&m.topic, m.partition)?;
        {
            let mut guard = self.inner.state.lock();
            let g = self.member_group(&mut guard, false)?;
            match self.mode {
                DeliveryMode::Queue => {
                    let what = self.what(m);
                    let t = leases(g, &tp, &what)?;
                    t.ack(m.offset, m.token.lease, &what)?;
                    self.inner
                        .mark_dirty([StateKey::Leases(self.group.clone(), tp.clone())]);
                }
                DeliveryMode::Stream => {
                    g.check_owner(self.member, &tp, Some(m.token.generation))?;
                    let part = g.stream.entry(tp.clone()).or_default();
                    if part.committed.is_none_or(|c| c <= m.offset) {
                        part.committed = Some(m.offset + 1);
                    }
                    part.retries = part.retries.split_off(&(m.offset + 1));
                    self.inner
                        .mark_dirty([StateKey::Commit(self.group.clone(), tp.clone())]);
                }
            }
        }
        self.inner.persist().await
    }

    async fn nack(
        &self,
        m: &Message,
        delay: Option<Duration>,
        reason: Option<&str>,
    ) -> Result<NackOutcome> {
        self.check_open()?;
        let tp = self.subscribed(&m.topic, m.partition)?;
        let now = now_ms();
        let last_attempt = {
            let mut guard = self.inner.state.lock();
            let g = self.member_group(&mut guard, false)?;
            let max = g.config.dlq.max_deliveries;
            match self.mode {
                DeliveryMode::Queue => {
                    let what = self.what(m);
                    let attempts = g
                        .queue
                        .get(&tp)
                        .and_then(|t| t.attempts.get(&m.offset).copied())
                        .unwrap_or(m.attempt);
                    let delay =
                        delay.unwrap_or_else(|| g.config.retry_backoff.delay_after(attempts));
                    let t = leases(g, &tp, &what)?;
                    let (attempts, last) = t.nack(
                        m.offset,
                        m.token.lease,
                        now.saturating_add(millis(delay)),
                        max,
                        &what,
                    )?;
                    self.inner
                        .mark_dirty([StateKey::Leases(self.group.clone(), tp.clone())]);
                    last.then_some(attempts)
                }
                DeliveryMode::Stream => {
                    g.check_owner(self.member, &tp, Some(m.token.generation))?;
                    if m.attempt >= max {
                        Some(m.attempt)
                    } else {
                        let delay =
                            delay.unwrap_or_else(|| g.config.retry_backoff.delay_after(m.attempt));
                        let part = g.stream.entry(tp.clone()).or_default();
                        part.position = Some(m.offset);
                        part.retries.insert(
                            m.offset,
                            Retry {
                                attempt: m.attempt + 1,
                                not_before_ms: now.saturating_add(millis(delay)),
                            },
                        );
                        None
                    }
                }
            }
        };
        match last_attempt {
            Some(attempts) => {
                self.dead_letter_nacked(m, attempts, reason).await?;
                Ok(NackOutcome::DeadLettered)
            }
            None => {
                self.inner.persist().await?;
                self.inner.notify();
                Ok(NackOutcome::Redeliver)
            }
        }
    }

    async fn extend(&self, m: &Message, by: Duration) -> Result<()> {
        self.check_open()?;
        let tp = self.subscribed(&m.topic, m.partition)?;
        let mut guard = self.inner.state.lock();
        let g = self.member_group(&mut guard, false)?;
        g.require_mode(DeliveryMode::Queue, "extend")?;
        let what = self.what(m);
        let t = leases(g, &tp, &what)?;
        t.extend(
            m.offset,
            m.token.lease,
            now_ms().saturating_add(millis(by)),
            &what,
        )
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
            .mark_dirty([StateKey::Commit(self.group.clone(), tp.clone())]);
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
                    g.queue
                        .entry(tp.clone())
                        .or_insert_with(|| LeaseTable::starting_at(target))
                        .reset(target);
                    self.inner
                        .mark_dirty([StateKey::Leases(self.group.clone(), tp.clone())]);
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
                .get(&self.group)
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
        Ok(guard.groups.get(&self.group).map_or(0, |g| g.generation))
    }

    async fn close(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Ok(());
        }
        self.leave();
        self.inner.persist().await
    }
}
