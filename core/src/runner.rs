//! The handler runner: the consume → process → settle loop every user
//! would otherwise write by hand.
//!
//! [`Runner`] polls a [`Consumer`], runs a [`Handler`] on each message with
//! a concurrency limit, acks on success and nacks on failure (the group's
//! retry backoff applies, and the backend dead-letters a message after the
//! group's `max_deliveries`), and stops gracefully: no new polls, in-flight
//! handlers finish and settle, then the consumer leaves the group.
//!
//! What makes it safe to run slow handlers (as SQS clients do):
//! - **Bounded prefetch**: it polls only as many messages as handlers can
//!   start now, so no leased message waits behind running ones. It polls
//!   again when a quarter of the handler slots are free (or one, below a
//!   concurrency of 8), so a busy runner makes few, fuller polls.
//! - **Lease extension**: in queue mode, while a handler runs, its lease
//!   is extended by the visibility timeout every third of it
//!   ([`RunnerConfig::visibility_timeout`], copied from the group by
//!   [`RunnerConfig::for_group`]): a handler slower than the timeout still
//!   runs once, and a crashed process's leases still expire.
//! - **Handler timeout** ([`RunnerConfig::handler_timeout`]): a handler
//!   running longer is dropped and its message nacked with the reason
//!   "handler timed out after ...".
//! - **Rate limit** ([`RunnerConfig::max_per_second`]) besides the
//!   concurrency limit (the most messages in flight).
//! - **Batched acks**: acks of handlers that finish together go in one
//!   [`Consumer::ack_batch`] call (one write, and one sync under
//!   `durability=always`, for all of them). An ack that finds no call in
//!   flight makes one at once, so nothing waits for a timer.
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
//! # async fn main() -> conveyor::Result<()> {
//! use conveyor::prelude::*;
//! use conveyor::runner::{HandlerError, Runner, RunnerConfig};
//! use std::time::Duration;
//!
//! let broker = conveyor::open("memory://").await?;
//! broker.create_topic("orders", TopicConfig::new(2)).await?;
//! let producer = broker.producer().await?;
//! for i in 0..10 {
//!     producer.send("orders", Record::new(format!(r#"{{"order":{i}}}"#))).await?;
//! }
//! let group = GroupConfig::queue().with_visibility_timeout(Duration::from_secs(30));
//! let consumer = broker.consumer("email", &["orders"], group.clone()).await?;
//! let config = RunnerConfig::for_group(&group)
//!     .with_concurrency(4)
//!     .with_handler_timeout(Duration::from_secs(60));
//! let stats = Runner::new(consumer, config)
//!     .run_until_idle(
//!         |m: Message| async move {
//!             // `?` on any error: it becomes the nack reason (and the
//!             // DLQ's `conveyor.dlq.error` header).
//!             let order: serde_json::Value = serde_json::from_slice(&m.value)?;
//!             assert!(order["order"].is_number());
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
///
/// Any error converts into it, so `?` works inside a handler; the text
/// keeps the whole cause chain (`error: its source: its source`):
///
/// ```
/// use conveyor::runner::HandlerError;
/// use conveyor::Message;
///
/// async fn handle(m: Message) -> Result<(), HandlerError> {
///     let event: serde_json::Value = serde_json::from_slice(&m.value)?;
///     if event["to"].is_null() {
///         return Err(HandlerError::new("no recipient"));
///     }
///     Ok(())
/// }
/// ```
///
/// (It is not itself a `std::error::Error`: that is what lets every
/// error convert into it.)
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

