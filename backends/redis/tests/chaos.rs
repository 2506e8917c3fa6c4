//! Server settings and connections that go wrong, each on a private
//! `redis-server` (or cluster) this test starts, so any setting may be
//! changed: an evicting memory policy refused at open (standalone, a
//! cluster's third master, a managed server without `CONFIG`); a full
//! server that still reads, settles and joins while sends wait; settings
//! changed while running, and a server restarted with other settings;
//! wrong and missing credentials, ACL rights; a silent server and a
//! closed port at open; close dropping the connections; TLS.
//!
//! Every wait is on a condition with a generous deadline.

mod common;

use common::{RedisServer, TlsCerts};
use conveyor_conformance::eventually;
use conveyor_conformance::proxy::{closed_port, SilentServer};
use conveyor_core::prelude::*;
use conveyor_core::{
    BrokerOptions, Durability, Error, ErrorKind, GroupConfig, NackOptions, Record, TopicConfig,
};
use conveyor_redis::{RedisBroker, RedisOptions, TlsFiles, Topology};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Long enough for a loaded 2-core machine.
const DEADLINE: Duration = Duration::from_secs(60);

fn opts(ns: &str) -> RedisOptions {
    RedisOptions::default()
        .with_namespace(ns)
        .with_timeout(Duration::from_secs(10))
}

async fn open(t: &Topology, ns: &str, o: BrokerOptions) -> conveyor_core::Result<RedisBroker> {
    conveyor_redis::open(t.clone(), o, opts(ns)).await
}

fn assert_kind(e: &Error, kind: ErrorKind) {
    assert_eq!(e.kind(), kind, "{}", e.chain());
}

/// §7: a server that may evict keys is refused at open with
/// `Unsupported`, naming the setting, its value and the fix.
#[tokio::test]
async fn evicting_policy_is_refused_at_open() {
    let lru = RedisServer::start(&["--maxmemory", "20mb", "--maxmemory-policy", "allkeys-lru"]);
    let t = Topology::single(lru.url());
    let e = open(&t, "evict", BrokerOptions::default())
        .await
        .unwrap_err();
    assert_kind(&e, ErrorKind::Unsupported);
    for words in [
        "maxmemory-policy=allkeys-lru",
        "CONFIG SET maxmemory-policy noeviction",
        "redis.conf",
        &format!("127.0.0.1:{}", lru.port),
    ] {
        assert!(e.message().contains(words), "`{words}` in: {e}");
    }
    // Fixed, it opens.
    lru.command(None, "CONFIG SET maxmemory-policy noeviction");
    open(&t, "evict", BrokerOptions::default())
        .await
        .unwrap()
        .close()
        .await
        .unwrap();
}

/// A managed server that disables `CONFIG`: the policy is read from
/// `INFO memory`; a durability that needs `appendfsync` (which `INFO` does
/// not show) is refused as unverifiable, `none` opens.
#[tokio::test]
async fn without_config_the_settings_come_from_info() {
    let managed = RedisServer::start(&[
        "--rename-command",
        "CONFIG",
        "",
        "--maxmemory-policy",
        "volatile-lru",
    ]);
    let t = Topology::single(managed.url());
    let e = open(&t, "managed", BrokerOptions::default())
        .await
        .unwrap_err();
    assert_kind(&e, ErrorKind::Unsupported);
    assert!(e.message().contains("maxmemory-policy=volatile-lru"), "{e}");

    let managed = RedisServer::start(&[
        "--rename-command",
        "CONFIG",
        "",
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
    ]);
    let t = Topology::single(managed.url());
    let e = open(
        &t,
        "managed",
        BrokerOptions::default().with_durability(Durability::Always),
    )
    .await
    .unwrap_err();
    assert_kind(&e, ErrorKind::Unsupported);
    assert!(e.message().contains("appendfsync cannot be read"), "{e}");
    let b = open(&t, "managed", BrokerOptions::default()).await.unwrap();
    b.create_topic("t", TopicConfig::new(1)).await.unwrap();
    b.producer()
        .await
        .unwrap()
        .send("t", Record::new("x"))
        .await
        .unwrap();
    b.close().await.unwrap();
}

