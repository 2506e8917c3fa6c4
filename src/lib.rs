//! # Conveyor
//!
//! One message-queue API and one delivery contract over several storage
//! engines: Kafka's log semantics (partitions, offsets, consumer groups,
//! replay), SQS's queue semantics (leases, ack/nack, visibility timeout,
//! dead letters) and both in one subscription model, verified by one
//! conformance suite on every backend.
//!
//! Pick a backend with a cargo feature and open it by URL:
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! use conveyor::{GroupConfig, Record, TopicConfig};
//! use std::time::Duration;
//!
//! let broker = conveyor::open("memory://").await?;
//! broker.create_topic("orders.events", TopicConfig::new(4)).await?;
//!
//! let producer = broker.producer().await?;
//! producer
//!     .send("orders.events", Record::new(r#"{"order":42,"event":"placed"}"#).with_key("order-42"))
//!     .await?;
//!
//! // Each group gets every event; members of one group share the work.
//! let email = broker.consumer("email", &["orders.events"], GroupConfig::queue()).await?;
//! let batch = email.poll(10, Duration::from_secs(1)).await?;
//! for message in &batch {
//!     email.ack(message).await?;
//! }
//! assert_eq!(batch.len(), 1);
//! # Ok::<(), conveyor::Error>(())
//! # });
//! ```
//!
//! ## URLs
//!
//! | URL | backend | feature |
//! |---|---|---|
//! | `memory://` | in memory, nothing persists | `memory` (default) |
//! | `mmap:///path/to/dir` | embedded segment log | `mmap` |
//! | `rocksdb:///path/to/dir` | RocksDB | `rocksdb` |
//! | `redis://host:6379/?prefix=app` | Redis Streams | `redis` |
//! | `postgres://user@host/db` | PostgreSQL | `postgres` |
//!
//! Query options for every backend:
//! - `durability=none|always|interval:<ms>` (default `none`): when `send`
//!   may return relative to stable storage;
//! - `auto_create=true|false` (default `false`): create missing topics on
//!   produce or subscribe.
#![deny(missing_docs)]

pub use conveyor_core::*;

#[cfg(feature = "memory")]
pub use conveyor_memory as memory;
#[cfg(feature = "mmap")]
pub use conveyor_mmap as mmap;

use std::sync::Arc;
use std::time::Duration;

/// The options a URL carries, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedUrl {
    /// The scheme (`memory`, `mmap`, ...).
    pub scheme: String,
    /// The URL without the common query options.
    pub url: url::Url,
    /// Broker options from the query.
    pub options: BrokerOptions,
}

/// Parse a broker URL and its common query options (`durability`,
/// `auto_create`). Unknown options are left in the URL for the backend.
pub fn parse_url(url: &str) -> Result<ParsedUrl> {
    let mut parsed = url::Url::parse(url)
        .map_err(|e| Error::invalid(format!("broker URL `{url}` is not a URL: {e}")))?;
    let mut options = BrokerOptions::default();
    let mut rest = Vec::new();
    for (k, v) in parsed.query_pairs() {
        match k.as_ref() {
            "durability" => options.durability = parse_durability(&v)?,
            "auto_create" => {
                options.auto_create_topics = match v.as_ref() {
                    "true" | "1" | "yes" => true,
                    "false" | "0" | "no" => false,
                    other => {
                        return Err(Error::invalid(format!(
                            "broker URL option auto_create=`{other}`: expected true or false"
                        )))
                    }
                }
            }
            _ => rest.push((k.into_owned(), v.into_owned())),
        }
    }
    if rest.is_empty() {
        parsed.set_query(None);
    } else {
        parsed.query_pairs_mut().clear().extend_pairs(rest);
    }
    Ok(ParsedUrl {
        scheme: parsed.scheme().to_string(),
        url: parsed,
        options,
    })
}

/// Parse `none`, `always` or `interval:<ms>`.
pub fn parse_durability(v: &str) -> Result<Durability> {
    match v {
        "none" => Ok(Durability::None),
        "always" => Ok(Durability::Always),
        other => match other.strip_prefix("interval:") {
            Some(ms) => ms
                .trim_end_matches("ms")
                .parse::<u64>()
                .ok()
                .filter(|ms| *ms > 0)
                .map(|ms| Durability::Interval(Duration::from_millis(ms)))
                .ok_or_else(|| {
                    Error::invalid(format!(
                        "durability `{other}`: expected interval:<milliseconds above 0>"
                    ))
                }),
            None => Err(Error::invalid(format!(
                "durability `{other}`: expected none, always or interval:<ms>"
            ))),
        },
    }
}

fn feature_off(scheme: &str, feature: &str) -> Error {
    Error::new(
        ErrorKind::Unsupported,
        format!(
            "the `{scheme}://` backend is not compiled in: enable the `{feature}` feature of the \
             `conveyor` crate"
        ),
    )
}

