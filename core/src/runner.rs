//! The handler runner: the consume → process → settle loop every user
//! would otherwise write by hand.
//!
//! [`Runner`] polls a [`Consumer`], runs a [`Handler`] on each message with
//! a concurrency limit, acks on success and nacks on failure (the group's
//! retry backoff applies, and the backend dead-letters a message after the
//! group's `max_deliveries`), and stops gracefully: no new polls, in-flight
//! handlers finish and settle, then the consumer leaves the group.
//!
//! In stream mode, messages of one partition are handled one after another
//! in offset order (partitions in parallel), and a failure stops that
//! partition's batch, so a cumulative commit never passes an unhandled
//! message. In queue mode any message may run beside any other.
//!
//! [`Idempotent`] wraps a handler with an [`IdempotencyStore`] so it runs at
//! most once per event id within a TTL, even when a message is delivered
//! twice.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> conveyor_core::Result<()> {
//! use conveyor_core::runner::{HandlerError, Runner, RunnerConfig};
//! use conveyor_core::prelude::*;
//! use std::time::Duration;
//!
//! let broker = conveyor_memory::open_default();
//! broker.create_topic("orders", TopicConfig::new(2)).await?;
//! let producer = broker.producer().await?;
//! for i in 0..10 {
//!     producer.send("orders", Record::new(format!("order {i}"))).await?;
//! }
//! let consumer = broker.consumer("email", &["orders"], GroupConfig::queue()).await?;
//! let runner = Runner::new(consumer, RunnerConfig::default().with_concurrency(4));
//! let stats = runner
//!     .run_until_idle(
//!         |m: Message| async move {
//!             assert!(m.value.starts_with(b"order"));
//!             Ok::<(), HandlerError>(())
//!         },
//!         Duration::from_millis(100),
//!     )
//!     .await?;
//! assert_eq!(stats.succeeded, 10);
//! # Ok(())
//! # }
//! ```

use crate::broker::{Consumer, IdempotencyStore, NackOptions, NackOutcome};
use crate::config::DeliveryMode;
use crate::error::{Error, ErrorKind, Result};
use crate::record::Message;
use async_trait::async_trait;
use futures::future::{FutureExt, Shared};
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Why a handler failed; the text goes to the DLQ header
/// `conveyor.dlq.error` if the message is dead-lettered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerError {
    /// The reason.
    pub reason: String,
    /// Redeliver after this delay instead of the group's backoff.
    pub retry_after: Option<Duration>,
}

impl HandlerError {
    /// A failure with a reason; redelivered after the group's backoff.
    pub fn new(reason: impl Into<String>) -> Self {
        HandlerError {
            reason: reason.into(),
            retry_after: None,
        }
    }
    /// Redeliver after `delay`.
    pub fn retry_after(mut self, delay: Duration) -> Self {
        self.retry_after = Some(delay);
        self
    }
}

impl std::fmt::Display for HandlerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

impl std::error::Error for HandlerError {}

impl From<Error> for HandlerError {
    fn from(e: Error) -> Self {
        HandlerError::new(e.to_string())
    }
}

/// Processes one message. Closures `Fn(Message) -> impl Future<Output =
/// Result<(), HandlerError>>` are handlers.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Handle a message; `Err` means it should be redelivered (or
    /// dead-lettered once out of attempts).
    ///
    /// # Errors
    /// A [`HandlerError`] with the reason (it becomes the DLQ header
    /// `conveyor.dlq.error`) and, optionally, when to retry.
    ///
    /// # Cancel safety
    /// The runner never drops a running handler: at shutdown it waits for
    /// in-flight handlers to finish and settles their messages.
    async fn handle(&self, message: Message) -> Result<(), HandlerError>;
}

#[async_trait]
impl<F, Fut> Handler for F
where
    F: Fn(Message) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    async fn handle(&self, message: Message) -> Result<(), HandlerError> {
        (self)(message).await
    }
}

/// Settings of a [`Runner`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct RunnerConfig {
    /// Handlers running at once (default 16).
    pub concurrency: usize,
    /// Messages asked for per poll (default 64).
    pub batch: usize,
    /// How long one poll waits (default 500 ms).
    pub poll_timeout: Duration,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        RunnerConfig {
            concurrency: 16,
            batch: 64,
            poll_timeout: Duration::from_millis(500),
        }
    }
}

