//! Crash recovery of the segment log and the state log, by cutting and
//! corrupting real files (contract §7, the two **(embedded)** lines).
//!
//! - Torn tails: the last batch of the last segment is cut at every byte;
//!   each reopen keeps every earlier record byte for byte, ends the log at
//!   the cut batch's base offset and appends from there.
//! - Corruption before the tail (bytes flipped in a batch that has batches
//!   after it) is `ErrorKind::Corrupt`, at open or at read, with a message
//!   naming the file and the byte position: never skipped, never a panic.
//! - A second open of a live store is `ErrorKind::Locked`; once the first
//!   is closed or dropped the store opens again.
//! - The state log's last frame is cut at every byte: every commit before
//!   it survives.
// Test code: a failed unwrap is a failed test, with its line.
#![allow(clippy::unwrap_used)]

mod common;

use bytes::Bytes;
use common::copy_dir;
use conveyor_core::prelude::*;
use conveyor_core::{
    Broker, BrokerOptions, Durability, ErrorKind, GroupConfig, Message, Record, TopicConfig,
};
use conveyor_mmap::format::{decode_batch, decode_state_frame};
use conveyor_mmap::{MmapBroker, MmapOptions, MmapStorage};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const TOPIC: &str = "orders";

async fn open(dir: &Path, segment_bytes: u64) -> conveyor_core::Result<MmapBroker> {
    conveyor_mmap::open(
        dir,
        BrokerOptions::default(),
        MmapOptions::default().with_segment_bytes(segment_bytes),
    )
    .await
}

/// The record at partition-local sequence `i`: sizes, keys, headers and
/// idempotency keys vary, so batches of every shape reach the disk.
fn record(partition: u32, i: u64) -> Record {
    let len = [0usize, 1, 7, 33, 120, 300][(i % 6) as usize];
    let value: Vec<u8> = (0..len)
        .map(|j| (i as usize * 31 + j * 7) as u8)
        .chain(format!("#{partition}/{i}").into_bytes())
        .collect();
    let mut r = Record::new(value).with_partition(partition);
    if !i.is_multiple_of(3) {
        r = r.with_key(format!("key-{}", i % 5));
    }
    if i % 4 == 1 {
        r = r
            .with_header("trace", format!("t{i}"))
            .with_header("trace", Bytes::from(vec![0u8, 255, i as u8]));
    }
    if i % 5 == 2 {
        r = r.with_idempotency_key(format!("evt-{partition}-{i}"));
    }
    r
}

/// Check a read-back message against what was sent at `offset`.
fn assert_is_record(m: &Message, partition: u32, offset: u64, context: &str) {
    let want = record(partition, offset);
    assert_eq!(m.offset, offset, "{context}: offsets not dense");
    assert_eq!(m.partition, partition, "{context}");
    assert_eq!(m.key, want.key, "{context}: key at offset {offset}");
    assert_eq!(m.value, want.value, "{context}: value at offset {offset}");
    assert_eq!(
        m.headers, want.headers,
        "{context}: headers at offset {offset}"
    );
}

/// Every record of a partition from `from` (fetch pages through).
async fn read_all(
    broker: &MmapBroker,
    topic: &str,
    partition: u32,
    from: u64,
) -> conveyor_core::Result<Vec<Message>> {
    let mut out: Vec<Message> = Vec::new();
    let mut at = from;
    loop {
        let page = broker.fetch(topic, partition, at, 1000).await?;
        match page.last() {
            Some(last) => at = last.offset + 1,
            None => return Ok(out),
        }
        out.extend(page);
    }
}

async fn log_end(broker: &MmapBroker, topic: &str, partition: u32) -> u64 {
    broker
        .describe_topic(topic)
        .await
        .expect("describe")
        .partitions[partition as usize]
        .log_end
}

fn partition_dir(root: &Path, topic: &str, partition: u32) -> PathBuf {
    root.join("topics").join(topic).join(partition.to_string())
}

