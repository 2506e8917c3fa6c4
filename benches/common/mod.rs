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
    _dir: tempfile::TempDir,
}

/// Open `url`, a `{tmp}` in it replaced by a fresh temporary directory.
pub fn open_url(rt: &tokio::runtime::Runtime, url: &str) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = url.replace("{tmp}", &dir.path().display().to_string());
    let broker = rt
        .block_on(conveyor::open(&url))
        .unwrap_or_else(|e| panic!("open {url}: {e}"));
    let name = url.split(':').next().unwrap_or("backend").to_string();
    Fixture {
        name,
        broker,
        _dir: dir,
    }
}

/// The backend under test: `CONVEYOR_BENCH_URL`, default `mmap://{tmp}`.
pub fn bench_url() -> String {
    std::env::var("CONVEYOR_BENCH_URL").unwrap_or_else(|_| "mmap://{tmp}".into())
}
