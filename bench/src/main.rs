//! `conveyor-bench`: run the comparison, print its tables, write the page.
//! See the crate docs, and `scripts/bench-report`, which runs it.

// A measuring tool: a failed set-up ends the run with its message.
#![allow(clippy::unwrap_used)]

use clap::Parser;
use conveyor::bench::{catalogue, Kind, Workload};
use conveyor_bench::fixture::{self, Backend, Fixture};
use conveyor_bench::raw::{self, Raw};
use conveyor_bench::report;
use conveyor_bench::results::{LatencyRow, Results, Row, Settings, Skipped};
use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, BenchmarkId, Criterion, Throughput};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Compare the backends: every workload on every compiled-in backend,
/// beside its raw engine; print the tables and write the page.
#[derive(Parser, Debug)]
#[command(name = "conveyor-bench")]
struct Args {
    /// Only these backends (memory, mmap, rocksdb, redis, postgres).
    #[arg(long, value_delimiter = ',')]
    backends: Vec<String>,
    /// Only the workloads whose name starts with one of these
    /// (`produce`, `read/deep`, `latency`, ...; `queue/single_ack` picks
    /// `queue/single_ack_1p` and `queue/single_ack_1p_1c` too).
    #[arg(long = "workload")]
    workloads: Vec<String>,
    /// The page to write.
    #[arg(long, default_value = "docs/benchmarks.md")]
    out: PathBuf,
    /// Where the charts and results.json go.
    #[arg(long, default_value = "docs/benchmarks")]
    charts: PathBuf,
    /// Make the page from a results.json without running anything.
    #[arg(long)]
    from: Option<PathBuf>,
    /// Keep the other figures of the results.json already in --charts:
    /// this run's (workload, backend) pairs replace theirs (to rerun one
    /// workload, or one backend, without rerunning all).
    #[arg(long)]
    merge: bool,
    /// A smoke run (CI): a fraction of a second per benchmark.
    #[arg(long)]
    quick: bool,
    /// Criterion's warm-up per benchmark, seconds.
    #[arg(long, default_value_t = 1.0)]
    warm_up: f64,
    /// Criterion's measurement time per benchmark, seconds.
    #[arg(long, default_value_t = 3.0)]
    measurement: f64,
    /// Seconds the latency workload sends for.
    #[arg(long, default_value_t = 5.0)]
    latency_seconds: f64,
    /// Records of the topic `read/deep` reads (default 1,000,000; 20,000
    /// with --quick, which has no time to write more).
    #[arg(long)]
    deep_records: Option<u64>,
    /// Install a Prometheus metrics recorder (no endpoint) before opening
    /// the brokers, so the figures include what recording metrics costs
    /// (`conveyor::observe`; without it nothing is recorded). Send such a
    /// run to a scratch `--out` and `--charts`, to compare with the page.
    #[arg(long)]
    metrics_recorder: bool,
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(args) {
        eprintln!("conveyor-bench: {e}");
        std::process::exit(1);
    }
}

