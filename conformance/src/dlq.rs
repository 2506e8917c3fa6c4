//! §5, dead letters: after `max_deliveries` (nack or lease expiry), the DLQ
//! record with every header, default and custom DLQ topics, redrive to the
//! failing group only, and (§4) groups' independence.
//!
//! `§N` names a section of `docs/semantics.md`;
//! quoted text is the rule a case checks. Each case's doc comment starts
//! with the sections it checks.

use crate::{eventually, poll_exactly, poll_n, unique, Backend, Ctx, WAIT};
use conveyor_core::dlq::{
    HEADER_ATTEMPTS, HEADER_ERROR, HEADER_FAILED_AT, HEADER_GROUP, HEADER_OFFSET, HEADER_PARTITION,
    HEADER_REDRIVE_ATTEMPTS, HEADER_REDRIVE_GROUP, HEADER_TOPIC,
};
use conveyor_core::prelude::*;
use conveyor_core::NackOptions;
use conveyor_core::{
    now_ms, DlqPolicy, ErrorKind, GroupConfig, Header, Message, NackOutcome, Record, Result,
    RetryBackoff,
};
use std::time::Duration;

fn queue_cfg(max: u32) -> GroupConfig {
    GroupConfig::queue()
        .with_visibility_timeout(Duration::from_secs(30))
        .with_retry_backoff(RetryBackoff::none())
        .with_dlq(DlqPolicy::new(max))
}

fn original() -> Record {
    Record::new(&b"\x00payload\xff"[..])
        .with_key("order-7")
        .with_header("trace", "t1")
        .with_header("dup", "1")
        .with_header("dup", &b"\x02"[..])
}

/// Everything in the DLQ topic (which must exist).
async fn dlq_messages(ctx: &Ctx<'_>, dlq: &str) -> Result<Vec<Message>> {
    let parts = ctx.broker.describe_topic(dlq).await?.partitions.len() as u32;
    let mut out = Vec::new();
    for p in 0..parts {
        out.extend(ctx.read_all(dlq, p).await?);
    }
    Ok(out)
}

/// Check the DLQ record of `m` (failed in `group` after `attempts`).
fn check_dead_letter(
    d: &Message,
    m: &Message,
    group: &str,
    attempts: u32,
    error: &str,
    since: u64,
) {
    assert_eq!(d.key, m.key, "key kept");
    assert_eq!(d.value, m.value, "value kept");
    assert_eq!(
        &d.headers[..m.headers.len()],
        &m.headers[..],
        "original headers kept, in order"
    );
    let h = |name: &str| {
        d.header_str(name)
            .unwrap_or_else(|| panic!("DLQ header {name} missing: {:?}", d.headers))
            .to_string()
    };
    assert_eq!(h(HEADER_TOPIC), m.topic);
    assert_eq!(h(HEADER_PARTITION), m.partition.to_string());
    assert_eq!(h(HEADER_OFFSET), m.offset.to_string());
    assert_eq!(h(HEADER_GROUP), group);
    assert_eq!(h(HEADER_ATTEMPTS), attempts.to_string());
    assert_eq!(h(HEADER_ERROR), error);
    let failed_at: u64 = h(HEADER_FAILED_AT).parse().expect("failed_at is ms");
    assert!(
        failed_at + 2_000 >= since && failed_at <= now_ms() + 2_000,
        "failed_at {failed_at}"
    );
}

/// §5: "When a message fails its last allowed attempt (nack ...), it is
/// appended to the DLQ topic (default `{topic}.{group}.dlq`) with its key,
/// value and headers plus headers `conveyor.dlq.topic`, `.partition`,
/// `.offset`, `.group`, `.attempts`, `.error` ... and `.failed_at`, and only
/// then settled for the group."
pub async fn nack_path_dead_letters(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let topic = ctx.topic("dlqnack", 2).await?;
    let since = now_ms();
    ctx.producer().await?.send(&topic, original()).await?;
    let group = unique("g");
    let c = ctx.broker.consumer(&group, &[&topic], queue_cfg(3)).await?;
    let mut last = None;
    for attempt in 1..=3u32 {
        let m = poll_n(c.as_ref(), 1, WAIT).await?.remove(0);
        assert_eq!(m.attempt, attempt);
        let outcome = c
            .nack(
                &m,
                NackOptions::new()
                    .with_delay(Duration::ZERO)
                    .with_reason("smtp 550"),
            )
            .await?;
        let want = if attempt < 3 {
            NackOutcome::Redeliver
        } else {
            NackOutcome::DeadLettered
        };
        assert_eq!(outcome, want, "attempt {attempt}");
        last = Some(m);
    }
    let m = last.expect("delivered");
    let dlq = format!("{topic}.{group}.dlq");
    let dead = dlq_messages(&ctx, &dlq).await?;
    assert_eq!(dead.len(), 1);
    check_dead_letter(&dead[0], &m, &group, 3, "smtp 550", since);
    assert!(
        c.poll(10, Duration::from_millis(100)).await?.is_empty(),
        "settled"
    );
    assert_eq!(ctx.broker.group_lag(&group).await?.total_lag(), 0);
    Ok(())
}

