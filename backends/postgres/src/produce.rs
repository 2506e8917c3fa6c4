//! Producing: route with core's partitioner, validate with core's
//! validator, then one statement per partition (or, with idempotency
//! keys, one transaction per partition that looks the keys up first).

use crate::broker::Inner;
use crate::error::during;
use async_trait::async_trait;
use conveyor_core::backend::encode_headers;
use conveyor_core::partitioner;
use conveyor_core::{Error, ErrorKind, Producer, Receipt, Record, Result};
use sqlx::{PgConnection, Row};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;

/// Appends `n` records to a partition: locks its row (held to commit),
/// takes `n` offsets, inserts the records with them, returns the first
/// offset and the timestamp (one row; the records take consecutive
/// offsets in input order, all with that timestamp). Delivery times (`$9`,
/// on the producer's clock, read as `$11` when `send` was called) are
/// moved onto the server's clock, so a delay counts from the append's
/// timestamp whatever the two clocks say.
const APPEND: &str = r#"
WITH p AS (
    UPDATE partitions
       SET next_offset = next_offset + $3,
           last_ts = greatest(last_ts, now_ms()),
           bytes = bytes + $4
     WHERE topic_id = $1 AND partition = $2
 RETURNING next_offset - $3 AS base, last_ts AS ts
), ins AS (
INSERT INTO records (topic_id, partition, "offset", ts, key, value, headers, idem, deliver_at, size)
SELECT $1, $2, p.base + t.i - 1, p.ts, t.key, t.value, t.headers, t.idem,
       t.deliver_at + (p.ts - t.sent_at), t.size
  FROM p, unnest($5::bytea[], $6::bytea[], $7::bytea[], $8::text[], $9::bigint[], $10::bigint[],
                 $11::bigint[])
       WITH ORDINALITY AS t(key, value, headers, idem, deliver_at, size, sent_at, i)
)
SELECT base, ts FROM p"#;

/// Appends `records` to one partition in `conn` (in the caller's
/// transaction, if any). Receipts in input order.
pub(crate) async fn append(
    conn: &mut PgConnection,
    topic: &str,
    topic_id: i64,
    partition: u32,
    records: &[&Record],
    sent_at: u64,
) -> Result<Vec<Receipt>> {
    append_sent(
        conn,
        topic,
        topic_id,
        partition,
        records,
        &vec![sent_at; records.len()],
    )
    .await
}

/// Records as the column arrays an `unnest(..)` insert binds, one
/// element per record in input order: key, value, encoded headers,
/// idempotency key, delivery time and size. Written once for the append
/// and for staging in the caller's transaction.
pub(crate) struct Columns<'a> {
    pub keys: Vec<Option<Vec<u8>>>,
    pub values: Vec<&'a [u8]>,
    pub headers: Vec<Vec<u8>>,
    pub idems: Vec<Option<String>>,
    pub deliver: Vec<Option<i64>>,
    pub sizes: Vec<i64>,
}

impl<'a> Columns<'a> {
    pub(crate) fn of(records: impl ExactSizeIterator<Item = &'a Record>) -> Self {
        let n = records.len();
        let mut c = Columns {
            keys: Vec::with_capacity(n),
            values: Vec::with_capacity(n),
            headers: Vec::with_capacity(n),
            idems: Vec::with_capacity(n),
            deliver: Vec::with_capacity(n),
            sizes: Vec::with_capacity(n),
        };
        for r in records {
            c.keys.push(r.key.as_ref().map(|k| k.to_vec()));
            c.values.push(r.value.as_ref());
            c.headers.push(encode_headers(&r.headers));
            c.idems.push(r.idempotency_key.clone());
            c.deliver
                .push(r.deliver_at.map(|t| t.min(i64::MAX as u64) as i64));
            c.sizes.push(r.size() as i64);
        }
        c
    }
}

