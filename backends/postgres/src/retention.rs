//! Retention (contract §6): move a partition's log start with a one-row
//! update, then delete the records below it in bounded chunks.

use crate::broker::Inner;
use crate::error::during;
use crate::queries::topic_config;
use conveyor_core::{Result, TopicConfig};
use sqlx::Row;
use std::sync::{Arc, Weak};
use std::time::Duration;

/// How often each open broker checks topics with a retention limit.
const INTERVAL: Duration = Duration::from_millis(250);

/// Rows deleted per statement.
const CHUNK: i64 = 5_000;

/// The new log start of a partition: the first record younger than
/// `max_age`, and the first of the newest records that fit in
/// `max_bytes` (whichever is later); the log end if none qualifies.
const NEW_START: &str = r#"
SELECT p.log_start, greatest(
         p.log_start,
         CASE WHEN $3::bigint IS NULL THEN p.log_start ELSE coalesce(
           (SELECT min(r."offset") FROM records r WHERE r.topic_id = $1 AND r.partition = $2
               AND r."offset" >= p.log_start AND r.ts >= now_ms() - $3), p.next_offset) END,
         CASE WHEN $4::bigint IS NULL OR p.bytes <= $4 THEN p.log_start ELSE coalesce(
           (SELECT min(x."offset") FROM (
               SELECT r."offset", sum(r.size) OVER (ORDER BY r."offset" DESC) AS tail
                 FROM records r WHERE r.topic_id = $1 AND r.partition = $2 AND r."offset" >= p.log_start
             ) x WHERE x.tail <= $4), p.next_offset) END)
  FROM partitions p WHERE p.topic_id = $1 AND p.partition = $2"#;

/// Apply `config`'s retention to every partition of a topic.
pub(crate) async fn enforce(
    inner: &Inner,
    name: &str,
    topic_id: i64,
    config: &TopicConfig,
) -> Result<()> {
    let age = config.retention.max_age.map(crate::millis);
    let bytes = config
        .retention
        .max_bytes
        .map(|b| b.min(i64::MAX as u64) as i64);
    let what = format!("retention of `{name}`");
    for partition in 0..config.partitions as i32 {
        let Some(row) = sqlx::query(NEW_START)
            .bind(topic_id)
            .bind(partition)
            .bind(age)
            .bind(bytes)
            .fetch_optional(&inner.pool)
            .await
            .map_err(during(&what))?
        else {
            continue;
        };
        let (old, new): (i64, i64) = (row.get(0), row.get(1));
        if new <= old {
            continue;
        }
        // The log start first (readers never go below it), with the bytes
        // of what goes; then the rows, a chunk at a time.
        sqlx::query(
            r#"UPDATE partitions p SET log_start = $3,
                   bytes = greatest(0, p.bytes - coalesce((SELECT sum(r.size) FROM records r
                       WHERE r.topic_id = $1 AND r.partition = $2 AND r."offset" >= p.log_start
                         AND r."offset" < $3), 0))
                WHERE p.topic_id = $1 AND p.partition = $2 AND p.log_start < $3"#,
        )
        .bind(topic_id)
        .bind(partition)
        .bind(new)
        .execute(&inner.pool)
        .await
        .map_err(during(&what))?;
        let mut from = old;
        while from < new {
            let to = (from + CHUNK).min(new);
            sqlx::query(
                r#"DELETE FROM records WHERE topic_id = $1 AND partition = $2
                     AND "offset" >= $3 AND "offset" < $4"#,
            )
            .bind(topic_id)
            .bind(partition)
            .bind(from)
            .bind(to)
            .execute(&inner.pool)
            .await
            .map_err(during(&what))?;
            from = to;
        }
        tracing::debug!(
            topic = name,
            partition,
            log_start = new,
            "retention moved the log start"
        );
    }
    Ok(())
}

/// The retention task of one broker: every [`INTERVAL`], every topic with
/// a limit. Errors are logged and tried again next time.
pub(crate) async fn run(inner: Weak<Inner>) {
    loop {
        tokio::time::sleep(INTERVAL).await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        if inner.check_open().is_err() {
            return;
        }
        if let Err(e) = pass(&inner).await {
            tracing::warn!(error = %e, "retention pass failed");
        }
    }
}

async fn pass(inner: &Arc<Inner>) -> Result<()> {
    let rows = sqlx::query(
        "SELECT name, id, config FROM topics WHERE retention_ms IS NOT NULL OR retention_bytes IS NOT NULL",
    )
    .fetch_all(&inner.pool)
    .await
    .map_err(during("list topics with retention"))?;
    for r in rows {
        let name: String = r.get(0);
        let config = topic_config(&name, r.get(2))?;
        enforce(inner, &name, r.get(1), &config).await?;
    }
    Ok(())
}
