//! §4 and §4b, consumer groups in queue mode: competing consumers, leases,
//! ack, nack with delay, lease expiry, extend, `LeaseExpired`, attempt
//! counts, leaving, and `poll`'s cancel safety.
//!
//! `§N` names a section of `docs/semantics.md`;
//! quoted text is the rule a case checks. Each case's doc comment starts
//! with the sections it checks.

use crate::{expect_kind, nack_options, poll_exactly, poll_n, unique, waited, Backend, Ctx, WAIT};
use conveyor_core::prelude::*;
use conveyor_core::NackOptions;
use conveyor_core::{
    BrokerOptions, Durability, ErrorKind, GroupConfig, Record, Result, RetryBackoff,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

async fn send_n(ctx: &Ctx<'_>, topic: &str, n: usize) -> Result<()> {
    let records = (0..n).map(|i| Record::new(format!("m{i}"))).collect();
    ctx.producer().await?.send_batch(topic, records).await?;
    Ok(())
}

fn queue_cfg(visibility: Duration) -> GroupConfig {
    GroupConfig::queue()
        .with_visibility_timeout(visibility)
        .with_retry_backoff(RetryBackoff::none())
}

/// §4, §4b: "within a group each record is handed to one member at a time
/// (competing consumers)": three members polling concurrently receive every
/// record, each exactly once when nothing fails.
pub async fn competing_consumers_each_once(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let topic = ctx.topic("compete", 2).await?;
    send_n(&ctx, &topic, 300).await?;
    let group = unique("g");
    let acked = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..3 {
        let c = ctx
            .broker
            .consumer(&group, &[&topic], queue_cfg(Duration::from_secs(30)))
            .await?;
        let acked = acked.clone();
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            let start = Instant::now();
            while acked.load(Ordering::Acquire) < 300 && start.elapsed() < WAIT {
                for m in c.poll(7, Duration::from_millis(20)).await? {
                    c.ack(&m).await?;
                    assert_eq!(m.attempt, 1);
                    got.push((m.partition, m.offset));
                    acked.fetch_add(1, Ordering::AcqRel);
                }
            }
            c.close().await?;
            Ok::<_, conveyor_core::Error>(got)
        }));
    }
    let mut seen: BTreeMap<(u32, u64), usize> = BTreeMap::new();
    for t in tasks {
        for k in t.await.expect("task")? {
            *seen.entry(k).or_default() += 1;
        }
    }
    assert_eq!(seen.len(), 300, "all delivered");
    assert!(seen.values().all(|n| *n == 1), "none delivered twice");
    let lag = ctx.broker.group_lag(&group).await?;
    assert_eq!(lag.total_lag(), 0);
    Ok(())
}

/// §4b: "Any member may receive any record; parallelism is not bounded by the
/// partition count": two members hold leases on one partition at once.
pub async fn parallel_beyond_partitions(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let topic = ctx.topic("par", 1).await?;
    send_n(&ctx, &topic, 4).await?;
    let group = unique("g");
    let cfg = queue_cfg(Duration::from_secs(30));
    let a = ctx.broker.consumer(&group, &[&topic], cfg.clone()).await?;
    let b = ctx.broker.consumer(&group, &[&topic], cfg).await?;
    let ma = poll_exactly(a.as_ref(), 1, Duration::ZERO).await?;
    let mb = poll_exactly(b.as_ref(), 1, Duration::ZERO).await?;
    assert_ne!(ma[0].offset, mb[0].offset);
    assert_eq!(a.generation().await?, 0, "queue mode has no generations");
    let lag = ctx.broker.group_lag(&group).await?;
    assert_eq!(lag.partitions[0].in_flight, 2);
    a.ack(&ma[0]).await?;
    b.ack(&mb[0]).await?;
    Ok(())
}

