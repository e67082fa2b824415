//! Seed 004 (KVM_PRE_FAULT_MEMORY against a memslot deletion) as explicit schedules under
//! upstream and the designs that break it; KVM_TDX_INIT_MEM_REGION building pages with
//! TDH.MEM.PAGE.ADD; and the TDX ioctls refused in each TD state with upstream's errnos.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::rc::Rc;

use harness::addr::{Gfn, Gpa, PgLevel};
use harness::guest::{GuestOp, GuestProgram, Observation};
use harness::host::{KernelUse, Owner};
use harness::ids::{GmemId, Hkid, PgOff, SlotId};
use harness::kvm::vmx::build::{InitMemSource, TdxInitMemRegion, INIT_MEM_SOURCE_ADDR};
use harness::kvm::{Errno, Kvm, KvmResult, Request, TdState};
use harness::policy::Policy;
use harness::sched::{
    Ctx, Directive, Outcome, Point, RoundRobin, Script, TaskId, TraceMode, Until,
};
use harness::stack::{Stack, GUEST_PAGES};
use harness::tdx_module::{Code, Lp, SeptState};
use harness::vmm::ThreadEnd;

fn gpa(gfn: u64) -> Gpa {
    Gpa::new(gfn << 12)
}

fn script(steps: Vec<(TaskId, Until)>) -> Script {
    Script::new(
        steps
            .into_iter()
            .map(|(task, until)| Directive { task, until })
            .collect(),
    )
}

fn fatal_bugs(kvm: &Kvm) -> Vec<String> {
    kvm.st
        .borrow()
        .bugs
        .iter()
        .filter(|b| b.fatal)
        .map(|b| format!("{}: {}", b.location, b.what))
        .collect()
}

/// Runs one task to completion and returns what it produced.
fn call<T: 'static, F: Future<Output = T> + 'static>(
    s: &mut Stack,
    f: impl FnOnce(Ctx, Rc<Kvm>) -> F,
) -> T {
    let out = Rc::new(RefCell::new(None));
    let o = out.clone();
    s.run_setup(move |cx, kvm| {
        let fut = f(cx, kvm);
        async move {
            *o.borrow_mut() = Some(fut.await);
        }
    });
    let r = out.borrow_mut().take();
    r.expect("the task finished")
}

/// A runnable TD (upstream build) with `nvcpus` vCPUs.
fn runnable(policy: &str, nvcpus: u8) -> Stack {
    let mut s = Stack::new(Policy::by_name(policy).unwrap(), 600, TraceMode::Full);
    s.build_runnable(nvcpus);
    s
}

/// A TD after KVM_TDX_INIT_VM with `nvcpus` vCPUs, the first `ninit` of them initialized, and
/// the private memslot: ready for KVM_TDX_INIT_MEM_REGION, not finalized.
fn initialized(nvcpus: u8, ninit: u8) -> Stack {
    let mut s = Stack::new(Policy::UPSTREAM, 600, TraceMode::Full);
    s.run_setup(move |cx, kvm| async move {
        kvm.tdx_td_init(&cx, Hkid(32), 4).await.unwrap();
        for i in 0..nvcpus {
            let v = kvm.create_vcpu(Lp(i), GuestProgram::default()).unwrap();
            if i < ninit {
                kvm.tdx_td_vcpu_init(&cx, v).await.unwrap();
            }
        }
        let g = kvm.create_guest_memfd(GUEST_PAGES);
        kvm.create_memslot(
            &cx,
            SlotId(0),
            Gfn::new(0),
            GUEST_PAGES,
            Some((g, PgOff(0))),
        )
        .await
        .unwrap();
        kvm.set_memory_attributes(&cx, Gfn::new(0), Gfn::new(GUEST_PAGES), true)
            .await
            .unwrap();
    });
    s
}

fn init_mem(s: &mut Stack, v: usize, g: u64, value: u64, n: u64, measure: bool) -> KvmResult<()> {
    call(s, move |cx, kvm| async move {
        kvm.tdx_vcpu_init_mem_region(&cx, v, gpa(g), value, n, measure)
            .await
    })
}

fn init_region(
    s: &mut Stack,
    v: usize,
    mut region: TdxInitMemRegion,
    pages: Vec<u64>,
) -> (KvmResult<()>, TdxInitMemRegion) {
    call(s, move |cx, kvm| async move {
        let r = kvm
            .kvm_tdx_init_mem_region(&cx, v, &mut region, false, InitMemSource::Pages(&pages))
            .await;
        (r, region)
    })
}

fn finalize(s: &mut Stack) -> KvmResult<()> {
    call(s, |cx, kvm| async move { kvm.tdx_td_finalize(&cx).await })
}

fn prefault(s: &mut Stack, v: usize, at: Gpa, size: u64) -> KvmResult<u64> {
    call(s, move |cx, kvm| async move {
        kvm.kvm_vcpu_pre_fault_memory(&cx, v, at, size).await
    })
}

fn sept_state(s: &Stack, gfn: u64) -> SeptState {
    let tdr = s.kvm.st.borrow().tdx.tdr.unwrap();
    s.module.state().tds[&tdr]
        .sept
        .state(PgLevel::L4K, Gfn::new(gfn))
}

