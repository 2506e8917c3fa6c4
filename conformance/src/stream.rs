//! §4 and §4a, consumer groups in stream mode: fan-out, start position,
//! commit and resume, seek, rebalance (join, leave, session timeout),
//! balance, stickiness, generations, fencing, nack, and `poll`'s cancel
//! safety.
//!
//! `§N` names a section of `docs/semantics.md`;
//! quoted text is the rule a case checks. Each case's doc comment starts
//! with the sections it checks.

use crate::{
    eventually, expect_kind, nack_options, poll_exactly, poll_n, unique, values, waited, Backend,
    Ctx, WAIT,
};
use conveyor_core::prelude::*;
use conveyor_core::NackOptions;
use conveyor_core::{
    Consumer, ErrorKind, GroupConfig, Record, Result, RetryBackoff, SeekTo, StartFrom,
    TopicPartition,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

async fn send_n(ctx: &Ctx<'_>, topic: &str, n: usize, prefix: &str) -> Result<()> {
    let records = (0..n)
        .map(|i| Record::new(format!("{prefix}{i}")))
        .collect();
    ctx.producer().await?.send_batch(topic, records).await?;
    Ok(())
}

fn stream_cfg() -> GroupConfig {
    GroupConfig::stream().with_retry_backoff(RetryBackoff::none())
}

/// §4: "Every group sees every record of its topics (publish/subscribe across
/// groups)": two stream groups and a queue group each get all 30 records.
pub async fn fan_out_across_groups(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let topic = ctx.topic("fanout", 3).await?;
    send_n(&ctx, &topic, 30, "m").await?;
    for config in [
        GroupConfig::stream(),
        GroupConfig::stream(),
        GroupConfig::queue(),
    ] {
        let c = ctx.broker.consumer(&unique("g"), &[&topic], config).await?;
        let got = poll_exactly(c.as_ref(), 30, Duration::from_millis(50)).await?;
        let set: BTreeSet<String> = values(&got).into_iter().collect();
        assert_eq!(set.len(), 30, "every record once");
        for m in &got {
            c.ack(m).await?;
        }
    }
    Ok(())
}

/// §4: "A new group starts at `earliest` (default) or `latest`, per partition":
/// an earliest group reads what was there; a latest group only what comes after
/// it was created (both modes).
pub async fn start_earliest_vs_latest(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let topic = ctx.topic("start", 2).await?;
    send_n(&ctx, &topic, 6, "old").await?;
    let early = ctx
        .broker
        .consumer(&unique("early"), &[&topic], GroupConfig::stream())
        .await?;
    let late_s = ctx
        .broker
        .consumer(
            &unique("late"),
            &[&topic],
            GroupConfig::stream().with_start(StartFrom::Latest),
        )
        .await?;
    let late_q = ctx
        .broker
        .consumer(
            &unique("lateq"),
            &[&topic],
            GroupConfig::queue().with_start(StartFrom::Latest),
        )
        .await?;
    assert!(late_s.poll(10, Duration::from_millis(50)).await?.is_empty());
    assert!(late_q.poll(10, Duration::from_millis(50)).await?.is_empty());
    send_n(&ctx, &topic, 4, "new").await?;
    let got = poll_exactly(early.as_ref(), 10, Duration::ZERO).await?;
    assert_eq!(
        got.iter().filter(|m| m.value.starts_with(b"old")).count(),
        6
    );
    for c in [&late_s, &late_q] {
        let got = poll_exactly(c.as_ref(), 4, Duration::from_millis(50)).await?;
        assert!(values(&got).iter().all(|v| v.starts_with("new")), "{got:?}");
    }
    Ok(())
}

/// §4a: "The group's committed offset per partition is the next offset to read.
/// ... After a restart or a reassignment, delivery resumes at the committed
/// offset": explicit `commit` and `commit_message`, then a new member.
pub async fn commit_and_resume(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let topic = ctx.topic("resume", 1).await?;
    send_n(&ctx, &topic, 10, "m").await?;
    let group = unique("g");
    let a = ctx.broker.consumer(&group, &[&topic], stream_cfg()).await?;
    let got = poll_exactly(a.as_ref(), 10, Duration::ZERO).await?;
    a.commit(&topic, 0, 6).await?;
    a.close().await?;
    let b = ctx.broker.consumer(&group, &[&topic], stream_cfg()).await?;
    let again = poll_exactly(b.as_ref(), 4, Duration::from_millis(50)).await?;
    assert_eq!(again[0].offset, 6, "resumes at the committed offset");
    b.commit_message(&again[1]).await?; // commits 8
    drop(b);
    let c = ctx.broker.consumer(&group, &[&topic], stream_cfg()).await?;
    let rest = poll_exactly(c.as_ref(), 2, Duration::from_millis(50)).await?;
    assert_eq!(rest[0].offset, 8);
    assert_eq!(rest[1].value, got[9].value);
    Ok(())
}

/// §4a: "uncommitted messages are delivered again (at-least-once)": a member
/// dropped without committing leaves its messages to the next member.
pub async fn redelivered_after_drop_without_commit(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let topic = ctx.topic("alo", 2).await?;
    send_n(&ctx, &topic, 20, "m").await?;
    let group = unique("g");
    let a = ctx.broker.consumer(&group, &[&topic], stream_cfg()).await?;
    let got = poll_exactly(a.as_ref(), 20, Duration::ZERO).await?;
    // Ack the first three of each partition only.
    let mut acked = BTreeSet::new();
    for m in &got {
        if m.offset < 3 {
            a.ack(m).await?;
            acked.insert((m.partition, m.offset));
        }
    }
    drop(a); // no close, no commit of the rest
    let b = ctx.broker.consumer(&group, &[&topic], stream_cfg()).await?;
    let again = poll_exactly(b.as_ref(), 14, Duration::from_millis(50)).await?;
    for m in &again {
        assert!(
            !acked.contains(&(m.partition, m.offset)),
            "committed not redelivered"
        );
        assert!(m.offset >= 3);
    }
    Ok(())
}

/// §4a: "`commit` is ... cumulative": committing offset 5 covers 0..5 without
/// acking each message.
pub async fn commit_is_cumulative(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let topic = ctx.topic("cumulative", 1).await?;
    send_n(&ctx, &topic, 8, "m").await?;
    let group = unique("g");
    let a = ctx.broker.consumer(&group, &[&topic], stream_cfg()).await?;
    let got = poll_exactly(a.as_ref(), 8, Duration::ZERO).await?;
    a.ack(&got[1]).await?;
    a.ack(&got[4]).await?; // commits 5: covers 0, 2, 3 too
    let lag = ctx.broker.group_lag(&group).await?;
    assert_eq!(lag.partitions[0].committed, 5);
    assert_eq!(lag.partitions[0].lag, 3);
    a.close().await?;
    let b = ctx.broker.consumer(&group, &[&topic], stream_cfg()).await?;
    let rest = poll_exactly(b.as_ref(), 3, Duration::from_millis(50)).await?;
    assert_eq!(rest[0].offset, 5);
    Ok(())
}

/// §4a: "`seek(partition, Beginning | End | Offset(n))` moves the member's
/// position ... Replay is a seek": beginning replays, an offset jumps, the end
/// waits for new records; offsets past the end clamp to the end.
pub async fn seek_beginning_end_offset(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let topic = ctx.topic("seek", 1).await?;
    send_n(&ctx, &topic, 10, "m").await?;
    let c = ctx
        .broker
        .consumer(&unique("g"), &[&topic], stream_cfg())
        .await?;
    poll_exactly(c.as_ref(), 10, Duration::from_millis(20)).await?;
    c.seek(&topic, 0, SeekTo::Beginning).await?;
    let replay = poll_exactly(c.as_ref(), 10, Duration::from_millis(20)).await?;
    assert_eq!(replay[0].offset, 0);
    c.seek(&topic, 0, SeekTo::Offset(7)).await?;
    let tail = poll_exactly(c.as_ref(), 3, Duration::from_millis(20)).await?;
    assert_eq!(
        tail.iter().map(|m| m.offset).collect::<Vec<_>>(),
        vec![7, 8, 9]
    );
    c.seek(&topic, 0, SeekTo::Offset(3)).await?;
    assert_eq!(poll_n(c.as_ref(), 1, WAIT).await?[0].offset, 3);
    c.seek(&topic, 0, SeekTo::End).await?;
    assert!(c.poll(10, Duration::from_millis(50)).await?.is_empty());
    send_n(&ctx, &topic, 1, "new").await?;
    let new = poll_exactly(c.as_ref(), 1, Duration::ZERO).await?;
    assert_eq!(new[0].offset, 10);
    c.seek(&topic, 0, SeekTo::Offset(1_000)).await?;
    assert!(c.poll(10, Duration::from_millis(50)).await?.is_empty());
    send_n(&ctx, &topic, 1, "newer").await?;
    assert_eq!(
        poll_exactly(c.as_ref(), 1, Duration::ZERO).await?[0].offset,
        11
    );
    Ok(())
}

/// §4a: "`Timestamp(t)` goes to the first record with timestamp >= t", and
/// `offset_for_timestamp` agrees.
pub async fn seek_timestamp(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let topic = ctx.topic("seekts", 1).await?;
    let p = ctx.producer().await?;
    let first = p.send(&topic, Record::new("a0")).await?;
    p.send(&topic, Record::new("a1")).await?;
    // Wait until the clock has moved past the first batch.
    let last_a = p.send(&topic, Record::new("a2")).await?;
    eventually("the clock to move", WAIT, || async {
        (conveyor_core::now_ms() > last_a.timestamp + 2).then_some(())
    })
    .await;
    let b0 = p.send(&topic, Record::new("b0")).await?;
    p.send(&topic, Record::new("b1")).await?;
    assert!(b0.timestamp > last_a.timestamp);
    let c = ctx
        .broker
        .consumer(&unique("g"), &[&topic], stream_cfg())
        .await?;
    for (t, want) in [
        (b0.timestamp, 3u64),
        (last_a.timestamp + 1, 3),
        (first.timestamp, 0),
        (0, 0),
    ] {
        assert_eq!(ctx.broker.offset_for_timestamp(&topic, 0, t).await?, want);
        c.seek(&topic, 0, SeekTo::Timestamp(t)).await?;
        let got = poll_n(c.as_ref(), 1, WAIT).await?;
        assert_eq!(got[0].offset, want, "seek to timestamp {t}");
    }
    let future = b0.timestamp + 3_600_000;
    assert_eq!(ctx.broker.offset_for_timestamp(&topic, 0, future).await?, 5);
    c.seek(&topic, 0, SeekTo::Timestamp(future)).await?;
    assert!(c.poll(10, Duration::from_millis(50)).await?.is_empty());
    Ok(())
}

/// `n` messages on `topic` (2 partitions), all polled by member A of a new
/// group; then member B joins and takes one partition (`moved`).
#[allow(clippy::type_complexity)]
async fn polled_then_rebalanced(
    ctx: &Ctx<'_>,
    topic: &str,
    n: usize,
) -> Result<(
    String,
    Arc<dyn Consumer>,
    Arc<dyn Consumer>,
    Vec<Message>,
    TopicPartition,
)> {
    send_n(ctx, topic, n, "m").await?;
    let group = unique("g");
    let a = ctx.broker.consumer(&group, &[topic], stream_cfg()).await?;
    let got = poll_exactly(a.as_ref(), n, Duration::ZERO).await?;
    let b = ctx.broker.consumer(&group, &[topic], stream_cfg()).await?;
    let moved = owned(b.as_ref())
        .await?
        .into_iter()
        .next()
        .expect("B got one");
    Ok((group, a, b, got, moved))
}

async fn owned(c: &dyn Consumer) -> Result<BTreeSet<TopicPartition>> {
    Ok(c.assignment().await?.into_iter().collect())
}

/// The partitions of `members` must be disjoint, cover `total`, and differ
/// in count by at most one.
async fn check_balanced(
    members: &[&Arc<dyn Consumer>],
    total: usize,
) -> Result<Vec<BTreeSet<TopicPartition>>> {
    let mut sets = Vec::new();
    let mut all = BTreeSet::new();
    for c in members {
        let s = owned(c.as_ref()).await?;
        for tp in &s {
            assert!(all.insert(tp.clone()), "{tp} assigned to two members");
        }
        sets.push(s);
    }
    assert_eq!(all.len(), total, "every partition assigned");
    let counts: Vec<usize> = sets.iter().map(BTreeSet::len).collect();
    let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
    assert!(max - min <= 1, "balanced: {counts:?}");
    Ok(sets)
}

/// §4a: "when a member joins, the others keep their partitions except those
/// moved to it"; "Assignment is balanced"; "Each rebalance bumps the group's
/// generation".
pub async fn rebalance_on_join(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let topic = ctx.topic("join", 10).await?;
    let group = unique("g");
    let mut members: Vec<Arc<dyn Consumer>> = Vec::new();
    let mut before: Vec<BTreeSet<TopicPartition>> = Vec::new();
    let mut generation = 0;
    for n in 1..=4 {
        members.push(ctx.broker.consumer(&group, &[&topic], stream_cfg()).await?);
        let g = members[0].generation().await?;
        assert!(
            g > generation,
            "join bumps the generation ({generation} -> {g})"
        );
        generation = g;
        let refs: Vec<&Arc<dyn Consumer>> = members.iter().collect();
        let after = check_balanced(&refs, 10).await?;
        for (i, old) in before.iter().enumerate() {
            assert!(
                after[i].is_subset(old),
                "sticky: member {i} only lost partitions"
            );
        }
        assert!(!after[n - 1].is_empty(), "the new member got partitions");
        before = after;
    }
    Ok(())
}

/// §4, §4a: "Leaving (`close`) removes it at once"; "when a member leaves, only
/// its partitions move".
pub async fn rebalance_on_leave(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let topic = ctx.topic("leave", 7).await?;
    let group = unique("g");
    let a = ctx.broker.consumer(&group, &[&topic], stream_cfg()).await?;
    let b = ctx.broker.consumer(&group, &[&topic], stream_cfg()).await?;
    let c = ctx.broker.consumer(&group, &[&topic], stream_cfg()).await?;
    let before = check_balanced(&[&a, &b, &c], 7).await?;
    let generation = a.generation().await?;
    c.close().await?;
    assert!(
        a.generation().await? > generation,
        "leave bumps the generation"
    );
    let after = check_balanced(&[&a, &b], 7).await?;
    assert!(before[0].is_subset(&after[0]) && before[1].is_subset(&after[1]));
    expect_kind(c.poll(1, Duration::ZERO).await, ErrorKind::Closed);
    Ok(())
}

/// §4, §4a: "a member silent for the session timeout ... is removed": its
/// partitions go to the live member, and its late commit is `Fenced`.
pub async fn rebalance_on_session_timeout(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let topic = ctx.topic("session", 4).await?;
    send_n(&ctx, &topic, 8, "m").await?;
    let group = unique("g");
    let cfg = stream_cfg().with_session_timeout(Duration::from_millis(300));
    let a = ctx.broker.consumer(&group, &[&topic], cfg.clone()).await?;
    let b = ctx.broker.consumer(&group, &[&topic], cfg).await?;
    let b_parts = owned(b.as_ref()).await?;
    assert_eq!(b_parts.len(), 2);
    let b_msgs = poll_n(b.as_ref(), 4, WAIT).await?;
    assert_eq!(b_msgs.len(), 4);
    // B goes silent; A keeps calling.
    eventually("A to get B's partitions", WAIT, || {
        let a = a.clone();
        async move { (owned(a.as_ref()).await.expect("assignment").len() == 4).then_some(()) }
    })
    .await;
    let tp = b_parts.iter().next().expect("one");
    expect_kind(
        b.commit(&tp.topic, tp.partition, 1).await,
        ErrorKind::Fenced,
    );
    expect_kind(b.ack(&b_msgs[0]).await, ErrorKind::Fenced);
    let lag = ctx.broker.group_lag(&group).await?;
    assert!(
        lag.partitions.iter().all(|p| p.committed == 0),
        "fenced commits wrote nothing"
    );
    let got = poll_exactly(a.as_ref(), 8, Duration::ZERO).await?;
    assert_eq!(
        got.len(),
        8,
        "A reads B's partitions from the committed offset"
    );
    Ok(())
}

/// §4a: "partition counts differ by at most one" and stickiness through a mix
/// of joins and leaves over two topics.
pub async fn balance_and_stickiness(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let t1 = ctx.topic("bal1", 5).await?;
    let t2 = ctx.topic("bal2", 6).await?;
    let group = unique("g");
    let mut live: Vec<Arc<dyn Consumer>> = Vec::new();
    let mut prev: Vec<BTreeSet<TopicPartition>> = Vec::new();
    let steps = [true, true, true, false, true, true, false, false, true];
    for (step, join) in steps.into_iter().enumerate() {
        let leaver = if join {
            live.push(
                ctx.broker
                    .consumer(&group, &[&t1, &t2], stream_cfg())
                    .await?,
            );
            None
        } else {
            let i = step % live.len();
            let c = live.remove(i);
            c.close().await?;
            Some(i)
        };
        let refs: Vec<&Arc<dyn Consumer>> = live.iter().collect();
        let now = check_balanced(&refs, 11).await?;
        let mut old = prev.clone();
        if let Some(i) = leaver {
            old.remove(i);
        }
        for (i, before) in old.iter().enumerate() {
            if join {
                assert!(
                    now[i].is_subset(before),
                    "step {step}: member {i} only lost"
                );
            } else {
                assert!(
                    before.is_subset(&now[i]),
                    "step {step}: member {i} only gained"
                );
            }
        }
        prev = now;
    }
    Ok(())
}

/// §4a: "Each partition is assigned to at most one live member at a time": two
/// members polling concurrently never both receive one partition, and together
/// get everything once.
pub async fn partition_owned_by_one_member(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let topic = ctx.topic("owned", 4).await?;
    let group = unique("g");
    let a = ctx.broker.consumer(&group, &[&topic], stream_cfg()).await?;
    let b = ctx.broker.consumer(&group, &[&topic], stream_cfg()).await?;
    send_n(&ctx, &topic, 200, "m").await?;
    let total = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for c in [a.clone(), b.clone()] {
        let total = total.clone();
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            let start = Instant::now();
            while total.load(std::sync::atomic::Ordering::Acquire) < 200 && start.elapsed() < WAIT {
                for m in c.poll(16, Duration::from_millis(20)).await? {
                    c.ack(&m).await?;
                    got.push((m.partition, m.offset));
                    total.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                }
            }
            Ok::<_, conveyor_core::Error>(got)
        }));
    }
    let mut seen: BTreeMap<(u32, u64), usize> = BTreeMap::new();
    let mut owner: BTreeMap<u32, usize> = BTreeMap::new();
    for (i, t) in tasks.into_iter().enumerate() {
        for (p, o) in t.await.expect("task")? {
            *seen.entry((p, o)).or_default() += 1;
            assert_eq!(
                *owner.entry(p).or_insert(i),
                i,
                "partition {p} went to two members"
            );
        }
    }
    assert_eq!(seen.len(), 200, "everything delivered");
    assert!(seen.values().all(|n| *n == 1), "nothing twice");
    Ok(())
}

