//! The benchmark workloads, by name: what `conveyor bench --url ...` runs
//! against one broker and what the backend comparison (the
//! `conveyor-bench` tool, `docs/benchmarks.md`) runs on every backend.
//! One catalogue, so a figure on a user's own server and a figure in the
//! comparison mean the same thing.
//!
//! | workload | what one iteration is |
//! |---|---|
//! | `produce/batch_1`, `produce/batch_100`, `produce/batch_1000` | one `send_batch` of that many 100-byte records to a topic of one partition, from a spawned task |
//! | `value_size/100B`, `value_size/1KiB`, `value_size/64KiB` | one `send_batch` of 100 records of that size |
//! | `producers/1`, `producers/2`, `producers/4` | each of that many producers (each its own task and [`Producer`](crate::Producer)) sends one batch of 100 to one topic of 4 partitions |
//! | `topics/1`, `topics/10`, `topics/1000` | one batch of 100 to the next of that many topics (one partition each), in turn |
//! | `read/from_start` | 1,000 records read by a new stream-mode group from the start of a topic of one partition holding what the run reads, polls of up to 1,000, each poll's batch committed |
//! | `read/deep` | the same, from a topic of 1,000,000 records ([`DEEP_TOPIC_RECORDS`], written once by `prepare`), each run's group seeking past offset 900,000 first (see [`Kind::Read`]) |
//! | `queue/single_ack` | 100 messages leased by 4 queue-mode consumers (polls of up to 100) from a topic of 4 partitions, and acked one by one, each ack awaited |
//! | `queue/batch_ack` | the same with one `ack_batch` per poll |
//! | `queue/single_ack_1p`, `queue/batch_ack_1p` | the same two on a topic of one partition (the 4 consumers share it) |
//! | `queue/single_ack_1p_1c` | `queue/single_ack_1p` with one consumer: what 4 consumers gain over one |
//! | `latency/produce_to_consume` | not iterated: records sent one by one at a fixed rate, each timed from its `send` call to the moment a stream-mode consumer's `poll` returns it ([`latency`]) |
//!
//! Durability is the broker's (its URL's `durability=`), not the
//! workload's. Records written before the clock starts (those that
//! `read/*` and `queue/*` consume) are not timed.
//!
//! ```
//! # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
//! # async fn main() -> conveyor::Result<()> {
//! use conveyor::bench;
//!
//! let broker = conveyor::open("memory://").await?;
//! let workload = bench::find("produce/batch_100").expect("in the catalogue");
//! let mut run = workload.prepare(&broker).await?;
//! let took = run.run(10).await?; // 10 batches of 100
//! run.cleanup().await?;
//! let per_second = 10.0 * workload.messages_per_iteration() as f64 / took.as_secs_f64();
//! assert!(per_second > 0.0);
//! # Ok(())
//! # }
//! ```

use crate::{Broker, ConsumerExt, GroupConfig, ProducerExt, Record, Result, SeekTo, TopicConfig};
use bytes::Bytes;
use std::future::Future;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Consumers of the queue-mode workloads (but `queue/single_ack_1p_1c`).
pub const QUEUE_CONSUMERS: usize = 4;
/// Partitions of the `producers/*` topics and of the queue-mode ones
/// without `_1p`.
pub const PARTITIONS: u32 = 4;
/// Records of the topic `read/deep` reads (see [`Workload::with_topic_records`]
/// for a smaller one).
pub const DEEP_TOPIC_RECORDS: u64 = 1_000_000;
/// Records a `read/*` iteration reads.
pub const READ_PER_ITERATION: u64 = 1_000;
/// Messages a `queue/*` iteration settles (one poll's worth).
pub const QUEUE_PER_ITERATION: u64 = 100;

