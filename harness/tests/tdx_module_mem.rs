//! Conformance tests for the S-EPT SEAMCALL leaves of the TDX module model: TDH.MEM.PAGE.ADD,
//! SEPT.ADD, PAGE.AUG, RANGE.BLOCK, TRACK, PAGE.REMOVE, SEPT.REMOVE and RANGE.UNBLOCK.
//!
//! Every expected status, state transition and lock conflict comes from the module's source
//! (intel/tdx-module 1666adc, src/vmm_dispatcher/api_calls/tdh_mem_*.c and the helpers they
//! call), as summarised in notes/tdx-module-mem.md, not from what the model prints. Status
//! values are written as the raw 64-bit RAX value (`Status::raw()`), operand id included.
//!
//! Contention tests use `race`: the holder runs until it sits in its leaf's window (all its
//! locks taken, nothing committed), then the contender runs to completion.

use std::cell::RefCell;
use std::future::Future;
use std::rc::Rc;

use harness::addr::{Gpa, Pfn, PgLevel};
use harness::host::ledger::PFN_BASE;
use harness::host::{AllocFor, CacheKey, KernelUse, TdxPageKind};
use harness::ids::{GmemId, Hkid, PgOff};
use harness::sched::{Ctx, Directive, Outcome, Point, Script, Until};
use harness::tdx_module::testkit::*;
use harness::tdx_module::{
    window_name, Code, Leaf, Lp, ModuleConfig, Operand, PageType, SeamErr, SeamResult, SeptDetails,
    SeptState, Status, TdParams, TdxModule,
};

// ---- Status values (tdx_error_codes_defs.h + operand id; notes §0.2, §0.3) ----

const SUCCESS: u64 = 0;
const TD_KEYS_NOT_CONFIGURED: u64 = 0x8000_0810_0000_0000;
const TDCS_NOT_ALLOCATED: u64 = 0xC000_0606_0000_0000;
const OP_STATE_INCORRECT: u64 = 0xC000_0608_0000_0000;
const OPERAND_INVALID_RCX: u64 = 0xC000_0100_0000_0001;
const OPERAND_INVALID_R8: u64 = 0xC000_0100_0000_0008;
const ADDR_RANGE_ERROR_RCX: u64 = 0xC000_0101_0000_0001;
const ADDR_RANGE_ERROR_RDX: u64 = 0xC000_0101_0000_0002;
const ADDR_RANGE_ERROR_R8: u64 = 0xC000_0101_0000_0008;
const PAGE_METADATA_INCORRECT_RCX: u64 = 0xC000_0300_0000_0001;
const PAGE_METADATA_INCORRECT_RDX: u64 = 0xC000_0300_0000_0002;
const PAGE_METADATA_INCORRECT_R8: u64 = 0xC000_0300_0000_0008;
const EPT_WALK_FAILED_RCX: u64 = 0xC000_0B00_0000_0001;
const EPT_ENTRY_STATE_INCORRECT_RCX: u64 = 0xC000_0B0D_0000_0001;
const GPA_RANGE_NOT_BLOCKED_RCX: u64 = 0xC000_0B06_0000_0001;
const GPA_RANGE_ALREADY_BLOCKED_RCX: u64 = 0x0000_0B07_0000_0001;
const TLB_TRACKING_NOT_DONE_RCX: u64 = 0xC000_0B08_0000_0001;
const EPT_PAGE_NOT_FREE_RCX: u64 = 0xC000_0B0E_0000_0001;
const PREVIOUS_TLB_EPOCH_BUSY: u64 = 0x8000_0201_0000_0000;
const BUSY_RCX: u64 = 0x8000_0200_0000_0001;
const BUSY_RDX: u64 = 0x8000_0200_0000_0002;
const BUSY_R8: u64 = 0x8000_0200_0000_0008;
const BUSY_SEPT_TREE: u64 = 0x8000_0200_0000_0092;
const BUSY_TD_EPOCH: u64 = 0x8000_0200_0000_00A9;

// ---- Bench and helpers ----

const HKID: Hkid = Hkid(32);
const NPAGES: usize = 3072;

fn bench() -> Bench {
    Bench::new(ModuleConfig::default(), NPAGES)
}

/// The private GPA of guest frame `gfn`.
fn gpa(gfn: u64) -> Gpa {
    Gpa::new(gfn << 12)
}

/// The private GPA of the `n`-th 2M region (n >= 1 keeps clear of `gpa(0x10..)`).
fn gpa_2m(n: u64) -> Gpa {
    Gpa::new(n << 21)
}

/// A page frame the module's PAMT does not cover (not host memory of the bench).
fn outside_host() -> Pfn {
    Pfn::new(PFN_BASE + NPAGES as u64 + 0x100)
}

fn sept_details(level: PgLevel, state: SeptState) -> Option<SeptDetails> {
    Some(SeptDetails { level, state })
}

/// The raw status of a leaf's result (TDX_SUCCESS = 0).
fn raw<T>(r: &SeamResult<T>) -> u64 {
    match r {
        Ok(_) => SUCCESS,
        Err(e) => e.status.raw(),
    }
}

/// Asserts the exact status and S-EPT details of a failed leaf.
#[track_caller]
fn check(e: &SeamErr, status: u64, details: Option<SeptDetails>) {
    assert_eq!(e.status.raw(), status, "status: got {e}");
    assert_eq!(e.sept, details, "S-EPT details of {e}");
}

/// Runs one task to completion and returns its value.
fn exec<T, F>(b: &mut Bench, f: impl FnOnce(Ctx, Rc<TdxModule>) -> F) -> T
where
    T: 'static,
    F: Future<Output = T> + 'static,
{
    let slot = Rc::new(RefCell::new(None));
    let s = slot.clone();
    b.run(move |cx, m| {
        let fut = f(cx, m);
        async move {
            *s.borrow_mut() = Some(fut.await);
        }
    });
    let v = slot.borrow_mut().take().expect("task finished");
    v
}

/// Runs `holder` until it yields at `window` (its leaf holds every lock it takes), then
/// `contender` to completion, then the rest. Returns the contender's value.
fn race<HF, CF, T>(
    b: &mut Bench,
    window: &'static str,
    holder: impl FnOnce(Ctx, Rc<TdxModule>) -> HF,
    contender: impl FnOnce(Ctx, Rc<TdxModule>) -> CF,
) -> T
where
    HF: Future<Output = ()> + 'static,
    CF: Future<Output = T> + 'static,
    T: 'static,
{
    let slot = Rc::new(RefCell::new(None));
    let s = slot.clone();
    let h = holder(b.cx.clone(), b.m.clone());
    let c = contender(b.cx.clone(), b.m.clone());
    let ht = b.ex.spawn("holder", h);
    let ct = b.ex.spawn("contender", async move {
        *s.borrow_mut() = Some(c.await);
    });
    let mut script = Script::new(vec![
        Directive {
            task: ht,
            until: Until::Point(window.into()),
        },
        Directive {
            task: ct,
            until: Until::Blocked,
        },
    ]);
    assert_eq!(
        b.ex.run(&mut script, 100_000, &mut |_| true),
        Outcome::AllDone
    );
    let reached =
        b.ex.trace()
            .events()
            .any(|e| e.task == ht && e.point == Point::Yield(window));
    assert!(reached, "the holder never reached {window}");
    let v = slot.borrow_mut().take().expect("contender finished");
    v
}

/// A TD after MNG.INIT with `nvcpus` vCPUs (OP state INITIALIZED).
fn initialized_td(b: &mut Bench, nvcpus: u8) -> BuiltTd {
    exec(b, move |cx, m| async move {
        build_td(&cx, &m, HKID, nvcpus).await
    })
}

/// A TD after MR.FINALIZE with `nvcpus` vCPUs (OP state RUNNABLE).
fn runnable_td(b: &mut Bench, nvcpus: u8) -> BuiltTd {
    exec(b, move |cx, m| async move {
        let td = build_td(&cx, &m, HKID, nvcpus).await;
        m.tdh_mr_finalize(&cx, td.tdr).await.expect("MR.FINALIZE");
        td
    })
}

/// SEPT.ADD for every missing table from the root down to the entries at `lowest` covering
/// `g` (`lowest` = 2M links the 4K table, 1G stops where a 2M leaf can be mapped).
async fn link_to(cx: &Ctx, m: &TdxModule, tdr: Pfn, g: Gpa, lowest: PgLevel) -> Vec<Pfn> {
    let mut added = Vec::new();
    for level in [PgLevel::L512G, PgLevel::L1G, PgLevel::L2M] {
        if level < lowest {
            break;
        }
        if m.state().tds[&tdr].sept.state(level, g.gfn()) == SeptState::Free {
            let p = alloc(m, KernelUse::Sept);
            let base = g.gfn().align_down(level).gpa();
            m.tdh_mem_sept_add(cx, tdr, base, level, p)
                .await
                .expect("SEPT.ADD");
            added.push(p);
        }
    }
    added
}

/// PAGE.ADD of a fresh guest page at `g` (linking the path first); returns the page.
async fn page_add(cx: &Ctx, m: &TdxModule, tdr: Pfn, g: Gpa) -> SeamResult<Pfn> {
    link_path(cx, m, tdr, g).await;
    let src = alloc(m, KernelUse::Other);
    m.host().borrow_mut().write(src, g.raw() | 1);
    let p = alloc_guest(m, g);
    m.tdh_mem_page_add(cx, tdr, g, p, src).await.map(|()| p)
}

/// 512 contiguous guest pages starting at a 2M-aligned frame.
fn alloc_2m(m: &TdxModule, g: Gpa) -> Pfn {
    let mut h = m.host().borrow_mut();
    let first = loop {
        let p = h
            .ledger
            .alloc(AllocFor::Kernel(KernelUse::Other))
            .expect("host memory");
        if p.raw().is_multiple_of(512) {
            h.ledger.free(p).expect("free");
            break p;
        }
    };
    for i in 0..512 {
        let p = h
            .ledger
            .alloc(AllocFor::GuestMemfd {
                file: GmemId(0),
                index: PgOff(g.gfn().raw() + i),
            })
            .expect("host memory");
        assert_eq!(p, first.add(i), "2M guest pages are contiguous");
    }
    first
}

/// PAGE.AUG of a fresh 2M page at `g` (tables down to 1G linked first); returns the page.
async fn aug_2m(cx: &Ctx, m: &TdxModule, tdr: Pfn, g: Gpa) -> SeamResult<Pfn> {
    link_to(cx, m, tdr, g, PgLevel::L1G).await;
    let p = alloc_2m(m, g);
    m.tdh_mem_page_aug(cx, tdr, g, PgLevel::L2M, p)
        .await
        .map(|()| p)
}

fn state_at(m: &TdxModule, tdr: Pfn, level: PgLevel, g: Gpa) -> SeptState {
    m.state().tds[&tdr].sept.state(level, g.gfn())
}

fn chldcnt(m: &TdxModule, tdr: Pfn) -> u64 {
    m.state().tds[&tdr].chldcnt
}

fn pt(m: &TdxModule, p: Pfn) -> PageType {
    m.state().pamt.get(p).pt
}

fn bepoch(m: &TdxModule, p: Pfn) -> u64 {
    m.state().pamt.get(p).bepoch
}

fn td_epoch(m: &TdxModule, tdr: Pfn) -> u64 {
    m.state().tds[&tdr].td_epoch
}

/// What the host ledger says the module holds the page as (None = handed back).
fn held_as(m: &TdxModule, p: Pfn) -> Option<TdxPageKind> {
    m.host()
        .borrow()
        .ledger
        .get(p)
        .expect("host page")
        .tdx
        .map(|h| h.kind)
}

fn no_locks_held(m: &TdxModule) -> bool {
    m.state().locks.none_held()
}

/// A leaf call for the prologue tests: (cx, module, TDR operand) -> status.
type LeafCall = fn(Ctx, Rc<TdxModule>, Pfn) -> std::pin::Pin<Box<dyn Future<Output = u64>>>;

/// The shared prologue of every leaf, in order:
/// `check_lock_and_map_explicit_tdr` (TDR outside any TDMR: OPERAND_ADDR_RANGE_ERROR; not a
/// PT_TDR page: PAGE_METADATA_INCORRECT; both with the TDR operand id), then
/// `check_state_map_tdcs_and_lock` (TD_KEYS_NOT_CONFIGURED before KEY.CONFIG,
/// TDCS_NOT_ALLOCATED before the last MNG.ADDCX, OP_STATE_INCORRECT in UNINITIALIZED, i.e.
/// before MNG.INIT). `tdr_opid` is the operand id the leaf gives its TDR (RDX, or RCX for
/// TRACK).
fn assert_prologue(call: LeafCall, tdr_opid: u64) {
    let mut b = bench();
    exec(&mut b, move |cx, m| async move {
        let cfg = m.state().config.clone();
        let (addr_range, metadata) = if tdr_opid == 2 {
            (ADDR_RANGE_ERROR_RDX, PAGE_METADATA_INCORRECT_RDX)
        } else {
            (ADDR_RANGE_ERROR_RCX, PAGE_METADATA_INCORRECT_RCX)
        };
        // TDR operand outside the TDMRs.
        assert_eq!(
            call(cx.clone(), m.clone(), outside_host()).await,
            addr_range
        );
        // An unassigned (PT_NDA) page as TDR.
        let nda = alloc(&m, KernelUse::Tdr);
        assert_eq!(call(cx.clone(), m.clone(), nda).await, metadata);
        // MNG.CREATE done, KEY.CONFIG not yet.
        let tdr = alloc(&m, KernelUse::Tdr);
        m.tdh_mng_create(&cx, tdr, HKID).await.unwrap();
        assert_eq!(
            call(cx.clone(), m.clone(), tdr).await,
            TD_KEYS_NOT_CONFIGURED
        );
        for pkg in 0..cfg.packages {
            m.tdh_mng_key_config(&cx, Lp(pkg), tdr).await.unwrap();
        }
        assert_eq!(call(cx.clone(), m.clone(), tdr).await, TDCS_NOT_ALLOCATED);
        let mut tdcs = Vec::new();
        for _ in 0..cfg.tdcs_pages {
            let p = alloc(&m, KernelUse::Tdcs);
            m.tdh_mng_addcx(&cx, tdr, p).await.unwrap();
            tdcs.push(p);
        }
        // A TDCS page (PT_TDCX) as TDR.
        assert_eq!(call(cx.clone(), m.clone(), tdcs[0]).await, metadata);
        // Keys configured, TDCS allocated, OP state UNINITIALIZED.
        assert_eq!(call(cx.clone(), m.clone(), tdr).await, OP_STATE_INCORRECT);
        assert!(no_locks_held(&m));
        assert_eq!(m.state().tds[&tdr].chldcnt, cfg.tdcs_pages as u64);
        // MNG.INIT still works: nothing the refused calls did stuck.
        m.tdh_mng_init(
            &cx,
            tdr,
            TdParams {
                max_vcpus: 1,
                attributes: 0,
            },
        )
        .await
        .unwrap();
    });
}

