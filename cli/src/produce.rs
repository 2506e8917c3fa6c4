//! `conveyor produce TOPIC`: stdin lines (text, JSON or base64) to a
//! topic.
//!
//! Records go out in batches. A line that cannot be read (not UTF-8, or
//! malformed JSON) or a record the broker refuses is reported with its line
//! number and skipped; the lines after it are still sent, and the command
//! exits non-zero at the end (with the status of the last error). An
//! error that every line would hit (unknown topic, `--partition` out of
//! range, broker closed) stops at once with one line.
//!
//! `--key`, `--header`, `--delay` and `--deliver-at` apply to every record
//! (a `--json` line's own key and `deliver_at` win; its headers come first).

use crate::exit::Exit;
use crate::message::{base64_bytes, parse_json_record};
use crate::output::{count, out, progress, table, CliError, CliResult, Format};
use crate::time::{parse_duration, parse_timestamp};
use clap::Args;
use conveyor::prelude::*;
use conveyor::{Broker, Record};
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};
use tokio::io::{AsyncBufReadExt, BufReader};

/// A line that was not sent: its error line and the exit status it asks for.
type LineError = (Exit, String);

/// `--header NAME=VALUE`.
fn parse_header(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((name, value)) if !name.is_empty() => Ok((name.to_string(), value.to_string())),
        _ => Err(format!("`{s}` is not a header: use NAME=VALUE")),
    }
}

/// How a refused batch ends the command: every later line would fail too.
fn stops_everything(e: &conveyor::Error, forced_partition: bool) -> bool {
    use conveyor::ErrorKind::*;
    match e.kind() {
        TopicNotFound | Closed => true,
        PartitionOutOfRange => forced_partition,
        _ => false,
    }
}

#[derive(Args, Debug)]
#[command(after_help = "Examples:\n  \
    echo 'order 42 placed' | conveyor produce orders.events\n  \
    printf 'order-42:placed\\n' | conveyor produce orders.events --key-separator :\n  \
    echo '{\"key\":\"order-42\",\"value\":{\"event\":\"placed\"},\"headers\":{\"source\":\"web\"}}' \
    | conveyor produce orders.events --json --verbose\n  \
    echo 'resize image 7' | conveyor produce jobs --key image-7 --header source=cron --delay 30s\n  \
    base64 < image.png | tr -d '\\n' | conveyor produce images --base64\n\n\
    --json reads what consume --format json writes, so consume | produce copies records \
    byte for byte (binary values as {\"value\":\"...\",\"value_encoding\":\"base64\"}). \
    A JSON value is stored as the exact text written ({\"value\":{\"b\":1,\"a\":2}} stores \
    {\"b\":1,\"a\":2}, keys in that order); it is only checked to be JSON.")]
pub struct ProduceArgs {
    /// Topic to append to.
    topic: String,
    /// Read JSON lines: {"key", "value", "value_encoding", "headers",
    /// "partition", "idempotency_key", "deliver_at"}, as `consume --format
    /// json` writes them.
    #[arg(long, conflicts_with = "base64")]
    json: bool,
    /// Each line is the base64 of a value (for binary values).
    #[arg(long)]
    base64: bool,
    /// Text mode: split each line at the first SEP into key and value.
    #[arg(long, value_name = "SEP", conflicts_with = "key")]
    key_separator: Option<String>,
    /// The key of every record (with --json: of lines without a key).
    #[arg(long, value_name = "KEY")]
    key: Option<String>,
    /// Add this header to every record (repeatable; names may repeat).
    #[arg(long = "header", value_name = "NAME=VALUE", value_parser = parse_header)]
    headers: Vec<(String, String)>,
    /// Deliver to queue-mode groups no earlier than this long after the
    /// send: 1500ms, 30s, 5m, 2h, 1d (stream-mode groups read it at once).
    #[arg(long, value_name = "SPAN", value_parser = parse_duration, conflicts_with = "deliver_at")]
    delay: Option<Duration>,
    /// Deliver to queue-mode groups no earlier than this time: milliseconds
    /// since the epoch or RFC 3339.
    #[arg(long, value_name = "TIME", value_parser = parse_timestamp)]
    deliver_at: Option<u64>,
    /// Send every record to this partition.
    #[arg(long)]
    partition: Option<u32>,
    /// Records per batch.
    #[arg(long, default_value_t = 500)]
    batch: usize,
    /// Print a receipt (line, partition, offset, timestamp) per record.
    #[arg(long)]
    verbose: bool,
}

