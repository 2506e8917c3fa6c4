//! The servers one broker talks to: a [`Topology`] resolved for
//! connecting (its TLS files read), the main connection, a direct
//! connection to each master (settings checks, namespace deletion), and
//! the pub/sub connection. Owns how a URL becomes a `redis::Client` (TLS
//! or not) and how addresses are shown (never with a password); it does
//! not know about topics or groups.

use crate::conn::{self, Conn};
use crate::{TlsFiles, Topology};
use conveyor_core::backend::redact_url;
use conveyor_core::{Error, ErrorKind, Result};
use redis::aio::MultiplexedConnection;
use std::path::Path;
use std::time::Duration;

/// A [`Topology`] ready to connect: seed URLs (credentials included),
/// TLS material read from its files, and the addresses as shown in
/// messages (passwords redacted).
#[derive(Clone)]
pub(crate) struct Servers {
    seeds: Vec<String>,
    cluster: bool,
    certs: Option<redis::TlsCertificates>,
    shown: String,
}

/// Read one TLS file (off the async worker threads: a file system may
/// stall).
async fn read_file(path: &Path, what: &str) -> Result<Vec<u8>> {
    let owned = path.to_path_buf();
    let read = tokio::task::spawn_blocking(move || std::fs::read(&owned))
        .await
        .map_err(|e| Error::internal(format!("read the {what} file: {e}")))?;
    read.map_err(|e| {
        Error::new(
            ErrorKind::InvalidArgument,
            format!("cannot read the {what} file `{}`: {e}", path.display()),
        )
    })
}

impl Servers {
    /// Resolve `topology`: read its TLS files.
    ///
    /// # Errors
    /// `InvalidArgument` for a TLS file that cannot be read, TLS options
    /// on a `redis://` (plain) URL, or a client certificate without its
    /// key (or the reverse).
    pub(crate) async fn resolve(topology: &Topology) -> Result<Servers> {
        let seeds = topology.seeds().to_vec();
        if seeds.is_empty() {
            return Err(Error::invalid("no Redis server given"));
        }
        let shown = seeds
            .iter()
            .map(|s| redact_url(s))
            .collect::<Vec<_>>()
            .join(",");
        let tls_urls = seeds.iter().filter(|s| s.starts_with("rediss://")).count();
        let TlsFiles {
            ca_file,
            cert_file,
            key_file,
        } = topology.tls();
        let files_given = ca_file.is_some() || cert_file.is_some() || key_file.is_some();
        if tls_urls != 0 && tls_urls != seeds.len() {
            return Err(Error::invalid(format!(
                "Redis servers `{shown}`: either every URL is rediss:// (TLS) or none is"
            )));
        }
        if files_given && tls_urls == 0 {
            return Err(Error::invalid(format!(
                "Redis server `{shown}`: TLS files (tls_ca, tls_cert, tls_key) are for a rediss:// URL"
            )));
        }
        if cert_file.is_some() != key_file.is_some() {
            return Err(Error::invalid(format!(
                "Redis server `{shown}`: a TLS client certificate (tls_cert) needs its key (tls_key), and the reverse"
            )));
        }
        let certs = if tls_urls > 0 {
            install_crypto_provider();
            let root_cert = match ca_file {
                Some(p) => Some(read_file(p, "TLS CA (tls_ca)").await?),
                None => None,
            };
            let client_tls = match (cert_file, key_file) {
                (Some(c), Some(k)) => Some(redis::ClientTlsConfig {
                    client_cert: read_file(c, "TLS client certificate (tls_cert)").await?,
                    client_key: read_file(k, "TLS client key (tls_key)").await?,
                }),
                _ => None,
            };
            Some(redis::TlsCertificates {
                client_tls,
                root_cert,
            })
        } else {
            None
        };
        Ok(Servers {
            seeds,
            cluster: topology.is_cluster(),
            certs,
            shown,
        })
    }

    /// The servers as named in messages: `redis://host:port`, never a
    /// password.
    pub(crate) fn shown(&self) -> &str {
        &self.shown
    }

    pub(crate) fn is_cluster(&self) -> bool {
        self.cluster
    }

    /// A client for one URL (TLS if it is `rediss://`).
    fn client(&self, url: &str) -> Result<redis::Client> {
        let built = match &self.certs {
            Some(certs) => redis::Client::build_with_tls(url, certs.clone()),
            None => redis::Client::open(url),
        };
        built.map_err(|e| {
            Error::new(
                ErrorKind::InvalidArgument,
                format!(
                    "Redis URL `{}` is not valid: {}",
                    redact_url(url),
                    redact_url(&e.to_string())
                ),
            )
        })
    }