/// §4a: "A commit or delivery carrying an older generation is refused with
/// `ErrorKind::Fenced`: a member that lost a partition can never commit over
/// its new owner." Partitions it kept still commit fine.
pub async fn stale_commit_is_fenced(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let topic = ctx.topic("fence", 2).await?;
    let (group, a, b, got, moved) = polled_then_rebalanced(&ctx, &topic, 10).await?;
    let kept = owned(a.as_ref())
        .await?
        .into_iter()
        .next()
        .expect("A kept one");
    assert_ne!(moved, kept);
    let stale = got
        .iter()
        .find(|m| m.partition == moved.partition)
        .expect("msg");
    expect_kind(a.ack(stale).await, ErrorKind::Fenced);
    expect_kind(
        a.commit(&topic, moved.partition, 5).await,
        ErrorKind::Fenced,
    );
    expect_kind(a.nack(stale, NackOptions::new()).await, ErrorKind::Fenced);
    expect_kind(
        a.seek(&topic, moved.partition, SeekTo::End).await,
        ErrorKind::Fenced,
    );
    let fresh = got
        .iter()
        .find(|m| m.partition == kept.partition)
        .expect("msg");
    a.ack(fresh).await?;
    let lag = ctx.broker.group_lag(&group).await?;
    for p in &lag.partitions {
        let want = if p.partition == moved.partition {
            0
        } else {
            fresh.offset + 1
        };
        assert_eq!(p.committed, want, "partition {}", p.partition);
    }
    // The new owner reads the moved partition from its committed offset.
    let theirs = poll_n(b.as_ref(), 5, WAIT).await?;
    assert_eq!(theirs[0].offset, 0);
    assert!(theirs.iter().all(|m| m.partition == moved.partition));
    Ok(())
}

