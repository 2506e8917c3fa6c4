//! Settling inside the caller's transaction: a queue-mode ack (delete the
//! lease row, if it still carries the delivery's lease id) and a
//! stream-mode commit (fenced by the generation the message was delivered
//! in, with a share lock on the owner row until the caller's transaction
//! ends, and never over a commit already past the message). Each is one
//! statement on the caller's connection; when it changes nothing, why is
//! read afterwards on the broker's own pool (committed state only).

use crate::broker::Inner;
use crate::error::during;
use conveyor_core::{DeliveryMode, Error, ErrorKind, Message, Result};
use sqlx::{PgExecutor, Row};

/// The statements, with the broker's schema quoted into them (the
/// caller's connection has its own `search_path`).
pub(crate) struct Statements {
    pub(super) stage: String,
    ack: String,
    commit: String,
    first_seen: String,
}

impl Statements {
    pub(crate) fn new(schema: &str) -> Statements {
        Statements {
            stage: super::stage::statement(schema),
            // The lease row of this delivery: deleted only if it still
            // carries the lease id it was delivered with.
            ack: format!(
                r#"DELETE FROM "{schema}".leases WHERE group_name = $1 AND topic = $2
                     AND partition = $3 AND "offset" = $4 AND lease_id = $5 RETURNING 1"#
            ),
            // Commit offset + 1 if the partition is still owned in the
            // generation the message was delivered in (share lock: a
            // rebalance waits for the caller's transaction), and the
            // group's commit is not already past the message.
            commit: format!(
                r#"INSERT INTO "{schema}".commits AS c (group_name, topic, partition, committed)
                   SELECT $1, $2, $3, $4 + 1
                    WHERE EXISTS (SELECT 1 FROM "{schema}".owners o
                                   WHERE o.group_name = $1 AND o.topic = $2 AND o.partition = $3
                                     AND o.generation = $5 FOR SHARE)
                   ON CONFLICT (group_name, topic, partition) DO UPDATE
                      SET committed = excluded.committed
                    WHERE c.committed <= $4
                   RETURNING committed"#
            ),
            first_seen: format!(
                r#"INSERT INTO "{schema}".idempotency AS i (key, expires_at)
                   VALUES ($1, "{schema}".now_ms() + $2)
                   ON CONFLICT (key) DO UPDATE SET expires_at = excluded.expires_at
                    WHERE i.expires_at <= "{schema}".now_ms()
                   RETURNING 1"#
            ),
        }
    }
}

/// Settle `m` through `ex` (see [`crate::PgBroker::ack_in`]).
pub(super) async fn ack_in<'e, E: PgExecutor<'e>>(
    inner: &Inner,
    ex: E,
    m: &Message,
) -> Result<bool> {
    let group = m
        .token()
        .group()
        .ok_or_else(|| {
            Error::invalid(format!(
                "{} was read without a group (fetch); only messages a group's consumer \
                 received can be settled",
                m.position()
            ))
        })?
        .to_string();
    let token = m.delivery(&group)?;
    let what = format!(
        "group `{group}`: settle {} in the caller's transaction",
        m.position()
    );
    let offset = i64::try_from(m.offset)
        .map_err(|_| Error::invalid(format!("{what}: offset out of range")))?;
    match token.mode() {
        Some(DeliveryMode::Queue) => {
            let lease: [u8; 8] = token.lease().as_ref().try_into().map_err(|_| {
                Error::invalid(format!(
                    "{what}: the message carries no lease of this backend"
                ))
            })?;
            let lease = i64::from_be_bytes(lease);
            let done = sqlx::query(&inner.tx_sql.ack)
                .bind(&group)
                .bind(&m.topic)
                .bind(m.partition as i32)
                .bind(offset)
                .bind(lease)
                .fetch_optional(ex)
                .await
                .map_err(during(&what))?;
            if done.is_some() {
                return Ok(true);
            }
            // No row: settled for the group already (acked by a committed
            // transaction, dead-lettered, or passed by a seek). A row
            // with another lease: re-leased to another delivery.
            let held: Option<Option<i64>> = sqlx::query_scalar(
                r#"SELECT lease_id FROM leases WHERE group_name = $1 AND topic = $2
                     AND partition = $3 AND "offset" = $4"#,
            )
            .bind(&group)
            .bind(&m.topic)
            .bind(m.partition as i32)
            .bind(offset)
            .fetch_optional(&inner.pool)
            .await
            .map_err(during(&what))?;
            match held {
                None => Ok(false),
                Some(_) => Err(Error::lease_lost(m.offset, &what)),
            }
        }
        Some(DeliveryMode::Stream) => {
            let generation = token.generation();
            let done = sqlx::query(&inner.tx_sql.commit)
                .bind(&group)
                .bind(&m.topic)
                .bind(m.partition as i32)
                .bind(offset)
                .bind(generation.min(i64::MAX as u64) as i64)
                .fetch_optional(ex)
                .await
                .map_err(during(&what))?;
            if done.is_some() {
                return Ok(true);
            }
            let row = sqlx::query(
                "SELECT (SELECT generation FROM owners WHERE group_name = $1 AND topic = $2
                           AND partition = $3),
                        (SELECT committed FROM commits WHERE group_name = $1 AND topic = $2
                           AND partition = $3)",
            )
            .bind(&group)
            .bind(&m.topic)
            .bind(m.partition as i32)
            .fetch_one(&inner.pool)
            .await
            .map_err(during(&what))?;
            let owned_in: Option<i64> = row.get(0);
            let committed: Option<i64> = row.get(1);
            if owned_in != Some(generation as i64) {
                return Err(Error::new(
                    ErrorKind::Fenced,
                    format!(
                        "{what}: the partition was delivered in generation {generation} and is \
                         now {}; its new owner reads it from the group's committed offset",
                        owned_in.map_or("unowned".to_string(), |g| format!(
                            "owned in generation {g}"
                        ))
                    ),
                ));
            }
            match committed {
                Some(c) if c > offset => Ok(false),
                _ => Err(Error::internal(format!(
                    "{what}: the commit changed nothing"
                ))),
            }
        }
        _ => Err(Error::invalid(format!(
            "{what}: the message carries no delivery of a group"
        ))),
    }
}

/// `first_seen` through `ex` (see [`crate::PgBroker::first_seen_in`]).
pub(super) async fn first_seen_in<'e, E: PgExecutor<'e>>(
    inner: &Inner,
    ex: E,
    key: &str,
    ttl: std::time::Duration,
) -> Result<bool> {
    conveyor_core::backend::validate::first_seen(key, ttl)?;
    let row = sqlx::query(&inner.tx_sql.first_seen)
        .bind(key)
        .bind(crate::millis(ttl))
        .fetch_optional(ex)
        .await
        .map_err(during(format!(
            "idempotency key `{key}` in the caller's transaction"
        )))?;
    Ok(row.is_some())
}
