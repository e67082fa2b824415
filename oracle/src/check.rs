//! Running a scenario under the oracle: cheap checks after every step (new fatal bug reports,
//! refused host-page moves, state transitions), full checks at the end (mirror vs S-EPT,
//! PAMT vs ledger, guest memory, liveness, teardown accounting). The first violation wins.

use std::cell::RefCell;
use std::rc::Rc;

use harness::run::{prepare, Run, RunConfig};
use harness::scenario::Scenario;
use harness::sched::Outcome;
use harness::vmm::ThreadEnd;

use crate::{Violation, ViolationKind};

/// Steps between checks for vCPUs wedged by zero-step mitigation (`liveness::wedged_only`).
const WEDGE_CHECK_EVERY: u64 = 2048;

/// Steps between looks at the retry loops (`liveness::soft_lockup`).
const RETRY_CHECK_EVERY: u64 = 64;

/// What a per-step check found: kind, location, signature key, detail.
type Found = (ViolationKind, &'static str, String, String);

/// A checked run.
pub struct Report {
    pub violation: Option<Violation>,
    /// vCPUs a clean run left wedged by zero-step mitigation on a page the guest never
    /// accepted (`liveness::wedged_by_zero_step`): TDX module behaviour, not a violation.
    pub wedged: Option<String>,
    pub run: Run,
}

/// Replaces numbers (addresses, steps, raw statuses) so a signature names a kind of failure,
/// not one input's values.
pub fn stable(s: &str) -> String {
    s.split(' ')
        .map(|w| {
            let named = ["TDX_", "TDH.", "TDG.", "vcpu", "-E"]
                .iter()
                .any(|p| w.starts_with(p));
            if w.chars().any(|c| c.is_ascii_digit()) && !named {
                "*"
            } else {
                w
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn recent(run: &Run) -> Vec<String> {
    crate::liveness::recent(&run.stack.ex)
}

fn violation(
    kind: ViolationKind,
    location: &'static str,
    key: String,
    detail: String,
    run: &Run,
) -> Violation {
    Violation {
        kind,
        location,
        key,
        detail,
        step: run.stack.ex.steps(),
        // The task that made the last step: the one that tripped a per-step check.
        tasks: run
            .stack
            .ex
            .trace()
            .tail(1)
            .iter()
            .map(|ev| run.stack.ex.task_names()[ev.task.0 as usize].clone())
            .collect(),
        recent: recent(run),
    }
}

/// Runs `sc` with the oracle watching.
pub fn run_scenario(sc: &Scenario, cfg: &RunConfig) -> Report {
    let mut run = prepare(sc, cfg);
    // Per-step checks see the model through its shared handles.
    let kvm = run.stack.kvm.clone();
    let host = run.stack.host.clone();
    let destroyed = run.destroyed.clone();
    let found: Rc<RefCell<Option<Found>>> = Rc::default();
    let (mut bugs_seen, mut refused_seen) =
        (kvm.st.borrow().bugs.len(), host.borrow().refused.len());
    let mut seen = crate::state_machine::Seen::default();
    let mut livelock = crate::livelock::Livelock::default();
    let f = found.clone();
    let cx = run.stack.cx.clone();
    let mut observer = |info: &harness::sched::StepInfo| -> bool {
        // A run whose vCPUs zero-step mitigation has wedged for good stops here rather than
        // burning its whole budget (checked now and then: it is final once reached).
        if info.step.is_multiple_of(WEDGE_CHECK_EVERY)
            && crate::liveness::wedged_only(&cx, &kvm).is_some()
        {
            return false;
        }
        if info.step.is_multiple_of(RETRY_CHECK_EVERY) {
            if let Some((loop_fn, key, detail)) = crate::liveness::soft_lockup(&cx) {
                *f.borrow_mut() = Some((ViolationKind::Liveness, loop_fn, key, detail));
                return false;
            }
        }
        let st = kvm.st.borrow();
        if let Some(b) = crate::must_not_fail::bugs_since(&st.bugs, bugs_seen).first() {
            *f.borrow_mut() = Some((
                ViolationKind::MustNotFail,
                b.location,
                stable(&b.what),
                format!("{}: {}", b.location, b.what),
            ));
            return false;
        }
        bugs_seen = st.bugs.len();
        drop(st);
        let h = host.borrow();
        // The page a failed zap abandoned may go back to the host once the VM is bugged.
        let refused: Vec<_> = if h.refused.len() > refused_seen {
            let tolerated = crate::aftermath::Tolerated::of(&kvm);
            h.refused[refused_seen..]
                .iter()
                .filter(|(_, e)| !tolerated.page(e.pfn()))
                .collect()
        } else {
            Vec::new()
        };
        if let Some((step, e)) = refused.first() {
            let r = format!("host refused at step {step}: {e}");
            let key = e.to_string();
            *f.borrow_mut() = Some((
                ViolationKind::PageOwnership,
                "host page ledger",
                stable(&key),
                r,
            ));
            return false;
        }
        refused_seen = h.refused.len();
        drop(h);
        if let Some(b) = crate::state_machine::check(&kvm, &mut seen, destroyed.get()).first() {
            *f.borrow_mut() = Some((
                ViolationKind::StateMachine,
                "state transition",
                stable(b),
                b.clone(),
            ));
            return false;
        }
        // Last: a spin whose state repeats is a soft lockup now rather than 2,000 iterations on.
        if let Some((loop_fn, key, detail)) = livelock.step(&cx, &kvm, info) {
            *f.borrow_mut() = Some((ViolationKind::Liveness, loop_fn, key, detail));
            return false;
        }
        true
    };
    run.execute(&mut observer);
    let soft_lockup = matches!(&*found.borrow(), Some((ViolationKind::Liveness, ..)));
    if soft_lockup {
        // A spin often follows from a desync (retrying on a table that is not there): the
        // desync is the cause, as at the end of a run that hangs.
        if let Some(v) = desync(&run, false) {
            return Report {
                violation: Some(v),
                wedged: None,
                run,
            };
        }
    }
    if let Some((kind, loc, key, detail)) = found.borrow_mut().take() {
        let v = violation(kind, loc, key, detail, &run);
        return Report {
            violation: Some(v),
            wedged: None,
            run,
        };
    }
    let wedged = match &run.outcome {
        Outcome::AllDone => None,
        _ => crate::liveness::wedged_only(&run.stack.cx, &run.stack.kvm),
    };
    let v = end_checks(&run, wedged.is_some());
    Report {
        violation: v,
        wedged,
        run,
    }
}

/// Mirror SPTEs vs the S-EPT (frozen SPTEs count only when `quiescent`).
fn desync(run: &Run, quiescent: bool) -> Option<Violation> {
    // A table KVM touched after freeing it: on hardware a stale read or a write into a page
    // the allocator may have handed out again, whatever the VM's state.
    let uaf = run.stack.kvm.st.borrow().mmu.use_after_free();
    if let Some((sp, what)) = uaf {
        let msg = format!("KVM {what} shadow page {} after freeing it", sp.0);
        return Some(violation(
            ViolationKind::MirrorDesync,
            "tdp_mmu use after free",
            stable(&msg),
            msg,
            run,
        ));
    }
    if run.destroyed.get() {
        // The mirror roots are gone with the VM; an S-EPT a leaked HKID kept alive is judged
        // by the page accounting (its pages must be leaked on purpose), not against them.
        return None;
    }
    let kvm = &run.stack.kvm;
    let bad = crate::aftermath::Tolerated::of(kvm).filter(crate::sept_sync::check(kvm, quiescent));
    let b = bad.first()?;
    let location = if kvm.policy.sept_off_to_side {
        "sept_side vs S-EPT"
    } else {
        "tdp_mmu vs S-EPT"
    };
    Some(violation(
        ViolationKind::MirrorDesync,
        location,
        stable(b),
        b.clone(),
        run,
    ))
}

fn end_checks(run: &Run, wedged: bool) -> Option<Violation> {
    let kvm = &run.stack.kvm;
    // A desync is the cause when a run also hangs (e.g. retrying on a table that is not there),
    // so it is checked first; frozen SPTEs count only when nothing is in flight.
    let quiescent = run.outcome == Outcome::AllDone;
    if let Some(v) = desync(run, quiescent) {
        return Some(v);
    }
    if !wedged {
        let wedged_vcpu = |name: &str| {
            crate::liveness::vcpu_index(name)
                .is_some_and(|v| crate::liveness::wedged_by_zero_step(kvm, v).is_some())
        };
        if let Some(v) = crate::liveness::check_outcome_tolerating(
            &run.outcome,
            &run.stack.ex,
            "scenario run",
            &wedged_vcpu,
        ) {
            return Some(v);
        }
    }
    let tolerated = crate::aftermath::Tolerated::of(kvm);
    let ends: Vec<_> = run
        .thread_ends
        .iter()
        .map(|e| e.get())
        .filter(|e| !matches!(e, Some(ThreadEnd::InternalError(s)) if tolerated.entry_failure(*s)))
        .collect();
    if let Some(e) = crate::must_not_fail::internal_errors(&ends).first() {
        return Some(violation(
            ViolationKind::MustNotFail,
            "tdx_handle_exit",
            stable(e),
            e.clone(),
            run,
        ));
    }
    // A VM the guest killed through upstream's chosen path (touching a page it never accepted
    // with SEPT_VE_DISABLE), or KVM bugged answering an injected SEAMCALL failure, answers
    // every later ioctl with -EIO, as it must.
    let errs = if kvm.st.borrow().killed_by_guest || tolerated.bugged {
        Vec::new()
    } else {
        crate::must_not_fail::eio(&run.vmm_errors.borrow())
    };
    if let Some(e) = errs.first() {
        return Some(violation(
            ViolationKind::MustNotFail,
            "VMM ioctl",
            stable(e),
            e.clone(),
            run,
        ));
    }
    if let Some((op, r)) = run.dead_vm_answers.borrow().first() {
        let what = match r {
            Ok(()) => "success".to_string(),
            Err(e) => e.to_string(),
        };
        let d = format!("the dead VM answered {op:?} with {what}, not -EIO");
        return Some(violation(
            ViolationKind::StateMachine,
            "kvm_vm_ioctl",
            stable(&d),
            d,
            run,
        ));
    }
    let mut bad = crate::ownership::check(
        &kvm.module.state(),
        &run.stack.host.borrow(),
        run.destroyed.get(),
    );
    // A live VM at rest: every page held by something live (after teardown, the accounting
    // above already wants every page free or deliberately leaked).
    if quiescent && !run.destroyed.get() {
        bad.extend(crate::ownership::unreachable(kvm, &run.stack.host.borrow()));
    }
    let bad = tolerated.filter(bad);
    if let Some(b) = bad.first() {
        return Some(violation(
            ViolationKind::PageOwnership,
            "host page ledger",
            stable(b),
            b.clone(),
            run,
        ));
    }
    let bad = crate::guest_memory::check(kvm);
    if let Some(b) = bad.first() {
        return Some(violation(
            ViolationKind::GuestMemory,
            "guest access",
            stable(b),
            b.clone(),
            run,
        ));
    }
    None
}
