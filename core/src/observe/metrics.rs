//! The metrics Conveyor records, through the [`metrics`] crate's facade:
//! their names and labels, and the one place each is recorded. Names and
//! labels follow OpenTelemetry's semantic conventions for messaging where
//! they have one (`messaging.*`), and Conveyor's own (`conveyor.*`) for
//! what operators alert on beyond them. Durations are in seconds.
//!
//! The application installs the recorder (Prometheus, OpenTelemetry,
//! StatsD, ...), **before it opens brokers**: a consumer registers the
//! instruments of its per-message paths (ack, nack, commit, end-to-end
//! delay) when it joins, and the runner those of its handler the first
//! time it meets a topic, so each message costs an atomic update rather
//! than a label set; instruments registered before the recorder was
//! installed stay no-ops. Per-batch and rare recordings (sends, polls,
//! errors, dead letters) build their labels each time. With no recorder
//! every recording is a no-op; `docs/performance-notes.md` has the
//! figures.

use super::Labels;
use crate::error::Error;
use metrics::{Label, SharedString};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

/// Counter: messages a producer sent (each acknowledged record of a
/// `send_batch` that returned `Ok`). Labels: system, destination,
/// partition.
pub const SENT_MESSAGES: &str = "messaging.client.sent.messages";
/// Counter: messages a consumer received from `poll`. Labels: system,
/// destination, partition, group.
pub const CONSUMED_MESSAGES: &str = "messaging.client.consumed.messages";
/// Histogram (s): how long a client call took: `send`, `receive` (a
/// poll), `ack`, `nack`, `commit`. Labels: system, operation, destination
/// (not for `receive`, which may span topics), group (consumer calls),
/// `error.type` when it failed.
pub const OPERATION_DURATION: &str = "messaging.client.operation.duration";
/// Histogram (s): how long the runner's handler took on one message.
/// Labels: system, destination, group, operation (`process`),
/// `error.type` (`handler`) when it failed.
pub const PROCESS_DURATION: &str = "messaging.process.duration";
/// Counter: messages moved to a dead-letter queue (after their last
/// delivery, or at once for a permanent failure). Labels: system, the
/// destination they were consumed from, group.
pub const DEAD_LETTERED: &str = "conveyor.messages.dead_lettered";
/// Counter: messages received again (attempt 2 and up). Labels as
/// [`CONSUMED_MESSAGES`].
pub const REDELIVERED: &str = "conveyor.messages.redelivered";
/// Counter: queue-mode leases extended. Labels: system, destination,
/// group.
pub const LEASE_EXTENSIONS: &str = "conveyor.lease.extensions";
/// Counter: runner handlers stopped by the handler timeout. Labels:
/// system, destination, group.
pub const HANDLER_TIMEOUTS: &str = "conveyor.handler.timeouts";
/// Counter: acks and commits refused as `Fenced` (the member lost the
/// partition to a rebalance). Labels: system, destination, group.
pub const FENCED: &str = "conveyor.commits.fenced";
/// Counter: stream-mode rebalances of a group (generation changes), seen
/// by the gauge refresh. Labels: system, group.
pub const REBALANCES: &str = "conveyor.group.rebalances";
/// Gauge: records of a partition not yet settled by the group (contract
/// §9's lag), refreshed on an interval. Labels: system, destination,
/// partition, group.
pub const LAG: &str = "conveyor.consumer.lag";
/// Gauge: queue-mode messages leased and not yet settled, per partition,
/// refreshed on an interval. Labels as [`LAG`].
pub const IN_FLIGHT: &str = "conveyor.consumer.in_flight";
/// Gauge: dead letters of the group's messages of a topic that wait in
/// its DLQ to be redriven (or discarded), refreshed on an interval.
/// Labels: system, destination (the topic they failed on), group.
pub const DLQ_DEPTH: &str = "conveyor.dlq.depth";
/// Histogram (s): from a record's append time to its receipt by a
/// consumer (end-to-end delay, on the broker's clock as the timestamp
/// is). Labels: system, destination, group.
pub const END_TO_END_DELAY: &str = "conveyor.message.end_to_end_delay";

/// Label: the backend (`memory`, `mmap`, `rocksdb`, `postgres`, `redis`).
pub const SYSTEM: &str = "messaging.system";
/// Label: the topic.
pub const DESTINATION: &str = "messaging.destination.name";
/// Label: the partition, in decimal.
pub const PARTITION: &str = "messaging.destination.partition.id";
/// Label: the consumer group.
pub const GROUP: &str = "messaging.consumer.group.name";
/// Label: the operation (`send`, `receive`, `ack`, `nack`, `commit`,
/// `process`).
pub const OPERATION: &str = "messaging.operation.name";
/// Label: what went wrong, an [`ErrorKind`](crate::ErrorKind)'s name
/// (`unavailable`, `fenced`, ...), or `handler` for a failed handler.
pub const ERROR_TYPE: &str = "error.type";

