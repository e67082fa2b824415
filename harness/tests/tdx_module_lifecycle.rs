//! Conformance tests of the TDX module model's TD / vCPU life-cycle, reclaim and cache leaves
//! and of the guest's memory TDCALLs, one test per success path and per error path that
//! upstream KVM handles or the module's handler documents.
//!
//! Every expected status is the module's own value (intel/tdx-module 1666adc,
//! include/auto_gen_2_0/tdx_error_codes_defs.h and the handlers in
//! src/vmm_dispatcher/api_calls/ and src/td_dispatcher/vm_exits/), written out as raw numbers
//! here rather than taken from the model.

use std::cell::RefCell;
use std::future::Future;
use std::rc::Rc;

use harness::addr::{Gpa, Pfn, PgLevel};
use harness::host::ledger::PFN_BASE;
use harness::host::{CacheKey, KernelUse, Owner};
use harness::ids::Hkid;
use harness::sched::{Ctx, Directive, Outcome, Point, Script, TaskId, Until};
use harness::tdx_module::testkit::*;
use harness::tdx_module::*;

// ---- Status values (tdx_error_codes_defs.h) ----

const SUCCESS: u64 = 0;
const INTERRUPTED_RESUMABLE: u64 = 0x8000_0003_0000_0000;
const OPERAND_INVALID: u64 = 0xC000_0100_0000_0000;
const OPERAND_ADDR_RANGE_ERROR: u64 = 0xC000_0101_0000_0000;
const OPERAND_BUSY: u64 = 0x8000_0200_0000_0000;
const RND_NO_ENTROPY: u64 = 0x8000_0203_0000_0000;
const PAGE_METADATA_INCORRECT: u64 = 0xC000_0300_0000_0000;
const TD_ASSOCIATED_PAGES_EXIST: u64 = 0xC000_0400_0000_0000;
const TDCS_NOT_ALLOCATED: u64 = 0xC000_0606_0000_0000;
const LIFECYCLE_STATE_INCORRECT: u64 = 0xC000_0607_0000_0000;
const OP_STATE_INCORRECT: u64 = 0xC000_0608_0000_0000;
const NO_VCPUS: u64 = 0xC000_0609_0000_0000;
const TDCX_NUM_INCORRECT: u64 = 0xC000_0610_0000_0000;
const VCPU_STATE_INCORRECT: u64 = 0xC000_0700_0000_0000;
const VCPU_ASSOCIATED: u64 = 0x8000_0701_0000_0000;
const VCPU_NOT_ASSOCIATED: u64 = 0x8000_0702_0000_0000;
const MAX_VCPUS_EXCEEDED: u64 = 0xC000_0705_0000_0000;
const TD_KEYS_NOT_CONFIGURED: u64 = 0x8000_0810_0000_0000;
const KEY_CONFIGURED: u64 = 0x0000_0815_0000_0000;
const WBCACHE_NOT_COMPLETE: u64 = 0x8000_0817_0000_0000;
const HKID_NOT_FREE: u64 = 0xC000_0820_0000_0000;
const NO_HKID_READY_TO_WBCACHE: u64 = 0x0000_0821_0000_0000;
const WBCACHE_RESUME_ERROR: u64 = 0xC000_0823_0000_0000;
const FLUSHVP_NOT_DONE: u64 = 0x8000_0824_0000_0000;
const EPT_ENTRY_NOT_PRESENT: u64 = 0xC000_0B03_0000_0000;
const PAGE_ALREADY_ACCEPTED: u64 = 0x0000_0B0A_0000_0000;
const PAGE_SIZE_MISMATCH: u64 = 0xC000_0B0B_0000_0000;

// Operand ids (OPERAND_ID_*).
const RCX: u64 = 1;
const RDX: u64 = 2;
const OPERAND_ID_MAX_VCPUS: u64 = 68;

// TDVPS.vcpu_state values reported as status details (OP_STATE_INCORRECT carries none at
// 1666adc).
const VCPU_UNINITIALIZED: u64 = 0;
const VCPU_READY: u64 = 2;
const VCPU_ACTIVE: u64 = 4;

// TDX level encoding in details (4K = 0, 2M = 1).
const LVL_4K: u64 = 0;
const LVL_2M: u64 = 1;

const HKID: Hkid = Hkid(32);
const NPAGES: usize = 2048;

// ---- Helpers ----

fn bench(packages: u8) -> Bench {
    Bench::new(
        ModuleConfig {
            packages,
            ..ModuleConfig::default()
        },
        NPAGES,
    )
}

fn gpa(gfn: u64) -> Gpa {
    Gpa::new(gfn << 12)
}

/// RAX of a SEAMCALL.
fn st<T>(r: SeamResult<T>) -> u64 {
    r.err().map_or(SUCCESS, |e| e.status.raw())
}

/// RAX of a TDCALL that completed (no TD exit).
fn tst(r: TdcallResult) -> u64 {
    r.expect("the TDCALL completed without a TD exit")
        .status
        .raw()
}

/// A page outside every TDMR (beyond the host memory the PAMT covers).
fn outside_tdmr() -> Pfn {
    Pfn::new(PFN_BASE + NPAGES as u64 + 16)
}

/// MNG.CREATE plus KEY.CONFIG on every package.
async fn create_keyed(cx: &Ctx, m: &TdxModule, hkid: Hkid) -> Pfn {
    let packages = m.state().config.packages;
    let tdr = alloc(m, KernelUse::Tdr);
    m.tdh_mng_create(cx, tdr, hkid).await.expect("MNG.CREATE");
    for pkg in 0..packages {
        m.tdh_mng_key_config(cx, Lp(pkg), tdr)
            .await
            .expect("KEY.CONFIG");
    }
    tdr
}

/// `n` MNG.ADDCX calls.
async fn add_tdcs(cx: &Ctx, m: &TdxModule, tdr: Pfn, n: usize) -> Vec<Pfn> {
    let mut v = Vec::new();
    for _ in 0..n {
        let p = alloc(m, KernelUse::Tdcs);
        m.tdh_mng_addcx(cx, tdr, p).await.expect("MNG.ADDCX");
        v.push(p);
    }
    v
}

/// A TD through MNG.INIT (no vCPUs) with `max_vcpus`.
async fn initialized_td(cx: &Ctx, m: &TdxModule, hkid: Hkid, max_vcpus: u32) -> Pfn {
    let tdr = create_keyed(cx, m, hkid).await;
    let n = m.state().config.tdcs_pages;
    add_tdcs(cx, m, tdr, n).await;
    m.tdh_mng_init(
        cx,
        tdr,
        TdParams {
            max_vcpus,
            attributes: 0,
        },
    )
    .await
    .expect("MNG.INIT");
    tdr
}

/// VP.CREATE and every VP.ADDCX, without VP.INIT.
async fn created_vcpu(cx: &Ctx, m: &TdxModule, tdr: Pfn) -> Pfn {
    let n = m.state().config.tdvps_pages;
    let tdvpr = alloc(m, KernelUse::Tdvpr);
    m.tdh_vp_create(cx, tdr, tdvpr).await.expect("VP.CREATE");
    for _ in 1..n {
        let p = alloc(m, KernelUse::Tdcx);
        m.tdh_vp_addcx(cx, tdvpr, p).await.expect("VP.ADDCX");
    }
    tdvpr
}

/// `build_td` plus MR.FINALIZE.
async fn runnable_td(cx: &Ctx, m: &TdxModule, nvcpus: u8) -> BuiltTd {
    let td = build_td(cx, m, HKID, nvcpus).await;
    m.tdh_mr_finalize(cx, td.tdr).await.expect("MR.FINALIZE");
    td
}

/// VP.FLUSH of every vCPU, VPFLUSHDONE, CACHE.WB on every package (resuming), KEY.FREEID.
async fn release_hkid(cx: &Ctx, m: &TdxModule, td: &BuiltTd) {
    for v in &td.vcpus {
        m.tdh_vp_flush(cx, v.lp, v.tdvpr).await.expect("VP.FLUSH");
    }
    m.tdh_mng_vpflushdone(cx, td.tdr)
        .await
        .expect("VPFLUSHDONE");
    cache_wb_all(cx, m).await;
    m.tdh_mng_key_freeid(cx, td.tdr).await.expect("KEY.FREEID");
}

/// CACHE.WB START (then RESUME while interrupted) on every package.
async fn cache_wb_all(cx: &Ctx, m: &TdxModule) {
    let packages = m.state().config.packages;
    for pkg in 0..packages {
        let mut cmd = CacheWbCmd::Start;
        loop {
            match st(m.tdh_phymem_cache_wb(cx, Lp(pkg), cmd).await) {
                SUCCESS => break,
                INTERRUPTED_RESUMABLE => cmd = CacheWbCmd::Resume,
                other => panic!("CACHE.WB: {other:#x}"),
            }
        }
    }
}

/// SEPT.ADD for every missing table above a leaf at `leaf` covering `gpa`.
async fn link_above(cx: &Ctx, m: &TdxModule, tdr: Pfn, gpa: Gpa, leaf: PgLevel) -> Vec<Pfn> {
    let mut added = Vec::new();
    for level in [PgLevel::L512G, PgLevel::L1G, PgLevel::L2M] {
        if level <= leaf {
            break;
        }
        if m.state().tds[&tdr].sept.state(level, gpa.gfn()) == SeptState::Free {
            let p = alloc(m, KernelUse::Sept);
            let aligned = gpa.gfn().align_down(level).gpa();
            m.tdh_mem_sept_add(cx, tdr, aligned, level, p)
                .await
                .expect("SEPT.ADD");
            added.push(p);
        }
    }
    added
}

/// 512 contiguous guest pages starting at a 2M-aligned pfn, for the 2M GPA range at `base`.
/// The allocator hands out the lowest free page, so pad up to the alignment first.
fn alloc_guest_2m(m: &TdxModule, base: Gpa) -> Pfn {
    loop {
        let next = m
            .host()
            .borrow()
            .ledger
            .iter()
            .find(|(_, p)| p.owner == Owner::Free)
            .map(|(pfn, _)| pfn)
            .expect("host memory");
        if next.raw() % 512 == 0 {
            break;
        }
        alloc(m, KernelUse::Other);
    }
    let first = alloc_guest(m, base);
    for i in 1..512 {
        let p = alloc_guest(m, Gpa::new(base.raw() + (i << 12)));
        assert_eq!(p, first.add(i), "2M guest range is contiguous");
    }
    first
}

/// Result slot shared between a race's tasks.
type Slot<T> = Rc<RefCell<Option<T>>>;

/// Runs `a` until it reaches the yield point `window` (holding its locks), then `b` to
/// completion, then the rest. Returns b's result.
fn race<A, B, T>(bch: &mut Bench, window: &'static str, a: A, b: B) -> T
where
    A: Future<Output = ()> + 'static,
    B: Future<Output = T> + 'static,
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
        .any(|e| e.task == TaskId(first) && e.point == Point::Yield(window));
    assert!(reached, "task a never reached {window}");
    let r = slot.borrow_mut().take().expect("b finished");
    r
}

// =============================================================================================
// TDH.MNG.CREATE (tdh_mng_create.c)
// =============================================================================================

/// MNG.CREATE success: the TDR page becomes PT_TDR (no owner), the TD is HKID_ASSIGNED with an
/// empty TDR (no TDCS pages, chldcnt 0, no package configured).
#[test]
fn mng_create_success() {
    let mut b = bench(1);
    b.run(|cx, m| async move {
        let tdr = alloc(&m, KernelUse::Tdr);
        assert_eq!(st(m.tdh_mng_create(&cx, tdr, HKID).await), SUCCESS);
        let s = m.state();
        let td = &s.tds[&tdr];
        assert_eq!(td.lifecycle, Lifecycle::HkidAssigned);
        assert_eq!(td.hkid, HKID);
        assert!(!td.fatal);
        assert_eq!((td.chldcnt, td.tdcs.len(), td.pkg_configured), (0, 0, 0));
        let e = s.pamt.get(tdr);
        assert_eq!((e.pt, e.owner), (PageType::Tdr, None));
        assert!(s.locks.none_held());
    });
}

/// MNG.CREATE check 1: an HKID outside the private range gives OPERAND_INVALID|RDX, before
/// the TDR page is looked at.
#[test]
fn mng_create_hkid_out_of_range() {
    let mut b = bench(1);
    b.run(|cx, m| async move {
        let (lo, hi) = {
            let c = &m.state().config;
            (c.hkid_min, c.hkid_max)
        };
        let tdr = alloc(&m, KernelUse::Tdr);
        for bad in [Hkid(lo - 1), Hkid(hi + 1), Hkid(0)] {
            assert_eq!(
                st(m.tdh_mng_create(&cx, tdr, bad).await),
                OPERAND_INVALID | RDX,
                "{bad}"
            );
        }
        // Checked first: even an invalid TDR operand reports RDX.
        assert_eq!(
            st(m.tdh_mng_create(&cx, outside_tdmr(), Hkid(hi + 1)).await),
            OPERAND_INVALID | RDX
        );
        assert_eq!(m.state().pamt.get(tdr).pt, PageType::Nda);
        assert!(m.state().tds.is_empty());
    });
}

