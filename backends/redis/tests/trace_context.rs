//! W3C trace context across a real process boundary, on Redis (the shared
//! server, `CONVEYOR_REDIS_URL`, else the local default): a child process
//! sends a record inside its own trace; this process consumes it with the
//! runner, which dead-letters it; the DLQ is redriven; the runner handles
//! it again. Both `process` spans, recorded by an in-memory OpenTelemetry
//! exporter, are children of the child's `send` span, in its trace, and
//! the `receive` spans link to it. The brokers are wrapped by
//! `conveyor_core::observe`, as `conveyor::open` wraps them, and the
//! `opentelemetry` feature is on. The test works in a namespace of its own,
//! deleted at the end.

// Test code: a failed unwrap is a failed test, with its line.
#![allow(clippy::unwrap_used)]

mod common;

use conveyor_core::prelude::*;
use conveyor_core::runner::{CancellationToken, HandlerError, Runner, RunnerConfig};
use conveyor_core::{Broker, BrokerOptions, DlqPolicy, GroupConfig, Message, Record, TopicConfig};
use conveyor_redis::Topology;
use opentelemetry::trace::{SpanId, TraceId, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing_subscriber::layer::SubscriberExt;

/// Set in the child: the namespace to send into.
const CHILD_ENV: &str = "CONVEYOR_TRACE_CHILD";
const TOPIC: &str = "orders";
const GROUP: &str = "billing";

/// Spans go to an in-memory exporter, through `tracing-opentelemetry`,
/// for the whole process.
fn record_spans() -> (InMemorySpanExporter, SdkTracerProvider) {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("trace_context"));
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(layer))
        .expect("the only subscriber of this process");
    (exporter, provider)
}

async fn observed(ns: &str) -> Arc<dyn Broker> {
    let topology = Topology::single(common::url());
    let broker = common::open_dyn(&topology, ns, BrokerOptions::default())
        .await
        .unwrap();
    conveyor_core::observe::observe(broker, "redis")
}

fn finished(exporter: &InMemorySpanExporter, provider: &SdkTracerProvider) -> Vec<SpanData> {
    provider.force_flush().unwrap();
    exporter.get_finished_spans().unwrap()
}

/// The child: sends one record inside a trace of its own and prints
/// `@@ SEND <trace id> <span id>` of its `send` span. Does nothing in a
/// normal run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_child() {
    let Ok(ns) = std::env::var(CHILD_ENV) else {
        return;
    };
    let (exporter, provider) = record_spans();
    let broker = observed(&ns).await;
    let producer = broker.producer().await.unwrap();
    {
        let order = tracing::info_span!("place order");
        let _entered = order.enter();
        producer.send(TOPIC, Record::new("order-1")).await.unwrap();
    }
    let spans = finished(&exporter, &provider);
    let send = spans
        .iter()
        .find(|s| s.name == format!("send {TOPIC}"))
        .unwrap_or_else(|| panic!("no send span among {spans:?}"));
    println!(
        "@@ SEND {} {}",
        send.span_context.trace_id(),
        send.span_context.span_id()
    );
    broker.close().await.unwrap();
}

/// Run the child and read its send span's ids.
fn send_in_another_process(ns: &str) -> (TraceId, SpanId) {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "trace_child",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(CHILD_ENV, ns)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find_map(|l| l.split_once("@@ SEND ").map(|(_, ids)| ids))
        .unwrap_or_else(|| panic!("the child printed no send span: {stdout}"));
    let (trace, span) = line.trim().split_once(' ').unwrap();
    (
        TraceId::from_hex(trace).unwrap(),
        SpanId::from_hex(span).unwrap(),
    )
}

