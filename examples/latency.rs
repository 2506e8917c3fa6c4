//! Produce-to-consume latency at a fixed rate: p50, p99, p99.9.
//!
//! ```text
//! cargo run --release --example latency -- [URL] [RATE] [SECONDS]
//! cargo run --release --example latency -- 'mmap:///tmp/lat' 10000 5
//! ```
//! Default: the embedded backend in a temporary directory, 10,000 msg/s,
//! 5 s, 100-byte values, durability none, one partition, a stream-mode
//! consumer polling as messages arrive.

use conveyor::prelude::*;
use conveyor::{GroupConfig, Record, TopicConfig};
use std::time::{Duration, Instant};

#[tokio::main]
async fn main() -> conveyor::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = tempfile::tempdir().expect("temporary directory");
    let url = args
        .next()
        .unwrap_or_else(|| format!("mmap://{}", dir.path().display()));
    let rate: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let seconds: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(5);
    let broker = conveyor::open(&url).await?;
    broker.create_topic("latency", TopicConfig::new(1)).await?;
    let consumer = broker
        .consumer("latency", &["latency"], GroupConfig::stream())
        .await?;
    let producer = broker.producer().await?;
    let total = rate * seconds;
    let started = Instant::now();
    let sender = tokio::spawn(async move {
        let value = vec![7u8; 92];
        for i in 0..total {
            let due = started + Duration::from_nanos(i * 1_000_000_000 / rate);
            tokio::time::sleep_until(due.into()).await;
            // The send time rides in the value (first 8 bytes: ns since start).
            let sent = started.elapsed().as_nanos() as u64;
            let mut v = sent.to_le_bytes().to_vec();
            v.extend_from_slice(&value);
            producer.send("latency", Record::new(v)).await?;
        }
        Ok::<_, conveyor::Error>(())
    });
    let mut latencies = Vec::with_capacity(total as usize);
    while (latencies.len() as u64) < total {
        for m in consumer.poll(1000, Duration::from_secs(5)).await? {
            let sent = u64::from_le_bytes(m.value[..8].try_into().expect("8 bytes"));
            latencies.push(started.elapsed().as_nanos() as u64 - sent);
            if latencies.len() % 1000 == 0 {
                consumer.commit_message(&m).await?;
            }
        }
    }
    sender.await.expect("sender")?;
    latencies.sort_unstable();
    let q = |p: f64| {
        latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)] as f64 / 1000.0
    };
    println!(
        "{url}: {total} messages at {rate}/s: p50 {:.0} µs, p99 {:.0} µs, p99.9 {:.0} µs, max {:.0} µs",
        q(0.5),
        q(0.99),
        q(0.999),
        q(1.0)
    );
    broker.close().await
}
