//! KVM_PRE_FAULT_MEMORY (virt/kvm/kvm_main.c: `kvm_vcpu_pre_fault_memory`; arch/x86/kvm/mmu/
//! mmu.c: `kvm_arch_vcpu_pre_fault_memory`, `kvm_tdp_map_page`) and the seed-004 designs for a
//! memslot deleted or moved under it (`Policy::prefault_invalid_slot`).
//!
//! The ioctl holds `kvm->srcu` across its whole loop, and a memslot deletion waits in
//! `synchronize_srcu` (holding slots_lock) with the slot already INVALID. Upstream the fault
//! path answers a prefetch fault on an INVALID slot with -EAGAIN (mmu/fault.rs), the ioctl
//! returns it, SRCU is released and the deletion finishes; userspace retries. The variants:
//! - `RetryHoldingSrcu` (the kernel before that fix: RET_PF_RETRY for every fault on an INVALID
//!   slot): `kvm_tdp_map_page` retries with SRCU held. The retry can only succeed once the
//!   update holding slots_lock is done, and the update waits for this SRCU reader: a deadlock.
//!   The retry point is a spin-wait on slots_lock so the liveness oracle sees the cycle.
//! - `DropSrcuNoReload` (the first `kvm_tdp_prefault_page` sketch in seed 004): on -EAGAIN drop
//!   and retake SRCU and retry. The update now finishes, but if the vCPU's direct root went
//!   obsolete meanwhile (`kvm_mmu_zap_all_fast`, mmu/invalidate.rs: MMIO-generation wrap or
//!   nx_huge_pages toggle; a TDX memslot deletion itself invalidates no root), every later
//!   fault of a shared GPA is stale (`is_page_fault_stale`) and `kvm_tdp_map_page` retries
//!   forever.
//! - `ReloadNoFreeObsolete` (with the `kvm_mmu_reload` Yan Zhao added): still stuck, because
//!   that `kvm_mmu_reload` only loads a root when the vCPU has none, and only processing
//!   KVM_REQ_MMU_FREE_OBSOLETE_ROOTS drops the obsolete one (Sean Christopherson's reply).
//!
//! These designs were argued against the 6.15-7.2 loop (policy `prefault_reload_once`), which
//! loads the roots once per chunk. In 7.3 `kvm_tdp_page_prefault` calls `kvm_mmu_reload` (which
//! processes KVM_REQ_MMU_FREE_OBSOLETE_ROOTS first) on every retry, so a fast zap no longer
//! strands the loop.

use crate::addr::{Gpa, PgLevel, PAGE_SIZE};
use crate::policy::PrefaultOnInvalidSlot;
use crate::sched::{Ctx, Point, SrcuIdx, WaitOn};

use super::fault::RetPf;
use crate::kvm::{Errno, Kvm, KvmResult, Request};

impl Kvm {
    /// `kvm_vcpu_pre_fault_memory` (KVM_PRE_FAULT_MEMORY, reached through `kvm_vcpu_ioctl`:
    /// -EIO on a dead VM, then vcpu->mutex): map `[gpa, gpa + size)` chunk by chunk with SRCU
    /// held across the loop. Returns the bytes mapped; an error only if nothing was mapped
    /// (upstream then returns 0 with the range advanced, for userspace to resume).
    pub async fn kvm_vcpu_pre_fault_memory(
        &self,
        cx: &Ctx,
        v: usize,
        gpa: Gpa,
        size: u64,
    ) -> KvmResult<u64> {
        self.vcpu_ioctl_gate(cx)?;
        let mutex = self.st.borrow().vcpus[v].mutex;
        mutex.lock(cx).await;
        let r = self.pre_fault_memory_loop(cx, v, gpa, size).await;
        mutex.unlock(cx).await;
        r
    }

