//! Runs a small version of `examples/notification_system.rs` on each
//! compiled-in embedded backend and checks its summary: nothing lost,
//! nothing sent twice, dead letters redriven, loyalty points in order.

use std::path::PathBuf;
use std::process::Command;

/// `cargo test` builds the package's examples next to the test binaries.
fn example_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target profile directory");
    let bin = dir.join("examples").join(format!(
        "notification_system{}",
        std::env::consts::EXE_SUFFIX
    ));
    {
        // `cargo test --test notification_system` does not build examples,
        // and an old binary would test old code: always let cargo decide.
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = Command::new(cargo);
        build.args(["build", "--example", "notification_system"]);
        if dir.ends_with("release") {
            build.arg("--release");
        }
        let status = build.status().expect("cargo runs");
        assert!(status.success(), "building the example failed");
    }
    assert!(bin.exists(), "{} was not built", bin.display());
    bin
}

fn run(url: &str) -> serde_json::Value {
    let out = Command::new(example_binary())
        .args([
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
        ])
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
