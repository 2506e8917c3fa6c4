//! What only a server backend shows: durability against Redis's own
//! persistence settings and a server killed with SIGKILL, two apps
//! (namespaces) on one server, a wake-up across brokers, and a connection
//! that breaks (a fault-injecting TCP proxy between client and server).

mod common;

use common::RedisServer;
use conveyor_conformance::proxy::FaultProxy;
use conveyor_core::prelude::*;
use conveyor_core::{BrokerOptions, Durability, ErrorKind, GroupConfig, Record, TopicConfig};
use conveyor_redis::Topology;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Deletes its namespace at the end of the test, passed or failed.
struct Ns(String, Topology);

impl Ns {
    fn new(prefix: &str, topology: Topology) -> Self {
        Ns(common::unique_ns(prefix), topology)
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let (ns, topology) = (self.0.clone(), self.1.clone());
        // A runtime of its own: the test's may be shutting down.
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                rt.block_on(common::drop_ns(&topology, &ns));
            }
        })
        .join();
    }
}

fn shared() -> Topology {
    Topology::single(common::url())
}

/// §3 durability: `always` and a short `interval` are refused on a server
/// without `appendfsync always`, naming the setting; `none` is accepted.
#[tokio::test]
async fn durability_the_server_cannot_honour_is_refused() {
    let plain = RedisServer::start(&["--appendonly", "no"]);
    let t = Topology::single(plain.url());
    for d in [
        Durability::Always,
        Durability::Interval(Duration::from_millis(100)),
    ] {
        let e = common::open(&t, "dur", BrokerOptions::default().with_durability(d))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
        assert!(e.message().contains("appendfsync"), "{e}");
        assert!(e.message().contains("appendonly=no"), "{e}");
    }
    let everysec = RedisServer::start(&["--appendonly", "yes", "--appendfsync", "everysec"]);
    let t = Topology::single(everysec.url());
    let ok = BrokerOptions::default().with_durability(Durability::Interval(Duration::from_secs(1)));
    common::open(&t, "dur", ok)
        .await
        .unwrap()
        .close()
        .await
        .unwrap();
    let e = common::open(
        &t,
        "dur",
        BrokerOptions::default().with_durability(Durability::Always),
    )
    .await
    .unwrap_err();
    assert!(e.message().contains("appendfsync=everysec"), "{e}");
    common::open(&t, "dur", BrokerOptions::default())
        .await
        .unwrap()
        .close()
        .await
        .unwrap();
}

/// §3, §7: a private server with `appendfsync always` is killed with
/// SIGKILL while producers send under `always` and a member commits, then
/// restarted: every acknowledged record is there with its bytes, and no
/// acknowledged commit went back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_server_loses_nothing_acknowledged_under_always() {
    let mut server = RedisServer::start(&["--appendonly", "yes", "--appendfsync", "always"]);
    let t = Topology::single(server.url());
    let always = BrokerOptions::default().with_durability(Durability::Always);
    let broker = common::open_dyn(&t, "kill", always.clone()).await.unwrap();
    broker.create_topic("t", TopicConfig::new(2)).await.unwrap();
    let acked = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for w in 0..3 {
        let (p, acked) = (broker.producer().await.unwrap(), acked.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0u64.. {
                let value = format!("w{w}-{i}");
                match p.send("t", Record::new(value.clone())).await {
                    Ok(r) => acked.lock().push((r, value)),
                    Err(e) => {
                        assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
                        return;
                    }
                }
            }
        }));
    }
    let c = broker
        .consumer("g", &["t"], GroupConfig::stream())
        .await
        .unwrap();
    let mut committed = Vec::new();
    while acked.lock().len() < 300 {
        let got = c.poll(50, Duration::from_millis(100)).await.unwrap();
        if let Some(last) = got.last() {
            c.commit_batch(&got).await.unwrap();
            committed.push((last.partition, last.offset + 1));
        }
    }
    server.kill();
    for t in tasks {
        t.await.unwrap();
    }
    let acked = acked.lock().clone();
    server.restart();
    let reopened = common::open_dyn(&t, "kill", always).await.unwrap();
    for (r, value) in &acked {
        let m = reopened.fetch("t", r.partition, r.offset, 1).await.unwrap();
        let got = m.first().map(|m| (m.offset, m.value.clone()));
        assert_eq!(
            got,
            Some((r.offset, value.clone().into())),
            "receipt {r:?} kept"
        );
    }
    let lag = reopened.group_lag("g").await.unwrap();
    for (partition, next) in committed {
        let p = lag
            .partitions
            .iter()
            .find(|p| p.partition == partition)
            .unwrap();
        assert!(
            p.committed >= next,
            "commit {partition}:{next} kept: {lag:?}"
        );
    }
    eprintln!("{} acknowledged records survived SIGKILL", acked.len());
    reopened.close().await.unwrap();
}

