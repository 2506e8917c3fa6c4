//! §4, §4a, §4b and §5, randomized model checks: many producers and
//! consumers (joins, leaves, drops, nacks, abandoned leases) against one
//! topic, then the history is checked against a simple model of the
//! contract.
//!
//! `§N` names a section of `docs/semantics.md`;
//! quoted text is the rule a case checks. Each case's doc comment starts
//! with the sections it checks.
//!
//! Seeded: the seed is printed on start and on failure, and can be set with
//! the `CONVEYOR_SEED` environment variable. The seed fixes every random
//! choice (not the scheduler's interleaving). Each check runs for about two
//! seconds of churn plus a drain.

use crate::{unique, Backend, Ctx, WAIT};
use conveyor_core::NackOptions;
use conveyor_core::{
    Consumer, DlqPolicy, ErrorKind, GroupConfig, Message, NackOutcome, Producer, Record, Result,
    RetryBackoff,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long members churn.
const CHURN: Duration = Duration::from_millis(2000);

/// Prints the seed if the check panics.
pub(crate) struct SeedGuard {
    name: &'static str,
    pub(crate) seed: u64,
}

impl Drop for SeedGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "conveyor-conformance: {} FAILED with seed {} (rerun with CONVEYOR_SEED={})",
                self.name, self.seed, self.seed
            );
        }
    }
}

/// The seed for a randomized case: `CONVEYOR_SEED` or a random one,
/// printed now and again if the case panics.
pub(crate) fn seed_for(name: &'static str) -> SeedGuard {
    let seed = std::env::var("CONVEYOR_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    eprintln!("conveyor-conformance: {name} seed {seed} (set CONVEYOR_SEED to reproduce)");
    SeedGuard { name, seed }
}

/// Start `producers` tasks, each sending `per` records (single sends and
/// batches, keyed and not). Returns every receipt with its value.
async fn produce(
    ctx: &Ctx<'_>,
    topic: &str,
    producers: u64,
    per: u64,
    seed: u64,
) -> Result<Vec<ProducerTask>> {
    let mut tasks = Vec::new();
    for t in 0..producers {
        let p: Arc<dyn Producer> = ctx.producer().await?;
        let topic = topic.to_string();
        let mut rng = StdRng::seed_from_u64(seed ^ (0x9e37_79b9 * (t + 1)));
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            let mut i = 0;
            while i < per {
                let n = if rng.gen_bool(0.3) {
                    rng.gen_range(1..=5).min(per - i)
                } else {
                    1
                };
                let records: Vec<Record> = (i..i + n)
                    .map(|j| {
                        let r = Record::new(format!("p{t}-{j}"));
                        if rng.gen_bool(0.5) {
                            r.with_key(format!("key-{}", rng.gen_range(0..8)))
                        } else {
                            r
                        }
                    })
                    .collect();
                let values: Vec<String> = (i..i + n).map(|j| format!("p{t}-{j}")).collect();
                let receipts = p.send_batch(&topic, records).await?;
                for (r, v) in receipts.into_iter().zip(values) {
                    out.push((r.partition, r.offset, v));
                }
                i += n;
                // Spread the load over the churn so members come and go under it.
                if rng.gen_bool(0.5) {
                    tokio::time::sleep(Duration::from_millis(rng.gen_range(0..16))).await;
                }
            }
            Ok(out)
        }));
    }
    Ok(tasks)
}

/// A producer task: its receipts with the values sent.
type ProducerTask = tokio::task::JoinHandle<Result<Vec<(u32, u64, String)>>>;

/// One event of the history.
#[derive(Debug, Clone)]
enum Event {
    Delivered {
        session: u64,
        partition: u32,
        offset: u64,
        attempt: u32,
        generation: u64,
    },
    Nacked {
        session: u64,
        partition: u32,
        offset: u64,
        generation: u64,
        attempt: u32,
        dead: bool,
    },
    Acked {
        partition: u32,
        offset: u64,
        attempt: u32,
        generation: u64,
    },
}

type History = Arc<Mutex<Vec<Event>>>;

fn delivered(h: &History, session: u64, m: &Message) {
    h.lock().expect("history").push(Event::Delivered {
        session,
        partition: m.partition,
        offset: m.offset,
        attempt: m.attempt,
        generation: m.token().generation(),
    });
}

