//! Arbitrary SEAMCALL/TDCALL programs against one TD, for the module-level fuzz target.
//!
//! The input picks whether the TD is finalized, the programs of two host threads and of the
//! guest side of two vCPUs (ops address GPAs by a small index, so short inputs collide on the
//! same entries), and the interleaving. Every op is issued whatever the state, so the module's
//! own checks, not the driver's, decide what succeeds; the driver only keeps host pages
//! accounted (a page the module refused goes back to the allocator, a removed page is flushed,
//! cleared and freed) and vCPUs well formed (TDCALLs only while entered).

use std::cell::RefCell;
use std::rc::Rc;

use arbitrary::{Arbitrary, Unstructured};

use crate::addr::{Gpa, Pfn, PgLevel};
use crate::host::{CacheKey, KernelUse};
use crate::ids::Hkid;
use crate::sched::{Ctx, Executor, InputChooser, Outcome, RoundRobin, TraceMode};

use super::testkit::{alloc, alloc_guest, build_td, BuiltTd};
use super::{Code, EnterOutcome, Lp, ModuleConfig, TdxModule};

/// GPAs the ops choose from: indexes 0..8 map to 4K pages spread over two 2M regions.
pub const GPA_SLOTS: u8 = 8;

fn slot_gpa(i: u8) -> Gpa {
    let i = u64::from(i % GPA_SLOTS);
    // Slots 0-3 share one 4K table, 4-7 another: SEPT.REMOVE and 2M ops have neighbours.
    Gpa::new(((i / 4) * 512 + (i % 4)) << 12)
}

/// A host-side op.
#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostOp {
    SeptAdd { slot: u8, level: u8 },
    Aug { slot: u8 },
    Block { slot: u8, level: u8 },
    Track,
    Remove { slot: u8 },
    Unblock { slot: u8, level: u8 },
    SeptRemove { slot: u8, level: u8 },
    PageAdd { slot: u8 },
    MrExtend { slot: u8 },
}

/// A guest-side op of one vCPU (entering first if needed).
#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestOp {
    Accept { slot: u8, big: bool },
    AttrRd { slot: u8 },
    AttrWr { slot: u8 },
    Access { slot: u8, rip: u8 },
    Exit { rip: u8 },
}

/// A decoded program.
#[derive(Arbitrary, Clone, Debug, PartialEq, Eq)]
pub struct ModuleProgram {
    pub finalize: bool,
    pub host: [Vec<HostOp>; 2],
    pub guest: [Vec<GuestOp>; 2],
}

/// Ops per task at most.
pub const MAX_OPS: usize = 24;

fn level(l: u8) -> PgLevel {
    PgLevel::WALK[usize::from(l % 4)]
}

/// Levels of entries that point to S-EPT tables (512G, 1G, 2M).
fn nonleaf_level(l: u8) -> PgLevel {
    PgLevel::WALK[usize::from(l % 3)]
}

impl ModuleProgram {
    /// Decodes a program and returns the remaining bytes (the schedule).
    pub fn decode(data: &[u8]) -> (ModuleProgram, &[u8]) {
        let split = data
            .first()
            .map_or(0, |b| usize::from(*b))
            .min(data.len().saturating_sub(1));
        let (prog, sched) = data.get(1..).unwrap_or(&[]).split_at(split);
        let mut u = Unstructured::new(prog);
        let mut p = ModuleProgram::arbitrary(&mut u).unwrap_or(ModuleProgram {
            finalize: true,
            host: [Vec::new(), Vec::new()],
            guest: [Vec::new(), Vec::new()],
        });
        for v in &mut p.host {
            v.truncate(MAX_OPS);
        }
        for v in &mut p.guest {
            v.truncate(MAX_OPS);
        }
        (p, sched)
    }
}

/// One run's world, kept for the invariant checks afterwards.
pub struct ModuleRun {
    pub ex: Executor,
    pub m: Rc<TdxModule>,
    pub td: BuiltTd,
    pub outcome: Outcome,
}

