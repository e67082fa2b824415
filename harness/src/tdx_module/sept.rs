//! One TD's Secure EPT: entry states and the walk.
//!
//! Models src/common/memory_handlers/sept_manager.{h,c} and the generated
//! sept_state_lookup tables (intel/tdx-module 1666adc), restricted to the states a TD without
//! migration, MMIO or L2 VMs can reach. Entries are kept sparse: an absent entry of an existing
//! table is FREE. The entry lock (TDEL) and host-priority bit live in `locks::Locks`.

use std::collections::BTreeMap;

use crate::addr::{Gfn, Pfn, PgLevel};

/// S-EPT entry states (the 7-bit state index of the module, reachable subset).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SeptState {
    Free,
    /// Left by PAGE.REMOVE during import (never reached without migration; kept for AUG's
    /// accepted-state set).
    Removed,
    NlMapped,
    NlBlocked,
    Mapped,
    Blocked,
    Pending,
    PendingBlocked,
}

impl SeptState {
    /// The public (architectural) state code reported in RDX bits 15:8.
    pub const fn public_code(self) -> u8 {
        match self {
            SeptState::Free => 0,
            SeptState::Blocked => 1,
            SeptState::Pending => 2,
            SeptState::PendingBlocked => 3,
            SeptState::Mapped => 4,
            SeptState::Removed => 5,
            SeptState::NlBlocked => 0x81,
            SeptState::NlMapped => 0x84,
        }
    }

    /// RWX != 0: a hardware-style walk passes through it (non-leaf) or translates (leaf).
    pub const fn is_present(self) -> bool {
        matches!(self, SeptState::NlMapped | SeptState::Mapped)
    }

    /// PS set: a leaf at its level.
    pub const fn is_leaf(self) -> bool {
        matches!(
            self,
            SeptState::Mapped | SeptState::Blocked | SeptState::Pending | SeptState::PendingBlocked
        )
    }

    /// `guest_accessible_leaf`.
    pub const fn guest_accessible(self) -> bool {
        matches!(self, SeptState::Mapped)
    }

    /// `any_blocked`.
    pub const fn is_blocked(self) -> bool {
        matches!(
            self,
            SeptState::NlBlocked | SeptState::Blocked | SeptState::PendingBlocked
        )
    }

    /// Pending and guest-acceptable (PENDING; not the blocked pending states).
    pub const fn is_guest_acceptable(self) -> bool {
        matches!(self, SeptState::Pending)
    }

    /// `tlb_tracking_required` of the state.
    pub const fn tlb_tracking_required(self) -> bool {
        !matches!(self, SeptState::Free | SeptState::Removed)
    }
}

/// One non-free S-EPT entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SeptEntry {
    pub state: SeptState,
    /// Leaf: the mapped page. Non-leaf: the child S-EPT page.
    pub pfn: Pfn,
    /// 2M pending leaf: 4K chunks already zeroed by an interrupted ACCEPT (bits 20:12).
    pub accept_counter: u16,
}

/// Where a walk stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Walk {
    /// Level of the last entry reached.
    pub level: PgLevel,
    /// Its first gfn (aligned to `level`).
    pub base: Gfn,
    /// Its state (FREE if absent).
    pub state: SeptState,
    pub entry: Option<SeptEntry>,
}

impl Walk {
    /// `set_arch_septe_details_in_vmm_regs` for this entry.
    pub fn details(&self) -> super::status::SeptDetails {
        super::status::SeptDetails {
            level: self.level,
            state: self.state,
        }
    }
}

/// The S-EPT of one TD: sparse entries keyed by (level, aligned gfn). The root table (512G
/// entries, in TDCS page SEPT_ROOT) always exists.
#[derive(Clone, Debug, Default)]
pub struct Sept {
    entries: BTreeMap<(PgLevel, Gfn), SeptEntry>,
}

impl Sept {
    /// The entry at `level` covering `gfn` (None = FREE).
    pub fn get(&self, level: PgLevel, gfn: Gfn) -> Option<SeptEntry> {
        self.entries.get(&(level, gfn.align_down(level))).copied()
    }