/// §5: "When a message fails its last allowed attempt (... or lease expiry in
/// queue mode)", it is dead-lettered the same way.
pub async fn lease_expiry_path_dead_letters(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let topic = ctx.topic("dlqexp", 1).await?;
    let since = now_ms();
    ctx.producer().await?.send(&topic, original()).await?;
    let group = unique("g");
    let cfg = queue_cfg(2).with_visibility_timeout(Duration::from_millis(100));
    let c = ctx.broker.consumer(&group, &[&topic], cfg).await?;
    let first = poll_n(c.as_ref(), 1, WAIT).await?.remove(0);
    let second = poll_n(c.as_ref(), 1, WAIT).await?.remove(0);
    assert_eq!((first.attempt, second.attempt), (1, 2));
    let dlq = format!("{topic}.{group}.dlq");
    let dead = eventually("the expired message in the DLQ", WAIT, || {
        let ctx = &ctx;
        let c = &c;
        let dlq = dlq.clone();
        async move {
            let extra = c.poll(1, Duration::from_millis(10)).await.expect("poll");
            assert!(
                extra.is_empty(),
                "redelivered past max_deliveries: {extra:?}"
            );
            match dlq_messages(ctx, &dlq).await {
                Ok(d) if !d.is_empty() => Some(d),
                Ok(_) => None,
                Err(e) if e.kind() == ErrorKind::TopicNotFound => None,
                Err(e) => panic!("{e}"),
            }
        }
    })
    .await;
    assert_eq!(dead.len(), 1);
    let error = dead[0]
        .header_str(HEADER_ERROR)
        .unwrap_or_default()
        .to_string();
    check_dead_letter(&dead[0], &second, &group, 2, &error, since);
    // Appended first, "and only then settled": the settle may land just
    // after the DLQ record is visible.
    eventually("the expired message settled for the group", WAIT, || {
        let ctx = &ctx;
        let group = group.clone();
        async move {
            let lag = ctx.broker.group_lag(&group).await.expect("lag");
            (lag.total_lag() == 0).then_some(())
        }
    })
    .await;
    Ok(())
}

/// §4a, §5: Stream mode dead-letters on the last nack too, then moves on: the
/// next record is delivered and the committed offset passes the dead one.
pub async fn stream_nack_dead_letters(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let topic = ctx.topic("dlqstream", 1).await?;
    let p = ctx.producer().await?;
    p.send(&topic, original()).await?;
    p.send(&topic, Record::new("next")).await?;
    let group = unique("g");
    let cfg = GroupConfig::stream()
        .with_retry_backoff(RetryBackoff::none())
        .with_dlq(DlqPolicy::new(2));
    let c = ctx.broker.consumer(&group, &[&topic], cfg).await?;
    let m = poll_n(c.as_ref(), 1, WAIT).await?.remove(0);
    assert_eq!(
        c.nack(&m, NackOptions::new().with_reason("bad")).await?,
        NackOutcome::Redeliver
    );
    let again = poll_n(c.as_ref(), 1, WAIT).await?.remove(0);
    assert_eq!((again.offset, again.attempt), (0, 2));
    assert_eq!(
        c.nack(&again, NackOptions::new().with_reason("bad"))
            .await?,
        NackOutcome::DeadLettered
    );
    let dead = dlq_messages(&ctx, &format!("{topic}.{group}.dlq")).await?;
    assert_eq!(dead.len(), 1);
    check_dead_letter(&dead[0], &again, &group, 2, "bad", 0);
    let rest = poll_n(c.as_ref(), 2, Duration::from_millis(300)).await?;
    assert!(rest.iter().all(|m| m.offset == 1), "moves on: {rest:?}");
    assert!(!rest.is_empty());
    c.ack(&rest[0]).await?;
    assert_eq!(
        ctx.broker.group_lag(&group).await?.partitions[0].committed,
        2
    );
    Ok(())
}

