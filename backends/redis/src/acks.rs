//! Queue-mode acks of one partition that are in flight at the same time,
//! from any consumer of this broker in the same group, merged into one
//! round trip with core's [`Merge`]: the first acks of a partition (up to
//! [`MERGE_CALLS`]) go out at once; acks that arrive while those are on
//! the wire wait and then go out together, as one pipeline
//! ([`settle_acks`]). Every lease is still
//! checked on the server, one at a time; this module only decides which
//! acks share a round trip. It owns nothing else (no lease state lives in
//! the process).

use crate::broker::Inner;
use crate::conn::during;
use conveyor_core::backend::{Merge, MergedCall};
use conveyor_core::{Error, Result};
use std::sync::Arc;
use std::time::Duration;

/// At most this many acks share one pipeline.
const MERGE_MAX: usize = 1000;

/// At most this many pipelines of one partition's acks in flight: with
/// up to four consumers acking one partition, each ack goes out at once
/// (as `XACK`s from four raw consumers would); past that, acks wait for
/// a pipeline to return and go out together. With one in flight, three
/// of four consumers' acks waited for the fourth's round trip first.
const MERGE_CALLS: usize = 4;

/// (group, topic id, partition).
type Key = (Arc<str>, u64, u32);

/// The acks of each partition and group in flight, merged (up to
/// [`MERGE_CALLS`] calls in flight per partition; the multiplexed
/// connection pipelines them).
pub(crate) struct AckMerge(Arc<Merge<Key, (u64, String), i64>>);

impl Default for AckMerge {
    fn default() -> Self {
        AckMerge(Arc::new(Merge::new(MERGE_MAX, MERGE_CALLS)))
    }
}

/// Ack one message: its code (1 settled, 0 lease lost). Merged with the
/// other acks of its partition and group that are in flight (see the
/// module doc).
///
/// # Cancel safety
/// As one round trip: dropped, the ack may or may not have happened;
/// acks waiting behind a dropped one still go out.
pub(crate) async fn ack(
    inner: &Arc<Inner>,
    group: &Arc<str>,
    topic_id: u64,
    partition: u32,
    offset: u64,
    lease: String,
    what: &str,
) -> Result<i64> {
    let key: Key = (group.clone(), topic_id, partition);
    let run_inner = inner.clone();
    let run = move |key: Key, items: Vec<(u64, String)>| -> MergedCall<i64> {
        let inner = run_inner.clone();
        Box::pin(async move {
            let (group, topic_id, partition) = (&key.0, key.1, key.2);
            let what = format!(
                "group `{group}`: ack {} messages of partition {partition}",
                items.len()
            );
            inner
                .bounded(
                    Duration::ZERO,
                    settle_acks(&inner, group, topic_id, partition, &items, &what),
                )
                .await
        })
    };
    inner
        .acks
        .0
        .call(key, (offset, lease), run)
        .await
        .map_err(|e| Error::new(e.kind(), format!("{what}: {}", e.message())))
}

/// Ack `items` (offset, lease token) of one partition's group: one code
/// each (1 settled, 0 lease lost). A lease is one member of the group's
/// state set (`offset:token`, see `queue_settle.lua`), so an ack is one
/// `ZREM` of it, which checks and settles in one atomic step: it removes
/// the member only if the lease still holds, and says whether it did. The
/// `ZREM`s of all the items go out as one pipeline (one round trip), not
/// a script: a script would only wrap the same command, at several times
/// its cost on the server. An offset given twice settles once.
pub(crate) async fn settle_acks(
    inner: &Inner,
    group: &str,
    topic_id: u64,
    partition: u32,
    items: &[(u64, String)],
    what: &str,
) -> Result<Vec<i64>> {
    let part = inner.part(topic_id, partition);
    let q = part.queue(group);
    let mut pipe = redis::pipe();
    for (o, tok) in items {
        pipe.cmd("ZREM").arg(&q.state).arg(format!("{o}:{tok}"));
    }
    let codes: Vec<i64> = pipe
        .query_async(&mut inner.conn())
        .await
        .map_err(during(what))?;
    if codes.len() != items.len() {
        return Err(Error::internal(format!(
            "{what}: {} codes for {} acks",
            codes.len(),
            items.len()
        )));
    }
    Ok(codes)
}
