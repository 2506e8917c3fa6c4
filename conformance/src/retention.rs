//! §6, retention: by age and by bytes, whole records from the head, log start
//! moves, log end untouched, offsets never reused, groups before the log start
//! continue at the log start.
//!
//! `§N` names a section of `docs/semantics.md`;
//! quoted text is the rule a case checks. Each case's doc comment starts
//! with the sections it checks.
//!
//! Byte retention is checked the way a segment log can honour it too:
//! the log start moved, and everything from the log start to the end is
//! readable and dense (no exact byte count).

use crate::{eventually, poll_n, unique, Backend, Ctx, WAIT};
use conveyor_core::prelude::*;
use conveyor_core::{GroupConfig, Record, Result, Retention, SeekTo, TopicConfig};
use std::time::Duration;

/// Records from the log start to the end: readable, dense, in order.
async fn check_dense_tail(ctx: &Ctx<'_>, topic: &str, partition: u32) -> Result<(u64, u64)> {
    let (start, end) = ctx.bounds(topic, partition).await?;
    let all = ctx.read_all(topic, partition).await?;
    let offsets: Vec<u64> = all.iter().map(|m| m.offset).collect();
    let want: Vec<u64> = (start..end).collect();
    assert_eq!(
        offsets, want,
        "log start {start} to end {end} readable and dense"
    );
    for m in &all {
        let n: u64 = String::from_utf8_lossy(&m.value)
            .split('-')
            .next()
            .and_then(|s| s.parse().ok())
            .expect("value starts with its index");
        assert_eq!(n, m.offset, "record at its own offset");
    }
    Ok((start, end))
}

async fn wait_log_start(ctx: &Ctx<'_>, topic: &str, at_least: u64) -> u64 {
    eventually("retention to move the log start", WAIT, || async {
        let (start, _) = ctx.bounds(topic, 0).await.expect("bounds");
        (start >= at_least).then_some(start)
    })
    .await
}

/// §6: "Retention by age ... removes whole records from the head of a
/// partition; the log start offset moves forward; offsets are never reused";
/// "it never touches the log end".
pub async fn by_age(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let config = TopicConfig::new(1)
        .with_retention(Retention::forever().with_max_age(Duration::from_millis(400)));
    let topic = ctx.topic_with("age", config).await?;
    let p = ctx.producer().await?;
    for i in 0..10u64 {
        p.send(&topic, Record::new(format!("{i}-old"))).await?;
    }
    let start = wait_log_start(&ctx, &topic, 10).await;
    assert_eq!(start, 10, "every old record removed, nothing more");
    assert_eq!(ctx.bounds(&topic, 0).await?, (10, 10), "log end untouched");
    assert!(ctx.broker.fetch(&topic, 0, 0, 10).await?.is_empty());
    let r = p.send(&topic, Record::new("10-new")).await?;
    assert_eq!(r.offset, 10, "offsets never reused");
    let (start, end) = check_dense_tail(&ctx, &topic, 0).await?;
    assert_eq!((start, end), (10, 11), "a young record stays");
    Ok(())
}

/// §6: "Retention by ... bytes removes whole records from the head"; the log
/// start moves, the tail stays readable and dense, the log end and the next
/// offset are untouched. 4 MiB go into a partition kept to 64 KiB, so a segment
/// log (which removes whole segments) must move its log start too, as long as
/// its segments are smaller than 2 MiB.
pub async fn by_bytes(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let config = TopicConfig::new(1).with_retention(Retention::forever().with_max_bytes(64 * 1024));
    let topic = ctx.topic_with("bytes", config).await?;
    let p = ctx.producer().await?;
    let pad = "x".repeat(8 * 1024);
    let n = 512u64;
    for chunk in 0..n / 8 {
        let records = (chunk * 8..chunk * 8 + 8)
            .map(|i| Record::new(format!("{i}-{pad}")))
            .collect();
        p.send_batch(&topic, records).await?;
    }
    let start = wait_log_start(&ctx, &topic, 1).await;
    let (start2, end) = check_dense_tail(&ctx, &topic, 0).await?;
    assert!(start2 >= start, "the log start never goes back");
    assert_eq!(end, n, "log end untouched");
    assert!(end - start2 >= 1, "retention keeps the newest records");
    let d = ctx.broker.describe_topic(&topic).await?;
    assert!(
        d.partitions[0].bytes < n * 8 * 1024,
        "bytes dropped with the head"
    );
    let r = p.send(&topic, Record::new(format!("{n}-{pad}"))).await?;
    assert_eq!(r.offset, n, "offsets never reused");
    check_dense_tail(&ctx, &topic, 0).await?;
    Ok(())
}