impl<E: std::error::Error + Send + Sync + 'static> From<E> for HandlerError {
    /// The error and its sources, `: `-separated.
    fn from(e: E) -> Self {
        let mut reason = e.to_string();
        let mut next = e.source();
        while let Some(cause) = next {
            let text = cause.to_string();
            // Some errors repeat their source in their own message.
            if !reason.ends_with(&text) {
                reason.push_str(": ");
                reason.push_str(&text);
            }
            next = cause.source();
        }
        HandlerError::new(reason)
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
    /// The runner drops a running handler only when it passes
    /// [`RunnerConfig::handler_timeout`] (the message is then nacked with
    /// the reason "handler timed out after ..."); at shutdown it waits for
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
///
/// ```
/// use conveyor::runner::RunnerConfig;
/// use conveyor::GroupConfig;
/// use std::time::Duration;
///
/// let group = GroupConfig::queue().with_visibility_timeout(Duration::from_secs(60));
/// let config = RunnerConfig::for_group(&group)
///     .with_concurrency(8)
///     .with_handler_timeout(Duration::from_secs(300))
///     .with_max_per_second(200);
/// assert_eq!(config.visibility_timeout, Duration::from_secs(60));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct RunnerConfig {
    /// Handlers running at once (default 16): the most messages in flight.
    /// The runner polls only as many as can start now (bounded prefetch),
    /// so no lease waits in a queue behind running handlers.
    pub concurrency: usize,
    /// At most this many messages asked for per poll (default 64).
    pub batch: usize,
    /// How long one poll waits (default 500 ms).
    pub poll_timeout: Duration,
    /// Queue mode: the group's visibility timeout (default 30 s, the
    /// group default; [`RunnerConfig::for_group`] copies it). While a
    /// handler runs, its lease is extended by this much every third of it
    /// (SQS clients' visibility heartbeat), so a handler slower than the
    /// timeout still runs once.
    pub visibility_timeout: Duration,
    /// Queue mode: extend the leases of running handlers (default on).
    pub extend_leases: bool,
    /// A handler running longer than this is dropped and its message
    /// nacked with the reason "handler timed out after ..." (default: no
    /// limit).
    pub handler_timeout: Option<Duration>,
    /// Start at most this many messages a second (default: no limit).
    pub max_per_second: Option<u32>,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        RunnerConfig {
            concurrency: 16,
            batch: 64,
            poll_timeout: Duration::from_millis(500),
            visibility_timeout: Duration::from_secs(30),
            extend_leases: true,
            handler_timeout: None,
            max_per_second: None,
        }
    }
}

