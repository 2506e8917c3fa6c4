//! §1 and §3, producing: dense offsets, visibility, partitioning, atomic
//! batches, order under concurrency, no late lower offsets.
//!
//! `§N` names a section of `docs/semantics.md`;
//! quoted text is the rule a case checks. Each case's doc comment starts
//! with the sections it checks.

use crate::{expect_kind, poll_n, unique, Backend, Ctx, WAIT};
use conveyor_core::prelude::*;
use conveyor_core::{
    partition_for_key, BrokerOptions, Durability, ErrorKind, GroupConfig, Record, Result,
    TopicConfig,
};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// §1: "Offsets are `u64`, start at 0, and go up by exactly 1 per record:
/// dense, no gaps".
pub async fn dense_offsets(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let topic = ctx.topic("dense", 1).await?;
    let p = ctx.producer().await?;
    for i in 0..100u64 {
        let r = p.send(&topic, Record::new(format!("{i}"))).await?;
        assert_eq!((r.partition, r.offset), (0, i));
    }
    let rs = p
        .send_batch(
            &topic,
            (0..50).map(|i| Record::new(format!("b{i}"))).collect(),
        )
        .await?;
    let offsets: Vec<u64> = rs.iter().map(|r| r.offset).collect();
    assert_eq!(offsets, (100..150).collect::<Vec<_>>());
    let all = ctx.read_all(&topic, 0).await?;
    let read: Vec<u64> = all.iter().map(|m| m.offset).collect();
    assert_eq!(read, (0..150).collect::<Vec<_>>());
    assert_eq!(ctx.bounds(&topic, 0).await?, (0, 150));
    Ok(())
}

/// §3: "`send` returns a Receipt ... only after the record is stored ... and
/// visible to consumers": the record is fetchable and pollable right after
/// `send` returns, with no waiting.
pub async fn receipt_means_visible(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let topic = ctx.topic("visible", 3).await?;
    let p = ctx.producer().await?;
    let c = ctx
        .broker
        .consumer(&unique("g"), &[&topic], GroupConfig::queue())
        .await?;
    for i in 0..20u32 {
        let r = p
            .send(&topic, Record::new(format!("{i}")).with_partition(i % 3))
            .await?;
        let f = ctx.broker.fetch(&topic, r.partition, r.offset, 1).await?;
        assert_eq!(f.len(), 1, "visible to fetch at once");
        assert_eq!(f[0].value, format!("{i}").as_bytes());
        assert_eq!(ctx.bounds(&topic, r.partition).await?.1, r.offset + 1);
        let got = c.poll(10, Duration::ZERO).await?;
        assert_eq!(got.len(), 1, "visible to a poll that does not wait");
        c.ack(&got[0]).await?;
    }
    Ok(())
}

/// §3: "with a key, Kafka's default partitioner (murmur2 of the key bytes,
/// `toPositive(h) % n`), so a key lands in the same partition as it would in
/// Kafka": checked against known Kafka results and `partition_for_key`.
pub async fn keyed_partitioning_matches_kafka(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let t50 = ctx.topic("kafka50", 50).await?;
    let t7 = ctx.topic("kafka7", 7).await?;
    let p = ctx.producer().await?;
    // Known results of Kafka's DefaultPartitioner / BuiltInPartitioner.
    let known: [(&[u8], &str, u32); 5] = [
        (b"foobar", &t50, 16),
        (b"21", &t50, 40),
        (b"abc", &t50, 7),
        (b"abc", &t7, 4),
        (b"foobar", &t7, 1_357_151_166 % 7),
    ];
    for (key, topic, want) in known {
        let r = p.send(topic, Record::new("v").with_key(key)).await?;
        assert_eq!(
            r.partition,
            want,
            "key {:?} in {topic}",
            String::from_utf8_lossy(key)
        );
    }
    for i in 0..200u32 {
        let key = format!("customer-{i}-\u{e9}");
        let topic = if i % 2 == 0 { &t50 } else { &t7 };
        let n = if i % 2 == 0 { 50 } else { 7 };
        let r = p
            .send(topic, Record::new("v").with_key(key.clone()))
            .await?;
        assert_eq!(r.partition, partition_for_key(key.as_bytes(), n), "{key}");
    }
    Ok(())
}

