//! A member of a group. Stream mode keeps the member's own position,
//! nack retries and passed runs in the process (as a Kafka consumer keeps
//! its fetch position); ownership, generations and commits live in the
//! server and are checked in the statement that commits. Queue mode keeps
//! nothing in the process: leases are rows.

use crate::broker::{create_topic_in, offset_for_timestamp, Inner, FALLBACK_POLL};
use crate::error::during;
use crate::group::{heartbeat, leave};
use crate::produce::append;
use crate::queries::{self, existing_topic, Bounds};
use async_trait::async_trait;
use conveyor_core::backend::{poll_until, MemberPartition, MergedCall, StoredMessage};
use conveyor_core::dlq::{self, DeadLetter};
use conveyor_core::{
    partitioner, BatchAck, Consumer, DeliveryMode, DeliveryToken, Error, ErrorKind, GroupConfig,
    Message, NackOptions, NackOutcome, Result, SeekTo, TopicConfig, TopicPartition,
    MAX_REDELIVERY_DELAY,
};
use parking_lot::Mutex;
use sqlx::{PgConnection, Row};
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::{millis, now_ms};

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

    // ---------------------------------------------------------------
    // Stream mode
    // ---------------------------------------------------------------

    /// The partitions this member owns now, with commits and bounds.
    async fn owned(&self, conn: &mut crate::spare::Conn) -> Result<Vec<Owned>> {
        let rows = sqlx::query(
            "SELECT o.topic, o.partition, o.generation, c.committed, p.log_start, p.next_offset, t.id
               FROM owners o
               JOIN topics t ON t.name = o.topic
               JOIN partitions p ON p.topic_id = t.id AND p.partition = o.partition
               LEFT JOIN commits c ON c.group_name = o.group_name AND c.topic = o.topic AND c.partition = o.partition
              WHERE o.group_name = $1 AND o.member_id = $2
              ORDER BY o.topic, o.partition",
        )
        .bind(self.group())
        .bind(self.member)
        .fetch_all(&mut **conn)
        .await
        .map_err(during(format!("read the assignment in group `{}`", self.group)));
        let rows = conn.checked(rows)?;
        Ok(rows
            .iter()
            .map(|r| Owned {
                tp: TopicPartition::new(r.get::<String, _>(0), r.get::<i32, _>(1) as u32),
                generation: r.get::<i64, _>(2) as u64,
                committed: r.get::<Option<i64>, _>(3).map(|c| c as u64),
                bounds: Bounds {
                    log_start: r.get::<i64, _>(4) as u64,
                    log_end: r.get::<i64, _>(5) as u64,
                },
                topic_id: r.get(6),
            })
            .collect())
    }

    /// One stream-mode attempt. Cancel safe: all reads happen before any
    /// position moves; the positions move under the lock with no await.
    async fn poll_stream(&self, max: usize) -> Result<(Vec<Message>, Option<u64>)> {
        self.heartbeat(true).await?;
        let mut conn = self
            .inner
            .conn(&format!("poll group `{}`", self.group))
            .await?;
        let owned = self.rotated(self.owned(&mut conn).await?);
        let now = now_ms();
        let mut due = None;
        let mut plan = Vec::new();
        {
            let mut parts = self.parts.lock();
            let keep: BTreeSet<&TopicPartition> = owned.iter().map(|o| &o.tp).collect();
            parts.retain(|tp, _| keep.contains(tp));
            for o in &owned {
                let part = parts.entry(o.tp.clone()).or_default();
                part.at_generation(o.generation);
                let pos = part
                    .position
                    .unwrap_or_else(|| o.committed.unwrap_or(o.bounds.log_start))
                    .max(o.bounds.log_start);
                part.position = Some(pos);
                if let Some(at) = part.retry_wait(pos, now) {
                    due = Some(due.map_or(at, |d: u64| d.min(at)));
                    continue;
                }
                if pos < o.bounds.log_end {
                    plan.push((o, pos));
                }
            }
        }
        let mut reads = Vec::new();
        let mut planned = 0usize;
        for (o, pos) in plan {
            if planned >= max {
                break;
            }
            let found = queries::read(
                &mut *conn,
                &o.tp.topic,
                o.topic_id,
                o.tp.partition,
                pos,
                max - planned,
            )
            .await;
            let found = conn.checked(found)?;
            planned += found.len();
            reads.push((o, pos, found));
        }
        drop(conn);
        let mut out = Vec::with_capacity(planned);
        let mut commits = Vec::new();
        {
            let mut parts = self.parts.lock();
            for (o, pos, found) in reads {
                let Some(part) = parts.get_mut(&o.tp) else {
                    continue;
                };
                if part.generation != o.generation || part.position != Some(pos) {
                    continue; // a seek, nack or rebalance moved it meanwhile
                }
                if part.deliver(&self.group, &o.tp, found, &mut out) {
                    due = Some(now);
                    let base = o.committed.unwrap_or(o.bounds.log_start);
                    let to = part.carry(base);
                    if Some(to) != o.committed && to > base.min(o.committed.unwrap_or(0)) {
                        commits.push((o.tp.clone(), to, o.generation));
                    }
                }
            }
        }
        for (tp, to, generation) in commits {
            match self.commit_offset(&tp, to, Some(generation), true).await {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::Fenced => {}
                Err(e) => return Err(e),
            }
        }
        Ok((out, due))
    }

    /// Commit `offset` for `tp` if this member owns it (in `generation`,
    /// if given) and it is not past the log end: one statement, with a
    /// share lock on the owner row so a rebalance cannot slip between the
    /// check and the write. `cumulative` never moves the commit back.
    async fn commit_offset(
        &self,
        tp: &TopicPartition,
        offset: u64,
        generation: Option<u64>,
        cumulative: bool,
    ) -> Result<()> {
        let what = format!("group `{}`: commit {tp}", self.group);
        let mut conn = self.inner.conn(&what).await?;
        let done = sqlx::query(COMMIT)
            .bind(self.group())
            .bind(&tp.topic)
            .bind(tp.partition as i32)
            .bind(offset.min(i64::MAX as u64) as i64)
            .bind(self.member)
            .bind(generation.map(|g| g as i64))
            .bind(cumulative)
            .fetch_optional(&mut *conn)
            .await
            .map_err(during(&what));
        let done = conn.checked(done)?;
        drop(conn);
        if done.is_some() {
            return Ok(());
        }
        Err(self.why_not_committed(tp, offset, generation).await)
    }

    /// Why [`COMMIT`] changed nothing: fenced, or past the log end.
    async fn why_not_committed(
        &self,
        tp: &TopicPartition,
        offset: u64,
        generation: Option<u64>,
    ) -> Error {
        let row = sqlx::query(
            "SELECT (SELECT count(*) FROM members WHERE group_name = $1 AND member_id = $4),
                    (SELECT member_id FROM owners WHERE group_name = $1 AND topic = $2 AND partition = $3),
                    (SELECT generation FROM owners WHERE group_name = $1 AND topic = $2 AND partition = $3),
                    (SELECT generation FROM groups WHERE name = $1),
                    (SELECT p.next_offset FROM partitions p JOIN topics t ON t.id = p.topic_id
                      WHERE t.name = $2 AND p.partition = $3),
                    (SELECT partitions FROM topics WHERE name = $2)",
        )
        .bind(self.group())
        .bind(&tp.topic)
        .bind(tp.partition as i32)
        .bind(self.member)
        .fetch_one(&self.inner.pool)
        .await;
        let row = match row {
            Ok(r) => r,
            Err(e) => return during(format!("group `{}`: commit {tp}", self.group))(e),
        };
        let member_alive = row.get::<i64, _>(0) > 0;
        let owner: Option<i64> = row.get(1);
        let owned_in: Option<i64> = row.get(2);
        let group_generation: i64 = row.get::<Option<i64>, _>(3).unwrap_or(0);
        let log_end: Option<i64> = row.get(4);
        let partitions: Option<i32> = row.get(5);
        match (partitions, log_end) {
            (None, _) => return Error::topic_not_found(&tp.topic),
            (Some(n), None) => {
                return Error::partition_out_of_range(&tp.topic, tp.partition, n as u32)
            }
            _ => {}
        }
        if !member_alive {
            return Error::new(
                ErrorKind::Fenced,
                format!(
                    "group `{}`: this member was removed from the group (session timeout or close); \
                     generation is now {group_generation}",
                    self.group
                ),
            );
        }
        if owner != Some(self.member) {
            return Error::new(
                ErrorKind::Fenced,
                format!(
                    "group `{}`: {tp} is not assigned to this member in generation {group_generation}",
                    self.group
                ),
            );
        }
        if let (Some(g), Some(at)) = (generation, owned_in) {
            if g as i64 != at {
                return Error::new(
                    ErrorKind::Fenced,
                    format!(
                        "group `{}`: {tp} was delivered in generation {g} but was reassigned in generation {at}",
                        self.group
                    ),
                );
            }
        }
        match log_end {
            // Compared as u64: `offset as i64` wraps for offsets past 2^63.
            Some(end) if offset > end.max(0) as u64 => Error::invalid(format!(
                "group `{}`: cannot commit offset {offset} for {tp}: log end is {end}",
                self.group
            )),
            None => Error::topic_not_found(&tp.topic),
            _ => Error::internal(format!(
                "group `{}`: commit of {tp} changed nothing",
                self.group
            )),
        }
    }

    /// Stream mode: this member owns `tp` (in `generation`, if given);
    /// returns the generation it owns it in.
    async fn check_owner(&self, tp: &TopicPartition, generation: Option<u64>) -> Result<u64> {
        let owned_in: Option<i64> = sqlx::query_scalar(
            "SELECT generation FROM owners WHERE group_name = $1 AND topic = $2 AND partition = $3
               AND member_id = $4",
        )
        .bind(self.group())
        .bind(&tp.topic)
        .bind(tp.partition as i32)
        .bind(self.member)
        .fetch_optional(&self.inner.pool)
        .await
        .map_err(during(format!(
            "group `{}`: check the owner of {tp}",
            self.group
        )))?;
        match (owned_in, generation) {
            (Some(at), Some(g)) if at as u64 == g => Ok(g),
            (Some(at), None) => Ok(at as u64),
            _ => Err(self.why_not_committed(tp, 0, generation).await),
        }
    }

    /// Stream-mode ack: commit the offset after `m` (carried over passed
    /// runs), fenced by the generation `m` was delivered in.
    async fn ack_stream(&self, m: &Message) -> Result<()> {
        let token = m.delivery(self.group())?;
        let generation = token.generation();
        if !self.topics.contains(&m.topic) {
            return Err(Error::invalid(format!(
                "group `{}`: this consumer does not read topic `{}`",
                self.group, m.topic
            )));
        }
        let tp = TopicPartition::new(m.topic.clone(), m.partition);
        // The log end, the topic and the partition are checked by the
        // commit statement (and, when it refuses, explained by
        // `why_not_committed`): one round trip.
        let next = m.offset.checked_add(1).ok_or_else(|| {
            Error::invalid(format!("{}: offset {} has no next", self.what(m), m.offset))
        })?;
        self.heartbeat(false).await?;
        let to = {
            let mut parts = self.parts.lock();
            match parts.get_mut(&tp) {
                Some(part) if part.generation == generation => part.carry(next),
                _ => next,
            }
        };
        self.commit_offset(&tp, to, Some(generation), true).await?;
        if let Some(part) = self.parts.lock().get_mut(&tp) {
            part.committed(to);
        }
        Ok(())
    }

    // ---------------------------------------------------------------
    // Queue mode
    // ---------------------------------------------------------------

    /// One queue-mode attempt: one statement, `queue_poll` (see
    /// `migrations/0002_queue_poll.sql`), which re-leases what is due and
    /// takes fresh offsets from the partitions' cursors on the server.
    /// Dropped before its answer arrived, the poll gives back exactly the
    /// leases it took (see [`PollGuard`]).
    async fn poll_queue(&self, max: usize) -> Result<(Vec<Message>, Option<u64>)> {
        self.heartbeat(true).await?;
        let what = format!("poll group `{}`", self.group);
        let poll = self.polls.fetch_add(1, Ordering::Relaxed) as i64;
        let conn = self.inner.conn(&what).await?;
        let mut guard = PollGuard {
            conn: Some(conn),
            group: self.group.clone(),
            member: self.member,
            poll,
        };
        let rows = sqlx::query("SELECT * FROM queue_poll($1, $2, $3, $4, $5, $6)")
            .bind(self.group())
            .bind(&self.topic_list)
            .bind(max.min(i32::MAX as usize) as i32)
            .bind(self.member)
            .bind(poll)
            .bind((self.rotate.fetch_add(1, Ordering::Relaxed) % (i32::MAX as usize)) as i32)
            .fetch_all(&mut **guard.conn.as_mut().expect("held until the answer"))
            .await
            .map_err(|e| match &e {
                sqlx::Error::Database(d) if d.code().as_deref() == Some("P0002") => {
                    Error::group_not_found(&self.group)
                }
                _ => during(&what)(e),
            });
        // Answered (or refused): nothing to give back.
        drop(guard.conn.take());
        let rows = rows?;
        let mut out = Vec::with_capacity(rows.len());
        // Leases to settle unseen: records removed by retention meanwhile,
        // and records redriven to another group.
        let mut settle: Vec<AckItem> = Vec::new();
        for r in &rows {
            let tp = TopicPartition::new(r.get::<String, _>(0), r.get::<i32, _>(1) as u32);
            let offset: i64 = r.get(2);
            let lease: i64 = r.get(3);
            let attempts = r.get::<i32, _>(4) as u32;
            let Some(value) = r.get::<Option<Vec<u8>>, _>(7) else {
                settle.push((tp.topic, tp.partition as i32, offset, lease));
                continue;
            };
            let headers: Vec<u8> = r.get(8);
            let stored = StoredMessage {
                offset: offset as u64,
                timestamp: r.get::<i64, _>(5) as u64,
                key: r.get::<Option<Vec<u8>>, _>(6).map(bytes::Bytes::from),
                value: bytes::Bytes::from(value),
                headers: conveyor_core::backend::decode_headers(&headers, &|| {
                    format!("`{}`/{} offset {offset}", tp.topic, tp.partition)
                })?,
                idempotency_key: r.get(9),
                deliver_at: r.get::<Option<i64>, _>(10).map(|t| t as u64),
            };
            if !dlq::is_for_group(&stored.headers, self.group()) {
                settle.push((tp.topic, tp.partition as i32, offset, lease));
                continue;
            }
            out.push(self.leased(&tp, stored, lease, attempts));
        }
        if !settle.is_empty() {
            ack_leases(&self.inner, self.group(), &settle).await?;
        }
        if !out.is_empty() {
            return Ok((out, None));
        }
        if !settle.is_empty() {
            // Only unseen ones this time: look again at once.
            return Ok((out, Some(now_ms())));
        }
        // Nothing: dead-letter leases expired on their last attempt, and
        // say when the next lease comes due.
        let idle = sqlx::query(
            r#"SELECT min(CASE WHEN l.member_id IS NULL THEN l.not_before ELSE l.deadline END),
                      count(*) FILTER (WHERE l.member_id IS NOT NULL AND l.deadline <= now_ms()
                                         AND l.attempts >= g.max_deliveries),
                      now_ms()
                 FROM groups g LEFT JOIN leases l ON l.group_name = g.name AND l.topic = ANY($2)
                WHERE g.name = $1"#,
        )
        .bind(self.group())
        .bind(&self.topic_list)
        .fetch_optional(&self.inner.pool)
        .await
        .map_err(during(&what))?
        .ok_or_else(|| Error::group_not_found(&self.group))?;
        let next: Option<i64> = idle.get(0);
        let dead: i64 = idle.get(1);
        let now = idle.get::<i64, _>(2) as u64;
        if dead > 0 {
            let config = self.group_config().await?;
            let mut tx = crate::tx::Tx::begin(&self.inner.pool)
                .await
                .map_err(during(&what))?;
            let max_deliveries = config.dlq.max_deliveries.min(i32::MAX as u32) as i32;
            expire_last_attempts(
                &mut tx,
                &self.inner,
                self.group(),
                &config,
                max_deliveries,
                &self.topic_list,
            )
            .await?;
            tx.commit().await.map_err(during(&what))?;
            return Ok((out, Some(now_ms())));
        }
        // On the server's clock; as a wait from now it is close enough (a
        // poll then looks again).
        let due = next.map(|at| (at as u64).saturating_sub(now).saturating_add(now_ms()));
        Ok((out, due))
    }

    fn leased(
        &self,
        tp: &TopicPartition,
        stored: StoredMessage,
        lease: i64,
        attempts: u32,
    ) -> Message {
        let token = DeliveryToken::queue(self.group.clone(), lease.to_be_bytes().to_vec());
        Message::from_stored(tp.topic.clone(), tp.partition, stored, attempts, token)
    }

    /// The lease id a queue-mode delivery carries.
    fn lease_of(&self, m: &Message) -> Result<i64> {
        let token = m.delivery(self.group())?;
        let data: [u8; 8] = token.lease().as_ref().try_into().map_err(|_| {
            Error::invalid(format!(
                "{}: the message carries no lease of this backend",
                self.what(m)
            ))
        })?;
        Ok(i64::from_be_bytes(data))
    }

    async fn ack_queue(&self, m: &Message) -> Result<()> {
        let lease = self.lease_of(m)?;
        if !self.topics.contains(&m.topic) {
            return Err(Error::invalid(format!(
                "group `{}`: this consumer does not read topic `{}`",
                self.group, m.topic
            )));
        }
        self.heartbeat(false).await?;
        let item = (m.topic.clone(), m.partition as i32, m.offset as i64, lease);
        let inner = self.inner.clone();
        let settled = self
            .inner
            .acks
            .call(
                self.group.clone(),
                item,
                move |group: Arc<str>, items: Vec<AckItem>| -> MergedCall<bool> {
                    let inner = inner.clone();
                    Box::pin(async move { ack_leases(&inner, &group, &items).await })
                },
            )
            .await
            .map_err(|e| Error::new(e.kind(), format!("ack {}: {}", self.what(m), e.message())))?;
        if settled {
            Ok(())
        } else {
            Err(lease_lost(m.offset, &self.what(m)))
        }
    }
}