async fn host_op(cx: &Ctx, m: &TdxModule, tdr: Pfn, op: HostOp) {
    match op {
        HostOp::SeptAdd { slot, level: l } => {
            let lv = nonleaf_level(l);
            let p = alloc(m, KernelUse::Sept);
            let g = slot_gpa(slot).gfn().align_down(lv).gpa();
            if m.tdh_mem_sept_add(cx, tdr, g, lv, p).await.is_err() {
                give_back(m, p);
            }
        }
        HostOp::Aug { slot } => {
            link_missing(cx, m, tdr, slot_gpa(slot)).await;
            let p = alloc_guest(m, slot_gpa(slot));
            if m.tdh_mem_page_aug(cx, tdr, slot_gpa(slot), PgLevel::L4K, p)
                .await
                .is_err()
            {
                give_back(m, p);
            }
        }
        HostOp::PageAdd { slot } => {
            link_missing(cx, m, tdr, slot_gpa(slot)).await;
            let src = alloc(m, KernelUse::Other);
            let p = alloc_guest(m, slot_gpa(slot));
            if m.tdh_mem_page_add(cx, tdr, slot_gpa(slot), p, src)
                .await
                .is_err()
            {
                give_back(m, p);
            }
            give_back(m, src);
        }
        HostOp::Block { slot, level: l } => {
            let lv = level(l);
            let g = slot_gpa(slot).gfn().align_down(lv).gpa();
            let _ = m.tdh_mem_range_block(cx, tdr, g, lv).await;
        }
        HostOp::Unblock { slot, level: l } => {
            let lv = level(l);
            let g = slot_gpa(slot).gfn().align_down(lv).gpa();
            let _ = m.tdh_mem_range_unblock(cx, tdr, g, lv).await;
        }
        HostOp::Track => {
            let _ = m.tdh_mem_track(cx, tdr).await;
        }
        HostOp::Remove { slot } => {
            if let Ok(p) = m
                .tdh_mem_page_remove(cx, tdr, slot_gpa(slot), PgLevel::L4K)
                .await
            {
                let hkid = m.state().tds[&tdr].hkid;
                m.tdh_phymem_page_wbinvd(cx, p, CacheKey::Td(hkid))
                    .await
                    .expect("WBINVD of a page just removed");
                clear_and_free(m, p);
            }
        }
        HostOp::SeptRemove { slot, level: l } => {
            let lv = nonleaf_level(l);
            let g = slot_gpa(slot).gfn().align_down(lv).gpa();
            if let Ok(p) = m.tdh_mem_sept_remove(cx, tdr, g, lv).await {
                let hkid = m.state().tds[&tdr].hkid;
                m.tdh_phymem_page_wbinvd(cx, p, CacheKey::Td(hkid))
                    .await
                    .expect("WBINVD of an S-EPT page just removed");
                clear_and_free(m, p);
            }
        }
        HostOp::MrExtend { slot } => {
            let _ = m.tdh_mr_extend(cx, tdr, slot_gpa(slot)).await;
        }
    }
}

/// What KVM's fault path does before a leaf: SEPT.ADD each missing table on the way down (each
/// call may lose a race; the leaf's own SEAMCALL then reports the walk failure).
async fn link_missing(cx: &Ctx, m: &TdxModule, tdr: Pfn, gpa: Gpa) {
    for lv in [PgLevel::L512G, PgLevel::L1G, PgLevel::L2M] {
        let free = m.state().tds[&tdr].sept.state(lv, gpa.gfn()) == super::SeptState::Free;
        if free {
            let p = alloc(m, KernelUse::Sept);
            let g = gpa.gfn().align_down(lv).gpa();
            if m.tdh_mem_sept_add(cx, tdr, g, lv, p).await.is_err() {
                give_back(m, p);
            }
        }
    }
}

/// A page the module did not take goes straight back to the allocator.
fn give_back(m: &TdxModule, p: Pfn) {
    let mut h = m.host().borrow_mut();
    if h.ledger.get(p).is_ok_and(|e| e.tdx.is_none()) {
        let r = h.ledger.free(p);
        h.record(0, r);
    }
}

fn clear_and_free(m: &TdxModule, p: Pfn) {
    let mut h = m.host().borrow_mut();
    let r = h.ledger.clear(p).and_then(|()| h.ledger.free(p));
    h.record(0, r);
}

