//! §4, §5, §9, administration: deleting a group (refused while it has
//! live members; afterwards it is not listed, has no lag, and a group of
//! the same name starts afresh), the DLQ's purge and discard of one dead
//! letter, redrive (and purge, discard) refusing a topic that is not a
//! DLQ without creating a group on it, and `ping`.
//!
//! `§N` names a section of `docs/semantics.md`;
//! quoted text is the rule a case checks. Each case's doc comment starts
//! with the sections it checks.

use crate::{expect_kind, poll_exactly, poll_n, unique, values, Backend, Ctx, WAIT};
use conveyor_core::dlq::{HEADER_OFFSET, REDRIVE_GROUP};
use conveyor_core::prelude::*;
use conveyor_core::{
    DlqPolicy, ErrorKind, GroupConfig, NackOptions, NackOutcome, Record, Result, RetryBackoff,
};
use std::time::Duration;

const QUIET: Duration = Duration::from_millis(100);

/// §4, §9: "Deleting a group removes its committed offsets, cursors and
/// leases and its membership: it is no longer listed, has no lag, and a
/// group joined later under the same name starts afresh."
pub async fn delete_group_forgets_everything(backend: &dyn Backend) -> Result<()> {
    let mut ctx = Ctx::open(backend).await?;
    let topic = ctx.topic("delgroup", 2).await?;
    let p = ctx.producer().await?;
    for i in 0..4 {
        p.send(
            &topic,
            Record::new(format!("{i}")).with_key(format!("k{i}")),
        )
        .await?;
    }
    let (stream, queue) = (unique("typo-stream"), unique("typo-queue"));
    let s = ctx
        .broker
        .consumer(&stream, &[&topic], GroupConfig::stream())
        .await?;
    let read = poll_n(s.as_ref(), 4, WAIT).await?;
    s.commit_batch(&read).await?;
    s.close().await?;
    let q = ctx.broker.consumer(&queue, &[&topic], queue_cfg()).await?;
    let got = poll_n(q.as_ref(), 4, WAIT).await?;
    q.ack(&got[0]).await?;
    // One nacked (attempt 2 next time), the rest released at close.
    q.nack(&got[1], NackOptions::new().with_delay(Duration::ZERO))
        .await?;
    q.close().await?;

    for g in [&stream, &queue] {
        ctx.broker.delete_group(g).await?;
    }
    let listed = ctx.broker.list_groups().await?;
    assert!(
        !listed.contains(&stream) && !listed.contains(&queue),
        "deleted groups are still listed: {listed:?}"
    );
    for g in [&stream, &queue] {
        expect_kind(ctx.broker.group_lag(g).await, ErrorKind::GroupNotFound);
        expect_kind(ctx.broker.describe_group(g).await, ErrorKind::GroupNotFound);
        expect_kind(ctx.broker.delete_group(g).await, ErrorKind::GroupNotFound);
    }

    if ctx.broker.capabilities().persistent {
        ctx.reopen().await?;
        let listed = ctx.broker.list_groups().await?;
        assert!(
            !listed.contains(&stream) && !listed.contains(&queue),
            "deleted groups are back after reopen: {listed:?}"
        );
    }

    // Joined again: nothing of the old group is left.
    let s = ctx
        .broker
        .consumer(&stream, &[&topic], GroupConfig::stream())
        .await?;
    let again = poll_exactly(s.as_ref(), 4, QUIET).await?;
    assert!(again.iter().all(|m| m.attempt == 1));
    assert_eq!(ctx.broker.group_lag(&stream).await?.total_lag(), 4);
    s.close().await?;
    let q = ctx.broker.consumer(&queue, &[&topic], queue_cfg()).await?;
    let again = poll_exactly(q.as_ref(), 4, QUIET).await?;
    assert!(
        again.iter().all(|m| m.attempt == 1),
        "attempt counts start afresh: {:?}",
        again
            .iter()
            .map(|m| (m.position(), m.attempt))
            .collect::<Vec<_>>()
    );
    q.close().await?;
    Ok(())
}

/// §4: "A group with live members cannot be deleted (`GroupNotEmpty`,
/// naming them); it is left as it was."
pub async fn delete_group_refuses_live_members(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let topic = ctx.topic("delbusy", 1).await?;
    ctx.producer().await?.send(&topic, Record::new("a")).await?;
    let group = unique("busy");
    let c = ctx
        .broker
        .consumer(&group, &[&topic], GroupConfig::stream())
        .await?;
    let e = expect_kind(
        ctx.broker.delete_group(&group).await,
        ErrorKind::GroupNotEmpty,
    );
    assert!(e.message().contains(&group), "names the group: {e}");
    assert!(ctx.broker.list_groups().await?.contains(&group));
    // The member goes on as if nothing happened.
    let got = poll_exactly(c.as_ref(), 1, Duration::ZERO).await?;
    c.commit_batch(&got).await?;
    assert_eq!(ctx.broker.group_lag(&group).await?.total_lag(), 0);
    c.close().await?;
    ctx.broker.delete_group(&group).await?;
    assert!(!ctx.broker.list_groups().await?.contains(&group));
    expect_kind(
        ctx.broker.delete_group("no/such group").await,
        ErrorKind::InvalidArgument,
    );
    Ok(())
}

/// §9: "`ping` is a cheap round trip to the store, for a readiness
/// probe; after `close` it is `Closed`."
pub async fn ping_until_closed(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    ctx.broker.ping().await?;
    ctx.broker.ping().await?;
    ctx.broker.close().await?;
    expect_kind(ctx.broker.ping().await, ErrorKind::Closed);
    Ok(())
}