/// Receipts of `--verbose`: a table at the end, or a JSON line each.
enum Receipts {
    Table(comfy_table::Table),
    Json,
}

pub async fn run(broker: &Arc<dyn Broker>, args: ProduceArgs, format: Format) -> CliResult {
    let producer = broker.producer().await.map_err(crate::fail)?;
    let mut stdin = BufReader::new(tokio::io::stdin());
    let mut raw = Vec::new();
    let mut errors: Vec<LineError> = Vec::new();
    let mut batch: Vec<(usize, Record)> = Vec::new();
    let mut sent = 0u64;
    let mut receipts = args.verbose.then(|| match format {
        Format::Json => Receipts::Json,
        Format::Text => Receipts::Table(table(&["line", "partition", "offset", "timestamp"])),
    });
    let pb = progress("produced", None);
    let mut number = 0usize;
    loop {
        raw.clear();
        let read = stdin.read_until(b'\n', &mut raw).await.map_err(|e| {
            CliError::new(Exit::Io, format!("reading stdin after line {number}: {e}"))
        })?;
        if read == 0 {
            break;
        }
        number += 1;
        if raw.last() == Some(&b'\n') {
            raw.pop();
            if raw.last() == Some(&b'\r') {
                raw.pop();
            }
        }
        let line = match std::str::from_utf8(&raw) {
            Ok(line) => line.to_string(),
            Err(e) => {
                errors.push((
                    Exit::Invalid,
                    format!(
                        "line {number}: not valid UTF-8 (bad byte at column {}), not sent; \
                         for binary values use --base64, or --json with \"value_encoding\":\"base64\"",
                        e.valid_up_to() + 1
                    ),
                ));
                continue;
            }
        };
        if (args.json || args.base64) && line.trim().is_empty() {
            continue;
        }
        let record = if args.json {
            parse_json_record(&line).map_err(|e| format!("malformed JSON line: {e}"))
        } else if args.base64 {
            base64_bytes("the line", &line).map(Record::new)
        } else {
            Ok(
                match args
                    .key_separator
                    .as_deref()
                    .and_then(|sep| line.split_once(sep))
                {
                    Some((k, v)) => Record::new(v.to_string()).with_key(k.to_string()),
                    None => Record::new(line),
                },
            )
        };
        match record {
            Ok(r) => batch.push((number, args.apply(r))),
            Err(e) => errors.push((Exit::Invalid, format!("line {number}: {e}"))),
        }
        if batch.len() >= args.batch.max(1) {
            let full = std::mem::take(&mut batch);
            match send(&*producer, &args, full, &mut errors, receipts.as_mut()).await {
                Ok(n) => {
                    sent += n;
                    pb.inc(n);
                }
                Err(CliError::BrokenPipe) => return Err(CliError::BrokenPipe),
                Err(stop) => {
                    pb.finish_and_clear();
                    return Err(stopped(&errors, stop, sent, &args.topic));
                }
            }
        }
    }
    match send(&*producer, &args, batch, &mut errors, receipts.as_mut()).await {
        Ok(n) => sent += n,
        Err(CliError::BrokenPipe) => return Err(CliError::BrokenPipe),
        Err(stop) => {
            pb.finish_and_clear();
            return Err(stopped(&errors, stop, sent, &args.topic));
        }
    }
    pb.finish_and_clear();
    producer.flush().await.map_err(crate::fail)?;
    if let Some(Receipts::Table(t)) = receipts {
        out(t)?;
    }
    eprintln!("sent {} to `{}`", count(sent, "record"), args.topic);
    let Some((exit, last)) = errors.last() else {
        return Ok(());
    };
    for (_, e) in &errors[..errors.len() - 1] {
        eprintln!("conveyor: error: {e}");
    }
    Err(CliError::new(
        *exit,
        format!("{last} ({} not sent)", count(errors.len() as u64, "line")),
    ))
}

