//! Building blocks for driving the module directly (tests, the module fuzz target): a bench
//! with an executor, host memory and a module, and the upstream build and teardown sequences
//! as plain SEAMCALL sequences (what KVM's tdx.c issues, without KVM).

use std::future::Future;
use std::rc::Rc;

use crate::addr::{Gpa, Pfn, PgLevel};
use crate::host::{AllocFor, CacheKey, HostRef, KernelUse};
use crate::ids::{GmemId, Hkid, PgOff};
use crate::sched::{Ctx, Executor, Outcome, RoundRobin, TraceMode};

use super::{CacheWbCmd, Code, Lp, ModuleConfig, SeamResult, SeptState, TdParams, TdxModule};

/// An executor, host memory and a module.
pub struct Bench {
    pub ex: Executor,
    pub cx: Ctx,
    pub host: HostRef,
    pub m: Rc<TdxModule>,
}

impl Bench {
    pub fn new(config: ModuleConfig, npages: usize) -> Self {
        let ex = Executor::new(TraceMode::Full);
        let cx = ex.ctx();
        let host = crate::host::Host::shared(npages);
        let m = Rc::new(TdxModule::new(config, host.clone()));
        Bench { ex, cx, host, m }
    }

    /// Runs one task to completion under round robin.
    pub fn run<F: Future<Output = ()> + 'static>(
        &mut self,
        f: impl FnOnce(Ctx, Rc<TdxModule>) -> F,
    ) {
        let fut = f(self.cx.clone(), self.m.clone());
        self.ex.spawn("t", fut);
        let out = self
            .ex
            .run(&mut RoundRobin::new(), 1_000_000, &mut |_| true);
        assert_eq!(out, Outcome::AllDone);
    }
}

/// `alloc_page()` for a kernel use.
pub fn alloc(m: &TdxModule, what: KernelUse) -> Pfn {
    m.host()
        .borrow_mut()
        .ledger
        .alloc(AllocFor::Kernel(what))
        .expect("host memory")
}

/// A guest_memfd page for `gpa`.
pub fn alloc_guest(m: &TdxModule, gpa: Gpa) -> Pfn {
    m.host()
        .borrow_mut()
        .ledger
        .alloc(AllocFor::GuestMemfd {
            file: GmemId(0),
            index: PgOff(gpa.gfn().raw()),
        })
        .expect("host memory")
}

/// One vCPU's pages and the LP it was initialised on.
#[derive(Clone, Debug)]
pub struct BuiltVcpu {
    pub tdvpr: Pfn,
    pub tdcx: Vec<Pfn>,
    pub lp: Lp,
}

/// A TD's control pages.
#[derive(Clone, Debug)]
pub struct BuiltTd {
    pub tdr: Pfn,
    pub hkid: Hkid,
    pub tdcs: Vec<Pfn>,
    pub vcpus: Vec<BuiltVcpu>,
}

/// `__tdx_td_init` + `tdx_td_vcpu_init` for each vCPU (vCPU i on LP i), as SEAMCALLs; every
/// leaf must succeed.
pub async fn build_td(cx: &Ctx, m: &TdxModule, hkid: Hkid, nvcpus: u8) -> BuiltTd {
    let cfg = m.state().config.clone();
    let tdr = alloc(m, KernelUse::Tdr);
    m.tdh_mng_create(cx, tdr, hkid).await.expect("MNG.CREATE");
    for pkg in 0..cfg.packages {
        m.tdh_mng_key_config(cx, Lp(pkg), tdr)
            .await
            .expect("KEY.CONFIG");
    }
    let mut tdcs = Vec::new();
    for _ in 0..cfg.tdcs_pages {
        let p = alloc(m, KernelUse::Tdcs);
        m.tdh_mng_addcx(cx, tdr, p).await.expect("MNG.ADDCX");
        tdcs.push(p);
    }
    m.tdh_mng_init(
        cx,
        tdr,
        TdParams {
            max_vcpus: 4,
            attributes: 0,
        },
    )
    .await
    .expect("MNG.INIT");
    let mut vcpus = Vec::new();
    for i in 0..nvcpus {
        vcpus.push(build_vcpu(cx, m, tdr, Lp(i)).await);
    }
    BuiltTd {
        tdr,
        hkid,
        tdcs,
        vcpus,
    }
}

