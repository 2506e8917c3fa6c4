//! Stream mode (contract §4a, Kafka consumer groups): the member's
//! position and retries in each owned partition live in the process
//! (core's `MemberPartition`); owners, generations and commits live in
//! Redis, written only by fenced scripts. Nothing of queue mode is here.

use super::{dead_letter, RedisConsumer};
use crate::broker::{Bounds, TopicRow};
use crate::conn::{during, reply, SCRIPTS};
use crate::keys::{commit_field, owner_field};
use conveyor_core::backend::{validate, MemberPartition};
use conveyor_core::dlq::DeadLetter;
use conveyor_core::now_ms;
use conveyor_core::{
    BatchAck, DeliveryMode, Error, ErrorKind, Message, NackOptions, NackOutcome, Result,
    TopicPartition,
};
use redis::Value;
use std::collections::{BTreeSet, HashMap};

impl RedisConsumer {
    /// The group's committed offset of `tp` (topic id `id`) in the
    /// `commits` hash, if any.
    async fn read_commit(
        &self,
        commits: &str,
        id: u64,
        tp: &TopicPartition,
    ) -> Result<Option<u64>> {
        redis::cmd("HGET")
            .arg(commits)
            .arg(commit_field(id, tp.partition))
            .query_async(&mut self.inner.conn())
            .await
            .map_err(during(format!(
                "group `{}`: read the commit of {tp}",
                self.group
            )))
    }

    /// One stream-mode attempt. Cancel safe: all reads happen before any
    /// position moves; the positions move under the lock with no await.
    ///
    /// While the last heartbeat is younger than a quarter of the session
    /// timeout, the reads go out with a read of the group's generation and
    /// membership versions (one round trip, two plain reads): what they
    /// read is delivered if neither moved since that heartbeat (the owners
    /// are then the same, and the reads lie between the two). Otherwise,
    /// and when the heartbeat is due, the heartbeat goes out with the
    /// reads, which are delivered only if it finds the same owned
    /// partitions in the same generations (a generation only grows, so
    /// nothing moved between the two heartbeats). Reads under a moved
    /// view are dropped and done again under the new one.
    pub(super) async fn poll_stream(&self, max: usize) -> Result<(Vec<Message>, Option<u64>)> {
        let (view, reads) = match self.fresh_view() {
            Some(last) => {
                let (moved, reads) = futures::join!(
                    self.group_moved(last.generation),
                    self.stream_reads(&last.owned, max)
                );
                if moved? {
                    let view = self.beat(true, true).await?;
                    let reads = same_owned(&view.owned, &last.owned)
                        .then_some(reads)
                        .transpose()?;
                    (view, reads)
                } else {
                    (last, Some(reads?))
                }
            }
            None => {
                let last = {
                    let v = self.view.lock();
                    v.1.map(|_| v.0.owned.clone())
                };
                match last {
                    Some(last) => {
                        let (view, reads) =
                            futures::join!(self.beat(true, true), self.stream_reads(&last, max));
                        let view = view?;
                        if same_owned(&view.owned, &last) {
                            (view, Some(reads?))
                        } else {
                            (view, None)
                        }
                    }
                    None => (self.beat(true, true).await?, None),
                }
            }
        };
        let reads = match reads {
            Some(reads) => reads,
            None => self.stream_reads(&view.owned, max).await?,
        };
        self.stream_deliver(reads).await
    }

