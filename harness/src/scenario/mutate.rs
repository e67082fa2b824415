//! Structure-aware mutation: edits of a scenario a byte mutator would rarely make in one step
//! (insert, delete, duplicate, swap and retarget ops; move an op to another thread; add or drop
//! a vCPU; perturb, lengthen or shorten the schedule; splice a task from another input). The
//! engine decodes an input, applies one of these and encodes the result with `wire::encode`.
//! New ops and new targets draw their gfns from the compact decoder's pages and from the gfns
//! the scenario already names, so that edits keep colliding on the same pages and tables.

use super::decode::GFNS;
use super::{
    GuestStep, Scenario, Schedule, Task, TaskName, TaskOps, VmmOp, MAX_NPAGES, MAX_TASK_OPS,
    MAX_VCPUS, MAX_VMM_TASKS,
};
use crate::addr::{Gfn, Gpa};
use crate::tdx_module::{busy_operands, BUSY_INJECTABLE, ERROR_INJECTABLE};

/// The randomness a mutation draws on (LibAFL's generator in the engine, splitmix in tests).
pub trait Pick {
    /// A value in `0..n` (n > 0).
    fn below(&mut self, n: usize) -> usize;

    fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }
}

impl Pick for crate::sched::choice::SplitMix64 {
    fn below(&mut self, n: usize) -> usize {
        crate::sched::choice::SplitMix64::below(self, n as u64) as usize
    }
}

/// One kind of edit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mutation {
    InsertOp,
    DeleteOp,
    DuplicateOp,
    SwapOps,
    RetargetOp,
    MoveOp,
    AddVcpu,
    RemoveVcpu,
    PerturbSchedule,
    LengthenSchedule,
    ShortenSchedule,
    SpliceTask,
}

impl Mutation {
    pub const ALL: [Mutation; 12] = [
        Mutation::InsertOp,
        Mutation::DeleteOp,
        Mutation::DuplicateOp,
        Mutation::SwapOps,
        Mutation::RetargetOp,
        Mutation::MoveOp,
        Mutation::AddVcpu,
        Mutation::RemoveVcpu,
        Mutation::PerturbSchedule,
        Mutation::LengthenSchedule,
        Mutation::ShortenSchedule,
        Mutation::SpliceTask,
    ];
}

/// Every gfn an op of `s` names.
fn named_gfns(s: &Scenario) -> Vec<Gfn> {
    let mut out = Vec::new();
    for t in &s.tasks {
        match &t.ops {
            TaskOps::Vmm(ops) => out.extend(ops.iter().filter_map(|o| vmm_gfn(o).map(|(g, _)| g))),
            TaskOps::Guest(ops) => {
                out.extend(ops.iter().filter_map(|o| guest_gfn(o).map(|(g, _)| g)))
            }
        }
    }
    out
}

/// A gfn for a new op or target: one the scenario names (or its neighbour), or one of the
/// compact decoder's.
fn pick_gfn(p: &mut impl Pick, s: &Scenario) -> Gfn {
    let named = named_gfns(s);
    if !named.is_empty() && p.below(3) != 0 {
        let g = named[p.below(named.len())];
        return match p.below(8) {
            0 => Gfn::new(g.raw().saturating_sub(1)),
            1 => Gfn::new((g.raw() + 1).min(super::MAX_GFN)),
            _ => g,
        };
    }
    Gfn::new(GFNS[p.below(GFNS.len())])
}

/// A page count: mostly a page or a few, sometimes a 2M region or the whole file.
fn pick_npages(p: &mut impl Pick, gfn: Gfn) -> u64 {
    let n = [1, 1, 1, 2, 3, 4, 512, MAX_NPAGES][p.below(8)];
    n.min(MAX_NPAGES.min(super::MAX_GFN + 1 - gfn.raw()))
}

fn pick_vcpu(p: &mut impl Pick, s: &Scenario) -> u8 {
    p.below(usize::from(s.vcpus)) as u8
}