/// MNG.CREATE check 4: KOT[hkid] not FREE gives HKID_NOT_FREE, both while another TD holds
/// the HKID (ASSIGNED) and after its VPFLUSHDONE (FLUSHED); KEY.FREEID makes it reusable.
#[test]
fn mng_create_hkid_not_free_until_freeid() {
    let mut b = bench(1);
    b.run(|cx, m| async move {
        let td = build_td(&cx, &m, HKID, 0).await;
        let other = alloc(&m, KernelUse::Tdr);
        assert_eq!(st(m.tdh_mng_create(&cx, other, HKID).await), HKID_NOT_FREE);
        m.tdh_mng_vpflushdone(&cx, td.tdr).await.unwrap();
        assert_eq!(st(m.tdh_mng_create(&cx, other, HKID).await), HKID_NOT_FREE);
        cache_wb_all(&cx, &m).await;
        m.tdh_mng_key_freeid(&cx, td.tdr).await.unwrap();
        assert_eq!(m.state().pamt.get(other).pt, PageType::Nda);
        assert_eq!(st(m.tdh_mng_create(&cx, other, HKID).await), SUCCESS);
    });
}

/// MNG.CREATE check 2: the TDR page must be PT_NDA; a page already assigned (a TDR, a TDCS
/// page) gives PAGE_METADATA_INCORRECT|RCX; a page outside the TDMRs gives
/// OPERAND_ADDR_RANGE_ERROR|RCX.
#[test]
fn mng_create_tdr_page_already_assigned() {
    let mut b = bench(1);
    b.run(|cx, m| async move {
        let td = build_td(&cx, &m, HKID, 0).await;
        assert_eq!(
            st(m.tdh_mng_create(&cx, td.tdr, Hkid(33)).await),
            PAGE_METADATA_INCORRECT | RCX
        );
        assert_eq!(
            st(m.tdh_mng_create(&cx, td.tdcs[0], Hkid(33)).await),
            PAGE_METADATA_INCORRECT | RCX
        );
        assert_eq!(
            st(m.tdh_mng_create(&cx, outside_tdmr(), Hkid(33)).await),
            OPERAND_ADDR_RANGE_ERROR | RCX
        );
        // The failed calls assigned nothing: HKID 33 is still free.
        let tdr = alloc(&m, KernelUse::Tdr);
        assert_eq!(st(m.tdh_mng_create(&cx, tdr, Hkid(33)).await), SUCCESS);
    });
}

/// MNG.CREATE check 6: TD_UUID generation without entropy gives RND_NO_ENTROPY; the TDR page
/// stays PT_NDA and the HKID stays FREE, so a retry succeeds.
#[test]
fn mng_create_rnd_no_entropy() {
    let mut b = bench(1);
    b.run(|cx, m| async move {
        let tdr = alloc(&m, KernelUse::Tdr);
        m.inject(|i| i.rnd_no_entropy = 1);
        assert_eq!(st(m.tdh_mng_create(&cx, tdr, HKID).await), RND_NO_ENTROPY);
        assert_eq!(m.state().pamt.get(tdr).pt, PageType::Nda);
        assert!(m.state().tds.is_empty());
        assert!(m.state().locks.none_held());
        assert_eq!(st(m.tdh_mng_create(&cx, tdr, HKID).await), SUCCESS);
    });
}

// =============================================================================================
// TDH.MNG.KEY.CONFIG (tdh_mng_key_config.c)
// =============================================================================================

/// KEY.CONFIG success: one call per package sets that package's bit; the TD becomes
/// KEYS_CONFIGURED only when every package is configured.
#[test]
fn key_config_success_on_each_package() {
    let mut b = bench(2);
    b.run(|cx, m| async move {
        let tdr = alloc(&m, KernelUse::Tdr);
        m.tdh_mng_create(&cx, tdr, HKID).await.unwrap();
        assert_eq!(st(m.tdh_mng_key_config(&cx, Lp(0), tdr).await), SUCCESS);
        assert_eq!(m.state().tds[&tdr].lifecycle, Lifecycle::HkidAssigned);
        assert_eq!(m.state().tds[&tdr].pkg_configured, 0b01);
        assert_eq!(st(m.tdh_mng_key_config(&cx, Lp(1), tdr).await), SUCCESS);
        assert_eq!(m.state().tds[&tdr].lifecycle, Lifecycle::KeysConfigured);
        assert_eq!(m.state().tds[&tdr].pkg_configured, 0b11);
    });
}

/// KEY.CONFIG check 4: a second call on a package already configured (LP 2 is in package 0)
/// returns the success-class warning KEY_CONFIGURED and changes nothing.
#[test]
fn key_config_repeat_on_a_package_is_key_configured() {
    let mut b = bench(2);
    b.run(|cx, m| async move {
        let tdr = alloc(&m, KernelUse::Tdr);
        m.tdh_mng_create(&cx, tdr, HKID).await.unwrap();
        m.tdh_mng_key_config(&cx, Lp(0), tdr).await.unwrap();
        let e = m.tdh_mng_key_config(&cx, Lp(2), tdr).await.unwrap_err();
        assert_eq!(e.status.raw(), KEY_CONFIGURED);
        assert!(!e.status.is_error());
        assert_eq!(m.state().tds[&tdr].pkg_configured, 0b01);
        assert_eq!(m.state().tds[&tdr].lifecycle, Lifecycle::HkidAssigned);
    });
}

/// KEY.CONFIG check 3: once every package is configured the lifecycle is KEYS_CONFIGURED, so
/// any further call is LIFECYCLE_STATE_INCORRECT (not KEY_CONFIGURED); a non-TDR operand is
/// PAGE_METADATA_INCORRECT|RCX.
#[test]
fn key_config_after_all_packages_is_lifecycle_incorrect() {
    let mut b = bench(2);
    b.run(|cx, m| async move {
        let tdr = create_keyed(&cx, &m, HKID).await;
        for lp in 0..4 {
            assert_eq!(
                st(m.tdh_mng_key_config(&cx, Lp(lp), tdr).await),
                LIFECYCLE_STATE_INCORRECT
            );
        }
        let not_tdr = alloc(&m, KernelUse::Other);
        assert_eq!(
            st(m.tdh_mng_key_config(&cx, Lp(0), not_tdr).await),
            PAGE_METADATA_INCORRECT | RCX
        );
    });
}

// =============================================================================================
// TDH.MNG.ADDCX (tdh_mng_add_cx.c)
// =============================================================================================

/// MNG.ADDCX success: the page becomes PT_TDCX owned by the TDR, num_tdcx and chldcnt grow.
#[test]
fn mng_addcx_success() {
    let mut b = bench(1);
    b.run(|cx, m| async move {
        let tdr = create_keyed(&cx, &m, HKID).await;
        let p = alloc(&m, KernelUse::Tdcs);
        assert_eq!(st(m.tdh_mng_addcx(&cx, tdr, p).await), SUCCESS);
        let s = m.state();
        assert_eq!(s.tds[&tdr].tdcs, vec![p]);
        assert_eq!(s.tds[&tdr].chldcnt, 1);
        assert_eq!(s.tds[&tdr].op_state, OpState::Uninitialized);
        let e = s.pamt.get(p);
        assert_eq!((e.pt, e.owner), (PageType::Tdcx, Some(tdr)));
    });
}

/// MNG.ADDCX check 3: lifecycle != KEYS_CONFIGURED (a package still unconfigured) gives
/// TD_KEYS_NOT_CONFIGURED; the TDR operand is RDX, the page RCX.
#[test]
fn mng_addcx_before_keys_configured() {
    let mut b = bench(2);
    b.run(|cx, m| async move {
        let tdr = alloc(&m, KernelUse::Tdr);
        m.tdh_mng_create(&cx, tdr, HKID).await.unwrap();
        let p = alloc(&m, KernelUse::Tdcs);
        assert_eq!(
            st(m.tdh_mng_addcx(&cx, tdr, p).await),
            TD_KEYS_NOT_CONFIGURED
        );
        m.tdh_mng_key_config(&cx, Lp(0), tdr).await.unwrap();
        assert_eq!(
            st(m.tdh_mng_addcx(&cx, tdr, p).await),
            TD_KEYS_NOT_CONFIGURED
        );
        m.tdh_mng_key_config(&cx, Lp(1), tdr).await.unwrap();
        // Explicit-page checks: TDR in RDX, new page in RCX.
        assert_eq!(
            st(m.tdh_mng_addcx(&cx, p, p).await),
            PAGE_METADATA_INCORRECT | RDX
        );
        // The TDR as the new page too: its PAMT entry is already held exclusive by this call.
        assert_eq!(st(m.tdh_mng_addcx(&cx, tdr, tdr).await), OPERAND_BUSY | RCX);
        assert_eq!(st(m.tdh_mng_addcx(&cx, tdr, p).await), SUCCESS);
        assert_eq!(m.state().pamt.get(p).pt, PageType::Tdcx);
        assert_eq!(
            st(m.tdh_mng_addcx(&cx, tdr, p).await),
            PAGE_METADATA_INCORRECT | RCX
        );
    });
}

/// MNG.ADDCX check 4: `num_tdcx > MAX_NUM_TDCS_PAGES-1` gives TDCX_NUM_INCORRECT.
/// MAX_NUM_TDCS_PAGES is MIN + 3 (one per possible L2 VM); pages beyond MIN are accepted while
/// the TD is UNINITIALIZED.
#[test]
fn mng_addcx_too_many_pages() {
    let mut b = bench(1);
    b.run(|cx, m| async move {
        let min = m.state().config.tdcs_pages;
        let max = min + 3;
        let tdr = create_keyed(&cx, &m, HKID).await;
        add_tdcs(&cx, &m, tdr, max).await;
        let p = alloc(&m, KernelUse::Tdcs);
        assert_eq!(st(m.tdh_mng_addcx(&cx, tdr, p).await), TDCX_NUM_INCORRECT);
        assert_eq!(m.state().pamt.get(p).pt, PageType::Nda);
        assert_eq!(m.state().tds[&tdr].tdcs.len(), max);
        assert_eq!(m.state().tds[&tdr].chldcnt, max as u64);
    });
}

/// MNG.ADDCX check 7: a page beyond MIN_NUM_TDCS_PAGES needs op_state UNINITIALIZED; after
/// MNG.INIT it gives the bare TDX_OP_STATE_INCORRECT (no operand in this handler).
#[test]
fn mng_addcx_beyond_min_after_init_is_op_state_incorrect() {
    let mut b = bench(1);
    b.run(|cx, m| async move {
        let tdr = initialized_td(&cx, &m, HKID, 4).await;
        let p = alloc(&m, KernelUse::Tdcs);
        assert_eq!(st(m.tdh_mng_addcx(&cx, tdr, p).await), OP_STATE_INCORRECT);
        assert_eq!(m.state().pamt.get(p).pt, PageType::Nda);
    });
}

/// MNG.ADDCX check 7: the MIN-th page generates the migration key; without entropy it fails
/// with RND_NO_ENTROPY and the page is not added.
#[test]
fn mng_addcx_rnd_no_entropy_on_the_last_required_page() {
    let mut b = bench(1);
    b.run(|cx, m| async move {
        let min = m.state().config.tdcs_pages;
        let tdr = create_keyed(&cx, &m, HKID).await;
        add_tdcs(&cx, &m, tdr, min - 1).await;
        let p = alloc(&m, KernelUse::Tdcs);
        m.inject(|i| i.rnd_no_entropy = 1);
        assert_eq!(st(m.tdh_mng_addcx(&cx, tdr, p).await), RND_NO_ENTROPY);
        assert_eq!(m.state().pamt.get(p).pt, PageType::Nda);
        assert_eq!(m.state().tds[&tdr].tdcs.len(), min - 1);
        assert_eq!(st(m.tdh_mng_addcx(&cx, tdr, p).await), SUCCESS);
    });
}

// =============================================================================================
// TDH.MNG.INIT (tdh_mng_init.c)
// =============================================================================================

/// MNG.INIT success: op_state INITIALIZED, TD epoch 1, no vCPUs yet.
#[test]
fn mng_init_success() {
    let mut b = bench(1);
    b.run(|cx, m| async move {
        let tdr = create_keyed(&cx, &m, HKID).await;
        let n = m.state().config.tdcs_pages;
        add_tdcs(&cx, &m, tdr, n).await;
        assert_eq!(
            st(m.tdh_mng_init(
                &cx,
                tdr,
                TdParams {
                    max_vcpus: 2,
                    attributes: 0
                }
            )
            .await),
            SUCCESS
        );
        let s = m.state();
        let td = &s.tds[&tdr];
        assert_eq!(td.op_state, OpState::Initialized);
        assert_eq!(td.td_epoch, 1);
        assert_eq!(td.refcount, [0, 0]);
        assert_eq!((td.num_vcpus, td.num_assoc_vcpus, td.max_vcpus), (0, 0, 2));
    });
}

