//! The MMU notifier on the VMM's memory (issue 11 item 1, `dontneed`): madvise(MADV_DONTNEED)
//! of guest RAM zaps the shared mappings and frees the pages, so the guest's next shared read
//! faults a fresh zeroed page in; racing the guest's shared faults at every point of the
//! invalidation stays clean (the fault retries on `mmu_invalidate_seq`).

use harness::guest::Observation;
use harness::kvm::MemEvent;
use harness::policy::Policy;
use harness::run::RunConfig;
use harness::scenario::text::{parse, print};
use harness::sched::TraceMode;
use oracle::check::run_scenario;

fn text(steps: u32) -> String {
    format!(
        "vcpus 1\ntask vcpu0\n  write 0x11 0x7 shared\n  read 0x11 shared\n  read 0x11 shared\n\
         task vmm0\n  dontneed 0x11 1\nschedule\n  vcpu0 steps {steps}\n  vmm0 until blocked\n"
    )
}

/// Over every point of vCPU 0's program the VMM can drop the page at: a shared read sees 0 (a
/// fresh page) when the drop came between the guest's write of 7 and the read, else 7; the
/// run is clean, and both cases happen.
#[test]
fn dontneed_drops_the_vmms_page_and_later_reads_see_zero() {
    let (mut before, mut after) = (0, 0);
    for steps in 0..80 {
        let sc = parse(&text(steps)).unwrap();
        assert_eq!(parse(&print(&sc)).unwrap(), sc);
        let rep = run_scenario(&sc, &RunConfig::new(Policy::UPSTREAM, TraceMode::Ring(32)));
        assert_eq!(
            rep.violation.map(|v| v.signature()),
            None,
            "vcpu0 first for {steps} steps"
        );
        let st = rep.run.stack.kvm.st.borrow();
        let dropped = st
            .mem_log
            .iter()
            .find(|(_, e)| matches!(e, MemEvent::SharedDropped { .. }))
            .map(|(s, _)| *s)
            .expect("the notifier ran");
        let seen = &st.vcpus[0].guest.seen;
        let wrote = seen
            .iter()
            .find(|(_, o)| matches!(o, Observation::Wrote { .. }))
            .map(|(s, _)| *s)
            .expect("the write");
        for (step, o) in seen {
            if let Observation::Read { value, .. } = o {
                // Dropped between the write and the read: a fresh zeroed page.
                let lost = wrote < dropped && dropped <= *step;
                assert_eq!(*value, if lost { 0 } else { 7 }, "{steps}: read at {step}");
                if lost {
                    after += 1;
                } else {
                    before += 1;
                }
            }
        }
    }
    assert!(
        before > 0 && after > 0,
        "{before} reads before, {after} after"
    );
}
