//! The member-process harness (`members`) end to end, against a backend
//! that does *not* share groups across processes: every process gets its
//! own memory broker. The harness must run its whole protocol (spawn,
//! `READY`, produce, park, SIGKILL, settle, `STOP`/`BYE`, parse) and then
//! fail the run for the right reason: the three members each own every
//! partition in generation 1 (stream mode) and each hold the same leases
//! (queue mode).
//!
//! A shared backend cannot be had here, so two stand-ins make the run get
//! that far: each child's broker is opened with the topic already filled
//! (the parent's records never reach it), and the parent's broker is
//! drained by an in-process consumer of the group on a thread of its own,
//! so the parent sees the group settle. The passing path needs a real
//! server backend (`backends/postgres`).

// Test code: a failed unwrap is a failed test, with its line.
#![allow(clippy::unwrap_used)]

use conveyor_conformance::members;
use conveyor_core::prelude::*;
use conveyor_core::{Broker, GroupConfig, Record, Result, TopicConfig};
use futures::future::BoxFuture;
use std::sync::Arc;
use std::time::Duration;

/// The harness's names (see the `members` module docs).
const TOPIC: &str = "members";
const GROUP: &str = "members";

fn open(namespace: String) -> BoxFuture<'static, Result<Arc<dyn Broker>>> {
    Box::pin(async move {
        if std::env::var("CONVEYOR_MEMBERS_CHILD").is_ok() {
            let broker = Arc::new(conveyor_memory::open_default()) as Arc<dyn Broker>;
            broker.create_topic(TOPIC, TopicConfig::new(4)).await?;
            let producer = broker.producer().await?;
            let records = (0..300u64)
                .map(|i| Record::new(format!("members-{i}")).with_partition((i % 4) as u32))
                .collect();
            producer.send_batch(TOPIC, records).await?;
            return Ok(broker);
        }
        let queue = namespace.starts_with("cm_queue_");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let broker = Arc::new(conveyor_memory::open_default()) as Arc<dyn Broker>;
                tx.send(broker.clone()).unwrap();
                settle(broker, queue).await;
            });
        });
        Ok(rx.recv().unwrap())
    })
}

/// Consume the parent's group until its broker is closed.
async fn settle(broker: Arc<dyn Broker>, queue: bool) {
    let config = if queue {
        GroupConfig::queue()
    } else {
        GroupConfig::stream()
    };
    let consumer = loop {
        // The parent creates the topic after opening.
        match broker.consumer(GROUP, &[TOPIC], config.clone()).await {
            Ok(c) => break c,
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    };
    while let Ok(batch) = consumer.poll(100, Duration::from_millis(50)).await {
        let settled = if queue {
            consumer.ack_batch(&batch).await.map(|_| ())
        } else {
            consumer.commit_batch(&batch).await
        };
        if settled.is_err() {
            return;
        }
    }
}

fn cleanup(_namespace: String) -> BoxFuture<'static, ()> {
    Box::pin(async {})
}

#[test]
fn member_child() {
    members::member_child(open);
}

#[test]
#[should_panic(expected = "owned by members")]
fn stream_mode_members_that_share_nothing_fail() {
    members::stream_mode_survives_sigkill(open, cleanup);
}

#[test]
#[should_panic(expected = "one lease twice")]
fn queue_mode_members_that_share_nothing_fail() {
    members::queue_mode_survives_sigkill(open, cleanup);
}
