//! # conveyor-bench
//!
//! The backend comparison: every workload of `conveyor::bench`'s
//! catalogue on every compiled-in backend (memory, mmap, rocksdb, redis,
//! postgres), each beside the backend's raw engine where it has one
//! (produce, read, queue and latency: [`raw`], `raw_latency`),
//! measured by criterion in one run; then `docs/benchmarks.md`, its charts
//! and `docs/benchmarks/results.json` made from what the run printed.
//!
//! ```text
//! scripts/bench-report                       # everything (release build, all backends)
//! scripts/bench-report --workload produce    # some workloads (the page shows what ran)
//! scripts/bench-report --workload latency --merge   # rerun some, keep the rest
//! scripts/bench-report --from docs/benchmarks/results.json   # remake the page only
//! ```
//!
//! The server backends use the local servers: `CONVEYOR_REDIS_URL`
//! (else `redis://127.0.0.1:6379`) and `CONVEYOR_POSTGRES_URL` (else
//! `postgres://postgres@127.0.0.1:5432/test`); each benchmark works in a
//! namespace or schema of its own and deletes it. Redis's
//! `durability=always` needs a server with `appendfsync always`:
//! `CONVEYOR_BENCH_REDIS_ALWAYS_URL`, which the script sets to a private
//! server it starts.

#![deny(missing_docs)]

pub mod fixture;
pub mod machine;
pub mod raw;
#[cfg(any(feature = "redis", feature = "postgres"))]
pub mod raw_latency;
pub mod raw_queue;
pub mod report;
pub mod results;