/// §4b: "Records are offered in offset order per partition".
pub async fn offered_in_offset_order(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let topic = ctx.topic("qorder", 3).await?;
    let p = ctx.producer().await?;
    for i in 0..30u32 {
        p.send(&topic, Record::new(format!("{i}")).with_partition(i % 3))
            .await?;
    }
    let c = ctx
        .broker
        .consumer(&unique("g"), &[&topic], queue_cfg(Duration::from_secs(30)))
        .await?;
    let mut last: BTreeMap<u32, u64> = BTreeMap::new();
    let mut n = 0;
    while n < 30 {
        let got = poll_n(c.as_ref(), (1 + n % 4).min(30 - n), WAIT).await?;
        assert!(!got.is_empty());
        for m in got {
            if let Some(prev) = last.insert(m.partition, m.offset) {
                assert_eq!(m.offset, prev + 1, "partition {} in order", m.partition);
            } else {
                assert_eq!(m.offset, 0);
            }
            c.ack(&m).await?;
            n += 1;
        }
    }
    Ok(())
}

/// §4b: "No message is in flight to two members at once while its lease holds":
/// while A holds every lease, B gets nothing.
pub async fn no_second_lease_while_held(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let topic = ctx.topic("held", 2).await?;
    send_n(&ctx, &topic, 6).await?;
    let group = unique("g");
    let cfg = queue_cfg(Duration::from_secs(30));
    let a = ctx.broker.consumer(&group, &[&topic], cfg.clone()).await?;
    let b = ctx.broker.consumer(&group, &[&topic], cfg).await?;
    let held = poll_exactly(a.as_ref(), 6, Duration::ZERO).await?;
    assert!(b.poll(10, Duration::from_millis(300)).await?.is_empty());
    assert_eq!(ctx.broker.group_lag(&group).await?.total_in_flight(), 6);
    for m in &held {
        a.ack(m).await?;
    }
    Ok(())
}

/// §4b: "`ack` settles it for the group forever": an acked message is not
/// redelivered after its visibility timeout would have run out.
pub async fn ack_settles_forever(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let topic = ctx.topic("acked", 1).await?;
    send_n(&ctx, &topic, 3).await?;
    let group = unique("g");
    let cfg = queue_cfg(Duration::from_millis(100));
    let a = ctx.broker.consumer(&group, &[&topic], cfg.clone()).await?;
    let got = poll_exactly(a.as_ref(), 3, Duration::ZERO).await?;
    for m in &got {
        a.ack(m).await?;
    }
    let b = ctx.broker.consumer(&group, &[&topic], cfg).await?;
    assert!(b.poll(10, Duration::from_millis(400)).await?.is_empty());
    assert!(a.poll(10, Duration::from_millis(50)).await?.is_empty());
    expect_kind(a.ack(&got[0]).await, ErrorKind::LeaseExpired);
    let lag = ctx.broker.group_lag(&group).await?;
    assert_eq!((lag.total_lag(), lag.partitions[0].committed), (0, 3));
    Ok(())
}

/// §4b: "`nack(delay)` makes it available again after `delay`" (not before),
/// with the attempt number raised; without a delay, the group's retry backoff
/// applies.
pub async fn nack_with_delay(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let topic = ctx.topic("qnack", 1).await?;
    send_n(&ctx, &topic, 1).await?;
    let cfg = queue_cfg(Duration::from_secs(30))
        .with_retry_backoff(RetryBackoff::fixed(Duration::from_millis(250)));
    let c = ctx.broker.consumer(&unique("g"), &[&topic], cfg).await?;
    let mut m = poll_exactly(c.as_ref(), 1, Duration::ZERO).await?.remove(0);
    for (delay, attempt) in [(Some(Duration::from_millis(250)), 2), (None, 3)] {
        let at = Instant::now();
        c.nack(&m, nack_options(delay)).await?;
        // Whenever it comes back (on a loaded machine the first poll may
        // already be past the delay), it is not before the delay.
        let mut again = c.poll(10, Duration::from_millis(100)).await?;
        if again.is_empty() {
            again = poll_n(c.as_ref(), 1, WAIT).await?;
        }
        assert!(
            waited(at, Duration::from_millis(250)),
            "redelivered after {:?}, before the delay",
            at.elapsed()
        );
        m = again.remove(0);
        assert_eq!((m.offset, m.attempt), (0, attempt));
    }
    c.ack(&m).await?;
    Ok(())
}

