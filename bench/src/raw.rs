//! Each backend's raw engine: the same bytes written the plainest way the
//! engine offers, so every produce figure has its ratio to what the engine
//! itself can do.
//!
//! | backend | raw baseline of one batch |
//! |---|---|
//! | `mmap` | one `write` of the batch's values, concatenated, to a plain file; `fdatasync` after it under `always` |
//! | `rocksdb` | one `WriteBatch` of 16-byte keys and the values (LZ4, like the backend's record family); a synced write under `always` |
//! | `redis` | `XADD key * v <value>` per record, pipelined, one round trip per batch |
//! | `postgres` | one multi-row `INSERT` of (offset, value) rows; `synchronous_commit` off, or on under `always` |
//!
//! The read workload's raw side is [`Raw::read`]. `memory` has none: it is
//! no engine. The mmap and RocksDB baselines
//! block: they run on the calling thread, which is the bench's own, never
//! an async worker.

use std::time::{Duration, Instant};

/// A raw engine, open, with storage of its own.
pub enum Raw {
    /// A plain file.
    File {
        /// The file.
        file: std::fs::File,
        /// Its length.
        len: u64,
        /// `fdatasync` after each write.
        sync: bool,
        /// Keeps the directory until the engine is dropped.
        _dir: tempfile::TempDir,
    },
    /// A plain RocksDB database.
    #[cfg(feature = "rocksdb")]
    Rocks {
        /// The database.
        db: conveyor::rocksdb::rocksdb::DB,
        /// A synced write per batch.
        sync: bool,
        /// The next key.
        next: u64,
        /// Keeps the directory until the engine is dropped.
        _dir: tempfile::TempDir,
    },
    /// One Redis stream.
    #[cfg(feature = "redis")]
    Redis {
        /// A multiplexed connection.
        conn: conveyor::redis::redis::aio::MultiplexedConnection,
        /// The stream's key (deleted by [`Raw::close`]).
        key: String,
    },
    /// One PostgreSQL table in a schema of its own.
    #[cfg(feature = "postgres")]
    Postgres {
        /// One connection.
        conn: sqlx::PgConnection,
        /// The schema (dropped by [`Raw::close`]).
        schema: String,
        /// The next offset.
        next: i64,
    },
}

/// The raw Redis read (see [`Raw::read`]): a stream of its own, filled
/// with pipelined `XADD`s, read with `XRANGE`, deleted.
#[cfg(feature = "redis")]
async fn redis_read(
    conn: &mut conveyor::redis::redis::aio::MultiplexedConnection,
    key: &str,
    n: u64,
    value: &[u8],
) -> Result<Duration, String> {
    use conveyor::redis::redis::{self, streams::StreamRangeReply};
    let key = format!("{key}.read");
    let e = |e: redis::RedisError| e.to_string();
    let mut left = n;
    while left > 0 {
        let batch = left.min(1000);
        let mut pipe = redis::pipe();
        for _ in 0..batch {
            pipe.cmd("XADD")
                .arg(&key)
                .arg("*")
                .arg("v")
                .arg(value)
                .ignore();
        }
        pipe.query_async::<()>(conn).await.map_err(e)?;
        left -= batch;
    }
    let started = Instant::now();
    let (mut from, mut read) = ("-".to_string(), 0);
    while read < n {
        let got: StreamRangeReply = redis::cmd("XRANGE")
            .arg(&key)
            .arg(&from)
            .arg("+")
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await
            .map_err(e)?;
        let last = got
            .ids
            .last()
            .ok_or("raw redis: fewer entries than written")?;
        from = format!("({}", last.id);
        read += got.ids.len() as u64;
    }
    let took = started.elapsed();
    redis::cmd("UNLINK")
        .arg(&key)
        .query_async::<i64>(conn)
        .await
        .map_err(e)?;
    Ok(took)
}

