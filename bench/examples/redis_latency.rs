//! Produce-to-consume latency on Redis beside its raw baseline, in one
//! run: `conveyor::bench::latency` (records sent one by one at a fixed
//! rate, each timed from its `send` to the stream-mode `poll` that
//! returns it) on the backend, then the same on a bare Redis stream: a
//! reader blocked in `XREAD BLOCK` on a connection of its own, a writer
//! sending `XADD` at the same rate on another, each entry timed from its
//! `XADD` call to the `XREAD` reply that carries it
//! (`conveyor_bench::raw_latency::redis`, which the comparison's latency
//! table uses too). Rounds of both, where the comparison runs one.
//!
//! ```text
//! CONVEYOR_BENCH_URL='redis://127.0.0.1:6379/?namespace=bench' \
//!   cargo run --release -p conveyor-bench --features redis --example redis_latency -- [rate] [seconds] [rounds]
//! ```
//!
//! Defaults: 1,000 records a second, 5 seconds, 3 rounds (each round
//! measures the backend, then the raw stream); 100-byte values.

// An example: a failed unwrap aborts the run, which is what we want.
#![allow(clippy::unwrap_used)]

use conveyor_bench::fixture::Fixture;
use conveyor_bench::raw::redis_server;
use std::time::Duration;

const VALUE: usize = 100;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rate: u32 = args.first().map_or(1000, |s| s.parse().unwrap());
    let seconds: f64 = args.get(1).map_or(5.0, |s| s.parse().unwrap());
    let rounds: u32 = args.get(2).map_or(3, |s| s.parse().unwrap());
    let url = std::env::var("CONVEYOR_BENCH_URL")
        .unwrap_or_else(|_| "redis://127.0.0.1:6379/?namespace=bench".into());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let server = redis_server(&url)
        .unwrap()
        .expect("the raw baseline here is for a standalone server");
    let duration = Duration::from_secs_f64(seconds);
    for round in 0..rounds {
        let s = rt.block_on(async {
            let f = Fixture::open(&url).await.unwrap();
            conveyor::bench::latency(&f.broker, rate, duration, VALUE)
                .await
                .unwrap()
        });
        print("conveyor", round, s);
        let s = rt
            .block_on(conveyor_bench::raw_latency::redis(
                &server, rate, duration, VALUE,
            ))
            .unwrap();
        print("raw XREAD BLOCK", round, s);
    }
}

fn print(what: &str, round: u32, s: conveyor::bench::LatencySummary) {
    println!(
        "round {round} {what:>16}: p50 {:.0} µs, p99 {:.0} µs ({} records)",
        s.p50.as_secs_f64() * 1e6,
        s.p99.as_secs_f64() * 1e6,
        s.samples
    );
}
