//! The page-fault path (arch/x86/kvm/mmu/mmu.c, mmu_internal.h, tdp_mmu.c:kvm_tdp_mmu_map).

use crate::addr::{Gfn, Gpa, Pfn, PgLevel};
use crate::sched::{Ctx, Point};

use super::spte::Spte;
use super::tdp_mmu::SetFail;
use crate::kvm::{Errno, Kvm, KvmResult};

/// `enum ret_pf` (mmu_internal.h); errors are `Err(Errno)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RetPf {
    Continue,
    Retry,
    Emulate,
    WriteProtected,
    Invalid,
    Fixed,
    Spurious,
}

/// `struct kvm_page_fault`, the fields the model uses.
#[derive(Clone, Copy, Debug)]
pub struct PageFault {
    pub addr: Gpa,
    pub gfn: Gfn,
    pub is_private: bool,
    pub write: bool,
    pub exec: bool,
    pub prefetch: bool,
    pub goal_level: PgLevel,
    pub pfn: Option<Pfn>,
    pub mmu_seq: u64,
}

/// How the lock-free part of faultin ended.
enum Faultin {
    Pfn(Pfn),
    Ret(RetPf),
    Err(Errno),
    /// Also report KVM_EXIT_MEMORY_FAULT.
    MemoryFault(Errno),
}

/// The exit KVM_RUN reports with -EFAULT for a private/shared mismatch or a guest_memfd error
/// (`kvm_mmu_prepare_memory_fault_exit`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryFaultExit {
    pub gpa: Gpa,
    pub private: bool,
}

impl Kvm {
    /// `kvm_mmu_page_fault` for an EPT violation of vCPU `v` (the TDX exit handler's caller).
    pub async fn kvm_mmu_page_fault(
        &self,
        cx: &Ctx,
        v: usize,
        gpa: Gpa,
        write: bool,
        exec: bool,
        private: bool,
    ) -> KvmResult<RetPf> {
        if self.st.borrow().vcpus[v].root.is_none() {
            self.warn(cx, "kvm_mmu_page_fault", "no valid root".into());
            return Ok(RetPf::Retry);
        }
        let r = self
            .kvm_mmu_do_page_fault(cx, v, gpa, write, exec, private, false)
            .await?;
        if r == RetPf::Invalid {
            self.bug(cx, "kvm_mmu_page_fault", "RET_PF_INVALID".into())
                .await;
            return Err(Errno::EIO);
        }
        Ok(r)
    }

    /// `kvm_mmu_do_page_fault` -> `kvm_tdp_page_fault` -> `kvm_tdp_mmu_page_fault`.
    #[allow(clippy::too_many_arguments)]
    pub async fn kvm_mmu_do_page_fault(
        &self,
        cx: &Ctx,
        v: usize,
        gpa: Gpa,
        write: bool,
        exec: bool,
        private: bool,
        prefetch: bool,
    ) -> KvmResult<RetPf> {
        let mut fault = PageFault {
            addr: gpa,
            gfn: gpa.gfn(),
            is_private: private,
            write,
            exec,
            prefetch,
            // TDX's private_max_mapping_level is 4K; the model maps shared memory at 4K too.
            goal_level: PgLevel::L4K,
            pfn: None,
            mmu_seq: 0,
        };
        cx.yield_now(Point::YieldArg("kvm_tdp_mmu_page_fault", gpa.raw()))
            .await;
        if private && self.policy.sept_off_to_side {
            // Seed 001: the S-EPT is managed off to the side and never faulted.
            return self.sept_side_private_fault(v, gpa, prefetch);
        }
        self.mmu_topup_memory_caches(v)?;
        let mut r = self.kvm_mmu_faultin_pfn(cx, v, &mut fault).await?;
        if r == RetPf::Continue {
            self.mmu_lock.read(cx).await;
            r = if self.is_page_fault_stale(v, &fault) {
                RetPf::Retry
            } else {
                self.kvm_tdp_mmu_map(cx, v, &fault).await
            };
            self.mmu_lock.read_unlock(cx).await;
        }
        if r == RetPf::Emulate && fault.is_private {
            // A private fault must never need emulation.
            self.set_memory_fault_exit(v, fault.addr, true);
            return Err(Errno::EFAULT);
        }
        Ok(r)
    }

    /// Records KVM_EXIT_MEMORY_FAULT for KVM_RUN to report.
    pub(crate) fn set_memory_fault_exit(&self, v: usize, gpa: Gpa, private: bool) {
        self.st.borrow_mut().vcpus[v].guest.memory_fault = Some(MemoryFaultExit {
            gpa: gpa.to_private(),
            private,
        });
    }