/// §4b: "An expired lease makes it available again", with attempt + 1.
pub async fn lease_expiry_redelivers(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let topic = ctx.topic("expiry", 1).await?;
    send_n(&ctx, &topic, 1).await?;
    let group = unique("g");
    let cfg = queue_cfg(Duration::from_millis(200));
    let a = ctx.broker.consumer(&group, &[&topic], cfg.clone()).await?;
    let b = ctx.broker.consumer(&group, &[&topic], cfg).await?;
    let at = Instant::now();
    let first = poll_exactly(a.as_ref(), 1, Duration::ZERO).await?;
    let again = poll_n(b.as_ref(), 1, WAIT).await?;
    assert!(
        waited(at, Duration::from_millis(200)),
        "not before the timeout"
    );
    assert_eq!(again[0].offset, first[0].offset);
    assert_eq!(again[0].attempt, 2);
    b.ack(&again[0]).await?;
    Ok(())
}

/// Lease the next message on `c` and extend its lease to 30 s. With a
/// short `visibility`, a loaded machine may let the lease run out between
/// the poll and the extend: then `extend` must say `LeaseExpired` (and only
/// once the visibility timeout has passed), and the message is taken again.
async fn leased_and_extended(c: &dyn Consumer, visibility: Duration) -> Result<Message> {
    loop {
        let leased_at = Instant::now();
        let m = poll_n(c, 1, WAIT).await?.remove(0);
        match c.extend(&m, Duration::from_secs(30)).await {
            Ok(()) => return Ok(m),
            Err(e) if e.kind() == ErrorKind::LeaseExpired => assert!(
                waited(leased_at, visibility),
                "lease expired after {:?}, before its {visibility:?}",
                leased_at.elapsed()
            ),
            Err(e) => return Err(e),
        }
    }
}

/// §4b: "`extend(message, d)` prolongs a lease (SQS ChangeMessageVisibility)":
/// a lease kept extended is not redelivered past its original timeout.
pub async fn extend_prevents_redelivery(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let topic = ctx.topic("extend", 1).await?;
    send_n(&ctx, &topic, 1).await?;
    let group = unique("g");
    let cfg = queue_cfg(Duration::from_millis(200));
    let a = ctx.broker.consumer(&group, &[&topic], cfg.clone()).await?;
    let b = ctx.broker.consumer(&group, &[&topic], cfg).await?;
    let m = leased_and_extended(a.as_ref(), Duration::from_millis(200)).await?;
    assert!(
        b.poll(10, Duration::from_millis(500)).await?.is_empty(),
        "extended"
    );
    a.extend(&m, Duration::from_millis(100)).await?;
    // Shortened again: now it expires and is redelivered.
    let again = poll_n(b.as_ref(), 1, WAIT).await?;
    assert_eq!((again[0].offset, again[0].attempt), (0, m.attempt + 1));
    b.ack(&again[0]).await?;
    Ok(())
}

/// §4b: "Acking a message whose lease expired and was re-leased is
/// `ErrorKind::LeaseExpired` and does not settle the new lease"; the new lease
/// still acks fine.
pub async fn ack_after_expiry_is_lease_expired(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let topic = ctx.topic("expired", 1).await?;
    send_n(&ctx, &topic, 1).await?;
    let group = unique("g");
    let cfg = queue_cfg(Duration::from_millis(300));
    let a = ctx.broker.consumer(&group, &[&topic], cfg.clone()).await?;
    let b = ctx.broker.consumer(&group, &[&topic], cfg).await?;
    let old = poll_exactly(a.as_ref(), 1, Duration::ZERO).await?.remove(0);
    let new = leased_and_extended(b.as_ref(), Duration::from_millis(300)).await?;
    assert_eq!(new.offset, old.offset);
    assert!(new.attempt >= 2, "redelivered: attempt {}", new.attempt);
    let e = expect_kind(a.ack(&old).await, ErrorKind::LeaseExpired);
    assert!(e.message().contains(&topic), "message names the topic: {e}");
    expect_kind(
        a.extend(&old, Duration::from_secs(1)).await,
        ErrorKind::LeaseExpired,
    );
    expect_kind(
        a.nack(&old, NackOptions::new()).await,
        ErrorKind::LeaseExpired,
    );
    let lag = ctx.broker.group_lag(&group).await?;
    assert_eq!(
        (lag.total_lag(), lag.total_in_flight()),
        (1, 1),
        "new lease intact"
    );
    b.ack(&new).await?;
    let lag = ctx.broker.group_lag(&group).await?;
    assert_eq!(lag.total_lag(), 0);
    Ok(())
}