/// On Redis Cluster every master is checked, not only the seed.
#[tokio::test]
async fn evicting_policy_on_any_cluster_master_is_refused() {
    let cluster = common::Cluster::start();
    let t = cluster.topology();
    let ns = common::unique_ns("evict_cl");
    open(&t, &ns, BrokerOptions::default())
        .await
        .unwrap()
        .close()
        .await
        .unwrap();
    let last = &cluster.nodes[2];
    last.command(None, "CONFIG SET maxmemory-policy allkeys-random");
    let e = open(&t, &ns, BrokerOptions::default()).await.unwrap_err();
    assert_kind(&e, ErrorKind::Unsupported);
    assert!(
        e.message().contains("maxmemory-policy=allkeys-random"),
        "{e}"
    );
    assert!(
        e.message().contains(&format!("127.0.0.1:{}", last.port)),
        "names the master: {e}"
    );

    // While running: the same master changes its policy, sends stop
    // (whichever partition they go to), and resume when it is restored.
    last.command(None, "CONFIG SET maxmemory-policy noeviction");
    let b = conveyor_redis::open(
        t.clone(),
        BrokerOptions::default(),
        opts(&ns).with_settings_check(Duration::from_millis(100)),
    )
    .await
    .unwrap();
    b.create_topic("t", TopicConfig::new(6)).await.unwrap();
    let p = b.producer().await.unwrap();
    p.send("t", Record::new("before")).await.unwrap();
    last.command(None, "CONFIG SET maxmemory-policy allkeys-lfu");
    let e = eventually("sends refused on a cluster", DEADLINE, || async {
        p.send("t", Record::new("during").with_partition(0))
            .await
            .err()
    })
    .await;
    assert_kind(&e, ErrorKind::Unavailable);
    assert!(e.message().contains("maxmemory-policy=allkeys-lfu"), "{e}");
    last.command(None, "CONFIG SET maxmemory-policy noeviction");
    eventually("sends again on a cluster", DEADLINE, || async {
        p.send("t", Record::new("after")).await.ok()
    })
    .await;
    b.drop_namespace().await.unwrap();
    b.close().await.unwrap();
}

