//! A member of a group. Stream mode keeps the member's own position,
//! nack retries and passed runs in the process (as a Kafka consumer keeps
//! its fetch position); ownership, generations and commits live in the
//! server and are checked in the statement that commits. Queue mode keeps
//! nothing in the process: leases are rows.

use crate::broker::{create_topic_in, offset_for_timestamp, Inner, FALLBACK_POLL};
use crate::error::during;
use crate::group::{heartbeat, leave};
use crate::produce::append;
use crate::queries::{existing_topic, Bounds};
use async_trait::async_trait;
use conveyor_core::backend::{poll_until, MemberPartition};
use conveyor_core::dlq::{self, DeadLetter};
use conveyor_core::{
    partitioner, BatchAck, Consumer, DeliveryMode, Error, ErrorKind, GroupConfig, Message,
    NackOptions, NackOutcome, Result, SeekTo, TopicConfig, TopicPartition,
};
use parking_lot::Mutex;
use sqlx::{PgConnection, Row};
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::now_ms;

mod queue;
mod stream;

use queue::ack_leases;
pub(crate) use queue::{sweep, AckItem, ACK_CALLS, ACK_MERGE_MAX};

/// This member's state of one owned stream-mode partition.
type Part = MemberPartition;

/// An owned partition as the server sees it.
struct Owned {
    tp: TopicPartition,
    topic_id: i64,
    generation: u64,
    committed: Option<u64>,
    bounds: Bounds,
}

/// A consumer-group member on PostgreSQL.
pub(crate) struct PgConsumer {
    inner: Arc<Inner>,
    group: Arc<str>,
    member: i64,
    topics: BTreeSet<String>,
    topic_list: Vec<String>,
    mode: DeliveryMode,
    closed: AtomicBool,
    rotate: AtomicUsize,
    /// Queue mode: this member's poll number (see [`PollGuard`]).
    polls: AtomicU64,
    parts: Mutex<HashMap<TopicPartition, Part>>,
    /// The group's session timeout as of the last heartbeat (the latest
    /// joiner's setting), and when that heartbeat began.
    session: Mutex<Duration>,
    last_beat: Mutex<Option<Instant>>,
}

impl PgConsumer {
    pub(crate) fn new(
        inner: Arc<Inner>,
        group: &str,
        member: i64,
        topics: BTreeSet<String>,
        mode: DeliveryMode,
        session: Duration,
    ) -> Self {
        inner.members.lock().insert((group.into(), member));
        PgConsumer {
            inner,
            group: group.into(),
            member,
            topic_list: topics.iter().cloned().collect(),
            topics,
            mode,
            closed: AtomicBool::new(false),
            rotate: AtomicUsize::new(0),
            polls: AtomicU64::new(0),
            parts: Mutex::new(HashMap::new()),
            session: Mutex::new(session),
            last_beat: Mutex::new(Some(Instant::now())),
        }
    }

    fn group(&self) -> &str {
        &self.group
    }

