//! Sending and settling inside the application's PostgreSQL transaction
//! (docs/semantics.md §10), beside the plain calls and beside what an
//! application writes by hand, on the same server.
//!
//! Every operation writes one application row (an order, a shipment) and
//! sends or settles one message of 100 bytes; each is awaited before the
//! next (`_16`: 16 tasks at once). The topic has 1 partition (sends) or 4
//! (acks). `CONVEYOR_BENCH_DURABILITY=always` runs the broker with
//! `durability=always` and the application's connections with
//! `synchronous_commit=on`; otherwise (the default) both run with it off.
//! `CONVEYOR_POSTGRES_URL` picks the server (else the local default); the
//! bench works in a schema of its own, dropped at the end.
//!
//! - `pg_tx_send/plain_send`: `producer.send` alone (no application row);
//! - `pg_tx_send/row_then_send`: the order row committed, then `send`
//!   (two commits; a crash between them loses the event);
//! - `pg_tx_send/send_in`: the order row and `send_in` in one transaction
//!   (the caller's cost: the relay appends after the commit);
//! - `pg_tx_send/outbox_raw`: the hand-written outbox, the order row and
//!   an `INSERT` into an outbox table in one transaction (without the
//!   relay a hand-written outbox also needs);
//! - `pg_tx_send/send_in_visible`, `plain_send_visible`: until a
//!   stream-mode member has received the record (the relay's notification
//!   and move included for `send_in`);
//! - `pg_tx_ack/plain_ack`: a queue-mode member acks each message it
//!   polled (no application row);
//! - `pg_tx_ack/row_then_ack`: the shipment row committed, then `ack`
//!   (a crash between them ships twice);
//! - `pg_tx_ack/ack_in`: the shipment row and `ack_in` in one transaction;
//! - `pg_tx_ack/inbox_raw`: the hand-written exactly-once consumer, the
//!   shipment row and an `INSERT .. ON CONFLICT DO NOTHING` into an inbox
//!   table of handled ids in one transaction, then `ack`.
//!
//! ```text
//! cargo bench -p conveyor-bench --features postgres --bench postgres_tx
//! CONVEYOR_BENCH_DURABILITY=always cargo bench -p conveyor-bench --features postgres --bench postgres_tx
//! ```

// A benchmark: a failed unwrap aborts the run, which is what we want.
#![allow(clippy::unwrap_used)]

use conveyor::postgres::{PgBroker, PgOptions};
use conveyor::prelude::*;
use conveyor::{BrokerOptions, Durability, GroupConfig, Message, Record, TopicConfig};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

const VALUE: usize = 100;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn always() -> bool {
    std::env::var("CONVEYOR_BENCH_DURABILITY").as_deref() == Ok("always")
}

/// The broker on its own schema, and the application's pool.
struct Setup {
    broker: PgBroker,
    app: PgPool,
    schema: String,
}

impl Setup {
    async fn open() -> Setup {
        let url = conveyor_bench::fixture::postgres_url();
        let schema = format!("bench_tx_{}", std::process::id());
        let durability = if always() {
            Durability::Always
        } else {
            Durability::None
        };
        let broker = conveyor::postgres::open(
            &url,
            BrokerOptions::default().with_durability(durability),
            PgOptions::default()
                .with_schema(&schema)
                .with_migrate(true)
                .with_max_connections(20),
        )
        .await
        .unwrap();
        let sync = if always() { "on" } else { "off" };
        let options = PgConnectOptions::from_str(&url).unwrap().options([
            ("search_path", schema.as_str()),
            ("synchronous_commit", sync),
        ]);
        let app = PgPoolOptions::new()
            .max_connections(20)
            .connect_with(options)
            .await
            .unwrap();
        for ddl in [
            "CREATE TABLE orders (id bigserial PRIMARY KEY, amount int NOT NULL)",
            "CREATE TABLE shipments (id bigserial PRIMARY KEY, order_id bigint NOT NULL)",
            "CREATE TABLE outbox (id bigserial PRIMARY KEY, topic text NOT NULL, payload bytea NOT NULL)",
            "CREATE TABLE inbox (id text PRIMARY KEY)",
        ] {
            sqlx::query(ddl).execute(&app).await.unwrap();
        }
        Setup {
            broker,
            app,
            schema,
        }
    }

