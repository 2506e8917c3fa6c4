//! What only a server backend shows: producers racing on one partition
//! against a reader, two apps (schemas) on one database, and a connection
//! that breaks (a fault-injecting TCP proxy between client and server).

mod common;

use common::Schema;

use conveyor_conformance::proxy::FaultProxy;
use conveyor_core::prelude::*;
use conveyor_core::{BrokerOptions, Durability, ErrorKind, GroupConfig, Record, TopicConfig};
use conveyor_postgres::PgOptions;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// §3: 8 producers append to one partition while a reader commits as it
/// goes: the reader sees every offset exactly once, in order, and never a
/// late lower offset.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eight_producers_one_partition_reader_sees_every_offset_once_in_order() {
    let schema = Schema::new("race");
    let broker = common::open_dyn(
        &schema.0,
        BrokerOptions::default().with_durability(Durability::None),
    )
    .await
    .unwrap();
    broker
        .create_topic("race", TopicConfig::new(1))
        .await
        .unwrap();
    const PRODUCERS: usize = 8;
    const EACH: usize = 150;
    let reader = broker
        .consumer("reader", &["race"], GroupConfig::stream())
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for w in 0..PRODUCERS {
        let p = broker.producer().await.unwrap();
        tasks.push(tokio::spawn(async move {
            for i in 0..EACH {
                let batch = (0..(1 + i % 3))
                    .map(|j| Record::new(format!("{w}-{i}-{j}")).with_partition(0))
                    .collect();
                p.send_batch("race", batch).await.unwrap();
            }
        }));
    }
    let total: usize = (0..EACH).map(|i| 1 + i % 3).sum::<usize>() * PRODUCERS;
    let mut next = 0u64;
    let start = Instant::now();
    while (next as usize) < total {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "reader stuck at {next} of {total}"
        );
        for m in reader.poll(100, Duration::from_millis(200)).await.unwrap() {
            assert_eq!(m.offset, next, "offsets arrive dense and in order");
            next += 1;
            reader.commit_message(&m).await.unwrap();
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert!(reader
        .poll(10, Duration::from_millis(100))
        .await
        .unwrap()
        .is_empty());
    let lag = broker.group_lag("reader").await.unwrap();
    assert_eq!(lag.total_lag(), 0);
    broker.close().await.unwrap();
}

/// §3 durability: `always` commits with `synchronous_commit = on` (the
/// WAL flushed before `send` returns); `none` with it off.
#[tokio::test]
async fn durability_sets_synchronous_commit() {
    let schema = Schema::new("dur");
    for (durability, want) in [(Durability::Always, "on"), (Durability::None, "off")] {
        let b = common::open(
            &schema.0,
            BrokerOptions::default().with_durability(durability),
        )
        .await
        .unwrap();
        let got: String = sqlx::query_scalar("SHOW synchronous_commit")
            .fetch_one(b.pool())
            .await
            .unwrap();
        assert_eq!(got, want, "{durability:?}");
        b.close().await.unwrap();
    }
}

/// Two apps on one database, each in its own schema, never see each
/// other's topics, records or groups.
#[tokio::test]
async fn two_schemas_on_one_database_never_see_each_other() {
    let (a, b) = (Schema::new("app_a"), Schema::new("app_b"));
    let app_a = common::open_dyn(&a.0, BrokerOptions::default())
        .await
        .unwrap();
    let app_b = common::open_dyn(&b.0, BrokerOptions::default())
        .await
        .unwrap();
    app_a
        .create_topic("orders", TopicConfig::new(1))
        .await
        .unwrap();
    app_b
        .create_topic("orders", TopicConfig::new(2))
        .await
        .unwrap();
    let r = app_a
        .producer()
        .await
        .unwrap()
        .send("orders", Record::new("a"))
        .await
        .unwrap();
    assert_eq!(r.offset, 0);
    let in_b = app_b.describe_topic("orders").await.unwrap();
    assert_eq!(in_b.partitions.len(), 2);
    assert!(
        in_b.partitions.iter().all(|p| p.log_end == 0),
        "b sees none of a's records"
    );
    let c = app_a
        .consumer("g", &["orders"], GroupConfig::queue())
        .await
        .unwrap();
    assert_eq!(c.poll(1, Duration::from_secs(2)).await.unwrap().len(), 1);
    assert!(
        app_b.list_groups().await.unwrap().is_empty(),
        "b sees none of a's groups"
    );
    assert_eq!(
        app_b.group_lag("g").await.unwrap_err().kind(),
        ErrorKind::GroupNotFound
    );
    app_a.close().await.unwrap();
    app_b.close().await.unwrap();
}