async fn collect(tasks: Vec<ProducerTask>) -> Result<BTreeMap<(u32, u64), String>> {
    let mut all = BTreeMap::new();
    for t in tasks {
        for (p, o, v) in t.await.expect("producer task")? {
            assert!(all.insert((p, o), v).is_none(), "two receipts for {p}@{o}");
        }
    }
    Ok(all)
}

/// Members join `group` one after another for `CHURN`: each lives
/// `life_ms` (random in the range) running `member`, the next joins
/// `gap_ms` later. Waits for all of them; returns the number of sessions
/// started. Every random choice comes from `seed`.
#[allow(clippy::too_many_arguments)]
async fn churn<F, Fut>(
    ctx: &Ctx<'_>,
    group: &str,
    topic: &str,
    config: &GroupConfig,
    seed: u64,
    life_ms: std::ops::Range<u64>,
    gap_ms: std::ops::Range<u64>,
    member: F,
) -> Result<u64>
where
    F: Fn(Arc<dyn Consumer>, u64, Duration, StdRng) -> Fut,
    Fut: std::future::Future<Output = Result<()>> + Send + 'static,
{
    let started = Instant::now();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut members = Vec::new();
    let mut session = 0u64;
    while started.elapsed() < CHURN {
        session += 1;
        let c = ctx.broker.consumer(group, &[topic], config.clone()).await?;
        let member_rng = StdRng::seed_from_u64(rng.gen());
        let life = Duration::from_millis(rng.gen_range(life_ms.clone()));
        members.push(tokio::spawn(member(c, session, life, member_rng)));
        tokio::time::sleep(Duration::from_millis(rng.gen_range(gap_ms.clone()))).await;
    }
    for m in members {
        m.await.expect("member task")?;
    }
    Ok(session)
}

/// §4, §4a: Stream mode under churn: members join, commit, nack, close or
/// vanish (dropped without commit). Checks: nothing lost; within one member's
/// ownership of a partition (session, generation) offsets come in order,
/// densely, rewinding only to a nacked offset with its attempt raised; a record
/// committed in generation g is never delivered again in a later ownership
/// (duplicates only where at-least-once allows: uncommitted or nacked); at the
/// end every record is committed.
pub async fn model_check_stream(backend: &dyn Backend) -> Result<()> {
    let guard = seed_for("model::model_check_stream");
    let seed = guard.seed;
    let ctx = Ctx::open(backend).await?;
    let topic = ctx.topic("model-stream", 4).await?;
    let group = unique("g");
    let history: History = Arc::new(Mutex::new(Vec::new()));
    let producers = produce(&ctx, &topic, 3, 200, seed).await?;
    let config = GroupConfig::stream()
        .with_retry_backoff(RetryBackoff::none())
        .with_dlq(DlqPolicy::new(u32::MAX));
    let mut session = churn(
        &ctx,
        &group,
        &topic,
        &config,
        seed,
        50..600,
        20..200,
        |c, session, life, mut rng| {
            let h = history.clone();
            async move { stream_member(c, session, life, &mut rng, &h).await }
        },
    )
    .await?;
    let receipts = collect(producers).await?;
    // Drain: one last member commits everything.
    session += 1;
    let last = ctx.broker.consumer(&group, &[&topic], config).await?;
    let deadline = Instant::now() + WAIT * 2;
    loop {
        for m in last.poll(100, Duration::from_millis(50)).await? {
            delivered(&history, session, &m);
            last.ack(&m).await?;
            ack_event(&history, session, &m);
        }
        if ctx.broker.group_lag(&group).await?.total_lag() == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "drain did not finish: lag remains"
        );
    }
    last.close().await?;
    let events = history.lock().expect("history").clone();
    summary("model_check_stream", &events, session, receipts.len());
    check_stream_history(&events, &receipts);
    // Values match receipts.
    for p in 0..4u32 {
        for m in ctx.read_all(&topic, p).await? {
            assert_eq!(
                receipts.get(&(p, m.offset)).map(String::as_bytes),
                Some(m.value.as_ref()),
                "record at {p}@{} is the one its receipt named",
                m.offset
            );
        }
    }
    drop(guard);
    Ok(())
}

fn summary(name: &str, events: &[Event], sessions: u64, records: usize) {
    let (mut d, mut n, mut a, mut dead) = (0, 0, 0, 0);
    for e in events {
        match e {
            Event::Delivered { .. } => d += 1,
            Event::Nacked { dead: x, .. } => {
                n += 1;
                dead += usize::from(*x);
            }
            Event::Acked { .. } => a += 1,
        }
    }
    eprintln!(
        "conveyor-conformance: {name}: {records} records, {sessions} member sessions, \
         {d} deliveries, {a} acks, {n} nacks ({dead} dead-lettered by nack)"
    );
}