impl RunnerConfig {
    /// The defaults, with the visibility timeout of the group the runner's
    /// consumer was joined with.
    pub fn for_group(group: &crate::config::GroupConfig) -> Self {
        RunnerConfig::default().with_visibility_timeout(group.visibility_timeout)
    }
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
    /// Set the group's visibility timeout (queue mode: leases of running
    /// handlers are extended by it every third of it).
    pub fn with_visibility_timeout(mut self, d: Duration) -> Self {
        self.visibility_timeout = d;
        self
    }
    /// Turn the automatic lease extension of running handlers on or off.
    pub fn with_lease_extension(mut self, on: bool) -> Self {
        self.extend_leases = on;
        self
    }
    /// Drop a handler running longer than `d` and nack its message.
    pub fn with_handler_timeout(mut self, d: Duration) -> Self {
        self.handler_timeout = Some(d);
        self
    }
    /// Start at most `n` messages a second (at least 1).
    pub fn with_max_per_second(mut self, n: u32) -> Self {
        self.max_per_second = Some(n.max(1));
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
        let refill = (self.config.concurrency / 4).clamp(1, self.config.batch.max(1));
        let mut tasks = tokio::task::JoinSet::new();
        let mut last_message = Instant::now();
        let mut failure: Option<Error> = None;
        let mut chains: HashMap<(String, u32), Chain> = HashMap::new();
        let rewinds: Rewinds = Arc::new(Mutex::new(HashMap::new()));
        let acks = Arc::new(AckBatcher::default());
        let mut pace = self.config.max_per_second.map(Pace::new);
        let config = self.config;
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
            // Bounded prefetch: poll only what can start now, so no lease
            // waits behind running handlers (it could expire unextended).
            let free = tokio::select! {
                biased;
                () = &mut shutdown => break,
                free = wait_for_permit(&permits, refill) => free?,
            };
            let mut want = self.config.batch.min(free);
            if let Some(pace) = pace.as_mut() {
                let ready = tokio::select! {
                    biased;
                    () = &mut shutdown => break,
                    ready = pace.ready() => ready,
                };
                want = want.min(ready);
            }
            let polled = tokio::select! {
                biased;
                () = &mut shutdown => break,
                r = self.consumer.poll(want.max(1), wait) => r,
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
            if let Some(pace) = pace.as_mut() {
                pace.take(messages.len());
            }
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
                let acks = acks.clone();
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
                    run_lane(
                        &*consumer, &*handler, lane, &counters, &rewinds, &acks, &config,
                    )
                    .await;
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

/// `100 ms`, `5 s`, `1.5 s`: a duration in a reason people read.
fn duration_text(d: Duration) -> String {
    match (d.as_secs(), d.subsec_millis()) {
        (0, ms) => format!("{ms} ms"),
        (s, 0) => format!("{s} s"),
        _ => format!("{:.3} s", d.as_secs_f64()),
    }
}

/// Wait until a handler slot is free; how many are free then.
/// Wait until `refill` handler slots are free; the number free then.
/// Refilling a quarter of the slots at a time, not one by one, keeps polls
/// (and their bookkeeping) few while no lease waits long for a slot.
async fn wait_for_permit(permits: &Arc<tokio::sync::Semaphore>, refill: usize) -> Result<usize> {
    let n = u32::try_from(refill.max(1)).unwrap_or(u32::MAX);
    let some = permits
        .acquire_many(n)
        .await
        .map_err(|_| Error::internal("runner semaphore closed"))?;
    drop(some);
    Ok(permits.available_permits().max(1))
}

/// The rate limit: a token bucket of one second's worth of starts.
struct Pace {
    per_second: f64,
    tokens: f64,
    at: Instant,
}

impl Pace {
    fn new(per_second: u32) -> Self {
        Pace {
            per_second: f64::from(per_second.max(1)),
            tokens: 1.0,
            at: Instant::now(),
        }
    }

    fn refill(&mut self) {
        let now = Instant::now();
        let earned = now.duration_since(self.at).as_secs_f64() * self.per_second;
        self.tokens = (self.tokens + earned).min(self.per_second.max(1.0));
        self.at = now;
    }

    /// Wait until a start is allowed; how many are allowed now.
    async fn ready(&mut self) -> usize {
        self.refill();
        if self.tokens < 1.0 {
            let missing = (1.0 - self.tokens) / self.per_second;
            tokio::time::sleep(Duration::from_secs_f64(missing)).await;
            self.refill();
        }
        self.tokens.floor().max(1.0) as usize
    }

    /// `n` messages started.
    fn take(&mut self, n: usize) {
        self.tokens -= n as f64;
    }
}

/// Run the handler on a message: with the handler timeout, and in queue
/// mode with its lease extended while it runs.
async fn handle_one(
    consumer: &dyn Consumer,
    handler: &dyn Handler,
    message: &Message,
    config: &RunnerConfig,
) -> Result<(), HandlerError> {
    let work = async {
        match config.handler_timeout {
            Some(limit) => tokio::time::timeout(limit, handler.handle(message.clone()))
                .await
                .unwrap_or_else(|_| {
                    Err(HandlerError::new(format!(
                        "handler timed out after {}",
                        duration_text(limit)
                    )))
                }),
            None => handler.handle(message.clone()).await,
        }
    };
    let queue = message.token().mode() == Some(DeliveryMode::Queue);
    if !queue || !config.extend_leases || config.visibility_timeout.is_zero() {
        return work.await;
    }
    let heartbeat = async {
        let every = config.visibility_timeout / 3;
        loop {
            tokio::time::sleep(every).await;
            if let Err(e) = consumer.extend(message, config.visibility_timeout).await {
                tracing::warn!(message = %message.position(), error = %e, "lease extension refused");
                return std::future::pending::<()>().await;
            }
            tracing::trace!(message = %message.position(), "lease extended");
        }
    };
    tokio::select! {
        result = work => result,
        () = heartbeat => Ok(()),
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

/// Acks of concurrent handlers, coalesced into [`Consumer::ack_batch`]
/// calls (one write, one sync under `always`, for all of them). An ack
/// that finds no call in flight makes one at once with everything waiting;
/// acks arriving meanwhile go together in the next. No ack waits for a
/// timer, so a lone ack costs what `ack` costs.
#[derive(Default)]
struct AckBatcher {
    waiting: Mutex<Vec<(Message, tokio::sync::oneshot::Sender<Result<()>>)>>,
    in_flight: tokio::sync::Mutex<()>,
}

impl AckBatcher {
    async fn ack(&self, consumer: &dyn Consumer, message: &Message) -> Result<()> {
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        self.waiting.lock().push((message.clone(), tx));
        loop {
            tokio::select! {
                biased;
                settled = &mut rx => {
                    return settled.unwrap_or_else(|_| {
                        Err(Error::internal("the ack batch this ack was in was dropped"))
                    });
                }
                _turn = self.in_flight.lock() => {
                    let batch = std::mem::take(&mut *self.waiting.lock());
                    if batch.is_empty() {
                        continue; // ours went with the previous call
                    }
                    let (messages, replies): (Vec<Message>, Vec<_>) = batch.into_iter().unzip();
                    let mut results: Vec<Result<()>> = match consumer.ack_batch(&messages).await {
                        Ok(outcome) => {
                            let mut results: Vec<Result<()>> =
                                messages.iter().map(|_| Ok(())).collect();
                            for (i, e) in outcome.failed {
                                if let Some(slot) = results.get_mut(i) {
                                    *slot = Err(e);
                                }
                            }
                            results
                        }
                        Err(e) => messages
                            .iter()
                            .map(|_| Err(Error::new(e.kind(), e.message())))
                            .collect(),
                    };
                    for (reply, result) in replies.into_iter().zip(results.drain(..)) {
                        let _ = reply.send(result);
                    }
                }
            }
        }
    }
}

async fn run_lane(
    consumer: &dyn Consumer,
    handler: &dyn Handler,
    lane: Vec<Message>,
    counters: &Counters,
    rewinds: &Rewinds,
    acks: &AckBatcher,
    config: &RunnerConfig,
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
        match handle_one(consumer, handler, &message, config).await {
            Ok(()) => match acks.ack(consumer, &message).await {
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
/// [`IdempotencyStore`]. Duplicates are acked without running the handler.
///
/// The id is claimed when the handler starts and kept only if it
/// succeeds. Every other way out forgets it, so the redelivery runs the
/// handler again: a failure, a panic, a handler dropped by
/// [`RunnerConfig::handler_timeout`], and a handler future dropped for
/// any other reason (a runner stopped by dropping its future). While the
/// first delivery runs, a second delivery of the same event is skipped as
/// a duplicate; if the first then fails, its own redelivery runs.
///
/// A process that dies inside the handler leaves the id recorded, so the
/// redelivery is skipped until the TTL runs out (contract §8).
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
    /// # async fn main() -> conveyor::Result<()> {
    /// use conveyor::prelude::*;
    /// use conveyor::runner::{HandlerError, Idempotent};
    /// use std::time::Duration;
    ///
    /// let broker = conveyor::open("memory://").await?;
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
        // From here until the handler succeeds, the id is only claimed:
        // a failure, a panic, a timeout or a dropped future forgets it, so
        // the redelivery runs.
        let claim = Claim {
            store: Some(self.store.clone()),
            id,
        };
        match self.inner.handle(message).await {
            Ok(()) => {
                claim.keep();
                Ok(())
            }
            Err(e) => {
                claim.forget().await?;
                Err(e)
            }
        }
    }
}

/// An event id recorded by [`Idempotent`] while its handler runs. Unless
/// [`Claim::keep`] is called (the handler succeeded), the id is forgotten:
/// by [`Claim::forget`], or when the claim is dropped (the handler panicked
/// or its future was dropped: a timeout, a shutdown).
struct Claim {
    /// `None` once kept or forgotten.
    store: Option<Arc<dyn IdempotencyStore>>,
    id: String,
}

impl Claim {
    /// The handler succeeded: the id stays recorded.
    fn keep(mut self) {
        self.store = None;
    }

    /// The handler failed: forget the id now.
    async fn forget(mut self) -> Result<()> {
        match self.store.take() {
            Some(store) => store.forget(&self.id).await,
            None => Ok(()),
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let Some(store) = self.store.take() else {
            return;
        };
        let id = std::mem::take(&mut self.id);
        // A store that answers at once (the embedded ones) forgets here;
        // one that must wait (a server) forgets on a task of its own.
        let forget = async move {
            if let Err(e) = store.forget(&id).await {
                tracing::warn!(event_id = %id, error = %e,
                    "could not forget the event id of an unfinished handler; \
                     its redelivery is skipped until the id's TTL runs out");
            }
        };
        let mut forget = Box::pin(forget);
        if forget.as_mut().now_or_never().is_some() {
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(forget);
            }
            Err(_) => tracing::warn!(
                "no runtime to forget the event id of an unfinished handler; \
                 its redelivery is skipped until the id's TTL runs out"
            ),
        }
    }
}
