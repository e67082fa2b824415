//! Whole-run checks that fuzz targets, the campaign and tests share: each takes raw bytes,
//! runs the model, and returns the first violation (bytes -> scenario -> run -> oracle).

use harness::sched::workload::LockProgram;
use harness::sched::{Executor, InputChooser, TraceMode};

use crate::liveness::check_outcome;
use crate::Violation;

/// Step budget of one lock-program run; programs are at most 4 x 28 ops x 3 rounds.
const LOCK_PROGRAM_STEPS: u64 = 20_000;

/// The scheduler self-test: the first byte says how many following bytes encode the lock
/// program, the rest are schedule choices. A deadlock or an exhausted budget is a liveness
/// violation; a run that differs from its replay is a harness bug and panics.
pub fn scheduler(data: &[u8]) -> Option<Violation> {
    let split = data
        .first()
        .map_or(0, |b| usize::from(*b))
        .min(data.len().saturating_sub(1));
    let (program, schedule) = data.get(1..).unwrap_or(&[]).split_at(split);
    let program = LockProgram::decode(program);
    let run = || {
        let mut ex = Executor::new(TraceMode::Ring(crate::liveness::RECENT));
        program.spawn(&mut ex, 3);
        let out = ex.run(
            &mut InputChooser::new(schedule),
            LOCK_PROGRAM_STEPS,
            &mut |_| true,
        );
        let v = check_outcome(&out, &ex, "lock_program");
        let hash = ex.trace().hash();
        (v, hash)
    };
    let (v, hash) = run();
    let (v2, hash2) = run();
    assert_eq!(
        (hash, &v),
        (hash2, &v2),
        "replay of the same input diverged"
    );
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_bytes_run_to_a_verdict() {
        let mut found = 0;
        for seed in 0u64..400 {
            let mut rng = harness::sched::choice::SplitMix64::new(seed);
            let data: Vec<u8> = (0..(seed % 64) as usize)
                .map(|_| rng.next_u64() as u8)
                .collect();
            if let Some(v) = scheduler(&data) {
                assert_eq!(v.kind, crate::ViolationKind::Liveness);
                found += 1;
            }
        }
        assert!(found > 0, "random lock programs include deadlocks");
    }
}

/// The TDX module on its own: arbitrary SEAMCALL/TDCALL programs (two host threads, two vCPUs)
/// under fuzzed interleavings, then the upstream teardown. Returns every broken module invariant
/// (after the program, after teardown), every failed teardown step, and every page not back in
/// the allocator; empty means the module model held up.
pub fn tdx_module(data: &[u8]) -> Vec<String> {
    use harness::tdx_module::drive::{run, teardown, ModuleProgram};
    let (program, schedule) = ModuleProgram::decode(data);
    let mut r = run(&program, schedule);
    let mut bad = Vec::new();
    if r.outcome != harness::sched::Outcome::AllDone {
        bad.push(format!(
            "module calls never block, yet the run ended {:?}",
            r.outcome
        ));
        return bad;
    }
    bad.extend(crate::module_invariants::check(
        &r.m.state(),
        &r.m.host().borrow(),
    ));
    bad.extend(
        teardown(&mut r)
            .into_iter()
            .map(|f| format!("teardown: {f}")),
    );
    bad.extend(crate::module_invariants::check(
        &r.m.state(),
        &r.m.host().borrow(),
    ));
    for (p, e) in r.m.host().borrow().ledger.unaccounted() {
        bad.push(format!("{p} not returned after teardown: {e:?}"));
    }
    bad
}

#[cfg(test)]
mod module_tests {
    #[test]
    fn random_module_programs_hold_up() {
        for seed in 0u64..300 {
            let mut rng = harness::sched::choice::SplitMix64::new(seed);
            let len = (seed % 200) as usize;
            let mut data: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
            if let Some(b) = data.first_mut() {
                *b = b.saturating_add(64);
            }
            let bad = super::tdx_module(&data);
            assert!(bad.is_empty(), "seed {seed}: {bad:#?}");
        }
    }
}

/// A module-target finding as a violation (for the campaign's buckets).
pub fn module_violation(bad: &[String]) -> Violation {
    Violation {
        kind: crate::ViolationKind::StateMachine,
        location: "TDX module invariants",
        key: crate::check::stable(&bad[0]),
        detail: bad.join("; "),
        step: 0,
        tasks: Vec::new(),
        recent: Vec::new(),
    }
}

/// The whole stack: bytes -> scenario -> run under `policy` -> first violation.
pub fn stack(policy: harness::policy::Policy, data: &[u8]) -> Option<Violation> {
    stack_with_bug(policy, None, data)
}

