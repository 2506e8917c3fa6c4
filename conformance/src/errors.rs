//! §7, bad input and failure: every bad input gives its `ErrorKind`, names
//! what was wrong, writes nothing, and never panics; a closed broker says
//! `Closed`; and two rules of §4: a group keeps its mode, and a message is
//! settled only by the group it was delivered to.
//!
//! `§N` names a section of `docs/semantics.md`;
//! quoted text is the rule a case checks. Each case's doc comment starts
//! with the sections it checks.

use crate::{expect_kind, poll_n, unique, Backend, Ctx, WAIT};
use conveyor_core::prelude::*;
use conveyor_core::NackOptions;
use conveyor_core::{
    DlqPolicy, ErrorKind, GroupConfig, Record, Result, RetryBackoff, SeekTo, TopicConfig,
};
use std::time::Duration;

/// §1, §7: "oversize record ... is refused before anything is written" with
/// `MessageTooLarge`: key + value + headers (names and values) count; the exact
/// limit is fine, one byte over is not.
pub async fn oversize_is_message_too_large(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let topic = ctx
        .topic_with("size", TopicConfig::new(1).with_max_message_bytes(100))
        .await?;
    let p = ctx.producer().await?;
    let exact = Record::new(vec![1u8; 60])
        .with_key(vec![2u8; 20])
        .with_header("hh", vec![3u8; 18]);
    assert_eq!(exact.size(), 100);
    p.send(&topic, exact).await?;
    let over = [
        Record::new(vec![1u8; 101]),
        Record::new(vec![1u8; 61]).with_key(vec![2u8; 40]),
        Record::new(vec![1u8; 60])
            .with_key(vec![2u8; 20])
            .with_header("hhh", vec![3u8; 18]),
        Record::new(vec![1u8; 60])
            .with_key(vec![2u8; 20])
            .with_header("hh", vec![3u8; 19]),
    ];
    for r in over {
        let e = expect_kind(p.send(&topic, r).await, ErrorKind::MessageTooLarge);
        assert!(e.message().contains(&topic), "names the topic: {e}");
    }
    assert_eq!(ctx.log_ends(&topic).await?, vec![1], "nothing written");
    // The default limit is 1 MiB.
    let default = ctx.topic("size-default", 1).await?;
    expect_kind(
        p.send(&default, Record::new(vec![0u8; 1024 * 1024 + 1]))
            .await,
        ErrorKind::MessageTooLarge,
    );
    assert_eq!(ctx.log_ends(&default).await?, vec![0]);
    Ok(())
}

/// §7: "partition out of range" is `PartitionOutOfRange`, names topic and
/// partition, and writes nothing (send, fetch, offset_for_timestamp, commit,
/// seek).
pub async fn partition_out_of_range(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let topic = ctx.topic("range", 2).await?;
    let p = ctx.producer().await?;
    let e = expect_kind(
        p.send(&topic, Record::new("x").with_partition(2)).await,
        ErrorKind::PartitionOutOfRange,
    );
    assert!(
        e.message().contains(&topic) && e.message().contains('2'),
        "{e}"
    );
    expect_kind(
        p.send(&topic, Record::new("x").with_partition(u32::MAX))
            .await,
        ErrorKind::PartitionOutOfRange,
    );
    expect_kind(
        ctx.broker.fetch(&topic, 2, 0, 1).await,
        ErrorKind::PartitionOutOfRange,
    );
    expect_kind(
        ctx.broker.offset_for_timestamp(&topic, 9, 0).await,
        ErrorKind::PartitionOutOfRange,
    );
    let c = ctx
        .broker
        .consumer(&unique("g"), &[&topic], GroupConfig::stream())
        .await?;
    expect_kind(c.commit(&topic, 2, 0).await, ErrorKind::PartitionOutOfRange);
    expect_kind(
        c.seek(&topic, 5, SeekTo::Beginning).await,
        ErrorKind::PartitionOutOfRange,
    );
    assert_eq!(ctx.log_ends(&topic).await?, vec![0, 0]);
    Ok(())
}

