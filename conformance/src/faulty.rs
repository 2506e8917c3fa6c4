//! A [`LogStorage`] decorator that fails chosen calls, to prove the
//! engine's error paths (redb's `FuzzerBackend` countdown, object_store's
//! `throttle.rs` decorator).
//!
//! [`FaultyStorage`] owns only the decision to fail (and an optional read
//! latency); every call it lets through goes to the wrapped storage
//! unchanged. A failed call never reaches the wrapped storage, so a failed
//! `append` stores nothing and a failed `put_state` writes nothing: what the
//! engine does with the error is what the tests observe.
//!
//! Faults are armed at run time through
//! [`Engine::storage`](conveyor_core::backend::Engine::storage), counting
//! from the moment they are armed, so a test sets up its topics and groups first and then says
//! "fail the next commit's state write".
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! use conveyor_conformance::faulty::{Fault, FaultyStorage};
//! use conveyor_core::backend::LogStorage;
//! use conveyor_core::ErrorKind;
//!
//! let storage = FaultyStorage::new(conveyor_memory::MemoryStorage::default());
//! // The second append to a topic whose name ends in `.dlq` fails, and every one after it.
//! storage.fail_append(Fault::nth(2).and_after().matching(|topic| topic.ends_with(".dlq")));
//! storage.fail_put_state(Fault::nth(1).with_kind(ErrorKind::Unavailable));
//! let err = storage.put_state(vec![]).await.unwrap_err();
//! assert_eq!(err.kind(), ErrorKind::Unavailable);
//! assert_eq!((storage.put_state_calls(), storage.injected()), (1, 1));
//! storage.put_state(vec![]).await?; // only the first one failed
//! # Ok::<(), conveyor_core::Error>(())
//! # });
//! ```

use async_trait::async_trait;
use bytes::Bytes;
use conveyor_core::backend::{
    Appended, LogStorage, PartitionBounds, ReadRange, StoredMessage, StoredRecord,
};
use conveyor_core::{Capabilities, Error, ErrorKind, Receipt, Result, Retention};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Which calls a [`Fault`] counts: given a topic or a state key.
type Predicate = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// Which calls of one method fail, and how.
#[derive(Clone)]
pub struct Fault {
    nth: u64,
    and_after: bool,
    kind: ErrorKind,
    matching: Option<Predicate>,
}

impl std::fmt::Debug for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fault")
            .field("nth", &self.nth)
            .field("and_after", &self.and_after)
            .field("kind", &self.kind)
            .field("matching", &self.matching.is_some())
            .finish()
    }
}

impl Fault {
    /// Fail the `n`th matching call after the fault is armed (1 is the
    /// next one), with `ErrorKind::Io`. `n` of 0 is taken as 1.
    pub fn nth(n: u64) -> Self {
        Fault {
            nth: n.max(1),
            and_after: false,
            kind: ErrorKind::Io,
            matching: None,
        }
    }

    /// Fail every matching call from the `n`th on, not only the `n`th.
    pub fn and_after(mut self) -> Self {
        self.and_after = true;
        self
    }

    /// Fail with this kind instead of `Io`.
    pub fn with_kind(mut self, kind: ErrorKind) -> Self {
        self.kind = kind;
        self
    }

    /// Count (and fail) only calls this predicate accepts: for `append` it
    /// is given the topic; for `put_state`, each changed state key (the
    /// call matches if any key does; keys look like `t/{topic}`,
    /// `c/{group}/{topic}/{partition}`, `q/{group}/{topic}/{partition}`).
    pub fn matching(mut self, predicate: impl Fn(&str) -> bool + Send + Sync + 'static) -> Self {
        self.matching = Some(Arc::new(predicate));
        self
    }
}

/// A fault while armed: the fault and the matching calls seen so far.
#[derive(Debug)]
struct Armed {
    fault: Fault,
    seen: AtomicU64,
}

/// One method's fault slot and call counter.
#[derive(Debug, Default)]
struct Slot {
    armed: Mutex<Option<Arc<Armed>>>,
    calls: AtomicU64,
}

impl Slot {
    fn arm(&self, fault: Option<Fault>) {
        let armed = fault.map(|fault| {
            Arc::new(Armed {
                fault,
                seen: AtomicU64::new(0),
            })
        });
        *self.armed.lock().unwrap_or_else(|e| e.into_inner()) = armed;
    }

    /// Count a call; the error to return if it must fail.
    fn check<'a>(
        &self,
        subjects: impl IntoIterator<Item = &'a str>,
        what: impl FnOnce() -> String,
    ) -> Option<Error> {
        let call = self.calls.fetch_add(1, Ordering::AcqRel) + 1;
        let armed = self
            .armed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()?;
        let fault = &armed.fault;
        if let Some(p) = &fault.matching {
            if !subjects.into_iter().any(|s| p(s)) {
                return None;
            }
        }
        let n = armed.seen.fetch_add(1, Ordering::AcqRel) + 1;
        let fails = n == fault.nth || (fault.and_after && n > fault.nth);
        fails.then(|| {
            Error::new(
                fault.kind,
                format!(
                    "injected fault: {} (call {call}, matching call {n})",
                    what()
                ),
            )
        })
    }
}

