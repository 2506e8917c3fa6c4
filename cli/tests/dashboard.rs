//! `conveyor dashboard` in a real browser: headless Chromium driven over
//! WebDriver (chromedriver). The page loads, shows the lag of a group that
//! is behind and a dead letter's error as text, a read-only dashboard has
//! no redrive button (and its endpoint answers 403), and a redrive from the
//! page moves the dead letters back to their topic.
//!
//! Needs Debian's `chromium` and `chromium-driver` (scripts/setup installs
//! them); set CHROMIUM and CHROMEDRIVER to use others. Without them the
//! test fails and says how to install them.
// Test code: a failed unwrap is a failed test, with its line.
#![allow(clippy::unwrap_used)]

use assert_cmd::cargo::cargo_bin;
use conveyor::prelude::*;
use conveyor::{DlqPolicy, NackOptions};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long any one wait may take: generous, for a loaded 2-core machine.
const DEADLINE: Duration = Duration::from_secs(90);

/// The reason the dead letters carry: markup that must show as text.
const REASON: &str = "<b>mailbox</b> unavailable <img src=x onerror=alert(1)>";

/// A child process killed when the test ends, passing or not.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The program `env` names, or the first of `names` on the PATH (or in
/// /usr/bin); a failure saying how to install it otherwise.
fn program(env: &str, names: &[&str], package: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env) {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "{env}={} is not a file: unset it to use {} from the PATH (`scripts/setup`, or \
             `apt-get install {package}`, installs it)",
            p.display(),
            names[0]
        );
        return p;
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs: Vec<PathBuf> = std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin")])
        .collect();
    for name in names {
        for dir in &dirs {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    panic!(
        "the dashboard's browser test needs {} and found none on the PATH: install it with \
         `scripts/setup` (or `apt-get install chromium chromium-driver`), or set {env} to it \
         (Debian package: {package})",
        names.join(" or ")
    );
}

/// A store holding a group behind on `orders` and two dead letters of
/// group `mail` in `orders.mail.dlq`, made through the library.
fn prepare(url: &str) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let broker = conveyor::open(url).await.unwrap();
        broker
            .create_topic("orders", TopicConfig::new(2))
            .await
            .unwrap();
        let producer = broker.producer().await.unwrap();
        for i in 0..30 {
            producer
                .send("orders", Record::new(format!("{{\"order\":{i}}}")))
                .await
                .unwrap();
        }
        // `billing` (stream) reads and commits some: 20 behind.
        let billing = broker
            .consumer("billing", &["orders"], GroupConfig::stream())
            .await
            .unwrap();
        let mut read = Vec::new();
        while read.len() < 10 {
            let batch = billing
                .poll(10 - read.len(), Duration::from_secs(5))
                .await
                .unwrap();
            read.extend(batch);
        }
        billing.commit_batch(&read).await.unwrap();
        billing.close().await.unwrap();
        // `mail` (queue) gives up at once on two.
        let mail = broker
            .consumer(
                "mail",
                &["orders"],
                GroupConfig::queue().with_dlq(DlqPolicy::new(1)),
            )
            .await
            .unwrap();
        let mut failed = 0;
        while failed < 2 {
            for m in mail.poll(2 - failed, Duration::from_secs(5)).await.unwrap() {
                mail.nack(&m, NackOptions::new().with_reason(REASON))
                    .await
                    .unwrap();
                failed += 1;
            }
        }
        mail.close().await.unwrap();
        broker.close().await.unwrap();
    });
}

