//! Memslot create and delete bind and unbind guest_memfd under the file's invalidate lock
//! (`kvm_gmem_bind`, `kvm_gmem_unbind` from `kvm_free_memslot`), so neither finishes in the
//! middle of a punch-hole on that file (issue 17 item 10). One row per memslot op.

use std::cell::RefCell;
use std::rc::Rc;

use harness::addr::Gfn;
use harness::ids::{GmemId, PgOff, SlotId};
use harness::policy::Policy;
use harness::sched::{Directive, Outcome, Script, TraceMode, Until};
use harness::stack::{Stack, GUEST_PAGES};

#[derive(Clone, Copy, Debug)]
enum SlotOp {
    /// Delete slot 0 (bound to the file being punched).
    Delete,
    /// Re-create slot 0 over the same file, after a delete in setup.
    Create,
}

#[test]
fn memslot_ops_wait_for_a_punch_hole_on_their_file() {
    for op in [SlotOp::Delete, SlotOp::Create] {
        let mut s = Stack::new(Policy::UPSTREAM, 600, TraceMode::Full);
        s.build_runnable(1);
        let file = GmemId(0);
        if let SlotOp::Create = op {
            s.run_setup(|cx, kvm| async move {
                kvm.delete_memslot(&cx, SlotId(0)).await.unwrap();
            });
        }
        let done: Rc<RefCell<Vec<&'static str>>> = Rc::default();
        let d = done.clone();
        let punch = s.spawn("punch", move |cx, kvm| async move {
            kvm.kvm_gmem_punch_hole(&cx, file, PgOff(0x10), 4)
                .await
                .unwrap();
            d.borrow_mut().push("punch");
        });
        let d = done.clone();
        let slot_op = s.spawn("slot_op", move |cx, kvm| async move {
            let r = match op {
                SlotOp::Delete => kvm.delete_memslot(&cx, SlotId(0)).await,
                SlotOp::Create => {
                    kvm.create_memslot(
                        &cx,
                        SlotId(0),
                        Gfn::new(0),
                        GUEST_PAGES,
                        Some((file, PgOff(0))),
                    )
                    .await
                }
            };
            r.unwrap();
            d.borrow_mut().push("slot_op");
        });
        let mut sc = Script::new(vec![
            Directive {
                task: punch,
                until: Until::Point("truncate_inode_pages_range".into()),
            },
            Directive {
                task: slot_op,
                until: Until::Blocked,
            },
        ]);
        assert_eq!(s.run(&mut sc, 50_000), Outcome::AllDone, "{op:?}");
        assert_eq!(done.borrow().len(), 2, "{op:?}: both finish");
        let trace = s.ex.render_trace();
        let at = |what: &str| {
            trace
                .find(what)
                .unwrap_or_else(|| panic!("{op:?}: no `{what}`\n{trace}"))
        };
        // The memslot op waited for the lock the punch-hole held and finished after it.
        assert!(at("slot_op      blocked on filemap_invalidate_lock") > 0);
        assert!(
            at("punch        unlock(filemap_invalidate_lock)") < at("slot_op      exit"),
            "{op:?}\n{trace}"
        );
    }
}

/// close() of the guest_memfd fd (issue 11 item 1): `kvm_gmem_release` unbinds and zaps;
/// afterwards the fd is gone, so fallocate and a bind through it fail with -EBADF, and a second
/// close too. The run stays clean. Rows: (scenario after the build, errors the VMM sees).
#[test]
fn closing_guest_memfd_and_using_it_afterwards() {
    use harness::kvm::Errno;
    use harness::run::RunConfig;
    use harness::scenario::text::{parse, print};
    use oracle::check::run_scenario;
    let rows: &[(&str, &[Errno])] = &[
        ("task vmm0\n  close_gmem\n", &[]),
        ("task vmm0\n  close_gmem\n  close_gmem\n", &[Errno::EBADF]),
        (
            "task vmm0\n  close_gmem\n  punch_hole 0x10 2\n",
            &[Errno::EBADF],
        ),
        (
            "task vmm0\n  close_gmem\n  delete_slot 0x0\n  create_slot\n",
            &[Errno::EBADF],
        ),
        (
            // The guest's accepted page goes with the file; its next access exits to
            // userspace (KVM_EXIT_MEMORY_FAULT: no file behind the slot).
            "task vcpu0\n  accept 0x10\n  write 0x10 0x5\n  read 0x10\n\
             task vmm0\n  close_gmem\n  destroy\n",
            &[],
        ),
    ];
    for (body, want) in rows {
        let text = format!("vcpus 1\n{body}");
        let sc = parse(&text).unwrap();
        assert_eq!(parse(&print(&sc)).unwrap(), sc, "{body}: round trip");
        let rep = run_scenario(&sc, &RunConfig::new(Policy::UPSTREAM, TraceMode::Ring(32)));
        assert_eq!(
            rep.violation.as_ref().map(|v| v.signature()),
            None,
            "{body}"
        );
        let errs = rep.run.vmm_errnos();
        assert_eq!(errs, *want, "{body}");
        assert!(rep.run.stack.kvm.st.borrow().gmem.files[&GmemId(0)].closed);
    }
}

/// Several memslots over one guest_memfd (issue 11 item 1), with the errnos of
/// `__kvm_set_memory_region` and `kvm_gmem_bind`: a range another slot covers is -EEXIST, an id
/// in use (private memslots cannot be modified) -EINVAL, a file range past the end -EINVAL, one
/// already bound -EEXIST (the newest `kvm_gmem_bind`; older trees said -EINVAL). Rows: (VMM ops
/// after the build, errors the VMM sees).
#[test]
fn memslots_split_over_one_guest_memfd() {
    use harness::kvm::Errno;
    use harness::run::RunConfig;
    use harness::scenario::text::{parse, print};
    use oracle::check::run_scenario;
    let rows: &[(&str, &[Errno])] = &[
        ("  create_slot 1 0x200 0x10 0x200\n", &[Errno::EEXIST]),
        (
            "  delete_slot 0x0\n  create_slot 1 0x0 0x200 0x0\n  create_slot 2 0x200 0x200 0x200\n",
            &[],
        ),
        (
            "  delete_slot 0x0\n  create_slot 1 0x0 0x200 0x0\n  create_slot 2 0x200 0x200 0x0\n",
            &[Errno::EEXIST],
        ),
        (
            "  delete_slot 0x0\n  create_slot 1 0x400 0x400 0x600\n",
            &[Errno::EINVAL],
        ),
        (
            "  delete_slot 0x0\n  create_slot 1 0x0 0x200 0x0\n  create_slot 1 0x200 0x200 0x200\n",
            &[Errno::EINVAL],
        ),
    ];
    for (ops, want) in rows {
        // The guest uses pages in both halves once the VMM is done.
        let text = format!(
            "vcpus 1\ntask vcpu0\n  accept 0x10\n  write 0x10 0x3\n  read 0x10\n\
             task vmm0\n{ops}schedule\n  vmm0 until blocked\n"
        );
        let sc = parse(&text).unwrap();
        assert_eq!(parse(&print(&sc)).unwrap(), sc, "{ops}: round trip");
        let rep = run_scenario(&sc, &RunConfig::new(Policy::UPSTREAM, TraceMode::Ring(32)));
        assert_eq!(rep.violation.as_ref().map(|v| v.signature()), None, "{ops}");
        let errs = rep.run.vmm_errnos();
        assert_eq!(errs, *want, "{ops}");
    }
}
