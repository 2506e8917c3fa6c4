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
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> conveyor::Result<()> {
//! use conveyor::prelude::*;
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
//! # Ok(())
//! # }
//! ```
//!
//! ## URLs
//!
//! | URL | backend | feature |
//! |---|---|---|
//! | `memory://` | in memory, nothing persists | `memory` (default) |
//! | `mmap:///path/to/dir` | embedded segment log | `mmap` |
//! | `rocksdb:///path/to/dir` | RocksDB | `rocksdb` |
//! | `postgres://user@host/db?schema=NAME` | PostgreSQL, shared by many processes (`?sslmode=require` and the other libpq TLS options for TLS) | `postgres` |
//! | `redis://host:6379/?namespace=NAME`, `rediss://` (TLS) | Redis Streams, shared by many processes | `redis` |
//! | `redis+cluster://host:7000/?namespace=NAME`, `rediss+cluster://` (TLS) | Redis Cluster (one node named, the rest discovered) | `redis` |
//!
//! Query options for every backend:
//! - `durability=none|always|interval:<ms>` (default `none`): when `send`
//!   may return relative to stable storage;
//! - `auto_create=true|false` (default `false`): create missing topics on
//!   produce or subscribe.
//!
//! An option given twice is refused, and a URL's password never shows in
//! an error or a `Debug` output.
//!
//! Each backend owns the rest of its URL and refuses options it does not
//! know; the facade only dispatches on the scheme, through one table of
//! the compiled-in backends. `mmap` adds:
//! - `segment_bytes=<n>` (default 64 MiB): segment file size;
//! - `create=true|false` (default `true`): create the store if the
//!   directory holds none; `false` makes a mistyped path an error instead
//!   of a new empty store;
//! - `read_only=true|false` (default `false`): open a store that another
//!   process owns and is writing, without a lock; describe, lag, fetch and
//!   list work, every write is `ErrorKind::ReadOnly`
//!   (`conveyor::mmap::open` says what it sees).
//!
//! The semantics every backend keeps (delivery, ordering, leases, dead
//! letters, retention) are in `docs/semantics.md`, section by section.
//!
//! ## The contract
//!
//! What every backend guarantees (ordering, at-least-once delivery,
//! leases, dead letters, retention, crash behaviour) is the [`semantics`]
//! page, numbered §1–§9; the API docs cite it as "contract §N".
//!
//! ## What is where
//!
//! Everything an application uses is here: the traits and their
//! conveniences ([`prelude`]), records and messages, configs, errors, the
//! [`runner`], and [`dlq`]'s header names. What backend authors need (the
//! embedded engine, `LogStorage`, validation) is in
//! `conveyor_core::backend`, not re-exported.
#![deny(missing_docs)]

pub use conveyor_core::backend::BrokerUrl;
pub use conveyor_core::{
    dlq, observe, partitioner, prelude, runner, BatchAck, Broker, BrokerExt, BrokerOptions,
    Capabilities, Consumer, ConsumerExt, DeliveryMode, DeliveryToken, DlqPolicy, Durability, Error,
    ErrorKind, GroupConfig, GroupDescription, GroupLag, Header, IdempotencyStore,
    MemberDescription, Message, NackOptions, NackOutcome, PartitionDescription, PartitionLag,
    Producer, ProducerExt, Receipt, Record, Result, Retention, RetryBackoff, RetryingProducer,
    SeekTo, SendRetry, StartFrom, TopicConfig, TopicDescription, TopicPartition,
    MAX_REDELIVERY_DELAY,
};
pub use conveyor_core::{GroupChanges, JoinSettings};

#[cfg(feature = "json")]
pub use conveyor_core::json;
#[cfg(feature = "memory")]
pub use conveyor_memory as memory;
#[cfg(feature = "mmap")]
pub use conveyor_mmap as mmap;
#[cfg(feature = "postgres")]
pub use conveyor_postgres as postgres;
#[cfg(feature = "redis")]
pub use conveyor_redis as redis;
#[cfg(feature = "rocksdb")]
pub use conveyor_rocksdb as rocksdb;

use futures::future::BoxFuture;
use std::sync::Arc;

/// A backend's `open_url`.
type OpenUrl = for<'a> fn(&'a BrokerUrl) -> BoxFuture<'a, Result<Arc<dyn Broker>>>;

/// How the facade opens one backend: its schemes, the cargo feature that
/// compiles it in (`None`: planned, not written yet), and its `open_url`
/// (`None` when the feature is off or the backend does not exist yet).
struct Driver {
    name: &'static str,
    feature: Option<&'static str>,
    schemes: &'static [&'static str],
    open: Option<OpenUrl>,
}

