//! A build ioctl that fails part way (issue 11 item 1, "vCPU create that fails part way"):
//! `alloc_fail 1 after K` lets K host page allocations succeed and fails the next, so every
//! allocation of KVM_TDX_INIT_VM (TDR, then each TDCS page) and KVM_TDX_INIT_VCPU (TDVPR, then
//! each TDCX page) is failed in turn. Upstream answers -ENOMEM, frees what it took (no
//! SEAMCALL has run yet), and the retried ioctl builds the TD: the run, teardown included,
//! stays clean and the VM was never bugged.

use harness::kvm::Errno;
use harness::policy::Policy;
use harness::run::RunConfig;
use harness::scenario::text::{parse, print};
use harness::scenario::VmmOp;
use harness::sched::TraceMode;
use oracle::check::run_scenario;

/// (the ioctl that fails, the build around it with `{fail}` before that ioctl, its allocations)
const ROWS: &[(VmmOp, &str, u8)] = &[
    (
        VmmOp::InitVm,
        "  {fail}\n  init_vm\n  init_vm\n  create_slot\n  create_vcpu\n  init_vcpu vcpu0\n",
        // TDR + TDCS pages.
        5,
    ),
    (
        VmmOp::InitVcpu { vcpu: 0 },
        "  init_vm\n  create_slot\n  create_vcpu\n  {fail}\n  init_vcpu vcpu0\n  init_vcpu vcpu0\n",
        // TDVPR + TDCX pages.
        6,
    ),
];

#[test]
fn a_build_ioctl_failing_at_each_allocation_frees_what_it_took() {
    for &(op, build, pages) in ROWS {
        for k in 0..pages {
            let case = format!("{op:?} with allocation {k} failing");
            let vmm = build.replace("{fail}", &format!("alloc_fail 1 after {k}"));
            let text = format!(
                "vcpus 1\nbuild ops\ntask vcpu0\n  accept 0x10\n  write 0x10 0x2\ntask vmm0\n\
                 {vmm}  finalize\n  destroy\nexpect clean\n"
            );
            let sc = parse(&text).unwrap_or_else(|e| panic!("{case}: {e}"));
            assert_eq!(parse(&print(&sc)).unwrap(), sc, "{case}: round trip");
            let rep = run_scenario(&sc, &RunConfig::new(Policy::UPSTREAM, TraceMode::Full));
            assert_eq!(rep.violation.map(|v| v.signature()), None, "{case}");
            let errors = rep.run.vmm_errors.borrow().clone();
            assert_eq!(errors.len(), 1, "{case}: {errors:?}");
            assert_eq!(
                (errors[0].op, errors[0].errno),
                (op, Errno::ENOMEM),
                "{case}"
            );
            let st = rep.run.stack.kvm.st.borrow();
            assert!(st.bugs.is_empty(), "{case}: {:?}", st.bugs);
        }
    }
}
