//! Sending and settling inside the caller's transaction (docs/semantics.md
//! §10), on the real server: a rollback leaves nothing and takes no
//! offset; concurrent transactions committing out of order never make a
//! record appear below one a reader already read (§3); a long open
//! transaction holds up no other producer; a settle in a rolled-back
//! transaction leaves the message to be delivered again; a fenced member's
//! settle fails and its effects roll back; the runner's transactional
//! handler writes each effect once. Each test works in a schema of its own
//! (the application's tables live there too), dropped at the end.

// Test code: a failed unwrap is a failed test, with its line.
#![allow(clippy::unwrap_used)]

mod common;

use common::Schema;

use conveyor_core::prelude::*;
use conveyor_core::runner::{HandlerError, Runner, RunnerConfig};
use conveyor_core::{
    BrokerOptions, Durability, ErrorKind, GroupConfig, Message, Record, RetryBackoff, TopicConfig,
};
use conveyor_postgres::sqlx::{self, PgPool};
use conveyor_postgres::{PgBroker, PgOptions, PgTransaction, Transactional};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a condition may take on a loaded machine before the test
/// fails.
const PATIENCE: Duration = Duration::from_secs(60);

/// Wait until `check` returns `Some`, or fail naming `what`.
async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            start.elapsed() < PATIENCE,
            "timed out after {PATIENCE:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The application's pool (its own connections, `search_path` public).
async fn app_pool() -> PgPool {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(12)
        .connect(&common::url())
        .await
        .expect("connect the application's pool")
}

/// A test's schema, the application's pool, and a broker on the schema
/// (migrated, default options).
async fn setup(prefix: &str) -> (Schema, PgPool, PgBroker) {
    let schema = Schema::new(prefix);
    let pool = app_pool().await;
    let broker = common::open(&schema.0, BrokerOptions::default())
        .await
        .unwrap();
    (schema, pool, broker)
}

