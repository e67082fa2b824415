//! The host page ledger: every host page of the run, who owns it, whether the TDX module holds
//! it, whether TD-keyed cache lines may still be dirty, and whether its contents are safe to
//! reuse. Transitions are methods that refuse illegal moves with a typed error; the oracle turns
//! those errors into `page_ownership` violations.
//!
//! Models the kernel's page allocator as KVM/TDX use it (`alloc_page`, `__free_page`), the
//! MOVDIR64B clear (`tdx_clear_page`), the cache state that TDH.PHYMEM.PAGE.WBINVD and
//! TDH.PHYMEM.CACHE.WB flush, and the "leak on purpose" rule of `tdx_reclaim_page`.

use std::fmt;

use thiserror::Error;

use crate::addr::Pfn;
use crate::ids::{GmemId, Hkid, PgOff, TdId};

/// First pfn of the model's host memory (so no valid page is pfn 0).
pub const PFN_BASE: u64 = 0x1000;

/// What the kernel allocated a page for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum KernelUse {
    /// TDR page (`kvm_tdx->td.tdr_page`).
    Tdr,
    /// TDCS page (`td.tdcs_pages[]`).
    Tdcs,
    /// TDVPR page (`vp.tdvpr_page`).
    Tdvpr,
    /// TDCX page (`vp.tdcx_pages[]`).
    Tdcx,
    /// S-EPT page behind a mirror shadow page (`sp->external_spt`).
    Sept,
    /// A TDP MMU page-table page (`sp->spt`).
    MmuPage,
    /// Userspace memory backing a memslot's shared pages.
    UserMemory,
    /// Any other kernel page (e.g. the source page of INIT_MEM_REGION).
    Other,
}

/// Who asks the allocator for a page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AllocFor {
    Kernel(KernelUse),
    GuestMemfd { file: GmemId, index: PgOff },
}

/// Why a page was deliberately leaked (upstream leaks instead of freeing when it cannot prove
/// the page is safe to reuse).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LeakReason {
    /// TDH.PHYMEM.PAGE.RECLAIM failed (`tdx_reclaim_page` warns and leaks).
    ReclaimFailed,
    /// The HKID could not be released, so nothing the TD used can be reclaimed.
    HkidNotReleased,
    /// Removal from the S-EPT failed (`tdx_sept_remove_private_spte` bugs the VM and leaks).
    RemoveFailed,
    /// TDH.PHYMEM.PAGE.WBINVD failed.
    WbinvdFailed,
    /// `handle_removed_pt` could not free the S-EPT page (`sp->external_spt = NULL`).
    SeptFreeFailed,
}

/// Who owns a page from the allocator's point of view.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Owner {
    Free,
    Kernel(KernelUse),
    GuestMemfd { file: GmemId, index: PgOff },
    Leaked(LeakReason),
}

/// What a page was handed to the TDX module as.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TdxPageKind {
    Tdr,
    Tdcs,
    Tdvpr,
    Tdcx,
    Sept,
    /// A guest private page (PAGE.ADD or PAGE.AUG).
    Guest,
}

/// The TDX module holds the page (it is in the PAMT with a non-NDA type).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TdxHold {
    pub kind: TdxPageKind,
    pub td: TdId,
}

/// The key under which dirty cache lines of the page may still exist.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheKey {
    /// The TDX module's global private key (TDR).
    Global,
    /// A TD's private key.
    Td(Hkid),
}

/// Whether the kernel may read or reuse the page's contents.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Contents {
    /// Zeroed or ordinary kernel data.
    Clean,
    /// Written under a TDX private key: must be cleared with MOVDIR64B before reuse.
    TdPrivate,
}

/// One host page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageEntry {
    pub owner: Owner,
    pub tdx: Option<TdxHold>,
    pub dirty_key: Option<CacheKey>,
    pub contents: Contents,
}

/// An illegal move, refused.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum LedgerError {
    #[error("{0}: not a page of this host")]
    NoSuchPage(Pfn),
    #[error("out of host memory")]
    OutOfMemory,
    #[error("allocation failed (injected)")]
    InjectedFailure,
    #[error("{0}: freed while already free")]
    DoubleFree(Pfn),
    #[error("{pfn}: {action} while the TDX module holds it as {hold:?}")]
    HeldByTdx {
        pfn: Pfn,
        action: &'static str,
        hold: TdxHold,
    },
    #[error("{pfn}: freed with dirty cache lines under {key:?}")]
    DirtyCacheLines { pfn: Pfn, key: CacheKey },
    #[error("{0}: freed with TD-private contents not cleared")]
    UnclearedContents(Pfn),
    #[error("{pfn}: {action} on a page owned by {owner:?}")]
    WrongOwner {
        pfn: Pfn,
        action: &'static str,
        owner: Owner,
    },
    #[error("{0}: released by the TDX module but it did not hold it")]
    NotHeld(Pfn),
}

