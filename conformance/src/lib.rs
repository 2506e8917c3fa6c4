//! # conveyor-conformance
//!
//! The delivery contract as executable cases. Each case is a plain
//! `pub async fn case(backend: &dyn Backend) -> Result<()>` in a module
//! named after the part of the contract it checks ([`topics`], [`produce`],
//! [`delayed`], [`records`], [`stream`], [`queue`], [`dlq`], [`retention`],
//! [`errors`], [`persistence`], [`idempotency`], [`lag`], [`model`],
//! [`admin`]). A
//! backend's `tests/conformance.rs` runs them all with one macro call, which
//! expands to one `#[tokio::test]` per case, named `section::case`:
//!
//! ```ignore
//! struct MyBackend { /* a temp dir, a key prefix, ... */ }
//!
//! #[async_trait::async_trait]
//! impl conveyor_conformance::Backend for MyBackend {
//!     async fn open(&self, options: BrokerOptions) -> Result<Arc<dyn Broker>> { ... }
//!     async fn cleanup(&self) { ... }
//! }
//!
//! conveyor_conformance::suite!(|| async { MyBackend::new() });
//! ```
//!
//! The argument of [`suite!`] is an expression `factory` such that
//! `factory().await` is a value implementing [`Backend`] (typically a
//! closure returning an `async` block). It is called once per case, so every
//! case gets a fresh backend; [`Backend::cleanup`] runs at the end of every
//! case, passed or failed. Cases also use unique topic and group names, so
//! backends that share a server stay isolated. The calling crate needs
//! `tokio` (features `macros`, `rt-multi-thread`) as a dev-dependency; call
//! `suite!` once per test file.
//!
//! **Citations.** Every case's doc comment starts with the sections it
//! checks, as `§N` (e.g. `§4b: "..."`), and every module doc says which
//! sections it covers. `§N` is a section of `docs/semantics.md`, the
//! contract in users' words, whose numbering (§1 topics and partitions, §2
//! records and messages, §3 producing, §4 consumer groups with §4a stream
//! mode and §4b queue mode, §5 dead letters, §6 retention, §7 failure, bad
//! input and persistence, §8 idempotent consumers, §9 observability) is
//! the one the project's docs and code comments cite; quoted text is the
//! rule a case checks.
//!
//! [`faulty`] is not a section: it holds [`faulty::FaultyStorage`], a
//! storage decorator that fails chosen calls, for testing the engine's
//! error paths (`tests/faults.rs`).
//!
//! [`kill`] is not a section either: it is the SIGKILL harness every
//! embedded backend runs from its own `tests/kill.rs` with
//! [`kill_suite!`] (a child process producing and committing under
//! `Durability::Always`, killed at random; every printed acknowledgement
//! must be found after reopen).
//!
//! Two more harnesses serve the server backends (PostgreSQL, Redis), whose
//! groups span processes (§7): [`members`] runs real member processes of
//! one group against a shared namespace and SIGKILLs one mid-work
//! ([`members_suite!`]: every record settles, no two live owners, the
//! survivors take over within the session timeout), and [`proxy`] holds
//! [`proxy::FaultProxy`], a TCP proxy between a backend and its server that
//! resets, black-holes or refuses connections on demand.
//!
//! [`tls`] makes throw-away certificates (a CA, a server and a client
//! certificate, another CA) for the server backends' TLS tests.
//!
//! The [`model`] cases are randomized: their seed is printed on start and
//! on failure, and `CONVEYOR_SEED=<n>` replays the same random choices.
//!
//! Cases skip only what a backend's [`Capabilities`](conveyor_core::Capabilities)
//! say it lacks (`persistent`, `embedded`), and say so on stderr. Time-based
//! cases configure short timeouts (tens of milliseconds) and wait on
//! conditions with [`eventually`], never on bare sleeps where an event can
//! be awaited. Every case runs under a 60 s deadline.
#![deny(missing_docs)]
// The suite is test code: a failed unwrap is a failed case, with its line.
#![allow(clippy::unwrap_used)]