/// Two apps on one server in their own namespaces never see each other's
/// topics, records or groups.
#[tokio::test]
async fn two_namespaces_on_one_server_never_see_each_other() {
    let (a, b) = (Ns::new("app_a", shared()), Ns::new("app_b", shared()));
    let app_a = common::open_dyn(&a.1, &a.0, BrokerOptions::default())
        .await
        .unwrap();
    let app_b = common::open_dyn(&b.1, &b.0, BrokerOptions::default())
        .await
        .unwrap();
    app_a
        .create_topic("orders", TopicConfig::new(1))
        .await
        .unwrap();
    app_a
        .producer()
        .await
        .unwrap()
        .send("orders", Record::new("a"))
        .await
        .unwrap();
    assert_eq!(
        app_b.describe_topic("orders").await.unwrap_err().kind(),
        ErrorKind::TopicNotFound
    );
    app_b
        .create_topic("orders", TopicConfig::new(1))
        .await
        .unwrap();
    assert!(app_b.fetch("orders", 0, 0, 10).await.unwrap().is_empty());
    let _c = app_a
        .consumer("g", &["orders"], GroupConfig::queue())
        .await
        .unwrap();
    assert_eq!(app_a.list_groups().await.unwrap(), ["g"]);
    assert!(app_b.list_groups().await.unwrap().is_empty());
    app_a.close().await.unwrap();
    app_b.close().await.unwrap();
}

