//! Real crashes on RocksDB: the shared SIGKILL harness
//! (`conveyor_conformance::kill`, see its docs): a child producing and
//! committing under `Durability::Always` is killed at random; every
//! printed receipt and commit must be there after reopen.

use conveyor_core::{Broker, BrokerOptions};
use conveyor_rocksdb::RocksOptions;
use std::sync::Arc;

conveyor_conformance::kill_suite!(|dir, durability| Box::pin(async move {
    let options = BrokerOptions::default().with_durability(durability);
    let broker = conveyor_rocksdb::open(&dir, options, RocksOptions::default()).await?;
    Ok(Arc::new(broker) as Arc<dyn Broker>)
}));
