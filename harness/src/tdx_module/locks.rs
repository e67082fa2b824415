//! The TDX module's operand locks: the lock kinds of src/common/helpers/tdx_locks.h and, as
//! data, the order in which each leaf's handler takes them (one row per leaf).
//!
//! Every module lock is a try-lock: a contended acquire returns TDX_OPERAND_BUSY with the
//! operand of the table row at once, and the leaf releases what it already holds. Host-priority
//! locks (PAMT entries, the OP_STATE lock, S-EPT entry locks) additionally remember that a host
//! lost the race: the guest's next acquire then fails with TDX_OPERAND_BUSY_HOST_PRIORITY until a
//! host acquire succeeds, or, for an S-EPT entry, until a leaf rewrites the whole entry (its
//! HP bit, 52, is part of the entry and every commit writes it clear).

use std::collections::BTreeMap;

use crate::addr::{Gfn, Pfn, PgLevel};
use crate::sched::TaskId;

use super::leaves::Leaf;
use super::status::{Code, Operand, SeamErr};

/// Shared or exclusive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Mode {
    Shared,
    Exclusive,
}

/// Who asks: a host SEAMCALL or a guest TDCALL (`is_guest` in the lock helpers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Host,
    Guest,
}

/// The kind of resource a lock-table row names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Res {
    /// The TDR page's PAMT entry (explicit operand or implicit via a child's owner).
    Tdr,
    /// The TDVPR page's PAMT entry.
    Tdvpr,
    /// The PAMT entry of the page the leaf adds, removes, reclaims or flushes.
    Page,
    /// `TDCS.management_fields.op_state_lock` (host-priority sharex).
    OpState,
    /// `TDCS.executions_ctl_fields.secure_ept_lock` (plain sharex).
    SeptTree,
    /// The TDEL bit of one S-EPT entry, with its host-priority bit.
    SeptEntry,
    /// `TDCS.epoch_tracking.epoch_lock` (plain sharex).
    TdEpoch,
    /// The global key-ownership-table lock (plain sharex).
    Kot,
    /// The per-package write-back-table mutex.
    Wbt,
}

impl Res {
    /// Whether the lock remembers a host that lost (host-priority kinds).
    pub const fn host_priority(self) -> bool {
        matches!(
            self,
            Res::Tdr | Res::Tdvpr | Res::Page | Res::OpState | Res::SeptEntry
        )
    }
}

/// A concrete lock instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LockKey {
    /// A PAMT entry lock (TDR, TDVPR and page rows all lock PAMT entries).
    Pamt(Pfn),
    /// TD-scoped locks, keyed by the TD's TDR page.
    OpState(Pfn),
    SeptTree(Pfn),
    SeptEntry(Pfn, PgLevel, Gfn),
    TdEpoch(Pfn),
    Kot,
    Wbt(u8),
}

impl LockKey {
    fn matches(self, res: Res) -> bool {
        matches!(
            (self, res),
            (LockKey::Pamt(_), Res::Tdr | Res::Tdvpr | Res::Page)
                | (LockKey::OpState(_), Res::OpState)
                | (LockKey::SeptTree(_), Res::SeptTree)
                | (LockKey::SeptEntry(..), Res::SeptEntry)
                | (LockKey::TdEpoch(_), Res::TdEpoch)
                | (LockKey::Kot, Res::Kot)
                | (LockKey::Wbt(_), Res::Wbt)
        )
    }
}

/// One step of a leaf's lock sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LockStep {
    pub res: Res,
    pub mode: Mode,
    /// The operand reported with TDX_OPERAND_BUSY when this lock is contended.
    pub busy: Operand,
    /// Taken only in some cases (zero-step in VP.ENTER, owner TDR in RECLAIM of a non-TDR page).
    pub optional: bool,
}

const fn step(res: Res, mode: Mode, busy: Operand) -> LockStep {
    LockStep {
        res,
        mode,
        busy,
        optional: false,
    }
}

const fn opt(res: Res, mode: Mode, busy: Operand) -> LockStep {
    LockStep {
        res,
        mode,
        busy,
        optional: true,
    }
}

use Mode::{Exclusive as EX, Shared as SH};