fn mrtd(s: &Stack) -> u64 {
    let tdr = s.kvm.st.borrow().tdx.tdr.unwrap();
    s.module.state().tds[&tdr].mrtd
}

/// What vCPU `v`'s guest observed, in order.
fn seen(s: &Stack, v: usize) -> Vec<Observation> {
    s.kvm.st.borrow().vcpus[v]
        .guest
        .seen
        .iter()
        .map(|(_, o)| *o)
        .collect()
}

/// SEAMCALLs of `leaf` that succeeded, from the trace.
fn successes(s: &Stack, leaf: &str) -> usize {
    s.ex.trace()
        .notes(leaf)
        .into_iter()
        .filter(|a| *a == 0)
        .count()
}

/// The guest_memfd page behind `gfn` (slot 0 maps gfn i to offset i of file 0).
fn gmem_page(s: &Stack, gfn: u64) -> Option<harness::addr::Pfn> {
    s.kvm
        .gmem_pages(GmemId(0))
        .into_iter()
        .find(|(o, _)| o.0 == gfn)
        .map(|(_, p)| p)
}

// ---------------------------------------------------------------------------------------
/// Issue 17 item 7: KVM_REQ_VM_DEAD is a waiting request. A KVM_BUG_ON raised while a vCPU
/// is in guest mode kicks it and returns only once it has left guest mode (the request's
/// KVM_REQUEST_WAIT); the vCPU's KVM_RUN then fails with -EIO.
#[test]
fn a_kvm_bug_on_waits_for_vcpus_to_leave_guest_mode() {
    let mut s = runnable("upstream", 1);
    let ops = (0..8)
        .map(|_| GuestOp::Read {
            gpa: gpa(0x20).to_shared(),
        })
        .collect();
    let (vcpu, end) = s.spawn_vcpu(0, GuestProgram::new(ops));
    let exits_when_done = Rc::new(Cell::new(None));
    let e = exits_when_done.clone();
    let bugger = s.spawn("bugger", move |cx, kvm| async move {
        kvm.bug(&cx, "test", "raised in another thread".into())
            .await;
        e.set(Some(kvm.st.borrow().vcpus[0].exits));
    });
    let mut sc = script(vec![
        (vcpu, Until::Point("guest".into())),
        (bugger, Until::Blocked),
    ]);
    let outcome = s.run(&mut sc, 20_000);
    assert_eq!(outcome, Outcome::AllDone, "{}", s.ex.render_trace());
    assert_eq!(
        exits_when_done.get(),
        Some(1),
        "KVM_BUG_ON returned before the vCPU left guest mode"
    );
    assert_eq!(end.get(), Some(ThreadEnd::Error(Errno::EIO)));
}

// Seed 004: KVM_PRE_FAULT_MEMORY holds SRCU; the memslot deletion synchronizes it.
// ---------------------------------------------------------------------------------------

type Res = Rc<Cell<Option<KvmResult<u64>>>>;

fn spawn_prefault(s: &mut Stack, name: &str, at: Gpa) -> (TaskId, Res) {
    let out: Res = Rc::default();
    let o = out.clone();
    let t = s.spawn(name, move |cx, kvm| async move {
        o.set(Some(kvm.kvm_vcpu_pre_fault_memory(&cx, 0, at, 4096).await));
    });
    (t, out)
}

/// Seed 004 itself: the prefault of a private page holds SRCU and is about to fault when the
/// VMM deletes the memslot (INVALID, then synchronize_srcu under slots_lock).
fn prefault_vs_delete(policy: &str) -> (Stack, Outcome, TaskId, Res) {
    let mut s = runnable(policy, 1);
    let (pf, out) = spawn_prefault(&mut s, "prefault", gpa(0x90));
    let vmm = s.spawn("vmm", |cx, kvm| async move {
        kvm.delete_memslot(&cx, SlotId(0)).await.unwrap();
    });
    let mut sc = script(vec![
        (pf, Until::Point("kvm_tdp_mmu_page_fault".into())),
        (vmm, Until::Blocked),
    ]);
    let outcome = s.run(&mut sc, 20_000);
    (s, outcome, pf, out)
}

#[test]
fn seed_004_upstream_prefault_returns_eagain_and_the_delete_completes() {
    let (s, outcome, _, out) = prefault_vs_delete("upstream");
    assert_eq!(outcome, Outcome::AllDone, "{}", s.ex.render_trace());
    assert_eq!(out.get(), Some(Err(Errno::EAGAIN)));
    assert!(s.kvm.st.borrow().memslots.slots.is_empty());
    assert!(fatal_bugs(&s.kvm).is_empty(), "{:?}", fatal_bugs(&s.kvm));
    assert!(oracle::liveness::check_outcome(&outcome, &s.ex, "kvm_set_memslot").is_none());
}

