//! Produce-to-consume latency on Redis beside its raw baseline, in one
//! run: `conveyor::bench::latency` (records sent one by one at a fixed
//! rate, each timed from its `send` to the stream-mode `poll` that
//! returns it) on the backend, then the same on a bare Redis stream: a
//! reader blocked in `XREAD BLOCK` on a connection of its own, a writer
//! sending `XADD` at the same rate on another, each entry timed from its
//! `XADD` call to the `XREAD` reply that carries it.
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

use conveyor::redis::redis;
use conveyor_bench::fixture::Fixture;
use std::time::{Duration, Instant};

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
    let parsed = conveyor::BrokerUrl::parse(&url).unwrap();
    let (topology, _) = conveyor::redis::parse(&parsed).unwrap();
    assert!(
        !topology.is_cluster(),
        "the raw baseline here is for a standalone server"
    );
    let server = topology.seeds()[0].clone();
    for round in 0..rounds {
        let s = rt.block_on(async {
            let f = Fixture::open(&url).await.unwrap();
            let s =
                conveyor::bench::latency(&f.broker, rate, Duration::from_secs_f64(seconds), VALUE)
                    .await
                    .unwrap();
            drop(f);
            s
        });
        print("conveyor", round, s.p50, s.p99, s.samples);
        let (p50, p99, n) = rt.block_on(raw(&server, round, rate, seconds));
        print("raw XREAD BLOCK", round, p50, p99, n);
    }
}

fn print(what: &str, round: u32, p50: Duration, p99: Duration, n: u64) {
    println!(
        "round {round} {what:>16}: p50 {:.0} µs, p99 {:.0} µs ({n} records)",
        p50.as_secs_f64() * 1e6,
        p99.as_secs_f64() * 1e6
    );
}

/// The raw baseline: p50, p99 and the number of records.
async fn raw(server: &str, round: u32, rate: u32, seconds: f64) -> (Duration, Duration, u64) {
    let client = redis::Client::open(server).unwrap();
    let key = format!("rawlat.{}.{round}", std::process::id());
    let mut writer = client.get_multiplexed_async_connection().await.unwrap();
    let mut reader = client.get_multiplexed_async_connection().await.unwrap();
    let total = ((rate as f64 * seconds).ceil() as u64).max(1);
    let epoch = Instant::now();
    let read = tokio::spawn(async move {
        let key = format!("rawlat.{}.{round}", std::process::id());
        let mut samples = Vec::with_capacity(total as usize);
        let mut last = "0-0".to_string();
        while (samples.len() as u64) < total {
            let got: Option<redis::streams::StreamReadReply> = redis::cmd("XREAD")
                .arg("BLOCK")
                .arg(10_000)
                .arg("COUNT")
                .arg(1000)
                .arg("STREAMS")
                .arg(&key)
                .arg(&last)
                .query_async(&mut reader)
                .await
                .unwrap();
            let now = epoch.elapsed();
            let entries: Vec<_> = got
                .into_iter()
                .flat_map(|r| r.keys)
                .flat_map(|k| k.ids)
                .collect();
            assert!(!entries.is_empty(), "raw: XREAD timed out");
            for e in entries {
                let v: Vec<u8> = e.get("v").unwrap();
                let mut sent = [0u8; 8];
                sent.copy_from_slice(&v[..8]);
                samples.push(now.saturating_sub(Duration::from_nanos(u64::from_le_bytes(sent))));
                last = e.id;
            }
        }
        samples
    });
    let every = Duration::from_secs_f64(1.0 / rate as f64);
    let mut sends = Vec::with_capacity(total as usize);
    for i in 0..total {
        tokio::time::sleep_until(tokio::time::Instant::from_std(epoch) + every * i as u32).await;
        let (mut w, key) = (writer.clone(), key.clone());
        sends.push(tokio::spawn(async move {
            let mut value = vec![0u8; VALUE];
            let sent = epoch.elapsed().as_nanos() as u64;
            value[..8].copy_from_slice(&sent.to_le_bytes());
            redis::cmd("XADD")
                .arg(&key)
                .arg("*")
                .arg("v")
                .arg(value)
                .query_async::<String>(&mut w)
                .await
                .unwrap();
        }));
    }
    for s in sends {
        s.await.unwrap();
    }
    let mut samples = read.await.unwrap();
    redis::cmd("UNLINK")
        .arg(&key)
        .query_async::<i64>(&mut writer)
        .await
        .unwrap();
    samples.sort();
    let at =
        |q: f64| samples[((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1];
    (at(0.50), at(0.99), samples.len() as u64)
}
