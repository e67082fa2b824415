//! The MMU notifier on the VMM's own memory (virt/kvm/kvm_main.c): when the mm drops pages of
//! the VMM's guest-RAM mapping (madvise(MADV_DONTNEED), reclaim, migration), KVM zaps the
//! shared mappings of every memslot over those addresses before the pages go, and faults that
//! raced with it retry (`mmu_invalidate_seq`, `mmu_invalidate_in_progress`). Private memory is
//! guest_memfd's and is never touched here.

use crate::addr::{Gfn, Hva};
use crate::sched::Ctx;

use super::{Kvm, MemEvent};

impl Kvm {
    /// `kvm_mmu_notifier_invalidate_range_start`, the mm freeing the pages of `[start, start +
    /// npages)` pages, then `kvm_mmu_notifier_invalidate_range_end`. Start: for each memslot
    /// overlapping the range, under mmu_lock for write, `kvm_mmu_invalidate_begin` over its gfns
    /// and `kvm_unmap_gfn_range` with the SHARED attribute filter (direct roots only), then a
    /// TLB flush. End: under mmu_lock for write, `kvm_mmu_invalidate_end`.
    pub async fn kvm_mmu_notifier_invalidate_range(&self, cx: &Ctx, start: Hva, npages: u64) {
        let end = start.add_pages(npages);
        let ranges: Vec<(Gfn, Gfn)> = {
            let st = self.st.borrow();
            st.memslots
                .slots
                .iter()
                .filter_map(|s| {
                    let (s_start, s_end) = (s.userspace_addr, s.userspace_addr.add_pages(s.npages));
                    let (lo, hi) = (start.max(s_start), end.min(s_end));
                    (lo < hi).then(|| {
                        let g = s.base_gfn.add(lo.pages_from(s_start));
                        (g, g.add(hi.pages_from(lo)))
                    })
                })
                .collect()
        };
        let found = !ranges.is_empty();
        if found {
            self.mmu_lock.write(cx).await;
            let lo = ranges.iter().map(|r| r.0).min().expect("a range");
            let hi = ranges.iter().map(|r| r.1).max().expect("a range");
            self.mmu_invalidate_begin(lo, hi);
            let mut flush = false;
            let skip = self.st.borrow().injected.skip_notifier_zap;
            for &(s, e) in ranges.iter().filter(|_| !skip) {
                flush |= self
                    .kvm_tdp_mmu_unmap_gfn_range(cx, s, e, false, true)
                    .await;
            }
            if flush {
                self.kvm_flush_remote_tlbs(cx).await;
            }
            self.mmu_lock.write_unlock(cx).await;
        }
        // The mm frees the pages; the next touch gets a fresh zeroed one.
        {
            let mut h = self.host.borrow_mut();
            h.drop_user_pages(cx.step(), start, npages);
        }
        // Logged in the VMM's layout (gfn g's shared page lives at GUEST_RAM_HVA + g pages),
        // not through the memslots: the pages go whether or not a memslot covers them now,
        // and a slot created there later shows the fresh ones.
        if start >= crate::vmm::GUEST_RAM_HVA {
            let s = Gfn::new(start.pages_from(crate::vmm::GUEST_RAM_HVA));
            self.st.borrow_mut().mem_log.push((
                cx.step(),
                MemEvent::SharedDropped {
                    start: s,
                    end: s.add(npages),
                },
            ));
        }
        cx.yield_at("mmu_notifier:pages_freed").await;
        if found {
            self.mmu_lock.write(cx).await;
            self.mmu_invalidate_end();
            self.mmu_lock.write_unlock(cx).await;
        }
    }
}
