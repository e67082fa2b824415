//! VM teardown: the last references to the VM go (guest_memfd files, then the VM fd), and
//! `kvm_destroy_vm` (virt/kvm/kvm_main.c) runs with the x86 and TDX hooks in upstream order
//! (linux-tdx.md section 6, newest design):
//!
//! 1. every open guest_memfd is released (`kvm_gmem_release`): private mappings are removed
//!    from the S-EPT one by one while the HKID is still assigned, and the pages are freed;
//! 2. `vm_pre_destroy` = `tdx_mmu_release_hkid`: VP.FLUSH each vCPU, VPFLUSHDONE, CACHE.WB on
//!    every package, KEY.FREEID; the TD enters TEARDOWN and its pages become reclaimable;
//! 3. the MMU notifier's release zaps the direct (shared) roots;
//! 4. `kvm_arch_destroy_vm`: `kvm_destroy_vcpus` (`tdx_vcpu_free` reclaims TDCX then TDVPR),
//!    `kvm_mmu_uninit_tdp_mmu` (every root zapped exclusively: mirror tables go through
//!    `tdx_sept_free_private_spt`), then `vm_destroy` = `tdx_vm_destroy` (TDCS, then the TDR
//!    last, written back under the global key);
//! 5. `kvm_free_memslots`.
//!
//! Policy `sept_off_to_side` (seed 001) has no mirror root: its leaves go in step 1 as
//! upstream's do, and the S-EPT tables it added are reclaimed in step 4 after the MMU.
//!
//! A page that cannot be reclaimed is leaked on purpose (`Ledger::leak`), as upstream leaks it.
//! Policy `reclaim_in_order == false` models the historical order: KEY.FREEID before the
//! cache write-back, and `vm_destroy` (the TDR) before the vCPUs and the MMU. The module refuses
//! the first (TDX_WBCACHE_NOT_COMPLETE, a TDX_BUG_ON with the VM); the HKID then stays assigned
//! and every later reclaim is given up, so the TDR-first order cannot get further than leaking.
//!
//! Not modelled: `cpus_read_lock` and `tdx_disable_virtualization_cpu` (no CPU hotplug), vCPU
//! migration between pCPUs (a vCPU's thread stays on its LP), RCU callbacks (shadow pages are
//! freed at once).

use crate::addr::{Gfn, Pfn, PgLevel};
use crate::host::{CacheKey, LeakReason};
use crate::ids::GmemId;
use crate::sched::Ctx;
use crate::tdx_module::{CacheWbCmd, Code, Lp};

use super::mmu::invalidate::RootTypes;
use super::{GuestMode, Kvm, SpId, Spte, TdState};

/// `TDX_SEAMCALL_RETRIES`: tries of the CACHE.WB loop.
const TDX_SEAMCALL_RETRIES: usize = 10_000;

/// Teardown state of the VM.
#[derive(Clone, Debug, Default)]
pub struct TeardownState {
    /// `kvm_destroy_vm` has run.
    pub destroyed: bool,
}

impl Kvm {
    /// The VMM closes the VM: each open guest_memfd is released first (a file holds a
    /// reference on the VM, `kvm_gmem_release`), then the last `kvm_put_kvm` runs
    /// `kvm_destroy_vm`. Every vCPU thread must have stopped (a vCPU fd holds a reference too).
    pub async fn destroy_vm(&self, cx: &Ctx) {
        let (done, busy, files) = {
            let st = self.st.borrow();
            let busy = st
                .vcpus
                .iter()
                .any(|v| v.srcu.is_some() || v.mode != GuestMode::OutsideGuest);
            let files: Vec<GmemId> = st
                .gmem
                .files
                .iter()
                .filter(|(_, f)| !f.closed)
                .map(|(id, _)| *id)
                .collect();
            (st.gmem.teardown.destroyed, busy, files)
        };
        if done {
            return;
        }
        assert!(
            !busy,
            "kvm_destroy_vm with a vCPU in KVM_RUN (its fd holds a VM reference)"
        );
        for f in files {
            self.kvm_gmem_release(cx, f).await;
        }
        self.kvm_destroy_vm(cx).await;
    }

