//! Policy `sept_off_to_side`, seed 001's design: the S-EPT is populated at finalize under one
//! lock and never faulted; conversions, punch-hole and memslot delete unmap and map it off to
//! the side of the TDP MMU; teardown returns every page; and the adapted desync check compares
//! the S-EPT with KVM's side record.

use harness::addr::{Gfn, Gpa, Pfn, PgLevel};
use harness::guest::{GuestOp, Observation};
use harness::ids::{GmemId, PgOff, SlotId};
use harness::kvm::{Errno, Kvm};
use harness::policy::Policy;
use harness::run::RunConfig;
use harness::scenario::text::parse;
use harness::sched::{Directive, Outcome, Point, RoundRobin, Script, TraceMode, Until};
use harness::stack::{Stack, GUEST_PAGES};
use harness::tdx_module::{Code, SeptState};
use harness::vmm::ThreadEnd;

fn gpa(gfn: u64) -> Gpa {
    Gpa::new(gfn << 12)
}

fn side_policy() -> Policy {
    Policy::by_name("sept_off_to_side").unwrap()
}

/// A runnable TD with `nvcpus` vCPUs under the design (its memslot is backed from the start).
fn stack(nvcpus: u8) -> Stack {
    let mut s = Stack::new(side_policy(), 700 + GUEST_PAGES as usize, TraceMode::Full);
    s.build_runnable(nvcpus);
    s
}

fn bugs(kvm: &Kvm) -> Vec<String> {
    kvm.st
        .borrow()
        .bugs
        .iter()
        .map(|b| format!("{}: {}", b.location, b.what))
        .collect()
}

/// Appends `ops` to vCPU `v`'s program (its observations stay, for the guest-memory oracle) and
/// runs its thread, with anything else spawned, to the end.
fn run_vcpu(s: &mut Stack, v: usize, ops: Vec<GuestOp>) {
    let mut p = s.kvm.st.borrow().vcpus[v].guest.clone();
    p.ops.extend(ops);
    let (_, end) = s.spawn_vcpu(v, p);
    assert_eq!(s.run(&mut RoundRobin::new(), 500_000), Outcome::AllDone);
    assert_eq!(end.get(), Some(ThreadEnd::GuestDone));
}

/// Observations of vCPU `v` from the `from`-th on.
fn seen(kvm: &Kvm, v: usize, from: usize) -> Vec<Observation> {
    kvm.st.borrow().vcpus[v].guest.seen[from..]
        .iter()
        .map(|(_, o)| *o)
        .collect()
}

fn sept_entry(s: &Stack, gfn: u64) -> Option<(SeptState, Pfn)> {
    let tdr = s.kvm.st.borrow().tdx.tdr.unwrap();
    s.module.state().tds[&tdr]
        .sept
        .get(PgLevel::L4K, Gfn::new(gfn))
        .map(|e| (e.state, e.pfn))
}

/// guest_memfd's page for `gfn` (slot 0 binds file 0 at offset 0).
fn gmem_page(s: &Stack, gfn: u64) -> Option<Pfn> {
    s.kvm
        .gmem_pages(GmemId(0))
        .into_iter()
        .find(|(o, _)| *o == PgOff(gfn))
        .map(|(_, p)| p)
}

/// Private EPT violations KVM handled (`kvm_tdp_mmu_page_fault` on a private GPA).
fn private_faults(s: &Stack) -> usize {
    s.ex.trace()
        .events()
        .filter(|e| {
            matches!(e.point, Point::YieldArg("kvm_tdp_mmu_page_fault", a)
                if !Gpa::new(a).is_shared())
        })
        .count()
}

fn accept_touch(gfns: &[u64]) -> Vec<GuestOp> {
    gfns.iter()
        .flat_map(|&g| {
            [
                GuestOp::Accept { gpa: gpa(g) },
                GuestOp::Write {
                    gpa: gpa(g),
                    value: 0x100 + g,
                },
                GuestOp::Read { gpa: gpa(g) },
            ]
        })
        .collect()
}

fn all_clean(s: &Stack) {
    assert!(bugs(&s.kvm).is_empty(), "{:?}", bugs(&s.kvm));
    let d = oracle::sept_sync::check(&s.kvm, true);
    assert!(d.is_empty(), "{d:?}");
    let g = oracle::guest_memory::check(&s.kvm);
    assert!(g.is_empty(), "{g:?}");
    assert!(s.host.borrow().refused.is_empty());
}

