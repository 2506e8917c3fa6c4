//! Exactly once with the application's own PostgreSQL database
//! (docs/semantics.md §10), through crashes.
//!
//! An order service writes each order row and its `orders.placed` event in
//! one transaction of the application's database (`PgBroker::send_in`);
//! some orders are rolled back. A shipping service (a queue-mode group)
//! writes a shipment row and acks the event in one transaction, and a
//! billing service (a stream-mode group) writes an invoice and commits its
//! offset in one transaction, both through the runner's transactional
//! handler (`conveyor_postgres::Transactional`). Each runs as several
//! processes, and a chaos loop SIGKILLs producers and consumers at random
//! moments (mid-transaction, mid-relay, between commit and anything) and
//! starts new ones. At the end it checks that every committed order has
//! exactly one event, one shipment and one invoice, and that no event,
//! shipment or invoice exists for an order that rolled back.
//!
//! ```text
//! cargo run --release --features postgres --example order_service
//! cargo run --features postgres --example order_service -- --url postgres://postgres@127.0.0.1:5432/test --seconds 30
//! ```
//!
//! Exits non-zero if any check fails. Works in two schemas of its own
//! (Conveyor's and the application's), dropped at the end.

use clap::Parser;
use conveyor::postgres::sqlx::{self, postgres::PgConnectOptions, PgPool};
use conveyor::postgres::{PgBroker, PgOptions, PgTransaction, Transactional};
use conveyor::prelude::*;
use conveyor::runner::{CancellationToken, HandlerError, Runner, RunnerConfig};
use conveyor::{BrokerOptions, GroupConfig, Message, Record, TopicConfig};
use conveyor_conformance::process::Processes;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, ExitCode};
use std::str::FromStr;
use std::time::{Duration, Instant};

const TOPIC: &str = "orders.placed";
const SHIPPING: &str = "shipping";
const BILLING: &str = "billing";

/// Orders and their events written in one transaction, shipped and billed
/// exactly once through SIGKILLs of producers and consumers, on
/// PostgreSQL.
#[derive(Parser, Debug, Clone)]
#[command(long_about = None)]
struct Args {
    /// The PostgreSQL database (a libpq URL).
    #[arg(
        long,
        env = "CONVEYOR_POSTGRES_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/test"
    )]
    url: String,
    /// How long the chaos loop runs.
    #[arg(long, default_value_t = 12)]
    seconds: u64,
    /// Producer processes.
    #[arg(long, default_value_t = 2)]
    producers: usize,
    /// Shipping (queue mode) and billing (stream mode) processes, each.
    #[arg(long, default_value_t = 2)]
    consumers: usize,
    /// Share of orders the producers roll back.
    #[arg(long, default_value_t = 0.15)]
    rollback_rate: f64,
    /// Random seed of the chaos loop (printed; default: random).
    #[arg(long)]
    seed: Option<u64>,
    /// Print the summary as JSON (one line).
    #[arg(long)]
    json: bool,
    /// Keep the schemas afterwards.
    #[arg(long)]
    keep: bool,
    /// (internal) Run as a child: producer, shipping or billing.
    #[arg(long, hide = true)]
    role: Option<String>,
    /// (internal) The schema prefix of a child's run.
    #[arg(long, hide = true)]
    schema: Option<String>,
}

#[derive(Debug, Default, Serialize)]
struct Summary {
    seed: u64,
    kills: u64,
    orders_committed: u64,
    orders_rolled_back_seen: u64,
    events: u64,
    shipments: u64,
    invoices: u64,
    orders_without_exactly_one_event: u64,
    orders_without_exactly_one_shipment: u64,
    orders_without_exactly_one_invoice: u64,
    effects_of_rolled_back_orders: u64,
    ok: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("order_service: tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = match (args.role.as_deref(), args.schema.clone()) {
        (Some(role), Some(schema)) => rt.block_on(child(&args.url, role, &schema)),
        _ => rt.block_on(parent(&args)),
    };
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("order_service: {e}");
            ExitCode::FAILURE
        }
    }
}

type AnyResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// The application's pool: its own tables in `<prefix>_app`, its
/// `search_path` (Conveyor's statements name their schema themselves).
async fn app_pool(url: &str, prefix: &str, max: u32) -> AnyResult<PgPool> {
    let options =
        PgConnectOptions::from_str(url)?.options([("search_path", format!("{prefix}_app"))]);
    Ok(sqlx::postgres::PgPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(Duration::from_secs(30))
        .connect_with(options)
        .await?)
}

/// Conveyor's broker on the application's database.
async fn broker(pool: &PgPool, prefix: &str) -> AnyResult<PgBroker> {
    let pg = PgOptions::default()
        .with_schema(prefix)
        .with_max_connections(3);
    Ok(conveyor::postgres::open_on(pool, BrokerOptions::default(), pg).await?)
}

fn say(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(format!("@@ {line}\n").as_bytes());
    let _ = out.flush();
}

// ---------------------------------------------------------------- child --

/// A child: runs its role until killed, or until its stdin ends (the
/// parent is gone), or 120 s at most.
async fn child(url: &str, role: &str, prefix: &str) -> AnyResult<bool> {
    let stop = CancellationToken::new();
    {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut line = String::new();
            while std::io::stdin().read_line(&mut line).is_ok_and(|n| n > 0) {
                line.clear();
            }
            stop.cancel();
        });
    }
    let pool = app_pool(url, prefix, 3).await?;
    let broker = broker(&pool, prefix).await?;
    say("READY");
    let work = async {
        match role {
            "producer" => produce(&pool, &broker, &stop).await,
            "shipping" => consume(&pool, &broker, SHIPPING, &stop).await,
            "billing" => consume(&pool, &broker, BILLING, &stop).await,
            other => Err(format!("unknown role `{other}`").into()),
        }
    };
    match tokio::time::timeout(Duration::from_secs(120), work).await {
        Ok(r) => r?,
        Err(_) => say("X not stopped within 120 s"),
    }
    broker.close().await?;
    Ok(true)
}