    /// `kvm_destroy_vm`: pre-destroy (HKID release), the MMU notifier's release, the arch
    /// teardown, then the memslots.
    pub async fn kvm_destroy_vm(&self, cx: &Ctx) {
        cx.yield_at("kvm_destroy_vm").await;
        // kvm_arch_pre_destroy_vm -> kvm_x86_ops.vm_pre_destroy.
        self.tdx_mmu_release_hkid(cx).await;
        // mmu_notifier_unregister -> kvm_mmu_notifier_release.
        kvm_mmu_notifier_release(self, cx).await;
        self.kvm_arch_destroy_vm(cx).await;
        kvm_free_memslots(self);
        self.st.borrow_mut().gmem.teardown.destroyed = true;
        cx.note("kvm_destroy_vm done", 0, 0);
    }

    /// `kvm_arch_destroy_vm` (x86): vCPUs, then the MMU, then `kvm_x86_ops.vm_destroy` last
    /// (the TDR may only be reclaimed once nothing depends on it). Policy `reclaim_out_of_order`
    /// calls `vm_destroy` first, where x86 used to. Policy `sept_off_to_side` reclaims the S-EPT
    /// tables it added where the MMU teardown reclaims the mirror's.
    async fn kvm_arch_destroy_vm(&self, cx: &Ctx) {
        if !self.policy.reclaim_in_order {
            self.tdx_vm_destroy(cx).await;
        }
        self.kvm_destroy_vcpus(cx).await;
        self.kvm_mmu_uninit_tdp_mmu(cx).await;
        if self.policy.sept_off_to_side {
            self.sept_side_free_tables(cx).await;
        }
        if self.policy.reclaim_in_order {
            self.tdx_vm_destroy(cx).await;
        }
    }

    /// `kvm_destroy_vcpus` -> `kvm_arch_vcpu_destroy` for each vCPU: `kvm_mmu_unload` (the
    /// direct root), `tdx_vcpu_free`, `kvm_mmu_destroy` (the mirror root).
    async fn kvm_destroy_vcpus(&self, cx: &Ctx) {
        let n = self.st.borrow().vcpus.len();
        for v in 0..n {
            let root = self.st.borrow_mut().vcpus[v].root.take();
            put_root_read_locked(self, cx, root).await;
            self.tdx_vcpu_free(cx, v).await;
            let mirror = self.st.borrow_mut().vcpus[v].mirror_root.take();
            put_root_read_locked(self, cx, mirror).await;
            self.kvm_mmu_free_memory_caches(cx, v);
        }
    }

    /// `tdx_mmu_release_hkid` (vm_pre_destroy): flush every vCPU, then under `tdx_lock`
    /// VPFLUSHDONE, CACHE.WB on each package and KEY.FREEID. FLUSHVP_NOT_DONE gives up silently
    /// and any other failure is a TDX_BUG_ON: either way the HKID stays assigned and everything
    /// the TD holds is leaked later.
    pub async fn tdx_mmu_release_hkid(&self, cx: &Ctx) {
        let (hkid, tdr, nvcpus) = {
            let st = self.st.borrow();
            (st.tdx.hkid, st.tdx.tdr, st.vcpus.len())
        };
        let (Some(hkid), Some(tdr)) = (hkid, tdr) else {
            return;
        };
        for v in 0..nvcpus {
            self.tdx_flush_vp_on_cpu(cx, v).await;
        }
        let lock = self.tdx_lock;
        lock.lock(cx).await;
        let m = &self.module;
        match m.tdh_mng_vpflushdone(cx, tdr).await {
            Ok(()) => {
                if self.policy.reclaim_in_order {
                    self.tdx_cache_wb_all_packages(cx).await;
                    self.tdx_key_freeid(cx, tdr).await;
                } else {
                    self.tdx_key_freeid(cx, tdr).await;
                    self.tdx_cache_wb_all_packages(cx).await;
                }
            }
            // A vCPU is still associated: give up silently, the HKID stays assigned.
            Err(e) if e.status.code == Code::FlushvpNotDone => {
                cx.note("tdx_mmu_release_hkid: HKID kept", u64::from(hkid.0), 0);
            }
            Err(e) => {
                self.bug(
                    cx,
                    "tdx_mmu_release_hkid",
                    format!("TDH.MNG.VPFLUSHDONE: {e}; {hkid} leaked"),
                )
                .await
            }
        }
        lock.unlock(cx).await;
    }

