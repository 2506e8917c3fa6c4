//! `conveyor bench`: a quick produce-then-consume throughput run.

use crate::output::table;
use crate::{fail, CliResult};
use clap::Args;
use conveyor::{Broker, GroupConfig, Record, TopicConfig};
use indicatif::{ProgressBar, ProgressStyle};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Args, Debug)]
#[command(
    after_help = "Example:\n  conveyor --url mmap:///tmp/bench bench --messages 1000000 --size 100 --batch 100"
)]
pub struct BenchArgs {
    /// Messages to produce and consume.
    #[arg(long, default_value_t = 100_000)]
    messages: u64,
    /// Value size in bytes.
    #[arg(long, default_value_t = 100)]
    size: usize,
    /// Records per send_batch.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Partitions of the bench topic.
    #[arg(long, default_value_t = 4)]
    partitions: u32,
    /// Consume in queue mode (acks) instead of stream mode (commits).
    #[arg(long)]
    queue: bool,
    /// Keep the bench topic afterwards.
    #[arg(long)]
    keep: bool,
    /// No progress bars.
    #[arg(long)]
    quiet: bool,
}

fn bar(len: u64, what: &str, quiet: bool) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template("{msg:>8} [{bar:40}] {pos}/{len} {per_sec} eta {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

pub async fn run(broker: &Arc<dyn Broker>, args: BenchArgs) -> CliResult {
    if args.messages == 0 || args.batch == 0 {
        return Err("--messages and --batch must be at least 1".into());
    }
    let max = TopicConfig::new(1).max_message_bytes;
    if args.size > max {
        return Err(format!(
            "--size {} is larger than a record may be ({max} bytes)",
            args.size
        ));
    }
    let topic = format!("conveyor.bench.{}", std::process::id());
    broker
        .create_topic(&topic, TopicConfig::new(args.partitions))
        .await
        .map_err(fail)?;
    let result = bench(broker, &topic, &args).await;
    if !args.keep {
        broker.delete_topic(&topic).await.map_err(fail)?;
    }
    result
}

async fn bench(broker: &Arc<dyn Broker>, topic: &str, args: &BenchArgs) -> CliResult {
    let producer = broker.producer().await.map_err(fail)?;
    let value = bytes::Bytes::from(vec![b'x'; args.size]);
    let pb = bar(args.messages, "produce", args.quiet);
    let started = Instant::now();
    let mut sent = 0u64;
    while sent < args.messages {
        let n = (args.messages - sent).min(args.batch as u64);
        let records = (0..n).map(|_| Record::new(value.clone())).collect();
        producer.send_batch(topic, records).await.map_err(fail)?;
        sent += n;
        pb.inc(n);
    }
    producer.flush().await.map_err(fail)?;
    let produce = started.elapsed();
    pb.finish_and_clear();

    let config = if args.queue {
        GroupConfig::queue()
    } else {
        GroupConfig::stream()
    };
    let consumer = broker
        .consumer("conveyor.bench", &[topic], config)
        .await
        .map_err(fail)?;
    let pb = bar(args.messages, "consume", args.quiet);
    let started = Instant::now();
    let mut received = 0u64;
    while received < args.messages {
        let batch = consumer
            .poll(1000, Duration::from_secs(5))
            .await
            .map_err(fail)?;
        if batch.is_empty() {
            return Err(format!("consumer stalled after {received} messages"));
        }
        if args.queue {
            for m in &batch {
                consumer.ack(m).await.map_err(fail)?;
            }
        } else {
            // Commit the last of each partition: cumulative.
            let mut last = std::collections::BTreeMap::new();
            for m in &batch {
                last.insert(m.partition, m);
            }
            for m in last.values() {
                consumer.ack(m).await.map_err(fail)?;
            }
        }
        received += batch.len() as u64;
        pb.inc(batch.len() as u64);
    }
    let consume = started.elapsed();
    pb.finish_and_clear();
    consumer.close().await.map_err(fail)?;

    let mut t = table(&["phase", "messages", "seconds", "msg/s", "MB/s"]);
    for (phase, d) in [("produce", produce), ("consume", consume)] {
        let secs = d.as_secs_f64().max(1e-9);
        t.add_row(vec![
            phase.to_string(),
            args.messages.to_string(),
            format!("{secs:.3}"),
            format!("{:.0}", args.messages as f64 / secs),
            format!(
                "{:.1}",
                (args.messages as f64 * args.size as f64) / secs / 1e6
            ),
        ]);
    }
    println!(
        "{} messages of {} bytes, batches of {}, {} partitions, {} mode",
        args.messages,
        args.size,
        args.batch,
        args.partitions,
        if args.queue { "queue" } else { "stream" }
    );
    println!("{t}");
    Ok(())
}