/// Describe every metric to the installed recorder (units and help
/// text, which exporters such as Prometheus show). Optional: metrics are
/// recorded without it. Call it after installing the recorder.
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(SENT_MESSAGES, Unit::Count, "Messages sent");
    describe_counter!(CONSUMED_MESSAGES, Unit::Count, "Messages received");
    describe_histogram!(
        OPERATION_DURATION,
        Unit::Seconds,
        "Duration of a send, receive, ack, nack or commit"
    );
    describe_histogram!(
        PROCESS_DURATION,
        Unit::Seconds,
        "Duration of the runner's handler on one message"
    );
    describe_counter!(DEAD_LETTERED, Unit::Count, "Messages dead-lettered");
    describe_counter!(REDELIVERED, Unit::Count, "Messages received again");
    describe_counter!(LEASE_EXTENSIONS, Unit::Count, "Leases extended");
    describe_counter!(HANDLER_TIMEOUTS, Unit::Count, "Handlers timed out");
    describe_counter!(FENCED, Unit::Count, "Acks and commits refused as fenced");
    describe_counter!(REBALANCES, Unit::Count, "Group rebalances");
    describe_gauge!(LAG, Unit::Count, "Records not yet settled by the group");
    describe_gauge!(IN_FLIGHT, Unit::Count, "Messages leased, not yet settled");
    describe_gauge!(DLQ_DEPTH, Unit::Count, "Dead letters waiting in the DLQ");
    describe_histogram!(
        END_TO_END_DELAY,
        Unit::Seconds,
        "From a record's append to its receipt by a consumer"
    );
}

/// The labels of one recording.
struct Set(Vec<Label>);

impl Set {
    fn new(system: &'static str) -> Self {
        let mut v = Vec::with_capacity(5);
        v.push(Label::from_static_parts(SYSTEM, system));
        Set(v)
    }

    fn of(labels: &Labels) -> Self {
        Set::new(labels.system).group(labels)
    }

    fn topic(mut self, topic: &str) -> Self {
        self.0.push(Label::new(DESTINATION, topic.to_owned()));
        self
    }

    fn partition(mut self, partition: u32) -> Self {
        self.0.push(Label::new(PARTITION, partition.to_string()));
        self
    }

    fn group(mut self, labels: &Labels) -> Self {
        if let Some(group) = &labels.group {
            let group = SharedString::from_shared(group.clone());
            self.0.push(Label::new(GROUP, group));
        }
        self
    }

    fn operation(mut self, operation: &'static str) -> Self {
        self.0.push(Label::from_static_parts(OPERATION, operation));
        self
    }

    fn error(mut self, error: Option<&'static str>) -> Self {
        if let Some(kind) = error {
            self.0.push(Label::from_static_parts(ERROR_TYPE, kind));
        }
        self
    }
}

fn error_type(e: &Error) -> &'static str {
    e.kind().as_str()
}

/// A producer's instruments for one topic: the send duration and the
/// sent counter of each partition, registered at its first send there.
pub(crate) struct SendInstruments {
    system: &'static str,
    topic: String,
    duration: metrics::Histogram,
    /// Per partition, grown as partitions are met.
    sent: parking_lot::RwLock<Vec<metrics::Counter>>,
}

impl SendInstruments {
    pub(crate) fn new(system: &'static str, topic: &str) -> Self {
        let Set(set) = Set::new(system).operation("send").topic(topic);
        SendInstruments {
            system,
            topic: topic.to_owned(),
            duration: metrics::histogram!(OPERATION_DURATION, set),
            sent: parking_lot::RwLock::new(Vec::new()),
        }
    }

    /// A `send_batch` that started at `started` returned `receipts`.
    pub(crate) fn sent(&self, receipts: &[crate::record::Receipt], started: Instant) {
        self.duration.record(started.elapsed().as_secs_f64());
        let mut per_partition: Vec<u64> = Vec::new();
        for r in receipts {
            let p = r.partition as usize;
            if per_partition.len() <= p {
                per_partition.resize(p + 1, 0);
            }
            per_partition[p] += 1;
        }
        if self.sent.read().len() < per_partition.len() {
            let mut sent = self.sent.write();
            while sent.len() < per_partition.len() {
                let Set(set) = Set::new(self.system)
                    .topic(&self.topic)
                    .partition(sent.len() as u32);
                sent.push(metrics::counter!(SENT_MESSAGES, set));
            }
        }
        let sent = self.sent.read();
        for (counter, n) in sent.iter().zip(per_partition) {
            if n > 0 {
                counter.increment(n);
            }
        }
    }
}

/// A client call's duration (`destination` `None` for a poll).
pub(crate) fn operation(
    labels: &Labels,
    operation: &'static str,
    topic: Option<&str>,
    started: Instant,
    error: Option<&Error>,
) {
    let mut set = Set::of(labels).operation(operation);
    if let Some(topic) = topic {
        set = set.topic(topic);
    }
    let Set(labels) = set.error(error.map(error_type));
    metrics::histogram!(OPERATION_DURATION, labels).record(started.elapsed().as_secs_f64());
}