#[test]
fn finalize_maps_every_private_gfn_and_guest_accesses_never_fault() {
    let mut s = stack(2);
    {
        // Every gfn of the memslot is PENDING in the S-EPT with its guest_memfd page, and KVM
        // recorded it; one table per 2M region below one 1G and one 512G table.
        let st = s.kvm.st.borrow();
        assert_eq!(st.sept_side.leaves.len() as u64, GUEST_PAGES);
        assert_eq!(st.sept_side.tables.len() as u64, 2 + GUEST_PAGES / 512);
    }
    for g in [0, 0x10, 0x7ff] {
        let (state, pfn) = sept_entry(&s, g).unwrap();
        assert_eq!(state, SeptState::Pending);
        assert_eq!(Some(pfn), gmem_page(&s, g));
        assert_eq!(s.kvm.st.borrow().sept_side.leaves[&Gfn::new(g)], pfn);
    }
    assert!(oracle::sept_sync::check(&s.kvm, true).is_empty());
    let mut p1 = accept_touch(&[0x200, 0x201]);
    p1.push(GuestOp::Read { gpa: gpa(0x202) });
    run_vcpu(&mut s, 0, accept_touch(&[0x10, 0x11, 0x12]));
    run_vcpu(&mut s, 1, p1);
    // No private fault reached KVM, and KVM has no mirror root or mirror page at all.
    assert_eq!(private_faults(&s), 0);
    {
        let st = s.kvm.st.borrow();
        assert!(st.vcpus.iter().all(|v| v.mirror_root.is_none()));
        assert!(st.mmu.sps.values().all(|sp| !sp.mirror));
    }
    assert_eq!(sept_entry(&s, 0x10).unwrap().0, SeptState::Mapped);
    assert_eq!(sept_entry(&s, 0x202).unwrap().0, SeptState::Pending);
    // The unaccepted page gave #VE, the others read what was written.
    assert_eq!(
        seen(&s.kvm, 1, 6),
        vec![Observation::VirtualizationException { gpa: gpa(0x202) }]
    );
    assert!(seen(&s.kvm, 0, 0).contains(&Observation::Read {
        gpa: gpa(0x12),
        value: 0x112
    }));
    all_clean(&s);
}

#[test]
fn prefault_of_a_mapped_private_page_issues_no_seamcall() {
    let mut s = stack(1);
    let before = s.ex.trace().events().count();
    s.run_setup(|cx, kvm| async move {
        let n = kvm
            .kvm_vcpu_pre_fault_memory(&cx, 0, gpa(0x40), 2 << 12)
            .await
            .unwrap();
        assert_eq!(n, 2 << 12);
    });
    let seamcalls =
        s.ex.trace()
            .events()
            .skip(before)
            .filter(|e| matches!(e.point, Point::Note { what, .. } if what.starts_with("TDH.")))
            .count();
    assert_eq!(seamcalls, 0);
    all_clean(&s);
}

#[test]
fn conversions_both_ways_unmap_and_map_and_the_guest_accepts_again() {
    let mut s = stack(1);
    run_vcpu(
        &mut s,
        0,
        vec![
            GuestOp::Accept { gpa: gpa(0x10) },
            GuestOp::Write {
                gpa: gpa(0x10),
                value: 0x1111,
            },
            GuestOp::MapGpa {
                gpa: gpa(0x10).to_shared(),
                size: 4096,
            },
        ],
    );
    // Shared now: gone from the S-EPT and from KVM's record, the page cleared.
    assert_eq!(sept_entry(&s, 0x10), None);
    assert!(!s
        .kvm
        .st
        .borrow()
        .sept_side
        .leaves
        .contains_key(&Gfn::new(0x10)));
    let old = gmem_page(&s, 0x10).unwrap();
    assert_eq!(s.host.borrow().read(old), 0);
    run_vcpu(
        &mut s,
        0,
        vec![
            GuestOp::Write {
                gpa: gpa(0x10).to_shared(),
                value: 0x2222,
            },
            GuestOp::Read {
                gpa: gpa(0x10).to_shared(),
            },
            GuestOp::MapGpa {
                gpa: gpa(0x10),
                size: 4096,
            },
        ],
    );
    // Private again: mapped PENDING by the conversion itself, before any access.
    let (state, pfn) = sept_entry(&s, 0x10).unwrap();
    assert_eq!(state, SeptState::Pending);
    assert_eq!(Some(pfn), gmem_page(&s, 0x10));
    let n = s.kvm.st.borrow().vcpus[0].guest.seen.len();
    run_vcpu(
        &mut s,
        0,
        vec![
            GuestOp::Read { gpa: gpa(0x10) },
            GuestOp::Accept { gpa: gpa(0x10) },
            GuestOp::Read { gpa: gpa(0x10) },
        ],
    );
    assert_eq!(
        seen(&s.kvm, 0, n),
        vec![
            Observation::VirtualizationException { gpa: gpa(0x10) },
            Observation::Accepted {
                gpa: gpa(0x10),
                code: Code::Success
            },
            Observation::Read {
                gpa: gpa(0x10),
                value: 0
            },
        ]
    );
    assert_eq!(private_faults(&s), 0);
    all_clean(&s);
}