/// Open a broker by URL (see the [crate docs](crate#urls)). The scheme
/// picks the backend; a backend whose feature is off is an
/// `ErrorKind::Unsupported` error naming the feature.
pub async fn open(url: &str) -> Result<Arc<dyn Broker>> {
    let parsed = parse_url(url)?;
    match parsed.scheme.as_str() {
        "memory" => {
            #[cfg(feature = "memory")]
            {
                Ok(Arc::new(conveyor_memory::open(parsed.options)))
            }
            #[cfg(not(feature = "memory"))]
            {
                Err(feature_off("memory", "memory"))
            }
        }
        "mmap" => {
            #[cfg(feature = "mmap")]
            {
                open_mmap(url, &parsed).await
            }
            #[cfg(not(feature = "mmap"))]
            {
                Err(feature_off("mmap", "mmap"))
            }
        }
        "rocksdb" => Err(feature_off("rocksdb", "rocksdb")),
        "redis" | "rediss" => Err(feature_off("redis", "redis")),
        "postgres" | "postgresql" => Err(feature_off("postgres", "postgres")),
        other => Err(Error::invalid(format!(
            "unknown broker URL scheme `{other}`: expected memory, mmap, rocksdb, redis or postgres"
        ))),
    }
}

/// The README's examples, compiled and run as doc tests.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

/// `mmap:///absolute/dir` or `mmap://relative/dir`, option `segment_bytes`.
#[cfg(feature = "mmap")]
async fn open_mmap(raw: &str, parsed: &ParsedUrl) -> Result<Arc<dyn Broker>> {
    let rest = &raw["mmap://".len().min(raw.len())..];
    let path = rest.split('?').next().unwrap_or_default();
    if path.is_empty() {
        return Err(Error::invalid(format!(
            "broker URL `{raw}` names no directory: use mmap:///absolute/dir or mmap://relative/dir"
        )));
    }
    let mut mmap = conveyor_mmap::MmapOptions::default();
    for (k, v) in parsed.url.query_pairs() {
        match k.as_ref() {
            "segment_bytes" => {
                let n: u64 = v.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
                    Error::invalid(format!(
                        "broker URL option segment_bytes=`{v}`: expected a number of bytes above 0"
                    ))
                })?;
                mmap = mmap.with_segment_bytes(n);
            }
            other => {
                return Err(Error::invalid(format!(
                    "broker URL option `{other}` is not known to the mmap backend \
                     (known: durability, auto_create, segment_bytes)"
                )))
            }
        }
    }
    let broker = conveyor_mmap::open(path, parsed.options.clone(), mmap).await?;
    Ok(Arc::new(broker))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_options() {
        let p = parse_url("mmap:///tmp/q?durability=always&auto_create=true&segment_bytes=1024")
            .unwrap();
        assert_eq!(p.scheme, "mmap");
        assert_eq!(p.options.durability, Durability::Always);
        assert!(p.options.auto_create_topics);
        assert_eq!(p.url.query(), Some("segment_bytes=1024"));
        assert_eq!(p.url.path(), "/tmp/q");
        let p = parse_url("memory://?durability=interval:50").unwrap();
        assert_eq!(
            p.options.durability,
            Durability::Interval(Duration::from_millis(50))
        );
        for bad in [
            "memory://?durability=sometimes",
            "memory://?durability=interval:0",
            "memory://?auto_create=maybe",
            "not a url",
        ] {
            assert_eq!(
                parse_url(bad).unwrap_err().kind(),
                ErrorKind::InvalidArgument,
                "{bad}"
            );
        }
    }

    #[tokio::test]
    async fn unknown_and_disabled_schemes_are_clear_errors() {
        let err = open("kafka://localhost").await.err().expect("refused");
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        assert!(err.to_string().contains("kafka"));
        let err = open("rocksdb:///tmp/x").await.err().expect("refused");
        assert_eq!(err.kind(), ErrorKind::Unsupported);
        assert!(err.to_string().contains("`rocksdb` feature"), "{err}");
    }

    #[cfg(feature = "mmap")]
    #[tokio::test]
    async fn mmap_url_opens_reopens_and_rejects_unknown_options() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!(
            "mmap://{}?segment_bytes=4096&auto_create=true",
            dir.path().display()
        );
        let b = open(&url).await.unwrap();
        let r = b
            .producer()
            .await
            .unwrap()
            .send("kept", Record::new("x"))
            .await
            .unwrap();
        // The store is owned by the open broker.
        let err = open(&url).await.err().expect("locked");
        assert_eq!(err.kind(), ErrorKind::Locked);
        b.close().await.unwrap();
        let b = open(&url).await.unwrap();
        assert_eq!(
            &b.fetch("kept", 0, r.offset, 1).await.unwrap()[0].value[..],
            b"x"
        );
        let bad = format!("mmap://{}?segmentbytes=1", dir.path().display());
        let err = open(&bad).await.err().expect("refused");
        assert!(err.to_string().contains("segmentbytes"), "{err}");
    }

    #[tokio::test]
    async fn memory_url_opens_with_options() {
        let b = open("memory://?auto_create=true").await.unwrap();
        b.producer()
            .await
            .unwrap()
            .send("auto.created", Record::new("x"))
            .await
            .unwrap();
        assert_eq!(b.list_topics().await.unwrap(), vec!["auto.created"]);
    }
}
