//! The notification system from every system-design interview, built on
//! Conveyor.
//!
//! An order service publishes a Black Friday burst of events (order placed,
//! payment failed, shipment updated), keyed by order id, into
//! `orders.events`. It never waits for the slow channels: the queue absorbs
//! the spike. Three channel services (email, SMS, push) are queue-mode
//! groups with several workers each, sending through simulated providers of
//! different speeds; the SMS provider fails some sends transiently (retried
//! with backoff) and rejects a few numbers outright (dead-lettered after
//! `max_deliveries`). Handlers are idempotent through the backend's
//! `IdempotencyStore`; workers that crash after sending but before acking
//! are injected, and no customer gets a notification twice. A loyalty
//! service reads in stream mode and keeps per-customer points in order.
//! When the burst drains, the DLQ is inspected, the "bug" is fixed, the DLQ
//! is redriven, and everything is delivered.
//!
//! ```text
//! cargo run --release --example notification_system
//! cargo run --release --example notification_system -- --url memory:// --events 20000
//! ```
//!
//! Exits non-zero if any notification was lost or sent twice.
//!
//! With `--metrics 127.0.0.1:9898` it exports Conveyor's metrics for
//! Prometheus at `http://127.0.0.1:9898/metrics` while it runs, and keeps
//! serving them after the summary until stdin closes (Ctrl-D) or Ctrl-C:
//!
//! ```text
//! cargo run --release --example notification_system -- --metrics 127.0.0.1:9898
//! curl -s 127.0.0.1:9898/metrics | grep messaging_client_sent_messages
//! ```

use clap::Parser;
use conveyor::prelude::*;
use conveyor::runner::{
    event_id, CancellationToken, Handler, HandlerError, Idempotent, Runner, RunnerConfig,
};
use conveyor::{
    Broker, DlqPolicy, GroupConfig, IdempotencyStore, Message, Record, RetryBackoff, TopicConfig,
};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const TOPIC: &str = "orders.events";

/// A Black Friday burst of order events, fanned out to email, SMS and push
/// workers (queue-mode groups) and a loyalty service (a stream-mode group),
/// through transient failures, worker crashes and dead letters that are
/// redriven once the bug is fixed. Prints a live view of each group's lag,
/// then checks that no notification was lost or sent twice (exit 1 if one
/// was). Runs on any Conveyor backend.
#[derive(Parser, Debug, Clone)]
#[command(long_about = None)]
struct Args {
    /// Broker URL (`memory://`, `mmap:///dir`, ...). Default: the embedded
    /// default backend in a temporary directory.
    #[arg(long, env = "CONVEYOR_URL")]
    url: Option<String>,
    /// Events the order service publishes in its burst.
    #[arg(long, default_value_t = 100_000)]
    events: u64,
    /// Partitions of `orders.events`.
    #[arg(long, default_value_t = 8)]
    partitions: u32,
    /// Workers per channel service.
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// Share of SMS sends that fail transiently (then succeed on retry).
    #[arg(long, default_value_t = 0.05)]
    sms_transient_failure_rate: f64,
    /// Share of SMS events whose number the provider rejects until the bug
    /// is fixed (dead-lettered, then redriven).
    #[arg(long, default_value_t = 0.002)]
    sms_permanent_failure_rate: f64,
    /// Worker crashes to inject (after sending, before acking).
    #[arg(long, default_value_t = 20)]
    crashes: u32,
    /// Random seed (events, failures).
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
    /// No live view.
    #[arg(long)]
    quiet: bool,
    /// Export Conveyor's metrics for Prometheus at `http://ADDR/metrics`,
    /// and keep serving them after the summary until stdin closes.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<std::net::SocketAddr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
enum Kind {
    OrderPlaced,
    PaymentFailed,
    ShipmentUpdated,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::OrderPlaced => "order_placed",
            Kind::PaymentFailed => "payment_failed",
            Kind::ShipmentUpdated => "shipment_updated",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Event {
    id: u64,
    order: u64,
    customer: u32,
    kind: Kind,
    /// Position of the event within its order (0, 1, ...).
    seq: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Channel {
    Email,
    Sms,
    Push,
}

impl Channel {
    const ALL: [Channel; 3] = [Channel::Email, Channel::Sms, Channel::Push];
    fn group(self) -> &'static str {
        match self {
            Channel::Email => "email",
            Channel::Sms => "sms",
            Channel::Push => "push",
        }
    }
    fn wants(self, kind: Kind) -> bool {
        match self {
            Channel::Email => true,
            Channel::Sms => matches!(kind, Kind::PaymentFailed | Kind::ShipmentUpdated),
            Channel::Push => matches!(kind, Kind::OrderPlaced | Kind::ShipmentUpdated),
        }
    }
    fn latency(self) -> Duration {
        match self {
            Channel::Email => Duration::from_millis(2),
            Channel::Sms => Duration::from_millis(3),
            Channel::Push => Duration::from_millis(1),
        }
    }
}

/// A simulated notification provider: it records what it delivered.
struct Provider {
    channel: Channel,
    transient_rate: f64,
    permanent_rate: f64,
    fixed: Arc<AtomicBool>,
    delivered: Mutex<HashMap<u64, u32>>,
}

/// A stable pseudo-random number in [0, 1) for an event id.
fn unit(id: u64, salt: u64) -> f64 {
    let mut z = id.wrapping_add(salt).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)) as f64 / u64::MAX as f64
}