fn run(mut args: Args) -> Result<(), String> {
    if let Some(from) = &args.from {
        let text = std::fs::read_to_string(from).map_err(|e| format!("{}: {e}", from.display()))?;
        let results: Results =
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", from.display()))?;
        return publish(&results, &args, false);
    }
    if args.metrics_recorder {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        metrics::set_global_recorder(recorder).map_err(|e| e.to_string())?;
    }
    if args.quick {
        (args.warm_up, args.measurement, args.latency_seconds) = (0.05, 0.1, 0.3);
    }
    let deep_records = args.deep_records.unwrap_or(if args.quick {
        20_000
    } else {
        conveyor::bench::DEEP_TOPIC_RECORDS
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let backends: Vec<Backend> = fixture::compiled_in()
        .into_iter()
        .filter(|b| args.backends.is_empty() || args.backends.iter().any(|n| n == b.name))
        .collect();
    if backends.is_empty() {
        return Err(format!(
            "no backend to run: --backends {:?}; compiled in: {:?} (the others need their cargo feature)",
            args.backends,
            fixture::compiled_in()
                .iter()
                .map(|b| b.name)
                .collect::<Vec<_>>()
        ));
    }
    let wanted = |w: &Workload| {
        args.workloads.is_empty()
            || args
                .workloads
                .iter()
                .any(|p| w.name().starts_with(p.as_str()))
    };
    let server = |name: &str| {
        backends
            .iter()
            .find(|b| b.name == name)
            .map(|b| b.url.clone())
    };
    let machine = rt.block_on(conveyor_bench::machine::read(
        server("redis").as_deref(),
        server("postgres").as_deref(),
    ));
    let mut results = Results {
        machine,
        settings: Settings {
            command: std::env::var("CONVEYOR_BENCH_COMMAND")
                .unwrap_or_else(|_| std::env::args().collect::<Vec<_>>().join(" ")),
            warm_up_s: args.warm_up,
            measurement_s: args.measurement,
            sample_size: 10,
            latency_rate: 0,
            latency_s: args.latency_seconds,
            quick: args.quick,
            deep_records,
        },
        ..Results::default()
    };
    let criterion_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| PathBuf::from("target"), PathBuf::from)
        .join("criterion");
    let mut c = Criterion::default()
        .output_directory(&criterion_dir)
        .sample_size(10)
        .warm_up_time(Duration::from_secs_f64(args.warm_up))
        .measurement_time(Duration::from_secs_f64(args.measurement));
    c = if args.quick {
        // A smoke run checks that everything runs, not the statistics.
        c.nresamples(1_000).without_plots()
    } else {
        c.with_plots()
    };
    let mut failed = 0;
    let mut families: Vec<&str> = Vec::new();
    for w in catalogue() {
        if !families.contains(&w.family()) {
            families.push(w.family());
        }
    }
    for family in families {
        let durabilities: &[&str] = if family == "produce" {
            &["none", "always"]
        } else {
            &["none"]
        };
        for &durability in durabilities {
            let workloads: Vec<Workload> = catalogue()
                .iter()
                .map(|w| w.with_topic_records(deep_records))
                .filter(|w| w.family() == family && wanted(w))
                .collect();
            if workloads.is_empty() {
                continue;
            }
            if family == "latency" {
                for w in &workloads {
                    let Kind::Latency { rate } = w.kind() else {
                        continue;
                    };
                    results.settings.latency_rate = rate;
                    for b in &backends {
                        failed += latency(&rt, &mut results, b, rate, args.latency_seconds);
                    }
                }
                continue;
            }
            let name = match durability {
                "none" => family.to_string(),
                d => format!("{family}_{d}"),
            };
            let mut group = c.benchmark_group(&name);
            for w in &workloads {
                for b in &backends {
                    let Some(url) = url_for(b, durability, w, &mut results) else {
                        continue;
                    };
                    let mut bench = Bench {
                        rt: &rt,
                        group: &mut group,
                        dir: &criterion_dir,
                        name: &name,
                        durability,
                        results: &mut results,
                    };
                    failed += bench.backend(w, b.name, &url);
                    failed += bench.raw(w, b.name, &url);
                }
            }
            group.finish();
        }
    }
    results.generated = now_utc();
    if args.merge {
        results = merged(results, &args.charts)?;
    }
    println!("\n{}", report::tables(&results));
    println!(
        "criterion's HTML report: {}",
        criterion_dir.join("report/index.html").display()
    );
    if failed > 0 {
        save(&results, &args.charts)?;
        return Err(format!(
            "{failed} benchmark(s) failed (listed above); the page was not rewritten; \
             the results are in {}",
            args.charts.join("results.json").display()
        ));
    }
    publish(&results, &args, true)
}

/// `new` over the results.json in `charts`: the (workload, backend) pairs
/// `new` ran replace theirs (with their raw baselines), the rest are kept;
/// the commands are listed in order. So one backend, or one workload, can
/// be run again without running the others.
fn merged(new: Results, charts: &Path) -> Result<Results, String> {
    let path = charts.join("results.json");
    let text =
        std::fs::read_to_string(&path).map_err(|e| format!("--merge: {}: {e}", path.display()))?;
    let mut old: Results =
        serde_json::from_str(&text).map_err(|e| format!("--merge: {}: {e}", path.display()))?;
    let ran: Vec<(String, String)> = new
        .rows
        .iter()
        .map(|r| (r.workload.clone(), r.backend.clone()))
        .chain(
            new.skipped
                .iter()
                .map(|s| (s.workload.clone(), s.backend.clone())),
        )
        .collect();
    let replaced = |workload: &str, backend: &str| {
        ran.iter()
            .any(|(w, b)| b == backend && (w == workload || w == "*"))
    };
    old.rows.retain(|r| !replaced(&r.workload, &r.backend));
    old.skipped.retain(|s| !replaced(&s.workload, &s.backend));
    if new.rows.iter().any(|r| r.workload == "read/deep") {
        old.settings.deep_records = new.settings.deep_records;
    }
    if !new.latency.is_empty() {
        old.latency
            .retain(|l| !new.latency.iter().any(|n| n.backend == l.backend));
        old.latency.extend(new.latency);
        old.settings.latency_rate = new.settings.latency_rate;
        old.settings.latency_s = new.settings.latency_s;
    }
    old.rows.extend(new.rows);
    old.skipped.extend(new.skipped);
    old.settings.command = format!("{}\n{}", old.settings.command, new.settings.command);
    old.generated = new.generated;
    Ok(old)
}

/// Write results.json (when `save_results`), the page and its charts.
fn publish(results: &Results, args: &Args, save_results: bool) -> Result<(), String> {
    if save_results {
        save(results, &args.charts)?;
    }
    report::write(results, &args.out, &args.charts)?;
    println!(
        "wrote {} and its charts in {}",
        args.out.display(),
        args.charts.display()
    );
    Ok(())
}

fn save(results: &Results, charts: &Path) -> Result<(), String> {
    std::fs::create_dir_all(charts).map_err(|e| format!("{}: {e}", charts.display()))?;
    let path = charts.join("results.json");
    let text = serde_json::to_string_pretty(results).map_err(|e| e.to_string())?;
    std::fs::write(&path, text + "\n").map_err(|e| format!("{}: {e}", path.display()))
}

/// The backend's URL at `durability`; `None` (and a line in `skipped`)
/// when this machine offers no way to run it.
fn url_for(b: &Backend, durability: &str, w: &Workload, results: &mut Results) -> Option<String> {
    if durability == "none" {
        return Some(b.url.clone());
    }
    let base = if b.name == "redis" {
        match fixture::redis_always_url() {
            Some(url) => url,
            None => {
                let why = "needs a Redis server with `appendfsync always` \
                           (CONVEYOR_BENCH_REDIS_ALWAYS_URL; scripts/bench-report starts one)";
                note_skip(results, b.name, &w.name(), durability, why);
                return None;
            }
        }
    } else {
        b.url.clone()
    };
    Some(fixture::with_param(&base, "durability", durability))
}

fn note_skip(results: &mut Results, backend: &str, workload: &str, durability: &str, why: &str) {
    eprintln!("skipped: {backend} {workload} (durability {durability}): {why}");
    results.skipped.push(Skipped {
        backend: backend.into(),
        workload: workload.into(),
        durability: durability.into(),
        why: why.into(),
    });
}

/// One criterion group being run.
struct Bench<'a, 'g> {
    rt: &'a tokio::runtime::Runtime,
    group: &'a mut BenchmarkGroup<'g, WallTime>,
    dir: &'a Path,
    name: &'a str,
    durability: &'a str,
    results: &'a mut Results,
}

impl Bench<'_, '_> {
    /// The workload's value in criterion's id: its number where it has one
    /// (so criterion draws the cases on an axis).
    fn value(w: &Workload) -> String {
        w.parameter()
            .map_or_else(|| w.case().to_string(), |p| p.to_string())
    }

    fn throughput(&mut self, w: &Workload) {
        let messages = w.messages_per_iteration();
        self.group.throughput(if w.family() == "value_size" {
            Throughput::BytesDecimal(messages * w.value_bytes() as u64)
        } else {
            Throughput::Elements(messages)
        });
    }

    /// Record the median criterion just wrote for `function`.
    fn record(&mut self, w: &Workload, backend: &str, function: &str, raw: bool) -> usize {
        let path = self
            .dir
            .join(self.name)
            .join(function)
            .join(Self::value(w))
            .join("new/estimates.json");
        let ns = std::fs::read_to_string(&path)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v["median"]["point_estimate"].as_f64());
        let Some(ns) = ns else {
            return self.fail(w, backend, &format!("no estimate in {}", path.display()));
        };
        let messages = w.messages_per_iteration();
        self.results.rows.push(Row {
            workload: w.name(),
            durability: self.durability.into(),
            backend: backend.into(),
            raw,
            messages,
            bytes: messages * w.value_bytes() as u64,
            ns,
        });
        0
    }

    fn fail(&mut self, w: &Workload, backend: &str, why: &str) -> usize {
        note_skip(
            self.results,
            backend,
            &w.name(),
            self.durability,
            &format!("failed: {why}"),
        );
        1
    }

    /// Run `w` on a fresh `url`; 1 if it failed.
    fn backend(&mut self, w: &Workload, backend: &str, url: &str) -> usize {
        let rt = self.rt;
        let fixture = match rt.block_on(Fixture::open(url)) {
            Ok(f) => f,
            Err(e) => return self.fail(w, backend, &e),
        };
        let mut prepared = match rt.block_on(w.prepare(&fixture.broker)) {
            Ok(p) => p,
            Err(e) => return self.fail(w, backend, &e.to_string()),
        };
        self.throughput(w);
        let mut failure: Option<String> = None;
        self.group
            .bench_function(BenchmarkId::new(backend, Self::value(w)), |b| {
                b.iter_custom(|iters| {
                    if failure.is_some() {
                        return Duration::from_nanos(1);
                    }
                    match rt.block_on(prepared.run(iters)) {
                        Ok(took) => took,
                        Err(e) => {
                            failure = Some(e.to_string());
                            Duration::from_nanos(1)
                        }
                    }
                })
            });
        let cleaned = rt.block_on(prepared.cleanup());
        drop(fixture);
        if let Some(e) = failure {
            return self.fail(w, backend, &e);
        }
        if let Err(e) = cleaned {
            return self.fail(w, backend, &format!("cleanup: {e}"));
        }
        self.record(w, backend, backend, false)
    }

    /// Run the raw engine of `backend` on `w` (a produce workload of one
    /// producer and topic, a read or a queue workload, where
    /// [`conveyor_bench::raw::label`] names a baseline); 1 if it failed, 0
    /// if it ran or the backend has none.
    fn raw(&mut self, w: &Workload, backend: &str, url: &str) -> usize {
        let single_producer = matches!(
            w.kind(),
            Kind::Produce {
                producers: 1,
                topics: 1,
                ..
            }
        );
        let iterated =
            single_producer || matches!(w.kind(), Kind::Read { .. } | Kind::Queue { .. });
        if !iterated || raw::label(backend, &w.name()).is_none() {
            return 0;
        }
        let rt = self.rt;
        let always = self.durability == "always";
        let mut engine = match rt.block_on(Raw::open(backend, url, always)) {
            Ok(Some(r)) => r,
            Ok(None) => return 0,
            Err(e) => return self.fail(w, backend, &format!("raw engine: {e}")),
        };
        self.throughput(w);
        let value = vec![7u8; w.value_bytes()];
        let function = format!("raw_{backend}");
        let mut failure: Option<String> = None;
        let (mut leases, mut empty_leases) = (0, 0);
        self.group
            .bench_function(BenchmarkId::new(&function, Self::value(w)), |b| {
                b.iter_custom(|iters| {
                    if failure.is_some() {
                        return Duration::from_nanos(1);
                    }
                    let n = iters * w.messages_per_iteration();
                    let none = || format!("raw engine: no baseline of {}", w.name());
                    let took = match w.kind() {
                        Kind::Produce { batch, .. } => engine.produce(rt, iters, batch, &value),
                        Kind::Read { topic_records: 0 } => engine.read(rt, n, &value),
                        Kind::Read { topic_records } => engine
                            .read_deep(rt, topic_records, n, &value)
                            .and_then(|t| t.ok_or_else(none)),
                        Kind::Queue {
                            batch_ack,
                            partitions,
                            consumers,
                        } => engine
                            .queue(rt, n, partitions, consumers, batch_ack, &value)
                            .and_then(|q| q.ok_or_else(none))
                            .map(|q| {
                                leases += q.leases;
                                empty_leases += q.empty_leases;
                                q.took
                            }),
                        Kind::Latency { .. } => Err(none()),
                    };
                    match took {
                        Ok(took) => took,
                        Err(e) => {
                            failure = Some(e);
                            Duration::from_nanos(1)
                        }
                    }
                })
            });
        if leases > 0 {
            println!(
                "{}/raw_{backend}: {empty_leases} of {leases} leases empty",
                w.name()
            );
        }
        let closed = engine.close(rt);
        if let Some(e) = failure.or(closed.err()) {
            return self.fail(w, backend, &format!("raw engine: {e}"));
        }
        self.record(w, backend, &function, true)
    }
}

