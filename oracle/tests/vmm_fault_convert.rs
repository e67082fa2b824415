//! A VMM that converts more than a KVM_EXIT_MEMORY_FAULT asks for (issue 11 item 5,
//! `vmm fault_convert N`): the guest's shared access to one page converts the whole aligned
//! block, zapping a private page it had accepted next door; its next private access faults
//! back, and the page is PENDING again (#VE, not the old data). The run stays clean either way:
//! the guest lost data to its VMM, the host lost nothing. One row per block size.

use harness::guest::Observation;
use harness::policy::Policy;
use harness::run::RunConfig;
use harness::scenario::text::{parse, print};
use harness::sched::TraceMode;
use oracle::check::run_scenario;

#[test]
fn a_wider_conversion_takes_the_neighbours_page() {
    for (block, keeps) in [(1, true), (4, false), (512, false)] {
        let vmm = if block == 1 {
            String::new()
        } else {
            format!("vmm fault_convert {block}\n")
        };
        let text = format!(
            "vcpus 1\n{vmm}task vcpu0\n  accept 0x10\n  write 0x10 0x5\n  read 0x11 shared\n  read 0x10\n"
        );
        let sc = parse(&text).unwrap();
        assert_eq!(parse(&print(&sc)).unwrap(), sc, "{block}: round trip");
        let rep = run_scenario(&sc, &RunConfig::new(Policy::UPSTREAM, TraceMode::Ring(32)));
        assert_eq!(rep.violation.map(|v| v.signature()), None, "{block}");
        let seen = rep.run.stack.kvm.st.borrow().vcpus[0].guest.seen.clone();
        let last = seen.last().map(|(_, o)| *o).expect("observations");
        if keeps {
            assert!(
                matches!(last, Observation::Read { value: 5, .. }),
                "{block}: {last:?}"
            );
        } else {
            assert!(
                matches!(last, Observation::VirtualizationException { .. }),
                "{block}: {last:?}"
            );
        }
    }
}
