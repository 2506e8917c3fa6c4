//! Throughput and latency of a backend, through the public API.
//!
//! `CONVEYOR_BENCH_URL` picks the backend (default `mmap://{tmp}`, the
//! embedded default; a `{tmp}` in it is replaced by a fresh temporary
//! directory). Values are 100 bytes.
//!
//! ```text
//! cargo bench --bench throughput
//! CONVEYOR_BENCH_URL=memory:// cargo bench --bench throughput
//! CONVEYOR_BENCH_URL='mmap://{tmp}?durability=always' cargo bench --bench throughput
//! CONVEYOR_BENCH_URL='rocksdb://{tmp}' cargo bench --features rocksdb --bench throughput
//! ```
//!
//! With a `rocksdb://` URL the `append` group also measures a raw
//! baseline, `append/raw_rocksdb_batch/100`: the same 16-byte keys and
//! 100-byte values written with plain `WriteBatch`es of 100 through the
//! `rocksdb` crate (no sync, LZ4 like the backend's record family), so the
//! backend's overhead over RocksDB itself is one ratio.
//!
//! With a `redis://` or `redis+cluster://` URL (feature `redis`) each
//! fixture gets a namespace of its own (`namespace=NAME` becomes
//! `NAME.<pid>.<n>`), deleted when the bench is done with it, and the
//! `append` group also measures `append/raw_redis_xadd/100`: the same
//! 100-byte values appended to one stream with `XADD key * v <value>`,
//! pipelined 100 per round trip through the `redis` crate (a multiplexed
//! connection; on a cluster, the cluster connection to the key's master).
//!
//! ```text
//! CONVEYOR_BENCH_URL='redis://127.0.0.1:6379/?namespace=bench' cargo bench --features redis --bench throughput
//! CONVEYOR_BENCH_URL='redis+cluster://127.0.0.1:7000/?namespace=bench' cargo bench --features redis --bench throughput -- append
//! ```

// A benchmark: a failed unwrap aborts the run, which is what we want.
#![allow(clippy::unwrap_used)]

use conveyor::prelude::*;
use conveyor::{GroupConfig, Record, TopicConfig};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

mod common;
use common::{bench_url, open_url, runtime, Fixture};
use std::time::{Duration, Instant};

const VALUE: usize = 100;

fn open(rt: &tokio::runtime::Runtime) -> Fixture {
    open_url(rt, &bench_url())
}

fn append(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("append");
    for batch in [1usize, 100, 1000] {
        let f = open(&rt);
        let topic = format!("append.{batch}");
        rt.block_on(f.broker.create_topic(&topic, TopicConfig::new(1)))
            .unwrap();
        let producer = rt.block_on(f.broker.producer()).unwrap();
        let value = bytes::Bytes::from(vec![7u8; VALUE]);
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_with_input(BenchmarkId::new("batch", batch), &batch, |b, &batch| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let started = Instant::now();
                    for _ in 0..iters {
                        let records = (0..batch).map(|_| Record::new(value.clone())).collect();
                        producer.send_batch(&topic, records).await.unwrap();
                    }
                    started.elapsed()
                })
            })
        });
    }
    // The same batches of 100 sent from a spawned task (where most
    // applications send from), not from the runtime's `block_on` thread:
    // a backend that writes in place off the workers (RocksDB's unsynced
    // appends) must cross to another thread here (RocksDB: its writer
    // thread).
    {
        let f = open(&rt);
        let topic = "append.task.100".to_string();
        rt.block_on(f.broker.create_topic(&topic, TopicConfig::new(1)))
            .unwrap();
        let producer = rt.block_on(f.broker.producer()).unwrap();
        let value = bytes::Bytes::from(vec![7u8; VALUE]);
        group.throughput(Throughput::Elements(100));
        group.bench_function(BenchmarkId::new("batch_in_task", 100), |b| {
            b.iter_custom(|iters| {
                let (producer, topic, value) = (producer.clone(), topic.clone(), value.clone());
                rt.block_on(async move {
                    tokio::spawn(async move {
                        let started = Instant::now();
                        for _ in 0..iters {
                            let records = (0..100).map(|_| Record::new(value.clone())).collect();
                            producer.send_batch(&topic, records).await.unwrap();
                        }
                        started.elapsed()
                    })
                    .await
                    .unwrap()
                })
            })
        });
    }
    #[cfg(feature = "rocksdb")]
    raw_rocksdb(&mut group);
    #[cfg(feature = "redis")]
    raw_redis(&rt, &mut group);
    group.finish();
}

/// The raw RocksDB baseline (see the module docs), only for `rocksdb://`.
#[cfg(feature = "rocksdb")]
fn raw_rocksdb(group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>) {
    use conveyor::rocksdb::rocksdb::{DBCompressionType, Options, WriteBatch, DB};
    let url = std::env::var("CONVEYOR_BENCH_URL").unwrap_or_default();
    if !url.starts_with("rocksdb:") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mut options = Options::default();
    options.create_if_missing(true);
    options.set_compression_type(DBCompressionType::Lz4);
    let db = DB::open(&options, dir.path()).unwrap();
    let value = vec![7u8; VALUE];
    let mut offset = 0u64;
    let batch = 100u64;
    group.throughput(Throughput::Elements(batch));
    group.bench_function(BenchmarkId::new("raw_rocksdb_batch", batch), |b| {
        b.iter_custom(|iters| {
            let started = Instant::now();
            for _ in 0..iters {
                let mut wb = WriteBatch::default();
                for _ in 0..batch {
                    let mut key = [0u8; 16];
                    key[8..].copy_from_slice(&offset.to_be_bytes());
                    wb.put(key, &value);
                    offset += 1;
                }
                db.write(wb).unwrap();
            }
            started.elapsed()
        })
    });
}