/// Used memory over `maxmemory` (policy `noeviction`): sends fail
/// `Unavailable` saying the server is full; fetch, describe, lag, polls in
/// both modes, ack, nack, commit, a join, heartbeats and a leave all keep
/// working; once memory is freed, sends work again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_server_reads_and_settles_and_sends_again_when_freed() {
    let server = RedisServer::start(&[]);
    let t = Topology::single(server.url());
    let b = open(&t, "full", BrokerOptions::default()).await.unwrap();
    b.create_topic("t", TopicConfig::new(2)).await.unwrap();
    b.create_topic("spare", TopicConfig::new(1)).await.unwrap();
    let p = b.producer().await.unwrap();
    p.send("spare", Record::new("old")).await.unwrap();
    let _reads_spare = b
        .consumer("s", &["t", "spare"], GroupConfig::stream())
        .await
        .unwrap();
    for i in 0..20 {
        p.send("t", Record::new(format!("m{i}")).with_partition(i % 2))
            .await
            .unwrap();
    }
    let stream = b
        .consumer("s", &["t"], GroupConfig::stream())
        .await
        .unwrap();
    let queue = b.consumer("q", &["t"], GroupConfig::queue()).await.unwrap();

    // Fill the server: maxmemory a little above what it uses, then big
    // values until it refuses one.
    let used: u64 = server
        .command(None, "INFO memory")
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("used_memory in INFO memory");
    server.command(
        None,
        &format!("CONFIG SET maxmemory {}", used + 4 * 1024 * 1024),
    );
    let client = conveyor_redis::redis::Client::open(server.url()).unwrap();
    let mut raw = client.get_multiplexed_async_connection().await.unwrap();
    let mut filled = 0u32;
    fill(&mut raw, &mut filled).await;

    // Sends: retriable, with their own message. (Used memory moves a
    // little, e.g. when a refused command's buffer is freed: a send that
    // still fits is followed by more filling.)
    let mut e = None;
    let started = Instant::now();
    while e.is_none() {
        match p.send("t", Record::new("too much")).await {
            Ok(_) => fill(&mut raw, &mut filled).await,
            Err(err) => e = Some(err),
        }
        assert!(started.elapsed() < DEADLINE, "sends never refused");
    }
    let e = e.unwrap();
    assert_kind(&e, ErrorKind::Unavailable);
    assert!(e.is_retriable());
    let named = format!("Redis at redis://127.0.0.1:{} is full", server.port);
    for words in [named.as_str(), "maxmemory"] {
        assert!(e.message().contains(words), "`{words}` in: {e}");
    }

    // Reads.
    assert_eq!(b.fetch("t", 0, 0, 100).await.unwrap().len(), 10);
    let d = b.describe_topic("t").await.unwrap();
    assert_eq!(d.partitions.iter().map(|p| p.log_end).sum::<u64>(), 20);
    b.group_lag("s").await.unwrap();
    b.group_lag("q").await.unwrap();
    b.describe_group("q").await.unwrap();
    // Stream mode: poll (heartbeat, rebalance) and commit.
    let got = eventually("stream poll on a full server", DEADLINE, || async {
        let got = stream.poll(100, Duration::from_millis(200)).await.unwrap();
        (!got.is_empty()).then_some(got)
    })
    .await;
    stream.commit_batch(&got).await.unwrap();
    // Queue mode: poll, ack, nack.
    let got = eventually("queue poll on a full server", DEADLINE, || async {
        let got = queue.poll(4, Duration::from_millis(200)).await.unwrap();
        (got.len() >= 2).then_some(got)
    })
    .await;
    queue.ack(&got[0]).await.unwrap();
    queue.nack(&got[1], NackOptions::new()).await.unwrap();
    queue.ack_batch(&got[2..]).await.unwrap();
    // A new member joins (and heartbeats), another leaves.
    let joined = b.consumer("q", &["t"], GroupConfig::queue()).await.unwrap();
    joined.poll(1, Duration::from_millis(50)).await.unwrap();
    let new_group = b
        .consumer(
            "late",
            &["t"],
            GroupConfig::stream().with_start(conveyor_core::StartFrom::Latest),
        )
        .await
        .unwrap();
    new_group.close().await.unwrap();
    joined.close().await.unwrap();

    // Deleting a topic (to free memory) works too.
    b.delete_topic("spare").await.unwrap();

    // Freed: sends work again.
    for i in 0..filled {
        conveyor_redis::redis::cmd("UNLINK")
            .arg(format!("filler:{i}"))
            .query_async::<()>(&mut raw)
            .await
            .unwrap();
    }
    eventually("a send after memory was freed", DEADLINE, || async {
        p.send("t", Record::new("fits again")).await.ok()
    })
    .await;
    stream.close().await.unwrap();
    queue.close().await.unwrap();
    b.close().await.unwrap();
}

/// Fill the server with values of decreasing size until even a small
/// one is refused (`OOM`).
async fn fill(raw: &mut conveyor_redis::redis::aio::MultiplexedConnection, filled: &mut u32) {
    for size in [64 * 1024, 4096, 256, 16] {
        let value = "x".repeat(size);
        loop {
            let set: conveyor_redis::redis::RedisResult<()> = conveyor_redis::redis::cmd("SET")
                .arg(format!("filler:{filled}"))
                .arg(&value)
                .query_async(raw)
                .await;
            match set {
                Ok(()) => *filled += 1,
                Err(e) => {
                    assert_eq!(e.code(), Some("OOM"), "{e}");
                    break;
                }
            }
            assert!(*filled < 1_000_000, "the server never became full");
        }
    }
}

