//! Building a TD (arch/x86/kvm/vmx/tdx.c, virt/kvm/guest_memfd.c, arch/x86/kvm/mmu/mmu.c): the
//! VM-state guard that the state-changing TDX ioctls take, and KVM_TDX_INIT_MEM_REGION:
//! `tdx_vcpu_init_mem_region` -> per page `kvm_gmem_populate` -> `tdx_gmem_post_populate` ->
//! `kvm_tdp_mmu_map_private_pfn`, whose mirror-leaf install makes the S-EPT set hook issue
//! TDH.MEM.PAGE.ADD of `page_add_src` (the TD is not runnable yet), then TDH.MR.EXTEND.
//!
//! Not modelled: KVM_TDX_INIT_MEM_REGION's other flags, and the in-place conversion (LN+) that
//! allows a zero `source_addr`.

use crate::addr::{Gfn, Gpa, Pfn, PAGE_SIZE};
use crate::host::{AllocFor, KernelUse};
use crate::sched::{Ctx, Mutex};

use crate::kvm::mmu::fault::{PageFault, RetPf};
use crate::kvm::{Errno, Kvm, KvmResult, Request, TdState};

/// What the VM-state guard holds (`tdx_acquire_vm_state_locks`): released in reverse.
#[derive(Debug)]
#[must_use = "the VM-state locks must be released"]
pub struct VmStateLocks {
    vcpus: Vec<Mutex>,
}

/// `struct kvm_tdx_init_mem_region`; upstream copies it back with the progress made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TdxInitMemRegion {
    /// Userspace address of the source buffer: page-aligned and nonzero.
    pub source_addr: u64,
    /// First private GPA (shared bit clear), page-aligned.
    pub gpa: u64,
    pub nr_pages: u64,
}

/// The userspace source buffer at `source_addr`, page by page (the model keeps one value per
/// page).
#[derive(Clone, Copy, Debug)]
pub enum InitMemSource<'a> {
    /// Every page holds this value.
    Fill(u64),
    /// These pages; addresses past the end are not mapped (`get_user_pages_fast` fails).
    Pages(&'a [u64]),
}

impl InitMemSource<'_> {
    /// The content of the `k`-th page, if it is mapped.
    fn page(self, k: u64) -> Option<u64> {
        match self {
            InitMemSource::Fill(v) => Some(v),
            InitMemSource::Pages(p) => usize::try_from(k).ok().and_then(|k| p.get(k).copied()),
        }
    }
}

/// Where `tdx_vcpu_init_mem_region`'s convenience form places its source buffer.
pub const INIT_MEM_SOURCE_ADDR: u64 = 0x7f00_0000_0000;

/// Bytes TDH.MR.EXTEND measures per call (16 calls per 4K page).
const MR_EXTEND_CHUNK: u64 = 256;

impl Kvm {
    /// `tdx_acquire_vm_state_locks`: kvm->lock, then every vCPU's vcpu->mutex
    /// (`kvm_lock_all_vcpus`), then slots_lock. (A killable lock would give -EINTR to a fatal
    /// signal; the model's VMM gets none.)
    pub async fn tdx_acquire_vm_state_locks(&self, cx: &Ctx) -> VmStateLocks {
        self.lock.lock(cx).await;
        let vcpus: Vec<Mutex> = self.st.borrow().vcpus.iter().map(|v| v.mutex).collect();
        for m in &vcpus {
            m.lock(cx).await;
        }
        self.slots_lock.lock(cx).await;
        VmStateLocks { vcpus }
    }

    /// `tdx_release_vm_state_locks`: slots_lock, the vCPUs' mutexes, kvm->lock.
    pub async fn tdx_release_vm_state_locks(&self, cx: &Ctx, locks: VmStateLocks) {
        self.slots_lock.unlock(cx).await;
        for m in locks.vcpus.iter().rev() {
            m.unlock(cx).await;
        }
        self.lock.unlock(cx).await;
    }

    /// KVM_TDX_INIT_MEM_REGION (`tdx_vcpu_init_mem_region`) on vCPU `v` from a userspace buffer
    /// of `nr_pages` pages that each hold `src_value`, at [`INIT_MEM_SOURCE_ADDR`]; see
    /// [`Kvm::kvm_tdx_init_mem_region`].
    pub async fn tdx_vcpu_init_mem_region(
        &self,
        cx: &Ctx,
        v: usize,
        gpa: Gpa,
        src_value: u64,
        nr_pages: u64,
        measure: bool,
    ) -> KvmResult<()> {
        let mut region = TdxInitMemRegion {
            source_addr: INIT_MEM_SOURCE_ADDR,
            gpa: gpa.raw(),
            nr_pages,
        };
        self.kvm_tdx_init_mem_region(cx, v, &mut region, measure, InitMemSource::Fill(src_value))
            .await
    }

