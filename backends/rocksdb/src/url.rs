//! The `rocksdb://` URL: `rocksdb:///absolute/dir` or
//! `rocksdb://relative/dir`, with the common options only.

use crate::{open, RocksOptions};
use conveyor_core::backend::BrokerUrl;
use conveyor_core::{Broker, Error, Result};
use std::sync::Arc;

/// The URL schemes this backend answers to.
pub const URL_SCHEMES: &[&str] = &["rocksdb"];

/// The options a `rocksdb://` URL may carry besides the common ones (none
/// yet: RocksDB's tuning stays in code, [`RocksOptions`]).
pub const URL_OPTIONS: &[&str] = &[];

/// Open the store a `rocksdb://` URL names (see [`URL_SCHEMES`]).
///
/// # Errors
/// `InvalidArgument` for a URL without a directory or with an unknown
/// option; then the errors of [`open`] (`Locked`, `Corrupt`, `Io`).
///
/// # Cancel safety
/// Cancel safe until the store is locked; dropped after that, the lock is
/// released when the half-opened store drops.
pub async fn open_url(url: &BrokerUrl) -> Result<Arc<dyn Broker>> {
    let path = url.location();
    if path.is_empty() {
        return Err(Error::invalid(format!(
            "broker URL `{}` names no directory: use rocksdb:///absolute/dir or rocksdb://relative/dir",
            url.as_str()
        )));
    }
    if let Some((k, _)) = url.backend_options().first() {
        return Err(url.unknown_option("rocksdb", k, URL_OPTIONS));
    }
    let broker = open(path, url.options().clone(), RocksOptions::default()).await?;
    Ok(Arc::new(broker))
}
