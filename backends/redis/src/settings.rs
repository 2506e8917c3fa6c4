//! The server settings Conveyor's guarantees rest on, checked at open and
//! again while running: `maxmemory-policy` must be `noeviction` (an
//! evicting server drops acknowledged records, offsets and the topic
//! registry without a word), and the append-only file must be configured
//! for the broker's durability. Owns reading them (`CONFIG GET`, or
//! `INFO` where a managed server disables `CONFIG`), judging them, and
//! the state that lets sends through or stops them; it does not touch
//! any key.

use crate::conn::{self, Conn};
use crate::servers::Servers;
use conveyor_core::backend::redact_url;
use conveyor_core::{Durability, Error, ErrorKind, Result};
use parking_lot::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The settings of one master, as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NodeSettings {
    /// The node as shown in messages (no password).
    pub node: String,
    pub maxmemory_policy: Option<String>,
    pub appendonly: Option<String>,
    /// `None` when `CONFIG GET` is refused (`INFO` does not show it).
    pub appendfsync: Option<String>,
    /// Why `CONFIG GET` could not be used, if it could not.
    pub config_refused: Option<String>,
}

/// Read the settings of one node through `c`: `CONFIG GET`, else (a
/// managed server that renamed or forbids `CONFIG`) `INFO memory` and
/// `INFO persistence`.
///
/// # Errors
/// The mapped error of `INFO` (a lost connection is `Unavailable`,
/// missing credentials `Unauthenticated`).
pub(crate) async fn read<C: redis::aio::ConnectionLike + Send>(
    c: &mut C,
    node: &str,
) -> Result<NodeSettings> {
    let what = format!("read the settings of Redis at {node}");
    let config: redis::RedisResult<Vec<String>> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("maxmemory-policy")
        .arg("appendonly")
        .arg("appendfsync")
        .query_async(c)
        .await;
    match config {
        Ok(v) => {
            let get = |k: &str| {
                v.chunks(2)
                    .find(|p| p[0] == k)
                    .and_then(|p| p.get(1).cloned())
            };
            Ok(NodeSettings {
                node: node.to_string(),
                maxmemory_policy: get("maxmemory-policy"),
                appendonly: get("appendonly"),
                appendfsync: get("appendfsync"),
                config_refused: None,
            })
        }
        Err(e) => {
            let mapped = conn::map_err(&what, e);
            if matches!(
                mapped.kind(),
                ErrorKind::Unavailable | ErrorKind::Unauthenticated
            ) {
                return Err(mapped);
            }
            // `ERR unknown command` (renamed or disabled), `NOPERM`: the
            // INFO fields say the same, except appendfsync.
            let info: String = redis::cmd("INFO")
                .arg("memory")
                .arg("persistence")
                .query_async(c)
                .await
                .map_err(conn::during(&what))?;
            let field = |k: &str| {
                info.lines()
                    .find_map(|l| l.trim().strip_prefix(k)?.strip_prefix(':'))
                    .map(|v| v.trim().to_string())
            };
            Ok(NodeSettings {
                node: node.to_string(),
                maxmemory_policy: field("maxmemory_policy"),
                appendonly: field("aof_enabled")
                    .map(|v| if v == "1" { "yes" } else { "no" }.to_string()),
                appendfsync: None,
                config_refused: Some(mapped.message().to_string()),
            })
        }
    }
}

