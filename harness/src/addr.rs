//! Typed addresses and frame numbers.
//!
//! Guest and host address spaces never mix: there is no conversion between a guest type (`Gpa`,
//! `Gfn`) and a host type (`Hpa`, `Pfn`). Only the translations that exist in the kernel exist
//! here: address <-> frame number within one space, and the TDX shared bit on a GPA.

use std::fmt;

/// log2 of the base page size (4 KiB).
pub const PAGE_SHIFT: u32 = 12;
/// Base page size in bytes.
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;

/// GPA bit that marks a shared (direct) access for a TD with GPAW 48 (4-level EPT).
/// Upstream: `kvm_gfn_direct_bits()` / `TDX_SHARED_BIT_PWL_4` = bit 47.
pub const SHARED_BIT_GPAW48: u64 = 1 << 47;

macro_rules! newtype {
    ($(#[$m:meta])* $name:ident, $fmt:literal) => {
        $(#[$m])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        pub struct $name(u64);

        impl $name {
            /// Wraps a raw value; the only way in from an untyped number.
            pub const fn new(raw: u64) -> Self {
                Self(raw)
            }
            /// The raw value, for printing, hashing and the ABI edge.
            pub const fn raw(self) -> u64 {
                self.0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, $fmt, self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, $fmt, self.0)
            }
        }
    };
}

newtype!(
    /// Guest physical address; for a TD it may carry the shared bit.
    Gpa,
    "gpa:{:#x}"
);
newtype!(
    /// Guest frame number, always without the shared bit (memslots do not know it).
    Gfn,
    "gfn:{:#x}"
);
newtype!(
    /// Host physical address.
    Hpa,
    "hpa:{:#x}"
);
newtype!(
    /// Host page frame number.
    Pfn,
    "pfn:{:#x}"
);
newtype!(
    /// Host virtual address in the VMM's process (a memslot's `userspace_addr`).
    Hva,
    "hva:{:#x}"
);

impl Gpa {
    /// `gpa_to_gfn()` after stripping the shared bit (`kvm_mmu_do_page_fault` does both).
    pub const fn gfn(self) -> Gfn {
        Gfn((self.0 & !SHARED_BIT_GPAW48) >> PAGE_SHIFT)
    }
    /// True if the shared bit is set (`kvm_is_addr_direct` for a TD).
    pub const fn is_shared(self) -> bool {
        self.0 & SHARED_BIT_GPAW48 != 0
    }
    /// The same address with the shared bit set.
    pub const fn to_shared(self) -> Gpa {
        Gpa(self.0 | SHARED_BIT_GPAW48)
    }
    /// The same address with the shared bit clear.
    pub const fn to_private(self) -> Gpa {
        Gpa(self.0 & !SHARED_BIT_GPAW48)
    }
    /// Offset within its 4 KiB page.
    pub const fn page_offset(self) -> u64 {
        self.0 & (PAGE_SIZE - 1)
    }
    /// True if aligned to `level`'s page size (ignoring the shared bit).
    pub const fn is_aligned(self, level: PgLevel) -> bool {
        self.to_private().0 & (level.bytes() - 1) == 0
    }
}

impl Gfn {
    /// `gfn_to_gpa()`: the private (shared-bit clear) address of the frame.
    pub const fn gpa(self) -> Gpa {
        Gpa(self.0 << PAGE_SHIFT)
    }
    /// The frame `n` pages further on.
    pub const fn add(self, n: u64) -> Gfn {
        Gfn(self.0 + n)
    }
    /// The first gfn of the `level` page containing this one.
    pub const fn align_down(self, level: PgLevel) -> Gfn {
        Gfn(self.0 & !(level.pages() - 1))
    }
    /// Distance in pages from `base` (which must not be above `self`).
    pub const fn offset_from(self, base: Gfn) -> u64 {
        self.0 - base.0
    }
}

impl Hpa {
    /// The frame containing this address.
    pub const fn pfn(self) -> Pfn {
        Pfn(self.0 >> PAGE_SHIFT)
    }
}

impl Hva {
    /// The address `n` pages further on.
    pub const fn add_pages(self, n: u64) -> Hva {
        Hva(self.0 + (n << PAGE_SHIFT))
    }
    /// Distance in pages from `base` (which must not be above `self`).
    pub const fn pages_from(self, base: Hva) -> u64 {
        (self.0 - base.0) >> PAGE_SHIFT
    }
    /// The start of its 4 KiB page.
    pub const fn page_base(self) -> Hva {
        Hva(self.0 & !(PAGE_SIZE - 1))
    }
}

impl Pfn {
    /// `pfn_to_hpa()`.
    pub const fn hpa(self) -> Hpa {
        Hpa(self.0 << PAGE_SHIFT)
    }
    /// The frame `n` pages further on.
    pub const fn add(self, n: u64) -> Pfn {
        Pfn(self.0 + n)
    }
}

/// Level of a page-table entry. KVM numbers these 1..=4 (`PG_LEVEL_4K` ..), the TDX module
/// 0..=3. 4K, 2M and 1G entries may be leaves; 512G entries (PML4Es, the root table of a 4-level
/// EPT) are only ever non-leaf.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PgLevel {
    L4K,
    L2M,
    L1G,
    L512G,
}

