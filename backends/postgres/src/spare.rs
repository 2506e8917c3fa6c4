//! Connections kept out of the pool for the statements every message
//! pays for (a queue poll, an ack, a stream read and its commit, an
//! append): taking one from here and giving it back is a mutex and a
//! `Vec`, where a round trip through sqlx's pool cost 40–70 µs more per
//! statement than the statement itself took (a one-row `DELETE`: 14.6 µs
//! on a held connection, 56–87 µs through the pool; measured on this
//! project's 2-core machine, PostgreSQL 15 on loopback).
//!
//! The connections stay checked out of the pool, so the pool's size still
//! bounds the total. Only single statements outside a transaction run on
//! them (a transaction takes a pool connection through `crate::tx`): a
//! statement dropped half-way is finished by sqlx before the connection's
//! next statement, so a connection given back early is still good. One
//! that failed below SQL (I/O, protocol, a timeout) is discarded, not kept.
//! Closing the broker empties the spare set; connections coming back
//! later go to the (closed) pool, which closes them.

use conveyor_core::{ErrorKind, Result};
use parking_lot::Mutex;
use sqlx::pool::PoolConnection;
use sqlx::{PgConnection, PgPool, Postgres};
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The connections kept out of the pool (see the module docs).
pub(crate) struct Spare {
    conns: Mutex<Vec<PoolConnection<Postgres>>>,
    max: usize,
    closed: AtomicBool,
}

impl Spare {
    /// Keep at most `max` connections.
    pub(crate) fn new(max: usize) -> Arc<Spare> {
        Arc::new(Spare {
            conns: Mutex::new(Vec::new()),
            max,
            closed: AtomicBool::new(false),
        })
    }

    /// A kept connection, or one from `pool`.
    pub(crate) async fn get(
        self: &Arc<Self>,
        pool: &PgPool,
    ) -> std::result::Result<Conn, sqlx::Error> {
        let kept = self.conns.lock().pop();
        let conn = match kept {
            Some(conn) => conn,
            None => pool.acquire().await?,
        };
        Ok(Conn {
            conn: Some(conn),
            spare: self.clone(),
        })
    }

    /// Keep nothing from now on; the kept connections go back to the pool.
    pub(crate) fn close(&self) {
        let kept = {
            let mut conns = self.conns.lock();
            self.closed.store(true, Ordering::Release);
            std::mem::take(&mut *conns)
        };
        drop(kept);
    }
}

/// A connection taken from a [`Spare`] set; dropped, it goes back there.
pub(crate) struct Conn {
    conn: Option<PoolConnection<Postgres>>,
    spare: Arc<Spare>,
}

impl Conn {
    /// Discard the connection if `result` failed in a way that may have
    /// left it dead or out of step (`Unavailable`: I/O, protocol, a cut
    /// statement; `Internal`: anything unexpected); returns `result`.
    pub(crate) fn checked<T>(&mut self, result: Result<T>) -> Result<T> {
        if let Err(e) = &result {
            if matches!(e.kind(), ErrorKind::Unavailable | ErrorKind::Internal) {
                self.close_now();
            }
        }
        result
    }

    /// Close the connection now instead of keeping it (its statement may
    /// be unfinished and no task is left to finish it).
    pub(crate) fn discard(mut self) {
        self.close_now();
    }

    fn close_now(&mut self) {
        if let Some(conn) = self.conn.take() {
            drop(conn.detach());
        }
    }
}

impl Deref for Conn {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        self.conn
            .as_deref()
            .expect("a live Conn has its connection")
    }
}

impl DerefMut for Conn {
    fn deref_mut(&mut self) -> &mut PgConnection {
        self.conn
            .as_deref_mut()
            .expect("a live Conn has its connection")
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        let Some(conn) = self.conn.take() else {
            return;
        };
        let mut kept = self.spare.conns.lock();
        // Once closed (checked under the lock `close` takes), back to the
        // pool, which closes it.
        if !self.spare.closed.load(Ordering::Acquire) && kept.len() < self.spare.max {
            kept.push(conn);
        }
    }
}