#[test]
fn seed_004_retry_holding_srcu_deadlocks_with_the_memslot_update() {
    let (s, outcome, pf, out) = prefault_vs_delete("prefault_retry_holding_srcu");
    let Outcome::BudgetExhausted(rep) = &outcome else {
        panic!("expected a spin-wait deadlock, got {outcome:?}")
    };
    assert!(!rep.cycle.is_empty(), "{rep:?}");
    assert!(rep.cycle.iter().any(|(t, _)| *t == pf));
    assert_eq!(out.get(), None, "the prefault never returns");
    let v = oracle::liveness::check_outcome(&outcome, &s.ex, "kvm_vcpu_pre_fault_memory")
        .expect("a liveness violation");
    assert!(v.key.starts_with("deadlock:"), "{}", v.key);
    assert!(v.key.contains("synchronize_srcu(kvm->srcu)"), "{}", v.key);
    // The prefault spins on the update that holds slots_lock; the update waits for its SRCU.
    assert_eq!(
        v.key,
        "deadlock:mutex_lock(slots_lock)+synchronize_srcu(kvm->srcu)"
    );
    assert!(s.kvm.st.borrow().memslots.slots[0].invalid);
}

/// The variants that drop SRCU need the vCPU's direct root to go obsolete to hang: the
/// prefault of a shared page gets -EAGAIN from the INVALID slot and (in the drop-SRCU designs)
/// stops right after dropping SRCU; the VMM then finishes the deletion, toggles nx_huge_pages
/// (`kvm_mmu_zap_all_fast`: direct roots invalidated, KVM_REQ_MMU_FREE_OBSOLETE_ROOTS) if
/// `fast_zap`, and recreates the slot (as QEMU does when it remaps a region).
fn prefault_vs_delete_recreate(policy: &str, fast_zap: bool) -> (Stack, Outcome, TaskId, Res) {
    let mut s = runnable(policy, 1);
    let shared = Gfn::new(0x80);
    s.run_setup(move |cx, kvm| async move {
        kvm.set_memory_attributes(&cx, shared, shared.add(1), false)
            .await
            .unwrap();
    });
    let gmem = s.kvm.st.borrow().memslots.slots[0].gmem;
    let (pf, out) = spawn_prefault(&mut s, "prefault", shared.gpa());
    let vmm = s.spawn("vmm", move |cx, kvm| async move {
        kvm.delete_memslot(&cx, SlotId(0)).await.unwrap();
        if fast_zap {
            kvm.kvm_mmu_zap_all_fast(&cx).await;
        }
        kvm.create_memslot(&cx, SlotId(0), Gfn::new(0), GUEST_PAGES, gmem)
            .await
            .unwrap();
    });
    let mut sc = script(vec![
        (pf, Until::Point("kvm_tdp_mmu_page_fault".into())),
        (vmm, Until::Blocked),
        (
            pf,
            Until::Point("kvm_tdp_prefault_page:srcu_dropped".into()),
        ),
        (vmm, Until::Blocked),
    ]);
    let outcome = s.run(&mut sc, 20_000);
    (s, outcome, pf, out)
}

#[test]
fn seed_004_upstream_survives_a_fast_zap_and_the_retry_maps_into_a_new_root() {
    let (mut s, outcome, _, out) = prefault_vs_delete_recreate("upstream", true);
    assert_eq!(outcome, Outcome::AllDone, "{}", s.ex.render_trace());
    assert_eq!(out.get(), Some(Err(Errno::EAGAIN)));
    let old_root = s.kvm.st.borrow().vcpus[0].root.unwrap();
    assert!(s.kvm.st.borrow().mmu.get(old_root).invalid);
    assert!(s.kvm.test_request(0, Request::MmuFreeObsoleteRoots));
    // Userspace retries: kvm_mmu_reload frees the obsolete root and loads a new one.
    assert_eq!(prefault(&mut s, 0, gpa(0x80), 4096), Ok(4096));
    let st = s.kvm.st.borrow();
    let root = st.vcpus[0].root.unwrap();
    assert_ne!(root, old_root);
    assert!(
        !st.mmu.sps.contains_key(&old_root),
        "the obsolete root is freed"
    );
    let (sp, idx) = st.mmu.walk(root, Gfn::new(0x80), PgLevel::L4K).unwrap();
    assert!(st.mmu.spte(sp, idx).is_leaf());
    assert!(fatal_bugs(&s.kvm).is_empty());
}

fn assert_prefault_never_finishes(policy: &str) {
    let (s, outcome, pf, out) = prefault_vs_delete_recreate(policy, true);
    let Outcome::BudgetExhausted(rep) = &outcome else {
        panic!("{policy}: expected no progress, got {outcome:?}")
    };
    assert_eq!(out.get(), None, "{policy}: the prefault never returns");
    let pending: Vec<TaskId> = rep.pending.iter().map(|(t, _, _)| *t).collect();
    assert_eq!(pending, vec![pf], "{policy}: only the prefault is left");
    let v = oracle::liveness::check_outcome(&outcome, &s.ex, "kvm_vcpu_pre_fault_memory")
        .expect("a liveness violation");
    assert!(
        v.key.starts_with("no-progress:") || v.key.starts_with("deadlock:"),
        "{policy}: {}",
        v.key
    );
    // Why: the direct root is obsolete and nobody processes the request to drop it.
    let st = s.kvm.st.borrow();
    let root = st.vcpus[0].root.unwrap();
    assert!(st.mmu.get(root).invalid, "{policy}");
    assert!(st.vcpus[0].requests & Request::MmuFreeObsoleteRoots.bit() != 0);
    drop(st);
    // The same schedule without the fast zap: the retry succeeds once the slot is back.
    let (_, outcome, _, out) = prefault_vs_delete_recreate(policy, false);
    assert_eq!(outcome, Outcome::AllDone, "{policy} without a fast zap");
    assert_eq!(out.get(), Some(Ok(4096)), "{policy} without a fast zap");
}

