//! §9, observability, and the read-only calls: `describe_topic`, `group_lag`
//! (stream and queue), `list_groups`, `fetch`, `offset_for_timestamp`.
//!
//! `§N` names a section of `docs/semantics.md`;
//! quoted text is the rule a case checks. Each case's doc comment starts
//! with the sections it checks.

use crate::{poll_exactly, poll_n, unique, Backend, Ctx, WAIT};
use conveyor_core::prelude::*;
use conveyor_core::NackOptions;
use conveyor_core::{DeliveryMode, GroupConfig, Record, Result, RetryBackoff};
use std::time::Duration;

/// §1, §9: "`describe_topic`: per partition log start, log end, bytes": bounds
/// follow the writes and bytes grow with them.
pub async fn describe_topic_bounds(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let topic = ctx.topic("describe", 3).await?;
    let p = ctx.producer().await?;
    for (part, n) in [(0u32, 5usize), (2, 2)] {
        let records = (0..n)
            .map(|i| Record::new(vec![7u8; 100 + i]).with_partition(part))
            .collect();
        p.send_batch(&topic, records).await?;
    }
    let d = ctx.broker.describe_topic(&topic).await?;
    let bounds: Vec<(u64, u64)> = d
        .partitions
        .iter()
        .map(|p| (p.log_start, p.log_end))
        .collect();
    assert_eq!(bounds, vec![(0, 5), (0, 0), (0, 2)]);
    assert!(d.partitions[0].bytes >= 5 * 100, "bytes count the records");
    assert!(d.partitions[2].bytes >= 2 * 100);
    assert!(d.partitions[0].bytes > d.partitions[2].bytes);
    Ok(())
}

/// §9: "`group_lag(group)`: per partition committed offset, log end, lag"
/// (stream mode).
pub async fn stream_group_lag(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let topic = ctx.topic("slag", 2).await?;
    let p = ctx.producer().await?;
    for i in 0..10u32 {
        p.send(&topic, Record::new("x").with_partition(i % 2))
            .await?;
    }
    let group = unique("g");
    let c = ctx
        .broker
        .consumer(&group, &[&topic], GroupConfig::stream())
        .await?;
    let lag = ctx.broker.group_lag(&group).await?;
    assert_eq!(lag.group, group);
    assert_eq!(lag.mode, DeliveryMode::Stream);
    assert_eq!(lag.total_lag(), 10);
    poll_exactly(c.as_ref(), 10, Duration::ZERO).await?;
    c.commit(&topic, 0, 3).await?;
    c.commit(&topic, 1, 5).await?;
    let lag = ctx.broker.group_lag(&group).await?;
    let mut rows: Vec<(u32, u64, u64, u64)> = lag
        .partitions
        .iter()
        .map(|p| (p.partition, p.committed, p.log_end, p.lag))
        .collect();
    rows.sort();
    assert_eq!(rows, vec![(0, 3, 5, 2), (1, 5, 5, 0)]);
    assert!(lag.partitions.iter().all(|p| p.topic == topic));
    Ok(())
}

/// §9: "in queue mode also in-flight and available counts": leased, acked,
/// delayed by nack, and available records are counted apart.
pub async fn queue_group_lag(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let topic = ctx.topic("qlag", 1).await?;
    let p = ctx.producer().await?;
    for _ in 0..10 {
        p.send(&topic, Record::new("x")).await?;
    }
    let group = unique("g");
    let cfg = GroupConfig::queue()
        .with_visibility_timeout(Duration::from_secs(30))
        .with_retry_backoff(RetryBackoff::none());
    let c = ctx.broker.consumer(&group, &[&topic], cfg).await?;
    let row = |l: &conveyor_core::GroupLag| {
        let p = &l.partitions[0];
        (p.lag, p.in_flight, p.available)
    };
    assert_eq!(row(&ctx.broker.group_lag(&group).await?), (10, 0, 10));
    let got = poll_exactly(c.as_ref(), 3, Duration::ZERO).await?;
    let lag = ctx.broker.group_lag(&group).await?;
    assert_eq!(lag.mode, DeliveryMode::Queue);
    assert_eq!(row(&lag), (10, 3, 7));
    c.ack(&got[1]).await?;
    assert_eq!(row(&ctx.broker.group_lag(&group).await?), (9, 2, 7));
    c.nack(
        &got[2],
        NackOptions::new().with_delay(Duration::from_secs(60)),
    )
    .await?;
    assert_eq!(
        row(&ctx.broker.group_lag(&group).await?),
        (9, 1, 7),
        "a delayed message is neither in flight nor available"
    );
    c.ack(&got[0]).await?;
    let lag = ctx.broker.group_lag(&group).await?;
    assert_eq!(row(&lag), (8, 0, 7));
    assert_eq!(lag.partitions[0].log_end, 10);
    assert_eq!(lag.partitions[0].committed, 2, "lowest unsettled offset");
    Ok(())
}