/// A queue-mode lease to settle: topic, partition, offset, lease id.
pub(crate) type AckItem = (String, i32, i64, i64);

/// At most this many acks share one statement.
pub(crate) const ACK_MERGE_MAX: usize = 1000;

/// At most this many ack statements of one group in flight from this
/// process: below it acks go out at once, each on its own connection (as
/// many round trips in flight as acking consumers); above it they queue
/// and share the next statement. Leaves most of the pool to polls.
pub(crate) const ACK_CALLS: usize = 4;

/// Ack `items` of `group` in one statement: for each, whether its lease
/// was still held (and is now settled). Concurrent acks of one group from
/// this process share it (the broker's `acks`).
async fn ack_leases(inner: &Inner, group: &str, items: &[AckItem]) -> Result<Vec<bool>> {
    let what = format!("group `{group}`: ack {} messages", items.len());
    let mut conn = inner.conn(&what).await?;
    let acked = ack_on(&mut conn, group, items).await;
    conn.checked(acked)
}

/// [`ack_leases`] on `conn`.
async fn ack_on(conn: &mut PgConnection, group: &str, items: &[AckItem]) -> Result<Vec<bool>> {
    if let [(topic, partition, offset, lease)] = items {
        // One lease: by its key. A statement over arrays is planned anew
        // each time (40 µs more per ack, measured).
        let done = sqlx::query(
            r#"DELETE FROM leases WHERE group_name = $1 AND topic = $2 AND partition = $3
                 AND "offset" = $4 AND lease_id = $5 RETURNING 1"#,
        )
        .bind(group)
        .bind(topic)
        .bind(partition)
        .bind(offset)
        .bind(lease)
        .fetch_optional(&mut *conn)
        .await
        .map_err(during(format!(
            "group `{group}`: ack {topic}/{partition} offset {offset}"
        )))?;
        return Ok(vec![done.is_some()]);
    }
    let rows = sqlx::query(
        r#"DELETE FROM leases l USING unnest($2::text[], $3::int[], $4::bigint[], $5::bigint[])
                  AS a(topic, partition, o, lease)
            WHERE l.group_name = $1 AND l.topic = a.topic AND l.partition = a.partition
              AND l."offset" = a.o AND l.lease_id = a.lease
           RETURNING l.lease_id"#,
    )
    .bind(group)
    .bind(items.iter().map(|l| l.0.clone()).collect::<Vec<_>>())
    .bind(items.iter().map(|l| l.1).collect::<Vec<_>>())
    .bind(items.iter().map(|l| l.2).collect::<Vec<_>>())
    .bind(items.iter().map(|l| l.3).collect::<Vec<_>>())
    .fetch_all(&mut *conn)
    .await
    .map_err(during(format!(
        "group `{group}`: ack {} messages",
        items.len()
    )))?;
    let settled: BTreeSet<i64> = rows.iter().map(|r| r.get(0)).collect();
    Ok(items.iter().map(|l| settled.contains(&l.3)).collect())
}