impl RunnerConfig {
    /// Set the number of handlers running at once (at least 1).
    pub fn with_concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }
    /// Set the poll batch size (at least 1).
    pub fn with_batch(mut self, n: usize) -> Self {
        self.batch = n.max(1);
        self
    }
    /// Set how long one poll waits.
    pub fn with_poll_timeout(mut self, d: Duration) -> Self {
        self.poll_timeout = d;
        self
    }
}

/// What a run did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RunStats {
    /// Messages handled and settled.
    pub succeeded: u64,
    /// Handler failures (each nacked: retried or dead-lettered).
    pub failed: u64,
    /// Settle calls refused (lease lost, fenced): the message will come
    /// again to someone.
    pub settle_refused: u64,
}

#[derive(Default)]
struct Counters {
    succeeded: AtomicU64,
    failed: AtomicU64,
    settle_refused: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> RunStats {
        RunStats {
            succeeded: self.succeeded.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            settle_refused: self.settle_refused.load(Ordering::Relaxed),
        }
    }
}

/// Runs a handler over a consumer. See the [module docs](self).
pub struct Runner {
    consumer: Arc<dyn Consumer>,
    config: RunnerConfig,
}

impl Runner {
    /// A runner over `consumer`.
    pub fn new(consumer: Arc<dyn Consumer>, config: RunnerConfig) -> Self {
        Runner { consumer, config }
    }

