//! What machine a run measured on.

use crate::results::Machine;
use std::io::Write;
use std::time::{Duration, Instant};

/// Read the machine: CPU, cores, memory, kernel, Rust, the cost of a
/// synced write, and the versions of the servers at `redis` and
/// `postgres` (when given and compiled in).
pub async fn read(redis: Option<&str>, postgres: Option<&str>) -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
        .map_or("unknown".to_string(), |(_, v)| v.trim().to_string());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory_kib: f64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0.0);
    let rustc =
        std::process::Command::new(std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into()))
            .arg("--version")
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
    let fdatasync_us = tokio::task::spawn_blocking(fdatasync_cost)
        .await
        .ok()
        .flatten()
        .map_or(0.0, |d| d.as_secs_f64() * 1e6);
    let mut servers = Vec::new();
    if let Some(v) = redis_version(redis).await {
        servers.push(format!("Redis {v}"));
    }
    if let Some(v) = postgres_version(postgres).await {
        servers.push(format!("PostgreSQL {v}"));
    }
    Machine {
        cpu,
        cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        memory_gib: memory_kib / (1024.0 * 1024.0),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string(),
        rustc,
        fdatasync_us,
        servers,
    }
}

/// The median of 100 appends of 100 bytes, each followed by
/// `fdatasync`, to a file in the temporary directory (blocking).
fn fdatasync_cost() -> Option<Duration> {
    let dir = tempfile::tempdir().ok()?;
    let mut file = std::fs::File::create(dir.path().join("sync")).ok()?;
    let mut times = Vec::with_capacity(100);
    for _ in 0..100 {
        let started = Instant::now();
        file.write_all(&[7u8; 100]).ok()?;
        file.sync_data().ok()?;
        times.push(started.elapsed());
    }
    times.sort_unstable();
    times.get(times.len() / 2).copied()
}

async fn redis_version(url: Option<&str>) -> Option<String> {
    let _ = url;
    #[cfg(feature = "redis")]
    {
        use conveyor::redis::redis;
        let parsed = conveyor::BrokerUrl::parse(url?).ok()?;
        let (topology, _) = conveyor::redis::parse(&parsed).ok()?;
        let client = redis::Client::open(topology.seeds().first()?.as_str()).ok()?;
        let mut c = client.get_multiplexed_async_connection().await.ok()?;
        let info: String = redis::cmd("INFO")
            .arg("server")
            .query_async(&mut c)
            .await
            .ok()?;
        return info
            .lines()
            .find_map(|l| l.strip_prefix("redis_version:"))
            .map(|v| v.trim().to_string());
    }
    #[allow(unreachable_code)]
    None
}

async fn postgres_version(url: Option<&str>) -> Option<String> {
    let _ = url;
    #[cfg(feature = "postgres")]
    {
        use sqlx::Connection;
        let parsed = conveyor::BrokerUrl::parse(url?).ok()?;
        let (conn, _) = conveyor::postgres::parse_url(&parsed).ok()?;
        let mut c = sqlx::PgConnection::connect(&conn).await.ok()?;
        let v: String = sqlx::query_scalar("SHOW server_version")
            .fetch_one(&mut c)
            .await
            .ok()?;
        return Some(v);
    }
    #[allow(unreachable_code)]
    None
}