/// MNG.INIT gate step 3: fewer than MIN_NUM_TDCS_PAGES TDCS pages gives TDCS_NOT_ALLOCATED.
#[test]
fn mng_init_before_enough_tdcs_pages() {
    let mut b = bench(1);
    b.run(|cx, m| async move {
        let min = m.state().config.tdcs_pages;
        let tdr = create_keyed(&cx, &m, HKID).await;
        let params = TdParams {
            max_vcpus: 1,
            attributes: 0,
        };
        assert_eq!(
            st(m.tdh_mng_init(&cx, tdr, params).await),
            TDCS_NOT_ALLOCATED
        );
        add_tdcs(&cx, &m, tdr, min - 1).await;
        assert_eq!(
            st(m.tdh_mng_init(&cx, tdr, params).await),
            TDCS_NOT_ALLOCATED
        );
        add_tdcs(&cx, &m, tdr, 1).await;
        assert_eq!(st(m.tdh_mng_init(&cx, tdr, params).await), SUCCESS);
    });
}

/// MNG.INIT gate step 2: before KEY.CONFIG on every package, TD_KEYS_NOT_CONFIGURED.
#[test]
fn mng_init_before_keys_configured() {
    let mut b = bench(1);
    b.run(|cx, m| async move {
        let tdr = alloc(&m, KernelUse::Tdr);
        m.tdh_mng_create(&cx, tdr, HKID).await.unwrap();
        assert_eq!(
            st(m.tdh_mng_init(
                &cx,
                tdr,
                TdParams {
                    max_vcpus: 1,
                    attributes: 0
                }
            )
            .await),
            TD_KEYS_NOT_CONFIGURED
        );
    });
}

/// MNG.INIT gate step 5: a second MNG.INIT finds op_state INITIALIZED and returns
/// OP_STATE_INCORRECT (bare code at 1666adc: check_any_td_state_map_tdcs_and_lock).
#[test]
fn mng_init_twice_is_op_state_incorrect() {
    let mut b = bench(1);
    b.run(|cx, m| async move {
        let tdr = initialized_td(&cx, &m, HKID, 4).await;
        assert_eq!(
            st(m.tdh_mng_init(
                &cx,
                tdr,
                TdParams {
                    max_vcpus: 4,
                    attributes: 0
                }
            )
            .await),
            OP_STATE_INCORRECT
        );
        assert_eq!(m.state().tds[&tdr].max_vcpus, 4);
    });
}

/// MNG.INIT parameter check: MAX_VCPUS 0 is OPERAND_INVALID with the TD_PARAMS field id
/// MAX_VCPUS (68); the TD stays UNINITIALIZED.
#[test]
fn mng_init_max_vcpus_zero() {
    let mut b = bench(1);
    b.run(|cx, m| async move {
        let tdr = create_keyed(&cx, &m, HKID).await;
        let n = m.state().config.tdcs_pages;
        add_tdcs(&cx, &m, tdr, n).await;
        assert_eq!(
            st(m.tdh_mng_init(
                &cx,
                tdr,
                TdParams {
                    max_vcpus: 0,
                    attributes: 0
                }
            )
            .await),
            OPERAND_INVALID | OPERAND_ID_MAX_VCPUS
        );
        assert_eq!(m.state().tds[&tdr].op_state, OpState::Uninitialized);
    });
}

// =============================================================================================
// TDH.VP.CREATE / TDH.VP.ADDCX / TDH.VP.INIT (tdh_vp_create.c, tdh_vp_addcx.c, tdh_vp_init.c)
// =============================================================================================

/// VP.CREATE success: the TDVPR page becomes PT_TDVPR owned by the TDR, the vCPU is
/// UNINITIALIZED and not associated, chldcnt grows.
#[test]
fn vp_create_success() {
    let mut b = bench(1);
    b.run(|cx, m| async move {
        let tdr = initialized_td(&cx, &m, HKID, 4).await;
        let before = m.state().tds[&tdr].chldcnt;
        let tdvpr = alloc(&m, KernelUse::Tdvpr);
        assert_eq!(st(m.tdh_vp_create(&cx, tdr, tdvpr).await), SUCCESS);
        let s = m.state();
        let v = &s.vcpus[&tdvpr];
        assert_eq!(v.state, VcpuState::Uninitialized);
        assert_eq!(v.assoc_lp, None);
        assert_eq!(v.tdr, tdr);
        assert_eq!(s.tds[&tdr].chldcnt, before + 1);
        let e = s.pamt.get(tdvpr);
        assert_eq!((e.pt, e.owner), (PageType::Tdvpr, Some(tdr)));
    });
}

/// VP.CREATE op-state check (INITIALIZED only here): before MNG.INIT it is
/// OP_STATE_INCORRECT, after MR.FINALIZE OP_STATE_INCORRECT; a TDVPR
/// page that is not PT_NDA is PAGE_METADATA_INCORRECT|RCX.
#[test]
fn vp_create_wrong_op_state_and_page() {
    let mut b = bench(1);
    b.run(|cx, m| async move {
        let tdr = create_keyed(&cx, &m, HKID).await;
        let n = m.state().config.tdcs_pages;
        let tdcs = add_tdcs(&cx, &m, tdr, n).await;
        let tdvpr = alloc(&m, KernelUse::Tdvpr);
        assert_eq!(
            st(m.tdh_vp_create(&cx, tdr, tdvpr).await),
            OP_STATE_INCORRECT
        );
        m.tdh_mng_init(
            &cx,
            tdr,
            TdParams {
                max_vcpus: 4,
                attributes: 0,
            },
        )
        .await
        .unwrap();
        assert_eq!(
            st(m.tdh_vp_create(&cx, tdr, tdcs[0]).await),
            PAGE_METADATA_INCORRECT | RCX
        );
        build_vcpu(&cx, &m, tdr, Lp(0)).await;
        m.tdh_mr_finalize(&cx, tdr).await.unwrap();
        assert_eq!(
            st(m.tdh_vp_create(&cx, tdr, tdvpr).await),
            OP_STATE_INCORRECT
        );
        assert_eq!(m.state().pamt.get(tdvpr).pt, PageType::Nda);
    });
}

/// VP.ADDCX success: the page becomes PT_TDCX owned by the TDR (not the TDVPR).
#[test]
fn vp_addcx_success() {
    let mut b = bench(1);
    b.run(|cx, m| async move {
        let tdr = initialized_td(&cx, &m, HKID, 4).await;
        let tdvpr = alloc(&m, KernelUse::Tdvpr);
        m.tdh_vp_create(&cx, tdr, tdvpr).await.unwrap();
        let p = alloc(&m, KernelUse::Tdcx);
        assert_eq!(st(m.tdh_vp_addcx(&cx, tdvpr, p).await), SUCCESS);
        assert_eq!(m.state().vcpus[&tdvpr].tdcx, vec![p]);
        let e = m.state().pamt.get(p);
        assert_eq!((e.pt, e.owner), (PageType::Tdcx, Some(tdr)));
    });
}

/// VP.ADDCX check 5: a vCPU that is no longer UNINITIALIZED (READY after VP.INIT) gives
/// VCPU_STATE_INCORRECT with the state as detail (checked before the page count).
#[test]
fn vp_addcx_after_vp_init_is_vcpu_state_incorrect() {
    let mut b = bench(1);
    b.run(|cx, m| async move {
        let tdr = initialized_td(&cx, &m, HKID, 4).await;
        let v = build_vcpu(&cx, &m, tdr, Lp(0)).await;
        let p = alloc(&m, KernelUse::Tdcx);
        assert_eq!(
            st(m.tdh_vp_addcx(&cx, v.tdvpr, p).await),
            VCPU_STATE_INCORRECT | VCPU_READY
        );
        assert_eq!(m.state().pamt.get(p).pt, PageType::Nda);
    });
}

/// VP.ADDCX check 6: num_tdvps_pages already at MAX_TDVPS_PAGES gives TDCX_NUM_INCORRECT.
#[test]
fn vp_addcx_too_many_pages() {
    let mut b = bench(1);
    b.run(|cx, m| async move {
        let tdr = initialized_td(&cx, &m, HKID, 4).await;
        let tdvpr = created_vcpu(&cx, &m, tdr).await;
        // Past the minimum KVM adds, up to MAX_TDVPS_PAGES in all.
        let have = m.state().config.tdvps_pages;
        for _ in have..MAX_TDVPS_PAGES {
            let p = alloc(&m, KernelUse::Tdcx);
            assert_eq!(st(m.tdh_vp_addcx(&cx, tdvpr, p).await), SUCCESS);
        }
        let p = alloc(&m, KernelUse::Tdcx);
        assert_eq!(st(m.tdh_vp_addcx(&cx, tdvpr, p).await), TDCX_NUM_INCORRECT);
        assert_eq!(m.state().pamt.get(p).pt, PageType::Nda);
    });
}

/// VP.ADDCX op-state check (INITIALIZED only): after MR.FINALIZE, OP_STATE_INCORRECT.
#[test]
fn vp_addcx_after_finalize_is_op_state_incorrect() {
    let mut b = bench(1);
    b.run(|cx, m| async move {
        let tdr = initialized_td(&cx, &m, HKID, 4).await;
        let tdvpr = alloc(&m, KernelUse::Tdvpr);
        m.tdh_vp_create(&cx, tdr, tdvpr).await.unwrap();
        build_vcpu(&cx, &m, tdr, Lp(1)).await;
        m.tdh_mr_finalize(&cx, tdr).await.unwrap();
        let p = alloc(&m, KernelUse::Tdcx);
        assert_eq!(st(m.tdh_vp_addcx(&cx, tdvpr, p).await), OP_STATE_INCORRECT);
    });
}

/// VP.INIT success: the vCPU is READY, associated with the LP that ran VP.INIT; num_vcpus and
/// num_assoc_vcpus grow.
#[test]
fn vp_init_success() {
    let mut b = bench(1);
    b.run(|cx, m| async move {
        let tdr = initialized_td(&cx, &m, HKID, 4).await;
        let tdvpr = created_vcpu(&cx, &m, tdr).await;
        assert_eq!(st(m.tdh_vp_init(&cx, Lp(2), tdvpr).await), SUCCESS);
        let s = m.state();
        assert_eq!(s.vcpus[&tdvpr].state, VcpuState::Ready);
        assert_eq!(s.vcpus[&tdvpr].assoc_lp, Some(Lp(2)));
        assert_eq!(s.tds[&tdr].num_vcpus, 1);
        assert_eq!(s.tds[&tdr].num_assoc_vcpus, 1);
    });
}

/// VP.INIT lock row (version 1, as Linux calls it with the x2APIC ID): the TDR is locked
/// exclusively, so VP.INIT while another vCPU's VP.CREATE holds the TDR shared is
/// TDX_OPERAND_BUSY|TDR, and it succeeds once that leaf is done.
#[test]
fn vp_init_busy_tdr_while_vp_create_holds_it_shared() {
    let mut b = bench(1);
    let out: Slot<(Pfn, Pfn)> = Rc::new(RefCell::new(None));
    let o = out.clone();
    b.run(move |cx, m| async move {
        let tdr = initialized_td(&cx, &m, HKID, 4).await;
        let tdvpr = created_vcpu(&cx, &m, tdr).await;
        *o.borrow_mut() = Some((tdr, tdvpr));
    });
    let (tdr, tdvpr) = out.borrow_mut().take().unwrap();
    let (m1, c1, m2, c2) = (b.m.clone(), b.cx.clone(), b.m.clone(), b.cx.clone());
    let other = alloc(&b.m, KernelUse::Tdvpr);
    let r = race(
        &mut b,
        window_name(Leaf::VpCreate),
        async move { m1.tdh_vp_create(&c1, tdr, other).await.unwrap() },
        async move { st(m2.tdh_vp_init(&c2, Lp(0), tdvpr).await) },
    );
    assert_eq!(r, OPERAND_BUSY | 0x80, "VP.INIT vs VP.CREATE on the TDR");
    b.run(move |cx, m| async move {
        assert_eq!(st(m.tdh_vp_init(&cx, Lp(0), tdvpr).await), SUCCESS);
    });
}

/// VP.INIT check 6: fewer TDVPS pages than required gives TDCX_NUM_INCORRECT.
#[test]
fn vp_init_too_few_tdvps_pages() {
    let mut b = bench(1);
    b.run(|cx, m| async move {
        let tdr = initialized_td(&cx, &m, HKID, 4).await;
        let tdvpr = alloc(&m, KernelUse::Tdvpr);
        m.tdh_vp_create(&cx, tdr, tdvpr).await.unwrap();
        assert_eq!(
            st(m.tdh_vp_init(&cx, Lp(0), tdvpr).await),
            TDCX_NUM_INCORRECT
        );
        assert_eq!(m.state().vcpus[&tdvpr].state, VcpuState::Uninitialized);
        assert_eq!(m.state().tds[&tdr].num_vcpus, 0);
    });
}

/// VP.INIT check 7: a second VP.INIT finds the vCPU READY: VCPU_STATE_INCORRECT|READY.
#[test]
fn vp_init_twice_is_vcpu_state_incorrect() {
    let mut b = bench(1);
    b.run(|cx, m| async move {
        let tdr = initialized_td(&cx, &m, HKID, 4).await;
        let v = build_vcpu(&cx, &m, tdr, Lp(0)).await;
        assert_eq!(
            st(m.tdh_vp_init(&cx, Lp(0), v.tdvpr).await),
            VCPU_STATE_INCORRECT | VCPU_READY
        );
        assert_eq!(m.state().tds[&tdr].num_vcpus, 1);
    });
}