/// §5: "Redrive, purge and discard take a DLQ topic only: on any other
/// topic they fail with `InvalidArgument` and leave no `conveyor.redrive`
/// group behind."
pub async fn redrive_refuses_a_topic_that_is_not_a_dlq(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let topic = ctx.topic("notdlq", 1).await?;
    let p = ctx.producer().await?;
    for i in 0..5 {
        p.send(&topic, Record::new(format!("{i}"))).await?;
    }
    expect_kind(
        ctx.broker.redrive(&topic, None).await,
        ErrorKind::InvalidArgument,
    );
    expect_kind(
        ctx.broker.purge_dlq(&topic).await,
        ErrorKind::InvalidArgument,
    );
    expect_kind(
        ctx.broker.discard_dead_letter(&topic, 0, 2).await,
        ErrorKind::InvalidArgument,
    );
    assert!(
        !ctx.broker
            .list_groups()
            .await?
            .iter()
            .any(|g| g == REDRIVE_GROUP),
        "a refused redrive left a `{REDRIVE_GROUP}` group"
    );
    // An empty topic: nothing to redrive, and still no group.
    let empty = ctx.topic("emptydlq", 1).await?;
    assert_eq!(ctx.broker.redrive(&empty, None).await?, 0);
    assert!(!ctx
        .broker
        .list_groups()
        .await?
        .iter()
        .any(|g| g == REDRIVE_GROUP));
    expect_kind(
        ctx.broker.redrive(&unique("missing"), None).await,
        ErrorKind::TopicNotFound,
    );
    Ok(())
}

fn queue_cfg() -> GroupConfig {
    GroupConfig::queue()
        .with_visibility_timeout(Duration::from_secs(30))
        .with_retry_backoff(RetryBackoff::none())
        .with_dlq(DlqPolicy::new(1))
}

/// `n` records dead-lettered by a new queue group on a new one-partition
/// topic: (topic, group, its consumer, the DLQ topic).
async fn dead_letters(
    ctx: &Ctx<'_>,
    n: usize,
) -> Result<(
    String,
    String,
    std::sync::Arc<dyn conveyor_core::Consumer>,
    String,
)> {
    let topic = ctx.topic("dead", 1).await?;
    let p = ctx.producer().await?;
    for i in 0..n {
        p.send(&topic, Record::new(format!("{i}"))).await?;
    }
    let group = unique("g");
    let c = ctx.broker.consumer(&group, &[&topic], queue_cfg()).await?;
    for m in poll_exactly(c.as_ref(), n, Duration::ZERO).await? {
        let outcome = c.nack(&m, NackOptions::new().with_reason("x")).await?;
        assert_eq!(outcome, NackOutcome::DeadLettered);
    }
    let dlq = format!("{topic}.{group}.dlq");
    Ok((topic, group, c, dlq))
}

/// The redrive group's lag on `dlq` (the dead letters still waiting).
async fn waiting(ctx: &Ctx<'_>, dlq: &str) -> Result<u64> {
    Ok(ctx
        .broker
        .group_lag(REDRIVE_GROUP)
        .await?
        .partitions
        .iter()
        .filter(|p| p.topic == dlq)
        .map(|p| p.lag)
        .sum())
}

/// §5: "Purging a DLQ discards every dead letter waiting in it: none is
/// redriven afterwards, and the DLQ's backlog is 0. The records stay
/// readable until retention removes them."
pub async fn purge_discards_every_waiting_dead_letter(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let (topic, _group, c, dlq) = dead_letters(&ctx, 3).await?;
    assert_eq!(ctx.broker.purge_dlq(&dlq).await?, 3);
    assert_eq!(waiting(&ctx, &dlq).await?, 0, "no backlog after a purge");
    assert_eq!(ctx.broker.purge_dlq(&dlq).await?, 0, "each discarded once");
    let end_before = ctx.log_ends(&topic).await?;
    assert_eq!(
        ctx.broker.redrive(&dlq, None).await?,
        0,
        "nothing to redrive"
    );
    assert_eq!(ctx.log_ends(&topic).await?, end_before);
    poll_exactly(c.as_ref(), 0, QUIET).await?;
    assert_eq!(ctx.read_all(&dlq, 0).await?.len(), 3, "records stay");
    Ok(())
}

/// §5: "Discarding one dead letter (by partition and offset) settles it
/// only: a redrive moves the others, never it."
pub async fn discard_one_dead_letter(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let (_topic, _group, c, dlq) = dead_letters(&ctx, 3).await?;
    let all = ctx.read_all(&dlq, 0).await?;
    let middle = all
        .iter()
        .find(|m| m.value.as_ref() == b"1")
        .expect("dead letter of 1");
    ctx.broker
        .discard_dead_letter(&dlq, 0, middle.offset)
        .await?;
    assert_eq!(waiting(&ctx, &dlq).await?, 2);
    expect_kind(
        ctx.broker.discard_dead_letter(&dlq, 0, middle.offset).await,
        ErrorKind::InvalidArgument,
    );
    expect_kind(
        ctx.broker.discard_dead_letter(&dlq, 0, 99).await,
        ErrorKind::InvalidArgument,
    );
    expect_kind(
        ctx.broker.discard_dead_letter(&dlq, 7, 0).await,
        ErrorKind::PartitionOutOfRange,
    );
    assert_eq!(ctx.broker.redrive(&dlq, None).await?, 2);
    let back = poll_exactly(c.as_ref(), 2, QUIET).await?;
    let mut got = values(&back);
    got.sort();
    assert_eq!(got, ["0", "2"], "the discarded one is not redriven");
    assert!(back.iter().all(|m| m.header_str(HEADER_OFFSET).is_none()));
    assert_eq!(waiting(&ctx, &dlq).await?, 0, "redrive leaves no backlog");
    Ok(())
}