/// §5: "the DLQ topic (default `{topic}.{group}.dlq`, created on demand)": a
/// configured DLQ topic is used instead, and the default one is not made.
pub async fn custom_dlq_topic(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let topic = ctx.topic("dlqcustom", 1).await?;
    ctx.producer().await?.send(&topic, original()).await?;
    let group = unique("g");
    let custom = unique("custom-dlq");
    let cfg = queue_cfg(1).with_dlq(DlqPolicy::new(1).with_topic(custom.clone()));
    let c = ctx.broker.consumer(&group, &[&topic], cfg).await?;
    let m = poll_n(c.as_ref(), 1, WAIT).await?.remove(0);
    assert_eq!(
        c.nack(&m, NackOptions::new()).await?,
        NackOutcome::DeadLettered
    );
    let dead = dlq_messages(&ctx, &custom).await?;
    assert_eq!(dead.len(), 1);
    check_dead_letter(&dead[0], &m, &group, 1, "", 0);
    let topics = ctx.broker.list_topics().await?;
    assert!(!topics.contains(&format!("{topic}.{group}.dlq")));
    Ok(())
}

/// §5: "Redrive delivers DLQ messages again to the group that dead-lettered
/// them [...]. The DLQ headers are removed and an attempt header kept for
/// audit; each is settled in the DLQ only after it is handed back": the failing
/// group gets each again once, as a new record (attempt 1, original key, value
/// and headers, same partition), and a second redrive finds nothing.
pub async fn redrive_delivers_again(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let topic = ctx.topic("redrive", 3).await?;
    let p = ctx.producer().await?;
    for i in 0..3 {
        p.send(&topic, original().with_header("i", format!("{i}")))
            .await?;
    }
    let group = unique("g");
    let c = ctx.broker.consumer(&group, &[&topic], queue_cfg(2)).await?;
    let mut failed = Vec::new();
    while failed.len() < 3 {
        for m in poll_n(c.as_ref(), 3, WAIT).await? {
            if c.nack(&m, NackOptions::new().with_reason("x")).await? == NackOutcome::DeadLettered {
                failed.push(m);
            }
        }
    }
    let ends_before = ctx.log_ends(&topic).await?;
    let dlq = format!("{topic}.{group}.dlq");
    assert_eq!(ctx.broker.redrive(&dlq, Some(2)).await?, 2);
    assert_eq!(ctx.broker.redrive(&dlq, None).await?, 1);
    assert_eq!(ctx.broker.redrive(&dlq, None).await?, 0, "each moved once");
    let ends_after = ctx.log_ends(&topic).await?;
    let added: u64 = ends_after.iter().sum::<u64>() - ends_before.iter().sum::<u64>();
    assert_eq!(added, 3);
    let back = poll_exactly(c.as_ref(), 3, Duration::from_millis(50)).await?;
    for m in &back {
        assert_eq!(m.attempt, 1, "a new record");
        assert!(
            m.headers
                .iter()
                .all(|h| !h.name.starts_with("conveyor.dlq.")),
            "{:?}",
            m.headers
        );
        assert_eq!(m.header_str(HEADER_REDRIVE_ATTEMPTS), Some("2"));
        let orig = failed
            .iter()
            .find(|f| f.header("i") == m.header("i"))
            .expect("matches an original");
        assert_eq!((&m.key, &m.value), (&orig.key, &orig.value));
        let want: Vec<Header> = orig.headers.clone();
        assert_eq!(&m.headers[..want.len()], &want[..], "original headers kept");
        assert_eq!(m.partition, orig.partition, "same key, same partition");
        c.ack(m).await?;
    }
    assert_eq!(ctx.broker.group_lag(&group).await?.total_lag(), 0);
    Ok(())
}

/// §4, §5: "Groups are independent: one group's progress, failures and DLQ
/// never affect another's."
pub async fn groups_independent(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let topic = ctx.topic("indep", 1).await?;
    let p = ctx.producer().await?;
    for i in 0..3 {
        p.send(&topic, Record::new(format!("{i}"))).await?;
    }
    let (ga, gb) = (unique("ga"), unique("gb"));
    let a = ctx.broker.consumer(&ga, &[&topic], queue_cfg(1)).await?;
    let b = ctx.broker.consumer(&gb, &[&topic], queue_cfg(1)).await?;
    for m in poll_exactly(a.as_ref(), 3, Duration::ZERO).await? {
        if m.offset == 0 {
            assert_eq!(
                a.nack(&m, NackOptions::new()).await?,
                NackOutcome::DeadLettered
            );
        } else {
            a.ack(&m).await?;
        }
    }
    assert_eq!(ctx.broker.group_lag(&ga).await?.total_lag(), 0);
    let lag_b = ctx.broker.group_lag(&gb).await?;
    assert_eq!(lag_b.total_lag(), 3, "B untouched by A's progress");
    let got = poll_exactly(b.as_ref(), 3, Duration::from_millis(50)).await?;
    assert!(
        got.iter().all(|m| m.attempt == 1),
        "B's attempts are its own"
    );
    for m in &got {
        b.ack(m).await?;
    }
    let topics = ctx.broker.list_topics().await?;
    assert!(topics.contains(&format!("{topic}.{ga}.dlq")));
    assert!(
        !topics.contains(&format!("{topic}.{gb}.dlq")),
        "B has no dead letters"
    );
    Ok(())
}

