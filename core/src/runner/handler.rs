//! What a handler is ([`Handler`]) and how it says it failed
//! ([`HandlerError`]): the reason, when to retry, or never. It knows
//! nothing of consumers or settling.

use crate::record::Message;
use async_trait::async_trait;
use std::future::Future;
use std::time::Duration;

/// Why a handler failed; the text goes to the DLQ header
/// `conveyor.dlq.error` if the message is dead-lettered.
///
/// Any error converts into it, so `?` works inside a handler: every
/// `std::error::Error + Send + Sync`, `anyhow::Error`, `eyre::Report`,
/// `Box<dyn Error + Send + Sync>`, and a `String` or `&str`. The text
/// keeps the whole cause chain (`error: its source: its source`):
///
/// ```
/// use conveyor::runner::HandlerError;
/// use conveyor::Message;
///
/// async fn handle(m: Message) -> Result<(), HandlerError> {
///     let event: serde_json::Value = serde_json::from_slice(&m.value)
///         // Bad input stays bad: straight to the DLQ, no retries.
///         .map_err(HandlerError::permanent)?;
///     if event["to"].is_null() {
///         return Err(HandlerError::permanent("no recipient"));
///     }
///     // ... send it; a failure here is retried (`?` on any error).
///     # let send = || Ok::<(), std::io::Error>(());
///     send()?;
///     Ok(())
/// }
/// ```
///
/// A failure is retried after the group's backoff (or
/// [`retry_after`](HandlerError::retry_after)) until the group's
/// `max_deliveries`, then dead-lettered. A
/// [`permanent`](HandlerError::permanent) one (a message that can never
/// succeed: it does not parse, it names nothing that exists) is never
/// retried: the runner dead-letters it at once.
///
/// (It is not itself a `std::error::Error`: that is what lets every
/// error convert into it.)
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct HandlerError {
    /// The reason.
    pub reason: String,
    /// Redeliver after this delay instead of the group's backoff.
    pub retry_after: Option<Duration>,
    /// Never retry: dead-letter the message at once.
    pub permanent: bool,
}

impl HandlerError {
    /// A failure with a reason; redelivered after the group's backoff.
    pub fn new(reason: impl Into<String>) -> Self {
        HandlerError {
            reason: reason.into(),
            retry_after: None,
            permanent: false,
        }
    }

    /// A failure that no retry can mend: the runner dead-letters the
    /// message at once, with this reason (and its causes) in the
    /// `conveyor.dlq.error` header. Takes whatever `?` takes.
    ///
    /// ```
    /// use conveyor::runner::HandlerError;
    /// let e = HandlerError::permanent("unknown template `welcome-v0`");
    /// assert!(e.permanent);
    /// let parse = "x".parse::<u32>().map_err(HandlerError::permanent).unwrap_err();
    /// assert_eq!(parse.reason, "invalid digit found in string");
    /// ```
    pub fn permanent(error: impl Into<HandlerError>) -> Self {
        let mut e = error.into();
        e.permanent = true;
        e.retry_after = None;
        e
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

/// Everything that converts into `Box<dyn Error + Send + Sync>`: every
/// `std::error::Error + Send + Sync + 'static`, `anyhow::Error` and
/// `eyre::Report` (each converts into that box keeping its chain),
/// `String` and `&str`.
impl<E: Into<Box<dyn std::error::Error + Send + Sync + 'static>>> From<E> for HandlerError {
    /// The error and its sources, `: `-separated.
    fn from(e: E) -> Self {
        let e: Box<dyn std::error::Error + Send + Sync + 'static> = e.into();
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
    /// `conveyor.dlq.error`) and, optionally, when to retry. A panic
    /// counts as a failure with the reason "handler panicked: ..." (the
    /// runner goes on).
    ///
    /// # Cancel safety
    /// The runner drops a running handler only when it passes
    /// [`RunnerConfig::handler_timeout`](super::RunnerConfig::handler_timeout)
    /// (the message is then nacked with the reason "handler timed out
    /// after ...") or when the runner's own future is dropped; at shutdown
    /// it waits for in-flight handlers to finish and settles their
    /// messages. A dropped handler's message comes again
    /// ([`Idempotent`](super::Idempotent) forgets its event id).
    async fn handle(&self, message: Message) -> Result<(), HandlerError>;

    /// Whether this handler settles each message itself when it succeeds
    /// (a transactional handler acks or commits in the same database
    /// transaction as its effects): the runner then does not ack it after
    /// a success, and such a handler must have settled every message it
    /// returns `Ok` for. A failure is nacked as for any handler. Default
    /// `false`, also for wrappers such as [`Idempotent`](super::Idempotent)
    /// (a duplicate it skips is acked by the runner).
    fn settles_itself(&self) -> bool {
        false
    }
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
