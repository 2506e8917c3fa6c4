//! The `rocksdb://` URL: `rocksdb:///absolute/dir` or
//! `rocksdb://relative/dir`, with the common options and `create`,
//! `read_only` (see [`RocksOptions`]).

use crate::{open, RocksOptions};
use conveyor_core::backend::{parse_bool, BrokerUrl};
use conveyor_core::{Broker, Error, Result};
use std::sync::Arc;

/// The URL schemes this backend answers to.
pub const URL_SCHEMES: &[&str] = &["rocksdb"];

/// The options a `rocksdb://` URL may carry besides the common ones:
/// `create` and `read_only` ([`RocksOptions`]; RocksDB's tuning stays in
/// code).
pub const URL_OPTIONS: &[&str] = &["create", "read_only"];

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
            url.redacted()
        )));
    }
    let mut rocks = RocksOptions::default();
    for (k, v) in url.backend_options() {
        rocks = match k.as_str() {
            "create" => rocks.with_create(parse_bool("create", v)?),
            "read_only" => rocks.with_read_only(parse_bool("read_only", v)?),
            _ => return Err(url.unknown_option("rocksdb", k, URL_OPTIONS)),
        };
    }
    let broker = open(path, url.options().clone(), rocks).await?;
    Ok(Arc::new(broker))
}