/// A queue-mode poll's connection while its statement may be on the
/// wire. Dropped before the answer arrived, it gives back the leases that
/// poll took, on the same connection: sqlx finishes the dropped statement
/// before it sends the next, so the give-back runs after the poll
/// whatever the poll did (contract §4: a dropped poll takes nothing).
struct PollGuard {
    conn: Option<crate::spare::Conn>,
    group: Arc<str>,
    member: i64,
    poll: i64,
}

impl Drop for PollGuard {
    fn drop(&mut self) {
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            // No runtime: close the connection; the leases expire at the
            // visibility timeout.
            drop(conn.checked::<()>(Err(Error::new(ErrorKind::Unavailable, "no runtime"))));
            return;
        };
        let (group, member, poll) = (self.group.clone(), self.member, self.poll);
        rt.spawn(async move {
            let done = sqlx::query(
                "UPDATE leases SET member_id = NULL, lease_id = NULL, poll = NULL, deadline = NULL,
                        not_before = 0, attempts = attempts - 1
                  WHERE group_name = $1 AND member_id = $2 AND poll = $3",
            )
            .bind(&*group)
            .bind(member)
            .bind(poll)
            .execute(&mut *conn)
            .await
            .map_err(during("give back a dropped poll's leases"));
            if let Err(e) = conn.checked(done) {
                tracing::warn!(%group, error = %e, "could not give back a dropped poll's leases (they expire at the visibility timeout)");
            }
        });
    }
}