/// `appendonly` turned off under a broker opened with `always`: within
/// the check interval sends fail `Unavailable` naming the setting; turned
/// back on, sends work again. The same for an eviction policy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_changed_while_running_stop_sends_until_restored() {
    let server = RedisServer::start(&["--appendonly", "yes", "--appendfsync", "always"]);
    let t = Topology::single(server.url());
    let b = conveyor_redis::open(
        t.clone(),
        BrokerOptions::default().with_durability(Durability::Always),
        opts("changed").with_settings_check(Duration::from_millis(100)),
    )
    .await
    .unwrap();
    b.create_topic("t", TopicConfig::new(1)).await.unwrap();
    let p = b.producer().await.unwrap();
    p.send("t", Record::new("before")).await.unwrap();

    for (bad, words, good) in [
        (
            "CONFIG SET appendonly no",
            "appendonly=no",
            "CONFIG SET appendonly yes",
        ),
        (
            "CONFIG SET maxmemory-policy allkeys-lru",
            "maxmemory-policy=allkeys-lru",
            "CONFIG SET maxmemory-policy noeviction",
        ),
    ] {
        server.command(None, bad);
        let receipts_in_window = std::sync::atomic::AtomicU32::new(0);
        let e = eventually(bad, DEADLINE, || async {
            match p.send("t", Record::new("during")).await {
                Ok(_) => {
                    receipts_in_window.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    None
                }
                Err(e) => Some(e),
            }
        })
        .await;
        assert_kind(&e, ErrorKind::Unavailable);
        assert!(e.message().contains(words), "`{words}` in: {e}");
        eprintln!(
            "{bad}: {} receipts within the check interval",
            receipts_in_window.into_inner()
        );
        // Still refused on the next call (not a one-off).
        assert_kind(
            &p.send("t", Record::new("during")).await.unwrap_err(),
            ErrorKind::Unavailable,
        );
        // Reads are not affected.
        b.fetch("t", 0, 0, 1).await.unwrap();
        server.command(None, good);
        eventually(good, DEADLINE, || async {
            p.send("t", Record::new("after")).await.ok()
        })
        .await;
    }
    b.close().await.unwrap();
}

/// A server restarted with other settings (no AOF) under a broker opened
/// with `always`, the periodic check far away: the lost connection makes
/// the next send read the settings first, so no receipt is issued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_restarted_without_aof_is_checked_before_the_next_send() {
    restarted_without_aof(Duration::ZERO).await;
}

/// The same, with the first send only after the connection manager has
/// had time to reconnect in the background (it does as soon as the
/// socket closes), so that no call fails on the lost connection: the
/// partition the restarted server lost is what makes the next send
/// check. (Were the wait too short for the reconnection, the case would
/// check the path above instead; it cannot pass wrongly.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_restarted_without_aof_is_checked_after_a_silent_reconnection() {
    restarted_without_aof(Duration::from_secs(3)).await;
}

/// The body of the two cases above (a test's own body may unwrap; this
/// helper does the same).
#[allow(clippy::unwrap_used)]
async fn restarted_without_aof(quiet: Duration) {
    let mut server = RedisServer::start(&["--appendonly", "yes", "--appendfsync", "always"]);
    let t = Topology::single(server.url());
    // Auto-create on: the restarted server has lost the topic, and a send
    // that went through would create it again and get a receipt.
    let b = conveyor_redis::open(
        t.clone(),
        BrokerOptions::default()
            .with_durability(Durability::Always)
            .with_auto_create_topics(true),
        opts("restarted").with_settings_check(Duration::from_secs(3600)),
    )
    .await
    .unwrap();
    b.create_topic("t", TopicConfig::new(1)).await.unwrap();
    let p = b.producer().await.unwrap();
    p.send("t", Record::new("before")).await.unwrap();
    server.kill();
    server.restart_with(&["--appendonly", "no"]);
    tokio::time::sleep(quiet).await;
    let e = eventually("a send refused for appendonly=no", DEADLINE, || async {
        match p.send("t", Record::new("after")).await {
            Ok(r) => panic!("a receipt without the AOF: {r:?}"),
            Err(e) if e.message().contains("appendonly=no") => Some(e),
            // The lost connection; or the topic the server lost, before
            // the send cache forgets it (then auto-create would make it).
            Err(e) if matches!(e.kind(), ErrorKind::Unavailable | ErrorKind::TopicNotFound) => None,
            Err(e) => panic!("{}", e.chain()),
        }
    })
    .await;
    assert_kind(&e, ErrorKind::Unavailable);
    b.close().await.unwrap();
}