/// §5: "Nothing is dropped silently, ever": a record of exactly
/// `max_message_bytes` is dead-lettered (its DLQ headers on top) and redriven
/// (its audit header on top) like any other, and delivered again.
pub async fn max_size_record_dead_letters_and_redrives(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let topic = ctx.topic("dlqbig", 1).await?;
    let limit = 1024 * 1024;
    let record = Record::new(vec![9u8; limit - 3]).with_key("key");
    assert_eq!(record.size(), limit);
    ctx.producer().await?.send(&topic, record).await?;
    let group = unique("g");
    let c = ctx.broker.consumer(&group, &[&topic], queue_cfg(1)).await?;
    let m = poll_n(c.as_ref(), 1, WAIT).await?.remove(0);
    assert_eq!(
        c.nack(&m, NackOptions::new().with_reason("too big to fail"))
            .await?,
        NackOutcome::DeadLettered
    );
    let dlq = format!("{topic}.{group}.dlq");
    let dead = dlq_messages(&ctx, &dlq).await?;
    assert_eq!(dead.len(), 1);
    check_dead_letter(&dead[0], &m, &group, 1, "too big to fail", 0);
    assert_eq!(ctx.broker.redrive(&dlq, None).await?, 1);
    let back = poll_n(c.as_ref(), 1, WAIT).await?.remove(0);
    assert_eq!((back.offset, back.value.len()), (1, limit - 3));
    assert_eq!(back.header_str(HEADER_REDRIVE_ATTEMPTS), Some("1"));
    c.ack(&back).await?;
    Ok(())
}

/// §5: Lease expiry dead-letters "when a message fails its last allowed
/// attempt" even when no member polls any more (the broker does it).
pub async fn lease_expiry_dead_letters_without_polling(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let topic = ctx.topic("dlqidle", 1).await?;
    ctx.producer().await?.send(&topic, original()).await?;
    let group = unique("g");
    let cfg = queue_cfg(1).with_visibility_timeout(Duration::from_millis(100));
    let c = ctx.broker.consumer(&group, &[&topic], cfg.clone()).await?;
    let m = poll_n(c.as_ref(), 1, WAIT).await?.remove(0);
    let dlq = format!("{topic}.{group}.dlq");
    let dead = eventually("the expired lease dead-lettered", WAIT, || {
        let ctx = &ctx;
        let dlq = dlq.clone();
        async move {
            match dlq_messages(ctx, &dlq).await {
                Ok(d) if !d.is_empty() => Some(d),
                Ok(_) => None,
                Err(e) if e.kind() == ErrorKind::TopicNotFound => None,
                Err(e) => panic!("{e}"),
            }
        }
    })
    .await;
    let error = dead[0]
        .header_str(HEADER_ERROR)
        .unwrap_or_default()
        .to_string();
    check_dead_letter(&dead[0], &m, &group, 1, &error, 0);
    // Appended first, "and only then settled".
    eventually("the expired lease settled for the group", WAIT, || {
        let ctx = &ctx;
        let group = group.clone();
        async move {
            let lag = ctx.broker.group_lag(&group).await.expect("lag");
            ((lag.total_lag(), lag.total_in_flight()) == (0, 0)).then_some(())
        }
    })
    .await;
    drop(c);
    Ok(())
}

