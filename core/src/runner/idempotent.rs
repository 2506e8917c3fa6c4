//! [`Idempotent`]: a handler that runs at most once per event id, through
//! an [`IdempotencyStore`]; an id is kept only once the handler succeeded.
//! It knows nothing of the runner that calls it.

use super::{Handler, HandlerError};
use crate::broker::IdempotencyStore;
use crate::error::Result;
use crate::record::Message;
use async_trait::async_trait;
use futures::future::FutureExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

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
/// [`RunnerConfig::handler_timeout`](super::RunnerConfig::handler_timeout),
/// and a handler future dropped for any other reason (a runner stopped by
/// dropping its future). While the
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
