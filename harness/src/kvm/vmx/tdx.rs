//! KVM's TDX support (arch/x86/kvm/vmx/tdx.c, newest design: one `set_external_spte` hook
//! that maps tables, maps leaves or removes leaves; `tdh_do_no_vcpus` for removal retries).

use crate::addr::{Gfn, Gpa, Pfn, PgLevel};
use crate::host::{AllocFor, CacheKey, KernelUse, LeakReason};
use crate::ids::Hkid;
use crate::sched::{Ctx, Point, WaitOn};
use crate::tdx_module::{
    Code, EnterOutcome, GuestExit, Lp, Operand, SeamErr, SeamResult, Status, TdParams,
};

use crate::kvm::mmu::fault::RetPf;
use crate::kvm::{Errno, Kvm, KvmResult, Request, SpId, Spte, TdState};

/// Why the guest stopped running (the TD exit KVM handles).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TdExit {
    /// VP.ENTER did not enter (BUSY, or no entry while `wait_for_sept_zap`): re-enter.
    FastpathHandled,
    /// An external interrupt or kick.
    Interrupt,
    EptViolation {
        gpa: Gpa,
        eeq: crate::tdx_module::Eeq,
        exec: bool,
    },
    /// The guest called TDG.VP.VMCALL<MapGPA> with R12 = `gpa`, R13 = `size` (raw: a hostile
    /// guest's may be unaligned, wrap or mix private and shared).
    MapGpa { gpa: u64, size: u64 },
    /// The guest program finished (the model's HLT).
    Done,
    /// VP.ENTER returned a TDX_ERROR status other than BUSY: it did not enter, or the TD exited
    /// with an error such as TDX_HOST_PRIORITY_BUSY_TIMEOUT. KVM_EXIT_INTERNAL_ERROR.
    EnterFailed(SeamErr),
}

/// Retries of the `retry16` policy's wrapper (`TDX_SEAMCALL_RETRIES` of the removed hack).
const RETRY16: usize = 16;

impl Kvm {
    fn tdr(&self) -> Pfn {
        self.st.borrow().tdx.tdr.expect("TD created")
    }

    /// The `retry16` policy's wrapper: retry BUSY up to 16 times, no kick.
    async fn sept_seamcall<F, Fut, T>(&self, f: F) -> SeamResult<T>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = SeamResult<T>>,
    {
        let tries = if self.policy.sept_retry16 { RETRY16 } else { 1 };
        let mut r = f().await;
        for _ in 1..tries {
            match &r {
                Err(e) if e.status.is_operand_busy() => r = f().await,
                _ => break,
            }
        }
        r
    }

    /// `tdh_do_no_vcpus`: on TDX_OPERAND_BUSY, block vCPU entry, kick every vCPU out of guest
    /// mode (waiting for them), retry exactly once. Policy `no_kick_on_busy_remove` retries
    /// without the kick.
    async fn tdh_do_no_vcpus<F, Fut, T>(&self, cx: &Ctx, f: F) -> SeamResult<T>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = SeamResult<T>>,
    {
        // Upstream holds mmu_lock for write; the seed 001 design holds its one sept_lock.
        debug_assert!(self.mmu_lock.held_write(cx) || self.sept_lock.held_by_current(cx));
        let r = self.sept_seamcall(&f).await;
        match &r {
            // The retry16 design has no kick: its 16 tries are all it does.
            Err(e) if e.status.is_operand_busy() && !self.policy.sept_retry16 => {}
            _ => return r,
        }
        if !self.policy.kick_on_busy_remove {
            return f().await;
        }
        self.st.borrow_mut().tdx.wait_for_sept_zap = true;
        self.make_all_cpus_request(cx, Request::OutsideGuestMode)
            .await;
        let r = f().await;
        self.st.borrow_mut().tdx.wait_for_sept_zap = false;
        r
    }

    /// `tdx_sept_set_private_spte` (kvm_x86_ops.set_external_spte): dispatches on the change.
    pub(crate) async fn tdx_sept_set_private_spte(
        &self,
        cx: &Ctx,
        gfn: Gfn,
        old: Spte,
        new: Spte,
        level: PgLevel,
    ) -> KvmResult<()> {
        if old.is_present() {
            return self.tdx_sept_remove_leaf_spte(cx, gfn, level, old).await;
        }
        if !new.is_present() {
            self.bug(
                cx,
                "tdx_sept_set_private_spte",
                "neither old nor new present".into(),
            )
            .await;
            return Err(Errno::EIO);
        }
        if new.is_leaf() {
            self.tdx_sept_map_leaf_spte(cx, gfn, level, new.pfn()).await
        } else {
            self.tdx_sept_map_nonleaf_spte(cx, gfn, level, new).await
        }
    }

