//! `conveyor produce TOPIC`: stdin lines, or JSON lines, to a topic.
//!
//! Records go out in batches. A line that cannot be read (not UTF-8, or
//! malformed JSON) or a record the broker refuses is reported with its line
//! number and skipped; the lines after it are still sent, and the command
//! exits non-zero at the end. An error that every line would hit (unknown
//! topic, `--partition` out of range, broker closed) stops at once with one
//! line.

use crate::output::table;
use crate::CliResult;
use clap::Args;
use conveyor::prelude::*;
use conveyor::{Broker, Record};
use serde::Deserialize;
use serde_json::Value;
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, BufReader};

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
    | conveyor produce orders.events --json --verbose")]
pub struct ProduceArgs {
    /// Topic to append to.
    topic: String,
    /// Read JSON lines: {"key", "value", "headers", "partition", "idempotency_key"}.
    #[arg(long)]
    json: bool,
    /// Text mode: split each line at the first SEP into key and value.
    #[arg(long, value_name = "SEP")]
    key_separator: Option<String>,
    /// Send every record to this partition.
    #[arg(long)]
    partition: Option<u32>,
    /// Records per batch.
    #[arg(long, default_value_t = 500)]
    batch: usize,
    /// Print a receipt (partition, offset, timestamp) per record.
    #[arg(long)]
    verbose: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonRecord {
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    value: Value,
    #[serde(default)]
    headers: Value,
    #[serde(default)]
    partition: Option<u32>,
    #[serde(default)]
    idempotency_key: Option<String>,
}

fn parse_json(line: &str) -> Result<Record, String> {
    let r: JsonRecord = serde_json::from_str(line).map_err(|e| e.to_string())?;
    let value = match r.value {
        Value::Null => Vec::new(),
        Value::String(s) => s.into_bytes(),
        other => other.to_string().into_bytes(),
    };
    let mut record = Record::new(value);
    if let Some(k) = r.key {
        record = record.with_key(k);
    }
    let header_value = |v: Value| match v {
        Value::String(s) => Ok(s),
        other => Err(format!("header values must be strings, got {other}")),
    };
    match r.headers {
        Value::Null => {}
        Value::Object(map) => {
            for (name, v) in map {
                record = record.with_header(name, header_value(v)?);
            }
        }
        Value::Array(items) => {
            for item in items {
                match item {
                    Value::Array(pair) if pair.len() == 2 => {
                        let mut pair = pair.into_iter();
                        let name = header_value(pair.next().expect("two"))?;
                        record = record.with_header(name, header_value(pair.next().expect("two"))?);
                    }
                    other => return Err(format!("a header must be [name, value], got {other}")),
                }
            }
        }
        other => return Err(format!("headers must be an object or a list, got {other}")),
    }
    if let Some(p) = r.partition {
        record = record.with_partition(p);
    }
    if let Some(k) = r.idempotency_key {
        record = record.with_idempotency_key(k);
    }
    Ok(record)
}

pub async fn run(broker: &Arc<dyn Broker>, args: ProduceArgs) -> CliResult {
    let producer = broker.producer().await.map_err(crate::fail)?;
    let mut stdin = BufReader::new(tokio::io::stdin());
    let mut raw = Vec::new();
    let mut errors: Vec<String> = Vec::new();
    let mut batch: Vec<(usize, Record)> = Vec::new();
    let mut sent = 0usize;
    let mut receipts = args
        .verbose
        .then(|| table(&["line", "partition", "offset", "timestamp"]));
    let mut number = 0usize;
    loop {
        raw.clear();
        let read = stdin
            .read_until(b'\n', &mut raw)
            .await
            .map_err(|e| format!("reading stdin after line {number}: {e}"))?;
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
                errors.push(format!(
                    "line {number}: not valid UTF-8 (bad byte at column {})",
                    e.valid_up_to() + 1
                ));
                continue;
            }
        };
        if args.json && line.trim().is_empty() {
            continue;
        }
        let record = if args.json {
            parse_json(&line)
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
            Ok(mut r) => {
                if let Some(p) = args.partition {
                    r = r.with_partition(p);
                }
                batch.push((number, r));
            }
            Err(e) => errors.push(format!("line {number}: malformed JSON line: {e}")),
        }
        if batch.len() >= args.batch.max(1) {
            let full = std::mem::take(&mut batch);
            match send(&*producer, &args, full, &mut errors, receipts.as_mut()).await {
                Ok(n) => sent += n,
                Err(stop) => return Err(stopped(&errors, stop, sent, &args.topic)),
            }
        }
    }
    match send(&*producer, &args, batch, &mut errors, receipts.as_mut()).await {
        Ok(n) => sent += n,
        Err(stop) => return Err(stopped(&errors, stop, sent, &args.topic)),
    }
    producer.flush().await.map_err(crate::fail)?;
    if let Some(t) = receipts {
        println!("{t}");
    }
    eprintln!("sent {sent} records to `{}`", args.topic);
    if errors.is_empty() {
        return Ok(());
    }
    for e in &errors[..errors.len() - 1] {
        eprintln!("conveyor: error: {e}");
    }
    Err(format!(
        "{} ({} line{} not sent)",
        errors.last().expect("non-empty"),
        errors.len(),
        if errors.len() == 1 { "" } else { "s" }
    ))
}

/// The one line for an error that stopped the command: earlier line errors
/// first, then this one with where it stopped and what was sent.
fn stopped(
    errors: &[String],
    (line, e): (usize, conveyor::Error),
    sent: usize,
    topic: &str,
) -> String {
    for earlier in errors {
        eprintln!("conveyor: error: {earlier}");
    }
    format!("{e} (stopped at line {line}; sent {sent} records to `{topic}`)")
}

/// Send a batch; if it is refused, send its records one by one so only the
/// bad lines are reported and the others still go out. An error every line
/// would hit is returned with the first line of the batch, to stop.
async fn send(
    producer: &dyn conveyor::Producer,
    args: &ProduceArgs,
    batch: Vec<(usize, Record)>,
    errors: &mut Vec<String>,
    receipts: Option<&mut comfy_table::Table>,
) -> Result<usize, (usize, conveyor::Error)> {
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
            Err(e) if stops_everything(&e, args.partition.is_some()) => return Err((first, e)),
            Err(_) => {
                let mut out = Vec::with_capacity(records.len());
                for (n, r) in numbers.iter().copied().zip(records) {
                    out.push((n, producer.send(topic, r).await));
                }
                out
            }
        };
    let mut ok = 0;
    let mut table = receipts;
    for (n, result) in results {
        match result {
            Ok(r) => {
                ok += 1;
                if let Some(t) = table.as_deref_mut() {
                    t.add_row(vec![
                        n.to_string(),
                        r.partition.to_string(),
                        r.offset.to_string(),
                        r.timestamp.to_string(),
                    ]);
                }
            }
            Err(e) => errors.push(format!("line {n}: {e}")),
        }
    }
    Ok(ok)
}