/// §5: "Redrive delivers DLQ messages again to the group that dead-lettered
/// them, and to no other group [...]: the other groups of the original topic
/// already handled those records and must not see them twice." Fan-out: `sms`
/// (queue) dead-letters, `email` (queue) and `audit` (stream) handled
/// everything; after the redrive only `sms` receives the records again, and the
/// others' lag returns to zero once they poll.
pub async fn redrive_reaches_only_the_failing_group(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let topic = ctx.topic("fanout", 2).await?;
    let p = ctx.producer().await?;
    for i in 0..4 {
        let r = original()
            .with_header("i", format!("{i}"))
            .with_idempotency_key(format!("evt-{i}"));
        p.send(&topic, r).await?;
    }
    let (sms, email, audit) = (unique("sms"), unique("email"), unique("audit"));
    let sms_c = ctx.broker.consumer(&sms, &[&topic], queue_cfg(1)).await?;
    let email_c = ctx.broker.consumer(&email, &[&topic], queue_cfg(5)).await?;
    let audit_c = ctx
        .broker
        .consumer(&audit, &[&topic], GroupConfig::stream())
        .await?;
    for m in poll_exactly(email_c.as_ref(), 4, Duration::ZERO).await? {
        email_c.ack(&m).await?;
    }
    for m in poll_exactly(audit_c.as_ref(), 4, Duration::ZERO).await? {
        audit_c.ack(&m).await?;
    }
    for m in poll_exactly(sms_c.as_ref(), 4, Duration::ZERO).await? {
        let outcome = sms_c
            .nack(&m, NackOptions::new().with_reason("no route"))
            .await?;
        assert_eq!(outcome, NackOutcome::DeadLettered);
    }
    let dlq = format!("{topic}.{sms}.dlq");
    assert_eq!(ctx.broker.redrive(&dlq, None).await?, 4);

    let again = poll_exactly(sms_c.as_ref(), 4, Duration::from_millis(50)).await?;
    for m in &again {
        assert_eq!(m.header_str(HEADER_REDRIVE_GROUP), Some(sms.as_str()));
        let i = m.header_str("i").expect("original headers kept");
        assert_eq!(
            m.idempotency_key.as_deref(),
            Some(format!("evt-{i}").as_str()),
            "the producer's idempotency key survives the DLQ and the redrive (§8)"
        );
        sms_c.ack(m).await?;
    }
    // A redriven message that fails again goes back to the DLQ and is
    // redriven again: the DLQ record must not stay addressed to the group,
    // or the redrive would pass it unseen and it would be stuck there.
    p.send(
        &topic,
        original()
            .with_header("i", "9")
            .with_idempotency_key("evt-9"),
    )
    .await?;
    let first = poll_exactly(sms_c.as_ref(), 1, Duration::ZERO).await?;
    let outcome = sms_c.nack(&first[0], NackOptions::new()).await?;
    assert_eq!(outcome, NackOutcome::DeadLettered);
    assert_eq!(ctx.broker.redrive(&dlq, None).await?, 1);
    let back = poll_exactly(sms_c.as_ref(), 1, Duration::ZERO).await?;
    let outcome = sms_c.nack(&back[0], NackOptions::new()).await?;
    assert_eq!(outcome, NackOutcome::DeadLettered, "failed again");
    assert_eq!(ctx.broker.redrive(&dlq, None).await?, 1, "redriven again");
    let third = poll_exactly(sms_c.as_ref(), 1, Duration::from_millis(50)).await?;
    assert_eq!(third[0].idempotency_key.as_deref(), Some("evt-9"));
    assert_eq!(
        third[0].header_str(HEADER_REDRIVE_GROUP),
        Some(sms.as_str())
    );
    sms_c.ack(&third[0]).await?;
    // The other groups get evt-9 itself, once.
    for m in poll_exactly(email_c.as_ref(), 1, Duration::ZERO).await? {
        email_c.ack(&m).await?;
    }
    for m in poll_exactly(audit_c.as_ref(), 1, Duration::ZERO).await? {
        audit_c.ack(&m).await?;
    }

    let email_more = email_c.poll(16, Duration::from_millis(100)).await?;
    assert!(
        email_more.is_empty(),
        "email got redriven records: {email_more:?}"
    );
    let audit_more = audit_c.poll(16, Duration::from_millis(100)).await?;
    assert!(
        audit_more.is_empty(),
        "audit got redriven records: {audit_more:?}"
    );
    assert_eq!(ctx.broker.group_lag(&sms).await?.total_lag(), 0);
    assert_eq!(ctx.broker.group_lag(&email).await?.total_lag(), 0);
    // A late-joining group never sees them either (it reads from the start).
    let late = unique("late");
    let late_c = ctx.broker.consumer(&late, &[&topic], queue_cfg(5)).await?;
    let got = poll_n(late_c.as_ref(), 16, Duration::from_millis(300)).await?;
    assert_eq!(got.len(), 5, "only the five originals: {got:?}");
    Ok(())
}