    /// KVM_MEMORY_ENCRYPT_OP(KVM_TDX_INIT_MEM_REGION) on vCPU `v` (`kvm_vcpu_ioctl` ->
    /// `tdx_vcpu_unlocked_ioctl`): -EIO on a dead VM; the VM-state guard; -EINVAL without an
    /// HKID or once RUNNABLE; then `tdx_vcpu_init_mem_region`. `measure` is
    /// KVM_TDX_MEASURE_MEMORY_REGION. `region` is left with the progress made, whatever the
    /// result (upstream always copies it back).
    pub async fn kvm_tdx_init_mem_region(
        &self,
        cx: &Ctx,
        v: usize,
        region: &mut TdxInitMemRegion,
        measure: bool,
        source: InitMemSource<'_>,
    ) -> KvmResult<()> {
        self.vcpu_ioctl_gate(cx)?;
        let locks = self.tdx_acquire_vm_state_locks(cx).await;
        let refused = {
            let st = self.st.borrow();
            st.tdx.hkid.is_none() || st.tdx.state == TdState::Runnable
        };
        let r = if refused {
            Err(Errno::EINVAL)
        } else {
            self.init_mem_region_locked(cx, v, region, measure, source)
                .await
        };
        self.tdx_release_vm_state_locks(cx, locks).await;
        r
    }

    /// `tdx_vcpu_init_mem_region` proper (guard held, vCPU loaded): the vCPU must be
    /// INITIALIZED and the TD not RUNNABLE; `source_addr` and `gpa` page-aligned, `source_addr`
    /// nonzero, `nr_pages` > 0 without overflow, first and last GPA private (shared bit clear);
    /// all -EINVAL. Then one `kvm_gmem_populate` per page: a signal gives -EINTR, an error is
    /// returned as is, a count other than 1 is -EIO.
    async fn init_mem_region_locked(
        &self,
        cx: &Ctx,
        v: usize,
        region: &mut TdxInitMemRegion,
        measure: bool,
        source: InitMemSource<'_>,
    ) -> KvmResult<()> {
        {
            let st = self.st.borrow();
            if !st.vcpus[v].initialized || st.tdx.state == TdState::Runnable {
                return Err(Errno::EINVAL);
            }
        }
        let end = region
            .nr_pages
            .checked_mul(PAGE_SIZE)
            .and_then(|b| region.gpa.checked_add(b));
        let args_ok = region.source_addr.is_multiple_of(PAGE_SIZE)
            && region.source_addr != 0
            && region.gpa.is_multiple_of(PAGE_SIZE)
            && region.nr_pages > 0
            && end.is_some_and(|e| {
                e > region.gpa && !Gpa::new(region.gpa).is_shared() && !Gpa::new(e - 1).is_shared()
            });
        if !args_ok {
            return Err(Errno::EINVAL);
        }
        let mut k = 0;
        while region.nr_pages > 0 {
            if self.take_signal(v) {
                return Err(Errno::EINTR);
            }
            let gfn = Gpa::new(region.gpa).gfn();
            match self
                .kvm_gmem_populate(cx, v, gfn, source.page(k), measure)
                .await?
            {
                1 => {}
                _ => return Err(Errno::EIO),
            }
            region.source_addr += PAGE_SIZE;
            region.gpa += PAGE_SIZE;
            region.nr_pages -= 1;
            k += 1;
            cx.yield_at("tdx_vcpu_init_mem_region:cond_resched").await;
        }
        Ok(())
    }

    /// `kvm_gmem_populate(kvm, gfn, src, 1, tdx_gmem_post_populate, ..)` (slots_lock held): the
    /// gfn's memslot must be bound to a guest_memfd (-EINVAL; the model's `kvm_gmem_release`
    /// unbinds the slot, so a released file is -EINVAL here where upstream's NULL
    /// `slot->gmem.file` gives -EFAULT); the file's invalidate lock is held across the page, so a
    /// punch-hole cannot truncate it in between; a signal gives -EINTR; the source user page
    /// must be mapped (-EFAULT) and is held as a kernel page for the callback, then released.
    /// Returns the pages populated (1).
    async fn kvm_gmem_populate(
        &self,
        cx: &Ctx,
        v: usize,
        gfn: Gfn,
        src: Option<u64>,
        measure: bool,
    ) -> KvmResult<u64> {
        debug_assert!(self.slots_lock.held_by_current(cx));
        let binding = self
            .st
            .borrow()
            .memslots
            .lookup(gfn)
            .and_then(|s| s.gmem_index(gfn));
        let Some((file, index)) = binding else {
            return Err(Errno::EINVAL);
        };
        let Some(lock) = self.gmem_invalidate_lock(cx, file) else {
            return Err(Errno::EFAULT);
        };
        lock.lock(cx).await;
        let r = self
            .kvm_gmem_populate_locked(cx, v, gfn, file, index, src, measure)
            .await;
        lock.unlock(cx).await;
        r
    }

