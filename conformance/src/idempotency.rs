//! §3 idempotent produce and §8 idempotent consumers: dedup of producer
//! idempotency keys within the window, and the atomic `IdempotencyStore`.
//!
//! `§N` names a section of `docs/semantics.md`;
//! quoted text is the rule a case checks. Each case's doc comment starts
//! with the sections it checks.

use crate::{eventually, Backend, Ctx, WAIT};
use conveyor_core::prelude::*;
use conveyor_core::{partition_for_key, ErrorKind, Record, Result, TopicConfig};
use std::time::Duration;

/// §3: "a record with an idempotency key that was already appended to the same
/// partition within the topic's dedup window is not appended again [...];
/// `send` returns the original receipt", and "with an idempotency key, murmur2
/// of the idempotency key (so a retry lands where the first try did)".
pub async fn duplicate_send_returns_original_receipt(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let topic = ctx.topic("idem", 4).await?;
    let p = ctx.producer().await?;
    let first = p
        .send(&topic, Record::new("a").with_idempotency_key("evt-1"))
        .await?;
    assert_eq!(
        first.partition,
        partition_for_key(b"evt-1", 4),
        "an unkeyed record is routed by its idempotency key"
    );
    p.send(&topic, Record::new("other")).await?;
    // A retry with another value: the original receipt, nothing appended.
    let again = p
        .send(&topic, Record::new("b").with_idempotency_key("evt-1"))
        .await?;
    assert_eq!(again, first);
    // The same key sent to another partition on purpose: dedup is per
    // partition, so it is appended there.
    let elsewhere = (first.partition + 1) % 4;
    let other = p
        .send(
            &topic,
            Record::new("e")
                .with_idempotency_key("evt-1")
                .with_partition(elsewhere),
        )
        .await?;
    assert_eq!(other.partition, elsewhere);
    let batch = p
        .send_batch(
            &topic,
            vec![
                Record::new("c").with_idempotency_key("evt-1"),
                Record::new("d").with_idempotency_key("evt-2"),
            ],
        )
        .await?;
    assert_eq!(batch[0], first);
    assert_eq!(
        ctx.log_ends(&topic).await?.iter().sum::<u64>(),
        4,
        "evt-1 appended once per partition it was sent to"
    );
    let m = ctx
        .broker
        .fetch(&topic, first.partition, first.offset, 1)
        .await?;
    assert_eq!(m[0].value, "a".as_bytes());
    Ok(())
}

/// §3: "Concurrent sends of the same key append exactly once": 16 concurrent
/// sends of one key get one receipt and one record.
pub async fn concurrent_duplicates_append_once(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let topic = ctx.topic("idemc", 3).await?;
    for round in 0..5 {
        let mut tasks = Vec::new();
        for i in 0..16 {
            let p = ctx.producer().await?;
            let topic = topic.clone();
            tasks.push(tokio::spawn(async move {
                p.send(
                    &topic,
                    Record::new(format!("{i}")).with_idempotency_key(format!("k{round}")),
                )
                .await
            }));
        }
        let mut receipts = Vec::new();
        for t in tasks {
            receipts.push(t.await.expect("task")?);
        }
        assert!(receipts.iter().all(|r| *r == receipts[0]), "one receipt");
    }
    assert_eq!(ctx.log_ends(&topic).await?.iter().sum::<u64>(), 5);
    Ok(())
}

/// §3: A key repeated inside one batch is appended once and both receipts are
/// the same (the second was "already appended" by the time it counts).
pub async fn duplicate_within_batch_appends_once(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let topic = ctx.topic("idemb", 1).await?;
    let p = ctx.producer().await?;
    let rs = p
        .send_batch(
            &topic,
            vec![
                Record::new("1").with_idempotency_key("x"),
                Record::new("2"),
                Record::new("3").with_idempotency_key("x"),
            ],
        )
        .await?;
    assert_eq!(rs[0], rs[2]);
    assert_ne!(rs[0].offset, rs[1].offset);
    assert_eq!(ctx.log_ends(&topic).await?, vec![2]);
    Ok(())
}

/// §3: Dedup looks only at what was "already appended to the same partition" of
/// the same topic: the same key on another topic is independent and appended
/// there.
pub async fn keys_are_per_topic(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let a = ctx.topic("idema", 1).await?;
    let b = ctx.topic("idemb", 1).await?;
    let p = ctx.producer().await?;
    for _ in 0..2 {
        p.send(&a, Record::new("v").with_idempotency_key("same"))
            .await?;
        p.send(&b, Record::new("v").with_idempotency_key("same"))
            .await?;
    }
    assert_eq!(ctx.log_ends(&a).await?, vec![1]);
    assert_eq!(ctx.log_ends(&b).await?, vec![1]);
    Ok(())
}

