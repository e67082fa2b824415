//! Injected SEAMCALL failures (issue 11 item 3): a scenario arms "the next call of this leaf
//! returns TDX_OPERAND_BUSY on this operand" (`inject_busy`) or "... returns this error"
//! (`inject_error`), so KVM's BUSY and error paths run without waiting for the rare race or the
//! module bug that causes them. BUSY goes only to leaves KVM calls while something can really
//! contend with them, on an operand the leaf locks (`locks::lock_row`); an error only to a leaf
//! KVM calls, with a status that leaf's handler returns in the module source (`ERROR_INJECTABLE`).
//! A status the module cannot return would test nothing KVM promises.

use std::collections::{BTreeMap, BTreeSet};

use super::locks::lock_row;
use super::{Code, Leaf, Operand, SeamErr, Status};
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

/// Leaves KVM calls, each with a non-BUSY status its handler returns in intel/tdx-module
/// (`tdh_*.c`) when the module's state is not what KVM believes it is: the answers of a module
/// (or a KVM) with a bug. Upstream's reaction is KVM_BUG_ON / TDX_BUG_ON for most, a WARN and a
/// leaked page for RECLAIM, KVM_EXIT_INTERNAL_ERROR for VP.ENTER.
pub const ERROR_INJECTABLE: [(Leaf, Code); 20] = [
    (Leaf::MngKeyConfig, Code::KeyConfigured),
    (Leaf::MngAddcx, Code::TdcxNumIncorrect),
    (Leaf::MngInit, Code::OperandInvalid),
    (Leaf::VpCreate, Code::OpStateIncorrect),
    (Leaf::VpAddcx, Code::TdcxNumIncorrect),
    (Leaf::VpInit, Code::VcpuStateIncorrect),
    (Leaf::MemPageAdd, Code::EptWalkFailed),
    (Leaf::MrExtend, Code::EptEntryNotPresent),
    (Leaf::MrFinalize, Code::OpStateIncorrect),
    (Leaf::VpEnter, Code::TdFatal),
    (Leaf::MemSeptAdd, Code::EptEntryStateIncorrect),
    (Leaf::MemPageAug, Code::EptEntryStateIncorrect),
    (Leaf::MemRangeBlock, Code::GpaRangeAlreadyBlocked),
    (Leaf::MemTrack, Code::OpStateIncorrect),
    (Leaf::MemPageRemove, Code::GpaRangeNotBlocked),
    (Leaf::PhymemPageWbinvd, Code::PageMetadataIncorrect),
    (Leaf::VpFlush, Code::TdKeysNotConfigured),
    (Leaf::MngVpflushdone, Code::FlushvpNotDone),
    (Leaf::MngKeyFreeid, Code::WbcacheNotComplete),
    (Leaf::PhymemPageReclaim, Code::PageMetadataIncorrect),
];

/// The status `inject_error` makes `leaf` return, if it is injectable.
pub fn injected_error(leaf: Leaf) -> Option<Code> {
    ERROR_INJECTABLE
        .iter()
        .find(|(l, _)| *l == leaf)
        .map(|&(_, c)| c)
}

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

/// An injected non-BUSY failure, as it was returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InjectedFailure {
    pub step: u64,
    pub task: TaskId,
    pub leaf: Leaf,
    pub status: Status,
}

/// Armed SEAMCALL injections and what they did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CallInjection {
    armed: BTreeMap<Leaf, SeamErr>,
    /// (task, leaf) whose last call ended BUSY, injected or real: its next call of the leaf
    /// is a retry and is left alone. An injection models one contention; it cannot outlast
    /// what KVM does about it (`tdh_do_no_vcpus` kicks every vCPU out before its one retry).
    last_busy: BTreeSet<(TaskId, Leaf)>,
    /// Injections returned so far, BUSY or not.
    pub fired: u32,
    /// Injected non-BUSY failures, in order.
    pub failures: Vec<InjectedFailure>,
    /// Tasks whose last SEAMCALL was an injected failure: what KVM reports next is its answer
    /// to that failure (`Kvm::bug` marks such reports as injected).
    last_failed: BTreeMap<TaskId, Leaf>,
}

impl CallInjection {
    /// Arms a BUSY on `operand` at `leaf`'s next call (replacing an earlier arming of it).
    pub fn arm(&mut self, leaf: Leaf, operand: Operand) {
        self.armed.insert(leaf, SeamErr::busy(operand));
    }

    /// Arms `leaf`'s `ERROR_INJECTABLE` status at its next call; false if the leaf has none.
    pub fn arm_error(&mut self, leaf: Leaf) -> bool {
        let Some(code) = injected_error(leaf) else {
            return false;
        };
        self.armed.insert(leaf, SeamErr::code(code));
        true
    }

    /// At the start of `task`'s call of `leaf`: the armed failure, unless it is a BUSY and
    /// the call is a retry after BUSY.
    pub fn take(&mut self, task: TaskId, leaf: Leaf) -> Option<SeamErr> {
        let busy = self.armed.get(&leaf)?.status.is_operand_busy();
        if busy && self.last_busy.contains(&(task, leaf)) {
            return None;
        }
        self.fired += 1;
        self.armed.remove(&leaf)
    }

