//! §7, persistence (with §3's and §8's keys and §4b's attempt counts): "Closing
//! and reopening a broker keeps every acknowledged record, committed offset,
//! lease attempt count and DLQ record" (and topics, idempotency keys, and
//! offsets never reused). Only for backends whose capabilities say
//! `persistent`; others skip, saying so on stderr.
//!
//! `§N` names a section of `docs/semantics.md`;
//! quoted text is the rule a case checks. Each case's doc comment starts
//! with the sections it checks.

use crate::{poll_exactly, poll_n, skip, unique, Backend, Ctx, WAIT};
use conveyor_core::prelude::*;
use conveyor_core::NackOptions;
use conveyor_core::{
    DlqPolicy, GroupConfig, NackOutcome, Record, Result, Retention, RetryBackoff, TopicConfig,
};
use std::collections::BTreeSet;
use std::time::Duration;

async fn persistent<'a>(backend: &'a dyn Backend, case: &str) -> Result<Option<Ctx<'a>>> {
    let ctx = Ctx::open(backend).await?;
    if !ctx.broker.capabilities().persistent {
        skip(case, "backend is not persistent");
        return Ok(None);
    }
    Ok(Some(ctx))
}

/// §7: Reopen keeps every record byte for byte, topic configs, and bounds.
pub async fn reopen_keeps_records(backend: &dyn Backend) -> Result<()> {
    let Some(mut ctx) = persistent(backend, "persistence::reopen_keeps_records").await? else {
        return Ok(());
    };
    let config = TopicConfig::new(3).with_max_message_bytes(5000);
    let topic = ctx.topic_with("reopen", config).await?;
    let p = ctx.producer().await?;
    let mut sent = Vec::new();
    for i in 0..30u32 {
        let r = Record::new(vec![i as u8; i as usize])
            .with_key(format!("k{i}"))
            .with_header("h", vec![0u8, 255, i as u8])
            .with_header("h", "again");
        sent.push((p.send(&topic, r.clone()).await?, r));
    }
    let before = ctx.broker.describe_topic(&topic).await?;
    ctx.reopen().await?;
    let after = ctx.broker.describe_topic(&topic).await?;
    assert_eq!(after.config, config);
    assert_eq!(after.partitions.len(), before.partitions.len());
    for (a, b) in after.partitions.iter().zip(&before.partitions) {
        assert_eq!((a.log_start, a.log_end), (b.log_start, b.log_end));
    }
    for (receipt, record) in &sent {
        let m = ctx
            .broker
            .fetch(&topic, receipt.partition, receipt.offset, 1)
            .await?;
        assert_eq!(m[0].offset, receipt.offset);
        assert_eq!(
            (&m[0].key, &m[0].value, &m[0].headers),
            (&record.key, &record.value, &record.headers)
        );
        assert_eq!(m[0].timestamp, receipt.timestamp);
    }
    let r = ctx
        .producer()
        .await?
        .send(&topic, Record::new("new").with_partition(0))
        .await?;
    assert_eq!(r.offset, before.partitions[0].log_end, "offsets continue");
    Ok(())
}

