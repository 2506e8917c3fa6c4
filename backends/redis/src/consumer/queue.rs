//! Queue mode (contract §4b, SQS and Redis Streams groups): leases,
//! redeliveries, attempts and dead-letter moves of each partition live in
//! Redis and change only in the `queue_*.lua` scripts; the process holds
//! nothing but the partitions it leased from (released when it leaves).
//! Nothing of stream mode is here.

use super::{dead_letter, RedisConsumer};
use crate::acks::settle_acks;
use crate::broker::{decode_fields, Inner, TopicRow};
use crate::conn::{during, map_err, reply, SCRIPTS};
use crate::keys;
use crate::millis;
use bytes::Bytes;
use conveyor_core::dlq::DeadLetter;
use conveyor_core::now_ms;
use conveyor_core::{
    BatchAck, DeliveryMode, DeliveryToken, Error, ErrorKind, Message, NackOptions, NackOutcome,
    Result, TopicPartition, MAX_REDELIVERY_DELAY,
};
use parking_lot::Mutex;
use redis::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

/// How long a member's claim on a dead-letter move lasts before another
/// member may take it over.
const DEAD_CLAIM: Duration = Duration::from_secs(30);
/// How often the sweep looks for dead letters nobody polls for.
const SWEEP_EVERY: Duration = Duration::from_millis(500);

/// `queue_poll.lua` on one partition's group state, its keys given.
fn poll_call(part: &keys::Part, q: &keys::Queue) -> redis::ScriptInvocation<'static> {
    let mut call = SCRIPTS.queue_poll.prepare_invoke();
    call.key(&part.meta)
        .key(&part.log)
        .key(&q.cursor)
        .key(&q.state)
        .key(&q.dead)
        .key(&part.groups);
    call
}

/// `queue_settle.lua` on one partition's group state, its keys and the
/// action's arguments given (the items or member follow).
fn settle_call(
    q: &keys::Queue,
    action: &str,
    ms: u64,
    max_deliveries: u32,
    reason: &str,
) -> redis::ScriptInvocation<'static> {
    let mut call = SCRIPTS.queue_settle.prepare_invoke();
    call.key(&q.state)
        .key(&q.dead)
        .arg(action)
        .arg(ms)
        .arg(max_deliveries)
        .arg(reason);
    call
}

/// An `ack_batch`'s messages by partition (topic, partition): index in
/// the batch, offset, lease token.
type ByPartition = BTreeMap<(String, u32), Vec<(usize, u64, String)>>;

/// Queue mode: the partitions (topic id, partition) a member has leased
/// from, shared between the member and its broker (which releases them if
/// it closes first).
pub(crate) type Leased = Arc<Mutex<BTreeSet<(u64, u32)>>>;

/// Every live lease `member` holds in the partitions `leased` expires now
/// (it is leaving): the messages are offered again at once, attempts kept.
pub(crate) async fn release_leases(
    inner: &Inner,
    group: &str,
    member: u64,
    leased: &Leased,
) -> Result<()> {
    let touched: Vec<(u64, u32)> = leased.lock().iter().copied().collect();
    for (id, p) in touched {
        let part = inner.part(id, p);
        let q = part.queue(group);
        settle_call(&q, "release", 0, 0, "")
            .arg(member)
            .invoke_async::<Vec<i64>>(&mut inner.conn())
            .await
            .map_err(during(format!("group `{group}`: release leases")))?;
    }
    inner.wake();
    Ok(())
}

