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
//! The read workloads' raw side is [`Raw::read`] and [`Raw::read_deep`],
//! the queue workloads' [`Raw::queue`] (the servers only, with
//! [`crate::raw_queue`]), the latency workload's `crate::raw_latency`.
//! `memory` has none: it is no engine.
//! The mmap and RocksDB baselines block: they run on the calling thread,
//! which is the bench's own, never an async worker.

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
        /// The stream's key (deleted by [`Raw::close`], as are the
        /// `<key>.deep` stream of [`Raw::read_deep`] and the queue's).
        key: String,
        /// Entries in the `<key>.deep` stream.
        deep: u64,
    },
    /// One PostgreSQL table in a schema of its own.
    #[cfg(feature = "postgres")]
    Postgres {
        /// One connection.
        conn: sqlx::PgConnection,
        /// The connection URL, for the queue's consumers' connections.
        url: String,
        /// The schema (dropped by [`Raw::close`]).
        schema: String,
        /// The next offset.
        next: i64,
        /// Rows in the `deep` table of [`Raw::read_deep`].
        deep: u64,
    },
}

/// The Redis server of a broker URL (`redis://...`); `None` for a cluster.
///
/// # Errors
/// The URL does not parse, as text.
#[cfg(feature = "redis")]
pub fn redis_server(url: &str) -> Result<Option<String>, String> {
    let parsed = conveyor::BrokerUrl::parse(url).map_err(|e| e.to_string())?;
    let (topology, _) = conveyor::redis::parse(&parsed).map_err(|e| e.to_string())?;
    Ok((!topology.is_cluster()).then(|| topology.seeds()[0].clone()))
}

/// The connection URL of a PostgreSQL broker URL (Conveyor's options
/// taken out).
///
/// # Errors
/// The URL does not parse, as text.
#[cfg(feature = "postgres")]
pub fn postgres_connection(url: &str) -> Result<String, String> {
    let parsed = conveyor::BrokerUrl::parse(url).map_err(|e| e.to_string())?;
    let (conn_url, _) = conveyor::postgres::parse_url(&parsed).map_err(|e| e.to_string())?;
    Ok(conn_url)
}

/// A connection to `url` working in `schema`, with `synchronous_commit`
/// on when `always`, else off (Conveyor's durability `none`).
///
/// # Errors
/// Connecting failed, as text.
///
/// # Cancel safety
/// Cancel safe: dropped, the connection is dropped.
#[cfg(feature = "postgres")]
pub async fn postgres_connect(
    url: &str,
    schema: &str,
    always: bool,
) -> Result<sqlx::PgConnection, String> {
    use sqlx::{Connection, Executor};
    let mut conn = sqlx::PgConnection::connect(url)
        .await
        .map_err(|e| format!("raw postgres: {e}"))?;
    let sync = if always { "on" } else { "off" };
    conn.execute(
        format!("SET search_path TO \"{schema}\"; SET synchronous_commit TO {sync}").as_str(),
    )
    .await
    .map_err(|e| format!("raw postgres: {e}"))?;
    Ok(conn)
}

/// Append `n` entries of `value` to the stream `key`, pipelined 1,000 a
/// round trip; with ids `0-<first>`, `0-<first + 1>`, ... when `first` is
/// given (so a reader can start at a known position), else `*`.
#[cfg(feature = "redis")]
pub(crate) async fn redis_fill<C>(
    conn: &mut C,
    key: &str,
    first: Option<u64>,
    n: u64,
    value: &[u8],
) -> Result<(), String>
where
    C: conveyor::redis::redis::aio::ConnectionLike,
{
    use conveyor::redis::redis;
    let mut at = 0;
    while at < n {
        let batch = (n - at).min(1000);
        let mut pipe = redis::pipe();
        for i in at..at + batch {
            let id = first.map_or_else(|| "*".to_string(), |f| format!("0-{}", f + i));
            pipe.cmd("XADD")
                .arg(key)
                .arg(id)
                .arg("v")
                .arg(value)
                .ignore();
        }
        pipe.query_async::<()>(conn)
            .await
            .map_err(|e| e.to_string())?;
        at += batch;
    }
    Ok(())
}

/// One `XRANGE key <from> + COUNT 1000`: the entries it returned and the
/// last one's id.
#[cfg(feature = "redis")]
async fn redis_range(
    conn: &mut conveyor::redis::redis::aio::MultiplexedConnection,
    key: &str,
    from: &str,
) -> Result<(u64, Option<String>), String> {
    use conveyor::redis::redis::{self, streams::StreamRangeReply};
    let got: StreamRangeReply = redis::cmd("XRANGE")
        .arg(key)
        .arg(from)
        .arg("+")
        .arg("COUNT")
        .arg(1000)
        .query_async(conn)
        .await
        .map_err(|e| e.to_string())?;
    Ok((got.ids.len() as u64, got.ids.last().map(|e| e.id.clone())))
}