impl LedgerError {
    /// The page the refused move was about, if it names one.
    pub fn pfn(&self) -> Option<Pfn> {
        match *self {
            LedgerError::NoSuchPage(p)
            | LedgerError::DoubleFree(p)
            | LedgerError::UnclearedContents(p)
            | LedgerError::NotHeld(p)
            | LedgerError::HeldByTdx { pfn: p, .. }
            | LedgerError::DirtyCacheLines { pfn: p, .. }
            | LedgerError::WrongOwner { pfn: p, .. } => Some(p),
            LedgerError::OutOfMemory | LedgerError::InjectedFailure => None,
        }
    }
}

/// Every host page of the run.
#[derive(Clone, Debug)]
pub struct Ledger {
    pages: Vec<PageEntry>,
    /// Fail the next allocations (fault injection), counted down.
    fail_allocs: u32,
    /// Allocations that succeed before the injected failures start.
    succeed_first: u32,
}

impl Ledger {
    /// A host with `npages` free, clean pages starting at [`PFN_BASE`].
    pub fn new(npages: usize) -> Self {
        Ledger {
            pages: vec![
                PageEntry {
                    owner: Owner::Free,
                    tdx: None,
                    dirty_key: None,
                    contents: Contents::Clean,
                };
                npages
            ],
            fail_allocs: 0,
            succeed_first: 0,
        }
    }

    fn idx(&self, pfn: Pfn) -> Result<usize, LedgerError> {
        let i = pfn
            .raw()
            .checked_sub(PFN_BASE)
            .ok_or(LedgerError::NoSuchPage(pfn))? as usize;
        if i < self.pages.len() {
            Ok(i)
        } else {
            Err(LedgerError::NoSuchPage(pfn))
        }
    }

    /// The entry for `pfn`.
    pub fn get(&self, pfn: Pfn) -> Result<&PageEntry, LedgerError> {
        Ok(&self.pages[self.idx(pfn)?])
    }

    /// Every page with its pfn, in pfn order.
    pub fn iter(&self) -> impl Iterator<Item = (Pfn, &PageEntry)> {
        self.pages
            .iter()
            .enumerate()
            .map(|(i, p)| (Pfn::new(PFN_BASE + i as u64), p))
    }

    /// Makes the `n` allocations after the next `after` fail (models `-ENOMEM` injection).
    pub fn inject_alloc_failures(&mut self, after: u32, n: u32) {
        self.succeed_first = after;
        self.fail_allocs = n;
    }

    /// `alloc_page()`: the lowest free page (deterministic), which is always clean.
    pub fn alloc(&mut self, what: AllocFor) -> Result<Pfn, LedgerError> {
        if self.succeed_first > 0 {
            self.succeed_first -= 1;
        } else if self.fail_allocs > 0 {
            self.fail_allocs -= 1;
            return Err(LedgerError::InjectedFailure);
        }
        let i = self
            .pages
            .iter()
            .position(|p| p.owner == Owner::Free)
            .ok_or(LedgerError::OutOfMemory)?;
        self.pages[i].owner = match what {
            AllocFor::Kernel(u) => Owner::Kernel(u),
            AllocFor::GuestMemfd { file, index } => Owner::GuestMemfd { file, index },
        };
        Ok(Pfn::new(PFN_BASE + i as u64))
    }

    /// `__free_page()`: only a page nobody else holds, with no dirty TD-keyed lines and no
    /// TD-private contents.
    pub fn free(&mut self, pfn: Pfn) -> Result<(), LedgerError> {
        let i = self.idx(pfn)?;
        let p = self.pages[i];
        match p.owner {
            Owner::Free => return Err(LedgerError::DoubleFree(pfn)),
            Owner::Leaked(_) => {
                return Err(LedgerError::WrongOwner {
                    pfn,
                    action: "free",
                    owner: p.owner,
                })
            }
            Owner::Kernel(_) | Owner::GuestMemfd { .. } => {}
        }
        if let Some(hold) = p.tdx {
            return Err(LedgerError::HeldByTdx {
                pfn,
                action: "free",
                hold,
            });
        }
        if let Some(key) = p.dirty_key {
            return Err(LedgerError::DirtyCacheLines { pfn, key });
        }
        if p.contents == Contents::TdPrivate {
            return Err(LedgerError::UnclearedContents(pfn));
        }
        self.pages[i].owner = Owner::Free;
        Ok(())
    }

