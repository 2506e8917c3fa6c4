//! Group deletion and the readiness ping. Deleting decides under the group
//! row's lock (as every membership change does), in one transaction: a
//! member joining at the same time either comes first (then the delete is
//! refused) or finds no group and creates a new one.

use crate::broker::Inner;
use crate::error::during;
use conveyor_core::backend::validate;
use conveyor_core::{Error, Result};

/// Delete `group` and everything it keeps, unless it has live members.
pub(crate) async fn delete_group(inner: &Inner, group: &str) -> Result<()> {
    inner.check_open()?;
    validate::group_name(group)?;
    let what = format!("delete group `{group}`");
    let mut tx = crate::tx::Tx::begin(&inner.pool)
        .await
        .map_err(during(&what))?;
    let found = sqlx::query("SELECT 1 FROM groups WHERE name = $1 FOR UPDATE")
        .bind(group)
        .fetch_optional(&mut *tx)
        .await
        .map_err(during(&what))?;
    if found.is_none() {
        return Err(Error::group_not_found(group));
    }
    // Members silent past the session timeout are gone, reaped or not.
    let live: Vec<i64> = sqlx::query_scalar(
        "SELECT m.member_id FROM members m JOIN groups g ON g.name = m.group_name
          WHERE m.group_name = $1 AND m.last_seen + g.session_ms >= now_ms()
          ORDER BY m.member_id",
    )
    .bind(group)
    .fetch_all(&mut *tx)
    .await
    .map_err(during(&what))?;
    if !live.is_empty() {
        let ids: Vec<String> = live.iter().map(i64::to_string).collect();
        return Err(Error::group_not_empty(group, &ids));
    }
    for table in ["owners", "commits", "queue_cursors", "leases"] {
        sqlx::query(&format!("DELETE FROM {table} WHERE group_name = $1"))
            .bind(group)
            .execute(&mut *tx)
            .await
            .map_err(during(&what))?;
    }
    // Members and group_topics go with the row (ON DELETE CASCADE).
    sqlx::query("DELETE FROM groups WHERE name = $1")
        .bind(group)
        .execute(&mut *tx)
        .await
        .map_err(during(&what))?;
    tx.commit().await.map_err(during(&what))?;
    inner.wake();
    Ok(())
}

/// `SELECT 1` on a pooled connection.
pub(crate) async fn ping(inner: &Inner) -> Result<()> {
    inner.check_open()?;
    sqlx::query("SELECT 1")
        .execute(&inner.pool)
        .await
        .map_err(during("ping"))?;
    Ok(())
}