/// Start `conveyor dashboard` on a free port; its base URL.
fn dashboard(url: &str, extra: &[&str]) -> (Killed, String) {
    let mut child = Command::new(cargo_bin("conveyor"))
        .env_remove("CONVEYOR_URL")
        .args(["--url", url, "dashboard", "--listen", "127.0.0.1:0"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let Some(at) = line.find("http://") else {
        let mut err = String::new();
        let _ = child.stderr.take().unwrap().read_to_string(&mut err);
        panic!("the dashboard did not start: {line}{err}");
    };
    let base = line[at..].split_whitespace().next().unwrap().to_string();
    (Killed(child), base)
}

/// A raw HTTP/1.1 request to the dashboard (`host`: the Host header, the
/// dashboard's own address if `None`): the status line, the headers
/// (lower case) and the body.
fn http(
    base: &str,
    method: &str,
    path: &str,
    host: Option<&str>,
    body: &str,
) -> (String, String, String) {
    let authority = base.trim_start_matches("http://").trim_end_matches('/');
    let mut stream = TcpStream::connect(authority).unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        host.unwrap_or(authority),
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    (
        status.to_string(),
        headers.to_ascii_lowercase(),
        body.to_string(),
    )
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A WebDriver session in headless Chromium.
async fn browser(chromedriver_port: u16, chromium: &std::path::Path) -> Client {
    let mut caps = serde_json::Map::new();
    caps.insert("browserName".into(), json!("chrome"));
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": chromium,
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--window-size=1280,1000",
            ],
        }),
    );
    let webdriver = format!("http://127.0.0.1:{chromedriver_port}");
    let started = Instant::now();
    loop {
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        match ClientBuilder::new(connector)
            .capabilities(caps.clone())
            .connect(&webdriver)
            .await
        {
            Ok(client) => return client,
            Err(e) if started.elapsed() < DEADLINE => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("no WebDriver session from chromedriver at {webdriver}: {e}"),
        }
    }
}

/// The text of the first element `css` finds, or `None`.
async fn text(client: &Client, css: &str) -> Option<String> {
    let found = client
        .execute(
            "const e = document.querySelector(arguments[0]); return e ? e.textContent : null;",
            vec![json!(css)],
        )
        .await
        .ok()?;
    found.as_str().map(str::to_string)
}