    /// Whether the map path (SEPT.ADD, AUG, PAGE.ADD) takes `status` for contention to retry:
    /// upstream's `tdx_operand_busy()` masks the operand; policy `busy_sept_tree_only` is the
    /// pre-merge `err == TDX_ERROR_SEPT_BUSY` (BUSY on the tree lock only).
    fn map_busy(&self, status: Status) -> bool {
        if self.policy.busy_any_operand {
            status.is_operand_busy()
        } else {
            status == Status::with(Code::OperandBusy, Operand::SeptTree)
        }
    }

    /// `tdx_sept_map_nonleaf_spte`: TDH.MEM.SEPT.ADD of the child's S-EPT page.
    async fn tdx_sept_map_nonleaf_spte(
        &self,
        cx: &Ctx,
        gfn: Gfn,
        level: PgLevel,
        new: Spte,
    ) -> KvmResult<()> {
        let ext = {
            let st = self.st.borrow();
            st.mmu.child(new).and_then(|c| st.mmu.get(c).external_spt)
        };
        let Some(page) = ext else {
            self.bug(
                cx,
                "tdx_spte_to_sept_pt",
                "child without external_spt".into(),
            )
            .await;
            return Err(Errno::EIO);
        };
        self.tdx_sept_add_table(cx, gfn, level, page).await
    }