/// The server's address as a socket address (for the proxy).
fn server_addr() -> SocketAddr {
    let url = url::Url::parse(&common::url()).expect("CONVEYOR_POSTGRES_URL is a URL");
    let host = url.host_str().unwrap_or("127.0.0.1");
    let port = url.port().unwrap_or(5432);
    use std::net::ToSocketAddrs;
    (host, port)
        .to_socket_addrs()
        .expect("the server's host resolves")
        .next()
        .expect("the server's host has an address")
}

fn through(proxy: &FaultProxy) -> String {
    let mut url = url::Url::parse(&common::url()).expect("CONVEYOR_POSTGRES_URL is a URL");
    url.set_host(Some("127.0.0.1")).expect("a host");
    url.set_port(Some(proxy.addr().port())).expect("a port");
    url.to_string()
}

/// §7: connections dropped and then a black-holed server: calls fail with
/// `Unavailable` (retriable) and work again when the server is back;
/// nothing acknowledged before or after is lost (the shared case,
/// `conveyor_conformance::proxy::lost_connections_case`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_connections_are_unavailable_then_recover_and_lose_nothing() {
    let schema = Schema::new("fault");
    let proxy = FaultProxy::start(server_addr()).await.unwrap();
    let pg = PgOptions::default()
        .with_schema(schema.0.clone())
        .with_max_connections(2)
        .with_migrate(true);
    let broker: Arc<dyn Broker> = Arc::new(
        conveyor_postgres::open(&through(&proxy), BrokerOptions::default(), pg)
            .await
            .unwrap(),
    );
    conveyor_conformance::proxy::lost_connections_case(
        proxy,
        broker,
        common::open_dyn(&schema.0, BrokerOptions::default()),
    )
    .await;
}

/// §3, one process: sends to one partition that arrive while an append is
/// in flight are merged into one statement (one transaction, one WAL
/// flush), each send's records still contiguous and in order. Observed
/// through `xmin`, the inserting transaction of each record row.
#[tokio::test]
async fn concurrent_sends_to_one_partition_share_a_transaction() {
    use sqlx::Connection;
    let schema = Schema::new("merge");
    let broker = common::open_dyn(
        &schema.0,
        BrokerOptions::default().with_durability(Durability::Always),
    )
    .await
    .unwrap();
    broker.create_topic("m", TopicConfig::new(1)).await.unwrap();
    let p = broker.producer().await.unwrap();
    p.send("m", Record::new("warm")).await.unwrap(); // the topic is cached

    // Hold the partition's row lock, so the first send's statement waits.
    let tx = lock_partitions(&schema.0, "m").await;
    let first = {
        let p = p.clone();
        tokio::spawn(async move { p.send_batch("m", vec![Record::new("first")]).await })
    };
    let mut watcher = sqlx::PgConnection::connect(&common::url()).await.unwrap();
    until_one_waits(
        &mut watcher,
        "query LIKE $1",
        "%UPDATE partitions%",
        Duration::from_secs(10),
    )
    .await;
    // The first append is in flight: these queue behind it (this runtime
    // has one thread, so each task runs until it waits for its receipt).
    let later: Vec<_> = (0..9)
        .map(|i| {
            let p = p.clone();
            tokio::spawn(async move {
                p.send_batch(
                    "m",
                    vec![Record::new(format!("{i}a")), Record::new(format!("{i}b"))],
                )
                .await
            })
        })
        .collect();
    for _ in 0..3 {
        tokio::task::yield_now().await;
    }
    tx.commit().await.unwrap();
    assert_eq!(first.await.unwrap().unwrap()[0].offset, 1);
    let mut receipts = Vec::new();
    for t in later {
        receipts.push(t.await.unwrap().unwrap());
    }
    for (i, r) in receipts.iter().enumerate() {
        assert_eq!(
            r[1].offset,
            r[0].offset + 1,
            "send {i}: its records are contiguous"
        );
    }
    let xmins: Vec<String> = sqlx::query_scalar(&format!(
        "SELECT xmin::text FROM \"{}\".records WHERE \"offset\" >= 2 ORDER BY \"offset\"",
        schema.0
    ))
    .fetch_all(&mut watcher)
    .await
    .unwrap();
    assert_eq!(xmins.len(), 18);
    assert!(
        xmins.iter().all(|x| *x == xmins[0]),
        "the 9 sends queued behind the first were appended in one transaction: {xmins:?}"
    );
    broker.close().await.unwrap();
}