/// The raw Redis queue, the way a well-built queue uses Redis: the
/// `keys` streams (one hash slot each, so it runs on a cluster too),
/// filled with `n` entries in all, one Redis consumer group, 4 consumers
/// (tasks sharing the connection) taking turns over the streams with
/// `XREADGROUP ... COUNT 100`, acking each entry with its own `XACK`
/// (each awaited), or each read's entries with one `XACK` when
/// `batch_ack`. Only the draining is timed; the streams are deleted after.
/// [`Raw::queue`] (the comparison) and the `queue` criterion bench both
/// use it.
///
/// # Errors
/// The server's error, as text.
#[cfg(feature = "redis")]
pub async fn redis_queue<C>(
    conn: &C,
    keys: &[String],
    n: u64,
    batch_ack: bool,
    value: &[u8],
) -> Result<Duration, String>
where
    C: conveyor::redis::redis::aio::ConnectionLike + Clone + Send + Sync + 'static,
{
    use conveyor::redis::redis::{self, streams::StreamReadReply};
    use std::sync::atomic::{AtomicI64, Ordering};
    use std::sync::Arc;
    const CONSUMERS: usize = 4;
    let e = |e: redis::RedisError| e.to_string();
    let mut c = conn.clone();
    let keys: Arc<Vec<String>> = Arc::new(keys.to_vec());
    let streams = keys.len() as u64;
    for (i, k) in keys.iter().enumerate() {
        // One pipeline per stream: on a cluster, a pipeline stays in one slot.
        let mut left = n / streams + u64::from((i as u64) < n % streams);
        while left > 0 {
            let batch = left.min(1000);
            let mut pipe = redis::pipe();
            for _ in 0..batch {
                pipe.cmd("XADD")
                    .arg(k)
                    .arg("*")
                    .arg("v")
                    .arg(value)
                    .ignore();
            }
            pipe.query_async::<()>(&mut c).await.map_err(e)?;
            left -= batch;
        }
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
    let tasks: Vec<_> = (0..CONSUMERS)
        .map(|i| {
            let (mut c, keys, left) = (conn.clone(), keys.clone(), left.clone());
            tokio::spawn(async move {
                let mut turn = i;
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
                Ok::<_, redis::RedisError>(())
            })
        })
        .collect();
    for t in tasks {
        t.await.map_err(|e| e.to_string())?.map_err(e)?;
    }
    let took = started.elapsed();
    for k in keys.iter() {
        redis::cmd("UNLINK")
            .arg(k)
            .query_async::<i64>(&mut c)
            .await
            .map_err(e)?;
    }
    Ok(took)
}

/// What each backend's raw baseline is called in the report, for the
/// workload named `workload` (`produce/...`, `read/...`, `queue/...`).
pub fn label(backend: &str, workload: &str) -> Option<&'static str> {
    if workload.starts_with("queue/") {
        return match (backend, workload.ends_with("batch_ack")) {
            ("redis", false) => Some("XREADGROUP + XACK each"),
            ("redis", true) => Some("XREADGROUP + one XACK per read"),
            _ => None,
        };
    }
    let read = workload.starts_with("read/");
    Some(match (backend, read) {
        ("mmap", false) => "write (+ fdatasync)",
        ("rocksdb", false) => "WriteBatch",
        ("redis", false) => "pipelined XADD",
        ("postgres", false) => "multi-row INSERT",
        ("mmap", true) => "pread",
        ("rocksdb", true) => "iterator",
        ("redis", true) => "XRANGE",
        ("postgres", true) => "SELECT",
        _ => return None,
    })
}

impl Raw {
    /// Open the raw engine of the backend `name` (whose URL, for the
    /// servers, is `url`), syncing every batch when `always`; `Ok(None)`
    /// for a backend without one (or not compiled in).
    ///
    /// # Errors
    /// Opening or connecting failed, as text.
    pub async fn open(name: &str, url: &str, always: bool) -> Result<Option<Raw>, String> {
        let _ = url;
        match name {
            "mmap" => {
                let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(dir.path().join("raw.log"))
                    .map_err(|e| format!("raw file: {e}"))?;
                Ok(Some(Raw::File {
                    file,
                    len: 0,
                    sync: always,
                    _dir: dir,
                }))
            }
            #[cfg(feature = "rocksdb")]
            "rocksdb" => {
                use conveyor::rocksdb::rocksdb::{DBCompressionType, Options, DB};
                let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
                let mut options = Options::default();
                options.create_if_missing(true);
                options.set_compression_type(DBCompressionType::Lz4);
                let db = DB::open(&options, dir.path()).map_err(|e| format!("raw rocksdb: {e}"))?;
                Ok(Some(Raw::Rocks {
                    db,
                    sync: always,
                    next: 0,
                    _dir: dir,
                }))
            }
            #[cfg(feature = "redis")]
            "redis" => {
                use conveyor::redis::redis;
                let parsed = conveyor::BrokerUrl::parse(url).map_err(|e| e.to_string())?;
                let (topology, _) = conveyor::redis::parse(&parsed).map_err(|e| e.to_string())?;
                if topology.is_cluster() {
                    return Ok(None);
                }
                let client = redis::Client::open(topology.seeds()[0].as_str())
                    .map_err(|e| format!("raw redis: {e}"))?;
                let conn = client
                    .get_multiplexed_async_connection()
                    .await
                    .map_err(|e| format!("raw redis: {e}"))?;
                Ok(Some(Raw::Redis {
                    conn,
                    key: format!("{{{}}}:raw", crate::fixture::unique("bench.raw")),
                }))
            }
            #[cfg(feature = "postgres")]
            "postgres" => {
                use sqlx::{Connection, Executor};
                let parsed = conveyor::BrokerUrl::parse(url).map_err(|e| e.to_string())?;
                let (conn_url, _) =
                    conveyor::postgres::parse_url(&parsed).map_err(|e| e.to_string())?;
                let mut conn = sqlx::PgConnection::connect(&conn_url)
                    .await
                    .map_err(|e| format!("raw postgres: {e}"))?;
                let schema = crate::fixture::unique("bench_raw");
                let sync = if always { "on" } else { "off" };
                conn.execute(
                    format!(
                        "CREATE SCHEMA \"{schema}\"; SET search_path TO \"{schema}\"; \
                         SET synchronous_commit TO {sync}; \
                         CREATE TABLE raw (off bigint PRIMARY KEY, v bytea NOT NULL)"
                    )
                    .as_str(),
                )
                .await
                .map_err(|e| format!("raw postgres: {e}"))?;
                Ok(Some(Raw::Postgres {
                    conn,
                    schema,
                    next: 0,
                }))
            }
            _ => Ok(None),
        }
    }

