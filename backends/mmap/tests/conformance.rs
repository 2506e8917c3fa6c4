//! The conformance suite against the segment log, in a temporary directory.
//!
//! `open` reopens the same directory, so the persistence cases run. A
//! broker that is still open when the case asks again is returned as is
//! (the store is locked by it). Segments are small (256 KiB) so retention
//! by bytes has whole segments to delete.

use async_trait::async_trait;
use conveyor_conformance::Backend;
use conveyor_core::{Broker, BrokerOptions, ErrorKind, Result};
use conveyor_mmap::MmapOptions;
use std::sync::{Arc, Mutex};

struct MmapBackend {
    dir: tempfile::TempDir,
    current: Mutex<Option<Arc<dyn Broker>>>,
}

#[async_trait]
impl Backend for MmapBackend {
    async fn open(&self, options: BrokerOptions) -> Result<Arc<dyn Broker>> {
        let existing = self.current.lock().expect("lock").clone();
        if let Some(broker) = existing {
            match broker.list_topics().await {
                Err(e) if e.kind() == ErrorKind::Closed => {}
                _ => return Ok(broker),
            }
        }
        let mmap = MmapOptions::default().with_segment_bytes(256 * 1024);
        let broker: Arc<dyn Broker> =
            Arc::new(conveyor_mmap::open(self.dir.path(), options, mmap).await?);
        *self.current.lock().expect("lock") = Some(broker.clone());
        Ok(broker)
    }

    async fn cleanup(&self) {
        let broker = self.current.lock().expect("lock").take();
        if let Some(broker) = broker {
            let _ = broker.close().await;
        }
    }
}

conveyor_conformance::suite!(|| async {
    MmapBackend {
        dir: tempfile::tempdir().expect("temporary directory"),
        current: Mutex::new(None),
    }
});