    /// The reads of one stream-mode attempt over `owned` (no position
    /// moves): what each partition returned, and when to try again.
    async fn stream_reads(
        &self,
        owned: &[(TopicPartition, u64)],
        max: usize,
    ) -> Result<StreamReads> {
        let owned = self.rotated(owned.to_vec());
        let now = now_ms();
        let mut due = None;
        // Committed offsets of partitions without a position yet.
        let unknown: Vec<(TopicPartition, u64)> = {
            let parts = self.parts.lock();
            owned
                .iter()
                .filter(|(tp, g)| {
                    parts
                        .get(tp)
                        .is_none_or(|p| p.generation != *g || p.position.is_none())
                })
                .cloned()
                .collect()
        };
        // Topic ids from the broker's topic cache (two round trips saved
        // per poll); a stale id (topic deleted, or deleted and created
        // again) finds no partition below and is looked up again.
        let mut rows: HashMap<String, TopicRow> = HashMap::new();
        for (tp, _) in &owned {
            if !rows.contains_key(&tp.topic) {
                let row = match self.inner.cached_topic(&tp.topic) {
                    Some(t) => Some(t),
                    None => self
                        .inner
                        .topic(&tp.topic)
                        .await?
                        .inspect(|t| self.inner.cache_topic(&tp.topic, t)),
                };
                match row {
                    Some(t) => {
                        rows.insert(tp.topic.clone(), t);
                    }
                    None => continue,
                }
            }
        }
        let mut committed: HashMap<TopicPartition, Option<u64>> = HashMap::new();
        if !unknown.is_empty() {
            let k = self.inner.group_keys(self.group());
            for (tp, _) in &unknown {
                let Some(t) = rows.get(&tp.topic) else {
                    continue;
                };
                let c = self.read_commit(&k.commits, t.id, tp).await?;
                committed.insert(tp.clone(), c);
            }
        }
        let mut plan = Vec::new();
        {
            let mut parts = self.parts.lock();
            let keep: BTreeSet<&TopicPartition> = owned.iter().map(|(tp, _)| tp).collect();
            parts.retain(|tp, _| keep.contains(tp));
            for (tp, generation) in &owned {
                let part = parts.entry(tp.clone()).or_default();
                part.at_generation(*generation);
                let pos = match part.position {
                    Some(p) => p,
                    None => match committed.get(tp) {
                        Some(c) => c.unwrap_or(0),
                        None => continue, // read meanwhile: next time
                    },
                };
                part.position = Some(pos);
                if let Some(at) = part.retry_wait(pos, now) {
                    due = Some(due.map_or(at, |d: u64| d.min(at)));
                    continue;
                }
                plan.push((tp.clone(), *generation, pos));
            }
        }
        let mut reads = Vec::new();
        let mut planned = 0usize;
        for (tp, generation, pos) in plan {
            if planned >= max {
                break;
            }
            let Some(t) = rows.get(&tp.topic) else {
                continue;
            };
            let (bounds, found) = match self
                .inner
                .read(&tp.topic, t.id, tp.partition, pos, max - planned)
                .await
            {
                Ok(got) => got,
                Err(e) if e.kind() == ErrorKind::TopicNotFound => {
                    // Deleted since it was cached: looked up again next time.
                    self.inner.forget_topic(&tp.topic);
                    due = Some(now);
                    continue;
                }
                Err(e) => return Err(e),
            };
            planned += found.len();
            reads.push((tp, generation, pos, bounds, found, t.id));
        }
        Ok(StreamReads {
            now,
            due,
            planned,
            reads,
        })
    }

