//! Wait-for graph: who sleeps on whom, and the cycle when there is one.

use super::sync::holders;
use super::{Ctx, DeadlockReport, TaskId, TaskState, WaitOn};

/// Every blocked task and what it waits on, in task order.
pub(crate) fn blocked_tasks(cx: &Ctx) -> Vec<(TaskId, WaitOn)> {
    cx.0.tasks
        .borrow()
        .iter()
        .enumerate()
        .filter_map(|(i, t)| match t.state {
            TaskState::Blocked(w) => Some((TaskId(i as u32), w)),
            _ => None,
        })
        .collect()
}

fn wait_of(cx: &Ctx, t: TaskId) -> Option<WaitOn> {
    let tasks = cx.0.tasks.borrow();
    match tasks[t.0 as usize].state {
        TaskState::Blocked(w) => Some(w),
        TaskState::Runnable => tasks[t.0 as usize].spinning,
        TaskState::Done => None,
    }
}

/// The first cycle through blocked or spin-waiting tasks, in task order.
pub(crate) fn any_cycle(cx: &Ctx) -> Vec<(TaskId, WaitOn)> {
    let n = cx.0.tasks.borrow().len();
    (0..n as u32)
        .map(TaskId)
        .find_map(|t| find_cycle(cx, t))
        .unwrap_or_default()
}

/// A cycle through `start` in which every task is blocked on a holder of its object, found by
/// depth-first search in task order (so the same state gives the same cycle).
pub(crate) fn find_cycle(cx: &Ctx, start: TaskId) -> Option<Vec<(TaskId, WaitOn)>> {
    let mut path: Vec<(TaskId, WaitOn)> = Vec::new();
    let mut visited: Vec<TaskId> = Vec::new();
    dfs(cx, start, start, &mut path, &mut visited).then_some(path)
}

fn dfs(
    cx: &Ctx,
    start: TaskId,
    t: TaskId,
    path: &mut Vec<(TaskId, WaitOn)>,
    visited: &mut Vec<TaskId>,
) -> bool {
    let Some(w) = wait_of(cx, t) else {
        return false;
    };
    visited.push(t);
    path.push((t, w));
    for h in holders(cx, w) {
        if h == start {
            return true;
        }
        if !visited.contains(&h) && dfs(cx, start, h, path, visited) {
            return true;
        }
    }
    path.pop();
    false
}

/// Report for a state with no runnable task: the first cycle if any, and every blocked task.
pub(crate) fn all_blocked_report(cx: &Ctx) -> DeadlockReport {
    let blocked = blocked_tasks(cx);
    let cycle = blocked
        .iter()
        .find_map(|(t, _)| find_cycle(cx, *t))
        .unwrap_or_default();
    DeadlockReport { cycle, blocked }
}
