//! §2, records and messages: key, value and headers come back byte for byte;
//! the broker sets the timestamp; the first attempt is 1.
//!
//! `§N` names a section of `docs/semantics.md`;
//! quoted text is the rule a case checks. Each case's doc comment starts
//! with the sections it checks.

use crate::{poll_exactly, unique, Backend, Ctx};
use bytes::Bytes;
use conveyor_core::prelude::*;
use conveyor_core::{now_ms, GroupConfig, Header, Message, Record, Result, TopicConfig};
use std::time::Duration;

/// Read the record at `offset` back through a fresh stream group and
/// through `fetch`; both must agree.
async fn read_back(ctx: &Ctx<'_>, topic: &str, partition: u32, offset: u64) -> Result<Message> {
    let fetched = ctx.broker.fetch(topic, partition, offset, 1).await?;
    assert_eq!(fetched.len(), 1, "fetch found the record");
    let c = ctx
        .broker
        .consumer(&unique("rt"), &[topic], GroupConfig::stream())
        .await?;
    c.seek(topic, partition, conveyor_core::SeekTo::Offset(offset))
        .await?;
    let got = poll_exactly(c.as_ref(), 1, Duration::ZERO).await?;
    c.close().await?;
    let m = got.into_iter().next().expect("one");
    assert_eq!(
        (&m.key, &m.value, &m.headers, m.timestamp),
        (
            &fetched[0].key,
            &fetched[0].value,
            &fetched[0].headers,
            fetched[0].timestamp
        ),
        "fetch and poll agree"
    );
    assert_eq!(
        (m.topic.as_str(), m.partition, m.offset),
        (topic, partition, offset)
    );
    assert_eq!(m.attempt, 1, "first delivery is attempt 1");
    Ok(m)
}

fn all_bytes() -> Bytes {
    Bytes::from((0..=255u8).chain((0..=255u8).rev()).collect::<Vec<u8>>())
}

/// §2: "Key, value and headers come back byte for byte as sent": every byte
/// value in key, value and header values; header names with dots and dashes.
pub async fn round_trip_byte_exact(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let topic = ctx.topic("bytes", 2).await?;
    let record = Record::new(all_bytes())
        .with_key(Bytes::from_static(b"\x00\xffkey\r\n\x80"))
        .with_header("content-type", "application/octet-stream")
        .with_header("bin", all_bytes())
        .with_header("x.y-z_0", Bytes::new())
        .with_header("ünï", Bytes::from_static(b"\xfe"))
        .with_partition(1);
    let r = ctx.producer().await?.send(&topic, record.clone()).await?;
    assert_eq!(r.partition, 1);
    let m = read_back(&ctx, &topic, 1, r.offset).await?;
    assert_eq!(m.key, record.key);
    assert_eq!(m.value, record.value);
    assert_eq!(m.headers, record.headers);
    assert_eq!(
        m.timestamp, r.timestamp,
        "message timestamp is the receipt's"
    );
    Ok(())
}

/// §2: "value (bytes, may be empty)"; an absent key stays absent and an empty
/// key stays an empty key; no headers stays no headers.
pub async fn empty_value_and_empty_key(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let topic = ctx.topic("empty", 1).await?;
    let p = ctx.producer().await?;
    let a = p.send(&topic, Record::new(Bytes::new())).await?;
    let b = p
        .send(&topic, Record::new(Bytes::new()).with_key(Bytes::new()))
        .await?;
    let ma = read_back(&ctx, &topic, 0, a.offset).await?;
    assert_eq!(ma.key, None);
    assert!(ma.value.is_empty());
    assert!(ma.headers.is_empty());
    let mb = read_back(&ctx, &topic, 0, b.offset).await?;
    assert_eq!(mb.key, Some(Bytes::new()));
    assert!(mb.value.is_empty());
    Ok(())
}

/// §1, §2: "`max_message_bytes` (default 1 MiB; key + value + headers)": a
/// record of exactly 1 MiB counting key, value and headers is accepted and
/// comes back intact.
pub async fn one_mib_record_round_trip(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let topic = ctx.topic("big", 1).await?;
    let key = Bytes::from_static(b"big-key");
    let header = Header::new("h", Bytes::from_static(b"header-value"));
    let budget = 1024 * 1024 - key.len() - header.name.len() - header.value.len();
    let value: Vec<u8> = (0..budget).map(|i| (i * 31 % 251) as u8).collect();
    let mut record = Record::new(value).with_key(key);
    record.headers.push(header);
    assert_eq!(record.size(), 1024 * 1024);
    let r = ctx.producer().await?.send(&topic, record.clone()).await?;
    let m = read_back(&ctx, &topic, 0, r.offset).await?;
    assert_eq!(m.value.len(), budget);
    assert!(m.value == record.value, "1 MiB value intact");
    assert_eq!(m.key, record.key);
    assert_eq!(m.headers, record.headers);
    Ok(())
}

/// §2: "ordered headers (`String` name, bytes value; duplicates allowed, order
/// kept)": repeated names come back in the order sent, interleaved as sent.
pub async fn duplicate_headers_keep_order(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let topic = ctx.topic("dups", 1).await?;
    let record = Record::new("v")
        .with_header("a", "1")
        .with_header("b", "x")
        .with_header("a", "2")
        .with_header("a", "1")
        .with_header("b", "y");
    let r = ctx.producer().await?.send(&topic, record.clone()).await?;
    let m = read_back(&ctx, &topic, 0, r.offset).await?;
    let got: Vec<(&str, &[u8])> = m
        .headers
        .iter()
        .map(|h| (h.name.as_str(), h.value.as_ref()))
        .collect();
    assert_eq!(
        got,
        vec![
            ("a", &b"1"[..]),
            ("b", b"x"),
            ("a", b"2"),
            ("a", b"1"),
            ("b", b"y")
        ]
    );
    Ok(())
}

/// §2: "The timestamp is the append time in milliseconds since the Unix epoch,
/// set by the broker, non-decreasing within a partition."
pub async fn timestamps_set_by_broker(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let topic = ctx.topic_with("ts", TopicConfig::new(2)).await?;
    let p = ctx.producer().await?;
    let before = now_ms();
    let mut receipts = Vec::new();
    for i in 0..50u32 {
        receipts.push(
            p.send(&topic, Record::new(format!("{i}")).with_partition(i % 2))
                .await?,
        );
        if i % 10 == 0 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    let after = now_ms();
    for part in 0..2 {
        let msgs = ctx.read_all(&topic, part).await?;
        assert_eq!(msgs.len(), 25);
        for w in msgs.windows(2) {
            assert!(w[0].timestamp <= w[1].timestamp, "non-decreasing");
        }
        for m in &msgs {
            // Allow a little clock skew for server backends.
            assert!(
                m.timestamp + 2_000 >= before && m.timestamp <= after + 2_000,
                "timestamp {} is append time (sent between {before} and {after})",
                m.timestamp
            );
            let r = receipts
                .iter()
                .find(|r| r.partition == part && r.offset == m.offset)
                .expect("receipt");
            assert_eq!(r.timestamp, m.timestamp, "receipt timestamp matches");
        }
    }
    Ok(())
}
