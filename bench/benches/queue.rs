//! Queue mode (contract §4b): leasing and acknowledging, through the
//! public API, on one backend with the memory backend beside it.
//!
//! `CONVEYOR_BENCH_URL` picks the backend (default `mmap://{tmp}`; a
//! `{tmp}` in it is replaced by a fresh temporary directory). Every run
//! also measures `memory://` under the same names, so each figure has its
//! in-memory baseline (the engine's own cost, no storage). Values are 100
//! bytes, the topic has 4 partitions, the group's visibility timeout is
//! long enough that no lease expires during a run.
//!
//! Groups (the backend is the first part of each id: `mmap`, `memory`, …):
//! - `queue_ack/{backend}/single`: 4 consumers, each polls up to 100 and
//!   acks them one by one, each ack awaited before the next;
//! - `queue_ack/{backend}/batch_100`: the same with one `ack_batch` per
//!   poll of 100;
//! - `queue_ack/{backend}/concurrent`: each consumer's acks of a poll of
//!   100 all in flight at once (what a `Runner` with concurrency 100
//!   does): with `durability=always` this is where acks share syncs;
//! - `queue_ack/{backend}/single_1p`, `batch_100_1p`: `single` and
//!   `batch_100` on a topic of one partition (the 4 consumers share it);
//! - `queue_in_flight/{backend}/{n}`: 4 consumers holding `n` leases in
//!   all (n/4 each), each acking its 10 oldest one by one and polling 10
//!   more: the cost of an ack against the number of messages in flight.
//! - `queue_ack/raw_redis_xreadgroup/single` (only with a `redis://` or
//!   `redis+cluster://` URL, feature `redis`): the raw Redis baseline of
//!   `single`, through the `redis` crate: 4 streams (one per partition,
//!   each its own slot), one Redis consumer group, 4 consumers (tasks
//!   sharing one multiplexed connection, as a broker's consumers do), each
//!   taking turns over the streams with `XREADGROUP ... COUNT 100 ... >`
//!   and acking the entries one by one with `XACK`, each awaited;
//!   `raw_redis_xreadgroup/batch_100` acks each read's entries with one
//!   `XACK`; `single_1p` and `batch_100_1p` are the same on one stream.
//!
//! A Redis URL gets a namespace of its own per fixture
//! (`namespace=NAME` becomes `NAME_<pid>_<n>`), deleted at the end.
//!
//! ```text
//! cargo bench -p conveyor-bench --bench queue
//! CONVEYOR_BENCH_URL='mmap://{tmp}?durability=always' cargo bench -p conveyor-bench --bench queue -- 'queue_ack/mmap/(single|concurrent)'
//! CONVEYOR_BENCH_URL='redis://127.0.0.1:6379/?namespace=bench' cargo bench -p conveyor-bench --features redis --bench queue -- queue_ack
//! ```

// A benchmark: a failed unwrap aborts the run, which is what we want.
#![allow(clippy::unwrap_used)]

use conveyor::prelude::*;
use conveyor::{Broker, GroupConfig, Message, Record, TopicConfig};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

use conveyor_bench::fixture::{self, Fixture};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const VALUE: usize = 100;
const PARTITIONS: u32 = 4;
const CONSUMERS: usize = 4;
const POLL: usize = 100;

/// The backend under test: `CONVEYOR_BENCH_URL`, default `mmap://{tmp}`.
fn bench_url() -> String {
    std::env::var("CONVEYOR_BENCH_URL").unwrap_or_else(|_| "mmap://{tmp}".into())
}

/// A 2-worker multi-thread runtime (the machine has 2 cores).
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// The backend under test and the memory backend, each freshly opened,
/// with their names.
fn backends(rt: &tokio::runtime::Runtime) -> Vec<(&'static str, Fixture)> {
    let mut urls = vec![bench_url()];
    if !urls[0].starts_with("memory:") {
        urls.push("memory://".into());
    }
    urls.iter()
        .map(|url| {
            let f = rt
                .block_on(Fixture::open(url))
                .unwrap_or_else(|e| panic!("{e}"));
            (fixture::name_of(url), f)
        })
        .collect()
}

/// No lease expires and no member is dropped for silence during a run: in
/// `queue_in_flight` a consumer that took its leases waits, calling
/// nothing, while the others take theirs (seconds for 100,000 in a debug
/// build on a busy host; past the default 10 s session timeout, the member
/// is removed and its next ack is `Fenced`, as the contract says).
fn group_config() -> GroupConfig {
    GroupConfig::queue()
        .with_visibility_timeout(Duration::from_secs(3600))
        .with_session_timeout(Duration::from_secs(600))
}

