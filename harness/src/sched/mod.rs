//! The deterministic scheduler: one OS thread, many model tasks.
//!
//! Each vCPU thread, VMM thread and guest program is an `async` task. Model code is written as
//! straight-line code that awaits at every point where the kernel could be preempted or race
//! (`cx.yield_now(..)`, lock operations, SEAMCALL entry and exit). The executor polls one task
//! per step; at each step where two or more tasks are runnable a [`Chooser`] picks which, so the
//! same choice bytes give the same interleaving and the same trace, byte for byte.
//!
//! Blocking primitives (`sync`) record who holds what and who waits on what, so a run in which
//! tasks wait on each other in a cycle stops with the cycle (see `waitgraph`), and a run that
//! exceeds its step budget stops with the tasks still pending.

pub mod choice;
pub mod sync;
pub mod trace;
mod waitgraph;
pub mod workload;

use std::cell::{Cell, RefCell};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

pub use choice::{Chooser, Decision, Directive, InputChooser, Pct, RoundRobin, Script, Until};
pub use sync::{Completion, Mutex, RwLock, Srcu, SrcuIdx, WaitQueue};
pub use trace::{LockOp, Point, PointDisplay, Trace, TraceEvent, TraceMode};

/// A task of the run (vCPU thread, VMM thread, guest program, ...).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TaskId(pub u32);

/// Formats into a hasher without building the string (state fingerprints hash `Debug`).
pub struct HashWriter<'a, H: std::hash::Hasher>(pub &'a mut H);

impl<H: std::hash::Hasher> std::fmt::Write for HashWriter<'_, H> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.write(s.as_bytes());
        Ok(())
    }
}

/// A blocking object (lock, SRCU struct, completion, wait queue).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjId(pub u32);

/// What a blocked task waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WaitOn {
    Mutex(ObjId),
    RwRead(ObjId),
    RwWrite(ObjId),
    /// `synchronize_srcu`: every reader that started at or before `target` must leave.
    SrcuSync {
        obj: ObjId,
        target: u64,
    },
    Completion(ObjId),
    Queue(ObjId),
}