    /// The main connection: multiplexed, reconnected by the connection
    /// manager (standalone) or the cluster client. Waits at most
    /// `timeout` for the connection (the caller bounds the whole open).
    pub(crate) async fn connect(&self, timeout: Duration) -> Result<Conn> {
        let what = format!("connect to Redis at {}", self.shown);
        if self.cluster {
            let mut builder = redis::cluster::ClusterClient::builder(self.seeds.clone())
                .connection_timeout(timeout)
                .response_timeout(timeout)
                .retries(2);
            if let Some(certs) = &self.certs {
                builder = builder.certs(certs.clone());
            }
            let client = builder.build().map_err(|e| {
                Error::new(
                    ErrorKind::InvalidArgument,
                    format!(
                        "Redis Cluster URLs `{}` are not valid: {}",
                        self.shown,
                        redact_url(&e.to_string())
                    ),
                )
            })?;
            let c = client
                .get_async_connection()
                .await
                .map_err(conn::during(&what))?;
            Ok(Conn::Cluster(c, Default::default()))
        } else {
            let client = self.client(&self.seeds[0])?;
            let config = redis::aio::ConnectionManagerConfig::new()
                .set_connection_timeout(Some(timeout))
                .set_response_timeout(Some(timeout))
                .set_number_of_retries(1)
                .set_max_delay(Duration::from_millis(500));
            let c = redis::aio::ConnectionManager::new_with_config(client, config)
                .await
                .map_err(conn::during(&what))?;
            Ok(Conn::Single(c, Default::default()))
        }
    }

    /// A connection to one node (a master of the cluster).
    pub(crate) async fn node(&self, url: &str, timeout: Duration) -> Result<MultiplexedConnection> {
        let client = self.client(url)?;
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout));
        client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(conn::during(format!(
                "connect to Redis at {}",
                redact_url(url)
            )))
    }

    /// The URLs of every master (the seed for a standalone server), with
    /// the seeds' scheme and credentials.
    pub(crate) async fn masters(&self, timeout: Duration) -> Result<Vec<String>> {
        if !self.cluster {
            return Ok(self.seeds.clone());
        }
        let what = "list the cluster's masters (CLUSTER NODES)";
        let mut last = None;
        for seed in &self.seeds {
            let mut c = match self.node(seed, timeout).await {
                Ok(c) => c,
                Err(e) => {
                    last = Some(e);
                    continue;
                }
            };
            let nodes: String = redis::cmd("CLUSTER")
                .arg("NODES")
                .query_async(&mut c)
                .await
                .map_err(conn::during(what))?;
            let mut out = Vec::new();
            for line in nodes.lines() {
                let f: Vec<&str> = line.split_whitespace().collect();
                if f.len() > 2 && f[2].contains("master") && !f[2].contains("fail") {
                    let addr = f[1].split('@').next().unwrap_or_default();
                    out.push(with_address(seed, addr)?);
                }
            }
            return Ok(out);
        }
        Err(last.unwrap_or_else(|| Error::invalid("no Redis Cluster seed node given")))
    }

    /// A pub/sub connection (on a cluster, to a seed node: `PUBLISH`
    /// reaches every node).
    pub(crate) async fn pubsub(&self) -> redis::RedisResult<redis::aio::PubSub> {
        let mut last = None;
        for seed in &self.seeds {
            match self.client(seed) {
                Ok(c) => match c.get_async_pubsub().await {
                    Ok(ps) => return Ok(ps),
                    Err(e) => last = Some(e),
                },
                Err(e) => {
                    last = Some(redis::RedisError::from((
                        redis::ErrorKind::InvalidClientConfig,
                        "bad URL",
                        e.message().to_string(),
                    )))
                }
            }
        }
        Err(last.unwrap_or_else(|| redis::RedisError::from((redis::ErrorKind::Io, "no seed"))))
    }

    /// Delete every key of namespace `ns`, on every master.
    pub(crate) async fn drop_namespace(&self, ns: &str, timeout: Duration) -> Result<()> {
        let what = format!("delete namespace `{ns}`");
        for node in self.masters(timeout).await? {
            let mut c = self.node(&node, timeout).await?;
            let mut cursor = 0u64;
            loop {
                let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(format!("{{{ns}/*"))
                    .arg("COUNT")
                    .arg(1000)
                    .query_async(&mut c)
                    .await
                    .map_err(conn::during(&what))?;
                // One key per UNLINK: keys of many slots.
                for k in keys {
                    redis::cmd("UNLINK")
                        .arg(&k)
                        .query_async::<i64>(&mut c)
                        .await
                        .map_err(conn::during(&what))?;
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        Ok(())
    }
}

/// `seed` (scheme, user, password) pointed at `addr` (`host:port`).
fn with_address(seed: &str, addr: &str) -> Result<String> {
    let bad = || Error::internal(format!("cluster node address `{addr}` is not host:port"));
    let (host, port) = addr.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    let mut url = url::Url::parse(seed)
        .map_err(|e| Error::invalid(format!("Redis URL `{}`: {e}", redact_url(seed))))?;
    url.set_host(Some(host.trim_start_matches('[').trim_end_matches(']')))
        .map_err(|_| bad())?;
    url.set_port(Some(port)).map_err(|_| bad())?;
    Ok(url.to_string())
}

/// rustls needs a process-wide crypto provider; install ring's unless the
/// application installed one (an application that wants aws-lc-rs, with
/// its post-quantum key exchange, installs it before opening). ring is
/// chosen because it builds with a C compiler alone; rustls 0.23.48
/// deprecated its provider function for lacking post-quantum groups.
#[expect(deprecated, reason = "ring's provider: see above")]
fn install_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Another thread may win the race; either provider is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn master_urls_keep_the_seeds_scheme_and_credentials() {
        assert_eq!(
            with_address("rediss://u:pw@a:1/", "10.0.0.2:7001").unwrap(),
            "rediss://u:pw@10.0.0.2:7001/"
        );
        assert_eq!(
            with_address("redis://h:1", "127.0.0.1:7002").unwrap(),
            "redis://127.0.0.1:7002"
        );
    }
}
