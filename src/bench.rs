//! Throughput benchmarks. Wall-clock time is measured here, outside the runs, never inside.

use std::time::Instant;

use harness::sched::choice::SplitMix64;
use harness::sched::workload::lock_heavy;
use harness::sched::{Chooser, Executor, InputChooser, Outcome, Pct, RoundRobin, TraceMode};

fn one(label: &str, rounds: u32, chooser: &mut dyn Chooser) {
    let mut ex = Executor::new(TraceMode::Ring(64));
    lock_heavy().spawn(&mut ex, rounds);
    let mut switches: u64 = 0;
    let mut last = None;
    let t = Instant::now();
    let out = ex.run(chooser, u64::MAX, &mut |s| {
        if last != Some(s.task) {
            switches += 1;
            last = Some(s.task);
        }
        true
    });
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(out, Outcome::AllDone, "the benchmark workload must finish");
    let steps = ex.steps();
    println!(
        "{label:<14} {steps:>12} {switches:>12} {secs:>8.3} {:>10.2}M {:>10.2}M",
        steps as f64 / secs / 1e6,
        switches as f64 / secs / 1e6,
    );
}

/// `tdxfuzz bench --scheduler`: yield points per second for 4 tasks over SRCU, an rwlock and a
/// mutex, under three choosers.
pub fn scheduler(rounds: u32) {
    println!("scheduler: 4 tasks x {rounds} rounds of lock_heavy (srcu + mmu_lock rw + mutex)");
    println!(
        "{:<14} {:>12} {:>12} {:>8} {:>11} {:>11}",
        "chooser", "yield points", "switches", "seconds", "points/s", "switches/s"
    );
    one("round-robin", rounds, &mut RoundRobin::new());
    let mut rng = SplitMix64::new(1);
    let bytes: Vec<u8> = (0..1 << 20).map(|_| rng.next_u64() as u8).collect();
    one("input-bytes", rounds, &mut InputChooser::new(&bytes));
    one("pct(d=3)", rounds, &mut Pct::new(7, 3, 1_000_000));
}

/// `tdxfuzz bench --stack`: whole-stack executions per second (decode, build the TD, run the
/// scenario, check) over random inputs, and the scheduler steps they took.
pub fn stack() {
    let mut rng = SplitMix64::new(11);
    let n = 300;
    let mut steps: u64 = 0;
    let mut found = 0;
    let t = Instant::now();
    for _ in 0..n {
        let len = 32 + rng.below(200) as usize;
        let data: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
        let sc = harness::scenario::decode::decode(&data);
        let cfg = harness::run::RunConfig::new(
            harness::policy::Policy::UPSTREAM,
            TraceMode::Ring(oracle::liveness::RECENT),
        );
        let r = oracle::check::run_scenario(&sc, &cfg);
        steps += r.run.stack.ex.steps();
        found += usize::from(r.violation.is_some());
    }
    let secs = t.elapsed().as_secs_f64();
    println!("stack: {n} random scenarios on upstream in {secs:.2}s");
    println!(
        "  {:.0} execs/s, {:.0} steps/exec, {:.2}M steps/s, {found} with a violation",
        n as f64 / secs,
        steps as f64 / n as f64,
        steps as f64 / secs / 1e6
    );
}