#[test]
fn a_private_access_during_a_conversion_goes_back_to_the_guest() {
    let mut s = stack(1);
    s.run_setup(|cx, kvm| async move {
        kvm.set_memory_attributes(&cx, Gfn::new(0x30), Gfn::new(0x31), false)
            .await
            .unwrap();
    });
    let vmm = s.spawn("vmm", |cx, kvm| async move {
        kvm.set_memory_attributes(&cx, Gfn::new(0x30), Gfn::new(0x31), true)
            .await
            .unwrap();
    });
    let mut p = s.kvm.st.borrow().vcpus[0].guest.clone();
    p.ops.push(GuestOp::Accept { gpa: gpa(0x30) });
    let (vcpu, end) = s.spawn_vcpu(0, p);
    // The conversion stops just before its PAGE.AUG: the attributes say private, the page is
    // not mapped yet. The guest's ACCEPT exits, KVM installs nothing and re-enters.
    let mut sc = Script::new(vec![
        Directive {
            task: vmm,
            until: Until::Point("TDH.MEM.PAGE.AUG".into()),
        },
        Directive {
            task: vcpu,
            until: Until::Steps(300),
        },
    ]);
    assert_eq!(s.run(&mut sc, 100_000), Outcome::AllDone);
    assert_eq!(end.get(), Some(ThreadEnd::GuestDone));
    assert!(private_faults(&s) >= 2, "{}", private_faults(&s));
    let local_retries =
        s.ex.trace()
            .events()
            .filter(|e| e.point == Point::Yield("tdx_handle_ept_violation:cond_resched"))
            .count();
    assert_eq!(local_retries, 0);
    assert_eq!(
        seen(&s.kvm, 0, 0),
        vec![Observation::Accepted {
            gpa: gpa(0x30),
            code: Code::Success
        }]
    );
    assert_eq!(sept_entry(&s, 0x30).unwrap().0, SeptState::Mapped);
    all_clean(&s);
}

/// vCPU 0 keeps reading a page whose conversion to private is in flight until zero-step
/// mitigation logs it; its next TDH.VP.ENTER takes the S-EPT tree lock and the conversion's
/// PAGE.AUG meets it: BUSY, kick, one retry. The page is then PENDING, which the module's
/// entry filter still counts as faulting, so vCPU 0 stays out until vCPU 1 accepts the page.
#[test]
fn busy_from_a_zero_step_entry_is_answered_with_a_kick_and_one_retry() {
    let mut s = stack(2);
    s.run_setup(|cx, kvm| async move {
        kvm.set_memory_attributes(&cx, Gfn::new(0x30), Gfn::new(0x31), false)
            .await
            .unwrap();
    });
    let vmm = s.spawn("vmm", |cx, kvm| async move {
        kvm.set_memory_attributes(&cx, Gfn::new(0x30), Gfn::new(0x31), true)
            .await
            .unwrap();
    });
    let mut p0 = s.kvm.st.borrow().vcpus[0].guest.clone();
    p0.ops.push(GuestOp::Read { gpa: gpa(0x30) });
    let mut p1 = s.kvm.st.borrow().vcpus[1].guest.clone();
    p1.ops.push(GuestOp::Accept { gpa: gpa(0x30) });
    let (vcpu0, end0) = s.spawn_vcpu(0, p0);
    let (_, end1) = s.spawn_vcpu(1, p1);
    // The guest's read keeps exiting while the page is not mapped, until zero-step mitigation
    // makes TDH.VP.ENTER take the S-EPT tree lock; the PAGE.AUG meets it. vCPU 1 starts once
    // the script is done.
    let dir = |task, until| Directive { task, until };
    let mut sc = Script::new(vec![
        dir(vmm, Until::Point("TDH.MEM.PAGE.AUG".into())),
        dir(vcpu0, Until::Steps(300)),
        dir(vcpu0, Until::Point("TDH.VP.ENTER:locked".into())),
        dir(vmm, Until::Blocked),
    ]);
    assert_eq!(s.run(&mut sc, 100_000), Outcome::AllDone);
    assert_eq!(end0.get(), Some(ThreadEnd::GuestDone));
    assert_eq!(end1.get(), Some(ThreadEnd::GuestDone));
    let augs: Vec<u64> = s.ex.trace().notes("TDH.MEM.PAGE.AUG");
    // The build's AUGs, then BUSY and the successful retry of the conversion's.
    let n = augs.len();
    assert!(
        n > 2 && augs[n - 2] != 0 && augs[n - 1] == 0,
        "{:?}",
        &augs[n - 3..]
    );
    // While the page was PENDING, vCPU 0's entries were emulated EPT violations: it read
    // nothing until the page was accepted, and then read zeroes.
    assert_eq!(
        seen(&s.kvm, 0, 0),
        vec![Observation::Read {
            gpa: gpa(0x30),
            value: 0
        }]
    );
    assert_eq!(
        seen(&s.kvm, 1, 0),
        vec![Observation::Accepted {
            gpa: gpa(0x30),
            code: Code::Success
        }]
    );
    all_clean(&s);
}