/// What a workload does (see the [module docs](self)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `producers` tasks each send batches of `batch` records of
    /// `value_bytes`, round robin over `topics` topics.
    Produce {
        /// Records per `send_batch`.
        batch: usize,
        /// Bytes per record value.
        value_bytes: usize,
        /// Concurrent producers, each its own task.
        producers: usize,
        /// Topics the batches go to in turn.
        topics: usize,
    },
    /// A new stream-mode group (one per run) reads, polls of up to 1,000,
    /// committing each poll.
    Read {
        /// 0: each run writes the records it reads to a fresh topic of one
        /// partition and reads them from the start (`read/from_start`).
        /// Otherwise: `prepare` writes a topic of one partition of this
        /// many records, once; each run's group seeks to the last tenth
        /// of it (offset 900,000 of 1,000,000) and reads on, seeking back
        /// there each time it reaches the end (`read/deep`).
        topic_records: u64,
    },
    /// Queue-mode consumers (each a task) lease and ack.
    Queue {
        /// One `ack_batch` per poll instead of one `ack` per message.
        batch_ack: bool,
        /// Partitions of the topic.
        partitions: u32,
        /// Consumers, each its own task and [`Consumer`](crate::Consumer).
        consumers: usize,
    },
    /// Produce-to-consume latency at a fixed rate ([`latency`]).
    Latency {
        /// Records sent per second.
        rate: u32,
    },
}

/// One named workload of the catalogue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Workload {
    family: &'static str,
    case: &'static str,
    parameter: Option<u64>,
    kind: Kind,
}

const VALUE: usize = 100;

const fn produce(
    family: &'static str,
    case: &'static str,
    parameter: u64,
    batch: usize,
    value_bytes: usize,
    producers: usize,
    topics: usize,
) -> Workload {
    Workload {
        family,
        case,
        parameter: Some(parameter),
        kind: Kind::Produce {
            batch,
            value_bytes,
            producers,
            topics,
        },
    }
}

const fn queue(case: &'static str, batch_ack: bool, partitions: u32, consumers: usize) -> Workload {
    Workload {
        family: "queue",
        case,
        parameter: None,
        kind: Kind::Queue {
            batch_ack,
            partitions,
            consumers,
        },
    }
}

const CATALOGUE: &[Workload] = &[
    produce("produce", "batch_1", 1, 1, VALUE, 1, 1),
    produce("produce", "batch_100", 100, 100, VALUE, 1, 1),
    produce("produce", "batch_1000", 1000, 1000, VALUE, 1, 1),
    produce("value_size", "100B", 100, 100, 100, 1, 1),
    produce("value_size", "1KiB", 1024, 100, 1024, 1, 1),
    produce("value_size", "64KiB", 65536, 100, 65536, 1, 1),
    produce("producers", "1", 1, 100, VALUE, 1, 1),
    produce("producers", "2", 2, 100, VALUE, 2, 1),
    produce("producers", "4", 4, 100, VALUE, 4, 1),
    produce("topics", "1", 1, 100, VALUE, 1, 1),
    produce("topics", "10", 10, 100, VALUE, 1, 10),
    produce("topics", "1000", 1000, 100, VALUE, 1, 1000),
    Workload {
        family: "read",
        case: "from_start",
        parameter: None,
        kind: Kind::Read { topic_records: 0 },
    },
    Workload {
        family: "read",
        case: "deep",
        parameter: None,
        kind: Kind::Read {
            topic_records: DEEP_TOPIC_RECORDS,
        },
    },
    queue("single_ack", false, PARTITIONS, QUEUE_CONSUMERS),
    queue("batch_ack", true, PARTITIONS, QUEUE_CONSUMERS),
    queue("single_ack_1p", false, 1, QUEUE_CONSUMERS),
    queue("batch_ack_1p", true, 1, QUEUE_CONSUMERS),
    queue("single_ack_1p_1c", false, 1, 1),
    Workload {
        family: "latency",
        case: "produce_to_consume",
        parameter: None,
        kind: Kind::Latency { rate: 1_000 },
    },
];

/// Every workload, in the order the comparison runs and reports them.
pub fn catalogue() -> &'static [Workload] {
    CATALOGUE
}

/// The workload named `name` (`family/case`, as [`Workload::name`] prints).
pub fn find(name: &str) -> Option<Workload> {
    CATALOGUE.iter().copied().find(|w| w.name() == name)
}

impl Workload {
    /// `family/case`, e.g. `produce/batch_100`.
    pub fn name(&self) -> String {
        format!("{}/{}", self.family, self.case)
    }