fn ack_event(h: &History, _session: u64, m: &Message) {
    h.lock().expect("history").push(Event::Acked {
        partition: m.partition,
        offset: m.offset,
        attempt: m.attempt,
        generation: m.token().generation(),
    });
}

async fn stream_member(
    c: Arc<dyn Consumer>,
    session: u64,
    life: Duration,
    rng: &mut StdRng,
    h: &History,
) -> Result<()> {
    let start = Instant::now();
    while start.elapsed() < life {
        let batch = c
            .poll(rng.gen_range(1..20), Duration::from_millis(20))
            .await?;
        for m in &batch {
            delivered(h, session, m);
        }
        let commit = rng.gen_bool(0.8);
        let mut stopped: BTreeSet<u32> = BTreeSet::new();
        for m in &batch {
            if stopped.contains(&m.partition) {
                continue; // rewound or fenced: the rest comes again
            }
            if rng.gen_bool(0.05) {
                match c
                    .nack(
                        m,
                        NackOptions::new()
                            .with_delay(Duration::ZERO)
                            .with_reason("model"),
                    )
                    .await
                {
                    Ok(outcome) => h.lock().expect("history").push(Event::Nacked {
                        session,
                        partition: m.partition,
                        offset: m.offset,
                        generation: m.token().generation(),
                        attempt: m.attempt,
                        dead: outcome == NackOutcome::DeadLettered,
                    }),
                    Err(e) if e.kind() == ErrorKind::Fenced => {}
                    Err(e) => return Err(e),
                }
                stopped.insert(m.partition);
            } else if commit {
                match c.ack(m).await {
                    Ok(()) => ack_event(h, session, m),
                    Err(e) if e.kind() == ErrorKind::Fenced => {
                        stopped.insert(m.partition);
                    }
                    Err(e) => return Err(e),
                }
            }
        }
    }
    if rng.gen_bool(0.5) {
        c.close().await?;
    } // else dropped: leaves without committing what it did not ack
    Ok(())
}

fn check_stream_history(events: &[Event], receipts: &BTreeMap<(u32, u64), String>) {
    // Nothing lost.
    let seen: BTreeSet<(u32, u64)> = events
        .iter()
        .filter_map(|e| match e {
            Event::Delivered {
                partition, offset, ..
            } => Some((*partition, *offset)),
            _ => None,
        })
        .collect();
    for k in receipts.keys() {
        assert!(seen.contains(k), "record {}@{} never delivered", k.0, k.1);
    }
    // Order within one ownership: (session, partition, generation).
    #[derive(Clone, Copy)]
    enum Last {
        Delivered(u64),
        Rewound(u64, u32),
    }
    let mut last: BTreeMap<(u64, u32, u64), Last> = BTreeMap::new();
    let mut attempts: BTreeMap<(u64, u32, u64, u64), u32> = BTreeMap::new();
    for e in events {
        match *e {
            Event::Delivered {
                session,
                partition,
                offset,
                attempt,
                generation,
            } => {
                let key = (session, partition, generation);
                match last.get(&key) {
                    None => {}
                    Some(Last::Delivered(prev)) => assert_eq!(
                        offset,
                        prev + 1,
                        "session {session} partition {partition} gen {generation}: \
                         {offset} after {prev}"
                    ),
                    Some(Last::Rewound(to, att)) => {
                        assert_eq!(offset, *to, "nack rewinds to the nacked offset");
                        assert_eq!(attempt, att + 1, "redelivery raises the attempt");
                    }
                }
                last.insert(key, Last::Delivered(offset));
                attempts.insert((session, partition, generation, offset), attempt);
            }
            Event::Nacked {
                session,
                partition,
                offset,
                generation,
                attempt,
                dead,
            } => {
                assert!(!dead, "max_deliveries is unlimited in this check");
                last.insert(
                    (session, partition, generation),
                    Last::Rewound(offset, attempt),
                );
            }
            Event::Acked { .. } => {}
        }
    }
    // Committed records are never delivered again in a later ownership.
    let mut committed: BTreeMap<u32, Vec<(u64, u64)>> = BTreeMap::new();
    for e in events {
        if let Event::Acked {
            partition,
            offset,
            generation,
            ..
        } = *e
        {
            committed
                .entry(partition)
                .or_default()
                .push((generation, offset));
        }
    }
    for e in events {
        if let Event::Delivered {
            partition,
            offset,
            generation,
            ..
        } = *e
        {
            for (g, o) in committed.get(&partition).into_iter().flatten() {
                assert!(
                    !(generation > *g && offset <= *o),
                    "partition {partition}: offset {offset} delivered in generation \
                     {generation} after offset {o} was committed in generation {g}"
                );
            }
        }
    }
}

