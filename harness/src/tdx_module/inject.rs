//! Injected TDX_OPERAND_BUSY (issue 11 item 3): a scenario arms "the next call of this leaf
//! returns TDX_OPERAND_BUSY on this operand", so KVM's BUSY paths run without waiting for the
//! rare race that causes them. Only leaves KVM calls while something can really contend with
//! them are injectable, and only with an operand the leaf locks (`locks::lock_row`): a BUSY
//! the module cannot return would test nothing KVM promises.

use std::collections::{BTreeMap, BTreeSet};

use super::locks::lock_row;
use super::{Leaf, Operand, SeamErr};
use crate::sched::TaskId;

/// Leaves KVM calls at run time while a guest TDCALL, TDH.VP.ENTER or another SEAMCALL can
/// hold the same lock: the fault path's AUG and SEPT.ADD (upstream returns -EBUSY and the
/// fault is retried), the zap path's BLOCK, TRACK and REMOVE (`tdh_do_no_vcpus` kicks the
/// vCPUs and retries once) and VP.ENTER (re-entered from the fastpath).
pub const BUSY_INJECTABLE: [Leaf; 6] = [
    Leaf::MemPageAug,
    Leaf::MemSeptAdd,
    Leaf::MemRangeBlock,
    Leaf::MemTrack,
    Leaf::MemPageRemove,
    Leaf::VpEnter,
];

/// The operands `leaf` can report busy: those of the locks its handler takes, in table order.
pub fn busy_operands(leaf: Leaf) -> Vec<Operand> {
    let mut ops: Vec<Operand> = Vec::new();
    for s in lock_row(leaf) {
        if !ops.contains(&s.busy) {
            ops.push(s.busy);
        }
    }
    ops
}

/// Armed BUSY injections and what they did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BusyInjection {
    armed: BTreeMap<Leaf, Operand>,
    /// (task, leaf) whose last call ended BUSY, injected or real: its next call of the leaf
    /// is a retry and is left alone. An injection models one contention; it cannot outlast
    /// what KVM does about it (`tdh_do_no_vcpus` kicks every vCPU out before its one retry).
    last_busy: BTreeSet<(TaskId, Leaf)>,
    /// Injected BUSYs returned so far.
    pub fired: u32,
}

impl BusyInjection {
    /// Arms `leaf` (replacing an earlier arming of it).
    pub fn arm(&mut self, leaf: Leaf, operand: Operand) {
        self.armed.insert(leaf, operand);
    }

    /// At the start of `task`'s call of `leaf`: the injected BUSY, if one is armed and the
    /// call is not a retry after BUSY.
    pub fn take(&mut self, task: TaskId, leaf: Leaf) -> Option<SeamErr> {
        if self.last_busy.contains(&(task, leaf)) {
            return None;
        }
        let op = self.armed.remove(&leaf)?;
        self.fired += 1;
        Some(SeamErr::busy(op))
    }

    /// At the end of `task`'s call of `leaf`: whether it ended BUSY.
    pub fn ended(&mut self, task: TaskId, leaf: Leaf, busy: bool) {
        if busy {
            self.last_busy.insert((task, leaf));
        } else {
            self.last_busy.remove(&(task, leaf));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_injectable_leaf_has_a_busy_operand() {
        for leaf in BUSY_INJECTABLE {
            assert!(!busy_operands(leaf).is_empty(), "{leaf}");
        }
    }

    #[test]
    fn an_injection_fires_once_and_never_into_a_retry_after_busy() {
        let mut b = BusyInjection::default();
        let (t, leaf) = (TaskId(1), Leaf::MemPageRemove);
        assert_eq!(b.take(t, leaf), None, "nothing armed");
        b.ended(t, leaf, false);
        b.arm(leaf, Operand::Rcx);
        assert_eq!(b.take(t, leaf), Some(SeamErr::busy(Operand::Rcx)));
        b.ended(t, leaf, true);
        b.arm(leaf, Operand::Rcx);
        assert_eq!(b.take(t, leaf), None, "the retry after an injected BUSY");
        b.ended(t, leaf, false);
        assert_eq!(b.take(t, leaf), Some(SeamErr::busy(Operand::Rcx)));
        b.ended(t, leaf, false);
        // A real BUSY: the retry is left alone too.
        b.arm(leaf, Operand::Rcx);
        b.ended(TaskId(2), leaf, true);
        assert_eq!(b.take(TaskId(2), leaf), None, "the retry after a real BUSY");
        assert_eq!(b.take(TaskId(2), Leaf::MemTrack), None);
        assert_eq!(b.fired, 2);
    }
}
