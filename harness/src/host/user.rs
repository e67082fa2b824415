//! The VMM's own memory: the anonymous mapping a VMM puts behind guest RAM, which memslots
//! point into (`userspace_addr`). It belongs to the process, not to any memslot: deleting and
//! re-creating a slot over the same addresses finds the same pages, and they stay the VMM's
//! until it exits (after the VM is gone; the model's run ends first). A page is allocated on first touch and, as the
//! kernel does for anonymous memory (`do_anonymous_page`, `__GFP_ZERO`), reads zero until
//! written, whatever the allocator last used it for.

use std::collections::BTreeMap;

use crate::addr::{Hva, Pfn};

use super::{AllocFor, Host, KernelUse, LedgerError};

/// The VMM's anonymous guest-RAM mapping, page by page (`struct mm_struct`, as far as the
/// model needs it).
#[derive(Clone, Debug, Default)]
pub struct UserMemory {
    pages: BTreeMap<Hva, Pfn>,
}

impl UserMemory {
    /// Pages currently backed.
    pub fn len(&self) -> usize {
        self.pages.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }

    /// Every backing page.
    pub fn pfns(&self) -> std::collections::BTreeSet<Pfn> {
        self.pages.values().copied().collect()
    }

    /// The backing page of `hva`, if it was touched.
    pub fn get(&self, hva: Hva) -> Option<Pfn> {
        self.pages.get(&hva.page_base()).copied()
    }
}

impl Host {
    /// The mm drops the VMM's pages of `[start, start + npages)` pages (madvise(MADV_DONTNEED)):
    /// each backed one goes back to the allocator, recorded at `step`.
    pub fn drop_user_pages(&mut self, step: u64, start: Hva, npages: u64) {
        for i in 0..npages {
            if let Some(p) = self.user.pages.remove(&start.add_pages(i).page_base()) {
                let r = self.ledger.free(p);
                self.record(step, r);
            }
        }
    }

    /// `hva_to_pfn` through `handle_mm_fault` on the VMM's anonymous mapping: the page behind
    /// `hva`, allocated and zeroed on first touch.
    pub fn user_page(&mut self, hva: Hva) -> Result<Pfn, LedgerError> {
        let hva = hva.page_base();
        if let Some(p) = self.user.get(hva) {
            return Ok(p);
        }
        let p = self.ledger.alloc(AllocFor::Kernel(KernelUse::UserMemory))?;
        self.write(p, 0);
        self.user.pages.insert(hva, p);
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_pages_are_stable_and_start_zeroed() {
        let mut h = Host::new(4);
        // A kernel page with old contents goes back to the allocator.
        let old = h.ledger.alloc(AllocFor::Kernel(KernelUse::Other)).unwrap();
        h.write(old, 0xa5);
        h.ledger.free(old).unwrap();
        // The VMM touches its mapping: it gets that page (the lowest free), zeroed.
        let a = Hva::new(0x7f00_0000_0000);
        let p = h.user_page(a.add_pages(1)).unwrap();
        assert_eq!(p, old);
        assert_eq!(h.read(p), 0);
        // Any address inside the page finds the same page.
        h.write(p, 7);
        assert_eq!(h.user_page(Hva::new(a.add_pages(1).raw() + 8)).unwrap(), p);
        assert_eq!(h.user.get(a.add_pages(1)), Some(p));
        assert_eq!(h.read(p), 7);
        assert_eq!(h.user.len(), 1);
    }
}