/// VP.INIT check 8: vcpu_index >= max_vcpus gives MAX_VCPUS_EXCEEDED and undoes the count.
#[test]
fn vp_init_max_vcpus_exceeded() {
    let mut b = bench(1);
    b.run(|cx, m| async move {
        let tdr = initialized_td(&cx, &m, HKID, 1).await;
        build_vcpu(&cx, &m, tdr, Lp(0)).await;
        // VP.CREATE does not check MAX_VCPUS; VP.INIT does.
        let tdvpr = created_vcpu(&cx, &m, tdr).await;
        assert_eq!(
            st(m.tdh_vp_init(&cx, Lp(1), tdvpr).await),
            MAX_VCPUS_EXCEEDED
        );
        let s = m.state();
        assert_eq!(s.tds[&tdr].num_vcpus, 1);
        assert_eq!(s.tds[&tdr].num_assoc_vcpus, 1);
        assert_eq!(s.vcpus[&tdvpr].state, VcpuState::Uninitialized);
        assert_eq!(s.vcpus[&tdvpr].assoc_lp, None);
    });
}

/// VP.INIT op-state check (INITIALIZED only): a vCPU created before MR.FINALIZE cannot be
/// initialised after it: OP_STATE_INCORRECT.
#[test]
fn vp_init_after_finalize_is_op_state_incorrect() {
    let mut b = bench(1);
    b.run(|cx, m| async move {
        let tdr = initialized_td(&cx, &m, HKID, 4).await;
        let late = created_vcpu(&cx, &m, tdr).await;
        build_vcpu(&cx, &m, tdr, Lp(0)).await;
        m.tdh_mr_finalize(&cx, tdr).await.unwrap();
        assert_eq!(
            st(m.tdh_vp_init(&cx, Lp(1), late).await),
            OP_STATE_INCORRECT
        );
    });
}

// =============================================================================================
// TDH.VP.FLUSH (tdh_vp_flush.c)
// =============================================================================================

/// VP.FLUSH success on the associated LP: the vCPU is dissociated, num_assoc_vcpus drops, and
/// vcpu_state is unchanged (READY).
#[test]
fn vp_flush_success() {
    let mut b = bench(1);
    b.run(|cx, m| async move {
        let td = runnable_td(&cx, &m, 2).await;
        let v = &td.vcpus[1];
        assert_eq!(st(m.tdh_vp_flush(&cx, v.lp, v.tdvpr).await), SUCCESS);
        let s = m.state();
        assert_eq!(s.vcpus[&v.tdvpr].assoc_lp, None);
        assert_eq!(s.vcpus[&v.tdvpr].state, VcpuState::Ready);
        assert_eq!(s.tds[&td.tdr].num_assoc_vcpus, 1);
    });
}

/// VP.FLUSH check 5: assoc_lpid != this LP gives VCPU_NOT_ASSOCIATED: from another LP, a
/// second flush (associated with no LP), and a vCPU never initialised (never associated).
#[test]
fn vp_flush_not_associated() {
    let mut b = bench(1);
    b.run(|cx, m| async move {
        let tdr = initialized_td(&cx, &m, HKID, 4).await;
        let never = created_vcpu(&cx, &m, tdr).await;
        let v = build_vcpu(&cx, &m, tdr, Lp(0)).await;
        assert_eq!(
            st(m.tdh_vp_flush(&cx, Lp(1), v.tdvpr).await),
            VCPU_NOT_ASSOCIATED
        );
        assert_eq!(st(m.tdh_vp_flush(&cx, Lp(0), v.tdvpr).await), SUCCESS);
        assert_eq!(
            st(m.tdh_vp_flush(&cx, Lp(0), v.tdvpr).await),
            VCPU_NOT_ASSOCIATED
        );
        assert_eq!(
            st(m.tdh_vp_flush(&cx, Lp(0), never).await),
            VCPU_NOT_ASSOCIATED
        );
        assert_eq!(m.state().tds[&tdr].num_assoc_vcpus, 0);
    });
}

/// VP.FLUSH check 4: a vCPU with too few TDVPS pages gives TDCX_NUM_INCORRECT (before the
/// association check).
#[test]
fn vp_flush_too_few_tdvps_pages() {
    let mut b = bench(1);
    b.run(|cx, m| async move {
        let tdr = initialized_td(&cx, &m, HKID, 4).await;
        let tdvpr = alloc(&m, KernelUse::Tdvpr);
        m.tdh_vp_create(&cx, tdr, tdvpr).await.unwrap();
        assert_eq!(
            st(m.tdh_vp_flush(&cx, Lp(0), tdvpr).await),
            TDCX_NUM_INCORRECT
        );
    });
}

/// VP.FLUSH check 1: while the vCPU runs, VP.ENTER holds its TDVPR PAMT entry shared, so the
/// exclusive lock fails: BUSY|RCX. After the TD exit the flush succeeds.
#[test]
fn vp_flush_while_running_is_busy() {
    let mut b = bench(1);
    b.run(|cx, m| async move {
        let td = runnable_td(&cx, &m, 1).await;
        let v = &td.vcpus[0];
        assert_eq!(
            m.tdh_vp_enter(&cx, v.lp, v.tdvpr, 0).await,
            Ok(EnterOutcome::Entered)
        );
        assert_eq!(
            st(m.tdh_vp_flush(&cx, v.lp, v.tdvpr).await),
            OPERAND_BUSY | RCX
        );
        m.td_exit(v.tdvpr, 0);
        assert_eq!(st(m.tdh_vp_flush(&cx, v.lp, v.tdvpr).await), SUCCESS);
    });
}

/// VP.FLUSH check 3: after VPFLUSHDONE the TD is BLOCKED: TD_KEYS_NOT_CONFIGURED.
#[test]
fn vp_flush_after_vpflushdone() {
    let mut b = bench(1);
    b.run(|cx, m| async move {
        let td = runnable_td(&cx, &m, 1).await;
        let v = &td.vcpus[0];
        m.tdh_vp_flush(&cx, v.lp, v.tdvpr).await.unwrap();
        m.tdh_mng_vpflushdone(&cx, td.tdr).await.unwrap();
        assert_eq!(
            st(m.tdh_vp_flush(&cx, v.lp, v.tdvpr).await),
            TD_KEYS_NOT_CONFIGURED
        );
    });
}

// =============================================================================================
// TDH.VP.ENTER (tdh_vp_enter.c) and the TD-exit path
// =============================================================================================

/// VP.ENTER success: the vCPU is ACTIVE and counted into the current TD epoch; TD exit makes
/// it READY again, drops the count and every lock.
#[test]
fn vp_enter_success() {
    let mut b = bench(1);
    b.run(|cx, m| async move {
        let td = runnable_td(&cx, &m, 1).await;
        let v = &td.vcpus[0];
        assert_eq!(
            m.tdh_vp_enter(&cx, v.lp, v.tdvpr, 0x1000).await,
            Ok(EnterOutcome::Entered)
        );
        {
            let s = m.state();
            let e = s.tds[&td.tdr].td_epoch;
            assert_eq!(s.vcpus[&v.tdvpr].state, VcpuState::Active);
            assert_eq!(s.vcpus[&v.tdvpr].vcpu_epoch, e);
            assert_eq!(s.tds[&td.tdr].refcount[(e & 1) as usize], 1);
            assert_eq!(s.tds[&td.tdr].num_assoc_vcpus, 1);
        }
        m.td_exit(v.tdvpr, 0x1000);
        let s = m.state();
        assert_eq!(s.vcpus[&v.tdvpr].state, VcpuState::Ready);
        assert_eq!(s.tds[&td.tdr].refcount, [0, 0]);
        assert!(s.locks.none_held());
    });
}

/// VP.ENTER gate step 5: before MR.FINALIZE the op state is INITIALIZED, which VP.ENTER does
/// not allow: OP_STATE_INCORRECT.
#[test]
fn vp_enter_before_finalize() {
    let mut b = bench(1);
    b.run(|cx, m| async move {
        let td = build_td(&cx, &m, HKID, 1).await;
        let v = &td.vcpus[0];
        assert_eq!(
            st(m.tdh_vp_enter(&cx, v.lp, v.tdvpr, 0).await),
            OP_STATE_INCORRECT
        );
        assert!(m.state().locks.none_held());
    });
}

/// VP.ENTER `check_and_associate_vcpu`: a vCPU associated with another LP gives
/// VCPU_ASSOCIATED; once flushed, entering from a new LP re-associates it
/// (num_assoc_vcpus += 1).
#[test]
fn vp_enter_from_another_lp() {
    let mut b = bench(1);
    b.run(|cx, m| async move {
        let td = runnable_td(&cx, &m, 1).await;
        let v = &td.vcpus[0];
        assert_eq!(v.lp, Lp(0));
        assert_eq!(
            st(m.tdh_vp_enter(&cx, Lp(1), v.tdvpr, 0).await),
            VCPU_ASSOCIATED
        );
        assert!(m.state().locks.none_held());
        m.tdh_vp_flush(&cx, Lp(0), v.tdvpr).await.unwrap();
        assert_eq!(m.state().tds[&td.tdr].num_assoc_vcpus, 0);
        assert_eq!(
            m.tdh_vp_enter(&cx, Lp(1), v.tdvpr, 0).await,
            Ok(EnterOutcome::Entered)
        );
        assert_eq!(m.state().vcpus[&v.tdvpr].assoc_lp, Some(Lp(1)));
        assert_eq!(m.state().tds[&td.tdr].num_assoc_vcpus, 1);
        m.td_exit(v.tdvpr, 0);
    });
}

/// VP.ENTER `check_and_associate_vcpu`: vcpu_state must be READY; a vCPU already in the
/// guest is ACTIVE: VCPU_STATE_INCORRECT|ACTIVE (the first entry keeps running).
#[test]
fn vp_enter_twice_is_vcpu_state_incorrect() {
    let mut b = bench(1);
    b.run(|cx, m| async move {
        let td = runnable_td(&cx, &m, 1).await;
        let v = &td.vcpus[0];
        m.tdh_vp_enter(&cx, v.lp, v.tdvpr, 0).await.unwrap();
        assert_eq!(
            st(m.tdh_vp_enter(&cx, v.lp, v.tdvpr, 0).await),
            VCPU_STATE_INCORRECT | VCPU_ACTIVE
        );
        assert_eq!(m.state().vcpus[&v.tdvpr].state, VcpuState::Active);
        let e = m.state().tds[&td.tdr].td_epoch;
        assert_eq!(m.state().tds[&td.tdr].refcount[(e & 1) as usize], 1);
        m.td_exit(v.tdvpr, 0);
        assert!(m.state().locks.none_held());
    });
}

/// VP.ENTER `check_and_associate_vcpu`: a vCPU never initialised is UNINITIALIZED:
/// VCPU_STATE_INCORRECT|UNINITIALIZED.
#[test]
fn vp_enter_uninitialized_vcpu() {
    let mut b = bench(1);
    b.run(|cx, m| async move {
        let tdr = initialized_td(&cx, &m, HKID, 4).await;
        let late = created_vcpu(&cx, &m, tdr).await;
        build_vcpu(&cx, &m, tdr, Lp(0)).await;
        m.tdh_mr_finalize(&cx, tdr).await.unwrap();
        assert_eq!(
            st(m.tdh_vp_enter(&cx, Lp(1), late, 0).await),
            VCPU_STATE_INCORRECT | VCPU_UNINITIALIZED
        );
    });
}

/// VP.ENTER gate step 2: after VPFLUSHDONE the TD is BLOCKED: TD_KEYS_NOT_CONFIGURED.
#[test]
fn vp_enter_after_vpflushdone() {
    let mut b = bench(1);
    b.run(|cx, m| async move {
        let td = runnable_td(&cx, &m, 1).await;
        let v = &td.vcpus[0];
        m.tdh_vp_flush(&cx, v.lp, v.tdvpr).await.unwrap();
        m.tdh_mng_vpflushdone(&cx, td.tdr).await.unwrap();
        assert_eq!(
            st(m.tdh_vp_enter(&cx, v.lp, v.tdvpr, 0).await),
            TD_KEYS_NOT_CONFIGURED
        );
        assert!(m.state().locks.none_held());
    });
}

// =============================================================================================
// TDH.MR.EXTEND / TDH.MR.FINALIZE (tdh_mr_extend.c, tdh_mr_finalize.c)
// =============================================================================================

/// PAGE.ADD a page with source contents and return (TD, page gpa).
async fn td_with_added_page(cx: &Ctx, m: &TdxModule) -> (BuiltTd, Gpa) {
    let td = build_td(cx, m, HKID, 1).await;
    let g = gpa(0x10);
    link_path(cx, m, td.tdr, g).await;
    let src = alloc(m, KernelUse::Other);
    m.host().borrow_mut().write(src, 0x5eed);
    let p = alloc_guest(m, g);
    m.tdh_mem_page_add(cx, td.tdr, g, p, src)
        .await
        .expect("PAGE.ADD");
    (td, g)
}

