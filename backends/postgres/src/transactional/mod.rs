//! Exactly once with the application's own database: sending and settling
//! inside the caller's PostgreSQL transaction (docs/semantics.md §10).
//!
//! This module owns the statements that run on the caller's connection
//! (`stage`, `settle`), the relay that moves staged records into the log
//! after the caller commits (`relay`), and the runner handler that works
//! in a transaction (`handler`). It never begins, commits or rolls back
//! the caller's transaction, and runs nothing else on the caller's
//! connection.
//!
//! **Sending** ([`PgBroker::send_in`]) stages the records in the caller's
//! transaction (the `staged` table, migration 3): one `INSERT`, no lock, no
//! offset. When the transaction commits, the relay of any open broker on
//! the schema appends them to the log in one statement per partition that
//! locks the partition row, deletes the staged rows and appends them, as
//! an ordinary append does (so offsets stay dense and commit in order, and
//! each staged record is appended exactly once); a rollback leaves
//! nothing. This is the transactional outbox, built in.
//!
//! **Settling** ([`PgBroker::ack_in`]) is one statement in the caller's
//! transaction: a queue-mode ack deletes the delivery's lease row, a
//! stream-mode commit writes `offset + 1` fenced by the delivery's
//! generation. Both are undone by a rollback.

mod handler;
mod relay;
mod settle;
mod stage;

pub use handler::{PgTransaction, Transactional, TxHandler};
pub(crate) use relay::run as relay;
pub(crate) use settle::Statements;

use crate::PgBroker;
use conveyor_core::{partitioner, Error, Message, Record, Result};
use sqlx::PgExecutor;
use std::time::Duration;

/// A record staged by [`PgBroker::send_in`]: the partition it will be
/// appended to (chosen when it was staged, by the contract's partitioning
/// rules) and its staging id. Its offset is assigned when the caller's
/// transaction has committed and the relay appends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct Staged {
    /// The partition the record goes to.
    pub partition: u32,
    /// Its row in the `staged` table (increasing in staging order).
    pub id: i64,
}

impl PgBroker {
    /// Send `records` to `topic` inside the caller's transaction: they
    /// become visible to consumers if and only if that transaction commits,
    /// shortly after the commit (the broker's relay appends them, woken by
    /// the commit's notification), with dense offsets in staging order per
    /// partition; a rollback leaves no record and takes no offset.
    ///
    /// `ex` is the caller's sqlx connection, transaction (`&mut *tx`) or
    /// pool (then the records are staged in a statement of their own, and
    /// visible once it returns and the relay ran). It must be connected to
    /// the broker's database; the statement names the broker's schema, so
    /// the connection's `search_path` does not matter. Records are
    /// validated and routed as `send_batch` does (contract §3). Nothing is
    /// locked: a transaction left open holds up no other send. The records
    /// one transaction sends to a partition (over any number of calls) are
    /// appended together, in the order they were sent, after those of
    /// transactions appended before. A record with an idempotency key that
    /// was appended to its partition within the topic's dedup window (or
    /// earlier in the same move) is left out when the relay moves it.
    ///
    /// Returns one [`Staged`] per record, in input order (no offset yet:
    /// see [`Staged`]).
    ///
    /// # Errors
    /// As `send_batch` for bad input (`InvalidArgument`,
    /// `MessageTooLarge`, `PartitionOutOfRange`, `TopicNotFound`), before
    /// anything is written; `InvalidArgument` if the connection's database
    /// has no such schema; `PermissionDenied` if its role may not insert
    /// into the schema's `staged` table; `Unavailable` if the server does
    /// not answer within the broker's timeout. After an error the caller's
    /// transaction should be rolled back (PostgreSQL refuses further
    /// statements in it anyway).
    ///
    /// # Cancel safety
    /// Not cancel safe: dropped while its statement runs, the records may
    /// or may not be staged in the caller's transaction, and the
    /// connection may be left mid-statement. Roll the transaction back.
    pub async fn send_in<'e, E: PgExecutor<'e>>(
        &self,
        ex: E,
        topic: &str,
        records: Vec<Record>,
    ) -> Result<Vec<Staged>> {
        let inner = &self.inner;
        inner
            .bounded(Duration::ZERO, async move {
                inner.check_open()?;
                let sent_at = crate::now_ms();
                let mut t = inner.topic_cached(topic).await?;
                if records
                    .iter()
                    .any(|r| r.partition.is_some_and(|p| p >= t.config.partitions))
                {
                    inner.forget_topic(topic);
                    t = inner.topic_cached(topic).await?;
                }
                let plan = {
                    let mut rr = inner.round_robin.lock();
                    let next = rr.entry(topic.to_string()).or_insert(0);
                    partitioner::plan(topic, &records, &t.config, next)?
                };
                if records.is_empty() {
                    return Ok(Vec::new());
                }
                let mut partition_of = vec![0u32; records.len()];
                for (partition, idx) in &plan {
                    for &i in idx {
                        partition_of[i] = *partition;
                    }
                }
                let rows: Vec<stage::Row<'_>> = records
                    .iter()
                    .zip(&partition_of)
                    .map(|(record, &partition)| stage::Row { partition, record })
                    .collect();
                let ids = stage::stage(
                    ex,
                    &inner.tx_sql.stage,
                    topic,
                    t.id,
                    &rows,
                    sent_at,
                    crate::millis(t.config.dedup_window),
                )
                .await?;
                if ids.len() != records.len() {
                    return Err(Error::internal(format!(
                        "send to `{topic}` in the caller's transaction: {} records staged, {} ids returned",
                        records.len(),
                        ids.len()
                    )));
                }
                Ok(partition_of
                    .into_iter()
                    .zip(ids)
                    .map(|(partition, id)| Staged { partition, id })
                    .collect())
            })
            .await
    }

