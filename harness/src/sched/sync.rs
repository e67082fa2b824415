//! The kernel's blocking primitives as scheduler objects: mutex, rwlock (qrwlock fairness),
//! SRCU, completion and wait queue. Each operation is a yield point; a task that cannot proceed
//! sleeps on the object, and the object's state says whom it waits for (`waitgraph`).
//!
//! Handles are `Copy` ids: model structs hold them like the kernel holds `struct mutex`.
//! Misuse (unlocking what the task does not hold) is a model bug and panics, as lockdep would
//! splat.

use super::{Ctx, LockOp, ObjId, Point, TaskId, WaitOn};

#[derive(Clone)]
pub(crate) struct Obj {
    pub(crate) name: &'static str,
    pub(crate) state: ObjState,
}

#[derive(Clone, Hash)]
pub(crate) enum ObjState {
    Mutex {
        owner: Option<TaskId>,
    },
    RwLock {
        writer: Option<TaskId>,
        /// One entry per read acquisition (a task may appear more than once).
        readers: Vec<TaskId>,
        /// Writers that found the lock busy; new readers queue behind them (qrwlock).
        writers_waiting: Vec<TaskId>,
    },
    Srcu {
        /// Bumped by every synchronize; readers record the value when they enter.
        epoch: u64,
        next_idx: u64,
        /// Active readers: (task, epoch at entry, index).
        readers: Vec<(TaskId, u64, u64)>,
    },
    Completion {
        done: u32,
    },
    Queue,
}

fn new_obj(cx: &Ctx, name: &'static str, state: ObjState) -> ObjId {
    let mut objs = cx.0.objs.borrow_mut();
    let id = ObjId(objs.len() as u32);
    objs.push(Obj { name, state });
    id
}

/// True if `t` holds an `rwlock_t` (read or write): it runs with preemption off.
pub(crate) fn holds_rwlock(objs: &[Obj], t: TaskId) -> bool {
    objs.iter().any(|o| match &o.state {
        ObjState::RwLock {
            writer, readers, ..
        } => *writer == Some(t) || readers.contains(&t),
        _ => false,
    })
}

fn with_obj<R>(cx: &Ctx, id: ObjId, f: impl FnOnce(&mut ObjState) -> R) -> R {
    f(&mut cx.0.objs.borrow_mut()[id.0 as usize].state)
}

fn lock_point(obj: ObjId, op: LockOp) -> Point {
    Point::Lock { obj, op }
}

/// `struct mutex` (sleeping, not recursive).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mutex(ObjId);

impl Mutex {
    pub fn new(cx: &Ctx, name: &'static str) -> Self {
        Mutex(new_obj(cx, name, ObjState::Mutex { owner: None }))
    }

    pub fn id(self) -> ObjId {
        self.0
    }

    /// `mutex_lock()`.
    pub async fn lock(self, cx: &Ctx) {
        cx.yield_now(lock_point(self.0, LockOp::Lock)).await;
        let me = cx.current();
        loop {
            let got = with_obj(cx, self.0, |s| match s {
                ObjState::Mutex { owner } if owner.is_none() => {
                    *owner = Some(me);
                    true
                }
                _ => false,
            });
            if got {
                return;
            }
            cx.block(WaitOn::Mutex(self.0)).await;
        }
    }

    /// `mutex_trylock()`: no yield, no sleep.
    pub fn try_lock(self, cx: &Ctx) -> bool {
        let me = cx.current();
        with_obj(cx, self.0, |s| match s {
            ObjState::Mutex { owner } if owner.is_none() => {
                *owner = Some(me);
                true
            }
            _ => false,
        })
    }

    /// `mutex_unlock()`.
    pub async fn unlock(self, cx: &Ctx) {
        let me = cx.current();
        with_obj(cx, self.0, |s| match s {
            ObjState::Mutex { owner } if *owner == Some(me) => *owner = None,
            _ => panic!("mutex_unlock by a task that does not hold it"),
        });
        cx.wake(|w| w == WaitOn::Mutex(self.0), false);
        cx.yield_now(lock_point(self.0, LockOp::Unlock)).await;
    }

