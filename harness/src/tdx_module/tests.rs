//! Module-level tests written from the module's source (intel/tdx-module 1666adc) and ABI:
//! end-to-end build/run/teardown, the tracking rules, the contention table of seed 000, and
//! zero-step mitigation. Per-leaf error-path tests live in harness/tests/tdx_module_*.rs.

use std::cell::RefCell;
use std::rc::Rc;

use super::testkit::*;
use super::*;
use crate::host::KernelUse;
use crate::sched::{Directive, Outcome, Script, TaskId, Until};

const HKID: Hkid = Hkid(32);

fn gpa(n: u64) -> Gpa {
    Gpa::new(n << 12)
}

fn bench() -> Bench {
    Bench::new(
        ModuleConfig {
            packages: 2,
            ..ModuleConfig::default()
        },
        400,
    )
}

/// Builds and finalizes a TD with `nvcpus` vCPUs in a first task; returns it.
fn runnable_td(b: &mut Bench, nvcpus: u8) -> BuiltTd {
    let out = Rc::new(RefCell::new(None));
    let o = out.clone();
    b.run(move |cx, m| async move {
        let td = build_td(&cx, &m, HKID, nvcpus).await;
        m.tdh_mr_finalize(&cx, td.tdr).await.expect("MR.FINALIZE");
        *o.borrow_mut() = Some(td);
    });
    let td = out.borrow_mut().take().unwrap();
    td
}

#[test]
fn life_cycle_returns_every_page() {
    let mut b = bench();
    let before = b.host.borrow().ledger.census();
    b.run(|cx, m| async move {
        let td = build_td(&cx, &m, HKID, 2).await;
        // Build-time page: PAGE.ADD + MR.EXTEND.
        let sept = link_path(&cx, &m, td.tdr, gpa(0x10)).await;
        let src = alloc(&m, KernelUse::Other);
        m.host().borrow_mut().write(src, 0xabcd);
        let p = alloc_guest(&m, gpa(0x10));
        m.tdh_mem_page_add(&cx, td.tdr, gpa(0x10), p, src)
            .await
            .unwrap();
        assert_eq!(m.host().borrow().read(p), 0xabcd);
        m.tdh_mr_extend(&cx, td.tdr, gpa(0x10)).await.unwrap();
        m.tdh_mr_finalize(&cx, td.tdr).await.unwrap();
        // Runtime page: AUG, guest ACCEPT (zeroes), guest write.
        let q = aug(&cx, &m, td.tdr, gpa(0x11)).await.unwrap();
        let v0 = td.vcpus[0].tdvpr;
        assert_eq!(
            m.tdh_vp_enter(&cx, Lp(0), v0, 0).await,
            Ok(EnterOutcome::Entered)
        );
        assert_eq!(
            m.guest_private_access(v0, gpa(0x11), 0),
            AccessResult::VirtualizationException
        );
        let r = m
            .tdg_mem_page_accept(&cx, v0, gpa(0x11), PgLevel::L4K)
            .await
            .unwrap();
        assert_eq!(r.status, Status::SUCCESS);
        assert_eq!(
            m.guest_private_access(v0, gpa(0x11), 1),
            AccessResult::Mapped(q)
        );
        m.td_exit(v0, 1);
        // Remove both guest pages while the HKID is assigned, then tear down.
        remove_4k(&cx, &m, td.tdr, gpa(0x10)).await.unwrap();
        remove_4k(&cx, &m, td.tdr, gpa(0x11)).await.unwrap();
        {
            let mut h = m.host().borrow_mut();
            h.ledger.free(src).unwrap();
        }
        teardown(&cx, &m, &td, &sept).await;
        assert!(m.state().tds.is_empty());
        assert!(m.state().pamt.iter().next().is_none());
        assert!(m.state().locks.none_held());
    });
    let h = b.host.borrow();
    assert!(h.refused.is_empty(), "{:?}", h.refused);
    assert!(h.ledger.unaccounted().is_empty());
    assert_eq!(h.ledger.census(), before);
}