/// Orders, each with its event in the same transaction; some roll back.
async fn produce(pool: &PgPool, broker: &PgBroker, stop: &CancellationToken) -> AnyResult<()> {
    let rollback_rate: f64 = std::env::var("ORDER_SERVICE_ROLLBACK_RATE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0.15);
    let mut rng = rand::rngs::StdRng::from_entropy();
    while !stop.is_cancelled() {
        let mut tx = pool.begin().await?;
        let order: i64 = sqlx::query_scalar("INSERT INTO orders (amount) VALUES ($1) RETURNING id")
            .bind(rng.gen_range(1..1000i32))
            .fetch_one(&mut *tx)
            .await?;
        let event = Record::new(format!(r#"{{"order":{order}}}"#)).with_key(order.to_string());
        broker.send_in(&mut *tx, TOPIC, vec![event]).await?;
        // Some work inside the transaction: a kill may land here.
        tokio::time::sleep(Duration::from_millis(rng.gen_range(0..10))).await;
        if rng.gen_bool(rollback_rate) {
            tx.rollback().await?;
            say(&format!("R {order}"));
        } else {
            tx.commit().await?;
            say(&format!("C {order}"));
        }
    }
    Ok(())
}

fn order_of(m: &Message) -> Result<i64, HandlerError> {
    let v: serde_json::Value = serde_json::from_slice(&m.value).map_err(HandlerError::permanent)?;
    v["order"]
        .as_i64()
        .ok_or_else(|| HandlerError::permanent("event without an order"))
}

/// A consumer: its effect row and the settle in one transaction.
async fn consume(
    pool: &PgPool,
    broker: &PgBroker,
    group: &'static str,
    stop: &CancellationToken,
) -> AnyResult<()> {
    let config = match group {
        SHIPPING => GroupConfig::queue().with_visibility_timeout(Duration::from_secs(3)),
        _ => GroupConfig::stream().with_session_timeout(Duration::from_secs(2)),
    }
    .with_retry_backoff(conveyor::RetryBackoff::none());
    let consumer = broker.consumer(group, &[TOPIC], config).await?;
    let table = if group == SHIPPING {
        "shipments"
    } else {
        "invoices"
    };
    let handler = Transactional::new(
        broker.clone(),
        pool.clone(),
        move |m: Message, mut tx: PgTransaction| async move {
            let order = order_of(&m)?;
            sqlx::query(&format!("INSERT INTO {table} (order_id) VALUES ($1)"))
                .bind(order)
                .execute(&mut *tx)
                .await?;
            // Some work inside the transaction: a kill may land here.
            tokio::time::sleep(Duration::from_millis(2)).await;
            Ok(tx)
        },
    );
    Runner::new(consumer, RunnerConfig::default().with_concurrency(2))
        .run_until_cancelled(handler, stop.clone())
        .await?;
    Ok(())
}

// --------------------------------------------------------------- parent --

async fn parent(args: &Args) -> AnyResult<bool> {
    let seed = args.seed.unwrap_or_else(rand::random);
    eprintln!("order_service: seed {seed} (replay the chaos with --seed {seed})");
    let prefix = format!(
        "order_service_{}_{:06x}",
        std::process::id(),
        rand::random::<u32>() & 0xff_ffff
    );
    let admin = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&args.url)
        .await?;
    let outcome = run(args, seed, &prefix, &admin).await;
    if !args.keep {
        let dropped = sqlx::query(&format!(r#"DROP SCHEMA IF EXISTS "{prefix}_app" CASCADE"#))
            .execute(&admin)
            .await;
        if let Err(e) = dropped {
            eprintln!("order_service: could not drop schema {prefix}_app: {e}");
        }
        if let Ok(pool) = app_pool(&args.url, &prefix, 2).await {
            if let Ok(b) = broker(&pool, &prefix).await {
                if let Err(e) = b.drop_schema().await {
                    eprintln!("order_service: could not drop schema {prefix}: {e}");
                }
                let _ = b.close().await;
            }
        }
    }
    let summary = outcome?;
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        print_summary(&summary);
    }
    Ok(summary.ok)
}

async fn run(args: &Args, seed: u64, prefix: &str, admin: &PgPool) -> AnyResult<Summary> {
    // The owner's steps: Conveyor's schema, the application's tables.
    let pg = PgOptions::default().with_schema(prefix);
    conveyor::postgres::migrate(&args.url, &pg).await?;
    for ddl in [
        format!(r#"CREATE SCHEMA "{prefix}_app""#),
        format!(
            r#"CREATE TABLE "{prefix}_app".orders (id bigserial PRIMARY KEY, amount int NOT NULL)"#
        ),
        // No unique constraint: a second shipment would show, not fail.
        format!(
            r#"CREATE TABLE "{prefix}_app".shipments (id bigserial PRIMARY KEY, order_id bigint NOT NULL)"#
        ),
        format!(
            r#"CREATE TABLE "{prefix}_app".invoices (id bigserial PRIMARY KEY, order_id bigint NOT NULL)"#
        ),
    ] {
        sqlx::query(&ddl).execute(admin).await?;
    }
    let pool = app_pool(&args.url, prefix, 2).await?;
    let broker = broker(&pool, prefix).await?;
    broker.create_topic(TOPIC, TopicConfig::new(4)).await?;

    let exe = std::env::current_exe()?;
    let start = Instant::now();
    let mut processes = Processes::new(start);
    let mut roles: Vec<&'static str> = Vec::new();
    let spawn = |processes: &mut Processes, roles: &mut Vec<&'static str>, role: &'static str| {
        let mut command = Command::new(&exe);
        command
            .args(["--url", &args.url, "--role", role, "--schema", prefix])
            .env(
                "ORDER_SERVICE_ROLLBACK_RATE",
                args.rollback_rate.to_string(),
            );
        let id = processes.spawn(command);
        roles.push(role);
        id
    };
    for _ in 0..args.producers {
        spawn(&mut processes, &mut roles, "producer");
    }
    for _ in 0..args.consumers {
        spawn(&mut processes, &mut roles, "shipping");
        spawn(&mut processes, &mut roles, "billing");
    }
    let mut summary = Summary {
        seed,
        ..Summary::default()
    };
    let mut rolled_back: BTreeSet<i64> = BTreeSet::new();
    let take_lines = |processes: &Processes, rolled_back: &mut BTreeSet<i64>| -> AnyResult<()> {
        while let Some(line) = processes.try_recv() {
            let text = line.text.trim();
            if let Some(order) = text.strip_prefix("@@ R ") {
                rolled_back.insert(order.parse()?);
            } else if let Some(what) = text.strip_prefix("@@ X") {
                return Err(format!("child {} reported:{what}", line.child).into());
            }
        }
        Ok(())
    };

    // The chaos loop: SIGKILL a random producer or consumer every
    // 150-600 ms (the random moment is the point: no condition to wait
    // for), and start another in its place.
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let chaos_until = Instant::now() + Duration::from_secs(args.seconds);
    while Instant::now() < chaos_until {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(150..600))).await;
        take_lines(&processes, &mut rolled_back)?;
        let live: Vec<usize> = (0..processes.len())
            .filter(|i| processes.alive(*i))
            .collect();
        for id in &live {
            if let Some(status) = processes.try_wait(*id) {
                return Err(format!(
                    "{} process {id} exited on its own ({status}):\n{}",
                    roles[*id],
                    processes.stderr_tail(*id, 2000)
                )
                .into());
            }
        }
        let victim = live[rng.gen_range(0..live.len())];
        processes.kill(victim);
        summary.kills += 1;
        let role = roles[victim];
        spawn(&mut processes, &mut roles, role);
    }
    // Stop producing: kill every producer (an open transaction rolls back).
    for (id, role) in roles.iter().enumerate() {
        if *role == "producer" {
            processes.kill(id);
        }
    }
    // Wait until every committed event is appended and both groups have
    // settled everything (killed consumers' leases and partitions come
    // back after the visibility and session timeouts).
    let drained = Instant::now();
    loop {
        take_lines(&processes, &mut rolled_back)?;
        let staged: i64 = sqlx::query_scalar(&format!(r#"SELECT count(*) FROM "{prefix}".staged"#))
            .fetch_one(admin)
            .await?;
        let mut settled = staged == 0;
        for group in [SHIPPING, BILLING] {
            match broker.group_lag(group).await {
                Ok(lag) => {
                    settled &= lag.partitions.len() == 4
                        && lag
                            .partitions
                            .iter()
                            .all(|p| p.lag == 0 && p.in_flight == 0)
                }
                Err(_) => settled = false,
            }
        }
        if settled {
            break;
        }
        if drained.elapsed() > Duration::from_secs(90) {
            return Err(format!(
                "not settled 90 s after the producers stopped\n{}",
                processes.stderr_tails()
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for id in 0..processes.len() {
        processes.kill(id);
    }
    for line in processes.drain() {
        if let Some(order) = line.text.trim().strip_prefix("@@ R ") {
            rolled_back.insert(order.parse()?);
        }
    }

    // The checks, all from the database.
    let orders: BTreeSet<i64> =
        sqlx::query_scalar(&format!(r#"SELECT id FROM "{prefix}_app".orders"#))
            .fetch_all(admin)
            .await?
            .into_iter()
            .collect();
    let mut events: BTreeMap<i64, u64> = BTreeMap::new();
    let description = broker.describe_topic(TOPIC).await?;
    for p in &description.partitions {
        let mut from = p.log_start;
        loop {
            let page = broker.fetch(TOPIC, p.partition, from, 1000).await?;
            let Some(last) = page.last() else { break };
            from = last.offset + 1;
            for m in &page {
                let order = order_of(m).map_err(|e| e.reason)?;
                *events.entry(order).or_default() += 1;
            }
        }
    }
    let per_order = |table: &str| {
        let sql =
            format!(r#"SELECT order_id, count(*) FROM "{prefix}_app".{table} GROUP BY order_id"#);
        async move {
            let rows: Vec<(i64, i64)> = sqlx::query_as(&sql).fetch_all(admin).await?;
            Ok::<_, sqlx::Error>(
                rows.into_iter()
                    .map(|(o, n)| (o, n as u64))
                    .collect::<BTreeMap<i64, u64>>(),
            )
        }
    };
    let shipments = per_order("shipments").await?;
    let invoices = per_order("invoices").await?;
    let not_one = |effects: &BTreeMap<i64, u64>| {
        orders
            .iter()
            .filter(|o| effects.get(o).copied().unwrap_or(0) != 1)
            .count() as u64
    };
    summary.orders_committed = orders.len() as u64;
    summary.orders_rolled_back_seen = rolled_back.len() as u64;
    summary.events = events.values().sum();
    summary.shipments = shipments.values().sum();
    summary.invoices = invoices.values().sum();
    summary.orders_without_exactly_one_event = not_one(&events);
    summary.orders_without_exactly_one_shipment = not_one(&shipments);
    summary.orders_without_exactly_one_invoice = not_one(&invoices);
    // Anything for an order that is not there (rolled back, or killed
    // before its commit), and any rolled-back order that is there.
    summary.effects_of_rolled_back_orders = [&events, &shipments, &invoices]
        .iter()
        .flat_map(|m| m.keys())
        .filter(|o| !orders.contains(o))
        .count() as u64
        + rolled_back.iter().filter(|o| orders.contains(o)).count() as u64;
    summary.ok = summary.orders_committed > 0
        && summary.orders_rolled_back_seen > 0
        && summary.kills > 0
        && summary.orders_without_exactly_one_event == 0
        && summary.orders_without_exactly_one_shipment == 0
        && summary.orders_without_exactly_one_invoice == 0
        && summary.effects_of_rolled_back_orders == 0;
    broker.close().await?;
    Ok(summary)
}

fn print_summary(s: &Summary) {
    let mark = |ok: bool| if ok { "ok" } else { "FAILED" };
    println!(
        "order_service (seed {}): {} SIGKILLs of producers and consumers",
        s.seed, s.kills
    );
    println!(
        "  {} orders committed, {} rolled back (as the producers reported them)",
        s.orders_committed, s.orders_rolled_back_seen
    );
    println!(
        "  every committed order has exactly one event:    {} ({} events, {} orders without exactly one)",
        mark(s.orders_without_exactly_one_event == 0),
        s.events,
        s.orders_without_exactly_one_event
    );
    println!(
        "  every committed order has exactly one shipment: {} ({} shipments, {} orders without exactly one)",
        mark(s.orders_without_exactly_one_shipment == 0),
        s.shipments,
        s.orders_without_exactly_one_shipment
    );
    println!(
        "  every committed order has exactly one invoice:  {} ({} invoices, {} orders without exactly one)",
        mark(s.orders_without_exactly_one_invoice == 0),
        s.invoices,
        s.orders_without_exactly_one_invoice
    );
    println!(
        "  nothing for a rolled-back order:                {} ({} found)",
        mark(s.effects_of_rolled_back_orders == 0),
        s.effects_of_rolled_back_orders
    );
    println!("{}", if s.ok { "OK" } else { "FAILED" });
}
