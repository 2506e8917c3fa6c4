//! The engine's error paths, driven by [`FaultyStorage`]: a storage call
//! fails, the caller hears of it, and nothing the contract promises is
//! broken (no acknowledged record lost, no committed offset going back,
//! no message dropped on the way to the DLQ, `send_batch` atomic per
//! partition).
//!
//! Two stores: the memory storage reported as persistent (so the engine
//! writes its state through `put_state`), and the mmap segment log, where
//! "restart" is either a clean close and reopen or dropping every handle
//! without closing (what a killed process leaves: nothing flushed by
//! `close`).

use conveyor_conformance::faulty::{Fault, FaultyStorage};
use conveyor_conformance::{expect_kind, poll_exactly, poll_n, WAIT};
use conveyor_core::backend::{Engine, LogStorage};
use conveyor_core::prelude::*;
use conveyor_core::NackOptions;
use conveyor_core::{
    Broker, BrokerOptions, DlqPolicy, ErrorKind, GroupConfig, NackOutcome, Record, Result,
    RetryBackoff, TopicConfig,
};
use conveyor_memory::MemoryStorage;
use conveyor_mmap::{MmapOptions, MmapStorage};
use std::sync::Arc;
use std::time::Duration;

type MemoryEngine = Engine<FaultyStorage<MemoryStorage>>;
type MmapEngine = Engine<FaultyStorage<MmapStorage>>;

/// The memory storage, reported as persistent so state writes happen.
fn memory() -> MemoryEngine {
    let storage = FaultyStorage::new(MemoryStorage::default()).with_persistent(true);
    Engine::fresh(storage, BrokerOptions::default())
}

/// A directory holding an mmap store, opened as often as a test likes.
struct Disk(tempfile::TempDir);

impl Disk {
    fn new() -> Self {
        Disk(tempfile::tempdir().expect("temporary directory"))
    }

    async fn open(&self) -> Result<MmapEngine> {
        let storage = MmapStorage::open(self.0.path(), MmapOptions::default())?;
        Engine::open(FaultyStorage::new(storage), BrokerOptions::default()).await
    }
}

fn stream_cfg() -> GroupConfig {
    GroupConfig::stream().with_retry_backoff(RetryBackoff::none())
}

fn queue_cfg() -> GroupConfig {
    GroupConfig::queue()
        .with_visibility_timeout(Duration::from_secs(30))
        .with_retry_backoff(RetryBackoff::none())
}

async fn send_n(broker: &dyn Broker, topic: &str, n: usize) -> Result<()> {
    let records = (0..n).map(|i| Record::new(format!("m{i}"))).collect();
    broker.producer().await?.send_batch(topic, records).await?;
    Ok(())
}

/// Two records per partition 0..3, interleaved, optionally with
/// idempotency keys.
fn spread_batch(idempotent: bool) -> Vec<Record> {
    (0..6u32)
        .map(|i| {
            let r = Record::new(format!("r{i}")).with_partition(i % 3);
            if idempotent {
                r.with_idempotency_key(format!("k{i}"))
            } else {
                r
            }
        })
        .collect()
}

async fn log_ends(broker: &dyn Broker, topic: &str) -> Result<Vec<u64>> {
    let d = broker.describe_topic(topic).await?;
    Ok(d.partitions.iter().map(|p| p.log_end).collect())
}

async fn committed(broker: &dyn Broker, group: &str, partition: u32) -> Result<u64> {
    let lag = broker.group_lag(group).await?;
    Ok(lag
        .partitions
        .iter()
        .find(|p| p.partition == partition)
        .map_or(0, |p| p.committed))
}

/// "`send_batch` appends the records that go to one partition contiguously
/// and atomically (all or none)": the append of partition 1 fails; the
/// caller gets the error and no receipt, partition 1 holds none of its
/// records, and every other partition holds all of its records or none.
#[tokio::test]
async fn failed_append_stores_none_of_that_partition() -> Result<()> {
    let broker = memory();
    broker.create_topic("spread", TopicConfig::new(3)).await?;
    // Appends go out per partition in partition order: the 2nd is partition 1.
    broker.storage().fail_append(Fault::nth(2));
    let producer = broker.producer().await?;
    let err = expect_kind(
        producer.send_batch("spread", spread_batch(false)).await,
        ErrorKind::Io,
    );
    assert!(err.message().contains("spread`/1"), "{err}");
    let ends = log_ends(&broker, "spread").await?;
    assert_eq!(ends[1], 0, "the failed partition stored records: {ends:?}");
    assert!(
        ends.iter().all(|e| *e == 0 || *e == 2),
        "half a partition: {ends:?}"
    );
    // The storage works again: the same batch goes through whole.
    broker.storage().heal();
    let receipts = producer.send_batch("spread", spread_batch(false)).await?;
    assert_eq!(receipts.len(), 6);
    let before = ends;
    let after = log_ends(&broker, "spread").await?;
    for p in 0..3 {
        assert_eq!(
            after[p],
            before[p] + 2,
            "partition {p}: {before:?} -> {after:?}"
        );
    }
    Ok(())
}