#[test]
fn tdr_reclaim_is_refused_until_last() {
    let mut b = bench();
    b.run(|cx, m| async move {
        let td = build_td(&cx, &m, HKID, 1).await;
        // Before the HKID is released: LIFECYCLE_STATE_INCORRECT for TDR and children.
        let e = m.tdh_phymem_page_reclaim(&cx, td.tdr).await.unwrap_err();
        assert_eq!(e.status, Status::new(Code::LifecycleStateIncorrect));
        let e = m
            .tdh_phymem_page_reclaim(&cx, td.tdcs[0])
            .await
            .unwrap_err();
        assert_eq!(e.status, Status::new(Code::LifecycleStateIncorrect));
        // KEY.FREEID before VPFLUSHDONE, VPFLUSHDONE before the vCPU is flushed.
        let e = m.tdh_mng_key_freeid(&cx, td.tdr).await.unwrap_err();
        assert_eq!(e.status, Status::new(Code::LifecycleStateIncorrect));
        let e = m.tdh_mng_vpflushdone(&cx, td.tdr).await.unwrap_err();
        assert_eq!(e.status, Status::new(Code::FlushvpNotDone));
        // VP.FLUSH from the wrong LP.
        let e = m
            .tdh_vp_flush(&cx, Lp(3), td.vcpus[0].tdvpr)
            .await
            .unwrap_err();
        assert_eq!(e.status, Status::new(Code::VcpuNotAssociated));
        m.tdh_vp_flush(&cx, td.vcpus[0].lp, td.vcpus[0].tdvpr)
            .await
            .unwrap();
        m.tdh_mng_vpflushdone(&cx, td.tdr).await.unwrap();
        // KEY.FREEID before CACHE.WB on both packages.
        let e = m.tdh_mng_key_freeid(&cx, td.tdr).await.unwrap_err();
        assert_eq!(e.status, Status::new(Code::WbcacheNotComplete));
        m.inject(|i| i.cache_wb_interrupts = 1);
        let e = m
            .tdh_phymem_cache_wb(&cx, Lp(0), CacheWbCmd::Start)
            .await
            .unwrap_err();
        assert_eq!(e.status, Status::new(Code::InterruptedResumable));
        m.tdh_phymem_cache_wb(&cx, Lp(0), CacheWbCmd::Resume)
            .await
            .unwrap();
        let e = m
            .tdh_phymem_cache_wb(&cx, Lp(0), CacheWbCmd::Resume)
            .await
            .unwrap_err();
        assert_eq!(e.status, Status::new(Code::WbcacheResumeError));
        let e = m.tdh_mng_key_freeid(&cx, td.tdr).await.unwrap_err();
        assert_eq!(e.status, Status::new(Code::WbcacheNotComplete));
        m.tdh_phymem_cache_wb(&cx, Lp(1), CacheWbCmd::Start)
            .await
            .unwrap();
        m.tdh_mng_key_freeid(&cx, td.tdr).await.unwrap();
        // Nothing left to write back.
        let e = m
            .tdh_phymem_cache_wb(&cx, Lp(1), CacheWbCmd::Start)
            .await
            .unwrap_err();
        assert_eq!(e.status, Status::new(Code::NoHkidReadyToWbcache));
        assert!(!e.status.is_error());
        // TDR first: its children still exist.
        let e = m.tdh_phymem_page_reclaim(&cx, td.tdr).await.unwrap_err();
        assert_eq!(e.status, Status::new(Code::TdAssociatedPagesExist));
        // WBINVD of a page the module still holds.
        let e = m
            .tdh_phymem_page_wbinvd(&cx, td.tdcs[0], crate::host::CacheKey::Td(HKID))
            .await
            .unwrap_err();
        assert_eq!(
            e.status,
            Status::with(Code::PageMetadataIncorrect, Operand::Rcx)
        );
        // Reclaiming a child, then the same page again (now NDA).
        let info = m.tdh_phymem_page_reclaim(&cx, td.tdcs[0]).await.unwrap();
        assert_eq!((info.page_type, info.owner), (PageType::Tdcx, Some(td.tdr)));
        let e = m
            .tdh_phymem_page_reclaim(&cx, td.tdcs[0])
            .await
            .unwrap_err();
        assert_eq!(
            e.status,
            Status::with(Code::PageMetadataIncorrect, Operand::Rcx)
        );
    });
}

