//! Appends from async tasks go through the store's writer thread, which
//! writes what is queued as one `WriteBatch`: many producers at once, to
//! several partitions, must still get every append's records at
//! contiguous offsets, no offset twice, everything readable as soon as it
//! is acknowledged, and all of it back after a reopen.
#![allow(clippy::unwrap_used)]

use conveyor_core::prelude::*;
use conveyor_core::{BrokerOptions, Durability, Record, TopicConfig};
use conveyor_rocksdb::RocksOptions;
use std::collections::HashMap;
use std::path::Path;

const PRODUCERS: usize = 8;
const SENDS: usize = 40;
const PARTITIONS: u32 = 3;

async fn open(dir: &Path, durability: Durability) -> conveyor_rocksdb::RocksBroker {
    let options = BrokerOptions::default().with_durability(durability);
    conveyor_rocksdb::open(dir, options, RocksOptions::default())
        .await
        .unwrap()
}

async fn concurrent_producers(durability: Durability) {
    let dir = tempfile::tempdir().unwrap();
    let broker = std::sync::Arc::new(open(dir.path(), durability).await);
    broker
        .create_topic("t", TopicConfig::new(PARTITIONS))
        .await
        .unwrap();
    let producer = broker.producer().await.unwrap();
    let tasks: Vec<_> = (0..PRODUCERS)
        .map(|w| {
            let (producer, broker) = (producer.clone(), broker.clone());
            tokio::spawn(async move {
                let mut sent = Vec::new();
                for s in 0..SENDS {
                    // Sizes 1..=7; every third batch spreads over the
                    // partitions (several appends of one send_batch).
                    let n = 1 + (w + s) % 7;
                    let batch: Vec<Record> = (0..n)
                        .map(|i| {
                            let r = Record::new(format!("{w}/{s}/{i}"));
                            match s % 3 {
                                0 => r,
                                _ => r.with_partition(((w + s) % PARTITIONS as usize) as u32),
                            }
                        })
                        .collect();
                    let receipts = producer.send_batch("t", batch).await.unwrap();
                    // One append per partition: its records are contiguous.
                    let mut by_partition: HashMap<u32, Vec<u64>> = HashMap::new();
                    for (i, r) in receipts.iter().enumerate() {
                        by_partition.entry(r.partition).or_default().push(r.offset);
                        sent.push((r.partition, r.offset, format!("{w}/{s}/{i}")));
                    }
                    for offsets in by_partition.values() {
                        assert!(offsets.windows(2).all(|o| o[1] == o[0] + 1), "{offsets:?}");
                    }
                    // Acknowledged means readable, with everything before it.
                    let last = receipts.last().unwrap();
                    let got = broker.fetch("t", last.partition, 0, 100_000).await.unwrap();
                    assert!(
                        got.len() as u64 > last.offset,
                        "{} <= {}",
                        got.len(),
                        last.offset
                    );
                }
                sent
            })
        })
        .collect();
    let mut expected: HashMap<(u32, u64), String> = HashMap::new();
    for t in tasks {
        for (p, o, v) in t.await.unwrap() {
            assert!(
                expected.insert((p, o), v).is_none(),
                "offset {o} of {p} twice"
            );
        }
    }
    let check = |broker: conveyor_rocksdb::RocksBroker, expected: HashMap<(u32, u64), String>| async move {
        let mut total = 0;
        for p in 0..PARTITIONS {
            let got = broker.fetch("t", p, 0, 100_000).await.unwrap();
            for (i, m) in got.iter().enumerate() {
                assert_eq!(m.offset, i as u64);
                assert_eq!(expected[&(p, m.offset)].as_bytes(), &m.value[..]);
            }
            total += got.len();
        }
        assert_eq!(total, expected.len());
        broker.close().await.unwrap();
    };
    let broker = std::sync::Arc::try_unwrap(broker).ok().unwrap();
    check(broker, expected.clone()).await;
    check(open(dir.path(), durability).await, expected).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_producers_unsynced() {
    concurrent_producers(Durability::None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_producers_synced() {
    concurrent_producers(Durability::Always).await;
}

#[tokio::test(flavor = "current_thread")]
async fn concurrent_producers_current_thread() {
    concurrent_producers(Durability::None).await;
}