    /// `tdx_flush_vp_on_cpu` -> `tdx_flush_vp` by IPI on `vcpu->cpu` (nothing if -1):
    /// TDH.VP.FLUSH unless the vCPU is UNINITIALIZED (VCPU_NOT_ASSOCIATED is fine, anything
    /// else is a TDX_BUG_ON), then `tdx_disassociate_vp` whatever the flush gave.
    async fn tdx_flush_vp_on_cpu(&self, cx: &Ctx, v: usize) {
        let (cpu, initialized, tdvpr) = {
            let st = self.st.borrow();
            let vc = &st.vcpus[v];
            (vc.cpu, vc.initialized, vc.tdvpr)
        };
        let Some(lp) = cpu else { return };
        let r = match tdvpr {
            Some(tdvpr) if initialized => self.module.tdh_vp_flush(cx, lp, tdvpr).await,
            _ => Ok(()),
        };
        self.st.borrow_mut().vcpus[v].cpu = None;
        match r {
            Ok(()) => {}
            Err(e) if e.status.code == Code::VcpuNotAssociated => {}
            Err(e) => {
                self.bug(
                    cx,
                    "tdx_flush_vp_on_cpu",
                    format!("TDH.VP.FLUSH vcpu{v}: {e}"),
                )
                .await
            }
        }
    }

    /// `smp_func_do_phymem_cache_wb` on one CPU of each package (LP `pkg` is in package
    /// `pkg`): TDH.PHYMEM.CACHE.WB, resumed while INTERRUPTED_RESUMABLE; NO_HKID_READY_TO_WBCACHE
    /// means another CPU did it. A final error is a TDX_BUG_ON without the VM: a WARN.
    async fn tdx_cache_wb_all_packages(&self, cx: &Ctx) {
        let packages = self.module.state().config.packages;
        for pkg in 0..packages {
            let mut cmd = CacheWbCmd::Start;
            let mut err = None;
            for _ in 0..TDX_SEAMCALL_RETRIES {
                match self.module.tdh_phymem_cache_wb(cx, Lp(pkg), cmd).await {
                    Ok(()) => {
                        err = None;
                        break;
                    }
                    Err(e) if e.status.code == Code::InterruptedResumable => {
                        cmd = CacheWbCmd::Resume;
                        err = Some(e);
                    }
                    Err(e) if e.status.code == Code::NoHkidReadyToWbcache => {
                        err = None;
                        break;
                    }
                    Err(e) => {
                        err = Some(e);
                        break;
                    }
                }
            }
            if let Some(e) = err {
                self.warn(
                    cx,
                    "smp_func_do_phymem_cache_wb",
                    format!("TDH.PHYMEM.CACHE.WB on package {pkg}: {e}"),
                );
            }
        }
    }

    /// The KEY.FREEID step of `tdx_mmu_release_hkid`: success frees the HKID
    /// (`tdx_hkid_free`); failure is a TDX_BUG_ON and the HKID is leaked.
    async fn tdx_key_freeid(&self, cx: &Ctx, tdr: Pfn) {
        match self.module.tdh_mng_key_freeid(cx, tdr).await {
            Ok(()) => self.st.borrow_mut().tdx.hkid = None,
            Err(e) => {
                let hkid = self.st.borrow().tdx.hkid;
                self.bug(
                    cx,
                    "tdx_mmu_release_hkid",
                    format!("TDH.MNG.KEY.FREEID: {e}; {hkid:?} leaked"),
                )
                .await;
            }
        }
    }

    /// `tdx_vcpu_free`: a vCPU still on a pCPU (`vcpu->cpu != -1`) is flushed there and freed
    /// no further (KVM_BUG_ON if it is INITIALIZED; its pages stay allocated); with the HKID
    /// still assigned nothing can be reclaimed (the pages are leaked on purpose); otherwise
    /// reclaim each TDCX page, then the TDVPR.
    pub async fn tdx_vcpu_free(&self, cx: &Ctx, v: usize) {
        let (cpu, initialized) = {
            let st = self.st.borrow();
            (st.vcpus[v].cpu, st.vcpus[v].initialized)
        };
        if cpu.is_some() {
            if initialized {
                self.bug(
                    cx,
                    "tdx_vcpu_free",
                    format!("vcpu{v} freed while INITIALIZED and associated"),
                )
                .await;
            }
            self.tdx_flush_vp_on_cpu(cx, v).await;
            return;
        }
        let (hkid, tdcx, tdvpr) = {
            let mut st = self.st.borrow_mut();
            let hkid = st.tdx.hkid;
            let vc = &mut st.vcpus[v];
            vc.initialized = false;
            (hkid, std::mem::take(&mut vc.tdcx), vc.tdvpr.take())
        };
        if hkid.is_some() {
            let mut h = self.host.borrow_mut();
            for p in tdcx.into_iter().chain(tdvpr) {
                let r = h.ledger.leak(p, LeakReason::HkidNotReleased);
                h.record(cx.step(), r);
            }
            return;
        }
        for p in tdcx {
            self.tdx_reclaim_control_page(cx, p).await;
        }
        if let Some(p) = tdvpr {
            self.tdx_reclaim_control_page(cx, p).await;
        }
    }