impl Provider {
    fn rejects(&self, event: &Event) -> bool {
        self.channel == Channel::Sms && unit(event.id, 1) < self.permanent_rate
    }

    async fn send(&self, event: &Event) -> Result<(), HandlerError> {
        tokio::time::sleep(self.channel.latency()).await;
        if self.rejects(event) && !self.fixed.load(Ordering::Acquire) {
            return Err(HandlerError::new(format!(
                "provider rejected customer {}: invalid phone number",
                event.customer
            )));
        }
        if self.channel == Channel::Sms && rand::thread_rng().gen_bool(self.transient_rate) {
            return Err(HandlerError::new("provider timeout"));
        }
        *self
            .delivered
            .lock()
            .expect("no worker panicked holding the lock")
            .entry(event.id)
            .or_insert(0) += 1;
        Ok(())
    }
}

/// An event that does not decode never will: straight to the DLQ.
fn decode(message: &Message) -> Result<Event, HandlerError> {
    message.json().map_err(HandlerError::permanent)
}

/// The channel service's handler: send if the channel wants the event.
fn channel_handler(provider: Arc<Provider>) -> impl Handler {
    move |message: Message| {
        let provider = provider.clone();
        async move {
            let event = decode(&message)?;
            if provider.channel.wants(event.kind) {
                provider.send(&event).await?;
            }
            Ok(())
        }
    }
}

/// A worker that takes a few messages, sends them, and dies before acking.
async fn crash_once(
    broker: &Arc<dyn Broker>,
    store: &Arc<dyn IdempotencyStore>,
    provider: &Provider,
    config: GroupConfig,
) -> conveyor::Result<()> {
    let consumer = broker
        .consumer(provider.channel.group(), &[TOPIC], config)
        .await?;
    for message in consumer.poll(8, Duration::from_millis(50)).await? {
        let Ok(event) = decode(&message) else {
            continue;
        };
        if !provider.channel.wants(event.kind) {
            continue;
        }
        let id = event_id(provider.channel.group(), &message).expect("events carry an id");
        if store.first_seen(&id, Duration::from_secs(3600)).await?
            && provider.send(&event).await.is_err()
        {
            store.forget(&id).await?;
        }
    }
    drop(consumer); // crash: no ack, no nack; the leases come back
    Ok(())
}

/// The loyalty service: per-customer points, applied in per-order sequence.
#[derive(Default)]
struct Loyalty {
    points: Mutex<HashMap<u32, i64>>,
    last_seq: Mutex<HashMap<u64, u32>>,
    out_of_order: AtomicU64,
}

fn points(kind: Kind) -> i64 {
    match kind {
        Kind::OrderPlaced => 10,
        Kind::PaymentFailed => -10,
        Kind::ShipmentUpdated => 1,
    }
}