/// §7: Reopen keeps committed offsets (stream) and settled messages (queue).
pub async fn reopen_keeps_committed_offsets(backend: &dyn Backend) -> Result<()> {
    let Some(mut ctx) = persistent(backend, "persistence::reopen_keeps_committed_offsets").await?
    else {
        return Ok(());
    };
    let topic = ctx.topic("commits", 1).await?;
    let records = (0..10).map(|i| Record::new(format!("{i}"))).collect();
    ctx.producer().await?.send_batch(&topic, records).await?;
    let (gs, gq) = (unique("gs"), unique("gq"));
    let s = ctx
        .broker
        .consumer(&gs, &[&topic], GroupConfig::stream())
        .await?;
    poll_exactly(s.as_ref(), 10, Duration::ZERO).await?;
    s.commit(&topic, 0, 6).await?;
    let q = ctx
        .broker
        .consumer(&gq, &[&topic], GroupConfig::queue())
        .await?;
    for m in poll_exactly(q.as_ref(), 10, Duration::ZERO).await? {
        if m.offset % 2 == 0 {
            q.ack(&m).await?;
        }
    }
    ctx.reopen().await?;
    let s = ctx
        .broker
        .consumer(&gs, &[&topic], GroupConfig::stream())
        .await?;
    let got = poll_exactly(s.as_ref(), 4, Duration::from_millis(50)).await?;
    assert_eq!(got[0].offset, 6);
    let q = ctx
        .broker
        .consumer(&gq, &[&topic], GroupConfig::queue())
        .await?;
    let got = poll_exactly(q.as_ref(), 5, Duration::from_millis(50)).await?;
    assert!(got.iter().all(|m| m.offset % 2 == 1), "acked stay settled");
    assert!(got.iter().all(|m| m.attempt == 2), "attempts survive");
    Ok(())
}

/// §4b, §5, §7: "The attempt number ... survives restarts ... of the broker",
/// and so do DLQ records.
pub async fn reopen_keeps_attempts_and_dlq(backend: &dyn Backend) -> Result<()> {
    let Some(mut ctx) = persistent(backend, "persistence::reopen_keeps_attempts_and_dlq").await?
    else {
        return Ok(());
    };
    let topic = ctx.topic("attempts", 1).await?;
    let p = ctx.producer().await?;
    p.send(&topic, Record::new("a")).await?;
    p.send(&topic, Record::new("b")).await?;
    let group = unique("g");
    let cfg = GroupConfig::queue()
        .with_retry_backoff(RetryBackoff::none())
        .with_dlq(DlqPolicy::new(3));
    let c = ctx.broker.consumer(&group, &[&topic], cfg.clone()).await?;
    for m in poll_exactly(c.as_ref(), 2, Duration::ZERO).await? {
        if m.offset == 1 {
            c.nack(&m, NackOptions::new().with_reason("b failed"))
                .await?;
        }
    }
    // Offset 0 leased (attempt 1), offset 1 nacked once; fail 1 twice more.
    let m = poll_n(c.as_ref(), 1, WAIT).await?.remove(0);
    assert_eq!((m.offset, m.attempt), (1, 2));
    ctx.reopen().await?;
    let c = ctx.broker.consumer(&group, &[&topic], cfg).await?;
    let got = poll_exactly(c.as_ref(), 2, Duration::ZERO).await?;
    for m in &got {
        let want = if m.offset == 0 { 2 } else { 3 };
        assert_eq!(
            m.attempt, want,
            "offset {} attempt survives reopen",
            m.offset
        );
        if m.offset == 1 {
            assert_eq!(
                c.nack(m, NackOptions::new().with_reason("b failed"))
                    .await?,
                NackOutcome::DeadLettered
            );
        }
    }
    let dlq = format!("{topic}.{group}.dlq");
    ctx.reopen().await?;
    let dead = ctx.read_all(&dlq, 0).await?;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].value, "b".as_bytes());
    assert_eq!(dead[0].header_str("conveyor.dlq.attempts"), Some("3"));
    Ok(())
}

/// §3, §7, §8: Idempotency keys survive a reopen: producer dedup within the
/// window and the consumers' idempotency store.
pub async fn reopen_keeps_idempotency_keys(backend: &dyn Backend) -> Result<()> {
    let Some(mut ctx) = persistent(backend, "persistence::reopen_keeps_idempotency_keys").await?
    else {
        return Ok(());
    };
    let topic = ctx.topic("idem", 2).await?;
    let first = ctx
        .producer()
        .await?
        .send(&topic, Record::new("a").with_idempotency_key("evt"))
        .await?;
    let key = unique("handled");
    assert!(
        ctx.broker
            .idempotency_store()
            .first_seen(&key, Duration::from_secs(600))
            .await?
    );
    ctx.reopen().await?;
    let again = ctx
        .producer()
        .await?
        .send(&topic, Record::new("a").with_idempotency_key("evt"))
        .await?;
    assert_eq!(again, first, "deduplicated across reopen");
    assert_eq!(ctx.log_ends(&topic).await?.iter().sum::<u64>(), 1);
    assert!(
        !ctx.broker
            .idempotency_store()
            .first_seen(&key, Duration::from_secs(600))
            .await?
    );
    Ok(())
}