#[test]
fn seed_004_drop_srcu_no_reload_never_makes_progress() {
    assert_prefault_never_finishes("prefault_drop_srcu_no_reload");
}

#[test]
fn seed_004_reload_no_free_obsolete_never_makes_progress() {
    assert_prefault_never_finishes("prefault_reload_no_free_obsolete");
}

// ---------------------------------------------------------------------------------------
// KVM_PRE_FAULT_MEMORY without a memslot update.
// ---------------------------------------------------------------------------------------

#[test]
fn prefault_augs_private_pages_the_guest_then_accepts() {
    let mut s = runnable("upstream", 1);
    assert_eq!(prefault(&mut s, 0, gpa(0x40), 3 * 4096), Ok(3 * 4096));
    for g in 0x40..0x43 {
        assert_eq!(sept_state(&s, g), SeptState::Pending, "gfn {g:#x}");
    }
    // Again: every SPTE is present, the prefetch faults are spurious.
    assert_eq!(prefault(&mut s, 0, gpa(0x40), 3 * 4096), Ok(3 * 4096));
    assert!(oracle::sept_sync::check(&s.kvm, true).is_empty());
    let (t, _) = s.spawn_vcpu(
        0,
        GuestProgram::new(vec![GuestOp::Accept { gpa: gpa(0x41) }]),
    );
    assert_eq!(s.run(&mut RoundRobin::new(), 100_000), Outcome::AllDone);
    assert!(s.cx.is_done(t));
    let seen = seen(&s, 0);
    assert_eq!(
        seen,
        vec![Observation::Accepted {
            gpa: gpa(0x41),
            code: Code::Success
        }]
    );
    assert!(fatal_bugs(&s.kvm).is_empty());
}

#[test]
fn prefault_refusals() {
    // Before KVM_TDX_FINALIZE_VM: pre_fault_allowed is false.
    let mut s = initialized(1, 1);
    assert_eq!(prefault(&mut s, 0, gpa(0x40), 4096), Err(Errno::EOPNOTSUPP));
    let mut s = runnable("upstream", 1);
    // Unaligned GPA or size, empty or wrapping range.
    assert_eq!(
        prefault(&mut s, 0, Gpa::new(0x40_010), 4096),
        Err(Errno::EINVAL)
    );
    assert_eq!(prefault(&mut s, 0, gpa(0x40), 100), Err(Errno::EINVAL));
    assert_eq!(prefault(&mut s, 0, gpa(0x40), 0), Err(Errno::EINVAL));
    assert_eq!(
        prefault(&mut s, 0, gpa(0x40), u64::MAX - 4095),
        Err(Errno::EINVAL)
    );
    // An alias (shared-bit) GPA.
    assert_eq!(
        prefault(&mut s, 0, gpa(0x40).to_shared(), 4096),
        Err(Errno::EINVAL)
    );
    // No memslot: the fault would need emulation.
    assert_eq!(
        prefault(&mut s, 0, gpa(GUEST_PAGES + 5), 4096),
        Err(Errno::ENOENT)
    );
    // A range running out of the memslot maps what it can and reports it.
    assert_eq!(
        prefault(&mut s, 0, gpa(GUEST_PAGES - 1), 2 * 4096),
        Ok(4096)
    );
    // A signal before the first chunk.
    s.kvm.st.borrow_mut().vcpus[0].signal_pending = true;
    assert_eq!(prefault(&mut s, 0, gpa(0x50), 4096), Err(Errno::EINTR));
    assert_eq!(sept_state(&s, 0x50), SeptState::Free);
}

// ---------------------------------------------------------------------------------------
// KVM_TDX_INIT_MEM_REGION.
// ---------------------------------------------------------------------------------------

