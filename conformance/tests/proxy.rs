//! [`FaultProxy`] against a tiny echo server started in each test:
//! forwarding is byte for byte both ways, and each fault does what its
//! docs say. Waits are on events (a read, an EOF) under generous
//! deadlines; the only timed assertion is "this read does not complete"
//! under a blackhole, which is what a black-holed client experiences.

// Test code: a failed unwrap is a failed test, with its line.
#![allow(clippy::unwrap_used)]

use conveyor_conformance::proxy::FaultProxy;
use conveyor_conformance::{eventually, WAIT};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How long a black-holed read is given to (wrongly) complete.
const SILENCE: Duration = Duration::from_millis(300);

/// An echo server: every connection gets back what it sent; an EOF is
/// answered with one after the echo. Runs until the test's runtime ends.
async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = socket.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

async fn start() -> FaultProxy {
    FaultProxy::start(echo_server().await).await.unwrap()
}

/// Send `data` and read back exactly as many bytes.
async fn round_trip(conn: &mut TcpStream, data: &[u8]) -> Vec<u8> {
    conn.write_all(data).await.unwrap();
    let mut back = vec![0u8; data.len()];
    tokio::time::timeout(WAIT, conn.read_exact(&mut back))
        .await
        .expect("the echo came back in time")
        .unwrap();
    back
}

/// The connection was closed by the proxy: a read ends (EOF or reset)
/// within the deadline.
async fn assert_closed(conn: &mut TcpStream, what: &str) {
    let mut buf = [0u8; 64];
    match tokio::time::timeout(WAIT, conn.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => {}
        Ok(Ok(n)) => panic!("{what}: read {n} bytes from a connection that should be closed"),
        Err(_) => panic!("{what}: the connection was not closed within {WAIT:?}"),
    }
}

/// Nothing arrives on `conn` for [`SILENCE`], and it is not closed.
async fn assert_silent(conn: &mut TcpStream, what: &str) {
    let mut buf = [0u8; 64];
    if let Ok(r) = tokio::time::timeout(SILENCE, conn.read(&mut buf)).await {
        panic!("{what}: a black-holed read completed: {r:?}");
    }
}

async fn wait_connections(proxy: &FaultProxy, n: usize) {
    eventually(&format!("{n} open connections"), WAIT, || async {
        (proxy.connections() == n).then_some(())
    })
    .await;
}