/// The application's table of effects, in the test's schema.
async fn effects_table(pool: &PgPool, schema: &str) -> String {
    let table = format!(r#""{schema}".effects"#);
    sqlx::query(&format!("CREATE TABLE {table} (id text NOT NULL)"))
        .execute(pool)
        .await
        .unwrap();
    table
}

async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

/// Every record of a partition, from offset 0.
async fn read_all(broker: &PgBroker, topic: &str, partition: u32) -> Vec<Message> {
    let mut out: Vec<Message> = Vec::new();
    loop {
        let from = out.last().map_or(0, |m| m.offset + 1);
        let page = broker.fetch(topic, partition, from, 1000).await.unwrap();
        if page.is_empty() {
            return out;
        }
        out.extend(page);
    }
}

fn text(m: &Message) -> String {
    String::from_utf8_lossy(&m.value).into_owned()
}

/// A rollback leaves no record and takes no offset: the next send gets
/// offset 0, and a committed transaction's records follow at once. The
/// broker is built on the application's own pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_leaves_nothing_visible_and_takes_no_offset() {
    let schema = Schema::new("txrb");
    let pool = app_pool().await;
    // Migrate (the owner's step), then open on the application's pool.
    common::open(&schema.0, BrokerOptions::default())
        .await
        .unwrap()
        .close()
        .await
        .unwrap();
    let broker = conveyor_postgres::open_on(
        &pool,
        BrokerOptions::default(),
        PgOptions::default().with_schema(&schema.0),
    )
    .await
    .unwrap();
    broker.create_topic("t", TopicConfig::new(1)).await.unwrap();
    let reader = broker
        .consumer("reader", &["t"], GroupConfig::stream())
        .await
        .unwrap();

    let mut tx = pool.begin().await.unwrap();
    let staged = broker
        .send_in(&mut *tx, "t", vec![Record::new("a"), Record::new("b")])
        .await
        .unwrap();
    assert_eq!(staged.len(), 2);
    assert!(staged.iter().all(|s| s.partition == 0));
    assert!(staged[0].id < staged[1].id, "{staged:?}");
    // Not visible while the transaction is open, even after a relay.
    broker.relay_staged().await.unwrap();
    assert!(broker.fetch("t", 0, 0, 10).await.unwrap().is_empty());
    tx.rollback().await.unwrap();

    let receipt = broker
        .producer()
        .await
        .unwrap()
        .send("t", Record::new("c"))
        .await
        .unwrap();
    assert_eq!(receipt.offset, 0, "a rolled-back send took an offset");

    let mut tx = pool.begin().await.unwrap();
    broker
        .send_in(&mut *tx, "t", vec![Record::new("d")])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    // The relay is woken by the commit: no call needed.
    let all = eventually("the committed record to be appended", || async {
        let all = read_all(&broker, "t", 0).await;
        (all.len() >= 2).then_some(all)
    })
    .await;
    let seen: Vec<(u64, String)> = all.iter().map(|m| (m.offset, text(m))).collect();
    assert_eq!(seen, vec![(0, "c".to_string()), (1, "d".to_string())]);
    let mut got = Vec::new();
    while got.len() < 2 {
        got.extend(
            reader
                .poll(10, Duration::from_millis(200))
                .await
                .unwrap()
                .iter()
                .map(text),
        );
    }
    assert_eq!(got, ["c", "d"]);
    let staged_left = count(
        &pool,
        &format!(r#"SELECT count(*) FROM "{}".staged"#, schema.0),
    )
    .await;
    assert_eq!(staged_left, 0);
    let end = broker.describe_topic("t").await.unwrap().partitions[0].log_end;
    assert_eq!(end, 2);
    // On the pool itself (no transaction of the caller's): a statement of
    // its own, appended once it returned.
    broker
        .send_in(&pool, "t", vec![Record::new("e")])
        .await
        .unwrap();
    let all = eventually("the pool's record to be appended", || async {
        let all = read_all(&broker, "t", 0).await;
        (all.len() >= 3).then_some(all)
    })
    .await;
    assert_eq!((all[2].offset, text(&all[2])), (2, "e".to_string()));
    reader.close().await.unwrap();
    broker.close().await.unwrap();
}

/// §3 under transactions: many producers send in transactions that
/// commit after random delays (out of order) or roll back, beside plain
/// sends, while a reader takes snapshots of the log and a stream-mode
/// member reads it. Every snapshot has dense offsets and extends the
/// previous one unchanged (no record ever appears below one already
/// read); the member reads each offset once, in order; in the end the log
/// holds every committed record exactly once and no rolled-back one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reader_never_sees_a_late_lower_offset_while_transactions_commit_out_of_order() {
    let seed: u64 = std::env::var("CONVEYOR_TX_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().gen());
    eprintln!("seed {seed} (replay with CONVEYOR_TX_SEED={seed})");
    let schema = Schema::new("txorder");
    let pool = app_pool().await;
    let broker = common::open(
        &schema.0,
        BrokerOptions::default().with_durability(Durability::None),
    )
    .await
    .unwrap();
    const PARTITIONS: u32 = 2;
    broker
        .create_topic("o", TopicConfig::new(PARTITIONS))
        .await
        .unwrap();
    let committed = Arc::new(Mutex::new(BTreeSet::<String>::new()));
    let rolled_back = Arc::new(Mutex::new(BTreeSet::<String>::new()));
    let mut producers = Vec::new();
    for w in 0..10u64 {
        let (broker, pool) = (broker.clone(), pool.clone());
        let (committed, rolled_back) = (committed.clone(), rolled_back.clone());
        producers.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(seed ^ w);
            for i in 0..12 {
                let n = rng.gen_range(1..=3);
                let values: Vec<String> = (0..n).map(|j| format!("tx-{w}-{i}-{j}")).collect();
                let records = values
                    .iter()
                    .map(|v| Record::new(v.clone()).with_partition(rng.gen_range(0..PARTITIONS)))
                    .collect();
                let mut tx = pool.begin().await.unwrap();
                // In one call or one per record, with a pause between.
                if rng.gen_bool(0.5) {
                    broker.send_in(&mut *tx, "o", records).await.unwrap();
                } else {
                    for r in records {
                        broker.send_in(&mut *tx, "o", vec![r]).await.unwrap();
                        tokio::time::sleep(Duration::from_millis(rng.gen_range(0..5))).await;
                    }
                }
                tokio::time::sleep(Duration::from_millis(rng.gen_range(0..60))).await;
                if rng.gen_range(0..5) == 0 {
                    tx.rollback().await.unwrap();
                    rolled_back.lock().unwrap().extend(values);
                } else {
                    tx.commit().await.unwrap();
                    committed.lock().unwrap().extend(values);
                }
            }
        }));
    }
    for w in 0..2u64 {
        let broker = broker.clone();
        let committed = committed.clone();
        producers.push(tokio::spawn(async move {
            let producer = broker.producer().await.unwrap();
            for i in 0..40 {
                let v = format!("plain-{w}-{i}");
                producer
                    .send("o", Record::new(v.clone()).with_partition((i % 2) as u32))
                    .await
                    .unwrap();
                committed.lock().unwrap().insert(v);
            }
        }));
    }
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Snapshots: dense, and each extends the previous one unchanged.
    let snapshots = {
        let (broker, done) = (broker.clone(), done.clone());
        tokio::spawn(async move {
            let mut previous: BTreeMap<u32, Vec<String>> = BTreeMap::new();
            let mut taken = 0u64;
            loop {
                let last = done.load(std::sync::atomic::Ordering::Acquire);
                for p in 0..PARTITIONS {
                    let now = read_all(&broker, "o", p).await;
                    for (i, m) in now.iter().enumerate() {
                        assert_eq!(m.offset, i as u64, "partition {p}: offsets not dense");
                    }
                    let now: Vec<String> = now.iter().map(text).collect();
                    let before = previous.entry(p).or_default();
                    assert!(
                        now.len() >= before.len() && now[..before.len()] == before[..],
                        "partition {p}: a record appeared below offset {} that a reader had \
                         already read past (seed {seed})",
                        before.len()
                    );
                    *before = now;
                }
                taken += 1;
                if last {
                    return taken;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    // A stream-mode member: each offset once, in order.
    let member = broker
        .consumer("member", &["o"], GroupConfig::stream())
        .await
        .unwrap();
    let mut next: BTreeMap<u32, u64> = BTreeMap::new();
    let mut read: Vec<String> = Vec::new();
    let mut finished = false;
    let start = Instant::now();
    loop {
        for m in member.poll(100, Duration::from_millis(50)).await.unwrap() {
            let expected = next.entry(m.partition).or_insert(0);
            assert_eq!(
                m.offset, *expected,
                "partition {}: member read offset {} where {} was next (seed {seed})",
                m.partition, m.offset, expected
            );
            *expected += 1;
            read.push(text(&m));
            member.commit_message(&m).await.unwrap();
        }
        if !finished && producers.iter().all(|p| p.is_finished()) {
            finished = true;
        }
        let want = committed.lock().unwrap().len();
        if finished && read.len() >= want {
            break;
        }
        assert!(
            start.elapsed() < PATIENCE * 2,
            "member read {} of {want} (seed {seed})",
            read.len()
        );
    }
    for p in producers {
        p.await.unwrap();
    }
    done.store(true, std::sync::atomic::Ordering::Release);
    let taken = snapshots.await.unwrap();
    let committed = committed.lock().unwrap().clone();
    let rolled_back = rolled_back.lock().unwrap().clone();
    let mut log: Vec<String> = Vec::new();
    for p in 0..PARTITIONS {
        log.extend(read_all(&broker, "o", p).await.iter().map(text));
    }
    // Each transaction's records of a partition are contiguous and in the
    // order sent.
    for p in 0..PARTITIONS {
        let mut at: BTreeMap<String, Vec<(u64, u32)>> = BTreeMap::new();
        for m in read_all(&broker, "o", p).await {
            let v = text(&m);
            if let Some(rest) = v.strip_prefix("tx-") {
                let (tx, j) = rest.rsplit_once('-').unwrap();
                at.entry(tx.to_string())
                    .or_default()
                    .push((m.offset, j.parse().unwrap()));
            }
        }
        for (tx, offsets) in at {
            let first = offsets[0].0;
            let js: Vec<u32> = offsets.iter().map(|o| o.1).collect();
            let mut sorted = js.clone();
            sorted.sort_unstable();
            assert_eq!(
                js, sorted,
                "transaction {tx} in partition {p}: out of order"
            );
            for (k, (offset, _)) in offsets.iter().enumerate() {
                assert_eq!(
                    *offset,
                    first + k as u64,
                    "transaction {tx} in partition {p}: not contiguous {offsets:?} (seed {seed})"
                );
            }
        }
    }
    let in_log: BTreeSet<String> = log.iter().cloned().collect();
    assert_eq!(
        in_log.len(),
        log.len(),
        "a record appended twice (seed {seed})"
    );
    assert_eq!(
        in_log, committed,
        "the log is not the committed records (seed {seed})"
    );
    assert!(in_log.is_disjoint(&rolled_back), "seed {seed}");
    assert!(
        !rolled_back.is_empty(),
        "seed {seed}: no transaction rolled back"
    );
    assert_eq!(read.len(), log.len(), "seed {seed}");
    eprintln!(
        "{} committed, {} rolled back, {taken} snapshots checked",
        committed.len(),
        rolled_back.len()
    );
    member.close().await.unwrap();
    broker.close().await.unwrap();
}

/// A transaction that staged records and stays open holds up no other
/// producer of that partition: plain sends, idempotent sends and other
/// transactions' records are appended and visible meanwhile; its own
/// records come after them once it commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_open_transaction_does_not_stall_other_producers() {
    let (_schema, pool, broker) = setup("txlong").await;
    broker.create_topic("l", TopicConfig::new(1)).await.unwrap();
    let mut long = pool.begin().await.unwrap();
    broker
        .send_in(&mut *long, "l", vec![Record::new("long")])
        .await
        .unwrap();
    // Everything below runs while `long` is open; were the partition
    // locked by it, these would wait until it ends, and time out.
    let others = async {
        let producer = broker.producer().await.unwrap();
        let r = producer.send("l", Record::new("plain")).await.unwrap();
        assert_eq!(r.offset, 0);
        let r = producer
            .send("l", Record::new("idem").with_idempotency_key("k1"))
            .await
            .unwrap();
        assert_eq!(r.offset, 1);
        let mut short = pool.begin().await.unwrap();
        broker
            .send_in(&mut *short, "l", vec![Record::new("short")])
            .await
            .unwrap();
        short.commit().await.unwrap();
        eventually("the short transaction's record", || async {
            let all = read_all(&broker, "l", 0).await;
            (all.len() == 3).then_some(())
        })
        .await;
    };
    tokio::time::timeout(PATIENCE, others)
        .await
        .expect("other producers were held up by an open transaction");
    long.commit().await.unwrap();
    let all = eventually("the long transaction's record", || async {
        let all = read_all(&broker, "l", 0).await;
        (all.len() == 4).then_some(all)
    })
    .await;
    let values: Vec<String> = all.iter().map(text).collect();
    assert_eq!(values, ["plain", "idem", "short", "long"]);
    broker.close().await.unwrap();
}

/// A settle in a transaction that rolls back leaves the message to be
/// delivered again (queue mode: its lease expires and it comes back; stream
/// mode: the committed offset does not move), and the writes beside it
/// roll back with it. Settled in a committed transaction, it is settled
/// for good; a later settle of the same delivery says it was already.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settle_in_a_rolled_back_transaction_leaves_the_message_to_be_delivered_again() {
    let (schema, pool, broker) = setup("txsettle").await;
    let effects = effects_table(&pool, &schema.0).await;
    broker.create_topic("s", TopicConfig::new(1)).await.unwrap();
    broker
        .producer()
        .await
        .unwrap()
        .send("s", Record::new("job"))
        .await
        .unwrap();

    // Queue mode.
    let queue = broker
        .consumer(
            "q",
            &["s"],
            GroupConfig::queue().with_visibility_timeout(Duration::from_secs(1)),
        )
        .await
        .unwrap();
    let first = eventually("the first delivery", || async {
        queue
            .poll(1, Duration::from_millis(100))
            .await
            .unwrap()
            .pop()
    })
    .await;
    let mut tx = pool.begin().await.unwrap();
    sqlx::query(&format!("INSERT INTO {effects} VALUES ('q')"))
        .execute(&mut *tx)
        .await
        .unwrap();
    assert!(broker.ack_in(&mut *tx, &first).await.unwrap());
    tx.rollback().await.unwrap();
    assert_eq!(
        count(&pool, &format!("SELECT count(*) FROM {effects}")).await,
        0
    );
    let again = eventually("the redelivery after the rollback", || async {
        queue
            .poll(1, Duration::from_millis(100))
            .await
            .unwrap()
            .pop()
    })
    .await;
    assert_eq!((again.offset, again.attempt), (first.offset, 2));
    // The first delivery's lease was taken over: its settle is refused.
    let mut tx = pool.begin().await.unwrap();
    let e = broker.ack_in(&mut *tx, &first).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::LeaseExpired, "{e}");
    tx.rollback().await.unwrap();
    let mut tx = pool.begin().await.unwrap();
    sqlx::query(&format!("INSERT INTO {effects} VALUES ('q')"))
        .execute(&mut *tx)
        .await
        .unwrap();
    assert!(broker.ack_in(&mut *tx, &again).await.unwrap());
    tx.commit().await.unwrap();
    let mut tx = pool.begin().await.unwrap();
    assert!(!broker.ack_in(&mut *tx, &again).await.unwrap());
    tx.rollback().await.unwrap();
    let lag = broker.group_lag("q").await.unwrap();
    assert_eq!(lag.partitions[0].lag, 0, "{lag:?}");
    assert!(queue
        .poll(1, Duration::from_millis(1500))
        .await
        .unwrap()
        .is_empty());

    // Stream mode.
    let stream = broker
        .consumer("st", &["s"], GroupConfig::stream())
        .await
        .unwrap();
    let m = eventually("the stream delivery", || async {
        stream
            .poll(1, Duration::from_millis(100))
            .await
            .unwrap()
            .pop()
    })
    .await;
    let mut tx = pool.begin().await.unwrap();
    sqlx::query(&format!("INSERT INTO {effects} VALUES ('s')"))
        .execute(&mut *tx)
        .await
        .unwrap();
    assert!(broker.ack_in(&mut *tx, &m).await.unwrap());
    tx.rollback().await.unwrap();
    let lag = broker.group_lag("st").await.unwrap();
    assert_eq!((lag.partitions[0].committed, lag.partitions[0].lag), (0, 1));
    // Delivered again: nack rewinds this member to it.
    stream
        .nack(
            &m,
            conveyor_core::NackOptions::new().with_delay(Duration::ZERO),
        )
        .await
        .unwrap();
    let m2 = eventually("the stream redelivery", || async {
        stream
            .poll(1, Duration::from_millis(100))
            .await
            .unwrap()
            .pop()
    })
    .await;
    assert_eq!((m2.offset, m2.attempt), (m.offset, 2));
    let mut tx = pool.begin().await.unwrap();
    sqlx::query(&format!("INSERT INTO {effects} VALUES ('s')"))
        .execute(&mut *tx)
        .await
        .unwrap();
    assert!(broker.ack_in(&mut *tx, &m2).await.unwrap());
    tx.commit().await.unwrap();
    let lag = broker.group_lag("st").await.unwrap();
    assert_eq!((lag.partitions[0].committed, lag.partitions[0].lag), (1, 0));
    // A redelivery of a message whose transaction committed: already.
    let mut tx = pool.begin().await.unwrap();
    assert!(!broker.ack_in(&mut *tx, &m2).await.unwrap());
    tx.rollback().await.unwrap();
    assert_eq!(
        count(&pool, &format!("SELECT count(*) FROM {effects}")).await,
        2
    );
    // A message read without a group cannot be settled.
    let fetched = broker.fetch("s", 0, 0, 1).await.unwrap().pop().unwrap();
    let mut tx = pool.begin().await.unwrap();
    let e = broker.ack_in(&mut *tx, &fetched).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    tx.rollback().await.unwrap();
    queue.close().await.unwrap();
    stream.close().await.unwrap();
    broker.close().await.unwrap();
}

/// Stream mode: a member whose partition moved to another member in a
/// rebalance cannot commit it in its transaction (`Fenced`), and the
/// writes it made in that transaction roll back; its commit of a
/// partition it kept goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_members_in_transaction_commit_fails_and_its_effects_roll_back() {
    let (schema, pool, broker) = setup("txfence").await;
    let effects = effects_table(&pool, &schema.0).await;
    broker.create_topic("f", TopicConfig::new(2)).await.unwrap();
    let producer = broker.producer().await.unwrap();
    for p in 0..2 {
        producer
            .send("f", Record::new(format!("p{p}")).with_partition(p))
            .await
            .unwrap();
    }
    let config = GroupConfig::stream().with_session_timeout(Duration::from_secs(30));
    let a = broker.consumer("g", &["f"], config.clone()).await.unwrap();
    let mut held: BTreeMap<u32, Message> = BTreeMap::new();
    let start = Instant::now();
    while held.len() < 2 {
        assert!(start.elapsed() < PATIENCE, "member A read {held:?}");
        for m in a.poll(10, Duration::from_millis(100)).await.unwrap() {
            held.insert(m.partition, m);
        }
    }
    let b = broker.consumer("g", &["f"], config).await.unwrap();
    let moved = eventually("member B to own a partition", || async {
        b.assignment().await.unwrap().first().map(|tp| tp.partition)
    })
    .await;
    let kept = 1 - moved;

    let mut tx = pool.begin().await.unwrap();
    sqlx::query(&format!("INSERT INTO {effects} VALUES ('fenced')"))
        .execute(&mut *tx)
        .await
        .unwrap();
    let e = broker.ack_in(&mut *tx, &held[&moved]).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Fenced, "{e}");
    tx.rollback().await.unwrap();
    assert_eq!(
        count(
            &pool,
            &format!("SELECT count(*) FROM {effects} WHERE id = 'fenced'")
        )
        .await,
        0
    );
    let mut tx = pool.begin().await.unwrap();
    sqlx::query(&format!("INSERT INTO {effects} VALUES ('kept')"))
        .execute(&mut *tx)
        .await
        .unwrap();
    assert!(broker.ack_in(&mut *tx, &held[&kept]).await.unwrap());
    tx.commit().await.unwrap();
    let lag = broker.group_lag("g").await.unwrap();
    let committed: BTreeMap<u32, u64> = lag
        .partitions
        .iter()
        .map(|p| (p.partition, p.committed))
        .collect();
    assert_eq!(committed[&kept], 1);
    assert_eq!(committed[&moved], 0, "the fenced commit went through");
    // The new owner reads the moved partition's record.
    let got = eventually("member B to read the moved partition", || async {
        b.poll(10, Duration::from_millis(100)).await.unwrap().pop()
    })
    .await;
    assert_eq!((got.partition, got.offset), (moved, 0));
    a.close().await.unwrap();
    b.close().await.unwrap();
    broker.close().await.unwrap();
}