/// §4a: "`nack(message)` rewinds the partition to that message and redelivers
/// it (and what follows it) ... with its attempt number raised."
pub async fn nack_rewinds_and_raises_attempt(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let topic = ctx.topic("snack", 1).await?;
    send_n(&ctx, &topic, 5, "m").await?;
    let c = ctx
        .broker
        .consumer(&unique("g"), &[&topic], stream_cfg())
        .await?;
    let got = poll_exactly(c.as_ref(), 5, Duration::ZERO).await?;
    c.ack(&got[1]).await?;
    c.nack(
        &got[2],
        NackOptions::new()
            .with_delay(Duration::ZERO)
            .with_reason("boom"),
    )
    .await?;
    let again = poll_exactly(c.as_ref(), 3, Duration::from_millis(30)).await?;
    assert_eq!(
        again.iter().map(|m| m.offset).collect::<Vec<_>>(),
        vec![2, 3, 4]
    );
    assert_eq!(again[0].attempt, 2, "attempt raised");
    assert_eq!(again[0].value, got[2].value);
    c.nack(&again[0], NackOptions::new().with_delay(Duration::ZERO))
        .await?;
    let third = poll_n(c.as_ref(), 1, WAIT).await?;
    assert_eq!((third[0].offset, third[0].attempt), (2, 3));
    Ok(())
}

