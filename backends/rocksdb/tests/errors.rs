//! RocksDB's own reports through Conveyor's error kinds: a second open is
//! `Locked`; a damaged SST file is `Corrupt` naming the file.
#![allow(clippy::unwrap_used)]

use conveyor_core::prelude::*;
use conveyor_core::{BrokerOptions, ErrorKind, Record, TopicConfig};
use conveyor_rocksdb::RocksOptions;
use std::path::Path;

async fn open(dir: &Path) -> conveyor_core::Result<conveyor_rocksdb::RocksBroker> {
    conveyor_rocksdb::open(dir, BrokerOptions::default(), RocksOptions::default()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_open_is_locked_until_close() {
    let dir = tempfile::tempdir().unwrap();
    let broker = open(dir.path()).await.unwrap();
    let Err(err) = open(dir.path()).await else {
        panic!("a second open succeeded");
    };
    assert_eq!(err.kind(), ErrorKind::Locked, "{err}");
    assert!(
        err.to_string().contains(&dir.path().display().to_string()),
        "{err}"
    );
    broker.close().await.unwrap();
    open(dir.path()).await.unwrap().close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_sst_is_corrupt_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let broker = open(dir.path()).await.unwrap();
    broker.create_topic("t", TopicConfig::new(1)).await.unwrap();
    let p = broker.producer().await.unwrap();
    // Incompressible values, so the data blocks are most of the file.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..20 {
        let batch = (0..100)
            .map(|_| {
                let v: Vec<u8> = (0..200)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x as u8
                    })
                    .collect();
                Record::new(v)
            })
            .collect();
        p.send_batch("t", batch).await.unwrap();
    }
    broker.close().await.unwrap();
    // Reopening replays the WAL into an SST file.
    open(dir.path()).await.unwrap().close().await.unwrap();
    let mut ssts: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "sst"))
        .collect();
    ssts.sort_by_key(|p| std::fs::metadata(p).unwrap().len());
    let sst = ssts.pop().expect("an SST file");
    let mut bytes = std::fs::read(&sst).unwrap();
    for b in &mut bytes[1000..1100] {
        *b ^= 0xff;
    }
    std::fs::write(&sst, bytes).unwrap();
    let name = sst.file_name().unwrap().to_string_lossy().into_owned();
    let err = match open(dir.path()).await {
        Err(e) => e,
        Ok(broker) => {
            let e = broker
                .fetch("t", 0, 0, 10_000)
                .await
                .expect_err("damage found");
            let _ = broker.close().await;
            e
        }
    };
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
    assert!(err.to_string().contains(&name), "names {name}: {err}");
}