/// Move leases of `group` (on `topics`) that expired on their last
/// attempt to the DLQ and settle them, in the caller's transaction (rows
/// locked `SKIP LOCKED`: a concurrent sweep takes the others). Returns how
/// many were moved.
pub(crate) async fn expire_last_attempts(
    tx: &mut PgConnection,
    inner: &Inner,
    group: &str,
    config: &GroupConfig,
    max_deliveries: i32,
    topics: &[String],
) -> Result<usize> {
    let what = format!("dead-letter expired leases of group `{group}`");
    let dead = sqlx::query(
        r#"SELECT topic, partition, "offset", attempts FROM leases
            WHERE group_name = $1 AND topic = ANY($2) AND member_id IS NOT NULL
              AND deadline <= now_ms() AND attempts >= $3
            ORDER BY topic, partition, "offset" LIMIT 100 FOR UPDATE SKIP LOCKED"#,
    )
    .bind(group)
    .bind(topics)
    .bind(max_deliveries)
    .fetch_all(&mut *tx)
    .await
    .map_err(during(&what))?;
    for r in &dead {
        let tp = TopicPartition::new(r.get::<String, _>(0), r.get::<i32, _>(1) as u32);
        let offset: i64 = r.get(2);
        let attempts = r.get::<i32, _>(3) as u32;
        if let Some(t) = queries::topic(&mut *tx, &tp.topic).await? {
            let found =
                queries::read_offsets(&mut *tx, &tp.topic, t.id, tp.partition, &[offset]).await?;
            if let Some(stored) = found.into_iter().next() {
                let m = Message::from_stored(
                    tp.topic.clone(),
                    tp.partition,
                    stored,
                    attempts,
                    DeliveryToken::default(),
                );
                dead_letter(
                    &mut *tx,
                    inner,
                    group,
                    config,
                    &m,
                    attempts,
                    Some("visibility timeout expired"),
                )
                .await?;
            }
        }
        delete_lease(&mut *tx, group, &tp, offset).await?;
    }
    Ok(dead.len())
}