    /// The TDX module takes the page (it enters the PAMT). Its contents become TD-private and
    /// cache lines under `key` may become dirty.
    pub fn donate(&mut self, pfn: Pfn, hold: TdxHold, key: CacheKey) -> Result<(), LedgerError> {
        let i = self.idx(pfn)?;
        let p = self.pages[i];
        if let Some(held) = p.tdx {
            return Err(LedgerError::HeldByTdx {
                pfn,
                action: "donate",
                hold: held,
            });
        }
        match p.owner {
            Owner::Kernel(_) | Owner::GuestMemfd { .. } => {}
            owner => {
                return Err(LedgerError::WrongOwner {
                    pfn,
                    action: "donate",
                    owner,
                })
            }
        }
        let e = &mut self.pages[i];
        e.tdx = Some(hold);
        e.dirty_key = Some(key);
        e.contents = Contents::TdPrivate;
        Ok(())
    }

    /// The TDX module lets go of the page (PAGE.REMOVE or PAGE.RECLAIM succeeded). Contents and
    /// cache lines stay as they were until flushed and cleared.
    pub fn module_release(&mut self, pfn: Pfn) -> Result<TdxHold, LedgerError> {
        let i = self.idx(pfn)?;
        self.pages[i].tdx.take().ok_or(LedgerError::NotHeld(pfn))
    }

    /// TDH.PHYMEM.PAGE.WBINVD of one page under `key`.
    pub fn wbinvd(&mut self, pfn: Pfn, key: CacheKey) -> Result<(), LedgerError> {
        let i = self.idx(pfn)?;
        if self.pages[i].dirty_key == Some(key) {
            self.pages[i].dirty_key = None;
        }
        Ok(())
    }

    /// TDH.PHYMEM.CACHE.WB completed for `hkid` on every package: no line under it stays dirty.
    pub fn cache_wb(&mut self, hkid: Hkid) {
        for p in &mut self.pages {
            if p.dirty_key == Some(CacheKey::Td(hkid)) {
                p.dirty_key = None;
            }
        }
    }

    /// `tdx_clear_page()`: MOVDIR64B zeroing by the kernel. Refused on a page the module holds.
    pub fn clear(&mut self, pfn: Pfn) -> Result<(), LedgerError> {
        let i = self.idx(pfn)?;
        if let Some(hold) = self.pages[i].tdx {
            return Err(LedgerError::HeldByTdx {
                pfn,
                action: "clear",
                hold,
            });
        }
        self.pages[i].contents = Contents::Clean;
        Ok(())
    }

    /// Leaks the page on purpose: it is never freed again.
    pub fn leak(&mut self, pfn: Pfn, why: LeakReason) -> Result<(), LedgerError> {
        let i = self.idx(pfn)?;
        match self.pages[i].owner {
            Owner::Free => Err(LedgerError::WrongOwner {
                pfn,
                action: "leak",
                owner: Owner::Free,
            }),
            _ => {
                self.pages[i].owner = Owner::Leaked(why);
                Ok(())
            }
        }
    }

    /// Pages neither free nor deliberately leaked (after teardown, each is a leak nobody
    /// recorded).
    pub fn unaccounted(&self) -> Vec<(Pfn, PageEntry)> {
        self.iter()
            .filter(|(_, p)| !matches!(p.owner, Owner::Free | Owner::Leaked(_)))
            .map(|(pfn, p)| (pfn, *p))
            .collect()
    }

    /// Count of pages in each coarse state, for summaries: (free, in use, held by TDX, leaked).
    pub fn census(&self) -> Census {
        let mut c = Census::default();
        for p in &self.pages {
            match p.owner {
                Owner::Free => c.free += 1,
                Owner::Leaked(_) => c.leaked += 1,
                _ => c.in_use += 1,
            }
            if p.tdx.is_some() {
                c.held_by_tdx += 1;
            }
        }
        c
    }
}

/// Coarse page counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Census {
    pub free: usize,
    pub in_use: usize,
    pub held_by_tdx: usize,
    pub leaked: usize,
}

impl fmt::Display for Census {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "free {} in-use {} tdx {} leaked {}",
            self.free, self.in_use, self.held_by_tdx, self.leaked
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TD: TdId = TdId(0);
    const HKID: Hkid = Hkid(7);

    fn hold(kind: TdxPageKind) -> TdxHold {
        TdxHold { kind, td: TD }
    }

