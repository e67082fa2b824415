//! Fast invalidation of roots (arch/x86/kvm/mmu/tdp_mmu.c: `kvm_tdp_mmu_invalidate_roots`,
//! `kvm_tdp_mmu_zap_invalidated_roots`, `tdp_mmu_zap_root`; mmu.c: `kvm_mmu_zap_all_fast`).
//!
//! A TDX VM never fast-zaps for a memslot deletion (`kvm_arch_flush_shadow_memslot` takes
//! `kvm_mmu_zap_memslot`, which invalidates no root), but `kvm_mmu_zap_all_fast` still runs for
//! it on an MMIO-generation wrap (`kvm_mmu_invalidate_mmio_sptes` in a memslot update) and on an
//! nx_huge_pages toggle (`set_nx_huge_pages`). It invalidates only the DIRECT (shared) roots —
//! external page tables cannot be fast-zapped, so the mirror root stays — and makes
//! KVM_REQ_MMU_FREE_OBSOLETE_ROOTS on every vCPU. Until a vCPU frees its obsolete direct root
//! and reloads, `is_page_fault_stale` answers RET_PF_RETRY to each of its faults: the hang of
//! the seed-004 designs that drop SRCU without doing both.

use crate::sched::Ctx;

use super::spte::Spte;
use super::tdp_mmu::{SetFail, Sp, SpId};
use crate::kvm::{Kvm, Request};

/// `enum kvm_tdp_mmu_root_types` (a bit mask).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RootTypes(u8);

impl RootTypes {
    pub const INVALID: RootTypes = RootTypes(1 << 0);
    pub const DIRECT: RootTypes = RootTypes(1 << 1);
    pub const MIRROR: RootTypes = RootTypes(1 << 2);
    pub const VALID: RootTypes = RootTypes(Self::DIRECT.0 | Self::MIRROR.0);
    pub const ALL: RootTypes = RootTypes(Self::VALID.0 | Self::INVALID.0);

    /// Every bit of `o` is set.
    pub const fn contains(self, o: RootTypes) -> bool {
        self.0 & o.0 == o.0
    }

    /// `self` without the bits of `o`.
    pub const fn without(self, o: RootTypes) -> RootTypes {
        RootTypes(self.0 & !o.0)
    }

    /// The bits of both.
    pub const fn with(self, o: RootTypes) -> RootTypes {
        RootTypes(self.0 | o.0)
    }

    /// `kvm_gfn_range_filter_to_root_types` for a TD: the private filter is the mirror roots,
    /// the shared filter the direct roots.
    pub const fn from_filter(private: bool, shared: bool) -> RootTypes {
        let mut t = 0;
        if private {
            t |= Self::MIRROR.0;
        }
        if shared {
            t |= Self::DIRECT.0;
        }
        RootTypes(t)
    }
}

/// `tdp_mmu_root_match`: an invalid root matches only if INVALID is asked for; then a mirror
/// root matches MIRROR and any other root DIRECT.
pub(crate) fn root_match(sp: &Sp, types: RootTypes) -> bool {
    if sp.invalid && !types.contains(RootTypes::INVALID) {
        return false;
    }
    if sp.mirror {
        types.contains(RootTypes::MIRROR)
    } else {
        types.contains(RootTypes::DIRECT)
    }
}

impl Kvm {
    /// `kvm_tdp_mmu_invalidate_roots` (mmu_lock held for write): mark each matching valid root
    /// invalid and scheduled for `kvm_tdp_mmu_zap_invalidated_roots`; nothing is zapped here.
    pub fn kvm_tdp_mmu_invalidate_roots(&self, cx: &Ctx, types: RootTypes) {
        let types = if types.contains(RootTypes::INVALID) {
            self.warn(
                cx,
                "kvm_tdp_mmu_invalidate_roots",
                "asked to invalidate invalid roots".into(),
            );
            types.without(RootTypes::INVALID)
        } else {
            types
        };
        debug_assert!(self.mmu_lock.held_write(cx));
        let mut st = self.st.borrow_mut();
        let roots = st.mmu.roots.clone();
        for r in roots {
            let sp = st.mmu.sps.get_mut(&r).expect("root");
            if !root_match(sp, types) || sp.invalid {
                continue;
            }
            sp.scheduled_to_zap = true;
            sp.invalid = true;
        }
        drop(st);
        cx.note("kvm_tdp_mmu_invalidate_roots", u64::from(types.0), 0);
    }