    /// Run until `shutdown` completes, then finish in-flight handlers and
    /// leave the group.
    ///
    /// # Errors
    /// The first poll error that is not retriable (`Unavailable` is
    /// retried), a handler task that panicked, or the error of leaving the
    /// group; the runner then stops as on shutdown. Refused settles are
    /// counted in [`RunStats`] and logged, not returned. (Shutdown races a
    /// `poll` in `select!`, which is fine because `poll` is cancel safe.)
    ///
    /// # Cancel safety
    /// Not cancel safe: dropping the future abandons in-flight handlers;
    /// their messages come again (queue mode: after the visibility timeout;
    /// stream mode: from the committed offset). Use `shutdown` to stop.
    pub async fn run<H: Handler>(
        self,
        handler: H,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<RunStats> {
        self.drive(handler, shutdown, None).await
    }

    /// Run until no message arrives for `idle`.
    ///
    /// # Errors
    /// As [`Runner::run`].
    ///
    /// # Cancel safety
    /// As [`Runner::run`]: not cancel safe.
    pub async fn run_until_idle<H: Handler>(self, handler: H, idle: Duration) -> Result<RunStats> {
        self.drive(handler, std::future::pending(), Some(idle))
            .await
    }

    async fn drive<H: Handler>(
        self,
        handler: H,
        shutdown: impl Future<Output = ()> + Send,
        idle: Option<Duration>,
    ) -> Result<RunStats> {
        let handler = Arc::new(handler);
        let counters = Arc::new(Counters::default());
        let permits = Arc::new(tokio::sync::Semaphore::new(self.config.concurrency));
        let mut tasks = tokio::task::JoinSet::new();
        let mut last_message = Instant::now();
        let mut failure: Option<Error> = None;
        let mut chains: HashMap<(String, u32), Chain> = HashMap::new();
        let rewinds: Rewinds = Arc::new(Mutex::new(HashMap::new()));
        tokio::pin!(shutdown);
        loop {
            // Reap finished tasks so errors surface.
            while let Some(joined) = tasks.try_join_next() {
                if let Err(e) = joined {
                    failure.get_or_insert(Error::internal(format!("handler task failed: {e}")));
                }
            }
            if failure.is_some() {
                break;
            }
            if let Some(idle) = idle {
                if tasks.is_empty() && last_message.elapsed() >= idle {
                    break;
                }
            }
            let wait = match idle {
                Some(idle) => self.config.poll_timeout.min(idle),
                None => self.config.poll_timeout,
            };
            // Don't poll more than can start soon: keep leases short-lived.
            let free = permits.available_permits().max(1);
            let want = self
                .config
                .batch
                .min(free.max(self.config.batch / 4).max(1));
            let polled = tokio::select! {
                biased;
                () = &mut shutdown => break,
                r = self.consumer.poll(want, wait) => r,
            };
            let messages = match polled {
                Ok(m) => m,
                Err(e) if e.is_retriable() => {
                    tracing::warn!(error = %e, "poll failed; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            };
            if messages.is_empty() {
                chains.retain(|_, c| c.peek().is_none());
                continue;
            }
            last_message = Instant::now();
            for lane in lanes(messages) {
                let permit = permits
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|_| Error::internal("runner semaphore closed"))?;
                let consumer = self.consumer.clone();
                let handler = handler.clone();
                let counters = counters.clone();
                let rewinds = rewinds.clone();
                // Stream mode: a partition's lanes run one after another, in
                // the order they were polled.
                let (done, previous) = match lane.first() {
                    Some(m) if m.token().mode() == Some(DeliveryMode::Stream) => {
                        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
                        let key = (m.topic.clone(), m.partition);
                        (Some(tx), chains.insert(key, rx.shared()))
                    }
                    _ => (None, None),
                };
                tasks.spawn(async move {
                    let _permit = permit;
                    if let Some(previous) = previous {
                        let _ = previous.await;
                    }
                    run_lane(&*consumer, &*handler, lane, &counters, &rewinds).await;
                    drop(done);
                });
            }
        }
        while let Some(joined) = tasks.join_next().await {
            if let Err(e) = joined {
                failure.get_or_insert(Error::internal(format!("handler task failed: {e}")));
            }
        }
        self.consumer.close().await?;
        match failure {
            Some(e) => Err(e),
            None => Ok(counters.snapshot()),
        }
    }
}

/// Split a batch into lanes: in stream mode (messages carry no lease) one
/// lane per partition in offset order; in queue mode one lane per message.
fn lanes(messages: Vec<Message>) -> Vec<Vec<Message>> {
    let stream = messages
        .iter()
        .all(|m| m.token().mode() == Some(DeliveryMode::Stream));
    if !stream {
        return messages.into_iter().map(|m| vec![m]).collect();
    }
    let mut by_partition: BTreeMap<(String, u32), Vec<Message>> = BTreeMap::new();
    for m in messages {
        by_partition
            .entry((m.topic.clone(), m.partition))
            .or_default()
            .push(m);
    }
    by_partition
        .into_values()
        .map(|mut v| {
            v.sort_by_key(|m| m.offset);
            v
        })
        .collect()
}

/// The end of the last lane of a partition, awaited by the next one.
type Chain = Shared<tokio::sync::oneshot::Receiver<()>>;
/// Stream mode: partitions rewound by a nack, and the offset redelivery
/// restarts from; messages polled before the rewind above it are skipped.
type Rewinds = Arc<Mutex<HashMap<(String, u32), u64>>>;

async fn run_lane(
    consumer: &dyn Consumer,
    handler: &dyn Handler,
    lane: Vec<Message>,
    counters: &Counters,
    rewinds: &Rewinds,
) {
    let stream = lane
        .first()
        .is_some_and(|m| m.token().mode() == Some(DeliveryMode::Stream));
    for message in lane {
        if stream {
            let key = (message.topic.clone(), message.partition);
            let mut rewound = rewinds.lock();
            match rewound.get(&key) {
                // Polled before the rewind: it comes again after the
                // redelivery of the nacked message.
                Some(at) if message.offset > *at => continue,
                Some(_) => {
                    rewound.remove(&key);
                }
                None => {}
            }
        }
        match handler.handle(message.clone()).await {
            Ok(()) => match consumer.ack(&message).await {
                Ok(()) => {
                    counters.succeeded.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    counters.settle_refused.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(message = %message.position(), error = %e, "ack refused");
                    if matches!(e.kind(), ErrorKind::Fenced) {
                        return;
                    }
                }
            },
            Err(failure) => {
                counters.failed.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(message = %message.position(), attempt = message.attempt, reason = %failure, "handler failed");
                match consumer
                    .nack(&message, {
                        let options = NackOptions::new().with_reason(failure.reason.clone());
                        match failure.retry_after {
                            Some(d) => options.with_delay(d),
                            None => options,
                        }
                    })
                    .await
                {
                    Ok(NackOutcome::Redeliver) if stream => {
                        // The partition restarts at this message: what was
                        // polled after it comes again, so skip it now.
                        rewinds
                            .lock()
                            .insert((message.topic.clone(), message.partition), message.offset);
                        return;
                    }
                    // Dead-lettered: the position stayed; go on with the lane.
                    Ok(_) => {}
                    Err(e) => {
                        counters.settle_refused.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(message = %message.position(), error = %e, "nack refused");
                        if stream {
                            // Fenced or closed: the new owner redelivers.
                            return;
                        }
                    }
                }
            }
        }
    }
}

/// The id [`Idempotent::by_idempotency_key`] records for `message` within
/// `scope`: `{scope}:{idempotency key}`, or `None` if it was sent without
/// one. For code that checks the store by hand in the same scope.
pub fn event_id(scope: &str, message: &Message) -> Option<String> {
    message
        .idempotency_key
        .as_ref()
        .map(|k| format!("{scope}:{k}"))
}

/// Extracts an event id from a message.
type EventId = dyn Fn(&Message) -> Option<String> + Send + Sync;

/// A handler that runs at most once per event id within `ttl`, through an
/// [`IdempotencyStore`]. Duplicates are acked without running the handler;
/// a failed run forgets the id so the retry runs again.
///
/// A process that dies inside the handler leaves the id recorded, so the
/// redelivery is skipped: at most once, by design (contract §8).
pub struct Idempotent<H> {
    store: Arc<dyn IdempotencyStore>,
    ttl: Duration,
    key: Box<EventId>,
    inner: H,
    duplicates: Arc<AtomicU64>,
}

impl<H: Handler> Idempotent<H> {
    /// Wrap `inner`; `key` extracts the event id (messages without one run
    /// every time).
    pub fn new(
        store: Arc<dyn IdempotencyStore>,
        ttl: Duration,
        key: impl Fn(&Message) -> Option<String> + Send + Sync + 'static,
        inner: H,
    ) -> Self {
        Idempotent {
            store,
            ttl,
            key: Box::new(key),
            inner,
            duplicates: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Wrap `inner`, keyed on the producer's idempotency key
    /// ([`Message::idempotency_key`]) within `scope` (use the group name:
    /// the store is shared, and each group must handle an event once).
    /// Messages sent without an idempotency key run every time.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> conveyor_core::Result<()> {
    /// use conveyor_core::prelude::*;
    /// use conveyor_core::runner::{HandlerError, Idempotent};
    /// use std::time::Duration;
    ///
    /// let broker = conveyor_memory::open_default();
    /// let handler = Idempotent::by_idempotency_key(
    ///     broker.idempotency_store(),
    ///     Duration::from_secs(3600),
    ///     "email",
    ///     |m: Message| async move {
    ///         println!("emailing about {:?}", m.idempotency_key);
    ///         Ok::<(), HandlerError>(())
    ///     },
    /// );
    /// # let _ = handler;
    /// # Ok(())
    /// # }
    /// ```
    pub fn by_idempotency_key(
        store: Arc<dyn IdempotencyStore>,
        ttl: Duration,
        scope: impl Into<String>,
        inner: H,
    ) -> Self {
        let scope = scope.into();
        Self::new(store, ttl, move |m: &Message| event_id(&scope, m), inner)
    }

    /// A counter of duplicates skipped, shared with the handler.
    pub fn duplicates(&self) -> Arc<AtomicU64> {
        self.duplicates.clone()
    }
}

#[async_trait]
impl<H: Handler> Handler for Idempotent<H> {
    async fn handle(&self, message: Message) -> Result<(), HandlerError> {
        let Some(id) = (self.key)(&message) else {
            return self.inner.handle(message).await;
        };
        if !self.store.first_seen(&id, self.ttl).await? {
            self.duplicates.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        match self.inner.handle(message).await {
            Ok(()) => Ok(()),
            Err(e) => {
                self.store.forget(&id).await?;
                Err(e)
            }
        }
    }
}
