//! The races of seeds 003 and 000 and the EPT-violation loop exit, as explicit schedules over
//! the whole stack, under upstream and under the policy that breaks each.

use harness::addr::{Gfn, Gpa};
use harness::guest::{GuestOp, GuestProgram, Observation};
use harness::ids::SlotId;
use harness::kvm::Kvm;
use harness::policy::Policy;
use harness::sched::{
    Directive, Outcome, Point, RoundRobin, Script, TaskId, TraceMode, Until, WaitOn,
};
use harness::stack::Stack;
use harness::tdx_module::{Code, SeptState};
use harness::vmm::ThreadEnd;

fn gpa(gfn: u64) -> Gpa {
    Gpa::new(gfn << 12)
}

fn stack(policy: &str, nvcpus: u8) -> Stack {
    let mut s = Stack::new(Policy::by_name(policy).unwrap(), 600, TraceMode::Full);
    s.build_runnable(nvcpus);
    s
}

fn bugs(kvm: &Kvm) -> Vec<String> {
    kvm.st
        .borrow()
        .bugs
        .iter()
        .filter(|b| b.fatal)
        .map(|b| format!("{}: {}", b.location, b.what))
        .collect()
}

fn script(steps: Vec<(TaskId, Until)>) -> Script {
    Script::new(
        steps
            .into_iter()
            .map(|(task, until)| Directive { task, until })
            .collect(),
    )
}

/// vCPU 0 accepts a page in 2M region 0, so the 512G and 1G tables exist and only region 1's
/// 4K table is missing for the race.
fn warm_up(s: &mut Stack) {
    s.spawn_vcpu(
        0,
        GuestProgram::new(vec![GuestOp::Accept { gpa: gpa(0x10) }]),
    );
    assert_eq!(s.run(&mut RoundRobin::new(), 100_000), Outcome::AllDone);
}

fn seed_003(policy: &str) -> Stack {
    let mut s = stack(policy, 3);
    warm_up(&mut s);
    let (t1, _) = s.spawn_vcpu(
        1,
        GuestProgram::new(vec![GuestOp::Accept { gpa: gpa(0x200) }]),
    );
    let (t2, _) = s.spawn_vcpu(
        2,
        GuestProgram::new(vec![GuestOp::Accept { gpa: gpa(0x201) }]),
    );
    // vCPU 1 links region 1's table: stop it inside TDH.MEM.SEPT.ADD; vCPU 2 faults meanwhile.
    let mut sc = script(vec![
        (t1, Until::Point("TDH.MEM.SEPT.ADD:locked".into())),
        (t2, Until::Steps(300)),
    ]);
    let out = s.run(&mut sc, 200_000);
    assert_eq!(out, Outcome::AllDone, "{}", s.ex.render_trace());
    s
}

#[test]
fn seed_003_upstream_freezes_and_both_vcpus_finish() {
    let s = seed_003("upstream");
    assert!(bugs(&s.kvm).is_empty(), "{:?}", bugs(&s.kvm));
    assert!(oracle::sept_sync::check(&s.kvm, true).is_empty());
    // vCPU 2 met the frozen SPTE and retried its fault while vCPU 1 was in SEPT.ADD.
    let vcpu2 = TaskId(
        s.ex.task_names()
            .iter()
            .position(|n| n == "vcpu2")
            .expect("vCPU 2's thread") as u32,
    );
    let faults =
        s.ex.trace()
            .events()
            .filter(|e| {
                e.task == vcpu2 && matches!(e.point, Point::YieldArg("kvm_tdp_mmu_page_fault", _))
            })
            .count();
    assert!(faults >= 2, "vCPU 2 faulted {faults} times");
    for v in [1, 2] {
        let seen: Vec<Observation> = s.kvm.st.borrow().vcpus[v]
            .guest
            .seen
            .iter()
            .map(|(_, o)| *o)
            .collect();
        assert!(
            matches!(
                seen[..],
                [Observation::Accepted {
                    code: Code::Success,
                    ..
                }]
            ),
            "vcpu{v}: {seen:?}"
        );
    }
}