pub mod admin;
pub mod delayed;
pub mod dlq;
pub mod errors;
pub mod faulty;
pub mod group_settings;
pub mod idempotency;
pub mod kill;
pub mod lag;
pub mod members;
pub mod model;
pub mod persistence;
pub mod process;
pub mod produce;
pub mod proxy;
pub mod queue;
pub mod records;
pub mod retention;
pub mod stream;
pub mod tls;
pub mod topics;

use async_trait::async_trait;
use conveyor_core::{
    Broker, BrokerOptions, Consumer, Error, ErrorKind, Message, Producer, Result, TopicConfig,
};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A store under test: something that can open (and, if persistent,
/// reopen) one isolated broker.
#[async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Open the store with these options. After the broker returned earlier
    /// was closed, opening again reopens the same store (same directory,
    /// key prefix or schema), which is how persistence is tested.
    async fn open(&self, options: BrokerOptions) -> Result<Arc<dyn Broker>>;

    /// Remove everything this backend instance created (files, keys,
    /// schemas). Called at the end of each case.
    async fn cleanup(&self) {}
}

/// The generous deadline used when waiting for something that must happen.
pub const WAIT: Duration = Duration::from_secs(5);

/// Longest a single case may run before it fails as hung.
pub const CASE_DEADLINE: Duration = Duration::from_secs(60);

