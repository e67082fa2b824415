//! Lock programs: small multi-task programs over the kernel's lock kinds, decoded from bytes.
//!
//! They exercise the scheduler on its own (the `scheduler` fuzz target, the scheduler benchmark,
//! and the self-test campaign of `tdxfuzz fuzz --target scheduler`): any byte string decodes to a
//! well-formed program (every lock taken is released, in reverse order), so the only ways a run
//! can end badly are the ones the scheduler must report: a deadlock with its cycle, or the
//! step budget.

use super::{Ctx, Executor, Mutex, RwLock, Srcu, SrcuIdx};

/// Upper bounds that keep every decoded program small.
pub const MAX_TASKS: usize = 4;
pub const MAX_OPS: usize = 24;
const MAX_DEPTH: usize = 4;

/// One step of a lock program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockOp {
    Yield,
    Mutex(u8),
    Read,
    Write,
    SrcuRead,
    Synchronize,
    /// Release the innermost held lock.
    Release,
}

/// A decoded program: one op list per task, each balanced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LockProgram {
    pub tasks: Vec<Vec<LockOp>>,
}

impl LockProgram {
    /// Decodes bytes: the first byte picks the task count (1..=4); then each byte is one op of
    /// the task named by its top two bits. Locks still held at the end are released in order.
    pub fn decode(bytes: &[u8]) -> Self {
        let ntasks = bytes
            .first()
            .map_or(1, |b| usize::from(b % MAX_TASKS as u8) + 1);
        let mut tasks: Vec<Vec<LockOp>> = vec![Vec::new(); ntasks];
        let mut depth = vec![0usize; ntasks];
        for &b in bytes.iter().skip(1) {
            let t = usize::from(b >> 6) % ntasks;
            if tasks[t].len() >= MAX_OPS {
                continue;
            }
            let op = match b & 0x7 {
                0 => LockOp::Yield,
                1 => LockOp::Mutex((b >> 3) & 1),
                2 => LockOp::Read,
                3 => LockOp::Write,
                4 => LockOp::SrcuRead,
                5 => LockOp::Synchronize,
                _ => LockOp::Release,
            };
            match op {
                LockOp::Release if depth[t] == 0 => continue,
                LockOp::Release => depth[t] -= 1,
                LockOp::Mutex(_) | LockOp::Read | LockOp::Write | LockOp::SrcuRead => {
                    if depth[t] == MAX_DEPTH {
                        continue;
                    }
                    depth[t] += 1;
                }
                LockOp::Yield | LockOp::Synchronize => {}
            }
            tasks[t].push(op);
        }
        for (t, d) in depth.iter().enumerate() {
            tasks[t].extend(std::iter::repeat_n(LockOp::Release, *d));
        }
        LockProgram { tasks }
    }

    /// Spawns the program's tasks on `ex`, repeating each op list `rounds` times.
    pub fn spawn(&self, ex: &mut Executor, rounds: u32) {
        let cx = ex.ctx();
        let locks = Locks {
            mutexes: [Mutex::new(&cx, "mutex_a"), Mutex::new(&cx, "mutex_b")],
            rw: RwLock::new(&cx, "mmu_lock"),
            srcu: Srcu::new(&cx, "srcu"),
        };
        for (i, ops) in self.tasks.iter().enumerate() {
            let ops = ops.clone();
            let cx = cx.clone();
            ex.spawn(format!("t{i}"), async move {
                for _ in 0..rounds {
                    run_ops(&cx, &locks, &ops).await;
                }
            });
        }
    }
}

#[derive(Clone, Copy)]
struct Locks {
    mutexes: [Mutex; 2],
    rw: RwLock,
    srcu: Srcu,
}

enum Held {
    Mutex(Mutex),
    Read,
    Write,
    Srcu(SrcuIdx),
}