impl RedisConsumer {
    /// One queue-mode attempt: one `queue_poll.lua` per partition (rotated
    /// so partitions take turns) until `max` messages are leased.
    pub(super) async fn poll_queue(&self, max: usize) -> Result<(Vec<Message>, Option<u64>)> {
        let view = self.beat(true, false).await?;
        let mut parts = Vec::new();
        for topic in &self.topic_list {
            // The topic cache saves two round trips per topic per poll; a
            // stale entry (topic deleted or grown) is found by the script
            // (NOTOPIC, below) or within the cache's second.
            let row = match self.inner.cached_topic(topic) {
                Some(t) => Some(t),
                None => self.inner.topic(topic).await?.inspect(|t| {
                    self.inner.cache_topic(topic, t);
                }),
            };
            if let Some(t) = row {
                parts.extend((0..t.config.partitions).map(|p| (topic.clone(), t.id, p)));
            }
        }
        let parts = self.rotated(parts);
        let mut out = Vec::new();
        let mut due: Option<u64> = None;
        for (topic, id, p) in parts {
            if out.len() >= max {
                break;
            }
            crate::migrate::queue_state(&self.inner, self.group(), id, p).await?;
            let poll = self.polls.fetch_add(1, Ordering::Relaxed);
            let tag = format!("{}:{poll}", self.member);
            // Dropped before the reply arrives (a cancelled poll), the
            // leases the script took are given back (see GiveBack).
            let mut guard = GiveBack {
                inner: Some(self.inner.clone()),
                group: self.group.clone(),
                topic_id: id,
                partition: p,
                tag: tag.clone(),
            };
            let what = format!("group `{}`: poll `{topic}`/{p}", self.group);
            let part = self.inner.part(id, p);
            let q = part.queue(self.group());
            let got: redis::RedisResult<Vec<Value>> = poll_call(&part, &q)
                .arg(self.group())
                .arg(max - out.len())
                .arg(millis(view.visibility))
                .arg(view.max_deliveries)
                .arg("")
                .arg(&tag)
                .invoke_async(&mut self.inner.conn())
                .await;
            let got = match got {
                Ok(got) => got,
                Err(e) if e.code() == Some("NOTOPIC") => {
                    // Deleted since it was cached: nothing was leased.
                    guard.inner = None;
                    self.inner.forget_topic(&topic);
                    continue;
                }
                Err(e) => return Err(map_err(&what, e)),
            };
            guard.inner = None;
            self.leased.lock().insert((id, p));
            let mut it = got.into_iter();
            let messages = reply::array(it.next().unwrap_or_default())?;
            let dead = reply::uint(&it.next().unwrap_or_default())?;
            let wait = reply::int(&it.next().unwrap_or(Value::Int(-1)))?;
            if wait >= 0 {
                let at = now_ms().saturating_add(wait as u64);
                due = Some(due.map_or(at, |d| d.min(at)));
            }
            if messages.len() % 3 != 0 {
                return Err(Error::internal(format!("{what}: short reply")));
            }
            let mut it = messages.into_iter();
            while let (Some(id), Some(a), Some(fields)) = (it.next(), it.next(), it.next()) {
                let attempt = reply::uint(&a)?.min(u32::MAX as u64) as u32;
                // The lease token, as the script wrote it into the state.
                let tok = format!("{attempt}:{tag}");
                let (stored, _) = decode_fields(id, fields, &|| format!("`{topic}`/{p}"))?;
                let token = DeliveryToken::queue(self.group.clone(), Bytes::from(tok));
                out.push(Message::from_stored(
                    topic.clone(),
                    p,
                    stored,
                    attempt,
                    token,
                ));
            }
            if dead > 0 {
                move_dead_letters(&self.inner, self.group(), &topic, id, p).await?;
            }
        }
        Ok((out, due))
    }

    /// The lease token `m` was delivered with (`attempt:member:poll`).
    fn lease_of(&self, m: &Message) -> Result<String> {
        let token = m.delivery(self.group())?;
        std::str::from_utf8(token.lease())
            .ok()
            .filter(|t| t.contains(':'))
            .map(str::to_string)
            .ok_or_else(|| Error::invalid(format!("{}: not a lease of this backend", self.what(m))))
    }

    pub(super) async fn release_leases(&self) -> Result<()> {
        release_leases(&self.inner, &self.group, self.member, &self.leased).await
    }

    /// `queue_settle.lua` for messages of one partition; one code each
    /// (0 lease lost, 1 done, 2 dead-lettered: waiting for the move).
    async fn settle(
        &self,
        topic_id: u64,
        partition: u32,
        (action, ms, reason): (&str, u64, &str),
        items: &[(u64, String)],
        what: &str,
    ) -> Result<Vec<i64>> {
        let part = self.inner.part(topic_id, partition);
        let q = part.queue(self.group());
        let max_deliveries = self.beat(false, false).await?.max_deliveries;
        let mut call = settle_call(&q, action, ms, max_deliveries, reason);
        for (o, tok) in items {
            call.arg(*o).arg(tok);
        }
        call.invoke_async(&mut self.inner.conn())
            .await
            .map_err(during(what))
    }

