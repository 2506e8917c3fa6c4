//! The cost of metrics and spans (`conveyor::observe`), on the two
//! embedded backends, where it shows most (no network round trip to hide
//! it): each workload three times, on the backend opened directly
//! (`plain`), wrapped by `observe` as `conveyor::open` returns it with no
//! metrics recorder installed (`observed`), and wrapped with a Prometheus
//! recorder installed (`recorded`, `metrics-exporter-prometheus`, no HTTP
//! listener; the process's recorder from then on, so the variants run in
//! this order). No `tracing` subscriber listens, as in an application
//! that does not export spans.
//!
//! - `observe/{backend}/produce_batch_100/{variant}`: one `send_batch` of
//!   100 records of 100 bytes (4 partitions);
//! - `observe/{backend}/queue_ack_single/{variant}`: one consumer polls up
//!   to 100 and acks them one by one (queue mode), per message.
//!
//! ```text
//! cargo bench -p conveyor-bench --bench observe
//! ```

// A benchmark: a failed unwrap aborts the run, which is what we want.
#![allow(clippy::unwrap_used)]

use conveyor::{Broker, BrokerOptions, GroupConfig, Record, TopicConfig};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

const VALUE: usize = 100;
const BATCH: usize = 100;
const VARIANTS: [&str; 3] = ["plain", "observed", "recorded"];

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// A fresh broker of `backend` for `variant` (the temporary directory
/// lives as long as the broker is used).
async fn open(backend: &str, variant: &str, dir: &tempfile::TempDir) -> Arc<dyn Broker> {
    let plain: Arc<dyn Broker> = match backend {
        "memory" => Arc::new(conveyor::memory::open_default()),
        _ => Arc::new(
            conveyor::mmap::open(
                dir.path(),
                BrokerOptions::default(),
                conveyor::mmap::MmapOptions::default(),
            )
            .await
            .unwrap(),
        ),
    };
    match variant {
        "plain" => plain,
        "observed" => conveyor::observe::observe(plain, "bench"),
        _ => {
            static RECORDER: Once = Once::new();
            RECORDER.call_once(|| {
                let recorder =
                    metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
                metrics::set_global_recorder(recorder).unwrap();
            });
            conveyor::observe::observe(plain, "bench")
        }
    }
}

fn records() -> Vec<Record> {
    let value = bytes::Bytes::from(vec![7u8; VALUE]);
    (0..BATCH).map(|_| Record::new(value.clone())).collect()
}

fn bench(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("observe");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(4));
    for backend in ["memory", "mmap"] {
        for variant in VARIANTS {
            let dir = tempfile::tempdir().unwrap();
            let broker = rt.block_on(open(backend, variant, &dir));
            rt.block_on(broker.create_topic("t", TopicConfig::new(4)))
                .unwrap();
            let producer = rt.block_on(broker.producer()).unwrap();
            group.throughput(Throughput::Elements(BATCH as u64));
            group.bench_function(
                BenchmarkId::new(format!("{backend}/produce_batch_100"), variant),
                |b| {
                    b.iter_custom(|iters| {
                        rt.block_on(async {
                            let started = Instant::now();
                            for _ in 0..iters {
                                producer.send_batch("t", records()).await.unwrap();
                            }
                            started.elapsed()
                        })
                    })
                },
            );

            // Queue mode, one ack per message: records are appended
            // untimed, then polled and acked under the clock.
            rt.block_on(broker.create_topic("q", TopicConfig::new(4)))
                .unwrap();
            let consumer = rt
                .block_on(broker.consumer("g", &["q"], GroupConfig::queue()))
                .unwrap();
            let acked = AtomicU64::new(0);
            group.throughput(Throughput::Elements(1));
            group.bench_function(
                BenchmarkId::new(format!("{backend}/queue_ack_single"), variant),
                |b| {
                    b.iter_custom(|iters| {
                        let (producer, consumer, acked) = (&producer, &consumer, &acked);
                        rt.block_on(async move {
                            let mut left = iters;
                            while left > 0 {
                                let n = left.min(1000) as usize;
                                let value = bytes::Bytes::from(vec![7u8; VALUE]);
                                let batch = (0..n).map(|_| Record::new(value.clone())).collect();
                                producer.send_batch("q", batch).await.unwrap();
                                left -= n as u64;
                            }
                            let started = Instant::now();
                            let mut done = 0;
                            while done < iters {
                                let want = (iters - done).min(100) as usize;
                                let got =
                                    consumer.poll(want, Duration::from_secs(5)).await.unwrap();
                                for m in &got {
                                    consumer.ack(m).await.unwrap();
                                }
                                done += got.len() as u64;
                            }
                            acked.fetch_add(done, Ordering::Relaxed);
                            started.elapsed()
                        })
                    })
                },
            );
            rt.block_on(consumer.close()).unwrap();
            rt.block_on(broker.close()).unwrap();
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
