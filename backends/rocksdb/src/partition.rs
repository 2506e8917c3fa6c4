//! One partition log: its bounds, and the blocking operations on its key
//! range (append, read, time lookup, retention, the dedup-window scan).
//!
//! Owns the partition's locks and its in-memory bounds; opens no database
//! and never runs on an async worker thread (every function here blocks:
//! `store.rs` calls them through `blocking`, the writer thread, or in place
//! on a thread that is no async worker).

use crate::error::{corrupt, from_rocksdb};
use crate::layout::{
    decode_record, encode_record, partition_meta_key, record_key, record_key_offset,
    record_timestamp, PartitionMeta, CF_META, CF_RECORDS,
};
use bytes::Bytes;
use conveyor_core::backend::{Appended, PartitionBounds, ReadRange, StoredMessage, StoredRecord};
use conveyor_core::{Result, Retention};
use parking_lot::{Mutex, MutexGuard, RwLock};
use rocksdb::{ColumnFamily, ReadOptions, WriteBatch, WriteOptions, DB};
use std::path::Path;

/// Bytes a record takes in [`PartitionBounds::bytes`]: its key and value.
fn stored_size(value: &[u8]) -> u64 {
    16 + value.len() as u64
}

pub(crate) fn cf<'a>(db: &'a DB, path: &Path, name: &str) -> Result<&'a ColumnFamily> {
    db.cf_handle(name)
        .ok_or_else(|| corrupt(path, format!("column family `{name}` missing")))
}

/// A partition of a topic: its key range is `record_key(topic_id, index, _)`.
pub(crate) struct Partition {
    topic: String,
    topic_id: u32,
    index: u32,
    /// The bounds as written: held across an append's (or a retention
    /// step's) write, so offsets are assigned and written one batch at a
    /// time per partition.
    tail: Mutex<PartitionMeta>,
    /// The bounds readers see: updated only after the write returned, so a
    /// reader never sees offset N+1 before offset N is readable.
    visible: RwLock<PartitionMeta>,
    /// One retention pass at a time.
    retention: Mutex<()>,
}

impl Partition {
    pub(crate) fn new(topic: &str, topic_id: u32, index: u32, meta: PartitionMeta) -> Partition {
        Partition {
            topic: topic.to_string(),
            topic_id,
            index,
            tail: Mutex::new(meta),
            visible: RwLock::new(meta),
            retention: Mutex::new(()),
        }
    }

    fn key(&self, offset: u64) -> [u8; 16] {
        record_key(self.topic_id, self.index, offset)
    }

    /// "topic `t` partition p offset o", for messages.
    pub(crate) fn describe(&self, offset: u64) -> String {
        format!(
            "topic `{}` partition {} offset {offset}",
            self.topic, self.index
        )
    }

    /// The key of this partition's bounds in the meta column family.
    pub(crate) fn meta_key(&self) -> [u8; 9] {
        partition_meta_key(self.topic_id, self.index)
    }

    /// The topic's name.
    pub(crate) fn topic(&self) -> &str {
        &self.topic
    }

    /// The partition's index.
    pub(crate) fn index(&self) -> u32 {
        self.index
    }

    /// Read-only stores: publish bounds the owner wrote (never backwards).
    pub(crate) fn publish(&self, meta: PartitionMeta) {
        let mut visible = self.visible.write();
        if meta.log_end >= visible.log_end && meta.log_start >= visible.log_start {
            *visible = meta;
            *self.tail.lock() = meta;
        }
    }

    pub(crate) fn bounds(&self) -> PartitionBounds {
        let m = *self.visible.read();
        PartitionBounds {
            log_start: m.log_start,
            log_end: m.log_end,
            bytes: m.bytes,
        }
    }

    /// Write `batch` plus the new meta under the tail lock, then publish.
    fn commit(
        &self,
        db: &DB,
        path: &Path,
        mut batch: WriteBatch,
        next: PartitionMeta,
        sync: bool,
        what: &str,
    ) -> Result<()> {
        batch.put_cf(
            cf(db, path, CF_META)?,
            partition_meta_key(self.topic_id, self.index),
            next.encode(),
        );
        let mut wo = WriteOptions::default();
        wo.set_sync(sync);
        db.write_opt(batch, &wo)
            .map_err(|e| from_rocksdb(path, &format!("{what} {}", self.describe(next.log_end)), e))
    }

