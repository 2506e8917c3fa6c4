//! One connection type for standalone Redis and Redis Cluster, the
//! server-side scripts, and the mapping of driver errors to [`ErrorKind`].

use conveyor_core::backend::redact_url;
use conveyor_core::{Error, ErrorKind, Result};
use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};

/// A multiplexed connection: a standalone server (reconnected by the
/// connection manager) or a cluster (each command routed to its slot's
/// master). Cheap to clone; clones share the socket(s) and the count of
/// [`Losses`]. `Closed` is what a closed broker holds instead: its
/// sockets are gone, and a call that still reaches the server fails as
/// [`ErrorKind::Closed`].
#[derive(Clone)]
pub(crate) enum Conn {
    Single(ConnectionManager, Losses),
    Cluster(ClusterConnection, Losses),
    Closed,
}

/// How many calls on a connection and its clones failed for want of the
/// server (a lost socket, a timeout, a server still loading). The driver
/// reconnects after such a failure; the server on the other end may then
/// be a restarted one with other settings, whichever call (a user's, or a
/// background task's that nobody sees fail) met the loss. The settings
/// check compares this count with the one it saw ([`crate::settings`]).
#[derive(Clone, Default)]
pub(crate) struct Losses(Arc<AtomicU64>);

impl Losses {
    fn note<T>(&self, r: &redis::RedisResult<T>) {
        if r.as_ref().is_err_and(is_transient) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Conn {
    /// [`Losses`] so far (0 for a closed broker's).
    pub(crate) fn losses(&self) -> u64 {
        match self {
            Conn::Single(_, l) | Conn::Cluster(_, l) => l.0.load(Ordering::Relaxed),
            Conn::Closed => 0,
        }
    }
}

/// The description of the driver error a `Conn::Closed` returns.
const CLOSED: &str = "conveyor: the broker is closed";

fn closed_error() -> redis::RedisError {
    redis::RedisError::from((redis::ErrorKind::Client, CLOSED))
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c, l) => noted(l, c.req_packed_command(cmd)),
            Conn::Cluster(c, l) => noted(l, c.req_packed_command(cmd)),
            Conn::Closed => Box::pin(async { Err(closed_error()) }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c, l) => noted(l, c.req_packed_commands(pipeline, offset, count)),
            Conn::Cluster(c, l) => noted(l, c.req_packed_commands(pipeline, offset, count)),
            Conn::Closed => Box::pin(async { Err(closed_error()) }),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c, _) => c.get_db(),
            Conn::Cluster(c, _) => c.get_db(),
            Conn::Closed => 0,
        }
    }
}