/// Wait until the text at `css` satisfies `ok`; fail after [`DEADLINE`]
/// with what was there.
async fn wait_text(client: &Client, css: &str, what: &str, ok: impl Fn(&str) -> bool) -> String {
    let started = Instant::now();
    loop {
        let now = text(client, css).await;
        if let Some(t) = now.as_deref().filter(|t| ok(t)) {
            return t.to_string();
        }
        if started.elapsed() > DEADLINE {
            let body = text(client, "body").await.unwrap_or_default();
            panic!("timed out waiting for {what} at `{css}`: found {now:?}; the page says: {body}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How many elements `css` finds.
async fn count(client: &Client, css: &str) -> usize {
    client.find_all(Locator::Css(css)).await.unwrap().len()
}

/// The store's state through the CLI (a read-only open beside the
/// dashboard): `orders`' records and the DLQ's states.
fn cli_json(url: &str, args: &[&str]) -> Value {
    let out = Command::new(cargo_bin("conveyor"))
        .env_remove("CONVEYOR_URL")
        .args(["--url", url, "--format", "json"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn a_non_loopback_address_or_a_missing_store_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("mmap://{}", dir.path().display());
    let out = Command::new(cargo_bin("conveyor"))
        .env_remove("CONVEYOR_URL")
        .args(["--url", &url, "dashboard", "--listen", "0.0.0.0:0"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--allow-remote"), "{stderr}");
    // No store at the path: said at once (exit 5), nothing created.
    let out = Command::new(cargo_bin("conveyor"))
        .env_remove("CONVEYOR_URL")
        .args(["--url", &url, "dashboard", "--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{stderr}");
    assert!(stderr.contains("no conveyor-mmap store here"), "{stderr}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn the_page_shows_lag_and_dead_letters_and_redrives_from_a_browser() {
    let started = Instant::now();
    let chromium = program(
        "CHROMIUM",
        &["chromium", "chromium-browser", "google-chrome"],
        "chromium",
    );
    let chromedriver = program("CHROMEDRIVER", &["chromedriver"], "chromium-driver");

    let dir = tempfile::tempdir().unwrap();
    let url = format!("mmap://{}", dir.path().display());
    prepare(&url);
    let records_before = cli_json(&url, &["topic", "describe", "orders"])["records"]
        .as_u64()
        .unwrap();

    let (_read_only, read_only_base) = dashboard(&url, &["--interval", "300ms"]);
    let (_redrive, redrive_base) = dashboard(&url, &["--interval", "300ms", "--allow-redrive"]);
    let port = free_port();
    let _driver = Killed(
        Command::new(&chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", chromedriver.display())),
    );

    // Read-only: the endpoint refuses, whatever the page does.
    let (status, _, body) = http(
        &read_only_base,
        "POST",
        "/api/redrive",
        None,
        r#"{"dlq_topic":"orders.mail.dlq"}"#,
    );
    assert!(status.contains(" 403 "), "{status} {body}");
    assert!(body.contains("--allow-redrive"), "{body}");
    // The page forbids scripts from elsewhere and framing; a request for
    // another host name (a rebinding page) is refused.
    let (status, headers, _) = http(&redrive_base, "GET", "/", None, "");
    assert!(status.contains(" 200 "), "{status}");
    assert!(
        headers.contains("content-security-policy: default-src 'none'; script-src 'self';"),
        "{headers}"
    );
    assert!(headers.contains("x-frame-options: deny"), "{headers}");
    let (status, _, body) = http(&redrive_base, "GET", "/", Some("evil.example:80"), "");
    assert!(status.contains(" 403 "), "{status} {body}");

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = browser(port, &chromium).await;
        // The checks run as a task of their own, so that when one fails the
        // session is still closed (chromedriver's browser would outlive it).
        let checks = tokio::spawn({
            let client = client.clone();
            let (read_only_base, redrive_base) = (read_only_base.clone(), redrive_base.clone());
            async move {
                // The read-only page: lag and dead letters, no button.
                client.goto(&read_only_base).await.unwrap();
                wait_text(&client, "#access", "the read-only badge", |t| {
                    t == "read-only"
                })
                .await;
                wait_text(
                    &client,
                    r#"[data-dlq="orders.mail.dlq"] .waiting"#,
                    "2 dead letters waiting",
                    |t| t == "2",
                )
                .await;
                assert_eq!(count(&client, "button.redrive").await, 0, "read-only");

                // The page that may redrive.
                client.goto(&redrive_base).await.unwrap();
                let lag = wait_text(
                    &client,
                    r#"[data-group="billing"] .total-lag"#,
                    "billing's lag of 20",
                    |t| t == "20",
                )
                .await;
                assert_eq!(lag, "20");
                wait_text(
                    &client,
                    r#"[data-group="billing"] .badge.behind"#,
                    "billing shown behind",
                    |t| t == "behind",
                )
                .await;
                // The dead letters: origin, attempts, and the error as text.
                wait_text(
                    &client,
                    r#"[data-dlq="orders.mail.dlq"] .waiting"#,
                    "2 dead letters waiting",
                    |t| t == "2",
                )
                .await;
                let error = wait_text(
                    &client,
                    r#"[data-dlq="orders.mail.dlq"] tr.dead-letter .error-text"#,
                    "the error",
                    |t| t == REASON,
                )
                .await;
                assert_eq!(error, REASON);
                let title = client.title().await.unwrap();
                assert_eq!(title, "Conveyor · 2 behind · 2 dead letters");
                assert_eq!(
                    count(&client, "[data-dlq] td b, [data-dlq] td img").await,
                    0
                );
                let origin = text(
                    &client,
                    r#"[data-dlq="orders.mail.dlq"] tr.dead-letter td:nth-child(2)"#,
                )
                .await
                .unwrap();
                assert!(origin.starts_with("orders/"), "{origin}");
                // The chart draws once two samples are in.
                wait_text(
                    &client,
                    r#"[data-group="billing"] .legend"#,
                    "the chart's legend",
                    |t| t.contains("orders/0"),
                )
                .await;
                assert!(count(&client, r#"[data-group="billing"] svg polyline"#).await >= 2);

                // `mail` left 28 unread; the redriven two come back to it.
                let mail_before: u64 = wait_text(
                    &client,
                    r#"[data-group="mail"] .total-lag"#,
                    "mail's lag",
                    |t| t.parse::<u64>().is_ok(),
                )
                .await
                .parse()
                .unwrap();
                assert_eq!(mail_before, 28);

                // Redrive from the page. The page redraws on every refresh, so
                // a click may land on a button just replaced: click again then.
                let clicked = Instant::now();
                loop {
                    let button = client
                        .find(Locator::Css(
                            r#"[data-dlq="orders.mail.dlq"] button.redrive"#,
                        ))
                        .await
                        .unwrap();
                    match button.click().await {
                        Ok(()) => break,
                        Err(e) if clicked.elapsed() < DEADLINE => {
                            eprintln!("click again: {e}");
                        }
                        Err(e) => panic!("cannot click the redrive button: {e}"),
                    }
                }
                wait_text(&client, "#status", "the redrive's result", |t| {
                    t.contains("Redrove")
                })
                .await;
                assert_eq!(
                    text(&client, "#status").await.unwrap(),
                    "Redrove 2 dead letters from orders.mail.dlq."
                );
                wait_text(
                    &client,
                    r#"[data-dlq="orders.mail.dlq"] .waiting"#,
                    "no dead letter waiting",
                    |t| t == "0",
                )
                .await;
                // Back in `orders`, addressed to `mail`: its lag grows by the two.
                wait_text(
                    &client,
                    r#"[data-group="mail"] .total-lag"#,
                    "mail's lag with the 2 redriven",
                    |t| t == "30",
                )
                .await;
            }
        });
        let outcome = checks.await;
        client.close().await.unwrap();
        if let Err(failed) = outcome {
            std::panic::resume_unwind(failed.into_panic());
        }
    });

    // The store says the same, read on its own.
    let records_after = cli_json(&url, &["topic", "describe", "orders"])["records"]
        .as_u64()
        .unwrap();
    assert_eq!(records_after, records_before + 2);
    let dlq = cli_json(&url, &["dlq", "list", "orders.mail.dlq"]);
    let states: Vec<&str> = dlq["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["redriven", "redriven"]);
    eprintln!("browser test took {:?}", started.elapsed());
}

/// The README's screenshot (docs/images/dashboard.png), made again by
///
/// ```sh
/// cargo test -p conveyor-cli --test dashboard -- --ignored readme_screenshot
/// ```
///
/// A service-like workload owns an mmap:// store for a few minutes
/// (CONVEYOR_DEMO_SECS, default 150): orders arrive faster than `billing`
/// reads them for a while, then it catches up; `email` fails some for good
/// (they go to its DLQ); `ledger` keeps up. The dashboard reads the store
/// read-only beside it, and headless Chromium takes the picture
/// (CONVEYOR_DASHBOARD_SCREENSHOT names the file).
#[test]
#[ignore = "makes the README's screenshot: minutes of workload"]
fn readme_screenshot() {
    let chromium = program(
        "CHROMIUM",
        &["chromium", "chromium-browser", "google-chrome"],
        "chromium",
    );
    let secs: u64 = std::env::var("CONVEYOR_DEMO_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(150);
    let shot = std::env::var("CONVEYOR_DASHBOARD_SCREENSHOT").unwrap_or_else(|_| {
        format!(
            "{}/../docs/images/dashboard.png",
            env!("CARGO_MANIFEST_DIR")
        )
    });
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("shop");
    let url = format!("mmap://{}", store.display());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let broker = rt.block_on(async {
        let broker = conveyor::open(&url).await.unwrap();
        broker
            .create_topic("orders", TopicConfig::new(4))
            .await
            .unwrap();
        broker
            .create_topic("payments", TopicConfig::new(2))
            .await
            .unwrap();
        broker
    });
    let (_dashboard, base) = dashboard(
        &url,
        &["--allow-redrive", "--dlq-messages", "5", "--interval", "2s"],
    );
    let end = Instant::now() + Duration::from_secs(secs);
    rt.block_on(async {
        let producer = broker.producer().await.unwrap();
        let orders = tokio::spawn({
            let producer = producer.clone();
            async move {
                let mut i = 0u64;
                while Instant::now() < end {
                    let order = format!(
                        "{{\"order\":\"ord-{i:05}\",\"customer\":\"c-{}\",\"total_cents\":{}}}",
                        i % 97,
                        1_000 + (i * 37) % 9_000
                    );
                    producer
                        .send(
                            "orders",
                            Record::new(order).with_key(format!("c-{}", i % 97)),
                        )
                        .await
                        .unwrap();
                    if i.is_multiple_of(2) {
                        producer
                            .send(
                                "payments",
                                Record::new(format!("{{\"order\":\"ord-{i:05}\"}}")),
                            )
                            .await
                            .unwrap();
                    }
                    i += 1;
                    tokio::time::sleep(Duration::from_millis(40)).await;
                }
            }
        });
        // Slow for the first 60% of the run, then catches up.
        let billing = tokio::spawn({
            let broker = broker.clone();
            async move {
                let c = broker
                    .consumer("billing", &["orders"], GroupConfig::stream())
                    .await
                    .unwrap();
                let slow_until = Instant::now() + Duration::from_secs(secs / 2);
                while Instant::now() < end {
                    let (max, pause) = if Instant::now() < slow_until {
                        (8, 1_000)
                    } else {
                        (35, 500)
                    };
                    let batch = c.poll(max, Duration::from_millis(200)).await.unwrap();
                    c.commit_batch(&batch).await.unwrap();
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                }
                c.close().await.unwrap();
            }
        });
        let email = tokio::spawn({
            let broker = broker.clone();
            async move {
                let c = broker
                    .consumer(
                        "email",
                        &["orders"],
                        GroupConfig::queue().with_dlq(DlqPolicy::new(2)),
                    )
                    .await
                    .unwrap();
                let reasons = [
                    "smtp 550 5.1.1: mailbox unavailable",
                    "template `receipt` missing field `customer.email`",
                    "smtp 451 4.7.1: try again later (greylisted)",
                ];
                while Instant::now() < end {
                    for m in c.poll(50, Duration::from_millis(200)).await.unwrap() {
                        if m.offset % 23 == 5 {
                            let reason =
                                reasons[(m.offset / 23 + u64::from(m.partition)) as usize % 3];
                            let options = NackOptions::new()
                                .with_delay(Duration::from_millis(500))
                                .with_reason(reason);
                            c.nack(&m, options).await.unwrap();
                        } else {
                            c.ack(&m).await.unwrap();
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                c.close().await.unwrap();
            }
        });
        let ledger = tokio::spawn({
            let broker = broker.clone();
            async move {
                let c = broker
                    .consumer("ledger", &["payments"], GroupConfig::stream())
                    .await
                    .unwrap();
                while Instant::now() < end {
                    let batch = c.poll(100, Duration::from_millis(200)).await.unwrap();
                    c.commit_batch(&batch).await.unwrap();
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                c.close().await.unwrap();
            }
        });
        // The picture, a little before the end (the workload still runs).
        tokio::time::sleep_until((end - Duration::from_secs(3)).into()).await;
        let out = tokio::task::spawn_blocking(move || {
            Command::new(&chromium)
                .args([
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--disable-background-networking",
                    "--hide-scrollbars",
                    "--window-size=1400,1850",
                    "--virtual-time-budget=4000",
                ])
                .arg(format!("--screenshot={shot}"))
                .arg(&base)
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for task in [orders, billing, email, ledger] {
            task.await.unwrap();
        }
        broker.close().await.unwrap();
    });
}