impl ProduceArgs {
    /// What the flags add to the record of every line.
    fn apply(&self, mut r: Record) -> Record {
        if let Some(p) = self.partition {
            r = r.with_partition(p);
        }
        if let (None, Some(k)) = (&r.key, &self.key) {
            r = r.with_key(k.clone());
        }
        for (name, value) in &self.headers {
            r = r.with_header(name.clone(), value.clone());
        }
        if r.deliver_at.is_none() {
            if let Some(delay) = self.delay {
                r = r.with_delay(delay);
            } else if let Some(at) = self.deliver_at {
                r = r.with_deliver_at(UNIX_EPOCH + Duration::from_millis(at));
            }
        }
        r
    }
}

/// The one line for an error that stopped the command: earlier line errors
/// first, then this one with where it stopped and what was sent.
fn stopped(errors: &[LineError], stop: CliError, sent: u64, topic: &str) -> CliError {
    for (_, earlier) in errors {
        eprintln!("conveyor: error: {earlier}");
    }
    stop.map_message(|m| format!("{m}; sent {} to `{topic}`)", count(sent, "record")))
}

/// Send a batch; if it is refused, send its records one by one so only the
/// bad lines are reported and the others still go out. An error every line
/// would hit stops the command: it comes back as the message "ERROR
/// (stopped at line N" for [`stopped`] to finish.
async fn send(
    producer: &dyn conveyor::Producer,
    args: &ProduceArgs,
    batch: Vec<(usize, Record)>,
    errors: &mut Vec<LineError>,
    receipts: Option<&mut Receipts>,
) -> CliResult<u64> {
    let topic = args.topic.as_str();
    let Some(first) = batch.first().map(|(n, _)| *n) else {
        return Ok(0);
    };
    let (numbers, records): (Vec<usize>, Vec<Record>) = batch.into_iter().unzip();
    let results: Vec<(usize, Result<conveyor::Receipt, conveyor::Error>)> =
        match producer.send_batch(topic, records.clone()).await {
            Ok(rs) => numbers
                .iter()
                .copied()
                .zip(rs.into_iter().map(Ok))
                .collect(),
            Err(e) if stops_everything(&e, args.partition.is_some()) => {
                return Err(crate::fail(e).map_message(|m| format!("{m} (stopped at line {first}")))
            }
            Err(_) => {
                let mut out = Vec::with_capacity(records.len());
                for (n, r) in numbers.iter().copied().zip(records) {
                    out.push((n, producer.send(topic, r).await));
                }
                out
            }
        };
    let mut ok = 0;
    let mut receipts = receipts;
    for (n, result) in results {
        match result {
            Ok(r) => {
                ok += 1;
                match receipts.as_deref_mut() {
                    Some(Receipts::Table(t)) => {
                        t.add_row(vec![
                            n.to_string(),
                            r.partition.to_string(),
                            r.offset.to_string(),
                            r.timestamp.to_string(),
                        ]);
                    }
                    Some(Receipts::Json) => out(json!({
                        "line": n,
                        "partition": r.partition,
                        "offset": r.offset,
                        "timestamp": r.timestamp,
                    }))?,
                    None => {}
                }
            }
            Err(e) => errors.push((Exit::of(e.kind()), format!("line {n}: {e}"))),
        }
    }
    Ok(ok)
}