/// The raw Redis baseline (see the module docs), only for `redis://` and
/// `redis+cluster://`.
#[cfg(feature = "redis")]
fn raw_redis(
    rt: &tokio::runtime::Runtime,
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
) {
    use conveyor::redis::redis;
    if !common::is_redis(&bench_url()) {
        return;
    }
    // A fixture for its namespace: the stream is deleted with it.
    let f = open(rt);
    let broker = f.redis.as_ref().expect("a Redis fixture");
    let key = format!("{{{}/raw}}:log", broker.namespace());
    let url = conveyor::BrokerUrl::parse(&f.url).unwrap();
    let (topology, _) = conveyor::redis::parse(&url).unwrap();
    let value = vec![7u8; VALUE];
    let batch = 100u64;
    let mut pipe = redis::pipe();
    for _ in 0..batch {
        pipe.cmd("XADD")
            .arg(&key)
            .arg("*")
            .arg("v")
            .arg(&value)
            .ignore();
    }
    group.throughput(Throughput::Elements(batch));
    let id = BenchmarkId::new("raw_redis_xadd", batch);
    if topology.is_cluster() {
        let client = redis::cluster::ClusterClient::new(topology.seeds().to_vec()).unwrap();
        let mut c = rt.block_on(client.get_async_connection()).unwrap();
        group.bench_function(id, |b| raw_redis_iter(rt, b, &pipe, &mut c));
    } else {
        let client = redis::Client::open(topology.seeds()[0].as_str()).unwrap();
        let mut c = rt
            .block_on(client.get_multiplexed_async_connection())
            .unwrap();
        group.bench_function(id, |b| raw_redis_iter(rt, b, &pipe, &mut c));
    }
}

/// Send `pipe` once per iteration, each awaited before the next.
#[cfg(feature = "redis")]
fn raw_redis_iter<C: conveyor::redis::redis::aio::ConnectionLike>(
    rt: &tokio::runtime::Runtime,
    b: &mut criterion::Bencher<'_>,
    pipe: &conveyor::redis::redis::Pipeline,
    c: &mut C,
) {
    b.iter_custom(|iters| {
        rt.block_on(async {
            let started = Instant::now();
            for _ in 0..iters {
                pipe.query_async::<()>(c).await.unwrap();
            }
            started.elapsed()
        })
    })
}

fn read(c: &mut Criterion) {
    let rt = runtime();
    let f = open(&rt);
    let records: u64 = std::env::var("CONVEYOR_BENCH_READ_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    rt.block_on(async {
        f.broker
            .create_topic("read", TopicConfig::new(1))
            .await
            .unwrap();
        let producer = f.broker.producer().await.unwrap();
        let value = bytes::Bytes::from(vec![7u8; VALUE]);
        let mut sent = 0;
        while sent < records {
            let n = (records - sent).min(1000);
            let batch = (0..n).map(|_| Record::new(value.clone())).collect();
            producer.send_batch("read", batch).await.unwrap();
            sent += n;
        }
        // Write the log back now: the measurement is of reading, not of the
        // kernel writing 100 MB of dirty pages back meanwhile.
        producer.flush().await.unwrap();
    });
    let mut group = c.benchmark_group("read");
    group.sample_size(10);
    group.throughput(Throughput::Elements(records));
    group.bench_function(BenchmarkId::new("from_start", records), |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let started = Instant::now();
                for _ in 0..iters {
                    let mut at = 0;
                    while at < records {
                        let batch = f.broker.fetch("read", 0, at, 10_000).await.unwrap();
                        at = batch.last().expect("records").offset + 1;
                    }
                }
                started.elapsed()
            })
        })
    });
    group.finish();
}

fn produce_to_consume(c: &mut Criterion) {
    let rt = runtime();
    let f = open(&rt);
    let (producer, consumer) = rt.block_on(async {
        f.broker
            .create_topic("latency", TopicConfig::new(1))
            .await
            .unwrap();
        let consumer = f
            .broker
            .consumer("latency", &["latency"], GroupConfig::stream())
            .await
            .unwrap();
        (f.broker.producer().await.unwrap(), consumer)
    });
    let value = bytes::Bytes::from(vec![7u8; VALUE]);
    let mut group = c.benchmark_group("latency");
    group.bench_function("produce_to_consume", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let started = Instant::now();
                    producer
                        .send("latency", Record::new(value.clone()))
                        .await
                        .unwrap();
                    let got = consumer.poll(1, Duration::from_secs(5)).await.unwrap();
                    total += started.elapsed();
                    consumer.ack(&got[0]).await.unwrap();
                }
                total
            })
        })
    });
    group.finish();
}

criterion_group!(benches, append, read, produce_to_consume);
criterion_main!(benches);