#[test]
fn init_mem_region_adds_pages_and_the_guest_reads_them() {
    let mut s = initialized(1, 1);
    let before = mrtd(&s);
    assert_eq!(init_mem(&mut s, 0, 0x100, 0xabcd, 3, true), Ok(()));
    for g in 0x100..0x103 {
        assert_eq!(sept_state(&s, g), SeptState::Mapped, "gfn {g:#x}");
        let page = gmem_page(&s, g).expect("guest_memfd page");
        assert_eq!(s.host.borrow().read(page), 0xabcd, "contents copied");
        let tdr = s.kvm.st.borrow().tdx.tdr.unwrap();
        let e = s.module.state().tds[&tdr]
            .sept
            .get(PgLevel::L4K, Gfn::new(g))
            .unwrap();
        assert_eq!(e.pfn, page);
    }
    assert_ne!(mrtd(&s), before);
    assert!(oracle::sept_sync::check(&s.kvm, true).is_empty());
    assert_eq!(s.kvm.st.borrow().tdx.page_add_src, None);
    // The source pages went back to the kernel.
    let in_use = s
        .host
        .borrow()
        .ledger
        .iter()
        .filter(|(_, e)| e.owner == Owner::Kernel(KernelUse::Other))
        .count();
    assert_eq!(in_use, 0);
    assert_eq!(successes(&s, "TDH.MEM.PAGE.ADD"), 3);
    assert_eq!(successes(&s, "TDH.MEM.PAGE.AUG"), 0);
    assert_eq!(successes(&s, "TDH.MR.EXTEND"), 3 * 16);

    assert_eq!(finalize(&mut s), Ok(()));
    s.spawn_vcpu(
        0,
        GuestProgram::new(vec![
            GuestOp::Read { gpa: gpa(0x101) },
            GuestOp::Read { gpa: gpa(0x102) },
        ]),
    );
    assert_eq!(s.run(&mut RoundRobin::new(), 100_000), Outcome::AllDone);
    let seen = seen(&s, 0);
    assert_eq!(
        seen,
        vec![
            Observation::Read {
                gpa: gpa(0x101),
                value: 0xabcd
            },
            Observation::Read {
                gpa: gpa(0x102),
                value: 0xabcd
            },
        ]
    );
    assert!(fatal_bugs(&s.kvm).is_empty(), "{:?}", fatal_bugs(&s.kvm));
}

#[test]
fn measured_region_extends_mrtd_with_the_contents() {
    let build = |value, measure| {
        let mut s = initialized(1, 1);
        init_mem(&mut s, 0, 0x100, value, 1, measure).unwrap();
        mrtd(&s)
    };
    // PAGE.ADD alone measures the GPA only; MR.EXTEND adds the contents.
    assert_eq!(build(1, false), build(2, false));
    assert_ne!(build(1, true), build(2, true));
    assert_ne!(build(1, true), build(1, false));
    let mut s = initialized(1, 1);
    init_mem(&mut s, 0, 0x100, 1, 1, false).unwrap();
    assert_eq!(successes(&s, "TDH.MR.EXTEND"), 0);
}

#[test]
fn init_mem_region_refuses_populated_and_shared_pages_and_reports_progress() {
    let mut s = initialized(1, 1);
    assert_eq!(init_mem(&mut s, 0, 0x100, 7, 1, false), Ok(()));
    // Already prepared in guest_memfd.
    assert_eq!(init_mem(&mut s, 0, 0x100, 7, 1, false), Err(Errno::EEXIST));
    // gfn 0x302 is shared: the first two pages are added, the third refused; the region
    // comes back with the progress made.
    s.run_setup(|cx, kvm| async move {
        kvm.set_memory_attributes(&cx, Gfn::new(0x302), Gfn::new(0x303), false)
            .await
            .unwrap();
    });
    let start = TdxInitMemRegion {
        source_addr: INIT_MEM_SOURCE_ADDR,
        gpa: 0x300 << 12,
        nr_pages: 4,
    };
    let (r, left) = init_region(&mut s, 0, start, vec![10, 11, 12, 13]);
    assert_eq!(r, Err(Errno::EINVAL));
    assert_eq!(
        left,
        TdxInitMemRegion {
            source_addr: INIT_MEM_SOURCE_ADDR + 2 * 4096,
            gpa: 0x302 << 12,
            nr_pages: 2,
        }
    );
    assert_eq!(sept_state(&s, 0x300), SeptState::Mapped);
    assert_eq!(sept_state(&s, 0x301), SeptState::Mapped);
    assert_eq!(sept_state(&s, 0x302), SeptState::Free);
    assert_eq!(s.host.borrow().read(gmem_page(&s, 0x301).unwrap()), 11);
    // The source buffer ends after one page: the second page's source is not mapped.
    let start = TdxInitMemRegion {
        source_addr: INIT_MEM_SOURCE_ADDR,
        gpa: 0x400 << 12,
        nr_pages: 2,
    };
    let (r, left) = init_region(&mut s, 0, start, vec![5]);
    assert_eq!(r, Err(Errno::EFAULT));
    assert_eq!(left.nr_pages, 1);
    assert_eq!(sept_state(&s, 0x400), SeptState::Mapped);
    assert_eq!(sept_state(&s, 0x401), SeptState::Free);
    // A signal: nothing is added.
    s.kvm.st.borrow_mut().vcpus[0].signal_pending = true;
    assert_eq!(init_mem(&mut s, 0, 0x500, 1, 1, false), Err(Errno::EINTR));
    assert_eq!(sept_state(&s, 0x500), SeptState::Free);
    assert!(oracle::sept_sync::check(&s.kvm, true).is_empty());
    assert!(fatal_bugs(&s.kvm).is_empty(), "{:?}", fatal_bugs(&s.kvm));
}

