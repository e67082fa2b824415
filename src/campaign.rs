//! The in-process campaign behind `tdxfuzz fuzz`: generate inputs, run the target, bucket
//! findings by signature, write one artifact per distinct finding, and show a live status line.
//! Inputs are random bytes from a seeded generator for now (coverage guidance comes with the
//! fuzzing-engine work), so a campaign with `--runs` is reproducible from its seed.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use crash_triage::Buckets;
use harness::sched::choice::SplitMix64;
use indicatif::{ProgressBar, ProgressStyle};
use oracle::Violation;

use harness::policy::Policy;

use crate::Target;

/// When a campaign ends.
#[derive(Clone, Copy, Debug)]
pub enum Stop {
    Seconds(u64),
    Runs(u64),
}

fn exec(target: Target, policy: Policy, data: &[u8]) -> Option<Violation> {
    match target {
        Target::Stack => oracle::targets::stack(policy, data),
        Target::TdxModule => {
            let bad = oracle::targets::tdx_module(data);
            (!bad.is_empty()).then(|| oracle::targets::module_violation(&bad))
        }
        Target::Scheduler => oracle::targets::scheduler(data),
    }
}

fn target_name(target: Target) -> &'static str {
    match target {
        Target::Stack => "stack",
        Target::TdxModule => "tdx_module",
        Target::Scheduler => "scheduler",
    }
}

/// Runs the campaign; returns the number of distinct findings.
pub fn run(
    target: Target,
    policy: Policy,
    stop: Stop,
    seed: u64,
    artifacts: &Path,
) -> Result<usize> {
    let dir = artifacts.join(target_name(target));
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let bar = ProgressBar::new_spinner();
    bar.set_style(ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {msg}",
    )?);
    bar.enable_steady_tick(Duration::from_millis(200));
    let mut rng = SplitMix64::new(seed);
    let mut buckets = Buckets::new();
    let start = Instant::now();
    let mut execs: u64 = 0;
    let mut buf = Vec::with_capacity(512);
    loop {
        let done = match stop {
            Stop::Runs(n) => execs >= n,
            Stop::Seconds(s) => {
                execs.is_multiple_of(256) && start.elapsed() >= Duration::from_secs(s)
            }
        };
        if done {
            break;
        }
        buf.clear();
        let len = rng.below(256) as usize;
        buf.extend((0..len).map(|_| rng.next_u64() as u8));
        execs += 1;
        if let Some(v) = exec(target, policy, &buf) {
            if buckets.add(&v, &buf) {
                let base = dir.join(v.signature_hash());
                fs::write(base.with_extension("bin"), &buf)?;
                fs::write(base.with_extension("txt"), v.to_string())?;
                bar.println(format!("new: {}", v.signature()));
            }
        }
        if execs.is_multiple_of(64) {
            let secs = start.elapsed().as_secs_f64().max(1e-9);
            bar.set_message(format!(
                "{} [{}] | execs {execs} ({:.0}/s) | distinct findings {}",
                target_name(target),
                policy.name,
                execs as f64 / secs,
                buckets.len()
            ));
        }
    }
    let secs = start.elapsed().as_secs_f64().max(1e-9);
    bar.finish_and_clear();
    println!(
        "{}: {execs} execs in {secs:.1}s ({:.0}/s), {} distinct finding(s)",
        target_name(target),
        execs as f64 / secs,
        buckets.len()
    );
    for (sig, b) in buckets.iter() {
        println!(
            "  {:>7} hits  {sig}  (smallest input {} bytes)",
            b.hits,
            b.smallest.len()
        );
        // Keep the smallest reproducer next to the first one.
        fs::write(
            dir.join(b.violation.signature_hash())
                .with_extension("min.bin"),
            &b.smallest,
        )?;
    }
    Ok(buckets.len())
}
