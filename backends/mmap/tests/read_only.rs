//! Read-only opens (`read_only=true`) of a store another broker owns:
//! they take no lock, change no byte, see a consistent prefix (a batch
//! being written is left out, not cut), follow the owner's appends and
//! segment rolls, and refuse every write with `ErrorKind::ReadOnly`.
//! (The CLI's `tests/live.rs` does the same with a real second process.)
// Test code: a failed unwrap is a failed test, with its line.
#![allow(clippy::unwrap_used)]

use conveyor_core::prelude::*;
use conveyor_core::{BrokerOptions, ErrorKind, GroupConfig, Record, TopicConfig};
use conveyor_mmap::{MmapBroker, MmapOptions};
use std::io::Write;
use std::path::Path;
use std::time::Duration;

async fn open(dir: &Path, read_only: bool) -> conveyor_core::Result<MmapBroker> {
    conveyor_mmap::open(
        dir,
        BrokerOptions::default(),
        MmapOptions::default()
            .with_segment_bytes(1024)
            .with_read_only(read_only),
    )
    .await
}

async fn send(broker: &MmapBroker, from: u32, n: u32) {
    let p = broker.producer().await.unwrap();
    for i in from..from + n {
        p.send("t", Record::new(format!("record {i:04}")))
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn a_reader_follows_the_owner_and_refuses_writes() {
    let dir = tempfile::tempdir().unwrap();
    let owner = open(dir.path(), false).await.unwrap();
    owner.create_topic("t", TopicConfig::new(1)).await.unwrap();
    send(&owner, 0, 20).await;
    let c = owner
        .consumer("g", &["t"], GroupConfig::stream())
        .await
        .unwrap();
    let got = c.poll(5, Duration::from_secs(1)).await.unwrap();
    c.ack(got.last().unwrap()).await.unwrap();

    let reader = open(dir.path(), true).await.unwrap();
    assert_eq!(reader.list_topics().await.unwrap(), vec!["t"]);
    assert_eq!(
        reader.group_lag("g").await.unwrap().partitions[0].committed,
        5
    );
    assert_eq!(
        reader.describe_topic("t").await.unwrap().partitions[0].log_end,
        20
    );

    // The owner appends (rolling 1 KiB segments several times): the
    // reader follows, record for record.
    send(&owner, 20, 80).await;
    assert_eq!(
        reader.describe_topic("t").await.unwrap().partitions[0].log_end,
        100
    );
    let all = reader.fetch("t", 0, 0, 1000).await.unwrap();
    assert_eq!(all.len(), 100);
    for (i, m) in all.iter().enumerate() {
        assert_eq!(m.offset, i as u64);
        assert_eq!(m.value, format!("record {i:04}").as_bytes());
    }

    for refused in [
        reader.create_topic("u", TopicConfig::new(1)).await.err(),
        reader.delete_topic("t").await.err(),
        reader.add_partitions("t", 2).await.err(),
        reader.producer().await.err(),
        reader
            .consumer("g", &["t"], GroupConfig::stream())
            .await
            .err(),
        reader
            .idempotency_store()
            .first_seen("k", Duration::from_secs(1))
            .await
            .err(),
    ] {
        let e = refused.expect("refused");
        assert_eq!(e.kind(), ErrorKind::ReadOnly, "{e}");
        assert!(e.to_string().contains("read-only"), "{e}");
    }
    reader.close().await.unwrap();
    // The owner is unaffected.
    send(&owner, 100, 1).await;
    owner.close().await.unwrap();
}

#[tokio::test]
async fn a_batch_being_written_is_left_out_not_cut() {
    let dir = tempfile::tempdir().unwrap();
    let owner = open(dir.path(), false).await.unwrap();
    owner.create_topic("t", TopicConfig::new(1)).await.unwrap();
    send(&owner, 0, 3).await;
    owner.close().await.unwrap();
    // Half a batch at the end of the active segment, as a writer in the
    // middle of a `write` (or a crash) leaves it.
    let part = dir.path().join("topics/t/0");
    let segment = std::fs::read_dir(&part)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "log"))
        .unwrap();
    let whole = std::fs::read(&segment).unwrap();
    let half = &whole[..whole.len() / 3 / 2];
    std::fs::OpenOptions::new()
        .append(true)
        .open(&segment)
        .unwrap()
        .write_all(half)
        .unwrap();
    let len = std::fs::metadata(&segment).unwrap().len();

    let reader = open(dir.path(), true).await.unwrap();
    assert_eq!(reader.fetch("t", 0, 0, 10).await.unwrap().len(), 3);
    assert_eq!(
        reader.describe_topic("t").await.unwrap().partitions[0].log_end,
        3
    );
    reader.close().await.unwrap();
    assert_eq!(std::fs::metadata(&segment).unwrap().len(), len, "not cut");
}

#[tokio::test]
async fn a_path_without_a_store_is_refused_and_not_created() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("mistyped");
    let e = open(&missing, true).await.expect_err("refused");
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    assert!(e.to_string().contains("no conveyor-mmap store here"), "{e}");
    let e = conveyor_mmap::open(
        &missing,
        BrokerOptions::default(),
        MmapOptions::default().with_create(false),
    )
    .await
    .expect_err("refused");
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    assert!(!missing.exists());
    // The library default creates it.
    open(&missing, false).await.unwrap().close().await.unwrap();
    assert!(missing.exists());
}