    /// `lockdep_assert_held()` for the current task.
    pub fn held_by_current(self, cx: &Ctx) -> bool {
        let me = cx.current();
        with_obj(
            cx,
            self.0,
            |s| matches!(s, ObjState::Mutex { owner: Some(o) } if *o == me),
        )
    }
}

/// `rwlock_t` with qrwlock fairness: once a writer waits, new readers queue behind it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RwLock(ObjId);

impl RwLock {
    pub fn new(cx: &Ctx, name: &'static str) -> Self {
        RwLock(new_obj(
            cx,
            name,
            ObjState::RwLock {
                writer: None,
                readers: Vec::new(),
                writers_waiting: Vec::new(),
            },
        ))
    }

    pub fn id(self) -> ObjId {
        self.0
    }

    /// `read_lock()`.
    pub async fn read(self, cx: &Ctx) {
        cx.yield_now(lock_point(self.0, LockOp::ReadLock)).await;
        let me = cx.current();
        loop {
            let got = with_obj(cx, self.0, |s| match s {
                ObjState::RwLock {
                    writer: None,
                    readers,
                    writers_waiting,
                } if writers_waiting.is_empty() => {
                    readers.push(me);
                    true
                }
                _ => false,
            });
            if got {
                return;
            }
            cx.block(WaitOn::RwRead(self.0)).await;
        }
    }

    /// `read_unlock()`.
    pub async fn read_unlock(self, cx: &Ctx) {
        let me = cx.current();
        with_obj(cx, self.0, |s| match s {
            ObjState::RwLock { readers, .. } => {
                let i = readers
                    .iter()
                    .position(|r| *r == me)
                    .expect("read_unlock by a task that does not hold the lock for read");
                readers.remove(i);
            }
            _ => unreachable!("not an rwlock"),
        });
        cx.wake(|w| w == WaitOn::RwWrite(self.0), false);
        cx.yield_now(lock_point(self.0, LockOp::ReadUnlock)).await;
    }

    /// `write_lock()`.
    pub async fn write(self, cx: &Ctx) {
        cx.yield_now(lock_point(self.0, LockOp::WriteLock)).await;
        let me = cx.current();
        loop {
            let got = with_obj(cx, self.0, |s| match s {
                ObjState::RwLock {
                    writer,
                    readers,
                    writers_waiting,
                } => {
                    if writer.is_none() && readers.is_empty() {
                        *writer = Some(me);
                        writers_waiting.retain(|w| *w != me);
                        true
                    } else {
                        if !writers_waiting.contains(&me) {
                            writers_waiting.push(me);
                        }
                        false
                    }
                }
                _ => unreachable!("not an rwlock"),
            });
            if got {
                return;
            }
            cx.block(WaitOn::RwWrite(self.0)).await;
        }
    }

    /// `write_unlock()`.
    pub async fn write_unlock(self, cx: &Ctx) {
        let me = cx.current();
        with_obj(cx, self.0, |s| match s {
            ObjState::RwLock { writer, .. } if *writer == Some(me) => *writer = None,
            _ => panic!("write_unlock by a task that does not hold the lock for write"),
        });
        let id = self.0;
        cx.wake(
            |w| w == WaitOn::RwRead(id) || w == WaitOn::RwWrite(id),
            false,
        );
        cx.yield_now(lock_point(self.0, LockOp::WriteUnlock)).await;
    }

    /// `lockdep_assert_held_read()` for the current task.
    pub fn held_read(self, cx: &Ctx) -> bool {
        let me = cx.current();
        with_obj(
            cx,
            self.0,
            |s| matches!(s, ObjState::RwLock { readers, .. } if readers.contains(&me)),
        )
    }