/// §3: "Same key, same partition, always": by `send` and by `send_batch`, and
/// interleaved with other keys.
pub async fn same_key_same_partition(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let topic = ctx.topic("samekey", 16).await?;
    let p = ctx.producer().await?;
    let mut seen: HashMap<String, u32> = HashMap::new();
    for round in 0..5 {
        let mut batch = Vec::new();
        for k in 0..20 {
            let key = format!("k{k}");
            let r = p
                .send(
                    &topic,
                    Record::new(format!("{round}")).with_key(key.clone()),
                )
                .await?;
            assert_eq!(*seen.entry(key.clone()).or_insert(r.partition), r.partition);
            batch.push(Record::new("b").with_key(key));
        }
        let rs = p.send_batch(&topic, batch).await?;
        for (k, r) in rs.iter().enumerate() {
            assert_eq!(seen[&format!("k{k}")], r.partition, "batch k{k}");
        }
    }
    Ok(())
}

/// §3: "else round robin": records with neither key nor partition spread
/// evenly: a sequential producer sending `n * partitions` records puts `n` in
/// each partition.
pub async fn round_robin_without_key(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let topic = ctx.topic("rr", 4).await?;
    let p = ctx.producer().await?;
    for i in 0..40 {
        p.send(&topic, Record::new(format!("{i}"))).await?;
    }
    assert_eq!(ctx.log_ends(&topic).await?, vec![10, 10, 10, 10]);
    let rs = p
        .send_batch(
            &topic,
            (0..8).map(|i| Record::new(format!("{i}"))).collect(),
        )
        .await?;
    let mut per: BTreeMap<u32, usize> = BTreeMap::new();
    for r in rs {
        *per.entry(r.partition).or_default() += 1;
    }
    assert_eq!(per.values().copied().collect::<Vec<_>>(), vec![2, 2, 2, 2]);
    Ok(())
}

/// §3: "explicit partition if given": it wins over the key.
pub async fn explicit_partition_wins(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let topic = ctx.topic("explicit", 50).await?;
    let p = ctx.producer().await?;
    for target in [0u32, 3, 49] {
        let r = p
            .send(
                &topic,
                Record::new("v").with_key("foobar").with_partition(target),
            )
            .await?;
        assert_eq!(r.partition, target);
    }
    let ends = ctx.log_ends(&topic).await?;
    assert_eq!((ends[0], ends[3], ends[49], ends[16]), (1, 1, 1, 0));
    Ok(())
}

/// §3: "`send_batch` appends the records that go to one partition contiguously
/// and atomically (all or none), in the order given. Receipts come back in
/// input order."
pub async fn batch_receipts_in_input_order(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let topic = ctx.topic("batch", 3).await?;
    let p = ctx.producer().await?;
    p.send(&topic, Record::new("pre").with_partition(2)).await?;
    let records: Vec<Record> = (0..30u32)
        .map(|i| Record::new(format!("r{i}")).with_partition((i * 7) % 3))
        .collect();
    let rs = p.send_batch(&topic, records.clone()).await?;
    assert_eq!(rs.len(), 30);
    for (i, (rec, r)) in records.iter().zip(&rs).enumerate() {
        assert_eq!(
            Some(r.partition),
            rec.partition,
            "receipt {i} in input order"
        );
    }
    for part in 0..3u32 {
        let mine: Vec<_> = rs.iter().filter(|r| r.partition == part).collect();
        let base = mine[0].offset;
        for (n, r) in mine.iter().enumerate() {
            assert_eq!(r.offset, base + n as u64, "contiguous in partition {part}");
        }
        let log = ctx.read_all(&topic, part).await?;
        let want: Vec<String> = records
            .iter()
            .filter(|r| r.partition == Some(part))
            .map(|r| String::from_utf8_lossy(&r.value).into_owned())
            .collect();
        let got: Vec<String> = log[base as usize..]
            .iter()
            .map(|m| String::from_utf8_lossy(&m.value).into_owned())
            .collect();
        assert_eq!(got, want, "partition {part} in the order given");
    }
    Ok(())
}

