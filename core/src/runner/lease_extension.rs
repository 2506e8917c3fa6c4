//! How far a runner extends the leases of running handlers (queue mode):
//! the group's visibility timeout as the group stores it, read from the
//! consumer ([`Consumer::group_config`]) when the runner starts and again
//! every [`REFRESH`] while it runs, so the settings are given once (to the
//! group) and an `alter_group` reaches running runners. An explicit
//! [`RunnerConfig::visibility_timeout`] overrides it. This module does not
//! extend anything itself.
//!
//! [`RunnerConfig::visibility_timeout`]: super::RunnerConfig::visibility_timeout

use crate::broker::Consumer;
use crate::config::GroupConfig;
use crate::error::ErrorKind;
use parking_lot::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

fn millis(d: Duration) -> u64 {
    d.as_millis().min(u64::MAX as u128) as u64
}

/// How often a runner reads its group's settings again.
pub(super) const REFRESH: Duration = Duration::from_secs(10);

/// The lease extension of one runner.
pub(super) struct LeaseExtension {
    /// The current extension, ms.
    ms: AtomicU64,
    /// Set by the runner's config: never read from the group.
    fixed: bool,
    /// When the group's settings were last read.
    read_at: Mutex<Instant>,
}

impl LeaseExtension {
    /// `fixed` if the runner's config sets it, else the group's visibility
    /// timeout (the default group's, 30 s, if the consumer cannot say).
    pub(super) async fn new(consumer: &dyn Consumer, fixed: Option<Duration>) -> Self {
        let ms = match fixed {
            Some(d) => d,
            None => group_timeout(consumer)
                .await
                .unwrap_or(GroupConfig::default().visibility_timeout),
        };
        LeaseExtension {
            ms: AtomicU64::new(millis(ms)),
            fixed: fixed.is_some(),
            read_at: Mutex::new(Instant::now()),
        }
    }

    /// The extension now.
    pub(super) fn current(&self) -> Duration {
        Duration::from_millis(self.ms.load(Ordering::Relaxed))
    }

    /// Read the group's settings again if [`REFRESH`] has passed (one call
    /// to the consumer; a failure keeps the extension as it was).
    pub(super) async fn refresh(&self, consumer: &dyn Consumer) {
        if self.fixed {
            return;
        }
        {
            let mut at = self.read_at.lock();
            if at.elapsed() < REFRESH {
                return;
            }
            *at = Instant::now();
        }
        if let Some(d) = group_timeout(consumer).await {
            let before = self.ms.swap(millis(d), Ordering::Relaxed);
            if before != millis(d) {
                tracing::info!(visibility_timeout = ?d, "runner follows the group's new visibility timeout");
            }
        }
    }
}

/// The group's visibility timeout as the consumer reports it, `None` if
/// it cannot (logged).
async fn group_timeout(consumer: &dyn Consumer) -> Option<Duration> {
    match consumer.group_config().await {
        Ok(config) => Some(config.visibility_timeout),
        Err(e) if e.kind() == ErrorKind::Unsupported => None,
        Err(e) => {
            tracing::warn!(error = %e, "runner could not read its group's settings; lease extension unchanged");
            None
        }
    }
}