/// One `SELECT off, v FROM <table> WHERE off >= $1 ORDER BY off LIMIT
/// 1000`: the rows it returned and the last one's offset.
#[cfg(feature = "postgres")]
async fn postgres_range(
    conn: &mut sqlx::PgConnection,
    table: &str,
    at: i64,
) -> Result<(u64, Option<i64>), String> {
    use sqlx::Row;
    let rows = sqlx::query(&format!(
        "SELECT off, v FROM {table} WHERE off >= $1 ORDER BY off LIMIT 1000"
    ))
    .bind(at)
    .fetch_all(&mut *conn)
    .await
    .map_err(|e| e.to_string())?;
    Ok((rows.len() as u64, rows.last().map(|r| r.get(0))))
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
    use conveyor::redis::redis;
    let key = format!("{key}.read");
    redis_fill(conn, &key, None, n, value).await?;
    let started = Instant::now();
    let (mut from, mut read) = ("-".to_string(), 0);
    while read < n {
        let (got, last) = redis_range(conn, &key, &from).await?;
        let last = last.ok_or("raw redis: fewer entries than written")?;
        from = format!("({last}");
        read += got;
    }
    let took = started.elapsed();
    redis::cmd("UNLINK")
        .arg(&key)
        .query_async::<i64>(conn)
        .await
        .map_err(|e| e.to_string())?;
    Ok(took)
}

