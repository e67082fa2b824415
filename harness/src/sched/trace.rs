//! The run's trace: one event per yield point, block and note, in step order.
//!
//! The trace is what makes a run reproducible evidence: identical input gives an identical
//! event list (and so an identical FNV-1a hash, which tests compare cheaply).

use std::collections::VecDeque;
use std::fmt;

use super::{ObjId, TaskId};

/// What a lock-like primitive is doing at a yield point.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LockOp {
    Lock,
    Unlock,
    ReadLock,
    ReadUnlock,
    WriteLock,
    WriteUnlock,
    SrcuReadLock,
    SrcuReadUnlock,
    Synchronize,
    WaitForCompletion,
    Complete,
    Wait,
    Wake,
}

impl LockOp {
    /// Kernel-style verb, as printed in timelines.
    pub const fn name(self) -> &'static str {
        match self {
            LockOp::Lock => "lock",
            LockOp::Unlock => "unlock",
            LockOp::ReadLock => "read_lock",
            LockOp::ReadUnlock => "read_unlock",
            LockOp::WriteLock => "write_lock",
            LockOp::WriteUnlock => "write_unlock",
            LockOp::SrcuReadLock => "srcu_read_lock",
            LockOp::SrcuReadUnlock => "srcu_read_unlock",
            LockOp::Synchronize => "synchronize_srcu",
            LockOp::WaitForCompletion => "wait_for_completion",
            LockOp::Complete => "complete",
            LockOp::Wait => "wait_event",
            LockOp::Wake => "wake_up",
        }
    }
}

/// A named place in the model where the kernel could be preempted or race, or a note about
/// what happened there. `Yield` and `Lock` points are scheduling decisions; `Blocked` records a
/// task going to sleep; `Note` is an annotation (e.g. a SEAMCALL's status) that costs no step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Point {
    /// A yield point named at its call site (e.g. `"tdp_mmu_set_spte_atomic"`).
    Yield(&'static str),
    /// A yield point with an argument (e.g. a gfn) for readable timelines.
    YieldArg(&'static str, u64),
    /// Before a primitive operation on a lock/SRCU/completion.
    Lock {
        obj: ObjId,
        op: LockOp,
    },
    /// The task could not proceed and sleeps on `obj`.
    Blocked {
        obj: ObjId,
    },
    /// Annotation with two arguments, recorded without a scheduling decision.
    Note {
        what: &'static str,
        a: u64,
        b: u64,
    },
    /// Task start and end.
    Start,
    Exit,
}

/// One trace line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TraceEvent {
    pub step: u64,
    pub task: TaskId,
    pub point: Point,
}

/// How much of the trace to keep. The hash always covers every event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TraceMode {
    /// Keep every event (for `--trace` and tests).
    Full,
    /// Keep the last N events (for fuzzing: violations carry their recent history).
    Ring(usize),
}

/// The recorded events plus a running hash over all of them.
#[derive(Clone, Debug)]
pub struct Trace {
    mode: TraceMode,
    events: VecDeque<TraceEvent>,
    hash: u64,
    total: u64,
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// Folds one word into the running hash: FNV-1a over whole words rather than bytes (the trace
/// hash runs at every step, so it must cost a few cycles), with a rotation so high bits of the
/// word reach the low bits of the next product.
fn fnv(h: u64, x: u64) -> u64 {
    (h ^ x).wrapping_mul(FNV_PRIME).rotate_left(29)
}

/// A yield-point name's hash: where the name lies in the binary (`coverage::static_key`),
/// not its text, so that it costs nothing per step. Trace hashes are compared only within
/// one binary (two runs of one input), where that place is fixed.
fn str_hash(s: &'static str) -> u64 {
    crate::coverage::static_key(s)
}

impl Trace {
    pub fn new(mode: TraceMode) -> Self {
        Trace {
            mode,
            events: VecDeque::new(),
            hash: FNV_OFFSET,
            total: 0,
        }
    }

    pub(crate) fn push(&mut self, ev: TraceEvent) {
        self.hash = fnv(self.hash, ev.step);
        self.hash = fnv(self.hash, ev.task.0 as u64);
        self.hash = fnv(self.hash, point_hash(&ev.point));
        self.total += 1;
        match self.mode {
            TraceMode::Full => self.events.push_back(ev),
            TraceMode::Ring(0) => {}
            TraceMode::Ring(n) => {
                if self.events.len() == n {
                    self.events.pop_front();
                }
                self.events.push_back(ev);
            }
        }
    }

    /// Kept events, oldest first.
    pub fn events(&self) -> impl ExactSizeIterator<Item = &TraceEvent> {
        self.events.iter()
    }

    /// The first value of every kept note named `what`, oldest first (for a SEAMCALL note,
    /// its raw status).
    pub fn notes(&self, what: &str) -> Vec<u64> {
        self.events
            .iter()
            .filter_map(|e| match e.point {
                Point::Note { what: w, a, .. } if w == what => Some(a),
                _ => None,
            })
            .collect()
    }

    /// The last `n` kept events, oldest first.
    pub fn tail(&self, n: usize) -> Vec<TraceEvent> {
        let skip = self.events.len().saturating_sub(n);
        self.events.iter().skip(skip).copied().collect()
    }

    /// FNV-1a hash over every event ever pushed (kept or not).
    pub fn hash(&self) -> u64 {
        self.hash
    }

    /// Number of events ever pushed.
    pub fn total(&self) -> u64 {
        self.total
    }
}

fn point_hash(p: &Point) -> u64 {
    match *p {
        Point::Yield(s) => fnv(1, str_hash(s)),
        Point::YieldArg(s, a) => fnv(fnv(2, str_hash(s)), a),
        Point::Lock { obj, op } => fnv(fnv(3, obj.0 as u64), op as u64),
        Point::Blocked { obj } => fnv(4, obj.0 as u64),
        Point::Note { what, a, b } => fnv(fnv(fnv(5, str_hash(what)), a), b),
        Point::Start => 6,
        Point::Exit => 7,
    }
}

/// Formats a point given the object and task name tables.
pub struct PointDisplay<'a> {
    pub point: &'a Point,
    pub obj_names: &'a [&'static str],
}

impl fmt::Display for PointDisplay<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let obj = |o: ObjId| self.obj_names.get(o.0 as usize).copied().unwrap_or("?");
        match *self.point {
            Point::Yield(s) => f.write_str(s),
            Point::YieldArg(s, a) => write!(f, "{s} {a:#x}"),
            Point::Lock { obj: o, op } => write!(f, "{}({})", op.name(), obj(o)),
            Point::Blocked { obj: o } => write!(f, "blocked on {}", obj(o)),
            Point::Note { what, a, b } => write!(f, "{what} {a:#x} {b:#x}"),
            Point::Start => f.write_str("start"),
            Point::Exit => f.write_str("exit"),
        }
    }
}