/// `stack` with a kernel bug switched on for every run.
pub fn stack_with_bug(
    policy: harness::policy::Policy,
    kernel_bug: Option<harness::kvm::KernelBug>,
    data: &[u8],
) -> Option<Violation> {
    let sc = harness::scenario::decode::decode(data);
    let mut cfg =
        harness::run::RunConfig::for_fuzzing(policy, TraceMode::Ring(crate::liveness::RECENT));
    cfg.kernel_bug = kernel_bug;
    crate::check::run_scenario(&sc, &cfg).violation
}

/// Findings already understood and reported (see corpus/regressions/upstream--finding-*.tdx and
/// README): the libFuzzer target does not stop on them, so it keeps looking for new ones.
pub fn is_known(sc: &harness::scenario::Scenario, v: &Violation) -> bool {
    use harness::scenario::{TaskOps, VmmOp};
    let fast_zap = sc.tasks.iter().any(|t| match &t.ops {
        TaskOps::Vmm(ops) => ops.contains(&VmmOp::ZapAllFast),
        TaskOps::Guest(_) => false,
    });
    // upstream--finding-fast-zap-vs-ept-loop: the EPT-violation retry loop spins on a stale
    // direct root after kvm_mmu_zap_all_fast. (The prefault loop's twin is fixed in 7.3.)
    let ept_loop = fast_zap
        && v.kind == crate::ViolationKind::Liveness
        && v.key.contains("tdx_handle_ept_violation");
    // upstream--finding-vm-dead-vs-prefault: KVM_PRE_FAULT_MEMORY passed the vm_dead check
    // before the VM died and trips WARN_ON_ONCE(r == -EIO) in kvm_vcpu_pre_fault_memory.
    let prefault_warn = v.signature() == "must_not_fail:kvm_vcpu_pre_fault_memory:* -EIO";
    // upstream--finding-finalize-without-vcpus: TDH.MR.FINALIZE's TDX_NO_VCPUS hits
    // TDX_BUG_ON in tdx_td_finalize.
    let no_vcpus = v.signature() == "must_not_fail:tdx_td_finalize:TDH.MR.FINALIZE: TDX_NO_VCPUS *";
    // upstream--finding-finalize-vs-punch-hole(-busy): a zap under mmu_lock interleaves with
    // KVM_TDX_FINALIZE_VM, which does not hold it: REMOVE wants TLB tracking that tdx_track
    // skipped, or BLOCK/REMOVE find the TDR held exclusively (RDX) even after the kick.
    let finalize = sc.tasks.iter().any(|t| match &t.ops {
        TaskOps::Vmm(ops) => ops.contains(&VmmOp::Finalize),
        TaskOps::Guest(_) => false,
    });
    let zap_vs_finalize = finalize
        && v.kind == crate::ViolationKind::MustNotFail
        && v.location == "tdx_sept_remove_leaf_spte"
        && (v.key.contains("TDX_TLB_TRACKING_NOT_DONE") || v.key.contains("TDX_OPERAND_BUSY|RDX"));
    ept_loop || prefault_warn || no_vcpus || zap_vs_finalize
}

/// `stack` without the known findings (for the libFuzzer target).
pub fn stack_new_findings(policy: harness::policy::Policy, data: &[u8]) -> Option<Violation> {
    let sc = harness::scenario::decode::decode(data);
    let cfg =
        harness::run::RunConfig::for_fuzzing(policy, TraceMode::Ring(crate::liveness::RECENT));
    crate::check::run_scenario(&sc, &cfg)
        .violation
        .filter(|v| !is_known(&sc, v))
}

#[cfg(test)]
mod known_tests {
    use harness::policy::Policy;
    use harness::run::RunConfig;
    use harness::scenario::text::parse;
    use harness::sched::TraceMode;

    /// Every input in corpus/known is a finding `is_known` recognises, so the libFuzzer target
    /// does not stop on it; a violation of another kind on the same input is not.
    #[test]
    fn the_known_corpus_is_known_to_the_libfuzzer_target() {
        let files = [
            include_str!("../../corpus/known/fast-zap-vs-ept-loop.tdx"),
            include_str!("../../corpus/known/vm-dead-vs-prefault.tdx"),
        ];
        for text in files {
            let sc = parse(text).unwrap();
            let cfg = RunConfig::new(Policy::UPSTREAM, TraceMode::Ring(8));
            let v = crate::check::run_scenario(&sc, &cfg).violation.unwrap();
            assert!(super::is_known(&sc, &v), "{}", v.signature());
            let other = crate::Violation {
                kind: crate::ViolationKind::GuestMemory,
                ..v
            };
            assert!(!super::is_known(&sc, &other));
        }
    }
}