/// The sweep of one broker: every [`FALLBACK_POLL`], dead-letter leases
/// that expired on their last attempt in every queue-mode group, whether
/// or not anyone polls (contract §5).
pub(crate) async fn sweep(inner: std::sync::Weak<Inner>) {
    loop {
        tokio::time::sleep(FALLBACK_POLL).await;
        let Some(inner) = inner.upgrade() else { return };
        if inner.check_open().is_err() {
            return;
        }
        if let Err(e) = sweep_once(&inner).await {
            tracing::warn!(error = %e, "lease sweep failed");
        }
    }
}

async fn sweep_once(inner: &Inner) -> Result<()> {
    let groups = sqlx::query(
        "SELECT DISTINCT l.group_name, g.config, g.max_deliveries FROM leases l JOIN groups g ON g.name = l.group_name
          WHERE l.member_id IS NOT NULL AND l.deadline <= now_ms() AND l.attempts >= g.max_deliveries",
    )
    .fetch_all(&inner.pool)
    .await
    .map_err(during("find expired leases"))?;
    for g in groups {
        let group: String = g.get(0);
        let config: GroupConfig = serde_json::from_value(g.get(1)).map_err(|e| {
            Error::internal(format!("group `{group}`: stored config is unreadable: {e}"))
        })?;
        let topics: Vec<String> =
            sqlx::query_scalar("SELECT topic FROM group_topics WHERE group_name = $1")
                .bind(&group)
                .fetch_all(&inner.pool)
                .await
                .map_err(during("find expired leases"))?;
        let mut tx = crate::tx::Tx::begin(&inner.pool)
            .await
            .map_err(during("sweep leases"))?;
        let moved =
            expire_last_attempts(&mut tx, inner, &group, &config, g.get(2), &topics).await?;
        tx.commit().await.map_err(during("sweep leases"))?;
        if moved > 0 {
            inner.wake();
        }
    }
    Ok(())
}