    /// `kvm_mmu_faultin_pfn`: mismatch with the memory attributes, invalid slot, invalidation
    /// in progress, then the pfn from guest_memfd (private) or userspace memory (shared).
    async fn kvm_mmu_faultin_pfn(
        &self,
        cx: &Ctx,
        v: usize,
        fault: &mut PageFault,
    ) -> KvmResult<RetPf> {
        match self.faultin_locked(fault) {
            Faultin::Pfn(pfn) => fault.pfn = Some(pfn),
            Faultin::Ret(r) => return Ok(r),
            Faultin::Err(e) => return Err(e),
            Faultin::MemoryFault(e) => {
                self.set_memory_fault_exit(v, fault.addr, fault.is_private);
                return Err(e);
            }
        }
        cx.yield_at("kvm_mmu_faultin_pfn").await;
        if Self::invalidate_retry(&self.st.borrow().invalidate, fault.mmu_seq, fault.gfn) {
            return Ok(RetPf::Retry);
        }
        Ok(RetPf::Continue)
    }

    /// The part of `kvm_mmu_faultin_pfn` up to having the pfn, with no yield point.
    fn faultin_locked(&self, fault: &mut PageFault) -> Faultin {
        let mut st = self.st.borrow_mut();
        let st = &mut *st;
        fault.mmu_seq = st.invalidate.seq;
        if fault.is_private != st.attributes.is_private(fault.gfn) {
            return Faultin::MemoryFault(Errno::EFAULT);
        }
        let Some(slot) = st.memslots.lookup_mut(fault.gfn) else {
            // No memslot: MMIO (`kvm_handle_noslot_fault`); a TD's MMIO is emulated.
            return Faultin::Ret(RetPf::Emulate);
        };
        if slot.invalid {
            crate::coverage::hit(
                crate::coverage::Site::InvalidSlot,
                u64::from(fault.prefetch),
                0,
            );
            // Deleted or moved under us (seed 004): prefetch punts to userspace.
            if fault.prefetch {
                return Faultin::Err(Errno::EAGAIN);
            }
            return Faultin::Ret(RetPf::Retry);
        }
        if Self::invalidate_retry(&st.invalidate, fault.mmu_seq, fault.gfn) {
            return Faultin::Ret(RetPf::Retry);
        }
        let mut host = self.host.borrow_mut();
        if fault.is_private {
            let Some((file, index)) = slot.gmem_index(fault.gfn) else {
                return Faultin::MemoryFault(Errno::EFAULT);
            };
            match st.gmem.get_pfn(&mut host, file, index) {
                Ok(p) => Faultin::Pfn(p),
                Err(e) => Faultin::MemoryFault(e),
            }
        } else {
            // __kvm_faultin_pfn -> hva_to_pfn: the VMM's page at the slot's address.
            match host.user_page(slot.gfn_to_hva(fault.gfn)) {
                Ok(p) => Faultin::Pfn(p),
                Err(_) => Faultin::Err(Errno::ENOMEM),
            }
        }
    }

    /// `mmu_invalidate_retry_gfn`.
    fn invalidate_retry(inv: &crate::kvm::MmuInvalidate, seq: u64, gfn: Gfn) -> bool {
        inv.in_flight_over(gfn) || inv.seq != seq
    }

    /// `is_page_fault_stale` (mmu_lock held): the direct root is obsolete, or an invalidation
    /// raced with the fault.
    pub(crate) fn is_page_fault_stale(&self, v: usize, fault: &PageFault) -> bool {
        let st = self.st.borrow();
        let vc = &st.vcpus[v];
        let obsolete = match vc.root {
            Some(r) => st.mmu.sps.get(&r).is_none_or(|s| s.invalid),
            None => true,
        };
        obsolete || Self::invalidate_retry(&st.invalidate, fault.mmu_seq, fault.gfn)
    }

    /// `kvm_tdp_mmu_map` (mmu_lock held for read): walk from the fault's root, linking missing
    /// tables, and install the leaf at the goal level.
    pub(crate) async fn kvm_tdp_mmu_map(&self, cx: &Ctx, v: usize, fault: &PageFault) -> RetPf {
        let root = {
            let st = self.st.borrow();
            let vc = &st.vcpus[v];
            if fault.is_private {
                vc.mirror_root
            } else {
                vc.root
            }
        };
        let Some(mut sp) = root else {
            return RetPf::Retry;
        };
        loop {
            let (level, idx, old) = {
                let st = self.st.borrow();
                let s = st.mmu.get(sp);
                let idx = super::tdp_mmu::index(fault.gfn, s.level);
                (s.level, idx, st.mmu.spte(sp, idx))
            };
            if old.is_frozen() {
                return RetPf::Retry;
            }
            if level == fault.goal_level {
                return self
                    .map_handle_target_level(cx, sp, idx, level, fault, old)
                    .await;
            }
            if old.is_present() && !old.is_leaf() {
                match self.st.borrow().mmu.child(old) {
                    Some(c) => sp = c,
                    None => return RetPf::Retry,
                }
                continue;
            }
            let mirror = self.st.borrow().mmu.get(sp).mirror;
            if old.is_present() {
                // A huge leaf to split: never on mirror roots in this kernel.
                if mirror {
                    self.bug(
                        cx,
                        "kvm_tdp_mmu_map",
                        "huge page split on a mirror root".into(),
                    )
                    .await;
                }
                return RetPf::Retry;
            }
            let lower = level.lower().expect("above the goal level");
            let child = match self.alloc_sp(cx, v, lower, fault.gfn.align_down(level), mirror) {
                Ok(c) => c,
                Err(_) => return RetPf::Retry,
            };
            let spt = self.st.borrow().mmu.get(child).spt;
            match self
                .tdp_mmu_set_spte_atomic(
                    cx,
                    sp,
                    idx,
                    fault.gfn.align_down(level),
                    old,
                    Spte::nonleaf(spt),
                )
                .await
            {
                Ok(()) => sp = child,
                Err(_) => {
                    // `tdp_mmu_link_sp` failed: free the unused table.
                    self.free_sp(child);
                    return RetPf::Retry;
                }
            }
        }
    }

