//! The handler runner: retries, dead letters, per-partition order in
//! stream mode across polls and rewinds, graceful shutdown, idempotency.

// Test code: a failed unwrap is a failed test, with its line.
#![allow(clippy::unwrap_used)]
use conveyor_core::prelude::*;
use conveyor_core::runner::{HandlerError, Idempotent, Runner, RunnerConfig};
use conveyor_core::{Broker, DlqPolicy, GroupConfig, Message, Record, RetryBackoff, TopicConfig};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

async fn broker_with(topic: &str, partitions: u32, n: u64) -> conveyor_memory::MemoryBroker {
    let broker = conveyor_memory::open_default();
    broker
        .create_topic(topic, TopicConfig::new(partitions))
        .await
        .unwrap();
    let producer = broker.producer().await.unwrap();
    let records = (0..n)
        .map(|i| Record::new(i.to_string()).with_key(format!("k{}", i % 13)))
        .collect();
    producer.send_batch(topic, records).await.unwrap();
    broker
}

fn number(m: &Message) -> u64 {
    std::str::from_utf8(&m.value).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_mode_retries_transient_failures_and_dead_letters_poison() {
    let broker = broker_with("jobs", 3, 200).await;
    let config = GroupConfig::queue()
        .with_retry_backoff(RetryBackoff::fixed(Duration::from_millis(5)))
        .with_dlq(DlqPolicy::new(3));
    let consumer = broker.consumer("workers", &["jobs"], config).await.unwrap();
    let done = Arc::new(Mutex::new(BTreeMap::<u64, u32>::new()));
    let handler = {
        let done = done.clone();
        move |m: Message| {
            let done = done.clone();
            async move {
                let n = number(&m);
                if n % 50 == 7 {
                    return Err(HandlerError::new(format!("poison {n}")));
                }
                if n.is_multiple_of(5) && m.attempt == 1 {
                    return Err(HandlerError::new("transient"));
                }
                *done.lock().unwrap().entry(n).or_insert(0) += 1;
                Ok(())
            }
        }
    };
    let stats = Runner::new(consumer, RunnerConfig::default().with_concurrency(8))
        .run_until_idle(handler, Duration::from_millis(300))
        .await
        .unwrap();
    let done = done.lock().unwrap().clone();
    let poison: Vec<u64> = (0..200).filter(|n| n % 50 == 7).collect();
    for n in 0..200 {
        if poison.contains(&n) {
            assert!(!done.contains_key(&n));
        } else {
            assert_eq!(done.get(&n), Some(&1), "message {n} handled once");
        }
    }
    assert_eq!(stats.succeeded, 200 - poison.len() as u64);
    // Each poison message failed 3 times, then went to the DLQ.
    let dlq = broker.describe_topic("jobs.workers.dlq").await.unwrap();
    assert_eq!(dlq.partitions[0].log_end, poison.len() as u64);
    let lag = broker.group_lag("workers").await.unwrap();
    assert_eq!(lag.total_lag(), 0, "everything settled: {lag:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_mode_keeps_partition_order_across_polls_and_rewinds() {
    let broker = broker_with("events", 4, 1000).await;
    let config = GroupConfig::stream()
        .with_retry_backoff(RetryBackoff::fixed(Duration::from_millis(2)))
        .with_dlq(DlqPolicy::new(10));
    let consumer = broker
        .consumer("ordered", &["events"], config)
        .await
        .unwrap();
    let seen = Arc::new(Mutex::new(HashMap::<u32, Vec<u64>>::new()));
    let handler = {
        let seen = seen.clone();
        move |m: Message| {
            let seen = seen.clone();
            async move {
                // Slow enough that later polls of the same partition
                // arrive while earlier lanes are still running.
                if m.offset % 10 == 3 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                if m.offset.is_multiple_of(7) && m.attempt == 1 {
                    return Err(HandlerError::new("try again"));
                }
                seen.lock()
                    .unwrap()
                    .entry(m.partition)
                    .or_default()
                    .push(m.offset);
                Ok(())
            }
        }
    };
    let config = RunnerConfig::default().with_concurrency(8).with_batch(16);
    Runner::new(consumer, config)
        .run_until_idle(handler, Duration::from_millis(300))
        .await
        .unwrap();
    let seen = seen.lock().unwrap().clone();
    let describe = broker.describe_topic("events").await.unwrap();
    for p in describe.partitions {
        let offsets = seen.get(&p.partition).cloned().unwrap_or_default();
        let expected: Vec<u64> = (0..p.log_end).collect();
        assert_eq!(
            offsets, expected,
            "partition {} handled in order, once",
            p.partition
        );
    }
    let lag = broker.group_lag("ordered").await.unwrap();
    assert_eq!(lag.total_lag(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_in_flight_handlers_and_settles_them() {
    let broker = broker_with("slow", 1, 20).await;
    let consumer = broker
        .consumer("slow", &["slow"], GroupConfig::queue())
        .await
        .unwrap();
    let started = Arc::new(AtomicU64::new(0));
    let finished = Arc::new(AtomicU64::new(0));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let handler = {
        let (started, finished) = (started.clone(), finished.clone());
        move |_m: Message| {
            let (started, finished) = (started.clone(), finished.clone());
            async move {
                started.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(50)).await;
                finished.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        }
    };
    let run = tokio::spawn(
        Runner::new(
            consumer,
            RunnerConfig::default().with_concurrency(4).with_batch(4),
        )
        .run(handler, async move {
            let _ = stop_rx.await;
        }),
    );
    while started.load(Ordering::SeqCst) == 0 {
        tokio::task::yield_now().await;
    }
    stop_tx.send(()).unwrap();
    let stats = run.await.unwrap().unwrap();
    let (s, f) = (
        started.load(Ordering::SeqCst),
        finished.load(Ordering::SeqCst),
    );
    assert_eq!(s, f, "every started handler finished before run returned");
    assert_eq!(stats.succeeded, f);
    assert!(f < 20, "stopped early ({f} of 20 handled)");
    let lag = broker.group_lag("slow").await.unwrap();
    assert_eq!(lag.total_lag(), 20 - f, "what was handled was acked");
    assert_eq!(lag.total_in_flight(), 0, "nothing left leased");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_handler_runs_once_per_event_id() {
    let broker = conveyor_memory::open_default();
    broker
        .create_topic("evts", TopicConfig::new(2))
        .await
        .unwrap();
    let producer = broker.producer().await.unwrap();
    // The same event twice (an upstream retry without idempotent produce).
    for id in ["a", "b", "a", "c", "b"] {
        producer
            .send("evts", Record::new(id).with_header("event-id", id))
            .await
            .unwrap();
    }
    let runs = Arc::new(Mutex::new(Vec::<String>::new()));
    let inner = {
        let runs = runs.clone();
        move |m: Message| {
            let runs = runs.clone();
            async move {
                runs.lock()
                    .unwrap()
                    .push(m.header_str("event-id").unwrap().to_string());
                Ok(())
            }
        }
    };
    let handler = Idempotent::new(
        broker.idempotency_store(),
        Duration::from_secs(60),
        |m: &Message| m.header_str("event-id").map(str::to_string),
        inner,
    );
    let duplicates = handler.duplicates();
    let consumer = broker
        .consumer("mailer", &["evts"], GroupConfig::queue())
        .await
        .unwrap();
    let stats = Runner::new(consumer, RunnerConfig::default())
        .run_until_idle(handler, Duration::from_millis(200))
        .await
        .unwrap();
    let mut runs = runs.lock().unwrap().clone();
    runs.sort();
    assert_eq!(runs, vec!["a", "b", "c"]);
    assert_eq!(duplicates.load(Ordering::Relaxed), 2);
    assert_eq!(stats.succeeded, 5, "duplicates are acked too");
}

/// The DLQ records of `topic` for `group` (dead-lettered at the first
/// failure by `DlqPolicy::new(1)`).
async fn dead_letters(broker: &conveyor_memory::MemoryBroker, dlq: &str) -> Vec<Message> {
    broker.fetch(dlq, 0, 0, 100).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_slower_than_the_visibility_timeout_runs_exactly_once() {
    let broker = broker_with("slow", 2, 6).await;
    let visibility = Duration::from_millis(300);
    let group = GroupConfig::queue()
        .with_visibility_timeout(visibility)
        .with_dlq(DlqPolicy::new(10));
    let consumer = broker
        .consumer("workers", &["slow"], group.clone())
        .await
        .unwrap();
    let runs = Arc::new(Mutex::new(HashMap::<(u32, u64), u32>::new()));
    let handler = {
        let runs = runs.clone();
        move |m: Message| {
            let runs = runs.clone();
            async move {
                *runs
                    .lock()
                    .unwrap()
                    .entry((m.partition, m.offset))
                    .or_default() += 1;
                // Well past the visibility timeout: without lease extension
                // (and with eager prefetch) the lease expires and the
                // message runs again.
                tokio::time::sleep(visibility * 3).await;
                Ok::<(), HandlerError>(())
            }
        }
    };
    // Two at a time, asking for up to 64 a poll: bounded prefetch leases
    // only the two that start.
    let config = RunnerConfig::default().with_concurrency(2).with_batch(64);
    let stats = Runner::new(consumer, config)
        .run_until_idle(handler, Duration::from_millis(200))
        .await
        .unwrap();
    let runs = runs.lock().unwrap().clone();
    assert_eq!(runs.len(), 6, "{runs:?}");
    assert!(runs.values().all(|n| *n == 1), "ran twice: {runs:?}");
    assert_eq!(stats.succeeded, 6);
    assert_eq!(stats.settle_refused, 0, "{stats:?}");
    assert_eq!(broker.group_lag("workers").await.unwrap().total_lag(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_handler_is_nacked_with_the_reason() {
    let broker = broker_with("stuck", 1, 1).await;
    let group = GroupConfig::queue().with_dlq(DlqPolicy::new(1));
    let consumer = broker
        .consumer("workers", &["stuck"], group.clone())
        .await
        .unwrap();
    let config = RunnerConfig::default().with_handler_timeout(Duration::from_millis(100));
    let stats = Runner::new(consumer, config)
        .run_until_idle(
            |_m: Message| async move {
                std::future::pending::<()>().await;
                Ok::<(), HandlerError>(())
            },
            Duration::from_millis(200),
        )
        .await
        .unwrap();
    assert_eq!(stats.failed, 1);
    let dead = dead_letters(&broker, "stuck.workers.dlq").await;
    assert_eq!(dead.len(), 1);
    assert_eq!(
        dead[0].header_str(conveyor_core::dlq::HEADER_ERROR),
        Some("handler timed out after 100 ms")
    );
}

#[tokio::test]
async fn question_mark_on_any_error_keeps_its_text_for_the_dlq() {
    let broker = conveyor_memory::open_default();
    broker
        .create_topic("events", TopicConfig::new(1))
        .await
        .unwrap();
    broker
        .producer()
        .await
        .unwrap()
        .send("events", Record::new("{not json"))
        .await
        .unwrap();
    let group = GroupConfig::queue().with_dlq(DlqPolicy::new(1));
    let consumer = broker
        .consumer("parse", &["events"], group.clone())
        .await
        .unwrap();
    let stats = Runner::new(consumer, RunnerConfig::default())
        .run_until_idle(
            |m: Message| async move {
                let _event: serde_json::Value = serde_json::from_slice(&m.value)?;
                Ok(())
            },
            Duration::from_millis(100),
        )
        .await
        .unwrap();
    assert_eq!(stats.failed, 1);
    let expected = serde_json::from_slice::<serde_json::Value>(b"{not json")
        .unwrap_err()
        .to_string();
    let dead = dead_letters(&broker, "events.parse.dlq").await;
    assert_eq!(
        dead[0].header_str(conveyor_core::dlq::HEADER_ERROR),
        Some(expected.as_str())
    );
    // The cause chain is kept: an error with a source shows both.
    let io = conveyor_core::Error::io("open /q/LOCK", std::io::Error::other("disk gone"));
    assert_eq!(
        HandlerError::from(io).reason,
        "i/o error: open /q/LOCK: disk gone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_limit_spaces_out_starts() {
    let broker = broker_with("paced", 1, 30).await;
    let consumer = broker
        .consumer("workers", &["paced"], GroupConfig::queue())
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let stats = Runner::new(
        consumer,
        RunnerConfig::default()
            .with_concurrency(8)
            .with_max_per_second(100),
    )
    .run_until_idle(
        |_m: Message| async move { Ok::<(), HandlerError>(()) },
        Duration::from_millis(100),
    )
    .await
    .unwrap();
    assert_eq!(stats.succeeded, 30);
    // 30 starts at 100/s with a burst of at most 100: the first 1 at once,
    // then one every 10 ms, so at least ~290 ms (idle time not counted).
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "{:?}",
        started.elapsed()
    );
}

/// A consumer whose `ack_batch` takes 20 ms (as a sync would) and counts
/// its calls and the messages in them.
struct SlowBatches {
    inner: Arc<dyn conveyor_core::Consumer>,
    calls: AtomicU64,
    acked: AtomicU64,
    singles: AtomicU64,
}

#[async_trait::async_trait]
impl conveyor_core::Consumer for SlowBatches {
    async fn poll(&self, max: usize, timeout: Duration) -> conveyor_core::Result<Vec<Message>> {
        self.inner.poll(max, timeout).await
    }
    async fn ack(&self, m: &Message) -> conveyor_core::Result<()> {
        self.singles.fetch_add(1, Ordering::Relaxed);
        self.inner.ack(m).await
    }
    async fn ack_batch(&self, ms: &[Message]) -> conveyor_core::Result<conveyor_core::BatchAck> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(20)).await;
        let outcome = self.inner.ack_batch(ms).await?;
        self.acked
            .fetch_add(outcome.acked as u64, Ordering::Relaxed);
        Ok(outcome)
    }
    async fn nack(
        &self,
        m: &Message,
        o: conveyor_core::NackOptions,
    ) -> conveyor_core::Result<conveyor_core::NackOutcome> {
        self.inner.nack(m, o).await
    }
    async fn extend(&self, m: &Message, by: Duration) -> conveyor_core::Result<()> {
        self.inner.extend(m, by).await
    }
    async fn commit(&self, t: &str, p: u32, o: u64) -> conveyor_core::Result<()> {
        self.inner.commit(t, p, o).await
    }
    async fn seek(&self, t: &str, p: u32, to: conveyor_core::SeekTo) -> conveyor_core::Result<()> {
        self.inner.seek(t, p, to).await
    }
    async fn assignment(&self) -> conveyor_core::Result<Vec<conveyor_core::TopicPartition>> {
        self.inner.assignment().await
    }
    async fn generation(&self) -> conveyor_core::Result<u64> {
        self.inner.generation().await
    }
    async fn close(&self) -> conveyor_core::Result<()> {
        self.inner.close().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_of_concurrent_handlers_share_ack_batch_calls() {
    let broker = broker_with("jobs", 4, 200).await;
    let inner = broker
        .consumer("workers", &["jobs"], GroupConfig::queue())
        .await
        .unwrap();
    let consumer = Arc::new(SlowBatches {
        inner,
        calls: AtomicU64::new(0),
        acked: AtomicU64::new(0),
        singles: AtomicU64::new(0),
    });
    let runner = Runner::new(
        consumer.clone(),
        RunnerConfig::default().with_concurrency(50).with_batch(50),
    );
    let stats = runner
        .run_until_idle(
            |_m: Message| async move { Ok::<(), HandlerError>(()) },
            Duration::from_millis(200),
        )
        .await
        .unwrap();
    assert_eq!(stats.succeeded, 200);
    assert_eq!(consumer.acked.load(Ordering::Relaxed), 200);
    assert_eq!(
        consumer.singles.load(Ordering::Relaxed),
        0,
        "acks go in batches"
    );
    let calls = consumer.calls.load(Ordering::Relaxed);
    eprintln!("{calls} ack_batch calls for 200 acks");
    // 50 handlers finish together: the first call takes what is there,
    // the rest wait 20 ms and go in one or two more.
    assert!(calls <= 20, "{calls} ack_batch calls for 200 acks");
    let lag = broker.group_lag("workers").await.unwrap();
    assert_eq!(lag.total_lag(), 0);
}

/// One message with idempotency key `evt-1` on a one-partition topic.
async fn one_event(topic: &str) -> conveyor_memory::MemoryBroker {
    let broker = conveyor_memory::open_default();
    broker
        .create_topic(topic, TopicConfig::new(1))
        .await
        .unwrap();
    broker
        .producer()
        .await
        .unwrap()
        .send(topic, Record::new("work").with_idempotency_key("evt-1"))
        .await
        .unwrap();
    broker
}

/// Wait until `done()` holds, checking every 5 ms; after 30 s (far more
/// than any of these waits needs) fail the test rather than hang.
async fn wait_until<F, Fut>(what: &str, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let waited = tokio::time::timeout(Duration::from_secs(30), async {
        while !done().await {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "timed out waiting for {what}");
}

/// How an attempt of [`unfinished_first`]'s handler ends.
#[derive(Clone, Copy)]
enum FirstAttempt {
    /// Never finishes (until dropped).
    Hangs,
    /// Panics.
    Panics,
}

/// An idempotent handler (keyed on the idempotency key) whose first
/// attempt does not finish as `first` says, and whose later attempts
/// succeed; `started` counts attempts, `completed` successful ones, and
/// `entered` is told when the first attempt is running.
fn unfinished_first(
    broker: &conveyor_memory::MemoryBroker,
    first: FirstAttempt,
    started: Arc<AtomicU64>,
    completed: Arc<AtomicU64>,
    entered: Arc<tokio::sync::Notify>,
) -> Idempotent<impl conveyor_core::runner::Handler> {
    let inner = move |_m: Message| {
        let (started, completed, entered) = (started.clone(), completed.clone(), entered.clone());
        async move {
            if started.fetch_add(1, Ordering::SeqCst) == 0 {
                entered.notify_one();
                match first {
                    FirstAttempt::Hangs => std::future::pending::<()>().await,
                    FirstAttempt::Panics => panic!("handler bug"),
                }
            }
            completed.fetch_add(1, Ordering::SeqCst);
            Ok::<(), HandlerError>(())
        }
    };
    Idempotent::by_idempotency_key(
        broker.idempotency_store(),
        Duration::from_secs(3600),
        "workers",
        inner,
    )
}

fn quick_retries() -> GroupConfig {
    GroupConfig::queue()
        .with_retry_backoff(RetryBackoff::none())
        .with_dlq(DlqPolicy::new(10))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_idempotent_handler_runs_again() {
    let broker = one_event("jobs").await;
    let (started, completed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let handler = unfinished_first(
        &broker,
        FirstAttempt::Hangs,
        started.clone(),
        completed.clone(),
        Arc::new(tokio::sync::Notify::new()),
    );
    let duplicates = handler.duplicates();
    let group = quick_retries();
    let consumer = broker
        .consumer("workers", &["jobs"], group.clone())
        .await
        .unwrap();
    let config = RunnerConfig::default().with_handler_timeout(Duration::from_millis(300));
    let stats = Runner::new(consumer, config)
        .run_until_idle(handler, Duration::from_millis(500))
        .await
        .unwrap();
    assert_eq!(
        completed.load(Ordering::SeqCst),
        1,
        "the retry ran: {stats:?}"
    );
    assert_eq!(started.load(Ordering::SeqCst), 2);
    assert_eq!(duplicates.load(Ordering::SeqCst), 0, "not skipped");
    assert_eq!((stats.succeeded, stats.failed), (1, 1));
    assert_eq!(broker.group_lag("workers").await.unwrap().total_lag(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicked_idempotent_handler_runs_again() {
    let broker = one_event("jobs").await;
    let (started, completed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let handler = unfinished_first(
        &broker,
        FirstAttempt::Panics,
        started.clone(),
        completed.clone(),
        Arc::new(tokio::sync::Notify::new()),
    );
    let duplicates = handler.duplicates();
    let group = quick_retries();
    let consumer = broker
        .consumer("workers", &["jobs"], group.clone())
        .await
        .unwrap();
    // The panic is a failure like an `Err`: nacked, and the runner goes on.
    let stats = Runner::new(consumer, RunnerConfig::default())
        .run_until_idle(handler, Duration::from_millis(300))
        .await
        .unwrap();
    assert_eq!(
        completed.load(Ordering::SeqCst),
        1,
        "the retry ran: {stats:?}"
    );
    assert_eq!(started.load(Ordering::SeqCst), 2);
    assert_eq!(duplicates.load(Ordering::SeqCst), 0, "not skipped");
    assert_eq!((stats.succeeded, stats.failed), (1, 1));
    assert_eq!(broker.group_lag("workers").await.unwrap().total_lag(), 0);
}

#[tokio::test]
async fn a_panic_is_nacked_with_its_text() {
    let broker = one_event("jobs").await;
    let group = GroupConfig::queue().with_dlq(DlqPolicy::new(1));
    let consumer = broker
        .consumer("workers", &["jobs"], group.clone())
        .await
        .unwrap();
    let stats = Runner::new(consumer, RunnerConfig::default())
        .run_until_idle(
            |m: Message| async move {
                let n: Option<u32> = std::str::from_utf8(&m.value).unwrap().parse().ok();
                let _ = n.expect("a numeric job");
                Ok::<(), HandlerError>(())
            },
            Duration::from_millis(200),
        )
        .await
        .unwrap();
    assert_eq!((stats.failed, stats.dead_lettered), (1, 1), "{stats:?}");
    let dead = dead_letters(&broker, "jobs.workers.dlq").await;
    assert_eq!(
        dead[0].header_str(conveyor_core::dlq::HEADER_ERROR),
        Some("handler panicked: a numeric job")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_idempotent_handler_future_forgets_the_event() {
    use conveyor_core::runner::Handler;
    let broker = one_event("jobs").await;
    let consumer = broker
        .consumer("workers", &["jobs"], quick_retries())
        .await
        .unwrap();
    let message = consumer
        .poll(1, Duration::from_secs(5))
        .await
        .unwrap()
        .remove(0);
    let (started, completed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let entered = Arc::new(tokio::sync::Notify::new());
    let handler = Arc::new(unfinished_first(
        &broker,
        FirstAttempt::Hangs,
        started.clone(),
        completed.clone(),
        entered.clone(),
    ));
    let running = tokio::spawn({
        let (handler, message) = (handler.clone(), message.clone());
        async move { handler.handle(message).await }
    });
    entered.notified().await;
    running.abort();
    assert!(running.await.unwrap_err().is_cancelled());
    // Run again (as a redelivery would): not skipped as a duplicate.
    handler.handle(message).await.unwrap();
    assert_eq!(completed.load(Ordering::SeqCst), 1);
    assert_eq!(handler.duplicates().load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotent_handler_stopped_with_its_runner_runs_again() {
    let broker = one_event("jobs").await;
    let (started, completed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let entered = Arc::new(tokio::sync::Notify::new());
    let group = quick_retries();
    let consumer = broker
        .consumer("workers", &["jobs"], group.clone())
        .await
        .unwrap();
    let handler = unfinished_first(
        &broker,
        FirstAttempt::Hangs,
        started.clone(),
        completed.clone(),
        entered.clone(),
    );
    // The service stops: its runner's future is dropped mid-handler (the
    // consumer goes with it, releasing the lease).
    let running = tokio::spawn(
        Runner::new(consumer, RunnerConfig::default()).run(handler, std::future::pending()),
    );
    entered.notified().await;
    running.abort();
    assert!(running.await.unwrap_err().is_cancelled());
    assert_eq!(completed.load(Ordering::SeqCst), 0);
    // The aborted tasks drop the last handle of the consumer, which
    // releases the lease.
    wait_until("the lease to be released", || async {
        broker.group_lag("workers").await.unwrap().total_in_flight() == 0
    })
    .await;
    // The next process handles the message.
    let consumer = broker
        .consumer("workers", &["jobs"], group.clone())
        .await
        .unwrap();
    let handler = unfinished_first(
        &broker,
        FirstAttempt::Hangs,
        started.clone(),
        completed.clone(),
        entered,
    );
    let duplicates = handler.duplicates();
    let stats = Runner::new(consumer, RunnerConfig::default())
        .run_until_idle(handler, Duration::from_millis(300))
        .await
        .unwrap();
    assert_eq!(completed.load(Ordering::SeqCst), 1, "{stats:?}");
    assert_eq!(duplicates.load(Ordering::SeqCst), 0, "not skipped");
    assert_eq!(broker.group_lag("workers").await.unwrap().total_lag(), 0);
}

#[test]
fn question_mark_works_on_anyhow_and_eyre_errors_with_their_context() {
    fn with_anyhow() -> Result<(), HandlerError> {
        use anyhow::Context;
        let _: u32 = "x".parse::<u32>().context("reading the count")?;
        Ok(())
    }
    fn with_eyre() -> Result<(), HandlerError> {
        use eyre::WrapErr;
        let _: u32 = "x".parse::<u32>().wrap_err("reading the count")?;
        Ok(())
    }
    fn with_text() -> Result<(), HandlerError> {
        Err("no recipient")?
    }
    let expected = "reading the count: invalid digit found in string";
    assert_eq!(with_anyhow().unwrap_err().reason, expected);
    assert_eq!(with_eyre().unwrap_err().reason, expected);
    assert_eq!(with_text().unwrap_err().reason, "no recipient");
    let permanent = HandlerError::permanent(anyhow::anyhow!("bad order"));
    assert!(permanent.permanent);
    assert_eq!(permanent.reason, "bad order");
}

/// A handler that counts its runs and fails every one permanently.
fn never_parses(runs: Arc<AtomicU64>) -> impl conveyor_core::runner::Handler {
    move |m: Message| {
        let runs = runs.clone();
        async move {
            runs.fetch_add(1, Ordering::SeqCst);
            let _n: u32 = std::str::from_utf8(&m.value)?
                .parse()
                .map_err(HandlerError::permanent)?;
            Ok(())
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_failure_goes_to_the_dlq_at_once_with_its_reason() {
    let broker = broker_with("orders", 1, 0).await;
    let producer = broker.producer().await.unwrap();
    producer
        .send(
            "orders",
            Record::new("not a number").with_idempotency_key("evt-7"),
        )
        .await
        .unwrap();
    producer.send("orders", Record::new("12")).await.unwrap();
    // Ten deliveries allowed, an hour apart: only a permanent failure
    // reaches the DLQ within the test.
    let group = GroupConfig::queue()
        .with_retry_backoff(RetryBackoff::fixed(Duration::from_secs(3600)))
        .with_dlq(DlqPolicy::new(10));
    let consumer = broker
        .consumer("billing", &["orders"], group.clone())
        .await
        .unwrap();
    let runs = Arc::new(AtomicU64::new(0));
    let stats = Runner::new(consumer, RunnerConfig::default())
        .with_dead_letters(Arc::new(broker.clone()), &group)
        .run_until_idle(never_parses(runs.clone()), Duration::from_millis(300))
        .await
        .unwrap();
    assert_eq!(runs.load(Ordering::SeqCst), 2, "each message ran once");
    assert_eq!(
        (stats.succeeded, stats.failed, stats.dead_lettered),
        (1, 1, 1),
        "{stats:?}"
    );
    let dead = dead_letters(&broker, "orders.billing.dlq").await;
    assert_eq!(dead.len(), 1);
    assert_eq!(&dead[0].value[..], b"not a number");
    assert_eq!(
        dead[0].header_str(conveyor_core::dlq::HEADER_ERROR),
        Some("invalid digit found in string")
    );
    assert_eq!(
        dead[0].header_str(conveyor_core::dlq::HEADER_ATTEMPTS),
        Some("1")
    );
    assert_eq!(
        dead[0].header_str(conveyor_core::dlq::HEADER_GROUP),
        Some("billing")
    );
    assert_eq!(dead[0].idempotency_key.as_deref(), Some("evt-7"));
    let lag = broker.group_lag("billing").await.unwrap();
    assert_eq!(lag.total_lag(), 0, "settled for the group: {lag:?}");
    // Redrive brings it back to the group, as for any dead letter.
    assert_eq!(broker.redrive("orders.billing.dlq", None).await.unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_failure_in_stream_mode_is_dead_lettered_and_the_partition_goes_on() {
    let broker = broker_with("orders", 1, 0).await;
    let producer = broker.producer().await.unwrap();
    for v in ["1", "two", "3"] {
        producer.send("orders", Record::new(v)).await.unwrap();
    }
    let group = GroupConfig::stream()
        .with_retry_backoff(RetryBackoff::fixed(Duration::from_secs(3600)))
        .with_dlq(DlqPolicy::new(10).with_topic("billing.dead"));
    let consumer = broker
        .consumer("billing", &["orders"], group.clone())
        .await
        .unwrap();
    let runs = Arc::new(AtomicU64::new(0));
    let stats = Runner::new(consumer, RunnerConfig::default())
        .with_dead_letters(Arc::new(broker.clone()), &group)
        .run_until_idle(never_parses(runs.clone()), Duration::from_millis(300))
        .await
        .unwrap();
    assert_eq!(runs.load(Ordering::SeqCst), 3);
    assert_eq!((stats.succeeded, stats.dead_lettered), (2, 1), "{stats:?}");
    let dead = dead_letters(&broker, "billing.dead").await;
    assert_eq!(dead.len(), 1);
    assert_eq!(&dead[0].value[..], b"two");
    assert_eq!(broker.group_lag("billing").await.unwrap().total_lag(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_dlq_a_permanent_failure_is_retried_and_counted_when_dead_lettered() {
    let broker = broker_with("orders", 1, 0).await;
    let producer = broker.producer().await.unwrap();
    producer.send("orders", Record::new("nope")).await.unwrap();
    let group = GroupConfig::queue()
        .with_retry_backoff(RetryBackoff::none())
        .with_dlq(DlqPolicy::new(3));
    let consumer = broker
        .consumer("billing", &["orders"], group.clone())
        .await
        .unwrap();
    let runs = Arc::new(AtomicU64::new(0));
    let stats = Runner::new(consumer, RunnerConfig::default())
        .run_until_idle(never_parses(runs.clone()), Duration::from_millis(300))
        .await
        .unwrap();
    assert_eq!(runs.load(Ordering::SeqCst), 3, "retried as usual");
    assert_eq!((stats.failed, stats.dead_lettered), (3, 1), "{stats:?}");
    assert_eq!(dead_letters(&broker, "orders.billing.dlq").await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_stats_are_readable_while_the_runner_runs() {
    let broker = broker_with("jobs", 1, 3).await;
    let consumer = broker
        .consumer("workers", &["jobs"], GroupConfig::stream())
        .await
        .unwrap();
    let release = Arc::new(tokio::sync::Notify::new());
    let handler = {
        let release = release.clone();
        move |m: Message| {
            let release = release.clone();
            async move {
                // The last message waits until the test has seen the
                // first two counted.
                if number(&m) == 2 {
                    release.notified().await;
                }
                Ok::<(), HandlerError>(())
            }
        }
    };
    let stop = conveyor_core::runner::CancellationToken::new();
    let runner = Runner::new(consumer, RunnerConfig::default());
    let stats = runner.stats();
    let run = tokio::spawn(runner.run_until_cancelled(handler, stop.clone()));
    wait_until("two handled", || async { stats.snapshot().succeeded >= 2 }).await;
    assert_eq!(stats.snapshot().succeeded, 2, "the third is still running");
    assert!(!run.is_finished());
    release.notify_one();
    wait_until("three handled", || async {
        stats.snapshot().succeeded >= 3
    })
    .await;
    stop.cancel();
    let last = run.await.unwrap().unwrap();
    assert_eq!(last, stats.snapshot());
    assert_eq!(last.succeeded, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_cancellation_token_stops_several_runners_after_their_handlers_finish() {
    let broker = broker_with("orders", 2, 40).await;
    let stop = conveyor_core::runner::CancellationToken::new();
    let started = Arc::new(AtomicU64::new(0));
    let finished = Arc::new(AtomicU64::new(0));
    let mut runs = Vec::new();
    for group in ["email", "sms", "push"] {
        let consumer = broker
            .consumer(group, &["orders"], GroupConfig::queue())
            .await
            .unwrap();
        let handler = {
            let (started, finished) = (started.clone(), finished.clone());
            move |_m: Message| {
                let (started, finished) = (started.clone(), finished.clone());
                async move {
                    started.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    finished.fetch_add(1, Ordering::SeqCst);
                    Ok::<(), HandlerError>(())
                }
            }
        };
        let runner = Runner::new(consumer, RunnerConfig::default().with_concurrency(2));
        runs.push(tokio::spawn(
            runner.run_until_cancelled(handler, stop.child_token()),
        ));
    }
    wait_until("three handlers started", || async {
        started.load(Ordering::SeqCst) >= 3
    })
    .await;
    stop.cancel();
    let mut succeeded = 0;
    for run in runs {
        succeeded += run.await.unwrap().unwrap().succeeded;
    }
    assert_eq!(
        started.load(Ordering::SeqCst),
        finished.load(Ordering::SeqCst)
    );
    assert_eq!(succeeded, finished.load(Ordering::SeqCst));
    assert!(succeeded < 120, "stopped early ({succeeded} of 120)");
    let mut lag = 0;
    for group in ["email", "sms", "push"] {
        let l = broker.group_lag(group).await.unwrap();
        assert_eq!(l.total_in_flight(), 0, "{group}: nothing left leased");
        lag += l.total_lag();
    }
    assert_eq!(lag, 120 - succeeded, "what was handled was acked");
}

/// A consumer whose polls fail `Unavailable` until `down_until` (a
/// server backend's outage), counting the failed polls.
struct Outage {
    inner: Arc<dyn conveyor_core::Consumer>,
    down_until: tokio::time::Instant,
    failed_polls: AtomicU64,
}

#[async_trait::async_trait]
impl conveyor_core::Consumer for Outage {
    async fn poll(&self, max: usize, timeout: Duration) -> conveyor_core::Result<Vec<Message>> {
        if tokio::time::Instant::now() < self.down_until {
            self.failed_polls.fetch_add(1, Ordering::SeqCst);
            return Err(conveyor_core::Error::new(
                conveyor_core::ErrorKind::Unavailable,
                "server at 10.0.0.7:6379: connection refused",
            ));
        }
        self.inner.poll(max, timeout).await
    }
    async fn ack(&self, m: &Message) -> conveyor_core::Result<()> {
        self.inner.ack(m).await
    }
    async fn nack(
        &self,
        m: &Message,
        o: conveyor_core::NackOptions,
    ) -> conveyor_core::Result<conveyor_core::NackOutcome> {
        self.inner.nack(m, o).await
    }
    async fn extend(&self, m: &Message, by: Duration) -> conveyor_core::Result<()> {
        self.inner.extend(m, by).await
    }
    async fn commit(&self, t: &str, p: u32, o: u64) -> conveyor_core::Result<()> {
        self.inner.commit(t, p, o).await
    }
    async fn seek(&self, t: &str, p: u32, to: conveyor_core::SeekTo) -> conveyor_core::Result<()> {
        self.inner.seek(t, p, to).await
    }
    async fn assignment(&self) -> conveyor_core::Result<Vec<conveyor_core::TopicPartition>> {
        self.inner.assignment().await
    }
    async fn generation(&self) -> conveyor_core::Result<u64> {
        self.inner.generation().await
    }
    async fn close(&self) -> conveyor_core::Result<()> {
        self.inner.close().await
    }
}

/// Counts the runner's log events by level.
#[derive(Default)]
struct RunnerEvents {
    warn: AtomicU64,
    info: AtomicU64,
}

impl tracing::Subscriber for RunnerEvents {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        let meta = event.metadata();
        if !meta.target().starts_with("conveyor_core::runner") {
            return;
        }
        match *meta.level() {
            tracing::Level::WARN => self.warn.fetch_add(1, Ordering::SeqCst),
            tracing::Level::INFO => self.info.fetch_add(1, Ordering::SeqCst),
            _ => 0,
        };
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

// Paused time: the 4 s outage passes in no real time, and the count of
// polls does not depend on the machine's speed.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn an_outage_is_waited_out_with_growing_delays_and_logged_once_each_way() {
    let events = Arc::new(RunnerEvents::default());
    let _log = tracing::dispatcher::set_default(&tracing::Dispatch::from(events.clone()));
    let broker = broker_with("jobs", 1, 5).await;
    let inner = broker
        .consumer("workers", &["jobs"], GroupConfig::queue())
        .await
        .unwrap();
    let outage = Duration::from_secs(4);
    let consumer = Arc::new(Outage {
        inner,
        down_until: tokio::time::Instant::now() + outage,
        failed_polls: AtomicU64::new(0),
    });
    let stop = conveyor_core::runner::CancellationToken::new();
    let runner = Runner::new(consumer.clone(), RunnerConfig::default());
    let stats = runner.stats();
    let run = tokio::spawn(runner.run_until_cancelled(
        |_m: Message| async { Ok::<(), HandlerError>(()) },
        stop.clone(),
    ));
    wait_until("the five handled", || async {
        stats.snapshot().succeeded >= 5
    })
    .await;
    stop.cancel();
    run.await.unwrap().unwrap();
    let failed = consumer.failed_polls.load(Ordering::SeqCst);
    // 100 ms doubling to 10 s, jittered to half or more: 100, 200, 400,
    // 800, 1600, 3200 ms at most... about 6 to 9 polls in 4 s (a fixed
    // 100 ms would make 40).
    assert!((4..=12).contains(&failed), "{failed} polls in a 4 s outage");
    assert_eq!(
        events.warn.load(Ordering::SeqCst),
        1,
        "one WARN as it starts"
    );
    assert_eq!(events.info.load(Ordering::SeqCst), 1, "one INFO as it ends");
}

/// An idempotency store that, like a server's, answers `forget` only
/// after a round trip (it yields first), and counts the forgets done.
struct RoundTrips {
    inner: Arc<dyn IdempotencyStore>,
    forgotten: AtomicU64,
}

#[async_trait::async_trait]
impl IdempotencyStore for RoundTrips {
    async fn first_seen(&self, key: &str, ttl: Duration) -> conveyor_core::Result<bool> {
        self.inner.first_seen(key, ttl).await
    }
    async fn forget(&self, key: &str) -> conveyor_core::Result<()> {
        tokio::task::yield_now().await;
        self.inner.forget(key).await?;
        self.forgotten.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_handler_forgets_through_a_store_that_must_wait() {
    use conveyor_core::runner::Handler;
    let broker = one_event("jobs").await;
    let consumer = broker
        .consumer("workers", &["jobs"], quick_retries())
        .await
        .unwrap();
    let message = consumer
        .poll(1, Duration::from_secs(5))
        .await
        .unwrap()
        .remove(0);
    let store = Arc::new(RoundTrips {
        inner: broker.idempotency_store(),
        forgotten: AtomicU64::new(0),
    });
    let entered = Arc::new(tokio::sync::Notify::new());
    let completed = Arc::new(AtomicU64::new(0));
    let inner = {
        let (entered, completed) = (entered.clone(), completed.clone());
        let first = Arc::new(AtomicU64::new(0));
        move |_m: Message| {
            let (entered, completed, first) = (entered.clone(), completed.clone(), first.clone());
            async move {
                if first.fetch_add(1, Ordering::SeqCst) == 0 {
                    entered.notify_one();
                    std::future::pending::<()>().await;
                }
                completed.fetch_add(1, Ordering::SeqCst);
                Ok::<(), HandlerError>(())
            }
        }
    };
    let handler = Arc::new(Idempotent::by_idempotency_key(
        store.clone(),
        Duration::from_secs(3600),
        "workers",
        inner,
    ));
    let running = tokio::spawn({
        let (handler, message) = (handler.clone(), message.clone());
        async move { handler.handle(message).await }
    });
    entered.notified().await;
    running.abort();
    assert!(running.await.unwrap_err().is_cancelled());
    // The forget went to a task of its own; wait for it.
    wait_until("the event id to be forgotten", || async {
        store.forgotten.load(Ordering::SeqCst) > 0
    })
    .await;
    handler.handle(message).await.unwrap();
    assert_eq!(completed.load(Ordering::SeqCst), 1);
    assert_eq!(handler.duplicates().load(Ordering::SeqCst), 0);
}

/// Issue 22: the runner's lease extension has one source, the group's
/// stored settings. A consumer joined with the 30 s default, the group
/// then altered to 300 ms: a runner built with the defaults extends by
/// 300 ms (every 100 ms), so a 1 s handler runs once; extending by the
/// 30 s the consumer joined with (every 10 s) would let each lease expire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runner_extends_leases_by_the_groups_stored_timeout() {
    let broker = broker_with("altered", 1, 3).await;
    let consumer = broker
        .consumer("workers", &["altered"], GroupConfig::queue())
        .await
        .unwrap();
    let visibility = Duration::from_millis(300);
    broker
        .alter_group(
            "workers",
            conveyor_core::GroupChanges::new().with_visibility_timeout(visibility),
        )
        .await
        .unwrap();
    assert_eq!(
        consumer.group_config().await.unwrap().visibility_timeout,
        visibility
    );
    let runs = Arc::new(Mutex::new(HashMap::<u64, u32>::new()));
    let handler = {
        let runs = runs.clone();
        move |m: Message| {
            let runs = runs.clone();
            async move {
                *runs.lock().unwrap().entry(m.offset).or_default() += 1;
                tokio::time::sleep(visibility * 3).await;
                Ok::<(), HandlerError>(())
            }
        }
    };
    let stats = Runner::new(consumer, RunnerConfig::default().with_concurrency(3))
        .run_until_idle(handler, Duration::from_millis(200))
        .await
        .unwrap();
    let runs = runs.lock().unwrap().clone();
    assert_eq!(runs.len(), 3, "{runs:?}");
    assert!(runs.values().all(|n| *n == 1), "ran twice: {runs:?}");
    assert_eq!(stats.succeeded, 3);
    assert_eq!(stats.settle_refused, 0, "{stats:?}");
}

/// Issue 22: a runner's permanent failures go to the group's DLQ topic as
/// stored now, not to the one in the config given to `with_dead_letters`
/// (the DLQ topic was altered after the consumer joined).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_failures_go_to_the_groups_stored_dlq_topic() {
    let broker = broker_with("orders", 1, 0).await;
    broker
        .producer()
        .await
        .unwrap()
        .send("orders", Record::new("not a number"))
        .await
        .unwrap();
    let group = GroupConfig::queue().with_dlq(DlqPolicy::new(10));
    let consumer = broker
        .consumer("billing", &["orders"], group.clone())
        .await
        .unwrap();
    broker
        .alter_group(
            "billing",
            conveyor_core::GroupChanges::new().with_dlq_topic(Some("billing.dead".into())),
        )
        .await
        .unwrap();
    let runs = Arc::new(AtomicU64::new(0));
    let stats = Runner::new(consumer, RunnerConfig::default())
        .with_dead_letters(Arc::new(broker.clone()), &group)
        .run_until_idle(never_parses(runs.clone()), Duration::from_millis(300))
        .await
        .unwrap();
    assert_eq!(stats.dead_lettered, 1, "{stats:?}");
    assert_eq!(dead_letters(&broker, "billing.dead").await.len(), 1);
    assert!(broker
        .fetch("orders.billing.dlq", 0, 0, 10)
        .await
        .is_err_and(|e| e.kind() == conveyor_core::ErrorKind::TopicNotFound));
}