/// Runs PAGE.ADD at `gpa(0x10)` of an INITIALIZED TD until it holds its TDR exclusively, then
/// `contender`; returns the contender's status. PAGE.ADD must still succeed.
fn against_page_add<CF>(
    b: &mut Bench,
    tdr: Pfn,
    contender: impl FnOnce(Ctx, Rc<TdxModule>) -> CF,
) -> u64
where
    CF: Future<Output = u64> + 'static,
{
    let (src, page) = exec(b, move |cx, m| async move {
        link_path(&cx, &m, tdr, gpa(0x10)).await;
        (alloc(&m, KernelUse::Other), alloc_guest(&m, gpa(0x10)))
    });
    race(
        b,
        window_name(Leaf::MemPageAdd),
        move |cx, m| async move {
            m.tdh_mem_page_add(&cx, tdr, gpa(0x10), page, src)
                .await
                .expect("PAGE.ADD holding the TDR");
        },
        contender,
    )
}

/// The status constants above are the model's encodings of the same codes and operands.
#[test]
fn status_constants_match_the_model_encoding() {
    let w = |c: Code, o: Operand| Status::with(c, o).raw();
    assert_eq!(
        Status::new(Code::OpStateIncorrect).raw(),
        OP_STATE_INCORRECT
    );
    assert_eq!(
        Status::new(Code::TdKeysNotConfigured).raw(),
        TD_KEYS_NOT_CONFIGURED
    );
    assert_eq!(
        Status::new(Code::TdcsNotAllocated).raw(),
        TDCS_NOT_ALLOCATED
    );
    assert_eq!(w(Code::OperandInvalid, Operand::Rcx), OPERAND_INVALID_RCX);
    assert_eq!(w(Code::OperandInvalid, Operand::R8), OPERAND_INVALID_R8);
    assert_eq!(
        w(Code::OperandAddrRangeError, Operand::Rdx),
        ADDR_RANGE_ERROR_RDX
    );
    assert_eq!(
        w(Code::OperandAddrRangeError, Operand::R8),
        ADDR_RANGE_ERROR_R8
    );
    assert_eq!(
        w(Code::PageMetadataIncorrect, Operand::R8),
        PAGE_METADATA_INCORRECT_R8
    );
    assert_eq!(w(Code::EptWalkFailed, Operand::Rcx), EPT_WALK_FAILED_RCX);
    assert_eq!(
        w(Code::EptEntryStateIncorrect, Operand::Rcx),
        EPT_ENTRY_STATE_INCORRECT_RCX
    );
    assert_eq!(
        w(Code::GpaRangeNotBlocked, Operand::Rcx),
        GPA_RANGE_NOT_BLOCKED_RCX
    );
    assert_eq!(
        w(Code::GpaRangeAlreadyBlocked, Operand::Rcx),
        GPA_RANGE_ALREADY_BLOCKED_RCX
    );
    assert_eq!(
        w(Code::TlbTrackingNotDone, Operand::Rcx),
        TLB_TRACKING_NOT_DONE_RCX
    );
    assert_eq!(w(Code::EptPageNotFree, Operand::Rcx), EPT_PAGE_NOT_FREE_RCX);
    assert_eq!(
        Status::new(Code::PreviousTlbEpochBusy).raw(),
        PREVIOUS_TLB_EPOCH_BUSY
    );
    assert_eq!(w(Code::OperandBusy, Operand::Rcx), BUSY_RCX);
    assert_eq!(w(Code::OperandBusy, Operand::Rdx), BUSY_RDX);
    assert_eq!(w(Code::OperandBusy, Operand::R8), BUSY_R8);
    assert_eq!(w(Code::OperandBusy, Operand::SeptTree), BUSY_SEPT_TREE);
    assert_eq!(w(Code::OperandBusy, Operand::TdEpoch), BUSY_TD_EPOCH);
    // GPA_RANGE_ALREADY_BLOCKED is a success-class warning (bit 63 clear).
    assert!(!Status::with(Code::GpaRangeAlreadyBlocked, Operand::Rcx).is_error());
}

// =====================================================================================
// TDH.MEM.PAGE.ADD (leaf 2)
// =====================================================================================

/// Success (tdh_mem_page_add.c effects): the 4K entry goes FREE -> MAPPED at the target, the
/// source is copied, MRTD is extended, chldcnt += 1, PAMT(target) = PT_REG owned by the TDR
/// with bepoch 0, and the host ledger records the page as held by the module.
#[test]
fn page_add_maps_copies_and_measures() {
    let mut b = bench();
    let td = initialized_td(&mut b, 1);
    let tdr = td.tdr;
    exec(&mut b, move |cx, m| async move {
        link_path(&cx, &m, tdr, gpa(0x10)).await;
        let src = alloc(&m, KernelUse::Other);
        m.host().borrow_mut().write(src, 0x5eed);
        let page = alloc_guest(&m, gpa(0x10));
        let (cnt, mrtd) = (chldcnt(&m, tdr), m.state().tds[&tdr].mrtd);
        m.tdh_mem_page_add(&cx, tdr, gpa(0x10), page, src)
            .await
            .unwrap();
        let e = m.state().tds[&tdr]
            .sept
            .get(PgLevel::L4K, gpa(0x10).gfn())
            .unwrap();
        assert_eq!((e.state, e.pfn), (SeptState::Mapped, page));
        assert_eq!(chldcnt(&m, tdr), cnt + 1);
        assert_ne!(m.state().tds[&tdr].mrtd, mrtd, "MRTD extended");
        let pe = m.state().pamt.get(page);
        assert_eq!((pe.pt, pe.owner, pe.bepoch), (PageType::Reg, Some(tdr), 0));
        assert_eq!(m.host().borrow().read(page), 0x5eed);
        assert_eq!(held_as(&m, page), Some(TdxPageKind::Guest));
        assert!(no_locks_held(&m));
    });
}

/// Prologue: TDR operand checks (RDX) and TD-state gate, in the handler's order.
#[test]
fn page_add_prologue() {
    assert_prologue(
        |cx, m, tdr| {
            Box::pin(async move {
                let src = alloc(&m, KernelUse::Other);
                let p = alloc_guest(&m, gpa(0x10));
                raw(&m.tdh_mem_page_add(&cx, tdr, gpa(0x10), p, src).await)
            })
        },
        2,
    );
}

/// OP state: PAGE.ADD is allowed in INITIALIZED only, so after MR.FINALIZE (RUNNABLE) it is
/// TDX_OP_STATE_INCORRECT, with no S-EPT details and nothing changed.
#[test]
fn page_add_after_finalize_is_op_state_incorrect() {
    let mut b = bench();
    let td = runnable_td(&mut b, 1);
    let tdr = td.tdr;
    exec(&mut b, move |cx, m| async move {
        link_path(&cx, &m, tdr, gpa(0x10)).await;
        let cnt = chldcnt(&m, tdr);
        let src = alloc(&m, KernelUse::Other);
        let p = alloc_guest(&m, gpa(0x10));
        let e = m
            .tdh_mem_page_add(&cx, tdr, gpa(0x10), p, src)
            .await
            .unwrap_err();
        assert_eq!(e.status.code, Code::OpStateIncorrect, "{e}");
        assert_eq!(e.sept, None);
        assert_eq!(state_at(&m, tdr, PgLevel::L4K, gpa(0x10)), SeptState::Free);
        assert_eq!((chldcnt(&m, tdr), pt(&m, p)), (cnt, PageType::Nda));
        assert!(no_locks_held(&m));
    });
}

/// OP_STATE_INCORRECT exactly: at 1666adc `check_state_map_tdcs_and_lock` returns
/// TDX_OP_STATE_INCORRECT with no operand (0xC000060800000000); only another helpers.c variant
/// adds the current op_state.
#[test]
fn page_add_op_state_incorrect_has_no_operand() {
    let mut b = bench();
    let td = runnable_td(&mut b, 1);
    let tdr = td.tdr;
    exec(&mut b, move |cx, m| async move {
        link_path(&cx, &m, tdr, gpa(0x10)).await;
        let src = alloc(&m, KernelUse::Other);
        let p = alloc_guest(&m, gpa(0x10));
        let r = m.tdh_mem_page_add(&cx, tdr, gpa(0x10), p, src).await;
        assert_eq!(
            raw(&r),
            OP_STATE_INCORRECT,
            "got {:#x}, want {OP_STATE_INCORRECT:#x}",
            raw(&r)
        );
    });
}

/// `verify_page_info_input` / GPA validity: a GPA not aligned to 4K, with the shared bit, or
/// above GPAW gives OPERAND_INVALID|RCX, before any walk.
#[test]
fn page_add_bad_gpa_is_operand_invalid() {
    let mut b = bench();
    let td = initialized_td(&mut b, 1);
    let tdr = td.tdr;
    exec(&mut b, move |cx, m| async move {
        link_path(&cx, &m, tdr, gpa(0x10)).await;
        let src = alloc(&m, KernelUse::Other);
        let p = alloc_guest(&m, gpa(0x10));
        for bad in [
            Gpa::new(gpa(0x10).raw() | 0x800),
            gpa(0x10).to_shared(),
            Gpa::new(gpa(0x10).raw() | 1 << 48),
        ] {
            let e = m.tdh_mem_page_add(&cx, tdr, bad, p, src).await.unwrap_err();
            check(&e, OPERAND_INVALID_RCX, None);
        }
        assert_eq!(pt(&m, p), PageType::Nda);
        assert!(no_locks_held(&m));
    });
}

/// Walk: the unlocked walk must reach the 4K level; otherwise EPT_WALK_FAILED|RCX with the
/// details of the last entry reached (no tables at all: the FREE PML4 entry; a missing 4K
/// table: the FREE 2M entry; a 2M leaf: that leaf).
#[test]
fn page_add_walk_failed_reports_entry_reached() {
    let mut b = bench();
    let td = initialized_td(&mut b, 1);
    let tdr = td.tdr;
    exec(&mut b, move |cx, m| async move {
        let src = alloc(&m, KernelUse::Other);
        let p = alloc_guest(&m, gpa(0x10));
        let e = m
            .tdh_mem_page_add(&cx, tdr, gpa(0x10), p, src)
            .await
            .unwrap_err();
        check(
            &e,
            EPT_WALK_FAILED_RCX,
            sept_details(PgLevel::L512G, SeptState::Free),
        );
        link_to(&cx, &m, tdr, gpa(0x10), PgLevel::L1G).await;
        let e = m
            .tdh_mem_page_add(&cx, tdr, gpa(0x10), p, src)
            .await
            .unwrap_err();
        check(
            &e,
            EPT_WALK_FAILED_RCX,
            sept_details(PgLevel::L2M, SeptState::Free),
        );
        aug_2m(&cx, &m, tdr, gpa_2m(1)).await.unwrap();
        let inside = gpa_2m(1).gfn().add(3).gpa();
        let e = m
            .tdh_mem_page_add(&cx, tdr, inside, p, src)
            .await
            .unwrap_err();
        check(
            &e,
            EPT_WALK_FAILED_RCX,
            sept_details(PgLevel::L2M, SeptState::Pending),
        );
        assert_eq!(pt(&m, p), PageType::Nda);
        assert!(no_locks_held(&m));
    });
}

/// Entry state: PAGE.ADD accepts FREE only; a MAPPED or PENDING 4K entry gives
/// EPT_ENTRY_STATE_INCORRECT|RCX with that entry's details.
#[test]
fn page_add_on_used_entry_is_state_incorrect() {
    let mut b = bench();
    let td = initialized_td(&mut b, 1);
    let tdr = td.tdr;
    exec(&mut b, move |cx, m| async move {
        page_add(&cx, &m, tdr, gpa(0x10)).await.unwrap();
        aug(&cx, &m, tdr, gpa(0x11)).await.unwrap();
        let cnt = chldcnt(&m, tdr);
        let src = alloc(&m, KernelUse::Other);
        let p = alloc_guest(&m, gpa(0x10));
        for (g, state) in [
            (gpa(0x10), SeptState::Mapped),
            (gpa(0x11), SeptState::Pending),
        ] {
            let e = m.tdh_mem_page_add(&cx, tdr, g, p, src).await.unwrap_err();
            check(
                &e,
                EPT_ENTRY_STATE_INCORRECT_RCX,
                sept_details(PgLevel::L4K, state),
            );
            assert_eq!(state_at(&m, tdr, PgLevel::L4K, g), state);
        }
        assert_eq!((chldcnt(&m, tdr), pt(&m, p)), (cnt, PageType::Nda));
        assert!(no_locks_held(&m));
    });
}

/// Target page (explicit 4K private HPA, expected PT_NDA): a page already assigned (a TD
/// page, a TDCS page) gives PAGE_METADATA_INCORRECT|R8 and the entry stays FREE.
#[test]
fn page_add_assigned_target_is_metadata_incorrect() {
    let mut b = bench();
    let td = initialized_td(&mut b, 1);
    let (tdr, tdcs0) = (td.tdr, td.tdcs[0]);
    exec(&mut b, move |cx, m| async move {
        let used = page_add(&cx, &m, tdr, gpa(0x10)).await.unwrap();
        let src = alloc(&m, KernelUse::Other);
        let cnt = chldcnt(&m, tdr);
        for target in [used, tdcs0] {
            let e = m
                .tdh_mem_page_add(&cx, tdr, gpa(0x11), target, src)
                .await
                .unwrap_err();
            check(&e, PAGE_METADATA_INCORRECT_R8, None);
        }
        assert_eq!(state_at(&m, tdr, PgLevel::L4K, gpa(0x11)), SeptState::Free);
        assert_eq!(chldcnt(&m, tdr), cnt);
        assert_eq!(pt(&m, used), PageType::Reg);
        assert!(no_locks_held(&m));
    });
}

/// Target page outside every TDMR: OPERAND_ADDR_RANGE_ERROR|R8.
#[test]
fn page_add_target_outside_tdmr_is_addr_range_error() {
    let mut b = bench();
    let td = initialized_td(&mut b, 1);
    let tdr = td.tdr;
    exec(&mut b, move |cx, m| async move {
        link_path(&cx, &m, tdr, gpa(0x10)).await;
        let src = alloc(&m, KernelUse::Other);
        for target in [outside_host(), Pfn::new(1)] {
            let e = m
                .tdh_mem_page_add(&cx, tdr, gpa(0x10), target, src)
                .await
                .unwrap_err();
            check(&e, ADDR_RANGE_ERROR_R8, None);
        }
        assert_eq!(state_at(&m, tdr, PgLevel::L4K, gpa(0x10)), SeptState::Free);
        assert!(no_locks_held(&m));
    });
}