/// §3: "within the topic's dedup window": after the window passes, the same key
/// appends again (a topic with a 200 ms window).
pub async fn appends_again_after_dedup_window(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let topic = ctx
        .topic_with(
            "idemw",
            TopicConfig::new(1).with_dedup_window(Duration::from_millis(200)),
        )
        .await?;
    let p = ctx.producer().await?;
    let first = p
        .send(&topic, Record::new("1").with_idempotency_key("w"))
        .await?;
    let second = p
        .send(&topic, Record::new("2").with_idempotency_key("w"))
        .await?;
    assert_eq!(second, first, "within the window");
    tokio::time::sleep(Duration::from_millis(250)).await; // let the window pass
    let third = eventually("the dedup window to pass", WAIT, || {
        let p = p.clone();
        let topic = topic.clone();
        async move {
            let r = p
                .send(&topic, Record::new("3").with_idempotency_key("w"))
                .await
                .expect("send");
            (r != first).then_some(r)
        }
    })
    .await;
    assert_eq!(third.offset, 1, "appended again, next offset");
    let fourth = p
        .send(&topic, Record::new("4").with_idempotency_key("w"))
        .await?;
    assert_eq!(fourth, third, "the new append opens a new window");
    assert_eq!(ctx.log_ends(&topic).await?, vec![2]);
    Ok(())
}

/// §8: "`first_seen(key, ttl)` is atomic": of 16 concurrent calls with one key
/// exactly one is `true`; later calls are `false`; other keys are independent.
pub async fn store_first_seen_atomic(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let store = ctx.broker.idempotency_store();
    let key = crate::unique("event");
    for round in 0..3 {
        let key = format!("{key}-{round}");
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let store = store.clone();
            let key = key.clone();
            tasks.push(tokio::spawn(async move {
                store.first_seen(&key, Duration::from_secs(60)).await
            }));
        }
        let mut firsts = 0;
        for t in tasks {
            if t.await.expect("task")? {
                firsts += 1;
            }
        }
        assert_eq!(firsts, 1, "exactly one first_seen is true");
        assert!(!store.first_seen(&key, Duration::from_secs(60)).await?);
    }
    Ok(())
}

/// §7, §8: `first_seen` refuses what would not deduplicate or cannot be
/// stored, on every backend alike, with `InvalidArgument` and a short
/// message: an empty key, a zero TTL (it would remember nothing, so a
/// wrapped handler would silently run twice), a TTL over the documented
/// maximum, a key with a NUL character, a key over the maximum length.
pub async fn store_refuses_bad_keys_and_ttls(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let store = ctx.broker.idempotency_store();
    let key = crate::unique("bad");
    let long = "k".repeat(1 << 20);
    let ttl = Duration::from_secs(60);
    for (key, ttl) in [
        ("", ttl),
        (key.as_str(), Duration::ZERO),
        (key.as_str(), Duration::MAX),
        ("a\0b", ttl),
        (long.as_str(), ttl),
    ] {
        let e = crate::expect_kind(store.first_seen(key, ttl).await, ErrorKind::InvalidArgument);
        assert!(
            e.to_string().len() < 1024,
            "the key is not echoed whole: {e}"
        );
    }
    // Nothing was recorded: the key is still new.
    assert!(store.first_seen(&key, ttl).await?);
    Ok(())
}

/// §8: "within the TTL": once the TTL has passed, the key is new again.
pub async fn store_ttl_expires(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let store = ctx.broker.idempotency_store();
    let key = crate::unique("ttl");
    assert!(store.first_seen(&key, Duration::from_millis(100)).await?);
    assert!(!store.first_seen(&key, Duration::from_millis(100)).await?);
    tokio::time::sleep(Duration::from_millis(100)).await; // let the TTL pass
    eventually("the TTL to pass", WAIT, || {
        let store = store.clone();
        let key = key.clone();
        async move {
            store
                .first_seen(&key, Duration::from_secs(60))
                .await
                .expect("first_seen")
                .then_some(())
        }
    })
    .await;
    assert!(!store.first_seen(&key, Duration::from_secs(60)).await?);
    Ok(())
}

/// §8: `forget(key)` makes a key new again ("so a failed handler can run
/// again"); forgetting an unknown key is fine.
pub async fn store_forget(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let store = ctx.broker.idempotency_store();
    let key = crate::unique("forget");
    assert!(store.first_seen(&key, Duration::from_secs(60)).await?);
    store.forget(&key).await?;
    assert!(store.first_seen(&key, Duration::from_secs(60)).await?);
    assert!(!store.first_seen(&key, Duration::from_secs(60)).await?);
    store.forget(&crate::unique("never-seen")).await?;
    Ok(())
}