/// The latency workload on `b`, then on its raw engine if it has one;
/// the number that failed.
fn latency(
    rt: &tokio::runtime::Runtime,
    results: &mut Results,
    b: &Backend,
    rate: u32,
    seconds: f64,
) -> usize {
    let name = "latency/produce_to_consume";
    let duration = Duration::from_secs_f64(seconds);
    let outcome = rt.block_on(async {
        let f = Fixture::open(&b.url).await?;
        conveyor::bench::latency(&f.broker, rate, duration, 100)
            .await
            .map_err(|e| e.to_string())
    });
    let mut failed = record_latency(results, b.name, false, outcome);
    if raw::label(b.name, name).is_some() {
        let outcome = rt.block_on(raw_latency(b, rate, duration));
        failed += record_latency(results, b.name, true, outcome);
    }
    failed
}

/// The raw latency baseline of `b` (see `conveyor_bench::raw_latency`).
async fn raw_latency(
    b: &Backend,
    rate: u32,
    duration: Duration,
) -> Result<conveyor::bench::LatencySummary, String> {
    let _ = (rate, duration);
    match b.name {
        #[cfg(feature = "redis")]
        "redis" => match raw::redis_server(&b.url)? {
            Some(server) => conveyor_bench::raw_latency::redis(&server, rate, duration, 100).await,
            None => Err("no raw baseline on a cluster".into()),
        },
        #[cfg(feature = "postgres")]
        "postgres" => {
            let url = raw::postgres_connection(&b.url)?;
            conveyor_bench::raw_latency::postgres(&url, rate, duration, 100).await
        }
        other => Err(format!("{other} has no raw latency baseline")),
    }
}