    /// State at `level` covering `gfn`.
    pub fn state(&self, level: PgLevel, gfn: Gfn) -> SeptState {
        self.get(level, gfn).map_or(SeptState::Free, |e| e.state)
    }

    /// Writes an entry (FREE removes it).
    pub fn set(&mut self, level: PgLevel, gfn: Gfn, e: SeptEntry) {
        let key = (level, gfn.align_down(level));
        if e.state == SeptState::Free {
            self.entries.remove(&key);
        } else {
            self.entries.insert(key, e);
        }
    }

    /// Frees an entry.
    pub fn clear(&mut self, level: PgLevel, gfn: Gfn) {
        self.entries.remove(&(level, gfn.align_down(level)));
    }

    /// The module's private-GPA walk (`lock_sept_check_and_walk_private_gpa` without the lock):
    /// from the root toward `target`, stopping at the target level, at a non-present entry or at
    /// a leaf. The caller compares `level` with `target`.
    pub fn walk(&self, gfn: Gfn, target: PgLevel) -> Walk {
        for level in PgLevel::WALK {
            let entry = self.get(level, gfn);
            let state = entry.map_or(SeptState::Free, |e| e.state);
            if level == target || !state.is_present() || state.is_leaf() {
                return Walk {
                    level,
                    base: gfn.align_down(level),
                    state,
                    entry,
                };
            }
        }
        unreachable!("the walk always ends at 4K")
    }

    /// True if every entry of the table at `level` that starts at `base` is FREE (the table is
    /// the child of a `level.upper()` entry).
    pub fn table_is_free(&self, level: PgLevel, base: Gfn) -> bool {
        let span = level.pages() * 512;
        let start = base.align_down(level.upper().expect("child tables are below 512G"));
        let end = start.add(span);
        !self
            .entries
            .range((level, start)..(level, end))
            .any(|(_, e)| e.state != SeptState::Free)
    }

    /// Every non-free entry, in (level, gfn) order.
    pub fn iter(&self) -> impl Iterator<Item = (PgLevel, Gfn, SeptEntry)> + '_ {
        self.entries.iter().map(|(&(l, g), &e)| (l, g, e))
    }

    /// Number of non-free entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nl(pfn: u64) -> SeptEntry {
        SeptEntry {
            state: SeptState::NlMapped,
            pfn: Pfn::new(pfn),
            accept_counter: 0,
        }
    }

    #[test]
    fn walk_stops_at_missing_table() {
        let mut s = Sept::default();
        let g = Gfn::new(0x1234);
        let w = s.walk(g, PgLevel::L4K);
        assert_eq!((w.level, w.state), (PgLevel::L512G, SeptState::Free));
        s.set(PgLevel::L512G, g, nl(1));
        s.set(PgLevel::L1G, g, nl(2));
        let w = s.walk(g, PgLevel::L4K);
        assert_eq!((w.level, w.state), (PgLevel::L2M, SeptState::Free));
        s.set(PgLevel::L2M, g, nl(3));
        let w = s.walk(g, PgLevel::L4K);
        assert_eq!(
            (w.level, w.state, w.base),
            (PgLevel::L4K, SeptState::Free, g)
        );
        // A blocked non-leaf stops the walk (RWX cleared).
        s.set(
            PgLevel::L2M,
            g,
            SeptEntry {
                state: SeptState::NlBlocked,
                ..nl(3)
            },
        );
        assert_eq!(s.walk(g, PgLevel::L4K).level, PgLevel::L2M);
    }

    #[test]
    fn table_free_check() {
        let mut s = Sept::default();
        let g = Gfn::new(0x200 + 7);
        assert!(s.table_is_free(PgLevel::L4K, g));
        s.set(
            PgLevel::L4K,
            g,
            SeptEntry {
                state: SeptState::Pending,
                pfn: Pfn::new(9),
                accept_counter: 0,
            },
        );
        assert!(!s.table_is_free(PgLevel::L4K, Gfn::new(0x200)));
        assert!(s.table_is_free(PgLevel::L4K, Gfn::new(0x400)));
    }
}