    /// `kvm_tdp_mmu_zap_invalidated_roots`: mmu_lock for read (`shared`) or write; every root
    /// scheduled by `kvm_tdp_mmu_invalidate_roots` is zapped and loses the TDP MMU's own
    /// reference (the vCPUs' references stay until `kvm_mmu_free_obsolete_roots`).
    pub async fn kvm_tdp_mmu_zap_invalidated_roots(&self, cx: &Ctx, shared: bool) {
        if shared {
            self.mmu_lock.read(cx).await;
        } else {
            self.mmu_lock.write(cx).await;
        }
        // for_each_tdp_mmu_root_yield_safe: every root, looked up again after each yield.
        let roots = self.st.borrow().mmu.roots.clone();
        for r in roots {
            let scheduled = {
                let mut st = self.st.borrow_mut();
                match st.mmu.sps.get_mut(&r) {
                    Some(sp) if sp.scheduled_to_zap => {
                        sp.scheduled_to_zap = false;
                        Some(sp.invalid)
                    }
                    _ => None,
                }
            };
            let Some(invalid) = scheduled else { continue };
            if !invalid {
                self.bug(
                    cx,
                    "kvm_tdp_mmu_zap_invalidated_roots",
                    "root scheduled to zap is valid".into(),
                )
                .await;
            }
            self.tdp_mmu_zap_root(cx, r, shared).await;
            self.tdp_mmu_put_root(cx, r).await;
        }
        if shared {
            self.mmu_lock.read_unlock(cx).await;
        } else {
            self.mmu_lock.write_unlock(cx).await;
        }
    }

    /// `tdp_mmu_zap_root`: clear every entry of `root`, tearing the tables below down
    /// (`handle_removed_pt`). Upstream zaps 1G entries first to bound the work per yield; the
    /// model clears the root's own entries, which removes the same tables. `shared`: atomic
    /// clears under mmu_lock read (an atomic clear of a mirror SPTE bugs the VM, as upstream);
    /// otherwise `tdp_mmu_set_spte` under mmu_lock write. Nothing installs into an invalid root
    /// (faults see it stale), so the teardown of a cleared table cannot race with an install.
    async fn tdp_mmu_zap_root(&self, cx: &Ctx, root: SpId, shared: bool) {
        let (level, base, idxs) = {
            let st = self.st.borrow();
            let sp = st.mmu.get(root);
            (
                sp.level,
                sp.base,
                sp.sptes.keys().copied().collect::<Vec<u16>>(),
            )
        };
        for idx in idxs {
            let gfn = base.add(u64::from(idx) * level.pages());
            if !shared {
                if self.st.borrow().mmu.spte(root, idx).is_present() {
                    self.tdp_mmu_set_spte(cx, root, idx, gfn, Spte::NONPRESENT)
                        .await;
                }
                continue;
            }
            loop {
                let old = self.st.borrow().mmu.spte(root, idx);
                if !old.is_present() {
                    break;
                }
                match self
                    .tdp_mmu_set_spte_atomic(cx, root, idx, gfn, old, Spte::NONPRESENT)
                    .await
                {
                    Ok(()) => {
                        // handle_changed_spte(shared): a removed table is torn down.
                        if !old.is_leaf() {
                            let child = self.st.borrow().mmu.child(old);
                            if let Some(c) = child {
                                self.handle_removed_pt(cx, c).await;
                            }
                        }
                        break;
                    }
                    // Lost the cmpxchg: retry with the new value, unless the clear was refused
                    // outright (a mirror SPTE: the VM is bugged).
                    Err(SetFail::Busy) if !self.st.borrow().bugged => {}
                    Err(_) => break,
                }
            }
        }
    }

    /// `kvm_mmu_zap_all_fast` (slots_lock held): under mmu_lock for write, invalidate the DIRECT
    /// roots (never the mirror root) and make KVM_REQ_MMU_FREE_OBSOLETE_ROOTS on every vCPU;
    /// then zap the invalidated roots under mmu_lock for read. The `mmu_valid_gen` toggle and
    /// `kvm_zap_obsolete_pages` only concern legacy shadow pages, which the model has none of.
    pub async fn kvm_mmu_zap_all_fast_locked(&self, cx: &Ctx) {
        debug_assert!(self.slots_lock.held_by_current(cx));
        self.mmu_lock.write(cx).await;
        self.kvm_tdp_mmu_invalidate_roots(cx, RootTypes::DIRECT);
        self.make_all_cpus_request(cx, Request::MmuFreeObsoleteRoots)
            .await;
        self.mmu_lock.write_unlock(cx).await;
        self.kvm_tdp_mmu_zap_invalidated_roots(cx, true).await;
    }

    /// `kvm_mmu_zap_all_fast` as its callers run it: `set_nx_huge_pages` takes slots_lock around
    /// it for each VM (an MMIO-generation wrap runs it inside a memslot update, also under
    /// slots_lock).
    pub async fn kvm_mmu_zap_all_fast(&self, cx: &Ctx) {
        self.slots_lock.lock(cx).await;
        self.kvm_mmu_zap_all_fast_locked(cx).await;
        self.slots_lock.unlock(cx).await;
    }
}
