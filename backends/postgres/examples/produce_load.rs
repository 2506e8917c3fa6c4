//! Concurrent producers on one partition: what merging concurrent sends
//! into one transaction buys. Prints msg/s for 1, 4 and 16 producers each
//! sending one 100-byte record at a time, under the durability given.
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
        PgOptions::default().with_schema(schema.clone()),
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
    broker.drop_schema().await?;
    broker.close().await
}