    /// `lockdep_assert_held_write()` for the current task.
    pub fn held_write(self, cx: &Ctx) -> bool {
        let me = cx.current();
        with_obj(
            cx,
            self.0,
            |s| matches!(s, ObjState::RwLock { writer: Some(w), .. } if *w == me),
        )
    }

    /// `lockdep_assert_held()`: read or write.
    pub fn held(self, cx: &Ctx) -> bool {
        self.held_read(cx) || self.held_write(cx)
    }
}

/// Index returned by `srcu_read_lock()`, handed back to `srcu_read_unlock()`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use = "an SRCU read section must be ended with read_unlock"]
pub struct SrcuIdx(u64);

/// `struct srcu_struct`: readers never block; `synchronize_srcu()` waits for the readers that
/// entered before it started, not for later ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Srcu(ObjId);

impl Srcu {
    pub fn new(cx: &Ctx, name: &'static str) -> Self {
        Srcu(new_obj(
            cx,
            name,
            ObjState::Srcu {
                epoch: 0,
                next_idx: 0,
                readers: Vec::new(),
            },
        ))
    }

    pub fn id(self) -> ObjId {
        self.0
    }

    /// `srcu_read_lock()`.
    pub async fn read_lock(self, cx: &Ctx) -> SrcuIdx {
        cx.yield_now(lock_point(self.0, LockOp::SrcuReadLock)).await;
        self.read_lock_now(cx)
    }

    /// `srcu_read_lock()` without a yield point, for re-entering a read section at the exact
    /// point the kernel does (e.g. right after a VM exit).
    pub fn read_lock_now(self, cx: &Ctx) -> SrcuIdx {
        let me = cx.current();
        with_obj(cx, self.0, |s| match s {
            ObjState::Srcu {
                epoch,
                next_idx,
                readers,
            } => {
                let idx = *next_idx;
                *next_idx += 1;
                readers.push((me, *epoch, idx));
                SrcuIdx(idx)
            }
            _ => unreachable!("not an srcu_struct"),
        })
    }

    /// `srcu_read_unlock()`.
    pub async fn read_unlock(self, cx: &Ctx, idx: SrcuIdx) {
        self.read_unlock_now(cx, idx);
        cx.yield_now(lock_point(self.0, LockOp::SrcuReadUnlock))
            .await;
    }

    /// `srcu_read_unlock()` without a yield point.
    pub fn read_unlock_now(self, cx: &Ctx, idx: SrcuIdx) {
        with_obj(cx, self.0, |s| match s {
            ObjState::Srcu { readers, .. } => {
                let i = readers
                    .iter()
                    .position(|r| r.2 == idx.0)
                    .expect("srcu_read_unlock of an index that is not held");
                readers.remove(i);
            }
            _ => unreachable!("not an srcu_struct"),
        });
        let id = self.0;
        cx.wake(
            |w| matches!(w, WaitOn::SrcuSync { obj, .. } if obj == id),
            false,
        );
    }

    /// `synchronize_srcu()` / `synchronize_srcu_expedited()`.
    pub async fn synchronize(self, cx: &Ctx) {
        cx.yield_now(lock_point(self.0, LockOp::Synchronize)).await;
        let target = with_obj(cx, self.0, |s| match s {
            ObjState::Srcu { epoch, .. } => {
                let t = *epoch;
                *epoch += 1;
                t
            }
            _ => unreachable!("not an srcu_struct"),
        });
        loop {
            let clear = with_obj(cx, self.0, |s| match s {
                ObjState::Srcu { readers, .. } => readers.iter().all(|r| r.1 > target),
                _ => unreachable!(),
            });
            if clear {
                return;
            }
            cx.block(WaitOn::SrcuSync {
                obj: self.0,
                target,
            })
            .await;
        }
    }

    /// True if the current task is inside a read section.
    pub fn held_by_current(self, cx: &Ctx) -> bool {
        let me = cx.current();
        with_obj(
            cx,
            self.0,
            |s| matches!(s, ObjState::Srcu { readers, .. } if readers.iter().any(|r| r.0 == me)),
        )
    }
}

