//! TDCALLs a Linux guest never makes (issue 11 item 4): TDG.MEM.PAGE.ACCEPT at 2M, unaligned,
//! on the shared alias, beyond the GPA width. The module answers each as its source does
//! (`verify_page_info_input`, the private-GPA check, PAGE_SIZE_MISMATCH over KVM's 4K
//! mappings), KVM takes the EPT violation a 2M ACCEPT causes at 4K, and the run stays clean.
//! One row per case: the op, then the status the guest sees.

use harness::guest::Observation;
use harness::policy::Policy;
use harness::run::RunConfig;
use harness::scenario::text::{parse, print};
use harness::sched::TraceMode;
use harness::tdx_module::Code;
use oracle::check::run_scenario;

#[test]
fn odd_accepts_get_the_modules_answer() {
    let rows: [(&str, &str, Code); 7] = [
        (
            "2M over a region KVM maps at 4K: the EPT violation adds the 4K table, then PAGE_SIZE_MISMATCH",
            "accept 0x200 2m",
            Code::PageSizeMismatch,
        ),
        ("2M at an unaligned gfn", "accept 0x201 2m", Code::OperandInvalid),
        ("4K at an unaligned GPA", "accept_gpa 0x10123", Code::OperandInvalid),
        ("the shared alias", "accept_gpa 0x800000010000", Code::OperandInvalid),
        ("beyond the GPA width", "accept_gpa 0x1000000010000", Code::OperandInvalid),
        ("4K at an aligned private GPA, as accept does", "accept_gpa 0x10000", Code::Success),
        (
            "2M over a region already holding an accepted 4K page",
            "accept 0x400\n  accept 0x400 2m",
            Code::PageSizeMismatch,
        ),
    ];
    for (name, ops, want) in rows {
        let text = format!("vcpus 1\ntask vcpu0\n  {ops}\n");
        let sc = parse(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(parse(&print(&sc)).unwrap(), sc, "{name}: round trip");
        let rep = run_scenario(&sc, &RunConfig::new(Policy::UPSTREAM, TraceMode::Ring(32)));
        assert_eq!(rep.violation.map(|v| v.signature()), None, "{name}");
        let seen = rep.run.stack.kvm.st.borrow().vcpus[0].guest.seen.clone();
        let last = seen.last().map(|(_, o)| *o);
        let code = match last {
            Some(Observation::Accepted { code, .. } | Observation::AcceptedHuge { code, .. }) => {
                code
            }
            other => panic!("{name}: {other:?}"),
        };
        assert_eq!(code, want, "{name}");
    }
}