    async fn close(self) {
        self.app.close().await;
        if let Err(e) = self.broker.drop_schema().await {
            eprintln!("could not drop schema {}: {e}", self.schema);
        }
        self.broker.close().await.unwrap();
    }
}

#[derive(Clone, Copy)]
enum SendHow {
    Plain,
    RowThenSend,
    SendIn,
    OutboxRaw,
}

/// One order (or none, for `Plain`) and its event, as `how` says.
async fn send_one(s: &Setup, producer: &Arc<dyn Producer>, topic: &str, how: SendHow) {
    let value = bytes::Bytes::from(vec![7u8; VALUE]);
    let order = "INSERT INTO orders (amount) VALUES (1)";
    match how {
        SendHow::Plain => {
            producer.send(topic, Record::new(value)).await.unwrap();
        }
        SendHow::RowThenSend => {
            sqlx::query(order).execute(&s.app).await.unwrap();
            producer.send(topic, Record::new(value)).await.unwrap();
        }
        SendHow::SendIn => {
            let mut tx = s.app.begin().await.unwrap();
            sqlx::query(order).execute(&mut *tx).await.unwrap();
            s.broker
                .send_in(&mut *tx, topic, vec![Record::new(value)])
                .await
                .unwrap();
            tx.commit().await.unwrap();
        }
        SendHow::OutboxRaw => {
            let mut tx = s.app.begin().await.unwrap();
            sqlx::query(order).execute(&mut *tx).await.unwrap();
            sqlx::query("INSERT INTO outbox (topic, payload) VALUES ($1, $2)")
                .bind(topic)
                .bind(value.as_ref())
                .execute(&mut *tx)
                .await
                .unwrap();
            tx.commit().await.unwrap();
        }
    }
}

fn pg_tx_send(c: &mut Criterion) {
    let rt = runtime();
    let s = Arc::new(rt.block_on(Setup::open()));
    let mut group = c.benchmark_group("pg_tx_send");
    group.sample_size(10);
    group.throughput(Throughput::Elements(1));
    let mut round = 0u64;
    for (name, how, tasks) in [
        ("plain_send", SendHow::Plain, 1),
        ("row_then_send", SendHow::RowThenSend, 1),
        ("send_in", SendHow::SendIn, 1),
        ("outbox_raw", SendHow::OutboxRaw, 1),
        ("plain_send_16", SendHow::Plain, 16),
        ("send_in_16", SendHow::SendIn, 16),
        ("outbox_raw_16", SendHow::OutboxRaw, 16),
    ] {
        group.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter_custom(|iters| {
                round += 1;
                let topic = format!("send.{name}.{round}");
                let s = s.clone();
                rt.block_on(async move {
                    s.broker
                        .create_topic(&topic, TopicConfig::new(1))
                        .await
                        .unwrap();
                    let producer = s.broker.producer().await.unwrap();
                    let started = Instant::now();
                    let per_task = iters.div_ceil(tasks);
                    let mut handles = Vec::new();
                    for _ in 0..tasks {
                        let (s, producer, topic) = (s.clone(), producer.clone(), topic.clone());
                        handles.push(tokio::spawn(async move {
                            for _ in 0..per_task {
                                send_one(&s, &producer, &topic, how).await;
                            }
                        }));
                    }
                    for h in handles {
                        h.await.unwrap();
                    }
                    let took = started.elapsed() * iters as u32 / (per_task * tasks) as u32;
                    s.broker.delete_topic(&topic).await.unwrap();
                    took
                })
            })
        });
    }
    // Until a stream-mode member has the record.
    for (name, how) in [
        ("plain_send_visible", SendHow::Plain),
        ("send_in_visible", SendHow::SendIn),
    ] {
        group.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter_custom(|iters| {
                round += 1;
                let topic = format!("visible.{name}.{round}");
                let s = s.clone();
                rt.block_on(async move {
                    s.broker
                        .create_topic(&topic, TopicConfig::new(1))
                        .await
                        .unwrap();
                    let producer = s.broker.producer().await.unwrap();
                    let reader = s
                        .broker
                        .consumer("reader", &[topic.as_str()], GroupConfig::stream())
                        .await
                        .unwrap();
                    let mut took = Duration::ZERO;
                    for _ in 0..iters {
                        let started = Instant::now();
                        send_one(&s, &producer, &topic, how).await;
                        let mut got: Vec<Message> = Vec::new();
                        while got.is_empty() {
                            got = reader.poll(1, Duration::from_secs(5)).await.unwrap();
                        }
                        took += started.elapsed();
                    }
                    reader.close().await.unwrap();
                    s.broker.delete_topic(&topic).await.unwrap();
                    took
                })
            })
        });
    }
    group.finish();
    if let Ok(s) = Arc::try_unwrap(s) {
        rt.block_on(s.close());
    }
}