fn loyalty_handler(loyalty: Arc<Loyalty>) -> impl Handler {
    move |message: Message| {
        let loyalty = loyalty.clone();
        async move {
            let event = decode(&message)?;
            let mut last = loyalty
                .last_seq
                .lock()
                .expect("no worker panicked holding the lock");
            let expected = last.get(&event.order).map_or(0, |s| s + 1);
            if event.seq < expected {
                return Ok(()); // seen before (redelivery or redrive)
            }
            if event.seq > expected {
                loyalty.out_of_order.fetch_add(1, Ordering::Relaxed);
            }
            last.insert(event.order, event.seq);
            *loyalty
                .points
                .lock()
                .expect("no worker panicked holding the lock")
                .entry(event.customer)
                .or_insert(0) += points(event.kind);
            Ok(())
        }
    }
}

fn generate(args: &Args) -> Vec<Event> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed);
    let customers = (args.events / 20).max(1) as u32;
    let mut events = Vec::with_capacity(args.events as usize);
    let mut order = 0u64;
    while (events.len() as u64) < args.events {
        order += 1;
        let customer = rng.gen_range(0..customers);
        let mut kinds = vec![Kind::OrderPlaced];
        if rng.gen_bool(0.1) {
            kinds.push(Kind::PaymentFailed);
        }
        kinds.push(Kind::ShipmentUpdated);
        if rng.gen_bool(0.5) {
            kinds.push(Kind::ShipmentUpdated);
        }
        for (seq, kind) in kinds.into_iter().enumerate() {
            if events.len() as u64 == args.events {
                break;
            }
            events.push(Event {
                id: events.len() as u64,
                order,
                customer,
                kind,
                seq: seq as u32,
            });
        }
    }
    events
}

#[derive(Debug, Default, Serialize)]
struct Summary {
    url: String,
    events_produced: u64,
    produce_seconds: f64,
    produce_rate: f64,
    sent_email: u64,
    sent_sms: u64,
    sent_push: u64,
    expected_email: u64,
    expected_sms: u64,
    expected_push: u64,
    sent_twice: u64,
    lost: u64,
    duplicates_suppressed: u64,
    crashes_injected: u64,
    dead_lettered: u64,
    redriven: u64,
    /// The largest backlog one group had (events waiting for it), and
    /// which group and when.
    peak_lag: u64,
    peak_lag_group: String,
    peak_lag_at_seconds: f64,
    loyalty_points_match: bool,
    loyalty_out_of_order: u64,
    wall_seconds: f64,
    ok: bool,
}