    /// `kvm_mmu_uninit_tdp_mmu`: invalidate every valid root, zap the invalidated roots
    /// exclusively (each subtree through `handle_removed_pt`, so mirror tables reach
    /// `tdx_sept_free_private_spt`) and drop the MMU's reference to each; WARN if any page or
    /// root is left.
    pub async fn kvm_mmu_uninit_tdp_mmu(&self, cx: &Ctx) {
        // Upstream waives the mmu_lock assertion here (no users are left); the model takes it.
        self.mmu_lock.write(cx).await;
        self.kvm_tdp_mmu_invalidate_roots(cx, RootTypes::VALID);
        self.mmu_lock.write_unlock(cx).await;
        self.kvm_tdp_mmu_zap_invalidated_roots(cx, false).await;
        let (pages, roots) = {
            let st = self.st.borrow();
            (st.mmu.sps.len(), st.mmu.roots.len())
        };
        if pages != 0 || roots != 0 {
            self.warn(
                cx,
                "kvm_mmu_uninit_tdp_mmu",
                format!("{pages} shadow pages and {roots} roots left"),
            );
        }
    }

    /// `tdx_vm_destroy` (vm_destroy): `tdx_reclaim_td_control_pages`, state UNINITIALIZED.
    /// Control pages still there (the HKID stayed assigned) are never freed: leaked.
    pub async fn tdx_vm_destroy(&self, cx: &Ctx) {
        self.tdx_reclaim_td_control_pages(cx).await;
        let mut st = self.st.borrow_mut();
        let left: Vec<Pfn> = std::mem::take(&mut st.tdx.tdcs)
            .into_iter()
            .chain(st.tdx.tdr.take())
            .collect();
        let mut h = self.host.borrow_mut();
        for p in left {
            let r = h.ledger.leak(p, LeakReason::HkidNotReleased);
            h.record(cx.step(), r);
        }
        st.tdx.state = TdState::Uninitialized;
        st.tdx.pre_fault_allowed = false;
    }

    /// `tdx_reclaim_td_control_pages`: with the HKID assigned, give up (the pages stay with
    /// the TD: a later KVM_TDX_FINALIZE_VM still finds it, a later release of the HKID lets
    /// `tdx_vm_destroy` reclaim them); else reclaim each TDCS page, then the TDR: RECLAIM,
    /// TDH.PHYMEM.PAGE.WBINVD under the global key, clear, free. A TDR that cannot be
    /// reclaimed or written back is leaked.
    pub(crate) async fn tdx_reclaim_td_control_pages(&self, cx: &Ctx) {
        if self.st.borrow().tdx.hkid.is_some() {
            return;
        }
        let (tdcs, tdr) = {
            let mut st = self.st.borrow_mut();
            let t = &mut st.tdx;
            (std::mem::take(&mut t.tdcs), t.tdr.take())
        };
        for p in tdcs {
            self.tdx_reclaim_control_page(cx, p).await;
        }
        let Some(tdr) = tdr else { return };
        if !self.tdx_reclaim_page_noclear(cx, tdr).await {
            let mut h = self.host.borrow_mut();
            let r = h.ledger.leak(tdr, LeakReason::ReclaimFailed);
            h.record(cx.step(), r);
            return;
        }
        if let Err(e) = self
            .module
            .tdh_phymem_page_wbinvd(cx, tdr, CacheKey::Global)
            .await
        {
            self.bug(
                cx,
                "tdx_reclaim_td_control_pages",
                format!("TDH.PHYMEM.PAGE.WBINVD of the TDR: {e}"),
            )
            .await;
            let mut h = self.host.borrow_mut();
            let r = h.ledger.leak(tdr, LeakReason::WbinvdFailed);
            h.record(cx.step(), r);
            return;
        }
        let mut h = self.host.borrow_mut();
        if self.policy.clear_after_reclaim {
            // tdx_quirk_reset_page
            let r = h.ledger.clear(tdr);
            h.record(cx.step(), r);
            h.write(tdr, 0);
        }
        let r = h.ledger.free(tdr);
        h.record(cx.step(), r);
    }

