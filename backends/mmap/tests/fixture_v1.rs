//! A store written by format version 1 (`tests/fixtures/v1/`, committed)
//! still opens and reads back exactly (fjall's
//! `tests/keyspace_v1_load_fixture.rs`): records byte for byte, log start
//! and end per partition, a stream group's committed offsets and a queue
//! group's lag.
//!
//! The test opens a copy in a temporary directory: opening takes the
//! store's `LOCK` (created if missing; the fixture does not commit one, an
//! advisory lock lives in the kernel, not in the file) and may cut torn
//! tails, so the committed files are never opened for writing.
//!
//! # Regenerating
//!
//! `generate_fixture` (ignored) wrote the fixture, from the workspace root
//! (the path must be absolute: tests run in the crate's directory):
//!
//! ```text
//! CONVEYOR_FIXTURE_OUT=$PWD/backends/mmap/tests/fixtures/v1 \
//!     cargo test -p conveyor-mmap --test fixture_v1 -- --ignored generate_fixture
//! ```
//!
//! It writes with the *current* encoder, so it reproduces the v1 files only
//! at a commit whose encoder wrote v1 (the one that added them:
//! `git log --diff-filter=A -- backends/mmap/tests/fixtures/v1`). Never
//! regenerate the v1 fixture after the format moved on: it exists to
//! prove old stores open (the test checks every segment still says
//! `CVB1`).

mod common;

use bytes::Bytes;
use common::copy_dir;
use conveyor_core::prelude::*;
use conveyor_core::{
    Broker, BrokerOptions, DeliveryMode, GroupConfig, Header, Record, Retention, TopicConfig,
};
use conveyor_mmap::{MmapBroker, MmapOptions};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Three partitions of keyed records with headers and idempotency keys.
const ORDERS: &str = "orders";
/// Records sent to each partition of `orders`.
const ORDERS_PER_PARTITION: [u64; 3] = [6, 4, 5];
/// One partition of small segments under byte retention: its log start
/// has moved past deleted segments.
const AUDIT: &str = "audit.log";
const AUDIT_RECORDS: u64 = 40;
const SEGMENT_BYTES: u64 = 1024;
const AUDIT_RETENTION_BYTES: u64 = 2048;
/// A stream group on `orders` with commits on partitions 0 and 1.
const BILLING: &str = "billing";
const BILLING_COMMITS: [(u32, u64); 2] = [(0, 4), (1, 2)];
/// A queue group on `orders` that acked some records.
const MAILER: &str = "mailer";

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v1")
}

/// The record sent to `orders` partition `p` as its `i`-th record.
fn order(p: u32, i: u64) -> Record {
    let mut value = format!("order {p}/{i}").into_bytes();
    value.extend([0u8, 255, 10, 13, i as u8]);
    let mut r = Record::new(value).with_partition(p);
    if i % 4 != 3 {
        r = r.with_key(format!("customer-{}", i % 3));
    }
    if i.is_multiple_of(2) {
        r = r
            .with_header("trace", format!("t-{p}-{i}"))
            .with_header("trace", Bytes::from(vec![0u8, 1, 2]))
            .with_header("", Bytes::new());
    }
    if i % 3 != 1 {
        r = r.with_idempotency_key(format!("ord-{p}-{i}"));
    }
    r
}

/// The `i`-th record of `audit.log`.
fn audit(i: u64) -> Record {
    let value: Vec<u8> = (0..100u64).map(|j| (i * 7 + j) as u8).collect();
    Record::new(value).with_key(format!("audit-{i}"))
}

/// Whether the queue group `mailer` acked `orders` `p`/`offset`.
fn mailer_acked(p: u32, offset: u64) -> bool {
    matches!((p, offset), (0, 0) | (0, 1) | (0, 3) | (1, 0) | (2, 4))
}

async fn open(dir: &Path) -> conveyor_core::Result<MmapBroker> {
    conveyor_mmap::open(
        dir,
        BrokerOptions::default(),
        MmapOptions::default().with_segment_bytes(SEGMENT_BYTES),
    )
    .await
}

