//! The raw side of `latency/produce_to_consume`: the same open loop
//! ([`conveyor::bench::paced`]: `rate` records a second, each sent from a
//! task of its own when it is due, its value stamped with the time of the
//! send call) on each server used raw, each record timed from that call
//! to the moment the reader has it, in this process.
//!
//! | backend | writer, per record | reader |
//! |---|---|---|
//! | `redis` | `XADD key * v <value>` on a multiplexed connection | `XREAD BLOCK 10000 COUNT 1000 STREAMS key <last id>` on a connection of its own |
//! | `postgres` | one statement, so one transaction: `INSERT` of the row, then `pg_notify` (a pool of 4 connections, `synchronous_commit` off) | `LISTEN` (sqlx's `PgListener`); on each notification `SELECT id, v FROM lat WHERE id > <all seen up to>` on a connection of its own |
//!
//! Each works in a key or schema of its own and deletes it. The writers'
//! ids are given in send order (1, 2, ...), so the PostgreSQL reader sees
//! a row that commits after a later one: it reads from the highest id up
//! to which it has seen all.

use conveyor::bench::{paced, stamp_of, stamped, LatencySummary};
use std::time::{Duration, Instant};

/// The records a run of `rate` a second for `duration` sends.
fn total(rate: u32, duration: Duration) -> u64 {
    ((rate as f64 * duration.as_secs_f64()).ceil() as u64).max(1)
}

/// A raw error in the type [`paced`] passes on.
fn unavailable(e: impl std::fmt::Display) -> conveyor::Error {
    conveyor::Error::new(conveyor::ErrorKind::Unavailable, e.to_string())
}

/// Redis's raw latency: `XADD` at `rate` for `duration` to a stream of
/// its own on `server` (a `redis://` URL of a standalone server, see
/// [`crate::raw::redis_server`]), read by `XREAD BLOCK`.
///
/// # Errors
/// The server's error, as text; no entry for 10 s.
///
/// # Cancel safety
/// Not cancel safe: the stream stays.
#[cfg(feature = "redis")]
pub async fn redis(
    server: &str,
    rate: u32,
    duration: Duration,
    value_bytes: usize,
) -> Result<LatencySummary, String> {
    use conveyor::redis::redis;
    let e = |e: redis::RedisError| format!("raw redis latency: {e}");
    let client = redis::Client::open(server).map_err(e)?;
    let key = format!("{{{}}}:lat", crate::fixture::unique("bench.rawlat"));
    let writer = client.get_multiplexed_async_connection().await.map_err(e)?;
    let mut reader = client.get_multiplexed_async_connection().await.map_err(e)?;
    let total = total(rate, duration);
    let epoch = Instant::now();
    let read = {
        let key = key.clone();
        tokio::spawn(async move {
            let mut samples = Vec::with_capacity(total as usize);
            let mut last = "0-0".to_string();
            while (samples.len() as u64) < total {
                let got: Option<redis::streams::StreamReadReply> = redis::cmd("XREAD")
                    .arg("BLOCK")
                    .arg(10_000)
                    .arg("COUNT")
                    .arg(1000)
                    .arg("STREAMS")
                    .arg(&key)
                    .arg(&last)
                    .query_async(&mut reader)
                    .await
                    .map_err(e)?;
                let now = epoch.elapsed();
                let entries: Vec<_> = got
                    .into_iter()
                    .flat_map(|r| r.keys)
                    .flat_map(|k| k.ids)
                    .collect();
                if entries.is_empty() {
                    return Err(format!(
                        "raw redis latency: nothing for 10 s after {} of {total}",
                        samples.len()
                    ));
                }
                for entry in entries {
                    let v: Vec<u8> = entry.get("v").unwrap_or_default();
                    samples.push(now.saturating_sub(stamp_of(&v)));
                    last = entry.id;
                }
            }
            Ok(samples)
        })
    };
    let sent = {
        let (writer, key) = (writer.clone(), key.clone());
        paced(epoch, rate, total, move |sent| {
            let (mut w, key) = (writer.clone(), key.clone());
            async move {
                redis::cmd("XADD")
                    .arg(&key)
                    .arg("*")
                    .arg("v")
                    .arg(stamped(sent, value_bytes))
                    .query_async::<String>(&mut w)
                    .await
                    .map(drop)
                    .map_err(unavailable)
            }
        })
        .await
    };
    let samples = read.await.map_err(|e| e.to_string()).and_then(|r| r);
    redis::cmd("UNLINK")
        .arg(&key)
        .query_async::<i64>(&mut writer.clone())
        .await
        .map_err(e)?;
    sent.map_err(|e| e.to_string())?;
    Ok(LatencySummary::of(samples?))
}