/// §4b: "The attempt number (SQS ApproximateReceiveCount) is stored by the
/// backend and survives restarts of consumers": it counts every delivery,
/// across members that come and go.
pub async fn attempt_counts_survive_members(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let topic = ctx.topic("attempts", 1).await?;
    send_n(&ctx, &topic, 2).await?;
    let group = unique("g");
    let cfg = queue_cfg(Duration::from_secs(30));
    for attempt in 1..=4u32 {
        let c = ctx.broker.consumer(&group, &[&topic], cfg.clone()).await?;
        let want = if attempt == 1 { 2 } else { 1 };
        let got = poll_exactly(c.as_ref(), want, Duration::ZERO).await?;
        for m in &got {
            if m.offset == 1 {
                assert_eq!(m.attempt, 1);
                c.ack(m).await?;
            }
        }
        let m = got.iter().find(|m| m.offset == 0).expect("offset 0");
        assert_eq!(m.attempt, attempt);
        if attempt % 2 == 0 {
            c.nack(m, NackOptions::new().with_delay(Duration::ZERO))
                .await?;
            c.close().await?;
        } else {
            drop(c); // leaves with the lease held: released, still counted
        }
    }
    let c = ctx.broker.consumer(&group, &[&topic], cfg).await?;
    let got = poll_exactly(c.as_ref(), 1, Duration::from_millis(50)).await?;
    assert_eq!((got[0].offset, got[0].attempt), (0, 5));
    c.ack(&got[0]).await?;
    Ok(())
}

/// §4, §4b: "Leaving (`close`) removes it at once" and its unacked leases are
/// released: another member gets them long before the visibility timeout.
pub async fn close_releases_leases(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let topic = ctx.topic("release", 2).await?;
    send_n(&ctx, &topic, 5).await?;
    let group = unique("g");
    let cfg = queue_cfg(Duration::from_secs(60));
    let a = ctx.broker.consumer(&group, &[&topic], cfg.clone()).await?;
    let b = ctx.broker.consumer(&group, &[&topic], cfg).await?;
    let held = poll_exactly(a.as_ref(), 5, Duration::ZERO).await?;
    a.close().await?;
    let got = poll_exactly(b.as_ref(), 5, Duration::from_millis(50)).await?;
    let want: BTreeSet<(u32, u64)> = held.iter().map(|m| (m.partition, m.offset)).collect();
    let have: BTreeSet<(u32, u64)> = got.iter().map(|m| (m.partition, m.offset)).collect();
    assert_eq!(have, want);
    assert!(got.iter().all(|m| m.attempt == 2));
    expect_kind(a.ack(&held[0]).await, ErrorKind::Closed);
    Ok(())
}

/// §4, §4b: "Leaving (`close`) removes it at once" and "No message is in flight
/// to two members at once while its lease holds": five members holding leases
/// close at the same moment; a new member then gets every unacked record
/// (released leases with attempt 2, never-delivered ones with attempt 1) long
/// before the visibility timeout, and none that was acked.
pub async fn close_many_members_at_once(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let topic = ctx.topic("closeall", 2).await?;
    send_n(&ctx, &topic, 30).await?;
    let group = unique("g");
    let cfg = queue_cfg(Duration::from_secs(60));
    let mut members = Vec::new();
    for _ in 0..5 {
        members.push(ctx.broker.consumer(&group, &[&topic], cfg.clone()).await?);
    }
    let mut acked = BTreeSet::new();
    let mut leased = BTreeSet::new();
    for m in &members {
        let got = poll_exactly(m.as_ref(), 4, Duration::ZERO).await?;
        for (i, msg) in got.iter().enumerate() {
            if i < 2 {
                m.ack(msg).await?;
                acked.insert((msg.partition, msg.offset));
            } else {
                leased.insert((msg.partition, msg.offset));
            }
        }
    }
    futures::future::try_join_all(members.iter().map(|m| m.close())).await?;
    assert_eq!(ctx.broker.group_lag(&group).await?.total_lag(), 20);
    let fresh = ctx.broker.consumer(&group, &[&topic], cfg).await?;
    let got = poll_exactly(fresh.as_ref(), 20, Duration::from_millis(50)).await?;
    let have: BTreeSet<(u32, u64)> = got.iter().map(|m| (m.partition, m.offset)).collect();
    assert_eq!(have.len(), 20, "a record delivered twice to the new member");
    assert!(have.is_disjoint(&acked), "an acked record came back");
    for m in &got {
        let want = if leased.contains(&(m.partition, m.offset)) {
            2
        } else {
            1
        };
        assert_eq!(m.attempt, want, "{}", m.position());
        fresh.ack(m).await?;
    }
    assert_eq!(ctx.broker.group_lag(&group).await?.total_lag(), 0);
    Ok(())
}

