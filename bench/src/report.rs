//! `docs/benchmarks.md` and its charts, made from a [`Results`] alone.

use crate::results::{LatencyRow, Results, Row};
use conveyor::bench::catalogue;
use std::fmt::Write as _;
use std::path::Path;

/// A number with three significant digits and a K/M suffix: `1.23 M`,
/// `45.6 K`, `789`.
pub fn si(x: f64) -> String {
    let (v, suffix) = if x >= 1e6 {
        (x / 1e6, " M")
    } else if x >= 1e3 {
        (x / 1e3, " K")
    } else {
        (x, "")
    };
    let digits = if v >= 100.0 {
        0
    } else if v >= 10.0 {
        1
    } else {
        2
    };
    format!("{v:.digits$}{suffix}")
}

/// Microseconds as `850 µs` or `12.3 ms`.
pub fn micros(us: f64) -> String {
    if us >= 1000.0 {
        format!("{} ms", three(us / 1000.0))
    } else {
        format!("{} µs", three(us))
    }
}

/// MB/s as `87.5 MB/s` or `1.93 GB/s`.
pub fn mb_per_second(mb: f64) -> String {
    if mb >= 1000.0 {
        format!("{} GB/s", three(mb / 1000.0))
    } else {
        format!("{} MB/s", three(mb))
    }
}

fn three(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// What a table shows.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Metric {
    /// Messages per second.
    Messages,
    /// MB per second, and messages per second.
    Bytes,
}

/// One table of the page: a family at one durability.
struct Section {
    family: &'static str,
    durability: &'static str,
    title: &'static str,
    about: &'static str,
    metric: Metric,
    /// The headline cases, each drawn as a chart.
    charts: &'static [&'static str],
}

const SECTIONS: &[Section] = &[
    Section {
        family: "produce",
        durability: "none",
        title: "Produce, durability `none`",
        about: "One producer sends batches of 1, 100 and 1,000 records of 100 bytes to a topic of one partition, each `send_batch` awaited before the next, from a spawned task. `none`: `send` returns once the backend has the records (in the OS page cache, in the server's memory); a crash of the machine may lose the last ones.",
        metric: Metric::Messages,
        charts: &["batch_100"],
    },
    Section {
        family: "produce",
        durability: "always",
        title: "Produce, durability `always`",
        about: "The same, with `durability=always`: `send` returns after the records are on stable storage (mmap: `fdatasync`; RocksDB: a synced WAL write; Redis: `appendfsync always`, on a private server started for the run; PostgreSQL: `synchronous_commit = on`). One producer awaiting each batch pays one sync per batch, so the batch size decides the rate. The memory backend accepts the setting and has nothing to sync: its figures are no durable rate.",
        metric: Metric::Messages,
        charts: &["batch_100"],
    },
    Section {
        family: "value_size",
        durability: "none",
        title: "Value size",
        about: "Batches of 100 records of 100 bytes, 1 KiB and 64 KiB, durability `none`. MB/s counts value bytes only. The memory backend keeps the values it is given (shared, not copied), so its MB/s grows with the value size and means little.",
        metric: Metric::Bytes,
        charts: &["64KiB"],
    },
    Section {
        family: "producers",
        durability: "none",
        title: "Concurrent producers",
        about: "1, 2 and 4 producers (each its own `Producer` and task) send batches of 100 to one topic of 4 partitions at once, durability `none`.",
        metric: Metric::Messages,
        charts: &[],
    },
    Section {
        family: "topics",
        durability: "none",
        title: "Many topics",
        about: "One producer sends batches of 100 to 1, 10 and 1,000 topics (one partition each) in turn, durability `none`: what a backend pays per topic it keeps open.",
        metric: Metric::Messages,
        charts: &[],
    },
    Section {
        family: "read",
        durability: "none",
        title: "Read",
        about: "A new stream-mode group reads a topic of one partition: polls of up to 1,000, each poll's batch committed before the next poll. `read/from_start`: from the start of a topic holding what the run reads (the records are written before the clock starts). `read/deep`: from offset {deep_from} of a topic of {deep} records written once, before any run (each run's group seeks there first, and back there at the end). The target: a deep read at 90% or more of the rate of `read/from_start`. The raw engines read the same records back, 1,000 a call (`read/deep`: from the same depth of a table or stream as large, on the servers), with nothing else to do.",
        metric: Metric::Messages,
        charts: &["from_start", "deep"],
    },
    Section {
        family: "queue",
        durability: "none",
        title: "Queue mode",
        about: "4 queue-mode consumers (tasks on the 2-worker runtime) share a topic of 4 partitions: each polls up to 100 messages and acks them, one by one with each ack awaited (`single_ack`) or with one `ack_batch` per poll (`batch_ack`); `_1p`: the same on a topic of one partition; `single_ack_1p_1c`: one consumer alone (the target: 4 consumers at 2.5 times its rate or more). The time covers leasing and acking; the records are written before the clock starts. The raw engines, with as many consumers: Redis, one stream per partition, one consumer group, `XREADGROUP ... COUNT 100` and `XACK` (each entry, or one per read); PostgreSQL, the design of pgmq and River, one table whatever the partitions (`id` primary key, `vt` visibility deadline, `read_ct`, `msg`), each consumer on a connection of its own leasing with `UPDATE ... SET vt = now + 30 s WHERE id IN (SELECT id ... WHERE vt <= now ORDER BY id LIMIT 100 FOR UPDATE SKIP LOCKED) RETURNING id, msg` and deleting each row with its own `DELETE` (or a lease's rows with one `DELETE ... WHERE id = ANY($1)`), `synchronous_commit` off.",
        metric: Metric::Messages,
        charts: &["single_ack", "single_ack_1p", "single_ack_1p_1c"],
    },
];