/// MR.EXTEND success on a MAPPED page: MRTD changes.
#[test]
fn mr_extend_success() {
    let mut b = bench(1);
    b.run(|cx, m| async move {
        let (td, g) = td_with_added_page(&cx, &m).await;
        let before = m.state().tds[&td.tdr].mrtd;
        assert_eq!(st(m.tdh_mr_extend(&cx, td.tdr, g).await), SUCCESS);
        assert_ne!(m.state().tds[&td.tdr].mrtd, before);
        // Each 256-byte chunk of the page can be extended.
        let chunk = Gpa::new(g.raw() + 0x100);
        assert_eq!(st(m.tdh_mr_extend(&cx, td.tdr, chunk).await), SUCCESS);
    });
}

/// MR.EXTEND: a walk that does not reach a leaf (no S-EPT path, or a FREE 4K entry) is
/// reported as EPT_ENTRY_NOT_PRESENT|RCX; a GPA not 256-byte aligned is OPERAND_INVALID|RCX.
#[test]
fn mr_extend_unmapped_gpa() {
    let mut b = bench(1);
    b.run(|cx, m| async move {
        let (td, g) = td_with_added_page(&cx, &m).await;
        // Same 2M table, FREE 4K entry.
        assert_eq!(
            st(m.tdh_mr_extend(&cx, td.tdr, gpa(0x11)).await),
            EPT_ENTRY_NOT_PRESENT | RCX
        );
        // No table at all below the root.
        assert_eq!(
            st(m.tdh_mr_extend(&cx, td.tdr, gpa(0x8_0000)).await),
            EPT_ENTRY_NOT_PRESENT | RCX
        );
        assert_eq!(
            st(m.tdh_mr_extend(&cx, td.tdr, Gpa::new(g.raw() + 0x80)).await),
            OPERAND_INVALID | RCX
        );
    });
}

/// MR.EXTEND op-state check (INITIALIZED only): after MR.FINALIZE,
/// OP_STATE_INCORRECT.
#[test]
fn mr_extend_after_finalize() {
    let mut b = bench(1);
    b.run(|cx, m| async move {
        let (td, g) = td_with_added_page(&cx, &m).await;
        m.tdh_mr_finalize(&cx, td.tdr).await.unwrap();
        assert_eq!(
            st(m.tdh_mr_extend(&cx, td.tdr, g).await),
            OP_STATE_INCORRECT
        );
    });
}

/// MR.FINALIZE success: op_state RUNNABLE.
#[test]
fn mr_finalize_success() {
    let mut b = bench(1);
    b.run(|cx, m| async move {
        let td = build_td(&cx, &m, HKID, 1).await;
        assert_eq!(st(m.tdh_mr_finalize(&cx, td.tdr).await), SUCCESS);
        assert_eq!(m.state().tds[&td.tdr].op_state, OpState::Runnable);
    });
}

/// MR.FINALIZE: num_vcpus == 0 (no VP.INIT yet, even with a created vCPU) gives NO_VCPUS.
#[test]
fn mr_finalize_without_vcpus() {
    let mut b = bench(1);
    b.run(|cx, m| async move {
        let tdr = initialized_td(&cx, &m, HKID, 4).await;
        assert_eq!(st(m.tdh_mr_finalize(&cx, tdr).await), NO_VCPUS);
        created_vcpu(&cx, &m, tdr).await;
        assert_eq!(st(m.tdh_mr_finalize(&cx, tdr).await), NO_VCPUS);
        assert_eq!(m.state().tds[&tdr].op_state, OpState::Initialized);
    });
}

/// MR.FINALIZE op-state check (INITIALIZED only): a second call finds RUNNABLE:
/// OP_STATE_INCORRECT; before MNG.INIT, OP_STATE_INCORRECT.
#[test]
fn mr_finalize_twice() {
    let mut b = bench(1);
    b.run(|cx, m| async move {
        let td = runnable_td(&cx, &m, 1).await;
        assert_eq!(st(m.tdh_mr_finalize(&cx, td.tdr).await), OP_STATE_INCORRECT);
        let tdr = create_keyed(&cx, &m, Hkid(33)).await;
        let n = m.state().config.tdcs_pages;
        add_tdcs(&cx, &m, tdr, n).await;
        assert_eq!(st(m.tdh_mr_finalize(&cx, tdr).await), OP_STATE_INCORRECT);
    });
}

// =============================================================================================
// TDH.MNG.VPFLUSHDONE (tdh_mng_vpflushdone.c)
// =============================================================================================

/// VPFLUSHDONE success once every vCPU is flushed: the TD is BLOCKED.
#[test]
fn vpflushdone_success() {
    let mut b = bench(1);
    b.run(|cx, m| async move {
        let td = runnable_td(&cx, &m, 2).await;
        for v in &td.vcpus {
            m.tdh_vp_flush(&cx, v.lp, v.tdvpr).await.unwrap();
        }
        assert_eq!(st(m.tdh_mng_vpflushdone(&cx, td.tdr).await), SUCCESS);
        assert_eq!(m.state().tds[&td.tdr].lifecycle, Lifecycle::Blocked);
    });
}

/// VPFLUSHDONE check 4: an initialised TD with num_assoc_vcpus != 0 gives FLUSHVP_NOT_DONE,
/// until the last vCPU is flushed.
#[test]
fn vpflushdone_flushvp_not_done() {
    let mut b = bench(1);
    b.run(|cx, m| async move {
        let td = runnable_td(&cx, &m, 2).await;
        assert_eq!(
            st(m.tdh_mng_vpflushdone(&cx, td.tdr).await),
            FLUSHVP_NOT_DONE
        );
        m.tdh_vp_flush(&cx, Lp(0), td.vcpus[0].tdvpr).await.unwrap();
        assert_eq!(
            st(m.tdh_mng_vpflushdone(&cx, td.tdr).await),
            FLUSHVP_NOT_DONE
        );
        assert_eq!(m.state().tds[&td.tdr].lifecycle, Lifecycle::KeysConfigured);
        m.tdh_vp_flush(&cx, Lp(1), td.vcpus[1].tdvpr).await.unwrap();
        assert_eq!(st(m.tdh_mng_vpflushdone(&cx, td.tdr).await), SUCCESS);
    });
}

/// VPFLUSHDONE check 3: BLOCKED is neither KEYS_CONFIGURED nor HKID_ASSIGNED, so a second
/// call gives LIFECYCLE_STATE_INCORRECT.
#[test]
fn vpflushdone_twice() {
    let mut b = bench(1);
    b.run(|cx, m| async move {
        let td = build_td(&cx, &m, HKID, 0).await;
        m.tdh_mng_vpflushdone(&cx, td.tdr).await.unwrap();
        assert_eq!(
            st(m.tdh_mng_vpflushdone(&cx, td.tdr).await),
            LIFECYCLE_STATE_INCORRECT
        );
    });
}

/// VPFLUSHDONE check 1: a running vCPU holds the TDR shared; the exclusive TDR lock fails:
/// BUSY|RCX.
#[test]
fn vpflushdone_while_a_vcpu_runs() {
    let mut b = bench(1);
    b.run(|cx, m| async move {
        let td = runnable_td(&cx, &m, 1).await;
        let v = &td.vcpus[0];
        m.tdh_vp_enter(&cx, v.lp, v.tdvpr, 0).await.unwrap();
        assert_eq!(
            st(m.tdh_mng_vpflushdone(&cx, td.tdr).await),
            OPERAND_BUSY | RCX
        );
        m.td_exit(v.tdvpr, 0);
    });
}

/// VPFLUSHDONE check 4 applies only to an initialised TD with all TDCS pages: a TD whose
/// build stopped before MNG.INIT (or before KEY.CONFIG) is released directly.
#[test]
fn vpflushdone_of_a_partly_built_td() {
    let mut b = bench(2);
    b.run(|cx, m| async move {
        let n = m.state().config.tdcs_pages;
        let a = create_keyed(&cx, &m, HKID).await;
        add_tdcs(&cx, &m, a, n).await;
        assert_eq!(st(m.tdh_mng_vpflushdone(&cx, a).await), SUCCESS);
        let c = alloc(&m, KernelUse::Tdr);
        m.tdh_mng_create(&cx, c, Hkid(33)).await.unwrap();
        m.tdh_mng_key_config(&cx, Lp(0), c).await.unwrap();
        assert_eq!(st(m.tdh_mng_vpflushdone(&cx, c).await), SUCCESS);
        assert_eq!(m.state().tds[&c].lifecycle, Lifecycle::Blocked);
    });
}

// =============================================================================================
// TDH.PHYMEM.CACHE.WB (tdh_phymem_cache_wb.c) and TDH.MNG.KEY.FREEID (tdh_mng_key_freeid.c)
// =============================================================================================

/// CACHE.WB success: START on a package with a FLUSHED HKID writes everything back.
#[test]
fn cache_wb_success() {
    let mut b = bench(1);
    b.run(|cx, m| async move {
        let td = build_td(&cx, &m, HKID, 0).await;
        m.tdh_mng_vpflushdone(&cx, td.tdr).await.unwrap();
        assert_eq!(
            st(m.tdh_phymem_cache_wb(&cx, Lp(0), CacheWbCmd::Start).await),
            SUCCESS
        );
        assert_eq!(st(m.tdh_mng_key_freeid(&cx, td.tdr).await), SUCCESS);
    });
}

/// CACHE.WB START check 4: no FLUSHED HKID gives the success-class
/// NO_HKID_READY_TO_WBCACHE.
#[test]
fn cache_wb_nothing_to_write_back() {
    let mut b = bench(1);
    b.run(|cx, m| async move {
        let e = m
            .tdh_phymem_cache_wb(&cx, Lp(0), CacheWbCmd::Start)
            .await
            .unwrap_err();
        assert_eq!(e.status.raw(), NO_HKID_READY_TO_WBCACHE);
        assert!(!e.status.is_error());
        // An assigned (not yet flushed) HKID is not ready either.
        build_td(&cx, &m, HKID, 0).await;
        assert_eq!(
            st(m.tdh_phymem_cache_wb(&cx, Lp(0), CacheWbCmd::Start).await),
            NO_HKID_READY_TO_WBCACHE
        );
    });
}

/// CACHE.WB RESUME check 5: intr_point == 0 (nothing interrupted: never started, or the last
/// run completed) gives WBCACHE_RESUME_ERROR.
#[test]
fn cache_wb_resume_without_interrupted_run() {
    let mut b = bench(1);
    b.run(|cx, m| async move {
        assert_eq!(
            st(m.tdh_phymem_cache_wb(&cx, Lp(0), CacheWbCmd::Resume).await),
            WBCACHE_RESUME_ERROR
        );
        let td = build_td(&cx, &m, HKID, 0).await;
        m.tdh_mng_vpflushdone(&cx, td.tdr).await.unwrap();
        assert_eq!(
            st(m.tdh_phymem_cache_wb(&cx, Lp(0), CacheWbCmd::Resume).await),
            WBCACHE_RESUME_ERROR
        );
        m.tdh_phymem_cache_wb(&cx, Lp(0), CacheWbCmd::Start)
            .await
            .unwrap();
        assert_eq!(
            st(m.tdh_phymem_cache_wb(&cx, Lp(0), CacheWbCmd::Resume).await),
            WBCACHE_RESUME_ERROR
        );
    });
}

/// CACHE.WB loop: a pending host interrupt stops it with INTERRUPTED_RESUMABLE and the
/// bitmaps unchanged (KEY.FREEID still sees WBCACHE_NOT_COMPLETE); RESUME continues (and may
/// be interrupted again) until SUCCESS.
#[test]
fn cache_wb_interrupted_and_resumed() {
    let mut b = bench(1);
    b.run(|cx, m| async move {
        let td = build_td(&cx, &m, HKID, 0).await;
        m.tdh_mng_vpflushdone(&cx, td.tdr).await.unwrap();
        m.inject(|i| i.cache_wb_interrupts = 2);
        assert_eq!(
            st(m.tdh_phymem_cache_wb(&cx, Lp(0), CacheWbCmd::Start).await),
            INTERRUPTED_RESUMABLE
        );
        assert_eq!(
            st(m.tdh_mng_key_freeid(&cx, td.tdr).await),
            WBCACHE_NOT_COMPLETE
        );
        assert_eq!(
            st(m.tdh_phymem_cache_wb(&cx, Lp(0), CacheWbCmd::Resume).await),
            INTERRUPTED_RESUMABLE
        );
        assert_eq!(
            st(m.tdh_phymem_cache_wb(&cx, Lp(0), CacheWbCmd::Resume).await),
            SUCCESS
        );
        assert_eq!(st(m.tdh_mng_key_freeid(&cx, td.tdr).await), SUCCESS);
    });
}

/// CACHE.WB RESUME works on the snapshot START took: an HKID flushed after START is not
/// written back by the resumed run.
#[test]
fn cache_wb_resume_keeps_the_start_snapshot() {
    let mut b = bench(1);
    b.run(|cx, m| async move {
        let a = build_td(&cx, &m, HKID, 0).await;
        let c = build_td(&cx, &m, Hkid(33), 0).await;
        m.tdh_mng_vpflushdone(&cx, a.tdr).await.unwrap();
        m.inject(|i| i.cache_wb_interrupts = 1);
        assert_eq!(
            st(m.tdh_phymem_cache_wb(&cx, Lp(0), CacheWbCmd::Start).await),
            INTERRUPTED_RESUMABLE
        );
        m.tdh_mng_vpflushdone(&cx, c.tdr).await.unwrap();
        m.tdh_phymem_cache_wb(&cx, Lp(0), CacheWbCmd::Resume)
            .await
            .unwrap();
        assert_eq!(st(m.tdh_mng_key_freeid(&cx, a.tdr).await), SUCCESS);
        assert_eq!(
            st(m.tdh_mng_key_freeid(&cx, c.tdr).await),
            WBCACHE_NOT_COMPLETE
        );
        m.tdh_phymem_cache_wb(&cx, Lp(0), CacheWbCmd::Start)
            .await
            .unwrap();
        assert_eq!(st(m.tdh_mng_key_freeid(&cx, c.tdr).await), SUCCESS);
    });
}