    /// Ack `items` (offset, lease token) of one partition: one code each
    /// (1 settled, else the lease is lost). The topic's id comes from the
    /// cache; when something did not settle, the id is looked up again and
    /// the ack retried under a new one (a topic deleted meanwhile is
    /// `TopicNotFound`).
    async fn ack_leases(
        &self,
        topic: &str,
        partition: u32,
        items: &[(u64, String)],
        what: &str,
    ) -> Result<Vec<i64>> {
        let (_, t) = self.subscribed_cached(topic, partition).await?;
        self.beat(false, false).await?;
        let codes = settle_acks(&self.inner, &self.group, t.id, partition, items, what).await?;
        if codes.iter().all(|c| *c == 1) {
            return Ok(codes);
        }
        match self.subscribed_fresh(topic, partition, t.id).await? {
            Some(t) => settle_acks(&self.inner, &self.group, t.id, partition, items, what).await,
            None => Ok(codes),
        }
    }

    /// A single ack: merged with the other acks of its partition in
    /// flight from this broker (one script call for all, see
    /// [`crate::acks`]); as [`Self::ack_leases`], a lease found lost under
    /// the cached topic id is tried again under a fresh one.
    pub(super) async fn ack_queue(&self, m: &Message) -> Result<()> {
        let lease = self.lease_of(m)?;
        let what = self.what(m);
        let (_, t) = self.subscribed_cached(&m.topic, m.partition).await?;
        self.beat(false, false).await?;
        let code = crate::acks::ack(
            &self.inner,
            &self.group,
            t.id,
            m.partition,
            m.offset,
            lease.clone(),
            &what,
        )
        .await?;
        let code = match code {
            1 => 1,
            _ => match self.subscribed_fresh(&m.topic, m.partition, t.id).await? {
                Some(t) => settle_acks(
                    &self.inner,
                    &self.group,
                    t.id,
                    m.partition,
                    &[(m.offset, lease)],
                    &what,
                )
                .await?
                .first()
                .copied()
                .unwrap_or(0),
                None => code,
            },
        };
        match code {
            1 => Ok(()),
            _ => Err(Error::lease_lost(m.offset, &what)),
        }
    }

    /// Queue-mode `ack_batch`: one round trip per partition.
    pub(super) async fn ack_batch_queue(&self, messages: &[Message]) -> Result<BatchAck> {
        let mut outcome = BatchAck::default();
        let mut by_part: ByPartition = BTreeMap::new();
        for (i, m) in messages.iter().enumerate() {
            match self.lease_of(m) {
                Ok(lease) if self.topics.contains(&m.topic) => by_part
                    .entry((m.topic.clone(), m.partition))
                    .or_default()
                    .push((i, m.offset, lease)),
                Ok(_) => outcome.failed.push((
                    i,
                    Error::invalid(format!(
                        "group `{}`: this consumer does not read topic `{}`",
                        self.group, m.topic
                    )),
                )),
                Err(e) => outcome.failed.push((i, e)),
            }
        }
        for ((topic, p), items) in by_part {
            let what = format!("group `{}`: ack a batch in `{topic}`/{p}", self.group);
            let pairs: Vec<(u64, String)> = items.iter().map(|(_, o, l)| (*o, l.clone())).collect();
            let codes = match self.ack_leases(&topic, p, &pairs, &what).await {
                Ok(codes) => codes,
                Err(e) if matches!(e.kind(), ErrorKind::Closed | ErrorKind::Unavailable) => {
                    return Err(e)
                }
                Err(e) => {
                    for (i, _, _) in items {
                        outcome
                            .failed
                            .push((i, Error::new(e.kind(), e.message().to_string())));
                    }
                    continue;
                }
            };
            for ((i, o, _), code) in items.into_iter().zip(codes) {
                if code == 1 {
                    outcome.acked += 1;
                } else {
                    outcome.failed.push((
                        i,
                        Error::lease_lost(o, &format!("group `{}`: `{topic}`/{p}@{o}", self.group)),
                    ));
                }
            }
        }
        outcome.failed.sort_by_key(|(i, _)| *i);
        Ok(outcome)
    }

