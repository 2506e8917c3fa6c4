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
//!   is extended by the visibility timeout every third of it: the group's,
//!   as stored ([`Consumer::group_config`], read when the runner starts and
//!   every 10 s, so an `alter_group` reaches running runners), unless
//!   [`RunnerConfig::visibility_timeout`] sets one. A handler slower than
//!   the timeout still runs once, and a crashed process's leases still
//!   expire.
//! - **Handler timeout** ([`RunnerConfig::handler_timeout`]): a handler
//!   running longer is dropped and its message nacked with the reason
//!   "handler timed out after ...". A handler that panics is a failure
//!   too, nacked with the reason "handler panicked: ...".
//! - **Rate limit** ([`RunnerConfig::max_per_second`]) besides the
//!   concurrency limit (the most messages in flight).
//! - **Permanent failures** ([`HandlerError::permanent`]): a message that
//!   can never succeed goes to the DLQ at once, with the reason, instead
//!   of using up its deliveries ([`Runner::with_dead_letters`]).
//! - **Outages**: while polls fail `Unavailable`, the runner waits growing,
//!   jittered delays between them ([`RunnerConfig::outage_backoff`]) and
//!   logs the outage once when it starts and once when it ends.
//! - **Live counts** ([`Runner::stats`]) while it runs, and a
//!   [`CancellationToken`] to stop many runners at once
//!   ([`Runner::run_until_cancelled`]).
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
//! [`Idempotent`] wraps a handler with an
//! [`IdempotencyStore`](crate::IdempotencyStore) so it runs at most once
//! per event id within a TTL, even when a message is delivered twice.
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
//! let consumer = broker.consumer("email", &["orders"], group).await?;
//! // Leases are extended by the group's visibility timeout: given once.
//! let config = RunnerConfig::default()
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

use crate::broker::{Broker, Consumer, NackOptions, NackOutcome};
use crate::config::{DeliveryMode, GroupConfig, RetryBackoff};
use crate::error::{Error, ErrorKind, Result};
use crate::observe::metrics::{ProcessInstruments, DEAD_LETTERED, HANDLER_TIMEOUTS};
use crate::observe::{self, Labels};
use crate::record::Message;
use dead_letters::DeadLetters;
use futures::future::{FutureExt, Shared};
use lease_extension::LeaseExtension;
use outage::Outage;
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::Instrument;

mod dead_letters;
mod handler;
mod idempotent;
mod lease_extension;
mod outage;

pub use handler::{Handler, HandlerError};
pub use idempotent::{event_id, Idempotent};

/// The token [`Runner::run_until_cancelled`] stops on (tokio-util's): one
/// token, or children of it, stops every runner of a service at once.
pub use tokio_util::sync::CancellationToken;

/// Settings of a [`Runner`].
///
/// ```
/// use conveyor::runner::RunnerConfig;
/// use conveyor::GroupConfig;
/// use std::time::Duration;
///
/// // The lease extension follows the consumer's group: nothing to repeat.
/// let config = RunnerConfig::default()
///     .with_concurrency(8)
///     .with_handler_timeout(Duration::from_secs(300))
///     .with_max_per_second(200);
/// assert_eq!(config.visibility_timeout, None);
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
    /// Queue mode: while a handler runs, its lease is extended by this
    /// much every third of it (SQS clients' visibility heartbeat), so a
    /// handler slower than the timeout still runs once. `None` (default):
    /// the group's visibility timeout as stored
    /// ([`Consumer::group_config`]), read when the runner starts and every
    /// 10 s; 30 s if the consumer cannot report it. Set it only to extend
    /// by something other than the group's timeout.
    pub visibility_timeout: Option<Duration>,
    /// Queue mode: extend the leases of running handlers (default on).
    pub extend_leases: bool,
    /// A handler running longer than this is dropped and its message
    /// nacked with the reason "handler timed out after ..." (default: no
    /// limit).
    pub handler_timeout: Option<Duration>,
    /// Start at most this many messages a second (default: no limit).
    pub max_per_second: Option<u32>,
    /// While polls fail `Unavailable` (a server backend's outage), wait
    /// this long between them: growing from 100 ms to at most 10 s by
    /// default, each delay jittered to between half and all of it. The
    /// outage is logged once when it starts (WARN) and once when it ends
    /// (INFO).
    pub outage_backoff: RetryBackoff,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        RunnerConfig {
            concurrency: 16,
            batch: 64,
            poll_timeout: Duration::from_millis(500),
            visibility_timeout: None,
            extend_leases: true,
            handler_timeout: None,
            max_per_second: None,
            outage_backoff: RetryBackoff::exponential(
                Duration::from_millis(100),
                Duration::from_secs(10),
            ),
        }
    }
}