/// Each group's lag and (queue mode) messages in flight.
struct Lags {
    per_group: Vec<(&'static str, u64, Option<u64>)>,
    total: u64,
}

impl Lags {
    /// The group with the largest backlog.
    fn largest(&self) -> (&'static str, u64) {
        self.per_group
            .iter()
            .map(|(g, lag, _)| (*g, *lag))
            .max_by_key(|(_, lag)| *lag)
            .unwrap_or(("-", 0))
    }
}

async fn lags(broker: &Arc<dyn Broker>) -> conveyor::Result<Lags> {
    let mut per_group = Vec::new();
    let mut total = 0;
    for g in ["email", "sms", "push", "loyalty"] {
        let lag = broker.group_lag(g).await?;
        total += lag.total_lag();
        let in_flight = (lag.mode == conveyor::DeliveryMode::Queue).then(|| lag.total_in_flight());
        per_group.push((g, lag.total_lag(), in_flight));
    }
    Ok(Lags { per_group, total })
}

async fn dlq_size(broker: &Arc<dyn Broker>, dlq: &str) -> conveyor::Result<u64> {
    match broker.describe_topic(dlq).await {
        Ok(d) => Ok(d.partitions.iter().map(|p| p.log_end).sum()),
        Err(e) if e.kind() == conveyor::ErrorKind::TopicNotFound => Ok(0),
        Err(e) => Err(e),
    }
}

/// The embedded default backend in a temporary directory (removed at exit).
fn default_url() -> (String, Option<tempfile::TempDir>) {
    if cfg!(feature = "mmap") {
        let dir = tempfile::tempdir().expect("temporary directory");
        (format!("mmap://{}", dir.path().display()), Some(dir))
    } else {
        ("memory://".to_string(), None)
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(addr) = args.metrics {
        // The application picks the exporter; Conveyor records through
        // the `metrics` facade into whichever is installed.
        let installed = metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .install();
        if let Err(e) = installed {
            eprintln!("notification_system: cannot serve metrics at {addr}: {e}");
            return ExitCode::from(2);
        }
        conveyor::observe::metrics::describe();
        eprintln!("metrics: http://{addr}/metrics");
    }
    let result = run(args.clone()).await;
    if let Some(addr) = args.metrics {
        eprintln!("serving http://{addr}/metrics until stdin closes (Ctrl-D) or Ctrl-C");
        let stdin_closed = tokio::task::spawn_blocking(|| {
            let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
        });
        tokio::select! {
            _ = stdin_closed => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    match result {
        Ok(summary) if summary.ok => ExitCode::SUCCESS,
        Ok(_) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("notification_system: {e}");
            ExitCode::from(2)
        }
    }
}

async fn run(args: Args) -> conveyor::Result<Summary> {
    let started = Instant::now();
    let (url, _tmp) = match &args.url {
        Some(u) => (u.clone(), None),
        None => default_url(),
    };
    let broker = conveyor::open(&url).await?;
    broker
        .create_topic(TOPIC, TopicConfig::new(args.partitions))
        .await?;
    let store = broker.idempotency_store();
    let fixed = Arc::new(AtomicBool::new(false));
    let channel_config = GroupConfig::queue()
        .with_visibility_timeout(Duration::from_secs(10))
        .with_retry_backoff(RetryBackoff::exponential(
            Duration::from_millis(5),
            Duration::from_millis(100),
        ))
        .with_dlq(DlqPolicy::new(4));
    let dlq = channel_config.dlq.topic_for(TOPIC, "sms");

    // The services start before the burst, like real ones.
    // One token stops them all (a real service cancels it on Ctrl-C).
    let stop = CancellationToken::new();
    let mut providers = HashMap::new();
    let mut suppressed = Vec::new();
    let mut services = tokio::task::JoinSet::new();
    for channel in Channel::ALL {
        let provider = Arc::new(Provider {
            channel,
            transient_rate: args.sms_transient_failure_rate.clamp(0.0, 0.5),
            permanent_rate: args.sms_permanent_failure_rate.clamp(0.0, 1.0),
            fixed: fixed.clone(),
            delivered: Mutex::new(HashMap::new()),
        });
        providers.insert(channel, provider.clone());
        for _ in 0..args.workers.max(1) {
            let consumer = broker
                .consumer(channel.group(), &[TOPIC], channel_config.clone())
                .await?;
            // The producer's idempotency key is the event id: each channel
            // handles an event once, however often it is delivered.
            let handler = Idempotent::by_idempotency_key(
                store.clone(),
                Duration::from_secs(3600),
                channel.group(),
                channel_handler(provider.clone()),
            );
            suppressed.push(handler.duplicates());
            let runner = Runner::new(
                consumer,
                RunnerConfig::default().with_concurrency(16).with_batch(64),
            )
            .with_dead_letters(broker.clone(), &channel_config);
            services.spawn(runner.run_until_cancelled(handler, stop.child_token()));
        }
    }
    let loyalty = Arc::new(Loyalty::default());
    for _ in 0..2 {
        let consumer = broker
            .consumer("loyalty", &[TOPIC], GroupConfig::stream())
            .await?;
        let runner = Runner::new(
            consumer,
            RunnerConfig::default().with_concurrency(8).with_batch(256),
        );
        services.spawn(
            runner.run_until_cancelled(loyalty_handler(loyalty.clone()), stop.child_token()),
        );
    }

    // The burst: as fast as the order service can, in batches.
    let events = generate(&args);
    let producer = broker.producer().await?;
    let produce_started = Instant::now();
    let burst = {
        let producer = producer.clone();
        let events = events.clone();
        tokio::spawn(async move {
            for chunk in events.chunks(500) {
                let records = chunk
                    .iter()
                    .map(|e| {
                        Record::json(e)
                            .expect("event serialises")
                            .with_key(format!("order-{}", e.order))
                            .with_header("event-kind", e.kind.name())
                            .with_idempotency_key(format!("evt-{}", e.id))
                    })
                    .collect();
                producer.send_batch(TOPIC, records).await?;
            }
            Ok::<_, conveyor::Error>(produce_started.elapsed())
        })
    };

    // Crashing workers, during the burst.
    let crashes = {
        let broker = broker.clone();
        let store = store.clone();
        let providers = providers.clone();
        let config = channel_config.clone();
        let n = args.crashes;
        tokio::spawn(async move {
            let mut done = 0u64;
            for i in 0..n {
                let channel = Channel::ALL[i as usize % 2]; // email and SMS workers crash
                crash_once(&broker, &store, &providers[&channel], config.clone()).await?;
                done += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok::<_, conveyor::Error>(done)
        })
    };

    // Live view until the burst is produced and every group has drained.
    let mut peak = (0u64, "-", 0.0f64);
    let mut produce_time = None;
    let mut redriven = 0u64;
    let mut rounds = 0;
    let mut burst = Some(burst);
    let mut last_print = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if burst.as_ref().is_some_and(|b| b.is_finished()) {
            let took = burst
                .take()
                .expect("present")
                .await
                .map_err(|e| conveyor::Error::internal(e.to_string()))??;
            produce_time = Some(took);
        }
        let lag = lags(&broker).await?;
        let (group, largest) = lag.largest();
        if largest > peak.0 {
            peak = (largest, group, started.elapsed().as_secs_f64());
        }
        let dead = dlq_size(&broker, &dlq).await?;
        if !args.quiet && last_print.elapsed() >= Duration::from_millis(500) {
            last_print = Instant::now();
            // Redriven dead letters are appended to the topic again: they
            // are not new events.
            let stored: u64 = broker
                .describe_topic(TOPIC)
                .await?
                .partitions
                .iter()
                .map(|p| p.log_end)
                .sum();
            let produced = stored.saturating_sub(redriven);
            let secs = started.elapsed().as_secs_f64();
            let groups: Vec<String> = lag
                .per_group
                .iter()
                .map(|(g, l, in_flight)| match in_flight {
                    Some(f) => format!("{g} {l} ({f} in flight)"),
                    None => format!("{g} {l}"),
                })
                .collect();
            println!(
                "[{secs:6.1}s] events produced {produced:>7} | waiting: {} | dlq {}",
                groups.join(", "),
                dead.saturating_sub(redriven)
            );
        }
        if produce_time.is_none() || lag.total > 0 {
            continue;
        }
        // Drained. Anything in the DLQ that was not redriven yet?
        if dead > redriven && rounds < 3 {
            rounds += 1;
            if rounds == 1 {
                let sample = broker.fetch(&dlq, 0, 0, 3).await?;
                if !args.quiet {
                    println!("DLQ `{dlq}` holds {dead} messages, e.g.:");
                    for m in &sample {
                        println!(
                            "  event {} after {} attempts: {}",
                            m.idempotency_key.as_deref().unwrap_or("?"),
                            m.header_str("conveyor.dlq.attempts").unwrap_or("?"),
                            m.header_str("conveyor.dlq.error").unwrap_or("?"),
                        );
                    }
                    println!("fixing the phone-number bug and redriving the DLQ");
                }
                fixed.store(true, Ordering::Release);
            }
            redriven += broker.redrive(&dlq, None).await? as u64;
            continue;
        }
        break;
    }
    let crashes_injected = crashes
        .await
        .map_err(|e| conveyor::Error::internal(e.to_string()))??;
    stop.cancel();
    while let Some(done) = services.join_next().await {
        done.map_err(|e| conveyor::Error::internal(e.to_string()))??;
    }

    // Check: every wanted notification sent exactly once; loyalty in order.
    let mut summary = Summary {
        url: url.clone(),
        events_produced: events.len() as u64,
        ..Summary::default()
    };
    for channel in Channel::ALL {
        let delivered = providers[&channel]
            .delivered
            .lock()
            .expect("no worker panicked holding the lock");
        let expected: Vec<&Event> = events.iter().filter(|e| channel.wants(e.kind)).collect();
        let sent = delivered.len() as u64;
        summary.sent_twice += delivered.values().filter(|n| **n > 1).count() as u64;
        summary.lost += expected
            .iter()
            .filter(|e| !delivered.contains_key(&e.id))
            .count() as u64;
        let exp = expected.len() as u64;
        match channel {
            Channel::Email => (summary.sent_email, summary.expected_email) = (sent, exp),
            Channel::Sms => (summary.sent_sms, summary.expected_sms) = (sent, exp),
            Channel::Push => (summary.sent_push, summary.expected_push) = (sent, exp),
        }
    }
    let mut expected_points: HashMap<u32, i64> = HashMap::new();
    for e in &events {
        *expected_points.entry(e.customer).or_insert(0) += points(e.kind);
    }
    summary.loyalty_points_match = *loyalty
        .points
        .lock()
        .expect("no worker panicked holding the lock")
        == expected_points;
    summary.loyalty_out_of_order = loyalty.out_of_order.load(Ordering::Relaxed);
    summary.duplicates_suppressed = suppressed.iter().map(|c| c.load(Ordering::Relaxed)).sum();
    summary.crashes_injected = crashes_injected;
    summary.dead_lettered = dlq_size(&broker, &dlq).await?;
    summary.redriven = redriven;
    (
        summary.peak_lag,
        summary.peak_lag_group,
        summary.peak_lag_at_seconds,
    ) = (peak.0, peak.1.to_string(), peak.2);
    let produce = produce_time.unwrap_or_default().as_secs_f64();
    summary.produce_seconds = produce;
    summary.produce_rate = events.len() as f64 / produce.max(1e-9);
    summary.wall_seconds = started.elapsed().as_secs_f64();
    summary.ok = summary.lost == 0
        && summary.sent_twice == 0
        && summary.loyalty_points_match
        && summary.loyalty_out_of_order == 0
        && summary.redriven >= summary.dead_lettered;
    broker.close().await?;
    print_summary(&summary, args.json);
    Ok(summary)
}

fn print_summary(s: &Summary, json: bool) {
    if json {
        println!("{}", serde_json::to_string(s).expect("summary serialises"));
        return;
    }
    println!();
    println!("== notification system on {} ==", s.url);
    println!(
        "events produced        {:>10}  in {:.2}s ({:.0}/s; producers never waited)",
        s.events_produced, s.produce_seconds, s.produce_rate
    );
    println!(
        "email sent             {:>10}  of {}",
        s.sent_email, s.expected_email
    );
    println!(
        "sms sent               {:>10}  of {}",
        s.sent_sms, s.expected_sms
    );
    println!(
        "push sent              {:>10}  of {}",
        s.sent_push, s.expected_push
    );
    println!(
        "duplicates suppressed  {:>10}  ({} worker crashes injected)",
        s.duplicates_suppressed, s.crashes_injected
    );
    println!("dead-lettered          {:>10}", s.dead_lettered);
    println!("redriven               {:>10}", s.redriven);
    println!(
        "peak lag (one group)   {:>10}  ({} at {:.1}s: events waiting for the slowest channel)",
        s.peak_lag, s.peak_lag_group, s.peak_lag_at_seconds
    );
    println!(
        "loyalty points         {:>10}",
        if s.loyalty_points_match {
            "match"
        } else {
            "MISMATCH"
        }
    );
    println!("wall time              {:>9.2}s", s.wall_seconds);
    if s.ok {
        println!("OK: every notification sent exactly once");
    } else {
        println!(
            "FAILED: {} lost, {} sent twice, {} out of order",
            s.lost, s.sent_twice, s.loyalty_out_of_order
        );
    }
}
