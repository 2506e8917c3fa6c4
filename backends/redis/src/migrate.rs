//! Queue-mode state written by an earlier version, converted on first
//! touch. Until this version a queue-mode group kept four structures per
//! partition (leases, ready, attempts, lease tokens: `:l`, `:r`, `:a`,
//! `:t`); it now keeps one sorted set (`:s`, see `queue_settle.lua`).
//! Before a broker first polls, reads the lag of or seeks a group in a
//! partition, it runs `queue_migrate.lua` there once (a no-op when there
//! is nothing old), so leases, attempts and waiting redeliveries carry
//! over. This module owns only that once-per-partition check; it does not
//! read or write the state itself.
//!
//! Processes of the earlier version must not run against the same
//! namespace after the upgrade: what they write in the old layout after
//! a partition was converted is not read.

use crate::broker::Inner;
use crate::conn::{during, SCRIPTS};
use conveyor_core::Result;
use parking_lot::Mutex;
use std::collections::HashSet;

/// (group, topic id, partition) already converted by this broker.
#[derive(Default)]
pub(crate) struct Migrated(Mutex<HashSet<(String, u64, u32)>>);

/// Convert `group`'s queue-mode state in one partition from the old
/// layout, once per broker.
///
/// # Errors
/// `Unavailable` when the server cannot be reached.
///
/// # Cancel safety
/// Cancel safe: the script runs whole or not at all, and the partition is
/// marked done only after it answered.
pub(crate) async fn queue_state(
    inner: &Inner,
    group: &str,
    topic_id: u64,
    partition: u32,
) -> Result<()> {
    let key = (group.to_string(), topic_id, partition);
    if inner.migrated.0.lock().contains(&key) {
        return Ok(());
    }
    let part = inner.part(topic_id, partition);
    let q = part.queue(group);
    let mut call = SCRIPTS.queue_migrate.prepare_invoke();
    call.key(&q.state);
    for k in &q.legacy {
        call.key(k);
    }
    let n: u64 = call
        .invoke_async(&mut inner.conn())
        .await
        .map_err(during(format!(
            "group `{group}`: convert the queue state of partition {partition}"
        )))?;
    if n > 0 {
        tracing::info!(
            group,
            topic_id,
            partition,
            messages = n,
            "queue-mode state converted to the current layout"
        );
    }
    inner.migrated.0.lock().insert(key);
    Ok(())
}