/// The lock table: for each leaf, the locks its handler takes, in order (intel/tdx-module
/// 1666adc, src/vmm_dispatcher/api_calls/*.c and src/td_dispatcher/vm_exits/tdg_mem_page_*.c).
/// Seed 000's tables are a summary of these rows.
pub fn lock_row(leaf: Leaf) -> &'static [LockStep] {
    use Operand as O;
    match leaf {
        Leaf::MemPageAdd => {
            const R: &[LockStep] = &[step(Res::Tdr, EX, O::Rdx), step(Res::Page, EX, O::R8)];
            R
        }
        Leaf::MemSeptAdd | Leaf::MemPageAug => {
            const R: &[LockStep] = &[
                step(Res::Tdr, SH, O::Rdx),
                step(Res::OpState, SH, O::OpState),
                step(Res::SeptTree, SH, O::SeptTree),
                step(Res::SeptEntry, EX, O::Rcx),
                step(Res::Page, EX, O::R8),
            ];
            R
        }
        Leaf::MemRangeBlock | Leaf::MemRangeUnblock => {
            const R: &[LockStep] = &[
                step(Res::Tdr, SH, O::Rdx),
                step(Res::OpState, SH, O::OpState),
                step(Res::SeptTree, EX, O::SeptTree),
                step(Res::SeptEntry, EX, O::Rcx),
            ];
            R
        }
        Leaf::MemTrack => {
            const R: &[LockStep] = &[
                step(Res::Tdr, SH, O::Rcx),
                step(Res::OpState, SH, O::OpState),
                step(Res::TdEpoch, EX, O::TdEpoch),
            ];
            R
        }
        Leaf::MemPageRemove => {
            const R: &[LockStep] = &[
                step(Res::Tdr, SH, O::Rdx),
                step(Res::OpState, SH, O::OpState),
                step(Res::SeptTree, SH, O::SeptTree),
                step(Res::SeptEntry, EX, O::Rcx),
                step(Res::Page, EX, O::Rcx),
            ];
            R
        }
        Leaf::MemSeptRemove => {
            const R: &[LockStep] = &[
                step(Res::Tdr, SH, O::Rdx),
                step(Res::OpState, SH, O::OpState),
                step(Res::SeptTree, EX, O::SeptTree),
                step(Res::SeptEntry, EX, O::Rcx),
                step(Res::Page, EX, O::Rcx),
            ];
            R
        }
        Leaf::MrExtend => {
            const R: &[LockStep] = &[step(Res::Tdr, EX, O::Rdx)];
            R
        }
        Leaf::MrFinalize | Leaf::MngKeyConfig | Leaf::MngInit => {
            const R: &[LockStep] = &[step(Res::Tdr, EX, O::Rcx)];
            R
        }
        Leaf::MngCreate => {
            const R: &[LockStep] = &[step(Res::Page, EX, O::Rcx), step(Res::Kot, EX, O::Kot)];
            R
        }
        Leaf::MngAddcx => {
            const R: &[LockStep] = &[step(Res::Tdr, EX, O::Rdx), step(Res::Page, EX, O::Rcx)];
            R
        }
        Leaf::VpCreate => {
            const R: &[LockStep] = &[
                step(Res::Tdr, SH, O::Rdx),
                step(Res::OpState, SH, O::OpState),
                step(Res::Page, EX, O::Rcx),
            ];
            R
        }
        Leaf::VpAddcx => {
            const R: &[LockStep] = &[
                step(Res::Tdvpr, EX, O::Rdx),
                step(Res::Tdr, SH, O::Tdr),
                step(Res::OpState, SH, O::OpState),
                step(Res::Page, EX, O::Rcx),
            ];
            R
        }
        Leaf::VpInit => {
            // Version 1 (Linux passes the x2APIC ID): tdh_vp_init.c locks the TDR exclusively;
            // version 0 would take it shared.
            const R: &[LockStep] = &[
                step(Res::Tdvpr, EX, O::Rcx),
                step(Res::Tdr, EX, O::Tdr),
                step(Res::OpState, SH, O::OpState),
            ];
            R
        }
        Leaf::VpEnter => {
            const R: &[LockStep] = &[
                step(Res::Tdvpr, SH, O::Rcx),
                step(Res::Tdr, SH, O::Tdr),
                step(Res::OpState, SH, O::OpState),
                step(Res::TdEpoch, SH, O::TdEpoch),
                opt(Res::SeptTree, EX, O::SeptTree),
            ];
            R
        }
        Leaf::VpFlush => {
            const R: &[LockStep] = &[step(Res::Tdvpr, EX, O::Rcx), step(Res::Tdr, SH, O::Tdr)];
            R
        }
        Leaf::MngVpflushdone | Leaf::MngKeyFreeid => {
            const R: &[LockStep] = &[step(Res::Tdr, EX, O::Rcx), step(Res::Kot, EX, O::Kot)];
            R
        }
        Leaf::PhymemCacheWb => {
            const R: &[LockStep] = &[step(Res::Wbt, EX, O::Wbcache), step(Res::Kot, SH, O::Kot)];
            R
        }
        Leaf::PhymemPageReclaim => {
            const R: &[LockStep] = &[step(Res::Page, EX, O::Rcx), opt(Res::Tdr, SH, O::Tdr)];
            R
        }
        Leaf::PhymemPageWbinvd => {
            const R: &[LockStep] = &[step(Res::Page, SH, O::Rcx)];
            R
        }
        Leaf::TdgMemPageAccept | Leaf::TdgMemPageAttrRd | Leaf::TdgMemPageAttrWr => {
            const R: &[LockStep] = &[step(Res::SeptEntry, EX, O::Rcx)];
            R
        }
    }
}