/// Lock row: PAGE.ADD takes the TDR exclusively, so a second PAGE.ADD (any GPA) is
/// TDX_OPERAND_BUSY|RDX.
#[test]
fn page_add_busy_rdx_while_page_add_holds_tdr() {
    let mut b = bench();
    let td = initialized_td(&mut b, 1);
    let tdr = td.tdr;
    let r = against_page_add(&mut b, tdr, move |cx, m| async move {
        let src = alloc(&m, KernelUse::Other);
        let p = alloc_guest(&m, gpa(0x11));
        raw(&m.tdh_mem_page_add(&cx, tdr, gpa(0x11), p, src).await)
    });
    assert_eq!(r, BUSY_RDX);
    assert_eq!(
        state_at(&b.m, tdr, PgLevel::L4K, gpa(0x10)),
        SeptState::Mapped
    );
    assert_eq!(
        state_at(&b.m, tdr, PgLevel::L4K, gpa(0x11)),
        SeptState::Free
    );
}

/// Lock row: the target's PAMT entry is taken exclusively; while PHYMEM.PAGE.WBINVD holds it
/// (shared), PAGE.ADD is TDX_OPERAND_BUSY|R8.
#[test]
fn page_add_busy_r8_while_target_pamt_entry_is_held() {
    let mut b = bench();
    let td = initialized_td(&mut b, 1);
    let (tdr, hkid) = (td.tdr, td.hkid);
    let (src, p) = exec(&mut b, move |cx, m| async move {
        link_path(&cx, &m, tdr, gpa(0x10)).await;
        (alloc(&m, KernelUse::Other), alloc_guest(&m, gpa(0x10)))
    });
    let r = race(
        &mut b,
        window_name(Leaf::PhymemPageWbinvd),
        move |cx, m| async move {
            m.tdh_phymem_page_wbinvd(&cx, p, CacheKey::Td(hkid))
                .await
                .unwrap();
        },
        move |cx, m| async move { raw(&m.tdh_mem_page_add(&cx, tdr, gpa(0x10), p, src).await) },
    );
    assert_eq!(r, BUSY_R8);
    assert_eq!(
        state_at(&b.m, tdr, PgLevel::L4K, gpa(0x10)),
        SeptState::Free
    );
    assert_eq!(pt(&b.m, p), PageType::Nda);
}

// =====================================================================================
// TDH.MEM.SEPT.ADD (leaf 3)
// =====================================================================================

/// Success (tdh_mem_sept_add.c effects), in a RUNNABLE TD: each parent entry (512G, 1G, 2M)
/// goes FREE -> NL_MAPPED pointing at the new page, chldcnt += 1 per page, PAMT = PT_EPT owned
/// by the TDR, the ledger holds the page as an S-EPT page.
#[test]
fn sept_add_links_tables() {
    let mut b = bench();
    let td = runnable_td(&mut b, 1);
    let tdr = td.tdr;
    exec(&mut b, move |cx, m| async move {
        let g = gpa(0x10);
        for level in [PgLevel::L512G, PgLevel::L1G, PgLevel::L2M] {
            let cnt = chldcnt(&m, tdr);
            let p = alloc(&m, KernelUse::Sept);
            m.tdh_mem_sept_add(&cx, tdr, g.gfn().align_down(level).gpa(), level, p)
                .await
                .unwrap();
            let e = m.state().tds[&tdr].sept.get(level, g.gfn()).unwrap();
            assert_eq!((e.state, e.pfn), (SeptState::NlMapped, p));
            assert_eq!(chldcnt(&m, tdr), cnt + 1);
            let pe = m.state().pamt.get(p);
            assert_eq!((pe.pt, pe.owner, pe.bepoch), (PageType::Ept, Some(tdr), 0));
            assert_eq!(held_as(&m, p), Some(TdxPageKind::Sept));
        }
        // The 4K entries below are reachable (FREE) now.
        assert_eq!(
            m.state().tds[&tdr].sept.walk(g.gfn(), PgLevel::L4K).level,
            PgLevel::L4K
        );
        assert!(no_locks_held(&m));
    });
}

/// Prologue: TDR operand checks (RDX) and TD-state gate, in the handler's order.
#[test]
fn sept_add_prologue() {
    assert_prologue(
        |cx, m, tdr| {
            Box::pin(async move {
                let p = alloc(&m, KernelUse::Sept);
                raw(&m
                    .tdh_mem_sept_add(&cx, tdr, Gpa::new(0), PgLevel::L512G, p)
                    .await)
            })
        },
        2,
    );
}

/// `verify_page_info_input(PD, pwl)` / GPA validity: a 4K level, a GPA not aligned to the
/// level, the shared bit, or a bit above GPAW gives OPERAND_INVALID|RCX.
#[test]
fn sept_add_bad_operand_is_operand_invalid() {
    let mut b = bench();
    let td = initialized_td(&mut b, 1);
    let tdr = td.tdr;
    exec(&mut b, move |cx, m| async move {
        link_to(&cx, &m, tdr, gpa_2m(1), PgLevel::L1G).await;
        let p = alloc(&m, KernelUse::Sept);
        for (g, level) in [
            (gpa_2m(1), PgLevel::L4K),
            (gpa_2m(1).gfn().add(1).gpa(), PgLevel::L2M),
            (gpa_2m(1).to_shared(), PgLevel::L2M),
            (Gpa::new(gpa_2m(1).raw() | 1 << 48), PgLevel::L2M),
        ] {
            let e = m.tdh_mem_sept_add(&cx, tdr, g, level, p).await.unwrap_err();
            check(&e, OPERAND_INVALID_RCX, None);
        }
        assert_eq!(pt(&m, p), PageType::Nda);
        assert!(no_locks_held(&m));
    });
}

/// Walk: the parent entry must be reachable; otherwise EPT_WALK_FAILED|RCX with the last entry
/// reached (a FREE PML4 entry; a blocked 1G non-leaf, whose RWX is 0).
#[test]
fn sept_add_walk_failed_reports_entry_reached() {
    let mut b = bench();
    let td = initialized_td(&mut b, 1);
    let tdr = td.tdr;
    exec(&mut b, move |cx, m| async move {
        let p = alloc(&m, KernelUse::Sept);
        let e = m
            .tdh_mem_sept_add(&cx, tdr, gpa_2m(1), PgLevel::L2M, p)
            .await
            .unwrap_err();
        check(
            &e,
            EPT_WALK_FAILED_RCX,
            sept_details(PgLevel::L512G, SeptState::Free),
        );
        link_to(&cx, &m, tdr, gpa_2m(1), PgLevel::L1G).await;
        m.tdh_mem_range_block(&cx, tdr, Gpa::new(0), PgLevel::L1G)
            .await
            .unwrap();
        let e = m
            .tdh_mem_sept_add(&cx, tdr, gpa_2m(1), PgLevel::L2M, p)
            .await
            .unwrap_err();
        check(
            &e,
            EPT_WALK_FAILED_RCX,
            sept_details(PgLevel::L1G, SeptState::NlBlocked),
        );
        assert_eq!(pt(&m, p), PageType::Nda);
        assert!(no_locks_held(&m));
    });
}

/// Entry state: SEPT.ADD needs a FREE parent (NL_MAPPED only with `allow_existing`, which
/// this API never sets); an existing table (NL_MAPPED) or a 2M leaf (PENDING) gives
/// EPT_ENTRY_STATE_INCORRECT|RCX with the entry's details, and the new page is not used.
#[test]
fn sept_add_on_used_entry_is_state_incorrect() {
    let mut b = bench();
    let td = initialized_td(&mut b, 1);
    let tdr = td.tdr;
    exec(&mut b, move |cx, m| async move {
        link_path(&cx, &m, tdr, gpa_2m(1)).await;
        aug_2m(&cx, &m, tdr, gpa_2m(2)).await.unwrap();
        let cnt = chldcnt(&m, tdr);
        let p = alloc(&m, KernelUse::Sept);
        for (g, state) in [
            (gpa_2m(1), SeptState::NlMapped),
            (gpa_2m(2), SeptState::Pending),
        ] {
            let e = m
                .tdh_mem_sept_add(&cx, tdr, g, PgLevel::L2M, p)
                .await
                .unwrap_err();
            check(
                &e,
                EPT_ENTRY_STATE_INCORRECT_RCX,
                sept_details(PgLevel::L2M, state),
            );
        }
        assert_eq!((chldcnt(&m, tdr), pt(&m, p)), (cnt, PageType::Nda));
        assert!(no_locks_held(&m));
    });
}

/// New page (explicit 4K private HPA, expected PT_NDA): an assigned page (a TDCS page, an
/// S-EPT page already in use) gives PAGE_METADATA_INCORRECT|R8.
#[test]
fn sept_add_assigned_page_is_metadata_incorrect() {
    let mut b = bench();
    let td = initialized_td(&mut b, 1);
    let (tdr, tdcs0) = (td.tdr, td.tdcs[0]);
    exec(&mut b, move |cx, m| async move {
        let tables = link_to(&cx, &m, tdr, gpa_2m(1), PgLevel::L1G).await;
        for p in [tdcs0, tables[0]] {
            let e = m
                .tdh_mem_sept_add(&cx, tdr, gpa_2m(1), PgLevel::L2M, p)
                .await
                .unwrap_err();
            check(&e, PAGE_METADATA_INCORRECT_R8, None);
        }
        assert_eq!(state_at(&m, tdr, PgLevel::L2M, gpa_2m(1)), SeptState::Free);
        assert!(no_locks_held(&m));
    });
}

/// New page outside every TDMR: OPERAND_ADDR_RANGE_ERROR|R8.
#[test]
fn sept_add_page_outside_tdmr_is_addr_range_error() {
    let mut b = bench();
    let td = initialized_td(&mut b, 1);
    let tdr = td.tdr;
    exec(&mut b, move |cx, m| async move {
        let e = m
            .tdh_mem_sept_add(&cx, tdr, Gpa::new(0), PgLevel::L512G, outside_host())
            .await
            .unwrap_err();
        check(&e, ADDR_RANGE_ERROR_R8, None);
        assert_eq!(
            state_at(&m, tdr, PgLevel::L512G, Gpa::new(0)),
            SeptState::Free
        );
        assert!(no_locks_held(&m));
    });
}

/// Lock row: TDR shared; PAGE.ADD holds it exclusively, so SEPT.ADD is BUSY|RDX.
#[test]
fn sept_add_busy_rdx_while_page_add_holds_tdr() {
    let mut b = bench();
    let td = initialized_td(&mut b, 1);
    let tdr = td.tdr;
    let r = against_page_add(&mut b, tdr, move |cx, m| async move {
        let p = alloc(&m, KernelUse::Sept);
        raw(&m
            .tdh_mem_sept_add(&cx, tdr, gpa_2m(1), PgLevel::L2M, p)
            .await)
    });
    assert_eq!(r, BUSY_RDX);
}

/// Lock row: SEPT tree shared; RANGE.BLOCK holds it exclusively, so SEPT.ADD is
/// BUSY|SEPT_TREE.
#[test]
fn sept_add_busy_sept_tree_while_block_holds_it() {
    let mut b = bench();
    let td = runnable_td(&mut b, 1);
    let tdr = td.tdr;
    exec(&mut b, move |cx, m| async move {
        aug(&cx, &m, tdr, gpa(0x10)).await.unwrap();
        link_to(&cx, &m, tdr, gpa_2m(1), PgLevel::L1G).await;
    });
    let r = race(
        &mut b,
        window_name(Leaf::MemRangeBlock),
        move |cx, m| async move {
            m.tdh_mem_range_block(&cx, tdr, gpa(0x10), PgLevel::L4K)
                .await
                .unwrap();
        },
        move |cx, m| async move {
            let p = alloc(&m, KernelUse::Sept);
            raw(&m
                .tdh_mem_sept_add(&cx, tdr, gpa_2m(1), PgLevel::L2M, p)
                .await)
        },
    );
    assert_eq!(r, BUSY_SEPT_TREE);
}

/// Lock row: the parent entry's host-side lock; two SEPT.ADDs of the same table race there
/// and the loser gets BUSY|RCX (the upstream "another vCPU linked it" case), with the S-EPT
/// details of the entry it walked to (`set_arch_septe_details_in_vmm_regs` after
/// `sept_lock_acquire_host` fails).
#[test]
fn sept_add_busy_rcx_on_the_same_parent_entry() {
    let mut b = bench();
    let td = runnable_td(&mut b, 1);
    let tdr = td.tdr;
    let (p1, p2) = exec(&mut b, move |cx, m| async move {
        link_to(&cx, &m, tdr, gpa_2m(1), PgLevel::L1G).await;
        (alloc(&m, KernelUse::Sept), alloc(&m, KernelUse::Sept))
    });
    let r = race(
        &mut b,
        window_name(Leaf::MemSeptAdd),
        move |cx, m| async move {
            m.tdh_mem_sept_add(&cx, tdr, gpa_2m(1), PgLevel::L2M, p1)
                .await
                .unwrap();
        },
        move |cx, m| async move {
            m.tdh_mem_sept_add(&cx, tdr, gpa_2m(1), PgLevel::L2M, p2)
                .await
        },
    );
    // The handler also reports the walked entry as it read it before the lock (FREE).
    check(
        &r.unwrap_err(),
        BUSY_RCX,
        sept_details(PgLevel::L2M, SeptState::Free),
    );
    assert_eq!(pt(&b.m, p1), PageType::Ept);
    assert_eq!(pt(&b.m, p2), PageType::Nda);
}

/// Lock row: the new page's PAMT entry, exclusive; two SEPT.ADDs of different tables with the
/// same page: the loser gets BUSY|R8.
#[test]
fn sept_add_busy_r8_on_the_same_new_page() {
    let mut b = bench();
    let td = runnable_td(&mut b, 1);
    let tdr = td.tdr;
    let p = exec(&mut b, move |cx, m| async move {
        link_to(&cx, &m, tdr, gpa_2m(1), PgLevel::L1G).await;
        alloc(&m, KernelUse::Sept)
    });
    let r = race(
        &mut b,
        window_name(Leaf::MemSeptAdd),
        move |cx, m| async move {
            m.tdh_mem_sept_add(&cx, tdr, gpa_2m(1), PgLevel::L2M, p)
                .await
                .unwrap();
        },
        move |cx, m| async move {
            raw(&m
                .tdh_mem_sept_add(&cx, tdr, gpa_2m(2), PgLevel::L2M, p)
                .await)
        },
    );
    assert_eq!(r, BUSY_R8);
    assert_eq!(
        state_at(&b.m, tdr, PgLevel::L2M, gpa_2m(2)),
        SeptState::Free
    );
}