impl WaitOn {
    pub fn obj(self) -> ObjId {
        match self {
            WaitOn::Mutex(o)
            | WaitOn::RwRead(o)
            | WaitOn::RwWrite(o)
            | WaitOn::Completion(o)
            | WaitOn::Queue(o)
            | WaitOn::SrcuSync { obj: o, .. } => o,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum TaskState {
    Runnable,
    Blocked(WaitOn),
    Done,
}

#[derive(Clone)]
struct TaskSlot {
    name: String,
    state: TaskState,
    last_point: Point,
    /// A retry loop that cannot progress until `WaitOn`'s holder does (a spin-wait): it stays
    /// runnable, but counts as a wait-for edge when looking for cycles.
    spinning: Option<WaitOn>,
    /// The retry loop the task is in and its iterations so far (`Ctx::retry`).
    retries: Option<(&'static str, u32)>,
    /// Times the task was polled.
    polls: u64,
    /// Every task's `polls` when this task's retry loop last counted an iteration.
    retry_marks: Vec<u64>,
    /// Set when the task's latest poll began an iteration of its retry loop: the value the
    /// loop carries from one iteration to the next (`Ctx::retry_carrying`), and whether the
    /// iteration counted toward the watchdog.
    began: Option<(u64, bool)>,
}

/// How the last poll of a task ended, as signalled by the yield and block futures.
#[derive(Clone, Copy)]
enum Pending {
    None,
    Yield(Point),
    Spin(Point, WaitOn),
    Block(WaitOn),
}

type TaskFuture = Pin<Box<dyn Future<Output = ()>>>;

/// Shared scheduler state, reachable from inside tasks through [`Ctx`].
pub struct Core {
    current: Cell<TaskId>,
    step: Cell<u64>,
    pending: Cell<Pending>,
    tasks: RefCell<Vec<TaskSlot>>,
    objs: RefCell<Vec<sync::Obj>>,
    trace: RefCell<Trace>,
    spawned: RefCell<Vec<(TaskId, TaskFuture)>>,
}

/// A task's handle on the scheduler: cheap to clone, passed into every model function.
#[derive(Clone)]
pub struct Ctx(Rc<Core>);

impl Ctx {
    /// The task being polled.
    pub fn current(&self) -> TaskId {
        self.0.current.get()
    }

    /// The current step number.
    pub fn step(&self) -> u64 {
        self.0.step.get()
    }

    /// A scheduling decision point: another task may run before this one continues.
    pub fn yield_now(&self, point: Point) -> YieldNow<'_> {
        YieldNow {
            core: &self.0,
            what: Some(Pending::Yield(point)),
        }
    }

    /// A yield point inside a retry loop that only ends when the holder of `on` makes progress
    /// (e.g. retrying a fault on a memslot whose update holds slots_lock). The task stays
    /// runnable; until `spin_end`, liveness checks treat it as waiting on `on`.
    pub fn spin_on(&self, point: Point, on: WaitOn) -> YieldNow<'_> {
        YieldNow {
            core: &self.0,
            what: Some(Pending::Spin(point, on)),
        }
    }

    /// Leaves a spin-wait loop (see `spin_on`).
    pub fn spin_end(&self) {
        let t = self.current();
        self.0.tasks.borrow_mut()[t.0 as usize].spinning = None;
    }

    /// One more iteration of the kernel retry loop `name` (the upstream function that loops):
    /// the oracle's soft-lockup watchdog reads the counts (`retrying`). An iteration counts
    /// only once every other runnable task that holds an `rwlock_t` (preemption off) has run
    /// since the last one counted: a loop that spins only while the schedule starves such a
    /// task (one holding a frozen SPTE under mmu_lock, which no CPU stops running for long) is
    /// the schedule's doing. A task outside such a section may stay off the CPU for as long
    /// as the schedule says (a VMM thread busy in userspace, say).
    pub fn retry(&self, name: &'static str) {
        self.retry_iteration(name, true, 0);
    }

    /// `retry` for a loop that carries a value from one iteration to the next (a flag the
    /// last attempt set, say). Every retry loop passes what it carries: the oracle proves a
    /// livelock when the model's state at an iteration's start repeats, and a carried value
    /// is state the model cannot see otherwise.
    pub fn retry_carrying(&self, name: &'static str, carried: u64) {
        self.retry_iteration(name, true, carried);
    }

    /// An iteration of the retry loop `name` that waits on work another task is doing and
    /// will finish (an MMU invalidation in flight over the faulting gfn: the fault retries
    /// until it ends, by design). It does not count toward the watchdog; if that work never
    /// ends, the step budget's liveness verdict sees the whole run stall.
    pub fn retry_waiting(&self, name: &'static str) {
        self.retry_iteration(name, false, 0);
    }

    fn retry_iteration(&self, name: &'static str, counts: bool, carried: u64) {
        let t = self.current().0 as usize;
        let mut tasks = self.0.tasks.borrow_mut();
        tasks[t].began = Some((carried, counts));
        let same_loop = matches!(tasks[t].retries, Some((n, _)) if n == name);
        let marks = &tasks[t].retry_marks;
        let objs = self.0.objs.borrow();
        let round = !same_loop
            || tasks.iter().enumerate().all(|(i, o)| {
                i == t
                    || o.state != TaskState::Runnable
                    || !sync::holds_rwlock(&objs, TaskId(i as u32))
                    || marks.get(i).is_none_or(|&m| o.polls > m)
            });
        if round {
            let polls: Vec<u64> = tasks.iter().map(|o| o.polls).collect();
            tasks[t].retry_marks = polls;
        }
        let r = &mut tasks[t].retries;
        *r = match *r {
            Some((n, k)) if n == name => Some((n, k.saturating_add(u32::from(round && counts)))),
            _ => Some((name, 1)),
        };
        if crate::coverage::enabled() {
            let k = r.map_or(0, |(_, k)| k);
            crate::coverage::hit(
                crate::coverage::Site::Retry,
                crate::coverage::static_key(name),
                crate::coverage::bucket(k),
            );
        }
    }

    /// Leaves the retry loop (see `retry`).
    pub fn retry_end(&self) {
        let t = self.current();
        self.0.tasks.borrow_mut()[t.0 as usize].retries = None;
    }

    /// Whether task `t`'s latest poll began an iteration of a retry loop that counts toward
    /// the watchdog, and the value the loop carries (see `retry_carrying`).
    pub fn began_counted_iteration(&self, t: TaskId) -> Option<u64> {
        match self.0.tasks.borrow()[t.0 as usize].began {
            Some((carried, true)) => Some(carried),
            _ => None,
        }
    }

    /// The one task that can run, when every other unfinished task sleeps.
    pub fn sole_runnable(&self) -> Option<TaskId> {
        let tasks = self.0.tasks.borrow();
        let mut runnable = tasks
            .iter()
            .enumerate()
            .filter(|(_, t)| t.state == TaskState::Runnable);
        match (runnable.next(), runnable.next()) {
            (Some((i, _)), None) => Some(TaskId(i as u32)),
            _ => None,
        }
    }

    /// Feeds the scheduler's state into `h`, for the oracle's proof of a livelock: every
    /// task's state, last point, spin and retry loop, every object's state, and every
    /// task's poll count but `spinner`'s (a task that did not run keeps its locals; the
    /// spinner's are the loop's, which it declares). Step numbers and iteration counts are
    /// left out: they grow in any loop.
    pub fn hash_for_livelock(&self, h: &mut impl std::hash::Hasher, spinner: TaskId) {
        use std::hash::Hash;
        for (i, t) in self.0.tasks.borrow().iter().enumerate() {
            t.state.hash(h);
            t.last_point.hash(h);
            t.spinning.hash(h);
            t.retries.map(|(n, _)| n).hash(h);
            t.began.hash(h);
            if i != spinner.0 as usize {
                t.polls.hash(h);
            }
        }
        for o in self.0.objs.borrow().iter() {
            o.name.hash(h);
            o.state.hash(h);
        }
    }

    /// Tasks inside a retry loop: (task, loop, iterations so far).
    pub fn retrying(&self) -> Vec<(TaskId, &'static str, u32)> {
        self.0
            .tasks
            .borrow()
            .iter()
            .enumerate()
            .filter_map(|(i, t)| t.retries.map(|(n, k)| (TaskId(i as u32), n, k)))
            .collect()
    }

    /// Shorthand for a named yield point.
    pub fn yield_at(&self, name: &'static str) -> YieldNow<'_> {
        self.yield_now(Point::Yield(name))
    }

    /// Records an annotation (no scheduling decision, no step).
    pub fn note(&self, what: &'static str, a: u64, b: u64) {
        let ev = TraceEvent {
            step: self.step(),
            task: self.current(),
            point: Point::Note { what, a, b },
        };
        self.0.trace.borrow_mut().push(ev);
    }

    /// Sleeps on `wait`; the primitive has already checked that it cannot proceed.
    pub(crate) fn block(&self, wait: WaitOn) -> YieldNow<'_> {
        YieldNow {
            core: &self.0,
            what: Some(Pending::Block(wait)),
        }
    }

    /// Starts a new task (e.g. a vCPU thread created by the VMM); it is runnable from the next
    /// step on.
    pub fn spawn(
        &self,
        name: impl Into<String>,
        fut: impl Future<Output = ()> + 'static,
    ) -> TaskId {
        let id = self.0.add_task(name.into());
        self.0.spawned.borrow_mut().push((id, Box::pin(fut)));
        id
    }

    /// Name of a task, for messages.
    pub fn task_name(&self, t: TaskId) -> String {
        self.0.tasks.borrow()[t.0 as usize].name.clone()
    }

    /// Every unfinished task with the last point it yielded at and what it sleeps on, if it
    /// does (what a budget report lists, available to observers mid-run).
    /// The tasks a wait is waiting for (a mutex's owner, an rwlock's writer or readers, ...).
    pub fn wait_holders(&self, w: WaitOn) -> Vec<TaskId> {
        sync::holders(self, w)
    }

    pub fn pending(&self) -> Vec<(TaskId, Point, Option<WaitOn>)> {
        self.0
            .tasks
            .borrow()
            .iter()
            .enumerate()
            .filter(|(_, t)| t.state != TaskState::Done)
            .map(|(i, t)| {
                let wait = match t.state {
                    TaskState::Blocked(w) => Some(w),
                    _ => None,
                };
                (TaskId(i as u32), t.last_point, wait)
            })
            .collect()
    }

    /// Name of a blocking object if it exists (for listing them all).
    pub fn try_obj_name(&self, o: ObjId) -> Option<&'static str> {
        self.0.objs.borrow().get(o.0 as usize).map(|x| x.name)
    }

    /// Name of a blocking object, for messages.
    pub fn obj_name(&self, o: ObjId) -> &'static str {
        self.0.objs.borrow()[o.0 as usize].name
    }