/// State of one lock word.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LockWord {
    pub exclusive: Option<TaskId>,
    pub readers: Vec<TaskId>,
    /// HOST_PRIORITY bit (host-priority kinds only).
    pub host_priority: bool,
}

impl LockWord {
    fn is_free(&self) -> bool {
        self.exclusive.is_none() && self.readers.is_empty()
    }
}

/// Why an acquire failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockFail {
    Busy,
    /// Guest side only: a host is flagged as waiting.
    BusyHostPriority,
}

/// Every module lock word, by instance. Absent = free and no host-priority flag.
#[derive(Clone, Debug, Default)]
pub struct Locks {
    words: BTreeMap<LockKey, LockWord>,
}

impl Locks {
    /// Try-acquire with the module's semantics for the lock kind (`acquire_sharex_lock*`,
    /// `sept_lock_acquire_host/guest`).
    pub fn try_acquire(
        &mut self,
        key: LockKey,
        hp_kind: bool,
        mode: Mode,
        side: Side,
        who: TaskId,
    ) -> Result<(), LockFail> {
        let w = self.words.entry(key).or_default();
        let can = match mode {
            Mode::Shared => w.exclusive.is_none(),
            Mode::Exclusive => w.is_free(),
        };
        match side {
            Side::Host => {
                if can {
                    // A successful host acquire is what clears the host-priority flag.
                    w.host_priority = false;
                } else {
                    if hp_kind {
                        w.host_priority = true;
                    }
                    return Err(LockFail::Busy);
                }
            }
            Side::Guest => {
                // `acquire_sharex_lock_hp_sh` tests the HP flag before the exclusive bit; the
                // exclusive and S-EPT entry acquires fail plain BUSY on a held lock first.
                let hp = hp_kind && w.host_priority;
                if hp && mode == Mode::Shared {
                    return Err(LockFail::BusyHostPriority);
                }
                if !can {
                    return Err(LockFail::Busy);
                }
                if hp {
                    return Err(LockFail::BusyHostPriority);
                }
            }
        }
        match mode {
            Mode::Shared => w.readers.push(who),
            Mode::Exclusive => w.exclusive = Some(who),
        }
        Ok(())
    }

    /// Releases a hold (exclusive release keeps the host-priority flag, as the module does).
    pub fn release(&mut self, key: LockKey, mode: Mode, who: TaskId) {
        let w = self
            .words
            .get_mut(&key)
            .expect("releasing a lock never taken");
        match mode {
            Mode::Shared => {
                let i = w
                    .readers
                    .iter()
                    .position(|r| *r == who)
                    .expect("shared release by a non-holder");
                w.readers.remove(i);
            }
            Mode::Exclusive => {
                assert_eq!(w.exclusive, Some(who), "exclusive release by a non-holder");
                w.exclusive = None;
            }
        }
        if w.is_free() && !w.host_priority {
            self.words.remove(&key);
        }
    }

    /// A leaf wrote the whole S-EPT entry behind `key` (`atomic_mem_write_64b` of a copy taken
    /// when the lock was acquired): the HP bit a losing host set meanwhile is gone.
    pub fn entry_rewritten(&mut self, key: LockKey) {
        debug_assert!(matches!(key, LockKey::SeptEntry(..)), "{key:?}");
        if let Some(w) = self.words.get_mut(&key) {
            w.host_priority = false;
        }
    }

    /// The lock word (for checks and tests).
    pub fn word(&self, key: LockKey) -> Option<&LockWord> {
        self.words.get(&key)
    }

    /// True if no lock is held by anyone (host-priority flags may remain).
    pub fn none_held(&self) -> bool {
        self.words.values().all(LockWord::is_free)
    }