/// §4a: "redelivers it ... after the retry backoff": not before the nack's
/// delay, nor before the group's backoff when no delay is given.
pub async fn nack_waits_for_backoff(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let topic = ctx.topic("sbackoff", 1).await?;
    send_n(&ctx, &topic, 2, "m").await?;
    let cfg =
        GroupConfig::stream().with_retry_backoff(RetryBackoff::fixed(Duration::from_millis(250)));
    let c = ctx.broker.consumer(&unique("g"), &[&topic], cfg).await?;
    let got = poll_exactly(c.as_ref(), 2, Duration::ZERO).await?;
    let mut m = got[0].clone();
    for delay in [Some(Duration::from_millis(250)), None] {
        let at = Instant::now();
        c.nack(&m, nack_options(delay)).await?;
        // Whenever it comes back (on a loaded machine the first poll may
        // already be past the delay), it is not before the delay.
        let early = c.poll(10, Duration::from_millis(100)).await?;
        assert!(
            early.is_empty() || waited(at, Duration::from_millis(250)),
            "redelivered before the delay: {early:?}"
        );
        let mut again = early;
        if again.len() < 2 {
            let more = poll_n(c.as_ref(), 2 - again.len(), WAIT).await?;
            again.extend(more);
        }
        assert!(waited(at, Duration::from_millis(250)), "waited the delay");
        assert_eq!(again[0].offset, 0);
        m = again[0].clone();
    }
    Ok(())
}