/// The (gfn, page count) of a VMM op that names a range or a page.
fn vmm_gfn(op: &VmmOp) -> Option<(Gfn, Option<u64>)> {
    match *op {
        VmmOp::Convert { gfn, npages, .. }
        | VmmOp::PunchHole { gfn, npages }
        | VmmOp::Allocate { gfn, npages }
        | VmmOp::DontNeed { gfn, npages }
        | VmmOp::Prefault { gfn, npages, .. }
        | VmmOp::CreateSlotAt { gfn, npages, .. } => Some((gfn, Some(npages))),
        VmmOp::DeleteSlot { gfn }
        | VmmOp::ZeroStep { gfn, .. }
        | VmmOp::InitMemRegion { gfn, .. } => Some((gfn, None)),
        _ => None,
    }
}

fn guest_gfn(op: &GuestStep) -> Option<(Gfn, Option<u64>)> {
    match *op {
        GuestStep::Accept { gfn }
        | GuestStep::AcceptHuge { gfn }
        | GuestStep::Read { gfn, .. }
        | GuestStep::Write { gfn, .. } => Some((gfn, None)),
        GuestStep::MapGpa { gfn, npages, .. } => Some((gfn, Some(npages))),
        GuestStep::AcceptGpa { .. } => None,
    }
}

/// Points a VMM op at another page (keeping its page count within bounds).
fn retarget_vmm(op: &mut VmmOp, to: Gfn, n: u64) {
    match op {
        VmmOp::Convert { gfn, npages, .. }
        | VmmOp::PunchHole { gfn, npages }
        | VmmOp::Allocate { gfn, npages }
        | VmmOp::DontNeed { gfn, npages }
        | VmmOp::Prefault { gfn, npages, .. }
        | VmmOp::CreateSlotAt { gfn, npages, .. } => {
            *gfn = to;
            *npages = n;
        }
        VmmOp::DeleteSlot { gfn }
        | VmmOp::ZeroStep { gfn, .. }
        | VmmOp::InitMemRegion { gfn, .. } => *gfn = to,
        _ => {}
    }
}

fn retarget_guest(op: &mut GuestStep, to: Gfn, n: u64) {
    match op {
        GuestStep::Accept { gfn }
        | GuestStep::AcceptHuge { gfn }
        | GuestStep::Read { gfn, .. }
        | GuestStep::Write { gfn, .. } => *gfn = to,
        GuestStep::MapGpa { gfn, npages, .. } => {
            *gfn = to;
            *npages = n;
        }
        GuestStep::AcceptGpa { gpa } => *gpa = Gpa::new(to.gpa().raw() | gpa.page_offset()),
    }
}

/// A new VMM op of any kind a fuzz input may carry.
fn new_vmm_op(p: &mut impl Pick, s: &Scenario) -> VmmOp {
    let gfn = pick_gfn(p, s);
    let npages = pick_npages(p, gfn);
    let vcpu = pick_vcpu(p, s);
    match p.below(21) {
        0 | 1 => VmmOp::Convert {
            gfn,
            npages,
            private: p.one_in(2),
        },
        2 => VmmOp::DeleteSlot { gfn },
        3 => VmmOp::CreateSlot,
        4 => VmmOp::CreateSlotAt {
            slot: 1 + p.below(usize::from(super::MAX_SLOT_ID)) as u8,
            gfn,
            npages,
            off: gfn.raw() % MAX_NPAGES,
            dirty_log: p.one_in(8),
        },
        5 => VmmOp::PunchHole { gfn, npages },
        6 => VmmOp::Allocate { gfn, npages },
        7 => VmmOp::DontNeed { gfn, npages },
        8 | 9 => VmmOp::Prefault {
            vcpu,
            gfn,
            npages,
            shared: p.one_in(8),
        },
        10 => VmmOp::Signal { vcpu },
        11 => VmmOp::Interrupt { vcpu },
        12 => VmmOp::ZapAllFast,
        13 => VmmOp::CloseGmem,
        14 => VmmOp::ZeroStep { vcpu, gfn },
        15 => {
            let leaf = BUSY_INJECTABLE[p.below(BUSY_INJECTABLE.len())];
            let ops = busy_operands(leaf);
            VmmOp::InjectBusy {
                leaf,
                operand: ops[p.below(ops.len())],
            }
        }
        16 => VmmOp::InjectError {
            leaf: ERROR_INJECTABLE[p.below(ERROR_INJECTABLE.len())].0,
        },
        17 => VmmOp::AllocFail {
            n: 1 + p.below(4) as u8,
            after: if p.one_in(4) { p.below(8) as u8 } else { 0 },
        },
        18 => [VmmOp::InitVm, VmmOp::CreateVcpu, VmmOp::Finalize][p.below(3)],
        19 => VmmOp::InitVcpu { vcpu },
        _ => VmmOp::Destroy,
    }
}