// =====================================================================================
// TDH.MEM.PAGE.AUG (leaf 6)
// =====================================================================================

/// Success, 4K (tdh_mem_page_aug.c effects), in INITIALIZED and RUNNABLE: FREE -> PENDING at
/// the target, chldcnt += 1, PAMT = PT_REG owned by the TDR, bepoch 0; ledger: a guest page.
#[test]
fn page_aug_4k_maps_pending() {
    let mut b = bench();
    let td = initialized_td(&mut b, 1);
    let tdr = td.tdr;
    exec(&mut b, move |cx, m| async move {
        for (i, finalize) in [(0x10, false), (0x11, true)] {
            if finalize {
                m.tdh_mr_finalize(&cx, tdr).await.unwrap();
            }
            link_path(&cx, &m, tdr, gpa(i)).await;
            let cnt = chldcnt(&m, tdr);
            let p = alloc_guest(&m, gpa(i));
            m.tdh_mem_page_aug(&cx, tdr, gpa(i), PgLevel::L4K, p)
                .await
                .unwrap();
            let e = m.state().tds[&tdr]
                .sept
                .get(PgLevel::L4K, gpa(i).gfn())
                .unwrap();
            assert_eq!((e.state, e.pfn), (SeptState::Pending, p));
            assert_eq!(chldcnt(&m, tdr), cnt + 1);
            let pe = m.state().pamt.get(p);
            assert_eq!((pe.pt, pe.owner, pe.bepoch), (PageType::Reg, Some(tdr), 0));
            assert_eq!(held_as(&m, p), Some(TdxPageKind::Guest));
        }
        assert!(no_locks_held(&m));
    });
}

/// Success, 2M: the 2M entry goes FREE -> PENDING (a leaf), chldcnt += 512 (1 << 9*level),
/// all 512 4K PAMT entries become PT_REG and the ledger holds all 512 pages.
#[test]
fn page_aug_2m_maps_pending_and_counts_512() {
    let mut b = bench();
    let td = runnable_td(&mut b, 1);
    let tdr = td.tdr;
    exec(&mut b, move |cx, m| async move {
        link_to(&cx, &m, tdr, gpa_2m(1), PgLevel::L1G).await;
        let cnt = chldcnt(&m, tdr);
        let p = alloc_2m(&m, gpa_2m(1));
        m.tdh_mem_page_aug(&cx, tdr, gpa_2m(1), PgLevel::L2M, p)
            .await
            .unwrap();
        let e = m.state().tds[&tdr]
            .sept
            .get(PgLevel::L2M, gpa_2m(1).gfn())
            .unwrap();
        assert_eq!((e.state, e.pfn), (SeptState::Pending, p));
        assert_eq!(chldcnt(&m, tdr), cnt + 512);
        for i in 0..512 {
            assert_eq!(pt(&m, p.add(i)), PageType::Reg);
            assert_eq!(held_as(&m, p.add(i)), Some(TdxPageKind::Guest));
        }
        assert!(no_locks_held(&m));
    });
}

/// Prologue: TDR operand checks (RDX) and TD-state gate, in the handler's order.
#[test]
fn page_aug_prologue() {
    assert_prologue(
        |cx, m, tdr| {
            Box::pin(async move {
                let p = alloc_guest(&m, gpa(0x10));
                raw(&m
                    .tdh_mem_page_aug(&cx, tdr, gpa(0x10), PgLevel::L4K, p)
                    .await)
            })
        },
        2,
    );
}

/// `verify_page_info_input(PT, PD)` / GPA validity: 1G or 512G level, a GPA not aligned to
/// 2M for a 2M AUG, the shared bit, or a bit above GPAW: OPERAND_INVALID|RCX.
#[test]
fn page_aug_bad_operand_is_operand_invalid() {
    let mut b = bench();
    let td = runnable_td(&mut b, 1);
    let tdr = td.tdr;
    exec(&mut b, move |cx, m| async move {
        link_path(&cx, &m, tdr, gpa(0x10)).await;
        let p = alloc_guest(&m, gpa(0x10));
        for (g, level) in [
            (Gpa::new(0), PgLevel::L1G),
            (Gpa::new(0), PgLevel::L512G),
            (gpa(0x10), PgLevel::L2M),
            (gpa(0x10).to_shared(), PgLevel::L4K),
            (Gpa::new(gpa(0x10).raw() | 1 << 48), PgLevel::L4K),
        ] {
            let e = m.tdh_mem_page_aug(&cx, tdr, g, level, p).await.unwrap_err();
            check(&e, OPERAND_INVALID_RCX, None);
        }
        assert_eq!(pt(&m, p), PageType::Nda);
        assert!(no_locks_held(&m));
    });
}

/// Walk: EPT_WALK_FAILED|RCX with the last entry reached: the FREE 2M entry when the 4K table
/// is missing; a 2M PENDING leaf covering the GPA; a blocked 2M non-leaf (NL_BLOCKED).
#[test]
fn page_aug_walk_failed_reports_entry_reached() {
    let mut b = bench();
    let td = runnable_td(&mut b, 1);
    let tdr = td.tdr;
    exec(&mut b, move |cx, m| async move {
        link_to(&cx, &m, tdr, gpa(0x10), PgLevel::L1G).await;
        aug_2m(&cx, &m, tdr, gpa_2m(1)).await.unwrap();
        link_path(&cx, &m, tdr, gpa_2m(2)).await;
        m.tdh_mem_range_block(&cx, tdr, gpa_2m(2), PgLevel::L2M)
            .await
            .unwrap();
        let p = alloc_guest(&m, gpa(0x10));
        for (g, level, state) in [
            (gpa(0x10), PgLevel::L2M, SeptState::Free),
            (
                gpa_2m(1).gfn().add(5).gpa(),
                PgLevel::L2M,
                SeptState::Pending,
            ),
            (
                gpa_2m(2).gfn().add(5).gpa(),
                PgLevel::L2M,
                SeptState::NlBlocked,
            ),
        ] {
            let e = m
                .tdh_mem_page_aug(&cx, tdr, g, PgLevel::L4K, p)
                .await
                .unwrap_err();
            check(&e, EPT_WALK_FAILED_RCX, sept_details(level, state));
        }
        assert_eq!(pt(&m, p), PageType::Nda);
        assert!(no_locks_held(&m));
    });
}

/// Entry state: AUG accepts FREE (or REMOVED) only. A second AUG of a PENDING page, AUG over
/// a MAPPED or BLOCKED page, or a 2M AUG over an existing 4K table (NL_MAPPED) gives
/// EPT_ENTRY_STATE_INCORRECT|RCX with the entry's details.
#[test]
fn page_aug_on_used_entry_is_state_incorrect() {
    let mut b = bench();
    let td = initialized_td(&mut b, 1);
    let tdr = td.tdr;
    exec(&mut b, move |cx, m| async move {
        aug(&cx, &m, tdr, gpa(0x10)).await.unwrap();
        page_add(&cx, &m, tdr, gpa(0x11)).await.unwrap();
        aug(&cx, &m, tdr, gpa(0x12)).await.unwrap();
        m.tdh_mem_range_block(&cx, tdr, gpa(0x12), PgLevel::L4K)
            .await
            .unwrap();
        let cnt = chldcnt(&m, tdr);
        let p = alloc_guest(&m, gpa(0x10));
        for (g, level, state) in [
            (gpa(0x10), PgLevel::L4K, SeptState::Pending),
            (gpa(0x11), PgLevel::L4K, SeptState::Mapped),
            (gpa(0x12), PgLevel::L4K, SeptState::PendingBlocked),
            (Gpa::new(0), PgLevel::L2M, SeptState::NlMapped),
        ] {
            let e = m.tdh_mem_page_aug(&cx, tdr, g, level, p).await.unwrap_err();
            check(
                &e,
                EPT_ENTRY_STATE_INCORRECT_RCX,
                sept_details(level, state),
            );
        }
        assert_eq!((chldcnt(&m, tdr), pt(&m, p)), (cnt, PageType::Nda));
        assert!(no_locks_held(&m));
    });
}

/// Target alignment: a 2M AUG whose page is not 2M-aligned is OPERAND_INVALID|R8.
#[test]
fn page_aug_2m_misaligned_page_is_operand_invalid_r8() {
    let mut b = bench();
    let td = runnable_td(&mut b, 1);
    let tdr = td.tdr;
    exec(&mut b, move |cx, m| async move {
        link_to(&cx, &m, tdr, gpa_2m(1), PgLevel::L1G).await;
        let p = alloc_2m(&m, gpa_2m(1));
        let e = m
            .tdh_mem_page_aug(&cx, tdr, gpa_2m(1), PgLevel::L2M, p.add(1))
            .await
            .unwrap_err();
        check(&e, OPERAND_INVALID_R8, None);
        assert_eq!(state_at(&m, tdr, PgLevel::L2M, gpa_2m(1)), SeptState::Free);
        assert!(no_locks_held(&m));
    });
}

/// Target outside every TDMR: OPERAND_ADDR_RANGE_ERROR|R8.
#[test]
fn page_aug_page_outside_tdmr_is_addr_range_error() {
    let mut b = bench();
    let td = runnable_td(&mut b, 1);
    let tdr = td.tdr;
    exec(&mut b, move |cx, m| async move {
        link_path(&cx, &m, tdr, gpa(0x10)).await;
        let e = m
            .tdh_mem_page_aug(&cx, tdr, gpa(0x10), PgLevel::L4K, outside_host())
            .await
            .unwrap_err();
        check(&e, ADDR_RANGE_ERROR_R8, None);
        assert_eq!(state_at(&m, tdr, PgLevel::L4K, gpa(0x10)), SeptState::Free);
        assert!(no_locks_held(&m));
    });
}

/// Target PAMT: a 4K page already assigned, or a 2M page one of whose 512 4K pages is
/// assigned, gives PAGE_METADATA_INCORRECT|R8.
#[test]
fn page_aug_assigned_page_is_metadata_incorrect() {
    let mut b = bench();
    let td = initialized_td(&mut b, 1);
    let tdr = td.tdr;
    exec(&mut b, move |cx, m| async move {
        let used = aug(&cx, &m, tdr, gpa(0x10)).await.unwrap();
        link_path(&cx, &m, tdr, gpa(0x11)).await;
        let e = m
            .tdh_mem_page_aug(&cx, tdr, gpa(0x11), PgLevel::L4K, used)
            .await
            .unwrap_err();
        check(&e, PAGE_METADATA_INCORRECT_R8, None);
        // A 2M page with its 6th 4K page already a TD page.
        link_to(&cx, &m, tdr, gpa_2m(1), PgLevel::L1G).await;
        let big = alloc_2m(&m, gpa_2m(1));
        let src = alloc(&m, KernelUse::Other);
        m.tdh_mem_page_add(&cx, tdr, gpa(0x12), big.add(5), src)
            .await
            .unwrap();
        let cnt = chldcnt(&m, tdr);
        let e = m
            .tdh_mem_page_aug(&cx, tdr, gpa_2m(1), PgLevel::L2M, big)
            .await
            .unwrap_err();
        check(&e, PAGE_METADATA_INCORRECT_R8, None);
        assert_eq!(state_at(&m, tdr, PgLevel::L2M, gpa_2m(1)), SeptState::Free);
        assert_eq!((chldcnt(&m, tdr), pt(&m, big)), (cnt, PageType::Nda));
        assert!(no_locks_held(&m));
    });
}

/// Lock row: TDR shared; PAGE.ADD holds it exclusively, so AUG is BUSY|RDX.
#[test]
fn page_aug_busy_rdx_while_page_add_holds_tdr() {
    let mut b = bench();
    let td = initialized_td(&mut b, 1);
    let tdr = td.tdr;
    let r = against_page_add(&mut b, tdr, move |cx, m| async move {
        let p = alloc_guest(&m, gpa(0x11));
        raw(&m
            .tdh_mem_page_aug(&cx, tdr, gpa(0x11), PgLevel::L4K, p)
            .await)
    });
    assert_eq!(r, BUSY_RDX);
}

/// Lock row: SEPT tree shared; RANGE.BLOCK (exclusive) in its window makes AUG BUSY|SEPT_TREE.
#[test]
fn page_aug_busy_sept_tree_while_block_holds_it() {
    let mut b = bench();
    let td = runnable_td(&mut b, 1);
    let tdr = td.tdr;
    exec(&mut b, move |cx, m| async move {
        aug(&cx, &m, tdr, gpa(0x10)).await.unwrap();
    });
    let r = race(
        &mut b,
        window_name(Leaf::MemRangeBlock),
        move |cx, m| async move {
            m.tdh_mem_range_block(&cx, tdr, gpa(0x10), PgLevel::L4K)
                .await
                .unwrap();
        },
        move |cx, m| async move {
            let p = alloc_guest(&m, gpa(0x11));
            raw(&m
                .tdh_mem_page_aug(&cx, tdr, gpa(0x11), PgLevel::L4K, p)
                .await)
        },
    );
    assert_eq!(r, BUSY_SEPT_TREE);
    assert_eq!(
        state_at(&b.m, tdr, PgLevel::L4K, gpa(0x11)),
        SeptState::Free
    );
}

/// Lock row: SEPT tree shared; SEPT.REMOVE (exclusive) in its window makes AUG
/// BUSY|SEPT_TREE.
#[test]
fn page_aug_busy_sept_tree_while_sept_remove_holds_it() {
    let mut b = bench();
    let td = initialized_td(&mut b, 1);
    let tdr = td.tdr;
    exec(&mut b, move |cx, m| async move {
        link_path(&cx, &m, tdr, gpa(0x10)).await;
        link_path(&cx, &m, tdr, gpa_2m(1)).await;
    });
    let r = race(
        &mut b,
        window_name(Leaf::MemSeptRemove),
        move |cx, m| async move {
            m.tdh_mem_sept_remove(&cx, tdr, gpa_2m(1), PgLevel::L2M)
                .await
                .unwrap();
        },
        move |cx, m| async move {
            let p = alloc_guest(&m, gpa(0x10));
            raw(&m
                .tdh_mem_page_aug(&cx, tdr, gpa(0x10), PgLevel::L4K, p)
                .await)
        },
    );
    assert_eq!(r, BUSY_SEPT_TREE);
}