/// VP.CREATE, VP.ADDCX for every TDCX page, VP.INIT on `lp`.
pub async fn build_vcpu(cx: &Ctx, m: &TdxModule, tdr: Pfn, lp: Lp) -> BuiltVcpu {
    let n = m.state().config.tdvps_pages;
    let tdvpr = alloc(m, KernelUse::Tdvpr);
    m.tdh_vp_create(cx, tdr, tdvpr).await.expect("VP.CREATE");
    let mut tdcx = Vec::new();
    for _ in 1..n {
        let p = alloc(m, KernelUse::Tdcx);
        m.tdh_vp_addcx(cx, tdvpr, p).await.expect("VP.ADDCX");
        tdcx.push(p);
    }
    m.tdh_vp_init(cx, lp, tdvpr).await.expect("VP.INIT");
    BuiltVcpu { tdvpr, tdcx, lp }
}

/// SEPT.ADD for every missing table on the path to the 4K entry of `gpa`; returns the
/// S-EPT pages added.
pub async fn link_path(cx: &Ctx, m: &TdxModule, tdr: Pfn, gpa: Gpa) -> Vec<Pfn> {
    let mut added = Vec::new();
    for level in [PgLevel::L512G, PgLevel::L1G, PgLevel::L2M] {
        let state = m.state().tds[&tdr].sept.state(level, gpa.gfn());
        if state == SeptState::Free {
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

/// Link the path and AUG a fresh guest page at `gpa` (4K).
pub async fn aug(cx: &Ctx, m: &TdxModule, tdr: Pfn, gpa: Gpa) -> SeamResult<Pfn> {
    link_path(cx, m, tdr, gpa).await;
    let p = alloc_guest(m, gpa);
    m.tdh_mem_page_aug(cx, tdr, gpa, PgLevel::L4K, p)
        .await
        .map(|()| p)
}

/// `tdx_sept_remove_leaf_spte` without the retry: BLOCK, TRACK, REMOVE, WBINVD(hkid), clear,
/// free.
pub async fn remove_4k(cx: &Ctx, m: &TdxModule, tdr: Pfn, gpa: Gpa) -> SeamResult<Pfn> {
    m.tdh_mem_range_block(cx, tdr, gpa, PgLevel::L4K).await?;
    m.tdh_mem_track(cx, tdr).await?;
    let p = m.tdh_mem_page_remove(cx, tdr, gpa, PgLevel::L4K).await?;
    let hkid = m.state().tds[&tdr].hkid;
    m.tdh_phymem_page_wbinvd(cx, p, CacheKey::Td(hkid)).await?;
    let mut h = m.host().borrow_mut();
    h.ledger.clear(p).expect("clear");
    h.ledger.free(p).expect("free");
    Ok(p)
}

/// The upstream teardown after all guest pages are gone: VP.FLUSH each vCPU on its LP,
/// VPFLUSHDONE, CACHE.WB on every package (resuming while interrupted), KEY.FREEID, then
/// RECLAIM (and clear, free) the TDCX and TDVPR pages, the S-EPT pages, the TDCS pages, and
/// the TDR last with WBINVD under the global key.
pub async fn teardown(cx: &Ctx, m: &TdxModule, td: &BuiltTd, sept_pages: &[Pfn]) {
    let packages = m.state().config.packages;
    for v in &td.vcpus {
        m.tdh_vp_flush(cx, v.lp, v.tdvpr).await.expect("VP.FLUSH");
    }
    m.tdh_mng_vpflushdone(cx, td.tdr)
        .await
        .expect("VPFLUSHDONE");
    for pkg in 0..packages {
        let mut cmd = CacheWbCmd::Start;
        loop {
            match m.tdh_phymem_cache_wb(cx, Lp(pkg), cmd).await {
                Ok(()) => break,
                Err(e) if e.status.code == Code::InterruptedResumable => cmd = CacheWbCmd::Resume,
                Err(e) if e.status.code == Code::NoHkidReadyToWbcache => break,
                Err(e) => panic!("CACHE.WB: {e}"),
            }
        }
    }
    m.tdh_mng_key_freeid(cx, td.tdr).await.expect("KEY.FREEID");
    let reclaim = |p: Pfn| async move {
        m.tdh_phymem_page_reclaim(cx, p).await.expect("RECLAIM");
        let mut h = m.host().borrow_mut();
        h.ledger.clear(p).expect("clear");
        h.ledger.free(p).expect("free");
    };
    for v in &td.vcpus {
        for &p in &v.tdcx {
            reclaim(p).await;
        }
        reclaim(v.tdvpr).await;
    }
    for &p in sept_pages {
        reclaim(p).await;
    }
    for &p in &td.tdcs {
        reclaim(p).await;
    }
    m.tdh_phymem_page_reclaim(cx, td.tdr)
        .await
        .expect("RECLAIM TDR");
    m.tdh_phymem_page_wbinvd(cx, td.tdr, CacheKey::Global)
        .await
        .expect("WBINVD TDR");
    let mut h = m.host().borrow_mut();
    h.ledger.clear(td.tdr).expect("clear");
    h.ledger.free(td.tdr).expect("free");
}