    /// Deliver what [`Self::stream_reads`] read: positions move under the
    /// lock (reads of a partition whose position or generation moved
    /// meanwhile are dropped), then the group's commit is carried over
    /// passed runs.
    async fn stream_deliver(&self, r: StreamReads) -> Result<(Vec<Message>, Option<u64>)> {
        let StreamReads {
            now,
            mut due,
            planned,
            reads,
        } = r;
        let mut out = Vec::with_capacity(planned);
        let mut commits = Vec::new();
        {
            let mut parts = self.parts.lock();
            for (tp, generation, pos, bounds, found, id) in reads {
                let Some(part) = parts.get_mut(&tp) else {
                    continue;
                };
                if part.generation != generation || part.position != Some(pos) {
                    continue; // a seek, nack or rebalance moved it meanwhile
                }
                // Below the log start (retention): continue at the start.
                if found.is_empty() {
                    if pos < bounds.log_start {
                        part.position = Some(bounds.log_start);
                        due = Some(now);
                    }
                    continue;
                }
                if part.deliver(&self.group, &tp, found, &mut out) {
                    due = Some(now);
                    commits.push((tp, id, generation));
                }
            }
        }
        for (tp, id, generation) in commits {
            // Carry the group's commit over passed runs it has reached.
            let k = self.inner.group_keys(self.group());
            let c = self.read_commit(&k.commits, id, &tp).await?;
            let base = c.unwrap_or(0);
            let to = match self.parts.lock().get_mut(&tp) {
                Some(p) if p.generation == generation => p.carry(base),
                _ => continue,
            };
            if to > base {
                match self
                    .commit_offset(&tp, id, to, Some(generation), true)
                    .await
                {
                    Ok(()) => {}
                    Err(e) if e.kind() == ErrorKind::Fenced => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok((out, due))
    }

    /// Commit `offset` for `tp` if this member owns it (in `generation`,
    /// if given): one script, fenced. `cumulative` never moves the commit
    /// back.
    async fn commit_offset(
        &self,
        tp: &TopicPartition,
        topic_id: u64,
        offset: u64,
        generation: Option<u64>,
        cumulative: bool,
    ) -> Result<()> {
        let what = format!("group `{}`: commit {tp}", self.group);
        let k = self.inner.group_keys(self.group());
        let got: Vec<Value> = SCRIPTS
            .commit
            .key(&k.owners)
            .key(&k.commits)
            .arg(owner_field(&tp.topic, tp.partition))
            .arg(commit_field(topic_id, tp.partition))
            .arg(format!("{}:{}", self.member, generation.unwrap_or(0)))
            .arg(offset)
            .arg(if cumulative { "1" } else { "0" })
            .arg(if generation.is_some() { "1" } else { "0" })
            .invoke_async(&mut self.inner.conn())
            .await
            .map_err(during(&what))?;
        if got.first().map(reply::int).transpose()? == Some(1) {
            return Ok(());
        }
        let owner = got
            .into_iter()
            .nth(1)
            .map(reply::string)
            .transpose()?
            .unwrap_or_default();
        Err(self.fenced(tp, generation, &owner))
    }

    fn fenced(&self, tp: &TopicPartition, generation: Option<u64>, owner: &str) -> Error {
        let current = self.view.lock().0.generation;
        let (who, at) = owner.split_once(':').unwrap_or(("", ""));
        if who == self.member.to_string() {
            if let Some(g) = generation {
                return Error::new(
                    ErrorKind::Fenced,
                    format!(
                        "group `{}`: {tp} was delivered in generation {g} but was reassigned in \
                         generation {at}",
                        self.group
                    ),
                );
            }
        }
        Error::new(
            ErrorKind::Fenced,
            format!(
                "group `{}`: {tp} is not assigned to this member (generation {current})",
                self.group
            ),
        )
    }

    /// Stream mode: this member owns `tp` (in `generation`, if given);
    /// returns the generation it owns it in.
    async fn check_owner(&self, tp: &TopicPartition, generation: Option<u64>) -> Result<u64> {
        let k = self.inner.group_keys(self.group());
        let owner: Option<String> = redis::cmd("HGET")
            .arg(&k.owners)
            .arg(owner_field(&tp.topic, tp.partition))
            .query_async(&mut self.inner.conn())
            .await
            .map_err(during(format!(
                "group `{}`: check the owner of {tp}",
                self.group
            )))?;
        let owner = owner.unwrap_or_default();
        let parsed = owner
            .split_once(':')
            .and_then(|(m, g)| Some((m.parse::<u64>().ok()?, g.parse::<u64>().ok()?)));
        match (parsed, generation) {
            (Some((m, at)), Some(g)) if m == self.member && at == g => Ok(g),
            (Some((m, at)), None) if m == self.member => Ok(at),
            _ => Err(self.fenced(tp, generation, &owner)),
        }
    }

    /// Stream-mode ack: commit the offset after `m` (carried over passed
    /// runs), fenced by the generation `m` was delivered in.
    pub(super) async fn ack_stream(&self, m: &Message) -> Result<()> {
        let token = m.delivery(self.group())?;
        let generation = token.generation();
        let (tp, t, b) = self.subscribed_bounds(&m.topic, m.partition).await?;
        let next = validate::next_offset(m.offset, b.log_end, &self.what(m))?;
        self.beat(false, false).await?;
        let to = MemberPartition::carried(&mut self.parts.lock(), &tp, generation, next);
        self.commit_offset(&tp, t.id, to, Some(generation), true)
            .await?;
        if let Some(part) = self.parts.lock().get_mut(&tp) {
            part.committed(to);
        }
        Ok(())
    }

    /// Stream-mode `ack_batch`: each message acked in turn (a commit
    /// each); `Closed` and `Unavailable` end the batch.
    pub(super) async fn ack_batch_stream(&self, messages: &[Message]) -> Result<BatchAck> {
        let mut outcome = BatchAck::default();
        for (i, m) in messages.iter().enumerate() {
            match self.ack_stream(m).await {
                Ok(()) => outcome.acked += 1,
                Err(e) if matches!(e.kind(), ErrorKind::Closed | ErrorKind::Unavailable) => {
                    return Err(e)
                }
                Err(e) => outcome.failed.push((i, e)),
            }
        }
        Ok(outcome)
    }

    /// Stream-mode nack (contract §4a): on the last allowed attempt the
    /// message is dead-lettered and committed past; otherwise the
    /// partition is rewound to it after the retry backoff.
    pub(super) async fn nack_stream(
        &self,
        m: &Message,
        options: NackOptions,
        tp: TopicPartition,
        t: TopicRow,
    ) -> Result<NackOutcome> {
        let token = m.delivery(self.group())?;
        let what = self.what(m);
        let b = self.inner.bounds(&m.topic, t.id, m.partition).await?;
        validate::next_offset(m.offset, b.log_end, &what)?;
        self.beat(false, false).await?;
        let generation = token.generation();
        self.check_owner(&tp, Some(generation)).await?;
        let config = self.group_config().await?;
        if m.attempt >= config.dlq.max_deliveries {
            let dead = DeadLetter {
                topic: &m.topic,
                partition: m.partition,
                offset: m.offset,
                group: self.group(),
                attempts: m.attempt,
                error: options.reason.as_deref(),
                failed_at: now_ms(),
                idempotency_key: m.idempotency_key.as_deref(),
            };
            dead_letter(
                &self.inner,
                &config,
                &dead,
                m.key.clone(),
                m.value.clone(),
                &m.headers,
            )
            .await?;
            let to =
                MemberPartition::carried(&mut self.parts.lock(), &tp, generation, m.offset + 1);
            self.commit_offset(&tp, t.id, to, Some(generation), true)
                .await?;
            if let Some(part) = self.parts.lock().get_mut(&tp) {
                part.retries.remove(&m.offset);
                part.committed(to);
                if part.position.is_some_and(|p| p <= m.offset) {
                    part.position = Some(to);
                }
            }
            return Ok(NackOutcome::DeadLettered);
        }
        let delay = options.delay_or(config.retry_backoff.delay_after(m.attempt));
        MemberPartition::nacked(&mut self.parts.lock(), tp, generation, m, delay);
        self.inner.wake();
        Ok(NackOutcome::Redeliver)
    }

    /// Stream-mode `commit` (a queue-mode group has none: `WrongMode`).
    pub(super) async fn commit_stream(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
    ) -> Result<()> {
        self.subscribed_cached(topic, partition).await?;
        if self.mode != DeliveryMode::Stream {
            return Err(Error::wrong_mode(
                &self.group,
                "commit",
                DeliveryMode::Stream,
            ));
        }
        self.beat(false, false).await?;
        let (tp, t, b) = self.subscribed_bounds(topic, partition).await?;
        if offset > b.log_end {
            // Fencing first, as the embedded engine does.
            self.check_owner(&tp, None).await?;
            return Err(Error::invalid(format!(
                "group `{}`: cannot commit offset {offset} for {tp}: log end is {}",
                self.group, b.log_end
            )));
        }
        self.commit_offset(&tp, t.id, offset, None, false).await?;
        if let Some(part) = self.parts.lock().get_mut(&tp) {
            part.committed(offset);
        }
        Ok(())
    }

    /// The topic is read by this consumer, the partition exists: its
    /// entry and bounds. The topic's id comes from the cache (one round
    /// trip saved); a stale one (topic deleted, or deleted and created
    /// again) finds no bounds, and the registry is read again.
    async fn subscribed_bounds(
        &self,
        topic: &str,
        partition: u32,
    ) -> Result<(TopicPartition, TopicRow, Bounds)> {
        let (tp, t) = self.subscribed_cached(topic, partition).await?;
        match self.inner.bounds(topic, t.id, partition).await {
            Ok(b) => Ok((tp, t, b)),
            Err(e) if e.kind() == ErrorKind::TopicNotFound => {
                self.inner.forget_topic(topic);
                let (tp, t) = self.subscribed(topic, partition).await?;
                self.inner.cache_topic(topic, &t);
                let b = self.inner.bounds(topic, t.id, partition).await?;
                Ok((tp, t, b))
            }
            Err(e) => Err(e),
        }
    }

    /// Stream-mode seek: this member's position in `tp` (which it must
    /// own) moves to `target`.
    pub(super) async fn seek_stream(&self, tp: TopicPartition, target: u64) -> Result<()> {
        let generation = self.check_owner(&tp, None).await?;
        let mut parts = self.parts.lock();
        let part = parts.entry(tp).or_default();
        part.at_generation(generation);
        part.seek(target);
        Ok(())
    }
}

/// What one stream-mode attempt read, before any position moves: the
/// time it planned at, when to try again, how many messages, and per
/// partition (partition, generation, position read from, bounds, messages,
/// topic id).
struct StreamReads {
    now: u64,
    due: Option<u64>,
    planned: usize,
    #[allow(clippy::type_complexity)]
    reads: Vec<(
        TopicPartition,
        u64,
        u64,
        Bounds,
        Vec<conveyor_core::backend::StoredMessage>,
        u64,
    )>,
}

/// The same partitions in the same generations, in any order.
fn same_owned(a: &[(TopicPartition, u64)], b: &[(TopicPartition, u64)]) -> bool {
    let set = |v: &[(TopicPartition, u64)]| v.iter().cloned().collect::<BTreeSet<_>>();
    a.len() == b.len() && set(a) == set(b)
}