/// A new guest op, hostile ones included.
fn new_guest_op(p: &mut impl Pick, s: &Scenario) -> GuestStep {
    let gfn = pick_gfn(p, s);
    match p.below(8) {
        0 | 1 => GuestStep::Accept { gfn },
        2 => GuestStep::AcceptHuge {
            gfn: if p.one_in(2) {
                Gfn::new(gfn.raw() & !511)
            } else {
                gfn
            },
        },
        3 => GuestStep::AcceptGpa {
            gpa: [
                Gpa::new(gfn.gpa().raw() + 0x123),
                gfn.gpa().to_shared(),
                Gpa::new(gfn.gpa().raw() | 1 << 48),
            ][p.below(3)],
        },
        4 => GuestStep::Read {
            gfn,
            shared: p.one_in(2),
        },
        5 => GuestStep::Write {
            gfn,
            shared: p.one_in(2),
            value: 1 + p.below(255) as u64,
        },
        _ => GuestStep::MapGpa {
            gfn,
            npages: pick_npages(p, gfn),
            private: p.one_in(2),
        },
    }
}

/// Delete, duplicate or swap ops of one program (VMM or guest alike).
fn edit_ops<T: Copy>(ops: &mut Vec<T>, m: Mutation, p: &mut impl Pick) -> bool {
    let len = ops.len();
    let fits = match m {
        Mutation::DuplicateOp => (1..MAX_TASK_OPS).contains(&len),
        Mutation::SwapOps => len >= 2,
        _ => len >= 1,
    };
    if !fits {
        return false;
    }
    let i = p.below(len);
    match m {
        Mutation::DeleteOp => {
            ops.remove(i);
        }
        Mutation::DuplicateOp => ops.insert(i, ops[i]),
        // Another op than `i`.
        _ => ops.swap(i, (i + 1 + p.below(len - 1)) % len),
    }
    true
}

fn task_len(t: &Task) -> usize {
    match &t.ops {
        TaskOps::Vmm(v) => v.len(),
        TaskOps::Guest(v) => v.len(),
    }
}

/// A task to edit: an existing one, or (when there is none, or now and then) a new VMM or vCPU
/// task the scenario may still have.
fn pick_task(p: &mut impl Pick, s: &mut Scenario) -> Option<usize> {
    let free: Vec<TaskName> = (0..MAX_VMM_TASKS)
        .map(TaskName::Vmm)
        .chain((0..s.vcpus).map(TaskName::Vcpu))
        .filter(|n| !s.tasks.iter().any(|t| t.name == *n))
        .collect();
    if !free.is_empty() && (s.tasks.is_empty() || p.one_in(8)) {
        let name = free[p.below(free.len())];
        let ops = match name {
            TaskName::Vmm(_) => TaskOps::Vmm(Vec::new()),
            TaskName::Vcpu(_) => TaskOps::Guest(Vec::new()),
        };
        s.tasks.push(Task { name, ops });
        return Some(s.tasks.len() - 1);
    }
    (!s.tasks.is_empty()).then(|| p.below(s.tasks.len()))
}