#[test]
fn remove_needs_block_and_track_in_a_runnable_td() {
    let mut b = bench();
    let td = runnable_td(&mut b, 1);
    let tdr = td.tdr;
    b.run(move |cx, m| async move {
        aug(&cx, &m, tdr, gpa(0x20)).await.unwrap();
        let e = m
            .tdh_mem_page_remove(&cx, tdr, gpa(0x20), PgLevel::L4K)
            .await
            .unwrap_err();
        assert_eq!(
            e.status,
            Status::with(Code::GpaRangeNotBlocked, Operand::Rcx)
        );
        m.tdh_mem_range_block(&cx, tdr, gpa(0x20), PgLevel::L4K)
            .await
            .unwrap();
        let e = m
            .tdh_mem_range_block(&cx, tdr, gpa(0x20), PgLevel::L4K)
            .await
            .unwrap_err();
        assert_eq!(e.status.raw(), 0x0000_0B07_0000_0001);
        let e = m
            .tdh_mem_page_remove(&cx, tdr, gpa(0x20), PgLevel::L4K)
            .await
            .unwrap_err();
        assert_eq!(e.status.raw(), 0xC000_0B08_0000_0001, "REMOVE before TRACK");
        m.tdh_mem_track(&cx, tdr).await.unwrap();
        m.tdh_mem_page_remove(&cx, tdr, gpa(0x20), PgLevel::L4K)
            .await
            .unwrap();
        // The entry is FREE now: BLOCK finds nothing to block.
        let e = m
            .tdh_mem_range_block(&cx, tdr, gpa(0x20), PgLevel::L4K)
            .await
            .unwrap_err();
        assert_eq!(
            e.status,
            Status::with(Code::EptEntryStateIncorrect, Operand::Rcx)
        );
    });
}

#[test]
fn track_waits_for_vcpus_of_the_previous_epoch() {
    let mut b = bench();
    let td = runnable_td(&mut b, 1);
    let (tdr, v0) = (td.tdr, td.vcpus[0].tdvpr);
    b.run(move |cx, m| async move {
        aug(&cx, &m, tdr, gpa(0x30)).await.unwrap();
        m.tdh_vp_enter(&cx, Lp(0), v0, 0).await.unwrap();
        m.tdh_mem_range_block(&cx, tdr, gpa(0x30), PgLevel::L4K)
            .await
            .unwrap();
        // The vCPU entered in the blocking epoch and is still inside.
        m.tdh_mem_track(&cx, tdr).await.unwrap();
        let e = m
            .tdh_mem_page_remove(&cx, tdr, gpa(0x30), PgLevel::L4K)
            .await
            .unwrap_err();
        assert_eq!(
            e.status,
            Status::with(Code::TlbTrackingNotDone, Operand::Rcx)
        );
        let e = m.tdh_mem_track(&cx, tdr).await.unwrap_err();
        assert_eq!(e.status, Status::new(Code::PreviousTlbEpochBusy));
        // The kick: the vCPU exits; now the epoch is tracked.
        m.td_exit(v0, 0);
        m.tdh_mem_page_remove(&cx, tdr, gpa(0x30), PgLevel::L4K)
            .await
            .unwrap();
    });
}

/// Result slot shared between a contention test's tasks.
type Slot<T> = Rc<RefCell<Option<T>>>;