    /// Locks held by `who`, for diagnostics.
    pub fn held_by(&self, who: TaskId) -> Vec<LockKey> {
        self.words
            .iter()
            .filter(|(_, w)| w.exclusive == Some(who) || w.readers.contains(&who))
            .map(|(k, _)| *k)
            .collect()
    }
}

/// The locks one leaf invocation holds, taken in table order.
#[derive(Debug)]
pub struct Guard {
    leaf: Leaf,
    who: TaskId,
    side: Side,
    next: usize,
    held: Vec<(LockKey, Mode)>,
}

impl Guard {
    pub fn new(leaf: Leaf, who: TaskId) -> Self {
        Guard {
            leaf,
            who,
            side: if leaf.is_tdcall() {
                Side::Guest
            } else {
                Side::Host
            },
            next: 0,
            held: Vec::new(),
        }
    }

    /// Takes the next lock of the leaf's row on `key`. Contention gives the row's BUSY status
    /// (or BUSY_HOST_PRIORITY for a guest), with everything already held released.
    pub fn take(&mut self, locks: &mut Locks, key: LockKey) -> Result<(), SeamErr> {
        let row = lock_row(self.leaf);
        let st = *row
            .get(self.next)
            .unwrap_or_else(|| panic!("{}: more locks taken than its row lists", self.leaf));
        assert!(
            key.matches(st.res),
            "{}: lock {key:?} is not row step {st:?}",
            self.leaf
        );
        self.next += 1;
        match locks.try_acquire(key, st.res.host_priority(), st.mode, self.side, self.who) {
            Ok(()) => {
                self.held.push((key, st.mode));
                Ok(())
            }
            Err(fail) => {
                self.release_all(locks);
                let code = match fail {
                    LockFail::Busy => Code::OperandBusy,
                    LockFail::BusyHostPriority => Code::OperandBusyHostPriority,
                };
                Err(SeamErr::with(code, st.busy))
            }
        }
    }

    /// Passes over an optional step that does not apply.
    pub fn skip(&mut self) {
        let st = lock_row(self.leaf)[self.next];
        assert!(
            st.optional,
            "{}: skipping a mandatory lock {st:?}",
            self.leaf
        );
        self.next += 1;
    }

    /// Releases one held lock early (e.g. VP.ENTER's epoch lock) .
    pub fn release_one(&mut self, locks: &mut Locks, key: LockKey) {
        let i = self
            .held
            .iter()
            .position(|(k, _)| *k == key)
            .expect("releasing a lock this leaf does not hold");
        let (k, m) = self.held.remove(i);
        locks.release(k, m, self.who);
    }

    /// Releases everything still held, in reverse order of acquisition.
    pub fn release_all(&mut self, locks: &mut Locks) {
        while let Some((k, m)) = self.held.pop() {
            locks.release(k, m, self.who);
        }
    }

    /// The leaf's commit rewrote the S-EPT entry whose lock it holds (see
    /// [`Locks::entry_rewritten`]); a no-op for a leaf without an entry lock.
    pub fn commit_entry(&self, locks: &mut Locks) {
        for (k, _) in &self.held {
            if matches!(k, LockKey::SeptEntry(..)) {
                locks.entry_rewritten(*k);
            }
        }
    }

    /// The locks still held, in acquisition order.
    pub fn held(&self) -> &[(LockKey, Mode)] {
        &self.held
    }

