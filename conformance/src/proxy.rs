//! A fault-injecting TCP proxy for server backends (contract §7: "a
//! backend that loses its server returns a retriable error and continues
//! when the server is back"): a test points the backend at
//! [`FaultProxy::addr`] instead of the server and cuts, stalls or refuses
//! its connections on demand. It owns only the sockets it accepted and the
//! ones it opened to the upstream; it never talks to the server otherwise.
//!
//! ```ignore
//! let proxy = FaultProxy::start("127.0.0.1:5432".parse()?).await?;
//! let broker = my_backend::open(&format!("postgres://{}/db", proxy.addr())).await?;
//! proxy.drop_connections(); // every pooled connection is reset now
//! proxy.blackhole(true);    // the server stops answering; calls time out
//! proxy.blackhole(false);   // black-holed connections are closed; new ones work
//! proxy.refuse(true);       // the server is "down": new connections close at once
//! ```
//!
//! Faults, as seen by a client:
//!
//! - [`drop_connections`](FaultProxy::drop_connections): every open
//!   connection is reset (`SO_LINGER` 0, so the client reads a reset, or
//!   EOF if it was not reading), as is its upstream connection. New
//!   connections are forwarded as usual.
//! - [`blackhole`](FaultProxy::blackhole): while on, nothing is forwarded
//!   either way, on open connections and on new ones (which are accepted
//!   but never connected upstream), and nothing is closed: clients hang
//!   until their own timeouts. Bytes read from one side when the blackhole
//!   starts are discarded. When the blackhole ends, **every connection that
//!   was black-holed is closed** (a stalled protocol exchange cannot be
//!   resumed sensibly); connections accepted after it ends forward again.
//! - [`refuse`](FaultProxy::refuse): while on, new connections are
//!   accepted and closed at once (EOF before any byte); open ones are left
//!   alone.
//!
//! A connection ends when both directions have ended: an EOF from one side
//! is passed on as a half-close (`shutdown` of the write side) to the
//! other, and an error on either side closes both. Dropping the
//! [`FaultProxy`] stops the listener and closes every connection.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

/// What every connection task watches.
#[derive(Debug, Clone, Copy, Default)]
struct Control {
    /// Bumped by every `drop_connections`: a connection started under an
    /// older count is reset.
    drops: u64,
    /// Forward nothing.
    blackhole: bool,
}

/// State shared with the listener and the connection tasks.
#[derive(Debug)]
struct Shared {
    upstream: SocketAddr,
    refuse: AtomicBool,
    open: AtomicUsize,
}

/// A TCP proxy on `127.0.0.1` that forwards to one upstream address and
/// injects faults on demand (see the [module docs](self)). Its tasks run on
/// the tokio runtime it was started on; dropping it stops them.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    control: watch::Sender<Control>,
    listener: JoinHandle<()>,
}