#[test]
fn init_mem_region_refuses_bad_arguments() {
    let mut s = initialized(1, 1);
    let ok = TdxInitMemRegion {
        source_addr: INIT_MEM_SOURCE_ADDR,
        gpa: 0x100 << 12,
        nr_pages: 1,
    };
    let bad = [
        TdxInitMemRegion {
            gpa: (0x100 << 12) + 8,
            ..ok
        },
        TdxInitMemRegion { nr_pages: 0, ..ok },
        TdxInitMemRegion {
            source_addr: INIT_MEM_SOURCE_ADDR + 8,
            ..ok
        },
        TdxInitMemRegion {
            source_addr: 0,
            ..ok
        },
        TdxInitMemRegion {
            gpa: gpa(0x100).to_shared().raw(),
            ..ok
        },
        // The last page crosses into the shared half.
        TdxInitMemRegion {
            gpa: gpa(0x100).to_shared().raw() - 4096,
            nr_pages: 2,
            ..ok
        },
        TdxInitMemRegion {
            nr_pages: u64::MAX / 4096 + 1,
            ..ok
        },
    ];
    for region in bad {
        let (r, left) = init_region(&mut s, 0, region, vec![1, 1]);
        assert_eq!(r, Err(Errno::EINVAL), "{region:?}");
        assert_eq!(left, region, "nothing done");
    }
    assert_eq!(sept_state(&s, 0x100), SeptState::Free);
    // The same region with valid arguments works.
    assert_eq!(init_region(&mut s, 0, ok, vec![1]).0, Ok(()));
}

#[test]
fn init_mem_region_refused_for_an_uninitialized_vcpu_and_after_finalize() {
    let mut s = initialized(2, 1);
    assert_eq!(init_mem(&mut s, 1, 0x100, 1, 1, false), Err(Errno::EINVAL));
    assert_eq!(sept_state(&s, 0x100), SeptState::Free);
    assert_eq!(finalize(&mut s), Ok(()));
    assert_eq!(init_mem(&mut s, 0, 0x100, 1, 1, false), Err(Errno::EINVAL));
    assert_eq!(sept_state(&s, 0x100), SeptState::Free);
}

// ---------------------------------------------------------------------------------------
// The other TDX ioctls, refused per TD state.
// ---------------------------------------------------------------------------------------

#[test]
fn init_vm_refused_unless_uninitialized() {
    let mut s = initialized(1, 1);
    let init = |s: &mut Stack| {
        call(s, |cx, kvm| async move {
            kvm.tdx_td_init(&cx, Hkid(33), 4).await
        })
    };
    assert_eq!(init(&mut s), Err(Errno::EINVAL), "INITIALIZED");
    assert_eq!(finalize(&mut s), Ok(()));
    assert_eq!(init(&mut s), Err(Errno::EINVAL), "RUNNABLE");
    assert_eq!(s.kvm.st.borrow().tdx.hkid, Some(Hkid(32)));
}

#[test]
fn init_vm_refused_while_a_vcpu_is_being_created() {
    let mut s = Stack::new(Policy::UPSTREAM, 600, TraceMode::Full);
    let created: Rc<Cell<Option<KvmResult<usize>>>> = Rc::default();
    let inited: Rc<Cell<Option<KvmResult<()>>>> = Rc::default();
    let (c, i) = (created.clone(), inited.clone());
    let vcpu = s.spawn("create_vcpu", move |cx, kvm| async move {
        c.set(Some(
            kvm.kvm_vm_ioctl_create_vcpu(&cx, Lp(0), GuestProgram::default())
                .await,
        ));
    });
    let vm = s.spawn("init_vm", move |cx, kvm| async move {
        i.set(Some(kvm.tdx_td_init(&cx, Hkid(32), 4).await));
    });
    // KVM_CREATE_VCPU has counted the vCPU and is creating it when KVM_TDX_INIT_VM runs.
    let mut sc = script(vec![
        (vcpu, Until::Point("kvm_arch_vcpu_create".into())),
        (vm, Until::Blocked),
    ]);
    assert_eq!(s.run(&mut sc, 10_000), Outcome::AllDone);
    assert_eq!(inited.get(), Some(Err(Errno::EBUSY)));
    assert_eq!(
        created.get(),
        Some(Err(Errno::EIO)),
        "the TD is not initialized"
    );
    assert_eq!(s.kvm.st.borrow().created_vcpus, 0);
    assert_eq!(s.kvm.st.borrow().tdx.state, TdState::Uninitialized);
    // With no creation in flight INIT_VM goes through, and a vCPU can be created after it.
    assert_eq!(
        call(&mut s, |cx, kvm| async move {
            kvm.tdx_td_init(&cx, Hkid(32), 4).await
        }),
        Ok(())
    );
    assert_eq!(
        call(&mut s, |cx, kvm| async move {
            kvm.kvm_vm_ioctl_create_vcpu(&cx, Lp(0), GuestProgram::default())
                .await
        }),
        Ok(0)
    );
}

#[test]
fn create_vcpu_refused_unless_initialized() {
    let s = Stack::new(Policy::UPSTREAM, 600, TraceMode::Full);
    assert_eq!(
        s.kvm.create_vcpu(Lp(0), GuestProgram::default()),
        Err(Errno::EIO),
        "UNINITIALIZED"
    );
    assert_eq!(s.kvm.st.borrow().created_vcpus, 0);
    let s = runnable("upstream", 1);
    assert_eq!(
        s.kvm.create_vcpu(Lp(1), GuestProgram::default()),
        Err(Errno::EIO),
        "RUNNABLE"
    );
    assert_eq!(s.kvm.st.borrow().vcpus.len(), 1);
}