/// What is wrong with a node's settings for `durability`, if anything:
/// the message names the setting, its value and the fix.
pub(crate) fn problem(s: &NodeSettings, durability: Durability) -> Option<String> {
    let node = &s.node;
    match s.maxmemory_policy.as_deref() {
        Some("noeviction") => {}
        Some(policy) => {
            return Some(format!(
                "Redis at {node} has maxmemory-policy={policy}: when memory is full it evicts \
                 keys, which loses acknowledged records, committed offsets and the topic \
                 registry without an error; Conveyor needs maxmemory-policy=noeviction \
                 (`CONFIG SET maxmemory-policy noeviction`, and `maxmemory-policy noeviction` \
                 in redis.conf)"
            ))
        }
        None => {
            return Some(format!(
                "Redis at {node} does not show its maxmemory-policy (neither CONFIG GET nor \
                 INFO memory has it), so Conveyor cannot tell whether it evicts keys; it needs \
                 maxmemory-policy=noeviction"
            ))
        }
    }
    if durability == Durability::None {
        return None;
    }
    let aof = s.appendonly.as_deref().unwrap_or("?");
    let Some(fsync) = s.appendfsync.as_deref() else {
        return Some(format!(
            "durability {durability:?} needs Redis to write its append-only file with \
             `appendonly yes` and `appendfsync always` (or `everysec` for an interval of 1 s or \
             more); the server at {node} has appendonly={aof} but its appendfsync cannot be \
             read ({}; INFO does not show it); allow CONFIG GET, or open with durability=none",
            s.config_refused.as_deref().unwrap_or("CONFIG GET refused")
        ));
    };
    let on = aof == "yes";
    let ok = match durability {
        Durability::Always => on && fsync == "always",
        Durability::Interval(d) => {
            on && (fsync == "always" || (fsync == "everysec" && d >= Duration::from_secs(1)))
        }
        _ => true,
    };
    (!ok).then(|| {
        format!(
            "durability {durability:?} needs Redis to write its append-only file with \
             `appendonly yes` and `appendfsync always` (or `everysec` for an interval of 1 s or \
             more), but the server at {node} has appendonly={aof}, appendfsync={fsync}; \
             configure the server (CONFIG SET and redis.conf), or open with durability=none"
        )
    })
}

/// The end of the message of a send refused for the server's settings
/// (so that the refusal itself is not taken for a lost connection).
pub(crate) const REFUSED: &str = "sends are refused until the setting is restored";

/// Whether sends may go on, as the last check found.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Verdict {
    /// The settings were read and are fine.
    Fine,
    /// They were read and are not: the problem.
    Wrong(String),
    /// Not known (never read, or the connection was lost since: the
    /// server may have restarted with other settings).
    Unknown,
}

/// The settings' state shared by a broker's sends and its watcher.
pub(crate) struct Watch {
    durability: Durability,
    verdict: Mutex<Verdict>,
    /// The main connection's [`crate::conn::Losses`] when the last check
    /// that found the settings fine started: a loss since (the driver has
    /// reconnected, maybe to a restarted server) makes the verdict unknown.
    losses_at_check: AtomicU64,
    /// One check at a time; it also holds the cluster's master
    /// connections between checks.
    checking: tokio::sync::Mutex<Vec<(String, redis::aio::MultiplexedConnection)>>,
}

impl Watch {
    pub(crate) fn new(durability: Durability) -> Self {
        Watch {
            durability,
            verdict: Mutex::new(Verdict::Unknown),
            losses_at_check: AtomicU64::new(0),
            checking: tokio::sync::Mutex::new(Vec::new()),
        }
    }

    /// Drop the master connections (the broker closes).
    pub(crate) async fn close(&self) {
        self.checking.lock().await.clear();
    }

    /// Read every master's settings now and record the verdict. At open
    /// (`at_open`) a problem is `Unsupported` (fix the server, then
    /// open); later it is `Unavailable` (sends wait for the fix).
    ///
    /// # Errors
    /// The problem as above, or the error of reading the settings.
    pub(crate) async fn check(
        &self,
        servers: &Servers,
        main: &Conn,
        timeout: Duration,
        at_open: bool,
    ) -> Result<()> {
        let mut masters = self.checking.lock().await;
        let losses = main.losses();
        let read = self.read_all(servers, main, timeout, &mut masters).await;
        let settings = match read {
            Ok(s) => s,
            Err(e) => {
                masters.clear();
                *self.verdict.lock() = Verdict::Unknown;
                return Err(e);
            }
        };
        let found = settings.iter().find_map(|s| problem(s, self.durability));
        match found {
            None => {
                self.losses_at_check.store(losses, Ordering::Relaxed);
                *self.verdict.lock() = Verdict::Fine;
                Ok(())
            }
            Some(p) => {
                let was = std::mem::replace(&mut *self.verdict.lock(), Verdict::Wrong(p.clone()));
                if !at_open && was != Verdict::Wrong(p.clone()) {
                    tracing::warn!(problem = %p, "Redis settings changed: sends are refused until they are restored");
                }
                Err(Error::new(
                    if at_open {
                        ErrorKind::Unsupported
                    } else {
                        ErrorKind::Unavailable
                    },
                    p,
                ))
            }
        }
    }

