//! Design decisions as data: one field per decision point of the private-memory path, and the
//! mailing-list designs (spec section 4) as named presets. `upstream` is the kernel as merged.

/// What KVM_PRE_FAULT_MEMORY does when the gfn's memslot is being deleted or moved (seed 004).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrefaultOnInvalidSlot {
    /// Upstream: return -EAGAIN to userspace (kvm_mmu_faultin_pfn, fault->prefetch).
    EAgain,
    /// Retry inside KVM while still holding SRCU.
    RetryHoldingSrcu,
    /// Drop and retake SRCU between retries, without reloading the MMU.
    DropSrcuNoReload,
    /// Drop SRCU and kvm_mmu_reload(), without processing KVM_REQ_MMU_FREE_OBSOLETE_ROOTS.
    ReloadNoFreeObsolete,
}

/// One value per decision point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    pub name: &'static str,
    /// S-EPT SEAMCALL wrappers retry TDX_OPERAND_BUSY up to 16 times, then fail (the removed
    /// "[HACK] Retry seamcall" of seed 000); no kick.
    pub sept_retry16: bool,
    /// Removal (BLOCK/TRACK/REMOVE) answers BUSY by kicking vCPUs out and blocking entry before
    /// its one retry (`tdh_do_no_vcpus`); false retries once without the kick.
    pub kick_on_busy_remove: bool,
    /// tdx_handle_ept_violation retries RET_PF_RETRY locally instead of re-entering the guest.
    pub local_retry: bool,
    /// Mirror SPTEs are frozen while the S-EPT SEAMCALL runs (seed 003).
    pub freeze: bool,
    /// A failed external hook restores the old SPTE.
    pub restore_on_fail: bool,
    /// The EPT-violation retry loop also stops when the gfn's memslot is INVALID (6.18+).
    pub ept_loop_checks_invalid_slot: bool,
    pub prefault_invalid_slot: PrefaultOnInvalidSlot,
    /// The prefault retry loops (`kvm_tdp_page_prefault`, `kvm_tdp_mmu_map_private_pfn`) call
    /// `kvm_mmu_reload` on every RET_PF_RETRY (7.3), so an obsolete root is freed and replaced
    /// inside the loop; false is 6.15 to 7.2, where the roots were loaded once before it.
    pub prefault_reload_each_retry: bool,
    /// TDH.MEM.TRACK and the vCPU kick precede PAGE.REMOVE.
    pub track_before_remove: bool,
    /// Teardown reclaims children before the TDR and writes caches back before KEY.FREEID.
    pub reclaim_in_order: bool,
    /// Reclaimed pages are cleared (MOVDIR64B) before they go back to the kernel.
    pub clear_after_reclaim: bool,
    /// Seed 001's alternative design: KVM keeps the S-EPT off to the side of the TDP MMU, fully
    /// populated under one lock (`sept_lock`) at finalize, on conversions and memslot changes,
    /// and never faulted; the mirror root is not used (see `kvm::vmx::sept_off_to_side`).
    pub sept_off_to_side: bool,
    /// `kvm_vm_ioctl` answers -EIO on a dead VM before the memory ioctls
    /// (KVM_SET_MEMORY_ATTRIBUTES, KVM_SET_USER_MEMORY_REGION2) run.
    pub vm_ioctls_check_dead: bool,
    /// `kvm_vcpu_ioctl` answers -EIO on a dead VM before any vCPU ioctl (KVM_RUN,
    /// KVM_PRE_FAULT_MEMORY, KVM_TDX_INIT_VCPU, KVM_TDX_INIT_MEM_REGION) runs; false is a vCPU
    /// ioctl dispatch that bypasses the check (e.g. an arch "unlocked" ioctl hook called
    /// before it).
    pub vcpu_ioctls_check_dead: bool,
    /// The map path (SEPT.ADD, AUG) retries TDX_OPERAND_BUSY on any operand
    /// (`tdx_operand_busy()`); false compares with BUSY|SEPT_TREE only, as the patches did
    /// before the merge (`err == TDX_ERROR_SEPT_BUSY`), and bugs the VM on the rest.
    pub busy_any_operand: bool,
    /// KVM_TDX_FINALIZE_VM runs TDH.MR.FINALIZE and the switch to RUNNABLE under mmu_lock
    /// for write, as `tdx_td_vcpu_init` does TDH.VP.INIT (both take the TDR exclusively);
    /// upstream (false) holds only the VM-state locks, so a zap under mmu_lock can interleave.
    pub finalize_holds_mmu_lock: bool,
    /// A failed BLOCK, REMOVE or WBINVD of a private page bugs the VM (`TDX_BUG_ON`, and
    /// `handle_changed_spte`'s KVM_BUG_ON on the hook's error); false only WARNs at both and
    /// lets the VM run on, as a zap that "returns a failure" would (one of the
    /// options weighed before "KVM: TDX: Drop superfluous page pinning in S-EPT management").
    pub zap_failure_bugs_vm: bool,
    /// `kvm_vm_dead` makes KVM_REQ_VM_DEAD (waiting) so that vCPUs in KVM_RUN stop entering;
    /// false marks the VM dead only, as before the request existed (0b8f11737cff, 5.15).
    pub vm_dead_makes_request: bool,
}

