//! Runs `examples/order_service.rs` (feature `postgres`) against the
//! PostgreSQL server the tests use (`CONVEYOR_POSTGRES_URL`, else the
//! local default) and checks its summary: through SIGKILLs of producers
//! and consumers, every committed order has exactly one event, one
//! shipment and one invoice, and nothing exists for a rolled-back order.

mod common;

use std::path::PathBuf;
use std::process::Command;

/// The example, built with the `postgres` feature it needs.
fn example_binary() -> PathBuf {
    common::example_binary("order_service", &["postgres"])
}

#[test]
fn order_service_is_exactly_once_through_sigkills() {
    let url = std::env::var("CONVEYOR_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string());
    let out = Command::new(example_binary())
        .args(["--url", &url, "--seconds", "10", "--json"])
        .output()
        .expect("example runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stdout.lines().last().unwrap_or_default();
    let summary: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| {
        panic!(
            "no JSON summary ({e}); status {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
            out.status
        )
    });
    eprintln!("{stderr}{summary}");
    let n = |k: &str| {
        summary[k]
            .as_u64()
            .unwrap_or_else(|| panic!("{k} in {summary}"))
    };
    assert!(n("kills") > 0, "{summary}");
    assert!(n("orders_committed") > 0, "{summary}");
    assert!(n("orders_rolled_back_seen") > 0, "{summary}");
    assert_eq!(n("events"), n("orders_committed"), "{summary}");
    assert_eq!(n("shipments"), n("orders_committed"), "{summary}");
    assert_eq!(n("invoices"), n("orders_committed"), "{summary}");
    assert_eq!(n("orders_without_exactly_one_event"), 0, "{summary}");
    assert_eq!(n("orders_without_exactly_one_shipment"), 0, "{summary}");
    assert_eq!(n("orders_without_exactly_one_invoice"), 0, "{summary}");
    assert_eq!(n("effects_of_rolled_back_orders"), 0, "{summary}");
    assert_eq!(summary["ok"], true, "{summary}");
    assert!(out.status.success(), "example failed: {summary}");
}