    /// The SEAMCALL of `tdx_sept_map_nonleaf_spte`: TDH.MEM.SEPT.ADD of `page` below the entry
    /// at `level` covering `gfn`; BUSY is -EBUSY, any other error bugs the VM (-EIO).
    pub(crate) async fn tdx_sept_add_table(
        &self,
        cx: &Ctx,
        gfn: Gfn,
        level: PgLevel,
        page: Pfn,
    ) -> KvmResult<()> {
        let tdr = self.tdr();
        let m = &self.module;
        match self
            .sept_seamcall(|| m.tdh_mem_sept_add(cx, tdr, gfn.gpa(), level, page))
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if self.map_busy(e.status) => Err(Errno::EBUSY),
            Err(e) => {
                self.bug(
                    cx,
                    "tdx_sept_map_nonleaf_spte",
                    format!("TDH.MEM.SEPT.ADD: {e}"),
                )
                .await;
                Err(Errno::EIO)
            }
        }
    }

    /// `tdx_sept_map_leaf_spte`: TDH.MEM.PAGE.AUG once runnable, TDH.MEM.PAGE.ADD of
    /// `page_add_src` during the build.
    pub(crate) async fn tdx_sept_map_leaf_spte(
        &self,
        cx: &Ctx,
        gfn: Gfn,
        level: PgLevel,
        pfn: Pfn,
    ) -> KvmResult<()> {
        if level != PgLevel::L4K {
            self.bug(cx, "tdx_sept_map_leaf_spte", format!("level {level}"))
                .await;
            return Err(Errno::EIO);
        }
        let (runnable, src, pre_fault) = {
            let st = self.st.borrow();
            (
                st.tdx.state == TdState::Runnable,
                st.tdx.page_add_src,
                st.tdx.pre_fault_allowed,
            )
        };
        let tdr = self.tdr();
        let m = &self.module;
        let (r, leaf) = if runnable {
            let r = self
                .sept_seamcall(|| m.tdh_mem_page_aug(cx, tdr, gfn.gpa(), level, pfn))
                .await;
            (r, "TDH.MEM.PAGE.AUG")
        } else {
            let Some(src) = src.filter(|_| !pre_fault) else {
                self.bug(cx, "tdx_mem_page_add", "no page_add_src".into())
                    .await;
                return Err(Errno::EIO);
            };
            (
                m.tdh_mem_page_add(cx, tdr, gfn.gpa(), pfn, src).await,
                "TDH.MEM.PAGE.ADD",
            )
        };
        match r {
            Ok(()) => Ok(()),
            Err(e) if self.map_busy(e.status) => Err(Errno::EBUSY),
            Err(e) => {
                self.bug(cx, "tdx_sept_map_leaf_spte", format!("{leaf}: {e}"))
                    .await;
                Err(Errno::EIO)
            }
        }
    }

    /// `tdx_sept_remove_leaf_spte` (mmu_lock held for write): remove the mirror leaf's page.
    async fn tdx_sept_remove_leaf_spte(
        &self,
        cx: &Ctx,
        gfn: Gfn,
        level: PgLevel,
        old: Spte,
    ) -> KvmResult<()> {
        self.tdx_sept_remove_private_page(cx, gfn, level, old.pfn())
            .await
    }

    /// The body of `tdx_sept_remove_leaf_spte` for the page `expected` (the mirror SPTE's pfn)
    /// at `gfn` (mmu_lock held for write, or the seed 001 design's sept_lock): BLOCK, TRACK +
    /// kick, REMOVE, WBINVD of `expected` under the HKID, clear it. Must not fail; a failure
    /// bugs the VM.
    pub(crate) async fn tdx_sept_remove_private_page(
        &self,
        cx: &Ctx,
        gfn: Gfn,
        level: PgLevel,
        expected: Pfn,
    ) -> KvmResult<()> {
        let Some(hkid) = self.st.borrow().tdx.hkid else {
            self.bug(cx, "tdx_sept_remove_leaf_spte", "no HKID".into())
                .await;
            return Err(Errno::EIO);
        };
        if level != PgLevel::L4K {
            self.bug(cx, "tdx_sept_remove_leaf_spte", format!("level {level}"))
                .await;
            return Err(Errno::EIO);
        }
        let tdr = self.tdr();
        let m = &self.module;
        let gpa = gfn.gpa();
        if let Err(e) = self
            .tdh_do_no_vcpus(cx, || m.tdh_mem_range_block(cx, tdr, gpa, level))
            .await
        {
            self.zap_failed(cx, gfn, expected, format!("TDH.MEM.RANGE.BLOCK: {e}"))
                .await;
            return Err(Errno::EIO);
        }
        if self.policy.track_before_remove {
            self.tdx_track(cx).await;
        }
        // Upstream does not look at what PAGE.REMOVE reports: the flush and the reset below are
        // of the mirror SPTE's pfn (a desync shows up there, or in the oracle's S-EPT check).
        let pfn = expected;
        match self
            .tdh_do_no_vcpus(cx, || m.tdh_mem_page_remove(cx, tdr, gpa, level))
            .await
        {
            Ok(_) => {}
            Err(e) => {
                self.zap_failed(cx, gfn, expected, format!("TDH.MEM.PAGE.REMOVE: {e}"))
                    .await;
                return Err(Errno::EIO);
            }
        }
        if let Err(e) = m.tdh_phymem_page_wbinvd(cx, pfn, CacheKey::Td(hkid)).await {
            self.zap_failed(cx, gfn, pfn, format!("TDH.PHYMEM.PAGE.WBINVD: {e}"))
                .await;
            return Err(Errno::EIO);
        }
        // tdx_quirk_reset_paddr: the page goes back to guest_memfd zeroed.
        let mut h = self.host.borrow_mut();
        let r = h.ledger.clear(pfn);
        h.record(cx.step(), r);
        h.write(pfn, 0);
        Ok(())
    }

    /// The private page `pfn` at `gfn` could not be zapped (BLOCK, REMOVE or WBINVD failed):
    /// `TDX_BUG_ON` (policy `zap_failure_warns_only`: a WARN only) and -EIO; the page is left
    /// where the failure left it (`KvmState::abandoned`).
    async fn zap_failed(&self, cx: &Ctx, gfn: Gfn, pfn: Pfn, what: String) {
        if self.policy.zap_failure_bugs_vm {
            self.bug(cx, "tdx_sept_remove_leaf_spte", what).await;
        } else {
            self.warn(cx, "tdx_sept_remove_leaf_spte", what);
        }
        self.st.borrow_mut().abandoned.push((gfn, pfn));
    }

    /// `tdx_track` (mmu_lock held for write): TDH.MEM.TRACK, then kick every vCPU so none still
    /// runs in the old epoch.
    async fn tdx_track(&self, cx: &Ctx) {
        if self.st.borrow().tdx.state != TdState::Runnable {
            return;
        }
        let tdr = self.tdr();
        let m = &self.module;
        if let Err(e) = self.tdh_do_no_vcpus(cx, || m.tdh_mem_track(cx, tdr)).await {
            self.bug(cx, "tdx_track", format!("TDH.MEM.TRACK: {e}"))
                .await;
        }
        self.make_all_cpus_request(cx, Request::OutsideGuestMode)
            .await;
    }

    /// `tdx_sept_free_private_spt` (kvm_x86_ops.free_external_spt; only at teardown, after
    /// the HKID is released): reclaim the S-EPT page and free it at once. HKID still assigned
    /// is a KVM_BUG_ON and the page is leaked, as is a page RECLAIM refuses;
    /// `sp->external_spt` is cleared either way so the MMU never frees it.
    pub(crate) async fn tdx_sept_free_private_spt(&self, cx: &Ctx, sp: SpId) {
        let page = self
            .st
            .borrow_mut()
            .mmu
            .sps
            .get_mut(&sp)
            .and_then(|s| s.external_spt.take());
        let Some(page) = page else { return };
        self.tdx_sept_free_page(cx, page).await;
    }

    /// The body of `tdx_sept_free_private_spt` for one S-EPT page (after the HKID is released):
    /// reclaim and free it, or leak it (HKID still assigned: KVM_BUG_ON; RECLAIM refused).
    pub(crate) async fn tdx_sept_free_page(&self, cx: &Ctx, page: Pfn) {
        if self.st.borrow().tdx.hkid.is_some() {
            self.bug(
                cx,
                "tdx_sept_free_private_spt",
                "HKID still assigned".into(),
            )
            .await;
            let mut h = self.host.borrow_mut();
            let r = h.ledger.leak(page, LeakReason::SeptFreeFailed);
            h.record(cx.step(), r);
            return;
        }
        let ok = self.tdx_reclaim_page(cx, page).await;
        let mut h = self.host.borrow_mut();
        let r = if ok {
            h.ledger.free(page)
        } else {
            h.ledger.leak(page, LeakReason::ReclaimFailed)
        };
        h.record(cx.step(), r);
    }

    /// `tdx_reclaim_page`: `__tdx_reclaim_page` (TDH.PHYMEM.PAGE.RECLAIM; a failure is a WARN,
    /// not a VM bug), then `tdx_quirk_reset_page` (clear) on success. The caller frees the page
    /// or leaks it. Policy `no_clear_after_reclaim` skips the clear, so the free that follows
    /// hands TD-private contents back to the kernel (the ledger refuses and records it).
    pub(crate) async fn tdx_reclaim_page(&self, cx: &Ctx, page: Pfn) -> bool {
        if !self.tdx_reclaim_page_noclear(cx, page).await {
            return false;
        }
        if self.policy.clear_after_reclaim {
            let mut h = self.host.borrow_mut();
            let r = h.ledger.clear(page);
            h.record(cx.step(), r);
            h.write(page, 0);
        }
        true
    }

    /// `n` kernel pages for `u`, all or none (-ENOMEM: the ones taken are freed).
    fn alloc_kernel_pages(&self, cx: &Ctx, u: KernelUse, n: usize) -> KvmResult<Vec<Pfn>> {
        let mut pages = Vec::with_capacity(n);
        for _ in 0..n {
            let p = self.host.borrow_mut().ledger.alloc(AllocFor::Kernel(u));
            match p {
                Ok(p) => pages.push(p),
                Err(_) => {
                    self.free_kernel_pages(cx, &pages);
                    return Err(Errno::ENOMEM);
                }
            }
        }
        Ok(pages)
    }

    /// `__free_page` of pages the TDX module never took.
    fn free_kernel_pages(&self, cx: &Ctx, pages: &[Pfn]) {
        let mut h = self.host.borrow_mut();
        for &p in pages {
            let r = h.ledger.free(p);
            h.record(cx.step(), r);
        }
    }

    /// The `teardown:` label of `__tdx_td_init`, after TDH.MNG.CREATE succeeded: free the TDCS
    /// pages never added, release the HKID (`tdx_mmu_release_hkid`) and reclaim the TD's
    /// control pages (`tdx_reclaim_td_control_pages`, which leaks them if the HKID stays).
    async fn tdx_td_init_teardown(&self, cx: &Ctx, not_added: &[Pfn]) {
        self.free_kernel_pages(cx, not_added);
        self.tdx_mmu_release_hkid(cx).await;
        self.tdx_reclaim_td_control_pages(cx).await;
    }

    /// `tdx_td_init` (KVM_MEMORY_ENCRYPT_OP(KVM_TDX_INIT_VM) through `kvm_vm_ioctl` and
    /// `tdx_vm_ioctl`): -EIO on a dead VM; under the VM-state guard, -EINVAL unless the TD is
    /// UNINITIALIZED, -EBUSY once any vCPU was created (`setup_tdparams` reads
    /// `kvm->created_vcpus`); then `__tdx_td_init`: HKID, the TDR and TDCS pages, MNG.CREATE
    /// under the global `tdx_lock`, KEY.CONFIG on each package, ADDCX for each TDCS page,
    /// MNG.INIT; a failure after MNG.CREATE releases the HKID and reclaims what was added.
    pub async fn tdx_td_init(&self, cx: &Ctx, hkid: Hkid, max_vcpus: u32) -> KvmResult<()> {
        self.tdx_td_init_attrs(cx, hkid, max_vcpus, 0).await
    }

    /// KVM_TDX_INIT_VM with `init_vm->attributes`: `setup_tdparams` refuses attributes KVM
    /// does not support (-EINVAL; the model supports SEPT_VE_DISABLE only), then as
    /// [`Kvm::tdx_td_init`].
    pub async fn tdx_td_init_attrs(
        &self,
        cx: &Ctx,
        hkid: Hkid,
        max_vcpus: u32,
        attributes: u64,
    ) -> KvmResult<()> {
        self.vm_encrypt_op_gate(cx)?;
        let locks = self.tdx_acquire_vm_state_locks(cx).await;
        let r = async {
            if self.st.borrow().tdx.state != TdState::Uninitialized {
                return Err(Errno::EINVAL);
            }
            if self.st.borrow().created_vcpus != 0 {
                return Err(Errno::EBUSY);
            }
            if attributes & !crate::tdx_module::ATTR_SEPT_VE_DISABLE != 0 {
                return Err(Errno::EINVAL);
            }
            let (packages, ntdcs) = {
                let s = self.module.state();
                (s.config.packages, s.config.tdcs_pages)
            };
            // Every TDR and TDCS page is allocated before TDH.MNG.CREATE; a failure frees what
            // was taken (-ENOMEM) and leaves the TD as it was.
            let tdr = self.alloc_kernel_pages(cx, KernelUse::Tdr, 1)?[0];
            let tdcs = match self.alloc_kernel_pages(cx, KernelUse::Tdcs, ntdcs) {
                Ok(p) => p,
                Err(e) => {
                    self.free_kernel_pages(cx, &[tdr]);
                    return Err(e);
                }
            };
            let m = &self.module;
            let tdx_lock = self.tdx_lock;
            tdx_lock.lock(cx).await;
            let created = m.tdh_mng_create(cx, tdr, hkid).await;
            tdx_lock.unlock(cx).await;
            if let Err(e) = created {
                self.free_kernel_pages(cx, &tdcs);
                self.free_kernel_pages(cx, &[tdr]);
                if e.status.code == Code::RndNoEntropy {
                    return Err(Errno::EAGAIN);
                }
                self.bug(cx, "__tdx_td_init", format!("TDH.MNG.CREATE: {e}"))
                    .await;
                return Err(Errno::EIO);
            }
            {
                let mut st = self.st.borrow_mut();
                st.tdx.hkid = Some(hkid);
                st.tdx.tdr = Some(tdr);
            }
            let mut failed = None;
            for pkg in 0..packages {
                if let Err(e) = m.tdh_mng_key_config(cx, Lp(pkg), tdr).await {
                    self.bug(cx, "__tdx_td_init", format!("TDH.MNG.KEY.CONFIG: {e}"))
                        .await;
                    failed = Some((Errno::EIO, 0));
                    break;
                }
            }
            if failed.is_none() {
                for (i, &p) in tdcs.iter().enumerate() {
                    if let Err(e) = m.tdh_mng_addcx(cx, tdr, p).await {
                        let errno = if e.status.code == Code::RndNoEntropy {
                            Errno::EAGAIN
                        } else {
                            self.bug(cx, "__tdx_td_init", format!("TDH.MNG.ADDCX: {e}"))
                                .await;
                            Errno::EIO
                        };
                        failed = Some((errno, i));
                        break;
                    }
                    self.st.borrow_mut().tdx.tdcs.push(p);
                }
            }
            if let Some((errno, added)) = failed {
                self.tdx_td_init_teardown(cx, &tdcs[added..]).await;
                return Err(errno);
            }
            if let Err(e) = m
                .tdh_mng_init(
                    cx,
                    tdr,
                    TdParams {
                        max_vcpus,
                        attributes,
                    },
                )
                .await
            {
                let errno = if e.status.code == Code::OperandInvalid {
                    Errno::EINVAL
                } else {
                    self.bug(cx, "__tdx_td_init", format!("TDH.MNG.INIT: {e}"))
                        .await;
                    Errno::EIO
                };
                self.tdx_td_init_teardown(cx, &[]).await;
                return Err(errno);
            }
            self.st.borrow_mut().tdx.state = TdState::Initialized;
            Ok(())
        }
        .await;
        self.tdx_release_vm_state_locks(cx, locks).await;
        r
    }

    /// KVM_TDX_INIT_VCPU of vCPU `v` (`kvm_vcpu_ioctl` -> `tdx_vcpu_unlocked_ioctl` ->
    /// `tdx_vcpu_init` -> `tdx_td_vcpu_init`): -EIO on a dead VM; under the VM-state guard,
    /// -EINVAL without an HKID or once RUNNABLE, -EINVAL unless the vCPU is UNINITIALIZED;
    /// then TDVPR and TDCX pages, VP.CREATE, VP.ADDCX of each, VP.INIT under mmu_lock for write.
    pub async fn tdx_td_vcpu_init(&self, cx: &Ctx, v: usize) -> KvmResult<()> {
        self.vcpu_ioctl_gate(cx)?;
        let locks = self.tdx_acquire_vm_state_locks(cx).await;
        let r = async {
            {
                let st = self.st.borrow();
                if st.tdx.hkid.is_none() || st.tdx.state == TdState::Runnable {
                    return Err(Errno::EINVAL);
                }
                if st.vcpus[v].initialized {
                    return Err(Errno::EINVAL);
                }
            }
            let (lp, tdr, n) = {
                let st = self.st.borrow();
                (
                    st.vcpus[v].lp,
                    st.tdx.tdr.expect("tdr"),
                    self.module.state().config.tdvps_pages,
                )
            };
            // TDVPR and every TDCX page are allocated before TDH.VP.CREATE.
            let tdvpr = self.alloc_kernel_pages(cx, KernelUse::Tdvpr, 1)?[0];
            let tdcx = match self.alloc_kernel_pages(cx, KernelUse::Tdcx, n - 1) {
                Ok(p) => p,
                Err(e) => {
                    self.free_kernel_pages(cx, &[tdvpr]);
                    return Err(e);
                }
            };
            let m = &self.module;
            if let Err(e) = m.tdh_vp_create(cx, tdr, tdvpr).await {
                self.bug(cx, "tdx_td_vcpu_init", format!("TDH.VP.CREATE: {e}"))
                    .await;
                self.free_kernel_pages(cx, &tdcx);
                self.free_kernel_pages(cx, &[tdvpr]);
                return Err(Errno::EIO);
            }
            self.st.borrow_mut().vcpus[v].tdvpr = Some(tdvpr);
            for (i, &p) in tdcx.iter().enumerate() {
                if let Err(e) = m.tdh_vp_addcx(cx, tdvpr, p).await {
                    // The pages not added go back; TDVPR and those added are the module's
                    // until tdx_vcpu_free reclaims them.
                    self.bug(cx, "tdx_td_vcpu_init", format!("TDH.VP.ADDCX: {e}"))
                        .await;
                    self.free_kernel_pages(cx, &tdcx[i..]);
                    return Err(Errno::EIO);
                }
                self.st.borrow_mut().vcpus[v].tdcx.push(p);
            }
            // VP.INIT may take the TDR exclusively inside the module: it runs under mmu_lock
            // for write so that it cannot make a must-not-fail zap see BUSY. Policy
            // `sept_off_to_side` makes its S-EPT changes under `sept_lock` instead, so the same
            // reasoning takes that too (innermost, after mmu_lock); without it a campaign saw
            // VP.INIT answer BUSY on the TDR beside the design's PAGE.REMOVE.
            self.mmu_lock.write(cx).await;
            let side = self.policy.sept_off_to_side;
            if side {
                self.sept_lock.lock(cx).await;
            }
            let r = m.tdh_vp_init(cx, lp, tdvpr).await;
            if side {
                self.sept_lock.unlock(cx).await;
            }
            self.mmu_lock.write_unlock(cx).await;
            if let Err(e) = r {
                self.bug(cx, "tdx_td_vcpu_init", format!("TDH.VP.INIT: {e}"))
                    .await;
                return Err(Errno::EIO);
            }
            self.st.borrow_mut().vcpus[v].initialized = true;
            Ok(())
        }
        .await;
        self.tdx_release_vm_state_locks(cx, locks).await;
        r
    }

    /// `tdx_td_finalize` (KVM_MEMORY_ENCRYPT_OP(KVM_TDX_FINALIZE_VM) through `kvm_vm_ioctl`):
    /// -EIO on a dead VM; under the VM-state guard, -EINVAL without an HKID or once RUNNABLE;
    /// TDH.MR.FINALIZE (BUSY: -EBUSY; other errors bug the VM: -EIO); then RUNNABLE and
    /// `pre_fault_allowed` (KVM_PRE_FAULT_MEMORY answers -EOPNOTSUPP before). No mmu_lock
    /// (policy `finalize_under_mmu_lock` takes it for write around both). Policy
    /// `sept_off_to_side` then maps every private gfn (`sept_side_populate_all`).
    pub async fn tdx_td_finalize(&self, cx: &Ctx) -> KvmResult<()> {
        self.vm_encrypt_op_gate(cx)?;
        let locks = self.tdx_acquire_vm_state_locks(cx).await;
        let r = async {
            {
                let st = self.st.borrow();
                if st.tdx.hkid.is_none() || st.tdx.state == TdState::Runnable {
                    return Err(Errno::EINVAL);
                }
            }
            let tdr = self.tdr();
            let under_mmu_lock = self.policy.finalize_holds_mmu_lock;
            if under_mmu_lock {
                self.mmu_lock.write(cx).await;
            }
            let r = match self.module.tdh_mr_finalize(cx, tdr).await {
                Ok(()) => {
                    let mut st = self.st.borrow_mut();
                    st.tdx.state = TdState::Runnable;
                    st.tdx.pre_fault_allowed = true;
                    Ok(())
                }
                Err(e) if e.status.is_operand_busy() => Err(Errno::EBUSY),
                Err(e) => {
                    self.bug(cx, "tdx_td_finalize", format!("TDH.MR.FINALIZE: {e}"))
                        .await;
                    Err(Errno::EIO)
                }
            };
            if under_mmu_lock {
                self.mmu_lock.write_unlock(cx).await;
            }
            r?;
            if self.policy.sept_off_to_side {
                // Seed 001: the whole private memory is mapped before the guest first runs.
                self.sept_side_populate_all(cx).await?;
            }
            Ok(())
        }
        .await;
        self.tdx_release_vm_state_locks(cx, locks).await;
        r
    }

    /// `tdx_vcpu_run`: no entry while `wait_for_sept_zap`; TDH.VP.ENTER; then the guest runs
    /// until it exits (`tdx_exit_handlers_fastpath` turns BUSY into a re-entry).
    pub(crate) async fn tdx_vcpu_run(&self, cx: &Ctx, v: usize) -> TdExit {
        if self.st.borrow().tdx.wait_for_sept_zap {
            cx.yield_at("tdx_vcpu_run:wait_for_sept_zap").await;
            return TdExit::FastpathHandled;
        }
        let (lp, tdvpr, rip) = {
            let mut st = self.st.borrow_mut();
            if st.dead_since.is_some() {
                let step = cx.step();
                st.entered_after_dead.push((step, v));
            }
            let vc = &st.vcpus[v];
            (vc.lp, vc.tdvpr.expect("initialized vCPU"), vc.guest.rip())
        };
        match self.module.tdh_vp_enter(cx, lp, tdvpr, rip).await {
            Ok(EnterOutcome::Entered) => crate::guest::run_guest(self, cx, v, tdvpr).await,
            Ok(EnterOutcome::EptViolation { gpa }) => TdExit::EptViolation {
                gpa,
                eeq: crate::tdx_module::Eeq::None,
                exec: false,
            },
            Err(e) if e.status.is_operand_busy() => TdExit::FastpathHandled,
            Err(e) => TdExit::EnterFailed(e),
        }
    }

    /// `tdx_handle_exit` for the exits the model produces; returns >0 to re-enter, 0 to exit to
    /// userspace (with the run's exit info set), or an errno.
    pub(crate) async fn tdx_handle_exit(&self, cx: &Ctx, v: usize, exit: TdExit) -> KvmResult<i32> {
        match exit {
            TdExit::FastpathHandled | TdExit::Interrupt => Ok(1),
            TdExit::Done => Ok(0),
            TdExit::MapGpa { gpa, size } => Ok(self.tdx_map_gpa(v, gpa, size)),
            TdExit::EnterFailed(e) => {
                // Of upstream's status classes the model's module returns only TDX_ERROR ones
                // (entry failures, TDX_HOST_PRIORITY_BUSY_TIMEOUT): `kvm_pr_unimpl` and
                // `unhandled_exit`, no WARN, the VM stays alive. It has no TDX_SW_ERROR
                // (#UD/#GP/VMFAILINVALID: KVM_BUG_ON unless rebooting), raw EPT-misconfig exit
                // (KVM_BUG_ON, -EIO), failed VM entry (KVM_EXIT_FAIL_ENTRY) or triple fault
                // (KVM_EXIT_SHUTDOWN).
                cx.note("KVM_EXIT_INTERNAL_ERROR", e.status.raw(), 0);
                self.st.borrow_mut().vcpus[v].guest.internal_error = Some(e.status);
                Ok(0)
            }
            TdExit::EptViolation { gpa, eeq, exec } => {
                self.tdx_handle_ept_violation(cx, v, gpa, eeq, exec).await
            }
        }
    }

    /// `tdx_handle_ept_violation`: private faults retry locally while the result is
    /// RET_PF_RETRY, stopping for pending events or signals, a dead VM, or a memslot being
    /// deleted or moved (so the vCPU drops SRCU and the update can finish).
    async fn tdx_handle_ept_violation(
        &self,
        cx: &Ctx,
        v: usize,
        gpa: Gpa,
        eeq: crate::tdx_module::Eeq,
        exec: bool,
    ) -> KvmResult<i32> {
        let private = !gpa.is_shared();
        if private && eeq == crate::tdx_module::Eeq::PendingEptViolation {
            // The guest touched a page it never accepted: pr_warn (no WARN) and kvm_vm_dead.
            cx.note("guest access before accepting", gpa.raw(), 0);
            self.st.borrow_mut().killed_by_guest = true;
            self.vm_dead(cx).await;
            return Err(Errno::EIO);
        }
        if !private && exec {
            self.bug(
                cx,
                "tdx_handle_ept_violation",
                "instruction fetch from shared memory".into(),
            )
            .await;
            return Err(Errno::EIO);
        }
        // Seed 001: a private fault installs nothing, so retrying it here could only spin until
        // a conversion finishes; the guest re-enters and retries its access instead.
        let local_retry = private && self.policy.local_retry && !self.policy.sept_off_to_side;
        let r = self
            .ept_violation_retry_loop(cx, v, gpa, private, local_retry)
            .await;
        cx.spin_end();
        cx.retry_end();
        self.st.borrow_mut().vcpus[v].ept_retrying = false;
        r
    }

    /// The local retry loop of `tdx_handle_ept_violation`.
    async fn ept_violation_retry_loop(
        &self,
        cx: &Ctx,
        v: usize,
        gpa: Gpa,
        private: bool,
        local_retry: bool,
    ) -> KvmResult<i32> {
        loop {
            let r = self
                .kvm_mmu_page_fault(cx, v, gpa, true, false, private)
                .await?;
            if r == RetPf::Emulate && !private {
                // No memslot: KVM installs an MMIO SPTE (suppress-#VE clear); the guest's next
                // access takes #VE and asks for MMIO emulation with a TDVMCALL.
                self.st.borrow_mut().vcpus[v].guest.mmio_pending = true;
                return Ok(1);
            }
            if r != RetPf::Retry || !local_retry {
                return Ok(1);
            }
            {
                let st = self.st.borrow();
                let vc = &st.vcpus[v];
                if vc.pending_event || vc.signal_pending {
                    return Ok(1);
                }
            }
            if self.test_request(v, Request::VmDead) {
                return Err(Errno::EIO);
            }
            let invalid = self
                .st
                .borrow()
                .memslots
                .lookup(gpa.gfn())
                .is_some_and(|s| s.invalid);
            if invalid && self.policy.ept_loop_checks_invalid_slot {
                return Ok(1);
            }
            self.st.borrow_mut().vcpus[v].ept_retrying = true;
            if self.st.borrow().invalidate.in_flight_over(gpa.gfn()) {
                cx.retry_waiting("tdx_handle_ept_violation");
            } else {
                cx.retry("tdx_handle_ept_violation");
            }
            let point = Point::Yield("tdx_handle_ept_violation:cond_resched");
            if invalid {
                // Retrying can only succeed once the memslot update (under slots_lock) is done.
                cx.spin_on(point, WaitOn::Mutex(self.slots_lock.id())).await;
            } else {
                cx.yield_now(point).await;
            }
        }
    }

    /// The guest's TDCALL or access exited: translate the module's exit for KVM.
    pub(crate) fn guest_exit(exit: GuestExit, exec: bool) -> TdExit {
        match exit {
            GuestExit::EptViolation { gpa, eeq } => TdExit::EptViolation { gpa, eeq, exec },
            GuestExit::HostPriorityBusyTimeout => {
                TdExit::EnterFailed(SeamErr::code(Code::HostPriorityBusyTimeout))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 17 item 5: a host-priority timeout is a TD exit with a TDX_ERROR status, which
    /// `tdx_handle_exit` does not special-case: KVM_EXIT_INTERNAL_ERROR with the status, not a
    /// silent re-entry. Rows: (the module's exit, the status userspace sees).
    #[test]
    fn guest_exits_with_an_error_status_reach_userspace() {
        let rows = [(
            GuestExit::HostPriorityBusyTimeout,
            0x9000_0205_0000_0000_u64,
        )];
        for (exit, want) in rows {
            match Kvm::guest_exit(exit, false) {
                TdExit::EnterFailed(e) => assert_eq!(e.status.raw(), want, "{exit:?}"),
                other => panic!("{exit:?} became {other:?}"),
            }
        }
    }
}