/// The cases of a family, in catalogue order.
fn cases(family: &str) -> Vec<&'static str> {
    catalogue()
        .iter()
        .filter(|w| w.family() == family)
        .map(|w| w.case())
        .collect()
}

/// A table cell: the rate, and the share of the raw engine's rate.
fn cell(results: &Results, row: &Row, metric: Metric) -> String {
    let mut text = match metric {
        Metric::Messages => format!("{} msg/s", si(row.per_second())),
        Metric::Bytes => format!(
            "{} ({} msg/s)",
            mb_per_second(row.mb_per_second()),
            si(row.per_second())
        ),
    };
    if let Some(raw) = results.row(&row.workload, &row.durability, &row.backend, true) {
        let _ = write!(
            text,
            " · **{:.0}%** of {}",
            100.0 * row.per_second() / raw.per_second(),
            match metric {
                Metric::Messages => si(raw.per_second()),
                Metric::Bytes => mb_per_second(raw.mb_per_second()),
            }
        );
    }
    text
}

fn skipped_cell(results: &Results, workload: &str, durability: &str, backend: &str) -> String {
    results
        .skipped
        .iter()
        .find(|s| {
            s.backend == backend
                && (s.workload == workload || s.workload == "*")
                && s.durability == durability
        })
        .map_or("–".to_string(), |_| "n/a¹".to_string())
}

/// The table of one section (markdown), as the command prints it.
fn table(results: &Results, section: &Section) -> Option<String> {
    let backends = results.backends();
    let rows: Vec<String> = cases(section.family)
        .into_iter()
        .filter_map(|case| {
            let workload = format!("{}/{case}", section.family);
            let cells: Vec<String> = backends
                .iter()
                .map(
                    |b| match results.row(&workload, section.durability, b, false) {
                        Some(row) if !stores(b) && section.durability != "none" => {
                            format!("{} (stores nothing)", cell(results, row, section.metric))
                        }
                        Some(row) => cell(results, row, section.metric),
                        None => skipped_cell(results, &workload, section.durability, b),
                    },
                )
                .collect();
            if cells.iter().all(|c| c == "–") {
                return None;
            }
            Some(format!("| `{workload}` | {} |", cells.join(" | ")))
        })
        .collect();
    if rows.is_empty() {
        return None;
    }
    let mut t = format!("| workload | {} |\n|---|", backends.join(" | "));
    t.push_str(&"---|".repeat(backends.len()));
    t.push('\n');
    for r in rows {
        t.push_str(&r);
        t.push('\n');
    }
    Some(t)
}

fn latency_table(results: &Results) -> Option<String> {
    if results.latency.is_empty() {
        return None;
    }
    let mut t = String::from(
        "| backend | p50 | p99 | p99.9 | max | records | raw engine |\n|---|---|---|---|---|---|---|\n",
    );
    // A percentile beside the raw engine's, and how many times it is.
    let beside = |us: f64, raw: Option<f64>| match raw {
        Some(r) => format!(
            "{} · **{:.1}×** raw's {}",
            micros(us),
            us / r.max(1e-9),
            micros(r)
        ),
        None => micros(us),
    };
    for l in results.latency.iter().filter(|l| !l.raw) {
        let raw = results
            .latency
            .iter()
            .find(|r| r.raw && r.backend == l.backend);
        let _ = writeln!(
            t,
            "| {} | {} | {} | {} | {} | {} | {} |",
            l.backend,
            beside(l.p50_us, raw.map(|r| r.p50_us)),
            beside(l.p99_us, raw.map(|r| r.p99_us)),
            micros(l.p999_us),
            micros(l.max_us),
            l.samples,
            raw.and_then(|_| crate::raw::label(&l.backend, "latency/produce_to_consume"))
                .unwrap_or("–"),
        );
    }
    Some(t)
}

/// The section's text, with the deep read's figures filled in.
fn about(section: &Section, results: &Results) -> String {
    // Results made before `read/deep` existed do not say.
    let deep = match results.settings.deep_records {
        0 => conveyor::bench::DEEP_TOPIC_RECORDS,
        n => n,
    };
    section
        .about
        .replace("{deep_from}", &thousands(deep - deep / 10))
        .replace("{deep}", &thousands(deep))
}

/// `1000000` as `1,000,000`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Every table, as the command prints them after a run (and as the page
/// shows them).
pub fn tables(results: &Results) -> String {
    let mut out = String::new();
    for s in SECTIONS {
        if let Some(t) = table(results, s) {
            let _ = writeln!(out, "{}\n\n{t}", s.title);
        }
    }
    if let Some(t) = latency_table(results) {
        let _ = writeln!(out, "Produce-to-consume latency\n\n{t}");
    }
    out
}

/// Does the backend keep anything (so that durability means something)?
fn stores(backend: &str) -> bool {
    backend != "memory"
}

/// The backends ranked by their rate at `workload` and `durability`,
/// fastest first (at a durability other than `none`, only those that
/// store anything).
fn ranked(results: &Results, workload: &str, durability: &str) -> Vec<(String, f64)> {
    let mut v: Vec<(String, f64)> = results
        .rows
        .iter()
        .filter(|r| !r.raw && r.workload == workload && r.durability == durability)
        .filter(|r| durability == "none" || stores(&r.backend))
        .map(|r| (r.backend.clone(), r.per_second()))
        .collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1));
    v
}

