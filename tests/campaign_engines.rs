//! `tdxfuzz fuzz` with each engine: an injected kernel bug is found from an empty corpus, its
//! finding is written out, and a campaign bounded by `--runs` is reproducible from its seed
//! (the same signatures with the same hit counts).

use std::path::PathBuf;
use std::process::Command;

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tdxfuzz-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

/// The inputs a campaign's summary says it ran.
fn execs_in(stdout: &str) -> u64 {
    stdout
        .split(" execs in")
        .next()
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exec count:\n{stdout}"))
}

/// The summary lines (signature and hits; not the seconds, which vary) of one campaign.
fn campaign(engine: &str, seed: &str, dir: &PathBuf) -> Vec<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_tdxfuzz"))
        .args([
            "fuzz", "--jobs", "1", "--engine", engine, "--policy", "upstream",
        ])
        .args([
            "--kernel-bug",
            "skip_in_guest_mode",
            "--runs",
            "3000",
            "--seed",
            seed,
        ])
        .arg("--artifacts")
        .arg(dir)
        .output()
        .expect("run tdxfuzz fuzz");
    assert!(out.status.success(), "{engine}: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(" hits "))
        .map(|l| {
            let (hits, rest) = l.split_once(" hits ").expect("a summary line");
            let sig = rest.split_once("s  ").map_or(rest, |(_, s)| s);
            format!("{hits} {sig}")
        })
        .collect()
}

#[test]
fn both_engines_find_an_injected_bug_and_replay_their_seed() {
    for engine in ["libafl", "random"] {
        let dir = scratch(&format!("engine-{engine}"));
        let first = campaign(engine, "5", &dir.join("a"));
        assert!(
            first
                .iter()
                .any(|l| l.contains("NEW") && l.contains("state_machine")),
            "{engine}: the injected entry without IN_GUEST_MODE was not found: {first:#?}"
        );
        let written = std::fs::read_dir(dir.join("a/stack"))
            .expect("artifacts")
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "bin"))
            })
            .count();
        assert!(written >= 1, "{engine}: no finding written");
        let again = campaign(engine, "5", &dir.join("b"));
        assert_eq!(
            first, again,
            "{engine}: the same seed and --runs gave another campaign"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// A panic of the harness is a finding, not the end of the campaign: LibAFL's executor installs
/// a panic hook that would save the input and exit the process. The campaign's own fault
/// injection panics on about one input in 50.
#[test]
fn a_harness_panic_does_not_end_a_libafl_campaign() {
    let dir = scratch("engine-panic");
    let out = Command::new(env!("CARGO_BIN_EXE_tdxfuzz"))
        .args(["fuzz", "--jobs", "1", "--engine", "libafl"])
        .args(["--inject-harness-panic", "50"])
        .args(["--runs", "2000", "--seed", "1", "--artifacts"])
        .arg(&dir)
        .output()
        .expect("run tdxfuzz fuzz");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    let line = stdout
        .lines()
        .find(|l| l.contains("harness_bug:harness panic:injected harness panic"))
        .unwrap_or_else(|| panic!("the panic is not a finding:\n{stdout}"));
    // Many inputs panicked, and the campaign ran all of them.
    let hits: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no hit count: {line}"));
    assert!(hits >= 10, "{line}");
    let execs = execs_in(&stdout);
    assert!(execs >= 2000, "{execs} execs:\n{stdout}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--jobs 2`: two LibAFL clients under LibAFL's launcher, each writing its findings to the
/// shared directory and its buckets to `client-N.tsv`; the launching process merges them into
/// one summary. Each client's injected panics are one signature in the merged table, with the
/// hits of both.
#[test]
fn two_jobs_run_two_clients_and_merge_their_findings() {
    let dir = scratch("engine-jobs");
    let out = Command::new(env!("CARGO_BIN_EXE_tdxfuzz"))
        .args(["fuzz", "--jobs", "2", "--policy", "upstream"])
        .args([
            "--inject-harness-panic",
            "50",
            "--runs",
            "1500",
            "--seed",
            "1",
        ])
        .arg("--artifacts")
        .arg(&dir)
        .output()
        .expect("run tdxfuzz fuzz --jobs 2");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout.contains("over 2 of 2 clients"), "{stdout}");
    for id in [1, 2] {
        let f = dir.join("stack").join(format!("client-{id}.tsv"));
        assert!(f.exists(), "{} missing:\n{stdout}", f.display());
    }
    let panics: Vec<&str> = stdout
        .lines()
        .filter(|l| l.contains("injected harness panic"))
        .collect();
    assert_eq!(panics.len(), 1, "one merged signature:\n{stdout}");
    let execs = execs_in(&stdout);
    assert!(execs >= 3000, "both clients' runs: {execs}\n{stdout}");
    let _ = std::fs::remove_dir_all(&dir);
}
