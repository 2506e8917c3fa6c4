//! RocksDB appends against the raw RocksDB baseline, measured in paired
//! rounds so that a busy host slows both sides of each ratio alike.
//!
//! The three workloads of the former `benches/throughput.rs` (`append/batch/100`,
//! `append/batch_in_task/100`, `append/raw_rocksdb_batch/100`): 100-byte
//! values in batches of 100 to one partition, durability `none` (or the
//! URL's), and the same keys and values as plain `WriteBatch`es of 100
//! through the `rocksdb` crate (the comparison's raw RocksDB engine,
//! `conveyor_bench::raw`). Each round runs `--iters` batches of each,
//! in rotating order; the report is the median per-batch time of each and
//! the median of the per-round ratios to raw.
//!
//! ```text
//! cargo run --profile bench -p conveyor-bench --features rocksdb --example rocksdb_append_ratio -- --rounds 60
//! ```

// A measurement tool: a failed unwrap aborts the run, which is what we want.
#![allow(clippy::unwrap_used)]

use conveyor::{Record, TopicConfig};
use conveyor_bench::raw::Raw;
use std::time::{Duration, Instant};

const VALUE: usize = 100;
const BATCH: usize = 100;

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map_or(default, |v| v.parse().expect("a number"))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn quartiles(v: &[f64]) -> (f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    (s[s.len() / 4], s[s.len() * 3 / 4])
}

fn main() {
    let rounds = arg("--rounds", 60);
    let iters = arg("--iters", 200);
    let url = std::env::var("CONVEYOR_BENCH_URL").unwrap_or_else(|_| "rocksdb://{tmp}".into());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let url = url.replace("{tmp}", &dir.path().join("broker").display().to_string());
    let broker = rt.block_on(conveyor::open(&url)).unwrap();
    rt.block_on(broker.create_topic("inline", TopicConfig::new(1)))
        .unwrap();
    rt.block_on(broker.create_topic("task", TopicConfig::new(1)))
        .unwrap();
    let producer = rt.block_on(broker.producer()).unwrap();
    let value = bytes::Bytes::from(vec![7u8; VALUE]);

    let mut raw_db = rt
        .block_on(Raw::open("rocksdb", "", false))
        .unwrap()
        .expect("a raw RocksDB engine");
    let raw_value = vec![7u8; VALUE];

    let inline = |n: usize| -> Duration {
        rt.block_on(async {
            let started = Instant::now();
            for _ in 0..n {
                let records = (0..BATCH).map(|_| Record::new(value.clone())).collect();
                producer.send_batch("inline", records).await.unwrap();
            }
            started.elapsed()
        })
    };
    let in_task = |n: usize| -> Duration {
        let (producer, value) = (producer.clone(), value.clone());
        rt.block_on(async move {
            tokio::spawn(async move {
                let started = Instant::now();
                for _ in 0..n {
                    let records = (0..BATCH).map(|_| Record::new(value.clone())).collect();
                    producer.send_batch("task", records).await.unwrap();
                }
                started.elapsed()
            })
            .await
            .unwrap()
        })
    };
    let mut raw =
        |n: usize| -> Duration { raw_db.produce(&rt, n as u64, BATCH, &raw_value).unwrap() };

    // Warm up (memtables, the first flushes).
    inline(iters);
    in_task(iters);
    raw(iters);
    let per_batch = |d: Duration| d.as_secs_f64() * 1e6 / iters as f64;
    let (mut t_inline, mut t_task, mut t_raw) = (vec![], vec![], vec![]);
    let (mut r_inline, mut r_task) = (vec![], vec![]);
    for round in 0..rounds {
        let mut times = [0.0; 3];
        for k in 0..3 {
            let which = (round + k) % 3;
            times[which] = per_batch(match which {
                0 => inline(iters),
                1 => in_task(iters),
                _ => raw(iters),
            });
        }
        t_inline.push(times[0]);
        t_task.push(times[1]);
        t_raw.push(times[2]);
        r_inline.push(times[2] / times[0]);
        r_task.push(times[2] / times[1]);
    }
    println!("{rounds} rounds of {iters} batches of {BATCH} x {VALUE} B each; url {url}");
    for (name, t, r) in [
        ("append/batch/100 (block_on)", &t_inline, Some(&r_inline)),
        ("append/batch_in_task/100", &t_task, Some(&r_task)),
        ("raw_rocksdb_batch/100", &t_raw, None),
    ] {
        let m = median(t.clone());
        print!(
            "{name:30} median {m:7.1} us = {:5.2} M msg/s",
            BATCH as f64 / m
        );
        match r {
            Some(r) => println!(
                "   raw/append median {:.0}% (quartiles {:.0}-{:.0}%)",
                100.0 * median(r.clone()),
                100.0 * quartiles(r).0,
                100.0 * quartiles(r).1
            ),
            None => println!(),
        }
    }
}
