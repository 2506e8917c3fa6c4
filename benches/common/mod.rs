//! What the benches share: the runtime and opening a backend from a URL.

use conveyor::Broker;
use std::sync::Arc;

/// A 2-worker multi-thread runtime (the machine has 2 cores).
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// An open broker and the temporary directory its store lives in.
pub struct Fixture {
    /// The backend's name: the URL's scheme (`mmap`, `memory`, ...).
    #[allow(dead_code)]
    pub name: String,
    pub broker: Arc<dyn Broker>,
    /// The URL opened (`{tmp}` and, for Redis, the namespace filled in).
    #[allow(dead_code)]
    pub url: String,
    /// On Redis: the broker, whose namespace is deleted when the fixture
    /// is dropped.
    #[cfg(feature = "redis")]
    pub redis: Option<conveyor::redis::RedisBroker>,
    _dir: tempfile::TempDir,
}

/// Is `url` one of the Redis backend's (`redis://`, `redis+cluster://`)?
#[allow(dead_code)]
pub fn is_redis(url: &str) -> bool {
    url.starts_with("redis://") || url.starts_with("redis+cluster://")
}

/// A Redis URL with a namespace of its own: `namespace=NAME` becomes
/// `namespace=NAME.<pid>.<n>` (default name `bench`), so that runs, and the
/// fixtures of one run, never share keys.
fn unique_namespace(url: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let suffix = format!(
        "{}.{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let mut params: Vec<String> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(str::to_string)
        .collect();
    match params.iter_mut().find(|p| p.starts_with("namespace=")) {
        Some(p) => *p = format!("{p}.{suffix}"),
        None => params.push(format!("namespace=bench.{suffix}")),
    }
    format!("{base}?{}", params.join("&"))
}

/// Open `url`, a `{tmp}` in it replaced by a fresh temporary directory; a
/// Redis URL gets a namespace of its own (deleted when the fixture drops).
pub fn open_url(rt: &tokio::runtime::Runtime, url: &str) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut url = url.replace("{tmp}", &dir.path().display().to_string());
    let name = url.split(':').next().unwrap_or("backend").to_string();
    #[cfg(feature = "redis")]
    if is_redis(&url) {
        url = unique_namespace(&url);
        let parsed = conveyor::BrokerUrl::parse(&url).unwrap_or_else(|e| panic!("{url}: {e}"));
        let (topology, options) =
            conveyor::redis::parse(&parsed).unwrap_or_else(|e| panic!("{url}: {e}"));
        let broker = rt
            .block_on(conveyor::redis::open(
                topology,
                parsed.options().clone(),
                options,
            ))
            .unwrap_or_else(|e| panic!("open {url}: {e}"));
        return Fixture {
            name,
            broker: Arc::new(broker.clone()),
            url,
            redis: Some(broker),
            _dir: dir,
        };
    }
    if is_redis(&url) {
        // Without the feature the open below says so.
        url = unique_namespace(&url);
    }
    let broker = rt
        .block_on(conveyor::open(&url))
        .unwrap_or_else(|e| panic!("open {url}: {e}"));
    Fixture {
        name,
        broker,
        url,
        #[cfg(feature = "redis")]
        redis: None,
        _dir: dir,
    }
}

#[cfg(feature = "redis")]
impl Drop for Fixture {
    fn drop(&mut self) {
        let Some(broker) = self.redis.take() else {
            return;
        };
        // Its own thread and runtime: a fixture may be dropped anywhere.
        // The broker's connections are driven by the bench's runtime,
        // whose workers keep running.
        let done = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                let _ = broker.close().await;
                broker.drop_namespace().await
            })
        })
        .join();
        match done {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("could not delete the bench's Redis namespace: {e}"),
            Err(_) => eprintln!("could not delete the bench's Redis namespace (panic)"),
        }
    }
}

/// The backend under test: `CONVEYOR_BENCH_URL`, default `mmap://{tmp}`.
pub fn bench_url() -> String {
    std::env::var("CONVEYOR_BENCH_URL").unwrap_or_else(|_| "mmap://{tmp}".into())
}
