//! A producer that waits out a backend's outage: it retries sends that
//! fail `Unavailable` with growing, capped, jittered delays.
//!
//! Written once over the [`Producer`] trait, so it works the same on every
//! backend; it owns the retry loop only, not what a send means (that stays
//! with the wrapped producer).

use crate::backoff::Backoff;
use crate::broker::Producer;
use crate::config::RetryBackoff;
use crate::error::Result;
use crate::record::{Receipt, Record};
use async_trait::async_trait;
use std::sync::Arc;
use std::time::Duration;

/// How [`RetryingProducer`] retries a call that failed `Unavailable`.
///
/// ```
/// use conveyor::{RetryBackoff, SendRetry};
/// use std::time::Duration;
/// let retry = SendRetry::default()
///     .with_max_attempts(10)
///     .with_backoff(RetryBackoff::exponential(Duration::from_millis(50), Duration::from_secs(2)));
/// assert_eq!(retry.max_attempts, 10);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct SendRetry {
    /// Tries of one call in all, the first included (default 8; at least
    /// 1). The last try's error is returned.
    pub max_attempts: u32,
    /// The delays between tries (default 100 ms doubling to 5 s), each
    /// jittered to between half and all of it.
    pub backoff: RetryBackoff,
}

impl Default for SendRetry {
    fn default() -> Self {
        SendRetry {
            max_attempts: 8,
            backoff: RetryBackoff::exponential(Duration::from_millis(100), Duration::from_secs(5)),
        }
    }
}

impl SendRetry {
    /// Try each call at most `n` times in all (at least 1).
    pub fn with_max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n.max(1);
        self
    }
    /// Wait these delays between tries (jittered).
    pub fn with_backoff(mut self, backoff: RetryBackoff) -> Self {
        self.backoff = backoff;
        self
    }
}

/// A [`Producer`] that retries `send_batch` and `flush` while they fail
/// `Unavailable` (the only retriable kind: a server backend lost its
/// server), as [`SendRetry`] says. Every other error, and the last try's,
/// is returned as it is.
///
/// A send that failed `Unavailable` may have been stored anyway (the
/// answer was lost): give records an idempotency key and the retry is
/// stored once (contract §3); without one it may be stored twice.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> conveyor::Result<()> {
/// use conveyor::prelude::*;
/// use conveyor::{RetryingProducer, SendRetry};
///
/// let broker = conveyor::open("memory://").await?;
/// broker.create_topic("orders", TopicConfig::new(2)).await?;
/// let producer = RetryingProducer::wrap(broker.producer().await?, SendRetry::default());
/// producer
///     .send("orders", Record::new("placed").with_idempotency_key("evt-1"))
///     .await?;
/// # Ok(())
/// # }
/// ```
pub struct RetryingProducer {
    inner: Arc<dyn Producer>,
    retry: SendRetry,
}

impl RetryingProducer {
    /// Retry `inner`'s calls as `retry` says.
    pub fn new(inner: Arc<dyn Producer>, retry: SendRetry) -> Self {
        RetryingProducer { inner, retry }
    }

    /// [`RetryingProducer::new`], shared: what `Broker::producer` returns.
    pub fn wrap(inner: Arc<dyn Producer>, retry: SendRetry) -> Arc<dyn Producer> {
        Arc::new(RetryingProducer::new(inner, retry))
    }

    /// Wait before the next try of a call that failed `Unavailable`, or
    /// `false` if it has had its tries.
    async fn wait_to_retry(&self, backoff: &mut Backoff, what: &str, e: &crate::Error) -> bool {
        if !e.is_retriable() || backoff.failures().saturating_add(1) >= self.retry.max_attempts {
            return false;
        }
        let delay = backoff.next_delay();
        tracing::debug!(error = %e, attempt = backoff.failures(), delay_ms = delay.as_millis() as u64, "{what} unavailable; trying again");
        tokio::time::sleep(delay).await;
        true
    }
}

impl std::fmt::Debug for RetryingProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RetryingProducer")
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl Producer for RetryingProducer {
    /// As [`Producer::send_batch`], tried again while it fails
    /// `Unavailable`.
    ///
    /// # Errors
    /// As [`Producer::send_batch`]; `Unavailable` only once
    /// [`SendRetry::max_attempts`] tries failed.
    ///
    /// # Cancel safety
    /// As [`Producer::send_batch`]: not cancel safe (dropped between
    /// tries, nothing more is sent).
    async fn send_batch(&self, topic: &str, records: Vec<Record>) -> Result<Vec<Receipt>> {
        let mut backoff = Backoff::new(self.retry.backoff);
        loop {
            match self.inner.send_batch(topic, records.clone()).await {
                Err(e) if self.wait_to_retry(&mut backoff, "send", &e).await => {}
                result => return result,
            }
        }
    }

    /// As [`Producer::flush`], tried again while it fails `Unavailable`.
    ///
    /// # Errors
    /// As [`Producer::flush`]; `Unavailable` only once
    /// [`SendRetry::max_attempts`] tries failed.
    ///
    /// # Cancel safety
    /// Cancel safe, as [`Producer::flush`].
    async fn flush(&self) -> Result<()> {
        let mut backoff = Backoff::new(self.retry.backoff);
        loop {
            match self.inner.flush().await {
                Err(e) if self.wait_to_retry(&mut backoff, "flush", &e).await => {}
                result => return result,
            }
        }
    }
}