/// "a record with an idempotency key that was already appended to the same
/// partition within the topic's dedup window is not appended again": a
/// batch whose append failed on partition 1 after partition 0's succeeded
/// is retried whole (what a caller does with an error); partition 0's
/// records are already there and must not be appended twice.
#[tokio::test]

async fn failed_batch_retry_does_not_duplicate_idempotent_records() -> Result<()> {
    let broker = memory();
    broker.create_topic("retry", TopicConfig::new(3)).await?;
    broker.storage().fail_append(Fault::nth(2));
    let producer = broker.producer().await?;
    expect_kind(
        producer.send_batch("retry", spread_batch(true)).await,
        ErrorKind::Io,
    );
    broker.storage().heal();
    let receipts = producer.send_batch("retry", spread_batch(true)).await?;
    let ends = log_ends(&broker, "retry").await?;
    assert_eq!(ends, vec![2, 2, 2], "records appended twice: {receipts:?}");
    Ok(())
}

/// The single-partition form of the case above: a failed idempotent send,
/// retried, appends exactly once.
#[tokio::test]
async fn failed_idempotent_send_retried_appends_once() -> Result<()> {
    let broker = memory();
    broker.create_topic("once", TopicConfig::new(1)).await?;
    let producer = broker.producer().await?;
    broker.storage().fail_append(Fault::nth(1));
    let record = || Record::new("v").with_idempotency_key("only");
    expect_kind(producer.send("once", record()).await, ErrorKind::Io);
    assert_eq!(log_ends(&broker, "once").await?, vec![0]);
    let first = producer.send("once", record()).await?;
    let again = producer.send("once", record()).await?;
    assert_eq!((first, log_ends(&broker, "once").await?), (again, vec![1]));
    Ok(())
}

/// "`commit` is explicit and cumulative. After a restart …, delivery resumes
/// at the committed offset": a commit whose state write fails returns the
/// error; after a crash the committed offset is the last one written (5),
/// never below it, and delivery resumes there (at-least-once).
#[tokio::test]
async fn failed_commit_write_then_crash_resumes_at_last_written() -> Result<()> {
    let disk = Disk::new();
    {
        let broker = disk.open().await?;
        broker.create_topic("c", TopicConfig::new(1)).await?;
        send_n(&broker, "c", 10).await?;
        let c = broker.consumer("g", &["c"], stream_cfg()).await?;
        poll_exactly(c.as_ref(), 10, Duration::ZERO).await?;
        c.commit("c", 0, 5).await?;
        broker.storage().fail_put_state(Fault::nth(1));
        expect_kind(c.commit("c", 0, 8).await, ErrorKind::Io);
        let seen = committed(&broker, "g", 0).await?;
        assert!(
            seen == 5 || seen == 8,
            "committed {seen} after a failed commit"
        );
        // Every handle dropped, nothing closed: a killed process.
    }
    let broker = disk.open().await?;
    assert_eq!(committed(&broker, "g", 0).await?, 5);
    let c = broker.consumer("g", &["c"], stream_cfg()).await?;
    let got = poll_n(c.as_ref(), 1, WAIT).await?;
    assert_eq!(got.first().map(|m| m.offset), Some(5));
    broker.close().await
}

/// A failed commit write is not forgotten: once the storage works again,
/// the next state write (here the close) stores the offset `group_lag`
/// showed, so what a reopened broker reports never goes below what the
/// running one reported.
#[tokio::test]
async fn failed_commit_write_then_close_keeps_reported_offset() -> Result<()> {
    let disk = Disk::new();
    let reported = {
        let broker = disk.open().await?;
        broker.create_topic("c", TopicConfig::new(1)).await?;
        send_n(&broker, "c", 10).await?;
        let c = broker.consumer("g", &["c"], stream_cfg()).await?;
        poll_exactly(c.as_ref(), 10, Duration::ZERO).await?;
        c.commit("c", 0, 5).await?;
        broker.storage().fail_put_state(Fault::nth(1).and_after());
        expect_kind(c.commit("c", 0, 8).await, ErrorKind::Io);
        let reported = committed(&broker, "g", 0).await?;
        broker.storage().heal();
        c.close().await?;
        broker.close().await?;
        reported
    };
    let broker = disk.open().await?;
    assert_eq!(committed(&broker, "g", 0).await?, reported);
    broker.close().await
}