/// Wrong password: `Unauthenticated` at open; missing password on a
/// server that requires one: `Unauthenticated` at open (not `Unavailable`
/// at every call); a closed port: `Unavailable`. No error text, source
/// chain or `Debug` output contains the password.
#[tokio::test]
async fn credentials_are_refused_at_open_and_never_shown() {
    let secret = "s3cr3t-pw";
    let server = RedisServer::start(&["--requirepass", "the-right-one"]);
    let no_leak = |e: &Error| {
        let (chain, debug) = (format!("{}", e.chain()), format!("{e:?}"));
        assert!(!chain.contains(secret), "password in the chain: {chain}");
        assert!(!debug.contains(secret), "password in Debug: {debug}");
        assert!(!e.message().contains(secret), "password in the message");
    };
    // (a) a server requiring another password.
    let wrong = Topology::single(format!("redis://:{secret}@127.0.0.1:{}", server.port));
    let e = open(&wrong, "auth", BrokerOptions::default())
        .await
        .unwrap_err();
    assert_kind(&e, ErrorKind::Unauthenticated);
    assert!(!e.is_retriable());
    no_leak(&e);
    // Through a URL as well.
    let url = conveyor_core::backend::BrokerUrl::parse(&format!(
        "redis://:{secret}@127.0.0.1:{}/?namespace=auth&timeout_ms=10000",
        server.port
    ))
    .unwrap();
    let e = conveyor_redis::open_url(&url)
        .await
        .map(|_| ())
        .unwrap_err();
    assert_kind(&e, ErrorKind::Unauthenticated);
    no_leak(&e);
    // Missing.
    let e = open(
        &Topology::single(server.url()),
        "auth",
        BrokerOptions::default(),
    )
    .await
    .unwrap_err();
    assert_kind(&e, ErrorKind::Unauthenticated);
    assert_eq!(
        e.message().matches("refused the credentials").count(),
        1,
        "said once: {e}"
    );
    // (b) a closed port.
    let closed = closed_port().expect("a loopback port");
    let e = open(
        &Topology::single(format!("redis://:{secret}@127.0.0.1:{closed}")),
        "auth",
        BrokerOptions::default(),
    )
    .await
    .unwrap_err();
    assert_kind(&e, ErrorKind::Unavailable);
    no_leak(&e);
    // The right one opens.
    let right = Topology::single(format!("redis://:the-right-one@127.0.0.1:{}", server.port));
    let b = open(&right, "auth", BrokerOptions::default())
        .await
        .unwrap();
    b.create_topic("t", TopicConfig::new(1)).await.unwrap();
    assert!(!format!("{b:?}").contains("the-right-one"));
    b.close().await.unwrap();
}

/// An ACL user without the rights Conveyor needs (no scripting):
/// `PermissionDenied`, not retriable.
#[tokio::test]
async fn missing_acl_rights_are_permission_denied() {
    let server = RedisServer::start(&[]);
    server.command(None, "ACL SETUSER app on >app-pw ~* &* +@all -@scripting");
    let t = Topology::single(format!("redis://app:app-pw@127.0.0.1:{}", server.port));
    let b = open(&t, "acl", BrokerOptions::default()).await.unwrap();
    let e = b.create_topic("t", TopicConfig::new(1)).await.unwrap_err();
    assert_kind(&e, ErrorKind::PermissionDenied);
    assert!(!e.is_retriable());
    assert!(e.message().contains("ACL"), "{e}");
    b.close().await.unwrap();
}

