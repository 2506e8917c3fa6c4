//! The CLI beside real processes: read commands against a store another
//! process owns and is writing; a closed stdout (`| head -1`); Ctrl-C.
// Test code: a failed unwrap is a failed test, with its line.
#![allow(clippy::unwrap_used)]

use assert_cmd::cargo::cargo_bin;
use assert_cmd::Command;
use predicates::prelude::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

fn conveyor(url: &str) -> Command {
    let mut cmd = Command::cargo_bin("conveyor").expect("binary built");
    cmd.env_remove("CONVEYOR_URL").arg("--url").arg(url);
    cmd
}

fn spawn(url: &str, args: &[&str]) -> Child {
    std::process::Command::new(cargo_bin("conveyor"))
        .env_remove("CONVEYOR_URL")
        .arg("--url")
        .arg(url)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Wait until `f` returns `Some`, or fail after 30 s saying what for.
fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(t) = f() {
            return t;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn json(out: &[u8]) -> serde_json::Value {
    serde_json::from_slice(out).unwrap()
}

fn log_end(url: &str) -> u64 {
    let out = conveyor(url)
        .args(["topic", "describe", "events", "--format", "json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    json(&out.stdout)["partition_bounds"][0]["log_end"]
        .as_u64()
        .unwrap()
}

#[test]
fn read_commands_work_while_another_process_writes() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("mmap://{}?segment_bytes=4096", dir.path().display());
    conveyor(&url)
        .args(["topic", "create", "events", "--partitions", "1"])
        .assert()
        .success();
    // A group and a DLQ topic to inspect later.
    conveyor(&url)
        .args(["consume", "events", "--group", "audit", "--max", "0"])
        .assert()
        .success();
    conveyor(&url)
        .args(["topic", "create", "events.audit.dlq"])
        .assert()
        .success();

    // The writer: a real process that owns the store and appends a record
    // per line (batches of one) for as long as its stdin is open.
    let mut writer = spawn(&url, &["produce", "events", "--batch", "1"]);
    let mut stdin = writer.stdin.take().unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let feeding = std::thread::spawn({
        let stop = stop.clone();
        move || {
            let mut sent = 0u64;
            // Paced, so the writer is still writing while we read; small
            // segments make it roll many times meanwhile.
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                writeln!(stdin, "event {sent:06} {}", "x".repeat(200)).unwrap();
                stdin.flush().unwrap();
                sent += 1;
                std::thread::sleep(Duration::from_micros(500));
            }
            sent // dropping stdin ends the writer
        }
    });

    let first = wait_for("the writer's first records", || {
        Some(log_end(&url)).filter(|n| *n >= 100)
    });
    // The owner holds the lock: writes from here are refused...
    conveyor(&url)
        .args(["topic", "create", "other"])
        .assert()
        .code(6)
        .stderr(predicate::str::contains("locked"));
    conveyor(&format!("{url}&read_only=true"))
        .args(["topic", "create", "other"])
        .assert()
        .code(6)
        .stderr(predicate::str::contains("read-only"));
    // ...and every read command works, while the log grows under it.
    conveyor(&url)
        .args(["topic", "list"])
        .assert()
        .success()
        .stdout(predicate::str::contains("events\n"));
    conveyor(&url)
        .args(["group", "lag", "audit", "--format", "json"])
        .assert()
        .success()
        .stdout(predicate::str::contains("\"group\":\"audit\""));
    conveyor(&url)
        .args(["group", "describe", "audit"])
        .assert()
        .success()
        .stdout(predicate::str::contains("stream"))
        // Members live in the owning process: the read-only view says so
        // instead of showing none.
        .stdout(predicate::str::contains("members:     not visible here"));
    conveyor(&url)
        .args(["group", "describe", "audit", "--format", "json"])
        .assert()
        .success()
        .stdout(predicate::str::contains("\"members_visible\":false"));
    conveyor(&url)
        .args(["group", "list"])
        .assert()
        .success()
        .stdout(predicate::str::contains("audit"));
    conveyor(&url)
        .args(["dlq", "list", "events.audit.dlq"])
        .assert()
        .success()
        .stdout(predicate::str::contains("0 messages"));
    // A fetch sees a consistent prefix: dense offsets from 0, each record
    // whole and in the order written.
    let out = conveyor(&url)
        .args(["consume", "events", "--format", "json"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(lines.len() as u64 >= first);
    for (i, m) in lines.iter().enumerate() {
        assert_eq!(m["offset"], i as u64);
        let value = m["value"].as_str().unwrap();
        assert_eq!(value, format!("event {i:06} {}", "x".repeat(200)));
    }
    let later = wait_for("the log to grow under a reader", || {
        Some(log_end(&url)).filter(|n| *n > lines.len() as u64)
    });
    assert!(later > first);

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent = feeding.join().unwrap();
    let out = writer.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(log_end(&url), sent);
}

fn store_with(lines: usize) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("mmap://{}", dir.path().display());
    conveyor(&url)
        .args(["topic", "create", "events"])
        .assert()
        .success();
    let input: String = (0..lines).map(|i| format!("event {i}\n")).collect();
    conveyor(&url)
        .args(["produce", "events"])
        .write_stdin(input)
        .assert()
        .success();
    (dir, url)
}

/// Read one line of `child`'s stdout, close it, and return its exit.
fn head_1(mut child: Child) -> (std::process::ExitStatus, String) {
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert!(line.contains("event 0"), "{line}");
    drop(stdout);
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    (child.wait().unwrap(), stderr)
}

#[test]
fn a_closed_stdout_ends_every_printing_command_quietly() {
    // More than a pipe buffer of output, so writes hit the closed pipe.
    let (_dir, url) = store_with(50_000);
    for args in [
        vec!["consume", "events"],
        vec!["consume", "events", "--format", "json"],
        vec!["consume", "events", "--group", "reader"],
    ] {
        let (status, stderr) = head_1(spawn(&url, &args));
        assert!(status.success(), "{args:?}: {status}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
    // The group committed what it printed, not more: some, never all.
    let out = conveyor(&url)
        .args(["group", "lag", "reader", "--format", "json"])
        .output()
        .unwrap();
    let lag = json(&out.stdout)["total_lag"].as_u64().unwrap();
    assert!(lag > 0 && lag < 50_000, "lag {lag}");
}

#[test]
fn ctrl_c_leaves_the_group_and_commits_what_was_printed() {
    let (_dir, url) = store_with(10);
    let mut child = spawn(&url, &["consume", "events", "--group", "tail", "--follow"]);
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut printed = Vec::new();
    for _ in 0..10 {
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        printed.push(line);
    }
    let status = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    assert_eq!(printed.len(), 10);
    // Everything printed was committed; the member left (a new one gets
    // the partition at once and finds nothing).
    conveyor(&url)
        .args(["group", "lag", "tail"])
        .assert()
        .success()
        .stdout(predicate::str::contains("total lag 0"));
    conveyor(&url)
        .args(["consume", "events", "--group", "tail", "--wait-ms", "200"])
        .assert()
        .success()
        .stdout(predicate::str::is_empty());
}

#[test]
fn consume_json_round_trips_binary_and_json_values_through_produce() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("mmap://{}", dir.path().display());
    for t in ["source", "copy"] {
        conveyor(&url)
            .args(["topic", "create", t])
            .assert()
            .success();
    }
    conveyor(&url)
        .args(["produce", "source", "--json"])
        .write_stdin(
            "{\"key\":\"k1\",\"value\":{\"a\":1},\"headers\":[[\"h\",\"/w==\",\"base64\"]]}\n\
             {\"value\":\"AP8=\",\"value_encoding\":\"base64\"}\n\
             {\"value\":\"plain\"}\n",
        )
        .assert()
        .success();
    // Binary lines as base64 too.
    conveyor(&url)
        .args(["produce", "source", "--base64"])
        .write_stdin("3q2+7w==\n")
        .assert()
        .success();
    let dump = conveyor(&url)
        .args(["consume", "source", "--format", "json"])
        .output()
        .unwrap()
        .stdout;
    let text = String::from_utf8(dump.clone()).unwrap();
    assert!(text.contains("\"value\":{\"a\":1}"), "{text}");
    assert!(
        text.contains("\"value\":\"3q2+7w==\",\"value_encoding\":\"base64\""),
        "{text}"
    );
    conveyor(&url)
        .args(["produce", "copy", "--json"])
        .write_stdin(dump)
        .assert()
        .success();
    let copy = conveyor(&url)
        .args(["consume", "copy", "--format", "json"])
        .output()
        .unwrap()
        .stdout;
    let strip = |s: &[u8]| {
        String::from_utf8(s.to_vec())
            .unwrap()
            .lines()
            .map(|l| {
                let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                let o = v.as_object_mut().unwrap();
                o.remove("topic");
                o.remove("timestamp");
                v
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(strip(&copy), strip(text.as_bytes()));
}
