//! Metrics and spans for every backend, written once: [`observe`] wraps a
//! [`Broker`] so that its producers and consumers record
//! [`metrics`] and open [`tracing`] spans around each call,
//! and carry W3C trace context in the records' headers (`opentelemetry`
//! feature). `conveyor::open` returns a broker wrapped this way; a broker
//! built directly from a backend crate is wrapped with
//! `conveyor::observe::observe(Arc::new(broker), "postgres")`.
//!
//! This module owns the wrapper and its gauge refresh; the names and
//! labels are in [`metrics`] and [`trace`]. It changes no
//! behaviour: every call goes to the wrapped broker as it is, and the
//! conformance suite runs on a wrapped broker too.
//!
//! What is recorded, and where:
//! - **Producer**: a `send` span per `send_batch`, the
//!   `messaging.client.sent.messages` counter per partition, and the
//!   call's `messaging.client.operation.duration`.
//! - **Consumer**: a `receive` span per `poll` (linked to each message's
//!   producer), `messaging.client.consumed.messages`,
//!   `conveyor.messages.redelivered` and the end-to-end delay per
//!   message; durations of `receive`, `ack`, `nack` and `commit`;
//!   `conveyor.messages.dead_lettered` when a nack dead-letters,
//!   `conveyor.commits.fenced` when an ack or commit is `Fenced`,
//!   `conveyor.lease.extensions` per extension.
//! - **Per group**, on an interval ([`ObserveConfig::gauge_interval`],
//!   10 s) while this process has a member of it: the lag and in-flight
//!   gauges per partition, the DLQ depth per topic (dead letters waiting
//!   to be redriven), and `conveyor.group.rebalances` as the generation
//!   moves. One `describe_group` (and a DLQ's `describe_topic` and the
//!   redrive group's lag) per interval and group, not per message.
//! - **The runner** ([`Runner`](crate::runner::Runner)): a `process` span
//!   per message (the child of its producer's span),
//!   `messaging.process.duration`, `conveyor.handler.timeouts`, and dead
//!   letters of permanent failures.
//!
//! With no `metrics` recorder installed and no `tracing` subscriber
//! listening, each call costs a few label strings and disabled-span
//! checks; `docs/performance-notes.md` has the figures.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> conveyor::Result<()> {
//! use conveyor::prelude::*;
//! use std::sync::Arc;
//!
//! // What `conveyor::open("memory://")` does for you.
//! let broker = conveyor::observe::observe(Arc::new(conveyor::memory::open_default()), "memory");
//! broker.create_topic("orders", TopicConfig::new(1)).await?;
//! broker.producer().await?.send("orders", Record::new("o-1")).await?;
//! # Ok(())
//! # }
//! ```

pub mod metrics;
pub mod trace;

pub use trace::process_span;

use self::metrics::{SendInstruments, TopicInstruments};
use crate::broker::{BatchAck, Broker, Capabilities, Consumer, IdempotencyStore, Producer};
use crate::broker::{NackOptions, NackOutcome, TopicPartition};
use crate::config::{GroupConfig, SeekTo, TopicConfig};
use crate::describe::{GroupDescription, GroupLag, TopicDescription};
use crate::error::{ErrorKind, Result};
use crate::record::{Message, Receipt, Record};
use async_trait::async_trait;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use tracing::Instrument;

/// What a consumer's metrics and spans are labelled with: the backend and
/// the group ([`Consumer::labels`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Labels {
    /// The backend: `memory`, `mmap`, `rocksdb`, `postgres`, `redis`.
    pub system: &'static str,
    /// The consumer group, for a consumer.
    pub group: Option<Arc<str>>,
}

impl Labels {
    /// Labels of a member of `group` on `system`.
    pub fn new(system: &'static str, group: Option<&str>) -> Self {
        Labels {
            system,
            group: group.map(Arc::from),
        }
    }
}

/// Settings of [`observe_with`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ObserveConfig {
    /// How often the lag and in-flight gauges of a group with a member
    /// in this process are refreshed (one `describe_group` each time).
    /// Default 10 s.
    pub gauge_interval: Duration,
}

impl Default for ObserveConfig {
    fn default() -> Self {
        ObserveConfig {
            gauge_interval: Duration::from_secs(10),
        }
    }
}

impl ObserveConfig {
    /// Refresh the gauges every `interval` (at least 100 ms).
    pub fn with_gauge_interval(mut self, interval: Duration) -> Self {
        self.gauge_interval = interval.max(Duration::from_millis(100));
        self
    }
}

