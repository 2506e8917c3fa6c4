//! The wait of a server backend's `poll`, written once: attempt, and when
//! an attempt finds nothing, sleep until something may have changed (a
//! wake-up from the server, the next due redelivery, a fallback tick),
//! never past the poll's timeout.

use crate::error::Result;
use crate::record::Message;
use std::future::Future;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Run `attempt` until it returns messages or `timeout` has passed (then
/// an empty list). Between attempts, wait for `changes` (bumped when
/// records or leases may be there: a produce, a nack, a rebalance), for
/// the time `attempt` said something comes due (ms since the epoch), or
/// for `tick()` at the most (the fallback that covers a missed wake-up);
/// `check()` runs after each wait (a consumer closed meanwhile).
///
/// # Errors
/// The first error of `attempt` or `check`.
///
/// # Cancel safety
/// As cancel safe as `attempt`: dropped between attempts, nothing happens.
pub async fn poll_until<A, F>(
    mut changes: watch::Receiver<u64>,
    timeout: Duration,
    tick: impl Fn() -> Duration,
    mut attempt: A,
    check: impl Fn() -> Result<()>,
) -> Result<Vec<Message>>
where
    A: FnMut() -> F,
    F: Future<Output = Result<(Vec<Message>, Option<u64>)>>,
{
    let started = Instant::now();
    loop {
        changes.borrow_and_update();
        let (messages, due) = attempt().await?;
        if !messages.is_empty() {
            return Ok(messages);
        }
        let elapsed = started.elapsed();
        if elapsed >= timeout {
            return Ok(Vec::new());
        }
        let mut wait = (timeout - elapsed).min(tick());
        if let Some(due) = due {
            wait = wait.min(Duration::from_millis(due.saturating_sub(crate::now_ms())));
        }
        let wait = wait.max(Duration::from_millis(1));
        let _ = tokio::time::timeout(wait, changes.changed()).await;
        check()?;
    }
}

/// Run one call of a server backend with a deadline: a server that stops
/// answering (a network partition, a black-holed connection) makes the
/// call `Unavailable` (retriable) after `limit`, naming `server`, instead
/// of a call that hangs forever.
///
/// # Errors
/// `call`'s own error, or `Unavailable` at the deadline.
///
/// # Cancel safety
/// As cancel safe as `call`, which is dropped at the deadline.
pub async fn within<T>(
    limit: Duration,
    server: &str,
    call: impl Future<Output = Result<T>>,
) -> Result<T> {
    match tokio::time::timeout(limit, call).await {
        Ok(result) => result,
        Err(_) => Err(crate::Error::new(
            crate::ErrorKind::Unavailable,
            format!("{server} did not answer within {limit:?}"),
        )),
    }
}
