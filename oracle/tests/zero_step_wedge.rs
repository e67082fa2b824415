//! The liveness oracle tolerates exactly one kind of stuck vCPU: one the TDX module keeps out by
//! design, because zero-step mitigation logged a page the guest has not accepted
//! (`liveness::wedged_by_zero_step`). Anything else that stops making progress is still a
//! violation, wedged vCPU or not.

use harness::policy::Policy;
use harness::run::RunConfig;
use harness::scenario::text::parse;
use harness::sched::TraceMode;
use oracle::check::{run_scenario, Report};

fn run(text: &str) -> Report {
    let sc = parse(text).expect("scenario");
    run_scenario(&sc, &RunConfig::new(Policy::UPSTREAM, TraceMode::Ring(32)))
}

#[test]
fn a_vcpu_wedged_on_a_page_it_never_accepted_is_not_a_violation() {
    let r = run("vcpus 1\ntask vcpu0\n  read 0x12\ntask vmm0\n  zero_step vcpu0 0x12\n");
    assert_eq!(r.violation.map(|v| v.signature()), None);
    assert_eq!(r.wedged.as_deref(), Some("vcpu0 on gfn:0x12"));
    // The module state behind it: the logged page is PENDING (KVM mapped it), so every entry
    // is an emulated EPT violation.
    assert!(oracle::liveness::wedged_by_zero_step(&r.run.stack.kvm, 0).is_some());
}

#[test]
fn another_vcpu_accepting_the_page_unwedges_it() {
    let r = run(
        "vcpus 2\ntask vcpu0\n  read 0x12\ntask vcpu1\n  accept 0x13\n  accept 0x12\n\
         task vmm0\n  zero_step vcpu0 0x12\n",
    );
    assert_eq!(r.violation.map(|v| v.signature()), None);
    assert_eq!(r.wedged, None);
    assert!(oracle::liveness::wedged_by_zero_step(&r.run.stack.kvm, 0).is_none());
}

#[test]
fn a_wedged_vcpu_does_not_excuse_another_that_hangs() {
    // vCPU 1 spins on a stale root after a fast zap (the upstream finding): still liveness.
    let r = run(
        "vcpus 2\ntask vcpu0\n  read 0x12\ntask vcpu1\n  accept 0x10\n\
         task vmm0\n  zero_step vcpu0 0x12\n  zap_all_fast\n  zap_all_fast\n",
    );
    let v = r.violation.expect("liveness");
    assert_eq!(v.kind.name(), "liveness");
    assert_eq!(r.wedged, None);
}

/// The upstream EPT-loop finding, as the known-findings corpus keeps it.
const FAST_ZAP_VS_EPT_LOOP: &str = include_str!("../../corpus/known/fast-zap-vs-ept-loop.tdx");

#[test]
fn without_zero_step_the_unaccepted_read_gets_its_ve() {
    let r = run("vcpus 1\ntask vcpu0\n  read 0x12\n");
    assert_eq!(r.violation.map(|v| v.signature()), None);
    assert_eq!(r.wedged, None);
}

/// A hang beside a wedged vCPU keeps the signature it has alone: the wedged vCPU spins by
/// design and is named in the detail, not in the key (found by a campaign, where the EPT-loop
/// finding next to a wedge looked like a new bug).
#[test]
fn a_hang_beside_a_wedged_vcpu_has_its_own_signature() {
    let alone = run(FAST_ZAP_VS_EPT_LOOP)
        .violation
        .expect("the fast-zap EPT-loop finding");
    // vCPU 1 is in its fault when the zap comes; vCPU 0 enters afterwards (on a fresh root)
    // and is wedged by zero-step on a page it never accepted.
    let r = run("vcpus 2
task vcpu0
  read 0x12
task vcpu1
  accept 0x10
task vmm0
  zap_all_fast
task vmm1
  zero_step vcpu0 0x12
schedule
  vcpu1 until kvm_tdp_mmu_page_fault
  vmm0 until blocked
");
    let v = r.violation.expect("vcpu1 still spins in the EPT loop");
    assert!(oracle::liveness::wedged_by_zero_step(&r.run.stack.kvm, 0).is_some());
    assert!(v.detail.contains("vcpu0 last at"), "{v}");
    assert_eq!(v.signature(), alone.signature());
}

/// A vCPU that spins inside KVM (the EPT-violation loop) is not excused as wedged just because
/// the module still has a zero-step log for it (`Vcpu::ept_retrying`). The hang
/// keeps the EPT-loop finding's signature, with the memslot update and the destroy stuck
/// behind it in the detail only (found by a 30-minute campaign).
#[test]
fn a_vcpu_spinning_in_kvm_is_not_excused_by_its_zero_step_log() {
    let text =
        include_str!("../../corpus/regressions/upstream--ept-loop-beside-a-zero-step-log.tdx");
    let alone = run(FAST_ZAP_VS_EPT_LOOP).violation.unwrap();
    // The verdict comes from the model's state, not from how much trace is kept: the same
    // under the campaign's short ring as under a full trace.
    let sc = parse(text).expect("scenario");
    for mode in [TraceMode::Ring(oracle::liveness::RECENT), TraceMode::Full] {
        let v = run_scenario(&sc, &RunConfig::new(Policy::UPSTREAM, mode))
            .violation
            .expect("the EPT-loop hang");
        assert_eq!(v.signature(), alone.signature(), "{mode:?}: {v}");
        assert!(v.detail.contains("synchronize_srcu"), "{v}");
    }
}
