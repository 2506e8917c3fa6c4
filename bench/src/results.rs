//! What a comparison run measured, as saved in `docs/benchmarks/results.json`
//! (the page is made from this file alone, so it can be made again
//! without running anything: `--from`).

use serde::{Deserialize, Serialize};

/// One comparison run.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Results {
    /// When the run ended (UTC, `YYYY-MM-DD HH:MM`).
    pub generated: String,
    /// The machine it ran on.
    pub machine: Machine,
    /// How it measured.
    pub settings: Settings,
    /// One row per backend (or raw engine), workload and durability.
    pub rows: Vec<Row>,
    /// Produce-to-consume latency per backend.
    pub latency: Vec<LatencyRow>,
    /// What was not measured, and why.
    pub skipped: Vec<Skipped>,
}

/// The machine a run measured on.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Machine {
    /// CPU model.
    pub cpu: String,
    /// Cores the process may use.
    pub cores: usize,
    /// Memory in GiB.
    pub memory_gib: f64,
    /// Kernel release.
    pub kernel: String,
    /// `rustc --version`.
    pub rustc: String,
    /// Median time of a 100-byte append plus `fdatasync` to a file in the
    /// temporary directory, in microseconds: what a synced write costs on
    /// this disk.
    pub fdatasync_us: f64,
    /// Each server's version (`redis 7.0.15`, `postgres 15.19`).
    pub servers: Vec<String>,
}

/// How a run measured.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Settings {
    /// The command that made the results.
    pub command: String,
    /// Criterion's warm-up per benchmark, seconds.
    pub warm_up_s: f64,
    /// Criterion's measurement time per benchmark, seconds.
    pub measurement_s: f64,
    /// Criterion's samples per benchmark.
    pub sample_size: usize,
    /// Records per second of the latency workload.
    pub latency_rate: u32,
    /// Seconds the latency workload sends for.
    pub latency_s: f64,
    /// A short smoke run (CI): figures not meant for the page.
    pub quick: bool,
    /// Records of the topic `read/deep` read (0 in results made before
    /// it existed).
    #[serde(default)]
    pub deep_records: u64,
}

/// One measured benchmark.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Row {
    /// `family/case`, as `conveyor bench` names it.
    pub workload: String,
    /// `none` or `always`.
    pub durability: String,
    /// The backend (`mmap`, ...); for a raw engine, the backend it is the
    /// baseline of.
    pub backend: String,
    /// The backend's raw engine, not the backend.
    pub raw: bool,
    /// Messages per iteration.
    pub messages: u64,
    /// Value bytes per iteration.
    pub bytes: u64,
    /// Criterion's median time per iteration, nanoseconds.
    pub ns: f64,
}

impl Row {
    /// Messages per second.
    pub fn per_second(&self) -> f64 {
        self.messages as f64 * 1e9 / self.ns.max(1e-9)
    }

    /// Value megabytes (10^6 bytes) per second.
    pub fn mb_per_second(&self) -> f64 {
        self.bytes as f64 * 1e3 / self.ns.max(1e-9)
    }
}

/// One backend's produce-to-consume latency.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LatencyRow {
    /// The backend.
    pub backend: String,
    /// The backend's raw engine (`conveyor_bench::raw_latency`), not the
    /// backend.
    #[serde(default)]
    pub raw: bool,
    /// Records timed.
    pub samples: u64,
    /// Median, microseconds.
    pub p50_us: f64,
    /// 99th percentile, microseconds.
    pub p99_us: f64,
    /// 99.9th percentile, microseconds.
    pub p999_us: f64,
    /// Slowest, microseconds.
    pub max_us: f64,
}

/// Something the run did not measure.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Skipped {
    /// The backend.
    pub backend: String,
    /// The workload (`family/case`), or `*` for all of them.
    pub workload: String,
    /// `none` or `always`.
    pub durability: String,
    /// Why.
    pub why: String,
}

impl Results {
    /// The row of `backend` (its raw engine when `raw`) for `workload`
    /// at `durability`.
    pub fn row(&self, workload: &str, durability: &str, backend: &str, raw: bool) -> Option<&Row> {
        self.rows.iter().find(|r| {
            r.workload == workload
                && r.durability == durability
                && r.backend == backend
                && r.raw == raw
        })
    }

    /// The backends measured, in the order first seen.
    pub fn backends(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for b in self
            .rows
            .iter()
            .map(|r| &r.backend)
            .chain(self.latency.iter().map(|l| &l.backend))
            .chain(self.skipped.iter().map(|s| &s.backend))
        {
            if !out.contains(b) {
                out.push(b.clone());
            }
        }
        out
    }
}