#[test]
fn seed_003_no_freeze_walk_fails_and_the_vm_is_bugged() {
    let s = seed_003("no_freeze");
    let b = bugs(&s.kvm);
    assert!(
        b.iter()
            .any(|b| b.contains("TDH.MEM.PAGE.AUG") && b.contains("TDX_EPT_WALK_FAILED")),
        "{b:?}"
    );
    assert!(s.kvm.is_dead());
}

/// vCPU 0 is in TDG.MEM.PAGE.ACCEPT of `p` (holding the entry lock) when the VMM converts `p`
/// to shared, whose zap must remove it from the S-EPT.
fn seed_000_accept(policy: &str) -> Stack {
    let mut s = stack(policy, 1);
    let p = gpa(0x30);
    let (t0, _) = s.spawn_vcpu(0, GuestProgram::new(vec![GuestOp::Accept { gpa: p }]));
    let vmm = s.spawn("vmm", move |cx, kvm| async move {
        kvm.set_memory_attributes(&cx, p.gfn(), p.gfn().add(1), false)
            .await
            .unwrap();
    });
    let mut sc = script(vec![
        (t0, Until::Point("TDG.MEM.PAGE.ACCEPT:locked".into())),
        (vmm, Until::Blocked),
    ]);
    let out = s.run(&mut sc, 200_000);
    assert_eq!(out, Outcome::AllDone);
    s
}

#[test]
fn seed_000_upstream_removal_succeeds_after_the_kick() {
    let s = seed_000_accept("upstream");
    assert!(bugs(&s.kvm).is_empty(), "{:?}", bugs(&s.kvm));
    // The first BLOCK lost to the guest's ACCEPT, the retry after the kick won.
    let notes: Vec<u64> = s.ex.trace().notes("TDH.MEM.RANGE.BLOCK");
    assert_eq!(notes, vec![0x8000_0200_0000_0001, 0]);
    let tdr = s.kvm.st.borrow().tdx.tdr.unwrap();
    assert_eq!(
        s.module.state().tds[&tdr]
            .sept
            .state(harness::addr::PgLevel::L4K, Gfn::new(0x30)),
        SeptState::Free
    );
    assert!(oracle::sept_sync::check(&s.kvm, true).is_empty());
}

#[test]
fn seed_000_no_kick_on_busy_remove_fails_a_must_not_fail_path() {
    let s = seed_000_accept("no_kick_on_busy_remove");
    let b = bugs(&s.kvm);
    assert!(
        b.iter()
            .any(|b| b.contains("TDH.MEM.RANGE.BLOCK: TDX_OPERAND_BUSY")),
        "{b:?}"
    );
}

#[test]
fn seed_000_retry16_fails_under_sustained_contention() {
    let s = seed_000_accept("retry16");
    let b = bugs(&s.kvm);
    assert!(
        b.iter()
            .any(|b| b.contains("TDH.MEM.RANGE.BLOCK: TDX_OPERAND_BUSY")),
        "{b:?}"
    );
    let blocks = s.ex.trace().notes("TDH.MEM.RANGE.BLOCK").len();
    assert_eq!(blocks, 16, "sixteen tries, then give up");
}

/// vCPU 0 enters in zero-step state (the tree lock held exclusively in VP.ENTER) while the VMM
/// converts an accepted page to shared.
fn seed_000_zero_step(policy: &str) -> Stack {
    let mut s = stack(policy, 1);
    let (q, r) = (gpa(0x40), gpa(0x41));
    // Accept both pages first.
    s.spawn_vcpu(
        0,
        GuestProgram::new(vec![GuestOp::Accept { gpa: q }, GuestOp::Accept { gpa: r }]),
    );
    assert_eq!(s.run(&mut RoundRobin::new(), 100_000), Outcome::AllDone);
    let tdvpr = s.kvm.st.borrow().vcpus[0].tdvpr.unwrap();
    s.module.inject_zero_step(tdvpr, q);
    let (t0, _) = s.spawn_vcpu(0, GuestProgram::new(vec![GuestOp::Read { gpa: q }]));
    let vmm = s.spawn("vmm", move |cx, kvm| async move {
        kvm.set_memory_attributes(&cx, r.gfn(), r.gfn().add(1), false)
            .await
            .unwrap();
    });
    let mut sc = script(vec![
        (t0, Until::Point("TDH.VP.ENTER:locked".into())),
        (vmm, Until::Blocked),
    ]);
    assert_eq!(s.run(&mut sc, 200_000), Outcome::AllDone);
    s
}