/// §4: a member waiting in `poll` wakes when another broker (another
/// connection, as another process would have) produces, through the
/// namespace's pub/sub channel, long before its timeout.
#[tokio::test]
async fn a_waiting_poll_wakes_on_another_brokers_produce() {
    let ns = Ns::new("wake", shared());
    let reader = common::open_dyn(&ns.1, &ns.0, BrokerOptions::default())
        .await
        .unwrap();
    let writer = common::open_dyn(&ns.1, &ns.0, BrokerOptions::default())
        .await
        .unwrap();
    reader.create_topic("t", TopicConfig::new(1)).await.unwrap();
    let c = reader
        .consumer("g", &["t"], GroupConfig::queue())
        .await
        .unwrap();
    let waiting = tokio::spawn(async move {
        let started = Instant::now();
        let got = c.poll(1, Duration::from_secs(20)).await.unwrap();
        (got.len(), started.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    writer
        .producer()
        .await
        .unwrap()
        .send("t", Record::new("ping"))
        .await
        .unwrap();
    let (n, took) = waiting.await.unwrap();
    assert_eq!(n, 1);
    assert!(took < Duration::from_secs(10), "woke after {took:?}");
    reader.close().await.unwrap();
    writer.close().await.unwrap();
}

/// The shared server's address (for the proxy).
fn server_addr() -> SocketAddr {
    let url = common::url();
    let rest = url.trim_start_matches("redis://");
    let hostport = rest.split('/').next().unwrap_or("127.0.0.1:6379");
    use std::net::ToSocketAddrs;
    hostport
        .to_socket_addrs()
        .or_else(|_| format!("{hostport}:6379").to_socket_addrs())
        .expect("the server's host resolves")
        .next()
        .expect("the server's host has an address")
}

/// §7: connections dropped and then a black-holed server: calls fail with
/// `Unavailable` (retriable) and work again when the server is back;
/// nothing acknowledged before or after is lost (the shared case,
/// `conveyor_conformance::proxy::lost_connections_case`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_connections_are_unavailable_then_recover_and_lose_nothing() {
    let ns = Ns::new("fault", shared());
    let proxy = FaultProxy::start(server_addr()).await.unwrap();
    let through = Topology::single(format!("redis://127.0.0.1:{}", proxy.addr().port()));
    let broker = Arc::new(
        conveyor_redis::open(
            through,
            BrokerOptions::default(),
            conveyor_redis::RedisOptions::default()
                .with_namespace(ns.0.clone())
                .with_timeout(Duration::from_secs(2)),
        )
        .await
        .unwrap(),
    ) as Arc<dyn Broker>;
    conveyor_conformance::proxy::lost_connections_case(
        proxy,
        broker,
        common::open_dyn(&ns.1, &ns.0, BrokerOptions::default()),
    )
    .await;
}

/// Queue-mode state written in the layout before the single state set
/// (leases, ready, attempts and lease tokens in four keys) is converted
/// on first touch: an expired lease and a waiting redelivery are offered
/// again with their attempts counted, a live lease stays in flight with
/// its deadline, and the old keys are gone.
#[tokio::test]
async fn queue_state_of_the_old_layout_is_converted() {
    let server = RedisServer::start(&["--appendonly", "no"]);
    let t = Topology::single(server.url());
    let ns = "migrate";
    let b = common::open(&t, ns, BrokerOptions::default())
        .await
        .unwrap();
    b.create_topic("t", TopicConfig::new(1)).await.unwrap();
    let p = b.producer().await.unwrap();
    for v in ["a", "b", "c"] {
        p.send("t", Record::new(v)).await.unwrap();
    }
    b.consumer("g", &["t"], GroupConfig::queue())
        .await
        .unwrap()
        .close()
        .await
        .unwrap();
    b.close().await.unwrap();
    let id = common::raw_command(server.port, &format!("HGET {{{ns}/m}}:topics t")).unwrap();
    let q = format!("{{{ns}/t{id}.0}}:q:g");
    let far = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        + 3_600_000)
        .to_string();
    for cmd in [
        format!("HSET {q}:c cur 3 tok 10"),
        format!("SADD {{{ns}/t{id}.0}}:groups g"),
        // offset 0: leased by a member long gone, expired, 2 deliveries
        // offset 2: leased, live for an hour, 1 delivery
        format!("ZADD {q}:l 1 0 {far} 2"),
        format!("HSET {q}:t 0 8:111:4 2 9:222:5"),
        // offset 1: waiting for its redelivery since time 0, 1 delivery
        format!("ZADD {q}:r 0 1"),
        format!("HSET {q}:a 0 2 1 1 2 1"),
    ] {
        common::raw_command(server.port, &cmd).unwrap();
    }
    let b = common::open(&t, ns, BrokerOptions::default())
        .await
        .unwrap();
    let lag = b.group_lag("g").await.unwrap();
    assert_eq!(lag.partitions[0].in_flight, 1, "{lag:?}");
    assert_eq!(lag.partitions[0].available, 2, "{lag:?}");
    let c = b.consumer("g", &["t"], GroupConfig::queue()).await.unwrap();
    let mut got: Vec<(u64, u32)> = c
        .poll(10, Duration::from_secs(5))
        .await
        .unwrap()
        .iter()
        .map(|m| (m.offset, m.attempt))
        .collect();
    got.sort();
    assert_eq!(got, [(0, 3), (1, 2)]);
    for k in ["l", "r", "a", "t"] {
        assert_eq!(
            common::raw_command(server.port, &format!("EXISTS {q}:{k}")).unwrap(),
            ":0"
        );
    }
    let lag = b.group_lag("g").await.unwrap();
    assert_eq!(lag.partitions[0].in_flight, 3, "{lag:?}");
    b.close().await.unwrap();
}

/// Records stored before the append time moved into the stream entry id
/// (ids `N-1`, the time in a field `t`) read as they were written, beside
/// records of the current form (`N-<time>`): fetch, a queue poll, a seek
/// by timestamp and time retention all see each record's own time.
#[tokio::test]
async fn records_of_the_old_entry_form_are_read_with_their_times() {
    let server = RedisServer::start(&["--appendonly", "no"]);
    let t = Topology::single(server.url());
    let ns = "oldform";
    let b = common::open(&t, ns, BrokerOptions::default())
        .await
        .unwrap();
    b.create_topic("t", TopicConfig::new(1)).await.unwrap();
    let p = b.producer().await.unwrap();
    for v in ["a", "b"] {
        p.send("t", Record::new(v)).await.unwrap();
    }
    as_the_old_form(&server, ns, "t");
    let before = conveyor_core::now_ms();
    let new = p.send("t", Record::new("c")).await.unwrap();
    assert_eq!(new.offset, 2);
    let got = b.fetch("t", 0, 0, 10).await.unwrap();
    let seen: Vec<(u64, u64, &[u8])> = got
        .iter()
        .map(|m| (m.offset, m.timestamp, &m.value[..]))
        .collect();
    assert_eq!(
        seen,
        [
            (0, 1000, &b"a"[..]),
            (1, 2000, b"b"),
            (2, new.timestamp, b"c")
        ]
    );
    assert!(new.timestamp >= before, "{new:?}");
    assert_eq!(b.offset_for_timestamp("t", 0, 1500).await.unwrap(), 1);
    assert_eq!(b.offset_for_timestamp("t", 0, 2001).await.unwrap(), 2);

    let c = b.consumer("q", &["t"], GroupConfig::queue()).await.unwrap();
    let polled = c.poll(10, Duration::from_secs(5)).await.unwrap();
    let seen: Vec<(u64, u64)> = polled.iter().map(|m| (m.offset, m.timestamp)).collect();
    assert_eq!(seen, [(0, 1000), (1, 2000), (2, new.timestamp)]);
    // Redelivered (a lookup of one entry by its offset): the same record.
    c.nack(&polled[0], conveyor_core::NackOptions::new())
        .await
        .unwrap();
    let again = c.poll(10, Duration::from_secs(5)).await.unwrap();
    assert_eq!(
        again
            .iter()
            .map(|m| (m.offset, m.timestamp, m.attempt))
            .collect::<Vec<_>>(),
        [(0, 1000, 2)]
    );
    c.close().await.unwrap();

    // Time retention (an hour) removes the two old records only, by the
    // times in their fields; the new one is kept by the time in its id.
    b.create_topic(
        "r",
        TopicConfig::new(1).with_retention(
            conveyor_core::Retention::forever().with_max_age(Duration::from_secs(3600)),
        ),
    )
    .await
    .unwrap();
    for v in ["a", "b"] {
        p.send("r", Record::new(v)).await.unwrap();
    }
    as_the_old_form(&server, ns, "r");
    p.send("r", Record::new("c")).await.unwrap();
    // Describing a topic applies its retention first.
    let d = b.describe_topic("r").await.unwrap();
    assert_eq!(
        (d.partitions[0].log_start, d.partitions[0].log_end),
        (2, 3),
        "{d:?}"
    );
    let kept = b.fetch("r", 0, 0, 10).await.unwrap();
    assert_eq!(kept.iter().map(|m| m.offset).collect::<Vec<_>>(), [2]);
    b.close().await.unwrap();
}

/// Rewrite the two records `a` and `b` of `topic` (partition 0, offsets
/// 0 and 1) as the earlier version wrote them: ids `N-1`, the times 1000
/// and 2000 in a field `t`. The meta hash (end, bytes) stays as the
/// appends left it.
#[allow(clippy::unwrap_used)]
fn as_the_old_form(server: &RedisServer, ns: &str, topic: &str) {
    let id = common::raw_command(server.port, &format!("HGET {{{ns}/m}}:topics {topic}")).unwrap();
    let log = format!("{{{ns}/t{id}.0}}:log");
    for cmd in [
        format!("DEL {log}"),
        format!("XADD {log} 0-1 t 1000 v a"),
        format!("XADD {log} 1-1 t 2000 s 1 v b"),
    ] {
        common::raw_command(server.port, &cmd).unwrap();
    }
}