/// `broker`, recording metrics and spans as `system` (the backend's name,
/// the `messaging.system` label), with the default [`ObserveConfig`].
pub fn observe(broker: Arc<dyn Broker>, system: &'static str) -> Arc<dyn Broker> {
    observe_with(broker, system, ObserveConfig::default())
}

/// [`observe`] with settings.
pub fn observe_with(
    broker: Arc<dyn Broker>,
    system: &'static str,
    config: ObserveConfig,
) -> Arc<dyn Broker> {
    Arc::new(Observed {
        inner: broker,
        system,
        config,
        gauges: Arc::new(Mutex::new(HashMap::new())),
    })
}

/// A broker whose producers and consumers record metrics and spans.
struct Observed {
    inner: Arc<dyn Broker>,
    system: &'static str,
    config: ObserveConfig,
    /// The gauge refresh of each group with a member here.
    gauges: Arc<Mutex<HashMap<String, Weak<GaugeRefresh>>>>,
}

impl Observed {
    /// The running gauge refresh of `group`, started if there is none.
    fn gauge_refresh(&self, group: &str) -> Arc<GaugeRefresh> {
        let mut gauges = self.gauges.lock();
        if let Some(running) = gauges.get(group).and_then(Weak::upgrade) {
            return running;
        }
        let labels = Labels::new(self.system, Some(group));
        let task = tokio::spawn(refresh_gauges(
            Arc::downgrade(&self.inner),
            labels,
            self.config.gauge_interval,
        ));
        let refresh = Arc::new(GaugeRefresh(task));
        gauges.retain(|_, w| w.strong_count() > 0);
        gauges.insert(group.to_owned(), Arc::downgrade(&refresh));
        refresh
    }
}

/// A group's gauge refresh task; stops when the last member here drops it.
struct GaugeRefresh(tokio::task::JoinHandle<()>);

