//! # conveyor-memory
//!
//! The in-memory backend: the reference implementation of Conveyor's
//! delivery contract, and a test double to put in your own unit tests.
//! Nothing survives the process (`persistent` is false); everything else in
//! the contract holds, checked by the conformance suite.
//!
//! It is only storage ([`MemoryStorage`]): the rules come from
//! [`conveyor_core::backend::Engine`].
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> conveyor_core::Result<()> {
//! use conveyor_core::prelude::*;
//! let broker = conveyor_memory::open_default();
//! broker.create_topic("orders", TopicConfig::new(2)).await?;
//! let receipt = broker.producer().await?.send("orders", Record::new("hi")).await?;
//! assert_eq!(receipt.offset, 0);
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]

mod url;
pub use url::{open_url, URL_SCHEMES};

use async_trait::async_trait;
use bytes::Bytes;
use conveyor_core::backend::{
    Appended, Engine, LogStorage, PartitionBounds, PartitionMap, ReadRange, StoredMessage,
    StoredRecord,
};
use conveyor_core::{now_ms, BrokerOptions, Capabilities, Receipt, Result, Retention};
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::sync::Arc;

/// The in-memory broker: the engine over [`MemoryStorage`].
pub type MemoryBroker = Engine<MemoryStorage>;

/// Open an in-memory broker with these options.
pub fn open(options: BrokerOptions) -> MemoryBroker {
    Engine::fresh(MemoryStorage::default(), options)
}

/// An empty in-memory broker with default options.
pub fn open_default() -> MemoryBroker {
    open(BrokerOptions::default())
}

/// A stored record.
#[derive(Debug, Clone)]
struct Entry {
    timestamp: u64,
    record: StoredRecord,
    size: u64,
}

/// One partition's log.
#[derive(Debug, Default)]
struct PartitionLog {
    /// Offset of `records[0]`.
    start: u64,
    records: VecDeque<Entry>,
    bytes: u64,
    last_timestamp: u64,
}

impl PartitionLog {
    fn end(&self) -> u64 {
        self.start + self.records.len() as u64
    }

    fn pop_front(&mut self) {
        if let Some(e) = self.records.pop_front() {
            self.start += 1;
            self.bytes -= e.size;
        }
    }
}

/// Partition logs and state in memory.
#[derive(Debug, Default)]
pub struct MemoryStorage {
    partitions: PartitionMap<Mutex<PartitionLog>>,
}

impl MemoryStorage {
    fn partition(&self, topic: &str, partition: u32) -> Result<Arc<Mutex<PartitionLog>>> {
        self.partitions.get(topic, partition)
    }
}

#[async_trait]
impl LogStorage for MemoryStorage {
    fn capabilities(&self) -> Capabilities {
        Capabilities::IN_MEMORY
    }

    async fn load_state(&self) -> Result<Vec<(String, Bytes)>> {
        Ok(Vec::new())
    }

    async fn put_state(&self, _changes: Vec<(String, Option<Bytes>)>) -> Result<()> {
        Ok(())
    }

    async fn ensure_partitions(&self, topic: &str, partitions: u32) -> Result<()> {
        self.partitions
            .grow(topic, partitions, |_| async { Ok(Mutex::default()) })
            .await
    }

    async fn drop_topic(&self, topic: &str) -> Result<()> {
        self.partitions.remove(topic);
        Ok(())
    }

    async fn append(
        &self,
        topic: &str,
        partition: u32,
        records: Vec<StoredRecord>,
    ) -> Result<Appended> {
        let log = self.partition(topic, partition)?;
        let mut log = log.lock();
        let timestamp = now_ms().max(log.last_timestamp);
        log.last_timestamp = timestamp;
        let base_offset = log.end();
        for r in records {
            let size =
                conveyor_core::record::payload_size(r.key.as_ref(), &r.value, &r.headers) as u64;
            log.bytes += size;
            log.records.push_back(Entry {
                timestamp,
                record: r,
                size,
            });
        }
        Ok(Appended {
            base_offset,
            timestamp,
        })
    }

    async fn read(
        &self,
        topic: &str,
        partition: u32,
        range: ReadRange,
    ) -> Result<Vec<StoredMessage>> {
        let log = self.partition(topic, partition)?;
        let log = log.lock();
        let first = range.from.max(log.start);
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let skip = (first - log.start) as usize;
        for (i, e) in log.records.iter().enumerate().skip(skip) {
            if range.is_full(out.len(), bytes) {
                break;
            }
            bytes += e.record.value.len();
            out.push(StoredMessage::from_record(
                log.start + i as u64,
                e.timestamp,
                e.record.clone(),
            ));
        }
        Ok(out)
    }

    fn bounds(&self, topic: &str, partition: u32) -> Result<PartitionBounds> {
        let log = self.partition(topic, partition)?;
        let log = log.lock();
        Ok(PartitionBounds {
            log_start: log.start,
            log_end: log.end(),
            bytes: log.bytes,
        })
    }

    async fn offset_for_timestamp(
        &self,
        topic: &str,
        partition: u32,
        timestamp: u64,
    ) -> Result<u64> {
        let log = self.partition(topic, partition)?;
        let log = log.lock();
        let idx = log.records.partition_point(|e| e.timestamp < timestamp);
        Ok(log.start + idx as u64)
    }

    async fn enforce_retention(
        &self,
        topic: &str,
        partition: u32,
        retention: &Retention,
        now_ms: u64,
    ) -> Result<()> {
        let log = self.partition(topic, partition)?;
        let mut log = log.lock();
        if let Some(age) = retention.max_age {
            // Saturate: an age beyond u64::MAX ms keeps everything (a cast
            // would wrap it to a few ms and delete fresh records).
            let age_ms = u64::try_from(age.as_millis()).unwrap_or(u64::MAX);
            let cutoff = now_ms.saturating_sub(age_ms);
            while log.records.front().is_some_and(|e| e.timestamp < cutoff) {
                log.pop_front();
            }
        }
        if let Some(max) = retention.max_bytes {
            while log.bytes > max && !log.records.is_empty() {
                log.pop_front();
            }
        }
        Ok(())
    }

    async fn idempotency_keys_since(
        &self,
        topic: &str,
        since_ms: u64,
    ) -> Result<Vec<(String, Receipt)>> {
        // The engine keeps the window itself; a fresh in-memory store is
        // empty, but answer truthfully from the log anyway.
        let parts = self.partitions.topic(topic);
        let mut out = Vec::new();
        for (p, log) in parts.iter().enumerate() {
            let log = log.lock();
            for (i, e) in log.records.iter().enumerate() {
                if e.timestamp >= since_ms {
                    if let Some(k) = &e.record.idempotency_key {
                        out.push((
                            k.clone(),
                            Receipt {
                                partition: p as u32,
                                offset: log.start + i as u64,
                                timestamp: e.timestamp,
                            },
                        ));
                    }
                }
            }
        }
        Ok(out)
    }

    async fn flush(&self) -> Result<()> {
        Ok(())
    }

    async fn close(&self) -> Result<()> {
        Ok(())
    }
}
