//! Drives the `conveyor` binary: round trips, lag, DLQ, bad input.
//!
//! Cases that need state across invocations use the embedded default
//! backend in a temporary directory; the others use `memory://`.

use assert_cmd::Command;
use conveyor::prelude::*;
use conveyor::NackOptions;
use predicates::prelude::*;

fn conveyor(url: &str) -> Command {
    let mut cmd = Command::cargo_bin("conveyor").expect("binary built");
    cmd.env_remove("CONVEYOR_URL").arg("--url").arg(url);
    cmd
}

#[test]
fn no_url_is_one_clear_line() {
    Command::cargo_bin("conveyor")
        .unwrap()
        .env_remove("CONVEYOR_URL")
        .args(["topic", "list"])
        .assert()
        .failure()
        .stderr(
            predicate::str::contains("no broker URL").and(predicate::str::contains("CONVEYOR_URL")),
        );
}

#[test]
fn unknown_topic_is_reported_with_exit_code() {
    conveyor("memory://")
        .args(["topic", "describe", "missing.topic"])
        .assert()
        .failure()
        .stderr(predicate::eq(
            "conveyor: error: topic not found: topic `missing.topic` does not exist\n",
        ));
    conveyor("memory://")
        .args(["consume", "missing.topic", "--max", "1"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("missing.topic"));
}

#[test]
fn invalid_topic_name_is_refused() {
    conveyor("memory://")
        .args(["topic", "create", "bad name", "--partitions", "2"])
        .assert()
        .failure()
        .stderr(
            predicate::str::contains("invalid argument").and(predicate::str::contains("bad name")),
        );
}

#[test]
fn malformed_json_line_is_reported_by_number_and_the_rest_is_sent() {
    // One invocation: produce, and prove with --verbose receipts that the
    // lines after the bad one went out.
    let input = "{\"key\":\"a\",\"value\":\"one\"}\n{not json\n{\"value\":\"three\",\"headers\":[[\"h\",\"1\"],[\"h\",\"2\"]]}\n";
    conveyor("memory://?auto_create=true")
        .args(["produce", "events", "--json", "--verbose"])
        .write_stdin(input)
        .assert()
        .failure()
        .stdout(predicate::str::contains("│ 1 ").and(predicate::str::contains("│ 3 ")))
        .stderr(
            predicate::str::contains("line 2: malformed JSON line")
                .and(predicate::str::contains("sent 2 records")),
        );
}

#[test]
fn unknown_json_field_is_malformed() {
    conveyor("memory://?auto_create=true")
        .args(["produce", "events", "--json"])
        .write_stdin("{\"vaule\":\"typo\"}\n")
        .assert()
        .failure()
        .stderr(predicate::str::contains("line 1").and(predicate::str::contains("vaule")));
}

#[test]
fn bench_prints_the_workloads_by_their_names() {
    conveyor("memory://")
        .args([
            "bench",
            "--workload",
            "produce/batch_100",
            "--workload",
            "queue/batch_ack",
            "--workload",
            "latency/produce_to_consume",
            "--seconds",
            "0.2",
            "--quiet",
        ])
        .assert()
        .success()
        .stdout(
            predicate::str::contains("produce/batch_100")
                .and(predicate::str::contains("queue/batch_ack"))
                .and(predicate::str::contains("latency/produce_to_consume"))
                .and(predicate::str::contains("durability none"))
                .and(predicate::str::contains("p99.9"))
                .and(predicate::str::contains("read/from_start").not()),
        );
}

#[test]
fn bench_json_has_a_rate_per_workload() {
    let out = conveyor("memory://")
        .args([
            "--format",
            "json",
            "bench",
            "--workload",
            "produce/batch_1000",
            "--seconds",
            "0.1",
            "--quiet",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let row = &v["workloads"][0];
    assert_eq!(row["workload"], "produce/batch_1000");
    assert_eq!(row["messages"].as_u64().unwrap() % 1000, 0);
    assert!(row["messages_per_second"].as_f64().unwrap() > 0.0, "{v}");
}

#[test]
fn bench_lists_the_catalogue() {
    conveyor("memory://")
        .args(["bench", "--list"])
        .assert()
        .success()
        .stdout(
            predicate::str::contains("topics/1000\n")
                .and(predicate::str::contains("value_size/64KiB\n")),
        );
}

#[test]
fn every_command_has_an_example_in_help() {
    for args in [
        vec!["topic", "create", "--help"],
        vec!["topic", "list", "--help"],
        vec!["topic", "describe", "--help"],
        vec!["topic", "delete", "--help"],
        vec!["topic", "add-partitions", "--help"],
        vec!["produce", "--help"],
        vec!["consume", "--help"],
        vec!["group", "list", "--help"],
        vec!["group", "describe", "--help"],
        vec!["group", "lag", "--help"],
        vec!["group", "reset-offsets", "--help"],
        vec!["group", "alter", "--help"],
        vec!["dlq", "list", "--help"],
        vec!["dlq", "redrive", "--help"],
        vec!["dlq", "purge", "--help"],
        vec!["dlq", "discard", "--help"],
        vec!["group", "delete", "--help"],
        vec!["ping", "--help"],
        vec!["bench", "--help"],
    ] {
        Command::cargo_bin("conveyor")
            .unwrap()
            .args(&args)
            .assert()
            .success()
            .stdout(predicate::str::contains("Example"));
    }
}

/// A store in a temporary directory, shared by several invocations.
struct Store {
    dir: tempfile::TempDir,
}

impl Store {
    fn new() -> Self {
        Store {
            dir: tempfile::tempdir().expect("temporary directory"),
        }
    }
    /// A new store holding one topic.
    fn with_topic(name: &str, partitions: u32) -> Self {
        let store = Store::new();
        store
            .run()
            .args([
                "topic",
                "create",
                name,
                "--partitions",
                &partitions.to_string(),
            ])
            .assert()
            .success();
        store
    }
    fn url(&self) -> String {
        format!("mmap://{}", self.dir.path().display())
    }
    fn run(&self) -> Command {
        conveyor(&self.url())
    }
}

#[test]
fn produce_then_consume_round_trip_across_invocations() {
    let store = Store::new();
    store
        .run()
        .args(["topic", "create", "orders", "--partitions", "3"])
        .assert()
        .success();
    store
        .run()
        .args(["produce", "orders", "--key-separator", ":"])
        .write_stdin("order-1:placed\norder-2:placed\norder-1:shipped\n")
        .assert()
        .success()
        .stderr(predicate::str::contains("sent 3 records"));
    let out = store
        .run()
        .args([
            "consume",
            "orders",
            "--from",
            "beginning",
            "--format",
            "json",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    // Same key, same partition, in order.
    let order1: Vec<&serde_json::Value> = lines.iter().filter(|m| m["key"] == "order-1").collect();
    assert_eq!(order1.len(), 2);
    assert_eq!(order1[0]["partition"], order1[1]["partition"]);
    assert_eq!(order1[0]["value"], "placed");
    assert_eq!(order1[1]["value"], "shipped");
    store
        .run()
        .args(["topic", "describe", "orders"])
        .assert()
        .success()
        .stdout(predicate::str::contains("log end"));
}

#[test]
fn group_consume_commits_and_lag_shows_it() {
    let store = Store::new();
    store
        .run()
        .args(["topic", "create", "events", "--partitions", "2"])
        .assert()
        .success();
    let input: String = (0..10).map(|i| format!("event {i}\n")).collect();
    store
        .run()
        .args(["produce", "events"])
        .write_stdin(input)
        .assert()
        .success();
    // Read 4 through a stream-mode group: they are committed.
    let out = store
        .run()
        .args(["consume", "events", "--group", "audit", "--max", "4"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8(out.stdout).unwrap().lines().count(), 4);
    store
        .run()
        .args(["group", "lag", "audit"])
        .assert()
        .success()
        .stdout(predicate::str::contains("total lag 6"));
    // The rest, then nothing is left.
    let out = store
        .run()
        .args(["consume", "events", "--group", "audit", "--wait-ms", "200"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8(out.stdout).unwrap().lines().count(), 6);
    store
        .run()
        .args(["group", "lag", "audit"])
        .assert()
        .success()
        .stdout(predicate::str::contains("total lag 0"));
    store
        .run()
        .args(["group", "list"])
        .assert()
        .success()
        .stdout(predicate::str::contains("audit"));
    // Replay: reset to the beginning, and everything comes again.
    store
        .run()
        .args([
            "group",
            "reset-offsets",
            "audit",
            "events",
            "--to",
            "earliest",
        ])
        .assert()
        .success();
    store
        .run()
        .args(["group", "lag", "audit"])
        .assert()
        .success()
        .stdout(predicate::str::contains("total lag 10"));
}

#[test]
fn queue_group_consume_acks() {
    let store = Store::new();
    store
        .run()
        .args(["topic", "create", "jobs", "--partitions", "2"])
        .assert()
        .success();
    store
        .run()
        .args(["produce", "jobs"])
        .write_stdin("a\nb\nc\n")
        .assert()
        .success();
    store
        .run()
        .args([
            "consume",
            "jobs",
            "--group",
            "workers",
            "--mode",
            "queue",
            "--wait-ms",
            "200",
        ])
        .assert()
        .success()
        .stdout(predicate::function(|s: &str| s.lines().count() == 3));
    store
        .run()
        .args(["group", "lag", "workers"])
        .assert()
        .success()
        .stdout(predicate::str::contains("total lag 0").and(predicate::str::contains("in flight")));
}

/// The `config` object of `conveyor group describe GROUP --format json`.
fn described_config(store: &Store, group: &str) -> serde_json::Value {
    let out = store
        .run()
        .args(["group", "describe", group, "--format", "json"])
        .output()
        .expect("run conveyor group describe");
    assert!(out.status.success(), "{out:?}");
    let doc: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("group describe prints JSON");
    doc["config"].clone()
}

/// Issue 22 §2: `consume --group` and `group reset-offsets` join with the
/// group's settings and change nothing; `group alter` changes them.
#[test]
fn group_settings_change_only_by_alter() {
    let store = Store::with_topic("orders", 1);
    store
        .run()
        .args(["produce", "orders"])
        .write_stdin("a\nb\n")
        .assert()
        .success();
    let consume = |store: &Store| {
        store
            .run()
            .args([
                "consume",
                "orders",
                "--group",
                "billing",
                "--mode",
                "queue",
                "--max",
                "1",
                "--wait-ms",
                "200",
            ])
            .assert()
            .success();
    };
    consume(&store);
    store
        .run()
        .args([
            "group",
            "alter",
            "billing",
            "--visibility-timeout",
            "10s",
            "--max-deliveries",
            "3",
        ])
        .assert()
        .success()
        .stdout(predicate::str::contains("settings changed").and(predicate::str::contains("10 s")));
    let altered = described_config(&store, "billing");
    assert_eq!(altered["visibility_timeout_ms"], 10_000, "{altered}");
    assert_eq!(altered["dlq"]["max_deliveries"], 3, "{altered}");
    // A tool joining the group changes nothing.
    consume(&store);
    store
        .run()
        .args([
            "group",
            "reset-offsets",
            "billing",
            "orders",
            "--to",
            "earliest",
        ])
        .assert()
        .success();
    store
        .run()
        .args(["group", "lag", "billing"])
        .assert()
        .success();
    assert_eq!(described_config(&store, "billing"), altered);
    // Nothing to change is a usage error; an unknown group is reported.
    store
        .run()
        .args(["group", "alter", "billing"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("say what to change"));
    store
        .run()
        .args(["group", "alter", "nobody", "--max-deliveries", "2"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("nobody"));
}

#[test]
fn dlq_list_and_redrive() {
    let store = Store::new();
    // Make a dead letter through the library: a queue group that gives up.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        use conveyor::{DlqPolicy, GroupConfig, Record, TopicConfig};
        use std::time::Duration;
        let broker = conveyor::open(&store.url()).await.unwrap();
        broker
            .create_topic("mail", TopicConfig::new(1))
            .await
            .unwrap();
        broker
            .producer()
            .await
            .unwrap()
            .send("mail", Record::new("to: nobody").with_key("k1"))
            .await
            .unwrap();
        let c = broker
            .consumer(
                "sender",
                &["mail"],
                GroupConfig::queue().with_dlq(DlqPolicy::new(1)),
            )
            .await
            .unwrap();
        let m = c.poll(1, Duration::from_secs(5)).await.unwrap();
        c.nack(&m[0], NackOptions::new().with_reason("mailbox unavailable"))
            .await
            .unwrap();
        c.close().await.unwrap();
        broker.close().await.unwrap();
    });
    store
        .run()
        .args(["dlq", "list", "mail.sender.dlq"])
        .assert()
        .success()
        .stdout(
            predicate::str::contains("mailbox unavailable")
                .and(predicate::str::contains("mail/0@0"))
                .and(predicate::str::contains("waiting")),
        );
    store
        .run()
        .args(["dlq", "redrive", "mail.sender.dlq"])
        .assert()
        .success()
        .stdout(predicate::str::contains("redrove 1 message from"));
    store
        .run()
        .args(["dlq", "list", "mail.sender.dlq"])
        .assert()
        .success()
        .stdout(predicate::str::contains("redriven"));
    // Back in the original topic, with the audit header.
    store
        .run()
        .args(["consume", "mail", "--offset", "1", "--format", "json"])
        .assert()
        .success()
        .stdout(
            predicate::str::contains("to: nobody")
                .and(predicate::str::contains("conveyor.redrive.attempts")),
        );
}

#[test]
fn second_open_of_a_store_is_locked_for_writes_and_readable() {
    let store = Store::with_topic("kept", 1);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let broker = rt.block_on(conveyor::open(&store.url())).unwrap();
    store
        .run()
        .args(["topic", "create", "other"])
        .assert()
        .failure()
        .stderr(
            predicate::str::contains("locked").and(predicate::str::contains(
                store.dir.path().display().to_string(),
            )),
        );
    // Read commands open the store read-only: they work beside its owner.
    store
        .run()
        .args(["topic", "list"])
        .assert()
        .success()
        .stdout(predicate::eq("kept\n"));
    rt.block_on(broker.close()).unwrap();
}

#[test]
fn read_commands_never_create_a_store() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("mistyped");
    let url = format!("mmap://{}", missing.display());
    for args in [
        vec!["topic", "list"],
        vec!["topic", "describe", "t"],
        vec!["group", "list"],
        vec!["group", "lag", "g"],
        vec!["dlq", "list", "t.g.dlq"],
        vec!["consume", "t"],
        vec!["produce", "t"],
        vec!["consume", "t", "--group", "g"],
        vec!["topic", "delete", "t"],
    ] {
        conveyor(&url)
            .args(&args)
            .write_stdin("x\n")
            .assert()
            .code(5)
            .stderr(predicate::str::contains("no conveyor-mmap store here"));
        assert!(!missing.exists(), "{args:?} created {}", missing.display());
    }
    // Commands that create things do, and so does create=true.
    conveyor(&format!("{url}?create=true"))
        .args(["topic", "list"])
        .assert()
        .success();
    assert!(missing.exists());
}

#[test]
fn memory_urls_say_that_writes_die_with_the_command() {
    conveyor("memory://")
        .args(["topic", "create", "t"])
        .assert()
        .success()
        .stderr(predicate::str::contains(
            "memory:// keeps nothing: what `topic` does here is gone when the command exits",
        ));
    conveyor("memory://")
        .args(["topic", "list"])
        .assert()
        .success()
        .stderr(predicate::str::is_empty());
}

/// A server backend left out of the build is a clear error naming the
/// cargo feature that adds it (the CLI's own `redis`/`postgres` features).
#[cfg(not(feature = "redis"))]
#[test]
fn backends_not_compiled_in_name_their_feature() {
    conveyor("redis://localhost:6379")
        .args(["topic", "list"])
        .assert()
        .code(7)
        .stderr(predicate::str::contains(
            "rebuild it with `cargo install --path cli --features redis`",
        ));
    Command::cargo_bin("conveyor")
        .unwrap()
        .arg("--help")
        .assert()
        .success()
        .stdout(predicate::str::contains("redis").and(predicate::str::contains("postgres")));
}

#[test]
fn huge_retention_hours_is_refused_not_a_panic() {
    let store = Store::new();
    store
        .run()
        .args(["topic", "create", "t", "--retention-hours", "18446744073709551615"])
        .assert()
        .code(2)
        .stderr(predicate::eq(
            "conveyor: error: --retention-hours 18446744073709551615 is too large (at most 5124095576030431)\n",
        ));
    store
        .run()
        .args([
            "topic",
            "create",
            "t",
            "--retention-hours",
            "5124095576030431",
        ])
        .assert()
        .success();
}

#[test]
fn produce_to_unknown_topic_is_one_line_and_stops() {
    let store = Store::with_topic("other", 1);
    store
        .run()
        .args(["produce", "missing.topic", "--batch", "1"])
        .write_stdin("a\nb\nc\n")
        .assert()
        .code(3)
        .stderr(predicate::eq(
            "conveyor: error: topic not found: topic `missing.topic` does not exist \
             (stopped at line 1; sent 0 records to `missing.topic`)\n",
        ));
}

#[test]
fn produce_with_bad_partition_is_one_line_and_stops() {
    let store = Store::with_topic("two", 2);
    store
        .run()
        .args(["produce", "two", "--partition", "9", "--batch", "2"])
        .write_stdin("a\nb\nc\nd\ne\n")
        .assert()
        .code(5)
        .stderr(
            predicate::str::contains("partition 9 out of range (topic has 2)")
                .and(predicate::str::contains(
                    "stopped at line 1; sent 0 records",
                ))
                .and(predicate::function(|s: &str| s.lines().count() == 1)),
        );
}

#[test]
fn non_utf8_line_is_reported_by_number_and_the_rest_is_sent() {
    let mut input = b"one\n".to_vec();
    input.extend_from_slice(b"t\xffo\n");
    input.extend_from_slice(b"three\r\n");
    conveyor("memory://?auto_create=true")
        .args(["produce", "events", "--verbose"])
        .write_stdin(input)
        .assert()
        .code(5)
        .stdout(predicate::str::contains("│ 1 ").and(predicate::str::contains("│ 3 ")))
        .stderr(
            predicate::str::contains("line 2: not valid UTF-8 (bad byte at column 2)")
                .and(predicate::str::contains("sent 2 records"))
                .and(predicate::str::contains("1 line not sent")),
        );
}

#[test]
fn reset_offsets_names_the_partition_out_of_range() {
    let store = Store::with_topic("two", 2);
    store
        .run()
        .args(["consume", "two", "--group", "g", "--max", "0"])
        .assert()
        .success();
    store
        .run()
        .args(["group", "reset-offsets", "g", "two", "--to", "earliest", "--partition", "9"])
        .assert()
        .code(5)
        .stderr(predicate::eq(
            "conveyor: error: partition out of range: topic `two`: partition 9 out of range (topic has 2)\n",
        ));
}

#[test]
fn bench_refuses_unknown_workloads_and_bad_seconds() {
    conveyor("memory://")
        .args(["bench", "--workload", "produce/batch_7", "--quiet"])
        .assert()
        .code(2)
        .stderr(
            predicate::str::contains("no workload `produce/batch_7`")
                .and(predicate::str::contains("produce/batch_100")),
        );
    for seconds in ["0", "-1", "NaN", "1e9"] {
        conveyor("memory://")
            .args(["bench", &format!("--seconds={seconds}"), "--quiet"])
            .assert()
            .code(2)
            .stderr(predicate::str::contains("--seconds must be"));
    }
}

/// `migrate` is a postgres:// step; other stores are told they need none.
#[test]
fn migrate_is_only_for_postgres_urls() {
    conveyor("memory://")
        .arg("migrate")
        .assert()
        .code(2)
        .stderr(predicate::str::contains("need no migration step"));
}

/// Drops a PostgreSQL schema (server URL, schema) when the test ends.
#[cfg(feature = "postgres")]
struct DropSchema(String, String);

#[cfg(feature = "postgres")]
impl Drop for DropSchema {
    fn drop(&mut self) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        rt.block_on(async {
            let pg = conveyor::postgres::PgOptions::default().with_schema(&self.1);
            if let Ok(b) = conveyor::postgres::open(&self.0, Default::default(), pg).await {
                let _ = b.drop_schema().await;
                let _ = b.close().await;
            }
        });
    }
}

/// The PostgreSQL server of the tests: `CONVEYOR_POSTGRES_URL`, else the local one.
#[cfg(feature = "postgres")]
fn postgres_base() -> String {
    std::env::var("CONVEYOR_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string())
}

/// Deletes a Redis namespace (server URL, namespace) when the test ends.
#[cfg(feature = "redis")]
struct DropNamespace(String, String);

#[cfg(feature = "redis")]
impl Drop for DropNamespace {
    fn drop(&mut self) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        rt.block_on(async {
            let options = conveyor::redis::RedisOptions::default().with_namespace(&self.1);
            let topology = conveyor::redis::Topology::single(&self.0);
            if let Ok(b) = conveyor::redis::open(topology, Default::default(), options).await {
                let _ = b.drop_namespace().await;
                let _ = b.close().await;
            }
        });
    }
}

/// On the server backends too: `produce --json` stores a JSON value as
/// written and `--key`/`--header`/`--delay` reach the record (a queue
/// group is not offered it before its time); `consume` shows it as stored.
#[cfg(any(feature = "postgres", feature = "redis"))]
#[test]
fn server_backends_keep_json_as_written_and_take_produce_flags() {
    let ns = format!("cli_produce_{}", std::process::id());
    let mut urls = Vec::new();
    #[cfg(feature = "postgres")]
    let _schema = {
        urls.push(format!("{}?schema={ns}&migrate=true", postgres_base()));
        DropSchema(postgres_base(), ns.clone())
    };
    #[cfg(feature = "redis")]
    let _namespace = {
        let base = std::env::var("CONVEYOR_REDIS_URL")
            .unwrap_or_else(|_| "redis://127.0.0.1:6379".to_string());
        urls.push(format!("{base}/?namespace={ns}"));
        DropNamespace(base, ns.clone())
    };
    for url in urls {
        conveyor(&url)
            .args(["topic", "create", "jobs", "--partitions", "2"])
            .assert()
            .success();
        conveyor(&url)
            .args([
                "produce", "jobs", "--json", "--key", "k", "--header", "h=1", "--delay", "1h",
            ])
            .write_stdin("{\"value\": {\"z\": 1,  \"a\": [2, 1]}}\n")
            .assert()
            .success();
        let out = conveyor(&url)
            .args(["consume", "jobs", "--format", "json"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{url}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout.clone()).unwrap();
        assert!(
            text.contains("\"value\":{\"z\": 1,  \"a\": [2, 1]},\"value_encoding\":\"json\""),
            "{url}: {text}"
        );
        let m = &json_lines(&out.stdout)[0];
        assert_eq!(m["key"], "k", "{url}");
        assert_eq!(m["headers"], serde_json::json!([["h", "1"]]), "{url}");
        assert!(m["deliver_at"].as_u64().unwrap() > m["timestamp"].as_u64().unwrap() + 3_000_000);
        conveyor(&url)
            .args([
                "consume",
                "jobs",
                "--group",
                "w",
                "--mode",
                "queue",
                "--wait-ms",
                "200",
            ])
            .assert()
            .success()
            .stdout(predicate::str::is_empty());
    }
}

/// A postgres:// schema is created by `migrate`, never by a read: `group
/// lag` on a mistyped schema fails naming the schema and the command, and
/// creates nothing; after `migrate`, the schema is used; a second
/// `migrate` changes nothing. Needs the server of `CONVEYOR_POSTGRES_URL`
/// (else the local one).
#[cfg(feature = "postgres")]
#[test]
fn migrate_creates_a_postgres_schema_and_reads_never_do() {
    let base = postgres_base();
    let schema = format!("cli_migrate_{}", std::process::id());
    let _cleanup = DropSchema(base.clone(), schema.clone());
    let url = format!("{base}?schema={schema}");
    conveyor(&url)
        .args(["group", "lag", "email"])
        .assert()
        .code(5)
        .stderr(
            predicate::str::contains(format!("schema `{schema}` does not exist"))
                .and(predicate::str::contains("migrate")),
        );
    conveyor(&url)
        .arg("migrate")
        .assert()
        .success()
        .stdout(predicate::str::contains(format!(
            "schema `{schema}` is migrated"
        )));
    conveyor(&url)
        .args(["topic", "create", "orders", "--partitions", "2"])
        .assert()
        .success();
    conveyor(&url)
        .args(["topic", "list"])
        .assert()
        .success()
        .stdout(predicate::str::contains("orders"));
    conveyor(&url).arg("migrate").assert().success();
}

#[test]
fn a_url_password_is_never_printed() {
    for url in [
        "postgres://app:s3cr3t-pw@127.0.0.1:1/db?schema=a&schema=b",
        "redis://:s3cr3t-pw@127.0.0.1:1/?namespace=a&namespace=b",
        "redis://:s3cr3t-pw@127.0.0.1:1/?namespace=a&durability=sometimes",
        "postgres://app:s3cr3t-pw@[::1/db",
    ] {
        conveyor(url)
            .args(["topic", "list"])
            .assert()
            .failure()
            .stderr(predicate::str::contains("s3cr3t").not());
    }
    conveyor("postgres://app:s3cr3t-pw@127.0.0.1:1/db?schema=a&schema=b")
        .args(["topic", "list"])
        .assert()
        .failure()
        .stderr(
            predicate::str::contains("given more than once")
                .and(predicate::str::contains("app:***@127.0.0.1:1")),
        );
}

/// The value lines of `consume --format json`, parsed.
fn json_lines(out: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8(out.to_vec())
        .expect("UTF-8 output")
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

/// `produce --json` stores a JSON value as the text the user wrote (key
/// order, spaces), and `consume` shows the same bytes: as text, and
/// embedded as-is in `--format json`.
#[test]
fn json_values_are_stored_and_shown_as_written() {
    let store = Store::with_topic("orders", 1);
    store
        .run()
        .args(["produce", "orders", "--json"])
        .write_stdin(
            "{\"value\":{\"event\":\"placed\",\"amount\":10}}\n\
             {\"value\": {\"z\": [2, 1],  \"a\": null} }\n\
             {\"value\":\"{not json\"}\n",
        )
        .assert()
        .success();
    // Text mode prints the stored bytes.
    store
        .run()
        .args(["consume", "orders"])
        .assert()
        .success()
        .stdout(predicate::eq(
            "{\"event\":\"placed\",\"amount\":10}\n{\"z\": [2, 1],  \"a\": null}\n{not json\n",
        ));
    let out = store
        .run()
        .args(["consume", "orders", "--format", "json"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout.clone()).unwrap();
    assert!(
        text.contains("\"value\":{\"event\":\"placed\",\"amount\":10},\"value_encoding\":\"json\""),
        "{text}"
    );
    assert!(
        text.contains("\"value\":{\"z\": [2, 1],  \"a\": null},\"value_encoding\":\"json\""),
        "{text}"
    );
    assert!(
        text.contains("\"value\":\"{not json\",\"value_encoding\":\"text\""),
        "{text}"
    );
    assert_eq!(json_lines(&out.stdout).len(), 3);
}

/// `--key`, `--header` (repeatable) and `--delay` apply to every line; a
/// delayed record is in the log at once (stream reads see it) and not
/// offered to a queue-mode group before its time.
#[test]
fn produce_sets_key_headers_and_delay() {
    let store = Store::with_topic("jobs", 4);
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    store
        .run()
        .args([
            "produce",
            "jobs",
            "--key",
            "image-7",
            "--header",
            "source=cron",
            "--header",
            "trace=a=b",
            "--delay",
            "1h",
        ])
        .write_stdin("resize\ncrop\n")
        .assert()
        .success();
    let out = store
        .run()
        .args(["consume", "jobs", "--format", "json"])
        .output()
        .unwrap();
    let lines = json_lines(&out.stdout);
    assert_eq!(lines.len(), 2, "{lines:?}");
    for m in &lines {
        assert_eq!(m["key"], "image-7");
        assert_eq!(
            m["partition"], lines[0]["partition"],
            "same key, same partition"
        );
        assert_eq!(
            m["headers"],
            serde_json::json!([["source", "cron"], ["trace", "a=b"]])
        );
        let at = m["deliver_at"].as_u64().unwrap();
        assert!(at >= before + 3_600_000, "{m}");
    }
    store
        .run()
        .args([
            "consume",
            "jobs",
            "--group",
            "w",
            "--mode",
            "queue",
            "--wait-ms",
            "200",
        ])
        .assert()
        .success()
        .stdout(predicate::str::is_empty());
    // Bad flags are usage errors.
    store
        .run()
        .args(["produce", "jobs", "--header", "no-equals"])
        .write_stdin("x\n")
        .assert()
        .code(2)
        .stderr(predicate::str::contains("NAME=VALUE"));
    store
        .run()
        .args(["produce", "jobs", "--delay", "30"])
        .write_stdin("x\n")
        .assert()
        .code(2)
        .stderr(predicate::str::contains("30s"));
}

/// A DLQ nothing was dead-lettered to yet is empty, not an error; a topic
/// that is not a DLQ shows its records and says they are not dead letters.
#[test]
fn dlq_list_of_a_missing_dlq_or_a_plain_topic() {
    let store = Store::with_topic("mail", 1);
    store
        .run()
        .args(["dlq", "list", "mail.sender.dlq"])
        .assert()
        .success()
        .stdout(
            predicate::str::contains("0 messages")
                .and(predicate::str::contains("no such topic yet")),
        );
    let out = store
        .run()
        .args(["dlq", "list", "mail.sender.dlq", "--format", "json"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["exists"], false);
    assert_eq!(doc["total"], 0);
    store
        .run()
        .args(["produce", "mail"])
        .write_stdin("to: someone\n")
        .assert()
        .success();
    store
        .run()
        .args(["dlq", "list", "mail"])
        .assert()
        .success()
        .stdout(
            predicate::str::contains("is not a DLQ")
                .and(predicate::str::contains("not dead letter"))
                .and(predicate::str::contains("to: someone"))
                .and(predicate::str::contains("?").not()),
        );
    let out = store
        .run()
        .args(["dlq", "list", "mail", "--format", "json"])
        .output()
        .unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["messages"][0]["state"], "not_dead_letter", "{doc}");
    assert_eq!(doc["messages"][0]["value"], "to: someone", "{doc}");
}

#[test]
fn bench_list_needs_no_url() {
    Command::cargo_bin("conveyor")
        .unwrap()
        .env_remove("CONVEYOR_URL")
        .args(["bench", "--list"])
        .assert()
        .success()
        .stdout(predicate::str::contains("produce/batch_100\n"));
    let out = Command::cargo_bin("conveyor")
        .unwrap()
        .env_remove("CONVEYOR_URL")
        .args(["bench", "--list", "--format", "json"])
        .output()
        .unwrap();
    let names: Vec<String> = serde_json::from_slice(&out.stdout).unwrap();
    assert!(names.iter().any(|n| n == "queue/batch_ack"), "{names:?}");
}

/// `group describe` and `group lag` write one JSON style: lower-case mode
/// names, durations as `*_ms` integers.
#[test]
fn group_json_is_one_style() {
    let store = Store::with_topic("jobs", 1);
    store
        .run()
        .args([
            "consume", "jobs", "--group", "w", "--mode", "queue", "--max", "0",
        ])
        .assert()
        .success();
    let json_of = |args: &[&str]| -> serde_json::Value {
        let out = store.run().args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let lag = json_of(&["group", "lag", "w", "--format", "json"]);
    let describe = json_of(&["group", "describe", "w", "--format", "json"]);
    assert_eq!(lag["mode"], "queue");
    assert_eq!(describe["mode"], "queue");
    let text = describe.to_string();
    assert!(!text.contains("secs") && !text.contains("nanos"), "{text}");
    assert!(!text.contains("\"Queue\""), "{text}");
    assert_eq!(describe["config"]["mode"], "queue", "{text}");
    assert_eq!(describe["config"]["start"], "earliest", "{text}");
    assert_eq!(
        describe["config"]["visibility_timeout_ms"], 30_000,
        "{text}"
    );
}

/// Commands that change topics answer in JSON when asked.
#[test]
fn topic_changes_answer_in_json() {
    let store = Store::with_topic("t", 1);
    let json_of = |args: &[&str]| -> serde_json::Value {
        let out = store.run().args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let grown = json_of(&[
        "topic",
        "add-partitions",
        "t",
        "--partitions",
        "3",
        "--format",
        "json",
    ]);
    assert_eq!(grown, serde_json::json!({"topic": "t", "partitions": 3}));
    let deleted = json_of(&["topic", "delete", "t", "--format", "json"]);
    assert_eq!(deleted, serde_json::json!({"topic": "t", "deleted": true}));
}

/// A script can tell failures apart by the exit status, listed in --help.
#[test]
fn exit_status_says_what_kind_of_failure() {
    conveyor("memory://")
        .args(["topic", "describe", "missing"])
        .assert()
        .code(3);
    conveyor("memory://")
        .args(["topic", "create", "bad name"])
        .assert()
        .code(5);
    Command::cargo_bin("conveyor")
        .unwrap()
        .env_remove("CONVEYOR_URL")
        .args(["topic", "list"])
        .assert()
        .code(2);
    // Nothing listens on port 1: unavailable, worth a retry.
    #[cfg(feature = "redis")]
    conveyor("redis://127.0.0.1:1/?namespace=exit_code")
        .args(["topic", "list"])
        .assert()
        .code(75);
    Command::cargo_bin("conveyor")
        .unwrap()
        .arg("--help")
        .assert()
        .success()
        .stdout(
            predicate::str::contains("Exit status:")
                .and(predicate::str::contains("75  unavailable"))
                .and(predicate::str::contains("3   not found"))
                .and(predicate::str::contains("JSON output")),
        );
}

/// `n` dead letters of group `sender` on topic `mail`, made through the
/// library (a queue group that gives up at once).
fn dead_letters(store: &Store, n: usize) -> conveyor::Result<()> {
    use conveyor::{DlqPolicy, GroupConfig, Record, TopicConfig};
    use std::time::Duration;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    rt.block_on(async {
        let broker = conveyor::open(&store.url()).await?;
        broker.create_topic("mail", TopicConfig::new(1)).await?;
        let producer = broker.producer().await?;
        for i in 0..n {
            producer
                .send("mail", Record::new(format!("to: nobody {i}")))
                .await?;
        }
        let c = broker
            .consumer(
                "sender",
                &["mail"],
                GroupConfig::queue().with_dlq(DlqPolicy::new(1)),
            )
            .await?;
        let mut failed = 0;
        while failed < n {
            for m in c.poll(n, Duration::from_secs(5)).await? {
                c.nack(&m, NackOptions::new().with_reason("mailbox unavailable"))
                    .await?;
                failed += 1;
            }
        }
        c.close().await?;
        broker.close().await
    })
}

#[test]
fn group_delete_removes_a_typo_group() {
    let store = Store::with_topic("events", 1);
    store
        .run()
        .args(["produce", "events"])
        .write_stdin("a\nb\n")
        .assert()
        .success();
    store
        .run()
        .args(["consume", "events", "--group", "typo-grp", "--max", "1"])
        .assert()
        .success();
    store
        .run()
        .args(["group", "list"])
        .assert()
        .success()
        .stdout(predicate::str::contains("typo-grp"));
    store
        .run()
        .args(["group", "delete", "typo-grp"])
        .assert()
        .success()
        .stdout(predicate::str::contains("deleted group `typo-grp`"));
    store
        .run()
        .args(["group", "list"])
        .assert()
        .success()
        .stdout(predicate::str::contains("typo-grp").not());
    store
        .run()
        .args(["group", "lag", "typo-grp"])
        .assert()
        .code(3);
    store
        .run()
        .args(["group", "delete", "typo-grp"])
        .assert()
        .code(3)
        .stderr(predicate::str::contains("typo-grp"));
    store
        .run()
        .args(["consume", "events", "--group", "other", "--max", "1"])
        .assert()
        .success();
    let out = store
        .run()
        .args(["group", "delete", "other", "--format", "json"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc, serde_json::json!({"group": "other", "deleted": true}));
}

#[test]
fn dlq_discard_one_then_purge_the_rest() {
    let store = Store::new();
    dead_letters(&store, 3).unwrap();
    store
        .run()
        .args(["dlq", "discard", "mail.sender.dlq", "0", "1"])
        .assert()
        .success()
        .stdout(predicate::str::contains("discarded dead letter 0@1"));
    store
        .run()
        .args(["dlq", "discard", "mail.sender.dlq", "0", "1"])
        .assert()
        .code(5)
        .stderr(predicate::str::contains("not waiting"));
    let out = store
        .run()
        .args(["dlq", "purge", "mail.sender.dlq", "--format", "json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        doc,
        serde_json::json!({"dlq_topic": "mail.sender.dlq", "discarded": 2})
    );
    store
        .run()
        .args(["dlq", "redrive", "mail.sender.dlq"])
        .assert()
        .success()
        .stdout(predicate::str::contains("redrove 0 messages"));
    store
        .run()
        .args(["group", "lag", "conveyor.redrive"])
        .assert()
        .success()
        .stdout(predicate::str::contains("total lag 0"));
}

#[test]
fn dlq_commands_refuse_a_topic_that_is_not_a_dlq() {
    let store = Store::with_topic("mail", 1);
    store
        .run()
        .args(["produce", "mail"])
        .write_stdin("hello\n")
        .assert()
        .success();
    for args in [
        vec!["dlq", "redrive", "mail"],
        vec!["dlq", "purge", "mail"],
        vec!["dlq", "discard", "mail", "0", "0"],
    ] {
        store
            .run()
            .args(&args)
            .assert()
            .code(5)
            .stderr(predicate::str::contains("not a DLQ topic"));
    }
    store
        .run()
        .args(["group", "list"])
        .assert()
        .success()
        .stdout(predicate::str::contains("conveyor.redrive").not());
}

#[test]
fn ping_answers_with_exit_zero() {
    conveyor("memory://")
        .arg("ping")
        .assert()
        .success()
        .stdout(predicate::str::starts_with("ok: "));
    let out = conveyor("memory://")
        .args(["ping", "--format", "json"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["ok"], serde_json::json!(true));
    assert!(doc["round_trip_us"].is_u64(), "{doc}");
    // A store that is not there is not ready.
    let dir = tempfile::tempdir().unwrap();
    conveyor(&format!("mmap://{}", dir.path().join("nothing").display()))
        .arg("ping")
        .assert()
        .code(5);
}