/// Lock row: the S-EPT entry's host-side lock; two AUGs of the same GPA (two vCPUs faulting
/// on it) race there and the loser gets BUSY|RCX plus the walked entry's details; its page is
/// not consumed.
#[test]
fn page_aug_busy_rcx_on_the_same_gpa() {
    let mut b = bench();
    let td = runnable_td(&mut b, 1);
    let tdr = td.tdr;
    let (p1, p2) = exec(&mut b, move |cx, m| async move {
        link_path(&cx, &m, tdr, gpa(0x10)).await;
        let p1 = alloc_guest(&m, gpa(0x10));
        (p1, alloc(&m, KernelUse::Other))
    });
    let r = race(
        &mut b,
        window_name(Leaf::MemPageAug),
        move |cx, m| async move {
            m.tdh_mem_page_aug(&cx, tdr, gpa(0x10), PgLevel::L4K, p1)
                .await
                .unwrap();
        },
        move |cx, m| async move {
            m.tdh_mem_page_aug(&cx, tdr, gpa(0x10), PgLevel::L4K, p2)
                .await
        },
    );
    check(
        &r.unwrap_err(),
        BUSY_RCX,
        sept_details(PgLevel::L4K, SeptState::Free),
    );
    assert_eq!((pt(&b.m, p1), pt(&b.m, p2)), (PageType::Reg, PageType::Nda));
}

/// Lock row: the target's PAMT entry, exclusive; two AUGs of different GPAs with the same
/// page: the loser gets BUSY|R8.
#[test]
fn page_aug_busy_r8_on_the_same_page() {
    let mut b = bench();
    let td = runnable_td(&mut b, 1);
    let tdr = td.tdr;
    let p = exec(&mut b, move |cx, m| async move {
        link_path(&cx, &m, tdr, gpa(0x10)).await;
        alloc_guest(&m, gpa(0x10))
    });
    let r = race(
        &mut b,
        window_name(Leaf::MemPageAug),
        move |cx, m| async move {
            m.tdh_mem_page_aug(&cx, tdr, gpa(0x10), PgLevel::L4K, p)
                .await
                .unwrap();
        },
        move |cx, m| async move {
            raw(&m
                .tdh_mem_page_aug(&cx, tdr, gpa(0x11), PgLevel::L4K, p)
                .await)
        },
    );
    assert_eq!(r, BUSY_R8);
    assert_eq!(
        state_at(&b.m, tdr, PgLevel::L4K, gpa(0x11)),
        SeptState::Free
    );
}

// =====================================================================================
// TDH.MEM.RANGE.BLOCK (leaf 7)
// =====================================================================================

/// Success (tdh_mem_range_block.c transitions): MAPPED -> BLOCKED, PENDING -> PENDING_BLOCKED
/// (4K and 2M), NL_MAPPED -> NL_BLOCKED; PAMT.bepoch := td_epoch sampled after the block, in
/// the mapped page's entry (leaf) or the child S-EPT page's entry (non-leaf).
#[test]
fn range_block_blocks_and_records_epoch() {
    let mut b = bench();
    let td = initialized_td(&mut b, 1);
    let tdr = td.tdr;
    exec(&mut b, move |cx, m| async move {
        let mapped = page_add(&cx, &m, tdr, gpa(0x10)).await.unwrap();
        m.tdh_mr_finalize(&cx, tdr).await.unwrap();
        let pending = aug(&cx, &m, tdr, gpa(0x11)).await.unwrap();
        let big = aug_2m(&cx, &m, tdr, gpa_2m(1)).await.unwrap();
        let table = link_path(&cx, &m, tdr, gpa_2m(2)).await.pop().unwrap();
        m.tdh_mem_track(&cx, tdr).await.unwrap();
        let cnt = chldcnt(&m, tdr);
        for (g, level, page, after) in [
            (gpa(0x10), PgLevel::L4K, mapped, SeptState::Blocked),
            (gpa(0x11), PgLevel::L4K, pending, SeptState::PendingBlocked),
            (gpa_2m(1), PgLevel::L2M, big, SeptState::PendingBlocked),
            (gpa_2m(2), PgLevel::L2M, table, SeptState::NlBlocked),
        ] {
            assert_eq!(bepoch(&m, page), 0);
            m.tdh_mem_range_block(&cx, tdr, g, level).await.unwrap();
            let e = m.state().tds[&tdr].sept.get(level, g.gfn()).unwrap();
            assert_eq!((e.state, e.pfn), (after, page));
            assert_eq!(bepoch(&m, page), td_epoch(&m, tdr));
            assert_ne!(bepoch(&m, page), 0);
        }
        assert_eq!(chldcnt(&m, tdr), cnt);
        assert!(no_locks_held(&m));
    });
}

/// Prologue: TDR operand checks (RDX) and TD-state gate, in the handler's order.
#[test]
fn range_block_prologue() {
    assert_prologue(
        |cx, m, tdr| {
            Box::pin(async move {
                raw(&m
                    .tdh_mem_range_block(&cx, tdr, gpa(0x10), PgLevel::L4K)
                    .await)
            })
        },
        2,
    );
}

/// `verify_page_info_input(PT, pwl)` / GPA validity: a GPA not aligned to the level, the
/// shared bit, or a bit above GPAW: OPERAND_INVALID|RCX.
#[test]
fn range_block_bad_operand_is_operand_invalid() {
    let mut b = bench();
    let td = runnable_td(&mut b, 1);
    let tdr = td.tdr;
    exec(&mut b, move |cx, m| async move {
        aug(&cx, &m, tdr, gpa(0x10)).await.unwrap();
        for (g, level) in [
            (gpa(0x10), PgLevel::L2M),
            (gpa(0x10), PgLevel::L512G),
            (gpa(0x10).to_shared(), PgLevel::L4K),
            (Gpa::new(gpa(0x10).raw() | 1 << 48), PgLevel::L4K),
        ] {
            let e = m.tdh_mem_range_block(&cx, tdr, g, level).await.unwrap_err();
            check(&e, OPERAND_INVALID_RCX, None);
        }
        assert_eq!(
            state_at(&m, tdr, PgLevel::L4K, gpa(0x10)),
            SeptState::Pending
        );
        assert!(no_locks_held(&m));
    });
}

/// Walk: EPT_WALK_FAILED|RCX with the last entry reached: the FREE 2M entry above a missing
/// 4K table; a 2M leaf when 4K is asked for; a blocked 2M non-leaf.
#[test]
fn range_block_walk_failed_reports_entry_reached() {
    let mut b = bench();
    let td = runnable_td(&mut b, 1);
    let tdr = td.tdr;
    exec(&mut b, move |cx, m| async move {
        link_to(&cx, &m, tdr, gpa(0x10), PgLevel::L1G).await;
        aug_2m(&cx, &m, tdr, gpa_2m(1)).await.unwrap();
        aug(&cx, &m, tdr, gpa_2m(2)).await.unwrap();
        m.tdh_mem_range_block(&cx, tdr, gpa_2m(2), PgLevel::L2M)
            .await
            .unwrap();
        for (g, level, state) in [
            (gpa(0x10), PgLevel::L2M, SeptState::Free),
            (gpa_2m(1), PgLevel::L2M, SeptState::Pending),
            (gpa_2m(2), PgLevel::L2M, SeptState::NlBlocked),
        ] {
            let e = m
                .tdh_mem_range_block(&cx, tdr, g, PgLevel::L4K)
                .await
                .unwrap_err();
            check(&e, EPT_WALK_FAILED_RCX, sept_details(level, state));
        }
        // The 4K page under the blocked table is untouched.
        assert_eq!(
            state_at(&m, tdr, PgLevel::L4K, gpa_2m(2)),
            SeptState::Pending
        );
        assert!(no_locks_held(&m));
    });
}

/// Entry state: a FREE entry is not in BLOCK's set and not blocked:
/// EPT_ENTRY_STATE_INCORRECT|RCX with the details (input level, FREE).
#[test]
fn range_block_free_entry_is_state_incorrect() {
    let mut b = bench();
    let td = runnable_td(&mut b, 1);
    let tdr = td.tdr;
    exec(&mut b, move |cx, m| async move {
        link_path(&cx, &m, tdr, gpa(0x10)).await;
        link_to(&cx, &m, tdr, gpa_2m(1), PgLevel::L1G).await;
        for (g, level) in [(gpa(0x10), PgLevel::L4K), (gpa_2m(1), PgLevel::L2M)] {
            let e = m.tdh_mem_range_block(&cx, tdr, g, level).await.unwrap_err();
            check(
                &e,
                EPT_ENTRY_STATE_INCORRECT_RCX,
                sept_details(level, SeptState::Free),
            );
        }
        assert!(no_locks_held(&m));
    });
}

/// Entry state: an already blocked entry (BLOCKED, PENDING_BLOCKED, NL_BLOCKED) gives the
/// warning GPA_RANGE_ALREADY_BLOCKED|RCX (bit 63 clear: not an error) with details; the entry
/// and its recorded bepoch are left alone, even after the epoch moved on.
#[test]
fn range_block_already_blocked_is_a_warning() {
    let mut b = bench();
    let td = initialized_td(&mut b, 1);
    let tdr = td.tdr;
    exec(&mut b, move |cx, m| async move {
        let mapped = page_add(&cx, &m, tdr, gpa(0x10)).await.unwrap();
        m.tdh_mr_finalize(&cx, tdr).await.unwrap();
        let pending = aug(&cx, &m, tdr, gpa(0x11)).await.unwrap();
        let table = link_path(&cx, &m, tdr, gpa_2m(1)).await.pop().unwrap();
        let cases = [
            (gpa(0x10), PgLevel::L4K, mapped, SeptState::Blocked),
            (gpa(0x11), PgLevel::L4K, pending, SeptState::PendingBlocked),
            (gpa_2m(1), PgLevel::L2M, table, SeptState::NlBlocked),
        ];
        for (g, level, _, _) in cases {
            m.tdh_mem_range_block(&cx, tdr, g, level).await.unwrap();
        }
        let blocked_in = td_epoch(&m, tdr);
        m.tdh_mem_track(&cx, tdr).await.unwrap();
        for (g, level, page, state) in cases {
            let e = m.tdh_mem_range_block(&cx, tdr, g, level).await.unwrap_err();
            check(
                &e,
                GPA_RANGE_ALREADY_BLOCKED_RCX,
                sept_details(level, state),
            );
            assert!(!e.status.is_error(), "a warning");
            assert_eq!(state_at(&m, tdr, level, g), state);
            assert_eq!(bepoch(&m, page), blocked_in);
        }
        assert!(no_locks_held(&m));
    });
}

/// Lock row: TDR shared; PAGE.ADD holds it exclusively, so BLOCK is BUSY|RDX.
#[test]
fn range_block_busy_rdx_while_page_add_holds_tdr() {
    let mut b = bench();
    let td = initialized_td(&mut b, 1);
    let tdr = td.tdr;
    let r = against_page_add(&mut b, tdr, move |cx, m| async move {
        raw(&m
            .tdh_mem_range_block(&cx, tdr, Gpa::new(0), PgLevel::L2M)
            .await)
    });
    assert_eq!(r, BUSY_RDX);
    assert_eq!(
        state_at(&b.m, tdr, PgLevel::L2M, Gpa::new(0)),
        SeptState::NlMapped
    );
}

/// Lock row: SEPT tree exclusive; while AUG holds it shared, BLOCK is BUSY|SEPT_TREE.
#[test]
fn range_block_busy_sept_tree_while_aug_holds_it() {
    let mut b = bench();
    let td = runnable_td(&mut b, 1);
    let tdr = td.tdr;
    let p = exec(&mut b, move |cx, m| async move {
        aug(&cx, &m, tdr, gpa(0x10)).await.unwrap();
        alloc_guest(&m, gpa(0x11))
    });
    let r = race(
        &mut b,
        window_name(Leaf::MemPageAug),
        move |cx, m| async move {
            m.tdh_mem_page_aug(&cx, tdr, gpa(0x11), PgLevel::L4K, p)
                .await
                .unwrap();
        },
        move |cx, m| async move {
            raw(&m
                .tdh_mem_range_block(&cx, tdr, gpa(0x10), PgLevel::L4K)
                .await)
        },
    );
    assert_eq!(r, BUSY_SEPT_TREE);
    assert_eq!(
        state_at(&b.m, tdr, PgLevel::L4K, gpa(0x10)),
        SeptState::Pending
    );
}

/// Lock row: SEPT tree exclusive; two BLOCKs of different GPAs: the loser is BUSY|SEPT_TREE.
#[test]
fn range_block_busy_sept_tree_while_block_holds_it() {
    let mut b = bench();
    let td = runnable_td(&mut b, 1);
    let tdr = td.tdr;
    exec(&mut b, move |cx, m| async move {
        aug(&cx, &m, tdr, gpa(0x10)).await.unwrap();
        aug(&cx, &m, tdr, gpa(0x11)).await.unwrap();
    });
    let r = race(
        &mut b,
        window_name(Leaf::MemRangeBlock),
        move |cx, m| async move {
            m.tdh_mem_range_block(&cx, tdr, gpa(0x10), PgLevel::L4K)
                .await
                .unwrap();
        },
        move |cx, m| async move {
            raw(&m
                .tdh_mem_range_block(&cx, tdr, gpa(0x11), PgLevel::L4K)
                .await)
        },
    );
    assert_eq!(r, BUSY_SEPT_TREE);
}

/// Lock row: the S-EPT entry's host-side lock; while the guest's TDG.MEM.PAGE.ACCEPT holds the
/// entry, BLOCK of that GPA is BUSY|RCX (0x8000020000000001, not SEPT_ENTRY).
#[test]
fn range_block_busy_rcx_while_guest_accept_holds_entry() {
    let mut b = bench();
    let td = runnable_td(&mut b, 1);
    let (tdr, v0) = (td.tdr, td.vcpus[0].tdvpr);
    exec(&mut b, move |cx, m| async move {
        aug(&cx, &m, tdr, gpa(0x10)).await.unwrap();
        m.tdh_vp_enter(&cx, Lp(0), v0, 0).await.unwrap();
    });
    let r = race(
        &mut b,
        window_name(Leaf::TdgMemPageAccept),
        move |cx, m| async move {
            let r = m
                .tdg_mem_page_accept(&cx, v0, gpa(0x10), PgLevel::L4K)
                .await
                .unwrap();
            assert_eq!(r.status, Status::SUCCESS);
        },
        move |cx, m| async move {
            raw(&m
                .tdh_mem_range_block(&cx, tdr, gpa(0x10), PgLevel::L4K)
                .await)
        },
    );
    assert_eq!(r, BUSY_RCX);
    assert_eq!(
        state_at(&b.m, tdr, PgLevel::L4K, gpa(0x10)),
        SeptState::Mapped
    );
}

// =====================================================================================
// TDH.MEM.TRACK (leaf 38)
// =====================================================================================