/// PostgreSQL's raw latency: rows inserted and notified at `rate` for
/// `duration` into a table in a schema of its own on `url` (a connection
/// URL, see [`crate::raw::postgres_connection`]), read on `LISTEN`.
///
/// # Errors
/// The server's error, as text; no notification for 10 s.
///
/// # Cancel safety
/// Not cancel safe: the schema stays.
#[cfg(feature = "postgres")]
pub async fn postgres(
    url: &str,
    rate: u32,
    duration: Duration,
    value_bytes: usize,
) -> Result<LatencySummary, String> {
    use sqlx::Executor;
    let e = |e: sqlx::Error| format!("raw postgres latency: {e}");
    let schema = crate::fixture::unique("bench_rawlat");
    let mut setup = crate::raw::postgres_connect(url, &schema, false).await?;
    setup
        .execute(
            format!(
                "CREATE SCHEMA \"{schema}\"; \
                 CREATE TABLE lat (id bigint PRIMARY KEY, v bytea NOT NULL)"
            )
            .as_str(),
        )
        .await
        .map_err(e)?;
    let outcome = postgres_run(url, &schema, rate, duration, value_bytes).await;
    setup
        .execute(format!("DROP SCHEMA \"{schema}\" CASCADE").as_str())
        .await
        .map_err(e)?;
    sqlx::Connection::close(setup).await.map_err(e)?;
    outcome
}

/// [`postgres`] in `schema`, whose table exists.
#[cfg(feature = "postgres")]
async fn postgres_run(
    url: &str,
    schema: &str,
    rate: u32,
    duration: Duration,
    value_bytes: usize,
) -> Result<LatencySummary, String> {
    use sqlx::postgres::{PgListener, PgPoolOptions};
    use sqlx::{Executor, Row};
    use std::sync::atomic::{AtomicI64, Ordering};
    use std::sync::Arc;
    let e = |e: sqlx::Error| format!("raw postgres latency: {e}");
    let channel = schema.to_string();
    let mut listener = PgListener::connect(url).await.map_err(e)?;
    listener.listen(&channel).await.map_err(e)?;
    let mut select = crate::raw::postgres_connect(url, schema, false).await?;
    let search = format!("SET search_path TO \"{schema}\"; SET synchronous_commit TO off");
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .min_connections(4)
        .after_connect(move |conn, _| {
            let search = search.clone();
            Box::pin(async move { conn.execute(search.as_str()).await.map(drop) })
        })
        .connect(url)
        .await
        .map_err(e)?;
    let total = total(rate, duration);
    let epoch = Instant::now();
    let read = tokio::spawn(async move {
        let mut samples = Vec::with_capacity(total as usize);
        // seen[i]: row i + 1 read; all rows up to `upto` read.
        let (mut seen, mut upto) = (vec![false; total as usize], 0i64);
        while (samples.len() as u64) < total {
            match tokio::time::timeout(Duration::from_secs(10), listener.recv()).await {
                Ok(notified) => drop(notified.map_err(e)?),
                Err(_) => {
                    return Err(format!(
                        "raw postgres latency: no notification for 10 s after {} of {total}",
                        samples.len()
                    ))
                }
            }
            let rows = sqlx::query("SELECT id, v FROM lat WHERE id > $1 ORDER BY id")
                .bind(upto)
                .fetch_all(&mut select)
                .await
                .map_err(e)?;
            let now = epoch.elapsed();
            for row in &rows {
                let id: i64 = row.get(0);
                let Some(s) = seen.get_mut(id as usize - 1) else {
                    continue;
                };
                if !*s {
                    *s = true;
                    samples.push(now.saturating_sub(stamp_of(row.get::<&[u8], _>(1))));
                }
            }
            while seen.get(upto as usize).copied().unwrap_or(false) {
                upto += 1;
            }
        }
        sqlx::Connection::close(select).await.map_err(e)?;
        Ok(samples)
    });
    let next = Arc::new(AtomicI64::new(1));
    let notify = format!(
        "WITH r AS (INSERT INTO lat (id, v) VALUES ($1, $2) RETURNING id) \
         SELECT pg_notify('{channel}', '') FROM r"
    );
    let sent = {
        let pool = pool.clone();
        paced(epoch, rate, total, move |sent| {
            let (pool, notify) = (pool.clone(), notify.clone());
            let id = next.fetch_add(1, Ordering::Relaxed);
            async move {
                sqlx::query(&notify)
                    .bind(id)
                    .bind(stamped(sent, value_bytes))
                    .execute(&pool)
                    .await
                    .map(drop)
                    .map_err(unavailable)
            }
        })
        .await
    };
    let samples = read.await.map_err(|e| e.to_string()).and_then(|r| r);
    pool.close().await;
    sent.map_err(|e| e.to_string())?;
    Ok(LatencySummary::of(samples?))
}
