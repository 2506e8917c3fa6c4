//! The test database: `CONVEYOR_POSTGRES_URL`, else the local default;
//! each test works in a schema of its own, dropped afterwards.
#![allow(dead_code)]

pub mod cluster;

use conveyor_core::{Broker, BrokerOptions, Error, Result};
use conveyor_postgres::{PgBroker, PgOptions};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The server the tests use.
pub fn url() -> String {
    std::env::var("CONVEYOR_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string())
}

/// A schema name no other test (or test process) uses.
pub fn unique_schema(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        "{prefix}_{}_{}_{nanos:x}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Open a broker on `schema`, migrating it (created if missing); a server
/// that cannot be reached fails the test with how to get one.
pub async fn open(schema: &str, options: BrokerOptions) -> Result<PgBroker> {
    open_with(schema, options, PgOptions::default().with_migrate(true)).await
}

/// [`open`] with PostgreSQL options (`schema` is set here).
pub async fn open_with(schema: &str, options: BrokerOptions, pg: PgOptions) -> Result<PgBroker> {
    let url = url();
    conveyor_postgres::open(&url, options, pg.with_schema(schema))
        .await
        .map_err(|e| {
            Error::new(
                e.kind(),
                format!(
                    "{} (these tests need PostgreSQL: set CONVEYOR_POSTGRES_URL, or start the local \
                     server at {url}, e.g. `pg_ctlcluster <version> main start`)",
                    e.message()
                ),
            )
        })
}

/// Drop a test's schema.
pub async fn drop_schema(schema: &str) {
    match open(schema, BrokerOptions::default()).await {
        Ok(b) => {
            if let Err(e) = b.drop_schema().await {
                eprintln!("could not drop schema {schema}: {e}");
            }
            let _ = b.close().await;
        }
        Err(e) => eprintln!("could not drop schema {schema}: {e}"),
    }
}

/// A broker as the trait object tests use.
pub async fn open_dyn(schema: &str, options: BrokerOptions) -> Result<Arc<dyn Broker>> {
    Ok(Arc::new(open(schema, options).await?))
}

/// A test's schema, dropped at the end of the test, passed or failed.
pub struct Schema(pub String);

impl Schema {
    /// A fresh schema name starting with `prefix`.
    pub fn new(prefix: &str) -> Self {
        Schema(unique_schema(prefix))
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        let schema = self.0.clone();
        // A runtime of its own: the test's may be shutting down.
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                rt.block_on(drop_schema(&schema));
            }
        })
        .join();
    }
}