/// §1, §6, §7: "offsets ... never reused, even across restarts and after
/// retention".
pub async fn reopen_after_retention_never_reuses_offsets(backend: &dyn Backend) -> Result<()> {
    let Some(mut ctx) = persistent(
        backend,
        "persistence::reopen_after_retention_never_reuses_offsets",
    )
    .await?
    else {
        return Ok(());
    };
    let config = TopicConfig::new(1)
        .with_retention(Retention::forever().with_max_age(Duration::from_millis(300)));
    let topic = ctx.topic_with("reuse", config).await?;
    let p = ctx.producer().await?;
    for i in 0..5 {
        p.send(&topic, Record::new(format!("{i}"))).await?;
    }
    crate::eventually("retention", WAIT, || async {
        (ctx.bounds(&topic, 0).await.expect("bounds").0 == 5).then_some(())
    })
    .await;
    ctx.reopen().await?;
    let (start, end) = ctx.bounds(&topic, 0).await?;
    assert_eq!((start, end), (5, 5));
    let r = ctx.producer().await?.send(&topic, Record::new("5")).await?;
    assert_eq!(r.offset, 5);
    Ok(())
}

/// §4b, §7: "Closing and reopening a broker keeps every acknowledged
/// record ... lease attempt count": acks out of offset order (one by one
/// and in a batch), a nack with a delay and raised attempt counts all
/// survive a reopen.
pub async fn reopen_keeps_out_of_order_acks(backend: &dyn Backend) -> Result<()> {
    let Some(mut ctx) = persistent(backend, "persistence::reopen_keeps_out_of_order_acks").await?
    else {
        return Ok(());
    };
    let topic = ctx.topic("scattered", 2).await?;
    let p = ctx.producer().await?;
    let records = (0..40).map(|i| Record::new(format!("r{i}"))).collect();
    p.send_batch(&topic, records).await?;
    let group = unique("g");
    let cfg = GroupConfig::queue().with_retry_backoff(RetryBackoff::none());
    let c = ctx.broker.consumer(&group, &[&topic], cfg.clone()).await?;
    let got = poll_exactly(c.as_ref(), 40, Duration::ZERO).await?;
    // Ack every third one by one, every third + 1 in one batch; nack every
    // third + 2 once (attempt 2 next), the last of them with a long delay.
    let mut batch = Vec::new();
    let mut delayed = None;
    for (i, m) in got.iter().enumerate() {
        match i % 3 {
            0 => c.ack(m).await?,
            1 => batch.push(m.clone()),
            _ => {
                let delay = if i == 38 {
                    delayed = Some(m.position());
                    Duration::from_secs(3600)
                } else {
                    Duration::ZERO
                };
                c.nack(m, NackOptions::new().with_delay(delay)).await?;
            }
        }
    }
    assert!(c.ack_batch(&batch).await?.is_complete());
    ctx.reopen().await?;
    let c = ctx.broker.consumer(&group, &[&topic], cfg).await?;
    let again = poll_n(c.as_ref(), 40, Duration::from_millis(500)).await?;
    let want: BTreeSet<String> = got
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 3 == 2 && *i != 38)
        .map(|(_, m)| m.position())
        .collect();
    let seen: BTreeSet<String> = again.iter().map(|m| m.position()).collect();
    assert_eq!(seen, want, "exactly the nacked ones come back");
    assert!(again.iter().all(|m| m.attempt == 2), "attempts survive");
    let lag = ctx.broker.group_lag(&group).await?;
    assert_eq!(lag.total_lag(), want.len() as u64 + 1, "{delayed:?} waits");
    Ok(())
}
