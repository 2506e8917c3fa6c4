//! The runner's side of a backend outage: how long to wait between failed
//! polls (core's shared backoff) and the two log lines of an outage. It
//! does not poll.

use super::duration_text;
use crate::backoff::Backoff;
use crate::config::RetryBackoff;
use crate::error::Error;
use std::time::{Duration, Instant};

/// The runner's view of a backend outage (polls failing `Unavailable`):
/// the delays between polls, and one log line when it starts and one when
/// it ends.
pub(super) struct Outage {
    backoff: Backoff,
    since: Option<Instant>,
}

impl Outage {
    pub(super) fn new(policy: RetryBackoff) -> Self {
        Outage {
            backoff: Backoff::new(policy),
            since: None,
        }
    }

    /// A poll failed with `error` (retriable): how long to wait.
    pub(super) fn failed(&mut self, error: &Error) -> Duration {
        let delay = self.backoff.next_delay();
        if self.since.is_none() {
            self.since = Some(Instant::now());
            tracing::warn!(%error, "consumer unavailable: polling again with growing delays until it is back (logged once, and again when it ends)");
        } else {
            tracing::debug!(%error, failures = self.backoff.failures(), delay = %duration_text(delay), "consumer still unavailable");
        }
        delay
    }

    /// A poll succeeded.
    pub(super) fn over(&mut self) {
        if let Some(since) = self.since.take() {
            tracing::info!(failed_polls = self.backoff.failures(), after = %duration_text(since.elapsed()), "consumer available again");
            self.backoff.reset();
        }
    }
}
