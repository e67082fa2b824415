//! The soft-lockup watchdog (issue 11 item 6): a host task that spins in a kernel retry loop
//! past `liveness::SOFT_LOCKUP_RETRIES` iterations is reported even when the loop would end
//! later. Evidence: the fast-zap spin in tdx_handle_ept_violation, ended by a late signal.

use harness::policy::Policy;
use harness::run::{prepare, RunConfig};
use harness::scenario::text::parse;
use harness::sched::{Outcome, TraceMode};
use oracle::liveness::SOFT_LOCKUP_RETRIES;
use oracle::ViolationKind;

const FILE: &str = "upstream--finding-fast-zap-vs-ept-loop-signalled-late.tdx";

/// Runs `sc` without the oracle; returns the run and the most iterations any retry loop
/// reached.
fn run_watching_retries(
    sc: &harness::scenario::Scenario,
    cfg: &RunConfig,
) -> (harness::run::Run, u32) {
    let mut run = prepare(sc, cfg);
    let cx = run.stack.cx.clone();
    let mut longest = 0;
    run.execute(&mut |_| {
        let now = cx.retrying().iter().map(|(_, _, n)| *n).max().unwrap_or(0);
        longest = longest.max(now);
        true
    });
    (run, longest)
}

fn scenario() -> harness::scenario::Scenario {
    let path = format!(
        "{}/../corpus/regressions/{FILE}",
        env!("CARGO_MANIFEST_DIR")
    );
    parse(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn the_watchdog_reports_a_spin_that_a_late_signal_would_end() {
    let sc = scenario();
    let cfg = RunConfig::new(Policy::UPSTREAM, TraceMode::Ring(32));
    // Without the oracle the run finishes: the signal ends the loop, the guest completes.
    let (run, longest) = run_watching_retries(&sc, &cfg);
    assert_eq!(run.outcome, Outcome::AllDone);
    assert!(longest > SOFT_LOCKUP_RETRIES, "spun {longest} times");
    // With it, the spin is a liveness violation named after the loop.
    let rep = oracle::check::run_scenario(&sc, &cfg);
    let v = rep.violation.expect("soft lockup");
    assert_eq!(v.kind, ViolationKind::Liveness);
    assert_eq!(v.key, "soft-lockup:loop in tdx_handle_ept_violation");
    assert_eq!(v.location, "tdx_handle_ept_violation");
}

/// Legitimate retries stay far below the bound: the upstream regression scenarios that end
/// clean never come near it.
#[test]
fn clean_upstream_runs_retry_a_handful_of_times() {
    let dir = format!("{}/../corpus/regressions", env!("CARGO_MANIFEST_DIR"));
    let mut seen = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let text = std::fs::read_to_string(&p).unwrap();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if !name.starts_with("upstream--") || !text.contains("expect clean") {
            continue;
        }
        let sc = parse(&text).unwrap();
        let cfg = RunConfig::new(Policy::UPSTREAM, TraceMode::Ring(8));
        let (_, longest) = run_watching_retries(&sc, &cfg);
        assert!(longest < SOFT_LOCKUP_RETRIES / 10, "{name}: {longest}");
        seen += 1;
    }
    assert!(seen >= 3);
}