/// §6: "A group positioned before the log start continues at the log start", in
/// stream mode (committed offset below it) and queue mode.
pub async fn group_before_log_start_continues(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let config = TopicConfig::new(1)
        .with_retention(Retention::forever().with_max_age(Duration::from_millis(600)));
    let topic = ctx.topic_with("behind", config).await?;
    let p = ctx.producer().await?;
    p.send(&topic, Record::new("0-a")).await?;
    let (gs, gq) = (unique("gs"), unique("gq"));
    // Create both groups, positioned at 0, then leave.
    let s = ctx
        .broker
        .consumer(&gs, &[&topic], GroupConfig::stream())
        .await?;
    let m = poll_n(s.as_ref(), 1, WAIT).await?.remove(0);
    s.commit(&topic, 0, m.offset).await?; // committed 0: before what follows
    s.close().await?;
    ctx.broker
        .consumer(&gq, &[&topic], GroupConfig::queue())
        .await?
        .close()
        .await?;
    for i in 1..5u64 {
        p.send(&topic, Record::new(format!("{i}-a"))).await?;
    }
    wait_log_start(&ctx, &topic, 5).await;
    p.send(&topic, Record::new("5-b")).await?;
    let (start, _) = ctx.bounds(&topic, 0).await?;
    assert_eq!(start, 5);
    for (group, config) in [(gs, GroupConfig::stream()), (gq, GroupConfig::queue())] {
        let c = ctx.broker.consumer(&group, &[&topic], config).await?;
        let got = poll_n(c.as_ref(), 1, WAIT).await?;
        assert_eq!(got[0].offset, 5, "group {group} continues at the log start");
        c.ack(&got[0]).await?;
        let lag = ctx.broker.group_lag(&group).await?;
        assert_eq!(lag.partitions[0].lag, 0);
    }
    Ok(())
}

/// §4a, §6: "Seeking below the log start goes to the log start"; `fetch` below
/// the log start reads from the log start.
pub async fn seek_and_fetch_below_log_start(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let config = TopicConfig::new(1)
        .with_retention(Retention::forever().with_max_age(Duration::from_millis(600)));
    let topic = ctx.topic_with("below", config).await?;
    let p = ctx.producer().await?;
    for i in 0..4u64 {
        p.send(&topic, Record::new(format!("{i}-a"))).await?;
    }
    wait_log_start(&ctx, &topic, 4).await;
    p.send(&topic, Record::new("4-b")).await?;
    p.send(&topic, Record::new("5-b")).await?;
    let fetched = ctx.broker.fetch(&topic, 0, 0, 10).await?;
    assert_eq!(fetched[0].offset, 4, "fetch from the log start");
    let c = ctx
        .broker
        .consumer(&unique("g"), &[&topic], GroupConfig::stream())
        .await?;
    poll_n(c.as_ref(), 2, WAIT).await?;
    for to in [SeekTo::Offset(1), SeekTo::Beginning, SeekTo::Timestamp(0)] {
        c.seek(&topic, 0, to).await?;
        let got = poll_n(c.as_ref(), 1, WAIT).await?;
        assert_eq!(got[0].offset, 4, "{to:?} goes to the log start");
    }
    Ok(())
}
