//! Waiting out an outage: growing, capped, jittered delays between
//! retries of a call that failed `Unavailable`.
//!
//! Written once for the runner's polls and the producer's sends
//! ([`crate::RetryingProducer`]); it owns only the delays and the
//! bookkeeping of one outage, not what is retried or what is logged.

use crate::config::RetryBackoff;
use rand::Rng;
use std::time::Duration;

/// The delays of one run of retries: [`RetryBackoff::delay_after`] for
/// the failures so far, jittered to between half and all of it (so
/// clients that failed together do not retry together).
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    policy: RetryBackoff,
    failures: u32,
}

impl Backoff {
    pub(crate) fn new(policy: RetryBackoff) -> Self {
        Backoff {
            policy,
            failures: 0,
        }
    }

    /// One more failure; how long to wait before the next try.
    pub(crate) fn next_delay(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        jitter(self.policy.delay_after(self.failures))
    }

    /// Failures since the last [`Backoff::reset`].
    pub(crate) fn failures(&self) -> u32 {
        self.failures
    }

    /// A try succeeded: the next failure starts from the initial delay.
    pub(crate) fn reset(&mut self) {
        self.failures = 0;
    }
}

/// Between half of `d` and `d`, uniformly ("equal jitter").
fn jitter(d: Duration) -> Duration {
    let half = d / 2;
    let spread = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
    if spread == 0 {
        return d;
    }
    half + Duration::from_nanos(rand::thread_rng().gen_range(0..=spread))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_to_the_cap_with_jitter_and_restart_after_a_success() {
        let policy = RetryBackoff::exponential(Duration::from_millis(100), Duration::from_secs(5));
        let mut backoff = Backoff::new(policy);
        for failure in 1..=20u32 {
            let full = policy.delay_after(failure);
            let d = backoff.next_delay();
            assert!(
                d >= full / 2 && d <= full,
                "failure {failure}: {d:?} of {full:?}"
            );
            assert!(d <= Duration::from_secs(5), "capped: {d:?}");
        }
        assert_eq!(backoff.failures(), 20);
        // 20 delays, most at the cap: at least ~10 × 2.5 s waited, where
        // a fixed 100 ms would have waited 2 s.
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(100));
        assert_eq!(backoff.failures(), 1);
    }

    #[test]
    fn jitter_spreads_delays() {
        let d = Duration::from_secs(1);
        let seen: std::collections::HashSet<Duration> = (0..50).map(|_| jitter(d)).collect();
        assert!(seen.len() > 1, "all 50 the same: {seen:?}");
        assert_eq!(jitter(Duration::ZERO), Duration::ZERO);
    }
}