    /// The body of `kvm_vcpu_pre_fault_memory` under vcpu->mutex: argument checks, then the
    /// loop inside `kvm->srcu`.
    async fn pre_fault_memory_loop(
        &self,
        cx: &Ctx,
        v: usize,
        gpa: Gpa,
        size: u64,
    ) -> KvmResult<u64> {
        if gpa.page_offset() != 0
            || !size.is_multiple_of(PAGE_SIZE)
            || gpa
                .raw()
                .checked_add(size)
                .is_none_or(|end| end <= gpa.raw())
        {
            return Err(Errno::EINVAL);
        }
        // KVM_PRE_FAULT_MEMORY has no KVM_RUN exit to report: whatever exit information the
        // fault path leaves in the run struct is not a pending exit of the next KVM_RUN.
        let run_exit = self.st.borrow().vcpus[v].guest.memory_fault;
        let mut idx = self.srcu.read_lock(cx).await;
        let (mut at, mut left) = (gpa, size);
        let err = loop {
            if left == 0 {
                break None;
            }
            if self.take_signal(v) {
                break Some(Errno::EINTR);
            }
            match self
                .kvm_arch_vcpu_pre_fault_memory(cx, v, at, left, &mut idx)
                .await
            {
                // WARN_ON_ONCE(r == 0 || r == -EIO), then stop with r.
                Ok(0) => {
                    self.warn(
                        cx,
                        "kvm_vcpu_pre_fault_memory",
                        format!("{at}: no progress"),
                    );
                    break None;
                }
                Err(Errno::EIO) => {
                    self.warn(cx, "kvm_vcpu_pre_fault_memory", format!("{at}: -EIO"));
                    break Some(Errno::EIO);
                }
                Err(e) => break Some(e),
                Ok(n) => {
                    at = Gpa::new(at.raw() + n);
                    left -= n;
                    cx.yield_at("kvm_vcpu_pre_fault_memory:cond_resched").await;
                }
            }
        };
        self.srcu.read_unlock(cx, idx).await;
        self.st.borrow_mut().vcpus[v].guest.memory_fault = run_exit;
        match err {
            Some(e) if left == size => Err(e),
            _ => Ok(size - left),
        }
    }

    /// `signal_pending(current)` for the vCPU's thread; the signal is delivered (cleared) as the
    /// ioctl returns -EINTR.
    pub(crate) fn take_signal(&self, v: usize) -> bool {
        let mut st = self.st.borrow_mut();
        std::mem::replace(&mut st.vcpus[v].signal_pending, false)
    }

    /// `kvm_arch_vcpu_pre_fault_memory`: one mapping. -EOPNOTSUPP until the TD is finalized
    /// (`kvm_arch_pre_fault_allowed`), -EINVAL for an alias (shared-bit) GPA; the fault is
    /// private if the gfn's attributes say so, else the GPA gets the shared bit. Returns the
    /// bytes the mapping covers from `gpa`. The roots are (re)loaded in the retry loop (7.3);
    /// policy `prefault_reload_once` loads them here, once (6.15 to 7.2).
    async fn kvm_arch_vcpu_pre_fault_memory(
        &self,
        cx: &Ctx,
        v: usize,
        gpa: Gpa,
        size: u64,
        srcu: &mut SrcuIdx,
    ) -> KvmResult<u64> {
        if !self.st.borrow().tdx.pre_fault_allowed {
            return Err(Errno::EOPNOTSUPP);
        }
        if gpa.is_shared() {
            return Err(Errno::EINVAL);
        }
        if !self.policy.prefault_reload_each_retry {
            self.kvm_mmu_reload(cx, v).await?;
        }
        let private = self.st.borrow().attributes.is_private(gpa.gfn());
        let addr = if private { gpa } else { gpa.to_shared() };
        let level = self
            .kvm_tdp_prefault_page(cx, v, addr, private, srcu)
            .await?;
        let end = (gpa.raw() & !(level.bytes() - 1)) + level.bytes();
        Ok(size.min(end - gpa.raw()))
    }

    /// `kvm_tdp_map_page` as the prefault calls it. Upstream calls it once. The drop-SRCU
    /// designs wrap it as the `kvm_tdp_prefault_page` sketch of seed 004 does: on -EAGAIN (an
    /// INVALID slot) drop and retake SRCU and retry; `ReloadNoFreeObsolete` also runs
    /// `kvm_mmu_reload` after retaking it.
    async fn kvm_tdp_prefault_page(
        &self,
        cx: &Ctx,
        v: usize,
        addr: Gpa,
        private: bool,
        srcu: &mut SrcuIdx,
    ) -> KvmResult<PgLevel> {
        loop {
            let r = self.kvm_tdp_map_page(cx, v, addr, private).await;
            let reload = match (r, self.policy.prefault_invalid_slot) {
                (Err(Errno::EAGAIN), PrefaultOnInvalidSlot::DropSrcuNoReload) => false,
                (Err(Errno::EAGAIN), PrefaultOnInvalidSlot::ReloadNoFreeObsolete) => true,
                _ => return r,
            };
            self.srcu.read_unlock(cx, *srcu).await;
            cx.yield_at("kvm_tdp_prefault_page:srcu_dropped").await;
            *srcu = self.srcu.read_lock(cx).await;
            if reload {
                self.kvm_mmu_reload_keep_obsolete(cx, v).await?;
            }
        }
    }