/// KEY.FREEID success: the TD enters TEARDOWN.
#[test]
fn key_freeid_success() {
    let mut b = bench(2);
    b.run(|cx, m| async move {
        let td = runnable_td(&cx, &m, 1).await;
        m.tdh_vp_flush(&cx, Lp(0), td.vcpus[0].tdvpr).await.unwrap();
        m.tdh_mng_vpflushdone(&cx, td.tdr).await.unwrap();
        cache_wb_all(&cx, &m).await;
        assert_eq!(st(m.tdh_mng_key_freeid(&cx, td.tdr).await), SUCCESS);
        assert_eq!(m.state().tds[&td.tdr].lifecycle, Lifecycle::Teardown);
    });
}

/// KEY.FREEID check 4: a package that has not completed CACHE.WB leaves its bit in
/// KOT.wbinvd_bitmap: WBCACHE_NOT_COMPLETE.
#[test]
fn key_freeid_before_cache_wb_on_every_package() {
    let mut b = bench(2);
    b.run(|cx, m| async move {
        let td = build_td(&cx, &m, HKID, 0).await;
        m.tdh_mng_vpflushdone(&cx, td.tdr).await.unwrap();
        assert_eq!(
            st(m.tdh_mng_key_freeid(&cx, td.tdr).await),
            WBCACHE_NOT_COMPLETE
        );
        m.tdh_phymem_cache_wb(&cx, Lp(0), CacheWbCmd::Start)
            .await
            .unwrap();
        assert_eq!(
            st(m.tdh_mng_key_freeid(&cx, td.tdr).await),
            WBCACHE_NOT_COMPLETE
        );
        // LP 3 is in package 1.
        m.tdh_phymem_cache_wb(&cx, Lp(3), CacheWbCmd::Start)
            .await
            .unwrap();
        assert_eq!(st(m.tdh_mng_key_freeid(&cx, td.tdr).await), SUCCESS);
    });
}

/// KEY.FREEID check 2: lifecycle != BLOCKED gives LIFECYCLE_STATE_INCORRECT, both before
/// VPFLUSHDONE and on a repeat (TEARDOWN).
#[test]
fn key_freeid_wrong_lifecycle() {
    let mut b = bench(1);
    b.run(|cx, m| async move {
        let td = build_td(&cx, &m, HKID, 0).await;
        assert_eq!(
            st(m.tdh_mng_key_freeid(&cx, td.tdr).await),
            LIFECYCLE_STATE_INCORRECT
        );
        m.tdh_mng_vpflushdone(&cx, td.tdr).await.unwrap();
        cache_wb_all(&cx, &m).await;
        m.tdh_mng_key_freeid(&cx, td.tdr).await.unwrap();
        assert_eq!(
            st(m.tdh_mng_key_freeid(&cx, td.tdr).await),
            LIFECYCLE_STATE_INCORRECT
        );
    });
}

// =============================================================================================
// TDH.PHYMEM.PAGE.RECLAIM (tdh_phymem_page_reclaim.c) and TDH.PHYMEM.PAGE.WBINVD
// =============================================================================================

/// RECLAIM steps 7 and 8: the owner TD (or the TDR itself) must be in TEARDOWN; before
/// KEY.FREEID every page gives LIFECYCLE_STATE_INCORRECT.
#[test]
fn reclaim_before_teardown() {
    let mut b = bench(1);
    b.run(|cx, m| async move {
        let td = build_td(&cx, &m, HKID, 1).await;
        let pages = [td.tdr, td.tdcs[0], td.vcpus[0].tdvpr, td.vcpus[0].tdcx[0]];
        for p in pages {
            assert_eq!(
                st(m.tdh_phymem_page_reclaim(&cx, p).await),
                LIFECYCLE_STATE_INCORRECT,
                "{p}"
            );
        }
        m.tdh_vp_flush(&cx, Lp(0), td.vcpus[0].tdvpr).await.unwrap();
        m.tdh_mng_vpflushdone(&cx, td.tdr).await.unwrap();
        // BLOCKED is not TEARDOWN either.
        for p in pages {
            assert_eq!(
                st(m.tdh_phymem_page_reclaim(&cx, p).await),
                LIFECYCLE_STATE_INCORRECT,
                "{p}"
            );
        }
        assert!(m.state().locks.none_held());
    });
}

/// RECLAIM step 8: the TDR with chldcnt != 0 gives TD_ASSOCIATED_PAGES_EXIST until the last
/// child is reclaimed.
#[test]
fn reclaim_tdr_with_children() {
    let mut b = bench(1);
    b.run(|cx, m| async move {
        let td = build_td(&cx, &m, HKID, 0).await;
        release_hkid(&cx, &m, &td).await;
        let (last, rest) = td.tdcs.split_last().unwrap();
        for &p in rest {
            m.tdh_phymem_page_reclaim(&cx, p).await.unwrap();
            assert_eq!(
                st(m.tdh_phymem_page_reclaim(&cx, td.tdr).await),
                TD_ASSOCIATED_PAGES_EXIST
            );
        }
        m.tdh_phymem_page_reclaim(&cx, *last).await.unwrap();
        assert_eq!(m.state().tds[&td.tdr].chldcnt, 0);
        assert_eq!(st(m.tdh_phymem_page_reclaim(&cx, td.tdr).await), SUCCESS);
    });
}

/// RECLAIM step 4: a PT_NDA page (never donated, or already reclaimed) gives
/// PAGE_METADATA_INCORRECT|RCX; step 2: a page outside the TDMRs gives
/// OPERAND_ADDR_RANGE_ERROR|RCX.
#[test]
fn reclaim_nda_page() {
    let mut b = bench(1);
    b.run(|cx, m| async move {
        let td = build_td(&cx, &m, HKID, 0).await;
        let free = alloc(&m, KernelUse::Other);
        assert_eq!(
            st(m.tdh_phymem_page_reclaim(&cx, free).await),
            PAGE_METADATA_INCORRECT | RCX
        );
        release_hkid(&cx, &m, &td).await;
        m.tdh_phymem_page_reclaim(&cx, td.tdcs[0]).await.unwrap();
        assert_eq!(
            st(m.tdh_phymem_page_reclaim(&cx, td.tdcs[0]).await),
            PAGE_METADATA_INCORRECT | RCX
        );
        assert_eq!(
            st(m.tdh_phymem_page_reclaim(&cx, outside_tdmr()).await),
            OPERAND_ADDR_RANGE_ERROR | RCX
        );
    });
}

/// RECLAIM outputs: RCX = page type, RDX = owner TDR (none for the TDR), R8 = level, for
/// every kind of page a TD owns; the page is PT_NDA afterwards.
#[test]
fn reclaim_outputs_type_and_owner() {
    let mut b = bench(1);
    b.run(|cx, m| async move {
        let td = runnable_td(&cx, &m, 1).await;
        let tdr = td.tdr;
        let g = gpa(0x20);
        let sept = link_path(&cx, &m, tdr, g).await;
        let guest = aug(&cx, &m, tdr, g).await.unwrap();
        release_hkid(&cx, &m, &td).await;
        let v = &td.vcpus[0];
        let expect = [
            (guest, PageType::Reg),
            (v.tdcx[0], PageType::Tdcx),
            (v.tdvpr, PageType::Tdvpr),
            (sept[2], PageType::Ept),
            (td.tdcs[0], PageType::Tdcx),
        ];
        for (p, pt) in expect {
            let info = m.tdh_phymem_page_reclaim(&cx, p).await.unwrap();
            assert_eq!(
                info,
                ReclaimInfo {
                    page_type: pt,
                    owner: Some(tdr),
                    level: PgLevel::L4K,
                },
                "{p}"
            );
            assert_eq!(m.state().pamt.get(p).pt, PageType::Nda);
        }
        for &p in v.tdcx[1..].iter().chain(&sept[..2]).chain(&td.tdcs[1..]) {
            m.tdh_phymem_page_reclaim(&cx, p).await.unwrap();
        }
        let info = m.tdh_phymem_page_reclaim(&cx, tdr).await.unwrap();
        assert_eq!(
            info,
            ReclaimInfo {
                page_type: PageType::Tdr,
                owner: None,
                level: PgLevel::L4K,
            }
        );
        assert!(m.state().pamt.iter().next().is_none());
    });
}

/// PAGE.WBINVD success on a reclaimed (PT_NDA) page: its lines under the given key are no
/// longer dirty.
#[test]
fn page_wbinvd_success() {
    let mut b = bench(1);
    b.run(|cx, m| async move {
        let td = build_td(&cx, &m, HKID, 0).await;
        release_hkid(&cx, &m, &td).await;
        for &p in &td.tdcs {
            m.tdh_phymem_page_reclaim(&cx, p).await.unwrap();
        }
        m.tdh_phymem_page_reclaim(&cx, td.tdr).await.unwrap();
        assert_eq!(
            m.host().borrow().ledger.get(td.tdr).unwrap().dirty_key,
            Some(CacheKey::Global)
        );
        assert_eq!(
            st(m.tdh_phymem_page_wbinvd(&cx, td.tdr, CacheKey::Global)
                .await),
            SUCCESS
        );
        assert_eq!(
            m.host().borrow().ledger.get(td.tdr).unwrap().dirty_key,
            None
        );
    });
}

/// PAGE.WBINVD step 2: a page still assigned (not PT_NDA) gives PAGE_METADATA_INCORRECT|RCX;
/// outside the TDMRs, OPERAND_ADDR_RANGE_ERROR|RCX.
#[test]
fn page_wbinvd_of_an_assigned_page() {
    let mut b = bench(1);
    b.run(|cx, m| async move {
        let td = build_td(&cx, &m, HKID, 0).await;
        assert_eq!(
            st(
                m.tdh_phymem_page_wbinvd(&cx, td.tdcs[0], CacheKey::Td(HKID))
                    .await
            ),
            PAGE_METADATA_INCORRECT | RCX
        );
        assert_eq!(
            st(m.tdh_phymem_page_wbinvd(&cx, td.tdr, CacheKey::Global)
                .await),
            PAGE_METADATA_INCORRECT | RCX
        );
        assert_eq!(
            st(
                m.tdh_phymem_page_wbinvd(&cx, outside_tdmr(), CacheKey::Global)
                    .await
            ),
            OPERAND_ADDR_RANGE_ERROR | RCX
        );
    });
}

// =============================================================================================
// Teardown (the upstream order: tdx_mmu_release_hkid, tdx_reclaim_td_control_pages)
// =============================================================================================

/// The upstream teardown order (VP.FLUSH, VPFLUSHDONE, CACHE.WB, KEY.FREEID, RECLAIM children,
/// RECLAIM + WBINVD the TDR) hands every page back: nothing unaccounted, no refused move.
#[test]
fn teardown_returns_every_page() {
    let mut b = bench(2);
    let before = b.host.borrow().ledger.census();
    b.run(|cx, m| async move {
        let td = runnable_td(&cx, &m, 2).await;
        let mut sept = link_path(&cx, &m, td.tdr, gpa(0x30)).await;
        sept.extend(link_path(&cx, &m, td.tdr, gpa(0x40_0000)).await);
        aug(&cx, &m, td.tdr, gpa(0x30)).await.unwrap();
        aug(&cx, &m, td.tdr, gpa(0x40_0000)).await.unwrap();
        let v = td.vcpus[0].tdvpr;
        m.tdh_vp_enter(&cx, Lp(0), v, 0).await.unwrap();
        m.tdg_mem_page_accept(&cx, v, gpa(0x30), PgLevel::L4K)
            .await
            .unwrap();
        m.td_exit(v, 0);
        remove_4k(&cx, &m, td.tdr, gpa(0x30)).await.unwrap();
        remove_4k(&cx, &m, td.tdr, gpa(0x40_0000)).await.unwrap();
        teardown(&cx, &m, &td, &sept).await;
        let s = m.state();
        assert!(s.tds.is_empty());
        assert!(s.vcpus.is_empty());
        assert!(s.pamt.iter().next().is_none());
        assert!(s.locks.none_held());
    });
    let h = b.host.borrow();
    assert!(h.refused.is_empty(), "{:?}", h.refused);
    assert!(
        h.ledger.unaccounted().is_empty(),
        "{:?}",
        h.ledger.unaccounted()
    );
    assert_eq!(h.ledger.census(), before);
}

