//! Physical-memory leaves: TDH.PHYMEM.{PAGE.RECLAIM, CACHE.WB, PAGE.WBINVD}
//! (src/vmm_dispatcher/api_calls/tdh_phymem_*.c).

use crate::addr::{Pfn, PgLevel};
use crate::host::CacheKey;
use crate::sched::Ctx;

use super::locks::LockKey;
use super::{
    Code, KotState, Leaf, Lifecycle, Lp, Operand, PageType, SeamErr, SeamResult, TdxModule,
};

/// What PAGE.RECLAIM reports: the page's type, owner TDR and size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReclaimInfo {
    pub page_type: PageType,
    pub owner: Option<Pfn>,
    pub level: PgLevel,
}

/// CACHE.WB's command operand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheWbCmd {
    Start,
    Resume,
}

impl TdxModule {
    /// TDH.PHYMEM.PAGE.RECLAIM (leaf 28; tdh_phymem_page_reclaim.c): take a page back from a TD
    /// in TEARDOWN. The TDR goes last: it is refused while the TD still has child pages.
    pub async fn tdh_phymem_page_reclaim(&self, cx: &Ctx, page: Pfn) -> SeamResult<ReclaimInfo> {
        self.seamcall(
            cx,
            Leaf::PhymemPageReclaim,
            |st, g| {
                if !st.pamt.covers(page) {
                    return Err(SeamErr::with(Code::OperandAddrRangeError, Operand::Rcx));
                }
                g.take(&mut st.locks, LockKey::Pamt(page))?;
                let e = st.pamt.get(page);
                if e.pt == PageType::Nda {
                    return Err(SeamErr::with(Code::PageMetadataIncorrect, Operand::Rcx));
                }
                let info = ReclaimInfo {
                    page_type: e.pt,
                    owner: e.owner,
                    level: PgLevel::L4K,
                };
                if e.pt == PageType::Tdr {
                    g.skip();
                    let td = st.td(page);
                    if td.lifecycle != Lifecycle::Teardown {
                        return Err(SeamErr::code(Code::LifecycleStateIncorrect));
                    }
                    if td.chldcnt != 0 {
                        return Err(SeamErr::code(Code::TdAssociatedPagesExist));
                    }
                } else {
                    let owner = e.owner.expect("child pages have an owner");
                    g.take(&mut st.locks, LockKey::Pamt(owner))?;
                    if st.td(owner).lifecycle != Lifecycle::Teardown {
                        return Err(SeamErr::code(Code::LifecycleStateIncorrect));
                    }
                }
                Ok(info)
            },
            |st, host, info, step| {
                match info.page_type {
                    PageType::Tdr => {
                        st.tds.remove(&page);
                    }
                    _ => {
                        let owner = info.owner.expect("child page");
                        st.td_mut(owner).chldcnt -= 1;
                        if info.page_type == PageType::Tdvpr {
                            st.vcpus.remove(&page);
                        }
                    }
                }
                st.release_page(host, step, page);
                Ok(info)
            },
        )
        .await
    }

    /// TDH.PHYMEM.CACHE.WB (leaf 40; tdh_phymem_cache_wb.c): write back the caches of every
    /// FLUSHED HKID on the package of `lp`, interruptibly.
    pub async fn tdh_phymem_cache_wb(&self, cx: &Ctx, lp: Lp, cmd: CacheWbCmd) -> SeamResult<()> {
        self.seamcall(
            cx,
            Leaf::PhymemCacheWb,
            |st, g| {
                let pkg = st.pkg(lp);
                g.take(&mut st.locks, LockKey::Wbt(pkg))?;
                g.take(&mut st.locks, LockKey::Kot)?;
                match cmd {
                    CacheWbCmd::Start => {
                        let flushed: Vec<_> = st
                            .kot
                            .iter()
                            .filter(|(_, k)| k.state == KotState::Flushed)
                            .map(|(h, _)| *h)
                            .collect();
                        if flushed.is_empty() {
                            return Err(SeamErr::code(Code::NoHkidReadyToWbcache));
                        }
                        let w = &mut st.wbt[usize::from(pkg)];
                        w.intr_point = 0;
                        w.hkid_flushed = flushed;
                    }
                    CacheWbCmd::Resume => {
                        if st.wbt[usize::from(pkg)].intr_point == 0 {
                            return Err(SeamErr::code(Code::WbcacheResumeError));
                        }
                    }
                }
                Ok(pkg)
            },
            |st, host, pkg, _| {
                let blocks = st.config.cache_wb_blocks;
                let mut point = st.wbt[usize::from(pkg)].intr_point;
                while point < blocks {
                    point += 1;
                    if point < blocks && st.injected.cache_wb_interrupts > 0 {
                        st.injected.cache_wb_interrupts -= 1;
                        st.wbt[usize::from(pkg)].intr_point = point;
                        return Err(SeamErr::code(Code::InterruptedResumable));
                    }
                }
                let w = &mut st.wbt[usize::from(pkg)];
                w.intr_point = 0;
                let done = std::mem::take(&mut w.hkid_flushed);
                for h in done {
                    let k = st.kot.get_mut(&h).expect("hkid");
                    k.wbinvd_bitmap &= !(1 << pkg);
                    if k.wbinvd_bitmap == 0 {
                        host.ledger.cache_wb(h);
                    }
                }
                Ok(())
            },
        )
        .await
    }

    /// TDH.PHYMEM.PAGE.WBINVD (leaf 41; tdh_phymem_page_wbinvd.c): write back and invalidate one
    /// page's cache lines under `key`; the page must already be PT_NDA.
    pub async fn tdh_phymem_page_wbinvd(
        &self,
        cx: &Ctx,
        page: Pfn,
        key: CacheKey,
    ) -> SeamResult<()> {
        self.seamcall(
            cx,
            Leaf::PhymemPageWbinvd,
            |st, g| {
                if !st.pamt.covers(page) {
                    return Err(SeamErr::with(Code::OperandAddrRangeError, Operand::Rcx));
                }
                g.take(&mut st.locks, LockKey::Pamt(page))?;
                if st.pamt.get(page).pt != PageType::Nda {
                    return Err(SeamErr::with(Code::PageMetadataIncorrect, Operand::Rcx));
                }
                Ok(())
            },
            |_, host, (), step| {
                let r = host.ledger.wbinvd(page, key);
                host.record(step, r);
                Ok(())
            },
        )
        .await
    }
}
