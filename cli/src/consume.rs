//! `conveyor consume TOPIC`: through a group (either mode), acking or
//! committing what it printed, or from a position without a group.

use crate::output::{print_message, Format};
use crate::{fail, CliResult};
use clap::{Args, ValueEnum};
use conveyor::{Broker, GroupConfig, SeekTo, StartFrom};
use std::sync::Arc;
use std::time::Duration;

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Partitions owned by one member; commits offsets.
    Stream,
    /// Any member takes any message under a lease; acks.
    Queue,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum From {
    /// The log start.
    Beginning,
    /// Only new records.
    End,
}

#[derive(Args, Debug)]
#[command(after_help = "Examples:\n  \
    conveyor consume orders.events --from beginning --max 10\n  \
    conveyor consume orders.events --group email --mode queue --follow --format json\n  \
    conveyor consume orders.events --partition 3 --offset 1200 --max 5 --verbose")]
pub struct ConsumeArgs {
    /// Topic to read.
    topic: String,
    /// Read as a member of this group, acking (queue) or committing
    /// (stream) each message once printed.
    #[arg(long)]
    group: Option<String>,
    /// Delivery mode of the group.
    #[arg(long, value_enum, default_value_t = Mode::Stream)]
    mode: Mode,
    /// Where to start: beginning (default) or end.
    #[arg(long, value_enum)]
    from: Option<From>,
    /// Start at this offset (of --partition, or of every partition).
    #[arg(long, conflicts_with_all = ["from", "timestamp"])]
    offset: Option<u64>,
    /// Start at the first record at or after this time (ms since the epoch).
    #[arg(long, conflicts_with = "from")]
    timestamp: Option<u64>,
    /// Read only this partition (without --group).
    #[arg(long)]
    partition: Option<u32>,
    /// Keep waiting for new messages.
    #[arg(long)]
    follow: bool,
    /// Stop after this many messages.
    #[arg(long)]
    max: Option<u64>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
    /// Text format: also print position and key.
    #[arg(long)]
    verbose: bool,
    /// Without --follow: stop once no message came for this long (ms).
    #[arg(long, default_value_t = 1000)]
    wait_ms: u64,
}

impl ConsumeArgs {
    fn seek_to(&self) -> Option<SeekTo> {
        match (self.offset, self.timestamp, self.from) {
            (Some(o), _, _) => Some(SeekTo::Offset(o)),
            (_, Some(t), _) => Some(SeekTo::Timestamp(t)),
            (_, _, Some(From::End)) => Some(SeekTo::End),
            (_, _, Some(From::Beginning)) => Some(SeekTo::Beginning),
            _ => None,
        }
    }
}

pub async fn run(broker: &Arc<dyn Broker>, args: ConsumeArgs) -> CliResult {
    match args.group.clone() {
        Some(group) => through_group(broker, &group, &args).await,
        None => from_position(broker, &args).await,
    }
}

async fn through_group(broker: &Arc<dyn Broker>, group: &str, args: &ConsumeArgs) -> CliResult {
    let config = match args.mode {
        Mode::Stream => GroupConfig::stream(),
        Mode::Queue => GroupConfig::queue(),
    };
    let config = match args.from {
        Some(From::End) => config.with_start(StartFrom::Latest),
        _ => config,
    };
    let consumer = broker
        .consumer(group, &[&args.topic], config)
        .await
        .map_err(fail)?;
    if let Some(to) = args.seek_to() {
        for tp in consumer.assignment().await.map_err(fail)? {
            if args.partition.is_none_or(|p| p == tp.partition) {
                consumer
                    .seek(&tp.topic, tp.partition, to)
                    .await
                    .map_err(fail)?;
            }
        }
    }
    let mut printed = 0u64;
    let limit = args.max.unwrap_or(u64::MAX);
    let wait = Duration::from_millis(args.wait_ms);
    let result = async {
        while printed < limit {
            let want = (limit - printed).min(256) as usize;
            let batch = consumer.poll(want, wait).await.map_err(fail)?;
            if batch.is_empty() {
                if args.follow {
                    continue;
                }
                break;
            }
            for m in batch {
                print_message(&m, args.format, args.verbose);
                consumer.ack(&m).await.map_err(fail)?;
                printed += 1;
            }
        }
        Ok(())
    }
    .await;
    consumer.close().await.map_err(fail)?;
    result
}

async fn from_position(broker: &Arc<dyn Broker>, args: &ConsumeArgs) -> CliResult {
    let description = broker.describe_topic(&args.topic).await.map_err(fail)?;
    let partitions: Vec<u32> = match args.partition {
        Some(p) => {
            if p >= description.config.partitions {
                return Err(format!(
                    "topic `{}`: partition {p} out of range (topic has {})",
                    args.topic, description.config.partitions
                ));
            }
            vec![p]
        }
        None => (0..description.config.partitions).collect(),
    };
    let mut positions = Vec::new();
    for p in &partitions {
        let bounds = description.partitions[*p as usize];
        let at = match args.seek_to().unwrap_or(SeekTo::Beginning) {
            SeekTo::Beginning => bounds.log_start,
            SeekTo::End => bounds.log_end,
            SeekTo::Offset(o) => o,
            SeekTo::Timestamp(t) => broker
                .offset_for_timestamp(&args.topic, *p, t)
                .await
                .map_err(fail)?,
        };
        positions.push((*p, at));
    }
    let mut printed = 0u64;
    let limit = args.max.unwrap_or(u64::MAX);
    let mut idle_since = std::time::Instant::now();
    while printed < limit {
        let mut any = false;
        for (p, at) in positions.iter_mut() {
            let want = (limit - printed).min(256) as usize;
            if want == 0 {
                break;
            }
            let batch = broker
                .fetch(&args.topic, *p, *at, want)
                .await
                .map_err(fail)?;
            for m in batch {
                *at = m.offset + 1;
                print_message(&m, args.format, args.verbose);
                printed += 1;
                any = true;
            }
        }
        if any {
            idle_since = std::time::Instant::now();
            continue;
        }
        if !args.follow && idle_since.elapsed() >= Duration::from_millis(args.wait_ms) {
            break;
        }
        if !args.follow {
            // Records already stored were all read: done.
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}