/// `first_seen_in` records a key only if its transaction commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_seen_in_a_transaction_counts_only_if_it_commits() {
    let (_schema, pool, broker) = setup("txidem").await;
    let ttl = Duration::from_secs(60);
    let mut tx = pool.begin().await.unwrap();
    assert!(broker.first_seen_in(&mut *tx, "e-1", ttl).await.unwrap());
    tx.rollback().await.unwrap();
    let mut tx = pool.begin().await.unwrap();
    assert!(broker.first_seen_in(&mut *tx, "e-1", ttl).await.unwrap());
    tx.commit().await.unwrap();
    let mut tx = pool.begin().await.unwrap();
    assert!(!broker.first_seen_in(&mut *tx, "e-1", ttl).await.unwrap());
    tx.rollback().await.unwrap();
    let e = broker
        .first_seen_in(&pool, "", ttl)
        .await
        .expect_err("empty key");
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    broker.close().await.unwrap();
}

/// The runner with a transactional handler, in both modes: the handler's
/// write and the settle commit together. Every fifth message fails on its
/// first attempt after writing (the write rolls back, the runner nacks,
/// the retry writes again): in the end each message has exactly one
/// effect and the group has nothing left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runner_with_a_transactional_handler_writes_each_effect_once() {
    let (schema, pool, broker) = setup("txrun").await;
    let effects = effects_table(&pool, &schema.0).await;
    broker.create_topic("r", TopicConfig::new(2)).await.unwrap();
    const N: usize = 60;
    let records = (0..N).map(|i| Record::new(i.to_string())).collect();
    broker
        .producer()
        .await
        .unwrap()
        .send_batch("r", records)
        .await
        .unwrap();
    for (group, config) in [("rq", GroupConfig::queue()), ("rs", GroupConfig::stream())] {
        let config = config.with_retry_backoff(RetryBackoff::none());
        let consumer = broker.consumer(group, &["r"], config).await.unwrap();
        let table = effects.clone();
        let handler = Transactional::new(
            broker.clone(),
            pool.clone(),
            move |m: Message, mut tx: PgTransaction| {
                let table = table.clone();
                async move {
                    let id = format!("{group}-{}", text(&m));
                    sqlx::query(&format!("INSERT INTO {table} VALUES ($1)"))
                        .bind(&id)
                        .execute(&mut *tx)
                        .await?;
                    if m.attempt == 1 && text(&m).parse::<usize>()? % 5 == 0 {
                        return Err(HandlerError::new("first attempt fails"));
                    }
                    Ok(tx)
                }
            },
        );
        let stats = Runner::new(consumer, RunnerConfig::default().with_concurrency(4))
            .run_until_idle(handler, Duration::from_millis(1500))
            .await
            .unwrap();
        assert_eq!(stats.succeeded, N as u64, "{group}: {stats:?}");
        assert_eq!(stats.failed, (N / 5) as u64, "{group}: {stats:?}");
        // The runner did not ack what the handler settled (an ack of a
        // settled queue-mode message would be refused).
        assert_eq!(stats.settle_refused, 0, "{group}: {stats:?}");
        let rows: Vec<(String, i64)> = sqlx::query_as(&format!(
            "SELECT id, count(*) FROM {effects} WHERE id LIKE $1 GROUP BY id"
        ))
        .bind(format!("{group}-%"))
        .fetch_all(&pool)
        .await
        .unwrap();
        assert_eq!(rows.len(), N, "{group}: effects {rows:?}");
        assert!(rows.iter().all(|(_, n)| *n == 1), "{group}: {rows:?}");
        let lag = broker.group_lag(group).await.unwrap();
        assert!(lag.partitions.iter().all(|p| p.lag == 0), "{lag:?}");
    }
    broker.close().await.unwrap();
}
