//! Drives the `conveyor` binary: round trips, lag, DLQ, bad input.
//!
//! Cases that need state across invocations use the embedded default
//! backend in a temporary directory; the others use `memory://`.

use assert_cmd::Command;
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
fn bench_prints_a_result_table() {
    conveyor("memory://")
        .args(["bench", "--messages", "5000", "--quiet"])
        .assert()
        .success()
        .stdout(predicate::str::contains("produce").and(predicate::str::contains("msg/s")));
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
        vec!["dlq", "list", "--help"],
        vec!["dlq", "redrive", "--help"],
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