    /// True if the task has finished.
    pub fn is_done(&self, t: TaskId) -> bool {
        self.0.tasks.borrow()[t.0 as usize].state == TaskState::Done
    }

    fn wake(&self, pred: impl Fn(WaitOn) -> bool, only_one: bool) {
        for t in self.0.tasks.borrow_mut().iter_mut() {
            if let TaskState::Blocked(w) = t.state {
                if pred(w) {
                    t.state = TaskState::Runnable;
                    if only_one {
                        return;
                    }
                }
            }
        }
    }
}

impl Core {
    fn add_task(&self, name: String) -> TaskId {
        let mut tasks = self.tasks.borrow_mut();
        let id = TaskId(tasks.len() as u32);
        tasks.push(TaskSlot {
            name,
            state: TaskState::Runnable,
            last_point: Point::Start,
            spinning: None,
            retries: None,
            polls: 0,
            retry_marks: Vec::new(),
            began: None,
        });
        id
    }
}

/// Future returned by yield and block points: pending exactly once.
pub struct YieldNow<'a> {
    core: &'a Core,
    what: Option<Pending>,
}

impl Future for YieldNow<'_> {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<()> {
        match self.what.take() {
            Some(p) => {
                self.core.pending.set(p);
                Poll::Pending
            }
            None => Poll::Ready(()),
        }
    }
}

