//! The `mmap://` URL: `mmap:///absolute/dir` or `mmap://relative/dir`,
//! with the common options, `segment_bytes`, `create` and `read_only`.

use crate::{open, MmapOptions};
use conveyor_core::backend::{parse_bool, BrokerUrl};
use conveyor_core::{Broker, Error, Result};
use std::sync::Arc;

/// The URL schemes this backend answers to.
pub const URL_SCHEMES: &[&str] = &["mmap"];

/// The options an `mmap://` URL may carry besides the common ones.
pub const URL_OPTIONS: &[&str] = &["segment_bytes", "create", "read_only"];

/// Open the store a `mmap://` URL names (see [`URL_SCHEMES`],
/// [`URL_OPTIONS`]).
///
/// `create=false` refuses a path that holds no store (the default,
/// `create=true`, creates it); `read_only=true` opens a store another
/// process may own, without a lock, refusing writes (see [`open`]).
///
/// # Errors
/// `InvalidArgument` for a URL without a directory or with an unknown or
/// malformed option; then the errors of [`open`] (`Locked`, `Corrupt`,
/// `Io`).
///
/// # Cancel safety
/// Cancel safe until the store is locked; dropped after that, the lock is
/// released when the half-opened store drops.
pub async fn open_url(url: &BrokerUrl) -> Result<Arc<dyn Broker>> {
    let path = url.location();
    if path.is_empty() {
        return Err(Error::invalid(format!(
            "broker URL `{}` names no directory: use mmap:///absolute/dir or mmap://relative/dir",
            url.redacted()
        )));
    }
    let mut mmap = MmapOptions::default();
    for (k, v) in url.backend_options() {
        match k.as_str() {
            "segment_bytes" => {
                let n: u64 = v.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
                    Error::invalid(format!(
                        "broker URL option segment_bytes=`{v}`: expected a number of bytes above 0"
                    ))
                })?;
                mmap = mmap.with_segment_bytes(n);
            }
            "create" => mmap = mmap.with_create(parse_bool("create", v)?),
            "read_only" => mmap = mmap.with_read_only(parse_bool("read_only", v)?),
            other => return Err(url.unknown_option("mmap", other, URL_OPTIONS)),
        }
    }
    let broker = open(path, url.options().clone(), mmap).await?;
    Ok(Arc::new(broker))
}
