//! Queue mode of a PostgreSQL member: nothing kept in the process; leases
//! are rows. A poll is one statement (`queue_poll`, migration 2), an ack
//! one `DELETE` (merged with the concurrent acks of the process), a nack
//! or a dead-letter move one transaction.

use super::{dead_letter, PgConsumer};
use crate::broker::{Inner, FALLBACK_POLL};
use crate::error::during;
use crate::queries;
use conveyor_core::backend::{MergedCall, StoredMessage};
use conveyor_core::dlq;
use conveyor_core::{
    DeliveryToken, Error, GroupConfig, Message, NackOptions, NackOutcome, Result, TopicPartition,
    MAX_REDELIVERY_DELAY,
};
use sqlx::{PgConnection, Row};
use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::{millis, now_ms};

impl PgConsumer {
    /// One queue-mode attempt: one statement, `queue_poll` (see
    /// `migrations/0002_queue_poll.sql`), which re-leases what is due and
    /// takes fresh offsets from the partitions' cursors on the server.
    /// Dropped before its answer arrived, the poll gives back exactly the
    /// leases it took (see [`PollGuard`]).
    pub(super) async fn poll_queue(&self, max: usize) -> Result<(Vec<Message>, Option<u64>)> {
        self.heartbeat(true).await?;
        let what = format!("poll group `{}`", self.group);
        let poll = self.polls.fetch_add(1, Ordering::Relaxed) as i64;
        let conn = self.inner.conn(|| what.clone()).await?;
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

    pub(super) fn leased(
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
    pub(super) fn lease_of(&self, m: &Message) -> Result<i64> {
        let token = m.delivery(self.group())?;
        let data: [u8; 8] = token.lease().as_ref().try_into().map_err(|_| {
            Error::invalid(format!(
                "{}: the message carries no lease of this backend",
                self.what(m)
            ))
        })?;
        Ok(i64::from_be_bytes(data))
    }

    pub(super) async fn ack_queue(&self, m: &Message) -> Result<()> {
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
            Err(Error::lease_lost(m.offset, &self.what(m)))
        }
    }

    /// Queue-mode nack: dead-letter on the last attempt, or release the
    /// lease, available again after the delay.
    pub(super) async fn nack_queue(
        &self,
        m: &Message,
        options: NackOptions,
        what: &str,
        tp: TopicPartition,
    ) -> Result<NackOutcome> {
        let lease = self.lease_of(m)?;
        self.heartbeat(false).await?;
        let config = self.group_config().await?;
        let mut tx = crate::tx::Tx::begin(&self.inner.pool)
            .await
            .map_err(during(what))?;
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
        .map_err(during(what))?;
        let attempts = attempts.ok_or_else(|| Error::lease_lost(m.offset, what))? as u32;
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
            tx.commit().await.map_err(during(what))?;
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
        .map_err(during(what))?;
        sqlx::query("SELECT pg_notify('conveyor.' || current_schema(), 'nack')")
            .execute(&mut *tx)
            .await
            .map_err(during(what))?;
        tx.commit().await.map_err(during(what))?;
        self.inner.wake();
        Ok(NackOutcome::Redeliver)
    }

    /// Move the deadline of `m`'s lease to `by` from now.
    pub(super) async fn extend_lease(&self, m: &Message, by: Duration) -> Result<()> {
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
        done.map(|_| ())
            .ok_or_else(|| Error::lease_lost(m.offset, &what))
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
pub(super) async fn ack_leases(inner: &Inner, group: &str, items: &[AckItem]) -> Result<Vec<bool>> {
    let mut conn = inner
        .conn(|| format!("group `{group}`: ack {} messages", items.len()))
        .await?;
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
        .map_err(|e| {
            during(format!(
                "group `{group}`: ack {topic}/{partition} offset {offset}"
            ))(e)
        })?;
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
            conn.discard();
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
