//! Queue-mode acks of one partition that are in flight at the same time,
//! from any consumer of this broker in the same group, merged into one
//! round trip: the first ack of a partition goes out at once; acks that
//! arrive while it is on the wire wait and then go out together, as one
//! pipeline ([`settle_acks`]). Every lease is still checked on the server,
//! one at a time; this module only decides which acks share a round trip. It owns nothing else (no lease state lives in the process).

use crate::broker::Inner;
use crate::conn::during;
use conveyor_core::{Error, ErrorKind, Result};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;

/// At most this many acks share one script call.
const MERGE_MAX: usize = 1000;

/// (group, topic id, partition).
type Key = (Arc<str>, u64, u32);

/// An ack waiting for the call in flight: offset, lease token, and where
/// its code goes (1 settled, 0 lease lost).
type Waiting = (u64, String, oneshot::Sender<Result<i64>>);

/// The partitions with an ack call in flight, and the acks waiting for it.
#[derive(Default)]
pub(crate) struct AckMerge {
    busy: Mutex<HashMap<Key, Vec<Waiting>>>,
}

/// Ack one message: its code (1 settled, 0 lease lost). Merged with the
/// other acks of its partition and group that are in flight (see the
/// module doc).
///
/// # Cancel safety
/// As one script call: dropped, the ack may or may not have happened;
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
    let waiting = {
        let mut busy = inner.acks.busy.lock();
        match busy.get_mut(&key) {
            Some(queue) => {
                let (tx, rx) = oneshot::channel();
                queue.push((offset, lease.clone(), tx));
                Some(rx)
            }
            None => {
                busy.insert(key.clone(), Vec::new());
                None
            }
        }
    };
    if let Some(rx) = waiting {
        return rx.await.unwrap_or_else(|_| {
            Err(Error::new(
                ErrorKind::Unavailable,
                format!("{what}: the ack was not sent (the broker is shutting down)"),
            ))
        });
    }
    // This ack leads: sent at once; when it is answered (or dropped), the
    // acks that queued behind it go out together.
    let _lead = Lead {
        inner: inner.clone(),
        key,
    };
    let codes = settle_acks(inner, group, topic_id, partition, &[(offset, lease)], what).await?;
    Ok(codes.first().copied().unwrap_or(0))
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

/// The ack in flight of one partition. Dropped (answered or cancelled),
/// it sends the acks that queued behind it, in a task of their own, or
/// marks the partition idle.
struct Lead {
    inner: Arc<Inner>,
    key: Key,
}

impl Drop for Lead {
    fn drop(&mut self) {
        let Some(first) = take(&self.inner, &self.key) else {
            return;
        };
        let (inner, key) = (self.inner.clone(), self.key.clone());
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(flush(inner, key, first));
            }
            Err(_) => {
                for (_, _, tx) in first {
                    let _ = tx.send(Err(Error::new(
                        ErrorKind::Unavailable,
                        "ack: no runtime to send it on",
                    )));
                }
                inner.acks.busy.lock().remove(&key);
            }
        }
    }
}

/// The acks queued for `key` (at most [`MERGE_MAX`]), or `None` (and the
/// partition marked idle) when there are none.
fn take(inner: &Inner, key: &Key) -> Option<Vec<Waiting>> {
    let mut busy = inner.acks.busy.lock();
    let queue = busy.get_mut(key)?;
    if queue.is_empty() {
        busy.remove(key);
        return None;
    }
    let n = queue.len().min(MERGE_MAX);
    Some(queue.drain(..n).collect())
}

/// Send queued acks, one script call per batch, until none are left.
async fn flush(inner: Arc<Inner>, key: Key, mut batch: Vec<Waiting>) {
    loop {
        let (group, topic_id, partition) = (&key.0, key.1, key.2);
        let what = format!(
            "group `{group}`: ack {} messages of partition {partition}",
            batch.len()
        );
        let items: Vec<(u64, String)> = batch.iter().map(|(o, l, _)| (*o, l.clone())).collect();
        let got = inner
            .bounded(
                Duration::ZERO,
                settle_acks(&inner, group, topic_id, partition, &items, &what),
            )
            .await;
        match got {
            Ok(codes) => {
                for ((_, _, tx), code) in batch.into_iter().zip(codes) {
                    let _ = tx.send(Ok(code));
                }
            }
            Err(e) => {
                for (_, _, tx) in batch {
                    let _ = tx.send(Err(Error::new(e.kind(), e.message().to_string())));
                }
            }
        }
        match take(&inner, &key) {
            Some(next) => batch = next,
            None => return,
        }
    }
}