/// A wait-for cycle or a state in which every unfinished task sleeps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadlockReport {
    /// The cycle, each task with what it waits on (empty if every task sleeps on something no
    /// task holds, e.g. a completion that nobody will signal).
    pub cycle: Vec<(TaskId, WaitOn)>,
    /// Every blocked task and what it waits on.
    pub blocked: Vec<(TaskId, WaitOn)>,
}

/// Tasks still unfinished when the step budget ran out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BudgetReport {
    pub steps: u64,
    /// Each unfinished task with the last point it yielded at and whether it is blocked.
    pub pending: Vec<(TaskId, Point, Option<WaitOn>)>,
    /// A wait-for cycle through blocked and spin-waiting tasks, if there is one: a deadlock
    /// in which some of the tasks burn steps instead of sleeping.
    pub cycle: Vec<(TaskId, WaitOn)>,
}

/// How a call to [`Executor::run`] ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Every task finished.
    AllDone,
    /// A wait-for cycle, or every unfinished task asleep.
    Deadlock(DeadlockReport),
    /// The step budget ran out with work pending.
    BudgetExhausted(BudgetReport),
    /// The observer asked to stop (e.g. the oracle found a violation).
    Stopped,
}

/// What the observer learns after each step.
pub struct StepInfo {
    pub step: u64,
    pub task: TaskId,
    pub point: Point,
}

/// The executor: owns the task futures and steps them under a chooser.
pub struct Executor {
    core: Rc<Core>,
    futures: Vec<Option<TaskFuture>>,
    runnable: Vec<TaskId>,
    last: Option<TaskId>,
}

impl Executor {
    pub fn new(mode: TraceMode) -> Self {
        Executor {
            core: Rc::new(Core {
                current: Cell::new(TaskId(0)),
                step: Cell::new(0),
                pending: Cell::new(Pending::None),
                tasks: RefCell::new(Vec::new()),
                objs: RefCell::new(Vec::new()),
                trace: RefCell::new(Trace::new(mode)),
                spawned: RefCell::new(Vec::new()),
            }),
            futures: Vec::new(),
            runnable: Vec::new(),
            last: None,
        }
    }

    /// A context for building primitives and model state before tasks start.
    pub fn ctx(&self) -> Ctx {
        Ctx(self.core.clone())
    }

    /// Adds a task.
    pub fn spawn(
        &mut self,
        name: impl Into<String>,
        fut: impl Future<Output = ()> + 'static,
    ) -> TaskId {
        self.ctx().spawn(name, fut)
    }