/// Commits `$4` for ($1 group, $2 topic, $3 partition) if member `$5` owns
/// the partition (in generation `$6`, if not null) and `$4` is not past
/// the log end; `$7`: never move the commit back.
const COMMIT: &str = r#"
INSERT INTO commits (group_name, topic, partition, committed)
SELECT $1, $2, $3, $4
 WHERE EXISTS (SELECT 1 FROM owners o
                WHERE o.group_name = $1 AND o.topic = $2 AND o.partition = $3 AND o.member_id = $5
                  AND ($6::bigint IS NULL OR o.generation = $6) FOR SHARE)
   AND $4 <= (SELECT p.next_offset FROM partitions p JOIN topics t ON t.id = p.topic_id
               WHERE t.name = $2 AND p.partition = $3)
ON CONFLICT (group_name, topic, partition) DO UPDATE
   SET committed = CASE WHEN $7 THEN greatest(commits.committed, excluded.committed)
                        ELSE excluded.committed END
RETURNING committed"#;

fn lease_lost(offset: u64, what: &str) -> Error {
    Error::new(
        ErrorKind::LeaseExpired,
        format!(
            "{what}: the lease on offset {offset} is no longer held (it expired and was \
             released or re-leased, or the message was already settled)"
        ),
    )
}

/// Stream mode: the offset after `m`, which must not pass the log end.
fn next_offset(m: &Message, b: &Bounds, what: &str) -> Result<u64> {
    match m.offset.checked_add(1) {
        Some(next) if next <= b.log_end => Ok(next),
        _ => Err(Error::invalid(format!(
            "{what}: offset {} is at or past the log end ({})",
            m.offset, b.log_end
        ))),
    }
}

