//! [`run`]: RocksDB calls block (synced writes, iterators over many keys,
//! open and close), so they run on tokio's blocking pool when called inside
//! a runtime, inline otherwise (object_store's `maybe_spawn_blocking`, the
//! same rule as mmap's `fs::blocking`). Owns nothing.

use conveyor_core::{Error, Result};

/// Run `f` off the async worker threads.
pub(crate) async fn run<T, F>(f: F) -> Result<T>
where
    F: FnOnce() -> Result<T> + Send + 'static,
    T: Send + 'static,
{
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => runtime
            .spawn_blocking(f)
            .await
            .map_err(|e| Error::internal(format!("blocking RocksDB task: {e}")))?,
        Err(_) => f(),
    }
}