    /// A copy of this executor and of every scheduling object, to go on from where it stands;
    /// only between runs with every task finished (futures cannot be copied). Snapshots of a
    /// built stack start from it (`Stack::fork`).
    pub fn fork(&self) -> (Executor, Ctx) {
        let core = &self.core;
        assert!(
            self.futures.iter().all(Option::is_none) && core.spawned.borrow().is_empty(),
            "fork: a task is still running"
        );
        let ex = Executor {
            core: Rc::new(Core {
                current: Cell::new(core.current.get()),
                step: Cell::new(core.step.get()),
                pending: Cell::new(core.pending.get()),
                tasks: RefCell::new(core.tasks.borrow().clone()),
                objs: RefCell::new(core.objs.borrow().clone()),
                trace: RefCell::new(core.trace.borrow().clone()),
                spawned: RefCell::new(Vec::new()),
            }),
            futures: self.futures.iter().map(|_| None).collect(),
            runnable: self.runnable.clone(),
            last: self.last,
        };
        let cx = ex.ctx();
        (ex, cx)
    }

    /// Steps taken so far (over every `run` call).
    pub fn steps(&self) -> u64 {
        self.core.step.get()
    }

    /// The trace so far.
    pub fn trace(&self) -> std::cell::Ref<'_, Trace> {
        self.core.trace.borrow()
    }

    /// Task names in id order.
    pub fn task_names(&self) -> Vec<String> {
        self.core
            .tasks
            .borrow()
            .iter()
            .map(|t| t.name.clone())
            .collect()
    }

    /// Object names in id order.
    pub fn obj_names(&self) -> Vec<&'static str> {
        self.core.objs.borrow().iter().map(|o| o.name).collect()
    }

    /// True if no task is still unfinished.
    pub fn all_done(&self) -> bool {
        self.core
            .tasks
            .borrow()
            .iter()
            .all(|t| t.state == TaskState::Done)
    }

    /// Steps tasks until all finish, a deadlock, `max_steps` total steps, or the observer
    /// returns `false`.
    pub fn run<C: Chooser + ?Sized>(
        &mut self,
        chooser: &mut C,
        max_steps: u64,
        observer: &mut dyn FnMut(&StepInfo) -> bool,
    ) -> Outcome {
        let waker = Waker::noop();
        let mut cx = Context::from_waker(waker);
        loop {
            self.adopt_spawned();
            self.runnable.clear();
            {
                let tasks = self.core.tasks.borrow();
                for (i, t) in tasks.iter().enumerate() {
                    if t.state == TaskState::Runnable {
                        self.runnable.push(TaskId(i as u32));
                    }
                }
            }
            if self.runnable.is_empty() {
                if self.all_done() {
                    return Outcome::AllDone;
                }
                let ctx = self.ctx();
                return Outcome::Deadlock(waitgraph::all_blocked_report(&ctx));
            }
            let step = self.core.step.get();
            if step >= max_steps {
                return Outcome::BudgetExhausted(self.budget_report());
            }
            let pick = if self.runnable.len() == 1 {
                self.runnable[0]
            } else {
                let current = self.last.filter(|t| self.runnable.contains(t));
                let last_point = match self.last {
                    Some(t) => self.core.tasks.borrow()[t.0 as usize].last_point,
                    None => Point::Start,
                };
                chooser.choose(&Decision {
                    current,
                    last_point,
                    runnable: &self.runnable,
                    step,
                })
            };
            let switched_from = self.last.filter(|&t| t != pick);
            self.last = Some(pick);
            {
                let mut tasks = self.core.tasks.borrow_mut();
                tasks[pick.0 as usize].polls += 1;
                tasks[pick.0 as usize].began = None;
            }
            self.core.current.set(pick);
            self.core.step.set(step + 1);
            let fut = self.futures[pick.0 as usize]
                .as_mut()
                .expect("runnable task has a future");
            let point = match fut.as_mut().poll(&mut cx) {
                Poll::Ready(()) => {
                    {
                        let mut tasks = self.core.tasks.borrow_mut();
                        tasks[pick.0 as usize].spinning = None;
                        tasks[pick.0 as usize].retries = None;
                    }
                    self.futures[pick.0 as usize] = None;
                    self.core.tasks.borrow_mut()[pick.0 as usize].state = TaskState::Done;
                    Point::Exit
                }
                Poll::Pending => match self.core.pending.replace(Pending::None) {
                    Pending::Yield(p) => p,
                    Pending::Spin(p, on) => {
                        self.core.tasks.borrow_mut()[pick.0 as usize].spinning = Some(on);
                        p
                    }
                    Pending::Block(w) => {
                        self.core.tasks.borrow_mut()[pick.0 as usize].state = TaskState::Blocked(w);
                        Point::Blocked { obj: w.obj() }
                    }
                    Pending::None => panic!(
                        "task {} awaited a future that is not a scheduler point",
                        self.core.tasks.borrow()[pick.0 as usize].name
                    ),
                },
            };
            let prev = std::mem::replace(
                &mut self.core.tasks.borrow_mut()[pick.0 as usize].last_point,
                point,
            );
            if crate::coverage::enabled() {
                let other =
                    switched_from.map(|t| self.core.tasks.borrow()[t.0 as usize].last_point);
                self.cover(pick, prev, point, other);
            }
            self.core.trace.borrow_mut().push(TraceEvent {
                step,
                task: pick,
                point,
            });
            if let Point::Blocked { .. } = point {
                let ctx = self.ctx();
                if let Some(cycle) = waitgraph::find_cycle(&ctx, pick) {
                    return Outcome::Deadlock(DeadlockReport {
                        cycle,
                        blocked: waitgraph::blocked_tasks(&ctx),
                    });
                }
            }
            if !observer(&StepInfo {
                step,
                task: pick,
                point,
            }) {
                return Outcome::Stopped;
            }
        }
    }

    /// Feedback-map sites of one step (`coverage`): the task's edge between yield points; at a
    /// context switch, the interleaving (where the task that ran before stands, where this one
    /// resumes); when it blocked, the contended object with the kinds of waiter and holder.
    fn cover(&self, task: TaskId, prev: Point, point: Point, other: Option<Point>) {
        use crate::coverage::{hit, name_key, static_key, task_kind, Site};
        let objs = self.core.objs.borrow();
        let key = |p: Point| -> u64 {
            match p {
                Point::Yield(s) | Point::YieldArg(s, _) => static_key(s),
                Point::Lock { obj, op } => static_key(objs[obj.0 as usize].name) ^ (op as u64 + 1),
                Point::Blocked { obj } => static_key(objs[obj.0 as usize].name).rotate_left(7),
                Point::Note { what, .. } => static_key(what).rotate_left(13),
                Point::Start => 1,
                Point::Exit => 2,
            }
        };
        hit(Site::Edge, key(prev), key(point));
        if let Some(o) = other {
            hit(Site::Interleave, key(o), key(prev));
        }
        if let Point::Blocked { obj } = point {
            let tasks = self.core.tasks.borrow();
            let kind = |t: TaskId| task_kind(&tasks[t.0 as usize].name);
            let o = &objs[obj.0 as usize];
            let holder = match &o.state {
                sync::ObjState::Mutex { owner: Some(t) } => kind(*t),
                sync::ObjState::RwLock {
                    writer: Some(t), ..
                } => kind(*t),
                sync::ObjState::RwLock { readers, .. } if !readers.is_empty() => {
                    kind(readers[0]) | 4
                }
                _ => 0,
            };
            hit(Site::Contention, name_key(o.name), kind(task) << 8 | holder);
        }
    }

    fn adopt_spawned(&mut self) {
        if self.core.spawned.borrow().is_empty() {
            return;
        }
        let spawned = std::mem::take(&mut *self.core.spawned.borrow_mut());
        for (id, fut) in spawned {
            let i = id.0 as usize;
            if self.futures.len() <= i {
                self.futures.resize_with(i + 1, || None);
            }
            self.futures[i] = Some(fut);
        }
    }

    fn budget_report(&self) -> BudgetReport {
        let ctx = self.ctx();
        BudgetReport {
            cycle: waitgraph::any_cycle(&ctx),
            steps: self.core.step.get(),
            pending: ctx.pending(),
        }
    }

    /// Renders the kept trace as a timeline, one line per event.
    pub fn render_trace(&self) -> String {
        use std::fmt::Write;
        let names = self.task_names();
        let objs = self.obj_names();
        let mut out = String::new();
        for ev in self.trace().events() {
            let _ = writeln!(
                out,
                "{:>6}  {:<12} {}",
                ev.step,
                names[ev.task.0 as usize],
                PointDisplay {
                    point: &ev.point,
                    obj_names: &objs
                }
            );
        }
        out
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "task{}", self.0)
    }
}

#[cfg(test)]
mod tests;
