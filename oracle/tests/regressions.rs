//! Replays every scenario in corpus/regressions: `POLICY--name.tdx` runs under POLICY and must
//! give what its `expect` line says; every policy scenario must be clean under upstream; and
//! the same input gives the same trace, byte for byte.

use std::fs;
use std::path::{Path, PathBuf};

use harness::policy::Policy;
use harness::run::RunConfig;
use harness::scenario::{text::parse, Expect, Scenario};
use harness::sched::TraceMode;

fn files() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../corpus/regressions");
    let mut v: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "tdx"))
        .collect();
    v.sort();
    assert!(!v.is_empty());
    v
}

fn load(p: &Path) -> (Policy, Scenario) {
    let name = p.file_name().unwrap().to_string_lossy().into_owned();
    let policy = name.split("--").next().unwrap();
    let policy = Policy::by_name(policy).unwrap_or_else(|| panic!("{name}: unknown policy prefix"));
    let sc = parse(&fs::read_to_string(p).unwrap()).unwrap_or_else(|e| panic!("{name}: {e}"));
    (policy, sc)
}

fn kind_under(sc: &Scenario, p: Policy) -> Option<String> {
    oracle::check::run_scenario(sc, &RunConfig::new(p, TraceMode::Ring(32)))
        .violation
        .map(|v| v.kind.name().to_string())
}

#[test]
fn every_regression_gives_its_expected_result() {
    for f in files() {
        let (policy, sc) = load(&f);
        let got = kind_under(&sc, policy);
        match &sc.expect {
            Expect::Clean => assert_eq!(got, None, "{}", f.display()),
            Expect::Violation(k) => assert_eq!(got.as_deref(), Some(k.as_str()), "{}", f.display()),
            Expect::None => panic!("{}: regression scenarios need an expect line", f.display()),
        }
        // A variant's evidence of breakage is clean on upstream; a fix's evidence of being
        // clean (`expect clean` under a non-upstream policy) is the reproducer of an upstream
        // finding, which upstream fails.
        if policy.name != "upstream" && sc.expect != Expect::Clean {
            assert_eq!(
                kind_under(&sc, Policy::UPSTREAM),
                None,
                "{} under upstream",
                f.display()
            );
        }
    }
}

#[test]
fn every_policy_with_an_expected_break_has_a_regression() {
    let names: Vec<String> = files()
        .iter()
        .map(|f| {
            f.file_name()
                .unwrap()
                .to_string_lossy()
                .split("--")
                .next()
                .unwrap()
                .to_string()
        })
        .collect();
    for (p, expect) in Policy::ALL {
        if expect != "none" {
            assert!(
                names.iter().any(|n| n == p.name),
                "no regression scenario for {}",
                p.name
            );
        }
    }
}

#[test]
fn identical_input_gives_identical_traces() {
    for f in files() {
        let (policy, sc) = load(&f);
        let run = |_| {
            let r = oracle::check::run_scenario(&sc, &RunConfig::new(policy, TraceMode::Full));
            let out = (r.run.stack.ex.render_trace(), r.run.stack.ex.trace().hash());
            out
        };
        let (a, ha) = run(0);
        let (b, hb) = run(1);
        assert_eq!(ha, hb, "{}", f.display());
        assert!(a == b, "{}: traces differ", f.display());
    }
}

/// A run that starts from a snapshot of its built TD (`harness::snapshot`) is the run of a
/// fresh build: the same trace, verdict and feedback-map hits, for every regression and for
/// random fuzzing inputs, whether the build was cached just now or long before, or only its
/// first half was.
#[test]
fn a_run_from_a_snapshot_is_the_run_of_a_fresh_build() {
    use harness::coverage;
    let mut inputs: Vec<(String, Policy, Scenario, RunConfig)> = files()
        .iter()
        .map(|f| {
            let (policy, sc) = load(f);
            let cfg = RunConfig::new(policy, TraceMode::Full);
            (f.display().to_string(), policy, sc, cfg)
        })
        .collect();
    for seed in 0u64..300 {
        let mut rng = harness::sched::choice::SplitMix64::new(seed);
        let data: Vec<u8> = (0..40 + seed % 200).map(|_| rng.next_u64() as u8).collect();
        let policy = Policy::ALL[seed as usize % Policy::ALL.len()].0;
        let sc = harness::scenario::decode::decode(&data);
        let cfg = RunConfig::for_fuzzing(policy, TraceMode::Ring(64));
        inputs.push((format!("random input {seed}"), policy, sc, cfg));
    }
    let observe = |sc: &Scenario, cfg: &RunConfig| {
        let r = oracle::check::run_scenario(sc, cfg);
        let mut hits = Vec::new();
        coverage::take(|i| hits.push(i));
        hits.sort_unstable();
        let ex = &r.run.stack.ex;
        let v = r.violation.map(|v| v.key);
        let hash = ex.trace().hash();
        (hash, ex.steps(), ex.render_trace(), v, hits)
    };
    coverage::enable(true);
    let mut forked = 0;
    for (name, _, sc, cfg) in &inputs {
        harness::snapshot::enable(false);
        let fresh = observe(sc, cfg);
        harness::snapshot::enable(true);
        let first = observe(sc, cfg);
        let again = observe(sc, cfg);
        harness::snapshot::forget_complete_builds();
        let finished = observe(sc, cfg);
        let finished_again = observe(sc, cfg);
        assert!(
            fresh == first,
            "{name}: the run that cached its build differs"
        );
        assert!(fresh == again, "{name}: the run from the snapshot differs");
        assert!(
            fresh == finished,
            "{name}: the run that finished a cached first half differs"
        );
        assert!(
            fresh == finished_again,
            "{name}: the run from a build finished from a first half differs"
        );
        forked += usize::from(!sc.td.build_ops);
    }
    coverage::enable(false);
    assert!(forked > 100, "only {forked} inputs ran from a snapshot");
}