    /// Hands the remaining holds over (VP.ENTER keeps TDR and TDVPR until TD exit).
    pub fn into_held(self) -> Vec<(LockKey, Mode)> {
        self.held
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: TaskId = TaskId(0);
    const T1: TaskId = TaskId(1);

    #[test]
    fn every_leaf_has_a_row() {
        for leaf in Leaf::ALL {
            assert!(!lock_row(leaf).is_empty(), "{leaf}");
        }
    }

    #[test]
    fn host_priority_entry_lock() {
        let mut l = Locks::default();
        let e = LockKey::SeptEntry(Pfn::new(1), PgLevel::L4K, Gfn::new(5));
        // Guest holds the entry; the host loses and flags priority.
        l.try_acquire(e, true, Mode::Exclusive, Side::Guest, T0)
            .unwrap();
        assert_eq!(
            l.try_acquire(e, true, Mode::Exclusive, Side::Host, T1),
            Err(LockFail::Busy)
        );
        l.release(e, Mode::Exclusive, T0);
        // The guest's next attempt is refused while the host has not had its turn.
        assert_eq!(
            l.try_acquire(e, true, Mode::Exclusive, Side::Guest, T0),
            Err(LockFail::BusyHostPriority)
        );
        // The host succeeds and clears the flag; then the guest gets plain BUSY, and after
        // release, the lock.
        l.try_acquire(e, true, Mode::Exclusive, Side::Host, T1)
            .unwrap();
        assert!(!l.word(e).unwrap().host_priority);
        assert_eq!(
            l.try_acquire(e, true, Mode::Exclusive, Side::Guest, T0),
            Err(LockFail::Busy)
        );
        l.release(e, Mode::Exclusive, T1);
        l.try_acquire(e, true, Mode::Exclusive, Side::Guest, T0)
            .unwrap();
    }

    /// `acquire_sharex_lock_hp_sh` (guest) tests HP before the exclusive bit;
    /// `acquire_sharex_lock_hp_ex` and `sept_lock_acquire_guest` fail plain BUSY on a held lock.
    /// Rows: (mode the guest asks, held exclusively by the host?, HP set?, result).
    #[test]
    fn guest_acquire_order_of_checks() {
        use LockFail::{Busy, BusyHostPriority as Hp};
        let rows: &[(Mode, bool, bool, Result<(), LockFail>)] = &[
            (Mode::Shared, true, true, Err(Hp)),
            (Mode::Shared, true, false, Err(Busy)),
            (Mode::Shared, false, true, Err(Hp)),
            (Mode::Exclusive, true, true, Err(Busy)),
            (Mode::Exclusive, false, true, Err(Hp)),
            (Mode::Exclusive, false, false, Ok(())),
        ];
        for &(mode, held, hp, want) in rows {
            let mut l = Locks::default();
            let k = LockKey::OpState(Pfn::new(3));
            l.try_acquire(k, true, Mode::Exclusive, Side::Host, T1)
                .unwrap();
            if hp {
                // A second host loses and flags priority.
                assert_eq!(
                    l.try_acquire(k, true, Mode::Shared, Side::Host, TaskId(2)),
                    Err(LockFail::Busy)
                );
            }
            if !held {
                l.release(k, Mode::Exclusive, T1);
            }
            let got = l.try_acquire(k, true, mode, Side::Guest, T0);
            assert_eq!(got, want, "{mode:?} held={held} hp={hp}");
        }
    }

    /// A whole-entry commit clears HP; a release alone keeps it.
    #[test]
    fn entry_rewrite_clears_host_priority() {
        let mut l = Locks::default();
        let e = LockKey::SeptEntry(Pfn::new(1), PgLevel::L4K, Gfn::new(5));
        l.try_acquire(e, true, Mode::Exclusive, Side::Guest, T0)
            .unwrap();
        assert_eq!(
            l.try_acquire(e, true, Mode::Exclusive, Side::Host, T1),
            Err(LockFail::Busy)
        );
        l.entry_rewritten(e);
        l.release(e, Mode::Exclusive, T0);
        assert!(l.word(e).is_none(), "free and no HP: nothing left");
        l.try_acquire(e, true, Mode::Exclusive, Side::Guest, T0)
            .unwrap();
    }

    #[test]
    fn plain_lock_has_no_priority() {
        let mut l = Locks::default();
        let t = LockKey::SeptTree(Pfn::new(1));
        l.try_acquire(t, false, Mode::Shared, Side::Host, T0)
            .unwrap();
        l.try_acquire(t, false, Mode::Shared, Side::Host, T1)
            .unwrap();
        assert_eq!(
            l.try_acquire(t, false, Mode::Exclusive, Side::Host, T1),
            Err(LockFail::Busy)
        );
        assert!(!l.word(t).unwrap().host_priority);
        l.release(t, Mode::Shared, T0);
        l.release(t, Mode::Shared, T1);
        assert!(l.none_held());
    }

    #[test]
    fn guard_releases_on_failure_and_reports_row_operand() {
        let mut l = Locks::default();
        let tdr = Pfn::new(9);
        // Someone holds the SEPT tree exclusively (RANGE.BLOCK).
        l.try_acquire(
            LockKey::SeptTree(tdr),
            false,
            Mode::Exclusive,
            Side::Host,
            T1,
        )
        .unwrap();
        let mut g = Guard::new(Leaf::MemPageAug, T0);
        g.take(&mut l, LockKey::Pamt(tdr)).unwrap();
        g.take(&mut l, LockKey::OpState(tdr)).unwrap();
        let e = g.take(&mut l, LockKey::SeptTree(tdr)).unwrap_err();
        assert_eq!(e.status.raw(), 0x8000_0200_0000_0092);
        assert!(g.held().is_empty());
        assert_eq!(l.held_by(T0), vec![]);
    }
}
