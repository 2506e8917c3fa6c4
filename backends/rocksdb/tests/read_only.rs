//! Read-only open of a store another process owns (`read_only=true`, a
//! RocksDB secondary instance): it follows the owner's writes as a dense
//! prefix, refuses writes with `ReadOnly`, and never creates a store.
//!
//! The owner is this test binary run again with `CONVEYOR_RO_WRITER=<dir>`,
//! filtered to the test `writer_child` (which does nothing in a normal
//! run): it appends batches to `live` until killed.

// Test code: a failed unwrap is a failed test, with its line.
#![allow(clippy::unwrap_used)]

use conveyor_core::prelude::*;
use conveyor_core::{BrokerOptions, ErrorKind, Record, TopicConfig};
use conveyor_rocksdb::{open, RocksOptions};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const WRITER_ENV: &str = "CONVEYOR_RO_WRITER";

fn value_at(partition: u32, offset: u64) -> String {
    format!("p{partition}:o{offset}")
}

/// The owner: appends batches of 10 to both partitions of `live`.
#[test]
fn writer_child() {
    let Ok(dir) = std::env::var(WRITER_ENV) else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let broker = open(&dir, BrokerOptions::default(), RocksOptions::default())
            .await
            .unwrap();
        broker
            .create_topic("live", TopicConfig::new(2))
            .await
            .unwrap();
        let producer = broker.producer().await.unwrap();
        let started = Instant::now();
        let mut next = [0u64; 2];
        while started.elapsed() < Duration::from_secs(30) {
            for p in 0..2u32 {
                let batch = (0..10)
                    .map(|i| Record::new(value_at(p, next[p as usize] + i)).with_partition(p))
                    .collect();
                producer.send_batch("live", batch).await.unwrap();
                next[p as usize] += 10;
            }
            if next[0] == 100 {
                println!("@@ READY");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_follows_a_live_writer_in_another_process() {
    if std::env::var(WRITER_ENV).is_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["writer_child", "--exact", "--nocapture", "-q"])
        .env(WRITER_ENV, dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let ready = BufReader::new(stdout)
        .lines()
        .any(|l| l.is_ok_and(|l| l.contains("@@ READY")));
    assert!(ready, "the writer ended before it was ready");

    let reader = open(
        dir.path(),
        BrokerOptions::default(),
        RocksOptions::default().with_read_only(true),
    )
    .await
    .unwrap();
    assert_eq!(
        reader.list_topics().await.unwrap(),
        vec!["live".to_string()]
    );
    let first = reader.describe_topic("live").await.unwrap();
    // The log grows under the reader while the owner writes.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = reader.describe_topic("live").await.unwrap();
        if now.partitions[0].log_end > first.partitions[0].log_end + 50 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the read-only view does not follow"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // What it reads is a dense, in-order prefix with the owner's values,
    // up to the bounds it publishes.
    for p in 0..2u32 {
        let end = reader.describe_topic("live").await.unwrap().partitions[p as usize].log_end;
        let mut next = 0;
        while next < end {
            let got = reader.fetch("live", p, next, 500).await.unwrap();
            assert!(
                !got.is_empty(),
                "partition {p}: nothing at {next} below {end}"
            );
            for m in got {
                assert_eq!(m.offset, next, "partition {p}: offsets are dense");
                assert_eq!(m.value, value_at(p, next).as_bytes());
                next += 1;
            }
        }
    }
    // Writes are refused, and say why.
    let e = reader
        .create_topic("other", TopicConfig::new(1))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ReadOnly, "{e}");
    let e = match reader.producer().await {
        Ok(p) => p.send("live", Record::new("x")).await.unwrap_err(),
        Err(e) => e,
    };
    assert_eq!(e.kind(), ErrorKind::ReadOnly, "{e}");
    reader.close().await.unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test]
async fn read_only_and_no_create_refuse_a_path_without_a_store() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("typo");
    for rocks in [
        RocksOptions::default().with_read_only(true),
        RocksOptions::default().with_create(false),
    ] {
        let e = open(&missing, BrokerOptions::default(), rocks)
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
        assert!(e.to_string().contains("create=true"), "{e}");
        assert!(!missing.exists(), "nothing is created");
    }
}