/// Success (tdh_mem_track.c): td_epoch += 1, in INITIALIZED and RUNNABLE; with no vCPU
/// inside, TRACK can be repeated.
#[test]
fn track_advances_the_epoch() {
    let mut b = bench();
    let td = initialized_td(&mut b, 1);
    let tdr = td.tdr;
    exec(&mut b, move |cx, m| async move {
        let e0 = td_epoch(&m, tdr);
        m.tdh_mem_track(&cx, tdr).await.unwrap();
        assert_eq!(td_epoch(&m, tdr), e0 + 1);
        m.tdh_mr_finalize(&cx, tdr).await.unwrap();
        m.tdh_mem_track(&cx, tdr).await.unwrap();
        m.tdh_mem_track(&cx, tdr).await.unwrap();
        assert_eq!(td_epoch(&m, tdr), e0 + 3);
        assert!(no_locks_held(&m));
    });
}

/// Prologue: TDR operand checks (RCX for TRACK) and TD-state gate.
#[test]
fn track_prologue() {
    assert_prologue(
        |cx, m, tdr| Box::pin(async move { raw(&m.tdh_mem_track(&cx, tdr).await) }),
        1,
    );
}

/// refcount[(E-1) & 1] != 0: a vCPU that entered in the previous epoch is still inside, so a
/// second TRACK is TDX_PREVIOUS_TLB_EPOCH_BUSY (no operand) and the epoch stays; after the
/// vCPU exits TRACK succeeds.
#[test]
fn track_previous_epoch_busy_until_vcpu_exits() {
    let mut b = bench();
    let td = runnable_td(&mut b, 1);
    let (tdr, v0) = (td.tdr, td.vcpus[0].tdvpr);
    exec(&mut b, move |cx, m| async move {
        m.tdh_vp_enter(&cx, Lp(0), v0, 0).await.unwrap();
        m.tdh_mem_track(&cx, tdr).await.unwrap();
        let e1 = td_epoch(&m, tdr);
        let e = m.tdh_mem_track(&cx, tdr).await.unwrap_err();
        check(&e, PREVIOUS_TLB_EPOCH_BUSY, None);
        assert_eq!(td_epoch(&m, tdr), e1);
        m.td_exit(v0, 0);
        m.tdh_mem_track(&cx, tdr).await.unwrap();
        assert_eq!(td_epoch(&m, tdr), e1 + 1);
        assert!(no_locks_held(&m));
    });
}

/// Lock row: TDR shared with operand RCX; PAGE.ADD holds it exclusively, so TRACK is
/// BUSY|RCX (0x8000020000000001).
#[test]
fn track_busy_rcx_while_page_add_holds_tdr() {
    let mut b = bench();
    let td = initialized_td(&mut b, 1);
    let tdr = td.tdr;
    let e0 = td_epoch(&b.m, tdr);
    let r = against_page_add(&mut b, tdr, move |cx, m| async move {
        raw(&m.tdh_mem_track(&cx, tdr).await)
    });
    assert_eq!(r, BUSY_RCX);
    assert_eq!(td_epoch(&b.m, tdr), e0);
}

/// Lock row: TD epoch lock exclusive; two TRACKs: the loser is BUSY|TD_EPOCH and the epoch
/// advances once.
#[test]
fn track_busy_td_epoch_while_track_holds_it() {
    let mut b = bench();
    let td = runnable_td(&mut b, 1);
    let tdr = td.tdr;
    let e0 = td_epoch(&b.m, tdr);
    let r = race(
        &mut b,
        window_name(Leaf::MemTrack),
        move |cx, m| async move {
            m.tdh_mem_track(&cx, tdr).await.unwrap();
        },
        move |cx, m| async move { raw(&m.tdh_mem_track(&cx, tdr).await) },
    );
    assert_eq!(r, BUSY_TD_EPOCH);
    assert_eq!(td_epoch(&b.m, tdr), e0 + 1);
}

/// Lock row: TD epoch lock exclusive; while TDH.VP.ENTER holds it shared (counting the vCPU
/// into the epoch), TRACK is BUSY|TD_EPOCH.
#[test]
fn track_busy_td_epoch_while_vp_enter_holds_it() {
    let mut b = bench();
    let td = runnable_td(&mut b, 1);
    let (tdr, v0) = (td.tdr, td.vcpus[0].tdvpr);
    let r = race(
        &mut b,
        "TDH.VP.ENTER:epoch",
        move |cx, m| async move {
            m.tdh_vp_enter(&cx, Lp(0), v0, 0).await.unwrap();
            m.td_exit(v0, 0);
        },
        move |cx, m| async move { raw(&m.tdh_mem_track(&cx, tdr).await) },
    );
    assert_eq!(r, BUSY_TD_EPOCH);
}

// =====================================================================================
// TDH.MEM.PAGE.REMOVE (leaf 29)
// =====================================================================================

/// Success in a RUNNABLE TD after BLOCK + TRACK: returns the page, the entry goes FREE,
/// chldcnt -= 1, PAMT = PT_NDA, the ledger no longer counts the page as module-held, and the
/// host can write it back, clear and free it.
#[test]
fn page_remove_after_block_and_track() {
    let mut b = bench();
    let td = runnable_td(&mut b, 1);
    let (tdr, hkid) = (td.tdr, td.hkid);
    exec(&mut b, move |cx, m| async move {
        let p = aug(&cx, &m, tdr, gpa(0x10)).await.unwrap();
        m.tdh_mem_range_block(&cx, tdr, gpa(0x10), PgLevel::L4K)
            .await
            .unwrap();
        m.tdh_mem_track(&cx, tdr).await.unwrap();
        let cnt = chldcnt(&m, tdr);
        let r = m
            .tdh_mem_page_remove(&cx, tdr, gpa(0x10), PgLevel::L4K)
            .await
            .unwrap();
        assert_eq!(r, p);
        assert_eq!(state_at(&m, tdr, PgLevel::L4K, gpa(0x10)), SeptState::Free);
        assert_eq!(chldcnt(&m, tdr), cnt - 1);
        assert_eq!(pt(&m, p), PageType::Nda);
        assert_eq!(held_as(&m, p), None);
        m.tdh_phymem_page_wbinvd(&cx, p, CacheKey::Td(hkid))
            .await
            .unwrap();
        let mut h = m.host().borrow_mut();
        h.ledger.clear(p).unwrap();
        h.ledger.free(p).unwrap();
        assert!(h.refused.is_empty(), "{:?}", h.refused);
        drop(h);
        assert!(no_locks_held(&m));
    });
}

/// Success, 2M: BLOCK + TRACK + REMOVE of a 2M leaf: chldcnt -= 512, all 512 pages PT_NDA and
/// handed back.
#[test]
fn page_remove_2m_leaf() {
    let mut b = bench();
    let td = runnable_td(&mut b, 1);
    let tdr = td.tdr;
    exec(&mut b, move |cx, m| async move {
        let p = aug_2m(&cx, &m, tdr, gpa_2m(1)).await.unwrap();
        m.tdh_mem_range_block(&cx, tdr, gpa_2m(1), PgLevel::L2M)
            .await
            .unwrap();
        m.tdh_mem_track(&cx, tdr).await.unwrap();
        let cnt = chldcnt(&m, tdr);
        let r = m
            .tdh_mem_page_remove(&cx, tdr, gpa_2m(1), PgLevel::L2M)
            .await
            .unwrap();
        assert_eq!(r, p);
        assert_eq!(chldcnt(&m, tdr), cnt - 512);
        assert_eq!(state_at(&m, tdr, PgLevel::L2M, gpa_2m(1)), SeptState::Free);
        for i in 0..512 {
            assert_eq!(pt(&m, p.add(i)), PageType::Nda);
            assert_eq!(held_as(&m, p.add(i)), None);
        }
        assert!(no_locks_held(&m));
    });
}

/// Tracking applies only in RUNNABLE (op_state.tlb_tracking_required): before MR.FINALIZE a
/// MAPPED (PAGE.ADD) or PENDING (AUG) page is removed without BLOCK or TRACK.
#[test]
fn page_remove_before_finalize_needs_no_block_or_track() {
    let mut b = bench();
    let td = initialized_td(&mut b, 1);
    let tdr = td.tdr;
    exec(&mut b, move |cx, m| async move {
        let added = page_add(&cx, &m, tdr, gpa(0x10)).await.unwrap();
        let augd = aug(&cx, &m, tdr, gpa(0x11)).await.unwrap();
        let cnt = chldcnt(&m, tdr);
        for (g, p) in [(gpa(0x10), added), (gpa(0x11), augd)] {
            let r = m
                .tdh_mem_page_remove(&cx, tdr, g, PgLevel::L4K)
                .await
                .unwrap();
            assert_eq!(r, p);
            assert_eq!(state_at(&m, tdr, PgLevel::L4K, g), SeptState::Free);
            assert_eq!((pt(&m, p), held_as(&m, p)), (PageType::Nda, None));
        }
        assert_eq!(chldcnt(&m, tdr), cnt - 2);
        assert!(no_locks_held(&m));
    });
}

/// Prologue: TDR operand checks (RDX) and TD-state gate, in the handler's order.
#[test]
fn page_remove_prologue() {
    assert_prologue(
        |cx, m, tdr| {
            Box::pin(async move {
                raw(&m
                    .tdh_mem_page_remove(&cx, tdr, gpa(0x10), PgLevel::L4K)
                    .await)
            })
        },
        2,
    );
}

/// `verify_page_info_input(PT, PDPT)` / GPA validity: a 512G level, a GPA not aligned to the
/// level, the shared bit, or a bit above GPAW: OPERAND_INVALID|RCX.
#[test]
fn page_remove_bad_operand_is_operand_invalid() {
    let mut b = bench();
    let td = runnable_td(&mut b, 1);
    let tdr = td.tdr;
    exec(&mut b, move |cx, m| async move {
        aug(&cx, &m, tdr, gpa(0x10)).await.unwrap();
        for (g, level) in [
            (Gpa::new(0), PgLevel::L512G),
            (gpa(0x10), PgLevel::L2M),
            (gpa(0x10).to_shared(), PgLevel::L4K),
            (Gpa::new(gpa(0x10).raw() | 1 << 48), PgLevel::L4K),
        ] {
            let e = m.tdh_mem_page_remove(&cx, tdr, g, level).await.unwrap_err();
            check(&e, OPERAND_INVALID_RCX, None);
        }
        assert!(no_locks_held(&m));
    });
}

/// Walk: EPT_WALK_FAILED|RCX with the entry reached: a 2M leaf when 4K was requested; the FREE
/// 2M entry above a missing 4K table.
#[test]
fn page_remove_walk_failed_reports_entry_reached() {
    let mut b = bench();
    let td = runnable_td(&mut b, 1);
    let tdr = td.tdr;
    exec(&mut b, move |cx, m| async move {
        aug_2m(&cx, &m, tdr, gpa_2m(1)).await.unwrap();
        for (g, state) in [
            (gpa_2m(1), SeptState::Pending),
            (gpa_2m(2), SeptState::Free),
        ] {
            let e = m
                .tdh_mem_page_remove(&cx, tdr, g, PgLevel::L4K)
                .await
                .unwrap_err();
            check(&e, EPT_WALK_FAILED_RCX, sept_details(PgLevel::L2M, state));
        }
        assert_eq!(
            state_at(&m, tdr, PgLevel::L2M, gpa_2m(1)),
            SeptState::Pending
        );
        assert!(no_locks_held(&m));
    });
}

/// Entry state: the entry must be a leaf in REMOVE's set; a FREE 4K entry or a non-leaf
/// (NL_MAPPED 2M) gives EPT_ENTRY_STATE_INCORRECT|RCX with details at the input level.
#[test]
fn page_remove_free_or_non_leaf_is_state_incorrect() {
    let mut b = bench();
    let td = runnable_td(&mut b, 1);
    let tdr = td.tdr;
    exec(&mut b, move |cx, m| async move {
        link_path(&cx, &m, tdr, gpa(0x10)).await;
        for (g, level, state) in [
            (gpa(0x10), PgLevel::L4K, SeptState::Free),
            (Gpa::new(0), PgLevel::L2M, SeptState::NlMapped),
        ] {
            let e = m.tdh_mem_page_remove(&cx, tdr, g, level).await.unwrap_err();
            check(
                &e,
                EPT_ENTRY_STATE_INCORRECT_RCX,
                sept_details(level, state),
            );
        }
        assert!(no_locks_held(&m));
    });
}

/// Tracking rule, first half: in RUNNABLE the leaf must be BLOCKED/PENDING_BLOCKED; a MAPPED
/// or PENDING page gives GPA_RANGE_NOT_BLOCKED|RCX with details and stays mapped.
#[test]
fn page_remove_unblocked_in_runnable_is_not_blocked() {
    let mut b = bench();
    let td = initialized_td(&mut b, 1);
    let tdr = td.tdr;
    exec(&mut b, move |cx, m| async move {
        let mapped = page_add(&cx, &m, tdr, gpa(0x10)).await.unwrap();
        m.tdh_mr_finalize(&cx, tdr).await.unwrap();
        let pending = aug(&cx, &m, tdr, gpa(0x11)).await.unwrap();
        let cnt = chldcnt(&m, tdr);
        for (g, p, state) in [
            (gpa(0x10), mapped, SeptState::Mapped),
            (gpa(0x11), pending, SeptState::Pending),
        ] {
            let e = m
                .tdh_mem_page_remove(&cx, tdr, g, PgLevel::L4K)
                .await
                .unwrap_err();
            check(
                &e,
                GPA_RANGE_NOT_BLOCKED_RCX,
                sept_details(PgLevel::L4K, state),
            );
            assert_eq!(state_at(&m, tdr, PgLevel::L4K, g), state);
            assert_eq!(pt(&m, p), PageType::Reg);
        }
        assert_eq!(chldcnt(&m, tdr), cnt);
        assert!(no_locks_held(&m));
    });
}

/// Tracking rule, second half: a page blocked in the current epoch (no TRACK yet) is not
/// tracked: TLB_TRACKING_NOT_DONE|RCX, no S-EPT details.
#[test]
fn page_remove_before_track_is_tracking_not_done() {
    let mut b = bench();
    let td = runnable_td(&mut b, 1);
    let tdr = td.tdr;
    exec(&mut b, move |cx, m| async move {
        let p = aug(&cx, &m, tdr, gpa(0x10)).await.unwrap();
        m.tdh_mem_range_block(&cx, tdr, gpa(0x10), PgLevel::L4K)
            .await
            .unwrap();
        let e = m
            .tdh_mem_page_remove(&cx, tdr, gpa(0x10), PgLevel::L4K)
            .await
            .unwrap_err();
        check(&e, TLB_TRACKING_NOT_DONE_RCX, None);
        assert_eq!(
            state_at(&m, tdr, PgLevel::L4K, gpa(0x10)),
            SeptState::PendingBlocked
        );
        assert_eq!(pt(&m, p), PageType::Reg);
        assert!(no_locks_held(&m));
    });
}

