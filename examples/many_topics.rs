//! The case the RocksDB backend is for: many topics and partitions with
//! little data each. Fills a store with `TOPICS` topics × 4 partitions ×
//! 10 records (100-byte values), closes it, then (in a fresh process, so
//! RSS is the store's) reopens it and reports open time, peak RSS and the
//! files the store takes.
//!
//! ```text
//! cargo run --release --example many_topics -- fill 'mmap:///tmp/many' [TOPICS]
//! cargo run --release --example many_topics -- open 'mmap:///tmp/many' /tmp/many
//! cargo run --release --features rocksdb --example many_topics -- fill 'rocksdb:///tmp/many-r'
//! cargo run --release --features rocksdb --example many_topics -- open 'rocksdb:///tmp/many-r' /tmp/many-r
//! ```

use conveyor::{Record, TopicConfig};
use std::path::Path;
use std::time::Instant;

fn rss_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn files_and_bytes(dir: &Path) -> (u64, u64) {
    let (mut files, mut bytes) = (0, 0);
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let Ok(meta) = e.metadata() else { continue };
            if meta.is_dir() {
                let (f, b) = files_and_bytes(&e.path());
                files += f;
                bytes += b;
            } else {
                files += 1;
                bytes += meta.len();
            }
        }
    }
    (files, bytes)
}

#[tokio::main]
async fn main() -> conveyor::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (phase, url) = match (args.first(), args.get(1)) {
        (Some(p), Some(u)) => (p.as_str(), u.as_str()),
        _ => {
            eprintln!("usage: many_topics fill|open URL [TOPICS | DIR]");
            std::process::exit(2);
        }
    };
    let started = Instant::now();
    let broker = conveyor::open(url).await?;
    let opened = started.elapsed();
    match phase {
        "fill" => {
            let topics: usize = args.get(2).and_then(|t| t.parse().ok()).unwrap_or(1000);
            let producer = broker.producer().await?;
            let value = vec![7u8; 100];
            for t in 0..topics {
                let topic = format!("t{t:05}");
                broker.create_topic(&topic, TopicConfig::new(4)).await?;
                for p in 0..4 {
                    let batch = (0..10)
                        .map(|_| Record::new(value.clone()).with_partition(p))
                        .collect();
                    producer.send_batch(&topic, batch).await?;
                }
            }
            broker.close().await?;
            println!(
                "filled {topics} topics x 4 partitions x 10 records in {:.2?}",
                started.elapsed()
            );
        }
        _ => {
            let topics = broker.list_topics().await?.len();
            let rss = rss_kib("VmHWM:");
            broker.close().await?;
            let (files, bytes) = args
                .get(2)
                .map_or((0, 0), |d| files_and_bytes(Path::new(d)));
            println!(
                "open: {topics} topics in {:.1} ms, peak RSS {} MiB, {files} files, {:.1} MiB on disk",
                opened.as_secs_f64() * 1000.0,
                rss / 1024,
                bytes as f64 / (1 << 20) as f64
            );
        }
    }
    Ok(())
}
