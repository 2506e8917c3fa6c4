//! The raw queues, each server used the way a well-built queue uses it,
//! beside which the comparison (`Raw::queue`) and the `queue` criterion
//! bench put Conveyor's queue mode: Redis streams with a consumer group
//! ([`redis_queue`]) and a PostgreSQL table in the design of pgmq and
//! River ([`postgres_queue`]). Each fills its storage untimed, times only
//! the draining, counts the leases that came back empty, and deletes what
//! it made.

#[cfg(feature = "postgres")]
use crate::raw::postgres_connect;
#[cfg(feature = "redis")]
use crate::raw::redis_fill;
use std::time::Duration;
#[cfg(any(feature = "redis", feature = "postgres"))]
use std::time::Instant;

/// One drain of a raw queue ([`redis_queue`], [`postgres_queue`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueRun {
    /// The time the draining took.
    pub took: Duration,
    /// Leases taken (`XREADGROUP` or `UPDATE ... RETURNING` calls), by all
    /// consumers.
    pub leases: u64,
    /// Of those, the ones that returned nothing (another consumer held
    /// the rest, or, on Redis, the consumer's turn came to an empty
    /// stream).
    pub empty_leases: u64,
}

/// The raw Redis queue, the way a well-built queue uses Redis: the
/// `keys` streams (one hash slot each, so it runs on a cluster too),
/// filled with `n` entries in all, one Redis consumer group, `consumers`
/// consumers (tasks sharing the connection) taking turns over the streams
/// with `XREADGROUP ... COUNT 100`, acking each entry with its own `XACK`
/// (each awaited), or each read's entries with one `XACK` when
/// `batch_ack`. Only the draining is timed; the streams are deleted after.
/// [`Raw::queue`](crate::raw::Raw::queue) (the comparison) and the `queue` criterion bench both
/// use it.
///
/// # Errors
/// The server's error, as text.
///
/// # Cancel safety
/// Not cancel safe: the streams stay, and spawned consumers run on.
#[cfg(feature = "redis")]
pub async fn redis_queue<C>(
    conn: &C,
    keys: &[String],
    n: u64,
    consumers: usize,
    batch_ack: bool,
    value: &[u8],
) -> Result<QueueRun, String>
where
    C: conveyor::redis::redis::aio::ConnectionLike + Clone + Send + Sync + 'static,
{
    use conveyor::redis::redis::{self, streams::StreamReadReply};
    use std::sync::atomic::{AtomicI64, Ordering};
    use std::sync::Arc;
    let e = |e: redis::RedisError| e.to_string();
    let mut c = conn.clone();
    let keys: Arc<Vec<String>> = Arc::new(keys.to_vec());
    let streams = keys.len() as u64;
    for (i, k) in keys.iter().enumerate() {
        // One pipeline per stream: on a cluster, a pipeline stays in one slot.
        let share = n / streams + u64::from((i as u64) < n % streams);
        redis_fill(&mut c, k, None, share, value).await?;
        redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(k)
            .arg("workers")
            .arg("0")
            .arg("MKSTREAM")
            .query_async::<()>(&mut c)
            .await
            .map_err(e)?;
    }
    let left = Arc::new(AtomicI64::new(n as i64));
    let started = Instant::now();
    let tasks: Vec<_> = (0..consumers)
        .map(|i| {
            let (mut c, keys, left) = (conn.clone(), keys.clone(), left.clone());
            tokio::spawn(async move {
                let (mut turn, mut leases, mut empty) = (i, 0u64, 0u64);
                while left.load(Ordering::Relaxed) > 0 {
                    let k = &keys[turn % keys.len()];
                    turn += 1;
                    let got: Option<StreamReadReply> = redis::cmd("XREADGROUP")
                        .arg("GROUP")
                        .arg("workers")
                        .arg(format!("c{i}"))
                        .arg("COUNT")
                        .arg(100)
                        .arg("STREAMS")
                        .arg(k)
                        .arg(">")
                        .query_async(&mut c)
                        .await?;
                    let ids: Vec<String> = got
                        .into_iter()
                        .flat_map(|r| r.keys)
                        .flat_map(|k| k.ids)
                        .map(|e| e.id)
                        .collect();
                    leases += 1;
                    empty += u64::from(ids.is_empty());
                    if batch_ack && !ids.is_empty() {
                        redis::cmd("XACK")
                            .arg(k)
                            .arg("workers")
                            .arg(&ids)
                            .query_async::<i64>(&mut c)
                            .await?;
                    }
                    for id in ids.iter().filter(|_| !batch_ack) {
                        redis::cmd("XACK")
                            .arg(k)
                            .arg("workers")
                            .arg(id)
                            .query_async::<i64>(&mut c)
                            .await?;
                    }
                    left.fetch_sub(ids.len() as i64, Ordering::Relaxed);
                }
                Ok::<_, redis::RedisError>((leases, empty))
            })
        })
        .collect();
    let mut run = QueueRun::default();
    for t in tasks {
        let (leases, empty) = t.await.map_err(|e| e.to_string())?.map_err(e)?;
        run.leases += leases;
        run.empty_leases += empty;
    }
    run.took = started.elapsed();
    for k in keys.iter() {
        redis::cmd("UNLINK")
            .arg(k)
            .query_async::<i64>(&mut c)
            .await
            .map_err(e)?;
    }
    Ok(run)
}