/// Wait until `check` yields `Some`, polling every few milliseconds, and
/// return its value; panic with `what` if `deadline` passes first.
pub async fn eventually<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if start.elapsed() > deadline {
            panic!("timed out after {deadline:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Drive `future` until it has been pending `pending` times (yielding to
/// the runtime after each), then drop it: `None` if it was dropped,
/// `Some(output)` if it finished first. Cuts a future at its `pending`th
/// await point that waits, whatever the timer resolution (a `timeout`
/// under a millisecond is rounded up to the next millisecond tick).
pub async fn cut_after<F: Future>(future: F, pending: usize) -> Option<F::Output> {
    let mut future = std::pin::pin!(future);
    for _ in 0..pending.max(1) {
        if let std::task::Poll::Ready(out) = futures::poll!(future.as_mut()) {
            return Some(out);
        }
        tokio::task::yield_now().await;
    }
    None
}

/// Assert that `result` failed with `kind`; returns the error.
#[track_caller]
pub fn expect_kind<T>(result: Result<T>, kind: ErrorKind) -> Error {
    match result {
        Ok(_) => panic!(
            "expected ErrorKind::{kind:?}, got Ok(<{}>)",
            std::any::type_name::<T>()
        ),
        Err(e) => {
            assert_eq!(e.kind(), kind, "expected ErrorKind::{kind:?}, got `{e}`");
            e
        }
    }
}

/// Print that a case is skipped and why (to stderr, as the suite promises).
pub fn skip(case: &str, why: &str) {
    eprintln!("conveyor-conformance: SKIP {case}: {why}");
}

static UNIQUE: AtomicU64 = AtomicU64::new(0);

/// Whether at least `delay` passed since `at`, on the store's clock:
/// deadlines (a nack delay, a lease, a delivery time) are kept in whole
/// milliseconds (§2), so a call late in one millisecond may count from
/// its start, up to 1 ms early by the test's finer clock.
pub fn waited(at: std::time::Instant, delay: Duration) -> bool {
    at.elapsed() + Duration::from_millis(1) >= delay
}

/// A name unique to this process and call: `{base}-{pid}-{n}-{random}`.
pub fn unique(base: &str) -> String {
    let n = UNIQUE.fetch_add(1, Ordering::Relaxed);
    let r: u32 = rand::random();
    format!("{base}-{}-{n}-{r:08x}", std::process::id())
}

/// One case's broker and helpers.
pub struct Ctx<'a> {
    /// The backend under test.
    pub backend: &'a dyn Backend,
    /// The open broker.
    pub broker: Arc<dyn Broker>,
}

impl<'a> Ctx<'a> {
    /// Open the backend with default options.
    pub async fn open(backend: &'a dyn Backend) -> Result<Ctx<'a>> {
        Self::open_with(backend, BrokerOptions::default()).await
    }

    /// Open the backend with these options.
    pub async fn open_with(backend: &'a dyn Backend, options: BrokerOptions) -> Result<Ctx<'a>> {
        let broker = backend.open(options).await?;
        Ok(Ctx { backend, broker })
    }

    /// Close the broker and open the store again (same data if persistent).
    pub async fn reopen(&mut self) -> Result<()> {
        self.broker.close().await?;
        self.broker = self.backend.open(BrokerOptions::default()).await?;
        Ok(())
    }

    /// Create a topic with a unique name from `base` and this config.
    pub async fn topic_with(&self, base: &str, config: TopicConfig) -> Result<String> {
        let name = unique(base);
        self.broker.create_topic(&name, config).await?;
        Ok(name)
    }

    /// Create a topic with a unique name from `base` and `partitions`.
    pub async fn topic(&self, base: &str, partitions: u32) -> Result<String> {
        self.topic_with(base, TopicConfig::new(partitions)).await
    }

    /// A producer.
    pub async fn producer(&self) -> Result<Arc<dyn Producer>> {
        self.broker.producer().await
    }

    /// Log start and log end of a partition.
    pub async fn bounds(&self, topic: &str, partition: u32) -> Result<(u64, u64)> {
        let d = self.broker.describe_topic(topic).await?;
        let p = d
            .partitions
            .iter()
            .find(|p| p.partition == partition)
            .unwrap_or_else(|| panic!("describe_topic({topic}) lacks partition {partition}"));
        Ok((p.log_start, p.log_end))
    }

    /// Log end of every partition of a topic.
    pub async fn log_ends(&self, topic: &str) -> Result<Vec<u64>> {
        let d = self.broker.describe_topic(topic).await?;
        Ok(d.partitions.iter().map(|p| p.log_end).collect())
    }

    /// All records of a partition from its log start, via `fetch`.
    pub async fn read_all(&self, topic: &str, partition: u32) -> Result<Vec<Message>> {
        let mut out: Vec<Message> = Vec::new();
        let mut from = 0;
        loop {
            let batch = self.broker.fetch(topic, partition, from, 1000).await?;
            let Some(last) = batch.last() else {
                return Ok(out);
            };
            from = last.offset + 1;
            out.extend(batch);
        }
    }
}

/// Poll `consumer` until it has returned `n` messages in total or
/// `deadline` passes; returns what it got (possibly fewer).
pub async fn poll_n(consumer: &dyn Consumer, n: usize, deadline: Duration) -> Result<Vec<Message>> {
    let start = Instant::now();
    let mut out = Vec::new();
    while out.len() < n {
        let left = deadline.saturating_sub(start.elapsed());
        if left.is_zero() {
            break;
        }
        let got = consumer
            .poll(n - out.len(), left.min(Duration::from_millis(200)))
            .await?;
        out.extend(got);
    }
    Ok(out)
}

/// Poll `consumer` until exactly `n` messages came (panics on fewer within
/// [`WAIT`]), then check nothing more arrives for `quiet`.
pub async fn poll_exactly(
    consumer: &dyn Consumer,
    n: usize,
    quiet: Duration,
) -> Result<Vec<Message>> {
    let got = poll_n(consumer, n, WAIT).await?;
    assert_eq!(got.len(), n, "expected {n} messages, got {}", got.len());
    if !quiet.is_zero() {
        let more = consumer.poll(16, quiet).await?;
        assert!(
            more.is_empty(),
            "expected no more messages, got {:?}",
            more.iter().map(Message::position).collect::<Vec<_>>()
        );
    }
    Ok(got)
}

/// Nack options with this delay (the group's backoff if `None`).
pub fn nack_options(delay: Option<std::time::Duration>) -> conveyor_core::NackOptions {
    let mut options = conveyor_core::NackOptions::new();
    options.delay = delay;
    options
}

/// Values of messages as UTF-8 strings (lossy), for readable asserts.
pub fn values(messages: &[Message]) -> Vec<String> {
    messages
        .iter()
        .map(|m| String::from_utf8_lossy(&m.value).into_owned())
        .collect()
}

/// A [`Backend`] over an `open` function: while the broker it opened is
/// open, `open` returns that same broker (an embedded store is locked by
/// it); once the broker was closed, `open` is called again, which for a
/// persistent store reopens the same data. `cleanup` closes it. `keep`
/// holds whatever must live as long as the backend (a temporary directory).
pub struct Reopening<F> {
    open: F,
    current: std::sync::Mutex<Option<Arc<dyn Broker>>>,
    _keep: Box<dyn std::any::Any + Send + Sync>,
}

impl<F, Fut> Reopening<F>
where
    F: Fn(BrokerOptions) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Arc<dyn Broker>>> + Send,
{
    /// A backend calling `open` for each (re)open, keeping `keep` alive.
    pub fn new(open: F, keep: impl std::any::Any + Send + Sync) -> Self {
        Reopening {
            open,
            current: std::sync::Mutex::new(None),
            _keep: Box::new(keep),
        }
    }
}

#[async_trait]
impl<F, Fut> Backend for Reopening<F>
where
    F: Fn(BrokerOptions) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Arc<dyn Broker>>> + Send,
{
    async fn open(&self, options: BrokerOptions) -> Result<Arc<dyn Broker>> {
        let existing = self.current.lock().expect("lock").clone();
        if let Some(broker) = existing {
            match broker.list_topics().await {
                Err(e) if e.kind() == conveyor_core::ErrorKind::Closed => {}
                _ => return Ok(broker),
            }
        }
        let broker = (self.open)(options).await?;
        *self.current.lock().expect("lock") = Some(broker.clone());
        Ok(broker)
    }

    async fn cleanup(&self) {
        let broker = self.current.lock().expect("lock").take();
        if let Some(broker) = broker {
            let _ = broker.close().await;
        }
    }
}

#[doc(hidden)]
pub mod __private {
    pub use futures::FutureExt;
    use std::any::Any;

    /// A case, boxed so one signature fits every case.
    pub type Case = for<'a> fn(
        &'a dyn crate::Backend,
    ) -> futures::future::BoxFuture<'a, conveyor_core::Result<()>>;

    /// Run one case: fresh backend, the case under a deadline, cleanup
    /// whatever happened, then report.
    pub async fn run<B: crate::Backend>(backend: B, name: &str, case: Case) {
        let outcome = std::panic::AssertUnwindSafe(tokio::time::timeout(
            crate::CASE_DEADLINE,
            case(&backend),
        ))
        .catch_unwind()
        .await;
        crate::Backend::cleanup(&backend).await;
        drop(backend);
        match outcome {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => panic!("case {name} failed: {e}"),
            Ok(Err(_)) => panic!("case {name} hung: over {:?}", crate::CASE_DEADLINE),
            Err(p) => std::panic::resume_unwind(p as Box<dyn Any + Send>),
        }
    }
}

/// Expand to one `#[tokio::test]` per conformance case, each running
/// against a fresh backend from `factory` (an expression such that
/// `factory().await` implements [`Backend`], e.g.
/// `|| async { MemoryBackend::new() }`). Tests are named `section::case`.
/// Call it once per test file; the file's crate needs `tokio` with the
/// `macros` and `rt-multi-thread` features.
#[macro_export]
macro_rules! suite {
    ($factory:expr $(,)?) => {
        #[allow(dead_code)]
        async fn __conveyor_conformance_backend() -> impl $crate::Backend {
            ($factory)().await
        }
        $crate::__for_each_case!($crate::__suite_section);
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __suite_section {
    ($section:ident: $($case:ident),* $(,)?) => {
        mod $section {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    $crate::__private::run(
                        super::__conveyor_conformance_backend().await,
                        concat!(stringify!($section), "::", stringify!($case)),
                        |b| $crate::__private::FutureExt::boxed($crate::$section::$case(b)),
                    )
                    .await;
                }
            )*
        }
    };
}

/// The list of every case, by section. One place to add a case.
#[doc(hidden)]
#[macro_export]
macro_rules! __for_each_case {
    ($m:path) => {
        $m!(topics:
            create_and_describe,
            create_same_config_is_noop,
            create_other_config_is_topic_exists,
            invalid_topic_names,
            partition_count_bounds,
            add_partitions_grows_never_shrinks,
            unknown_topic_is_topic_not_found,
            list_topics_sorted,
            delete_topic,
            auto_create_when_enabled,
        );
        $m!(records:
            round_trip_byte_exact,
            empty_value_and_empty_key,
            one_mib_record_round_trip,
            duplicate_headers_keep_order,
            timestamps_set_by_broker,
        );
        $m!(produce:
            dense_offsets,
            receipt_means_visible,
            keyed_partitioning_matches_kafka,
            same_key_same_partition,
            round_robin_without_key,
            explicit_partition_wins,
            batch_receipts_in_input_order,
            batch_with_bad_record_writes_nothing,
            concurrent_batches_stay_contiguous,
            order_under_concurrent_producers,
            no_late_lower_offsets,
            durability_settings,
            producer_closed_mid_burst,
        );
        $m!(idempotency:
            duplicate_send_returns_original_receipt,
            concurrent_duplicates_append_once,
            duplicate_within_batch_appends_once,
            keys_are_per_topic,
            appends_again_after_dedup_window,
            store_first_seen_atomic,
            store_refuses_bad_keys_and_ttls,
            store_ttl_expires,
            store_forget,
        );
        $m!(delayed:
            queue_mode_waits_for_delivery_time,
            stream_mode_reads_without_waiting,
            delivery_time_survives_reopen,
        );
        $m!(stream:
            fan_out_across_groups,
            start_earliest_vs_latest,
            commit_and_resume,
            redelivered_after_drop_without_commit,
            commit_is_cumulative,
            seek_beginning_end_offset,
            seek_timestamp,
            rebalance_on_join,
            rebalance_on_leave,
            rebalance_on_session_timeout,
            balance_and_stickiness,
            partition_owned_by_one_member,
            stale_commit_is_fenced,
            nack_rewinds_and_raises_attempt,
            nack_waits_for_backoff,
            stale_message_after_regain_is_fenced,
            added_partitions_are_consumed,
            concurrent_groups_over_many_topics,
            close_many_members_at_once,
            dropped_polls_skip_nothing,
            ack_batch_commits_per_partition,
        );
        $m!(queue:
            competing_consumers_each_once,
            parallel_beyond_partitions,
            offered_in_offset_order,
            no_second_lease_while_held,
            ack_settles_forever,
            nack_with_delay,
            lease_expiry_redelivers,
            extend_prevents_redelivery,
            ack_after_expiry_is_lease_expired,
            attempt_counts_survive_members,
            close_releases_leases,
            close_many_members_at_once,
            dropped_polls_leave_no_lease,
            ack_batch_settles_across_partitions,
            ack_batch_reports_each_failure,
        );
        $m!(dlq:
            nack_path_dead_letters,
            lease_expiry_path_dead_letters,
            stream_nack_dead_letters,
            custom_dlq_topic,
            redrive_delivers_again,
            groups_independent,
            max_size_record_dead_letters_and_redrives,
            lease_expiry_dead_letters_without_polling,
            redrive_reaches_only_the_failing_group,
        );
        $m!(group_settings:
            differing_member_is_refused_and_changes_nothing,
            member_using_existing_settings_gets_the_groups,
            inspection_never_changes_settings,
            alter_group_changes_settings_and_members_follow,
            alter_group_refuses_bad_changes,
        );
        $m!(retention:
            by_age,
            by_bytes,
            group_before_log_start_continues,
            seek_and_fetch_below_log_start,
        );
        $m!(errors:
            oversize_is_message_too_large,
            partition_out_of_range,
            invalid_group_input,
            unknown_group_is_group_not_found,
            group_mode_mismatch,
            closed_broker_returns_closed,
            extreme_values_do_not_panic,
            settling_is_bound_to_the_delivery,
            far_delivery_time_is_refused,
            bad_record_fails_only_its_own_send,
        );
        $m!(lag:
            describe_topic_bounds,
            stream_group_lag,
            queue_group_lag,
            list_groups_sorted,
            fetch_without_group,
            describe_group_shows_members,
        );
        $m!(persistence:
            reopen_keeps_records,
            reopen_keeps_committed_offsets,
            reopen_keeps_attempts_and_dlq,
            reopen_keeps_idempotency_keys,
            reopen_after_retention_never_reuses_offsets,
            reopen_keeps_out_of_order_acks,
        );
        $m!(model:
            model_check_stream,
            model_check_queue,
        );
        $m!(admin:
            delete_group_forgets_everything,
            delete_group_refuses_live_members,
            ping_until_closed,
            redrive_refuses_a_topic_that_is_not_a_dlq,
            purge_discards_every_waiting_dead_letter,
            discard_one_dead_letter,
        );
    };
}
