//! A runner handler that works in a transaction of the application's
//! database and settles its message there: [`Transactional`]. It begins
//! the transaction, gives it to the application's handler, settles the
//! message in it ([`PgBroker::ack_in`]) and commits: the handler's writes
//! and the settle commit together or not at all. Retries, dead letters and
//! lease extension stay the runner's (`conveyor_core::runner`); this type
//! only says, through [`Handler::settles_itself`], that the runner must
//! not ack again.

use crate::PgBroker;
use async_trait::async_trait;
use conveyor_core::runner::{Handler, HandlerError};
use conveyor_core::Message;
use sqlx::PgPool;
use std::future::Future;

/// A transaction of the application's database, as sqlx's
/// `PgPool::begin` gives it.
pub type PgTransaction = sqlx::Transaction<'static, sqlx::Postgres>;

/// Handles one message inside a transaction: does its writes in `tx` and
/// gives `tx` back to be settled and committed, or fails (the transaction
/// rolls back and the message is redelivered, as for any handler).
/// Closures `Fn(Message, PgTransaction) -> impl Future<Output =
/// Result<PgTransaction, HandlerError>>` are such handlers.
#[async_trait]
pub trait TxHandler: Send + Sync + 'static {
    /// Handle `message` in `tx`.
    ///
    /// # Errors
    /// A [`HandlerError`]: the transaction rolls back (nothing the
    /// handler wrote stays) and the runner nacks the message.
    ///
    /// # Cancel safety
    /// Dropped (the runner's handler timeout), the transaction is dropped
    /// unfinished, which rolls it back; the message comes again.
    async fn handle(
        &self,
        message: Message,
        tx: PgTransaction,
    ) -> Result<PgTransaction, HandlerError>;
}

#[async_trait]
impl<F, Fut> TxHandler for F
where
    F: Fn(Message, PgTransaction) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<PgTransaction, HandlerError>> + Send + 'static,
{
    async fn handle(
        &self,
        message: Message,
        tx: PgTransaction,
    ) -> Result<PgTransaction, HandlerError> {
        (self)(message, tx).await
    }
}

/// A [`Handler`] for `conveyor_core::runner::Runner` that runs a
/// [`TxHandler`] in a transaction of `pool` (the application's database:
/// the one the broker's schema is in) and settles the message in that
/// transaction before committing it. A message whose settle finds it
/// already settled by a committed transaction (a redelivery after a
/// commit whose answer was lost) is rolled back and counted as handled:
/// its effects are there once.
///
/// Do not wrap it in `conveyor_core::runner::Idempotent`: the wrapper
/// does not settle itself, so the runner would ack again what this
/// handler settled (refused in queue mode, counted as `settle_refused`).
/// The transaction already makes the writes happen once; for an event id
/// of your own, call [`PgBroker::first_seen_in`] in the handler's
/// transaction.
pub struct Transactional<H> {
    broker: PgBroker,
    pool: PgPool,
    handler: H,
}

impl<H: TxHandler> Transactional<H> {
    /// Run `handler` in transactions of `pool`, settling through `broker`
    /// (the broker the runner's consumer came from, on the same database).
    pub fn new(broker: PgBroker, pool: PgPool, handler: H) -> Self {
        Transactional {
            broker,
            pool,
            handler,
        }
    }
}

#[async_trait]
impl<H: TxHandler> Handler for Transactional<H> {
    async fn handle(&self, message: Message) -> Result<(), HandlerError> {
        let tx = self.pool.begin().await?;
        let mut tx = self.handler.handle(message.clone(), tx).await?;
        match self.broker.ack_in(&mut *tx, &message).await {
            Ok(true) => {
                tx.commit().await?;
                Ok(())
            }
            Ok(false) => {
                tx.rollback().await?;
                tracing::debug!(message = %message.position(), "already settled by a committed transaction: rolled back");
                Ok(())
            }
            Err(e) => {
                let _ = tx.rollback().await;
                Err(HandlerError::new(format!(
                    "settle in the transaction refused: {e}"
                )))
            }
        }
    }

    fn settles_itself(&self) -> bool {
        true
    }
}