/// §4b, §5: Queue mode under churn: members join, ack, nack with delays,
/// abandon leases (expiry), extend, close or vanish; every tenth record is
/// poison and always fails. Checks: every record is settled exactly once (acked
/// once, or dead-lettered once after `max_deliveries` failures); the attempts
/// of a record are 1, 2, 3... with no number twice (no two deliveries under one
/// count); an acked delivery is the record's last (no second lease while one
/// held); each member sees first deliveries of a partition in offset order; at
/// the end nothing is in flight or lagging.
pub async fn model_check_queue(backend: &dyn Backend) -> Result<()> {
    const MAX: u32 = 4;
    let guard = seed_for("model::model_check_queue");
    let seed = guard.seed;
    let ctx = Ctx::open(backend).await?;
    let topic = ctx.topic("model-queue", 3).await?;
    let group = unique("g");
    let history: History = Arc::new(Mutex::new(Vec::new()));
    let producers = produce(&ctx, &topic, 3, 150, seed).await?;
    let config = GroupConfig::queue()
        .with_visibility_timeout(Duration::from_millis(150))
        .with_retry_backoff(RetryBackoff::none())
        .with_dlq(DlqPolicy::new(MAX));
    let mut session = churn(
        &ctx,
        &group,
        &topic,
        &config,
        seed,
        50..700,
        20..150,
        |c, session, life, mut rng| {
            let h = history.clone();
            async move { queue_member(c, session, life, &mut rng, &h).await }
        },
    )
    .await?;
    let receipts = collect(producers).await?;
    let poison: BTreeSet<(u32, u64)> = receipts
        .iter()
        .filter(|(_, v)| is_poison(v))
        .map(|(k, _)| *k)
        .collect();
    // Drain: a last member settles everything (poison goes to the DLQ).
    session += 1;
    let last = ctx.broker.consumer(&group, &[&topic], config).await?;
    let deadline = Instant::now() + WAIT * 2;
    loop {
        for m in last.poll(100, Duration::from_millis(50)).await? {
            delivered(&history, session, &m);
            if poison.contains(&(m.partition, m.offset)) {
                let outcome = last
                    .nack(&m, NackOptions::new().with_reason("poison"))
                    .await;
                record_nack(&history, session, &m, outcome)?;
            } else if last.ack(&m).await.is_ok() {
                ack_event(&history, session, &m);
            }
        }
        let lag = ctx.broker.group_lag(&group).await?;
        if lag.total_lag() == 0 {
            assert_eq!(lag.total_in_flight(), 0);
            break;
        }
        assert!(Instant::now() < deadline, "drain did not finish: {lag:?}");
    }
    last.close().await?;
    let events = history.lock().expect("history").clone();
    let dlq = format!("{topic}.{group}.dlq");
    let mut dead: BTreeMap<(u32, u64), usize> = BTreeMap::new();
    if ctx.broker.list_topics().await?.contains(&dlq) {
        for m in ctx.read_all(&dlq, 0).await? {
            let p: u32 = m
                .header_str("conveyor.dlq.partition")
                .expect("header")
                .parse()
                .expect("n");
            let o: u64 = m
                .header_str("conveyor.dlq.offset")
                .expect("header")
                .parse()
                .expect("n");
            assert_eq!(
                receipts.get(&(p, o)).map(String::as_bytes),
                Some(m.value.as_ref())
            );
            *dead.entry((p, o)).or_default() += 1;
        }
    }
    summary("model_check_queue", &events, session, receipts.len());
    check_queue_history(&events, &receipts, &dead, MAX);
    for k in &poison {
        assert_eq!(
            dead.get(k),
            Some(&1),
            "poison {}@{} dead-lettered once",
            k.0,
            k.1
        );
    }
    drop(guard);
    Ok(())
}