impl PgLevel {
    /// The levels a leaf may have, smallest first.
    pub const ALL: [PgLevel; 3] = [PgLevel::L4K, PgLevel::L2M, PgLevel::L1G];
    /// The entry levels of a 4-level EPT, root first.
    pub const WALK: [PgLevel; 4] = [PgLevel::L512G, PgLevel::L1G, PgLevel::L2M, PgLevel::L4K];

    /// Number of 4 KiB pages a mapping at this level covers.
    pub const fn pages(self) -> u64 {
        match self {
            PgLevel::L4K => 1,
            PgLevel::L2M => 512,
            PgLevel::L1G => 512 * 512,
            PgLevel::L512G => 512 * 512 * 512,
        }
    }
    /// Size in bytes.
    pub const fn bytes(self) -> u64 {
        self.pages() << PAGE_SHIFT
    }
    /// KVM's `enum pg_level` value (PG_LEVEL_4K = 1).
    pub const fn kvm(self) -> u8 {
        match self {
            PgLevel::L4K => 1,
            PgLevel::L2M => 2,
            PgLevel::L1G => 3,
            PgLevel::L512G => 4,
        }
    }
    /// The TDX module's level encoding in "gpa|level" operands (4K = 0).
    pub const fn tdx(self) -> u8 {
        self.kvm() - 1
    }
    /// Parses KVM's numbering.
    pub const fn from_kvm(level: u8) -> Option<PgLevel> {
        match level {
            1 => Some(PgLevel::L4K),
            2 => Some(PgLevel::L2M),
            3 => Some(PgLevel::L1G),
            4 => Some(PgLevel::L512G),
            _ => None,
        }
    }
    /// One level down, if any.
    pub const fn lower(self) -> Option<PgLevel> {
        match self {
            PgLevel::L4K => None,
            PgLevel::L2M => Some(PgLevel::L4K),
            PgLevel::L1G => Some(PgLevel::L2M),
            PgLevel::L512G => Some(PgLevel::L1G),
        }
    }
    /// One level up, if any (4-level paging: 512G is the root table's level).
    pub const fn upper(self) -> Option<PgLevel> {
        match self {
            PgLevel::L4K => Some(PgLevel::L2M),
            PgLevel::L2M => Some(PgLevel::L1G),
            PgLevel::L1G => Some(PgLevel::L512G),
            PgLevel::L512G => None,
        }
    }
    /// Short name, as in trace lines.
    pub const fn name(self) -> &'static str {
        match self {
            PgLevel::L4K => "4K",
            PgLevel::L2M => "2M",
            PgLevel::L1G => "1G",
            PgLevel::L512G => "512G",
        }
    }
}

impl fmt::Display for PgLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpa_gfn_strip_shared_bit() {
        let gpa = Gpa::new(0x1234_5000).to_shared();
        assert!(gpa.is_shared());
        assert_eq!(gpa.gfn(), Gfn::new(0x12345));
        assert_eq!(gpa.gfn().gpa(), Gpa::new(0x1234_5000));
        assert!(!gpa.gfn().gpa().is_shared());
    }

    #[test]
    fn host_round_trip() {
        let pfn = Pfn::new(0x42);
        assert_eq!(pfn.hpa(), Hpa::new(0x42000));
        assert_eq!(Hpa::new(0x42fff).pfn(), pfn);
    }

    #[test]
    fn levels() {
        assert_eq!(PgLevel::L2M.pages(), 512);
        assert_eq!(PgLevel::L2M.tdx(), 1);
        assert_eq!(PgLevel::from_kvm(3), Some(PgLevel::L1G));
        assert_eq!(PgLevel::from_kvm(5), None);
        assert_eq!(Gfn::new(0x3ff).align_down(PgLevel::L2M), Gfn::new(0x200));
        assert!(Gpa::new(0x20_0000).to_shared().is_aligned(PgLevel::L2M));
        assert!(!Gpa::new(0x20_1000).is_aligned(PgLevel::L2M));
        assert_eq!(PgLevel::L4K.upper(), Some(PgLevel::L2M));
        assert_eq!(PgLevel::L4K.lower(), None);
    }
}
