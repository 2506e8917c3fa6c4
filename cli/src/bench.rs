//! `conveyor bench`: a produce-then-consume run: throughput of each phase
//! and the latency of each call (`send_batch`; `poll` plus its settles),
//! with the durability and value size it ran with.

use crate::fail;
use crate::output::{
    count, human_duration, out, out_json, progress, rate, table, thousands, CliResult, Format,
};
use clap::Args;
use conveyor::{Broker, BrokerUrl, Durability, GroupConfig, Record, TopicConfig};
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Args, Debug)]
#[command(
    after_help = "Example:\n  conveyor --url mmap:///tmp/bench bench --messages 1000000 --size 100 --batch 100"
)]
pub struct BenchArgs {
    /// Messages to produce and consume (the default runs for a few
    /// seconds on the embedded store).
    #[arg(long, default_value_t = 1_000_000)]
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

/// Call latencies of one phase.
struct Latencies(Vec<Duration>);

impl Latencies {
    fn percentile(&mut self, p: f64) -> Duration {
        self.0.sort_unstable();
        let Some(last) = self.0.len().checked_sub(1) else {
            return Duration::ZERO;
        };
        self.0[((last as f64) * p).round() as usize]
    }
    fn micros(&mut self, p: f64) -> u64 {
        u64::try_from(self.percentile(p).as_micros()).unwrap_or(u64::MAX)
    }
}

fn durability_text(d: Durability) -> String {
    match d {
        Durability::None => "none (OS buffers)".to_string(),
        Durability::Always => "always (synced before send returns)".to_string(),
        Durability::Interval(every) => format!("interval (synced every {})", human_duration(every)),
    }
}

fn bar(len: u64, what: &str, quiet: bool) -> indicatif::ProgressBar {
    if quiet {
        return indicatif::ProgressBar::hidden();
    }
    progress(what, Some(len))
}

pub async fn run(
    broker: &Arc<dyn Broker>,
    args: BenchArgs,
    format: Format,
    url: &str,
) -> CliResult {
    if args.messages == 0 || args.batch == 0 {
        return Err("--messages and --batch must be at least 1".into());
    }
    let max = TopicConfig::new(1).max_message_bytes;
    if args.size > max {
        return Err(format!(
            "--size {} is larger than a record may be ({max} bytes)",
            args.size
        )
        .into());
    }
    let topic = format!("conveyor.bench.{}", std::process::id());
    broker
        .create_topic(&topic, TopicConfig::new(args.partitions))
        .await
        .map_err(fail)?;
    let durability = BrokerUrl::parse(url)
        .map(|u| u.options().durability)
        .unwrap_or_default();
    let result = bench(broker, &topic, &args, format, durability).await;
    if !args.keep {
        broker.delete_topic(&topic).await.map_err(fail)?;
    }
    result
}

async fn bench(
    broker: &Arc<dyn Broker>,
    topic: &str,
    args: &BenchArgs,
    format: Format,
    durability: Durability,
) -> CliResult {
    let producer = broker.producer().await.map_err(fail)?;
    let value = bytes::Bytes::from(vec![b'x'; args.size]);
    let pb = bar(args.messages, "produce", args.quiet);
    let mut send_latency = Latencies(Vec::new());
    let started = Instant::now();
    let mut sent = 0u64;
    while sent < args.messages {
        let n = (args.messages - sent).min(args.batch as u64);
        let records = (0..n).map(|_| Record::new(value.clone())).collect();
        let call = Instant::now();
        producer.send_batch(topic, records).await.map_err(fail)?;
        send_latency.0.push(call.elapsed());
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
    let mut poll_latency = Latencies(Vec::new());
    let started = Instant::now();
    let mut received = 0u64;
    while received < args.messages {
        let call = Instant::now();
        let batch = consumer
            .poll(1000, Duration::from_secs(5))
            .await
            .map_err(fail)?;
        if batch.is_empty() {
            return Err(format!("consumer stalled after {}", count(received, "message")).into());
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
        poll_latency.0.push(call.elapsed());
        received += batch.len() as u64;
        pb.inc(batch.len() as u64);
    }
    let consume = started.elapsed();
    pb.finish_and_clear();
    consumer.close().await.map_err(fail)?;

    let mode = if args.queue { "queue" } else { "stream" };
    let phases = [
        ("produce", "send_batch", produce, &mut send_latency),
        ("consume", "poll + settle", consume, &mut poll_latency),
    ];
    if format == Format::Json {
        let mut rows = Vec::new();
        for (phase, call, d, lat) in phases {
            let secs = d.as_secs_f64().max(1e-9);
            rows.push(json!({
                "phase": phase,
                "messages": args.messages,
                "seconds": secs,
                "messages_per_second": (args.messages as f64 / secs).round(),
                "mb_per_second": (args.messages as f64 * args.size as f64) / secs / 1e6,
                "latency_call": call,
                "latency_us": {
                    "p50": lat.micros(0.50),
                    "p99": lat.micros(0.99),
                    "p99_9": lat.micros(0.999),
                    "max": lat.micros(1.0),
                },
            }));
        }
        return out_json(&json!({
            "messages": args.messages,
            "value_bytes": args.size,
            "batch": args.batch,
            "partitions": args.partitions,
            "mode": mode,
            "durability": match durability {
                Durability::None => "none".to_string(),
                Durability::Always => "always".to_string(),
                Durability::Interval(d) => format!("interval:{}", d.as_millis()),
            },
            "phases": rows,
        }));
    }
    let mut t = table(&[
        "phase", "messages", "seconds", "rate", "MB/s", "per call", "p50", "p99", "p99.9", "max",
    ]);
    for (phase, call, d, lat) in phases {
        let secs = d.as_secs_f64().max(1e-9);
        t.add_row(vec![
            phase.to_string(),
            thousands(args.messages),
            format!("{secs:.3}"),
            rate(args.messages, d),
            format!(
                "{:.1}",
                (args.messages as f64 * args.size as f64) / secs / 1e6
            ),
            call.to_string(),
            human_duration(lat.percentile(0.50)),
            human_duration(lat.percentile(0.99)),
            human_duration(lat.percentile(0.999)),
            human_duration(lat.percentile(1.0)),
        ]);
    }
    out(format!(
        "{} of {}, batches of {}, {}, {} mode, durability {}",
        count(args.messages, "message"),
        count(args.size as u64, "byte"),
        thousands(args.batch as u64),
        count(args.partitions.into(), "partition"),
        mode,
        durability_text(durability),
    ))?;
    out(t)
}