impl RunnerConfig {
    /// The defaults. The runner reads the group's settings from its
    /// consumer ([`Consumer::group_config`]), so `group` is not needed:
    /// this is [`RunnerConfig::default`], which follows the group's stored
    /// visibility timeout (also after an `alter_group`).
    #[deprecated(
        since = "0.2.0",
        note = "the runner takes the group's settings from its consumer: use RunnerConfig::default()"
    )]
    pub fn for_group(group: &crate::config::GroupConfig) -> Self {
        let _ = group;
        RunnerConfig::default()
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
    /// Extend leases of running handlers by `d` (every third of it)
    /// instead of the group's visibility timeout. `Duration::ZERO` turns
    /// the extension off.
    pub fn with_visibility_timeout(mut self, d: Duration) -> Self {
        self.visibility_timeout = Some(d);
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
    /// Set the delays between polls while the backend is unavailable
    /// (jittered; see [`RunnerConfig::outage_backoff`]).
    pub fn with_outage_backoff(mut self, backoff: RetryBackoff) -> Self {
        self.outage_backoff = backoff;
        self
    }
}

/// What a run did: returned when it ends, and readable at any time while
/// it runs through [`Runner::stats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct RunStats {
    /// Messages handled and settled.
    pub succeeded: u64,
    /// Handler failures (each nacked to be retried, or dead-lettered).
    pub failed: u64,
    /// Failed messages that went to the DLQ: out of attempts, or failed
    /// [permanently](HandlerError::permanent).
    pub dead_lettered: u64,
    /// Settle calls refused (lease lost, fenced): the message will come
    /// again to someone.
    pub settle_refused: u64,
}

#[derive(Default)]
struct Counters {
    succeeded: AtomicU64,
    failed: AtomicU64,
    dead_lettered: AtomicU64,
    settle_refused: AtomicU64,
    /// A permanent failure without a DLQ was logged.
    warned_no_dlq: std::sync::atomic::AtomicBool,
}

impl Counters {
    fn snapshot(&self) -> RunStats {
        RunStats {
            succeeded: self.succeeded.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            dead_lettered: self.dead_lettered.load(Ordering::Relaxed),
            settle_refused: self.settle_refused.load(Ordering::Relaxed),
        }
    }
}

/// The live counts of a [`Runner`] ([`Runner::stats`]): cheap to clone,
/// readable from any task while the runner runs and after it ended (a
/// metrics exporter, a health endpoint).
#[derive(Clone)]
pub struct LiveStats(Arc<Counters>);

impl LiveStats {
    /// The counts now.
    pub fn snapshot(&self) -> RunStats {
        self.0.snapshot()
    }
}

impl std::fmt::Debug for LiveStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("LiveStats").field(&self.snapshot()).finish()
    }
}

/// Runs a handler over a consumer. See the [module docs](self).
pub struct Runner {
    consumer: Arc<dyn Consumer>,
    config: RunnerConfig,
    counters: Arc<Counters>,
    dead_letters: Option<Arc<DeadLetters>>,
}

impl Runner {
    /// A runner over `consumer`.
    pub fn new(consumer: Arc<dyn Consumer>, config: RunnerConfig) -> Self {
        Runner {
            consumer,
            config,
            counters: Arc::new(Counters::default()),
            dead_letters: None,
        }
    }

