//! guest_memfd punch-hole and release, and VM teardown (`kvm_destroy_vm` with the TDX hooks):
//! every host page ends free or deliberately leaked, under upstream and under the policies that
//! get teardown wrong.

use std::collections::BTreeSet;

use harness::addr::{Gfn, Gpa, PgLevel};
use harness::guest::{GuestOp, GuestProgram, Observation};
use harness::host::{Census, LedgerError, Owner};
use harness::ids::{GmemId, PgOff, SlotId};
use harness::kvm::Kvm;
use harness::policy::Policy;
use harness::sched::{Directive, Outcome, Point, RoundRobin, Script, TaskId, TraceMode, Until};
use harness::stack::Stack;
use harness::tdx_module::{Code, Lp, SeptState};
use harness::vmm::ThreadEnd;

/// Base gfn of the second memslot (outside slot 0's GUEST_PAGES).
const SLOT1: u64 = 0x1000;

fn gpa(gfn: u64) -> Gpa {
    Gpa::new(gfn << 12)
}

fn new_stack(policy: &str) -> (Stack, Census) {
    let s = Stack::new(Policy::by_name(policy).unwrap(), 600, TraceMode::Full);
    let before = s.host.borrow().ledger.census();
    (s, before)
}

fn fatal(kvm: &Kvm) -> Vec<String> {
    kvm.st
        .borrow()
        .bugs
        .iter()
        .filter(|b| b.fatal)
        .map(|b| format!("{}: {}", b.location, b.what))
        .collect()
}

/// Runs each vCPU's program to the end (round robin); every thread must finish its program.
fn run_vcpus(s: &mut Stack, programs: Vec<(usize, Vec<GuestOp>)>) {
    let ends: Vec<_> = programs
        .into_iter()
        .map(|(v, ops)| s.spawn_vcpu(v, GuestProgram::new(ops)).1)
        .collect();
    assert_eq!(s.run(&mut RoundRobin::new(), 200_000), Outcome::AllDone);
    for e in ends {
        assert_eq!(e.get(), Some(ThreadEnd::GuestDone));
    }
}

fn seen(kvm: &Kvm, v: usize) -> Vec<Observation> {
    kvm.st.borrow().vcpus[v]
        .guest
        .seen
        .iter()
        .map(|(_, o)| *o)
        .collect()
}

fn sept_state(s: &Stack, gfn: u64) -> SeptState {
    let tdr = s.kvm.st.borrow().tdx.tdr.unwrap();
    s.module.state().tds[&tdr]
        .sept
        .state(PgLevel::L4K, Gfn::new(gfn))
}

fn destroy(s: &mut Stack) {
    s.run_setup(|cx, kvm| async move { kvm.destroy_vm(&cx).await });
}

fn script(steps: Vec<(TaskId, Until)>) -> Script {
    Script::new(
        steps
            .into_iter()
            .map(|(task, until)| Directive { task, until })
            .collect(),
    )
}

/// Statuses of every `what` SEAMCALL note, in order.
fn notes(s: &Stack, what: &str) -> Vec<u64> {
    s.ex.trace().notes(what)
}

/// Position of the first note named `what` in the trace.
fn first_note(s: &Stack, what: &str) -> Option<usize> {
    s.ex.trace()
        .events()
        .position(|e| matches!(e.point, Point::Note { what: w, .. } if w == what))
}

