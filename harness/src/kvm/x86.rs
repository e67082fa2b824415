//! The vCPU run loop (arch/x86/kvm/x86.c: `kvm_arch_vcpu_ioctl_run`, `vcpu_run`,
//! `vcpu_enter_guest`) and MMU root loading (mmu.c: `kvm_mmu_reload`).

use crate::sched::Ctx;

use super::mmu::fault::MemoryFaultExit;
use super::vmx::tdvmcall::{MapGpaExit, KVM_HC_MAP_GPA_RANGE};
use super::vmx::tdx::TdExit;
use super::{Errno, GuestMode, Kvm, KvmResult, Request, TdState};

/// What KVM_RUN reports to userspace when it returns 0 or -EFAULT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunExit {
    /// KVM_EXIT_MEMORY_FAULT (with -EFAULT): convert the range, then run again.
    MemoryFault(MemoryFaultExit),
    /// KVM_EXIT_HYPERCALL(KVM_HC_MAP_GPA_RANGE): userspace converts the chunk and writes
    /// `run->hypercall.ret` ([`Kvm::set_hypercall_ret`]) before the next KVM_RUN.
    MapGpa(MapGpaExit),
    /// KVM_EXIT_INTERNAL_ERROR: an exit KVM cannot handle (TDH.VP.ENTER's status).
    InternalError(crate::tdx_module::Status),
    /// The guest program finished.
    Done,
}

impl Kvm {
    /// KVM_ENABLE_CAP(KVM_CAP_EXIT_HYPERCALL) (`kvm_vm_ioctl_enable_cap`): `mask` may name only
    /// KVM_HC_MAP_GPA_RANGE (`KVM_EXIT_HYPERCALL_VALID_MASK`), else -EINVAL.
    pub fn enable_cap_exit_hypercall(&self, mask: u64) -> KvmResult<()> {
        if mask & !(1 << KVM_HC_MAP_GPA_RANGE) != 0 {
            return Err(Errno::EINVAL);
        }
        self.st.borrow_mut().hypercall_exit_enabled = mask;
        Ok(())
    }

    /// Userspace writes `run->hypercall.ret` after a KVM_EXIT_HYPERCALL.
    pub fn set_hypercall_ret(&self, v: usize, ret: u64) {
        self.st.borrow_mut().vcpus[v].map_gpa.ret = ret;
    }

    /// KVM_RUN through `kvm_vcpu_ioctl`: under `vcpu->mutex` (so no other ioctl of this vCPU,
    /// e.g. KVM_PRE_FAULT_MEMORY, runs meanwhile), `kvm_arch_vcpu_ioctl_run`.
    pub async fn kvm_run(&self, cx: &Ctx, v: usize) -> KvmResult<RunExit> {
        // kvm_vcpu_ioctl: a dead VM answers -EIO before vcpu->mutex is taken.
        let r = if let Err(e) = self.vcpu_ioctl_gate(cx) {
            Err(e)
        } else {
            let mutex = self.st.borrow().vcpus[v].mutex;
            mutex.lock(cx).await;
            let r = self.kvm_arch_vcpu_ioctl_run(cx, v).await;
            mutex.unlock(cx).await;
            r
        };
        if let Err(e) = r {
            cx.note("KVM_RUN error", e.raw(), v as u64);
        }
        r
    }

    /// `kvm_arch_vcpu_ioctl_run` -> `vcpu_run`: loop entering the guest until an exit needs
    /// userspace; runs inside `kvm->srcu` except while the guest runs. Refused with -EIO on a
    /// dead VM (`kvm_vcpu_ioctl`), and with -EINVAL until both the TD is RUNNABLE and the vCPU
    /// INITIALIZED (`tdx_vcpu_needs_initialization`).
    async fn kvm_arch_vcpu_ioctl_run(&self, cx: &Ctx, v: usize) -> KvmResult<RunExit> {
        {
            let st = self.st.borrow();
            if st.dead {
                return Err(Errno::EIO);
            }
            if st.tdx.state != TdState::Runnable || !st.vcpus[v].initialized {
                return Err(Errno::EINVAL);
            }
        }
        let idx = self.srcu.read_lock(cx).await;
        self.st.borrow_mut().vcpus[v].srcu = Some(idx);
        // `complete_userspace_io`, cleared before it runs: <= 0 ends KVM_RUN here.
        let pending = std::mem::take(&mut self.st.borrow_mut().vcpus[v].map_gpa.complete_pending);
        let completed = if pending {
            match self.tdx_complete_vmcall_map_gpa(v) {
                Ok(0) => Some(Ok(self.take_run_exit(v))),
                Ok(_) => None,
                Err(e) => Some(Err(e)),
            }
        } else {
            None
        };
        let r = if let Some(r) = completed {
            r
        } else {
            self.vcpu_run(cx, v).await
        };
        let idx = self.st.borrow_mut().vcpus[v]
            .srcu
            .take()
            .expect("srcu held");
        self.srcu.read_unlock(cx, idx).await;
        r
    }

    /// `vcpu_run`: enter the guest until an exit needs userspace or a signal is pending.
    async fn vcpu_run(&self, cx: &Ctx, v: usize) -> KvmResult<RunExit> {
        loop {
            if self.st.borrow().vcpus[v].signal_pending {
                self.st.borrow_mut().vcpus[v].signal_pending = false;
                break Err(Errno::EINTR);
            }
            match self.vcpu_enter_guest(cx, v).await {
                Ok(n) if n > 0 => continue,
                Ok(_) => break Ok(self.take_run_exit(v)),
                Err(Errno::EFAULT) if self.st.borrow().vcpus[v].guest.memory_fault.is_some() => {
                    break Ok(self.take_run_exit(v));
                }
                Err(e) => break Err(e),
            }
        }
    }