impl FaultProxy {
    /// Listen on `127.0.0.1:0` and forward every connection to `upstream`
    /// (a connection the upstream refuses is closed).
    ///
    /// # Errors
    /// The error of binding the listening socket.
    ///
    /// # Cancel safety
    /// Cancel safe: dropped before it returns, nothing is left listening.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<FaultProxy> {
        let listener = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            upstream,
            refuse: AtomicBool::new(false),
            open: AtomicUsize::new(0),
        });
        let (control, watching) = watch::channel(Control::default());
        let listener = tokio::spawn(accept_loop(listener, shared.clone(), watching));
        Ok(FaultProxy {
            addr,
            shared,
            control,
            listener,
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Reset every open connection now (black-holed ones too); new
    /// connections are accepted and forwarded as before.
    pub fn drop_connections(&self) {
        self.control.send_modify(|c| c.drops += 1);
    }

    /// Turn the blackhole on or off. While on, nothing is forwarded either
    /// way and nothing is closed; turning it off closes every connection
    /// that was black-holed (see the [module docs](self)).
    pub fn blackhole(&self, on: bool) {
        self.control.send_if_modified(|c| {
            let changed = c.blackhole != on;
            c.blackhole = on;
            changed
        });
    }

    /// Turn refusal on or off. While on, new connections are closed as
    /// soon as they are accepted; open ones are not touched.
    pub fn refuse(&self, on: bool) {
        self.shared.refuse.store(on, Ordering::SeqCst);
    }

    /// Connections open now: accepted and not yet closed by either side or
    /// by a fault (a black-holed connection counts until the blackhole
    /// ends, even if its client gave up). Refused connections never count.
    pub fn connections(&self) -> usize {
        self.shared.open.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    /// Stop the listener and close every connection (the connection tasks
    /// end with the listener's task, and on seeing the control channel
    /// closed).
    fn drop(&mut self) {
        self.listener.abort();
    }
}

/// Counts one open connection until dropped.
struct OpenGuard(Arc<Shared>);

impl OpenGuard {
    fn new(shared: &Arc<Shared>) -> Self {
        shared.open.fetch_add(1, Ordering::SeqCst);
        OpenGuard(shared.clone())
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    control: watch::Receiver<Control>,
) {
    // Owning the tasks here means aborting this task aborts them all.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                // Accept errors (a client that reset before accept, out of
                // descriptors) concern one connection, not the listener.
                let Ok((client, _)) = accepted else { continue };
                if shared.refuse.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let open = OpenGuard::new(&shared);
                connections.spawn(connection(client, open, control.clone()));
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// Why forwarding stopped.
enum Fault {
    /// `drop_connections` (or the proxy is gone): reset.
    Dropped,
    /// The blackhole is on: hold the connection until it ends.
    Blackhole,
}

/// The fault in force for a connection started under `drops`, if any.
fn fault_now(control: &watch::Receiver<Control>, drops: u64) -> Option<Fault> {
    let c = *control.borrow();
    if c.drops != drops {
        Some(Fault::Dropped)
    } else if c.blackhole {
        Some(Fault::Blackhole)
    } else {
        None
    }
}

/// Wait for a fault to concern this connection.
async fn next_fault(control: &mut watch::Receiver<Control>, drops: u64) -> Fault {
    loop {
        control.borrow_and_update();
        if let Some(fault) = fault_now(control, drops) {
            return fault;
        }
        if control.changed().await.is_err() {
            return Fault::Dropped;
        }
    }
}

async fn connection(client: TcpStream, open: OpenGuard, mut control: watch::Receiver<Control>) {
    let drops = control.borrow_and_update().drops;
    // The pumps' view of the control (`next_fault` holds `control`).
    let gate = control.clone();
    let mut upstream = None;
    if fault_now(&control, drops).is_none() {
        tokio::select! {
            connected = TcpStream::connect(open.0.upstream) => match connected {
                Ok(u) => upstream = Some(u),
                Err(_) => return, // the upstream refused: close the client
            },
            _ = next_fault(&mut control, drops) => {}
        }
    }
    let mut client = client;
    let fault = match upstream.as_mut() {
        Some(upstream) if fault_now(&control, drops).is_none() => {
            tokio::select! {
                () = forward(&mut client, upstream, &gate, drops) => return,
                fault = next_fault(&mut control, drops) => fault,
            }
        }
        _ => next_fault(&mut control, drops).await,
    };
    if let Fault::Blackhole = fault {
        // Hold both sockets, forwarding nothing, until the blackhole ends
        // (then close) or the connections are dropped (then reset).
        loop {
            match fault_now(&control, drops) {
                Some(Fault::Blackhole) => {}
                None => return,
                Some(Fault::Dropped) => break,
            }
            if control.changed().await.is_err() {
                break;
            }
        }
    }
    // Reset: SO_LINGER 0 makes the close send RST rather than FIN.
    let _ = client.set_zero_linger();
    if let Some(upstream) = &upstream {
        let _ = upstream.set_zero_linger();
    }
}

/// Forward both ways until both directions ended (EOF passed on as a
/// half-close) or one failed. Never returns while a fault is in force: a
/// direction that notices one after a read waits for `next_fault` to take
/// over.
async fn forward(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    control: &watch::Receiver<Control>,
    drops: u64,
) {
    let (client_read, client_write) = client.split();
    let (upstream_read, upstream_write) = upstream.split();
    let up = pump(client_read, upstream_write, control, drops);
    let down = pump(upstream_read, client_write, control, drops);
    let _ = tokio::try_join!(up, down);
}

/// Copy one direction until EOF (then shut the other side's write half).
async fn pump(
    mut from: tokio::net::tcp::ReadHalf<'_>,
    mut to: tokio::net::tcp::WriteHalf<'_>,
    control: &watch::Receiver<Control>,
    drops: u64,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = from.read(&mut buf).await?;
        if fault_now(control, drops).is_some() {
            // The fault started before these bytes arrived; they are not
            // forwarded. `next_fault` sees it too and ends this future.
            std::future::pending::<()>().await;
        }
        if n == 0 {
            return to.shutdown().await;
        }
        to.write_all(&buf[..n]).await?;
    }
}
