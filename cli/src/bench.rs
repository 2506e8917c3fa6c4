//! `conveyor bench`: the comparison's workloads (`conveyor::bench`), by
//! the same names, against one URL: a quick check of a user's own server
//! or directory beside the figures in `docs/benchmarks.md`.

use crate::fail;
use crate::output::{
    human_duration, out, out_json, progress, table, thousands, CliError, CliResult, Format,
};
use clap::Args;
use conveyor::bench::{self, Kind, Workload};
use conveyor::{Broker, BrokerUrl, Durability};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

/// What runs without `--workload`: a few seconds in all on an embedded
/// store (the rest are one `--workload` away; `all` runs everything).
const DEFAULT: &[&str] = &[
    "produce/batch_1",
    "produce/batch_100",
    "produce/batch_1000",
    "read/from_start",
    "queue/single_ack",
    "queue/batch_ack",
    "latency/produce_to_consume",
];

#[derive(Args, Debug)]
#[command(after_help = after_help())]
pub struct BenchArgs {
    /// A workload to run, by name (repeatable); a family name (`produce`)
    /// runs all of its cases, `all` runs the whole catalogue. Default: the
    /// produce batches, read, queue and latency workloads.
    #[arg(long = "workload", value_name = "NAME")]
    workloads: Vec<String>,
    /// Seconds to spend measuring each workload (about: the run is sized
    /// from a first short run).
    #[arg(long, default_value_t = 1.0)]
    seconds: f64,
    /// List the workloads and exit (needs no --url).
    #[arg(long)]
    pub(crate) list: bool,
    /// No progress line.
    #[arg(long)]
    quiet: bool,
}

fn after_help() -> String {
    let names: Vec<String> = bench::catalogue().iter().map(Workload::name).collect();
    format!(
        "Workloads (the names docs/benchmarks.md uses): {}\n\n\
         Example:\n  conveyor --url 'postgres://postgres@127.0.0.1/test?schema=bench' bench --workload produce --seconds 2",
        names.join(", ")
    )
}

/// The workloads `names` pick, in catalogue order.
fn pick(names: &[String]) -> CliResult<Vec<Workload>> {
    if names.is_empty() {
        return Ok(DEFAULT.iter().filter_map(|n| bench::find(n)).collect());
    }
    let mut picked = Vec::new();
    for name in names {
        let matched: Vec<Workload> = bench::catalogue()
            .iter()
            .copied()
            .filter(|w| name == "all" || w.name() == *name || w.family() == name)
            .collect();
        if matched.is_empty() {
            let known: Vec<String> = bench::catalogue().iter().map(Workload::name).collect();
            return Err(CliError::usage(format!(
                "no workload `{name}`; the workloads: {} (or a family: produce, value_size, ...; or all)",
                known.join(", ")
            )));
        }
        picked.extend(matched);
    }
    Ok(bench::catalogue()
        .iter()
        .copied()
        .filter(|w| picked.contains(w))
        .collect())
}

/// One workload's outcome.
struct Outcome {
    workload: Workload,
    messages: u64,
    took: Duration,
    latency: Option<bench::LatencySummary>,
}

fn durability_text(d: Durability) -> String {
    match d {
        Durability::None => "none (OS buffers)".to_string(),
        Durability::Always => "always (synced before send returns)".to_string(),
        Durability::Interval(every) => format!("interval (synced every {})", human_duration(every)),
    }
}

pub async fn run(
    broker: &Arc<dyn Broker>,
    args: BenchArgs,
    format: Format,
    url: &str,
) -> CliResult {
    if args.list {
        return list(format);
    }
    if !(args.seconds.is_finite() && args.seconds > 0.0 && args.seconds <= 3600.0) {
        return Err(CliError::usage(
            "--seconds must be more than 0 and at most 3600",
        ));
    }
    let workloads = pick(&args.workloads)?;
    let durability = BrokerUrl::parse(url)
        .map(|u| u.options().durability)
        .unwrap_or_default();
    let seconds = Duration::from_secs_f64(args.seconds);
    let mut outcomes = Vec::new();
    for w in workloads {
        let pb = if args.quiet {
            indicatif::ProgressBar::hidden()
        } else {
            progress(&w.name(), None)
        };
        let outcome = measure(broker, w, seconds).await;
        pb.finish_and_clear();
        outcomes.push(outcome.map_err(|e| fail(e).context(&format!("{}: ", w.name())))?);
    }
    report(&outcomes, format, durability)
}