/// Applies `m` to `s`; false if it does not apply (e.g. no op to delete).
pub fn apply(m: Mutation, s: &mut Scenario, p: &mut impl Pick, other: Option<&Scenario>) -> bool {
    match m {
        Mutation::InsertOp => {
            let Some(t) = pick_task(p, s) else {
                return false;
            };
            let len = task_len(&s.tasks[t]);
            if len >= MAX_TASK_OPS {
                return false;
            }
            let at = p.below(len + 1);
            match s.tasks[t].name {
                TaskName::Vmm(_) => {
                    let op = new_vmm_op(p, s);
                    if let TaskOps::Vmm(v) = &mut s.tasks[t].ops {
                        v.insert(at, op);
                    }
                }
                TaskName::Vcpu(_) => {
                    let op = new_guest_op(p, s);
                    if let TaskOps::Guest(v) = &mut s.tasks[t].ops {
                        v.insert(at, op);
                    }
                }
            }
            true
        }
        Mutation::DeleteOp | Mutation::DuplicateOp | Mutation::SwapOps => {
            let Some(t) = pick_task(p, s) else {
                return false;
            };
            match &mut s.tasks[t].ops {
                TaskOps::Vmm(v) => edit_ops(v, m, p),
                TaskOps::Guest(v) => edit_ops(v, m, p),
            }
        }
        Mutation::RetargetOp => {
            let Some(t) = pick_task(p, s) else {
                return false;
            };
            let to = pick_gfn(p, s);
            let n = pick_npages(p, to);
            let vcpu = pick_vcpu(p, s);
            match &mut s.tasks[t].ops {
                TaskOps::Vmm(ops) if !ops.is_empty() => {
                    let i = p.below(ops.len());
                    // Half the time the vCPU an op names, else its page.
                    match &mut ops[i] {
                        VmmOp::Prefault { vcpu: v, .. }
                        | VmmOp::Signal { vcpu: v }
                        | VmmOp::Interrupt { vcpu: v }
                        | VmmOp::InitVcpu { vcpu: v }
                        | VmmOp::ZeroStep { vcpu: v, .. }
                            if p.one_in(2) =>
                        {
                            *v = vcpu
                        }
                        op => retarget_vmm(op, to, n),
                    }
                    true
                }
                TaskOps::Guest(ops) if !ops.is_empty() => {
                    let i = p.below(ops.len());
                    retarget_guest(&mut ops[i], to, n);
                    true
                }
                _ => false,
            }
        }
        Mutation::MoveOp => move_op(p, s),
        Mutation::AddVcpu => {
            if s.vcpus >= MAX_VCPUS {
                return false;
            }
            let v = s.vcpus;
            s.vcpus += 1;
            // The new vCPU runs a copy of another's program half the time (two vCPUs doing
            // the same thing race on the same pages), else nothing yet.
            let programs: Vec<&Vec<GuestStep>> = s
                .tasks
                .iter()
                .filter_map(|t| match &t.ops {
                    TaskOps::Guest(ops) => Some(ops),
                    TaskOps::Vmm(_) => None,
                })
                .collect();
            let ops = if !programs.is_empty() && p.one_in(2) {
                programs[p.below(programs.len())].clone()
            } else {
                Vec::new()
            };
            s.tasks.push(Task {
                name: TaskName::Vcpu(v),
                ops: TaskOps::Guest(ops),
            });
            true
        }
        Mutation::RemoveVcpu => {
            if s.vcpus <= 1 {
                return false;
            }
            s.vcpus -= 1;
            true
        }
        Mutation::PerturbSchedule | Mutation::LengthenSchedule | Mutation::ShortenSchedule => {
            let bytes = match &mut s.schedule {
                Schedule::Bytes(b) => b,
                // A script stays as written; fair becomes choices.
                Schedule::Script(_) => return false,
                Schedule::Fair => {
                    s.schedule = Schedule::Bytes(Vec::new());
                    let Schedule::Bytes(b) = &mut s.schedule else {
                        unreachable!()
                    };
                    b
                }
            };
            match m {
                Mutation::PerturbSchedule if !bytes.is_empty() => {
                    // A few choices flipped somewhere: another interleaving of the same ops.
                    for _ in 0..1 + p.below(4) {
                        let i = p.below(bytes.len());
                        bytes[i] = p.below(256) as u8;
                    }
                }
                Mutation::ShortenSchedule if !bytes.is_empty() => {
                    let keep = p.below(bytes.len());
                    bytes.truncate(keep);
                }
                _ => {
                    let n = 1 + p.below(32);
                    for _ in 0..n {
                        if bytes.len() < 4096 {
                            bytes.push(p.below(256) as u8);
                        }
                    }
                }
            }
            true
        }
        Mutation::SpliceTask => {
            let Some(o) = other.filter(|o| !o.tasks.is_empty()) else {
                return false;
            };
            if p.one_in(4) {
                s.schedule = o.schedule.clone();
                return true;
            }
            let mut t = o.tasks[p.below(o.tasks.len())].clone();
            if let TaskName::Vcpu(v) = t.name {
                t.name = TaskName::Vcpu(v % s.vcpus);
            }
            match s.tasks.iter_mut().find(|x| x.name == t.name) {
                Some(x) => *x = t,
                None => s.tasks.push(t),
            }
            true
        }
    }
}