/// Every backend Conveyor knows, compiled in or not.
const DRIVERS: &[Driver] = &[
    Driver {
        name: "memory",
        feature: Some("memory"),
        schemes: &["memory"],
        #[cfg(feature = "memory")]
        open: Some(|url| Box::pin(conveyor_memory::open_url(url))),
        #[cfg(not(feature = "memory"))]
        open: None,
    },
    Driver {
        name: "mmap",
        feature: Some("mmap"),
        schemes: &["mmap"],
        #[cfg(feature = "mmap")]
        open: Some(|url| Box::pin(conveyor_mmap::open_url(url))),
        #[cfg(not(feature = "mmap"))]
        open: None,
    },
    Driver {
        name: "rocksdb",
        feature: Some("rocksdb"),
        schemes: &["rocksdb"],
        #[cfg(feature = "rocksdb")]
        open: Some(|url| Box::pin(conveyor_rocksdb::open_url(url))),
        #[cfg(not(feature = "rocksdb"))]
        open: None,
    },
    Driver {
        name: "redis",
        feature: Some("redis"),
        schemes: &["redis", "rediss", "redis+cluster", "rediss+cluster"],
        #[cfg(feature = "redis")]
        open: Some(|url| Box::pin(conveyor_redis::open_url(url))),
        #[cfg(not(feature = "redis"))]
        open: None,
    },
    Driver {
        name: "postgres",
        feature: Some("postgres"),
        schemes: &["postgres", "postgresql"],
        #[cfg(feature = "postgres")]
        open: Some(|url| Box::pin(conveyor_postgres::open_url(url))),
        #[cfg(not(feature = "postgres"))]
        open: None,
    },
];

/// Open a broker by URL (see the [crate docs](crate#urls)). The scheme
/// picks the backend, which parses the rest of the URL. The broker records
/// metrics and spans ([`observe`]), labelled with the backend's name.
///
/// # Errors
/// `InvalidArgument` for a malformed URL, an unknown scheme or an option
/// the backend does not know; `Unsupported` naming the cargo feature for a
/// backend that is not compiled in; then the backend's own errors
/// (`Locked`, `Corrupt`, `Io`, `Unavailable`).
///
/// # Cancel safety
/// Cancel safe: dropped before it returns, nothing stays open.
pub async fn open(url: &str) -> Result<Arc<dyn Broker>> {
    let url = BrokerUrl::parse(url)?;
    let scheme = url.scheme();
    let driver = DRIVERS
        .iter()
        .find(|d| d.schemes.contains(&scheme))
        .ok_or_else(|| {
            let known: Vec<&str> = DRIVERS
                .iter()
                .flat_map(|d| d.schemes.iter().copied())
                .collect();
            Error::invalid(format!(
                "unknown broker URL scheme `{scheme}`: expected one of {}",
                known.join(", ")
            ))
        })?;
    match (driver.open, driver.feature) {
        (Some(open), _) => Ok(observe::observe(open(&url).await?, driver.name)),
        (None, Some(feature)) => Err(Error::new(
            ErrorKind::Unsupported,
            format!(
                "the `{scheme}://` backend ({}) is not compiled in: enable the `{feature}` \
                 feature of the `conveyor` crate",
                driver.name
            ),
        )),
        (None, None) => Err(Error::new(
            ErrorKind::Unsupported,
            format!(
                "the `{scheme}://` backend ({}) is planned but not available yet; \
                 use mmap:///path (embedded) or memory:// for now",
                driver.name
            ),
        )),
    }
}

/// The delivery contract every backend keeps (`docs/semantics.md`).
#[doc = include_str!("../docs/semantics.md")]
pub mod semantics {}

pub mod bench;

