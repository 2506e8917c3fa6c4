//! # conveyor-mmap
//!
//! Conveyor's embedded default backend: a segment log on memory-mapped
//! files, crash-safe, owned by one process. `conveyor::open("mmap:///dir")`.
//!
//! This crate is only storage ([`MmapStorage`], a
//! [`LogStorage`](conveyor_core::engine::LogStorage)); the delivery rules
//! come from [`conveyor_core::engine::Engine`]. The byte layout is in
//! [`format`].
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! use conveyor_core::{Broker, BrokerOptions, Durability, Record, TopicConfig};
//! let dir = tempfile::tempdir().unwrap();
//! let options = BrokerOptions::default().with_durability(Durability::Always);
//! let broker = conveyor_mmap::open(dir.path(), options, conveyor_mmap::MmapOptions::default()).await?;
//! broker.create_topic("orders", TopicConfig::new(2)).await?;
//! let receipt = broker.producer().await?.send("orders", Record::new("placed")).await?;
//! broker.close().await?;
//!
//! // Reopen: everything acknowledged is still there.
//! let broker = conveyor_mmap::open(dir.path(), BrokerOptions::default(), Default::default()).await?;
//! let back = broker.fetch("orders", receipt.partition, receipt.offset, 1).await?;
//! assert_eq!(&back[0].value[..], b"placed");
//! # Ok::<(), conveyor_core::Error>(())
//! # });
//! ```
#![deny(missing_docs)]

pub mod format;
