//! The one statement of a send inside the caller's transaction: the
//! records go into `staged` (migration 3), with the partition core's
//! partitioner chose, and nothing else is touched: no partition row is
//! locked and no offset is taken, so the caller's transaction may stay
//! open as long as it likes without holding up anyone's send.

use crate::error::during;
use crate::produce::Columns;
use conveyor_core::{Record, Result};
use sqlx::PgExecutor;

/// `INSERT .. SELECT FROM unnest(..)` of one send's records, in input
/// order (the identity values follow the `ORDER BY`); `{schema}` is the
/// broker's schema, quoted, since the caller's connection has its own
/// `search_path`.
pub(super) fn statement(schema: &str) -> String {
    format!(
        r#"INSERT INTO "{schema}".staged (topic_id, partition, key, value, headers, idem,
                                         deliver_at, size, sent_at, dedup_ms)
           SELECT $1, t.partition, t.key, t.value, t.headers, t.idem, t.deliver_at, t.size, $9, $10
             FROM unnest($2::int[], $3::bytea[], $4::bytea[], $5::bytea[], $6::text[],
                         $7::bigint[], $8::bigint[])
                  WITH ORDINALITY AS t(partition, key, value, headers, idem, deliver_at, size, i)
            ORDER BY t.i
           RETURNING id"#
    )
}

/// One record to stage and the partition it goes to.
pub(super) struct Row<'a> {
    pub partition: u32,
    pub record: &'a Record,
}

/// Stage `rows` of topic `topic_id` through `ex` (the caller's
/// connection or transaction). Returns the staging ids in input order.
pub(super) async fn stage<'e, E: PgExecutor<'e>>(
    ex: E,
    sql: &str,
    topic: &str,
    topic_id: i64,
    rows: &[Row<'_>],
    sent_at: u64,
    dedup_ms: i64,
) -> Result<Vec<i64>> {
    let partitions: Vec<i32> = rows.iter().map(|r| r.partition as i32).collect();
    let columns = Columns::of(rows.iter().map(|r| r.record));
    let mut ids: Vec<i64> = sqlx::query_scalar(sql)
        .bind(topic_id)
        .bind(partitions)
        .bind(columns.keys)
        .bind(columns.values)
        .bind(columns.headers)
        .bind(columns.idems)
        .bind(columns.deliver)
        .bind(columns.sizes)
        .bind(sent_at.min(i64::MAX as u64) as i64)
        .bind(dedup_ms)
        .fetch_all(ex)
        .await
        .map_err(during(format!(
            "send to `{topic}` in the caller's transaction"
        )))?;
    // Identity values were taken in input order.
    ids.sort_unstable();
    Ok(ids)
}