/// Append `n` records of 100 bytes, spread over the partitions.
async fn fill(broker: &dyn Broker, topic: &str, n: u64) {
    let producer = broker.producer().await.unwrap();
    let value = bytes::Bytes::from(vec![7u8; VALUE]);
    let mut left = n;
    while left > 0 {
        let batch = left.min(1000);
        let records = (0..batch).map(|_| Record::new(value.clone())).collect();
        producer.send_batch(topic, records).await.unwrap();
        left -= batch;
    }
}

#[derive(Clone, Copy)]
enum Ack {
    Single,
    Batch,
    Concurrent,
}

/// 4 consumers drain `n` messages (already in the topic), each polling up
/// to 100 at a time and acking as `how` says.
async fn drain(broker: &Arc<dyn Broker>, topic: &str, group: &str, n: u64, how: Ack) {
    let left = Arc::new(AtomicI64::new(n as i64));
    let mut tasks = Vec::new();
    for _ in 0..CONSUMERS {
        let consumer = broker
            .consumer(group, &[topic], group_config())
            .await
            .unwrap();
        let left = left.clone();
        tasks.push(tokio::spawn(async move {
            while left.load(Ordering::Relaxed) > 0 {
                let got = consumer.poll(POLL, Duration::from_millis(5)).await.unwrap();
                match how {
                    Ack::Single => {
                        for m in &got {
                            consumer.ack(m).await.unwrap();
                        }
                    }
                    Ack::Batch => {
                        let outcome = consumer.ack_batch(&got).await.unwrap();
                        assert!(outcome.is_complete());
                    }
                    Ack::Concurrent => {
                        let acks = got.iter().map(|m| consumer.ack(m));
                        for r in futures::future::join_all(acks).await {
                            r.unwrap();
                        }
                    }
                }
                left.fetch_sub(got.len() as i64, Ordering::Relaxed);
            }
            consumer.close().await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

fn queue_ack(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("queue_ack");
    group.sample_size(10);
    group.throughput(Throughput::Elements(1));
    for (backend, f) in backends(&rt) {
        let mut round = 0u64;
        for (name, how, partitions) in [
            ("single", Ack::Single, PARTITIONS),
            ("batch_100", Ack::Batch, PARTITIONS),
            ("concurrent", Ack::Concurrent, PARTITIONS),
            ("single_1p", Ack::Single, 1),
            ("batch_100_1p", Ack::Batch, 1),
        ] {
            group.bench_function(BenchmarkId::new(backend, name), |b| {
                b.iter_custom(|iters| {
                    round += 1;
                    let topic = format!("q.{name}.{round}");
                    rt.block_on(async {
                        f.broker
                            .create_topic(&topic, TopicConfig::new(partitions))
                            .await
                            .unwrap();
                        fill(f.broker.as_ref(), &topic, iters).await;
                        let started = Instant::now();
                        drain(&f.broker, &topic, "workers", iters, how).await;
                        let took = started.elapsed();
                        f.broker.delete_topic(&topic).await.unwrap();
                        took
                    })
                })
            });
        }
    }
    #[cfg(feature = "redis")]
    raw_redis(&rt, &mut group);
    group.finish();
}

/// The raw Redis baselines of `single`, `batch_100`, `single_1p` and
/// `batch_100_1p` (see the module docs).
#[cfg(feature = "redis")]
fn raw_redis(
    rt: &tokio::runtime::Runtime,
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
) {
    use conveyor::redis::redis;
    if fixture::name_of(&bench_url()) != "redis" {
        return;
    }
    // Keys of its own; each sample deletes its streams.
    let ns = fixture::unique("rawq");
    let url = conveyor::BrokerUrl::parse(&bench_url()).unwrap();
    let (topology, _) = conveyor::redis::parse(&url).unwrap();
    let cases = [
        ("single", false, PARTITIONS),
        ("batch_100", true, PARTITIONS),
        ("single_1p", false, 1),
        ("batch_100_1p", true, 1),
    ];
    if topology.is_cluster() {
        let client = redis::cluster::ClusterClient::new(topology.seeds().to_vec()).unwrap();
        let c = rt.block_on(client.get_async_connection()).unwrap();
        for (name, batch, partitions) in cases {
            let id = BenchmarkId::new("raw_redis_xreadgroup", name);
            let ns = format!("{ns}.{name}");
            group.bench_function(id, |b| raw_redis_iter(rt, b, &ns, &c, partitions, batch));
        }
    } else {
        let client = redis::Client::open(topology.seeds()[0].as_str()).unwrap();
        let c = rt
            .block_on(client.get_multiplexed_async_connection())
            .unwrap();
        for (name, batch, partitions) in cases {
            let id = BenchmarkId::new("raw_redis_xreadgroup", name);
            let ns = format!("{ns}.{name}");
            group.bench_function(id, |b| raw_redis_iter(rt, b, &ns, &c, partitions, batch));
        }
    }
}

/// One sample of the raw baseline: fill `partitions` streams with
/// `iters` entries in all, then time 4 consumers draining them with
/// `XREADGROUP` and one `XACK` per entry (`batch` false) or one `XACK` of
/// all the entries a read returned (`batch` true).
#[cfg(feature = "redis")]
fn raw_redis_iter<C>(
    rt: &tokio::runtime::Runtime,
    b: &mut criterion::Bencher<'_>,
    ns: &str,
    c: &C,
    partitions: u32,
    batch: bool,
) where
    C: conveyor::redis::redis::aio::ConnectionLike + Clone + Send + Sync + 'static,
{
    let mut round = 0u64;
    b.iter_custom(|iters| {
        round += 1;
        // A hash tag per stream: each is a slot of its own on a cluster.
        let keys: Vec<String> = (0..partitions)
            .map(|p| format!("{{{ns}/rawq.{round}.{p}}}:s"))
            .collect();
        let value = vec![7u8; VALUE];
        rt.block_on(conveyor_bench::raw_queue::redis_queue(
            c, &keys, iters, CONSUMERS, batch, &value,
        ))
        .expect("the raw Redis queue")
        .took
    });
}

/// A consumer of the in-flight run and the leases it holds.
type Holder = (
    Arc<dyn Consumer>,
    Arc<tokio::sync::Mutex<VecDeque<Message>>>,
);

/// Lease until `consumer` holds `hold` messages.
async fn take_leases(consumer: &Arc<dyn Consumer>, held: &mut VecDeque<Message>, hold: usize) {
    while held.len() < hold {
        let got = consumer
            .poll(hold - held.len(), Duration::from_millis(50))
            .await
            .unwrap();
        held.extend(got);
    }
}

/// One consumer's share of the in-flight run: keep holding its leases,
/// ack the 10 oldest one by one, poll 10 more, until `left` runs out.
async fn hold_and_ack(holder: Holder, hold: usize, left: Arc<AtomicI64>) {
    let (consumer, held) = holder;
    let mut held = held.lock().await;
    let step = hold.min(10);
    while left.load(Ordering::Relaxed) > 0 {
        for _ in 0..step {
            if let Some(m) = held.pop_front() {
                consumer.ack(&m).await.unwrap();
            }
        }
        left.fetch_sub(step as i64, Ordering::Relaxed);
        take_leases(&consumer, &mut held, hold).await;
    }
}

fn queue_in_flight(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("queue_in_flight");
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(3));
    group.throughput(Throughput::Elements(1));
    for (backend, f) in backends(&rt) {
        for in_flight in [10u64, 100, 1_000, 10_000, 100_000] {
            let topic = format!("inflight.{in_flight}");
            let hold = (in_flight as usize / CONSUMERS).max(1);
            // The held leases, taken when the case first runs (not at all
            // when a filter leaves it out); each sample appends what it acks.
            let setup = || {
                rt.block_on(async {
                    f.broker
                        .create_topic(&topic, TopicConfig::new(PARTITIONS))
                        .await
                        .unwrap();
                    fill(f.broker.as_ref(), &topic, in_flight).await;
                    let mut consumers: Vec<Holder> = Vec::new();
                    for _ in 0..CONSUMERS {
                        let consumer = f
                            .broker
                            .consumer("holders", &[&topic], group_config())
                            .await
                            .unwrap();
                        let mut held = VecDeque::new();
                        take_leases(&consumer, &mut held, hold).await;
                        consumers.push((consumer, Arc::new(tokio::sync::Mutex::new(held))));
                    }
                    consumers
                })
            };
            let mut taken: Option<Vec<Holder>> = None;
            group.bench_function(BenchmarkId::new(backend, in_flight), |b| {
                let consumers = taken.get_or_insert_with(&setup).clone();
                b.iter_custom(|iters| {
                    rt.block_on(async {
                        // What this sample acks, appended before the clock starts.
                        fill(f.broker.as_ref(), &topic, iters + 10 * CONSUMERS as u64).await;
                        let left = Arc::new(AtomicI64::new(iters as i64));
                        let started = Instant::now();
                        let tasks: Vec<_> = consumers
                            .iter()
                            .map(|c| tokio::spawn(hold_and_ack(c.clone(), hold, left.clone())))
                            .collect();
                        for t in tasks {
                            t.await.unwrap();
                        }
                        started.elapsed()
                    })
                })
            });
            let Some(consumers) = taken else {
                continue;
            };
            rt.block_on(async {
                for (c, _) in consumers {
                    c.close().await.unwrap();
                }
                f.broker.delete_topic(&topic).await.unwrap();
            });
        }
    }
    group.finish();
}

criterion_group!(benches, queue_ack, queue_in_flight);
criterion_main!(benches);
