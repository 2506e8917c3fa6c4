//! The conformance suite against the in-memory backend.
//!
//! The memory backend is not persistent: [`MemoryBackend::open`] hands out
//! the same broker while it is open, and a fresh, empty one once it has
//! been closed (there is nothing to reopen). Its capabilities say
//! `persistent: false`, so the persistence cases skip.

use async_trait::async_trait;
use conveyor_conformance::Backend;
use conveyor_core::{Broker, BrokerOptions, ErrorKind, Result};
use std::sync::{Arc, Mutex};

/// One in-memory broker at a time.
#[derive(Default)]
struct MemoryBackend {
    current: Mutex<Option<Arc<dyn Broker>>>,
}

#[async_trait]
impl Backend for MemoryBackend {
    async fn open(&self, options: BrokerOptions) -> Result<Arc<dyn Broker>> {
        let existing = self.current.lock().expect("lock").clone();
        if let Some(broker) = existing {
            match broker.list_topics().await {
                Err(e) if e.kind() == ErrorKind::Closed => {}
                _ => return Ok(broker),
            }
        }
        let broker: Arc<dyn Broker> = Arc::new(conveyor_memory::open(options));
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

conveyor_conformance::suite!(|| async { MemoryBackend::default() });