    /// Dead-letter [permanent](HandlerError::permanent) failures at once,
    /// through `broker` (the one the consumer came from), to the group's
    /// DLQ topic as stored when the failure happens
    /// ([`Consumer::group_config`], so it follows an `alter_group`; the
    /// `group` given here is used only if the consumer cannot report its
    /// group's settings): by default
    /// `{topic}.{group}.dlq`, created when first needed, as the broker
    /// does for messages out of attempts. The DLQ record is the one the
    /// broker would write (`conveyor.dlq.*` headers, the handler's reason
    /// in `conveyor.dlq.error`); it is appended before the message is
    /// settled, so a crash between the two leaves a duplicate in the DLQ,
    /// never a loss.
    ///
    /// Without it, a permanent failure is retried like any other (and a
    /// WARN says so once).
    pub fn with_dead_letters(mut self, broker: Arc<dyn Broker>, group: &GroupConfig) -> Self {
        self.dead_letters = Some(Arc::new(DeadLetters::new(broker, group.dlq.clone())));
        self
    }

    /// Live counts of this runner, readable while it runs (the final
    /// counts are also what [`Runner::run`] returns).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> conveyor::Result<()> {
    /// use conveyor::prelude::*;
    /// use conveyor::runner::{HandlerError, Runner, RunnerConfig};
    /// use std::time::Duration;
    ///
    /// let broker = conveyor::open("memory://").await?;
    /// broker.create_topic("jobs", TopicConfig::new(1)).await?;
    /// broker.producer().await?.send("jobs", Record::new("resize 7")).await?;
    /// let consumer = broker.consumer("workers", &["jobs"], GroupConfig::queue()).await?;
    /// let runner = Runner::new(consumer, RunnerConfig::default());
    /// let stats = runner.stats(); // clone it into a metrics task
    /// runner
    ///     .run_until_idle(|_m: Message| async { Ok::<(), HandlerError>(()) }, Duration::from_millis(100))
    ///     .await?;
    /// assert_eq!(stats.snapshot().succeeded, 1);
    /// # Ok(())
    /// # }
    /// ```
    pub fn stats(&self) -> LiveStats {
        LiveStats(self.counters.clone())
    }

    /// Run until `shutdown` completes, then finish in-flight handlers and
    /// leave the group.
    ///
    /// # Errors
    /// The first poll error that is not retriable (`Unavailable` is
    /// retried, see [`RunnerConfig::outage_backoff`]), a task of the
    /// runner that failed (not a handler's panic: that is a failure like an
    /// `Err`, nacked with the panic's text), or the error of leaving the
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

    /// Run until `token` is cancelled, then stop as [`Runner::run`] does
    /// on shutdown. Give each runner of a service the same token (or a
    /// [child](CancellationToken::child_token)) and cancel it once, on
    /// Ctrl-C or SIGTERM, to stop them all.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> conveyor::Result<()> {
    /// use conveyor::prelude::*;
    /// use conveyor::runner::{CancellationToken, HandlerError, Runner, RunnerConfig};
    ///
    /// let broker = conveyor::open("memory://").await?;
    /// broker.create_topic("orders", TopicConfig::new(2)).await?;
    /// let stop = CancellationToken::new();
    /// let mut runners = Vec::new();
    /// for group in ["email", "sms"] {
    ///     let consumer = broker.consumer(group, &["orders"], GroupConfig::queue()).await?;
    ///     let runner = Runner::new(consumer, RunnerConfig::default());
    ///     let handler = |_m: Message| async { Ok::<(), HandlerError>(()) };
    ///     runners.push(tokio::spawn(runner.run_until_cancelled(handler, stop.child_token())));
    /// }
    /// // In a service: `tokio::signal::ctrl_c().await?;`
    /// stop.cancel();
    /// for runner in runners {
    ///     runner.await.expect("runner task")?;
    /// }
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// As [`Runner::run`].
    ///
    /// # Cancel safety
    /// As [`Runner::run`]: not cancel safe; cancel the token to stop.
    pub async fn run_until_cancelled<H: Handler>(
        self,
        handler: H,
        token: CancellationToken,
    ) -> Result<RunStats> {
        self.drive(handler, token.cancelled_owned(), None).await
    }