    async fn read_all(
        &self,
        servers: &Servers,
        main: &Conn,
        timeout: Duration,
        masters: &mut Vec<(String, redis::aio::MultiplexedConnection)>,
    ) -> Result<Vec<NodeSettings>> {
        if !servers.is_cluster() {
            return Ok(vec![read(&mut main.clone(), servers.shown()).await?]);
        }
        if masters.is_empty() {
            for url in servers.masters(timeout).await? {
                let c = servers.node(&url, timeout).await?;
                masters.push((redact_url(&url), c));
            }
        }
        let mut out = Vec::with_capacity(masters.len());
        for (node, c) in masters.iter_mut() {
            out.push(read(c, node).await?);
        }
        Ok(out)
    }

    /// May a send write now? `Unavailable` naming the setting while the
    /// last check found a problem; checks first if the verdict is
    /// unknown.
    ///
    /// # Errors
    /// As above; or the error of reading the settings.
    pub(crate) async fn allow_send(
        &self,
        servers: &Servers,
        main: &Conn,
        timeout: Duration,
    ) -> Result<()> {
        let mut verdict = self.verdict.lock().clone();
        if verdict == Verdict::Fine && main.losses() != self.losses_at_check.load(Ordering::Relaxed)
        {
            // A call (maybe a background one) lost the server since the
            // check, and the driver reconnected: read the settings again.
            verdict = Verdict::Unknown;
        }
        match verdict {
            Verdict::Fine => Ok(()),
            Verdict::Wrong(p) => Err(Error::new(
                ErrorKind::Unavailable,
                format!("{p}; {REFUSED}"),
            )),
            Verdict::Unknown => {
                self.check(servers, main, timeout, false)
                    .await
                    .map_err(|e| match e.kind() {
                        ErrorKind::Unavailable
                            if self.verdict.lock().clone() != Verdict::Unknown =>
                        {
                            Error::new(
                                ErrorKind::Unavailable,
                                format!("{}; {REFUSED}", e.message()),
                            )
                        }
                        _ => e,
                    })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(policy: &str, aof: &str, fsync: Option<&str>) -> NodeSettings {
        NodeSettings {
            node: "redis://h:1".into(),
            maxmemory_policy: Some(policy.into()),
            appendonly: Some(aof.into()),
            appendfsync: fsync.map(str::to_string),
            config_refused: fsync.is_none().then(|| "unknown command".to_string()),
        }
    }

    #[test]
    fn settings_are_judged_per_durability() {
        let ok = node("noeviction", "yes", Some("always"));
        for d in [
            Durability::None,
            Durability::Always,
            Durability::Interval(Duration::from_millis(10)),
        ] {
            assert_eq!(problem(&ok, d), None);
        }
        let lru = problem(
            &node("allkeys-lru", "yes", Some("always")),
            Durability::None,
        )
        .unwrap();
        assert!(lru.contains("maxmemory-policy=allkeys-lru"), "{lru}");
        assert!(
            lru.contains("CONFIG SET maxmemory-policy noeviction"),
            "{lru}"
        );
        let everysec = node("noeviction", "yes", Some("everysec"));
        assert!(problem(&everysec, Durability::Always).is_some());
        assert!(problem(&everysec, Durability::Interval(Duration::from_secs(1))).is_none());
        let off = node("noeviction", "no", Some("always"));
        assert!(problem(&off, Durability::Always)
            .unwrap()
            .contains("appendonly=no"));
        // CONFIG refused: eviction still checked, fsync unknown.
        let managed = node("noeviction", "yes", None);
        assert_eq!(problem(&managed, Durability::None), None);
        assert!(problem(&managed, Durability::Always)
            .unwrap()
            .contains("cannot be read"));
    }
}