    /// Queue-mode nack (contract §4b): the message is offered again after
    /// the delay, or, on its last allowed attempt, dead-lettered.
    pub(super) async fn nack_queue(
        &self,
        m: &Message,
        options: NackOptions,
        t: TopicRow,
    ) -> Result<NackOutcome> {
        let what = self.what(m);
        let lease = self.lease_of(m)?;
        let config = self.group_config().await?;
        let delay = options.delay_or(config.retry_backoff.delay_after(m.attempt));
        let codes = self
            .settle(
                t.id,
                m.partition,
                (
                    "nack",
                    millis(delay.min(MAX_REDELIVERY_DELAY)),
                    options.reason.as_deref().unwrap_or(""),
                ),
                &[(m.offset, lease)],
                &what,
            )
            .await?;
        match codes.first() {
            Some(1) => {
                self.inner.wake();
                Ok(NackOutcome::Redeliver)
            }
            Some(2) => {
                move_dead_letters(&self.inner, self.group(), &m.topic, t.id, m.partition).await?;
                Ok(NackOutcome::DeadLettered)
            }
            _ => Err(Error::lease_lost(m.offset, &what)),
        }
    }

    /// Queue-mode extend (SQS ChangeMessageVisibility): the lease now ends
    /// `by` from now, on the server's clock.
    pub(super) async fn extend_queue(&self, m: &Message, by: Duration) -> Result<()> {
        let lease = self.lease_of(m)?;
        let what = self.what(m);
        let (_, t) = self.subscribed(&m.topic, m.partition).await?;
        let codes = self
            .settle(
                t.id,
                m.partition,
                ("extend", millis(by.min(MAX_REDELIVERY_DELAY)), ""),
                &[(m.offset, lease)],
                &what,
            )
            .await?;
        match codes.first() {
            Some(1) => Ok(()),
            _ => Err(Error::lease_lost(m.offset, &what)),
        }
    }

    /// Queue-mode seek: the group's cursor in the partition moves to
    /// `target`; its leases, redeliveries and attempts there are dropped.
    pub(super) async fn seek_queue(
        &self,
        tp: &TopicPartition,
        topic_id: u64,
        target: u64,
    ) -> Result<()> {
        crate::migrate::queue_state(&self.inner, self.group(), topic_id, tp.partition).await?;
        let part = self.inner.part(topic_id, tp.partition);
        let q = part.queue(self.group());
        SCRIPTS
            .queue_seek
            .key(&q.cursor)
            .key(&q.state)
            .key(&q.dead)
            .key(&part.groups)
            .arg(self.group())
            .arg(target)
            .invoke_async::<i64>(&mut self.inner.conn())
            .await
            .map_err(during(format!("group `{}`: seek {tp}", self.group)))?;
        Ok(())
    }

    /// Queue mode: every partition of the member's topics is its to read.
    pub(super) async fn queue_partitions(&self) -> Result<Vec<TopicPartition>> {
        let mut out = Vec::new();
        for topic in &self.topic_list {
            if let Some(t) = self.inner.topic(topic).await? {
                out.extend((0..t.config.partitions).map(|p| TopicPartition::new(topic.clone(), p)));
            }
        }
        Ok(out)
    }
}

/// A queue-mode poll script in flight. Dropped while armed (the poll was
/// cancelled before its reply arrived), it gives back, in the background,
/// the leases that script took: they are found by the poll's tag in their
/// tokens, their attempts are restored and they are offered again at once.
/// The give-back goes out on the same multiplexed connection after the
/// poll, so the server runs it after the poll if the poll ran at all.
struct GiveBack {
    inner: Option<Arc<Inner>>,
    group: Arc<str>,
    topic_id: u64,
    partition: u32,
    tag: String,
}

