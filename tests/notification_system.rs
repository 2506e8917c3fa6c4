//! Runs a small version of `examples/notification_system.rs` on each
//! compiled-in embedded backend and checks its summary: nothing lost,
//! nothing sent twice, dead letters redriven, loyalty points in order.

mod common;

use std::path::PathBuf;
use std::process::Command;

fn example_binary() -> PathBuf {
    common::example_binary("notification_system", &[])
}

/// The arguments of a small run on `url`: 2,000 events, 6 crashes, 1% of
/// SMS numbers rejected (dead-lettered, then redriven), a JSON summary.
fn small_run(url: &str) -> Vec<String> {
    [
        "--url",
        url,
        "--events",
        "2000",
        "--workers",
        "2",
        "--crashes",
        "6",
        "--sms-permanent-failure-rate",
        "0.01",
        "--json",
        "--quiet",
    ]
    .map(String::from)
    .to_vec()
}

fn run(url: &str) -> serde_json::Value {
    let out = Command::new(example_binary())
        .args(small_run(url))
        .output()
        .expect("example runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    let summary: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| {
        panic!(
            "no JSON summary ({e}); status {:?}\nstdout:\n{stdout}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert!(out.status.success(), "example failed: {summary}");
    summary
}

fn check(summary: &serde_json::Value) {
    let n = |k: &str| {
        summary[k]
            .as_u64()
            .unwrap_or_else(|| panic!("{k} in {summary}"))
    };
    assert_eq!(n("events_produced"), 2000);
    assert_eq!(n("lost"), 0, "{summary}");
    assert_eq!(n("sent_twice"), 0, "{summary}");
    assert_eq!(n("sent_email"), n("expected_email"));
    assert_eq!(n("sent_sms"), n("expected_sms"));
    assert_eq!(n("sent_push"), n("expected_push"));
    assert_eq!(n("sent_email"), 2000, "email gets every event");
    assert!(n("crashes_injected") == 6, "{summary}");
    assert!(
        n("dead_lettered") > 0,
        "1% rejected numbers must reach the DLQ: {summary}"
    );
    assert!(n("redriven") >= n("dead_lettered"), "{summary}");
    assert_eq!(summary["loyalty_points_match"], true, "{summary}");
    assert_eq!(n("loyalty_out_of_order"), 0);
    // The peak is one group's backlog: never more than the events.
    assert!(n("peak_lag") > 0 && n("peak_lag") <= 2000, "{summary}");
    assert!(
        ["email", "sms", "push", "loyalty"]
            .contains(&summary["peak_lag_group"].as_str().unwrap_or("")),
        "{summary}"
    );
    assert_eq!(summary["ok"], true);
}

#[test]
fn help_opens_with_what_the_scenario_does() {
    let out = Command::new(example_binary())
        .arg("--help")
        .output()
        .expect("example runs");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        help.starts_with("A Black Friday burst of order events"),
        "{help}"
    );
}

#[test]
fn notification_system_on_memory() {
    check(&run("memory://"));
}

#[test]
fn notification_system_on_mmap() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let summary = run(&format!("mmap://{}", dir.path().display()));
    check(&summary);
}

/// A free port on 127.0.0.1 (free when this returns; the example binds it
/// right after).
fn free_local_addr() -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    listener.local_addr().expect("its address")
}

/// `GET /metrics` over plain HTTP/1.0; `None` until the exporter answers.
fn scrape(addr: std::net::SocketAddr) -> Option<String> {
    use std::io::{Read, Write};
    let mut stream =
        std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(5)).ok()?;
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .ok()?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply).ok()?;
    let (head, body) = reply.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.").then(|| body.to_owned())
}

/// The sum of the samples of metric `name` whose labels include every
/// `key="value"` of `with` (Prometheus text format).
fn sum(text: &str, name: &str, with: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, labels) = match series.split_once('{') {
                Some((m, rest)) => (m, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let wanted = metric == name
                && with
                    .iter()
                    .all(|(k, v)| labels.split(',').any(|l| l == format!("{k}=\"{v}\"")));
            wanted.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// The example with `--metrics`: Prometheus scrapes it while it runs, and
/// what the counters say afterwards is what happened (the example's own
/// summary): every event and every redriven dead letter counted as sent,
/// every dead letter counted as dead-lettered, every email processed.
#[test]
fn prometheus_metrics_match_what_the_example_did() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let addr = free_local_addr();
    let mut child = Command::new(example_binary())
        .args(small_run("memory://"))
        .args(["--metrics", &addr.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("example runs");
    // The summary line comes when the workload is over; meanwhile, scrape.
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    let mut scrapes_while_running = 0;
    let summary = loop {
        match rx.recv_timeout(std::time::Duration::from_millis(100)) {
            Ok(line) if line.starts_with('{') => break line,
            Ok(_) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                if scrape(addr).is_some() {
                    scrapes_while_running += 1;
                }
            }
            Err(e) => {
                let _ = child.kill();
                panic!("the example ended without a summary: {e}");
            }
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("no summary within 300 s");
        }
    };
    let text = scrape(addr);
    drop(child.stdin.take()); // the example exits when stdin closes
    let status = child.wait().expect("example exits");
    let text = text.expect("the exporter answers after the summary");
    let summary: serde_json::Value = serde_json::from_str(&summary).expect("JSON summary");
    check(&summary);
    assert!(status.success(), "example failed: {summary}");
    eprintln!("scraped {scrapes_while_running} times while the workload ran");
    let n = |k: &str| summary[k].as_u64().expect(k) as f64;

    let topic = [("messaging_destination_name", "orders.events")];
    let sent = sum(&text, "messaging_client_sent_messages", &topic);
    assert_eq!(
        sent,
        n("events_produced") + n("redriven"),
        "sent = the burst + the redriven dead letters\n{text}"
    );
    let dead = sum(
        &text,
        "conveyor_messages_dead_lettered",
        &[("messaging_consumer_group_name", "sms")],
    );
    assert_eq!(dead, n("dead_lettered"), "{text}");
    assert!(dead > 0.0);
    let email = [("messaging_consumer_group_name", "email")];
    let processed = sum(&text, "messaging_process_duration_count", &email);
    assert!(
        processed >= n("sent_email"),
        "every email was processed at least once: {processed}\n{text}"
    );
    let consumed = sum(&text, "messaging_client_consumed_messages", &email);
    assert!(consumed >= processed, "{consumed} < {processed}");
    for label in [
        "messaging_system=\"memory\"",
        "conveyor_consumer_lag{",
        "messaging_client_operation_duration_count{",
    ] {
        assert!(text.contains(label), "no {label} in\n{text}");
    }
}