#[tokio::test]
async fn forwards_byte_for_byte_both_ways() {
    let proxy = start().await;
    let mut conn = TcpStream::connect(proxy.addr()).await.unwrap();
    // Every byte value, then a payload larger than the proxy's buffer.
    let all: Vec<u8> = (0..=255u8).collect();
    assert_eq!(round_trip(&mut conn, &all).await, all);
    let big: Vec<u8> = (0..1_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let (mut r, mut w) = conn.split();
    let send = async {
        w.write_all(&big).await.unwrap();
        // A half-close goes through: the echo server answers with EOF.
        w.shutdown().await.unwrap();
    };
    let mut back = Vec::new();
    let receive = r.read_to_end(&mut back);
    let ((), got) = tokio::time::timeout(WAIT, async { tokio::join!(send, receive) })
        .await
        .expect("the echo of 1 MB came back in time");
    got.unwrap();
    assert!(back == big, "the echo differs ({} bytes back)", back.len());
    drop(conn);
    wait_connections(&proxy, 0).await;
}

#[tokio::test]
async fn counts_open_connections() {
    let proxy = start().await;
    let mut a = TcpStream::connect(proxy.addr()).await.unwrap();
    let mut b = TcpStream::connect(proxy.addr()).await.unwrap();
    round_trip(&mut a, b"a").await;
    round_trip(&mut b, b"b").await;
    assert_eq!(proxy.connections(), 2);
    drop(a);
    wait_connections(&proxy, 1).await;
    drop(b);
    wait_connections(&proxy, 0).await;
}

#[tokio::test]
async fn drop_connections_ends_open_ones_and_new_ones_work() {
    let proxy = start().await;
    let mut a = TcpStream::connect(proxy.addr()).await.unwrap();
    let mut b = TcpStream::connect(proxy.addr()).await.unwrap();
    round_trip(&mut a, b"hello").await;
    round_trip(&mut b, b"hello").await;
    proxy.drop_connections();
    assert_closed(&mut a, "a after drop_connections").await;
    assert_closed(&mut b, "b after drop_connections").await;
    wait_connections(&proxy, 0).await;
    let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
    assert_eq!(round_trip(&mut c, b"again").await, b"again");
    assert_eq!(proxy.connections(), 1);
}

#[tokio::test]
async fn blackhole_stops_traffic_and_closes_black_holed_connections_when_it_ends() {
    let proxy = start().await;
    let mut before = TcpStream::connect(proxy.addr()).await.unwrap();
    round_trip(&mut before, b"ping").await;

    proxy.blackhole(true);
    // An open connection stops forwarding.
    before.write_all(b"lost").await.unwrap();
    assert_silent(&mut before, "open connection").await;
    // A new connection is accepted but forwards nothing.
    let mut during = TcpStream::connect(proxy.addr()).await.unwrap();
    during.write_all(b"lost too").await.unwrap();
    assert_silent(&mut during, "new connection").await;
    assert_silent(&mut before, "open connection, again").await;
    // Black-holed connections stay open.
    wait_connections(&proxy, 2).await;

    proxy.blackhole(false);
    // Black-holed connections are closed when it ends...
    assert_closed(&mut before, "connection black-holed while open").await;
    assert_closed(&mut during, "connection accepted during the blackhole").await;
    wait_connections(&proxy, 0).await;
    // ... and new ones forward again.
    let mut after = TcpStream::connect(proxy.addr()).await.unwrap();
    assert_eq!(round_trip(&mut after, b"pong").await, b"pong");
}

#[tokio::test]
async fn drop_connections_resets_black_holed_ones() {
    let proxy = start().await;
    let mut conn = TcpStream::connect(proxy.addr()).await.unwrap();
    round_trip(&mut conn, b"x").await;
    proxy.blackhole(true);
    assert_silent(&mut conn, "black-holed").await;
    proxy.drop_connections();
    assert_closed(&mut conn, "black-holed, then dropped").await;
    wait_connections(&proxy, 0).await;
    // Still black-holed for new connections.
    let mut during = TcpStream::connect(proxy.addr()).await.unwrap();
    during.write_all(b"y").await.unwrap();
    assert_silent(&mut during, "new connection").await;
}

#[tokio::test]
async fn refuse_closes_new_connections_and_spares_open_ones() {
    let proxy = start().await;
    let mut open = TcpStream::connect(proxy.addr()).await.unwrap();
    round_trip(&mut open, b"before").await;

    proxy.refuse(true);
    for i in 0..3 {
        let mut refused = TcpStream::connect(proxy.addr()).await.unwrap();
        // The write may or may not reach the closed socket; the read ends.
        let _ = refused.write_all(b"anyone?").await;
        assert_closed(&mut refused, &format!("refused connection {i}")).await;
    }
    assert_eq!(round_trip(&mut open, b"still").await, b"still");
    assert_eq!(proxy.connections(), 1);

    proxy.refuse(false);
    let mut back = TcpStream::connect(proxy.addr()).await.unwrap();
    assert_eq!(round_trip(&mut back, b"back").await, b"back");
}

#[tokio::test]
async fn an_upstream_that_refuses_closes_the_client() {
    // A port nobody listens on: bind, note it, close.
    let gone = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let proxy = FaultProxy::start(gone).await.unwrap();
    let mut conn = TcpStream::connect(proxy.addr()).await.unwrap();
    assert_closed(&mut conn, "upstream down").await;
    wait_connections(&proxy, 0).await;
}

#[tokio::test]
async fn dropping_the_proxy_closes_everything() {
    let proxy = start().await;
    let addr = proxy.addr();
    let mut conn = TcpStream::connect(addr).await.unwrap();
    round_trip(&mut conn, b"x").await;
    drop(proxy);
    assert_closed(&mut conn, "after the proxy was dropped").await;
    // The listener is gone: connecting is refused.
    eventually("the listener to close", WAIT, || async {
        TcpStream::connect(addr).await.is_err().then_some(())
    })
    .await;
}