/// How long a server backend may take to give back the leases of a poll
/// dropped while its commit was on the wire (docs §4).
pub const GIVE_BACK: Duration = Duration::from_secs(2);

/// §4, §4b: "A delivered message is **leased** to its member" and "The attempt
/// number (SQS ApproximateReceiveCount) is stored by the backend": a `poll`
/// future dropped before it returns delivered nothing, so it must leave no
/// lease taken and no attempt counted (tokio's cancel safety). `poll` futures
/// are dropped at a random one of their first await points that wait
/// ([`crate::cut_after`]; seeded, the seed is printed), with a durable broker,
/// so a persistent backend's state write is one of them; after every cut the
/// group has nothing in flight, and every record is finally delivered once,
/// with attempt 1. An embedded store must show nothing in flight at once; a
/// server backend may have had its commit on the wire when the future was
/// dropped, and must give those leases back within [`GIVE_BACK`] (docs §4).
pub async fn dropped_polls_leave_no_lease(backend: &dyn Backend) -> Result<()> {
    let guard = crate::model::seed_for("queue::dropped_polls_leave_no_lease");
    let mut rng = StdRng::seed_from_u64(guard.seed);
    let options = BrokerOptions::default().with_durability(Durability::Always);
    let ctx = Ctx::open_with(backend, options).await?;
    let topic = ctx.topic("dropq", 2).await?;
    const N: usize = 100;
    send_n(&ctx, &topic, N).await?;
    let group = unique("g");
    let c = ctx
        .broker
        .consumer(&group, &[&topic], queue_cfg(Duration::from_secs(60)))
        .await?;
    let mut got = BTreeSet::new();
    let (mut cuts, start) = (0usize, Instant::now());
    while got.len() < N && start.elapsed() < 2 * WAIT {
        // Mostly cut early; now and then let a poll finish, so progress is
        // possible even when every read waits (slow storage).
        let cut = if rng.gen_bool(0.25) {
            usize::MAX
        } else {
            rng.gen_range(1..=3)
        };
        let max = rng.gen_range(1..=4);
        match crate::cut_after(c.poll(max, Duration::from_millis(20)), cut).await {
            Some(messages) => {
                for m in messages? {
                    assert_eq!(
                        m.attempt,
                        1,
                        "{} first returned with attempt {}: a dropped poll counted an attempt",
                        m.position(),
                        m.attempt
                    );
                    c.ack(&m).await?;
                    got.insert((m.partition, m.offset));
                }
            }
            None => {
                cuts += 1;
                let deadline = if ctx.broker.capabilities().embedded {
                    Duration::ZERO
                } else {
                    GIVE_BACK
                };
                let start = Instant::now();
                loop {
                    let lag = ctx.broker.group_lag(&group).await?;
                    if lag.total_in_flight() == 0 {
                        break;
                    }
                    assert!(
                        start.elapsed() < deadline,
                        "after dropped poll #{cuts} (dropped after it was pending {cut} times), leases are held by no one (waited {deadline:?}): {lag:?}"
                    );
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
        }
    }
    assert_eq!(got.len(), N, "{cuts} polls dropped; not every record came");
    eprintln!("conveyor-conformance: queue::dropped_polls_leave_no_lease: {cuts} polls dropped");
    Ok(())
}

/// §4b: `ack_batch` settles every message of a batch, whatever partitions
/// and polls they came from, as `ack` would one by one: nothing of it
/// comes back, and the group's lag is 0.
pub async fn ack_batch_settles_across_partitions(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let topic = ctx.topic("batch-ack", 3).await?;
    send_n(&ctx, &topic, 30).await?;
    let group = unique("g");
    let cfg = queue_cfg(Duration::from_millis(300));
    let a = ctx.broker.consumer(&group, &[&topic], cfg.clone()).await?;
    let mut got = poll_exactly(a.as_ref(), 10, Duration::ZERO).await?;
    got.extend(poll_exactly(a.as_ref(), 20, Duration::ZERO).await?);
    let partitions: BTreeSet<u32> = got.iter().map(|m| m.partition).collect();
    assert_eq!(partitions.len(), 3, "the batch spans every partition");
    // Out of offset order: the last poll's messages first.
    got.reverse();
    let outcome = a.ack_batch(&got).await?;
    assert_eq!(outcome.acked, 30);
    assert!(outcome.is_complete(), "{:?}", outcome.failed);
    let b = ctx.broker.consumer(&group, &[&topic], cfg).await?;
    assert!(
        b.poll(10, Duration::from_millis(600)).await?.is_empty(),
        "an acked message came back"
    );
    let lag = ctx.broker.group_lag(&group).await?;
    assert_eq!((lag.total_lag(), lag.total_in_flight()), (0, 0));
    Ok(())
}

/// §4b: in `ack_batch` each message succeeds or fails on its own: an
/// already settled one and one whose lease expired and was re-leased are
/// `LeaseExpired` at their index (the new lease is not settled), a
/// message of another group is `InvalidArgument`, and the rest are
/// settled.
pub async fn ack_batch_reports_each_failure(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let topic = ctx.topic("batch-fail", 1).await?;
    send_n(&ctx, &topic, 5).await?;
    let group = unique("g");
    let a = ctx
        .broker
        .consumer(&group, &[&topic], queue_cfg(Duration::from_secs(30)))
        .await?;
    let short = ctx
        .broker
        .consumer(&group, &[&topic], queue_cfg(Duration::from_secs(30)))
        .await?;
    let got = poll_exactly(a.as_ref(), 4, Duration::ZERO).await?;
    // got[1]: settled before the batch.
    a.ack(&got[1]).await?;
    // got[2]: its lease is lost (nacked back, then leased by `short`).
    a.nack(&got[2], NackOptions::new()).await?;
    let releases = poll_n(short.as_ref(), 2, WAIT).await?;
    let re_leased = releases
        .iter()
        .find(|m| m.offset == got[2].offset)
        .expect("offset 2 leased again")
        .clone();
    // A message of another group.
    let other_group = unique("other");
    let other = ctx
        .broker
        .consumer(&other_group, &[&topic], queue_cfg(Duration::from_secs(30)))
        .await?;
    let foreign = poll_n(other.as_ref(), 1, WAIT).await?.remove(0);
    let batch = vec![
        got[0].clone(),
        got[1].clone(),
        got[2].clone(),
        foreign,
        got[3].clone(),
    ];
    let outcome = a.ack_batch(&batch).await?;
    assert_eq!(outcome.acked, 2, "got[0] and got[3] are settled");
    let failed: Vec<(usize, ErrorKind)> =
        outcome.failed.iter().map(|(i, e)| (*i, e.kind())).collect();
    assert_eq!(
        failed,
        vec![
            (1, ErrorKind::LeaseExpired),
            (2, ErrorKind::LeaseExpired),
            (3, ErrorKind::InvalidArgument),
        ]
    );
    // The re-leased delivery is intact and still settles.
    let lag = ctx.broker.group_lag(&group).await?;
    assert_eq!(lag.total_in_flight(), releases.len() as u64);
    short.ack(&re_leased).await?;
    let again = a.ack_batch(&got[..1]).await?;
    expect_kind(again.into_result(), ErrorKind::LeaseExpired);
    Ok(())
}