    fn check_open(&self) -> Result<()> {
        self.inner.check_open()?;
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::new(
                ErrorKind::Closed,
                format!("group `{}`: this consumer is closed", self.group),
            ));
        }
        Ok(())
    }

    fn what(&self, m: &Message) -> String {
        format!("group `{}`: {}", self.group, m.position())
    }

    /// Heartbeat (see [`heartbeat`]), at most every quarter of the
    /// session timeout: a member that heartbeat that recently cannot have
    /// been removed, and the others' expiry is checked by every member's
    /// heartbeats. Saves a round trip on most acks and commits.
    async fn heartbeat(&self, rejoin: bool) -> Result<()> {
        if let Some(at) = *self.last_beat.lock() {
            if at.elapsed() < *self.session.lock() / 4 {
                return Ok(());
            }
        }
        let started = Instant::now();
        heartbeat(
            &self.inner,
            &self.group,
            self.member,
            &self.topic_list,
            rejoin,
        )
        .await
        .map(|session| *self.session.lock() = session)?;
        *self.last_beat.lock() = Some(started);
        Ok(())
    }

    fn rotated<T>(&self, mut items: Vec<T>) -> Vec<T> {
        if !items.is_empty() {
            let start = self.rotate.fetch_add(1, Ordering::Relaxed) % items.len();
            items.rotate_left(start);
        }
        items
    }

    /// The topic is read by this consumer and the partition exists: its
    /// topic id and bounds.
    async fn subscribed(
        &self,
        topic: &str,
        partition: u32,
    ) -> Result<(TopicPartition, i64, Bounds)> {
        let row = sqlx::query(
            "SELECT t.id, t.partitions, p.log_start, p.next_offset FROM topics t
               LEFT JOIN partitions p ON p.topic_id = t.id AND p.partition = $2 WHERE t.name = $1",
        )
        .bind(topic)
        .bind(partition as i32)
        .fetch_optional(&self.inner.pool)
        .await
        .map_err(during(format!("look up `{topic}`/{partition}")))?
        .ok_or_else(|| Error::topic_not_found(topic))?;
        let partitions = row.get::<i32, _>(1) as u32;
        let (Some(log_start), Some(log_end)) =
            (row.get::<Option<i64>, _>(2), row.get::<Option<i64>, _>(3))
        else {
            return Err(Error::partition_out_of_range(topic, partition, partitions));
        };
        if !self.topics.contains(topic) {
            return Err(Error::invalid(format!(
                "group `{}`: this consumer does not read topic `{topic}`",
                self.group
            )));
        }
        Ok((
            TopicPartition::new(topic, partition),
            row.get(0),
            Bounds {
                log_start: log_start as u64,
                log_end: log_end as u64,
            },
        ))
    }

    async fn group_config(&self) -> Result<GroupConfig> {
        let json: serde_json::Value =
            sqlx::query_scalar("SELECT config FROM groups WHERE name = $1")
                .bind(self.group())
                .fetch_optional(&self.inner.pool)
                .await
                .map_err(during(format!("read group `{}`", self.group)))?
                .ok_or_else(|| Error::group_not_found(&self.group))?;
        serde_json::from_value(json).map_err(|e| {
            Error::internal(format!(
                "group `{}`: stored config is unreadable: {e}",
                self.group
            ))
        })
    }
}

/// Append `m`'s dead letter to the group's DLQ topic (created on demand
/// with one partition) in the caller's transaction, so the move and the
/// settle that follows commit together (contract §5).
async fn dead_letter(
    tx: &mut PgConnection,
    inner: &Inner,
    group: &str,
    config: &GroupConfig,
    m: &Message,
    attempts: u32,
    reason: Option<&str>,
) -> Result<()> {
    let dead = DeadLetter {
        topic: &m.topic,
        partition: m.partition,
        offset: m.offset,
        group,
        attempts,
        error: reason,
        failed_at: now_ms(),
        idempotency_key: m.idempotency_key.as_deref(),
    };
    let record = dlq::dead_letter_record(m.key.clone(), m.value.clone(), &m.headers, &dead);
    let topic = config.dlq.topic_for(&m.topic, group);
    create_topic_in(&mut *tx, &topic, &TopicConfig::new(1), true).await?;
    let t = existing_topic(&mut *tx, &topic).await?;
    let partition = {
        let mut rr = inner.round_robin.lock();
        partitioner::route(
            &record,
            t.config.partitions,
            rr.entry(topic.clone()).or_insert(0),
        )
    };
    append(&mut *tx, &topic, t.id, partition, &[&record], now_ms()).await?;
    tracing::info!(group, topic = %m.topic, partition = m.partition, offset = m.offset, attempts, dlq = %topic, "dead-lettered");
    Ok(())
}

#[async_trait]
impl Consumer for PgConsumer {
    async fn group_config(&self) -> Result<GroupConfig> {
        self.inner
            .bounded(Duration::ZERO, async move {
                self.check_open()?;
                PgConsumer::group_config(self).await
            })
            .await
    }

    async fn poll(&self, max: usize, timeout: Duration) -> Result<Vec<Message>> {
        self.inner
            .bounded(timeout, async move {
                self.check_open()?;
                if max == 0 {
                    return Ok(Vec::new());
                }
                poll_until(
                    self.inner.changed.subscribe(),
                    timeout,
                    || (*self.session.lock() / 4).min(FALLBACK_POLL),
                    || async {
                        match self.mode {
                            DeliveryMode::Stream => self.poll_stream(max).await,
                            _ => self.poll_queue(max).await,
                        }
                    },
                    || self.check_open(),
                )
                .await
            })
            .await
    }

    async fn ack(&self, m: &Message) -> Result<()> {
        self.inner
            .bounded(Duration::ZERO, async move {
                self.check_open()?;
                match self.mode {
                    DeliveryMode::Stream => self.ack_stream(m).await,
                    _ => self.ack_queue(m).await,
                }
            })
            .await
    }

