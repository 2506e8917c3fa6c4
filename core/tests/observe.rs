//! What the `observe` wrapper records, read back through a debugging
//! recorder: every counter and gauge says what happened to the messages
//! (contract §9), labelled with the backend, topic, partition and group.
//! Each test uses topics and groups of its own; the recorder is shared by
//! the process, so readings are accumulated in one place.

// Test code: a failed unwrap is a failed test, with its line.
#![allow(clippy::unwrap_used)]

use conveyor::observe::metrics as m;
use conveyor::prelude::*;
use conveyor::runner::{CancellationToken, HandlerError, Runner, RunnerConfig};
use conveyor::{
    Broker, DlqPolicy, ErrorKind, GroupConfig, Message, NackOptions, Record, TopicConfig,
};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// A reading: the metric's name and its labels, sorted.
type Series = (String, Vec<(String, String)>);

/// Everything recorded so far (a snapshot drains the recorder, so all
/// tests read through this).
struct Recorded {
    snapshotter: Snapshotter,
    counters: HashMap<Series, u64>,
    gauges: HashMap<Series, f64>,
    histograms: HashMap<Series, usize>,
}

fn recorded() -> &'static Mutex<Recorded> {
    static R: OnceLock<Mutex<Recorded>> = OnceLock::new();
    R.get_or_init(|| {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        recorder.install().unwrap();
        Mutex::new(Recorded {
            snapshotter,
            counters: HashMap::new(),
            gauges: HashMap::new(),
            histograms: HashMap::new(),
        })
    })
}

/// The sum over the series of `name` whose labels include all of `with`,
/// of counters (or the count of histogram samples, or the last gauge).
fn value(name: &str, with: &[(&str, &str)]) -> f64 {
    let mut r = recorded().lock().unwrap();
    for (key, _, _, v) in r.snapshotter.snapshot().into_vec() {
        let k = key.key();
        let mut labels: Vec<(String, String)> = k
            .labels()
            .map(|l| (l.key().to_owned(), l.value().to_owned()))
            .collect();
        labels.sort();
        let series = (k.name().to_owned(), labels);
        match v {
            DebugValue::Counter(n) => *r.counters.entry(series).or_default() += n,
            DebugValue::Gauge(g) => {
                r.gauges.insert(series, g.into_inner());
            }
            DebugValue::Histogram(h) => *r.histograms.entry(series).or_default() += h.len(),
        }
    }
    let matches = |(n, labels): &Series| {
        n == name
            && with
                .iter()
                .all(|(k, v)| labels.iter().any(|(lk, lv)| lk == k && lv == v))
    };
    let counters: u64 = r
        .counters
        .iter()
        .filter(|(s, _)| matches(s))
        .map(|(_, n)| n)
        .sum();
    let samples: usize = r
        .histograms
        .iter()
        .filter(|(s, _)| matches(s))
        .map(|(_, n)| n)
        .sum();
    let gauges: f64 = r
        .gauges
        .iter()
        .filter(|(s, _)| matches(s))
        .map(|(_, g)| g)
        .sum();
    counters as f64 + samples as f64 + gauges
}

async fn broker() -> Arc<dyn Broker> {
    recorded(); // installed before anything records
    conveyor::open("memory://").await.unwrap()
}