/// §4, §7: "invalid names" for groups (the rules of topics) and invalid group
/// configs are `InvalidArgument`; no group is created.
pub async fn invalid_group_input(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let topic = ctx.topic("ginput", 1).await?;
    let long = "g".repeat(250);
    for bad in ["", long.as_str(), "a b", "g/1", "ü"] {
        expect_kind(
            ctx.broker
                .consumer(bad, &[&topic], GroupConfig::stream())
                .await,
            ErrorKind::InvalidArgument,
        );
        expect_kind(ctx.broker.group_lag(bad).await, ErrorKind::InvalidArgument);
    }
    let group = unique("g");
    let bad_configs = [
        GroupConfig::queue().with_dlq(DlqPolicy::new(0)),
        GroupConfig::queue().with_visibility_timeout(Duration::ZERO),
        GroupConfig::stream().with_session_timeout(Duration::ZERO),
        GroupConfig::queue().with_dlq(DlqPolicy::new(3).with_topic("bad topic")),
    ];
    for config in bad_configs {
        expect_kind(
            ctx.broker.consumer(&group, &[&topic], config).await,
            ErrorKind::InvalidArgument,
        );
    }
    expect_kind(
        ctx.broker
            .consumer(&group, &[], GroupConfig::stream())
            .await,
        ErrorKind::InvalidArgument,
    );
    assert!(
        !ctx.broker.list_groups().await?.contains(&group),
        "no group created"
    );
    let bad_topic = "a".repeat(250);
    expect_kind(
        ctx.broker
            .consumer(&group, &[&bad_topic], GroupConfig::stream())
            .await,
        ErrorKind::InvalidArgument,
    );
    Ok(())
}

/// §7: "unknown ... group" is `GroupNotFound` for `group_lag`.
pub async fn unknown_group_is_group_not_found(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let group = unique("nobody");
    let e = expect_kind(ctx.broker.group_lag(&group).await, ErrorKind::GroupNotFound);
    assert!(e.message().contains(&group), "names the group: {e}");
    Ok(())
}

/// §4: "A group has one delivery mode, fixed when it is first created; joining
/// with another mode is `ErrorKind::GroupModeMismatch`" (both ways, also after
/// every member left).
pub async fn group_mode_mismatch(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let topic = ctx.topic("mode", 1).await?;
    let (s, q) = (unique("gs"), unique("gq"));
    let cs = ctx
        .broker
        .consumer(&s, &[&topic], GroupConfig::stream())
        .await?;
    let cq = ctx
        .broker
        .consumer(&q, &[&topic], GroupConfig::queue())
        .await?;
    let e = expect_kind(
        ctx.broker
            .consumer(&s, &[&topic], GroupConfig::queue())
            .await,
        ErrorKind::GroupModeMismatch,
    );
    assert!(e.message().contains(&s), "names the group: {e}");
    expect_kind(
        ctx.broker
            .consumer(&q, &[&topic], GroupConfig::stream())
            .await,
        ErrorKind::GroupModeMismatch,
    );
    cs.close().await?;
    cq.close().await?;
    expect_kind(
        ctx.broker
            .consumer(&s, &[&topic], GroupConfig::queue())
            .await,
        ErrorKind::GroupModeMismatch,
    );
    Ok(())
}

/// §7: Every call on a closed broker fails with `Closed` ("Later calls fail
/// with `Closed`", `Broker::close`), and closing twice is fine.
pub async fn closed_broker_returns_closed(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let topic = ctx.topic("closed", 1).await?;
    let p = ctx.producer().await?;
    let c = ctx
        .broker
        .consumer(&unique("g"), &[&topic], GroupConfig::queue())
        .await?;
    p.send(&topic, Record::new("x")).await?;
    let m = poll_n(c.as_ref(), 1, WAIT).await?.remove(0);
    let store = ctx.broker.idempotency_store();
    let b = ctx.broker.clone();
    b.close().await?;
    b.close().await?;
    let k = ErrorKind::Closed;
    expect_kind(b.create_topic(&unique("t"), TopicConfig::new(1)).await, k);
    expect_kind(b.describe_topic(&topic).await, k);
    expect_kind(b.list_topics().await, k);
    expect_kind(b.list_groups().await, k);
    expect_kind(b.producer().await, k);
    expect_kind(
        b.consumer(&unique("g"), &[&topic], GroupConfig::stream())
            .await,
        k,
    );
    expect_kind(b.fetch(&topic, 0, 0, 1).await, k);
    expect_kind(b.offset_for_timestamp(&topic, 0, 0).await, k);
    expect_kind(b.add_partitions(&topic, 2).await, k);
    expect_kind(b.delete_topic(&topic).await, k);
    expect_kind(p.send(&topic, Record::new("y")).await, k);
    expect_kind(c.poll(1, Duration::from_millis(10)).await, k);
    expect_kind(c.ack(&m).await, k);
    expect_kind(store.first_seen("k", Duration::from_secs(1)).await, k);
    Ok(())
}