    /// Write `iters` batches of `batch` copies of `value`; the time taken.
    ///
    /// # Errors
    /// The engine's error, as text.
    pub fn produce(
        &mut self,
        rt: &tokio::runtime::Runtime,
        iters: u64,
        batch: usize,
        value: &[u8],
    ) -> Result<Duration, String> {
        let _ = rt;
        match self {
            Raw::File {
                file, len, sync, ..
            } => {
                use std::io::Write;
                let bytes = value.repeat(batch);
                let started = Instant::now();
                for _ in 0..iters {
                    file.write_all(&bytes).map_err(|e| e.to_string())?;
                    if *sync {
                        file.sync_data().map_err(|e| e.to_string())?;
                    }
                }
                let took = started.elapsed();
                *len += iters * bytes.len() as u64;
                Ok(took)
            }
            #[cfg(feature = "rocksdb")]
            Raw::Rocks { db, sync, next, .. } => {
                use conveyor::rocksdb::rocksdb::{WriteBatch, WriteOptions};
                let mut options = WriteOptions::default();
                options.set_sync(*sync);
                let started = Instant::now();
                for _ in 0..iters {
                    let mut wb = WriteBatch::default();
                    for _ in 0..batch {
                        let mut key = [0u8; 16];
                        key[8..].copy_from_slice(&next.to_be_bytes());
                        wb.put(key, value);
                        *next += 1;
                    }
                    db.write_opt(wb, &options).map_err(|e| e.to_string())?;
                }
                Ok(started.elapsed())
            }
            #[cfg(feature = "redis")]
            Raw::Redis { conn, key } => {
                use conveyor::redis::redis;
                let mut pipe = redis::pipe();
                for _ in 0..batch {
                    pipe.cmd("XADD")
                        .arg(&*key)
                        .arg("*")
                        .arg("v")
                        .arg(value)
                        .ignore();
                }
                rt.block_on(async {
                    let started = Instant::now();
                    for _ in 0..iters {
                        pipe.query_async::<()>(conn)
                            .await
                            .map_err(|e| e.to_string())?;
                    }
                    Ok(started.elapsed())
                })
            }
            #[cfg(feature = "postgres")]
            Raw::Postgres { conn, next, .. } => rt.block_on(async {
                let started = Instant::now();
                for _ in 0..iters {
                    let mut q =
                        sqlx::QueryBuilder::<sqlx::Postgres>::new("INSERT INTO raw (off, v) ");
                    q.push_values(0..batch, |mut row, _| {
                        row.push_bind(*next).push_bind(value);
                        *next += 1;
                    });
                    q.build()
                        .execute(&mut *conn)
                        .await
                        .map_err(|e| e.to_string())?;
                }
                Ok(started.elapsed())
            }),
        }
    }