#[test]
fn upstream_life_cycle_returns_every_page() {
    let (mut s, before) = new_stack("upstream");
    s.build_runnable(2);
    // A second private memslot on its own guest_memfd.
    s.run_setup(|cx, kvm| async move {
        let g = kvm.create_guest_memfd(16);
        kvm.create_memslot(&cx, SlotId(1), Gfn::new(SLOT1), 16, Some((g, PgOff(0))))
            .await
            .unwrap();
        kvm.set_memory_attributes(&cx, Gfn::new(SLOT1), Gfn::new(SLOT1 + 16), true)
            .await
            .unwrap();
    });
    run_vcpus(
        &mut s,
        vec![
            (
                0,
                vec![
                    GuestOp::Accept { gpa: gpa(0x10) },
                    GuestOp::Write {
                        gpa: gpa(0x10),
                        value: 0xa1,
                    },
                    GuestOp::Read { gpa: gpa(0x10) },
                    GuestOp::Accept {
                        gpa: gpa(SLOT1 + 1),
                    },
                    GuestOp::Write {
                        gpa: gpa(SLOT1 + 1),
                        value: 0xb1,
                    },
                ],
            ),
            (
                1,
                vec![
                    GuestOp::Accept { gpa: gpa(0x20) },
                    GuestOp::Write {
                        gpa: gpa(0x20),
                        value: 0xc1,
                    },
                    GuestOp::Accept { gpa: gpa(0x11) },
                    GuestOp::Read { gpa: gpa(0x11) },
                ],
            ),
        ],
    );
    assert!(seen(&s.kvm, 0).contains(&Observation::Read {
        gpa: gpa(0x10),
        value: 0xa1
    }));

    // Private -> shared: the page leaves the S-EPT; the guest uses the shared alias.
    s.run_setup(|cx, kvm| async move {
        kvm.set_memory_attributes(&cx, Gfn::new(0x20), Gfn::new(0x21), false)
            .await
            .unwrap();
    });
    assert_eq!(sept_state(&s, 0x20), SeptState::Free);
    run_vcpus(
        &mut s,
        vec![(
            1,
            vec![
                GuestOp::Write {
                    gpa: gpa(0x20).to_shared(),
                    value: 0xd1,
                },
                GuestOp::Read {
                    gpa: gpa(0x20).to_shared(),
                },
            ],
        )],
    );
    assert_eq!(
        seen(&s.kvm, 1).last(),
        Some(&Observation::Read {
            gpa: gpa(0x20).to_shared(),
            value: 0xd1
        })
    );
    // ... and back: the guest accepts it again and finds it cleared.
    s.run_setup(|cx, kvm| async move {
        kvm.set_memory_attributes(&cx, Gfn::new(0x20), Gfn::new(0x21), true)
            .await
            .unwrap();
    });
    run_vcpus(
        &mut s,
        vec![(
            1,
            vec![
                GuestOp::Accept { gpa: gpa(0x20) },
                GuestOp::Read { gpa: gpa(0x20) },
            ],
        )],
    );
    assert_eq!(
        seen(&s.kvm, 1).last(),
        Some(&Observation::Read {
            gpa: gpa(0x20),
            value: 0
        })
    );

    // Delete slot 1: its page leaves the S-EPT but stays in its guest_memfd.
    s.run_setup(|cx, kvm| async move { kvm.delete_memslot(&cx, SlotId(1)).await.unwrap() });
    assert_eq!(sept_state(&s, SLOT1 + 1), SeptState::Free);
    assert_eq!(s.kvm.gmem_pages(GmemId(1)).len(), 1);

    // Punch a hole over gfns 0x10-0x11 (file 0 is bound at offset 0).
    let punched: Vec<_> = s
        .kvm
        .gmem_pages(GmemId(0))
        .into_iter()
        .filter(|(o, _)| (0x10..0x12).contains(&o.0))
        .map(|(_, p)| p)
        .collect();
    assert_eq!(punched.len(), 2);
    s.run_setup(|cx, kvm| async move {
        kvm.kvm_gmem_punch_hole(&cx, GmemId(0), PgOff(0x10), 2)
            .await
            .unwrap()
    });
    assert_eq!(sept_state(&s, 0x10), SeptState::Free);
    assert_eq!(sept_state(&s, 0x11), SeptState::Free);
    assert_eq!(sept_state(&s, 0x20), SeptState::Mapped);
    for p in &punched {
        assert_eq!(s.host.borrow().ledger.get(*p).unwrap().owner, Owner::Free);
    }
    assert!(!s
        .kvm
        .gmem_pages(GmemId(0))
        .iter()
        .any(|(o, _)| (0x10..0x12).contains(&o.0)));
    assert!(oracle::sept_sync::check(&s.kvm, true).is_empty());
    assert!(s.host.borrow().ledger.census().held_by_tdx > 0);

    destroy(&mut s);
    let h = s.host.borrow();
    assert!(h.refused.is_empty(), "{:?}", h.refused);
    assert!(h.unaccounted().is_empty(), "{:?}", h.unaccounted());
    // Everything is back but the VMM's own memory behind the shared page it touched.
    let after = h.ledger.census();
    assert_eq!(h.user.len(), 1);
    assert_eq!(
        (
            after.free + h.user.len(),
            after.in_use,
            after.held_by_tdx,
            after.leaked
        ),
        (before.free, h.user.len(), 0, 0)
    );
    assert!(
        s.kvm.st.borrow().bugs.is_empty(),
        "{:?}",
        s.kvm.st.borrow().bugs
    );
    let m = s.module.state();
    assert!(m.tds.is_empty() && m.vcpus.is_empty());
    assert!(s.kvm.st.borrow().tdx.hkid.is_none());
    assert!(oracle::module_invariants::check(&m, &h).is_empty());
}