async fn guest_ops(cx: &Ctx, m: &TdxModule, tdvpr: Pfn, lp: Lp, ops: &[GuestOp]) {
    let mut inside = false;
    let mut rip = 0u64;
    for op in ops {
        if !inside {
            match m.tdh_vp_enter(cx, lp, tdvpr, rip).await {
                Ok(EnterOutcome::Entered) => inside = true,
                Ok(EnterOutcome::EptViolation { .. }) | Err(_) => continue,
            }
        }
        match *op {
            GuestOp::Accept { slot, big } => {
                let (g, lv) = if big {
                    (
                        slot_gpa(slot).gfn().align_down(PgLevel::L2M).gpa(),
                        PgLevel::L2M,
                    )
                } else {
                    (slot_gpa(slot), PgLevel::L4K)
                };
                if m.tdg_mem_page_accept(cx, tdvpr, g, lv).await.is_err() {
                    m.td_exit(tdvpr, rip);
                    inside = false;
                }
            }
            GuestOp::AttrRd { slot } => {
                if m.tdg_mem_page_attr_rd(cx, tdvpr, slot_gpa(slot))
                    .await
                    .is_err()
                {
                    m.td_exit(tdvpr, rip);
                    inside = false;
                }
            }
            GuestOp::AttrWr { slot } => {
                let r = m
                    .tdg_mem_page_attr_wr(cx, tdvpr, slot_gpa(slot), PgLevel::L4K, 0)
                    .await;
                if r.is_err() {
                    m.td_exit(tdvpr, rip);
                    inside = false;
                }
            }
            GuestOp::Access { slot, rip: r } => {
                rip = u64::from(r % 4);
                cx.yield_at("guest access").await;
                if let super::AccessResult::Exit(_) =
                    m.guest_private_access(tdvpr, slot_gpa(slot), rip)
                {
                    m.td_exit(tdvpr, rip);
                    inside = false;
                }
            }
            GuestOp::Exit { rip: r } => {
                rip = u64::from(r % 4);
                m.td_exit(tdvpr, rip);
                inside = false;
            }
        }
    }
    if inside {
        m.td_exit(tdvpr, rip);
    }
}

/// Builds the TD, spawns the program's tasks and runs them under `schedule` bytes (round robin
/// once they run out).
pub fn run(p: &ModuleProgram, schedule: &[u8]) -> ModuleRun {
    let mut ex = Executor::new(TraceMode::Ring(32));
    let cx = ex.ctx();
    let host = crate::host::Host::shared(200);
    let m = Rc::new(TdxModule::new(
        ModuleConfig {
            packages: 2,
            ..ModuleConfig::default()
        },
        host,
    ));
    let built: Rc<RefCell<Option<BuiltTd>>> = Rc::new(RefCell::new(None));
    {
        let (cx, m, built, fin) = (cx.clone(), m.clone(), built.clone(), p.finalize);
        ex.spawn("build", async move {
            let td = build_td(&cx, &m, Hkid(32), 2).await;
            if fin {
                m.tdh_mr_finalize(&cx, td.tdr).await.expect("MR.FINALIZE");
            }
            *built.borrow_mut() = Some(td);
        });
    }
    let out = ex.run(&mut RoundRobin::new(), 100_000, &mut |_| true);
    assert_eq!(out, Outcome::AllDone, "the build sequence must succeed");
    let td = built.borrow_mut().take().expect("built");
    for (i, ops) in p.host.iter().enumerate() {
        let (cx, m, ops, tdr) = (cx.clone(), m.clone(), ops.clone(), td.tdr);
        ex.spawn(format!("host{i}"), async move {
            for op in ops {
                host_op(&cx, &m, tdr, op).await;
            }
        });
    }
    for (i, ops) in p.guest.iter().enumerate() {
        let (cx, m, ops) = (cx.clone(), m.clone(), ops.clone());
        let v = td.vcpus[i].clone();
        ex.spawn(format!("vcpu{i}"), async move {
            guest_ops(&cx, &m, v.tdvpr, v.lp, &ops).await;
        });
    }
    let outcome = ex.run(&mut InputChooser::new(schedule), 200_000, &mut |_| true);
    ModuleRun { ex, m, td, outcome }
}