impl Drop for GiveBack {
    fn drop(&mut self) {
        let Some(inner) = self.inner.take() else {
            return;
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (group, id, p, tag) = (
            self.group.clone(),
            self.topic_id,
            self.partition,
            std::mem::take(&mut self.tag),
        );
        rt.spawn(async move {
            let part = inner.part(id, p);
            let q = part.queue(&group);
            let done = settle_call(&q, "giveback", 0, 0, "")
                .arg(&tag)
                .invoke_async::<Vec<i64>>(&mut inner.conn())
                .await;
            match done {
                Ok(_) => inner.wake(),
                Err(e) => tracing::warn!(group = %group, error = %e, "could not give back the leases of a dropped poll; they return when they expire"),
            }
        });
    }
}

/// Move the dead letters waiting in one partition of a queue-mode group
/// to its DLQ topic: claim them (so two members never move the same one
/// at once), append each, then settle it. A crash between append and
/// settle leaves a duplicate in the DLQ after the claim lapses, never a
/// loss.
async fn move_dead_letters(
    inner: &Inner,
    group: &str,
    topic: &str,
    topic_id: u64,
    partition: u32,
) -> Result<usize> {
    let what = format!("group `{group}`: dead-letter from `{topic}`/{partition}");
    let part = inner.part(topic_id, partition);
    let q = part.queue(group);
    let claimed: Vec<Value> = SCRIPTS
        .queue_dead
        .key(&q.dead)
        .arg("claim")
        .arg(100)
        .arg(millis(DEAD_CLAIM))
        .invoke_async(&mut inner.conn())
        .await
        .map_err(during(&what))?;
    if claimed.is_empty() {
        return Ok(0);
    }
    let config = inner.group_meta(group).await?.1;
    let mut done = Vec::new();
    let mut it = claimed.into_iter();
    while let (Some(o), Some(a), Some(e)) = (it.next(), it.next(), it.next()) {
        let offset = reply::uint(&o)?;
        let attempts = reply::uint(&a)?.min(u32::MAX as u64) as u32;
        let error = reply::string(e)?;
        let (_, found) = inner.read(topic, topic_id, partition, offset, 1).await?;
        match found.into_iter().next() {
            Some(stored) if stored.offset == offset => {
                let dead = DeadLetter {
                    topic,
                    partition,
                    offset,
                    group,
                    attempts,
                    error: (!error.is_empty()).then_some(error.as_str()),
                    failed_at: now_ms(),
                    idempotency_key: stored.idempotency_key.as_deref(),
                };
                dead_letter(
                    inner,
                    &config,
                    &dead,
                    stored.key,
                    stored.value,
                    &stored.headers,
                )
                .await?;
            }
            // Removed by retention meanwhile: nothing left to move.
            _ => {}
        }
        done.push(offset);
    }
    let mut call = SCRIPTS.queue_dead.prepare_invoke();
    call.key(&q.dead).arg("done");
    for o in &done {
        call.arg(*o);
    }
    call.invoke_async::<i64>(&mut inner.conn())
        .await
        .map_err(during(&what))?;
    Ok(done.len())
}

/// Move dead letters of expired last-attempt leases even when nobody
/// polls: for every queue-mode group this broker has members in, each
/// partition is polled for nothing (which expires leases) and its waiting
/// moves are made.
pub(crate) async fn sweep(inner: Weak<Inner>) {
    loop {
        tokio::time::sleep(SWEEP_EVERY).await;
        let Some(i) = inner.upgrade() else { return };
        if i.closed.load(Ordering::Acquire) {
            return;
        }
        let groups: BTreeSet<Arc<str>> = i.members.lock().keys().map(|(g, _)| g.clone()).collect();
        for g in groups {
            if let Err(e) = sweep_group(&i, &g).await {
                tracing::debug!(group = %g, error = %e, "dead-letter sweep failed; will retry");
            }
        }
    }
}

async fn sweep_group(inner: &Inner, group: &str) -> Result<()> {
    let (mode, config, _) = inner.group_meta(group).await?;
    if mode != DeliveryMode::Queue {
        return Ok(());
    }
    let k = inner.group_keys(group);
    let topics: Vec<String> = redis::cmd("SMEMBERS")
        .arg(&k.topics)
        .query_async(&mut inner.conn())
        .await
        .map_err(during(format!("sweep group `{group}`")))?;
    for topic in topics {
        let Some(t) = inner.topic(&topic).await? else {
            continue;
        };
        for p in 0..t.config.partitions {
            crate::migrate::queue_state(inner, group, t.id, p).await?;
            let part = inner.part(t.id, p);
            let q = part.queue(group);
            let got: Vec<Value> = poll_call(&part, &q)
                .arg(group)
                .arg(0)
                .arg(millis(config.visibility_timeout))
                .arg(config.dlq.max_deliveries)
                .arg("")
                .arg(0)
                .invoke_async(&mut inner.conn())
                .await
                .map_err(during(format!("sweep group `{group}`")))?;
            if got.get(1).map(reply::uint).transpose()?.unwrap_or(0) > 0 {
                move_dead_letters(inner, group, &topic, t.id, p).await?;
            }
        }
    }
    Ok(())
}