#[tokio::test]
async fn v1_store_opens_and_reads_back() {
    let fixture = fixture_dir();
    assert!(
        fixture.join("state.log").is_file(),
        "fixture missing at {}",
        fixture.display()
    );
    // The segments really are version 1 (magic "CVB1"), so this test keeps
    // proving that the decoder reads v1 after the format moves on.
    let mut segments = 0;
    for topic in [ORDERS, AUDIT] {
        for entry in std::fs::read_dir(fixture.join("topics").join(topic)).unwrap() {
            for file in std::fs::read_dir(entry.unwrap().path()).unwrap() {
                let path = file.unwrap().path();
                if path.extension().is_some_and(|e| e == "log") {
                    let bytes = std::fs::read(&path).unwrap();
                    assert_eq!(&bytes[..4], b"CVB1", "{}", path.display());
                    segments += 1;
                }
            }
        }
    }
    assert_eq!(segments, 5);
    let copy = tempfile::tempdir().expect("temporary directory");
    copy_dir(&fixture, copy.path());
    let broker = open(copy.path()).await.expect("v1 store opens");

    assert_eq!(broker.list_topics().await.unwrap(), vec![AUDIT, ORDERS]);

    // orders: every record byte for byte, dense from 0.
    let orders = broker.describe_topic(ORDERS).await.unwrap();
    assert_eq!(orders.partitions.len(), 3);
    let mut last_ts = 0;
    for (p, n) in ORDERS_PER_PARTITION.iter().enumerate() {
        let p = p as u32;
        let bounds = &orders.partitions[p as usize];
        assert_eq!((bounds.log_start, bounds.log_end), (0, *n), "orders/{p}");
        let back = broker.fetch(ORDERS, p, 0, 100).await.unwrap();
        assert_eq!(back.len() as u64, *n, "orders/{p}");
        for (i, m) in back.iter().enumerate() {
            let want = order(p, i as u64);
            assert_eq!(m.offset, i as u64);
            assert_eq!(m.key, want.key, "orders/{p}/{i} key");
            assert_eq!(m.value, want.value, "orders/{p}/{i} value");
            assert_eq!(m.headers, want.headers, "orders/{p}/{i} headers");
            assert!(m.timestamp >= 1_700_000_000_000, "orders/{p}/{i} timestamp");
            last_ts = last_ts.max(m.timestamp);
        }
        assert!(back.windows(2).all(|w| w[0].timestamp <= w[1].timestamp));
    }
    // One record spelled out, so the check does not rest on `order` alone.
    let first = &broker.fetch(ORDERS, 0, 0, 1).await.unwrap()[0];
    assert_eq!(first.key.as_deref(), Some(&b"customer-0"[..]));
    assert_eq!(&first.value[..], b"order 0/0\x00\xff\n\r\x00");
    assert_eq!(
        first.headers,
        vec![
            Header::new("trace", "t-0-0"),
            Header::new("trace", Bytes::from_static(&[0, 1, 2])),
            Header::new("", Bytes::new()),
        ]
    );

    // audit.log: byte retention moved the log start past deleted segments.
    let audit_desc = broker.describe_topic(AUDIT).await.unwrap();
    let bounds = &audit_desc.partitions[0];
    assert_eq!(bounds.log_end, AUDIT_RECORDS);
    assert_eq!(bounds.log_start, AUDIT_LOG_START);
    assert_eq!(
        audit_desc.config.retention,
        Retention::default().with_max_bytes(AUDIT_RETENTION_BYTES)
    );
    let back = broker.fetch(AUDIT, 0, 0, 1000).await.unwrap();
    let offsets: Vec<u64> = back.iter().map(|m| m.offset).collect();
    assert_eq!(
        offsets,
        (AUDIT_LOG_START..AUDIT_RECORDS).collect::<Vec<_>>()
    );
    for m in &back {
        let want = audit(m.offset);
        assert_eq!(
            (&m.key, &m.value),
            (&want.key, &want.value),
            "audit {}",
            m.offset
        );
        assert!(m.headers.is_empty());
    }

    // billing (stream): committed offsets as committed; partition 2 never
    // committed starts at the earliest offset.
    let lag = broker.group_lag(BILLING).await.unwrap();
    assert_eq!(lag.mode, DeliveryMode::Stream);
    let committed: Vec<(u32, u64, u64)> = lag
        .partitions
        .iter()
        .map(|p| (p.partition, p.committed, p.lag))
        .collect();
    assert_eq!(committed, vec![(0, 4, 2), (1, 2, 2), (2, 0, 5)]);

    // mailer (queue): the acked records stay settled; the rest is lag.
    let lag = broker.group_lag(MAILER).await.unwrap();
    assert_eq!(lag.mode, DeliveryMode::Queue);
    let queue: Vec<(u32, u64, u64, u64)> = lag
        .partitions
        .iter()
        .map(|p| (p.partition, p.committed, p.lag, p.in_flight))
        .collect();
    // p0 acked 0, 1, 3 of 6; p1 acked 0 of 4; p2 acked 4 of 5.
    assert_eq!(queue, vec![(0, 2, 3, 0), (1, 1, 3, 0), (2, 0, 4, 0)]);

    // The store still takes writes after the old format: the new record
    // lands at the log end and reads back.
    let receipt = broker
        .producer()
        .await
        .unwrap()
        .send(ORDERS, order(1, 4))
        .await
        .unwrap();
    assert_eq!((receipt.partition, receipt.offset), (1, 4));
    assert!(receipt.timestamp >= last_ts);
    let back = broker.fetch(ORDERS, 1, 4, 1).await.unwrap();
    assert_eq!(back[0].value, order(1, 4).value);
    broker.close().await.unwrap();

    // Reopened, the segment holding v1 batches and the new v2 batch is
    // recovered (scanned at open) and reads back whole.
    let broker = open(copy.path()).await.expect("mixed v1/v2 segment opens");
    let back = broker.fetch(ORDERS, 1, 0, 100).await.unwrap();
    let values: Vec<Bytes> = back.into_iter().map(|m| m.value).collect();
    let want: Vec<Bytes> = (0..5).map(|i| order(1, i).value).collect();
    assert_eq!(values, want);
    broker.close().await.unwrap();

    // The committed fixture itself was not touched.
    assert!(!fixture.join("LOCK").exists(), "the fixture holds no LOCK");
}