/// Reclaiming the TDR first is refused: LIFECYCLE_STATE_INCORRECT before KEY.FREEID,
/// TD_ASSOCIATED_PAGES_EXIST after it while children remain; the teardown then completes and
/// every page is accounted for.
#[test]
fn teardown_refuses_the_tdr_first() {
    let mut b = bench(1);
    b.run(|cx, m| async move {
        let td = runnable_td(&cx, &m, 1).await;
        assert_eq!(
            st(m.tdh_phymem_page_reclaim(&cx, td.tdr).await),
            LIFECYCLE_STATE_INCORRECT
        );
        release_hkid(&cx, &m, &td).await;
        assert_eq!(
            st(m.tdh_phymem_page_reclaim(&cx, td.tdr).await),
            TD_ASSOCIATED_PAGES_EXIST
        );
        let v = &td.vcpus[0];
        for &p in v.tdcx.iter().chain([&v.tdvpr]).chain(&td.tdcs) {
            m.tdh_phymem_page_reclaim(&cx, p).await.unwrap();
            let mut h = m.host().borrow_mut();
            h.ledger.clear(p).unwrap();
            h.ledger.free(p).unwrap();
        }
        m.tdh_phymem_page_reclaim(&cx, td.tdr).await.unwrap();
        m.tdh_phymem_page_wbinvd(&cx, td.tdr, CacheKey::Global)
            .await
            .unwrap();
        let mut h = m.host().borrow_mut();
        h.ledger.clear(td.tdr).unwrap();
        h.ledger.free(td.tdr).unwrap();
    });
    let h = b.host.borrow();
    assert!(h.refused.is_empty(), "{:?}", h.refused);
    assert!(h.ledger.unaccounted().is_empty());
}

// =============================================================================================
// TDG.MEM.PAGE.ACCEPT (tdg_mem_page_accept.c)
// =============================================================================================

/// A runnable TD with one vCPU inside the guest; returns (tdr, tdvpr).
async fn running(cx: &Ctx, m: &TdxModule) -> (Pfn, Pfn) {
    let td = runnable_td(cx, m, 1).await;
    let v = td.vcpus[0].tdvpr;
    assert_eq!(
        m.tdh_vp_enter(cx, Lp(0), v, 0).await,
        Ok(EnterOutcome::Entered)
    );
    (td.tdr, v)
}

/// The guest exits (EPT violation or timeout) and is entered again.
async fn exit_and_reenter(cx: &Ctx, m: &TdxModule, v: Pfn) {
    m.td_exit(v, 0);
    m.tdh_vp_enter(cx, Lp(0), v, 0).await.unwrap();
}

/// ACCEPT success (4K): PENDING becomes MAPPED and the page is zeroed.
#[test]
fn accept_success() {
    let mut b = bench(1);
    b.run(|cx, m| async move {
        let (tdr, v) = running(&cx, &m).await;
        let p = aug(&cx, &m, tdr, gpa(0x50)).await.unwrap();
        m.host().borrow_mut().write(p, 0xdead);
        let r = m.tdg_mem_page_accept(&cx, v, gpa(0x50), PgLevel::L4K).await;
        assert_eq!(tst(r), SUCCESS);
        assert_eq!(
            m.state().tds[&tdr]
                .sept
                .state(PgLevel::L4K, gpa(0x50).gfn()),
            SeptState::Mapped
        );
        assert_eq!(m.host().borrow().read(p), 0);
        assert_eq!(
            m.guest_private_access(v, gpa(0x50), 0),
            AccessResult::Mapped(p)
        );
    });
}

/// ACCEPT steps 1-2: a level above 2M, a GPA not aligned to the level, or a shared GPA gives
/// OPERAND_INVALID|RCX.
#[test]
fn accept_operand_invalid() {
    let mut b = bench(1);
    b.run(|cx, m| async move {
        let (tdr, v) = running(&cx, &m).await;
        aug(&cx, &m, tdr, gpa(0x50)).await.unwrap();
        for (g, level) in [
            (gpa(0), PgLevel::L1G),
            (gpa(0x201), PgLevel::L2M),
            (gpa(0x50).to_shared(), PgLevel::L4K),
            (Gpa::new(1 << 48), PgLevel::L4K),
        ] {
            assert_eq!(
                tst(m.tdg_mem_page_accept(&cx, v, g, level).await),
                OPERAND_INVALID | RCX,
                "{g} {level}"
            );
        }
    });
}

/// ACCEPT step 6: an entry already MAPPED gives PAGE_ALREADY_ACCEPTED with the entry's level
/// (4K = 0) as detail; it is a warning, not an error.
#[test]
fn accept_already_accepted() {
    let mut b = bench(1);
    b.run(|cx, m| async move {
        let (tdr, v) = running(&cx, &m).await;
        aug(&cx, &m, tdr, gpa(0x50)).await.unwrap();
        let r = m.tdg_mem_page_accept(&cx, v, gpa(0x50), PgLevel::L4K).await;
        assert_eq!(tst(r), SUCCESS);
        let r = m
            .tdg_mem_page_accept(&cx, v, gpa(0x50), PgLevel::L4K)
            .await
            .unwrap();
        assert_eq!(r.status.raw(), PAGE_ALREADY_ACCEPTED | LVL_4K);
        assert!(!r.status.is_error());
    });
}

/// ACCEPT at 2M: a 4K accept inside a PENDING 2M leaf is an EPT-violation exit (EEQ ACCEPT,
/// for the host to demote); the 2M accept succeeds; then a 4K accept inside the MAPPED 2M leaf
/// (walk stops above the request) and a second 2M accept give PAGE_ALREADY_ACCEPTED with
/// level 2M (1) as detail.
#[test]
fn accept_2m_and_already_accepted_level() {
    let mut b = bench(1);
    b.run(|cx, m| async move {
        let (tdr, v) = running(&cx, &m).await;
        let base = gpa(0x200);
        link_above(&cx, &m, tdr, base, PgLevel::L2M).await;
        let p = alloc_guest_2m(&m, base);
        m.tdh_mem_page_aug(&cx, tdr, base, PgLevel::L2M, p)
            .await
            .unwrap();
        let inner = gpa(0x201);
        assert_eq!(
            m.tdg_mem_page_accept(&cx, v, inner, PgLevel::L4K).await,
            Err(GuestExit::EptViolation {
                gpa: inner,
                eeq: Eeq::Accept
            })
        );
        exit_and_reenter(&cx, &m, v).await;
        assert_eq!(
            tst(m.tdg_mem_page_accept(&cx, v, base, PgLevel::L2M).await),
            SUCCESS
        );
        assert_eq!(
            m.state().tds[&tdr].sept.state(PgLevel::L2M, base.gfn()),
            SeptState::Mapped
        );
        for (g, level) in [(inner, PgLevel::L4K), (base, PgLevel::L2M)] {
            let r = m.tdg_mem_page_accept(&cx, v, g, level).await.unwrap();
            assert_eq!(
                r.status.raw(),
                PAGE_ALREADY_ACCEPTED | LVL_2M,
                "{g} {level}"
            );
            assert!(!r.status.is_error());
        }
    });
}

/// ACCEPT step 5: a 2M accept where a 4K page table hangs below (non-leaf, not FREE) gives
/// PAGE_SIZE_MISMATCH with the level (2M = 1) as detail.
#[test]
fn accept_2m_over_a_4k_table() {
    let mut b = bench(1);
    b.run(|cx, m| async move {
        let (tdr, v) = running(&cx, &m).await;
        aug(&cx, &m, tdr, gpa(0x400)).await.unwrap();
        assert_eq!(
            tst(m
                .tdg_mem_page_accept(&cx, v, gpa(0x400), PgLevel::L2M)
                .await),
            PAGE_SIZE_MISMATCH | LVL_2M
        );
        // The 4K page below is untouched.
        assert_eq!(
            m.state().tds[&tdr]
                .sept
                .state(PgLevel::L4K, gpa(0x400).gfn()),
            SeptState::Pending
        );
    });
}

/// ACCEPT steps 3 and 7: a FREE entry (in a linked table, or a walk that stops at a missing
/// table) is an EPT-violation TD exit with EEQ type ACCEPT; nothing changes.
#[test]
fn accept_of_a_free_entry_exits() {
    let mut b = bench(1);
    b.run(|cx, m| async move {
        let (tdr, v) = running(&cx, &m).await;
        link_path(&cx, &m, tdr, gpa(0x60)).await;
        for g in [gpa(0x60), gpa(0x10_0000)] {
            assert_eq!(
                m.tdg_mem_page_accept(&cx, v, g, PgLevel::L4K).await,
                Err(GuestExit::EptViolation {
                    gpa: g,
                    eeq: Eeq::Accept
                })
            );
            exit_and_reenter(&cx, &m, v).await;
        }
        assert!(m.state().tds[&tdr]
            .sept
            .iter()
            .all(|(_, _, e)| e.state == SeptState::NlMapped));
    });
}

/// Host priority on the S-EPT entry lock: a host that lost the entry to the guest sets HP;
/// the guest's next acquire fails with BUSY_HOST_PRIORITY, which the TDCALL epilogue reports
/// as plain BUSY|RCX; repeated failures end in a HOST_PRIORITY_BUSY_TIMEOUT TD exit. The
/// host's retry then succeeds and clears HP.
#[test]
fn accept_host_priority_busy_and_timeout() {
    let limit = 4;
    let mut b = Bench::new(
        ModuleConfig {
            hp_lock_timeout_attempts: limit,
            ..ModuleConfig::default()
        },
        NPAGES,
    );
    let x = gpa(0x70);
    let out: Slot<(Pfn, Pfn)> = Rc::new(RefCell::new(None));
    let o = out.clone();
    b.run(move |cx, m| async move {
        let (tdr, v) = running(&cx, &m).await;
        aug(&cx, &m, tdr, x).await.unwrap();
        *o.borrow_mut() = Some((tdr, v));
    });
    let (tdr, v) = out.borrow_mut().take().unwrap();
    let (m1, c1, m2, c2) = (b.m.clone(), b.cx.clone(), b.m.clone(), b.cx.clone());
    // ATTR.RD holds the entry lock (guest side) in its window; BLOCK on it loses.
    let r = race(
        &mut b,
        window_name(Leaf::TdgMemPageAttrRd),
        async move {
            let r = m1.tdg_mem_page_attr_rd(&c1, v, x).await.unwrap();
            assert_eq!(r.status.raw(), SUCCESS);
        },
        async move { st(m2.tdh_mem_range_block(&c2, tdr, x, PgLevel::L4K).await) },
    );
    assert_eq!(r, OPERAND_BUSY | RCX, "BLOCK vs guest ATTR.RD");
    b.run(move |cx, m| async move {
        // The guest keeps losing to the flagged host: plain BUSY|RCX, then the timeout exit.
        let mut timed_out_at = None;
        for i in 1..=limit + 1 {
            match m.tdg_mem_page_accept(&cx, v, x, PgLevel::L4K).await {
                Ok(r) => assert_eq!(r.status.raw(), OPERAND_BUSY | RCX, "attempt {i}"),
                Err(GuestExit::HostPriorityBusyTimeout) => {
                    timed_out_at = Some(i);
                    break;
                }
                Err(e) => panic!("attempt {i}: {e:?}"),
            }
        }
        let n = timed_out_at.expect("HOST_PRIORITY_BUSY_TIMEOUT");
        assert!(n > 1, "the first BUSY_HOST_PRIORITY only arms the timer");
        exit_and_reenter(&cx, &m, v).await;
        // The timer restarts after the exit.
        assert_eq!(
            tst(m.tdg_mem_page_accept(&cx, v, x, PgLevel::L4K).await),
            OPERAND_BUSY | RCX
        );
        // The host's retry gets through (clearing HP); the entry is PENDING_BLOCKED, which
        // ACCEPT does not allow: an EPT-violation exit, no longer BUSY.
        assert_eq!(
            st(m.tdh_mem_range_block(&cx, tdr, x, PgLevel::L4K).await),
            SUCCESS
        );
        assert_eq!(
            m.tdg_mem_page_accept(&cx, v, x, PgLevel::L4K).await,
            Err(GuestExit::EptViolation {
                gpa: x,
                eeq: Eeq::Accept
            })
        );
        m.td_exit(v, 0);
    });
}

/// Who holds the entry lock of `x` in its window while a host leaf loses to it.
#[derive(Clone, Copy, Debug)]
enum EntryHolder {
    /// Guest ACCEPT of the PENDING page: commits by writing the entry.
    Accept,
    /// Guest ATTR.RD: reads only; the entry (and its HP bit) stays.
    AttrRd,
    /// Guest ATTR.WR with no L2 attributes: changes nothing.
    AttrWr,
    /// Host AUG of a FREE entry, lost to by a host PAGE.REMOVE: commits the new entry.
    HostAug,
}