    /// The family (`produce`, `value_size`, `producers`, `topics`,
    /// `read`, `queue`, `latency`): one table and one criterion group.
    pub fn family(&self) -> &'static str {
        self.family
    }

    /// The case within the family (`batch_100`, `64KiB`, ...).
    pub fn case(&self) -> &'static str {
        self.case
    }

    /// The case as a number where it is one (batch size, value size,
    /// producers, topics), so charts can put the cases on an axis.
    pub fn parameter(&self) -> Option<u64> {
        self.parameter
    }

    /// What it does.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The same workload on a topic of `records` records (at least
    /// 10 × [`READ_PER_ITERATION`]) if it reads a topic written once
    /// (`read/deep`); any other workload unchanged. For smoke runs and
    /// tests, which cannot spend the seconds a topic of 1,000,000 records
    /// takes to write.
    pub fn with_topic_records(mut self, records: u64) -> Self {
        if let Kind::Read { topic_records } = &mut self.kind {
            if *topic_records > 0 {
                *topic_records = records.max(10 * READ_PER_ITERATION);
            }
        }
        self
    }

    /// Bytes per record value.
    pub fn value_bytes(&self) -> usize {
        match self.kind {
            Kind::Produce { value_bytes, .. } => value_bytes,
            _ => VALUE,
        }
    }

    /// Messages one iteration of [`Prepared::run`] sends or consumes (0
    /// for the latency workload, which is not iterated).
    pub fn messages_per_iteration(&self) -> u64 {
        match self.kind {
            Kind::Produce {
                batch, producers, ..
            } => (batch * producers) as u64,
            Kind::Read { .. } => READ_PER_ITERATION,
            Kind::Queue { .. } => QUEUE_PER_ITERATION,
            Kind::Latency { .. } => 0,
        }
    }

    /// Create what the workload needs (topics, producers; for `read/deep`
    /// its topic, filled) on `broker`, with names of its own
    /// (`conveyor.bench.<pid>.<n>...`), so a run can share a server with
    /// other work.
    ///
    /// # Errors
    /// What `create_topic` or `producer` returns; `InvalidArgument` for
    /// the latency workload, which [`latency`] runs.
    ///
    /// # Cancel safety
    /// Not cancel safe: topics created before the cancel stay.
    pub async fn prepare(&self, broker: &Arc<dyn Broker>) -> Result<Prepared> {
        let prefix = unique_prefix();
        let mut prepared = Prepared {
            workload: *self,
            broker: broker.clone(),
            prefix,
            topics: Vec::new(),
            producers: Vec::new(),
            round: 0,
            topic_end: 0,
        };
        match self.kind {
            Kind::Produce {
                producers, topics, ..
            } => {
                let partitions = if producers > 1 { PARTITIONS } else { 1 };
                for i in 0..topics {
                    let topic = format!("{}.{i}", prepared.prefix);
                    create_topic(broker, &topic, partitions, self.value_bytes()).await?;
                    prepared.topics.push(topic);
                }
                for _ in 0..producers {
                    prepared.producers.push(broker.producer().await?);
                }
            }
            Kind::Read { topic_records } => {
                prepared.producers.push(broker.producer().await?);
                if topic_records > 0 {
                    let topic = format!("{}.deep", prepared.prefix);
                    // In the list first: `cleanup` deletes it even if
                    // filling it fails.
                    prepared.topics.push(topic.clone());
                    prepared.topic_end = prepared.fill(&topic, 1, topic_records).await?;
                }
            }
            Kind::Queue { .. } => {
                prepared.producers.push(broker.producer().await?);
            }
            Kind::Latency { .. } => {
                return Err(crate::Error::invalid(
                    "the latency workload is not iterated: run conveyor::bench::latency",
                ))
            }
        }
        Ok(prepared)
    }
}

/// Topic and group names no other run shares.
fn unique_prefix() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "conveyor.bench.{}.{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

async fn create_topic(
    broker: &Arc<dyn Broker>,
    topic: &str,
    partitions: u32,
    value_bytes: usize,
) -> Result<()> {
    let mut config = TopicConfig::new(partitions);
    if value_bytes + 1024 > config.max_message_bytes {
        config = config.with_max_message_bytes(value_bytes + 1024);
    }
    broker.create_topic(topic, config).await
}

/// A workload ready to run on one broker.
pub struct Prepared {
    workload: Workload,
    broker: Arc<dyn Broker>,
    prefix: String,
    topics: Vec<String>,
    producers: Vec<Arc<dyn crate::Producer>>,
    round: u64,
    /// `read/deep`: the offset after the last record of its topic.
    topic_end: u64,
}