#[test]
fn punch_hole_refills_and_memslot_delete_unmaps() {
    let mut s = stack(1);
    run_vcpu(&mut s, 0, accept_touch(&[0x201]));
    s.run_setup(|cx, kvm| async move {
        kvm.kvm_gmem_punch_hole(&cx, GmemId(0), PgOff(0x201), 1)
            .await
            .unwrap();
    });
    // A fresh zeroed page, PENDING: the guest must accept it again and reads zero.
    let (state, pfn) = sept_entry(&s, 0x201).unwrap();
    assert_eq!(state, SeptState::Pending);
    assert_eq!(Some(pfn), gmem_page(&s, 0x201));
    assert_eq!(s.kvm.st.borrow().sept_side.leaves[&Gfn::new(0x201)], pfn);
    let n = s.kvm.st.borrow().vcpus[0].guest.seen.len();
    run_vcpu(
        &mut s,
        0,
        vec![
            GuestOp::Read { gpa: gpa(0x201) },
            GuestOp::Accept { gpa: gpa(0x201) },
            GuestOp::Read { gpa: gpa(0x201) },
        ],
    );
    assert_eq!(
        seen(&s.kvm, 0, n)[0],
        Observation::VirtualizationException { gpa: gpa(0x201) }
    );
    assert_eq!(
        seen(&s.kvm, 0, n)[2],
        Observation::Read {
            gpa: gpa(0x201),
            value: 0
        }
    );
    all_clean(&s);
    // Deleting the memslot unmaps all of it; re-creating it maps it again.
    s.run_setup(|cx, kvm| async move { kvm.delete_memslot(&cx, SlotId(0)).await.unwrap() });
    assert!(s.kvm.st.borrow().sept_side.leaves.is_empty());
    assert_eq!(sept_entry(&s, 0x201), None);
    assert!(oracle::sept_sync::check(&s.kvm, true).is_empty());
    s.run_setup(|cx, kvm| async move {
        kvm.create_memslot(
            &cx,
            SlotId(0),
            Gfn::new(0),
            GUEST_PAGES,
            Some((GmemId(0), PgOff(0))),
        )
        .await
        .unwrap()
    });
    assert_eq!(s.kvm.st.borrow().sept_side.leaves.len() as u64, GUEST_PAGES);
    assert_eq!(sept_entry(&s, 0x201).unwrap().0, SeptState::Pending);
    assert!(oracle::sept_sync::check(&s.kvm, true).is_empty());
    assert!(bugs(&s.kvm).is_empty(), "{:?}", bugs(&s.kvm));
}

