//! The conformance suite on a standalone Redis server this test process
//! starts (append-only file with `appendfsync always`, so every durability
//! setting the suite asks for is honoured), each case in a namespace of its
//! own, deleted at the end of the case. Opening again after a close
//! reopens the same namespace, so the persistence cases run.

mod common;

use async_trait::async_trait;
use conveyor_conformance::Backend;
use conveyor_core::{Broker, BrokerOptions, Result};
use conveyor_redis::Topology;
use std::sync::Arc;

struct Redis {
    topology: Topology,
    ns: String,
}

#[async_trait]
impl Backend for Redis {
    async fn open(&self, options: BrokerOptions) -> Result<Arc<dyn Broker>> {
        common::open_dyn(&self.topology, &self.ns, options).await
    }

    async fn cleanup(&self) {
        common::drop_ns(&self.topology, &self.ns).await;
    }
}

conveyor_conformance::suite!(|| async {
    Redis {
        topology: Topology::single(common::aof_server().url()),
        ns: common::unique_ns("cf"),
    }
});