#[tokio::test]
async fn sends_receives_and_settles_are_counted_with_their_labels() {
    let broker = broker().await;
    let topic = "obs.counts";
    broker
        .create_topic(topic, TopicConfig::new(2))
        .await
        .unwrap();
    let producer = broker.producer().await.unwrap();
    let records = (0..10)
        .map(|i| Record::new(format!("v{i}")).with_partition(i % 2))
        .collect();
    producer.send_batch(topic, records).await.unwrap();
    let t = (m::DESTINATION, topic);
    assert_eq!(value(m::SENT_MESSAGES, &[t, (m::SYSTEM, "memory")]), 10.0);
    assert_eq!(value(m::SENT_MESSAGES, &[t, (m::PARTITION, "1")]), 5.0);
    let send = [t, (m::OPERATION, "send")];
    assert_eq!(value(m::OPERATION_DURATION, &send), 1.0, "one call");

    let config = GroupConfig::queue().with_dlq(DlqPolicy::new(2));
    let consumer = broker.consumer("obs-g1", &[topic], config).await.unwrap();
    let g = (m::GROUP, "obs-g1");
    let mut seen = Vec::new();
    while seen.len() < 10 {
        seen.extend(consumer.poll(10, Duration::from_secs(5)).await.unwrap());
    }
    assert_eq!(value(m::CONSUMED_MESSAGES, &[t, g]), 10.0);
    assert_eq!(
        value(m::END_TO_END_DELAY, &[t, g]),
        10.0,
        "one delay per message"
    );
    // 8 acked (one batch), 2 nacked: redelivered, then dead-lettered.
    let (fail, ok) = seen.split_at(2);
    consumer.ack_batch(ok).await.unwrap().into_result().unwrap();
    consumer
        .extend(&fail[0], Duration::from_secs(30))
        .await
        .unwrap();
    for message in fail {
        consumer.nack(message, NackOptions::new()).await.unwrap();
    }
    let mut again = Vec::new();
    while again.len() < 2 {
        again.extend(consumer.poll(10, Duration::from_secs(5)).await.unwrap());
    }
    assert_eq!(value(m::REDELIVERED, &[t, g]), 2.0);
    for message in &again {
        let outcome = consumer.nack(message, NackOptions::new()).await.unwrap();
        assert_eq!(outcome, conveyor::NackOutcome::DeadLettered);
    }
    assert_eq!(value(m::DEAD_LETTERED, &[t, g]), 2.0);
    assert_eq!(value(m::LEASE_EXTENSIONS, &[t, g]), 1.0);
    assert_eq!(
        value(m::OPERATION_DURATION, &[t, g, (m::OPERATION, "ack")]),
        1.0
    );
    assert_eq!(
        value(m::OPERATION_DURATION, &[t, g, (m::OPERATION, "nack")]),
        4.0
    );
    assert!(value(m::OPERATION_DURATION, &[g, (m::OPERATION, "receive")]) >= 2.0);
}

#[tokio::test]
async fn the_runner_records_processing_timeouts_and_permanent_dead_letters() {
    let broker = broker().await;
    let topic = "obs.runner";
    broker
        .create_topic(topic, TopicConfig::new(1))
        .await
        .unwrap();
    let producer = broker.producer().await.unwrap();
    for v in ["ok", "slow", "bad"] {
        producer.send(topic, Record::new(v)).await.unwrap();
    }
    let config = GroupConfig::queue().with_dlq(DlqPolicy::new(5));
    let consumer = broker
        .consumer("obs-g2", &[topic], config.clone())
        .await
        .unwrap();
    let done = CancellationToken::new();
    let runner = Runner::new(
        consumer,
        RunnerConfig::default().with_handler_timeout(Duration::from_millis(200)),
    )
    .with_dead_letters(broker.clone(), &config);
    let handler = {
        let done = done.clone();
        move |message: Message| {
            let done = done.clone();
            async move {
                match &message.value[..] {
                    b"slow" if message.attempt == 1 => {
                        std::future::pending::<()>().await;
                        Ok(())
                    }
                    b"bad" => Err(HandlerError::permanent("cannot parse")),
                    _ => {
                        if &message.value[..] == b"slow" {
                            done.cancel();
                        }
                        Ok(())
                    }
                }
            }
        }
    };
    tokio::time::timeout(
        Duration::from_secs(120),
        runner.run_until_cancelled(handler, done),
    )
    .await
    .unwrap()
    .unwrap();
    let (t, g) = ((m::DESTINATION, topic), (m::GROUP, "obs-g2"));
    assert_eq!(value(m::HANDLER_TIMEOUTS, &[t, g]), 1.0);
    assert_eq!(
        value(m::DEAD_LETTERED, &[t, g]),
        1.0,
        "the permanent failure"
    );
    // ok, slow twice (timed out, then handled), bad: four handler runs,
    // two of them failed.
    assert_eq!(
        value(m::PROCESS_DURATION, &[t, g, (m::SYSTEM, "memory")]),
        4.0
    );
    assert_eq!(
        value(m::PROCESS_DURATION, &[t, g, (m::ERROR_TYPE, "handler")]),
        2.0
    );
}