impl Prepared {
    /// The workload.
    pub fn workload(&self) -> Workload {
        self.workload
    }

    /// Run `iters` iterations and return the time they took, without the
    /// untimed set-up (for `read/*` and `queue/*`: writing the records
    /// they consume, creating and closing the consumers, deleting the
    /// topic).
    ///
    /// # Errors
    /// The first error of any call; `Unavailable` if a consumer finds no
    /// more records for 10 seconds.
    ///
    /// # Cancel safety
    /// Not cancel safe: cancelled, the records already sent stay and
    /// spawned producers run to the end of their batches.
    pub async fn run(&mut self, iters: u64) -> Result<Duration> {
        self.round += 1;
        match self.workload.kind {
            Kind::Produce {
                batch, value_bytes, ..
            } => self.produce(iters, batch, value_bytes).await,
            Kind::Read { topic_records: 0 } => self.read(iters).await,
            Kind::Read { topic_records } => self.read_deep(iters, topic_records).await,
            Kind::Queue {
                batch_ack,
                partitions,
                consumers,
            } => self.queue(iters, batch_ack, partitions, consumers).await,
            Kind::Latency { .. } => Err(crate::Error::invalid(
                "the latency workload is not iterated",
            )),
        }
    }

    async fn produce(&self, iters: u64, batch: usize, value_bytes: usize) -> Result<Duration> {
        let value = Bytes::from(vec![7u8; value_bytes]);
        let topics = Arc::new(self.topics.clone());
        let started = Instant::now();
        let tasks: Vec<_> = self
            .producers
            .iter()
            .map(|producer| {
                let (producer, topics, value) = (producer.clone(), topics.clone(), value.clone());
                tokio::spawn(async move {
                    for i in 0..iters {
                        let topic = &topics[(i % topics.len() as u64) as usize];
                        let records = (0..batch).map(|_| Record::new(value.clone())).collect();
                        producer.send_batch(topic, records).await?;
                    }
                    Ok::<_, crate::Error>(())
                })
            })
            .collect();
        for task in tasks {
            task.await.map_err(joined)??;
        }
        Ok(started.elapsed())
    }

    /// This run's topic, fresh, of `partitions` holding `n` records.
    async fn fill_run_topic(&self, partitions: u32, n: u64) -> Result<String> {
        let topic = format!("{}.{}", self.prefix, self.round);
        self.fill(&topic, partitions, n).await?;
        Ok(topic)
    }

    /// Create `topic` with `partitions` and write `n` records to it;
    /// the offset after the last one's (of its partition).
    async fn fill(&self, topic: &str, partitions: u32, n: u64) -> Result<u64> {
        create_topic(&self.broker, topic, partitions, VALUE).await?;
        let value = Bytes::from(vec![7u8; VALUE]);
        let mut left = n;
        let mut end = 0;
        while left > 0 {
            let batch = left.min(1000);
            let records = (0..batch).map(|_| Record::new(value.clone())).collect();
            let receipts = self.producers[0].send_batch(topic, records).await?;
            end = receipts.last().map_or(end, |r| r.offset + 1);
            left -= batch;
        }
        self.producers[0].flush().await?;
        Ok(end)
    }

    async fn read(&self, iters: u64) -> Result<Duration> {
        let n = iters * READ_PER_ITERATION;
        let topic = self.fill_run_topic(1, n).await?;
        let group = format!("{topic}.readers");
        let consumer = self
            .broker
            .consumer(&group, &[&topic], GroupConfig::stream())
            .await?;
        let started = Instant::now();
        let mut read = 0;
        while read < n {
            let batch = consumer.poll(1_000, Duration::from_secs(10)).await?;
            if batch.is_empty() {
                return Err(stalled(read, n));
            }
            consumer.commit_batch(&batch).await?;
            read += batch.len() as u64;
        }
        let took = started.elapsed();
        consumer.close().await?;
        self.broker.delete_topic(&topic).await?;
        Ok(took)
    }