/// The raw PostgreSQL queue, the design of pgmq and River: a table of one
/// row per message (`id bigint` primary key, `vt bigint` the visibility
/// deadline in ms since the epoch, `read_ct int`, `msg bytea`), filled
/// with `n` rows by one `INSERT ... SELECT generate_series` and analysed;
/// then `consumers` tasks, each on a connection of its own, lease with
///
/// ```sql
/// UPDATE q SET vt = $1, read_ct = read_ct + 1 WHERE id IN
///   (SELECT id FROM q WHERE vt <= $2 ORDER BY id LIMIT 100 FOR UPDATE SKIP LOCKED)
/// RETURNING id, msg
/// ```
///
/// (`$1` now + 30 s, `$2` now) and delete each leased row with its own
/// `DELETE FROM q WHERE id = $1` (each awaited), or, `batch_ack`, a
/// lease's rows with one `DELETE FROM q WHERE id = ANY($1)`. A consumer
/// whose lease came back empty (the others hold the last rows) waits 1
/// ms before the next, as a polling worker does, rather than take the
/// server's cores from the others' deletes. Every
/// connection has `synchronous_commit` off (Conveyor's durability
/// `none`). Only the draining is timed; the table is dropped after.
/// `url` is a connection URL ([`postgres_connection`]); the table is
/// `q` in `schema`, which must exist.
///
/// # Errors
/// The server's error, as text; a consumer that leased nothing for 10 s
/// while messages were left.
///
/// # Cancel safety
/// Not cancel safe: the table stays, and spawned consumers run on.
#[cfg(feature = "postgres")]
pub async fn postgres_queue(
    url: &str,
    schema: &str,
    n: u64,
    consumers: usize,
    batch_ack: bool,
    value: &[u8],
) -> Result<QueueRun, String> {
    use sqlx::{Executor, Row};
    use std::sync::atomic::{AtomicI64, Ordering};
    use std::sync::Arc;
    const LEASE: &str = "UPDATE q SET vt = $1, read_ct = read_ct + 1 WHERE id IN \
         (SELECT id FROM q WHERE vt <= $2 ORDER BY id LIMIT 100 FOR UPDATE SKIP LOCKED) \
         RETURNING id, msg";
    let e = |e: sqlx::Error| format!("raw postgres queue: {e}");
    let mut setup = postgres_connect(url, schema, false).await?;
    setup
        .execute(
            "DROP TABLE IF EXISTS q; CREATE TABLE q (id bigint PRIMARY KEY, \
             vt bigint NOT NULL, read_ct int NOT NULL, msg bytea NOT NULL)",
        )
        .await
        .map_err(e)?;
    sqlx::query("INSERT INTO q SELECT g, 0, 0, $1 FROM generate_series(1, $2) g")
        .bind(value)
        .bind(n as i64)
        .execute(&mut setup)
        .await
        .map_err(e)?;
    setup.execute("ANALYZE q").await.map_err(e)?;
    let mut conns = Vec::with_capacity(consumers);
    for _ in 0..consumers {
        conns.push(postgres_connect(url, schema, false).await?);
    }
    let now_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64)
    };
    let left = Arc::new(AtomicI64::new(n as i64));
    let started = Instant::now();
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|mut conn| {
            let left = left.clone();
            tokio::spawn(async move {
                let (mut leases, mut empty, mut idle) = (0u64, 0u64, Instant::now());
                while left.load(Ordering::Relaxed) > 0 {
                    let now = now_ms();
                    let rows = sqlx::query(LEASE)
                        .bind(now + 30_000)
                        .bind(now)
                        .fetch_all(&mut conn)
                        .await
                        .map_err(e)?;
                    leases += 1;
                    if rows.is_empty() {
                        empty += 1;
                        if idle.elapsed() > Duration::from_secs(10) {
                            return Err("raw postgres queue: nothing leased for 10 s".to_string());
                        }
                        // The others hold the last rows: wait a little
                        // rather than take the server's cores from them.
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        continue;
                    }
                    idle = Instant::now();
                    let ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
                    let bytes: usize = rows.iter().map(|r| r.get::<&[u8], _>(1).len()).sum();
                    std::hint::black_box(bytes);
                    if batch_ack {
                        sqlx::query("DELETE FROM q WHERE id = ANY($1)")
                            .bind(&ids)
                            .execute(&mut conn)
                            .await
                            .map_err(e)?;
                    } else {
                        for id in &ids {
                            sqlx::query("DELETE FROM q WHERE id = $1")
                                .bind(id)
                                .execute(&mut conn)
                                .await
                                .map_err(e)?;
                        }
                    }
                    left.fetch_sub(ids.len() as i64, Ordering::Relaxed);
                }
                Ok((leases, empty, conn))
            })
        })
        .collect();
    let mut done = Vec::with_capacity(tasks.len());
    for t in tasks {
        done.push(t.await.map_err(|e| e.to_string()).and_then(|r| r));
    }
    let mut run = QueueRun {
        took: started.elapsed(),
        ..QueueRun::default()
    };
    for d in done {
        let (leases, empty, conn) = d?;
        run.leases += leases;
        run.empty_leases += empty;
        sqlx::Connection::close(conn).await.map_err(e)?;
    }
    setup.execute("DROP TABLE q").await.map_err(e)?;
    sqlx::Connection::close(setup).await.map_err(e)?;
    Ok(run)
}