/// `bench --list`: the catalogue's names, a line each (text) or one JSON
/// array. Opens no broker.
pub fn list(format: Format) -> CliResult {
    let names: Vec<String> = bench::catalogue().iter().map(Workload::name).collect();
    match format {
        Format::Json => out_json(&json!(names)),
        Format::Text => {
            for name in names {
                out(name)?;
            }
            Ok(())
        }
    }
}

/// Warm up with runs of 1, 2, 4, ... iterations until one takes a tenth
/// of `seconds`, then run as many as fill `seconds` at that pace.
async fn size_and_run(
    run: &mut bench::Prepared,
    seconds: Duration,
) -> conveyor::Result<(u64, Duration)> {
    let mut n = 1u64;
    loop {
        let took = run.run(n).await?;
        if took >= seconds / 10 || n >= 1 << 20 {
            let pace = n as f64 / took.as_secs_f64().max(1e-9);
            let iters = (pace * seconds.as_secs_f64()).clamp(1.0, 1e7) as u64;
            return Ok((iters, run.run(iters).await?));
        }
        n *= 2;
    }
}

/// Run `w` for about `seconds`, after a warm-up ([`size_and_run`]).
async fn measure(
    broker: &Arc<dyn Broker>,
    w: Workload,
    seconds: Duration,
) -> conveyor::Result<Outcome> {
    if let Kind::Latency { rate } = w.kind() {
        let s = bench::latency(broker, rate, seconds, w.value_bytes()).await?;
        return Ok(Outcome {
            workload: w,
            messages: s.samples,
            took: seconds,
            latency: Some(s),
        });
    }
    let mut run = w.prepare(broker).await?;
    let measured = size_and_run(&mut run, seconds).await;
    let cleaned = run.cleanup().await;
    let (iters, took) = measured?;
    cleaned?;
    Ok(Outcome {
        workload: w,
        messages: iters * w.messages_per_iteration(),
        took,
        latency: None,
    })
}

fn report(outcomes: &[Outcome], format: Format, durability: Durability) -> CliResult {
    let us = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
    if format == Format::Json {
        let rows: Vec<_> = outcomes
            .iter()
            .map(|o| {
                let secs = o.took.as_secs_f64().max(1e-9);
                let mut row = json!({
                    "workload": o.workload.name(),
                    "messages": o.messages,
                    "seconds": secs,
                    "messages_per_second": (o.messages as f64 / secs).round(),
                    "mb_per_second": o.messages as f64 * o.workload.value_bytes() as f64 / secs / 1e6,
                });
                if let Some(l) = o.latency {
                    row["latency_us"] = json!({
                        "p50": us(l.p50), "p99": us(l.p99), "p99_9": us(l.p999), "max": us(l.max),
                    });
                }
                row
            })
            .collect();
        let mut doc = json!({
            "durability": match durability {
                Durability::None => "none",
                Durability::Always => "always",
                Durability::Interval(_) => "interval",
            },
            "workloads": rows,
        });
        if let Durability::Interval(every) = durability {
            doc["sync_interval_ms"] = json!(u64::try_from(every.as_millis()).unwrap_or(u64::MAX));
        }
        return out_json(&doc);
    }
    let mut t = table(&[
        "workload", "messages", "seconds", "msg/s", "MB/s", "p50", "p99", "p99.9", "max",
    ]);
    for o in outcomes {
        let secs = o.took.as_secs_f64().max(1e-9);
        let per_second = o.messages as f64 / secs;
        let (rate, mb) = if o.latency.is_some() {
            ("-".to_string(), "-".to_string())
        } else {
            (
                thousands(per_second.round() as u64),
                format!("{:.1}", per_second * o.workload.value_bytes() as f64 / 1e6),
            )
        };
        let l = |f: fn(&bench::LatencySummary) -> Duration| {
            o.latency
                .as_ref()
                .map_or("-".to_string(), |s| human_duration(f(s)))
        };
        t.add_row(vec![
            o.workload.name(),
            thousands(o.messages),
            format!("{secs:.2}"),
            rate,
            mb,
            l(|s| s.p50),
            l(|s| s.p99),
            l(|s| s.p999),
            l(|s| s.max),
        ]);
    }
    out(format!(
        "durability {}; workloads as in docs/benchmarks.md (p50..max: produce-to-consume latency)",
        durability_text(durability)
    ))?;
    out(t)
}