    /// `read/deep`: a new group seeks to the last tenth of the topic
    /// `prepare` wrote and reads `iters` × 1,000 records from there,
    /// seeking back each time it reaches the end.
    async fn read_deep(&self, iters: u64, topic_records: u64) -> Result<Duration> {
        let n = iters * READ_PER_ITERATION;
        let topic = &self.topics[0];
        let (end, start) = (self.topic_end, self.topic_end - topic_records / 10);
        let group = format!("{}.deep.{}.readers", self.prefix, self.round);
        let consumer = self
            .broker
            .consumer(&group, &[topic], GroupConfig::stream())
            .await?;
        // Own the partition (a stream-mode seek needs it), then seek.
        consumer.assignment().await?;
        consumer.seek(topic, 0, SeekTo::Offset(start)).await?;
        let started = Instant::now();
        let mut read = 0;
        while read < n {
            let want = (n - read).min(1_000) as usize;
            let batch = consumer.poll(want, Duration::from_secs(10)).await?;
            let Some(last) = batch.last() else {
                return Err(stalled(read, n));
            };
            if batch[0].offset < start {
                return Err(crate::Error::internal(format!(
                    "read/deep: read offset {} after seeking to {start}",
                    batch[0].offset
                )));
            }
            consumer.commit_batch(&batch).await?;
            read += batch.len() as u64;
            if last.offset + 1 >= end {
                consumer.seek(topic, 0, SeekTo::Offset(start)).await?;
            }
        }
        let took = started.elapsed();
        consumer.close().await?;
        Ok(took)
    }

    async fn queue(
        &self,
        iters: u64,
        batch_ack: bool,
        partitions: u32,
        consumers: usize,
    ) -> Result<Duration> {
        let n = iters * QUEUE_PER_ITERATION;
        let topic = self.fill_run_topic(partitions, n).await?;
        let group = format!("{topic}.workers");
        let config = GroupConfig::queue().with_visibility_timeout(Duration::from_secs(3600));
        let n_consumers = consumers;
        let mut consumers = Vec::new();
        for _ in 0..n_consumers {
            consumers.push(
                self.broker
                    .consumer(&group, &[&topic], config.clone())
                    .await?,
            );
        }
        let left = Arc::new(AtomicI64::new(n as i64));
        let started = Instant::now();
        let tasks: Vec<_> = consumers
            .iter()
            .map(|consumer| {
                let (consumer, left) = (consumer.clone(), left.clone());
                tokio::spawn(async move {
                    let mut idle = Instant::now();
                    while left.load(Ordering::Relaxed) > 0 {
                        let got = consumer
                            .poll(QUEUE_PER_ITERATION as usize, Duration::from_millis(5))
                            .await?;
                        if got.is_empty() {
                            if idle.elapsed() > Duration::from_secs(10) {
                                let done = n as i64 - left.load(Ordering::Relaxed);
                                return Err(stalled(done.max(0) as u64, n));
                            }
                            continue;
                        }
                        idle = Instant::now();
                        if batch_ack {
                            consumer.ack_batch(&got).await?.into_result()?;
                        } else {
                            for m in &got {
                                consumer.ack(m).await?;
                            }
                        }
                        left.fetch_sub(got.len() as i64, Ordering::Relaxed);
                    }
                    Ok::<_, crate::Error>(())
                })
            })
            .collect();
        for task in tasks {
            task.await.map_err(joined)??;
        }
        let took = started.elapsed();
        for consumer in consumers {
            consumer.close().await?;
        }
        self.broker.delete_topic(&topic).await?;
        Ok(took)
    }

    /// Delete the workload's topics.
    ///
    /// # Errors
    /// What `delete_topic` returns.
    ///
    /// # Cancel safety
    /// Not cancel safe: some topics may stay; calling again is safe only
    /// if the error was before any was deleted.
    pub async fn cleanup(self) -> Result<()> {
        for producer in &self.producers {
            producer.flush().await?;
        }
        for topic in &self.topics {
            self.broker.delete_topic(topic).await?;
        }
        Ok(())
    }
}

fn stalled(done: u64, of: u64) -> crate::Error {
    crate::Error::new(
        crate::ErrorKind::Unavailable,
        format!("bench consumer stalled: no records for 10 s after {done} of {of}"),
    )
}

fn joined(e: tokio::task::JoinError) -> crate::Error {
    crate::Error::internal(format!("bench task failed: {e}"))
}

