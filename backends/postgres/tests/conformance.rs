//! The conformance suite against the PostgreSQL server
//! (`CONVEYOR_POSTGRES_URL`, else `postgres://postgres@127.0.0.1:5432/test`),
//! each case in a schema of its own, dropped at the end of the case.
//! Opening again after a close reopens the same schema, so the persistence
//! cases run.

mod common;

use async_trait::async_trait;
use conveyor_conformance::Backend;
use conveyor_core::{Broker, BrokerOptions, Result};
use std::sync::Arc;

struct Pg {
    schema: String,
}

#[async_trait]
impl Backend for Pg {
    async fn open(&self, options: BrokerOptions) -> Result<Arc<dyn Broker>> {
        common::open_dyn(&self.schema, options).await
    }

    async fn cleanup(&self) {
        common::drop_schema(&self.schema).await;
    }
}

conveyor_conformance::suite!(|| async {
    Pg {
        schema: common::unique_schema("cf"),
    }
});
