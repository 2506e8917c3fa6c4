//! # conveyor-conformance
//!
//! The delivery contract as executable cases. Each case is an async function
//! taking a [`Backend`]; a backend's `tests/conformance.rs` runs them all
//! with one macro call, which expands to one `#[tokio::test]` per case:
//!
//! ```ignore
//! conveyor_conformance::suite!(async { MyBackend::new().await });
//! ```
//!
//! Cases skip only what a backend's [`Capabilities`](conveyor_core::Capabilities)
//! say it lacks (`persistent`, `embedded`), and say so on stderr.
#![deny(missing_docs)]

use async_trait::async_trait;
use conveyor_core::{Broker, BrokerOptions, Result};
use std::sync::Arc;

/// A store under test: something that can open (and, if persistent,
/// reopen) one isolated broker.
#[async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Open the store with these options. After the broker returned earlier
    /// was closed, opening again reopens the same store (same directory,
    /// key prefix or schema), which is how persistence is tested.
    async fn open(&self, options: BrokerOptions) -> Result<Arc<dyn Broker>>;

    /// Remove everything this backend instance created (files, keys,
    /// schemas). Called at the end of each case.
    async fn cleanup(&self) {}
}
