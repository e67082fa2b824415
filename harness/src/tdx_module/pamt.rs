//! The Physical Address Metadata Table: the module's record of what each host page is.
//!
//! Models src/common/memory_handlers/pamt_manager.{h,c} (intel/tdx-module 1666adc) for 4K
//! pages: page type, owner TDR and the block epoch BLOCK records for TLB tracking. The entry lock
//! lives in `locks::Locks` (`LockKey::Pamt`). Pages outside the TDMR (not host RAM of the model)
//! give TDX_OPERAND_ADDR_RANGE_ERROR.

use std::collections::BTreeMap;

use crate::addr::Pfn;

/// PAMT page type (`pt`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PageType {
    /// PT_NDA: not assigned to the module.
    Nda,
    /// PT_REG: a TD private page.
    Reg,
    Tdr,
    /// PT_TDCX: TDCS pages and TDVPS extension pages alike.
    Tdcx,
    Tdvpr,
    /// PT_EPT: an S-EPT page.
    Ept,
}

/// One assigned page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PamtEntry {
    pub pt: PageType,
    /// The owner TD's TDR page (none for a TDR itself).
    pub owner: Option<Pfn>,
    /// TD epoch recorded by RANGE.BLOCK (`bepoch`).
    pub bepoch: u64,
    /// Model-only diagnosis: the block ran before the TD was RUNNABLE (when no tracking is
    /// required), so an error about tracking it later can say why.
    pub blocked_while_building: bool,
}

/// The PAMT over the TDMR `[base, base + npages)`.
#[derive(Clone, Debug)]
pub struct Pamt {
    base: Pfn,
    npages: u64,
    entries: BTreeMap<Pfn, PamtEntry>,
}

impl Pamt {
    pub fn new(base: Pfn, npages: u64) -> Self {
        Pamt {
            base,
            npages,
            entries: BTreeMap::new(),
        }
    }

    /// True if the page lies in a TDMR with an initialised PAMT.
    pub fn covers(&self, pfn: Pfn) -> bool {
        pfn >= self.base && pfn.raw() < self.base.raw() + self.npages
    }

    /// The entry (PT_NDA when unassigned).
    pub fn get(&self, pfn: Pfn) -> PamtEntry {
        self.entries.get(&pfn).copied().unwrap_or(PamtEntry {
            pt: PageType::Nda,
            owner: None,
            bepoch: 0,
            blocked_while_building: false,
        })
    }

    /// Assigns a page.
    pub fn assign(&mut self, pfn: Pfn, pt: PageType, owner: Option<Pfn>) {
        debug_assert_ne!(pt, PageType::Nda);
        self.entries.insert(
            pfn,
            PamtEntry {
                pt,
                owner,
                bepoch: 0,
                blocked_while_building: false,
            },
        );
    }

    /// Sets PT_NDA (owner and bepoch are left as they were in the module; the model drops them).
    pub fn release(&mut self, pfn: Pfn) {
        self.entries.remove(&pfn);
    }

    /// Records the block epoch (and whether the TD was still being built).
    pub fn set_bepoch(&mut self, pfn: Pfn, epoch: u64, building: bool) {
        if let Some(e) = self.entries.get_mut(&pfn) {
            e.bepoch = epoch;
            e.blocked_while_building = building;
        }
    }

    /// Every assigned page, in pfn order.
    pub fn iter(&self) -> impl Iterator<Item = (Pfn, PamtEntry)> + '_ {
        self.entries.iter().map(|(&p, &e)| (p, e))
    }

    /// Pages owned by (or being) the TD of `tdr`.
    pub fn owned_by(&self, tdr: Pfn) -> usize {
        self.entries
            .iter()
            .filter(|(p, e)| e.owner == Some(tdr) || **p == tdr)
            .count()
    }
}