/// Moves an op to another task of the same kind (a VMM op to the other VMM thread, a guest op
/// to another vCPU), creating that task if needed.
fn move_op(p: &mut impl Pick, s: &mut Scenario) -> bool {
    let from: Vec<usize> = (0..s.tasks.len())
        .filter(|&i| task_len(&s.tasks[i]) > 0)
        .collect();
    if from.is_empty() {
        return false;
    }
    let f = from[p.below(from.len())];
    let name = s.tasks[f].name;
    let peers: Vec<TaskName> = match name {
        TaskName::Vmm(_) => (0..MAX_VMM_TASKS).map(TaskName::Vmm).collect(),
        TaskName::Vcpu(_) => (0..s.vcpus).map(TaskName::Vcpu).collect(),
    };
    let peers: Vec<TaskName> = peers.into_iter().filter(|n| *n != name).collect();
    if peers.is_empty() {
        return false;
    }
    let to_name = peers[p.below(peers.len())];
    let to = match s.tasks.iter().position(|t| t.name == to_name) {
        Some(i) => i,
        None => {
            let ops = match to_name {
                TaskName::Vmm(_) => TaskOps::Vmm(Vec::new()),
                TaskName::Vcpu(_) => TaskOps::Guest(Vec::new()),
            };
            s.tasks.push(Task { name: to_name, ops });
            s.tasks.len() - 1
        }
    };
    let (a, b) = if f < to {
        let (x, y) = s.tasks.split_at_mut(to);
        (&mut x[f], &mut y[0])
    } else {
        let (x, y) = s.tasks.split_at_mut(f);
        (&mut y[0], &mut x[to])
    };
    match (&mut a.ops, &mut b.ops) {
        (TaskOps::Vmm(x), TaskOps::Vmm(y)) if y.len() < MAX_TASK_OPS => {
            let op = x.remove(p.below(x.len()));
            y.insert(p.below(y.len() + 1), op);
            true
        }
        (TaskOps::Guest(x), TaskOps::Guest(y)) if y.len() < MAX_TASK_OPS => {
            let op = x.remove(p.below(x.len()));
            y.insert(p.below(y.len() + 1), op);
            true
        }
        _ => false,
    }
}