/// Print and keep one latency run's figures; 1 if it failed.
fn record_latency(
    results: &mut Results,
    backend: &str,
    raw: bool,
    outcome: Result<conveyor::bench::LatencySummary, String>,
) -> usize {
    let name = "latency/produce_to_consume";
    let who = if raw {
        format!("raw_{backend}")
    } else {
        backend.to_string()
    };
    match outcome {
        Ok(s) => {
            let us = |d: Duration| d.as_secs_f64() * 1e6;
            println!(
                "{name}/{who}: p50 {:.0} µs, p99 {:.0} µs, p99.9 {:.0} µs, max {:.0} µs ({} records)",
                us(s.p50),
                us(s.p99),
                us(s.p999),
                us(s.max),
                s.samples
            );
            results.latency.push(LatencyRow {
                backend: backend.into(),
                raw,
                samples: s.samples,
                p50_us: us(s.p50),
                p99_us: us(s.p99),
                p999_us: us(s.p999),
                max_us: us(s.max),
            });
            0
        }
        Err(e) => {
            let why = if raw {
                format!("failed (raw engine): {e}")
            } else {
                format!("failed: {e}")
            };
            note_skip(results, backend, name, "none", &why);
            1
        }
    }
}

/// `YYYY-MM-DD HH:MM` in UTC, from the system clock.
fn now_utc() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}",
        rest / 3600,
        rest % 3600 / 60
    )
}
