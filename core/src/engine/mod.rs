//! The delivery contract over a [`LogStorage`]: what the memory, mmap and
//! RocksDB backends share.

mod storage;
pub use storage::{Appended, LogStorage, PartitionBounds, StoredMessage, StoredRecord};