#[derive(Clone, Copy)]
enum AckHow {
    Plain,
    RowThenAck,
    AckIn,
    InboxRaw,
}

fn pg_tx_ack(c: &mut Criterion) {
    let rt = runtime();
    let s = Arc::new(rt.block_on(Setup::open()));
    let mut group = c.benchmark_group("pg_tx_ack");
    group.sample_size(10);
    group.throughput(Throughput::Elements(1));
    let mut round = 0u64;
    for (name, how) in [
        ("plain_ack", AckHow::Plain),
        ("row_then_ack", AckHow::RowThenAck),
        ("ack_in", AckHow::AckIn),
        ("inbox_raw", AckHow::InboxRaw),
    ] {
        group.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter_custom(|iters| {
                round += 1;
                let topic = format!("ack.{name}.{round}");
                let s = s.clone();
                rt.block_on(async move {
                    s.broker
                        .create_topic(&topic, TopicConfig::new(4))
                        .await
                        .unwrap();
                    let producer = s.broker.producer().await.unwrap();
                    let value = bytes::Bytes::from(vec![7u8; VALUE]);
                    let mut left = iters;
                    while left > 0 {
                        let n = left.min(1000);
                        let records = (0..n).map(|_| Record::new(value.clone())).collect();
                        producer.send_batch(&topic, records).await.unwrap();
                        left -= n;
                    }
                    let consumer = s
                        .broker
                        .consumer(
                            "workers",
                            &[topic.as_str()],
                            GroupConfig::queue().with_visibility_timeout(Duration::from_secs(3600)),
                        )
                        .await
                        .unwrap();
                    let shipment = "INSERT INTO shipments (order_id) VALUES (1)";
                    let started = Instant::now();
                    let mut done = 0;
                    while done < iters {
                        let got = consumer.poll(100, Duration::from_millis(5)).await.unwrap();
                        for m in &got {
                            match how {
                                AckHow::Plain => consumer.ack(m).await.unwrap(),
                                AckHow::RowThenAck => {
                                    sqlx::query(shipment).execute(&s.app).await.unwrap();
                                    consumer.ack(m).await.unwrap();
                                }
                                AckHow::AckIn => {
                                    let mut tx = s.app.begin().await.unwrap();
                                    sqlx::query(shipment).execute(&mut *tx).await.unwrap();
                                    assert!(s.broker.ack_in(&mut *tx, m).await.unwrap());
                                    tx.commit().await.unwrap();
                                }
                                AckHow::InboxRaw => {
                                    let mut tx = s.app.begin().await.unwrap();
                                    sqlx::query(shipment).execute(&mut *tx).await.unwrap();
                                    sqlx::query(
                                        "INSERT INTO inbox (id) VALUES ($1) ON CONFLICT DO NOTHING",
                                    )
                                    .bind(format!("{}/{}/{}", m.topic, m.partition, m.offset))
                                    .execute(&mut *tx)
                                    .await
                                    .unwrap();
                                    tx.commit().await.unwrap();
                                    consumer.ack(m).await.unwrap();
                                }
                            }
                        }
                        done += got.len() as u64;
                    }
                    let took = started.elapsed();
                    consumer.close().await.unwrap();
                    s.broker.delete_topic(&topic).await.unwrap();
                    took
                })
            })
        });
    }
    group.finish();
    if let Ok(s) = Arc::try_unwrap(s) {
        rt.block_on(s.close());
    }
}

criterion_group!(benches, pg_tx_send, pg_tx_ack);
criterion_main!(benches);