/// "The attempt number … is stored by the backend and survives restarts";
/// no acked record is lost and none is lost unacked: an ack whose state
/// write fails returns the error, and after a crash the message is
/// delivered again (its settlement was never stored) with its attempt
/// number raised.
#[tokio::test]
async fn failed_ack_write_then_crash_redelivers() -> Result<()> {
    let disk = Disk::new();
    {
        let broker = disk.open().await?;
        broker.create_topic("q", TopicConfig::new(1)).await?;
        send_n(&broker, "q", 2).await?;
        let c = broker.consumer("g", &["q"], queue_cfg()).await?;
        let got = poll_exactly(c.as_ref(), 2, Duration::ZERO).await?;
        c.ack(&got[1]).await?;
        broker.storage().fail_put_state(Fault::nth(1));
        expect_kind(c.ack(&got[0]).await, ErrorKind::Io);
    }
    let broker = disk.open().await?;
    let c = broker.consumer("g", &["q"], queue_cfg()).await?;
    let got = poll_exactly(c.as_ref(), 1, Duration::from_millis(50)).await?;
    assert_eq!((got[0].offset, got[0].attempt), (0, 2));
    c.ack(&got[0]).await?;
    assert_eq!(broker.group_lag("g").await?.total_lag(), 0);
    broker.close().await
}

/// "When a message fails its last allowed attempt … it is appended to the
/// DLQ topic … and only then settled for the group": if that append fails,
/// nack returns the error, the message is not settled and not leased, it
/// is delivered again, and the next nack moves it to the DLQ exactly once.
#[tokio::test]
async fn failed_dead_letter_append_leaves_queue_message_unsettled() -> Result<()> {
    let broker = memory();
    broker.create_topic("d", TopicConfig::new(1)).await?;
    send_n(&broker, "d", 1).await?;
    let cfg = queue_cfg().with_dlq(DlqPolicy::new(1));
    let c = broker.consumer("g", &["d"], cfg).await?;
    let got = poll_exactly(c.as_ref(), 1, Duration::ZERO).await?;
    broker
        .storage()
        .fail_append(Fault::nth(1).and_after().matching(|t| t.ends_with(".dlq")));
    expect_kind(
        c.nack(&got[0], NackOptions::new().with_reason("boom"))
            .await,
        ErrorKind::Io,
    );
    let lag = broker.group_lag("g").await?;
    assert_eq!((lag.total_lag(), lag.total_in_flight()), (1, 0), "{lag:?}");
    broker.storage().heal();
    let again = poll_exactly(c.as_ref(), 1, Duration::ZERO).await?;
    assert_eq!((again[0].offset, again[0].attempt), (0, 2));
    let outcome = c
        .nack(&again[0], NackOptions::new().with_reason("boom"))
        .await?;
    assert_eq!(outcome, NackOutcome::DeadLettered);
    let dlq = conveyor_core::config::dlq_topic_name("d", "g");
    assert_eq!(log_ends(&broker, &dlq).await?, vec![1]);
    assert_eq!(broker.group_lag("g").await?.total_lag(), 0);
    Ok(())
}

/// The same in stream mode ("Nothing is dropped silently, ever"): a nack on
/// the last attempt whose DLQ append fails must leave the message to be
/// delivered again; today the member's position has already moved past it,
/// so the next poll returns the record after it, and acking that one
/// commits over the message that never reached the DLQ.
#[tokio::test]

async fn failed_dead_letter_append_redelivers_stream_message() -> Result<()> {
    let broker = memory();
    broker.create_topic("s", TopicConfig::new(1)).await?;
    send_n(&broker, "s", 2).await?;
    let cfg = stream_cfg().with_dlq(DlqPolicy::new(1));
    let c = broker.consumer("g", &["s"], cfg).await?;
    let first = c.poll(1, WAIT).await?;
    assert_eq!(first.first().map(|m| m.offset), Some(0));
    broker
        .storage()
        .fail_append(Fault::nth(1).matching(|t| t.ends_with(".dlq")));
    expect_kind(c.nack(&first[0], NackOptions::new()).await, ErrorKind::Io);
    let next = c.poll(1, WAIT).await?;
    assert_eq!(
        next.first().map(|m| m.offset),
        Some(0),
        "offset 0 neither dead-lettered nor delivered again"
    );
    Ok(())
}

/// "Creating a topic …", "Closing and reopening a broker keeps every
/// acknowledged record": a create whose state write fails returns the
/// error; retrying it succeeds, and then the topic and the records sent to
/// it survive a crash.
#[tokio::test]