fn rate_of(results: &Results, workload: &str, durability: &str, backend: &str) -> Option<f64> {
    results
        .row(workload, durability, backend, false)
        .map(Row::per_second)
}

fn latency_of<'a>(results: &'a Results, backend: &str) -> Option<&'a LatencyRow> {
    results
        .latency
        .iter()
        .find(|l| !l.raw && l.backend == backend)
}

/// A server backend's speed target: a share of its raw engine's rate on
/// a workload (`at_least`), or, for latency (`workload` "latency/p50" or
/// "latency/p99"), a multiple of the raw latency (`at_most`).
struct Target {
    backend: &'static str,
    what: &'static str,
    workload: &'static str,
    at_least: f64,
    at_most: f64,
}

/// The server backends' speed targets, each against the raw engine in
/// the same run.
const SERVER_TARGETS: &[Target] = &[
    Target {
        backend: "postgres",
        what: "read",
        workload: "read/from_start",
        at_least: 0.30,
        at_most: 0.0,
    },
    Target {
        backend: "postgres",
        what: "queue, 1 partition, ack each",
        workload: "queue/single_ack_1p",
        at_least: 0.60,
        at_most: 0.0,
    },
    Target {
        backend: "postgres",
        what: "queue, 1 partition, batch ack",
        workload: "queue/batch_ack_1p",
        at_least: 0.40,
        at_most: 0.0,
    },
    Target {
        backend: "postgres",
        what: "produce, batch 100",
        workload: "produce/batch_100",
        at_least: 0.60,
        at_most: 0.0,
    },
    Target {
        backend: "postgres",
        what: "latency p50",
        workload: "latency/p50",
        at_least: 0.0,
        at_most: 3.0,
    },
    Target {
        backend: "postgres",
        what: "latency p99",
        workload: "latency/p99",
        at_least: 0.0,
        at_most: 2.5,
    },
    Target {
        backend: "redis",
        what: "queue, ack each",
        workload: "queue/single_ack",
        at_least: 0.70,
        at_most: 0.0,
    },
    Target {
        backend: "redis",
        what: "queue, 1 partition, ack each",
        workload: "queue/single_ack_1p",
        at_least: 0.70,
        at_most: 0.0,
    },
    Target {
        backend: "redis",
        what: "queue, batch ack",
        workload: "queue/batch_ack",
        at_least: 0.40,
        at_most: 0.0,
    },
    Target {
        backend: "redis",
        what: "produce, batch 100",
        workload: "produce/batch_100",
        at_least: 0.70,
        at_most: 0.0,
    },
    Target {
        backend: "redis",
        what: "read",
        workload: "read/from_start",
        at_least: 0.80,
        at_most: 0.0,
    },
    Target {
        backend: "redis",
        what: "latency p50",
        workload: "latency/p50",
        at_least: 0.0,
        at_most: 2.0,
    },
    Target {
        backend: "redis",
        what: "latency p99",
        workload: "latency/p99",
        at_least: 0.0,
        at_most: 2.0,
    },
];

/// The server backends against their speed targets (durability `none`),
/// from this run's figures: met or missed, and by how much. Empty when
/// no server backend ran with its raw engine.
fn server_targets(results: &Results) -> String {
    let mut rows = String::new();
    for t in SERVER_TARGETS {
        let (got, need, shown) = if let Some(p) = t.workload.strip_prefix("latency/") {
            let pick = |l: &LatencyRow| if p == "p50" { l.p50_us } else { l.p99_us };
            let (Some(ours), Some(raw)) = (
                latency_of(results, t.backend),
                results
                    .latency
                    .iter()
                    .find(|l| l.raw && l.backend == t.backend),
            ) else {
                continue;
            };
            let x = pick(ours) / pick(raw);
            (
                -x,
                -t.at_most,
                format!(
                    "{} against {}: **{x:.2}×** (at most {}×)",
                    micros(pick(ours)),
                    micros(pick(raw)),
                    t.at_most
                ),
            )
        } else {
            let (Some(ours), Some(raw)) = (
                rate_of(results, t.workload, "none", t.backend),
                results
                    .row(t.workload, "none", t.backend, true)
                    .map(Row::per_second),
            ) else {
                continue;
            };
            let x = ours / raw;
            (
                x,
                t.at_least,
                format!(
                    "{} against {}: **{:.0}%** (at least {:.0}%)",
                    si(ours),
                    si(raw),
                    x * 100.0,
                    t.at_least * 100.0
                ),
            )
        };
        let verdict = if got >= need { "met" } else { "**missed**" };
        let _ = writeln!(
            rows,
            "| {} | {} (`{}`) | {shown} | {verdict} |",
            t.backend, t.what, t.workload
        );
    }
    if rows.is_empty() {
        return String::new();
    }
    format!(
        "\n## The server backends against their targets\n\n\
Each beside its raw engine in this run (durability `none`; rates in messages per second). Why a missed target is \
missed, with the profiles that show it: [`performance-notes.md`](performance-notes.md).\n\n\
| backend | target | this run | |\n|---|---|---|---|\n{rows}"
    )
}