/// [`append`] with each record's own send time.
async fn append_sent(
    conn: &mut PgConnection,
    topic: &str,
    topic_id: i64,
    partition: u32,
    records: &[&Record],
    sent_at: &[u64],
) -> Result<Vec<Receipt>> {
    if records.is_empty() {
        return Ok(Vec::new());
    }
    let n = records.len();
    let columns = Columns::of(records.iter().copied());
    let total: i64 = columns.sizes.iter().sum();
    let row = sqlx::query(APPEND)
        .bind(topic_id)
        .bind(partition as i32)
        .bind(n as i64)
        .bind(total)
        .bind(columns.keys)
        .bind(columns.values)
        .bind(columns.headers)
        .bind(columns.idems)
        .bind(columns.deliver)
        .bind(columns.sizes)
        .bind(
            sent_at
                .iter()
                .map(|t| (*t).min(i64::MAX as u64) as i64)
                .collect::<Vec<_>>(),
        )
        .fetch_optional(&mut *conn)
        .await
        .map_err(during(format!("append to `{topic}`/{partition}")))?;
    // No partition row: the topic was deleted meanwhile.
    let row = row.ok_or_else(|| Error::topic_not_found(topic))?;
    let base = row.get::<i64, _>(0) as u64;
    let timestamp = row.get::<i64, _>(1) as u64;
    Ok((0..n as u64)
        .map(|i| Receipt {
            partition,
            offset: base + i,
            timestamp,
        })
        .collect())
}

/// Appends to one partition, leaving out records whose idempotency key
/// was appended to it within `window` (they get the original receipt) or
/// earlier in the same batch (they get that record's receipt). One
/// transaction: the partition row is locked before the lookup, so
/// concurrent sends of one key append it once.
async fn append_idempotent(
    inner: &Inner,
    topic: &str,
    topic_id: i64,
    partition: u32,
    records: &[&Record],
    window: Duration,
    sent_at: u64,
) -> Result<Vec<Receipt>> {
    let what = format!("idempotent append to `{topic}`/{partition}");
    let mut tx = crate::tx::Tx::begin(&inner.pool)
        .await
        .map_err(during(&what))?;
    let locked =
        sqlx::query("SELECT 1 FROM partitions WHERE topic_id = $1 AND partition = $2 FOR UPDATE")
            .bind(topic_id)
            .bind(partition as i32)
            .fetch_optional(&mut *tx)
            .await
            .map_err(during(&what))?;
    if locked.is_none() {
        return Err(Error::topic_not_found(topic));
    }
    let keys: Vec<String> = records
        .iter()
        .filter_map(|r| r.idempotency_key.clone())
        .collect();
    let rows = sqlx::query(
        r#"SELECT DISTINCT ON (idem) idem, "offset", ts FROM records
            WHERE topic_id = $1 AND partition = $2 AND idem = ANY($3) AND ts >= now_ms() - $4
            ORDER BY idem, "offset""#,
    )
    .bind(topic_id)
    .bind(partition as i32)
    .bind(&keys)
    .bind(crate::millis(window))
    .fetch_all(&mut *tx)
    .await
    .map_err(during(&what))?;
    let known: HashMap<String, Receipt> = rows
        .iter()
        .map(|r| {
            (
                r.get::<String, _>(0),
                Receipt {
                    partition,
                    offset: r.get::<i64, _>(1) as u64,
                    timestamp: r.get::<i64, _>(2) as u64,
                },
            )
        })
        .collect();
    // Which input each record's receipt comes from.
    enum Source {
        Known(Receipt),
        New(usize),
    }
    let mut first_of: HashMap<&str, usize> = HashMap::new();
    let mut fresh: Vec<&Record> = Vec::new();
    let mut sources = Vec::with_capacity(records.len());
    for r in records {
        match r.idempotency_key.as_deref() {
            Some(k) if known.contains_key(k) => sources.push(Source::Known(known[k])),
            Some(k) => match first_of.get(k) {
                Some(&j) => sources.push(Source::New(j)),
                None => {
                    first_of.insert(k, fresh.len());
                    sources.push(Source::New(fresh.len()));
                    fresh.push(r);
                }
            },
            None => {
                sources.push(Source::New(fresh.len()));
                fresh.push(r);
            }
        }
    }
    let appended = append(&mut tx, topic, topic_id, partition, &fresh, sent_at).await?;
    tx.commit().await.map_err(during(&what))?;
    Ok(sources
        .into_iter()
        .map(|s| match s {
            Source::Known(r) => r,
            Source::New(j) => appended[j],
        })
        .collect())
}