async fn failed_create_topic_write_then_retry_survives_crash() -> Result<()> {
    let disk = Disk::new();
    {
        let broker = disk.open().await?;
        broker.storage().fail_put_state(Fault::nth(1));
        expect_kind(
            broker.create_topic("t", TopicConfig::new(2)).await,
            ErrorKind::Io,
        );
        broker.create_topic("t", TopicConfig::new(2)).await?;
        send_n(&broker, "t", 4).await?;
    }
    let broker = disk.open().await?;
    assert_eq!(broker.list_topics().await?, vec!["t".to_string()]);
    assert_eq!(log_ends(&broker, "t").await?.iter().sum::<u64>(), 4);
    broker.close().await
}

/// A create whose state write fails, then a clean close: the topic the
/// running broker listed is the topic the reopened one has.
#[tokio::test]
async fn failed_create_topic_write_then_close_is_consistent() -> Result<()> {
    let disk = Disk::new();
    let listed = {
        let broker = disk.open().await?;
        broker.storage().fail_put_state(Fault::nth(1));
        expect_kind(
            broker.create_topic("t", TopicConfig::new(2)).await,
            ErrorKind::Io,
        );
        let listed = broker.list_topics().await?;
        broker.close().await?;
        listed
    };
    let broker = disk.open().await?;
    assert_eq!(broker.list_topics().await?, listed);
    broker.create_topic("t", TopicConfig::new(2)).await?;
    broker.close().await
}

/// "Each partition is assigned to at most one live member": a join whose
/// state write fails returns an error, so no member exists for the caller
/// to close; it must not stay in the group holding partitions until its
/// session times out.
#[tokio::test]

async fn failed_join_write_leaves_no_ghost_member() -> Result<()> {
    let broker = memory();
    broker.create_topic("j", TopicConfig::new(2)).await?;
    let a = broker.consumer("g", &["j"], stream_cfg()).await?;
    broker.storage().fail_put_state(Fault::nth(1));
    assert!(broker.consumer("g", &["j"], stream_cfg()).await.is_err());
    broker.storage().heal();
    assert_eq!(
        a.assignment().await?.len(),
        2,
        "a ghost member owns partitions"
    );
    Ok(())
}

/// Cancel safety of `poll` where storage reads take time (as a networked
/// store's do): the conformance case that drops `poll` futures at random
/// points, over a memory storage whose reads sleep 2 ms.
#[tokio::test]

async fn dropped_queue_polls_with_slow_reads() -> Result<()> {
    let backend = slow_reads();
    conveyor_conformance::queue::dropped_polls_leave_no_lease(&backend).await
}

/// The same for stream mode: a poll reading several partitions, dropped
/// after the first read moved its position but before it returned.
#[tokio::test]

async fn dropped_stream_polls_with_slow_reads() -> Result<()> {
    let backend = slow_reads();
    conveyor_conformance::stream::dropped_polls_skip_nothing(&backend).await
}

/// A conformance backend over a memory storage whose reads sleep 2 ms.
fn slow_reads() -> impl conveyor_conformance::Backend {
    conveyor_conformance::Reopening::new(
        |options| async move {
            let storage = FaultyStorage::new(MemoryStorage::default())
                .with_read_latency(Duration::from_millis(2));
            Ok(Arc::new(Engine::fresh(storage, options)) as Arc<dyn Broker>)
        },
        (),
    )
}

/// The counters count every call, failed or not, and a fault armed with a
/// topic predicate counts only the calls it matches.
#[tokio::test]
async fn counters_and_predicates() -> Result<()> {
    let storage = FaultyStorage::new(MemoryStorage::default());
    storage.ensure_partitions("a", 1).await?;
    storage.ensure_partitions("b", 1).await?;
    storage.fail_append(
        Fault::nth(2)
            .matching(|t| t == "b")
            .with_kind(ErrorKind::Unavailable),
    );
    let rec = || {
        vec![conveyor_core::backend::StoredRecord {
            key: None,
            value: "v".into(),
            headers: Vec::new(),
            idempotency_key: None,
            deliver_at: None,
        }]
    };
    storage.append("a", 0, rec()).await?;
    storage.append("b", 0, rec()).await?;
    storage.append("a", 0, rec()).await?;
    expect_kind(storage.append("b", 0, rec()).await, ErrorKind::Unavailable);
    storage.append("b", 0, rec()).await?;
    assert_eq!((storage.append_calls(), storage.injected()), (5, 1));
    assert_eq!(storage.bounds("b", 0)?.log_end, 2);
    Ok(())
}