impl Drop for GaugeRefresh {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Every `interval`: the group's lag and in-flight per partition, and its
/// rebalances since the last look. Ends with the broker.
async fn refresh_gauges(broker: Weak<dyn Broker>, labels: Labels, interval: Duration) {
    let Some(group) = labels.group.clone() else {
        return;
    };
    let mut generation: Option<u64> = None;
    loop {
        let Some(b) = broker.upgrade() else { return };
        match b.describe_group(&group).await {
            Ok(described) => {
                for p in &described.lag.partitions {
                    metrics::lag(&labels, &p.topic, p.partition, p.lag, p.in_flight);
                }
                if let Some(config) = &described.config {
                    let mut topics: Vec<&str> = described
                        .lag
                        .partitions
                        .iter()
                        .map(|p| p.topic.as_str())
                        .collect();
                    topics.sort_unstable();
                    topics.dedup();
                    for topic in topics {
                        let dlq = config.dlq.topic_for(topic, &group);
                        match crate::dlq::depth(&*b, &dlq).await {
                            Ok(n) => metrics::dlq_depth(&labels, topic, n),
                            Err(e) => tracing::debug!(%dlq, error = %e, "DLQ depth not read"),
                        }
                    }
                }
                if let Some(before) = generation {
                    if described.generation > before {
                        metrics::rebalances(&labels, described.generation - before);
                    }
                }
                generation = Some(described.generation);
            }
            Err(e) if e.kind() == ErrorKind::Closed => return,
            Err(e) => tracing::debug!(group = %group, error = %e, "gauge refresh failed"),
        }
        drop(b);
        tokio::time::sleep(interval).await;
    }
}

#[async_trait]
impl Broker for Observed {
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    async fn create_topic(&self, name: &str, config: TopicConfig) -> Result<()> {
        self.inner.create_topic(name, config).await
    }
    async fn delete_topic(&self, name: &str) -> Result<()> {
        self.inner.delete_topic(name).await
    }
    async fn list_topics(&self) -> Result<Vec<String>> {
        self.inner.list_topics().await
    }
    async fn describe_topic(&self, name: &str) -> Result<TopicDescription> {
        self.inner.describe_topic(name).await
    }
    async fn add_partitions(&self, name: &str, partitions: u32) -> Result<()> {
        self.inner.add_partitions(name, partitions).await
    }
    async fn producer(&self) -> Result<Arc<dyn Producer>> {
        let inner = self.inner.producer().await?;
        Ok(Arc::new(ObservedProducer {
            inner,
            system: self.system,
            topics: parking_lot::RwLock::new(HashMap::new()),
        }))
    }
    async fn consumer(
        &self,
        group: &str,
        topics: &[&str],
        config: GroupConfig,
    ) -> Result<Arc<dyn Consumer>> {
        let inner = self.inner.consumer(group, topics, config).await?;
        let labels = Labels::new(self.system, Some(group));
        let instruments = topics
            .iter()
            .map(|t| (t.to_string(), TopicInstruments::new(&labels, t)))
            .collect();
        Ok(Arc::new(ObservedConsumer {
            inner,
            labels,
            instruments,
            _gauges: self.gauge_refresh(group),
        }))
    }
    async fn alter_group(&self, group: &str, changes: crate::GroupChanges) -> Result<GroupConfig> {
        self.inner.alter_group(group, changes).await
    }
    async fn list_groups(&self) -> Result<Vec<String>> {
        self.inner.list_groups().await
    }
    async fn group_lag(&self, group: &str) -> Result<GroupLag> {
        self.inner.group_lag(group).await
    }
    async fn describe_group(&self, group: &str) -> Result<GroupDescription> {
        self.inner.describe_group(group).await
    }
    async fn fetch(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
        max: usize,
    ) -> Result<Vec<Message>> {
        self.inner.fetch(topic, partition, offset, max).await
    }
    async fn offset_for_timestamp(
        &self,
        topic: &str,
        partition: u32,
        timestamp: u64,
    ) -> Result<u64> {
        self.inner
            .offset_for_timestamp(topic, partition, timestamp)
            .await
    }
    fn idempotency_store(&self) -> Arc<dyn IdempotencyStore> {
        self.inner.idempotency_store()
    }
    async fn close(&self) -> Result<()> {
        self.inner.close().await
    }
    async fn delete_group(&self, group: &str) -> Result<()> {
        self.inner.delete_group(group).await
    }
    async fn ping(&self) -> Result<()> {
        self.inner.ping().await
    }
}

/// A producer that records each send.
struct ObservedProducer {
    inner: Arc<dyn Producer>,
    system: &'static str,
    /// The instruments of each topic it sent to, registered at its first
    /// send there.
    topics: parking_lot::RwLock<HashMap<String, Arc<SendInstruments>>>,
}

impl ObservedProducer {
    fn instruments(&self, topic: &str) -> Arc<SendInstruments> {
        if let Some(i) = self.topics.read().get(topic) {
            return i.clone();
        }
        let made = Arc::new(SendInstruments::new(self.system, topic));
        self.topics
            .write()
            .entry(topic.to_owned())
            .or_insert(made)
            .clone()
    }
}

#[async_trait]
impl Producer for ObservedProducer {
    async fn send_batch(&self, topic: &str, mut records: Vec<Record>) -> Result<Vec<Receipt>> {
        let span = trace::send_span(self.system, topic, records.len());
        for record in &mut records {
            trace::inject(&span, &mut record.headers);
        }
        let started = Instant::now();
        let sent = self
            .inner
            .send_batch(topic, records)
            .instrument(span.clone())
            .await;
        match &sent {
            Ok(receipts) => self.instruments(topic).sent(receipts, started),
            Err(e) => {
                trace::failed(&span, e.kind().as_str());
                let labels = Labels::new(self.system, None);
                metrics::operation(&labels, "send", Some(topic), started, Some(e));
            }
        }
        sent
    }
    async fn flush(&self) -> Result<()> {
        self.inner.flush().await
    }
}

/// A consumer that records each call.
struct ObservedConsumer {
    inner: Arc<dyn Consumer>,
    labels: Labels,
    /// Per topic it reads, registered when it joined.
    instruments: Vec<(String, TopicInstruments)>,
    /// Keeps the group's gauges refreshed while this member lives.
    _gauges: Arc<GaugeRefresh>,
}

impl ObservedConsumer {
    /// The instruments of `topic` (a consumer reads a few topics: a scan
    /// beats hashing the name).
    fn instruments_of(&self, topic: &str) -> Option<&TopicInstruments> {
        self.instruments
            .iter()
            .find(|(t, _)| t == topic)
            .map(|(_, i)| i)
    }