/// Run `runner` until `done` is cancelled (waiting at most 120 s).
async fn run_until(
    runner: Runner,
    handler: impl conveyor_core::runner::Handler,
    done: CancellationToken,
) {
    let deadline = tokio::time::timeout(
        Duration::from_secs(120),
        runner.run_until_cancelled(handler, done),
    );
    deadline
        .await
        .expect("the runner finished in time")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_spans_are_children_of_the_send_span_of_another_process_also_after_a_redrive() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let ns = common::unique_ns("tc");
    let _cleanup = DropNamespace(ns.clone());
    let (exporter, provider) = record_spans();
    let broker = observed(&ns).await;
    broker
        .create_topic(TOPIC, TopicConfig::new(1))
        .await
        .unwrap();
    let config = GroupConfig::queue().with_dlq(DlqPolicy::new(1));
    let dlq = config.dlq.topic_for(TOPIC, GROUP);

    let (trace, send) = send_in_another_process(&ns);

    // First delivery: the handler fails, and with one delivery allowed
    // the message goes to the DLQ.
    let consumer = broker
        .consumer(GROUP, &[TOPIC], config.clone())
        .await
        .unwrap();
    let done = CancellationToken::new();
    let watch = {
        let (broker, dlq, done) = (broker.clone(), dlq.clone(), done.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            loop {
                if let Ok(d) = broker.describe_topic(&dlq).await {
                    if d.partitions.iter().any(|p| p.log_end > p.log_start) {
                        done.cancel();
                        return;
                    }
                }
                assert!(
                    started.elapsed() < Duration::from_secs(120),
                    "nothing reached {dlq}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let failing = |_m: Message| async { Err::<(), _>(HandlerError::new("card declined")) };
    run_until(
        Runner::new(consumer, RunnerConfig::default()),
        failing,
        done,
    )
    .await;
    watch.await.unwrap();

    // Redrive, then the second delivery succeeds.
    assert_eq!(broker.redrive(&dlq, None).await.unwrap(), 1);
    let consumer = broker.consumer(GROUP, &[TOPIC], config).await.unwrap();
    let done = CancellationToken::new();
    let handled = Arc::new(AtomicU32::new(0));
    let succeeding = {
        let (done, handled) = (done.clone(), handled.clone());
        move |_m: Message| {
            let (done, handled) = (done.clone(), handled.clone());
            async move {
                handled.fetch_add(1, Ordering::SeqCst);
                done.cancel();
                Ok::<(), HandlerError>(())
            }
        }
    };
    run_until(
        Runner::new(consumer, RunnerConfig::default()),
        succeeding,
        done,
    )
    .await;
    assert_eq!(handled.load(Ordering::SeqCst), 1);

    let spans = finished(&exporter, &provider);
    let process: Vec<&SpanData> = spans
        .iter()
        .filter(|s| s.name == format!("process {TOPIC}"))
        .collect();
    assert_eq!(
        process.len(),
        2,
        "one failed and one redriven process span: {spans:#?}"
    );
    for span in &process {
        assert_eq!(span.span_context.trace_id(), trace, "{span:#?}");
        assert_eq!(span.parent_span_id, send, "{span:#?}");
    }
    assert!(
        matches!(
            process[0].status,
            opentelemetry::trace::Status::Error { .. }
        ),
        "the failed handling is an error: {:#?}",
        process[0]
    );
    let receive_links: Vec<_> = spans
        .iter()
        .filter(|s| s.name == "receive")
        .flat_map(|s| s.links.iter())
        .filter(|l| l.span_context.span_id() == send && l.span_context.trace_id() == trace)
        .collect();
    assert!(
        receive_links.len() >= 2,
        "each receive of the message links to its send span: {spans:#?}"
    );
    broker.close().await.unwrap();
}

/// Deletes the test's namespace when the test ends, passed or failed.
struct DropNamespace(String);

impl Drop for DropNamespace {
    fn drop(&mut self) {
        let ns = self.0.clone();
        // A runtime of its own: the test's may be shutting down.
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                rt.block_on(common::drop_ns(&Topology::single(common::url()), &ns));
            }
        })
        .join();
    }
}