/// §3: a record the database refuses fails only its own send. Concurrent
/// sends to a partition are merged into one statement; one record the
/// database refuses (here a CHECK constraint this test adds to its own
/// schema, which core's validation cannot know) failed every send merged
/// with it. Several rounds of 40 sends queued behind a held append, one of
/// them poison: the 39 others succeed, the poison one is `InvalidArgument`.
#[tokio::test]
async fn a_record_the_database_refuses_fails_only_its_own_send() {
    use sqlx::{Connection, Executor};
    let schema = Schema::new("poison");
    let app = format!("cv_{}", schema.0);
    let broker = conveyor_postgres::open(
        &format!("{}?application_name={app}", common::url()),
        BrokerOptions::default(),
        PgOptions::default()
            .with_schema(schema.0.clone())
            .with_migrate(true),
    )
    .await
    .unwrap();
    broker.create_topic("m", TopicConfig::new(1)).await.unwrap();
    broker
        .pool()
        .execute(
            format!(
                "ALTER TABLE \"{}\".records ADD CONSTRAINT no_poison \
                 CHECK (value <> convert_to('poison', 'UTF8'))",
                schema.0
            )
            .as_str(),
        )
        .await
        .unwrap();
    let p = broker.producer().await.unwrap();
    p.send("m", Record::new("warm")).await.unwrap(); // the topic is cached
    let mut watcher = sqlx::PgConnection::connect(&common::url()).await.unwrap();
    for round in 0..4 {
        // Hold the partition's row lock, so the first send's statement
        // waits and the next 40 queue behind it.
        let tx = lock_partitions(&schema.0, "m").await;
        let first = {
            let p = p.clone();
            tokio::spawn(async move { p.send("m", Record::new("first")).await })
        };
        until_one_waits(
            &mut watcher,
            "application_name = $1",
            &app,
            Duration::from_secs(30),
        )
        .await;
        let poison_at = (round * 13 + 7) % 40;
        let sends: Vec<_> = (0..40)
            .map(|i| {
                let p = p.clone();
                let value = if i == poison_at {
                    "poison".to_string()
                } else {
                    format!("{round}-{i}")
                };
                tokio::spawn(async move { p.send("m", Record::new(value)).await })
            })
            .collect();
        // This runtime has one thread: each task runs until it waits for
        // its receipt, queued in the partition's lane.
        for _ in 0..3 {
            tokio::task::yield_now().await;
        }
        tx.commit().await.unwrap();
        first.await.unwrap().unwrap();
        for (i, s) in sends.into_iter().enumerate() {
            let got = s.await.unwrap();
            if i == poison_at {
                let e = got.unwrap_err();
                assert_eq!(e.kind(), ErrorKind::InvalidArgument, "round {round}: {e}");
                assert!(e.message().contains("no_poison"), "{e}");
            } else {
                got.unwrap_or_else(|e| panic!("round {round}: valid send {i} failed: {e}"));
            }
        }
    }
    let d = broker.describe_topic("m").await.unwrap();
    assert_eq!(
        d.partitions[0].log_end,
        1 + 4 * 40,
        "every valid record went in"
    );
    broker.close().await.unwrap();
}

/// Wait until a session matching `filter` (an SQL condition on
/// `pg_stat_activity` with `$1` = `arg`) waits for a lock: the first append
/// is in flight. Fails after `patience`.
async fn until_one_waits(
    watcher: &mut sqlx::PgConnection,
    filter: &str,
    arg: &str,
    patience: Duration,
) {
    let started = Instant::now();
    let sql = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND {filter}"
    );
    loop {
        let waiting: i64 = sqlx::query_scalar(&sql)
            .bind(arg)
            .fetch_one(&mut *watcher)
            .await
            .expect("read pg_stat_activity");
        if waiting > 0 {
            return;
        }
        assert!(
            started.elapsed() < patience,
            "the first append never waited"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A transaction of its own holding the row locks of `topic`'s partitions
/// in `schema`, so appends to them wait until it ends (`commit`).
async fn lock_partitions(schema: &str, topic: &str) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let holder = sqlx::PgPool::connect(&common::url())
        .await
        .expect("connect to PostgreSQL");
    let mut tx = holder.begin().await.expect("BEGIN");
    sqlx::query(&format!(
        "SELECT 1 FROM \"{schema}\".partitions p JOIN \"{schema}\".topics t ON t.id = p.topic_id
          WHERE t.name = $1 FOR UPDATE"
    ))
    .bind(topic)
    .execute(&mut *tx)
    .await
    .expect("lock the partitions");
    tx
}
