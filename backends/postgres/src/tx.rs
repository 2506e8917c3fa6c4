//! Transactions that end on the server when they are abandoned.
//!
//! sqlx's `Transaction`, dropped unfinished (a cancelled future, a call cut
//! at its deadline), queues a `ROLLBACK` that runs when its connection is
//! next used; seen under load, a connection could come back to the pool
//! still inside the abandoned transaction, whose writes a later user then
//! committed (a dropped poll's leases, for one). A [`Tx`] dropped
//! unfinished instead closes its connection: the server aborts the
//! transaction at once and releases its locks, and the pool opens a new
//! connection when it needs one.

use sqlx::pool::PoolConnection;
use sqlx::{Executor, PgConnection, PgPool, Postgres};
use std::ops::{Deref, DerefMut};

/// An open transaction on a pooled connection (see the module docs).
pub(crate) struct Tx {
    conn: Option<PoolConnection<Postgres>>,
}

impl Tx {
    /// Take a connection and `BEGIN`.
    pub(crate) async fn begin(pool: &PgPool) -> Result<Tx, sqlx::Error> {
        let mut tx = Tx {
            conn: Some(pool.acquire().await?),
        };
        tx.execute("BEGIN").await?;
        Ok(tx)
    }

    /// `COMMIT`, and give the connection back to the pool.
    pub(crate) async fn commit(mut self) -> Result<(), sqlx::Error> {
        self.execute("COMMIT").await?;
        // Finished: the connection goes back to the pool as it is.
        drop(self.conn.take());
        Ok(())
    }
}

impl Deref for Tx {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        self.conn
            .as_deref()
            .expect("a live transaction has its connection")
    }
}

impl DerefMut for Tx {
    fn deref_mut(&mut self) -> &mut PgConnection {
        self.conn
            .as_deref_mut()
            .expect("a live transaction has its connection")
    }
}

impl Drop for Tx {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            // Unfinished: close the connection (not back to the pool), so
            // the server aborts the transaction now.
            drop(conn.detach());
        }
    }
}