/// Two vCPUs accept and write a page each; then the VM is destroyed.
fn teardown_scenario(policy: &str, before_destroy: impl FnOnce(&Stack)) -> (Stack, Census) {
    let (mut s, before) = new_stack(policy);
    s.build_runnable(2);
    run_vcpus(
        &mut s,
        vec![
            (
                0,
                vec![
                    GuestOp::Accept { gpa: gpa(0x10) },
                    GuestOp::Write {
                        gpa: gpa(0x10),
                        value: 1,
                    },
                ],
            ),
            (
                1,
                vec![
                    GuestOp::Accept { gpa: gpa(0x200) },
                    GuestOp::Write {
                        gpa: gpa(0x200),
                        value: 2,
                    },
                ],
            ),
        ],
    );
    before_destroy(&s);
    destroy(&mut s);
    (s, before)
}

/// After teardown every page is free or leaked on purpose, and the leaked ones are exactly the
/// pages the TDX module still holds.
fn assert_leaks_deliberate(s: &Stack) -> usize {
    let h = s.host.borrow();
    assert!(h.unaccounted().is_empty(), "{:?}", h.unaccounted());
    for (p, e) in h.ledger.iter() {
        assert_eq!(
            e.tdx.is_some(),
            matches!(e.owner, Owner::Leaked(_)),
            "{p}: {e:?}"
        );
    }
    h.ledger.census().leaked
}

#[test]
fn unflushed_vcpu_keeps_the_hkid_and_teardown_leaks_on_purpose() {
    let mut guest_pages = Vec::new();
    let (s, before) = teardown_scenario("upstream", |s| {
        guest_pages = s.kvm.gmem_pages(GmemId(0));
        // vCPU 1's thread moved to LP 3 without the flush from its old CPU (`vcpu->cpu` says
        // 3): the module still has it associated with LP 1, so VP.FLUSH on LP 3 finds
        // nothing to flush.
        let mut st = s.kvm.st.borrow_mut();
        st.vcpus[1].lp = Lp(3);
        st.vcpus[1].cpu = Some(Lp(3));
    });
    assert_eq!(
        notes(&s, "TDH.VP.FLUSH"),
        vec![0, Code::VcpuNotAssociated.raw()]
    );
    assert_eq!(
        notes(&s, "TDH.MNG.VPFLUSHDONE"),
        vec![Code::FlushvpNotDone.raw()]
    );
    // Given up silently: no CACHE.WB, no KEY.FREEID, no RECLAIM; the HKID stays.
    assert!(notes(&s, "TDH.MNG.KEY.FREEID").is_empty());
    assert!(notes(&s, "TDH.PHYMEM.PAGE.RECLAIM").is_empty());
    assert!(s.kvm.st.borrow().tdx.hkid.is_some());
    assert_eq!(s.module.state().tds.len(), 1);
    let b = fatal(&s.kvm);
    assert!(
        !b.iter().any(|b| b.starts_with("tdx_mmu_release_hkid")),
        "{b:?}"
    );
    // The mirror tables cannot be reclaimed with the HKID assigned (upstream KVM_BUG_ONs).
    assert!(
        b.iter()
            .any(|b| b == "tdx_sept_free_private_spt: HKID still assigned"),
        "{b:?}"
    );
    let leaked = assert_leaks_deliberate(&s);
    // TDR + 6 TDCS + 2 x (TDVPR + 5 TDCX) + the S-EPT tables (1G, 2M, two 4K) above the
    // two pages.
    assert!(leaked >= 1 + 6 + 12 + 4, "{leaked}");
    let h = s.host.borrow();
    assert!(h.refused.is_empty(), "{:?}", h.refused);
    // The guest pages were removed while the HKID was assigned: they are free.
    assert_eq!(guest_pages.len(), 2);
    for (_, p) in guest_pages {
        assert_eq!(h.ledger.get(p).unwrap().owner, Owner::Free);
    }
    assert_eq!(h.ledger.census().free + leaked, before.free);
}