    /// At the end of `task`'s call of `leaf` at `step`: its status, and whether it was injected.
    pub fn ended(&mut self, step: u64, task: TaskId, leaf: Leaf, status: Status, injected: bool) {
        if status.is_operand_busy() {
            self.last_busy.insert((task, leaf));
        } else {
            self.last_busy.remove(&(task, leaf));
        }
        // Any status but success is a failure to KVM (TDX_KEY_CONFIGURED is not an error class).
        if injected && status != Status::SUCCESS && !status.is_operand_busy() {
            self.failures.push(InjectedFailure {
                step,
                task,
                leaf,
                status,
            });
            self.last_failed.insert(task, leaf);
        } else {
            self.last_failed.remove(&task);
        }
    }

    /// The injected failure a KVM report by `task` answers: the task's last SEAMCALL failed
    /// by injection, or an earlier injected failure left state behind that later calls trip
    /// over (a page left in the S-EPT keeps the TDR from being reclaimed, ...). A failed
    /// TDH.VP.ENTER leaves nothing behind: only its own exit answers it.
    pub fn answering(&self, task: TaskId) -> Option<Leaf> {
        self.last_failed.get(&task).copied().or_else(|| {
            self.failures
                .iter()
                .find(|f| f.leaf != Leaf::VpEnter)
                .map(|f| f.leaf)
        })
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
        let mut b = CallInjection::default();
        let (t, leaf) = (TaskId(1), Leaf::MemPageRemove);
        let busy = SeamErr::busy(Operand::Rcx).status;
        let ok = Status::SUCCESS;
        assert_eq!(b.take(t, leaf), None, "nothing armed");
        b.ended(0, t, leaf, ok, false);
        b.arm(leaf, Operand::Rcx);
        assert_eq!(b.take(t, leaf), Some(SeamErr::busy(Operand::Rcx)));
        b.ended(1, t, leaf, busy, true);
        b.arm(leaf, Operand::Rcx);
        assert_eq!(b.take(t, leaf), None, "the retry after an injected BUSY");
        b.ended(2, t, leaf, ok, false);
        assert_eq!(b.take(t, leaf), Some(SeamErr::busy(Operand::Rcx)));
        b.ended(3, t, leaf, ok, false);
        // A real BUSY: the retry is left alone too.
        b.arm(leaf, Operand::Rcx);
        b.ended(4, TaskId(2), leaf, busy, false);
        assert_eq!(b.take(TaskId(2), leaf), None, "the retry after a real BUSY");
        assert_eq!(b.take(TaskId(2), Leaf::MemTrack), None);
        assert_eq!(b.fired, 2);
        assert!(b.failures.is_empty(), "a BUSY is not a failure");
    }

    #[test]
    fn an_injected_error_is_logged_and_answered_by_the_task_that_got_it() {
        let mut b = CallInjection::default();
        let (t, leaf) = (TaskId(3), Leaf::MemPageRemove);
        assert!(
            !b.arm_error(Leaf::MemRangeUnblock),
            "KVM never calls UNBLOCK"
        );
        assert!(b.arm_error(leaf));
        // An error is injected even into a retry after BUSY.
        b.ended(0, t, leaf, SeamErr::busy(Operand::Rcx).status, false);
        let e = b.take(t, leaf).expect("armed");
        assert_eq!(e.status, Status::new(Code::GpaRangeNotBlocked));
        b.ended(5, t, leaf, e.status, true);
        assert_eq!(b.answering(t), Some(leaf));
        assert_eq!(b.failures.len(), 1);
        assert_eq!(b.failures[0].step, 5);
        // What the failure left behind is answered by any later report.
        b.ended(6, t, Leaf::MemTrack, Status::SUCCESS, false);
        assert_eq!(b.answering(TaskId(4)), Some(leaf));
        // A failed VP.ENTER is answered only by its own task's next report.
        let mut b = CallInjection::default();
        assert!(b.arm_error(Leaf::VpEnter));
        let e = b.take(t, Leaf::VpEnter).expect("armed");
        b.ended(7, t, Leaf::VpEnter, e.status, true);
        assert_eq!(b.answering(t), Some(Leaf::VpEnter));
        assert_eq!(b.answering(TaskId(4)), None);
        b.ended(8, t, Leaf::VpEnter, Status::SUCCESS, false);
        assert_eq!(b.answering(t), None, "the next entry succeeded");
    }

    #[test]
    fn every_error_row_is_a_distinct_leaf_and_a_non_busy_error() {
        let mut seen = BTreeSet::new();
        for (leaf, code) in ERROR_INJECTABLE {
            assert!(seen.insert(leaf), "{leaf} twice");
            let s = Status::new(code);
            assert!(
                s != Status::SUCCESS && !s.is_operand_busy(),
                "{leaf}: {code:?}"
            );
        }
    }
}
