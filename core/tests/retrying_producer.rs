//! `RetryingProducer`: sends through an outage, once each with
//! idempotency keys; only `Unavailable` is retried, and only so often.

// Test code: a failed unwrap is a failed test, with its line.
#![allow(clippy::unwrap_used)]
use conveyor_core::prelude::*;
use conveyor_core::{
    Error, ErrorKind, Receipt, RetryBackoff, RetryingProducer, SendRetry, TopicConfig,
};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A producer whose first `failures` calls fail `Unavailable` after
/// storing the records anyway (the answer was lost on the way back).
struct LostAnswers {
    inner: Arc<dyn Producer>,
    failures: u32,
    calls: AtomicU32,
}

#[async_trait::async_trait]
impl Producer for LostAnswers {
    async fn send_batch(
        &self,
        topic: &str,
        records: Vec<Record>,
    ) -> conveyor_core::Result<Vec<Receipt>> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst);
        let receipts = self.inner.send_batch(topic, records).await?;
        if call < self.failures {
            return Err(Error::new(
                ErrorKind::Unavailable,
                "server at 10.0.0.7:5432: connection reset",
            ));
        }
        Ok(receipts)
    }
    async fn flush(&self) -> conveyor_core::Result<()> {
        self.inner.flush().await
    }
}

async fn setup(failures: u32) -> (conveyor_memory::MemoryBroker, Arc<LostAnswers>) {
    let broker = conveyor_memory::open_default();
    broker
        .create_topic("orders", TopicConfig::new(2))
        .await
        .unwrap();
    let flaky = Arc::new(LostAnswers {
        inner: broker.producer().await.unwrap(),
        failures,
        calls: AtomicU32::new(0),
    });
    (broker, flaky)
}

async fn stored(broker: &conveyor_memory::MemoryBroker) -> u64 {
    let d = broker.describe_topic("orders").await.unwrap();
    d.partitions.iter().map(|p| p.log_end).sum()
}

// Paused time: the delays pass in no real time.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn sends_through_an_outage_and_stores_each_keyed_record_once() {
    let (broker, flaky) = setup(3).await;
    let producer = RetryingProducer::wrap(flaky.clone(), SendRetry::default());
    let started = tokio::time::Instant::now();
    let receipt = producer
        .send(
            "orders",
            Record::new("placed").with_idempotency_key("evt-1"),
        )
        .await
        .unwrap();
    assert_eq!(
        flaky.calls.load(Ordering::SeqCst),
        4,
        "3 failures, then success"
    );
    assert_eq!(stored(&broker).await, 1, "stored once: {receipt:?}");
    // 100, 200, 400 ms, each jittered to half or more.
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(350) && waited <= Duration::from_millis(700),
        "{waited:?}"
    );
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn gives_up_after_max_attempts_with_the_last_error() {
    let (_broker, flaky) = setup(u32::MAX).await;
    let retry = SendRetry::default()
        .with_max_attempts(3)
        .with_backoff(RetryBackoff::fixed(Duration::from_millis(10)));
    let producer = RetryingProducer::wrap(flaky.clone(), retry);
    let e = producer
        .send("orders", Record::new("placed"))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable);
    assert_eq!(flaky.calls.load(Ordering::SeqCst), 3);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn other_errors_are_not_retried() {
    let (_broker, flaky) = setup(0).await;
    let producer = RetryingProducer::wrap(flaky.clone(), SendRetry::default());
    let e = producer
        .send("no-such-topic", Record::new("placed"))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::TopicNotFound);
    assert_eq!(flaky.calls.load(Ordering::SeqCst), 1);
}