/// §3, §7: "all or none" and "Bad input ... is refused before anything is
/// written": a batch with one oversize record, or one out-of-range partition,
/// writes nothing to any partition.
pub async fn batch_with_bad_record_writes_nothing(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let topic = ctx
        .topic_with("atomic", TopicConfig::new(3).with_max_message_bytes(100))
        .await?;
    let p = ctx.producer().await?;
    let good = |i: u32| Record::new(format!("ok{i}")).with_partition(i % 3);
    let mut oversize: Vec<Record> = (0..6).map(good).collect();
    oversize.insert(4, Record::new(vec![0u8; 101]).with_partition(1));
    expect_kind(
        p.send_batch(&topic, oversize).await,
        ErrorKind::MessageTooLarge,
    );
    let mut out_of_range: Vec<Record> = (0..6).map(good).collect();
    out_of_range.push(Record::new("x").with_partition(3));
    expect_kind(
        p.send_batch(&topic, out_of_range).await,
        ErrorKind::PartitionOutOfRange,
    );
    let mut headers_too_big: Vec<Record> = (0..6).map(good).collect();
    headers_too_big.insert(0, Record::new("x").with_header("h".repeat(100), "y"));
    expect_kind(
        p.send_batch(&topic, headers_too_big).await,
        ErrorKind::MessageTooLarge,
    );
    assert_eq!(
        ctx.log_ends(&topic).await?,
        vec![0, 0, 0],
        "nothing written"
    );
    let rs = p.send_batch(&topic, (0..6).map(good).collect()).await?;
    assert!(rs.iter().all(|r| r.offset < 2), "offsets start at 0");
    Ok(())
}

/// §3: Batches sent concurrently to one partition each stay contiguous and in
/// order ("contiguously and atomically ... in the order given").
pub async fn concurrent_batches_stay_contiguous(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let topic = ctx.topic("cbatch", 1).await?;
    let mut tasks = Vec::new();
    for t in 0..8u32 {
        let p = ctx.producer().await?;
        let topic = topic.clone();
        tasks.push(tokio::spawn(async move {
            let mut all = Vec::new();
            for b in 0..10u32 {
                let batch: Vec<Record> = (0..10u32)
                    .map(|i| Record::new(format!("{t}/{b}/{i}")))
                    .collect();
                let rs = p.send_batch(&topic, batch).await?;
                for (i, r) in rs.iter().enumerate() {
                    assert_eq!(r.offset, rs[0].offset + i as u64, "batch contiguous");
                }
                all.push((format!("{t}/{b}"), rs[0].offset));
            }
            Ok::<_, conveyor_core::Error>(all)
        }));
    }
    let mut firsts = Vec::new();
    for t in tasks {
        firsts.extend(t.await.expect("task")?);
    }
    let log = ctx.read_all(&topic, 0).await?;
    assert_eq!(log.len(), 800);
    for (batch, base) in firsts {
        for i in 0..10u64 {
            let m = &log[(base + i) as usize];
            assert_eq!(m.offset, base + i);
            assert_eq!(
                m.value,
                format!("{batch}/{i}").as_bytes(),
                "batch {batch} intact"
            );
        }
    }
    Ok(())
}

