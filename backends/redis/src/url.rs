//! The `redis://` URL: a Redis connection URL plus Conveyor's options:
//! `namespace` (the prefix of every key, default `conveyor`), `timeout_ms`
//! (how long a call waits for the server, open included, default
//! 30,000), `settings_check_ms` (how often the server's settings are read
//! again, default 1,000), and the common `durability`/`auto_create_topics`.
//! `redis+cluster://host:port` names one node of a Redis Cluster (the
//! others are discovered from it); more seed nodes may be given as
//! `nodes=host:port,host:port`. `rediss://` and `rediss+cluster://`
//! connect over TLS (rustls), verified against the system's roots or
//! `tls_ca=/path/ca.pem`; `tls_cert` and `tls_key` give a client
//! certificate. Every other query parameter is refused by name.

use crate::{open, RedisOptions, TlsFiles, Topology};
use conveyor_core::backend::BrokerUrl;
use conveyor_core::{Broker, Error, ErrorKind, Result};
use std::sync::Arc;

/// The URL schemes this backend answers to.
pub const URL_SCHEMES: &[&str] = &["redis", "redis+cluster", "rediss", "rediss+cluster"];

/// The options a `redis://` URL may carry besides the common ones.
pub const URL_OPTIONS: &[&str] = &[
    "namespace",
    "timeout_ms",
    "settings_check_ms",
    "nodes",
    "tls_ca",
    "tls_cert",
    "tls_key",
];

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
/// `InvalidArgument` for an unknown option or a bad value (TLS files on a
/// plain `redis://` URL included); `Unsupported` for another scheme.
pub fn parse(url: &BrokerUrl) -> Result<(Topology, RedisOptions)> {
    let mut opts = RedisOptions::default();
    let mut nodes: Vec<String> = Vec::new();
    let mut tls = TlsFiles::default();
    let millis = |name: &str, v: &str| {
        v.parse::<u64>().ok().filter(|ms| *ms > 0).ok_or_else(|| {
            Error::invalid(format!(
                "broker URL `{}`: {name} must be a positive number of milliseconds, not `{v}`",
                url.redacted()
            ))
        })
    };
    for (k, v) in url.backend_options() {
        match k.as_str() {
            "namespace" => {
                check_namespace(v)?;
                opts = opts.with_namespace(v.clone());
            }
            "timeout_ms" => {
                let ms = millis("timeout_ms", v)?;
                opts = opts.with_timeout(std::time::Duration::from_millis(ms));
            }
            "settings_check_ms" => {
                let ms = millis("settings_check_ms", v)?;
                opts = opts.with_settings_check(std::time::Duration::from_millis(ms));
            }
            "tls_ca" => tls.ca_file = Some(v.into()),
            "tls_cert" => tls.cert_file = Some(v.into()),
            "tls_key" => tls.key_file = Some(v.into()),
            "nodes" => nodes.extend(v.split(',').filter(|s| !s.is_empty()).map(str::to_string)),
            _ => return Err(url.unknown_option("redis", k, URL_OPTIONS)),
        }
    }
    let mut conn = url.url().clone();
    conn.set_query(None);
    let secure = url.scheme().starts_with("rediss");
    if !secure && tls != TlsFiles::default() {
        return Err(Error::invalid(format!(
            "broker URL `{}`: tls_ca, tls_cert and tls_key are for rediss:// (TLS) URLs",
            url.redacted()
        )));
    }
    if tls.cert_file.is_some() != tls.key_file.is_some() {
        return Err(Error::invalid(format!(
            "broker URL `{}`: tls_cert and tls_key go together",
            url.redacted()
        )));
    }
    let plain = if secure { "rediss" } else { "redis" };
    match url.scheme() {
        "redis" | "rediss" => {
            if !nodes.is_empty() {
                return Err(Error::invalid(format!(
                    "broker URL `{}`: `nodes` is for Redis Cluster (`{plain}+cluster://`)",
                    url.redacted()
                )));
            }
            Ok((Topology::single(conn.to_string()).with_tls(tls), opts))
        }
        "redis+cluster" | "rediss+cluster" => {
            let seed = conn.to_string().replacen(
                &format!("{plain}+cluster://"),
                &format!("{plain}://"),
                1,
            );
            let mut seeds = vec![seed];
            seeds.extend(nodes.iter().map(|n| format!("{plain}://{n}")));
            Ok((Topology::cluster(seeds).with_tls(tls), opts))
        }
        other => Err(Error::new(
            ErrorKind::Unsupported,
            format!(
                "broker URL `{}`: scheme `{other}` is not supported by the Redis backend; use \
                 redis://, rediss:// (TLS), redis+cluster:// or rediss+cluster://",
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
        let url =
            BrokerUrl::parse("rediss://h:7/?tls_ca=/etc/ca.pem&settings_check_ms=250").unwrap();
        let (t, o) = parse(&url).unwrap();
        assert_eq!(t.seeds(), ["rediss://h:7/"]);
        assert_eq!(
            t.tls().ca_file.as_deref(),
            Some(std::path::Path::new("/etc/ca.pem"))
        );
        assert_eq!(o.settings_check, std::time::Duration::from_millis(250));
        let url = BrokerUrl::parse("rediss+cluster://h:7000/?nodes=h:7001").unwrap();
        let (t, _) = parse(&url).unwrap();
        assert!(t.is_cluster());
        assert_eq!(t.seeds(), ["rediss://h:7000/", "rediss://h:7001"]);
        for bad in [
            "redis://h/?tls_ca=/ca.pem",
            "rediss://h/?tls_cert=/c.pem",
            "redis://h/?settings_check_ms=0",
        ] {
            let e = parse(&BrokerUrl::parse(bad).unwrap()).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{bad}: {e}");
        }
        let url = BrokerUrl::parse("redis://:s3cr3t@h:7/").unwrap();
        let (t, _) = parse(&url).unwrap();
        assert!(!format!("{t:?}").contains("s3cr3t"), "{t:?}");
        let e = parse(&BrokerUrl::parse("redis+tls://h/").unwrap()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
    }
}
