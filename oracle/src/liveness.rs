//! Liveness: deadlock (a wait-for cycle, or every task asleep) and lack of progress (the step
//! budget ran out with work pending under a fair schedule).

use harness::addr::Gfn;
use harness::kvm::Kvm;
use harness::sched::{Ctx, Executor, Outcome, PointDisplay, WaitOn};
use harness::tdx_module::SeptState;

use crate::{Violation, ViolationKind};

/// Number of trace events a violation carries.
pub const RECENT: usize = 24;

/// The last RECENT trace events as timeline lines (the evidence a violation carries).
pub fn recent(ex: &Executor) -> Vec<String> {
    let names = ex.task_names();
    let objs = ex.obj_names();
    ex.trace()
        .tail(RECENT)
        .iter()
        .map(|ev| {
            format!(
                "{:>6} {:<10} {}",
                ev.step,
                names[ev.task.0 as usize],
                PointDisplay {
                    point: &ev.point,
                    obj_names: &objs
                }
            )
        })
        .collect()
}

fn wait_name(w: WaitOn, objs: &[&'static str]) -> String {
    let o = objs[w.obj().0 as usize];
    match w {
        WaitOn::Mutex(_) => format!("mutex_lock({o})"),
        WaitOn::RwRead(_) => format!("read_lock({o})"),
        WaitOn::RwWrite(_) => format!("write_lock({o})"),
        WaitOn::SrcuSync { .. } => format!("synchronize_srcu({o})"),
        WaitOn::Completion(_) => format!("wait_for_completion({o})"),
        WaitOn::Queue(_) => format!("wait_event({o})"),
    }
}

/// The model's retry loops, outermost first, by a yield point each iteration passes, with the
/// upstream function that loops.
const LOOP_HEADS: [(&str, &str); 6] = [
    ("vcpu_enter_guest", "vcpu_run"),
    (
        "kvm_vcpu_pre_fault_memory:cond_resched",
        "kvm_vcpu_pre_fault_memory",
    ),
    ("kvm_tdp_map_page:cond_resched", "kvm_tdp_map_page"),
    (
        "tdx_vcpu_init_mem_region:cond_resched",
        "tdx_vcpu_init_mem_region",
    ),
    (
        "kvm_tdp_mmu_map_private_pfn:cond_resched",
        "kvm_tdp_mmu_map_private_pfn",
    ),
    (
        "tdx_handle_ept_violation:cond_resched",
        "tdx_handle_ept_violation",
    ),
];

/// What a runnable task is looping in: the outermost retry loop whose head it passed in `tail`
/// (so one hang has one name, whichever point of the iteration the budget stopped it at), or
/// else the yield point it passed most often, without arguments.
fn loop_name(tail: &[harness::sched::TraceEvent], t: harness::sched::TaskId) -> Option<String> {
    use harness::sched::Point;
    let mut counts: std::collections::BTreeMap<&'static str, usize> =
        std::collections::BTreeMap::new();
    for ev in tail.iter().filter(|e| e.task == t) {
        if let Point::Yield(n) | Point::YieldArg(n, _) = ev.point {
            *counts.entry(n).or_default() += 1;
        }
    }
    if let Some((_, f)) = LOOP_HEADS.iter().find(|(p, _)| counts.contains_key(p)) {
        return Some(format!("loop in {f}"));
    }
    counts
        .into_iter()
        .max_by_key(|(n, c)| (*c, std::cmp::Reverse(*n)))
        .map(|(n, _)| format!("loop in {n}"))
}

/// Iterations of one kernel retry loop (`Ctx::retry`) after which the watchdog reports a
/// soft lockup, even if the loop would end later: a host thread spinning this long in the
/// kernel (a fault retried, a prefault retried) is harm whatever ends it in the end. Legitimate
/// retries (BUSY from a racing SEAMCALL, a conversion in flight) take a handful.
pub const SOFT_LOCKUP_RETRIES: u32 = 2000;

/// The soft-lockup watchdog: a task past SOFT_LOCKUP_RETRIES iterations of a retry loop, as
/// (the loop's upstream function, signature key, detail).
pub fn soft_lockup(cx: &Ctx) -> Option<(&'static str, String, String)> {
    let (t, name, n) = cx
        .retrying()
        .into_iter()
        .find(|(_, _, n)| *n > SOFT_LOCKUP_RETRIES)?;
    let detail = format!(
        "soft lockup: {} retried {n} times in {name} (the watchdog's bound is {SOFT_LOCKUP_RETRIES}){}",
        cx.task_name(t),
        others_detail(cx, t)
    );
    Some((name, soft_lockup_key(name), detail))
}

/// The signature key of a soft lockup in retry loop `name` (also of a proven livelock in it,
/// which the watchdog would report in the end).
pub fn soft_lockup_key(name: &str) -> String {
    format!("soft-lockup:loop in {name}")
}

/// The unfinished tasks other than `t`, as a no-progress report names them (often the ones
/// stuck behind a spin): "; vmm0 waits in ..." for each, or nothing.
pub fn others_detail(cx: &Ctx, t: harness::sched::TaskId) -> String {
    let objs: Vec<&'static str> = (0..)
        .map_while(|i| cx.try_obj_name(harness::sched::ObjId(i)))
        .collect();
    cx.pending()
        .into_iter()
        .filter(|(o, _, _)| *o != t)
        .map(|(o, p, w)| match w {
            Some(w) => format!("; {} waits in {}", cx.task_name(o), wait_name(w, &objs)),
            None => format!(
                "; {} last at {}",
                cx.task_name(o),
                PointDisplay {
                    point: &p,
                    obj_names: &objs
                }
            ),
        })
        .collect()
}

/// A vCPU the TDX module keeps out of the guest by design: zero-step mitigation logged a GPA
/// that is now PENDING (KVM mapped it, the guest has not accepted it), so
/// `td_entry_stepping_filter` answers every TDH.VP.ENTER with an emulated EPT violation on it;
/// KVM finds the page mapped (RET_PF_SPURIOUS) and enters again. Only the guest's ACCEPT can
/// end it, and the guest cannot run: a guest that touched a page it never accepted (or whose
/// accepted page the host removed) wedged its own vCPU. Returns the GPA's frame.
///
/// A vCPU that spins in `tdx_handle_ept_violation`'s local retry loop is not wedged, whatever
/// the module logged for it: it does not enter the TD (that hang is KVM's).
pub fn wedged_by_zero_step(kvm: &Kvm, v: usize) -> Option<Gfn> {
    let tdvpr = {
        let st = kvm.st.borrow();
        let vc = st.vcpus.get(v)?;
        if vc.ept_retrying {
            return None;
        }
        vc.tdvpr?
    };
    match kvm.module.state().epf_expected(tdvpr) {
        Some((gfn, SeptState::Pending)) => Some(gfn),
        _ => None,
    }
}

/// The vCPU a task runs, from its name (`vcpu3` -> 3; `vcpu0-idle` and VMM tasks: none).
pub fn vcpu_index(task: &str) -> Option<usize> {
    task.strip_prefix("vcpu").and_then(|n| n.parse().ok())
}

/// What a task can sleep on behind a wedged vCPU.
const BEHIND_A_VCPU: [&str; 3] = ["vcpu thread exit", "vmm thread done", "vcpu->mutex"];

/// Whether the unfinished tasks make no progress only because vCPUs are wedged by zero-step
/// mitigation (`wedged_by_zero_step`), every other one asleep behind them: waiting for a vCPU
/// thread to exit, for `vcpu->mutex` (KVM_RUN holds it; so does an ioctl under the VM-state
/// guard that waits for a wedged vCPU's), for a VMM thread that does, or for a mutex one of
/// those holds (kvm->lock, held by an ioctl waiting for a wedged vCPU's mutex). That
/// state is final (nothing left can accept the page), so a run can stop as soon as it is
/// reached. Returns the wedged vCPUs as a note.
pub fn wedged_only(cx: &Ctx, kvm: &Kvm) -> Option<String> {
    let pending = cx.pending();
    let mut wedged = Vec::new();
    // Tasks known to be wedged or asleep behind a wedge; the rest must join them.
    let mut behind: Vec<harness::sched::TaskId> = Vec::new();
    let mut rest = Vec::new();
    for &(t, _, wait) in &pending {
        let name = cx.task_name(t);
        match (vcpu_index(&name), wait) {
            // Asleep behind (a VMM thread, or a vCPU thread whose mutex a VMM ioctl holds
            // while it waits for a wedged vCPU's); a cycle would have ended the run already.
            (_, Some(w @ (WaitOn::Completion(_) | WaitOn::Mutex(_))))
                if BEHIND_A_VCPU.contains(&cx.obj_name(w.obj())) =>
            {
                behind.push(t)
            }
            (Some(v), wait) => match (wedged_by_zero_step(kvm, v), wait) {
                (Some(gfn), _) => {
                    wedged.push(format!("{name} on {gfn}"));
                    behind.push(t);
                }
                (None, Some(w)) => rest.push((t, w)),
                (None, None) => return None,
            },
            (None, Some(w)) => rest.push((t, w)),
            (None, None) => return None,
        }
    }
    // A task asleep on a mutex that a task behind the wedge holds (kvm->lock, taken by an
    // ioctl that then waits for a wedged vCPU's mutex) is behind it too.
    loop {
        let before = rest.len();
        rest.retain(|&(t, w)| {
            let holders = cx.wait_holders(w);
            let now_behind = matches!(w, WaitOn::Mutex(_))
                && !holders.is_empty()
                && holders.iter().all(|h| behind.contains(h));
            if now_behind {
                behind.push(t);
            }
            !now_behind
        });
        if rest.is_empty() || rest.len() == before {
            break;
        }
    }
    (rest.is_empty() && !wedged.is_empty()).then(|| wedged.join(", "))
}

/// Turns a scheduler outcome into a liveness violation, if it is one.
///
/// `location` names the phase's driver (e.g. the upstream function the stuck tasks run).
pub fn check_outcome(
    outcome: &Outcome,
    ex: &Executor,
    location: &'static str,
) -> Option<Violation> {
    check_outcome_tolerating(outcome, ex, location, &|_| false)
}

/// `check_outcome` where tasks that `tolerated` names spin by design (a vCPU wedged by
/// zero-step mitigation): they stay in the detail but not in a no-progress signature, so a
/// hang beside them has the signature it has alone.
pub fn check_outcome_tolerating(
    outcome: &Outcome,
    ex: &Executor,
    location: &'static str,
    tolerated: &dyn Fn(&str) -> bool,
) -> Option<Violation> {
    let names = ex.task_names();
    let objs = ex.obj_names();
    match outcome {
        Outcome::AllDone | Outcome::Stopped => None,
        Outcome::Deadlock(rep) => {
            let (edges, key) = if rep.cycle.is_empty() {
                let waits: Vec<String> = rep
                    .blocked
                    .iter()
                    .map(|(_, w)| wait_name(*w, &objs))
                    .collect();
                let mut key = waits.clone();
                key.sort();
                (waits, format!("all-asleep:{}", key.join("+")))
            } else {
                let waits: Vec<String> = rep
                    .cycle
                    .iter()
                    .map(|(_, w)| wait_name(*w, &objs))
                    .collect();
                // Rotation-independent key: the sorted set of waits in the cycle.
                let mut key = waits.clone();
                key.sort();
                (waits, format!("deadlock:{}", key.join("+")))
            };
            let involved = if rep.cycle.is_empty() {
                &rep.blocked
            } else {
                &rep.cycle
            };
            let tasks: Vec<String> = involved
                .iter()
                .map(|(t, _)| names[t.0 as usize].clone())
                .collect();
            let detail = tasks
                .iter()
                .zip(&edges)
                .map(|(t, w)| format!("{t} waits in {w}"))
                .collect::<Vec<_>>()
                .join("; ");
            Some(Violation {
                kind: ViolationKind::Liveness,
                location,
                key,
                detail: format!("deadlock: {detail}"),
                step: ex.steps(),
                tasks,
                recent: recent(ex),
            })
        }
        Outcome::BudgetExhausted(rep) => {
            let tail = ex.trace().tail(RECENT * 8);
            let points: Vec<String> = rep
                .pending
                .iter()
                .map(|(t, p, w)| match w {
                    Some(w) => wait_name(*w, &objs),
                    None => loop_name(&tail, *t).unwrap_or_else(|| {
                        PointDisplay {
                            point: p,
                            obj_names: &objs,
                        }
                        .to_string()
                    }),
                })
                .collect();
            // The signature names the loops that burn steps; tasks asleep behind them are
            // consequences (in the detail, not the key), unless nothing spins at all.
            let mut key_points: Vec<String> = rep
                .pending
                .iter()
                .zip(&points)
                .filter(|((t, _, w), _)| w.is_none() && !tolerated(&names[t.0 as usize]))
                .map(|(_, p)| p.clone())
                .collect();
            if key_points.is_empty() {
                key_points = points.clone();
            }
            let tasks: Vec<String> = rep
                .pending
                .iter()
                .map(|(t, _, _)| names[t.0 as usize].clone())
                .collect();
            let detail = tasks
                .iter()
                .zip(&points)
                .map(|(t, p)| format!("{t} last at {p}"))
                .collect::<Vec<_>>()
                .join("; ");
            key_points.sort();
            key_points.dedup();
            if !rep.cycle.is_empty() {
                // Some tasks spin instead of sleeping, but they wait on each other in a cycle.
                let mut waits: Vec<String> = rep
                    .cycle
                    .iter()
                    .map(|(_, w)| wait_name(*w, &objs))
                    .collect();
                let shown = rep
                    .cycle
                    .iter()
                    .map(|(t, w)| {
                        format!("{} waits in {}", names[t.0 as usize], wait_name(*w, &objs))
                    })
                    .collect::<Vec<_>>()
                    .join("; ");
                waits.sort();
                return Some(Violation {
                    kind: ViolationKind::Liveness,
                    location,
                    key: format!("deadlock:{}", waits.join("+")),
                    detail: format!("deadlock (spin-wait cycle): {shown}"),
                    step: rep.steps,
                    tasks: rep
                        .cycle
                        .iter()
                        .map(|(t, _)| names[t.0 as usize].clone())
                        .collect(),
                    recent: recent(ex),
                });
            }
            Some(Violation {
                kind: ViolationKind::Liveness,
                location,
                key: format!("no-progress:{}", key_points.join("+")),
                detail: format!("no progress after {} steps: {detail}", rep.steps),
                step: rep.steps,
                tasks,
                recent: recent(ex),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use harness::sched::workload::LockProgram;
    use harness::sched::{RoundRobin, Script, TraceMode};

    #[test]
    fn deadlock_becomes_liveness_with_stable_signature() {
        // t0: mutex_a then mutex_b; t1: mutex_b then mutex_a (second byte picks the task).
        let p = LockProgram::decode(&[1, 0x01, 0x41 | 0x08, 0x09, 0x41]);
        let mut sigs = Vec::new();
        for first in [0, 1] {
            let mut ex = Executor::new(TraceMode::Ring(64));
            p.spawn(&mut ex, 1);
            let mut s = Script::new(vec![
                harness::sched::Directive {
                    task: harness::sched::TaskId(first),
                    until: harness::sched::Until::Steps(2),
                },
                harness::sched::Directive {
                    task: harness::sched::TaskId(1 - first),
                    until: harness::sched::Until::Steps(2),
                },
            ]);
            let out = ex.run(&mut s, 1000, &mut |_| true);
            let v = check_outcome(&out, &ex, "lock_program").expect("deadlock");
            assert_eq!(v.kind, ViolationKind::Liveness);
            assert!(!v.recent.is_empty());
            sigs.push(v.signature());
        }
        assert_eq!(
            sigs[0], sigs[1],
            "signature independent of which task started"
        );
        assert!(
            sigs[0].contains("deadlock:mutex_lock(mutex_a)+mutex_lock(mutex_b)"),
            "{}",
            sigs[0]
        );
    }

    #[test]
    fn clean_run_is_silent() {
        let p = LockProgram::decode(&[1, 0x01, 0x07, 0x41, 0x47]);
        let mut ex = Executor::new(TraceMode::Ring(8));
        p.spawn(&mut ex, 3);
        let out = ex.run(&mut RoundRobin::new(), 10_000, &mut |_| true);
        assert_eq!(check_outcome(&out, &ex, "lock_program"), None);
    }
}