/// §9: `list_groups`: "Names of all groups, sorted", including groups whose
/// members all left.
pub async fn list_groups_sorted(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let topic = ctx.topic("groups", 1).await?;
    let base = unique("lg");
    for (suffix, config) in [("b", GroupConfig::queue()), ("a", GroupConfig::stream())] {
        let c = ctx
            .broker
            .consumer(&format!("{base}-{suffix}"), &[&topic], config)
            .await?;
        c.close().await?;
    }
    let groups = ctx.broker.list_groups().await?;
    let mut sorted = groups.clone();
    sorted.sort();
    assert_eq!(groups, sorted);
    let mine: Vec<&String> = groups.iter().filter(|g| g.starts_with(&base)).collect();
    assert_eq!(mine, vec![&format!("{base}-a"), &format!("{base}-b")]);
    Ok(())
}

/// §9: The read-only calls beside §9's: `fetch` reads "up to `max` records of a
/// partition from `offset` without a group"; messages have attempt 1; it moves
/// no group.
pub async fn fetch_without_group(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let topic = ctx.topic("fetch", 2).await?;
    let p = ctx.producer().await?;
    for i in 0..10u32 {
        p.send(&topic, Record::new(format!("{i}")).with_partition(1))
            .await?;
    }
    let got = ctx.broker.fetch(&topic, 1, 3, 4).await?;
    assert_eq!(
        got.iter().map(|m| m.offset).collect::<Vec<_>>(),
        vec![3, 4, 5, 6]
    );
    assert!(got
        .iter()
        .all(|m| m.attempt == 1 && m.partition == 1 && m.topic == topic));
    assert_eq!(got[0].value, "3".as_bytes());
    assert!(
        ctx.broker.fetch(&topic, 1, 10, 5).await?.is_empty(),
        "at the end"
    );
    assert!(
        ctx.broker.fetch(&topic, 1, 99, 5).await?.is_empty(),
        "past the end"
    );
    assert!(
        ctx.broker.fetch(&topic, 0, 0, 5).await?.is_empty(),
        "empty partition"
    );
    let group = unique("g");
    let c = ctx
        .broker
        .consumer(&group, &[&topic], GroupConfig::stream())
        .await?;
    assert_eq!(
        poll_n(c.as_ref(), 10, WAIT).await?.len(),
        10,
        "fetch moved no group"
    );
    Ok(())
}

/// §9: `describe_group` shows the members and what each holds: in stream
/// mode the partitions each owns (disjoint, covering the topic, in the
/// generation the consumers see); in queue mode how many messages each
/// holds leased.
pub async fn describe_group_shows_members(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let topic = ctx.topic("described", 4).await?;
    let p = ctx.producer().await?;
    let records = (0..20).map(|i| Record::new(format!("r{i}"))).collect();
    p.send_batch(&topic, records).await?;

    let stream = unique("s");
    let a = ctx
        .broker
        .consumer(&stream, &[&topic], GroupConfig::stream())
        .await?;
    let b = ctx
        .broker
        .consumer(&stream, &[&topic], GroupConfig::stream())
        .await?;
    let generation = b.generation().await?;
    let d = ctx.broker.describe_group(&stream).await?;
    assert_eq!(d.lag.mode, DeliveryMode::Stream);
    if let Some(config) = &d.config {
        assert_eq!(config.mode, DeliveryMode::Stream);
    }
    if d.members_visible {
        assert_eq!(d.members.len(), 2, "{d:?}");
        assert_eq!(d.generation, generation);
        let mut owned: Vec<u32> = d
            .members
            .iter()
            .flat_map(|m| m.assignment.iter().map(|(_, p)| *p))
            .collect();
        owned.sort_unstable();
        assert_eq!(owned, vec![0, 1, 2, 3], "each partition owned once");
        for m in &d.members {
            assert_eq!(m.topics, vec![topic.clone()]);
            assert_eq!(m.assignment.len(), 2, "balanced: {m:?}");
        }
    }
    drop((a, b));

    let queue = unique("q");
    let c = ctx
        .broker
        .consumer(&queue, &[&topic], GroupConfig::queue())
        .await?;
    let held = poll_exactly(c.as_ref(), 20, Duration::ZERO).await?;
    let d = ctx.broker.describe_group(&queue).await?;
    assert_eq!(d.lag.total_in_flight(), 20);
    if d.members_visible {
        assert_eq!(d.members.len(), 1);
        assert_eq!(d.members[0].leases, 20);
    }
    c.ack_batch(&held).await?;
    let d = ctx.broker.describe_group(&queue).await?;
    assert_eq!(d.lag.total_lag(), 0);
    assert!(d.members.iter().all(|m| m.leases == 0));
    Ok(())
}