/// Runs `a` until it reaches the yield point `window`, then `b` to completion, then the rest.
/// Returns b's result.
fn race<A, B, T>(bch: &mut Bench, window: &'static str, a: A, b: B) -> T
where
    A: std::future::Future<Output = ()> + 'static,
    B: std::future::Future<Output = T> + 'static,
    T: 'static,
{
    let slot: Slot<T> = Rc::new(RefCell::new(None));
    let s = slot.clone();
    let first = bch.ex.task_names().len() as u32;
    bch.ex.spawn("a", a);
    bch.ex.spawn("b", async move {
        *s.borrow_mut() = Some(b.await);
    });
    let mut script = Script::new(vec![
        Directive {
            task: TaskId(first),
            until: Until::Point(window.into()),
        },
        Directive {
            task: TaskId(first + 1),
            until: Until::Blocked,
        },
    ]);
    assert_eq!(
        bch.ex.run(&mut script, 100_000, &mut |_| true),
        Outcome::AllDone
    );
    let reached = bch
        .ex
        .trace()
        .events()
        .any(|e| e.task == TaskId(first) && e.point == crate::sched::Point::Yield(window));
    assert!(reached, "task a never reached {window}");
    let r = slot.borrow_mut().take().expect("b finished");
    r
}

fn busy(op: Operand) -> Result<(), Status> {
    Err(Status::with(Code::OperandBusy, op))
}

/// Which contention a (holder in its window, contender) pair gives, per seed 000's tables.
#[test]
fn seed_000_lock_table_pairs() {
    // AUG (tree SH, entry) vs BLOCK (tree EX) in its window: BUSY|SEPT_TREE.
    let mut b = bench();
    let td = runnable_td(&mut b, 2);
    let tdr = td.tdr;
    let m = b.m.clone();
    let cx = b.cx.clone();
    b.run(move |cx, m| async move {
        aug(&cx, &m, tdr, gpa(0x40)).await.unwrap();
        link_path(&cx, &m, tdr, gpa(0x41)).await;
    });
    let (m1, c1, m2, c2) = (m.clone(), cx.clone(), m.clone(), cx.clone());
    let r = race(
        &mut b,
        window_name(Leaf::MemRangeBlock),
        async move {
            m1.tdh_mem_range_block(&c1, tdr, gpa(0x40), PgLevel::L4K)
                .await
                .unwrap();
        },
        async move {
            let p = alloc_guest(&m2, gpa(0x41));
            m2.tdh_mem_page_aug(&c2, tdr, gpa(0x41), PgLevel::L4K, p)
                .await
                .map_err(|e| e.status)
        },
    );
    assert_eq!(r, busy(Operand::SeptTree), "AUG vs BLOCK");

    // AUG vs AUG on different GPAs, and REMOVE vs AUG: tree shared both ways, no BUSY.
    let (m1, c1, m2, c2) = (m.clone(), cx.clone(), m.clone(), cx.clone());
    let r = race(
        &mut b,
        window_name(Leaf::MemPageAug),
        async move {
            link_path(&c1, &m1, tdr, gpa(0x42)).await;
            let p = alloc_guest(&m1, gpa(0x42));
            m1.tdh_mem_page_aug(&c1, tdr, gpa(0x42), PgLevel::L4K, p)
                .await
                .unwrap();
        },
        async move {
            let p = alloc_guest(&m2, gpa(0x41));
            m2.tdh_mem_page_aug(&c2, tdr, gpa(0x41), PgLevel::L4K, p)
                .await
                .map_err(|e| e.status)
        },
    );
    assert_eq!(r, Ok(()), "AUG vs AUG");

    // TRACK (epoch EX) vs AUG: disjoint locks.
    let (m1, c1, m2, c2) = (m.clone(), cx.clone(), m.clone(), cx.clone());
    let r = race(
        &mut b,
        window_name(Leaf::MemTrack),
        async move {
            m1.tdh_mem_track(&c1, tdr).await.unwrap();
        },
        async move {
            link_path(&c2, &m2, tdr, gpa(0x43)).await;
            let p = alloc_guest(&m2, gpa(0x43));
            m2.tdh_mem_page_aug(&c2, tdr, gpa(0x43), PgLevel::L4K, p)
                .await
                .map_err(|e| e.status)
        },
    );
    assert_eq!(r, Ok(()), "AUG vs TRACK");

    // TRACK vs VP.ENTER holding the epoch lock: BUSY|TD_EPOCH.
    let v1 = td.vcpus[1].tdvpr;
    let (m1, c1, m2, c2) = (m.clone(), cx.clone(), m.clone(), cx.clone());
    let r = race(
        &mut b,
        vcpu::EPOCH_WINDOW,
        async move {
            m1.tdh_vp_enter(&c1, Lp(1), v1, 0).await.unwrap();
            m1.td_exit(v1, 0);
        },
        async move { m2.tdh_mem_track(&c2, tdr).await.map_err(|e| e.status) },
    );
    assert_eq!(r, busy(Operand::TdEpoch), "TRACK vs VP.ENTER");

    // A running vCPU without zero-step holds TDR and TDVPR shared only: AUG and BLOCK on
    // other GPAs proceed while it is in the guest; VP.FLUSH (TDVPR exclusive) gets BUSY|RCX.
    let v0 = td.vcpus[0].tdvpr;
    b.run(move |cx, m| async move {
        assert_eq!(
            m.tdh_vp_enter(&cx, Lp(0), v0, 0).await,
            Ok(EnterOutcome::Entered)
        );
        aug(&cx, &m, tdr, gpa(0x44)).await.unwrap();
        m.tdh_mem_range_block(&cx, tdr, gpa(0x44), PgLevel::L4K)
            .await
            .unwrap();
        let e = m.tdh_vp_flush(&cx, Lp(0), v0).await.unwrap_err();
        assert_eq!(e.status, Status::with(Code::OperandBusy, Operand::Rcx));
        m.td_exit(v0, 0);
        m.tdh_vp_flush(&cx, Lp(0), v0).await.unwrap();
    });
}

#[test]
fn guest_accept_contends_with_host_on_the_entry() {
    let mut b = bench();
    let td = runnable_td(&mut b, 1);
    let (tdr, v0) = (td.tdr, td.vcpus[0].tdvpr);
    b.run(move |cx, m| async move {
        aug(&cx, &m, tdr, gpa(0x50)).await.unwrap();
        aug(&cx, &m, tdr, gpa(0x51)).await.unwrap();
        m.tdh_vp_enter(&cx, Lp(0), v0, 0).await.unwrap();
    });
    let (m, cx) = (b.m.clone(), b.cx.clone());
    // ACCEPT in its window holds the entry: BLOCK on the same GPA gets BUSY|RCX.
    let (m1, c1, m2, c2) = (m.clone(), cx.clone(), m.clone(), cx.clone());
    let r = race(
        &mut b,
        window_name(Leaf::TdgMemPageAccept),
        async move {
            let r = m1
                .tdg_mem_page_accept(&c1, v0, gpa(0x50), PgLevel::L4K)
                .await
                .unwrap();
            assert_eq!(r.status, Status::SUCCESS);
        },
        async move {
            m2.tdh_mem_range_block(&c2, tdr, gpa(0x50), PgLevel::L4K)
                .await
                .map_err(|e| e.status)
        },
    );
    assert_eq!(r, busy(Operand::Rcx), "BLOCK vs ACCEPT");
    // The host lost and flagged priority, but ACCEPT then wrote the whole entry, HP bit
    // clear: the guest's next attempt on that entry is not refused.
    let (m1, c1) = (m.clone(), cx.clone());
    b.run(move |_, _| async move {
        let r = m1.tdg_mem_page_attr_rd(&c1, v0, gpa(0x50)).await.unwrap();
        assert_eq!(r.status, Status::SUCCESS);
        m1.tdh_mem_range_block(&c1, tdr, gpa(0x50), PgLevel::L4K)
            .await
            .unwrap();
        m1.tdh_mem_range_unblock(&c1, tdr, gpa(0x50), PgLevel::L4K)
            .await
            .expect_err("not tracked yet");
    });
    // ACCEPT on another GPA does not contend with AUG of a third.
    let (m1, c1, m2, c2) = (m.clone(), cx.clone(), m.clone(), cx.clone());
    let r = race(
        &mut b,
        window_name(Leaf::TdgMemPageAccept),
        async move {
            m1.tdg_mem_page_accept(&c1, v0, gpa(0x51), PgLevel::L4K)
                .await
                .unwrap();
        },
        async move {
            link_path(&c2, &m2, tdr, gpa(0x52)).await;
            let p = alloc_guest(&m2, gpa(0x52));
            m2.tdh_mem_page_aug(&c2, tdr, gpa(0x52), PgLevel::L4K, p)
                .await
                .map_err(|e| e.status)
        },
    );
    assert_eq!(r, Ok(()), "AUG vs ACCEPT of another GPA");
}

/// Six same-RIP EPT violations are counted; the seventh logs the GPA; while the logged GPA
/// would still fault (BLOCKED, then PENDING: suppress-#VE is set in every S-EPT entry, so a
/// PENDING page is not a convertible violation) every entry emulates the EPT violation; once it
/// is MAPPED the entry takes the SEPT tree lock, and a concurrent PAGE.AUG is BUSY|SEPT_TREE.
#[test]
fn zero_step_takes_the_tree_lock_after_the_threshold() {
    let mut b = bench();
    let td = runnable_td(&mut b, 1);
    let (tdr, v0) = (td.tdr, td.vcpus[0].tdvpr);
    let rip = 0x1000;
    let fault = gpa(0x60);
    let pending = gpa(0x62);
    b.run(move |cx, m| async move {
        // The guest accepts `fault`, then KVM blocks it (a zap in progress).
        aug(&cx, &m, tdr, fault).await.unwrap();
        aug(&cx, &m, tdr, pending).await.unwrap();
        m.tdh_vp_enter(&cx, Lp(0), v0, 0).await.unwrap();
        m.tdg_mem_page_accept(&cx, v0, fault, PgLevel::L4K)
            .await
            .unwrap();
        m.td_exit(v0, 4);
        m.tdh_mem_range_block(&cx, tdr, fault, PgLevel::L4K)
            .await
            .unwrap();
        // Six EPT violations at one RIP: counted, nothing logged, entry takes no tree lock.
        for _ in 0..6 {
            assert_eq!(
                m.tdh_vp_enter(&cx, Lp(0), v0, rip).await,
                Ok(EnterOutcome::Entered)
            );
            assert!(matches!(
                m.guest_private_access(v0, fault, rip),
                AccessResult::Exit(GuestExit::EptViolation { .. })
            ));
            m.td_exit(v0, rip);
        }
        assert_eq!(m.state().vcpus[&v0].epf_count, 6);
        assert!(m.state().vcpus[&v0].epf_gpas.is_empty());
        // The seventh logs the GPA.
        m.tdh_vp_enter(&cx, Lp(0), v0, rip).await.unwrap();
        m.guest_private_access(v0, fault, rip);
        m.td_exit(v0, rip);
        assert_eq!(m.state().vcpus[&v0].epf_gpas, vec![fault.gfn()]);
        // Still blocked: the next entry emulates the EPT violation without entering.
        assert_eq!(
            m.tdh_vp_enter(&cx, Lp(0), v0, rip).await,
            Ok(EnterOutcome::EptViolation { gpa: fault })
        );
        assert!(m.state().locks.none_held());
        // A logged PENDING page faults too, whatever PENDING_VE_DISABLE says.
        m.st.borrow_mut().vcpus.get_mut(&v0).unwrap().epf_gpas = vec![pending.gfn()];
        assert!(!m.state().tds[&tdr].pending_ve_disable);
        assert_eq!(
            m.tdh_vp_enter(&cx, Lp(0), v0, rip).await,
            Ok(EnterOutcome::EptViolation { gpa: pending })
        );
        m.st.borrow_mut().vcpus.get_mut(&v0).unwrap().epf_gpas = vec![fault.gfn()];
        // KVM unblocks it (after TRACK: no vCPU is inside); the next entry checks it under
        // the tree lock.
        m.tdh_mem_track(&cx, tdr).await.unwrap();
        m.tdh_mem_range_unblock(&cx, tdr, fault, PgLevel::L4K)
            .await
            .unwrap();
        link_path(&cx, &m, tdr, gpa(0x61)).await;
    });
    let (m, cx) = (b.m.clone(), b.cx.clone());
    let (m1, c1, m2, c2) = (m.clone(), cx.clone(), m.clone(), cx.clone());
    let r = race(
        &mut b,
        window_name(Leaf::VpEnter),
        async move {
            assert_eq!(
                m1.tdh_vp_enter(&c1, Lp(0), v0, rip).await,
                Ok(EnterOutcome::Entered)
            );
        },
        async move {
            let p = alloc_guest(&m2, gpa(0x61));
            m2.tdh_mem_page_aug(&c2, tdr, gpa(0x61), PgLevel::L4K, p)
                .await
                .map_err(|e| e.status)
        },
    );
    assert_eq!(r, busy(Operand::SeptTree), "AUG vs VP.ENTER in zero-step");
    // Forward progress (a different RIP at exit) resets the mitigation.
    m.td_exit(v0, rip + 4);
    assert_eq!(m.state().vcpus[&v0].epf_count, 0);
    assert!(m.state().vcpus[&v0].epf_gpas.is_empty());
}