/// `open` against a server that accepts and never answers, and against a
/// closed port, ends `Unavailable` within its one timeout (asserted with
/// a generous bound: ten times the timeout).
#[tokio::test]
async fn open_ends_within_its_timeout_on_a_silent_server_or_a_closed_port() {
    let silent = SilentServer::start().await.expect("a loopback port");
    let silent_port = silent.port();
    let closed = closed_port().expect("a loopback port");
    let timeout = Duration::from_millis(1000);
    for port in [silent_port, closed] {
        let started = Instant::now();
        let got = conveyor_redis::open(
            Topology::single(format!("redis://127.0.0.1:{port}")),
            BrokerOptions::default(),
            RedisOptions::default()
                .with_namespace("silent")
                .with_timeout(timeout),
        )
        .await;
        let took = started.elapsed();
        let e = got.unwrap_err();
        eprintln!("open on port {port}: {took:?}: {e}");
        assert_kind(&e, ErrorKind::Unavailable);
        assert!(
            took < timeout * 10,
            "open on port {port} took {took:?} (timeout {timeout:?})"
        );
    }
}

/// Clients of a server, by `CLIENT LIST`, except the one asking.
fn clients(server: &RedisServer) -> usize {
    server
        .command(None, "CLIENT LIST")
        .lines()
        .filter(|l| !l.contains("cmd=client|list"))
        .count()
}

/// `close()` drops the broker's connections (the main one, the wake-up
/// listener's) even while producers and consumers are still held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_drops_the_connections_while_handles_live() {
    let server = RedisServer::start(&[]);
    let t = Topology::single(server.url());
    assert_eq!(clients(&server), 0);
    let b = open(&t, "close", BrokerOptions::default()).await.unwrap();
    b.create_topic("t", TopicConfig::new(1)).await.unwrap();
    let p = b.producer().await.unwrap();
    p.send("t", Record::new("x")).await.unwrap();
    let c = b.consumer("g", &["t"], GroupConfig::queue()).await.unwrap();
    c.poll(1, Duration::from_millis(500)).await.unwrap();
    eventually("the broker's connections", DEADLINE, || async {
        (clients(&server) >= 1).then_some(())
    })
    .await;
    b.close().await.unwrap();
    eventually("no connection after close", DEADLINE, || async {
        (clients(&server) == 0).then_some(())
    })
    .await;
    // The handles are still here, and closed.
    assert_kind(
        &p.send("t", Record::new("y")).await.unwrap_err(),
        ErrorKind::Closed,
    );
    assert_kind(
        &c.poll(1, Duration::from_millis(10)).await.unwrap_err(),
        ErrorKind::Closed,
    );
    drop((p, c));
}

