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
use conveyor_core::backend::{poll_until, MemberPartition, StoredMessage};
use conveyor_core::dlq::{self, DeadLetter};
use conveyor_core::{
    partitioner, BatchAck, Consumer, DeliveryMode, DeliveryToken, Error, ErrorKind, GroupConfig,
    Message, NackOptions, NackOutcome, Result, SeekTo, TopicConfig, TopicPartition,
    MAX_REDELIVERY_DELAY,
};
use parking_lot::Mutex;
use sqlx::{PgConnection, Row};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
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
    async fn owned(&self) -> Result<Vec<Owned>> {
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
        .fetch_all(&self.inner.pool)
        .await
        .map_err(during(format!("read the assignment in group `{}`", self.group)))?;
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
        let owned = self.rotated(self.owned().await?);
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
                &self.inner.pool,
                &o.tp.topic,
                o.topic_id,
                o.tp.partition,
                pos,
                max - planned,
            )
            .await?;
            planned += found.len();
            reads.push((o, pos, found));
        }
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
        let done = sqlx::query(COMMIT)
            .bind(self.group())
            .bind(&tp.topic)
            .bind(tp.partition as i32)
            .bind(offset.min(i64::MAX as u64) as i64)
            .bind(self.member)
            .bind(generation.map(|g| g as i64))
            .bind(cumulative)
            .fetch_optional(&self.inner.pool)
            .await
            .map_err(during(&what))?;
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
                      WHERE t.name = $2 AND p.partition = $3)",
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
        let (tp, _, b) = self.subscribed(&m.topic, m.partition).await?;
        let next = next_offset(m, &b, &self.what(m))?;
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

    /// One queue-mode attempt, one transaction: dead-letter expired leases
    /// on their last attempt, re-lease what is available again (`FOR
    /// UPDATE SKIP LOCKED`), then take fresh offsets by moving partition
    /// cursors (rows locked `SKIP LOCKED` too). Dropped before the commit,
    /// the transaction rolls back and nothing is taken.
    async fn poll_queue(&self, max: usize) -> Result<(Vec<Message>, Option<u64>)> {
        self.heartbeat(true).await?;
        let what = format!("poll group `{}`", self.group);
        let mut tx = crate::tx::Tx::begin(&self.inner.pool)
            .await
            .map_err(during(&what))?;
        let g = sqlx::query(
            "SELECT visibility_ms, max_deliveries, config, now_ms(), txid_current() FROM groups WHERE name = $1",
        )
        .bind(self.group())
        .fetch_optional(&mut *tx)
        .await
        .map_err(during(&what))?
        .ok_or_else(|| Error::group_not_found(&self.group))?;
        let visibility: i64 = g.get(0);
        let max_deliveries: i32 = g.get(1);
        let config: GroupConfig = serde_json::from_value(g.get(2)).map_err(|e| {
            Error::internal(format!(
                "group `{}`: stored config is unreadable: {e}",
                self.group
            ))
        })?;
        let now = g.get::<i64, _>(3) as u64;
        let xid: i64 = g.get(4);
        let ids: HashMap<String, i64> =
            sqlx::query("SELECT name, id FROM topics WHERE name = ANY($1)")
                .bind(&self.topic_list)
                .fetch_all(&mut *tx)
                .await
                .map_err(during(&what))?
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect();

        // 1. Expired leases on their last attempt go to the DLQ.
        expire_last_attempts(
            &mut tx,
            &self.inner,
            self.group(),
            &config,
            max_deliveries,
            &self.topic_list,
        )
        .await?;

        // 2. Redeliveries: nacked (after their delay), expired, delayed.
        let mut out: Vec<Message> = Vec::new();
        let again = sqlx::query(
            r#"WITH c AS (
                 SELECT topic, partition, "offset" FROM leases
                  WHERE group_name = $1 AND topic = ANY($2)
                    AND ((member_id IS NULL AND not_before <= now_ms())
                      OR (member_id IS NOT NULL AND deadline <= now_ms() AND attempts < $3))
                  ORDER BY topic, partition, "offset" LIMIT $4 FOR UPDATE SKIP LOCKED)
               UPDATE leases l SET member_id = $5, lease_id = nextval('lease_ids'),
                      deadline = now_ms() + $6, attempts = l.attempts + 1, not_before = 0
                 FROM c WHERE l.group_name = $1 AND l.topic = c.topic AND l.partition = c.partition
                  AND l."offset" = c."offset"
               RETURNING l.topic, l.partition, l."offset", l.lease_id, l.attempts"#,
        )
        .bind(self.group())
        .bind(&self.topic_list)
        .bind(max_deliveries)
        .bind(max.min(i64::MAX as usize) as i64)
        .bind(self.member)
        .bind(visibility)
        .fetch_all(&mut *tx)
        .await
        .map_err(during(&what))?;
        let mut by_tp: BTreeMap<TopicPartition, Vec<(i64, i64, u32)>> = BTreeMap::new();
        for r in &again {
            by_tp
                .entry(TopicPartition::new(
                    r.get::<String, _>(0),
                    r.get::<i32, _>(1) as u32,
                ))
                .or_default()
                .push((r.get(2), r.get(3), r.get::<i32, _>(4) as u32));
        }
        for (tp, leased) in by_tp {
            let Some(&id) = ids.get(&tp.topic) else {
                continue;
            };
            let offsets: Vec<i64> = leased.iter().map(|l| l.0).collect();
            let found =
                queries::read_offsets(&mut *tx, &tp.topic, id, tp.partition, &offsets).await?;
            let mut found: HashMap<u64, StoredMessage> =
                found.into_iter().map(|m| (m.offset, m)).collect();
            for (offset, lease, attempts) in leased {
                match found.remove(&(offset as u64)) {
                    Some(stored) => out.push(self.leased(&tp, stored, lease, attempts)),
                    // Removed by retention meanwhile: nothing to deliver.
                    None => delete_lease(&mut tx, self.group(), &tp, offset).await?,
                }
            }
        }

        // 3. Fresh offsets, partition by partition.
        if out.len() < max {
            let candidates = sqlx::query(
                r#"SELECT t.name, t.id, p.partition, p.log_start, q.next IS NULL
                     FROM topics t JOIN partitions p ON p.topic_id = t.id
                     LEFT JOIN queue_cursors q ON q.group_name = $1 AND q.topic = t.name AND q.partition = p.partition
                    WHERE t.name = ANY($2) AND greatest(coalesce(q.next, 0), p.log_start) < p.next_offset"#,
            )
            .bind(self.group())
            .bind(&self.topic_list)
            .fetch_all(&mut *tx)
            .await
            .map_err(during(&what))?;
            let candidates: Vec<(TopicPartition, i64, i64, bool)> = candidates
                .iter()
                .map(|r| {
                    (
                        TopicPartition::new(r.get::<String, _>(0), r.get::<i32, _>(2) as u32),
                        r.get(1),
                        r.get(3),
                        r.get(4),
                    )
                })
                .collect();
            for (tp, id, log_start, missing) in self.rotated(candidates) {
                if out.len() >= max {
                    break;
                }
                if missing {
                    sqlx::query(
                        "INSERT INTO queue_cursors (group_name, topic, partition, next) VALUES ($1, $2, $3, $4)
                         ON CONFLICT DO NOTHING",
                    )
                    .bind(self.group())
                    .bind(&tp.topic)
                    .bind(tp.partition as i32)
                    .bind(log_start)
                    .execute(&mut *tx)
                    .await
                    .map_err(during(&what))?;
                }
                let next: Option<i64> = sqlx::query_scalar(
                    "SELECT next FROM queue_cursors WHERE group_name = $1 AND topic = $2 AND partition = $3
                       FOR UPDATE SKIP LOCKED",
                )
                .bind(self.group())
                .bind(&tp.topic)
                .bind(tp.partition as i32)
                .fetch_optional(&mut *tx)
                .await
                .map_err(during(&what))?;
                let Some(next) = next else { continue };
                let found = queries::read(
                    &mut *tx,
                    &tp.topic,
                    id,
                    tp.partition,
                    next as u64,
                    max - out.len(),
                )
                .await?;
                let Some(last) = found.last().map(|m| m.offset) else {
                    continue;
                };
                let (mut offs, mut lease, mut not_before) = (Vec::new(), Vec::new(), Vec::new());
                let mut deliver = Vec::new();
                for m in found {
                    if !dlq::is_for_group(&m.headers, self.group()) {
                        continue; // redriven to another group: settled unseen
                    }
                    offs.push(m.offset as i64);
                    match m.deliver_at {
                        Some(at) if at > now => {
                            lease.push(false);
                            not_before.push(at.min(i64::MAX as u64) as i64);
                        }
                        _ => {
                            lease.push(true);
                            not_before.push(0);
                            deliver.push(m);
                        }
                    }
                }
                let rows = sqlx::query(
                    r#"INSERT INTO leases (group_name, topic, partition, "offset", member_id, lease_id,
                                           deadline, not_before, attempts)
                       SELECT $1, $2, $3, u.o,
                              CASE WHEN u.lease THEN $4::bigint END,
                              CASE WHEN u.lease THEN nextval('lease_ids') END,
                              CASE WHEN u.lease THEN now_ms() + $5 END,
                              u.nb, CASE WHEN u.lease THEN 1 ELSE 0 END
                         FROM unnest($6::bigint[], $7::bool[], $8::bigint[]) AS u(o, lease, nb)
                       RETURNING "offset", lease_id"#,
                )
                .bind(self.group())
                .bind(&tp.topic)
                .bind(tp.partition as i32)
                .bind(self.member)
                .bind(visibility)
                .bind(&offs)
                .bind(&lease)
                .bind(&not_before)
                .fetch_all(&mut *tx)
                .await
                .map_err(during(&what))?;
                let ids_of: HashMap<i64, i64> = rows
                    .iter()
                    .filter_map(|r| r.get::<Option<i64>, _>(1).map(|l| (r.get::<i64, _>(0), l)))
                    .collect();
                sqlx::query(
                    "UPDATE queue_cursors SET next = $4 WHERE group_name = $1 AND topic = $2 AND partition = $3",
                )
                .bind(self.group())
                .bind(&tp.topic)
                .bind(tp.partition as i32)
                .bind(last as i64 + 1)
                .execute(&mut *tx)
                .await
                .map_err(during(&what))?;
                for m in deliver {
                    let lease = ids_of.get(&(m.offset as i64)).copied().unwrap_or_default();
                    out.push(self.leased(&tp, m, lease, 1));
                }
            }
        }
        let due = if out.is_empty() {
            let next: Option<i64> = sqlx::query_scalar(
                "SELECT min(CASE WHEN member_id IS NULL THEN not_before ELSE deadline END) FROM leases
                  WHERE group_name = $1 AND topic = ANY($2)",
            )
            .bind(self.group())
            .bind(&self.topic_list)
            .fetch_one(&mut *tx)
            .await
            .map_err(during(&what))?;
            // On the server's clock; as a wait from now it is close enough
            // (a poll then looks again).
            next.map(|at| (at as u64).saturating_sub(now).saturating_add(now_ms()))
        } else {
            None
        };
        if !out.is_empty() {
            // Dropped while the COMMIT is on its way, the leases may be
            // taken with nobody to receive them: give them back then.
            let leases = out
                .iter()
                .filter_map(|m| {
                    m.token()
                        .lease()
                        .as_ref()
                        .try_into()
                        .ok()
                        .map(i64::from_be_bytes)
                })
                .collect();
            tx.on_abandon(Box::pin(give_back(
                self.inner.pool.clone(),
                self.group.to_string(),
                xid,
                leases,
            )));
        }
        tx.commit().await.map_err(during(&what))?;
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
        let done = sqlx::query(
            r#"DELETE FROM leases WHERE group_name = $1 AND topic = $2 AND partition = $3
                 AND "offset" = $4 AND lease_id = $5 RETURNING 1"#,
        )
        .bind(self.group())
        .bind(&m.topic)
        .bind(m.partition as i32)
        .bind(m.offset as i64)
        .bind(lease)
        .fetch_optional(&self.inner.pool)
        .await
        .map_err(during(format!("ack {}", self.what(m))))?;
        match done {
            Some(_) => Ok(()),
            None => Err(lease_lost(m.offset, &self.what(m))),
        }
    }
}