    async fn drive<H: Handler>(
        self,
        handler: H,
        shutdown: impl Future<Output = ()> + Send,
        idle: Option<Duration>,
    ) -> Result<RunStats> {
        let handler = Arc::new(handler);
        let counters = self.counters.clone();
        let dead_letters = self.dead_letters.clone();
        let mut outage = Outage::new(self.config.outage_backoff);
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
        let extension =
            Arc::new(LeaseExtension::new(&*self.consumer, self.config.visibility_timeout).await);
        let labels = Arc::new(
            self.consumer
                .labels()
                .unwrap_or_else(|| Labels::new("unknown", None)),
        );
        let process = Arc::new(ProcessInstruments::new((*labels).clone()));
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
                Ok(m) => {
                    outage.over();
                    m
                }
                Err(e) if e.is_retriable() => {
                    let delay = outage.failed(&e);
                    tokio::select! {
                        biased;
                        () = &mut shutdown => break,
                        () = tokio::time::sleep(delay) => continue,
                    }
                }
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            };
            extension.refresh(&*self.consumer).await;
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
                let dead_letters = dead_letters.clone();
                let extension = extension.clone();
                let labels = labels.clone();
                let process = process.clone();
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
                    let lane_ctx = Lane {
                        consumer: &*consumer,
                        handler: &*handler,
                        counters: &counters,
                        rewinds: &rewinds,
                        acks: &acks,
                        dead_letters: dead_letters.as_deref(),
                        config: &config,
                        extension: &extension,
                        labels: &labels,
                        process: &process,
                    };
                    lane_ctx.run(lane).await;
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

/// The message of a panic (`panic!("...")`'s text), or a placeholder.
fn panic_text(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(a panic without a message)")
}

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
    extension: &LeaseExtension,
    labels: &Labels,
) -> Result<(), HandlerError> {
    // A panic is a failure like any other: the message is nacked with
    // the panic's text, and the runner goes on.
    let caught = std::panic::AssertUnwindSafe(handler.handle(message.clone()))
        .catch_unwind()
        .map(|outcome| {
            outcome.unwrap_or_else(|panic| {
                Err(HandlerError::new(format!(
                    "handler panicked: {}",
                    panic_text(&*panic)
                )))
            })
        });
    let work = async {
        match config.handler_timeout {
            Some(limit) => tokio::time::timeout(limit, caught)
                .await
                .unwrap_or_else(|_| {
                    observe::metrics::count(HANDLER_TIMEOUTS, labels, &message.topic, 1);
                    Err(HandlerError::new(format!(
                        "handler timed out after {}",
                        duration_text(limit)
                    )))
                }),
            None => caught.await,
        }
    };
    let queue = message.token().mode() == Some(DeliveryMode::Queue);
    if !queue || !config.extend_leases || extension.current().is_zero() {
        return work.await;
    }
    let heartbeat = async {
        loop {
            // The group's timeout may change while the handler runs.
            let by = extension.current();
            if by.is_zero() {
                return std::future::pending::<()>().await;
            }
            tokio::time::sleep(by / 3).await;
            if let Err(e) = consumer.extend(message, by).await {
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

/// What a lane's task works with.
struct Lane<'a> {
    consumer: &'a dyn Consumer,
    handler: &'a dyn Handler,
    counters: &'a Counters,
    rewinds: &'a Rewinds,
    acks: &'a AckBatcher,
    dead_letters: Option<&'a DeadLetters>,
    config: &'a RunnerConfig,
    extension: &'a LeaseExtension,
    /// What its metrics and spans are labelled with.
    labels: &'a Labels,
    /// Its handler's durations.
    process: &'a ProcessInstruments,
}

/// After a message of a lane: go on with the next, or stop the lane (its
/// partition was rewound, or is no longer ours).
enum Then {
    Next,
    Stop,
}

impl Lane<'_> {
    async fn run(&self, lane: Vec<Message>) {
        let stream = lane
            .first()
            .is_some_and(|m| m.token().mode() == Some(DeliveryMode::Stream));
        for message in lane {
            if stream {
                let key = (message.topic.clone(), message.partition);
                let mut rewound = self.rewinds.lock();
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
            let span = observe::process_span(&message, Some(self.labels));
            let then = self
                .process(&message, stream, &span)
                .instrument(span.clone())
                .await;
            if matches!(then, Then::Stop) {
                return;
            }
        }
    }

    /// Handle one message and settle it, in its `process` span.
    async fn process(&self, message: &Message, stream: bool, span: &tracing::Span) -> Then {
        let started = Instant::now();
        let handled = handle_one(
            self.consumer,
            self.handler,
            message,
            self.config,
            self.extension,
            self.labels,
        )
        .await;
        self.process
            .record(&message.topic, started, handled.is_err());
        match handled {
            // Settled by the handler (in its transaction): count it.
            Ok(()) if self.handler.settles_itself() => {
                self.counters.succeeded.fetch_add(1, Ordering::Relaxed);
                Then::Next
            }
            Ok(()) => self.ack(message, false).await,
            Err(failure) => {
                self.counters.failed.fetch_add(1, Ordering::Relaxed);
                observe::trace::failed(span, "handler");
                tracing::warn!(message = %message.position(), attempt = message.attempt, reason = %failure, permanent = failure.permanent, "handler failed");
                self.failed(message, failure, stream).await
            }
        }
    }

    /// Settle a handled (or dead-lettered) message.
    async fn ack(&self, message: &Message, dead_lettered: bool) -> Then {
        match self.acks.ack(self.consumer, message).await {
            Ok(()) => {
                if !dead_lettered {
                    self.counters.succeeded.fetch_add(1, Ordering::Relaxed);
                }
                Then::Next
            }
            Err(e) => {
                self.counters.settle_refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(message = %message.position(), error = %e, "ack refused");
                if matches!(e.kind(), ErrorKind::Fenced) {
                    Then::Stop
                } else {
                    Then::Next
                }
            }
        }
    }

    /// A handler failed: dead-letter a permanent failure at once (if the
    /// runner has a DLQ), nack anything else.
    async fn failed(&self, message: &Message, failure: HandlerError, stream: bool) -> Then {
        if failure.permanent {
            match self.dead_letters {
                Some(dead_letters) => match dead_letters
                    .send(self.consumer, message, &failure.reason)
                    .await
                {
                    Ok(dlq) => {
                        self.counters.dead_lettered.fetch_add(1, Ordering::Relaxed);
                        observe::metrics::count(DEAD_LETTERED, self.labels, &message.topic, 1);
                        tracing::info!(message = %message.position(), attempt = message.attempt, dlq = %dlq, reason = %failure, "permanent failure: dead-lettered");
                        return self.ack(message, true).await;
                    }
                    // Not in the DLQ: nack it, so it comes again.
                    Err(e) => {
                        tracing::warn!(message = %message.position(), error = %e, "permanent failure: could not dead-letter; nacked instead")
                    }
                },
                None => {
                    if !self.counters.warned_no_dlq.swap(true, Ordering::Relaxed) {
                        tracing::warn!(message = %message.position(), reason = %failure,
                            "permanent failure retried like any other: this runner has no DLQ \
                             (Runner::with_dead_letters); logged once");
                    }
                }
            }
        }
        let options = NackOptions::new().with_reason(failure.reason);
        let options = match failure.retry_after {
            Some(d) => options.with_delay(d),
            None => options,
        };
        match self.consumer.nack(message, options).await {
            Ok(NackOutcome::Redeliver) if stream => {
                // The partition restarts at this message: what was
                // polled after it comes again, so skip it now.
                self.rewinds
                    .lock()
                    .insert((message.topic.clone(), message.partition), message.offset);
                Then::Stop
            }
            Ok(NackOutcome::Redeliver) => Then::Next,
            // Dead-lettered: the position stayed; go on with the lane.
            Ok(NackOutcome::DeadLettered) => {
                self.counters.dead_lettered.fetch_add(1, Ordering::Relaxed);
                Then::Next
            }
            Err(e) => {
                self.counters.settle_refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(message = %message.position(), error = %e, "nack refused");
                if stream {
                    // Fenced or closed: the new owner redelivers.
                    Then::Stop
                } else {
                    Then::Next
                }
            }
        }
    }
}