/// `is_tlb_tracked`: after one TRACK the page is tracked only once every vCPU that entered in
/// the blocking epoch has exited; a vCPU entering after the TRACK does not hold it up.
#[test]
fn page_remove_waits_for_vcpus_of_the_blocking_epoch() {
    let mut b = bench();
    let td = runnable_td(&mut b, 2);
    let (tdr, v0, v1) = (td.tdr, td.vcpus[0].tdvpr, td.vcpus[1].tdvpr);
    exec(&mut b, move |cx, m| async move {
        aug(&cx, &m, tdr, gpa(0x10)).await.unwrap();
        aug(&cx, &m, tdr, gpa(0x11)).await.unwrap();
        // v0 enters in the blocking epoch.
        m.tdh_vp_enter(&cx, Lp(0), v0, 0).await.unwrap();
        m.tdh_mem_range_block(&cx, tdr, gpa(0x10), PgLevel::L4K)
            .await
            .unwrap();
        m.tdh_mem_track(&cx, tdr).await.unwrap();
        let e = m
            .tdh_mem_page_remove(&cx, tdr, gpa(0x10), PgLevel::L4K)
            .await
            .unwrap_err();
        check(&e, TLB_TRACKING_NOT_DONE_RCX, None);
        m.td_exit(v0, 0);
        m.tdh_mem_page_remove(&cx, tdr, gpa(0x10), PgLevel::L4K)
            .await
            .unwrap();
        // Block 0x11, TRACK, then v1 enters in the new epoch: tracked all the same.
        m.tdh_mem_range_block(&cx, tdr, gpa(0x11), PgLevel::L4K)
            .await
            .unwrap();
        m.tdh_mem_track(&cx, tdr).await.unwrap();
        m.tdh_vp_enter(&cx, Lp(1), v1, 0).await.unwrap();
        m.tdh_mem_page_remove(&cx, tdr, gpa(0x11), PgLevel::L4K)
            .await
            .unwrap();
        m.td_exit(v1, 0);
        assert!(no_locks_held(&m));
    });
}

/// Lock row: TDR shared; PAGE.ADD holds it exclusively, so REMOVE is BUSY|RDX.
#[test]
fn page_remove_busy_rdx_while_page_add_holds_tdr() {
    let mut b = bench();
    let td = initialized_td(&mut b, 1);
    let tdr = td.tdr;
    exec(&mut b, move |cx, m| async move {
        aug(&cx, &m, tdr, gpa(0x11)).await.unwrap();
    });
    let r = against_page_add(&mut b, tdr, move |cx, m| async move {
        raw(&m
            .tdh_mem_page_remove(&cx, tdr, gpa(0x11), PgLevel::L4K)
            .await)
    });
    assert_eq!(r, BUSY_RDX);
    assert_eq!(
        state_at(&b.m, tdr, PgLevel::L4K, gpa(0x11)),
        SeptState::Pending
    );
}

/// Lock row: SEPT tree shared; while BLOCK holds it exclusively, REMOVE (of another, blocked
/// and tracked page) is BUSY|SEPT_TREE.
#[test]
fn page_remove_busy_sept_tree_while_block_holds_it() {
    let mut b = bench();
    let td = runnable_td(&mut b, 1);
    let tdr = td.tdr;
    exec(&mut b, move |cx, m| async move {
        aug(&cx, &m, tdr, gpa(0x10)).await.unwrap();
        aug(&cx, &m, tdr, gpa(0x11)).await.unwrap();
        m.tdh_mem_range_block(&cx, tdr, gpa(0x11), PgLevel::L4K)
            .await
            .unwrap();
        m.tdh_mem_track(&cx, tdr).await.unwrap();
    });
    let r = race(
        &mut b,
        window_name(Leaf::MemRangeBlock),
        move |cx, m| async move {
            m.tdh_mem_range_block(&cx, tdr, gpa(0x10), PgLevel::L4K)
                .await
                .unwrap();
        },
        move |cx, m| async move {
            raw(&m
                .tdh_mem_page_remove(&cx, tdr, gpa(0x11), PgLevel::L4K)
                .await)
        },
    );
    assert_eq!(r, BUSY_SEPT_TREE);
}

/// Lock row: the entry's host-side lock; two REMOVEs of the same GPA: the loser is BUSY|RCX
/// plus the walked entry's details, and the page is removed once.
#[test]
fn page_remove_busy_rcx_on_the_same_gpa() {
    let mut b = bench();
    let td = initialized_td(&mut b, 1);
    let tdr = td.tdr;
    let cnt = exec(&mut b, move |cx, m| async move {
        aug(&cx, &m, tdr, gpa(0x10)).await.unwrap();
        chldcnt(&m, tdr)
    });
    let r = race(
        &mut b,
        window_name(Leaf::MemPageRemove),
        move |cx, m| async move {
            m.tdh_mem_page_remove(&cx, tdr, gpa(0x10), PgLevel::L4K)
                .await
                .unwrap();
        },
        move |cx, m| async move {
            m.tdh_mem_page_remove(&cx, tdr, gpa(0x10), PgLevel::L4K)
                .await
        },
    );
    check(
        &r.unwrap_err(),
        BUSY_RCX,
        sept_details(PgLevel::L4K, SeptState::Pending),
    );
    assert_eq!(chldcnt(&b.m, tdr), cnt - 1);
}

/// Lock row: the entry's host-side lock; REMOVE of a GPA whose AUG is in flight (holding the
/// entry) is BUSY|RCX.
#[test]
fn page_remove_busy_rcx_while_aug_holds_the_entry() {
    let mut b = bench();
    let td = runnable_td(&mut b, 1);
    let tdr = td.tdr;
    let p = exec(&mut b, move |cx, m| async move {
        link_path(&cx, &m, tdr, gpa(0x10)).await;
        alloc_guest(&m, gpa(0x10))
    });
    let r = race(
        &mut b,
        window_name(Leaf::MemPageAug),
        move |cx, m| async move {
            m.tdh_mem_page_aug(&cx, tdr, gpa(0x10), PgLevel::L4K, p)
                .await
                .unwrap();
        },
        move |cx, m| async move {
            raw(&m
                .tdh_mem_page_remove(&cx, tdr, gpa(0x10), PgLevel::L4K)
                .await)
        },
    );
    assert_eq!(r, BUSY_RCX);
    assert_eq!(
        state_at(&b.m, tdr, PgLevel::L4K, gpa(0x10)),
        SeptState::Pending
    );
}

// =====================================================================================
// TDH.MEM.SEPT.REMOVE (leaf 30)
// =====================================================================================

/// Success before MR.FINALIZE (no tracking): unlinking the 4K, 1G and root-level tables
/// bottom-up returns each page, frees the parent entry, chldcnt -= 1 each, PAMT = PT_NDA and
/// the ledger no longer counts the page as module-held.
#[test]
fn sept_remove_unlinks_empty_tables() {
    let mut b = bench();
    let td = initialized_td(&mut b, 1);
    let tdr = td.tdr;
    exec(&mut b, move |cx, m| async move {
        let tables = link_path(&cx, &m, tdr, gpa(0x10)).await;
        let cnt = chldcnt(&m, tdr);
        for (i, level) in [PgLevel::L2M, PgLevel::L1G, PgLevel::L512G]
            .into_iter()
            .enumerate()
        {
            let p = m
                .tdh_mem_sept_remove(&cx, tdr, Gpa::new(0), level)
                .await
                .unwrap();
            assert_eq!(p, tables[2 - i]);
            assert_eq!(state_at(&m, tdr, level, Gpa::new(0)), SeptState::Free);
            assert_eq!(chldcnt(&m, tdr), cnt - 1 - i as u64);
            assert_eq!((pt(&m, p), held_as(&m, p)), (PageType::Nda, None));
        }
        assert!(no_locks_held(&m));
    });
}

/// Success in RUNNABLE: BLOCK of the non-leaf records bepoch on the child S-EPT page; after
/// TRACK, SEPT.REMOVE of the NL_BLOCKED entry succeeds.
#[test]
fn sept_remove_after_block_and_track() {
    let mut b = bench();
    let td = runnable_td(&mut b, 1);
    let tdr = td.tdr;
    exec(&mut b, move |cx, m| async move {
        let table = link_path(&cx, &m, tdr, gpa_2m(1)).await.pop().unwrap();
        m.tdh_mem_range_block(&cx, tdr, gpa_2m(1), PgLevel::L2M)
            .await
            .unwrap();
        assert_eq!(bepoch(&m, table), td_epoch(&m, tdr));
        m.tdh_mem_track(&cx, tdr).await.unwrap();
        let cnt = chldcnt(&m, tdr);
        let p = m
            .tdh_mem_sept_remove(&cx, tdr, gpa_2m(1), PgLevel::L2M)
            .await
            .unwrap();
        assert_eq!(p, table);
        assert_eq!(state_at(&m, tdr, PgLevel::L2M, gpa_2m(1)), SeptState::Free);
        assert_eq!(chldcnt(&m, tdr), cnt - 1);
        assert_eq!((pt(&m, p), held_as(&m, p)), (PageType::Nda, None));
        assert!(no_locks_held(&m));
    });
}

/// Prologue: TDR operand checks (RDX) and TD-state gate, in the handler's order.
#[test]
fn sept_remove_prologue() {
    assert_prologue(
        |cx, m, tdr| {
            Box::pin(async move {
                raw(&m
                    .tdh_mem_sept_remove(&cx, tdr, Gpa::new(0), PgLevel::L2M)
                    .await)
            })
        },
        2,
    );
}

/// `verify_page_info_input(PD, pwl)` / GPA validity: a 4K level, a GPA not aligned to the
/// level, the shared bit, or a bit above GPAW: OPERAND_INVALID|RCX.
#[test]
fn sept_remove_bad_operand_is_operand_invalid() {
    let mut b = bench();
    let td = initialized_td(&mut b, 1);
    let tdr = td.tdr;
    exec(&mut b, move |cx, m| async move {
        link_path(&cx, &m, tdr, gpa_2m(1)).await;
        for (g, level) in [
            (gpa_2m(1), PgLevel::L4K),
            (gpa_2m(1), PgLevel::L1G),
            (gpa_2m(1).to_shared(), PgLevel::L2M),
            (Gpa::new(gpa_2m(1).raw() | 1 << 48), PgLevel::L2M),
        ] {
            let e = m.tdh_mem_sept_remove(&cx, tdr, g, level).await.unwrap_err();
            check(&e, OPERAND_INVALID_RCX, None);
        }
        assert_eq!(
            state_at(&m, tdr, PgLevel::L2M, gpa_2m(1)),
            SeptState::NlMapped
        );
        assert!(no_locks_held(&m));
    });
}

/// Walk: EPT_WALK_FAILED|RCX with the entry reached: the FREE PML4 entry with no tables; the
/// FREE 1G entry when only the root's child exists.
#[test]
fn sept_remove_walk_failed_reports_entry_reached() {
    let mut b = bench();
    let td = initialized_td(&mut b, 1);
    let tdr = td.tdr;
    exec(&mut b, move |cx, m| async move {
        let e = m
            .tdh_mem_sept_remove(&cx, tdr, gpa_2m(1), PgLevel::L2M)
            .await
            .unwrap_err();
        check(
            &e,
            EPT_WALK_FAILED_RCX,
            sept_details(PgLevel::L512G, SeptState::Free),
        );
        link_to(&cx, &m, tdr, gpa_2m(1), PgLevel::L512G).await;
        let e = m
            .tdh_mem_sept_remove(&cx, tdr, gpa_2m(1), PgLevel::L2M)
            .await
            .unwrap_err();
        check(
            &e,
            EPT_WALK_FAILED_RCX,
            sept_details(PgLevel::L1G, SeptState::Free),
        );
        assert!(no_locks_held(&m));
    });
}

/// Entry state: only NL_MAPPED/NL_BLOCKED; a FREE entry or a 2M leaf gives
/// EPT_ENTRY_STATE_INCORRECT|RCX with details.
#[test]
fn sept_remove_free_or_leaf_is_state_incorrect() {
    let mut b = bench();
    let td = initialized_td(&mut b, 1);
    let tdr = td.tdr;
    exec(&mut b, move |cx, m| async move {
        aug_2m(&cx, &m, tdr, gpa_2m(1)).await.unwrap();
        for (g, state) in [
            (gpa_2m(1), SeptState::Pending),
            (gpa_2m(2), SeptState::Free),
        ] {
            let e = m
                .tdh_mem_sept_remove(&cx, tdr, g, PgLevel::L2M)
                .await
                .unwrap_err();
            check(
                &e,
                EPT_ENTRY_STATE_INCORRECT_RCX,
                sept_details(PgLevel::L2M, state),
            );
        }
        assert!(no_locks_held(&m));
    });
}

/// Free check: the child table must hold 512 FREE entries; a table with a page (before
/// finalize, and in RUNNABLE once blocked and tracked) or a 1G table with a linked 2M table
/// gives EPT_PAGE_NOT_FREE|RCX with the parent's details.
#[test]
fn sept_remove_non_empty_table_is_page_not_free() {
    let mut b = bench();
    let td = initialized_td(&mut b, 1);
    let tdr = td.tdr;
    exec(&mut b, move |cx, m| async move {
        aug(&cx, &m, tdr, gpa_2m(1)).await.unwrap();
        let cnt = chldcnt(&m, tdr);
        for (level, state) in [
            (PgLevel::L2M, SeptState::NlMapped),
            (PgLevel::L1G, SeptState::NlMapped),
        ] {
            let e = m
                .tdh_mem_sept_remove(&cx, tdr, gpa_2m(1).gfn().align_down(level).gpa(), level)
                .await
                .unwrap_err();
            check(&e, EPT_PAGE_NOT_FREE_RCX, sept_details(level, state));
        }
        m.tdh_mr_finalize(&cx, tdr).await.unwrap();
        m.tdh_mem_range_block(&cx, tdr, gpa_2m(1), PgLevel::L2M)
            .await
            .unwrap();
        m.tdh_mem_track(&cx, tdr).await.unwrap();
        let e = m
            .tdh_mem_sept_remove(&cx, tdr, gpa_2m(1), PgLevel::L2M)
            .await
            .unwrap_err();
        check(
            &e,
            EPT_PAGE_NOT_FREE_RCX,
            sept_details(PgLevel::L2M, SeptState::NlBlocked),
        );
        assert_eq!(chldcnt(&m, tdr), cnt);
        assert!(no_locks_held(&m));
    });
}

