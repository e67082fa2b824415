//! Memory attributes (KVM_SET_MEMORY_ATTRIBUTES, `kvm->mem_attr_array`): which gfns are private.

use std::collections::BTreeMap;

use crate::addr::Gfn;

/// The PRIVATE attribute as disjoint, non-touching ranges `[start, end)` (absent = shared):
/// conversions of whole memslots stay cheap, as upstream's xarray ranges do.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Attributes {
    private: BTreeMap<Gfn, Gfn>,
}

impl Attributes {
    /// `kvm_mem_is_private`.
    pub fn is_private(&self, gfn: Gfn) -> bool {
        self.private
            .range(..=gfn)
            .next_back()
            .is_some_and(|(_, &e)| gfn < e)
    }

    /// Stores the attribute for `[start, end)`.
    pub fn set(&mut self, start: Gfn, end: Gfn, private: bool) {
        if start >= end {
            return;
        }
        // Ranges that overlap or touch `[start, end)`.
        let hit: Vec<(Gfn, Gfn)> = self
            .private
            .range(..=end)
            .rev()
            .take_while(|(_, &e)| e >= start)
            .map(|(&s, &e)| (s, e))
            .collect();
        let (mut lo, mut hi) = (start, end);
        for (s, e) in hit {
            self.private.remove(&s);
            if private {
                lo = lo.min(s);
                hi = hi.max(e);
            } else {
                if s < start {
                    self.private.insert(s, start);
                }
                if e > end {
                    self.private.insert(end, e);
                }
            }
        }
        if private {
            self.private.insert(lo, hi);
        }
    }

    /// `kvm_range_has_memory_attributes`: every gfn of `[start, end)` already has `private`.
    pub fn all(&self, start: Gfn, end: Gfn, private: bool) -> bool {
        if start >= end {
            return true;
        }
        let before_end = self.private.range(..end).next_back();
        if private {
            before_end.is_some_and(|(&s, &e)| s <= start && e >= end)
        } else {
            before_end.is_none_or(|(_, &e)| e <= start)
        }
    }
}

use crate::sched::Ctx;

use super::{Kvm, KvmResult};

impl Kvm {
    /// `kvm_vm_set_mem_attributes` (KVM_SET_MEMORY_ATTRIBUTES): under slots_lock, an
    /// invalidation brackets the change; the pre-set pass zaps the old mapping type
    /// (`kvm_arch_pre_set_memory_attributes`: to private zaps shared mappings, to shared zaps
    /// private ones through the S-EPT removal hook). Policy `sept_off_to_side` (seed 001)
    /// unmaps a range going shared and changes its attributes under `sept_lock`, and maps a
    /// range going private after its attributes change, inside the invalidation.
    pub async fn set_memory_attributes(
        &self,
        cx: &Ctx,
        start: Gfn,
        end: Gfn,
        private: bool,
    ) -> KvmResult<()> {
        // kvm_vm_ioctl: a dead VM answers every VM ioctl with -EIO.
        self.vm_ioctl_gate()?;
        if start >= end {
            return Err(super::Errno::EINVAL);
        }
        self.slots_lock.lock(cx).await;
        if self.st.borrow().attributes.all(start, end, private) {
            self.slots_lock.unlock(cx).await;
            return Ok(());
        }
        let intersects = self
            .st
            .borrow()
            .memslots
            .slots
            .iter()
            .any(|s| s.base_gfn < end && start < s.end());
        if intersects {
            self.mmu_lock.write(cx).await;
            self.mmu_invalidate_begin(start, end);
            // kvm_handle_gfn_range with flush_on_ret: flush under mmu_lock if anything went.
            if !self.st.borrow().injected.skip_convert_zap
                && self
                    .kvm_tdp_mmu_unmap_gfn_range(cx, start, end, !private, private)
                    .await
            {
                self.kvm_flush_remote_tlbs(cx).await;
            }
            self.mmu_lock.write_unlock(cx).await;
        }
        let side = intersects && self.policy.sept_off_to_side;
        if side && !private {
            // The range is unmapped and made shared under sept_lock, so that no punch-hole
            // refill maps it again in between.
            self.sept_lock.lock(cx).await;
            if !self.st.borrow().injected.skip_convert_zap {
                self.sept_side_unmap_range(cx, start, end).await;
            }
        }
        {
            let mut st = self.st.borrow_mut();
            st.attributes.set(start, end, private);
            st.mem_log.push((
                cx.step(),
                super::MemEvent::Converted {
                    start,
                    end,
                    private,
                },
            ));
        }
        if side && !private {
            self.sept_lock.unlock(cx).await;
        }
        let r = if side && private {
            self.sept_side_populate(cx, start, end, None).await
        } else {
            Ok(())
        };
        if intersects {
            self.mmu_lock.write(cx).await;
            self.mmu_invalidate_end();
            self.mmu_lock.write_unlock(cx).await;
        }
        self.slots_lock.unlock(cx).await;
        r
    }

    /// `kvm_mmu_invalidate_begin` + `kvm_mmu_invalidate_range_add` (mmu_lock held for write).
    pub fn mmu_invalidate_begin(&self, start: Gfn, end: Gfn) {
        let mut st = self.st.borrow_mut();
        let inv = &mut st.invalidate;
        inv.in_progress += 1;
        if inv.in_progress == 1 {
            inv.start = start;
            inv.end = end;
        } else {
            inv.start = inv.start.min(start);
            inv.end = inv.end.max(end);
        }
    }

    /// `kvm_mmu_invalidate_end` (mmu_lock held for write).
    pub fn mmu_invalidate_end(&self) {
        let mut st = self.st.borrow_mut();
        st.invalidate.seq += 1;
        st.invalidate.in_progress -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// The range set agrees with a per-gfn set over random conversions.
    #[test]
    fn ranges_agree_with_a_gfn_set() {
        let mut rng = crate::sched::choice::SplitMix64::new(7);
        let mut a = Attributes::default();
        let mut naive: BTreeSet<u64> = BTreeSet::new();
        for _ in 0..2000 {
            let s = rng.below(64);
            let e = s + 1 + rng.below(12);
            let private = rng.below(2) == 0;
            a.set(Gfn::new(s), Gfn::new(e), private);
            for g in s..e {
                if private {
                    naive.insert(g);
                } else {
                    naive.remove(&g);
                }
            }
            for g in 0..80 {
                assert_eq!(a.is_private(Gfn::new(g)), naive.contains(&g), "gfn {g}");
            }
            let (qs, qe) = (rng.below(70), rng.below(70));
            for p in [true, false] {
                let want = (qs..qe).all(|g| naive.contains(&g) == p);
                assert_eq!(a.all(Gfn::new(qs), Gfn::new(qe), p), want, "{qs}..{qe} {p}");
            }
            // Disjoint and never touching: one range per run of private gfns.
            let runs = naive
                .iter()
                .filter(|&&g| g == 0 || !naive.contains(&(g - 1)))
                .count();
            assert_eq!(a.private.len(), runs);
        }
    }
}
