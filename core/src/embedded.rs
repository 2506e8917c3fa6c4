//! What every embedded storage needs around its blocking I/O, written once:
//! running blocking work off the async worker threads ([`blocking`]) and
//! the background thread that makes `Durability::Interval` hold
//! ([`spawn_interval_flusher`]). Knows nothing of any file format.

use crate::error::{Error, Result};
use std::sync::Arc;
use std::time::Duration;

/// Run blocking storage work (fsync, rename, directory scans, RocksDB
/// calls) off the async worker threads: on tokio's blocking pool when
/// called inside a runtime (multi-thread or current-thread: both have a
/// blocking pool, and a current-thread runtime keeps driving its other
/// tasks while it waits), inline otherwise (object_store's
/// `maybe_spawn_blocking`).
///
/// # Errors
/// `f`'s error; `Internal` if the blocking task panicked or was cancelled.
///
/// # Cancel safety
/// Dropping the future does not stop `f`: it runs to its end on the
/// blocking pool, and its result is discarded.
pub async fn blocking<T, F>(f: F) -> Result<T>
where
    F: FnOnce() -> Result<T> + Send + 'static,
    T: Send + 'static,
{
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => runtime
            .spawn_blocking(f)
            .await
            .map_err(|e| Error::internal(format!("blocking storage task: {e}")))?,
        Err(_) => f(),
    }
}

/// Start a thread named `name` that calls `tick(&store)` every `every`
/// until `tick` returns `false` (the store closed) or the last other
/// reference to `store` is dropped. The thread holds only a weak
/// reference, so it never keeps a store alive.
///
/// # Errors
/// `Io` if the thread cannot be started.
pub fn spawn_interval_flusher<T, F>(
    name: &str,
    store: &Arc<T>,
    every: Duration,
    tick: F,
) -> Result<()>
where
    T: Send + Sync + 'static,
    F: Fn(&T) -> bool + Send + 'static,
{
    let weak = Arc::downgrade(store);
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || loop {
            std::thread::sleep(every);
            let Some(store) = weak.upgrade() else {
                return;
            };
            if !tick(&store) {
                return;
            }
        })
        .map(drop)
        .map_err(|e| Error::io(format!("start the {name} thread"), e))
}