/// Produce-to-consume latency percentiles of one [`latency`] run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LatencySummary {
    /// Records timed.
    pub samples: u64,
    /// Median.
    pub p50: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// 99.9th percentile.
    pub p999: Duration,
    /// The slowest.
    pub max: Duration,
}

impl LatencySummary {
    /// The percentiles of `samples` (nearest rank); all zero when empty.
    pub fn of(mut samples: Vec<Duration>) -> Self {
        samples.sort_unstable();
        let at = |p: f64| -> Duration {
            match samples.len() {
                0 => Duration::ZERO,
                n => samples[((p * n as f64).ceil() as usize).clamp(1, n) - 1],
            }
        };
        LatencySummary {
            samples: samples.len() as u64,
            p50: at(0.50),
            p99: at(0.99),
            p999: at(0.999),
            max: at(1.0),
        }
    }
}

/// Produce-to-consume latency: send `rate` records per second, one by one,
/// for `duration`, each from its own task started when it is due (an open
/// loop: a slow send does not delay the next), to a topic of one
/// partition that one stream-mode consumer polls; time each record from
/// the moment its `send` was called to the moment `poll` returned it. The
/// value (`value_bytes`, at least 8) carries its send time. (Not from the
/// due time: tokio's timer fires up to a millisecond late, which would
/// swamp what is measured.)
///
/// # Errors
/// The first error of a send or poll; `Unavailable` if a record does not
/// arrive within 10 seconds of the last send; `InvalidArgument` for a
/// zero rate.
///
/// # Cancel safety
/// Not cancel safe: the topic stays.
pub async fn latency(
    broker: &Arc<dyn Broker>,
    rate: u32,
    duration: Duration,
    value_bytes: usize,
) -> Result<LatencySummary> {
    if rate == 0 {
        return Err(crate::Error::invalid("latency: rate must be > 0"));
    }
    let topic = format!("{}.latency", unique_prefix());
    create_topic(broker, &topic, 1, value_bytes).await?;
    let consumer = broker
        .consumer(
            &format!("{topic}.readers"),
            &[&topic],
            GroupConfig::stream(),
        )
        .await?;
    let producer = broker.producer().await?;
    let total = ((rate as f64 * duration.as_secs_f64()).ceil() as u64).max(1);
    let epoch = Instant::now();
    let reader = {
        let consumer = consumer.clone();
        tokio::spawn(async move {
            let mut samples = Vec::with_capacity(total as usize);
            while (samples.len() as u64) < total {
                let got = consumer.poll(1_000, Duration::from_secs(10)).await?;
                let now = epoch.elapsed();
                if got.is_empty() {
                    return Err(stalled(samples.len() as u64, total));
                }
                for m in &got {
                    samples.push(now.saturating_sub(stamp_of(&m.value)));
                }
                consumer.commit_batch(&got).await?;
            }
            Ok::<_, crate::Error>(samples)
        })
    };
    let to = topic.clone();
    paced(epoch, rate, total, move |sent| {
        let (producer, topic) = (producer.clone(), to.clone());
        async move {
            producer
                .send(&topic, Record::new(stamped(sent, value_bytes)))
                .await
                .map(drop)
        }
    })
    .await?;
    let samples = reader.await.map_err(joined)??;
    consumer.close().await?;
    broker.delete_topic(&topic).await?;
    Ok(LatencySummary::of(samples))
}

/// The open loop of [`latency`], for its raw baselines too: `total`
/// calls of `send`, the i-th in a task of its own started at `epoch` +
/// i / `rate` seconds, whether or not the earlier ones have returned.
/// Each gets the time it started (since `epoch`) to put in what it sends
/// ([`stamped`]). Waits for them all.
///
/// # Errors
/// The first error a `send` returned (all of them run); `InvalidArgument`
/// for a zero rate.
///
/// # Cancel safety
/// Not cancel safe: the sends already started run on.
pub async fn paced<F, Fut>(epoch: Instant, rate: u32, total: u64, send: F) -> Result<()>
where
    F: Fn(Duration) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<()>> + Send + 'static,
{
    if rate == 0 {
        return Err(crate::Error::invalid("paced: rate must be > 0"));
    }
    let send = Arc::new(send);
    let every = Duration::from_secs_f64(1.0 / rate as f64);
    let mut sends = Vec::with_capacity(total as usize);
    for i in 0..total {
        let due = every.mul_f64(i as f64);
        tokio::time::sleep_until(tokio::time::Instant::from_std(epoch) + due).await;
        let send = send.clone();
        sends.push(tokio::spawn(async move { send(epoch.elapsed()).await }));
    }
    let mut first = Ok(());
    for s in sends {
        let done = s.await.map_err(joined).and_then(|r| r);
        if first.is_ok() {
            first = done;
        }
    }
    first
}

