//! Guard: every case function in a section file is in the suite's list
//! (`__for_each_case!` in `src/lib.rs`), so no case is written and never run.

use std::collections::BTreeSet;

/// The listed cases, from the list macro itself.
fn listed() -> BTreeSet<(String, String)> {
    let mut listed = BTreeSet::new();
    macro_rules! collect {
        ($section:ident: $($case:ident),* $(,)?) => {
            $( listed.insert((stringify!($section).to_string(), stringify!($case).to_string())); )*
        };
    }
    conveyor_conformance::__for_each_case!(collect);
    listed
}

/// `pub async fn NAME(backend: &dyn Backend)` in each section file.
fn written() -> BTreeSet<(String, String)> {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut written = BTreeSet::new();
    for entry in std::fs::read_dir(&src).expect("conformance/src") {
        let path = entry.expect("directory entry").path();
        let Some(section) = path.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        if path.extension().is_none_or(|e| e != "rs") || section == "lib" {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("section file");
        for line in text.lines() {
            let Some(rest) = line.trim_start().strip_prefix("pub async fn ") else {
                continue;
            };
            let Some((name, args)) = rest.split_once('(') else {
                continue;
            };
            if args.contains("&dyn Backend") {
                written.insert((section.to_string(), name.trim().to_string()));
            }
        }
    }
    written
}

#[test]
fn every_case_is_listed() {
    let listed = listed();
    let written = written();
    assert!(
        listed.len() > 90,
        "the list macro yielded {} cases",
        listed.len()
    );
    let missing: Vec<_> = written.difference(&listed).collect();
    assert!(
        missing.is_empty(),
        "case functions not in the suite list (conformance/src/lib.rs): {missing:?}"
    );
    let stray: Vec<_> = listed.difference(&written).collect();
    assert!(
        stray.is_empty(),
        "listed cases not found as `pub async fn`: {stray:?}"
    );
}