#[test]
fn a_conversion_cannot_map_a_page_a_punch_hole_is_truncating() {
    let mut s = stack(1);
    run_vcpu(&mut s, 0, accept_touch(&[0x50]));
    s.run_setup(|cx, kvm| async move {
        kvm.set_memory_attributes(&cx, Gfn::new(0x51), Gfn::new(0x52), false)
            .await
            .unwrap();
    });
    let punch = s.spawn("punch", |cx, kvm| async move {
        kvm.kvm_gmem_punch_hole(&cx, GmemId(0), PgOff(0x50), 1)
            .await
            .unwrap();
    });
    let vmm = s.spawn("vmm", |cx, kvm| async move {
        kvm.set_memory_attributes(&cx, Gfn::new(0x50), Gfn::new(0x52), true)
            .await
            .unwrap();
    });
    // The punch-hole is removing 0x50 when the conversion (0x51 goes private) wants to map
    // the range: it must wait for the truncation, not map the page being freed.
    let mut sc = Script::new(vec![
        Directive {
            task: punch,
            until: Until::Point("TDH.MEM.PAGE.REMOVE".into()),
        },
        Directive {
            task: vmm,
            until: Until::Blocked,
        },
    ]);
    assert_eq!(s.run(&mut sc, 100_000), Outcome::AllDone);
    for g in [0x50, 0x51] {
        let (state, pfn) = sept_entry(&s, g).unwrap();
        assert_eq!(state, SeptState::Pending);
        assert_eq!(Some(pfn), gmem_page(&s, g));
    }
    all_clean(&s);
}

#[test]
fn a_hole_that_cannot_be_refilled_is_made_shared_and_the_guest_gets_it_back() {
    let mut s = stack(1);
    run_vcpu(&mut s, 0, accept_touch(&[0x40]));
    s.run_setup(|cx, kvm| async move {
        kvm.host.borrow_mut().ledger.inject_alloc_failures(0, 1);
        let r = kvm
            .kvm_gmem_punch_hole(&cx, GmemId(0), PgOff(0x40), 1)
            .await;
        assert_eq!(r, Err(Errno::ENOMEM));
    });
    // Nothing backs the gfn, so it is shared rather than private and never mapped.
    assert!(!s.kvm.st.borrow().attributes.is_private(Gfn::new(0x40)));
    assert_eq!(sept_entry(&s, 0x40), None);
    all_clean(&s);
    // The guest's ACCEPT exits to userspace (KVM_EXIT_MEMORY_FAULT), whose conversion back to
    // private maps a fresh page.
    let n = s.kvm.st.borrow().vcpus[0].guest.seen.len();
    run_vcpu(
        &mut s,
        0,
        vec![
            GuestOp::Accept { gpa: gpa(0x40) },
            GuestOp::Read { gpa: gpa(0x40) },
        ],
    );
    assert_eq!(
        seen(&s.kvm, 0, n),
        vec![
            Observation::Accepted {
                gpa: gpa(0x40),
                code: Code::Success
            },
            Observation::Read {
                gpa: gpa(0x40),
                value: 0
            },
        ]
    );
    assert_eq!(sept_entry(&s, 0x40).unwrap().0, SeptState::Mapped);
    all_clean(&s);
}

#[test]
fn full_life_cycle_accounts_for_every_page() {
    let sc = parse(
        "vcpus 2
init 0x30 0xabcd
task vcpu0
  read 0x30
  accept 0x10
  write 0x10 0x1
  map_gpa 0x10 1 shared
  write 0x10 0x2 shared
  map_gpa 0x10 1 private
  accept 0x10
  read 0x10
task vcpu1
  accept 0x201
  write 0x201 0x9
  read 0x201
  accept 0x400
task vmm0
  convert 0x300 4 shared
  punch_hole 0x201 1
  convert 0x300 4 private
  prefault vcpu1 0x500 2
  destroy
expect clean
",
    )
    .unwrap();
    let r = oracle::check::run_scenario(&sc, &RunConfig::new(side_policy(), TraceMode::Ring(32)));
    assert!(r.violation.is_none(), "{}", r.violation.unwrap());
    assert!(r.run.destroyed.get());
    let h = r.run.stack.host.borrow();
    assert!(h.unaccounted().is_empty(), "{:?}", h.unaccounted());
    assert!(h.refused.is_empty(), "{:?}", h.refused);
    assert_eq!(h.ledger.census().leaked, 0);
    let st = r.run.stack.kvm.st.borrow();
    assert!(st.sept_side.leaves.is_empty() && st.sept_side.tables.is_empty());
    assert!(st.bugs.is_empty(), "{:?}", st.bugs);
}

