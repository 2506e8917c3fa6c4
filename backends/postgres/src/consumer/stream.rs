//! Stream mode of a PostgreSQL member: partitions owned, positions kept
//! in the process (as a Kafka consumer keeps its fetch position), nack
//! retries and passed runs in [`MemberPartition`]; ownership, generations
//! and commits live in the server and are checked in the statement that
//! commits.

use super::{dead_letter, Owned, PgConsumer};
use crate::error::during;
use crate::queries::{self, Bounds};
use conveyor_core::backend::{validate, MemberPartition};
use conveyor_core::{Error, ErrorKind, Message, NackOptions, NackOutcome, Result, TopicPartition};
use sqlx::Row;
use std::collections::BTreeSet;

use crate::now_ms;

impl PgConsumer {
    /// The partitions this member owns now, with commits and bounds.
    pub(super) async fn owned(&self, conn: &mut crate::spare::Conn) -> Result<Vec<Owned>> {
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
    pub(super) async fn poll_stream(&self, max: usize) -> Result<(Vec<Message>, Option<u64>)> {
        self.heartbeat(true).await?;
        let mut conn = self
            .inner
            .conn(|| format!("poll group `{}`", self.group))
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
    pub(super) async fn commit_offset(
        &self,
        tp: &TopicPartition,
        offset: u64,
        generation: Option<u64>,
        cumulative: bool,
    ) -> Result<()> {
        let what = format!("group `{}`: commit {tp}", self.group);
        let mut conn = self.inner.conn(|| what.clone()).await?;
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
            .map_err(during(what));
        let done = conn.checked(done)?;
        drop(conn);
        if done.is_some() {
            return Ok(());
        }
        Err(self.why_not_committed(tp, offset, generation).await)
    }

    /// Why [`COMMIT`] changed nothing: fenced, or past the log end.
    pub(super) async fn why_not_committed(
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
    pub(super) async fn check_owner(
        &self,
        tp: &TopicPartition,
        generation: Option<u64>,
    ) -> Result<u64> {
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
    pub(super) async fn ack_stream(&self, m: &Message) -> Result<()> {
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
        let to = MemberPartition::carried(&mut self.parts.lock(), &tp, generation, next);
        self.commit_offset(&tp, to, Some(generation), true).await?;
        if let Some(part) = self.parts.lock().get_mut(&tp) {
            part.committed(to);
        }
        Ok(())
    }

    /// Stream-mode nack: dead-letter on the last attempt (and commit past
    /// it), or schedule the retry in the process.
    pub(super) async fn nack_stream(
        &self,
        m: &Message,
        options: NackOptions,
        generation: u64,
        what: &str,
        tp: TopicPartition,
        b: &Bounds,
    ) -> Result<NackOutcome> {
        validate::next_offset(m.offset, b.log_end, what)?;
        self.heartbeat(false).await?;
        self.check_owner(&tp, Some(generation)).await?;
        let config = self.group_config().await?;
        if m.attempt >= config.dlq.max_deliveries {
            let mut tx = crate::tx::Tx::begin(&self.inner.pool)
                .await
                .map_err(during(what))?;
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
            let to =
                MemberPartition::carried(&mut self.parts.lock(), &tp, generation, m.offset + 1);
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
                .map_err(during(what))?;
            if done.is_none() {
                drop(tx);
                return Err(self.why_not_committed(&tp, to, Some(generation)).await);
            }
            tx.commit().await.map_err(during(what))?;
            if let Some(part) = self.parts.lock().get_mut(&tp) {
                part.retries.remove(&m.offset);
                part.committed(to);
            }
            return Ok(NackOutcome::DeadLettered);
        }
        let delay = options.delay_or(config.retry_backoff.delay_after(m.attempt));
        MemberPartition::nacked(&mut self.parts.lock(), tp, generation, m, delay);
        self.inner.wake();
        Ok(NackOutcome::Redeliver)
    }
}

/// Commits `$4` for ($1 group, $2 topic, $3 partition) if member `$5` owns
/// the partition (in generation `$6`, if not null) and `$4` is not past
/// the log end; `$7`: never move the commit back.
pub(super) const COMMIT: &str = r#"
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