/// Poll `value(name, with)` until it is `want` (gauges refresh on an
/// interval).
async fn until(name: &str, with: &[(&str, &str)], want: f64) {
    let started = Instant::now();
    loop {
        let now = value(name, with);
        if now == want {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{name} {with:?}: {now}, want {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn lag_in_flight_rebalances_and_fenced_commits() {
    recorded();
    let inner = Arc::new(conveyor::memory::open_default()) as Arc<dyn Broker>;
    let config =
        conveyor::observe::ObserveConfig::default().with_gauge_interval(Duration::from_millis(100));
    let broker = conveyor::observe::observe_with(inner, "memory", config);
    let topic = "obs.lag";
    broker
        .create_topic(topic, TopicConfig::new(2))
        .await
        .unwrap();
    let producer = broker.producer().await.unwrap();
    let records = (0..6)
        .map(|i| Record::new(format!("v{i}")).with_partition(i % 2))
        .collect();
    producer.send_batch(topic, records).await.unwrap();

    let queue = broker
        .consumer("obs-q", &[topic], GroupConfig::queue())
        .await
        .unwrap();
    let (t, q) = ((m::DESTINATION, topic), (m::GROUP, "obs-q"));
    until(m::LAG, &[t, q, (m::PARTITION, "0")], 3.0).await;
    let leased = queue.poll(1, Duration::from_secs(5)).await.unwrap();
    assert_eq!(leased.len(), 1);
    until(m::IN_FLIGHT, &[t, q], 1.0).await;
    queue.ack(&leased[0]).await.unwrap();
    until(m::LAG, &[t, q], 5.0).await;

    // A dead letter waits in the DLQ until it is redriven.
    let config = GroupConfig::queue().with_dlq(DlqPolicy::new(1));
    let failing = broker
        .consumer("obs-d", &[topic], config.clone())
        .await
        .unwrap();
    let d = (m::GROUP, "obs-d");
    let taken = failing.poll(1, Duration::from_secs(5)).await.unwrap();
    let outcome = failing.nack(&taken[0], NackOptions::new()).await.unwrap();
    assert_eq!(outcome, conveyor::NackOutcome::DeadLettered);
    until(m::DLQ_DEPTH, &[t, d], 1.0).await;
    let dlq = config.dlq.topic_for(topic, "obs-d");
    assert_eq!(conveyor::dlq::depth(&*broker, &dlq).await.unwrap(), 1);
    assert_eq!(broker.redrive(&dlq, None).await.unwrap(), 1);
    // (The debugging recorder zeroes a gauge once read, so a 0 read back
    // proves nothing; the gauge's source says it.)
    assert_eq!(conveyor::dlq::depth(&*broker, &dlq).await.unwrap(), 0);

    // Stream mode: a second member joins, the first one's old commit is
    // fenced, and the group's rebalance is counted.
    let group = GroupConfig::stream();
    let a = broker
        .consumer("obs-s", &[topic], group.clone())
        .await
        .unwrap();
    let s = (m::GROUP, "obs-s");
    let polled = a.poll(10, Duration::from_secs(5)).await.unwrap();
    assert!(!polled.is_empty());
    let rebalances_before = value(m::REBALANCES, &[s]);
    let _b = broker.consumer("obs-s", &[topic], group).await.unwrap();
    // The rebalance reaches `a` at its next call; then a commit for the
    // partition it lost is fenced.
    let started = Instant::now();
    let lost = loop {
        let _ = a.poll(10, Duration::from_millis(100)).await.unwrap();
        let owned = a.assignment().await.unwrap();
        if let Some(m) = polled
            .iter()
            .find(|m| !owned.iter().any(|tp| tp.partition == m.partition))
        {
            break m.clone();
        }
        assert!(started.elapsed() < Duration::from_secs(60), "no rebalance");
    };
    let fenced = a.commit_message(&lost).await.unwrap_err();
    assert_eq!(fenced.kind(), ErrorKind::Fenced);
    assert_eq!(value(m::FENCED, &[(m::DESTINATION, topic), s]), 1.0);
    let started = Instant::now();
    while value(m::REBALANCES, &[s]) <= rebalances_before {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no rebalance counted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
