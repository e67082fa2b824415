//! SPTE values (arch/x86/kvm/mmu/spte.h): the bits the model uses, in their upstream positions.

use std::fmt;

use crate::addr::{Pfn, PgLevel};

/// `SPTE_MMU_PRESENT_MASK`: KVM's software present bit.
const MMU_PRESENT: u64 = 1 << 11;
/// PS bit: a leaf above 4K (`is_large_pte`).
const PAGE_SIZE_BIT: u64 = 1 << 7;
/// RWX.
const RWX: u64 = 0x7;
/// `SHADOW_NONPRESENT_VALUE`: suppress-#VE set (needed for TDX).
const SHADOW_NONPRESENT: u64 = 1 << 63;
/// `FROZEN_SPTE`: a non-present value only the freezing thread may replace.
const FROZEN: u64 = SHADOW_NONPRESENT | 0x5a0;
/// Host PFN bits 51:12.
const PFN_MASK: u64 = ((1 << 52) - 1) & !0xfff;
/// Software marker for a leaf SPTE (the model keeps the level beside the SPTE, as the iterator
/// does; this bit lets a 4K leaf be told from a table pointer without it).
const LEAF_MARK: u64 = 1 << 62;

/// One SPTE value.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Spte(u64);

impl Spte {
    pub const NONPRESENT: Spte = Spte(SHADOW_NONPRESENT);
    pub const FROZEN: Spte = Spte(FROZEN);

    /// A present leaf mapping `pfn` at `level` (`make_spte`).
    pub fn leaf(pfn: Pfn, level: PgLevel) -> Spte {
        let ps = if level == PgLevel::L4K {
            0
        } else {
            PAGE_SIZE_BIT
        };
        Spte(MMU_PRESENT | RWX | ps | LEAF_MARK | (pfn.hpa().raw() & PFN_MASK))
    }

    /// A present non-leaf pointing at the child table in `pfn` (`make_nonleaf_spte`).
    pub fn nonleaf(pfn: Pfn) -> Spte {
        Spte(MMU_PRESENT | RWX | (pfn.hpa().raw() & PFN_MASK))
    }

    pub fn raw(self) -> u64 {
        self.0
    }

    /// `is_shadow_present_pte`.
    pub fn is_present(self) -> bool {
        self.0 & MMU_PRESENT != 0
    }

    /// `is_frozen_spte`.
    pub fn is_frozen(self) -> bool {
        self.0 == FROZEN
    }

    /// `is_last_spte`: a present leaf.
    pub fn is_leaf(self) -> bool {
        self.is_present() && self.0 & LEAF_MARK != 0
    }

    /// `spte_to_pfn`.
    pub fn pfn(self) -> Pfn {
        Pfn::new((self.0 & PFN_MASK) >> 12)
    }
}

/// Every value the model makes prints differently (the oracle's livelock proof compares
/// states through `Debug`).
impl fmt::Debug for Spte {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_frozen() {
            f.write_str("FROZEN")
        } else if !self.is_present() {
            f.write_str("nonpresent")
        } else if self.is_leaf() && self.0 & PAGE_SIZE_BIT != 0 {
            write!(f, "large leaf({})", self.pfn())
        } else if self.is_leaf() {
            write!(f, "leaf({})", self.pfn())
        } else {
            write!(f, "table({})", self.pfn())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values() {
        assert!(!Spte::FROZEN.is_present());
        assert!(Spte::FROZEN.is_frozen());
        assert!(!Spte::NONPRESENT.is_frozen());
        let l = Spte::leaf(Pfn::new(0x1234), PgLevel::L4K);
        assert!(l.is_present() && l.is_leaf());
        assert_eq!(l.pfn(), Pfn::new(0x1234));
        let t = Spte::nonleaf(Pfn::new(0x55));
        assert!(t.is_present() && !t.is_leaf());
        assert_eq!(t.pfn(), Pfn::new(0x55));
        assert_eq!(Spte::FROZEN.raw(), 0x8000_0000_0000_05a0);
    }
}