#[test]
fn init_vcpu_refused_twice_and_after_finalize() {
    let mut s = initialized(2, 1);
    let init_vcpu = |s: &mut Stack, v| {
        call(s, move |cx, kvm| async move {
            kvm.tdx_td_vcpu_init(&cx, v).await
        })
    };
    assert_eq!(
        init_vcpu(&mut s, 0),
        Err(Errno::EINVAL),
        "already initialized"
    );
    assert_eq!(finalize(&mut s), Ok(()));
    assert_eq!(init_vcpu(&mut s, 1), Err(Errno::EINVAL), "RUNNABLE");
    assert!(!s.kvm.st.borrow().vcpus[1].initialized);
    assert_eq!(s.kvm.st.borrow().vcpus[1].tdvpr, None);
}

#[test]
fn finalize_refused_without_hkid_and_twice() {
    let mut s = Stack::new(Policy::UPSTREAM, 600, TraceMode::Full);
    assert_eq!(finalize(&mut s), Err(Errno::EINVAL), "UNINITIALIZED");
    let mut s = initialized(1, 1);
    assert_eq!(finalize(&mut s), Ok(()));
    assert!(s.kvm.st.borrow().tdx.pre_fault_allowed);
    assert_eq!(finalize(&mut s), Err(Errno::EINVAL), "RUNNABLE");
}

#[test]
fn kvm_run_refused_before_finalize_and_for_an_uninitialized_vcpu() {
    let run = |s: &mut Stack, v| {
        call(s, move |cx, kvm| async move {
            kvm.kvm_run(&cx, v).await.map(|_| ())
        })
    };
    let mut s = initialized(2, 1);
    assert_eq!(run(&mut s, 0), Err(Errno::EINVAL), "TD not RUNNABLE");
    assert_eq!(finalize(&mut s), Ok(()));
    assert_eq!(run(&mut s, 1), Err(Errno::EINVAL), "vCPU not INITIALIZED");
    assert_eq!(
        run(&mut s, 0),
        Ok(()),
        "an empty guest program just finishes"
    );
}

#[test]
fn a_dead_vm_refuses_vcpu_and_vm_ioctls_with_eio() {
    let mut s = initialized(1, 1);
    call(&mut s, |cx, kvm| async move { kvm.vm_dead(&cx).await });
    assert_eq!(init_mem(&mut s, 0, 0x100, 1, 1, false), Err(Errno::EIO));
    assert_eq!(finalize(&mut s), Err(Errno::EIO));
    assert_eq!(
        call(&mut s, |cx, kvm| async move {
            kvm.tdx_td_vcpu_init(&cx, 0).await
        }),
        Err(Errno::EIO)
    );
    assert_eq!(prefault(&mut s, 0, gpa(0x40), 4096), Err(Errno::EIO));
    // The memory ioctls are VM ioctls too (kvm_vm_ioctl checks kvm->vm_dead first).
    let vm_ioctls = call(&mut s, |cx, kvm| async move {
        vec![
            kvm.set_memory_attributes(&cx, Gfn::new(0x10), Gfn::new(0x11), false)
                .await,
            kvm.delete_memslot(&cx, SlotId(0)).await,
            kvm.create_memslot(&cx, SlotId(1), Gfn::new(0x1000), 1, None)
                .await,
        ]
    });
    assert_eq!(vm_ioctls, vec![Err(Errno::EIO); 3]);
    assert_eq!(s.kvm.st.borrow().memslots.slots.len(), 1);
    assert_eq!(s.kvm.st.borrow().tdx.state, TdState::Initialized);
}

/// `kvm_gmem_populate` holds the guest_memfd's invalidate lock across the page: a punch-hole of
/// that page waits until PAGE.ADD is done and then removes it (no page freed under the
/// callback).
#[test]
fn populate_holds_the_invalidate_lock_against_a_punch_hole() {
    let mut s = initialized(1, 1);
    let file = GmemId(0);
    let pop = s.spawn("populate", |cx, kvm| async move {
        kvm.tdx_vcpu_init_mem_region(&cx, 0, gpa(0x100), 7, 1, false)
            .await
            .unwrap();
    });
    let punch = s.spawn("punch", move |cx, kvm| async move {
        kvm.kvm_gmem_punch_hole(&cx, file, PgOff(0x100), 1)
            .await
            .unwrap();
    });
    let mut sc = script(vec![
        (pop, Until::Point("TDH.MEM.PAGE.ADD".into())),
        (punch, Until::Blocked),
    ]);
    assert_eq!(s.run(&mut sc, 100_000), Outcome::AllDone);
    let punch_blocked_on_invalidate_lock = s.ex.trace().events().any(|e| {
        e.task == punch
            && matches!(e.point, Point::Blocked { obj } if s.ex.obj_names()[obj.0 as usize] == "filemap_invalidate_lock")
    });
    assert!(punch_blocked_on_invalidate_lock);
    assert_eq!(sept_state(&s, 0x100), SeptState::Free);
    assert_eq!(gmem_page(&s, 0x100), None);
    assert!(
        s.host.borrow().refused.is_empty(),
        "{:?}",
        s.host.borrow().refused
    );
    assert!(fatal_bugs(&s.kvm).is_empty(), "{:?}", fatal_bugs(&s.kvm));
    assert!(oracle::sept_sync::check(&s.kvm, true).is_empty());
}

