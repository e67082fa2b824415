//! `must_not_fail`: a SEAMCALL error or KVM_BUG_ON on a path upstream declares must not fail
//! (the model records each as a fatal bug report where upstream bugs the VM), or -EIO returned
//! to userspace for a sequence upstream supports (KVM_EXIT_INTERNAL_ERROR included).

use harness::kvm::{BugReport, Errno, TdState};
use harness::run::VmmError;
use harness::scenario::VmmOp;
use harness::vmm::ThreadEnd;

/// Bug reports since index `from`: KVM_BUG_ON/TDX_BUG_ON (the VM is bugged) and WARNs (a
/// WARN_ON in KVM is a KVM bug too, even where it carries on). KVM's answer to an injected
/// SEAMCALL failure is not one: the oracle judges what it leaves behind instead.
pub fn bugs_since(bugs: &[BugReport], from: usize) -> Vec<&BugReport> {
    bugs.iter()
        .skip(from)
        .filter(|b| b.injected.is_none())
        .collect()
}

/// Whether the VM was bugged by KVM's answer to an injected SEAMCALL failure.
pub fn bugged_by_injection(bugs: &[BugReport]) -> bool {
    bugs.iter().any(|b| b.fatal && b.injected.is_some())
}

/// vCPU threads that stopped on KVM_EXIT_INTERNAL_ERROR (an exit KVM could not handle).
pub fn internal_errors(ends: &[Option<ThreadEnd>]) -> Vec<String> {
    ends.iter()
        .enumerate()
        .filter_map(|(v, e)| match e {
            Some(ThreadEnd::InternalError(status)) => Some(format!(
                "vcpu{v}: KVM_EXIT_INTERNAL_ERROR, TDH.VP.ENTER {status}"
            )),
            _ => None,
        })
        .collect()
}

/// -EIO that upstream returns for a call at the wrong time, not because it bugged the VM:
/// (op, a TD state that explains it, the upstream line). The state is tested as the call
/// found it and as it left it (another thread may have finalized in between).
type DocumentedEio = (fn(VmmOp) -> bool, fn(TdState) -> bool, &'static str);

const DOCUMENTED_EIO: &[DocumentedEio] = &[(
    |op| op == VmmOp::CreateVcpu,
    |s| s != TdState::Initialized,
    "tdx_vcpu_create: kvm_tdx->state != TD_STATE_INITIALIZED -> -EIO",
)];

/// Whether upstream answers `e` with -EIO by design (`DOCUMENTED_EIO`).
pub fn documented_eio(e: &VmmError) -> bool {
    e.errno == Errno::EIO
        && DOCUMENTED_EIO
            .iter()
            .any(|(op, state, _)| op(e.op) && (state(e.td_state) || state(e.td_state_after)))
}

/// -EIO from the VMM's ioctls where upstream does not document it for the call (other
/// errnos are part of the ABI: -EAGAIN, -EINVAL, ...).
pub fn eio(errors: &[VmmError]) -> Vec<String> {
    errors
        .iter()
        .filter(|e| e.errno == Errno::EIO && !documented_eio(e))
        .map(|e| format!("{:?} returned {}", e.op, e.errno))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(fatal: bool) -> BugReport {
        BugReport {
            step: 1,
            location: "kvm_mmu_memory_cache_alloc",
            what: "empty cache".into(),
            fatal,
            injected: None,
        }
    }

    #[test]
    fn warns_and_bugs_both_count_after_the_mark() {
        let bugs = vec![report(true), report(false), report(true)];
        assert_eq!(bugs_since(&bugs, 0).len(), 3);
        assert_eq!(bugs_since(&bugs, 1).len(), 2);
        assert!(!bugs_since(&bugs, 1)[0].fatal, "a WARN is reported too");
        assert!(bugs_since(&bugs, 3).is_empty());
    }

    #[test]
    fn only_undocumented_eio_and_internal_errors_count() {
        let e = |op, errno, td_state| VmmError {
            op,
            errno,
            td_state,
            td_state_after: td_state,
        };
        let errs = vec![
            e(VmmOp::ZapAllFast, Errno::EAGAIN, TdState::Runnable),
            e(VmmOp::ZapAllFast, Errno::EIO, TdState::Runnable),
            // KVM_CREATE_VCPU after KVM_TDX_FINALIZE_VM: -EIO by design.
            e(VmmOp::CreateVcpu, Errno::EIO, TdState::Runnable),
            e(VmmOp::CreateVcpu, Errno::EIO, TdState::Initialized),
        ];
        assert_eq!(eio(&errs).len(), 2, "{:?}", eio(&errs));
        // Finalized by another thread while KVM_CREATE_VCPU ran.
        let raced = VmmError {
            td_state_after: TdState::Runnable,
            ..e(VmmOp::CreateVcpu, Errno::EIO, TdState::Initialized)
        };
        assert!(documented_eio(&raced));
        assert!(internal_errors(&[None, Some(ThreadEnd::Error(Errno::ENOMEM))]).is_empty());
    }
}
