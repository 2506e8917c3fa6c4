//! `conveyor_mmap::verify` checks a whole store without changing it: a
//! clean store gives its counts; a flipped byte in a sealed segment (which
//! opening does not read) is `Corrupt` naming the file and position; a
//! torn tail is reported, not cut; a store open elsewhere is `Locked`.
// Test code: a failed unwrap is a failed test, with its line.
#![allow(clippy::unwrap_used)]

use conveyor_core::prelude::*;
use conveyor_core::{Broker, BrokerOptions, ErrorKind, Record, TopicConfig};
use conveyor_mmap::{verify, MmapOptions};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Every file of a directory tree and its bytes.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(snapshot(&path));
        } else {
            out.insert(path.clone(), std::fs::read(&path).unwrap());
        }
    }
    out
}

/// A store of two topics: `a` (2 partitions, 30 records each, small
/// segments so there are sealed ones) and `b` (1 partition, 5 records).
async fn store(dir: &Path) {
    let mmap = MmapOptions::default().with_segment_bytes(1024);
    let broker = conveyor_mmap::open(dir, BrokerOptions::default(), mmap)
        .await
        .unwrap();
    broker.create_topic("a", TopicConfig::new(2)).await.unwrap();
    broker.create_topic("b", TopicConfig::new(1)).await.unwrap();
    let producer = broker.producer().await.unwrap();
    for i in 0..30u32 {
        for p in 0..2 {
            let r = Record::new(vec![i as u8; 60]).with_partition(p);
            producer.send("a", r).await.unwrap();
        }
    }
    let batch = (0..5).map(|i| Record::new(format!("b{i}"))).collect();
    producer.send_batch("b", batch).await.unwrap();
    broker.close().await.unwrap();
}

/// The first or last segment file of a partition directory (`topics/t/p`).
fn segment_of(dir: &Path, partition: &str, last: bool) -> PathBuf {
    let of_partition = segments(dir)
        .into_iter()
        .filter(|p| p.starts_with(dir.join(partition)));
    if last {
        of_partition.max()
    } else {
        of_partition.min()
    }
    .expect("a segment")
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut s: Vec<PathBuf> = snapshot(dir)
        .into_keys()
        .filter(|p| p.extension().is_some_and(|e| e == "log") && p.starts_with(dir.join("topics")))
        .collect();
    s.sort();
    s
}

#[tokio::test]
async fn clean_store_is_counted_and_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    store(dir.path()).await;
    let before = snapshot(dir.path());
    let report = verify(dir.path()).unwrap();
    assert_eq!(report.partitions, 3);
    assert_eq!(report.segments as usize, segments(dir.path()).len());
    assert!(report.segments > 3, "small segments roll: {report:?}");
    assert_eq!(report.records, 65);
    assert_eq!(report.batches, 61);
    let segment_bytes: usize = segments(dir.path()).iter().map(|p| before[p].len()).sum();
    assert_eq!(report.bytes as usize, segment_bytes);
    assert!(report.state_frames > 0);
    assert!(report.torn_tails.is_empty(), "{report:?}");
    assert_eq!(snapshot(dir.path()), before, "verify changed the store");
}

#[tokio::test]
async fn flipped_byte_in_a_sealed_segment_is_corrupt_with_file_and_position() {
    let dir = tempfile::tempdir().unwrap();
    store(dir.path()).await;
    let sealed = segment_of(dir.path(), "topics/a/1", false);
    let mut bytes = std::fs::read(&sealed).unwrap();
    bytes[200] ^= 0x01;
    std::fs::write(&sealed, &bytes).unwrap();
    // Opening does not read sealed segments: the store still opens.
    let broker = conveyor_mmap::open(dir.path(), BrokerOptions::default(), MmapOptions::default())
        .await
        .expect("a sealed segment is not read at open");
    broker.close().await.unwrap();

    let e = verify(dir.path()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    assert!(
        e.message()
            .starts_with(&format!("{}: byte ", sealed.display())),
        "{e}"
    );
}

#[tokio::test]
async fn torn_tail_is_reported_not_cut() {
    let dir = tempfile::tempdir().unwrap();
    store(dir.path()).await;
    let last = segment_of(dir.path(), "topics/b/0", true);
    let bytes = std::fs::read(&last).unwrap();
    let cut = bytes.len() - 3;
    std::fs::write(&last, &bytes[..cut]).unwrap();
    let before = snapshot(dir.path());
    let report = verify(dir.path()).unwrap();
    assert_eq!(report.torn_tails, vec![(last.clone(), 0)]);
    assert_eq!(
        report.records, 60,
        "the torn batch's records are not counted"
    );
    assert_eq!(snapshot(dir.path()), before, "verify cut the tail");
}

#[tokio::test]
async fn open_store_is_locked() {
    let dir = tempfile::tempdir().unwrap();
    store(dir.path()).await;
    let broker = conveyor_mmap::open(dir.path(), BrokerOptions::default(), MmapOptions::default())
        .await
        .unwrap();
    assert_eq!(verify(dir.path()).unwrap_err().kind(), ErrorKind::Locked);
    broker.close().await.unwrap();
    verify(dir.path()).expect("closed store verifies");
    let empty = tempfile::tempdir().unwrap();
    assert_eq!(
        verify(empty.path()).unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
}
