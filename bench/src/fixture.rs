//! A freshly opened backend per benchmark, and the backends a run compares.

use conveyor::Broker;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// One backend of the comparison: a name and the URL it is opened with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backend {
    /// `memory`, `mmap`, `rocksdb`, `redis`, `postgres`.
    pub name: &'static str,
    /// The URL; `{tmp}` stands for a fresh temporary directory.
    pub url: String,
}

/// The local Redis server: `CONVEYOR_REDIS_URL`, else `redis://127.0.0.1:6379`.
pub fn redis_url() -> String {
    std::env::var("CONVEYOR_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".into())
}

/// A Redis server that honours `durability=always` (`appendfsync always`):
/// `CONVEYOR_BENCH_REDIS_ALWAYS_URL`, which `scripts/bench-report` sets
/// to a private server it starts; `None` without it.
pub fn redis_always_url() -> Option<String> {
    std::env::var("CONVEYOR_BENCH_REDIS_ALWAYS_URL").ok()
}

/// The local PostgreSQL server: `CONVEYOR_POSTGRES_URL`, else
/// `postgres://postgres@127.0.0.1:5432/test`.
pub fn postgres_url() -> String {
    std::env::var("CONVEYOR_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// Every compiled-in backend, in the order the report lists them:
/// embedded first, then the servers.
pub fn compiled_in() -> Vec<Backend> {
    let mut all = vec![
        Backend {
            name: "memory",
            url: "memory://".into(),
        },
        Backend {
            name: "mmap",
            url: "mmap://{tmp}".into(),
        },
    ];
    if cfg!(feature = "rocksdb") {
        all.push(Backend {
            name: "rocksdb",
            url: "rocksdb://{tmp}".into(),
        });
    }
    if cfg!(feature = "redis") {
        all.push(Backend {
            name: "redis",
            url: redis_url(),
        });
    }
    if cfg!(feature = "postgres") {
        all.push(Backend {
            name: "postgres",
            url: postgres_url(),
        });
    }
    all
}

/// The backend's name for a URL (its scheme; `redis+cluster` is `redis`).
pub fn name_of(url: &str) -> &'static str {
    match url.split(':').next().unwrap_or_default() {
        "memory" => "memory",
        "mmap" => "mmap",
        "rocksdb" => "rocksdb",
        "redis" | "redis+cluster" => "redis",
        "postgres" | "postgresql" => "postgres",
        _ => "other",
    }
}

/// `url` with `name=value` set in its query (replacing one there).
pub fn with_param(url: &str, name: &str, value: &str) -> String {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let mut params: Vec<String> = query
        .split('&')
        .filter(|p| !p.is_empty() && !p.starts_with(&format!("{name}=")))
        .map(str::to_string)
        .collect();
    params.push(format!("{name}={value}"));
    // `redis://host:6379` needs its path before a query.
    let sep = if base.matches('/').count() == 2 {
        "/?"
    } else {
        "?"
    };
    format!("{base}{sep}{}", params.join("&"))
}

/// A name no other fixture of any run shares: `<base>_<pid>_<n>`.
pub fn unique(base: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{base}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// The value of `name=` in `url`'s query.
fn param<'a>(url: &'a str, name: &str) -> Option<&'a str> {
    let query = url.split_once('?')?.1;
    query
        .split('&')
        .find_map(|p| p.strip_prefix(name)?.strip_prefix('='))
}

/// Where a fixture's data lives, to delete when it is done.
#[cfg_attr(not(any(feature = "redis", feature = "postgres")), allow(dead_code))]
enum Cleanup {
    #[cfg(feature = "redis")]
    Redis(conveyor::redis::RedisBroker),
    #[cfg(feature = "postgres")]
    Postgres(conveyor::postgres::PgBroker),
}

/// An open broker with storage of its own: a fresh temporary directory,
/// Redis namespace or PostgreSQL schema, deleted when it is dropped.
pub struct Fixture {
    /// The URL opened (`{tmp}`, namespace and schema filled in).
    pub url: String,
    /// The broker.
    pub broker: Arc<dyn Broker>,
    #[cfg_attr(not(any(feature = "redis", feature = "postgres")), allow(dead_code))]
    cleanup: Option<Cleanup>,
    _dir: tempfile::TempDir,
}

