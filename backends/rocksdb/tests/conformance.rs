//! The conformance suite against RocksDB, in a temporary directory.
//!
//! Opening again after a close reopens the same directory, so the
//! persistence cases run.

use conveyor_conformance::Reopening;
use conveyor_core::Broker;
use conveyor_rocksdb::RocksOptions;
use std::sync::Arc;

conveyor_conformance::suite!(|| async {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().to_path_buf();
    Reopening::new(
        move |options| {
            let path = path.clone();
            async move {
                let broker =
                    conveyor_rocksdb::open(&path, options, RocksOptions::default()).await?;
                Ok(Arc::new(broker) as Arc<dyn Broker>)
            }
        },
        dir,
    )
});