/// A send waiting in a [`Lane`]: its records and where its receipts go.
struct Pending {
    records: Vec<Record>,
    sent_at: u64,
    reply: oneshot::Sender<Result<Vec<Receipt>>>,
}

/// Concurrent sends to one partition from this process, merged: the first
/// starts a flusher task, which appends everything queued meanwhile in one
/// statement (one transaction, one WAL flush under `always`), and again
/// while more arrived. Each send's records stay contiguous and atomic.
#[derive(Default)]
pub(crate) struct Lane {
    queue: Vec<Pending>,
    running: bool,
}

/// Most records one merged statement carries.
const MERGE_MAX: usize = 5_000;

/// The flusher of one partition's lane (see [`Lane`]).
async fn flush_lane(inner: Arc<Inner>, topic: String, topic_id: i64, partition: u32) {
    loop {
        let batch: Vec<Pending> = {
            let mut lanes = inner.lanes.lock();
            let Some(lane) = lanes.get_mut(&(topic_id, partition)) else {
                return;
            };
            if lane.queue.is_empty() {
                lanes.remove(&(topic_id, partition));
                return;
            }
            let mut n = 0;
            let take = lane
                .queue
                .iter()
                .take_while(|p| {
                    n += p.records.len();
                    n <= MERGE_MAX || n == p.records.len()
                })
                .count()
                .max(1);
            lane.queue.drain(..take).collect()
        };
        let records: Vec<&Record> = batch.iter().flat_map(|p| p.records.iter()).collect();
        let sent_at: Vec<u64> = batch
            .iter()
            .flat_map(|p| std::iter::repeat_n(p.sent_at, p.records.len()))
            .collect();
        let result = append_pooled(&inner, &topic, topic_id, partition, &records, &sent_at).await;
        drop(records);
        match result {
            Ok(receipts) => {
                let mut rest = receipts.into_iter();
                for p in batch {
                    let mine: Vec<Receipt> = rest.by_ref().take(p.records.len()).collect();
                    let _ = p.reply.send(Ok(mine));
                }
            }
            // The database refused the merged statement (not the
            // connection): one send's records may be the cause, and no
            // caller's records may fail another's. Each send again on its
            // own, so only the faulty one gets the error.
            Err(e) if batch.len() > 1 && !merged_failure_is_shared(e.kind()) => {
                tracing::debug!(topic, partition, sends = batch.len(), error = %e,
                    "merged append refused: appending each send on its own");
                for p in batch {
                    let records: Vec<&Record> = p.records.iter().collect();
                    let sent_at = vec![p.sent_at; records.len()];
                    let result =
                        append_pooled(&inner, &topic, topic_id, partition, &records, &sent_at)
                            .await;
                    let _ = p.reply.send(result);
                }
            }
            Err(e) => {
                for p in batch {
                    let _ = p.reply.send(Err(Error::new(e.kind(), e.message())));
                }
            }
        }
    }
}

/// Whether a merged append's failure is every merged send's, whatever
/// their records (the server or the topic, not the data): then there is no
/// point in appending each send on its own.
fn merged_failure_is_shared(kind: ErrorKind) -> bool {
    matches!(
        kind,
        ErrorKind::Unavailable
            | ErrorKind::Closed
            | ErrorKind::TopicNotFound
            | ErrorKind::Unauthenticated
            | ErrorKind::PermissionDenied
    )
}