    /// Settle `m` inside the caller's transaction: in queue mode, ack it
    /// (its lease row is deleted if it still carries this delivery's
    /// lease); in stream mode, commit `offset + 1` for its partition if
    /// the partition is still owned in the generation `m` was delivered in
    /// and the group's commit is not already past `m`. The settle holds if
    /// and only if the caller's transaction commits: put it in the same
    /// transaction as the handler's writes, and they commit together or
    /// not at all (contract §10).
    ///
    /// Returns `true` if `m` was settled in this transaction; `false` if
    /// it had already been settled for the group by a committed
    /// transaction or another call (a redelivery after a commit whose
    /// answer was lost, an ack, a seek, a dead letter): then roll back,
    /// since the work is already done.
    ///
    /// In stream mode the settle takes a share lock on the partition's
    /// owner row until the caller's transaction ends, so a rebalance that
    /// would move that partition waits for it: settle last, just before
    /// committing. In queue mode the lease row stays locked until then:
    /// no other member can take the message meanwhile.
    ///
    /// Settling in a transaction does not move this member's position in
    /// the process: after a rollback, nack the message (the runner does)
    /// or let its lease expire (queue mode), so it is delivered again.
    ///
    /// # Errors
    /// `InvalidArgument` for a message not delivered to a group of this
    /// backend, or changed after delivery (contract §4); `LeaseExpired`
    /// (queue mode) if its lease expired and was taken by another
    /// delivery; `Fenced` (stream mode) if its partition was reassigned
    /// since it was delivered. After any error, roll the transaction
    /// back: the settle did not happen, and the handler's writes must not
    /// commit without it. `Unavailable` if the server does not answer
    /// within the broker's timeout.
    ///
    /// # Cancel safety
    /// Not cancel safe: dropped while its statement runs, the settle may
    /// or may not be in the caller's transaction. Roll it back.
    pub async fn ack_in<'e, E: PgExecutor<'e>>(&self, ex: E, m: &Message) -> Result<bool> {
        let inner = &self.inner;
        inner
            .bounded(Duration::ZERO, async move {
                inner.check_open()?;
                settle::ack_in(inner, ex, m).await
            })
            .await
    }

    /// [`IdempotencyStore::first_seen`](conveyor_core::IdempotencyStore::first_seen)
    /// inside the caller's transaction: `true` if `key` was not seen
    /// within its TTL, and it is recorded as seen if and only if the
    /// caller's transaction commits. A concurrent call for the same key in
    /// another transaction waits for that transaction, then answers as its
    /// outcome says (exactly one committed transaction sees a key first).
    ///
    /// # Errors
    /// `InvalidArgument` for an empty, over-long or NUL-carrying key, or a
    /// TTL of zero or over ten years (contract §8); `Unavailable` if the
    /// server does not answer within the broker's timeout. After an error,
    /// roll the transaction back.
    ///
    /// # Cancel safety
    /// Not cancel safe: dropped while its statement runs, the key may or
    /// may not be recorded in the caller's transaction. Roll it back.
    pub async fn first_seen_in<'e, E: PgExecutor<'e>>(
        &self,
        ex: E,
        key: &str,
        ttl: Duration,
    ) -> Result<bool> {
        let inner = &self.inner;
        inner
            .bounded(Duration::ZERO, async move {
                inner.check_open()?;
                settle::first_seen_in(inner, ex, key, ttl).await
            })
            .await
    }

    /// Move the records staged by committed transactions into the log now,
    /// instead of waiting for the relay's notification (tests, tools, a
    /// shutdown that wants everything appended). Returns how many staged
    /// records were taken (appended, or left out as duplicates of an
    /// idempotency key).
    ///
    /// # Errors
    /// `Unavailable` if the server does not answer within the broker's
    /// timeout; `PermissionDenied` if the role lacks the rights.
    ///
    /// # Cancel safety
    /// Cancel safe: each partition moves in one statement; dropped, the
    /// rest stays staged for the relay.
    pub async fn relay_staged(&self) -> Result<u64> {
        let inner = &self.inner;
        inner
            .bounded(Duration::ZERO, async move {
                inner.check_open()?;
                let moved = relay::relay_all(inner).await?;
                if moved > 0 {
                    inner.wake();
                }
                Ok(moved)
            })
            .await
    }
}