/// `call`, counting its failure in `losses` if the server was lost.
fn noted<'a, T: Send + 'a>(losses: &Losses, call: RedisFuture<'a, T>) -> RedisFuture<'a, T> {
    let losses = losses.clone();
    Box::pin(async move {
        let r = call.await;
        losses.note(&r);
        r
    })
}

/// The server-side code, one Lua file per step (`lua/*.lua`, each with its
/// KEYS/ARGV header). Each script's first line declares its Redis 7 flags:
/// `allow-oom` for what must work on a full server (reading, settling,
/// joining, heartbeats, retention), `no-writes` for pure reads, none
/// (`#!lua`) for appends, which a full server refuses before they start. `redis::Script` sends `EVALSHA` and loads the script
/// on `NOSCRIPT` (a restarted server, or a cluster node that never saw it).
pub(crate) struct Scripts {
    pub append: redis::Script,
    pub find_time: redis::Script,
    pub retain: redis::Script,
    pub topic_create: redis::Script,
    pub topic_update: redis::Script,
    pub topic_delete: redis::Script,
    pub partition_init: redis::Script,
    pub join: redis::Script,
    pub group_register: redis::Script,
    pub group_alter: redis::Script,
    pub commit_init: redis::Script,
    pub group_touch: redis::Script,
    pub heartbeat: redis::Script,
    pub rebalance: redis::Script,
    pub commit: redis::Script,
    pub leave: redis::Script,
    pub queue_poll: redis::Script,
    pub queue_settle: redis::Script,
    pub queue_dead: redis::Script,
    pub queue_state: redis::Script,
    pub queue_seek: redis::Script,
    pub queue_migrate: redis::Script,
    pub group_delete: redis::Script,
}

/// The scripts, hashed once per process.
pub(crate) static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| Scripts {
    append: redis::Script::new(include_str!("../lua/append.lua")),
    find_time: redis::Script::new(include_str!("../lua/find_time.lua")),
    retain: redis::Script::new(include_str!("../lua/retain.lua")),
    topic_create: redis::Script::new(include_str!("../lua/topic_create.lua")),
    topic_update: redis::Script::new(include_str!("../lua/topic_update.lua")),
    topic_delete: redis::Script::new(include_str!("../lua/topic_delete.lua")),
    partition_init: redis::Script::new(include_str!("../lua/partition_init.lua")),
    join: redis::Script::new(include_str!("../lua/join.lua")),
    group_register: redis::Script::new(include_str!("../lua/group_register.lua")),
    group_alter: redis::Script::new(include_str!("../lua/group_alter.lua")),
    commit_init: redis::Script::new(include_str!("../lua/commit_init.lua")),
    group_touch: redis::Script::new(include_str!("../lua/group_touch.lua")),
    heartbeat: redis::Script::new(include_str!("../lua/heartbeat.lua")),
    rebalance: redis::Script::new(include_str!("../lua/rebalance.lua")),
    commit: redis::Script::new(include_str!("../lua/commit.lua")),
    leave: redis::Script::new(include_str!("../lua/leave.lua")),
    queue_poll: redis::Script::new(include_str!("../lua/queue_poll.lua")),
    queue_settle: redis::Script::new(include_str!("../lua/queue_settle.lua")),
    queue_dead: redis::Script::new(include_str!("../lua/queue_dead.lua")),
    queue_state: redis::Script::new(include_str!("../lua/queue_state.lua")),
    queue_seek: redis::Script::new(include_str!("../lua/queue_seek.lua")),
    queue_migrate: redis::Script::new(include_str!("../lua/queue_migrate.lua")),
    group_delete: redis::Script::new(include_str!("../lua/group_delete.lua")),
});

/// Is this driver error the server (or the network to it) being
/// unavailable, so that the call may be retried?
pub(crate) fn is_transient(e: &redis::RedisError) -> bool {
    use redis::ErrorKind as K;
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || e.is_cluster_error()
        || matches!(
            e.code(),
            Some("LOADING" | "BUSY" | "TRYAGAIN" | "CLUSTERDOWN" | "MASTERDOWN")
        )
        || matches!(e.kind(), K::Io)
}

/// The words a "Redis is full" error carries; [`crate::broker::Inner`]
/// names the server in them.
pub(crate) const FULL: &str = "Redis is full";

/// Is this driver error a failed TLS handshake because we do not trust
/// the server's certificate (or the server refused ours)?
fn tls_refused(text: &str) -> bool {
    text.contains("invalid peer certificate")
        || text.contains("UnknownIssuer")
        || text.contains("NotValidForName")
        || text.contains("received fatal alert")
        || text.contains("CertificateRequired")
}