/// A [`LogStorage`] over `S` that fails the calls its armed [`Fault`]s
/// choose (see the module docs). Calls are counted atomically.
#[derive(Debug)]
pub struct FaultyStorage<S> {
    inner: S,
    append: Slot,
    put_state: Slot,
    injected: AtomicU64,
    persistent: Option<bool>,
    read_latency: Option<Duration>,
}

impl<S: LogStorage> FaultyStorage<S> {
    /// Wrap `inner`; no fault is armed.
    pub fn new(inner: S) -> Self {
        FaultyStorage {
            inner,
            append: Slot::default(),
            put_state: Slot::default(),
            injected: AtomicU64::new(0),
            persistent: None,
            read_latency: None,
        }
    }

    /// Report `persistent` as given instead of the wrapped storage's flag.
    /// The engine only writes state (`put_state`) for a persistent storage,
    /// so this puts the state path of an in-memory storage under test.
    pub fn with_persistent(mut self, persistent: bool) -> Self {
        self.persistent = Some(persistent);
        self
    }

    /// Sleep this long in every `read` before reading, so a caller can be
    /// cancelled while a read is in progress (as a networked storage would
    /// allow).
    pub fn with_read_latency(mut self, latency: Duration) -> Self {
        self.read_latency = Some(latency);
        self
    }

    /// Arm `fault` for `append`, replacing any armed before; counting
    /// starts now.
    pub fn fail_append(&self, fault: Fault) {
        self.append.arm(Some(fault));
    }

    /// Arm `fault` for `put_state`, replacing any armed before; counting
    /// starts now.
    pub fn fail_put_state(&self, fault: Fault) {
        self.put_state.arm(Some(fault));
    }

    /// Disarm every fault.
    pub fn heal(&self) {
        self.append.arm(None);
        self.put_state.arm(None);
    }

    /// `append` calls so far (failed or not).
    pub fn append_calls(&self) -> u64 {
        self.append.calls.load(Ordering::Acquire)
    }

    /// `put_state` calls so far (failed or not).
    pub fn put_state_calls(&self) -> u64 {
        self.put_state.calls.load(Ordering::Acquire)
    }

    /// Calls failed by a fault so far.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::Acquire)
    }

    /// The wrapped storage.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    fn injected_error(&self, err: Option<Error>) -> Result<()> {
        match err {
            Some(e) => {
                self.injected.fetch_add(1, Ordering::AcqRel);
                tracing::debug!(error = %e, "fault injected");
                Err(e)
            }
            None => Ok(()),
        }
    }
}

#[async_trait]
impl<S: LogStorage> LogStorage for FaultyStorage<S> {
    fn capabilities(&self) -> Capabilities {
        let mut caps = self.inner.capabilities();
        if let Some(p) = self.persistent {
            caps.persistent = p;
        }
        caps
    }

    async fn load_state(&self) -> Result<Vec<(String, Bytes)>> {
        self.inner.load_state().await
    }

    async fn put_state(&self, changes: Vec<(String, Option<Bytes>)>) -> Result<()> {
        let keys = changes.iter().map(|(k, _)| k.as_str());
        let fault = self.put_state.check(keys, || {
            let keys: Vec<&str> = changes.iter().map(|(k, _)| k.as_str()).collect();
            format!("put_state of {keys:?}")
        });
        self.injected_error(fault)?;
        self.inner.put_state(changes).await
    }

    async fn ensure_partitions(&self, topic: &str, partitions: u32) -> Result<()> {
        self.inner.ensure_partitions(topic, partitions).await
    }

    async fn drop_topic(&self, topic: &str) -> Result<()> {
        self.inner.drop_topic(topic).await
    }

    async fn append(
        &self,
        topic: &str,
        partition: u32,
        records: Vec<StoredRecord>,
    ) -> Result<Appended> {
        let fault = self.append.check([topic], || {
            format!(
                "append of {} records to `{topic}`/{partition}",
                records.len()
            )
        });
        self.injected_error(fault)?;
        self.inner.append(topic, partition, records).await
    }

    async fn read(
        &self,
        topic: &str,
        partition: u32,
        range: ReadRange,
    ) -> Result<Vec<StoredMessage>> {
        if let Some(latency) = self.read_latency {
            tokio::time::sleep(latency).await;
        }
        self.inner.read(topic, partition, range).await
    }

    fn bounds(&self, topic: &str, partition: u32) -> Result<PartitionBounds> {
        self.inner.bounds(topic, partition)
    }

    async fn offset_for_timestamp(
        &self,
        topic: &str,
        partition: u32,
        timestamp: u64,
    ) -> Result<u64> {
        self.inner
            .offset_for_timestamp(topic, partition, timestamp)
            .await
    }

    async fn enforce_retention(
        &self,
        topic: &str,
        partition: u32,
        retention: &Retention,
        now_ms: u64,
    ) -> Result<()> {
        self.inner
            .enforce_retention(topic, partition, retention, now_ms)
            .await
    }

    async fn idempotency_keys_since(
        &self,
        topic: &str,
        since_ms: u64,
    ) -> Result<Vec<(String, Receipt)>> {
        self.inner.idempotency_keys_since(topic, since_ms).await
    }

    async fn flush(&self) -> Result<()> {
        self.inner.flush().await
    }

    async fn close(&self) -> Result<()> {
        self.inner.close().await
    }
}
