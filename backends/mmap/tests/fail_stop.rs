//! Fail-stop after a failed sync (PostgreSQL's fsync lesson; redb's
//! `PreviousIo`): once an `fdatasync` of a partition or of the state log
//! fails, that partition or the state log refuses every later write with
//! an `Io` error that says a previous sync failed and the store must be
//! reopened, naming the file; reads go on; a reopen brings back every
//! write acknowledged before the failure.
//!
//! The failure is injected through `conveyor_mmap::testing::fail_next_sync`
//! (a `#[doc(hidden)]` test hook keyed by path), and everything else goes
//! through the public broker and storage APIs.

use bytes::Bytes;
use conveyor_core::backend::LogStorage;
use conveyor_core::prelude::*;
use conveyor_core::{Broker, BrokerOptions, Durability, ErrorKind, Record, TopicConfig};
use conveyor_mmap::{MmapOptions, MmapStorage};
use std::path::Path;

async fn open(dir: &Path) -> conveyor_mmap::MmapBroker {
    let options = BrokerOptions::default().with_durability(Durability::Always);
    conveyor_mmap::open(dir, options, MmapOptions::default())
        .await
        .expect("open")
}

fn assert_fail_stop(e: &conveyor_core::Error, file: &str) {
    assert_eq!(e.kind(), ErrorKind::Io, "{e}");
    let m = e.message();
    assert!(
        m.contains("a previous sync of") && m.contains(file) && m.contains("reopened"),
        "not the fail-stop error: {e}"
    );
}

#[tokio::test]
async fn a_failed_partition_sync_stops_appends_until_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let broker = open(dir.path()).await;
    broker.create_topic("t", TopicConfig::new(2)).await.unwrap();
    let producer = broker.producer().await.unwrap();
    for i in 0..3 {
        producer
            .send("t", Record::new(format!("acked {i}")).with_partition(0))
            .await
            .unwrap();
    }
    let segment = "00000000000000000000.log";

    // (a) The send whose sync fails returns an error.
    conveyor_mmap::testing::fail_next_sync(&dir.path().join("topics/t/0"));
    let e = producer
        .send("t", Record::new("lost?").with_partition(0))
        .await
        .expect_err("the sync failed");
    assert_eq!(e.kind(), ErrorKind::Io, "{e}");
    assert!(
        e.chain().to_string().contains("injected sync failure"),
        "the cause is the source: {}",
        e.chain()
    );

    // (b) Every later send to that partition fails with the fail-stop
    // error, naming the file: the sync is not retried as if nothing
    // happened (the fault hook fires once, so a retry would succeed).
    for _ in 0..3 {
        let e = producer
            .send("t", Record::new("refused").with_partition(0))
            .await
            .expect_err("fail-stop");
        assert_fail_stop(&e, segment);
    }
    // Other partitions go on; reads of the stopped one go on.
    producer
        .send("t", Record::new("other").with_partition(1))
        .await
        .expect("partition 1 is not stopped");
    let back = broker.fetch("t", 0, 0, 10).await.unwrap();
    assert!(back.len() >= 3);
    let _ = broker.close().await; // may report the fail-stop error

    // (c) Reopened: every acknowledged record is there, and writes work.
    let broker = open(dir.path()).await;
    let back = broker.fetch("t", 0, 0, 10).await.unwrap();
    let values: Vec<Bytes> = back.iter().take(3).map(|m| m.value.clone()).collect();
    let want: Vec<Bytes> = (0..3).map(|i| Bytes::from(format!("acked {i}"))).collect();
    assert_eq!(values, want);
    let after = broker
        .producer()
        .await
        .unwrap()
        .send("t", Record::new("after reopen").with_partition(0))
        .await
        .expect("a reopened store takes writes");
    assert_eq!(after.offset, back.len() as u64);
    broker.close().await.unwrap();
}

#[tokio::test]
async fn a_failed_state_sync_stops_state_puts_until_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let options = MmapOptions::default().with_durability(Durability::Always);
    let storage = MmapStorage::open(dir.path(), options).unwrap();
    let put =
        |k: &str, v: &'static str| vec![(k.to_string(), Some(Bytes::from_static(v.as_bytes())))];
    storage.put_state(put("before", "1")).await.unwrap();

    conveyor_mmap::testing::fail_next_sync(&dir.path().join("state.log"));
    let e = storage
        .put_state(put("failing", "2"))
        .await
        .expect_err("the sync failed");
    assert_eq!(e.kind(), ErrorKind::Io, "{e}");
    for _ in 0..2 {
        let e = storage
            .put_state(put("after", "3"))
            .await
            .expect_err("fail-stop");
        assert_fail_stop(&e, "state.log");
    }
    // Reads go on.
    let state = storage.load_state().await.unwrap();
    assert!(state.iter().any(|(k, _)| k == "before"));
    let _ = storage.close().await;
    drop(storage);

    let storage = MmapStorage::open(dir.path(), options).unwrap();
    let state = storage.load_state().await.unwrap();
    assert!(
        state.contains(&("before".to_string(), Bytes::from_static(b"1"))),
        "{state:?}"
    );
    assert!(!state.iter().any(|(k, _)| k == "after"), "{state:?}");
    storage.put_state(put("reopened", "4")).await.unwrap();
    storage.close().await.unwrap();
}