/// Issue 17 item 4: the HOST_PRIORITY bit a losing host sets lives in the S-EPT entry, so a
/// leaf that then commits a new entry (ACCEPT, AUG, ...) clears it; a leaf that only reads or
/// releases the lock keeps it. The guest's next ATTR.RD on the entry shows which: SUCCESS, or
/// BUSY|RCX (BUSY_HOST_PRIORITY as the guest sees it). One row per holder.
#[test]
fn host_priority_survives_release_but_not_commit() {
    const ROWS: &[(EntryHolder, bool)] = &[
        (EntryHolder::Accept, false),
        (EntryHolder::AttrRd, true),
        (EntryHolder::AttrWr, true),
        (EntryHolder::HostAug, false),
    ];
    for &(holder, hp_survives) in ROWS {
        let mut b = bench(1);
        let x = gpa(0x70);
        let out: Slot<(Pfn, Pfn, Pfn)> = Rc::new(RefCell::new(None));
        let o = out.clone();
        b.run(move |cx, m| async move {
            let (tdr, v) = running(&cx, &m).await;
            link_path(&cx, &m, tdr, x).await;
            let page = alloc_guest(&m, x);
            if !matches!(holder, EntryHolder::HostAug) {
                m.tdh_mem_page_aug(&cx, tdr, x, PgLevel::L4K, page)
                    .await
                    .unwrap();
            }
            *o.borrow_mut() = Some((tdr, v, page));
        });
        let (tdr, v, page) = out.borrow_mut().take().unwrap();
        let (m1, c1, m2, c2) = (b.m.clone(), b.cx.clone(), b.m.clone(), b.cx.clone());
        let window = window_name(match holder {
            EntryHolder::Accept => Leaf::TdgMemPageAccept,
            EntryHolder::AttrRd => Leaf::TdgMemPageAttrRd,
            EntryHolder::AttrWr => Leaf::TdgMemPageAttrWr,
            EntryHolder::HostAug => Leaf::MemPageAug,
        });
        let lost = race(
            &mut b,
            window,
            async move {
                let ok = match holder {
                    EntryHolder::Accept => {
                        tst(m1.tdg_mem_page_accept(&c1, v, x, PgLevel::L4K).await)
                    }
                    EntryHolder::AttrRd => tst(m1.tdg_mem_page_attr_rd(&c1, v, x).await),
                    EntryHolder::AttrWr => {
                        tst(m1.tdg_mem_page_attr_wr(&c1, v, x, PgLevel::L4K, 0).await)
                    }
                    EntryHolder::HostAug => {
                        st(m1.tdh_mem_page_aug(&c1, tdr, x, PgLevel::L4K, page).await)
                    }
                };
                assert_eq!(ok, SUCCESS, "{holder:?}");
            },
            async move {
                match holder {
                    EntryHolder::HostAug => {
                        st(m2.tdh_mem_page_remove(&c2, tdr, x, PgLevel::L4K).await)
                    }
                    _ => st(m2.tdh_mem_range_block(&c2, tdr, x, PgLevel::L4K).await),
                }
            },
        );
        assert_eq!(lost, OPERAND_BUSY | RCX, "{holder:?}: the host loses");
        b.run(move |cx, m| async move {
            let after = tst(m.tdg_mem_page_attr_rd(&cx, v, x).await);
            let want = if hp_survives {
                OPERAND_BUSY | RCX
            } else {
                SUCCESS
            };
            assert_eq!(
                after, want,
                "{holder:?}: guest ATTR.RD after the holder is done"
            );
        });
    }
}

/// ACCEPT step 4, the other way round: a host SEAMCALL holding the entry lock makes the
/// guest's acquire fail with plain BUSY|RCX (no host priority involved).
#[test]
fn accept_busy_while_the_host_holds_the_entry() {
    let mut b = bench(1);
    let x = gpa(0x70);
    let out: Slot<(Pfn, Pfn)> = Rc::new(RefCell::new(None));
    let o = out.clone();
    b.run(move |cx, m| async move {
        let (tdr, v) = running(&cx, &m).await;
        aug(&cx, &m, tdr, x).await.unwrap();
        *o.borrow_mut() = Some((tdr, v));
    });
    let (tdr, v) = out.borrow_mut().take().unwrap();
    let (m1, c1, m2, c2) = (b.m.clone(), b.cx.clone(), b.m.clone(), b.cx.clone());
    let r = race(
        &mut b,
        window_name(Leaf::MemRangeBlock),
        async move {
            m1.tdh_mem_range_block(&c1, tdr, x, PgLevel::L4K)
                .await
                .unwrap();
        },
        async move { tst(m2.tdg_mem_page_accept(&c2, v, x, PgLevel::L4K).await) },
    );
    assert_eq!(r, OPERAND_BUSY | RCX, "guest ACCEPT vs host BLOCK");
    assert_eq!(b.m.state().vcpus[&v].hp_busy, 0);
}

// =============================================================================================
// TDG.MEM.PAGE.ATTR.RD / ATTR.WR (tdg_mem_page_attr_rd.c, tdg_mem_page_attr_wr.c)
// =============================================================================================

/// ATTR.RD success: the leaf's level and whether it is pending (4K PENDING, 4K MAPPED, 2M
/// MAPPED read through a 4K GPA inside it).
#[test]
fn attr_rd_success() {
    let mut b = bench(1);
    b.run(|cx, m| async move {
        let (tdr, v) = running(&cx, &m).await;
        aug(&cx, &m, tdr, gpa(0x80)).await.unwrap();
        let r = m.tdg_mem_page_attr_rd(&cx, v, gpa(0x80)).await.unwrap();
        assert_eq!(
            (r.status.raw(), r.level, r.pending),
            (SUCCESS, Some(PgLevel::L4K), true)
        );
        m.tdg_mem_page_accept(&cx, v, gpa(0x80), PgLevel::L4K)
            .await
            .unwrap();
        let r = m.tdg_mem_page_attr_rd(&cx, v, gpa(0x80)).await.unwrap();
        assert_eq!(
            (r.status.raw(), r.level, r.pending),
            (SUCCESS, Some(PgLevel::L4K), false)
        );
        let base = gpa(0x200);
        link_above(&cx, &m, tdr, base, PgLevel::L2M).await;
        let p = alloc_guest_2m(&m, base);
        m.tdh_mem_page_aug(&cx, tdr, base, PgLevel::L2M, p)
            .await
            .unwrap();
        m.tdg_mem_page_accept(&cx, v, base, PgLevel::L2M)
            .await
            .unwrap();
        let r = m.tdg_mem_page_attr_rd(&cx, v, gpa(0x3ff)).await.unwrap();
        assert_eq!(
            (r.status.raw(), r.level, r.pending),
            (SUCCESS, Some(PgLevel::L2M), false)
        );
    });
}

/// ATTR.RD step 1: a shared (or out-of-range) GPA gives OPERAND_INVALID|RCX.
#[test]
fn attr_rd_operand_invalid() {
    let mut b = bench(1);
    b.run(|cx, m| async move {
        let (tdr, v) = running(&cx, &m).await;
        aug(&cx, &m, tdr, gpa(0x80)).await.unwrap();
        for g in [gpa(0x80).to_shared(), Gpa::new(1 << 48)] {
            assert_eq!(
                tst(m.tdg_mem_page_attr_rd(&cx, v, g).await),
                OPERAND_INVALID | RCX,
                "{g}"
            );
        }
    });
}

/// ATTR.RD step 4: an entry whose state ATTR.RD does not allow (FREE, a missing table, a
/// BLOCKED page) is a plain EPT-violation exit (EEQ NONE).
#[test]
fn attr_rd_not_allowed_state_exits() {
    let mut b = bench(1);
    b.run(|cx, m| async move {
        let (tdr, v) = running(&cx, &m).await;
        aug(&cx, &m, tdr, gpa(0x80)).await.unwrap();
        m.tdg_mem_page_accept(&cx, v, gpa(0x80), PgLevel::L4K)
            .await
            .unwrap();
        m.tdh_mem_range_block(&cx, tdr, gpa(0x80), PgLevel::L4K)
            .await
            .unwrap();
        for g in [gpa(0x81), gpa(0x10_0000), gpa(0x80)] {
            assert_eq!(
                m.tdg_mem_page_attr_rd(&cx, v, g).await,
                Err(GuestExit::EptViolation {
                    gpa: g,
                    eeq: Eeq::None
                }),
                "{g}"
            );
            exit_and_reenter(&cx, &m, v).await;
        }
    });
}

/// ATTR.WR success with no L2 VMs: all-zero attributes on a MAPPED or PENDING leaf complete
/// with SUCCESS and change nothing.
#[test]
fn attr_wr_success() {
    let mut b = bench(1);
    b.run(|cx, m| async move {
        let (tdr, v) = running(&cx, &m).await;
        aug(&cx, &m, tdr, gpa(0x90)).await.unwrap();
        let r = m
            .tdg_mem_page_attr_wr(&cx, v, gpa(0x90), PgLevel::L4K, 0)
            .await
            .unwrap();
        assert_eq!((r.status.raw(), r.pending), (SUCCESS, true));
        m.tdg_mem_page_accept(&cx, v, gpa(0x90), PgLevel::L4K)
            .await
            .unwrap();
        let r = m
            .tdg_mem_page_attr_wr(&cx, v, gpa(0x90), PgLevel::L4K, 0)
            .await
            .unwrap();
        assert_eq!((r.status.raw(), r.pending), (SUCCESS, false));
        assert_eq!(
            m.state().tds[&tdr]
                .sept
                .state(PgLevel::L4K, gpa(0x90).gfn()),
            SeptState::Mapped
        );
    });
}

/// ATTR.WR step 1: a non-zero attribute slot for VM 0 or for an L2 VM the TD does not have
/// gives OPERAND_INVALID|RDX (checked before the page info); step 2: a bad level, misaligned
/// or shared GPA gives OPERAND_INVALID|RCX.
#[test]
fn attr_wr_operand_invalid() {
    let mut b = bench(1);
    b.run(|cx, m| async move {
        let (tdr, v) = running(&cx, &m).await;
        aug(&cx, &m, tdr, gpa(0x90)).await.unwrap();
        for attrs in [1u64, 1 << 16, 0x8000 << 48] {
            assert_eq!(
                tst(m
                    .tdg_mem_page_attr_wr(&cx, v, gpa(0x90), PgLevel::L4K, attrs)
                    .await),
                OPERAND_INVALID | RDX,
                "{attrs:#x}"
            );
        }
        assert_eq!(
            tst(m
                .tdg_mem_page_attr_wr(&cx, v, gpa(0x91).to_shared(), PgLevel::L4K, 1)
                .await),
            OPERAND_INVALID | RDX
        );
        for (g, level) in [
            (gpa(0x90).to_shared(), PgLevel::L4K),
            (gpa(0x201), PgLevel::L2M),
            (gpa(0), PgLevel::L512G),
        ] {
            assert_eq!(
                tst(m.tdg_mem_page_attr_wr(&cx, v, g, level, 0).await),
                OPERAND_INVALID | RCX,
                "{g} {level}"
            );
        }
    });
}

/// ATTR.WR steps 3 and 6: a walk that does not reach the requested level, or a FREE entry
/// (not allowed), is an EPT-violation exit with EEQ type ATTR_WR; step 5: a non-leaf entry at
/// the requested level gives PAGE_SIZE_MISMATCH with the level as detail.
#[test]
fn attr_wr_walk_failure_free_entry_and_size_mismatch() {
    let mut b = bench(1);
    b.run(|cx, m| async move {
        let (tdr, v) = running(&cx, &m).await;
        aug(&cx, &m, tdr, gpa(0x90)).await.unwrap();
        for g in [gpa(0x10_0000), gpa(0x91)] {
            assert_eq!(
                m.tdg_mem_page_attr_wr(&cx, v, g, PgLevel::L4K, 0).await,
                Err(GuestExit::EptViolation {
                    gpa: g,
                    eeq: Eeq::AttrWr
                }),
                "{g}"
            );
            exit_and_reenter(&cx, &m, v).await;
        }
        assert_eq!(
            tst(m
                .tdg_mem_page_attr_wr(&cx, v, gpa(0), PgLevel::L2M, 0)
                .await),
            PAGE_SIZE_MISMATCH | LVL_2M
        );
    });
}

// =============================================================================================
// Guest access to a private GPA (td_ept_violation.c)
// =============================================================================================

/// EPT violation on a private GPA: a PENDING page raises #VE when PENDING_VE_DISABLE is clear,
/// and exits with EEQ PENDING_EPT_VIOLATION when it is set; a FREE GPA exits with EEQ NONE; a
/// MAPPED page translates.
#[test]
fn guest_private_access_pending_free_and_mapped() {
    let mut b = bench(1);
    b.run(|cx, m| async move {
        let (tdr, v) = running(&cx, &m).await;
        let p = aug(&cx, &m, tdr, gpa(0xa0)).await.unwrap();
        link_path(&cx, &m, tdr, gpa(0xa1)).await;
        assert_eq!(
            m.guest_private_access(v, gpa(0xa0), 0),
            AccessResult::VirtualizationException
        );
        m.set_pending_ve_disable(tdr, true);
        assert_eq!(
            m.guest_private_access(v, gpa(0xa0), 0),
            AccessResult::Exit(GuestExit::EptViolation {
                gpa: gpa(0xa0),
                eeq: Eeq::PendingEptViolation
            })
        );
        exit_and_reenter(&cx, &m, v).await;
        assert_eq!(
            m.guest_private_access(v, gpa(0xa1), 0),
            AccessResult::Exit(GuestExit::EptViolation {
                gpa: gpa(0xa1),
                eeq: Eeq::None
            })
        );
        exit_and_reenter(&cx, &m, v).await;
        m.tdg_mem_page_accept(&cx, v, gpa(0xa0), PgLevel::L4K)
            .await
            .unwrap();
        assert_eq!(
            m.guest_private_access(v, gpa(0xa0), 0),
            AccessResult::Mapped(p)
        );
    });
}
