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

/// Like [`blocking`], but runs `f` right here when the calling thread is
/// not an async worker: a multi-thread runtime's `block_on` thread (what
/// `#[tokio::main]` runs `main` on, and what a synchronous caller uses),
/// which polls nothing but the future it blocks on, so blocking it stalls
/// no other task. Inside a task (on a worker, or in a `LocalSet`) and on a
/// current-thread runtime (whose one thread runs every task) it is
/// [`blocking`]. Outside a runtime it runs inline, as [`blocking`] does.
///
/// For short storage calls that do not wait for a sync (an unsynced
/// RocksDB write, a page-cache write): the hop to the blocking pool and
/// back is two thread wake-ups, which cost as much as such a call. Calls
/// that sync go through [`blocking`] so that concurrent ones (the
/// partitions of one batch) run side by side and can share a sync.
///
/// # Errors
/// `f`'s error; `Internal` if the blocking task panicked or was cancelled.
///
/// # Cancel safety
/// As [`blocking`]: once started, `f` runs to its end.
pub async fn blocking_short<T, F>(f: F) -> Result<T>
where
    F: FnOnce() -> Result<T> + Send + 'static,
    T: Send + 'static,
{
    if may_block_in_place() {
        return f();
    }
    blocking(f).await
}

/// Whether the calling thread may block without stalling async tasks: no
/// runtime, or a multi-thread runtime's `block_on` thread (no task is
/// running here: `block_on` futures have no task id). What
/// [`blocking_short`] decides on, for storages that hand work to a thread
/// of their own otherwise.
pub fn may_block_in_place() -> bool {
    match tokio::runtime::Handle::try_current() {
        Err(_) => true,
        Ok(runtime) => {
            runtime.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread
                && tokio::task::try_id().is_none()
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread::ThreadId;

    fn here() -> Result<ThreadId> {
        Ok(std::thread::current().id())
    }

    fn multi_thread() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .unwrap()
    }

    #[test]
    fn short_calls_run_inline_only_off_the_workers() {
        let caller = std::thread::current().id();
        // A multi-thread runtime's block_on thread is no worker: inline.
        let rt = multi_thread();
        assert_eq!(rt.block_on(blocking_short(here)).unwrap(), caller);
        // Inside a task (on a worker): the blocking pool, not the worker.
        let (worker, ran) = rt.block_on(async {
            tokio::spawn(async { (std::thread::current().id(), blocking_short(here).await) })
                .await
                .unwrap()
        });
        assert_ne!(ran.unwrap(), worker);
        // A current-thread runtime's one thread runs every task: the pool.
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        assert_ne!(rt.block_on(blocking_short(here)).unwrap(), caller);
        // No runtime: inline, as `blocking`.
        assert_eq!(
            futures::executor::block_on(blocking_short(here)).unwrap(),
            caller
        );
    }
}