/// Give back the leases of a poll that was dropped while its transaction
/// (`xid`) was committing: once the server has decided it, if it
/// committed, the leases are released and their attempts restored, as if
/// the poll had never run (contract §4: a dropped poll takes nothing).
/// Takes one or two round trips after the drop.
async fn give_back(pool: sqlx::PgPool, group: String, xid: i64, leases: Vec<i64>) {
    let started = std::time::Instant::now();
    loop {
        let status: std::result::Result<Option<String>, _> =
            sqlx::query_scalar("SELECT txid_status($1)")
                .bind(xid)
                .fetch_one(&pool)
                .await;
        match status.as_ref().map(|s| s.as_deref()) {
            Ok(Some("committed")) => break,
            Ok(Some("in progress")) if started.elapsed() < Duration::from_secs(60) => {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Ok(_) => return,
            Err(e) => {
                tracing::warn!(group, error = %e, "could not check a dropped poll's transaction");
                if started.elapsed() > Duration::from_secs(60) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let done = sqlx::query(
        "UPDATE leases SET member_id = NULL, lease_id = NULL, deadline = NULL, not_before = 0,
                attempts = attempts - 1
          WHERE group_name = $1 AND lease_id = ANY($2)",
    )
    .bind(&group)
    .bind(&leases)
    .execute(&pool)
    .await;
    if let Err(e) = done {
        tracing::warn!(group, error = %e, "could not give back a dropped poll's leases (they expire at the visibility timeout)");
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
        self.inner.bounded(Duration::ZERO, async move {
            self.check_open()?;
            let mut outcome = BatchAck::default();
            if self.mode == DeliveryMode::Stream {
                for (i, m) in messages.iter().enumerate() {
                    match self.ack_stream(m).await {
                        Ok(()) => outcome.acked += 1,
                        Err(e) if matches!(e.kind(), ErrorKind::Closed | ErrorKind::Unavailable) => {
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
                let rows = sqlx::query(
                    r#"DELETE FROM leases l USING unnest($2::text[], $3::int[], $4::bigint[], $5::bigint[])
                              AS a(topic, partition, o, lease)
                        WHERE l.group_name = $1 AND l.topic = a.topic AND l.partition = a.partition
                          AND l."offset" = a.o AND l.lease_id = a.lease
                       RETURNING l.lease_id"#,
                )
                .bind(self.group())
                .bind(batch.iter().map(|(_, m, _)| m.topic.clone()).collect::<Vec<_>>())
                .bind(batch.iter().map(|(_, m, _)| m.partition as i32).collect::<Vec<_>>())
                .bind(batch.iter().map(|(_, m, _)| m.offset as i64).collect::<Vec<_>>())
                .bind(batch.iter().map(|(_, _, l)| *l).collect::<Vec<_>>())
                .fetch_all(&self.inner.pool)
                .await
                .map_err(during(format!("ack a batch in group `{}`", self.group)))?;
                let settled: BTreeSet<i64> = rows.iter().map(|r| r.get(0)).collect();
                for (i, m, lease) in batch {
                    if settled.contains(&lease) {
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
                    sqlx::query(
                        "DELETE FROM leases WHERE group_name = $1 AND topic = $2 AND partition = $3",
                    )
                    .bind(self.group())
                    .bind(&tp.topic)
                    .bind(tp.partition as i32)
                    .execute(&mut *tx)
                    .await
                    .map_err(during(&what))?;
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
                DeliveryMode::Stream => Ok(self.owned().await?.into_iter().map(|o| o.tp).collect()),
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