    /// `kvm_mmu_reload` before 20a6cff3 (the `ReloadNoFreeObsolete` design): a root is loaded
    /// only if the vCPU has none (`root.hpa == INVALID_PAGE`), so an obsolete one stays.
    async fn kvm_mmu_reload_keep_obsolete(&self, cx: &Ctx, v: usize) -> KvmResult<()> {
        if self.st.borrow().vcpus[v].root.is_some() {
            return Ok(());
        }
        self.kvm_mmu_load_roots(cx, v).await
    }

    /// `kvm_tdp_page_prefault` (`kvm_tdp_map_page` before 7.3): prefetch faults while the
    /// result is RET_PF_RETRY, stopping for a signal (-EINTR) or a dead VM (KVM_REQ_VM_DEAD by
    /// test: -EIO), and `kvm_mmu_reload` before each attempt, which frees a root a fast zap
    /// made obsolete. Policy `prefault_reload_once` (6.15 to 7.2) neither reloads here nor
    /// leaves the request set (`kvm_check_request`). FIXED, SPURIOUS and WRITE_PROTECTED map to
    /// the level mapped (the model maps 4K), EMULATE (no memslot) to -ENOENT, anything else to
    /// a WARN and -EIO. Under `RetryHoldingSrcu` an INVALID slot is one more RET_PF_RETRY (the
    /// pre-fix fault path), spinning on the update that holds slots_lock.
    async fn kvm_tdp_map_page(
        &self,
        cx: &Ctx,
        v: usize,
        addr: Gpa,
        private: bool,
    ) -> KvmResult<PgLevel> {
        let retry_invalid_slot =
            self.policy.prefault_invalid_slot == PrefaultOnInvalidSlot::RetryHoldingSrcu;
        let mut invalid_slot = false;
        let r = loop {
            if self.take_signal(v) {
                break Err(Errno::EINTR);
            }
            let reload = self.policy.prefault_reload_each_retry;
            let dead = if reload {
                self.test_request(v, Request::VmDead)
            } else {
                self.check_request(v, Request::VmDead)
            };
            if dead {
                break Err(Errno::EIO);
            }
            if reload {
                if let Err(e) = self.kvm_mmu_reload(cx, v).await {
                    break Err(e);
                }
            }
            if self.st.borrow().invalidate.in_flight_over(addr.gfn()) {
                cx.retry_waiting("kvm_tdp_map_page");
            } else {
                // The last attempt's INVALID memslot decides how this one waits.
                cx.retry_carrying("kvm_tdp_map_page", u64::from(invalid_slot));
            }
            let point = Point::Yield("kvm_tdp_map_page:cond_resched");
            if invalid_slot {
                // Only the memslot update (under slots_lock) can end this retry.
                cx.spin_on(point, WaitOn::Mutex(self.slots_lock.id())).await;
            } else {
                cx.yield_now(point).await;
            }
            match self
                .kvm_mmu_do_page_fault(cx, v, addr, false, false, private, true)
                .await
            {
                Ok(RetPf::Retry) => invalid_slot = false,
                Err(Errno::EAGAIN) if retry_invalid_slot => invalid_slot = true,
                other => break other,
            }
        };
        cx.spin_end();
        cx.retry_end();
        match r? {
            RetPf::Fixed | RetPf::Spurious | RetPf::WriteProtected => Ok(PgLevel::L4K),
            RetPf::Emulate => Err(Errno::ENOENT),
            other => {
                self.warn(
                    cx,
                    "kvm_tdp_map_page",
                    format!("unexpected {other:?} for {addr}"),
                );
                Err(Errno::EIO)
            }
        }
    }
}