/// TLS: a broker opens over `rediss://` with the CA that signed the
/// server's certificate, produces and consumes; with another CA it is
/// refused (`Unauthenticated`, naming TLS), not `Internal`; a CA file
/// that does not exist is `InvalidArgument`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_connects_with_the_right_ca_and_refuses_another() {
    let certs = TlsCerts::generate("conveyor-test-client");
    let server = RedisServer::start_tls(&certs, &[]);
    let url = format!("rediss://127.0.0.1:{}", server.port);
    let t = Topology::single(url.clone()).with_tls(TlsFiles::default().with_ca_file(&certs.ca));
    let b: Arc<dyn Broker> = Arc::new(open(&t, "tls", BrokerOptions::default()).await.unwrap());
    b.create_topic("t", TopicConfig::new(1)).await.unwrap();
    b.producer()
        .await
        .unwrap()
        .send("t", Record::new("over tls"))
        .await
        .unwrap();
    let c = b.consumer("g", &["t"], GroupConfig::queue()).await.unwrap();
    let got = eventually("a message over TLS", DEADLINE, || async {
        let got = c.poll(1, Duration::from_millis(200)).await.unwrap();
        (!got.is_empty()).then_some(got)
    })
    .await;
    assert_eq!(got[0].value.as_ref(), b"over tls");
    c.ack(&got[0]).await.unwrap();
    c.close().await.unwrap();
    b.close().await.unwrap();

    // The same through a URL.
    let by_url = conveyor_core::backend::BrokerUrl::parse(&format!(
        "{url}/?namespace=tls&tls_ca={}",
        certs.ca.display()
    ))
    .unwrap();
    let b = conveyor_redis::open_url(&by_url).await.unwrap();
    assert_eq!(b.fetch("t", 0, 0, 10).await.unwrap().len(), 1);
    b.close().await.unwrap();

    // A server that checks clients: refused without a client
    // certificate, served with one its CA signed.
    let checking = RedisServer::start_tls_checking(&certs, true, &[]);
    let url2 = format!("rediss://127.0.0.1:{}", checking.port);
    let no_cert =
        Topology::single(url2.clone()).with_tls(TlsFiles::default().with_ca_file(&certs.ca));
    let e = open(&no_cert, "tls", BrokerOptions::default())
        .await
        .unwrap_err();
    eprintln!("no client certificate: {}", e.chain());
    assert!(
        matches!(
            e.kind(),
            ErrorKind::Unauthenticated | ErrorKind::Unavailable
        ),
        "{}",
        e.chain()
    );
    let with_cert = Topology::single(url2).with_tls(
        TlsFiles::default()
            .with_ca_file(&certs.ca)
            .with_client_cert(&certs.client_cert, &certs.client_key),
    );
    let b = open(&with_cert, "tls", BrokerOptions::default())
        .await
        .unwrap();
    b.create_topic("t", TopicConfig::new(1)).await.unwrap();
    b.close().await.unwrap();

    // Another CA.
    let wrong =
        Topology::single(url.clone()).with_tls(TlsFiles::default().with_ca_file(&certs.other_ca));
    let e = open(&wrong, "tls", BrokerOptions::default())
        .await
        .unwrap_err();
    assert_kind(&e, ErrorKind::Unauthenticated);
    assert!(e.message().contains("TLS"), "{e}");
    // No CA file there.
    let missing = Topology::single(url)
        .with_tls(TlsFiles::default().with_ca_file(certs.dir.join("nope.pem")));
    let e = open(&missing, "tls", BrokerOptions::default())
        .await
        .unwrap_err();
    assert_kind(&e, ErrorKind::InvalidArgument);
}

/// `rediss+cluster://`: a Redis Cluster over TLS (`tls-cluster yes`):
/// open (settings read on every master over TLS), produce to partitions
/// on every shard, read them back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_cluster_produces_and_reads() {
    let certs = TlsCerts::generate("conveyor-test-client");
    let cluster = common::Cluster::start_tls(&certs);
    let url = conveyor_core::backend::BrokerUrl::parse(&format!(
        "rediss+cluster://127.0.0.1:{}/?namespace=tlscl&tls_ca={}&durability=always",
        cluster.nodes[0].port,
        certs.ca.display()
    ))
    .unwrap();
    let b = conveyor_redis::open_url(&url).await.unwrap();
    b.create_topic("t", TopicConfig::new(6)).await.unwrap();
    let p = b.producer().await.unwrap();
    for part in 0..6 {
        p.send("t", Record::new(format!("p{part}")).with_partition(part))
            .await
            .unwrap();
    }
    for part in 0..6 {
        let got = b.fetch("t", part, 0, 10).await.unwrap();
        assert_eq!(got.len(), 1, "partition {part}");
        assert_eq!(got[0].value.as_ref(), format!("p{part}").as_bytes());
    }
    b.close().await.unwrap();
}
