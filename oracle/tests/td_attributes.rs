//! The TD's SEPT_VE_DISABLE attribute (issue 11 item 2): with it, a guest access to a page it
//! never accepted is an EPT-violation exit that `tdx_handle_ept_violation` answers with
//! `kvm_vm_dead` and -EIO (the guest killed its own VM: no violation, and the ioctls after it
//! answer -EIO as they must); without it the guest takes #VE and runs on. One row per case.

use harness::guest::Observation;
use harness::kvm::Errno;
use harness::policy::Policy;
use harness::run::RunConfig;
use harness::scenario::text::{parse, print};
use harness::sched::TraceMode;
use harness::vmm::ThreadEnd;
use oracle::check::run_scenario;

struct Row {
    name: &'static str,
    text: &'static str,
    killed: bool,
    vcpu0: ThreadEnd,
    ve: bool,
}

#[test]
fn sept_ve_disable_turns_an_unaccepted_access_into_a_dead_vm() {
    let rows = [
        Row {
            name: "#VE without the attribute",
            text: "vcpus 1\ntask vcpu0\n  read 0x12\n",
            killed: false,
            vcpu0: ThreadEnd::GuestDone,
            ve: true,
        },
        Row {
            name: "dead VM with it",
            text: "vcpus 1\nattributes sept_ve_disable\ntask vcpu0\n  read 0x12\n",
            killed: true,
            vcpu0: ThreadEnd::Error(Errno::EIO),
            ve: false,
        },
        Row {
            name: "accepted first: no exit either way",
            text: "vcpus 1\nattributes sept_ve_disable\ntask vcpu0\n  accept 0x12\n  read 0x12\n",
            killed: false,
            vcpu0: ThreadEnd::GuestDone,
            ve: false,
        },
        Row {
            name: "the VMM's ioctls after the death get -EIO, which is no violation",
            text: "vcpus 1\nattributes sept_ve_disable\ntask vcpu0\n  read 0x12\n\
                   task vmm0\n  convert 0x10 1 shared\n  punch_hole 0x11 1\n  destroy\n\
                   schedule\n  vcpu0 until blocked\n",
            killed: true,
            vcpu0: ThreadEnd::Error(Errno::EIO),
            ve: false,
        },
    ];
    for r in rows {
        let sc = parse(r.text).unwrap();
        assert_eq!(parse(&print(&sc)).unwrap(), sc, "{}: round trip", r.name);
        let rep = run_scenario(&sc, &RunConfig::new(Policy::UPSTREAM, TraceMode::Ring(32)));
        assert_eq!(
            rep.violation.as_ref().map(|v| v.signature()),
            None,
            "{}",
            r.name
        );
        let kvm = &rep.run.stack.kvm;
        assert_eq!(kvm.st.borrow().killed_by_guest, r.killed, "{}", r.name);
        assert_eq!(kvm.is_dead(), r.killed, "{}", r.name);
        assert_eq!(rep.run.thread_ends[0].get(), Some(r.vcpu0), "{}", r.name);
        let ve = kvm.st.borrow().vcpus[0]
            .guest
            .seen
            .iter()
            .any(|(_, o)| matches!(o, Observation::VirtualizationException { .. }));
        assert_eq!(ve, r.ve, "{}", r.name);
    }
}

/// The VMM runs a vCPU again after KVM_RUN fails (twice, `vmm::MAX_RUN_AFTER_ERROR`): on the
/// dead VM each KVM_RUN answers -EIO again, and the thread then stops with it.
#[test]
fn kvm_run_after_the_death_keeps_answering_eio() {
    let sc = parse("vcpus 1\nattributes sept_ve_disable\ntask vcpu0\n  read 0x12\n").unwrap();
    let rep = run_scenario(&sc, &RunConfig::new(Policy::UPSTREAM, TraceMode::Full));
    assert!(rep.violation.is_none());
    let trace = rep.run.stack.ex.render_trace();
    let eio = trace
        .lines()
        .filter(|l| l.contains("KVM_RUN error") && l.contains("0x5"))
        .count();
    assert_eq!(
        eio,
        1 + harness::vmm::MAX_RUN_AFTER_ERROR as usize,
        "{trace}"
    );
    assert_eq!(
        rep.run.thread_ends[0].get(),
        Some(ThreadEnd::Error(Errno::EIO))
    );
}
