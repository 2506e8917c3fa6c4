//! What the example tests share: building an example and finding its
//! binary.

use std::path::PathBuf;
use std::process::Command;

/// The binary of the package's example `name`, built with `features`.
/// `cargo test --test ...` does not build examples, and an old binary
/// would test old code: cargo is always asked (it does nothing when the
/// binary is up to date).
pub fn example_binary(name: &str, features: &[&str]) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target profile directory");
    let bin = dir
        .join("examples")
        .join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = Command::new(cargo);
    build.args(["build", "-p", "conveyor", "--example", name]);
    if !features.is_empty() {
        build.args(["--features", &features.join(",")]);
    }
    if dir.ends_with("release") {
        build.arg("--release");
    }
    let status = build.status().expect("cargo runs");
    assert!(status.success(), "building the example {name} failed");
    assert!(bin.exists(), "{} was not built", bin.display());
    bin
}
