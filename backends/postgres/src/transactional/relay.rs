//! The relay: moves records staged by committed transactions into the
//! log (`relay_staged`, migration 3), one partition per statement, so a
//! partition row is locked only while its move runs (as an ordinary
//! append locks it). Every open broker on the schema runs one, woken by
//! the `staged` notification a committing transaction sends, and every
//! [`FALLBACK_POLL`] in case a notification was lost. Relays of several
//! brokers take turns on the partition lock: each staged record is
//! appended exactly once. It touches no other table.

use crate::broker::{Inner, FALLBACK_POLL};
use crate::error::during;
use conveyor_core::Result;
use std::sync::Weak;

/// Most staging transactions one `relay_staged` statement moves (each
/// transaction's records of the partition move together).
const RELAY_MAX: i32 = 1_000;

/// Most partitions with staged records looked at per round.
const PARTITIONS_PER_ROUND: i64 = 1_000;

/// The relay task of one broker: a round at start, on every wake-up
/// (`Inner::relay_wake`), and every [`FALLBACK_POLL`].
pub(crate) async fn run(inner: Weak<Inner>) {
    let wake = match inner.upgrade() {
        Some(i) => i.relay_wake.clone(),
        None => return,
    };
    loop {
        {
            let Some(inner) = inner.upgrade() else { return };
            if inner.check_open().is_err() {
                return;
            }
            match inner
                .bounded(std::time::Duration::ZERO, relay_all(&inner))
                .await
            {
                Ok(0) => {}
                Ok(moved) => {
                    tracing::trace!(moved, "relayed staged records");
                    inner.wake();
                }
                Err(e) => tracing::warn!(error = %e, "relaying staged records failed (retried)"),
            }
        }
        tokio::select! {
            () = wake.notified() => {}
            () = tokio::time::sleep(FALLBACK_POLL) => {}
        }
    }
}

/// Move every committed staged record into the log; how many staged rows
/// were taken. One statement finds the partitions with staged rows, then
/// one per partition moves them (each its own transaction, so a partition
/// row is locked only while its own move runs); it looks again only if a
/// move was cut at [`RELAY_MAX`] transactions (records committed meanwhile
/// send their own notification). On a kept connection (see `spare`).
pub(crate) async fn relay_all(inner: &Inner) -> Result<u64> {
    let mut conn = inner.conn(|| "relay staged records".to_string()).await?;
    let mut total = 0u64;
    loop {
        let parts = sqlx::query_as::<_, (i64, i32)>(
            "SELECT DISTINCT topic_id, partition FROM staged ORDER BY topic_id, partition LIMIT $1",
        )
        .bind(PARTITIONS_PER_ROUND)
        .fetch_all(&mut *conn)
        .await
        .map_err(during("find staged records"));
        let parts = conn.checked(parts)?;
        let mut again = parts.len() as i64 == PARTITIONS_PER_ROUND;
        for (topic_id, partition) in parts {
            let moved = sqlx::query_scalar::<_, i32>("SELECT relay_staged($1, $2, $3)")
                .bind(topic_id)
                .bind(partition)
                .bind(RELAY_MAX)
                .fetch_one(&mut *conn)
                .await
                .map_err(during(format!(
                    "move staged records of topic id {topic_id}/{partition} into the log"
                )));
            let moved = conn.checked(moved)?;
            // At least one row per transaction taken: a move of RELAY_MAX
            // rows or more may have left transactions behind.
            again |= moved >= RELAY_MAX;
            total += moved.max(0) as u64;
        }
        if !again {
            return Ok(total);
        }
    }
}