/// [`append_sent`] on a kept connection (see `spare`; no transaction:
/// the statement is its own).
async fn append_pooled(
    inner: &Inner,
    topic: &str,
    topic_id: i64,
    partition: u32,
    records: &[&Record],
    sent_at: &[u64],
) -> Result<Vec<Receipt>> {
    let mut conn = inner.conn(|| format!("send to `{topic}`")).await?;
    let appended = append_sent(&mut conn, topic, topic_id, partition, records, sent_at).await;
    conn.checked(appended)
}

impl Inner {
    /// Append one send's records to one partition through its [`Lane`].
    async fn append_merged(
        self: &Arc<Self>,
        topic: &str,
        topic_id: i64,
        partition: u32,
        records: Vec<Record>,
        sent_at: u64,
    ) -> Result<Vec<Receipt>> {
        let (reply, receipts) = oneshot::channel();
        let start = {
            let mut lanes = self.lanes.lock();
            let lane = lanes.entry((topic_id, partition)).or_default();
            lane.queue.push(Pending {
                records,
                sent_at,
                reply,
            });
            !std::mem::replace(&mut lane.running, true)
        };
        if start {
            tokio::spawn(flush_lane(
                self.clone(),
                topic.to_string(),
                topic_id,
                partition,
            ));
        }
        receipts.await.map_err(|_| {
            Error::internal(format!(
                "send to `{topic}`/{partition}: the append task ended"
            ))
        })?
    }

    /// `send_batch` (contract §3).
    pub(crate) async fn send_batch(
        self: &Arc<Self>,
        topic: &str,
        records: Vec<Record>,
    ) -> Result<Vec<Receipt>> {
        self.check_open()?;
        // Delivery times are relative to this moment (see `APPEND`).
        let sent_at = crate::now_ms();
        let mut t = self.topic_cached(topic).await?;
        if records
            .iter()
            .any(|r| r.partition.is_some_and(|p| p >= t.config.partitions))
        {
            // Another process may have added partitions since the cache.
            self.forget_topic(topic);
            t = self.topic_cached(topic).await?;
        }
        // Ascending partition order: two batches never wait on each other
        // in opposite orders.
        let by_partition = {
            let mut rr = self.round_robin.lock();
            let next = rr.entry(topic.to_string()).or_insert(0);
            partitioner::plan(topic, &records, &t.config, next)?
        };
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let mut receipts: Vec<Option<Receipt>> = vec![None; records.len()];
        let mut records: Vec<Option<Record>> = records.into_iter().map(Some).collect();
        for (partition, idx) in by_partition {
            let batch: Vec<Record> = idx.iter().filter_map(|&i| records[i].take()).collect();
            let got = if batch.iter().any(|r| r.idempotency_key.is_some()) {
                let refs: Vec<&Record> = batch.iter().collect();
                append_idempotent(
                    self,
                    topic,
                    t.id,
                    partition,
                    &refs,
                    t.config.dedup_window,
                    sent_at,
                )
                .await
            } else {
                self.append_merged(topic, t.id, partition, batch, sent_at)
                    .await
            };
            let got = match got {
                // The topic was deleted (and maybe made again) since it was
                // cached: look again next time.
                Err(e) if e.kind() == ErrorKind::TopicNotFound => {
                    self.forget_topic(topic);
                    return Err(e);
                }
                other => other?,
            };
            for (i, r) in idx.into_iter().zip(got) {
                receipts[i] = Some(r);
            }
        }
        receipts
            .into_iter()
            .map(|r| {
                r.ok_or_else(|| {
                    Error::internal(format!("topic `{topic}`: a record got no receipt"))
                })
            })
            .collect()
    }
}

/// The producer: stateless; every call goes to the server.
pub(crate) struct PgProducer {
    pub inner: Arc<Inner>,
}

#[async_trait]
impl Producer for PgProducer {
    async fn send_batch(&self, topic: &str, records: Vec<Record>) -> Result<Vec<Receipt>> {
        self.inner
            .bounded(Duration::ZERO, async move {
                self.inner.send_batch(topic, records).await
            })
            .await
    }

    async fn flush(&self) -> Result<()> {
        self.inner
            .bounded(Duration::ZERO, async move { self.inner.check_open() })
            .await
    }
}