/// `__tdx_td_init` and `tdx_td_vcpu_init` allocate every control page before the first
/// SEAMCALL: a host that runs out part way gets -ENOMEM with nothing made and nothing kept.
/// Rows: host pages, how many vCPUs to create and init, what fails.
#[test]
fn td_and_vcpu_build_allocate_every_page_before_the_seamcall() {
    let cfg = harness::tdx_module::ModuleConfig::default();
    let td_pages = 1 + cfg.tdcs_pages;
    let rows: [(&str, usize, bool); 3] = [
        ("TDR only", 1, false),
        ("all but the last TDCS page", td_pages - 1, false),
        (
            "the TD, all but the last TDCX page",
            td_pages + cfg.tdvps_pages - 1,
            true,
        ),
    ];
    for (what, pages, vcpu) in rows {
        let mut s = Stack::new(Policy::UPSTREAM, pages, TraceMode::Full);
        let (init, vcpu_init) = call(&mut s, move |cx, kvm| async move {
            let init = kvm.tdx_td_init(&cx, Hkid(32), 4).await;
            let mut vi = None;
            if vcpu {
                let v = kvm.create_vcpu(Lp(0), GuestProgram::default()).unwrap();
                vi = Some(kvm.tdx_td_vcpu_init(&cx, v).await);
            }
            (init, vi)
        });
        let trace = s.ex.render_trace();
        if vcpu {
            assert_eq!(init, Ok(()), "{what}");
            assert_eq!(vcpu_init, Some(Err(Errno::ENOMEM)), "{what}");
            assert!(!trace.contains("TDH.VP.CREATE"), "{what}: no SEAMCALL made");
            let st = s.kvm.st.borrow();
            assert!(st.vcpus[0].tdvpr.is_none() && st.vcpus[0].tdcx.is_empty());
            // Only the TD's pages are in use.
            assert_eq!(s.host.borrow().ledger.census().free, cfg.tdvps_pages - 1);
        } else {
            assert_eq!(init, Err(Errno::ENOMEM), "{what}");
            assert!(
                !trace.contains("TDH.MNG.CREATE"),
                "{what}: no SEAMCALL made"
            );
            let st = s.kvm.st.borrow();
            assert_eq!(st.tdx.state, TdState::Uninitialized);
            assert!(st.tdx.tdr.is_none() && st.tdx.hkid.is_none());
            assert_eq!(s.host.borrow().ledger.census().free, pages, "{what}");
        }
    }
}

/// TDH.MNG.CREATE runs under tdx.c's global `tdx_lock` (as the HKID release does).
#[test]
fn mng_create_runs_under_tdx_lock() {
    let s = runnable("upstream", 1);
    let trace = s.ex.render_trace();
    let at = |what: &str| trace.find(what).unwrap_or_else(|| panic!("{what}"));
    assert!(at("lock(tdx_lock)") < at("TDH.MNG.CREATE"));
    assert!(at("TDH.MNG.CREATE") < at("unlock(tdx_lock)"));
}

/// `kvm_vcpu_ioctl` answers -EIO on a dead VM before it takes `vcpu->mutex`, so KVM_RUN does
/// not wait behind another ioctl of the vCPU; a second KVM_BUG_ON on a bugged VM is silent.
#[test]
fn a_dead_vm_answers_kvm_run_at_once_and_bugs_once() {
    let mut s = runnable("upstream", 1);
    let r = call(&mut s, |cx, kvm| async move {
        // Another thread holds vcpu->mutex and never lets go.
        let m = kvm.st.borrow().vcpus[0].mutex;
        m.lock(&cx).await;
        kvm.bug(&cx, "test", "first".into()).await;
        kvm.bug(&cx, "test", "second".into()).await;
        kvm.kvm_run(&cx, 0).await
    });
    assert_eq!(r.err(), Some(Errno::EIO));
    assert_eq!(fatal_bugs(&s.kvm), ["test: first"]);
}

/// The scenario op reaches the alias refusal: `prefault ... shared` passes the shared-bit GPA,
/// which KVM_PRE_FAULT_MEMORY refuses for a TD with -EINVAL (`kvm_is_gfn_alias`).
#[test]
fn prefault_op_of_the_shared_alias_is_einval() {
    use harness::run::RunConfig;
    use harness::scenario::text::{parse, print};
    for (shared, want) in [(false, vec![]), (true, vec![Errno::EINVAL])] {
        let text = format!(
            "vcpus 1\ntask vmm0\n  prefault vcpu0 0x40 2{}\n",
            if shared { " shared" } else { "" }
        );
        let sc = parse(&text).unwrap();
        assert_eq!(print(&sc), text);
        let rep = oracle::check::run_scenario(
            &sc,
            &RunConfig::new(Policy::UPSTREAM, TraceMode::Ring(32)),
        );
        assert!(rep.violation.is_none(), "{text}");
        let errs = rep.run.vmm_errnos();
        assert_eq!(errs, want, "{text}");
    }
}