/// Segment files of a partition, oldest first.
fn segments(root: &Path, topic: &str, partition: u32) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(partition_dir(root, topic, partition))
        .expect("list partition")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    files.sort();
    files
}

/// Batches of a segment file: (position, length, base offset, count).
fn batches(file: &[u8]) -> Vec<(usize, usize, u64, u32)> {
    let data = Bytes::copy_from_slice(file);
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < data.len() {
        let (h, _) = decode_batch(&data.slice(pos..)).expect("a clean segment decodes");
        out.push((pos, h.length as usize, h.base_offset, h.count));
        pos += h.length as usize;
    }
    out
}

/// A store with `TOPIC` (2 partitions) whose partition 0 got `sizes`
/// batches (in order) and partition 1 a few records; closed.
async fn written_store(dir: &Path, segment_bytes: u64, sizes: &[usize]) -> u64 {
    let broker = open(dir, segment_bytes).await.expect("open");
    broker
        .create_topic(TOPIC, TopicConfig::new(2))
        .await
        .expect("create");
    let producer = broker.producer().await.expect("producer");
    let mut next = 0u64;
    for (b, size) in sizes.iter().enumerate() {
        let batch: Vec<Record> = (next..next + *size as u64).map(|i| record(0, i)).collect();
        let receipts = producer.send_batch(TOPIC, batch).await.expect("send");
        for (i, r) in receipts.iter().enumerate() {
            assert_eq!((r.partition, r.offset), (0, next + i as u64));
        }
        next += *size as u64;
        if b.is_multiple_of(3) {
            producer
                .send(TOPIC, record(1, b as u64 / 3))
                .await
                .expect("send p1");
        }
    }
    broker.close().await.expect("close");
    next
}