impl Fixture {
    /// Open `url` with storage of its own: `{tmp}` becomes a fresh
    /// temporary directory; a Redis URL's `namespace=NAME` (default
    /// `bench`) becomes `NAME_<pid>_<n>`, a PostgreSQL URL's `schema=`
    /// likewise.
    ///
    /// # Errors
    /// What opening the broker returns, as text with the URL.
    pub async fn open(url: &str) -> Result<Fixture, String> {
        let dir = tempfile::tempdir().map_err(|e| format!("temporary directory: {e}"))?;
        let mut url = url.replace("{tmp}", &dir.path().display().to_string());
        let fail = |url: &str, e: conveyor::Error| {
            format!(
                "open {}: {e}",
                conveyor::BrokerUrl::parse(url)
                    .map_or_else(|_| "(a URL)".to_string(), |u| u.redacted())
            )
        };
        match name_of(&url) {
            "redis" => {
                url = with_param(
                    &url,
                    "namespace",
                    &unique(param(&url, "namespace").unwrap_or("bench")),
                );
                #[cfg(feature = "redis")]
                {
                    let parsed = conveyor::BrokerUrl::parse(&url).map_err(|e| fail(&url, e))?;
                    let (topology, options) =
                        conveyor::redis::parse(&parsed).map_err(|e| fail(&url, e))?;
                    let broker = conveyor::redis::open(topology, parsed.options().clone(), options)
                        .await
                        .map_err(|e| fail(&url, e))?;
                    return Ok(Fixture {
                        broker: Arc::new(broker.clone()),
                        url,
                        cleanup: Some(Cleanup::Redis(broker)),
                        _dir: dir,
                    });
                }
            }
            "postgres" => {
                url = with_param(
                    &url,
                    "schema",
                    &unique(param(&url, "schema").unwrap_or("bench")),
                );
                #[cfg(feature = "postgres")]
                {
                    let parsed = conveyor::BrokerUrl::parse(&url).map_err(|e| fail(&url, e))?;
                    let (conn, options) =
                        conveyor::postgres::parse_url(&parsed).map_err(|e| fail(&url, e))?;
                    // A fresh schema of its own: create it (the migration
                    // step), as an owner would before the application runs.
                    let options = options.with_migrate(true);
                    let broker = conveyor::postgres::open(&conn, parsed.options().clone(), options)
                        .await
                        .map_err(|e| fail(&url, e))?;
                    return Ok(Fixture {
                        broker: Arc::new(broker.clone()),
                        url,
                        cleanup: Some(Cleanup::Postgres(broker)),
                        _dir: dir,
                    });
                }
            }
            _ => {}
        }
        // Without its feature, the facade says which one is missing.
        let broker = conveyor::open(&url).await.map_err(|e| fail(&url, e))?;
        Ok(Fixture {
            url,
            broker,
            cleanup: None,
            _dir: dir,
        })
    }
}

#[cfg(any(feature = "redis", feature = "postgres"))]
impl Drop for Fixture {
    fn drop(&mut self) {
        let Some(cleanup) = self.cleanup.take() else {
            return;
        };
        // Its own thread and runtime: a fixture may be dropped anywhere,
        // inside a runtime or not. The broker's connections are driven by
        // the runtime that opened them, whose workers keep running.
        let done = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(async move {
                match cleanup {
                    #[cfg(feature = "redis")]
                    Cleanup::Redis(broker) => {
                        let dropped = broker.drop_namespace().await;
                        let _ = broker.close().await;
                        dropped
                    }
                    #[cfg(feature = "postgres")]
                    Cleanup::Postgres(broker) => {
                        // Before `close`: a closed broker refuses it.
                        let dropped = broker.drop_schema().await;
                        let _ = broker.close().await;
                        dropped
                    }
                }
            })
            .map_err(|e| e.to_string())
        })
        .join();
        match done {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("could not delete the bench's data on {}: {e}", self.url),
            Err(_) => eprintln!("could not delete the bench's data on {} (panic)", self.url),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_are_set_once() {
        assert_eq!(
            with_param("redis://127.0.0.1:6379", "namespace", "x"),
            "redis://127.0.0.1:6379/?namespace=x"
        );
        assert_eq!(
            with_param("redis://h:1/?namespace=a&timeout_ms=5", "namespace", "b"),
            "redis://h:1/?timeout_ms=5&namespace=b"
        );
        assert_eq!(
            with_param("postgres://u@h/db", "durability", "always"),
            "postgres://u@h/db?durability=always"
        );
        assert_eq!(param("postgres://u@h/db?schema=s&x=1", "schema"), Some("s"));
        assert_eq!(param("postgres://u@h/db?schemas=s", "schema"), None);
        assert_eq!(name_of("redis+cluster://h:1"), "redis");
    }
}