/// §4a: "A commit or delivery carrying an older generation is refused with
/// `ErrorKind::Fenced`" even when the member owns the partition again: a
/// message delivered before it lost the partition stays stale after it regains
/// it.
pub async fn stale_message_after_regain_is_fenced(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let topic = ctx.topic("regain", 2).await?;
    send_n(&ctx, &topic, 6, "m").await?;
    let group = unique("g");
    let a = ctx.broker.consumer(&group, &[&topic], stream_cfg()).await?;
    let old = poll_exactly(a.as_ref(), 6, Duration::ZERO).await?;
    let b = ctx.broker.consumer(&group, &[&topic], stream_cfg()).await?;
    let moved = owned(b.as_ref())
        .await?
        .into_iter()
        .next()
        .expect("B got one");
    b.close().await?;
    assert_eq!(owned(a.as_ref()).await?.len(), 2, "A owns both again");
    let stale = old
        .iter()
        .find(|m| m.partition == moved.partition)
        .expect("msg");
    expect_kind(a.ack(stale).await, ErrorKind::Fenced);
    assert_eq!(
        ctx.broker
            .group_lag(&group)
            .await?
            .partitions
            .iter()
            .map(|p| p.committed)
            .sum::<u64>(),
        0
    );
    // Fresh deliveries of the regained partition commit fine.
    let fresh = poll_n(a.as_ref(), 3, WAIT).await?;
    let m = fresh
        .iter()
        .find(|m| m.partition == moved.partition)
        .expect("redelivered");
    assert_eq!(m.offset, 0, "resumes at the committed offset");
    a.ack(m).await?;
    Ok(())
}