/// Tracking rule, first half: in RUNNABLE the entry must be NL_BLOCKED; an NL_MAPPED (even
/// non-empty) table gives GPA_RANGE_NOT_BLOCKED|RCX with details, checked before emptiness.
#[test]
fn sept_remove_unblocked_in_runnable_is_not_blocked() {
    let mut b = bench();
    let td = runnable_td(&mut b, 1);
    let tdr = td.tdr;
    exec(&mut b, move |cx, m| async move {
        link_path(&cx, &m, tdr, gpa_2m(1)).await;
        aug(&cx, &m, tdr, gpa_2m(2)).await.unwrap();
        for g in [gpa_2m(1), gpa_2m(2)] {
            let e = m
                .tdh_mem_sept_remove(&cx, tdr, g, PgLevel::L2M)
                .await
                .unwrap_err();
            check(
                &e,
                GPA_RANGE_NOT_BLOCKED_RCX,
                sept_details(PgLevel::L2M, SeptState::NlMapped),
            );
        }
        assert!(no_locks_held(&m));
    });
}

/// Tracking rule, second half: an NL_BLOCKED entry blocked in the current epoch is not
/// tracked: TLB_TRACKING_NOT_DONE|RCX, no S-EPT details.
#[test]
fn sept_remove_before_track_is_tracking_not_done() {
    let mut b = bench();
    let td = runnable_td(&mut b, 1);
    let tdr = td.tdr;
    exec(&mut b, move |cx, m| async move {
        let table = link_path(&cx, &m, tdr, gpa_2m(1)).await.pop().unwrap();
        m.tdh_mem_range_block(&cx, tdr, gpa_2m(1), PgLevel::L2M)
            .await
            .unwrap();
        let e = m
            .tdh_mem_sept_remove(&cx, tdr, gpa_2m(1), PgLevel::L2M)
            .await
            .unwrap_err();
        check(&e, TLB_TRACKING_NOT_DONE_RCX, None);
        assert_eq!(pt(&m, table), PageType::Ept);
        assert!(no_locks_held(&m));
    });
}

/// Lock row: TDR shared; PAGE.ADD holds it exclusively, so SEPT.REMOVE is BUSY|RDX.
#[test]
fn sept_remove_busy_rdx_while_page_add_holds_tdr() {
    let mut b = bench();
    let td = initialized_td(&mut b, 1);
    let tdr = td.tdr;
    exec(&mut b, move |cx, m| async move {
        link_path(&cx, &m, tdr, gpa_2m(1)).await;
    });
    let r = against_page_add(&mut b, tdr, move |cx, m| async move {
        raw(&m
            .tdh_mem_sept_remove(&cx, tdr, gpa_2m(1), PgLevel::L2M)
            .await)
    });
    assert_eq!(r, BUSY_RDX);
    assert_eq!(
        state_at(&b.m, tdr, PgLevel::L2M, gpa_2m(1)),
        SeptState::NlMapped
    );
}

/// Lock row: SEPT tree exclusive; while AUG holds it shared, SEPT.REMOVE is BUSY|SEPT_TREE.
#[test]
fn sept_remove_busy_sept_tree_while_aug_holds_it() {
    let mut b = bench();
    let td = initialized_td(&mut b, 1);
    let tdr = td.tdr;
    let p = exec(&mut b, move |cx, m| async move {
        link_path(&cx, &m, tdr, gpa(0x10)).await;
        link_path(&cx, &m, tdr, gpa_2m(1)).await;
        alloc_guest(&m, gpa(0x10))
    });
    let r = race(
        &mut b,
        window_name(Leaf::MemPageAug),
        move |cx, m| async move {
            m.tdh_mem_page_aug(&cx, tdr, gpa(0x10), PgLevel::L4K, p)
                .await
                .unwrap();
        },
        move |cx, m| async move {
            raw(&m
                .tdh_mem_sept_remove(&cx, tdr, gpa_2m(1), PgLevel::L2M)
                .await)
        },
    );
    assert_eq!(r, BUSY_SEPT_TREE);
    assert_eq!(
        state_at(&b.m, tdr, PgLevel::L2M, gpa_2m(1)),
        SeptState::NlMapped
    );
}

// =====================================================================================
// TDH.MEM.RANGE.UNBLOCK (leaf 39)
// =====================================================================================

/// Success in RUNNABLE after TRACK: BLOCKED -> MAPPED, PENDING_BLOCKED -> PENDING (4K and 2M),
/// NL_BLOCKED -> NL_MAPPED; the mapped page is unchanged and PAMT.bepoch is left as it was.
#[test]
fn range_unblock_restores_after_track() {
    let mut b = bench();
    let td = initialized_td(&mut b, 1);
    let tdr = td.tdr;
    exec(&mut b, move |cx, m| async move {
        let mapped = page_add(&cx, &m, tdr, gpa(0x10)).await.unwrap();
        m.tdh_mr_finalize(&cx, tdr).await.unwrap();
        let pending = aug(&cx, &m, tdr, gpa(0x11)).await.unwrap();
        let big = aug_2m(&cx, &m, tdr, gpa_2m(1)).await.unwrap();
        let table = link_path(&cx, &m, tdr, gpa_2m(2)).await.pop().unwrap();
        let cases = [
            (gpa(0x10), PgLevel::L4K, mapped, SeptState::Mapped),
            (gpa(0x11), PgLevel::L4K, pending, SeptState::Pending),
            (gpa_2m(1), PgLevel::L2M, big, SeptState::Pending),
            (gpa_2m(2), PgLevel::L2M, table, SeptState::NlMapped),
        ];
        for (g, level, _, _) in cases {
            m.tdh_mem_range_block(&cx, tdr, g, level).await.unwrap();
        }
        let blocked_in = td_epoch(&m, tdr);
        m.tdh_mem_track(&cx, tdr).await.unwrap();
        for (g, level, page, after) in cases {
            m.tdh_mem_range_unblock(&cx, tdr, g, level).await.unwrap();
            let e = m.state().tds[&tdr].sept.get(level, g.gfn()).unwrap();
            assert_eq!((e.state, e.pfn), (after, page));
            assert_eq!(bepoch(&m, page), blocked_in);
        }
        assert!(no_locks_held(&m));
    });
}

/// Tracking applies only in RUNNABLE: before MR.FINALIZE, UNBLOCK right after BLOCK succeeds.
#[test]
fn range_unblock_before_finalize_needs_no_track() {
    let mut b = bench();
    let td = initialized_td(&mut b, 1);
    let tdr = td.tdr;
    exec(&mut b, move |cx, m| async move {
        page_add(&cx, &m, tdr, gpa(0x10)).await.unwrap();
        m.tdh_mem_range_block(&cx, tdr, gpa(0x10), PgLevel::L4K)
            .await
            .unwrap();
        m.tdh_mem_range_unblock(&cx, tdr, gpa(0x10), PgLevel::L4K)
            .await
            .unwrap();
        assert_eq!(
            state_at(&m, tdr, PgLevel::L4K, gpa(0x10)),
            SeptState::Mapped
        );
        assert!(no_locks_held(&m));
    });
}

/// Prologue: TDR operand checks (RDX) and TD-state gate, in the handler's order.
#[test]
fn range_unblock_prologue() {
    assert_prologue(
        |cx, m, tdr| {
            Box::pin(async move {
                raw(&m
                    .tdh_mem_range_unblock(&cx, tdr, gpa(0x10), PgLevel::L4K)
                    .await)
            })
        },
        2,
    );
}

/// `verify_page_info_input(PT, pwl)` / GPA validity: a GPA not aligned to the level, the
/// shared bit, or a bit above GPAW: OPERAND_INVALID|RCX.
#[test]
fn range_unblock_bad_operand_is_operand_invalid() {
    let mut b = bench();
    let td = runnable_td(&mut b, 1);
    let tdr = td.tdr;
    exec(&mut b, move |cx, m| async move {
        aug(&cx, &m, tdr, gpa(0x10)).await.unwrap();
        m.tdh_mem_range_block(&cx, tdr, gpa(0x10), PgLevel::L4K)
            .await
            .unwrap();
        for (g, level) in [
            (gpa(0x10), PgLevel::L2M),
            (gpa(0x10).to_shared(), PgLevel::L4K),
            (Gpa::new(gpa(0x10).raw() | 1 << 48), PgLevel::L4K),
        ] {
            let e = m
                .tdh_mem_range_unblock(&cx, tdr, g, level)
                .await
                .unwrap_err();
            check(&e, OPERAND_INVALID_RCX, None);
        }
        assert!(no_locks_held(&m));
    });
}

/// Walk: EPT_WALK_FAILED|RCX with the entry reached: a blocked 2M leaf when 4K is asked for;
/// the FREE 2M entry above a missing 4K table.
#[test]
fn range_unblock_walk_failed_reports_entry_reached() {
    let mut b = bench();
    let td = runnable_td(&mut b, 1);
    let tdr = td.tdr;
    exec(&mut b, move |cx, m| async move {
        aug_2m(&cx, &m, tdr, gpa_2m(1)).await.unwrap();
        m.tdh_mem_range_block(&cx, tdr, gpa_2m(1), PgLevel::L2M)
            .await
            .unwrap();
        m.tdh_mem_track(&cx, tdr).await.unwrap();
        for (g, state) in [
            (gpa_2m(1), SeptState::PendingBlocked),
            (gpa_2m(2), SeptState::Free),
        ] {
            let e = m
                .tdh_mem_range_unblock(&cx, tdr, g, PgLevel::L4K)
                .await
                .unwrap_err();
            check(&e, EPT_WALK_FAILED_RCX, sept_details(PgLevel::L2M, state));
        }
        assert!(no_locks_held(&m));
    });
}

/// Entry state: only NL_BLOCKED, BLOCKED, PENDING_BLOCKED; MAPPED, PENDING, NL_MAPPED and FREE
/// give EPT_ENTRY_STATE_INCORRECT|RCX with details (never GPA_RANGE_NOT_BLOCKED).
#[test]
fn range_unblock_unblocked_entry_is_state_incorrect() {
    let mut b = bench();
    let td = initialized_td(&mut b, 1);
    let tdr = td.tdr;
    exec(&mut b, move |cx, m| async move {
        page_add(&cx, &m, tdr, gpa(0x10)).await.unwrap();
        m.tdh_mr_finalize(&cx, tdr).await.unwrap();
        aug(&cx, &m, tdr, gpa(0x11)).await.unwrap();
        for (g, level, state) in [
            (gpa(0x10), PgLevel::L4K, SeptState::Mapped),
            (gpa(0x11), PgLevel::L4K, SeptState::Pending),
            (gpa(0x12), PgLevel::L4K, SeptState::Free),
            (Gpa::new(0), PgLevel::L2M, SeptState::NlMapped),
        ] {
            let e = m
                .tdh_mem_range_unblock(&cx, tdr, g, level)
                .await
                .unwrap_err();
            check(
                &e,
                EPT_ENTRY_STATE_INCORRECT_RCX,
                sept_details(level, state),
            );
        }
        assert!(no_locks_held(&m));
    });
}

/// Tracking: in RUNNABLE the block epoch must be tracked; UNBLOCK right after BLOCK is
/// TLB_TRACKING_NOT_DONE|RCX (no details) and the entry stays blocked.
#[test]
fn range_unblock_before_track_is_tracking_not_done() {
    let mut b = bench();
    let td = runnable_td(&mut b, 1);
    let tdr = td.tdr;
    exec(&mut b, move |cx, m| async move {
        aug(&cx, &m, tdr, gpa(0x10)).await.unwrap();
        let table = link_path(&cx, &m, tdr, gpa_2m(1)).await.pop().unwrap();
        m.tdh_mem_range_block(&cx, tdr, gpa(0x10), PgLevel::L4K)
            .await
            .unwrap();
        m.tdh_mem_range_block(&cx, tdr, gpa_2m(1), PgLevel::L2M)
            .await
            .unwrap();
        for (g, level, state) in [
            (gpa(0x10), PgLevel::L4K, SeptState::PendingBlocked),
            (gpa_2m(1), PgLevel::L2M, SeptState::NlBlocked),
        ] {
            let e = m
                .tdh_mem_range_unblock(&cx, tdr, g, level)
                .await
                .unwrap_err();
            check(&e, TLB_TRACKING_NOT_DONE_RCX, None);
            assert_eq!(state_at(&m, tdr, level, g), state);
        }
        assert_eq!(pt(&m, table), PageType::Ept);
        assert!(no_locks_held(&m));
    });
}

/// Lock row: TDR shared; PAGE.ADD holds it exclusively, so UNBLOCK is BUSY|RDX.
#[test]
fn range_unblock_busy_rdx_while_page_add_holds_tdr() {
    let mut b = bench();
    let td = initialized_td(&mut b, 1);
    let tdr = td.tdr;
    exec(&mut b, move |cx, m| async move {
        aug(&cx, &m, tdr, gpa(0x11)).await.unwrap();
        m.tdh_mem_range_block(&cx, tdr, gpa(0x11), PgLevel::L4K)
            .await
            .unwrap();
    });
    let r = against_page_add(&mut b, tdr, move |cx, m| async move {
        raw(&m
            .tdh_mem_range_unblock(&cx, tdr, gpa(0x11), PgLevel::L4K)
            .await)
    });
    assert_eq!(r, BUSY_RDX);
    assert_eq!(
        state_at(&b.m, tdr, PgLevel::L4K, gpa(0x11)),
        SeptState::PendingBlocked
    );
}

/// Lock row: SEPT tree exclusive; while PAGE.REMOVE holds it shared, UNBLOCK is
/// BUSY|SEPT_TREE.
#[test]
fn range_unblock_busy_sept_tree_while_remove_holds_it() {
    let mut b = bench();
    let td = initialized_td(&mut b, 1);
    let tdr = td.tdr;
    exec(&mut b, move |cx, m| async move {
        aug(&cx, &m, tdr, gpa(0x10)).await.unwrap();
        aug(&cx, &m, tdr, gpa(0x11)).await.unwrap();
        m.tdh_mem_range_block(&cx, tdr, gpa(0x11), PgLevel::L4K)
            .await
            .unwrap();
    });
    let r = race(
        &mut b,
        window_name(Leaf::MemPageRemove),
        move |cx, m| async move {
            m.tdh_mem_page_remove(&cx, tdr, gpa(0x10), PgLevel::L4K)
                .await
                .unwrap();
        },
        move |cx, m| async move {
            raw(&m
                .tdh_mem_range_unblock(&cx, tdr, gpa(0x11), PgLevel::L4K)
                .await)
        },
    );
    assert_eq!(r, BUSY_SEPT_TREE);
    assert_eq!(
        state_at(&b.m, tdr, PgLevel::L4K, gpa(0x11)),
        SeptState::PendingBlocked
    );
}
