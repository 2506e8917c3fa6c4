//! Explicit changes of a group's settings (`alter_group`, contract §4):
//! under the group row's lock, the stored config is changed with core's
//! [`GroupChanges::apply`] and written back with the columns the queue
//! functions read (`session_ms`, `visibility_ms`, `max_deliveries`), so
//! running members follow at their next heartbeat, lease and failure.
//! Joining never changes the settings (see `group::join`); this module does
//! not touch members, leases or offsets. No schema change: the columns
//! exist since `0001_init.sql`.

use crate::broker::{config_json, Inner};
use crate::error::during;
use crate::millis;
use conveyor_core::backend::validate;
use conveyor_core::{Error, GroupChanges, GroupConfig, Result};

/// Apply `changes` to `group`'s stored settings; the settings now stored.
///
/// # Errors
/// `GroupNotFound`; `InvalidArgument` (see [`GroupChanges::apply`]).
pub(crate) async fn alter_group(
    inner: &Inner,
    group: &str,
    changes: &GroupChanges,
) -> Result<GroupConfig> {
    validate::group_name(group)?;
    let what = format!("alter group `{group}`");
    let mut tx = crate::tx::Tx::begin(&inner.pool)
        .await
        .map_err(during(&what))?;
    let json: serde_json::Value =
        sqlx::query_scalar("SELECT config FROM groups WHERE name = $1 FOR UPDATE")
            .bind(group)
            .fetch_optional(&mut *tx)
            .await
            .map_err(during(&what))?
            .ok_or_else(|| Error::group_not_found(group))?;
    let stored: GroupConfig = serde_json::from_value(json)
        .map_err(|e| Error::internal(format!("{what}: stored config is unreadable: {e}")))?;
    let next = changes.apply(group, &stored)?;
    sqlx::query(
        "UPDATE groups SET config = $2, session_ms = $3, visibility_ms = $4, max_deliveries = $5
         WHERE name = $1",
    )
    .bind(group)
    .bind(config_json(&next)?)
    .bind(millis(next.session_timeout))
    .bind(millis(next.visibility_timeout))
    .bind(next.dlq.max_deliveries.min(i32::MAX as u32) as i32)
    .execute(&mut *tx)
    .await
    .map_err(during(&what))?;
    tx.commit().await.map_err(during(&what))?;
    inner.wake();
    tracing::info!(group, ?changes, "group settings altered");
    Ok(next)
}