    #[test]
    fn alloc_is_deterministic_and_bounded() {
        let mut l = Ledger::new(2);
        let a = l.alloc(AllocFor::Kernel(KernelUse::Tdr)).unwrap();
        let b = l.alloc(AllocFor::Kernel(KernelUse::Other)).unwrap();
        assert_eq!(a, Pfn::new(PFN_BASE));
        assert_eq!(b, Pfn::new(PFN_BASE + 1));
        assert_eq!(
            l.alloc(AllocFor::Kernel(KernelUse::Other)),
            Err(LedgerError::OutOfMemory)
        );
        l.free(a).unwrap();
        assert_eq!(l.alloc(AllocFor::Kernel(KernelUse::Other)).unwrap(), a);
        l.inject_alloc_failures(0, 1);
        l.free(a).unwrap();
        assert_eq!(
            l.alloc(AllocFor::Kernel(KernelUse::Other)),
            Err(LedgerError::InjectedFailure)
        );
        assert!(l.alloc(AllocFor::Kernel(KernelUse::Other)).is_ok());
    }

    #[test]
    fn guest_page_full_cycle() {
        // AUG -> REMOVE -> WBINVD(hkid) -> clear -> free: every step legal, page ends free.
        let mut l = Ledger::new(4);
        let file = GmemId(0);
        let p = l
            .alloc(AllocFor::GuestMemfd {
                file,
                index: PgOff(3),
            })
            .unwrap();
        l.donate(p, hold(TdxPageKind::Guest), CacheKey::Td(HKID))
            .unwrap();
        assert_eq!(l.module_release(p).unwrap(), hold(TdxPageKind::Guest));
        l.wbinvd(p, CacheKey::Td(HKID)).unwrap();
        l.clear(p).unwrap();
        l.free(p).unwrap();
        assert!(l.unaccounted().is_empty());
    }

    #[test]
    fn refuses_illegal_moves() {
        let mut l = Ledger::new(4);
        let p = l.alloc(AllocFor::Kernel(KernelUse::Tdcx)).unwrap();
        l.donate(p, hold(TdxPageKind::Tdcx), CacheKey::Td(HKID))
            .unwrap();
        // Owned twice.
        assert!(matches!(
            l.donate(p, hold(TdxPageKind::Tdcx), CacheKey::Td(HKID)),
            Err(LedgerError::HeldByTdx {
                action: "donate",
                ..
            })
        ));
        // Freed or cleared while the module holds it.
        assert!(matches!(
            l.free(p),
            Err(LedgerError::HeldByTdx { action: "free", .. })
        ));
        assert!(matches!(
            l.clear(p),
            Err(LedgerError::HeldByTdx {
                action: "clear",
                ..
            })
        ));
        l.module_release(p).unwrap();
        assert_eq!(l.module_release(p), Err(LedgerError::NotHeld(p)));
        // Dirty lines under the TD key until CACHE.WB.
        assert_eq!(
            l.free(p),
            Err(LedgerError::DirtyCacheLines {
                pfn: p,
                key: CacheKey::Td(HKID)
            })
        );
        l.cache_wb(HKID);
        // Reclaimed but not cleared: refused (the no_clear_after_reclaim bug).
        assert_eq!(l.free(p), Err(LedgerError::UnclearedContents(p)));
        l.clear(p).unwrap();
        l.free(p).unwrap();
        assert_eq!(l.free(p), Err(LedgerError::DoubleFree(p)));
        assert_eq!(
            l.free(Pfn::new(1)),
            Err(LedgerError::NoSuchPage(Pfn::new(1)))
        );
    }

    #[test]
    fn wbinvd_under_other_key_does_not_flush() {
        let mut l = Ledger::new(1);
        let p = l.alloc(AllocFor::Kernel(KernelUse::Tdr)).unwrap();
        l.donate(p, hold(TdxPageKind::Tdr), CacheKey::Global)
            .unwrap();
        l.module_release(p).unwrap();
        l.cache_wb(HKID);
        l.wbinvd(p, CacheKey::Td(HKID)).unwrap();
        l.clear(p).unwrap();
        assert!(matches!(
            l.free(p),
            Err(LedgerError::DirtyCacheLines { .. })
        ));
        l.wbinvd(p, CacheKey::Global).unwrap();
        l.free(p).unwrap();
    }

    #[test]
    fn leaks_are_accounted_unrecorded_ones_are_not() {
        let mut l = Ledger::new(3);
        let a = l.alloc(AllocFor::Kernel(KernelUse::Sept)).unwrap();
        let b = l.alloc(AllocFor::Kernel(KernelUse::Tdr)).unwrap();
        l.donate(b, hold(TdxPageKind::Tdr), CacheKey::Global)
            .unwrap();
        l.leak(a, LeakReason::SeptFreeFailed).unwrap();
        assert!(matches!(l.free(a), Err(LedgerError::WrongOwner { .. })));
        let un = l.unaccounted();
        assert_eq!(un.len(), 1);
        assert_eq!(un[0].0, b);
        assert_eq!(
            l.census(),
            Census {
                free: 1,
                in_use: 1,
                held_by_tdx: 1,
                leaked: 1
            }
        );
    }
}