/// A consumer's instruments for one of its topics, registered once when
/// it joins, so a message costs an atomic update (or nothing, without a
/// recorder) instead of building labels. A recorder installed after the
/// consumer was created does not see these (install it first).
pub(crate) struct TopicInstruments {
    ack: metrics::Histogram,
    nack: metrics::Histogram,
    commit: metrics::Histogram,
    delay: metrics::Histogram,
}

impl TopicInstruments {
    pub(crate) fn new(labels: &Labels, topic: &str) -> Self {
        let duration = |op| {
            let Set(set) = Set::of(labels).operation(op).topic(topic);
            metrics::histogram!(OPERATION_DURATION, set)
        };
        let Set(delay) = Set::of(labels).topic(topic);
        TopicInstruments {
            ack: duration("ack"),
            nack: duration("nack"),
            commit: duration("commit"),
            delay: metrics::histogram!(END_TO_END_DELAY, delay),
        }
    }

    /// A successful settle (`ack`, `nack` or `commit`) took
    /// `started.elapsed()`.
    pub(crate) fn settled(&self, op: &'static str, started: Instant) {
        let histogram = match op {
            "ack" => &self.ack,
            "nack" => &self.nack,
            _ => &self.commit,
        };
        histogram.record(started.elapsed().as_secs_f64());
    }

    /// A message of this topic arrived `seconds` after its append.
    pub(crate) fn delay(&self, seconds: f64) {
        self.delay.record(seconds);
    }
}

/// `n` messages of one partition received, `redelivered` of them again.
pub(crate) fn consumed(labels: &Labels, topic: &str, partition: u32, n: u64, redelivered: u64) {
    let Set(set) = Set::of(labels).topic(topic).partition(partition);
    if redelivered > 0 {
        metrics::counter!(REDELIVERED, set.clone()).increment(redelivered);
    }
    metrics::counter!(CONSUMED_MESSAGES, set).increment(n);
}

/// One of the per-topic counters ([`DEAD_LETTERED`], [`LEASE_EXTENSIONS`],
/// [`HANDLER_TIMEOUTS`], [`FENCED`]) raised by `n`.
pub(crate) fn count(name: &'static str, labels: &Labels, topic: &str, n: u64) {
    let Set(set) = Set::of(labels).topic(topic);
    metrics::counter!(name, set).increment(n);
}

/// The runner's `messaging.process.duration` histograms, registered per
/// topic the first time a message of it is handled (then an atomic
/// update per message, not a label set).
pub(crate) struct ProcessInstruments {
    labels: Labels,
    /// Per topic: the histogram of handled messages, and of failed ones.
    topics: parking_lot::Mutex<HashMap<String, Arc<[metrics::Histogram; 2]>>>,
}

impl ProcessInstruments {
    pub(crate) fn new(labels: Labels) -> Self {
        ProcessInstruments {
            labels,
            topics: parking_lot::Mutex::new(HashMap::new()),
        }
    }

    /// The handler took `started.elapsed()` on a message of `topic`.
    pub(crate) fn record(&self, topic: &str, started: Instant, failed: bool) {
        let elapsed = started.elapsed().as_secs_f64();
        let histograms = {
            let mut topics = self.topics.lock();
            match topics.get(topic) {
                Some(h) => h.clone(),
                None => {
                    let make = |failed: bool| {
                        let Set(set) = Set::of(&self.labels)
                            .operation("process")
                            .topic(topic)
                            .error(failed.then_some("handler"));
                        metrics::histogram!(PROCESS_DURATION, set)
                    };
                    let h = Arc::new([make(false), make(true)]);
                    topics.insert(topic.to_owned(), h.clone());
                    h
                }
            }
        };
        histograms[usize::from(failed)].record(elapsed);
    }
}

/// The group went through `n` rebalances.
pub(crate) fn rebalances(labels: &Labels, n: u64) {
    let Set(set) = Set::of(labels);
    metrics::counter!(REBALANCES, set).increment(n);
}

/// A partition's lag and in-flight count, as last read.
pub(crate) fn lag(labels: &Labels, topic: &str, partition: u32, lag: u64, in_flight: u64) {
    let Set(set) = Set::of(labels).topic(topic).partition(partition);
    metrics::gauge!(IN_FLIGHT, set.clone()).set(in_flight as f64);
    metrics::gauge!(LAG, set).set(lag as f64);
}

/// The dead letters of `topic`'s messages waiting in the group's DLQ.
pub(crate) fn dlq_depth(labels: &Labels, topic: &str, n: u64) {
    let Set(set) = Set::of(labels).topic(topic);
    metrics::gauge!(DLQ_DEPTH, set).set(n as f64);
}
