//! The `redis://` URL: a Redis connection URL plus Conveyor's options:
//! `namespace` (the prefix of every key, default `conveyor`), `timeout_ms`
//! (how long a call waits for the server, default 30,000), and the common
//! `durability`/`auto_create_topics`. `redis+cluster://host:port` names
//! one node of a Redis Cluster (the others are discovered from it); more
//! seed nodes may be given as `nodes=host:port,host:port`. Every other
//! query parameter is refused by name.

use crate::{open, RedisOptions, Topology};
use conveyor_core::backend::BrokerUrl;
use conveyor_core::{Broker, Error, ErrorKind, Result};
use std::sync::Arc;

/// The URL schemes this backend answers to.
pub const URL_SCHEMES: &[&str] = &["redis", "redis+cluster"];

/// The options a `redis://` URL may carry besides the common ones.
pub const URL_OPTIONS: &[&str] = &["namespace", "timeout_ms", "nodes"];

/// A namespace is 1 to 100 characters from `[A-Za-z0-9._-]` (it is part
/// of every key's hash tag, so no braces).
///
/// # Errors
/// `InvalidArgument` naming the namespace.
pub(crate) fn check_namespace(ns: &str) -> Result<()> {
    let ok = !ns.is_empty()
        && ns.len() <= 100
        && ns
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "Redis namespace `{ns}` must be 1 to 100 characters from [A-Za-z0-9._-]"
        )))
    }
}

/// Split a broker URL into the servers to connect to and
/// [`RedisOptions`].
///
/// # Errors
/// `InvalidArgument` for an unknown option or a bad value; `Unsupported`
/// for `rediss://` (TLS is not compiled in).
pub fn parse(url: &BrokerUrl) -> Result<(Topology, RedisOptions)> {
    let mut opts = RedisOptions::default();
    let mut nodes: Vec<String> = Vec::new();
    for (k, v) in url.backend_options() {
        match k.as_str() {
            "namespace" => {
                check_namespace(v)?;
                opts = opts.with_namespace(v.clone());
            }
            "timeout_ms" => {
                let ms: u64 = v.parse().ok().filter(|ms| *ms > 0).ok_or_else(|| {
                    Error::invalid(format!(
                        "broker URL `{}`: timeout_ms must be a positive number of milliseconds, not `{v}`",
                        url.redacted()
                    ))
                })?;
                opts = opts.with_timeout(std::time::Duration::from_millis(ms));
            }
            "nodes" => nodes.extend(v.split(',').filter(|s| !s.is_empty()).map(str::to_string)),
            _ => return Err(url.unknown_option("redis", k, URL_OPTIONS)),
        }
    }
    let mut conn = url.url().clone();
    conn.set_query(None);
    match url.scheme() {
        "redis" => {
            if !nodes.is_empty() {
                return Err(Error::invalid(format!(
                    "broker URL `{}`: `nodes` is for Redis Cluster (`redis+cluster://`)",
                    url.redacted()
                )));
            }
            Ok((Topology::single(conn.to_string()), opts))
        }
        "redis+cluster" => {
            let seed = conn.to_string().replacen("redis+cluster://", "redis://", 1);
            let mut seeds = vec![seed];
            seeds.extend(nodes.iter().map(|n| format!("redis://{n}")));
            Ok((Topology::cluster(seeds), opts))
        }
        other => Err(Error::new(
            ErrorKind::Unsupported,
            format!(
                "broker URL `{}`: scheme `{other}` is not supported by the Redis backend \
                 (TLS is not compiled in); use redis:// or redis+cluster://",
                url.redacted()
            ),
        )),
    }
}

/// Open the broker a `redis://` or `redis+cluster://` URL names.
///
/// # Errors
/// `InvalidArgument` for a bad URL or option; then the errors of [`open`].
///
/// # Cancel safety
/// Cancel safe: dropped, nothing is left behind.
pub async fn open_url(url: &BrokerUrl) -> Result<Arc<dyn Broker>> {
    let (topology, opts) = parse(url)?;
    let broker = open(topology, url.options().clone(), opts).await?;
    Ok(Arc::new(broker))
}

#[cfg(test)]
mod tests {
    use super::*;
    use conveyor_core::ErrorKind;

    #[test]
    fn options_are_taken_out_and_unknown_ones_refused() {
        let url = BrokerUrl::parse("redis://h:7/?namespace=app_1&timeout_ms=1500&durability=none")
            .unwrap();
        let (t, o) = parse(&url).unwrap();
        assert_eq!(t.seeds(), ["redis://h:7/"]);
        assert!(!t.is_cluster());
        assert_eq!(o.namespace, "app_1");
        assert_eq!(o.timeout, std::time::Duration::from_millis(1500));
        let url = BrokerUrl::parse("redis+cluster://h:7000/?nodes=h:7001,h:7002").unwrap();
        let (t, _) = parse(&url).unwrap();
        assert!(t.is_cluster());
        assert_eq!(
            t.seeds(),
            ["redis://h:7000/", "redis://h:7001", "redis://h:7002"]
        );
        for bad in [
            "redis://h/?namespace=a{b}",
            "redis://h/?timeout_ms=0",
            "redis://h/?nodes=h:1",
            "redis://h/?namespaec=x",
        ] {
            let e = parse(&BrokerUrl::parse(bad).unwrap()).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{bad}: {e}");
        }
        let e = parse(&BrokerUrl::parse("rediss://h/").unwrap()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
    }
}