/// A livelock proven by a repeated state (`oracle::livelock`) is the soft lockup the watchdog
/// reports 2,000 iterations later, under the same signature: for every regression and for
/// random fuzzing inputs under every policy, the verdict's key is the same with the proof on
/// and off, and the proof, where it fires, fires sooner.
#[test]
fn a_proven_livelock_is_the_watchdogs_soft_lockup_sooner() {
    let mut inputs: Vec<(String, Policy, Scenario, RunConfig)> = Vec::new();
    for f in files() {
        let (own, sc) = load(&f);
        for policy in [
            own,
            Policy::UPSTREAM,
            Policy::by_name("sept_off_to_side").unwrap(),
        ] {
            let cfg = RunConfig::new(policy, TraceMode::Ring(8));
            inputs.push((f.display().to_string(), policy, sc.clone(), cfg));
        }
    }
    for seed in 0u64..400 {
        let mut rng = harness::sched::choice::SplitMix64::new(seed ^ 0x11fe);
        let data: Vec<u8> = (0..40 + seed % 200).map(|_| rng.next_u64() as u8).collect();
        let policy = Policy::ALL[seed as usize % Policy::ALL.len()].0;
        let sc = harness::scenario::decode::decode(&data);
        let cfg = RunConfig::for_fuzzing(policy, TraceMode::Ring(8));
        inputs.push((format!("random input {seed}"), policy, sc, cfg));
    }
    let verdict = |sc: &Scenario, cfg: &RunConfig, proof: bool| {
        oracle::livelock::enable(proof);
        let r = oracle::check::run_scenario(sc, cfg);
        oracle::livelock::enable(true);
        let steps = r.run.stack.ex.steps();
        (r.violation, steps)
    };
    let mut proven = 0;
    for (name, policy, sc, cfg) in &inputs {
        let (with, steps_with) = verdict(sc, cfg, true);
        let (without, steps_without) = verdict(sc, cfg, false);
        let key = |v: &Option<oracle::Violation>| v.as_ref().map(|v| v.key.clone());
        assert_eq!(key(&with), key(&without), "{name} under {}", policy.name);
        if with
            .as_ref()
            .is_some_and(|v| v.detail.starts_with("livelock:"))
        {
            proven += 1;
            assert!(steps_with < steps_without, "{name}: no sooner");
        }
    }
    // The liveness regressions of the retry-loop policies and the fast-zap finding.
    assert!(proven >= 5, "only {proven} spins were proven livelocks");
}

/// The evidence scenarios that inject a kernel bug (`upstream--injected-*`) fire only because of
/// it: without the injection ops the same scenario is clean.
#[test]
fn injected_bugs_are_what_the_oracle_sees() {
    use harness::scenario::TaskOps;
    let mut seen = 0;
    for f in files() {
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        if !name.starts_with("upstream--injected-") {
            continue;
        }
        let (_, mut sc) = load(&f);
        let before = kind_under(&sc, Policy::UPSTREAM);
        assert!(before.is_some(), "{name} must fire with its injection");
        for t in &mut sc.tasks {
            if let TaskOps::Vmm(ops) = &mut t.ops {
                ops.retain(|op| !op.is_injected_kernel_bug());
            }
        }
        assert_eq!(
            kind_under(&sc, Policy::UPSTREAM),
            None,
            "{name} without injection"
        );
        seen += 1;
    }
    assert!(
        seen >= 3,
        "the guest_memory, state_machine and page_ownership evidence files"
    );
}