/// The README's examples, compiled and run as doc tests.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_scheme_has_one_driver() {
        let mut seen = std::collections::BTreeSet::new();
        for d in DRIVERS {
            for s in d.schemes {
                assert!(seen.insert(*s), "scheme `{s}` claimed twice");
            }
        }
        #[cfg(feature = "mmap")]
        assert_eq!(
            DRIVERS.iter().find(|d| d.name == "mmap").map(|d| d.schemes),
            Some(conveyor_mmap::URL_SCHEMES)
        );
        #[cfg(feature = "rocksdb")]
        assert_eq!(
            DRIVERS
                .iter()
                .find(|d| d.name == "rocksdb")
                .map(|d| d.schemes),
            Some(conveyor_rocksdb::URL_SCHEMES)
        );
        #[cfg(feature = "memory")]
        assert_eq!(
            DRIVERS
                .iter()
                .find(|d| d.name == "memory")
                .map(|d| d.schemes),
            Some(conveyor_memory::URL_SCHEMES)
        );
    }

    #[tokio::test]
    async fn unknown_and_disabled_schemes_are_clear_errors() {
        let err = open("kafka://localhost").await.err().expect("refused");
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        assert!(err.to_string().contains("kafka"));
        let err = open("memory://?segment_bytes=1")
            .await
            .err()
            .expect("refused");
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        assert!(err.to_string().contains("segment_bytes"), "{err}");
        #[cfg(not(feature = "redis"))]
        {
            let err = open("redis://localhost").await.err().expect("refused");
            assert_eq!(err.kind(), ErrorKind::Unsupported);
            assert!(err.to_string().contains("`redis` feature"), "{err}");
        }
        #[cfg(not(feature = "postgres"))]
        {
            let err = open("postgres://localhost/db")
                .await
                .err()
                .expect("refused");
            assert_eq!(err.kind(), ErrorKind::Unsupported);
            assert!(err.to_string().contains("`postgres` feature"), "{err}");
        }
        #[cfg(not(feature = "rocksdb"))]
        {
            let err = open("rocksdb:///tmp/x").await.err().expect("refused");
            assert_eq!(err.kind(), ErrorKind::Unsupported);
            assert!(err.to_string().contains("`rocksdb` feature"), "{err}");
        }
    }

    /// A `postgres://` URL (the server of `CONVEYOR_POSTGRES_URL`, else the
    /// local one): opens in its schema, reopens with what was sent, refuses
    /// an unknown option.
    #[cfg(feature = "postgres")]
    #[tokio::test]
    async fn postgres_url_round_trip() {
        let base = std::env::var("CONVEYOR_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string());
        let schema = format!("facade_{}", std::process::id());
        let url = format!("{base}?schema={schema}&auto_create=true");
        let b = open(&url).await.unwrap_or_else(|e| {
            panic!("{e} (set CONVEYOR_POSTGRES_URL or start PostgreSQL on 127.0.0.1:5432)")
        });
        let r = b
            .producer()
            .await
            .unwrap()
            .send("kept", Record::new("x"))
            .await
            .unwrap();
        b.close().await.unwrap();
        let pg = conveyor_postgres::open(
            &base,
            Default::default(),
            conveyor_postgres::PgOptions::default().with_schema(schema.clone()),
        )
        .await
        .unwrap();
        assert_eq!(
            &pg.fetch("kept", 0, r.offset, 1).await.unwrap()[0].value[..],
            b"x"
        );
        pg.drop_schema().await.unwrap();
        pg.close().await.unwrap();
        let err = open(&format!("{base}?schema={schema}&sslmodee=on"))
            .await
            .err()
            .expect("refused");
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        assert!(err.to_string().contains("sslmodee"), "{err}");
    }

    /// A `redis://` URL (the server of `CONVEYOR_REDIS_URL`, else the local
    /// one): opens in its namespace, reopens with what was sent, refuses an
    /// unknown option and a durability the server cannot honour.
    #[cfg(feature = "redis")]
    #[tokio::test]
    async fn redis_url_round_trip() {
        let base = std::env::var("CONVEYOR_REDIS_URL")
            .unwrap_or_else(|_| "redis://127.0.0.1:6379".to_string());
        let ns = format!("facade_{}", std::process::id());
        let url = format!("{base}/?namespace={ns}&auto_create=true");
        let b = open(&url).await.unwrap_or_else(|e| {
            panic!("{e} (set CONVEYOR_REDIS_URL or start Redis on 127.0.0.1:6379)")
        });
        let r = b
            .producer()
            .await
            .unwrap()
            .send("kept", Record::new("x"))
            .await
            .unwrap();
        b.close().await.unwrap();
        let again = conveyor_redis::open(
            conveyor_redis::Topology::single(base.clone()),
            Default::default(),
            conveyor_redis::RedisOptions::default().with_namespace(ns.clone()),
        )
        .await
        .unwrap();
        assert_eq!(
            &again.fetch("kept", 0, r.offset, 1).await.unwrap()[0].value[..],
            b"x"
        );
        again.drop_namespace().await.unwrap();
        again.close().await.unwrap();
        let err = open(&format!("{base}/?namespace={ns}&namespaec=x"))
            .await
            .err()
            .expect("refused");
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        assert!(err.to_string().contains("namespaec"), "{err}");
    }

    /// An embedded store's URL: opens, is `Locked` while open, reopens with
    /// what was sent, and refuses the unknown option in `bad`.
    #[cfg(any(feature = "mmap", feature = "rocksdb"))]
    async fn embedded_url_round_trip(url: &str, bad: &str, unknown: &str) {
        let b = open(url).await.unwrap();
        let r = b
            .producer()
            .await
            .unwrap()
            .send("kept", Record::new("x"))
            .await
            .unwrap();
        // The store is owned by the open broker.
        let err = open(url).await.err().expect("locked");
        assert_eq!(err.kind(), ErrorKind::Locked);
        b.close().await.unwrap();
        let b = open(url).await.unwrap();
        assert_eq!(
            &b.fetch("kept", 0, r.offset, 1).await.unwrap()[0].value[..],
            b"x"
        );
        b.close().await.unwrap();
        let err = open(bad).await.err().expect("refused");
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        assert!(err.to_string().contains(unknown), "{err}");
    }

    #[cfg(feature = "mmap")]
    #[tokio::test]
    async fn mmap_url_opens_reopens_and_rejects_unknown_options() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        embedded_url_round_trip(
            &format!("mmap://{d}?segment_bytes=4096&auto_create=true"),
            &format!("mmap://{d}?segmentbytes=1"),
            "segmentbytes",
        )
        .await;
    }

    #[cfg(feature = "rocksdb")]
    #[tokio::test]
    async fn rocksdb_url_opens_reopens_and_rejects_unknown_options() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        embedded_url_round_trip(
            &format!("rocksdb://{d}?durability=always&auto_create=true"),
            &format!("rocksdb://{d}?segment_bytes=1"),
            "segment_bytes",
        )
        .await;
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