/// Brings an edited scenario back within the text form's rules: vCPU references and tasks
/// within the vCPU count, one task per name, page counts within bounds, the vCPU limit above
/// the count when the setup build creates the vCPUs.
pub fn normalize(s: &mut Scenario) {
    let vcpus = s.vcpus;
    let mut seen = Vec::new();
    s.tasks.retain(|t| {
        let keep = match t.name {
            TaskName::Vcpu(v) => v < vcpus,
            TaskName::Vmm(i) => i < MAX_VMM_TASKS,
        } && !seen.contains(&t.name);
        seen.push(t.name);
        keep
    });
    let clamp = |gfn: Gfn, n: u64| n.clamp(1, MAX_NPAGES.min(super::MAX_GFN + 1 - gfn.raw()));
    for t in &mut s.tasks {
        match &mut t.ops {
            TaskOps::Vmm(ops) => {
                ops.truncate(MAX_TASK_OPS);
                for op in ops.iter_mut() {
                    match op {
                        VmmOp::Prefault { vcpu, .. }
                        | VmmOp::Signal { vcpu }
                        | VmmOp::Interrupt { vcpu }
                        | VmmOp::InitVcpu { vcpu }
                        | VmmOp::InitMemRegion { vcpu, .. }
                        | VmmOp::ZeroStep { vcpu, .. } => *vcpu %= vcpus,
                        _ => {}
                    }
                    if let Some((g, Some(n))) = vmm_gfn(op) {
                        retarget_vmm(op, g, clamp(g, n));
                    }
                }
            }
            TaskOps::Guest(ops) => {
                ops.truncate(MAX_TASK_OPS);
                for op in ops.iter_mut() {
                    if let Some((g, Some(n))) = guest_gfn(op) {
                        retarget_guest(op, g, clamp(g, n));
                    }
                }
            }
        }
    }
    if let Schedule::Script(dirs) = &mut s.schedule {
        for d in dirs.iter_mut() {
            if let TaskName::Vcpu(v) = &mut d.task {
                *v %= vcpus;
            }
        }
    }
    if let Some(m) = s.td.max_vcpus {
        if m < vcpus && !s.td.build_ops {
            s.td.max_vcpus = None;
        }
    }
}

/// One structure-aware edit of `s` (a few tries to find one that applies), then `normalize`.
/// Returns the edit made.
pub fn mutate(s: &mut Scenario, p: &mut impl Pick, other: Option<&Scenario>) -> Option<Mutation> {
    for _ in 0..8 {
        let m = Mutation::ALL[p.below(Mutation::ALL.len())];
        if apply(m, s, p, other) {
            normalize(s);
            return Some(m);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::text::{parse, print};
    use crate::scenario::{decode::decode, wire::encode};
    use crate::sched::choice::SplitMix64;

    /// Every edit of every kind leaves a scenario the text form accepts and the exact form
    /// carries unchanged.
    #[test]
    fn every_mutation_keeps_the_scenario_valid_and_encodable() {
        let mut rng = SplitMix64::new(17);
        let mut applied = [0usize; Mutation::ALL.len()];
        for n in 0..3000usize {
            let data: Vec<u8> = (0..n % 200).map(|_| rng.next_u64() as u8).collect();
            let other = decode(&(0..64).map(|_| rng.next_u64() as u8).collect::<Vec<u8>>());
            let mut s = decode(&data);
            for (k, &m) in Mutation::ALL.iter().enumerate() {
                if apply(m, &mut s, &mut rng, Some(&other)) {
                    applied[k] += 1;
                }
                normalize(&mut s);
                let t = print(&s);
                assert_eq!(parse(&t).as_ref(), Ok(&s), "after {m:?}:\n{t}");
                assert_eq!(decode(&encode(&s)), s, "after {m:?}:\n{t}");
            }
        }
        for (k, m) in Mutation::ALL.iter().enumerate() {
            assert!(applied[k] > 300, "{m:?} applied {} times", applied[k]);
        }
    }

    /// Edits change the scenario (an engine that mutated into the same input would waste runs).
    #[test]
    fn a_mutation_changes_the_scenario() {
        let mut rng = SplitMix64::new(23);
        let mut same = 0;
        for _ in 0..2000 {
            let data: Vec<u8> = (0..100).map(|_| rng.next_u64() as u8).collect();
            let before = decode(&data);
            let other = decode(&(0..100).map(|_| rng.next_u64() as u8).collect::<Vec<u8>>());
            let mut s = before.clone();
            mutate(&mut s, &mut rng, Some(&other));
            same += usize::from(s == before);
        }
        assert!(
            same < 200,
            "{same} of 2000 edits left the scenario unchanged"
        );
    }
}