fn is_poison(value: &str) -> bool {
    value
        .rsplit('-')
        .next()
        .and_then(|n| n.parse::<u64>().ok())
        .is_some_and(|n| n % 10 == 0)
}

fn record_nack(h: &History, session: u64, m: &Message, outcome: Result<NackOutcome>) -> Result<()> {
    match outcome {
        Ok(o) => {
            h.lock().expect("history").push(Event::Nacked {
                session,
                partition: m.partition,
                offset: m.offset,
                generation: 0,
                attempt: m.attempt,
                dead: o == NackOutcome::DeadLettered,
            });
            Ok(())
        }
        Err(e) if e.kind() == ErrorKind::LeaseExpired => Ok(()),
        Err(e) => Err(e),
    }
}

async fn queue_member(
    c: Arc<dyn Consumer>,
    session: u64,
    life: Duration,
    rng: &mut StdRng,
    h: &History,
) -> Result<()> {
    let start = Instant::now();
    while start.elapsed() < life {
        let batch = c
            .poll(rng.gen_range(1..10), Duration::from_millis(20))
            .await?;
        for m in &batch {
            delivered(h, session, m);
        }
        for m in &batch {
            let value = String::from_utf8_lossy(&m.value).into_owned();
            let roll: f64 = rng.gen();
            if is_poison(&value) || roll < 0.05 {
                let delay = Duration::from_millis(rng.gen_range(0..30));
                let outcome = c
                    .nack(m, NackOptions::new().with_delay(delay).with_reason("model"))
                    .await;
                record_nack(h, session, m, outcome)?;
            } else if roll < 0.07 {
                // Abandon: the lease expires and the record comes back.
            } else {
                if roll < 0.12 {
                    // May fail with LeaseExpired if we were slow: then so will the ack.
                    let _ = c.extend(m, Duration::from_secs(5)).await;
                }
                match c.ack(m).await {
                    Ok(()) => ack_event(h, session, m),
                    Err(e) if e.kind() == ErrorKind::LeaseExpired => {}
                    Err(e) => return Err(e),
                }
            }
        }
    }
    if rng.gen_bool(0.5) {
        c.close().await?;
    }
    Ok(())
}

fn check_queue_history(
    events: &[Event],
    receipts: &BTreeMap<(u32, u64), String>,
    dead: &BTreeMap<(u32, u64), usize>,
    max: u32,
) {
    let mut attempts: BTreeMap<(u32, u64), Vec<u32>> = BTreeMap::new();
    let mut acks: BTreeMap<(u32, u64), Vec<u32>> = BTreeMap::new();
    let mut first_order: BTreeMap<(u64, u32), u64> = BTreeMap::new();
    for e in events {
        match *e {
            Event::Delivered {
                session,
                partition,
                offset,
                attempt,
                ..
            } => {
                attempts
                    .entry((partition, offset))
                    .or_default()
                    .push(attempt);
                if attempt == 1 {
                    if let Some(prev) = first_order.insert((session, partition), offset) {
                        assert!(
                            offset > prev,
                            "session {session} partition {partition}: first delivery of \
                             {offset} after {prev}"
                        );
                    }
                }
            }
            Event::Acked {
                partition,
                offset,
                attempt,
                ..
            } => acks.entry((partition, offset)).or_default().push(attempt),
            Event::Nacked { .. } => {}
        }
    }
    for (k, v) in receipts {
        let mut seen = attempts.get(k).cloned().unwrap_or_default();
        seen.sort_unstable();
        let want: Vec<u32> = (1..=seen.len() as u32).collect();
        assert_eq!(seen, want, "{}@{} ({v}): attempts are 1, 2, 3...", k.0, k.1);
        let acked = acks.get(k).map_or(0, Vec::len);
        let dead_n = dead.get(k).copied().unwrap_or(0);
        assert_eq!(
            acked + dead_n,
            1,
            "{}@{} ({v}) settled exactly once: {acked} acks, {dead_n} dead letters",
            k.0,
            k.1
        );
        if let Some(a) = acks.get(k).and_then(|a| a.first()) {
            assert_eq!(
                *a,
                *seen.last().expect("delivered"),
                "{}@{}: delivered again after a successful ack",
                k.0,
                k.1
            );
        }
        if dead_n == 1 {
            assert_eq!(
                seen.len() as u32,
                max,
                "{}@{} dead after {max} deliveries",
                k.0,
                k.1
            );
        }
    }
}