#[test]
fn seed_000_upstream_removal_vs_zero_step_entry() {
    let s = seed_000_zero_step("upstream");
    assert!(bugs(&s.kvm).is_empty(), "{:?}", bugs(&s.kvm));
    let first_block = s.ex.trace().notes("TDH.MEM.RANGE.BLOCK").first().copied();
    assert_eq!(
        first_block,
        Some(0x8000_0200_0000_0092),
        "BLOCK lost to VP.ENTER's tree lock"
    );
    assert!(oracle::sept_sync::check(&s.kvm, true).is_empty());
}

#[test]
fn seed_000_no_kick_vs_zero_step_fails() {
    let s = seed_000_zero_step("no_kick_on_busy_remove");
    let b = bugs(&s.kvm);
    assert!(b.iter().any(|b| b.contains("TDH.MEM.RANGE.BLOCK")), "{b:?}");
}

/// vCPU 0 faults on a page while the VMM deletes the memslot: the fault path sees the INVALID
/// slot and returns RET_PF_RETRY; the EPT-violation loop must let go of SRCU.
fn ept_loop_vs_delete(
    policy: &str,
) -> (
    Stack,
    Outcome,
    std::rc::Rc<std::cell::Cell<Option<ThreadEnd>>>,
) {
    let mut s = stack(policy, 1);
    let (t0, end) = s.spawn_vcpu(
        0,
        GuestProgram::new(vec![GuestOp::Accept { gpa: gpa(0x50) }]),
    );
    let vmm = s.spawn("vmm", move |cx, kvm| async move {
        kvm.delete_memslot(&cx, SlotId(0)).await.unwrap();
    });
    let mut sc = script(vec![
        (t0, Until::Point("kvm_tdp_mmu_page_fault".into())),
        (vmm, Until::Blocked),
    ]);
    let out = s.run(&mut sc, 50_000);
    (s, out, end)
}

#[test]
fn ept_loop_leaves_for_an_invalid_memslot_and_the_delete_completes() {
    let (s, out, end) = ept_loop_vs_delete("upstream");
    assert_eq!(out, Outcome::AllDone, "{}", s.ex.render_trace());
    assert!(s.kvm.st.borrow().memslots.slots.is_empty());
    // With the slot gone the guest's access is an error for the VMM to report.
    assert_eq!(
        end.get(),
        Some(ThreadEnd::Error(harness::kvm::Errno::EFAULT))
    );
    assert!(bugs(&s.kvm).is_empty());
}

#[test]
fn ept_loop_ignoring_the_slot_never_lets_the_delete_finish() {
    let (s, out, _) = ept_loop_vs_delete("ept_loop_ignores_requests");
    let Outcome::BudgetExhausted(rep) = &out else {
        panic!("expected no progress, got {out:?}")
    };
    let names = s.ex.task_names();
    let vmm = rep
        .pending
        .iter()
        .find(|(t, _, _)| names[t.0 as usize] == "vmm")
        .unwrap();
    assert!(matches!(vmm.2, Some(WaitOn::SrcuSync { .. })), "{rep:?}");
    let v = oracle::liveness::check_outcome(&out, &s.ex, "kvm_set_memslot").unwrap();
    // The vCPU spins on the update that holds slots_lock; the update waits for the vCPU's SRCU.
    assert_eq!(
        v.key,
        "deadlock:mutex_lock(slots_lock)+synchronize_srcu(kvm->srcu)"
    );
}