    /// What `vcpu->run` tells userspace when KVM_RUN returns (exit_reason and its data).
    fn take_run_exit(&self, v: usize) -> RunExit {
        let mut st = self.st.borrow_mut();
        let g = &mut st.vcpus[v].guest;
        if let Some(f) = g.memory_fault.take() {
            return RunExit::MemoryFault(f);
        }
        if let Some(status) = g.internal_error.take() {
            return RunExit::InternalError(status);
        }
        if let Some(exit) = st.vcpus[v].map_gpa.exit.take() {
            return RunExit::MapGpa(exit);
        }
        RunExit::Done
    }

    /// `vcpu_enter_guest`: requests, `kvm_mmu_reload`, IN_GUEST_MODE with SRCU dropped, the
    /// last-moment exit check, the guest, then the exit handler with SRCU retaken.
    async fn vcpu_enter_guest(&self, cx: &Ctx, v: usize) -> KvmResult<i32> {
        cx.yield_at("vcpu_enter_guest").await;
        if self.request_pending(v) {
            if self.test_request(v, Request::VmDead) {
                return Err(Errno::EIO);
            }
            if self.check_request(v, Request::MmuFreeObsoleteRoots) {
                self.kvm_mmu_free_obsolete_roots(cx, v).await;
            }
            self.check_request(v, Request::TlbFlush);
        }
        self.kvm_mmu_reload(cx, v).await?;
        if !self.st.borrow().injected.skip_in_guest_mode {
            self.st.borrow_mut().vcpus[v].mode = GuestMode::InGuest;
        }
        let idx = self.st.borrow_mut().vcpus[v]
            .srcu
            .take()
            .expect("srcu held");
        self.srcu.read_unlock_now(cx, idx);
        let exit_now = {
            let st = self.st.borrow();
            let vc = &st.vcpus[v];
            vc.mode == GuestMode::ExitingGuest || vc.requests != 0 || vc.signal_pending
        };
        let exit = if exit_now {
            TdExit::FastpathHandled
        } else {
            self.tdx_vcpu_run(cx, v).await
        };
        {
            let mut st = self.st.borrow_mut();
            st.vcpus[v].mode = GuestMode::OutsideGuest;
            st.vcpus[v].exits += 1;
        }
        self.ipi_ack.wake_all(cx);
        let idx = self.srcu.read_lock_now(cx);
        self.st.borrow_mut().vcpus[v].srcu = Some(idx);
        self.tdx_handle_exit(cx, v, exit).await
    }

    /// `kvm_mmu_reload` (mmu.h): process KVM_REQ_MMU_FREE_OBSOLETE_ROOTS first (since "KVM:
    /// x86/mmu: Check and free obsolete roots in kvm_mmu_reload()", 20a6cff3), then load roots
    /// if the vCPU has none.
    pub async fn kvm_mmu_reload(&self, cx: &Ctx, v: usize) -> KvmResult<()> {
        if self.check_request(v, Request::MmuFreeObsoleteRoots) {
            self.kvm_mmu_free_obsolete_roots(cx, v).await;
        }
        self.kvm_mmu_load_roots(cx, v).await
    }

    /// The `root.hpa == INVALID_PAGE` -> `kvm_mmu_load` part of `kvm_mmu_reload`: top up the
    /// MMU caches (-ENOMEM), then allocate the mirror root if missing and a direct root if the
    /// current one is gone. Policy `sept_off_to_side` has no mirror root (the TDP MMU maps
    /// shared memory only).
    pub async fn kvm_mmu_load_roots(&self, cx: &Ctx, v: usize) -> KvmResult<()> {
        let (has_mirror, root_ok) = {
            let st = self.st.borrow();
            let vc = &st.vcpus[v];
            (
                vc.mirror_root.is_some(),
                vc.root.is_some_and(|r| st.mmu.sps.contains_key(&r)),
            )
        };
        if root_ok {
            return Ok(());
        }
        self.mmu_topup_memory_caches(v)?;
        if !has_mirror && !self.policy.sept_off_to_side {
            let m = self.tdp_mmu_alloc_root(cx, v, true).await?;
            self.st.borrow_mut().vcpus[v].mirror_root = Some(m);
        }
        let r = self.tdp_mmu_alloc_root(cx, v, false).await?;
        self.st.borrow_mut().vcpus[v].root = Some(r);
        Ok(())
    }

    /// `kvm_mmu_free_obsolete_roots` -> `kvm_mmu_free_roots`: drop the vCPU's reference to an
    /// invalid direct root (the mirror root is never examined), under mmu_lock for read (the
    /// TDP MMU is active).
    pub async fn kvm_mmu_free_obsolete_roots(&self, cx: &Ctx, v: usize) {
        let obsolete = {
            let st = self.st.borrow();
            st.vcpus[v]
                .root
                .is_some_and(|r| st.mmu.sps.get(&r).is_some_and(|s| s.invalid))
        };
        if !obsolete {
            return;
        }
        self.mmu_lock.read(cx).await;
        let root = self.st.borrow_mut().vcpus[v].root.take();
        if let Some(r) = root {
            self.tdp_mmu_put_root(cx, r).await;
        }
        self.mmu_lock.read_unlock(cx).await;
    }
}