/// A value of `value_bytes` (at least 8) whose first 8 bytes carry `sent`
/// (nanoseconds, little endian), for [`stamp_of`] to read back.
pub fn stamped(sent: Duration, value_bytes: usize) -> Vec<u8> {
    let mut value = vec![0u8; value_bytes.max(8)];
    value[..8].copy_from_slice(&(sent.as_nanos() as u64).to_le_bytes());
    value
}

/// The time a [`stamped`] value carries (zero for a value shorter than 8
/// bytes).
pub fn stamp_of(value: &[u8]) -> Duration {
    let mut sent = [0u8; 8];
    if let Some(head) = value.get(..8) {
        sent.copy_from_slice(head);
    }
    Duration::from_nanos(u64::from_le_bytes(sent))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_found() {
        let mut names: Vec<String> = catalogue().iter().map(Workload::name).collect();
        let n = names.len();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), n);
        for w in catalogue() {
            assert_eq!(find(&w.name()), Some(*w));
        }
        assert_eq!(find("produce/batch_7"), None);
    }

    #[test]
    fn only_a_deep_read_takes_a_topic_size() {
        let deep = find("read/deep").unwrap();
        assert_eq!(
            deep.kind(),
            Kind::Read {
                topic_records: DEEP_TOPIC_RECORDS
            }
        );
        let small = deep.with_topic_records(5);
        assert_eq!(
            small.kind(),
            Kind::Read {
                topic_records: 10 * READ_PER_ITERATION
            }
        );
        assert_eq!(small.name(), "read/deep");
        let from_start = find("read/from_start").unwrap();
        assert_eq!(from_start.with_topic_records(20_000), from_start);
    }

    #[test]
    fn stamps_round_trip() {
        let t = Duration::from_nanos(123_456_789);
        assert_eq!(stamp_of(&stamped(t, 100)), t);
        assert_eq!(stamped(t, 3).len(), 8);
        assert_eq!(stamp_of(b"short"), Duration::ZERO);
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let ms = |n| Duration::from_millis(n);
        let s = LatencySummary::of((1..=1000).rev().map(ms).collect());
        assert_eq!(
            (s.p50, s.p99, s.p999, s.max),
            (ms(500), ms(990), ms(999), ms(1000))
        );
        assert_eq!(LatencySummary::of(vec![]).samples, 0);
        assert_eq!(LatencySummary::of(vec![ms(3)]).p999, ms(3));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_iterated_workload_runs_on_memory() {
        let broker = crate::open("memory://").await.unwrap();
        // A deep topic of 20,000 records: 1,000,000 take seconds to write.
        for w in catalogue().iter().map(|w| w.with_topic_records(20_000)) {
            if matches!(w.kind(), Kind::Latency { .. }) {
                assert!(w.prepare(&broker).await.is_err());
                continue;
            }
            let mut run = w.prepare(&broker).await.unwrap();
            assert!(run.run(2).await.unwrap() > Duration::ZERO, "{}", w.name());
            // Past the end of the deep topic's last tenth: it seeks back.
            assert!(run.run(3).await.unwrap() > Duration::ZERO, "{}", w.name());
            run.cleanup().await.unwrap();
        }
        // Everything it made is gone.
        assert_eq!(broker.list_topics().await.unwrap(), Vec::<String>::new());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn latency_times_every_record() {
        let broker = crate::open("memory://").await.unwrap();
        let s = latency(&broker, 500, Duration::from_millis(200), 100)
            .await
            .unwrap();
        assert_eq!(s.samples, 100);
        assert!(s.p50 <= s.p99 && s.p99 <= s.p999 && s.p999 <= s.max);
        assert!(s.max < Duration::from_secs(5), "{s:?}");
        assert!(broker.list_topics().await.unwrap().is_empty());
    }
}