#[test]
fn ept_loop_leaves_when_an_event_is_pending() {
    // With the slot INVALID forever (the delete blocked behind the vCPU's SRCU under the
    // ignoring policy), a pending event still makes the loop return to the run loop.
    let mut s = stack("ept_loop_ignores_requests", 1);
    let (t0, _) = s.spawn_vcpu(
        0,
        GuestProgram::new(vec![GuestOp::Accept { gpa: gpa(0x60) }]),
    );
    let vmm = s.spawn("vmm", move |cx, kvm| async move {
        kvm.delete_memslot(&cx, SlotId(0)).await.unwrap();
    });
    let kick = s.spawn("irq", move |cx, kvm| async move {
        cx.yield_at("irq").await;
        kvm.st.borrow_mut().vcpus[0].pending_event = true;
    });
    let mut sc = script(vec![
        (t0, Until::Point("kvm_tdp_mmu_page_fault".into())),
        (vmm, Until::Blocked),
        (t0, Until::Steps(50)),
        (kick, Until::Blocked),
        (t0, Until::Point("vcpu_enter_guest".into())),
    ]);
    let _ = s.run(&mut sc, 400);
    let left =
        s.ex.trace()
            .events()
            .filter(|e| e.task == t0 && e.point == Point::Yield("vcpu_enter_guest"))
            .count();
    assert!(
        left >= 2,
        "the vCPU went back to vcpu_enter_guest after the event"
    );
}

#[test]
fn no_track_before_remove_fails_the_removal() {
    for (policy, broken) in [("upstream", false), ("no_track_before_remove", true)] {
        let mut s = stack(policy, 1);
        let p = gpa(0x70);
        let (vcpu, _) = s.spawn_vcpu(0, GuestProgram::new(vec![GuestOp::Accept { gpa: p }]));
        s.spawn("vmm", move |cx, kvm| async move {
            cx.yield_at("vmm").await;
            kvm.set_memory_attributes(&cx, p.gfn(), p.gfn().add(1), false)
                .await
                .unwrap();
        });
        let mut sc = script(vec![(vcpu, Until::Blocked)]);
        assert_eq!(s.run(&mut sc, 100_000), Outcome::AllDone);
        let b = bugs(&s.kvm);
        assert_eq!(
            b.iter()
                .any(|b| b.contains("TDH.MEM.PAGE.REMOVE: TDX_TLB_TRACKING_NOT_DONE")),
            broken,
            "{policy}: {b:?}"
        );
    }
}

/// vCPU 0 holds the S-EPT tree lock in a zero-step entry while vCPU 1's fault links a table:
/// SEPT.ADD gets BUSY and the hook fails; upstream restores the mirror SPTE.
fn map_vs_zero_step(policy: &str) -> Stack {
    let mut s = stack(policy, 2);
    warm_up(&mut s);
    let tdvpr = s.kvm.st.borrow().vcpus[0].tdvpr.unwrap();
    s.module.inject_zero_step(tdvpr, gpa(0x10));
    let (t0, _) = s.spawn_vcpu(0, GuestProgram::new(vec![GuestOp::Read { gpa: gpa(0x10) }]));
    let (t1, _) = s.spawn_vcpu(
        1,
        GuestProgram::new(vec![GuestOp::Accept { gpa: gpa(0x400) }]),
    );
    let mut sc = script(vec![
        (t0, Until::Point("TDH.VP.ENTER:locked".into())),
        (
            t1,
            Until::Point("tdx_handle_ept_violation:cond_resched".into()),
        ),
    ]);
    let _ = s.run(&mut sc, 100_000);
    s
}

#[test]
fn restore_on_fail_keeps_the_mirror_in_sync() {
    let s = map_vs_zero_step("upstream");
    assert!(bugs(&s.kvm).is_empty(), "{:?}", bugs(&s.kvm));
    assert!(oracle::sept_sync::check(&s.kvm, true).is_empty());
    let s = map_vs_zero_step("no_restore_on_fail");
    let bad = oracle::sept_sync::check(&s.kvm, false);

    // The failed link left the table SPTE present with no S-EPT table behind it, pointing at
    // the shadow page the failed link freed.
    assert!(
        bad.iter()
            .any(|b| b.contains("points at a freed page table")),
        "{bad:?}"
    );
}

