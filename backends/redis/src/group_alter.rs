//! Explicit changes of a group's settings (`alter_group`, contract §4): the
//! stored config is read, changed with core's [`GroupChanges::apply`] and
//! written back with a compare-and-set (`group_alter.lua`). Joining never
//! changes the settings (see `consumer::join`); this module does not touch
//! members, leases or offsets.

use crate::broker::Inner;
use crate::conn::{map_err, SCRIPTS};
use crate::millis;
use conveyor_core::backend::validate;
use conveyor_core::{Error, ErrorKind, GroupChanges, GroupConfig, Result};

/// Apply `changes` to `group`'s stored settings; the settings now stored.
///
/// # Errors
/// `GroupNotFound`; `InvalidArgument` (see [`GroupChanges::apply`]);
/// `Unavailable` if other alters kept winning the race.
pub(crate) async fn alter_group(
    inner: &Inner,
    group: &str,
    changes: &GroupChanges,
) -> Result<GroupConfig> {
    validate::group_name(group)?;
    let what = format!("alter group `{group}`");
    let k = inner.group_keys(group);
    for _ in 0..16 {
        let stored_json: Option<String> = redis::cmd("HGET")
            .arg(&k.meta)
            .arg("config")
            .query_async(&mut inner.conn())
            .await
            .map_err(|e| map_err(&what, e))?;
        let Some(stored_json) = stored_json else {
            return Err(Error::group_not_found(group));
        };
        let stored: GroupConfig = serde_json::from_str(&stored_json)
            .map_err(|e| Error::internal(format!("{what}: stored config is unreadable: {e}")))?;
        let next = changes.apply(group, &stored)?;
        let next_json = serde_json::to_string(&next)
            .map_err(|e| Error::internal(format!("{what}: config to JSON: {e}")))?;
        let stored_now: i64 = SCRIPTS
            .group_alter
            .key(&k.meta)
            .arg(&stored_json)
            .arg(&next_json)
            .arg(millis(next.session_timeout))
            .arg(millis(next.visibility_timeout))
            .arg(next.dlq.max_deliveries)
            .invoke_async(&mut inner.conn())
            .await
            .map_err(|e| match e.code() {
                Some("NOGROUP") => Error::group_not_found(group),
                _ => map_err(&what, e),
            })?;
        if stored_now == 1 {
            inner.wake();
            tracing::info!(group, ?changes, "group settings altered");
            return Ok(next);
        }
    }
    Err(Error::new(
        ErrorKind::Unavailable,
        format!("{what}: its settings kept changing under other alters; retry"),
    ))
}