/// What each backend's raw baseline is called in the report, for the
/// workload named `workload` (`produce/...`, `read/...`, `queue/...`,
/// `latency/...`); `None` where it has none (the comparison then runs
/// none).
pub fn label(backend: &str, workload: &str) -> Option<&'static str> {
    if workload.starts_with("queue/") {
        return match (backend, workload.contains("batch_ack")) {
            ("redis", false) => Some("XREADGROUP + XACK each"),
            ("redis", true) => Some("XREADGROUP + one XACK per read"),
            ("postgres", false) => Some("UPDATE … SKIP LOCKED + DELETE each"),
            ("postgres", true) => Some("UPDATE … SKIP LOCKED + one DELETE per lease"),
            _ => None,
        };
    }
    if workload.starts_with("latency/") {
        return match backend {
            "redis" => Some("XADD + XREAD BLOCK"),
            "postgres" => Some("INSERT + NOTIFY, LISTEN + SELECT"),
            _ => None,
        };
    }
    if workload == "read/deep" {
        return match backend {
            "redis" => Some("XRANGE from entry 900,001"),
            "postgres" => Some("SELECT from offset 900,000"),
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
                let Some(server) = redis_server(url)? else {
                    return Ok(None);
                };
                let client =
                    redis::Client::open(server.as_str()).map_err(|e| format!("raw redis: {e}"))?;
                let conn = client
                    .get_multiplexed_async_connection()
                    .await
                    .map_err(|e| format!("raw redis: {e}"))?;
                Ok(Some(Raw::Redis {
                    conn,
                    key: format!("{{{}}}:raw", crate::fixture::unique("bench.raw")),
                    deep: 0,
                }))
            }
            #[cfg(feature = "postgres")]
            "postgres" => {
                use sqlx::Executor;
                let conn_url = postgres_connection(url)?;
                let schema = crate::fixture::unique("bench_raw");
                let mut conn = postgres_connect(&conn_url, &schema, always).await?;
                conn.execute(
                    format!(
                        "CREATE SCHEMA \"{schema}\"; \
                         CREATE TABLE raw (off bigint PRIMARY KEY, v bytea NOT NULL)"
                    )
                    .as_str(),
                )
                .await
                .map_err(|e| format!("raw postgres: {e}"))?;
                Ok(Some(Raw::Postgres {
                    conn,
                    url: conn_url,
                    schema,
                    next: 0,
                    deep: 0,
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
            Raw::Redis { conn, key, .. } => {
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
        if let Raw::Redis { conn, key, .. } = self {
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
                let started = Instant::now();
                let mut at = start as i64;
                let end = (start + n) as i64;
                while at < end {
                    let (_, last) = postgres_range(conn, "raw", at).await?;
                    at = last.ok_or("raw postgres: fewer records than written")? + 1;
                }
                Ok(started.elapsed())
            }),
        }
    }

    /// The raw side of `read/deep`, the servers only: a table or stream
    /// of `topic_records` copies of `value` (written the first time, one
    /// `INSERT ... SELECT generate_series`, or pipelined `XADD`s with ids
    /// `0-1`, `0-2`, ...; untimed), then `n` of them read in order from
    /// the last tenth (offset 900,000 of 1,000,000), 1,000 a call as in
    /// [`Raw::read`], starting over there at the end; the time the
    /// reading took. `Ok(None)` for an engine without this baseline.
    ///
    /// # Errors
    /// The server's error, as text.
    pub fn read_deep(
        &mut self,
        rt: &tokio::runtime::Runtime,
        topic_records: u64,
        n: u64,
        value: &[u8],
    ) -> Result<Option<Duration>, String> {
        let from = topic_records - topic_records / 10;
        match self {
            #[cfg(feature = "redis")]
            Raw::Redis { conn, key, deep } => rt.block_on(async {
                let key = format!("{key}.deep");
                if *deep != topic_records {
                    conveyor::redis::redis::cmd("UNLINK")
                        .arg(&key)
                        .query_async::<i64>(&mut *conn)
                        .await
                        .map_err(|e| e.to_string())?;
                    redis_fill(conn, &key, Some(1), topic_records, value).await?;
                    *deep = topic_records;
                }
                let first = format!("0-{}", from + 1);
                let started = Instant::now();
                let (mut at, mut read) = (first.clone(), 0);
                while read < n {
                    let (got, last) = redis_range(conn, &key, &at).await?;
                    read += got;
                    at = match last {
                        Some(id) if id != format!("0-{topic_records}") => format!("({id}"),
                        _ => first.clone(),
                    };
                }
                Ok(Some(started.elapsed()))
            }),
            #[cfg(feature = "postgres")]
            Raw::Postgres { conn, deep, .. } => rt.block_on(async {
                use sqlx::Executor;
                if *deep != topic_records {
                    conn.execute(
                        "DROP TABLE IF EXISTS deep; \
                         CREATE TABLE deep (off bigint PRIMARY KEY, v bytea NOT NULL)",
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                    sqlx::query("INSERT INTO deep SELECT g, $1 FROM generate_series(0, $2 - 1) g")
                        .bind(value)
                        .bind(topic_records as i64)
                        .execute(&mut *conn)
                        .await
                        .map_err(|e| e.to_string())?;
                    conn.execute("ANALYZE deep")
                        .await
                        .map_err(|e| e.to_string())?;
                    *deep = topic_records;
                }
                let started = Instant::now();
                let (mut at, mut read) = (from as i64, 0);
                while read < n {
                    let (got, last) = postgres_range(conn, "deep", at).await?;
                    read += got;
                    at = match last {
                        Some(off) if off + 1 < topic_records as i64 => off + 1,
                        _ => from as i64,
                    };
                }
                Ok(Some(started.elapsed()))
            }),
            _ => {
                let _ = (rt, n, value, from);
                Ok(None)
            }
        }
    }

    /// The raw side of the queue workloads, the servers only: `n`
    /// messages leased by `consumers` consumers and acked one by one, or
    /// (`batch_ack`) one call per lease; Redis with [`redis_queue`](crate::raw_queue::redis_queue) over
    /// `partitions` streams, PostgreSQL with [`postgres_queue`](crate::raw_queue::postgres_queue) (one table,
    /// whatever the partitions). `Ok(None)` for an engine without a queue.
    ///
    /// # Errors
    /// The server's error, as text.
    pub fn queue(
        &mut self,
        rt: &tokio::runtime::Runtime,
        n: u64,
        partitions: u32,
        consumers: usize,
        batch_ack: bool,
        value: &[u8],
    ) -> Result<Option<crate::raw_queue::QueueRun>, String> {
        match self {
            #[cfg(feature = "redis")]
            Raw::Redis { conn, key, .. } => {
                let keys: Vec<String> = (0..partitions).map(|p| format!("{key}.q{p}")).collect();
                rt.block_on(crate::raw_queue::redis_queue(
                    conn, &keys, n, consumers, batch_ack, value,
                ))
                .map(Some)
            }
            #[cfg(feature = "postgres")]
            Raw::Postgres { url, schema, .. } => rt
                .block_on(crate::raw_queue::postgres_queue(
                    url, schema, n, consumers, batch_ack, value,
                ))
                .map(Some),
            _ => {
                let _ = (rt, n, partitions, consumers, batch_ack, value);
                Ok(None)
            }
        }
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
            Raw::Redis { mut conn, key, .. } => rt.block_on(async {
                conveyor::redis::redis::cmd("UNLINK")
                    .arg(&key)
                    .arg(format!("{key}.deep"))
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