    /// Write `n` copies of `value` (untimed, in batches of 1,000), then read
    /// them back in order, 1,000 a call; the time the reading took. The
    /// raw side of `read/from_start`:
    ///
    /// | backend | one read call |
    /// |---|---|
    /// | `mmap` | `pread` of 1,000 values' bytes |
    /// | `rocksdb` | 1,000 steps of an iterator from the first key written |
    /// | `redis` | `XRANGE key (<last id> + COUNT 1000` |
    /// | `postgres` | `SELECT off, v FROM raw WHERE off >= $1 ORDER BY off LIMIT 1000` |
    ///
    /// # Errors
    /// The engine's error, as text.
    pub fn read(
        &mut self,
        rt: &tokio::runtime::Runtime,
        n: u64,
        value: &[u8],
    ) -> Result<Duration, String> {
        const CHUNK: u64 = 1000;
        let start = match self {
            Raw::File { len, .. } => *len,
            #[cfg(feature = "rocksdb")]
            Raw::Rocks { next, .. } => *next,
            #[cfg(feature = "redis")]
            Raw::Redis { .. } => 0,
            #[cfg(feature = "postgres")]
            Raw::Postgres { next, .. } => *next as u64,
        };
        #[cfg(feature = "redis")]
        if let Raw::Redis { conn, key } = self {
            return rt.block_on(redis_read(conn, key, n, value));
        }
        let mut left = n;
        while left > 0 {
            let batch = left.min(CHUNK);
            self.produce(rt, 1, batch as usize, value)?;
            left -= batch;
        }
        match self {
            Raw::File { file, .. } => {
                use std::os::unix::fs::FileExt;
                let mut buf = vec![0u8; CHUNK as usize * value.len()];
                let started = Instant::now();
                let mut at = 0;
                while at < n {
                    let k = (n - at).min(CHUNK) as usize * value.len();
                    let offset = start + at * value.len() as u64;
                    file.read_exact_at(&mut buf[..k], offset)
                        .map_err(|e| e.to_string())?;
                    at += CHUNK;
                }
                Ok(started.elapsed())
            }
            #[cfg(feature = "rocksdb")]
            Raw::Rocks { db, .. } => {
                use conveyor::rocksdb::rocksdb::{Direction, IteratorMode};
                let mut from = [0u8; 16];
                from[8..].copy_from_slice(&start.to_be_bytes());
                let started = Instant::now();
                let mut it = db.iterator(IteratorMode::From(&from, Direction::Forward));
                let mut bytes = 0;
                for _ in 0..n {
                    let (_, v) = it
                        .next()
                        .ok_or("raw rocksdb: fewer records than written")?
                        .map_err(|e| e.to_string())?;
                    bytes += v.len();
                }
                std::hint::black_box(bytes);
                Ok(started.elapsed())
            }
            #[cfg(feature = "redis")]
            Raw::Redis { .. } => Err("raw redis: read above".into()),
            #[cfg(feature = "postgres")]
            Raw::Postgres { conn, .. } => rt.block_on(async {
                use sqlx::Row;
                let started = Instant::now();
                let mut at = start as i64;
                let end = (start + n) as i64;
                while at < end {
                    let rows = sqlx::query(
                        "SELECT off, v FROM raw WHERE off >= $1 ORDER BY off LIMIT 1000",
                    )
                    .bind(at)
                    .fetch_all(&mut *conn)
                    .await
                    .map_err(|e| e.to_string())?;
                    let last: i64 = rows
                        .last()
                        .ok_or("raw postgres: fewer records than written")?
                        .get(0);
                    at = last + 1;
                }
                Ok(started.elapsed())
            }),
        }
    }

    /// The raw side of the queue workloads, Redis only: `n` entries leased
    /// with `XREADGROUP` by 4 consumers over 4 streams and acked with
    /// `XACK`, one by one or (`batch_ack`) one call per read; the time the
    /// draining took. `Ok(None)` for an engine without a queue.
    ///
    /// # Errors
    /// The server's error, as text.
    pub fn queue(
        &mut self,
        rt: &tokio::runtime::Runtime,
        n: u64,
        batch_ack: bool,
        value: &[u8],
    ) -> Result<Option<Duration>, String> {
        #[cfg(feature = "redis")]
        if let Raw::Redis { conn, key } = self {
            let keys: Vec<String> = (0..4).map(|p| format!("{key}.q{p}")).collect();
            return rt
                .block_on(redis_queue(conn, &keys, n, batch_ack, value))
                .map(Some);
        }
        let _ = (rt, n, batch_ack, value);
        Ok(None)
    }

    /// Delete what the engine wrote (the servers' key or schema; the
    /// embedded ones' directories go when they are dropped).
    ///
    /// # Errors
    /// The server's error, as text.
    pub fn close(self, rt: &tokio::runtime::Runtime) -> Result<(), String> {
        let _ = rt;
        match self {
            #[cfg(feature = "redis")]
            Raw::Redis { mut conn, key } => rt.block_on(async {
                conveyor::redis::redis::cmd("UNLINK")
                    .arg(&key)
                    .query_async::<i64>(&mut conn)
                    .await
                    .map(drop)
                    .map_err(|e| e.to_string())
            }),
            #[cfg(feature = "postgres")]
            Raw::Postgres {
                mut conn, schema, ..
            } => rt.block_on(async {
                use sqlx::Executor;
                conn.execute(format!("DROP SCHEMA \"{schema}\" CASCADE").as_str())
                    .await
                    .map(drop)
                    .map_err(|e| e.to_string())
            }),
            _ => Ok(()),
        }
    }
}