/// Map a driver error met while doing `what` to an [`Error`], saying
/// whose fault it is: transient ones (a lost connection, a timeout, a
/// full server) are `Unavailable` (retriable); refused credentials are
/// `Unauthenticated`, missing ACL rights `PermissionDenied` (fix, do not
/// retry); a script's own refusal codes keep their meaning; anything else
/// is `Internal` with the server's words. No URL in the text keeps its
/// password, and the driver's error is not kept as a source (its text is
/// in the message once).
pub(crate) fn map_err(what: &str, e: redis::RedisError) -> Error {
    let text = redact_url(&e.to_string());
    if e.kind() == redis::ErrorKind::Client && text.contains(CLOSED) {
        return Error::new(ErrorKind::Closed, format!("{what}: the broker is closed"));
    }
    match e.code() {
        Some("NOTOPIC") => {
            return Error::new(ErrorKind::TopicNotFound, format!("{what}: no such topic"))
        }
        Some("NOGROUP") => {
            return Error::new(ErrorKind::GroupNotFound, format!("{what}: no such group"))
        }
        Some("OOM") => {
            return Error::new(
                ErrorKind::Unavailable,
                format!(
                    "{what}: {FULL}: maxmemory reached (the server answered `{text}`); reads, \
                     acks and commits still work; free memory (retention, deleting topics, \
                     consuming) or raise maxmemory, then retry"
                ),
            )
        }
        Some("NOPERM") => {
            return Error::new(
                ErrorKind::PermissionDenied,
                format!(
                    "{what}: the Redis user lacks the rights for this ({text}); grant them in \
                     the server's ACL (the user needs Conveyor's keys and the commands it uses)"
                ),
            )
        }
        Some("WRONGPASS" | "NOAUTH") => return unauthenticated(what, &text),
        _ => {}
    }
    if e.kind() == redis::ErrorKind::AuthenticationFailed {
        return unauthenticated(what, &text);
    }
    if tls_refused(&text) {
        return Error::new(
            ErrorKind::Unauthenticated,
            format!(
                "{what}: the TLS handshake failed ({text}); check that tls_ca names the CA \
                 that signed the server's certificate and that the host name matches it (and \
                 tls_cert/tls_key, if the server checks clients)"
            ),
        );
    }
    if is_transient(&e) {
        return Error::new(
            ErrorKind::Unavailable,
            format!("{what}: the Redis server is unavailable ({text}); retry when it is back"),
        );
    }
    Error::internal(format!("{what}: Redis answered with an error: {text}"))
}

fn unauthenticated(what: &str, text: &str) -> Error {
    Error::new(
        ErrorKind::Unauthenticated,
        format!(
            "{what}: the Redis server refused the credentials ({text}); give the right user \
             and password in the URL (redis://user:password@host:port)"
        ),
    )
}

/// `map_err` for `.map_err(during(..))`.
pub(crate) fn during(what: impl Into<String>) -> impl FnOnce(redis::RedisError) -> Error {
    let what = what.into();
    move |e| map_err(&what, e)
}

/// Decoding helpers for script replies.
pub(crate) mod reply {
    use super::*;

    fn bad(what: &str) -> Error {
        Error::new(
            ErrorKind::Corrupt,
            format!("unexpected reply from the Redis server: {what}"),
        )
    }

    /// An array's items.
    pub(crate) fn array(v: Value) -> Result<Vec<Value>> {
        match v {
            Value::Array(items) | Value::Set(items) => Ok(items),
            Value::Nil => Ok(Vec::new()),
            other => Err(bad(&format!("expected an array, got {other:?}"))),
        }
    }

    /// An integer (or a string holding one).
    pub(crate) fn int(v: &Value) -> Result<i64> {
        match v {
            Value::Int(i) => Ok(*i),
            Value::BulkString(b) => std::str::from_utf8(b)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| bad("expected a number")),
            Value::SimpleString(s) => s.parse().map_err(|_| bad("expected a number")),
            other => Err(bad(&format!("expected a number, got {other:?}"))),
        }
    }

    /// A non-negative integer.
    pub(crate) fn uint(v: &Value) -> Result<u64> {
        let i = int(v)?;
        u64::try_from(i).map_err(|_| bad(&format!("expected a non-negative number, got {i}")))
    }

    /// Bytes (a bulk string).
    pub(crate) fn bytes(v: Value) -> Result<Vec<u8>> {
        match v {
            Value::BulkString(b) => Ok(b),
            Value::SimpleString(s) => Ok(s.into_bytes()),
            Value::Int(i) => Ok(i.to_string().into_bytes()),
            other => Err(bad(&format!("expected a string, got {other:?}"))),
        }
    }

    /// A UTF-8 string.
    pub(crate) fn string(v: Value) -> Result<String> {
        String::from_utf8(bytes(v)?).map_err(|_| bad("expected UTF-8"))
    }
}