async fn run_ops(cx: &Ctx, l: &Locks, ops: &[LockOp]) {
    let mut held: Vec<Held> = Vec::new();
    for op in ops {
        match *op {
            LockOp::Yield => cx.yield_at("work").await,
            LockOp::Mutex(i) => {
                let m = l.mutexes[usize::from(i)];
                m.lock(cx).await;
                held.push(Held::Mutex(m));
            }
            LockOp::Read => {
                l.rw.read(cx).await;
                held.push(Held::Read);
            }
            LockOp::Write => {
                l.rw.write(cx).await;
                held.push(Held::Write);
            }
            LockOp::SrcuRead => {
                let idx = l.srcu.read_lock(cx).await;
                held.push(Held::Srcu(idx));
            }
            LockOp::Synchronize => l.srcu.synchronize(cx).await,
            LockOp::Release => match held.pop() {
                Some(Held::Mutex(m)) => m.unlock(cx).await,
                Some(Held::Read) => l.rw.read_unlock(cx).await,
                Some(Held::Write) => l.rw.write_unlock(cx).await,
                Some(Held::Srcu(idx)) => l.srcu.read_unlock(cx, idx).await,
                None => {}
            },
        }
    }
}

/// The benchmark workload: 4 tasks, each taking SRCU, then mmu_lock for read with work inside,
/// and every fourth round a mutex and mmu_lock for write (the shape of vCPU faults racing a
/// memslot update).
pub fn lock_heavy() -> LockProgram {
    use LockOp::*;
    let vcpu = vec![
        SrcuRead, Read, Yield, Yield, Release, Yield, Read, Yield, Release, Release,
    ];
    let writer = vec![
        SrcuRead,
        Read,
        Yield,
        Release,
        Release,
        Mutex(0),
        Write,
        Yield,
        Yield,
        Release,
        Release,
    ];
    LockProgram {
        tasks: vec![vcpu.clone(), vcpu.clone(), vcpu, writer],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sched::{InputChooser, Outcome, RoundRobin, TraceMode};

    #[test]
    fn decode_is_balanced_and_bounded() {
        for seed in 0u64..300 {
            let mut rng = crate::sched::choice::SplitMix64::new(seed);
            let bytes: Vec<u8> = (0..(seed % 90) as usize)
                .map(|_| rng.next_u64() as u8)
                .collect();
            let p = LockProgram::decode(&bytes);
            assert!((1..=MAX_TASKS).contains(&p.tasks.len()));
            for ops in &p.tasks {
                assert!(ops.len() <= MAX_OPS + MAX_DEPTH);
                let mut depth = 0i32;
                for op in ops {
                    match op {
                        LockOp::Release => depth -= 1,
                        LockOp::Yield | LockOp::Synchronize => {}
                        _ => depth += 1,
                    }
                    assert!(depth >= 0);
                }
                assert_eq!(depth, 0);
            }
        }
    }

    #[test]
    fn lock_heavy_completes_under_fair_and_input_schedules() {
        let p = lock_heavy();
        let mut ex = Executor::new(TraceMode::Ring(8));
        p.spawn(&mut ex, 50);
        assert_eq!(
            ex.run(&mut RoundRobin::new(), 1_000_000, &mut |_| true),
            Outcome::AllDone
        );
        let mut ex = Executor::new(TraceMode::Ring(8));
        p.spawn(&mut ex, 50);
        let bytes: Vec<u8> = (0..255u8).collect();
        assert_eq!(
            ex.run(&mut InputChooser::new(&bytes), 1_000_000, &mut |_| true),
            Outcome::AllDone
        );
    }

    #[test]
    fn synchronize_under_srcu_read_is_found() {
        // One task: srcu_read_lock; synchronize_srcu -> self-deadlock.
        let p = LockProgram::decode(&[0, 0x04, 0x05]);
        assert_eq!(
            p.tasks[0],
            vec![LockOp::SrcuRead, LockOp::Synchronize, LockOp::Release]
        );
        let mut ex = Executor::new(TraceMode::Full);
        p.spawn(&mut ex, 1);
        assert!(matches!(
            ex.run(&mut RoundRobin::new(), 1000, &mut |_| true),
            Outcome::Deadlock(r) if r.cycle.len() == 1
        ));
    }
}