    /// Record a settle call's duration, and a `Fenced` refusal.
    fn settled<T>(&self, op: &'static str, topic: &str, started: Instant, r: &Result<T>) {
        match (r, self.instruments_of(topic)) {
            (Ok(_), Some(instruments)) => instruments.settled(op, started),
            (Ok(_), None) => metrics::operation(&self.labels, op, Some(topic), started, None),
            (Err(e), _) => {
                metrics::operation(&self.labels, op, Some(topic), started, Some(e));
                if e.kind() == ErrorKind::Fenced {
                    metrics::count(metrics::FENCED, &self.labels, topic, 1);
                }
            }
        }
    }
}

#[async_trait]
impl Consumer for ObservedConsumer {
    async fn poll(&self, max: usize, timeout: Duration) -> Result<Vec<Message>> {
        let span = trace::receive_span(&self.labels);
        let started = Instant::now();
        let polled = self.inner.poll(max, timeout).instrument(span.clone()).await;
        match &polled {
            Ok(messages) => {
                trace::link(&span, messages);
                metrics::operation(&self.labels, "receive", None, started, None);
                let now = crate::now_ms();
                // A poll touches few partitions: a scan beats a map.
                let mut per_partition: Vec<((&str, u32), (u64, u64))> = Vec::new();
                for m in messages {
                    let at = (m.topic.as_str(), m.partition);
                    let i = match per_partition.iter().position(|(p, _)| *p == at) {
                        Some(i) => i,
                        None => {
                            per_partition.push((at, (0, 0)));
                            per_partition.len() - 1
                        }
                    };
                    let counts = &mut per_partition[i].1;
                    counts.0 += 1;
                    counts.1 += u64::from(m.attempt > 1);
                    if let Some(instruments) = self.instruments_of(&m.topic) {
                        instruments.delay(now.saturating_sub(m.timestamp) as f64 / 1000.0);
                    }
                }
                for ((topic, partition), (n, again)) in per_partition {
                    metrics::consumed(&self.labels, topic, partition, n, again);
                }
            }
            Err(e) => {
                trace::failed(&span, e.kind().as_str());
                metrics::operation(&self.labels, "receive", None, started, Some(e));
            }
        }
        polled
    }
    async fn ack(&self, message: &Message) -> Result<()> {
        let started = Instant::now();
        let r = self.inner.ack(message).await;
        self.settled("ack", &message.topic, started, &r);
        r
    }
    async fn ack_batch(&self, messages: &[Message]) -> Result<BatchAck> {
        let started = Instant::now();
        let r = self.inner.ack_batch(messages).await;
        // One duration per topic of the batch; fenced refusals one by one.
        let mut topics: Vec<&str> = messages.iter().map(|m| m.topic.as_str()).collect();
        topics.sort_unstable();
        topics.dedup();
        for topic in topics {
            self.settled("ack", topic, started, &r);
        }
        if let Ok(outcome) = &r {
            for (i, e) in &outcome.failed {
                if let (ErrorKind::Fenced, Some(m)) = (e.kind(), messages.get(*i)) {
                    metrics::count(metrics::FENCED, &self.labels, &m.topic, 1);
                }
            }
        }
        r
    }
    async fn nack(&self, message: &Message, options: NackOptions) -> Result<NackOutcome> {
        let started = Instant::now();
        let r = self.inner.nack(message, options).await;
        self.settled("nack", &message.topic, started, &r);
        if let Ok(NackOutcome::DeadLettered) = r {
            metrics::count(metrics::DEAD_LETTERED, &self.labels, &message.topic, 1);
        }
        r
    }
    async fn extend(&self, message: &Message, by: Duration) -> Result<()> {
        let r = self.inner.extend(message, by).await;
        if r.is_ok() {
            metrics::count(metrics::LEASE_EXTENSIONS, &self.labels, &message.topic, 1);
        }
        r
    }
    async fn commit(&self, topic: &str, partition: u32, offset: u64) -> Result<()> {
        let started = Instant::now();
        let r = self.inner.commit(topic, partition, offset).await;
        self.settled("commit", topic, started, &r);
        r
    }
    async fn seek(&self, topic: &str, partition: u32, to: SeekTo) -> Result<()> {
        self.inner.seek(topic, partition, to).await
    }
    async fn assignment(&self) -> Result<Vec<TopicPartition>> {
        self.inner.assignment().await
    }
    async fn group_config(&self) -> Result<GroupConfig> {
        self.inner.group_config().await
    }
    async fn generation(&self) -> Result<u64> {
        self.inner.generation().await
    }
    async fn close(&self) -> Result<()> {
        self.inner.close().await
    }
    fn labels(&self) -> Option<Labels> {
        Some(self.labels.clone())
    }
}