    /// The body of `kvm_gmem_populate` under the file's invalidate lock.
    #[allow(clippy::too_many_arguments)]
    async fn kvm_gmem_populate_locked(
        &self,
        cx: &Ctx,
        v: usize,
        gfn: Gfn,
        file: crate::ids::GmemId,
        index: crate::ids::PgOff,
        src: Option<u64>,
        measure: bool,
    ) -> KvmResult<u64> {
        if self.take_signal(v) {
            return Err(Errno::EINTR);
        }
        // get_user_pages_fast on the source address.
        let value = src.ok_or(Errno::EFAULT)?;
        let src_page = {
            let mut h = self.host.borrow_mut();
            let p = h
                .ledger
                .alloc(AllocFor::Kernel(KernelUse::Other))
                .map_err(|_| Errno::ENOMEM)?;
            h.write(p, value);
            p
        };
        let r = self
            .gmem_populate_page(cx, v, gfn, file, index, src_page, measure)
            .await;
        if r.is_ok() {
            let step = cx.step();
            self.st.borrow_mut().mem_log.push((
                step,
                crate::kvm::MemEvent::Added {
                    gfn,
                    content: value,
                },
            ));
        }
        // put_page of the source page.
        let mut h = self.host.borrow_mut();
        h.write(src_page, 0);
        let f = h.ledger.free(src_page);
        h.record(cx.step(), f);
        r.map(|()| 1)
    }

    /// `__kvm_gmem_populate` for one gfn: get the folio (allocated if absent, not prepared);
    /// already prepared -> -EEXIST; not PRIVATE in the attributes -> -EINVAL; then the
    /// callback, and on success the folio is marked prepared.
    #[allow(clippy::too_many_arguments)]
    async fn gmem_populate_page(
        &self,
        cx: &Ctx,
        v: usize,
        gfn: Gfn,
        file: crate::ids::GmemId,
        index: crate::ids::PgOff,
        src_page: Pfn,
        measure: bool,
    ) -> KvmResult<()> {
        let pfn = {
            let mut st = self.st.borrow_mut();
            let f = st.gmem.files.get_mut(&file).ok_or(Errno::EFAULT)?;
            if index.0 >= f.npages {
                return Err(Errno::EIO);
            }
            match f.pages.get(&index) {
                Some(p) => *p,
                None => {
                    let mut h = self.host.borrow_mut();
                    let p = h
                        .ledger
                        .alloc(AllocFor::GuestMemfd { file, index })
                        .map_err(|_| Errno::ENOMEM)?;
                    h.write(p, 0);
                    f.pages.insert(index, p);
                    p
                }
            }
        };
        {
            let st = self.st.borrow();
            if st.gmem.files[&file].prepared.contains(&index) {
                return Err(Errno::EEXIST);
            }
            if !st.attributes.is_private(gfn) {
                return Err(Errno::EINVAL);
            }
        }
        self.tdx_gmem_post_populate(cx, v, gfn, pfn, src_page, measure)
            .await?;
        if let Some(f) = self.st.borrow_mut().gmem.files.get_mut(&file) {
            f.prepared.insert(index);
        }
        Ok(())
    }

