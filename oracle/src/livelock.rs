//! A livelock proven by a repeated state (issue 12): when one task alone can run, spinning in
//! a kernel retry loop while every other unfinished task sleeps, and the whole state at the
//! start of one iteration equals the state at the start of an earlier one, the run repeats
//! that stretch forever. The verdict comes after a few dozen iterations instead of the
//! watchdog's 2,000, under the watchdog's own signature (it would fire in the end).
//!
//! What "the whole state" is: KVM's, the TDX module's (but for a count that only measures)
//! and host memory, each through its `Debug` form; the scheduler's objects and tasks (without
//! step numbers and iteration counts); the sleeping tasks' poll counts, so that one woken
//! and back asleep in between (its locals may have moved) spoils the match; and the value the
//! loop carries from one iteration to the next (`Ctx::retry_carrying`). The futures' other
//! locals are invisible, which is why only the iteration's start is compared: a retry loop's
//! locals there are its arguments (unchanged while it loops) and what it carries. So only
//! retries of one loop instance compare (iterations 2, 3, ... in a row: the first attempt
//! comes from the caller, a prefault's next page say), and only those whose poll ended at the
//! loop's `cond_resched` (elsewhere the state moved on after the retry). States compare by a
//! 64-bit hash, and `Debug` forms tell every model value apart (`Spte`'s included).

use std::cell::Cell;
use std::hash::Hasher;

use harness::kvm::Kvm;
use harness::sched::{Ctx, HashWriter, Point, StepInfo, TaskId};

use crate::liveness::{others_detail, soft_lockup_key};

/// Iterations of a retry loop at which the state is compared while the spin is lone and
/// uninterrupted: windows long enough to hold a period of up to `WINDOW - 1` iterations,
/// early, then later for loops that settle slowly. Fingerprints cost a `Debug` of the model,
/// so not every iteration.
const WINDOW_STARTS: [u32; 3] = [16, 160, 1000];
const WINDOW: u32 = 24;

thread_local! {
    static ENABLED: Cell<bool> = const { Cell::new(true) };
}

/// Turns the proof on (the default) or off for this thread: off, only the watchdog and the
/// step budget judge spins (for tests that compare the two).
pub fn enable(on: bool) {
    ENABLED.with(|e| e.set(on));
}

/// The watch over one run.
#[derive(Default)]
pub struct Livelock {
    /// The lone spinner, its loop and the loop's iteration count at the last step.
    spin: Option<(TaskId, &'static str, u32)>,
    /// Fingerprints of this window's iteration starts, with their iteration numbers.
    seen: Vec<(u64, u32)>,
}

impl Livelock {
    /// After each step: a proven livelock as (the loop's upstream function, signature key,
    /// detail).
    pub fn step(
        &mut self,
        cx: &Ctx,
        kvm: &Kvm,
        info: &StepInfo,
    ) -> Option<(&'static str, String, String)> {
        let t = info.task;
        let carried = cx.began_counted_iteration(t)?;
        if !ENABLED.with(Cell::get) {
            return None;
        }
        let (name, k) = cx
            .retrying()
            .into_iter()
            .find(|(r, _, _)| *r == t)
            .map(|(_, n, k)| (n, k))?;
        // Only retries of one loop instance compare: its first attempt (k = 1) comes from
        // outside the loop, with the caller's locals (the next page of a range, say), and an
        // iteration that did not count, or another task running, breaks the chain.
        let chained =
            matches!(self.spin, Some((s, l, last)) if s == t && l == name && k == last + 1);
        let lone = k >= 2 && cx.sole_runnable() == Some(t);
        if !chained || !lone {
            self.seen.clear();
        }
        self.spin = lone.then_some((t, name, k));
        self.spin?;
        let start = WINDOW_STARTS
            .iter()
            .copied()
            .find(|&s| (s..s + WINDOW).contains(&k))?;
        if k == start {
            self.seen.clear();
        }
        if !matches!(info.point, Point::Yield(p) if p.ends_with(":cond_resched")) {
            return None;
        }
        let f = fingerprint(cx, kvm, t, carried);
        if let Some(&(_, first)) = self.seen.iter().find(|(g, _)| *g == f) {
            let detail = format!(
                "livelock: {} retries {name} forever: the whole state at the start of its \
                 iteration {k} equals that at iteration {first} while no other task can run \
                 (the watchdog would report it at {} iterations){}",
                cx.task_name(t),
                crate::liveness::SOFT_LOCKUP_RETRIES,
                others_detail(cx, t)
            );
            return Some((name, soft_lockup_key(name), detail));
        }
        self.seen.push((f, k));
        None
    }
}

/// The run's state at the start of `spinner`'s iteration (see the module comment).
fn fingerprint(cx: &Ctx, kvm: &Kvm, spinner: TaskId, carried: u64) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    h.write_u64(carried);
    cx.hash_for_livelock(&mut h, spinner);
    kvm.module.state().hash_for_livelock(&mut h);
    let mut w = HashWriter(&mut h);
    let _ = std::fmt::Write::write_fmt(
        &mut w,
        format_args!("{:?}{:?}", kvm.st.borrow(), kvm.host.borrow()),
    );
    h.finish()
}