#[test]
fn reclaim_out_of_order_fails_key_freeid_where_upstream_does_not() {
    let (up, before) = teardown_scenario("upstream", |_| {});
    assert!(up.kvm.st.borrow().bugs.is_empty());
    assert!(up.host.borrow().refused.is_empty());
    assert_eq!(assert_leaks_deliberate(&up), 0);
    assert_eq!(up.host.borrow().ledger.census(), before);
    // Upstream order: CACHE.WB before KEY.FREEID, the TDR reclaimed last (after every vCPU and
    // S-EPT page).
    assert!(
        first_note(&up, "TDH.PHYMEM.CACHE.WB").unwrap()
            < first_note(&up, "TDH.MNG.KEY.FREEID").unwrap()
    );
    let reclaims = notes(&up, "TDH.PHYMEM.PAGE.RECLAIM");
    assert!(reclaims.iter().all(|a| *a == 0));
    assert_eq!(
        reclaims.len(),
        6 + 12 + 1 + 4,
        "TDCS, vCPU pages, TDR, S-EPT tables"
    );

    let (ooo, _) = teardown_scenario("reclaim_out_of_order", |_| {});
    let b = fatal(&ooo.kvm);
    assert!(
        b.iter()
            .any(|b| b
                .starts_with("tdx_mmu_release_hkid: TDH.MNG.KEY.FREEID: TDX_WBCACHE_NOT_COMPLETE")),
        "{b:?}"
    );
    assert!(ooo.kvm.is_dead());
    assert!(
        first_note(&ooo, "TDH.MNG.KEY.FREEID").unwrap()
            < first_note(&ooo, "TDH.PHYMEM.CACHE.WB").unwrap()
    );
    // The HKID is leaked, so nothing is reclaimed: every page the TD held is leaked on purpose.
    assert!(notes(&ooo, "TDH.PHYMEM.PAGE.RECLAIM").is_empty());
    assert!(ooo.kvm.st.borrow().tdx.hkid.is_some());
    assert!(assert_leaks_deliberate(&ooo) >= 1 + 6 + 12 + 4);
    assert!(ooo.host.borrow().refused.is_empty());
}

#[test]
fn no_clear_after_reclaim_hands_td_private_pages_to_the_kernel() {
    let (up, _) = teardown_scenario("upstream", |_| {});
    assert!(up.host.borrow().refused.is_empty());

    let (nc, _) = teardown_scenario("no_clear_after_reclaim", |_| {});
    // Teardown itself goes as upstream: every RECLAIM succeeds, no bug.
    let reclaims = notes(&nc, "TDH.PHYMEM.PAGE.RECLAIM");
    assert_eq!(reclaims.len(), 6 + 12 + 1 + 4);
    assert!(reclaims.iter().all(|a| *a == 0));
    assert!(fatal(&nc.kvm).is_empty());
    // ... but each free of a reclaimed page is refused: its TD-private contents were never
    // cleared.
    let h = nc.host.borrow();
    assert_eq!(h.refused.len(), reclaims.len(), "{:?}", h.refused);
    assert!(h
        .refused
        .iter()
        .all(|(_, e)| matches!(e, LedgerError::UnclearedContents(_))));
    let bad = oracle::module_invariants::check(&nc.module.state(), &h);
    assert!(
        bad.iter()
            .any(|b| b.contains("freed with TD-private contents not cleared")),
        "{bad:?}"
    );
}

/// The VMM punches a hole over the page a vCPU accepts, writes and reads, at every point of
/// the vCPU's progress (and the other way round): no page is freed while the S-EPT maps it, a
/// read sees what the guest wrote or the page is gone (#VE on the fresh, unaccepted page), and
/// teardown still accounts for every page.
#[test]
fn punch_hole_races_with_guest_access() {
    let mut outcomes = BTreeSet::new();
    for (first_vcpu, n) in (0..400u32)
        .map(|n| (true, n))
        .chain((0..60).map(|n| (false, n)))
    {
        let (mut s, before) = new_stack("upstream");
        s.build_runnable(1);
        let (t0, end) = s.spawn_vcpu(
            0,
            GuestProgram::new(vec![
                GuestOp::Accept { gpa: gpa(0x40) },
                GuestOp::Write {
                    gpa: gpa(0x40),
                    value: 7,
                },
                GuestOp::Read { gpa: gpa(0x40) },
            ]),
        );
        let vmm = s.spawn("vmm", |cx, kvm| async move {
            kvm.kvm_gmem_punch_hole(&cx, GmemId(0), PgOff(0x40), 1)
                .await
                .unwrap()
        });
        let (a, b) = if first_vcpu { (t0, vmm) } else { (vmm, t0) };
        let mut sc = script(vec![(a, Until::Steps(n)), (b, Until::Steps(400))]);
        assert_eq!(s.run(&mut sc, 200_000), Outcome::AllDone);
        let ctx = format!(
            "{} first, {n} steps",
            if first_vcpu { "vcpu" } else { "vmm" }
        );
        assert_eq!(end.get(), Some(ThreadEnd::GuestDone), "{ctx}");
        assert!(s.kvm.st.borrow().bugs.is_empty(), "{ctx}");
        assert!(s.host.borrow().refused.is_empty(), "{ctx}");
        assert!(oracle::sept_sync::check(&s.kvm, true).is_empty(), "{ctx}");
        let obs = seen(&s.kvm, 0);
        for o in &obs {
            if let Observation::Read { value, .. } = o {
                assert_eq!(*value, 7, "{ctx}");
            }
        }
        outcomes.insert(format!("{obs:?}"));
        // A page the S-EPT maps is a page the file holds.
        let in_file: BTreeSet<_> = s
            .kvm
            .gmem_pages(GmemId(0))
            .into_iter()
            .map(|(_, p)| p)
            .collect();
        let tdr = s.kvm.st.borrow().tdx.tdr.unwrap();
        for (_, _, e) in s.module.state().tds[&tdr].sept.iter() {
            if e.state.is_leaf() {
                assert!(in_file.contains(&e.pfn), "{ctx}: {e:?}");
            }
        }
        destroy(&mut s);
        let h = s.host.borrow();
        assert!(h.unaccounted().is_empty(), "{ctx}");
        assert_eq!(h.ledger.census(), before, "{ctx}");
    }
    // The hole landed before the access, after it, and between the write and the read.
    assert!(outcomes.len() >= 3, "{outcomes:#?}");
}