/// (a) Cut the last batch of the last segment at every byte position.
#[tokio::test]
async fn torn_tail_cut_at_every_byte_of_the_last_batch() {
    let started = Instant::now();
    let base = tempfile::tempdir().unwrap();
    let golden = base.path().join("golden");
    // Small segments, so the partition has several and the cut one is the
    // last; batch sizes 1 to 9, last one 6 records.
    let sizes = [1, 4, 1, 9, 2, 1, 7, 3, 5, 1, 2, 8, 1, 6];
    let total = written_store(&golden, 2048, &sizes).await;
    let segs = segments(&golden, TOPIC, 0);
    assert!(segs.len() >= 3, "expected several segments, got {segs:?}");
    let last = segs.last().unwrap().clone();
    let last_name = last.file_name().unwrap().to_owned();
    let bytes = std::fs::read(&last).unwrap();
    let &(cut_pos, cut_len, cut_base, cut_count) = batches(&bytes).last().unwrap();
    assert_eq!(cut_pos + cut_len, bytes.len());
    assert_eq!(cut_base + cut_count as u64, total);
    let p1_end = total_p1(&sizes);

    for cut in cut_pos..bytes.len() {
        let context = format!("last batch cut to {} of {cut_len} bytes", cut - cut_pos);
        let dir = base.path().join(format!("cut-{cut}"));
        copy_dir(&golden, &dir);
        let file = partition_dir(&dir, TOPIC, 0).join(&last_name);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&file)
            .unwrap()
            .set_len(cut as u64)
            .unwrap();

        let broker = open(&dir, 2048)
            .await
            .unwrap_or_else(|e| panic!("{context}: open failed: {e}"));
        assert_eq!(log_end(&broker, TOPIC, 0).await, cut_base, "{context}");
        let back = read_all(&broker, TOPIC, 0, 0).await.expect("read");
        assert_eq!(back.len() as u64, cut_base, "{context}: records kept");
        for (i, m) in back.iter().enumerate() {
            assert_is_record(m, 0, i as u64, &context);
        }
        // The torn bytes are gone from the file, not merely skipped.
        assert_eq!(
            std::fs::metadata(&file).unwrap().len(),
            cut_pos as u64,
            "{context}: torn tail not cut off the file"
        );
        // The other partition is untouched.
        assert_eq!(log_end(&broker, TOPIC, 1).await, p1_end, "{context}");

        // New appends continue at the cut batch's base offset, and survive
        // another reopen.
        let receipts = broker
            .producer()
            .await
            .unwrap()
            .send_batch(
                TOPIC,
                (cut_base..cut_base + 2).map(|i| record(0, i)).collect(),
            )
            .await
            .unwrap_or_else(|e| panic!("{context}: append after recovery: {e}"));
        assert_eq!(receipts[0].offset, cut_base, "{context}");
        assert_eq!(receipts[1].offset, cut_base + 1, "{context}");
        broker.close().await.unwrap();

        if cut.is_multiple_of(16) || cut == bytes.len() - 1 {
            let broker = open(&dir, 2048).await.expect("second reopen");
            let back = read_all(&broker, TOPIC, 0, 0).await.expect("read");
            assert_eq!(back.len() as u64, cut_base + 2, "{context}: after append");
            for (i, m) in back.iter().enumerate() {
                assert_is_record(m, 0, i as u64, &context);
            }
            broker.close().await.unwrap();
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
    eprintln!(
        "cut {cut_len} positions of a {cut_count}-record batch in {:?}",
        started.elapsed()
    );
}

fn total_p1(sizes: &[usize]) -> u64 {
    (0..sizes.len()).filter(|b| b.is_multiple_of(3)).count() as u64
}

/// Zeros where the last batch should be (a file extended by the file
/// system whose data never reached the disk) are a torn tail too.
#[tokio::test]
async fn zeroed_tail_is_a_torn_tail() {
    let base = tempfile::tempdir().unwrap();
    let dir = base.path().join("store");
    let total = written_store(&dir, 1 << 20, &[3, 2, 4]).await;
    let file = segments(&dir, TOPIC, 0).pop().unwrap();
    let mut bytes = std::fs::read(&file).unwrap();
    let &(pos, _, base_offset, _) = batches(&bytes).last().unwrap();
    bytes[pos..].fill(0);
    bytes.extend_from_slice(&[0; 100]);
    std::fs::write(&file, &bytes).unwrap();
    let broker = open(&dir, 1 << 20).await.expect("open");
    assert_eq!(log_end(&broker, TOPIC, 0).await, base_offset);
    assert_eq!(base_offset, total - 4);
    let back = read_all(&broker, TOPIC, 0, 0).await.unwrap();
    for (i, m) in back.iter().enumerate() {
        assert_is_record(m, 0, i as u64, "zeroed tail");
    }
    broker.close().await.unwrap();
}

/// What opening and reading a damaged store gave.
enum Outcome {
    /// Refused with `Corrupt` and this message.
    Corrupt(String),
    /// Something else went wrong (a bug).
    Wrong(String),
}

/// Open `dir` and read partition 0 from the start; damage must surface as
/// `Corrupt` (at open or at read). Records read before the damage must be
/// the ones written.
async fn open_and_read(dir: &Path, segment_bytes: u64, total: u64) -> Outcome {
    let broker = match open(dir, segment_bytes).await {
        Ok(b) => b,
        Err(e) if e.kind() == ErrorKind::Corrupt => return Outcome::Corrupt(e.to_string()),
        Err(e) => return Outcome::Wrong(format!("open: {e}")),
    };
    let end = log_end(&broker, TOPIC, 0).await;
    let mut at = 0u64;
    let outcome = loop {
        match broker.fetch(TOPIC, 0, at, 1000).await {
            Ok(page) if page.is_empty() => {
                break Outcome::Wrong(format!(
                    "read {at} of {total} records (log end {end}) and no error: damage skipped"
                ))
            }
            Ok(page) => {
                for m in &page {
                    if m.offset != at {
                        broker.close().await.ok();
                        return Outcome::Wrong(format!(
                            "offset {} read where {at} was expected: records skipped",
                            m.offset
                        ));
                    }
                    let want = record(0, at);
                    if (&m.key, &m.value, &m.headers) != (&want.key, &want.value, &want.headers) {
                        broker.close().await.ok();
                        return Outcome::Wrong(format!("offset {at}: damaged record returned"));
                    }
                    at += 1;
                }
            }
            Err(e) if e.kind() == ErrorKind::Corrupt => break Outcome::Corrupt(e.to_string()),
            Err(e) => break Outcome::Wrong(format!("read: {e}")),
        }
    };
    broker.close().await.ok();
    outcome
}

/// The byte position a `Corrupt` message names (`…: byte N: …`).
fn byte_position(message: &str) -> Option<u64> {
    let (_, rest) = message.split_once("byte ")?;
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// Flip one byte at every position (those `bytes_of_batch` selects, by
/// index in the batch) of a batch that has batches after it, in the given
/// segment (index into the partition's segments), and collect
/// each position where the damage was not reported as `Corrupt` naming the
/// file and the batch's position.
async fn flip_every_byte_of_a_middle_batch(
    segment_index: usize,
    bytes_of_batch: impl Fn(usize) -> bool,
) -> Vec<String> {
    let base = tempfile::tempdir().unwrap();
    let golden = base.path().join("golden");
    // Many small batches at the end, so the last segment has several.
    let sizes = [2, 3, 1, 4, 2, 5, 1, 3, 2, 2, 3, 1, 1, 2, 1, 1, 2, 1];
    let total = written_store(&golden, 3000, &sizes).await;
    let segs = segments(&golden, TOPIC, 0);
    assert!(segs.len() >= 2, "expected several segments: {segs:?}");
    let seg = segs[if segment_index == usize::MAX {
        segs.len() - 1
    } else {
        segment_index
    }]
    .clone();
    let name = seg.file_name().unwrap().to_owned();
    let bytes = std::fs::read(&seg).unwrap();
    let all = batches(&bytes);
    assert!(all.len() >= 3, "segment {seg:?} has {} batches", all.len());
    let (pos, len, base_offset, _) = all[all.len() / 2];
    let mut problems = Vec::new();
    let dir = base.path().join("flipped");
    for i in (pos..pos + len).filter(|i| bytes_of_batch(i - pos)) {
        for xor in [0x01u8, 0x40, 0xff] {
            if dir.exists() {
                std::fs::remove_dir_all(&dir).unwrap();
            }
            copy_dir(&golden, &dir);
            let mut damaged = bytes.clone();
            damaged[i] ^= xor;
            std::fs::write(partition_dir(&dir, TOPIC, 0).join(&name), &damaged).unwrap();
            let what = format!(
                "byte {} of the batch at {pos} (offset {base_offset}, {len} bytes) of {} xor {xor:#04x}",
                i - pos,
                name.to_string_lossy()
            );
            match open_and_read(&dir, 3000, total).await {
                Outcome::Corrupt(message) => {
                    // The position named is where the damage was found: the
                    // damaged batch, or (a damaged length or count) where
                    // the walk from it lost step, never before it.
                    let names_file = message.contains(&*name.to_string_lossy());
                    let names_pos = byte_position(&message)
                        .is_some_and(|at| at >= pos as u64 && at <= bytes.len() as u64);
                    if !(names_file && names_pos) {
                        problems.push(format!(
                            "{what}: Corrupt message does not name file and position: {message}"
                        ));
                    }
                }
                Outcome::Wrong(e) => problems.push(format!("{what}: {e}")),
            }
        }
    }
    problems
}

/// The batch header's length field (bytes 4..8), which the CRC does not
/// cover.
fn is_length_field(i: usize) -> bool {
    (4..8).contains(&i)
}

fn assert_no_problems(problems: Vec<String>) {
    assert!(
        problems.is_empty(),
        "{} of the flips were not reported as Corrupt:\n{}",
        problems.len(),
        problems.join("\n")
    );
}

/// (b) Damage in the active (last) segment, checked at open: every byte of
/// the batch but its length field (see the next test).
#[tokio::test]
async fn damage_before_the_tail_of_the_last_segment_is_corrupt() {
    assert_no_problems(
        flip_every_byte_of_a_middle_batch(usize::MAX, |i| !is_length_field(i)).await,
    );
}

/// (b) A damaged length field in a batch of the active segment that has
/// batches after it. A length grown past the end of the file makes the
/// batch look like a torn write: recovery truncates the file there and the
/// acknowledged records after it are lost without an error.
#[tokio::test]
async fn damaged_length_before_the_tail_of_the_last_segment_is_corrupt() {
    assert_no_problems(flip_every_byte_of_a_middle_batch(usize::MAX, is_length_field).await);
}

/// (b) Damage in a sealed (older) segment, checked as it is read: every
/// byte of the batch, length field included.
#[tokio::test]
async fn damage_in_a_sealed_segment_is_corrupt_at_read() {
    assert_no_problems(flip_every_byte_of_a_middle_batch(0, |_| true).await);
}

/// A batch whose base offset does not follow the previous batch (a
/// segment spliced from another) is `Corrupt`, not renumbered.
#[tokio::test]
async fn out_of_sequence_batch_is_corrupt() {
    let base = tempfile::tempdir().unwrap();
    let dir = base.path().join("store");
    written_store(&dir, 1 << 20, &[2, 3, 2, 2]).await;
    let file = segments(&dir, TOPIC, 0).pop().unwrap();
    let bytes = std::fs::read(&file).unwrap();
    let all = batches(&bytes);
    // Drop the second batch: the third now follows the first.
    let (pos, len, _, _) = all[1];
    let mut spliced = bytes[..pos].to_vec();
    spliced.extend_from_slice(&bytes[pos + len..]);
    std::fs::write(&file, &spliced).unwrap();
    match open_and_read(&dir, 1 << 20, 9).await {
        Outcome::Corrupt(message) => assert!(
            message.contains(&*file.file_name().unwrap().to_string_lossy())
                && message.contains(&pos.to_string()),
            "{message}"
        ),
        Outcome::Wrong(e) => panic!("{e}"),
    }
}

/// (c) One owner at a time: a second open is `Locked`, through the broker
/// and through the storage; closing or dropping the first frees the store.
#[tokio::test]
async fn second_open_is_locked_until_the_first_is_closed_or_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let first = open(dir.path(), 1 << 20).await.expect("first open");
    first
        .create_topic(TOPIC, TopicConfig::new(1))
        .await
        .unwrap();
    let err = open(dir.path(), 1 << 20).await.expect_err("second open");
    assert_eq!(err.kind(), ErrorKind::Locked, "{err}");
    let err = MmapStorage::open(dir.path(), MmapOptions::default()).expect_err("storage open");
    assert_eq!(err.kind(), ErrorKind::Locked, "{err}");
    assert!(
        err.to_string()
            .contains(&*dir.path().to_string_lossy().to_string()),
        "Locked names the store: {err}"
    );

    // Closed: opens at once.
    first.close().await.unwrap();
    let second = open(dir.path(), 1 << 20).await.expect("open after close");
    second
        .producer()
        .await
        .unwrap()
        .send(TOPIC, Record::new("x"))
        .await
        .unwrap();
    assert_eq!(
        open(dir.path(), 1 << 20).await.unwrap_err().kind(),
        ErrorKind::Locked
    );

    // Dropped without close: the lock goes with the last handle. Background
    // tasks may hold the storage for a moment, so wait for the condition.
    drop(second);
    let deadline = Instant::now() + Duration::from_secs(10);
    let third = loop {
        match open(dir.path(), 1 << 20).await {
            Ok(b) => break b,
            Err(e) if e.kind() == ErrorKind::Locked && Instant::now() < deadline => {
                tokio::task::yield_now().await;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(e) => panic!("open after drop: {e}"),
        }
    };
    assert_eq!(log_end(&third, TOPIC, 0).await, 1);
    third.close().await.unwrap();

    // Storage alone: dropping it unlocks.
    let storage = MmapStorage::open(dir.path(), MmapOptions::default()).expect("storage");
    assert_eq!(
        MmapStorage::open(dir.path(), MmapOptions::default())
            .unwrap_err()
            .kind(),
        ErrorKind::Locked
    );
    drop(storage);
    MmapStorage::open(dir.path(), MmapOptions::default()).expect("storage after drop");
}

/// Frames of `state.log`: (position, length, keys changed).
fn state_frames(bytes: &[u8]) -> Vec<(usize, usize, Vec<String>)> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < bytes.len() {
        let (changes, len) = decode_state_frame(&bytes[pos..]).expect("a clean state log");
        out.push((pos, len, changes.into_iter().map(|(k, _)| k).collect()));
        pos += len;
    }
    out
}

async fn committed(broker: &MmapBroker, group: &str) -> Vec<(u32, u64)> {
    let lag = broker.group_lag(group).await.expect("group lag");
    let mut out: Vec<(u32, u64)> = lag
        .partitions
        .iter()
        .filter(|p| p.topic == TOPIC)
        .map(|p| (p.partition, p.committed))
        .collect();
    out.sort();
    out
}

/// (d) Cut `state.log` at every byte of its last frame: every commit
/// before it survives, the cut one is the only thing lost.
#[tokio::test]
async fn state_log_cut_at_every_byte_of_the_last_frame() {
    let base = tempfile::tempdir().unwrap();
    let golden = base.path().join("golden");
    {
        let broker = conveyor_mmap::open(
            &golden,
            BrokerOptions::default().with_durability(Durability::Always),
            MmapOptions::default(),
        )
        .await
        .unwrap();
        broker
            .create_topic(TOPIC, TopicConfig::new(2))
            .await
            .unwrap();
        let producer = broker.producer().await.unwrap();
        for i in 0..20 {
            producer.send(TOPIC, record(i % 2, i as u64)).await.unwrap();
        }
        let consumer = broker
            .consumer("billing", &[TOPIC], GroupConfig::stream())
            .await
            .unwrap();
        // Commits 1..=4 on partition 1, then 1..=7 on partition 0: the
        // last frame written is partition 0's commit of 7.
        for n in 1..=4 {
            consumer.commit(TOPIC, 1, n).await.unwrap();
        }
        for n in 1..=7 {
            consumer.commit(TOPIC, 0, n).await.unwrap();
        }
        consumer.close().await.unwrap();
        assert_eq!(committed(&broker, "billing").await, vec![(0, 7), (1, 4)]);
        broker.close().await.unwrap();
    }
    let state = std::fs::read(golden.join("state.log")).unwrap();
    let frames = state_frames(&state);
    let &(last_pos, last_len, ref last_keys) = frames.last().unwrap();
    // The expected state once the last frame is gone: if the last frame is
    // the final commit, partition 0 is back at 6; otherwise nothing of
    // the commits changes.
    let final_commit = last_keys.iter().any(|k| k == "c/billing/orders/0");
    let before = if final_commit {
        vec![(0, 6), (1, 4)]
    } else {
        vec![(0, 7), (1, 4)]
    };
    for cut in last_pos..=last_pos + last_len {
        let dir = base.path().join(format!("cut-{cut}"));
        copy_dir(&golden, &dir);
        std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join("state.log"))
            .unwrap()
            .set_len(cut as u64)
            .unwrap();
        let context = format!(
            "state.log cut at byte {} of its last frame ({last_len} bytes, keys {last_keys:?})",
            cut - last_pos
        );
        let broker = open(&dir, 1 << 20)
            .await
            .unwrap_or_else(|e| panic!("{context}: open: {e}"));
        let want = if cut == last_pos + last_len {
            vec![(0, 7), (1, 4)]
        } else {
            before.clone()
        };
        assert_eq!(committed(&broker, "billing").await, want, "{context}");
        assert_eq!(log_end(&broker, TOPIC, 0).await, 10, "{context}");
        // The store goes on: a new commit persists across a reopen.
        let consumer = broker
            .consumer("billing", &[TOPIC], GroupConfig::stream())
            .await
            .unwrap();
        consumer.commit(TOPIC, 0, 9).await.unwrap();
        consumer.close().await.unwrap();
        broker.close().await.unwrap();
        let broker = open(&dir, 1 << 20).await.unwrap();
        assert_eq!(
            committed(&broker, "billing").await,
            vec![(0, 9), (1, 4)],
            "{context}: after a commit on the recovered log"
        );
        broker.close().await.unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// Flip every selected byte (by index in the frame) of the second-to-last
/// frame of a state log; collect each flip not reported as `Corrupt`
/// naming `state.log` and the frame's position.
async fn flip_state_frame(bytes_of_frame: impl Fn(usize) -> bool) -> Vec<String> {
    let base = tempfile::tempdir().unwrap();
    let golden = base.path().join("golden");
    {
        let broker = open(&golden, 1 << 20).await.unwrap();
        broker
            .create_topic(TOPIC, TopicConfig::new(1))
            .await
            .unwrap();
        let producer = broker.producer().await.unwrap();
        for i in 0..5 {
            producer.send(TOPIC, record(0, i)).await.unwrap();
        }
        let consumer = broker
            .consumer("billing", &[TOPIC], GroupConfig::stream())
            .await
            .unwrap();
        for n in 1..=3 {
            consumer.commit(TOPIC, 0, n).await.unwrap();
        }
        consumer.close().await.unwrap();
        broker.close().await.unwrap();
    }
    let state = std::fs::read(golden.join("state.log")).unwrap();
    let frames = state_frames(&state);
    assert!(frames.len() >= 3);
    let (pos, len, _) = frames[frames.len() - 2];
    let mut problems = Vec::new();
    for i in (pos..pos + len).filter(|i| bytes_of_frame(i - pos)) {
        for xor in [0x01u8, 0x40, 0xff] {
            let dir = base.path().join(format!("flip-{i}-{xor}"));
            copy_dir(&golden, &dir);
            let mut damaged = state.clone();
            damaged[i] ^= xor;
            std::fs::write(dir.join("state.log"), &damaged).unwrap();
            let what = format!("byte {} of the frame at {pos} xor {xor:#04x}", i - pos);
            match open(&dir, 1 << 20).await {
                Err(e) if e.kind() == ErrorKind::Corrupt => {
                    let m = e.to_string();
                    if !(m.contains("state.log") && byte_position(&m) == Some(pos as u64)) {
                        problems.push(format!("{what}: message {m}"));
                    }
                }
                Err(e) => problems.push(format!("{what}: {e}")),
                Ok(b) => {
                    problems.push(format!(
                        "{what}: opened, commits now {:?} (3 were committed)",
                        committed(&b, "billing").await
                    ));
                    b.close().await.unwrap();
                }
            }
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }
    problems
}

/// Damage in a state frame followed by other frames is `Corrupt` naming
/// `state.log` and the frame's position: every byte but the length field.
#[tokio::test]
async fn damaged_state_frame_before_the_tail_is_corrupt() {
    assert_no_problems(flip_state_frame(|i| !is_length_field(i)).await);
}

/// The same for the frame's length field (not covered by its CRC): a
/// length grown past the end of the file is taken for a torn frame, the
/// file is truncated there and the later commits are lost silently.
#[tokio::test]
async fn damaged_state_frame_length_before_the_tail_is_corrupt() {
    assert_no_problems(flip_state_frame(is_length_field).await);
}