/// §7: "No input makes the library panic": extreme durations and offsets are
/// accepted or refused with an error, never a panic.
pub async fn extreme_values_do_not_panic(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let topic = ctx
        .topic_with(
            "extreme",
            TopicConfig::new(1).with_dedup_window(Duration::MAX),
        )
        .await?;
    let p = ctx.producer().await?;
    p.send(&topic, Record::new("a").with_idempotency_key("k"))
        .await?;
    p.send(&topic, Record::new("a").with_idempotency_key("k"))
        .await?;
    p.send(&topic, Record::new("b")).await?;
    let _ = ctx.broker.fetch(&topic, 0, u64::MAX, usize::MAX).await?;
    let _ = ctx.broker.fetch(&topic, 0, 0, 0).await?;
    let _ = ctx.broker.offset_for_timestamp(&topic, 0, u64::MAX).await?;
    let store = ctx.broker.idempotency_store();
    let _ = store.first_seen(&unique("k"), Duration::MAX).await;
    let q = ctx
        .broker
        .consumer(
            &unique("g"),
            &[&topic],
            GroupConfig::queue()
                .with_visibility_timeout(Duration::MAX)
                .with_session_timeout(Duration::MAX)
                .with_retry_backoff(RetryBackoff::exponential(Duration::MAX, Duration::MAX)),
        )
        .await?;
    assert!(q.poll(0, Duration::ZERO).await?.is_empty());
    let got = poll_n(q.as_ref(), 2, WAIT).await?;
    let _ = q.extend(&got[0], Duration::MAX).await;
    let _ = q
        .nack(&got[0], NackOptions::new().with_delay(Duration::MAX))
        .await;
    let _ = q.nack(&got[1], NackOptions::new()).await;
    let s = ctx
        .broker
        .consumer(&unique("g"), &[&topic], GroupConfig::stream())
        .await?;
    // Offsets past the log end, up to the ones a signed 64-bit column or a
    // Lua number cannot hold, are bad input, not an internal error.
    let owned = poll_n(s.as_ref(), 2, WAIT).await?;
    assert_eq!(owned.len(), 2);
    for offset in [u64::MAX, 1 << 63, (1 << 53) + 1] {
        expect_kind(
            s.commit(&topic, 0, offset).await,
            ErrorKind::InvalidArgument,
        );
    }
    let _ = s.seek(&topic, 0, SeekTo::Offset(u64::MAX)).await;
    let _ = s.seek(&topic, 0, SeekTo::Timestamp(u64::MAX)).await;
    let _ = s.poll(10, Duration::from_millis(10)).await?;
    // The most a poll may ask for: the backend returns what it has.
    let _ = s.poll(usize::MAX, Duration::from_millis(10)).await?;
    let _ = q.poll(usize::MAX, Duration::from_millis(10)).await?;
    ctx.broker.describe_topic(&topic).await?;
    ctx.broker.list_groups().await?;
    Ok(())
}

/// §4, §7: "Groups are independent: one group's progress, failures and DLQ
/// never affect another's" (§4), and bad input is refused before anything moves (§7): a
/// message can be settled only by the group it was delivered to. Another
/// group's member acking it, or anyone acking a message read with `fetch`, is
/// `InvalidArgument` and moves nothing; so is a message whose position or
/// attempt was changed after delivery (an offset of `u64::MAX` must not
/// overflow a commit).
pub async fn settling_is_bound_to_the_delivery(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let topic = ctx.topic("bound", 1).await?;
    let p = ctx.producer().await?;
    for v in ["a", "b"] {
        p.send(&topic, Record::new(v)).await?;
    }
    for config in [GroupConfig::stream(), GroupConfig::queue()] {
        let (mine, theirs) = (unique("mine"), unique("theirs"));
        let a = ctx
            .broker
            .consumer(&mine, &[&topic], config.clone())
            .await?;
        let b = ctx
            .broker
            .consumer(&theirs, &[&topic], config.clone())
            .await?;
        let got = poll_n(a.as_ref(), 2, WAIT).await?;
        assert_eq!(got.len(), 2);
        let e = expect_kind(b.ack(&got[1]).await, ErrorKind::InvalidArgument);
        assert!(
            e.to_string().contains(&mine),
            "names the receiving group: {e}"
        );
        expect_kind(
            b.nack(&got[1], NackOptions::new()).await,
            ErrorKind::InvalidArgument,
        );
        let lag = ctx.broker.group_lag(&theirs).await?;
        assert_eq!(
            lag.total_lag(),
            2,
            "the other group's position did not move"
        );

        let fetched = ctx.broker.fetch(&topic, 0, 0, 1).await?;
        expect_kind(a.ack(&fetched[0]).await, ErrorKind::InvalidArgument);

        let mut past_end = got[1].clone();
        past_end.offset = u64::MAX;
        expect_kind(a.ack(&past_end).await, ErrorKind::InvalidArgument);
        let mut last_try = got[0].clone();
        last_try.attempt = u32::MAX;
        expect_kind(
            a.nack(&last_try, NackOptions::new()).await,
            ErrorKind::InvalidArgument,
        );
        assert_eq!(
            ctx.broker.group_lag(&mine).await?.total_lag(),
            2,
            "nothing was settled by the refused calls"
        );
        for m in &got {
            a.ack(m).await?;
        }
        assert_eq!(ctx.broker.group_lag(&mine).await?.total_lag(), 0);
        assert!(
            ctx.broker
                .list_topics()
                .await?
                .iter()
                .all(|t| !t.ends_with(".dlq")),
            "nothing was dead-lettered"
        );
    }
    Ok(())
}

