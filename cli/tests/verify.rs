//! `conveyor verify --url mmap:///dir`: a clean store exits 0 with its
//! counts; a flipped byte in a sealed segment is an error line naming the
//! file and exit 8 (corrupt); the store is not modified;
//! `--format json` prints the counts as one JSON document.
// Test code: a failed unwrap is a failed test, with its line.
#![allow(clippy::unwrap_used)]

use assert_cmd::Command;
use predicates::prelude::*;
use std::path::{Path, PathBuf};

fn conveyor(url: &str) -> Command {
    let mut cmd = Command::cargo_bin("conveyor").expect("binary built");
    cmd.env_remove("CONVEYOR_URL").arg("--url").arg(url);
    cmd
}

/// A store with small segments, so partition 0 has sealed ones.
fn store(dir: &Path) -> String {
    let url = format!("mmap://{}?segment_bytes=512", dir.display());
    conveyor(&url)
        .args(["topic", "create", "orders", "--partitions", "1"])
        .assert()
        .success();
    // Eight invocations of five lines: eight batches, a few per segment.
    for run in 0..8 {
        let input: String = (0..5)
            .map(|i| format!("order number {:04}\n", run * 5 + i))
            .collect();
        conveyor(&url)
            .args(["produce", "orders"])
            .write_stdin(input)
            .assert()
            .success();
    }
    format!("mmap://{}", dir.display())
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut s: Vec<PathBuf> = std::fs::read_dir(dir.join("topics/orders/0"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    s.sort();
    s
}

#[test]
fn clean_store_exits_0_with_counts() {
    let dir = tempfile::tempdir().unwrap();
    let url = store(dir.path());
    let n = segments(dir.path()).len();
    assert!(n > 1, "expected sealed segments");
    conveyor(&url).arg("verify").assert().success().stdout(
        predicate::str::contains(": ok: 1 partitions")
            .and(predicate::str::contains(format!("{n} segments")))
            .and(predicate::str::contains("40 records")),
    );
}

#[test]
fn flipped_byte_in_a_sealed_segment_exits_8_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let url = store(dir.path());
    let sealed = segments(dir.path()).remove(0);
    let mut bytes = std::fs::read(&sealed).unwrap();
    bytes[40] ^= 0x10;
    std::fs::write(&sealed, &bytes).unwrap();
    conveyor(&url).arg("verify").assert().code(8).stderr(
        predicate::str::starts_with("conveyor: error: corrupt: ")
            .and(predicate::str::contains(sealed.display().to_string())),
    );
    assert_eq!(std::fs::read(&sealed).unwrap(), bytes, "verify wrote");
}

#[test]
fn json_format_prints_the_counts_as_one_document() {
    let dir = tempfile::tempdir().unwrap();
    let url = store(dir.path());
    let out = conveyor(&url)
        .args(["verify", "--format", "json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["ok"], true, "{doc}");
    assert_eq!(doc["partitions"], 1, "{doc}");
    assert_eq!(doc["records"], 40, "{doc}");
    assert_eq!(doc["segments"], segments(dir.path()).len() as u64, "{doc}");
    assert_eq!(doc["torn_tails"], serde_json::json!([]), "{doc}");
}

#[test]
fn verify_refuses_other_schemes() {
    conveyor("memory://")
        .arg("verify")
        .assert()
        .code(2)
        .stderr(predicate::str::contains("not an mmap:// URL"));
}