/// §1, §4: "Partitions may be added later": a group reading the topic picks the
/// new partitions up (stream: they are assigned; queue: they are offered).
pub async fn added_partitions_are_consumed(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let topic = ctx.topic("added", 1).await?;
    let s = ctx
        .broker
        .consumer(&unique("gs"), &[&topic], stream_cfg())
        .await?;
    let q = ctx
        .broker
        .consumer(&unique("gq"), &[&topic], GroupConfig::queue())
        .await?;
    assert!(s.poll(1, Duration::from_millis(20)).await?.is_empty());
    ctx.broker.add_partitions(&topic, 3).await?;
    let p = ctx.producer().await?;
    for part in 0..3 {
        p.send(&topic, Record::new("x").with_partition(part))
            .await?;
    }
    for c in [&s, &q] {
        let got = poll_exactly(c.as_ref(), 3, Duration::from_millis(50)).await?;
        let parts: BTreeSet<u32> = got.iter().map(|m| m.partition).collect();
        assert_eq!(parts, BTreeSet::from([0, 1, 2]));
        for m in &got {
            c.ack(m).await?;
        }
    }
    assert_eq!(owned(s.as_ref()).await?.len(), 3);
    Ok(())
}

/// §4, §4a: "Every group sees every record of its topics"; "within a group each
/// record is handed to one member at a time"; "Within a partition a member
/// receives messages in offset order": three topics are produced to
/// concurrently while two stream groups and a queue group (two members each,
/// every member reading all three topics) consume concurrently. Every group
/// gets every record with its bytes; each stream member sees each partition in
/// increasing offset order.
pub async fn concurrent_groups_over_many_topics(backend: &dyn Backend) -> Result<()> {
    const PER_TOPIC: usize = 60;
    let ctx = Ctx::open(backend).await?;
    let mut topics = Vec::new();
    for _ in 0..3 {
        topics.push(ctx.topic("multi", 2).await?);
    }
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    let configs = [stream_cfg(), stream_cfg(), GroupConfig::queue()];
    let mut members = Vec::new();
    for config in configs {
        let group = unique("g");
        let delivered = Arc::new(std::sync::Mutex::new(BTreeMap::new()));
        for _ in 0..2 {
            let c = ctx.broker.consumer(&group, &names, config.clone()).await?;
            members.push((config.mode, c, delivered.clone()));
        }
    }
    let total = topics.len() * PER_TOPIC;
    let mut producers = Vec::new();
    for topic in &topics {
        let (producer, topic) = (ctx.producer().await?, topic.clone());
        producers.push(tokio::spawn(async move {
            let mut sent = BTreeMap::new();
            for chunk in 0..PER_TOPIC / 5 {
                let batch: Vec<Record> = (0..5)
                    .map(|i| Record::new(format!("{topic}-{}", chunk * 5 + i)))
                    .collect();
                let values: Vec<String> = batch.iter().map(values_of).collect();
                let receipts = producer.send_batch(&topic, batch).await?;
                for (r, v) in receipts.into_iter().zip(values) {
                    sent.insert((topic.clone(), r.partition, r.offset), v);
                }
            }
            Ok::<_, conveyor_core::Error>(sent)
        }));
    }
    let mut consumers = Vec::new();
    for (mode, c, delivered) in members {
        consumers.push(tokio::spawn(async move {
            let mut last: BTreeMap<(String, u32), u64> = BTreeMap::new();
            let start = Instant::now();
            while delivered.lock().expect("lock").len() < total && start.elapsed() < 3 * WAIT {
                for m in c.poll(16, Duration::from_millis(20)).await? {
                    let key = (m.topic.clone(), m.partition);
                    if mode == conveyor_core::DeliveryMode::Stream {
                        if let Some(prev) = last.insert(key, m.offset) {
                            assert!(prev < m.offset, "{} after offset {prev}", m.position());
                        }
                    }
                    let value = String::from_utf8_lossy(&m.value).into_owned();
                    let at = (m.topic.clone(), m.partition, m.offset);
                    delivered.lock().expect("lock").insert(at, value);
                    c.ack(&m).await?;
                }
            }
            c.close().await?;
            Ok::<_, conveyor_core::Error>(delivered)
        }));
    }
    let mut sent = BTreeMap::new();
    for p in producers {
        sent.extend(p.await.expect("producer task")?);
    }
    assert_eq!(sent.len(), total);
    for c in consumers {
        let delivered = c.await.expect("consumer task")?;
        let delivered = delivered.lock().expect("lock").clone();
        assert_eq!(delivered, sent, "a group missed records or got other bytes");
    }
    Ok(())
}

