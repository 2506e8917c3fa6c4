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
    let config = RunnerConfig::for_group(&group)
        .with_concurrency(2)
        .with_batch(64);
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
    let config = RunnerConfig::for_group(&group).with_handler_timeout(Duration::from_millis(100));
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
    let stats = Runner::new(consumer, RunnerConfig::for_group(&group))
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
    let config = RunnerConfig::for_group(&group).with_handler_timeout(Duration::from_millis(300));
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
    let group = quick_retries();
    let run = |handler| {
        let broker = broker.clone();
        let group = group.clone();
        async move {
            let consumer = broker
                .consumer("workers", &["jobs"], group.clone())
                .await
                .unwrap();
            Runner::new(consumer, RunnerConfig::for_group(&group))
                .run_until_idle(handler, Duration::from_millis(300))
                .await
        }
    };
    let entered = Arc::new(tokio::sync::Notify::new());
    let handler = unfinished_first(
        &broker,
        FirstAttempt::Panics,
        started.clone(),
        completed.clone(),
        entered.clone(),
    );
    let duplicates = handler.duplicates();
    // The panic ends the run (its consumer leaves, releasing the lease)...
    assert!(run(handler).await.is_err());
    assert_eq!(completed.load(Ordering::SeqCst), 0);
    // ... and the next run handles the message.
    let handler = unfinished_first(
        &broker,
        FirstAttempt::Panics,
        started.clone(),
        completed.clone(),
        entered,
    );
    let stats = run(handler).await.unwrap();
    assert_eq!(completed.load(Ordering::SeqCst), 1, "{stats:?}");
    assert_eq!(duplicates.load(Ordering::SeqCst), 0, "not skipped");
    assert_eq!(broker.group_lag("workers").await.unwrap().total_lag(), 0);
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
        Runner::new(consumer, RunnerConfig::for_group(&group)).run(handler, std::future::pending()),
    );
    entered.notified().await;
    running.abort();
    assert!(running.await.unwrap_err().is_cancelled());
    assert_eq!(completed.load(Ordering::SeqCst), 0);
    // The aborted tasks drop the last handle of the consumer, which
    // releases the lease.
    while broker.group_lag("workers").await.unwrap().total_in_flight() > 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
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
    let stats = Runner::new(consumer, RunnerConfig::for_group(&group))
        .run_until_idle(handler, Duration::from_millis(300))
        .await
        .unwrap();
    assert_eq!(completed.load(Ordering::SeqCst), 1, "{stats:?}");
    assert_eq!(duplicates.load(Ordering::SeqCst), 0, "not skipped");
    assert_eq!(broker.group_lag("workers").await.unwrap().total_lag(), 0);
}
