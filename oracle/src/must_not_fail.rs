//! `must_not_fail`: a SEAMCALL error or KVM_BUG_ON on a path upstream declares must not fail
//! (the model records each as a fatal bug report where upstream bugs the VM), or -EIO returned
//! to userspace for a sequence upstream supports.

use harness::kvm::{BugReport, Errno};
use harness::scenario::VmmOp;

/// Fatal bug reports since index `from`.
pub fn bugs_since(bugs: &[BugReport], from: usize) -> Vec<&BugReport> {
    bugs.iter().skip(from).filter(|b| b.fatal).collect()
}

/// -EIO from the VMM's ioctls (other errnos are part of the ABI: -EAGAIN, -EINVAL, ...).
pub fn eio(errors: &[(VmmOp, Errno)]) -> Vec<String> {
    errors
        .iter()
        .filter(|(_, e)| *e == Errno::EIO)
        .map(|(op, e)| format!("{op:?} returned {e}"))
        .collect()
}
