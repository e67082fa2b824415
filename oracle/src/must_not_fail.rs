//! `must_not_fail`: a SEAMCALL error or KVM_BUG_ON on a path upstream declares must not fail
//! (the model records each as a fatal bug report where upstream bugs the VM), or -EIO returned
//! to userspace for a sequence upstream supports (KVM_EXIT_INTERNAL_ERROR included).

use harness::kvm::{BugReport, Errno};
use harness::scenario::VmmOp;
use harness::vmm::ThreadEnd;

/// Bug reports since index `from`: KVM_BUG_ON/TDX_BUG_ON (the VM is bugged) and WARNs (a
/// WARN_ON in KVM is a KVM bug too, even where it carries on).
pub fn bugs_since(bugs: &[BugReport], from: usize) -> Vec<&BugReport> {
    bugs.iter().skip(from).collect()
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

/// -EIO from the VMM's ioctls (other errnos are part of the ABI: -EAGAIN, -EINVAL, ...).
pub fn eio(errors: &[(VmmOp, Errno)]) -> Vec<String> {
    errors
        .iter()
        .filter(|(_, e)| *e == Errno::EIO)
        .map(|(op, e)| format!("{op:?} returned {e}"))
        .collect()
}