/// `tdx_handle_exit`: a TDH.VP.ENTER that fails with a TDX_ERROR status (here
/// TDX_VCPU_ASSOCIATED: the vCPU entered on another LP without TDH.VP.FLUSH, a KVM bug the test
/// makes by hand) is an unhandled exit: KVM_RUN returns KVM_EXIT_INTERNAL_ERROR, the VM is not
/// bugged, and the oracle reports it as an error returned for a supported sequence.
#[test]
fn a_failed_vp_enter_is_an_internal_error_exit_not_a_bug() {
    let mut s = stack("upstream", 1);
    s.kvm.st.borrow_mut().vcpus[0].lp = harness::tdx_module::Lp(3);
    let (_, end) = s.spawn_vcpu(
        0,
        GuestProgram::new(vec![GuestOp::Accept { gpa: gpa(0x10) }]),
    );
    assert_eq!(s.run(&mut RoundRobin::new(), 100_000), Outcome::AllDone);
    match end.get() {
        Some(ThreadEnd::InternalError(st)) => assert_eq!(st.code, Code::VcpuAssociated),
        other => panic!("{other:?}"),
    }
    assert!(bugs(&s.kvm).is_empty(), "{:?}", bugs(&s.kvm));
    assert!(!s.kvm.st.borrow().dead);
    let ends = [end.get()];
    let found = oracle::must_not_fail::internal_errors(&ends);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].contains("TDX_VCPU_ASSOCIATED"), "{}", found[0]);
    // A thread that finished its program is not one.
    assert!(oracle::must_not_fail::internal_errors(&[Some(ThreadEnd::GuestDone)]).is_empty());
}

/// `mmu_topup_memory_caches` runs before mmu_lock: when the host cannot refill the vCPU's MMU
/// caches, the fault fails with -ENOMEM out of KVM_RUN (no endless RET_PF_RETRY, no bug), and
/// the pages already cached are given back when the vCPU is destroyed.
#[test]
fn a_fault_that_cannot_top_up_its_caches_is_enomem() {
    let mut s = stack("upstream", 1);
    warm_up(&mut s);
    let cached = s.kvm.st.borrow().vcpus[0].mmu_caches.clone();
    assert!(
        cached.shadow.len() < harness::kvm::mmu::tdp_mmu::MMU_CACHE_MIN,
        "the warm-up fault used cached tables: {cached:?}"
    );
    s.host.borrow_mut().ledger.inject_alloc_failures(0, 1_000);
    // 2M region 1 needs a new 4K table: the topup must allocate and cannot.
    let (_, end) = s.spawn_vcpu(
        0,
        GuestProgram::new(vec![GuestOp::Accept { gpa: gpa(0x200) }]),
    );
    assert_eq!(s.run(&mut RoundRobin::new(), 100_000), Outcome::AllDone);
    assert_eq!(
        end.get(),
        Some(ThreadEnd::Error(harness::kvm::Errno::ENOMEM))
    );
    assert!(bugs(&s.kvm).is_empty(), "{:?}", bugs(&s.kvm));
    assert_eq!(
        s.module
            .state()
            .tds
            .values()
            .next()
            .unwrap()
            .sept
            .get(harness::addr::PgLevel::L4K, Gfn::new(0x200)),
        None
    );
}

/// `kvm_handle_gfn_range` (flush_on_ret) and `__kvm_gmem_invalidate_begin`: a zap that removed
/// a mapping ends with `kvm_flush_remote_tlbs` under mmu_lock, KVM_REQ_TLB_FLUSH to every vCPU;
/// a zap that found nothing does not flush.
#[test]
fn a_zap_that_removed_a_mapping_flushes_remote_tlbs() {
    let flushes = |s: &Stack| {
        s.ex.trace()
            .notes("kvm_make_all_cpus_request")
            .into_iter()
            .filter(|a| *a == u64::from(harness::kvm::Request::TlbFlush.bit()))
            .count()
    };
    let mut s = stack("upstream", 1);
    warm_up(&mut s);
    let before = flushes(&s);
    // Nothing is mapped at 0x30: no flush.
    s.run_setup(|cx, kvm| async move {
        kvm.set_memory_attributes(&cx, Gfn::new(0x30), Gfn::new(0x31), false)
            .await
            .unwrap();
    });
    assert_eq!(flushes(&s), before);
    // 0x10 is mapped: the conversion removes it and flushes.
    s.run_setup(|cx, kvm| async move {
        kvm.set_memory_attributes(&cx, Gfn::new(0x10), Gfn::new(0x11), false)
            .await
            .unwrap();
    });
    assert_eq!(flushes(&s), before + 1);
    assert!(s.kvm.test_request(0, harness::kvm::Request::TlbFlush));
}