/// What each backend is, whatever the numbers.
fn nature(backend: &str) -> &'static str {
    match backend {
        "memory" => "in the process's memory; nothing survives a restart. For tests and for work that may be lost.",
        "mmap" => "the embedded default: a segment log in files of one directory, owned by one process (others may read it read-only).",
        "rocksdb" => "embedded, on RocksDB (an LSM tree with compression), owned by one process.",
        "redis" => "a Redis server (or Cluster) shared by any number of processes and machines; the data lives in the server's memory, and survives a crash only with AOF (`appendfsync always` for `durability=always`).",
        "postgres" => "a PostgreSQL server shared by any number of processes and machines; every step is a transaction; with `durability=always` a send returns once its commit is flushed (the default, `none`, commits with `synchronous_commit = off`: a server crash can lose the last few hundred milliseconds).",
        _ => "",
    }
}

/// "Which backend when", from the numbers.
fn which_when(results: &Results) -> String {
    let mut out = String::new();
    let rate =
        |w: &str, d: &str, b: &str| rate_of(results, w, d, b).map(|r| format!("{} msg/s", si(r)));
    for b in results.backends() {
        let mut facts: Vec<String> = Vec::new();
        for (label, w, d) in [
            ("produce (batch 100)", "produce/batch_100", "none"),
            (
                "durable produce (batch 100, `always`)",
                "produce/batch_100",
                "always",
            ),
            ("read", "read/from_start", "none"),
            ("queue single acks", "queue/single_ack", "none"),
        ] {
            if d != "none" && !stores(&b) {
                continue;
            }
            if let Some(r) = rate(w, d, &b) {
                let order = ranked(results, w, d);
                let rank = order
                    .iter()
                    .position(|(x, _)| *x == b)
                    .map_or(String::new(), |i| {
                        format!(" (#{} of {})", i + 1, order.len())
                    });
                facts.push(format!("{label} {r}{rank}"));
            }
        }
        if let Some(l) = latency_of(results, &b) {
            facts.push(format!("p99 latency {}", micros(l.p99_us)));
        }
        let _ = writeln!(
            out,
            "- **{b}**: {} Measured: {}.",
            nature(&b),
            if facts.is_empty() {
                "nothing (see below)".to_string()
            } else {
                facts.join("; ")
            }
        );
    }
    out.push('\n');
    // The choices, each decided by the figures above.
    let faster = |a: &str, b: &str, w: &str, d: &str| -> Option<(String, f64)> {
        let (x, y) = (rate_of(results, w, d, a)?, rate_of(results, w, d, b)?);
        Some(if x >= y {
            (a.to_string(), x / y)
        } else {
            (b.to_string(), y / x)
        })
    };
    let mut picks: Vec<String> = Vec::new();
    let workloads = [
        ("produce", "produce/batch_100", "none"),
        ("durable produce", "produce/batch_100", "always"),
        ("read", "read/from_start", "none"),
        ("queue single acks", "queue/single_ack", "none"),
        ("1,000 topics", "topics/1000", "none"),
    ];
    // The faster of two backends at each workload measured on both.
    let duel = |a: &str, b: &str| -> Vec<String> {
        workloads
            .iter()
            .filter_map(|(label, w, d)| {
                faster(a, b, w, d).map(|(f, x)| format!("{label}: {f} ({x:.1}×)"))
            })
            .collect()
    };
    for (a, b, title, advice) in [
        (
            "mmap",
            "rocksdb",
            "One process, data kept on its disk",
            "mmap is the default and needs no C++ build; rocksdb compresses and keeps its files compacted.",
        ),
        (
            "redis",
            "postgres",
            "Members in several processes or machines",
            "Choose postgres when the queue must be as durable as your other data (and can share its transactions' server), \
             redis when speed matters more and its memory holds the backlog.",
        ),
    ] {
        let verdicts = duel(a, b);
        if !verdicts.is_empty() {
            picks.push(format!(
                "**{title}**: {a} or {b}. Faster here, by workload: {}. {advice}",
                verdicts.join("; ")
            ));
        }
    }
    if let (Some(best), Some(worst)) = (
        ranked(results, "produce/batch_1", "none").first().cloned(),
        ranked(results, "produce/batch_1", "none").last().cloned(),
    ) {
        if let Some(big) = rate_of(results, "produce/batch_100", "none", &worst.0) {
            picks.push(format!(
                "**Batch your sends** on any backend: one record per `send` runs at {} msg/s on {} and {} msg/s on {}; batches of 100 take {} to {} msg/s.",
                si(best.1),
                best.0,
                si(worst.1),
                worst.0,
                worst.0,
                si(big)
            ));
        }
    }
    let per_backend = |f: &dyn Fn(&str) -> Option<String>| -> Vec<String> {
        results.backends().iter().filter_map(|b| f(b)).collect()
    };
    let durable = per_backend(&|b: &str| {
        let (none, always) = (
            rate_of(results, "produce/batch_100", "none", b)?,
            rate_of(results, "produce/batch_100", "always", b)?,
        );
        stores(b).then(|| format!("{b} {:.0}%", 100.0 * always / none))
    });
    if !durable.is_empty() {
        picks.push(format!(
            "**What `durability=always` costs** (batches of 100, rate kept of `none`'s): {}. \
             Larger batches, or several producers sending at once, share each sync.",
            durable.join(", ")
        ));
    }
    let acks = per_backend(&|b: &str| {
        let (single, batch) = (
            rate_of(results, "queue/single_ack", "none", b)?,
            rate_of(results, "queue/batch_ack", "none", b)?,
        );
        Some(format!("{b} {:.1}×", batch / single))
    });
    if !acks.is_empty() {
        picks.push(format!(
            "**Queue mode: settle in batches** (`ack_batch`, or a `Runner`, which batches the acks of handlers that finish together): \
             faster than one awaited `ack` per message by {}.",
            acks.join(", ")
        ));
    }
    let consumers = per_backend(&|b: &str| {
        let (four, one) = (
            rate_of(results, "queue/single_ack_1p", "none", b)?,
            rate_of(results, "queue/single_ack_1p_1c", "none", b)?,
        );
        Some(format!("{b} {:.1}×", four / one))
    });
    if !consumers.is_empty() {
        picks.push(format!(
            "**Queue mode: more consumers** (4 against 1, single acks, one partition; target 2.5× or more): {}.",
            consumers.join(", ")
        ));
    }
    let deep = per_backend(&|b: &str| {
        let (deep, start) = (
            rate_of(results, "read/deep", "none", b)?,
            rate_of(results, "read/from_start", "none", b)?,
        );
        Some(format!("{b} {:.0}%", 100.0 * deep / start))
    });
    if !deep.is_empty() {
        picks.push(format!(
            "**Reading deep in a large topic** (`read/deep`, a topic of {} records, against `read/from_start`; target 90% or more): {}.",
            thousands(results.settings.deep_records),
            deep.join(", ")
        ));
    }
    if let Some(l) = results
        .latency
        .iter()
        .filter(|l| !l.raw)
        .min_by(|a, b| a.p99_us.total_cmp(&b.p99_us))
    {
        picks.push(format!(
            "**Lowest latency** (p99 from send to poll): {} at {}.",
            l.backend,
            micros(l.p99_us)
        ));
    }
    for p in picks {
        let _ = writeln!(out, "- {p}");
    }
    out
}