/// `struct completion`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion(ObjId);

impl Completion {
    pub fn new(cx: &Ctx, name: &'static str) -> Self {
        Completion(new_obj(cx, name, ObjState::Completion { done: 0 }))
    }

    pub fn id(self) -> ObjId {
        self.0
    }

    /// `wait_for_completion()`.
    pub async fn wait(self, cx: &Ctx) {
        cx.yield_now(lock_point(self.0, LockOp::WaitForCompletion))
            .await;
        loop {
            let got = with_obj(cx, self.0, |s| match s {
                ObjState::Completion { done } if *done > 0 => {
                    if *done != u32::MAX {
                        *done -= 1;
                    }
                    true
                }
                _ => false,
            });
            if got {
                return;
            }
            cx.block(WaitOn::Completion(self.0)).await;
        }
    }

    /// `complete()`: releases one waiter.
    pub async fn complete(self, cx: &Ctx) {
        with_obj(cx, self.0, |s| {
            if let ObjState::Completion { done } = s {
                *done = done.saturating_add(1).min(u32::MAX - 1);
            }
        });
        let id = self.0;
        cx.wake(|w| w == WaitOn::Completion(id), true);
        cx.yield_now(lock_point(self.0, LockOp::Complete)).await;
    }

    /// `complete_all()`: releases every present and future waiter.
    pub async fn complete_all(self, cx: &Ctx) {
        with_obj(cx, self.0, |s| {
            if let ObjState::Completion { done } = s {
                *done = u32::MAX;
            }
        });
        let id = self.0;
        cx.wake(|w| w == WaitOn::Completion(id), false);
        cx.yield_now(lock_point(self.0, LockOp::Complete)).await;
    }
}

/// `wait_queue_head_t`: sleep until a condition over model state holds; wakers call `wake_all`
/// after changing that state. Holders are unknown, so these waits never form wait-for edges.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WaitQueue(ObjId);

impl WaitQueue {
    pub fn new(cx: &Ctx, name: &'static str) -> Self {
        WaitQueue(new_obj(cx, name, ObjState::Queue))
    }

    pub fn id(self) -> ObjId {
        self.0
    }

    /// `wait_event(wq, cond)`.
    pub async fn wait_until(self, cx: &Ctx, cond: impl Fn() -> bool) {
        cx.yield_now(lock_point(self.0, LockOp::Wait)).await;
        while !cond() {
            cx.block(WaitOn::Queue(self.0)).await;
        }
    }

    /// `wake_up_all(wq)`, no yield point (wakers are often inside critical sections).
    pub fn wake_all(self, cx: &Ctx) {
        let id = self.0;
        cx.wake(|w| w == WaitOn::Queue(id), false);
    }
}

/// Whom a task sleeping on `wait` is waiting for (its wait-for edges).
pub(crate) fn holders(cx: &Ctx, wait: WaitOn) -> Vec<TaskId> {
    let objs = cx.0.objs.borrow();
    let state = &objs[wait.obj().0 as usize].state;
    let mut out: Vec<TaskId> = match (wait, state) {
        (WaitOn::Mutex(_), ObjState::Mutex { owner }) => owner.iter().copied().collect(),
        (
            WaitOn::RwRead(_),
            ObjState::RwLock {
                writer,
                writers_waiting,
                ..
            },
        ) => writer
            .iter()
            .chain(writers_waiting.iter())
            .copied()
            .collect(),
        (
            WaitOn::RwWrite(_),
            ObjState::RwLock {
                writer, readers, ..
            },
        ) => writer.iter().chain(readers.iter()).copied().collect(),
        (WaitOn::SrcuSync { target, .. }, ObjState::Srcu { readers, .. }) => readers
            .iter()
            .filter(|r| r.1 <= target)
            .map(|r| r.0)
            .collect(),
        _ => Vec::new(),
    };
    out.sort_unstable();
    out.dedup();
    out
}
