//! fallocate(KEEP_SIZE) on guest_memfd (`allocate`, issue 11 item 1): pages enter the page
//! cache not uptodate, a later fault or punch uses or frees them, and every errno is
//! upstream's (`kvm_gmem_fallocate` / `kvm_gmem_allocate`). One row per case.

use harness::kvm::Errno;
use harness::policy::Policy;
use harness::run::RunConfig;
use harness::scenario::text::{parse, print};
use harness::sched::TraceMode;
use oracle::check::run_scenario;

#[test]
fn allocate_answers_upstreams_errnos_and_leaks_nothing() {
    let rows: [(&str, &str, &str, &[Errno]); 5] = [
        (
            "allocate, then the guest uses the page: it reads zero",
            "  allocate 0x10 2\n",
            "  accept 0x10\n  read 0x10\n  write 0x11 0x3 shared\n",
            &[],
        ),
        (
            "allocate, then punch: the pages go back",
            "  allocate 0x10 4\n  punch_hole 0x10 4\n",
            "",
            &[],
        ),
        (
            "allocate twice over the same range: nothing new",
            "  allocate 0x200 3\n  allocate 0x201 3\n",
            "",
            &[],
        ),
        (
            "after close(): -EBADF",
            "  close_gmem\n  allocate 0x10 1\n",
            "",
            &[Errno::EBADF],
        ),
        (
            "the allocator fails: -ENOMEM",
            "  alloc_fail 1\n  allocate 0x400 1\n",
            "",
            &[Errno::ENOMEM],
        ),
    ];
    for (name, vmm, guest, errnos) in rows {
        let guest = if guest.is_empty() {
            String::new()
        } else {
            format!("task vcpu0\n{guest}")
        };
        let text = format!("vcpus 1\ntask vmm0\n{vmm}{guest}schedule\n  vmm0 until blocked\n");
        let sc = parse(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(parse(&print(&sc)).unwrap(), sc, "{name}: round trip");
        let rep = run_scenario(&sc, &RunConfig::new(Policy::UPSTREAM, TraceMode::Ring(32)));
        assert_eq!(rep.violation.map(|v| v.signature()), None, "{name}");
        assert_eq!(rep.run.vmm_errnos(), errnos, "{name}");
    }
}

/// close() of the fd while another thread's fallocate is inside it: the syscall holds a file
/// reference (`fdget`), so `kvm_gmem_release` runs when that thread leaves it, and the pages
/// the allocate added go with the file (found by a campaign when the model released at once
/// and the allocate then filled a released file: a leak of the model's own making).
#[test]
fn close_during_allocate_releases_after_it() {
    // vmm1 stops after fdget, before the invalidate lock; vmm0 closes (and destroys).
    for destroy in ["", "  destroy\n"] {
        let text = format!(
            "vcpus 1\ntask vmm0\n  close_gmem\n{destroy}task vmm1\n  allocate 0x200 3\n\
             schedule\n  vmm1 steps 2\n  vmm0 until blocked\n"
        );
        let sc = parse(&text).unwrap();
        let rep = run_scenario(&sc, &RunConfig::new(Policy::UPSTREAM, TraceMode::Ring(32)));
        assert_eq!(rep.violation.map(|v| v.signature()), None, "{text}");
        let st = rep.run.stack.kvm.st.borrow();
        let f = &st.gmem.files[&harness::ids::GmemId(0)];
        assert!(
            f.closed && f.pages.is_empty(),
            "released after the allocate"
        );
        assert_eq!(rep.run.vmm_errnos(), &[] as &[Errno]);
    }
}
