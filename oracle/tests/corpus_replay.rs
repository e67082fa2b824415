//! Replays every checked-in fuzz input (corpus/<target>/*) through its target: seeds and
//! minimized crash reproducers stay fixed once fixed.

use std::fs;
use std::path::Path;

fn inputs(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../corpus")
        .join(target);
    let mut v: Vec<_> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| (p.display().to_string(), fs::read(&p).unwrap()))
        .collect();
    v.sort();
    assert!(!v.is_empty(), "no inputs in {}", dir.display());
    v
}

#[test]
fn tdx_module_corpus_holds_up() {
    for (name, data) in inputs("tdx_module") {
        let bad = oracle::targets::tdx_module(&data);
        assert!(bad.is_empty(), "{name}:\n{}", bad.join("\n"));
    }
}

#[test]
fn scheduler_corpus_replays() {
    for (_, data) in inputs("scheduler") {
        let _ = oracle::targets::scheduler(&data);
    }
}

#[test]
fn stack_corpus_has_no_new_findings() {
    for (name, data) in inputs("stack") {
        let v = oracle::targets::stack_new_findings(harness::policy::Policy::UPSTREAM, &data);
        assert!(v.is_none(), "{name}: {}", v.unwrap());
    }
}
