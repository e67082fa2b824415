//! `state_machine`: TD and vCPU states only move the way the TDX module and KVM allow: the TD
//! life cycle and op state never go back, KVM's TD state only forward, and a vCPU the module
//! considers running is in guest mode on KVM's side.

use harness::kvm::{GuestMode, Kvm, TdState};
use harness::tdx_module::{Lifecycle, OpState, VcpuState};

/// States seen at the previous check.
#[derive(Clone, Debug, Default)]
pub struct Seen {
    /// The TD the states below are of: a failed KVM_TDX_INIT_VM tears its TD down and a retry
    /// creates another, whose states start afresh.
    tdr: Option<harness::addr::Pfn>,
    lifecycle: Option<Lifecycle>,
    op_state: Option<OpState>,
    kvm: Option<TdState>,
}

fn rank_kvm(s: TdState) -> u8 {
    match s {
        TdState::Uninitialized => 0,
        TdState::Initialized => 1,
        TdState::Runnable => 2,
    }
}

/// Checks the current states against the previous ones (cheap: run after every step).
pub fn check(kvm: &Kvm, seen: &mut Seen, destroyed: bool) -> Vec<String> {
    let mut bad = Vec::new();
    let st = kvm.st.borrow();
    let m = kvm.module.state();
    if seen.tdr != st.tdx.tdr {
        seen.tdr = st.tdx.tdr;
        seen.lifecycle = None;
        seen.op_state = None;
    }
    if let Some(td) = st.tdx.tdr.and_then(|t| m.tds.get(&t)) {
        if let Some(prev) = seen.lifecycle {
            if td.lifecycle < prev {
                bad.push(format!(
                    "TD life cycle went back: {prev:?} -> {:?}",
                    td.lifecycle
                ));
            }
        }
        if let Some(prev) = seen.op_state {
            if td.op_state < prev {
                bad.push(format!(
                    "TD op state went back: {prev:?} -> {:?}",
                    td.op_state
                ));
            }
        }
        seen.lifecycle = Some(td.lifecycle);
        seen.op_state = Some(td.op_state);
    }
    if let Some(prev) = seen.kvm {
        if rank_kvm(st.tdx.state) < rank_kvm(prev) && !destroyed {
            bad.push(format!(
                "KVM TD state went back: {prev:?} -> {:?}",
                st.tdx.state
            ));
        }
    }
    seen.kvm = Some(st.tdx.state);
    // Once every vCPU has left guest mode with KVM_REQ_VM_DEAD pending, none may enter again.
    if let (Some(&(step, v)), Some(dead)) = (st.entered_after_dead.first(), st.dead_since) {
        bad.push(format!(
            "vCPU {v} entered the TD at step {step}, after the VM died at step {dead}"
        ));
    }
    // An ioctl that began on a dead VM must be turned away before it reaches the module.
    if let Some(&(step, _, leaf)) = m.after_dead.calls.first() {
        bad.push(format!(
            "{leaf} at step {step} from an ioctl that began after the VM died"
        ));
    }
    for v in &st.vcpus {
        let Some(tdvpr) = v.tdvpr else { continue };
        let running = m
            .vcpus
            .get(&tdvpr)
            .is_some_and(|mv| mv.state == VcpuState::Active);
        if running && v.mode == GuestMode::OutsideGuest {
            bad.push(format!(
                "{} runs in the TD while KVM has it outside guest mode",
                v.idx
            ));
        }
    }
    bad
}
