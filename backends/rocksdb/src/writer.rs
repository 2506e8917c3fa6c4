//! The store's writer thread: appends sent from async tasks queue here,
//! and the thread writes whatever is queued as one `WriteBatch` (group
//! commit), then publishes each partition's new log end and answers.
//!
//! Owns the thread and its queue; the bytes of an append and its
//! partition's bounds are `partition.rs`'s (`Partition::stage_append`), the
//! database handle is the store's (taken per group, so `close` is not held
//! up by an idle writer).

use crate::error::{closed, corrupt, from_rocksdb};
use crate::layout::{PartitionMeta, CF_META, CF_RECORDS};
use crate::partition::{cf, Partition};
use crate::store::Shared;
use conveyor_core::backend::{Appended, StoredRecord};
use conveyor_core::{Error, Result};
use rocksdb::{WriteBatch, WriteOptions};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Weak};
use tokio::sync::oneshot;

/// One queued append.
struct Job {
    partition: Arc<Partition>,
    records: Vec<StoredRecord>,
    now_ms: u64,
    reply: oneshot::Sender<Result<Appended>>,
}

/// A group takes queued appends until it holds this many appends or this
/// many records (an append is never split).
const MAX_GROUP: usize = 256;
const MAX_GROUP_RECORDS: usize = 10_000;

/// The sending side of the writer thread; the thread ends when this drops.
pub(crate) struct Writer {
    queue: Sender<Job>,
}

impl Writer {
    /// Start the writer thread of `shared`'s store. It holds the store
    /// weakly: it never keeps the database open.
    pub(crate) fn start(shared: &Arc<Shared>) -> Result<Writer> {
        let (queue, jobs) = mpsc::channel();
        let weak = Arc::downgrade(shared);
        std::thread::Builder::new()
            .name("conveyor-rocksdb-writer".into())
            .spawn(move || run(&weak, &jobs))
            .map_err(|e| Error::io("start the conveyor-rocksdb-writer thread", e))?;
        Ok(Writer { queue })
    }

    /// Append `records` to `partition` in the writer's next group; the
    /// answer comes after the group's write returned (and, with `sync`,
    /// was synced).
    ///
    /// # Cancel safety
    /// Once queued, the append is written whether or not this future is
    /// still awaited (as with `spawn_blocking`).
    pub(crate) async fn append(
        &self,
        shared: &Shared,
        partition: Arc<Partition>,
        records: Vec<StoredRecord>,
        now_ms: u64,
    ) -> Result<Appended> {
        let (reply, answer) = oneshot::channel();
        let job = Job {
            partition,
            records,
            now_ms,
            reply,
        };
        self.queue
            .send(job)
            .map_err(|_| Error::internal("the RocksDB writer thread has stopped"))?;
        answer.await.map_err(|_| {
            Error::internal(format!(
                "store {}: the RocksDB writer thread stopped before answering",
                shared.path().display()
            ))
        })?
    }
}

/// The writer thread: wait for an append, take whatever else is queued
/// behind it, write it all as one batch, answer. (Staying awake for a
/// while after a write, as RocksDB's own writers do, gained nothing
/// measurable here: `recv` already spins briefly before it sleeps.)
fn run(shared: &Weak<Shared>, jobs: &Receiver<Job>) {
    let mut group = Vec::with_capacity(MAX_GROUP);
    loop {
        let Ok(first) = jobs.recv() else {
            return; // the store dropped
        };
        group.push(first);
        let mut records = group[0].records.len();
        while group.len() < MAX_GROUP && records < MAX_GROUP_RECORDS {
            match jobs.try_recv() {
                Ok(job) => {
                    records += job.records.len();
                    group.push(job);
                }
                Err(_) => break,
            }
        }
        match shared.upgrade() {
            Some(shared) => write_group(&shared, &mut group),
            None => return,
        }
        group.clear();
    }
}

/// Write `group` as one `WriteBatch`: each partition's tail locked once,
/// offsets assigned in queue order, one bounds key per partition; publish
/// and answer after the write returned. A failed write fails every append
/// of the group and changes no bounds.
fn write_group(shared: &Shared, group: &mut Vec<Job>) {
    let path = shared.path();
    let db = match shared.db() {
        Ok(db) => db,
        Err(_) => {
            for job in group.drain(..) {
                let _ = job.reply.send(Err(closed(path)));
            }
            return;
        }
    };
    let (records_cf, meta_cf) = match (cf(&db, path, CF_RECORDS), cf(&db, path, CF_META)) {
        (Ok(records), Ok(meta)) => (records, meta),
        _ => {
            // Checked at open: only a damaged store gets here.
            for job in group.drain(..) {
                let _ = job.reply.send(Err(corrupt(path, "column family missing")));
            }
            return;
        }
    };
    // The partitions of the group, each once, in first-seen order.
    let mut partitions: Vec<Arc<Partition>> = Vec::new();
    let slots: Vec<usize> = group
        .iter()
        .map(|job| {
            match partitions
                .iter()
                .position(|p| Arc::ptr_eq(p, &job.partition))
            {
                Some(i) => i,
                None => {
                    partitions.push(job.partition.clone());
                    partitions.len() - 1
                }
            }
        })
        .collect();
    // Only this thread ever holds more than one tail lock (retention and
    // appends written in place hold one at a time): no lock-order cycle.
    let mut tails: Vec<_> = partitions.iter().map(|p| p.lock_tail()).collect();
    let mut next: Vec<PartitionMeta> = tails.iter().map(|t| **t).collect();
    let mut batch = WriteBatch::default();
    let mut buf = Vec::with_capacity(256);
    let appended: Vec<Appended> = group
        .iter()
        .zip(&slots)
        .map(|(job, &s)| {
            let (appended, after) = partitions[s].stage_append(
                &next[s],
                &job.records,
                job.now_ms,
                records_cf,
                &mut batch,
                &mut buf,
            );
            next[s] = after;
            appended
        })
        .collect();
    for ((p, tail), n) in partitions.iter().zip(&tails).zip(&next) {
        if n != &**tail {
            batch.put_cf(meta_cf, p.meta_key(), n.encode());
        }
    }
    let mut wo = WriteOptions::default();
    wo.set_sync(shared.sync());
    let written = match batch.is_empty() {
        true => Ok(()),
        false => db.write_opt(batch, &wo),
    };
    match written {
        Ok(()) => {
            for ((p, tail), n) in partitions.iter().zip(&mut tails).zip(&next) {
                p.publish_appended(tail, *n);
            }
            drop(tails);
            for (job, a) in group.drain(..).zip(appended) {
                let _ = job.reply.send(Ok(a));
            }
        }
        Err(e) => {
            drop(tails);
            for (job, a) in group.drain(..).zip(appended) {
                let what = format!("append to {}", job.partition.describe(a.base_offset));
                let _ = job.reply.send(Err(from_rocksdb(path, &what, e.clone())));
            }
        }
    }
}