#[test]
fn release_closes_the_file_and_zaps_its_mappings() {
    let (mut s, _) = new_stack("upstream");
    s.build_runnable(1);
    run_vcpus(&mut s, vec![(0, vec![GuestOp::Accept { gpa: gpa(0x30) }])]);
    let pages = s.kvm.gmem_pages(GmemId(0));
    assert_eq!(pages.len(), 1);
    s.run_setup(|cx, kvm| async move { kvm.kvm_gmem_release(&cx, GmemId(0)).await });
    assert_eq!(sept_state(&s, 0x30), SeptState::Free);
    assert!(s.kvm.gmem_pages(GmemId(0)).is_empty());
    assert_eq!(
        s.host.borrow().ledger.get(pages[0].1).unwrap().owner,
        Owner::Free
    );
    assert_eq!(s.kvm.st.borrow().memslots.slots[0].gmem, None);
    // The file is gone: a new private fault on the slot is a memory-fault exit (-EFAULT).
    let (_, end) = s.spawn_vcpu(
        0,
        GuestProgram::new(vec![GuestOp::Accept { gpa: gpa(0x31) }]),
    );
    assert_eq!(s.run(&mut RoundRobin::new(), 100_000), Outcome::AllDone);
    assert_eq!(
        end.get(),
        Some(ThreadEnd::Error(harness::kvm::Errno::EFAULT))
    );
    assert!(s.kvm.gmem_pages(GmemId(0)).is_empty());
    assert!(fatal(&s.kvm).is_empty());
}

/// Issue 17 item 11: `tdx_vcpu_free` on a vCPU still on a pCPU (`vcpu->cpu != -1`) flushes it
/// there and frees nothing: TDH.VP.FLUSH only if it is INITIALIZED (which is a KVM_BUG_ON:
/// teardown should have flushed it), the vCPU disassociated either way, its pages kept.
/// Rows: (KVM_TDX_INIT_VCPU done, VP.FLUSH and KVM_BUG_ON expected).
#[test]
fn freeing_a_vcpu_still_on_a_pcpu_only_flushes_it() {
    for initialized in [false, true] {
        let (mut s, _) = new_stack("upstream");
        s.run_setup(move |cx, kvm| async move {
            kvm.tdx_td_init(&cx, harness::ids::Hkid(32), 4)
                .await
                .unwrap();
            let v = kvm.create_vcpu(Lp(0), GuestProgram::default()).unwrap();
            if initialized {
                kvm.tdx_td_vcpu_init(&cx, v).await.unwrap();
            }
            assert_eq!(kvm.st.borrow().vcpus[v].cpu, Some(Lp(0)));
            kvm.tdx_vcpu_free(&cx, v).await;
        });
        let st = s.kvm.st.borrow();
        assert_eq!(st.vcpus[0].cpu, None, "initialized={initialized}");
        assert_eq!(
            notes(&s, "TDH.VP.FLUSH").len(),
            usize::from(initialized),
            "initialized={initialized}"
        );
        let bugs = fatal(&s.kvm);
        assert_eq!(
            bugs.iter().any(|b| b.starts_with("tdx_vcpu_free")),
            initialized,
            "{bugs:?}"
        );
        // Nothing was reclaimed: the TDVPR (if any) is still the TD's.
        assert!(notes(&s, "TDH.PHYMEM.PAGE.RECLAIM").is_empty());
        assert_eq!(st.vcpus[0].tdvpr.is_some(), initialized);
    }
}