/// One bar of a chart.
pub struct Bar {
    /// Its label (the backend, or "<backend> raw").
    pub label: String,
    /// Its value.
    pub value: f64,
    /// A raw engine's bar (drawn lighter).
    pub raw: bool,
}

/// A horizontal bar chart on a log scale, as SVG.
///
/// # Errors
/// Drawing or writing the file failed, as text.
pub fn chart(
    path: &Path,
    title: &str,
    unit: &str,
    bars: &[Bar],
    label: &dyn Fn(f64) -> String,
) -> Result<(), String> {
    use plotters::prelude::*;
    let max = bars.iter().map(|b| b.value).fold(1.0, f64::max);
    let min = bars.iter().map(|b| b.value).fold(max, f64::min).max(1e-3);
    let (lo, hi) = (
        10f64.powf((min / 2.0).log10().floor()),
        10f64.powf((max * 4.0).log10().ceil()),
    );
    let height = 70 + 34 * bars.len() as u32;
    let root = SVGBackend::new(path, (760, height)).into_drawing_area();
    let err = |e: &dyn std::fmt::Display| format!("chart {}: {e}", path.display());
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let n = bars.len();
    // The first bar on top.
    let labels: Vec<String> = bars.iter().rev().map(|b| b.label.clone()).collect();
    let row = |i: usize| n - 1 - i;
    let mut c = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(10)
        .margin_right(40)
        .x_label_area_size(36)
        .y_label_area_size(190)
        .build_cartesian_2d((lo..hi).log_scale(), (0..n).into_segmented())
        .map_err(|e| err(&e))?;
    c.configure_mesh()
        .disable_y_mesh()
        .x_desc(unit)
        .x_label_formatter(&|v| label(*v))
        .y_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => labels.get(*i).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .y_labels(n)
        .draw()
        .map_err(|e| err(&e))?;
    let blue = RGBColor(31, 119, 180);
    let grey = RGBColor(180, 190, 200);
    c.draw_series(bars.iter().enumerate().map(|(i, b)| {
        let colour = if b.raw { grey } else { blue };
        let mut r = Rectangle::new(
            [
                (lo, SegmentValue::Exact(row(i))),
                (b.value.max(lo), SegmentValue::Exact(row(i) + 1)),
            ],
            colour.filled(),
        );
        r.set_margin(4, 4, 0, 0);
        r
    }))
    .map_err(|e| err(&e))?;
    c.draw_series(bars.iter().enumerate().map(|(i, b)| {
        Text::new(
            format!(" {}", label(b.value)),
            (b.value.max(lo), SegmentValue::CenterOf(row(i))),
            ("sans-serif", 13),
        )
    }))
    .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// The bars of a section's headline chart: each backend, its raw engine
/// below it.
fn bars(results: &Results, workload: &str, durability: &str, metric: Metric) -> Vec<Bar> {
    let value = |r: &Row| match metric {
        Metric::Messages => r.per_second(),
        Metric::Bytes => r.mb_per_second(),
    };
    let mut out = Vec::new();
    for b in results.backends() {
        if durability != "none" && !stores(&b) {
            continue;
        }
        if let Some(r) = results.row(workload, durability, &b, false) {
            out.push(Bar {
                label: b.clone(),
                value: value(r),
                raw: false,
            });
        }
        if let Some(r) = results.row(workload, durability, &b, true) {
            out.push(Bar {
                label: format!(
                    "{b} raw: {}",
                    crate::raw::label(&b, workload).unwrap_or("raw")
                ),
                value: value(r),
                raw: true,
            });
        }
    }
    out
}

/// Write the page to `page` and its charts (SVG) to `charts` (a
/// directory, linked from the page by its path relative to the page's).
///
/// # Errors
/// Writing a file failed, as text.
pub fn write(results: &Results, page: &Path, charts: &Path) -> Result<(), String> {
    std::fs::create_dir_all(charts).map_err(|e| format!("{}: {e}", charts.display()))?;
    // The charts of an earlier run that this one may not draw.
    for entry in std::fs::read_dir(charts).map_err(|e| format!("{}: {e}", charts.display()))? {
        let path = entry.map_err(|e| e.to_string())?.path();
        if path.extension().is_some_and(|x| x == "svg") {
            std::fs::remove_file(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        }
    }
    let rel = charts
        .strip_prefix(page.parent().unwrap_or(Path::new("")))
        .unwrap_or(charts)
        .display()
        .to_string();
    let source = charts.join("results.json").display().to_string();
    let md = page_text(results, &rel, &source, |file, title, unit, bars| {
        if file.starts_with("latency") {
            chart(&charts.join(file), title, unit, bars, &micros)
        } else {
            chart(&charts.join(file), title, unit, bars, &si)
        }
    })?;
    std::fs::write(page, md).map_err(|e| format!("{}: {e}", page.display()))
}

/// The page's text; `draw(file, title, unit, bars)` makes each chart.
fn page_text(
    results: &Results,
    charts: &str,
    source: &str,
    mut draw: impl FnMut(&str, &str, &str, &[Bar]) -> Result<(), String>,
) -> Result<String, String> {
    let m = &results.machine;
    let s = &results.settings;
    let mut md = String::new();
    let _ = write!(
        md,
        "# Benchmarks: which backend when\n\n\
<!-- Made by `scripts/bench-report` from `{source}` on {generated}. \
Do not edit: change bench/src/report.rs and run `scripts/bench-report --from {source}`. -->\n\n\
The same workloads, through the same public API, on every backend, each beside its storage engine used raw \
(what the engine can do with the same bytes and no queue around it). The workloads are \
`conveyor::bench`'s catalogue, the ones `conveyor bench --url ...` runs on your own server under the same names. \
Measured on {generated} UTC; every figure below is one the command printed.\n\n",
        generated = results.generated,
    );
    if s.quick {
        md.push_str("> **A smoke run** (`--quick`): the figures are not measurements.\n\n");
    }
    md.push_str("## Which backend when\n\n");
    md.push_str(&which_when(results));
    md.push_str(&server_targets(results));
    let _ = write!(
        md,
        "\n## How it was measured\n\n\
```sh\n{command}\n```\n\n\
One run, one machine, one benchmark at a time: criterion ({warm:.0} s warm-up, {measure:.0} s of {samples} samples per benchmark), \
the median time per iteration. Each benchmark gets a fresh store: a new temporary directory (memory, mmap, rocksdb), \
Redis namespace or PostgreSQL schema, deleted after. Client and servers share the machine's cores. \
Values are 100 bytes unless said; the tables give messages per second (and MB/s of values where sizes vary), \
and for each backend with a raw engine its share of the engine's own rate, measured in the same group, same run:\n\n\
| backend | raw engine: a batch of the produce workloads | raw engine: `read/from_start`, per 1,000 records |\n|---|---|---|\n\
| mmap | one `write` of the batch's values to a plain file (+ `fdatasync` under `always`) | one `pread` of their bytes |\n\
| rocksdb | one `WriteBatch` of 16-byte keys and the values, LZ4 (synced under `always`) | 1,000 iterator steps |\n\
| redis | one pipelined `XADD key * v <value>` per record, one round trip | one `XRANGE ... COUNT 1000` |\n\
| postgres | one multi-row `INSERT` of (offset, value); `synchronous_commit` off (on under `always`) | one `SELECT ... ORDER BY off LIMIT 1000` |\n\n\
The queue workloads' raw engines (Redis `XREADGROUP` + `XACK`, PostgreSQL's pgmq-style table leased with \
`UPDATE ... FOR UPDATE SKIP LOCKED`) and the latency workload's (`XREAD BLOCK`, `LISTEN`/`NOTIFY`) are described with \
their tables.\n\n\
A backend's share of raw is the price of the queue on top: offsets, batching, headers, deduplication window, \
indexes and, on the servers, doing each step in one script or transaction.\n\n\
| machine | |\n|---|---|\n\
| CPU | {cpu}, {cores} cores |\n| memory | {mem:.0} GiB |\n| kernel | {kernel} |\n| Rust | {rustc} |\n\
| a 100-byte `write` + `fdatasync` | {fsync} (median) |\n| servers | {servers} |\n\n\
The criterion HTML report (each workload with the backends as series, and their plots) is in \
`$CARGO_TARGET_DIR/criterion/report/index.html` after a run.\n\n",
        command = s.command,
        warm = s.warm_up_s,
        measure = s.measurement_s,
        samples = s.sample_size,
        cpu = m.cpu,
        cores = m.cores,
        mem = m.memory_gib,
        kernel = m.kernel,
        rustc = m.rustc,
        fsync = micros(m.fdatasync_us),
        servers = if m.servers.is_empty() {
            "none".to_string()
        } else {
            m.servers.join(", ")
        },
    );
    for section in SECTIONS {
        let Some(t) = table(results, section) else {
            continue;
        };
        let _ = write!(
            md,
            "## {}\n\n{}\n\n",
            section.title,
            about(section, results)
        );
        for case in section.charts {
            let workload = format!("{}/{case}", section.family);
            let bars = bars(results, &workload, section.durability, section.metric);
            if !bars.is_empty() {
                let file = format!("{}_{}_{}.svg", section.family, case, section.durability);
                let unit = match section.metric {
                    Metric::Messages => "messages per second (log scale)",
                    Metric::Bytes => "MB per second of values (log scale)",
                };
                let title = format!("{workload}, durability {}", section.durability);
                draw(&file, &title, unit, &bars)?;
                let _ = write!(md, "![{title}]({charts}/{file})\n\n");
            }
        }
        md.push_str(&t);
        md.push('\n');
    }
    if let Some(t) = latency_table(results) {
        let _ = write!(
            md,
            "## Produce-to-consume latency\n\n\
{rate} records a second for {secs} s, each sent on its own (`send`, durability `none`) from a task started when it is due, \
whether or not the previous send has returned; one stream-mode consumer polls the topic. Each record is timed \
from its `send` call to the moment `poll` returned it: the producer's write, the wake-up of the waiting \
poll (in-process on the embedded backends; Redis pub/sub and PostgreSQL `LISTEN`/`NOTIFY` on the servers) and \
the read. The servers' raw engines run the same open loop at the same rate, each record timed in the process \
from the writer's call to the moment the reader has it: Redis, `XADD` on one connection and a reader blocked in \
`XREAD BLOCK` on another; PostgreSQL, one statement inserting the row and calling `pg_notify` (one transaction, \
`synchronous_commit` off, a pool of 4 connections) and a reader that `LISTEN`s and, on each notification, \
`SELECT`s the rows past those it has. Each percentile is shown beside the raw engine's, and how many times it is.\n\n",
            rate = s.latency_rate,
            secs = s.latency_s,
        );
        let bars: Vec<Bar> = results
            .latency
            .iter()
            .map(|l| Bar {
                label: if l.raw {
                    format!(
                        "{} raw: {}",
                        l.backend,
                        crate::raw::label(&l.backend, "latency/produce_to_consume")
                            .unwrap_or("raw")
                    )
                } else {
                    l.backend.clone()
                },
                value: l.p99_us,
                raw: l.raw,
            })
            .collect();
        draw(
            "latency_p99.svg",
            "produce-to-consume latency, p99",
            "from send to poll (log scale)",
            &bars,
        )?;
        let _ = write!(
            md,
            "![produce-to-consume latency, p99]({charts}/latency_p99.svg)\n\n{t}\n"
        );
    }
    if !results.skipped.is_empty() {
        md.push_str("## Not measured\n\n¹ Each `n/a` above, and why:\n\n");
        for sk in &results.skipped {
            let _ = writeln!(
                md,
                "- {} `{}` (durability `{}`): {}",
                sk.backend, sk.workload, sk.durability, sk.why
            );
        }
        md.push('\n');
    }
    md.push_str(
        "## More\n\n\
- `conveyor bench --url <URL>` runs the same workloads, by the same names, against your own server or directory \
(`--workload` picks some; `--seconds` sets how long each runs).\n\
- `cargo bench -p conveyor-bench --bench queue` measures queue mode further (concurrent acks, messages in flight).\n\
- How the figures got where they are (the profiling and the changes it led to, per backend): \
[`performance-notes.md`](performance-notes.md) and each backend crate's docs.\n",
    );
    Ok(md)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::results::{Results, Settings, Skipped};

    fn row(workload: &str, durability: &str, backend: &str, raw: bool, ns: f64) -> Row {
        Row {
            workload: workload.into(),
            durability: durability.into(),
            backend: backend.into(),
            raw,
            messages: 100,
            bytes: 10_000,
            ns,
        }
    }

    fn sample() -> Results {
        Results {
            generated: "2026-11-26 01:00".into(),
            rows: vec![
                row("produce/batch_100", "none", "mmap", false, 50_000.0),
                row("produce/batch_100", "none", "mmap", true, 25_000.0),
                row("produce/batch_100", "none", "redis", false, 400_000.0),
                Row {
                    messages: 1,
                    bytes: 100,
                    ..row("produce/batch_1", "none", "mmap", false, 1_000.0)
                },
                Row {
                    messages: 1,
                    bytes: 100,
                    ..row("produce/batch_1", "none", "redis", false, 100_000.0)
                },
                row("read/from_start", "none", "redis", false, 1_000_000.0),
                row("read/deep", "none", "redis", false, 1_250_000.0),
                row("read/deep", "none", "redis", true, 250_000.0),
                row("queue/single_ack_1p", "none", "redis", false, 1_000_000.0),
                row("queue/single_ack_1p", "none", "redis", true, 500_000.0),
                row(
                    "queue/single_ack_1p_1c",
                    "none",
                    "redis",
                    false,
                    3_000_000.0,
                ),
            ],
            latency: vec![
                LatencyRow {
                    backend: "mmap".into(),
                    raw: false,
                    samples: 5000,
                    p50_us: 40.0,
                    p99_us: 120.0,
                    p999_us: 900.0,
                    max_us: 1500.0,
                },
                LatencyRow {
                    backend: "redis".into(),
                    raw: false,
                    samples: 5000,
                    p50_us: 300.0,
                    p99_us: 900.0,
                    p999_us: 2000.0,
                    max_us: 3000.0,
                },
                LatencyRow {
                    backend: "redis".into(),
                    raw: true,
                    samples: 5000,
                    p50_us: 100.0,
                    p99_us: 300.0,
                    p999_us: 500.0,
                    max_us: 800.0,
                },
            ],
            skipped: vec![Skipped {
                backend: "redis".into(),
                workload: "*".into(),
                durability: "always".into(),
                why: "no AOF".into(),
            }],
            settings: Settings {
                deep_records: 1_000_000,
                ..Settings::default()
            },
            ..Results::default()
        }
    }

    #[test]
    fn server_targets_say_met_or_missed_and_by_how_much() {
        let mut r = sample();
        let t = server_targets(&r);
        // Half the raw rate against a target of 70%; latency 3× against 2×.
        assert!(
            t.contains("| redis | queue, 1 partition, ack each (`queue/single_ack_1p`) | 100 K against 200 K: **50%** (at least 70%) | **missed** |"),
            "{t}"
        );
        assert!(t.contains("**3.00×** (at most 2×) | **missed** |"), "{t}");
        // Only targets with both figures in the run.
        assert!(!t.contains("postgres"), "{t}");
        r.rows.push(row(
            "queue/single_ack_1p",
            "none",
            "postgres",
            false,
            1_000_000.0,
        ));
        r.rows.push(row(
            "queue/single_ack_1p",
            "none",
            "postgres",
            true,
            1_500_000.0,
        ));
        let t = server_targets(&r);
        assert!(t.contains("**150%** (at least 60%) | met |"), "{t}");
        r.rows.clear();
        r.latency.clear();
        assert_eq!(server_targets(&r), "");
    }

    #[test]
    fn numbers_read_well() {
        assert_eq!(si(2_345_678.0), "2.35 M");
        assert_eq!(si(45_600.0), "45.6 K");
        assert_eq!(si(789.4), "789");
        assert_eq!(micros(850.0), "850 µs");
        assert_eq!(micros(12_345.0), "12.3 ms");
        assert_eq!(mb_per_second(87.54), "87.5 MB/s");
        assert_eq!(mb_per_second(1934.0), "1.93 GB/s");
    }

    #[test]
    fn the_page_shows_each_figure_and_its_share_of_raw() {
        let r = sample();
        let mut charts = Vec::new();
        let md = page_text(
            &r,
            "benchmarks",
            "docs/benchmarks/results.json",
            |file, _, _, bars| {
                charts.push((file.to_string(), bars.len()));
                Ok(())
            },
        )
        .unwrap();
        // 100 records per 50 µs = 2 M msg/s, half of raw's 4 M.
        assert!(
            md.contains("| `produce/batch_100` | 2.00 M msg/s · **50%** of 4.00 M | 250 K msg/s |"),
            "{md}"
        );
        assert!(
            md.contains("| `produce/batch_1` | 1.00 M msg/s | 10.0 K msg/s |"),
            "{md}"
        );
        assert!(
            md.contains("| mmap | 40.0 µs | 120 µs | 900 µs | 1.50 ms | 5000 | – |"),
            "{md}"
        );
        // A server's latency beside its raw engine's.
        assert!(
            md.contains(
                "| redis | 300 µs · **3.0×** raw's 100 µs | 900 µs · **3.0×** raw's 300 µs | 2.00 ms | 3.00 ms | 5000 | XADD + XREAD BLOCK |"
            ),
            "{md}"
        );
        // The new rows beside their raw baselines, and the targets read off them.
        assert!(
            md.contains("| `read/deep` | – | 80.0 K msg/s · **20%** of 400 K |"),
            "{md}"
        );
        assert!(
            md.contains("| `queue/single_ack_1p` | – | 100 K msg/s · **50%** of 200 K |"),
            "{md}"
        );
        assert!(md.contains("from offset 900,000 of a topic of 1,000,000 records"));
        assert!(
            md.contains(
                "4 against 1, single acks, one partition; target 2.5× or more): redis 3.0×"
            ),
            "{md}"
        );
        assert!(md.contains("target 90% or more): redis 80%"), "{md}");
        assert!(
            md.contains("- redis `*` (durability `always`): no AOF"),
            "{md}"
        );
        // The raw bar is drawn beside its backend's.
        assert!(
            charts.contains(&("produce_batch_100_none.svg".to_string(), 3)),
            "{charts:?}"
        );
        assert!(
            charts.contains(&("read_deep_none.svg".to_string(), 2)),
            "{charts:?}"
        );
        assert!(charts.contains(&("latency_p99.svg".to_string(), 3)));
        // The choice follows from the numbers: mmap is the faster here.
        assert!(
            md.contains("produce: redis") || md.contains("**mmap**"),
            "{md}"
        );
        assert!(
            md.contains("1.00 M msg/s on mmap and 10.0 K msg/s on redis"),
            "{md}"
        );
        // And the printed tables are the page's.
        for line in tables(&r).lines().filter(|l| l.starts_with('|')) {
            assert!(md.contains(line), "{line}");
        }
    }

    #[test]
    fn charts_are_svg() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.svg");
        chart(
            &path,
            "t",
            "msg/s",
            &[
                Bar {
                    label: "mmap".into(),
                    value: 2e6,
                    raw: false,
                },
                Bar {
                    label: "mmap raw".into(),
                    value: 4e6,
                    raw: true,
                },
                Bar {
                    label: "postgres".into(),
                    value: 900.0,
                    raw: false,
                },
            ],
            &si,
        )
        .unwrap();
        let svg = std::fs::read_to_string(path).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.contains("mmap raw") && svg.contains("2.00 M"),
            "{svg}"
        );
    }
}