    async fn ack_batch(&self, messages: &[Message]) -> Result<BatchAck> {
        self.inner
            .bounded(Duration::ZERO, async move {
                self.check_open()?;
                let mut outcome = BatchAck::default();
                if self.mode == DeliveryMode::Stream {
                    for (i, m) in messages.iter().enumerate() {
                        match self.ack_stream(m).await {
                            Ok(()) => outcome.acked += 1,
                            Err(e)
                                if matches!(
                                    e.kind(),
                                    ErrorKind::Closed | ErrorKind::Unavailable
                                ) =>
                            {
                                return Err(e)
                            }
                            Err(e) => outcome.failed.push((i, e)),
                        }
                    }
                    return Ok(outcome);
                }
                let mut batch = Vec::new();
                for (i, m) in messages.iter().enumerate() {
                    match self.lease_of(m) {
                        Ok(lease) if self.topics.contains(&m.topic) => batch.push((i, m, lease)),
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
                if !batch.is_empty() {
                    self.heartbeat(false).await?;
                    let items: Vec<AckItem> = batch
                        .iter()
                        .map(|(_, m, l)| (m.topic.clone(), m.partition as i32, m.offset as i64, *l))
                        .collect();
                    let settled = ack_leases(&self.inner, self.group(), &items).await?;
                    for ((i, m, _), settled) in batch.into_iter().zip(settled) {
                        if settled {
                            outcome.acked += 1;
                        } else {
                            outcome
                                .failed
                                .push((i, Error::lease_lost(m.offset, &self.what(m))));
                        }
                    }
                }
                outcome.failed.sort_by_key(|(i, _)| *i);
                Ok(outcome)
            })
            .await
    }

    async fn nack(&self, m: &Message, options: NackOptions) -> Result<NackOutcome> {
        self.inner
            .bounded(Duration::ZERO, async move {
                self.check_open()?;
                let token = m.delivery(self.group())?;
                let what = self.what(m);
                let (tp, _, b) = self.subscribed(&m.topic, m.partition).await?;
                match self.mode {
                    DeliveryMode::Stream => {
                        self.nack_stream(m, options, token.generation(), &what, tp, &b)
                            .await
                    }
                    _ => self.nack_queue(m, options, &what, tp).await,
                }
            })
            .await
    }

    async fn extend(&self, m: &Message, by: Duration) -> Result<()> {
        self.inner
            .bounded(Duration::ZERO, async move {
                self.check_open()?;
                if self.mode == DeliveryMode::Stream {
                    m.delivery(self.group())?;
                    return Err(Error::wrong_mode(
                        &self.group,
                        "extend",
                        DeliveryMode::Queue,
                    ));
                }
                self.extend_lease(m, by).await
            })
            .await
    }

    async fn commit(&self, topic: &str, partition: u32, offset: u64) -> Result<()> {
        self.inner
            .bounded(Duration::ZERO, async move {
                self.check_open()?;
                let (tp, _, b) = self.subscribed(topic, partition).await?;
                if self.mode != DeliveryMode::Stream {
                    return Err(Error::wrong_mode(
                        &self.group,
                        "commit",
                        DeliveryMode::Stream,
                    ));
                }
                self.heartbeat(false).await?;
                if offset > b.log_end {
                    // Fencing first, as the embedded engine does.
                    self.check_owner(&tp, None).await?;
                }
                self.commit_offset(&tp, offset, None, false).await?;
                if let Some(part) = self.parts.lock().get_mut(&tp) {
                    part.committed(offset);
                }
                Ok(())
            })
            .await
    }

    async fn seek(&self, topic: &str, partition: u32, to: SeekTo) -> Result<()> {
        self.inner.bounded(Duration::ZERO, async move {
            self.check_open()?;
            let (tp, id, b) = self.subscribed(topic, partition).await?;
            let target = match to {
                SeekTo::Beginning => b.log_start,
                SeekTo::End => b.log_end,
                SeekTo::Offset(n) => n,
                SeekTo::Timestamp(t) => {
                    offset_for_timestamp(&self.inner.pool, topic, id, partition, t).await?
                }
            }
            .clamp(b.log_start, b.log_end.max(b.log_start));
            self.heartbeat(true).await?;
            match self.mode {
                DeliveryMode::Stream => {
                    let generation = self.check_owner(&tp, None).await?;
                    let mut parts = self.parts.lock();
                    let part = parts.entry(tp).or_default();
                    part.at_generation(generation);
                    part.seek(target);
                }
                _ => {
                    let what = format!("group `{}`: seek {tp}", self.group);
                    let mut tx = crate::tx::Tx::begin(&self.inner.pool).await.map_err(during(&what))?;
                    // The cursor first: a poll holding it finishes before
                    // the leases it took are deleted, and none starts until
                    // this commits (no lease ever exists past a cursor).
                    sqlx::query(
                        "INSERT INTO queue_cursors (group_name, topic, partition, next) VALUES ($1, $2, $3, $4)
                         ON CONFLICT (group_name, topic, partition) DO UPDATE SET next = excluded.next",
                    )
                    .bind(self.group())
                    .bind(&tp.topic)
                    .bind(tp.partition as i32)
                    .bind(target as i64)
                    .execute(&mut *tx)
                    .await
                    .map_err(during(&what))?;
                    sqlx::query(
                        "DELETE FROM leases WHERE group_name = $1 AND topic = $2 AND partition = $3",
                    )
                    .bind(self.group())
                    .bind(&tp.topic)
                    .bind(tp.partition as i32)
                    .execute(&mut *tx)
                    .await
                    .map_err(during(&what))?;
                    sqlx::query("SELECT pg_notify('conveyor.' || current_schema(), 'seek')")
                        .execute(&mut *tx)
                        .await
                        .map_err(during(&what))?;
                    tx.commit().await.map_err(during(&what))?;
                }
            }
            self.inner.wake();
            Ok(())
        })
        .await
    }

    async fn assignment(&self) -> Result<Vec<TopicPartition>> {
        self.inner.bounded(Duration::ZERO, async move {
            self.check_open()?;
            self.heartbeat(true).await?;
            match self.mode {
                DeliveryMode::Stream => {
                    let mut conn = self.inner.conn(|| format!("group `{}`: assignment", self.group)).await?;
                    Ok(self.owned(&mut conn).await?.into_iter().map(|o| o.tp).collect())
                }
                _ => {
                    let rows = sqlx::query(
                        "SELECT t.name, p.partition FROM topics t JOIN partitions p ON p.topic_id = t.id
                          WHERE t.name = ANY($1) ORDER BY t.name, p.partition",
                    )
                    .bind(&self.topic_list)
                    .fetch_all(&self.inner.pool)
                    .await
                    .map_err(during(format!("assignment in group `{}`", self.group)))?;
                    Ok(rows
                        .iter()
                        .map(|r| TopicPartition::new(r.get::<String, _>(0), r.get::<i32, _>(1) as u32))
                        .collect())
                }
            }
        })
        .await
    }

    async fn generation(&self) -> Result<u64> {
        self.inner
            .bounded(Duration::ZERO, async move {
                self.check_open()?;
                self.heartbeat(true).await?;
                let g: Option<i64> =
                    sqlx::query_scalar("SELECT generation FROM groups WHERE name = $1")
                        .bind(self.group())
                        .fetch_optional(&self.inner.pool)
                        .await
                        .map_err(during(format!("generation of group `{}`", self.group)))?;
                Ok(g.unwrap_or(0) as u64)
            })
            .await
    }

    async fn close(&self) -> Result<()> {
        self.inner
            .bounded(Duration::ZERO, async move {
                if self.closed.swap(true, Ordering::AcqRel) {
                    return Ok(());
                }
                self.inner
                    .members
                    .lock()
                    .remove(&(self.group.clone(), self.member));
                if self.inner.check_open().is_err() {
                    return Ok(());
                }
                leave(&self.inner, &self.group, self.member).await
            })
            .await
    }
}

impl Drop for PgConsumer {
    fn drop(&mut self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        self.inner
            .members
            .lock()
            .remove(&(self.group.clone(), self.member));
        if self.inner.check_open().is_err() {
            return;
        }
        // Leave at once rather than after the session timeout, if a
        // runtime is there to do it.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let inner = self.inner.clone();
            let group = self.group.clone();
            let member = self.member;
            rt.spawn(async move {
                if let Err(e) = leave(&inner, &group, member).await {
                    tracing::debug!(group = %group, member, error = %e, "leave on drop failed");
                }
            });
        }
    }
}
