//! The conformance suite on a local 3-master Redis Cluster this test
//! process starts (AOF with `appendfsync always` on each master): every
//! script stays within one slot, partitions and groups spread over the
//! shards.

mod common;

use async_trait::async_trait;
use conveyor_conformance::Backend;
use conveyor_core::{Broker, BrokerOptions, Result};
use conveyor_redis::Topology;
use std::sync::Arc;

struct RedisCluster {
    topology: Topology,
    ns: String,
}

#[async_trait]
impl Backend for RedisCluster {
    async fn open(&self, options: BrokerOptions) -> Result<Arc<dyn Broker>> {
        common::open_dyn(&self.topology, &self.ns, options).await
    }

    async fn cleanup(&self) {
        common::drop_ns(&self.topology, &self.ns).await;
    }
}

conveyor_conformance::suite!(|| async {
    RedisCluster {
        topology: common::cluster().topology(),
        ns: common::unique_ns("cl"),
    }
});