fn values_of(r: &Record) -> String {
    String::from_utf8_lossy(&r.value).into_owned()
}

/// §4, §4a: "Leaving (`close`) removes it at once"; "After a restart or a
/// reassignment, delivery resumes at the committed offset: uncommitted messages
/// are delivered again": four members, one partition each, commit part of what
/// they read and close at the same moment; a new member then owns every
/// partition and gets exactly the uncommitted records.
pub async fn close_many_members_at_once(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let topic = ctx.topic("closeall", 4).await?;
    send_n(&ctx, &topic, 40, "m").await?;
    let group = unique("g");
    let mut members = Vec::new();
    for _ in 0..4 {
        members.push(ctx.broker.consumer(&group, &[&topic], stream_cfg()).await?);
    }
    let mut committed = BTreeMap::new();
    for m in &members {
        let got = poll_n(m.as_ref(), 5, WAIT).await?;
        assert!(got.len() >= 2, "a member got {} records", got.len());
        for msg in &got[..2] {
            m.ack(msg).await?;
            committed.insert(msg.partition, msg.offset + 1);
        }
    }
    futures::future::try_join_all(members.iter().map(|m| m.close())).await?;
    let lag = ctx.broker.group_lag(&group).await?;
    for p in &lag.partitions {
        let want = committed.get(&p.partition).copied().unwrap_or(0);
        assert_eq!(p.committed, want, "partition {}", p.partition);
    }
    let want: BTreeSet<(u32, u64)> = (0..4u32)
        .flat_map(|p| (committed.get(&p).copied().unwrap_or(0)..10).map(move |o| (p, o)))
        .collect();
    let fresh = ctx.broker.consumer(&group, &[&topic], stream_cfg()).await?;
    assert_eq!(fresh.assignment().await?.len(), 4);
    let got = poll_exactly(fresh.as_ref(), want.len(), Duration::from_millis(50)).await?;
    let have: BTreeSet<(u32, u64)> = got.iter().map(|m| (m.partition, m.offset)).collect();
    assert_eq!(have, want);
    Ok(())
}