/// Log start of `audit.log` after byte retention (known from the sizes).
const AUDIT_LOG_START: u64 = 30;

/// Writes the fixture (see the module doc). Ignored: it is run by hand.
#[tokio::test]
#[ignore = "writes the committed fixture; run by hand (see the module doc)"]
async fn generate_fixture() {
    let out = std::env::var_os("CONVEYOR_FIXTURE_OUT")
        .map(PathBuf::from)
        .expect("set CONVEYOR_FIXTURE_OUT to the directory to write");
    if out.exists() {
        std::fs::remove_dir_all(&out).expect("clear the output directory");
    }
    let broker = open(&out).await.expect("open");
    broker
        .create_topic(ORDERS, TopicConfig::new(3))
        .await
        .unwrap();
    broker
        .create_topic(
            AUDIT,
            TopicConfig::new(1)
                .with_retention(Retention::default().with_max_bytes(AUDIT_RETENTION_BYTES)),
        )
        .await
        .unwrap();
    let producer = broker.producer().await.unwrap();
    for (p, n) in ORDERS_PER_PARTITION.iter().enumerate() {
        // Batches of up to two records.
        let records: Vec<Record> = (0..*n).map(|i| order(p as u32, i)).collect();
        for chunk in records.chunks(2) {
            producer.send_batch(ORDERS, chunk.to_vec()).await.unwrap();
        }
    }
    for i in 0..AUDIT_RECORDS {
        producer.send(AUDIT, audit(i)).await.unwrap();
    }

    let billing = broker
        .consumer(BILLING, &[ORDERS], GroupConfig::stream())
        .await
        .unwrap();
    billing.poll(1, Duration::from_millis(100)).await.unwrap();
    for (p, offset) in BILLING_COMMITS {
        billing.commit(ORDERS, p, offset).await.unwrap();
    }
    billing.close().await.unwrap();

    let mailer = broker
        .consumer(MAILER, &[ORDERS], GroupConfig::queue())
        .await
        .unwrap();
    let total: u64 = ORDERS_PER_PARTITION.iter().sum();
    let mut seen = 0;
    while seen < total {
        let batch = mailer.poll(100, Duration::from_millis(100)).await.unwrap();
        assert!(!batch.is_empty(), "queue poll ran dry at {seen}");
        for m in &batch {
            seen += 1;
            if mailer_acked(m.partition, m.offset) {
                mailer.ack(m).await.unwrap();
            }
        }
    }
    mailer.close().await.unwrap();
    broker.close().await.unwrap();
    std::fs::remove_file(out.join("LOCK")).expect("remove LOCK");
}