/// After a run: tear the TD down in the upstream order, removing what is still mapped first
/// (BLOCK, TRACK, REMOVE leaf by leaf; SEPT pages are reclaimed after the HKID is freed).
/// Returns the failures of steps upstream declares must-not-fail.
pub fn teardown(run: &mut ModuleRun) -> Vec<String> {
    let failures: Rc<RefCell<Vec<String>>> = Rc::default();
    let cx = run.ex.ctx();
    let (m, td, f) = (run.m.clone(), run.td.clone(), failures.clone());
    run.ex.spawn("teardown", async move {
        let tdr = td.tdr;
        let runnable = m.state().tds[&tdr].op_state == super::OpState::Runnable;
        // Blocked tables hide the leaves below them from the walk: unblock them first (KVM never
        // blocks a table of a live TD, but the fuzzer does).
        let mut blocked_tables: Vec<(PgLevel, Gpa)> = m.state().tds[&tdr]
            .sept
            .iter()
            .filter(|(_, _, e)| e.state == super::SeptState::NlBlocked)
            .map(|(l, g, _)| (l, g.gpa()))
            .collect();
        // Top down: a blocked table also hides blocked tables below it.
        blocked_tables.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        for (lv, g) in blocked_tables {
            if runnable {
                let _ = m.tdh_mem_track(&cx, tdr).await;
            }
            if let Err(e) = m.tdh_mem_range_unblock(&cx, tdr, g, lv).await {
                f.borrow_mut().push(format!("UNBLOCK {g}: {e}"));
            }
        }
        let leaves: Vec<(PgLevel, Gpa)> = m.state().tds[&tdr]
            .sept
            .iter()
            .filter(|(_, _, e)| e.state.is_leaf())
            .map(|(l, g, _)| (l, g.gpa()))
            .collect();
        for (lv, g) in leaves {
            let blocked = m.state().tds[&tdr].sept.state(lv, g.gfn()).is_blocked();
            if runnable && !blocked {
                if let Err(e) = m.tdh_mem_range_block(&cx, tdr, g, lv).await {
                    f.borrow_mut().push(format!("BLOCK {g}: {e}"));
                }
            }
            if runnable {
                if let Err(e) = m.tdh_mem_track(&cx, tdr).await {
                    f.borrow_mut().push(format!("TRACK: {e}"));
                }
            }
            match m.tdh_mem_page_remove(&cx, tdr, g, lv).await {
                Ok(p) => {
                    let hkid = m.state().tds[&tdr].hkid;
                    for i in 0..lv.pages() {
                        let _ = m
                            .tdh_phymem_page_wbinvd(&cx, p.add(i), CacheKey::Td(hkid))
                            .await;
                        clear_and_free(&m, p.add(i));
                    }
                }
                Err(e) => f.borrow_mut().push(format!("REMOVE {g}: {e}")),
            }
        }
        let sept: Vec<Pfn> = m.state().tds[&tdr]
            .sept
            .iter()
            .filter(|(_, _, e)| !e.state.is_leaf())
            .map(|(_, _, e)| e.pfn)
            .collect();
        // VP.FLUSH on the LP each vCPU is associated with now.
        let assoc: Vec<(Pfn, Option<Lp>)> = td
            .vcpus
            .iter()
            .map(|v| (v.tdvpr, m.state().vcpus[&v.tdvpr].assoc_lp))
            .collect();
        for (tdvpr, lp) in assoc {
            if let Some(lp) = lp {
                if let Err(e) = m.tdh_vp_flush(&cx, lp, tdvpr).await {
                    f.borrow_mut().push(format!("VP.FLUSH: {e}"));
                }
            }
        }
        if let Err(e) = m.tdh_mng_vpflushdone(&cx, tdr).await {
            f.borrow_mut().push(format!("VPFLUSHDONE: {e}"));
            return;
        }
        for pkg in 0..2 {
            let mut cmd = super::CacheWbCmd::Start;
            loop {
                match m.tdh_phymem_cache_wb(&cx, Lp(pkg), cmd).await {
                    Ok(()) => break,
                    Err(e) if e.status.code == Code::InterruptedResumable => {
                        cmd = super::CacheWbCmd::Resume
                    }
                    Err(e) if e.status.code == Code::NoHkidReadyToWbcache => break,
                    Err(e) => {
                        f.borrow_mut().push(format!("CACHE.WB: {e}"));
                        break;
                    }
                }
            }
        }
        if let Err(e) = m.tdh_mng_key_freeid(&cx, tdr).await {
            f.borrow_mut().push(format!("KEY.FREEID: {e}"));
            return;
        }
        let mut pages: Vec<Pfn> = Vec::new();
        for v in &td.vcpus {
            pages.extend(&v.tdcx);
            pages.push(v.tdvpr);
        }
        pages.extend(sept);
        pages.extend(&td.tdcs);
        for p in pages {
            match m.tdh_phymem_page_reclaim(&cx, p).await {
                Ok(_) => clear_and_free(&m, p),
                Err(e) => f.borrow_mut().push(format!("RECLAIM {p}: {e}")),
            }
        }
        match m.tdh_phymem_page_reclaim(&cx, tdr).await {
            Ok(_) => {
                let _ = m.tdh_phymem_page_wbinvd(&cx, tdr, CacheKey::Global).await;
                clear_and_free(&m, tdr);
            }
            Err(e) => f.borrow_mut().push(format!("RECLAIM TDR: {e}")),
        }
    });
    let out = run.ex.run(&mut RoundRobin::new(), 1_000_000, &mut |_| true);
    assert_eq!(out, Outcome::AllDone, "teardown is single-threaded");
    let v = failures.borrow().clone();
    v
}
