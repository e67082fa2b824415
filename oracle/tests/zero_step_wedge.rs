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
    let alone =
        run("vcpus 1\ntask vcpu0\n  accept 0x10\ntask vmm0\n  zap_all_fast\n  zap_all_fast\n")
            .violation
            .expect("the fast-zap EPT-loop finding");
    let r = run("vcpus 2
init 0x12 0x47
init 0x201 0x86
task vcpu0
  write 0x10 0x60
  map_gpa 0x12 1 shared
  write 0x12 0x9a shared
task vcpu1
  write 0x11 0xfb
task vmm0
  zap_all_fast
  zap_all_fast
  destroy
task vmm1
  zero_step vcpu0 0x10
schedule bytes 36413afa7ddc84658cde5d70a1b880e3f8b151b8
");
    let v = r.violation.expect("vcpu1 still spins in the EPT loop");
    assert!(oracle::liveness::wedged_by_zero_step(&r.run.stack.kvm, 0).is_some());
    assert!(v.detail.contains("vcpu0 last at loop in vcpu_run"), "{v}");
    assert_eq!(v.signature(), alone.signature());
}