/// §3, §7: a delivery time more than the documented maximum ahead
/// (`validate::MAX_DELIVERY_DELAY`, ten years) is refused with
/// `InvalidArgument` before anything is written, whatever the backend's
/// clock arithmetic; the partition goes on serving its other records.
pub async fn far_delivery_time_is_refused(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let topic = ctx.topic("far", 1).await?;
    let p = ctx.producer().await?;
    p.send(&topic, Record::new("before")).await?;
    let far_future = std::time::SystemTime::now() + Duration::from_secs(100 * 365 * 86_400);
    for bad in [
        Record::new("x").with_delay(Duration::MAX),
        Record::new("x").with_delay(Duration::from_secs(u64::MAX / 2)),
        Record::new("x").with_deliver_at(far_future),
        deliver_at(u64::MAX),
        deliver_at(i64::MAX as u64 + 1),
    ] {
        expect_kind(p.send(&topic, bad).await, ErrorKind::InvalidArgument);
    }
    expect_kind(
        p.send_batch(
            &topic,
            vec![
                Record::new("ok"),
                Record::new("x").with_delay(Duration::MAX),
            ],
        )
        .await,
        ErrorKind::InvalidArgument,
    );
    // A year ahead is fine: stored, not offered to a queue group yet.
    p.send(
        &topic,
        Record::new("later").with_delay(Duration::from_secs(365 * 86_400)),
    )
    .await?;
    p.send(&topic, Record::new("after")).await?;
    assert_eq!(
        ctx.log_ends(&topic).await?,
        vec![3],
        "only the good records"
    );
    let fetched = ctx.broker.fetch(&topic, 0, 0, 10).await?;
    assert_eq!(fetched.len(), 3);
    let q = ctx
        .broker
        .consumer(&unique("g"), &[&topic], GroupConfig::queue())
        .await?;
    let got = poll_n(q.as_ref(), 2, WAIT).await?;
    let values: Vec<&[u8]> = got.iter().map(|m| m.value.as_ref()).collect();
    assert_eq!(values, vec![&b"before"[..], &b"after"[..]]);
    Ok(())
}

fn deliver_at(ms: u64) -> Record {
    let mut r = Record::new("x");
    r.deliver_at = Some(ms);
    r
}

/// §3, §7: one caller's bad record fails that caller's send only: sends to
/// one partition from many tasks at once (which a backend may merge into
/// one write) succeed for every valid record, round after round, while a
/// bad record among them is refused on its own.
pub async fn bad_record_fails_only_its_own_send(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let topic = ctx.topic("isolated", 1).await?;
    let p = ctx.producer().await?;
    let mut stored = 0;
    for round in 0..3 {
        let mut tasks = Vec::new();
        for i in 0..40 {
            let p = p.clone();
            let topic = topic.clone();
            let record = match i {
                7 => Record::new("far").with_delay(Duration::MAX),
                19 => Record::new("nul").with_idempotency_key("a\0b"),
                31 => Record::new("long").with_idempotency_key("k".repeat(1 << 20)),
                _ => Record::new(format!("{round}-{i}")).with_idempotency_key(unique("ok")),
            };
            tasks.push(tokio::spawn(
                async move { (i, p.send(&topic, record).await) },
            ));
        }
        for t in tasks {
            let (i, result) = t.await.expect("task");
            match i {
                7 | 19 | 31 => {
                    let e = expect_kind(result, ErrorKind::InvalidArgument);
                    assert!(e.to_string().len() < 1024, "the key is not echoed whole");
                }
                _ => {
                    result.unwrap_or_else(|e| panic!("round {round}: valid send {i} failed: {e}"));
                    stored += 1;
                }
            }
        }
    }
    assert_eq!(ctx.log_ends(&topic).await?, vec![stored]);
    Ok(())
}