    /// `tdx_gmem_post_populate`: with `page_add_src` set to the source page (already set:
    /// KVM_BUG_ON, -EIO), map the private pfn (the S-EPT hook PAGE.ADDs it; policy
    /// `sept_off_to_side` maps it off to the side, under `sept_lock`); then, if measured,
    /// TDH.MR.EXTEND each 256-byte chunk (an error bugs the VM: -EIO; the page stays added).
    async fn tdx_gmem_post_populate(
        &self,
        cx: &Ctx,
        v: usize,
        gfn: Gfn,
        pfn: Pfn,
        src_page: Pfn,
        measure: bool,
    ) -> KvmResult<()> {
        if self.st.borrow().tdx.page_add_src.is_some() {
            self.bug(
                cx,
                "tdx_gmem_post_populate",
                "page_add_src already set".into(),
            )
            .await;
            return Err(Errno::EIO);
        }
        self.st.borrow_mut().tdx.page_add_src = Some(src_page);
        let r = if self.policy.sept_off_to_side {
            // Seed 001: PAGE.ADD straight into the S-EPT, under the one lock.
            self.sept_lock.lock(cx).await;
            let r = self.sept_side_map_page(cx, gfn, pfn).await;
            self.sept_lock.unlock(cx).await;
            r
        } else {
            self.kvm_tdp_mmu_map_private_pfn(cx, v, gfn, pfn).await
        };
        self.st.borrow_mut().tdx.page_add_src = None;
        r?;
        if !measure {
            return Ok(());
        }
        let tdr = self.st.borrow().tdx.tdr.expect("TD created");
        for i in 0..PAGE_SIZE / MR_EXTEND_CHUNK {
            let gpa = Gpa::new(gfn.gpa().raw() + i * MR_EXTEND_CHUNK);
            if let Err(e) = self.module.tdh_mr_extend(cx, tdr, gpa).await {
                self.bug(cx, "tdx_gmem_post_populate", format!("TDH.MR.EXTEND: {e}"))
                    .await;
                return Err(Errno::EIO);
            }
        }
        Ok(())
    }

    /// `kvm_tdp_mmu_map_private_pfn` (slots_lock held): a prefetch private fault for `pfn`
    /// pinned to 4K, retried while RET_PF_RETRY; each attempt stops for a signal (-EINTR) or a
    /// dead VM (KVM_REQ_VM_DEAD by test: -EIO), runs `kvm_mmu_reload` and
    /// `mmu_topup_memory_caches` (7.3: every attempt; `prefault_reload_once`: once, first),
    /// then under mmu_lock for read WARNs on a pending KVM_REQ_MMU_FREE_OBSOLETE_ROOTS (slots_lock
    /// keeps roots valid), retries a stale fault (`is_page_fault_stale`) and calls
    /// `kvm_tdp_mmu_map`. A final result other than RET_PF_FIXED is -EIO.
    pub async fn kvm_tdp_mmu_map_private_pfn(
        &self,
        cx: &Ctx,
        v: usize,
        gfn: Gfn,
        pfn: Pfn,
    ) -> KvmResult<()> {
        debug_assert!(self.slots_lock.held_by_current(cx));
        let mut fault = PageFault {
            addr: gfn.gpa(),
            gfn,
            is_private: true,
            write: false,
            exec: false,
            prefetch: true,
            goal_level: crate::addr::PgLevel::L4K,
            pfn: Some(pfn),
            mmu_seq: 0,
        };
        let each_retry = self.policy.prefault_reload_each_retry;
        if !each_retry {
            self.kvm_mmu_reload(cx, v).await?;
            self.mmu_topup_memory_caches(v)?;
        }
        // Early returns leave the count behind; the next loop starts from zero.
        cx.retry_end();
        let r = loop {
            if self.take_signal(v) {
                return Err(Errno::EINTR);
            }
            if self.test_request(v, Request::VmDead) {
                return Err(Errno::EIO);
            }
            if self.st.borrow().invalidate.in_flight_over(gfn) {
                cx.retry_waiting("kvm_tdp_mmu_map_private_pfn");
            } else {
                cx.retry("kvm_tdp_mmu_map_private_pfn");
            }
            if each_retry {
                self.kvm_mmu_reload(cx, v).await?;
                self.mmu_topup_memory_caches(v)?;
            }
            cx.yield_at("kvm_tdp_mmu_map_private_pfn:cond_resched")
                .await;
            self.mmu_lock.read(cx).await;
            let r = if each_retry {
                if self.test_request(v, Request::MmuFreeObsoleteRoots) {
                    self.warn(
                        cx,
                        "kvm_tdp_mmu_map_private_pfn",
                        "KVM_REQ_MMU_FREE_OBSOLETE_ROOTS pending under slots_lock".into(),
                    );
                }
                fault.mmu_seq = self.st.borrow().invalidate.seq;
                if self.is_page_fault_stale(v, &fault) {
                    RetPf::Retry
                } else {
                    self.kvm_tdp_mmu_map(cx, v, &fault).await
                }
            } else {
                self.kvm_tdp_mmu_map(cx, v, &fault).await
            };
            self.mmu_lock.read_unlock(cx).await;
            if r != RetPf::Retry {
                break r;
            }
        };
        cx.retry_end();
        if r == RetPf::Fixed {
            Ok(())
        } else {
            Err(Errno::EIO)
        }
    }
}