impl Policy {
    /// The kernel as merged.
    pub const UPSTREAM: Policy = Policy {
        name: "upstream",
        sept_retry16: false,
        kick_on_busy_remove: true,
        local_retry: true,
        freeze: true,
        restore_on_fail: true,
        ept_loop_checks_invalid_slot: true,
        prefault_invalid_slot: PrefaultOnInvalidSlot::EAgain,
        prefault_reload_each_retry: true,
        track_before_remove: true,
        reclaim_in_order: true,
        clear_after_reclaim: true,
        sept_off_to_side: false,
        vm_ioctls_check_dead: true,
        vcpu_ioctls_check_dead: true,
        busy_any_operand: true,
        finalize_holds_mmu_lock: false,
        vm_dead_makes_request: true,
        zap_failure_bugs_vm: true,
    };

    /// The kernels from 6.15 (20a6cff3: `kvm_mmu_reload` frees obsolete roots) to 7.2: the
    /// prefault loops load the roots once, then retry. Seed 004's designs were argued against
    /// this loop, so their presets start from it.
    pub const PREFAULT_RELOAD_ONCE: Policy = Policy {
        name: "prefault_reload_once",
        prefault_reload_each_retry: false,
        ..Policy::UPSTREAM
    };

    /// Every named policy with the invariant it is expected to break (`none` for a correct
    /// alternative measured for cost; `a|b` when either shows).
    pub const ALL: [(Policy, &'static str); 21] = [
        (Policy::UPSTREAM, "none"),
        (
            Policy {
                name: "retry16",
                sept_retry16: true,
                ..Policy::UPSTREAM
            },
            "must_not_fail",
        ),
        (
            Policy {
                name: "no_kick_on_busy_remove",
                kick_on_busy_remove: false,
                ..Policy::UPSTREAM
            },
            "must_not_fail",
        ),
        (
            Policy {
                name: "no_local_retry",
                local_retry: false,
                ..Policy::UPSTREAM
            },
            "none",
        ),
        (
            Policy {
                name: "no_freeze",
                freeze: false,
                ..Policy::UPSTREAM
            },
            // The S-EPT SEAMCALL then meets a table the race removed (TDX_EPT_WALK_FAILED in
            // a path that must not fail), or KVM touches a table it freed.
            "mirror_desync|must_not_fail",
        ),
        (
            Policy {
                name: "no_restore_on_fail",
                restore_on_fail: false,
                ..Policy::UPSTREAM
            },
            "mirror_desync",
        ),
        (
            Policy {
                name: "ept_loop_ignores_requests",
                ept_loop_checks_invalid_slot: false,
                ..Policy::UPSTREAM
            },
            "liveness",
        ),
        (
            Policy {
                name: "vm_ioctls_ignore_dead",
                vm_ioctls_check_dead: false,
                ..Policy::UPSTREAM
            },
            "state_machine",
        ),
        (
            Policy {
                name: "vcpu_ioctls_ignore_dead",
                vcpu_ioctls_check_dead: false,
                ..Policy::UPSTREAM
            },
            "state_machine",
        ),
        (
            Policy {
                name: "zap_failure_warns_only",
                zap_failure_bugs_vm: false,
                ..Policy::UPSTREAM
            },
            "page_ownership",
        ),
        (
            Policy {
                name: "busy_sept_tree_only",
                busy_any_operand: false,
                ..Policy::UPSTREAM
            },
            "must_not_fail",
        ),
        (
            Policy {
                name: "vm_dead_without_request",
                vm_dead_makes_request: false,
                ..Policy::UPSTREAM
            },
            "state_machine",
        ),
        (
            Policy {
                name: "finalize_under_mmu_lock",
                finalize_holds_mmu_lock: true,
                ..Policy::UPSTREAM
            },
            "none",
        ),
        (Policy::PREFAULT_RELOAD_ONCE, "liveness"),
        (
            Policy {
                name: "prefault_retry_holding_srcu",
                prefault_invalid_slot: PrefaultOnInvalidSlot::RetryHoldingSrcu,
                ..Policy::PREFAULT_RELOAD_ONCE
            },
            "liveness",
        ),
        (
            Policy {
                name: "prefault_drop_srcu_no_reload",
                prefault_invalid_slot: PrefaultOnInvalidSlot::DropSrcuNoReload,
                ..Policy::PREFAULT_RELOAD_ONCE
            },
            "liveness",
        ),
        (
            Policy {
                name: "prefault_reload_no_free_obsolete",
                prefault_invalid_slot: PrefaultOnInvalidSlot::ReloadNoFreeObsolete,
                ..Policy::PREFAULT_RELOAD_ONCE
            },
            "liveness",
        ),
        (
            Policy {
                name: "no_track_before_remove",
                track_before_remove: false,
                ..Policy::UPSTREAM
            },
            "must_not_fail",
        ),
        (
            Policy {
                name: "reclaim_out_of_order",
                reclaim_in_order: false,
                ..Policy::UPSTREAM
            },
            "must_not_fail",
        ),
        (
            Policy {
                name: "no_clear_after_reclaim",
                clear_after_reclaim: false,
                ..Policy::UPSTREAM
            },
            "page_ownership",
        ),
        (
            Policy {
                name: "sept_off_to_side",
                sept_off_to_side: true,
                ..Policy::UPSTREAM
            },
            "none",
        ),
    ];

    /// A policy by name.
    pub fn by_name(name: &str) -> Option<Policy> {
        Self::ALL
            .iter()
            .find(|(p, _)| p.name == name)
            .map(|(p, _)| *p)
    }
}

impl Default for Policy {
    fn default() -> Self {
        Policy::UPSTREAM
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The decision points where `p` differs from `base`.
    fn changes(p: &Policy, base: &Policy) -> usize {
        let diff = [
            p.sept_retry16 != base.sept_retry16,
            p.kick_on_busy_remove != base.kick_on_busy_remove,
            p.local_retry != base.local_retry,
            p.freeze != base.freeze,
            p.restore_on_fail != base.restore_on_fail,
            p.ept_loop_checks_invalid_slot != base.ept_loop_checks_invalid_slot,
            p.prefault_invalid_slot != base.prefault_invalid_slot,
            p.prefault_reload_each_retry != base.prefault_reload_each_retry,
            p.track_before_remove != base.track_before_remove,
            p.reclaim_in_order != base.reclaim_in_order,
            p.clear_after_reclaim != base.clear_after_reclaim,
            p.sept_off_to_side != base.sept_off_to_side,
        ];
        diff.iter().filter(|d| **d).count()
    }

    #[test]
    fn each_named_policy_changes_one_decision() {
        for (p, _) in Policy::ALL.iter().skip(1) {
            let named = Policy::by_name(p.name).unwrap();
            assert_eq!(named, *p);
            // Seed 004's designs change one decision of the loop they were argued against.
            let one = changes(p, &Policy::UPSTREAM) == 1
                || changes(p, &Policy::PREFAULT_RELOAD_ONCE) == 1;
            assert!(one, "{}", p.name);
        }
        assert_eq!(Policy::by_name("nope"), None);
    }
}