async fn delete_lease(
    tx: &mut PgConnection,
    group: &str,
    tp: &TopicPartition,
    offset: i64,
) -> Result<()> {
    sqlx::query(r#"DELETE FROM leases WHERE group_name = $1 AND topic = $2 AND partition = $3 AND "offset" = $4"#)
        .bind(group)
        .bind(&tp.topic)
        .bind(tp.partition as i32)
        .bind(offset)
        .execute(&mut *tx)
        .await
        .map_err(during(format!("group `{group}`: settle {tp} offset {offset}")))?;
    Ok(())
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
                                .push((i, lease_lost(m.offset, &self.what(m))));
                        }
                    }
                }
                outcome.failed.sort_by_key(|(i, _)| *i);
                Ok(outcome)
            })
            .await
    }

    async fn nack(&self, m: &Message, options: NackOptions) -> Result<NackOutcome> {
        self.inner.bounded(Duration::ZERO, async move {
            self.check_open()?;
            let token = m.delivery(self.group())?;
            let what = self.what(m);
            let (tp, _, b) = self.subscribed(&m.topic, m.partition).await?;
            match self.mode {
                DeliveryMode::Stream => {
                    next_offset(m, &b, &what)?;
                    self.heartbeat(false).await?;
                    let generation = token.generation();
                    self.check_owner(&tp, Some(generation)).await?;
                    let config = self.group_config().await?;
                    if m.attempt >= config.dlq.max_deliveries {
                        let mut tx = crate::tx::Tx::begin(&self.inner.pool).await.map_err(during(&what))?;
                        dead_letter(
                            &mut tx,
                            &self.inner,
                            self.group(),
                            &config,
                            m,
                            m.attempt,
                            options.reason.as_deref(),
                        )
                        .await?;
                        let to = {
                            let mut parts = self.parts.lock();
                            match parts.get_mut(&tp) {
                                Some(part) if part.generation == generation => part.carry(m.offset + 1),
                                _ => m.offset + 1,
                            }
                        };
                        let done = sqlx::query(COMMIT)
                            .bind(self.group())
                            .bind(&tp.topic)
                            .bind(tp.partition as i32)
                            .bind(to as i64)
                            .bind(self.member)
                            .bind(generation as i64)
                            .bind(true)
                            .fetch_optional(&mut *tx)
                            .await
                            .map_err(during(&what))?;
                        if done.is_none() {
                            drop(tx);
                            return Err(self.why_not_committed(&tp, to, Some(generation)).await);
                        }
                        tx.commit().await.map_err(during(&what))?;
                        if let Some(part) = self.parts.lock().get_mut(&tp) {
                            part.retries.remove(&m.offset);
                            part.committed(to);
                        }
                        return Ok(NackOutcome::DeadLettered);
                    }
                    let delay = options.delay_or(config.retry_backoff.delay_after(m.attempt));
                    let mut parts = self.parts.lock();
                    let part = parts.entry(tp).or_insert_with(|| Part::new(generation));
                    if part.generation == generation {
                        part.retry(
                            m.offset,
                            m.attempt.saturating_add(1),
                            conveyor_core::deadline_ms(delay),
                        );
                    }
                    drop(parts);
                    self.inner.wake();
                    Ok(NackOutcome::Redeliver)
                }
                _ => {
                    let lease = self.lease_of(m)?;
                    self.heartbeat(false).await?;
                    let config = self.group_config().await?;
                    let mut tx = crate::tx::Tx::begin(&self.inner.pool).await.map_err(during(&what))?;
                    let attempts: Option<i32> = sqlx::query_scalar(
                        r#"SELECT attempts FROM leases WHERE group_name = $1 AND topic = $2 AND partition = $3
                             AND "offset" = $4 AND lease_id = $5 FOR UPDATE"#,
                    )
                    .bind(self.group())
                    .bind(&m.topic)
                    .bind(m.partition as i32)
                    .bind(m.offset as i64)
                    .bind(lease)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(during(&what))?;
                    let attempts = attempts.ok_or_else(|| lease_lost(m.offset, &what))? as u32;
                    if attempts >= config.dlq.max_deliveries {
                        dead_letter(
                            &mut tx,
                            &self.inner,
                            self.group(),
                            &config,
                            m,
                            attempts,
                            options.reason.as_deref(),
                        )
                        .await?;
                        delete_lease(&mut tx, self.group(), &tp, m.offset as i64).await?;
                        tx.commit().await.map_err(during(&what))?;
                        return Ok(NackOutcome::DeadLettered);
                    }
                    let delay = options.delay_or(config.retry_backoff.delay_after(attempts));
                    sqlx::query(
                        r#"UPDATE leases SET member_id = NULL, lease_id = NULL, deadline = NULL,
                                  not_before = now_ms() + $5
                            WHERE group_name = $1 AND topic = $2 AND partition = $3 AND "offset" = $4"#,
                    )
                    .bind(self.group())
                    .bind(&m.topic)
                    .bind(m.partition as i32)
                    .bind(m.offset as i64)
                    .bind(millis(delay))
                    .execute(&mut *tx)
                    .await
                    .map_err(during(&what))?;
                    sqlx::query("SELECT pg_notify('conveyor.' || current_schema(), 'nack')")
                        .execute(&mut *tx)
                        .await
                        .map_err(during(&what))?;
                    tx.commit().await.map_err(during(&what))?;
                    self.inner.wake();
                    Ok(NackOutcome::Redeliver)
                }
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
                let lease = self.lease_of(m)?;
                let what = self.what(m);
                self.subscribed(&m.topic, m.partition).await?;
                self.heartbeat(false).await?;
                let done = sqlx::query(
                r#"UPDATE leases SET deadline = now_ms() + $6 WHERE group_name = $1 AND topic = $2
                     AND partition = $3 AND "offset" = $4 AND lease_id = $5 RETURNING 1"#,
            )
            .bind(self.group())
            .bind(&m.topic)
            .bind(m.partition as i32)
            .bind(m.offset as i64)
            .bind(lease)
            .bind(millis(by.min(MAX_REDELIVERY_DELAY)))
            .fetch_optional(&self.inner.pool)
            .await
            .map_err(during(format!("extend {what}")))?;
                done.map(|_| ()).ok_or_else(|| lease_lost(m.offset, &what))
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
                    let mut conn = self.inner.conn(&format!("group `{}`: assignment", self.group)).await?;
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
