//! The SEAMCALL and TDCALL leaves the model implements, with the module's leaf numbers
//! (`seamcall_leaf_opcode_t` in include/tdx_api_defs.h, `tdcall_leaf_opcode_t` for the guest;
//! Linux: arch/x86/virt/vmx/tdx/tdx.h).

use std::fmt;

/// A SEAMCALL (host) or TDCALL (guest) leaf.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Leaf {
    VpEnter,
    MngAddcx,
    MemPageAdd,
    MemSeptAdd,
    VpAddcx,
    MemPageAug,
    MemRangeBlock,
    MngKeyConfig,
    MngCreate,
    VpCreate,
    MrExtend,
    MrFinalize,
    VpFlush,
    MngVpflushdone,
    MngKeyFreeid,
    MngInit,
    VpInit,
    PhymemPageReclaim,
    MemPageRemove,
    MemSeptRemove,
    MemTrack,
    MemRangeUnblock,
    PhymemCacheWb,
    PhymemPageWbinvd,
    /// Guest TDCALLs.
    TdgMemPageAccept,
    TdgMemPageAttrRd,
    TdgMemPageAttrWr,
}

impl Leaf {
    /// Every leaf, host leaves first.
    pub const ALL: [Leaf; 27] = [
        Leaf::VpEnter,
        Leaf::MngAddcx,
        Leaf::MemPageAdd,
        Leaf::MemSeptAdd,
        Leaf::VpAddcx,
        Leaf::MemPageAug,
        Leaf::MemRangeBlock,
        Leaf::MngKeyConfig,
        Leaf::MngCreate,
        Leaf::VpCreate,
        Leaf::MrExtend,
        Leaf::MrFinalize,
        Leaf::VpFlush,
        Leaf::MngVpflushdone,
        Leaf::MngKeyFreeid,
        Leaf::MngInit,
        Leaf::VpInit,
        Leaf::PhymemPageReclaim,
        Leaf::MemPageRemove,
        Leaf::MemSeptRemove,
        Leaf::MemTrack,
        Leaf::MemRangeUnblock,
        Leaf::PhymemCacheWb,
        Leaf::PhymemPageWbinvd,
        Leaf::TdgMemPageAccept,
        Leaf::TdgMemPageAttrRd,
        Leaf::TdgMemPageAttrWr,
    ];

    /// The leaf number in RAX bits 15:0.
    pub const fn number(self) -> u16 {
        match self {
            Leaf::VpEnter => 0,
            Leaf::MngAddcx => 1,
            Leaf::MemPageAdd => 2,
            Leaf::MemSeptAdd => 3,
            Leaf::VpAddcx => 4,
            Leaf::MemPageAug => 6,
            Leaf::MemRangeBlock => 7,
            Leaf::MngKeyConfig => 8,
            Leaf::MngCreate => 9,
            Leaf::VpCreate => 10,
            Leaf::MrExtend => 16,
            Leaf::MrFinalize => 17,
            Leaf::VpFlush => 18,
            Leaf::MngVpflushdone => 19,
            Leaf::MngKeyFreeid => 20,
            Leaf::MngInit => 21,
            Leaf::VpInit => 22,
            Leaf::PhymemPageReclaim => 28,
            Leaf::MemPageRemove => 29,
            Leaf::MemSeptRemove => 30,
            Leaf::MemTrack => 38,
            Leaf::MemRangeUnblock => 39,
            Leaf::PhymemCacheWb => 40,
            Leaf::PhymemPageWbinvd => 41,
            Leaf::TdgMemPageAccept => 6,
            Leaf::TdgMemPageAttrRd => 23,
            Leaf::TdgMemPageAttrWr => 24,
        }
    }

    /// True for guest TDCALLs.
    pub const fn is_tdcall(self) -> bool {
        matches!(
            self,
            Leaf::TdgMemPageAccept | Leaf::TdgMemPageAttrRd | Leaf::TdgMemPageAttrWr
        )
    }

    /// The ABI name.
    pub const fn name(self) -> &'static str {
        match self {
            Leaf::VpEnter => "TDH.VP.ENTER",
            Leaf::MngAddcx => "TDH.MNG.ADDCX",
            Leaf::MemPageAdd => "TDH.MEM.PAGE.ADD",
            Leaf::MemSeptAdd => "TDH.MEM.SEPT.ADD",
            Leaf::VpAddcx => "TDH.VP.ADDCX",
            Leaf::MemPageAug => "TDH.MEM.PAGE.AUG",
            Leaf::MemRangeBlock => "TDH.MEM.RANGE.BLOCK",
            Leaf::MngKeyConfig => "TDH.MNG.KEY.CONFIG",
            Leaf::MngCreate => "TDH.MNG.CREATE",
            Leaf::VpCreate => "TDH.VP.CREATE",
            Leaf::MrExtend => "TDH.MR.EXTEND",
            Leaf::MrFinalize => "TDH.MR.FINALIZE",
            Leaf::VpFlush => "TDH.VP.FLUSH",
            Leaf::MngVpflushdone => "TDH.MNG.VPFLUSHDONE",
            Leaf::MngKeyFreeid => "TDH.MNG.KEY.FREEID",
            Leaf::MngInit => "TDH.MNG.INIT",
            Leaf::VpInit => "TDH.VP.INIT",
            Leaf::PhymemPageReclaim => "TDH.PHYMEM.PAGE.RECLAIM",
            Leaf::MemPageRemove => "TDH.MEM.PAGE.REMOVE",
            Leaf::MemSeptRemove => "TDH.MEM.SEPT.REMOVE",
            Leaf::MemTrack => "TDH.MEM.TRACK",
            Leaf::MemRangeUnblock => "TDH.MEM.RANGE.UNBLOCK",
            Leaf::PhymemCacheWb => "TDH.PHYMEM.CACHE.WB",
            Leaf::PhymemPageWbinvd => "TDH.PHYMEM.PAGE.WBINVD",
            Leaf::TdgMemPageAccept => "TDG.MEM.PAGE.ACCEPT",
            Leaf::TdgMemPageAttrRd => "TDG.MEM.PAGE.ATTR.RD",
            Leaf::TdgMemPageAttrWr => "TDG.MEM.PAGE.ATTR.WR",
        }
    }
}

impl Leaf {
    /// Whether the leaf builds or runs the TD (creates, adds, maps, measures, enters), as
    /// opposed to taking it down (block, track, remove, flush, reclaim, free the key) or a
    /// guest TDCALL. After a VM is dead only the second kind has a reason to run.
    pub const fn builds_or_runs(self) -> bool {
        matches!(
            self,
            Leaf::VpEnter
                | Leaf::MngAddcx
                | Leaf::MemPageAdd
                | Leaf::MemSeptAdd
                | Leaf::VpAddcx
                | Leaf::MemPageAug
                | Leaf::MngKeyConfig
                | Leaf::MngCreate
                | Leaf::VpCreate
                | Leaf::MrExtend
                | Leaf::MrFinalize
                | Leaf::MngInit
                | Leaf::VpInit
        )
    }

    /// The leaf with this ABI name.
    pub fn from_name(s: &str) -> Option<Leaf> {
        Leaf::ALL.into_iter().find(|l| l.name() == s)
    }
}

impl fmt::Display for Leaf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
