//! `conveyor consume TOPIC`: through a group (either mode), acking or
//! committing what it printed, or from a position without a group (a
//! read: an mmap:// store is opened read-only, so it works beside the
//! service that owns it, and `--follow` follows its log).
//!
//! Through a group, a message is acked (queue mode) or committed (stream
//! mode) once it is printed, never before. Ctrl-C, a closed stdout (`|
//! head -1`) or `--max` stop it the same way: what was printed is settled,
//! the member leaves the group, and messages polled but not printed come
//! again to the group.

use crate::message::message_json;
use crate::output::{out, progress, CliResult, Format};
use crate::time::parse_timestamp;
use crate::{fail, Access};
use clap::{Args, ValueEnum};
use conveyor::{Broker, Consumer, GroupConfig, JoinSettings, Message, SeekTo, StartFrom};
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
    conveyor consume orders.events --partition 3 --offset 1200 --max 5 --verbose\n  \
    conveyor consume orders.events --timestamp 2024-05-01T12:00:00Z --format json \
    | conveyor --url mmap:///backup produce orders.events --json\n\n\
    --format json writes one object a line: topic, partition, offset, timestamp, attempt, \
    key, value (embedded JSON, text or base64, named by key_encoding/value_encoding), \
    headers ([name, value] or [name, value, \"base64\"]), idempotency_key, deliver_at; \
    produce --json reads the same lines back. A value that is one JSON document on one line \
    is embedded as its stored bytes, never re-serialised (key order and spaces kept).")]
pub struct ConsumeArgs {
    /// Topic to read.
    topic: String,
    /// Read as a member of this group, acking (queue) or committing
    /// (stream) each message once printed. Joins with the group's stored
    /// settings and never changes them (a new group gets the defaults;
    /// `conveyor group alter` changes them).
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
    /// Start at the first record at or after this time: milliseconds since
    /// the epoch or RFC 3339 (2024-05-01T12:00:00Z).
    #[arg(long, conflicts_with = "from", value_parser = parse_timestamp)]
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

impl ConsumeArgs {
    pub(crate) fn access(&self) -> Access {
        match self.group {
            Some(_) => Access::Write,
            None => Access::Read,
        }
    }
}

/// Print a message in the chosen format.
fn print_message(m: &Message, format: Format, verbose: bool) -> CliResult {
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    match format {
        Format::Json => out(message_json(m)),
        Format::Text if verbose => out(format!(
            "{} key={} {}",
            m.position(),
            m.key.as_ref().map_or("-".into(), |k| text(k)),
            text(&m.value)
        )),
        Format::Text => out(text(&m.value)),
    }
}

/// Completes on Ctrl-C (never, if the handler cannot be installed). The
/// handler is installed when this is called, not when it is first polled:
/// a Ctrl-C after the first message is printed ends the loop the same way
/// (settling what was printed) instead of killing the process.
#[cfg(unix)]
fn interrupted() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let listener = signal(SignalKind::interrupt());
    async move {
        match listener {
            Ok(mut interrupt) => {
                interrupt.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    }
}

/// Completes on Ctrl-C (never, if the handler cannot be installed).
#[cfg(not(unix))]
async fn interrupted() {
    if tokio::signal::ctrl_c().await.is_err() {
        std::future::pending::<()>().await;
    }
}

pub async fn run(broker: &Arc<dyn Broker>, args: ConsumeArgs, format: Format) -> CliResult {
    match args.group.clone() {
        Some(group) => through_group(broker, &group, &args, format).await,
        None => from_position(broker, &args, format).await,
    }
}

async fn through_group(
    broker: &Arc<dyn Broker>,
    group: &str,
    args: &ConsumeArgs,
    format: Format,
) -> CliResult {
    // Join with the group's settings (a new group gets the defaults): a
    // tool never changes them; `conveyor group alter` does.
    let config = match args.mode {
        Mode::Stream => GroupConfig::stream(),
        Mode::Queue => GroupConfig::queue(),
    }
    .with_join_settings(JoinSettings::UseExisting);
    let config = match args.from {
        Some(From::End) => config.with_start(StartFrom::Latest),
        _ => config,
    };
    let consumer = broker
        .consumer(group, &[&args.topic], config)
        .await
        .map_err(fail)?;
    let result = print_through(&*consumer, args, format).await;
    // Leave the group whatever happened: unprinted queue-mode leases are
    // released, stream-mode partitions move on from the last commit.
    let left = consumer.close().await.map_err(fail);
    result.and(left)
}

async fn print_through(consumer: &dyn Consumer, args: &ConsumeArgs, format: Format) -> CliResult {
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
    let pb = progress("consumed", None);
    let stop = interrupted();
    tokio::pin!(stop);
    while printed < limit {
        let want = (limit - printed).min(256) as usize;
        // `poll` is cancel safe: Ctrl-C while waiting takes nothing.
        let batch = tokio::select! {
            () = &mut stop => break,
            batch = consumer.poll(want, wait) => batch.map_err(fail)?,
        };
        if batch.is_empty() {
            if args.follow {
                continue;
            }
            break;
        }
        for m in batch {
            // Settled only once printed: a closed stdout stops here, and
            // this message and the rest of the batch come again.
            print_message(&m, format, args.verbose)?;
            consumer.ack(&m).await.map_err(fail)?;
            printed += 1;
            pb.inc(1);
        }
    }
    pb.finish_and_clear();
    Ok(())
}

async fn from_position(broker: &Arc<dyn Broker>, args: &ConsumeArgs, format: Format) -> CliResult {
    let description = broker.describe_topic(&args.topic).await.map_err(fail)?;
    let partitions: Vec<u32> = match args.partition {
        Some(p) => {
            if p >= description.config.partitions {
                return Err(fail(conveyor::Error::partition_out_of_range(
                    &args.topic,
                    p,
                    description.config.partitions,
                )));
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
    let pb = progress("read", None);
    let stop = interrupted();
    tokio::pin!(stop);
    'reading: while printed < limit {
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
                print_message(&m, format, args.verbose)?;
                printed += 1;
                pb.inc(1);
                any = true;
            }
        }
        if any {
            continue;
        }
        if !args.follow {
            // Records already stored were all read: done.
            break;
        }
        tokio::select! {
            () = &mut stop => break 'reading,
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
    pb.finish_and_clear();
    Ok(())
}
