//! Concurrent producers on one partition: what merging concurrent sends
//! into one transaction buys. Prints msg/s for 1, 4 and 16 producers each
//! sending one 100-byte record at a time, under the durability given; then
//! batches of 100, a read from the start, and queue mode with 4 consumers
//! acking one by one and by batch.
//!
//! ```text
//! cargo run --release -p conveyor-postgres --example produce_load -- always
//! ```
//! The server: `CONVEYOR_POSTGRES_URL`, else the local default. The
//! example works in a schema of its own and drops it.

use conveyor_core::prelude::*;
use conveyor_core::{BrokerOptions, Durability, Record, TopicConfig};
use conveyor_postgres::PgOptions;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[tokio::main]
async fn main() -> conveyor_core::Result<()> {
    let durability = match std::env::args().nth(1).as_deref() {
        Some("none") => Durability::None,
        _ => Durability::Always,
    };
    let url = std::env::var("CONVEYOR_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string());
    let schema = format!("load_{}", std::process::id());
    let broker = conveyor_postgres::open(
        &url,
        BrokerOptions::default().with_durability(durability),
        PgOptions::default()
            .with_schema(schema.clone())
            .with_migrate(true),
    )
    .await?;
    broker.create_topic("load", TopicConfig::new(1)).await?;
    let value = vec![b'x'; 100];
    for producers in [1usize, 4, 16] {
        let sent = Arc::new(AtomicU64::new(0));
        let until = Instant::now() + Duration::from_secs(3);
        let mut tasks = Vec::new();
        for _ in 0..producers {
            let p = broker.producer().await?;
            let sent = sent.clone();
            let value = value.clone();
            tasks.push(tokio::spawn(async move {
                while Instant::now() < until {
                    p.send("load", Record::new(value.clone()).with_partition(0))
                        .await?;
                    sent.fetch_add(1, Ordering::Relaxed);
                }
                Ok::<_, conveyor_core::Error>(())
            }));
        }
        for t in tasks {
            t.await.expect("producer task")?;
        }
        println!(
            "{durability:?}, {producers} producers, one partition, batch 1, 100 B: {:.0} msg/s",
            sent.load(Ordering::Relaxed) as f64 / 3.0
        );
    }
    // Batches of 100 to 4 partitions, one producer.
    broker.create_topic("bulk", TopicConfig::new(4)).await?;
    let p = broker.producer().await?;
    let started = Instant::now();
    let batches = 400;
    for i in 0..batches {
        let batch = (0..100)
            .map(|_| Record::new(value.clone()).with_partition(i % 4))
            .collect();
        p.send_batch("bulk", batch).await?;
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{durability:?}, batch 100, 1 producer: {:.0} msg/s",
        (batches * 100) as f64 / secs
    );
    let started = Instant::now();
    let mut read = 0usize;
    for partition in 0..4 {
        let mut at = 0;
        loop {
            let got = broker.fetch("bulk", partition, at, 10_000).await?;
            let Some(last) = got.last() else { break };
            at = last.offset + 1;
            read += got.len();
        }
    }
    println!(
        "read from start (fetch 10,000 a call): {:.0} msg/s",
        read as f64 / started.elapsed().as_secs_f64()
    );
    for (name, batch_ack) in [("single ack", false), ("batch ack", true)] {
        let group = format!("q-{batch_ack}");
        let total = (batches * 100) as u64;
        let done = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let c = broker
                .consumer(&group, &["bulk"], conveyor_core::GroupConfig::queue())
                .await?;
            let done = done.clone();
            tasks.push(tokio::spawn(async move {
                while done.load(Ordering::Relaxed) < total {
                    let got = c.poll(100, Duration::from_millis(200)).await?;
                    if batch_ack {
                        c.ack_batch(&got).await?.into_result()?;
                    } else {
                        for m in &got {
                            c.ack(m).await?;
                        }
                    }
                    done.fetch_add(got.len() as u64, Ordering::Relaxed);
                }
                c.close().await
            }));
        }
        for t in tasks {
            t.await.expect("consumer task")?;
        }
        println!(
            "queue mode, 4 consumers, {name}: {:.0} msg/s",
            total as f64 / started.elapsed().as_secs_f64()
        );
    }
    broker.drop_schema().await?;
    broker.close().await
}