#[test]
fn the_desync_check_compares_the_sept_with_the_side_record() {
    let mut s = stack(1);
    run_vcpu(&mut s, 0, accept_touch(&[0x10]));
    assert!(oracle::sept_sync::check(&s.kvm, true).is_empty());
    let snapshot = s.kvm.st.borrow().sept_side.clone();
    let restore = |s: &Stack| s.kvm.st.borrow_mut().sept_side = snapshot.clone();
    // A leaf KVM believes maps another page.
    s.kvm
        .st
        .borrow_mut()
        .sept_side
        .leaves
        .insert(Gfn::new(0x10), Pfn::new(0x1));
    let d = oracle::sept_sync::check(&s.kvm, true);
    assert!(
        d.iter().any(|l| l.starts_with("side leaf gfn:0x10 -> ")),
        "{d:?}"
    );
    restore(&s);
    // A leaf KVM forgot: only a quiescent check may call it a desync.
    s.kvm
        .st
        .borrow_mut()
        .sept_side
        .leaves
        .remove(&Gfn::new(0x11));
    assert!(oracle::sept_sync::check(&s.kvm, false).is_empty());
    let d = oracle::sept_sync::check(&s.kvm, true);
    assert!(d.iter().any(|l| l.contains("with no side record")), "{d:?}");
    restore(&s);
    // A table KVM believes it added.
    s.kvm
        .st
        .borrow_mut()
        .sept_side
        .tables
        .insert((PgLevel::L2M, Gfn::new(0x4000)), Pfn::new(0x2));
    let d = oracle::sept_sync::check(&s.kvm, false);
    assert!(d.iter().any(|l| l.starts_with("side table")), "{d:?}");
    restore(&s);
    assert!(oracle::sept_sync::check(&s.kvm, true).is_empty());
}

#[test]
fn the_design_answers_every_regression_scenario_like_upstream_where_upstream_is_clean() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../corpus/regressions");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "tdx"))
        .collect();
    files.sort();
    for f in files {
        let sc = parse(&std::fs::read_to_string(&f).unwrap()).unwrap();
        let kind = |p: Policy| {
            oracle::check::run_scenario(&sc, &RunConfig::new(p, TraceMode::Ring(8)))
                .violation
                .map(|v| v.kind.name().to_string())
        };
        if kind(Policy::UPSTREAM).is_none() {
            assert_eq!(kind(side_policy()), None, "{}", f.display());
        }
    }
}

/// Under a 0x240-page memslot (the fuzzing memslot once: a smaller liveness window than the
/// full size's) the design unmaps hundreds of pages one by one while two vCPUs keep
/// re-entering with BUSY: SEAMCALLs succeed throughout and the run ends after about six
/// windows. With four windows allowed a campaign reported it as no progress; slow work is not
/// a hang.
#[test]
fn slow_unmapping_under_a_small_memslot_is_not_a_hang() {
    let f = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../corpus/regressions/sept_off_to_side--slow-unmap-beside-entering-vcpus-is-not-a-hang.tdx");
    let sc = parse(&std::fs::read_to_string(f).unwrap()).unwrap();
    let cfg = RunConfig::with_guest_pages(side_policy(), TraceMode::Ring(8), 0x240);
    let r = oracle::check::run_scenario(&sc, &cfg);
    assert_eq!(r.violation.map(|v| v.key), None);
    let windows = (r.run.stack.ex.steps() - cfg.ops_budget) / cfg.liveness_budget;
    assert!(
        windows >= 4,
        "it took {windows} windows: no longer evidence"
    );
}

/// TDH.VP.INIT may take the TDR exclusively, so upstream runs it under mmu_lock for write,
/// which every S-EPT SEAMCALL also holds. The design makes its S-EPT changes under
/// `sept_lock`: without that lock around VP.INIT too, a 10-minute campaign saw VP.INIT answer
/// BUSY on the TDR beside the design's PAGE.REMOVE of a punched hole (a KVM_BUG_ON). The
/// campaign's minimized input, under the fuzzing memslot.
#[test]
fn vp_init_never_meets_the_designs_removal_on_the_tdr() {
    let sc = parse(
        "vcpus 3
build ops
vmm fault_convert 512
task vcpu0
task vcpu1
task vcpu2
task vmm0
  init_vm
  create_slot
  convert 0x0 2048 private
  init_mem_region vcpu0 0x11 0x92
  punch_hole 0x200 2
  punch_hole 0x200 2
  punch_hole 0x10 2048
  destroy
task vmm1
  create_vcpu
  create_vcpu
  init_vcpu vcpu0
  init_vcpu vcpu1
  finalize
  create_vcpu
  init_vcpu vcpu2
schedule bytes -
",
    )
    .unwrap();
    let cfg = RunConfig::for_fuzzing(side_policy(), TraceMode::Ring(8));
    let r = oracle::check::run_scenario(&sc, &cfg);
    assert_eq!(r.violation.map(|v| v.key), None);
}