    /// `tdx_reclaim_control_page`: reclaim (and clear) then free, or leak if the module does
    /// not give the page back.
    async fn tdx_reclaim_control_page(&self, cx: &Ctx, page: Pfn) {
        let ok = self.tdx_reclaim_page(cx, page).await;
        let mut h = self.host.borrow_mut();
        let r = if ok {
            h.ledger.free(page)
        } else {
            h.ledger.leak(page, LeakReason::ReclaimFailed)
        };
        h.record(cx.step(), r);
    }

    /// `__tdx_reclaim_page`: TDH.PHYMEM.PAGE.RECLAIM with no BUSY handling; an error is a
    /// TDX_BUG_ON without the VM (a WARN) and -EIO (false).
    pub(crate) async fn tdx_reclaim_page_noclear(&self, cx: &Ctx, page: Pfn) -> bool {
        match self.module.tdh_phymem_page_reclaim(cx, page).await {
            Ok(_) => true,
            Err(e) => {
                self.warn(
                    cx,
                    "__tdx_reclaim_page",
                    format!("TDH.PHYMEM.PAGE.RECLAIM {page}: {e}"),
                );
                false
            }
        }
    }
}

/// `kvm_put_root` as `kvm_mmu_unload`/`kvm_mmu_destroy` do it: under mmu_lock for read.
async fn put_root_read_locked(kvm: &Kvm, cx: &Ctx, root: Option<SpId>) {
    let Some(r) = root else { return };
    if !kvm.st.borrow().mmu.sps.contains_key(&r) {
        return;
    }
    kvm.mmu_lock.read(cx).await;
    kvm.tdp_mmu_put_root(cx, r).await;
    kvm.mmu_lock.read_unlock(cx).await;
}

/// `kvm_mmu_notifier_release` -> `kvm_flush_shadow_all` -> `kvm_mmu_zap_all` ->
/// `kvm_tdp_mmu_zap_all`: under kvm->srcu and mmu_lock for write, zap every direct root (valid
/// or invalid); mirror roots are left to `kvm_mmu_uninit_tdp_mmu`.
async fn kvm_mmu_notifier_release(kvm: &Kvm, cx: &Ctx) {
    let idx = kvm.srcu.read_lock(cx).await;
    kvm.mmu_lock.write(cx).await;
    let roots: Vec<SpId> = {
        let st = kvm.st.borrow();
        st.mmu
            .roots
            .iter()
            .copied()
            .filter(|r| !st.mmu.get(*r).mirror)
            .collect()
    };
    for r in roots {
        zap_root_exclusive(kvm, cx, r).await;
    }
    kvm.mmu_lock.write_unlock(cx).await;
    kvm.srcu.read_unlock(cx, idx).await;
}

/// `tdp_mmu_zap_root(kvm, root, shared = false)`: zap the 1G-level SPTEs, then the root's own
/// entries; each zapped table goes through `handle_removed_pt`.
async fn zap_root_exclusive(kvm: &Kvm, cx: &Ctx, root: SpId) {
    for zap_level in [PgLevel::L1G, PgLevel::L512G] {
        let targets = present_sptes_at(kvm, root, zap_level);
        for (sp, idx, gfn) in targets {
            kvm.tdp_mmu_set_spte(cx, sp, idx, gfn, Spte::NONPRESENT)
                .await;
        }
    }
}

/// Present SPTEs of level `level` under `root`: (table, index, gfn).
fn present_sptes_at(kvm: &Kvm, root: SpId, level: PgLevel) -> Vec<(SpId, u16, Gfn)> {
    let st = kvm.st.borrow();
    let mut out = Vec::new();
    let mut stack = vec![root];
    while let Some(sp) = stack.pop() {
        let Some(s) = st.mmu.sps.get(&sp) else {
            continue;
        };
        for (&idx, &e) in &s.sptes {
            if !e.is_present() {
                continue;
            }
            if s.level == level {
                out.push((sp, idx, s.base.add(u64::from(idx) * s.level.pages())));
            } else if !e.is_leaf() && s.level > level {
                stack.extend(st.mmu.child(e));
            }
        }
    }
    out.sort();
    out
}

/// `kvm_free_memslots` -> `kvm_free_memslot` of each slot (`kvm_gmem_unbind` has nothing left
/// to unbind after the release); the userspace memory behind the shared half is the VMM's and
/// stays until it unmaps it.
fn kvm_free_memslots(kvm: &Kvm) {
    kvm.st.borrow_mut().memslots.slots.clear();
}