    /// `tdp_mmu_map_handle_target_level`.
    async fn map_handle_target_level(
        &self,
        cx: &Ctx,
        sp: crate::kvm::SpId,
        idx: u16,
        level: PgLevel,
        fault: &PageFault,
        old: Spte,
    ) -> RetPf {
        // `(fault->prefetch || is_access_allowed(fault, old))`: the model's leaves are RWX and
        // every TD fault is a write, so access is always allowed and any present leaf makes
        // the fault spurious, with WARN_ON_ONCE if it maps another pfn (a stale mapping).
        if old.is_present() && old.is_leaf() {
            if fault.pfn.is_some_and(|p| p != old.pfn()) {
                self.warn(
                    cx,
                    "tdp_mmu_map_handle_target_level",
                    format!(
                        "fault on {} wants pfn {} but the SPTE maps {}",
                        fault.gfn,
                        fault.pfn.map_or(0, |p| p.raw()),
                        old.pfn()
                    ),
                );
            }
            return RetPf::Spurious;
        }
        let Some(pfn) = fault.pfn else {
            return RetPf::Emulate;
        };
        let new = Spte::leaf(pfn, level);
        if new == old {
            return RetPf::Spurious;
        }
        match self
            .tdp_mmu_set_spte_atomic(cx, sp, idx, fault.gfn, old, new)
            .await
        {
            Ok(()) => RetPf::Fixed,
            Err(SetFail::Busy) | Err(SetFail::Hook(_)) => RetPf::Retry,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Policy;
    use crate::sched::TraceMode;
    use crate::stack::Stack;

    /// `tdp_mmu_map_handle_target_level` on a present leaf: spurious for every fault (access is
    /// always allowed for the model's RWX leaves), with WARN_ON_ONCE when the fault's pfn is
    /// not the one mapped, prefetch or not. Rows: (prefetch, same pfn, a WARN expected).
    #[test]
    fn a_fault_on_a_present_leaf_is_spurious_and_warns_on_another_pfn() {
        let rows = [
            (false, true, false),
            (false, false, true),
            (true, true, false),
            (true, false, true),
        ];
        for (prefetch, same, warns) in rows {
            let mut s = Stack::new(Policy::UPSTREAM, 600, TraceMode::Full);
            s.build_runnable(1);
            let out = std::rc::Rc::new(std::cell::Cell::new(None));
            let o = out.clone();
            s.run_setup(move |cx, kvm| async move {
                kvm.kvm_mmu_reload(&cx, 0).await.unwrap();
                let gfn = Gfn::new(0x20);
                let mapped = Pfn::new(0x4242);
                let mut fault = PageFault {
                    addr: gfn.gpa().to_shared(),
                    gfn,
                    is_private: false,
                    write: true,
                    exec: false,
                    prefetch: false,
                    goal_level: PgLevel::L4K,
                    pfn: Some(mapped),
                    mmu_seq: 0,
                };
                kvm.mmu_lock.read(&cx).await;
                assert_eq!(kvm.kvm_tdp_mmu_map(&cx, 0, &fault).await, RetPf::Fixed);
                fault.prefetch = prefetch;
                fault.pfn = Some(if same { mapped } else { mapped.add(1) });
                o.set(Some(kvm.kvm_tdp_mmu_map(&cx, 0, &fault).await));
                kvm.mmu_lock.read_unlock(&cx).await;
            });
            let case = format!("prefetch={prefetch} same_pfn={same}");
            assert_eq!(out.get(), Some(RetPf::Spurious), "{case}");
            let st = s.kvm.st.borrow();
            let warned = st
                .bugs
                .iter()
                .any(|b| b.location == "tdp_mmu_map_handle_target_level");
            assert_eq!(warned, warns, "{case}: {:?}", st.bugs);
        }
    }
}