/// §4, §4a: "Within a partition a member receives messages in offset order" and
/// "delivery resumes at the committed offset": nothing is skipped when `poll`
/// futures are dropped. They are cut at a random one of their first await
/// points that wait ([`crate::cut_after`]; seeded, the seed is printed) while
/// one member reads three partitions, acking what it gets; every record must
/// then arrive, each partition in order with no offset missing (a poll that
/// moved a position and was dropped before returning would skip records).
pub async fn dropped_polls_skip_nothing(backend: &dyn Backend) -> Result<()> {
    let guard = crate::model::seed_for("stream::dropped_polls_skip_nothing");
    let mut rng = StdRng::seed_from_u64(guard.seed);
    let ctx = Ctx::open(backend).await?;
    let topic = ctx.topic("drops", 3).await?;
    const N: u64 = 60;
    send_n(&ctx, &topic, N as usize, "m").await?;
    let c = ctx
        .broker
        .consumer(&unique("g"), &[&topic], stream_cfg())
        .await?;
    let mut next: BTreeMap<u32, u64> = BTreeMap::new();
    let (mut cuts, mut got, start) = (0usize, 0u64, Instant::now());
    while got < N && start.elapsed() < 2 * WAIT {
        // Mostly cut early; now and then let a poll finish, so progress is
        // possible even when every read waits (slow storage).
        let cut = if rng.gen_bool(0.25) {
            usize::MAX
        } else {
            rng.gen_range(1..=3)
        };
        let max = rng.gen_range(1..=8);
        let Some(messages) = crate::cut_after(c.poll(max, Duration::from_millis(20)), cut).await
        else {
            cuts += 1;
            continue;
        };
        for m in messages? {
            let want = next.entry(m.partition).or_insert(0);
            assert_eq!(
                m.offset, *want,
                "partition {}: offset {} came next; offsets {}..{} skipped after {cuts} dropped polls",
                m.partition, m.offset, *want, m.offset
            );
            *want += 1;
            got += 1;
            c.ack(&m).await?;
        }
    }
    let ends = ctx.log_ends(&topic).await?;
    let delivered: Vec<u64> = (0..3).map(|p| next.get(&p).copied().unwrap_or(0)).collect();
    assert_eq!(
        delivered, ends,
        "after {cuts} dropped polls, records at the end of a partition were skipped \
         (delivered up to these offsets per partition; log ends on the right)"
    );
    eprintln!("conveyor-conformance: stream::dropped_polls_skip_nothing: {cuts} polls dropped");
    Ok(())
}

/// §4a: `ack_batch` in stream mode commits per partition (the highest
/// acked offset of each counts); messages of a partition that moved to
/// another member since delivery are `Fenced` at their index and commit
/// nothing, the others commit.
pub async fn ack_batch_commits_per_partition(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let topic = ctx.topic("batch-commit", 2).await?;
    let (group, a, _b, got, moved) = polled_then_rebalanced(&ctx, &topic, 20).await?;
    // Only the first half of each partition's messages.
    let mut batch = Vec::new();
    for p in 0..2 {
        let mine: Vec<&Message> = got.iter().filter(|m| m.partition == p).collect();
        batch.extend(mine[..mine.len() / 2].iter().map(|m| (*m).clone()));
    }
    let outcome = a.ack_batch(&batch).await?;
    for (i, e) in &outcome.failed {
        assert_eq!(batch[*i].partition, moved.partition, "{e}");
        assert_eq!(e.kind(), ErrorKind::Fenced);
    }
    let fenced = batch
        .iter()
        .filter(|m| m.partition == moved.partition)
        .count();
    assert_eq!(outcome.failed.len(), fenced);
    assert_eq!(outcome.acked, batch.len() - fenced);
    let lag = ctx.broker.group_lag(&group).await?;
    for p in &lag.partitions {
        let want = if p.partition == moved.partition {
            0
        } else {
            batch
                .iter()
                .filter(|m| m.partition == p.partition)
                .map(|m| m.offset + 1)
                .max()
                .unwrap_or(0)
        };
        assert_eq!(p.committed, want, "partition {}", p.partition);
    }
    Ok(())
}