/// §3, §4a: "Within a partition" order is append order under 8 concurrent
/// producers: each producer's records of one key appear in the order it sent
/// them, every receipt matches what is read back, nothing is lost.
pub async fn order_under_concurrent_producers(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let topic = ctx.topic("order8", 4).await?;
    let mut tasks = Vec::new();
    for t in 0..8u32 {
        let p = ctx.producer().await?;
        let topic = topic.clone();
        tasks.push(tokio::spawn(async move {
            let mut receipts = Vec::new();
            for i in 0..150u32 {
                let key = format!("producer-{t}");
                let r = p
                    .send(&topic, Record::new(format!("{t}:{i}")).with_key(key))
                    .await?;
                receipts.push(r);
            }
            Ok::<_, conveyor_core::Error>(receipts)
        }));
    }
    let mut receipts = Vec::new();
    for t in tasks {
        receipts.push(t.await.expect("task")?);
    }
    let mut logs = Vec::new();
    for part in 0..4 {
        logs.push(ctx.read_all(&topic, part).await?);
    }
    assert_eq!(logs.iter().map(Vec::len).sum::<usize>(), 8 * 150);
    for (t, rs) in receipts.iter().enumerate() {
        let part = partition_for_key(format!("producer-{t}").as_bytes(), 4);
        for w in rs.windows(2) {
            assert!(w[0].offset < w[1].offset, "producer {t} offsets increase");
        }
        for (i, r) in rs.iter().enumerate() {
            assert_eq!(r.partition, part);
            let m = &logs[part as usize][r.offset as usize];
            assert_eq!(m.value, format!("{t}:{i}").as_bytes());
        }
    }
    // Same through a consumer: per partition, each producer's sequence in order.
    let c = ctx
        .broker
        .consumer(&unique("g"), &[&topic], GroupConfig::stream())
        .await?;
    let got = poll_n(c.as_ref(), 1200, WAIT).await?;
    assert_eq!(got.len(), 1200);
    let mut next: HashMap<String, u32> = HashMap::new();
    let mut last: HashMap<u32, u64> = HashMap::new();
    for m in &got {
        let v = String::from_utf8_lossy(&m.value).into_owned();
        let (t, i) = v.split_once(':').expect("t:i");
        let i: u32 = i.parse().expect("seq");
        let want = next.entry(t.to_string()).or_insert(0);
        assert_eq!(i, *want, "producer {t} in order");
        *want += 1;
        if let Some(prev) = last.insert(m.partition, m.offset) {
            assert_eq!(
                m.offset,
                prev + 1,
                "partition {} in offset order",
                m.partition
            );
        }
    }
    Ok(())
}

/// §3: "A consumer that has read offset N of a partition never later finds a
/// record at an offset below N that it did not see": readers polling while 6
/// producers write always find the log dense from where they are; every receipt
/// is eventually read.
pub async fn no_late_lower_offsets(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let topic = ctx.topic("nolate", 2).await?;
    let done = Arc::new(AtomicBool::new(false));
    // Reader over fetch: from `next`, the first record found is `next`.
    let mut readers = Vec::new();
    for part in 0..2u32 {
        let broker = ctx.broker.clone();
        let topic = topic.clone();
        let done = done.clone();
        readers.push(tokio::spawn(async move {
            let mut next = 0u64;
            loop {
                let finished = done.load(Ordering::Acquire);
                let batch = broker.fetch(&topic, part, next, 64).await?;
                for m in &batch {
                    assert_eq!(
                        m.offset, next,
                        "partition {part}: saw {} before {next}",
                        m.offset
                    );
                    next += 1;
                }
                if finished && batch.is_empty() {
                    return Ok::<u64, conveyor_core::Error>(next);
                }
                tokio::task::yield_now().await;
            }
        }));
    }
    // Reader over a stream-mode group: per partition, offsets are 0, 1, 2...
    let consumer = ctx
        .broker
        .consumer(&unique("g"), &[&topic], GroupConfig::stream())
        .await?;
    let group_reader = {
        let done = done.clone();
        tokio::spawn(async move {
            let mut next: BTreeMap<u32, u64> = BTreeMap::new();
            loop {
                let finished = done.load(Ordering::Acquire);
                let batch = consumer.poll(100, Duration::from_millis(20)).await?;
                for m in &batch {
                    let n = next.entry(m.partition).or_insert(0);
                    assert_eq!(m.offset, *n, "group reader, partition {}", m.partition);
                    *n += 1;
                }
                if finished && batch.is_empty() {
                    return Ok::<_, conveyor_core::Error>(next);
                }
            }
        })
    };
    let mut producers = Vec::new();
    for t in 0..6u32 {
        let p = ctx.producer().await?;
        let topic = topic.clone();
        producers.push(tokio::spawn(async move {
            for i in 0..200u32 {
                if i % 4 == 0 {
                    let batch = (0..3)
                        .map(|j| Record::new(format!("{t}/{i}/{j}")))
                        .collect();
                    p.send_batch(&topic, batch).await?;
                } else {
                    p.send(&topic, Record::new(format!("{t}/{i}"))).await?;
                }
            }
            Ok::<_, conveyor_core::Error>(())
        }));
    }
    for p in producers {
        p.await.expect("producer")?;
    }
    done.store(true, Ordering::Release);
    let ends = ctx.log_ends(&topic).await?;
    for (part, r) in readers.into_iter().enumerate() {
        assert_eq!(r.await.expect("reader")?, ends[part]);
    }
    let seen = group_reader.await.expect("group reader")?;
    for (part, end) in ends.iter().enumerate() {
        assert_eq!(seen.get(&(part as u32)).copied().unwrap_or(0), *end);
    }
    Ok(())
}