    /// The bounds as written, locked: whoever appends holds this from
    /// assigning offsets until the write returned and the new bounds are
    /// published ([`Partition::publish_appended`]).
    pub(crate) fn lock_tail(&self) -> MutexGuard<'_, PartitionMeta> {
        self.tail.lock()
    }

    /// Put `records` into `batch` at the offsets after `tail` (the bounds as
    /// written, plus any appends to this partition staged earlier in the
    /// same batch): where they go, and the bounds after them. `buf` is
    /// scratch space for the encoding. Writes nothing itself.
    pub(crate) fn stage_append(
        &self,
        tail: &PartitionMeta,
        records: &[StoredRecord],
        now_ms: u64,
        records_cf: &ColumnFamily,
        batch: &mut WriteBatch,
        buf: &mut Vec<u8>,
    ) -> (Appended, PartitionMeta) {
        let timestamp = now_ms.max(tail.last_timestamp);
        let base = tail.log_end;
        let appended = Appended {
            base_offset: base,
            timestamp,
        };
        if records.is_empty() {
            return (appended, *tail);
        }
        let mut bytes = 0u64;
        for (i, r) in records.iter().enumerate() {
            encode_record(r, timestamp, buf);
            bytes += stored_size(buf);
            batch.put_cf(records_cf, self.key(base + i as u64), &buf[..]);
        }
        let next = PartitionMeta {
            log_end: base + records.len() as u64,
            bytes: tail.bytes + bytes,
            last_timestamp: timestamp,
            ..*tail
        };
        (appended, next)
    }

    /// After the write of staged appends returned: the new bounds, for
    /// writers (`tail`, the locked bounds as written) and then readers.
    pub(crate) fn publish_appended(&self, tail: &mut PartitionMeta, next: PartitionMeta) {
        *tail = next;
        *self.visible.write() = next;
    }

    /// Append `records` as one `WriteBatch` (with the partition's new
    /// bounds) written here, synced if `sync`; publish the new log end
    /// after the write. (Appends from async tasks go through the store's
    /// writer thread instead, which stages several into one batch.)
    pub(crate) fn append(
        &self,
        db: &DB,
        path: &Path,
        records: &[StoredRecord],
        now_ms: u64,
        sync: bool,
    ) -> Result<Appended> {
        let records_cf = cf(db, path, CF_RECORDS)?;
        let mut tail = self.tail.lock();
        let mut batch = WriteBatch::default();
        let mut buf = Vec::with_capacity(256);
        let (appended, next) =
            self.stage_append(&tail, records, now_ms, records_cf, &mut batch, &mut buf);
        if records.is_empty() {
            return Ok(appended);
        }
        self.commit(db, path, batch, next, sync, "append to")?;
        self.publish_appended(&mut tail, next);
        Ok(appended)
    }

    /// The records of `range` below the published log end.
    pub(crate) fn read(
        &self,
        db: &DB,
        path: &Path,
        range: ReadRange,
    ) -> Result<Vec<StoredMessage>> {
        let vis = *self.visible.read();
        let from = range.from.max(vis.log_start);
        if from >= vis.log_end || range.is_full(0, 0) {
            return Ok(Vec::new());
        }
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(self.key(vis.log_end).to_vec());
        let mut it = db.raw_iterator_cf_opt(cf(db, path, CF_RECORDS)?, ro);
        it.seek(self.key(from));
        let wanted = (vis.log_end - from).min(range.max_records as u64).min(4096) as usize;
        let mut out: Vec<StoredMessage> = Vec::with_capacity(wanted);
        let mut value_bytes = 0usize;
        while it.valid() && !range.is_full(out.len(), value_bytes) {
            let (Some(key), Some(value)) = (it.key(), it.value()) else {
                break;
            };
            let offset = record_key_offset(key)
                .ok_or_else(|| corrupt(path, format!("{}: bad record key", self.describe(0))))?;
            if let Some(prev) = out.last() {
                if offset != prev.offset + 1 {
                    return Err(corrupt(
                        path,
                        format!(
                            "{}: records {} to {} missing",
                            self.describe(prev.offset + 1),
                            prev.offset + 1,
                            offset - 1
                        ),
                    ));
                }
            }
            let m = decode_record(offset, Bytes::copy_from_slice(value), || {
                format!("store {}: {}", path.display(), self.describe(offset))
            })?;
            value_bytes += m.value.len();
            out.push(m);
            it.next();
        }
        it.status()
            .map_err(|e| from_rocksdb(path, &format!("read {}", self.describe(from)), e))?;
        // Records missing at the head are fine only if retention removed
        // them meanwhile (its write and its publication happen under the
        // tail lock: take it to see a settled log start).
        let first = out.first().map_or(vis.log_end, |m| m.offset);
        if first > from && first > self.tail.lock().log_start {
            return Err(corrupt(
                path,
                format!(
                    "{}: records {from} to {} missing",
                    self.describe(from),
                    first - 1
                ),
            ));
        }
        Ok(out)
    }

    /// First offset with timestamp >= `timestamp` (the log end if none):
    /// a binary search with point reads (timestamps never go back).
    pub(crate) fn offset_for_timestamp(&self, db: &DB, path: &Path, timestamp: u64) -> Result<u64> {
        let vis = *self.visible.read();
        let records = cf(db, path, CF_RECORDS)?;
        let (mut lo, mut hi) = (vis.log_start, vis.log_end);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let found = db
                .get_pinned_cf(records, self.key(mid))
                .map_err(|e| from_rocksdb(path, &format!("read {}", self.describe(mid)), e))?;
            match found {
                // Removed by retention meanwhile: below the new log start.
                None => lo = mid + 1,
                Some(v) => {
                    let ts = record_timestamp(&v).ok_or_else(|| {
                        corrupt(path, format!("{}: record undecodable", self.describe(mid)))
                    })?;
                    if ts < timestamp {
                        lo = mid + 1;
                    } else {
                        hi = mid;
                    }
                }
            }
        }
        Ok(lo)
    }

    /// Move the log start past the records `retention` no longer keeps: one
    /// scan of the doomed head (reads only), then one short write under the
    /// tail lock: a `delete_range` tombstone plus the new bounds.
    pub(crate) fn enforce_retention(
        &self,
        db: &DB,
        path: &Path,
        retention: &Retention,
        now_ms: u64,
        sync: bool,
    ) -> Result<()> {
        if retention.max_age.is_none() && retention.max_bytes.is_none() {
            return Ok(());
        }
        let _one_pass = self.retention.lock();
        let vis = *self.visible.read();
        let cutoff = retention.max_age.map(|age| {
            // Saturate: an age beyond u64::MAX ms keeps everything.
            let age_ms = u64::try_from(age.as_millis()).unwrap_or(u64::MAX);
            now_ms.saturating_sub(age_ms)
        });
        let over = |removed: u64| {
            retention
                .max_bytes
                .is_some_and(|max| vis.bytes - removed > max)
        };
        if cutoff.is_none() && !over(0) {
            return Ok(());
        }
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(self.key(vis.log_end).to_vec());
        let mut it = db.raw_iterator_cf_opt(cf(db, path, CF_RECORDS)?, ro);
        it.seek(self.key(vis.log_start));
        let (mut new_start, mut removed) = (vis.log_start, 0u64);
        while it.valid() {
            let (Some(key), Some(value)) = (it.key(), it.value()) else {
                break;
            };
            let offset = record_key_offset(key)
                .ok_or_else(|| corrupt(path, format!("{}: bad record key", self.describe(0))))?;
            let ts = record_timestamp(value).ok_or_else(|| {
                corrupt(
                    path,
                    format!("{}: record undecodable", self.describe(offset)),
                )
            })?;
            let old = cutoff.is_some_and(|c| ts < c);
            if !old && !over(removed) {
                break;
            }
            removed += stored_size(value);
            new_start = offset + 1;
            it.next();
        }
        it.status()
            .map_err(|e| from_rocksdb(path, &format!("retention of {}", self.describe(0)), e))?;
        drop(it);
        if new_start == vis.log_start {
            return Ok(());
        }
        let mut tail = self.tail.lock();
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(
            cf(db, path, CF_RECORDS)?,
            self.key(vis.log_start),
            self.key(new_start),
        );
        let next = PartitionMeta {
            log_start: new_start,
            bytes: tail.bytes.saturating_sub(removed),
            ..*tail
        };
        self.commit(db, path, batch, next, sync, "retention of")?;
        *tail = next;
        *self.visible.write() = next;
        tracing::debug!(topic = %self.topic, partition = self.index, log_start = new_start, "retention moved the log start");
        Ok(())
    }

    /// Idempotency keys of the records at or after `since_ms`: the time
    /// lookup, then a scan of the window's records.
    pub(crate) fn idempotency_keys_since(
        &self,
        db: &DB,
        path: &Path,
        since_ms: u64,
    ) -> Result<Vec<(String, u64, u64)>> {
        let from = self.offset_for_timestamp(db, path, since_ms)?;
        let mut out = Vec::new();
        let mut next = from;
        loop {
            let batch = self.read(db, path, ReadRange::from(next).with_max_records(4096))?;
            let Some(last) = batch.last() else {
                return Ok(out);
            };
            next = last.offset + 1;
            out.extend(
                batch
                    .into_iter()
                    .filter_map(|m| m.idempotency_key.map(|k| (k, m.offset, m.timestamp))),
            );
        }
    }
}

/// Meta values of partitions not yet written read as an empty log.
pub(crate) fn meta_or_empty(
    path: &Path,
    topic: &str,
    partition: u32,
    raw: Option<Vec<u8>>,
) -> Result<PartitionMeta> {
    match raw {
        None => Ok(PartitionMeta::default()),
        Some(v) => PartitionMeta::decode(&v).ok_or_else(|| {
            corrupt(
                path,
                format!("topic `{topic}` partition {partition}: bounds record undecodable"),
            )
        }),
    }
}
