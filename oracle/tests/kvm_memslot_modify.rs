//! KVM_SET_USER_MEMORY_REGION2 on guest_memfd slots (issue 11 item 1): a request for an
//! existing slot id is a modify (nothing to change, a flags-only change or a move), and
//! `kvm_set_memory_region` refuses every modify of a guest_memfd slot with -EINVAL ("private
//! memslots are immutable, they can only be deleted"); KVM_MEM_LOG_DIRTY_PAGES on one is
//! -EINVAL from `check_memory_region_flags`; an overlap with another slot is -EEXIST. One row
//! per request, after slot 0 is replaced by slot 1 over the first 2M.

use harness::kvm::Errno;
use harness::policy::Policy;
use harness::run::RunConfig;
use harness::scenario::text::{parse, print};
use harness::sched::TraceMode;
use oracle::check::run_scenario;

#[test]
fn modifying_a_guest_memfd_slot_is_refused() {
    let rows: [(&str, &str, Option<Errno>); 6] = [
        (
            "the same request again",
            "create_slot 1 0x0 512 0x0",
            Some(Errno::EINVAL),
        ),
        (
            "a move of slot 1",
            "create_slot 1 0x200 512 0x0",
            Some(Errno::EINVAL),
        ),
        (
            "a flags-only change (dirty logging)",
            "create_slot 1 0x0 512 0x0 dirty_log",
            Some(Errno::EINVAL),
        ),
        (
            "another id over slot 1",
            "create_slot 2 0x0 512 0x0",
            Some(Errno::EEXIST),
        ),
        (
            "a new slot with dirty logging",
            "create_slot 2 0x200 512 0x200 dirty_log",
            Some(Errno::EINVAL),
        ),
        (
            "a new slot beside it",
            "create_slot 2 0x200 512 0x200",
            None,
        ),
    ];
    for (name, op, want) in rows {
        let text =
            format!("vcpus 1\ntask vmm0\n  delete_slot 0x0\n  create_slot 1 0x0 512 0x0\n  {op}\n");
        let sc = parse(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(parse(&print(&sc)).unwrap(), sc, "{name}: round trip");
        let rep = run_scenario(&sc, &RunConfig::new(Policy::UPSTREAM, TraceMode::Ring(32)));
        assert_eq!(rep.violation.map(|v| v.signature()), None, "{name}");
        let want: Vec<Errno> = want.into_iter().collect();
        assert_eq!(rep.run.vmm_errnos(), want, "{name}");
    }
}