/// §3: "**Durability** is set when the broker is opened: `None`, `Interval(d)`,
/// `Always`": a broker opened with each setting accepts sends, `flush`, and
/// reads back what it stored.
pub async fn durability_settings(backend: &dyn Backend) -> Result<()> {
    for durability in [
        Durability::Always,
        Durability::Interval(Duration::from_millis(20)),
        Durability::None,
    ] {
        let ctx = Ctx::open_with(
            backend,
            BrokerOptions::default().with_durability(durability),
        )
        .await?;
        let topic = ctx.topic("durable", 2).await?;
        let p = ctx.producer().await?;
        let rs = p
            .send_batch(
                &topic,
                (0..10).map(|i| Record::new(format!("{i}"))).collect(),
            )
            .await?;
        p.flush().await?;
        for r in rs {
            let m = ctx.broker.fetch(&topic, r.partition, r.offset, 1).await?;
            assert_eq!(m.len(), 1, "{durability:?}: stored and visible");
        }
        ctx.broker.close().await?;
    }
    Ok(())
}

/// §3, §7: "`send` returns a **Receipt** … only after the record is stored per
/// the broker's durability setting and visible to consumers" and "Closing and
/// reopening a broker keeps every acknowledged record": four tasks send single
/// records; one task is aborted mid-burst (its producer and its in-flight send
/// dropped), then the broker is closed mid-burst. Every send either returned a
/// receipt or failed with `Closed`; every receipt returned is readable at its
/// offset with its bytes, before the close and (persistent backends) after
/// reopening.
pub async fn producer_closed_mid_burst(backend: &dyn Backend) -> Result<()> {
    let mut ctx = Ctx::open(backend).await?;
    let topic = ctx.topic("burst", 3).await?;
    let receipts = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for t in 0..4 {
        let (producer, topic, receipts) = (ctx.producer().await?, topic.clone(), receipts.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0u64.. {
                let value = format!("t{t}-{i}");
                match producer.send(&topic, Record::new(value.clone())).await {
                    Ok(r) => receipts.lock().expect("lock").push((r, value)),
                    Err(e) => return Some(e),
                }
                // A send that never waits must not starve the runtime.
                tokio::task::yield_now().await;
            }
            None
        }));
    }
    let count = || receipts.lock().expect("lock").len();
    crate::eventually("50 receipts", WAIT, || async {
        (count() >= 50).then_some(())
    })
    .await;
    tasks[0].abort();
    let check = |ctx: &Ctx<'_>| {
        let receipts: Vec<_> = receipts.lock().expect("lock").clone();
        let broker = ctx.broker.clone();
        let topic = topic.clone();
        async move {
            for (r, value) in &receipts {
                let got = broker.fetch(&topic, r.partition, r.offset, 1).await?;
                let at = got.first().map(|m| (m.offset, m.value.clone()));
                assert_eq!(at, Some((r.offset, value.clone().into())), "receipt {r:?}");
            }
            Ok::<_, conveyor_core::Error>(receipts.len())
        }
    };
    check(&ctx).await?;
    let before = count();
    crate::eventually("more receipts", WAIT, || async {
        (count() > before + 50).then_some(())
    })
    .await;
    ctx.broker.close().await?;
    for task in tasks.into_iter().skip(1) {
        if let Some(e) = task.await.expect("producer task") {
            assert_eq!(e.kind(), ErrorKind::Closed, "a send failed with `{e}`");
        }
    }
    if !ctx.broker.capabilities().persistent {
        crate::skip(
            "produce::producer_closed_mid_burst (after reopen)",
            "not persistent",
        );
        return Ok(());
    }
    ctx.reopen().await?;
    let n = check(&ctx).await?;
    assert!(n > 100, "only {n} receipts");
    Ok(())
}
